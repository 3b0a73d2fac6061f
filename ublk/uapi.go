package ublk

import (
	"encoding/binary"
)

// The kernel ABI of include/uapi/linux/ublk_cmd.h and blkzoned.h, as far as
// this package uses it. Structures are encoded by hand, little-endian (ublk
// exists on little-endian hosts only in practice, and the kernel reads these
// in host order: x86-64 and arm64 are the targets).

var le = binary.LittleEndian

// Command numbers (the _IOC_NR part) of control and I/O commands.
const (
	cmdGetQueueAffinity = 0x01
	cmdGetDevInfo       = 0x02
	cmdAddDev           = 0x04
	cmdDelDev           = 0x05
	cmdStartDev         = 0x06
	cmdStopDev          = 0x07
	cmdSetParams        = 0x08
	cmdGetParams        = 0x09
	cmdStartRecovery    = 0x10
	cmdEndRecovery      = 0x11
	cmdGetFeatures      = 0x13

	ioFetchReq       = 0x20
	ioCommitAndFetch = 0x21
)

const (
	ctrlCmdSize = 32 // struct ublksrv_ctrl_cmd
	ioCmdSize   = 16 // struct ublksrv_io_cmd
	devInfoSize = 64 // struct ublksrv_ctrl_dev_info
	iodSize     = 24 // struct ublksrv_io_desc
	// paramsSize covers struct ublk_params up to and including the zoned
	// parameters (the part 6.6+ kernels know); the kernel clamps to its own.
	paramsSize  = 8 + 32 + 20 + 16 + 32
	blkZoneSize = 64 // struct blk_zone
)

// ioc encodes a command number as _IOWR('u', nr, size) (or _IOR with
// read), the UBLK_F_CMD_IOCTL_ENCODE form.
func ioc(nr uint32, size uint32, read bool) uint32 {
	dir := uint32(3) // _IOC_READ|_IOC_WRITE
	if read {
		dir = 2
	}
	return dir<<30 | size<<16 | 'u'<<8 | nr
}

// Device flags (UBLK_F_*).
const (
	flagUserRecovery        = 1 << 3
	flagUserRecoveryReissue = 1 << 4
	flagCmdIoctlEncode      = 1 << 6
	flagUserCopy            = 1 << 7
	flagZoned               = 1 << 8
)

// Device states (UBLK_S_DEV_*).
const (
	StateDead     = 0
	StateLive     = 1
	StateQuiesced = 2
)

// I/O operations (UBLK_IO_OP_*) and flags.
const (
	opReadIO       = 0
	opWriteIO      = 1
	opFlush        = 2
	opDiscard      = 3
	opWriteZeroes  = 5
	opZoneOpen     = 10
	opZoneClose    = 11
	opZoneFinish   = 12
	opZoneAppend   = 13
	opZoneResetAll = 14
	opZoneReset    = 15
	opReportZones  = 18

	ioFlagFUA     = 1 << 13
	ioFlagNoUnmap = 1 << 15
)

// ioResAbort is the result of a fetch the kernel cancelled: the device is
// stopping (UBLK_IO_RES_ABORT, -ENODEV).
const ioResAbort = -19

// userCopyOffset is where request tag of queue q starts in the character
// device for pread/pwrite (UBLK_F_USER_COPY).
func userCopyOffset(q, tag int) int64 {
	const bufOffset, tagShift, queueShift = 0x80000000, 25, 25 + 16
	return bufOffset + int64(q)<<queueShift + int64(tag)<<tagShift
}

// DevInfo is struct ublksrv_ctrl_dev_info.
type DevInfo struct {
	Queues        uint16
	QueueDepth    uint16
	State         uint16
	MaxIOBufBytes uint32
	ID            uint32
	ServerPID     int32
	Flags         uint64
	// Tag is the server's own field (ublksrv_flags): the kernel keeps it
	// for the device's life. It identifies the image a device serves.
	Tag uint64
}

func (d *DevInfo) encode() []byte {
	b := make([]byte, devInfoSize)
	le.PutUint16(b[0:], d.Queues)
	le.PutUint16(b[2:], d.QueueDepth)
	le.PutUint16(b[4:], d.State)
	le.PutUint32(b[8:], d.MaxIOBufBytes)
	le.PutUint32(b[12:], d.ID)
	le.PutUint32(b[16:], uint32(d.ServerPID))
	le.PutUint64(b[24:], d.Flags)
	le.PutUint64(b[32:], d.Tag)
	return b
}

func decodeDevInfo(b []byte) DevInfo {
	return DevInfo{
		Queues:        le.Uint16(b[0:]),
		QueueDepth:    le.Uint16(b[2:]),
		State:         le.Uint16(b[4:]),
		MaxIOBufBytes: le.Uint32(b[8:]),
		ID:            le.Uint32(b[12:]),
		ServerPID:     int32(le.Uint32(b[16:])),
		Flags:         le.Uint64(b[24:]),
		Tag:           le.Uint64(b[32:]),
	}
}

// Params is the part of struct ublk_params this package sets: basic,
// discard and zoned.
type Params struct {
	LogicalBlockShift  uint8
	PhysicalBlockShift uint8
	MaxSectors         uint32
	ChunkSectors       uint32
	Sectors            uint64
	ReadOnly           bool

	Discard               bool
	DiscardGranularity    uint32
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32

	Zoned                bool
	MaxOpenZones         uint32
	MaxActiveZones       uint32
	MaxZoneAppendSectors uint32
}

const (
	paramBasic   = 1 << 0
	paramDiscard = 1 << 1
	paramZoned   = 1 << 3

	attrReadOnly      = 1 << 0
	attrVolatileCache = 1 << 2
	attrFUA           = 1 << 3
)

func (p *Params) encode() []byte {
	b := make([]byte, paramsSize)
	le.PutUint32(b[0:], paramsSize)
	types := uint32(paramBasic)
	// basic at 8
	attrs := uint32(attrVolatileCache | attrFUA)
	if p.ReadOnly {
		attrs |= attrReadOnly
	}
	le.PutUint32(b[8:], attrs)
	b[12] = p.LogicalBlockShift
	b[13] = p.PhysicalBlockShift
	b[14] = p.PhysicalBlockShift // io_opt_shift
	b[15] = p.PhysicalBlockShift // io_min_shift
	le.PutUint32(b[16:], p.MaxSectors)
	le.PutUint32(b[20:], p.ChunkSectors)
	le.PutUint64(b[24:], p.Sectors)
	// discard at 40
	if p.Discard {
		types |= paramDiscard
		le.PutUint32(b[44:], p.DiscardGranularity)
		le.PutUint32(b[48:], p.MaxDiscardSectors)
		le.PutUint32(b[52:], p.MaxWriteZeroesSectors)
		le.PutUint16(b[56:], 1) // max_discard_segments: the kernel takes only 1
	}
	// devt at 60 is read-only; zoned at 76
	if p.Zoned {
		types |= paramZoned
		le.PutUint32(b[76:], p.MaxOpenZones)
		le.PutUint32(b[80:], p.MaxActiveZones)
		le.PutUint32(b[84:], p.MaxZoneAppendSectors)
	}
	le.PutUint32(b[4:], types)
	return b
}

func decodeParams(b []byte) Params {
	types := le.Uint32(b[4:])
	attrs := le.Uint32(b[8:])
	p := Params{
		LogicalBlockShift:  b[12],
		PhysicalBlockShift: b[13],
		MaxSectors:         le.Uint32(b[16:]),
		ChunkSectors:       le.Uint32(b[20:]),
		Sectors:            le.Uint64(b[24:]),
		ReadOnly:           attrs&attrReadOnly != 0,
	}
	if types&paramDiscard != 0 {
		p.Discard = true
		p.DiscardGranularity = le.Uint32(b[44:])
		p.MaxDiscardSectors = le.Uint32(b[48:])
		p.MaxWriteZeroesSectors = le.Uint32(b[52:])
	}
	if types&paramZoned != 0 {
		p.Zoned = true
		p.MaxOpenZones = le.Uint32(b[76:])
		p.MaxActiveZones = le.Uint32(b[80:])
		p.MaxZoneAppendSectors = le.Uint32(b[84:])
	}
	return p
}

// iod is struct ublksrv_io_desc: the request the kernel hands over.
type iod struct {
	op          uint8
	flags       uint32
	nrSectors   uint32 // nr_zones for REPORT_ZONES
	startSector uint64
}

func decodeIOD(b []byte) iod {
	opFlags := le.Uint32(b[0:])
	return iod{
		op:          uint8(opFlags),
		flags:       opFlags,
		nrSectors:   le.Uint32(b[4:]),
		startSector: le.Uint64(b[8:]),
	}
}

// putIOCmd writes struct ublksrv_io_cmd.
func putIOCmd(b []byte, q, tag uint16, result int32, addr uint64) {
	le.PutUint16(b[0:], q)
	le.PutUint16(b[2:], tag)
	le.PutUint32(b[4:], uint32(result))
	le.PutUint64(b[8:], addr)
}

// putBlkZone writes one struct blk_zone (sectors).
func putBlkZone(b []byte, start, length, wp, capacity uint64, typ, cond uint8, resetRecommended bool) {
	clear(b[:blkZoneSize])
	le.PutUint64(b[0:], start)
	le.PutUint64(b[8:], length)
	le.PutUint64(b[16:], wp)
	b[24] = typ
	b[25] = cond
	if resetRecommended {
		b[27] = 1 // blk_zone.reset
	}
	le.PutUint64(b[32:], capacity)
}
