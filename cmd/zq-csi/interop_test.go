package main

// Interop tier: the zq-csi binary against Debian's qemu-img and qemu-io,
// in both directions, and bad input. These tests build the binary once
// (go build into a temporary directory) and run it as a user would.
//
// They FAIL when qemu-img or qemu-io is missing: `make deps` (or
// .ci/run) installs qemu-utils. `go test -short` skips this tier
// explicitly, for a fast edit-compile loop; `make test` never does.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	buildDir  string
	zqPath    string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// interop marks a test as part of the interop tier: it needs the real
// tools, and fails without them.
func interop(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("interop tier: skipped with -short")
	}
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: the interop tests need Debian's qemu-utils (run `make deps` as root): %v", tool, err)
		}
	}
	t.Parallel()
}

// zqBinary builds cmd/zq-csi once per test process.
func zqBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "zq-csi-interop-")
		if buildErr != nil {
			return
		}
		zqPath = filepath.Join(buildDir, "zq-csi")
		gotool, err := exec.LookPath("go")
		if err != nil {
			buildErr = err
			return
		}
		out, err := exec.Command(gotool, "build", "-buildvcs=false", "-o", zqPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("building zq-csi: %v", buildErr)
	}
	return zqPath
}

type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, tail(r.stdout), tail(r.stderr))
}

// tail keeps the end of long outputs in failure messages.
func tail(s string) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) <= 30 {
		return s
	}
	return fmt.Sprintf("[%d lines cut]\n", len(lines)-30) + strings.Join(lines[len(lines)-30:], "")
}

// runTool runs a command with a deadline and returns its output and exit
// code; it fails the test only if the command cannot be started.
func runTool(t testing.TB, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	r := result{o.String(), e.String(), 0}
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s %q: %v", name, args, err)
		}
		r.code = ee.ExitCode()
	}
	if ctx.Err() != nil {
		t.Fatalf("%s %q timed out", name, args)
	}
	return r
}

func zq(t testing.TB, args ...string) result {
	t.Helper()
	return runTool(t, zqBinary(t), args...)
}

// mustOK fails the test unless the command exited 0.
func mustOK(t testing.TB, what string, r result) result {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("%s: %v", what, r)
	}
	return r
}

func ioArgs(cmds []string) []string {
	var a []string
	for _, c := range cmds {
		a = append(a, "-c", c)
	}
	return a
}

// ---- a model of the disk's bytes ----------------------------------------

type opKind int

const (
	opWrite opKind = iota
	opZero
	opZeroUnmap
	opDiscard
	opCompressed // qemu-io only: write -c of whole clusters
)

type diskOp struct {
	kind    opKind
	off, n  int64
	pattern byte
}

func (o diskOp) command() string {
	switch o.kind {
	case opZero:
		return fmt.Sprintf("write -z %d %d", o.off, o.n)
	case opZeroUnmap:
		return fmt.Sprintf("write -z -u %d %d", o.off, o.n)
	case opDiscard:
		return fmt.Sprintf("discard %d %d", o.off, o.n)
	case opCompressed:
		return fmt.Sprintf("write -c -P %#x %d %d", o.pattern, o.off, o.n)
	}
	return fmt.Sprintf("write -P %#x %d %d", o.pattern, o.off, o.n)
}

// model is the expected content of a virtual disk.
type model []byte

func (m model) apply(ops []diskOp) {
	for _, o := range ops {
		v := o.pattern
		if o.kind == opZero || o.kind == opZeroUnmap || o.kind == opDiscard {
			v = 0
		}
		for i := o.off; i < o.off+o.n; i++ {
			m[i] = v
		}
	}
}

// readCommands returns qemu-io read commands that verify every byte of
// the model: one `read -P` per run of equal bytes.
func (m model) readCommands() []string {
	var cmds []string
	for start := 0; start < len(m); {
		end := start + 1
		for end < len(m) && m[end] == m[start] {
			end++
		}
		cmds = append(cmds, fmt.Sprintf("read -P %#x %d %d", m[start], start, end-start))
		start = end
	}
	return cmds
}

// writePlan is a mix of writes that exercises allocation: patterns at odd
// offsets across cluster boundaries, the last byte, whole clusters,
// partial and whole-cluster zeroing, whole-cluster discards, a rewrite of
// a discarded cluster and many small scattered writes.
func writePlan(cs, size int64) []diskOp {
	ops := []diskOp{
		{opWrite, 0, 1000, 0x11},
		{opWrite, 4097, 70000, 0x22},
		{opWrite, size/2 + 12345, 123, 0x33},
		{opWrite, size - 1, 1, 0x44},
		{opWrite, 3 * cs, 5 * cs, 0x55},
		{opZero, 5000, 3000, 0},
		{opZeroUnmap, 4 * cs, cs, 0},
		{opDiscard, 6 * cs, cs, 0},
		{opWrite, 6*cs + 100, 50, 0x66},
	}
	stride := size/160 + 512
	for i := int64(0); i < 40; i++ {
		ops = append(ops, diskOp{opWrite, 5*size/8 + i*stride + i, 512, byte(0x80 + i)})
	}
	return ops
}

func commands(ops []diskOp) []string {
	var c []string
	for _, o := range ops {
		c = append(c, o.command())
	}
	return c
}

// verifyWith reads the whole model back with a qemu-io-like tool and
// fails on any mismatch.
func verifyWith(t *testing.T, tool string, f string, m model) {
	t.Helper()
	reads := m.readCommands()
	var r result
	args := append([]string{"-r"}, ioArgs(reads)...)
	if tool == "qemu-io" {
		r = runTool(t, "qemu-io", append(append([]string{"-f", "qcow2"}, args...), f)...)
	} else {
		r = zq(t, append(append([]string{"io"}, args...), f)...)
	}
	if r.code != 0 || strings.Contains(r.stdout, "Pattern verification failed") ||
		strings.Count(r.stdout, "\nread ")+boolInt(strings.HasPrefix(r.stdout, "read ")) != len(reads) {
		t.Fatalf("%s read-back of %s failed (commands %q): %v", tool, f, reads, r)
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// qemuImgCheckClean runs qemu-img check and requires exit 0 and no errors.
func qemuImgCheckClean(t *testing.T, f string) {
	t.Helper()
	r := runTool(t, "qemu-img", "check", "-f", "qcow2", f)
	if r.code != 0 || !strings.Contains(r.stdout, "No errors were found on the image.") {
		t.Fatalf("qemu-img check %s: %v", f, r)
	}
	r = runTool(t, "qemu-img", "check", "-f", "qcow2", "--output=json", f)
	var j map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil || r.code != 0 {
		t.Fatalf("qemu-img check --output=json %s: %v (%v)", f, r, err)
	}
	for _, k := range []string{"corruptions", "leaks", "check-errors"} {
		if v, ok := j[k]; ok && v != 0.0 {
			t.Fatalf("qemu-img check %s: %s = %v", f, k, v)
		}
	}
}

// zqCheckClean runs zq-csi image check and requires exit 0 and no errors.
func zqCheckClean(t *testing.T, f string) {
	t.Helper()
	r := zq(t, "image", "check", f)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "No errors were found on the image.\n") {
		t.Fatalf("zq-csi image check %s: %v", f, r)
	}
}

func qemuInfo(t *testing.T, f string) map[string]any {
	t.Helper()
	r := mustOK(t, "qemu-img info", runTool(t, "qemu-img", "info", "-f", "qcow2", "--output=json", f))
	var j map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, r.stdout)
	}
	return j
}

func formatData(j map[string]any) map[string]any {
	fs, _ := j["format-specific"].(map[string]any)
	d, _ := fs["data"].(map[string]any)
	return d
}

// ---- zq-csi creates and writes, qemu reads and checks ---------------------

func TestInteropZqImagesPassQemu(t *testing.T) {
	tests := []struct {
		name string
		opts string
		cs   int64
		size int64
	}{
		{"cluster size 512", "cluster_size=512", 512, 16 << 20},
		{"cluster size 4k", "cluster_size=4k", 4 << 10, 16 << 20},
		{"cluster size 64k (default)", "", 64 << 10, 16 << 20},
		{"cluster size 2M", "cluster_size=2M", 2 << 20, 32 << 20},
		{"refcount bits 1", "refcount_bits=1", 64 << 10, 16 << 20},
		{"refcount bits 16", "refcount_bits=16,cluster_size=4k", 4 << 10, 16 << 20},
		{"refcount bits 64", "refcount_bits=64,cluster_size=4k", 4 << 10, 16 << 20},
		{"refcount bits 1 with 512-byte clusters", "refcount_bits=1,cluster_size=512", 512, 16 << 20},
		{"preallocation metadata", "preallocation=metadata", 64 << 10, 16 << 20},
		{"preallocation metadata with 4k clusters", "preallocation=metadata,cluster_size=4k", 4 << 10, 16 << 20},
		{"lazy refcounts", "lazy_refcounts=on", 64 << 10, 16 << 20},
		{"lazy refcounts with 512-byte clusters", "lazy_refcounts=on,cluster_size=512", 512, 16 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			interop(t)
			f := filepath.Join(t.TempDir(), "zq.qcow2")
			args := []string{"image", "create", "-f", "qcow2"}
			if tt.opts != "" {
				args = append(args, "-o", tt.opts)
			}
			mustOK(t, "zq-csi image create", zq(t, append(args, f, fmt.Sprint(tt.size))...))
			qemuImgCheckClean(t, f)

			m := make(model, tt.size)
			ops := writePlan(tt.cs, tt.size)
			m.apply(ops)
			mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, ioArgs(commands(ops))...), f)...))

			qemuImgCheckClean(t, f)
			verifyWith(t, "qemu-io", f, m)
			zqCheckClean(t, f)

			info := qemuInfo(t, f)
			d := formatData(info)
			if info["virtual-size"] != float64(tt.size) || info["cluster-size"] != float64(tt.cs) || d["compat"] != "1.1" {
				t.Fatalf("qemu-img info: %v", info)
			}
			if want := strings.Contains(tt.opts, "lazy_refcounts=on"); d["lazy-refcounts"] != want {
				t.Fatalf("qemu-img info lazy-refcounts = %v, want %v", d["lazy-refcounts"], want)
			}
			if info["dirty-flag"] != false {
				t.Fatalf("zq-csi left the image dirty: %v", info)
			}
			if m := regexp.MustCompile(`refcount_bits=(\d+)`).FindStringSubmatch(tt.opts); m != nil && fmt.Sprint(d["refcount-bits"]) != m[1] {
				t.Fatalf("qemu-img info refcount-bits = %v, want %s", d["refcount-bits"], m[1])
			}

			// qemu-io writes on top of zq-csi's allocation; both agree.
			more := []diskOp{
				{opWrite, tt.cs - 7, 3 * tt.cs, 0x77},
				{opDiscard, 3 * tt.cs, tt.cs, 0},
				{opWrite, tt.size - 4096, 4096, 0x78},
			}
			m.apply(more)
			mustOK(t, "qemu-io", runTool(t, "qemu-io", append(append([]string{"-f", "qcow2"}, ioArgs(commands(more))...), f)...))
			verifyWith(t, "zq-csi", f, m)
			zqCheckClean(t, f)
		})
	}
}

// ---- qemu creates and writes, zq-csi reads, checks and writes -------------

func TestInteropQemuImagesWorkInZq(t *testing.T) {
	tests := []struct {
		name       string
		opts       string
		cs         int64
		size       int64
		compressed bool // add qemu-io write -c of whole clusters
	}{
		{"cluster size 512", "cluster_size=512", 512, 16 << 20, false},
		{"cluster size 4k", "cluster_size=4k", 4 << 10, 16 << 20, false},
		{"cluster size 64k", "cluster_size=64k", 64 << 10, 16 << 20, false},
		{"cluster size 2M", "cluster_size=2M", 2 << 20, 32 << 20, false},
		{"refcount bits 1", "refcount_bits=1", 64 << 10, 16 << 20, false},
		{"refcount bits 8", "refcount_bits=8,cluster_size=4k", 4 << 10, 16 << 20, false},
		{"refcount bits 64", "refcount_bits=64", 64 << 10, 16 << 20, false},
		{"lazy refcounts", "lazy_refcounts=on", 64 << 10, 16 << 20, false},
		{"extended L2 with 128k clusters", "extended_l2=on,cluster_size=128k", 128 << 10, 16 << 20, false},
		{"zlib compressed clusters", "compression_type=zlib", 64 << 10, 16 << 20, true},
		{"compressed clusters of 4k", "cluster_size=4k", 4 << 10, 16 << 20, true},
		{"preallocation metadata", "preallocation=metadata", 64 << 10, 16 << 20, false},
		{"preallocation metadata with refcount bits 1", "preallocation=metadata,refcount_bits=1,cluster_size=4k", 4 << 10, 16 << 20, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			interop(t)
			f := filepath.Join(t.TempDir(), "qemu.qcow2")
			mustOK(t, "qemu-img create", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", tt.opts, f, fmt.Sprint(tt.size)))

			m := make(model, tt.size)
			ops := writePlan(tt.cs, tt.size)
			// qemu-io writes compressed clusters only where nothing is
			// allocated: in the untouched range from 3/8 of the disk.
			comp := (3 * tt.size / 8) / tt.cs * tt.cs
			if tt.compressed {
				ops = append(ops,
					diskOp{opCompressed, comp, tt.cs, 0x99},
					diskOp{opCompressed, comp + 2*tt.cs, tt.cs, 0x9a},
					diskOp{opCompressed, comp + 3*tt.cs, tt.cs, 0x9b})
			}
			m.apply(ops)
			mustOK(t, "qemu-io", runTool(t, "qemu-io", append(append([]string{"-f", "qcow2"}, ioArgs(commands(ops))...), f)...))
			qemuImgCheckClean(t, f) // the premise: qemu made a good image

			verifyWith(t, "zq-csi", f, m)
			zqCheckClean(t, f)
			compareInfo(t, f)

			// zq-csi writes into qemu's layout: overwrite part of a
			// compressed cluster, cross cluster ends, zero and discard.
			more := []diskOp{
				{opWrite, comp + 33, 100, 0xe1},
				{opWrite, 2*tt.cs - 5, 10, 0xe2},
				{opZero, comp + 2*tt.cs + 1, 700, 0},
				{opWrite, comp + 4*tt.cs - 1, 2, 0xe4},
				{opDiscard, 4 * tt.cs, tt.cs, 0},
				{opWrite, tt.size - 3, 3, 0xe3},
			}
			m.apply(more)
			mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, ioArgs(commands(more))...), f)...))
			qemuImgCheckClean(t, f)
			verifyWith(t, "qemu-io", f, m)
			zqCheckClean(t, f)
		})
	}
}

// compareInfo requires zq-csi image info --output=json to agree with
// qemu-img's on the keys both have.
func compareInfo(t *testing.T, f string) {
	t.Helper()
	q := qemuInfo(t, f)
	r := mustOK(t, "zq-csi image info", zq(t, "image", "info", "--output=json", f))
	var z map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &z); err != nil {
		t.Fatalf("zq-csi image info --output=json: %v\n%s", err, r.stdout)
	}
	for _, k := range []string{"virtual-size", "cluster-size", "format", "filename", "dirty-flag"} {
		if fmt.Sprint(q[k]) != fmt.Sprint(z[k]) {
			t.Errorf("info %s: qemu-img %v, zq-csi %v", k, q[k], z[k])
		}
	}
	qd, zd := formatData(q), formatData(z)
	for _, k := range []string{"compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"} {
		if fmt.Sprint(qd[k]) != fmt.Sprint(zd[k]) {
			t.Errorf("info format-specific.data.%s: qemu-img %v, zq-csi %v", k, qd[k], zd[k])
		}
	}
}

func TestInteropQemuConvertCompressed(t *testing.T) {
	interop(t)
	dir := t.TempDir()
	const size, cs = 8 << 20, 64 << 10
	m := make(model, size)
	m.apply(writePlan(cs, size))
	raw := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(raw, m, 0o644); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(dir, "compressed.qcow2")
	mustOK(t, "qemu-img convert -c", runTool(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, f))
	if st, _ := os.Stat(f); st.Size() > size/4 {
		t.Fatalf("qemu-img convert -c made a %d-byte file: not compressed?", st.Size())
	}
	verifyWith(t, "zq-csi", f, m)
	zqCheckClean(t, f)

	more := []diskOp{{opWrite, 4097 + 10, 20, 0xc1}, {opZero, 3*cs + 5, 10, 0}}
	m.apply(more)
	mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, ioArgs(commands(more))...), f)...))
	qemuImgCheckClean(t, f)
	verifyWith(t, "qemu-io", f, m)
}

// dirtyLazyImage makes an image with lazy refcounts whose qemu-io was
// killed after writing: dirty bit set, refcounts behind.
func dirtyLazyImage(t *testing.T) (string, model) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "dirty.qcow2")
	mustOK(t, "qemu-img create", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", f, "4M"))
	m := make(model, 4<<20)
	ops := []diskOp{{opWrite, 0, 256 << 10, 0x11}, {opWrite, 1 << 20, 64 << 10, 0x22}, {opWrite, 3<<20 + 7, 1000, 0x23}}
	m.apply(ops)
	r := runTool(t, "qemu-io", append(append([]string{"-f", "qcow2"}, ioArgs(append(commands(ops), "sigraise 9"))...), f)...)
	if r.code != -1 && r.code != 137 {
		t.Fatalf("qemu-io with sigraise 9: want it killed, got %v", r)
	}
	if info := qemuInfo(t, f); info["dirty-flag"] != true {
		t.Fatalf("premise: the image is not dirty: %v", info)
	}
	if r := runTool(t, "qemu-img", "check", "-f", "qcow2", f); r.code == 0 {
		t.Fatalf("premise: qemu-img check finds a killed lazy-refcount image clean: %v", r)
	}
	return f, m
}

func TestInteropDirtyLazyRefcountsRepairedOnOpen(t *testing.T) {
	interop(t)
	f, m := dirtyLazyImage(t)
	// A read-write session repairs the refcounts when it opens the image.
	reads := m.readCommands()
	mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, ioArgs(reads)...), f)...))
	qemuImgCheckClean(t, f)
	if info := qemuInfo(t, f); info["dirty-flag"] != false {
		t.Fatalf("still dirty after a zq-csi session: %v", info)
	}
	verifyWith(t, "qemu-io", f, m)
	zqCheckClean(t, f)
}

func TestInteropDirtyLazyRefcountsCheckRepair(t *testing.T) {
	interop(t)
	f, m := dirtyLazyImage(t)
	r := zq(t, "image", "check", "--repair", f)
	if r.code != 0 {
		t.Fatalf("zq-csi image check --repair: %v", r)
	}
	qemuImgCheckClean(t, f)
	verifyWith(t, "qemu-io", f, m)
}

// TestInteropLeaksFoundAndRepaired: an image with a leaked cluster (a
// refcount with no reference, made by raising a refcount by hand) gives
// exit 3 from both checkers, and zq-csi's repair fixes it.
func TestInteropLeaksFoundAndRepaired(t *testing.T) {
	interop(t)
	f := filepath.Join(t.TempDir(), "leak.qcow2")
	mustOK(t, "qemu-img create", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", f, "1M"))
	mustOK(t, "qemu-io", runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", f))
	// Grow the file by one cluster and give that cluster refcount 1.
	hdr := readHeader(t, f)
	cs := int64(1) << hdr.u32(20)
	st, _ := os.Stat(f)
	leaked := st.Size() / cs
	if err := os.Truncate(f, (leaked+1)*cs); err != nil {
		t.Fatal(err)
	}
	refblock := readU64At(t, f, int64(hdr.u64(48))) // first refcount table entry
	writeAt(t, f, int64(refblock)+2*leaked, []byte{0, 1})

	if r := runTool(t, "qemu-img", "check", "-f", "qcow2", f); r.code != 3 {
		t.Fatalf("premise: qemu-img check exit %d, want 3 (leaks): %v", r.code, r)
	}
	r := zq(t, "image", "check", f)
	if r.code != exitCheckLeaks || !strings.Contains(r.stdout, "1 leaked clusters were found on the image.") {
		t.Fatalf("zq-csi image check: %v", r)
	}
	r = zq(t, "image", "check", "--output=json", f)
	var j map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &j); err != nil || r.code != exitCheckLeaks || j["leaks"] != 1.0 {
		t.Fatalf("zq-csi image check --output=json: %v", r)
	}
	r = zq(t, "image", "check", "--repair", f)
	if r.code != 0 || !strings.Contains(r.stdout, "    1 leaked clusters\n") ||
		!strings.Contains(r.stdout, "Double checking the fixed image now...\nNo errors were found on the image.\n") {
		t.Fatalf("zq-csi image check --repair: %v", r)
	}
	qemuImgCheckClean(t, f)
}

// ---- bad input ------------------------------------------------------------

type header []byte

type badMode int

const (
	badHeader badMode = iota
	badForWrite
	badData
)

func (h header) u32(off int) uint32 { return binary.BigEndian.Uint32(h[off:]) }
func (h header) u64(off int) uint64 { return binary.BigEndian.Uint64(h[off:]) }

func readHeader(t *testing.T, f string) header {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil || len(b) < 112 {
		t.Fatalf("reading the header of %s: %v", f, err)
	}
	return header(b[:112])
}

func readU64At(t *testing.T, f string, off int64) uint64 {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil || int64(len(b)) < off+8 {
		t.Fatalf("reading %s at %d: %v", f, off, err)
	}
	return binary.BigEndian.Uint64(b[off:])
}

func writeAt(t *testing.T, f string, off int64, p []byte) {
	t.Helper()
	fh, err := os.OpenFile(f, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func putU32(t *testing.T, f string, off int64, v uint32) {
	t.Helper()
	writeAt(t, f, off, binary.BigEndian.AppendUint32(nil, v))
}

func putU64(t *testing.T, f string, off int64, v uint64) {
	t.Helper()
	writeAt(t, f, off, binary.BigEndian.AppendUint64(nil, v))
}

func fileHash(t *testing.T, f string) string {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestInteropBadInputRefusedAndUnchanged(t *testing.T) {
	// Header field offsets (qcow2 spec).
	const (
		offMagic, offVersion, offClusterBits, offSize = 0, 4, 20, 24
		offCrypt, offL1Size, offL1Offset              = 32, 36, 40
		offRefOffset, offRefClusters                  = 48, 56
		offIncompat, offRefOrder, offHeaderLen        = 72, 96, 100
		offCompressionType                            = 104
	)
	tests := []struct {
		name   string
		mutate func(t *testing.T, f string)
		cause  string // regexp the error must match
		// mode says what must be refused: badHeader, every open;
		// badForWrite, read-write opens only (qemu allows read-only ones);
		// badData, the I/O touching the bad metadata (the open succeeds),
		// and a check reports a corruption.
		mode badMode
	}{
		{"empty file", func(t *testing.T, f string) { os.Truncate(f, 0) }, `too short for a qcow2 header`, badHeader},
		{"truncated header", func(t *testing.T, f string) { os.Truncate(f, 50) }, `too short for a qcow2 header`, badHeader},
		{"truncated tables", func(t *testing.T, f string) { os.Truncate(f, 0x28000) }, `(?i)(past|beyond) the end of the file|file ends`, badHeader},
		{"wrong magic", func(t *testing.T, f string) { writeAt(t, f, offMagic, []byte("QEMU")) }, `not a qcow2 image: magic`, badHeader},
		{"version 4", func(t *testing.T, f string) { putU32(t, f, offVersion, 4) }, `version 4`, badHeader},
		{"version 2", func(t *testing.T, f string) { putU32(t, f, offVersion, 2) }, `version 2`, badHeader},
		{"cluster_bits too small", func(t *testing.T, f string) { putU32(t, f, offClusterBits, 8) }, `cluster_bits 8`, badHeader},
		{"cluster_bits absurd", func(t *testing.T, f string) { putU32(t, f, offClusterBits, 63) }, `cluster_bits 63`, badHeader},
		{"virtual size absurd", func(t *testing.T, f string) { putU64(t, f, offSize, 1<<62) }, `(?i)size`, badHeader},
		{"virtual size not a multiple of 512", func(t *testing.T, f string) { putU64(t, f, offSize, 1<<20+1) }, `(?i)size`, badHeader},
		{"l1_size absurd", func(t *testing.T, f string) { putU32(t, f, offL1Size, 0xffffffff) }, `l1_size`, badHeader},
		{"L1 offset absurd", func(t *testing.T, f string) { putU64(t, f, offL1Offset, 0x7fffffffffff0000) }, `(?i)l1`, badHeader},
		{"L1 offset unaligned", func(t *testing.T, f string) { putU64(t, f, offL1Offset, 0x30200) }, `(?i)l1.*align`, badHeader},
		{"refcount table offset absurd", func(t *testing.T, f string) { putU64(t, f, offRefOffset, 1<<50) }, `(?i)refcount table`, badHeader},
		{"refcount_table_clusters 0", func(t *testing.T, f string) { putU32(t, f, offRefClusters, 0) }, `refcount_table_clusters`, badHeader},
		{"refcount_order 7", func(t *testing.T, f string) { putU32(t, f, offRefOrder, 7) }, `refcount_order 7`, badHeader},
		{"header_length too small", func(t *testing.T, f string) { putU32(t, f, offHeaderLen, 50) }, `header_length 50`, badHeader},
		{"unknown incompatible bit", func(t *testing.T, f string) { putU64(t, f, offIncompat, 1<<40) }, `(?i)unsupported qcow2 feature.*40|incompatible.*40`, badHeader},
		{"external data file bit", func(t *testing.T, f string) { putU64(t, f, offIncompat, 1<<2) }, `external data file`, badHeader},
		{"encryption", func(t *testing.T, f string) { putU32(t, f, offCrypt, 1) }, `(?i)encrypt`, badHeader},
		{"compression type zstd", func(t *testing.T, f string) {
			putU64(t, f, offIncompat, 1<<3)
			writeAt(t, f, offCompressionType, []byte{1})
		}, `(?i)compression type`, badHeader},
		{"raw backing file", func(t *testing.T, f string) {
			base := f + ".base"
			mustOK(t, "qemu-img create", runTool(t, "qemu-img", "create", "-q", "-f", "raw", base, "1M"))
			os.Remove(f)
			mustOK(t, "qemu-img create -b", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", f))
		}, `format "raw": only qcow2 backing files are supported`, badHeader},
		{"missing backing file", func(t *testing.T, f string) {
			os.Remove(f)
			mustOK(t, "qemu-img create -u -b", runTool(t, "qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", f, "1M"))
		}, `backing file: open .*gone.qcow2: no such file`, badHeader},
		{"corrupt bit", func(t *testing.T, f string) { putU64(t, f, offIncompat, 1<<1) }, `(?i)corrupt`, badForWrite},
		{"internal snapshot", func(t *testing.T, f string) {
			mustOK(t, "qemu-img snapshot", runTool(t, "qemu-img", "snapshot", "-c", "snap1", f))
		}, `(?i)snapshot`, badForWrite},
		{"L2 entry pointing at an unaligned cluster", func(t *testing.T, f string) {
			h := readHeader(t, f)
			l2 := readU64At(t, f, int64(h.u64(offL1Offset))) & 0x00fffffffffffe00
			putU64(t, f, int64(l2), 1<<63|0x50200)
		}, `(?i)align`, badData},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			interop(t)
			f := filepath.Join(t.TempDir(), "bad.qcow2")
			mustOK(t, "qemu-img create", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", f, "1M"))
			mustOK(t, "qemu-io", runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", f))
			tt.mutate(t, f)
			before := fileHash(t, f)
			cause := regexp.MustCompile(tt.cause)

			type attempt struct {
				args []string
				code int // wanted exit code, -1: any failure
			}
			attempts := []attempt{
				{[]string{"io", "-c", "read 0 512"}, exitFailure},
				{[]string{"io", "-c", "write -P 1 0 512"}, exitFailure},
				{[]string{"io", "-c", "write -z 0 64k", "-c", "discard 0 64k", "-c", "flush"}, exitFailure},
			}
			switch tt.mode {
			case badHeader:
				attempts = append(attempts,
					attempt{[]string{"image", "check", "--repair"}, exitCheckError},
					attempt{[]string{"io", "-r", "-c", "read 0 512"}, exitFailure},
					attempt{[]string{"image", "info"}, exitFailure},
					attempt{[]string{"image", "check"}, exitCheckError})
			case badForWrite:
				attempts = append(attempts,
					attempt{[]string{"image", "check", "--repair"}, exitCheckError})
			case badData:
				attempts = append(attempts,
					attempt{[]string{"io", "-r", "-c", "read 0 512"}, exitFailure},
					attempt{[]string{"image", "check"}, exitCheckCorrupt})
			}
			for _, a := range attempts {
				r := zq(t, append(a.args, f)...)
				if r.code == 0 || (a.code >= 0 && r.code != a.code) {
					t.Errorf("zq-csi %q: want exit %d, got %v", a.args, a.code, r)
					continue
				}
				msg := r.stderr + r.stdout
				// A check that ran reports its findings on stdout; anything
				// else is an error on stderr.
				reported := strings.Contains(r.stderr, "zq-csi: ") || a.code == exitCheckCorrupt
				if !reported || !cause.MatchString(msg) {
					t.Errorf("zq-csi %q: want a \"zq-csi: \" error matching %q, got %v", a.args, tt.cause, r)
				}
			}
			if after := fileHash(t, f); after != before {
				t.Fatalf("the file changed: sha256 %s before, %s after", before, after)
			}
		})
	}
}

// TestInteropEmptiedL2Table: discarding every cluster an L2 table maps
// leaves the table allocated and referenced from the L1 table (qemu keeps
// it); both checkers must find the image clean, whoever discarded.
func TestInteropEmptiedL2Table(t *testing.T) {
	for _, writer := range []string{"zq-csi", "qemu-io"} {
		t.Run("discard by "+writer, func(t *testing.T) {
			interop(t)
			f := filepath.Join(t.TempDir(), "d.qcow2")
			mustOK(t, "qemu-img create", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", f, "16M"))
			cmds := ioArgs([]string{"write -P 0xab 0 4k", "write -P 0xac 8M 64k", "discard 0 64k", "discard 8M 64k"})
			if writer == "zq-csi" {
				mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, cmds...), f)...))
			} else {
				mustOK(t, "qemu-io", runTool(t, "qemu-io", append(append([]string{"-f", "qcow2"}, cmds...), f)...))
			}
			qemuImgCheckClean(t, f)
			zqCheckClean(t, f)
			verifyWith(t, "zq-csi", f, make(model, 16<<20))
		})
	}
}

// ---- backing chains ------------------------------------------------------

// TestInteropBackingChains: an overlay zq-csi makes over its own image
// passes qemu-img check and reads the same in qemu-io, including what the
// overlay discarded over the backing file's data; and an overlay qemu-img
// makes over zq-csi's image works in zq-csi.
func TestInteropBackingChains(t *testing.T) {
	interop(t)
	const cs, size = 64 << 10, 16 << 20
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	mustOK(t, "zq-csi image create", zq(t, "image", "create", "-q", base, fmt.Sprint(size)))
	m := make(model, size)
	ops := writePlan(cs, size)
	m.apply(ops)
	mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, ioArgs(commands(ops))...), base)...))

	for _, maker := range []string{"zq-csi", "qemu-img"} {
		t.Run("overlay by "+maker, func(t *testing.T) {
			top := filepath.Join(dir, maker+".qcow2")
			if maker == "zq-csi" {
				mustOK(t, "zq-csi image create -b", zq(t, "image", "create", "-q", "-b", "base.qcow2", "-F", "qcow2", top))
			} else {
				mustOK(t, "qemu-img create -b", runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top))
			}
			mt := append(model(nil), m...)
			more := []diskOp{
				{opWrite, cs - 7, 3 * cs, 0x55},    // partial clusters over backing data
				{opDiscard, 8 * cs, 4 * cs, 0},     // backing data must not show through
				{opWrite, size - 4096, 4096, 0x56}, // over a hole of the backing file
			}
			mt.apply(more)
			other := map[string]string{"zq-csi": "qemu-io", "qemu-img": "zq-csi"}[maker]
			writer := map[string]string{"zq-csi": "zq-csi", "qemu-img": "qemu-io"}[maker]
			if writer == "zq-csi" {
				mustOK(t, "zq-csi io", zq(t, append(append([]string{"io"}, ioArgs(commands(more))...), top)...))
			} else {
				mustOK(t, "qemu-io", runTool(t, "qemu-io", append(append([]string{"-f", "qcow2"}, ioArgs(commands(more))...), top)...))
			}
			qemuImgCheckClean(t, top)
			zqCheckClean(t, top)
			verifyWith(t, other, top, mt)
			verifyWith(t, writer, top, mt)
			verifyWith(t, "qemu-io", base, m) // the backing file is as it was
			if info := qemuInfo(t, top); info["backing-filename"] != "base.qcow2" || info["backing-filename-format"] != "qcow2" {
				t.Fatalf("qemu-img info: %v", info)
			}
		})
	}
}

// TestInteropConvert: a zoned image converted to qcow2 keeps its zone
// report and data; to raw, it is the bytes qemu-img reads out of the
// plain version; raw back to zoned qcow2 writes each zone up to its last
// data; qemu-img compare agrees on the plain conversions.
func TestInteropConvert(t *testing.T) {
	interop(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "zoned.qcow2")
	mustOK(t, "create", zq(t, "image", "create", "-q", "-o", "zone.mode=host-managed,zone.size=4M,zone.conventional_zones=1", src, "32M"))
	mustOK(t, "io", zq(t, "io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 4M 1M", "-c", "zap -p 8M -P 0x33 6144", "-c", "zf 12M 4M", src))
	report := func(f string) string { return mustOK(t, "zrp", zq(t, "io", "-r", "-c", "zrp 0 8", f)).stdout }
	want := report(src)

	copyQ := filepath.Join(dir, "copy.qcow2")
	out := mustOK(t, "convert -p", zq(t, "image", "convert", "-p", src, copyQ)).stdout
	if !strings.Contains(out, "(100.00/100%)") {
		t.Fatalf("no progress: %q", out)
	}
	if got := report(copyQ); got != want {
		t.Fatalf("zone report after convert:\n%s\nwant\n%s", got, want)
	}
	raw := filepath.Join(dir, "copy.raw")
	mustOK(t, "convert -O raw", zq(t, "image", "convert", "-q", "-O", "raw", copyQ, raw))
	for _, c := range []string{"read -P 0x11 0 64k", "read -P 0x22 4M 1M", "read -P 0x33 8M 6144", "read -P 0 12M 4M"} {
		mustOK(t, c, runTool(t, "qemu-io", "-f", "raw", "-r", "-c", c, raw))
	}
	back := filepath.Join(dir, "back.qcow2")
	mustOK(t, "convert raw to zoned", zq(t, "image", "convert", "-q", "-f", "raw", "-o", "zone.mode=host-managed,zone.size=4M,zone.conventional_zones=1", raw, back))
	// The finished zone held no data: from raw it comes back empty.
	if got := report(back); !strings.Contains(got, "start: 0x2000, len 0x2000, cap 0x2000, wptr 0x2800,") || !strings.Contains(got, "start: 0x4000, len 0x2000, cap 0x2000, wptr 0x400c,") {
		t.Fatalf("zone report from raw:\n%s", got)
	}
	plain := filepath.Join(dir, "plain.qcow2")
	mustOK(t, "convert raw to plain qcow2", zq(t, "image", "convert", "-q", "-f", "raw", raw, plain))
	mustOK(t, "qemu-img compare", runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, plain))
	qemuImgCheckClean(t, plain)
	before := report(copyQ)
	if r := zq(t, "image", "convert", "-q", src, copyQ); r.code == 0 || !strings.Contains(r.stderr, "exists") {
		t.Fatalf("convert over an existing file: exit %d, %q", r.code, r.stderr)
	}
	if report(copyQ) != before {
		t.Fatal("a refused convert changed the existing destination")
	}
}

// ---- commit and rebase ---------------------------------------------------

// chainOfThree makes base <- mid <- top in dir, by zq-csi, each image with
// writes of its own over the one below, and returns what top reads as.
func chainOfThree(t *testing.T, dir string) model {
	const cs, size = 64 << 10, 16 << 20
	m := make(model, size)
	layers := []struct {
		name, backing string
		ops           []diskOp
	}{
		{"base.qcow2", "", writePlan(cs, size)},
		{"mid.qcow2", "base.qcow2", []diskOp{{opWrite, cs - 7, 3 * cs, 0x55}, {opDiscard, 8 * cs, 4 * cs, 0}, {opWrite, size - 4096, 4096, 0x56}}},
		{"top.qcow2", "mid.qcow2", []diskOp{{opWrite, 2*cs + 1, 100, 0x57}, {opZeroUnmap, 3 * cs, 2 * cs, 0}, {opWrite, size/2 - 3, 2 * cs, 0x58}}},
	}
	for _, l := range layers {
		f := filepath.Join(dir, l.name)
		if l.backing == "" {
			mustOK(t, "create", zq(t, "image", "create", "-q", f, fmt.Sprint(size)))
		} else {
			mustOK(t, "create -b", zq(t, "image", "create", "-q", "-b", l.backing, "-F", "qcow2", f))
		}
		mustOK(t, "io", zq(t, append(append([]string{"io"}, ioArgs(commands(l.ops))...), f)...))
		m.apply(l.ops)
	}
	return m
}

// copyDir copies the regular files of src into a new directory.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	mustOK(t, "cp", runTool(t, "sh", "-c", `cp -p "$0"/* "$1"/`, src, dst))
	return dst
}

// TestInteropCommitAndRebaseAgreeWithQemuImg: on copies of one plain
// chain, zq-csi's commit and rebase leave images that qemu-img compare
// finds identical to what qemu-img's own commit and rebase leave, that
// pass qemu-img check and that qemu-io reads as the overlay read before.
func TestInteropCommitAndRebaseAgreeWithQemuImg(t *testing.T) {
	interop(t)
	orig := t.TempDir()
	m := chainOfThree(t, orig)
	compare := func(t *testing.T, a, b string) {
		t.Helper()
		mustOK(t, "qemu-img compare", runTool(t, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b))
	}
	t.Run("commit", func(t *testing.T) {
		zd, qd := copyDir(t, orig), copyDir(t, orig)
		out := mustOK(t, "commit -p", zq(t, "image", "commit", "-p", filepath.Join(zd, "top.qcow2"))).stdout
		if !strings.Contains(out, "(100.00/100%)") || !strings.Contains(out, "Image committed.") {
			t.Fatalf("commit output %q", out)
		}
		mustOK(t, "qemu-img commit", runTool(t, "qemu-img", "commit", "-q", "-f", "qcow2", filepath.Join(qd, "top.qcow2")))
		compare(t, filepath.Join(zd, "mid.qcow2"), filepath.Join(qd, "mid.qcow2"))
		compare(t, filepath.Join(zd, "top.qcow2"), filepath.Join(qd, "top.qcow2"))
		for _, f := range []string{"mid.qcow2", "top.qcow2"} {
			qemuImgCheckClean(t, filepath.Join(zd, f))
			verifyWith(t, "qemu-io", filepath.Join(zd, f), m)
		}
		if got := qemuInfo(t, filepath.Join(zd, "top.qcow2"))["actual-size"].(float64); got > 1<<20 {
			t.Errorf("the emptied overlay takes %v bytes", got)
		}
	})
	for _, onto := range []string{"base.qcow2", ""} {
		t.Run("rebase onto "+map[bool]string{true: "nothing", false: onto}[onto == ""], func(t *testing.T) {
			zd, qd := copyDir(t, orig), copyDir(t, orig)
			mustOK(t, "rebase", zq(t, "image", "rebase", "-p", "-b", onto, filepath.Join(zd, "top.qcow2")))
			mustOK(t, "qemu-img rebase", runTool(t, "qemu-img", "rebase", "-f", "qcow2", "-b", onto, "-F", "qcow2", filepath.Join(qd, "top.qcow2")))
			zt := filepath.Join(zd, "top.qcow2")
			compare(t, zt, filepath.Join(qd, "top.qcow2"))
			qemuImgCheckClean(t, zt)
			verifyWith(t, "qemu-io", zt, m)
			if info := qemuInfo(t, zt); fmt.Sprint(info["backing-filename"]) != map[bool]string{true: "<nil>", false: onto}[onto == ""] {
				t.Fatalf("qemu-img info after the rebase: %v", info)
			}
		})
	}
	// An overlay qemu-img made has its own header layout (extension order,
	// feature name table): the rebase must rewrite it whole, not only the
	// first sector.
	for _, maker := range []string{"zq-csi", "qemu-img"} {
		t.Run("unsafe rebase after a move, overlay by "+maker, func(t *testing.T) {
			zd := copyDir(t, orig)
			zt := filepath.Join(zd, "top.qcow2")
			if maker == "qemu-img" {
				mustOK(t, "qemu-img rebase -u", runTool(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", zt))
			}
			long := "golden-" + strings.Repeat("g", 200) + ".qcow2" // its place moves past the header's first sector
			if err := os.Rename(filepath.Join(zd, "mid.qcow2"), filepath.Join(zd, long)); err != nil {
				t.Fatal(err)
			}
			mustOK(t, "rebase -u", zq(t, "image", "rebase", "-u", "-b", long, zt))
			qemuImgCheckClean(t, zt)
			zqCheckClean(t, zt)
			verifyWith(t, "qemu-io", zt, m)
			if info := qemuInfo(t, zt); info["backing-filename"] != long {
				t.Fatalf("qemu-img info after the rebase: %v", info)
			}
		})
	}
}

// TestInteropCommitOfAZonedOverlay: the backing file of a zoned overlay
// takes its zone report with the commit; the emptied overlay keeps it.
func TestInteropCommitOfAZonedOverlay(t *testing.T) {
	interop(t)
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	mustOK(t, "create", zq(t, "image", "create", "-q", "-o", "zone.mode=host-managed,zone.size=4M,zone.conventional_zones=1", base, "32M"))
	mustOK(t, "io", zq(t, "io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 4M 1M", "-c", "write -P 0x23 8M 4M", base))
	mustOK(t, "create -b", zq(t, "image", "create", "-q", "-b", "base.qcow2", top))
	mustOK(t, "io", zq(t, "io", "-c", "zrs 4M 4M", "-c", "write -P 0x33 4M 8k", "-c", "zf 8M 4M", "-c", "write -P 0x44 12M 128k", top))
	report := func(f string) string { return mustOK(t, "zrp", zq(t, "io", "-r", "-c", "zrp 0 8", f)).stdout }
	want := report(top)
	if want == report(base) {
		t.Fatal("the overlay's zones are the backing file's already: the test tests nothing")
	}
	mustOK(t, "commit", zq(t, "image", "commit", "-q", top))
	for _, f := range []string{base, top} {
		if got := report(f); got != want {
			t.Errorf("%s zone report after the commit:\n%s\nwant the overlay's\n%s", f, got, want)
		}
		zqCheckClean(t, f)
	}
	mustOK(t, "read", zq(t, "io", "-r", "-c", "read -P 0x33 4M 8k", "-c", "read -P 0 4202496 64k", "-c", "read -P 0x44 12M 128k", base))
}
