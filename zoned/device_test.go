package zoned

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"syscall"
	"testing"
)

// small has one conventional zone, then seven 4 KiB sequential zones whose
// capacity (3 KiB) is below their size, so "full by writing" and "finished"
// differ.
var small = Geometry{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 3072, ConventionalZones: 1, MaxAppendBytes: 2048}

func newDev(t testing.TB, g Geometry) (*Device, *memStore) {
	t.Helper()
	s := newMemStore(g)
	d, err := New(s, g, initialWPs(g))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if p := s.problems(); len(p) > 0 {
			t.Errorf("store saw: %s", strings.Join(p, "; "))
		}
	})
	return d, s
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func mustDo(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func zoneN(d *Device, i int) Zone { return d.Report(i, 1)[0] }

func readAll(t testing.TB, d *Device, off, n int64) []byte {
	t.Helper()
	p := fill(int(n), 0xEE) // not zeros: the device must overwrite every byte
	if _, err := d.ReadAt(p, off); err != nil {
		t.Fatalf("ReadAt(%#x+%#x): %v", off, n, err)
	}
	return p
}

func TestConditionAndTypeStrings(t *testing.T) {
	for c, want := range map[Condition]string{NotWritePointer: "not-write-pointer", Empty: "empty", ImplicitOpen: "implicit-open",
		ExplicitOpen: "explicit-open", Closed: "closed", Full: "full", 7: "Condition(0x7)"} {
		if c.String() != want {
			t.Errorf("Condition(%d).String() = %q, want %q", c, c.String(), want)
		}
	}
	for ty, want := range map[Type]string{Conventional: "conventional", SequentialWriteRequired: "sequential-write-required", 9: "Type(9)"} {
		if ty.String() != want {
			t.Errorf("Type(%d).String() = %q, want %q", ty, ty.String(), want)
		}
	}
	if Empty != 1 || ImplicitOpen != 2 || ExplicitOpen != 3 || Closed != 4 || Full != 0xE || Conventional != 1 || SequentialWriteRequired != 2 {
		t.Errorf("numbering differs from Linux's")
	}
}

// TestEveryOperationFromEveryCondition is docs/qcow2-zoned.md section 5's transition table:
// each operation applied to a zone in each condition.
func TestEveryOperationFromEveryCondition(t *testing.T) {
	const z = 4096 // zone 1
	preps := []struct {
		name string
		do   func(d *Device) error
		cond Condition
		wp   int64 // relative
		data int   // bytes of 0xA1 written
	}{
		{"empty", func(d *Device) error { return nil }, Empty, 0, 0},
		{"implicit-open", func(d *Device) error { _, err := d.WriteAt(fill(512, 0xA1), z); return err }, ImplicitOpen, 512, 512},
		{"explicit-open with nothing written", func(d *Device) error { return d.Open(z, 4096) }, ExplicitOpen, 0, 0},
		{"explicit-open", func(d *Device) error {
			if err := d.Open(z, 4096); err != nil {
				return err
			}
			_, err := d.WriteAt(fill(512, 0xA1), z)
			return err
		}, ExplicitOpen, 512, 512},
		{"closed", func(d *Device) error {
			if _, err := d.WriteAt(fill(512, 0xA1), z); err != nil {
				return err
			}
			return d.Close(z, 4096)
		}, Closed, 512, 512},
		{"full by writing", func(d *Device) error { _, err := d.WriteAt(fill(3072, 0xA1), z); return err }, Full, 3072, 3072},
		{"full by finish", func(d *Device) error {
			if _, err := d.WriteAt(fill(1024, 0xA1), z); err != nil {
				return err
			}
			return d.Finish(z, 4096)
		}, Full, 4096, 1024},
	}
	type op struct {
		name  string
		do    func(d *Device, wp int64) error
		wrote bool
	}
	ops := []op{
		// A finished zone's write pointer is the next zone's start: aim at
		// its capacity instead.
		{"write at the write pointer", func(d *Device, wp int64) error { _, err := d.WriteAt(fill(512, 0xB2), z+min(wp, 3072)); return err }, true},
		{"append", func(d *Device, wp int64) error {
			off, err := d.Append(fill(512, 0xB2), z)
			if err == nil && off != z+wp {
				return fmt.Errorf("append landed at %#x, want %#x", off, z+wp)
			}
			return err
		}, true},
		{"open", func(d *Device, _ int64) error { return d.Open(z, 4096) }, false},
		{"close", func(d *Device, _ int64) error { return d.Close(z, 4096) }, false},
		{"finish", func(d *Device, _ int64) error { return d.Finish(z, 4096) }, false},
		{"reset", func(d *Device, _ int64) error { return d.Reset(z, 4096) }, false},
	}
	type want struct {
		cond         Condition
		wp           int64
		err          error
		open, active int
	}
	// want[prep][op]
	table := map[string]map[string]want{
		"empty": {
			"write at the write pointer": {ImplicitOpen, 512, nil, 1, 1},
			"append":                     {ImplicitOpen, 512, nil, 1, 1},
			"open":                       {ExplicitOpen, 0, nil, 1, 1},
			"close":                      {Empty, 0, nil, 0, 0},
			"finish":                     {Full, 4096, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
		"implicit-open": {
			"write at the write pointer": {ImplicitOpen, 1024, nil, 1, 1},
			"append":                     {ImplicitOpen, 1024, nil, 1, 1},
			"open":                       {ExplicitOpen, 512, nil, 1, 1},
			"close":                      {Closed, 512, nil, 0, 1},
			"finish":                     {Full, 4096, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
		"explicit-open with nothing written": {
			"write at the write pointer": {ExplicitOpen, 512, nil, 1, 1},
			"append":                     {ExplicitOpen, 512, nil, 1, 1},
			"open":                       {ExplicitOpen, 0, nil, 1, 1},
			"close":                      {Empty, 0, nil, 0, 0},
			"finish":                     {Full, 4096, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
		"explicit-open": {
			"write at the write pointer": {ExplicitOpen, 1024, nil, 1, 1},
			"append":                     {ExplicitOpen, 1024, nil, 1, 1},
			"open":                       {ExplicitOpen, 512, nil, 1, 1},
			"close":                      {Closed, 512, nil, 0, 1},
			"finish":                     {Full, 4096, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
		"closed": {
			"write at the write pointer": {ImplicitOpen, 1024, nil, 1, 1},
			"append":                     {ImplicitOpen, 1024, nil, 1, 1},
			"open":                       {ExplicitOpen, 512, nil, 1, 1},
			"close":                      {Closed, 512, nil, 0, 1},
			"finish":                     {Full, 4096, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
		"full by writing": {
			"write at the write pointer": {Full, 3072, ErrBeyondCapacity, 0, 0},
			"append":                     {Full, 3072, ErrBeyondCapacity, 0, 0},
			"open":                       {Full, 3072, nil, 0, 0},
			"close":                      {Full, 3072, nil, 0, 0},
			"finish":                     {Full, 3072, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
		"full by finish": {
			"write at the write pointer": {Full, 4096, ErrBeyondCapacity, 0, 0},
			"append":                     {Full, 4096, ErrBeyondCapacity, 0, 0},
			"open":                       {Full, 4096, nil, 0, 0},
			"close":                      {Full, 4096, nil, 0, 0},
			"finish":                     {Full, 4096, nil, 0, 0},
			"reset":                      {Empty, 0, nil, 0, 0},
		},
	}
	for _, p := range preps {
		for _, o := range ops {
			w, ok := table[p.name][o.name]
			if !ok {
				t.Fatalf("no expectation for %s / %s", p.name, o.name)
			}
			t.Run(p.name+"/"+o.name, func(t *testing.T) {
				d, _ := newDev(t, small)
				mustDo(t, p.do(d))
				if got := zoneN(d, 1); got.Cond != p.cond || got.WritePointer != z+p.wp {
					t.Fatalf("prep left %v wp %#x, want %v wp %#x", got.Cond, got.WritePointer, p.cond, z+p.wp)
				}
				err := o.do(d, p.wp)
				if !errors.Is(err, w.err) || (err != nil) != (w.err != nil) {
					t.Fatalf("%s: err = %v, want %v", o.name, err, w.err)
				}
				got := zoneN(d, 1)
				wantZone := Zone{Start: z, Length: 4096, Capacity: 3072, WritePointer: z + w.wp, Type: SequentialWriteRequired, Cond: w.cond}
				if got != wantZone {
					t.Errorf("zone = %+v, want %+v", got, wantZone)
				}
				if open, active := d.Resources(); open != w.open || active != w.active {
					t.Errorf("resources = %d open, %d active; want %d, %d", open, active, w.open, w.active)
				}
				// The data: what the prep wrote, then what the op wrote,
				// zeros elsewhere (all zeros after a reset).
				want := make([]byte, 4096)
				if w.cond != Empty {
					copy(want, fill(p.data, 0xA1))
					if o.wrote && err == nil {
						copy(want[p.wp:], fill(512, 0xB2))
					}
				}
				if got := readAll(t, d, z, 4096); !bytes.Equal(got, want) {
					t.Errorf("zone data differs from what was written")
				}
			})
		}
	}
}

type step struct {
	op   byte // w: write 512 at wp, F: write to capacity, a: append 512, o, c, f, r: open, close, finish, reset
	zone int
	err  error
}

func (s step) run(d *Device) error {
	g := d.Geometry()
	start := int64(s.zone) * g.ZoneSize
	switch s.op {
	case 'w':
		_, err := d.WriteAt(fill(512, byte(s.zone+1)), zoneN(d, s.zone).WritePointer)
		return err
	case 'F':
		z := zoneN(d, s.zone)
		_, err := d.WriteAt(fill(int(z.Start+z.Capacity-z.WritePointer), byte(s.zone+1)), z.WritePointer)
		return err
	case 'a':
		_, err := d.Append(fill(512, byte(s.zone+1)), start)
		return err
	case 'o':
		return d.Open(start, g.ZoneSize)
	case 'c':
		return d.Close(start, g.ZoneSize)
	case 'f':
		return d.Finish(start, g.ZoneSize)
	case 'r':
		return d.Reset(start, g.ZoneSize)
	}
	panic("bad step " + string(s.op))
}

func steps(spec string, errs map[int]error) []step {
	var out []step
	for i, f := range strings.Fields(spec) {
		out = append(out, step{op: f[0], zone: int(f[1] - '0'), err: errs[i]})
	}
	return out
}

func TestOpenAndActiveLimits(t *testing.T) {
	const I, E, C, F, M = ImplicitOpen, ExplicitOpen, Closed, Full, Empty
	tests := []struct {
		name              string
		maxOpen, maxActiv int
		steps             string
		errs              map[int]error // step index -> error
		want              []Condition   // zones 0..
		open, active      int
	}{
		{"write at max open closes the least recently written implicit zone", 2, 0,
			"w0 w1 w0 w2", nil, []Condition{I, C, I}, 2, 3},
		{"write to a closed zone at max open closes the LRU implicit zone", 2, 0,
			"w0 w1 w2 w0", nil, []Condition{I, C, I}, 2, 3},
		{"appends count as writes for the LRU order", 2, 0,
			"a0 a1 a0 a2", nil, []Condition{I, C, I}, 2, 3},
		{"explicitly open zones are never closed to make room", 2, 0,
			"o0 o1 w2", map[int]error{2: ErrOpenResources}, []Condition{E, E, M}, 2, 2},
		{"implicit zone made explicit keeps its slot and is not closable", 1, 0,
			"w0 o0 w1", map[int]error{2: ErrOpenResources}, []Condition{E, M}, 1, 1},
		{"write to an empty zone needs an active slot", 2, 2,
			"w0 w1 w2", map[int]error{2: ErrActiveResources}, []Condition{I, I, M}, 2, 2},
		{"closed zones hold active slots", 2, 3,
			"w0 w1 c0 w2 w3", map[int]error{4: ErrActiveResources}, []Condition{C, I, I, M}, 2, 3},
		{"at max active a closed zone cannot take the LRU zone's open slot (spec 5, as null_blk)", 1, 2,
			"w0 w1 w0", map[int]error{2: ErrOpenResources}, []Condition{C, I}, 1, 2},
		{"below max active a closed zone takes the LRU zone's open slot", 1, 3,
			"w0 w1 w0", nil, []Condition{I, C}, 1, 2},
		{"open of an empty zone needs an active slot", 2, 2,
			"w0 w1 o2", map[int]error{2: ErrActiveResources}, []Condition{I, I, M}, 2, 2},
		{"open of an empty zone at max open closes the LRU implicit zone", 2, 0,
			"w0 w1 o2", nil, []Condition{C, I, E}, 2, 3},
		{"open of a closed zone takes the LRU implicit zone's slot", 2, 0,
			"w0 w1 w2 o0", nil, []Condition{E, C, I}, 2, 3},
		{"open of a closed zone fails when every open zone is explicit", 2, 0,
			"w0 c0 o1 o2 o0", map[int]error{4: ErrOpenResources}, []Condition{C, E, E}, 2, 3},
		{"finish of an empty zone needs an active slot", 2, 2,
			"w0 w1 f2", map[int]error{2: ErrActiveResources}, []Condition{I, I, M}, 2, 2},
		{"finish of an empty zone at max open closes the LRU implicit zone", 2, 0,
			"w0 w1 f2", nil, []Condition{C, I, F}, 1, 2},
		{"finish of a closed zone needs an open slot", 2, 0,
			"w0 c0 o1 o2 f0", map[int]error{4: ErrOpenResources}, []Condition{C, E, E}, 2, 3},
		{"full zones hold no resource", 1, 1,
			"F0 w1", nil, []Condition{F, I}, 1, 1},
		{"finish releases the zone's resources", 1, 1,
			"w0 f0 w1", nil, []Condition{F, I}, 1, 1},
		{"reset releases the zone's resources", 1, 1,
			"w0 r0 w1", nil, []Condition{M, I}, 1, 1},
		{"close of an explicitly opened empty zone releases it", 1, 1,
			"o0 c0 w1", nil, []Condition{M, I}, 1, 1},
		{"close keeps the active slot of a written zone", 2, 2,
			"w0 c0 w1 w2", map[int]error{3: ErrActiveResources}, []Condition{C, I, M}, 1, 2},
		{"unlimited", 0, 0,
			"w0 w1 w2 w3 w4 o5 w6", nil, []Condition{I, I, I, I, I, E, I}, 7, 7},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := Geometry{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, MaxAppendBytes: 2048,
				MaxOpenZones: tc.maxOpen, MaxActiveZones: tc.maxActiv}
			d, _ := newDev(t, g)
			for i, s := range steps(tc.steps, tc.errs) {
				before := d.Report(0, 8)
				err := s.run(d)
				if (err != nil) != (s.err != nil) || !errors.Is(err, s.err) {
					t.Fatalf("step %d (%c%d): err = %v, want %v", i, s.op, s.zone, err, s.err)
				}
				if err != nil {
					if after := d.Report(0, 8); !reflect.DeepEqual(before, after) {
						t.Fatalf("step %d failed but changed the zones:\n%v\n%v", i, before, after)
					}
				}
			}
			for i, want := range tc.want {
				if got := zoneN(d, i).Cond; got != want {
					t.Errorf("zone %d is %v, want %v", i, got, want)
				}
			}
			if open, active := d.Resources(); open != tc.open || active != tc.active {
				t.Errorf("resources = %d open, %d active; want %d, %d", open, active, tc.open, tc.active)
			}
		})
	}
}

func TestAppendLandsAtTheWritePointerAndChecksItsLimits(t *testing.T) {
	const z = 4096
	d, _ := newDev(t, small)
	for _, tc := range []struct {
		n    int
		want int64
	}{{512, z}, {1024, z + 512}, {512, z + 1536}} {
		off, err := d.Append(fill(tc.n, byte(tc.n)), z)
		if err != nil || off != tc.want {
			t.Fatalf("Append(%d) = %#x, %v; want %#x", tc.n, off, err, tc.want)
		}
	}
	if wp := zoneN(d, 1).WritePointer; wp != z+2048 {
		t.Fatalf("wp = %#x, want %#x", wp, z+2048)
	}
	refused := []struct {
		name  string
		n     int
		start int64
		err   error
	}{
		{"offset not a zone start", 512, z + 512, ErrUnaligned},
		{"length not a sector multiple", 100, z, ErrUnaligned},
		{"empty", 0, z, ErrUnaligned},
		{"larger than max_append_bytes", 2560, 3 * 4096, ErrAppendTooLarge},
		{"conventional zone", 512, 0, ErrConventionalZone},
		{"offset at device end", 512, small.Size, ErrOutOfRange},
		{"negative offset", 512, -4096, ErrOutOfRange},
		{"past capacity", 1536, z, ErrBeyondCapacity},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			before := d.Report(0, 8)
			if _, err := d.Append(fill(tc.n, 1), tc.start); !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if after := d.Report(0, 8); !reflect.DeepEqual(before, after) {
				t.Errorf("refused append changed the zones")
			}
		})
	}
	if off, err := d.Append(fill(2048, 9), 3*4096); err != nil || off != 3*4096 {
		t.Fatalf("append of exactly max_append_bytes = %#x, %v", off, err)
	}
	if off, err := d.Append(fill(1024, 7), z); err != nil || off != z+2048 {
		t.Fatalf("append up to capacity = %#x, %v", off, err)
	}
	if got := zoneN(d, 1); got.Cond != Full || got.WritePointer != z+3072 {
		t.Fatalf("zone after append to capacity = %+v, want full at %#x", got, z+3072)
	}
	if _, err := d.Append(fill(512, 1), z); !errors.Is(err, ErrBeyondCapacity) {
		t.Fatalf("append to a full zone: err = %v, want ErrBeyondCapacity", err)
	}
}

func TestRefusedWritesChangeNothing(t *testing.T) {
	g := small
	g.ConventionalZones = 2 // zones 0 and 1 conventional, 2.. sequential
	const z = 2 * 4096
	tests := []struct {
		name string
		off  int64
		n    int
		err  error
	}{
		{"ahead of the write pointer", z + 1024, 512, ErrNotAtWritePointer},
		{"behind the write pointer", z, 512, ErrNotAtWritePointer},
		{"unaligned offset", z + 512 + 1, 512, ErrUnaligned},
		{"unaligned length", z + 512, 100, ErrUnaligned},
		{"crossing into the next zone", z + 4096 - 512, 1024, ErrCrossesZone},
		{"past the capacity", z + 512, 3072, ErrBeyondCapacity},
		{"starting past the capacity", z + 3072, 512, ErrNotAtWritePointer},
		{"past the device end", g.Size - 512, 1024, ErrWritePastEnd},
		{"negative offset", -512, 512, ErrOutOfRange},
		{"from a conventional zone into a sequential one", z - 512, 1024, ErrCrossesZone},
		{"to a full zone", 3*4096 + 3072, 512, ErrBeyondCapacity},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, s := newDev(t, g)
			mustDo(t, func() error { _, err := d.WriteAt(fill(512, 1), z); return err }())
			mustDo(t, func() error { _, err := d.WriteAt(fill(3072, 2), 3*4096); return err }())
			before := d.Report(0, 8)
			data := readAll(t, d, 0, g.Size)
			s.logWrites = true
			s.takeEvents()
			n, err := d.WriteAt(fill(tc.n, 0xFF), tc.off)
			if !errors.Is(err, tc.err) || n != 0 {
				t.Fatalf("WriteAt = %d, %v; want 0, %v", n, err, tc.err)
			}
			if ev := s.takeEvents(); len(ev) != 0 {
				t.Errorf("refused write reached the store: %v", ev)
			}
			if after := d.Report(0, 8); !reflect.DeepEqual(before, after) {
				t.Errorf("refused write changed the zones")
			}
			if !bytes.Equal(readAll(t, d, 0, g.Size), data) {
				t.Errorf("refused write changed the data")
			}
		})
	}
}

func TestConventionalZonesTakeAnyWrite(t *testing.T) {
	g := small
	g.ConventionalZones = 2
	d, _ := newDev(t, g)
	for _, w := range []struct {
		off int64
		n   int
	}{{100, 7}, {4096 - 10, 20}, {0, 8192}, {8000, 100}} {
		p := fill(w.n, byte(w.off))
		if n, err := d.WriteAt(p, w.off); err != nil || n != w.n {
			t.Fatalf("WriteAt(%#x+%d) = %d, %v", w.off, w.n, n, err)
		}
		if got := readAll(t, d, w.off, int64(w.n)); !bytes.Equal(got, p) {
			t.Errorf("read back of %#x+%d differs", w.off, w.n)
		}
	}
	if n, err := d.WriteAt(nil, 12345); n != 0 || err != nil {
		t.Errorf("empty write = %d, %v", n, err)
	}
	for i, z := range d.Report(0, 3) {
		want := Zone{Start: int64(i) * 4096, Length: 4096, Capacity: 4096, WritePointer: int64(i) * 4096, Type: Conventional, Cond: NotWritePointer}
		if i == 2 {
			want = Zone{Start: 8192, Length: 4096, Capacity: 3072, WritePointer: 8192, Type: SequentialWriteRequired, Cond: Empty}
		}
		if z != want {
			t.Errorf("zone %d = %+v, want %+v", i, z, want)
		}
	}
}

func TestReadsPastTheWritePointerAreZeros(t *testing.T) {
	d, s := newDev(t, small)
	const z = 4096
	mustDo(t, func() error { _, err := d.WriteAt(fill(1024, 0xAB), z); return err }())
	mustDo(t, func() error { _, err := d.WriteAt(fill(4096, 0xCD), 0); return err }())
	// Stale bytes past the write pointer and past the capacity, as a crash
	// or an old generation of the zone leaves them.
	copy(s.data[z+1024:z+4096], fill(3072, 0x5A))
	copy(s.data[2*4096:3*4096], fill(4096, 0x5A))

	tests := []struct {
		name string
		off  int64
		n    int64
		want []byte
	}{
		{"below the write pointer", z, 1024, fill(1024, 0xAB)},
		{"across the write pointer", z + 512, 1024, append(fill(512, 0xAB), fill(512, 0)...)},
		{"past the write pointer", z + 1024, 2048, fill(2048, 0)},
		{"past the capacity", z + 3072, 1024, fill(1024, 0)},
		{"empty zone", 2 * 4096, 4096, fill(4096, 0)},
		{"conventional into sequential", 4096 - 512, 1024, append(fill(512, 0xCD), fill(512, 0xAB)...)},
		{"three zones", 0, 3 * 4096, append(append(fill(4096, 0xCD), append(fill(1024, 0xAB), fill(3072, 0)...)...), fill(4096, 0)...)},
		{"unaligned", z + 1000, 48, append(fill(24, 0xAB), fill(24, 0)...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := readAll(t, d, tc.off, tc.n); !bytes.Equal(got, tc.want) {
				t.Errorf("read %#x+%#x differs", tc.off, tc.n)
			}
		})
	}
	for _, r := range []struct{ off, n int64 }{{-1, 1}, {small.Size - 512, 1024}, {small.Size + 1, 0}} {
		if _, err := d.ReadAt(make([]byte, r.n), r.off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("ReadAt(%#x+%#x) err = %v, want ErrOutOfRange", r.off, r.n, err)
		}
	}
	if n, err := d.ReadAt(nil, small.Size); n != 0 || err != nil {
		t.Errorf("empty read at the end = %d, %v", n, err)
	}
}

func TestManagementOperationsCheckTheirRange(t *testing.T) {
	g := small
	g.Size = 7*4096 + 2048 // short last zone
	type mop func(d *Device, off, n int64) error
	ops := map[string]mop{
		"open":   (*Device).Open,
		"close":  (*Device).Close,
		"finish": (*Device).Finish,
		"reset":  (*Device).Reset,
	}
	tests := []struct {
		name   string
		off, n int64
		err    error
		reset  error // when reset differs
	}{
		{"offset not zone-aligned", 4096 + 512, 4096, ErrUnaligned, nil},
		{"zero length", 4096, 0, ErrUnaligned, nil},
		{"negative length", 4096, -4096, ErrUnaligned, nil},
		{"length not a zone multiple", 4096, 6144, ErrUnaligned, nil},
		{"negative offset", -4096, 4096, ErrOutOfRange, nil},
		{"offset at the end", g.Size, 4096, ErrOutOfRange, nil},
		{"past the end", 6 * 4096, 2 * 4096, ErrOutOfRange, nil},
		{"conventional zone", 0, 4096, ErrConventionalZone, nil},
		{"range starting with a conventional zone", 0, 2 * 4096, ErrConventionalZone, nil},
		{"whole device", 0, g.Size, ErrConventionalZone, errNone},
		{"several zones", 4096, 3 * 4096, nil, nil},
		{"short length reaching the end", 7 * 4096, 2048, nil, nil},
		{"zone multiple reaching the end", 5 * 4096, 2*4096 + 2048, nil, nil},
	}
	for _, tc := range tests {
		for name, op := range ops {
			t.Run(tc.name+"/"+name, func(t *testing.T) {
				d, _ := newDev(t, g)
				want := tc.err
				if name == "reset" && tc.reset != nil {
					want = tc.reset
				}
				if want == errNone {
					want = nil
				}
				err := op(d, tc.off, tc.n)
				if (err != nil) != (want != nil) || !errors.Is(err, want) {
					t.Fatalf("err = %v, want %v", err, want)
				}
				if errors.Is(want, ErrConventionalZone) && Errno(err) != syscall.EIO {
					t.Errorf("Errno = %v, want EIO", Errno(err))
				}
			})
		}
	}
}

var errNone = errors.New("no error")

func TestMultiZoneOperationsStopAtTheFirstFailure(t *testing.T) {
	g := Geometry{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, MaxAppendBytes: 2048, MaxOpenZones: 2}
	d, _ := newDev(t, g)
	err := d.Open(4096, 3*4096)
	if !errors.Is(err, ErrOpenResources) || !strings.Contains(err.Error(), "zone 3") {
		t.Fatalf("Open of three zones with max_open 2: %v, want ErrOpenResources naming zone 3", err)
	}
	want := []Condition{Empty, ExplicitOpen, ExplicitOpen, Empty}
	for i, c := range want {
		if got := zoneN(d, i).Cond; got != c {
			t.Errorf("zone %d is %v, want %v", i, got, c)
		}
	}
	mustDo(t, d.Close(0, g.Size))
	for i := range 8 {
		if got := zoneN(d, i).Cond; got != Empty {
			t.Errorf("after closing everything zone %d is %v", i, got)
		}
	}
	mustDo(t, d.Finish(2*4096, 2*4096))
	mustDo(t, d.Reset(0, 3*4096))
	for i, c := range []Condition{Empty, Empty, Empty, Full, Empty} {
		if got := zoneN(d, i).Cond; got != c {
			t.Errorf("zone %d is %v, want %v", i, got, c)
		}
	}
}

func TestShortLastZone(t *testing.T) {
	g := Geometry{Size: 4*4096 + 2048, ZoneSize: 4096, ZoneCapacity: 3072, MaxAppendBytes: 1024}
	d, s := newDev(t, g)
	const last = 4 * 4096
	if got, want := zoneN(d, 4), (Zone{Start: last, Length: 2048, Capacity: 2048, WritePointer: last, Type: SequentialWriteRequired, Cond: Empty}); got != want {
		t.Fatalf("last zone = %+v, want %+v", got, want)
	}
	if _, err := d.WriteAt(fill(2560, 1), last); !errors.Is(err, ErrWritePastEnd) {
		t.Fatalf("write past the device end: %v", err)
	}
	if _, err := d.WriteAt(fill(2048, 1), last); err != nil {
		t.Fatal(err)
	}
	if got := zoneN(d, 4); got.Cond != Full || got.WritePointer != g.Size {
		t.Fatalf("filled last zone = %+v", got)
	}
	mustDo(t, d.Reset(last, 2048))
	if _, err := d.Append(fill(1024, 2), last); err != nil {
		t.Fatal(err)
	}
	mustDo(t, d.Finish(last, 2048))
	if got := zoneN(d, 4); got.Cond != Full || got.WritePointer != g.Size {
		t.Fatalf("finished last zone = %+v, want full at the device end", got)
	}
	mustDo(t, d.Flush())
	if got := s.durableWP(4); got != g.Size {
		t.Errorf("durable wp of finished last zone = %#x, want %#x", got, g.Size)
	}
	// QEMU finishes a short zone to start + zone size, past the device end.
	wps := initialWPs(g)
	wps[4] = last + 4096
	d2, err := New(newMemStore(g), g, wps)
	if err != nil {
		t.Fatalf("New with a QEMU-finished short zone: %v", err)
	}
	if got := zoneN(d2, 4); got.Cond != Full || got.WritePointer != g.Size {
		t.Errorf("QEMU-finished short zone = %+v, want full at the device end", got)
	}
}

func TestResetRecordsAndFlushesTheWritePointerBeforeZeroing(t *testing.T) {
	d, s := newDev(t, small)
	const z = 2 * 4096
	mustDo(t, func() error { _, err := d.WriteAt(fill(2048, 1), z); return err }())
	s.takeEvents()
	mustDo(t, d.Reset(z, 4096))
	want := []event{{op: "setwp", zone: 2, off: z}, {op: "flush"}, {op: "zero", off: z, n: 4096}}
	if got := s.takeEvents(); !reflect.DeepEqual(got, want) {
		t.Errorf("reset did %v, want %v", got, want)
	}
	mustDo(t, d.Reset(z, 4096))
	if got := s.takeEvents(); len(got) != 0 {
		t.Errorf("reset of an empty zone did %v, want nothing", got)
	}
}

func TestResetAllResetsEverySequentialZone(t *testing.T) {
	for _, name := range []string{"ResetAll", "Reset(0, Size)"} {
		t.Run(name, func(t *testing.T) {
			d, s := newDev(t, small)
			conv := fill(4096, 0x77)
			mustDo(t, func() error { _, err := d.WriteAt(conv, 0); return err }())
			mustDo(t, func() error { _, err := d.WriteAt(fill(512, 1), 1*4096); return err }())
			mustDo(t, d.Open(2*4096, 4096))   // open, nothing written: no I/O on reset
			mustDo(t, d.Finish(3*4096, 4096)) // full
			mustDo(t, func() error { _, err := d.WriteAt(fill(512, 1), 5*4096); return err }())
			mustDo(t, d.Close(5*4096, 4096))
			s.takeEvents()
			if name == "ResetAll" {
				mustDo(t, d.ResetAll())
			} else {
				mustDo(t, d.Reset(0, small.Size))
			}
			for i := 1; i < 8; i++ {
				if z := zoneN(d, i); z.Cond != Empty || z.WritePointer != z.Start {
					t.Errorf("zone %d = %+v after reset all", i, z)
				}
			}
			if open, active := d.Resources(); open != 0 || active != 0 {
				t.Errorf("resources after reset all: %d, %d", open, active)
			}
			if !bytes.Equal(readAll(t, d, 0, 4096), conv) {
				t.Errorf("reset all touched the conventional zone")
			}
			want := []event{
				{op: "setwp", zone: 1, off: 4096}, {op: "setwp", zone: 3, off: 3 * 4096}, {op: "setwp", zone: 5, off: 5 * 4096},
				{op: "flush"},
				{op: "zero", off: 4096, n: 4096}, {op: "zero", off: 3 * 4096, n: 4096}, {op: "zero", off: 5 * 4096, n: 4096},
			}
			if got := s.takeEvents(); !reflect.DeepEqual(got, want) {
				t.Errorf("reset all did %v, want %v", got, want)
			}
		})
	}
}

func TestFinishZeroesTheTailBeforeRecordingTheZoneEnd(t *testing.T) {
	d, s := newDev(t, small)
	const z = 4096
	mustDo(t, func() error { _, err := d.WriteAt(fill(1024, 0xAB), z); return err }())
	copy(s.data[z+1024:z+3072], fill(2048, 0x5A)) // stale bytes past the write pointer
	s.takeEvents()
	mustDo(t, d.Finish(z, 4096))
	want := []event{{op: "zero", off: z + 1024, n: 2048}, {op: "setwp", zone: 1, off: z + 4096}}
	if got := s.takeEvents(); !reflect.DeepEqual(got, want) {
		t.Errorf("finish did %v, want %v", got, want)
	}
	if got := readAll(t, d, z, 4096); !bytes.Equal(got, append(fill(1024, 0xAB), fill(3072, 0)...)) {
		t.Errorf("finished zone does not read as its data then zeros")
	}
}

func TestNewDerivesConditionsFromWritePointers(t *testing.T) {
	g := small
	wps := initialWPs(g)
	wps[0] = 12345 | 1<<59 // conventional entries are ignored
	wps[2] = 2*4096 + 1024 // closed
	wps[3] = 3*4096 + 3072 // full at capacity
	wps[4] = 4*4096 + 4096 // full at the zone end (finished)
	wps[5] = 5*4096 + 3584 // past capacity, inside the zone: full
	d, err := New(newMemStore(g), g, wps)
	if err != nil {
		t.Fatal(err)
	}
	want := []Condition{NotWritePointer, Empty, Closed, Full, Full, Full, Empty, Empty}
	for i, c := range want {
		z := zoneN(d, i)
		if z.Cond != c {
			t.Errorf("zone %d is %v, want %v", i, z.Cond, c)
		}
		if i > 0 && z.WritePointer != wps[i] {
			t.Errorf("zone %d reports wp %#x, want %#x as stored", i, z.WritePointer, wps[i])
		}
	}
	if open, active := d.Resources(); open != 0 || active != 1 {
		t.Errorf("resources = %d, %d; want 0 open, 1 active (the closed zone)", open, active)
	}
}

func TestNewRefusesBadWritePointers(t *testing.T) {
	g := small
	tests := []struct {
		name string
		zone int
		wp   int64
	}{
		{"below the zone", 2, 2*4096 - 512},
		{"past the zone", 2, 3*4096 + 512},
		{"flag bits left on", 2, 2*4096 | 1<<59},
		{"not sector-aligned", 3, 3*4096 + 100},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wps := initialWPs(g)
			wps[tc.zone] = tc.wp
			_, err := New(newMemStore(g), g, wps)
			if !errors.Is(err, ErrInvalidWritePointer) || !strings.Contains(err.Error(), fmt.Sprintf("zone %d:", tc.zone)) {
				t.Fatalf("err = %v, want ErrInvalidWritePointer naming zone %d", err, tc.zone)
			}
		})
	}
	if _, err := New(newMemStore(g), g, initialWPs(g)[:7]); !errors.Is(err, ErrInvalidWritePointer) {
		t.Errorf("short table: err = %v", err)
	}
	bad := g
	bad.ZoneCapacity = 8192
	if _, err := New(newMemStore(g), bad, initialWPs(g)); !errors.Is(err, ErrInvalidGeometry) {
		t.Errorf("bad geometry: err = %v", err)
	}
}

func TestNewAppliesClampsAndToleratesTooManyClosedZones(t *testing.T) {
	g := Geometry{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, MaxAppendBytes: 2048, MaxActiveZones: 2}
	wps := initialWPs(g)
	for i := range 3 {
		wps[i] += 512 // three closed zones, max_active 2
	}
	d, err := New(newMemStore(g), g, wps)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Geometry(); got.MaxOpenZones != 2 || got.MaxActiveZones != 2 {
		t.Errorf("geometry not clamped: %+v", got)
	}
	if _, err := d.WriteAt(fill(512, 1), 5*4096); !errors.Is(err, ErrActiveResources) {
		t.Errorf("activating a zone over the limit: err = %v, want ErrActiveResources", err)
	}
	mustDo(t, d.Finish(0, 2*4096))
	if _, err := d.WriteAt(fill(512, 1), 5*4096); err != nil {
		t.Errorf("after finishing two closed zones: %v", err)
	}
}

func TestErrnoMapping(t *testing.T) {
	wrap := func(e error) error { return fmt.Errorf("zone 3: write at 0x1000: %w", e) }
	tests := []struct {
		err  error
		want syscall.Errno
	}{
		{nil, 0},
		{wrap(ErrUnaligned), syscall.EINVAL},
		{wrap(ErrNotAtWritePointer), syscall.EINVAL},
		{wrap(ErrBeyondCapacity), syscall.EINVAL},
		{wrap(ErrCrossesZone), syscall.EINVAL},
		{wrap(ErrAppendTooLarge), syscall.EINVAL},
		{wrap(ErrOutOfRange), syscall.EINVAL},
		{wrap(ErrWritePastEnd), syscall.ENOSPC},
		{wrap(ErrInvalidGeometry), syscall.EINVAL},
		{wrap(ErrInvalidWritePointer), syscall.EINVAL},
		{wrap(ErrOpenResources), syscall.ETOOMANYREFS},
		{wrap(ErrActiveResources), syscall.EOVERFLOW},
		{wrap(ErrConventionalZone), syscall.EIO},
		{wrap(ErrZoneReadOnly), syscall.EIO},
		{wrap(ErrZoneOffline), syscall.EIO},
		{wrap(ErrInvalidFault), syscall.EINVAL},
		{fmt.Errorf("rule 2: %w (%w)", ErrInjected, syscall.ENOSPC), syscall.ENOSPC},
		{fmt.Errorf("%w (%w)", ErrZoneFailed, syscall.ENOSPC), syscall.EIO},
		{wrap(syscall.ENOSPC), syscall.ENOSPC},
		{errors.New("disk on fire"), syscall.EIO},
	}
	for _, tc := range tests {
		if got := Errno(tc.err); got != tc.want {
			t.Errorf("Errno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if !errors.Is(ErrWritePastEnd, ErrOutOfRange) {
		t.Errorf("ErrWritePastEnd does not wrap ErrOutOfRange")
	}
}
