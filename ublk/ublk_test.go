package ublk

import (
	"bytes"
	"errors"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// The command encodings are the values include/uapi/linux/ublk_cmd.h gives
// (_IOWR('u', nr, struct ublksrv_ctrl_cmd) and friends), written out.
func TestCommandEncodingMatchesTheKernelHeader(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  uint32
		want uint32
	}{
		{"UBLK_U_CMD_ADD_DEV", ioc(cmdAddDev, ctrlCmdSize, false), 0xc0207504},
		{"UBLK_U_CMD_GET_DEV_INFO", ioc(cmdGetDevInfo, ctrlCmdSize, true), 0x80207502},
		{"UBLK_U_CMD_START_USER_RECOVERY", ioc(cmdStartRecovery, ctrlCmdSize, false), 0xc0207510},
		{"UBLK_U_CMD_GET_FEATURES", ioc(cmdGetFeatures, ctrlCmdSize, true), 0x80207513},
		{"UBLK_U_IO_FETCH_REQ", ioc(ioFetchReq, ioCmdSize, false), 0xc0107520},
		{"UBLK_U_IO_COMMIT_AND_FETCH_REQ", ioc(ioCommitAndFetch, ioCmdSize, false), 0xc0107521},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

// The user-copy offset of a request: UBLKSRV_IO_BUF_OFFSET, the queue at
// bit 41, the tag at bit 25.
func TestUserCopyOffset(t *testing.T) {
	for _, tc := range []struct {
		q, tag int
		want   int64
	}{
		{0, 0, 0x80000000},
		{0, 1, 0x80000000 + 1<<25},
		{3, 63, 0x80000000 + 3<<41 + 63<<25},
	} {
		if got := userCopyOffset(tc.q, tc.tag); got != tc.want {
			t.Errorf("userCopyOffset(%d, %d) = %#x, want %#x", tc.q, tc.tag, got, tc.want)
		}
	}
}

// The parameter block puts each field where struct ublk_params has it
// (offsets from the header: basic at 8, discard at 40, devt at 60, zoned
// at 76).
func TestParamsLayout(t *testing.T) {
	p := Params{LogicalBlockShift: 9, PhysicalBlockShift: 12, MaxSectors: 1024, ChunkSectors: 131072, Sectors: 1 << 21,
		Discard: true, DiscardGranularity: 4096, MaxDiscardSectors: 1 << 30, MaxWriteZeroesSectors: 1024,
		Zoned: true, MaxOpenZones: 6, MaxActiveZones: 8, MaxZoneAppendSectors: 512}
	b := p.encode()
	for _, f := range []struct {
		name string
		off  int
		want uint64
		size int
	}{
		{"len", 0, paramsSize, 4},
		{"types (basic|discard|zoned)", 4, 1 | 2 | 8, 4},
		{"basic.attrs (volatile cache|fua)", 8, 4 | 8, 4},
		{"basic.logical_bs_shift", 12, 9, 1},
		{"basic.physical_bs_shift", 13, 12, 1},
		{"basic.max_sectors", 16, 1024, 4},
		{"basic.chunk_sectors", 20, 131072, 4},
		{"basic.dev_sectors", 24, 1 << 21, 8},
		{"discard.discard_granularity", 44, 4096, 4},
		{"discard.max_discard_sectors", 48, 1 << 30, 4},
		{"discard.max_write_zeroes_sectors", 52, 1024, 4},
		{"discard.max_discard_segments", 56, 1, 2},
		{"zoned.max_open_zones", 76, 6, 4},
		{"zoned.max_active_zones", 80, 8, 4},
		{"zoned.max_zone_append_sectors", 84, 512, 4},
	} {
		var got uint64
		switch f.size {
		case 1:
			got = uint64(b[f.off])
		case 2:
			got = uint64(le.Uint16(b[f.off:]))
		case 4:
			got = uint64(le.Uint32(b[f.off:]))
		case 8:
			got = le.Uint64(b[f.off:])
		}
		if got != f.want {
			t.Errorf("%s at %d = %#x, want %#x", f.name, f.off, got, f.want)
		}
	}
	back := decodeParams(b)
	if back != p {
		t.Errorf("decode(encode(p)) = %+v, want %+v", back, p)
	}
}

func TestDevInfoRoundTrip(t *testing.T) {
	d := DevInfo{Queues: 2, QueueDepth: 64, State: StateQuiesced, MaxIOBufBytes: 512 << 10, ID: 7, ServerPID: 1234, Flags: 0x1da}
	if got := decodeDevInfo(d.encode()); got != d {
		t.Fatalf("decode(encode(%+v)) = %+v", d, got)
	}
}

func TestParseDevice(t *testing.T) {
	for _, tc := range []struct {
		path string
		want uint32
		ok   bool
	}{
		{"/dev/ublkb0", 0, true},
		{"/dev/ublkb12", 12, true},
		{"/dev/ublkc3", 3, true},
		{"/dev/ublkb", 0, false},
		{"/dev/ublkb1x", 0, false},
		{"/dev/ublkb-1", 0, false},
		{"/dev/ublkb01", 0, false},
		{"/dev/nbd0", 0, false},
		{"/dev/ublkb0/../../etc/passwd", 0, false},
	} {
		got, err := ParseDevice(tc.path)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d, ok %v", tc.path, got, err, tc.want, tc.ok)
		}
	}
}

func FuzzParseDevice(f *testing.F) {
	for _, s := range []string{"/dev/ublkb0", "/dev/ublkc99", "/dev/ublkb", "/dev/nbd1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseDevice(s)
		if err != nil {
			return
		}
		if !strings.HasPrefix(s, "/dev/ublk") || (s != "/dev/ublkb"+strconv.Itoa(int(n)) && s != "/dev/ublkc"+strconv.Itoa(int(n))) {
			t.Fatalf("ParseDevice(%q) accepted as %d", s, n)
		}
	})
}

// zonedImage creates a real zoned image with geometry g and opens it
// read-write.
func zonedImage(t *testing.T, size int64, g zoned.Geometry) *volume.Volume {
	t.Helper()
	path := filepath.Join(t.TempDir(), "z.qcow2")
	if _, err := volume.CreateZoned(path, image.CreateOptions{Size: size}, g); err != nil {
		t.Fatal(err)
	}
	v, err := volume.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

// Geometries the kernel cannot take are refused before any device is
// created, with the reason and the way out.
func TestParamsRefuseWhatUblkCannotExpose(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int64
		g    zoned.Geometry
		bs   int
		want string // "" = accepted
	}{
		{"the issue's geometry", 1 << 30, zoned.Geometry{ZoneSize: 64 << 20, ZoneCapacity: 64 << 20, ConventionalZones: 2, MaxOpenZones: 6, MaxActiveZones: 8, MaxAppendBytes: 256 << 10}, 0, ""},
		{"a partial last zone", 100 << 20, zoned.Geometry{ZoneSize: 64 << 20, ZoneCapacity: 64 << 20, MaxAppendBytes: 256 << 10}, 0, "not a whole number"},
		{"zones of 2^32 sectors", 4 << 40, zoned.Geometry{ZoneSize: 2 << 40, ZoneCapacity: 2 << 40, MaxAppendBytes: 256 << 10}, 0, "larger than ublk's"},
		// QEMU makes such images (shared/testdata/qemu v5); Linux's zoned
		// block layer cannot hold them, whole zones or not.
		{"zones of 48 MiB, not a power of two", 48 << 24, zoned.Geometry{ZoneSize: 48 << 20, ZoneCapacity: 48 << 20, MaxAppendBytes: 256 << 10}, 0, "zone.size 50331648 is not a power of two"},
		{"block size 1024", 1 << 30, zoned.Geometry{ZoneSize: 64 << 20, ZoneCapacity: 64 << 20, MaxAppendBytes: 256 << 10}, 1024, "must be 512 or 4096"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := zonedImage(t, tc.size, tc.g)
			opts := Options{LogicalBlockSize: tc.bs}
			opts.setDefaults()
			p, err := params(v, &opts)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !p.Zoned || p.ChunkSectors != 131072 || p.MaxOpenZones != 6 || p.MaxActiveZones != 8 || p.MaxZoneAppendSectors != 512 {
					t.Fatalf("params %+v", p)
				}
				if p.MaxDiscardSectors%p.ChunkSectors != 0 {
					t.Fatalf("max discard %d sectors is not whole zones of %d", p.MaxDiscardSectors, p.ChunkSectors)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("params: %v, want an error saying %q", err, tc.want)
			}
			if tc.bs == 0 && !errors.Is(err, ErrGeometry) {
				t.Fatalf("params: %v is not ErrGeometry", err)
			}
		})
	}
}

// The ring against the host kernel's io_uring: a read of a pipe completes
// with its bytes, and queued entries beyond the ring's size are refused.
func TestRingReadsAPipe(t *testing.T) {
	r, err := newRing(4, false)
	if err != nil {
		t.Fatalf("io_uring unavailable on this host: %v", err)
	}
	defer r.close()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	msg := []byte("zoned")
	if _, err := unix.Write(p[1], msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	readPipe(t, r, p[0], buf, 42)
	if err := r.submit(1); err != nil {
		t.Fatal(err)
	}
	var got []cqe
	r.reap(func(c cqe) { got = append(got, c) })
	if len(got) != 1 || got[0].userData != 42 || got[0].res != int32(len(msg)) || !bytes.Equal(buf[:len(msg)], msg) {
		t.Fatalf("completions %+v, buffer %q", got, buf)
	}
	for i := 0; i < 4; i++ {
		if _, err := r.sqe(); err != nil {
			t.Fatalf("entry %d of 4: %v", i, err)
		}
	}
	if _, err := r.sqe(); !errors.Is(err, errRingFull) {
		t.Fatalf("fifth entry of a 4-entry ring: %v", err)
	}
}

// readPipe queues an IORING_OP_READ of buf from fd with userData; buf must
// stay reachable until the completion.
func readPipe(t *testing.T, r *ring, fd int, buf []byte, userData uint64) {
	t.Helper()
	e, err := r.sqe()
	if err != nil {
		t.Fatal(err)
	}
	const opRead = 22 // IORING_OP_READ
	e[0] = opRead
	le.PutUint32(e[4:], uint32(fd))
	le.PutUint64(e[16:], uint64(uintptr(unsafe.Pointer(&buf[0]))))
	le.PutUint32(e[24:], uint32(len(buf)))
	le.PutUint64(e[32:], userData)
}

// The ring signals its registered eventfd for a completion only while
// notification is on: the queue's ring thread relies on both halves (no
// wake-ups while it waits in the kernel, one for every completion while it
// waits in Go).
func TestRingEventfdFollowsNotify(t *testing.T) {
	r, err := newRing(4, false)
	if err != nil {
		t.Fatalf("io_uring unavailable on this host: %v", err)
	}
	defer r.close()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := r.registerEventfd(efd); err != nil {
		t.Fatal(err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	signals := func() uint64 {
		var b [8]byte
		if _, err := unix.Read(efd, b[:]); err == unix.EAGAIN {
			return 0
		} else if err != nil {
			t.Fatal(err)
		}
		return le.Uint64(b[:])
	}
	buf := make([]byte, 8)
	for i, on := range []bool{false, true, false, true} {
		r.setNotify(on)
		readPipe(t, r, p[0], buf, uint64(i))
		if err := r.submit(0); err != nil {
			t.Fatal(err)
		}
		if r.completions() {
			t.Fatalf("round %d: a completion before the pipe had data", i)
		}
		if _, err := unix.Write(p[1], []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if err := r.submit(1); err != nil {
			t.Fatal(err)
		}
		if !r.completions() {
			t.Fatalf("round %d: no completion after waiting for one", i)
		}
		n := r.reap(func(c cqe) {
			if c.userData != uint64(i) || c.res != 1 {
				t.Errorf("round %d: completion %+v", i, c)
			}
		})
		want := uint64(0)
		if on {
			want = 1
		}
		if got := signals(); n != 1 || got != want {
			t.Fatalf("round %d (notify %v): %d completions, eventfd counted %d, want 1 and %d", i, on, n, got, want)
		}
	}
}

// Without the module the control device's absence is ErrUnavailable with
// the fix in the message.
func TestOpenControlWithoutModule(t *testing.T) {
	_, err := openControl(filepath.Join(t.TempDir(), "ublk-control"))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "modprobe ublk_drv") {
		t.Fatalf("openControl: %v", err)
	}
}
