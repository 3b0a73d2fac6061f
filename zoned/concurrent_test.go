package zoned

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// stamp fills p so that every sector names its own absolute offset and its
// writer; checkSector recognises such a sector anywhere.
func stamp(p []byte, off int64, writer, seq uint32) {
	for k := 0; k < len(p); k += SectorSize {
		sec := p[k : k+SectorSize]
		binary.LittleEndian.PutUint64(sec, uint64(off)+uint64(k))
		binary.LittleEndian.PutUint32(sec[8:], writer)
		binary.LittleEndian.PutUint32(sec[12:], seq)
		for j := 16; j < SectorSize; j++ {
			sec[j] = byte(writer*31 + seq + uint32(j))
		}
	}
}

// checkSector: a sector read at off is all zeros or wholly one stamped sector
// written for off.
func checkSector(sec []byte, off int64) error {
	if isZero(sec) {
		return nil
	}
	if got := int64(binary.LittleEndian.Uint64(sec)); got != off {
		return fmt.Errorf("sector at %#x holds data written for %#x", off, got)
	}
	writer, seq := binary.LittleEndian.Uint32(sec[8:]), binary.LittleEndian.Uint32(sec[12:])
	for j := 16; j < SectorSize; j++ {
		if sec[j] != byte(writer*31+seq+uint32(j)) {
			return fmt.Errorf("sector at %#x is torn", off)
		}
	}
	return nil
}

func isZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

type landed struct {
	zone        int
	off, n      int64
	writer, seq uint32
}

func TestConcurrentAppendsLandExactlyOnce(t *testing.T) {
	for _, tc := range []struct {
		name    string
		maxOpen int
	}{{"unlimited zones", 0}, {"two open zones, LRU closing under load", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			const writers, zones = 16, 4
			g := Geometry{Size: zones << 20, ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, MaxAppendBytes: 16 << 10, MaxOpenZones: tc.maxOpen}
			d, s := newDev(t, g)

			var (
				mu        sync.Mutex
				completed []landed // in completion order
				wg        sync.WaitGroup
				running   atomic.Bool
			)
			running.Store(true)
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 7))
					full := map[int]bool{}
					for seq := uint32(0); len(full) < zones; seq++ {
						zone := rng.IntN(zones)
						if full[zone] {
							continue
						}
						n := int64(512 * (1 + rng.IntN(8)))
						p := make([]byte, n)
						// Where it lands is known only afterwards: stamp
						// relative to the buffer, check against the
						// returned offset at the end.
						stamp(p, 0, uint32(w), seq)
						off, err := d.Append(p, int64(zone)<<20)
						if errors.Is(err, ErrBeyondCapacity) {
							// Maybe only this append did not fit.
							if zi, _ := d.ZoneAt(int64(zone) << 20); zi.Cond == Full {
								full[zone] = true
							}
							continue
						}
						if err != nil {
							t.Errorf("writer %d: append: %v", w, err)
							return
						}
						mu.Lock()
						completed = append(completed, landed{zone, off, n, uint32(w), seq})
						mu.Unlock()
					}
				}()
			}
			// A flusher: everything completed before a Flush is durable after it.
			var bg sync.WaitGroup
			bg.Add(1)
			go func() {
				defer bg.Done()
				for running.Load() {
					mu.Lock()
					before := slices.Clone(completed)
					mu.Unlock()
					if err := d.Flush(); err != nil {
						t.Errorf("flush: %v", err)
						return
					}
					for _, l := range before {
						if dw := s.durableWP(l.zone); dw < l.off+l.n {
							t.Errorf("append %#x+%#x completed before a flush, durable wp after it is %#x", l.off, l.n, dw)
							return
						}
					}
				}
			}()
			wg.Wait()
			running.Store(false)
			bg.Wait()

			// Every append present exactly once, tiling each zone with no gap
			// or overlap up to the write pointer, which is the sum of the sizes.
			byZone := make([][]landed, zones)
			for _, l := range completed {
				byZone[l.zone] = append(byZone[l.zone], l)
			}
			for z := range zones {
				ls := byZone[z]
				slices.SortFunc(ls, func(a, b landed) int { return int(a.off - b.off) })
				next := int64(z) << 20
				var sum int64
				for _, l := range ls {
					if l.off != next {
						t.Fatalf("zone %d: append %+v at %#x, expected the next one at %#x (gap or overlap)", z, l, l.off, next)
					}
					next += l.n
					sum += l.n
				}
				zi := zoneN(d, z)
				if zi.WritePointer != zi.Start+sum || sum != g.ZoneCapacity || zi.Cond != Full {
					t.Errorf("zone %d: %+v, appended %#x bytes", z, zi, sum)
				}
				data := readAll(t, d, zi.Start, g.ZoneSize)
				for _, l := range ls {
					want := make([]byte, l.n)
					stamp(want, 0, l.writer, l.seq)
					got := data[l.off-zi.Start : l.off-zi.Start+l.n]
					if string(got) != string(want) {
						t.Fatalf("zone %d: data of writer %d seq %d at %#x is not what it appended", z, l.writer, l.seq, l.off)
					}
				}
				if rec := s.recorded(z); rec != zi.WritePointer {
					t.Errorf("zone %d: recorded wp %#x, device wp %#x", z, rec, zi.WritePointer)
				}
			}
		})
	}
}

func TestConcurrentReadersSeeOnlyWholeCompletedWrites(t *testing.T) {
	const writers = 8
	g := Geometry{Size: 2 << 20, ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, MaxAppendBytes: 16 << 10}
	d, _ := newDev(t, g)
	var wg sync.WaitGroup
	var done atomic.Bool
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			for seq := uint32(0); ; seq++ {
				if r := d.Report(0, 2); r[0].Cond == Full && r[1].Cond == Full {
					return
				}
				zone := int64(rng.IntN(2)) << 20
				// Regular writes at the write pointer race with each other:
				// the loser gets ErrNotAtWritePointer and tries again.
				zi, _ := d.ZoneAt(zone)
				n := int64(512 * (1 + rng.IntN(8)))
				if zi.WritePointer+n > zi.Start+zi.Capacity {
					n = zi.Start + zi.Capacity - zi.WritePointer
				}
				if n == 0 {
					continue
				}
				p := make([]byte, n)
				stamp(p, zi.WritePointer, uint32(w), seq)
				if _, err := d.WriteAt(p, zi.WritePointer); err != nil &&
					!errors.Is(err, ErrNotAtWritePointer) && !errors.Is(err, ErrBeyondCapacity) {
					t.Errorf("write: %v", err)
					return
				}
			}
		}()
	}
	var rg sync.WaitGroup
	for r := range 4 {
		rg.Add(1)
		go func() {
			defer rg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 11))
			for !done.Load() {
				off := rng.Int64N(g.Size/SectorSize) * SectorSize
				n := min(int64(512*(1+rng.IntN(64))), g.Size-off)
				p := make([]byte, n)
				if _, err := d.ReadAt(p, off); err != nil {
					t.Errorf("read: %v", err)
					return
				}
				for k := int64(0); k < n; k += SectorSize {
					if err := checkSector(p[k:k+SectorSize], off+k); err != nil {
						t.Errorf("read %#x+%#x: %v", off, n, err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	done.Store(true)
	rg.Wait()
	all := readAll(t, d, 0, g.Size)
	for k := int64(0); k < g.Size; k += SectorSize {
		if err := checkSector(all[k:k+SectorSize], k); err != nil {
			t.Fatal(err)
		}
		if isZero(all[k : k+SectorSize]) {
			t.Fatalf("sector %#x of a full zone is empty", k)
		}
	}
}

func TestWritersRacingForTheWritePointerExactlyOneWins(t *testing.T) {
	d, _ := newDev(t, Geometry{Size: 2 << 20, ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, MaxAppendBytes: 4096})
	for round := range 200 {
		off := int64(round) * 512
		var wins, losses atomic.Int32
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := d.WriteAt(fill(512, byte(round)), off)
				switch {
				case err == nil:
					wins.Add(1)
				case errors.Is(err, ErrNotAtWritePointer):
					losses.Add(1)
				default:
					t.Errorf("write: %v", err)
				}
			}()
		}
		wg.Wait()
		if wins.Load() != 1 || losses.Load() != 7 {
			t.Fatalf("round %d: %d wins, %d losses", round, wins.Load(), losses.Load())
		}
	}
}

// TestManagementDuringConcurrentAppendsStaysConsistent races finish, reset,
// open, close and flush against appenders with a tight open limit: nothing
// may deadlock, the store must never see a write pointer over unwritten data,
// and at rest the counts and recorded pointers must agree with the report.
func TestManagementDuringConcurrentAppendsStaysConsistent(t *testing.T) {
	const zones = 4
	g := Geometry{Size: zones * 64 << 10, ZoneSize: 64 << 10, ZoneCapacity: 48 << 10, MaxAppendBytes: 8 << 10, MaxOpenZones: 1, MaxActiveZones: 3}
	d, s := newDev(t, g)
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 3))
			for !stop.Load() {
				zone := int64(rng.IntN(zones)) * g.ZoneSize
				_, err := d.Append(fill(512*(1+rng.IntN(16)), byte(w)), zone)
				if err != nil && !errors.Is(err, ErrBeyondCapacity) && !errors.Is(err, ErrOpenResources) && !errors.Is(err, ErrActiveResources) {
					t.Errorf("append: %v", err)
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(42, 3))
		for range 3000 {
			off := int64(rng.IntN(zones)) * g.ZoneSize
			var err error
			switch rng.IntN(6) {
			case 0:
				err = d.Finish(off, g.ZoneSize)
			case 1:
				err = d.Reset(off, g.ZoneSize)
			case 2:
				err = d.Open(off, g.ZoneSize)
			case 3:
				err = d.Close(off, g.ZoneSize)
			case 4:
				err = d.Flush()
			case 5:
				if rng.IntN(10) == 0 {
					err = d.ResetAll()
				}
			}
			if err != nil && !errors.Is(err, ErrOpenResources) && !errors.Is(err, ErrActiveResources) {
				t.Errorf("management: %v", err)
				return
			}
		}
		stop.Store(true)
	}()
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(2 * time.Minute):
		t.Fatal("deadlock: appenders and management operations did not finish")
	}
	open, active := d.Resources()
	var o, a int
	for i, z := range d.Report(0, zones) {
		switch z.Cond {
		case ImplicitOpen, ExplicitOpen:
			o++
			a++
		case Closed:
			a++
		}
		if rec := s.recorded(i); rec != z.WritePointer {
			t.Errorf("zone %d at rest: recorded wp %#x, device wp %#x", i, rec, z.WritePointer)
		}
	}
	if o != open || a != active || open > 1 || active > 3 {
		t.Errorf("resources %d open %d active; report counts %d, %d; limits 1, 3", open, active, o, a)
	}
}
