package podsys

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"
)

// DefaultSocket is where containerd (2.x enables NRI by default) and CRI-O
// serve NRI.
const DefaultSocket = api.DefaultSocketPath

// Plugin is the NRI plugin: for each container the runtime creates with a
// renamed zoned block device it builds a block directory (Build) under Dir
// and has the runtime bind it read-only over the container's /sys/block.
// Dir must be a host path (the runtime mounts it), one per node.
type Plugin struct {
	Sysfs string // the host's sysfs mount, "/sys"
	Dir   string
	Logf  func(format string, args ...any)
}

// containerDir is the block directory of container id, which the runtime
// chose: a name, never a path.
func (p *Plugin) containerDir(id string) (string, error) {
	if id == "" || id != filepath.Base(id) || id == "." || id == ".." {
		return "", fmt.Errorf("container ID %q is not a file name", id)
	}
	return filepath.Join(p.Dir, id), nil
}

// CreateContainer gives the container its /sys/block when a device needs
// it. A failure is logged and the container is created as it would be
// without this plugin: a pod must not fail to start for want of an alias.
func (p *Plugin) CreateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	var devices []Device
	for _, d := range c.GetLinux().GetDevices() {
		if d.GetType() == "b" {
			devices = append(devices, Device{Path: d.GetPath(), Major: d.GetMajor(), Minor: d.GetMinor()})
		}
	}
	if len(devices) == 0 {
		return nil, nil, nil
	}
	dir, aliases, err := p.blockDir(c.GetId(), devices)
	if err != nil {
		who := pod.GetNamespace() + "/" + pod.GetName() + "/" + c.GetName()
		p.Logf("container %s: its zoned devices will look unzoned to libzbd under their names in the container: %v", who, err)
		return nil, nil, nil
	}
	if dir == "" {
		return nil, nil, nil
	}
	a := &api.ContainerAdjustment{}
	a.AddMount(&api.Mount{Destination: "/sys/block", Type: "bind", Source: dir, Options: []string{"bind", "ro"}})
	p.Logf("container %s/%s/%s: /sys/block with aliases %v", pod.GetNamespace(), pod.GetName(), c.GetName(), aliases)
	return a, nil, nil
}

// blockDir builds the block directory of container id for its devices;
// "" when none of them needs an alias.
func (p *Plugin) blockDir(id string, devices []Device) (string, []Alias, error) {
	aliases, err := Aliases(p.Sysfs, devices)
	if err != nil || len(aliases) == 0 {
		return "", nil, err
	}
	dir, err := p.containerDir(id)
	if err != nil {
		return "", nil, err
	}
	os.RemoveAll(dir) // an earlier attempt's
	if err := Build(dir, p.Sysfs, aliases); err != nil {
		return "", nil, err
	}
	return dir, aliases, nil
}

// Configure says the runtime took the plugin; the zero mask subscribes it
// to the events it has methods for.
func (p *Plugin) Configure(_ context.Context, _, runtime, version string) (api.EventMask, error) {
	p.Logf("NRI plugin registered with %s %s: renamed zoned devices get a /sys/block entry in their containers", runtime, version)
	return 0, nil
}

// RemoveContainer drops the container's block directory.
func (p *Plugin) RemoveContainer(_ context.Context, _ *api.PodSandbox, c *api.Container) error {
	if dir, err := p.containerDir(c.GetId()); err == nil {
		os.RemoveAll(dir)
	}
	return nil
}

// Synchronize drops the block directories of containers that are gone,
// removed while no plugin was connected.
func (p *Plugin) Synchronize(_ context.Context, _ []*api.PodSandbox, containers []*api.Container) ([]*api.ContainerUpdate, error) {
	live := make(map[string]bool, len(containers))
	for _, c := range containers {
		live[c.GetId()] = true
	}
	entries, err := os.ReadDir(p.Dir)
	if err != nil {
		return nil, nil
	}
	for _, e := range entries {
		if !live[e.Name()] {
			os.RemoveAll(filepath.Join(p.Dir, e.Name()))
		}
	}
	return nil, nil
}

// retryInterval is how long Run waits before connecting again.
const retryInterval = 10 * time.Second

// Run serves the plugin on the runtime's NRI socket until ctx ends,
// connecting again when the runtime goes away or is not there yet (NRI
// disabled, or the runtime restarting); it logs each change.
func (p *Plugin) Run(ctx context.Context, socket string) {
	if err := os.MkdirAll(p.Dir, 0o755); err != nil {
		p.Logf("NRI plugin not started: %v", err)
		return
	}
	var last string
	for ctx.Err() == nil {
		err := p.serve(ctx, socket)
		msg := "disconnected"
		if err != nil {
			msg = err.Error()
		}
		if msg != last && ctx.Err() == nil {
			p.Logf("NRI plugin on %s: %s; trying again every %s", socket, msg, retryInterval)
			last = msg
		}
		select {
		case <-ctx.Done():
		case <-time.After(retryInterval):
		}
	}
}

func (p *Plugin) serve(ctx context.Context, socket string) error {
	if _, err := os.Stat(socket); err != nil {
		return err
	}
	s, err := stub.New(p, stub.WithPluginName("zq-csi"), stub.WithPluginIdx("50"),
		stub.WithSocketPath(socket), stub.WithLogger(logger{p.Logf}))
	if err != nil {
		return err
	}
	if err := s.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// logger passes NRI's own log lines on, errors and warnings only.
type logger struct {
	logf func(string, ...any)
}

func (l logger) Debugf(context.Context, string, ...any) {}
func (l logger) Infof(context.Context, string, ...any)  {}
func (l logger) Warnf(_ context.Context, f string, a ...any) {
	l.logf("NRI: "+f, a...)
}
func (l logger) Errorf(_ context.Context, f string, a ...any) {
	l.logf("NRI: "+f, a...)
}
