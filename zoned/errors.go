package zoned

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Errors returned by this package wrap them with the zone
// and offsets involved; frontends turn them into an errno with Errno.
var (
	// ErrInvalidGeometry: a Geometry that docs/qcow2-zoned.md section 4 refuses.
	ErrInvalidGeometry = errors.New("invalid zoned geometry")
	// ErrInvalidWritePointer: a persisted write pointer outside its zone
	// or not sector-aligned, or a table of the wrong length.
	ErrInvalidWritePointer = errors.New("invalid persisted write pointer")
	// ErrOutOfRange: a request reaching outside the device.
	ErrOutOfRange = errors.New("request outside the device")
	// ErrWritePastEnd: a write or append reaching past the device end. It
	// wraps ErrOutOfRange; it exists because NBD wants ENOSPC for writes
	// and EINVAL for reads past the end.
	ErrWritePastEnd = fmt.Errorf("%w: write past the end", ErrOutOfRange)
	// ErrUnaligned: an offset or length not aligned as the operation needs
	// (sectors for writes and appends, zones for management operations).
	ErrUnaligned = errors.New("unaligned request")
	// ErrNotAtWritePointer: a write to a sequential zone that does not
	// begin at its write pointer.
	ErrNotAtWritePointer = errors.New("write not at the write pointer")
	// ErrBeyondCapacity: a write or append ending past the zone's capacity,
	// including any write to a full zone.
	ErrBeyondCapacity = errors.New("write beyond zone capacity")
	// ErrCrossesZone: a write that spans a sequential zone boundary.
	ErrCrossesZone = errors.New("write crosses a zone boundary")
	// ErrAppendTooLarge: a zone append larger than MaxAppendBytes.
	ErrAppendTooLarge = errors.New("zone append larger than max_append_bytes")
	// ErrConventionalZone: a zone append or management operation on a
	// conventional zone.
	ErrConventionalZone = errors.New("operation not allowed on a conventional zone")
	// ErrOpenResources: opening the zone would exceed max_open_zones and no
	// implicitly open zone could be closed to make room.
	ErrOpenResources = errors.New("too many open zones")
	// ErrActiveResources: activating the zone would exceed max_active_zones.
	ErrActiveResources = errors.New("too many active zones")
	// ErrZoneFailed: the zone lost a write it had already accepted (see
	// Device); it refuses writes, appends and finish until it is reset.
	ErrZoneFailed = errors.New("zone failed, reset it")
)

// Errno maps an error from this package to the errno an NBD or ublk frontend
// returns. Resource exhaustion uses the errnos Linux's block layer gives
// BLK_STS_ZONE_OPEN_RESOURCE and BLK_STS_ZONE_ACTIVE_RESOURCE, so a ublk
// server's result turns back into the same block status in the kernel. (QEMU
// returns EBUSY for an explicit open or finish without an active slot; over
// ublk EBUSY would become BLK_STS_DEV_RESOURCE, which the block layer retries
// forever, so it is EOVERFLOW here too.) Operations on conventional zones,
// failed zones and zones an injected fault made read-only or offline are
// EIO, as Linux reports them; an injected error carries its own errno. Requests past the end are
// EINVAL, except writes, which NBD wants as ENOSPC. Anything else keeps a
// syscall.Errno found in its chain (a full host disk stays ENOSPC) or is EIO.
func Errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	switch {
	case errors.Is(err, ErrOpenResources):
		return syscall.ETOOMANYREFS
	case errors.Is(err, ErrActiveResources):
		return syscall.EOVERFLOW
	case errors.Is(err, ErrConventionalZone), errors.Is(err, ErrZoneFailed),
		errors.Is(err, ErrZoneReadOnly), errors.Is(err, ErrZoneOffline):
		return syscall.EIO
	case errors.Is(err, ErrWritePastEnd):
		return syscall.ENOSPC
	case errors.Is(err, ErrOutOfRange),
		errors.Is(err, ErrUnaligned),
		errors.Is(err, ErrNotAtWritePointer),
		errors.Is(err, ErrBeyondCapacity),
		errors.Is(err, ErrCrossesZone),
		errors.Is(err, ErrAppendTooLarge),
		errors.Is(err, ErrInvalidGeometry),
		errors.Is(err, ErrInvalidFault),
		errors.Is(err, ErrInvalidWritePointer):
		return syscall.EINVAL
	}
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return e
	}
	return syscall.EIO
}
