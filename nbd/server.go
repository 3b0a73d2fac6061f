package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/bufpool"
	"github.com/zq-csi/zq-csi/volume"
)

// Export is one named export of a Server.
type Export struct {
	Name        string
	Description string
	Backend     volume.Backend
	// ReadOnly refuses writes with EPERM and advertises READ_ONLY; a
	// read-only backend is always exported read-only.
	ReadOnly bool
	// NoMultiConn withholds CAN_MULTI_CONN (a server limited to one
	// connection, as qemu-nbd without --shared).
	NoMultiConn bool
}

func (e *Export) readOnly() bool { return e.ReadOnly || e.Backend.ReadOnly() }

// flags are the export's transmission flags. DF (don't fragment) means
// something only with structured replies, and the protocol says to leave
// it clear without them.
func (e *Export) flags(structured bool) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA)
	if structured {
		f |= tflagSendDF
	}
	if e.readOnly() {
		f |= tflagReadOnly
	} else {
		f |= tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if !e.NoMultiConn {
		f |= tflagCanMultiConn
	}
	return f
}

// DefaultWorkers is the number of requests of one connection served at
// once when Server.Workers is 0.
const DefaultWorkers = 16

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves exports to clients that do the fixed newstyle handshake.
type Server struct {
	Exports []*Export
	// MaxConns bounds the connections served at once (qemu-nbd's
	// --shared); further clients wait in the listen backlog. 0: no limit.
	MaxConns int
	// Workers bounds the requests of one connection in flight; 0 means
	// DefaultWorkers.
	Workers int
	// HandshakeTimeout bounds a connection's negotiation, so a client that
	// connects and says nothing does not hold a slot for ever; 0 means
	// DefaultHandshakeTimeout (qemu-nbd's 10 s).
	HandshakeTimeout time.Duration
	// Logf, if set, gets one line per connection that ends with an error.
	Logf func(format string, args ...any)

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closed    bool
	done      chan struct{}
	wg        sync.WaitGroup
}

func (s *Server) init() {
	if s.done == nil {
		s.done = make(chan struct{})
		s.listeners = map[net.Listener]struct{}{}
		s.conns = map[*conn]struct{}{}
	}
}

func (s *Server) export(name string) *Export {
	for _, e := range s.Exports {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// DefaultHandshakeTimeout is Server.HandshakeTimeout's default.
const DefaultHandshakeTimeout = 10 * time.Second

// track registers a listener or connection with add, under the lock,
// unless the server is shut down; it reports whether it did.
func (s *Server) track(add func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.init()
	if s.closed {
		return false
	}
	add()
	return true
}

// Serve accepts connections on l until Shutdown, serving each in its own
// goroutine. It closes l when it returns.
func (s *Server) Serve(l net.Listener) error {
	defer l.Close()
	if !s.track(func() { s.listeners[l] = struct{}{} }) {
		return ErrServerClosed
	}
	var backoff time.Duration
	var slots chan struct{}
	if s.MaxConns > 0 {
		slots = make(chan struct{}, s.MaxConns)
	}
	for {
		if slots != nil {
			select {
			case slots <- struct{}{}:
			case <-s.done:
				return ErrServerClosed
			}
		}
		nc, err := l.Accept()
		if err == nil {
			backoff = 0
		}
		if err != nil {
			select {
			case <-s.done:
				return ErrServerClosed
			default:
			}
			if temporaryAcceptError(err) {
				// Out of descriptors or memory, or a connection that died
				// in the queue: wait and go on, as net/http does, rather
				// than end the export for every client.
				if slots != nil {
					<-slots
				}
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.ServeConn(nc); err != nil && s.Logf != nil {
				s.Logf("nbd connection %s: %v", nc.RemoteAddr(), err)
			}
			if slots != nil {
				<-slots
			}
		}()
	}
}

// temporaryAcceptError reports an Accept error worth retrying.
func temporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// ServeConn does the handshake on nc and serves the export the client
// picks, then closes nc. A client's orderly end (DISC, ABORT, EOF
// between requests) is no error.
func (s *Server) ServeConn(nc net.Conn) error {
	c := newConn(nc, s.Workers)
	if !s.track(func() { s.conns[c] = struct{}{} }) {
		nc.Close()
		return ErrServerClosed
	}
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	defer nc.Close()
	limit := s.HandshakeTimeout
	if limit <= 0 {
		limit = DefaultHandshakeTimeout
	}
	nc.SetDeadline(time.Now().Add(limit))
	exp, err := c.handshake(s)
	if err == nil && !c.stopping.Load() {
		nc.SetDeadline(time.Time{})
	}
	if err != nil || exp == nil {
		if c.stopping.Load() || errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
	c.exp = exp
	return c.transmit()
}

// Shutdown stops accepting connections, lets every connection finish the
// requests it has received (replies included) and closes them; then
// returns, or returns ctx's error when ctx ends first. It flushes nothing:
// the owner of the backends flushes and closes them afterwards.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.init()
	if !s.closed {
		s.closed = true
		close(s.done)
	}
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()
	finished := make(chan struct{})
	go func() { s.wg.Wait(); close(finished) }()
	select {
	case <-finished:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ServeTransmission serves e on nc without a handshake: the transmission
// phase only, with simple replies, as the kernel's nbd driver speaks it on
// a socket handed over through netlink. It returns after DISC, EOF or a
// broken request stream, once every request received is answered, and
// closes nc.
func ServeTransmission(nc net.Conn, e *Export) error {
	c := newConn(nc, 0)
	c.exp = e
	defer nc.Close()
	return c.transmit()
}

// buffers holds the servers' request buffers (write payloads, read
// data), shared by every connection: a reply's data is in the connection's
// writer or on the socket before its buffer goes back.
var buffers bufpool.Pool

// conn is one client connection.
type conn struct {
	nc  net.Conn
	r   *bufio.Reader
	wmu sync.Mutex
	// replying counts the replies holding or waiting for wmu (lockReply).
	replying atomic.Int32
	w        *bufio.Writer
	werr     error
	exp      *Export
	workers  chan struct{}
	wg       sync.WaitGroup

	structured bool // NBD_OPT_STRUCTURED_REPLY negotiated
	metaAlloc  bool // base:allocation selected
	strict     bool // the client asked for block sizes: it must respect them
	stopping   atomic.Bool
}

func newConn(nc net.Conn, workers int) *conn {
	if workers <= 0 {
		workers = DefaultWorkers
	}
	return &conn{
		nc:      nc,
		r:       bufio.NewReaderSize(nc, 64<<10),
		w:       bufio.NewWriterSize(nc, 64<<10),
		workers: make(chan struct{}, workers),
	}
}

// stop makes the reader end at the next request boundary (or now, if it
// is waiting for one).
func (c *conn) stop() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
	// A client that stopped reading its replies must not hold the
	// shutdown (and every other worker, behind the write lock) for ever.
	c.nc.SetWriteDeadline(time.Now().Add(stopWriteTimeout))
}

// stopWriteTimeout is how long a stopping connection may take to send
// the replies still owed.
const stopWriteTimeout = 30 * time.Second

// handshake runs the fixed newstyle negotiation and returns the export
// the client chose, or nil with a nil error when it aborted.
func (c *conn) handshake(s *Server) (*Export, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return nil, err
	}
	var b [16]byte
	if _, err := io.ReadFull(c.r, b[:4]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", cflags)
	}
	noZeroes := cflags&clientNoZeroes != 0
	for {
		if _, err := io.ReadFull(c.r, b[:16]); err != nil {
			return nil, fmt.Errorf("reading option: %w", err)
		}
		if m := binary.BigEndian.Uint64(b[:8]); m != optMagic {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(b[8:12])
		length := binary.BigEndian.Uint32(b[12:16])
		if length > maxOptionLength {
			if opt == optExportName || length > 16*maxOptionLength {
				return nil, fmt.Errorf("option %d: length %d too large", opt, length)
			}
			if _, err := io.CopyN(io.Discard, c.r, int64(length)); err != nil {
				return nil, err
			}
			if err := c.optReply(opt, repErrTooBig, []byte("option too long")); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return nil, fmt.Errorf("reading option %d: %w", opt, err)
		}
		var err error
		switch opt {
		case optExportName:
			e := s.export(string(data))
			if e == nil {
				return nil, fmt.Errorf("unknown export %q", data)
			}
			reply := make([]byte, 10, 134)
			binary.BigEndian.PutUint64(reply, uint64(e.Backend.Size()))
			binary.BigEndian.PutUint16(reply[8:], e.flags(c.structured))
			if !noZeroes {
				reply = reply[:134]
			}
			if _, err := c.nc.Write(reply); err != nil {
				return nil, err
			}
			return e, nil
		case optAbort:
			c.optReply(opt, repAck, nil) // the client may be gone already
			return nil, nil
		case optList:
			if length != 0 {
				err = c.optReply(opt, repErrInvalid, []byte("LIST takes no data"))
				break
			}
			for _, e := range s.Exports {
				d := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
				if err = c.optReply(opt, repServer, append(d, e.Name...)); err != nil {
					return nil, err
				}
			}
			err = c.optReply(opt, repAck, nil)
		case optStructuredReply:
			if length != 0 {
				err = c.optReply(opt, repErrInvalid, []byte("STRUCTURED_REPLY takes no data"))
				break
			}
			c.structured = true
			err = c.optReply(opt, repAck, nil)
		case optInfo, optGo:
			var e *Export
			e, err = c.info(s, opt, data)
			if err == nil && e != nil && opt == optGo {
				return e, nil
			}
		case optListMetaContext, optSetMetaContext:
			err = c.metaContext(s, opt, data)
		default:
			err = c.optReply(opt, repErrUnsup, fmt.Appendf(nil, "option %d is not supported", opt))
		}
		if err != nil {
			return nil, err
		}
	}
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b, optReplyMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	_, err := c.nc.Write(append(b, data...))
	return err
}

// info answers INFO and GO; it returns the export when the reply was a
// success.
func (c *conn) info(s *Server, opt uint32, data []byte) (*Export, error) {
	bad := func(msg string) (*Export, error) { return nil, c.optReply(opt, repErrInvalid, []byte(msg)) }
	name, rest, msg := splitName(data, 2)
	if msg != "" {
		return bad(msg)
	}
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return bad("information request count does not match the length")
	}
	e := s.export(name)
	if e == nil {
		return nil, c.optReply(opt, repErrUnknown, fmt.Appendf(nil, "no export named %q", name))
	}
	blockSize := false
	var sentName, sentDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoBlockSize:
			blockSize = true
		case infoName:
			if !sentName {
				sentName = true
				if err := c.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoName), e.Name...)); err != nil {
					return nil, err
				}
			}
		case infoDescription:
			if !sentDesc && e.Description != "" {
				sentDesc = true
				if err := c.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoDescription), e.Description...)); err != nil {
					return nil, err
				}
			}
		}
	}
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, MinBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, PreferredBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, MaxBlockSize)
	if err := c.optReply(opt, repInfo, bs); err != nil {
		return nil, err
	}
	ex := binary.BigEndian.AppendUint16(nil, infoExport)
	ex = binary.BigEndian.AppendUint64(ex, uint64(e.Backend.Size()))
	ex = binary.BigEndian.AppendUint16(ex, e.flags(c.structured))
	if err := c.optReply(opt, repInfo, ex); err != nil {
		return nil, err
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		c.strict = blockSize
	}
	return e, nil
}

// splitName splits an option's data that starts with a 32-bit length and
// an export name, and holds at least tail more bytes after it, into the
// name and the rest; msg says what is wrong when they do not fit.
func splitName(data []byte, tail int) (name string, rest []byte, msg string) {
	if len(data) < 4+tail {
		return "", nil, "request too short"
	}
	nl := int64(binary.BigEndian.Uint32(data))
	if nl > int64(len(data)-4-tail) {
		return "", nil, "name length past the request"
	}
	return string(data[4 : 4+nl]), data[4+nl:], ""
}

// metaContext answers LIST_META_CONTEXT and SET_META_CONTEXT; the only
// context is base:allocation.
func (c *conn) metaContext(s *Server, opt uint32, data []byte) error {
	bad := func(msg string) error { return c.optReply(opt, repErrInvalid, []byte(msg)) }
	if opt == optSetMetaContext && !c.structured {
		return bad("SET_META_CONTEXT needs structured replies first")
	}
	name, rest, msg := splitName(data, 4)
	if msg != "" {
		return bad(msg)
	}
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < nq; i++ {
		if len(rest) < 4 {
			return bad("query count past the request")
		}
		ql := int64(binary.BigEndian.Uint32(rest))
		if ql > int64(len(rest))-4 {
			return bad("query length past the request")
		}
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	if len(rest) != 0 {
		return bad("trailing bytes after the queries")
	}
	if s.export(name) == nil {
		return c.optReply(opt, repErrUnknown, fmt.Appendf(nil, "no export named %q", name))
	}
	match := false
	for _, q := range queries {
		if q == baseAllocation || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if opt == optListMetaContext && nq == 0 {
		match = true
	}
	if opt == optSetMetaContext {
		c.metaAlloc = match
	}
	if match {
		id := uint32(0)
		if opt == optSetMetaContext {
			id = baseAllocationID
		}
		if err := c.optReply(opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), baseAllocation...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

// transmit reads requests until DISC, EOF, a broken stream or stop, runs
// them on the workers and waits for their replies.
func (c *conn) transmit() error {
	var hdr [requestHeaderLength]byte
	order := map[int64]chan struct{}{}
	var err error
	for {
		if _, rerr := io.ReadFull(c.r, hdr[:]); rerr != nil {
			if !c.stopping.Load() && !(errors.Is(rerr, io.EOF)) {
				err = fmt.Errorf("reading request: %w", rerr)
			}
			break
		}
		req, ok := parseRequest(hdr[:])
		if !ok {
			err = fmt.Errorf("bad request magic %#x", binary.BigEndian.Uint32(hdr[:4]))
			break
		}
		if req.typ == cmdDisc {
			break
		}
		// The worker slot comes before the payload is read, so a client
		// pipelining writes holds at most Workers payload buffers.
		c.workers <- struct{}{}
		var payload []byte
		if req.typ == cmdWrite {
			if req.length > MaxBlockSize {
				<-c.workers
				if _, rerr := io.CopyN(io.Discard, c.r, int64(req.length)); rerr != nil {
					err = fmt.Errorf("reading write payload: %w", rerr)
					break
				}
				c.replyError(req, errOverflow, "write larger than the maximum block size")
				continue
			}
			payload = buffers.Get(int(req.length))
			if _, rerr := io.ReadFull(c.r, payload); rerr != nil {
				buffers.Put(payload)
				<-c.workers
				err = fmt.Errorf("reading write payload: %w", rerr)
				break
			}
		}
		if e, msg := c.check(req); e != 0 {
			if payload != nil {
				buffers.Put(payload)
			}
			<-c.workers
			c.replyError(req, e, msg)
			continue
		}
		var after <-chan struct{}
		var done chan struct{}
		if req.typ == cmdWrite || req.typ == cmdWriteZeroes || req.typ == cmdTrim {
			if key, ok := c.exp.Backend.OrderKey(int64(req.offset)); ok {
				after = order[key]
				done = make(chan struct{})
				order[key] = done
			}
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			if after != nil {
				<-after
			}
			c.handle(req, payload)
			if payload != nil {
				buffers.Put(payload)
			}
			if done != nil {
				close(done)
			}
			<-c.workers
		}()
	}
	c.wg.Wait()
	c.wmu.Lock()
	werr := c.werr
	if werr == nil {
		werr = c.w.Flush()
	}
	c.wmu.Unlock()
	if err == nil && werr != nil && !errors.Is(werr, net.ErrClosed) {
		err = fmt.Errorf("writing reply: %w", werr)
	}
	return err
}

// check validates a request against the export; it returns an NBD error
// and a message for a request that must not reach the backend.
func (c *conn) check(req request) (uint32, string) {
	size := uint64(c.exp.Backend.Size())
	past := req.offset > size || uint64(req.length) > size-req.offset
	unaligned := c.strict && (req.offset%MinBlockSize != 0 || req.length%MinBlockSize != 0)
	ro := c.exp.readOnly()
	switch req.typ {
	case cmdRead:
		switch {
		case req.length > MaxBlockSize:
			return errOverflow, "read larger than the maximum block size"
		case req.length == 0:
			return errInval, "read of length 0"
		case past:
			return errInval, "read past the end of the export"
		case unaligned:
			return errInval, "read not aligned to the minimum block size"
		}
	case cmdWrite, cmdWriteZeroes:
		switch {
		case ro:
			return errPerm, "export is read-only"
		case req.length == 0:
			return errInval, "write of length 0"
		case past:
			return errNoSpc, "write past the end of the export"
		case unaligned:
			return errInval, "write not aligned to the minimum block size"
		}
	case cmdTrim:
		switch {
		case ro:
			return errPerm, "export is read-only"
		case req.length == 0:
			return errInval, "trim of length 0"
		case past:
			return errInval, "trim past the end of the export"
		case unaligned:
			return errInval, "trim not aligned to the minimum block size"
		}
	case cmdFlush:
	case cmdBlockStatus:
		switch {
		case !c.structured || !c.metaAlloc:
			return errInval, "block status without the base:allocation context"
		case req.length == 0:
			return errInval, "block status of length 0"
		case past:
			return errInval, "block status past the end of the export"
		case unaligned:
			return errInval, "block status not aligned to the minimum block size"
		}
	default:
		return errInval, fmt.Sprintf("unknown command %d", req.typ)
	}
	return 0, ""
}

// handle runs one checked request and sends its reply.
func (c *conn) handle(req request, payload []byte) {
	b := c.exp.Backend
	off, n := int64(req.offset), int64(req.length)
	var err error
	switch req.typ {
	case cmdRead:
		if c.structured {
			c.structuredRead(req)
			return
		}
		buf := buffers.Get(int(n))
		defer buffers.Put(buf)
		if err = b.ReadAt(buf, off); err == nil {
			c.reply(req, 0, buf)
			return
		}
	case cmdWrite:
		err = b.WriteAt(payload, off)
	case cmdFlush:
		err = b.Flush()
	case cmdTrim:
		err = b.Trim(off, n)
	case cmdWriteZeroes:
		err = b.WriteZeroes(off, n, req.flags&cmdFlagNoHole != 0, req.flags&cmdFlagFastZero != 0)
	case cmdBlockStatus:
		c.blockStatus(req)
		return
	}
	if err == nil && req.flags&cmdFlagFUA != 0 && req.typ != cmdFlush && req.typ != cmdRead {
		err = b.Flush()
	}
	if err != nil {
		c.replyError(req, nbdErrno(b.Errno(err)), err.Error())
		return
	}
	c.reply(req, 0, nil)
}

// structuredRead sends a read as data chunks, with holes as hole chunks
// unless the client asked for one chunk (DF).
func (c *conn) structuredRead(req request) {
	b := c.exp.Backend
	off, n := int64(req.offset), int64(req.length)
	var exts []volume.Extent
	if req.flags&cmdFlagDF == 0 {
		exts, _ = b.Map(off, n) // on error: all data
	}
	exts = clip(exts, off, n)
	if len(exts) == 0 {
		exts = []volume.Extent{{Offset: off, Length: n, Data: true}}
	}
	buf := buffers.Get(int(n))
	defer buffers.Put(buf)
	for _, e := range exts {
		if e.Zero {
			continue
		}
		if err := b.ReadAt(buf[e.Offset-off:e.Offset-off+e.Length], e.Offset); err != nil {
			c.replyError(req, nbdErrno(b.Errno(err)), err.Error())
			return
		}
	}
	c.lockReply()
	defer c.unlockReply()
	for i, e := range exts {
		var flags uint16
		if i == len(exts)-1 {
			flags = replyFlagDone
		}
		if e.Zero {
			p := binary.BigEndian.AppendUint64(nil, uint64(e.Offset))
			p = binary.BigEndian.AppendUint32(p, uint32(e.Length))
			c.chunkLocked(req.cookie, flags, replyOffsetHole, p, nil)
		} else {
			p := binary.BigEndian.AppendUint64(nil, uint64(e.Offset))
			c.chunkLocked(req.cookie, flags, replyOffsetData, p, buf[e.Offset-off:e.Offset-off+e.Length])
		}
	}
}

// clip drops empty extents and any part outside [off, off+n), so that no
// chunk or descriptor is empty or out of the request. It returns nil unless
// the extents then cover the range exactly, in order.
func clip(exts []volume.Extent, off, n int64) []volume.Extent {
	out := exts[:0:0]
	pos := off
	for _, e := range exts {
		s, end := max(e.Offset, off), min(e.Offset+e.Length, off+n)
		if s >= end {
			continue
		}
		if s != pos {
			return nil
		}
		e.Offset, e.Length = s, end-s
		out = append(out, e)
		pos = end
	}
	if pos != off+n {
		return nil
	}
	return out
}

// blockStatus answers base:allocation from the backend's map.
func (c *conn) blockStatus(req request) {
	b := c.exp.Backend
	exts, err := b.Map(int64(req.offset), int64(req.length))
	if err != nil {
		c.replyError(req, nbdErrno(b.Errno(err)), err.Error())
		return
	}
	exts = clip(exts, int64(req.offset), int64(req.length))
	if len(exts) == 0 {
		c.replyError(req, errIO, "no extents for the range")
		return
	}
	if req.flags&cmdFlagReqOne != 0 && len(exts) > 1 {
		exts = exts[:1]
	}
	p := binary.BigEndian.AppendUint32(nil, baseAllocationID)
	for _, e := range exts {
		var st uint32
		if !e.Data {
			st |= stateHole
		}
		if e.Zero {
			st |= stateZero
		}
		p = binary.BigEndian.AppendUint32(p, uint32(e.Length))
		p = binary.BigEndian.AppendUint32(p, st)
	}
	c.lockReply()
	defer c.unlockReply()
	c.chunkLocked(req.cookie, replyFlagDone, replyBlockStatus, p, nil)
}

// reply sends a simple reply.
func (c *conn) reply(req request, errno uint32, data []byte) {
	c.lockReply()
	defer c.unlockReply()
	if c.werr != nil {
		return
	}
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], simpleMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], req.cookie)
	c.write(h[:])
	c.write(data)
}

// replyError sends an error: a structured error chunk for the commands
// that need structured replies once negotiated, a simple reply otherwise.
func (c *conn) replyError(req request, errno uint32, msg string) {
	if !c.structured || (req.typ != cmdRead && req.typ != cmdBlockStatus) {
		c.reply(req, errno, nil)
		return
	}
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	p := binary.BigEndian.AppendUint32(nil, errno)
	p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
	p = append(p, msg...)
	c.lockReply()
	defer c.unlockReply()
	c.chunkLocked(req.cookie, replyFlagDone, replyError, p, nil)
}

func (c *conn) chunkLocked(cookie uint64, flags, typ uint16, p, data []byte) {
	var h [20]byte
	binary.BigEndian.PutUint32(h[0:], structuredMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint32(h[16:], uint32(len(p)+len(data)))
	c.write(h[:])
	c.write(p)
	c.write(data)
}

func (c *conn) write(b []byte) {
	if c.werr == nil && len(b) > 0 {
		_, c.werr = c.w.Write(b)
		c.brokenLocked()
	}
}

// lockReply takes the reply writer for one reply. unlockReply sends what
// is buffered unless another reply is waiting for the writer: the last of
// a burst sends them all in one write, and no reply waits behind a
// request still being served.
func (c *conn) lockReply() {
	c.replying.Add(1)
	c.wmu.Lock()
}

func (c *conn) unlockReply() {
	if c.replying.Add(-1) == 0 {
		c.flushLocked()
	}
	c.wmu.Unlock()
}

// flushLocked sends the buffered replies.
func (c *conn) flushLocked() {
	if c.werr == nil {
		c.werr = c.w.Flush()
		c.brokenLocked()
	}
}

// brokenLocked closes the connection after a failed reply write, so that
// the reader stops too.
func (c *conn) brokenLocked() {
	if c.werr != nil {
		c.nc.Close()
	}
}
