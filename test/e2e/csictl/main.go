// Command csictl makes the CSI calls a container orchestrator makes for a
// Filesystem or Block volume, one step per invocation, so that a shell
// test can stage a volume, lose the machine, and stage it again
// (test/e2e/power-loss.sh).
//
//	csictl -endpoint unix:///tmp/csi.sock create NAME SIZE [KEY=VALUE...]   prints the volume ID
//	csictl -endpoint ... stage ID STAGING TARGET    NodeStageVolume, then NodePublishVolume at TARGET
//	csictl -endpoint ... unstage ID STAGING TARGET  NodeUnpublishVolume, then NodeUnstageVolume
//	csictl -endpoint ... delete ID
//
// -fstype FS makes the capability a Filesystem one (btrfs, f2fs); without
// it the volume is a Block one.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	endpoint := flag.String("endpoint", "unix:///run/zq-csi/csi.sock", "the plugin's CSI endpoint")
	fstype := flag.String("fstype", "", "a Filesystem capability of this filesystem (empty: Block)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: csictl [-endpoint E] [-fstype FS] create NAME SIZE [KEY=VALUE...] | stage|unstage ID STAGING TARGET | delete ID")
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := run(*endpoint, *fstype, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "csictl:", err)
		os.Exit(1)
	}
}

func run(endpoint, fstype string, args []string) error {
	if len(args) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	ctl, node := csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	capability := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	if fstype != "" {
		capability.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fstype}}
	}
	want := func(n int) error {
		if len(args) != n {
			return fmt.Errorf("%s takes %d arguments, not %d", args[0], n-1, len(args)-1)
		}
		return nil
	}
	switch args[0] {
	case "create":
		if len(args) < 3 {
			return fmt.Errorf("create takes NAME SIZE [KEY=VALUE...]")
		}
		size, err := strconv.ParseInt(args[2], 10, 64)
		if err != nil {
			return fmt.Errorf("size %q: %w", args[2], err)
		}
		params := map[string]string{}
		for _, kv := range args[3:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("parameter %q: want KEY=VALUE", kv)
			}
			params[k] = v
		}
		r, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: args[1], Parameters: params,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{capability}})
		if err != nil {
			return err
		}
		fmt.Println(r.Volume.VolumeId)
	case "stage":
		if err := want(4); err != nil {
			return err
		}
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: args[1], StagingTargetPath: args[2], VolumeCapability: capability}); err != nil {
			return err
		}
		_, err = node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: args[1], StagingTargetPath: args[2], TargetPath: args[3], VolumeCapability: capability})
		return err
	case "unstage":
		if err := want(4); err != nil {
			return err
		}
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: args[1], TargetPath: args[3]}); err != nil {
			return err
		}
		_, err = node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: args[1], StagingTargetPath: args[2]})
		return err
	case "delete":
		if err := want(2); err != nil {
			return err
		}
		_, err = ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: args[1]})
		return err
	default:
		return fmt.Errorf("unknown step %q", args[0])
	}
	return nil
}
