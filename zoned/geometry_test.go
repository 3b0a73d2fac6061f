package zoned

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

// base is a valid geometry: 16 zones of 64 KiB.
var base = Geometry{Size: 1 << 20, ZoneSize: 64 << 10, ZoneCapacity: 64 << 10, MaxAppendBytes: 8 << 10}

func with(f func(*Geometry)) Geometry {
	g := base
	f(&g)
	return g
}

func TestNormalizeRefusesInvalidGeometryNamingTheOption(t *testing.T) {
	tests := []struct {
		name string
		g    Geometry
		key  string
	}{
		{"zero size", with(func(g *Geometry) { g.Size = 0 }), "size"},
		{"size not sector multiple", with(func(g *Geometry) { g.Size = 1<<20 + 100 }), "size"},
		{"zero zone size", with(func(g *Geometry) { g.ZoneSize = 0 }), "zone.size"},
		{"zone size not sector multiple", with(func(g *Geometry) { g.ZoneSize = 64<<10 + 100 }), "zone.size"},
		{"zone size below a sector", with(func(g *Geometry) { g.ZoneSize = 256; g.ZoneCapacity = 256 }), "zone.size"},
		{"zero capacity", with(func(g *Geometry) { g.ZoneCapacity = 0 }), "zone.capacity"},
		{"capacity over zone size", with(func(g *Geometry) { g.ZoneCapacity = 128 << 10 }), "zone.capacity"},
		{"capacity not sector multiple", with(func(g *Geometry) { g.ZoneCapacity = 60<<10 + 1 }), "zone.capacity"},
		{"negative conventional", with(func(g *Geometry) { g.ConventionalZones = -1 }), "zone.conventional_zones"},
		{"all conventional", with(func(g *Geometry) { g.ConventionalZones = 16 }), "zone.conventional_zones"},
		{"more conventional than zones", with(func(g *Geometry) { g.ConventionalZones = 17 }), "zone.conventional_zones"},
		{"negative max open", with(func(g *Geometry) { g.MaxOpenZones = -1 }), "zone.max_open_zones"},
		{"negative max active", with(func(g *Geometry) { g.MaxActiveZones = -2 }), "zone.max_active_zones"},
		// A contradiction at any size (QEMU clamps it, then exits 1).
		{"max open over max active", with(func(g *Geometry) { g.MaxOpenZones = 10; g.MaxActiveZones = 8 }), "zone.max_open_zones"},
		{"zero max append", with(func(g *Geometry) { g.MaxAppendBytes = 0 }), "zone.max_append_bytes"},
		{"max append below a sector", with(func(g *Geometry) { g.MaxAppendBytes = 500 }), "zone.max_append_bytes"},
		{"max append plus a block reaches capacity", with(func(g *Geometry) { g.MaxAppendBytes = 64<<10 - 512 }), "zone.max_append_bytes"},
		{"max append over capacity", with(func(g *Geometry) { g.MaxAppendBytes = 128 << 10 }), "zone.max_append_bytes"},
		{"max append over u32", with(func(g *Geometry) {
			g.ZoneSize, g.ZoneCapacity, g.Size = 1<<33, 1<<33, 1<<34
			g.MaxAppendBytes = 1 << 32
		}), "zone.max_append_bytes"},
		{"too many zones for u32", with(func(g *Geometry) { g.Size = 1 << 42; g.ZoneSize, g.ZoneCapacity = 512, 512 }), "zone.size"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := tc.g.Normalize()
			if !errors.Is(err, ErrInvalidGeometry) {
				t.Fatalf("Normalize(%+v) = %v, want ErrInvalidGeometry", tc.g, err)
			}
			if !strings.Contains(err.Error(), tc.key+" ") {
				t.Errorf("error %q does not name %q", err, tc.key)
			}
		})
	}
}

func TestNormalizeAcceptsAndClamps(t *testing.T) {
	tests := []struct {
		name  string
		g     Geometry
		want  Geometry
		notes []string
	}{
		{"valid unchanged", base, base, nil},
		// QEMU creates both of these (shared/testdata/qemu v5 and v6).
		{"zone size not a power of two", with(func(g *Geometry) { g.ZoneSize, g.ZoneCapacity = 96<<10, 96<<10 }),
			with(func(g *Geometry) { g.ZoneSize, g.ZoneCapacity = 96<<10, 96<<10 }), nil},
		{"max append not a sector multiple is rounded down", with(func(g *Geometry) { g.MaxAppendBytes = 1000 }),
			with(func(g *Geometry) { g.MaxAppendBytes = 512 }),
			[]string{"zone.max_append_bytes 1000 is not a multiple of 512: appends are limited to 512"}},
		{"last zone shorter", with(func(g *Geometry) { g.Size = 1<<20 + 4096 }), with(func(g *Geometry) { g.Size = 1<<20 + 4096 }), nil},
		{"zone larger than device", with(func(g *Geometry) { g.Size = 32 << 10 }), with(func(g *Geometry) { g.Size = 32 << 10 }), nil},
		{"capacity below zone size", with(func(g *Geometry) { g.ZoneCapacity = 48 << 10 }), with(func(g *Geometry) { g.ZoneCapacity = 48 << 10 }), nil},
		{"max append just below capacity minus a block", with(func(g *Geometry) { g.MaxAppendBytes = 64<<10 - 1024 }),
			with(func(g *Geometry) { g.MaxAppendBytes = 64<<10 - 1024 }), nil},
		{"max active over zones", with(func(g *Geometry) { g.MaxActiveZones = 20 }),
			with(func(g *Geometry) { g.MaxActiveZones = 16; g.MaxOpenZones = 16 }),
			[]string{"zone.max_active_zones 20 > 16 zones: clamped to 16"}},
		{"max open over sequential zones", with(func(g *Geometry) { g.ConventionalZones = 2; g.MaxOpenZones = 20 }),
			with(func(g *Geometry) { g.ConventionalZones = 2; g.MaxOpenZones = 14 }),
			[]string{"zone.max_open_zones 20 > 14 sequential zones: clamped to 14"}},
		{"only max active given sets max open silently", with(func(g *Geometry) { g.MaxActiveZones = 6 }),
			with(func(g *Geometry) { g.MaxOpenZones = 6; g.MaxActiveZones = 6 }), nil},
		{"only max active, over sequential zones", with(func(g *Geometry) { g.ConventionalZones = 4; g.MaxActiveZones = 16 }),
			with(func(g *Geometry) { g.ConventionalZones = 4; g.MaxOpenZones = 12; g.MaxActiveZones = 16 }), nil},
		{"only max open given stays", with(func(g *Geometry) { g.MaxOpenZones = 3 }), with(func(g *Geometry) { g.MaxOpenZones = 3 }), nil},
		{"every clamp at once", with(func(g *Geometry) { g.ConventionalZones = 4; g.MaxOpenZones = 20; g.MaxActiveZones = 20 }),
			with(func(g *Geometry) { g.ConventionalZones = 4; g.MaxOpenZones = 12; g.MaxActiveZones = 16 }),
			[]string{"zone.max_active_zones 20 > 16 zones: clamped to 16", "zone.max_open_zones 20 > 12 sequential zones: clamped to 12"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, notes, err := tc.g.Normalize()
			if err != nil {
				t.Fatalf("Normalize: %v", err)
			}
			if got != tc.want {
				t.Errorf("Normalize = %+v, want %+v", got, tc.want)
			}
			if !reflect.DeepEqual(notes, tc.notes) {
				t.Errorf("notes = %q, want %q", notes, tc.notes)
			}
			again, notes2, err := got.Normalize()
			if err != nil || again != got || len(notes2) != 0 {
				t.Errorf("normalizing again = %+v, %q, %v; want it unchanged and silent", again, notes2, err)
			}
		})
	}
}

func TestCheckLinuxNeedsPowerOfTwoZones(t *testing.T) {
	for _, tc := range []struct {
		zoneSize int64
		ok       bool
	}{{512, true}, {64 << 10, true}, {1 << 30, true}, {48 << 20, false}, {96 << 10, false}, {3 * 512, false}} {
		g := with(func(g *Geometry) { g.ZoneSize, g.ZoneCapacity = tc.zoneSize, tc.zoneSize })
		err := g.CheckLinux()
		if (err == nil) != tc.ok {
			t.Errorf("zone size %d: CheckLinux = %v, want ok %v", tc.zoneSize, err, tc.ok)
		}
		if err != nil && (!errors.Is(err, ErrInvalidGeometry) || !strings.Contains(err.Error(), "zone.size ")) {
			t.Errorf("zone size %d: error %q does not wrap ErrInvalidGeometry naming zone.size", tc.zoneSize, err)
		}
	}
}

func TestGeometryZoneArithmetic(t *testing.T) {
	g := Geometry{Size: 5*4096 + 1024, ZoneSize: 4096, ZoneCapacity: 3072, ConventionalZones: 1, MaxAppendBytes: 1024}
	if got := g.NumZones(); got != 6 {
		t.Errorf("NumZones = %d, want 6", got)
	}
	if got := g.SequentialZones(); got != 5 {
		t.Errorf("SequentialZones = %d, want 5", got)
	}
	for _, tc := range []struct {
		off  int64
		want int
	}{{-1, -1}, {0, 0}, {4095, 0}, {4096, 1}, {5 * 4096, 5}, {g.Size - 1, 5}, {g.Size, -1}} {
		if got := g.ZoneIndex(tc.off); got != tc.want {
			t.Errorf("ZoneIndex(%#x) = %d, want %d", tc.off, got, tc.want)
		}
	}
	if (Geometry{}).NumZones() != 0 {
		t.Errorf("zero geometry has zones")
	}
}
