package ublk

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/bufpool"
	"github.com/zq-csi/zq-csi/volume"
)

// Sentinel errors callers branch on.
var (
	// ErrUnavailable: the kernel has no usable ublk (no control device, or
	// no zoned support when a zoned device is asked for).
	ErrUnavailable = errors.New("ublk unavailable")
	// ErrGeometry: the image's geometry is one the kernel cannot expose
	// through ublk (attach it with nbd instead).
	ErrGeometry = errors.New("geometry not supported by ublk")
	// ErrNotRecoverable: the device named for recovery is not waiting for
	// a new server, or was not created with user recovery.
	ErrNotRecoverable = errors.New("device not recoverable")
)

// Options tune a device. The zero value picks the defaults.
type Options struct {
	// Queues is the number of hardware queues, each with its own ring
	// thread, which runs on the CPUs the kernel maps to its queue (default:
	// one per CPU this process may use; the kernel caps it at the CPU
	// count).
	Queues int
	// QueueDepth is the requests in flight per queue (default 64).
	QueueDepth int
	// MaxIOBytes is the largest request (default 1 MiB, at most 32 MiB).
	MaxIOBytes int
	// LogicalBlockSize is 512 or 4096 (default 512 for a zoned device,
	// else 4096 when the size is a multiple of it).
	LogicalBlockSize int
	// Tag identifies what the device serves (volume.Tag); the kernel
	// keeps it with the device, and Recover refuses a device whose tag is
	// not the one given, so that a stale record never puts one image
	// under another's device. 0: no check.
	Tag uint64
	// Logf, if set, receives the device's notable events.
	Logf func(format string, args ...any)
}

const (
	DefaultQueueDepth = 64
	DefaultMaxIOBytes = 1 << 20
)

// Device is a ublk block device served by this process.
type Device struct {
	ctrl  *Control
	info  DevInfo
	char  *os.File
	b     volume.Backend
	zones volume.Zones // b.Zones(): nil for a plain device
	logf  func(string, ...any)

	queues  []*queue
	stopped chan struct{} // closed when every queue ended
	errMu   sync.Mutex
	err     error
	bufs    bufpool.Pool

	ops    [opReportZones + 1]atomic.Uint64 // requests served, by operation
	failed atomic.Uint64

	logMu      sync.Mutex
	lastLog    time.Time
	suppressed int
}

// Path is the block device, /dev/ublkbN.
func (d *Device) Path() string { return fmt.Sprintf("/dev/ublkb%d", d.info.ID) }

// ParseDevice returns N of /dev/ublkbN (or /dev/ublkcN).
func ParseDevice(path string) (uint32, error) {
	var n uint32
	var kind byte
	if _, err := fmt.Sscanf(path, "/dev/ublk%c%d", &kind, &n); err != nil || (kind != 'b' && kind != 'c') || fmt.Sprintf("/dev/ublk%c%d", kind, n) != path {
		return 0, fmt.Errorf("%q is not a ublk device (/dev/ublkbN)", path)
	}
	return n, nil
}

// FindByTag returns the ublk device carrying tag (a device an interrupted
// server created and did not record), if any.
func FindByTag(ctrl *Control, tag uint64) (uint32, bool, error) {
	entries, err := os.ReadDir("/sys/class/ublk-char")
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	for _, e := range entries {
		id, err := ParseDevice("/dev/" + e.Name())
		if err != nil {
			continue
		}
		info, err := ctrl.DeviceInfo(id)
		if err == nil && info.Tag == tag {
			return id, true, nil
		}
	}
	return 0, false, nil
}

// params derives the kernel parameters from the backend and options, and
// refuses what the kernel cannot expose.
func params(b volume.Backend, opts *Options) (Params, error) {
	size := b.Size()
	bs := opts.LogicalBlockSize
	if bs == 0 {
		bs = 512
		if b.Zones() == nil && size%4096 == 0 {
			bs = 4096
		}
	}
	if opts.MaxIOBytes%4096 != 0 || opts.MaxIOBytes > 32<<20 {
		return Params{}, fmt.Errorf("largest request %d bytes: must be a multiple of 4096 up to 32 MiB", opts.MaxIOBytes)
	}
	if bs != 512 && bs != 4096 {
		return Params{}, fmt.Errorf("logical block size %d: must be 512 or 4096", bs)
	}
	if size%int64(bs) != 0 {
		return Params{}, fmt.Errorf("size %d is not a multiple of the logical block size %d: %w", size, bs, ErrGeometry)
	}
	shift := uint8(9)
	if bs == 4096 {
		shift = 12
	}
	p := Params{
		LogicalBlockShift:  shift,
		PhysicalBlockShift: 12,
		MaxSectors:         uint32(opts.MaxIOBytes / 512),
		Sectors:            uint64(size / 512),
		ReadOnly:           b.ReadOnly(),
		Discard:            !b.ReadOnly(),
		DiscardGranularity: 4096,
	}
	const maxUnmapSectors = 1 << 30 // 512 GiB per discard or write zeroes
	p.MaxDiscardSectors, p.MaxWriteZeroesSectors = maxUnmapSectors, maxUnmapSectors
	if b.Zones() == nil {
		return p, nil
	}
	g := b.Zones().Geometry()
	zs := g.ZoneSize / 512
	if err := g.CheckLinux(); err != nil {
		return Params{}, fmt.Errorf("%w; attach with --frontend nbd (a plain disk, zones kept by zq-csi): %w", err, ErrGeometry)
	}
	switch {
	case zs > 1<<31:
		return Params{}, fmt.Errorf("zone size %d bytes is larger than ublk's 1 TiB limit; attach with --frontend nbd: %w", g.ZoneSize, ErrGeometry)
	case size%g.ZoneSize != 0:
		return Params{}, fmt.Errorf("size %d is not a whole number of %d-byte zones (ublk reports only whole zones); attach with --frontend nbd: %w", size, g.ZoneSize, ErrGeometry)
	}
	p.Zoned = true
	p.ChunkSectors = uint32(zs)
	p.MaxOpenZones = uint32(g.MaxOpenZones)
	p.MaxActiveZones = uint32(g.MaxActiveZones)
	p.MaxZoneAppendSectors = uint32(min(g.MaxAppendBytes, int64(opts.MaxIOBytes)) / 512)
	// Discards that cover whole zones are resets: let one request carry
	// whole zones, and split only at zone boundaries.
	p.MaxDiscardSectors = uint32(maxUnmapSectors / zs * zs)
	if p.MaxDiscardSectors == 0 {
		p.MaxDiscardSectors = uint32(zs)
	}
	// Zeros written into a sequential zone are data: bound them like writes.
	p.MaxWriteZeroesSectors = uint32(opts.MaxIOBytes / 512)
	return p, nil
}

func (opts *Options) setDefaults() {
	if opts.Queues <= 0 {
		opts.Queues = runtime.NumCPU()
	}
	if opts.QueueDepth <= 0 {
		opts.QueueDepth = DefaultQueueDepth
	}
	if opts.MaxIOBytes <= 0 {
		opts.MaxIOBytes = DefaultMaxIOBytes
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
}

func newDevice(ctrl *Control, b volume.Backend, opts Options, info DevInfo) *Device {
	return &Device{ctrl: ctrl, info: info, b: b, zones: b.Zones(), logf: opts.Logf, stopped: make(chan struct{})}
}

// Create adds a ublk device serving b, starts its queues and the block
// device, and returns once /dev/ublkbN exists. The device has user recovery
// with reissue: if this process dies, the kernel holds the device's I/O
// until Recover in a new process takes it back.
func Create(ctrl *Control, b volume.Backend, opts Options) (*Device, error) {
	opts.setDefaults()
	p, err := params(b, &opts)
	if err != nil {
		return nil, err
	}
	flags := uint64(flagUserRecovery | flagUserRecoveryReissue | flagCmdIoctlEncode | flagUserCopy)
	if b.Zones() != nil {
		flags |= flagZoned
		features, err := ctrl.Features()
		if err != nil {
			return nil, err
		}
		if features&flagZoned == 0 {
			return nil, fmt.Errorf("this kernel's ublk has no zoned devices (UBLK_F_ZONED needs Linux >= 6.6 with CONFIG_BLK_DEV_ZONED): %w", ErrUnavailable)
		}
	}
	info, err := ctrl.AddDevice(DevInfo{
		Queues:        uint16(opts.Queues),
		QueueDepth:    uint16(opts.QueueDepth),
		MaxIOBufBytes: uint32(opts.MaxIOBytes),
		ID:            ^uint32(0),
		Flags:         flags,
		Tag:           opts.Tag,
	})
	if err != nil {
		return nil, err
	}
	d := newDevice(ctrl, b, opts, info)
	if err := d.start(p, func() error { return ctrl.Start(info.ID, os.Getpid()) }); err != nil {
		ctrl.Delete(info.ID)
		return nil, err
	}
	d.logf("ublk device %d: %d queue(s) x %d, %d-byte requests, flags %#x", info.ID, info.Queues, info.QueueDepth, info.MaxIOBufBytes, info.Flags)
	return d, nil
}

// Recover takes back device id, whose server died, to serve b: it waits
// (up to wait) for the kernel to quiesce the device, starts new queues and
// makes the device live again. The requests the dead server held are
// reissued; a write it had already applied to a sequential zone arrives
// again below the zone's write pointer and is accepted when the data there
// is the same (see Device.write). A zone append it had applied cannot be
// told from a new one: it lands a second time, at the new write pointer,
// and the first copy stays in the zone unreferenced (a filesystem records
// where the completion said). The geometry must be the one the device was
// created with, and the tag (Options.Tag) the device's.
func Recover(ctrl *Control, id uint32, b volume.Backend, opts Options, wait time.Duration) (*Device, error) {
	opts.setDefaults()
	info, err := waitQuiesced(ctrl, id, wait)
	if err != nil {
		return nil, err
	}
	if info.Flags&flagUserRecovery == 0 {
		return nil, fmt.Errorf("ublk device %d was created without user recovery: %w", id, ErrNotRecoverable)
	}
	if opts.Tag != 0 && info.Tag != opts.Tag {
		return nil, fmt.Errorf("ublk device %d serves another image (tag %#x, this one's %#x): %w", id, info.Tag, opts.Tag, ErrNotRecoverable)
	}
	opts.Queues, opts.QueueDepth, opts.MaxIOBytes = int(info.Queues), int(info.QueueDepth), int(info.MaxIOBufBytes)
	want, err := params(b, &opts)
	if err != nil {
		return nil, err
	}
	have, err := ctrl.Params(id)
	if err != nil {
		return nil, err
	}
	if have.Sectors != want.Sectors || have.ChunkSectors != want.ChunkSectors || have.Zoned != want.Zoned || have.LogicalBlockShift != want.LogicalBlockShift {
		return nil, fmt.Errorf("ublk device %d has %d sectors, zone %d sectors, block shift %d; the image gives %d, %d, %d: %w",
			id, have.Sectors, have.ChunkSectors, have.LogicalBlockShift, want.Sectors, want.ChunkSectors, want.LogicalBlockShift, ErrNotRecoverable)
	}
	// The kernel refuses START_USER_RECOVERY while the dead server's
	// character device is still being released: retry briefly.
	deadline := time.Now().Add(wait)
	for {
		err = ctrl.StartRecovery(id)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	d := newDevice(ctrl, b, opts, info)
	if d.zones != nil {
		d.zones.AcceptReplays() // the kernel reissues what was in flight
	}
	if err := d.start(Params{}, func() error { return ctrl.EndRecovery(id, os.Getpid()) }); err != nil {
		return nil, err
	}
	d.logf("ublk device %d recovered: %d queue(s) x %d", id, info.Queues, info.QueueDepth)
	return d, nil
}

// waitQuiesced polls device id until the kernel has quiesced it after its
// server died.
func waitQuiesced(ctrl *Control, id uint32, wait time.Duration) (DevInfo, error) {
	deadline := time.Now().Add(wait)
	for {
		info, err := ctrl.DeviceInfo(id)
		if err != nil {
			return DevInfo{}, err
		}
		if info.State == StateQuiesced {
			return info, nil
		}
		serverAlive := info.ServerPID > 0 && syscall.Kill(int(info.ServerPID), 0) == nil
		// A dead (stopped) device, or a live one whose server runs, will not
		// become recoverable by waiting; a live one whose server just died
		// will, once the kernel has quiesced it.
		if info.State == StateDead || (info.State == StateLive && serverAlive) || time.Now().After(deadline) {
			state := map[uint16]string{StateDead: "dead", StateLive: "live"}[info.State]
			if info.State == StateLive && serverAlive {
				return DevInfo{}, fmt.Errorf("ublk device %d is live, served by pid %d: %w", id, info.ServerPID, ErrNotRecoverable)
			}
			return DevInfo{}, fmt.Errorf("ublk device %d is %s (state %d), not waiting for recovery: %w", id, state, info.State, ErrNotRecoverable)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// start opens the character device, sets the parameters (unless p is
// zero: recovery keeps them), runs the queues and then go (START_DEV or
// END_USER_RECOVERY, which wait for the queues' fetches).
func (d *Device) start(p Params, goLive func() error) error {
	charPath := fmt.Sprintf("/dev/ublkc%d", d.info.ID)
	if p.Sectors != 0 {
		if err := d.ctrl.SetParams(d.info.ID, p); err != nil {
			return err
		}
	}
	var err error
	// Without udev the node appears through devtmpfs at once; with udev it
	// may take a moment.
	for i := 0; ; i++ {
		d.char, err = os.OpenFile(charPath, os.O_RDWR, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || i == 100 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("opening %s: %w", charPath, err)
	}
	for i := 0; i < int(d.info.Queues); i++ {
		q, err := newQueue(d, i)
		if err != nil {
			d.closeQueues()
			return err
		}
		d.queues = append(d.queues, q)
	}
	var wg sync.WaitGroup
	for _, q := range d.queues {
		ready := make(chan error, 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := q.run(ready); err != nil {
				d.setErr(err)
			}
		}()
		if err := <-ready; err != nil {
			// The kernel cannot start without this queue: stopping the
			// device aborts the others' fetches.
			d.ctrl.Stop(d.info.ID)
			wg.Wait()
			d.closeQueues()
			return err
		}
	}
	go func() {
		wg.Wait()
		close(d.stopped)
	}()
	if err := goLive(); err != nil {
		d.ctrl.Stop(d.info.ID)
		<-d.stopped
		d.closeQueues()
		return err
	}
	return nil
}

func (d *Device) setErr(err error) {
	d.errMu.Lock()
	defer d.errMu.Unlock()
	if d.err == nil {
		d.err = err
	}
}

func (d *Device) closeQueues() {
	for _, q := range d.queues {
		q.close()
	}
	d.queues = nil
	if d.char != nil {
		d.char.Close()
		d.char = nil
	}
}

// Stopped is closed once the device stopped serving (Stop, or a STOP_DEV
// from elsewhere such as `zq-csi detach`).
func (d *Device) Stopped() <-chan struct{} { return d.stopped }

// Stop syncs the block device (so an application's unsynced writes are not
// dropped: a stopping ublk device fails the writeback of its page cache),
// stops it and waits for the queues to end.
func (d *Device) Stop() error {
	var syncErr error
	if f, err := os.OpenFile(d.Path(), os.O_RDONLY, 0); err == nil {
		syncErr = f.Sync()
		f.Close()
	}
	if err := d.ctrl.Stop(d.info.ID); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	<-d.stopped
	return syncErr
}

// errRunning: Close of a device that still serves.
var errRunning = errors.New("ublk device still serving: stop it first")

// Close releases the stopped device: queues, character device, then the
// device itself (DEL_DEV). It returns the first error a queue met.
func (d *Device) Close() error {
	select {
	case <-d.stopped:
	default:
		return fmt.Errorf("ublk device %d: %w", d.info.ID, errRunning)
	}
	d.closeQueues()
	err := d.ctrl.Delete(d.info.ID)
	if errors.Is(err, unix.ENODEV) {
		err = nil // deleted by `zq-csi detach`
	}
	d.errMu.Lock()
	defer d.errMu.Unlock()
	return errors.Join(d.err, err)
}

// Detach stops and deletes device id from outside its serving process:
// the server sees its queues end and exits. When the device is live its
// block device is synced first; a device whose server died is stopped
// without (a sync would wait for the recovery that is not coming).
func Detach(ctrl *Control, id uint32, wait time.Duration) error {
	info, err := ctrl.DeviceInfo(id)
	if err != nil {
		return err
	}
	if info.State == StateLive {
		if f, err := os.OpenFile(fmt.Sprintf("/dev/ublkb%d", id), os.O_RDONLY, 0); err == nil {
			f.Sync()
			f.Close()
		}
	}
	if err := ctrl.Stop(id); err != nil {
		return err
	}
	// The serving process deletes the device once its queues ended; delete
	// it here if it does not (it died).
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		if _, err := ctrl.DeviceInfo(id); errors.Is(err, unix.ENODEV) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := ctrl.Delete(id); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return nil
}
