package image

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
)

func createMem(t testing.TB, opts CreateOptions) *memStorage {
	t.Helper()
	s := newMemStorage(nil)
	if err := CreateStorage(s, opts); err != nil {
		t.Fatalf("create %+v: %v", opts, err)
	}
	return s
}

func openMem(t testing.TB, s *memStorage, opts OpenOptions) *Image {
	t.Helper()
	img, err := OpenStorage(s, opts)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return img
}

// reopen closes img and opens its storage again from what is on "disk".
func reopen(t testing.TB, img *Image, s *memStorage, opts OpenOptions) *Image {
	t.Helper()
	if err := img.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	return openMem(t, newMemStorage(s.bytes()), opts)
}

func mustCheckClean(t testing.TB, img *Image) {
	t.Helper()
	res, err := img.Check(false)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if !res.Clean() {
		t.Fatalf("check found problems:\ncorruptions: %q\nleaks: %q", res.Corruptions, res.Leaks)
	}
}

func mustMatch(t testing.TB, img *Image, model []byte) {
	t.Helper()
	got := make([]byte, len(model))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatalf("read: %v", err)
	}
	if i := firstDiff(got, model); i >= 0 {
		t.Fatalf("disk differs from the model at %#x: got %#x, want %#x", i, got[i], model[i])
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// applyRandomOp performs one random operation on img and the same on model,
// and returns it with the range it changed.
func applyRandomOp(t testing.TB, r *rand.Rand, img *Image, model []byte, cs int64) (op string, off, n int64) {
	t.Helper()
	size := int64(len(model))
	off = r.Int64N(size)
	if r.IntN(3) == 0 {
		off -= off % cs // cluster-aligned ops exercise the whole-cluster paths
	}
	n = min(1+r.Int64N(4*cs), size-off)
	switch op := r.IntN(10); {
	case op < 6:
		p := make([]byte, n)
		fill := byte(r.IntN(255) + 1)
		for i := range p {
			p[i] = fill + byte(i/512)
		}
		if _, err := img.WriteAt(p, off); err != nil {
			t.Fatalf("write %d at %#x: %v", n, off, err)
		}
		copy(model[off:], p)
		return fmt.Sprintf("write %#x+%d", off, n), off, n
	case op < 8:
		unmap := r.IntN(2) == 0
		if err := img.WriteZeroes(off, n, unmap); err != nil {
			t.Fatalf("write zeroes %d at %#x: %v", n, off, err)
		}
		clear(model[off : off+n])
		return fmt.Sprintf("zero %#x+%d unmap=%v", off, n, unmap), off, n
	case op < 9:
		if err := img.Discard(off, n); err != nil {
			t.Fatalf("discard %d at %#x: %v", n, off, err)
		}
		// Only whole clusters are dropped.
		first, last := (off+cs-1)/cs*cs, (off+n)/cs*cs
		if first < last {
			clear(model[first:last])
		}
		return fmt.Sprintf("discard %#x+%d", off, n), off, n
	default:
		if err := img.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
		return "flush", 0, 0
	}
}

func TestRandomOperationsMatchModelAcrossReopen(t *testing.T) {
	cases := []struct {
		clusterSize, refcountBits int
		size                      int64
		cache                     int64
		prealloc                  string
	}{
		{512, 16, 8 << 20, 0, ""},      // refcount table must grow
		{512, 1, 4 << 20, 8 << 10, ""}, // 1-bit refcounts, cache of 16 tables
		{4096, 64, 16 << 20, 0, ""},    // 64-bit refcounts
		{65536, 16, 64 << 20, 0, ""},   // the default
		{65536, 8, 32 << 20, 1 << 20, "metadata"},
		{2 << 20, 16, 64 << 20, 0, ""},   // the largest clusters
		{1024, 2, 4 << 20, 16 << 10, ""}, // tiny cache forces writebacks mid-operation
		{1024, 64, 8 << 20, 0, ""},       // an L2 table of clusters spans two refcount blocks
	}
	for _, c := range cases {
		name := fmt.Sprintf("cluster=%d/refbits=%d/cache=%d/prealloc=%s", c.clusterSize, c.refcountBits, c.cache, c.prealloc)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s := createMem(t, CreateOptions{Size: c.size, ClusterSize: c.clusterSize, RefcountBits: c.refcountBits, Preallocation: c.prealloc})
			opts := OpenOptions{CacheSize: c.cache}
			img := openMem(t, s, opts)
			model := make([]byte, c.size)
			r := rand.New(rand.NewPCG(uint64(c.clusterSize), uint64(c.refcountBits)))
			var log []string
			// A reopen every 100 operations, and after the last.
			ops := loops(400)
			for i := range ops {
				op, _, _ := applyRandomOp(t, r, img, model, int64(c.clusterSize))
				log = append(log, op)
				if i%100 == 99 || i == ops-1 {
					mustMatch(t, img, model)
					st := img.file.(*memStorage)
					img = reopen(t, img, st, opts)
					mustCheckClean(t, img)
					mustMatch(t, img, model)
				}
			}
			if t.Failed() {
				t.Logf("operations: %q", log)
			}
			img.Close()
		})
	}
}

func TestDiscardFreesClustersForReuse(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 64 << 20})
	img := openMem(t, s, OpenOptions{})
	data := bytes.Repeat([]byte{7}, 8<<20)
	if _, err := img.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	sizeAfterWrite, _ := s.Size()
	if err := img.Discard(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(data, 32<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if size, _ := s.Size(); size != sizeAfterWrite {
		t.Fatalf("file grew from %d to %d: discarded clusters were not reused", sizeAfterWrite, size)
	}
	img = openMem(t, newMemStorage(s.bytes()), OpenOptions{ReadOnly: true})
	mustCheckClean(t, img)
	ext, err := img.Map(0, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{0, 32 << 20, false, true}, {32 << 20, 8 << 20, true, false}, {40 << 20, 24 << 20, false, true}}
	if fmt.Sprint(ext) != fmt.Sprint(want) {
		t.Fatalf("map = %v, want %v", ext, want)
	}
}

func TestWriteZeroesWritesNoData(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 16 << 20})
	img := openMem(t, s, OpenOptions{})
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, 4<<20), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	before, _ := s.Size()
	for _, unmap := range []bool{false, true} {
		s.mu.Lock()
		s.pending = nil
		s.mu.Unlock()
		if err := img.WriteZeroes(0, 4<<20, unmap); err != nil {
			t.Fatal(err)
		}
		if err := img.Flush(); err != nil {
			t.Fatal(err)
		}
		if size, _ := s.Size(); size != before {
			t.Fatalf("unmap=%v: file grew from %d to %d", unmap, before, size)
		}
		got := make([]byte, 4<<20)
		if _, err := img.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, 4<<20)) {
			t.Fatalf("unmap=%v: zeroed range does not read as zeros", unmap)
		}
	}
	mustCheckClean(t, img)
}

// writeInterleaved has writers goroutines write every writers-th block of
// [0, size), each with its own byte, calling Flush after the blocks flushAt
// picks, and returns what the image must then hold.
func writeInterleaved(t *testing.T, img *Image, size, block, writers int, flushAt func(b, w int) bool) []byte {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			p := bytes.Repeat([]byte{byte(w + 1)}, block)
			for b := w; b < size/block; b += writers {
				if _, err := img.WriteAt(p, int64(b*block)); err != nil {
					errs <- err
					return
				}
				if flushAt(b, w) {
					if err := img.Flush(); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	model := make([]byte, size)
	for b := range size / block {
		for i := range block {
			model[b*block+i] = byte(b%writers + 1)
		}
	}
	return model
}

func TestConcurrentWritersToSharedClusters(t *testing.T) {
	const (
		size    = 32 << 20
		block   = 4096
		writers = 16
	)
	s := createMem(t, CreateOptions{Size: size})
	img := openMem(t, s, OpenOptions{CacheSize: 64 << 10})
	// Writer w owns every writers-th 4 KiB block, so each 64 KiB cluster is
	// allocated by whichever of its writers comes first while the others
	// wait or write in place.
	model := writeInterleaved(t, img, size, block, writers, func(b, w int) bool { return b%(writers*64) == w })
	mustMatch(t, img, model)
	img = reopen(t, img, s, OpenOptions{})
	mustMatch(t, img, model)
	mustCheckClean(t, img)
	info := img.Info()
	if max := int64(size+(4<<20)) / 512; info.ActualSize/512 > max {
		t.Fatalf("file is %d bytes for %d of data: clusters were allocated twice", info.ActualSize, size)
	}
}

// TestCrashLeavesNoCorruption cuts power at random points of a random
// workload: the image must open, check without corruption (leaks are
// allowed) and hold everything written before the last completed flush.
// With a journal, the power cut is a reboot: the journal, kept as a file
// system may keep it, belongs to the old boot and must be ignored, and
// must not have changed what reaches the image file or when.
func TestCrashLeavesNoCorruption(t *testing.T) {
	cuts := loops(500)
	for _, journaled := range []bool{false, true} {
		for _, cs := range []int{512, 65536} {
			t.Run(fmt.Sprintf("cluster=%d/journal=%v", cs, journaled), func(t *testing.T) {
				t.Parallel()
				r := rand.New(rand.NewPCG(uint64(cs), 1))
				for cut := range cuts {
					crashOnce(t, r, cs, cut, journaled)
				}
			})
		}
	}
}

// loops is how many rounds (power cuts, kills, random operations) a long
// randomized test runs: n in the crash tier (make crash-default), which
// runs these tests without the race detector; a sample of n/50 (at least
// 4) under -short or the race detector (make unit, which must stay fast);
// ZQ_CRASH_CUTS if set (make crash).
func loops(n int) int {
	if v, err := strconv.Atoi(os.Getenv("ZQ_CRASH_CUTS")); err == nil && v > 0 {
		return v
	}
	if testing.Short() || raceEnabled {
		return max(n/50, 4)
	}
	return n
}

func crashOnce(t *testing.T, r *rand.Rand, cs int, cut int, journaled bool) {
	size := int64(4 << 20)
	if cs == 512 {
		size = 2 << 20
	}
	s := createMem(t, CreateOptions{Size: size, ClusterSize: cs, RefcountBits: 16})
	opts := OpenOptions{CacheSize: int64(cs) * 16}
	var journal *memStorage
	if journaled {
		journal = newMemStorage(nil)
		opts.Journal, opts.BootID = journal, bootA
	}
	img := openMem(t, s, opts)
	// The power cut comes at a random call to the file, inside whatever
	// write, writeback or flush is running then.
	s.mu.Lock()
	s.cutAt, s.calls, s.cutRand = 1+r.IntN(400), 0, r
	s.mu.Unlock()
	model := make([]byte, size)
	durable := make([]byte, size)
	touched := make([]bool, size/512) // sectors changed since the last flush
	ops := 0
	for ; ops < 60; ops++ {
		op, off, n := applyRandomOp(t, r, img, model, int64(cs))
		for sec := off / 512; sec < (off+n+511)/512; sec++ {
			touched[sec] = true // the op in progress when the cut came counts too
		}
		s.mu.Lock()
		done := s.cut != nil
		s.mu.Unlock()
		if done {
			break
		}
		if op == "flush" {
			copy(durable, model)
			clear(touched)
		}
	}
	image := s.cut
	if image == nil {
		image = s.crash(r)
	}
	crashed := newMemStorage(image)
	img2, err := OpenStorage(crashed, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("cut %d: crashed image does not open: %v", cut, err)
	}
	res, err := img2.Check(false)
	if err != nil {
		t.Fatalf("cut %d: check: %v", cut, err)
	}
	if len(res.Corruptions) > 0 {
		t.Fatalf("cut %d after %d ops: corruptions %q", cut, ops, res.Corruptions)
	}
	got := make([]byte, size)
	if _, err := img2.ReadAt(got, 0); err != nil {
		t.Fatalf("cut %d: read: %v", cut, err)
	}
	for sec := range touched {
		if touched[sec] {
			continue
		}
		a, b := got[sec*512:(sec+1)*512], durable[sec*512:(sec+1)*512]
		if !bytes.Equal(a, b) {
			t.Fatalf("cut %d: sector %d, flushed before the crash, reads back different", cut, sec)
		}
	}
	// A repairing open of the crashed image leaves it clean.
	reopts := OpenOptions{}
	if journaled {
		reopts.Journal, reopts.BootID = newMemStorage(journal.bytes()), bootB
	}
	img3, err := OpenStorage(newMemStorage(crashed.bytes()), reopts)
	if err != nil {
		t.Fatalf("cut %d: read-write open: %v", cut, err)
	}
	if res, err := img3.Check(true); err != nil || !res.Clean() {
		t.Fatalf("cut %d: repair: %v %+v", cut, err, res)
	}
	if img3.Info().JournalReplayed != 0 {
		t.Fatalf("cut %d: the journal of the boot before the power cut was replayed", cut)
	}
	img.Close()
}

func TestWriteErrorLeavesDataAndMetadataIntact(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 8 << 20})
	img := openMem(t, s, OpenOptions{})
	good := bytes.Repeat([]byte{5}, 65536)
	if _, err := img.WriteAt(good, 0); err != nil {
		t.Fatal(err)
	}
	s.failWrite = func(off int64, n int) bool { return n == 65536 }
	if _, err := img.WriteAt(bytes.Repeat([]byte{6}, 65536), 1<<20); err == nil {
		t.Fatal("write succeeded although the file failed it")
	}
	s.failWrite = nil
	got := make([]byte, 65536)
	if _, err := img.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, make([]byte, 65536)) {
		t.Fatalf("failed write is visible: err=%v", err)
	}
	img = reopen(t, img, s, OpenOptions{})
	mustCheckClean(t, img)
	mustMatch(t, img, append(good, make([]byte, 8<<20-65536)...))
}

func TestRequestsPastTheEndAreRefused(t *testing.T) {
	img := openMem(t, createMem(t, CreateOptions{Size: 1 << 20}), OpenOptions{})
	defer img.Close()
	buf := make([]byte, 4096)
	for name, err := range map[string]error{
		"read":    func() error { _, err := img.ReadAt(buf, 1<<20-100); return err }(),
		"write":   func() error { _, err := img.WriteAt(buf, -1); return err }(),
		"zeroes":  img.WriteZeroes(0, 2<<20, true),
		"discard": img.Discard(1<<20, 1),
	} {
		if !errors.Is(err, ErrOutOfRange) {
			t.Errorf("%s: err = %v, want ErrOutOfRange", name, err)
		}
	}
}

func TestReadOnlyImageRefusesWrites(t *testing.T) {
	s := createMem(t, CreateOptions{Size: 1 << 20})
	img := openMem(t, s, OpenOptions{ReadOnly: true})
	writes := s.writes
	if _, err := img.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("err = %v, want ErrReadOnly", err)
	}
	if _, err := img.Check(true); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("check --repair: err = %v, want ErrReadOnly", err)
	}
	img.Close()
	if s.writes != writes {
		t.Fatal("a read-only image wrote to its file")
	}
}

// TestRefblockCreatedUnderCachePressureIsCountedFirst builds the case a
// random crash test once found: an allocation run crosses into a range
// without a refcount block while the cache is full of dirty L2 tables, so
// the new block's creation is interrupted by a writeback. Every state a
// sync makes durable must check without corruption.
func TestRefblockCreatedUnderCachePressureIsCountedFirst(t *testing.T) {
	const cs = 512 // refcount blocks of 256 clusters: range 1 starts at cluster 256
	s := createMem(t, CreateOptions{Size: 1 << 20, ClusterSize: cs})
	var bad []string
	s.afterSync = func(durable []byte) {
		img, err := OpenStorage(newMemStorage(durable), OpenOptions{ReadOnly: true})
		if err != nil {
			bad = append(bad, err.Error())
			return
		}
		if res, err := img.Check(false); err != nil || len(res.Corruptions) > 0 {
			bad = append(bad, fmt.Sprint(err, res.Corruptions))
		}
	}
	img := openMem(t, s, OpenOptions{CacheSize: 16 * cs})
	defer img.Close()
	const region = 64 * cs // guest bytes one L2 table maps
	write := func(off, n int64) {
		if _, err := img.WriteAt(bytes.Repeat([]byte{0xee}, int(n)), off); err != nil {
			t.Fatal(err)
		}
	}
	// Clusters 0-3 are metadata; 15 regions of an L2 table and 14 data
	// clusters each, then 21 more in region 0, bring the next free cluster
	// to 250, six short of the range without a block.
	for r := range int64(15) {
		write(r*region, 14*cs)
	}
	write(14*cs, 21*cs)
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if img.freeHint != 250 || len(img.cache.tables) != 16 {
		t.Fatalf("setup: next free cluster %d, %d tables cached; the test needs 250 and 16", img.freeHint, len(img.cache.tables))
	}
	// Dirty all 15 L2 tables without touching a refcount: the cache is
	// then full, its only clean table the block of range 0.
	for r := range int64(15) {
		if err := img.WriteZeroes(r*region, cs, false); err != nil {
			t.Fatal(err)
		}
	}
	// Ten new clusters: 250-259, across into range 1.
	write(region+30*cs, 10*cs)
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if img.refblockOffset(1) == 0 {
		t.Fatal("range 1 got no refcount block: the test lost its point")
	}
	if len(bad) > 0 {
		t.Fatalf("a sync left the image corrupt: %q", bad)
	}
	mustCheckClean(t, img)
}
