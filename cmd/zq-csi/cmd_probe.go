package main

// zq-csi probe: ask a running plugin whether it is ready, for the kubelet's
// exec livenessProbe (what the livenessprobe sidecar does over HTTP, with no
// port open).

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func probeUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi probe [--endpoint unix:///PATH] [--timeout DURATION]

Ask the plugin serving --endpoint (zq-csi serve) whether it is ready, with
the CSI Identity Probe call: exit 0 when it answers ready, 1 when it answers
not ready, fails, or does not answer within --timeout. For the kubelet's
exec livenessProbe.

  --endpoint unix:///PATH  the plugin's socket (default unix:///csi/csi.sock, the chart's)
  --timeout D              how long to wait for the answer (default 5s)
`)
}

func runProbe(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	endpoint := fs.String("endpoint", "unix:///csi/csi.sock", "the plugin's socket")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		probeUsage(e.stdout)
		return exitOK
	}
	switch {
	case err != nil:
	case len(operands) != 0:
		err = usagef("unexpected operands %q", operands)
	case !strings.HasPrefix(*endpoint, "unix:///"):
		err = usagef("--endpoint %q: must be unix:///path/to/socket", *endpoint)
	case *timeout <= 0:
		err = usagef("--timeout %v: must be positive", *timeout)
	}
	if err != nil {
		return e.fail(err, probeUsage)
	}
	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return e.fail(fmt.Errorf("%s: %w", *endpoint, err), nil)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	r, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return e.fail(fmt.Errorf("%s: %w", *endpoint, err), nil)
	}
	// An unset Ready means ready (CSI spec, Probe).
	if r.Ready != nil && !r.Ready.Value {
		return e.fail(fmt.Errorf("%s: the plugin says it is not ready", *endpoint), nil)
	}
	fmt.Fprintln(e.stdout, "ready")
	return exitOK
}
