package ublk

import (
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/volume"
)

// serve runs one request from the kernel on the device's backend and
// returns its result for the commit. Its data moves through the queue
// (copyIn, copyOut).
func (q *queue) serve(tag uint16, r iod) completion {
	d := q.dev
	n, lba, err := q.handle(int(tag), r)
	res := int32(n)
	if int(r.op) < len(d.ops) {
		d.ops[r.op].Add(1)
	}
	if err != nil {
		d.failed.Add(1)
		d.logFailure(r, err)
		res = -int32(d.errno(err))
	}
	return completion{tag: tag, result: res, lba: lba}
}

// logFailure logs a failed request, at most one a second: an application
// that keeps writing where it may not must not flood the log.
func (d *Device) logFailure(r iod, err error) {
	d.logMu.Lock()
	now := time.Now()
	if now.Sub(d.lastLog) < time.Second {
		d.suppressed++
		d.logMu.Unlock()
		return
	}
	n := d.suppressed
	d.lastLog, d.suppressed = now, 0
	d.logMu.Unlock()
	more := ""
	if n > 0 {
		more = fmt.Sprintf(" (and %d more failed requests not logged)", n)
	}
	d.logf("ublk device %d: op %d at sector %#x+%#x: %v%s", d.info.ID, r.op, r.startSector, r.nrSectors, err, more)
}

// Stats counts the requests a device served since it started, by kind.
type Stats struct {
	Reads, Writes, Flushes, Discards, WriteZeroes    uint64
	ZoneAppends, ZoneManagement, ZoneReports, Errors uint64
}

// Stats returns the device's request counts.
func (d *Device) Stats() Stats {
	n := func(ops ...uint8) (sum uint64) {
		for _, op := range ops {
			sum += d.ops[op].Load()
		}
		return sum
	}
	return Stats{
		Reads: n(opReadIO), Writes: n(opWriteIO), Flushes: n(opFlush), Discards: n(opDiscard),
		WriteZeroes: n(opWriteZeroes), ZoneAppends: n(opZoneAppend),
		ZoneManagement: n(opZoneOpen, opZoneClose, opZoneFinish, opZoneReset, opZoneResetAll),
		ZoneReports:    n(opReportZones), Errors: d.failed.Load(),
	}
}

// handle returns the bytes done (the result the kernel wants for requests
// with data) and, for a zone append, the sector where the data landed.
func (q *queue) handle(tag int, r iod) (n int, lba uint64, err error) {
	d := q.dev
	off := int64(r.startSector) * volume.SectorSize
	n = int(r.nrSectors) * volume.SectorSize
	switch r.op {
	case opReadIO:
		buf := d.bufs.Get(n)
		defer d.bufs.Put(buf)
		if err = d.b.ReadAt(buf, off); err == nil {
			err = q.copyOut(tag, buf)
		}
		return n, 0, err
	case opWriteIO:
		buf := d.bufs.Get(n)
		defer d.bufs.Put(buf)
		if err = q.copyIn(tag, buf); err == nil {
			err = d.b.WriteAt(buf, off)
		}
		if err == nil && r.flags&ioFlagFUA != 0 {
			err = d.b.Flush()
		}
		return n, 0, err
	case opFlush:
		return 0, 0, d.b.Flush()
	case opDiscard:
		return 0, 0, d.b.Trim(off, int64(n))
	case opWriteZeroes:
		return 0, 0, d.b.WriteZeroes(off, int64(n), r.flags&ioFlagNoUnmap != 0, false)
	}
	if d.zones == nil {
		return 0, 0, fmt.Errorf("operation %d on a device without zones: %w", r.op, syscall.EOPNOTSUPP)
	}
	switch r.op {
	case opZoneAppend:
		buf := d.bufs.Get(n)
		defer d.bufs.Put(buf)
		if err = q.copyIn(tag, buf); err != nil {
			return 0, 0, err
		}
		at, err := d.zones.Append(buf, off)
		if err == nil && r.flags&ioFlagFUA != 0 {
			err = d.b.Flush()
		}
		return n, uint64(at / volume.SectorSize), err
	case opReportZones:
		n, err = q.report(tag, off, int(r.nrSectors))
		return n, 0, err
	case opZoneOpen:
		return 0, 0, d.zones.Open(off, d.zones.Geometry().ZoneSize)
	case opZoneClose:
		return 0, 0, d.zones.Close(off, d.zones.Geometry().ZoneSize)
	case opZoneFinish:
		return 0, 0, d.zones.Finish(off, d.zones.Geometry().ZoneSize)
	case opZoneReset:
		return 0, 0, d.zones.Reset(off, d.zones.Geometry().ZoneSize)
	case opZoneResetAll:
		return 0, 0, d.zones.ResetAll()
	}
	return 0, 0, fmt.Errorf("unknown operation %d: %w", r.op, syscall.EOPNOTSUPP)
}

// report answers REPORT_ZONES: up to nr zones from the one at off, as
// struct blk_zone entries. The kernel's buffer may be larger than the zones
// asked for, and a short result would make it reissue the request for the
// rest, so the entries are followed by zeros (a zero-length entry ends the
// report) up to the buffer's end.
func (q *queue) report(tag int, off int64, nr int) (int, error) {
	d := q.dev
	g := d.zones.Geometry()
	zones := d.zones.Report(g.ZoneIndex(off), nr)
	if len(zones) == 0 {
		return 0, fmt.Errorf("report zones at %#x: outside the device: %w", off, syscall.EINVAL)
	}
	buf := d.bufs.Get(len(zones) * blkZoneSize)
	defer d.bufs.Put(buf)
	const s = volume.SectorSize
	for i, z := range zones {
		putBlkZone(buf[i*blkZoneSize:], uint64(z.Start/s), uint64(z.Length/s), uint64(z.WritePointer/s),
			uint64(z.Capacity/s), uint8(z.Type), uint8(z.Cond), z.ResetRecommended)
	}
	if err := q.copyOut(tag, buf); err != nil {
		return 0, err
	}
	done := len(buf)
	zeros := d.bufs.Get(pageSize)
	defer d.bufs.Put(zeros)
	clear(zeros)
	for {
		chunk := zeros[:pageSize-done%pageSize]
		n, err := unix.Pwrite(q.charFD, chunk, q.dataAt(tag, int64(done)))
		switch {
		case err == unix.EINVAL || (err == nil && n == 0):
			// The end of the kernel's buffer: nothing more to copy
			// (0 bytes, or EINVAL just past the end).
			return done, nil
		case err != nil:
			return 0, fmt.Errorf("zeroing the report of request %d after %d bytes: %w", tag, done, err)
		}
		done += n
	}
}

const pageSize = 4096

// errno is the result for a failed request. The kernel checked the
// request's shape already, so an EINVAL from the zone rules (a write off
// the write pointer, past the capacity, across zones) is reported as EIO,
// as Linux's zoned drivers do; the resource errnos keep their meaning
// (they become BLK_STS_ZONE_*_RESOURCE).
func (d *Device) errno(err error) syscall.Errno {
	e := d.b.Errno(err)
	if e == syscall.EINVAL || e == 0 {
		return syscall.EIO
	}
	return e
}
