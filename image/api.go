package image

import (
	"errors"
)

// Sentinel errors callers branch on. Errors returned by this package wrap
// them with the details (offsets, field names, file names).
var (
	// ErrCorrupt: the image's metadata is inconsistent or out of bounds.
	ErrCorrupt = errors.New("corrupt qcow2 image")
	// ErrUnsupported: the image uses a qcow2 feature this package refuses.
	ErrUnsupported = errors.New("unsupported qcow2 feature")
	// ErrOutOfRange: a request reaches past the end of the virtual disk.
	ErrOutOfRange = errors.New("request past the end of the image")
	// ErrReadOnly: a write to an image opened read-only.
	ErrReadOnly = errors.New("image is read-only")
	// ErrClosed: a call on a closed image.
	ErrClosed = errors.New("image is closed")
	// ErrInvalidOption: a creation option is out of range.
	ErrInvalidOption = errors.New("invalid image option")
)

// Preallocation modes accepted by Create (qemu-img's names).
const (
	PreallocOff      = "off"
	PreallocMetadata = "metadata"
)

// Default creation values, as qemu-img's.
const (
	DefaultClusterSize  = 64 << 10
	DefaultRefcountBits = 16
	MinClusterSize      = 512
	MaxClusterSize      = 2 << 20
)

// CreateOptions describe a new image. The zero value of every field but
// Size selects qemu-img's default.
type CreateOptions struct {
	Size          int64  // virtual size in bytes; rounded up to 512
	ClusterSize   int    // power of two, 512 B..2 MiB; 0 means 64 KiB
	RefcountBits  int    // 1, 2, 4, 8, 16, 32 or 64; 0 means 16
	Preallocation string // "", "off" or "metadata"
	LazyRefcounts bool   // set the lazy_refcounts compatible bit
	// Zones makes a zoned image (NrZones is derived from Size). Package
	// image checks only the format's consistency: validate the limits with
	// zoned.Geometry.Normalize first.
	Zones *Zones
	// BackingFile makes the new image a copy-on-write overlay of the qcow2
	// image of that name, recorded as given and resolved as QEMU does
	// (relative to the new image's directory unless absolute): whatever
	// the new image does not hold reads from it. A Size of 0 is the
	// backing image's; a zoned backing image passes on its zones and write
	// pointers (zones past its end start empty), and Zones, if set, must
	// keep its zone size, capacity and conventional zones: only the limits
	// are the new image's own.
	BackingFile string
	// Backing is the backing image, open: Create opens BackingFile itself;
	// CreateStorage, which has no directory to find it in, needs it here.
	Backing *Image
}

// OpenOptions tune how an image is opened.
type OpenOptions struct {
	ReadOnly bool
	// CacheSize bounds the memory held for L2 tables and refcount blocks,
	// in bytes. 0 means DefaultCacheSize.
	CacheSize int64
	// JournalDir, for a read-write Open, keeps a redo journal of the
	// metadata each call dirties in JournalDir/zq-<st_dev>-<st_ino>.journal
	// (hex; the directory is created 0700 if missing), so that when the
	// serving process dies without a flush, the next read-write open of
	// this boot replays it and every acknowledged write survives. Each call
	// that dirties metadata appends one batch with a single unsynced write;
	// Flush resets the journal, Close removes it. A journal of another boot
	// is discarded (the page cache it relied on is gone; the image's
	// crash-ordered state stands); a journal whose header cannot be read
	// fails the open with ErrJournal, naming the file. Read-only opens
	// ignore the journal. OpenStorage refuses JournalDir.
	JournalDir string
	// Journal is the journal's storage for OpenStorage, with the same
	// behaviour as JournalDir. Empty storage is no journal. The image owns
	// it once open; Close truncates it to nothing.
	Journal Storage
	// ForCheck opens the image to check or repair it, as qemu-img check
	// does: a write-pointer table that cannot be read (out of the file,
	// entries outside their zones) does not fail the open. Check then
	// reports it as a corruption and a repairing Check rebuilds it;
	// until then WritePointers, SetWritePointer and Grow fail with the
	// reason.
	ForCheck bool
	// Backing is the open backing image of an image with a backing file,
	// for OpenStorage (Open opens the chain itself, by name). The image
	// owns it once open.
	Backing *Image
	// BootID, if set, replaces the kernel's boot id
	// (/proc/sys/kernel/random/boot_id) that a journal is scoped to: a
	// UUID. For tests that model a reboot.
	BootID string
}

// DefaultCacheSize is the metadata cache of an image opened without a
// CacheSize: enough L2 tables to map 32 GiB with 64 KiB clusters.
const DefaultCacheSize = 4 << 20

// Info describes an open image, as `qemu-img info` does.
type Info struct {
	Format          string `json:"format"`
	Filename        string `json:"filename,omitempty"`
	VirtualSize     int64  `json:"virtual-size"`
	ActualSize      int64  `json:"actual-size"`
	ClusterSize     int    `json:"cluster-size"`
	Version         int    `json:"version"`
	RefcountBits    int    `json:"refcount-bits"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   bool   `json:"lazy-refcounts"`
	ExtendedL2      bool   `json:"extended-l2"`
	Dirty           bool   `json:"dirty-flag"`
	Corrupt         bool   `json:"corrupt"`
	// The backing file, as qemu-img info names it: as recorded, resolved,
	// and its format.
	BackingFilename     string `json:"backing-filename,omitempty"`
	FullBackingFilename string `json:"full-backing-filename,omitempty"`
	BackingFormat       string `json:"backing-filename-format,omitempty"`
	// Zones is the zone geometry of a zoned image, nil for a plain one.
	Zones *Zones `json:"zoned,omitempty"`
	// JournalReplayed counts the journal batches the open replayed: writes
	// of a process that died without flushing, recovered. Worth a log line.
	JournalReplayed int `json:"journal-replayed,omitempty"`
}

// Extent is a run of the virtual disk with one allocation state, as Map
// reports it.
type Extent struct {
	Offset int64 `json:"start"`
	Length int64 `json:"length"`
	// Data: the run is backed by data clusters in the file.
	Data bool `json:"data"`
	// Zero: the run reads as zeros (unallocated or zero clusters).
	Zero bool `json:"zero"`
}

// CheckResult is what Check found, and what it repaired.
type CheckResult struct {
	// Corruptions are problems that can lose data: refcounts lower than the
	// references, overlapping clusters, tables out of bounds or misaligned.
	Corruptions []string `json:"corruptions,omitempty"`
	// Leaks are clusters with a refcount but no reference.
	Leaks []string `json:"leaks,omitempty"`
	// LeakedClusters counts the leaked clusters (Leaks may group them).
	LeakedClusters int64 `json:"leaks-count"`
	// Repaired counts the refcounts rewritten by a repairing check.
	Repaired int64 `json:"repaired"`
	// Rebuilt says what metadata a repairing check made anew, one line
	// per table (the write-pointer table).
	Rebuilt []string `json:"rebuilt,omitempty"`
	// AllocatedClusters and TotalClusters describe guest clusters: how many
	// are backed by data in the file, out of how many the disk has.
	AllocatedClusters int64 `json:"allocated-clusters"`
	TotalClusters     int64 `json:"total-clusters"`
	// ImageEndOffset is the end of the last cluster in use.
	ImageEndOffset int64 `json:"image-end-offset"`
}

// Clean reports whether the check found nothing to complain about.
func (r *CheckResult) Clean() bool { return len(r.Corruptions) == 0 && len(r.Leaks) == 0 }
