package zoned

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
)

// benchStores are the Stores the benchmarks run over, so each result is
// reported per store and ratios can be taken within one run. The qcow2 image
// is to be added here.
var benchStores = []struct {
	name string
	open func(b *testing.B, g Geometry) Store
}{
	{"memory", func(b *testing.B, g Geometry) Store { return &plainStore{data: make([]byte, g.Size)} }},
}

// plainStore is memory with nothing else: memStore's bookkeeping would
// dominate a benchmark. Concurrent writes go to disjoint ranges, so the data
// needs no lock.
type plainStore struct {
	data []byte
	wps  sync.Map
}

func (s *plainStore) ReadAt(p []byte, off int64) (int, error)  { return copy(p, s.data[off:]), nil }
func (s *plainStore) WriteAt(p []byte, off int64) (int, error) { return copy(s.data[off:], p), nil }
func (s *plainStore) WriteZeroes(off, n int64) error           { clear(s.data[off : off+n]); return nil }
func (s *plainStore) Flush() error                             { return nil }
func (s *plainStore) SetWritePointer(zone int, wp int64) error { s.wps.Store(zone, wp); return nil }

const benchZones, benchZoneSize = 4, 64 << 20

var benchGeometry = Geometry{Size: benchZones * benchZoneSize, ZoneSize: benchZoneSize, ZoneCapacity: benchZoneSize, MaxAppendBytes: 64 << 10}

func BenchmarkSequentialZoneWrite1MiB(b *testing.B) {
	for _, bs := range benchStores {
		b.Run(bs.name, func(b *testing.B) {
			d, err := New(bs.open(b, benchGeometry), benchGeometry, initialWPs(benchGeometry))
			if err != nil {
				b.Fatal(err)
			}
			p := make([]byte, 1<<20)
			b.SetBytes(int64(len(p)))
			zone, off := 0, int64(0)
			for b.Loop() {
				if off == benchZoneSize {
					zone, off = (zone+1)%benchZones, 0
					if err := d.Reset(int64(zone)*benchZoneSize, benchZoneSize); err != nil {
						b.Fatal(err)
					}
				}
				if _, err := d.WriteAt(p, int64(zone)*benchZoneSize+off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(p))
			}
		})
	}
}

func BenchmarkAppend64KiB16Writers(b *testing.B) {
	for _, bs := range benchStores {
		b.Run(bs.name, func(b *testing.B) {
			d, err := New(bs.open(b, benchGeometry), benchGeometry, initialWPs(benchGeometry))
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(64 << 10)
			b.ResetTimer()
			var next atomic.Int64
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					p := make([]byte, 64<<10)
					zone := int64(w%benchZones) * benchZoneSize
					for next.Add(1) <= int64(b.N) {
						for {
							_, err := d.Append(p, zone)
							if err == nil {
								break
							}
							if !errors.Is(err, ErrBeyondCapacity) {
								b.Error(err)
								return
							}
							// Full: the writers sharing the zone race to
							// reset it; losing that race is harmless.
							if err := d.Reset(zone, benchZoneSize); err != nil {
								b.Error(err)
								return
							}
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}

// BenchmarkWrite4KiBFaultModes is what fault injection costs a write: none
// in force, a rule that selects other requests, and a volatile cache (a
// sequential write pays only its gate).
func BenchmarkWrite4KiBFaultModes(b *testing.B) {
	modes := []struct {
		name  string
		setup func(*Device) error
	}{
		{"none", func(*Device) error { return nil }},
		{"unmatched-rule", func(d *Device) error { _, err := d.AddFault(Fault{Action: Fail, Op: OpRead}); return err }},
		{"volatile-cache", func(d *Device) error { d.SetVolatileCache(); return nil }},
	}
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) {
			d, err := New(&plainStore{data: make([]byte, benchGeometry.Size)}, benchGeometry, initialWPs(benchGeometry))
			if err == nil {
				err = m.setup(d)
			}
			if err != nil {
				b.Fatal(err)
			}
			p := make([]byte, 4096)
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			off := int64(0)
			for b.Loop() {
				if off == benchGeometry.Size {
					if err := d.ResetAll(); err != nil {
						b.Fatal(err)
					}
					off = 0
				}
				if _, err := d.WriteAt(p, off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(p))
			}
		})
	}
}
