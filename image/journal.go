package image

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The redo journal keeps acknowledged writes across the death of the
// serving process. Metadata is written back only at Flush or on cache
// eviction, in crash order, because that is what survives a power cut. A
// process killed while the machine runs loses that dirty metadata, though
// the kernel keeps every pwrite it made: so every call that dirties
// metadata also appends the words it dirtied, with one pwrite and no sync,
// to a journal beside the image. The journal lives in the page cache only:
// it is scoped to one boot, and after a reboot (the page cache, and with it
// every unsynced pwrite, is gone) it is discarded and the image's own
// crash-ordered state stands.
//
// Replay does not write the records into the image file: it applies them to
// the metadata in memory, as the dead process held it, and lets the normal
// writeback make them durable in crash order. A power cut during replay
// therefore leaves the image as consistent as one during any flush, and the
// journal is still there for the next open of the same boot.
//
// Layout (all integers big-endian):
//
//	header (journalHeaderLen bytes):
//	  magic [8], version u32, reserved u32, boot id [16], st_dev u64,
//	  st_ino u64, birth time ns i64, generation u64, crc32c u32 over the
//	  preceding bytes, reserved u32
//	batches, one per call:
//	  generation u64, record count u32, crc32c u32 over the generation,
//	  the count and the records
//	record (16 bytes):
//	  kind (top byte) | file offset (low 56 bits) u64, value u64: the 8
//	  bytes at the offset read big-endian, whatever the structure's own
//	  byte order (the write-pointer table is little-endian)
//
// A Flush resets the journal once the metadata it covers is durable:
// truncated to the header, generation bumped. Batches carry the
// generation, so bytes of an earlier one are never taken for a batch.
//
// Header fields need no record: every change to them (the refcount table
// moving as it grows, the dirty and autoclear bits) is written and synced
// in place by writeHeader before the call goes on. Grow, which resizes the
// disk and may move the L1 and write-pointer tables, flushes first, makes
// all it changes durable itself and resets the journal at its end, so no
// batch holds offsets of a layout other than the header's. A refcount
// table that moved leaves records of its old place behind; they are
// dropped (growRefTable wrote the new table whole, and it lies past every
// cluster in use then, so past the old one).
//
// A header that cannot be read fails the open with ErrJournal rather than
// being discarded: within one boot it was written by one pwrite, which a
// dying process does not tear, so garbage there means something this
// package cannot account for, and discarding could drop acknowledged
// writes. Only a header of zeros (or an empty file) counts as no journal:
// that is what a power cut leaves of a file whose blocks were never
// written back, and after a power cut there is nothing to replay.

// ErrJournal: the image's journal cannot be read. The open refuses rather
// than guess: the journal may hold acknowledged writes.
var ErrJournal = errors.New("unreadable image journal")

const (
	journalMagic     = "zqjrnl\x00\x01"
	journalVersion   = 1
	journalHeaderLen = 72
	batchHeaderLen   = 16
	recordLen        = 16

	// journalSlack bounds how far past the end of the image file a
	// recorded metadata cluster may lie. Data clusters are written at once,
	// so only the few tables allocated by calls in flight at the kill (with
	// their data not yet written) lie past it.
	journalSlack = 1024

	bootIDPath = "/proc/sys/kernel/random/boot_id"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// recKind says which structure a record changes. Replay applies a batch's
// records in this order, so a writeback forced by cache pressure midway
// never writes a table reference before the refcount that backs it.
type recKind uint8

const (
	recRefblockNew  recKind = iota + 1 // a new refcount block: zero-fill the cluster
	recRefblock                        // a word of a refcount block
	recRefTable                        // a refcount table entry
	recL2New                           // a new L2 table: zero-fill the cluster
	recL2                              // a word of an L2 table
	recL1                              // an L1 entry
	recWritePointer                    // a write-pointer table entry
)

const recOffsetMask = 1<<56 - 1

type journalRecord struct {
	kind  recKind
	off   int64
	value uint64
}

// journalIdentity names the image a journal belongs to: st_dev and st_ino
// of its file, and its birth time where the file system reports one, so a
// journal left by a deleted image is not replayed into a new one that got
// its inode. Storage other than a file has the zero identity.
type journalIdentity struct {
	dev, ino uint64
	btime    int64
}

type journalHeader struct {
	boot [16]byte
	id   journalIdentity
	gen  uint64
}

func (h *journalHeader) encode() []byte {
	b := make([]byte, journalHeaderLen)
	be := binary.BigEndian
	copy(b, journalMagic)
	be.PutUint32(b[8:], journalVersion)
	copy(b[16:], h.boot[:])
	be.PutUint64(b[32:], h.id.dev)
	be.PutUint64(b[40:], h.id.ino)
	be.PutUint64(b[48:], uint64(h.id.btime))
	be.PutUint64(b[56:], h.gen)
	be.PutUint32(b[64:], crc32.Checksum(b[:64], castagnoli))
	return b
}

func zeroBytes(b []byte) bool { return bytes.Count(b, []byte{0}) == len(b) }

// errNoJournal: the journal file is empty or its header was never written
// (all zeros: a file extended before a power cut, its block never written).
var errNoJournal = errors.New("no journal")

func parseJournalHeader(b []byte) (journalHeader, error) {
	var h journalHeader
	b = b[:min(len(b), journalHeaderLen)]
	if zeroBytes(b) {
		return h, errNoJournal
	}
	if len(b) < journalHeaderLen {
		return h, fmt.Errorf("header is %d bytes, want %d: %w", len(b), journalHeaderLen, ErrJournal)
	}
	be := binary.BigEndian
	if string(b[:8]) != journalMagic {
		return h, fmt.Errorf("bad magic %q: %w", b[:8], ErrJournal)
	}
	if v := be.Uint32(b[8:]); v != journalVersion {
		return h, fmt.Errorf("version %d, this package writes %d: %w", v, journalVersion, ErrJournal)
	}
	if sum := crc32.Checksum(b[:64], castagnoli); sum != be.Uint32(b[64:]) {
		return h, fmt.Errorf("header checksum %#x, want %#x: %w", be.Uint32(b[64:]), sum, ErrJournal)
	}
	copy(h.boot[:], b[16:32])
	h.id = journalIdentity{dev: be.Uint64(b[32:]), ino: be.Uint64(b[40:]), btime: int64(be.Uint64(b[48:]))}
	h.gen = be.Uint64(b[56:])
	return h, nil
}

// parseBatches returns the batches of generation gen that follow the
// header, up to the first that is torn: short, of another generation, with
// a bad checksum, or with a record valid rejects.
func parseBatches(b []byte, gen uint64, valid func(journalRecord) error) [][]journalRecord {
	be := binary.BigEndian
	var out [][]journalRecord
	for len(b) >= batchHeaderLen {
		n := int64(be.Uint32(b[8:]))
		if be.Uint64(b) != gen || n == 0 || n > int64(len(b)-batchHeaderLen)/recordLen {
			break
		}
		end := batchHeaderLen + n*recordLen
		sum := crc32.Update(crc32.Checksum(b[:12], castagnoli), castagnoli, b[batchHeaderLen:end])
		if sum != be.Uint32(b[12:]) {
			break
		}
		recs := make([]journalRecord, n)
		ok := true
		for i := range recs {
			p := b[batchHeaderLen+int64(i)*recordLen:]
			k := be.Uint64(p)
			recs[i] = journalRecord{kind: recKind(k >> 56), off: int64(k & recOffsetMask), value: be.Uint64(p[8:])}
			if valid(recs[i]) != nil {
				ok = false
				break
			}
		}
		if !ok {
			break
		}
		out = append(out, recs)
		b = b[end:]
	}
	return out
}

func encodeBatch(gen uint64, recs []journalRecord) []byte {
	be := binary.BigEndian
	b := make([]byte, batchHeaderLen+len(recs)*recordLen)
	be.PutUint64(b, gen)
	be.PutUint32(b[8:], uint32(len(recs)))
	for i, r := range recs {
		p := b[batchHeaderLen+i*recordLen:]
		be.PutUint64(p, uint64(r.kind)<<56|uint64(r.off))
		be.PutUint64(p[8:], r.value)
	}
	sum := crc32.Update(crc32.Checksum(b[:12], castagnoli), castagnoli, b[batchHeaderLen:])
	be.PutUint32(b[12:], sum)
	return b
}

// journal is an open image's journal.
type journal struct {
	s    Storage
	path string // the file, for messages and for removal on Close; may be ""
	hdr  journalHeader

	// mu serializes appends. A committer takes it while still holding
	// img.mu, so batches reach the file in the order they were built.
	mu  sync.Mutex
	end int64 // append offset
	err error // a failed append: refuse more until a reset

	// Guarded by img.mu: the words dirtied since the last batch, keyed by
	// kind<<56|offset (the table, for the kinds that live in one), and the
	// number of batches built.
	pending map[uint64]*table
	built   uint64
	written atomic.Uint64 // batches appended (or failed)
}

func (j *journal) name() string {
	if j.path != "" {
		return j.path
	}
	return "journal"
}

// reset empties the journal and moves it to the next generation. Called
// with img.mu held once everything the journal covers is durable.
func (j *journal) reset() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	clear(j.pending)
	j.written.Store(j.built)
	j.hdr.gen++
	// Truncate first: a death between the steps leaves the old header with
	// no batches. The other order would be safe too, as batches carry their
	// generation.
	if err := j.s.Truncate(journalHeaderLen); err != nil {
		j.err = fmt.Errorf("%s: resetting: %w", j.name(), err)
		return j.err
	}
	if _, err := j.s.WriteAt(j.hdr.encode(), 0); err != nil {
		j.err = fmt.Errorf("%s: writing the header: %w", j.name(), err)
		return j.err
	}
	j.end, j.err = journalHeaderLen, nil
	return nil
}

// append writes one batch. j.mu is held.
func (j *journal) append(b []byte) error {
	if j.err != nil {
		return j.err
	}
	if _, err := j.s.WriteAt(b, j.end); err != nil {
		// A torn batch ends the journal for replay: later ones would be
		// ignored, so append none until a flush makes them unnecessary.
		j.err = fmt.Errorf("%s: appending a batch: %w", j.name(), err)
		return j.err
	}
	j.end += int64(len(b))
	return nil
}

// note records that the word at file offset off changed; t is the table
// it lies in, if any. img.mu is held.
func (img *Image) note(kind recKind, off int64, t *table) {
	if img.journal != nil {
		img.journal.pending[uint64(kind)<<56|uint64(off)] = t
	}
}

// noteTableWord records the aligned 8-byte word of t holding byte i.
func (img *Image) noteTableWord(t *table, i int64) {
	kind := recL2
	if t.kind == kindRefblock {
		kind = recRefblock
	}
	img.note(kind, t.off+i&^7, t)
}

// noteNewTable records that t's cluster must be zero-filled before its
// words are applied: it may hold old bytes.
func (img *Image) noteNewTable(t *table) {
	kind := recL2New
	if t.kind == kindRefblock {
		kind = recRefblockNew
	}
	img.note(kind, t.off, t)
}

// buildBatch turns the pending words into records, with their values as
// they are now. img.mu is held.
func (img *Image) buildBatch() []journalRecord {
	j := img.journal
	recs := make([]journalRecord, 0, len(j.pending))
	for key, t := range j.pending {
		r := journalRecord{kind: recKind(key >> 56), off: int64(key & recOffsetMask)}
		switch r.kind {
		case recRefblock, recL2:
			r.value = binary.BigEndian.Uint64(t.data[r.off-t.off:])
		case recRefTable:
			i := (r.off - img.refTableOffset) / 8
			if r.off < img.refTableOffset || i >= int64(len(img.refTable)) {
				continue // the table moved since: growRefTable wrote it whole, and synced
			}
			r.value = img.refTable[i]
		case recL1:
			r.value = img.l1[(r.off-int64(img.hdr.l1TableOffset))/8]
		case recWritePointer:
			i := int((r.off - int64(img.zones.metaOffset)) / 8)
			r.value = bits.ReverseBytes64(img.zones.wpEntry(i, img.writePointers[i]))
		}
		recs = append(recs, r)
	}
	clear(j.pending)
	return recs
}

// commit appends one batch with every word dirtied since the last, before
// a mutating call returns. A call whose words went into another call's
// batch waits for that batch to be written. Called without img.mu.
func (img *Image) commit() error {
	j := img.journal
	if j == nil {
		return nil
	}
	img.mu.Lock()
	if img.closed {
		img.mu.Unlock()
		return ErrClosed
	}
	if len(j.pending) == 0 {
		inFlight := j.written.Load() != j.built
		img.mu.Unlock()
		if !inFlight {
			return nil
		}
		// The batch in flight holds j.mu; once we get it, it is written.
		j.mu.Lock()
		defer j.mu.Unlock()
		return j.err
	}
	recs := img.buildBatch()
	j.built++
	seq := j.built
	gen := j.hdr.gen
	j.mu.Lock()
	img.mu.Unlock()
	defer j.mu.Unlock()
	defer j.written.Store(seq)
	if len(recs) == 0 {
		return j.err
	}
	return j.append(encodeBatch(gen, recs))
}

// validRecord checks a record against the image before replay applies it:
// a known kind, an aligned offset inside the structure it names.
func (img *Image) validRecord(r journalRecord, fileSize int64) error {
	cs := img.clusterSize
	bad := func(what string) error {
		return fmt.Errorf("record kind %d at %#x: %s", r.kind, r.off, what)
	}
	switch r.kind {
	case recRefblockNew, recL2New:
		if r.off%cs != 0 {
			return bad("not cluster aligned")
		}
	case recRefblock, recL2:
		if r.off%8 != 0 {
			return bad("not word aligned")
		}
	case recRefTable:
		if r.off%8 != 0 {
			return bad("not word aligned")
		}
		return nil // entries of a table since moved are skipped
	case recL1:
		l1 := int64(img.hdr.l1TableOffset)
		if r.off%8 != 0 || r.off < l1 || r.off >= l1+int64(len(img.l1))*8 {
			return bad("outside the L1 table")
		}
		return nil
	case recWritePointer:
		z := img.zones
		if z == nil || r.off%8 != 0 || r.off < int64(z.metaOffset) || r.off >= int64(z.metaOffset+z.metaSize) {
			return bad("outside the write-pointer table")
		}
		i := (r.off - int64(z.metaOffset)) / 8
		wp := int64(bits.ReverseBytes64(r.value) &^ wpFlags)
		if start := i * z.ZoneSize; wp < start || wp > start+z.ZoneSize {
			return bad("write pointer outside its zone")
		}
		return nil
	default:
		return bad("unknown kind")
	}
	if r.off < cs || r.off >= fileSize+journalSlack*cs {
		return bad("table cluster outside the image")
	}
	return nil
}

// replay applies the journal's batches to the metadata in memory, each in
// kind order. img.mu is held.
func (img *Image) replay(batches [][]journalRecord) error {
	cs := img.clusterSize
	for _, recs := range batches {
		slices.SortStableFunc(recs, func(a, b journalRecord) int { return int(a.kind) - int(b.kind) })
		for _, r := range recs {
			if err := img.applyRecord(r, cs); err != nil {
				return fmt.Errorf("%s: replaying record kind %d at %#x: %w", img.journal.name(), r.kind, r.off, err)
			}
		}
	}
	return nil
}

func (img *Image) applyRecord(r journalRecord, cs int64) error {
	switch r.kind {
	case recRefblockNew, recL2New:
		kind := kindL2
		if r.kind == recRefblockNew {
			kind = kindRefblock
		}
		if _, err := img.newTable(r.off, kind); err != nil {
			return err
		}
		img.highWater = max(img.highWater, r.off/cs+1)
	case recRefblock, recL2:
		kind := kindL2
		if r.kind == recRefblock {
			kind = kindRefblock
		}
		t, err := img.table(r.off&^(cs-1), kind)
		if err != nil {
			return err
		}
		binary.BigEndian.PutUint64(t.data[r.off%cs:], r.value)
		t.dirty = true
		img.highWater = max(img.highWater, r.off/cs+1)
	case recRefTable:
		i := (r.off - img.refTableOffset) / 8
		if r.off >= img.refTableOffset && i < int64(len(img.refTable)) {
			img.refTable[i] = r.value
			img.refTableDirty = true
		}
	case recL1:
		img.setL1((r.off-int64(img.hdr.l1TableOffset))/8, r.value)
	case recWritePointer:
		if img.wpDamage != nil {
			return nil // a ForCheck open: the repair rebuilds the table from the data
		}
		i := int((r.off - int64(img.zones.metaOffset)) / 8)
		img.markWritePointer(i, int64(bits.ReverseBytes64(r.value)&^wpFlags))
	}
	return nil
}

// attachJournal opens the journal on s for a read-write image: it replays
// a journal of this boot and image into memory, discards any other, and
// leaves it ready for appends. A replay is made durable, and the journal
// reset, by prepareWrite.
func (img *Image) attachJournal(s Storage, path, bootID string) error {
	boot, err := readBootID(bootID)
	if err != nil {
		return err
	}
	id, err := storageIdentity(img.file)
	if err != nil {
		return err
	}
	j := &journal{s: s, path: path, pending: make(map[uint64]*table)}
	size, err := s.Size()
	if err != nil {
		return fmt.Errorf("%s: %w", j.name(), err)
	}
	raw := make([]byte, size)
	if err := readTable(s, raw, 0, "journal"); err != nil {
		return fmt.Errorf("%s: %w", j.name(), err)
	}
	hdr, err := parseJournalHeader(raw)
	switch {
	case errors.Is(err, errNoJournal):
	case err != nil:
		return fmt.Errorf("%s: %w (remove it to discard it, losing the writes it may hold)", j.name(), err)
	}
	j.hdr = journalHeader{boot: boot, id: id, gen: hdr.gen}
	img.journal = j
	if err != nil || hdr.boot != boot || hdr.id != id {
		// Another boot's journal: its writes died with that boot's page
		// cache, and the file's crash-ordered state is what remains. Or
		// another image's: not ours to replay.
		return j.reset()
	}
	fileSize, err := img.file.Size()
	if err != nil {
		return err
	}
	batches := parseBatches(raw[journalHeaderLen:], hdr.gen, func(r journalRecord) error { return img.validRecord(r, fileSize) })
	if len(batches) == 0 {
		return j.reset()
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.replay(batches); err != nil {
		return err
	}
	img.journalReplayed = len(batches)
	return nil
}

// readBootID parses the boot id: override if set, else the kernel's.
func readBootID(override string) ([16]byte, error) {
	var id [16]byte
	s := override
	if s == "" {
		b, err := os.ReadFile(bootIDPath)
		if err != nil {
			return id, fmt.Errorf("reading the boot id for the journal: %w", err)
		}
		s = string(b)
	}
	raw, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(s), "-", ""))
	if err != nil || len(raw) != len(id) {
		return id, fmt.Errorf("boot id %q is not a UUID: %w", s, ErrInvalidOption)
	}
	copy(id[:], raw)
	return id, nil
}

// storageIdentity is the identity of the file under s; zero for storage
// that is not a file.
func storageIdentity(s Storage) (journalIdentity, error) {
	f, ok := s.(osFile)
	if !ok {
		return journalIdentity{}, nil
	}
	var st unix.Statx_t
	if err := unix.Statx(int(f.f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_INO|unix.STATX_BTIME, &st); err != nil {
		return journalIdentity{}, &os.PathError{Op: "statx", Path: f.f.Name(), Err: err}
	}
	id := journalIdentity{dev: unix.Mkdev(st.Dev_major, st.Dev_minor), ino: st.Ino}
	if st.Mask&unix.STATX_BTIME != 0 {
		id.btime = st.Btime.Sec*1e9 + int64(st.Btime.Nsec)
	}
	return id, nil
}

// openJournalFile opens (creating it and dir) the journal of the image file
// f, named after its device and inode.
func openJournalFile(dir string, f osFile) (osFile, string, error) {
	id, err := storageIdentity(f)
	if err != nil {
		return osFile{}, "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return osFile{}, "", fmt.Errorf("journal directory: %w", err)
	}
	path := filepath.Join(dir, fmt.Sprintf("zq-%x-%x.journal", id.dev, id.ino))
	jf, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return osFile{}, "", fmt.Errorf("journal: %w", err)
	}
	return osFile{jf}, path, nil
}

// closeJournal closes the journal at Close. After a clean flush nothing in
// it is needed: the file is removed (storage given by the caller is
// truncated to nothing, which opens as no journal).
func closeJournal(j *journal, flushed bool) error {
	if j == nil {
		return nil
	}
	var err error
	if flushed {
		if j.path != "" {
			err = os.Remove(j.path)
		} else {
			err = j.s.Truncate(0)
		}
	}
	return errors.Join(err, j.s.Close())
}
