package driver

import (
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"slices"
	"strings"

	"github.com/zq-csi/zq-csi/zoned"
)

// The zoned filesystems a volumeMode Filesystem volume may hold, and the
// rules a geometry must meet for each. The minimums were measured with
// Debian 12's mkfs.btrfs 6.2 and mkfs.f2fs 1.15 on zoned null_blk devices
// in the VM harness (README.md, "Filesystem volumes"); the VM tests
// TestKernelFilesystemVolumes and TestKernelF2FSConventionalZonesRule
// hold them to mkfs.
const (
	FsBtrfs = "btrfs"
	FsF2FS  = "f2fs"
	// FsXFS is refused: zoned XFS needs Linux 6.15 and xfsprogs 6.15,
	// and this driver's nodes (Debian 12, Linux 6.12) have neither.
	FsXFS = "xfs"
	// DefaultFsType is what a Filesystem volume gets when neither its
	// capability nor its StorageClass names one: btrfs formats any zoned
	// geometry of a few zones, where f2fs needs conventional zones.
	DefaultFsType = FsBtrfs
)

// Filesystems are the fsType values a volume may take.
var Filesystems = []string{FsBtrfs, FsF2FS}

// mkfsOptions are the options each filesystem's mkfs gets before the
// device. btrfs: one copy of data and metadata (a zoned device has no
// second copy to place them on); f2fs: -m, zoned mode.
var mkfsOptions = map[string][]string{
	FsBtrfs: {"-m", "single", "-d", "single"},
	FsF2FS:  {"-m"},
}

const (
	// btrfsMinZoneSize and btrfsMinZones: mkfs.btrfs refuses zones under
	// 4 MiB, and with 16 MiB zones finds no room for its data block
	// group on fewer than 6 zones (two superblock-log zones, then
	// system, metadata and data each in zones of their own).
	btrfsMinZoneSize = 4 << 20
	btrfsMinZones    = 6
	// btrfsMinSize: mkfs.btrfs's minimum device size (47185920 bytes,
	// its own message), which binds on zones of less than 8 MiB.
	btrfsMinSize = 45 << 20
)

// checkFilesystem reports whether a volume of geometry g can hold fstype;
// key is the parameter the fsType came from, for the message. The errors
// wrap ErrInvalidParameter.
func checkFilesystem(key, fstype string, g zoned.Geometry) error {
	switch fstype {
	case FsBtrfs:
		switch {
		case g.ZoneSize < btrfsMinZoneSize:
			return fmt.Errorf("%w: %s=%s: btrfs needs zone.size of at least %d MiB, not %d bytes",
				ErrInvalidParameter, key, fstype, btrfsMinZoneSize>>20, g.ZoneSize)
		case g.NumZones() < btrfsMinZones || g.Size < btrfsMinSize:
			return fmt.Errorf("%w: %s=%s: btrfs needs at least %d zones and %d MiB; the volume has %d zones of %d MiB",
				ErrInvalidParameter, key, fstype, btrfsMinZones, btrfsMinSize>>20, g.NumZones(), g.ZoneSize>>20)
		}
		return nil
	case FsF2FS:
		if need := f2fsConventionalZones(g); g.ConventionalZones < need {
			return fmt.Errorf("%w: zone.conventional_zones=%d: %s=%s keeps its metadata in conventional zones and needs %d of them on %d zones of %d MiB",
				ErrInvalidParameter, g.ConventionalZones, key, fstype, need, g.NumZones(), g.ZoneSize>>20)
		}
		return nil
	case FsXFS:
		return fmt.Errorf("%w: %s=%s: zoned XFS needs Linux 6.15 and xfsprogs 6.15 on the node; use %s",
			ErrInvalidParameter, key, fstype, strings.Join(Filesystems, " or "))
	}
	return fmt.Errorf("%w: %s=%q: not a zoned filesystem this driver formats: use %s",
		ErrInvalidParameter, key, fstype, strings.Join(Filesystems, " or "))
}

// f2fs's on-disk layout, as mkfs.f2fs lays it out (f2fs_format.c): 4 KiB
// blocks in 2 MiB segments; the metadata areas (checkpoint, SIT, NAT, SSA)
// must lie in randomly writable zones, after a first zone that holds only
// the superblock (segment 0 is zone-aligned).
const (
	f2fsSegment          = 2 << 20
	f2fsBlocksPerSegment = f2fsSegment / 4096
	f2fsSITEntriesBlock  = 55  // SIT entries per 4 KiB block
	f2fsNATEntriesBlock  = 455 // NAT entries per 4 KiB block
)

// f2fsConventionalZones is how many conventional zones mkfs.f2fs -m needs
// on geometry g: the superblock's zone plus the metadata areas rounded up
// to whole zones. It counts every segment of the device where mkfs.f2fs
// counts only the main area's, so it never asks for fewer than mkfs.f2fs
// does (measured: the same count, or one more).
func f2fsConventionalZones(g zoned.Geometry) int {
	segments := g.Size / f2fsSegment
	perSegments := func(blocks int64) int64 { return ceilDiv(blocks, f2fsBlocksPerSegment) }
	meta := 2 + // two checkpoint packs
		2*perSegments(ceilDiv(segments, f2fsSITEntriesBlock)) + // two SIT copies
		2*perSegments(ceilDiv(segments*f2fsBlocksPerSegment, f2fsNATEntriesBlock)) + // two NAT copies
		perSegments(segments) // SSA: a block per segment
	return 1 + int(ceilDiv(meta*f2fsSegment, g.ZoneSize))
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }

// fsTypeOf is the filesystem a Filesystem volume is formatted with: its
// capability's fs_type (external-provisioner puts the StorageClass's
// csi.storage.k8s.io/fstype there), else the class's fsType parameter,
// else DefaultFsType. The key names where it came from, for errors.
func fsTypeOf(capability, param string) (fstype, key string) {
	switch {
	case capability != "":
		return capability, "fs_type (csi.storage.k8s.io/fstype)"
	case param != "":
		return param, ParamFsType
	}
	return DefaultFsType, "fs_type (default)"
}

// knownFilesystem reports whether fstype names a filesystem this driver
// formats; an empty fstype stands for DefaultFsType.
func knownFilesystem(fstype string) bool {
	return fstype == "" || slices.Contains(Filesystems, fstype)
}

// checkFilesystems checks the filesystem of each mounted capability (see
// fsTypeOf) against the volume's geometry g.
func checkFilesystems(caps []*csi.VolumeCapability, paramFsType string, g zoned.Geometry) error {
	for _, c := range caps {
		if mnt := c.GetMount(); mnt != nil {
			fstype, key := fsTypeOf(mnt.GetFsType(), paramFsType)
			if err := checkFilesystem(key, fstype, g); err != nil {
				return err
			}
		}
	}
	return nil
}
