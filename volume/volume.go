// Package volume is an image as the block device the kernel frontends
// (ublk, nbdattach) serve: the block operations of a plain image, or of a
// zoned image through its zoned.Device, which keeps the zone rules (discard
// resets whole sequential zones, zeros in a sequential zone are a write at
// the write pointer) and maps errors to errnos. It binds the two lower
// layers (zoned.go): a zoned image is the zone device's Store, so that
// package zoned knows nothing of qcow2 and package image nothing of zones'
// rules.
package volume

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"syscall"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

// Backend is what a kernel frontend (ublk) or an NBD export serves. The
// frontend checks every request against Size and ReadOnly before calling it;
// its methods are called concurrently.
type Backend interface {
	Size() int64
	ReadOnly() bool
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64) error
	// Flush makes every completed write durable.
	Flush() error
	// Trim discards [off, off+length): it may read as zeros afterwards.
	Trim(off, length int64) error
	// WriteZeroes makes [off, off+length) read as zeros. With noHole the
	// space stays allocated; with fast it fails with ENOTSUP instead of
	// writing zeros slowly.
	WriteZeroes(off, length int64, noHole, fast bool) error
	// Map reports [off, off+length) as runs of data and zeros.
	Map(off, length int64) ([]Extent, error)
	// Errno maps an error of the backend to an errno.
	Errno(err error) syscall.Errno
	// OrderKey says whether a write at off must run after the writes
	// received before it with the same key (a sequential zone), so that
	// a client's pipelined writes at the write pointer stay in order.
	OrderKey(off int64) (key int64, ordered bool)
	// Zones is the zone side of a zoned volume; nil for a plain one.
	Zones() Zones
}

// The lower layers' shapes, for frontends that reach an image only through
// this package.
type (
	Geometry = zoned.Geometry
	Zone     = zoned.Zone
	Extent   = image.Extent // a run of Map: data or zeros
)

// SectorSize is the zone model's unit: offsets and lengths of zone
// requests, and write pointers, are multiples of it.
const SectorSize = zoned.SectorSize

// Zones is what a zoned volume serves besides blocks, every request checked
// by the zone model: reports, appends and zone management. Offsets name a
// zone by its start; a length covers whole zones.
type Zones interface {
	Geometry() Geometry
	// Report returns up to n zones from zone first.
	Report(first, n int) []Zone
	ZoneAt(off int64) (Zone, error)
	// Append writes p at the write pointer of the zone at off and
	// returns where it landed.
	Append(p []byte, off int64) (int64, error)
	// WriteFrom writes n bytes read from r at off as one request: one
	// the zone model refuses changes nothing, however long it is.
	WriteFrom(r io.Reader, off, n int64) error
	Open(off, length int64) error
	Close(off, length int64) error
	Finish(off, length int64) error
	Reset(off, length int64) error
	ResetAll() error
	// AcceptReplays is for a frontend that takes over a device whose
	// server died, before it serves: the kernel sends again the writes
	// that were in flight, some of which the dead server had applied.
	// Such a write lands below its zone's write pointer with the data
	// already there, and succeeds, until the zone's first write at the
	// write pointer, finish or reset (the kernel keeps one write per zone
	// in flight, so the reissued ones come first).
	AcceptReplays()
}

// Plain serves a plain (or zoned, ignoring its zones) image.
type Plain struct{ Img *image.Image }

var _ Backend = Plain{}

func (b Plain) Size() int64    { return b.Img.Size() }
func (b Plain) ReadOnly() bool { return b.Img.ReadOnly() }
func (b Plain) ReadAt(p []byte, off int64) error {
	_, err := b.Img.ReadAt(p, off)
	return err
}
func (b Plain) WriteAt(p []byte, off int64) error {
	_, err := b.Img.WriteAt(p, off)
	return err
}
func (b Plain) Flush() error                 { return b.Img.Flush() }
func (b Plain) Trim(off, length int64) error { return b.Img.Discard(off, length) }
func (b Plain) WriteZeroes(off, length int64, noHole, fast bool) error {
	return b.Img.WriteZeroes(off, length, !noHole)
}
func (b Plain) Map(off, length int64) ([]Extent, error) { return b.Img.Map(off, length) }
func (b Plain) Errno(err error) syscall.Errno           { return imageErrno(err) }
func (b Plain) OrderKey(int64) (int64, bool)            { return 0, false }
func (b Plain) Zones() Zones                            { return nil }

func imageErrno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, image.ErrReadOnly):
		return syscall.EPERM
	case errors.Is(err, image.ErrOutOfRange):
		return syscall.EINVAL
	}
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	return syscall.EIO
}

// Zoned serves a zoned image through its zoned.Device: writes obey
// the zone rules (at the write pointer, below the capacity, within the
// open and active limits), a refused request changes nothing. TRIM resets
// whole sequential zones and discards in conventional zones;
// WRITE_ZEROES in a sequential zone is a write of zeros at the write
// pointer; block status comes from the image's map.
type Zoned struct {
	Img *image.Image
	Dev *zoned.Device
	// replaying, set by AcceptReplays, has a flag per zone that may still
	// see a reissued write.
	replaying []atomic.Bool
}

var (
	_ Backend = (*Zoned)(nil)
	_ Zones   = (*Zoned)(nil)
)

func (b *Zoned) Size() int64    { return b.Dev.Geometry().Size }
func (b *Zoned) ReadOnly() bool { return b.Img.ReadOnly() }
func (b *Zoned) ReadAt(p []byte, off int64) error {
	_, err := b.Dev.ReadAt(p, off)
	return err
}

// WriteAt writes p at off, accepting a reissued write after AcceptReplays.
func (b *Zoned) WriteAt(p []byte, off int64) error {
	if err := b.writable("write", off); err != nil {
		return err
	}
	_, err := b.Dev.WriteAt(p, off)
	if err == nil {
		b.replayDone(off)
		return nil
	}
	if errors.Is(err, zoned.ErrNotAtWritePointer) && b.replayed(p, off) {
		return nil
	}
	return err
}
func (b *Zoned) Flush() error { return b.Dev.Flush() }
func (b *Zoned) Zones() Zones { return b }

func (b *Zoned) Geometry() Geometry                        { return b.Dev.Geometry() }
func (b *Zoned) Report(first, n int) []Zone                { return b.Dev.Report(first, n) }
func (b *Zoned) ZoneAt(off int64) (Zone, error)            { return b.Dev.ZoneAt(off) }
func (b *Zoned) Append(p []byte, off int64) (int64, error) { return b.Dev.Append(p, off) }
func (b *Zoned) WriteFrom(r io.Reader, off, n int64) error {
	if err := b.writable("write", off); err != nil {
		return err
	}
	return b.Dev.WriteFrom(r, off, n)
}

// writable refuses a write to a read-only image before the zone model
// sees it: the model would take the zone's resources first.
func (b *Zoned) writable(op string, off int64) error {
	if b.Img.ReadOnly() {
		return fmt.Errorf("%s at %#x: %w", op, off, image.ErrReadOnly)
	}
	return nil
}
func (b *Zoned) Open(off, length int64) error  { return b.Dev.Open(off, length) }
func (b *Zoned) Close(off, length int64) error { return b.Dev.Close(off, length) }
func (b *Zoned) Finish(off, length int64) error {
	b.replayDone(off)
	return b.Dev.Finish(off, length)
}
func (b *Zoned) Reset(off, length int64) error {
	b.replayDone(off)
	return b.Dev.Reset(off, length)
}
func (b *Zoned) ResetAll() error {
	for i := range b.replaying {
		b.replaying[i].Store(false)
	}
	return b.Dev.ResetAll()
}

func (b *Zoned) AcceptReplays() {
	b.replaying = make([]atomic.Bool, b.Dev.Geometry().NumZones())
	for i := range b.replaying {
		b.replaying[i].Store(true)
	}
}

func (b *Zoned) replayDone(off int64) {
	if b.replaying != nil {
		if i := b.Dev.Geometry().ZoneIndex(off); i >= 0 {
			b.replaying[i].Store(false)
		}
	}
}

// replayed reports whether p at off is a reissued write: its zone may
// still see one, and p is what the zone holds there already.
func (b *Zoned) replayed(p []byte, off int64) bool {
	if b.replaying == nil {
		return false
	}
	i := b.Dev.Geometry().ZoneIndex(off)
	if i < 0 || !b.replaying[i].Load() {
		return false
	}
	z, err := b.Dev.ZoneAt(off)
	if err != nil || off+int64(len(p)) > z.WritePointer {
		return false
	}
	have := make([]byte, len(p))
	if _, err := b.Dev.ReadAt(have, off); err != nil {
		return false
	}
	return bytes.Equal(have, p)
}

func (b *Zoned) convEnd() int64 {
	g := b.Dev.Geometry()
	return min(int64(g.ConventionalZones)*g.ZoneSize, g.Size)
}

// Trim discards the conventional part of the range and resets the
// sequential zones it covers, which it must cover whole.
func (b *Zoned) Trim(off, length int64) error {
	g := b.Dev.Geometry()
	end := off + length
	ce := b.convEnd()
	if end > ce {
		s := max(off, ce)
		first, err := b.Dev.ZoneAt(s)
		if err != nil {
			return err
		}
		last, err := b.Dev.ZoneAt(end - 1)
		if err != nil {
			return err
		}
		if s != first.Start || end != last.Start+last.Length {
			return fmt.Errorf("trim at %#x+%#x: partial sequential zone (zone size %#x): %w",
				off, length, g.ZoneSize, zoned.ErrUnaligned)
		}
	}
	if off < ce {
		if err := b.Img.Discard(off, min(end, ce)-off); err != nil {
			return err
		}
	}
	if end > ce {
		s := max(off, ce)
		return b.Dev.Reset(s, end-s)
	}
	return nil
}

func (b *Zoned) WriteZeroes(off, length int64, noHole, fast bool) error {
	if ce := b.convEnd(); off+length <= ce {
		return b.Img.WriteZeroes(off, length, !noHole)
	}
	if fast {
		return fmt.Errorf("write zeroes at %#x: a sequential zone takes only written zeros: %w", off, syscall.ENOTSUP)
	}
	return b.WriteFrom(zeros{}, off, length)
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func (b *Zoned) Map(off, length int64) ([]Extent, error) { return b.Img.Map(off, length) }

func (b *Zoned) Errno(err error) syscall.Errno {
	if errors.Is(err, image.ErrReadOnly) {
		return syscall.EPERM
	}
	return zoned.Errno(err)
}

func (b *Zoned) OrderKey(off int64) (int64, bool) {
	g := b.Dev.Geometry()
	i := g.ZoneIndex(off)
	return int64(i), i >= g.ConventionalZones
}
