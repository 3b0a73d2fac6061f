package image

import (
	"encoding/binary"
	"fmt"
)

// The metadata cache and its writeback. Every function here runs with
// img.mu held.

func (k tableKind) String() string {
	if k == kindL2 {
		return "L2 table"
	}
	return "refcount block"
}

// table returns the metadata table at file offset off, reading it into the
// cache if needed.
func (img *Image) table(off int64, kind tableKind) (*table, error) {
	if t := img.cache.get(off); t != nil {
		if t.kind != kind {
			return nil, fmt.Errorf("cluster at %#x is used as both an L2 table and a refcount block: %w", off, ErrCorrupt)
		}
		return t, nil
	}
	if err := img.makeRoom(); err != nil {
		return nil, err
	}
	t := &table{off: off, kind: kind, data: make([]byte, img.clusterSize)}
	if err := readTable(img.file, t.data, off, kind.String()); err != nil {
		return nil, err
	}
	img.cache.add(t)
	return t, nil
}

// newTable puts an empty, dirty table for a newly allocated cluster in the
// cache.
func (img *Image) newTable(off int64, kind tableKind) (*table, error) {
	if t := img.cache.get(off); t != nil {
		// A stale copy of what the cluster held before it was freed.
		clear(t.data)
		t.kind, t.dirty = kind, true
		img.noteNewTable(t)
		return t, nil
	}
	if err := img.makeRoom(); err != nil {
		return nil, err
	}
	t := &table{off: off, kind: kind, data: make([]byte, img.clusterSize), dirty: true}
	img.cache.add(t)
	img.noteNewTable(t)
	return t, nil
}

// makeRoom evicts a table if the cache is full, writing the dirty ones back
// first when only dirty ones are left.
func (img *Image) makeRoom() error {
	if !img.cache.full() || img.cache.evictClean() {
		return nil
	}
	if err := img.writeback(); err != nil {
		return err
	}
	if !img.cache.evictClean() {
		return fmt.Errorf("metadata cache of %d tables is full of tables in use", img.cache.max)
	}
	return nil
}

// writeback writes every dirty table in crash-safe order and syncs:
// refcounts, then L2 tables, then the L1 table, with a sync between stages
// whenever a later stage has something to write. A crash between stages
// leaves clusters counted but unreferenced (a leak), never referenced but
// free.
func (img *Image) writeback() error {
	wroteRefs, err := img.writeRefcounts()
	if err != nil {
		return err
	}
	l2 := img.cache.dirtyTables(kindL2)
	l1Dirty := img.l1DirtyLo >= 0
	if wroteRefs && (len(l2) > 0 || l1Dirty) {
		if err := img.file.Sync(); err != nil {
			return err
		}
	}
	if err := img.writeTables(l2); err != nil {
		return err
	}
	if l1Dirty {
		if len(l2) > 0 {
			if err := img.file.Sync(); err != nil {
				return err
			}
		}
		lo, hi := img.l1DirtyLo, img.l1DirtyHi
		buf := make([]byte, (hi-lo)*8)
		for i := lo; i < hi; i++ {
			binary.BigEndian.PutUint64(buf[(i-lo)*8:], img.l1[i])
		}
		if _, err := img.file.WriteAt(buf, int64(img.hdr.l1TableOffset)+lo*8); err != nil {
			return fmt.Errorf("writing the L1 table: %w", err)
		}
		img.l1DirtyLo, img.l1DirtyHi = -1, 0
	}
	return img.file.Sync()
}

// writeRefcounts writes the dirty refcount blocks and then, after a sync so
// it never points at a block that is not there, the refcount table. It
// reports whether it wrote anything.
func (img *Image) writeRefcounts() (bool, error) {
	blocks := img.cache.dirtyTables(kindRefblock)
	if err := img.writeTables(blocks); err != nil {
		return false, err
	}
	if !img.refTableDirty {
		return len(blocks) > 0, nil
	}
	if len(blocks) > 0 {
		if err := img.file.Sync(); err != nil {
			return false, err
		}
	}
	if _, err := img.file.WriteAt(encodeTable(img.refTable), img.refTableOffset); err != nil {
		return false, fmt.Errorf("writing the refcount table: %w", err)
	}
	img.refTableDirty = false
	return true, nil
}

func (img *Image) writeTables(ts []*table) error {
	for _, t := range ts {
		if _, err := img.file.WriteAt(t.data, t.off); err != nil {
			return fmt.Errorf("writing the %s at %#x: %w", t.kind, t.off, err)
		}
		t.dirty = false
	}
	return nil
}

// writeHeader rewrites the header and its extensions and syncs.
func (img *Image) writeHeader() error {
	buf, err := img.hdr.encode()
	if err != nil {
		return err
	}
	if _, err := img.file.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("writing the header: %w", err)
	}
	return img.file.Sync()
}
