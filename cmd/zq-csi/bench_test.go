package main

// Benchmarks of zq-csi io against qemu-io on the same workload in the same
// run: absolute numbers drift between machines and runs, the ratio is
// what to read. Each op is one process that opens a fresh 256 MiB image,
// runs the workload and closes it (flushing).
//
//	go test -run='^$' -bench=AgainstQemuIO ./cmd/zq-csi/
//
// Metrics: zq-ms/op and qemu-ms/op (wall time of each tool), and
// zq-speed-ratio = qemu time / zq time (above 1: zq-csi is faster).

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

func BenchmarkIOAgainstQemuIO(b *testing.B) {
	if _, err := exec.LookPath("qemu-io"); err != nil {
		b.Fatalf("qemu-io not found (make deps installs qemu-utils): %v", err)
	}
	const size = 256 << 20
	r := rand.New(rand.NewPCG(1, 2))
	var seq1M, rand4k, randRead4k []string
	for off := int64(0); off < 64<<20; off += 1 << 20 {
		seq1M = append(seq1M, fmt.Sprintf("write -q -P 0x5a %d 1M", off))
	}
	for range 2000 {
		off := r.Int64N(size/4096) * 4096
		rand4k = append(rand4k, fmt.Sprintf("write -q -P 0x5b %d 4k", off))
		randRead4k = append(randRead4k, fmt.Sprintf("read -q %d 4k", r.Int64N(64<<20/4096)*4096))
	}
	workloads := []struct {
		name     string
		cmds     []string
		bytes    int64
		preload  bool // write the first 64 MiB before timing, read-only run
		readOnly bool
	}{
		{"seq-write-1M", seq1M, 64 << 20, false, false},
		{"rand-write-4k", rand4k, 2000 * 4096, false, false},
		{"rand-read-4k", randRead4k, 2000 * 4096, true, true},
	}
	zqBin := zqBinary(b)
	dir := b.TempDir()
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			b.SetBytes(w.bytes)
			var zqTime, qemuTime time.Duration
			for i := 0; i < b.N; i++ {
				for _, tool := range []string{"zq-csi", "qemu-io"} {
					b.StopTimer()
					f := filepath.Join(dir, "bench.qcow2")
					os.Remove(f)
					mustOK(b, "qemu-img create", runTool(b, "qemu-img", "create", "-q", "-f", "qcow2", f, fmt.Sprint(size)))
					if w.preload {
						mustOK(b, "preload", runTool(b, "qemu-io", append(append([]string{"-f", "qcow2"}, ioArgs(seq1M)...), f)...))
					}
					args := ioArgs(w.cmds)
					if w.readOnly {
						args = append([]string{"-r"}, args...)
					}
					name := zqBin
					if tool == "qemu-io" {
						name, args = "qemu-io", append([]string{"-f", "qcow2"}, args...)
					} else {
						args = append([]string{"io"}, args...)
					}
					b.StartTimer()
					start := time.Now()
					mustOK(b, tool, runTool(b, name, append(args, f)...))
					if tool == "qemu-io" {
						qemuTime += time.Since(start)
					} else {
						zqTime += time.Since(start)
					}
				}
			}
			n := float64(b.N)
			b.ReportMetric(float64(zqTime.Milliseconds())/n, "zq-ms/op")
			b.ReportMetric(float64(qemuTime.Milliseconds())/n, "qemu-ms/op")
			b.ReportMetric(float64(qemuTime)/float64(zqTime), "zq-speed-ratio")
		})
	}
}
