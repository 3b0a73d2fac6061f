package volume

import (
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

// The image benchmarks run the same writes through a zoned.Device on a zoned
// qcow2 image ("device") and straight into the image ("plain"), in one
// run: their ratio is the cost of the zone model.

const benchZones, benchZoneSize = 4, 64 << 20

var benchGeometry = zoned.Geometry{Size: benchZones * benchZoneSize, ZoneSize: benchZoneSize, ZoneCapacity: benchZoneSize, MaxAppendBytes: 64 << 10}

func openBenchImage(b *testing.B) (*image.Image, *zoned.Device) {
	p := filepath.Join(b.TempDir(), "bench.qcow2")
	if _, err := CreateZoned(p, image.CreateOptions{Size: benchGeometry.Size}, benchGeometry); err != nil {
		b.Fatal(err)
	}
	img, err := image.Open(p, image.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	d, err := OpenZones(img)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { img.Close() })
	return img, d
}

// plainReset does to the image what a zone reset does, without the zone:
// a flush (the device makes the reset write pointer durable first) and the
// zone's clusters freed.
func plainReset(img *image.Image, off, n int64) error {
	if err := img.Flush(); err != nil {
		return err
	}
	return img.WriteZeroes(off, n, true)
}

func BenchmarkImageZoneWrite1MiB(b *testing.B) { benchZoneWrite(b, 1<<20) }

// BenchmarkImageZoneWrite4KiB is fio's zoned suite's most common request: 4
// KiB sequential writes one at a time, where the cost per request shows.
func BenchmarkImageZoneWrite4KiB(b *testing.B) { benchZoneWrite(b, 4<<10) }

func benchZoneWrite(b *testing.B, size int) {
	for _, mode := range []string{"device", "plain"} {
		b.Run(mode, func(b *testing.B) {
			img, d := openBenchImage(b)
			write, reset := d.WriteAt, d.Reset
			if mode == "plain" {
				write = img.WriteAt
				reset = func(off, n int64) error { return plainReset(img, off, n) }
			}
			p := make([]byte, size)
			b.SetBytes(int64(len(p)))
			zone, off := 0, int64(0)
			for b.Loop() {
				if off == benchZoneSize {
					zone, off = (zone+1)%benchZones, 0
					if err := reset(int64(zone)*benchZoneSize, benchZoneSize); err != nil {
						b.Fatal(err)
					}
				}
				if _, err := write(p, int64(zone)*benchZoneSize+off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(p))
			}
		})
	}
}

// BenchmarkImageAppend64KiB16Writers: 16 writers on 4 zones. The plain
// variant hands out the same offsets with an atomic counter per zone.
func BenchmarkImageAppend64KiB16Writers(b *testing.B) {
	const chunk = 64 << 10
	for _, mode := range []string{"device", "plain"} {
		b.Run(mode, func(b *testing.B) {
			img, d := openBenchImage(b)
			var cursor [benchZones]atomic.Int64
			var resetMu [benchZones]sync.Mutex
			appendPlain := func(p []byte, zone int) error {
				for {
					off := cursor[zone].Add(chunk) - chunk
					if off+chunk <= benchZoneSize {
						_, err := img.WriteAt(p, int64(zone)*benchZoneSize+off)
						return err
					}
					resetMu[zone].Lock()
					if cursor[zone].Load() > benchZoneSize {
						if err := plainReset(img, int64(zone)*benchZoneSize, benchZoneSize); err != nil {
							resetMu[zone].Unlock()
							return err
						}
						cursor[zone].Store(0)
					}
					resetMu[zone].Unlock()
				}
			}
			appendDevice := func(p []byte, zone int) error {
				start := int64(zone) * benchZoneSize
				for {
					_, err := d.Append(p, start)
					if !errors.Is(err, zoned.ErrBeyondCapacity) {
						return err
					}
					if err := d.Reset(start, benchZoneSize); err != nil {
						return err
					}
				}
			}
			appendOne := appendDevice
			if mode == "plain" {
				appendOne = appendPlain
			}
			b.SetBytes(chunk)
			b.ResetTimer()
			var next atomic.Int64
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					p := make([]byte, chunk)
					for next.Add(1) <= int64(b.N) {
						if err := appendOne(p, w%benchZones); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}
