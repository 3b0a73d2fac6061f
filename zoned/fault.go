package zoned

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Op is a kind of request, as fault rules select them; a rule may name
// several (OpRead|OpWrite).
type Op uint8

// Request kinds. OpWrite covers writes, appends and written zeros;
// OpZoneManagement covers open, close, finish and reset.
const (
	OpRead Op = 1 << iota
	OpWrite
	OpFlush
	OpZoneManagement
	OpAll = OpRead | OpWrite | OpFlush | OpZoneManagement
)

var opNames = []struct {
	op   Op
	name string
}{{OpRead, "read"}, {OpWrite, "write"}, {OpFlush, "flush"}, {OpZoneManagement, "zone"}}

func (o Op) String() string {
	if o == OpAll {
		return "all"
	}
	var names []string
	for _, n := range opNames {
		if o&n.op != 0 {
			names = append(names, n.name)
		}
	}
	return strings.Join(names, "|")
}

// ParseOp parses an Op as String prints it ("read", "write|flush", "all").
func ParseOp(s string) (Op, error) {
	if s == "all" {
		return OpAll, nil
	}
	var o Op
	for _, part := range strings.Split(s, "|") {
		i := slices.IndexFunc(opNames, func(n struct {
			op   Op
			name string
		}) bool {
			return n.name == part
		})
		if i < 0 {
			return 0, fmt.Errorf("%w: op %q: want read, write, flush, zone or all (joined with |)", ErrInvalidFault, part)
		}
		o |= opNames[i].op
	}
	return o, nil
}

// Action is what a fault rule does to the requests it selects.
type Action uint8

const (
	// Fail fails the request with the rule's Errno; a write with Partial
	// set first writes that many bytes.
	Fail Action = iota + 1
	// Delay holds the request for Delay plus up to Jitter.
	Delay
	// PowerCut cuts the power (Device.PowerCut): instead of a selected
	// flush, which then fails with EIO, or right after a selected write
	// or zone operation completes.
	PowerCut
)

var actionNames = map[Action]string{Fail: "error", Delay: "delay", PowerCut: "powercut"}

func (a Action) String() string {
	if n, ok := actionNames[a]; ok {
		return n
	}
	return fmt.Sprintf("Action(%d)", uint8(a))
}

// Fault is a rule injecting failures into the requests that match it: of
// the kinds in Op, overlapping [Start, Start+Length) (Length 0: to the
// device end), counted from when the rule is added. The rule fires on the
// Nth matching request (0 or 1: the first) and every one after it, on
// Percent of them (0: all), Count times in all (0: until removed).
type Fault struct {
	Action  Action
	Op      Op
	Start   int64
	Length  int64
	Nth     int
	Count   int
	Percent float64
	// Errno is what a failed request returns: EIO when zero.
	Errno syscall.Errno
	// Partial is how many bytes of a failed write land before the error
	// (a multiple of the sector size); a write shorter than it lands whole.
	Partial int64
	// Delay and Jitter: a delayed request waits Delay plus a uniformly
	// distributed extra in [0, Jitter).
	Delay, Jitter time.Duration
}

// ErrInvalidFault: a fault rule or zone condition that cannot be applied.
var ErrInvalidFault = errors.New("invalid fault")

// ErrInjected wraps every error a Fail rule returns (with its errno) and
// the EIO of a flush a power cut replaced, so logs can tell an injected
// failure from a real one.
var ErrInjected = errors.New("injected fault")

// ErrNoVolatileCache: a power cut on a device without a volatile cache
// (SetVolatileCache), which cannot tell flushed data from unflushed.
var ErrNoVolatileCache = errors.New("power cut needs a volatile write cache")

// Check validates f against the geometry g.
func (f Fault) Check(g Geometry) error {
	switch {
	case f.Action < Fail || f.Action > PowerCut:
		return fmt.Errorf("%w: unknown action %d", ErrInvalidFault, f.Action)
	case f.Op == 0 || f.Op&^OpAll != 0:
		return fmt.Errorf("%w: op %#x", ErrInvalidFault, uint8(f.Op))
	case f.Start < 0 || f.Length < 0 || f.Start >= g.Size || f.Length > g.Size-f.Start:
		return fmt.Errorf("%w: range %#x+%#x outside the device (size %#x)", ErrInvalidFault, f.Start, f.Length, g.Size)
	case f.Nth < 0 || f.Count < 0:
		return fmt.Errorf("%w: nth %d, count %d: negative", ErrInvalidFault, f.Nth, f.Count)
	case f.Percent < 0 || f.Percent > 100:
		return fmt.Errorf("%w: percent %g: want 0 to 100", ErrInvalidFault, f.Percent)
	case f.Errno < 0 || f.Errno > 4095:
		return fmt.Errorf("%w: errno %d", ErrInvalidFault, f.Errno)
	case f.Partial < 0 || f.Partial%SectorSize != 0:
		return fmt.Errorf("%w: partial %#x: not a multiple of %d", ErrInvalidFault, f.Partial, SectorSize)
	case f.Partial > 0 && (f.Action != Fail || f.Op != OpWrite):
		return fmt.Errorf("%w: partial applies to failing writes only (action error, op write)", ErrInvalidFault)
	case f.Delay < 0 || f.Jitter < 0 || f.Delay+f.Jitter > time.Minute:
		return fmt.Errorf("%w: delay %v + jitter %v: want 0 to 1m", ErrInvalidFault, f.Delay, f.Jitter)
	case f.Action == Delay && f.Delay+f.Jitter == 0:
		return fmt.Errorf("%w: a delay rule needs delay or jitter", ErrInvalidFault)
	case f.Action != Delay && f.Delay+f.Jitter != 0:
		return fmt.Errorf("%w: delay and jitter apply to delay rules only", ErrInvalidFault)
	case f.Action == PowerCut && f.Op&OpRead != 0:
		return fmt.Errorf("%w: a power cut fires on writes, flushes or zone operations, not reads", ErrInvalidFault)
	}
	return nil
}

// FaultStatus is a rule as Device.Faults lists it.
type FaultStatus struct {
	ID int
	Fault
	Matched, Fired int64 // requests it selected, and acted on
	Done           bool  // fired Count times
}

type faultRule struct {
	id int
	Fault
	matched, fired atomic.Int64
}

// faultSet is the rules in force, replaced whole on change so that the
// data path reads them without a lock.
type faultSet struct{ rules []*faultRule }

// faultState is a Device's fault-injection state.
type faultState struct {
	mu     sync.Mutex // serialises changes of set
	set    atomic.Pointer[faultSet]
	nextID int
}

// AddFault puts f in force and returns its id.
func (d *Device) AddFault(f Fault) (int, error) {
	if err := f.Check(d.g); err != nil {
		return 0, err
	}
	if f.Action == PowerCut && d.vc == nil {
		return 0, fmt.Errorf("power cut rule: %w", ErrNoVolatileCache)
	}
	if f.Action == Fail && f.Errno == 0 {
		f.Errno = syscall.EIO
	}
	d.faults.mu.Lock()
	defer d.faults.mu.Unlock()
	d.faults.nextID++
	r := &faultRule{id: d.faults.nextID, Fault: f}
	var rules []*faultRule
	if s := d.faults.set.Load(); s != nil {
		rules = slices.Clone(s.rules)
	}
	d.faults.set.Store(&faultSet{rules: append(rules, r)})
	return r.id, nil
}

// RemoveFault takes rule id out of force; id 0 removes every rule. It
// returns how many it removed.
func (d *Device) RemoveFault(id int) int {
	d.faults.mu.Lock()
	defer d.faults.mu.Unlock()
	s := d.faults.set.Load()
	if s == nil {
		return 0
	}
	rules := slices.DeleteFunc(slices.Clone(s.rules), func(r *faultRule) bool { return id == 0 || r.id == id })
	removed := len(s.rules) - len(rules)
	if len(rules) == 0 {
		d.faults.set.Store(nil)
	} else {
		d.faults.set.Store(&faultSet{rules: rules})
	}
	return removed
}

// Faults lists the rules in force, in the order they were added.
func (d *Device) Faults() []FaultStatus {
	s := d.faults.set.Load()
	if s == nil {
		return nil
	}
	out := make([]FaultStatus, len(s.rules))
	for k, r := range s.rules {
		fired := r.fired.Load()
		out[k] = FaultStatus{ID: r.id, Fault: r.Fault, Matched: r.matched.Load(), Fired: fired,
			Done: r.Count > 0 && fired >= int64(r.Count)}
	}
	return out
}

// unfaulted reports whether no rule is in force and the cache is durable:
// a request then goes straight to the zone model.
func (d *Device) unfaulted() bool { return d.vc == nil && d.faults.set.Load() == nil }

// injection is what the rules do to one request.
type injection struct {
	err      error
	partial  int64 // with err, on a write: bytes that land first
	delay    time.Duration
	powerCut bool
}

// inject applies the rules in force to a request of kind op on [off, off+n)
// (n 0: the whole device, as a flush). It sleeps any delay itself.
func (d *Device) inject(op Op, what string, off, n int64) injection {
	s := d.faults.set.Load()
	if s == nil {
		return injection{}
	}
	var in injection
	for _, r := range s.rules {
		if r.Op&op == 0 || !r.overlaps(off, n, d.g.Size) {
			continue
		}
		seen := r.matched.Add(1)
		if seen < int64(max(r.Nth, 1)) || (r.Percent > 0 && rand.Float64()*100 >= r.Percent) {
			continue
		}
		if in.err != nil && r.Action == Fail {
			continue // one error per request: the first rule's
		}
		if fired := r.fired.Add(1); r.Count > 0 && fired > int64(r.Count) {
			r.fired.Add(-1)
			continue
		}
		switch r.Action {
		case Fail:
			in.err = fmt.Errorf("%s at %#x+%#x: rule %d: %w (%w)", what, off, n, r.id, ErrInjected, r.Errno)
			in.partial = r.Partial
		case Delay:
			in.delay += r.Delay
			if r.Jitter > 0 {
				in.delay += rand.N(r.Jitter)
			}
		case PowerCut:
			in.powerCut = true
		}
	}
	if in.delay > 0 {
		time.Sleep(in.delay)
	}
	return in
}

func (r *faultRule) overlaps(off, n, size int64) bool {
	end := size
	if r.Length > 0 {
		end = r.Start + r.Length
	}
	if n == 0 {
		return true
	}
	return off < end && r.Start < off+n
}

// Zone conditions that only an injected fault produces; a zone keeps its
// write pointer under them, and gets its former condition back when the
// fault is cleared.
const (
	// ReadOnly: reads work; writes, appends and zone management fail with
	// ErrZoneReadOnly.
	ReadOnly Condition = 0xD
	// Offline: every request to the zone fails with ErrZoneOffline.
	Offline Condition = 0xF
)

// Errors of requests to zones an injected condition took out of service
// (EIO, as Linux's null_blk and real drives report them).
var (
	ErrZoneReadOnly = errors.New("zone is read-only")
	ErrZoneOffline  = errors.New("zone is offline")
)

// condErr is the error a request to a zone in condition c gets, nil for a
// zone in service; write says whether the request changes the zone.
func condErr(c Condition, write bool) error {
	switch {
	case c == Offline:
		return ErrZoneOffline
	case c == ReadOnly && write:
		return ErrZoneReadOnly
	}
	return nil
}

// SetCondition puts sequential zone i in condition c: ReadOnly or Offline,
// or Empty to clear either and give the zone back the condition its write
// pointer says (empty, closed or full; it was open: closed). The zone
// leaves any open or active resource it held. Writes in flight to it
// complete first.
func (d *Device) SetCondition(i int, c Condition) error {
	if i < d.g.ConventionalZones || i >= len(d.zones) {
		return fmt.Errorf("%w: zone %d is not a sequential zone (zones %d to %d are)", ErrInvalidFault, i, d.g.ConventionalZones, len(d.zones)-1)
	}
	if c != ReadOnly && c != Offline && c != Empty {
		return fmt.Errorf("%w: condition %v: want read-only, offline or empty (clear)", ErrInvalidFault, c)
	}
	d.enter()
	defer d.leave()
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
	switch {
	case c == Empty && z.cond != ReadOnly && z.cond != Offline:
		return nil
	case c == Empty:
		// A closed zone may take the active count past max_active_zones,
		// as on a device opened over too many closed zones: nothing more
		// activates until enough are finished or reset.
		d.setCond(z, d.condAt(z))
	default:
		d.setCond(z, c)
	}
	return nil
}

// SetResetRecommended sets or clears sequential zone i's "reset
// recommended" attribute, which reports carry (Zone.ResetRecommended) and a
// reset of the zone clears, as on a drive that wants a zone rewritten.
func (d *Device) SetResetRecommended(i int, on bool) error {
	if i < d.g.ConventionalZones || i >= len(d.zones) {
		return fmt.Errorf("%w: zone %d is not a sequential zone (zones %d to %d are)", ErrInvalidFault, i, d.g.ConventionalZones, len(d.zones)-1)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.zones[i].resetRecommended = on
	return nil
}

// condAt is the condition a zone's write pointer says at rest.
func (d *Device) condAt(z *zone) Condition {
	switch {
	case z.wp == z.start:
		return Empty
	case z.wp >= z.capEnd:
		return Full
	}
	return Closed
}

// Conditions returns the zones in an injected condition, by zone index.
func (d *Device) Conditions() map[int]Condition {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[int]Condition{}
	for i := d.g.ConventionalZones; i < len(d.zones); i++ {
		if c := d.zones[i].cond; c == ReadOnly || c == Offline {
			out[i] = c
		}
	}
	return out
}
