package nbd

// Kernel attach: the export is handed to the kernel nbd driver over
// generic netlink through unix socketpairs, one per connection. The
// kernel gets one end of each pair; this process serves the other end
// with ServeTransmission. Nothing listens anywhere: no TCP, no socket
// path another process could reach.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/volume"
)

// Options tune an attach.
type Options struct {
	// Connections is the number of sockets the kernel spreads requests
	// over; 0 means one per CPU, at most DefaultConnections.
	Connections int
	// BlockSize is the logical block size of the device, 512 or 4096; 0
	// means 4096 when the size is a multiple of it, else 512.
	BlockSize int64
	// ReadOnly makes the device read-only (a read-only backend always is).
	ReadOnly bool
	// Timeout is the kernel's per-request timeout (NBD_ATTR_TIMEOUT); 0
	// leaves the kernel's default, under which requests never time out.
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O when every
	// connection is dead, waiting for a RECONFIGURE (Recover) from a
	// restarted server, before it fails the I/O
	// (NBD_ATTR_DEAD_CONN_TIMEOUT); 0: it fails the I/O at once.
	DeadConnTimeout time.Duration
	// BackendID names what the device serves (NBD_ATTR_BACKEND_IDENTIFIER,
	// shown in /sys/block/nbdN/backend; volume.BackendID). Recover with one
	// is refused by the kernel for a device serving another backend.
	BackendID string
	// Index asks for /dev/nbdIndex; -1 (or Any) lets the kernel pick a
	// free device. With a zero Options value, Index 0 would be asked
	// for: use Any.
	Index int
	// Logf, if set, gets a line for each connection that ends with an
	// error.
	Logf func(format string, args ...any)
}

// BackendIDOf returns the backend identifier of /dev/nbdINDEX ("" when it
// has none or is not connected).
func BackendIDOf(index int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", index))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	return strings.TrimSpace(string(b)), err
}

// Any is Options.Index for "any free device".
const Any = -1

// DefaultConnections caps the default number of connections.
const DefaultConnections = 2

func (o Options) connections() int {
	if o.Connections > 0 {
		return o.Connections
	}
	return max(1, min(runtime.NumCPU(), DefaultConnections))
}

func (o Options) blockSize(size int64) (int64, error) {
	switch o.BlockSize {
	case 0:
		if size%4096 == 0 {
			return 4096, nil
		}
		return 512, nil
	case 512, 4096:
		if size%o.BlockSize != 0 {
			return 0, fmt.Errorf("size %d is not a multiple of the block size %d", size, o.BlockSize)
		}
		return o.BlockSize, nil
	}
	return 0, fmt.Errorf("block size %d: must be 512 or 4096", o.BlockSize)
}

// Device is an export attached to the kernel as /dev/nbdN and served by
// this process.
type Device struct {
	Index int

	exp  *Export
	logf func(string, ...any)

	mu      sync.Mutex
	conns   []net.Conn
	closing bool // Close or Detach: errors from now on are ours
	err     error
	wg      sync.WaitGroup
	done    chan struct{}
}

// Path is /dev/nbdN.
func (d *Device) Path() string { return DevicePath(d.Index) }

// Done is closed when every connection has ended: after Detach or Close,
// or when the kernel disconnected the device (Disconnect, `zq-csi detach`).
func (d *Device) Done() <-chan struct{} { return d.done }

// Wait waits for Done and returns the first error of a connection that
// ended for another reason than a disconnect, Detach or Close.
func (d *Device) Wait() error {
	<-d.done
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (o Options) export(b volume.Backend) *Export {
	return &Export{Backend: b, ReadOnly: o.ReadOnly}
}

// serverFlags are the transmission flags the kernel is told about.
func serverFlags(e *Export) uint64 {
	f := uint64(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagCanMultiConn)
	if e.readOnly() {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZeroes
	}
	return f
}

// pairs makes n socketpairs; it returns the kernel ends (to be closed by
// the caller once the kernel has them) and the served ends.
func pairs(n int) (kernel []*os.File, served []net.Conn, err error) {
	closeAll := func() {
		for _, f := range kernel {
			f.Close()
		}
		for _, c := range served {
			c.Close()
		}
	}
	for i := 0; i < n; i++ {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("socketpair: %w", err)
		}
		kernel = append(kernel, os.NewFile(uintptr(fds[0]), "nbd-kernel"))
		sf := os.NewFile(uintptr(fds[1]), "nbd-server")
		c, err := net.FileConn(sf)
		sf.Close()
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("socketpair: %w", err)
		}
		served = append(served, c)
	}
	return kernel, served, nil
}

func fdsOf(files []*os.File) []int {
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	return fds
}

func newDevice(exp *Export, logf func(string, ...any)) *Device {
	return &Device{Index: -1, exp: exp, logf: logf, done: make(chan struct{})}
}

// serve starts serving conns; Done closes once all of them (and any
// served before) have ended.
func (d *Device) serve(conns []net.Conn) {
	d.mu.Lock()
	d.conns = append(d.conns, conns...)
	d.mu.Unlock()
	for _, c := range conns {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			err := ServeTransmission(c, d.exp)
			if err == nil {
				return
			}
			d.mu.Lock()
			defer d.mu.Unlock()
			if d.closing {
				return
			}
			if d.err == nil {
				d.err = err
			}
			if d.logf != nil {
				d.logf("nbd%d connection: %v", d.Index, err)
			}
		}()
	}
}

func (d *Device) watch() {
	go func() { d.wg.Wait(); close(d.done) }()
}

// Attach hands b to the kernel as a new nbd device (NBD_CMD_CONNECT) and
// serves it in-process until the device is disconnected (Detach,
// Disconnect) or Close. The caller owns b: it flushes (Detach does too)
// and closes the image after Done.
func Attach(b volume.Backend, opts Options) (*Device, error) {
	exp := opts.export(b)
	size := b.Size()
	bs, err := opts.blockSize(size)
	if err != nil {
		return nil, fmt.Errorf("nbd attach: %w", err)
	}
	n, err := dialNBD()
	if err != nil {
		return nil, fmt.Errorf("nbd attach: %w", err)
	}
	defer n.Close()
	kernel, served, err := pairs(opts.connections())
	if err != nil {
		return nil, fmt.Errorf("nbd attach: %w", err)
	}
	d := newDevice(exp, opts.Logf)
	// Serve before CONNECT: the kernel may send requests at once.
	d.serve(served)
	d.watch()
	index, err := n.connect(connectConfig{
		index: opts.Index, size: size, blockSize: bs, serverFlags: serverFlags(exp),
		timeout: opts.Timeout, deadConnTimeout: opts.DeadConnTimeout, backendID: opts.BackendID, fds: fdsOf(kernel),
	})
	for _, f := range kernel {
		f.Close() // the kernel holds its own reference now
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	d.mu.Lock() // the serving goroutines read it when they log
	d.Index = index
	d.mu.Unlock()
	return d, nil
}

// recoverTries and recoverPause bound how long Recover waits for the
// kernel to notice that the old connections are dead.
const (
	recoverTries = 20
	recoverPause = 250 * time.Millisecond
)

// Recover takes /dev/nbdINDEX back with fresh connections served by this
// process (NBD_CMD_RECONFIGURE): after the process that served it died,
// while the kernel holds its I/O for the dead-connection timeout. The
// kernel replaces only dead connections: give as many as the device had
// (opts.Connections). Size and flags stay as the device has them.
func Recover(index int, b volume.Backend, opts Options) (*Device, error) {
	if z := b.Zones(); z != nil {
		// The kernel requeues what was in flight on the new connections,
		// writes the dead server may have applied among them.
		z.AcceptReplays()
	}
	exp := opts.export(b)
	n, err := dialNBD()
	if err != nil {
		return nil, fmt.Errorf("nbd recover: %w", err)
	}
	defer n.Close()
	d := newDevice(exp, opts.Logf)
	d.Index = index
	// The kernel silently drops the sockets it has no dead connection for
	// (it marks a connection dead when it sees the old server's end
	// close, which may lag): their served ends see EOF at once. Retry
	// until it took at least one.
	for try := 0; ; try++ {
		kernel, served, err := pairs(opts.connections())
		if err != nil {
			return nil, fmt.Errorf("nbd recover: %w", err)
		}
		err = n.reconfigure(connectConfig{index: index, timeout: opts.Timeout,
			deadConnTimeout: opts.DeadConnTimeout, backendID: opts.BackendID, fds: fdsOf(kernel)})
		for _, f := range kernel {
			f.Close()
		}
		if err != nil {
			for _, c := range served {
				c.Close()
			}
			return nil, err
		}
		taken := takenConns(served)
		if len(taken) > 0 {
			d.serve(taken)
			d.watch()
			return d, nil
		}
		if try+1 >= recoverTries {
			return nil, fmt.Errorf("nbd recover /dev/nbd%d: the kernel took none of %d sockets: "+
				"it has no dead connection to replace (is the old server still serving?)", index, len(served))
		}
		time.Sleep(recoverPause)
	}
}

// takenConns waits briefly and returns the conns whose kernel end is
// still open (the kernel took it), closing the others.
func takenConns(served []net.Conn) []net.Conn {
	time.Sleep(50 * time.Millisecond)
	var taken []net.Conn
	for _, c := range served {
		if peerClosed(c) {
			c.Close()
			continue
		}
		taken = append(taken, c)
	}
	return taken
}

// peerClosed reports whether c reads EOF now, without consuming data.
func peerClosed(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	rc.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		closed = err == nil && n == 0
	})
	return closed
}

// Detach writes back what the kernel still caches for the device, then
// disconnects it (NBD_CMD_DISCONNECT), waits for the connections to end
// and flushes the backend. The caller closes the image.
func (d *Device) Detach() error {
	// A disconnect fails the device's queue: dirty pages of an application
	// that has the device open and has not synced yet would be dropped.
	// This process serves the device, so the sync completes.
	syncErr := syncDevice(d.Path())
	d.mu.Lock()
	d.closing = true
	d.mu.Unlock()
	err := Disconnect(d.Index)
	err = errors.Join(syncErr, err)
	if err != nil {
		d.Close()
	} else {
		select {
		case <-d.done:
		case <-time.After(time.Minute):
			d.Close()
			err = fmt.Errorf("nbd detach /dev/nbd%d: the connections did not end in a minute", d.Index)
		}
	}
	if !d.exp.readOnly() {
		if ferr := d.exp.Backend.Flush(); ferr != nil {
			err = errors.Join(err, fmt.Errorf("flush: %w", ferr))
		}
	}
	return err
}

// syncDevice writes back the page cache of the block device at path: an
// fsync on any descriptor of a block device flushes all of its dirty
// pages.
func syncDevice(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sync %s before detaching: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s before detaching: %w", path, err)
	}
	return nil
}

// Close stops serving without telling the kernel: it closes this side of
// every connection and waits for the requests in flight. The device
// stays; with a dead-connection timeout its I/O waits for a Recover (as
// if this process had died). It flushes nothing.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closing = true
	conns := d.conns
	d.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	<-d.done
	return nil
}
