package main

// zq-csi export: qemu-nbd for one image. It serves FILE over NBD on a unix
// socket (or TCP with --tcp) until SIGTERM or SIGINT, then stops accepting,
// lets the connections finish the requests they sent, flushes and closes
// the image, and exits 0. A zoned image is served through its zoned.Device:
// the zone rules apply to the clients' writes.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/nbd"
)

func exportUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi export [--socket PATH | --tcp HOST:PORT] [--name NAME] [--read-only] [--shared N]
                     [--fault-socket PATH] [--volatile-cache] [--faults F] [--cpu-profile OUT] FILE

Serve FILE (a qcow2 image, zoned or not) over NBD, like qemu-nbd, until
SIGTERM or SIGINT. It listens on a unix socket unless --tcp is given, and
prints the NBD URI of the export on start.

  --socket PATH    unix socket to listen on (default $XDG_RUNTIME_DIR/zq-csi/NAME.sock,
                   or /run/zq-csi/NAME.sock; NAME defaults to "export")
  --tcp HOST:PORT  listen on TCP instead (e.g. 127.0.0.1:10809)
  --name NAME      export name (default "", as qemu-nbd)
  --read-only      refuse writes
  --shared N       serve at most N connections at once (0: no limit, the default)
diagnostics:
  --cpu-profile OUT  write a CPU profile of the server to OUT (go tool pprof), from the
                   moment it listens until it stops
`+faultFlagsUsage)
}

func runExport(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	sock := fs.String("socket", "", "unix socket path")
	tcp := fs.String("tcp", "", "TCP address")
	name := fs.String("name", "", "export name")
	readOnly := fs.Bool("read-only", false, "refuse writes")
	shared := fs.Int("shared", 0, "maximum connections")
	cpuProfile := fs.String("cpu-profile", "", "CPU profile output")
	faults := addFaultFlags(fs)
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		exportUsage(e.stdout)
		return exitOK
	}
	switch {
	case err != nil:
	case len(operands) != 1:
		err = usagef("expected one FILE, got %d operands", len(operands))
	case *sock != "" && *tcp != "":
		err = usagef("--socket and --tcp exclude each other")
	case *shared < 0:
		err = usagef("--shared %d: must be 0 (no limit) or more", *shared)
	default:
		err = faults.check()
	}
	if err != nil {
		return e.fail(err, exportUsage)
	}

	profile, err := createProfile(*cpuProfile)
	if err != nil {
		return e.fail(err, nil)
	}
	defer profile.close()
	vol, err := openSession(operands[0], *readOnly)
	if err != nil {
		return e.fail(err, nil)
	}
	stopFaults, err := faults.start(e, vol)
	defer stopFaults()
	if err != nil {
		vol.Close()
		return e.fail(err, nil)
	}
	srv := &nbd.Server{
		Exports: []*nbd.Export{{
			Name: *name, Description: filepath.Base(operands[0]), Backend: vol.Backend,
			ReadOnly: *readOnly, NoMultiConn: *shared == 1,
		}},
		MaxConns: *shared,
		Logf:     func(f string, a ...any) { e.errorf("export: "+f, a...) },
	}

	var l net.Listener
	var uri string
	if *tcp != "" {
		l, err = net.Listen("tcp", *tcp)
		if err == nil {
			uri = (&url.URL{Scheme: "nbd", Host: l.Addr().String(), Path: "/" + *name}).String()
		}
	} else {
		path := *sock
		if path == "" {
			path = defaultSocketPath(*name)
			err = os.MkdirAll(filepath.Dir(path), 0o700)
		}
		if err == nil {
			l, err = listenUnix(path)
		}
		if err == nil {
			uri = fmt.Sprintf("nbd+unix:///%s?socket=%s", url.PathEscape(*name), path)
		}
	}
	if err != nil {
		vol.Close()
		return e.fail(err, nil)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	fmt.Fprintln(e.stdout, uri)
	stopProfile := profile.start(e)

	code := exitOK
	select {
	case <-sigs:
	case err := <-served:
		e.errorf("export: %v", err)
		code = exitFailure
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		e.errorf("export: waiting for the connections: %v", err)
		code = exitFailure
	}
	stopProfile()
	if err := vol.Close(); err != nil {
		e.errorf("export: %v", err)
		code = exitFailure
	}
	return code
}

// defaultSocketPath is where the socket goes without --socket.
func defaultSocketPath(name string) string {
	dir := "/run/zq-csi"
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		dir = filepath.Join(d, "zq-csi")
	}
	if name == "" {
		name = "export"
	}
	return filepath.Join(dir, strings.ReplaceAll(name, "/", "_")+".sock")
}

// listenUnix listens on path, replacing a stale socket (one nobody
// listens on) but nothing else.
func listenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another server listens there", path)
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	l.(*net.UnixListener).SetUnlinkOnClose(true)
	return l, nil
}
