// Package image reads and writes qcow2 version 3 images: clusters, L1/L2
// tables, refcounts and header extensions. It knows the bytes on disk and
// their crash ordering, nothing about what the disk is used for.
//
// Metadata (L2 tables, refcount blocks) is cached in memory and written back
// at Flush in an order that keeps the file consistent after a crash at any
// point: refcounts that allocate clusters first, then the tables that point
// at them, and only then the refcounts that free clusters. A crash can leak
// clusters, never corrupt the image.
package image

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"syscall"
)

// Image is an open qcow2 image. Its methods are safe for concurrent use;
// reads and writes of different ranges proceed in parallel.
type Image struct {
	// clusterBufs holds cluster-sized buffers for the copy-on-write of a
	// partial write to a new cluster, so that a random small-write workload
	// does not allocate a cluster per request (and the collector, with its
	// stops, does not run for them).
	clusterBufs sync.Pool

	// gate is held shared by every data operation and exclusively by Flush
	// and Close, so a flush sees no write half done and frees no cluster an
	// operation still uses.
	gate sync.RWMutex

	// mu guards the tables and the allocator in fileState.
	mu sync.Mutex

	// Fixed for the image's life, read without a lock: SnapshotTo keeps
	// them in the overlay it moves onto.
	readOnly    bool
	clusterSize int64
	clusterBits uint

	fileState
}

// fileState is what an Image knows of its file. SnapshotTo, which moves an
// open image onto a new overlay file, replaces it whole.
type fileState struct {
	file Storage
	path string
	// reopen is how the file was opened (journal directory, boot id,
	// cache size), for the overlay SnapshotTo opens in its place.
	reopen OpenOptions
	// backing is the read-only image that clusters this one does not
	// hold read from; nil for none. depth counts the images below.
	backing *Image
	depth   int

	l2Entries       int64 // entries in one L2 table
	extendedL2      bool
	subclusterSize  int64
	refblockEntries int64
	size            int64

	hdr            *header
	l1             []uint64
	l1DirtyLo      int64 // dirty L1 entries are [l1DirtyLo, l1DirtyHi)
	l1DirtyHi      int64
	refTable       []uint64
	refTableOffset int64
	refTableDirty  bool
	cache          *tableCache
	freeHint       int64 // no cluster below it is free
	highWater      int64 // first cluster past everything allocated
	pendingFree    []clusterRun
	// inflight holds, per guest cluster being allocated, a channel closed
	// when the allocation is complete; other writers to it wait.
	inflight map[int64]chan struct{}
	// repairRefs, during a repair, are the references the check counted.
	repairRefs []uint32
	closed     bool

	// Zoned images: the extension, the write pointers and the span of
	// table entries [wpDirtyLo, wpDirtyHi) not yet written.
	zones         *zonedExt
	writePointers []int64
	wpDirtyLo     int
	wpDirtyHi     int
	// wpDamage, set only by a ForCheck open, is why the write-pointer
	// table could not be read; writePointers is nil until a repairing
	// Check rebuilds the table.
	wpDamage error

	// journal, for a read-write image opened with one, records the
	// metadata each call dirties (see journal.go); journalReplayed is the
	// number of batches replayed at open.
	journal         *journal
	journalReplayed int
}

// Open opens the image at path. A read-write open takes an exclusive lock
// on the file, replays the journal in opts.JournalDir if the serving
// process died without flushing, and, if the image was not closed cleanly
// (dirty bit) or a journal was replayed, rebuilds its refcounts before
// returning.
func Open(path string, opts OpenOptions) (*Image, error) {
	return openChain(path, opts, 0)
}

// openChain opens the image at path, depth images below the top of its
// chain, and its backing chain.
func openChain(path string, opts OpenOptions, depth int) (*Image, error) {
	img, err := openAlone(path, opts)
	if err != nil {
		return nil, err
	}
	if name := img.hdr.backingFile; name != "" {
		b, err := openBacking(path, name, opts.CacheSize, depth+1)
		if err != nil {
			img.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		img.backing, img.depth = b, b.depth+1
	}
	return img, nil
}

// openAlone opens the image at path without its backing chain, for the
// caller to attach one (or, to change only its header, none).
func openAlone(path string, opts OpenOptions) (*Image, error) {
	if opts.JournalDir != "" && opts.Journal != nil {
		return nil, fmt.Errorf("%s: both JournalDir and Journal given: %w", path, ErrInvalidOption)
	}
	f, err := openFile(path, opts.ReadOnly)
	if err != nil {
		return nil, err
	}
	var journalPath string
	if opts.JournalDir != "" && !opts.ReadOnly {
		jf, p, err := openJournalFile(opts.JournalDir, f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		opts.Journal, journalPath = jf, p
	}
	journalDir := opts.JournalDir
	opts.JournalDir = ""
	img, err := openStorage(f, opts, journalPath)
	if err != nil {
		f.Close()
		if journalPath != "" {
			opts.Journal.Close()
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	img.path = path
	img.reopen = OpenOptions{JournalDir: journalDir, CacheSize: opts.CacheSize, BootID: opts.BootID}
	return img, nil
}

// MaxBackingDepth bounds a backing chain: the images below one, each read
// through for what the one above does not hold. It also ends a chain that
// loops.
const MaxBackingDepth = 64

// backingPath is where the backing file name that the image at path
// records is, as QEMU resolves it: relative to that image's directory.
func backingPath(path, name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(filepath.Dir(path), name)
}

// openBacking opens, read-only, the backing file name that the image at
// path records, resolved as QEMU does: relative to that image's directory.
func openBacking(path, name string, cacheSize int64, depth int) (*Image, error) {
	if depth > MaxBackingDepth {
		return nil, fmt.Errorf("backing chain deeper than %d images (or a loop) at %q: %w", MaxBackingDepth, name, ErrUnsupported)
	}
	b, err := openChain(backingPath(path, name), OpenOptions{ReadOnly: true, CacheSize: cacheSize}, depth)
	if err != nil {
		return nil, fmt.Errorf("backing file: %w", err)
	}
	return b, nil
}

// OpenStorage opens an image on s. The image owns s (and opts.Journal,
// opts.Backing) from then on and closes it on Close; if the open fails,
// they are the caller's to close. JournalDir is refused: only Open has a
// file to name the journal after. An image with a backing file needs it
// open in opts.Backing.
func OpenStorage(s Storage, opts OpenOptions) (*Image, error) {
	if opts.JournalDir != "" {
		return nil, fmt.Errorf("JournalDir needs a file opened by Open; give OpenStorage a Journal: %w", ErrInvalidOption)
	}
	img, err := openStorage(s, opts, "")
	if err != nil {
		return nil, err
	}
	if name := img.hdr.backingFile; name != "" || opts.Backing != nil {
		if name == "" || opts.Backing == nil {
			return nil, fmt.Errorf("backing file %q, and %v given in OpenOptions.Backing: both or neither: %w", name, opts.Backing != nil, ErrInvalidOption)
		}
		img.backing, img.depth = opts.Backing, opts.Backing.depth+1
	}
	return img, nil
}

// openStorage opens an image on s with the journal opts.Journal, if any,
// at journalPath ("" when it is not a file of ours).
func openStorage(s Storage, opts OpenOptions, journalPath string) (*Image, error) {
	img, err := openImage(s, opts)
	if err != nil {
		return nil, err
	}
	if opts.ReadOnly {
		return img, nil // a reader changes nothing, so needs no journal
	}
	if opts.Journal != nil {
		if err := img.attachJournal(opts.Journal, journalPath, opts.BootID); err != nil {
			return nil, err
		}
	}
	if err := img.prepareWrite(); err != nil {
		return nil, err
	}
	return img, nil
}

func openImage(s Storage, opts OpenOptions) (*Image, error) {
	fileSize, err := s.Size()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, min(fileSize, MaxClusterSize))
	if err := readTable(s, buf, 0, "header"); err != nil {
		return nil, err
	}
	h, err := parseHeader(buf, fileSize)
	if err != nil {
		return nil, err
	}
	if !opts.ReadOnly {
		if h.nbSnapshots != 0 {
			return nil, fmt.Errorf("image has %d internal snapshots; it can only be opened read-only: %w", h.nbSnapshots, ErrUnsupported)
		}
		if h.incompatible&incompatCorrupt != 0 {
			return nil, fmt.Errorf("image is marked corrupt (corrupt bit set); it can only be opened read-only: %w", ErrCorrupt)
		}
	}
	cs := h.clusterSize()
	img := &Image{readOnly: opts.ReadOnly, clusterSize: cs, clusterBits: uint(h.clusterBits), fileState: fileState{
		file:            s,
		l2Entries:       h.l2Entries(),
		extendedL2:      h.incompatible&incompatExtendedL2 != 0,
		subclusterSize:  cs / 32,
		refblockEntries: h.refblockEntries(),
		size:            int64(h.size),
		hdr:             h,
		l1DirtyLo:       -1,
		refTableOffset:  int64(h.refcountTableOffset),
		inflight:        make(map[int64]chan struct{}),
	}}
	cacheSize := opts.CacheSize
	if cacheSize <= 0 {
		cacheSize = DefaultCacheSize
	}
	img.cache = newTableCache(int(max(16, cacheSize/cs)))

	l1 := make([]byte, int64(h.l1Size)*8)
	if err := readTable(s, l1, int64(h.l1TableOffset), "L1 table"); err != nil {
		return nil, err
	}
	img.l1 = decodeTable(l1)
	rt := make([]byte, int64(h.refcountTableClusters)*cs)
	if err := readTable(s, rt, img.refTableOffset, "refcount table"); err != nil {
		return nil, err
	}
	img.refTable = decodeTable(rt)
	img.highWater = (fileSize + cs - 1) / cs
	if err := img.loadZones(opts.ForCheck); err != nil {
		return nil, err
	}
	return img, nil
}

// prepareWrite readies an image opened read-write: autoclear bits this
// package does not maintain are cleared (that is their contract), and a
// dirty image gets its refcounts rebuilt. So does an image whose journal
// was replayed: its batches may hold refcounts of another call's clusters
// whose references never came (leaks). The rebuild's writeback makes the
// replayed metadata durable, in crash order, and resets the journal.
func (img *Image) prepareWrite() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.hdr.autoclear != 0 {
		img.hdr.autoclear = 0
		if err := img.writeHeader(); err != nil {
			return err
		}
	}
	dirty := img.hdr.incompatible&incompatDirty != 0
	if !dirty && img.journalReplayed == 0 {
		return nil
	}
	if _, err := img.repairLocked(); err != nil {
		return fmt.Errorf("rebuilding the refcounts of a dirty image or after a journal replay: %w", err)
	}
	if !dirty {
		return nil
	}
	img.hdr.incompatible &^= incompatDirty
	return img.writeHeader()
}

// encodeTable is the on-disk (big-endian) form of a table of entries.
func encodeTable(t []uint64) []byte {
	b := make([]byte, len(t)*8)
	for i, e := range t {
		binary.BigEndian.PutUint64(b[i*8:], e)
	}
	return b
}

func decodeTable(b []byte) []uint64 {
	t := make([]uint64, len(b)/8)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(b[i*8:])
	}
	return t
}

// Size is the virtual disk size in bytes. It changes only by Grow.
func (img *Image) Size() int64 {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.size
}

// ClusterSize is the image's cluster size in bytes.
func (img *Image) ClusterSize() int64 { return img.clusterSize }

// ReadOnly reports whether the image was opened read-only.
func (img *Image) ReadOnly() bool { return img.readOnly }

func (img *Image) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off > img.size || n > img.size-off {
		return fmt.Errorf("%s of %d bytes at %#x on a %d-byte disk: %w", op, n, off, img.size, ErrOutOfRange)
	}
	return nil
}

// startOp admits a data operation and returns with the gate held shared.
// The range is checked under the gate: Grow, which alone changes the size,
// holds it exclusively.
func (img *Image) startOp(op string, off, n int64, write bool) error {
	if write && img.readOnly {
		return fmt.Errorf("%s at %#x: %w", op, off, ErrReadOnly)
	}
	img.gate.RLock()
	if img.closed {
		img.gate.RUnlock()
		return ErrClosed
	}
	if err := img.checkRange(op, off, n); err != nil {
		img.gate.RUnlock()
		return err
	}
	return nil
}

// mapKind says how a run of guest bytes is stored.
type mapKind uint8

const (
	mapZero       mapKind = iota // zero, or unallocated without a backing file: reads as zeros
	mapData                      // data at a host offset
	mapCompressed                // inside a compressed cluster
	mapBacking                   // unallocated: reads from the backing file
)

// absent is how bytes this image holds nothing for read.
func (img *Image) absent() mapKind {
	if img.backing != nil {
		return mapBacking
	}
	return mapZero
}

// mapping describes the guest bytes [off, off+n) of one cluster.
type mapping struct {
	kind  mapKind
	host  int64  // mapData: the file offset of the first byte
	entry uint64 // mapCompressed: the L2 descriptor
	n     int64
}

// l2Entry is an L2 entry; bitmap is the subcluster bitmap of extended L2.
type l2Entry struct{ std, bitmap uint64 }

const (
	allAllocated = uint64(0x00000000ffffffff)
	allZero      = uint64(0xffffffff00000000)
)

func (img *Image) l2Get(t *table, i int64) l2Entry {
	if img.extendedL2 {
		return l2Entry{binary.BigEndian.Uint64(t.data[i*16:]), binary.BigEndian.Uint64(t.data[i*16+8:])}
	}
	return l2Entry{std: binary.BigEndian.Uint64(t.data[i*8:])}
}

func (img *Image) l2Set(t *table, i int64, e l2Entry) {
	if img.extendedL2 {
		binary.BigEndian.PutUint64(t.data[i*16:], e.std)
		binary.BigEndian.PutUint64(t.data[i*16+8:], e.bitmap)
		img.noteTableWord(t, i*16)
		img.noteTableWord(t, i*16+8)
	} else {
		binary.BigEndian.PutUint64(t.data[i*8:], e.std)
		img.noteTableWord(t, i*8)
	}
	t.dirty = true
}

// dataEntry is the entry of a cluster fully allocated at host.
func (img *Image) dataEntry(host int64) l2Entry {
	e := l2Entry{std: uint64(host) | flagCopied}
	if img.extendedL2 {
		e.bitmap = allAllocated
	}
	return e
}

// zeroEntry is the entry of a cluster that reads as zeros; host, if not 0,
// stays allocated to it.
func (img *Image) zeroEntry(host int64) l2Entry {
	if img.extendedL2 {
		e := l2Entry{bitmap: allZero}
		if host != 0 {
			e.std = uint64(host) | flagCopied
		}
		return e
	}
	if host != 0 {
		return l2Entry{std: uint64(host) | flagCopied | flagZero}
	}
	return l2Entry{std: flagZero}
}

// classify maps the guest bytes from offset in (within the cluster) for as
// long as they are stored the same way, from the cluster's L2 entry alone.
func (img *Image) classify(e l2Entry, in int64) (mapping, error) {
	rest := img.clusterSize - in
	if e.std&flagCompressed != 0 {
		return mapping{kind: mapCompressed, entry: e.std, n: rest}, nil
	}
	host := int64(e.std & offsetMask)
	if host%img.clusterSize != 0 {
		return mapping{}, fmt.Errorf("L2 entry %#x: data offset %#x is not cluster aligned: %w", e.std, host, ErrCorrupt)
	}
	if !img.extendedL2 {
		if e.std&flagZero != 0 {
			return mapping{kind: mapZero, n: rest}, nil
		}
		if host == 0 {
			return mapping{kind: img.absent(), n: rest}, nil
		}
		return mapping{kind: mapData, host: host + in, n: rest}, nil
	}
	if e.bitmap&allAllocated&(e.bitmap>>32) != 0 {
		return mapping{}, fmt.Errorf("L2 bitmap %#x: subclusters both allocated and zero: %w", e.bitmap, ErrCorrupt)
	}
	// A subcluster is allocated, zero, or neither (unallocated).
	state := func(sc int64) uint64 { return (e.bitmap>>sc)&1 | (e.bitmap>>(32+sc)&1)<<1 }
	sc := in / img.subclusterSize
	first := state(sc)
	end := sc + 1
	for end < 32 && state(end) == first {
		end++
	}
	n := end*img.subclusterSize - in
	switch first {
	case 0:
		return mapping{kind: img.absent(), n: n}, nil
	case 2:
		return mapping{kind: mapZero, n: n}, nil
	}
	if host == 0 {
		return mapping{}, fmt.Errorf("L2 entry %#x: allocated subclusters without a data cluster: %w", e.std, ErrCorrupt)
	}
	return mapping{kind: mapData, host: host + in, n: n}, nil
}

// l1Index splits a guest offset into its L1 index, L2 index and offset in
// the cluster.
func (img *Image) l1Index(off int64) (l1i, l2i, in int64) {
	c := off / img.clusterSize
	return c / img.l2Entries, c % img.l2Entries, off % img.clusterSize
}

// l2Table returns the L2 table for L1 entry l1i, or nil if there is none
// and alloc is false. A caller that goes on to other table accesses (which
// may evict) while it holds the table pins it first.
func (img *Image) l2Table(l1i int64, alloc bool) (*table, error) {
	e := img.l1[l1i]
	off := int64(e & offsetMask)
	if e&l1Reserved != 0 || off%img.clusterSize != 0 {
		return nil, fmt.Errorf("L1 entry %d is %#x: reserved bits set or unaligned: %w", l1i, e, ErrCorrupt)
	}
	var t *table
	var err error
	switch {
	case off != 0:
		t, err = img.table(off, kindL2)
	case !alloc:
		return nil, nil
	default:
		c, aerr := img.allocClusters(1)
		if aerr != nil {
			return nil, aerr
		}
		t, err = img.newTable(c*img.clusterSize, kindL2)
		if err == nil {
			img.setL1(l1i, uint64(c*img.clusterSize)|flagCopied)
		}
	}
	if err != nil {
		return nil, err
	}
	return t, nil
}

func (img *Image) setL1(i int64, v uint64) {
	img.l1[i] = v
	img.note(recL1, int64(img.hdr.l1TableOffset)+i*8, nil)
	if img.l1DirtyLo < 0 {
		img.l1DirtyLo, img.l1DirtyHi = i, i+1
		return
	}
	img.l1DirtyLo, img.l1DirtyHi = min(img.l1DirtyLo, i), max(img.l1DirtyHi, i+1)
}

// lookup maps the guest bytes at off, within one cluster or, where no L2
// table exists, up to the end of the range that table would map.
func (img *Image) lookup(off int64) (mapping, error) {
	l1i, l2i, in := img.l1Index(off)
	t, err := img.l2Table(l1i, false)
	if err != nil || t == nil {
		return mapping{kind: img.absent(), n: (img.l2Entries-l2i)*img.clusterSize - in}, err
	}
	return img.classify(img.l2Get(t, l2i), in)
}

// ReadAt reads len(p) bytes of the virtual disk at off.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.startOp("read", off, int64(len(p)), false); err != nil {
		return 0, err
	}
	defer img.gate.RUnlock()
	for done := int64(0); done < int64(len(p)); {
		img.mu.Lock()
		m, err := img.lookup(off + done)
		// Merge the following clusters while they continue the same file
		// run, so a sequential read is one system call.
		for err == nil && m.kind == mapData && done+m.n < int64(len(p)) {
			next, nerr := img.lookup(off + done + m.n)
			if nerr != nil || next.kind != mapData || next.host != m.host+m.n {
				break
			}
			m.n += next.n
		}
		img.mu.Unlock()
		if err != nil {
			return int(done), fmt.Errorf("read at %#x: %w", off+done, err)
		}
		n := min(m.n, int64(len(p))-done)
		dst := p[done : done+n]
		switch m.kind {
		case mapZero:
			clear(dst)
		case mapData:
			err = readFull(img.file, dst, m.host)
		case mapCompressed:
			err = img.readCompressed(m.entry, (off+done)%img.clusterSize, dst)
		case mapBacking:
			err = img.readBacking(dst, off+done)
		}
		if err != nil {
			return int(done), fmt.Errorf("read at %#x: %w", off+done, err)
		}
		done += n
	}
	return len(p), nil
}

// readBacking reads what the backing file holds at off; past its end,
// an image larger than its backing file reads zeros.
func (img *Image) readBacking(dst []byte, off int64) error {
	n := max(0, min(int64(len(dst)), img.backing.Size()-off))
	clear(dst[n:])
	if n == 0 {
		return nil
	}
	_, err := img.backing.ReadAt(dst[:n], off)
	return err
}

// compressedRange decodes a compressed cluster descriptor into the file
// range holding the deflate stream.
func (img *Image) compressedRange(desc uint64) (off, length int64) {
	x := 62 - (img.clusterBits - 8)
	off = int64(desc & (1<<x - 1))
	sectors := int64(desc>>x) & (1<<(62-x) - 1)
	return off, (sectors+1)*512 - off%512
}

// readCompressed inflates the compressed cluster desc and copies the bytes
// from offset in into dst.
func (img *Image) readCompressed(desc uint64, in int64, dst []byte) error {
	off, length := img.compressedRange(desc)
	src := make([]byte, length)
	if err := readFull(img.file, src, off); err != nil {
		return err
	}
	cluster := make([]byte, img.clusterSize)
	r := flate.NewReader(bytes.NewReader(src))
	defer r.Close()
	if _, err := io.ReadFull(r, cluster); err != nil {
		return fmt.Errorf("compressed cluster at %#x (%d bytes): %v: %w", off, length, err, ErrCorrupt)
	}
	copy(dst, cluster[in:])
	return nil
}

// readCluster reads the whole cluster at guest offset guest as it
// currently reads, given its entry.
func (img *Image) readCluster(e l2Entry, guest int64, dst []byte) error {
	for in := int64(0); in < img.clusterSize; {
		m, err := img.classify(e, in)
		if err != nil {
			return err
		}
		part := dst[in : in+m.n]
		switch m.kind {
		case mapZero:
			clear(part)
		case mapData:
			err = readFull(img.file, part, m.host)
		case mapCompressed:
			err = img.readCompressed(m.entry, in, part)
		case mapBacking:
			err = img.readBacking(part, guest+in)
		}
		if err != nil {
			return err
		}
		in += m.n
	}
	return nil
}

// writableInPlace reports the host cluster of an entry that a write can go
// straight to: a plain data cluster referenced only here.
func (img *Image) writableInPlace(e l2Entry) (int64, bool) {
	if e.std&flagCompressed != 0 || e.std&flagCopied == 0 {
		return 0, false
	}
	host := int64(e.std & offsetMask)
	if img.extendedL2 {
		return host, host != 0 && e.bitmap&allAllocated == allAllocated
	}
	return host, host != 0 && e.std&flagZero == 0
}

// WriteAt writes p to the virtual disk at off.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.startOp("write", off, int64(len(p)), true); err != nil {
		return 0, err
	}
	defer img.gate.RUnlock()
	n, err := img.write(p, off)
	return n, img.commitAfter(err)
}

func (img *Image) write(p []byte, off int64) (int, error) {
	for done := 0; done < len(p); {
		n, err := img.writeRun(p[done:], off+int64(done))
		if err != nil {
			return done, fmt.Errorf("write at %#x: %w", off+int64(done), err)
		}
		done += n
	}
	return len(p), nil
}

// writeRun writes a prefix of p at off that lies in one L2 table and is
// either entirely in place or entirely newly allocated, and returns its
// length (0 after waiting for another writer's allocation: try again).
func (img *Image) writeRun(p []byte, off int64) (int, error) {
	img.mu.Lock()
	l1i, l2i, in := img.l1Index(off)
	t, err := img.l2Table(l1i, true)
	if err != nil {
		img.mu.Unlock()
		return 0, err
	}
	t.pins++ // allocClusters below may evict
	// Clusters of p inside this L2 table.
	span := min((in+int64(len(p))+img.clusterSize-1)/img.clusterSize, img.l2Entries-l2i)

	first := img.l2Get(t, l2i)
	if _, err := img.classify(first, 0); err != nil {
		t.pins--
		img.mu.Unlock()
		return 0, err // a corrupt entry: touch nothing
	}
	if host, ok := img.writableInPlace(first); ok {
		k := int64(1)
		for ; k < span; k++ {
			h, ok := img.writableInPlace(img.l2Get(t, l2i+k))
			if !ok || h != host+k*img.clusterSize {
				break
			}
		}
		t.pins--
		img.mu.Unlock()
		n := min(k*img.clusterSize-in, int64(len(p)))
		_, err := img.file.WriteAt(p[:n], host+in)
		return int(n), err
	}

	guest := off / img.clusterSize
	if ch := img.inflight[guest]; ch != nil {
		t.pins--
		img.mu.Unlock()
		<-ch
		return 0, nil
	}
	old := []l2Entry{first}
	for k := int64(1); k < span; k++ {
		e := img.l2Get(t, l2i+k)
		if _, ok := img.writableInPlace(e); ok || img.inflight[guest+k] != nil {
			break
		}
		if _, err := img.classify(e, 0); err != nil {
			break // the next run reports it
		}
		old = append(old, e)
	}
	k := int64(len(old))
	// A cluster that is ours alone but reads (partly) as zeros is rewritten
	// where it is rather than moved.
	reuse := k == 1 && first.std&(flagCompressed|flagCopied) == flagCopied && first.std&offsetMask != 0
	var host int64
	if reuse {
		host = int64(first.std & offsetMask)
	} else {
		c, err := img.allocClusters(k)
		if err != nil {
			t.pins--
			img.mu.Unlock()
			return 0, err
		}
		host = c * img.clusterSize
	}
	done := make(chan struct{})
	for i := range k {
		img.inflight[guest+i] = done
	}
	t.pins--
	img.mu.Unlock()

	n := min(k*img.clusterSize-in, int64(len(p)))
	werr := img.writeNewClusters(p[:n], guest*img.clusterSize, in, host, old)

	img.mu.Lock()
	defer img.mu.Unlock()
	defer func() {
		for i := range k {
			delete(img.inflight, guest+i)
		}
		close(done)
	}()
	if werr != nil {
		if !reuse {
			for i := range k {
				if err := img.setRefcount(host/img.clusterSize+i, 0); err != nil {
					return 0, errors.Join(werr, err)
				}
			}
		}
		return 0, werr
	}
	t, err = img.l2Table(l1i, false)
	if err != nil {
		return 0, err
	}
	for i := range k {
		img.l2Set(t, l2i+i, img.dataEntry(host+i*img.clusterSize))
		if !reuse {
			img.dropReference(old[i])
		}
	}
	return int(n), nil
}

// writeNewClusters writes p at offset in of the clusters at host (guest
// offset guest), filling the rest of the first and last cluster with what
// they read as before.
func (img *Image) writeNewClusters(p []byte, guest, in, host int64, old []l2Entry) error {
	cs := img.clusterSize
	k := int64(len(old))
	tail := (in + int64(len(p))) % cs
	if in == 0 && tail == 0 {
		_, err := img.file.WriteAt(p, host)
		return err
	}
	var buf []byte
	if k == 1 {
		if b, ok := img.clusterBufs.Get().(*[]byte); ok {
			buf = *b
			clear(buf)
		} else {
			buf = make([]byte, cs)
		}
		defer img.clusterBufs.Put(&buf)
	} else {
		buf = make([]byte, k*cs)
	}
	if in != 0 {
		if err := img.readCluster(old[0], guest, buf[:cs]); err != nil {
			return err
		}
	}
	if tail != 0 && (k > 1 || in == 0) {
		if err := img.readCluster(old[k-1], guest+(k-1)*cs, buf[(k-1)*cs:]); err != nil {
			return err
		}
	}
	copy(buf[in:], p)
	_, err := img.file.WriteAt(buf, host)
	return err
}

// dropReference queues the clusters an L2 entry no longer references for
// freeing at the next flush.
func (img *Image) dropReference(e l2Entry) {
	if e.std&flagCompressed != 0 {
		off, length := img.compressedRange(e.std)
		first := off / img.clusterSize
		img.freeLater(first, (off+length-1)/img.clusterSize-first+1)
		return
	}
	if host := int64(e.std & offsetMask); host != 0 {
		img.freeLater(host/img.clusterSize, 1)
	}
}

// unallocated reports an entry with no data cluster behind it at all.
func (img *Image) unallocated(e l2Entry) bool {
	return e.std&(flagCompressed|offsetMask) == 0 && e.bitmap&allAllocated == 0
}

// WriteZeroes makes [off, off+length) read as zeros. Whole clusters become
// zero clusters without any data written; with unmap their space is freed,
// without it they stay allocated (a later write needs no allocation).
// Partial clusters at the ends get zeros written, unless they read as zeros
// already.
func (img *Image) WriteZeroes(off, length int64, unmap bool) error {
	if err := img.startOp("write zeroes", off, length, true); err != nil {
		return err
	}
	defer img.gate.RUnlock()
	return img.commitAfter(img.zeroRange(off, length, func(e l2Entry) l2Entry {
		if img.unallocated(e) && img.backing == nil {
			return e // reads as zeros already
		}
		if !unmap && e.std&(flagCompressed|flagCopied) == flagCopied {
			return img.zeroEntry(int64(e.std & offsetMask))
		}
		return img.zeroEntry(0)
	}, true))
}

// Discard drops the data of the whole clusters in [off, off+length): they
// read as zeros afterwards and their space is freed. Partial clusters at the
// ends are left as they are, as a discard is only advice. Over a backing
// file the clusters become zero clusters, as QEMU makes them: unallocated,
// they would read the backing file's data again.
func (img *Image) Discard(off, length int64) error {
	if err := img.startOp("discard", off, length, true); err != nil {
		return err
	}
	defer img.gate.RUnlock()
	gone := l2Entry{}
	if img.backing != nil {
		gone = img.zeroEntry(0)
	}
	return img.commitAfter(img.zeroRange(off, length, func(l2Entry) l2Entry { return gone }, false))
}

// zeroRange gives every whole cluster in the range the entry replace
// returns and, if zeroEnds, writes zeros over the partial clusters.
func (img *Image) zeroRange(off, length int64, replace func(l2Entry) l2Entry, zeroEnds bool) error {
	cs := img.clusterSize
	end := off + length
	first := (off + cs - 1) / cs * cs
	last := end / cs * cs
	if first >= last { // no whole cluster
		if zeroEnds {
			return img.zeroPartial(off, end)
		}
		return nil
	}
	if zeroEnds {
		if err := img.zeroPartial(off, first); err != nil {
			return err
		}
		if err := img.zeroPartial(last, end); err != nil {
			return err
		}
	}
	for pos := first; pos < last; {
		n, err := img.replaceEntries(pos, last, replace)
		if err != nil {
			return fmt.Errorf("at %#x: %w", pos, err)
		}
		pos += n
	}
	return nil
}

// replaceEntries replaces the L2 entries of whole clusters from off up to
// end or the end of the L2 table, and returns how many bytes it covered (0
// after waiting for an allocation in flight: try again).
func (img *Image) replaceEntries(off, end int64, replace func(l2Entry) l2Entry) (int64, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	l1i, l2i, _ := img.l1Index(off)
	n := min(end-off, (img.l2Entries-l2i)*img.clusterSize)
	guest := off / img.clusterSize
	for i := range n / img.clusterSize {
		if ch := img.inflight[guest+i]; ch != nil {
			img.mu.Unlock()
			<-ch
			img.mu.Lock()
			return 0, nil
		}
	}
	// Without an L2 table the range reads as zeros already, unless it
	// reads the backing file.
	t, err := img.l2Table(l1i, img.backing != nil)
	if err != nil || t == nil {
		return n, err
	}
	for i := range n / img.clusterSize {
		if _, err := img.classify(img.l2Get(t, l2i+i), 0); err != nil {
			return 0, fmt.Errorf("L2 entry %d of L1 entry %d: %w", l2i+i, l1i, err) // change nothing
		}
	}
	for i := range n / img.clusterSize {
		e := img.l2Get(t, l2i+i)
		ne := replace(e)
		if ne == e {
			continue
		}
		if ne.std&offsetMask == 0 {
			img.dropReference(e)
		}
		img.l2Set(t, l2i+i, ne)
	}
	return n, nil
}

// zeroPartial writes zeros over [off, end) inside one cluster unless it
// reads as zeros already.
func (img *Image) zeroPartial(off, end int64) error {
	if off >= end {
		return nil
	}
	img.mu.Lock()
	m, err := img.lookup(off)
	img.mu.Unlock()
	if err != nil {
		return err
	}
	if m.kind == mapZero && m.n >= end-off {
		return nil
	}
	_, err = img.write(make([]byte, end-off), off)
	return err
}

// Flush makes every completed write durable, with the metadata that makes
// it reachable, in crash-safe order.
func (img *Image) Flush() error {
	if img.readOnly {
		return nil
	}
	img.gate.Lock()
	defer img.gate.Unlock()
	if img.closed {
		return ErrClosed
	}
	img.mu.Lock()
	err := img.flushLocked()
	img.mu.Unlock()
	// The refcounts releasePending lowered are in memory only.
	return img.commitAfter(err)
}

// flushLocked writes back the metadata, then the write pointers, which
// may only cover what is durable, then lets go of freed clusters. The
// journal is reset in between: it covered what is now durable, and the
// release is the first change of its next generation.
func (img *Image) flushLocked() error {
	if err := img.writeback(); err != nil {
		return err
	}
	if err := img.writeWritePointers(); err != nil {
		return err
	}
	if img.journal != nil {
		if err := img.journal.reset(); err != nil {
			return err
		}
	}
	return img.releasePending()
}

// Close flushes the image and closes its file. The image is clean on disk
// afterwards: no leak, no dirty metadata, and its journal is removed (kept
// if the flush failed).
func (img *Image) Close() error {
	img.gate.Lock()
	defer img.gate.Unlock()
	if img.closed {
		return ErrClosed
	}
	img.closed = true
	img.mu.Lock()
	defer img.mu.Unlock()
	var err error
	if !img.readOnly {
		// The second flush writes the refcounts the first one released.
		err = img.flushLocked()
		if err == nil {
			err = img.writeback()
		}
	}
	err = errors.Join(err, closeJournal(img.journal, err == nil), img.file.Close())
	if img.backing != nil {
		err = errors.Join(err, img.backing.Close())
	}
	return err
}

// commitAfter appends the journal batch of a mutating call that ended
// with err: a call that fails midway may have changed metadata too.
func (img *Image) commitAfter(err error) error {
	if cerr := img.commit(); cerr != nil {
		return errors.Join(err, cerr)
	}
	return err
}

// Map reports how [off, off+length) is stored, as runs of data and zeros.
func (img *Image) Map(off, length int64) ([]Extent, error) {
	if err := img.startOp("map", off, length, false); err != nil {
		return nil, err
	}
	defer img.gate.RUnlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	var out []Extent
	for pos := off; pos < off+length; {
		m, err := img.lookup(pos)
		if err != nil {
			return nil, err
		}
		n := min(m.n, off+length-pos)
		if m.kind == mapBacking {
			below, err := img.mapBacking(pos, n)
			if err != nil {
				return nil, err
			}
			for _, ext := range below {
				out = appendExtent(out, ext)
			}
		} else {
			out = appendExtent(out, Extent{Offset: pos, Length: n, Data: m.kind != mapZero, Zero: m.kind == mapZero})
		}
		pos += n
	}
	return out, nil
}

// mapBacking maps [off, off+n), which this image leaves to its backing
// file, as the backing file stores it; past its end, as zeros.
func (img *Image) mapBacking(off, n int64) ([]Extent, error) {
	in := max(0, min(n, img.backing.Size()-off))
	var out []Extent
	if in > 0 {
		below, err := img.backing.Map(off, in)
		if err != nil {
			return nil, fmt.Errorf("backing file: %w", err)
		}
		out = below
	}
	if in < n {
		out = append(out, Extent{Offset: off + in, Length: n - in, Zero: true})
	}
	return out, nil
}

// appendExtent appends ext to out, merging it into the last extent when
// they are stored the same way.
func appendExtent(out []Extent, ext Extent) []Extent {
	if k := len(out); k > 0 && out[k-1].Data == ext.Data && out[k-1].Zero == ext.Zero {
		out[k-1].Length += ext.Length
		return out
	}
	return append(out, ext)
}

// Info describes the image.
func (img *Image) Info() Info {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.hdr
	info := Info{
		Format:          "qcow2",
		Filename:        img.path,
		VirtualSize:     img.size,
		ClusterSize:     int(img.clusterSize),
		Version:         int(h.version),
		RefcountBits:    h.refcountBits(),
		CompressionType: "zlib",
		LazyRefcounts:   h.compatible&compatLazyRefcounts != 0,
		ExtendedL2:      img.extendedL2,
		Dirty:           h.incompatible&incompatDirty != 0,
		Corrupt:         h.incompatible&incompatCorrupt != 0,
		JournalReplayed: img.journalReplayed,
	}
	if name := h.backingFile; name != "" {
		info.BackingFilename, info.FullBackingFilename, info.BackingFormat = name, name, "qcow2"
		if img.path != "" {
			info.FullBackingFilename = backingPath(img.path, name)
		}
	}
	if img.zones != nil {
		z := img.zones.Zones
		info.Zones = &z
	}
	if f, ok := img.file.(osFile); ok {
		if st, err := f.f.Stat(); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				info.ActualSize = sys.Blocks * 512
			}
		}
	} else if size, err := img.file.Size(); err == nil {
		info.ActualSize = size
	}
	return info
}

var (
	_ io.ReaderAt = (*Image)(nil)
	_ io.WriterAt = (*Image)(nil)
)
