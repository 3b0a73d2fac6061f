package driver

import (
	"errors"
	"math"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
	tib = int64(1) << 40
)

// geom is a geometry with the defaults of docs/qcow2-zoned.md section 4 for what is not
// given: zone.capacity = zone.size, zone.max_append_bytes 64k.
func geom(size, zoneSize int64, fields ...func(*zoned.Geometry)) zoned.Geometry {
	g := zoned.Geometry{Size: size, ZoneSize: zoneSize, ZoneCapacity: zoneSize, MaxAppendBytes: 64 * kib}
	for _, f := range fields {
		f(&g)
	}
	return g
}

func TestParametersAndSize(t *testing.T) {
	const hm = "host-managed"
	z64 := map[string]string{"zone.size": "64M"}
	tests := []struct {
		name            string
		params          map[string]string
		required, limit int64
		// A valid StorageClass: the size, geometry, attach mode and
		// image options it gives.
		size      int64
		geom      zoned.Geometry
		attach    string
		scheduler string
		opts      image.CreateOptions
		// An invalid one: the sentinel and what the message must say
		// (the key and the rule).
		err     error
		errText []string
	}{
		// ---- valid -----------------------------------------------------
		{name: "no parameters: host-managed, 256M zones, ublk", params: nil, required: gib,
			size: gib, geom: geom(gib, 256*mib), attach: AttachUBLK},
		{name: "zone.size 64M", params: z64, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "zone.size 64MiB", params: map[string]string{"zone.size": "64MiB"}, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "zone.size 64Mi", params: map[string]string{"zone.size": "64Mi"}, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "zone.size in hex", params: map[string]string{"zone.size": "0x4000000"}, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "every zone key", params: map[string]string{"zone.mode": hm, "zone.size": "64Mi", "zone.capacity": "48Mi",
			"zone.conventional_zones": "2", "zone.max_open_zones": "6", "zone.max_active_zones": "8", "zone.max_append_bytes": "256Ki"},
			required: gib, size: gib, attach: AttachUBLK,
			geom: zoned.Geometry{Size: gib, ZoneSize: 64 * mib, ZoneCapacity: 48 * mib, ConventionalZones: 2,
				MaxOpenZones: 6, MaxActiveZones: 8, MaxAppendBytes: 256 * kib}},
		{name: "max_open follows max_active", params: map[string]string{"zone.size": "64M", "zone.max_active_zones": "8"},
			required: gib, size: gib, attach: AttachUBLK,
			geom: geom(gib, 64*mib, func(g *zoned.Geometry) { g.MaxOpenZones, g.MaxActiveZones = 8, 8 })},
		{name: "counts in hex", params: map[string]string{"zone.size": "64M", "zone.conventional_zones": "0x2"},
			required: gib, size: gib, attach: AttachUBLK,
			geom: geom(gib, 64*mib, func(g *zoned.Geometry) { g.ConventionalZones = 2 })},
		{name: "attach nbd", params: map[string]string{"attach": "nbd"}, required: gib,
			size: gib, geom: geom(gib, 256*mib), attach: AttachNBD},
		{name: "attach ublk", params: map[string]string{"attach": "ublk", "zone.size": "64M"}, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "queue.scheduler mq-deadline", params: map[string]string{"queue.scheduler": "mq-deadline", "zone.size": "64M"}, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK, scheduler: "mq-deadline"},
		{name: "queue.scheduler none", params: map[string]string{"queue.scheduler": "none", "zone.size": "64M"}, required: gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK, scheduler: "none"},
		{name: "external-provisioner's keys are ignored", params: map[string]string{"csi.storage.k8s.io/pvc/name": "data",
			"csi.storage.k8s.io/pvc/namespace": "default", "csi.storage.k8s.io/pv/name": "pvc-1", "zone.size": "64M"},
			required: gib, size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "image options", params: map[string]string{"cluster_size": "4Ki", "refcount_bits": "64",
			"lazy_refcounts": "on", "preallocation": "metadata", "compat": "1.1"},
			required: gib, size: gib, geom: geom(gib, 256*mib), attach: AttachUBLK,
			opts: image.CreateOptions{ClusterSize: 4096, RefcountBits: 64, LazyRefcounts: true, Preallocation: "metadata"}},

		// ---- size rounding -----------------------------------------------
		{name: "1 byte is one zone", params: z64, required: 1,
			size: 64 * mib, geom: geom(64*mib, 64*mib), attach: AttachUBLK},
		{name: "65M in 64M zones is 128M", params: z64, required: 65 * mib,
			size: 128 * mib, geom: geom(128*mib, 64*mib), attach: AttachUBLK},
		{name: "65M up to a limit of exactly 128M", params: z64, required: 65 * mib, limit: 128 * mib,
			size: 128 * mib, geom: geom(128*mib, 64*mib), attach: AttachUBLK},
		{name: "whole zones stay", params: z64, required: 128 * mib, limit: 128 * mib,
			size: 128 * mib, geom: geom(128*mib, 64*mib), attach: AttachUBLK},
		{name: "required 0: 1 GiB", params: z64,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "required 0: 1 GiB rounded up to a 2G zone", params: map[string]string{"zone.size": "2G"},
			size: 2 * gib, geom: geom(2*gib, 2*gib), attach: AttachUBLK},
		{name: "required 0: the limit rounded down", params: z64, limit: 200 * mib,
			size: 192 * mib, geom: geom(192*mib, 64*mib), attach: AttachUBLK},
		{name: "required 0: a limit above 1 GiB", params: z64, limit: 10 * gib,
			size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},

		// ---- out of range ----------------------------------------------
		{name: "limit below the rounded size", params: z64, required: 65 * mib, limit: 100 * mib,
			err: ErrOutOfRange, errText: []string{"zone.size 67108864", "above the limit 104857600"}},
		{name: "required above the limit", params: z64, required: 2 * gib, limit: gib,
			err: ErrOutOfRange, errText: []string{"required 2147483648 bytes > limit 1073741824"}},
		{name: "required 0, limit below one zone", params: z64, limit: 32 * mib,
			err: ErrOutOfRange, errText: []string{"less than one zone (zone.size 67108864)"}},
		{name: "negative required", params: z64, required: -1,
			err: ErrOutOfRange, errText: []string{"must not be negative"}},
		{name: "negative limit", params: z64, limit: -1,
			err: ErrOutOfRange, errText: []string{"must not be negative"}},
		{name: "too large to round up", params: z64, required: math.MaxInt64,
			err: ErrOutOfRange, errText: []string{"too large to round up", "zone.size"}},

		// ---- bad keys and values -----------------------------------------
		{name: "unknown key", params: map[string]string{"zone.sise": "64M"},
			err: ErrInvalidParameter, errText: []string{`unknown option "zone.sise"`}},
		{name: "size is not a StorageClass parameter", params: map[string]string{"size": "1G"},
			err: ErrInvalidParameter, errText: []string{"size: not a StorageClass parameter"}},
		{name: "backing file", params: map[string]string{"backing_file": "/x"},
			err: ErrInvalidParameter, errText: []string{`option "backing_file" is not supported`}},
		{name: "zone.mode none", params: map[string]string{"zone.mode": "none"},
			err: ErrInvalidParameter, errText: []string{"option zone.mode", `invalid value "none": only host-managed`}},
		{name: "zone.mode host-aware", params: map[string]string{"zone.mode": "host-aware"},
			err: ErrInvalidParameter, errText: []string{"option zone.mode", "only host-managed"}},
		{name: "attach iscsi", params: map[string]string{"attach": "iscsi"},
			err: ErrInvalidParameter, errText: []string{`attach="iscsi": must be ublk or nbd`}},
		{name: "attach empty", params: map[string]string{"attach": ""},
			err: ErrInvalidParameter, errText: []string{`attach="": must be ublk or nbd`}},
		{name: "queue.scheduler bfq", params: map[string]string{"queue.scheduler": "bfq"},
			err: ErrInvalidParameter, errText: []string{`queue.scheduler="bfq": must be one of mq-deadline, none`}},
		{name: "queue.scheduler empty", params: map[string]string{"queue.scheduler": ""},
			err: ErrInvalidParameter, errText: []string{`queue.scheduler="": must be one of`}},
		{name: "cluster_size not a size", params: map[string]string{"cluster_size": "big"},
			err: ErrInvalidParameter, errText: []string{"option cluster_size", `invalid size "big"`}},
		{name: "cluster_size not a power of two", params: map[string]string{"cluster_size": "3000"},
			err: ErrInvalidParameter, errText: []string{"option cluster_size", "must be a power of two from 512 to 2M"}},
		{name: "cluster_size too large", params: map[string]string{"cluster_size": "4M"},
			err: ErrInvalidParameter, errText: []string{"option cluster_size", "must be a power of two from 512 to 2M"}},
		{name: "refcount_bits 3", params: map[string]string{"refcount_bits": "3"},
			err: ErrInvalidParameter, errText: []string{"refcount_bits", "must be 1, 2, 4, 8, 16, 32 or 64"}},
		{name: "preallocation full", params: map[string]string{"preallocation": "full"},
			err: ErrInvalidParameter, errText: []string{"option preallocation", "use off or metadata"}},
		{name: "zone.size not a size", params: map[string]string{"zone.size": "64MB"},
			err: ErrInvalidParameter, errText: []string{"option zone.size", `invalid size "64MB"`}},
		{name: "zone.size decimal mega is not a unit", params: map[string]string{"zone.size": "64e6"},
			err: ErrInvalidParameter, errText: []string{"option zone.size", "invalid size"}},
		{name: "zone.size 0", params: map[string]string{"zone.size": "0"},
			err: ErrInvalidParameter, errText: []string{"zone.size 0: must be a positive multiple of 512"}},
		{name: "zone.size not a power of two", params: map[string]string{"zone.size": "3M"},
			err: ErrInvalidParameter, errText: []string{"zone.size 3145728 is not a power of two"}},
		{name: "zone.capacity not a multiple of 512", params: map[string]string{"zone.capacity": "1000"},
			err: ErrInvalidParameter, errText: []string{"zone.capacity 1000: must be a positive multiple of 512"}},
		{name: "zone.capacity above zone.size", params: map[string]string{"zone.size": "64M", "zone.capacity": "65M"},
			err: ErrInvalidParameter, errText: []string{"zone.capacity 68157440 > zone.size 67108864"}},
		{name: "zone.conventional_zones not a number", params: map[string]string{"zone.conventional_zones": "two"},
			err: ErrInvalidParameter, errText: []string{"option zone.conventional_zones", `invalid number "two"`}},
		{name: "zone.conventional_zones above 32 bits", params: map[string]string{"zone.conventional_zones": "4294967296"},
			err: ErrInvalidParameter, errText: []string{"option zone.conventional_zones", "out of range"}},
		{name: "zone.max_open_zones negative", params: map[string]string{"zone.max_open_zones": "-1"},
			err: ErrInvalidParameter, errText: []string{"option zone.max_open_zones", `invalid number "-1"`}},
		{name: "zone.max_active_zones bad hex", params: map[string]string{"zone.max_active_zones": "0x"},
			err: ErrInvalidParameter, errText: []string{"option zone.max_active_zones", `invalid number "0x"`}},
		{name: "zone.max_append_bytes not a multiple of 512", params: map[string]string{"zone.max_append_bytes": "1000"},
			err: ErrInvalidParameter, errText: []string{"zone.max_append_bytes 1000: must be a multiple of 512"}},
		{name: "zone.max_append_bytes too big for the capacity", params: map[string]string{"zone.size": "64M", "zone.max_append_bytes": "64M"},
			err: ErrInvalidParameter, errText: []string{"zone.max_append_bytes 67108864: must be smaller than zone.capacity 67108864"}},
		{name: "zone.max_append_bytes above 32 bits", params: map[string]string{"zone.size": "8G", "zone.max_append_bytes": "4G"},
			err: ErrInvalidParameter, errText: []string{"zone.max_append_bytes 4294967296: does not fit the 32-bit header field"}},
		{name: "two bad keys: the first in sorted order", params: map[string]string{"zone.size": "x", "cluster_size": "y", "attach": "z"},
			err: ErrInvalidParameter, errText: []string{`attach="z"`}},

		// ---- combinations refused at the volume's size ---------------------
		{name: "conventional zones >= zones", params: map[string]string{"zone.size": "64M", "zone.conventional_zones": "16"},
			required: gib, err: ErrInvalidParameter,
			errText: []string{"a volume of 1073741824 bytes", "zone.conventional_zones 16 >= 16 zones: no sequential zone left"}},
		{name: "conventional zones >= zones of a rounded size", params: map[string]string{"zone.conventional_zones": "1"},
			required: 1, err: ErrInvalidParameter,
			errText: []string{"a volume of 268435456 bytes", "zone.conventional_zones 1 >= 1 zones"}},
		{name: "max_open above max_active", params: map[string]string{"zone.size": "64M", "zone.max_open_zones": "10", "zone.max_active_zones": "4"},
			required: gib, err: ErrInvalidParameter, errText: []string{"zone.max_open_zones 10 > zone.max_active_zones 4"}},
		// Limits above what a small claim's zones can reach mean no limit
		// there: clamped to the zones, so one StorageClass serves every size.
		{name: "max_active above the zones is clamped to them", params: map[string]string{"zone.size": "64M", "zone.max_active_zones": "100"},
			required: gib, size: gib, attach: AttachUBLK,
			geom: geom(gib, 64*mib, func(g *zoned.Geometry) { g.MaxActiveZones, g.MaxOpenZones = 16, 16 })},
		{name: "max_open above the sequential zones is clamped to them", params: map[string]string{"zone.size": "64M", "zone.conventional_zones": "4", "zone.max_open_zones": "13"},
			required: gib, size: gib, attach: AttachUBLK,
			geom: geom(gib, 64*mib, func(g *zoned.Geometry) { g.ConventionalZones, g.MaxOpenZones = 4, 12 })},
		{name: "faults: not the syntax", params: map[string]string{"faults": "readonly:zone=two"},
			err: ErrInvalidParameter, errText: []string{"faults:", `"readonly:zone=two"`, "zone=two"}},
		{name: "faults: a zone the volume has not", params: map[string]string{"zone.size": "64M", "faults": "readonly:zone=16"},
			required: gib, err: ErrInvalidParameter, errText: []string{"faults:", "zone 16: the volume has zones 0 to 15"}},
		{name: "faults: a power cut without the volatile cache", params: map[string]string{"zone.size": "64M", "faults": "powercut:op=write,nth=10"},
			required: gib, err: ErrInvalidParameter, errText: []string{"faults:", "needs cache=volatile"}},
		{name: "cache: neither value", params: map[string]string{"cache": "writeback"},
			err: ErrInvalidParameter, errText: []string{`cache="writeback": must be durable or volatile`}},
		{name: "faults and the volatile cache", params: map[string]string{"zone.size": "64M", "cache": "volatile", "faults": "powercut:op=write,nth=10;readonly:zone=3"},
			required: gib, size: gib, geom: geom(gib, 64*mib), attach: AttachUBLK},
		{name: "zone count above 32 bits", params: map[string]string{"zone.size": "4k", "zone.max_append_bytes": "512"},
			required: 16 * tib, err: ErrInvalidParameter, errText: []string{"zone.size 4096: 4294967296 zones do not fit the 32-bit zone count"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParseParameters(tt.params)
			var size int64
			var g zoned.Geometry
			if err == nil {
				size, g, err = p.Size(tt.required, tt.limit)
			}
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("error %v, want %v", err, tt.err)
				}
				for _, s := range tt.errText {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not say %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if size != tt.size || g != tt.geom {
				t.Errorf("Size(%d, %d) = %d, %+v; want %d, %+v", tt.required, tt.limit, size, g, tt.size, tt.geom)
			}
			if p.Attach != tt.attach {
				t.Errorf("Attach = %q, want %q", p.Attach, tt.attach)
			}
			if p.Scheduler != tt.scheduler {
				t.Errorf("Scheduler = %q, want %q", p.Scheduler, tt.scheduler)
			}
			if got := p.Spec.Options(); !reflect.DeepEqual(got, tt.opts) {
				t.Errorf("Spec.Options() = %+v, want %+v", got, tt.opts)
			}
			if !p.Spec.Given("zone.mode") {
				t.Error("zone.mode not set")
			}
		})
	}
}

// TestParametersErrorIsDeterministic: with several bad keys, the error
// names the same one every time, whatever the map's iteration order.
func TestParametersErrorIsDeterministic(t *testing.T) {
	params := map[string]string{"zone.size": "x", "zone.capacity": "y", "cluster_size": "z", "refcount_bits": "3", "foo": "1"}
	_, first := ParseParameters(params)
	if first == nil || !strings.Contains(first.Error(), "option cluster_size") {
		t.Fatalf("error %v: want it to name cluster_size, the first key in sorted order", first)
	}
	for range 50 {
		if _, err := ParseParameters(params); err == nil || err.Error() != first.Error() {
			t.Fatalf("error %v, then %v", first, err)
		}
	}
}

// TestZeroVolumeParams: VolumeParams not from ParseParameters (no zone.mode)
// is refused, not served as a plain image.
func TestZeroVolumeParams(t *testing.T) {
	_, _, err := VolumeParams{}.Size(gib, 0)
	if !errors.Is(err, ErrInvalidParameter) || !strings.Contains(err.Error(), "zone.mode") {
		t.Fatalf("Size of zero VolumeParams: %v", err)
	}
}

// FuzzParseParameters: any one parameter is accepted or refused with
// ErrInvalidParameter naming its key, and an accepted StorageClass gives
// either a whole number of zones for its default size or a sentinel error.
func FuzzParseParameters(f *testing.F) {
	for _, kv := range [][2]string{{"zone.size", "64Mi"}, {"attach", "nbd"}, {"queue.scheduler", "none"}, {"zone.conventional_zones", "0x10"},
		{"zone.max_active_zones", "100"}, {"cluster_size", "3000"}, {"csi.storage.k8s.io/pvc/name", "x"}, {"size", "1G"}} {
		f.Add(kv[0], kv[1], int64(0), int64(0))
	}
	f.Fuzz(func(t *testing.T, key, value string, required, limit int64) {
		p, err := ParseParameters(map[string]string{key: value})
		if err != nil {
			if !errors.Is(err, ErrInvalidParameter) || !strings.Contains(err.Error(), key) && !strings.Contains(err.Error(), strconv.Quote(key)) {
				t.Fatalf("ParseParameters(%q: %q): %v", key, value, err)
			}
			return
		}
		size, g, err := p.Size(required, limit)
		if err != nil {
			if !errors.Is(err, ErrInvalidParameter) && !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("Size(%d, %d): %v wraps neither sentinel", required, limit, err)
			}
			return
		}
		if size <= 0 || size%g.ZoneSize != 0 || size < required || (limit > 0 && size > limit) || g.Size != size {
			t.Fatalf("Size(%d, %d) = %d, %+v", required, limit, size, g)
		}
	})
}
