package driver

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSetScheduler(t *testing.T) {
	sysfs := t.TempDir()
	queue := filepath.Join(sysfs, "block", "ublkb3", "queue")
	if err := os.MkdirAll(queue, 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(queue, "scheduler")
	const kernels = "[none] mq-deadline\n"
	if err := os.WriteFile(file, []byte(kernels), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Run("unset leaves the kernel's choice", func(t *testing.T) {
		if err := setScheduler(sysfs, "/dev/ublkb3", ""); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(file); string(b) != kernels {
			t.Errorf("scheduler file %q, want it untouched", b)
		}
	})
	t.Run("the scheduler the device has is not switched again", func(t *testing.T) {
		if err := setScheduler(sysfs, "/dev/ublkb3", "none"); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(file); string(b) != kernels {
			t.Errorf("scheduler file %q, want it untouched", b)
		}
	})
	t.Run("a name is written to the device's queue", func(t *testing.T) {
		if err := setScheduler(sysfs, "/dev/ublkb3", "mq-deadline"); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(file); string(b) != "mq-deadline" {
			t.Errorf("scheduler file %q, want mq-deadline", b)
		}
	})
	t.Run("a device without a queue is an error naming the parameter", func(t *testing.T) {
		err := setScheduler(sysfs, "/dev/nbd7", "none")
		if err == nil || !strings.Contains(err.Error(), "queue.scheduler=none on /dev/nbd7") || !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("error %v", err)
		}
	})
}
