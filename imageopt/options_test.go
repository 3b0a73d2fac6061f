package imageopt

import (
	"math"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want int64
	}{
		{"plain bytes", "4096", 4096},
		{"zero", "0", 0},
		{"leading zeros are decimal not octal", "012", 12},
		{"hexadecimal", "0x1000", 4096},
		{"hexadecimal upper case", "0X1F", 31},
		{"b suffix means bytes", "512b", 512},
		{"B suffix means bytes", "512B", 512},
		{"k is 1024", "4k", 4096},
		{"K is 1024", "4K", 4096},
		{"M is a power of 1024", "64M", 64 << 20},
		{"m is case-insensitive", "64m", 64 << 20},
		{"G", "1G", 1 << 30},
		{"T", "2T", 2 << 40},
		{"P", "1P", 1 << 50},
		{"E", "1E", 1 << 60},
		{"IEC KiB", "4KiB", 4096},
		{"IEC MiB", "64MiB", 64 << 20},
		{"IEC GiB", "1GiB", 1 << 30},
		{"Kubernetes Ki", "4Ki", 4096},
		{"Kubernetes Mi", "64Mi", 64 << 20},
		{"Kubernetes Gi", "1Gi", 1 << 30},
		{"fraction with a unit", "1.5k", 1536},
		{"fraction is truncated to whole bytes", "1.0001k", 1024},
		{"fraction with IEC unit", "1.5GiB", 3 << 29},
		{"trailing dot with a unit", "1.k", 1024},
		{"largest int64", "9223372036854775807", math.MaxInt64},
		{"largest hex", "0x7fffffffffffffff", math.MaxInt64},
		{"7E fits", "7E", 7 << 60},
		{"long fraction stays exact", "1.99999999999999999999999999k", 2047},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if err != nil {
				t.Fatalf("ParseSize(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseSize(%q) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseSizeRefuses(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		errText string
	}{
		{"empty", "", "non-numeric"},
		{"letters", "x", "non-numeric"},
		{"negative", "-1", "non-numeric"},
		{"plus sign", "+1", "non-numeric"},
		{"fraction without a unit", "1.5", "non-numeric"},
		{"fraction with bytes unit", "1.5b", "non-numeric"},
		{"leading dot", ".5k", "non-numeric"},
		{"exponent notation", "1e3", "non-numeric"},
		{"decimal kB is not a unit", "1kb", "non-numeric"},
		{"lower-case IEC i only after a unit", "1i", "non-numeric"},
		{"hex with a unit", "0x1k", "non-numeric"},
		{"hex without digits", "0x", "non-numeric"},
		{"binary literal", "0b11", "non-numeric"},
		{"blank inside", "1 k", "non-numeric"},
		{"leading blank", " 12", "non-numeric"},
		{"unit twice", "1kk", "non-numeric"},
		{"one past int64", "9223372036854775808", "too large"},
		{"8E overflows", "8E", "too large"},
		{"huge decimal", strings.Repeat("9", 40), "too large"},
		{"huge hex", "0x" + strings.Repeat("f", 17), "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if err == nil {
				t.Fatalf("ParseSize(%q) = %d, want an error", tt.in, got)
			}
			if !strings.Contains(err.Error(), tt.errText) || !strings.Contains(err.Error(), strconv.Quote(tt.in)) {
				t.Fatalf("ParseSize(%q) error %q: want it to quote the input and say %q", tt.in, err, tt.errText)
			}
		})
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "4096", "0x1000", "4k", "1.5M", "64MiB", "64Mi", "1E", "8E",
		"9223372036854775807", "1.k", ".5k", "0x", "", "1.0001k", "1kb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseSize(s)
		if err != nil {
			return
		}
		if v < 0 {
			t.Fatalf("ParseSize(%q) = %d, negative", s, v)
		}
		// The decimal form of any accepted value parses to itself.
		if w, err := ParseSize(strconv.FormatInt(v, 10)); err != nil || w != v {
			t.Fatalf("ParseSize(%d) = %d, %v", v, w, err)
		}
		// A plain decimal number means exactly its value.
		if n, err := strconv.ParseInt(s, 10, 64); err == nil && s[0] != '+' && s[0] != '-' && n != v {
			t.Fatalf("ParseSize(%q) = %d, want %d", s, v, n)
		}
		// A unit multiplies: "<s>k" is 1024 times "<s>" when both are whole.
		if !strings.ContainsAny(s, ".xXkKmMgGtTpPeEbBiI") && v <= math.MaxInt64>>10 {
			if w, err := ParseSize(s + "k"); err != nil || w != v<<10 {
				t.Fatalf("ParseSize(%q) = %d, %v; want %d", s+"k", w, err, v<<10)
			}
		}
	})
}

func TestParseBool(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"on", true}, {"off", false}, {"yes", true}, {"no", false},
		{"true", true}, {"false", false}, {"y", true}, {"n", false}, {"ON", true},
	}
	for _, tt := range tests {
		if got, err := parseBool(tt.in); err != nil || got != tt.want {
			t.Errorf("parseBool(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
	for _, in := range []string{"maybe", "", "1", "0"} {
		if _, err := parseBool(in); err == nil {
			t.Errorf("parseBool(%q): want an error", in)
		}
	}
}

func TestParseCount(t *testing.T) {
	good := []struct {
		in   string
		want int
	}{
		{"0", 0}, {"12", 12}, {"012", 12}, {"0x10", 16}, {"0X1f", 31}, {"4294967295", math.MaxUint32},
	}
	for _, tt := range good {
		if got, err := parseCount(tt.in); err != nil || got != tt.want {
			t.Errorf("parseCount(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	bad := []struct{ in, errText string }{
		{"", "invalid number"}, {"-1", "invalid number"}, {"+1", "invalid number"}, {"1_0", "invalid number"},
		{"0x", "invalid number"}, {"0x_1", "invalid number"}, {"1.5", "invalid number"}, {"two", "invalid number"},
		{"1k", "invalid number"}, {"4294967296", "out of range"}, {"0x100000000", "out of range"},
	}
	for _, tt := range bad {
		if got, err := parseCount(tt.in); err == nil || !strings.Contains(err.Error(), tt.errText) {
			t.Errorf("parseCount(%q) = %d, %v; want an error saying %q", tt.in, got, err, tt.errText)
		}
	}
}

// set applies key=value pairs to a new spec, failing the test on error.
func set(t *testing.T, kvs ...string) *CreateSpec {
	t.Helper()
	s := &CreateSpec{}
	for _, kv := range kvs {
		k, v, _ := strings.Cut(kv, "=")
		if err := s.Set(k, v); err != nil {
			t.Fatalf("Set(%q, %q): %v", k, v, err)
		}
	}
	return s
}

func TestCreateSpecSet(t *testing.T) {
	tests := []struct {
		name string
		kvs  []string
		want image.CreateOptions
	}{
		{"nothing: qemu-img's defaults, left zero", nil, image.CreateOptions{}},
		{"cluster size with a unit", []string{"cluster_size=4k"}, image.CreateOptions{ClusterSize: 4096}},
		{"smallest cluster size", []string{"cluster_size=512"}, image.CreateOptions{ClusterSize: 512}},
		{"largest cluster size", []string{"cluster_size=2M"}, image.CreateOptions{ClusterSize: 2 << 20}},
		{"a later value wins", []string{"cluster_size=4k", "cluster_size=64KiB"}, image.CreateOptions{ClusterSize: 64 << 10}},
		{"refcount bits", []string{"refcount_bits=1"}, image.CreateOptions{RefcountBits: 1}},
		{"refcount bits 64", []string{"refcount_bits=64"}, image.CreateOptions{RefcountBits: 64}},
		{"preallocation metadata", []string{"preallocation=metadata"}, image.CreateOptions{Preallocation: "metadata"}},
		{"lazy refcounts", []string{"lazy_refcounts=on"}, image.CreateOptions{LazyRefcounts: true}},
		{"lazy refcounts off again", []string{"lazy_refcounts=on", "lazy_refcounts=off"}, image.CreateOptions{}},
		{"size", []string{"size=1.5G"}, image.CreateOptions{Size: 3 << 29}},
		{"accepted fixed values", []string{"extended_l2=off", "compression_type=zlib", "compat=1.1", "compat=v3"}, image.CreateOptions{}},
		{"zone keys leave the image options alone", []string{"zone.mode=host-managed", "zone.size=64M"}, image.CreateOptions{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := set(t, tt.kvs...)
			if got := s.Options(); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Options() = %+v, want %+v", got, tt.want)
			}
			for _, kv := range tt.kvs {
				if k, _, _ := strings.Cut(kv, "="); !s.Given(k) {
					t.Errorf("Given(%q) = false after setting it", k)
				}
			}
		})
	}
}

func TestCreateSpecSetRefuses(t *testing.T) {
	tests := []struct {
		key, value string
		errText    string // besides the key, which every message names
	}{
		{"foo", "1", `unknown option "foo"`},
		{"Cluster_size", "4k", "unknown option"},
		{"backing_file", "x", "backing files are not supported"},
		{"data_file", "x", "external data files are not supported"},
		{"encrypt.format", "luks", "encryption is not supported"},
		{"cluster_size", "x", `invalid size "x"`},
		{"cluster_size", "4M", "must be a power of two from 512 to 2M"},
		{"cluster_size", "3000", "must be a power of two from 512 to 2M"},
		{"cluster_size", "256", "must be a power of two from 512 to 2M"},
		{"cluster_size", "0", "must be a power of two from 512 to 2M"},
		{"refcount_bits", "abc", `invalid refcount_bits "abc"`},
		{"refcount_bits", "3", "must be 1, 2, 4, 8, 16, 32 or 64"},
		{"refcount_bits", "0", "must be 1, 2, 4, 8, 16, 32 or 64"},
		{"refcount_bits", "128", "must be 1, 2, 4, 8, 16, 32 or 64"},
		{"preallocation", "full", "not supported (use off or metadata)"},
		{"preallocation", "sometimes", "invalid preallocation"},
		{"lazy_refcounts", "maybe", "invalid boolean"},
		{"extended_l2", "on", "not supported"},
		{"extended_l2", "maybe", "invalid boolean"},
		{"compression_type", "zstd", "only zlib"},
		{"compat", "0.10", "only 1.1"},
		{"size", "-1", "invalid size"},
		{"zone.mode", "none", `invalid value "none": only host-managed`},
		{"zone.mode", "Host-Managed", "only host-managed"},
		{"zone.mode", "", "only host-managed"},
		{"zone.size", "64MB", `invalid size "64MB"`},
		{"zone.capacity", "1.5", "invalid size"},
		{"zone.conventional_zones", "-1", `invalid number "-1"`},
		{"zone.conventional_zones", "4294967296", "out of range"},
		{"zone.max_open_zones", "1.5", "invalid number"},
		{"zone.max_active_zones", "0x", "invalid number"},
		{"zone.max_append_bytes", "8E", "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			s := set(t, "cluster_size=4k", "zone.size=1M", "zone.conventional_zones=3", "lazy_refcounts=on")
			before := *s
			err := s.Set(tt.key, tt.value)
			if err == nil || !strings.Contains(err.Error(), tt.key) || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("Set(%q, %q) = %v: want an error naming the key and saying %q", tt.key, tt.value, err, tt.errText)
			}
			if *s != before {
				t.Fatalf("a refused Set changed the spec: %+v, was %+v", *s, before)
			}
		})
	}
}

func TestCreateSpecGeometry(t *testing.T) {
	tests := []struct {
		name string
		kvs  []string
		want *zoned.Geometry
	}{
		{"plain", []string{"cluster_size=4k", "size=1G"}, nil},
		{"defaults of docs/qcow2-zoned.md section 4", []string{"zone.mode=host-managed", "size=1G"},
			&zoned.Geometry{Size: 1 << 30, ZoneSize: 256 << 20, ZoneCapacity: 256 << 20, MaxAppendBytes: 64 << 10}},
		{"size rounded up to a sector", []string{"zone.mode=host-managed", "size=1000"},
			&zoned.Geometry{Size: 1024, ZoneSize: 256 << 20, ZoneCapacity: 256 << 20, MaxAppendBytes: 64 << 10}},
		{"capacity follows the zone size", []string{"zone.mode=host-managed", "zone.size=64Mi", "size=1G"},
			&zoned.Geometry{Size: 1 << 30, ZoneSize: 64 << 20, ZoneCapacity: 64 << 20, MaxAppendBytes: 64 << 10}},
		{"every key, mode last", []string{"size=1G", "zone.size=64MiB", "zone.capacity=48M", "zone.conventional_zones=2",
			"zone.max_open_zones=0x6", "zone.max_active_zones=8", "zone.max_append_bytes=256k", "zone.mode=host-managed"},
			&zoned.Geometry{Size: 1 << 30, ZoneSize: 64 << 20, ZoneCapacity: 48 << 20, ConventionalZones: 2,
				MaxOpenZones: 6, MaxActiveZones: 8, MaxAppendBytes: 256 << 10}},
		{"not validated: Normalize's job", []string{"zone.mode=host-managed", "zone.size=3M", "zone.capacity=4M"},
			&zoned.Geometry{ZoneSize: 3 << 20, ZoneCapacity: 4 << 20, MaxAppendBytes: 64 << 10}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := set(t, tt.kvs...).Geometry()
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Geometry() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestCreateSpecGeometryNeedsZoneMode(t *testing.T) {
	for _, key := range []string{"zone.size", "zone.capacity", "zone.conventional_zones", "zone.max_open_zones",
		"zone.max_active_zones", "zone.max_append_bytes"} {
		g, err := set(t, key+"=0x200").Geometry()
		if err == nil || err.Error() != "option "+key+" needs zone.mode=host-managed" {
			t.Errorf("%s without zone.mode: Geometry() = %+v, %v", key, g, err)
		}
	}
}

func TestCreateSpecFormatting(t *testing.T) {
	tests := []struct {
		name string
		kvs  []string
		want string
	}{
		{"defaults", []string{"size=1G"},
			"cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"},
		{"preallocation and compat only when given", []string{"compat=1.1", "preallocation=off", "size=0"},
			"cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=0 lazy_refcounts=off refcount_bits=16 compat=1.1"},
		{"values as the image gets them", []string{"cluster_size=4k", "refcount_bits=1", "lazy_refcounts=on", "size=1M"},
			"cluster_size=4096 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=on refcount_bits=1"},
		// The next two are QEMU's own lines, from shared/testdata/qemu's
		// v2 and v4 .cmds.out: the zone keys given, with the values given
		// (a clamp shows elsewhere), in QEMU's order and place.
		{"every zone key, in QEMU's order", []string{"size=64M", "zone.mode=host-managed", "zone.size=4M", "zone.capacity=3M",
			"zone.conventional_zones=2", "zone.max_open_zones=3", "zone.max_active_zones=4", "zone.max_append_bytes=128k"},
			"cluster_size=65536 extended_l2=off compression_type=zlib zone.mode=host-managed zone.size=4194304 zone.capacity=3145728 " +
				"zone.conventional_zones=2 zone.max_append_bytes=131072 zone.max_active_zones=4 zone.max_open_zones=3 " +
				"size=67108864 lazy_refcounts=off refcount_bits=16"},
		{"only the zone keys given", []string{"size=1G", "zone.mode=host-managed", "zone.size=64M", "zone.max_open_zones=6"},
			"cluster_size=65536 extended_l2=off compression_type=zlib zone.mode=host-managed zone.size=67108864 zone.max_open_zones=6 " +
				"size=1073741824 lazy_refcounts=off refcount_bits=16"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := strings.Join(set(t, tt.kvs...).Formatting(), " "); got != tt.want {
				t.Fatalf("Formatting:\n%s\nwant\n%s", got, tt.want)
			}
		})
	}
}

func TestCreateOptionHelp(t *testing.T) {
	var keys []string
	for _, o := range CreateOptionHelp() {
		if o.Help == "" {
			t.Errorf("%s has no help", o.Key)
		}
		keys = append(keys, o.Key)
	}
	// The Formatting line's order (QEMU's), which -o help follows.
	want := []string{"cluster_size", "extended_l2", "preallocation", "compression_type", "zone.mode", "zone.size",
		"zone.capacity", "zone.conventional_zones", "zone.max_append_bytes", "zone.max_active_zones",
		"zone.max_open_zones", "size", "lazy_refcounts", "refcount_bits", "compat"}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("keys %q, want %q", keys, want)
	}
}

// FuzzCreateSpecSet: Set never panics, a refused value changes nothing
// and names the key, an accepted one is Given.
func FuzzCreateSpecSet(f *testing.F) {
	for _, kv := range [][2]string{{"cluster_size", "4k"}, {"zone.size", "64Mi"}, {"zone.conventional_zones", "0x2"},
		{"refcount_bits", "3"}, {"zone.mode", "none"}, {"foo", ""}, {"lazy_refcounts", "y"}, {"\x1a", "0"}} {
		f.Add(kv[0], kv[1])
	}
	f.Fuzz(func(t *testing.T, key, value string) {
		s := CreateSpec{}
		err := s.Set(key, value)
		if err != nil {
			if s != (CreateSpec{}) || !strings.Contains(err.Error(), key) && !strings.Contains(err.Error(), strconv.Quote(key)) {
				t.Fatalf("Set(%q, %q) = %v, spec %+v", key, value, err, s)
			}
			return
		}
		if !s.Given(key) {
			t.Fatalf("Set(%q, %q) accepted, not Given", key, value)
		}
	})
}
