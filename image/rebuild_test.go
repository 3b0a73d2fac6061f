package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// agedZoned is a zoned image (smallZoned(4096): 8 zones of 1 MiB, zone 0
// conventional) with data in some zones and write pointers set, flushed.
// It returns the storage, what was written, the write pointers the table
// holds, and the write pointers the data alone implies: each sequential
// zone's at the end of its last allocated 4 KiB cluster (dataEnds).
func agedZoned(t *testing.T) (s *memStorage, ws []written, table, fromData []int64) {
	t.Helper()
	s = createMem(t, smallZoned(4096))
	img := openMem(t, s, OpenOptions{})
	const zs = 1 << 20
	table = []int64{0, zs, 2*zs + 10240, 3 * zs, 5 * zs, 5*zs + 8192, 6*zs + 4608, 7 * zs}
	ws = append(ws,
		writePattern(t, img, 0, 5000, 1),     // conventional zone 0
		writePattern(t, img, 2*zs, 10000, 2), // zone 2: clusters 0-2
		writePattern(t, img, 4*zs, zs, 3))    // zone 4: full
	// Zone 6's cluster 1 holds the table's own bytes (docs/qcow2-zoned.md section 3:
	// little-endian, bit 59 flags a conventional zone), so that a table
	// pointed there reads as valid: see "sharing a cluster with data".
	entries := make([]byte, 8*len(table))
	for i, wp := range table {
		binary.LittleEndian.PutUint64(entries[8*i:], uint64(wp)|map[bool]uint64{true: wpConventional}[i == 0])
	}
	if _, err := img.WriteAt(entries, 6*zs+4096); err != nil {
		t.Fatal(err)
	}
	ws = append(ws, written{6*zs + 4096, entries})
	for i, wp := range table[1:] {
		if err := img.SetWritePointer(i+1, wp); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// Zone 5's pointer covers no data (zeros never stored), so the data
	// cannot bring it back: it becomes empty, which loses nothing.
	fromData = []int64{0, zs, 2*zs + 3*4096, 3 * zs, 5 * zs, 5 * zs, 6*zs + 2*4096, 7 * zs}
	return newMemStorage(s.bytes()), ws, table, fromData
}

// tableOffset is where the image's write-pointer table lies.
func tableOffset(t testing.TB, s *memStorage) int64 {
	t.Helper()
	img := openMem(t, newMemStorage(s.bytes()), OpenOptions{ReadOnly: true, ForCheck: true})
	defer img.Close()
	return int64(img.zones.metaOffset)
}

// setTableOffset rewrites the zoned extension's zonedmeta_offset.
func setTableOffset(t *testing.T, s *memStorage, off int64) {
	t.Helper()
	b := s.bytes()
	h, err := parseHeader(b, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	for i := range h.extensions {
		if h.extensions[i].typ == extZoned {
			binary.BigEndian.PutUint64(h.extensions[i].data[48:], uint64(off))
		}
	}
	hdr, err := h.encode()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
}

// freeCluster sets cluster c's refcount to 0, as qemu-img check -r leaks
// does to the table's cluster (QEMU does not count it as referenced).
func freeCluster(t *testing.T, s *memStorage, c int64) {
	t.Helper()
	img := openMem(t, s, OpenOptions{})
	img.mu.Lock()
	err := img.setRefcount(c, 0)
	if err == nil {
		err = img.writeback()
	}
	img.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRepairRebuildsADamagedWritePointerTable(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, s *memStorage, table int64)
		// unreadable: a plain open refuses the image (else it opens and
		// only a check finds the damage).
		unreadable bool
		// fromData: the write pointers come back from the data, not
		// from the table.
		fromData bool
		problem  string
	}{
		{"zeroed and freed, as qemu-img check -r leaks leaves it", func(t *testing.T, s *memStorage, table int64) {
			freeCluster(t, s, table/4096)
			s.WriteAt(make([]byte, 64), table)
		}, true, true, "valid in neither byte order"},
		{"zeroed", func(t *testing.T, s *memStorage, table int64) {
			s.WriteAt(make([]byte, 64), table)
		}, true, true, "valid in neither byte order"},
		{"past the end of the file", func(t *testing.T, s *memStorage, table int64) {
			setTableOffset(t, s, 1<<30)
		}, true, true, "reaches past the end of the file"},
		{"at offset 0", func(t *testing.T, s *memStorage, table int64) {
			setTableOffset(t, s, 0)
		}, true, true, "zonedmeta_offset is 0"},
		{"sharing a cluster with data", func(t *testing.T, s *memStorage, table int64) {
			// Zone 6's data holds valid table bytes: only the sharing is
			// wrong, and what a shared table says is not trusted.
			img := openMem(t, s, OpenOptions{ReadOnly: true})
			host, err := hostOffset(img, 6<<20+4096)
			img.Close()
			if err != nil {
				t.Fatal(err)
			}
			setTableOffset(t, s, host)
		}, false, true, "refcount 1 but 2 references"},
		{"a conventional flag lost", func(t *testing.T, s *memStorage, table int64) {
			e := make([]byte, 8)
			s.ReadAt(e, table)
			binary.LittleEndian.PutUint64(e, binary.LittleEndian.Uint64(e)&^wpConventional)
			s.WriteAt(e, table)
		}, false, false, "conventional bit false, but the zone is conventional"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, ws, table, fromData := agedZoned(t)
			tc.damage(t, s, tableOffset(t, s))
			s = newMemStorage(s.bytes())
			want := table
			if tc.fromData {
				want = fromData
			}

			img, err := OpenStorage(newMemStorage(s.bytes()), OpenOptions{ReadOnly: true})
			if tc.unreadable != (err != nil) {
				t.Fatalf("plain open: %v, want it refused: %v", err, tc.unreadable)
			}
			if err != nil && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("plain open: %v, want ErrCorrupt", err)
			}
			if img != nil {
				img.Close()
			}

			before := s.bytes()
			checked := openMem(t, s, OpenOptions{ReadOnly: true, ForCheck: true})
			if _, err := checked.WritePointers(); tc.unreadable != (err != nil) {
				t.Fatalf("WritePointers of a ForCheck open: %v, want an error: %v", err, tc.unreadable)
			}
			res, err := checked.Check(false)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(strings.Join(res.Corruptions, "\n"), tc.problem) {
				t.Fatalf("check found %q, want a corruption saying %q", res.Corruptions, tc.problem)
			}
			checked.Close()
			if string(s.bytes()) != string(before) {
				t.Fatal("a check that does not repair wrote to the image")
			}

			repaired := openMem(t, s, OpenOptions{ForCheck: true})
			res, err = repaired.Check(true)
			if err != nil || !res.Clean() || len(res.Rebuilt) != 1 {
				t.Fatalf("repair: %v, %+v: want it clean with the table rebuilt", err, res)
			}
			if err := repaired.Close(); err != nil {
				t.Fatal(err)
			}

			img = openMem(t, newMemStorage(s.bytes()), OpenOptions{})
			defer img.Close()
			if got := mustWritePointers(t, img); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("write pointers after the repair %#x, want %#x", got, want)
			}
			mustHold(t, img, img.Size(), ws)
			mustCheckClean(t, img)
			raw := make([]byte, 8)
			if _, err := s.ReadAt(raw, int64(img.zones.metaOffset)); err != nil || binary.LittleEndian.Uint64(raw)&wpConventional == 0 {
				t.Fatalf("zone 0's entry %#x (%v) is not flagged conventional", raw, err)
			}
		})
	}
}

// hostOffset is where guest offset off's cluster lies in the file.
func hostOffset(img *Image, off int64) (int64, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	l1i, l2i := off/img.clusterSize/img.l2Entries, off/img.clusterSize%img.l2Entries
	t, err := img.table(int64(img.l1[l1i]&offsetMask), kindL2)
	if err != nil {
		return 0, err
	}
	return int64(img.l2Get(t, l2i).std & offsetMask), nil
}

// TestPowerCutDuringWritePointerRebuild cuts power before each file call
// a repair of a zeroed, freed table makes (the image qemu-img check -r
// leaks leaves): every cut leaves an image that a ForCheck open takes and
// whose data is intact, with either the damaged table or the rebuilt one,
// and a second repair leaves it clean with the pointers from the data.
func TestPowerCutDuringWritePointerRebuild(t *testing.T) {
	s, ws, _, fromData := agedZoned(t)
	table := tableOffset(t, s)
	freeCluster(t, s, table/4096)
	s.WriteAt(make([]byte, 64), table)
	damaged := s.bytes()

	const seeds = 8
	cuts, rebuilt := 0, 0
	for cut := 1; ; cut++ {
		came := false
		for seed := range uint64(seeds) {
			s := newMemStorage(damaged)
			s.cutAt, s.cutRand = cut, rand.New(rand.NewPCG(uint64(cut), seed))
			img := openMem(t, s, OpenOptions{ForCheck: true})
			if res, err := img.Check(true); err != nil || !res.Clean() {
				t.Fatalf("repair: %v %+v", err, res)
			}
			img.Close()
			if !s.hasCut() {
				continue
			}
			came = true
			what := fmt.Sprintf("cut before file call %d, seed %d", cut, seed)
			if plain, err := OpenStorage(newMemStorage(s.cut), OpenOptions{ReadOnly: true}); err == nil {
				rebuilt++
				if got := mustWritePointers(t, plain); fmt.Sprint(got) != fmt.Sprint(fromData) {
					t.Fatalf("%s: the rebuilt table holds %#x, want %#x", what, got, fromData)
				}
				// Leaks are allowed, a table in a free cluster is not: the
				// next allocation would take it.
				if res, err := plain.Check(false); err != nil || len(res.Corruptions) > 0 {
					t.Fatalf("%s: the image opens with the rebuilt table, but check: %v %q", what, err, res.Corruptions)
				}
				plain.Close()
			}
			again := openMem(t, newMemStorage(s.cut), OpenOptions{ForCheck: true})
			mustHold(t, again, again.Size(), ws)
			if res, err := again.Check(true); err != nil || !res.Clean() {
				t.Fatalf("%s: second repair: %v %+v", what, err, res)
			}
			if got := mustWritePointers(t, again); fmt.Sprint(got) != fmt.Sprint(fromData) {
				t.Fatalf("%s: write pointers %#x after the second repair, want %#x", what, got, fromData)
			}
			mustHold(t, again, again.Size(), ws)
			again.Close()
		}
		if !came {
			break
		}
		cuts++
	}
	if cuts < 3 || rebuilt == 0 || rebuilt == seeds*cuts {
		t.Fatalf("%d cut points, %d of %d cuts left the rebuilt table: the test needs both outcomes", cuts, rebuilt, seeds*cuts)
	}
}

// FuzzCheckRepair: an image of any bytes opened ForCheck is checked
// without panic and, read-only, without a write; repaired, it either
// fails, or a plain open takes it when the repair says it is clean.
func FuzzCheckRepair(f *testing.F) {
	s := createMem(f, smallZoned(4096))
	img := openMem(f, s, OpenOptions{})
	img.WriteAt(bytes.Repeat([]byte{7}, 9000), 2<<20)
	img.SetWritePointer(2, 2<<20+9216)
	img.Close()
	f.Add(s.bytes())
	damaged := s.bytes()
	off := tableOffset(f, newMemStorage(damaged))
	copy(damaged[off:off+64], make([]byte, 64))
	f.Add(damaged)
	f.Fuzz(func(t *testing.T, b []byte) {
		ro := newMemStorage(b)
		if img, err := OpenStorage(ro, OpenOptions{ReadOnly: true, ForCheck: true, CacheSize: 1}); err == nil {
			img.Check(false)
			img.Close()
			if ro.writes != 0 {
				t.Fatal("a read-only check wrote to the file")
			}
		}
		rw := newMemStorage(b)
		img, err := OpenStorage(rw, OpenOptions{ForCheck: true, CacheSize: 1})
		if err != nil {
			return
		}
		res, err := img.Check(true)
		if cerr := img.Close(); err == nil && cerr == nil && res.Clean() {
			plain, err := OpenStorage(newMemStorage(rw.bytes()), OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("the repair left a clean image that does not open: %v", err)
			}
			plain.Close()
		}
	})
}
