package image

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// overlayWrites changes the chain fixture's overlay: data over the base's
// data and over holes, a partial cluster, zeros over the base's data, and
// a discard; c.want follows.
func overlayWrites(t *testing.T, c *chainFixture) {
	t.Helper()
	img, err := Open(c.top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		off int64
		s   string
	}{{10, "over the base's first cluster"}, {300 << 10, "in a hole"}, {(1 << 20) + 4000, "across clusters of the base's run"}} {
		if _, err := img.WriteAt([]byte(w.s), w.off); err != nil {
			t.Fatal(err)
		}
		copy(c.want[w.off:], w.s)
	}
	if err := img.WriteZeroes(2<<20, 256<<10, true); err != nil {
		t.Fatal(err)
	}
	clear(c.want[2<<20 : (2<<20)+(256<<10)])
	if err := img.Discard(chainSize-64<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	clear(c.want[chainSize-64<<10:])
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return readAll(t, img)
}

// heldBytes counts the bytes the image at path holds itself.
func heldBytes(t *testing.T, path string) int64 {
	t.Helper()
	img, err := Open(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	runs, err := img.layers()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, r := range runs {
		if r.Data || r.Zero {
			n += r.Length
		}
	}
	return n
}

func TestMergeWritesTheOverlayIntoItsBackingFile(t *testing.T) {
	for _, keep := range []bool{false, true} {
		t.Run(map[bool]string{false: "emptied", true: "kept"}[keep], func(t *testing.T) {
			c := newChain(t, CreateOptions{})
			overlayWrites(t, c)
			held := heldBytes(t, c.top)
			var last, total int64
			opts := MergeOptions{KeepOverlay: keep, ChainOptions: ChainOptions{Progress: func(done, all int64) { last, total = done, all }}}
			if err := Merge(c.top, opts); err != nil {
				t.Fatal(err)
			}
			if last != total || total != held {
				t.Errorf("progress ended at %d of %d; the overlay held %d bytes", last, total, held)
			}
			// The base alone reads what the overlay read; so does the
			// overlay, holding nothing more unless kept.
			if !bytes.Equal(readFile(t, c.base), c.want) {
				t.Error("the backing file does not read what the overlay did")
			}
			if !bytes.Equal(readFile(t, c.top), c.want) {
				t.Error("the overlay reads otherwise after the merge")
			}
			if got, want := heldBytes(t, c.top), map[bool]int64{false: 0, true: held}[keep]; got != want {
				t.Errorf("the overlay holds %d bytes after the merge, want %d", got, want)
			}
			checkClean(t, c.base)
			checkClean(t, c.top)
		})
	}
}

func TestMergeGrowsTheBackingFileToTheOverlaysSize(t *testing.T) {
	c := newChain(t, CreateOptions{})
	if err := os.Remove(c.top); err != nil {
		t.Fatal(err)
	}
	if err := Create(c.top, CreateOptions{BackingFile: "base.qcow2", Size: chainSize + 4<<20}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(c.top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("past the base's end"), chainSize+1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Merge(c.top, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	got := readFile(t, c.base)
	if int64(len(got)) != chainSize+4<<20 || !bytes.Equal(got[:chainSize], c.want) || string(got[chainSize+1<<20:][:19]) != "past the base's end" {
		t.Fatalf("the backing file reads %d bytes, not the overlay's disk", len(got))
	}
	checkClean(t, c.base)
}

// zonedChain is a zoned base with zones 2 and 3 written, and an overlay
// with other zone limits that resets zone 2 and writes zone 4.
func zonedChain(t *testing.T) (dir string, want []byte, wps []int64) {
	t.Helper()
	dir = t.TempDir()
	const zs = 1 << 20
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	if err := Create(base, CreateOptions{Size: 8 * zs, Zones: &Zones{ZoneSize: zs, ZoneCapacity: zs, ConventionalZones: 1, MaxOpenZones: 4, MaxActiveZones: 4}}); err != nil {
		t.Fatal(err)
	}
	want = make([]byte, 8*zs)
	write := func(img *Image, zone int, n int64, b byte) {
		p := bytes.Repeat([]byte{b}, int(n))
		if _, err := img.WriteAt(p, int64(zone)*zs); err != nil {
			t.Fatal(err)
		}
		if err := img.SetWritePointer(zone, int64(zone)*zs+n); err != nil {
			t.Fatal(err)
		}
		copy(want[int64(zone)*zs:], p)
	}
	img, err := Open(base, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	write(img, 2, 192<<10, 'b')
	write(img, 3, zs, 'B')
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Create(top, CreateOptions{BackingFile: "base.qcow2", Zones: &Zones{ZoneSize: zs, ZoneCapacity: zs, ConventionalZones: 1, MaxOpenZones: 2, MaxActiveZones: 3}}); err != nil {
		t.Fatal(err)
	}
	if img, err = Open(top, OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(2*zs, zs, true); err != nil {
		t.Fatal(err)
	}
	if err := img.SetWritePointer(2, 2*zs); err != nil {
		t.Fatal(err)
	}
	clear(want[2*zs : 3*zs])
	write(img, 4, 80<<10, 't')
	if wps, err = img.WritePointers(); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return dir, want, wps
}

func TestMergeOfAZonedOverlayCarriesItsWritePointersAndKeepsItsLimits(t *testing.T) {
	dir, want, wps := zonedChain(t)
	top, base := filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "base.qcow2")
	if err := Merge(top, MergeOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{base, top} {
		img, err := Open(path, OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		got, gotWPs := readAll(t, img), mustWritePointers(t, img)
		z, _ := img.Zones()
		img.Close()
		if !bytes.Equal(got, want) {
			t.Errorf("%s does not read the overlay's disk", path)
		}
		for i := range wps {
			if gotWPs[i] != wps[i] {
				t.Errorf("%s: zone %d write pointer %#x, want the overlay's %#x", path, i, gotWPs[i], wps[i])
			}
		}
		if wantOpen := map[string]uint32{base: 4, top: 2}[path]; z.MaxOpenZones != wantOpen {
			t.Errorf("%s: max open zones %d, want its own %d", path, z.MaxOpenZones, wantOpen)
		}
		checkClean(t, path)
	}
}

// TestMergeInterruptedAtEachStepLeavesTheOverlayReadingAsBefore: stopped
// after a run is written or once the backing file is durable, the overlay
// still reads its disk, and a second Merge finishes the work.
func TestMergeInterruptedAtEachStepLeavesTheOverlayReadingAsBefore(t *testing.T) {
	for _, stopAt := range []string{"merged a run", "merged"} {
		t.Run(stopAt, func(t *testing.T) {
			c := newChain(t, CreateOptions{})
			overlayWrites(t, c)
			errStop := errors.New("stop")
			testHookStep = func(s string) error {
				if s == stopAt {
					return errStop
				}
				return nil
			}
			err := Merge(c.top, MergeOptions{})
			testHookStep = nil
			if !errors.Is(err, errStop) {
				t.Fatalf("err = %v", err)
			}
			if !bytes.Equal(readFile(t, c.top), c.want) {
				t.Fatal("the interrupted merge changed what the overlay reads")
			}
			if err := os.WriteFile(c.top+".empty", []byte("an earlier attempt's"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := Merge(c.top, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readFile(t, c.base), c.want) || !bytes.Equal(readFile(t, c.top), c.want) || heldBytes(t, c.top) != 0 {
				t.Fatal("the second merge did not finish the work")
			}
			if _, err := os.Stat(c.top + ".empty"); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the earlier attempt's file stays: %v", err)
			}
		})
	}
}

func TestMergeRefusals(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain.qcow2")
	if err := Create(plain, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := Merge(plain, MergeOptions{}); !errors.Is(err, ErrInvalidOption) {
		t.Errorf("merge of an image with no backing file: %v", err)
	}
	c := newChain(t, CreateOptions{})
	reader, err := Open(filepath.Join(c.dir, "base.qcow2"), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if err := Merge(c.top, MergeOptions{}); err == nil || !bytes.Contains([]byte(err.Error()), []byte("in use")) {
		t.Errorf("merge into a backing file another user has open: %v", err)
	}
}

// threeChain is base <- mid <- top, each holding data of its own.
func threeChain(t *testing.T) (c *chainFixture, mid string) {
	t.Helper()
	c = newChain(t, CreateOptions{})
	mid = filepath.Join(c.dir, "mid.qcow2")
	if err := os.Rename(c.top, mid); err != nil {
		t.Fatal(err)
	}
	img, err := Open(mid, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("the middle's own"), 1<<20+100); err != nil {
		t.Fatal(err)
	}
	copy(c.want[1<<20+100:], "the middle's own")
	if err := img.WriteZeroes(0, 64<<10, true); err != nil {
		t.Fatal(err)
	}
	clear(c.want[:64<<10])
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Create(c.top, CreateOptions{BackingFile: "mid.qcow2"}); err != nil {
		t.Fatal(err)
	}
	overlayWrites(t, c)
	return c, mid
}

func TestRebaseKeepsWhatTheOverlayReads(t *testing.T) {
	for _, onto := range []string{"base.qcow2", ""} {
		t.Run("onto "+map[bool]string{true: "nothing", false: onto}[onto == ""], func(t *testing.T) {
			c, _ := threeChain(t)
			var last, total int64
			opts := RebaseOptions{ChainOptions: ChainOptions{Progress: func(done, all int64) { last, total = done, all }}}
			if err := Rebase(c.top, onto, opts); err != nil {
				t.Fatal(err)
			}
			if last != total {
				t.Errorf("progress ended at %d of %d", last, total)
			}
			if b, err := BackingFile(c.top); err != nil || b != onto {
				t.Fatalf("backing file %q, %v; want %q", b, err, onto)
			}
			if !bytes.Equal(readFile(t, c.top), c.want) {
				t.Fatal("the rebased overlay reads otherwise")
			}
			checkClean(t, c.top)
		})
	}
}

func TestUnsafeRebaseOnlyRenamesTheBackingFile(t *testing.T) {
	c := newChain(t, CreateOptions{})
	overlayWrites(t, c)
	held := heldBytes(t, c.top)
	moved := filepath.Join(c.dir, "a-longer-name-for-the-base-that-moves-it-past-the-first-sector-of-the-header-"+string(bytes.Repeat([]byte{'x'}, 160))+".qcow2")
	if err := os.Rename(c.base, moved); err != nil {
		t.Fatal(err)
	}
	if err := Rebase(c.top, filepath.Base(moved), RebaseOptions{Unsafe: true}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readFile(t, c.top), c.want) || heldBytes(t, c.top) != held {
		t.Fatal("the unsafe rebase changed the overlay's data")
	}
	// A later header rewrite (a read-write open and close) keeps the name.
	img, err := Open(c.top, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Grow(chainSize + 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if b, err := BackingFile(c.top); err != nil || b != filepath.Base(moved) {
		t.Fatalf("after a header rewrite the backing file is %q, %v", b, err)
	}
	checkClean(t, c.top)
}

// TestRebaseCrashAtEachStepReadsTheSame: a crash once the data is copied,
// or once the new name is durable but not the sector that points at it,
// leaves the overlay over its old chain, reading the same; a second
// Rebase finishes.
func TestRebaseCrashAtEachStepReadsTheSame(t *testing.T) {
	for _, crashAt := range []string{"copied", "backing name"} {
		t.Run(crashAt, func(t *testing.T) {
			c, _ := threeChain(t)
			errCrash := errors.New("crash")
			testHookStep = func(s string) error {
				if s == crashAt {
					return errCrash
				}
				return nil
			}
			err := Rebase(c.top, "base.qcow2", RebaseOptions{})
			testHookStep = nil
			if !errors.Is(err, errCrash) {
				t.Fatalf("err = %v", err)
			}
			if b, err := BackingFile(c.top); err != nil || b != "mid.qcow2" {
				t.Fatalf("backing file %q, %v; want the old one", b, err)
			}
			if !bytes.Equal(readFile(t, c.top), c.want) {
				t.Fatal("the overlay reads otherwise")
			}
			if err := Rebase(c.top, "base.qcow2", RebaseOptions{}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readFile(t, c.top), c.want) {
				t.Fatal("the rebased overlay reads otherwise")
			}
		})
	}
}

func TestRebaseRefusals(t *testing.T) {
	c, mid := threeChain(t)
	dir, _, _ := zonedChain(t)
	other := filepath.Join(dir, "other-zones.qcow2")
	if err := Create(other, CreateOptions{Size: 8 << 20, Zones: &Zones{ZoneSize: 2 << 20, ZoneCapacity: 2 << 20}}); err != nil {
		t.Fatal(err)
	}
	zonedTop := filepath.Join(dir, "top.qcow2")
	for _, tc := range []struct {
		name, path, onto string
		unsafe           bool
	}{
		{"no backing file", c.base, "top.qcow2", false},
		{"onto itself", c.top, "top.qcow2", false},
		{"onto an image over it", mid, "top.qcow2", true},
		{"a plain image onto a zoned one", c.top, zonedTop, true},
		{"a zoned image onto a plain one", zonedTop, c.base, true},
		{"other zones", zonedTop, "other-zones.qcow2", true},
		{"missing", c.top, "missing.qcow2", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, err := os.ReadFile(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			if err := Rebase(tc.path, tc.onto, RebaseOptions{Unsafe: tc.unsafe}); err == nil {
				t.Fatal("rebase succeeded")
			} else {
				t.Log(err)
			}
			if after, _ := os.ReadFile(tc.path); !bytes.Equal(before, after) {
				t.Fatal("a refused rebase changed the image")
			}
		})
	}
}
