//go:build vmtest

// Kernel tests of injected faults: a zq-csi ublk device with faults
// injected through `zq-csi fault`, seen by blkzone, dd, fio and the zoned
// filesystems, beside a zoned null_blk of the same geometry with the same
// zone conditions (the control). They run only in the VM harness:
//
//	test/e2e/vm-go-test.sh ./faultctl/
package faultctl_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/test/e2e/vmtest"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

func TestMain(m *testing.M) { vmtest.Main(m, "./faultctl/") }

const zoneMiB = 16

// geometry is null_blk's: 64 zones of 16 MiB, the first conventional.
var geometry = zoned.Geometry{ZoneSize: zoneMiB << 20, ZoneCapacity: zoneMiB << 20, ConventionalZones: 1, MaxAppendBytes: 256 << 10}

func createImage(t *testing.T, size int64, g zoned.Geometry) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "v.qcow2")
	if _, err := volume.CreateZoned(path, image.CreateOptions{Size: size}, g); err != nil {
		t.Fatal(err)
	}
	return path
}

// attached is a zq-csi attach with its fault socket.
type attached struct {
	*vmtest.Attach
	bin, socket string
}

func attachFaulty(t *testing.T, path string, args ...string) attached {
	t.Helper()
	bin := vmtest.ZQCSI(t, "../cmd/zq-csi")
	sock := filepath.Join(t.TempDir(), "fault.sock")
	a := vmtest.StartAttach(t, bin, "/dev/ublkb", append(append([]string{"--fault-socket", sock}, args...), path)...)
	return attached{a, bin, sock}
}

func (a attached) fault(t *testing.T, args ...string) string {
	t.Helper()
	return vmtest.Run(t, a.bin, append([]string{"fault", "--socket", a.socket}, args...)...)
}

// nullBlk makes a memory-backed zoned null_blk of geometry (1 GiB, 16 MiB
// zones, one conventional) with zone 3 read-only and zone 5 offline, through
// configfs, and returns its device.
func nullBlk(t *testing.T) string {
	t.Helper()
	vmtest.Run(t, "modprobe", "null_blk", "nr_devices=0")
	if out, err := exec.Command("mountpoint", "-q", "/sys/kernel/config").CombinedOutput(); err != nil {
		vmtest.Run(t, "mount", "-t", "configfs", "none", "/sys/kernel/config")
		_ = out
	}
	dir := "/sys/kernel/config/nullb/faultnb"
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.WriteFile(dir+"/power", []byte("0"), 0)
		os.Remove(dir)
	})
	for _, kv := range [][2]string{{"zoned", "1"}, {"zone_size", strconv.Itoa(zoneMiB)}, {"zone_nr_conv", "1"},
		{"size", "1024"}, {"memory_backed", "1"}, {"power", "1"},
		{"zone_readonly", strconv.Itoa(3 * zoneMiB << 11)}, {"zone_offline", strconv.Itoa(5 * zoneMiB << 11)}} {
		if err := os.WriteFile(dir+"/"+kv[0], []byte(kv[1]), 0); err != nil {
			t.Fatalf("null_blk %s=%s: %v", kv[0], kv[1], err)
		}
	}
	return "/dev/faultnb"
}

var zoneLine = regexp.MustCompile(`start: (0x[0-9a-f]+), .*zcond:\s*(\d+)`)

// conditions is blkzone's report of the first n zones: their conditions.
func conditions(t *testing.T, dev string, n int) []int {
	t.Helper()
	var out []int
	for _, m := range zoneLine.FindAllStringSubmatch(vmtest.Run(t, "blkzone", "report", "-c", strconv.Itoa(n), dev), -1) {
		c, _ := strconv.Atoi(m[2])
		out = append(out, c)
	}
	return out
}

// outcome runs a tool and returns "ok" or the error it printed, with the
// device's name taken out.
func outcome(dev string, name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err == nil {
		return "ok"
	}
	for _, e := range []string{"Input/output error", "Invalid argument", "No space left on device", "No data available", "Read-only file system", "Structure needs cleaning"} {
		if bytes.Contains(out, []byte(e)) {
			return e
		}
	}
	return strings.ReplaceAll(string(out), dev, "DEV")
}

// zoneOps are what the kernel lets a program do to zone 3 (read-only) and
// zone 5 (offline), and to the device.
func zoneOps(dev string) map[string]string {
	zone := func(z int) int { return z * zoneMiB << 8 } // in 4 KiB blocks
	sector := func(z int) string { return strconv.Itoa(z * zoneMiB << 11) }
	dd := func(args ...string) string {
		return outcome(dev, "dd", append([]string{"bs=4k", "count=1", "status=none"}, args...)...)
	}
	return map[string]string{
		"write read-only":  dd("if=/dev/zero", "of="+dev, "oflag=direct", fmt.Sprintf("seek=%d", zone(3))),
		"read read-only":   dd("if="+dev, "of=/dev/null", "iflag=direct", fmt.Sprintf("skip=%d", zone(3))),
		"write offline":    dd("if=/dev/zero", "of="+dev, "oflag=direct", fmt.Sprintf("seek=%d", zone(5))),
		"read offline":     dd("if="+dev, "of=/dev/null", "iflag=direct", fmt.Sprintf("skip=%d", zone(5))),
		"write zone 4":     dd("if=/dev/zero", "of="+dev, "oflag=direct", fmt.Sprintf("seek=%d", zone(4))),
		"reset read-only":  outcome(dev, "blkzone", "reset", "-o", sector(3), "-c", "1", dev),
		"finish read-only": outcome(dev, "blkzone", "finish", "-o", sector(3), "-c", "1", dev),
		"open offline":     outcome(dev, "blkzone", "open", "-o", sector(5), "-c", "1", dev),
		"reset all":        outcome(dev, "blkzone", "reset", dev),
	}
}

// TestKernelZoneConditionsAsOnNullBlk: zones made read-only and offline
// through `zq-csi fault` on a live ublk device report, fail and succeed as
// on a zoned null_blk with the same zones set through configfs.
func TestKernelZoneConditionsAsOnNullBlk(t *testing.T) {
	control := nullBlk(t)
	a := attachFaulty(t, createImage(t, 1<<30, geometry))
	a.fault(t, "add", "readonly:zone=3", "offline:zone=5")

	want := conditions(t, control, 7)
	if fmt.Sprint(want) != "[0 1 1 13 1 15 1]" {
		t.Fatalf("null_blk's zone conditions %v: the control is not what this test expects", want)
	}
	if got := conditions(t, a.Dev, 7); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("zone conditions: zq-csi %v, null_blk %v", got, want)
	}
	for _, attr := range []string{"nr_zones", "zoned"} {
		g, w := sysfs(t, a.Dev, attr), sysfs(t, control, attr)
		if g != w {
			t.Errorf("queue/%s: zq-csi %q, null_blk %q", attr, g, w)
		}
	}
	got, ctl := zoneOps(a.Dev), zoneOps(control)
	for op, w := range ctl {
		if got[op] != w {
			t.Errorf("%s: zq-csi %q, null_blk %q", op, got[op], w)
		}
	}
	if ctl["write read-only"] != "Input/output error" || ctl["read read-only"] != "ok" || ctl["read offline"] != "Input/output error" {
		t.Errorf("null_blk's outcomes %v: the control is not what this test expects", ctl)
	}
	// ZBC's "reset recommended" reaches blkzone (reset:1) through ublk's
	// zone report; the zone's reset clears it. null_blk cannot set it.
	a.fault(t, "add", "reset-recommended:zone=4")
	if out := vmtest.Run(t, "blkzone", "report", "-o", strconv.Itoa(4*zoneMiB<<11), "-c", "1", a.Dev); !strings.Contains(out, "reset:1") {
		t.Errorf("zone 4 reset-recommended: %s", out)
	}
	vmtest.Run(t, "blkzone", "reset", "-o", strconv.Itoa(4*zoneMiB<<11), "-c", "1", a.Dev)
	if out := vmtest.Run(t, "blkzone", "report", "-o", strconv.Itoa(4*zoneMiB<<11), "-c", "1", a.Dev); !strings.Contains(out, "reset:0") {
		t.Errorf("zone 4 after its reset: %s", out)
	}
	// Back in service, the zones take writes again.
	a.fault(t, "add", "online:zone=3", "online:zone=5")
	if got := conditions(t, a.Dev, 7); fmt.Sprint(got) != "[0 1 1 1 1 1 1]" {
		t.Errorf("after online: conditions %v", got)
	}
	if o := outcome(a.Dev, "dd", "if=/dev/zero", "of="+a.Dev, "bs=4k", "count=1", "oflag=direct", "status=none",
		fmt.Sprintf("seek=%d", 3*zoneMiB<<8)); o != "ok" {
		t.Errorf("write to zone 3 back online: %s", o)
	}
}

func sysfs(t *testing.T, dev, attr string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue", attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestKernelErrnosReachTheProgram: an injected errno is what a program on
// the device gets, as far as the block layer carries it (ENOSPC, ENODATA
// and EIO do), and a partial write lands its first sectors.
func TestKernelErrnosReachTheProgram(t *testing.T) {
	a := attachFaulty(t, createImage(t, 1<<30, geometry))
	dd := func(seek int) string {
		return outcome(a.Dev, "dd", "if=/dev/urandom", "of="+a.Dev, "bs=16k", "count=1", "oflag=direct", "status=none",
			fmt.Sprintf("seek=%d", seek))
	}
	zoneBlocks := zoneMiB << 6 // 16 KiB blocks
	for _, tc := range []struct{ errno, want string }{{"ENOSPC", "No space left on device"}, {"ENODATA", "No data available"}, {"EIO", "Input/output error"}} {
		a.fault(t, "add", "error:op=write,zone=2,count=1,errno="+tc.errno)
		if o := dd(2 * zoneBlocks); o != tc.want {
			t.Errorf("write under errno=%s: %q, want %q", tc.errno, o, tc.want)
		}
		// After a failed write Linux holds the zone's writes back (EIO)
		// until a zone report gives it the write pointer again, as a
		// program on a real drive does: the pointer has not moved.
		if wp := writePointer(t, a.Dev, 2); wp != 0 {
			t.Errorf("zone 2 after a failed write: write pointer %d sectors in, want 0", wp)
		}
	}
	if o := dd(2 * zoneBlocks); o != "ok" {
		t.Errorf("write once the rules fired: %s", o)
	}
	a.fault(t, "add", "error:op=write,zone=6,count=1,partial=8k")
	if o := dd(6 * zoneBlocks); o != "Input/output error" {
		t.Errorf("partial write: %q", o)
	}
	if wp := writePointer(t, a.Dev, 6); wp != 16 {
		t.Errorf("zone 6 after an 8k partial write: write pointer %d sectors in, want 16", wp)
	}
}

// writePointer is zone z's write pointer, in sectors from its start.
func writePointer(t *testing.T, dev string, z int) int64 {
	t.Helper()
	out := vmtest.Run(t, "blkzone", "report", "-o", strconv.Itoa(z*zoneMiB<<11), "-c", "1", dev)
	m := regexp.MustCompile(`wptr (0x[0-9a-f]+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("blkzone report: %s", out)
	}
	wp, _ := strconv.ParseInt(m[1], 0, 64)
	return wp
}

// TestKernelPowerCutKeepsExactlyTheFlushedData: fio writes a zone with an
// fsync after every 8 writes of 64 KiB; a rule cuts the power right after
// the 100th. The zone then holds the 96 writes the 12th fsync made durable,
// which fio verifies, its write pointer just past them, zeros above.
func TestKernelPowerCutKeepsExactlyTheFlushedData(t *testing.T) {
	a := attachFaulty(t, createImage(t, 1<<30, geometry), "--volatile-cache")
	a.fault(t, "add", "powercut:op=write,zone=5,nth=100")
	job := []string{"--name=cut", "--filename=" + a.Dev, "--rw=write", "--bs=64k", "--ioengine=psync", "--direct=1",
		"--offset=" + strconv.Itoa(5*zoneMiB) + "M", "--verify=crc32c", "--verify_state_save=0"}
	out, err := exec.Command("fio", append(job, "--size=16M", "--fsync=8", "--do_verify=0")...).CombinedOutput()
	if err == nil {
		t.Errorf("fio went on writing after the power cut:\n%s", out)
	}
	if wp := writePointer(t, a.Dev, 5); wp != 96*128 {
		t.Fatalf("zone 5 after the cut: write pointer %d sectors in, want %d (96 flushed writes of 64 KiB); fio:\n%s", wp, 96*128, out)
	}
	if out, err := exec.Command("fio", append(job, "--size=6M", "--verify_only")...).CombinedOutput(); err != nil || !strings.Contains(string(out), "err= 0") {
		t.Errorf("fio verify of the flushed 6 MiB: %v\n%s", err, out)
	}
	f := vmtest.OpenDirect(t, a.Dev)
	defer f.Close()
	if got := vmtest.DirectRead(t, f, 5*zoneMiB<<20+6<<20, 256<<10); !bytes.Equal(got, make([]byte, len(got))) {
		t.Errorf("the dropped writes read back as data, not zeros")
	}
	list := a.fault(t, "list")
	if !strings.Contains(list, "cache volatile, 1 power cuts") {
		t.Errorf("fault list after the cut:\n%s", list)
	}
}

// TestKernelFilesystemsStopOnWriteErrors: with every write failing, btrfs
// and f2fs refuse further changes (a sync fails, a new file gets EIO or
// EROFS) instead of corrupting themselves: once the fault is gone they
// mount again, pass their checkers, and what was synced before is there.
func TestKernelFilesystemsStopOnWriteErrors(t *testing.T) {
	for _, tc := range []struct {
		fs    string
		g     zoned.Geometry
		size  int64
		mkfs  []string
		check []string
	}{
		{"btrfs", zoned.Geometry{ZoneSize: 16 << 20, ZoneCapacity: 16 << 20, MaxAppendBytes: 256 << 10}, 512 << 20,
			[]string{"mkfs.btrfs", "-f", "-q"}, []string{"btrfs", "check", "--readonly"}},
		{"f2fs", zoned.Geometry{ZoneSize: 8 << 20, ZoneCapacity: 8 << 20, ConventionalZones: 4, MaxOpenZones: 12, MaxActiveZones: 12, MaxAppendBytes: 256 << 10}, 1 << 30,
			[]string{"mkfs.f2fs", "-f", "-m"}, []string{"fsck.f2fs"}},
	} {
		t.Run(tc.fs, func(t *testing.T) {
			a := attachFaulty(t, createImage(t, tc.size, tc.g))
			mnt := t.TempDir()
			vmtest.Run(t, tc.mkfs[0], append(tc.mkfs[1:], a.Dev)...)
			vmtest.Run(t, "mount", a.Dev, mnt)
			mounted := true
			defer func() {
				if mounted {
					exec.Command("umount", mnt).Run()
				}
			}()
			synced := vmtest.Pattern(1<<20, 3)
			if err := os.WriteFile(filepath.Join(mnt, "synced"), synced, 0o644); err != nil {
				t.Fatal(err)
			}
			vmtest.Run(t, "sync", "-f", filepath.Join(mnt, "synced"))
			a.fault(t, "add", "error:op=write")
			var werr error
			for i := range 20 { // until the filesystem has noticed
				werr = os.WriteFile(filepath.Join(mnt, fmt.Sprintf("late%d", i)), vmtest.Pattern(1<<20, 5), 0o644)
				if werr == nil {
					werr = exec.Command("sync", "-f", mnt).Run()
				}
				if werr != nil {
					break
				}
			}
			if werr == nil {
				t.Fatalf("%s went on taking writes and syncs with every device write failing", tc.fs)
			}
			o := outcome(a.Dev, "touch", filepath.Join(mnt, "after"))
			t.Logf("%s: a write failed with %v; a new file then: %s", tc.fs, werr, o)
			// f2fs, once it has flagged itself for fsck, refuses with
			// EUCLEAN; which error comes first depends on timing.
			if o != "Read-only file system" && o != "Input/output error" && o != "Structure needs cleaning" {
				t.Errorf("a new file after the errors: %q, want the filesystem to refuse it", o)
			}
			a.fault(t, "remove", "all")
			exec.Command("umount", mnt).Run()
			mounted = false
			if out, err := exec.Command(tc.check[0], append(tc.check[1:], a.Dev)...).CombinedOutput(); err != nil {
				t.Errorf("%s after the errors: %v\n%s", strings.Join(tc.check, " "), err, out)
			}
			vmtest.Run(t, "mount", a.Dev, mnt)
			mounted = true
			got, err := os.ReadFile(filepath.Join(mnt, "synced"))
			if err != nil || !bytes.Equal(got, synced) {
				t.Errorf("the file synced before the errors: %v (%d bytes)", err, len(got))
			}
		})
	}
}

// TestKernelPowerCutKeepsWhatFilesystemsSynced: files written and fsynced
// one after another on btrfs and f2fs over a volume with a volatile cache;
// mid-way the disk goes away (every request fails) and its power is cut,
// dropping all it had not flushed. Mounted again with the power back,
// every file whose fsync returned is there, whole; a power cut loses only
// what no flush covered.
func TestKernelPowerCutKeepsWhatFilesystemsSynced(t *testing.T) {
	for _, tc := range []struct {
		fs   string
		g    zoned.Geometry
		size int64
		mkfs []string
	}{
		{"btrfs", zoned.Geometry{ZoneSize: 16 << 20, ZoneCapacity: 16 << 20, MaxAppendBytes: 256 << 10}, 512 << 20,
			[]string{"mkfs.btrfs", "-f", "-q"}},
		{"f2fs", zoned.Geometry{ZoneSize: 8 << 20, ZoneCapacity: 8 << 20, ConventionalZones: 4, MaxOpenZones: 12, MaxActiveZones: 12, MaxAppendBytes: 256 << 10}, 1 << 30,
			[]string{"mkfs.f2fs", "-f", "-m"}},
	} {
		t.Run(tc.fs, func(t *testing.T) {
			a := attachFaulty(t, createImage(t, tc.size, tc.g), "--volatile-cache")
			mnt := t.TempDir()
			vmtest.Run(t, tc.mkfs[0], append(tc.mkfs[1:], a.Dev)...)
			vmtest.Run(t, "mount", a.Dev, mnt)
			mounted := true
			defer func() {
				if mounted {
					exec.Command("umount", mnt).Run()
				}
			}()
			content := func(i int) []byte { return vmtest.Pattern(64<<10, byte(i)) }
			synced := make(chan int, 1)
			stop := make(chan struct{})
			go func() {
				defer close(synced)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					f, err := os.Create(filepath.Join(mnt, fmt.Sprintf("f%04d", i)))
					if err == nil {
						_, err = f.Write(content(i))
						err = errors.Join(err, f.Sync(), f.Close())
					}
					if err == nil {
						// the directory entry too: fsync of the parent
						err = syncDir(mnt)
					}
					if err != nil {
						return
					}
					select {
					case <-synced:
					default:
					}
					synced <- i
				}
			}()
			time.Sleep(3 * time.Second)
			a.fault(t, "add", "error:op=all")                                  // the disk is gone...
			t.Logf("%s: %s", tc.fs, strings.TrimSpace(a.fault(t, "powercut"))) // ...and its cache with it
			last := -1
			for i := range synced { // the writer stops at its first error
				last = i
			}
			close(stop)
			if last < 5 {
				t.Fatalf("only %d files synced before the cut: too few to say anything", last+1)
			}
			exec.Command("umount", mnt).Run()
			mounted = false
			a.fault(t, "remove", "all") // the power is back
			vmtest.Run(t, "mount", a.Dev, mnt)
			mounted = true
			for i := 0; i <= last; i++ {
				got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("f%04d", i)))
				if err != nil || !bytes.Equal(got, content(i)) {
					t.Errorf("file %d of the %d synced before the cut: %v (%d bytes)", i, last+1, err, len(got))
				}
			}
			t.Logf("%s: %d files synced before the power cut, all there after it", tc.fs, last+1)
		})
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
