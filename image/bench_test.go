package image

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// The benchmarks run each workload on a qcow2 image and on a raw file of
// the same size in the same run, so their ratio means something on any
// machine. `make bench` prints the ratios.

const benchSize = 256 << 20

type benchTarget struct {
	name string
	open func(b *testing.B) (io.ReaderAt, io.WriterAt, func())
}

var benchTargets = []benchTarget{
	{"qcow2", func(b *testing.B) (io.ReaderAt, io.WriterAt, func()) {
		p := filepath.Join(b.TempDir(), "bench.qcow2")
		if err := Create(p, CreateOptions{Size: benchSize}); err != nil {
			b.Fatal(err)
		}
		img, err := Open(p, OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return img, img, func() { img.Close() }
	}},
	{"raw", func(b *testing.B) (io.ReaderAt, io.WriterAt, func()) {
		f, err := os.Create(filepath.Join(b.TempDir(), "bench.raw"))
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Truncate(benchSize); err != nil {
			b.Fatal(err)
		}
		return f, f, func() { f.Close() }
	}},
}

// fill writes the whole disk once so reads and overwrites hit allocated
// clusters, as they would on a disk in use.
func fill(b *testing.B, w io.WriterAt) {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := int64(0); off < benchSize; off += int64(len(buf)) {
		if _, err := w.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
}

func runBench(b *testing.B, block int, random, write, prefill bool) {
	for _, tg := range benchTargets {
		b.Run(tg.name, func(b *testing.B) {
			r, w, done := tg.open(b)
			defer done()
			if prefill {
				fill(b, w)
			}
			buf := make([]byte, block)
			rng := rand.New(rand.NewPCG(1, 2))
			blocks := int64(benchSize / block)
			b.SetBytes(int64(block))
			b.ResetTimer()
			for i := range b.N {
				off := int64(i) % blocks * int64(block)
				if random {
					off = rng.Int64N(blocks) * int64(block)
				}
				var err error
				if write {
					_, err = w.WriteAt(buf, off)
				} else {
					_, err = r.ReadAt(buf, off)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSequentialWrite1M writes a fresh disk: for qcow2 that includes
// allocating every cluster.
func BenchmarkSequentialWrite1M(b *testing.B) { runBench(b, 1<<20, false, true, false) }
func BenchmarkSequentialRead1M(b *testing.B)  { runBench(b, 1<<20, false, false, true) }
func BenchmarkRandomWrite4K(b *testing.B)     { runBench(b, 4096, true, true, true) }
func BenchmarkRandomRead4K(b *testing.B)      { runBench(b, 4096, true, false, true) }

// BenchmarkOpenImageMemory reports the heap an open image holds after its
// whole disk was read, with the default cache and a small one: the cache
// bound is what keeps it flat as disks grow.
func BenchmarkOpenImageMemory(b *testing.B) {
	p := filepath.Join(b.TempDir(), "mem.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 30, ClusterSize: 4096}); err != nil {
		b.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	fill(b, img)
	img.Close()
	for _, cache := range []int64{256 << 10, DefaultCacheSize} {
		b.Run(fmt.Sprintf("cache=%dKiB", cache>>10), func(b *testing.B) {
			var heap uint64
			buf := make([]byte, 1<<20)
			for range b.N {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				img, err := Open(p, OpenOptions{ReadOnly: true, CacheSize: cache})
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < img.Size(); off += int64(len(buf)) {
					img.ReadAt(buf, off)
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				heap = after.HeapAlloc - before.HeapAlloc
				img.Close()
			}
			b.ReportMetric(float64(heap), "heap-bytes/image")
		})
	}
}

// BenchmarkJournalWrite prices the journal: each workload runs on a qcow2
// image without and with one. Sequential 1 MiB writes and random 4 KiB
// writes (one to each 64 KiB cluster, in random order) go to a fresh disk,
// recreated when they have covered it, so every call allocates and, with a
// journal, appends a batch. Random 4 KiB overwrites of a full disk dirty
// no metadata and append nothing.
func BenchmarkJournalWrite(b *testing.B) {
	workloads := []struct {
		name   string
		block  int
		stride int64 // distance between the writes' offsets
		random bool
		fresh  bool // recreate the disk once covered: every write allocates
	}{
		{"sequential-1M", 1 << 20, 1 << 20, false, true},
		{"random-4K-allocating", 4096, DefaultClusterSize, true, true},
		{"random-4K-overwrite", 4096, 4096, true, false},
	}
	for _, w := range workloads {
		for _, journaled := range []bool{false, true} {
			b.Run(fmt.Sprintf("%s/journal=%v", w.name, journaled), func(b *testing.B) {
				dir := b.TempDir()
				p := filepath.Join(dir, "bench.qcow2")
				opts := OpenOptions{}
				if journaled {
					opts.JournalDir = filepath.Join(dir, "journal")
				}
				var img *Image
				open := func() {
					if img != nil {
						img.Close()
					}
					if err := Create(p, CreateOptions{Size: benchSize}); err != nil {
						b.Fatal(err)
					}
					var err error
					if img, err = Open(p, opts); err != nil {
						b.Fatal(err)
					}
				}
				open()
				defer func() { img.Close() }()
				if !w.fresh {
					fill(b, img)
				}
				buf := make([]byte, w.block)
				rng := rand.New(rand.NewPCG(1, 2))
				slots := benchSize / w.stride
				order := rng.Perm(int(slots))
				b.SetBytes(int64(w.block))
				b.ResetTimer()
				for i := range b.N {
					k := int64(i) % slots
					if k == 0 && i > 0 && w.fresh {
						b.StopTimer()
						os.Remove(p)
						open()
						b.StartTimer()
					}
					off := k * w.stride
					if w.random {
						off = int64(order[k]) * w.stride
					}
					if _, err := img.WriteAt(buf, off); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
