package image

import (
	"encoding/binary"
	"fmt"
)

// Refcounts and the cluster allocator. Every function here runs with img.mu
// held.

// getRefcountEntry decodes entry i of a refcount block of the given width.
// Sub-byte widths pack from the least significant bit, as QEMU does.
func getRefcountEntry(data []byte, i int64, width int) uint64 {
	be := binary.BigEndian
	switch width {
	case 64:
		return be.Uint64(data[i*8:])
	case 32:
		return uint64(be.Uint32(data[i*4:]))
	case 16:
		return uint64(be.Uint16(data[i*2:]))
	case 8:
		return uint64(data[i])
	}
	bit := i * int64(width)
	return uint64(data[bit/8]>>(bit%8)) & (1<<width - 1)
}

func setRefcountEntry(data []byte, i int64, width int, v uint64) {
	be := binary.BigEndian
	switch width {
	case 64:
		be.PutUint64(data[i*8:], v)
	case 32:
		be.PutUint32(data[i*4:], uint32(v))
	case 16:
		be.PutUint16(data[i*2:], uint16(v))
	case 8:
		data[i] = byte(v)
	default:
		bit := i * int64(width)
		mask := byte(1<<width-1) << (bit % 8)
		data[bit/8] = data[bit/8]&^mask | byte(v)<<(bit%8)&mask
	}
}

// maxRefcount is the largest refcount the image's width can hold.
func (img *Image) maxRefcount() uint64 {
	if w := img.hdr.refcountBits(); w < 64 {
		return 1<<w - 1
	}
	return ^uint64(0)
}

// refblockOffset returns the file offset of the refcount block for block
// index bi, or 0 when there is none.
func (img *Image) refblockOffset(bi int64) int64 {
	if bi >= int64(len(img.refTable)) {
		return 0
	}
	return int64(img.refTable[bi] &^ 0x1ff)
}

// refblock returns the refcount block of block index bi, or nil when the
// range has none.
func (img *Image) refblock(bi int64) (*table, error) {
	off := img.refblockOffset(bi)
	if off == 0 {
		return nil, nil
	}
	if off%img.clusterSize != 0 || uint64(off) > offsetMask {
		return nil, fmt.Errorf("refcount table entry %d: block offset %#x is not a cluster-aligned offset: %w", bi, off, ErrCorrupt)
	}
	return img.table(off, kindRefblock)
}

// refcount returns cluster c's refcount.
func (img *Image) refcount(c int64) (uint64, error) {
	t, err := img.refblock(c / img.refblockEntries)
	if err != nil || t == nil {
		return 0, err
	}
	return getRefcountEntry(t.data, c%img.refblockEntries, img.hdr.refcountBits()), nil
}

// setRefcount sets cluster c's refcount, creating its refcount block if the
// range has none.
func (img *Image) setRefcount(c int64, v uint64) error {
	if v > img.maxRefcount() {
		return fmt.Errorf("cluster %d: refcount %d overflows %d-bit refcounts: %w", c, v, img.hdr.refcountBits(), ErrCorrupt)
	}
	bi := c / img.refblockEntries
	if img.refblockOffset(bi) == 0 {
		if v == 0 {
			return nil
		}
		if err := img.addRefblock(bi); err != nil {
			return err
		}
	}
	t, err := img.refblock(bi)
	if err != nil {
		return err
	}
	img.setRefcountIn(t, c%img.refblockEntries, v)
	if v == 0 && c < img.freeHint {
		img.freeHint = c
	}
	return nil
}

// setRefcountIn sets entry i of refcount block t. The journal takes the
// aligned 8-byte word holding it, as narrow entries share bytes.
func (img *Image) setRefcountIn(t *table, i int64, v uint64) {
	w := img.hdr.refcountBits()
	setRefcountEntry(t.data, i, w, v)
	t.dirty = true
	img.noteTableWord(t, i*int64(w)/8)
}

// setRefTable points refcount table entry bi at the block at off.
func (img *Image) setRefTable(bi, off int64) {
	img.refTable[bi] = uint64(off)
	img.refTableDirty = true
	img.note(recRefTable, img.refTableOffset+bi*8, nil)
}

// addRefblock gives block index bi a new, empty refcount block allocated
// elsewhere. Allocation itself never needs this: it places missing blocks
// inside the range they describe (see allocClusters).
func (img *Image) addRefblock(bi int64) error {
	if bi >= int64(len(img.refTable)) {
		if err := img.growRefTable(bi + 1); err != nil {
			return err
		}
		if img.refblockOffset(bi) != 0 {
			return nil
		}
	}
	c, err := img.allocClusters(1)
	if err != nil {
		return err
	}
	if _, err := img.newTable(c*img.clusterSize, kindRefblock); err != nil {
		return err
	}
	img.setRefTable(bi, c*img.clusterSize)
	return nil
}

// allocClusters allocates n contiguous clusters, sets their refcounts to 1
// and returns the index of the first. The refcounts are dirty in the cache:
// writeback makes them durable before any table that points at the
// clusters.
func (img *Image) allocClusters(n int64) (int64, error) {
	for {
		start, firstFree, err := img.findFree(n)
		if err != nil {
			return 0, err
		}
		last := start + n - 1
		if lastBlock := last / img.refblockEntries; lastBlock >= int64(len(img.refTable)) {
			if err := img.growRefTable(lastBlock + 1); err != nil {
				return 0, err
			}
			continue // the new table and its blocks took clusters: search again
		}
		if bi, ok := img.missingRefblock(start, last); ok {
			// The new block takes the run's first cluster. That cluster lies
			// either in range bi, and the block counts itself, or in an
			// earlier range, which has a block as bi is the first without;
			// then it is counted there first, so that a writeback between
			// the steps (the cache may need room) leaks it at worst, never
			// leaves the table pointing at a cluster with refcount 0.
			self := start/img.refblockEntries == bi
			if !self {
				if err := img.setRefcount(start, 1); err != nil {
					return 0, err
				}
			}
			t, err := img.newTable(start*img.clusterSize, kindRefblock)
			if err != nil {
				return 0, err
			}
			if self {
				img.setRefcountIn(t, start%img.refblockEntries, 1)
			}
			img.setRefTable(bi, start*img.clusterSize)
			img.highWater = max(img.highWater, start+1)
			continue
		}
		for c := start; c <= last; c++ {
			if err := img.setRefcount(c, 1); err != nil {
				return 0, err
			}
		}
		// Nothing below firstFree is free; if the run began there, nothing
		// below its end is.
		img.freeHint = firstFree
		if firstFree == start {
			img.freeHint = start + n
		}
		img.highWater = max(img.highWater, start+n)
		return start, nil
	}
}

func (img *Image) missingRefblock(first, last int64) (int64, bool) {
	for bi := first / img.refblockEntries; bi <= last/img.refblockEntries; bi++ {
		if img.refblockOffset(bi) == 0 {
			return bi, true
		}
	}
	return 0, false
}

// findFree returns the first run of n free clusters at or after freeHint,
// and the first free cluster it saw, which may lie before the run (in a
// gap too short for it). During a repair, clusters the check found
// referenced count as used even where their refcount says free.
func (img *Image) findFree(n int64) (start, firstFree int64, err error) {
	run := int64(0)
	firstFree = -1
	for c := img.freeHint; ; c++ {
		rc, err := img.refcount(c)
		if err != nil {
			return 0, 0, err
		}
		if rc == 0 && img.repairRefs != nil && c < int64(len(img.repairRefs)) && img.repairRefs[c] != 0 {
			rc = 1
		}
		if rc != 0 {
			run = 0
			continue
		}
		if firstFree < 0 {
			firstFree = c
		}
		if run == 0 {
			start = c
		}
		if run++; run == n {
			return start, firstFree, nil
		}
	}
}

// growRefTable moves the refcount table to the end of the file, big enough
// for at least minEntries blocks. The new table and any refcount blocks it
// needs for its own clusters go past every cluster in use, so no search is
// needed, and the header switches to it only once it is durable.
func (img *Image) growRefTable(minEntries int64) error {
	cs := img.clusterSize
	perCluster := cs / 8
	end, err := img.endCluster()
	if err != nil {
		return err
	}
	old := img.refTable
	missing := func(bi int64) bool { return bi >= int64(len(old)) || old[bi] == 0 }

	entries := max(minEntries, 2*int64(len(old)))
	var tableClusters, blocks int64
	for {
		tableClusters = (entries + perCluster - 1) / perCluster
		blocks = 0
		for {
			last := end + tableClusters + blocks - 1
			k := int64(0)
			for bi := end / img.refblockEntries; bi <= last/img.refblockEntries; bi++ {
				if missing(bi) {
					k++
				}
			}
			if k == blocks {
				break
			}
			blocks = k
		}
		lastBlock := (end + tableClusters + blocks - 1) / img.refblockEntries
		if lastBlock < entries {
			break
		}
		entries = lastBlock + 1
	}
	if tableClusters*cs > maxRefTableBytes {
		return fmt.Errorf("refcount table would need %d clusters, over the %d MiB limit: the image is too large for %d-byte clusters: %w",
			tableClusters, maxRefTableBytes>>20, cs, ErrUnsupported)
	}

	grown := make([]uint64, tableClusters*perCluster)
	copy(grown, old)
	next := end + tableClusters
	for bi := end / img.refblockEntries; bi <= (end+tableClusters+blocks-1)/img.refblockEntries; bi++ {
		if missing(bi) {
			grown[bi] = uint64(next * cs)
			if _, err := img.newTable(next*cs, kindRefblock); err != nil {
				return err
			}
			next++
		}
	}
	oldOffset, oldClusters := img.refTableOffset, int64(img.hdr.refcountTableClusters)
	img.refTable = grown
	img.refTableOffset = end * cs
	img.refTableDirty = true
	img.highWater = max(img.highWater, next)
	for c := end; c < next; c++ {
		if err := img.setRefcount(c, 1); err != nil {
			return err
		}
	}
	// Blocks first, then the table, then the header that points at it.
	if _, err := img.writeRefcounts(); err != nil {
		return err
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	img.hdr.refcountTableOffset = uint64(img.refTableOffset)
	img.hdr.refcountTableClusters = uint32(tableClusters)
	if err := img.writeHeader(); err != nil {
		return err
	}
	// Nothing refers to the old table any more.
	for c := oldOffset / cs; c < oldOffset/cs+oldClusters; c++ {
		if err := img.setRefcount(c, 0); err != nil {
			return err
		}
	}
	return nil
}

// endCluster is the index of the first cluster past everything in use: the
// end of the file or of anything allocated but not yet written.
func (img *Image) endCluster() (int64, error) {
	size, err := img.file.Size()
	if err != nil {
		return 0, err
	}
	return max((size+img.clusterSize-1)/img.clusterSize, img.highWater), nil
}

// freeLater queues clusters whose references are being dropped. Their
// refcounts fall only after a flush has made the dropped references durable,
// so a crash can leak them but never leave a table pointing at a cluster
// that was handed out again.
func (img *Image) freeLater(first, count int64) {
	img.pendingFree = append(img.pendingFree, clusterRun{first, count})
}

type clusterRun struct{ first, count int64 }

// releasePending applies the queued frees and gives the space of the
// clusters they free back to the filesystem. Called by Flush once the
// references they drop are durable and no I/O is in flight.
//
// The holes are punched then, and only then: every reference to the
// clusters is gone from the disk, so no crash brings one back over a hole,
// and none of them can have been allocated again (the allocator takes
// clusters with a refcount of 0, which they had only a moment ago, and
// nothing allocates during a flush), so no later write lands in a hole.
func (img *Image) releasePending() error {
	var freed []clusterRun
	for _, r := range img.pendingFree {
		for c := r.first; c < r.first+r.count; c++ {
			rc, err := img.refcount(c)
			if err != nil {
				return err
			}
			if rc == 0 {
				return fmt.Errorf("cluster %d: freeing a cluster whose refcount is already 0: %w", c, ErrCorrupt)
			}
			if err := img.setRefcount(c, rc-1); err != nil {
				return err
			}
			if rc > 1 {
				continue
			}
			if k := len(freed); k > 0 && freed[k-1].first+freed[k-1].count == c {
				freed[k-1].count++
			} else {
				freed = append(freed, clusterRun{c, 1})
			}
		}
	}
	img.pendingFree = img.pendingFree[:0]
	if p, ok := img.file.(holePuncher); ok {
		for _, r := range freed {
			// Best effort: a hole that cannot be punched leaves the space
			// with the image, for its own later writes; the clusters are
			// free all the same, and the flush must not fail for it.
			_ = p.PunchHole(r.first*img.clusterSize, r.count*img.clusterSize)
		}
	}
	return nil
}
