package ublk

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A queue serves one ublk hardware queue: an io_uring owned by one locked
// OS thread (the kernel ties a queue to the task that fetched on it and
// completes requests only there), the kernel's request descriptors mapped
// read-only, and a goroutine per request doing the work. Finished requests
// come back to the ring thread through a list and an eventfd the ring
// reads, so that the thread sleeps in io_uring_enter only.
type queue struct {
	id     int
	depth  int
	dev    *Device
	charFD int // the device's /dev/ublkcN, for user copy and commands
	ring   *ring
	iods   []byte

	wake    int    // eventfd: a request finished
	wakeBuf []byte // the ring reads the eventfd's counter here (off heap)

	// requests counts the request goroutines still running: the queue's
	// descriptors and the character device must outlive them.
	requests sync.WaitGroup

	mu   sync.Mutex
	done []completion
	// signalled: the eventfd was written and the ring has not read it yet,
	// so finishing requests need not write it again.
	signalled bool
}

type completion struct {
	tag    uint16
	result int32
	lba    uint64 // zone append: the sector where the data landed
}

// wakeTag marks the eventfd read's completion; request tags are < 4096.
const wakeTag = 1 << 32

func newQueue(d *Device, id int) (*queue, error) {
	q := &queue{id: id, depth: int(d.info.QueueDepth), dev: d, charFD: int(d.char.Fd())}
	page := os.Getpagesize()
	iodLen := (q.depth*iodSize + page - 1) &^ (page - 1)
	// Each queue's descriptors sit at a stride of the largest queue's,
	// UBLK_MAX_QUEUE_DEPTH of them, rounded up to the page size.
	maxCmdBuf := (4096*iodSize + page - 1) &^ (page - 1)
	var err error
	q.iods, err = unix.Mmap(q.charFD, int64(id*maxCmdBuf), iodLen, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("ublk queue %d: mapping the request descriptors: %w", id, err)
	}
	// Entries: every tag's command plus the eventfd read, rounded up.
	entries := uint32(1)
	for entries < uint32(q.depth)+1 {
		entries <<= 1
	}
	if q.ring, err = newRing(entries, false); err != nil {
		q.close()
		return nil, fmt.Errorf("ublk queue %d: %w", id, err)
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		q.close()
		return nil, fmt.Errorf("ublk queue %d: eventfd: %w", id, err)
	}
	q.wake = fd
	if q.wakeBuf, err = unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		q.close()
		return nil, fmt.Errorf("ublk queue %d: %w", id, err)
	}
	return q, nil
}

func (q *queue) close() {
	q.requests.Wait()
	if q.ring != nil {
		q.ring.close()
	}
	if q.iods != nil {
		unix.Munmap(q.iods)
	}
	if q.wakeBuf != nil {
		unix.Munmap(q.wakeBuf)
	}
	if q.wake > 0 {
		unix.Close(q.wake)
	}
}

// finish hands a request's result to the ring thread.
func (q *queue) finish(c completion) {
	q.mu.Lock()
	q.done = append(q.done, c)
	signal := !q.signalled
	q.signalled = true
	q.mu.Unlock()
	if signal {
		var one [8]byte
		le.PutUint64(one[:], 1)
		unix.Write(q.wake, one[:])
	}
}

func (q *queue) armWake() error {
	e, err := q.ring.sqe()
	if err != nil {
		return err
	}
	prepRead(e, q.wake, unsafe.Pointer(&q.wakeBuf[0]), 8, 0, wakeTag)
	return nil
}

func (q *queue) ioCmd(nr uint32, tag uint16, result int32, lba uint64) error {
	e, err := q.ring.sqe()
	if err != nil {
		return err
	}
	prepURingCmd(e, q.charFD, ioc(nr, ioCmdSize, false), uint64(tag))
	putIOCmd(cmdArea(e), uint16(q.id), tag, result, lba)
	return nil
}

// run is the ring thread: it fetches on every tag, starts a goroutine per
// request and commits their results, until the kernel aborts every fetch
// (the device stopped). ready is closed once the fetches are submitted.
func (q *queue) run(ready chan<- error) error {
	runtime.LockOSThread()
	// The thread stays locked (and dies with the goroutine) on purpose: the
	// kernel remembers it as the queue's daemon.
	for tag := 0; tag < q.depth; tag++ {
		if err := q.ioCmd(ioFetchReq, uint16(tag), 0, 0); err != nil {
			ready <- err
			return err
		}
	}
	if err := q.armWake(); err != nil {
		ready <- err
		return err
	}
	if err := q.ring.submit(0); err != nil {
		err = fmt.Errorf("ublk queue %d: fetching requests: %w", q.id, err)
		ready <- err
		return err
	}
	close(ready)

	aborted := 0
	var ringErr error
	for aborted < q.depth {
		if err := q.ring.submit(1); err != nil {
			return fmt.Errorf("ublk queue %d: %w", q.id, err)
		}
		q.ring.reap(func(c cqe) {
			switch {
			case c.userData == wakeTag:
				if err := q.commitDone(); err != nil && ringErr == nil {
					ringErr = err
				}
			case c.res == 0:
				tag := uint16(c.userData)
				r := decodeIOD(q.iods[int(tag)*iodSize:])
				q.requests.Add(1)
				go func() {
					defer q.requests.Done()
					q.dev.serve(q, tag, r)
				}()
			case c.res == ioResAbort:
				aborted++
			default:
				// A command the kernel refused: the tag is lost to us.
				if ringErr == nil {
					ringErr = fmt.Errorf("ublk queue %d tag %d: %w", q.id, c.userData, unix.Errno(-c.res))
				}
				aborted++
			}
		})
		if ringErr != nil {
			return ringErr
		}
	}
	return nil
}

// commitDone queues a commit-and-fetch for every finished request and rearms
// the eventfd read.
func (q *queue) commitDone() error {
	q.mu.Lock()
	done := q.done
	q.done = nil
	q.signalled = false
	q.mu.Unlock()
	for _, c := range done {
		if err := q.ioCmd(ioCommitAndFetch, c.tag, c.result, c.lba); err != nil {
			return err
		}
	}
	return q.armWake()
}
