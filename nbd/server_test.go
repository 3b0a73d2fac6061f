package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
)

const testSize = 16 << 20

func plainExport(t testing.TB) (*Export, *image.Image) {
	img := newImage(t, testSize)
	return &Export{Name: "disk", Description: "test disk", Backend: volume.Plain{Img: img}}, img
}

func TestHandshakeExportNameSendsSizeFlagsAndZeroes(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			e, _ := plainExport(t)
			cl, _, done := serve(t, e)
			flags := uint32(clientFixedNewstyle)
			if noZeroes {
				flags |= clientNoZeroes
			}
			cl.hello(flags)
			cl.option(optExportName, []byte("disk"))
			b := cl.read(10)
			if size := binary.BigEndian.Uint64(b); size != testSize {
				t.Fatalf("size %d", size)
			}
			// No DF: it needs structured replies, not negotiated here.
			want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes |
				tflagCanMultiConn | tflagSendFastZero)
			if f := binary.BigEndian.Uint16(b[8:]); f != want {
				t.Fatalf("flags %#x, want %#x", f, want)
			}
			if !noZeroes && !bytes.Equal(cl.read(124), make([]byte, 124)) {
				t.Fatal("no 124 zero bytes")
			}
			// Transmission works right after the reply.
			if _, errno := cl.readData(1, 0, 512); errno != 0 {
				t.Fatalf("read: errno %d", errno)
			}
			cl.request(cmdDisc, 0, 2, 0, 0, nil)
			if err := waitDone(t, done); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestHandshakeExportNameUnknownClosesTheConnection(t *testing.T) {
	e, _ := plainExport(t)
	cl, _, done := serve(t, e)
	cl.hello(clientFixedNewstyle)
	cl.option(optExportName, []byte("nope"))
	if err := waitDone(t, done); err == nil || !strings.Contains(err.Error(), "unknown export") {
		t.Fatalf("ServeConn: %v", err)
	}
	if _, err := cl.r.ReadByte(); err != io.EOF {
		t.Fatalf("connection still open: %v", err)
	}
}

func TestHandshakeInfoThenGoReportExportAndBlockSizes(t *testing.T) {
	e, _ := plainExport(t)
	e.ReadOnly = true
	cl, _, _ := serve(t, e)
	cl.hello(clientFixedNewstyle | clientNoZeroes)
	for _, opt := range []uint32{optInfo, optGo} {
		cl.option(opt, goData("disk", infoName, infoDescription, infoBlockSize))
		infos := map[uint16][]byte{}
		for _, r := range cl.replies(opt) {
			if r.typ == repInfo {
				infos[binary.BigEndian.Uint16(r.data)] = r.data[2:]
			} else if r.typ != repAck {
				t.Fatalf("option %d: reply %#x", opt, r.typ)
			}
		}
		ex := infos[infoExport]
		if len(ex) != 10 || binary.BigEndian.Uint64(ex) != testSize {
			t.Fatalf("NBD_INFO_EXPORT % x", ex)
		}
		if f := binary.BigEndian.Uint16(ex[8:]); f&tflagReadOnly == 0 || f&tflagSendTrim != 0 {
			t.Fatalf("read-only export flags %#x", f)
		}
		bs := infos[infoBlockSize]
		if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 512 || binary.BigEndian.Uint32(bs[4:]) != 4096 ||
			binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
			t.Fatalf("NBD_INFO_BLOCK_SIZE % x", bs)
		}
		if string(infos[infoName]) != "disk" || string(infos[infoDescription]) != "test disk" {
			t.Fatalf("name %q description %q", infos[infoName], infos[infoDescription])
		}
	}
	// After GO: transmission; writes are refused on the read-only export.
	cl.request(cmdWrite, 0, 7, 0, 512, make([]byte, 512))
	if errno, cookie := cl.simple(); errno != errPerm || cookie != 7 {
		t.Fatalf("write on read-only: errno %d cookie %d", errno, cookie)
	}
}

func TestHandshakeGoUnknownExportIsErrUnknownAndNegotiationContinues(t *testing.T) {
	e, _ := plainExport(t)
	cl, _, _ := serve(t, e)
	cl.hello(clientFixedNewstyle | clientNoZeroes)
	cl.option(optGo, goData("other"))
	if r := cl.replies(optGo); r[0].typ != repErrUnknown {
		t.Fatalf("reply %#x, want NBD_REP_ERR_UNKNOWN", r[0].typ)
	}
	cl.option(optGo, []byte{0, 0, 0, 9}) // name length past the data
	if r := cl.replies(optGo); r[0].typ != repErrInvalid {
		t.Fatalf("reply %#x, want NBD_REP_ERR_INVALID", r[0].typ)
	}
	cl.option(optGo, goData("disk"))
	if r := cl.replies(optGo); r[len(r)-1].typ != repAck {
		t.Fatalf("GO: %+v", r)
	}
}

func TestHandshakeListNamesEveryExport(t *testing.T) {
	e1, _ := plainExport(t)
	e2, _ := plainExport(t)
	e2.Name = "second"
	cl, _, _ := serve(t, e1, e2)
	cl.hello(clientFixedNewstyle)
	cl.option(optList, nil)
	var names []string
	for _, r := range cl.replies(optList) {
		if r.typ == repServer {
			n := binary.BigEndian.Uint32(r.data)
			names = append(names, string(r.data[4:4+n]))
		}
	}
	if strings.Join(names, ",") != "disk,second" {
		t.Fatalf("LIST: %q", names)
	}
	cl.option(optList, []byte("x"))
	if r := cl.replies(optList); r[0].typ != repErrInvalid {
		t.Fatalf("LIST with data: %#x", r[0].typ)
	}
}

func TestHandshakeAbortIsAckedAndEndsTheConnection(t *testing.T) {
	e, _ := plainExport(t)
	cl, _, done := serve(t, e)
	cl.hello(clientFixedNewstyle)
	cl.option(optAbort, nil)
	if r := cl.replies(optAbort); r[0].typ != repAck {
		t.Fatalf("ABORT reply %#x", r[0].typ)
	}
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ABORT is an orderly end: %v", err)
	}
}

func TestHandshakeUnknownOptionIsUnsupported(t *testing.T) {
	e, _ := plainExport(t)
	cl, _, _ := serve(t, e)
	cl.hello(clientFixedNewstyle)
	for _, opt := range []uint32{optStartTLS, 11, 99} {
		cl.option(opt, []byte("abc"))
		if r := cl.replies(opt); r[0].typ != repErrUnsup {
			t.Fatalf("option %d: reply %#x, want NBD_REP_ERR_UNSUP", opt, r[0].typ)
		}
	}
	cl.option(optSetMetaContext, metaData("disk", baseAllocation))
	if r := cl.replies(optSetMetaContext); r[0].typ != repErrInvalid {
		t.Fatalf("SET_META_CONTEXT before STRUCTURED_REPLY: %#x", r[0].typ)
	}
	cl.option(optListMetaContext, metaData("disk"))
	r := cl.replies(optListMetaContext)
	if len(r) != 2 || r[0].typ != repMetaContext || string(r[0].data[4:]) != baseAllocation {
		t.Fatalf("LIST_META_CONTEXT: %+v", r)
	}
	cl.option(optGo, goData("disk"))
	if r := cl.replies(optGo); r[len(r)-1].typ != repAck {
		t.Fatalf("GO after the errors: %+v", r)
	}
}

func TestHandshakeBadOptionMagicClosesTheConnection(t *testing.T) {
	e, _ := plainExport(t)
	cl, _, done := serve(t, e)
	cl.hello(clientFixedNewstyle)
	cl.write(make([]byte, 16))
	if err := waitDone(t, done); err == nil {
		t.Fatal("bad option magic accepted")
	}
}

func TestSimpleReadReturnsWrittenData(t *testing.T) {
	e, img := plainExport(t)
	want := bytes.Repeat([]byte("zq"), 4096)
	if _, err := img.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	cl, _, _ := serve(t, e)
	cl.negotiate("disk", false)
	got, errno := cl.readData(5, 1<<20, uint32(len(want)))
	if errno != 0 || !bytes.Equal(got, want) {
		t.Fatalf("read: errno %d, data equal %v", errno, bytes.Equal(got, want))
	}
}

func TestStructuredReadSendsHolesForZeroExtents(t *testing.T) {
	e, img := plainExport(t)
	data := bytes.Repeat([]byte{0x5a}, 64<<10)
	if _, err := img.WriteAt(data, 128<<10); err != nil {
		t.Fatal(err)
	}
	cl, _, _ := serve(t, e)
	cl.negotiate("disk", true)
	cl.request(cmdRead, 0, 9, 64<<10, 256<<10, nil)
	errno, _, chunks := cl.reply(0)
	if errno != 0 {
		t.Fatalf("errno %d", errno)
	}
	var kinds []string
	for _, ch := range chunks {
		off := binary.BigEndian.Uint64(ch.payload)
		switch ch.typ {
		case replyOffsetHole:
			kinds = append(kinds, fmt.Sprintf("hole@%d+%d", off>>10, binary.BigEndian.Uint32(ch.payload[8:])>>10))
		case replyOffsetData:
			if !bytes.Equal(ch.payload[8:], data) {
				t.Fatal("data chunk differs from what was written")
			}
			kinds = append(kinds, fmt.Sprintf("data@%d+%d", off>>10, (len(ch.payload)-8)>>10))
		}
	}
	if got := strings.Join(kinds, " "); got != "hole@64+64 data@128+64 hole@192+128" {
		t.Fatalf("chunks: %s", got)
	}
	if chunks[len(chunks)-1].flags&replyFlagDone == 0 {
		t.Fatal("last chunk without DONE")
	}
	// DF: one data chunk for the whole range.
	cl.request(cmdRead, cmdFlagDF, 10, 64<<10, 256<<10, nil)
	if _, _, chunks := cl.reply(0); len(chunks) != 1 || chunks[0].typ != replyOffsetData || len(chunks[0].payload) != 8+256<<10 {
		t.Fatalf("DF read: %d chunks", len(chunks))
	}
}

func TestBlockStatusReportsBaseAllocation(t *testing.T) {
	e, img := plainExport(t)
	if _, err := img.WriteAt(make([]byte, 64<<10), 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(256<<10, 64<<10, false); err != nil {
		t.Fatal(err)
	}
	cl, _, _ := serve(t, e)
	cl.negotiate("disk", true)
	for _, reqOne := range []bool{false, true} {
		var flags uint16
		if reqOne {
			flags = cmdFlagReqOne
		}
		cl.request(cmdBlockStatus, flags, 3, 0, 1<<20, nil)
		errno, _, chunks := cl.reply(0)
		if errno != 0 || len(chunks) != 1 || chunks[0].typ != replyBlockStatus {
			t.Fatalf("errno %d chunks %+v", errno, chunks)
		}
		p := chunks[0].payload
		if binary.BigEndian.Uint32(p) != baseAllocationID {
			t.Fatal("wrong context id")
		}
		var got []string
		for p = p[4:]; len(p) >= 8; p = p[8:] {
			got = append(got, fmt.Sprintf("%d:%d", binary.BigEndian.Uint32(p)>>10, binary.BigEndian.Uint32(p[4:])))
		}
		exts, _ := img.Map(0, 1<<20)
		var want []string
		for _, x := range exts {
			st := 0
			if !x.Data {
				st |= stateHole
			}
			if x.Zero {
				st |= stateZero
			}
			want = append(want, fmt.Sprintf("%d:%d", x.Length>>10, st))
		}
		if reqOne {
			want = want[:1]
		}
		if strings.Join(got, " ") != strings.Join(want, " ") || got[0] != "64:3" {
			t.Fatalf("reqOne=%v: block status %v, image map %v", reqOne, got, want)
		}
	}
}

// TestBadRequestsGetErrorsAndTheConnectionStaysUsable sends every kind of
// refused request, each followed by a good read on the same connection.
func TestBadRequestsGetErrorsAndTheConnectionStaysUsable(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			e, img := plainExport(t)
			cl, _, _ := serve(t, e)
			cl.negotiate("disk", structured)
			big := uint32(MaxBlockSize + 512)
			cases := []struct {
				name    string
				typ     uint16
				off     uint64
				length  uint32
				payload []byte
				want    uint32
			}{
				{"read past the end", cmdRead, testSize - 512, 1024, nil, errInval},
				{"read offset overflows", cmdRead, 1<<64 - 512, 1024, nil, errInval},
				{"read unaligned", cmdRead, 100, 512, nil, errInval},
				{"read oversized", cmdRead, 0, big, nil, errOverflow},
				{"read of nothing", cmdRead, 0, 0, nil, errInval},
				{"write past the end", cmdWrite, testSize, 512, make([]byte, 512), errNoSpc},
				{"write unaligned", cmdWrite, 0, 100, make([]byte, 100), errInval},
				{"write oversized", cmdWrite, 0, big, make([]byte, big), errOverflow},
				{"trim past the end", cmdTrim, testSize - 512, 4096, nil, errInval},
				{"write zeroes past the end", cmdWriteZeroes, testSize, 512, nil, errNoSpc},
				{"block status past the end", cmdBlockStatus, testSize, 512, nil, errInval},
				{"unknown command", 42, 0, 512, nil, errInval},
				{"cache (not advertised)", 5, 0, 512, nil, errInval},
			}
			if !structured {
				cases = append(cases, struct {
					name    string
					typ     uint16
					off     uint64
					length  uint32
					payload []byte
					want    uint32
				}{"block status without a context", cmdBlockStatus, 0, 512, nil, errInval})
			}
			for i, c := range cases {
				cookie := uint64(100 + i)
				cl.request(c.typ, 0, cookie, c.off, c.length, c.payload)
				errno, got, _ := cl.reply(0)
				if errno != c.want || got != cookie {
					t.Errorf("%s: errno %d cookie %d, want errno %d cookie %d", c.name, errno, got, c.want, cookie)
				}
				if _, errno := cl.readData(cookie+1000, 0, 4096); errno != 0 {
					t.Fatalf("after %s: read failed with %d", c.name, errno)
				}
			}
			// Nothing was written anywhere.
			if exts, _ := img.Map(0, testSize); len(exts) != 1 || exts[0].Data {
				t.Fatalf("image changed: %+v", exts)
			}
		})
	}
}

func TestBadRequestMagicClosesTheConnection(t *testing.T) {
	e, _ := plainExport(t)
	cl, _, done := serve(t, e)
	cl.negotiate("disk", false)
	cl.write(make([]byte, requestHeaderLength))
	if err := waitDone(t, done); err == nil || !strings.Contains(err.Error(), "magic") {
		t.Fatalf("ServeConn: %v", err)
	}
}

func TestTruncatedRequestClosesTheConnection(t *testing.T) {
	e, img := plainExport(t)
	cl, _, done := serve(t, e)
	cl.negotiate("disk", false)
	cl.request(cmdWrite, 0, 1, 0, 4096, make([]byte, 100)) // payload cut short
	cl.c.(interface{ CloseWrite() error }).CloseWrite()
	if err := waitDone(t, done); err == nil {
		t.Fatal("truncated write was no error")
	}
	if exts, _ := img.Map(0, testSize); len(exts) != 1 || exts[0].Data {
		t.Fatalf("truncated write changed the image: %+v", exts)
	}
}

func TestWriteFlushTrimAndWriteZeroesReachTheImage(t *testing.T) {
	e, img := plainExport(t)
	cl, _, _ := serve(t, e)
	cl.negotiate("disk", true)
	data := bytes.Repeat([]byte{0xc3}, 1<<20)
	steps := []struct {
		typ, flags uint16
		off        uint64
		length     uint32
		payload    []byte
	}{
		{cmdWrite, cmdFlagFUA, 0, 1 << 20, data},
		{cmdWrite, 0, 1 << 20, 1 << 20, data},
		{cmdWrite, 0, 2 << 20, 1 << 20, data},
		{cmdFlush, 0, 0, 0, nil},
		{cmdTrim, 0, 1 << 20, 1 << 20, nil},
		{cmdWriteZeroes, cmdFlagNoHole | cmdFlagFUA, 2 << 20, 1 << 20, nil},
		{cmdWriteZeroes, cmdFlagFastZero, 3 << 20, 1 << 20, nil},
	}
	for i, s := range steps {
		cl.request(s.typ, s.flags, uint64(i), s.off, s.length, s.payload)
		if errno, _, _ := cl.reply(0); errno != 0 {
			t.Fatalf("step %d: errno %d", i, errno)
		}
	}
	got := make([]byte, 3<<20)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:1<<20], data) || !bytes.Equal(got[1<<20:], make([]byte, 2<<20)) {
		t.Fatal("image content differs")
	}
	exts, _ := img.Map(0, 3<<20)
	if len(exts) != 2 || !exts[0].Data || exts[1].Data || !exts[1].Zero {
		t.Fatalf("map after write/trim/zero: %+v", exts)
	}
}

func TestPipelinedRequestsAreAllAnswered(t *testing.T) {
	e, img := plainExport(t)
	cl, _, _ := serve(t, e)
	cl.negotiate("disk", false)
	const n = 200
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // send everything at once, as a client with a deep queue
		defer wg.Done()
		for i := 0; i < n; i++ {
			cl.request(cmdWrite, 0, uint64(i), uint64(i)*4096, 4096, bytes.Repeat([]byte{byte(i)}, 4096))
		}
	}()
	seen := map[uint64]bool{}
	for i := 0; i < n; i++ {
		errno, cookie := cl.simple()
		if errno != 0 || seen[cookie] {
			t.Fatalf("reply %d: errno %d cookie %d (seen %v)", i, errno, cookie, seen[cookie])
		}
		seen[cookie] = true
	}
	wg.Wait()
	for i := 0; i < n; i++ {
		b := make([]byte, 4096)
		img.ReadAt(b, int64(i)*4096)
		if !bytes.Equal(b, bytes.Repeat([]byte{byte(i)}, 4096)) {
			t.Fatalf("block %d differs", i)
		}
	}
}

func TestDiscAnswersRequestsSentBeforeIt(t *testing.T) {
	e, img := plainExport(t)
	cl, _, done := serve(t, e)
	cl.negotiate("disk", false)
	for i := 0; i < 8; i++ {
		cl.request(cmdWrite, 0, uint64(i), uint64(i)<<20, 1<<20, bytes.Repeat([]byte{1}, 1<<20))
	}
	cl.request(cmdDisc, 0, 99, 0, 0, nil)
	for i := 0; i < 8; i++ {
		if errno, _ := cl.simple(); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	if err := waitDone(t, done); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.r.ReadByte(); err != io.EOF {
		t.Fatalf("after DISC: %v, want EOF", err)
	}
	if exts, _ := img.Map(0, 8<<20); len(exts) != 1 || !exts[0].Data {
		t.Fatalf("map %+v", exts)
	}
}

func TestShutdownFinishesInFlightRequestsThenCloses(t *testing.T) {
	e, _ := plainExport(t)
	cl, s, done := serve(t, e)
	cl.negotiate("disk", false)
	for i := 0; i < 4; i++ {
		cl.request(cmdWrite, cmdFlagFUA, uint64(i), uint64(i)<<20, 1<<20, make([]byte, 1<<20))
	}
	for i := 0; i < 4; i++ {
		if errno, _ := cl.simple(); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := waitDone(t, done); err != nil {
		t.Fatal(err)
	}
}

// TestServeTransmissionSpeaksSimpleRepliesWithoutHandshake is the
// kernel's view: requests straight away, simple replies only.
func TestServeTransmissionSpeaksSimpleRepliesWithoutHandshake(t *testing.T) {
	e, img := plainExport(t)
	a, b := socketPair(t)
	done := make(chan error, 1)
	go func() { done <- ServeTransmission(a, e) }()
	cl := newClient(t, b)
	data := bytes.Repeat([]byte{0x42}, 64<<10)
	cl.request(cmdWrite, cmdFlagFUA, 1, 64<<10, 64<<10, data)
	if errno, cookie := cl.simple(); errno != 0 || cookie != 1 {
		t.Fatalf("write: errno %d cookie %d", errno, cookie)
	}
	got, errno := cl.readData(2, 64<<10, 64<<10)
	if errno != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: errno %d", errno)
	}
	cl.request(cmdRead, 0, 3, testSize, 512, nil)
	if errno, _ := cl.simple(); errno != errInval {
		t.Fatalf("read past end: errno %d", errno)
	}
	cl.request(cmdTrim, 0, 4, 64<<10, 64<<10, nil)
	if errno, _ := cl.simple(); errno != 0 {
		t.Fatalf("trim: errno %d", errno)
	}
	cl.request(cmdFlush, 0, 5, 0, 0, nil)
	if errno, _ := cl.simple(); errno != 0 {
		t.Fatalf("flush: errno %d", errno)
	}
	cl.request(cmdDisc, 0, 6, 0, 0, nil)
	if err := waitDone(t, done); err != nil {
		t.Fatal(err)
	}
	if exts, _ := img.Map(0, testSize); len(exts) != 1 {
		t.Fatalf("trim left data: %+v", exts)
	}
}

// TestSilentClientLosesItsSlotAfterTheHandshakeTimeout: with one slot, a
// client that connects and says nothing is dropped, and the next one is
// served.
func TestSilentClientLosesItsSlotAfterTheHandshakeTimeout(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	exp, _ := plainExport(t)
	s := &Server{Exports: []*Export{exp}, MaxConns: 1, HandshakeTimeout: 200 * time.Millisecond}
	go s.Serve(l)
	defer s.Shutdown(context.Background())
	silent, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	next, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	next.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hello [18]byte
	if _, err := io.ReadFull(next, hello[:]); err != nil {
		t.Fatalf("the second client got no hello while the first stayed silent: %v", err)
	}
	if binary.BigEndian.Uint64(hello[:]) != nbdMagic {
		t.Fatalf("hello %x", hello)
	}
}
