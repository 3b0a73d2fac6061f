package volume

import (
	"bytes"
	"errors"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

const zoneSize = 1 << 20

// zonedVolume is a real 8-zone image, zone 0 conventional, opened
// read-write.
func zonedVolume(t *testing.T) *Zoned {
	t.Helper()
	path := filepath.Join(t.TempDir(), "z.qcow2")
	g := zoned.Geometry{ZoneSize: zoneSize, ZoneCapacity: zoneSize, ConventionalZones: 1, MaxAppendBytes: 64 << 10}
	if _, err := CreateZoned(path, image.CreateOptions{Size: 8 * zoneSize}, g); err != nil {
		t.Fatal(err)
	}
	v, err := Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Error(err)
		}
	})
	return v.Backend.(*Zoned)
}

func wp(t *testing.T, v *Zoned, zone int) int64 {
	t.Helper()
	return v.Dev.Report(zone, 1)[0].WritePointer - int64(zone)*zoneSize
}

func TestZonedTrimAndWriteZeroesKeepTheZoneRules(t *testing.T) {
	data := bytes.Repeat([]byte{0xab}, 64<<10)
	for _, tc := range []struct {
		name    string
		op      func(v *Zoned) error
		wantErr error
		wantWP  int64 // of zone 1, which holds 64 KiB of data before the op
	}{
		{"trim of a whole sequential zone resets it", func(v *Zoned) error { return v.Trim(zoneSize, zoneSize) }, nil, 0},
		{"trim of part of a sequential zone is refused", func(v *Zoned) error { return v.Trim(zoneSize, 4096) }, zoned.ErrUnaligned, 64 << 10},
		{"trim of the conventional zone discards", func(v *Zoned) error { return v.Trim(0, zoneSize) }, nil, 64 << 10},
		{"zeros at the write pointer are written", func(v *Zoned) error { return v.WriteZeroes(zoneSize+64<<10, 8192, false, false) }, nil, 64<<10 + 8192},
		{"zeros off the write pointer are refused", func(v *Zoned) error { return v.WriteZeroes(zoneSize, 8192, false, false) }, zoned.ErrNotAtWritePointer, 64 << 10},
		{"fast zeros in a sequential zone are not supported", func(v *Zoned) error { return v.WriteZeroes(zoneSize+64<<10, 8192, false, true) }, syscall.ENOTSUP, 64 << 10},
		{"zeros from the conventional into a sequential zone are refused", func(v *Zoned) error { return v.WriteZeroes(zoneSize-4096, 8192, false, false) }, zoned.ErrCrossesZone, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := zonedVolume(t)
			if err := v.WriteAt(data, zoneSize); err != nil {
				t.Fatal(err)
			}
			if err := v.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			err := tc.op(v)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if got := wp(t, v, 1); got != tc.wantWP {
				t.Fatalf("zone 1 write pointer %#x, want %#x", got, tc.wantWP)
			}
		})
	}
}

func TestErrno(t *testing.T) {
	v := zonedVolume(t)
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{image.ErrReadOnly, syscall.EPERM},
		{zoned.ErrNotAtWritePointer, syscall.EINVAL},
		{zoned.ErrOpenResources, syscall.ETOOMANYREFS},
		{errors.New("disk on fire"), syscall.EIO},
	} {
		if got := v.Errno(tc.err); got != tc.want {
			t.Errorf("Zoned.Errno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{image.ErrReadOnly, syscall.EPERM},
		{image.ErrOutOfRange, syscall.EINVAL},
		{syscall.ENOSPC, syscall.ENOSPC},
		{errors.New("disk on fire"), syscall.EIO},
	} {
		if got := (Plain{}).Errno(tc.err); got != tc.want {
			t.Errorf("Plain.Errno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestZonedOrderKey(t *testing.T) {
	v := zonedVolume(t)
	if _, ordered := v.OrderKey(4096); ordered {
		t.Error("a write to the conventional zone is ordered")
	}
	if key, ordered := v.OrderKey(3*zoneSize + 4096); !ordered || key != 3 {
		t.Errorf("OrderKey in zone 3 = %d, %v", key, ordered)
	}
}

func TestOpenPicksTheBackend(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain.qcow2")
	if err := image.Create(plain, image.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := Open(plain, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := v.Backend.(Plain); !ok || v.Zones() != nil || !v.Img.ReadOnly() {
		t.Fatalf("plain image: backend %T, zones %v, read-only %v", v.Backend, v.Zones(), v.Img.ReadOnly())
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	z := zonedVolume(t)
	if z.Dev.Geometry().NumZones() != 8 || z.Img.ReadOnly() {
		t.Fatalf("zoned image: %d zones, read-only %v", z.Dev.Geometry().NumZones(), z.Img.ReadOnly())
	}
}

func TestTagIdentifiesTheImageByItsAbsolutePath(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	if Tag(a) == 0 || Tag(a) != Tag("a.qcow2") || Tag(a) == Tag(b) {
		t.Fatalf("Tag(%s)=%#x, Tag(a.qcow2)=%#x, Tag(%s)=%#x", a, Tag(a), Tag("a.qcow2"), b, Tag(b))
	}
	if id := BackendID(a); len(id) != len("zq-csi:")+16 || id == BackendID(b) {
		t.Fatalf("BackendID %q", id)
	}
}

// After AcceptReplays (a frontend took over a dead server's device), a
// write the dead server had applied (below the zone's write pointer of that
// moment, with the same data) succeeds, in any order, until the zone is
// reset; different data, or a range past that pointer, is refused.
func TestZonedAcceptsReplaysBelowTheRecoveredWritePointer(t *testing.T) {
	z := zonedVolume(t)
	a, b := bytes.Repeat([]byte{0xaa}, 4096), bytes.Repeat([]byte{0xbb}, 4096)
	seq := int64(z.Dev.Geometry().ConventionalZones) * zoneSize // the first sequential zone
	next := seq + zoneSize
	for _, off := range []int64{seq, next} { // applied by the "dead server"
		if err := z.WriteAt(a, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := z.WriteAt(a, seq); !errors.Is(err, zoned.ErrNotAtWritePointer) {
		t.Fatalf("a repeat before AcceptReplays: %v, want ErrNotAtWritePointer", err)
	}
	z.AcceptReplays()
	if err := z.WriteAt(b, seq); !errors.Is(err, zoned.ErrNotAtWritePointer) {
		t.Fatalf("a resend with different data: %v, want ErrNotAtWritePointer", err)
	}
	if err := z.WriteAt(a, seq); err != nil {
		t.Fatalf("a resend of the applied write: %v", err)
	}
	if got := wp(t, z, int(seq/zoneSize)); got != 4096 {
		t.Fatalf("write pointer %#x after the resend, want unchanged 0x1000", got)
	}
	if err := z.WriteAt(b, seq+4096); err != nil {
		t.Fatalf("write at the write pointer: %v", err)
	}
	// A resend may come after a newer write (nbd keeps no order per zone).
	if err := z.WriteAt(a, seq); err != nil {
		t.Fatalf("a resend after a newer write: %v", err)
	}
	// What was written after the recovery is no resend.
	if err := z.WriteAt(b, seq+4096); !errors.Is(err, zoned.ErrNotAtWritePointer) {
		t.Fatalf("a repeat of a write made after the recovery: %v, want ErrNotAtWritePointer", err)
	}
	// A reset ends the window: the zone's data changed.
	if err := z.Reset(next, zoneSize); err != nil {
		t.Fatal(err)
	}
	if err := z.WriteAt(a, next); err != nil {
		t.Fatalf("write at the reset zone's start: %v", err)
	}
	if err := z.WriteAt(a, next); !errors.Is(err, zoned.ErrNotAtWritePointer) {
		t.Fatalf("a repeat after a reset: %v, want ErrNotAtWritePointer", err)
	}
}
