// Package attach hands an open volume to the kernel as a block device
// served by this process, through one of two frontends: ublk (/dev/ublkbN,
// where a zoned volume becomes a host-managed zoned disk) or the kernel nbd
// driver (/dev/nbdN, a plain disk on which the volume still keeps its zone
// rules). It is the one place for what depends on the frontend: the choice
// between them, the rules of each, taking a device back after the process
// that served it died, removing one, and the request counts. The CLI
// (zq-csi attach and detach) and the CSI node service both attach through
// it.
package attach

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/nbd"
	"github.com/zq-csi/zq-csi/ublk"
	"github.com/zq-csi/zq-csi/volume"
)

// Frontend names the kernel driver a volume is attached through.
type Frontend string

const (
	// Auto is ublk where the kernel and the volume allow it, else nbd:
	// Attach says why on Logf. For a user at a shell; a caller that must
	// have a zoned disk asks for UBLK.
	Auto Frontend = ""
	UBLK Frontend = "ublk"
	NBD  Frontend = "nbd"
)

var (
	// ErrGone: the device to take back does not exist (any more): the
	// node rebooted, or an attach was interrupted before the device was
	// made.
	ErrGone = errors.New("device gone")
	// ErrNotADevice: a path that names neither a ublk nor an nbd device.
	ErrNotADevice = errors.New("not a ublk or nbd device (/dev/ublkbN, /dev/nbdN)")
)

// Stats are a ublk device's request counts.
type Stats = ublk.Stats

// Options tune an attach. The zero value picks the defaults.
type Options struct {
	Frontend Frontend
	// BlockSize is the logical block size, 512 or 4096 (default: 512 for
	// a zoned volume, else 4096 when the size is a multiple of it on ublk,
	// nbd's default on nbd).
	BlockSize int
	// Queues and QueueDepth are ublk's (ublk.Options).
	Queues, QueueDepth int
	// Connections, Timeout and DeadConnTimeout are nbd's
	// (nbd.Options). A zoned volume gets one connection unless told:
	// the kernel sees a plain disk and spreads writes over the
	// connections, and with one they reach the zones in the order the
	// application issued them.
	Connections              int
	Timeout, DeadConnTimeout time.Duration
	// NBDDevice is the nbd device to use, /dev/nbdN; "" takes a free one.
	NBDDevice string
	// Logf, if set, receives the device's notable events.
	Logf func(format string, args ...any)
}

func (o *Options) logf(format string, args ...any) {
	if o.Logf != nil {
		o.Logf(format, args...)
	}
}

// Device is a volume attached to the kernel and served by this process.
type Device struct {
	ublk *ublk.Device
	nbd  *nbd.Device
}

// Path is the block device: /dev/ublkbN or /dev/nbdN.
func (d *Device) Path() string {
	if d.ublk != nil {
		return d.ublk.Path()
	}
	return d.nbd.Path()
}

// Frontend is the kernel driver the device is served through.
func (d *Device) Frontend() Frontend {
	if d.ublk != nil {
		return UBLK
	}
	return NBD
}

// Done is closed when the device stopped serving: removed from elsewhere
// (zq-csi detach) or, for nbd, disconnected.
func (d *Device) Done() <-chan struct{} {
	if d.ublk != nil {
		return d.ublk.Stopped()
	}
	return d.nbd.Done()
}

// Err is nil while the device serves; else why it stopped.
func (d *Device) Err() error {
	select {
	case <-d.Done():
		if d.ublk != nil {
			return errors.New("the ublk device stopped")
		}
		return errors.New("the nbd device was disconnected")
	default:
		return nil
	}
}

// Detach syncs the block device, removes it and stops serving.
func (d *Device) Detach() error {
	if d.ublk != nil {
		err := d.ublk.Stop()
		if errors.Is(err, unix.ENODEV) {
			err = nil
		}
		select {
		case <-d.ublk.Stopped():
			// Stopped, even if the sync before failed: remove it all the
			// same, or the device would outlive its server.
			return errors.Join(err, d.ublk.Close())
		default:
			return err // still serving: nothing was removed
		}
	}
	return errors.Join(d.nbd.Detach(), d.nbd.Wait())
}

// Close stops serving a device that is Done and releases it.
func (d *Device) Close() error {
	if d.ublk != nil {
		return d.ublk.Close()
	}
	return d.nbd.Wait()
}

// Stats returns the request counts of a ublk device; ok is false on nbd,
// whose requests the kernel does not show to the server by kind.
func (d *Device) Stats() (s Stats, ok bool) {
	if d.ublk == nil {
		return Stats{}, false
	}
	return d.ublk.Stats(), true
}

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

// Attach attaches v through o.Frontend. With Auto, a kernel without ublk
// (or without zoned ublk) and a volume ublk cannot expose (zones that are
// not a power of two, a short last zone) get nbd, with a note on Logf.
func Attach(v *volume.Volume, o Options) (*Device, error) {
	switch o.Frontend {
	case Auto, UBLK:
		d, err := attachUBLK(v, o)
		if err == nil || o.Frontend == UBLK || !errors.Is(err, ublk.ErrUnavailable) && !errors.Is(err, ublk.ErrGeometry) {
			return d, err
		}
		o.logf("not using ublk: %v; using nbd", err)
		fallthrough
	case NBD:
		opts, index, err := nbdOptions(v, o)
		if err != nil {
			return nil, err
		}
		opts.Index = index
		d, err := nbd.Attach(v.Backend, opts)
		if err != nil {
			return nil, err
		}
		return &Device{nbd: d}, nil
	}
	return nil, fmt.Errorf("frontend %q: must be %s or %s", o.Frontend, UBLK, NBD)
}

func attachUBLK(v *volume.Volume, o Options) (*Device, error) {
	c, err := control()
	if err != nil {
		return nil, err
	}
	d, err := ublk.Create(c, v.Backend, ublkOptions(v, o))
	if err != nil {
		return nil, err
	}
	return &Device{ublk: d}, nil
}

func ublkOptions(v *volume.Volume, o Options) ublk.Options {
	return ublk.Options{Queues: o.Queues, QueueDepth: o.QueueDepth, LogicalBlockSize: o.BlockSize,
		Tag: volume.Tag(v.Path), Logf: o.Logf}
}

// nbdOptions are o for nbd, with its rules for a zoned volume, and the
// index of o.NBDDevice (nbd.Any for "").
func nbdOptions(v *volume.Volume, o Options) (nbd.Options, int, error) {
	index := nbd.Any
	if o.NBDDevice != "" {
		var err error
		if index, err = nbd.ParseDevice(o.NBDDevice); err != nil {
			return nbd.Options{}, 0, fmt.Errorf("%w: %w", ErrNotADevice, err)
		}
	}
	opts := nbd.Options{Connections: o.Connections, BlockSize: int64(o.BlockSize), ReadOnly: v.ReadOnly(),
		Timeout: o.Timeout, DeadConnTimeout: o.DeadConnTimeout, BackendID: volume.BackendID(v.Path), Logf: o.Logf}
	if v.Zones() != nil {
		if opts.BlockSize == 0 {
			opts.BlockSize = 512
		}
		if opts.Connections == 0 {
			opts.Connections = 1
		}
	}
	return opts, index, nil
}

// Recover takes back device, whose server (an earlier process) died, to
// serve v, which must be the image it served (the kernel keeps the
// image's tag with the device, and a device of another image is refused).
// A device "" is a ublk attach interrupted before its path was known: the
// device of v's tag is found, if any. ErrGone: there is no such device.
// The writes the kernel sends again are the volume's to accept
// (volume.Zones.AcceptReplays).
func Recover(v *volume.Volume, device string, o Options) (*Device, error) {
	switch {
	case device == "" && o.Frontend == NBD:
		// An nbd attach interrupted before its device was known: the
		// kernel fails its I/O after the dead-connection timeout.
		return nil, ErrGone
	case device == "" || strings.HasPrefix(device, "/dev/ublk"):
		c, err := control()
		if err != nil {
			return nil, err
		}
		opts := ublkOptions(v, o)
		var id uint32
		if device == "" {
			found := false
			if id, found, err = ublk.FindByTag(c, opts.Tag); err != nil {
				return nil, err
			} else if !found {
				return nil, ErrGone
			}
		} else if id, err = ublk.ParseDevice(device); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNotADevice, err)
		}
		d, err := ublk.Recover(c, id, v.Backend, opts, 30*time.Second)
		if errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("%s: %w", device, ErrGone)
		}
		if err != nil {
			return nil, err
		}
		return &Device{ublk: d}, nil
	case strings.HasPrefix(device, "/dev/nbd"):
		index, err := nbd.ParseDevice(device)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNotADevice, err)
		}
		opts, _, err := nbdOptions(v, o)
		if err != nil {
			return nil, err
		}
		d, err := nbd.Recover(index, v.Backend, opts)
		if err != nil {
			return nil, err
		}
		return &Device{nbd: d}, nil
	}
	return nil, fmt.Errorf("recover %q: %w", device, ErrNotADevice)
}

// Remove removes device from the process serving it, which then stops
// (zq-csi detach). A live ublk device is synced first; one whose server
// died is removed with its held I/O failed.
func Remove(device string) error {
	return remove(device, "")
}

// Forget removes device, whose server died and could not be taken back,
// if it still serves image (its number may have gone to another volume's
// device since); the I/O it held fails. A device that is gone is no error.
func Forget(device, image string) error {
	if device == "" {
		return nil
	}
	return remove(device, image)
}

// remove removes device; with image set, only if the device serves it,
// and a device gone already is no error.
func remove(device, image string) error {
	if strings.HasPrefix(device, "/dev/ublk") {
		id, err := ublk.ParseDevice(device)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrNotADevice, err)
		}
		c, err := control()
		if err != nil {
			return err
		}
		if image != "" {
			info, err := c.DeviceInfo(id)
			if errors.Is(err, unix.ENODEV) {
				return nil
			}
			if err != nil {
				return err
			}
			if info.Tag != volume.Tag(image) {
				return nil
			}
		}
		err = ublk.Detach(c, id, 10*time.Second)
		if image != "" && errors.Is(err, unix.ENODEV) {
			return nil
		}
		return err
	}
	index, err := nbd.ParseDevice(device)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotADevice, err)
	}
	if image != "" {
		if id, _ := nbd.BackendIDOf(index); id != volume.BackendID(image) {
			return nil // not connected, or another volume's device now
		}
	}
	return nbd.Disconnect(index)
}
