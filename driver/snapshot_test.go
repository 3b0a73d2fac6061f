package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// zoneOneState is what zone 1 of a test volume (4 MiB zones) holds: its
// write pointer and its first bytes.
func zoneOneState(t *testing.T, v *volume.Volume, n int) (int64, []byte) {
	t.Helper()
	z, err := v.Zones().ZoneAt(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, n)
	if err := v.ReadAt(p, 4<<20); err != nil {
		t.Fatal(err)
	}
	return z.WritePointer, p
}

func openRO(t *testing.T, path string) *volume.Volume {
	t.Helper()
	v, err := volume.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

func TestSnapshotsAndClonesKeepDataAndWritePointers(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	src := e.create(t, "pvc-src", 16<<20)
	staging := e.stage(t, src.VolumeId)
	live := e.d.node.get(src.VolumeId).vol

	first := bytes.Repeat([]byte{0xa1}, 1<<20)
	second := bytes.Repeat([]byte{0xb2}, 1<<20)
	if err := live.WriteAt(first, 4<<20); err != nil {
		t.Fatal(err)
	}
	snapReq := &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: src.VolumeId}
	snap, err := e.d.CreateSnapshot(ctx, snapReq)
	if err != nil {
		t.Fatal(err)
	}
	s := snap.Snapshot
	if !s.ReadyToUse || s.SourceVolumeId != src.VolumeId || s.SnapshotId == "" || s.CreationTime.AsTime().IsZero() || s.SizeBytes != 16<<20 {
		t.Fatalf("snapshot %+v", s)
	}
	again, err := e.d.CreateSnapshot(ctx, snapReq)
	if err != nil || again.Snapshot.SnapshotId != s.SnapshotId || !again.Snapshot.CreationTime.AsTime().Equal(s.CreationTime.AsTime()) {
		t.Fatalf("retry: %v %+v", err, again)
	}
	other := e.create(t, "pvc-other", 16<<20)
	_, err = e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: other.VolumeId})
	wantCode(t, err, codes.AlreadyExists, "pvc-src")

	// The volume goes on after its snapshot, in service all along.
	if err := live.WriteAt(second, 5<<20); err != nil {
		t.Fatal(err)
	}

	restore := func(name string, src *csi.VolumeContentSource, params map[string]string) (*csi.Volume, error) {
		r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeContentSource: src,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
		if err != nil {
			return nil, err
		}
		return r.Volume, nil
	}
	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.SnapshotId}}}
	restored, err := restore("pvc-restored", fromSnap, zoneParams)
	if err != nil {
		t.Fatal(err)
	}
	if restored.ContentSource.GetSnapshot().GetSnapshotId() != s.SnapshotId {
		t.Fatalf("content source %v", restored.ContentSource)
	}
	wp, data := zoneOneState(t, openRO(t, e.d.pool.imagePath(restored.VolumeId)), 1<<20)
	if wp != 5<<20 || !bytes.Equal(data, first) {
		t.Fatalf("restored: zone 1 write pointer %#x, data right %v; want %#x, true", wp, bytes.Equal(data, first), 5<<20)
	}

	fromVol := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.VolumeId}}}
	limits := map[string]string{"zone.size": "4Mi", "zone.conventional_zones": "1", "zone.max_open_zones": "2", "zone.max_active_zones": "3"}
	clone, err := restore("pvc-clone", fromVol, limits)
	if err != nil {
		t.Fatal(err)
	}
	cv := openRO(t, e.d.pool.imagePath(clone.VolumeId))
	wp, data = zoneOneState(t, cv, 2<<20)
	if wp != 6<<20 || !bytes.Equal(data, append(append([]byte(nil), first...), second...)) {
		t.Fatalf("clone: zone 1 write pointer %#x; want %#x and both writes", wp, 6<<20)
	}
	if g := cv.Zones().Geometry(); g.MaxOpenZones != 2 || g.MaxActiveZones != 3 {
		t.Fatalf("the clone's limits are %d/%d, not its class's 2/3", g.MaxOpenZones, g.MaxActiveZones)
	}

	// Refusals.
	_, err = restore("pvc-bad-geometry", fromVol, map[string]string{"zone.size": "8Mi"})
	wantCode(t, err, codes.InvalidArgument, "zone.size")
	_, err = restore("pvc-no-snap", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "non-existing-snapshot-id"}}}, zoneParams)
	wantCode(t, err, codes.NotFound, "non-existing-snapshot-id")
	_, err = restore("pvc-no-vol", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: "pvc-nope"}}}, zoneParams)
	wantCode(t, err, codes.NotFound, "pvc-nope")

	// Listing: by ID, by source, none, and in pages.
	for _, n := range []string{"snap-2", "snap-3"} {
		if _, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: n, SourceVolumeId: other.VolumeId}); err != nil {
			t.Fatal(err)
		}
	}
	list := func(req *csi.ListSnapshotsRequest) []string {
		r, err := e.d.ListSnapshots(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, en := range r.Entries {
			ids = append(ids, en.Snapshot.SnapshotId)
		}
		if r.NextToken != "" {
			ids = append(ids, "next:"+r.NextToken)
		}
		return ids
	}
	for _, c := range []struct {
		req  *csi.ListSnapshotsRequest
		want string
	}{
		{&csi.ListSnapshotsRequest{}, "snap-1 snap-2 snap-3"},
		{&csi.ListSnapshotsRequest{SnapshotId: "snap-2"}, "snap-2"},
		{&csi.ListSnapshotsRequest{SnapshotId: "none-exist-id"}, ""},
		{&csi.ListSnapshotsRequest{SourceVolumeId: other.VolumeId}, "snap-2 snap-3"},
		{&csi.ListSnapshotsRequest{MaxEntries: 2}, "snap-1 snap-2 next:2"},
		{&csi.ListSnapshotsRequest{StartingToken: "2"}, "snap-3"},
	} {
		if got := strings.Join(list(c.req), " "); got != c.want {
			t.Errorf("ListSnapshots(%v) = %q, want %q", c.req, got, c.want)
		}
	}

	// Deleting: the snapshot goes at once; its image stays while any
	// volume reads through it, and goes with the last.
	for _, id := range []string{"snap-1", "reallyfakesnapshotid", "snap-2", "snap-3"} {
		if _, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if got := list(&csi.ListSnapshotsRequest{}); len(got) != 0 {
		t.Fatalf("listed after deletion: %v", got)
	}
	if _, err := os.Stat(e.d.pool.snapshotPath("snap-1")); err != nil {
		t.Fatalf("the image of a snapshot volumes read through is gone: %v", err)
	}
	wp, data = zoneOneState(t, live, 2<<20)
	if wp != 6<<20 || !bytes.Equal(data[:1<<20], first) {
		t.Fatal("the source volume changed when its snapshot was deleted")
	}
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: src.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{restored.VolumeId, src.VolumeId, other.VolumeId} {
		if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	// The clone still reads what it was made with.
	wp, data = zoneOneState(t, cv, 2<<20)
	if wp != 6<<20 || !bytes.Equal(data[1<<20:], second) {
		t.Fatal("the clone changed when its source was deleted")
	}
	cv.Close()
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: clone.VolumeId}); err != nil {
		t.Fatal(err)
	}
	left, _ := filepath.Glob(filepath.Join(e.d.pool.dir, "*"))
	if len(left) != 0 {
		t.Fatalf("left in the pool after every volume and snapshot was deleted: %v", left)
	}
}

func createFrom(ctx context.Context, d *Driver, name string, src *csi.VolumeContentSource) (*csi.Volume, error) {
	r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: zoneParams, VolumeContentSource: src,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	if err != nil {
		return nil, err
	}
	return r.Volume, nil
}

// A clone whose source is busy is refused at once, to be retried: waiting
// for the source's lock while holding the clone's could wait forever.
func TestCloneOfABusyVolumeIsAborted(t *testing.T) {
	e := newTestDriver(t)
	src := e.create(t, "pvc-src", 16<<20)
	release := e.d.lock(src.VolumeId)
	defer release()
	done := make(chan error, 1)
	go func() {
		_, err := createFrom(context.Background(), e.d, "pvc-clone",
			&csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.VolumeId}}})
		done <- err
	}()
	select {
	case err := <-done:
		wantCode(t, err, codes.Aborted, src.VolumeId)
	case <-time.After(time.Minute):
		t.Fatal("the clone waits for its busy source")
	}
}

// Deleting a source while a volume is being created from it leaves either
// no new volume (NotFound) or one whose backing chain is whole: the
// collector never takes a base between its snapshot and its overlay.
func TestDeletingASourceWhileCreatingFromItLeavesAWholeChain(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name   string
		source func(e *testEnv, src *csi.Volume) *csi.VolumeContentSource
		remove func(e *testEnv, src *csi.Volume) error
	}{
		{
			name: "snapshot",
			source: func(e *testEnv, src *csi.Volume) *csi.VolumeContentSource {
				s, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-" + src.VolumeId, SourceVolumeId: src.VolumeId})
				if err != nil {
					t.Fatal(err)
				}
				return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.Snapshot.SnapshotId}}}
			},
			remove: func(e *testEnv, src *csi.Volume) error {
				if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src.VolumeId}); err != nil {
					return err
				}
				_, err := e.d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: idForName("snap-" + src.VolumeId)})
				return err
			},
		},
		{
			name: "volume",
			source: func(e *testEnv, src *csi.Volume) *csi.VolumeContentSource {
				return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.VolumeId}}}
			},
			remove: func(e *testEnv, src *csi.Volume) error {
				_, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src.VolumeId})
				return err
			},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newTestDriver(t)
			want := bytes.Repeat([]byte{0xc3}, 64<<10)
			created := 0
			for i := range 8 {
				src := e.create(t, fmt.Sprintf("pvc-src-%d", i), 16<<20)
				v, err := volume.Open(e.d.pool.imagePath(src.VolumeId), image.OpenOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if err := errors.Join(v.WriteAt(want, 4<<20), v.Close()); err != nil {
					t.Fatal(err)
				}
				content := c.source(e, src)
				removed := make(chan error, 1)
				go func() { removed <- c.remove(e, src) }()
				nv, err := createFrom(ctx, e.d, fmt.Sprintf("pvc-new-%d", i), content)
				if err := <-removed; err != nil {
					t.Fatal(err)
				}
				if status.Code(err) == codes.NotFound || status.Code(err) == codes.Aborted {
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				created++
				if _, data := zoneOneState(t, openRO(t, e.d.pool.imagePath(nv.VolumeId)), len(want)); !bytes.Equal(data, want) {
					t.Fatalf("volume %d does not read its source's data", i)
				}
			}
			t.Logf("%d of 8 volumes created before their source went", created)
		})
	}
}

// A clone cut short after its hidden snapshot, and one whose retry never
// came: a restarted plugin keeps the base the source now reads through and
// removes a base nothing reads through.
func TestRestartCollectsOnlyUnusedSnapshotImages(t *testing.T) {
	e := newTestDriver(t)
	src := e.create(t, "pvc-src", 16<<20)
	kept := e.d.pool.cloneBasePath("pvc-cut-short")
	if err := e.d.snapshotVolume(src.VolumeId, kept); err != nil {
		t.Fatal(err)
	}
	orphan := e.d.pool.cloneBasePath("pvc-never-retried")
	if _, err := volume.CreateZoned(orphan, image.CreateOptions{Size: 16 << 20}, mustGeometry(t)); err != nil {
		t.Fatal(err)
	}
	e.restart(t)
	if _, err := os.Stat(kept); err != nil {
		t.Fatalf("the base a volume reads through: %v", err)
	}
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the base nothing reads through is still there: %v", err)
	}
}

func mustGeometry(t *testing.T) zoned.Geometry {
	t.Helper()
	p, err := ParseParameters(zoneParams)
	if err != nil {
		t.Fatal(err)
	}
	_, g, err := p.Size(16<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// A CreateSnapshot cut short after the volume moved onto its overlay, and
// before the snapshot's metadata was written, is finished by its retry:
// the same image, not a second one under it.
func TestCreateSnapshotRetryFinishesAnInterruptedOne(t *testing.T) {
	e := newTestDriver(t)
	src := e.create(t, "pvc-src", 16<<20)
	id := idForName("snap-cut")
	if err := e.d.snapshotVolume(src.VolumeId, e.d.pool.snapshotPath(id)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "snap-cut", SourceVolumeId: src.VolumeId}); err != nil {
		t.Fatal(err)
	}
	backing, err := image.BackingFile(e.d.pool.imagePath(src.VolumeId))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Base(e.d.pool.snapshotPath(id)); backing != want {
		t.Fatalf("the volume reads through %q, not the interrupted snapshot %q", backing, want)
	}
	if b, err := image.BackingFile(e.d.pool.snapshotPath(id)); err != nil || b != "" {
		t.Fatalf("the snapshot has a backing file %q (%v): the retry took a second snapshot", b, err)
	}
}

// A volume whose create from a snapshot fails leaves no zone conditions
// behind for a later volume of that name.
func TestFailedRestoreLeavesNoZoneConditions(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	src := e.create(t, "pvc-src", 16<<20)
	v, err := volume.Open(e.d.pool.imagePath(src.VolumeId), image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(v.Backend.(*volume.Zoned).SetCondition(2, zoned.ReadOnly), v.Close()); err != nil {
		t.Fatal(err)
	}
	snap, err := e.d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-c", SourceVolumeId: src.VolumeId})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-bad", Parameters: map[string]string{"zone.size": "8Mi"},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}},
		CapacityRange:       &csi.CapacityRange{RequiredBytes: 16 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	if err == nil {
		t.Fatal("a restore with another zone size succeeded")
	}
	if _, err := os.Stat(volume.ConditionsPath(e.d.pool.imagePath(idForName("pvc-bad")))); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed restore left zone conditions: %v", err)
	}
}
