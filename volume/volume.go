// Package volume is an image as the block device the kernel frontends
// (ublk, nbd) serve: the block operations of a plain image, or of a
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
	// CheckAppend returns the error an append of n bytes at off gets
	// whatever the zone's state (not a zone start, a size the geometry
	// refuses), before the caller gathers the data.
	CheckAppend(off, n int64) error
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
	// Such a write lands below the zone's write pointer of that moment
	// with the data already there, and succeeds, until the zone is reset
	// or finished.
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
	// path is the image file, beside which SetCondition keeps the zone
	// conditions faults injected (conditions.go); "" keeps them in memory.
	path string
	// replayBelow, set by AcceptReplays, is per zone the write pointer
	// below which a resent write is accepted; -1 once the zone changed.
	replayBelow []atomic.Int64
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

// WriteAt writes p at off, accepting a resent write after AcceptReplays.
func (b *Zoned) WriteAt(p []byte, off int64) error {
	if err := b.writable("write", off); err != nil {
		return err
	}
	_, err := b.Dev.WriteAt(p, off)
	if errors.Is(err, zoned.ErrNotAtWritePointer) && b.replayed(p, off) {
		return nil
	}
	return err
}
func (b *Zoned) Flush() error { return b.Dev.Flush() }
func (b *Zoned) Zones() Zones { return b }

func (b *Zoned) Geometry() Geometry             { return b.Dev.Geometry() }
func (b *Zoned) Report(first, n int) []Zone     { return b.Dev.Report(first, n) }
func (b *Zoned) ZoneAt(off int64) (Zone, error) { return b.Dev.ZoneAt(off) }
func (b *Zoned) Append(p []byte, off int64) (int64, error) {
	if err := b.writable("append", off); err != nil {
		return 0, err
	}
	return b.Dev.Append(p, off)
}

func (b *Zoned) CheckAppend(off, n int64) error { return b.Dev.CheckAppend(off, n) }

func (b *Zoned) WriteFrom(r io.Reader, off, n int64) error {
	if err := b.writable("write", off); err != nil {
		return err
	}
	return b.Dev.WriteFrom(r, off, n)
}

// writable refuses a change to a read-only image before the zone model
// sees it: the model would take the zone's resources first.
func (b *Zoned) writable(op string, off int64) error {
	if b.Img.ReadOnly() {
		return fmt.Errorf("%s at %#x: %w", op, off, image.ErrReadOnly)
	}
	return nil
}

func (b *Zoned) Open(off, length int64) error {
	if err := b.writable("zone open", off); err != nil {
		return err
	}
	return b.Dev.Open(off, length)
}

func (b *Zoned) Close(off, length int64) error {
	if err := b.writable("zone close", off); err != nil {
		return err
	}
	return b.Dev.Close(off, length)
}

func (b *Zoned) Finish(off, length int64) error {
	if err := b.writable("zone finish", off); err != nil {
		return err
	}
	if err := b.Dev.Finish(off, length); err != nil {
		return err
	}
	b.replaysEnd(off, length)
	return nil
}

func (b *Zoned) Reset(off, length int64) error {
	if err := b.writable("zone reset", off); err != nil {
		return err
	}
	if err := b.Dev.Reset(off, length); err != nil {
		return err
	}
	b.replaysEnd(off, length)
	return nil
}

func (b *Zoned) ResetAll() error {
	if err := b.writable("zone reset all", 0); err != nil {
		return err
	}
	if err := b.Dev.ResetAll(); err != nil {
		return err
	}
	b.replaysEnd(0, b.Dev.Geometry().Size)
	return nil
}

// AcceptReplays records each zone's write pointer: until the zone is
// reset or finished, a write that lies wholly below it and holds the data
// already there is a resent one, and succeeds. Nothing else about the
// order of the resent writes is assumed (on nbd the kernel sees a plain
// disk and may resend two writes to one zone in either order).
func (b *Zoned) AcceptReplays() {
	zones := b.Dev.Report(0, b.Dev.Geometry().NumZones())
	b.replayBelow = make([]atomic.Int64, len(zones))
	for i, z := range zones {
		b.replayBelow[i].Store(z.WritePointer)
	}
}

// replaysEnd closes the window of the zones in [off, off+length): their
// data changed.
func (b *Zoned) replaysEnd(off, length int64) {
	if b.replayBelow == nil {
		return
	}
	g := b.Dev.Geometry()
	for i := max(g.ZoneIndex(off), 0); i < len(b.replayBelow) && int64(i)*g.ZoneSize < off+length; i++ {
		b.replayBelow[i].Store(-1)
	}
}

// replayed reports whether p at off is a resent write: below its zone's
// write pointer at AcceptReplays, with the data the zone holds there.
func (b *Zoned) replayed(p []byte, off int64) bool {
	if b.replayBelow == nil {
		return false
	}
	i := b.Dev.Geometry().ZoneIndex(off)
	if i < 0 || off+int64(len(p)) > b.replayBelow[i].Load() {
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
		if err := b.Dev.ZeroConventional(off, min(end, ce)-off, b.Img.Discard); err != nil {
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
		return b.Dev.ZeroConventional(off, length, func(off, n int64) error { return b.Img.WriteZeroes(off, n, !noHole) })
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
