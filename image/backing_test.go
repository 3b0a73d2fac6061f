package image

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// chainFixture is a base image holding random data at known places and
// an overlay over it, both real files.
type chainFixture struct {
	dir, base, top string
	want           []byte // what the disk reads as, kept beside the images
}

const chainSize = 8 << 20

func newChain(t *testing.T, opts CreateOptions) *chainFixture {
	t.Helper()
	dir := t.TempDir()
	c := &chainFixture{dir: dir, base: filepath.Join(dir, "base.qcow2"), top: filepath.Join(dir, "top.qcow2"), want: make([]byte, chainSize)}
	opts.Size = chainSize
	if err := Create(c.base, opts); err != nil {
		t.Fatal(err)
	}
	img, err := Open(c.base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	// Whole clusters, a cluster's middle, and a run across L2 tables'
	// worth of data, with holes between.
	for _, w := range []struct{ off, n int64 }{{0, 64 << 10}, {200 << 10, 3000}, {1 << 20, 2 << 20}, {chainSize - 4096, 4096}} {
		p := make([]byte, w.n)
		for i := range p {
			p[i] = byte(r.Uint32())
		}
		if _, err := img.WriteAt(p, w.off); err != nil {
			t.Fatal(err)
		}
		copy(c.want[w.off:], p)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Create(c.top, CreateOptions{BackingFile: "base.qcow2"}); err != nil {
		t.Fatal(err)
	}
	return c
}

// readAll reads the whole disk of the image at path.
func readAll(t *testing.T, img *Image) []byte {
	t.Helper()
	got := make([]byte, img.Size())
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

func checkClean(t *testing.T, path string) {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	res, err := img.Check(false)
	if err != nil || !res.Clean() {
		t.Fatalf("check %s: %v %+v", path, err, res)
	}
}

func TestOverlayReadsWhatItDoesNotHoldFromItsBackingFile(t *testing.T) {
	c := newChain(t, CreateOptions{})
	baseBefore, _ := os.ReadFile(c.base)
	top, err := Open(c.top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, top); !bytes.Equal(got, c.want) {
		t.Fatal("a fresh overlay does not read as its backing file")
	}
	info := top.Info()
	if info.BackingFilename != "base.qcow2" || info.FullBackingFilename != c.base || info.BackingFormat != "qcow2" || info.VirtualSize != chainSize {
		t.Fatalf("info = %+v", info)
	}

	// Each change to the overlay, and what the disk reads as after it.
	changes := []struct {
		name string
		do   func() error
		off  int64
		data []byte
	}{
		{"a write inside a backing cluster keeps the rest of it",
			func() error { _, err := top.WriteAt([]byte("overlay"), 200<<10+100); return err }, 200<<10 + 100, []byte("overlay")},
		{"a write over a hole of the backing file",
			func() error { _, err := top.WriteAt(bytes.Repeat([]byte{7}, 5000), 5<<20+1); return err }, 5<<20 + 1, bytes.Repeat([]byte{7}, 5000)},
		{"a discard of backing clusters reads zeros, not the backing data",
			func() error { return top.Discard(1<<20, 512<<10) }, 1 << 20, make([]byte, 512<<10)},
		{"zeroes over backing data with unmap",
			func() error { return top.WriteZeroes(2<<20, 128<<10, true) }, 2 << 20, make([]byte, 128<<10)},
		{"zeroes over backing data, not cluster aligned",
			func() error { return top.WriteZeroes(3<<20+512, 70<<10, false) }, 3<<20 + 512, make([]byte, 70<<10)},
	}
	for _, ch := range changes {
		if err := ch.do(); err != nil {
			t.Fatalf("%s: %v", ch.name, err)
		}
		copy(c.want[ch.off:], ch.data)
		if got := readAll(t, top); !bytes.Equal(got, c.want) {
			t.Fatalf("%s: the disk reads wrong", ch.name)
		}
	}
	// Map: the backing file's data shows through, and what the overlay
	// zeroed reads as zeros.
	ext, err := top.Map(1<<20, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) < 2 || !ext[0].Zero || ext[0].Length != 512<<10 || !ext[1].Data {
		t.Fatalf("map = %+v, want zeros then the backing file's data", ext)
	}
	if err := top.Close(); err != nil {
		t.Fatal(err)
	}
	top, err = Open(c.top, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, top); !bytes.Equal(got, c.want) {
		t.Fatal("the overlay reads wrong after a reopen")
	}
	top.Close()
	if after, _ := os.ReadFile(c.base); !bytes.Equal(after, baseBefore) {
		t.Fatal("writing the overlay changed its backing file")
	}
	checkClean(t, c.top)
	checkClean(t, c.base)
}

func TestOverlayLargerThanItsBackingFileReadsZerosPastIt(t *testing.T) {
	c := newChain(t, CreateOptions{})
	big := filepath.Join(c.dir, "big.qcow2")
	if err := Create(big, CreateOptions{Size: 2 * chainSize, BackingFile: "base.qcow2"}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(big, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := append(append([]byte(nil), c.want...), make([]byte, chainSize)...)
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatal("an overlay past its backing file's end does not read zeros there")
	}
}

func TestBadBackingFilesAreRefusedNamingThem(t *testing.T) {
	c := newChain(t, CreateOptions{})
	zonedBase := filepath.Join(c.dir, "zoned.qcow2")
	z := &Zones{ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, ConventionalZones: 1, MaxOpenZones: 2, MaxActiveZones: 3}
	if err := Create(zonedBase, CreateOptions{Size: chainSize, Zones: z}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		opts  CreateOptions
		words string
	}{
		{"missing", CreateOptions{BackingFile: "nope.qcow2"}, "nope.qcow2"},
		{"zones over a plain backing file", CreateOptions{BackingFile: "base.qcow2", Zones: z}, "plain backing file"},
		{"another zone size", CreateOptions{BackingFile: "zoned.qcow2", Zones: &Zones{ZoneSize: 2 << 20, ZoneCapacity: 2 << 20}}, "zone.size"},
		{"another capacity", CreateOptions{BackingFile: "zoned.qcow2", Zones: &Zones{ZoneSize: 1 << 20, ZoneCapacity: 512 << 10, ConventionalZones: 1}}, "zone.capacity"},
		{"smaller than a zoned backing file", CreateOptions{Size: chainSize / 2, BackingFile: "zoned.qcow2"}, "smaller"},
		{"preallocated", CreateOptions{BackingFile: "base.qcow2", Preallocation: PreallocMetadata}, "preallocation"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(c.dir, "new.qcow2")
			err := Create(p, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.words) {
				t.Fatalf("err = %v, want one naming %q", err, tc.words)
			}
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Fatal("a refused create left a file")
			}
		})
	}

	// A chain that loops: base.qcow2 made an overlay of itself.
	loop := filepath.Join(c.dir, "loop.qcow2")
	if err := Create(loop, CreateOptions{BackingFile: "base.qcow2"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(loop, c.base); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(c.top, OpenOptions{ReadOnly: true}); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "loop") {
		t.Fatalf("err = %v, want a refusal of the loop", err)
	}
}

func TestZonedOverlayTakesItsBackingFilesZonesAndWritePointers(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	z := &Zones{ZoneSize: 1 << 20, ZoneCapacity: 768 << 10, ConventionalZones: 1, MaxOpenZones: 2, MaxActiveZones: 3}
	if err := Create(base, CreateOptions{Size: 8 << 20, Zones: z}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantWPs := mustWritePointers(t, img)
	for zone, fill := range map[int]int64{2: 4096, 3: 768 << 10, 5: 512} {
		start := int64(zone) << 20
		if _, err := img.WriteAt(bytes.Repeat([]byte{byte(zone)}, int(fill)), start); err != nil {
			t.Fatal(err)
		}
		if err := img.SetWritePointer(zone, start+fill); err != nil {
			t.Fatal(err)
		}
		wantWPs[zone] = start + fill
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(dir, "top.qcow2")
	// Its own limits, with the backing file's zones, and a zone more.
	own := *z
	own.MaxOpenZones, own.MaxActiveZones = 4, 5
	if err := Create(top, CreateOptions{Size: 9 << 20, BackingFile: "base.qcow2", Zones: &own}); err != nil {
		t.Fatal(err)
	}
	img, err = Open(top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	got, ok := img.Zones()
	if !ok || got.MaxOpenZones != 4 || got.MaxActiveZones != 5 || got.NrZones != 9 || got.ZoneCapacity != z.ZoneCapacity {
		t.Fatalf("zones = %+v", got)
	}
	wantWPs = append(wantWPs, 8<<20)
	if wps := mustWritePointers(t, img); !equalInts(wps, wantWPs) {
		t.Fatalf("write pointers = %#x, want %#x", wps, wantWPs)
	}
	p := make([]byte, 4096)
	if _, err := img.ReadAt(p, 2<<20); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{2}, 4096)) {
		t.Fatalf("zone 2 does not read its backing data: %v", err)
	}
}

func equalInts(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSnapshotToFreezesTheImageAndGoesOnAsAnOverlay(t *testing.T) {
	c := newChain(t, CreateOptions{})
	journals := filepath.Join(c.dir, "journals")
	img, err := Open(c.top, OpenOptions{JournalDir: journals})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("before"), 4<<20); err != nil {
		t.Fatal(err)
	}
	copy(c.want[4<<20:], "before")
	snapWant := append([]byte(nil), c.want...)
	elsewhere := filepath.Join(c.dir, "snaps", "s1.qcow2")
	os.Mkdir(filepath.Dir(elsewhere), 0o755)
	if err := img.SnapshotTo(elsewhere); !errors.Is(err, ErrInvalidOption) || !strings.Contains(err.Error(), "base.qcow2") {
		t.Fatalf("a snapshot in another directory than the relative backing file's: err = %v", err)
	}
	snap := filepath.Join(c.dir, "s1.qcow2")
	if err := img.SnapshotTo(snap); err != nil {
		t.Fatal(err)
	}
	if err := img.SnapshotTo(snap); err == nil {
		t.Fatal("a second snapshot over an existing file succeeded")
	}
	if _, err := img.WriteAt([]byte("after!"), 4<<20); err != nil {
		t.Fatal(err)
	}
	copy(c.want[4<<20:], "after!")
	if got := readAll(t, img); !bytes.Equal(got, c.want) {
		t.Fatal("the image reads wrong after its snapshot")
	}
	if info := img.Info(); info.BackingFilename != "s1.qcow2" {
		t.Fatalf("backing = %q", info.BackingFilename)
	}
	// The snapshot, opened while the image is in use, holds what was
	// there before.
	s, err := Open(snap, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s); !bytes.Equal(got, snapWant) {
		t.Fatal("the snapshot does not hold the image's contents at the snapshot")
	}
	s.Close()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(journals); len(left) != 0 {
		t.Fatalf("journals left: %v", left)
	}
	for _, p := range []string{c.top, snap, c.base} {
		checkClean(t, p)
	}
	img, err = Open(c.top, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if got := readAll(t, img); !bytes.Equal(got, c.want) {
		t.Fatal("the image reads wrong after a reopen")
	}
}

func TestSnapshotToCrashAtEachStepLeavesAConsistentChain(t *testing.T) {
	for _, crashAt := range []string{"overlay", "link", "rename"} {
		t.Run(crashAt, func(t *testing.T) {
			c := newChain(t, CreateOptions{})
			img, err := Open(c.top, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt([]byte("flushed by the snapshot"), 6<<20); err != nil {
				t.Fatal(err)
			}
			copy(c.want[6<<20:], "flushed by the snapshot")
			errCrash := errors.New("crash")
			testHookStep = func(s string) error {
				if s == crashAt {
					return errCrash
				}
				return nil
			}
			defer func() { testHookStep = nil }()
			snap := filepath.Join(c.dir, "snap.qcow2")
			if err := img.SnapshotTo(snap); !errors.Is(err, errCrash) {
				t.Fatalf("err = %v", err)
			}
			img.file.Close() // the process dies: its files close, nothing more

			// Recovery as SnapshotTo's documentation has it: a snapshot name
			// that is the image's own file is removed.
			top, err := os.Stat(c.top)
			if err != nil {
				t.Fatal(err)
			}
			if st, err := os.Stat(snap); err == nil && os.SameFile(st, top) {
				if err := os.Remove(snap); err != nil {
					t.Fatal(err)
				}
			}
			img, err = Open(c.top, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, img); !bytes.Equal(got, c.want) {
				t.Fatal("the image lost data")
			}
			backing := img.Info().BackingFilename
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			_, statErr := os.Stat(snap)
			switch {
			case crashAt == "rename" && backing != "snap.qcow2":
				t.Fatalf("after the rename the image's backing file is %q", backing)
			case crashAt != "rename" && (backing != "base.qcow2" || statErr == nil):
				t.Fatalf("before the rename: backing %q, snapshot file %v", backing, statErr)
			}
			checkClean(t, c.top)
		})
	}
}

// TestSnapshotToUnderConcurrentWrites: writers keep going through a
// snapshot; each sees its own writes, the snapshot holds, for each writer,
// a value it wrote before the last one, and the image holds the last.
func TestSnapshotToUnderConcurrentWrites(t *testing.T) {
	c := newChain(t, CreateOptions{})
	img, err := Open(c.top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const writers, rounds = 4, 200
	done := make(chan error, writers)
	started := make(chan struct{}, writers)
	for w := range writers {
		go func() {
			off := int64(w) * 2 << 20
			for i := 1; i <= rounds; i++ {
				p := bytes.Repeat([]byte{byte(i)}, 4096)
				if _, err := img.WriteAt(p, off); err != nil {
					done <- err
					return
				}
				got := make([]byte, 4096)
				if _, err := img.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					done <- fmt.Errorf("writer %d round %d reads back wrong: %v", w, i, err)
					return
				}
				if i == rounds/4 {
					started <- struct{}{}
				}
			}
			done <- nil
		}()
	}
	for range writers {
		<-started
	}
	snap := filepath.Join(c.dir, "snap.qcow2")
	if err := img.SnapshotTo(snap); err != nil {
		t.Fatal(err)
	}
	for range writers {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	s, err := Open(snap, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for w := range writers {
		off := int64(w) * 2 << 20
		got := make([]byte, 4096)
		if _, err := s.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if v := got[0]; int(v) < rounds/4 || int(v) > rounds || !bytes.Equal(got, bytes.Repeat([]byte{v}, 4096)) {
			t.Fatalf("writer %d: the snapshot holds round %d, or a torn write", w, v)
		}
		if _, err := img.ReadAt(got, off); err != nil || got[0] != byte(rounds) {
			t.Fatalf("writer %d: the image holds round %d, want %d", w, got[0], rounds)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, c.top)
	checkClean(t, snap)
}
