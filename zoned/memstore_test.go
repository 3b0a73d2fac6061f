package zoned

import (
	"fmt"
	"sync"
)

// event is one ordering-relevant Store call.
type event struct {
	op   string // "setwp", "flush", "zero", "write"
	zone int
	off  int64
	n    int64
}

func (e event) String() string {
	switch e.op {
	case "setwp":
		return fmt.Sprintf("setwp(%d,%#x)", e.zone, e.off)
	case "flush":
		return "flush"
	}
	return fmt.Sprintf("%s(%#x+%#x)", e.op, e.off, e.n)
}

// memStore is a Store in memory. It logs SetWritePointer, Flush and
// WriteZeroes calls (and WriteAt when logWrites is set) so tests can assert
// their order, checks every recorded write pointer against the data that has
// completed below it, and keeps what the last Flush made durable so a test
// can "crash" and reopen.
type memStore struct {
	g Geometry
	// hook, when set, runs first in every call; an error it returns is the
	// call's error. It runs with the Device's lock held for "setwp".
	hook func(op string, off, n int64) error

	dmu  sync.RWMutex // writes and reads share it: the Device keeps them disjoint
	data []byte

	mu         sync.Mutex
	logWrites  bool
	events     []event
	settled    []bool // per sector: a WriteAt or WriteZeroes completed
	wps        []int64
	durable    []byte
	durableWPs []int64
	violations []string
}

func newMemStore(g Geometry) *memStore {
	nz := g.NumZones()
	s := &memStore{
		g:          g,
		data:       make([]byte, g.Size),
		durable:    make([]byte, g.Size),
		settled:    make([]bool, g.Size/SectorSize),
		wps:        make([]int64, nz),
		durableWPs: make([]int64, nz),
	}
	for i := range s.wps {
		s.wps[i] = int64(i) * g.ZoneSize
		s.durableWPs[i] = s.wps[i]
	}
	return s
}

func (s *memStore) call(op string, off, n int64) error {
	if s.hook != nil {
		return s.hook(op, off, n)
	}
	return nil
}

func (s *memStore) ReadAt(p []byte, off int64) (int, error) {
	if err := s.call("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	if off < 0 || off+int64(len(p)) > int64(len(s.data)) {
		return 0, fmt.Errorf("memStore: read %#x+%#x out of range", off, len(p))
	}
	s.dmu.RLock()
	defer s.dmu.RUnlock()
	return copy(p, s.data[off:]), nil
}

func (s *memStore) WriteAt(p []byte, off int64) (int, error) {
	if err := s.call("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if off < 0 || off+int64(len(p)) > int64(len(s.data)) {
		return 0, fmt.Errorf("memStore: write %#x+%#x out of range", off, len(p))
	}
	s.dmu.RLock()
	n := copy(s.data[off:], p)
	s.dmu.RUnlock()
	s.settle(off, int64(n))
	s.mu.Lock()
	if s.logWrites {
		s.events = append(s.events, event{op: "write", off: off, n: int64(n)})
	}
	s.mu.Unlock()
	return n, nil
}

func (s *memStore) WriteZeroes(off, n int64) error {
	if err := s.call("zero", off, n); err != nil {
		return err
	}
	if off < 0 || off+n > int64(len(s.data)) {
		return fmt.Errorf("memStore: zero %#x+%#x out of range", off, n)
	}
	s.dmu.Lock()
	clear(s.data[off : off+n])
	s.dmu.Unlock()
	s.settle(off, n)
	s.mu.Lock()
	s.events = append(s.events, event{op: "zero", off: off, n: n})
	s.mu.Unlock()
	return nil
}

// settle marks the whole sectors of a completed write.
func (s *memStore) settle(off, n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sec := (off + SectorSize - 1) / SectorSize; (sec+1)*SectorSize <= off+n; sec++ {
		s.settled[sec] = true
	}
}

func (s *memStore) Flush() error {
	if err := s.call("flush", 0, 0); err != nil {
		return err
	}
	// Data first, then the write pointers: the order a Store promises.
	s.dmu.Lock()
	copy(s.durable, s.data)
	s.dmu.Unlock()
	s.mu.Lock()
	copy(s.durableWPs, s.wps)
	s.events = append(s.events, event{op: "flush"})
	s.mu.Unlock()
	return nil
}

func (s *memStore) SetWritePointer(zone int, wp int64) error {
	if err := s.call("setwp", wp, 0); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	start := int64(zone) * s.g.ZoneSize
	s.events = append(s.events, event{op: "setwp", zone: zone, off: wp})
	switch {
	case zone < s.g.ConventionalZones || zone >= len(s.wps):
		s.violations = append(s.violations, fmt.Sprintf("setwp on zone %d", zone))
		return nil
	case wp == start:
		// A reset: nothing below the pointer counts as written any more.
		for sec := start / SectorSize; sec < (start+s.g.zoneLength(zone))/SectorSize; sec++ {
			s.settled[sec] = false
		}
	case wp < s.wps[zone] && wp != s.durableWPs[zone]:
		// Back to the durable value is a power cut's undo; lower is not.
		s.violations = append(s.violations, fmt.Sprintf("zone %d: write pointer moved back from %#x to %#x", zone, s.wps[zone], wp))
	}
	// Past the capacity nothing is ever written; finish records the zone end.
	for sec := start / SectorSize; sec*SectorSize < min(wp, start+s.g.zoneCapacity(zone)); sec++ {
		if !s.settled[sec] {
			s.violations = append(s.violations, fmt.Sprintf("zone %d: write pointer %#x recorded over unwritten sector at %#x", zone, wp, sec*SectorSize))
			break
		}
	}
	s.wps[zone] = wp
	return nil
}

// crashed returns a store holding only what the last Flush made durable,
// and the write pointers to open it with.
func (s *memStore) crashed() (*memStore, []int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := newMemStore(s.g)
	copy(c.data, s.durable)
	copy(c.durable, s.durable)
	copy(c.wps, s.durableWPs)
	copy(c.durableWPs, s.durableWPs)
	// Durable data below a durable write pointer was settled when written.
	for i := range c.settled {
		c.settled[i] = true
	}
	return c, append([]int64(nil), s.durableWPs...)
}

func (s *memStore) takeEvents() []event {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.events
	s.events = nil
	return e
}

func (s *memStore) recorded(zone int) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.wps[zone]
}

func (s *memStore) durableWP(zone int) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.durableWPs[zone]
}

func (s *memStore) problems() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.violations...)
}

// initialWPs is the write-pointer table of a fresh image.
func initialWPs(g Geometry) []int64 {
	wps := make([]int64, g.NumZones())
	for i := range wps {
		wps[i] = int64(i) * g.ZoneSize
	}
	return wps
}
