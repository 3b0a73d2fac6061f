package ublk

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ControlPath is the ublk control device.
const ControlPath = "/dev/ublk-control"

// Control issues commands to the ublk driver through /dev/ublk-control. It
// is safe for concurrent use (commands are serialized); a command that
// blocks in the kernel (START_DEV waits for the queues) blocks the others.
type Control struct {
	mu   sync.Mutex
	f    *os.File
	ring *ring
	// mem holds a command's buffer while the kernel has its address: the
	// kernel runs control commands in a worker thread, after the submit,
	// and a Go buffer could be on a goroutine stack, which moves.
	mem []byte
}

// OpenControl opens the control device. The error says what is missing
// when the module is not loaded or the kernel has no ublk.
func OpenControl() (*Control, error) { return openControl(ControlPath) }

func openControl(path string) (*Control, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s does not exist: load the ublk_drv module (modprobe ublk_drv; Linux >= 6.6 for zoned devices): %w", path, ErrUnavailable)
		}
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	r, err := newRing(4, true)
	if err != nil {
		f.Close()
		return nil, err
	}
	mem, err := unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		r.close()
		f.Close()
		return nil, fmt.Errorf("ublk control buffer: %w", err)
	}
	return &Control{f: f, ring: r, mem: mem}, nil
}

// Close releases the control device.
func (c *Control) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ring.close()
	unix.Munmap(c.mem)
	return c.f.Close()
}

// ctrlCmd is struct ublksrv_ctrl_cmd.
type ctrlCmd struct {
	devID   uint32
	queueID uint16
	buf     []byte // addr and len
	data    uint64
}

// do runs one control command and returns its result (>= 0) or the errno.
func (c *Control) do(nr uint32, read bool, cmd ctrlCmd) (int32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, err := c.ring.sqe()
	if err != nil {
		return 0, err
	}
	prepURingCmd(e, int(c.f.Fd()), ioc(nr, ctrlCmdSize, read), uint64(nr))
	a := cmdArea(e)
	le.PutUint32(a[0:], cmd.devID)
	le.PutUint16(a[4:], cmd.queueID)
	if len(cmd.buf) > 0 {
		copy(c.mem, cmd.buf)
		le.PutUint16(a[6:], uint16(len(cmd.buf)))
		le.PutUint64(a[8:], uint64(uintptr(unsafe.Pointer(&c.mem[0]))))
	}
	le.PutUint64(a[16:], cmd.data)
	// Wait for this command's completion itself: io_uring_enter returns
	// once the entry is submitted if a signal cuts its wait short.
	var res int32
	for got := false; !got; {
		if err := c.ring.submit(1); err != nil {
			return 0, err
		}
		c.ring.reap(func(e cqe) {
			if e.userData == uint64(nr) {
				res, got = e.res, true
			}
		})
	}
	copy(cmd.buf, c.mem)
	if res < 0 {
		return res, unix.Errno(-res)
	}
	return res, nil
}

const noQueue = 0xffff

func cmdName(nr uint32) string {
	switch nr {
	case cmdGetQueueAffinity:
		return "GET_QUEUE_AFFINITY"
	case cmdGetDevInfo:
		return "GET_DEV_INFO"
	case cmdAddDev:
		return "ADD_DEV"
	case cmdDelDev:
		return "DEL_DEV"
	case cmdStartDev:
		return "START_DEV"
	case cmdStopDev:
		return "STOP_DEV"
	case cmdSetParams:
		return "SET_PARAMS"
	case cmdGetParams:
		return "GET_PARAMS"
	case cmdStartRecovery:
		return "START_USER_RECOVERY"
	case cmdEndRecovery:
		return "END_USER_RECOVERY"
	case cmdGetFeatures:
		return "GET_FEATURES"
	}
	return fmt.Sprintf("command %#x", nr)
}

// devCmd runs a command on device id and wraps its error with the names.
func (c *Control) devCmd(nr uint32, read bool, id uint32, buf []byte, data uint64) error {
	_, err := c.do(nr, read, ctrlCmd{devID: id, queueID: noQueue, buf: buf, data: data})
	if err != nil {
		return fmt.Errorf("ublk %s of device %d: %w", cmdName(nr), id, err)
	}
	return nil
}

// Features returns the UBLK_F_* flags the driver supports.
func (c *Control) Features() (uint64, error) {
	b := make([]byte, 8)
	if _, err := c.do(cmdGetFeatures, true, ctrlCmd{queueID: noQueue, buf: b}); err != nil {
		return 0, fmt.Errorf("ublk GET_FEATURES: %w", err)
	}
	return le.Uint64(b), nil
}

// AddDevice creates /dev/ublkcN with info (ID ^uint32(0) picks the first
// free number) and returns what the kernel accepted.
func (c *Control) AddDevice(info DevInfo) (DevInfo, error) {
	b := info.encode()
	if _, err := c.do(cmdAddDev, false, ctrlCmd{devID: info.ID, queueID: noQueue, buf: b}); err != nil {
		return DevInfo{}, fmt.Errorf("ublk ADD_DEV: %w", err)
	}
	return decodeDevInfo(b), nil
}

// DeviceInfo returns device id's info; unix.ENODEV when there is none.
func (c *Control) DeviceInfo(id uint32) (DevInfo, error) {
	b := make([]byte, devInfoSize)
	if err := c.devCmd(cmdGetDevInfo, true, id, b, 0); err != nil {
		return DevInfo{}, err
	}
	return decodeDevInfo(b), nil
}

// QueueAffinity returns the CPUs whose requests go to queue q of device id
// (the kernel's map of CPUs to hardware queues).
func (c *Control) QueueAffinity(id uint32, q uint16) (unix.CPUSet, error) {
	var set unix.CPUSet
	b := make([]byte, unsafe.Sizeof(set))
	if _, err := c.do(cmdGetQueueAffinity, true, ctrlCmd{devID: id, queueID: noQueue, buf: b, data: uint64(q)}); err != nil {
		return set, fmt.Errorf("ublk GET_QUEUE_AFFINITY of device %d queue %d: %w", id, q, err)
	}
	for cpu := 0; cpu < len(b)*8; cpu++ {
		if b[cpu/8]&(1<<(cpu%8)) != 0 {
			set.Set(cpu)
		}
	}
	return set, nil
}

// SetParams sets a device's parameters (before START_DEV).
func (c *Control) SetParams(id uint32, p Params) error {
	return c.devCmd(cmdSetParams, false, id, p.encode(), 0)
}

// Params returns a device's parameters.
func (c *Control) Params(id uint32) (Params, error) {
	b := make([]byte, paramsSize)
	le.PutUint32(b, paramsSize)
	if err := c.devCmd(cmdGetParams, true, id, b, 0); err != nil {
		return Params{}, err
	}
	return decodeParams(b), nil
}

// Start adds the block device once every queue has fetched; it blocks
// until then, and serves the partition scan and zone revalidation through
// the queues, which must already be running.
func (c *Control) Start(id uint32, pid int) error {
	return c.devCmd(cmdStartDev, false, id, nil, uint64(pid))
}

// Stop removes the block device: in-flight requests complete first, then
// the queues' fetches end with an abort.
func (c *Control) Stop(id uint32) error { return c.devCmd(cmdStopDev, false, id, nil, 0) }

// Delete removes the device once nothing holds its character device.
func (c *Control) Delete(id uint32) error { return c.devCmd(cmdDelDev, false, id, nil, 0) }

// StartRecovery readies a quiesced device (its server died) for new queues.
func (c *Control) StartRecovery(id uint32) error {
	return c.devCmd(cmdStartRecovery, false, id, nil, 0)
}

// EndRecovery makes a recovered device live again once every new queue has
// fetched; the requests held meanwhile are issued to the new queues.
func (c *Control) EndRecovery(id uint32, pid int) error {
	return c.devCmd(cmdEndRecovery, false, id, nil, uint64(pid))
}
