package driver

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// Modes: which services a plugin process runs.
const (
	ModeController = "controller"
	ModeNode       = "node"
	ModeAll        = "all"
)

// DefaultName is the CSI driver name.
const DefaultName = "zq-csi.io"

// TopologyKey is the topology segment of a node: volumes live in a
// node-local pool and are accessible from that node only.
const TopologyKey = "topology.zq-csi.io/node"

// Config configures a Driver.
type Config struct {
	Name    string // CSI driver name (DefaultName)
	Version string
	NodeID  string
	Mode    string // ModeController, ModeNode or ModeAll
	// Pool is the directory of the node's volume images.
	Pool string
	// StateDir keeps the node's staged volumes and the images' journals,
	// so that a restarted plugin takes its devices back.
	StateDir string
	// MaxVolumes is the most volumes the node stages (0: 64).
	MaxVolumes int64
	// Attacher attaches images to the kernel; nil means the real one
	// (ublk and nbd).
	Attacher Attacher
	// Mounter mounts filesystems at staging paths and bind-mounts devices
	// and filesystems at publish targets; nil means the system's
	// (mount-utils).
	Mounter mount.Interface
	// Exec runs blkid and mkfs for Filesystem volumes; nil means the
	// system's.
	Exec utilexec.Interface
	// Claims, if set, is where the node service reads its volumes'
	// claims' FaultsAnnotation, every ClaimPoll (0: DefaultClaimPoll).
	Claims    ClaimReader
	ClaimPoll time.Duration
}

// Driver is the CSI plugin.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	cfg  Config
	pool pool

	// locks serializes the calls on one volume (by ID); a call that finds
	// its volume busy waits.
	locksMu sync.Mutex
	locks   map[string]*volumeLock

	node *nodeState // nil unless the node service runs
}

type volumeLock struct {
	mu   sync.Mutex
	refs int
}

// New checks cfg, creates the directories and, for the node service,
// takes back the volumes a previous process staged.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if cfg.MaxVolumes == 0 {
		cfg.MaxVolumes = 64
	}
	switch {
	case cfg.Mode != ModeController && cfg.Mode != ModeNode && cfg.Mode != ModeAll:
		return nil, fmt.Errorf("mode %q: must be controller, node or all", cfg.Mode)
	case cfg.NodeID == "":
		return nil, errors.New("a node ID is required")
	case cfg.Pool == "":
		return nil, errors.New("a pool directory is required")
	case cfg.Mode != ModeController && cfg.StateDir == "":
		return nil, errors.New("a state directory is required for the node service")
	}
	if err := os.MkdirAll(cfg.Pool, 0o700); err != nil {
		return nil, fmt.Errorf("pool: %w", err)
	}
	d := &Driver{cfg: cfg, pool: pool{dir: cfg.Pool}, locks: map[string]*volumeLock{}}
	if cfg.Mode != ModeController {
		if cfg.Attacher == nil {
			cfg.Attacher = kernelAttacher{}
		}
		if cfg.Mounter == nil {
			cfg.Mounter = mount.New("")
		}
		if cfg.Exec == nil {
			cfg.Exec = utilexec.New()
		}
		d.cfg = cfg
		n, err := newNodeState(cfg.StateDir, d.journalDir(), cfg.Attacher,
			&mount.SafeFormatAndMount{Interface: cfg.Mounter, Exec: cfg.Exec})
		if err != nil {
			return nil, err
		}
		d.node = n
		d.readopt()
	}
	if cfg.Mode != ModeNode {
		// What a snapshot or a deletion cut short left.
		if err := d.pool.collect(); err != nil {
			klog.ErrorS(err, "collecting the pool's unused snapshot images; they stay until the next deletion", "pool", cfg.Pool)
		}
	}
	return d, nil
}

// journalDir holds the images' redo journals (image.OpenOptions.JournalDir):
// under the state directory, so that whoever opens an image next on this
// node (the node service after a restart, or the controller growing it)
// replays what a killed plugin left. Empty without a state directory.
func (d *Driver) journalDir() string {
	if d.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(d.cfg.StateDir, "journal")
}

// lock takes volume id's lock and returns its release.
func (d *Driver) lock(id string) func() {
	l := d.lockRef(id)
	l.mu.Lock()
	return func() { d.unlock(id, l) }
}

// tryLock takes volume id's lock if no one holds it: for a request that
// holds another volume's lock already and must not wait (two clones of
// each other would wait forever).
func (d *Driver) tryLock(id string) (release func(), ok bool) {
	l := d.lockRef(id)
	if !l.mu.TryLock() {
		d.lockUnref(id, l)
		return nil, false
	}
	return func() { d.unlock(id, l) }, true
}

func (d *Driver) lockRef(id string) *volumeLock {
	d.locksMu.Lock()
	defer d.locksMu.Unlock()
	l := d.locks[id]
	if l == nil {
		l = &volumeLock{}
		d.locks[id] = l
	}
	l.refs++
	return l
}

func (d *Driver) unlock(id string, l *volumeLock) {
	l.mu.Unlock()
	d.lockUnref(id, l)
}

func (d *Driver) lockUnref(id string, l *volumeLock) {
	d.locksMu.Lock()
	defer d.locksMu.Unlock()
	if l.refs--; l.refs == 0 {
		delete(d.locks, id)
	}
}

// Listen opens the endpoint, unix:///path (a stale socket file is
// replaced). Nothing else is accepted: the plugin listens on no network.
func Listen(endpoint string) (net.Listener, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" || u.Path == "" {
		return nil, fmt.Errorf("endpoint %q: must be unix:///path/to/socket", endpoint)
	}
	if err := os.MkdirAll(filepath.Dir(u.Path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(u.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing the old socket: %w", err)
	}
	return net.Listen("unix", u.Path)
}

// Serve serves the configured services on l until ctx is done, then stops
// gracefully. Staged volumes stay attached: a plugin that exits (an upgrade)
// leaves its devices to the next one, which takes them back.
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	s := grpc.NewServer(grpc.UnaryInterceptor(logCalls))
	csi.RegisterIdentityServer(s, d)
	if d.cfg.Mode != ModeNode {
		csi.RegisterControllerServer(s, d)
	}
	if d.node != nil {
		csi.RegisterNodeServer(s, d)
	}
	if d.node != nil && d.cfg.Claims != nil {
		go d.watchClaims(ctx, d.cfg.Claims, cmp.Or(d.cfg.ClaimPoll, DefaultClaimPoll))
	}
	stopped := make(chan struct{})
	go func() {
		<-ctx.Done()
		s.GracefulStop()
		close(stopped)
	}()
	klog.InfoS("serving CSI", "driver", d.cfg.Name, "version", d.cfg.Version, "mode", d.cfg.Mode,
		"node", d.cfg.NodeID, "endpoint", l.Addr().String(), "pool", d.cfg.Pool)
	err := s.Serve(l)
	if err == nil {
		<-stopped // the calls in flight end first
	}
	if d.node != nil {
		d.flushAll()
	}
	return err
}

// logCalls logs every call with its duration and outcome (klog -v=2 for
// successes, always for failures).
func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	if err != nil {
		klog.ErrorS(err, "CSI call failed", "method", info.FullMethod, "code", status.Code(err), "duration", time.Since(start))
	} else {
		klog.V(2).InfoS("CSI call", "method", info.FullMethod, "duration", time.Since(start))
	}
	return resp, err
}

// statusf is a gRPC error with code c.
func statusf(c codes.Code, format string, a ...any) error { return status.Errorf(c, format, a...) }
