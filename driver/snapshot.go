package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// Snapshots and clones are qcow2 backing chains in the pool. A snapshot is
// a read-only image, @<id>.qcow2, whose existence is @<id>.json ('@' is
// in no volume ID, so the names never meet a volume's). Taking it moves
// the source volume onto an empty overlay of it (image.SnapshotTo), so it
// costs a flush and a small file, whatever the volume holds. A volume
// restored from it is another overlay of it. A clone of a volume is the
// same through a hidden snapshot, @@<clone id>.qcow2, with no metadata.
//
// A snapshot's image lives as long as an image reads through it: deleting
// a snapshot removes its metadata at once and its image when the last
// overlay of it goes (collect).

func (p pool) snapshotPath(id string) string { return filepath.Join(p.dir, "@"+id+".qcow2") }
func (p pool) snapshotMetaPath(id string) string {
	return filepath.Join(p.dir, "@"+id+".json")
}
func (p pool) cloneBasePath(id string) string { return filepath.Join(p.dir, "@@"+id+".qcow2") }

// snapshotMeta is what the pool records of a snapshot.
type snapshotMeta struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Source  string `json:"source"`
	Size    int64  `json:"size"`
	Created int64  `json:"created"` // Unix nanoseconds
}

func (m *snapshotMeta) csi() *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:     m.ID,
		SourceVolumeId: m.Source,
		SizeBytes:      m.Size,
		CreationTime:   timestamppb.New(time.Unix(0, m.Created)),
		ReadyToUse:     true,
	}
}

func (p pool) lookupSnapshot(id string) (*snapshotMeta, error) {
	var m snapshotMeta
	if err := readJSON(p.snapshotMetaPath(id), &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// snapshots returns the pool's snapshots, sorted by ID.
func (p pool) snapshots() ([]*snapshotMeta, error) {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, err
	}
	var out []*snapshotMeta
	for _, e := range entries {
		id, ok := strings.CutPrefix(e.Name(), "@")
		if id, ok = strings.CutSuffix(id, ".json"); !ok || checkID(id) != nil {
			continue
		}
		if m, err := p.lookupSnapshot(id); err == nil {
			out = append(out, m)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// collect removes the snapshot images nothing needs: no metadata (deleted,
// a clone's hidden snapshot, or a leftover of an interrupted snapshot) and
// no image in the pool reading through them. Removing one may free the
// one below it, so it goes on until nothing changes.
func (p pool) collect() error {
	for {
		entries, err := os.ReadDir(p.dir)
		if err != nil {
			return err
		}
		needed := map[string]bool{}
		var candidates []string
		for _, e := range entries {
			name := e.Name()
			if !strings.HasSuffix(name, ".qcow2") {
				continue
			}
			b, err := image.BackingFile(filepath.Join(p.dir, name))
			if err != nil {
				return err // keep everything rather than guess
			}
			if b != "" {
				needed[filepath.Clean(b)] = true
			}
			if base, ok := strings.CutPrefix(name, "@"); ok {
				id := strings.TrimPrefix(strings.TrimSuffix(base, ".qcow2"), "@")
				if _, err := os.Stat(p.snapshotMetaPath(id)); errors.Is(err, os.ErrNotExist) || strings.HasPrefix(base, "@") {
					candidates = append(candidates, name)
				}
			}
		}
		removed := false
		for _, name := range candidates {
			if needed[name] {
				continue
			}
			path := filepath.Join(p.dir, name)
			for _, f := range []string{path, volume.ConditionsPath(path)} {
				if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
					return err
				}
			}
			klog.InfoS("removed a snapshot image nothing reads through any more", "image", path)
			removed = true
		}
		if !removed {
			return syncDir(p.dir)
		}
	}
}

// collectLock serializes collect with snapshots being taken and volumes
// being created on them: a snapshot image has, for a moment, neither
// metadata nor an overlay, and a snapshot's metadata may go while a
// volume is being created on it. Lock order: a snapshot's lock ("@" and
// its ID), then volume locks, then collectLock. (No ID has a space.)
const collectLock = "pool collection"

// collect is pool.collect, apart from snapshots being taken.
func (d *Driver) collect() error {
	defer d.lock(collectLock)()
	return d.pool.collect()
}

// snapshotVolume freezes volume id's present contents as the image at
// path: through its server when this node serves it, else by opening it.
// The caller holds the volume's lock and collectLock. A snapshot name
// left by an interrupted attempt as a second name of the volume's file is
// removed first; one the volume already reads through is a finished
// snapshot, kept.
func (d *Driver) snapshotVolume(id, path string) error {
	src := d.pool.imagePath(id)
	if st, err := os.Stat(path); err == nil {
		srcSt, err := os.Stat(src)
		if err != nil {
			return err
		}
		if b, err := image.BackingFile(src); err == nil && b == filepath.Base(path) {
			return nil
		}
		if !os.SameFile(st, srcSt) {
			return fmt.Errorf("%s exists and is not a snapshot of volume %s", path, id)
		}
		if err := os.Remove(path); err != nil {
			return err
		}
	}
	if d.node != nil {
		if v := d.node.get(id); v != nil {
			if v.vol == nil {
				return fmt.Errorf("volume %s is staged but not served: %v", id, v.err)
			}
			return v.vol.Snapshot(path)
		}
	}
	v, err := volume.Open(src, image.OpenOptions{JournalDir: d.journalDir()})
	if err != nil {
		return err
	}
	err = v.Snapshot(path)
	return errors.Join(err, v.Close())
}

func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	name, source := req.GetName(), req.GetSourceVolumeId()
	if name == "" {
		return nil, statusf(codes.InvalidArgument, "CreateSnapshot: no name")
	}
	if source == "" {
		return nil, statusf(codes.InvalidArgument, "CreateSnapshot %s: no source volume ID", name)
	}
	id := idForName(name)
	defer d.lock("@" + id)()
	if m, err := d.pool.lookupSnapshot(id); err == nil {
		if m.Source != source {
			return nil, statusf(codes.AlreadyExists, "CreateSnapshot %s: a snapshot of that name exists, of volume %s", name, m.Source)
		}
		return &csi.CreateSnapshotResponse{Snapshot: m.csi()}, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, statusf(codes.Internal, "CreateSnapshot %s: %v", name, err)
	}
	defer d.lock(source)()
	vm, err := d.meta(source)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	defer d.lock(collectLock)() // until the image has its metadata
	if err := d.snapshotVolume(source, d.pool.snapshotPath(id)); err != nil {
		if errors.Is(err, image.ErrUnsupported) {
			return nil, statusf(codes.ResourceExhausted, "CreateSnapshot %s: %v", name, err)
		}
		return nil, statusf(codes.Internal, "CreateSnapshot %s of volume %s: %v", name, source, err)
	}
	m := &snapshotMeta{ID: id, Name: name, Source: source, Size: vm.Size, Created: time.Now().UnixNano()}
	if err := writeJSON(d.pool.snapshotMetaPath(id), m); err != nil {
		return nil, statusf(codes.Internal, "CreateSnapshot %s: %v", name, err)
	}
	klog.InfoS("created snapshot", "name", name, "id", id, "volume", source, "took", time.Since(start))
	return &csi.CreateSnapshotResponse{Snapshot: m.csi()}, nil
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "DeleteSnapshot: no snapshot ID")
	}
	if checkID(id) != nil {
		return &csi.DeleteSnapshotResponse{}, nil // not one of ours: deleted
	}
	defer d.lock("@" + id)()
	if err := os.Remove(d.pool.snapshotMetaPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, statusf(codes.Internal, "DeleteSnapshot %s: %v", id, err)
	}
	// The metadata's removal is durable before collect removes the image:
	// a power cut must not leave a snapshot listed without its image.
	if err := syncDir(d.pool.dir); err != nil {
		return nil, statusf(codes.Internal, "DeleteSnapshot %s: %v", id, err)
	}
	if err := d.collect(); err != nil {
		return nil, statusf(codes.Internal, "DeleteSnapshot %s: %v", id, err)
	}
	if _, err := os.Stat(d.pool.snapshotPath(id)); err == nil {
		klog.InfoS("deleted snapshot; its image stays while volumes read through it", "id", id)
	} else {
		klog.InfoS("deleted snapshot", "id", id)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	all, err := d.pool.snapshots()
	if err != nil {
		return nil, statusf(codes.Internal, "ListSnapshots: %v", err)
	}
	var snaps []*snapshotMeta
	for _, m := range all {
		if (req.GetSnapshotId() == "" || m.ID == req.GetSnapshotId()) && (req.GetSourceVolumeId() == "" || m.Source == req.GetSourceVolumeId()) {
			snaps = append(snaps, m)
		}
	}
	start, end, next, err := page(len(snaps), req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, statusf(codes.Aborted, "ListSnapshots: %v", err)
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, m := range snaps[start:end] {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: m.csi()})
	}
	return resp, nil
}

// contentBase returns the snapshot image a new volume id is to be an
// overlay of, taking the hidden snapshot of a source volume, and the size
// of what it holds. It returns holding collectLock, for the caller to
// release once the overlay exists: until then nothing reads through the
// base, and collect would take it.
func (d *Driver) contentBase(id string, src *csi.VolumeContentSource, g zoned.Geometry) (base string, size int64, release func(), err error) {
	if s := src.GetSnapshot(); s != nil {
		sid := s.GetSnapshotId()
		if checkID(sid) != nil {
			return "", 0, nil, statusf(codes.NotFound, "snapshot %q does not exist", sid)
		}
		release := d.lock(collectLock)
		m, err := d.pool.lookupSnapshot(sid)
		switch {
		case errors.Is(err, os.ErrNotExist):
			err = statusf(codes.NotFound, "snapshot %s does not exist in pool %s (a snapshot lives on the node of its source volume)", sid, d.cfg.Pool)
		case err != nil:
			err = statusf(codes.Internal, "snapshot %s: %v", sid, err)
		}
		if err != nil {
			release()
			return "", 0, nil, err
		}
		return d.pool.snapshotPath(sid), m.Size, release, nil
	}
	if v := src.GetVolume(); v != nil {
		vid := v.GetVolumeId()
		if checkID(vid) != nil {
			return "", 0, nil, statusf(codes.NotFound, "volume %q does not exist", vid)
		}
		// The caller holds id's lock: waiting for vid's could wait for
		// a clone of id into vid, which waits for id's.
		unlockSource, ok := d.tryLock(vid)
		if !ok {
			return "", 0, nil, statusf(codes.Aborted, "cloning volume %s: an operation on it is in progress", vid)
		}
		defer unlockSource()
		m, err := d.meta(vid)
		if err != nil {
			return "", 0, nil, err
		}
		if err := checkCloneGeometry(vid, m, g); err != nil {
			return "", 0, nil, err
		}
		release := d.lock(collectLock)
		base := d.pool.cloneBasePath(id)
		if err := d.snapshotVolume(vid, base); err != nil {
			release()
			if errors.Is(err, image.ErrUnsupported) {
				return "", 0, nil, statusf(codes.ResourceExhausted, "cloning volume %s: %v", vid, err)
			}
			return "", 0, nil, statusf(codes.Internal, "cloning volume %s: %v", vid, err)
		}
		return base, m.Size, release, nil
	}
	return "", 0, nil, statusf(codes.InvalidArgument, "a volume content source that is neither a snapshot nor a volume")
}

// checkCloneGeometry refuses a clone of volume src (with metadata m) whose
// zones the StorageClass's geometry g does not keep: only the limits may
// differ.
func checkCloneGeometry(src string, m *volumeMeta, g zoned.Geometry) error {
	_, sg, err := m.geometry()
	if err != nil {
		return statusf(codes.Internal, "volume %s: %v", src, err)
	}
	switch {
	case sg.ZoneSize != g.ZoneSize:
		return statusf(codes.InvalidArgument, "%s %d: the source volume %s has zones of %d bytes", "zone.size", g.ZoneSize, src, sg.ZoneSize)
	case sg.ZoneCapacity != g.ZoneCapacity:
		return statusf(codes.InvalidArgument, "%s %d: the source volume %s has a zone capacity of %d", "zone.capacity", g.ZoneCapacity, src, sg.ZoneCapacity)
	case sg.ConventionalZones != g.ConventionalZones:
		return statusf(codes.InvalidArgument, "%s %d: the source volume %s has %d", "zone.conventional_zones", g.ConventionalZones, src, sg.ConventionalZones)
	}
	return nil
}
