package driver

// BenchmarkGolden10GiB: what a golden volume costs. A 10 GiB zoned volume
// (40 zones of 256 MiB) is filled to 90% (36 zones full) once; then, in
// one run:
//
//   - read-*/source and read-*/clone: reads of the filled zones on the
//     source (its data in its own file) and on a clone of it (its data in
//     the base it reads through): their ratio is the cost of the chain;
//   - snapshot: CreateSnapshot of the filled volume, as the
//     external-snapshotter asks it;
//   - restore: CreateVolume from that snapshot;
//   - clone: CreateVolume with the volume as its content source;
//   - qemu-img-overlay: the peer, `qemu-img create -b` of an overlay on
//     the filled image, QEMU's own tool making the same kind of file.
//
//	go test -run='^$' -bench=Golden10GiB -benchtime=20x ./driver/
//
// It writes 9 GiB to a temporary directory first (tens of seconds).

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
)

func BenchmarkGolden10GiB(b *testing.B) {
	const (
		size     = 10 << 30
		zoneSize = 256 << 20
		full     = 36
	)
	// A snapshot and a clone each put one more image under the source (at
	// most 63): every op runs a fixed count.
	if bt := flag.Lookup("test.benchtime"); bt == nil || !strings.HasSuffix(bt.Value.String(), "x") {
		b.Skip("each snapshot deepens the source's chain: run with -benchtime=20x (make bench does)")
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		b.Fatalf("qemu-img not found (make deps installs qemu-utils): %v", err)
	}
	ctx := context.Background()
	pool := filepath.Join(b.TempDir(), "pool")
	d, err := New(Config{NodeID: "bench", Mode: ModeController, Pool: pool})
	if err != nil {
		b.Fatal(err)
	}
	params := map[string]string{"zone.size": "256Mi", "zone.max_open_zones": "8", "zone.max_active_zones": "8"}
	create := func(name string, src *csi.VolumeContentSource) string {
		r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeContentSource: src,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
		if err != nil {
			b.Fatal(err)
		}
		return r.Volume.VolumeId
	}
	open := func(id string) *volume.Volume {
		v, err := volume.Open(d.pool.imagePath(id), image.OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return v
	}

	golden := create("pvc-golden", nil)
	start := time.Now()
	v := open(golden)
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	for off := int64(0); off < full*zoneSize; off += int64(len(chunk)) {
		if err := v.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := v.Close(); err != nil {
		b.Fatal(err)
	}
	b.Logf("filled %d of 40 zones (%d GiB) in %v", full, full*zoneSize>>30, time.Since(start).Round(time.Millisecond))

	fromVolume := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	// An op is a pass of many reads, so that a fixed count of ops times
	// them well.
	reads := []struct {
		name   string
		size   int
		count  int
		offset func(r *rand.Rand, i int) int64
	}{
		{"read-seq-1M", 1 << 20, 256, func(r *rand.Rand, i int) int64 { return int64(i) << 20 }},
		{"read-rand-4k", 4 << 10, 16384, func(r *rand.Rand, _ int) int64 { return r.Int64N(full*zoneSize/4096) * 4096 }},
	}
	// The source first, before any snapshot: its data is in its own file.
	for _, side := range []string{"source", "clone"} {
		id := golden
		if side == "clone" {
			id = create("pvc-read-clone", fromVolume(golden))
		}
		v := open(id)
		for _, rd := range reads {
			b.Run(rd.name+"/"+side, func(b *testing.B) {
				p := make([]byte, rd.size)
				r := rand.New(rand.NewPCG(1, 2))
				b.SetBytes(int64(rd.size * rd.count))
				for b.Loop() {
					for i := range rd.count {
						if err := v.ReadAt(p, rd.offset(r, i)); err != nil {
							b.Fatal(err)
						}
					}
				}
			})
		}
		if err := v.Close(); err != nil {
			b.Fatal(err)
		}
	}

	n := 0
	var snapshot string
	b.Run("snapshot", func(b *testing.B) {
		for b.Loop() {
			n++
			r, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("golden-%d", n), SourceVolumeId: golden})
			if err != nil {
				b.Fatal(err)
			}
			snapshot = r.Snapshot.SnapshotId
		}
	})
	b.Run("restore", func(b *testing.B) {
		if snapshot == "" {
			b.Skip("no snapshot to restore")
		}
		src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapshot}}}
		for b.Loop() {
			n++
			create(fmt.Sprintf("pvc-restored-%d", n), src)
		}
	})
	b.Run("clone", func(b *testing.B) {
		for b.Loop() {
			n++
			create(fmt.Sprintf("pvc-clone-%d", n), fromVolume(golden))
		}
	})
	b.Run("qemu-img-overlay", func(b *testing.B) {
		base := d.pool.imagePath(golden)
		for b.Loop() {
			n++
			// -u: the base is a zoned image, which Debian's qemu-img
			// does not open; the overlay it writes is the same file.
			out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "qcow2",
				filepath.Join(b.TempDir(), "overlay.qcow2"), fmt.Sprint(size)).CombinedOutput()
			if err != nil {
				b.Fatalf("qemu-img create: %v\n%s", err, out)
			}
		}
	})
}
