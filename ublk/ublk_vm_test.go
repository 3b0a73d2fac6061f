//go:build vmtest

// Kernel tests: they need the ublk_drv module of the VM harness kernel and
// run only there, through
//
//	test/e2e/vm-go-test.sh ./ublk/
//
// The vmtest build tag keeps them out of plain `go test ./...` on the
// host; run any other way they fail.
package ublk_test

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/test/e2e/vmtest"
	"github.com/zq-csi/zq-csi/ublk"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

func TestMain(m *testing.M) { vmtest.Main(m, "./ublk/") }

// The geometry of the issue: 2 conventional and 14 sequential 64 MiB
// zones, max open 6, max active 8, max append 256 KiB.
var issueGeometry = zoned.Geometry{
	ZoneSize: 64 << 20, ZoneCapacity: 64 << 20, ConventionalZones: 2, MaxOpenZones: 6, MaxActiveZones: 8, MaxAppendBytes: 256 << 10,
}

func createZoned(t *testing.T, size int64, g zoned.Geometry) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "zoned.qcow2")
	if _, err := volume.CreateZoned(path, image.CreateOptions{Size: size}, g); err != nil {
		t.Fatal(err)
	}
	return path
}

// served is an image served in this process through a ublk device.
type served struct {
	vol  *volume.Volume
	zd   *zoned.Device
	ctrl *ublk.Control
	dev  *ublk.Device
}

func serve(t *testing.T, path string, opts ublk.Options) *served {
	t.Helper()
	v, err := volume.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s := &served{vol: v}
	if z, ok := v.Backend.(*volume.Zoned); ok {
		s.zd = z.Dev // the zone model's own view, to check the kernel's against
	}
	if s.ctrl, err = ublk.OpenControl(); err != nil {
		t.Fatal(err)
	}
	if s.dev, err = ublk.Create(s.ctrl, v.Backend, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop(t) })
	return s
}

// stop removes the device and closes the image (once).
func (s *served) stop(t *testing.T) {
	t.Helper()
	if s.dev == nil {
		return
	}
	if err := s.dev.Stop(); err != nil {
		t.Errorf("stop %s: %v", s.dev.Path(), err)
	}
	if err := s.dev.Close(); err != nil {
		t.Errorf("close %s: %v", s.dev.Path(), err)
	}
	s.ctrl.Close()
	if err := s.vol.Close(); err != nil {
		t.Errorf("close image: %v", err)
	}
	s.dev = nil
}

func sysfs(t *testing.T, dev, attr string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue", attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// zoneLine is one zone as both blkzone and `zq-csi io -c zrp` print it,
// normalized: sectors, write pointer relative to the zone start.
type zoneLine struct{ start, length, capacity, wp, cond, typ uint64 }

var (
	blkzoneRE = regexp.MustCompile(`start: (0x[0-9a-f]+), len (0x[0-9a-f]+), cap (0x[0-9a-f]+), wptr (0x[0-9a-f]+) .*zcond: *(\d+)\(\w+\) \[type: (\d+)`)
	zrpRE     = regexp.MustCompile(`start: (0x[0-9a-f]+), len (0x[0-9a-f]+), cap (0x[0-9a-f]+), wptr (0x[0-9a-f]+), zcond:(\d+), \[type: (\d+)\]`)
)

func parseZones(t *testing.T, out string, re *regexp.Regexp, absoluteWP bool) []zoneLine {
	t.Helper()
	var zs []zoneLine
	for _, m := range re.FindAllStringSubmatch(out, -1) {
		var v [6]uint64
		for i := range v {
			n, err := strconv.ParseUint(m[i+1], 0, 64)
			if err != nil {
				t.Fatalf("parsing %q: %v", m[0], err)
			}
			v[i] = n
		}
		z := zoneLine{v[0], v[1], v[2], v[3], v[4], v[5]}
		if absoluteWP {
			z.wp -= z.start
		}
		zs = append(zs, z)
	}
	if len(zs) == 0 {
		t.Fatalf("no zones in:\n%s", out)
	}
	return zs
}

func blkzoneReport(t *testing.T, dev string) []zoneLine {
	return parseZones(t, vmtest.Run(t, "blkzone", "report", dev), blkzoneRE, false)
}

// TestKernelZonedDevice: the issue's geometry attaches as a host-managed
// device with its limits in sysfs; blkzone's report is the image's, and
// blkzone open/close/finish/reset change the image's zones.
func TestKernelZonedDevice(t *testing.T) {
	path := createZoned(t, 1<<30, issueGeometry)
	s := serve(t, path, ublk.Options{})
	dev := s.dev.Path()
	for attr, want := range map[string]string{
		"zoned": "host-managed", "nr_zones": "16", "max_open_zones": "6", "max_active_zones": "8",
		"chunk_sectors": "131072", "zone_append_max_bytes": "262144", "logical_block_size": "512",
		"write_cache": "write back", "fua": "1",
	} {
		if got := sysfs(t, dev, attr); got != want {
			t.Errorf("sysfs %s = %q, want %q", attr, got, want)
		}
	}

	// Data into zones 2 and 3 (the first sequential ones), then zone
	// management from the command line.
	f := vmtest.OpenDirect(t, dev)
	defer f.Close()
	buf := vmtest.AlignedBuf(t, 1<<20)
	for _, at := range []int64{2 << 26, 3 << 26, 3<<26 + 1<<20} {
		if err := vmtest.DirectWrite(f, vmtest.Pattern(1<<20, byte(at>>20)), at, buf); err != nil {
			t.Fatalf("write at %#x: %v", at, err)
		}
	}
	sect := func(zone int) string { return fmt.Sprintf("%#x", zone*131072) }
	vmtest.Run(t, "blkzone", "open", "-o", sect(4), "-c", "1", dev)
	vmtest.Run(t, "blkzone", "finish", "-o", sect(5), "-c", "1", dev)
	vmtest.Run(t, "blkzone", "open", "-o", sect(6), "-c", "1", dev)
	vmtest.Run(t, "blkzone", "close", "-o", sect(6), "-c", "1", dev)
	vmtest.Run(t, "blkzone", "reset", "-o", sect(2), "-c", "1", dev)
	// Every open zone, so that the report is what the image keeps.
	vmtest.Run(t, "blkzone", "close", "-o", sect(2), dev)

	live := blkzoneReport(t, dev)
	want := []struct {
		zone     int
		wp, cond uint64
	}{
		{2, 0, 1},               // reset: empty
		{3, 2 << 20 >> 9, 4},    // written, closed
		{4, 0, 1},               // opened, closed unwritten: empty
		{5, 64 << 20 >> 9, 0xe}, // finished: full
		{6, 0, 1},
	}
	for _, w := range want {
		if z := live[w.zone]; z.wp != w.wp || z.cond != w.cond {
			t.Errorf("zone %d: wp %#x cond %d, want wp %#x cond %d", w.zone, z.wp, z.cond, w.wp, w.cond)
		}
	}
	if got := vmtest.DirectRead(t, f, 3<<26, 1<<20); !bytes.Equal(got, vmtest.Pattern(1<<20, byte((3<<26)>>20))) {
		t.Error("zone 3 data read back differs")
	}
	f.Close()
	s.stop(t)

	zrp := vmtest.Run(t, zqCSI(t), "io", "-r", "-c", "zrp 0 16", path)
	if persisted := parseZones(t, zrp, zrpRE, true); fmt.Sprint(persisted) != fmt.Sprint(live) {
		t.Errorf("blkzone report while attached:\n%v\nzq-csi io zrp of the image after detach:\n%v", live, persisted)
	}
}

// TestKernelWriteOffWritePointer: a write not at the write pointer fails
// with EIO in the application and moves nothing; one at the write pointer
// then succeeds.
func TestKernelWriteOffWritePointer(t *testing.T) {
	s := serve(t, createZoned(t, 1<<30, issueGeometry), ublk.Options{})
	f := vmtest.OpenDirect(t, s.dev.Path())
	defer f.Close()
	buf := vmtest.AlignedBuf(t, 64<<10)
	zone := int64(2 << 26)
	if err := vmtest.DirectWrite(f, vmtest.Pattern(64<<10, 1), zone+64<<10, buf); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write 64 KiB past the write pointer: %v, want EIO", err)
	}
	if z := blkzoneReport(t, s.dev.Path())[2]; z.wp != 0 || z.cond != 1 {
		t.Fatalf("after the refused write: zone 2 wp %#x cond %d, want empty", z.wp, z.cond)
	}
	if err := vmtest.DirectWrite(f, vmtest.Pattern(64<<10, 1), zone, buf); err != nil {
		t.Fatalf("write at the write pointer: %v", err)
	}
	if z, _ := s.zd.ZoneAt(zone); z.WritePointer != zone+64<<10 {
		t.Fatalf("write pointer %#x after a 64 KiB write, want %#x", z.WritePointer, zone+64<<10)
	}
}

// TestKernelFioZBD: fio's zonemode=zbd writes zones sequentially and
// verifies every block, then writes at the write pointers of random zones
// of a range of 8, keeping to the device's open limit (6), and verifies
// those too.
func TestKernelFioZBD(t *testing.T) {
	s := serve(t, createZoned(t, 1<<30, issueGeometry), ublk.Options{Queues: 2})
	fio := func(args ...string) {
		t.Helper()
		out := vmtest.Run(t, "fio", append([]string{"--filename=" + s.dev.Path(), "--zonemode=zbd", "--direct=1",
			"--ioengine=io_uring", "--verify=crc32c", "--do_verify=1"}, args...)...)
		if !strings.Contains(out, "err= 0") {
			t.Fatalf("fio %s:\n%s", strings.Join(args, " "), out)
		}
	}
	fio("--name=seq", "--rw=write", "--bs=128k", "--iodepth=8", "--offset=128M", "--size=256M")
	fio("--name=rand", "--rw=randwrite", "--bs=16k", "--iodepth=8", "--offset=384M", "--size=512M",
		"--io_size=32M", "--max_open_zones=6")
	if open, _ := s.zd.Resources(); open > 6 {
		t.Fatalf("%d zones open, max 6", open)
	}
	st := s.dev.Stats()
	if st.Writes == 0 || st.Reads == 0 || st.Errors != 0 {
		t.Fatalf("stats after fio: %+v", st)
	}
	var full, written int
	for _, z := range s.zd.Report(6, 8) {
		if z.WritePointer > z.Start {
			written++
		}
	}
	for _, z := range s.zd.Report(2, 4) {
		if z.Cond == zoned.Full {
			full++
		}
	}
	if full != 4 || written < 2 || written > 6 {
		t.Fatalf("after fio: %d of zones 2-5 full (want 4), %d of zones 6-13 written (want 2 to 6, the open limit)", full, written)
	}
}

func sha(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// TestKernelFilesystems: btrfs (which writes data with zone appends) and
// f2fs (metadata in the conventional zones) make, mount, take a file tree
// and come back intact after the device is detached and attached again.
func TestKernelFilesystems(t *testing.T) {
	for _, tc := range []struct {
		fs   string
		size int64
		g    zoned.Geometry
		mkfs []string
	}{
		{"btrfs", 2 << 30, issueGeometry, []string{"mkfs.btrfs", "-q", "-f", "-m", "single", "-d", "single"}},
		// f2fs wants many sections (one per zone) and its metadata in
		// conventional zones.
		{"f2fs", 1 << 30, zoned.Geometry{ZoneSize: 8 << 20, ZoneCapacity: 8 << 20, ConventionalZones: 4, MaxOpenZones: 12, MaxActiveZones: 12, MaxAppendBytes: 256 << 10},
			[]string{"mkfs.f2fs", "-f", "-m"}},
	} {
		t.Run(tc.fs, func(t *testing.T) {
			path := createZoned(t, tc.size, tc.g)
			s := serve(t, path, ublk.Options{})
			vmtest.Run(t, tc.mkfs[0], append(tc.mkfs[1:], s.dev.Path())...)
			mnt := t.TempDir()
			vmtest.Run(t, "mount", "-t", tc.fs, s.dev.Path(), mnt)
			sums := map[string]string{}
			for i := range 20 {
				dir := filepath.Join(mnt, fmt.Sprintf("d%d", i%4))
				os.MkdirAll(dir, 0o755)
				p := filepath.Join(dir, fmt.Sprintf("f%d", i))
				if err := os.WriteFile(p, vmtest.Pattern(256<<10+i*4096, byte(i)), 0o644); err != nil {
					t.Fatal(err)
				}
				sums[p] = sha(t, p)
			}
			vmtest.Run(t, "umount", mnt)
			st := s.dev.Stats()
			if tc.fs == "btrfs" && st.ZoneAppends == 0 {
				t.Errorf("btrfs wrote no zone appends: %+v", st)
			}
			if st.Errors != 0 {
				t.Errorf("%d requests failed: %+v", st.Errors, st)
			}
			s.stop(t)

			s = serve(t, path, ublk.Options{})
			vmtest.Run(t, "mount", "-t", tc.fs, s.dev.Path(), mnt)
			defer vmtest.Run(t, "umount", mnt)
			for p, want := range sums {
				if got := sha(t, p); got != want {
					t.Errorf("%s after reattach: sha256 %s, want %s", p, got, want)
				}
			}
		})
	}
}

func zqCSI(t *testing.T) string { return vmtest.ZQCSI(t, "../cmd/zq-csi") }

// TestKernelCLI: `zq-csi attach` picks ublk by itself, serves a plain image
// too, and ends on `zq-csi detach` or SIGTERM; an image ublk cannot expose
// falls back to nbd with a note, or fails with --backend ublk.
func TestKernelCLI(t *testing.T) {
	bin := zqCSI(t)
	path := createZoned(t, 1<<30, issueGeometry)
	a := vmtest.StartAttach(t, bin, "/dev/ublkb", path)
	if got := sysfs(t, a.Dev, "zoned"); got != "host-managed" {
		t.Fatalf("default attach: zoned %q", got)
	}
	vmtest.Run(t, bin, "detach", a.Dev)
	if err := a.Wait(t); err != nil {
		t.Fatalf("attach after detach: %v; stderr: %s", err, a.Stderr)
	}
	if _, err := os.Stat(a.Dev); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s still exists after detach: %v", a.Dev, err)
	}

	plain := filepath.Join(t.TempDir(), "plain.qcow2")
	if err := image.Create(plain, image.CreateOptions{Size: 256 << 20}); err != nil {
		t.Fatal(err)
	}
	profile := filepath.Join(t.TempDir(), "cpu.pprof")
	a = vmtest.StartAttach(t, bin, "/dev/ublkb", "--backend", "ublk", "--queues", "2", "--cpu-profile", profile, plain)
	out := vmtest.Run(t, "fio", "--name=plain", "--filename="+a.Dev, "--rw=randwrite", "--bs=4k", "--size=32M",
		"--direct=1", "--ioengine=io_uring", "--iodepth=16", "--verify=crc32c", "--do_verify=1")
	if !strings.Contains(out, "err= 0") {
		t.Fatalf("fio on the plain image:\n%s", out)
	}
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(t); err != nil {
		t.Fatalf("attach after SIGTERM: %v; stderr: %s", err, a.Stderr)
	}
	vmtest.CheckImageClean(t, plain)
	// The profile is written when the device goes: a gzipped pprof
	// profile whose samples include the server's request path.
	if err := profileNames(profile, "zq-csi/ublk.(*queue).serve"); err != nil {
		t.Errorf("--cpu-profile: %v", err)
	}

	// A partial last zone is not something ublk can report: nbd serves
	// the image instead.
	odd := createZoned(t, 100<<20, zoned.Geometry{ZoneSize: 64 << 20, ZoneCapacity: 64 << 20, MaxAppendBytes: 256 << 10})
	a = vmtest.StartAttach(t, bin, "/dev/nbd", odd)
	if !strings.Contains(a.Stderr.String(), "not a whole number of") {
		t.Errorf("fallback to nbd without saying why: %q", a.Stderr)
	}
	vmtest.Run(t, bin, "detach", a.Dev)
	a.Wait(t)
	cmd := exec.Command(bin, "attach", "--backend", "ublk", odd)
	if msg, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(msg), "not a whole number of") {
		t.Errorf("attach --backend ublk of a partial last zone: %v, %s", err, msg)
	}

	// Zones that are not a power of two (QEMU makes them: shared/testdata/
	// qemu v5): Linux cannot hold them as zones, so ublk refuses them by
	// name and the default falls back to nbd.
	odd48 := createZoned(t, 96<<20, zoned.Geometry{ZoneSize: 48 << 20, ZoneCapacity: 48 << 20, MaxAppendBytes: 256 << 10})
	const why = "zone.size 50331648 is not a power of two"
	a = vmtest.StartAttach(t, bin, "/dev/nbd", odd48)
	if !strings.Contains(a.Stderr.String(), why) {
		t.Errorf("fallback to nbd of 48 MiB zones without saying why: %q", a.Stderr)
	}
	vmtest.Run(t, bin, "detach", a.Dev)
	a.Wait(t)
	cmd = exec.Command(bin, "attach", "--frontend", "ublk", odd48)
	if msg, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(msg), why) {
		t.Errorf("attach --frontend ublk of 48 MiB zones: %v, %s", err, msg)
	}
}

// TestKernelRecoverAfterKill: the serving process is killed (SIGKILL)
// while fio writes and verifies; `attach --recover` in a new process takes
// the device back, the held and reissued I/O completes and fio finishes
// without an error.
func TestKernelRecoverAfterKill(t *testing.T) {
	bin := zqCSI(t)
	path := createZoned(t, 1<<30, issueGeometry)
	a := vmtest.StartAttach(t, bin, "/dev/ublkb", path)
	fio := vmtest.Start(t, "fio", "--name=recover", "--filename="+a.Dev, "--zonemode=zbd", "--direct=1",
		"--ioengine=io_uring", "--iodepth=4", "--rw=write", "--bs=64k", "--offset=128M", "--size=256M",
		"--max_open_zones=4", "--verify=crc32c", "--do_verify=1")

	time.Sleep(3 * time.Second)
	a.Cmd.Process.Kill()
	a.Wait(t)
	select {
	case err := <-fio.Done():
		t.Fatalf("fio ended while the device had no server (%v):\n%s", err, fio.Out.String())
	case <-time.After(2 * time.Second):
	}
	r := vmtest.StartAttach(t, bin, "/dev/ublkb", "--recover", a.Dev, path)
	if r.Dev != a.Dev {
		t.Fatalf("recover printed %s, want %s", r.Dev, a.Dev)
	}
	select {
	case err := <-fio.Done():
		if err != nil || !strings.Contains(fio.Out.String(), "err= 0") {
			t.Fatalf("fio across the recovery: %v\n%s\nattach: %s\nrecover: %s", err, fio.Out.String(), a.Stderr, r.Stderr)
		}
	case <-time.After(5 * time.Minute):
		fio.Cmd.Process.Kill()
		t.Fatalf("fio did not finish after the recovery:\n%s\nrecover: %s", fio.Out.String(), r.Stderr)
	}
	vmtest.Run(t, bin, "detach", r.Dev)
	if err := r.Wait(t); err != nil {
		t.Fatalf("recovered attach after detach: %v; stderr: %s", err, r.Stderr)
	}
	t.Logf("recover: %s", r.Stderr)
}

// TestKernelQueuePerCPUOnItsCPUs: by default a device has a queue per CPU,
// and each queue's ring thread runs only on the CPUs the kernel sends to
// that queue, so a request is served where it was issued.
func TestKernelQueuePerCPUOnItsCPUs(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Fatalf("the guest has %d CPU: this test needs 2 (ZQ_VM_CPUS)", runtime.NumCPU())
	}
	s := serve(t, createZoned(t, 1<<30, issueGeometry), ublk.Options{})
	id, err := ublk.ParseDevice(s.dev.Path())
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.ctrl.DeviceInfo(id)
	if err != nil {
		t.Fatal(err)
	}
	if int(info.Queues) != runtime.NumCPU() {
		t.Fatalf("%d queues on %d CPUs", info.Queues, runtime.NumCPU())
	}
	// The CPU lists of this process's threads, as the kernel has them.
	pinned := map[string]int{}
	tasks, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread ended
		}
		if m := regexp.MustCompile(`(?m)^Cpus_allowed_list:\s*(\S+)$`).FindSubmatch(b); m != nil {
			pinned[string(m[1])]++
		}
	}
	for q := range int(info.Queues) {
		cpus, err := s.ctrl.QueueAffinity(id, uint16(q))
		if err != nil {
			t.Fatal(err)
		}
		var list []string
		for cpu := range 1024 {
			if cpus.IsSet(cpu) {
				list = append(list, strconv.Itoa(cpu))
			}
		}
		want := strings.Join(list, ",")
		if len(list) == 0 || pinned[want] == 0 {
			t.Errorf("queue %d maps CPUs %q; no thread of this process runs on exactly those (threads by CPU list: %v)", q, want, pinned)
		}
	}
	// And the device serves from every CPU: random writes to a
	// conventional zone from each, verified (the geometry has 2).
	for cpu := range min(runtime.NumCPU(), 2) {
		out := vmtest.Run(t, "taskset", "-c", strconv.Itoa(cpu), "fio", "--name=q", "--filename="+s.dev.Path(), "--direct=1",
			"--ioengine=io_uring", "--rw=randwrite", "--bs=4k", "--iodepth=4", "--size=4M", fmt.Sprintf("--offset=%d", cpu<<26),
			"--verify=crc32c", "--do_verify=1")
		if !strings.Contains(out, "err= 0") {
			t.Fatalf("fio on CPU %d:\n%s", cpu, out)
		}
	}
}

// profileNames checks that file is a gzipped CPU profile that names fn (a
// profile's function names are plain strings in its string table).
func profileNames(file, fn string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return fmt.Errorf("%s: not gzipped: %w", file, err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	if !bytes.Contains(raw, []byte(fn)) {
		return fmt.Errorf("%s: %d bytes, no sample in %s", file, len(raw), fn)
	}
	return nil
}
