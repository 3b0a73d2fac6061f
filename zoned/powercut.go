package zoned

import (
	"errors"
	"fmt"
	"sync"
)

// volatileCache is what a Device with a volatile write cache keeps to undo
// everything since the last flush of its Store: the old bytes of the
// conventional blocks written since, and per zone the write pointer the
// Store last made durable (zone.flushed). Sequential zones need no copy of
// data: bytes at or past the write pointer read as zeros, so moving the
// pointer back drops them.
type volatileCache struct {
	// gate is held shared by every request and exclusively by a power
	// cut, which so sees no request in flight.
	gate sync.RWMutex
	mu   sync.Mutex
	// saved holds the pre-image of each conventional block written since
	// the last flush, by block number.
	saved map[int64][]byte
	// notify, if set, hears of each power cut a rule caused.
	notify func(PowerCutReport, error)
}

// undoBlock is the unit of the conventional pre-images.
const undoBlock = 4096

// SetVolatileCache gives the device a volatile write cache, as a drive
// with its write cache on has: writes are durable only after a flush, and
// PowerCut drops those that are not. Call it before the first request. It
// costs a copy of each conventional block's old bytes on its first write
// after a flush, and serialises conventional writes; a device without it
// pays nothing.
func (d *Device) SetVolatileCache() {
	d.vc = &volatileCache{saved: map[int64][]byte{}}
	for i := range d.zones {
		d.zones[i].flushed = d.zones[i].recorded
	}
}

// NotifyPowerCut has f called after each power cut a fault rule causes
// (not those PowerCut's callers ask for: they get the report). Call it
// before the first request.
func (d *Device) NotifyPowerCut(f func(PowerCutReport, error)) {
	if d.vc != nil {
		d.vc.notify = f
	}
}

// cutPower is a power cut a rule asked for.
func (d *Device) cutPower() {
	rep, err := d.PowerCut()
	if d.vc.notify != nil {
		d.vc.notify(rep, err)
	}
}

// VolatileCache reports whether SetVolatileCache was called.
func (d *Device) VolatileCache() bool { return d.vc != nil }

func (d *Device) enter() {
	if d.vc != nil {
		d.vc.gate.RLock()
	}
}

func (d *Device) leave() {
	if d.vc != nil {
		d.vc.gate.RUnlock()
	}
}

// writeConventional writes p at off in the conventional zones, keeping the
// pre-image of the blocks it changes first when the cache is volatile.
func (d *Device) writeConventional(p []byte, off int64) (n int, err error) {
	err = d.keepConventional(off, int64(len(p)), func() error {
		n, err = d.s.WriteAt(p, off)
		return err
	})
	return n, err
}

// keepConventional runs change, which alters [off, off+n) of the
// conventional zones, keeping first (with a volatile cache) the pre-image
// of the blocks not yet kept since the last flush.
func (d *Device) keepConventional(off, n int64, change func() error) error {
	if d.vc == nil {
		return change()
	}
	d.vc.mu.Lock()
	defer d.vc.mu.Unlock()
	convEnd := min(int64(d.g.ConventionalZones)*d.g.ZoneSize, d.g.Size)
	for b := off / undoBlock; b*undoBlock < off+n; b++ {
		if _, ok := d.vc.saved[b]; ok {
			continue
		}
		old := make([]byte, min(undoBlock, convEnd-b*undoBlock))
		if _, err := d.s.ReadAt(old, b*undoBlock); err != nil {
			return fmt.Errorf("volatile cache: keep block at %#x: %w", b*undoBlock, err)
		}
		d.vc.saved[b] = old
	}
	return change()
}

// flushStore flushes the Store; with a volatile cache, what it made durable
// becomes the state a power cut returns to.
func (d *Device) flushStore() error {
	if d.vc == nil {
		return d.s.Flush()
	}
	type mark struct {
		recorded int64
		gen      uint64
	}
	d.mu.Lock()
	marks := make([]mark, len(d.zones))
	for i := range d.zones {
		marks[i] = mark{d.zones[i].recorded, d.zones[i].gen}
	}
	d.mu.Unlock()
	d.vc.mu.Lock()
	saved := d.vc.saved
	d.vc.saved = map[int64][]byte{}
	d.vc.mu.Unlock()
	if err := d.s.Flush(); err != nil {
		// Nothing became durable: the older pre-images stay the ones to
		// restore.
		d.vc.mu.Lock()
		for b, old := range saved {
			d.vc.saved[b] = old
		}
		d.vc.mu.Unlock()
		return err
	}
	d.mu.Lock()
	for i, m := range marks {
		if z := &d.zones[i]; z.gen == m.gen {
			z.flushed = m.recorded
		}
	}
	d.mu.Unlock()
	return nil
}

// PowerCutReport says what a power cut dropped.
type PowerCutReport struct {
	// Zones is how many sequential zones lost written data; Bytes how
	// much, with the conventional bytes restored (whole undo blocks).
	Zones int
	Bytes int64
}

// PowerCut drops everything written since the Store's last flush, as a
// power loss does to a drive's volatile cache: each sequential zone's write
// pointer goes back to its last durable value (an open zone comes back
// closed, or empty), conventional blocks get their old bytes back, and the
// device serves on from that state. Zone management that the Store made
// durable stays (a reset flushes; a finish is durable at the next flush),
// and so do injected zone conditions. Requests in flight complete first;
// new ones wait for the cut.
func (d *Device) PowerCut() (PowerCutReport, error) {
	if d.vc == nil {
		return PowerCutReport{}, ErrNoVolatileCache
	}
	d.vc.gate.Lock()
	defer d.vc.gate.Unlock()
	var rep PowerCutReport
	var errs []error
	d.mu.Lock()
	for i := d.g.ConventionalZones; i < len(d.zones); i++ {
		z := &d.zones[i]
		if z.wp != z.flushed {
			rep.Zones++
			rep.Bytes += max(z.wp-z.flushed, 0)
		}
		clear(z.pending)
		z.pending = z.pending[:0]
		z.failed, z.ackedEnd = nil, 0
		z.flushErr = nil
		z.gen++
		z.wp = z.flushed
		if z.cond != ReadOnly && z.cond != Offline {
			d.setCond(z, d.condAt(z))
		}
		if z.recorded != z.flushed {
			if err := d.s.SetWritePointer(i, z.flushed); err != nil {
				errs = append(errs, fmt.Errorf("zone %d: power cut: record write pointer %#x: %w", i, z.flushed, err))
				d.fail(i, z, err, z.flushed)
				continue
			}
			z.recorded = z.flushed
		}
	}
	d.flushErrs = 0
	d.mu.Unlock()

	d.vc.mu.Lock()
	for b, old := range d.vc.saved {
		if _, err := d.s.WriteAt(old, b*undoBlock); err != nil {
			errs = append(errs, fmt.Errorf("power cut: restore conventional block at %#x: %w", b*undoBlock, err))
		}
		rep.Bytes += int64(len(old))
	}
	d.vc.saved = map[int64][]byte{}
	d.vc.mu.Unlock()
	if err := d.s.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("power cut: flush: %w", err))
	}
	return rep, errors.Join(errs...)
}

// ZeroConventional makes [off, off+n), which must lie in the conventional
// zones, read as zeros by calling zero (the Store owner's own way: a
// discard, or zeros written in place) as a write the fault rules and the
// volatile cache see.
func (d *Device) ZeroConventional(off, n int64, zero func(off, n int64) error) error {
	convEnd := min(int64(d.g.ConventionalZones)*d.g.ZoneSize, d.g.Size)
	if off < 0 || n < 0 || off+n > convEnd {
		return fmt.Errorf("zero at %#x+%#x: conventional zones end at %#x: %w", off, n, convEnd, ErrOutOfRange)
	}
	in := d.inject(OpWrite, "write zeroes", off, n)
	if in.err != nil {
		return in.err // a partial zeroing would be a discard that half happened: none of it lands
	}
	d.enter()
	err := d.keepConventional(off, n, func() error { return zero(off, n) })
	d.leave()
	return d.after(in, err)
}
