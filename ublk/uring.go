package ublk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file is the small part of io_uring that ublk needs: a ring, its
// submission and completion queues mapped into the process, and
// io_uring_enter. A ring is not safe for concurrent use: each one belongs to
// one goroutine (a ublk queue's ring to one locked OS thread, because the
// kernel binds a queue to the task that fetches its requests).

const (
	setupSQE128 = 1 << 10 // IORING_SETUP_SQE128: 128-byte entries, for ublk control commands

	enterGetEvents = 1 << 0 // IORING_ENTER_GETEVENTS

	registerEventfd = 4 // IORING_REGISTER_EVENTFD

	cqEventfdDisabled = 1 << 0 // IORING_CQ_EVENTFD_DISABLED

	opURingCmd = 46 // IORING_OP_URING_CMD

	offSQRing = 0          // IORING_OFF_SQ_RING
	offCQRing = 0x8000000  // IORING_OFF_CQ_RING
	offSQEs   = 0x10000000 // IORING_OFF_SQES

	sqeSize = 64
	cqeSize = 16
)

// ringParams is struct io_uring_params.
type ringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		userAddr                                                        uint64
	}
	cqOff struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		userAddr                                                        uint64
	}
}

// ring is one io_uring instance.
type ring struct {
	fd      int
	sqeSize int
	sqRing  []byte
	cqRing  []byte
	sqes    []byte

	sqHead, sqTail, cqHead, cqTail *uint32
	sqMask, cqMask                 uint32
	sqArray                        []uint32
	cqes                           unsafe.Pointer
	cqFlags                        *uint32
	// pending counts entries queued by sqe but not yet handed to the kernel.
	pending uint32
}

// newRing sets up a ring of entries submission slots (a power of two); with
// big, its entries are 128 bytes (SQE128).
func newRing(entries uint32, big bool) (*ring, error) {
	var p ringParams
	r := &ring{sqeSize: sqeSize}
	if big {
		p.flags |= setupSQE128
		r.sqeSize = 2 * sqeSize
	}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup(%d entries): %w", entries, errno)
	}
	r.fd = int(fd)
	if err := r.mmap(&p); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

func (r *ring) mmap(p *ringParams) error {
	var err error
	sqLen := int(p.sqOff.array + p.sqEntries*4)
	if r.sqRing, err = unix.Mmap(r.fd, offSQRing, sqLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mapping the submission ring: %w", err)
	}
	cqLen := int(p.cqOff.cqes + p.cqEntries*cqeSize)
	if r.cqRing, err = unix.Mmap(r.fd, offCQRing, cqLen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mapping the completion ring: %w", err)
	}
	if r.sqes, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*r.sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mapping the submission entries: %w", err)
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	r.sqHead, r.sqTail = u32(r.sqRing, p.sqOff.head), u32(r.sqRing, p.sqOff.tail)
	r.sqMask = *u32(r.sqRing, p.sqOff.ringMask)
	r.sqArray = unsafe.Slice(u32(r.sqRing, p.sqOff.array), p.sqEntries)
	r.cqHead, r.cqTail = u32(r.cqRing, p.cqOff.head), u32(r.cqRing, p.cqOff.tail)
	r.cqMask = *u32(r.cqRing, p.cqOff.ringMask)
	r.cqes = unsafe.Pointer(&r.cqRing[p.cqOff.cqes])
	r.cqFlags = u32(r.cqRing, p.cqOff.flags)
	return nil
}

func (r *ring) close() error {
	for _, m := range [][]byte{r.sqes, r.cqRing, r.sqRing} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	r.sqes, r.cqRing, r.sqRing = nil, nil, nil
	return unix.Close(r.fd)
}

// errRingFull: more entries queued than the ring holds before a submit.
var errRingFull = errors.New("io_uring submission queue full")

// sqe returns the next free submission entry, zeroed, queued for the next
// submit.
func (r *ring) sqe() ([]byte, error) {
	head := atomic.LoadUint32(r.sqHead)
	tail := *r.sqTail + r.pending
	if tail-head > r.sqMask {
		return nil, errRingFull
	}
	i := tail & r.sqMask
	e := r.sqes[int(i)*r.sqeSize : int(i+1)*r.sqeSize]
	clear(e)
	r.sqArray[i] = i
	r.pending++
	return e, nil
}

// submit hands the queued entries to the kernel and, with wait > 0, waits
// for that many completions, or less: a signal can end the wait once the
// entries are in (callers reap what came and wait again if they must).
// Interrupted calls that submitted nothing are retried.
func (r *ring) submit(wait uint32) error {
	n := r.pending
	atomic.StoreUint32(r.sqTail, *r.sqTail+n)
	r.pending = 0
	flags := uintptr(0)
	if wait > 0 {
		flags = enterGetEvents
	}
	for {
		done, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), uintptr(wait), flags, 0, 0)
		switch errno {
		case 0:
			n -= uint32(done)
			if n == 0 {
				return nil
			}
			if wait == 0 {
				return fmt.Errorf("io_uring_enter: %d of %d entries submitted", uint32(done), uint32(done)+n)
			}
			// Submitted part of the batch: go on with the rest.
		case unix.EINTR, unix.EAGAIN, unix.EBUSY:
			// A signal (Go's preemption) or no room for completions: the
			// entries not taken stay in the ring; try again.
		default:
			return fmt.Errorf("io_uring_enter: %w", errno)
		}
	}
}

// registerEventfd makes the ring signal eventfd fd when it posts a
// completion (while notification is on, see setNotify).
func (r *ring) registerEventfd(fd int) error {
	efd := int32(fd)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerEventfd, uintptr(unsafe.Pointer(&efd)), 1, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register(IORING_REGISTER_EVENTFD): %w", errno)
	}
	return nil
}

// setNotify turns the registered eventfd's signals on or off. The kernel
// reads the flag as it posts a completion: one posted well after the store
// is signalled, one posted before it is seen by a following look at the
// ring (completions). One that races the store may be neither (the kernel
// puts no full barrier between its post and its read of the flag), so a
// caller must have another wake-up coming (the queue waits in Go only with
// requests in flight).
func (r *ring) setNotify(on bool) {
	flags := atomic.LoadUint32(r.cqFlags) &^ cqEventfdDisabled
	if !on {
		flags |= cqEventfdDisabled
	}
	atomic.StoreUint32(r.cqFlags, flags)
}

// completions says whether completions are ready to reap.
func (r *ring) completions() bool {
	return atomic.LoadUint32(r.cqTail) != *r.cqHead
}

// cqe is one completion.
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

// reap calls f for every completion ready now and marks them consumed.
func (r *ring) reap(f func(cqe)) int {
	head := *r.cqHead
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		c := (*cqe)(unsafe.Add(r.cqes, uintptr(head&r.cqMask)*cqeSize))
		f(*c)
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}

// prepURingCmd fills e as IORING_OP_URING_CMD on fd with command op; the
// command's own bytes go to cmdArea(e).
func prepURingCmd(e []byte, fd int, op uint32, userData uint64) {
	e[0] = opURingCmd
	le.PutUint32(e[4:], uint32(fd))
	le.PutUint32(e[8:], op) // cmd_op shares the off field
	le.PutUint64(e[32:], userData)
}

// cmdArea is the command payload of a URING_CMD entry: 16 bytes, or 80 in
// a 128-byte entry.
func cmdArea(e []byte) []byte { return e[48:] }
