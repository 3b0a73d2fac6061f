package image

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// testHookStep, if set, runs after each durable step of SnapshotTo,
// Merge and Rebase, and after each run Merge writes (unflushed); an error
// stops the work there, leaving the files as a crash at that point would
// (the tests' crash injection).
var testHookStep func(step string) error

// SnapshotTo makes the image's present contents the read-only image at
// path (beside it, if it has a relative backing file name) and goes on as a copy-on-write overlay of it: the external
// snapshot QEMU's blockdev-snapshot-sync takes, here on an image in use.
// It waits for the operations in flight and flushes, so the snapshot is
// what a flush made durable, write pointers included; the overlay starts
// with the same write pointers and its own copy of the zoned extension.
// It costs a flush and a new, empty image, whatever the disk holds.
//
// The steps, each durable before the next: the overlay is written under
// a temporary name beside the image, path becomes a second name of the
// image's file, and the overlay is renamed over the image's name. A crash
// leaves either the image as it was, perhaps with path a second name of
// its file (os.SameFile tells; remove that name), or the overlay over a
// complete snapshot at path.
func (img *Image) SnapshotTo(path string) error {
	if img.readOnly {
		return fmt.Errorf("snapshot: %w", ErrReadOnly)
	}
	img.gate.Lock()
	defer img.gate.Unlock()
	if img.closed {
		return ErrClosed
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	f, ok := img.file.(osFile)
	if !ok || img.path == "" {
		return fmt.Errorf("snapshot: the image is not a file opened by Open: %w", ErrInvalidOption)
	}
	if img.depth+1 >= MaxBackingDepth {
		return fmt.Errorf("snapshot of %s: its backing chain has %d images, the most a chain may have below a snapshot: %w", img.path, img.depth, ErrUnsupported)
	}
	name, err := backingName(img.path, path)
	if err != nil {
		return err
	}
	if b := img.hdr.backingFile; b != "" && !filepath.IsAbs(b) && filepath.Dir(name) != "." {
		// The frozen file keeps its header, whose relative backing name
		// would resolve elsewhere from another directory.
		return fmt.Errorf("snapshot %s: the image's backing file %q is relative to its directory, so its snapshot must be in that directory too: %w", path, b, ErrInvalidOption)
	}
	// Flush twice, as Close does: the second writes the refcounts the
	// first released, so the snapshot is clean.
	if err := img.flushLocked(); err != nil {
		return err
	}
	if err := img.writeback(); err != nil {
		return err
	}
	below, err := img.freeze(f, path)
	if err != nil {
		return err
	}
	tmp := img.path + ".overlay"
	linked := false
	undo := func(err error) error {
		os.Remove(tmp)
		if linked {
			os.Remove(path)
		}
		return errors.Join(err, unix.Flock(int(f.f.Fd()), unix.LOCK_EX|unix.LOCK_NB))
	}
	os.Remove(tmp) // an earlier attempt's
	opts := CreateOptions{
		ClusterSize:  int(img.clusterSize),
		RefcountBits: img.hdr.refcountBits(),
		BackingFile:  name,
		Backing:      below,
	}
	if err := Create(tmp, opts); err != nil {
		return undo(fmt.Errorf("snapshot: the overlay: %w", err))
	}
	if err := step("overlay"); err != nil {
		return err
	}
	if err := os.Link(img.path, path); err != nil {
		return undo(fmt.Errorf("snapshot: %w", err))
	}
	linked = true
	if err := syncParent(filepath.Dir(path)); err != nil {
		return undo(fmt.Errorf("snapshot: %w", err))
	}
	if err := step("link"); err != nil {
		return err
	}
	if err := os.Rename(tmp, img.path); err != nil {
		return undo(fmt.Errorf("snapshot: %w", err))
	}
	// From here the image's name is the overlay's: the old file is the
	// snapshot and must not be written again, whatever fails.
	if err := syncParent(filepath.Dir(img.path)); err != nil {
		img.closed = true
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := step("rename"); err != nil {
		return err
	}
	os.Chmod(path, 0o444) // a courtesy to other tools: the file is read-only now
	return img.moveOnto(below)
}

// step runs the test hook of a step, if any.
func step(name string) error {
	if testHookStep == nil {
		return nil
	}
	return testHookStep(name)
}

// backingName is how an overlay at top records the backing file at path:
// relative to top's directory, so that the pair can move together.
func backingName(top, path string) (string, error) {
	absTop, err := filepath.Abs(top)
	if err != nil {
		return "", err
	}
	absPath, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	return filepath.Rel(filepath.Dir(absTop), absPath)
}

// freeze turns the flushed image's file into a read-only image (named
// path) over the same backing chain, sharing the open file: its lock
// becomes shared, as a reader's.
func (img *Image) freeze(f osFile, path string) (*Image, error) {
	if err := unix.Flock(int(f.f.Fd()), unix.LOCK_SH); err != nil {
		return nil, fmt.Errorf("snapshot: lock: %w", err)
	}
	ro, err := openImage(f, OpenOptions{ReadOnly: true, CacheSize: img.reopen.CacheSize})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("snapshot: %w", err), unix.Flock(int(f.f.Fd()), unix.LOCK_EX|unix.LOCK_NB))
	}
	ro.path, ro.backing, ro.depth = path, img.backing, img.depth
	return ro, nil
}

// moveOnto opens the overlay now at the image's name over below and makes
// it the image's file; the old file lives on as below's. img.mu is held.
func (img *Image) moveOnto(below *Image) error {
	f, err := openFile(img.path, false)
	if err != nil {
		img.closed = true
		return fmt.Errorf("snapshot: opening the overlay: %w", err)
	}
	opts := img.reopen
	var journalPath string
	if opts.JournalDir != "" {
		jf, p, err := openJournalFile(opts.JournalDir, f)
		if err != nil {
			f.Close()
			img.closed = true
			return fmt.Errorf("snapshot: opening the overlay: %w", err)
		}
		opts.Journal, journalPath = jf, p
	}
	opts.JournalDir = ""
	n, err := openStorage(f, opts, journalPath)
	if err != nil {
		f.Close()
		img.closed = true
		return fmt.Errorf("snapshot: opening the overlay: %w", err)
	}
	old := img.journal
	n.path, n.reopen = img.path, img.reopen
	n.backing, n.depth = below, below.depth+1
	img.fileState = n.fileState
	return closeJournal(old, true) // the old file's: flushed, so empty
}

// syncParent makes the names in dir durable.
func syncParent(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// BackingFile returns the backing file name the image at path records
// ("" for none), reading only its header and taking no lock: the header
// of an image in use changes only when it grows or is snapshotted.
func BackingFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	buf := make([]byte, min(st.Size(), MaxClusterSize))
	if err := readTable(osFile{f}, buf, 0, "header"); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	h, err := parseHeader(buf, st.Size())
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return h.backingFile, nil
}
