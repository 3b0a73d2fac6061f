// Package ublk serves an image as a Linux ublk block device (/dev/ublkbN)
// from this process: the control commands on /dev/ublk-control, one
// io_uring per hardware queue driven by its own OS thread, and the requests
// (read, write with FUA, flush, discard, write zeroes, and for a zoned
// device zone open/close/finish/reset/reset-all, zone append and report
// zones) served by a volume.Backend, whose Zones side answers the zone
// requests: this package sees a volume only through package volume.
//
// A zoned image becomes a host-managed zoned disk (UBLK_F_ZONED, Linux
// 6.6+): the kernel knows its zone size, open and active limits and zone
// append size, so blkzone, btrfs and f2fs zoned mode and fio's zbd mode
// work on it. Data moves with pread/pwrite on /dev/ublkcN (UBLK_F_USER_COPY,
// which the kernel requires for zoned devices: a zone append's commit
// carries the sector where the data landed in the field buffer mode uses for
// an address). Devices have user recovery with reissue: when the serving
// process dies the kernel holds the device's I/O, and Recover in a new
// process takes it back, so applications see no error (the writes the
// kernel reissues are the volume's to accept: volume.Zones.AcceptReplays);
// with the image's
// journal (image.OpenOptions.JournalDir) nothing the dead process
// acknowledged is lost.
//
// Everything is written against golang.org/x/sys/unix: the io_uring setup,
// the ring mappings and IORING_OP_URING_CMD are in uring.go, the kernel ABI
// in uapi.go.
package ublk
