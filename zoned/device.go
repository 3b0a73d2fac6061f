package zoned

import (
	"container/list"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
)

// Type is a zone's type, numbered as Linux's BLK_ZONE_TYPE_*.
type Type uint8

// Zone types.
const (
	Conventional            Type = 1
	SequentialWriteRequired Type = 2
)

func (t Type) String() string {
	switch t {
	case Conventional:
		return "conventional"
	case SequentialWriteRequired:
		return "sequential-write-required"
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Condition is a zone's condition, numbered as Linux's BLK_ZONE_COND_* (the
// zcond qemu-io prints).
type Condition uint8

// Zone conditions. Read-only and offline come only from injected faults
// (fault.go).
const (
	NotWritePointer Condition = 0x0
	Empty           Condition = 0x1
	ImplicitOpen    Condition = 0x2
	ExplicitOpen    Condition = 0x3
	Closed          Condition = 0x4
	Full            Condition = 0xE
)

func (c Condition) String() string {
	switch c {
	case NotWritePointer:
		return "not-write-pointer"
	case Empty:
		return "empty"
	case ImplicitOpen:
		return "implicit-open"
	case ExplicitOpen:
		return "explicit-open"
	case Closed:
		return "closed"
	case Full:
		return "full"
	case ReadOnly:
		return "read-only"
	case Offline:
		return "offline"
	}
	return fmt.Sprintf("Condition(%#x)", uint8(c))
}

// Zone is one zone as a report shows it. Length of the last zone may be
// shorter than the zone size. Conventional zones report their full length as
// capacity and their start as write pointer.
type Zone struct {
	Start, Length, Capacity, WritePointer int64
	Type                                  Type
	Cond                                  Condition
	// ResetRecommended is ZBC's "reset write pointer recommended"
	// attribute (blk_zone.reset), set only by an injected fault.
	ResetRecommended bool
}

// Store is the storage below a Device. Its methods are called concurrently
// (for disjoint ranges, except that a conventional zone gets whatever its
// users send).
type Store interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// WriteZeroes makes [off, off+length) read as zeros; it may free the space.
	WriteZeroes(off, length int64) error
	// Flush makes completed writes, the store's metadata and the recorded
	// write pointers durable, in that order.
	Flush() error
	// SetWritePointer records zone's write pointer (absolute byte offset)
	// for persistence; it is durable after the next Flush. The Device only
	// records a value once all data below it has been written (completed
	// WriteAt). It is called with the Device's lock held, to keep each
	// zone's recorded values in order, so it must not wait for I/O.
	SetWritePointer(zone int, wp int64) error
}

// reservation is a range of a sequential zone handed to one write or append
// whose data write has not been accounted for yet.
type reservation struct {
	start, end int64
	done       bool
	failed     bool // the data write failed and the range was not rolled back
}

type zone struct {
	start, length, capEnd int64
	cond                  Condition
	// wp is the write pointer as reported: the end of the last reservation,
	// or the zone end after finish.
	wp int64
	// recorded is the last value given to Store.SetWritePointer (or loaded).
	recorded int64
	// flushed is, with a volatile cache, the recorded value the Store
	// last made durable: where a power cut takes the write pointer back.
	flushed int64
	// pending holds the reservations in start order, from the lowest one
	// still in flight; completed ones wait there until those below finish.
	pending  []*reservation
	inflight int
	// busy: a finish or reset owns the zone; writes wait for it.
	busy bool
	// gen counts resets, so Flush can tell that a zone it waits on was
	// reset under it.
	gen uint64
	// failed is the cause of the zone's failure, nil while healthy.
	// failedAt is the lowest byte that can no longer become durable.
	failed   error
	failedAt int64
	// resetRecommended: an injected fault says a reset is recommended,
	// until the zone is reset.
	resetRecommended bool
	// ackedEnd is the end of the highest write reported as successful.
	ackedEnd int64
	// flushErr is reported by the next Flush: acknowledged writes that
	// cannot become durable.
	flushErr error
	lru      *list.Element
}

// Device is a zoned block device over a Store. It is safe for concurrent use.
type Device struct {
	s     Store
	g     Geometry
	mu    sync.Mutex
	cond  *sync.Cond // a reservation completed or a zone stopped being busy
	zones []zone
	// Resource counts, and the implicitly open zones by last write, least
	// recent at the front.
	nImp, nExp, nClosed int
	lru                 list.List
	inflight            int
	flushErrs           int
	faults              faultState
	vc                  *volatileCache // nil: writes are durable as the Store makes them
}

// New returns a Device over s. g is normalized (clamps applied silently: call
// Normalize first to get the notes). writePointers has one absolute byte
// offset per zone, as persisted, with the flag bits already masked off;
// entries of conventional zones are ignored. A sequential zone is empty when
// its write pointer is at its start, full when it is at or past its capacity,
// closed otherwise. Entries outside their zone (start <= wp <= start + zone
// size) or not sector-aligned are refused with an error naming the zone. A
// device may come up with more closed zones than max_active_zones allows (an
// image written with other limits); no further zone activates until enough of
// them are finished or reset.
func New(s Store, g Geometry, writePointers []int64) (*Device, error) {
	g, _, err := g.Normalize()
	if err != nil {
		return nil, err
	}
	nz := g.NumZones()
	if len(writePointers) != nz {
		return nil, fmt.Errorf("%w: %d write pointers for %d zones", ErrInvalidWritePointer, len(writePointers), nz)
	}
	d := &Device{s: s, g: g, zones: make([]zone, nz)}
	d.cond = sync.NewCond(&d.mu)
	for i := range d.zones {
		z := &d.zones[i]
		z.start = int64(i) * g.ZoneSize
		z.length = g.zoneLength(i)
		z.capEnd = z.start + g.zoneCapacity(i)
		z.wp = z.start
		if i < g.ConventionalZones {
			z.cond = NotWritePointer
			continue
		}
		wp := writePointers[i]
		if wp < z.start || wp > z.start+g.ZoneSize {
			return nil, fmt.Errorf("%w: zone %d: write pointer %#x outside the zone [%#x, %#x]",
				ErrInvalidWritePointer, i, wp, z.start, z.start+g.ZoneSize)
		}
		if wp%SectorSize != 0 {
			return nil, fmt.Errorf("%w: zone %d: write pointer %#x is not a multiple of %d",
				ErrInvalidWritePointer, i, wp, SectorSize)
		}
		// QEMU finishes a short last zone to start + zone size, past the
		// device end; report it at the zone end like any finished zone.
		wp = min(wp, z.start+z.length)
		z.wp, z.recorded = wp, wp
		d.setCond(z, d.condAt(z))
	}
	return d, nil
}

// Geometry returns the device's normalized geometry.
func (d *Device) Geometry() Geometry { return d.g }

// Report returns up to n zones starting with zone firstZone; nil when
// firstZone is outside the device.
func (d *Device) Report(firstZone, n int) []Zone {
	if firstZone < 0 || firstZone >= len(d.zones) || n <= 0 {
		return nil
	}
	n = min(n, len(d.zones)-firstZone)
	out := make([]Zone, n)
	d.mu.Lock()
	defer d.mu.Unlock()
	for k := range out {
		out[k] = d.zoneInfo(firstZone + k)
	}
	return out
}

// ZoneAt returns the zone holding byte off.
func (d *Device) ZoneAt(off int64) (Zone, error) {
	i := d.g.ZoneIndex(off)
	if i < 0 {
		return Zone{}, fmt.Errorf("zone at %#x, device size %#x: %w", off, d.g.Size, ErrOutOfRange)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.zoneInfo(i), nil
}

// Resources returns how many zones hold an open and an active resource.
func (d *Device) Resources() (open, active int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.open(), d.active()
}

func (d *Device) zoneInfo(i int) Zone {
	z := &d.zones[i]
	info := Zone{Start: z.start, Length: z.length, Capacity: z.capEnd - z.start, WritePointer: z.wp, Cond: z.cond,
		ResetRecommended: z.resetRecommended}
	if d.sequential(i) {
		info.Type = SequentialWriteRequired
	} else {
		info.Type = Conventional
	}
	return info
}

func (d *Device) sequential(i int) bool { return i >= d.g.ConventionalZones }

// ReadAt reads p at off. Bytes of sequential zones at or past the write
// pointer, and bytes of writes still in flight or failed, read as zeros.
// A read reaching an offline zone fails.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if d.unfaulted() {
		return d.readAt(p, off)
	}
	if in := d.inject(OpRead, "read", off, int64(len(p))); in.err != nil {
		return 0, in.err
	}
	d.enter()
	defer d.leave()
	return d.readAt(p, off)
}

func (d *Device) readAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	if off < 0 || off > d.g.Size || n > d.g.Size-off {
		return 0, fmt.Errorf("read at %#x+%#x, device size %#x: %w", off, n, d.g.Size, ErrOutOfRange)
	}
	if n == 0 {
		return 0, nil
	}
	end := off + n
	// holes are the ranges that read as zeros, in ascending order: zones
	// ascend, and within a zone the reservations ascend and end below wp.
	var holes [][2]int64
	add := func(a, b int64) {
		a, b = max(a, off), min(b, end)
		if a < b {
			holes = append(holes, [2]int64{a, b})
		}
	}
	if last := d.g.ZoneIndex(end - 1); d.sequential(last) {
		d.mu.Lock()
		for i := max(d.g.ZoneIndex(off), d.g.ConventionalZones); i <= last; i++ {
			z := &d.zones[i]
			if err := condErr(z.cond, false); err != nil {
				d.mu.Unlock()
				return 0, fmt.Errorf("zone %d: read at %#x+%#x: %w", i, off, n, err)
			}
			for _, r := range z.pending {
				if !r.done || r.failed {
					add(r.start, r.end)
				}
			}
			add(min(z.wp, z.capEnd), z.start+z.length)
		}
		d.mu.Unlock()
	}
	pos := off
	read := func(a, b int64) error {
		m, err := d.s.ReadAt(p[a-off:b-off], a)
		if err != nil && !(errors.Is(err, io.EOF) && int64(m) == b-a) {
			return fmt.Errorf("read at %#x+%#x: %w", a, b-a, err)
		}
		return nil
	}
	for _, h := range holes {
		if pos < h[0] {
			if err := read(pos, h[0]); err != nil {
				return 0, err
			}
		}
		clear(p[h[0]-off : h[1]-off])
		pos = h[1]
	}
	if pos < end {
		if err := read(pos, end); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// WriteAt is a regular write. Conventional zones take writes anywhere (a
// write may span several conventional zones). A write to a sequential zone
// must be sector-aligned, begin exactly at the write pointer, stay inside the
// zone and end at or before its capacity; it opens the zone per the limits,
// closing the least-recently-written implicitly open zone if needed. On a
// refused write nothing is written and no state changes; on a failed data
// write see the failure rule in the package documentation.
func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	if d.unfaulted() {
		return d.writeAt(p, off)
	}
	in := d.inject(OpWrite, "write", off, int64(len(p)))
	if in.err != nil {
		if in.partial == 0 {
			return 0, in.err
		}
		p = p[:min(in.partial, int64(len(p)))]
	}
	d.enter()
	m, err := d.writeAt(p, off)
	d.leave()
	return m, d.after(in, err)
}

// after finishes a request the fault rules touched: a partial write's
// injected error once its bytes landed, a power cut once it completed.
func (d *Device) after(in injection, err error) error {
	if in.powerCut {
		d.cutPower()
	}
	if err == nil {
		err = in.err
	}
	return err
}

func (d *Device) writeAt(p []byte, off int64) (int, error) {
	n := int64(len(p))
	i, sequential, err := d.checkWrite(off, n)
	if err != nil || n == 0 {
		return 0, err
	}
	if !sequential {
		m, err := d.writeConventional(p, off)
		if err != nil {
			err = fmt.Errorf("write at %#x+%#x: %w", off, n, err)
		}
		return m, err
	}
	r, err := d.reserve(i, off, n, "write")
	if err != nil {
		return 0, err
	}
	if err := d.writeReserved(i, r, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// checkWrite checks what a write of n bytes at off may do whatever the
// zone's state: stay on the device, in one zone (or in the conventional
// ones), in whole sectors in a sequential zone. It returns the zone and
// whether it is sequential; reserve checks the rest under the lock.
func (d *Device) checkWrite(off, n int64) (zone int, sequential bool, err error) {
	if off < 0 || n < 0 || off > d.g.Size || n > d.g.Size-off {
		return 0, false, fmt.Errorf("write at %#x+%#x, device size %#x: %w", off, n, d.g.Size, ErrWritePastEnd)
	}
	if n == 0 {
		return 0, false, nil
	}
	i := d.g.ZoneIndex(off)
	if !d.sequential(i) {
		if last := d.g.ZoneIndex(off + n - 1); d.sequential(last) {
			return 0, false, fmt.Errorf("write at %#x+%#x: from conventional zone %d into sequential zone %d: %w",
				off, n, i, last, ErrCrossesZone)
		}
		return i, false, nil
	}
	if off%SectorSize != 0 || n%SectorSize != 0 {
		return 0, false, fmt.Errorf("zone %d: write at %#x+%#x: not a multiple of %d: %w", i, off, n, SectorSize, ErrUnaligned)
	}
	if z := &d.zones[i]; off+n > z.start+z.length {
		return 0, false, fmt.Errorf("zone %d: write at %#x+%#x: zone ends at %#x: %w", i, off, n, z.start+z.length, ErrCrossesZone)
	}
	return i, true, nil
}

// WriteFrom writes n bytes read from r at off, as one request: the zone
// rules are checked on the whole range before anything is written, so a
// request the device refuses changes nothing however long it is. The data
// goes to the store in pieces of at most writeFromChunk bytes.
func (d *Device) WriteFrom(r io.Reader, off, n int64) error {
	in := d.inject(OpWrite, "write", off, n)
	if in.err != nil {
		if in.partial == 0 {
			return in.err
		}
		n = min(in.partial, n)
	}
	d.enter()
	err := d.writeFrom(r, off, n)
	d.leave()
	return d.after(in, err)
}

func (d *Device) writeFrom(r io.Reader, off, n int64) error {
	i, sequential, err := d.checkWrite(off, n)
	if err != nil || n == 0 {
		return err
	}
	buf := make([]byte, min(n, writeFromChunk))
	write := d.s.WriteAt
	if !sequential {
		write = d.writeConventional
	}
	pieces := func() error {
		for done := int64(0); done < n; {
			p := buf[:min(n-done, int64(len(buf)))]
			if _, err := io.ReadFull(r, p); err != nil {
				return fmt.Errorf("write at %#x: reading the data: %w", off+done, err)
			}
			m, err := write(p, off+done)
			if err == nil && m != len(p) {
				err = io.ErrShortWrite
			}
			if err != nil {
				return fmt.Errorf("at %#x: %w", off+done, err)
			}
			done += int64(len(p))
		}
		return nil
	}
	if !sequential {
		if err := pieces(); err != nil {
			return fmt.Errorf("write at %#x+%#x: %w", off, n, err)
		}
		return nil
	}
	res, err := d.reserve(i, off, n, "write")
	if err != nil {
		return err
	}
	return d.complete(i, res, pieces())
}

// writeFromChunk bounds the buffer of WriteFrom.
const writeFromChunk = 1 << 20

// Append writes p at zoneStart's write pointer and returns the offset where
// the data landed. zoneStart must be the start of a sequential zone, p a
// non-empty multiple of 512 bytes no larger than MaxAppendBytes that fits
// below the zone capacity.
func (d *Device) Append(p []byte, zoneStart int64) (int64, error) {
	n := int64(len(p))
	if err := d.CheckAppend(zoneStart, n); err != nil {
		return 0, err
	}
	if d.unfaulted() {
		return d.appendAt(p, d.g.ZoneIndex(zoneStart))
	}
	in := d.inject(OpWrite, "append", zoneStart, n)
	if in.err != nil {
		if in.partial == 0 {
			return 0, in.err
		}
		p = p[:min(in.partial, n)]
	}
	d.enter()
	at, err := d.appendAt(p, d.g.ZoneIndex(zoneStart))
	d.leave()
	return at, d.after(in, err)
}

func (d *Device) appendAt(p []byte, i int) (int64, error) {
	r, err := d.reserve(i, -1, int64(len(p)), "append")
	if err != nil {
		return 0, err
	}
	if err := d.writeReserved(i, r, p); err != nil {
		return 0, err
	}
	return r.start, nil
}

// CheckAppend returns the error Append would return for n bytes at
// zoneStart whatever the zone's state: not a sequential zone's start, or a
// size the geometry refuses. A caller can check before it gathers the data.
func (d *Device) CheckAppend(zoneStart, n int64) error {
	i := d.g.ZoneIndex(zoneStart)
	switch {
	case i < 0:
		return fmt.Errorf("append at %#x, device size %#x: %w", zoneStart, d.g.Size, ErrOutOfRange)
	case zoneStart%d.g.ZoneSize != 0:
		return fmt.Errorf("append at %#x: not a zone start: %w", zoneStart, ErrUnaligned)
	case !d.sequential(i):
		return fmt.Errorf("zone %d: append: %w", i, ErrConventionalZone)
	case n <= 0 || n%SectorSize != 0:
		return fmt.Errorf("zone %d: append of %#x bytes: not a positive multiple of %d: %w", i, n, SectorSize, ErrUnaligned)
	case n > d.g.MaxAppendBytes:
		return fmt.Errorf("zone %d: append of %#x bytes, max_append_bytes %#x: %w", i, n, d.g.MaxAppendBytes, ErrAppendTooLarge)
	}
	return nil
}

// reserve checks a write of n bytes at off (off < 0: an append, at the write
// pointer) against zone i's state, opens the zone if needed and hands out the
// range. Nothing changes when it fails.
func (d *Device) reserve(i int, off, n int64, what string) (*reservation, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	z := &d.zones[i]
	for z.busy {
		d.cond.Wait()
	}
	if off < 0 {
		off = z.wp
	}
	if err := condErr(z.cond, true); err != nil {
		return nil, fmt.Errorf("zone %d: %s at %#x: %w", i, what, off, err)
	}
	switch {
	case z.failed != nil:
		return nil, fmt.Errorf("zone %d: %s at %#x: %w (%w)", i, what, off, ErrZoneFailed, z.failed)
	case z.cond == Full:
		return nil, fmt.Errorf("zone %d: %s at %#x: zone is full: %w", i, what, off, ErrBeyondCapacity)
	case off != z.wp:
		return nil, fmt.Errorf("zone %d: %s at %#x, write pointer at %#x: %w", i, what, off, z.wp, ErrNotAtWritePointer)
	case off+n > z.capEnd:
		return nil, fmt.Errorf("zone %d: %s at %#x+%#x, capacity ends at %#x: %w", i, what, off, n, z.capEnd, ErrBeyondCapacity)
	}
	switch z.cond {
	case Empty, Closed:
		if err := d.acquireOpen(z); err != nil {
			return nil, fmt.Errorf("zone %d: %s at %#x: %w", i, what, off, err)
		}
		d.setCond(z, ImplicitOpen)
	case ImplicitOpen:
		d.lru.MoveToBack(z.lru)
	}
	r := &reservation{start: off, end: off + n}
	z.wp = r.end
	z.pending = append(z.pending, r)
	z.inflight++
	d.inflight++
	if z.wp == z.capEnd {
		d.setCond(z, Full)
	}
	return r, nil
}

// writeReserved writes the data of reservation r outside the lock and
// accounts for it.
func (d *Device) writeReserved(i int, r *reservation, p []byte) error {
	m, err := d.s.WriteAt(p, r.start)
	if err == nil && m != len(p) {
		err = io.ErrShortWrite
	}
	return d.complete(i, r, err)
}

func (d *Device) complete(i int, r *reservation, werr error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	defer d.cond.Broadcast()
	z := &d.zones[i]
	z.inflight--
	d.inflight--
	if werr != nil {
		werr = fmt.Errorf("zone %d: write at %#x+%#x: %w", i, r.start, r.end-r.start, werr)
		last := z.pending[len(z.pending)-1] == r && z.wp == r.end
		if z.failed == nil && last && z.cond != Full {
			// Nothing above depends on this range: give it back.
			z.pending[len(z.pending)-1] = nil
			z.pending = z.pending[:len(z.pending)-1]
			z.wp = r.start
			if z.wp == z.start && (z.cond == ImplicitOpen || z.cond == Closed) {
				d.setCond(z, Empty)
			}
			if err := d.record(i, z); err != nil {
				d.fail(i, z, err, z.recorded)
				return errors.Join(werr, err)
			}
			return werr
		}
		r.done, r.failed = true, true
		d.fail(i, z, werr, r.start)
		return werr
	}
	r.done = true
	for len(z.pending) > 0 && z.pending[0].done && !z.pending[0].failed {
		z.pending[0] = nil
		z.pending = z.pending[1:]
	}
	if z.failed != nil && r.end > z.failedAt {
		return fmt.Errorf("zone %d: write at %#x+%#x is above a failed write at %#x and cannot become durable: %w (%w)",
			i, r.start, r.end-r.start, z.failedAt, ErrZoneFailed, z.failed)
	}
	if err := d.record(i, z); err != nil {
		d.fail(i, z, err, z.recorded)
		return err
	}
	z.ackedEnd = max(z.ackedEnd, r.end)
	return nil
}

// record gives the Store the highest write pointer below which every byte of
// the zone has been written, if it moved.
func (d *Device) record(i int, z *zone) error {
	b := z.wp
	if len(z.pending) > 0 {
		b = z.pending[0].start
	}
	if z.failed != nil {
		b = min(b, z.failedAt)
	}
	if b <= z.recorded {
		return nil
	}
	if err := d.s.SetWritePointer(i, b); err != nil {
		return fmt.Errorf("zone %d: record write pointer %#x: %w", i, b, err)
	}
	z.recorded = b
	return nil
}

// fail marks the zone failed from byte at upward.
func (d *Device) fail(i int, z *zone, cause error, at int64) {
	if z.failed == nil {
		z.failed, z.failedAt = cause, at
	} else {
		z.failedAt = min(z.failedAt, at)
	}
	if z.ackedEnd > z.failedAt && z.flushErr == nil {
		z.flushErr = fmt.Errorf("zone %d: writes up to %#x were acknowledged but cannot become durable past %#x: %w (%w)",
			i, z.ackedEnd, z.failedAt, ErrZoneFailed, z.failed)
		d.flushErrs++
	}
}

// Flush makes every write completed before it durable, with the write
// pointers covering them. Writes still in flight below a completed write in
// the same zone are waited for, since the zone's recorded write pointer
// cannot pass them; other writes in flight are not.
func (d *Device) Flush() error {
	in := d.inject(OpFlush, "flush", 0, 0)
	switch {
	case in.err != nil:
		return in.err
	case in.powerCut:
		d.cutPower()
		return fmt.Errorf("flush: the power was cut instead: %w (%w)", ErrInjected, syscall.EIO)
	}
	d.enter()
	defer d.leave()
	d.mu.Lock()
	if d.inflight > 0 {
		type wait struct {
			i    int
			gen  uint64
			upTo int64
		}
		var ws []wait
		for i := range d.zones {
			z := &d.zones[i]
			if z.inflight == 0 {
				continue
			}
			// Only completed writes need to become durable: wait up to the
			// highest one still above a write in flight.
			upTo := int64(-1)
			for _, r := range z.pending {
				if r.done && !r.failed {
					upTo = max(upTo, r.end)
				}
			}
			if upTo >= 0 {
				ws = append(ws, wait{i, z.gen, upTo})
			}
		}
		for _, w := range ws {
			z := &d.zones[w.i]
			for z.gen == w.gen && z.holdsBack(w.upTo) {
				d.cond.Wait()
			}
		}
	}
	var errs []error
	if d.flushErrs > 0 {
		for i := range d.zones {
			if z := &d.zones[i]; z.flushErr != nil {
				errs = append(errs, z.flushErr)
				z.flushErr = nil
			}
		}
		d.flushErrs = 0
	}
	d.mu.Unlock()
	if err := d.flushStore(); err != nil {
		errs = append([]error{fmt.Errorf("flush: %w", err)}, errs...)
	}
	return errors.Join(errs...)
}

// holdsBack reports whether a reservation in flight keeps the recorded write
// pointer below upTo (a failed reservation holds it back for good; Flush
// does not wait for that).
func (z *zone) holdsBack(upTo int64) bool {
	if z.failed != nil {
		upTo = min(upTo, z.failedAt)
	}
	return len(z.pending) > 0 && !z.pending[0].done && z.pending[0].start < upTo
}

// Open explicitly opens the zones in [off, off+length).
func (d *Device) Open(off, length int64) error {
	return d.zoneOp("open", off, length, func() error { return d.manage("open", off, length, d.openZone) })
}

// Close closes the open zones in [off, off+length); one with nothing written
// becomes empty.
func (d *Device) Close(off, length int64) error {
	return d.zoneOp("close", off, length, func() error { return d.manage("close", off, length, d.closeZone) })
}

// Finish moves the zones in [off, off+length) to full.
func (d *Device) Finish(off, length int64) error {
	first, end, err := d.zoneRange("finish", off, length, false)
	if err != nil {
		return err
	}
	return d.zoneOp("finish", off, length, func() error {
		for i := first; i < end; i++ {
			if err := d.finishZone(i); err != nil {
				return err
			}
		}
		return nil
	})
}

// zoneOp runs zone operation f as a request the fault rules see.
func (d *Device) zoneOp(what string, off, length int64, f func() error) error {
	in := d.inject(OpZoneManagement, "zone "+what, off, length)
	if in.err != nil {
		return in.err
	}
	d.enter()
	err := f()
	d.leave()
	return d.after(in, err)
}

// Reset resets the zones in [off, off+length) to empty; their data reads as
// zeros afterwards. Offset 0 and length Size reset every sequential zone
// (as ResetAll).
func (d *Device) Reset(off, length int64) error {
	first, end, err := d.zoneRange("reset", off, length, true)
	if err != nil {
		return err
	}
	all := off == 0 && length == d.g.Size
	return d.zoneOp("reset", off, length, func() error { return d.reset(first, end, all) })
}

// ResetAll resets every sequential zone in service (not read-only or
// offline, which it skips, as ZBC's reset-all does).
func (d *Device) ResetAll() error {
	return d.zoneOp("reset", 0, d.g.Size, func() error { return d.reset(d.g.ConventionalZones, len(d.zones), true) })
}

// zoneRange checks a management operation's range and returns its zones,
// [first, end). With whole, the entire device means its sequential zones.
func (d *Device) zoneRange(op string, off, length int64, whole bool) (first, end int, err error) {
	g := d.g
	switch {
	case off < 0 || off >= g.Size:
		return 0, 0, fmt.Errorf("%s at %#x, device size %#x: %w", op, off, g.Size, ErrOutOfRange)
	case off%g.ZoneSize != 0:
		return 0, 0, fmt.Errorf("%s at %#x: not a zone start: %w", op, off, ErrUnaligned)
	case length <= 0:
		return 0, 0, fmt.Errorf("%s at %#x: length %#x is not positive: %w", op, off, length, ErrUnaligned)
	case length > g.Size-off:
		return 0, 0, fmt.Errorf("%s at %#x+%#x, device size %#x: %w", op, off, length, g.Size, ErrOutOfRange)
	case length%g.ZoneSize != 0 && off+length != g.Size:
		return 0, 0, fmt.Errorf("%s at %#x+%#x: length is not a multiple of the zone size %#x: %w",
			op, off, length, g.ZoneSize, ErrUnaligned)
	}
	first = int(off / g.ZoneSize)
	end = int((off + length + g.ZoneSize - 1) / g.ZoneSize)
	if whole && off == 0 && length == g.Size {
		return g.ConventionalZones, end, nil
	}
	if !d.sequential(first) {
		return 0, 0, fmt.Errorf("%s at %#x: zone %d: %w", op, off, first, ErrConventionalZone)
	}
	return first, end, nil
}

func (d *Device) manage(op string, off, length int64, f func(int) error) error {
	first, end, err := d.zoneRange(op, off, length, false)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := first; i < end; i++ {
		err := condErr(d.zones[i].cond, true)
		if err == nil {
			err = f(i)
		}
		if err != nil {
			return fmt.Errorf("zone %d: %s: %w", i, op, err)
		}
	}
	return nil
}

func (d *Device) openZone(i int) error {
	z := &d.zones[i]
	switch z.cond {
	case Empty, Closed:
		if err := d.acquireOpen(z); err != nil {
			return err
		}
		d.setCond(z, ExplicitOpen)
	case ImplicitOpen:
		d.setCond(z, ExplicitOpen)
	}
	return nil
}

func (d *Device) closeZone(i int) error {
	d.close(&d.zones[i])
	return nil
}

func (d *Device) close(z *zone) {
	if z.cond != ImplicitOpen && z.cond != ExplicitOpen {
		return
	}
	if z.wp == z.start {
		d.setCond(z, Empty)
	} else {
		d.setCond(z, Closed)
	}
}

func (d *Device) finishZone(i int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	z := &d.zones[i]
	for z.busy {
		d.cond.Wait()
	}
	z.busy = true
	defer d.release(z)
	for z.inflight > 0 {
		d.cond.Wait()
	}
	if err := condErr(z.cond, true); err != nil {
		return fmt.Errorf("zone %d: finish: %w", i, err)
	}
	if z.cond == Full {
		return nil
	}
	if z.failed != nil {
		return fmt.Errorf("zone %d: finish: %w (%w)", i, ErrZoneFailed, z.failed)
	}
	if z.cond == Empty || z.cond == Closed {
		if err := d.acquireOpen(z); err != nil {
			return fmt.Errorf("zone %d: finish: %w", i, err)
		}
	}
	// Reads keep using the old write pointer until the tail is zero.
	from := z.wp
	d.setCond(z, Full)
	d.mu.Unlock()
	var err error
	if from < z.capEnd {
		err = d.s.WriteZeroes(from, z.capEnd-from)
	}
	d.mu.Lock()
	if err != nil {
		err = fmt.Errorf("zone %d: finish: zero %#x+%#x: %w", i, from, z.capEnd-from, err)
		d.fail(i, z, err, from)
		return err
	}
	end := z.start + z.length
	if err := d.s.SetWritePointer(i, end); err != nil {
		err = fmt.Errorf("zone %d: finish: record write pointer %#x: %w", i, end, err)
		d.fail(i, z, err, from)
		return err
	}
	z.wp, z.recorded = end, end
	return nil
}

func (d *Device) release(z *zone) {
	z.busy = false
	d.cond.Broadcast()
}

// reset resets zones [first, end); with all (a reset of the whole device)
// it skips zones out of service, else one of them fails the reset before
// anything changes.
func (d *Device) reset(first, end int, all bool) error {
	d.mu.Lock()
	// Take the zones in ascending order so that overlapping resets and
	// finishes cannot wait on each other in a circle.
	for i := first; i < end; i++ {
		z := &d.zones[i]
		for z.busy {
			d.cond.Wait()
		}
		z.busy = true
	}
	for i := first; i < end; i++ {
		for d.zones[i].inflight > 0 {
			d.cond.Wait()
		}
	}
	var todo []int
	for i := first; i < end && !all; i++ {
		if err := condErr(d.zones[i].cond, true); err != nil {
			for k := first; k < end; k++ {
				d.release(&d.zones[k])
			}
			d.mu.Unlock()
			return fmt.Errorf("zone %d: reset: %w", i, err)
		}
	}
	for i := first; i < end; i++ {
		z := &d.zones[i]
		if condErr(z.cond, true) != nil {
			continue
		}
		if z.wp != z.start || z.recorded != z.start || z.failed != nil {
			todo = append(todo, i)
		}
		d.setCond(z, Empty)
		z.wp = z.start
		z.resetRecommended = false
		clear(z.pending)
		z.pending = z.pending[:0]
		z.failed, z.ackedEnd = nil, 0
		if z.flushErr != nil {
			// The lost writes are gone with the reset anyway.
			z.flushErr = nil
			d.flushErrs--
		}
		z.gen++
	}
	// The reset write pointers must be durable before any data goes, or a
	// crash could leave old data below an old write pointer half zeroed.
	var err error
	for _, i := range todo {
		z := &d.zones[i]
		if err = d.s.SetWritePointer(i, z.start); err != nil {
			err = fmt.Errorf("zone %d: reset: record write pointer: %w", i, err)
			break
		}
		z.recorded = z.start
	}
	d.mu.Unlock()

	if err == nil && len(todo) > 0 {
		if err = d.flushStore(); err != nil {
			err = fmt.Errorf("reset: flush: %w", err)
		}
	}
	var zeroErrs []error
	if err == nil {
		// A zone whose zeroing fails stays empty and healthy: its write
		// pointer is durable at its start and reads past it are zeros.
		for _, i := range todo {
			z := &d.zones[i]
			if zerr := d.s.WriteZeroes(z.start, z.length); zerr != nil {
				zeroErrs = append(zeroErrs, fmt.Errorf("zone %d: reset: zero %#x+%#x: %w", i, z.start, z.length, zerr))
			}
		}
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		for _, i := range todo {
			d.fail(i, &d.zones[i], err, d.zones[i].start)
		}
	}
	for i := first; i < end; i++ {
		d.release(&d.zones[i])
	}
	if err != nil {
		return err
	}
	return errors.Join(zeroErrs...)
}

func (d *Device) open() int   { return d.nImp + d.nExp }
func (d *Device) active() int { return d.nImp + d.nExp + d.nClosed }

func (d *Device) checkActive() error {
	if d.g.MaxActiveZones == 0 || d.active() < d.g.MaxActiveZones {
		return nil
	}
	return fmt.Errorf("%d active zones, max_active_zones %d: %w", d.active(), d.g.MaxActiveZones, ErrActiveResources)
}

// checkOpen makes room for one more open zone, closing the least recently
// written implicitly open zone when max_open is reached.
func (d *Device) checkOpen() error {
	if d.g.MaxOpenZones == 0 || d.open() < d.g.MaxOpenZones {
		return nil
	}
	if d.nImp > 0 && d.checkActive() == nil {
		d.close(d.lru.Front().Value.(*zone))
		return nil
	}
	return fmt.Errorf("%d open zones (%d implicitly), max_open_zones %d, %d active, max_active_zones %d: %w",
		d.open(), d.nImp, d.g.MaxOpenZones, d.active(), d.g.MaxActiveZones, ErrOpenResources)
}

// acquireOpen gets the resources an empty or closed zone needs to open.
func (d *Device) acquireOpen(z *zone) error {
	if z.cond == Empty {
		if err := d.checkActive(); err != nil {
			return err
		}
	}
	return d.checkOpen()
}

// setCond moves a sequential zone to condition c, keeping the resource counts
// and the LRU list in step.
func (d *Device) setCond(z *zone, c Condition) {
	switch z.cond {
	case ImplicitOpen:
		d.nImp--
		d.lru.Remove(z.lru)
		z.lru = nil
	case ExplicitOpen:
		d.nExp--
	case Closed:
		d.nClosed--
	}
	z.cond = c
	switch c {
	case ImplicitOpen:
		d.nImp++
		z.lru = d.lru.PushBack(z)
	case ExplicitOpen:
		d.nExp++
	case Closed:
		d.nClosed++
	}
}
