package image

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The zoned extension (docs/qcow2-zoned.md): incompatible bit 5, a header
// extension with the zone geometry, and a table of one write pointer per
// zone. This file knows their bytes; what a write pointer allows is package
// zoned's business.

const (
	incompatZoned = 1 << 5
	extZoned      = 0x007a6264
	zonedExtLen   = 56

	// wpFlags are the flag bits of a write-pointer table entry; bit 59 marks
	// a conventional zone.
	wpFlags        = uint64(0x1f) << 59
	wpConventional = uint64(1) << 59

	zoneModelHostManaged = 1
)

// Zones describes a zoned image: the zoned header extension's geometry.
// Limits are stored as given; package zoned validates and clamps them.
type Zones struct {
	ZoneSize          int64  `json:"zone-size"`
	ZoneCapacity      int64  `json:"zone-capacity"`
	ConventionalZones uint32 `json:"conventional-zones"`
	NrZones           uint32 `json:"nr-zones"`
	MaxActiveZones    uint32 `json:"max-active-zones"`
	MaxOpenZones      uint32 `json:"max-open-zones"`
	MaxAppendBytes    uint32 `json:"max-append-bytes"`
}

// zonedExt is the parsed zoned header extension.
type zonedExt struct {
	Zones
	metaSize   uint64
	metaOffset uint64
	// extra holds bytes past the 56 this package knows, kept on rewrite.
	extra []byte
}

func parseZonedExt(data []byte) (*zonedExt, error) {
	be := binary.BigEndian
	if len(data) < zonedExtLen {
		return nil, fmt.Errorf("zoned header extension is %d bytes, want at least %d: %w", len(data), zonedExtLen, ErrCorrupt)
	}
	switch data[0] {
	case zoneModelHostManaged:
	case 0:
		return nil, nil // "not zoned": the rest is ignored
	default:
		return nil, fmt.Errorf("zoned header extension: unknown zone model %d (1 is host-managed): %w", data[0], ErrUnsupported)
	}
	z := &zonedExt{
		Zones: Zones{
			ZoneSize:          int64(be.Uint64(data[4:])),
			ZoneCapacity:      int64(be.Uint64(data[12:])),
			ConventionalZones: be.Uint32(data[20:]),
			NrZones:           be.Uint32(data[24:]),
			MaxActiveZones:    be.Uint32(data[28:]),
			MaxOpenZones:      be.Uint32(data[32:]),
			MaxAppendBytes:    be.Uint32(data[36:]),
		},
		metaSize:   be.Uint64(data[40:]),
		metaOffset: be.Uint64(data[48:]),
	}
	if len(data) > zonedExtLen {
		z.extra = append([]byte(nil), data[zonedExtLen:]...)
	}
	return z, nil
}

func (z *zonedExt) encode() []byte {
	be := binary.BigEndian
	b := make([]byte, zonedExtLen, zonedExtLen+len(z.extra))
	b[0] = zoneModelHostManaged
	be.PutUint64(b[4:], uint64(z.ZoneSize))
	be.PutUint64(b[12:], uint64(z.ZoneCapacity))
	be.PutUint32(b[20:], z.ConventionalZones)
	be.PutUint32(b[24:], z.NrZones)
	be.PutUint32(b[28:], z.MaxActiveZones)
	be.PutUint32(b[32:], z.MaxOpenZones)
	be.PutUint32(b[36:], z.MaxAppendBytes)
	be.PutUint64(b[40:], z.metaSize)
	be.PutUint64(b[48:], z.metaOffset)
	return append(b, z.extra...)
}

// validate checks the extension against the header: the format's own
// consistency, not the zone model's limits.
func (z *zonedExt) validate(h *header, fileSize int64) error {
	if err := z.validateGeometry(h); err != nil {
		return err
	}
	return z.validateTablePlace(h, fileSize)
}

// validateGeometry checks the zones the extension describes.
func (z *zonedExt) validateGeometry(h *header) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("zoned header extension: "+format+": %w", append(args, ErrCorrupt)...)
	}
	if z.ZoneSize <= 0 || z.ZoneSize%512 != 0 {
		return bad("zone_size %d is not a positive multiple of 512", z.ZoneSize)
	}
	if z.ZoneCapacity <= 0 || z.ZoneCapacity > z.ZoneSize || z.ZoneCapacity%512 != 0 {
		return bad("zone_capacity %d must be a multiple of 512 from 512 to zone_size %d", z.ZoneCapacity, z.ZoneSize)
	}
	want := (int64(h.size) + z.ZoneSize - 1) / z.ZoneSize
	if int64(z.NrZones) != want {
		return bad("nr_zones %d, but a %d-byte disk has %d zones of %d bytes", z.NrZones, h.size, want, z.ZoneSize)
	}
	if z.ConventionalZones > z.NrZones {
		return bad("conventional_zones %d exceeds nr_zones %d", z.ConventionalZones, z.NrZones)
	}
	if z.metaSize != 8*uint64(z.NrZones) {
		return bad("zonedmeta_size %d, want 8 * nr_zones = %d", z.metaSize, 8*uint64(z.NrZones))
	}
	return nil
}

// validateTablePlace checks where the write-pointer table lies: the part of
// the extension a repair can make anew, unlike the geometry.
func (z *zonedExt) validateTablePlace(h *header, fileSize int64) error {
	if z.metaOffset == 0 {
		return fmt.Errorf("zoned header extension: zonedmeta_offset is 0: %w", ErrCorrupt)
	}
	return h.checkTable("write-pointer table", z.metaOffset, z.metaSize, uint64(fileSize))
}

// decodeWritePointers reads the write-pointer table in whichever byte order
// makes every entry lie inside its zone (docs/qcow2-zoned.md section 3): QEMU writes the
// host's order, so both occur. It returns the pointers with the flags masked
// off and whether the table was big-endian.
func (z *zonedExt) decodeWritePointers(raw []byte) ([]int64, bool, error) {
	orders := []binary.ByteOrder{binary.LittleEndian, binary.BigEndian}
	var firstBad string
	for _, order := range orders {
		wps := make([]int64, z.NrZones)
		ok := true
		for i := range wps {
			wp := int64(order.Uint64(raw[i*8:]) &^ wpFlags)
			start := int64(i) * z.ZoneSize
			if wp < start || wp > start+z.ZoneSize {
				if firstBad == "" {
					firstBad = fmt.Sprintf("zone %d: entry %#x (read %s) is outside [%#x, %#x]", i, order.Uint64(raw[i*8:]), order, start, start+z.ZoneSize)
				}
				ok = false
				break
			}
			wps[i] = wp
		}
		if ok {
			return wps, order == binary.BigEndian, nil
		}
	}
	return nil, false, fmt.Errorf("write-pointer table at %#x is valid in neither byte order: %s: %w", z.metaOffset, firstBad, ErrCorrupt)
}

// wpEntry is zone i's table entry for write pointer wp, in the order this
// package writes: little-endian, with the conventional bit where it belongs.
func (z *zonedExt) wpEntry(i int, wp int64) uint64 {
	if uint32(i) < z.ConventionalZones {
		return uint64(int64(i)*z.ZoneSize) | wpConventional
	}
	return uint64(wp)
}

// loadZones reads the zoned extension and its table, if the image has one.
// forCheck keeps an unreadable table from failing the open (OpenOptions).
func (img *Image) loadZones(forCheck bool) error {
	h := img.hdr
	var ext *extension
	for i := range h.extensions {
		if h.extensions[i].typ == extZoned {
			ext = &h.extensions[i]
		}
	}
	if h.incompatible&incompatZoned == 0 {
		return nil // an extension without the bit is not in force: kept as unknown
	}
	if ext == nil {
		return fmt.Errorf("zoned format bit set but the zoned header extension is missing: %w", ErrCorrupt)
	}
	z, err := parseZonedExt(ext.data)
	if err != nil {
		return err
	}
	if z == nil {
		return fmt.Errorf("zoned format bit set but the extension says not zoned: %w", ErrCorrupt)
	}
	size, err := img.file.Size()
	if err != nil {
		return err
	}
	wps, bigEndian, err := z.readWritePointers(img.file, h, size)
	if err != nil {
		if !forCheck || !errors.Is(err, errTableDamaged) {
			return err
		}
		img.zones, img.wpDamage, img.wpDirtyLo = z, err, -1
		return nil
	}
	img.zones, img.writePointers = z, wps
	img.wpDirtyLo = -1
	if bigEndian && !img.readOnly {
		// Rewrite the whole table in our order at the next flush: a table
		// mixing both orders would be valid in neither.
		img.wpDirtyLo, img.wpDirtyHi = 0, len(wps)
	}
	return nil
}

// errTableDamaged marks the errors of readWritePointers that a rebuild of
// the write-pointer table cures; the geometry's errors are not among them.
var errTableDamaged = errors.New("write-pointer table unreadable")

// readWritePointers validates the extension against the header and reads
// its table. Errors about the table alone (where it lies, what it holds)
// also wrap errTableDamaged.
func (z *zonedExt) readWritePointers(s Storage, h *header, fileSize int64) ([]int64, bool, error) {
	if err := z.validateGeometry(h); err != nil {
		return nil, false, err
	}
	if err := z.validateTablePlace(h, fileSize); err != nil {
		return nil, false, fmt.Errorf("%w (%w)", err, errTableDamaged)
	}
	raw := make([]byte, z.metaSize)
	if err := readTable(s, raw, int64(z.metaOffset), "write-pointer table"); err != nil {
		return nil, false, fmt.Errorf("%w (%w)", err, errTableDamaged)
	}
	wps, bigEndian, err := z.decodeWritePointers(raw)
	if err != nil {
		return nil, false, fmt.Errorf("%w (%w)", err, errTableDamaged)
	}
	return wps, bigEndian, nil
}

// Zones returns the zone geometry of a zoned image; ok is false for a plain
// image.
func (img *Image) Zones() (z Zones, ok bool) {
	img.mu.Lock() // Grow changes NrZones
	defer img.mu.Unlock()
	if img.zones == nil {
		return Zones{}, false
	}
	return img.zones.Zones, true
}

// WritePointers returns the write pointers as loaded from the table or last
// set, as absolute byte offsets (conventional zones: their start). It fails
// only on an image opened ForCheck whose table could not be read.
func (img *Image) WritePointers() ([]int64, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.wpDamage != nil {
		return nil, img.wpDamage
	}
	return append([]int64(nil), img.writePointers...), nil
}

// SetWritePointer records zone's write pointer. It is an in-memory update
// (and, with a journal, a journal append); Flush makes it durable, after
// the data and metadata written before it.
// The caller sets a pointer only once the data below it has been written.
func (img *Image) SetWritePointer(zone int, wp int64) error {
	if img.zones == nil {
		return fmt.Errorf("set write pointer: not a zoned image: %w", ErrUnsupported)
	}
	if img.readOnly {
		return fmt.Errorf("set write pointer: %w", ErrReadOnly)
	}
	img.mu.Lock() // Grow adds zones
	if img.wpDamage != nil {
		img.mu.Unlock()
		return fmt.Errorf("set write pointer: %w", img.wpDamage)
	}
	if zone < 0 || zone >= len(img.writePointers) {
		n := len(img.writePointers)
		img.mu.Unlock()
		return fmt.Errorf("set write pointer: zone %d of %d: %w", zone, n, ErrOutOfRange)
	}
	start := int64(zone) * img.zones.ZoneSize
	if wp < start || wp > start+img.zones.ZoneSize {
		img.mu.Unlock()
		return fmt.Errorf("zone %d: write pointer %#x outside [%#x, %#x]: %w", zone, wp, start, start+img.zones.ZoneSize, ErrOutOfRange)
	}
	if img.writePointers[zone] == wp {
		img.mu.Unlock()
		return nil
	}
	img.markWritePointer(zone, wp)
	img.mu.Unlock()
	return img.commit()
}

// markWritePointer sets zone's write pointer and marks its entry dirty.
// img.mu is held.
func (img *Image) markWritePointer(zone int, wp int64) {
	img.writePointers[zone] = wp
	img.note(recWritePointer, int64(img.zones.metaOffset)+int64(zone)*8, nil)
	if img.wpDirtyLo < 0 {
		img.wpDirtyLo, img.wpDirtyHi = zone, zone+1
	} else {
		img.wpDirtyLo, img.wpDirtyHi = min(img.wpDirtyLo, zone), max(img.wpDirtyHi, zone+1)
	}
}

// writeWritePointers writes the dirty span of the table and syncs. Flush
// calls it once the data and metadata are durable (docs/qcow2-zoned.md section 6).
func (img *Image) writeWritePointers() error {
	if img.zones == nil || img.wpDirtyLo < 0 {
		return nil
	}
	lo, hi := img.wpDirtyLo, img.wpDirtyHi
	buf := make([]byte, (hi-lo)*8)
	img.zones.putEntries(buf, lo, img.writePointers[lo:hi])
	if _, err := img.file.WriteAt(buf, int64(img.zones.metaOffset)+int64(lo)*8); err != nil {
		return fmt.Errorf("writing the write pointers of zones %d-%d: %w", lo, hi-1, err)
	}
	if err := img.file.Sync(); err != nil {
		return err
	}
	img.wpDirtyLo = -1
	return nil
}

// emptyPointers are the write pointers of zones lo..hi-1 when empty: their
// starts.
func (z *zonedExt) emptyPointers(lo, hi int) []int64 {
	wps := make([]int64, hi-lo)
	for i := range wps {
		wps[i] = int64(lo+i) * z.ZoneSize
	}
	return wps
}

// putEntries encodes the table entries of zones lo, lo+1, ... with write
// pointers wps into buf.
func (z *zonedExt) putEntries(buf []byte, lo int, wps []int64) {
	for i, wp := range wps {
		binary.LittleEndian.PutUint64(buf[i*8:], z.wpEntry(lo+i, wp))
	}
}

// checkZones counts the write-pointer table's clusters as referenced and
// reports what is wrong with its entries.
func (img *Image) checkZones(ref func(off, length int64, what string) bool, corrupt *report) {
	z := img.zones
	if z == nil {
		return
	}
	if img.hdr.checkTable("write-pointer table", z.metaOffset, z.metaSize, uint64(img.highWater*img.clusterSize)) == nil {
		ref(int64(z.metaOffset), int64(z.metaSize), "write-pointer table")
	}
	for _, p := range img.writePointerProblems() {
		corrupt.add("%s", p)
	}
}

// writePointerProblems lists what is wrong with the write-pointer table on
// disk: unreadable, or entries outside their zones, or a conventional flag
// where the zone is not conventional (or none where it is).
func (img *Image) writePointerProblems() []string {
	z := img.zones
	raw, err := img.readWritePointerTable()
	if err != nil {
		return []string{err.Error()}
	}
	_, bigEndian, err := z.decodeWritePointers(raw)
	if err != nil {
		return []string{err.Error()}
	}
	var order binary.ByteOrder = binary.LittleEndian
	if bigEndian {
		order = binary.BigEndian
	}
	var problems []string
	for i := range int(z.NrZones) {
		e := order.Uint64(raw[i*8:])
		conventional := uint32(i) < z.ConventionalZones
		if (e&wpConventional != 0) != conventional {
			problems = append(problems, fmt.Sprintf("write-pointer table: zone %d entry %#x: conventional bit %v, but the zone is %s",
				i, e, e&wpConventional != 0, map[bool]string{true: "conventional", false: "sequential"}[conventional]))
		}
	}
	return problems
}

// readWritePointerTable reads the table's bytes from where the extension
// says it lies.
func (img *Image) readWritePointerTable() ([]byte, error) {
	z := img.zones
	size, err := img.file.Size()
	if err != nil {
		return nil, err
	}
	if err := z.validateTablePlace(img.hdr, max(size, img.highWater*img.clusterSize)); err != nil {
		return nil, err
	}
	raw := make([]byte, z.metaSize)
	if err := readTable(img.file, raw, int64(z.metaOffset), "write-pointer table"); err != nil {
		return nil, err
	}
	return raw, nil
}
