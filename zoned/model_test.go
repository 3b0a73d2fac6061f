package zoned

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
)

// refModel is an independent, deliberately naive statement of docs/qcow2-zoned.md section 5
// (and this package's documented choices): plain arrays, linear scans and a
// write clock for the LRU order. It shares no code with Device.
type refModel struct {
	g     Geometry
	wp    []int64
	cond  []Condition
	lastW []int
	clock int
	data  []byte // what reads must return

	durableWP   []int64
	durableData []byte
}

func newRefModel(g Geometry) *refModel {
	m := &refModel{g: g, data: make([]byte, g.Size)}
	n := int((g.Size + g.ZoneSize - 1) / g.ZoneSize)
	for i := range n {
		m.wp = append(m.wp, int64(i)*g.ZoneSize)
		c := Empty
		if i < g.ConventionalZones {
			c = NotWritePointer
		}
		m.cond = append(m.cond, c)
		m.lastW = append(m.lastW, 0)
	}
	m.snapshot()
	return m
}

func (m *refModel) snapshot() {
	m.durableWP = append([]int64(nil), m.wp...)
	m.durableData = append([]byte(nil), m.data...)
}

// crash goes back to the last snapshot; open conditions are not persisted.
func (m *refModel) crash() {
	m.wp = append([]int64(nil), m.durableWP...)
	m.data = append([]byte(nil), m.durableData...)
	for i := m.g.ConventionalZones; i < len(m.wp); i++ {
		switch {
		case m.wp[i] == m.start(i):
			m.cond[i] = Empty
		case m.wp[i] >= m.capEnd(i):
			m.cond[i] = Full
		default:
			m.cond[i] = Closed
		}
	}
}

func (m *refModel) start(i int) int64  { return int64(i) * m.g.ZoneSize }
func (m *refModel) length(i int) int64 { return min(m.g.ZoneSize, m.g.Size-m.start(i)) }
func (m *refModel) capEnd(i int) int64 {
	if i < m.g.ConventionalZones {
		return m.start(i) + m.length(i)
	}
	return m.start(i) + min(m.g.ZoneCapacity, m.length(i))
}

func (m *refModel) count(cs ...Condition) int {
	n := 0
	for _, c := range m.cond {
		for _, want := range cs {
			if c == want {
				n++
			}
		}
	}
	return n
}

func (m *refModel) openCount() int   { return m.count(ImplicitOpen, ExplicitOpen) }
func (m *refModel) activeCount() int { return m.count(ImplicitOpen, ExplicitOpen, Closed) }

func (m *refModel) canActivate() bool {
	return m.g.MaxActiveZones == 0 || m.activeCount() < m.g.MaxActiveZones
}

func (m *refModel) makeRoomToOpen() error {
	if m.g.MaxOpenZones == 0 || m.openCount() < m.g.MaxOpenZones {
		return nil
	}
	victim := -1
	for i, c := range m.cond {
		if c == ImplicitOpen && (victim < 0 || m.lastW[i] < m.lastW[victim]) {
			victim = i
		}
	}
	if victim >= 0 && m.canActivate() {
		m.closeZone(victim)
		return nil
	}
	return ErrOpenResources
}

func (m *refModel) toOpen(i int) error {
	if m.cond[i] == Empty && !m.canActivate() {
		return ErrActiveResources
	}
	return m.makeRoomToOpen()
}

func (m *refModel) write(off int64, p []byte) error {
	n, z := int64(len(p)), m.g.ZoneSize
	if off < 0 || off+n > m.g.Size {
		return ErrWritePastEnd
	}
	if n == 0 {
		return nil
	}
	i := int(off / z)
	if i < m.g.ConventionalZones {
		if int((off+n-1)/z) >= m.g.ConventionalZones {
			return ErrCrossesZone
		}
		copy(m.data[off:], p)
		return nil
	}
	if off%512 != 0 || n%512 != 0 {
		return ErrUnaligned
	}
	if off+n > m.start(i)+m.length(i) {
		return ErrCrossesZone
	}
	return m.seqWrite(i, off, p)
}

func (m *refModel) seqWrite(i int, off int64, p []byte) error {
	n := int64(len(p))
	switch {
	case m.cond[i] == Full:
		return ErrBeyondCapacity
	case off != m.wp[i]:
		return ErrNotAtWritePointer
	case off+n > m.capEnd(i):
		return ErrBeyondCapacity
	}
	if m.cond[i] == Empty || m.cond[i] == Closed {
		if err := m.toOpen(i); err != nil {
			return err
		}
		m.cond[i] = ImplicitOpen
	}
	copy(m.data[off:], p)
	m.wp[i] += n
	m.clock++
	m.lastW[i] = m.clock
	if m.wp[i] == m.capEnd(i) {
		m.cond[i] = Full
	}
	return nil
}

func (m *refModel) append(zs int64, p []byte) (int64, error) {
	n := int64(len(p))
	switch {
	case zs < 0 || zs >= m.g.Size:
		return 0, ErrOutOfRange
	case zs%m.g.ZoneSize != 0:
		return 0, ErrUnaligned
	case int(zs/m.g.ZoneSize) < m.g.ConventionalZones:
		return 0, ErrConventionalZone
	case n == 0 || n%512 != 0:
		return 0, ErrUnaligned
	case n > m.g.MaxAppendBytes:
		return 0, ErrAppendTooLarge
	}
	i := int(zs / m.g.ZoneSize)
	at := m.wp[i]
	return at, m.seqWrite(i, at, p)
}

func (m *refModel) read(off, n int64) ([]byte, error) {
	if off < 0 || off+n > m.g.Size {
		return nil, ErrOutOfRange
	}
	return m.data[off : off+n], nil
}

func (m *refModel) zones(op string, off, n int64) ([]int, error) {
	size, z := m.g.Size, m.g.ZoneSize
	switch {
	case off < 0 || off >= size:
		return nil, ErrOutOfRange
	case off%z != 0:
		return nil, ErrUnaligned
	case n <= 0:
		return nil, ErrUnaligned
	case off+n > size:
		return nil, ErrOutOfRange
	case n%z != 0 && off+n != size:
		return nil, ErrUnaligned
	}
	var out []int
	for i := int(off / z); int64(i)*z < off+n; i++ {
		if i < m.g.ConventionalZones {
			if op == "reset" && off == 0 && n == size {
				continue
			}
			return nil, ErrConventionalZone
		}
		out = append(out, i)
	}
	return out, nil
}

func (m *refModel) manage(op string, off, n int64) error {
	zs, err := m.zones(op, off, n)
	if err != nil {
		return err
	}
	if op == "reset" {
		dirty := false
		for _, i := range zs {
			dirty = dirty || m.wp[i] != m.start(i)
			m.cond[i], m.wp[i] = Empty, m.start(i)
			clear(m.data[m.start(i) : m.start(i)+m.length(i)])
		}
		if dirty {
			m.snapshot() // reset flushes its write pointers
		}
		return nil
	}
	for _, i := range zs {
		var err error
		switch op {
		case "open":
			err = m.openZone(i)
		case "close":
			m.closeZone(i)
		case "finish":
			err = m.finishZone(i)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (m *refModel) openZone(i int) error {
	switch m.cond[i] {
	case Empty, Closed:
		if err := m.toOpen(i); err != nil {
			return err
		}
	case Full:
		return nil
	}
	m.cond[i] = ExplicitOpen
	return nil
}

func (m *refModel) closeZone(i int) {
	if m.cond[i] != ImplicitOpen && m.cond[i] != ExplicitOpen {
		return
	}
	if m.wp[i] == m.start(i) {
		m.cond[i] = Empty
	} else {
		m.cond[i] = Closed
	}
}

func (m *refModel) finishZone(i int) error {
	switch m.cond[i] {
	case Full:
		return nil
	case Empty, Closed:
		if err := m.toOpen(i); err != nil {
			return err
		}
	}
	m.cond[i] = Full
	m.wp[i] = m.start(i) + m.length(i)
	return nil
}

func (m *refModel) report() []Zone {
	var out []Zone
	for i := range m.wp {
		z := Zone{Start: m.start(i), Length: m.length(i), Capacity: m.capEnd(i) - m.start(i), WritePointer: m.wp[i],
			Type: SequentialWriteRequired, Cond: m.cond[i]}
		if i < m.g.ConventionalZones {
			z.Type, z.WritePointer = Conventional, m.start(i)
		}
		out = append(out, z)
	}
	return out
}

// TestRandomOperationsMatchTheReferenceModel runs long random sequences of
// operations, valid and invalid, against a Device and the reference model and
// compares every result, the report, the resource counts and the data,
// including after crashes that reopen the Device from what was last flushed.
func TestRandomOperationsMatchTheReferenceModel(t *testing.T) {
	geometries := []Geometry{
		{Size: 16 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, ConventionalZones: 2, MaxOpenZones: 3, MaxActiveZones: 5, MaxAppendBytes: 1024},
		{Size: 10*4096 + 2048, ZoneSize: 4096, ZoneCapacity: 3072, MaxAppendBytes: 2048},
		{Size: 8 * 4096, ZoneSize: 4096, ZoneCapacity: 4096, ConventionalZones: 1, MaxOpenZones: 2, MaxActiveZones: 2, MaxAppendBytes: 1536},
		{Size: 12*8192 + 1024, ZoneSize: 8192, ZoneCapacity: 5120, ConventionalZones: 3, MaxOpenZones: 1, MaxActiveZones: 4, MaxAppendBytes: 2048},
		{Size: 6 * 4096, ZoneSize: 4096, ZoneCapacity: 2048, MaxOpenZones: 4, MaxAppendBytes: 512},
	}
	// A sample in the unit tier (-short, which make unit sets); the whole
	// run in the crash tier.
	ops := 4000
	if testing.Short() {
		ops = 400
	}
	for gi, g0 := range geometries {
		for seed := uint64(1); seed <= 3; seed++ {
			t.Run(fmt.Sprintf("geometry%d/seed%d", gi, seed), func(t *testing.T) {
				runModel(t, g0, rand.New(rand.NewPCG(seed, uint64(gi))), ops)
			})
		}
	}
}

func runModel(t *testing.T, g0 Geometry, rng *rand.Rand, ops int) {
	g, _, err := g0.Normalize()
	if err != nil {
		t.Fatal(err)
	}
	d, s := newDev(t, g)
	m := newRefModel(g)
	var log []string
	fail := func(format string, args ...any) {
		t.Helper()
		start := max(0, len(log)-15)
		t.Fatalf("after %d ops: %s\nlast ops:\n  %s", len(log), fmt.Sprintf(format, args...), strings.Join(log[start:], "\n  "))
	}
	checkErr := func(got, want error) {
		t.Helper()
		if (got != nil) != (want != nil) || !errors.Is(got, want) {
			fail("err = %v, model says %v", got, want)
		}
	}
	nz := g.NumZones()
	seqZone := func() int { return g.ConventionalZones + rng.IntN(nz-g.ConventionalZones) }
	anyZone := func() int { return rng.IntN(nz) }
	payload := func(n int64) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		return p
	}
	sectors := func(max int64) int64 { return 512 * (1 + rng.Int64N(max/512)) }
	mgmtRange := func() (int64, int64) {
		switch r := rng.IntN(20); {
		case r == 0:
			return 0, g.Size
		case r == 1:
			return int64(anyZone())*g.ZoneSize + 512, g.ZoneSize
		case r == 2:
			return int64(seqZone()) * g.ZoneSize, g.ZoneSize + 512
		case r == 3:
			off := int64(seqZone()) * g.ZoneSize
			return off, g.Size - off
		case r == 4:
			return int64(anyZone()) * g.ZoneSize, g.ZoneSize
		default:
			return int64(seqZone()) * g.ZoneSize, int64(1+rng.IntN(2)) * g.ZoneSize
		}
	}

	for range ops {
		var desc string
		switch r := rng.IntN(100); {
		case r < 35: // regular write
			i := seqZone()
			if rng.IntN(10) == 0 {
				i = anyZone()
			}
			off := m.wp[i]
			if i < g.ConventionalZones {
				off = int64(i)*g.ZoneSize + rng.Int64N(g.ZoneSize)
			}
			n := sectors(min(2048, g.ZoneCapacity))
			switch rng.IntN(20) {
			case 0:
				off += 512
			case 1:
				off -= 512
			case 2:
				off = int64(i)*g.ZoneSize + 512*rng.Int64N(g.ZoneSize/512)
			case 3:
				off += 7
			case 4:
				n += 100
			case 5:
				n = sectors(g.ZoneSize)
			case 6:
				off = g.Size - 512
			}
			p := payload(n)
			desc = fmt.Sprintf("write %#x+%#x (zone %d)", off, n, i)
			log = append(log, desc)
			want := m.write(off, p)
			got, err := d.WriteAt(p, off)
			checkErr(err, want)
			if err == nil && got != len(p) {
				fail("WriteAt wrote %d of %d", got, len(p))
			}
		case r < 55: // append
			zs := int64(seqZone()) * g.ZoneSize
			n := sectors(g.MaxAppendBytes)
			switch rng.IntN(20) {
			case 0:
				zs += 512
			case 1:
				zs = int64(anyZone()) * g.ZoneSize
			case 2:
				n = g.MaxAppendBytes + 512
			case 3:
				n = 0
			case 4:
				n = 700
			}
			p := payload(n)
			log = append(log, fmt.Sprintf("append %#x bytes to %#x", n, zs))
			wantOff, want := m.append(zs, p)
			gotOff, err := d.Append(p, zs)
			checkErr(err, want)
			if err == nil && gotOff != wantOff {
				fail("append landed at %#x, model says %#x", gotOff, wantOff)
			}
		case r < 80: // management
			op := []string{"open", "open", "close", "close", "finish", "reset"}[rng.IntN(6)]
			off, n := mgmtRange()
			log = append(log, fmt.Sprintf("%s %#x+%#x", op, off, n))
			want := m.manage(op, off, n)
			var err error
			switch op {
			case "open":
				err = d.Open(off, n)
			case "close":
				err = d.Close(off, n)
			case "finish":
				err = d.Finish(off, n)
			case "reset":
				err = d.Reset(off, n)
			}
			checkErr(err, want)
		case r < 81:
			log = append(log, "reset all")
			checkErr(d.ResetAll(), m.manage("reset", 0, g.Size))
		case r < 93: // read
			off := rng.Int64N(g.Size)
			n := rng.Int64N(min(3*g.ZoneSize, g.Size-off) + 1)
			if rng.IntN(30) == 0 {
				n = g.Size - off + 512
			}
			log = append(log, fmt.Sprintf("read %#x+%#x", off, n))
			want, werr := m.read(off, n)
			got := make([]byte, n)
			_, err := d.ReadAt(got, off)
			checkErr(err, werr)
			if err == nil && !bytes.Equal(got, want) {
				fail("read %#x+%#x differs from the model", off, n)
			}
		case r < 97:
			log = append(log, "flush")
			checkErr(d.Flush(), nil)
			m.snapshot()
		default: // crash: reopen from what the last flush made durable
			log = append(log, "crash and reopen")
			if p := s.problems(); len(p) > 0 {
				fail("store saw: %v", p)
			}
			cs, wps := s.crashed()
			d2, err := New(cs, g, wps)
			if err != nil {
				fail("reopen: %v", err)
			}
			d, s = d2, cs
			m.crash()
		}

		if got, want := d.Report(0, nz), m.report(); !reflect.DeepEqual(got, want) {
			for i := range got {
				if got[i] != want[i] {
					fail("zone %d = %+v, model says %+v", i, got[i], want[i])
				}
			}
		}
		if open, active := d.Resources(); open != m.openCount() || active != m.activeCount() {
			fail("resources %d open %d active, model says %d, %d", open, active, m.openCount(), m.activeCount())
		}
		if len(log)%50 == 0 {
			all := make([]byte, g.Size)
			if _, err := d.ReadAt(all, 0); err != nil || !bytes.Equal(all, m.data) {
				fail("device data differs from the model (%v)", err)
			}
		}
	}
	if p := s.problems(); len(p) > 0 {
		fail("store saw: %v", p)
	}
}
