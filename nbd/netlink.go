package nbd

// A minimal generic netlink client for the kernel nbd driver's "nbd"
// family (linux/nbd-netlink.h), on a raw AF_NETLINK socket: CONNECT,
// DISCONNECT, RECONFIGURE and STATUS. It needs CAP_SYS_ADMIN (the family's
// operations are GENL_ADMIN_PERM) and the nbd module.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// From linux/nbd-netlink.h.
const (
	nbdGenlFamily  = "nbd"
	nbdGenlVersion = 1

	nbdCmdConnect     = 1
	nbdCmdDisconnect  = 2
	nbdCmdReconfigure = 3
	nbdCmdLinkDead    = 4 // multicast notification, unused
	nbdCmdStatus      = 5

	nbdAttrIndex           = 1  // u32
	nbdAttrSizeBytes       = 2  // u64
	nbdAttrBlockSizeBytes  = 3  // u64
	nbdAttrTimeout         = 4  // u64, seconds
	nbdAttrServerFlags     = 5  // u64, the NBD transmission flags
	nbdAttrClientFlags     = 6  // u64
	nbdAttrSockets         = 7  // nested: NBD_SOCK_ITEM
	nbdAttrDeadConnTimeout = 8  // u64, seconds
	nbdAttrDeviceList      = 9  // nested: NBD_DEVICE_ITEM
	nbdAttrBackendID       = 10 // string, NBD_ATTR_BACKEND_IDENTIFIER

	nbdSockItem = 1 // nested: NBD_SOCK_FD
	nbdSockFD   = 1 // u32

	nbdDeviceItem      = 1 // nested: NBD_DEVICE_INDEX, NBD_DEVICE_CONNECTED
	nbdDeviceIndex     = 1 // u32
	nbdDeviceConnected = 2 // u8
)

// ErrNoNBDModule is returned when the kernel has no "nbd" generic netlink
// family: the nbd module is not loaded (modprobe nbd).
var ErrNoNBDModule = errors.New("nbd module not loaded (no generic netlink family \"nbd\"; modprobe nbd)")

// sizeofGenlmsghdr is struct genlmsghdr: cmd, version, reserved u16.
const sizeofGenlmsghdr = 4

// nlAttr is one netlink attribute.
type nlAttr struct {
	typ uint16
	val []byte
}

// nlAttrs builds a sequence of netlink attributes.
type nlAttrs []byte

func (a nlAttrs) put(typ uint16, val []byte) nlAttrs {
	n := unix.SizeofNlAttr + len(val)
	a = binary.NativeEndian.AppendUint16(a, uint16(n))
	a = binary.NativeEndian.AppendUint16(a, typ)
	a = append(a, val...)
	for len(a)%unix.NLA_ALIGNTO != 0 {
		a = append(a, 0)
	}
	return a
}

func (a nlAttrs) u32(typ uint16, v uint32) nlAttrs {
	return a.put(typ, binary.NativeEndian.AppendUint32(nil, v))
}

func (a nlAttrs) u64(typ uint16, v uint64) nlAttrs {
	return a.put(typ, binary.NativeEndian.AppendUint64(nil, v))
}

func (a nlAttrs) str(typ uint16, s string) nlAttrs { return a.put(typ, append([]byte(s), 0)) }

func (a nlAttrs) nested(typ uint16, inner nlAttrs) nlAttrs {
	return a.put(typ|unix.NLA_F_NESTED, inner)
}

// parseAttrs splits b into attributes; the type has its flag bits
// (NLA_F_NESTED, NLA_F_NET_BYTEORDER) cleared.
func parseAttrs(b []byte) ([]nlAttr, error) {
	var out []nlAttr
	for len(b) > 0 {
		if len(b) < unix.SizeofNlAttr {
			return nil, fmt.Errorf("netlink attribute: %d trailing bytes", len(b))
		}
		n := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if n < unix.SizeofNlAttr || n > len(b) {
			return nil, fmt.Errorf("netlink attribute %d: bad length %d (%d bytes left)", typ, n, len(b))
		}
		out = append(out, nlAttr{typ, b[unix.SizeofNlAttr:n]})
		n = (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		if n > len(b) {
			n = len(b)
		}
		b = b[n:]
	}
	return out, nil
}

func attrU32(a nlAttr) (uint32, error) {
	if len(a.val) < 4 {
		return 0, fmt.Errorf("netlink attribute %d: %d bytes, want a u32", a.typ, len(a.val))
	}
	return binary.NativeEndian.Uint32(a.val), nil
}

// genlConn is a generic netlink socket.
type genlConn struct {
	fd  int
	seq uint32
}

// netlinkTimeout bounds the wait for the kernel's answer.
const netlinkTimeout = 30 * time.Second

func dialGenl() (*genlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("generic netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("generic netlink bind: %w", err)
	}
	tv := unix.NsecToTimeval(netlinkTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("generic netlink SO_RCVTIMEO: %w", err)
	}
	return &genlConn{fd: fd, seq: uint32(time.Now().UnixNano())}, nil
}

func (c *genlConn) Close() error { return unix.Close(c.fd) }

// request sends one generic netlink request with an ACK asked for, and
// returns the attributes of each reply message before the ACK. A negative
// errno in the ACK is returned as a syscall.Errno.
func (c *genlConn) request(family uint16, cmd, version uint8, attrs nlAttrs) ([][]nlAttr, error) {
	c.seq++
	seq := c.seq
	msg := make([]byte, unix.SizeofNlMsghdr+sizeofGenlmsghdr, unix.SizeofNlMsghdr+sizeofGenlmsghdr+len(attrs))
	msg = append(msg, attrs...)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], family)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(msg[8:], seq)
	binary.NativeEndian.PutUint32(msg[12:], 0)
	msg[16] = cmd
	msg[17] = version
	for {
		err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("netlink send: %w", err)
		}
		break
	}
	var replies [][]nlAttr
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN || err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("netlink: no answer from the kernel in %v", netlinkTimeout)
		}
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("netlink: parsing the answer: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return nil, errors.New("netlink: short error message")
				}
				if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
					return nil, syscall.Errno(-e)
				}
				return replies, nil
			case unix.NLMSG_DONE:
				return replies, nil
			case unix.NLMSG_NOOP, unix.NLMSG_OVERRUN:
				continue
			}
			if len(m.Data) < sizeofGenlmsghdr {
				return nil, errors.New("netlink: short generic netlink message")
			}
			// Copy: buf is reused for the next message (the ACK).
			as, err := parseAttrs(append([]byte(nil), m.Data[sizeofGenlmsghdr:]...))
			if err != nil {
				return nil, fmt.Errorf("netlink: %w", err)
			}
			replies = append(replies, as)
		}
	}
}

// familyID resolves a generic netlink family name (CTRL_CMD_GETFAMILY).
func (c *genlConn) familyID(name string) (uint16, error) {
	replies, err := c.request(unix.GENL_ID_CTRL, unix.CTRL_CMD_GETFAMILY, 1,
		nlAttrs(nil).str(unix.CTRL_ATTR_FAMILY_NAME, name))
	if err != nil {
		return 0, err
	}
	for _, r := range replies {
		for _, a := range r {
			if a.typ == unix.CTRL_ATTR_FAMILY_ID && len(a.val) >= 2 {
				return binary.NativeEndian.Uint16(a.val), nil
			}
		}
	}
	return 0, fmt.Errorf("generic netlink family %q: no id in the answer", name)
}

// nbdNetlink is a generic netlink socket with the nbd family resolved.
type nbdNetlink struct {
	c      *genlConn
	family uint16
}

func dialNBD() (*nbdNetlink, error) {
	c, err := dialGenl()
	if err != nil {
		return nil, err
	}
	id, err := c.familyID(nbdGenlFamily)
	if err != nil {
		c.Close()
		if errors.Is(err, syscall.ENOENT) {
			return nil, ErrNoNBDModule
		}
		return nil, fmt.Errorf("resolving the nbd netlink family: %w", err)
	}
	return &nbdNetlink{c: c, family: id}, nil
}

func (n *nbdNetlink) Close() error { return n.c.Close() }

func (n *nbdNetlink) do(cmd uint8, attrs nlAttrs) ([][]nlAttr, error) {
	return n.c.request(n.family, cmd, nbdGenlVersion, attrs)
}

// connectConfig is what NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE carry.
type connectConfig struct {
	index           int // -1: any free device (CONNECT only)
	size            int64
	blockSize       int64
	serverFlags     uint64
	timeout         time.Duration // 0: not sent
	deadConnTimeout time.Duration // 0: not sent
	backendID       string        // "": not sent
	fds             []int
}

func seconds(d time.Duration) uint64 { return uint64((d + time.Second - 1) / time.Second) }

func socketsAttr(fds []int) nlAttrs {
	var socks nlAttrs
	for _, fd := range fds {
		socks = socks.nested(nbdSockItem, nlAttrs(nil).u32(nbdSockFD, uint32(fd)))
	}
	return socks
}

// connect sends NBD_CMD_CONNECT and returns the index of the device the
// kernel bound.
func (n *nbdNetlink) connect(cfg connectConfig) (int, error) {
	var a nlAttrs
	if cfg.index >= 0 {
		a = a.u32(nbdAttrIndex, uint32(cfg.index))
	}
	a = a.u64(nbdAttrSizeBytes, uint64(cfg.size))
	a = a.u64(nbdAttrBlockSizeBytes, uint64(cfg.blockSize))
	a = a.u64(nbdAttrServerFlags, cfg.serverFlags)
	a = cfg.optional(a)
	a = a.nested(nbdAttrSockets, socketsAttr(cfg.fds))
	replies, err := n.do(nbdCmdConnect, a)
	if err != nil {
		return -1, fmt.Errorf("nbd netlink CONNECT: %w", connectHint(err))
	}
	for _, r := range replies {
		for _, at := range r {
			if at.typ == nbdAttrIndex {
				v, err := attrU32(at)
				if err != nil {
					return -1, fmt.Errorf("nbd netlink CONNECT reply: %w", err)
				}
				return int(v), nil
			}
		}
	}
	if cfg.index >= 0 {
		return cfg.index, nil
	}
	return -1, errors.New("nbd netlink CONNECT: the reply has no device index")
}

func connectHint(err error) error {
	switch {
	case errors.Is(err, syscall.EBUSY):
		return fmt.Errorf("%w (the device is in use: connected, or still open)", err)
	case errors.Is(err, syscall.EPERM):
		return fmt.Errorf("%w (needs CAP_SYS_ADMIN)", err)
	}
	return err
}

// optional appends the attributes connect and reconfigure send only when
// set: the timeouts and the backend identifier.
func (cfg connectConfig) optional(a nlAttrs) nlAttrs {
	if cfg.timeout > 0 {
		a = a.u64(nbdAttrTimeout, seconds(cfg.timeout))
	}
	if cfg.deadConnTimeout > 0 {
		a = a.u64(nbdAttrDeadConnTimeout, seconds(cfg.deadConnTimeout))
	}
	if cfg.backendID != "" {
		a = a.str(nbdAttrBackendID, cfg.backendID)
	}
	return a
}

// reconfigure sends NBD_CMD_RECONFIGURE for cfg.index: the sockets replace
// dead connections of the device; the timeouts are updated when set.
func (n *nbdNetlink) reconfigure(cfg connectConfig) error {
	// With a backend identifier the kernel refuses the reconfigure of a
	// device whose backend is another one.
	a := cfg.optional(nlAttrs(nil).u32(nbdAttrIndex, uint32(cfg.index)))
	if len(cfg.fds) > 0 {
		a = a.nested(nbdAttrSockets, socketsAttr(cfg.fds))
	}
	if _, err := n.do(nbdCmdReconfigure, a); err != nil {
		if errors.Is(err, syscall.EINVAL) {
			err = fmt.Errorf("%w (is /dev/nbd%d connected?)", err, cfg.index)
		}
		return fmt.Errorf("nbd netlink RECONFIGURE /dev/nbd%d: %w", cfg.index, connectHint(err))
	}
	return nil
}

func (n *nbdNetlink) disconnect(index int) error {
	if _, err := n.do(nbdCmdDisconnect, nlAttrs(nil).u32(nbdAttrIndex, uint32(index))); err != nil {
		return fmt.Errorf("nbd netlink DISCONNECT /dev/nbd%d: %w", index, connectHint(err))
	}
	return nil
}

// DeviceStatus is one device of NBD_CMD_STATUS.
type DeviceStatus struct {
	Index     int
	Connected bool
}

// status sends NBD_CMD_STATUS, for one device (index >= 0) or all.
func (n *nbdNetlink) status(index int) ([]DeviceStatus, error) {
	var a nlAttrs
	if index >= 0 {
		a = a.u32(nbdAttrIndex, uint32(index))
	}
	replies, err := n.do(nbdCmdStatus, a)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink STATUS: %w", err)
	}
	var out []DeviceStatus
	for _, r := range replies {
		for _, at := range r {
			if at.typ != nbdAttrDeviceList {
				continue
			}
			items, err := parseAttrs(at.val)
			if err != nil {
				return nil, fmt.Errorf("nbd netlink STATUS: %w", err)
			}
			for _, it := range items {
				if it.typ != nbdDeviceItem {
					continue
				}
				fields, err := parseAttrs(it.val)
				if err != nil {
					return nil, fmt.Errorf("nbd netlink STATUS: %w", err)
				}
				st := DeviceStatus{Index: -1}
				for _, f := range fields {
					switch f.typ {
					case nbdDeviceIndex:
						v, err := attrU32(f)
						if err != nil {
							return nil, fmt.Errorf("nbd netlink STATUS: %w", err)
						}
						st.Index = int(v)
					case nbdDeviceConnected:
						st.Connected = len(f.val) > 0 && f.val[0] != 0
					}
				}
				out = append(out, st)
			}
		}
	}
	return out, nil
}

// withNBD runs fn on a fresh nbd netlink socket.
func withNBD(fn func(n *nbdNetlink) error) error {
	n, err := dialNBD()
	if err != nil {
		return err
	}
	defer n.Close()
	return fn(n)
}

// Disconnect asks the kernel to disconnect /dev/nbdINDEX (NBD_CMD_DISCONNECT):
// it sends NBD_CMD_DISC on every connection and shuts them down; the
// serving process sees its sockets close.
func Disconnect(index int) error {
	return withNBD(func(n *nbdNetlink) error { return n.disconnect(index) })
}

// Status reports whether /dev/nbdINDEX is connected (NBD_CMD_STATUS).
func Status(index int) (connected bool, err error) {
	err = withNBD(func(n *nbdNetlink) error {
		list, err := n.status(index)
		if err != nil {
			return err
		}
		for _, d := range list {
			if d.Index == index {
				connected = d.Connected
				return nil
			}
		}
		return fmt.Errorf("nbd netlink STATUS: no device %d in the answer", index)
	})
	return connected, err
}

// ParseDevice returns N for "/dev/nbdN", "nbdN" or "N".
func ParseDevice(s string) (int, error) {
	t := strings.TrimPrefix(s, "/dev/")
	t = strings.TrimPrefix(t, "nbd")
	n, err := strconv.Atoi(t)
	if err != nil || n < 0 || strings.HasPrefix(t, "+") {
		return -1, fmt.Errorf("%q is not an nbd device (want /dev/nbdN)", s)
	}
	return n, nil
}

// DevicePath is /dev/nbdINDEX.
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }
