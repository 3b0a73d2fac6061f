//go:build vmtest

// Kernel-level tests: they need the guest kernel of the VM harness (ublk, nbd,
// zoned null_blk) and run only there, through
//
//	test/e2e/vm-go-test.sh ./test/e2e
//
// The vmtest build tag keeps them out of plain `go test ./...` on the host, so
// they can never pass there by skipping; run any other way they fail.
package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"
)

func TestMain(m *testing.M) {
	if os.Getenv("ZQ_VM") != "1" {
		fmt.Fprintln(os.Stderr, "these tests need the VM harness kernel: run test/e2e/vm-go-test.sh ./test/e2e (ZQ_VM=1 is not set)")
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// Zoned block device ioctls from <linux/blkzoned.h> (type 0x12).
const (
	blkReportZone  = 0xC0101282 // _IOWR(0x12, 130, struct blk_zone_report)
	blkResetZone   = 0x40101283 // _IOW(0x12, 131, struct blk_zone_range)
	blkGetZoneSize = 0x80041284 // _IOR(0x12, 132, __u32)
	blkGetNrZones  = 0x80041285 // _IOR(0x12, 133, __u32)

	zoneTypeSeqWriteReq = 2 // BLK_ZONE_TYPE_SEQWRITE_REQ
	zoneCondEmpty       = 1 // BLK_ZONE_COND_EMPTY
	zoneCondImpOpen     = 2 // BLK_ZONE_COND_IMP_OPEN
	zoneCondFull        = 0xE
)

// blkZone is struct blk_zone (64 bytes).
type blkZone struct {
	Start, Len, WP          uint64 // 512-byte sectors
	Type, Cond, NonSeq, Rst uint8
	_                       [4]uint8
	Capacity                uint64
	_                       [24]uint8
}

type blkZoneRange struct{ Sector, NrSectors uint64 }

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, uintptr(arg)); e != 0 {
		return e
	}
	return nil
}

func reportZones(t *testing.T, fd int, n int) []blkZone {
	t.Helper()
	// struct blk_zone_report { __u64 sector; __u32 nr_zones; __u32 flags; struct blk_zone zones[]; }
	buf := make([]byte, 16+n*int(unsafe.Sizeof(blkZone{})))
	*(*uint32)(unsafe.Pointer(&buf[8])) = uint32(n)
	if err := ioctl(fd, blkReportZone, unsafe.Pointer(&buf[0])); err != nil {
		t.Fatalf("BLKREPORTZONE: %v", err)
	}
	got := int(*(*uint32)(unsafe.Pointer(&buf[8])))
	zones := make([]blkZone, got)
	for i := range zones {
		zones[i] = *(*blkZone)(unsafe.Pointer(&buf[16+i*int(unsafe.Sizeof(blkZone{}))]))
	}
	return zones
}

// nullBlk creates a memory-backed null_blk device through configfs and removes
// it when the test ends. attrs are configfs attributes written in order
// before power=1. It returns the disk name.
func nullBlk(t *testing.T, attrs [][2]string) string {
	t.Helper()
	dir := filepath.Join("/sys/kernel/config/nullb", fmt.Sprintf("zqgo%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create null_blk in configfs: %v", err)
	}
	t.Cleanup(func() {
		_ = os.WriteFile(filepath.Join(dir, "power"), []byte("0"), 0)
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	for _, a := range append(attrs, [2]string{"power", "1"}) {
		if err := os.WriteFile(filepath.Join(dir, a[0]), []byte(a[1]), 0); err != nil {
			t.Fatalf("null_blk %s=%s: %v", a[0], a[1], err)
		}
	}
	// Since Linux 6.x the disk is named after the configfs item; older
	// kernels call it nullb<index>.
	name := filepath.Base(dir)
	if _, err := os.Stat(filepath.Join("/sys/block", name)); err == nil {
		return name
	}
	idx, err := os.ReadFile(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	name = "nullb" + strings.TrimSpace(string(idx))
	if _, err := os.Stat(filepath.Join("/sys/block", name)); err != nil {
		t.Fatalf("null_blk %s powered on but no disk appeared: %v", dir, err)
	}
	return name
}

func sysfs(t *testing.T, dev, attr string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", dev, attr))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// alignedBuf returns n bytes aligned for O_DIRECT, filled with pattern.
func alignedBuf(n int, pattern byte) []byte {
	raw := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&raw[0]))&4095)
	b := raw[off : off+n]
	for i := range b {
		b[i] = pattern
	}
	return b
}

func TestAttachFrontendDeviceNodes(t *testing.T) {
	for _, c := range []struct {
		path string
		char bool
	}{{"/dev/ublk-control", true}, {"/dev/nbd0", false}} {
		fi, err := os.Stat(c.path)
		if err != nil {
			t.Errorf("%s: %v", c.path, err)
			continue
		}
		isChar := fi.Mode()&os.ModeCharDevice != 0
		if fi.Mode()&os.ModeDevice == 0 || isChar != c.char {
			t.Errorf("%s: mode %v, want a %s device", c.path, fi.Mode(), map[bool]string{true: "character", false: "block"}[c.char])
		}
	}
}

// TestNullBlkZoned checks the zoned block interface the ublk frontend and the
// tests will rely on: sysfs, the zone ioctls, write-pointer advance on a
// sequential write, rejection of a write off the write pointer, zone reset,
// and that blkzone sees the same zones.
func TestNullBlkZoned(t *testing.T) {
	const (
		zoneMiB    = 8
		nrZones    = 12
		convZones  = 2
		zoneSect   = zoneMiB * 2048
		writeBytes = 1 << 20
	)
	dev := nullBlk(t, [][2]string{
		{"memory_backed", "1"}, {"blocksize", "4096"},
		{"size", strconv.Itoa(zoneMiB * nrZones)}, {"zoned", "1"},
		{"zone_size", strconv.Itoa(zoneMiB)}, {"zone_nr_conv", strconv.Itoa(convZones)},
	})

	for attr, want := range map[string]string{
		"queue/zoned":              "host-managed",
		"queue/nr_zones":           strconv.Itoa(nrZones),
		"queue/chunk_sectors":      strconv.Itoa(zoneSect),
		"queue/logical_block_size": "4096",
	} {
		if got := sysfs(t, dev, attr); got != want {
			t.Errorf("%s %s = %q, want %q", dev, attr, got, want)
		}
	}

	fd, err := syscall.Open("/dev/"+dev, syscall.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)

	var n, zs uint32
	if err := ioctl(fd, blkGetNrZones, unsafe.Pointer(&n)); err != nil || n != nrZones {
		t.Errorf("BLKGETNRZONES = %d, %v; want %d", n, err, nrZones)
	}
	if err := ioctl(fd, blkGetZoneSize, unsafe.Pointer(&zs)); err != nil || zs != zoneSect {
		t.Errorf("BLKGETZONESZ = %d, %v; want %d", zs, err, zoneSect)
	}

	zones := reportZones(t, fd, nrZones+4)
	if len(zones) != nrZones {
		t.Fatalf("BLKREPORTZONE returned %d zones, want %d", len(zones), nrZones)
	}
	for i, z := range zones {
		wantType := uint8(zoneTypeSeqWriteReq)
		if i < convZones {
			wantType = 1 // BLK_ZONE_TYPE_CONVENTIONAL
		}
		if z.Start != uint64(i*zoneSect) || z.Len != zoneSect || z.Capacity != zoneSect || z.Type != wantType {
			t.Errorf("zone %d = %+v, want start %d len/cap %d type %d", i, z, i*zoneSect, zoneSect, wantType)
		}
		if i >= convZones && (z.WP != z.Start || z.Cond != zoneCondEmpty) {
			t.Errorf("zone %d: wp %d cond %d, want empty at %d", i, z.WP, z.Cond, z.Start)
		}
	}

	// A sequential write at the write pointer of the first sequential zone
	// moves it and implicitly opens the zone.
	seq := int64(convZones * zoneSect * 512)
	buf := alignedBuf(writeBytes, 0xA5)
	if w, err := syscall.Pwrite(fd, buf, seq); err != nil || w != writeBytes {
		t.Fatalf("write at wp: %d, %v", w, err)
	}
	z := reportZones(t, fd, nrZones)[convZones]
	if z.WP != z.Start+writeBytes/512 || z.Cond != zoneCondImpOpen {
		t.Errorf("after 1 MiB write: wp %d cond %#x, want wp %d cond %#x", z.WP, z.Cond, z.Start+writeBytes/512, zoneCondImpOpen)
	}
	// Off the write pointer (4 KiB into the next, empty zone): the kernel
	// must refuse it and leave the zone empty. (A different zone than the
	// one filled below: after a failed write the kernel recovers that zone's
	// write pointer asynchronously and may fail writes queued meanwhile.)
	next := seq + zoneSect*512
	if _, err := syscall.Pwrite(fd, buf[:4096], next+4096); !errors.Is(err, syscall.EIO) {
		t.Errorf("write past the write pointer: err %v, want EIO", err)
	}
	if z := reportZones(t, fd, nrZones)[convZones+1]; z.WP != z.Start || z.Cond != zoneCondEmpty {
		t.Errorf("after the refused write: wp %d cond %#x, want empty at %d", z.WP, z.Cond, z.Start)
	}
	// Reading back what was written.
	rb := alignedBuf(writeBytes, 0)
	if r, err := syscall.Pread(fd, rb, seq); err != nil || r != writeBytes || !bytes.Equal(rb, buf) {
		t.Errorf("read back: %d, %v, equal=%v", r, err, bytes.Equal(rb, buf))
	}
	// Filling the zone makes it full.
	rest := alignedBuf(zoneSect*512-writeBytes, 0x5A)
	if w, err := syscall.Pwrite(fd, rest, seq+writeBytes); err != nil || w != len(rest) {
		t.Fatalf("fill zone: %d, %v", w, err)
	}
	if z := reportZones(t, fd, nrZones)[convZones]; z.Cond != zoneCondFull {
		t.Errorf("filled zone cond %#x, want full (%#x)", z.Cond, zoneCondFull)
	}
	// Reset brings it back to empty.
	r := blkZoneRange{Sector: uint64(convZones * zoneSect), NrSectors: zoneSect}
	if err := ioctl(fd, blkResetZone, unsafe.Pointer(&r)); err != nil {
		t.Fatalf("BLKRESETZONE: %v", err)
	}
	if z := reportZones(t, fd, nrZones)[convZones]; z.WP != z.Start || z.Cond != zoneCondEmpty {
		t.Errorf("after reset: wp %d cond %#x, want empty", z.WP, z.Cond)
	}

	// util-linux sees the same device.
	out, err := exec.Command("blkzone", "report", "/dev/"+dev).CombinedOutput()
	if err != nil {
		t.Fatalf("blkzone report: %v\n%s", err, out)
	}
	if got := strings.Count(string(out), "start:"); got != nrZones {
		t.Errorf("blkzone report lists %d zones, want %d:\n%s", got, nrZones, out)
	}
	if got := strings.Count(string(out), "SEQ_WRITE_REQUIRED"); got != nrZones-convZones {
		t.Errorf("blkzone report lists %d sequential zones, want %d", got, nrZones-convZones)
	}
}
