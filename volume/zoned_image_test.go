package volume

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

// TestSharedVectorsReportTheirZones opens the images another tool built
// from the spec and compares the zone report with the one its README gives.
func TestSharedVectorsReportTheirZones(t *testing.T) {
	const mib16, mib12 = 16 << 20, 12 << 20
	for _, name := range []string{"zoned-le-1g-16m-conv3.qcow2", "zoned-be-1g-16m-conv3.qcow2"} {
		t.Run(name, func(t *testing.T) {
			img, err := image.Open(filepath.Join("../../shared/testdata", name), image.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			d, err := OpenZones(img)
			if err != nil {
				t.Fatal(err)
			}
			got := d.Report(0, 64)
			for i, z := range got {
				want := zoned.Zone{Start: int64(i) * mib16, Length: mib16, Capacity: mib12, WritePointer: int64(i) * mib16, Type: zoned.SequentialWriteRequired, Cond: zoned.Empty}
				if i < 3 {
					want.Capacity, want.Type, want.Cond = mib16, zoned.Conventional, zoned.NotWritePointer
				}
				if z != want {
					t.Errorf("zone %d = %+v, want %+v", i, z, want)
				}
			}
			if len(got) != 64 {
				t.Fatalf("%d zones, want 64", len(got))
			}
			if open, active := d.Resources(); open != 0 || active != 0 {
				t.Errorf("resources open %d active %d after open, want 0 0", open, active)
			}
		})
	}
}

func createTestImage(t *testing.T, g zoned.Geometry, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "z.qcow2")
	if _, err := CreateZoned(p, image.CreateOptions{Size: size}, g); err != nil {
		t.Fatal(err)
	}
	return p
}

// openTestDevice creates a zoned image and opens its zoned.Device; the image
// is closed when the test ends.
func openTestDevice(t *testing.T, g zoned.Geometry, size int64) (string, *image.Image, *zoned.Device) {
	t.Helper()
	p := createTestImage(t, g, size)
	img, err := image.Open(p, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	d, err := OpenZones(img)
	if err != nil {
		t.Fatal(err)
	}
	return p, img, d
}

// TestDeviceStateSurvivesReopen drives zones through a zoned.Device on a real
// image file, closes it, and finds the conditions derived from the table.
func TestDeviceStateSurvivesReopen(t *testing.T) {
	const zs = 4 << 20
	p := createTestImage(t, zoned.Geometry{ZoneSize: zs, ZoneCapacity: 3 << 20, ConventionalZones: 1, MaxOpenZones: 3, MaxActiveZones: 4, MaxAppendBytes: 64 << 10}, 32<<20)
	img, err := image.Open(p, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d, err := OpenZones(img)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xa5}, 128<<10)
	if _, err := d.WriteAt(data, 1*zs); err != nil { // zone 1: closed after reopen
		t.Fatal(err)
	}
	if _, err := d.WriteAt(data, 2*zs+4096); !errors.Is(err, zoned.ErrNotAtWritePointer) {
		t.Fatalf("write off the write pointer: err = %v", err)
	}
	at, err := d.Append(data[:64<<10], 3*zs) // zone 3: closed
	if err != nil || at != 3*zs {
		t.Fatalf("append landed at %#x, err %v", at, err)
	}
	if err := d.Finish(4*zs, zs); err != nil { // zone 4: full
		t.Fatal(err)
	}
	if _, err := d.WriteAt(data, 5*zs); err != nil {
		t.Fatal(err)
	}
	if err := d.Reset(5*zs, zs); err != nil { // zone 5: empty again
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	img, err = image.Open(p, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if res, err := img.Check(false); err != nil || !res.Clean() {
		t.Fatalf("check: %v %+v", err, res)
	}
	d, err = OpenZones(img)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		cond zoned.Condition
		wp   int64
	}{{zoned.NotWritePointer, 0}, {zoned.Closed, zs + 128<<10}, {zoned.Empty, 2 * zs}, {zoned.Closed, 3*zs + 64<<10}, {zoned.Full, 5 * zs}, {zoned.Empty, 5 * zs}, {zoned.Empty, 6 * zs}, {zoned.Empty, 7 * zs}}
	for i, z := range d.Report(0, 8) {
		if z.Cond != want[i].cond || z.WritePointer != want[i].wp {
			t.Errorf("zone %d after reopen: %v at %#x, want %v at %#x", i, z.Cond, z.WritePointer, want[i].cond, want[i].wp)
		}
	}
	got := make([]byte, 128<<10)
	if _, err := d.ReadAt(got, zs); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("zone 1 data after reopen: err %v, equal %v", err, bytes.Equal(got, data))
	}
}

// TestResetGivesSpaceBack: a reset frees the zone's clusters, so writing
// the zone again does not grow the file.
// TestResetGivesSpaceBack: a zone reset frees the zone's clusters and
// gives their space back to the node's filesystem (du of the image drops
// by the zone), and the zone written again takes it anew; a volume that
// resets and rewrites a zone does not grow.
func TestResetGivesSpaceBack(t *testing.T) {
	const zs = 64 << 20
	p, img, d := openTestDevice(t, zoned.Geometry{ZoneSize: zs, ZoneCapacity: zs, MaxAppendBytes: 64 << 10}, 4*zs)
	du := func() int64 {
		t.Helper()
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return st.Sys().(*syscall.Stat_t).Blocks * 512
	}
	data := bytes.Repeat([]byte{1}, zs)
	write := func(off int64, p []byte) {
		t.Helper()
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	write(0, data)
	write(zs, data[:zs/2]) // 96 MiB written, as in issue 21's report
	full := du()
	const slack = 1 << 20 // metadata a flush may add
	for round := range 3 {
		if err := d.Reset(0, zs); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		if ext, _ := img.Map(0, zs); len(ext) != 1 || ext[0].Data {
			t.Fatalf("after reset the zone still maps data: %+v", ext)
		}
		if after := du(); after > full-zs+slack {
			t.Fatalf("round %d: du of the image went from %d to %d over a reset of a %d-byte zone", round, full, after, zs)
		}
		write(0, data)
		if after := du(); after > full+slack {
			t.Fatalf("round %d: du of the image grew from %d to %d over reset and rewrite", round, full, after)
		}
	}
}

// TestFinishAllocatesNothing: finishing zones, empty or part written,
// moves write pointers without writing a cluster.
func TestFinishAllocatesNothing(t *testing.T) {
	const zs = 8 << 20
	p, img, d := openTestDevice(t, zoned.Geometry{ZoneSize: zs, ZoneCapacity: zs, MaxAppendBytes: 64 << 10}, 64<<20)
	if _, err := d.WriteAt(make([]byte, 4096), zs); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Stat(p)
	if err := d.Finish(0, 8*zs); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	after, _ := os.Stat(p)
	if after.Size() != before.Size() {
		t.Fatalf("finish grew the file from %d to %d bytes", before.Size(), after.Size())
	}
	for i, z := range d.Report(0, 8) {
		if z.Cond != zoned.Full {
			t.Errorf("zone %d is %v after finish, want full", i, z.Cond)
		}
	}
	ext, err := img.Map(0, 8*zs)
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, e := range ext {
		if e.Data {
			data += e.Length
		}
	}
	if data > 64<<10 {
		t.Fatalf("%d bytes map to data after finish; only the 4 KiB written (one cluster) should", data)
	}
}

// TestConcurrentAppendsAndFlushesOnAnImage runs 16 appenders on 4 zones of
// a real image while another goroutine flushes: every append lands once,
// where it was told, and the image reopens clean with the same pointers.
func TestConcurrentAppendsAndFlushesOnAnImage(t *testing.T) {
	const (
		zs      = 4 << 20
		chunk   = 16 << 10
		writers = 16
		each    = 24 // 16 writers x 24 x 16 KiB = 6 MiB over 4 zones of 4 MiB
	)
	p := createTestImage(t, zoned.Geometry{ZoneSize: zs, ZoneCapacity: zs, MaxAppendBytes: 64 << 10, MaxOpenZones: 4}, 4*zs)
	img, err := image.Open(p, image.OpenOptions{CacheSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	d, err := OpenZones(img)
	if err != nil {
		t.Fatal(err)
	}
	type landing struct{ writer, seq int }
	var mu sync.Mutex
	landed := map[int64]landing{}
	var wg sync.WaitGroup
	stop, flusherDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(flusherDone)
		for {
			select {
			case <-stop:
				return
			default:
				if err := d.Flush(); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for seq := range each {
				for i := range buf {
					buf[i] = byte(w*each + seq)
				}
				at, err := d.Append(buf, int64(w%4)*zs)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				landed[at] = landing{w, seq}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-flusherDone // a flush in flight must end before the close
	if t.Failed() {
		return
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img, err = image.Open(p, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if res, err := img.Check(false); err != nil || !res.Clean() {
		t.Fatalf("check: %v %+v", err, res)
	}
	for z, wp := range mustWritePointers(t, img) {
		if want := int64(z)*zs + writers/4*each*chunk; wp != want {
			t.Errorf("zone %d: write pointer %#x after reopen, want %#x", z, wp, want)
		}
	}
	buf := make([]byte, chunk)
	for at, l := range landed {
		if _, err := img.ReadAt(buf, at); err != nil {
			t.Fatal(err)
		}
		if buf[0] != byte(l.writer*each+l.seq) || buf[chunk-1] != buf[0] {
			t.Fatalf("append %d/%d landed at %#x but reads back %#x", l.writer, l.seq, at, buf[0])
		}
	}
	if len(landed) != writers*each {
		t.Fatalf("%d appends landed at distinct offsets, want %d", len(landed), writers*each)
	}
}

// mustWritePointers is img's write pointers; an error fails the test.
func mustWritePointers(t testing.TB, img *image.Image) []int64 {
	t.Helper()
	wps, err := img.WritePointers()
	if err != nil {
		t.Fatal(err)
	}
	return wps
}
