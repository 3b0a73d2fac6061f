package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestExportRefusesBadArguments(t *testing.T) {
	f := newImage(t, "1M")
	for _, args := range [][]string{
		{"export"},
		{"export", f, f},
		{"export", "--socket", "/tmp/x.sock", "--tcp", "127.0.0.1:0", f},
		{"export", "--shared", "-1", f},
		{"export", "--bogus", f},
	} {
		_, stderr, code := cli(t, "", args...)
		if code != exitUsage || !strings.Contains(stderr, "Usage: zq-csi export") {
			t.Errorf("%q: exit %d, stderr %q", args, code, stderr)
		}
	}
	stdout, _, code := cli(t, "", "export", "--help")
	if code != exitOK || !strings.Contains(stdout, "--read-only") {
		t.Errorf("--help: exit %d %q", code, stdout)
	}
	_, stderr, code := cli(t, "", "export", "--socket", filepath.Join(t.TempDir(), "s.sock"), filepath.Join(t.TempDir(), "missing.qcow2"))
	if code != exitFailure || !strings.Contains(stderr, "missing.qcow2") {
		t.Errorf("missing file: exit %d, stderr %q", code, stderr)
	}
}

func TestExportDefaultSocketPathUsesXDGRuntimeDir(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	if p := defaultSocketPath("vol/1"); p != "/run/user/1000/zq-csi/vol_1.sock" {
		t.Errorf("defaultSocketPath: %s", p)
	}
	t.Setenv("XDG_RUNTIME_DIR", "")
	if p := defaultSocketPath(""); p != "/run/zq-csi/export.sock" {
		t.Errorf("defaultSocketPath: %s", p)
	}
}

// startExport runs `zq-csi export` and returns the URI it prints and a
// function that sends it sig and returns its exit code and stderr.
func startExport(t *testing.T, args ...string) (string, func(os.Signal) (int, string)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	cmd := exec.CommandContext(ctx, zqBinary(t), append([]string{"export"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stopFn := func(sig os.Signal) (int, string) {
		if stopped {
			return 0, ""
		}
		stopped = true
		cmd.Process.Signal(sig)
		err := cmd.Wait()
		cancel()
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), stderr.String()
		} else if err != nil {
			t.Fatal(err)
		}
		return 0, stderr.String()
	}
	t.Cleanup(func() { stopFn(syscall.SIGKILL) })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		code, se := stopFn(syscall.SIGTERM)
		t.Fatalf("zq-csi export printed no URI: %v (exit %d, stderr %s)", err, code, se)
	}
	return strings.TrimSpace(line), stopFn
}

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: install qemu-utils and libnbd-bin (`make deps`): %v", tool, err)
		}
	}
}

func shortDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "zqx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestInteropExportSIGTERMFlushesAndClosesTheImage(t *testing.T) {
	interop(t)
	needTools(t, "nbdinfo")
	f := newImage(t, "64M")
	sock := filepath.Join(shortDir(t), "vol.sock")
	uri, stop := startExport(t, "--socket", sock, "--name", "vol", f)
	if want := "nbd+unix:///vol?socket=" + sock; uri != want {
		t.Fatalf("printed %q, want %q", uri, want)
	}
	mustOK(t, "qemu-io", runTool(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x3c 1M 3M", "-c", "write -z 2M 64k", "-c", "discard 3M 1M", uri))
	size := mustOK(t, "nbdinfo --size", runTool(t, "nbdinfo", "--size", uri))
	if strings.TrimSpace(size.stdout) != "67108864" {
		t.Fatalf("nbdinfo --size: %q", size.stdout)
	}
	if code, stderr := stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("export after SIGTERM: exit %d\n%s", code, stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	zqCheckClean(t, f)
	qemuImgCheckClean(t, f)
	mustOK(t, "qemu-io read back", runTool(t, "qemu-io", "-f", "qcow2",
		"-c", "read -P 0x3c 1M 1M", "-c", "read -P 0 2M 64k", "-c", "read -P 0x3c 2162688 983040",
		"-c", "read -P 0 3M 1M", f))
}

func TestInteropExportReadOnlyOverLoopbackTCP(t *testing.T) {
	interop(t)
	needTools(t, "nbdinfo")
	f := newImage(t, "8M")
	uri, stop := startExport(t, "--tcp", "127.0.0.1:0", "--read-only", f)
	if !regexp.MustCompile(`^nbd://127\.0\.0\.1:\d+/$`).MatchString(uri) {
		t.Fatalf("printed %q", uri)
	}
	if r := runTool(t, "nbdinfo", "--is", "read-only", uri); r.code != 0 {
		t.Fatalf("nbdinfo --is read-only: %v", r)
	}
	r := runTool(t, "qemu-io", "-f", "raw", "-c", "write 0 4k", uri)
	// qemu sees READ_ONLY and refuses to open the export for writing.
	if r.code == 0 || !strings.Contains(r.stderr, "Permission denied") {
		t.Fatalf("write to a read-only export: %v", r)
	}
	mustOK(t, "qemu-io -r", runTool(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 8M", uri))
	if code, stderr := stop(syscall.SIGINT); code != 0 {
		t.Fatalf("export after SIGINT: exit %d\n%s", code, stderr)
	}
	zqCheckClean(t, f)
}

func TestInteropExportZonedImageKeepsTheWritePointerRules(t *testing.T) {
	interop(t)
	f := newImage(t, "8M", "zone.mode=host-managed,zone.size=1M,zone.conventional_zones=1,zone.max_append_bytes=64k")
	sock := filepath.Join(shortDir(t), "z.sock")
	uri, stop := startExport(t, "--socket", sock, f)
	r := runTool(t, "qemu-io", "-f", "raw", "-c", "write -P 7 2101248 4k", uri) // zone 2 + 4k
	if !strings.Contains(r.stdout, "write failed: Invalid argument") {
		t.Fatalf("write past the write pointer: %v", r)
	}
	mustOK(t, "qemu-io", runTool(t, "qemu-io", "-f", "raw", "-c", "write -P 7 3M 8k", "-c", "write -P 8 3153920 4k",
		"-c", "write -P 9 4M 4k", "-c", "discard 4M 1M", uri))
	if code, stderr := stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("export after SIGTERM: exit %d\n%s", code, stderr)
	}
	zqCheckClean(t, f)
	rep := mustOK(t, "zq-csi io zrp", zq(t, "io", "-r", "-c", "zrp 2M 3", f)).stdout
	want := "start: 0x1000, len 0x800, cap 0x800, wptr 0x1000, zcond:1, [type: 2]\n" +
		"start: 0x1800, len 0x800, cap 0x800, wptr 0x1818, zcond:4, [type: 2]\n" +
		"start: 0x2000, len 0x800, cap 0x800, wptr 0x2000, zcond:1, [type: 2]\n"
	if rep != want {
		t.Fatalf("zone report after the export:\n%s\nwant:\n%s", rep, want)
	}
}
