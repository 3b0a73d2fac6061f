//go:build vmtest

// Kernel tests of the CSI plugin: csi-sanity against `zq-csi serve`, and a
// plugin restart under I/O. They need the VM harness kernel (ublk) and run
// only there, through test/e2e/vm-go-test.sh ./driver/.
package driver_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/zq-csi/zq-csi/test/e2e/vmtest"
)

func TestMain(m *testing.M) { vmtest.Main(m, "./driver/") }

// plugin is a running `zq-csi serve`.
type plugin struct {
	cmd      *exec.Cmd
	log      *bytes.Buffer
	endpoint string
	faults   string // the fault-injection socket
	exited   chan error
}

// startPlugin runs `zq-csi serve` on dir's socket, pool and state.
func startPlugin(t testing.TB, bin, dir string) *plugin {
	t.Helper()
	sock := filepath.Join(dir, "csi.sock")
	os.Remove(sock)
	p := &plugin{endpoint: "unix://" + sock, log: &bytes.Buffer{}, exited: make(chan error, 1)}
	p.faults = filepath.Join(dir, "fault.sock")
	p.cmd = exec.Command(bin, "serve", "--endpoint", p.endpoint, "--node-id", "vm-node",
		"--pool", filepath.Join(dir, "pool"), "--state-dir", filepath.Join(dir, "state"), "--fault-socket", p.faults, "-v", "2")
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Signal(syscall.SIGTERM)
			<-p.exited
		}
	})
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			return p
		}
		if i == 300 {
			t.Fatalf("zq-csi serve did not create %s in 30s; log:\n%s", sock, p.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestKernelCSISanity runs the CSI conformance suite with block volumes and
// with Filesystem (mount) volumes, the default filesystem (btrfs), and zone
// parameters; every test must pass, and none may be skipped for lack of a
// capability the plugin claims.
func TestKernelCSISanity(t *testing.T) {
	sanity := os.Getenv("ZQ_CSI_SANITY_BIN")
	if sanity == "" {
		t.Fatal("ZQ_CSI_SANITY_BIN is not set (make e2e builds bin/csi-sanity)")
	}
	for _, tc := range []struct {
		accessType, params string
	}{
		{"block", `zone.size: 64Mi
zone.conventional_zones: "1"
zone.max_open_zones: "4"
zone.max_active_zones: "6"
zone.max_append_bytes: 256Ki
`},
		// 256 MiB in 16 MiB zones: room for btrfs's superblock log and
		// block groups.
		{"mount", `zone.size: 16Mi
zone.max_open_zones: "8"
zone.max_active_zones: "8"
`},
	} {
		t.Run(tc.accessType, func(t *testing.T) {
			dir := t.TempDir()
			p := startPlugin(t, vmtest.ZQCSI(t, "../cmd/zq-csi"), dir)
			params := filepath.Join(dir, "params.yaml")
			if err := os.WriteFile(params, []byte(tc.params), 0o600); err != nil {
				t.Fatal(err)
			}
			// csi-sanity creates (and removes) the mount and staging directories.
			cmd := exec.Command(sanity, "-csi.endpoint", p.endpoint,
				"-csi.mountdir", filepath.Join(dir, "mnt"), "-csi.stagingdir", filepath.Join(dir, "stage"),
				"-csi.testvolumeaccesstype", tc.accessType, "-csi.testvolumesize", fmt.Sprint(256<<20),
				"-csi.testvolumeexpandsize", fmt.Sprint(512<<20), "-csi.testvolumeparameters", params,
				"-ginkgo.v", "-ginkgo.no-color")
			out, err := cmd.CombinedOutput()
			checkSanity(t, string(out), err, p)
		})
	}
}

// checkSanity fails the test unless csi-sanity's output says every test
// passed or was skipped for a capability the plugin does not claim.
func checkSanity(t *testing.T, out string, err error, p *plugin) {
	t.Helper()
	summary := regexp.MustCompile(`(\d+) Passed \| (\d+) Failed \| \d+ Pending \| (\d+) Skipped`).FindStringSubmatch(out)
	if err != nil || summary == nil || summary[2] != "0" {
		t.Fatalf("csi-sanity: %v\n%s\nplugin log:\n%s", err, tail(out, 200), tail(p.log.String(), 100))
	}
	// Skips csi-sanity makes for capabilities this plugin does not claim.
	// (ginkgo -v prints each skip's reason on a line of its own.)
	// (The health, GetSnapshot and snapshot topology capabilities are CSI
	// 1.13's; the plugin speaks 1.12.)
	unclaimed := regexp.MustCompile(`^(GetSnapshot|SNAPSHOT_ACCESSIBILITY_CONSTRAINTS|` +
		`ControllerPublishVolume|ControllerUnpublishVolume|Controller Publish, UnpublishVolume|ControllerModifyVolume|` +
		`Modify Volume|Modify volume|NodeExpandVolume|GroupControllerService|` +
		`ControllerGetVolumeHealth|ControllerListVolumeHealth|NodeGetVolumeHealth|NodeGetStorageHealth) not supported$`)
	reasons := regexp.MustCompile(`(?m)^\s+\[SKIPPED\] ([^\[i\n][^\n]*)$`).FindAllStringSubmatch(out, -1)
	if fmt.Sprint(len(reasons)) != summary[3] {
		t.Errorf("found %d skip reasons for %s skipped tests", len(reasons), summary[3])
	}
	for _, m := range reasons {
		if !unclaimed.MatchString(m[1]) {
			t.Errorf("csi-sanity skipped a test for a capability the plugin claims: %s", m[1])
		}
	}
	t.Logf("csi-sanity: %s passed, %s skipped (capabilities not claimed)", summary[1], summary[3])
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// blockWriter is the capability of a Block volume on one node.
var blockWriter = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// TestKernelPluginRestartUnderIO: a pod's device keeps serving across a
// plugin restart. fio writes and verifies zones on the published device
// while the plugin is killed (SIGKILL) and started again; fio must finish
// without an error, and the volume then unpublishes, unstages and deletes.
func TestKernelPluginRestartUnderIO(t *testing.T) {
	bin, dir, p, ctl, node := pluginWithClients(t)
	ctx := context.Background()
	capability := blockWriter
	cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-restart", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30},
		Parameters: map[string]string{"zone.size": "64Mi", "zone.max_open_zones": "4", "zone.max_active_zones": "4",
			"queue.scheduler": "none"},
		VolumeCapabilities: []*csi.VolumeCapability{capability}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "pod", "dev")
	os.MkdirAll(staging, 0o755)
	os.MkdirAll(filepath.Dir(target), 0o755)
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: capability, VolumeContext: cv.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: capability}); err != nil {
		t.Fatal(err)
	}
	if z := vmtest.Run(t, "lsblk", "-dno", "ZONED", target); strings.TrimSpace(z) != "host-managed" {
		t.Fatalf("published device: zoned %q", z)
	}
	// queue.scheduler is set at stage and kept when a restarted plugin
	// takes the busy device back (switching it then would drain the queue
	// under fio).
	scheduler := func() string { return strings.TrimSpace(vmtest.Run(t, "lsblk", "-dno", "SCHED", target)) }
	if s := scheduler(); s != "none" {
		t.Fatalf("staged with queue.scheduler none: the device's scheduler is %q", s)
	}

	fio := vmtest.Start(t, "fio", "--name=restart", "--filename="+target, "--zonemode=zbd", "--direct=1",
		"--ioengine=io_uring", "--iodepth=4", "--rw=write", "--bs=64k", "--size=256M", "--max_open_zones=4",
		"--verify=crc32c", "--do_verify=1")
	time.Sleep(3 * time.Second)
	p.cmd.Process.Kill()
	<-p.exited
	time.Sleep(time.Second)
	p2 := startPlugin(t, bin, dir)
	select {
	case err := <-fio.Done():
		if err != nil || !strings.Contains(fio.Out.String(), "err= 0") {
			t.Fatalf("fio across the restart: %v\n%s\nnew plugin's log:\n%s", err, fio.Out.String(), p2.log)
		}
	case <-time.After(5 * time.Minute):
		fio.Cmd.Process.Kill()
		t.Fatalf("fio did not finish after the restart:\n%s\nlog:\n%s", fio.Out.String(), p2.log)
	}
	if !strings.Contains(p2.log.String(), "took back a staged volume") {
		t.Errorf("the new plugin did not say it took the volume back:\n%s", p2.log)
	}
	if s := scheduler(); s != "none" {
		t.Errorf("after the restart the device's scheduler is %q, want queue.scheduler's none", s)
	}
	conn2, err := grpc.NewClient(p2.endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	node, ctl = csi.NewNodeClient(conn2), csi.NewControllerClient(conn2)
	st, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.VolumeCondition.Abnormal || st.Usage[0].Used != 256<<20 {
		t.Fatalf("stats after the restart: %+v, %v", st, err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

// fsVolume is a Filesystem volume created, staged and published through
// a plugin's CSI API.
type fsVolume struct {
	id, staging, target string
	capability          *csi.VolumeCapability
}

func mountCapability(fstype string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fstype, MountFlags: []string{"noatime"}}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

func (v *fsVolume) stage(t *testing.T, node csi.NodeClient) {
	t.Helper()
	ctx := context.Background()
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: v.capability}); err != nil {
		t.Fatalf("stage: %v", err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
		TargetPath: v.target, VolumeCapability: v.capability}); err != nil {
		t.Fatalf("publish: %v", err)
	}
}

func (v *fsVolume) unstage(t *testing.T, node csi.NodeClient) {
	t.Helper()
	ctx := context.Background()
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
	if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
}

// TestKernelFilesystemVolumes: btrfs and f2fs volumes through the CSI API
// on ublk devices: formatted in zoned mode at the first stage, mounted with
// the capability's mount flags, bind-mounted at the target, reporting
// filesystem bytes and inodes; a file written survives unstage and a second
// stage (which must not reformat), and the filesystem's writes went into
// sequential zones.
func TestKernelFilesystemVolumes(t *testing.T) {
	_, dir, p, ctl, node := pluginWithClients(t)
	ctx := context.Background()
	for _, tc := range []struct {
		fstype string
		params map[string]string
		size   int64
		mode   string // what the kernel says of the mounted filesystem
	}{
		{"btrfs", map[string]string{"zone.size": "16Mi", "zone.max_open_zones": "8", "zone.max_active_zones": "8"}, 512 << 20,
			"zoned mode enabled with zone size 16777216"},
		{"f2fs", map[string]string{"zone.size": "16Mi", "zone.conventional_zones": "3", "zone.max_open_zones": "8", "zone.max_active_zones": "8"}, 1 << 30,
			""},
	} {
		t.Run(tc.fstype, func(t *testing.T) {
			v := &fsVolume{capability: mountCapability(tc.fstype), staging: filepath.Join(dir, tc.fstype+"-staging"),
				target: filepath.Join(dir, tc.fstype+"-pod", "mount")}
			os.MkdirAll(filepath.Dir(v.target), 0o755)
			cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-" + tc.fstype, Parameters: tc.params,
				CapacityRange: &csi.CapacityRange{RequiredBytes: tc.size}, VolumeCapabilities: []*csi.VolumeCapability{v.capability}})
			if err != nil {
				t.Fatal(err)
			}
			v.id = cv.Volume.VolumeId
			dmesgBefore := vmtest.Run(t, "dmesg")
			v.stage(t, node)
			if got := strings.TrimSpace(vmtest.Run(t, "findmnt", "-n", "-o", "FSTYPE", v.target)); got != tc.fstype {
				t.Fatalf("the target holds %q, want %s", got, tc.fstype)
			}
			if opts := vmtest.Run(t, "findmnt", "-n", "-o", "OPTIONS", v.staging); !strings.Contains(opts, "noatime") {
				t.Errorf("staging mount options %q lack the capability's noatime", opts)
			}
			if tc.mode != "" && !strings.Contains(strings.TrimPrefix(vmtest.Run(t, "dmesg"), dmesgBefore), tc.mode) {
				t.Errorf("the kernel did not say %q", tc.mode)
			}
			data := vmtest.Pattern(32<<20, 7)
			if err := os.WriteFile(filepath.Join(v.target, "data"), data, 0o644); err != nil {
				t.Fatal(err)
			}
			vmtest.Run(t, "sync", "-f", filepath.Join(v.target, "data"))
			st, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
			if err != nil {
				t.Fatal(err)
			}
			var used, inodes *csi.VolumeUsage
			for _, u := range st.Usage {
				switch u.Unit {
				case csi.VolumeUsage_BYTES:
					used = u
				case csi.VolumeUsage_INODES:
					inodes = u
				}
			}
			df := strings.Fields(vmtest.Run(t, "df", "-B1", "--output=size,used", v.target))
			if used == nil || inodes == nil || fmt.Sprint(used.Total) != df[2] || fmt.Sprint(used.Used) != df[3] || used.Used < 32<<20 {
				t.Fatalf("stats %v, df says size and used %v (after writing 32 MiB)", st.Usage, df[2:])
			}
			if st.VolumeCondition.Abnormal || !strings.Contains(st.VolumeCondition.Message, "sequential zones") {
				t.Errorf("condition %+v", st.VolumeCondition)
			}
			// The filesystem wrote in zoned mode: sequential zones left empty.
			dev := strings.TrimSpace(vmtest.Run(t, "findmnt", "-n", "-o", "SOURCE", v.staging))
			report := vmtest.Run(t, "blkzone", "report", dev)
			if seq, empty := strings.Count(report, "SEQ_WRITE_REQUIRED"), strings.Count(report, "(em)"); empty == seq {
				t.Errorf("all %d sequential zones of %s empty after writing 32 MiB", seq, dev)
			}
			v.unstage(t, node)
			v.stage(t, node)
			if got, err := os.ReadFile(filepath.Join(v.target, "data")); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("the file written before unstaging: %v (or other contents) after staging again", err)
			}
			v.unstage(t, node)
			if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
				t.Fatal(err)
			}
		})
	}
	if n := strings.Count(p.log.String(), "formatting a new Filesystem volume"); n != 2 {
		t.Errorf("the plugin formatted %d times for 2 volumes staged twice each", n)
	}
}

// TestKernelF2FSConventionalZonesRule holds the controller's f2fs rule to
// mkfs.f2fs: with the fewest conventional zones CreateVolume accepts for
// f2fs, the stage formats and mounts; with two fewer, mkfs.f2fs -m itself
// refuses the device for too few random-write zones (so the rule asks for
// at most one zone more than f2fs needs).
func TestKernelF2FSConventionalZonesRule(t *testing.T) {
	_, dir, _, ctl, node := pluginWithClients(t)
	ctx := context.Background()
	blockCapability := blockWriter
	for _, g := range []struct {
		zoneSize string
		size     int64
	}{{"4Mi", 256 << 20}, {"16Mi", 1 << 30}, {"32Mi", 4 << 30}} {
		t.Run(g.zoneSize, func(t *testing.T) {
			create := func(name string, conventional int, c *csi.VolumeCapability) (string, error) {
				r, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: g.size},
					Parameters:         map[string]string{"zone.size": g.zoneSize, "zone.conventional_zones": fmt.Sprint(conventional)},
					VolumeCapabilities: []*csi.VolumeCapability{c}})
				if err != nil {
					return "", err
				}
				t.Cleanup(func() { ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: r.Volume.VolumeId}) })
				return r.Volume.VolumeId, nil
			}
			least := 1
			for ; least < 16; least++ {
				if _, err := create("probe", least, mountCapability("f2fs")); err == nil {
					break
				} else if !strings.Contains(err.Error(), "zone.conventional_zones") {
					t.Fatalf("f2fs refused for another reason than its conventional zones: %v", err)
				}
			}
			v := &fsVolume{id: "probe", capability: mountCapability("f2fs"), staging: filepath.Join(dir, g.zoneSize+"-staging"),
				target: filepath.Join(dir, g.zoneSize+"-mount")}
			v.stage(t, node)
			v.unstage(t, node)
			t.Logf("%s zones, %d MiB: the rule asks for %d conventional zones", g.zoneSize, g.size>>20, least)
			if least < 3 {
				return // nothing to try below
			}
			id, err := create("fewer", least-2, blockCapability)
			if err != nil {
				t.Fatal(err)
			}
			staging, target := filepath.Join(dir, g.zoneSize+"-block-staging"), filepath.Join(dir, g.zoneSize+"-dev")
			os.MkdirAll(staging, 0o755)
			if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCapability}); err != nil {
				t.Fatal(err)
			}
			if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: blockCapability}); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("mkfs.f2fs", "-f", "-m", target).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "not have enough random write zones") {
				t.Errorf("mkfs.f2fs -m with %d conventional zones (the rule's %d less 2): %v\n%s", least-2, least, err, out)
			}
			node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		})
	}
}

// TestKernelDatabases runs RocksDB (db_bench) on btrfs and on f2fs volumes
// and PostgreSQL (pgbench) on a btrfs volume, each staged through the CSI
// API, with the checks of test/e2e/db-workloads.sh: the databases' own
// verification, SIGKILL in the middle of durable writes, reopening. The
// RocksDB run on btrfs has the plugin killed and started again under it
// too (the ublk device recovered): the database must not see an error.
func TestKernelDatabases(t *testing.T) {
	bin := vmtest.ZQCSI(t, "../cmd/zq-csi")
	script, err := filepath.Abs("../test/e2e/db-workloads.sh")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, workload, fstype string
		restart                bool // kill and restart the plugin under the workload
	}{
		{"rocksdb on f2fs", "rocksdb", "f2fs", false},
		{"postgres on btrfs", "postgres", "btrfs", false},
		{"rocksdb on btrfs across a plugin restart", "rocksdb", "btrfs", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := startPlugin(t, bin, dir)
			ctl, node, done := csiClients(t, p)
			defer func() { done() }()
			ctx := context.Background()
			// 1 GiB in 16 MiB zones; f2fs's metadata in 3 conventional zones.
			params := map[string]string{"zone.size": "16Mi", "zone.conventional_zones": "3"}
			if tc.fstype == "f2fs" {
				// btrfs runs without an active-zone limit: with one, the
				// kernel's btrfs (6.12) aborts its transaction under
				// fsync-heavy load (README, "Filesystem volumes")
				params["zone.max_open_zones"], params["zone.max_active_zones"] = "8", "8"
			}
			v := &fsVolume{capability: mountCapability(tc.fstype), staging: filepath.Join(dir, "staging"), target: filepath.Join(dir, "pod", "mount")}
			os.MkdirAll(filepath.Dir(v.target), 0o755)
			cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-db", Parameters: params,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapabilities: []*csi.VolumeCapability{v.capability}})
			if err != nil {
				t.Fatal(err)
			}
			v.id = cv.Volume.VolumeId
			// PostgreSQL runs as the user postgres, who must reach the
			// mount point through the test's private directories.
			for d := filepath.Dir(v.target); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
				os.Chmod(d, 0o755)
			}
			v.stage(t, node)
			// Unstaged even when the test fails: a device left without its
			// plugin would hold up the guest's shutdown.
			defer func() {
				node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
				node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
			}()
			w := vmtest.Start(t, "bash", script, tc.workload, v.target)
			if tc.restart {
				time.Sleep(10 * time.Second)
				p.cmd.Process.Kill()
				<-p.exited
				done()
				p = startPlugin(t, bin, dir)
				ctl, node, done = csiClients(t, p)
			}
			select {
			case err = <-w.Done():
			case <-time.After(10 * time.Minute):
				t.Fatalf("%s did not finish in 10 minutes:\n%s", tc.workload, w.Out)
			}
			for _, line := range strings.Split(w.Out.String(), "\n") {
				switch {
				case strings.HasPrefix(line, "not ok - "):
					t.Error(strings.TrimPrefix(line, "not ok - "))
				case strings.HasPrefix(line, "# figure: "):
					t.Log(line[2:])
				}
			}
			if err != nil || !strings.Contains(w.Out.String(), "ok - ") {
				t.Fatalf("%s: %v\n%s\nthe plugin's log:\n%s", tc.workload, err, w.Out, tail(p.log.String(), 30))
			}
			if tc.restart && !strings.Contains(p.log.String(), "took back a staged volume") {
				t.Errorf("the new plugin did not take the volume back:\n%s", tail(p.log.String(), 20))
			}
			v.unstage(t, node)
			if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestKernelDatabaseUnderInjectedWriteErrors: RocksDB on a btrfs volume
// whose writes all fail (a fault injected through the plugin's socket)
// reports the I/O error instead of acknowledging writes; the volume's
// condition says a fault is active. With the fault gone and the volume
// staged again, the database opens, passes its checks and holds every key
// written before.
func TestKernelDatabaseUnderInjectedWriteErrors(t *testing.T) {
	bin, dir, p, ctl, node := pluginWithClients(t)
	ctx := context.Background()
	v := &fsVolume{capability: mountCapability("btrfs"), staging: filepath.Join(dir, "staging"), target: filepath.Join(dir, "pod", "mount")}
	os.MkdirAll(filepath.Dir(v.target), 0o755)
	cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-faulty-db", Parameters: map[string]string{"zone.size": "16Mi"},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapabilities: []*csi.VolumeCapability{v.capability}})
	if err != nil {
		t.Fatal(err)
	}
	v.id = cv.Volume.VolumeId
	v.stage(t, node)
	defer func() {
		node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target})
		node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
	}()
	const n = 20000
	db := filepath.Join(v.target, "rocksdb")
	common := []string{"--db=" + db, fmt.Sprintf("--num=%d", n), "--value_size=100", "--compression_type=none", "--seed=1"}
	vmtest.Run(t, "db_bench", append(common, "--benchmarks=fillseq")...)
	vmtest.Run(t, "sync", "-f", v.target)

	fault := func(args ...string) string {
		return vmtest.Run(t, bin, append([]string{"fault", "--socket", p.faults, "--volume", v.id}, args...)...)
	}
	fault("add", "error:op=write")
	out, err := exec.Command("db_bench", append(common, "--use_existing_db=1", "--benchmarks=overwrite", "--sync=1")...).CombinedOutput()
	if err == nil {
		t.Errorf("db_bench overwrite with every write failing reported no error:\n%s", tail(string(out), 10))
	}
	t.Logf("db_bench under the fault: %v: %s", err, tail(string(out), 3))
	st, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
	if err != nil || !st.VolumeCondition.Abnormal || !strings.Contains(st.VolumeCondition.Message, "#1 error:op=write") {
		t.Errorf("volume condition under the fault: %+v, %v", st.GetVolumeCondition(), err)
	}
	fault("remove", "all")
	v.unstage(t, node)
	v.stage(t, node)
	if out := vmtest.Run(t, "ldb", "--db="+db, "checkconsistency"); !strings.Contains(out, "OK") {
		t.Errorf("ldb checkconsistency after the fault: %s", out)
	}
	out, err = exec.Command("db_bench", append(common, "--use_existing_db=1", "--benchmarks=readrandom", fmt.Sprintf("--reads=%d", n), "--verify_checksum=1")...).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(fmt.Sprintf("(%d of %d found)", n, n))) {
		t.Errorf("the keys written before the fault: %v\n%s", err, tail(string(out), 10))
	}
	st, err = node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: v.target})
	if err != nil || st.VolumeCondition.Abnormal {
		t.Errorf("volume condition with the fault removed: %+v, %v", st.GetVolumeCondition(), err)
	}
}

// csiClients connects to a plugin; done closes the connection.
// pluginWithClients starts the plugin built from ../cmd/zq-csi in a new
// directory and connects to it, for the test's length.
func pluginWithClients(t testing.TB) (bin, dir string, p *plugin, ctl csi.ControllerClient, node csi.NodeClient) {
	t.Helper()
	bin = vmtest.ZQCSI(t, "../cmd/zq-csi")
	dir = t.TempDir()
	p = startPlugin(t, bin, dir)
	ctl, node, done := csiClients(t, p)
	t.Cleanup(done)
	return bin, dir, p, ctl, node
}

func csiClients(t testing.TB, p *plugin) (csi.ControllerClient, csi.NodeClient, func()) {
	t.Helper()
	conn, err := grpc.NewClient(p.endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return csi.NewControllerClient(conn), csi.NewNodeClient(conn), func() { conn.Close() }
}

// TestKernelSnapshotAndCloneOfAFilledVolume: a zoned volume 90% written by
// fio and still attached is snapshotted and cloned; a volume restored
// from the snapshot and the clone, attached through ublk, report the
// source's zones (its open zone closed, as after any reopen) and read the
// same bytes; writing the clone changes nothing in the source.
func TestKernelSnapshotAndCloneOfAFilledVolume(t *testing.T) {
	_, dir, _, ctl, node := pluginWithClients(t)
	ctx := context.Background()
	capability := blockWriter
	params := map[string]string{"zone.size": "16Mi", "zone.max_open_zones": "4", "zone.max_active_zones": "4"}
	create := func(name string, src *csi.VolumeContentSource) string {
		cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
			Parameters: params, VolumeCapabilities: []*csi.VolumeCapability{capability}, VolumeContentSource: src})
		if err != nil {
			t.Fatalf("CreateVolume %s: %v", name, err)
		}
		return cv.Volume.VolumeId
	}
	publish := func(id string) (string, func()) { return publishBlock(t, node, dir, id) }
	src := create("pvc-golden", nil)
	srcDev, unpublishSrc := publish(src)
	defer unpublishSrc()
	// 14 zones full and a fifteenth half written, left open: 90%. (fio
	// rounds a zoned job's size down to whole zones.)
	vmtest.Run(t, "fio", "--name=fill", "--filename="+srcDev, "--zonemode=zbd", "--direct=1", "--ioengine=psync",
		"--rw=write", "--bs=1M", "--size=224M", "--max_open_zones=4")
	vmtest.Run(t, "dd", "if=/dev/urandom", "of="+srcDev, "bs=1M", "count=8", "seek=224", "oflag=direct")
	report := func(dev string) string {
		// An open zone comes back closed: compare them as closed.
		return regexp.MustCompile(`zcond: ?[23]\(o[ie]\)`).ReplaceAllString(vmtest.Run(t, "blkzone", "report", dev), "zcond: 4(cl)")
	}
	want := report(srcDev)
	if !regexp.MustCompile(`zcond: ?2\(oi\)`).MatchString(vmtest.Run(t, "blkzone", "report", srcDev)) {
		t.Fatalf("the source has no open zone to come back closed:\n%s", want)
	}

	snap, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "golden-1", SourceVolumeId: src})
	if err != nil {
		t.Fatal(err)
	}
	restored := create("pvc-restored", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}})
	clone := create("pvc-clone", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}})
	for _, id := range []string{restored, clone} {
		dev, unpublish := publish(id)
		if got := report(dev); got != want {
			t.Errorf("%s: zone report\n%s\nwant the source's\n%s", id, got, want)
		}
		if out, err := exec.Command("cmp", srcDev, dev).CombinedOutput(); err != nil {
			t.Errorf("%s does not read as its source: %v %s", id, err, out)
		}
		vmtest.Run(t, "dd", "if=/dev/urandom", "of="+dev, "bs=1M", "count=1", "oflag=direct", fmt.Sprintf("seek=%d", 232))
		unpublish()
	}
	if got := report(srcDev); got != want {
		t.Errorf("the source changed when its copies were written:\n%s\nwant\n%s", got, want)
	}
	unpublishSrc()
	for _, id := range []string{restored, clone, src} {
		if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "pool", "*")); len(left) != 0 {
		t.Errorf("left in the pool: %v", left)
	}
}

// publishBlock stages and publishes Block volume id through ublk under
// dir and returns its /dev node and how to unpublish and unstage it.
func publishBlock(t testing.TB, node csi.NodeClient, dir, id string) (device string, unpublish func()) {
	t.Helper()
	ctx := context.Background()
	staging, target := filepath.Join(dir, id, "staging"), filepath.Join(dir, id, "dev")
	os.MkdirAll(staging, 0o755)
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: blockWriter, VolumeContext: map[string]string{"attach": "ublk"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: blockWriter}); err != nil {
		t.Fatal(err)
	}
	return deviceNode(t, target), func() {
		node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	}
}

// TestKernelZoneResetGivesSpaceBackToTheNode: zones written through ublk
// and reset with blkzone give their space back to the node at the
// device's next flush: du of the volume's image drops by them, and
// GetCapacity grows by them.
func TestKernelZoneResetGivesSpaceBackToTheNode(t *testing.T) {
	_, dir, _, ctl, node := pluginWithClients(t)
	ctx := context.Background()
	cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-resets", CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
		Parameters: map[string]string{"zone.size": "16Mi"}, VolumeCapabilities: []*csi.VolumeCapability{blockWriter}})
	if err != nil {
		t.Fatal(err)
	}
	id := cv.Volume.VolumeId
	dev, unpublish := publishBlock(t, node, dir, id)
	image := filepath.Join(dir, "pool", id+".qcow2")
	measure := func() (du, free int64) {
		t.Helper()
		vmtest.Run(t, "sync", dev) // fsync: the device's flush
		var st unix.Stat_t
		if err := unix.Stat(image, &st); err != nil {
			t.Fatal(err)
		}
		c, err := ctl.GetCapacity(ctx, &csi.GetCapacityRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512, c.AvailableCapacity
	}
	// Six zones of 16 MiB written, then four reset: 64 MiB to give back.
	vmtest.Run(t, "dd", "if=/dev/urandom", "of="+dev, "bs=1M", "count=96", "oflag=direct")
	du1, free1 := measure()
	vmtest.Run(t, "blkzone", "reset", "--count", "4", dev)
	du2, free2 := measure()
	t.Logf("du of the image %d -> %d bytes, GetCapacity %d -> %d", du1, du2, free1, free2)
	const given, slack = 64 << 20, 4 << 20
	if du1-du2 < given-slack {
		t.Errorf("du of the image went from %d to %d bytes over a reset of 64 MiB", du1, du2)
	}
	if free2-free1 < given-slack {
		t.Errorf("GetCapacity went from %d to %d bytes over a reset of 64 MiB", free1, free2)
	}
	if out := vmtest.Run(t, "blkzone", "report", "--count", "6", dev); strings.Count(out, "zcond: 1(em)") != 4 {
		t.Errorf("the reset zones are not empty:\n%s", out)
	}
	unpublish()
	if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkKernelIdleStagedVolumes stages 32 zoned volumes at once through
// ublk and leaves them idle: the plugin's resident memory per staged
// volume (over the plugin with none, and in all), and the CPU it takes
// while they idle, in percent of one CPU per volume. One measurement,
// whatever b.N.
func BenchmarkKernelIdleStagedVolumes(b *testing.B) {
	const volumes, idle = 32, 10 * time.Second
	_, dir, p, ctl, node := pluginWithClients(b)
	ctx := context.Background()
	pid := p.cmd.Process.Pid
	time.Sleep(time.Second) // the plugin's start-up settles
	before := residentBytes(b, pid)
	for i := range volumes {
		cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: fmt.Sprintf("pvc-idle-%d", i), CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
			Parameters: map[string]string{"zone.size": "16Mi"}, VolumeCapabilities: []*csi.VolumeCapability{blockWriter}})
		if err != nil {
			b.Fatal(err)
		}
		_, unpublish := publishBlock(b, node, dir, cv.Volume.VolumeId)
		defer unpublish()
	}
	time.Sleep(2 * time.Second)
	b.ResetTimer()
	staged := residentBytes(b, pid)
	cpu0 := cpuTicks(b, pid)
	time.Sleep(idle)
	cpu := float64(cpuTicks(b, pid)-cpu0) / 100 / idle.Seconds() * 100 // USER_HZ is 100
	b.StopTimer()
	b.ReportMetric(float64(staged-before)/volumes/(1<<20), "MiB/volume-added")
	b.ReportMetric(float64(staged)/volumes/(1<<20), "MiB/volume-all")
	b.ReportMetric(cpu/volumes, "%cpu/volume-idle")
	b.ReportMetric(cpu, "%cpu-idle")
}

// residentBytes is VmRSS of process pid.
func residentBytes(t testing.TB, pid int) int64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var kib int64
	for _, line := range strings.Split(string(status), "\n") {
		if _, err := fmt.Sscanf(line, "VmRSS: %d kB", &kib); err == nil {
			return kib << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// cpuTicks is the user and system time process pid has used, in clock
// ticks (proc(5): fields 14 and 15 of /proc/PID/stat).
func cpuTicks(t testing.TB, pid int) int64 {
	t.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The command name, in parentheses, may hold spaces: count from after it.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	var utime, stime int64
	if _, err := fmt.Sscan(fields[11], &utime); err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Sscan(fields[12], &stime); err != nil {
		t.Fatal(err)
	}
	return utime + stime
}

// deviceNode names the /dev node of the block device file at path: the
// plugin publishes a bind mount of it, and blkzone finds a device's zone
// size in sysfs by its /dev name.
func deviceNode(t testing.TB, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	uevent, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/uevent", unix.Major(st.Rdev), unix.Minor(st.Rdev)))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(uevent), "\n") {
		if name, ok := strings.CutPrefix(line, "DEVNAME="); ok {
			return "/dev/" + name
		}
	}
	t.Fatalf("%s: no DEVNAME in its uevent:\n%s", path, uevent)
	return ""
}
