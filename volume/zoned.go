package volume

import (
	"errors"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

// ErrNotZoned: the image has no zoned extension.
var ErrNotZoned = errors.New("image is not zoned")

// imageStore is a zoned image as a zoned.Store: the image holds the data, the
// write-pointer table and their ordering; resets free the zone's clusters.
type imageStore struct{ *image.Image }

func (s imageStore) WriteZeroes(off, length int64) error {
	return s.Image.WriteZeroes(off, length, true)
}

// ImageGeometry is the Geometry an image's zoned extension describes.
func ImageGeometry(size int64, z image.Zones) zoned.Geometry {
	return zoned.Geometry{
		Size:              size,
		ZoneSize:          z.ZoneSize,
		ZoneCapacity:      z.ZoneCapacity,
		ConventionalZones: int(z.ConventionalZones),
		MaxOpenZones:      int(z.MaxOpenZones),
		MaxActiveZones:    int(z.MaxActiveZones),
		MaxAppendBytes:    int64(z.MaxAppendBytes),
	}
}

// OpenZones returns the zone device of an open zoned image: zones and
// limits from its extension, write pointers from its table.
func OpenZones(img *image.Image) (*zoned.Device, error) {
	z, ok := img.Zones()
	if !ok {
		return nil, ErrNotZoned
	}
	wps, err := img.WritePointers()
	if err != nil {
		return nil, err
	}
	return zoned.New(imageStore{img}, ImageGeometry(img.Size(), z), wps)
}

// CreateZoned creates a zoned image at path with geometry g (its Size is
// opts.Size). g is validated and clamped first, as qemu-img does; the notes
// say what was clamped, and errors name the option at fault.
func CreateZoned(path string, opts image.CreateOptions, g zoned.Geometry) ([]string, error) {
	g.Size = (opts.Size + zoned.SectorSize - 1) / zoned.SectorSize * zoned.SectorSize
	g, notes, err := g.Normalize()
	if err != nil {
		return nil, err
	}
	opts.Zones = &image.Zones{
		ZoneSize:          g.ZoneSize,
		ZoneCapacity:      g.ZoneCapacity,
		ConventionalZones: uint32(g.ConventionalZones),
		MaxActiveZones:    uint32(g.MaxActiveZones),
		MaxOpenZones:      uint32(g.MaxOpenZones),
		MaxAppendBytes:    uint32(g.MaxAppendBytes),
	}
	return notes, image.Create(path, opts)
}
