package driver

import (
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/attach"
	"github.com/zq-csi/zq-csi/volume"
)

// Attacher attaches images to the kernel as block devices served by this
// process. The real one is package attach's; tests use a fake.
type Attacher interface {
	// Attach serves v through frontend (AttachUBLK or AttachNBD).
	Attach(v *volume.Volume, frontend string) (Device, error)
	// Recover takes back device (a path Attach returned, or "" when the
	// attach was interrupted before its path was recorded) whose server,
	// an earlier plugin process, died, serving v's image. ErrGone: there
	// is no such device (any more).
	Recover(v *volume.Volume, frontend, device string) (Device, error)
	// Forget removes device, whose server died and could not be taken
	// back, if it still serves image; the I/O it held fails.
	Forget(device, image string) error
}

// ErrGone: the device a volume record names does not exist (the node
// rebooted, or an attach was interrupted before the device was made).
var ErrGone = attach.ErrGone

// Device is a volume attached to the kernel.
type Device interface {
	Path() string
	// Err is nil while the device serves; else why it stopped.
	Err() error
	// Detach syncs the block device, removes it and stops serving.
	Detach() error
	// Stats returns the request counts of a ublk device (ok false on nbd).
	Stats() (s attach.Stats, ok bool)
}

// kernelAttacher is the real Attacher. A volume's frontend is the one its
// StorageClass names, ublk by default, never another in its place: a pod
// that asked for a zoned disk must not get a plain one.
type kernelAttacher struct{}

func attachOptions(frontend string) attach.Options {
	if frontend == "" {
		frontend = AttachUBLK
	}
	return attach.Options{Frontend: attach.Frontend(frontend), DeadConnTimeout: 10 * time.Minute,
		Logf: func(f string, a ...any) { klog.InfoS(fmt.Sprintf(f, a...)) }}
}

func (kernelAttacher) Attach(v *volume.Volume, frontend string) (Device, error) {
	return device(attach.Attach(v, attachOptions(frontend)))
}

func (kernelAttacher) Recover(v *volume.Volume, frontend, dev string) (Device, error) {
	return device(attach.Recover(v, dev, attachOptions(frontend)))
}

// device keeps a failed attach's nil out of the Device interface.
func device(d *attach.Device, err error) (Device, error) {
	if err != nil {
		return nil, err
	}
	return d, nil
}

func (kernelAttacher) Forget(device, image string) error { return attach.Forget(device, image) }
