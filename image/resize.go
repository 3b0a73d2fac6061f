package image

import (
	"bytes"
	"fmt"
	"math"
	"slices"
)

// Grow enlarges the virtual disk of an image opened read-write to newSize
// bytes: the CSI driver's ControllerExpandVolume, run while the volume is
// detached. The new space reads as zeros. newSize must be a multiple of 512
// and not below the current size (shrinking is refused with
// ErrInvalidOption); an equal size changes nothing. A zoned image grows by
// whole zones only, and only if its size is a whole number of zones: the
// new zones are empty sequential zones, and the zone limits and the
// conventional zones stay as they are. Refusals change nothing on disk.
//
// Grow waits for the operations in flight and blocks new ones while it
// runs. It flushes first, then writes the tables that grow (a larger L1
// table, a larger write-pointer table, each moved to new clusters when its
// old ones are too small), makes them and their refcounts durable, and
// only then switches the header to the new size and tables with one
// write: a power cut leaves either the old disk or the grown one, never a
// header pointing at an unwritten table, and at worst leaks the clusters
// of the tables it left. The old tables' clusters are freed once the
// header is durable. Grow ends with everything durable, so with a journal
// it ends by resetting it: the journal never holds records across the
// layout change, whose offsets the next open could not place.
func (img *Image) Grow(newSize int64) error {
	if img.readOnly {
		return fmt.Errorf("grow to %d bytes: %w", newSize, ErrReadOnly)
	}
	img.gate.Lock()
	defer img.gate.Unlock()
	if img.closed {
		return ErrClosed
	}
	img.mu.Lock()
	from := img.size
	err := img.growLocked(newSize)
	img.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("grow from %d to %d bytes: %w", from, newSize, err)
	}
	// A failure midway may leave refcounts dirty (see growLocked).
	return img.commitAfter(err)
}

// checkGrow validates newSize for Grow; the errors name the rule broken.
func (img *Image) checkGrow(newSize int64) error {
	if newSize < img.size {
		return fmt.Errorf("the new size is smaller than the current one; shrinking is not supported: %w", ErrInvalidOption)
	}
	if newSize%512 != 0 || newSize > 1<<62 {
		return fmt.Errorf("the new size is not a multiple of 512 or too large: %w", ErrInvalidOption)
	}
	if l1 := l1EntriesFor(newSize, img.clusterSize, img.l2Entries); l1*8 > maxL1Bytes {
		return fmt.Errorf("too large for %d-byte clusters (the L1 table would exceed %d MiB): %w",
			img.clusterSize, maxL1Bytes>>20, ErrInvalidOption)
	}
	z := img.zones
	if z == nil {
		return nil
	}
	if img.wpDamage != nil {
		return fmt.Errorf("grow: %w", img.wpDamage)
	}
	if img.size%z.ZoneSize != 0 {
		return fmt.Errorf("the current size is not a whole number of %d-byte zones (the last zone is short); only such an image can grow: %w",
			z.ZoneSize, ErrInvalidOption)
	}
	if (newSize-img.size)%z.ZoneSize != 0 {
		return fmt.Errorf("a zoned image grows by whole zones, and %d bytes are not a multiple of the %d-byte zone size: %w",
			newSize-img.size, z.ZoneSize, ErrInvalidOption)
	}
	if newSize/z.ZoneSize > math.MaxUint32 {
		return fmt.Errorf("%d zones of %d bytes are more than nr_zones can count: %w", newSize/z.ZoneSize, z.ZoneSize, ErrInvalidOption)
	}
	return nil
}

// grownTable is a metadata table that Grow enlarges: written in place past
// its old end when its clusters have room, else whole to new clusters.
type grownTable struct {
	what     string
	off      int64 // where it is, and after place, where it will be
	oldBytes int64
	data     []byte // the whole new table
	// moved: the old clusters [oldFirst, oldFirst+oldCount) are to be
	// freed once the header no longer points at them.
	moved              bool
	oldFirst, oldCount int64
}

// place writes t where the grown image will find it: past the old end of
// the table if its clusters have room (nothing reads those bytes until the
// header says the table is longer), else whole to newly allocated
// clusters, whose refcounts stay dirty until the caller's writeback.
func (img *Image) place(t *grownTable) error {
	cs := img.clusterSize
	clusters := func(n int64) int64 { return (n + cs - 1) / cs }
	padded := make([]byte, clusters(int64(len(t.data)))*cs)
	copy(padded, t.data)
	if clusters(int64(len(t.data))) <= clusters(t.oldBytes) {
		// The rest of the last cluster is written too: bytes there may not
		// be zeros, and an L1 table read longer must find none but zeros.
		if _, err := img.file.WriteAt(padded[t.oldBytes:], t.off+t.oldBytes); err != nil {
			return fmt.Errorf("extending the %s at %#x: %w", t.what, t.off, err)
		}
		return nil
	}
	c, err := img.allocClusters(clusters(int64(len(t.data))))
	if err != nil {
		return fmt.Errorf("allocating the grown %s: %w", t.what, err)
	}
	t.moved, t.oldFirst, t.oldCount = true, t.off/cs, clusters(t.oldBytes)
	t.off = c * cs
	if _, err := img.file.WriteAt(padded, t.off); err != nil {
		return fmt.Errorf("writing the grown %s at %#x: %w", t.what, t.off, err)
	}
	return nil
}

// abandon frees the clusters of the tables place moved, when Grow fails
// before the header refers to them, and returns err.
func (img *Image) abandon(tables []*grownTable, err error) error {
	for _, t := range tables {
		if !t.moved {
			continue
		}
		n := (int64(len(t.data)) + img.clusterSize - 1) / img.clusterSize
		for c := t.off / img.clusterSize; c < t.off/img.clusterSize+n; c++ {
			if ferr := img.setRefcount(c, 0); ferr != nil {
				return fmt.Errorf("%w (and freeing the grown %s: %v)", err, t.what, ferr)
			}
		}
	}
	return err
}

// growLocked does Grow's work with the gate held exclusively and img.mu
// held. A failure before the header switch leaves the image as it was, the
// new tables' clusters freed again (abandon); a failure of the switch
// itself leaves the in-memory image as it was, the file with either
// header, and the new clusters counted (a leak at worst).
func (img *Image) growLocked(newSize int64) error {
	if err := img.checkGrow(newSize); err != nil || newSize == img.size {
		return err
	}
	// Everything pending becomes durable first: the tables are copied from
	// memory as they are on disk, and the journal is left empty.
	if err := img.flushLocked(); err != nil {
		return err
	}

	l1Entries := l1EntriesFor(newSize, img.clusterSize, img.l2Entries)
	tables := make([]*grownTable, 0, 2)
	var l1 *grownTable
	if l1Entries > int64(len(img.l1)) {
		l1 = &grownTable{what: "L1 table", off: int64(img.hdr.l1TableOffset), oldBytes: int64(len(img.l1)) * 8,
			data: encodeTable(append(slices.Clone(img.l1), make([]uint64, l1Entries-int64(len(img.l1)))...))}
		tables = append(tables, l1)
	}
	var wp *grownTable
	var nz *zonedExt
	var wps []int64
	if img.zones != nil {
		ext := *img.zones
		nz = &ext
		nz.NrZones = uint32(newSize / nz.ZoneSize)
		nz.metaSize = 8 * uint64(nz.NrZones)
		wps = append(slices.Clone(img.writePointers), nz.emptyPointers(len(img.writePointers), int(nz.NrZones))...)
		wp = &grownTable{what: "write-pointer table", off: int64(img.zones.metaOffset), oldBytes: int64(img.zones.metaSize),
			data: make([]byte, nz.metaSize)}
		nz.putEntries(wp.data, 0, wps)
		tables = append(tables, wp)
	}
	for _, t := range tables {
		if err := img.place(t); err != nil {
			return img.abandon(tables, err)
		}
	}
	// The tables and the refcounts of any new clusters are durable before
	// the header refers to them (writeback syncs at its end even when it
	// has no refcount to write).
	if err := img.writeback(); err != nil {
		return img.abandon(tables, err)
	}

	nh := *img.hdr
	nh.extensions = slices.Clone(img.hdr.extensions)
	nh.size = uint64(newSize)
	if l1 != nil {
		nh.l1Size = uint32(l1Entries)
		nh.l1TableOffset = uint64(l1.off)
	}
	if nz != nil {
		nz.metaOffset = uint64(wp.off)
		i := slices.IndexFunc(nh.extensions, func(e extension) bool { return e.typ == extZoned })
		nh.extensions[i].data = nz.encode()
		end, err := img.endCluster()
		if err != nil {
			return img.abandon(tables, err)
		}
		// The reader's own check, before anything refers to the table.
		if err := nz.validate(&nh, end*img.clusterSize); err != nil {
			return img.abandon(tables, err)
		}
	}
	// Past this point the header on disk may be either: nothing is freed.
	if err := img.switchHeader(&nh); err != nil {
		return err
	}

	img.size = newSize
	if l1 != nil {
		img.l1 = decodeTable(l1.data)
	}
	if nz != nil {
		// In place: SetWritePointer tests img.zones for nil without img.mu.
		*img.zones, img.writePointers = *nz, wps
	}
	for _, t := range tables {
		if t.moved {
			img.freeLater(t.oldFirst, t.oldCount)
		}
	}
	if err := img.releasePending(); err != nil {
		return err
	}
	if err := img.writeback(); err != nil {
		return err
	}
	if img.journal != nil {
		// The notes of this call are durable (and name offsets of the old
		// layout): none may reach a batch.
		return img.journal.reset()
	}
	return nil
}

// switchHeader makes nh the image's header with a single write that a
// power cut keeps whole or drops: a disk keeps or loses each 512-byte
// sector of a write on its own, so the write may differ from the header on
// disk in its first sector only. Every field Grow changes (size, the L1
// table, the zoned extension, which moves to the front of the extensions,
// a place in every image this package wrote) lies there once the header is
// in this package's layout; a header in another layout (another tool's
// extension order) is first rewritten as it is, in this layout, and synced.
func (img *Image) switchHeader(nh *header) error {
	moveZonedFirst := func(h *header) {
		slices.SortStableFunc(h.extensions, func(a, b extension) int {
			return boolInt(b.typ == extZoned) - boolInt(a.typ == extZoned)
		})
	}
	moveZonedFirst(img.hdr)
	moveZonedFirst(nh)
	cur, err := img.hdr.encode()
	if err != nil {
		return err
	}
	next, err := nh.encode()
	if err != nil {
		return err
	}
	if err := img.ownLayout(cur); err != nil {
		return err
	}
	if len(next) != len(cur) || !bytes.Equal(next[min(512, len(next)):], cur[min(512, len(cur)):]) {
		return fmt.Errorf("the new header differs from the old past its first sector, so a power cut could tear it: %w", ErrUnsupported)
	}
	old := img.hdr
	img.hdr = nh
	if err := img.writeHeader(); err != nil {
		img.hdr = old
		return err
	}
	return nil
}

// ownLayout rewrites the header in this package's layout, cur (the
// encoding of img.hdr), unless the file holds it so already: another
// tool's extension order or feature name table. A header switch that then
// writes its first sector alone leaves the rest as the file has it.
func (img *Image) ownLayout(cur []byte) error {
	onDisk := make([]byte, len(cur))
	if err := readFull(img.file, onDisk, 0); err != nil {
		return fmt.Errorf("reading the header: %w", err)
	}
	if bytes.Equal(onDisk, cur) {
		return nil
	}
	return img.writeHeader()
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
