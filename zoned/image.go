package zoned

import (
	"errors"

	"github.com/zq-csi/zq-csi/image"
)

// ErrNotZoned: the image has no zoned extension.
var ErrNotZoned = errors.New("image is not zoned")

// imageStore is a zoned image as a Store: the image holds the data, the
// write-pointer table and their ordering; resets free the zone's clusters.
type imageStore struct{ *image.Image }

func (s imageStore) WriteZeroes(off, length int64) error {
	return s.Image.WriteZeroes(off, length, true)
}

// ImageGeometry is the Geometry an image's zoned extension describes.
func ImageGeometry(size int64, z image.Zones) Geometry {
	return Geometry{
		Size:              size,
		ZoneSize:          z.ZoneSize,
		ZoneCapacity:      z.ZoneCapacity,
		ConventionalZones: int(z.ConventionalZones),
		MaxOpenZones:      int(z.MaxOpenZones),
		MaxActiveZones:    int(z.MaxActiveZones),
		MaxAppendBytes:    int64(z.MaxAppendBytes),
	}
}

// OpenImage returns the zoned device of an open zoned image: zones and
// limits from its extension, write pointers from its table.
func OpenImage(img *image.Image) (*Device, error) {
	z, ok := img.Zones()
	if !ok {
		return nil, ErrNotZoned
	}
	wps, err := img.WritePointers()
	if err != nil {
		return nil, err
	}
	return New(imageStore{img}, ImageGeometry(img.Size(), z), wps)
}

// CreateImage creates a zoned image at path with geometry g (its Size is
// opts.Size). g is validated and clamped first, as qemu-img does; the notes
// say what was clamped, and errors name the option at fault.
func CreateImage(path string, opts image.CreateOptions, g Geometry) ([]string, error) {
	g.Size = (opts.Size + SectorSize - 1) / SectorSize * SectorSize
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
