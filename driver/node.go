package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/faultctl"
	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// stagedVolume is a volume this node serves. Its record (the exported
// fields) is kept under the state directory from stage to unstage.
type stagedVolume struct {
	ID          string   `json:"id"`
	Image       string   `json:"image"`
	Backend     string   `json:"backend"`
	Device      string   `json:"device"`
	StagingPath string   `json:"stagingPath"`
	Targets     []string `json:"targets,omitempty"`
	// Scheduler is the StorageClass's queue.scheduler, set again on the
	// device whenever it is attached or taken back.
	Scheduler string `json:"scheduler,omitempty"`
	// SingleWriter is the target a SINGLE_NODE_SINGLE_WRITER publish holds:
	// while it does, the volume is published nowhere else.
	SingleWriter string `json:"singleWriter,omitempty"`
	// FsType is the filesystem mounted at StagingPath (a Filesystem
	// volume), or "" for a Block volume.
	FsType string `json:"fsType,omitempty"`
	// Faults and Volatile are the StorageClass's faults and cache=volatile,
	// armed whenever the image is opened; Claim is the volume's claim,
	// namespace/name, whose FaultsAnnotation the node applies.
	Faults   string `json:"faults,omitempty"`
	Volatile bool   `json:"volatile,omitempty"`
	Claim    string `json:"claim,omitempty"`

	vol *volume.Volume
	dev Device
	err error // why the volume is not being served (re-adoption failed)
	// annotation is the claim's faults annotation last applied, and
	// annotationErr why it was refused.
	annotation    string
	annotationErr error
}

// nodeState is the node service's volumes and where their records live.
type nodeState struct {
	dir      string // records: <dir>/volumes/<id>.json
	journals string // the images' redo journals
	attacher Attacher
	mounter  *mount.SafeFormatAndMount

	faults *faultctl.Server

	mu      sync.Mutex
	volumes map[string]*stagedVolume
}

func newNodeState(stateDir, journals string, a Attacher, m *mount.SafeFormatAndMount) (*nodeState, error) {
	n := &nodeState{dir: filepath.Join(stateDir, "volumes"), journals: journals,
		attacher: a, mounter: m, volumes: map[string]*stagedVolume{}, faults: faultctl.NewServer()}
	if err := os.MkdirAll(n.dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	return n, nil
}

func (n *nodeState) recordPath(id string) string { return filepath.Join(n.dir, id+".json") }

func (n *nodeState) get(id string) *stagedVolume {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.volumes[id]
}

func (n *nodeState) staged(id string) bool { return n.get(id) != nil }

func (n *nodeState) count() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.volumes)
}

func (n *nodeState) put(v *stagedVolume) error {
	if err := writeJSON(n.recordPath(v.ID), v); err != nil {
		return err
	}
	n.mu.Lock()
	n.volumes[v.ID] = v
	n.mu.Unlock()
	return nil
}

// drop forgets a volume: its record first, so that a failure leaves it
// known (and the unstage can be retried).
func (n *nodeState) drop(id string) error {
	if err := os.Remove(n.recordPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := syncDir(n.dir); err != nil {
		return err
	}
	n.mu.Lock()
	delete(n.volumes, id)
	n.mu.Unlock()
	return nil
}

// openVolume opens a volume's image read-write with the node's journal
// (replaying what a killed plugin left).
func (n *nodeState) openVolume(path string) (*volume.Volume, error) {
	v, err := volume.Open(path, image.OpenOptions{JournalDir: n.journals})
	if err != nil {
		return nil, err
	}
	if r := v.Img.Info().JournalReplayed; r > 0 {
		klog.InfoS("replayed the image's journal", "image", path, "batches", r)
	}
	return v, nil
}

// flushAll makes every served image durable (the plugin is exiting; its
// devices stay, for the next plugin to take back).
func (d *Driver) flushAll() {
	d.node.mu.Lock()
	ids := slices.Sorted(maps.Keys(d.node.volumes))
	d.node.mu.Unlock()
	for _, id := range ids {
		unlock := d.lock(id)
		if v := d.node.get(id); v != nil && v.vol != nil {
			if err := v.vol.Flush(); err != nil {
				klog.ErrorS(err, "flushing a volume at exit", "volume", id)
			}
		}
		unlock()
	}
}

// readopt takes back the volumes a previous plugin process staged: their
// devices wait for a server (ublk user recovery, nbd dead-connection
// timeout), and the pods using them must not see an error. A record whose
// device is gone (the node rebooted) is dropped: the next NodeStageVolume
// attaches the volume anew.
func (d *Driver) readopt() {
	entries, err := os.ReadDir(d.node.dir)
	if err != nil {
		klog.ErrorS(err, "reading the node state")
		return
	}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || checkID(id) != nil {
			continue
		}
		v := &stagedVolume{}
		if err := readJSON(d.node.recordPath(id), v); err != nil {
			klog.ErrorS(err, "unreadable volume record", "volume", id)
			continue
		}
		d.node.mu.Lock()
		d.node.volumes[id] = v
		d.node.mu.Unlock()
		switch err := d.takeBack(v); {
		case errors.Is(err, ErrGone):
			klog.InfoS("a staged volume's device is gone; forgetting the record", "volume", id, "device", v.Device)
			if err := d.node.drop(id); err != nil {
				klog.ErrorS(err, "dropping the record", "volume", id)
			}
		case err != nil:
			klog.ErrorS(err, "could not take back a staged volume; it stays abnormal until staged again or unstaged", "volume", id, "device", v.Device)
		default:
			klog.InfoS("took back a staged volume", "volume", id, "device", v.Device)
		}
	}
}

// takeBack opens a recorded volume's image (replaying its journal) and
// takes its device back; on failure v.err says why.
func (d *Driver) takeBack(v *stagedVolume) error {
	if v.vol == nil {
		if v.vol, v.err = d.node.openVolume(v.Image); v.err != nil {
			v.vol = nil
			return v.err
		}
		if v.err = d.armFaults(v); v.err != nil {
			v.vol.Close()
			v.vol = nil
			return v.err
		}
	}
	dev, err := d.node.attacher.Recover(v.vol, v.Backend, v.Device)
	if err != nil {
		d.node.faults.Remove(v.ID)
		v.vol.Close()
		v.vol, v.err = nil, err
		return err
	}
	v.dev, v.err = dev, nil
	if err := setScheduler(sysfsRoot, dev.Path(), v.Scheduler); err != nil {
		klog.ErrorS(err, "setting the I/O scheduler of a taken-back volume", "volume", v.ID)
	}
	if v.Device != dev.Path() {
		v.Device = dev.Path()
		if err := d.node.put(v); err != nil {
			klog.ErrorS(err, "updating the volume record", "volume", v.ID)
		}
	}
	return nil
}

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_VOLUME_CONDITION,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID, MaxVolumesPerNode: d.cfg.MaxVolumes,
		AccessibleTopology: d.topology()[0]}, nil
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, statusf(codes.InvalidArgument, "NodeStageVolume: no volume ID")
	case staging == "":
		return nil, statusf(codes.InvalidArgument, "NodeStageVolume %s: no staging target path", id)
	case req.GetVolumeCapability() == nil:
		return nil, statusf(codes.InvalidArgument, "NodeStageVolume %s: no volume capability", id)
	}
	if err := checkCapabilities([]*csi.VolumeCapability{req.GetVolumeCapability()}); err != nil {
		return nil, statusf(codes.InvalidArgument, "NodeStageVolume %s: %v", id, err)
	}
	defer d.lock(id)()
	if v := d.node.get(id); v != nil {
		if v.StagingPath != staging {
			return nil, statusf(codes.FailedPrecondition, "NodeStageVolume %s: already staged at %s", id, v.StagingPath)
		}
		if v.err == nil {
			return &csi.NodeStageVolumeResponse{}, nil
		}
		// A restart could not take it back: try again.
		switch err := d.takeBack(v); {
		case err == nil:
			klog.InfoS("took back a staged volume", "volume", id, "device", v.Device)
			return &csi.NodeStageVolumeResponse{}, nil
		case !errors.Is(err, ErrGone):
			return nil, statusf(codes.Unavailable, "NodeStageVolume %s: the volume's device %s is not served and could not be taken back: %v", id, v.Device, err)
		}
		if err := d.node.drop(id); err != nil {
			return nil, statusf(codes.Internal, "NodeStageVolume %s: %v", id, err)
		}
	}
	m, err := d.meta(id)
	if err != nil {
		return nil, err
	}
	var fstype string
	if mnt := req.GetVolumeCapability().GetMount(); mnt != nil {
		params, g, err := m.geometry()
		if err != nil {
			return nil, statusf(codes.Internal, "NodeStageVolume %s: %v", id, err)
		}
		var key string
		fstype, key = fsTypeOf(mnt.GetFsType(), params.FsType)
		if err := checkFilesystem(key, fstype, g); err != nil {
			return nil, statusf(codes.InvalidArgument, "NodeStageVolume %s: %v", id, err)
		}
	}
	if int64(d.node.count()) >= d.cfg.MaxVolumes {
		return nil, statusf(codes.ResourceExhausted, "NodeStageVolume %s: %d volumes staged, the most this node takes", id, d.cfg.MaxVolumes)
	}
	backend := req.GetVolumeContext()[ParamAttach]
	if backend == "" {
		backend = m.Attach
	}
	path := d.pool.imagePath(id)
	vol, err := d.node.openVolume(path)
	if err != nil {
		return nil, statusf(codes.Internal, "NodeStageVolume %s: opening %s: %v", id, path, err)
	}
	// The record comes first, without a device: if the plugin dies during
	// the attach, the next one finds the device by the image's tag.
	v := &stagedVolume{ID: id, Image: path, Backend: backend, StagingPath: staging, Scheduler: m.Parameters[ParamScheduler], FsType: fstype,
		Faults: m.Parameters[ParamFaults], Volatile: m.Parameters[ParamCache] == CacheVolatile, vol: vol}
	if ns, name := m.Parameters[paramClaimNamespace], m.Parameters[paramClaimName]; ns != "" && name != "" {
		v.Claim = ns + "/" + name
	}
	if err := d.armFaults(v); err != nil {
		vol.Close()
		return nil, statusf(codes.Internal, "NodeStageVolume %s: %v", id, err)
	}
	if err := writeJSON(d.node.recordPath(id), v); err != nil {
		d.node.faults.Remove(id)
		vol.Close()
		return nil, statusf(codes.Internal, "NodeStageVolume %s: %v", id, err)
	}
	dev, err := d.node.attacher.Attach(vol, backend)
	if err != nil {
		d.node.faults.Remove(id)
		vol.Close()
		d.node.drop(id)
		return nil, statusf(codes.Internal, "NodeStageVolume %s: attaching through %s: %v", id, backend, err)
	}
	v.Device, v.dev = dev.Path(), dev
	code := codes.Internal
	err = setScheduler(sysfsRoot, v.Device, v.Scheduler)
	if err == nil && fstype != "" {
		code, err = stageFilesystem(d.node.mounter, v.Device, staging, fstype, req.GetVolumeCapability().GetMount().GetMountFlags(), writtenZones(vol))
	}
	if err == nil {
		err = d.node.put(v)
	}
	if err != nil {
		if fstype != "" {
			unmountStaging(d.node.mounter, staging)
		}
		dev.Detach()
		d.node.faults.Remove(id)
		vol.Close()
		d.node.drop(id)
		return nil, statusf(code, "NodeStageVolume %s: %v", id, err)
	}
	klog.InfoS("staged volume", "volume", id, "device", v.Device, "backend", backend, "fsType", fstype)
	return &csi.NodeStageVolumeResponse{}, nil
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, statusf(codes.InvalidArgument, "NodeUnstageVolume: no volume ID")
	case staging == "":
		return nil, statusf(codes.InvalidArgument, "NodeUnstageVolume %s: no staging target path", id)
	}
	defer d.lock(id)()
	v := d.node.get(id)
	if v == nil {
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if len(v.Targets) > 0 {
		return nil, statusf(codes.FailedPrecondition, "NodeUnstageVolume %s: still published at %s", id, strings.Join(v.Targets, ", "))
	}
	// The volume's faults end with its use: its teardown (unmount, the
	// device's sync, the image's flush) must not fail on them.
	d.node.faults.Remove(id)
	// Each step is undone once, so that a retry after a failure goes on
	// from where this one stopped.
	if v.FsType != "" {
		if err := unmountStaging(d.node.mounter, v.StagingPath); err != nil {
			return nil, statusf(codes.Internal, "NodeUnstageVolume %s: %v", id, err)
		}
	}
	var err error
	if v.dev != nil {
		err = v.dev.Detach()
	} else {
		// Never taken back: remove the device the dead plugin left.
		err = d.node.attacher.Forget(v.Device, v.Image)
	}
	if err != nil {
		return nil, statusf(codes.Internal, "NodeUnstageVolume %s: detaching %s: %v", id, v.Device, err)
	}
	v.dev = nil
	if v.vol != nil {
		if err := v.vol.Close(); err != nil {
			return nil, statusf(codes.Internal, "NodeUnstageVolume %s: closing the image: %v", id, err)
		}
		v.vol = nil
	}
	if err := d.node.drop(id); err != nil {
		return nil, statusf(codes.Internal, "NodeUnstageVolume %s: %v", id, err)
	}
	klog.InfoS("unstaged volume", "volume", id, "device", v.Device)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, statusf(codes.InvalidArgument, "NodePublishVolume: no volume ID")
	case target == "":
		return nil, statusf(codes.InvalidArgument, "NodePublishVolume %s: no target path", id)
	case req.GetVolumeCapability() == nil:
		return nil, statusf(codes.InvalidArgument, "NodePublishVolume %s: no volume capability", id)
	case !filepath.IsAbs(target):
		return nil, statusf(codes.InvalidArgument, "NodePublishVolume %s: target path %q is not absolute", id, target)
	}
	if err := checkCapabilities([]*csi.VolumeCapability{req.GetVolumeCapability()}); err != nil {
		return nil, statusf(codes.InvalidArgument, "NodePublishVolume %s: %v", id, err)
	}
	defer d.lock(id)()
	v := d.node.get(id)
	if v == nil {
		return nil, statusf(codes.FailedPrecondition, "NodePublishVolume %s: the volume is not staged on this node", id)
	}
	if v.err != nil {
		return nil, statusf(codes.FailedPrecondition, "NodePublishVolume %s: the volume is not being served: %v", id, v.err)
	}
	if slices.Contains(v.Targets, target) {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	// CSI: a SINGLE_NODE_SINGLE_WRITER volume is published at one target
	// path at a time; the other modes may be published at several.
	single := req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	switch {
	case v.SingleWriter != "":
		return nil, statusf(codes.FailedPrecondition, "NodePublishVolume %s: published single-writer at %s", id, v.SingleWriter)
	case single && len(v.Targets) > 0:
		return nil, statusf(codes.FailedPrecondition, "NodePublishVolume %s: a single-writer publish, but the volume is published at %s", id, strings.Join(v.Targets, ", "))
	}
	mounted := req.GetVolumeCapability().GetMount() != nil
	switch {
	case mounted && v.FsType == "":
		return nil, statusf(codes.FailedPrecondition, "NodePublishVolume %s: staged as a block volume, published as volumeMode Filesystem", id)
	case !mounted && v.FsType != "":
		return nil, statusf(codes.FailedPrecondition, "NodePublishVolume %s: staged with a %s filesystem, published as volumeMode Block", id, v.FsType)
	}
	publish := publishDevice
	source := v.Device
	if mounted {
		publish, source = publishFilesystem, v.StagingPath
	}
	if err := publish(d.node.mounter, source, target, req.GetReadonly()); err != nil {
		return nil, statusf(codes.Internal, "NodePublishVolume %s: %v", id, err)
	}
	v.Targets = append(v.Targets, target)
	if single {
		v.SingleWriter = target
	}
	if err := d.node.put(v); err != nil {
		return nil, statusf(codes.Internal, "NodePublishVolume %s: %v", id, err)
	}
	klog.InfoS("published volume", "volume", id, "device", v.Device, "target", target)
	return &csi.NodePublishVolumeResponse{}, nil
}

// publishDevice bind-mounts the device node on target, a file it creates
// (the CO creates the parent directory). It never follows a symlink at the
// target, and removes on failure only a file it created.
func publishDevice(m mount.Interface, dev, target string, readOnly bool) error {
	created := true
	f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_RDONLY|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, os.ErrExist) {
		// Left by an earlier, interrupted publish: only a plain file will do.
		fi, lerr := os.Lstat(target)
		if lerr != nil || !fi.Mode().IsRegular() {
			return fmt.Errorf("target %s exists and is not a plain file", target)
		}
		created, err = false, nil
	} else if err == nil {
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("creating the target file: %w", err)
	}
	opts := []string{"bind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	if err := m.Mount(dev, target, "", opts); err != nil {
		if created {
			os.Remove(target)
		}
		return fmt.Errorf("bind-mounting %s on %s: %w", dev, target, err)
	}
	return nil
}

// stageFilesystem mounts dev's filesystem at staging, formatting the
// device with fstype first when it holds nothing blkid recognises and no
// sequential zone has been written (written counts those that have). A
// device that holds anything else (another filesystem, a partition table,
// data in its zones) is never formatted: FailedPrecondition. The code goes
// with the error.
func stageFilesystem(m *mount.SafeFormatAndMount, dev, staging, fstype string, flags []string, written int) (codes.Code, error) {
	existing, err := m.GetDiskFormat(dev)
	switch {
	case err != nil:
		return codes.Internal, fmt.Errorf("reading what %s holds: %w", dev, err)
	case existing != "" && existing != fstype:
		return codes.FailedPrecondition, fmt.Errorf("the volume holds %s, not the %s its capability asks for: a volume with data is never reformatted", existing, fstype)
	case existing == "" && written > 0:
		return codes.FailedPrecondition, fmt.Errorf("the volume holds no filesystem but %d of its sequential zones hold data (a Block volume's?): it is not formatted over them", written)
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return codes.Internal, fmt.Errorf("staging path: %w", err)
	}
	if existing == "" {
		klog.InfoS("formatting a new Filesystem volume", "device", dev, "fsType", fstype, "options", mkfsOptions[fstype])
	}
	if err := m.FormatAndMountSensitiveWithFormatOptions(dev, staging, fstype, flags, nil, mkfsOptions[fstype]); err != nil {
		return codes.Internal, err
	}
	if err := growFilesystem(m, dev, staging, fstype, flags); err != nil {
		return codes.Internal, err
	}
	return codes.OK, nil
}

// growFilesystem grows a btrfs mounted at staging to the whole of dev: a
// volume restored from a snapshot, or cloned, to a larger size holds its
// source's smaller filesystem. btrfs grows online, in zoned mode too.
// f2fs grows only offline and not on zoned devices (resize.f2fs): it keeps
// its size.
func growFilesystem(m *mount.SafeFormatAndMount, dev, staging, fstype string, flags []string) error {
	if fstype != FsBtrfs || slices.Contains(flags, "ro") {
		return nil
	}
	r := mount.NewResizeFs(m.Exec)
	need, err := r.NeedResize(dev, staging)
	if err != nil {
		return fmt.Errorf("comparing the filesystem's size with %s's: %w", dev, err)
	}
	if !need {
		return nil
	}
	klog.InfoS("growing the filesystem to the volume's size", "device", dev, "fsType", fstype)
	if _, err := r.Resize(dev, staging); err != nil {
		return fmt.Errorf("growing the filesystem to %s's size: %w", dev, err)
	}
	return nil
}

// writtenZones counts the sequential zones of vol whose write pointer has
// left the zone's start.
func writtenZones(vol *volume.Volume) int {
	zones := vol.Zones()
	if zones == nil {
		return 0
	}
	n := 0
	for _, z := range zones.Report(0, zones.Geometry().NumZones()) {
		if z.Type != zoned.Conventional && z.WritePointer != z.Start {
			n++
		}
	}
	return n
}

// unmountStaging unmounts a Filesystem volume's staging path, if mounted;
// the directory stays (the CO made it).
func unmountStaging(m mount.Interface, staging string) error {
	notMounted, err := m.IsLikelyNotMountPoint(staging)
	switch {
	case errors.Is(err, os.ErrNotExist) || err == nil && notMounted:
		return nil
	case err != nil:
		return fmt.Errorf("staging path: %w", err)
	}
	if err := m.Unmount(staging); err != nil {
		return fmt.Errorf("unmounting the staging path: %w", err)
	}
	return nil
}

// publishFilesystem bind-mounts a Filesystem volume's staging path on
// target, a directory it creates if missing. A target that is anything
// but a directory (a symlink above all) is refused.
func publishFilesystem(m mount.Interface, staging, target string, readOnly bool) error {
	if err := os.Mkdir(target, 0o750); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("creating the target directory: %w", err)
	}
	if fi, err := os.Lstat(target); err != nil || !fi.IsDir() {
		return fmt.Errorf("target %s exists and is not a directory", target)
	}
	opts := []string{"bind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	if err := m.Mount(staging, target, "", opts); err != nil {
		return fmt.Errorf("bind-mounting %s on %s: %w", staging, target, err)
	}
	return nil
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, statusf(codes.InvalidArgument, "NodeUnpublishVolume: no volume ID")
	case target == "":
		return nil, statusf(codes.InvalidArgument, "NodeUnpublishVolume %s: no target path", id)
	}
	defer d.lock(id)()
	// Unmount whatever is there (also after a restart that lost track),
	// and remove the target file.
	if err := mount.CleanupMountPoint(target, d.node.mounter, true); err != nil {
		return nil, statusf(codes.Internal, "NodeUnpublishVolume %s: %v", id, err)
	}
	if v := d.node.get(id); v != nil {
		if i := slices.Index(v.Targets, target); i >= 0 {
			v.Targets = slices.Delete(v.Targets, i, i+1)
			if v.SingleWriter == target {
				v.SingleWriter = ""
			}
			if err := d.node.put(v); err != nil {
				return nil, statusf(codes.Internal, "NodeUnpublishVolume %s: %v", id, err)
			}
		}
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, statusf(codes.InvalidArgument, "NodeGetVolumeStats: no volume ID")
	case path == "":
		return nil, statusf(codes.InvalidArgument, "NodeGetVolumeStats %s: no volume path", id)
	}
	defer d.lock(id)()
	v := d.node.get(id)
	if v == nil {
		return nil, statusf(codes.NotFound, "NodeGetVolumeStats %s: the volume is not staged on this node", id)
	}
	if path != v.StagingPath && !slices.Contains(v.Targets, path) {
		return nil, statusf(codes.NotFound, "NodeGetVolumeStats %s: the volume is not published at %s", id, path)
	}
	if _, err := os.Stat(path); err != nil {
		return nil, statusf(codes.NotFound, "NodeGetVolumeStats %s: %v", id, err)
	}
	s := d.volumeStats(v)
	resp := &csi.NodeGetVolumeStatsResponse{VolumeCondition: &csi.VolumeCondition{Abnormal: s.abnormal(), Message: s.message()}}
	switch {
	case s.err != nil:
	case v.FsType != "":
		// The filesystem's own figures, as df shows them in the pod; the
		// zones' are in the condition's message.
		usage, err := filesystemUsage(path)
		if err != nil {
			return nil, statusf(codes.Internal, "NodeGetVolumeStats %s: %v", id, err)
		}
		resp.Usage = usage
	default:
		resp.Usage = []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: s.capacity, Used: s.written, Available: s.capacity - s.written}}
	}
	return resp, nil
}

// filesystemUsage is statfs(2) of a mounted volume: bytes and inodes.
// (btrfs reports no inode counts: it allocates inodes as it goes.)
func filesystemUsage(path string) ([]*csi.VolumeUsage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", path, err)
	}
	bs := st.Bsize
	return []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Used: int64(st.Blocks-st.Bfree) * bs, Available: int64(st.Bavail) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Used: int64(st.Files - st.Ffree), Available: int64(st.Ffree)},
	}, nil
}

// stats is what NodeGetVolumeStats and the metrics report of a volume.
type stats struct {
	capacity, written int64
	zones             map[zoned.Condition]int // sequential zones by condition
	err               error
	// faults is what is injected; faultErr why the claim's annotation was
	// refused.
	faults   faultctl.VolumeStatus
	faultErr error
}

// zoneConditions are the conditions stats count, in report order.
var zoneConditions = []zoned.Condition{zoned.Empty, zoned.ImplicitOpen, zoned.ExplicitOpen, zoned.Closed, zoned.Full, zoned.ReadOnly, zoned.Offline}

func (d *Driver) volumeStats(v *stagedVolume) stats {
	s := stats{err: v.err, faultErr: v.annotationErr}
	if st, err := d.node.faults.Status(v.ID); err == nil {
		s.faults = st
	}
	if s.err == nil && v.dev != nil {
		s.err = v.dev.Err()
	}
	if v.vol == nil {
		return s
	}
	if _, err := os.Stat(v.Image); err != nil && s.err == nil {
		s.err = fmt.Errorf("the backing image: %w", err)
	}
	s.capacity = v.vol.Size()
	zones := v.vol.Zones()
	if zones == nil {
		return s
	}
	// Bytes written: the sum of the sequential zones' write pointers (from
	// their starts), plus the whole conventional zones.
	g := zones.Geometry()
	s.zones = map[zoned.Condition]int{}
	for _, z := range zones.Report(0, g.NumZones()) {
		if z.Type == zoned.Conventional {
			s.written += z.Length
			continue
		}
		if z.Cond != zoned.ReadOnly && z.Cond != zoned.Offline {
			s.written += z.WritePointer - z.Start
		}
		s.zones[z.Cond]++
	}
	return s
}

// abnormal: the volume is not served, or faults are injected into it.
func (s stats) abnormal() bool { return s.err != nil || s.faults.Active() || s.faultErr != nil }

func (s stats) message() string {
	if s.err != nil {
		return s.err.Error()
	}
	msg := "healthy"
	if s.faults.Active() {
		msg = s.faults.Summary()
	}
	if s.faultErr != nil {
		msg += fmt.Sprintf("; the claim's %s annotation was refused: %v", FaultsAnnotation, s.faultErr)
	}
	if s.zones == nil {
		return msg
	}
	var parts []string
	for _, c := range zoneConditions {
		if s.zones[c] > 0 || (c != zoned.ReadOnly && c != zoned.Offline) {
			parts = append(parts, fmt.Sprintf("%s %d", c, s.zones[c]))
		}
	}
	return msg + "; sequential zones: " + strings.Join(parts, ", ")
}
