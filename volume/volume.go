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
	"errors"
	"fmt"
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
	Map(off, length int64) ([]image.Extent, error)
	// Errno maps an error of the backend to an errno.
	Errno(err error) syscall.Errno
	// OrderKey says whether a write at off must run after the writes
	// received before it with the same key (a sequential zone), so that
	// a client's pipelined writes at the write pointer stay in order.
	OrderKey(off int64) (key int64, ordered bool)
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
func (b Plain) Map(off, length int64) ([]image.Extent, error) { return b.Img.Map(off, length) }
func (b Plain) Errno(err error) syscall.Errno                 { return imageErrno(err) }
func (b Plain) OrderKey(int64) (int64, bool)                  { return 0, false }

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
}

var _ Backend = Zoned{}

func (b Zoned) Size() int64    { return b.Dev.Geometry().Size }
func (b Zoned) ReadOnly() bool { return b.Img.ReadOnly() }
func (b Zoned) ReadAt(p []byte, off int64) error {
	_, err := b.Dev.ReadAt(p, off)
	return err
}
func (b Zoned) WriteAt(p []byte, off int64) error {
	_, err := b.Dev.WriteAt(p, off)
	return err
}
func (b Zoned) Flush() error { return b.Dev.Flush() }

func (b Zoned) convEnd() int64 {
	g := b.Dev.Geometry()
	return min(int64(g.ConventionalZones)*g.ZoneSize, g.Size)
}

// Trim discards the conventional part of the range and resets the
// sequential zones it covers, which it must cover whole.
func (b Zoned) Trim(off, length int64) error {
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

// zeroChunk bounds the buffer of zeros written into a sequential zone.
const zeroChunk = 1 << 20

var zeros = make([]byte, zeroChunk)

func (b Zoned) WriteZeroes(off, length int64, noHole, fast bool) error {
	ce := b.convEnd()
	end := off + length
	if end <= ce {
		return b.Img.WriteZeroes(off, length, !noHole)
	}
	if off < ce {
		return fmt.Errorf("write zeroes at %#x+%#x: from a conventional into a sequential zone: %w",
			off, length, zoned.ErrCrossesZone)
	}
	if fast {
		return fmt.Errorf("write zeroes at %#x: a sequential zone takes only written zeros: %w", off, syscall.ENOTSUP)
	}
	// Check the whole request before the first piece, so that a refused
	// request changes nothing.
	z, err := b.Dev.ZoneAt(off)
	if err != nil {
		return err
	}
	switch {
	case off%zoned.SectorSize != 0 || length%zoned.SectorSize != 0:
		return fmt.Errorf("write zeroes at %#x+%#x: %w", off, length, zoned.ErrUnaligned)
	case off != z.WritePointer:
		return fmt.Errorf("write zeroes at %#x, write pointer %#x: %w", off, z.WritePointer, zoned.ErrNotAtWritePointer)
	case end > z.Start+z.Capacity:
		return fmt.Errorf("write zeroes at %#x+%#x, zone capacity ends at %#x: %w", off, length, z.Start+z.Capacity, zoned.ErrBeyondCapacity)
	}
	for pos := off; pos < end; {
		n := min(end-pos, zeroChunk)
		if _, err := b.Dev.WriteAt(zeros[:n], pos); err != nil {
			return err
		}
		pos += n
	}
	return nil
}

func (b Zoned) Map(off, length int64) ([]image.Extent, error) { return b.Img.Map(off, length) }

func (b Zoned) Errno(err error) syscall.Errno {
	if errors.Is(err, image.ErrReadOnly) {
		return syscall.EPERM
	}
	return zoned.Errno(err)
}

func (b Zoned) OrderKey(off int64) (int64, bool) {
	g := b.Dev.Geometry()
	i := g.ZoneIndex(off)
	return int64(i), i >= g.ConventionalZones
}
