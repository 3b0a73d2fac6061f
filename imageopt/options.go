// Package imageopt is the options of a new image, as `zq-csi image create
// -o key=value` and the CSI driver's StorageClass parameters both take
// them: qemu-img's qcow2 option names and values (docs/qcow2-zoned.md
// section 4 for the zone.* keys), with sizes in qemu's syntax plus the IEC
// and Kubernetes binary forms, and qemu-img's "Formatting" line. The rules
// of the values are the lower layers' (image.CreateOptions,
// zoned.Geometry.Normalize); this package parses and shows them.
package imageopt

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

// ZoneModeHostManaged is the one value of the zone.mode option: QEMU's
// zoned qcow2 images are host-managed.
const ZoneModeHostManaged = "host-managed"

// errNumSyntax and errNumRange are wrapped by ParseSize's errors; the
// texts are qemu-io's.
var (
	errNumSyntax = errors.New("non-numeric argument, or extraneous/unrecognized suffix")
	errNumRange  = errors.New("argument too large")
)

// sizeSuffixes maps a unit suffix (case-insensitive) to its power of 1024.
// qemu's single letters (B, K, M, G, T, P, E) are powers of 1024, and so
// are the IEC forms (KiB, MiB, ...) and the Kubernetes quantities (Ki, Mi,
// ...). Kubernetes' decimal suffixes (k = 1000, M = 10^6) are deliberately
// not supported: "M" always means MiB, as in qemu-img.
var sizeSuffixes = func() map[string]uint {
	m := map[string]uint{"": 0, "b": 0}
	for i, l := range []string{"k", "m", "g", "t", "p", "e"} {
		shift := uint(10 * (i + 1))
		m[l] = shift
		m[l+"i"] = shift
		m[l+"ib"] = shift
	}
	return m
}()

// ParseSize parses a byte count the way qemu-img and qemu-io do
// (qemu_strtosz with bytes as the default unit) and accepts the IEC and
// Kubernetes binary forms as well:
//
//	4096  0x1000  4k  4K  1.5M  2G  1T  1P  1E  64MiB  64Mi  512b
//
// A fraction needs a unit other than bytes and is truncated to whole
// bytes ("1.5k" is 1536). Hexadecimal takes no fraction and no unit. The
// result is at most math.MaxInt64. Errors quote s.
func ParseSize(s string) (int64, error) {
	v, err := parseSize(s)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: %w", s, err)
	}
	return v, nil
}

func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, errNumSyntax
	}
	if digits, ok := hexDigits(s); ok {
		if digits == "" || !isHex(digits) {
			return 0, errNumSyntax
		}
		v, err := strconv.ParseUint(digits, 16, 63)
		if err != nil {
			return 0, errNumRange
		}
		return int64(v), nil
	}
	i := 0
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	if i == 0 {
		return 0, errNumSyntax
	}
	intPart := s[:i]
	fracPart := ""
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && isDigit(s[j]) {
			j++
		}
		fracPart = s[i+1 : j]
		if fracPart == "" {
			fracPart = "0" // "1.k" is 1k, as in qemu
		}
		i = j
	}
	shift, ok := sizeSuffixes[strings.ToLower(s[i:])]
	if !ok {
		return 0, errNumSyntax
	}
	if fracPart != "" && shift == 0 {
		return 0, errNumSyntax
	}
	// Exact arithmetic: (int + frac/10^n) * 2^shift, truncated.
	v, _ := new(big.Int).SetString(intPart, 10)
	v.Lsh(v, shift)
	if fracPart != "" {
		f, _ := new(big.Int).SetString(fracPart, 10)
		f.Lsh(f, shift)
		f.Quo(f, new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(fracPart))), nil))
		v.Add(v, f)
	}
	if !v.IsInt64() {
		return 0, errNumRange
	}
	return v.Int64(), nil
}

// hexDigits returns what follows a "0x" or "0X" prefix, and whether s has
// one. The digits may be empty.
func hexDigits(s string) (string, bool) {
	if len(s) >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
		return s[2:], true
	}
	return "", false
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i] | 0x20; !isDigit(s[i]) && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// parseCount parses a zone count: a decimal or 0x hexadecimal number that
// fits the header's 32-bit field.
func parseCount(v string) (int, error) {
	digits, hex := hexDigits(v)
	base := 16
	if !hex {
		base, digits = 10, v
	}
	if digits == "" || strings.ContainsAny(digits[:1], "+-_") {
		return 0, fmt.Errorf("invalid number %q", v)
	}
	n, err := strconv.ParseUint(digits, base, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid number %q", v)
	}
	if n > math.MaxUint32 {
		return 0, fmt.Errorf("%s is out of range (at most %d)", v, uint32(math.MaxUint32))
	}
	return int(n), nil
}

// parseBool parses a qemu boolean option value.
func parseBool(s string) (bool, error) {
	switch strings.ToLower(s) {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("invalid boolean %q (use on or off)", s)
}

func isPowerOfTwo(n int64) bool { return n > 0 && n&(n-1) == 0 }

// CreateSpec is a new image's options, set key by key with qemu-img's
// option names and values. The zero value is a plain image of size 0 with
// qemu-img's defaults; it is a value type (copies are independent).
type CreateSpec struct {
	opts image.CreateOptions
	// zoneGeom holds the zone.* values as given; Geometry applies the
	// defaults.
	zoneGeom zoned.Geometry
	// given has bit i set when createOptions[i] was set.
	given uint64
}

// createOption is one key of CreateSpec.Set. The table below is the only
// place that knows the keys: to add one, add an entry with its parser and
// how it shows in the "Formatting" line.
type createOption struct {
	key  string
	help string
	// set parses the value into the spec; on error it changes nothing.
	set func(s *CreateSpec, v string) error
	// show returns the value printed in the "Formatting" line, in table
	// order; ok false leaves the key out. given says whether the key was
	// set.
	show func(s *CreateSpec, given bool) (v string, ok bool)
}

// createOptions is in the order qemu-img prints the "Formatting" line.
var createOptions = []createOption{
	{
		key:  "cluster_size",
		help: "qcow2 cluster size, a power of two from 512 to 2M (default 64k)",
		set: func(s *CreateSpec, v string) error {
			n, err := ParseSize(v)
			if err != nil {
				return err
			}
			if err := image.CheckClusterSize(n); err != nil {
				return err
			}
			s.opts.ClusterSize = int(n)
			return nil
		},
		show: func(s *CreateSpec, _ bool) (string, bool) {
			return fmt.Sprint(orDefault(s.opts.ClusterSize, image.DefaultClusterSize)), true
		},
	},
	{
		key:  "extended_l2",
		help: "extended L2 entries (subclusters): only off is supported for new images",
		set: func(s *CreateSpec, v string) error {
			on, err := parseBool(v)
			if err != nil {
				return err
			}
			if on {
				return fmt.Errorf("extended_l2=on is not supported for new images")
			}
			return nil
		},
		show: fixed("off", false),
	},
	{
		key:  "preallocation",
		help: "off or metadata (allocate the L2 tables and mark every cluster zero)",
		set: func(s *CreateSpec, v string) error {
			switch v {
			case image.PreallocOff, image.PreallocMetadata:
				s.opts.Preallocation = v
				return nil
			case "falloc", "full":
				return fmt.Errorf("preallocation=%s is not supported (use off or metadata)", v)
			}
			return fmt.Errorf("invalid preallocation %q (use off or metadata)", v)
		},
		show: func(s *CreateSpec, given bool) (string, bool) {
			return s.opts.Preallocation, given
		},
	},
	{
		key:  "compression_type",
		help: "compression type of compressed clusters: only zlib",
		set:  only("compression_type", "zlib"),
		show: fixed("zlib", false),
	},
	// The zoned keys (docs/qcow2-zoned.md section 4), in QEMU's order.
	// They only record what was given; Geometry applies the defaults,
	// zoned.Geometry.Normalize checks the combination. The Formatting line
	// shows the keys given, with the values given, as QEMU's does: a clamp
	// is a note of its own.
	{
		key:  "zone.mode",
		help: "host-managed: make a zoned image (required for any other zone.* key)",
		set: func(s *CreateSpec, v string) error {
			if v != ZoneModeHostManaged {
				return fmt.Errorf("invalid value %q: only %s is supported", v, ZoneModeHostManaged)
			}
			return nil
		},
		show: fixed(ZoneModeHostManaged, true),
	},
	zoneOption("zone.size", "bytes per zone, a multiple of 512; a power of two to attach to Linux (default 256M)", ParseSize,
		func(g *zoned.Geometry) *int64 { return &g.ZoneSize }),
	zoneOption("zone.capacity", "writable bytes per zone, at most zone.size (default zone.size)", ParseSize,
		func(g *zoned.Geometry) *int64 { return &g.ZoneCapacity }),
	zoneOption("zone.conventional_zones", "number of conventional (randomly writable) zones at the start (default 0)", parseCount,
		func(g *zoned.Geometry) *int { return &g.ConventionalZones }),
	zoneOption("zone.max_append_bytes", "largest zone append, below zone.capacity - 512, rounded down to a multiple of 512 (default 64k)", ParseSize,
		func(g *zoned.Geometry) *int64 { return &g.MaxAppendBytes }),
	zoneOption("zone.max_active_zones", "limit on open + closed zones, 0 for none (default 0)", parseCount,
		func(g *zoned.Geometry) *int { return &g.MaxActiveZones }),
	zoneOption("zone.max_open_zones", "limit on open zones, 0 for none (default: zone.max_active_zones)", parseCount,
		func(g *zoned.Geometry) *int { return &g.MaxOpenZones }),
	{
		key:  "size",
		help: "virtual disk size (the SIZE operand takes precedence)",
		set: func(s *CreateSpec, v string) error {
			n, err := ParseSize(v)
			if err != nil {
				return err
			}
			s.opts.Size = n
			return nil
		},
		show: func(s *CreateSpec, _ bool) (string, bool) { return fmt.Sprint(s.opts.Size), true },
	},
	{
		key:  "lazy_refcounts",
		help: "on or off: defer refcount updates (the image is marked dirty while open)",
		set: func(s *CreateSpec, v string) error {
			on, err := parseBool(v)
			if err != nil {
				return err
			}
			s.opts.LazyRefcounts = on
			return nil
		},
		show: func(s *CreateSpec, _ bool) (string, bool) {
			if s.opts.LazyRefcounts {
				return "on", true
			}
			return "off", true
		},
	},
	{
		key:  "refcount_bits",
		help: "width of a refcount: 1, 2, 4, 8, 16, 32 or 64 (default 16)",
		set: func(s *CreateSpec, v string) error {
			n, err := ParseSize(v)
			if err != nil {
				return fmt.Errorf("invalid refcount_bits %q: %w", v, err)
			}
			if err := image.CheckRefcountBits(n); err != nil {
				return err
			}
			s.opts.RefcountBits = int(n)
			return nil
		},
		show: func(s *CreateSpec, _ bool) (string, bool) {
			return fmt.Sprint(orDefault(s.opts.RefcountBits, image.DefaultRefcountBits)), true
		},
	},
	{
		key:  "compat",
		help: "qcow2 version: 1.1 (v3) only",
		set: func(s *CreateSpec, v string) error {
			if v != "1.1" && v != "v3" {
				return fmt.Errorf("compat=%s is not supported (only 1.1)", v)
			}
			return nil
		},
		show: fixed("1.1", true),
	},
}

// only is the parser of a key that takes one value, which it ignores.
func only(key, value string) func(*CreateSpec, string) error {
	return func(_ *CreateSpec, v string) error {
		if v != value {
			return fmt.Errorf("%s=%s is not supported (only %s)", key, v, value)
		}
		return nil
	}
}

// fixed shows a key whose value is always v: always, or with ifGiven only
// when the key was given (as qemu-img shows compat).
func fixed(v string, ifGiven bool) func(*CreateSpec, bool) (string, bool) {
	return func(_ *CreateSpec, given bool) (string, bool) {
		return v, given || !ifGiven
	}
}

// zoneOption is a zone.* key holding one field of the geometry: set
// records the value given, which the Formatting line shows if given.
func zoneOption[T int | int64](key, help string, parse func(string) (T, error), field func(*zoned.Geometry) *T) createOption {
	return createOption{
		key:  key,
		help: help,
		set: func(s *CreateSpec, v string) error {
			n, err := parse(v)
			if err != nil {
				return err
			}
			*field(&s.zoneGeom) = n
			return nil
		},
		show: func(s *CreateSpec, given bool) (string, bool) {
			return fmt.Sprint(*field(&s.zoneGeom)), given
		},
	}
}

// unsupportedOptions are qemu-img qcow2 options that are known but
// refused, with a clearer message than "unknown option".
var unsupportedOptions = map[string]string{
	"backing_file":   "backing files are not supported",
	"backing_fmt":    "backing files are not supported",
	"data_file":      "external data files are not supported",
	"data_file_raw":  "external data files are not supported",
	"encrypt":        "encryption is not supported",
	"encryption":     "encryption is not supported",
	"encrypt.format": "encryption is not supported",
}

func orDefault(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// optionIndex is key's index in createOptions, or -1.
func optionIndex(key string) int {
	for i := range createOptions {
		if createOptions[i].key == key {
			return i
		}
	}
	return -1
}

// OptionHelp is one key that CreateSpec.Set takes, with a line of help.
type OptionHelp struct {
	Key  string
	Help string
}

// CreateOptionHelp lists the keys CreateSpec.Set takes, in the order of
// qemu-img create's "Formatting" line.
func CreateOptionHelp() []OptionHelp {
	out := make([]OptionHelp, len(createOptions))
	for i, o := range createOptions {
		out[i] = OptionHelp{Key: o.key, Help: o.help}
	}
	return out
}

// Set parses value as the option key (qemu-img's name: cluster_size,
// zone.size, ...). A later value of a key overrides an earlier one, as in
// qemu-img. The error names the key and the rule broken; a refused value
// changes nothing. Combinations (zone.capacity > zone.size, ...) are not
// checked here: see Geometry.
func (s *CreateSpec) Set(key, value string) error {
	i := optionIndex(key)
	if i < 0 {
		if why, ok := unsupportedOptions[key]; ok {
			return fmt.Errorf("option %q is not supported: %s", key, why)
		}
		return fmt.Errorf("unknown option %q", key)
	}
	if err := createOptions[i].set(s, value); err != nil {
		return fmt.Errorf("option %s: %w", key, err)
	}
	s.given |= 1 << i
	return nil
}

// SetSize sets the virtual size in bytes, as the SIZE operand of qemu-img
// create does; it does not count as giving the size key.
func (s *CreateSpec) SetSize(n int64) { s.opts.Size = n }

// Given reports whether key was set by Set.
func (s *CreateSpec) Given(key string) bool {
	i := optionIndex(key)
	return i >= 0 && s.given&(1<<i) != 0
}

// Options returns the image options (Zones left nil: volume.CreateZoned
// fills them in from a geometry).
func (s *CreateSpec) Options() image.CreateOptions { return s.opts }

// Geometry returns the zoned geometry the options ask for, or nil for a
// plain image (no zone.mode). The defaults of docs/qcow2-zoned.md section 4 are filled in
// (zone.size 256M, zone.capacity = zone.size, zone.max_append_bytes 64k;
// Normalize derives max_open from max_active), and Size is the image size
// rounded up to whole 512-byte sectors, as volume.CreateZoned rounds it.
// The geometry is not validated: zoned.Geometry.Normalize does that and
// names the key at fault. The error names a zone.* key given without
// zone.mode=host-managed.
func (s *CreateSpec) Geometry() (*zoned.Geometry, error) {
	if !s.Given("zone.mode") {
		for i, o := range createOptions {
			if strings.HasPrefix(o.key, "zone.") && s.given&(1<<i) != 0 {
				return nil, fmt.Errorf("option %s needs zone.mode=%s", o.key, ZoneModeHostManaged)
			}
		}
		return nil, nil
	}
	g := s.zoneGeom
	g.Size = (s.opts.Size + zoned.SectorSize - 1) / zoned.SectorSize * zoned.SectorSize
	if !s.Given("zone.size") {
		g.ZoneSize = zoned.DefaultZoneSize
	}
	if !s.Given("zone.capacity") {
		g.ZoneCapacity = g.ZoneSize
	}
	if !s.Given("zone.max_append_bytes") {
		g.MaxAppendBytes = zoned.DefaultMaxAppendBytes
	}
	return &g, nil
}

// Formatting returns the options as qemu-img create's "Formatting" line
// lists them after "fmt=qcow2": "key=value" in qemu-img's order, some only
// when given.
func (s *CreateSpec) Formatting() []string {
	var out []string
	for i, o := range createOptions {
		if v, ok := o.show(s, s.given&(1<<i) != 0); ok {
			out = append(out, o.key+"="+v)
		}
	}
	return out
}
