package main

// zq-csi io on zoned images: writes through the zone model, and qemu-io's zone commands (zone_report/zrp, zone_open/zo,
// zone_close/zc, zone_finish/zf, zone_reset/zrs, zone_append/zap) with
// qemu-io's syntax and output:
//
//	zrp 0 1   start: 0x18000, len 0x8000, cap 0x6000, wptr 0x18000, zcond:1, [type: 2]
//	zap -p 48M 4k 4k
//	          After zap done, the append sector is 0x18008
//
// Offsets and lengths are bytes (with the usual suffixes); reports are in
// 512-byte sectors, in lower-case hexadecimal; zcond and type are decimal
// (a full zone is zcond:14), as qemu-io prints them.

import (
	"bytes"
	"fmt"
	"math"
	"syscall"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// errNotZoned: a zone command on a plain image. qemu-io says "Operation
// not supported" there too.
var errNotZoned = fmt.Errorf("%w: %w", volume.ErrNotZoned, syscall.ENOTSUP)

// openSession opens file for a session: a zoned image with its zone model
// (see volume.Open), read-write ones with the journal of writeOptions.
func openSession(file string, readOnly bool) (*volume.Volume, error) {
	opts := writeOptions()
	if readOnly {
		opts = image.OpenOptions{ReadOnly: true}
	}
	return volume.Open(file, opts)
}

// conventionalOnly refuses an operation (discard) on a zoned image that
// reaches a sequential zone: their data goes only with zone_reset.
// Ranges past the device end are left to the image to refuse.
func (s *ioSession) conventionalOnly(op string, off, length int64) error {
	g := s.zones.Geometry()
	convEnd := int64(g.ConventionalZones) * g.ZoneSize
	if off < 0 || length <= 0 || off >= g.Size || (off <= convEnd && length <= convEnd-off) {
		return nil
	}
	return &devError{op, fmt.Errorf("%s at %#x+%#x reaches sequential zone %d: only conventional zones can be discarded (zone_reset empties a sequential zone): %w",
		op, off, length, max(g.ZoneIndex(off), g.ConventionalZones), syscall.EOPNOTSUPP)}
}

// ioZoneReport is qemu-io's zone_report: nr zones from the zone holding
// off, one line each, in 512-byte sectors.
func ioZoneReport(s *ioSession, _ []opt, operands []string) error {
	off, nr, err := parseOffLen(operands)
	if err != nil {
		return err
	}
	const op = "zone report"
	if s.zones == nil {
		return &devError{op, errNotZoned}
	}
	if _, err := s.zones.ZoneAt(off); err != nil {
		return &devError{op, err}
	}
	first := s.zones.Geometry().ZoneIndex(off)
	for _, z := range s.zones.Report(first, int(min(nr, math.MaxInt32))) {
		fmt.Fprintf(s.out, "start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:%d, [type: %d]\n",
			z.Start/zoned.SectorSize, z.Length/zoned.SectorSize, z.Capacity/zoned.SectorSize,
			z.WritePointer/zoned.SectorSize, z.Cond, z.Type)
	}
	return nil
}

// ioZoneMgmt makes the run function of a zone management command (open,
// close, finish, reset), which prints nothing on success, as qemu-io.
func ioZoneMgmt(op string, f func(z volume.Zones, off, length int64) error) func(*ioSession, []opt, []string) error {
	return func(s *ioSession, _ []opt, operands []string) error {
		off, length, err := parseOffLen(operands)
		if err != nil {
			return err
		}
		if s.zones == nil {
			return &devError{op, errNotZoned}
		}
		if err := s.writable(op); err != nil {
			return err
		}
		if err := f(s.zones, off, length); err != nil {
			return &devError{op, err}
		}
		return nil
	}
}

// ioZoneAppend is qemu-io's zone_append: the buffers (each len bytes of
// pattern) go to the zone at off in one append request; with -p it prints
// the sector where the data landed. -P is zq-csi's: qemu-io always
// writes 0xcd.
func ioZoneAppend(s *ioSession, opts []opt, operands []string) error {
	pattern, printSector := byte(defaultWritePattern), false
	for _, o := range opts {
		switch o.name {
		case 'p':
			printSector = true
		case 'P':
			p, err := ParsePattern(o.arg)
			if err != nil {
				return &ioUsageError{err.Error()}
			}
			pattern = p
		}
	}
	off, err := ParseSize(operands[0])
	if err != nil {
		return &ioUsageError{fmt.Sprintf("offset: %v", err)}
	}
	lens := make([]int64, 0, len(operands)-1)
	var total int64
	for _, a := range operands[1:] {
		n, err := ParseSize(a)
		if err != nil {
			return &ioUsageError{fmt.Sprintf("length: %v", err)}
		}
		if n > maxIOBytes {
			return &ioUsageError{fmt.Sprintf("argument '%s' exceeds maximum size %d", a, maxIOBytes)}
		}
		if total > maxIOBytes-n {
			return &ioUsageError{fmt.Sprintf("the total number of bytes exceeds the maximum size %d", maxIOBytes)}
		}
		lens, total = append(lens, n), total+n
	}
	const op = "zone append"
	if s.zones == nil {
		return &devError{op, errNotZoned}
	}
	if err := s.writable(op); err != nil {
		return err
	}
	// Each buffer must be whole sectors, as each of qemu-io's iovecs.
	for k, n := range lens {
		if n%zoned.SectorSize != 0 {
			return &devError{op, fmt.Errorf("append at %#x: buffer %d of %d bytes is not a multiple of %d: %w",
				off, k+1, n, zoned.SectorSize, zoned.ErrUnaligned)}
		}
	}
	// Do not allocate what the device refuses.
	if err := s.zones.CheckAppend(off, total); err != nil {
		return &devError{op, err}
	}
	pos, err := s.zones.Append(bytes.Repeat([]byte{pattern}, int(total)), off)
	if err != nil {
		return &devError{op, err}
	}
	if printSector {
		fmt.Fprintf(s.out, "After zap done, the append sector is 0x%x\n", pos/zoned.SectorSize)
	}
	return nil
}
