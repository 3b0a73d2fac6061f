package main

// zq-csi attach / detach: hand an image to the kernel as a block device.
// attach opens FILE (zoned or not, as export does) and serves it in-process
// through ublk (/dev/ublkbN, a host-managed zoned disk for a zoned image) or
// the kernel nbd driver (/dev/nbdN, one end of unix socketpairs given over
// generic netlink), prints the device and stays in the foreground until
// SIGTERM/SIGINT (then it syncs and removes the device, flushes, closes the
// image and exits 0) or until the device is removed from elsewhere (zq-csi
// detach). It does not daemonize: the caller backgrounds it.

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/attach"
)

func attachUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi attach [--frontend ublk|nbd] [--read-only] [--block-size 512|4096]
                     [--queues N] [--queue-depth N]
                     [--connections N] [--timeout SEC] [--dead-conn-timeout SEC] [--device /dev/nbdN]
                     [--recover /dev/ublkbN|/dev/nbdN] [--cpu-profile OUT]
                     [--fault-socket PATH] [--volatile-cache] [--faults F] FILE

Attach FILE (a qcow2 image, zoned or not) to the kernel as a block device
served by this process, print the device path and serve it in the
foreground (the command does not daemonize: background it yourself) until
SIGTERM or SIGINT, which sync and remove the device, flush and close the
image and exit 0, or until the device is removed (zq-csi detach). Nothing
listens on the network, nor on the filesystem unless --fault-socket asks.
Needs root (CAP_SYS_ADMIN).

Frontends (the kernel driver the device is served through):
  ublk  /dev/ublkbN (ublk_drv module). A zoned image becomes a host-managed
        zoned disk: the kernel knows its zones, limits and zone append
        (blkzone, btrfs and f2fs zoned mode, fio --zonemode=zbd). Its zone
        size must be a power of two and its size whole zones (Linux 6.6+).
        If this process dies, the kernel holds the device's I/O until
        'attach --recover /dev/ublkbN FILE' takes it back.
  nbd   /dev/nbdN (nbd module). The kernel sees a plain disk; a zoned
        image keeps its zone rules (a write off the write pointer fails
        with EIO) but has no zone model.
  The default is ublk when the kernel supports it for the image, else nbd
  (a note on stderr says why).

  --frontend F           ublk or nbd (default: ublk where possible; --backend is its old name)
  --read-only            a read-only device
  --block-size B         logical block size, 512 or 4096 (default: 512 for a zoned image,
                         otherwise 4096 when the size is a multiple of it)
  --recover DEV          take back DEV (/dev/ublkbN or /dev/nbdN) whose server died, instead of
                         creating a device; its held I/O is served (ublk reissues it)
ublk:
  --queues N             hardware queues, each served by its own thread on the CPUs the kernel
                         sends to it (default: one per CPU)
  --queue-depth N        requests in flight per queue (default 64)
nbd:
  --connections N        sockets the kernel spreads requests over (default: one per CPU, at most 2;
                         1 for a zoned image, so writes to a zone stay in order)
  --timeout SEC          per-request timeout of the kernel (default 0: none)
  --dead-conn-timeout SEC
                         how long the kernel holds I/O when this process is gone, waiting
                         for 'attach --recover' (default 60; 0: fail the I/O at once)
  --device /dev/nbdN     use this device (default: the first free one)
diagnostics:
  --cpu-profile OUT      write a CPU profile of the server to OUT (go tool pprof), from the
                         moment the device exists until it is removed
`+faultFlagsUsage)
}

func detachUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi detach DEV

Remove DEV (/dev/ublkbN or /dev/nbdN) from the process serving it (zq-csi
attach), which then flushes and closes its image and exits 0. A live ublk
device is synced first; one whose server died is removed with its held I/O
failed.
`)
}

func runAttach(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	frontend := fs.String("frontend", "", "kernel frontend: ublk or nbd")
	fs.StringVar(frontend, "backend", "", "the old name of --frontend")
	conns := fs.Int("connections", 0, "connections")
	readOnly := fs.Bool("read-only", false, "read-only device")
	blockSize := fs.Int64("block-size", 0, "logical block size")
	timeout := fs.Int("timeout", 0, "request timeout, seconds")
	deadConn := fs.Int("dead-conn-timeout", 60, "dead connection timeout, seconds")
	device := fs.String("device", "", "device to use")
	recoverDev := fs.String("recover", "", "device to take back")
	queues := fs.Int("queues", 0, "ublk queues")
	depth := fs.Int("queue-depth", 0, "ublk queue depth")
	cpuProfile := fs.String("cpu-profile", "", "CPU profile output")
	faults := addFaultFlags(fs)
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		attachUsage(e.stdout)
		return exitOK
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if err == nil && *recoverDev != "" {
		// The device names its frontend; one given must agree.
		named := "nbd"
		if strings.HasPrefix(*recoverDev, "/dev/ublk") {
			named = "ublk"
		}
		if *frontend != "" && *frontend != named {
			err = usagef("--frontend %s and --recover %s: the device is %s's", *frontend, *recoverDev, named)
		}
		*frontend = named
	}
	switch {
	case err != nil:
	case len(operands) != 1:
		err = usagef("expected one FILE, got %d operands", len(operands))
	case *frontend != "" && *frontend != "ublk" && *frontend != "nbd":
		err = usagef("--frontend %q: must be ublk or nbd", *frontend)
	case *blockSize != 0 && *blockSize != 512 && *blockSize != 4096:
		err = usagef("--block-size %d: must be 512 or 4096", *blockSize)
	case *queues < 0 || *queues > 64:
		err = usagef("--queues %d: must be 1 to 64", *queues)
	case *depth < 0 || *depth > 4096:
		err = usagef("--queue-depth %d: must be 1 to 4096", *depth)
	case *frontend == "ublk" && (set["connections"] || set["timeout"] || set["dead-conn-timeout"] || set["device"]):
		err = usagef("--connections, --timeout, --dead-conn-timeout and --device apply to --frontend nbd")
	case *frontend == "nbd" && (set["queues"] || set["queue-depth"]):
		err = usagef("--queues and --queue-depth apply to --frontend ublk")
	case *conns < 0 || *conns > 64:
		err = usagef("--connections %d: must be 1 to 64", *conns)
	case *timeout < 0:
		err = usagef("--timeout %d: must be 0 or more", *timeout)
	case *deadConn < 0:
		err = usagef("--dead-conn-timeout %d: must be 0 or more", *deadConn)
	case *device != "" && *recoverDev != "":
		err = usagef("--device and --recover exclude each other")
	default:
		err = faults.check()
	}
	if err != nil {
		return e.fail(err, attachUsage)
	}

	// Created before the image is opened: a bad path fails with nothing attached.
	profile, err := createProfile(*cpuProfile)
	if err != nil {
		return e.fail(err, nil)
	}
	defer profile.close()
	vol, err := openSession(operands[0], *readOnly)
	if err != nil {
		return e.fail(err, nil)
	}
	if n := vol.Img.Info().JournalReplayed; n > 0 {
		e.errorf("attach: %s: replayed %d journal batches left by a process that died", operands[0], n)
	}
	stopFaults, err := faults.start(e, vol)
	defer stopFaults()
	if err != nil {
		vol.Close()
		return e.fail(err, nil)
	}
	// This process is in the writeback path of the device it serves: under
	// memory pressure the kernel must not make it wait for that writeback.
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		e.errorf("attach: PR_SET_IO_FLUSHER: %v (needs CAP_SYS_RESOURCE); writeback through the device could deadlock under memory pressure", err)
	}

	// Catch the signals before the device exists: a SIGTERM right after
	// the path is printed must still remove it.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	o := attach.Options{Frontend: attach.Frontend(*frontend), BlockSize: int(*blockSize),
		Queues: *queues, QueueDepth: *depth,
		Connections: *conns, Timeout: time.Duration(*timeout) * time.Second,
		DeadConnTimeout: time.Duration(*deadConn) * time.Second, NBDDevice: *device,
		Logf: func(f string, a ...any) { e.errorf("attach: "+f, a...) }}
	var d *attach.Device
	if *recoverDev != "" {
		d, err = attach.Recover(vol, *recoverDev, o)
	} else {
		d, err = attach.Attach(vol, o)
	}
	if errors.Is(err, attach.ErrNotADevice) {
		vol.Close()
		return e.fail(usagef("%v", err), nil)
	}
	if err != nil {
		vol.Close()
		return e.fail(err, nil)
	}
	fmt.Fprintln(e.stdout, d.Path())
	defer profile.start(e)()

	code := exitOK
	select {
	case <-sigs:
		err = d.Detach()
	case <-d.Done(): // removed from elsewhere (zq-csi detach)
		err = d.Close()
	}
	if err != nil {
		e.errorf("attach: %s: %v", d.Path(), err)
		code = exitFailure
	}
	if err := vol.Close(); err != nil {
		e.errorf("attach: %v", err)
		code = exitFailure
	}
	return code
}

func runDetach(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		detachUsage(e.stdout)
		return exitOK
	}
	if err == nil && len(operands) != 1 {
		err = usagef("expected one DEV, got %d operands", len(operands))
	}
	if err != nil {
		return e.fail(err, detachUsage)
	}
	err = attach.Remove(operands[0])
	if errors.Is(err, attach.ErrNotADevice) {
		return e.fail(usagef("%v", err), detachUsage)
	}
	if err != nil {
		return e.fail(err, nil)
	}
	return exitOK
}
