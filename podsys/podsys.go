// Package podsys makes a container's zoned block devices recognisable as
// zoned under the names the container gives them.
//
// Kubernetes puts a block volume into a container as a device node at the
// pod's volumeDevices.devicePath (/dev/xvda), not under its kernel name
// (/dev/ublkb3). Software that finds a device's zone model through
// /sys/block/<basename of its path> (libzbd, and with it ZenFS and the zbd
// tools) then looks for /sys/block/xvda, which does not exist, and takes
// the device for a regular one. A container cannot fix that itself: its
// sysfs is read-only. The container runtime can, when it creates the
// container: this package's NRI plugin (the runtime's Node Resource
// Interface, github.com/containerd/nri) gives each container that has a
// zoned device under another name a /sys/block of its own, a read-only
// bind mount of a directory of symlinks that has every entry of the host's
// /sys/block plus one per renamed zoned device, under the container's name,
// pointing at the device's real sysfs directory. Everything else in the
// container's sysfs stays the runtime's.
package podsys

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Device is a block device as a container sees it: the device node's path
// in the container, and the device's numbers.
type Device struct {
	Path         string
	Major, Minor int64
}

// Alias is a renamed zoned device: Name is the basename of its path in the
// container, Kernel its name in sysfs (/sys/block/<Kernel>).
type Alias struct {
	Name, Kernel string
}

// Aliases returns the aliases the container's devices need: one per zoned
// block device (sysfs queue/zoned not "none") whose basename in the
// container is not its kernel name. sysfs is the host's sysfs mount (/sys).
// Devices that sysfs does not know (not block devices, or gone) are left
// alone.
func Aliases(sysfs string, devices []Device) ([]Alias, error) {
	var aliases []Alias
	for _, d := range devices {
		dir := filepath.Join(sysfs, "dev", "block", fmt.Sprintf("%d:%d", d.Major, d.Minor))
		model, err := os.ReadFile(filepath.Join(dir, "queue", "zoned"))
		if errors.Is(err, os.ErrNotExist) {
			continue // not a whole block device (a partition, a char device)
		}
		if err != nil {
			return nil, fmt.Errorf("device %s (%d:%d): %w", d.Path, d.Major, d.Minor, err)
		}
		if strings.TrimSpace(string(model)) == "none" {
			continue
		}
		target, err := os.Readlink(dir)
		if err != nil {
			return nil, fmt.Errorf("device %s (%d:%d): %w", d.Path, d.Major, d.Minor, err)
		}
		a := Alias{Name: filepath.Base(d.Path), Kernel: filepath.Base(target)}
		if a.Name != a.Kernel {
			aliases = append(aliases, a)
		}
	}
	return aliases, nil
}

// Build makes dir the /sys/block a container with these aliases sees: a
// symlink for every entry of sysfs's block directory, with its target as
// the kernel wrote it (relative, so it resolves in the container's own
// sysfs mount), and one per alias with its kernel name's target. An alias
// whose name is also a host device's takes its place: in the container,
// that name is the zoned device. dir must not exist.
func Build(dir, sysfs string, aliases []Alias) error {
	block := filepath.Join(sysfs, "block")
	entries, err := os.ReadDir(block)
	if err != nil {
		return err
	}
	links := make(map[string]string, len(entries)+len(aliases))
	for _, e := range entries {
		t, err := os.Readlink(filepath.Join(block, e.Name()))
		if err != nil {
			return err
		}
		links[e.Name()] = t
	}
	for _, a := range aliases {
		t, ok := links[a.Kernel]
		if !ok {
			return fmt.Errorf("%s: no %s in %s", a.Name, a.Kernel, block)
		}
		links[a.Name] = t
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	for name, t := range links {
		if err := os.Symlink(t, filepath.Join(dir, name)); err != nil {
			os.RemoveAll(dir)
			return err
		}
	}
	return nil
}
