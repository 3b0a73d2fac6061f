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
	exited   chan error
}

// startPlugin runs `zq-csi serve` on dir's socket, pool and state.
func startPlugin(t *testing.T, bin, dir string) *plugin {
	t.Helper()
	sock := filepath.Join(dir, "csi.sock")
	os.Remove(sock)
	p := &plugin{endpoint: "unix://" + sock, log: &bytes.Buffer{}, exited: make(chan error, 1)}
	p.cmd = exec.Command(bin, "serve", "--endpoint", p.endpoint, "--node-id", "vm-node",
		"--pool", filepath.Join(dir, "pool"), "--state-dir", filepath.Join(dir, "state"), "-v", "2")
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
// zone parameters; every test must pass, and none may be skipped for lack
// of a capability the plugin claims.
func TestKernelCSISanity(t *testing.T) {
	sanity := os.Getenv("ZQ_CSI_SANITY_BIN")
	if sanity == "" {
		t.Fatal("ZQ_CSI_SANITY_BIN is not set (make e2e builds bin/csi-sanity)")
	}
	dir := t.TempDir()
	p := startPlugin(t, vmtest.ZQCSI(t, "../cmd/zq-csi"), dir)
	params := filepath.Join(dir, "params.yaml")
	if err := os.WriteFile(params, []byte(`zone.size: 64Mi
zone.conventional_zones: "1"
zone.max_open_zones: "4"
zone.max_active_zones: "6"
zone.max_append_bytes: 256Ki
`), 0o600); err != nil {
		t.Fatal(err)
	}
	// csi-sanity creates (and removes) the mount and staging directories.
	cmd := exec.Command(sanity, "-csi.endpoint", p.endpoint,
		"-csi.mountdir", filepath.Join(dir, "mnt"), "-csi.stagingdir", filepath.Join(dir, "stage"),
		"-csi.testvolumeaccesstype", "block", "-csi.testvolumesize", fmt.Sprint(256<<20),
		"-csi.testvolumeexpandsize", fmt.Sprint(512<<20), "-csi.testvolumeparameters", params,
		"-ginkgo.v", "-ginkgo.no-color")
	out, err := cmd.CombinedOutput()
	summary := regexp.MustCompile(`(\d+) Passed \| (\d+) Failed \| \d+ Pending \| (\d+) Skipped`).FindStringSubmatch(string(out))
	if err != nil || summary == nil || summary[2] != "0" {
		t.Fatalf("csi-sanity: %v\n%s\nplugin log:\n%s", err, tail(string(out), 200), tail(p.log.String(), 100))
	}
	// Skips csi-sanity makes for capabilities this plugin does not claim.
	// (ginkgo -v prints each skip's reason on a line of its own.)
	// (The health and GetSnapshot capabilities are CSI 1.13's; the plugin
	// speaks 1.12.)
	unclaimed := regexp.MustCompile(`^(Snapshot|CreateSnapshot|DeleteSnapshot|ListSnapshots|GetSnapshot|Volume Cloning|` +
		`ControllerPublishVolume|ControllerUnpublishVolume|Controller Publish, UnpublishVolume|ControllerModifyVolume|` +
		`Modify Volume|Modify volume|NodeExpandVolume|GroupControllerService|` +
		`ControllerGetVolumeHealth|ControllerListVolumeHealth|NodeGetVolumeHealth|NodeGetStorageHealth) not supported$`)
	reasons := regexp.MustCompile(`(?m)^\s+\[SKIPPED\] ([^\[i\n][^\n]*)$`).FindAllStringSubmatch(string(out), -1)
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

// TestKernelPluginRestartUnderIO: a pod's device keeps serving across a
// plugin restart. fio writes and verifies zones on the published device
// while the plugin is killed (SIGKILL) and started again; fio must finish
// without an error, and the volume then unpublishes, unstages and deletes.
func TestKernelPluginRestartUnderIO(t *testing.T) {
	bin := vmtest.ZQCSI(t, "../cmd/zq-csi")
	dir := t.TempDir()
	p := startPlugin(t, bin, dir)
	conn, err := grpc.NewClient(p.endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := context.Background()
	ctl, node := csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	capability := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
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
