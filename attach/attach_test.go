package attach

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/nbd"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// The kernel side of attaching runs in the VM tier (attach_vm_test.go of
// the frontends, cmd/zq-csi and driver); these are the rules this package
// decides alone, on real images.

func openVolume(t *testing.T, zonedImage, readOnly bool) *volume.Volume {
	t.Helper()
	path := filepath.Join(t.TempDir(), "v.qcow2")
	if zonedImage {
		g := zoned.Geometry{ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, ConventionalZones: 1, MaxAppendBytes: 64 << 10}
		if _, err := volume.CreateZoned(path, image.CreateOptions{Size: 8 << 20}, g); err != nil {
			t.Fatal(err)
		}
	} else if err := image.Create(path, image.CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := volume.Open(path, image.OpenOptions{ReadOnly: readOnly})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Error(err)
		}
	})
	return v
}

func TestNBDOptionsKeepZonesInOrder(t *testing.T) {
	for _, tc := range []struct {
		name                string
		zoned, readOnly     bool
		given               Options
		wantConns           int
		wantBlock           int64
		wantIndex           int
		wantNotADeviceError bool
	}{
		{name: "a zoned volume gets one connection and 512-byte blocks", zoned: true, wantConns: 1, wantBlock: 512, wantIndex: nbd.Any},
		{name: "a zoned volume keeps what it is told", zoned: true, given: Options{Connections: 4, BlockSize: 4096}, wantConns: 4, wantBlock: 4096, wantIndex: nbd.Any},
		{name: "a plain volume leaves the defaults to nbd", wantConns: 0, wantBlock: 0, wantIndex: nbd.Any},
		{name: "a named device is used", given: Options{NBDDevice: "/dev/nbd3"}, wantIndex: 3},
		{name: "a read-only volume is a read-only device", readOnly: true, wantIndex: nbd.Any},
		{name: "a path that is no nbd device is refused", given: Options{NBDDevice: "/dev/sda"}, wantNotADeviceError: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := openVolume(t, tc.zoned, tc.readOnly)
			opts, index, err := nbdOptions(v, tc.given)
			if tc.wantNotADeviceError {
				if !errors.Is(err, ErrNotADevice) {
					t.Fatalf("err = %v, want ErrNotADevice", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if opts.Connections != tc.wantConns || opts.BlockSize != tc.wantBlock || index != tc.wantIndex {
				t.Errorf("connections %d, block size %d, index %d; want %d, %d, %d",
					opts.Connections, opts.BlockSize, index, tc.wantConns, tc.wantBlock, tc.wantIndex)
			}
			if opts.ReadOnly != tc.readOnly {
				t.Errorf("read-only %v, want %v", opts.ReadOnly, tc.readOnly)
			}
			if opts.BackendID != volume.BackendID(v.Path) {
				t.Errorf("backend ID %q, want the volume's %q", opts.BackendID, volume.BackendID(v.Path))
			}
		})
	}
}

func TestUBLKOptionsCarryTheVolumesTag(t *testing.T) {
	v := openVolume(t, true, false)
	o := ublkOptions(v, Options{Queues: 3, QueueDepth: 16, BlockSize: 4096, Connections: 9, Timeout: time.Second})
	if o.Queues != 3 || o.QueueDepth != 16 || o.LogicalBlockSize != 4096 {
		t.Errorf("queues %d, depth %d, block size %d; want 3, 16, 4096", o.Queues, o.QueueDepth, o.LogicalBlockSize)
	}
	if o.Tag == 0 || o.Tag != volume.Tag(v.Path) {
		t.Errorf("tag %#x, want the volume's %#x", o.Tag, volume.Tag(v.Path))
	}
}

// Requests this package refuses before it reaches a kernel: they fail the
// same on any host.
func TestRefusedBeforeTheKernel(t *testing.T) {
	v := openVolume(t, true, false)
	for _, tc := range []struct {
		name string
		run  func() error
		want error // nil: any error, checked by text below
		text string
	}{
		{name: "an unknown frontend", run: func() error { _, err := Attach(v, Options{Frontend: "iscsi"}); return err }, text: `frontend "iscsi": must be ublk or nbd`},
		{name: "recovering a path that names no device", run: func() error { _, err := Recover(v, "/dev/sda", Options{}); return err }, want: ErrNotADevice},
		{name: "recovering a malformed nbd path", run: func() error { _, err := Recover(v, "/dev/nbdx", Options{}); return err }, want: ErrNotADevice},
		{name: "an interrupted nbd attach has no device to recover", run: func() error { _, err := Recover(v, "", Options{Frontend: NBD}); return err }, want: ErrGone},
		{name: "removing a path that names no device", run: func() error { return Remove("/dev/sda") }, want: ErrNotADevice},
		{name: "removing a malformed ublk path", run: func() error { return Remove("/dev/ublkb-1") }, want: ErrNotADevice},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			switch {
			case err == nil:
				t.Fatal("no error")
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("err = %v, want %v", err, tc.want)
			case tc.text != "" && err.Error() != tc.text:
				t.Fatalf("err = %q, want %q", err, tc.text)
			}
		})
	}
}

func TestForgetWithoutADeviceIsNoOp(t *testing.T) {
	if err := Forget("", "/var/lib/zq-csi/v.qcow2"); err != nil {
		t.Fatal(err)
	}
}
