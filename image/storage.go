package image

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Storage is the file under an image. *os.File-backed storage comes from
// Open and Create; tests substitute one that injects faults or drops
// unsynced writes to model a crash.
type Storage interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable.
	Sync() error
	Size() (int64, error)
	Truncate(size int64) error
	Close() error
}

// holePuncher is Storage that can give the space of a range back to its
// filesystem, the range reading as zeros afterwards: clusters an image
// frees (zone resets, discards) stop taking room on the node.
type holePuncher interface {
	PunchHole(off, length int64) error
}

// osFile is Storage on a regular file.
type osFile struct{ f *os.File }

// PunchHole deallocates the range, keeping the file's size (a filesystem
// without hole punching says EOPNOTSUPP).
func (o osFile) PunchHole(off, length int64) error {
	if err := unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); err != nil {
		return &os.PathError{Op: "fallocate punch hole", Path: o.f.Name(), Err: err}
	}
	return nil
}

func (o osFile) ReadAt(p []byte, off int64) (int, error)  { return o.f.ReadAt(p, off) }
func (o osFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }
func (o osFile) Truncate(size int64) error                { return o.f.Truncate(size) }
func (o osFile) Close() error                             { return o.f.Close() }

// Sync uses fdatasync: the file's size is part of what it flushes, its
// timestamps are not worth a journal commit per flush.
func (o osFile) Sync() error {
	if err := unix.Fdatasync(int(o.f.Fd())); err != nil {
		return &os.PathError{Op: "fdatasync", Path: o.f.Name(), Err: err}
	}
	return nil
}

func (o osFile) Size() (int64, error) {
	st, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// openFile opens path and takes an advisory lock on it: shared for readers,
// exclusive for a writer, so two processes never write one image at once.
func openFile(path string, readOnly bool) (osFile, error) {
	flag, lock := os.O_RDWR, unix.LOCK_EX
	if readOnly {
		flag, lock = os.O_RDONLY, unix.LOCK_SH
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return osFile{}, err
	}
	if err := flockSoon(f, lock); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return osFile{}, fmt.Errorf("%s: image is in use by another process: %w", path, err)
		}
		return osFile{}, fmt.Errorf("%s: lock: %w", path, err)
	}
	return osFile{f}, nil
}

// lockRetry is how long a contended lock is retried. A process that forks
// (any exec) while it has an image open shares the open file, and with it
// the lock, with the child until the child's exec closes it: an image just
// closed by this or another process can stay locked for that moment.
const lockRetry = 2 * time.Second

// flockSoon takes the lock without blocking, retrying a contended one
// briefly (see lockRetry).
func flockSoon(f *os.File, lock int) error {
	deadline := time.Now().Add(lockRetry)
	for {
		err := unix.Flock(int(f.Fd()), lock|unix.LOCK_NB)
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readFull reads len(p) bytes at off. Bytes past the end of the file read
// as zeros, as they do for QEMU: a data cluster may end in a hole.
func readFull(s Storage, p []byte, off int64) error {
	n, err := s.ReadAt(p, off)
	if err == io.EOF || (err == nil && n < len(p)) {
		clear(p[n:])
		return nil
	}
	return err
}

// readTable reads a metadata table, which must lie entirely in the file.
func readTable(s Storage, p []byte, off int64, what string) error {
	n, err := s.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == io.EOF || err == nil {
		return fmt.Errorf("%s at %#x: file ends after %d of its %d bytes: %w", what, off, n, len(p), ErrCorrupt)
	}
	return fmt.Errorf("%s at %#x: %w", what, off, err)
}
