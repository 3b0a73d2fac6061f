package driver

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/nbdattach"
	"github.com/zq-csi/zq-csi/ublk"
	"github.com/zq-csi/zq-csi/volume"
)

// Attacher hands open volumes to the kernel as block devices served by
// this process. The real one is ublk and nbd; tests use a fake.
type Attacher interface {
	// Attach serves v through backend (AttachUBLK or AttachNBD).
	Attach(v *volume.Volume, backend string) (Device, error)
	// Recover takes back device (a path Attach returned, or "" when the
	// attach was interrupted before its path was recorded) whose server,
	// an earlier plugin process, died, serving v's image. ErrGone: there
	// is no such device (any more).
	Recover(v *volume.Volume, backend, device string) (Device, error)
	// Forget removes device, whose server died and could not be taken
	// back, if it still serves image; the I/O it held fails.
	Forget(device, image string) error
}

// ErrGone: the device a volume record names does not exist (the node
// rebooted, or an attach was interrupted before the device was made).
var ErrGone = errors.New("device gone")

// Device is a volume attached to the kernel.
type Device interface {
	Path() string
	// Err is nil while the device serves; else why it stopped.
	Err() error
	// Detach syncs the block device, removes it and stops serving.
	Detach() error
}

// kernelAttacher is the real Attacher.
type kernelAttacher struct{}

var (
	ctrlOnce sync.Once
	ctrl     *ublk.Control
	ctrlErr  error
)

// control opens /dev/ublk-control once for the process.
func control() (*ublk.Control, error) {
	ctrlOnce.Do(func() { ctrl, ctrlErr = ublk.OpenControl() })
	return ctrl, ctrlErr
}

func ublkOptions(v *volume.Volume) ublk.Options {
	return ublk.Options{Tag: volume.Tag(v.Path),
		Logf: func(f string, a ...any) { klog.InfoS(fmt.Sprintf(f, a...)) }}
}

func nbdOptions(v *volume.Volume) nbdattach.Options {
	o := nbdattach.Options{Index: nbdattach.Any, DeadConnTimeout: 10 * time.Minute, BackendID: volume.BackendID(v.Path),
		Logf: func(f string, a ...any) { klog.InfoS(fmt.Sprintf(f, a...)) }}
	if v.Zones() != nil {
		// One connection keeps each zone's writes in order.
		o.Connections, o.BlockSize = 1, 512
	}
	return o
}

func (kernelAttacher) Attach(v *volume.Volume, backend string) (Device, error) {
	switch backend {
	case AttachUBLK, "":
		c, err := control()
		if err != nil {
			return nil, err
		}
		d, err := ublk.Create(c, v.Backend, ublkOptions(v))
		if err != nil {
			return nil, err
		}
		return ublkDevice{d}, nil
	case AttachNBD:
		d, err := nbdattach.Attach(v.Backend, nbdOptions(v))
		if err != nil {
			return nil, err
		}
		return nbdDevice{d}, nil
	}
	return nil, fmt.Errorf("attach %q: must be %s or %s", backend, AttachUBLK, AttachNBD)
}

func (kernelAttacher) Recover(v *volume.Volume, backend, device string) (Device, error) {
	switch {
	case backend != AttachNBD && device == "", strings.HasPrefix(device, "/dev/ublkb"):
		c, err := control()
		if err != nil {
			return nil, err
		}
		opts := ublkOptions(v)
		var id uint32
		if device == "" {
			found := false
			if id, found, err = ublk.FindByTag(c, opts.Tag); err != nil {
				return nil, err
			} else if !found {
				return nil, ErrGone
			}
		} else if id, err = ublk.ParseDevice(device); err != nil {
			return nil, err
		}
		d, err := ublk.Recover(c, id, v.Backend, opts, 30*time.Second)
		if errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("%s: %w", device, ErrGone)
		}
		if err != nil {
			return nil, err
		}
		return ublkDevice{d}, nil
	case strings.HasPrefix(device, "/dev/nbd"):
		index, err := nbdattach.ParseDevice(device)
		if err != nil {
			return nil, err
		}
		d, err := nbdattach.Recover(index, v.Backend, nbdOptions(v))
		if err != nil {
			return nil, err
		}
		return nbdDevice{d}, nil
	case device == "":
		// An nbd attach interrupted before its device was recorded: the
		// kernel fails its I/O after the dead-connection timeout.
		return nil, ErrGone
	}
	return nil, fmt.Errorf("recover %q: not a ublk or nbd device", device)
}

func (kernelAttacher) Forget(device, image string) error {
	if strings.HasPrefix(device, "/dev/ublkb") {
		id, err := ublk.ParseDevice(device)
		if err != nil {
			return err
		}
		c, err := control()
		if err != nil {
			return err
		}
		info, err := c.DeviceInfo(id)
		if errors.Is(err, unix.ENODEV) {
			return nil
		}
		if err != nil {
			return err
		}
		if info.Tag != volume.Tag(image) {
			// The number went to another volume's device since.
			return nil
		}
		err = ublk.Detach(c, id, 5*time.Second)
		if errors.Is(err, unix.ENODEV) {
			return nil
		}
		return err
	}
	if device == "" {
		return nil
	}
	index, err := nbdattach.ParseDevice(device)
	if err != nil {
		return err
	}
	if id, _ := nbdattach.BackendIDOf(index); id != volume.BackendID(image) {
		// Not connected, or the number went to another volume's device.
		return nil
	}
	return nbdattach.Disconnect(index)
}

type ublkDevice struct{ *ublk.Device }

func (u ublkDevice) Err() error {
	select {
	case <-u.Stopped():
		return errors.New("the ublk device stopped")
	default:
		return nil
	}
}

func (u ublkDevice) Detach() error {
	if err := u.Stop(); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return u.Close()
}

type nbdDevice struct{ *nbdattach.Device }

func (n nbdDevice) Err() error {
	select {
	case <-n.Done():
		return errors.New("the nbd device was disconnected")
	default:
		return nil
	}
}

func (n nbdDevice) Detach() error {
	err := n.Device.Detach()
	if werr := n.Wait(); err == nil {
		err = werr
	}
	return err
}
