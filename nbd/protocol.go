// Package nbd serves images over the NBD protocol (the fixed
// newstyle handshake and the transmission phase of the NetworkBlockDevice
// project's doc/proto.md) to NBD clients such as qemu, nbdcopy and nbdinfo,
// and to the kernel's nbd driver through ServeTransmission.
//
// The server speaks: options EXPORT_NAME, ABORT, LIST, INFO, GO,
// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (the
// "base:allocation" context); commands READ (structured replies with holes
// when negotiated), WRITE (FUA), DISC, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
// FAST_ZERO) and BLOCK_STATUS. Requests of one connection run concurrently
// on a bounded pool of workers; replies are serialized.
package nbd

import (
	"encoding/binary"
	"syscall"
)

// Handshake magics.
const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic        = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic   = 0x3e889045565a9
	requestMagic    = 0x25609513
	simpleMagic     = 0x67446698
	structuredMagic = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle   = 1 << 0
	flagNoZeroes        = 1 << 1
	clientFixedNewstyle = 1 << 0
	clientNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option replies.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrTooBig   = 1<<31 + 9
)

// Info types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendFastZero    = 1 << 11
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

// Structured reply chunk types and flags.
const (
	replyFlagDone    = 1 << 0
	replyNone        = 0
	replyOffsetData  = 1
	replyOffsetHole  = 2
	replyBlockStatus = 5
	replyError       = 1<<15 + 1
)

// base:allocation state bits, and the id of the only context.
const (
	stateHole           = 1 << 0
	stateZero           = 1 << 1
	baseAllocation      = "base:allocation"
	baseAllocationID    = 1
	maxOptionLength     = 64 << 10
	maxNameLength       = 4096
	requestHeaderLength = 28
)

// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
const (
	MinBlockSize       = 512
	PreferredBlockSize = 4096
	MaxBlockSize       = 32 << 20
)

// NBD error values (the protocol's fixed numbering, which is Linux's).
const (
	errPerm     = uint32(syscall.EPERM)
	errIO       = uint32(syscall.EIO)
	errNoMem    = uint32(syscall.ENOMEM)
	errInval    = uint32(syscall.EINVAL)
	errNoSpc    = uint32(syscall.ENOSPC)
	errOverflow = uint32(syscall.EOVERFLOW)
	errNotSup   = uint32(syscall.ENOTSUP)
	errShutdown = uint32(syscall.ESHUTDOWN)
)

// nbdErrno maps an errno to one of the values the protocol allows: the
// others become EIO, as the kernel's nbd client would report them anyway.
func nbdErrno(e syscall.Errno) uint32 {
	switch uint32(e) {
	case errPerm, errIO, errNoMem, errInval, errNoSpc, errOverflow, errNotSup, errShutdown:
		return uint32(e)
	case uint32(syscall.EDQUOT), uint32(syscall.EFBIG):
		return errNoSpc
	case uint32(syscall.ETOOMANYREFS): // too many open zones
		return errOverflow
	case uint32(syscall.EROFS):
		return errPerm
	}
	return errIO
}

// request is one transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

func parseRequest(b []byte) (request, bool) {
	if binary.BigEndian.Uint32(b[0:4]) != requestMagic {
		return request{}, false
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		cookie: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, true
}
