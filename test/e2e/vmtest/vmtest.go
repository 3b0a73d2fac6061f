// Package vmtest holds the helpers of the tests that run in the VM harness
// kernel (build tag vmtest, run by test/e2e/vm-go-test.sh): direct I/O on
// block devices, the zq-csi binary and its attach processes, host tools.
package vmtest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/image"
)

// Main runs the tests of a package that needs the VM harness kernel, and
// refuses to run them anywhere else: they must not pass or skip on a host
// without the kernel features.
func Main(m *testing.M, pkg string) {
	if os.Getenv("ZQ_VM") != "1" {
		fmt.Fprintf(os.Stderr, "these tests need the VM harness kernel: run test/e2e/vm-go-test.sh %s (ZQ_VM=1 is not set)\n", pkg)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// AlignedBuf is a page-aligned buffer for O_DIRECT.
func AlignedBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// Pattern is n bytes that differ per seed and per 4 KiB block.
func Pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/4096)
	}
	return b
}

// OpenDirect opens a device for O_DIRECT reads and writes.
func OpenDirect(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// DirectRead reads n bytes at off with O_DIRECT.
func DirectRead(t *testing.T, f *os.File, off int64, n int) []byte {
	t.Helper()
	b := AlignedBuf(t, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("O_DIRECT read at %#x+%#x of %s: %v", off, n, f.Name(), err)
	}
	return append([]byte(nil), b...)
}

// DirectWrite writes p at off through the aligned buffer buf.
func DirectWrite(f *os.File, p []byte, off int64, buf []byte) error {
	copy(buf, p)
	_, err := f.WriteAt(buf[:len(p)], off)
	return err
}

// CheckImageClean fails the test unless `check` finds the image clean.
func CheckImageClean(t *testing.T, path string) {
	t.Helper()
	img, err := image.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	res, err := img.Check(false)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Clean() {
		t.Fatalf("image check after detach: corruptions %v, leaks %v", res.Corruptions, res.Leaks)
	}
}

// ZQCSI returns the zq-csi binary: $ZQ_CSI_BIN when set (built on the
// host, e.g. bin/zq-csi), else one built now from cmdDir.
func ZQCSI(t testing.TB, cmdDir string) string {
	t.Helper()
	if p := os.Getenv("ZQ_CSI_BIN"); p != "" {
		return p
	}
	bin := filepath.Join(t.TempDir(), "zq-csi")
	out, err := exec.Command("go", "build", "-o", bin, cmdDir).CombinedOutput()
	if err != nil {
		t.Fatalf("go build zq-csi: %v\n%s", err, out)
	}
	return bin
}

// Attach is a running `zq-csi attach`.
type Attach struct {
	Cmd    *exec.Cmd
	Dev    string
	Stderr *bytes.Buffer
	exited chan error
}

// StartAttach runs `zq-csi attach ARGS...` and waits for the device it
// prints, which must start with prefix (/dev/nbd, /dev/ublkb). The process
// is killed at the end of the test if still running.
func StartAttach(t *testing.T, bin, prefix string, args ...string) *Attach {
	t.Helper()
	a := &Attach{Cmd: exec.Command(bin, append([]string{"attach"}, args...)...), Stderr: &bytes.Buffer{}, exited: make(chan error, 1)}
	a.Cmd.Stderr = a.Stderr
	out, err := a.Cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line := make(chan string, 1)
	go func() {
		r := bufio.NewReader(out)
		s, _ := r.ReadString('\n')
		line <- strings.TrimSpace(s)
		io.Copy(io.Discard, r)
		a.exited <- a.Cmd.Wait()
	}()
	select {
	case a.Dev = <-line:
	case <-time.After(60 * time.Second):
		a.Cmd.Process.Kill()
		t.Fatalf("zq-csi attach printed no device in 60s; stderr: %s", a.Stderr)
	}
	if !strings.HasPrefix(a.Dev, prefix) {
		a.Cmd.Process.Kill()
		t.Fatalf("zq-csi attach printed %q, want %s...; stderr: %s", a.Dev, prefix, a.Stderr)
	}
	t.Cleanup(func() {
		if a.Cmd.ProcessState == nil {
			a.Cmd.Process.Kill()
			<-a.exited
		}
	})
	return a
}

// Wait waits for the attach process to exit and returns its error.
func (a *Attach) Wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-a.exited:
		return err
	case <-time.After(60 * time.Second):
		a.Cmd.Process.Kill()
		t.Fatalf("zq-csi attach did not exit in 60s; stderr: %s", a.Stderr)
	}
	return nil
}

// Run runs a tool and returns its combined output, failing the test if it
// fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Background is a command the test runs while it does something else (a
// workload across a server's death, say).
type Background struct {
	Cmd  *exec.Cmd
	Out  *bytes.Buffer // stdout and stderr
	done chan error
}

// Start starts name with args in the background; it is killed at the end
// of the test if still running.
func Start(t *testing.T, name string, args ...string) *Background {
	t.Helper()
	b := &Background{Cmd: exec.Command(name, args...), Out: &bytes.Buffer{}, done: make(chan error, 1)}
	b.Cmd.Stdout, b.Cmd.Stderr = b.Out, b.Out
	if err := b.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { b.done <- b.Cmd.Wait() }()
	t.Cleanup(func() {
		if b.Cmd.ProcessState == nil {
			b.Cmd.Process.Kill()
			<-b.done
		}
	})
	return b
}

// Done delivers the command's exit error once it has ended.
func (b *Background) Done() <-chan error { return b.done }
