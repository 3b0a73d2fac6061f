package podsys

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/nri/pkg/api"
)

// fakeSysfs lays out the parts of sysfs this package reads, as the kernel
// does: block devices under devices/, /sys/block and /sys/dev/block as
// relative symlinks to them. devices maps "MAJ:MIN" to name and zone model.
func fakeSysfs(t *testing.T, devices map[string][2]string) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"block", "dev/block"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for numbers, d := range devices {
		name, model := d[0], d[1]
		queue := filepath.Join(root, "devices/virtual/block", name, "queue")
		if err := os.MkdirAll(queue, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(queue, "zoned"), []byte(model+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../devices/virtual/block/"+name, filepath.Join(root, "block", name)); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../../devices/virtual/block/"+name, filepath.Join(root, "dev/block", numbers)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

var hostDevices = map[string][2]string{
	"259:3": {"ublkb3", "host-managed"},
	"259:4": {"ublkb4", "host-managed"},
	"7:0":   {"loop0", "none"},
	"8:0":   {"sda", "none"},
}

func TestAliases(t *testing.T) {
	sysfs := fakeSysfs(t, hostDevices)
	tests := []struct {
		name    string
		devices []Device
		want    []Alias
	}{
		{"a renamed zoned device gets an alias", []Device{{"/dev/zoned", 259, 3}}, []Alias{{"zoned", "ublkb3"}}},
		{"under its own name it needs none", []Device{{"/dev/ublkb3", 259, 3}}, nil},
		{"a renamed regular device needs none", []Device{{"/dev/xvda", 7, 0}}, nil},
		{"a device sysfs does not know is left alone", []Device{{"/dev/gone", 259, 99}}, nil},
		{"two zoned devices, one renamed", []Device{{"/dev/data/wal", 259, 4}, {"/dev/ublkb3", 259, 3}}, []Alias{{"wal", "ublkb4"}}},
		{"a name a host device has", []Device{{"/dev/sda", 259, 3}}, []Alias{{"sda", "ublkb3"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Aliases(sysfs, tt.devices)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("Aliases = %v, want %v", got, tt.want)
			}
		})
	}
}

// containerView is a directory laid out as the container sees sysfs: the
// host's devices/ and dev/; Build makes its block/.
func containerView(t *testing.T, sysfs string) string {
	t.Helper()
	view := t.TempDir()
	for _, d := range []string{"devices", "dev"} {
		if err := os.Symlink(filepath.Join(sysfs, d), filepath.Join(view, d)); err != nil {
			t.Fatal(err)
		}
	}
	return view
}

func TestBuild(t *testing.T) {
	sysfs := fakeSysfs(t, hostDevices)
	view := containerView(t, sysfs)
	block := filepath.Join(view, "block")
	if err := Build(block, sysfs, []Alias{{"zoned", "ublkb3"}, {"sda", "ublkb4"}}); err != nil {
		t.Fatal(err)
	}
	// What libzbd reads: /sys/block/<name>/queue/zoned.
	for name, want := range map[string]string{"zoned": "host-managed", "ublkb3": "host-managed",
		"sda": "host-managed", "ublkb4": "host-managed", "loop0": "none"} {
		b, err := os.ReadFile(filepath.Join(view, "block", name, "queue", "zoned"))
		if err != nil || strings.TrimSpace(string(b)) != want {
			t.Errorf("block/%s/queue/zoned: %q, %v; want %s", name, b, err, want)
		}
	}
	if err := Build(block, sysfs, nil); err == nil {
		t.Error("Build over an existing directory succeeded")
	}
	if err := Build(filepath.Join(t.TempDir(), "b"), sysfs, []Alias{{"zoned", "ublkb9"}}); err == nil ||
		!strings.Contains(err.Error(), "no ublkb9") {
		t.Errorf("an alias of a device sysfs lacks: %v", err)
	}
}

func container(id string, devices ...*api.LinuxDevice) *api.Container {
	return &api.Container{Id: id, Name: "app", Linux: &api.LinuxContainer{Devices: devices}}
}

func TestPlugin(t *testing.T) {
	sysfs := fakeSysfs(t, hostDevices)
	var logs []string
	p := &Plugin{Sysfs: sysfs, Dir: t.TempDir(), Logf: func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) }}
	ctx := context.Background()
	pod := &api.PodSandbox{Name: "db", Namespace: "team-a"}
	zoned := &api.LinuxDevice{Path: "/dev/zoned", Type: "b", Major: 259, Minor: 3}

	t.Run("a container with a renamed zoned device gets /sys/block", func(t *testing.T) {
		a, _, err := p.CreateContainer(ctx, pod, container("c1", zoned))
		if err != nil || a == nil || len(a.Mounts) != 1 {
			t.Fatalf("adjustment %v, %v", a, err)
		}
		m := a.Mounts[0]
		if m.Destination != "/sys/block" || m.Source != filepath.Join(p.Dir, "c1") || !slices.Contains(m.Options, "ro") {
			t.Errorf("mount %v", m)
		}
		if _, err := os.Lstat(filepath.Join(p.Dir, "c1", "zoned")); err != nil {
			t.Error(err)
		}
	})
	t.Run("containers without one are left alone", func(t *testing.T) {
		for _, c := range []*api.Container{
			container("c2"),
			container("c3", &api.LinuxDevice{Path: "/dev/ublkb3", Type: "b", Major: 259, Minor: 3}),
			container("c4", &api.LinuxDevice{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229}),
		} {
			if a, _, err := p.CreateContainer(ctx, pod, c); a != nil || err != nil {
				t.Errorf("container %s: adjustment %v, %v", c.Id, a, err)
			}
		}
	})
	t.Run("a container ID that is a path is refused, the container still created", func(t *testing.T) {
		logs = nil
		a, _, err := p.CreateContainer(ctx, pod, container("../escape", zoned))
		if a != nil || err != nil || len(logs) != 1 || !strings.Contains(logs[0], "team-a/db/app") {
			t.Errorf("adjustment %v, %v, logs %q", a, err, logs)
		}
		if _, err := os.Lstat(filepath.Join(filepath.Dir(p.Dir), "escape")); err == nil {
			t.Error("a directory was made outside Dir")
		}
	})
	t.Run("removal and synchronisation drop the directories of gone containers", func(t *testing.T) {
		for _, id := range []string{"c5", "c6"} {
			if _, _, err := p.CreateContainer(ctx, pod, container(id, zoned)); err != nil {
				t.Fatal(err)
			}
		}
		p.RemoveContainer(ctx, pod, container("c1"))
		p.Synchronize(ctx, nil, []*api.Container{container("c5")})
		entries, _ := os.ReadDir(p.Dir)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if !slices.Equal(names, []string{"c5"}) {
			t.Errorf("left %v, want [c5]", names)
		}
	})
}
