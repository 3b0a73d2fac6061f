package image

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// diskUsage is what du counts for the file at path: its allocated blocks.
func diskUsage(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks * 512
}

func TestFreedClustersGiveTheirSpaceBackToTheFilesystem(t *testing.T) {
	const mib = 1 << 20
	p := filepath.Join(t.TempDir(), "img.qcow2")
	if err := Create(p, CreateOptions{Size: 32 * mib}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	flush := func() int64 {
		t.Helper()
		if err := img.Flush(); err != nil {
			t.Fatal(err)
		}
		return diskUsage(t, p)
	}
	writePattern(t, img, 0, 16*mib, 0x10)
	full := flush()
	// Each step frees (or keeps) whole clusters; the file must shrink by
	// at least what they held, less the metadata a flush may add.
	const slack = 256 << 10
	steps := []struct {
		name  string
		do    func() error
		freed int64
	}{
		{"discard", func() error { return img.Discard(2*mib, 4*mib) }, 4 * mib},
		{"write zeroes with unmap", func() error { return img.WriteZeroes(8*mib, 3*mib, true) }, 3 * mib},
		{"write zeroes without unmap keeps the clusters", func() error { return img.WriteZeroes(12*mib, 2*mib, false) }, 0},
	}
	before := full
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		after := flush()
		if s.freed > 0 && before-after < s.freed-slack {
			t.Errorf("%s of %d bytes: du went from %d to %d", s.name, s.freed, before, after)
		}
		if s.freed == 0 && after < before-slack {
			t.Errorf("%s: du went from %d to %d", s.name, before, after)
		}
		before = after
	}
	// The freed clusters are taken again, and read what is written there.
	w := writePattern(t, img, 2*mib, 4*mib, 0x30)
	if after := flush(); after < before+4*mib-slack {
		t.Errorf("a rewrite of 4 MiB: du went from %d to %d", before, after)
	}
	got := make([]byte, 4*mib)
	if _, err := img.ReadAt(got, 2*mib); err != nil || !bytes.Equal(got, w.data) {
		t.Fatalf("the rewritten clusters read otherwise: %v", err)
	}
	if res, err := img.Check(false); err != nil || !res.Clean() {
		t.Fatalf("check: %v %+v", err, res)
	}
}

// TestPowerCutAroundZoneResetsKeepsEveryByteBelowTheWritePointer: zones
// written, reset (their clusters freed and punched out of the file) and
// written again, with a power cut before each file call and several ways
// for the disk to keep the unsynced writes and hole punches. Whatever
// write pointer a zone comes back with, the bytes below it are the ones
// written there: a hole never lands under a cluster the image still uses.
func TestPowerCutAroundZoneResetsKeepsEveryByteBelowTheWritePointer(t *testing.T) {
	const seeds = 8
	cuts := 0
	for cut := 1; ; cut++ {
		came := false
		for seed := range uint64(seeds) {
			came = resetsWithCut(t, cut, seed) || came
		}
		if !came {
			break
		}
		cuts++
	}
	if cuts < 10 {
		t.Fatalf("only %d cut points: the workload makes too few file calls to test anything", cuts)
	}
}

// resetsWithCut runs the workload with a power cut before its cut-th file
// call and checks what the cut left; it reports whether the cut came.
func resetsWithCut(t *testing.T, cut int, seed uint64) bool {
	t.Helper()
	const zs = smallZoneSize
	s := createMem(t, smallZoned(4096))
	img := openMem(t, s, OpenOptions{CacheSize: 64 << 10})
	// contents[zone][wp] is what the zone holds below wp when the write
	// pointer stands there.
	contents := map[int]map[int64][]byte{}
	write := func(zone int, n int64, seed byte) {
		t.Helper()
		start := int64(zone) * zs
		w := writePattern(t, img, start, n, seed)
		if err := img.SetWritePointer(zone, start+n); err != nil {
			t.Fatal(err)
		}
		if contents[zone] == nil {
			contents[zone] = map[int64][]byte{}
		}
		contents[zone][start+n] = w.data
	}
	// A reset as package zoned makes one: the write pointer durable at the
	// zone's start first, then the zone's clusters freed.
	reset := func(zone int) {
		t.Helper()
		start := int64(zone) * zs
		if err := img.SetWritePointer(zone, start); err != nil {
			t.Fatal(err)
		}
		if err := img.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := img.WriteZeroes(start, zs, true); err != nil {
			t.Fatal(err)
		}
	}
	flush := func() {
		t.Helper()
		if err := img.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	write(1, zs, 0x10)
	write(2, zs/2, 0x20)
	flush()
	s.mu.Lock()
	s.cutAt, s.calls, s.cutRand, s.punches = cut, 0, rand.New(rand.NewPCG(uint64(cut), seed)), 0
	s.mu.Unlock()
	reset(1)
	write(3, zs/2, 0x30)
	flush()
	write(1, 3*zs/4, 0x40) // into the clusters the reset freed
	reset(2)
	flush()
	write(2, zs/4, 0x50)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if s.punches == 0 {
		t.Fatal("the workload punched no hole: it tests nothing")
	}
	if !s.hasCut() {
		return false
	}
	what := fmt.Sprintf("cut before file call %d, seed %d", cut, seed)
	for _, repair := range []bool{false, true} {
		crashed, err := OpenStorage(newMemStorage(s.cut), OpenOptions{ReadOnly: !repair})
		if err != nil {
			t.Fatalf("%s: the image does not open: %v", what, err)
		}
		res, err := crashed.Check(repair)
		if err != nil || len(res.Corruptions) > 0 || repair && !res.Clean() {
			t.Fatalf("%s: check (repair %v): %v %+v", what, repair, err, res)
		}
		for zone, wp := range mustWritePointers(t, crashed) {
			start := int64(zone) * zs
			if zone == 0 || wp == start {
				continue
			}
			want, ok := contents[zone][wp]
			if !ok {
				t.Fatalf("%s: zone %d came back with a write pointer %#x nobody set", what, zone, wp)
			}
			got := make([]byte, wp-start)
			if _, err := crashed.ReadAt(got, start); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				i := 0
				for got[i] == want[i] {
					i++
				}
				t.Fatalf("%s: zone %d, write pointer %#x: the byte at %#x reads %#x, not the %#x written there", what, zone, wp, start+int64(i), got[i], want[i])
			}
		}
		crashed.Close()
	}
	return true
}
