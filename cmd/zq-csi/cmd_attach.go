package main

// zq-csi attach / detach: hand an image to the kernel as a block device.
// attach opens FILE (zoned or not, as export does), gives the kernel nbd
// driver one end of N unix socketpairs over generic netlink and serves the
// other ends in-process, prints /dev/nbdN and stays in the foreground until
// SIGTERM/SIGINT (then it disconnects, flushes, closes the image and exits
// 0) or until the kernel disconnects the device (zq-csi detach). It does
// not daemonize: the caller backgrounds it.

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/nbdattach"
)

func attachUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi attach [--backend nbd] [--connections N] [--read-only] [--block-size 512|4096]
                     [--timeout SEC] [--dead-conn-timeout SEC] [--device /dev/nbdN | --recover /dev/nbdN] FILE

Attach FILE (a qcow2 image, zoned or not) to the kernel as a block device
served by this process, print the device path (/dev/nbdN) and serve it in
the foreground (the command does not daemonize: background it yourself)
until SIGTERM or SIGINT, which disconnect the device, flush and close the
image and exit 0, or until the device is disconnected (zq-csi detach). The
kernel nbd driver gets one end of unix socketpairs over generic netlink:
nothing listens on the network or the filesystem. A zoned image keeps its
zone rules (a write off the write pointer fails with EIO), but the kernel
sees a plain disk. Needs root (CAP_SYS_ADMIN) and the nbd module.

  --backend nbd          the kernel frontend; only nbd so far (ublk is not implemented yet)
  --connections N        sockets the kernel spreads requests over (default: one per CPU, at most 2;
                         1 for a zoned image, so writes to a zone stay in order)
  --read-only            a read-only device
  --block-size B         logical block size, 512 or 4096 (default: 512 for a zoned image,
                         otherwise 4096 when the size is a multiple of it)
  --timeout SEC          per-request timeout of the kernel (default 0: none)
  --dead-conn-timeout SEC
                         how long the kernel holds I/O when this process is gone, waiting
                         for 'attach --recover' (default 60; 0: fail the I/O at once)
  --device /dev/nbdN     use this device (default: the first free one)
  --recover /dev/nbdN    take back a device whose server died (its I/O is held) instead of
                         connecting a new one; give the same --connections as the original
`)
}

func detachUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi detach DEV

Disconnect DEV (/dev/nbdN) from the process serving it (zq-csi attach),
which then flushes and closes its image and exits 0.
`)
}

func runAttach(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	backend := fs.String("backend", "nbd", "kernel frontend")
	conns := fs.Int("connections", 0, "connections")
	readOnly := fs.Bool("read-only", false, "read-only device")
	blockSize := fs.Int64("block-size", 0, "logical block size")
	timeout := fs.Int("timeout", 0, "request timeout, seconds")
	deadConn := fs.Int("dead-conn-timeout", 60, "dead connection timeout, seconds")
	device := fs.String("device", "", "device to use")
	recoverDev := fs.String("recover", "", "device to take back")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		attachUsage(e.stdout)
		return exitOK
	}
	index, recoverIndex := nbdattach.Any, -1
	switch {
	case err != nil:
	case len(operands) != 1:
		err = usagef("expected one FILE, got %d operands", len(operands))
	case *backend == "ublk":
		err = usagef("--backend ublk: not implemented yet (a separate issue); use --backend nbd")
	case *backend != "nbd":
		err = usagef("--backend %q: must be nbd (ublk is not implemented yet)", *backend)
	case *conns < 0 || *conns > 64:
		err = usagef("--connections %d: must be 1 to 64", *conns)
	case *blockSize != 0 && *blockSize != 512 && *blockSize != 4096:
		err = usagef("--block-size %d: must be 512 or 4096", *blockSize)
	case *timeout < 0:
		err = usagef("--timeout %d: must be 0 or more", *timeout)
	case *deadConn < 0:
		err = usagef("--dead-conn-timeout %d: must be 0 or more", *deadConn)
	case *device != "" && *recoverDev != "":
		err = usagef("--device and --recover exclude each other")
	case *device != "":
		if index, err = nbdattach.ParseDevice(*device); err != nil {
			err = usagef("--device: %v", err)
		}
	case *recoverDev != "":
		if recoverIndex, err = nbdattach.ParseDevice(*recoverDev); err != nil {
			err = usagef("--recover: %v", err)
		}
	}
	if err != nil {
		return e.fail(err, attachUsage)
	}

	img, dev, err := openSession(operands[0], *readOnly)
	if err != nil {
		return e.fail(err, nil)
	}
	s := &ioSession{img: img, dev: dev, readOnly: *readOnly}
	var b nbdattach.Backend = nbdattach.ImageBackend{Img: img}
	bs := *blockSize
	if dev != nil {
		b = nbdattach.ZonedBackend{Img: img, Dev: dev}
		if bs == 0 {
			bs = 512
		}
		// The kernel sees a plain disk and spreads writes over the
		// connections: with one, writes to a zone reach the device in the
		// order the application issued them.
		if *conns == 0 {
			*conns = 1
		}
	}
	opts := nbdattach.Options{
		Connections: *conns, BlockSize: bs, ReadOnly: *readOnly,
		Timeout: time.Duration(*timeout) * time.Second, DeadConnTimeout: time.Duration(*deadConn) * time.Second,
		Index: index,
		Logf:  func(f string, a ...any) { e.errorf("attach: "+f, a...) },
	}

	// Catch the signals before the device exists: a SIGTERM right after
	// the path is printed must still disconnect it.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	var d *nbdattach.Device
	if recoverIndex >= 0 {
		d, err = nbdattach.Recover(recoverIndex, b, opts)
	} else {
		d, err = nbdattach.Attach(b, opts)
	}
	if err != nil {
		s.close()
		return e.fail(err, nil)
	}
	fmt.Fprintln(e.stdout, d.Path())

	code := exitOK
	select {
	case <-sigs:
		if err := d.Detach(); err != nil {
			e.errorf("attach: %v", err)
			code = exitFailure
		}
	case <-d.Done():
	}
	if err := d.Wait(); err != nil {
		e.errorf("attach: %s: %v", d.Path(), err)
		code = exitFailure
	}
	if err := s.close(); err != nil {
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
	index := -1
	switch {
	case err != nil:
	case len(operands) != 1:
		err = usagef("expected one DEV, got %d operands", len(operands))
	default:
		if index, err = nbdattach.ParseDevice(operands[0]); err != nil {
			err = usagef("%v", err)
		}
	}
	if err != nil {
		return e.fail(err, detachUsage)
	}
	if err := nbdattach.Disconnect(index); err != nil {
		return e.fail(err, nil)
	}
	return exitOK
}
