package zoned

import (
	"fmt"
	"math"
)

// SectorSize is the logical block size: every sequential write, append and
// write pointer is a multiple of it, because reports are in 512-byte sectors
// (qemu-io, blkzone, ublk) and a write pointer between sectors could not be
// reported.
const SectorSize = 512

// Defaults of the qemu-img creation options (docs/qcow2-zoned.md section 4), for callers that
// build a Geometry from options. Normalize does not fill them in: a zero there
// is an error, so a corrupt header cannot pass as "use the default".
const (
	DefaultZoneSize       = 256 << 20
	DefaultMaxAppendBytes = 64 << 10
)

// Geometry is a zoned device's shape and limits (docs/qcow2-zoned.md sections 2 and 4).
type Geometry struct {
	Size              int64 // device size in bytes (multiple of 512)
	ZoneSize          int64 // bytes, multiple of 512 (Linux needs a power of two: CheckLinux)
	ZoneCapacity      int64 // bytes, <= ZoneSize, multiple of 512
	ConventionalZones int
	MaxOpenZones      int   // 0 = unlimited
	MaxActiveZones    int   // 0 = unlimited
	MaxAppendBytes    int64 // multiple of 512 once normalized
}

// NumZones is ceil(Size/ZoneSize): the last zone may be shorter than the
// others.
func (g Geometry) NumZones() int {
	if g.ZoneSize <= 0 || g.Size <= 0 {
		return 0
	}
	return int((g.Size + g.ZoneSize - 1) / g.ZoneSize)
}

// SequentialZones is the number of sequential-write-required zones.
func (g Geometry) SequentialZones() int { return g.NumZones() - g.ConventionalZones }

// ZoneIndex is the zone holding byte off, or -1 when off is outside the
// device.
func (g Geometry) ZoneIndex(off int64) int {
	if off < 0 || off >= g.Size || g.ZoneSize <= 0 {
		return -1
	}
	return int(off / g.ZoneSize)
}

// zoneLength is zone i's length: ZoneSize except for a shorter last zone.
func (g Geometry) zoneLength(i int) int64 {
	start := int64(i) * g.ZoneSize
	return min(g.ZoneSize, g.Size-start)
}

// zoneCapacity is zone i's capacity: a short last zone cannot hold more than
// its length, so its capacity is the smaller of the two (as QEMU reports it).
func (g Geometry) zoneCapacity(i int) int64 {
	if i < g.ConventionalZones {
		return g.zoneLength(i)
	}
	return min(g.ZoneCapacity, g.zoneLength(i))
}

// Normalize validates g as qemu-img does on create and open (docs/qcow2-zoned.md
// section 4) and applies the clamps, returning one human-readable note per clamp. Errors
// wrap ErrInvalidGeometry and name the option key, so a user can tell which
// -o value or StorageClass parameter to fix.
//
// A max_open_zones of 0 (unlimited) with a max_active_zones limit becomes
// max_active_zones without a note: that is the documented default ("if only
// max_active is given, max_open = max_active"), and open zones are active
// zones, so the device behaves the same either way; the kernel just gets told.
func (g Geometry) Normalize() (Geometry, []string, error) {
	bad := func(format string, args ...any) (Geometry, []string, error) {
		return Geometry{}, nil, fmt.Errorf("%w: %s", ErrInvalidGeometry, fmt.Sprintf(format, args...))
	}
	switch {
	case g.Size <= 0 || g.Size%SectorSize != 0:
		return bad("size %d: must be a positive multiple of %d", g.Size, SectorSize)
	case g.ZoneSize <= 0 || g.ZoneSize%SectorSize != 0:
		return bad("zone.size %d: must be a positive multiple of %d", g.ZoneSize, SectorSize)
	case g.ZoneCapacity <= 0 || g.ZoneCapacity%SectorSize != 0:
		return bad("zone.capacity %d: must be a positive multiple of %d", g.ZoneCapacity, SectorSize)
	case g.ZoneCapacity > g.ZoneSize:
		return bad("zone.capacity %d > zone.size %d", g.ZoneCapacity, g.ZoneSize)
	}
	nz := g.NumZones()
	if int64(nz) > math.MaxUint32 {
		// nr_zones is a u32 in the header extension.
		return bad("zone.size %d: %d zones do not fit the 32-bit zone count", g.ZoneSize, nz)
	}
	switch {
	case g.ConventionalZones < 0:
		return bad("zone.conventional_zones %d: must not be negative", g.ConventionalZones)
	case g.ConventionalZones >= nz:
		return bad("zone.conventional_zones %d >= %d zones: no sequential zone left", g.ConventionalZones, nz)
	case g.MaxOpenZones < 0:
		return bad("zone.max_open_zones %d: must not be negative", g.MaxOpenZones)
	case g.MaxActiveZones < 0:
		return bad("zone.max_active_zones %d: must not be negative", g.MaxActiveZones)
	case g.MaxActiveZones > 0 && g.MaxOpenZones > g.MaxActiveZones:
		// A contradiction whatever the size, refused where QEMU fails
		// (it clamps, then exits 1): limits above what the zones can reach
		// depend on the size and are clamped below.
		return bad("zone.max_open_zones %d > zone.max_active_zones %d: open zones are active zones",
			g.MaxOpenZones, g.MaxActiveZones)
	case g.MaxAppendBytes < SectorSize:
		return bad("zone.max_append_bytes %d: must be at least %d", g.MaxAppendBytes, SectorSize)
	case g.MaxAppendBytes > math.MaxUint32:
		return bad("zone.max_append_bytes %d: does not fit the 32-bit header field", g.MaxAppendBytes)
	case g.MaxAppendBytes+SectorSize >= g.ZoneCapacity:
		return bad("zone.max_append_bytes %d: must be smaller than zone.capacity %d by more than %d",
			g.MaxAppendBytes, g.ZoneCapacity, SectorSize)
	}

	var notes []string
	if r := g.MaxAppendBytes % SectorSize; r != 0 {
		// QEMU accepts any value; an append is whole sectors, so the
		// largest one is the largest multiple of a sector.
		notes = append(notes, fmt.Sprintf("zone.max_append_bytes %d is not a multiple of %d: appends are limited to %d",
			g.MaxAppendBytes, SectorSize, g.MaxAppendBytes-r))
		g.MaxAppendBytes -= r
	}
	if g.MaxActiveZones > nz {
		notes = append(notes, fmt.Sprintf("zone.max_active_zones %d > %d zones: clamped to %d", g.MaxActiveZones, nz, nz))
		g.MaxActiveZones = nz
	}
	seq := g.SequentialZones()
	if g.MaxOpenZones == 0 && g.MaxActiveZones > 0 {
		g.MaxOpenZones = min(g.MaxActiveZones, seq)
	}
	if g.MaxOpenZones > seq {
		notes = append(notes, fmt.Sprintf("zone.max_open_zones %d > %d sequential zones: clamped to %d", g.MaxOpenZones, seq, seq))
		g.MaxOpenZones = seq
	}
	return g, notes, nil
}

// CheckLinux reports whether Linux can hold g as a zoned block device:
// its zoned block layer needs a power-of-two number of sectors per zone.
// QEMU creates other sizes, and everything but a kernel attach (io,
// export, check, info) works on them; the error names the key, so an
// attach or a CreateVolume can say what to change.
func (g Geometry) CheckLinux() error {
	if g.ZoneSize&(g.ZoneSize-1) != 0 {
		return fmt.Errorf("%w: zone.size %d is not a power of two, which Linux's zoned block devices need",
			ErrInvalidGeometry, g.ZoneSize)
	}
	return nil
}
