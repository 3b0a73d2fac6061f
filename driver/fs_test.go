package driver

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	testingexec "k8s.io/utils/exec/testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// mkfs.f2fs 1.15 -m on zoned null_blk devices in the VM harness (Linux
// 6.12): with too few conventional zones it says "Device does not have
// enough random write zones for F2FS volume (N needed)"; need is that N.
var f2fsMeasured = []struct {
	zoneMiB, sizeMiB int64
	need             int
}{
	{2, 256, 8},
	{4, 256, 5},
	{16, 256, 2},
	{16, 1024, 3},
	{32, 1024, 2},
	{64, 1024, 2},
	{16, 4096, 4},
	{32, 4096, 3},
	{64, 4096, 2},
	{256, 2048, 2},
}

func TestF2FSConventionalZonesCoverWhatMkfsNeeds(t *testing.T) {
	for _, m := range f2fsMeasured {
		g := zoned.Geometry{Size: m.sizeMiB << 20, ZoneSize: m.zoneMiB << 20, ZoneCapacity: m.zoneMiB << 20}
		// Never fewer than mkfs.f2fs needs, and at most one zone more.
		if got := f2fsConventionalZones(g); got < m.need || got > m.need+1 {
			t.Errorf("%d MiB zones, %d MiB: %d conventional zones, mkfs.f2fs needs %d", m.zoneMiB, m.sizeMiB, got, m.need)
		}
	}
}

func TestCheckFilesystemNamesTheRuleAndKey(t *testing.T) {
	g := func(zoneMiB, zones int64, conventional int) zoned.Geometry {
		return zoned.Geometry{Size: zoneMiB * zones << 20, ZoneSize: zoneMiB << 20, ZoneCapacity: zoneMiB << 20, ConventionalZones: conventional}
	}
	for _, tc := range []struct {
		name, fstype string
		g            zoned.Geometry
		want         string // "" for accepted
	}{
		{"btrfs on 6 zones", FsBtrfs, g(16, 6, 0), ""},
		{"btrfs on 5 zones", FsBtrfs, g(16, 5, 0), "at least 6 zones"},
		{"btrfs on 2 MiB zones", FsBtrfs, g(2, 64, 0), "zone.size of at least 4 MiB"},
		{"btrfs under its minimum size", FsBtrfs, g(4, 8, 0), "45 MiB"},
		{"f2fs with its conventional zones", FsF2FS, g(16, 64, 3), ""},
		{"f2fs without conventional zones", FsF2FS, g(16, 64, 0), "zone.conventional_zones=0"},
		{"xfs", FsXFS, g(16, 64, 0), "Linux 6.15"},
		{"ext4", "ext4", g(16, 64, 0), `"ext4": not a zoned filesystem`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkFilesystem("key", tc.fstype, tc.g)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "key")):
				t.Fatalf("error %v, want one naming key and %q", err, tc.want)
			}
		})
	}
}

// fsCap is a Filesystem capability of fstype ("" for the default).
func fsCap(fstype string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fstype, MountFlags: []string{"noatime"}}},
		AccessMode: blockCap.AccessMode,
	}
}

// fakeTools answers blkid with what the device holds ("" for nothing),
// fsck with success, blockdev and btrfs's dump-super with the device's and
// the filesystem's sizes (fsSize 0: the device's), and records the mkfs
// commands run and the btrfs resizes.
type fakeTools struct {
	holds              string
	mkfs               [][]string
	deviceSize, fsSize int64
	resized            int
}

func (f *fakeTools) sizes() (device, fs int64) {
	device, fs = f.deviceSize, f.fsSize
	if device == 0 {
		device = 48 << 20
	}
	if fs == 0 {
		fs = device
	}
	return device, fs
}

func (f *fakeTools) exec() *testingexec.FakeExec {
	fe := &testingexec.FakeExec{}
	action := func(cmd string, args ...string) utilexec.Cmd {
		fc := &testingexec.FakeCmd{}
		switch cmd {
		case "blkid":
			fc.CombinedOutputScript = []testingexec.FakeAction{func() ([]byte, []byte, error) {
				if f.holds == "" {
					return nil, nil, &testingexec.FakeExitError{Status: 2}
				}
				return []byte("DEVNAME=" + args[len(args)-1] + "\nTYPE=" + f.holds + "\n"), nil, nil
			}}
		case "fsck": // mount-utils checks a formatted device before mounting it
			fc.CombinedOutputScript = []testingexec.FakeAction{func() ([]byte, []byte, error) { return nil, nil, nil }}
		case "blockdev": // --getro, --getsize64
			fc.CombinedOutputScript = []testingexec.FakeAction{func() ([]byte, []byte, error) {
				if args[0] == "--getro" {
					return []byte("0\n"), nil, nil
				}
				device, _ := f.sizes()
				return []byte(fmt.Sprintf("%d\n", device)), nil, nil
			}}
		case "btrfs": // inspect-internal dump-super, filesystem resize max
			fc.CombinedOutputScript = []testingexec.FakeAction{func() ([]byte, []byte, error) {
				device, fs := f.sizes()
				if args[0] == "filesystem" {
					f.resized++
					f.fsSize = device
					return nil, nil, nil
				}
				return []byte(fmt.Sprintf("sectorsize\t\t4096\ntotal_bytes\t\t%d\n", fs)), nil, nil
			}}
		default:
			f.mkfs = append(f.mkfs, append([]string{cmd}, args...))
			fc.CombinedOutputScript = []testingexec.FakeAction{func() ([]byte, []byte, error) {
				f.holds = cmd[len("mkfs."):]
				return nil, nil, nil
			}}
		}
		return testingexec.InitFakeCmd(fc, cmd, args...)
	}
	for range 64 {
		fe.CommandScript = append(fe.CommandScript, action)
	}
	return fe
}

func newFsTestDriver(t *testing.T, tools *fakeTools) *testEnv {
	t.Helper()
	e := newTestDriver(t)
	e.cfg.Exec = tools.exec()
	e.restart(t)
	return e
}

func TestFilesystemVolumeIsFormattedOnceAndBindMounted(t *testing.T) {
	tools := &fakeTools{}
	e := newFsTestDriver(t, tools)
	ctx := context.Background()
	r, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-fs", Parameters: zoneParams,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 48 << 20}, VolumeCapabilities: []*csi.VolumeCapability{fsCap("")}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	var device string // the first stage's
	for round := range 2 {
		staging := t.TempDir()
		target := filepath.Join(t.TempDir(), "mount")
		if _, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: fsCap("")}); err != nil {
			t.Fatalf("round %d: stage: %v", round, err)
		}
		// Formatted the first time only, with btrfs (the default).
		if round == 0 {
			device = e.d.node.get(id).Device
		}
		if want := [][]string{{"mkfs.btrfs", "-m", "single", "-d", "single", device}}; !slices.EqualFunc(tools.mkfs, want, slices.Equal) {
			t.Fatalf("round %d: mkfs runs %q, want %q", round, tools.mkfs, want)
		}
		if !e.mounted(staging, "btrfs", "noatime") {
			t.Fatalf("round %d: staging path not mounted as btrfs with noatime: %+v", round, e.mounter.MountPoints)
		}
		if _, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target,
			VolumeCapability: fsCap(""), Readonly: true}); err != nil {
			t.Fatalf("round %d: publish: %v", round, err)
		}
		if fi, err := os.Stat(target); err != nil || !fi.IsDir() || !e.mounted(target, "", "bind", "ro") {
			t.Fatalf("round %d: target %s: %v, mounts %+v", round, target, err, e.mounter.MountPoints)
		}
		// A Filesystem volume is not published as a block device.
		_, err := e.d.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: filepath.Join(t.TempDir(), "dev"), VolumeCapability: blockCap})
		wantCode(t, err, codes.FailedPrecondition, "staged with a btrfs filesystem")
		if _, err := e.d.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.d.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
		if len(e.mounter.MountPoints) != 0 {
			t.Fatalf("round %d: mounts left after unstage: %+v", round, e.mounter.MountPoints)
		}
	}
}

func TestFilesystemVolumeHoldingOtherDataIsNeverReformatted(t *testing.T) {
	tools := &fakeTools{holds: "ext4"}
	e := newFsTestDriver(t, tools)
	ctx := context.Background()
	v := e.create(t, "pvc-x", 48<<20)
	_, err := e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: t.TempDir(), VolumeCapability: fsCap(FsBtrfs)})
	wantCode(t, err, codes.FailedPrecondition, "holds ext4")
	if len(tools.mkfs) != 0 || len(e.mounter.MountPoints) != 0 || e.d.node.staged(v.VolumeId) {
		t.Fatalf("a refused stage left mkfs %q, mounts %+v, staged %v", tools.mkfs, e.mounter.MountPoints, e.d.node.staged(v.VolumeId))
	}
}

func TestVolumeWithDataInItsZonesIsNeverFormatted(t *testing.T) {
	tools := &fakeTools{} // blkid finds nothing
	e := newFsTestDriver(t, tools)
	ctx := context.Background()
	v := e.create(t, "pvc-d", 48<<20)
	// What a Block volume's user left: a write at the start of the first
	// sequential zone (zone 1; zone 0 is conventional).
	vol, err := volume.Open(e.d.pool.imagePath(v.VolumeId), image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := vol.WriteFrom(bytes.NewReader(make([]byte, 4096)), 4<<20, 4096); err != nil {
		t.Fatal(err)
	}
	if err := vol.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = e.d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: t.TempDir(), VolumeCapability: fsCap("")})
	wantCode(t, err, codes.FailedPrecondition, "1 of its sequential zones hold data")
	if len(tools.mkfs) != 0 || e.d.node.staged(v.VolumeId) {
		t.Fatalf("mkfs %q, staged %v", tools.mkfs, e.d.node.staged(v.VolumeId))
	}
}

func TestFilesystemRefusalsNameTheKey(t *testing.T) {
	e := newFsTestDriver(t, &fakeTools{})
	ctx := context.Background()
	create := func(params map[string]string, c *csi.VolumeCapability) error {
		_, err := e.d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "v", Parameters: params,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csi.VolumeCapability{c}})
		return err
	}
	noConventional := map[string]string{"zone.size": "4Mi"}
	wantCode(t, create(noConventional, fsCap(FsF2FS)), codes.InvalidArgument, "zone.conventional_zones=0")
	wantCode(t, create(map[string]string{"zone.size": "4Mi", "fsType": "f2fs"}, fsCap("")), codes.InvalidArgument, "zone.conventional_zones=0")
	wantCode(t, create(map[string]string{"zone.size": "4Mi", "fsType": "zfs"}, blockCap), codes.InvalidArgument, `fsType="zfs"`)
	wantCode(t, create(noConventional, fsCap(FsXFS)), codes.InvalidArgument, "fs_type (csi.storage.k8s.io/fstype)=xfs")
	wantCode(t, create(noConventional, fsCap("ext4")), codes.InvalidArgument, `"ext4"`)
	if ids, _ := e.d.pool.list(); len(ids) != 0 {
		t.Fatalf("refused creates left volumes %v", ids)
	}
	// A block volume's class checks no filesystem; validating it for f2fs
	// says why not, without an error.
	v := e.create(t, "pvc-b", 64<<20)
	r, err := e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: v.VolumeId,
		VolumeCapabilities: []*csi.VolumeCapability{fsCap(FsF2FS)}})
	if err != nil || r.Confirmed != nil || !strings.Contains(r.Message, "conventional zones") {
		t.Fatalf("ValidateVolumeCapabilities f2fs on 1 conventional zone: %+v, %v", r, err)
	}
	r, err = e.d.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: v.VolumeId,
		VolumeCapabilities: []*csi.VolumeCapability{fsCap(FsBtrfs)}})
	if err != nil || r.Confirmed == nil {
		t.Fatalf("ValidateVolumeCapabilities btrfs: %+v, %v", r, err)
	}
}

// mounted reports whether the fake mounter has path mounted with fstype
// ("" for any) and every option in opts.
func (e *testEnv) mounted(path, fstype string, opts ...string) bool {
	return slices.ContainsFunc(e.mounter.MountPoints, func(m mount.MountPoint) bool {
		if m.Path != path || fstype != "" && m.Type != fstype {
			return false
		}
		for _, o := range opts {
			if !slices.Contains(m.Opts, o) {
				return false
			}
		}
		return true
	})
}

// A volume restored or cloned to a larger size holds its source's smaller
// btrfs: staging grows it to the device, once; a read-only stage, a
// btrfs that fills its device and an f2fs are left as they are.
func TestStagingGrowsASmallerBtrfsToTheVolume(t *testing.T) {
	for _, tc := range []struct {
		name        string
		holds       string
		fsSize      int64
		flags       []string
		wantResized int
	}{
		{"btrfs smaller than its volume", FsBtrfs, 32 << 20, nil, 1},
		{"btrfs the volume's size", FsBtrfs, 0, nil, 0},
		{"btrfs mounted read-only", FsBtrfs, 32 << 20, []string{"ro"}, 0},
		{"f2fs smaller than its volume", FsF2FS, 32 << 20, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tools := &fakeTools{holds: tc.holds, fsSize: tc.fsSize}
			e := newFsTestDriver(t, tools)
			params := maps.Clone(zoneParams)
			params["zone.conventional_zones"] = "5" // f2fs's metadata
			r, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "pvc-grow", Parameters: params,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 48 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
			if err != nil {
				t.Fatal(err)
			}
			v := r.Volume
			c := fsCap(tc.holds)
			c.GetMount().MountFlags = tc.flags
			staging := t.TempDir()
			if _, err := e.d.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging, VolumeCapability: c}); err != nil {
				t.Fatal(err)
			}
			if tools.resized != tc.wantResized || len(tools.mkfs) != 0 {
				t.Fatalf("btrfs resized %d times, mkfs %q; want %d resizes, no mkfs", tools.resized, tools.mkfs, tc.wantResized)
			}
		})
	}
}
