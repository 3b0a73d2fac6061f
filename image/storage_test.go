package image

import (
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
)

// memStorage is Storage in memory. It models a volatile write cache: writes
// land in pending until Sync, and crash() returns what a power cut at this
// moment could leave on disk.
type memStorage struct {
	mu      sync.Mutex
	durable []byte
	current []byte
	pending []memWrite
	writes  int // WriteAt, Truncate and PunchHole calls, for tests that must see none
	syncs   int
	punches int
	closed  bool
	// failWrite, when set, fails the write it returns true for.
	failWrite func(off int64, n int) bool
	// With cutAt set, the cutAt-th WriteAt, Truncate or Sync first records
	// in cut what a power cut just before it would leave.
	cutAt, calls int
	cutRand      *rand.Rand
	cut          []byte
	// afterSync, if set, sees the file as each Sync leaves it durable.
	afterSync func(durable []byte)
}

// mutating counts a call that changes the file and takes the cut if it is
// due. m.mu is held.
func (m *memStorage) mutating() {
	if m.calls++; m.calls == m.cutAt {
		m.cut = m.crashLocked(m.cutRand)
	}
}

type memWrite struct {
	off      int64
	data     []byte
	truncate bool
}

func newMemStorage(b []byte) *memStorage {
	return &memStorage{durable: append([]byte(nil), b...), current: append([]byte(nil), b...)}
}

func (m *memStorage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	if off >= int64(len(m.current)) {
		return 0, io.EOF
	}
	n := copy(p, m.current[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func grow(b []byte, size int64) []byte {
	if int64(len(b)) < size {
		b = append(b, make([]byte, size-int64(len(b)))...)
	}
	return b
}

func (m *memStorage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.writes++
	m.mutating()
	if m.failWrite != nil && m.failWrite(off, len(p)) {
		return 0, fmt.Errorf("injected write error at %#x", off)
	}
	m.current = grow(m.current, off+int64(len(p)))
	copy(m.current[off:], p)
	m.pending = append(m.pending, memWrite{off: off, data: append([]byte(nil), p...)})
	return len(p), nil
}

func (m *memStorage) Truncate(size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.writes++
	m.mutating()
	if size < int64(len(m.current)) {
		m.current = m.current[:size]
	} else {
		m.current = grow(m.current, size)
	}
	m.pending = append(m.pending, memWrite{off: size, truncate: true})
	return nil
}

// PunchHole is a write of zeros: until a Sync, a power cut may keep or
// drop it, sector by sector.
func (m *memStorage) PunchHole(off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.writes++
	m.mutating()
	m.punches++
	end := min(off+length, int64(len(m.current)))
	if off >= end {
		return nil
	}
	clear(m.current[off:end])
	m.pending = append(m.pending, memWrite{off: off, data: make([]byte, end-off)})
	return nil
}

func (m *memStorage) Sync() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.syncs++
	m.mutating()
	if len(m.pending) > 0 {
		m.durable = append(m.durable[:0], m.current...)
		m.pending = nil
	}
	if m.afterSync != nil {
		m.afterSync(append([]byte(nil), m.durable...))
	}
	return nil
}

func (m *memStorage) Size() (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.current)), nil
}

func (m *memStorage) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

// crash returns the file a power cut could leave now: everything synced,
// plus any subset of the writes since, applied in any order a disk could
// reorder them in (each kept or dropped at random, sector-atomic).
func (m *memStorage) crash(r *rand.Rand) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.crashLocked(r)
}

func (m *memStorage) crashLocked(r *rand.Rand) []byte {
	out := append([]byte(nil), m.durable...)
	for _, w := range m.pending {
		if r.IntN(2) == 0 {
			continue
		}
		if w.truncate {
			if w.off > int64(len(out)) {
				out = grow(out, w.off)
			}
			continue
		}
		out = grow(out, w.off+int64(len(w.data)))
		// Keep a random subset of the write's sectors.
		for s := 0; s < len(w.data); s += 512 {
			if r.IntN(4) != 0 {
				copy(out[w.off+int64(s):], w.data[s:min(s+512, len(w.data))])
			}
		}
	}
	return out
}

func (m *memStorage) bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.current...)
}

func (m *memStorage) hasCut() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cut != nil
}
