package image

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"

	"golang.org/x/sys/unix"
)

// Create makes a new image at path. It refuses to overwrite an existing
// file, and removes what it made if it fails.
func Create(path string, opts CreateOptions) error {
	if opts.BackingFile != "" && opts.Backing == nil {
		b, err := openBacking(path, opts.BackingFile, 0, 1)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		defer b.Close()
		opts.Backing = b
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := flockSoon(f, unix.LOCK_EX); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("%s: lock: %w", path, err)
	}
	err = CreateStorage(osFile{f}, opts)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// normalize applies the defaults and validates every option; errors name
// the option as qemu-img spells it.
func (o CreateOptions) normalize() (CreateOptions, error) {
	if o.ClusterSize == 0 {
		o.ClusterSize = DefaultClusterSize
	}
	if o.RefcountBits == 0 {
		o.RefcountBits = DefaultRefcountBits
	}
	if o.Preallocation == "" {
		o.Preallocation = PreallocOff
	}
	if err := CheckClusterSize(int64(o.ClusterSize)); err != nil {
		return o, err
	}
	if err := CheckRefcountBits(int64(o.RefcountBits)); err != nil {
		return o, err
	}
	if o.Preallocation != PreallocOff && o.Preallocation != PreallocMetadata {
		return o, fmt.Errorf("preallocation %q: must be off or metadata: %w", o.Preallocation, ErrInvalidOption)
	}
	if err := o.inheritBacking(); err != nil {
		return o, err
	}
	if o.Size <= 0 {
		return o, fmt.Errorf("size %d: must be positive: %w", o.Size, ErrInvalidOption)
	}
	o.Size = (o.Size + 511) &^ 511
	if z := o.Zones; z != nil {
		if z.ZoneSize <= 0 || z.ZoneSize%512 != 0 {
			return o, fmt.Errorf("zone.size %d: must be a positive multiple of 512: %w", z.ZoneSize, ErrInvalidOption)
		}
		if z.ZoneCapacity <= 0 || z.ZoneCapacity > z.ZoneSize || z.ZoneCapacity%512 != 0 {
			return o, fmt.Errorf("zone.capacity %d: must be a multiple of 512 from 512 to zone.size %d: %w", z.ZoneCapacity, z.ZoneSize, ErrInvalidOption)
		}
		nr := (o.Size + z.ZoneSize - 1) / z.ZoneSize
		if nr > 1<<32-1 {
			return o, fmt.Errorf("zone.size %d: %d zones are too many: %w", z.ZoneSize, nr, ErrInvalidOption)
		}
		if int64(z.ConventionalZones) > nr {
			return o, fmt.Errorf("zone.conventional_zones %d: the disk has %d zones: %w", z.ConventionalZones, nr, ErrInvalidOption)
		}
		zones := *z
		zones.NrZones = uint32(nr)
		o.Zones = &zones
	}
	cs := int64(o.ClusterSize)
	if l1 := l1EntriesFor(o.Size, cs, cs/8); l1*8 > maxL1Bytes {
		return o, fmt.Errorf("size %d: too large for %d-byte clusters (the L1 table would exceed %d MiB): %w",
			o.Size, cs, maxL1Bytes>>20, ErrInvalidOption)
	}
	return o, nil
}

// inheritBacking takes from the backing image what the options leave to
// it, and refuses what would contradict it.
func (o *CreateOptions) inheritBacking() error {
	if (o.BackingFile == "") != (o.Backing == nil) {
		return fmt.Errorf("backing_file %q and an open backing image: both or neither: %w", o.BackingFile, ErrInvalidOption)
	}
	if o.Backing == nil {
		return nil
	}
	if len(o.BackingFile) > maxBackingName {
		return fmt.Errorf("backing_file name of %d bytes: at most %d: %w", len(o.BackingFile), maxBackingName, ErrInvalidOption)
	}
	if o.Preallocation != PreallocOff {
		return fmt.Errorf("preallocation %s over a backing file would hide it: %w", o.Preallocation, ErrInvalidOption)
	}
	bsize := o.Backing.Size()
	if o.Size == 0 {
		o.Size = bsize
	}
	bz, zoned := o.Backing.Zones()
	if !zoned {
		if o.Zones != nil {
			return fmt.Errorf("zone.mode=host-managed over the plain backing file %s: %w", o.BackingFile, ErrInvalidOption)
		}
		return nil
	}
	if o.Size < bsize {
		return fmt.Errorf("size %d: smaller than the zoned backing file's %d: %w", o.Size, bsize, ErrInvalidOption)
	}
	if o.Zones == nil {
		z := bz
		o.Zones = &z
		return nil
	}
	switch {
	case o.Zones.ZoneSize != bz.ZoneSize:
		return fmt.Errorf("zone.size %d: the backing file's zones are %d bytes: %w", o.Zones.ZoneSize, bz.ZoneSize, ErrInvalidOption)
	case o.Zones.ZoneCapacity != bz.ZoneCapacity:
		return fmt.Errorf("zone.capacity %d: the backing file's is %d: %w", o.Zones.ZoneCapacity, bz.ZoneCapacity, ErrInvalidOption)
	case o.Zones.ConventionalZones != bz.ConventionalZones:
		return fmt.Errorf("zone.conventional_zones %d: the backing file has %d: %w", o.Zones.ConventionalZones, bz.ConventionalZones, ErrInvalidOption)
	}
	return nil
}

func l1EntriesFor(size, clusterSize, l2Entries int64) int64 {
	coverage := clusterSize * l2Entries
	return (size + coverage - 1) / coverage
}

// CreateStorage writes a new, empty image to s, which must be empty. s
// (and opts.Backing) stay open and owned by the caller.
//
// The layout is QEMU's: the header in cluster 0, then the refcount table,
// the refcount blocks, the L1 table and, for a zoned image, the
// write-pointer table, with the refcounts covering all of them.
func CreateStorage(s Storage, opts CreateOptions) error {
	o, err := opts.normalize()
	if err != nil {
		return err
	}
	cs := int64(o.ClusterSize)
	l1Entries := l1EntriesFor(o.Size, cs, cs/8)
	l1Clusters := (l1Entries*8 + cs - 1) / cs
	blockEntries := cs * 8 / int64(o.RefcountBits)
	var wpClusters int64
	if o.Zones != nil {
		wpClusters = (8*int64(o.Zones.NrZones) + cs - 1) / cs
	}

	tableClusters, blocks := int64(1), int64(1)
	for {
		total := 1 + tableClusters + blocks + l1Clusters + wpClusters
		nb := (total + blockEntries - 1) / blockEntries
		nt := (nb*8 + cs - 1) / cs
		if nb == blocks && nt == tableClusters {
			break
		}
		blocks, tableClusters = nb, nt
	}
	total := 1 + tableClusters + blocks + l1Clusters + wpClusters

	h := &header{
		version:               3,
		clusterBits:           uint32(bits.TrailingZeros64(uint64(cs))),
		size:                  uint64(o.Size),
		l1Size:                uint32(l1Entries),
		l1TableOffset:         uint64((1 + tableClusters + blocks) * cs),
		refcountTableOffset:   uint64(cs),
		refcountTableClusters: uint32(tableClusters),
		refcountOrder:         uint32(bits.TrailingZeros(uint(o.RefcountBits))),
	}
	if o.LazyRefcounts {
		h.compatible |= compatLazyRefcounts
	}
	if o.Backing != nil {
		h.backingFile = o.BackingFile
		h.extensions = append(h.extensions, extension{typ: extBackingFmt, data: []byte("qcow2")})
	}
	var zext *zonedExt
	if o.Zones != nil {
		zext = &zonedExt{
			Zones:      *o.Zones,
			metaSize:   8 * uint64(o.Zones.NrZones),
			metaOffset: uint64((1 + tableClusters + blocks + l1Clusters) * cs),
		}
		h.incompatible |= incompatZoned
		h.extensions = append(h.extensions, extension{typ: extZoned, data: zext.encode()})
	}
	hdr, err := h.encode()
	if err != nil {
		return err
	}
	buf := make([]byte, total*cs)
	copy(buf, hdr)
	for i := range blocks {
		binary.BigEndian.PutUint64(buf[cs+i*8:], uint64((1+tableClusters+i)*cs))
	}
	blockArea := buf[(1+tableClusters)*cs:]
	for c := range total {
		setRefcountEntry(blockArea, c, o.RefcountBits, 1)
	}
	if zext != nil {
		table := buf[zext.metaOffset:]
		zext.putEntries(table, 0, zext.emptyPointers(0, int(zext.NrZones)))
		if o.Backing != nil {
			wps, err := o.Backing.WritePointers()
			if err != nil {
				return fmt.Errorf("backing file: %w", err)
			}
			zext.putEntries(table, 0, wps)
		}
	}
	if _, err := s.WriteAt(buf, 0); err != nil {
		return err
	}
	if err := s.Sync(); err != nil {
		return err
	}
	if o.Preallocation == PreallocMetadata {
		img, err := openImage(s, OpenOptions{})
		if err != nil {
			return err
		}
		return img.preallocate()
	}
	return nil
}

// preallocate maps every guest cluster to a data cluster, laid out in guest
// order, and extends the file over them (as a hole: nothing is written).
func (img *Image) preallocate() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	clusters := (img.size + img.clusterSize - 1) / img.clusterSize
	for first := int64(0); first < clusters; first += img.l2Entries {
		n := min(img.l2Entries, clusters-first)
		t, err := img.l2Table(first/img.l2Entries, true)
		if err != nil {
			return err
		}
		t.pins++ // allocClusters below may evict
		c, err := img.allocClusters(n)
		if err != nil {
			t.pins--
			return err
		}
		for i := range n {
			img.l2Set(t, i, img.dataEntry((c+i)*img.clusterSize))
		}
		t.pins--
	}
	if err := img.file.Truncate(img.highWater * img.clusterSize); err != nil {
		return err
	}
	return img.writeback()
}

// CheckClusterSize is the rule of cluster_size: a power of two from 512
// bytes to 2 MiB.
func CheckClusterSize(n int64) error {
	if !isPowerOfTwo(n) || n < MinClusterSize || n > MaxClusterSize {
		return fmt.Errorf("cluster_size %d: must be a power of two from 512 to 2M: %w", n, ErrInvalidOption)
	}
	return nil
}

// CheckRefcountBits is the rule of refcount_bits: a power of two up to 64.
func CheckRefcountBits(n int64) error {
	if !isPowerOfTwo(n) || n > 64 {
		return fmt.Errorf("refcount_bits %d: must be 1, 2, 4, 8, 16, 32 or 64: %w", n, ErrInvalidOption)
	}
	return nil
}
