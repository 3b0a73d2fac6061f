package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCapabilities accepts block volumes, and mounted volumes of a zoned
// filesystem this driver formats, with a single-node access mode; the
// error says what is wrong with the others. (Whether the volume's geometry
// can hold the filesystem is checkFilesystems'.)
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return errors.New("no volume capabilities")
	}
	for _, c := range caps {
		switch {
		case c.GetMount() != nil:
			if fs := c.GetMount().GetFsType(); !knownFilesystem(fs) {
				return checkFilesystem("fs_type (csi.storage.k8s.io/fstype)", fs, zoned.Geometry{})
			}
		case c.GetBlock() == nil:
			return errors.New("a volume capability without an access type")
		}
		switch m := c.GetAccessMode().GetMode(); m {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
		default:
			return fmt.Errorf("access mode %v is not supported: a volume is a node-local image (ReadWriteOnce or ReadWriteOncePod)", m)
		}
	}
	return nil
}

func (d *Driver) topology() []*csi.Topology {
	return []*csi.Topology{{Segments: map[string]string{TopologyKey: d.cfg.NodeID}}}
}

// reachable reports whether this node satisfies the requisite topology
// (none given: any node does).
func (d *Driver) reachable(req *csi.TopologyRequirement) bool {
	if len(req.GetRequisite()) == 0 {
		return true
	}
	for _, t := range req.GetRequisite() {
		if n, ok := t.GetSegments()[TopologyKey]; ok && n == d.cfg.NodeID {
			return true
		}
	}
	return false
}

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, statusf(codes.InvalidArgument, "CreateVolume: no name")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, statusf(codes.InvalidArgument, "CreateVolume %s: %v", name, err)
	}
	params, err := ParseParameters(req.GetParameters())
	if err != nil {
		return nil, statusf(codes.InvalidArgument, "CreateVolume %s: %v", name, err)
	}
	size, g, err := params.Size(req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes())
	switch {
	case errors.Is(err, ErrOutOfRange):
		return nil, statusf(codes.OutOfRange, "CreateVolume %s: %v", name, err)
	case err != nil:
		return nil, statusf(codes.InvalidArgument, "CreateVolume %s: %v", name, err)
	}
	if err := checkFilesystems(req.GetVolumeCapabilities(), params.FsType, g); err != nil {
		return nil, statusf(codes.InvalidArgument, "CreateVolume %s: %v", name, err)
	}
	if !d.reachable(req.GetAccessibilityRequirements()) {
		return nil, statusf(codes.ResourceExhausted, "CreateVolume %s: this controller provisions on node %s only, which the requisite topology excludes", name, d.cfg.NodeID)
	}

	id := idForName(name)
	defer d.lock(id)()
	m, err := d.pool.lookup(id)
	switch {
	case err == nil:
		// The same volume if the parameters are and its size meets the
		// range (a retry, also after an expansion).
		r := req.GetCapacityRange()
		fits := m.Size >= r.GetRequiredBytes() && (r.GetLimitBytes() == 0 || m.Size <= r.GetLimitBytes())
		if m.Name != name || !fits || !maps.Equal(m.Parameters, req.GetParameters()) {
			return nil, statusf(codes.AlreadyExists, "CreateVolume %s: a volume of that name exists with size %d and other parameters (%v)", name, m.Size, m.Parameters)
		}
		v := d.csiVolume(m)
		v.ContentSource = req.GetVolumeContentSource()
		return &csi.CreateVolumeResponse{Volume: v}, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, statusf(codes.Internal, "CreateVolume %s: %v", name, err)
	}
	free, err := d.pool.free()
	if err == nil && free < size/64 {
		// The image is sparse; refuse only when even its metadata and a
		// first write would not fit.
		return nil, statusf(codes.ResourceExhausted, "CreateVolume %s: pool %s has %d bytes free", name, d.cfg.Pool, free)
	}
	var base string
	if src := req.GetVolumeContentSource(); src != nil {
		var holds int64
		var release func()
		if base, holds, release, err = d.contentBase(id, src, g); err != nil {
			return nil, err
		}
		defer release()
		if holds > size {
			return nil, statusf(codes.OutOfRange, "CreateVolume %s: its source holds %d bytes, more than the %d asked for", name, holds, size)
		}
	}
	if err := d.createImage(id, params, size, g, base); err != nil {
		if errors.Is(err, image.ErrInvalidOption) {
			return nil, statusf(codes.InvalidArgument, "CreateVolume %s: %v", name, err)
		}
		return nil, statusf(codes.Internal, "CreateVolume %s: %v", name, err)
	}
	m = &volumeMeta{ID: id, Name: name, Size: size, Parameters: req.GetParameters(), Attach: params.Attach}
	if m.Parameters == nil {
		m.Parameters = map[string]string{}
	}
	if err := d.pool.save(m); err != nil {
		os.Remove(d.pool.imagePath(id))
		return nil, statusf(codes.Internal, "CreateVolume %s: %v", name, err)
	}
	klog.InfoS("created volume", "name", name, "id", id, "size", size, "zoneSize", g.ZoneSize, "zones", g.NumZones(), "from", base)
	v := d.csiVolume(m)
	v.ContentSource = req.GetVolumeContentSource()
	return &csi.CreateVolumeResponse{Volume: v}, nil
}

// createImage creates the volume's image under a temporary name and renames
// it into place, replacing what an interrupted create left. With a base,
// the image is an overlay of it, with its zone conditions.
func (d *Driver) createImage(id string, params VolumeParams, size int64, g zoned.Geometry, base string) error {
	path := d.pool.imagePath(id)
	tmp := path + ".creating"
	conditions := volume.ConditionsPath(path)
	// A new volume starts with its base's zone conditions or none, never
	// with those an interrupted create left.
	os.Remove(tmp)
	os.Remove(conditions)
	opts := params.Spec.Options()
	opts.Size = size
	err := func() error {
		if base != "" {
			opts.BackingFile = filepath.Base(base)
			if err := volume.CopyConditions(base, path); err != nil {
				return err
			}
		}
		if _, err := volume.CreateZoned(tmp, opts, g); err != nil {
			return err
		}
		return os.Rename(tmp, path)
	}()
	if err != nil {
		os.Remove(tmp)
		os.Remove(conditions)
		return err
	}
	return syncDir(d.pool.dir)
}

func (d *Driver) csiVolume(m *volumeMeta) *csi.Volume {
	return &csi.Volume{
		VolumeId:           m.ID,
		CapacityBytes:      m.Size,
		VolumeContext:      map[string]string{ParamAttach: m.Attach},
		AccessibleTopology: d.topology(),
	}
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "DeleteVolume: no volume ID")
	}
	if checkID(id) != nil {
		// Not one of ours, so it does not exist here: deleted.
		return &csi.DeleteVolumeResponse{}, nil
	}
	defer d.lock(id)()
	if d.node != nil && d.node.staged(id) {
		return nil, statusf(codes.FailedPrecondition, "DeleteVolume %s: the volume is staged on this node", id)
	}
	// An attached image is locked by its server (in this or another
	// plugin process): refuse rather than delete it under the device.
	if busy, err := inUse(d.pool.imagePath(id)); busy {
		return nil, statusf(codes.FailedPrecondition, "DeleteVolume %s: the image is in use by its node plugin", id)
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, statusf(codes.Internal, "DeleteVolume %s: %v", id, err)
	}
	if err := d.pool.remove(id); err != nil {
		return nil, statusf(codes.Internal, "DeleteVolume %s: %v", id, err)
	}
	if err := d.collect(); err != nil {
		return nil, statusf(codes.Internal, "DeleteVolume %s: the snapshots it read through: %v", id, err)
	}
	klog.InfoS("deleted volume", "id", id)
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "ValidateVolumeCapabilities: no volume ID")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, statusf(codes.InvalidArgument, "ValidateVolumeCapabilities %s: no volume capabilities", id)
	}
	m, err := d.meta(id)
	if err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	params, g, err := m.geometry()
	if err != nil {
		return nil, statusf(codes.Internal, "ValidateVolumeCapabilities %s: %v", id, err)
	}
	if err := checkFilesystems(req.GetVolumeCapabilities(), params.FsType, g); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// meta returns a volume's metadata, or the gRPC error for a bad or
// unknown ID.
func (d *Driver) meta(id string) (*volumeMeta, error) {
	if err := checkID(id); err != nil {
		return nil, statusf(codes.NotFound, "volume %q: %v", id, err)
	}
	m, err := d.pool.lookup(id)
	if errors.Is(err, os.ErrNotExist) {
		return nil, statusf(codes.NotFound, "volume %s does not exist in pool %s", id, d.cfg.Pool)
	}
	if err != nil {
		return nil, statusf(codes.Internal, "volume %s: %v", id, err)
	}
	return m, nil
}

func (d *Driver) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	ids, err := d.pool.list()
	if err != nil {
		return nil, statusf(codes.Internal, "ListVolumes: %v", err)
	}
	start, end, next, err := page(len(ids), req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, statusf(codes.Aborted, "ListVolumes: %v", err)
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, id := range ids[start:end] {
		m, err := d.pool.lookup(id)
		if err != nil {
			continue // deleted meanwhile
		}
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: d.csiVolume(m)})
	}
	return resp, nil
}

// page is the part [start, end) of a list of n entries that a List call
// with a starting token and a maximum returns, and the token of the next
// part ("" after the last). A token is an index this plugin gave.
func page(n int, token string, max int32) (start, end int, next string, err error) {
	if token != "" {
		if start, err = strconv.Atoi(token); err != nil || start < 0 || start > n {
			return 0, 0, "", fmt.Errorf("starting token %q is not one this plugin gave", token)
		}
	}
	end = n
	if m := int(max); m > 0 && start+m < end {
		end = start + m
	}
	if end < n {
		next = strconv.Itoa(end)
	}
	return start, end, next, nil
}

func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if t := req.GetAccessibleTopology(); t != nil {
		if n, ok := t.GetSegments()[TopologyKey]; ok && n != d.cfg.NodeID {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	free, err := d.pool.free()
	if err != nil {
		return nil, statusf(codes.Internal, "GetCapacity: %v", err)
	}
	return &csi.GetCapacityResponse{AvailableCapacity: free}, nil
}

// ControllerExpandVolume adds zones to a volume that is not staged: the
// image grows by whole zones (the new ones empty).
func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, statusf(codes.InvalidArgument, "ControllerExpandVolume: no volume ID")
	}
	if req.GetCapacityRange() == nil {
		return nil, statusf(codes.InvalidArgument, "ControllerExpandVolume %s: no capacity range", id)
	}
	defer d.lock(id)()
	m, err := d.meta(id)
	if err != nil {
		return nil, err
	}
	if d.node != nil && d.node.staged(id) {
		return nil, statusf(codes.FailedPrecondition, "ControllerExpandVolume %s: the volume is staged; expand it when no pod uses it", id)
	}
	params, err := ParseParameters(m.Parameters)
	if err != nil {
		return nil, statusf(codes.Internal, "ControllerExpandVolume %s: stored parameters: %v", id, err)
	}
	size, _, err := params.Size(req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes())
	switch {
	case errors.Is(err, ErrOutOfRange):
		return nil, statusf(codes.OutOfRange, "ControllerExpandVolume %s: %v", id, err)
	case err != nil:
		return nil, statusf(codes.InvalidArgument, "ControllerExpandVolume %s: %v", id, err)
	}
	if size > m.Size {
		if busy, _ := inUse(d.pool.imagePath(id)); busy {
			return nil, statusf(codes.FailedPrecondition, "ControllerExpandVolume %s: the image is in use by its node plugin; expand it when no pod uses it", id)
		}
		if err := growImage(d.pool.imagePath(id), d.journalDir(), size); err != nil {
			return nil, statusf(codes.Internal, "ControllerExpandVolume %s: %v", id, err)
		}
		m.Size = size
		if err := d.pool.save(m); err != nil {
			return nil, statusf(codes.Internal, "ControllerExpandVolume %s: %v", id, err)
		}
		klog.InfoS("expanded volume", "id", id, "size", size)
	}
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: m.Size}, nil
}
