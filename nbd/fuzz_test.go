package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
)

// memBackend is a volume.Backend in memory that reports any call reaching
// outside the export.
type memBackend struct {
	mu   sync.Mutex
	data []byte
	bad  []string
}

func (m *memBackend) check(op string, off, n int64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || n < 0 || off+n > int64(len(m.data)) {
		m.bad = append(m.bad, fmt.Sprintf("%s at %#x+%#x outside the export", op, off, n))
		return false
	}
	return true
}

func (m *memBackend) Size() int64         { return int64(len(m.data)) }
func (m *memBackend) ReadOnly() bool      { return false }
func (m *memBackend) Zones() volume.Zones { return nil }
func (m *memBackend) ReadAt(p []byte, off int64) error {
	if !m.check("read", off, int64(len(p))) {
		return syscall.EINVAL
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}
func (m *memBackend) WriteAt(p []byte, off int64) error {
	if !m.check("write", off, int64(len(p))) {
		return syscall.EINVAL
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}
func (m *memBackend) Flush() error { return nil }
func (m *memBackend) Trim(off, n int64) error {
	return m.WriteZeroes(off, n, false, false)
}
func (m *memBackend) WriteZeroes(off, n int64, _, _ bool) error {
	if !m.check("zero", off, n) {
		return syscall.EINVAL
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}
func (m *memBackend) Map(off, n int64) ([]image.Extent, error) {
	if !m.check("map", off, n) {
		return nil, syscall.EINVAL
	}
	half := n / 2
	return []image.Extent{{Offset: off, Length: half, Data: true}, {Offset: off + half, Length: n - half, Zero: true}}, nil
}
func (m *memBackend) Errno(err error) syscall.Errno    { return syscall.EIO }
func (m *memBackend) OrderKey(off int64) (int64, bool) { return off >> 16, true }

func req(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 1)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func opt(o uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, o)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// FuzzServerRequestStream feeds arbitrary bytes to a server, after a valid
// handshake (structured or not) or as the handshake itself: the server
// must not panic, must end when the stream ends, and must never call the
// backend outside the export.
func FuzzServerRequestStream(f *testing.F) {
	const size = 1 << 20
	f.Add(byte(0), req(cmdWrite, cmdFlagFUA, 0, 512, make([]byte, 512)))
	f.Add(byte(1), append(req(cmdRead, 0, size-512, 1024, nil), req(cmdBlockStatus, cmdFlagReqOne, 0, 4096, nil)...))
	f.Add(byte(1), req(cmdWriteZeroes, cmdFlagFastZero|cmdFlagNoHole, 4096, 4096, nil))
	f.Add(byte(0), req(cmdTrim, 0, 1<<63, 1<<31, nil))
	f.Add(byte(0), req(cmdWrite, 0, size, 1<<25, nil))
	f.Add(byte(2), append(binary.BigEndian.AppendUint32(nil, 3), opt(optGo, goData("", infoBlockSize))...))
	f.Add(byte(2), append(binary.BigEndian.AppendUint32(nil, 1), opt(optSetMetaContext, metaData("", "base:", "x"))...))
	f.Add(byte(2), append(binary.BigEndian.AppendUint32(nil, 1), opt(optExportName, nil)...))
	f.Fuzz(func(t *testing.T, mode byte, stream []byte) {
		m := &memBackend{data: make([]byte, size)}
		a, b := socketPair(t)
		defer b.Close()
		a.SetDeadline(time.Now().Add(5 * time.Second))
		s := &Server{Exports: []*Export{{Backend: m}}}
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(a) }()
		cl := newClient(t, b)
		drained := make(chan struct{})
		if mode%3 != 2 {
			cl.negotiate("", mode%3 == 1)
		}
		go func() { io.Copy(io.Discard, cl.r); close(drained) }()
		b.Write(stream)
		b.(interface{ CloseWrite() error }).CloseWrite()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server did not end after the stream ended")
		}
		b.Close()
		<-drained
		for _, msg := range m.bad {
			t.Error(msg)
		}
	})
}
