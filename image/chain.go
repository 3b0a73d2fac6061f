package image

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Merge and Rebase change an image's backing chain, offline, as qemu-img
// commit and qemu-img rebase do: each opens the images itself, and a
// process using one of them makes it fail (the images' locks).

// ChainOptions tune Merge and Rebase.
type ChainOptions struct {
	// JournalDir is the redo journal directory of the read-write opens,
	// as OpenOptions.JournalDir: a journal a killed server left is
	// replayed before anything is read.
	JournalDir string
	// Progress, if set, is called as the work goes on with the bytes of
	// the disk gone through and the bytes to go through.
	Progress func(done, total int64)
}

// chainChunk is the most Merge and Rebase read at once.
const chainChunk = 1 << 20

// MergeOptions tune Merge.
type MergeOptions struct {
	ChainOptions
	// KeepOverlay leaves the overlay holding what it held (qemu-img
	// commit -d). By default it is emptied once its backing file holds
	// it all.
	KeepOverlay bool
}

// Merge writes what the overlay at path holds itself into its backing
// file, as qemu-img commit does: its data, the ranges it reads as zeros
// (zero clusters hide the backing file's data), its size if larger, and a
// zoned overlay's write pointers. Every other overlay of that backing file
// then reads the merged contents too: merge only into a backing file
// nothing else reads through. Zone limits and injected zone conditions
// (package volume) stay each image's own.
//
// The overlay is not written until the backing file holds everything
// durably: a crash before leaves the overlay reading as it did, over a
// backing file partly merged, and Merge again finishes the work. The
// overlay is then emptied by renaming a new, empty overlay (same backing
// file, size, cluster size, refcount width and zone limits) over it.
func Merge(path string, opts MergeOptions) (err error) {
	top, err := openAlone(path, OpenOptions{JournalDir: opts.JournalDir})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, top.Close()) }()
	name := top.hdr.backingFile
	if name == "" {
		return fmt.Errorf("%s has no backing file to merge into: %w", path, ErrInvalidOption)
	}
	base, err := openChain(backingPath(path, name), OpenOptions{JournalDir: opts.JournalDir}, 1)
	if err != nil {
		return fmt.Errorf("%s: backing file: %w", path, err)
	}
	top.backing, top.depth = base, base.depth+1
	if top.size > base.size {
		if err := base.Grow(top.size); err != nil {
			return fmt.Errorf("%s: growing the backing file to the overlay's size: %w", path, err)
		}
	}
	runs, err := top.layers()
	if err != nil {
		return err
	}
	var total, done int64
	for _, r := range runs {
		if r.Data || r.Zero {
			total += r.Length
		}
	}
	buf := make([]byte, chainChunk)
	for _, r := range runs {
		switch {
		case r.Zero:
			if err := base.WriteZeroes(r.Offset, r.Length, true); err != nil {
				return fmt.Errorf("%s: backing file: %w", path, err)
			}
		case r.Data:
			for off := r.Offset; off < r.Offset+r.Length; off += chainChunk {
				p := buf[:min(chainChunk, r.Offset+r.Length-off)]
				if _, err := top.ReadAt(p, off); err != nil {
					return fmt.Errorf("%s: %w", path, err)
				}
				if _, err := base.WriteAt(p, off); err != nil {
					return fmt.Errorf("%s: backing file: %w", path, err)
				}
				done += int64(len(p))
				opts.report(done, total)
			}
		default:
			continue
		}
		if r.Zero {
			done += r.Length
			opts.report(done, total)
		}
		if err := step("merged a run"); err != nil {
			return err
		}
	}
	if top.zones != nil {
		for zone, wp := range top.writePointers {
			if zone < int(top.zones.ConventionalZones) {
				continue
			}
			if err := base.SetWritePointer(zone, wp); err != nil {
				return fmt.Errorf("%s: backing file: %w", path, err)
			}
		}
	}
	if err := base.Flush(); err != nil {
		return fmt.Errorf("%s: backing file: %w", path, err)
	}
	if err := step("merged"); err != nil {
		return err
	}
	if opts.KeepOverlay {
		return nil
	}
	return top.empty()
}

func (o ChainOptions) report(done, total int64) {
	if o.Progress != nil {
		o.Progress(done, total)
	}
}

// layers splits the disk into the runs the image holds itself, as data
// (Data) or as zeros (Zero), and the runs it leaves to its backing file
// (neither).
func (img *Image) layers() ([]Extent, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	var out []Extent
	for pos := int64(0); pos < img.size; {
		m, err := img.lookup(pos)
		if err != nil {
			return nil, fmt.Errorf("%s at %#x: %w", img.path, pos, err)
		}
		n := min(m.n, img.size-pos)
		out = appendExtent(out, Extent{Offset: pos, Length: n, Data: m.kind == mapData || m.kind == mapCompressed, Zero: m.kind == mapZero})
		pos += n
	}
	return out, nil
}

// empty replaces the image's file by a new overlay of its backing file
// that holds nothing, with the image's size, cluster size, refcount width
// and zone limits (its write pointers are the backing file's), by a rename
// once the new file is durable. The image must not be used afterwards but
// to close it.
func (img *Image) empty() error {
	st, err := os.Stat(img.path)
	if err != nil {
		return err
	}
	tmp := img.path + ".empty"
	os.Remove(tmp) // an earlier attempt's
	opts := CreateOptions{
		Size:          img.size,
		ClusterSize:   int(img.clusterSize),
		RefcountBits:  img.hdr.refcountBits(),
		LazyRefcounts: img.hdr.compatible&compatLazyRefcounts != 0,
		BackingFile:   img.hdr.backingFile,
		Backing:       img.backing,
	}
	if img.zones != nil {
		z := img.zones.Zones
		opts.Zones = &z
	}
	if err := Create(tmp, opts); err != nil {
		return fmt.Errorf("emptying %s: %w", img.path, err)
	}
	if err := os.Chmod(tmp, st.Mode().Perm()); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("emptying %s: %w", img.path, err)
	}
	if err := os.Rename(tmp, img.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("emptying %s: %w", img.path, err)
	}
	return syncParent(filepath.Dir(img.path))
}

// RebaseOptions tune Rebase.
type RebaseOptions struct {
	ChainOptions
	// Unsafe only records the new name, copying nothing (qemu-img rebase
	// -u): for a backing file moved or renamed, whose contents are the
	// old one's. The old backing file need not exist.
	Unsafe bool
}

// Rebase makes the overlay at path read through the image backing ("" for
// none) in place of its backing file, as qemu-img rebase does: first it
// writes into the overlay what it reads through its old chain wherever
// the new one reads otherwise, so that it reads as before. backing is
// recorded as given and, unless absolute, resolved relative to the
// overlay's directory. A zoned overlay needs a zoned backing file of the
// same zone size, capacity and conventional zones; its write pointers are
// its own and stay.
//
// The copied data is durable before the name changes, with a header write
// a power cut cannot tear (switchBacking): a crash leaves the overlay over
// the old chain or the new one, reading the same either way.
func Rebase(path, backing string, opts RebaseOptions) (err error) {
	top, err := openAlone(path, OpenOptions{JournalDir: opts.JournalDir})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, top.Close()) }()
	old := top.hdr.backingFile
	if old == "" {
		return fmt.Errorf("%s has no backing file: rebase changes an overlay's backing file (image create -b makes an overlay): %w", path, ErrInvalidOption)
	}
	var nb *Image
	if backing != "" {
		if nb, err = openNewBacking(path, backing); err != nil {
			return err
		}
		defer func() {
			if nb != nil {
				err = errors.Join(err, nb.Close())
			}
		}()
		if err := top.fitsOver(nb, backing); err != nil {
			return err
		}
	}
	if !opts.Unsafe {
		if top.backing, err = openBacking(path, old, 0, 1); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		top.depth = top.backing.depth + 1
		if err := top.keepReading(nb, opts.ChainOptions); err != nil {
			return err
		}
		if err := top.Flush(); err != nil {
			return err
		}
		if err := step("copied"); err != nil {
			return err
		}
	}
	top.mu.Lock()
	err = top.switchBacking(backing)
	top.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if top.backing != nil {
		if err := top.backing.Close(); err != nil {
			return err
		}
	}
	top.backing, nb = nb, nil // the image's now, closed with it
	return nil
}

// openNewBacking opens, read-only, the image backing that the overlay at
// path is to read through, refusing a chain that reaches path itself.
func openNewBacking(path, backing string) (*Image, error) {
	self, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	for p, depth := backingPath(path, backing), 0; p != ""; depth++ {
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("%s: new backing file: %w", path, err)
		}
		if os.SameFile(st, self) {
			return nil, fmt.Errorf("%s: new backing file %q: its chain reaches %s itself: %w", path, backing, path, ErrInvalidOption)
		}
		if depth >= MaxBackingDepth {
			break // openChain says why
		}
		name, err := BackingFile(p)
		if err != nil || name == "" {
			break // openChain says why, if anything is wrong
		}
		p = backingPath(p, name)
	}
	nb, err := openChain(backingPath(path, backing), OpenOptions{ReadOnly: true}, 1)
	if err != nil {
		return nil, fmt.Errorf("%s: new backing file: %w", path, err)
	}
	return nb, nil
}

// fitsOver refuses a backing image nb (named backing) the image could not
// be an overlay of: the rule of CreateOptions.BackingFile.
func (img *Image) fitsOver(nb *Image, backing string) error {
	bz, zoned := nb.Zones()
	switch {
	case img.zones == nil && zoned:
		return fmt.Errorf("%s: new backing file %s is zoned and the image is not: %w", img.path, backing, ErrInvalidOption)
	case img.zones != nil && !zoned:
		return fmt.Errorf("%s: new backing file %s is not zoned: %w", img.path, backing, ErrInvalidOption)
	case zoned && img.size < nb.Size():
		return fmt.Errorf("%s: new backing file %s is larger (%d bytes) than the zoned image (%d): %w", img.path, backing, nb.Size(), img.size, ErrInvalidOption)
	case zoned && (bz.ZoneSize != img.zones.ZoneSize || bz.ZoneCapacity != img.zones.ZoneCapacity || bz.ConventionalZones != img.zones.ConventionalZones):
		return fmt.Errorf("%s: new backing file %s has zones of %d bytes, capacity %d, %d conventional; the image's are %d, %d, %d: %w",
			img.path, backing, bz.ZoneSize, bz.ZoneCapacity, bz.ConventionalZones, img.zones.ZoneSize, img.zones.ZoneCapacity, img.zones.ConventionalZones, ErrInvalidOption)
	}
	return nil
}

// keepReading writes into the image, cluster by cluster, what it reads
// through its backing file wherever it holds nothing and nb (nil: none)
// reads otherwise.
func (img *Image) keepReading(nb *Image, opts ChainOptions) error {
	runs, err := img.layers()
	if err != nil {
		return err
	}
	var total, done int64
	for _, r := range runs {
		if !r.Data && !r.Zero {
			total += r.Length
		}
	}
	cs := img.clusterSize
	now, then, zero := make([]byte, chainChunk), make([]byte, chainChunk), make([]byte, cs)
	for _, r := range runs {
		if r.Data || r.Zero {
			continue
		}
		// Runs the image leaves to its backing file are whole clusters,
		// but for a last one cut by the disk's end.
		for off := r.Offset; off < r.Offset+r.Length; off += chainChunk {
			n := min(chainChunk, r.Offset+r.Length-off)
			if _, err := img.ReadAt(now[:n], off); err != nil {
				return fmt.Errorf("%s: %w", img.path, err)
			}
			clear(then[:n])
			if nb != nil {
				if k := max(0, min(n, nb.Size()-off)); k > 0 {
					if _, err := nb.ReadAt(then[:k], off); err != nil {
						return fmt.Errorf("%s: new backing file: %w", img.path, err)
					}
				}
			}
			for c := int64(0); c < n; c += cs {
				e := min(c+cs, n)
				if bytes.Equal(now[c:e], then[c:e]) {
					continue
				}
				var err error
				if bytes.Equal(now[c:e], zero[:e-c]) {
					err = img.WriteZeroes(off+c, e-c, true)
				} else {
					_, err = img.WriteAt(now[c:e], off+c)
				}
				if err != nil {
					return fmt.Errorf("%s: %w", img.path, err)
				}
			}
			done += n
			opts.report(done, total)
		}
	}
	return nil
}

// switchBacking records name as the image's backing file ("" for none)
// with writes a power cut cannot tear: with the header in this package's
// layout (ownLayout), the new name goes past everything the header holds
// now, durably, and then the first sector, which alone holds the name's
// place and length, is written on its own. img.mu is held.
func (img *Image) switchBacking(name string) error {
	cur, err := img.hdr.encode()
	if err != nil {
		return err
	}
	if err := img.ownLayout(cur); err != nil {
		return err
	}
	nh := *img.hdr
	nh.backingFile, nh.backingFileOffset = name, uint64(len(cur))
	next, err := nh.encode()
	if err != nil {
		return err
	}
	const sector = 512
	if name != "" && len(next) > sector {
		from := max(sector, int(nh.backingFileOffset))
		if _, err := img.file.WriteAt(next[from:], int64(from)); err != nil {
			return fmt.Errorf("writing the backing file name: %w", err)
		}
		if err := img.file.Sync(); err != nil {
			return err
		}
		if err := step("backing name"); err != nil {
			return err
		}
	}
	if _, err := img.file.WriteAt(next[:min(sector, len(next))], 0); err != nil {
		return fmt.Errorf("writing the header: %w", err)
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	img.hdr = &nh
	return nil
}
