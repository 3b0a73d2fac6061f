package zoned

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"
)

var errInjected = errors.New("injected I/O error")

// gates holds data writes at chosen offsets until released, then fails them
// or lets them through.
type gates struct {
	mu sync.Mutex
	m  map[int64]*gate
}

type gate struct {
	entered chan struct{}
	release chan error // the write's result: nil lets it through
}

func newGates(s *memStore) *gates {
	g := &gates{m: map[int64]*gate{}}
	s.hook = func(op string, off, _ int64) error {
		if op != "write" {
			return nil
		}
		g.mu.Lock()
		gt := g.m[off]
		delete(g.m, off) // one write per gate
		g.mu.Unlock()
		if gt == nil {
			return nil
		}
		close(gt.entered)
		return <-gt.release
	}
	return g
}

func (g *gates) at(off int64) *gate {
	g.mu.Lock()
	defer g.mu.Unlock()
	gt := &gate{entered: make(chan struct{}), release: make(chan error, 1)}
	g.m[off] = gt
	return gt
}

// appendAsync starts an append held at its gate and returns its result
// channel once the data write has begun (so its range is reserved).
func appendAsync(d *Device, p []byte, zone int64, gt *gate) chan error {
	res := make(chan error, 1)
	go func() {
		_, err := d.Append(p, zone)
		res <- err
	}()
	<-gt.entered
	return res
}

// failOnce makes the first call of op fail.
func failOnce(s *memStore, op string) {
	var once sync.Once
	s.hook = func(o string, _, _ int64) error {
		var err error
		if o == op {
			once.Do(func() { err = errInjected })
		}
		return err
	}
}

func TestFailedLastWriteIsRolledBack(t *testing.T) {
	const z = 4096
	tests := []struct {
		name     string
		prep     int // bytes written before
		explicit bool
		want     Condition
		open     int
	}{
		{"into an empty zone, which becomes empty again", 0, false, Empty, 0},
		{"into an explicitly opened empty zone, which stays open", 0, true, ExplicitOpen, 1},
		{"into a written zone, which keeps its data and stays open", 1024, false, ImplicitOpen, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, s := newDev(t, small)
			if tc.explicit {
				mustDo(t, d.Open(z, 4096))
			}
			if tc.prep > 0 {
				mustDo(t, func() error { _, err := d.WriteAt(fill(tc.prep, 1), z); return err }())
			}
			failOnce(s, "write")
			n, err := d.WriteAt(fill(512, 2), z+int64(tc.prep))
			if !errors.Is(err, errInjected) || n != 0 {
				t.Fatalf("WriteAt = %d, %v; want 0 and the store's error", n, err)
			}
			got := zoneN(d, 1)
			if got.WritePointer != z+int64(tc.prep) || got.Cond != tc.want {
				t.Fatalf("zone after the failed write = %+v, want %v at %#x", got, tc.want, z+tc.prep)
			}
			if open, _ := d.Resources(); open != tc.open {
				t.Errorf("open zones = %d, want %d", open, tc.open)
			}
			if s.recorded(1) != z+int64(tc.prep) {
				t.Errorf("recorded wp = %#x", s.recorded(1))
			}
			if _, err := d.WriteAt(fill(512, 3), z+int64(tc.prep)); err != nil {
				t.Fatalf("retry at the same offset: %v", err)
			}
			if want := append(fill(tc.prep, 1), fill(512, 3)...); !bytes.Equal(readAll(t, d, z, int64(len(want))), want) {
				t.Errorf("data after the retry differs")
			}
		})
	}
}

func TestFailedWriteThatFilledTheZoneFailsIt(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	failOnce(s, "write")
	if _, err := d.WriteAt(fill(3072, 1), z); !errors.Is(err, errInjected) {
		t.Fatalf("WriteAt: %v", err)
	}
	if _, err := d.Append(fill(512, 1), z); !errors.Is(err, ErrZoneFailed) || Errno(err) != syscall.EIO {
		t.Fatalf("append to the failed zone: %v (errno %v), want ErrZoneFailed / EIO", err, Errno(err))
	}
	if got := readAll(t, d, z, 3072); !bytes.Equal(got, fill(3072, 0)) {
		t.Errorf("the failed range does not read as zeros")
	}
	if s.recorded(1) != z {
		t.Errorf("recorded wp = %#x, want the zone start", s.recorded(1))
	}
	mustDo(t, d.Reset(z, 4096))
	if _, err := d.WriteAt(fill(512, 1), z); err != nil {
		t.Fatalf("write after reset: %v", err)
	}
}

func TestFailedWriteBelowLaterReservationsFailsTheZone(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	gs := newGates(s)
	ga := gs.at(z)
	resA := appendAsync(d, fill(512, 0xA), z, ga)
	if off, err := d.Append(fill(512, 0xB), z); err != nil || off != z+512 {
		t.Fatalf("append B = %#x, %v", off, err)
	}
	if s.recorded(1) != z {
		t.Fatalf("recorded wp %#x passed a write in flight", s.recorded(1))
	}
	ga.release <- errInjected
	if err := <-resA; !errors.Is(err, errInjected) {
		t.Fatalf("append A: %v, want the store's error", err)
	}

	for name, op := range map[string]func() error{
		"write":  func() error { _, err := d.WriteAt(fill(512, 1), z+1024); return err },
		"append": func() error { _, err := d.Append(fill(512, 1), z); return err },
		"finish": func() error { return d.Finish(z, 4096) },
	} {
		if err := op(); !errors.Is(err, ErrZoneFailed) {
			t.Errorf("%s on the failed zone: %v, want ErrZoneFailed", name, err)
		}
	}
	mustDo(t, d.Close(z, 4096))
	mustDo(t, d.Open(z, 4096))
	if got := readAll(t, d, z, 1536); !bytes.Equal(got, append(append(fill(512, 0), fill(512, 0xB)...), fill(512, 0)...)) {
		t.Errorf("reads of the failed zone: failed range not zeros or B's data lost")
	}
	if s.recorded(1) != z {
		t.Errorf("recorded wp = %#x, want it held at the failed write %#x", s.recorded(1), z)
	}
	// B was acknowledged but can never become durable: the next flush says so, once.
	if err := d.Flush(); !errors.Is(err, ErrZoneFailed) {
		t.Errorf("first flush after the loss: %v, want ErrZoneFailed", err)
	}
	if err := d.Flush(); err != nil {
		t.Errorf("second flush: %v", err)
	}
	mustDo(t, d.Reset(z, 4096))
	if got := zoneN(d, 1); got.Cond != Empty || got.WritePointer != z {
		t.Fatalf("after reset: %+v", got)
	}
	if off, err := d.Append(fill(512, 1), z); err != nil || off != z {
		t.Fatalf("append after reset = %#x, %v", off, err)
	}
}

func TestWritesBelowAFailureCompleteAndWritesAboveItReportIt(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	gs := newGates(s)
	ga, gb, gc := gs.at(z), gs.at(z+512), gs.at(z+1024)
	resA := appendAsync(d, fill(512, 0xA), z, ga)
	resB := appendAsync(d, fill(512, 0xB), z, gb)
	resC := appendAsync(d, fill(512, 0xC), z, gc)
	gb.release <- errInjected
	if err := <-resB; !errors.Is(err, errInjected) {
		t.Fatalf("B: %v", err)
	}
	gc.release <- nil
	if err := <-resC; !errors.Is(err, ErrZoneFailed) {
		t.Fatalf("C above the failure: %v, want ErrZoneFailed", err)
	}
	ga.release <- nil
	if err := <-resA; err != nil {
		t.Fatalf("A below the failure: %v", err)
	}
	if s.recorded(1) != z+512 {
		t.Errorf("recorded wp = %#x, want %#x (A's end, B's start)", s.recorded(1), z+512)
	}
	if err := d.Flush(); err != nil {
		t.Errorf("flush: %v (nothing acknowledged was lost)", err)
	}
	if s.durableWP(1) != z+512 {
		t.Errorf("durable wp = %#x, want %#x", s.durableWP(1), z+512)
	}
}

func TestFailingWritePointerRecordFailsTheZone(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	failOnce(s, "setwp")
	if _, err := d.WriteAt(fill(512, 1), z); !errors.Is(err, errInjected) {
		t.Fatalf("WriteAt: %v", err)
	}
	if _, err := d.WriteAt(fill(512, 1), z+512); !errors.Is(err, ErrZoneFailed) {
		t.Fatalf("next write: %v, want ErrZoneFailed", err)
	}
	mustDo(t, d.Reset(z, 4096))
	if _, err := d.WriteAt(fill(512, 1), z); err != nil {
		t.Fatalf("write after reset: %v", err)
	}
}

func TestResetWhoseFlushFailsZeroesNothingAndFailsTheZone(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	mustDo(t, func() error { _, err := d.WriteAt(fill(512, 1), z); return err }())
	failOnce(s, "flush")
	s.takeEvents()
	if err := d.Reset(z, 4096); !errors.Is(err, errInjected) {
		t.Fatalf("Reset: %v", err)
	}
	for _, e := range s.takeEvents() {
		if e.op == "zero" {
			t.Errorf("zeroed data before the reset write pointer was durable: %v", e)
		}
	}
	if _, err := d.WriteAt(fill(512, 1), z); !errors.Is(err, ErrZoneFailed) {
		t.Fatalf("write after a failed reset: %v, want ErrZoneFailed", err)
	}
	mustDo(t, d.Reset(z, 4096))
	if _, err := d.WriteAt(fill(512, 1), z); err != nil {
		t.Fatalf("write after a good reset: %v", err)
	}
}

func TestResetWhoseZeroingFailsLeavesAnUsableEmptyZone(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	mustDo(t, func() error { _, err := d.WriteAt(fill(1024, 1), z); return err }())
	failOnce(s, "zero")
	if err := d.Reset(z, 4096); !errors.Is(err, errInjected) {
		t.Fatalf("Reset: %v", err)
	}
	if got := zoneN(d, 1); got.Cond != Empty || got.WritePointer != z {
		t.Fatalf("zone = %+v", got)
	}
	if got := readAll(t, d, z, 4096); !bytes.Equal(got, fill(4096, 0)) {
		t.Errorf("old data visible after reset")
	}
	if _, err := d.WriteAt(fill(512, 2), z); err != nil {
		t.Fatalf("write: %v", err)
	}
	if got := readAll(t, d, z, 1024); !bytes.Equal(got, append(fill(512, 2), fill(512, 0)...)) {
		t.Errorf("old data visible past the new write pointer")
	}
}

func TestFinishWhoseZeroingFailsFailsTheZone(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	mustDo(t, func() error { _, err := d.WriteAt(fill(1024, 1), z); return err }())
	failOnce(s, "zero")
	if err := d.Finish(z, 4096); !errors.Is(err, errInjected) {
		t.Fatalf("Finish: %v", err)
	}
	if got := readAll(t, d, z, 2048); !bytes.Equal(got, append(fill(1024, 1), fill(1024, 0)...)) {
		t.Errorf("data changed")
	}
	if s.recorded(1) != z+1024 {
		t.Errorf("recorded wp = %#x, want the old write pointer", s.recorded(1))
	}
	mustDo(t, d.Reset(z, 4096))
	mustDo(t, d.Finish(z, 4096))
}

func TestFlushWaitsForLowerWritesInFlight(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	gs := newGates(s)
	ga := gs.at(z)
	resA := appendAsync(d, fill(512, 0xA), z, ga)
	if _, err := d.Append(fill(512, 0xB), z); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- d.Flush() }()
	select {
	case err := <-flushed:
		t.Fatalf("flush returned (%v) while a write below a completed one was in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	ga.release <- nil
	if err := <-resA; err != nil {
		t.Fatal(err)
	}
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if s.durableWP(1) != z+1024 {
		t.Errorf("durable wp after flush = %#x, want %#x covering both appends", s.durableWP(1), z+1024)
	}
}

func TestFlushDoesNotWaitForWritesWithNothingCompletedAbove(t *testing.T) {
	// A write in flight is not covered by a flush issued during it, so a
	// slow write must not hold up the flush unless a completed write sits
	// above it.
	const z = 4096
	d, s := newDev(t, small)
	mustDo(t, func() error { _, err := d.WriteAt(fill(512, 1), z); return err }())
	gs := newGates(s)
	ga := gs.at(z + 512)
	resA := appendAsync(d, fill(512, 0xA), z, ga)
	done := make(chan error, 1)
	go func() { done <- d.Flush() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Errorf("flush waited for a write with nothing completed above it")
		ga.release <- nil
		<-done
		<-resA
		return
	}
	if s.durableWP(1) != z+512 {
		t.Errorf("durable wp = %#x, want %#x", s.durableWP(1), z+512)
	}
	ga.release <- nil
	if err := <-resA; err != nil {
		t.Fatal(err)
	}
}

func TestResetAndFinishWaitForWritesInFlight(t *testing.T) {
	const z = 4096
	for _, op := range []string{"reset", "finish"} {
		t.Run(op, func(t *testing.T) {
			d, s := newDev(t, small)
			gs := newGates(s)
			ga := gs.at(z)
			resA := appendAsync(d, fill(512, 0xA), z, ga)
			done := make(chan error, 1)
			go func() {
				if op == "reset" {
					done <- d.Reset(z, 4096)
				} else {
					done <- d.Finish(z, 4096)
				}
			}()
			select {
			case err := <-done:
				t.Fatalf("%s returned (%v) with a write in flight", op, err)
			case <-time.After(50 * time.Millisecond):
			}
			// A write arriving meanwhile waits for the operation.
			later := make(chan error, 1)
			go func() { _, err := d.Append(fill(512, 0xC), z); later <- err }()
			ga.release <- nil
			if err := <-resA; err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			err := <-later
			if op == "reset" {
				if err != nil {
					t.Fatalf("append after the reset: %v", err)
				}
				if got := readAll(t, d, z, 1024); !bytes.Equal(got, append(fill(512, 0xC), fill(512, 0)...)) {
					t.Errorf("zone after reset + append holds the wrong data")
				}
			} else if !errors.Is(err, ErrBeyondCapacity) {
				t.Fatalf("append after the finish: %v, want ErrBeyondCapacity", err)
			}
		})
	}
}

func TestWritesInFlightReadAsZerosUntilTheyComplete(t *testing.T) {
	const z = 4096
	d, s := newDev(t, small)
	gs := newGates(s)
	ga := gs.at(z)
	resA := appendAsync(d, fill(512, 0xA), z, ga)
	if _, err := d.Append(fill(512, 0xB), z); err != nil {
		t.Fatal(err)
	}
	// Whatever the Store holds under a write in flight (old bytes, half a
	// write) is not data yet.
	copy(s.data[z:z+512], fill(512, 0x5A))
	if got := readAll(t, d, z, 1024); !bytes.Equal(got, append(fill(512, 0), fill(512, 0xB)...)) {
		t.Errorf("read during the write: in-flight range not zeros, or completed data missing")
	}
	ga.release <- nil
	if err := <-resA; err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, d, z, 1024); !bytes.Equal(got, append(fill(512, 0xA), fill(512, 0xB)...)) {
		t.Errorf("read after the write differs")
	}
}

// shortStore writes one byte less than asked and reports no error.
type shortStore struct{ *memStore }

func (s shortStore) WriteAt(p []byte, off int64) (int, error) {
	n, err := s.memStore.WriteAt(p[:len(p)-1], off)
	return n, err
}

func TestStoreErrorsSurfaceWithContext(t *testing.T) {
	const z = 4096
	tests := []struct {
		name   string
		failOp string
		do     func(d *Device) error
		check  func(t *testing.T, d *Device, s *memStore)
	}{
		{"read", "read", func(d *Device) error { _, err := d.ReadAt(make([]byte, 512), 0); return err }, nil},
		{"read of written sequential data", "read", func(d *Device) error {
			d.s.(*memStore).hook = nil
			if _, err := d.WriteAt(fill(512, 1), z); err != nil {
				return err
			}
			failOnce(d.s.(*memStore), "read")
			_, err := d.ReadAt(make([]byte, 1024), z)
			return err
		}, nil},
		{"flush", "flush", func(d *Device) error { return d.Flush() }, nil},
		{"conventional write", "write", func(d *Device) error { _, err := d.WriteAt(fill(10, 1), 0); return err }, nil},
		{"finish recording the zone end", "setwp", func(d *Device) error { return d.Finish(z, 4096) },
			func(t *testing.T, d *Device, s *memStore) {
				if _, err := d.Append(fill(512, 1), z); !errors.Is(err, ErrBeyondCapacity) && !errors.Is(err, ErrZoneFailed) {
					t.Errorf("append after the failed finish: %v", err)
				}
				if err := d.Reset(z, 4096); err != nil {
					t.Errorf("reset: %v", err)
				}
			}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, s := newDev(t, small)
			failOnce(s, tc.failOp)
			if err := tc.do(d); !errors.Is(err, errInjected) || Errno(err) != syscall.EIO {
				t.Fatalf("err = %v (errno %v), want the store's error as EIO", err, Errno(err))
			}
			if tc.check != nil {
				tc.check(t, d, s)
			}
		})
	}
	t.Run("short write", func(t *testing.T) {
		s := newMemStore(small)
		d, err := New(shortStore{s}, small, initialWPs(small))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.WriteAt(fill(512, 1), z); !errors.Is(err, io.ErrShortWrite) {
			t.Fatalf("err = %v, want io.ErrShortWrite", err)
		}
		if got := zoneN(d, 1); got.WritePointer != z || got.Cond != Empty {
			t.Errorf("zone after a short write = %+v, want it rolled back", got)
		}
	})
}

func TestReportAndZoneAtBounds(t *testing.T) {
	d, _ := newDev(t, small)
	for _, tc := range []struct{ first, n, want int }{{-1, 1, 0}, {8, 1, 0}, {0, 0, 0}, {6, 5, 2}, {0, 100, 8}} {
		if got := len(d.Report(tc.first, tc.n)); got != tc.want {
			t.Errorf("Report(%d, %d) has %d zones, want %d", tc.first, tc.n, got, tc.want)
		}
	}
	for _, off := range []int64{-1, small.Size} {
		if _, err := d.ZoneAt(off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("ZoneAt(%#x) err = %v", off, err)
		}
	}
	if z, err := d.ZoneAt(2*4096 + 100); err != nil || z.Start != 2*4096 {
		t.Errorf("ZoneAt inside zone 2 = %+v, %v", z, err)
	}
}
