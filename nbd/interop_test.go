package nbd

// Interop tier: an in-process server on a unix socket against Debian's
// qemu-io/qemu-img (qemu-utils) and libnbd's nbdinfo/nbdcopy (libnbd-bin).
// The tests FAIL when a tool is missing (`make deps` installs them);
// `go test -short` skips the tier explicitly.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

func interop(t *testing.T, tools ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("interop tier: skipped with -short")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: the interop tests need qemu-utils and libnbd-bin (run `make deps` as root): %v", tool, err)
		}
	}
	t.Parallel()
}

// listen serves exports on a unix socket in a short temporary directory
// and returns the socket's path; the server stops at the test's end.
func listen(t *testing.T, exports ...*Export) (string, *Server) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Exports: exports}
	go s.Serve(l)
	t.Cleanup(func() { stop(t, s) })
	return path, s
}

func stop(t *testing.T, s *Server) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Errorf("shutdown: %v", err)
	}
}

func uri(sock, name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

func run(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := run(t, name, args...)
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return out
}

func checkClean(t *testing.T, img *image.Image) {
	t.Helper()
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	r, err := img.Check(false)
	if err != nil || !r.Clean() {
		t.Fatalf("image check: %v %+v", err, r)
	}
}

func TestInteropQemuIoReadWriteZeroDiscardFlush(t *testing.T) {
	interop(t, "qemu-io", "qemu-img")
	img := newImage(t, 64<<20)
	sock, s := listen(t, &Export{Name: "disk", Backend: volume.Plain{Img: img}})
	u := uri(sock, "disk")
	info := mustRun(t, "qemu-img", "info", "-f", "raw", u)
	if !strings.Contains(info, "virtual size: 64 MiB (67108864 bytes)") {
		t.Fatalf("qemu-img info:\n%s", info)
	}
	out := mustRun(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xa5 0 2M",
		"-c", "write -P 0x5a 1000448 4096", // unaligned to clusters
		"-c", "write -z 4M 1M",
		"-c", "write -P 0x11 8M 1M",
		"-c", "discard 8M 1M",
		"-c", "flush",
		"-c", "read -P 0xa5 0 1000448",
		"-c", "read -P 0x5a 1000448 4096",
		"-c", "read -P 0 4M 1M",
		"-c", "read -P 0 8M 1M", u)
	if strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	stop(t, s)
	checkClean(t, img)
	got := make([]byte, 9<<20)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0xa5}, 2<<20)
	copy(want[1000448:], bytes.Repeat([]byte{0x5a}, 4096))
	if !bytes.Equal(got[:2<<20], want) || !bytes.Equal(got[2<<20:], make([]byte, 7<<20)) {
		t.Fatal("image content differs from what qemu-io wrote")
	}
}

func TestInteropNbdinfoShowsCapabilitiesAndTheImageMap(t *testing.T) {
	interop(t, "nbdinfo")
	img := newImage(t, 32<<20)
	img.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 1<<20)
	img.WriteAt(bytes.Repeat([]byte{2}, 64<<10), 5<<20)
	img.WriteZeroes(5<<20, 64<<10, false)
	img.WriteAt(bytes.Repeat([]byte{3}, 3<<20), 20<<20)
	sock, _ := listen(t, &Export{Backend: volume.Plain{Img: img}})
	var info struct {
		Exports []map[string]any `json:"exports"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "nbdinfo", "--json", uri(sock, ""))), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("exports: %+v", info.Exports)
	}
	for _, k := range []string{"can_flush", "can_fua", "can_trim", "can_zero", "can_df", "can_fast_zero", "can_multi_conn"} {
		if info.Exports[0][k] != true {
			t.Errorf("%s = %v, want true", k, info.Exports[0][k])
		}
	}
	if info.Exports[0]["is_read_only"] != false || info.Exports[0]["export-size"] != float64(32<<20) {
		t.Errorf("nbdinfo: %+v", info.Exports[0])
	}
	var m []struct {
		Offset, Length int64
		Type           int
	}
	if err := json.Unmarshal([]byte(mustRun(t, "nbdinfo", "--map", "--json", uri(sock, ""))), &m); err != nil {
		t.Fatal(err)
	}
	exts, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != len(exts) || len(exts) < 5 {
		t.Fatalf("nbdinfo --map %+v\nimage map %+v", m, exts)
	}
	for i, x := range exts {
		typ := 0
		if !x.Data {
			typ |= stateHole
		}
		if x.Zero {
			typ |= stateZero
		}
		if m[i].Offset != x.Offset || m[i].Length != x.Length || m[i].Type != typ {
			t.Errorf("extent %d: nbdinfo %+v, image %+v", i, m[i], x)
		}
	}
}

func TestInteropNbdcopyRoundTripsAWholeImage(t *testing.T) {
	interop(t, "nbdcopy")
	const size = 48 << 20
	src := newImage(t, size)
	content := make([]byte, size)
	for _, r := range [][2]int{{0, 3 << 20}, {7<<20 + 512, 1 << 20}, {30 << 20, 10 << 20}, {size - 4096, 4096}} {
		rand.Read(content[r[0] : r[0]+r[1]])
		if _, err := src.WriteAt(content[r[0]:r[0]+r[1]], int64(r[0])); err != nil {
			t.Fatal(err)
		}
	}
	dst := newImage(t, size)
	dst.WriteAt(bytes.Repeat([]byte{0xee}, 8<<20), 16<<20) // must end up zero
	sock, s := listen(t, &Export{Name: "src", Backend: volume.Plain{Img: src}}, &Export{Name: "dst", Backend: volume.Plain{Img: dst}})
	raw := filepath.Join(t.TempDir(), "disk.raw")
	mustRun(t, "nbdcopy", uri(sock, "src"), raw)
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, content) {
		t.Fatal("nbd -> file: the copy differs from the image")
	}
	mustRun(t, "nbdcopy", raw, uri(sock, "dst"))
	stop(t, s)
	back := make([]byte, size)
	if _, err := dst.ReadAt(back, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, content) {
		t.Fatal("file -> nbd: the image differs from the file")
	}
	checkClean(t, dst)
}

func TestInteropZonedExportObeysTheWritePointer(t *testing.T) {
	interop(t, "qemu-io")
	_, img, dev := newZonedImage(t, 8<<20, 0)
	sock, s := listen(t, &Export{Backend: &volume.Zoned{Img: img, Dev: dev}})
	u := uri(sock, "")
	z2 := int64(2 * testZoneSize)
	qio := func(cmds ...string) string {
		var args []string
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, _ := run(t, "qemu-io", append(append([]string{"-f", "raw"}, args...), u)...)
		return out
	}
	if out := qio("write -P 1 2101248 4096"); !strings.Contains(out, "write failed: Invalid argument") {
		t.Fatalf("write past the write pointer:\n%s", out)
	}
	if z := dev.Report(2, 1)[0]; z.WritePointer != z2 || z.Cond != zoned.Empty {
		t.Fatalf("refused write changed zone 2: %+v", z)
	}
	if out := qio("write -P 1 2M 64k", "write -P 2 2162688 64k", "read -P 2 2162688 64k"); strings.Contains(out, "failed") {
		t.Fatalf("writes at the write pointer:\n%s", out)
	}
	if z := dev.Report(2, 1)[0]; z.WritePointer != z2+128<<10 {
		t.Fatalf("zone 2 after two writes: %+v", z)
	}
	if out := qio("discard 2M 1M"); strings.Contains(out, "failed") {
		t.Fatalf("discard of a whole zone:\n%s", out)
	}
	if z := dev.Report(2, 1)[0]; z.WritePointer != z2 || z.Cond != zoned.Empty {
		t.Fatalf("zone 2 after a whole-zone trim: %+v", z)
	}
	stop(t, s)
	if err := dev.Flush(); err != nil {
		t.Fatal(err)
	}
	checkClean(t, img)
	img.Close()
}
