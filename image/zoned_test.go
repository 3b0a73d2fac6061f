package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const testdataDir = "../../shared/testdata"

// TestSharedVectorsOpenInBothByteOrders reads the images another tool built
// from the spec: the geometry and every write pointer must come out as the
// vectors' README says.
func TestSharedVectorsOpenInBothByteOrders(t *testing.T) {
	for _, name := range []string{"zoned-le-1g-16m-conv3.qcow2", "zoned-be-1g-16m-conv3.qcow2"} {
		t.Run(name, func(t *testing.T) {
			img, err := Open(filepath.Join(testdataDir, name), OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			z, ok := img.Zones()
			want := Zones{ZoneSize: 16 << 20, ZoneCapacity: 12 << 20, ConventionalZones: 3, NrZones: 64,
				MaxActiveZones: 9, MaxOpenZones: 5, MaxAppendBytes: 128 << 10}
			if !ok || z != want {
				t.Fatalf("zones = %+v, %v; want %+v", z, ok, want)
			}
			for i, wp := range mustWritePointers(t, img) {
				if wp != int64(i)*(16<<20) {
					t.Errorf("zone %d: write pointer %#x, want its start %#x", i, wp, int64(i)*(16<<20))
				}
			}
			res, err := img.Check(false)
			if err != nil || !res.Clean() {
				t.Fatalf("check: %v %+v", err, res)
			}
		})
	}
}

func zonedOpts() CreateOptions {
	return CreateOptions{Size: 64 << 20, ClusterSize: 65536, Zones: &Zones{
		ZoneSize: 4 << 20, ZoneCapacity: 3 << 20, ConventionalZones: 2, MaxOpenZones: 4, MaxActiveZones: 6, MaxAppendBytes: 64 << 10}}
}

func TestZonedImageLayoutMatchesTheSpec(t *testing.T) {
	s := createMem(t, zonedOpts())
	b := s.bytes()
	be := binary.BigEndian
	if be.Uint64(b[72:])&incompatZoned == 0 {
		t.Fatal("incompatible bit 5 is not set")
	}
	h, err := parseHeader(b, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	var ext []byte
	for _, e := range h.extensions {
		if e.typ == 0x007a6264 {
			ext = e.data
		}
	}
	if len(ext) != 56 || ext[0] != 1 {
		t.Fatalf("zoned extension = %x", ext)
	}
	fields := []struct {
		name string
		got  uint64
		want uint64
	}{
		{"zone_size", be.Uint64(ext[4:]), 4 << 20},
		{"zone_capacity", be.Uint64(ext[12:]), 3 << 20},
		{"conventional_zones", uint64(be.Uint32(ext[20:])), 2},
		{"nr_zones", uint64(be.Uint32(ext[24:])), 16},
		{"max_active_zones", uint64(be.Uint32(ext[28:])), 6},
		{"max_open_zones", uint64(be.Uint32(ext[32:])), 4},
		{"max_append_bytes", uint64(be.Uint32(ext[36:])), 64 << 10},
		{"zonedmeta_size", be.Uint64(ext[40:]), 16 * 8},
	}
	for _, f := range fields {
		if f.got != f.want {
			t.Errorf("%s = %d, want %d", f.name, f.got, f.want)
		}
	}
	table := be.Uint64(ext[48:])
	if table%65536 != 0 {
		t.Fatalf("zonedmeta_offset %#x is not cluster aligned", table)
	}
	for i := range 16 {
		e := binary.LittleEndian.Uint64(b[table+uint64(i)*8:])
		want := uint64(i) * (4 << 20)
		if i < 2 {
			want |= 1 << 59
		}
		if e != want {
			t.Errorf("table entry %d = %#x, want %#x (little-endian)", i, e, want)
		}
	}
	var named bool
	for _, f := range h.names {
		named = named || (f.kind == 0 && f.bit == 5 && f.name == "zoned format")
	}
	if !named {
		t.Error(`feature name table lacks incompatible bit 5 "zoned format"`)
	}
}

func TestBadZonedExtensionsAreRefusedWithoutWriting(t *testing.T) {
	good := createMem(t, zonedOpts()).bytes()
	h, _ := parseHeader(good, int64(len(good)))
	var extAt int
	for i := 112; i+8 < len(good); i += 8 {
		if binary.BigEndian.Uint32(good[i:]) == 0x007a6264 {
			extAt = i + 8
			break
		}
	}
	if extAt == 0 {
		t.Fatal("zoned extension not found")
	}
	table := int(binary.BigEndian.Uint64(good[extAt+48:]))
	_ = h
	mutate := func(f func(b []byte)) []byte {
		b := append([]byte(nil), good...)
		f(b)
		return b
	}
	be := binary.BigEndian
	cases := []struct {
		name, words string
		file        []byte
	}{
		{"unknown zone model", "unknown zone model 2", mutate(func(b []byte) { b[extAt] = 2 })},
		{"truncated extension", "is 40 bytes", mutate(func(b []byte) { be.PutUint32(b[extAt-4:], 40) })},
		{"nr_zones mismatch", "nr_zones 17", mutate(func(b []byte) { be.PutUint32(b[extAt+24:], 17) })},
		{"capacity above size", "zone_capacity", mutate(func(b []byte) { be.PutUint64(b[extAt+12:], 8<<20) })},
		{"zone size zero", "zone_size 0", mutate(func(b []byte) { be.PutUint64(b[extAt+4:], 0) })},
		{"table size wrong", "zonedmeta_size", mutate(func(b []byte) { be.PutUint64(b[extAt+40:], 8) })},
		{"table past the end", "write-pointer table", mutate(func(b []byte) { be.PutUint64(b[extAt+48:], 1<<40) })},
		{"entry outside its zone", "neither byte order", mutate(func(b []byte) {
			binary.LittleEndian.PutUint64(b[table+5*8:], 9*(4<<20))
		})},
		{"bit without extension", "extension is missing", mutate(func(b []byte) { be.PutUint32(b[extAt-8:], 0x11111111) })},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, ro := range []bool{true, false} {
				s := newMemStorage(c.file)
				_, err := OpenStorage(s, OpenOptions{ReadOnly: ro})
				if err == nil || !strings.Contains(err.Error(), c.words) {
					t.Fatalf("read-only=%v: err = %v, want one mentioning %q", ro, err, c.words)
				}
				if s.writes != 0 || !bytes.Equal(s.bytes(), c.file) {
					t.Fatalf("read-only=%v: refusing the image changed it", ro)
				}
			}
		})
	}
}

func TestWritePointersPersistAndBigEndianTablesAreRewritten(t *testing.T) {
	b := createMem(t, zonedOpts()).bytes()
	// Turn the table big-endian, as a big-endian QEMU host would write it.
	h, _ := parseHeader(b, int64(len(b)))
	z, _ := parseZonedExt(h.extensions[0].data)
	for i := range 16 {
		at := z.metaOffset + uint64(i)*8
		binary.BigEndian.PutUint64(b[at:], binary.LittleEndian.Uint64(b[at:]))
	}
	s := newMemStorage(b)
	img := openMem(t, s, OpenOptions{})
	if err := img.SetWritePointer(5, 5*(4<<20)+4096); err != nil {
		t.Fatal(err)
	}
	if err := img.SetWritePointer(5, 7*(4<<20)); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("write pointer outside its zone: err = %v", err)
	}
	img = reopen(t, img, s, OpenOptions{})
	wps := mustWritePointers(t, img)
	if wps[5] != 5*(4<<20)+4096 || wps[6] != 6*(4<<20) {
		t.Fatalf("write pointers after reopen: zone 5 %#x, zone 6 %#x", wps[5], wps[6])
	}
	raw := img.file.(*memStorage).bytes()[z.metaOffset:]
	for i := range 16 {
		e := binary.LittleEndian.Uint64(raw[i*8:]) &^ wpFlags
		if e < uint64(i)*(4<<20) || e > uint64(i+1)*(4<<20) {
			t.Fatalf("entry %d is not little-endian after a rewrite: %#x", i, e)
		}
	}
	mustCheckClean(t, img)
	img.Close()
}

const workloadZoneSize = 4 << 20

func workloadPattern(off int64) byte { return byte(off/512*7 + 1) }

// zoneWorkload writes zones of a new zoned image sequentially, recording
// each write pointer once its data is written, with resets and flushes, all
// chosen by seed. With cutAt > 0 a power cut comes before the file's
// cutAt-th write or sync, and the workload stops there. It returns what is
// on disk after the cut (or a random crash at the end) and how many file
// calls the workload made.
func zoneWorkload(t *testing.T, seed uint64, clusterSize, cutAt int) ([]byte, int) {
	t.Helper()
	r := rand.New(rand.NewPCG(3, seed))
	opts := zonedOpts()
	opts.ClusterSize = clusterSize
	s := createMem(t, opts)
	// A cache of 16 tables makes writebacks happen inside operations.
	img := openMem(t, s, OpenOptions{CacheSize: int64(clusterSize) * 16})
	defer img.Close()
	s.mu.Lock()
	s.cutAt, s.calls, s.cutRand = cutAt, 0, rand.New(rand.NewPCG(4, seed))
	s.mu.Unlock()
	const zs = workloadZoneSize
	wp := make([]int64, 16)
	for i := range wp {
		wp[i] = int64(i) * zs
	}
	for op := 0; op < 80 && !s.hasCut(); op++ {
		zone := 2 + r.IntN(14)
		switch k := r.IntN(10); {
		case k < 7:
			n := min(int64(512*(1+r.IntN(300))), int64(zone)*zs+3<<20-wp[zone])
			if n == 0 {
				continue
			}
			p := make([]byte, n)
			for i := range p {
				p[i] = workloadPattern(wp[zone] + int64(i))
			}
			if _, err := img.WriteAt(p, wp[zone]); err != nil {
				t.Fatal(err)
			}
			wp[zone] += n
			img.SetWritePointer(zone, wp[zone])
		case k < 8:
			// Reset: the pointer goes back and is durable before the
			// clusters are freed (docs/qcow2-zoned.md section 6), as package zoned does.
			wp[zone] = int64(zone) * zs
			img.SetWritePointer(zone, wp[zone])
			if img.Flush() != nil || img.WriteZeroes(int64(zone)*zs, zs, true) != nil {
				t.Fatal("reset failed")
			}
		default:
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	s.mu.Lock()
	calls := s.calls
	s.mu.Unlock()
	if s.cut != nil {
		return s.cut, calls
	}
	return s.crash(r), calls
}

// checkCrashed opens a crashed image and checks it: no corruption (leaks
// are allowed), and every zone's data below its write pointer exactly what
// was written there.
func checkCrashed(t *testing.T, crashed []byte, what string) {
	t.Helper()
	img, err := OpenStorage(newMemStorage(crashed), OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("%s: crashed image does not open: %v", what, err)
	}
	if res, err := img.Check(false); err != nil || len(res.Corruptions) > 0 {
		t.Fatalf("%s: check: %v %q", what, err, res.Corruptions)
	}
	for zone, w := range mustWritePointers(t, img)[2:] {
		zone += 2
		start := int64(zone) * workloadZoneSize
		got := make([]byte, w-start)
		if _, err := img.ReadAt(got, start); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			if got[i] != workloadPattern(start+int64(i)) {
				t.Fatalf("%s: zone %d: write pointer %#x, but byte %#x is %#x, not the data written there",
					what, zone, w, start+int64(i), got[i])
			}
		}
	}
}

// TestCrashNeverLeavesAWritePointerPastDurableData cuts power at a random
// file call of random zone workloads.
func TestCrashNeverLeavesAWritePointerPastDurableData(t *testing.T) {
	for cut := range loops(600) {
		if only := os.Getenv("ZQ_CRASH_CUT"); only != "" && only != fmt.Sprint(cut) {
			continue // ZQ_CRASH_CUT=N replays cut N alone: each has its own seed
		}
		cs := []int{512, 4096, 65536}[cut%3]
		cutAt := 1 + rand.New(rand.NewPCG(5, uint64(cut))).IntN(300)
		crashed, _ := zoneWorkload(t, uint64(cut), cs, cutAt)
		checkCrashed(t, crashed, fmt.Sprintf("cut %d (%d-byte clusters, before file call %d)", cut, cs, cutAt))
	}
}

func TestCheckCountsTheTableAndPlainQemuSeesOnlyItAsLeaked(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img is needed for this test (apt-get install qemu-utils)")
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "z.qcow2")
	if err := Create(p, zonedOpts()); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0x5a}, 1<<20), 2*(4<<20)); err != nil {
		t.Fatal(err)
	}
	img.SetWritePointer(2, 2*(4<<20)+1<<20)
	mustCheckClean(t, img)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-img", "info", p).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "zoned format") {
		t.Fatalf("plain qemu-img info: err=%v, output %q: want a refusal naming \"zoned format\"", err, out)
	}
	b, _ := os.ReadFile(p)
	b[79] &^= 1 << 5
	plain := filepath.Join(dir, "plain.qcow2")
	os.WriteFile(plain, b, 0o644)
	out, _ = exec.Command("qemu-img", "check", "--output=json", plain).CombinedOutput()
	// One 64 KiB cluster holds the 16-entry table.
	if !strings.Contains(string(out), `"leaks": 1`) || strings.Contains(string(out), `"corruptions":`) && !strings.Contains(string(out), `"corruptions": 0`) {
		t.Fatalf("qemu-img check of the copy without bit 5: %s\nwant exactly one leaked cluster (the table) and no corruption", out)
	}
	out, err = exec.Command("qemu-io", "-r", "-c", fmt.Sprintf("read -P 0x5a %d %d", 2*(4<<20), 1<<20), plain).CombinedOutput()
	if err != nil || strings.Contains(string(out), "fail") {
		t.Fatalf("qemu-io read of zone data: %v %s", err, out)
	}
}

// mustWritePointers is img's write pointers; an error fails the test.
func mustWritePointers(t testing.TB, img *Image) []int64 {
	t.Helper()
	wps, err := img.WritePointers()
	if err != nil {
		t.Fatal(err)
	}
	return wps
}
