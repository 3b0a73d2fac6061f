package nbd

import (
	"bytes"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// Zoned test image: 8 MiB, zone 0 conventional, zones 1..7 sequential
// (1 MiB, capacity 768 KiB), at most 2 open.
const zonedSize = 8 << 20

func zonedExport(t *testing.T) (*Export, *zoned.Device) {
	_, img, dev := newZonedImage(t, zonedSize, 2)
	t.Cleanup(func() { dev.Flush(); img.Close() })
	return &Export{Name: "z", Backend: &volume.Zoned{Img: img, Dev: dev}}, dev
}

func wp(t *testing.T, dev *zoned.Device, zone int) int64 {
	t.Helper()
	return dev.Report(zone, 1)[0].WritePointer - int64(zone)*testZoneSize
}

func TestZonedWriteNotAtWritePointerFailsAndChangesNothing(t *testing.T) {
	e, dev := zonedExport(t)
	cl, _, _ := serve(t, e)
	cl.negotiate("z", true)
	z1 := uint64(testZoneSize)
	cl.request(cmdWrite, 0, 1, z1+4096, 4096, make([]byte, 4096))
	if errno, _, _ := cl.reply(0); errno != errInval {
		t.Fatalf("write past the write pointer: errno %d, want EINVAL", errno)
	}
	if got := wp(t, dev, 1); got != 0 {
		t.Fatalf("write pointer moved to %#x", got)
	}
	cl.request(cmdWrite, 0, 2, z1, 4096, bytes.Repeat([]byte{7}, 4096))
	if errno, _, _ := cl.reply(0); errno != 0 {
		t.Fatalf("write at the write pointer: errno %d", errno)
	}
	if got := wp(t, dev, 1); got != 4096 {
		t.Fatalf("write pointer %#x, want 0x1000", got)
	}
	// Past the capacity: refused, nothing written.
	cl.request(cmdWrite, 0, 3, z1+4096, testZoneCap, make([]byte, testZoneCap))
	if errno, _, _ := cl.reply(0); errno != errInval {
		t.Fatalf("write past capacity: errno %d", errno)
	}
	// A third active zone with max_active_zones 2.
	for _, z := range []int64{2} {
		if err := dev.Open(z*testZoneSize, testZoneSize); err != nil {
			t.Fatal(err)
		}
	}
	cl.request(cmdWrite, 0, 4, 4*testZoneSize, 4096, make([]byte, 4096))
	if errno, _, _ := cl.reply(0); errno != errOverflow {
		t.Fatalf("write over the open limit: errno %d, want EOVERFLOW", errno)
	}
	if wp(t, dev, 1) != 4096 || wp(t, dev, 4) != 0 {
		t.Fatal("a refused write moved a write pointer")
	}
}

func TestZonedPipelinedWritesAtWritePointerStayInOrder(t *testing.T) {
	e, dev := zonedExport(t)
	cl, _, _ := serve(t, e)
	cl.negotiate("z", false)
	const n = 96 // 96 * 8 KiB = 768 KiB: fills zone 2 to its capacity
	for i := 0; i < n; i++ {
		cl.request(cmdWrite, 0, uint64(i), uint64(2*testZoneSize+i*8192), 8192, bytes.Repeat([]byte{byte(i)}, 8192))
	}
	for i := 0; i < n; i++ {
		if errno, cookie := cl.simple(); errno != 0 {
			t.Fatalf("write %d: errno %d", cookie, errno)
		}
	}
	if z := dev.Report(2, 1)[0]; z.Cond != zoned.Full {
		t.Fatalf("zone 2 %+v, want full", z)
	}
}

func TestZonedTrimResetsWholeZonesOnly(t *testing.T) {
	e, dev := zonedExport(t)
	cl, _, _ := serve(t, e)
	cl.negotiate("z", false)
	z1 := uint64(testZoneSize)
	cl.request(cmdWrite, 0, 1, z1, 64<<10, bytes.Repeat([]byte{9}, 64<<10))
	cl.request(cmdWrite, 0, 2, 0, 64<<10, bytes.Repeat([]byte{9}, 64<<10))
	for i := 0; i < 2; i++ {
		if errno, _ := cl.simple(); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	cl.request(cmdTrim, 0, 3, z1, 64<<10, nil)
	if errno, _ := cl.simple(); errno != errInval {
		t.Fatalf("partial trim of a sequential zone: errno %d, want EINVAL", errno)
	}
	if wp(t, dev, 1) != 64<<10 {
		t.Fatal("partial trim changed the zone")
	}
	cl.request(cmdTrim, 0, 4, 0, 2*testZoneSize, nil) // conventional zone + zone 1
	if errno, _ := cl.simple(); errno != 0 {
		t.Fatalf("trim of whole zones: errno %d", errno)
	}
	if z := dev.Report(1, 1)[0]; z.Cond != zoned.Empty || z.WritePointer != int64(z1) {
		t.Fatalf("zone 1 after trim %+v", z)
	}
	got, errno := cl.readData(5, 0, 64<<10)
	if errno != 0 || !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Fatal("conventional zone not discarded")
	}
}

func TestZonedWriteZeroesIsAWriteAtTheWritePointer(t *testing.T) {
	e, dev := zonedExport(t)
	cl, _, _ := serve(t, e)
	cl.negotiate("z", false)
	z3 := uint64(3 * testZoneSize)
	cl.request(cmdWriteZeroes, 0, 1, z3+512, 4096, nil)
	if errno, _ := cl.simple(); errno != errInval {
		t.Fatalf("zeroes not at the write pointer: errno %d", errno)
	}
	cl.request(cmdWriteZeroes, cmdFlagFastZero, 2, z3, 4096, nil)
	if errno, _ := cl.simple(); errno != errNotSup {
		t.Fatalf("fast zero on a sequential zone: errno %d, want ENOTSUP", errno)
	}
	if wp(t, dev, 3) != 0 {
		t.Fatal("refused zeroing moved the write pointer")
	}
	cl.request(cmdWriteZeroes, 0, 3, z3, 3<<20/4-4096, nil) // all but the last 4 KiB of capacity, in several pieces
	if errno, _ := cl.simple(); errno != 0 {
		t.Fatalf("zeroes at the write pointer: errno %d", errno)
	}
	if got := wp(t, dev, 3); got != 3<<20/4-4096 {
		t.Fatalf("write pointer %#x", got)
	}
	cl.request(cmdWriteZeroes, cmdFlagFastZero, 4, 512, 4096, nil)
	if errno, _ := cl.simple(); errno != 0 {
		t.Fatalf("fast zero in the conventional zone: errno %d", errno)
	}
}

func TestClipKeepsOnlyExtentsCoveringTheRequest(t *testing.T) {
	exts := []image.Extent{{Offset: 0, Length: 0, Data: true}, {Offset: 0, Length: 4096, Data: true}, {Offset: 4096, Length: 8192, Zero: true}}
	got := clip(exts, 1024, 4096)
	if len(got) != 2 || got[0] != (image.Extent{Offset: 1024, Length: 3072, Data: true}) || got[1] != (image.Extent{Offset: 4096, Length: 1024, Zero: true}) {
		t.Fatalf("clip: %+v", got)
	}
	if got := clip([]image.Extent{{Offset: 0, Length: 512}, {Offset: 1024, Length: 512}}, 0, 1536); got != nil {
		t.Fatalf("a gap must give nil, got %+v", got)
	}
	if got := clip(exts[:2], 0, 8192); got != nil {
		t.Fatalf("a short map must give nil, got %+v", got)
	}
}
