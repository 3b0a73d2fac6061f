package image

import (
	"cmp"
	"container/list"
	"slices"
)

// tableKind tells L2 tables from refcount blocks, which a writeback must
// order differently (spec: refcounts before the tables that reference new
// clusters).
type tableKind uint8

const (
	kindL2 tableKind = iota
	kindRefblock
)

// table is one cluster of metadata held in memory, in its on-disk
// (big-endian) form.
type table struct {
	off   int64
	kind  tableKind
	data  []byte
	dirty bool
	// pins keeps a table in the cache while an operation holds it across
	// calls that may evict; an evicted table that is then modified would be
	// a lost update.
	pins int
	elem *list.Element
}

// tableCache is a bounded LRU of metadata tables. Dirty tables are never
// evicted: the image writes them back, in order, first.
type tableCache struct {
	max    int
	tables map[int64]*table
	lru    list.List // front: most recently used
}

func newTableCache(max int) *tableCache {
	return &tableCache{max: max, tables: make(map[int64]*table)}
}

func (c *tableCache) get(off int64) *table {
	t := c.tables[off]
	if t != nil {
		c.lru.MoveToFront(t.elem)
	}
	return t
}

func (c *tableCache) full() bool { return len(c.tables) >= c.max }

func (c *tableCache) add(t *table) {
	t.elem = c.lru.PushFront(t)
	c.tables[t.off] = t
}

// evictClean drops the least recently used clean, unpinned table and
// reports whether there was one.
func (c *tableCache) evictClean() bool {
	for e := c.lru.Back(); e != nil; e = e.Prev() {
		t := e.Value.(*table)
		if !t.dirty && t.pins == 0 {
			c.lru.Remove(e)
			delete(c.tables, t.off)
			return true
		}
	}
	return false
}

// dirtyTables returns the dirty tables of one kind, in file order so the
// writeback is a forward sweep.
func (c *tableCache) dirtyTables(kind tableKind) []*table {
	var out []*table
	for _, t := range c.tables {
		if t.dirty && t.kind == kind {
			out = append(out, t)
		}
	}
	slices.SortFunc(out, func(a, b *table) int { return cmp.Compare(a.off, b.off) })
	return out
}
