package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// sysfsRoot is where the node finds its block devices' queue settings.
const sysfsRoot = "/sys"

// setScheduler selects the I/O scheduler of block device dev (/dev/ublkb0)
// by its sysfs name, unless it has it already; "" leaves the kernel's
// choice. The node does this, not the pod: a container's sysfs is read-only.
func setScheduler(sysfs, dev, name string) error {
	if name == "" {
		return nil
	}
	p := filepath.Join(sysfs, "block", filepath.Base(dev), "queue", "scheduler")
	// Switching schedulers drains the queue: not again when a restarted
	// plugin takes a busy device back with the one it already has.
	if cur, err := os.ReadFile(p); err == nil && strings.Contains(string(cur), "["+name+"]") {
		return nil
	}
	if err := os.WriteFile(p, []byte(name), 0); err != nil {
		return fmt.Errorf("%s=%s on %s: %w", ParamScheduler, name, dev, err)
	}
	return nil
}
