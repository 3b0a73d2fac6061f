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

// Two boots, as /proc/sys/kernel/random/boot_id would tell them apart.
const (
	bootA = "0a0a0a0a-0000-4000-8000-00000000000a"
	bootB = "0b0b0b0b-0000-4000-8000-00000000000b"
)

// kill abandons an image as a killed process would: no flush, no close.
// Every write it made stays in the page cache, which the storages' current
// bytes model; the next process opens those.
func kill(s, j *memStorage) (*memStorage, *memStorage) {
	return newMemStorage(s.bytes()), newMemStorage(j.bytes())
}

func smallZoned(cs int) CreateOptions {
	return CreateOptions{Size: 8 << 20, ClusterSize: cs, Zones: &Zones{
		ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, ConventionalZones: 1, MaxOpenZones: 4, MaxActiveZones: 6, MaxAppendBytes: 64 << 10}}
}

// setRandomWritePointer moves a random sequential zone's write pointer, on
// img and in wps.
func setRandomWritePointer(t testing.TB, r *rand.Rand, img *Image, wps []int64) string {
	t.Helper()
	z, _ := img.Zones()
	zone := int(z.ConventionalZones) + r.IntN(int(z.NrZones-z.ConventionalZones))
	wp := int64(zone)*z.ZoneSize + r.Int64N(z.ZoneSize/512+1)*512
	if err := img.SetWritePointer(zone, wp); err != nil {
		t.Fatalf("set write pointer of zone %d to %#x: %v", zone, wp, err)
	}
	wps[zone] = wp
	return fmt.Sprintf("wp %d=%#x", zone, wp)
}

// TestJournalKeepsAcknowledgedWritesAcrossProcessDeath runs random
// workloads and kills the process at points chosen by each case: every
// acknowledged write must read back after the reopen, every write pointer
// be as last set, and the image check clean.
func TestJournalKeepsAcknowledgedWritesAcrossProcessDeath(t *testing.T) {
	plain := func(cs, refbits int, size int64) CreateOptions {
		return CreateOptions{Size: size, ClusterSize: cs, RefcountBits: refbits}
	}
	cases := []struct {
		name   string
		create CreateOptions
		cache  int64
		// kill decides, after each operation, whether to kill now.
		kill func(r *rand.Rand, op string, evicted bool, sinceFlush int) bool
	}{
		{"random/cluster=512/refbits=16", plain(512, 16, 2<<20), 0,
			func(r *rand.Rand, _ string, _ bool, _ int) bool { return r.IntN(12) == 0 }},
		{"random/cluster=64k/refbits=1", plain(65536, 1, 16<<20), 0,
			func(r *rand.Rand, _ string, _ bool, _ int) bool { return r.IntN(12) == 0 }},
		{"random/zoned", smallZoned(4096), 0,
			func(r *rand.Rand, _ string, _ bool, _ int) bool { return r.IntN(12) == 0 }},
		// A cache of 16 tables forces writebacks inside operations; the
		// kill comes right after one.
		{"after-eviction/cluster=512/refbits=2", plain(512, 2, 4<<20), 16 * 512,
			func(_ *rand.Rand, _ string, evicted bool, _ int) bool { return evicted }},
		{"after-eviction/zoned/cluster=512", smallZoned(512), 16 * 512,
			func(_ *rand.Rand, _ string, evicted bool, _ int) bool { return evicted }},
		// Right after a flush (the journal was just reset) and two
		// operations into the next generation.
		{"across-flush/cluster=1024/refbits=64", plain(1024, 64, 4<<20), 0,
			func(_ *rand.Rand, op string, _ bool, sinceFlush int) bool { return op == "flush" || sinceFlush == 2 }},
		{"across-flush/zoned", smallZoned(4096), 32 * 4096,
			func(_ *rand.Rand, op string, _ bool, sinceFlush int) bool { return op == "flush" || sinceFlush == 2 }},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			s, j := createMem(t, c.create), newMemStorage(nil)
			opts := OpenOptions{CacheSize: c.cache, Journal: j, BootID: bootA}
			img := openMem(t, s, opts)
			model := make([]byte, c.create.Size)
			wps := mustWritePointers(t, img)
			r := rand.New(rand.NewPCG(uint64(i), 7))
			cs := int64(c.create.ClusterSize)
			var log []string
			kills, replayed, sinceFlush := 0, 0, 0
			// The kills that come after evictions need the whole run to
			// happen; the others are a sample in the unit tier, long enough
			// for several kills.
			ops := max(loops(600), 120)
			if strings.HasPrefix(c.name, "after-eviction/") {
				ops = 600
			}
			for range ops {
				s.mu.Lock()
				syncs := s.syncs
				s.mu.Unlock()
				var op string
				if wps != nil && r.IntN(4) == 0 {
					op = setRandomWritePointer(t, r, img, wps)
				} else {
					op, _, _ = applyRandomOp(t, r, img, model, cs)
				}
				log = append(log, op)
				sinceFlush++
				if op == "flush" {
					sinceFlush = 0
				}
				s.mu.Lock()
				evicted := s.syncs > syncs && op != "flush"
				s.mu.Unlock()
				if !c.kill(r, op, evicted, sinceFlush) {
					continue
				}
				kills++
				log = append(log, "kill")
				s, j = kill(s, j)
				opts.Journal = j
				img = openMem(t, s, opts)
				replayed += img.Info().JournalReplayed
				mustMatch(t, img, model)
				if got := mustWritePointers(t, img); fmt.Sprint(got) != fmt.Sprint(wps) {
					t.Fatalf("after kill %d: write pointers %v, want %v\nops: %q", kills, got, wps, log)
				}
				mustCheckClean(t, img)
				if t.Failed() {
					t.Logf("operations: %q", log)
				}
			}
			if kills < 3 || replayed == 0 {
				t.Fatalf("%d kills replaying %d batches: the test lost its point", kills, replayed)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestProcessDeathWithoutJournalLosesWrites shows what the journal is for:
// without it, a write acknowledged before the process died is gone.
func TestProcessDeathWithoutJournalLosesWrites(t *testing.T) {
	for _, c := range []struct {
		name     string
		journal  bool
		wantLost bool
	}{{"no journal", false, true}, {"journal", true, false}} {
		t.Run(c.name, func(t *testing.T) {
			s, j := createMem(t, CreateOptions{Size: 4 << 20}), newMemStorage(nil)
			opts := OpenOptions{BootID: bootA}
			if c.journal {
				opts.Journal = j
			}
			img := openMem(t, s, opts)
			data := bytes.Repeat([]byte{0x5a}, 8192)
			if _, err := img.WriteAt(data, 1<<20); err != nil {
				t.Fatal(err)
			}
			s, j = kill(s, j)
			if c.journal {
				opts.Journal = j
			}
			img = openMem(t, s, opts)
			defer img.Close()
			got := make([]byte, len(data))
			if _, err := img.ReadAt(got, 1<<20); err != nil {
				t.Fatal(err)
			}
			if lost := !bytes.Equal(got, data); lost != c.wantLost {
				t.Fatalf("write lost = %v, want %v", lost, c.wantLost)
			}
			mustCheckClean(t, img)
		})
	}
}

// TestJournalOfAnotherBootIsDiscarded reboots: the page cache is gone, so
// the image is what its last flush made durable, and the journal (kept, as
// on a file system that wrote it back) must not be replayed over it.
func TestJournalOfAnotherBootIsDiscarded(t *testing.T) {
	for _, c := range []struct {
		name     string
		boot     string
		replayed bool
	}{{"same boot replays", bootA, true}, {"other boot discards", bootB, false}} {
		t.Run(c.name, func(t *testing.T) {
			s, j := createMem(t, CreateOptions{Size: 4 << 20, ClusterSize: 4096}), newMemStorage(nil)
			img := openMem(t, s, OpenOptions{Journal: j, BootID: bootA})
			model := make([]byte, 4<<20)
			r := rand.New(rand.NewPCG(3, 4))
			for range 20 {
				applyRandomOp(t, r, img, model, 4096)
			}
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			flushed := append([]byte(nil), model...)
			for range 20 {
				p := bytes.Repeat([]byte{byte(r.IntN(255) + 1)}, 4096)
				off := r.Int64N(4<<20 - 4096)
				if _, err := img.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], p)
			}
			file := s.bytes() // the page cache: what a process death leaves
			want := model
			if !c.replayed {
				// A power cut with nothing written back since the flush.
				s.mu.Lock()
				file = append([]byte(nil), s.durable...)
				s.mu.Unlock()
				want = flushed
			}
			img = openMem(t, newMemStorage(file), OpenOptions{Journal: newMemStorage(j.bytes()), BootID: c.boot})
			defer img.Close()
			if got := img.Info().JournalReplayed > 0; got != c.replayed {
				t.Fatalf("replayed = %v, want %v", got, c.replayed)
			}
			mustMatch(t, img, want)
			mustCheckClean(t, img)
		})
	}
}

// TestTornJournalTailIsIgnored damages the last batch, as a process killed
// in the middle of appending it might not (a pwrite is atomic to a kill)
// but a bad disk or a bug might: it is ignored, the batches before it
// replayed. Damage to the first batch ends the journal there.
func TestTornJournalTailIsIgnored(t *testing.T) {
	const cs = 4096
	first, second := bytes.Repeat([]byte{1}, cs), bytes.Repeat([]byte{2}, cs)
	cases := []struct {
		name        string
		damage      func(j []byte, batch1End int) []byte
		replayed    int
		first, last bool // which write survives
	}{
		{"intact", func(j []byte, _ int) []byte { return j }, 2, true, true},
		{"truncated mid-batch", func(j []byte, _ int) []byte { return j[:len(j)-5] }, 1, true, false},
		{"truncated in the batch header", func(j []byte, end int) []byte { return j[:end+7] }, 1, true, false},
		{"flipped crc", func(j []byte, end int) []byte { j[end+12] ^= 1; return j }, 1, true, false},
		{"flipped record", func(j []byte, _ int) []byte { j[len(j)-1] ^= 0x80; return j }, 1, true, false},
		{"wrong generation", func(j []byte, end int) []byte { j[end+7]++; return j }, 1, true, false},
		{"first batch damaged", func(j []byte, _ int) []byte { j[journalHeaderLen+20] ^= 1; return j }, 0, false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, j := createMem(t, CreateOptions{Size: 4 << 20, ClusterSize: cs}), newMemStorage(nil)
			img := openMem(t, s, OpenOptions{Journal: j, BootID: bootA})
			if _, err := img.WriteAt(first, 0); err != nil {
				t.Fatal(err)
			}
			batch1End, _ := j.Size()
			if _, err := img.WriteAt(second, 2<<20); err != nil {
				t.Fatal(err)
			}
			s, j = kill(s, j)
			damaged := c.damage(j.bytes(), int(batch1End))
			img = openMem(t, s, OpenOptions{Journal: newMemStorage(damaged), BootID: bootA})
			defer img.Close()
			if got := img.Info().JournalReplayed; got != c.replayed {
				t.Fatalf("replayed %d batches, want %d", got, c.replayed)
			}
			for _, w := range []struct {
				off  int64
				data []byte
				want bool
			}{{0, first, c.first}, {2 << 20, second, c.last}} {
				got := make([]byte, cs)
				if _, err := img.ReadAt(got, w.off); err != nil {
					t.Fatal(err)
				}
				want := make([]byte, cs)
				if w.want {
					want = w.data
				}
				if !bytes.Equal(got, want) {
					t.Errorf("at %#x: got %x..., want %x...", w.off, got[:4], want[:4])
				}
			}
			mustCheckClean(t, img)
		})
	}
}

// TestUnreadableJournalHeader: a header that was never written is no
// journal; one that is garbage refuses the open, naming the journal.
func TestUnreadableJournalHeader(t *testing.T) {
	valid := (&journalHeader{gen: 1}).encode()
	cases := []struct {
		name    string
		journal []byte
		wantErr bool
	}{
		{"empty", nil, false},
		{"zeros", make([]byte, 4096), false},
		{"short zeros", make([]byte, 10), false},
		{"bad magic", append([]byte("notajrnl"), valid[8:]...), true},
		{"bad version", func() []byte { b := bytes.Clone(valid); b[11] = 9; return b }(), true},
		{"bad checksum", func() []byte { b := bytes.Clone(valid); b[60] ^= 1; return b }(), true},
		{"short", valid[:40], true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := createMem(t, CreateOptions{Size: 1 << 20})
			before := s.bytes()
			img, err := OpenStorage(s, OpenOptions{Journal: newMemStorage(c.journal), BootID: bootA})
			if !c.wantErr {
				if err != nil {
					t.Fatal(err)
				}
				img.Close()
				return
			}
			if !errors.Is(err, ErrJournal) || !strings.Contains(err.Error(), "journal") {
				t.Fatalf("err = %v, want ErrJournal naming the journal", err)
			}
			if !bytes.Equal(s.bytes(), before) {
				t.Fatal("a refused open changed the image")
			}
		})
	}
}

// TestOverwriteAppendsNoBatch: writes to allocated clusters change no
// metadata, so they cost no journal write; allocating ones cost exactly one.
func TestOverwriteAppendsNoBatch(t *testing.T) {
	const cs = 65536
	cases := []struct {
		name       string
		off, n     int64
		wantAppend int
	}{
		{"whole cluster", 0, cs, 0},
		{"partial cluster", 100, 1000, 0},
		{"several clusters", cs / 2, 3 * cs, 0},
		{"into new clusters", 4 * cs, 2 * cs, 1},
		{"new L2 table", 600 << 20, 2 * cs, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, j := createMem(t, CreateOptions{Size: 1 << 30, ClusterSize: cs}), newMemStorage(nil)
			img := openMem(t, s, OpenOptions{Journal: j, BootID: bootA})
			defer img.Close()
			if _, err := img.WriteAt(make([]byte, 4*cs), 0); err != nil {
				t.Fatal(err)
			}
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			jw, sw := j.writes, s.writes
			if _, err := img.WriteAt(bytes.Repeat([]byte{9}, int(c.n)), c.off); err != nil {
				t.Fatal(err)
			}
			if got := j.writes - jw; got != c.wantAppend {
				t.Errorf("%d journal writes, want %d", got, c.wantAppend)
			}
			if c.wantAppend == 0 && s.writes-sw != 1 {
				t.Errorf("%d image writes, want the data write alone", s.writes-sw)
			}
		})
	}
}

// TestJournalFileBesideImage runs the file journal: named after the image's
// device and inode in a directory created 0700, replayed by the next
// process, removed by Close.
func TestJournalFileBesideImage(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.qcow2")
	jdir := filepath.Join(dir, "journals")
	if err := Create(path, CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	opts := OpenOptions{JournalDir: jdir, BootID: bootA}
	img, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x77}, 100000)
	if _, err := img.WriteAt(data, 12345); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(jdir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("journal directory: %v, mode %v", err, st.Mode())
	}
	names, _ := filepath.Glob(filepath.Join(jdir, "zq-*-*.journal"))
	if len(names) != 1 || img.journal.path != names[0] {
		t.Fatalf("journal files %q, image uses %q", names, img.journal.path)
	}
	// Die: the descriptors close (and the lock goes), nothing is flushed.
	img.file.Close()
	img.journal.s.Close()

	img, err = Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if img.Info().JournalReplayed == 0 {
		t.Fatal("no batch replayed")
	}
	got := make([]byte, len(data))
	if _, err := img.ReadAt(got, 12345); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("acknowledged write lost: %v", err)
	}
	mustCheckClean(t, img)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(names[0]); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("journal left after Close: %v", err)
	}
	// A reader ignores the journal directory altogether.
	img, err = Open(path, OpenOptions{ReadOnly: true, JournalDir: filepath.Join(dir, "unused")})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	if _, err := os.Stat(filepath.Join(dir, "unused")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a read-only open made a journal directory: %v", err)
	}
}

// FuzzJournalReplay feeds arbitrary journals to a read-write open: parsing
// and replay must not panic, a header that parses must re-encode to its
// bytes and not be refused as unreadable, and an image that opens must
// stand a check. Seeds are real journals of a zoned image.
func FuzzJournalReplay(f *testing.F) {
	base := createMem(f, smallZoned(4096))
	for seed := range uint64(3) {
		s, j := newMemStorage(base.bytes()), newMemStorage(nil)
		img := openMem(f, s, OpenOptions{Journal: j, BootID: bootA})
		model := make([]byte, img.Size())
		wps := mustWritePointers(f, img)
		r := rand.New(rand.NewPCG(seed, 9))
		for range 6 {
			applyRandomOp(f, r, img, model, 4096)
			setRandomWritePointer(f, r, img, wps)
		}
		f.Add(j.bytes())
	}
	f.Fuzz(func(t *testing.T, journal []byte) {
		hdr, herr := parseJournalHeader(journal)
		if herr == nil {
			// Re-encoding what parsed gives what was read.
			if !bytes.Equal(hdr.encode()[:64], journal[:64]) {
				t.Fatalf("header round trip differs")
			}
		}
		img, err := OpenStorage(newMemStorage(base.bytes()), OpenOptions{Journal: newMemStorage(journal), BootID: bootA})
		if err != nil {
			if herr == nil && errors.Is(err, ErrJournal) {
				t.Fatalf("a readable header refused: %v", err)
			}
			return
		}
		defer img.Close()
		if _, err := img.Check(false); err != nil {
			t.Fatalf("check after replay: %v", err)
		}
	})
}

// TestPowerCutDuringReplayLeavesNoCorruption cuts power at every point of
// a replaying open: replay goes through the crash-ordered writeback, so
// the image left must check without corruption (the journal is then of
// the old boot and ignored).
func TestPowerCutDuringReplayLeavesNoCorruption(t *testing.T) {
	const cs = 512
	s, j := createMem(t, CreateOptions{Size: 2 << 20, ClusterSize: cs}), newMemStorage(nil)
	img := openMem(t, s, OpenOptions{Journal: j, BootID: bootA, CacheSize: 16 * cs})
	r := rand.New(rand.NewPCG(5, 6))
	model := make([]byte, 2<<20)
	for range 80 {
		if op, _, _ := applyRandomOp(t, r, img, model, cs); op == "flush" {
			break
		}
	}
	for range 40 {
		applyRandomOp(t, r, img, model, cs)
	}
	s, j = kill(s, j)
	cuts := 0
	for cut := 1; ; cut++ {
		// The dead process's writes reached the disk; the replay's may not.
		victim := newMemStorage(s.bytes())
		victim.cutAt, victim.cutRand = cut, rand.New(rand.NewPCG(uint64(cut), 1))
		img, err := OpenStorage(victim, OpenOptions{Journal: newMemStorage(j.bytes()), BootID: bootA})
		if err != nil {
			t.Fatalf("cut %d: open: %v", cut, err)
		}
		if cut == 1 && img.Info().JournalReplayed == 0 {
			t.Fatal("nothing replayed: the test lost its point")
		}
		if !victim.hasCut() {
			mustMatch(t, img, model)
			break
		}
		cuts++
		after, err := OpenStorage(newMemStorage(victim.cut), OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("cut %d: image left by the cut does not open: %v", cut, err)
		}
		if res, err := after.Check(false); err != nil || len(res.Corruptions) > 0 {
			t.Fatalf("cut %d: %v %q", cut, err, res.Corruptions)
		}
	}
	if cuts < 3 {
		t.Fatalf("only %d cut points in the replay", cuts)
	}
}

// TestJournalUnderConcurrentWriters kills the process after writers that
// share clusters (and so batches: one call's words may go out in
// another's) have all been acknowledged: every write must come back.
func TestJournalUnderConcurrentWriters(t *testing.T) {
	const (
		size    = 8 << 20
		block   = 4096
		writers = 8
	)
	s, j := createMem(t, CreateOptions{Size: size}), newMemStorage(nil)
	opts := OpenOptions{CacheSize: 64 << 10, Journal: j, BootID: bootA}
	img := openMem(t, s, opts)
	model := writeInterleaved(t, img, size, block, writers, func(b, w int) bool { return b < size/block/4 && b%(writers*97) == w })
	batches, _ := j.Size()
	s, j = kill(s, j)
	opts.Journal = j
	img = openMem(t, s, opts)
	defer img.Close()
	if batches > journalHeaderLen && img.Info().JournalReplayed == 0 {
		t.Fatal("the journal holds batches, but none was replayed")
	}
	mustMatch(t, img, model)
	mustCheckClean(t, img)
}
