package driver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	"github.com/zq-csi/zq-csi/attach"
	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
)

// fakeAttacher stands in for ublk and nbd: its devices are plain files.
type fakeAttacher struct {
	dir string

	mu         sync.Mutex
	attaches   int
	recovered  []string
	forgotten  []string
	recoverErr error
}

type fakeDevice struct {
	path     string
	detached bool
}

func (f *fakeDevice) Path() string { return f.path }
func (f *fakeDevice) Err() error {
	if f.detached {
		return fmt.Errorf("detached")
	}
	return nil
}
func (f *fakeDevice) Detach() error               { f.detached = true; return nil }
func (f *fakeDevice) Stats() (attach.Stats, bool) { return attach.Stats{}, false }

func (a *fakeAttacher) Attach(v *volume.Volume, backend string) (Device, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.attaches++
	p := filepath.Join(a.dir, fmt.Sprintf("dev%d-%s", a.attaches, backend))
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		return nil, err
	}
	return &fakeDevice{path: p}, nil
}

func (a *fakeAttacher) Recover(v *volume.Volume, backend, device string) (Device, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.recovered = append(a.recovered, device)
	if a.recoverErr != nil {
		return nil, a.recoverErr
	}
	if device == "" {
		return nil, ErrGone
	}
	return &fakeDevice{path: device}, nil
}

func (a *fakeAttacher) Forget(device, image string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.forgotten = append(a.forgotten, device)
	return nil
}

type testEnv struct {
	d        *Driver
	cfg      Config
	attacher *fakeAttacher
	mounter  *mount.FakeMounter
	dir      string
}

func newTestDriver(t *testing.T) *testEnv {
	t.Helper()
	dir := t.TempDir()
	e := &testEnv{dir: dir, attacher: &fakeAttacher{dir: t.TempDir()}, mounter: mount.NewFakeMounter(nil)}
	e.cfg = Config{NodeID: "node-a", Mode: ModeAll, Pool: filepath.Join(dir, "pool"), StateDir: filepath.Join(dir, "state"),
		MaxVolumes: 4, Attacher: e.attacher, Mounter: e.mounter}
	e.restart(t)
	return e
}

// restart replaces the driver with a new one on the same directories, as
// a restarted plugin process.
func (e *testEnv) restart(t *testing.T) {
	t.Helper()
	d, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.d = d
}

var blockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

var zoneParams = map[string]string{"zone.size": "4Mi", "zone.conventional_zones": "1", "zone.max_open_zones": "4", "zone.max_active_zones": "4"}

func (e *testEnv) create(t *testing.T, name string, size int64) *csi.Volume {
	t.Helper()
	r, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, Parameters: zoneParams,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Volume
}

// stage stages volume id in a new staging directory, which it returns.
func (e *testEnv) stage(t *testing.T, id string) string {
	t.Helper()
	staging := t.TempDir()
	if _, err := e.d.NodeStageVolume(context.Background(), stageReq(id, staging)); err != nil {
		t.Fatal(err)
	}
	return staging
}

func wantCode(t *testing.T, err error, c codes.Code, contains string) {
	t.Helper()
	if status.Code(err) != c || !strings.Contains(status.Convert(err).Message(), contains) {
		t.Fatalf("error %v, want code %v with %q", err, c, contains)
	}
}

func TestCreateVolumeIsIdempotentAndRoundsToZones(t *testing.T) {
	e := newTestDriver(t)
	v := e.create(t, "pvc-1", 10<<20)
	// 10 MiB in 4 MiB zones: 3 zones.
	if v.CapacityBytes != 12<<20 || v.VolumeId != "pvc-1" || v.VolumeContext[ParamAttach] != AttachUBLK {
		t.Fatalf("volume %+v", v)
	}
	if got := v.AccessibleTopology[0].Segments[TopologyKey]; got != "node-a" {
		t.Fatalf("topology %v", v.AccessibleTopology)
	}
	again := e.create(t, "pvc-1", 10<<20)
	if again.VolumeId != v.VolumeId || again.CapacityBytes != v.CapacityBytes {
		t.Fatalf("second create: %+v, first %+v", again, v)
	}
	_, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "pvc-1", Parameters: zoneParams,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 20 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	wantCode(t, err, codes.AlreadyExists, "pvc-1")
	other := map[string]string{"zone.size": "8Mi"}
	_, err = e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "pvc-1", Parameters: other,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 12 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	wantCode(t, err, codes.AlreadyExists, "other parameters")
	if _, err := os.Stat(filepath.Join(e.cfg.Pool, "pvc-1.qcow2")); err != nil {
		t.Fatal(err)
	}
}

func TestCreateVolumeRefusals(t *testing.T) {
	e := newTestDriver(t)
	mountCap := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: blockCap.AccessMode,
	}
	multiNode := &csi.VolumeCapability{AccessType: blockCap.AccessType,
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER}}
	for _, tc := range []struct {
		name string
		req  *csi.CreateVolumeRequest
		code codes.Code
		msg  string
	}{
		{"no name", &csi.CreateVolumeRequest{VolumeCapabilities: []*csi.VolumeCapability{blockCap}}, codes.InvalidArgument, "no name"},
		{"no capabilities", &csi.CreateVolumeRequest{Name: "v"}, codes.InvalidArgument, "no volume capabilities"},
		{"btrfs on too few zones", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{mountCap},
			Parameters: zoneParams, CapacityRange: &csi.CapacityRange{RequiredBytes: 20 << 20}}, codes.InvalidArgument, "btrfs needs at least 6 zones"},
		{"multi-node", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{multiNode}}, codes.InvalidArgument, "MULTI_NODE_MULTI_WRITER"},
		{"bad parameter", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{blockCap},
			Parameters: map[string]string{"zone.size": "lots"}}, codes.InvalidArgument, "zone.size"},
		{"limit below one zone", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{blockCap},
			Parameters: zoneParams, CapacityRange: &csi.CapacityRange{RequiredBytes: 5 << 20, LimitBytes: 6 << 20}}, codes.OutOfRange, ""},
		{"another node's topology", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{blockCap},
			AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "node-b"}}}}},
			codes.ResourceExhausted, "node-a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.d.CreateVolume(context.Background(), tc.req)
			wantCode(t, err, tc.code, tc.msg)
		})
	}
	if ids, _ := e.d.pool.list(); len(ids) != 0 {
		t.Fatalf("refused creates left volumes %v", ids)
	}
}

// Volume IDs never reach a path unchecked: an ID that climbs out of the
// pool is refused or treated as absent, and nothing outside is touched.
func TestVolumeIDsAreValidatedBeforeTouchingPaths(t *testing.T) {
	e := newTestDriver(t)
	outside := filepath.Join(e.dir, "victim.json")
	if err := os.WriteFile(outside, []byte(`{"id":"x"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	bad := "../victim"
	if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: bad}); err != nil {
		t.Fatalf("DeleteVolume of a foreign ID: %v (want success: it does not exist)", err)
	}
	_, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: bad, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	wantCode(t, err, codes.NotFound, "invalid volume ID")
	_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: bad, StagingTargetPath: e.dir, VolumeCapability: blockCap})
	wantCode(t, err, codes.NotFound, "invalid volume ID")
	_, err = e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: bad, CapacityRange: &csi.CapacityRange{RequiredBytes: 1}})
	wantCode(t, err, codes.NotFound, "invalid volume ID")
	if _, err := os.Stat(outside); err != nil {
		t.Fatalf("the file outside the pool: %v", err)
	}
	// A name that is no valid ID gets a digest ID.
	v := e.create(t, "../../etc/passwd", 8<<20)
	if err := checkID(v.VolumeId); err != nil || !strings.HasPrefix(v.VolumeId, "zq-") {
		t.Fatalf("ID %q for a path-like name: %v", v.VolumeId, err)
	}
}

func TestListVolumesPages(t *testing.T) {
	e := newTestDriver(t)
	for _, n := range []string{"a", "b", "c"} {
		e.create(t, n, 8<<20)
	}
	ctx := context.Background()
	var got []string
	token := ""
	for {
		r, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, en := range r.Entries {
			got = append(got, en.Volume.VolumeId)
		}
		if token = r.NextToken; token == "" {
			break
		}
	}
	if strings.Join(got, ",") != "a,b,c" {
		t.Fatalf("listed %v", got)
	}
	_, err := e.d.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "zz"})
	wantCode(t, err, codes.Aborted, "zz")
}

func TestGetCapacityIsThePoolsFreeSpaceForThisNodeOnly(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	r, err := e.d.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: "node-a"}}})
	if err != nil || r.AvailableCapacity <= 0 {
		t.Fatalf("capacity of this node: %v, %v", r, err)
	}
	r, err = e.d.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: "node-b"}}})
	if err != nil || r.AvailableCapacity != 0 {
		t.Fatalf("capacity of another node: %v, %v", r, err)
	}
}

func stageReq(id, staging string) *csi.NodeStageVolumeRequest {
	return &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap}
}

func publishReq(id, staging, target string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: blockCap}
}

func TestNodeLifecycle(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	v := e.create(t, "pvc-n", 12<<20)
	staging, target := t.TempDir(), filepath.Join(t.TempDir(), "target")

	_, err := e.d.NodePublishVolume(ctx, publishReq(v.VolumeId, staging, target))
	wantCode(t, err, codes.FailedPrecondition, "not staged")
	for range 2 { // idempotent
		if _, err := e.d.NodeStageVolume(ctx, stageReq(v.VolumeId, staging)); err != nil {
			t.Fatal(err)
		}
	}
	if e.attacher.attaches != 1 {
		t.Fatalf("%d attaches for two stages", e.attacher.attaches)
	}
	_, err = e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.VolumeId})
	wantCode(t, err, codes.FailedPrecondition, "staged")
	_, err = e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 20 << 20}})
	wantCode(t, err, codes.FailedPrecondition, "staged")
	for range 2 {
		if _, err := e.d.NodePublishVolume(ctx, publishReq(v.VolumeId, staging, target)); err != nil {
			t.Fatal(err)
		}
	}
	mps, _ := e.mounter.List()
	if len(mps) != 1 || mps[0].Path != target || !strings.Contains(mps[0].Device, "dev1-ublk") {
		t.Fatalf("mounts %+v", mps)
	}
	st, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.VolumeId, VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	// One conventional zone counts as written; the two sequential zones
	// are empty.
	if u := st.Usage[0]; u.Total != 12<<20 || u.Used != 4<<20 || st.VolumeCondition.Abnormal ||
		!strings.Contains(st.VolumeCondition.Message, "empty 2") {
		t.Fatalf("stats %+v", st)
	}
	_, err = e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.VolumeId, VolumePath: "/elsewhere"})
	wantCode(t, err, codes.NotFound, "not published")
	_, err = e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging})
	wantCode(t, err, codes.FailedPrecondition, "still published")
	for range 2 {
		if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.VolumeId, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target after unpublish: %v", err)
	}
	for range 2 {
		if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if _, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
			t.Fatal(err)
		}
	}
	if ids, _ := e.d.pool.list(); len(ids) != 0 {
		t.Fatalf("volumes left: %v", ids)
	}
}

// Concurrent identical calls on one volume are serialized: each RPC of
// the lifecycle, sent eight times at once, succeeds every time and acts
// once (one image, one attach, one mount, one detach).
func TestConcurrentIdenticalCallsActOnce(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	staging, target := t.TempDir(), filepath.Join(t.TempDir(), "target")
	const id = "pvc-c"
	calls := []struct {
		name  string
		call  func() error
		check func() error
	}{
		{"CreateVolume", func() error {
			_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: id, Parameters: zoneParams,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 8 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
			return err
		}, func() error {
			if ids, _ := e.d.pool.list(); len(ids) != 1 {
				return fmt.Errorf("volumes %v", ids)
			}
			return nil
		}},
		{"NodeStageVolume", func() error {
			_, err := e.d.NodeStageVolume(ctx, stageReq(id, staging))
			return err
		}, func() error {
			if e.attacher.attaches != 1 {
				return fmt.Errorf("%d attaches", e.attacher.attaches)
			}
			return nil
		}},
		{"NodePublishVolume", func() error {
			_, err := e.d.NodePublishVolume(ctx, publishReq(id, staging, target))
			return err
		}, func() error {
			if mps, _ := e.mounter.List(); len(mps) != 1 {
				return fmt.Errorf("mounts %+v", mps)
			}
			return nil
		}},
		{"NodeUnpublishVolume", func() error {
			_, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			return err
		}, func() error {
			if mps, _ := e.mounter.List(); len(mps) != 0 {
				return fmt.Errorf("mounts %+v", mps)
			}
			return nil
		}},
		{"NodeUnstageVolume", func() error {
			_, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			return err
		}, func() error {
			if e.d.node.staged(id) {
				return fmt.Errorf("still staged")
			}
			return nil
		}},
		{"DeleteVolume", func() error {
			_, err := e.d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		}, func() error {
			if ids, _ := e.d.pool.list(); len(ids) != 0 {
				return fmt.Errorf("volumes %v", ids)
			}
			return nil
		}},
	}
	for _, c := range calls {
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for range 8 {
			wg.Go(func() {
				if err := c.call(); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("%s: %v", c.name, err)
		}
		if err := c.check(); err != nil {
			t.Fatalf("after 8 concurrent %s: %v", c.name, err)
		}
	}
}

// A restarted plugin takes back what the last one staged, with its publish
// targets; a volume it cannot take back is abnormal until unstaged, which
// removes the dead device.
func TestRestartTakesBackStagedVolumes(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	a, b := e.create(t, "pvc-a", 8<<20), e.create(t, "pvc-b", 8<<20)
	staging, target := t.TempDir(), filepath.Join(t.TempDir(), "target")
	for _, v := range []*csi.Volume{a, b} {
		if _, err := e.d.NodeStageVolume(ctx, stageReq(v.VolumeId, staging)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.NodePublishVolume(ctx, publishReq(a.VolumeId, staging, target)); err != nil {
		t.Fatal(err)
	}
	devA, devB := e.d.node.get(a.VolumeId).Device, e.d.node.get(b.VolumeId).Device
	// The old process dies: its images' locks go with it.
	for _, v := range []*csi.Volume{a, b} {
		e.d.node.get(v.VolumeId).vol.Img.Close()
	}

	e.restart(t)
	if got := strings.Join(e.attacher.recovered, ","); got != devA+","+devB {
		t.Fatalf("recovered %q, want %s,%s", got, devA, devB)
	}
	va := e.d.node.get(a.VolumeId)
	if len(va.Targets) != 1 || va.Targets[0] != target || va.err != nil {
		t.Fatalf("taken back: %+v", va)
	}
	st, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: a.VolumeId, VolumePath: target})
	if err != nil || st.VolumeCondition.Abnormal {
		t.Fatalf("stats after the restart: %+v, %v", st, err)
	}

	// Now one whose device cannot be taken back.
	for _, v := range []*csi.Volume{a, b} {
		e.d.node.get(v.VolumeId).vol.Img.Close()
	}
	e.attacher.recoverErr = fmt.Errorf("no such luck")
	e.restart(t)
	st, err = e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: b.VolumeId, VolumePath: staging})
	if err != nil || !st.VolumeCondition.Abnormal || !strings.Contains(st.VolumeCondition.Message, "no such luck") {
		t.Fatalf("stats of a volume not taken back: %+v, %v", st, err)
	}
	_, err = e.d.NodePublishVolume(ctx, publishReq(b.VolumeId, staging, filepath.Join(t.TempDir(), "t2")))
	wantCode(t, err, codes.FailedPrecondition, "not being served")
	// A stage tries again, and says why it still cannot.
	_, err = e.d.NodeStageVolume(ctx, stageReq(b.VolumeId, staging))
	wantCode(t, err, codes.Unavailable, "no such luck")
	if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: b.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if len(e.attacher.forgotten) != 1 || e.attacher.forgotten[0] != devB {
		t.Fatalf("forgotten %v, want %s", e.attacher.forgotten, devB)
	}

	// A device that is gone (the node rebooted): the record is dropped, and
	// the next stage attaches anew.
	if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: a.VolumeId, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	e.attacher.recoverErr = ErrGone
	e.restart(t)
	if e.d.node.staged(a.VolumeId) {
		t.Fatal("the record of a volume whose device is gone was kept")
	}
	before := e.attacher.attaches
	if _, err := e.d.NodeStageVolume(ctx, stageReq(a.VolumeId, staging)); err != nil || e.attacher.attaches != before+1 {
		t.Fatalf("stage after the device was gone: %v, %d attaches", err, e.attacher.attaches-before)
	}
}

// An attach interrupted by the plugin's death leaves a record without a
// device: the next plugin looks for the device by the image, and drops the
// record when there is none.
func TestInterruptedStageIsFoundOrForgotten(t *testing.T) {
	e := newTestDriver(t)
	v := e.create(t, "pvc-i", 8<<20)
	rec := &stagedVolume{ID: v.VolumeId, Image: e.d.pool.imagePath(v.VolumeId), Backend: AttachUBLK, StagingPath: t.TempDir()}
	if err := writeJSON(e.d.node.recordPath(v.VolumeId), rec); err != nil {
		t.Fatal(err)
	}
	e.restart(t)
	if len(e.attacher.recovered) != 1 || e.attacher.recovered[0] != "" {
		t.Fatalf("recovered %q, want one look-up by image", e.attacher.recovered)
	}
	if e.d.node.staged(v.VolumeId) {
		t.Fatal("a record without a device was kept")
	}
	if _, err := os.Stat(e.d.node.recordPath(v.VolumeId)); !os.IsNotExist(err) {
		t.Fatalf("record file: %v", err)
	}
}

// Publishing never follows a symlink at the target, and a failed publish
// removes only what it created.
func TestPublishRefusesASymlinkTarget(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	v := e.create(t, "pvc-s", 8<<20)
	staging := e.stage(t, v.VolumeId)
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "target")
	if err := os.Symlink(victim, target); err != nil {
		t.Fatal(err)
	}
	_, err := e.d.NodePublishVolume(ctx, publishReq(v.VolumeId, staging, target))
	wantCode(t, err, codes.Internal, "not a plain file")
	if mps, _ := e.mounter.List(); len(mps) != 0 {
		t.Fatalf("mounted %+v", mps)
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != "keep" {
		t.Fatalf("the symlink's target: %q, %v", b, err)
	}
	if _, err := os.Lstat(target); err != nil {
		t.Fatalf("the symlink was removed: %v", err)
	}
}

func TestExpandAddsZones(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	v := e.create(t, "pvc-x", 8<<20)
	r, err := e.d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 13 << 20}})
	if err != nil || r.CapacityBytes != 16<<20 || r.NodeExpansionRequired {
		t.Fatalf("expand to 13 MiB: %+v, %v", r, err)
	}
	vol, err := volume.Open(e.d.pool.imagePath(v.VolumeId), image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	if n := vol.Zones().Geometry().NumZones(); n != 4 || vol.Backend.Size() != 16<<20 {
		t.Fatalf("after expand: %d zones, %d bytes", n, vol.Backend.Size())
	}
}

func TestMetrics(t *testing.T) {
	e := newTestDriver(t)
	v := e.create(t, "pvc-m", 8<<20)
	if _, err := e.d.NodeStageVolume(context.Background(), stageReq(v.VolumeId, t.TempDir())); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	e.d.writeMetrics(&b)
	for _, want := range []string{
		"# TYPE zq_csi_pool_free_bytes gauge",
		"zq_csi_volumes_staged 1",
		`zq_csi_volume_capacity_bytes{volume="pvc-m",`,
		`zq_csi_volume_zones{volume="pvc-m",device=`,
		`condition="empty"} 1`,
		`zq_csi_volume_healthy{volume="pvc-m",`,
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("metrics lack %q:\n%s", want, b.String())
		}
	}
}

// The volume condition turns abnormal when the backing image disappears or
// the device stops serving.
func TestVolumeConditionFollowsImageAndDevice(t *testing.T) {
	e := newTestDriver(t)
	ctx := context.Background()
	v := e.create(t, "pvc-h", 8<<20)
	staging := e.stage(t, v.VolumeId)
	stats := func() *csi.VolumeCondition {
		t.Helper()
		r, err := e.d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.VolumeId, VolumePath: staging})
		if err != nil {
			t.Fatal(err)
		}
		return r.VolumeCondition
	}
	if c := stats(); c.Abnormal {
		t.Fatalf("healthy volume: %+v", c)
	}
	img := e.d.pool.imagePath(v.VolumeId)
	if err := os.Rename(img, img+".moved"); err != nil {
		t.Fatal(err)
	}
	if c := stats(); !c.Abnormal || !strings.Contains(c.Message, "backing image") {
		t.Fatalf("image gone: %+v", c)
	}
	if err := os.Rename(img+".moved", img); err != nil {
		t.Fatal(err)
	}
	e.d.node.get(v.VolumeId).dev.(*fakeDevice).detached = true
	if c := stats(); !c.Abnormal || !strings.Contains(c.Message, "detached") {
		t.Fatalf("device stopped: %+v", c)
	}
}

// The access modes' publish rules: a SINGLE_NODE_SINGLE_WRITER volume is
// published at one target at a time (FAILED_PRECONDITION for a second, in
// either order), the other modes at several; republishing the same target is
// idempotent, and unpublishing the single writer frees the volume.
func TestNodePublishFollowsTheAccessMode(t *testing.T) {
	mode := func(m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		return &csi.VolumeCapability{AccessType: blockCap.AccessType, AccessMode: &csi.VolumeCapability_AccessMode{Mode: m}}
	}
	single := mode(csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER)
	multi := mode(csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER)
	writer := mode(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	for _, tc := range []struct {
		name          string
		first, second *csi.VolumeCapability
		secondOK      bool
	}{
		{"single writer, then another target", single, single, false},
		{"single writer, then a multi-writer publish elsewhere", single, multi, false},
		{"multi writer, then a single writer elsewhere", multi, single, false},
		{"multi writer at two targets", multi, multi, true},
		{"SINGLE_NODE_WRITER at two targets (Kubernetes ReadWriteOnce)", writer, writer, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestDriver(t)
			ctx := context.Background()
			v := e.create(t, "pvc-m", 12<<20)
			staging := e.stage(t, v.VolumeId)
			publish := func(c *csi.VolumeCapability, target string) error {
				r := publishReq(v.VolumeId, staging, target)
				r.VolumeCapability = c
				_, err := e.d.NodePublishVolume(ctx, r)
				return err
			}
			a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
			for range 2 { // the same target again is idempotent
				if err := publish(tc.first, a); err != nil {
					t.Fatal(err)
				}
			}
			err := publish(tc.second, b)
			if tc.secondOK {
				if err != nil {
					t.Fatalf("second target: %v", err)
				}
				return
			}
			wantCode(t, err, codes.FailedPrecondition, "single-writer")
			if mps, _ := e.mounter.List(); len(mps) != 1 || mps[0].Path != a {
				t.Fatalf("mounts after the refused publish: %+v", mps)
			}
			if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.VolumeId, TargetPath: a}); err != nil {
				t.Fatal(err)
			}
			if err := publish(tc.second, b); err != nil {
				t.Fatalf("after the first target was unpublished: %v", err)
			}
		})
	}
}
