package driver

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"

	"github.com/zq-csi/zq-csi/attach"
	"github.com/zq-csi/zq-csi/faultctl"
	"github.com/zq-csi/zq-csi/imageopt"
	"github.com/zq-csi/zq-csi/zoned"
)

// Attach frontends, as the "attach" parameter names them.
const (
	AttachUBLK = string(attach.UBLK)
	AttachNBD  = string(attach.NBD)
)

// Parameter keys of a StorageClass besides the image options.
const (
	// ParamAttach chooses the attach frontend: AttachUBLK or AttachNBD.
	ParamAttach = "attach"
	// ParamScheduler is the I/O scheduler the node sets on the volume's
	// block device when it stages it (queue/scheduler in sysfs, which a
	// pod cannot write): one of Schedulers; unset, the kernel's choice.
	// ZenFS refuses a device whose scheduler is not mq-deadline.
	ParamScheduler = "queue.scheduler"
	// ParamFsType is the filesystem of a volumeMode Filesystem volume
	// (one of Filesystems), as Kubernetes' in-tree drivers spelled it;
	// csi.storage.k8s.io/fstype, which external-provisioner hands over in
	// the volume capability, is the current spelling. Either way,
	// DefaultFsType when unset.
	ParamFsType = "fsType"
	// ParamFaults are faults in force from the moment the volume is staged
	// (faultctl's syntax, joined with ";"): for a class of test volumes
	// that start broken.
	ParamFaults = "faults"
	// ParamCache is the volume's write cache: CacheDurable (the default:
	// a completed write is in the image file) or CacheVolatile (writes can
	// be lost until flushed, as on a drive with its cache on, so that a
	// power cut, injected, drops them).
	ParamCache = "cache"
	// paramIgnoredPrefix starts the keys external-provisioner adds
	// (csi.storage.k8s.io/pvc/name, ...): not ours, ignored.
	paramIgnoredPrefix = "csi.storage.k8s.io/"
	// paramSize is an image option that a StorageClass may not set: the
	// size comes from each claim's capacity request.
	paramSize = "size"
)

// Values of ParamCache.
const (
	CacheDurable  = "durable"
	CacheVolatile = "volatile"
)

// Schedulers are the values ParamScheduler takes: the schedulers that keep
// a zoned device's writes in order (mq-deadline serialises them per zone)
// or do not reorder them (none).
var Schedulers = []string{"mq-deadline", "none"}

// DefaultVolumeSize is the size of a volume whose capacity range asks for
// none (required 0), before rounding up to whole zones.
const DefaultVolumeSize = 1 << 30

// Errors of ParseParameters and VolumeParams.Size, for the controller to map
// to gRPC codes: ErrInvalidParameter to InvalidArgument, ErrOutOfRange to
// OutOfRange. The messages name the parameter key and the rule.
var (
	ErrInvalidParameter = errors.New("invalid StorageClass parameter")
	ErrOutOfRange       = errors.New("capacity range cannot be met")
)

// VolumeParams is what a StorageClass's parameters ask for.
type VolumeParams struct {
	Spec      imageopt.CreateSpec // image options and zone.* keys, as `zq-csi image create -o` takes them
	Attach    string              // AttachUBLK (default) or AttachNBD
	Scheduler string              // one of Schedulers, or "" for the kernel's choice
	FsType    string              // ParamFsType: one of Filesystems, or "" (DefaultFsType)
	Faults    []faultctl.Spec     // ParamFaults, checked against the geometry by Size
	Volatile  bool                // ParamCache is CacheVolatile
}

// ParseParameters parses CreateVolume parameters. Keys are qemu-img's option
// names, as `zq-csi image create -o` takes them (imageopt.CreateOptionHelp
// lists them), plus "attach", "queue.scheduler", "fsType", "faults" and
// "cache"; "size" is refused (it comes from the capacity
// range). zone.mode
// defaults to host-managed (this driver provides zoned volumes; any other
// value is refused). Keys beginning with "csi.storage.k8s.io/" (added by
// external-provisioner) are ignored. Unknown keys, bad values and refused
// options are errors wrapping ErrInvalidParameter and naming the key; the
// keys are parsed in sorted order, so the error is the same every time.
// The zone geometry is checked as far as it does not depend on the volume
// size (zone.size, zone.capacity, zone.max_append_bytes, max_open against
// max_active); Size checks the rest.
func ParseParameters(params map[string]string) (VolumeParams, error) {
	p := VolumeParams{Attach: AttachUBLK}
	for _, k := range slices.Sorted(maps.Keys(params)) {
		v := params[k]
		switch {
		case strings.HasPrefix(k, paramIgnoredPrefix):
		case k == ParamAttach:
			if v != AttachUBLK && v != AttachNBD {
				return VolumeParams{}, fmt.Errorf("%w: %s=%q: must be %s or %s", ErrInvalidParameter, k, v, AttachUBLK, AttachNBD)
			}
			p.Attach = v
		case strings.EqualFold(k, ParamFsType):
			// Any case, as external-provisioner matches it.
			if !knownFilesystem(v) {
				return VolumeParams{}, checkFilesystem(k, v, zoned.Geometry{})
			}
			p.FsType = v
		case k == ParamScheduler:
			if !slices.Contains(Schedulers, v) {
				return VolumeParams{}, fmt.Errorf("%w: %s=%q: must be one of %s (or unset: the kernel's choice)",
					ErrInvalidParameter, k, v, strings.Join(Schedulers, ", "))
			}
			p.Scheduler = v
		case k == ParamFaults:
			specs, err := faultctl.ParseList(v)
			if err != nil {
				return VolumeParams{}, fmt.Errorf("%w: %s: %w", ErrInvalidParameter, k, err)
			}
			p.Faults = specs
		case k == ParamCache:
			if v != CacheDurable && v != CacheVolatile {
				return VolumeParams{}, fmt.Errorf("%w: %s=%q: must be %s or %s", ErrInvalidParameter, k, v, CacheDurable, CacheVolatile)
			}
			p.Volatile = v == CacheVolatile
		case k == paramSize:
			return VolumeParams{}, fmt.Errorf("%w: %s: not a StorageClass parameter: the size comes from the claim's capacity request",
				ErrInvalidParameter, k)
		default:
			if err := p.Spec.Set(k, v); err != nil {
				return VolumeParams{}, fmt.Errorf("%w: %w", ErrInvalidParameter, err)
			}
		}
	}
	if !p.Spec.Given("zone.mode") {
		if err := p.Spec.Set("zone.mode", imageopt.ZoneModeHostManaged); err != nil {
			return VolumeParams{}, fmt.Errorf("%w: %w", ErrInvalidParameter, err)
		}
	}
	if _, err := p.zones(); err != nil {
		return VolumeParams{}, err
	}
	return p, nil
}

// zones is the geometry the parameters ask for, without a size, with its
// size-independent rules checked: zone.size a power of two of at least 512
// bytes (Linux's rule), zone.capacity and zone.max_append_bytes (a multiple
// of 512) fitting it.
func (p VolumeParams) zones() (zoned.Geometry, error) {
	g, err := p.Spec.Geometry()
	if err != nil {
		return zoned.Geometry{}, fmt.Errorf("%w: %w", ErrInvalidParameter, err)
	}
	if g == nil {
		return zoned.Geometry{}, fmt.Errorf("%w: zone.mode: must be %s", ErrInvalidParameter, imageopt.ZoneModeHostManaged)
	}
	// One sector of one zone, no conventional zone, no limits: Normalize
	// checks exactly the rules that hold for any volume size.
	probe := zoned.Geometry{Size: zoned.SectorSize, ZoneSize: g.ZoneSize, ZoneCapacity: g.ZoneCapacity,
		MaxOpenZones: g.MaxOpenZones, MaxActiveZones: g.MaxActiveZones, MaxAppendBytes: g.MaxAppendBytes}
	if _, _, err := probe.Normalize(); err != nil {
		return zoned.Geometry{}, fmt.Errorf("%w: %w", ErrInvalidParameter, err)
	}
	// The volume is attached to the node's kernel, and the driver makes
	// the image itself: no geometry only an image handed over by a QEMU
	// user has (docs/qcow2-zoned.md section 8).
	if err := probe.CheckLinux(); err != nil {
		return zoned.Geometry{}, fmt.Errorf("%w: %w", ErrInvalidParameter, err)
	}
	if g.MaxAppendBytes%zoned.SectorSize != 0 {
		return zoned.Geometry{}, fmt.Errorf("%w: zone.max_append_bytes %d: must be a multiple of %d",
			ErrInvalidParameter, g.MaxAppendBytes, zoned.SectorSize)
	}
	return *g, nil
}

// Size returns the image size for a CreateVolume (or ControllerExpandVolume)
// capacity range, and the zone geometry the image gets at that size:
//
//   - required > 0: required rounded up to whole zones;
//   - required 0: DefaultVolumeSize (1 GiB) rounded up to whole zones, or,
//     when that is above limit, limit rounded down to whole zones;
//   - at most limit (0 = no limit).
//
// The geometry is validated for that size with zoned.Geometry.Normalize:
// zone.conventional_zones must leave a sequential zone (ErrInvalidParameter).
// Open and active limits above what the volume's zones can reach are
// clamped to them, as Linux reads them: one StorageClass serves claims of
// any size, and a limit of 8 active zones means nothing more on a volume of
// 4. (A max_open_zones above max_active_zones is a contradiction whatever
// the size, refused by ParseParameters.) A negative range, required above
// limit, or a range that holds no whole number of zones wraps
// ErrOutOfRange. The faults must apply to a volume of that geometry (and a
// power cut needs the volatile cache). The image is created with
// Spec.Options() (its Size set to size) and the returned geometry.
func (p VolumeParams) Size(required, limit int64) (size int64, g zoned.Geometry, err error) {
	g, err = p.zones()
	if err != nil {
		return 0, zoned.Geometry{}, err
	}
	z := g.ZoneSize
	switch {
	case required < 0 || limit < 0:
		return 0, zoned.Geometry{}, fmt.Errorf("%w: required %d bytes, limit %d bytes: must not be negative", ErrOutOfRange, required, limit)
	case limit > 0 && required > limit:
		return 0, zoned.Geometry{}, fmt.Errorf("%w: required %d bytes > limit %d bytes", ErrOutOfRange, required, limit)
	case required > math.MaxInt64-(z-1):
		return 0, zoned.Geometry{}, fmt.Errorf("%w: required %d bytes: too large to round up to whole zones of zone.size %d",
			ErrOutOfRange, required, z)
	case required > 0:
		size = (required + z - 1) / z * z
		if limit > 0 && size > limit {
			return 0, zoned.Geometry{}, fmt.Errorf("%w: required %d bytes is %d in whole zones of zone.size %d, above the limit %d bytes",
				ErrOutOfRange, required, size, z, limit)
		}
	default:
		size = (DefaultVolumeSize + z - 1) / z * z
		if limit > 0 && size > limit {
			size = limit / z * z
		}
		if size == 0 {
			return 0, zoned.Geometry{}, fmt.Errorf("%w: limit %d bytes is less than one zone (zone.size %d)", ErrOutOfRange, limit, z)
		}
	}
	g.Size = size
	norm, _, err := g.Normalize()
	if err != nil {
		return 0, zoned.Geometry{}, fmt.Errorf("%w: a volume of %d bytes: %w", ErrInvalidParameter, size, err)
	}
	for _, f := range p.Faults {
		if _, err := f.Resolve(norm); err != nil {
			return 0, zoned.Geometry{}, fmt.Errorf("%w: %s: a volume of %d bytes: %w", ErrInvalidParameter, ParamFaults, size, err)
		}
		if f.Kind == faultctl.KindPowerCut && !p.Volatile {
			return 0, zoned.Geometry{}, fmt.Errorf("%w: %s: %q needs %s=%s", ErrInvalidParameter, ParamFaults, f, ParamCache, CacheVolatile)
		}
	}
	return size, norm, nil
}
