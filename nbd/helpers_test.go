package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// socketPair returns two connected unix stream sockets: unlike net.Pipe
// they buffer, as a real connection does.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

func newImage(t testing.TB, size int64) *image.Image {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	if err := image.Create(path, image.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	img, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// Zoned test geometry: 1 conventional zone, then sequential zones of
// 1 MiB with a capacity of 768 KiB.
const (
	testZoneSize = 1 << 20
	testZoneCap  = 768 << 10
)

func newZonedImage(t testing.TB, size int64, maxOpen int) (string, *image.Image, *zoned.Device) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "zoned.qcow2")
	g := zoned.Geometry{ZoneSize: testZoneSize, ZoneCapacity: testZoneCap, ConventionalZones: 1,
		MaxOpenZones: maxOpen, MaxActiveZones: maxOpen, MaxAppendBytes: 64 << 10}
	if _, err := volume.CreateZoned(path, image.CreateOptions{Size: size}, g); err != nil {
		t.Fatal(err)
	}
	img, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := volume.OpenZones(img)
	if err != nil {
		t.Fatal(err)
	}
	return path, img, dev
}

// client is a small NBD client for the tests, speaking the wire format
// byte by byte so that it can also say what a real client never would.
type client struct {
	t          testing.TB
	c          net.Conn
	r          *bufio.Reader
	structured bool
}

func newClient(t testing.TB, c net.Conn) *client {
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{t: t, c: c, r: bufio.NewReader(c)}
}

func (cl *client) write(b []byte) {
	cl.t.Helper()
	if _, err := cl.c.Write(b); err != nil {
		cl.t.Fatalf("client write: %v", err)
	}
}

func (cl *client) read(n int) []byte {
	cl.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(cl.r, b); err != nil {
		cl.t.Fatalf("client read of %d bytes: %v", n, err)
	}
	return b
}

// hello reads the server's greeting and sends the client flags.
func (cl *client) hello(flags uint32) {
	cl.t.Helper()
	b := cl.read(18)
	if binary.BigEndian.Uint64(b) != nbdMagic || binary.BigEndian.Uint64(b[8:]) != optMagic {
		cl.t.Fatalf("bad greeting % x", b)
	}
	if f := binary.BigEndian.Uint16(b[16:]); f != flagFixedNewstyle|flagNoZeroes {
		cl.t.Fatalf("handshake flags %#x", f)
	}
	cl.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (cl *client) option(opt uint32, data []byte) {
	cl.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	cl.write(append(b, data...))
}

type optReply struct {
	typ  uint32
	data []byte
}

// replies reads option replies up to the ACK or the first error.
func (cl *client) replies(opt uint32) []optReply {
	cl.t.Helper()
	var out []optReply
	for {
		h := cl.read(20)
		if binary.BigEndian.Uint64(h) != optReplyMagic || binary.BigEndian.Uint32(h[8:]) != opt {
			cl.t.Fatalf("bad option reply header % x", h)
		}
		r := optReply{binary.BigEndian.Uint32(h[12:]), cl.read(int(binary.BigEndian.Uint32(h[16:])))}
		out = append(out, r)
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			return out
		}
	}
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// negotiate does a full modern handshake: structured replies and
// base:allocation when structured, then GO with the block size request.
func (cl *client) negotiate(name string, structured bool) {
	cl.t.Helper()
	cl.hello(clientFixedNewstyle | clientNoZeroes)
	if structured {
		cl.option(optStructuredReply, nil)
		if r := cl.replies(optStructuredReply); r[0].typ != repAck {
			cl.t.Fatalf("STRUCTURED_REPLY: %#x", r[0].typ)
		}
		cl.option(optSetMetaContext, metaData(name, baseAllocation))
		if r := cl.replies(optSetMetaContext); len(r) != 2 || r[0].typ != repMetaContext {
			cl.t.Fatalf("SET_META_CONTEXT: %+v", r)
		}
		cl.structured = true
	}
	cl.option(optGo, goData(name, infoBlockSize))
	if r := cl.replies(optGo); r[len(r)-1].typ != repAck {
		cl.t.Fatalf("GO: %+v", r)
	}
}

func (cl *client) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	cl.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	cl.write(append(b, payload...))
}

// simple reads a simple reply header: errno and cookie.
func (cl *client) simple() (uint32, uint64) {
	cl.t.Helper()
	h := cl.read(16)
	if m := binary.BigEndian.Uint32(h); m != simpleMagic {
		cl.t.Fatalf("reply magic %#x, want a simple reply", m)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

// reply reads one whole reply: a simple one (as one pseudo chunk of type
// 0xffff carrying the errno), or structured chunks up to DONE.
func (cl *client) reply(readLen int) (errno uint32, cookie uint64, chunks []chunk) {
	cl.t.Helper()
	for {
		h := cl.read(4)
		switch binary.BigEndian.Uint32(h) {
		case simpleMagic:
			rest := cl.read(12)
			errno, cookie = binary.BigEndian.Uint32(rest), binary.BigEndian.Uint64(rest[4:])
			if errno == 0 && readLen > 0 {
				chunks = append(chunks, chunk{typ: 0xffff, payload: cl.read(readLen)})
			}
			return
		case structuredMagic:
			rest := cl.read(16)
			ch := chunk{flags: binary.BigEndian.Uint16(rest), typ: binary.BigEndian.Uint16(rest[2:]),
				cookie: binary.BigEndian.Uint64(rest[4:])}
			ch.payload = cl.read(int(binary.BigEndian.Uint32(rest[12:])))
			cookie = ch.cookie
			if ch.typ == replyError {
				errno = binary.BigEndian.Uint32(ch.payload)
			}
			chunks = append(chunks, ch)
			if ch.flags&replyFlagDone != 0 {
				return
			}
		default:
			cl.t.Fatalf("bad reply magic % x", h)
		}
	}
}

// readData reads [off, off+n) and assembles the reply, holes as zeros.
func (cl *client) readData(cookie, off uint64, n uint32) ([]byte, uint32) {
	cl.t.Helper()
	cl.request(cmdRead, 0, cookie, off, n, nil)
	errno, got, chunks := cl.reply(int(n))
	if got != cookie {
		cl.t.Fatalf("cookie %d, want %d", got, cookie)
	}
	if errno != 0 {
		return nil, errno
	}
	buf := make([]byte, n)
	for _, ch := range chunks {
		switch ch.typ {
		case 0xffff:
			copy(buf, ch.payload)
		case replyOffsetData:
			o := binary.BigEndian.Uint64(ch.payload) - off
			copy(buf[o:], ch.payload[8:])
		case replyOffsetHole, replyNone:
		default:
			cl.t.Fatalf("unexpected chunk type %d", ch.typ)
		}
	}
	return buf, 0
}

// serve starts a server for exports on one end of a socket pair and
// returns a client on the other, and a channel with ServeConn's result.
func serve(t testing.TB, exports ...*Export) (*client, *Server, chan error) {
	t.Helper()
	a, b := socketPair(t)
	s := &Server{Exports: exports}
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(a) }()
	t.Cleanup(func() { b.Close() })
	return newClient(t, b), s, done
}

func waitDone(t testing.TB, done chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("server connection did not end")
		return nil
	}
}
