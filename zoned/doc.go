// Package zoned is the zone state machine and its limits: it turns a flat
// Store (the zoned qcow2 image, or memory in tests) into a host-managed zoned
// block device with the rules of docs/qcow2-zoned.md sections 4 to 6. It owns
// the write pointers and decides what is legal; it knows nothing about qcow2.
//
// # Zone rules
//
// Conditions and types use the Linux/ZBC numbering that blkzone and qemu-io
// print. Only write pointers are persisted, so New derives every sequential
// zone's condition from its write pointer (empty, closed or full) and the open
// conditions live in memory only. Open zones are implicit + explicit; active
// zones are open + closed; full zones hold no resource.
//
// A write to a sequential zone must be sector-aligned, stay inside the zone,
// begin exactly at the write pointer and end at or before the capacity. An
// empty or closed zone must first become open: an empty zone needs an active
// slot; then, if max_open is reached, the least-recently-written implicitly
// open zone is closed to make room, but only while active < max_active (this
// last condition also applies to a closed zone, whose own activation would not
// change the active count: that is docs/qcow2-zoned.md section 5 as written, and what Linux's
// null_blk and QEMU do). Explicit Open and Finish use the same checks. Writes
// to conventional zones go straight to the Store, at any alignment.
//
// The choices the spec leaves open:
//   - Open of a full zone is a no-op, as in ZBC (null_blk fails it, QEMU
//     turns it into an explicitly open zone with its write pointer at the end).
//   - Finish sets the write pointer to the zone end, start + zone length,
//     which is what QEMU stores and what Linux's sd and nvme drivers report for
//     full zones (blkzone shows "wptr" equal to "len"). A zone filled by writing
//     keeps its write pointer at start + capacity. Reports show the write
//     pointer as stored, so `zq-csi io` prints what qemu-io prints for the same
//     image. Finish writes zeros from the old write pointer to the capacity
//     before recording the new one: after a crash the Store may hold bytes past
//     the durable write pointer (docs/qcow2-zoned.md section 6: the pointer may lag the
//     data), and finish must not turn them into readable data.
//   - Management operations check the whole range first (alignment, bounds,
//     conventional zones: EIO), then apply zone by zone in order and stop at
//     the first failure, leaving earlier zones changed, as Linux's
//     blkdev_zone_mgmt does. Reset of offset 0 and the device size (or
//     ResetAll) resets every sequential zone and skips conventional ones.
//   - Reset of an empty zone does no I/O. Otherwise the reset write pointer
//     is recorded and flushed before the zone is zeroed (docs/qcow2-zoned.md section 6), and
//     the whole zone length is zeroed so the Store can free whole clusters.
//
// # Concurrency and durability
//
// Every call may run concurrently with any other. Writes and appends reserve
// their range under the device lock (the write pointer advances at
// reservation, so concurrent appends to one zone get distinct ranges) and
// write their data outside it. Reads and writes to different zones, and
// different reservations in one zone, proceed in parallel. Reads return zeros
// past the write pointer and over reservations still in flight, so a read of
// a sequential zone never reads Store bytes that a write is still changing.
//
// A zone's recorded write pointer (Store.SetWritePointer) is the start of its
// lowest reservation still in flight, or its write pointer when none is: it
// never covers data that has not been written. Flush first waits for the
// reservations in flight when it was called that lie below a completed write,
// so that every write completed before a Flush is durable when it returns.
// Finish and reset wait for the zone's reservations to drain and hold off new
// ones while they record the pointer and change the data.
//
// When a data write fails, the zone cannot simply move its write pointer back
// if later reservations exist. The rule: if the failed reservation is the
// zone's last one and did not fill the zone, it is rolled back (the write
// pointer returns to its start; a zone left with nothing written becomes
// empty again unless it was explicitly opened; a zone implicitly opened for
// the write stays open). Otherwise the zone fails: it keeps its condition,
// reads keep working (the failed range reads as zeros), but writes, appends
// and finish return ErrZoneFailed (EIO) until the zone is reset, and its
// recorded write pointer never passes the failed range. Writes above the
// failure that complete afterwards return ErrZoneFailed too, because their
// data can never become durable; if some had already been acknowledged, the
// next Flush returns an error wrapping ErrZoneFailed. A failing
// SetWritePointer fails the zone the same way.
//
// # Injected faults
//
// A Device also fails on demand, for testing what runs on it (fault.go):
// sequential zones can be put in the read-only and offline conditions
// (SetCondition; they keep their write pointer and hold no resource), rules
// fail, delay or cut the power at the requests they select (AddFault: by
// kind, range, count, share), and with a volatile cache (SetVolatileCache,
// powercut.go) PowerCut drops what the Store has not made durable. A
// failed request changes nothing, except a partial write, whose first
// bytes land as an ordinary shorter write. With no rule in force and no
// volatile cache, a request pays one atomic load for all of it.
package zoned
