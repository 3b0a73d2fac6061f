package image

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// written is data a test wrote at off, to be read back.
type written struct {
	off  int64
	data []byte
}

// writePattern writes n bytes of a pattern seeded by seed at off.
func writePattern(t testing.TB, img *Image, off, n int64, seed byte) written {
	t.Helper()
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i/512)
	}
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatalf("write %d bytes at %#x: %v", n, off, err)
	}
	return written{off, p}
}

// mustHold checks that img is size bytes, every write reads back and no
// other cluster holds data: the rest reads as zeros without reading a
// whole (possibly huge) disk.
func mustHold(t testing.TB, img *Image, size int64, ws []written) {
	t.Helper()
	if got := img.Size(); got != size {
		t.Fatalf("size %d, want %d", got, size)
	}
	cs := img.ClusterSize()
	covered := func(a, b int64) bool {
		for pos := a; pos < b; pos += cs {
			in := false
			for _, w := range ws {
				in = in || pos >= w.off/cs*cs && pos < w.off+int64(len(w.data))
			}
			if !in {
				return false
			}
		}
		return true
	}
	exts, err := img.Map(0, size)
	if err != nil {
		t.Fatalf("map: %v", err)
	}
	for _, e := range exts {
		if e.Data && !covered(e.Offset, e.Offset+e.Length) {
			t.Fatalf("data at %#x+%d, where nothing was written", e.Offset, e.Length)
		}
	}
	for _, w := range ws {
		got := make([]byte, len(w.data))
		if _, err := img.ReadAt(got, w.off); err != nil {
			t.Fatalf("read at %#x: %v", w.off, err)
		}
		if i := firstDiff(got, w.data); i >= 0 {
			t.Fatalf("byte %#x reads %#x, want %#x", w.off+int64(i), got[i], w.data[i])
		}
	}
}

func TestGrowPlainImageKeepsDataAndReadsZerosPastTheOldEnd(t *testing.T) {
	cases := []struct {
		name          string
		cs            int
		size, newSize int64
		l1Moves       bool
	}{
		{"512-byte clusters, L1 grows inside its cluster", 512, 1 << 20, 2 << 20, false},
		{"512-byte clusters, L1 moves to 5 clusters", 512, 1 << 20, 9<<20 + 512, true},
		{"4 KiB clusters, L1 moves past its one cluster", 4096, 1 << 30, 1<<30 + 2<<20, true},
		{"4 KiB clusters, size not a cluster multiple", 4096, 1<<20 + 512, 3<<20 + 1024, false},
		{"64 KiB clusters, L1 grows inside its cluster", 65536, 64 << 20, 1 << 30, false},
		{"equal size is a no-op", 512, 1 << 20, 1 << 20, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := createMem(t, CreateOptions{Size: c.size, ClusterSize: c.cs})
			// A small cache makes the grow's allocations evict.
			opts := OpenOptions{CacheSize: 16 * int64(c.cs)}
			img := openMem(t, s, opts)
			ws := []written{
				writePattern(t, img, 0, 3*int64(c.cs)+100, 1),
				writePattern(t, img, c.size/2+512, 5000, 2),
			}
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			// Unflushed when Grow comes: it must flush it first.
			ws = append(ws, writePattern(t, img, c.size-4608, 4608, 3))
			oldL1 := img.hdr.l1TableOffset
			if err := img.Grow(c.newSize); err != nil {
				t.Fatalf("grow: %v", err)
			}
			if moved := img.hdr.l1TableOffset != oldL1; moved != c.l1Moves {
				t.Fatalf("L1 table moved = %v, want %v", moved, c.l1Moves)
			}
			mustHold(t, img, c.newSize, ws)
			mustCheckClean(t, img)
			if c.newSize > c.size {
				// The new space is writable up to its last byte.
				ws = append(ws, writePattern(t, img, c.size, 1024, 4), writePattern(t, img, c.newSize-3072, 3072, 5))
				mustHold(t, img, c.newSize, ws)
			}
			img = reopen(t, img, s, opts)
			defer img.Close()
			mustHold(t, img, c.newSize, ws)
			mustCheckClean(t, img)
		})
	}
}

// smallZoneSize is the zone size of smallZoned images.
const smallZoneSize = 1 << 20

func TestGrowZonedImageAddsEmptyZones(t *testing.T) {
	cases := []struct {
		name       string
		cs         int
		addZones   int64
		journaled  bool
		tableMoves bool
	}{
		// 512-byte clusters hold 64 entries: 72 zones need a second one.
		{"table moves, 512-byte clusters", 512, 64, false, true},
		{"table moves, with a journal", 512, 64, true, true},
		{"table grows in its cluster, 4 KiB clusters", 4096, 4, false, false},
		{"table grows in its cluster, with a journal", 4096, 4, true, false},
		{"one zone more", 65536, 1, false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := createMem(t, smallZoned(c.cs)) // 8 zones of 1 MiB, zone 0 conventional
			opts := OpenOptions{CacheSize: 16 * int64(c.cs)}
			var j *memStorage
			if c.journaled {
				j = newMemStorage(nil)
				opts.Journal, opts.BootID = j, bootA
			}
			img := openMem(t, s, opts)
			before, _ := img.Zones()
			size := img.Size()
			ws := []written{writePattern(t, img, 1000, 7000, 1)} // conventional zone 0
			set := func(zone int, wp int64) {
				t.Helper()
				if err := img.SetWritePointer(zone, wp); err != nil {
					t.Fatalf("set write pointer of zone %d: %v", zone, err)
				}
			}
			ws = append(ws, writePattern(t, img, 2*smallZoneSize, 8192, 2))
			set(2, 2*smallZoneSize+8192)
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			// The last old zone full, and not yet flushed.
			ws = append(ws, writePattern(t, img, 7*smallZoneSize, smallZoneSize, 3))
			set(7, 8*smallZoneSize)
			oldTable := img.zones.metaOffset

			newSize := size + c.addZones*smallZoneSize
			if err := img.Grow(newSize); err != nil {
				t.Fatalf("grow: %v", err)
			}
			if j != nil && len(j.bytes()) != journalHeaderLen {
				t.Fatalf("journal of %d bytes after the grow: want it reset, empty", len(j.bytes()))
			}
			if moved := img.zones.metaOffset != oldTable; moved != c.tableMoves {
				t.Fatalf("write-pointer table moved = %v, want %v", moved, c.tableMoves)
			}
			want := before
			want.NrZones += uint32(c.addZones)
			wantWPs := make([]int64, want.NrZones)
			for i := range wantWPs {
				wantWPs[i] = int64(i) * smallZoneSize
			}
			wantWPs[2], wantWPs[7] = 2*smallZoneSize+8192, 8*smallZoneSize
			verify := func(img *Image) {
				t.Helper()
				if z, ok := img.Zones(); !ok || z != want {
					t.Fatalf("zones %+v, want %+v", z, want)
				}
				if got := mustWritePointers(t, img); fmt.Sprint(got) != fmt.Sprint(wantWPs) {
					t.Fatalf("write pointers %#x, want %#x", got, wantWPs)
				}
				mustHold(t, img, newSize, ws)
			}
			verify(img)
			mustCheckClean(t, img)

			// The first and the last new zone take writes at their start.
			for _, zone := range []int{8, int(want.NrZones) - 1} {
				ws = append(ws, writePattern(t, img, int64(zone)*smallZoneSize, 4096, byte(10+zone)))
				set(zone, int64(zone)*smallZoneSize+4096)
				wantWPs[zone] = int64(zone)*smallZoneSize + 4096
			}
			verify(img)
			if c.journaled {
				// The process dies without a flush: the journal, reset by
				// Grow, must replay the writes made after it.
				s2, j2 := kill(s, j)
				opts.Journal = j2
				img = openMem(t, s2, opts)
				if img.Info().JournalReplayed == 0 {
					t.Fatal("nothing replayed: the test lost its point")
				}
			} else {
				img = reopen(t, img, s, opts)
			}
			defer img.Close()
			verify(img)
			mustCheckClean(t, img)
		})
	}
}

func TestGrowRefusalsNameTheRuleAndChangeNothing(t *testing.T) {
	plain := CreateOptions{Size: 4 << 20, ClusterSize: 512}
	zoned := smallZoned(4096)
	shortZone := smallZoned(4096)
	shortZone.Size = 8<<20 + 512<<10 // the last zone is half a zone
	cases := []struct {
		name     string
		create   CreateOptions
		readOnly bool
		newSize  func(size int64) int64
		is       error
		words    string
	}{
		{"shrink", plain, false, func(s int64) int64 { return s - 512 }, ErrInvalidOption, "shrinking is not supported"},
		{"shrink a zoned image", zoned, false, func(s int64) int64 { return s - 1<<20 }, ErrInvalidOption, "shrinking is not supported"},
		{"not a multiple of 512", plain, false, func(s int64) int64 { return s + 100 }, ErrInvalidOption, "not a multiple of 512"},
		{"part of a zone", zoned, false, func(s int64) int64 { return s + 512<<10 }, ErrInvalidOption, "grows by whole zones"},
		{"last zone short", shortZone, false, func(s int64) int64 { return s + 1<<20 }, ErrInvalidOption, "not a whole number of 1048576-byte zones"},
		{"L1 table too large", plain, false, func(int64) int64 { return 1 << 40 }, ErrInvalidOption, "L1 table would exceed"},
		{"read-only", plain, true, func(s int64) int64 { return 2 * s }, ErrReadOnly, "read-only"},
		{"read-only zoned", zoned, true, func(s int64) int64 { return s + 1<<20 }, ErrReadOnly, "read-only"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := createMem(t, c.create)
			img := openMem(t, s, OpenOptions{ReadOnly: c.readOnly})
			defer img.Close()
			if !c.readOnly {
				// Dirty metadata: a refusal must not even flush it.
				writePattern(t, img, 1<<20, 4096, 1)
			}
			size := img.Size()
			file, writes := s.bytes(), s.writes
			err := img.Grow(c.newSize(size))
			if !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.words) {
				t.Fatalf("err = %v, want %v naming %q", err, c.is, c.words)
			}
			if s.writes != writes || !bytes.Equal(s.bytes(), file) {
				t.Fatal("the refused grow changed the file")
			}
			if img.Size() != size {
				t.Fatalf("size %d after a refused grow, want %d", img.Size(), size)
			}
		})
	}
}

// TestPowerCutDuringGrowLeavesOldOrNewImage cuts power before each file
// call a Grow makes, with several ways for the disk to keep the unsynced
// writes: the image must open, check without corruption (leaks are
// allowed) and be either the old disk or the grown one, with all the data.
func TestPowerCutDuringGrowLeavesOldOrNewImage(t *testing.T) {
	cases := []struct {
		name   string
		create CreateOptions
		add    int64
		// unknownFirst puts an unknown extension of this many bytes before
		// the zoned one, as another tool may order them: the zoned
		// extension then starts past the header's first sector.
		unknownFirst int
	}{
		{"plain, L1 moves", CreateOptions{Size: 1 << 20, ClusterSize: 512}, 9 << 20, 0},
		{"plain, L1 grows in place", CreateOptions{Size: 1 << 20, ClusterSize: 512}, 1 << 20, 0},
		{"zoned, both tables move", smallZoned(512), 64 * smallZoneSize, 0},
		{"zoned, tables grow in place", smallZoned(4096), 3 * smallZoneSize, 0},
		{"zoned, extension past the first sector", smallZoned(4096), 3 * smallZoneSize, 400},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			// Each seed keeps another subset of the unsynced writes' sectors.
			const seeds = 16
			cuts, grown := 0, 0
			for cut := 1; ; cut++ {
				done := true
				for seed := range uint64(seeds) {
					if came, isNew := growWithCut(t, c.create, c.unknownFirst, c.add, cut, seed); came {
						done = false
						grown += boolInt(isNew)
					}
				}
				if done {
					break
				}
				cuts++
			}
			if cuts < 4 || grown == 0 || grown == seeds*cuts {
				t.Fatalf("%d cut points, %d of %d cuts left the grown image: the test needs both outcomes", cuts, grown, seeds*cuts)
			}
		})
	}
}

// growWithCut grows an image with a power cut before its cut-th file call
// and checks what the cut left. It reports whether the cut came, and
// whether it left the grown image.
func growWithCut(t *testing.T, create CreateOptions, unknownFirst int, add int64, cut int, seed uint64) (came, grown bool) {
	t.Helper()
	s := createMem(t, create)
	if unknownFirst > 0 {
		b := s.bytes()
		h, err := parseHeader(b, int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		h.extensions = append([]extension{{typ: 0x7a7a7a7a, data: make([]byte, unknownFirst)}}, h.extensions...)
		hdr, err := h.encode()
		if err != nil {
			t.Fatal(err)
		}
		s = newMemStorage(append(hdr, b[len(hdr):]...))
	}
	img := openMem(t, s, OpenOptions{CacheSize: 16 * int64(create.ClusterSize)})
	defer img.Close()
	size := img.Size()
	var ws []written
	var wps []int64
	if z, ok := img.Zones(); ok {
		ws = append(ws, writePattern(t, img, 3*z.ZoneSize, 12345&^511, 7))
		if err := img.SetWritePointer(3, 3*z.ZoneSize+12345&^511); err != nil {
			t.Fatal(err)
		}
	} else {
		ws = append(ws, writePattern(t, img, 0, 9000, 7), writePattern(t, img, size-700, 700, 9))
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	wps = mustWritePointers(t, img)
	s.mu.Lock()
	s.cutAt, s.calls, s.cutRand = cut, 0, rand.New(rand.NewPCG(uint64(cut), seed))
	s.mu.Unlock()
	if err := img.Grow(size + add); err != nil {
		t.Fatalf("grow: %v", err)
	}
	if !s.hasCut() {
		return false, false
	}
	what := fmt.Sprintf("cut before file call %d, seed %d", cut, seed)
	crashed, err := OpenStorage(newMemStorage(s.cut), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: the image does not open: %v", what, err)
	}
	if res, err := crashed.Check(false); err != nil || len(res.Corruptions) > 0 {
		t.Fatalf("%s: check: %v %q", what, err, res.Corruptions)
	}
	got := crashed.Size()
	if got != size && got != size+add {
		t.Fatalf("%s: size %d, neither the old %d nor the new %d", what, got, size, size+add)
	}
	mustHold(t, crashed, got, ws)
	if z, ok := crashed.Zones(); ok {
		if int64(z.NrZones)*z.ZoneSize != got {
			t.Fatalf("%s: %d zones of %d bytes on a %d-byte disk", what, z.NrZones, z.ZoneSize, got)
		}
		for i, wp := range mustWritePointers(t, crashed) {
			want := int64(i) * z.ZoneSize
			if i < len(wps) {
				want = wps[i]
			}
			if wp != want {
				t.Fatalf("%s: zone %d: write pointer %#x, want %#x", what, i, wp, want)
			}
		}
	}
	// A repair fixes what leaked and leaves the image clean.
	repaired := openMem(t, newMemStorage(s.cut), OpenOptions{})
	defer repaired.Close()
	if res, err := repaired.Check(true); err != nil || !res.Clean() {
		t.Fatalf("%s: repair: %v %+v", what, err, res)
	}
	mustHold(t, repaired, got, ws)
	return true, got != size
}

func TestGrownPlainImagePassesQemuImgCheck(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img is needed for this test (apt-get install qemu-utils)")
	}
	p := filepath.Join(t.TempDir(), "grown.qcow2")
	const size, newSize = 1 << 20, 9<<20 + 512 // 512-byte clusters: the L1 table moves
	if err := Create(p, CreateOptions{Size: size, ClusterSize: 512}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	writePattern(t, img, 4096, 8192, 0x20)
	if err := img.Grow(newSize); err != nil {
		t.Fatal(err)
	}
	writePattern(t, img, newSize-4096, 4096, 0x40)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "check", p).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", p).Output()
	if err != nil {
		t.Fatalf("qemu-img info: %v", err)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil || info.VirtualSize != newSize {
		t.Fatalf("qemu-img info: virtual size %d (%v), want %d", info.VirtualSize, err, newSize)
	}
	// writePattern's pattern is seed + sector index; qemu-io checks one
	// sector of each write, and zeros in between.
	for _, cmd := range []string{"read -P 0x20 4096 512", "read -P 0x28 8192 512",
		fmt.Sprintf("read -P 0x47 %d 512", newSize-512), fmt.Sprintf("read -P 0 %d 4096", size)} {
		out, err := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", cmd, p).CombinedOutput()
		if err != nil || strings.Contains(string(out), "fail") || strings.Contains(string(out), "mismatch") {
			t.Fatalf("qemu-io %q: %v %s", cmd, err, out)
		}
	}
}

// TestGrowWaitsForAndBlocksOtherCalls grows a zoned image while other
// goroutines read, write and ask for its size and zones: under the race
// detector, any state Grow changes without the locks those calls take
// shows up; and each call sees the old disk or the grown one.
func TestGrowWaitsForAndBlocksOtherCalls(t *testing.T) {
	img := openMem(t, createMem(t, smallZoned(512)), OpenOptions{})
	defer img.Close()
	const oldZones, newZones = 8, 72
	stop := make(chan struct{})
	errs := make(chan error, 4)
	var wg sync.WaitGroup
	var calls atomic.Int64
	for g := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				calls.Add(1)
				select {
				case <-stop:
					return
				default:
				}
				var err error
				switch g {
				case 0:
					_, err = img.WriteAt(make([]byte, 512), int64(i%64)*512)
				case 1:
					if n := img.Size(); n != oldZones*smallZoneSize && n != newZones*smallZoneSize {
						err = fmt.Errorf("size %d", n)
					}
				case 2:
					z, _ := img.Zones()
					if n := len(mustWritePointers(t, img)); n < int(z.NrZones) || (n != oldZones && n != newZones) {
						err = fmt.Errorf("%d write pointers, %d zones", n, z.NrZones)
					}
				case 3:
					err = img.SetWritePointer(2, 2*smallZoneSize+int64(i%8)*512)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for calls.Load() < 400 { // every goroutine is running
		runtime.Gosched()
	}
	err := img.Grow(newZones * smallZoneSize)
	close(stop)
	wg.Wait()
	close(errs)
	if err != nil {
		t.Fatalf("grow: %v", err)
	}
	for err := range errs {
		t.Fatal(err)
	}
	if z, _ := img.Zones(); z.NrZones != newZones {
		t.Fatalf("%d zones after the grow, want %d", z.NrZones, newZones)
	}
	mustCheckClean(t, img)
}
