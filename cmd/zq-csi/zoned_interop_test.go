package main

// Interop tier for zoned images: the zq-csi binary against Debian's
// qemu-img and qemu-io, which do not know the zoned format (QEMU's zoned
// qcow2 series is not in Debian's QEMU). Plain QEMU must refuse a zoned
// image by the feature name "zoned format"; with incompatible bit 5
// cleared the image is a valid plain qcow2 image whose only oddity is the
// write-pointer table, which qemu-img check reports as leaked clusters,
// exactly those and nothing else (docs/qcow2-zoned.md section 3), and qemu-io reads the
// zone data zq-csi wrote.

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

const zonedFeature = "Unsupported qcow2 feature(s): zoned format"

func TestInteropQemuRefusesZonedImages(t *testing.T) {
	interop(t)
	f := filepath.Join(t.TempDir(), "zoned.qcow2")
	mustOK(t, "zq-csi image create", zq(t, "image", "create", "-o",
		"zone.mode=host-managed,zone.size=64M,zone.conventional_zones=2,zone.max_open_zones=6,zone.max_active_zones=8,zone.max_append_bytes=256k",
		f, "1G"))
	mustOK(t, "zq-csi io", zq(t, "io", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x5b 128M 64k", f))
	files := []string{f, vectorPath(t, vectorNames[0]), vectorPath(t, vectorNames[1])}
	for _, file := range files {
		before := fileHash(t, file)
		for _, args := range [][]string{
			{"qemu-img", "info", file},
			{"qemu-img", "check", file},
			{"qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", file},
		} {
			r := runTool(t, args[0], args[1:]...)
			if r.code == 0 || !strings.Contains(r.stderr, zonedFeature) {
				t.Errorf("%s %q: want a refusal naming %q, got %v", args[0], args[1:], zonedFeature, r)
			}
		}
		if file == f {
			// qemu-io read-write: refused as well, and nothing written.
			r := runTool(t, "qemu-io", "-f", "qcow2", "-c", "write 0 512", file)
			if r.code == 0 || !strings.Contains(r.stderr, zonedFeature) {
				t.Errorf("qemu-io write: want a refusal naming %q, got %v", zonedFeature, r)
			}
		}
		if fileHash(t, file) != before {
			t.Fatalf("refusing %s changed it", file)
		}
	}
	// The binary reads the vectors as the README says.
	for _, name := range vectorNames {
		r := mustOK(t, "zq-csi io zrp", zq(t, "io", "-r", "-c", "zrp 0 4", vectorPath(t, name)))
		if r.stdout != vectorReport {
			t.Fatalf("%s: zq-csi io -r -c 'zrp 0 4':\n%s\nwant:\n%s", name, r.stdout, vectorReport)
		}
	}
}

// zonedLayout is what a zoned image's header says about its table.
type zonedLayout struct {
	clusterSize, nrZones, tableOffset, tableSize int64
}

func readZonedLayout(t *testing.T, f string) zonedLayout {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	ext := zonedExtOffset(t, f) + 8
	be := binary.BigEndian
	return zonedLayout{
		clusterSize: 1 << be.Uint32(b[20:]),
		nrZones:     int64(be.Uint32(b[ext+24:])),
		tableSize:   int64(be.Uint64(b[ext+40:])),
		tableOffset: int64(be.Uint64(b[ext+48:])),
	}
}

// clearZonedBit is a copy of f with incompatible feature bit 5 (byte 79,
// bit 5 of the big-endian incompatible_features) cleared: plain qcow2 for
// a QEMU without the zoned format.
func clearZonedBit(t *testing.T, f string) string {
	t.Helper()
	plain := filepath.Join(t.TempDir(), "bit5-cleared.qcow2")
	clearZonedBitTo(t, f, plain)
	return plain
}

// clearZonedBitTo writes that copy of f to plain.
func clearZonedBitTo(t *testing.T, f, plain string) {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	if b[79]&(1<<5) == 0 {
		t.Fatalf("%s: incompatible bit 5 (zoned) is not set", f)
	}
	b[79] &^= 1 << 5
	if err := os.WriteFile(plain, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestInteropZonedChainReadsAsPlainQcow2InQemu: a zoned backing chain
// zq-csi made (a base and an overlay that writes at the base's write
// pointers, resets a zone the base filled and writes it again), copied
// with bit 5 cleared in each image, passes qemu-img check (but for each
// table's clusters) and reads in Debian's qemu-img exactly as zq-csi
// reads the zoned chain.
func TestInteropZonedChainReadsAsPlainQcow2InQemu(t *testing.T) {
	interop(t)
	dir, plainDir := t.TempDir(), t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	mustOK(t, "create", zq(t, "image", "create", "-q", "-o", "zone.mode=host-managed,zone.size=4M,zone.conventional_zones=1", base, "32M"))
	mustOK(t, "io", zq(t, "io", "-c", "write -P 0x11 4096 64k", "-c", "write -P 0x22 4M 1M", "-c", "write -P 0x23 8M 4M", base))
	mustOK(t, "create -b", zq(t, "image", "create", "-q", "-b", "base.qcow2", top))
	mustOK(t, "io", zq(t, "io", "-c", "write -P 0x31 0 8k", "-c", "write -P 0x32 5M 256k", "-c", "zrs 8M 4M",
		"-c", "write -P 0x33 8M 8k", "-c", "write -P 0x34 20M 1M", top))
	zqRaw := filepath.Join(dir, "zq.raw")
	mustOK(t, "convert", zq(t, "image", "convert", "-q", "-O", "raw", top, zqRaw))
	for _, f := range []string{"base.qcow2", "top.qcow2"} {
		plain := filepath.Join(plainDir, f)
		clearZonedBitTo(t, filepath.Join(dir, f), plain)
		qemuCheckLeaksOnlyTable(t, plain, readZonedLayout(t, filepath.Join(dir, f)))
	}
	qemuRaw := filepath.Join(dir, "qemu.raw")
	mustOK(t, "qemu-img convert", runTool(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", filepath.Join(plainDir, "top.qcow2"), qemuRaw))
	mustOK(t, "qemu-img compare", runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", zqRaw, qemuRaw))
	// What the overlay did is there, and the reset zone shows none of the
	// base's data.
	mustOK(t, "qemu-io read", runTool(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x31 0 8k", "-c", "read -P 0x11 8k 60k",
		"-c", "read -P 0x32 5M 256k", "-c", "read -P 0x33 8M 8k", "-c", "read -P 0 8200k 4088k", "-c", "read -P 0x34 20M 1M",
		filepath.Join(plainDir, "top.qcow2")))
}

// qemuCheckLeaksOnlyTable runs qemu-img check on the bit-cleared copy and
// requires exactly the write-pointer table's clusters to be leaked, and
// nothing else to be wrong.
func qemuCheckLeaksOnlyTable(t *testing.T, plain string, l zonedLayout) {
	t.Helper()
	want := (8*l.nrZones + l.clusterSize - 1) / l.clusterSize
	if l.tableSize != 8*l.nrZones {
		t.Fatalf("zonedmeta_size %d, want 8 * %d zones", l.tableSize, l.nrZones)
	}
	r := runTool(t, "qemu-img", "check", "--output=json", "-f", "qcow2", plain)
	var j map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil {
		t.Fatalf("qemu-img check --output=json: %v\n%v", err, r)
	}
	if r.code != exitCheckLeaks || j["leaks"] != float64(want) || j["corruptions"] != nil || j["check-errors"] != 0.0 {
		t.Fatalf("qemu-img check: want exit 3 and exactly %d leaked clusters (%d zones, %d-byte clusters), no corruption; got %v\n%v",
			want, l.nrZones, l.clusterSize, j, r)
	}
	// And which: the table's clusters, from zonedmeta_offset on.
	r = runTool(t, "qemu-img", "check", "-f", "qcow2", plain)
	var got []int64
	for _, m := range regexp.MustCompile(`(?m)^Leaked cluster (\d+) refcount=1 reference=0$`).FindAllStringSubmatch(r.stderr+r.stdout, -1) {
		n, _ := strconv.ParseInt(m[1], 10, 64)
		got = append(got, n)
	}
	sort.Slice(got, func(a, b int) bool { return got[a] < got[b] })
	var wantClusters []int64
	for c := l.tableOffset / l.clusterSize; c < (l.tableOffset+l.tableSize+l.clusterSize-1)/l.clusterSize; c++ {
		wantClusters = append(wantClusters, c)
	}
	if fmt.Sprint(got) != fmt.Sprint(wantClusters) {
		t.Fatalf("qemu-img check: leaked clusters %v, want the write-pointer table's %v\n%v", got, wantClusters, r)
	}
	if strings.Contains(r.stdout+r.stderr, "ERROR") {
		t.Fatalf("qemu-img check reports errors:\n%v", r)
	}
}

func TestInteropZonedBitClearedPassesQemuCheck(t *testing.T) {
	tests := []struct {
		name   string
		opts   string // zone options of zq-csi image create; "" for a vector
		size   string
		vector string
	}{
		{"4k clusters, 2048 zones of 128k", "cluster_size=4k,zone.mode=host-managed,zone.size=128k,zone.conventional_zones=2,zone.max_open_zones=4", "256M", ""},
		{"512-byte clusters, 1024 zones", "cluster_size=512,zone.mode=host-managed,zone.size=64k,zone.capacity=48k,zone.conventional_zones=1,zone.max_append_bytes=16k", "64M", ""},
		{"64k clusters, the demo's geometry", "zone.mode=host-managed,zone.size=64M,zone.conventional_zones=2,zone.max_open_zones=6,zone.max_active_zones=8,zone.max_append_bytes=256k", "1G", ""},
		{"refcount bits 1, a short last zone", "refcount_bits=1,cluster_size=4k,zone.mode=host-managed,zone.size=1M,zone.max_append_bytes=4k", "10M+512k", ""},
		{"vector, little-endian table", "", "", vectorNames[0]},
		{"vector, big-endian table", "", "", vectorNames[1]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			interop(t)
			var f string
			if tt.vector != "" {
				f = vectorCopy(t, tt.vector)
				// As it is: only the table's cluster leaks.
				qemuCheckLeaksOnlyTable(t, clearZonedBit(t, f), readZonedLayout(t, f))
			} else {
				f = filepath.Join(t.TempDir(), "zoned.qcow2")
				mustOK(t, "zq-csi image create", zq(t, "image", "create", "-q", "-o", tt.opts, f, evalSum(t, tt.size)))
			}
			l := readZonedLayout(t, f)
			r := mustOK(t, "zq-csi image info", zq(t, "image", "info", "--output=json", f))
			var info struct {
				Size  int64 `json:"virtual-size"`
				Zoned struct {
					ZoneSize int64 `json:"zone-size"`
					Capacity int64 `json:"zone-capacity"`
					Conv     int64 `json:"conventional-zones"`
					NrZones  int64 `json:"nr-zones"`
				} `json:"zoned"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &info); err != nil {
				t.Fatal(err)
			}
			if info.Zoned.NrZones != l.nrZones || l.nrZones != (info.Size+info.Zoned.ZoneSize-1)/info.Zoned.ZoneSize {
				t.Fatalf("nr_zones %d, info %+v", l.nrZones, info)
			}

			// Zone data from several sessions: a conventional zone, writes
			// and an append at the write pointer of the first sequential
			// zone, a full zone, a finished one, and the last zone.
			zs, c := info.Zoned.ZoneSize, info.Zoned.Conv
			seq := func(k int64) int64 { return (c + k) * zs }
			last := (l.nrZones - 1) * zs
			reads := []string{}
			var cmds []string
			if c > 0 {
				cmds = append(cmds, "write -P 0x11 1000 5000")
				reads = append(reads, "read -P 0x11 1000 5000", "read -P 0 0 1000", fmt.Sprintf("read -P 0 6000 %d", zs-6000))
			}
			cmds = append(cmds, fmt.Sprintf("write -P 0x22 %d 8k", seq(0)), fmt.Sprintf("zap -p -P 0x33 %d 4k", seq(0)),
				fmt.Sprintf("zf %d %d", seq(2), zs), fmt.Sprintf("write -P 0x44 %d 512", last))
			mustOK(t, "zq-csi io", zq(t, append([]string{"io"}, append(ioArgs(cmds), f)...)...))
			// A later session: the write pointer persisted.
			more := []string{fmt.Sprintf("write -P 0x55 %d 4k", seq(0)+12<<10), fmt.Sprintf("write -P 0x66 %d %d", seq(1), info.Zoned.Capacity)}
			mustOK(t, "zq-csi io", zq(t, append([]string{"io"}, append(ioArgs(more), f)...)...))
			r = mustOK(t, "zq-csi io zrp", zq(t, "io", "-r", "-c", fmt.Sprintf("zrp %d 3", seq(0)), f))
			sec := func(b int64) int64 { return b / 512 }
			capSec := sec(min(info.Zoned.Capacity, zs))
			wantZrp := fmt.Sprintf("start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:4, [type: 2]\n", sec(seq(0)), sec(zs), capSec, sec(seq(0)+16<<10)) +
				fmt.Sprintf("start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:14, [type: 2]\n", sec(seq(1)), sec(zs), capSec, sec(seq(1))+capSec) +
				fmt.Sprintf("start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:14, [type: 2]\n", sec(seq(2)), sec(zs), capSec, sec(seq(3)))
			if r.stdout != wantZrp {
				t.Fatalf("zrp:\n%s\nwant:\n%s", r.stdout, wantZrp)
			}
			mustOK(t, "zq-csi image check", zq(t, "image", "check", f))
			reads = append(reads,
				fmt.Sprintf("read -P 0x22 %d 8k", seq(0)), fmt.Sprintf("read -P 0x33 %d 4k", seq(0)+8<<10),
				fmt.Sprintf("read -P 0x55 %d 4k", seq(0)+12<<10), fmt.Sprintf("read -P 0 %d %d", seq(0)+16<<10, zs-16<<10),
				fmt.Sprintf("read -P 0x66 %d %d", seq(1), info.Zoned.Capacity), fmt.Sprintf("read -P 0 %d %d", seq(2), zs),
				fmt.Sprintf("read -P 0x44 %d 512", last), fmt.Sprintf("read -P 0 %d %d", last+512, info.Size-last-512))
			if info.Zoned.Capacity < zs {
				reads = append(reads, fmt.Sprintf("read -P 0 %d %d", seq(1)+info.Zoned.Capacity, zs-info.Zoned.Capacity))
			}
			// zq-csi reads them back, and so does plain qemu-io on the
			// copy with bit 5 cleared, which qemu-img check finds valid
			// but for the table's clusters.
			mustOK(t, "zq-csi io read", zq(t, append([]string{"io", "-r"}, append(ioArgs(reads), f)...)...))
			plain := clearZonedBit(t, f)
			qemuCheckLeaksOnlyTable(t, plain, l)
			mustOK(t, "qemu-io read", runTool(t, "qemu-io", append([]string{"-r", "-f", "qcow2"}, append(ioArgs(reads), plain)...)...))
			r = mustOK(t, "zq-csi io zap", zq(t, "io", "-c", fmt.Sprintf("zap -p %d 4k", seq(0)), f))
			if want := fmt.Sprintf("After zap done, the append sector is 0x%x\n", sec(seq(0)+16<<10)); r.stdout != want {
				t.Fatalf("zap -p: %q, want %q", r.stdout, want)
			}
		})
	}
}
