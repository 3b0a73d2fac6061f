// Command csidemo is the README's demo: as a container orchestrator would,
// it asks a running `zq-csi serve` through the CSI API for a zoned volume,
// stages and publishes it, shows the published device's zones with
// blkzone, writes into a zone, reads the volume's stats, and cleans up.
//
//	csidemo --endpoint unix:///run/zq-csi/csi.sock --dir /tmp/zq-demo
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	endpoint := flag.String("endpoint", "unix:///run/zq-csi/csi.sock", "the plugin's CSI endpoint")
	dir := flag.String("dir", "/tmp/zq-demo", "where the staging and publish paths go")
	color := flag.Bool("color", false, "bold steps and commands (demo.sh sets it when its own output is a terminal)")
	flag.Parse()
	if *color {
		bold, plain = "\033[1m", "\033[0m"
	}
	if err := run(*endpoint, *dir); err != nil {
		fmt.Fprintln(os.Stderr, "csidemo:", err)
		os.Exit(1)
	}
}

var bold, plain string

func step(format string, a ...any) {
	fmt.Printf("\n%s# %s%s\n", bold, fmt.Sprintf(format, a...), plain)
}

func shell(name string, args ...string) error {
	fmt.Printf("%s$ %s %s%s\n", bold, name, strings.Join(args, " "), plain)
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

func run(endpoint, dir string) error {
	conn, err := grpc.NewClient("unix://"+strings.TrimPrefix(endpoint, "unix://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	id, ctl, node := csi.NewIdentityClient(conn), csi.NewControllerClient(conn), csi.NewNodeClient(conn)

	info, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return err
	}
	step("CSI plugin %s %s on %s", info.Name, info.VendorVersion, endpoint)

	params := map[string]string{
		"zone.size": "64Mi", "zone.conventional_zones": "2", "zone.max_open_zones": "6",
		"zone.max_active_zones": "8", "zone.max_append_bytes": "256Ki", "attach": "ublk",
	}
	capability := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	step("CreateVolume pvc-demo, 1 GiB, StorageClass parameters %v", params)
	cv, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-demo", Parameters: params,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, VolumeCapabilities: []*csi.VolumeCapability{capability}})
	if err != nil {
		return err
	}
	vol := cv.Volume
	fmt.Printf("volume %s: %d bytes, context %v, topology %v\n", vol.VolumeId, vol.CapacityBytes, vol.VolumeContext, vol.AccessibleTopology[0].Segments)

	staging := filepath.Join(dir, "staging")
	target := filepath.Join(dir, "pod", "volumeDevices", "zoned")
	for _, d := range []string{staging, filepath.Dir(target)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	step("NodeStageVolume: the plugin opens the image and attaches it through ublk")
	if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging,
		VolumeCapability: capability, VolumeContext: vol.VolumeContext}); err != nil {
		return err
	}
	step("NodePublishVolume: the device node is bind-mounted where the pod sees it (volumeMode: Block)")
	if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: capability, VolumeContext: vol.VolumeContext}); err != nil {
		return err
	}
	defer cleanup(ctl, node, vol.VolumeId, staging, target)

	step("What the pod sees: a host-managed zoned disk")
	if err := shell("lsblk", "-o", "NAME,SIZE,ZONED,ZONE-SZ,ZONE-NR,ZONE-OMAX,ZONE-AMAX,ZONE-APP", target); err != nil {
		return err
	}
	// blkzone finds a device's zone size in sysfs by its /dev name, as a
	// pod's devicePath (/dev/...) gives it: use the published device's.
	name, err := exec.Command("lsblk", "-dno", "KNAME", target).Output()
	if err != nil {
		return fmt.Errorf("lsblk %s: %w", target, err)
	}
	dev := "/dev/" + strings.TrimSpace(string(name))
	fmt.Printf("(the published device is %s)\n", dev)
	if err := shell("blkzone", "report", dev); err != nil {
		return err
	}
	step("Write 4 MiB at the start of zone 2 (the first sequential zone), then show zones 2 and 3")
	if err := shell("dd", "if=/dev/urandom", "of="+target, "bs=1M", "count=4", "seek=128", "oflag=direct", "status=none"); err != nil {
		return err
	}
	if err := shell("blkzone", "report", "--offset", "0x40000", "--count", "2", dev); err != nil {
		return err
	}
	step("A write away from the write pointer fails, as on any zoned disk:")
	shell("dd", "if=/dev/zero", "of="+target, "bs=1M", "count=1", "seek=200", "oflag=direct", "status=none")

	st, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: target})
	if err != nil {
		return err
	}
	step("NodeGetVolumeStats")
	fmt.Printf("total %d, written %d, available %d; condition: %s\n",
		st.Usage[0].Total, st.Usage[0].Used, st.Usage[0].Available, st.VolumeCondition.Message)
	fmt.Println("(written counts the 2 conventional zones, 128 MiB, in full: any of their blocks can hold data,\n" +
		" as on a zoned drive; in the sequential zones it is the data below the write pointers, here 4 MiB)")
	return nil
}

func cleanup(ctl csi.ControllerClient, node csi.NodeClient, id, staging, target string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	step("Clean up: NodeUnpublishVolume, NodeUnstageVolume, DeleteVolume")
	for _, call := range []func() error{
		func() error {
			_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			return err
		},
		func() error {
			_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			return err
		},
		func() error {
			_, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
			return err
		},
	} {
		if err := call(); err != nil {
			fmt.Fprintln(os.Stderr, "csidemo: cleanup:", err)
		}
	}
	fmt.Println("done")
}
