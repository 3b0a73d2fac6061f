package ublk

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// A queue serves one ublk hardware queue: an io_uring owned by one locked
// OS thread (the kernel ties a queue to the task that fetched on it and
// takes commands only from it), the kernel's request descriptors mapped
// read-only, and the requests in flight.
//
// Where the ring thread waits decides the latency of every request, because
// a goroutine it makes runnable (a request's, or one it wakes) is queued on
// the thread's own P, and a thread blocked in a system call keeps its P
// until Go's sysmon takes it back: up to 10 ms later in an otherwise idle
// process. So the thread waits in the kernel (io_uring_enter) only while it
// has no request in flight, and then serves a lone request itself, on the
// thread, with no hand-off at all. Requests that arrive together, or while
// others are in flight, each get a goroutine, and the thread waits for them
// in Go (on doorbell), which hands its P to them at once. A request's
// goroutine rings the doorbell when it finishes; a completion the kernel
// posts meanwhile (a new request) rings it through the eventfd the ring
// signals while notification is on, read by a goroutine in Go's netpoller.
type queue struct {
	id     int
	depth  int
	dev    *Device
	charFD int // the device's /dev/ublkcN, for user copy and commands
	ring   *ring
	iods   []byte
	// cpus are the CPUs whose requests the kernel sends to this queue and
	// this process may run on: the ring thread runs there, so that a
	// request is served where it was issued, without waking another CPU.
	// Empty: anywhere.
	cpus unix.CPUSet

	// notify is an eventfd registered with the ring: it counts the
	// completions posted while the ring's notification is on. Its watcher
	// rings doorbell for each count it reads.
	notify   *os.File
	doorbell chan struct{}
	watching sync.WaitGroup

	// requests counts the request goroutines still running: the queue's
	// descriptors and the character device must outlive them.
	requests sync.WaitGroup
	// inflight counts the requests handed to goroutines and not yet
	// committed (ring thread only).
	inflight int

	mu   sync.Mutex
	done []completion
	// spare is the slice done was before the ring thread last took it:
	// the two swap, so that finishing allocates nothing.
	spare []completion
}

type completion struct {
	tag    uint16
	result int32
	lba    uint64 // zone append: the sector where the data landed
}

func newQueue(d *Device, id int) (*queue, error) {
	q := &queue{id: id, depth: int(d.info.QueueDepth), dev: d, charFD: int(d.char.Fd()), doorbell: make(chan struct{}, 1)}
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
	// Entries: one command per tag, rounded up to a power of two.
	entries := uint32(1)
	for entries < uint32(q.depth) {
		entries <<= 1
	}
	if q.ring, err = newRing(entries, false); err != nil {
		q.close()
		return nil, fmt.Errorf("ublk queue %d: %w", id, err)
	}
	// Non-blocking, so that reading it parks the watcher in the netpoller
	// rather than in a system call.
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		q.close()
		return nil, fmt.Errorf("ublk queue %d: eventfd: %w", id, err)
	}
	q.notify = os.NewFile(uintptr(fd), fmt.Sprintf("ublk-queue-%d-notify", id))
	if err := q.ring.registerEventfd(fd); err != nil {
		q.close()
		return nil, fmt.Errorf("ublk queue %d: %w", id, err)
	}
	q.ring.setNotify(false)
	q.cpus = queueCPUs(d, id)
	q.watching.Add(1)
	go q.watch()
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
	if q.notify != nil {
		q.notify.Close() // ends the watcher's read
		q.watching.Wait()
	}
}

// queueCPUs returns the CPUs of queue id that this process may use; none
// (run anywhere) when the kernel does not say or the sets do not meet.
func queueCPUs(d *Device, id int) unix.CPUSet {
	var allowed, both unix.CPUSet
	mapped, err := d.ctrl.QueueAffinity(d.info.ID, uint16(id))
	if err == nil {
		err = unix.SchedGetaffinity(0, &allowed)
	}
	if err != nil {
		d.logf("ublk device %d queue %d: %v: its thread runs on any CPU", d.info.ID, id, err)
		return both
	}
	const cpuSetSize = 1024 // CPU_SETSIZE: the CPUs a unix.CPUSet holds
	for cpu := 0; cpu < cpuSetSize; cpu++ {
		if mapped.IsSet(cpu) && allowed.IsSet(cpu) {
			both.Set(cpu)
		}
	}
	return both
}

// watch rings the doorbell each time the ring signals the eventfd, until
// the eventfd is closed.
func (q *queue) watch() {
	defer q.watching.Done()
	var count [8]byte
	for {
		if _, err := q.notify.Read(count[:]); err != nil {
			return
		}
		q.wake()
	}
}

// wake wakes the ring thread if it waits in Go; a wake-up already pending
// is enough.
func (q *queue) wake() {
	select {
	case q.doorbell <- struct{}{}:
	default:
	}
}

// finish hands the result of a request served by its own goroutine to the
// ring thread.
func (q *queue) finish(c completion) {
	q.mu.Lock()
	q.done = append(q.done, c)
	q.mu.Unlock()
	q.wake()
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

func (q *queue) commit(c completion) error {
	return q.ioCmd(ioCommitAndFetch, c.tag, c.result, c.lba)
}

// request is a request fetched from the kernel: its tag and descriptor.
type request struct {
	tag uint16
	iod iod
}

// run is the ring thread: it fetches on every tag, serves the requests and
// commits their results, until the kernel aborts every fetch (the device
// stopped). ready is closed once the fetches are submitted.
func (q *queue) run(ready chan<- error) error {
	runtime.LockOSThread()
	// The thread stays locked (and dies with the goroutine) on purpose: the
	// kernel remembers it as the queue's daemon, and its CPU affinity must
	// not leak to other goroutines.
	if q.cpus.Count() > 0 {
		if err := unix.SchedSetaffinity(0, &q.cpus); err != nil {
			q.dev.logf("ublk device %d queue %d: pinning its thread: %v", q.dev.info.ID, q.id, err)
		}
	}
	for tag := 0; tag < q.depth; tag++ {
		if err := q.ioCmd(ioFetchReq, uint16(tag), 0, 0); err != nil {
			ready <- err
			return err
		}
	}
	if err := q.ring.submit(0); err != nil {
		err = fmt.Errorf("ublk queue %d: fetching requests: %w", q.id, err)
		ready <- err
		return err
	}
	close(ready)

	aborted := 0
	var ringErr error
	fetched := make([]request, 0, q.depth)
	for aborted < q.depth {
		if err := q.wait(); err != nil {
			return fmt.Errorf("ublk queue %d: %w", q.id, err)
		}
		fetched = fetched[:0]
		q.ring.reap(func(c cqe) {
			switch {
			case c.res == 0:
				tag := uint16(c.userData)
				fetched = append(fetched, request{tag, decodeIOD(q.iods[int(tag)*iodSize:])})
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
		if len(fetched) == 1 && q.inflight == 0 {
			if err := q.commit(q.serve(fetched[0].tag, fetched[0].iod)); err != nil {
				return err
			}
		} else {
			for _, r := range fetched {
				q.inflight++
				q.requests.Add(1)
				go func() {
					defer q.requests.Done()
					q.finish(q.serve(r.tag, r.iod))
				}()
			}
		}
		if err := q.commitFinished(); err != nil {
			return err
		}
	}
	return nil
}

// wait submits the queued commands and returns once there is something to
// do: a completion to reap or a finished request to commit. With nothing in
// flight it waits in io_uring_enter; else in Go, on the doorbell.
func (q *queue) wait() error {
	if q.inflight == 0 {
		return q.ring.submit(1)
	}
	if err := q.ring.submit(0); err != nil {
		return err
	}
	// Notification on before looking, so that a completion posted after
	// the look signals the eventfd. (Should the kernel's post race the
	// look, the next request to finish rings the doorbell: with requests
	// in flight one always will.)
	q.ring.setNotify(true)
	if !q.ring.completions() && !q.finished() {
		<-q.doorbell
	}
	q.ring.setNotify(false)
	return nil
}

func (q *queue) finished() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.done) > 0
}

// commitFinished queues a commit-and-fetch for every request its goroutine
// finished.
func (q *queue) commitFinished() error {
	q.mu.Lock()
	done := q.done
	q.done = q.spare[:0]
	q.mu.Unlock()
	defer func() { q.spare = done }()
	for _, c := range done {
		q.inflight--
		if err := q.commit(c); err != nil {
			return err
		}
	}
	return nil
}

// copyIn reads a request's data (a write or an append) into p.
func (q *queue) copyIn(tag int, p []byte) error { return q.userCopy(unix.Pread, "from", tag, p) }

// copyOut writes p as a request's data (a read or a zone report).
func (q *queue) copyOut(tag int, p []byte) error { return q.userCopy(unix.Pwrite, "to", tag, p) }

// userCopy moves a request's data with pread or pwrite on the character
// device (user copy, which the kernel requires for zoned devices: the
// commit carries a zone append's sector in the field its buffer mode
// would use for an address).
func (q *queue) userCopy(op func(int, []byte, int64) (int, error), dir string, tag int, p []byte) error {
	n, err := op(q.charFD, p, q.dataAt(tag, 0))
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("copying %d bytes of request %d %s the kernel (done %d): %w", len(p), tag, dir, n, err)
}

// dataAt is where byte at of request tag's data is on the character
// device.
func (q *queue) dataAt(tag int, at int64) int64 { return userCopyOffset(q.id, tag) + at }
