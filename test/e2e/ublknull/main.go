// Command ublknull serves a ublk device whose backend does nothing: reads
// return zeros and writes are dropped, with no image, no zone model and no
// file I/O. It is what the ublk round trip alone costs in the guest (the
// kernel's request, the io_uring commands, the user copy and zq-csi's
// queue), the ceiling of any ublk server there, for scripts/bench-ublk.sh
// to compare zq-csi and null_blk with.
//
//	ublknull [--size BYTES] [--queues N]
//
// It prints the device path and serves until SIGTERM or SIGINT.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/zq-csi/zq-csi/ublk"
	"github.com/zq-csi/zq-csi/volume"
)

// null is a volume.Backend that keeps nothing.
type null struct{ size int64 }

func (n null) Size() int64                              { return n.size }
func (null) ReadOnly() bool                             { return false }
func (null) ReadAt(p []byte, _ int64) error             { clear(p); return nil }
func (null) WriteAt([]byte, int64) error                { return nil }
func (null) Flush() error                               { return nil }
func (null) Trim(int64, int64) error                    { return nil }
func (null) WriteZeroes(int64, int64, bool, bool) error { return nil }
func (null) Errno(error) syscall.Errno                  { return syscall.EIO }
func (null) OrderKey(int64) (int64, bool)               { return 0, false }
func (null) Zones() volume.Zones                        { return nil }
func (null) Map(off, length int64) ([]volume.Extent, error) {
	return []volume.Extent{{Offset: off, Length: length, Zero: true}}, nil
}

func main() {
	size := flag.Int64("size", 1<<30, "device size in bytes")
	queues := flag.Int("queues", 0, "hardware queues (default: one per CPU, as zq-csi attach)")
	flag.Parse()
	if err := run(*size, *queues); err != nil {
		fmt.Fprintln(os.Stderr, "ublknull:", err)
		os.Exit(1)
	}
}

func run(size int64, queues int) error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	ctrl, err := ublk.OpenControl()
	if err != nil {
		return err
	}
	defer ctrl.Close()
	d, err := ublk.Create(ctrl, null{size}, ublk.Options{Queues: queues, LogicalBlockSize: 4096})
	if err != nil {
		return err
	}
	fmt.Println(d.Path())
	select {
	case <-sigs:
	case <-d.Stopped():
	}
	return errors.Join(d.Stop(), d.Close())
}
