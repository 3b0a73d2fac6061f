package image

import (
	"fmt"
	"math/bits"
	"slices"
)

// maxReported bounds the messages of one kind a check returns; a badly
// damaged image would otherwise produce one per cluster.
const maxReported = 200

// Check verifies the image's metadata: every table inside the file and
// aligned, every refcount equal to the number of references to its cluster,
// the COPIED flags consistent with them. With repair (read-write images
// only), refcounts are rewritten to match the references, which fixes leaks
// (and lost refcounts), and the result describes the image afterwards.
func (img *Image) Check(repair bool) (*CheckResult, error) {
	if repair && img.readOnly {
		return nil, fmt.Errorf("check --repair: %w", ErrReadOnly)
	}
	img.gate.Lock()
	defer img.gate.Unlock()
	if img.closed {
		return nil, ErrClosed
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.hdr.nbSnapshots != 0 {
		return nil, fmt.Errorf("checking images with internal snapshots: %w", ErrUnsupported)
	}
	var repaired int64
	var rebuilt []string
	if repair {
		var err error
		if rebuilt, err = img.rebuildLocked(); err != nil {
			return nil, err
		}
		n, err := img.repairLocked()
		if err != nil {
			return nil, err
		}
		repaired = n
	} else if err := img.settle(); err != nil {
		return nil, err
	}
	res, refs, err := img.count()
	if err != nil {
		return nil, err
	}
	if err := img.compareRefcounts(res, refs); err != nil {
		return nil, err
	}
	res.Repaired, res.Rebuilt = repaired, rebuilt
	return res, nil
}

// rebuildLocked makes anew the metadata a refcount repair cannot fix: the
// write-pointer table, when it cannot be read, flags zones wrongly, or
// shares a cluster with other metadata or data. It says what it rebuilt.
func (img *Image) rebuildLocked() ([]string, error) {
	if img.zones == nil {
		return nil, nil
	}
	if err := img.settle(); err != nil {
		return nil, err
	}
	_, refs, err := img.count()
	if err != nil {
		return nil, err
	}
	z := img.zones
	shared := false
	if img.wpDamage == nil {
		cs := int64(img.clusterSize)
		for c := int64(z.metaOffset) / cs; c <= (int64(z.metaOffset+z.metaSize)-1)/cs; c++ {
			shared = shared || refs[c] > 1
		}
	}
	if img.wpDamage == nil && !shared && len(img.writePointerProblems()) == 0 {
		return nil, nil
	}
	from := "the write pointers it held"
	wps := img.writePointers
	if img.wpDamage != nil || shared {
		// What the table held is lost or is another table's or data's
		// bytes. The end of each zone's data is a safe write pointer: no
		// write can land on data below it, and none of it reads as zeros.
		from = "the data: each sequential zone's write pointer at the end of its last allocated cluster"
		if wps, err = img.dataEnds(); err != nil {
			return nil, err
		}
	}
	off, err := img.writeNewWritePointerTable(refs, wps)
	if err != nil {
		return nil, err
	}
	return []string{fmt.Sprintf("write-pointer table rebuilt at %#x from %s", off, from)}, nil
}

// dataEnds is, per zone, the end of the last cluster (or subcluster) in it
// that reads data from the file, capped at the zone's capacity; a zone
// without data gets its start. Conventional zones get their start, as the
// table records them.
func (img *Image) dataEnds() ([]int64, error) {
	z := img.zones
	ends := z.emptyPointers(0, int(z.NrZones))
	var corrupt []string
	err := img.walkL2(func(l1i int64, t *table) {
		for l2i := range img.l2Entries {
			e := img.l2Get(t, l2i)
			compressed := e.std&flagCompressed != 0
			if !compressed && (e.std&offsetMask == 0 || !img.readsData(e)) {
				continue
			}
			lo := (l1i*img.l2Entries + l2i) * img.clusterSize
			hi := lo + img.clusterSize
			if img.extendedL2 && !compressed {
				hi = lo + int64(bits.Len32(uint32(e.bitmap&allAllocated)))*img.subclusterSize
			}
			hi = min(hi, img.size)
			for i := int(lo / z.ZoneSize); i < int(z.NrZones) && int64(i)*z.ZoneSize < hi; i++ {
				if uint32(i) < z.ConventionalZones {
					continue
				}
				start := int64(i) * z.ZoneSize
				capEnd := start + min(z.ZoneCapacity, img.size-start)
				ends[i] = max(ends[i], min(hi, capEnd))
			}
		}
	}, &report{msgs: &corrupt})
	return ends, err
}

// writeNewWritePointerTable writes a table of wps to newly allocated
// clusters past every cluster refs counts as in use, and switches the
// header to it once it is durable. The old clusters are left to the
// refcount repair that follows.
func (img *Image) writeNewWritePointerTable(refs []uint32, wps []int64) (int64, error) {
	img.repairRefs = refs
	savedHint := img.freeHint
	img.freeHint = int64(len(refs))
	defer func() { img.repairRefs, img.freeHint = nil, min(savedHint, img.freeHint) }()

	nz := *img.zones
	t := &grownTable{what: "write-pointer table", data: make([]byte, nz.metaSize)}
	nz.putEntries(t.data, 0, wps)
	if err := img.place(t); err != nil {
		return 0, err
	}
	if err := img.writeback(); err != nil {
		return 0, err
	}
	nz.metaOffset = uint64(t.off)
	nh := *img.hdr
	nh.extensions = slices.Clone(img.hdr.extensions)
	i := slices.IndexFunc(nh.extensions, func(e extension) bool { return e.typ == extZoned })
	nh.extensions[i].data = nz.encode()
	if err := img.switchHeader(&nh); err != nil {
		return 0, err
	}
	*img.zones = nz
	img.writePointers, img.wpDamage, img.wpDirtyLo = wps, nil, -1
	return t.off, nil
}

// settle writes everything back, including the refcounts of clusters freed
// by the last flush, so the file on disk is what a check inspects.
func (img *Image) settle() error {
	if img.readOnly {
		return nil
	}
	if err := img.flushLocked(); err != nil {
		return err
	}
	return img.writeback()
}

// report collects messages of one kind up to maxReported.
type report struct {
	msgs    *[]string
	dropped int
}

func (r *report) add(format string, args ...any) {
	if len(*r.msgs) < maxReported {
		*r.msgs = append(*r.msgs, fmt.Sprintf(format, args...))
		return
	}
	r.dropped++
}

func (r *report) close() {
	if r.dropped > 0 {
		*r.msgs = append(*r.msgs, fmt.Sprintf("... and %d more", r.dropped))
	}
}

// count walks the metadata and counts the references to every cluster. It
// reports structural problems as corruptions in the result.
func (img *Image) count() (*CheckResult, []uint32, error) {
	res := &CheckResult{}
	corrupt := report{msgs: &res.Corruptions}
	defer corrupt.close()
	cs := img.clusterSize
	end, err := img.endCluster()
	if err != nil {
		return nil, nil, err
	}
	refs := make([]uint32, end)
	ref := func(off, length int64, what string) bool {
		if off%cs != 0 && what != "compressed cluster" {
			corrupt.add("%s at %#x is not cluster aligned", what, off)
			return false
		}
		if off < 0 || length <= 0 || off+length > end*cs {
			corrupt.add("%s at %#x (%d bytes) is past the end of the file", what, off, length)
			return false
		}
		for c := off / cs; c <= (off+length-1)/cs; c++ {
			refs[c]++
		}
		return true
	}

	ref(0, cs, "header")
	ref(img.refTableOffset, int64(len(img.refTable))*8, "refcount table")
	for bi, e := range img.refTable {
		if e&0x1ff != 0 {
			corrupt.add("refcount table entry %d is %#x: reserved bits set", bi, e)
		}
		if off := int64(e &^ 0x1ff); off != 0 {
			ref(off, cs, fmt.Sprintf("refcount block %d", bi))
		}
	}
	ref(int64(img.hdr.l1TableOffset), int64(len(img.l1))*8, "L1 table")
	img.checkZones(ref, &corrupt)

	res.TotalClusters = (img.size + cs - 1) / cs
	err = img.walkL2(func(l1i int64, t *table) {
		ref(t.off, cs, fmt.Sprintf("L2 table of L1 entry %d", l1i))
		for l2i := range img.l2Entries {
			e := img.l2Get(t, l2i)
			if e == (l2Entry{}) {
				continue
			}
			where := fmt.Sprintf("L2 entry %d of L1 entry %d", l2i, l1i)
			if e.std&flagCompressed != 0 {
				if img.extendedL2 && e.bitmap != 0 {
					corrupt.add("%s: compressed cluster with subcluster bitmap %#x", where, e.bitmap)
				}
				off, length := img.compressedRange(e.std)
				if ref(off, length, "compressed cluster") {
					res.AllocatedClusters++
				}
				continue
			}
			reserved := l2Reserved
			if img.extendedL2 {
				reserved |= flagZero
			}
			if e.std&reserved != 0 {
				corrupt.add("%s is %#x: reserved bits set", where, e.std)
			}
			if _, err := img.classify(e, 0); err != nil {
				corrupt.add("%s: %v", where, err)
				continue
			}
			host := int64(e.std & offsetMask)
			if host == 0 {
				continue
			}
			if ref(host, cs, "data cluster of "+where) && img.readsData(e) {
				res.AllocatedClusters++
			}
		}
	}, &corrupt)
	if err != nil {
		return nil, nil, err
	}
	return res, refs, nil
}

// readsData reports whether any byte of the cluster comes from its data
// cluster.
func (img *Image) readsData(e l2Entry) bool {
	if img.extendedL2 {
		return e.bitmap&allAllocated != 0
	}
	return e.std&flagZero == 0
}

// walkL2 calls fn for every L2 table the L1 table points at validly, once:
// L1 entries sharing a table are reported, not walked again, so a hostile
// L1 table cannot make a check take forever.
func (img *Image) walkL2(fn func(l1i int64, t *table), corrupt *report) error {
	seen := make(map[int64]int)
	for l1i, e := range img.l1 {
		off := int64(e & offsetMask)
		if e&l1Reserved != 0 {
			corrupt.add("L1 entry %d is %#x: reserved bits set", l1i, e)
		}
		if off == 0 {
			continue
		}
		if off%img.clusterSize != 0 {
			corrupt.add("L1 entry %d: L2 table offset %#x is not cluster aligned", l1i, off)
			continue
		}
		if size, _ := img.file.Size(); off+img.clusterSize > max(size, img.highWater*img.clusterSize) {
			corrupt.add("L1 entry %d: L2 table at %#x is past the end of the file", l1i, off)
			continue
		}
		if first, ok := seen[off]; ok {
			corrupt.add("L1 entries %d and %d share the L2 table at %#x", first, l1i, off)
			continue
		}
		seen[off] = l1i
		t, err := img.table(off, kindL2)
		if err != nil {
			return err
		}
		t.pins++
		fn(int64(l1i), t)
		t.pins--
	}
	return nil
}

// compareRefcounts compares the refcounts with refs, the references
// counted, and checks the COPIED flags.
func (img *Image) compareRefcounts(res *CheckResult, refs []uint32) error {
	corrupt := report{msgs: &res.Corruptions}
	leaks := report{msgs: &res.Leaks}
	defer corrupt.close()
	defer leaks.close()

	leakStart, leakLen := int64(-1), int64(0)
	flushLeak := func() {
		if leakLen > 0 {
			if leakLen == 1 {
				leaks.add("cluster %d is leaked (refcount above its references)", leakStart)
			} else {
				leaks.add("clusters %d-%d are leaked (refcount above their references)", leakStart, leakStart+leakLen-1)
			}
		}
		leakStart, leakLen = -1, 0
	}
	last := int64(-1)
	limit := max(int64(len(refs)), int64(len(img.refTable))*img.refblockEntries)
	for c := int64(0); c < limit; c++ {
		if c >= int64(len(refs)) && img.refblockOffset(c/img.refblockEntries) == 0 {
			c = (c/img.refblockEntries+1)*img.refblockEntries - 1
			continue
		}
		rc, err := img.refcount(c)
		if err != nil {
			return err
		}
		var r uint64
		if c < int64(len(refs)) {
			r = uint64(refs[c])
		}
		if r > 0 {
			last = c
		}
		switch {
		case rc < r:
			flushLeak()
			corrupt.add("cluster %d: refcount %d but %d references", c, rc, r)
		case rc > r:
			if leakStart+leakLen != c {
				flushLeak()
				leakStart = c
			}
			leakLen++
			res.LeakedClusters++
		default:
			flushLeak()
		}
	}
	flushLeak()
	res.ImageEndOffset = (last + 1) * img.clusterSize

	// COPIED must be set exactly where the cluster has one reference.
	return img.walkL2(func(l1i int64, t *table) {
		l2off := int64(img.l1[l1i] & offsetMask)
		if (img.l1[l1i]&flagCopied != 0) != (refs[l2off/img.clusterSize] == 1) {
			corrupt.add("L1 entry %d: COPIED flag does not match the L2 table's %d references", l1i, refs[l2off/img.clusterSize])
		}
		for l2i := range img.l2Entries {
			e := img.l2Get(t, l2i)
			host := int64(e.std & offsetMask)
			if e.std&flagCompressed != 0 || host == 0 || host/img.clusterSize >= int64(len(refs)) {
				continue
			}
			if (e.std&flagCopied != 0) != (refs[host/img.clusterSize] == 1) {
				corrupt.add("L2 entry %d of L1 entry %d: COPIED flag does not match the data cluster's %d references", l2i, l1i, refs[host/img.clusterSize])
			}
		}
	}, &corrupt)
}

// repairLocked rewrites every refcount that differs from the references the
// metadata holds, and reports how many it changed. Refcount blocks it needs
// are allocated past the end of everything in use, so they can take no
// cluster the metadata refers to.
func (img *Image) repairLocked() (int64, error) {
	if err := img.settle(); err != nil {
		return 0, err
	}
	_, refs, err := img.count()
	if err != nil {
		return 0, err
	}
	img.repairRefs = refs
	savedHint := img.freeHint
	img.freeHint = int64(len(refs))
	defer func() { img.repairRefs, img.freeHint = nil, min(savedHint, img.freeHint) }()

	// Refcounts past the end of the file refer to nothing.
	var beyond []int64
	for bi := range int64(len(img.refTable)) {
		if img.refblockOffset(bi) == 0 {
			continue
		}
		for c := max(bi*img.refblockEntries, int64(len(refs))); c < (bi+1)*img.refblockEntries; c++ {
			rc, err := img.refcount(c)
			if err != nil {
				return 0, err
			}
			if rc != 0 {
				beyond = append(beyond, c)
			}
		}
	}
	var changed int64
	for c := range int64(len(refs)) {
		rc, err := img.refcount(c)
		if err != nil {
			return 0, err
		}
		if rc != uint64(refs[c]) {
			if err := img.setRefcount(c, uint64(refs[c])); err != nil {
				return changed, err
			}
			changed++
		}
	}
	for _, c := range beyond {
		if err := img.setRefcount(c, 0); err != nil {
			return changed, err
		}
		changed++
	}
	if err := img.writeback(); err != nil {
		return changed, err
	}
	return changed, nil
}
