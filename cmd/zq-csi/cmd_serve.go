package main

// zq-csi serve: the CSI plugin. It serves the Identity service and, by
// --mode, the Controller and Node services on a unix socket, until SIGTERM
// or SIGINT. Volumes it staged stay attached when it exits; the next serve
// with the same --state-dir takes them back.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/driver"
	"github.com/zq-csi/zq-csi/faultctl"
	"github.com/zq-csi/zq-csi/podsys"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

func serveUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi serve --endpoint unix:///PATH [--node-id ID] [--pool DIR] [--state-dir DIR]
                    [--mode controller|node|all] [--driver-name NAME] [--max-volumes N]
                    [--metrics-address HOST:PORT] [-v N]
                    [--kubelet-registration-path PATH [--registration-dir DIR]]
                    [--nri-socket PATH] [--fault-socket PATH] [--claim-faults]

Run the CSI plugin (CSI spec v1): the Identity service and, by --mode, the
Controller service (volumes are zoned qcow2 images in the node-local --pool,
created from StorageClass parameters with qemu-img's option names) and the
Node service (stage attaches a volume through ublk or nbd and serves it from
this process; publish bind-mounts the device for volumeMode: Block). Logs go
to stderr (klog). Runs until SIGTERM or SIGINT; staged volumes stay attached
and the next serve with the same --state-dir takes them back.

  --endpoint unix:///PATH  the gRPC socket (required; nothing else is listened on
                           unless --metrics-address is given)
  --node-id ID             this node's name (default: the host name)
  --pool DIR               the node's volume images (default /var/lib/zq-csi/pool)
  --state-dir DIR          staged volumes and image journals (default /var/lib/zq-csi/state)
  --mode M                 controller, node or all (default all)
  --driver-name NAME       the CSI driver name (default %s)
  --max-volumes N          volumes this node stages at most (default 64)
  --metrics-address A      serve Prometheus metrics on http://A/metrics
  -v N                     log verbosity (2: every call)
  --kubelet-registration-path PATH
                           register with the kubelet (what node-driver-registrar does): PATH is
                           the --endpoint socket as the kubelet sees it on the host, e.g.
                           /var/lib/kubelet/plugins/%s/csi.sock
  --registration-dir DIR   the kubelet's plugin registration directory as this process sees it
                           (default /var/lib/kubelet/plugins_registry); the socket is
                           DIR/<driver-name>-reg.sock
  --nri-socket PATH        connect to the container runtime's NRI socket (containerd 2.x and
                           CRI-O serve %s) and give each container whose zoned
                           device has another name in it (volumeDevices.devicePath) a
                           /sys/block entry under that name, so that libzbd and ZenFS see it
                           as zoned; the entries live in --state-dir/podsys
  --fault-socket PATH      serve 'zq-csi fault' on this unix socket (owner only; the chart
                           uses %s, the command's default): faults in staged volumes
  --claim-faults           apply the %s annotation of each staged volume's claim
                           (read every 5s from the API server with the pod's service account;
                           needs get on persistentvolumeclaims)
`, driver.DefaultName, driver.DefaultName, podsys.DefaultSocket, defaultFaultSocket, driver.FaultsAnnotation)
}

func runServe(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	endpoint := fs.String("endpoint", "", "gRPC endpoint")
	nodeID := fs.String("node-id", "", "node ID")
	poolDir := fs.String("pool", "/var/lib/zq-csi/pool", "image pool")
	stateDir := fs.String("state-dir", "/var/lib/zq-csi/state", "state directory")
	mode := fs.String("mode", driver.ModeAll, "services")
	name := fs.String("driver-name", driver.DefaultName, "driver name")
	maxVolumes := fs.Int64("max-volumes", 64, "max volumes")
	metricsAddr := fs.String("metrics-address", "", "metrics address")
	verbosity := fs.String("v", "0", "log verbosity")
	kubeletPath := fs.String("kubelet-registration-path", "", "the CSI socket as the kubelet sees it")
	regDir := fs.String("registration-dir", "/var/lib/kubelet/plugins_registry", "the kubelet's registration directory")
	nriSocket := fs.String("nri-socket", "", "the container runtime's NRI socket")
	faultSocket := fs.String("fault-socket", "", "the fault-injection control socket")
	claimFaults := fs.Bool("claim-faults", false, "apply the claims' faults annotation")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		serveUsage(e.stdout)
		return exitOK
	}
	switch {
	case err != nil:
	case len(operands) != 0:
		err = usagef("unexpected operands %q", operands)
	case *endpoint == "":
		err = usagef("--endpoint is required")
	case *maxVolumes <= 0:
		err = usagef("--max-volumes %d: must be positive", *maxVolumes)
	case *kubeletPath != "" && *mode == driver.ModeController:
		err = usagef("--kubelet-registration-path: the kubelet registers node plugins; --mode controller serves no node")
	case *kubeletPath != "" && !filepath.IsAbs(*kubeletPath):
		err = usagef("--kubelet-registration-path %q: must be an absolute path", *kubeletPath)
	case *nriSocket != "" && *mode == driver.ModeController:
		err = usagef("--nri-socket: containers run on nodes; --mode controller serves no node")
	case (*faultSocket != "" || *claimFaults) && *mode == driver.ModeController:
		err = usagef("--fault-socket and --claim-faults: faults are injected into staged volumes; --mode controller serves no node")
	}
	if err != nil {
		return e.fail(err, serveUsage)
	}
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	if err := klogFlags.Set("v", *verbosity); err != nil {
		return e.fail(usagef("-v %q: %v", *verbosity, err), serveUsage)
	}
	klog.SetOutput(e.stderr)
	klogFlags.Set("logtostderr", "false")
	klogFlags.Set("alsologtostderr", "false")
	if *nodeID == "" {
		if *nodeID, err = os.Hostname(); err != nil {
			return e.fail(fmt.Errorf("--node-id not given and no host name: %w", err), nil)
		}
	}

	// The node service serves its devices' I/O: under memory pressure the
	// kernel must not make it wait for their own writeback.
	if *mode != driver.ModeController {
		if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
			klog.ErrorS(err, "PR_SET_IO_FLUSHER (needs CAP_SYS_RESOURCE): writeback through the plugin's devices could deadlock under memory pressure")
		}
	}
	cfg := driver.Config{
		Name: *name, Version: version, NodeID: *nodeID, Mode: *mode,
		Pool: *poolDir, StateDir: *stateDir, MaxVolumes: *maxVolumes,
	}
	if *claimFaults {
		// Faults are for tests: a plugin without API access still serves.
		if cfg.Claims, err = driver.InClusterClaims(); err != nil {
			klog.ErrorS(err, "--claim-faults: the claims' faults annotation will not be applied")
		}
	}
	d, err := driver.New(cfg)
	if err != nil {
		return e.fail(err, nil)
	}
	if *faultSocket != "" {
		fl, err := faultctl.Listen(*faultSocket)
		if err != nil {
			return e.fail(fmt.Errorf("--fault-socket: %w", err), nil)
		}
		defer fl.Close()
		go d.Faults().Serve(fl)
		klog.InfoS("serving fault injection", "socket", *faultSocket)
	}
	l, err := driver.Listen(*endpoint)
	if err != nil {
		return e.fail(err, nil)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *metricsAddr != "" {
		ml, err := net.Listen("tcp", *metricsAddr)
		if err != nil {
			return e.fail(fmt.Errorf("--metrics-address: %w", err), nil)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", d.MetricsHandler())
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ml)
		defer srv.Close()
		klog.InfoS("serving metrics", "address", ml.Addr().String())
	}
	var registered <-chan error
	if *kubeletPath != "" {
		if registered, err = d.ServeRegistration(ctx, driver.Registration{Dir: *regDir, Endpoint: *kubeletPath}); err != nil {
			l.Close()
			return e.fail(err, nil)
		}
	}
	if *nriSocket != "" {
		p := &podsys.Plugin{Sysfs: "/sys", Dir: filepath.Join(*stateDir, "podsys"),
			Logf: func(f string, a ...any) { klog.InfoS(fmt.Sprintf(f, a...)) }}
		go p.Run(ctx, *nriSocket)
	}
	if err := d.Serve(ctx, l); err != nil {
		return e.fail(err, nil)
	}
	if registered != nil {
		if err := <-registered; err != nil {
			klog.ErrorS(err, "plugin registration")
		}
	}
	klog.InfoS("stopped")
	klog.Flush()
	return exitOK
}
