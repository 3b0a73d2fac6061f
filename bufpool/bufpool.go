// Package bufpool hands out the frontends' request buffers (ublk, nbd) by
// size class, so that serving a request allocates nothing.
package bufpool

import (
	"math/bits"
	"sync"
)

// Pool hands out buffers by size class, powers of two from 4 KiB, so the
// memory a frontend holds follows the sizes of its requests rather than
// the largest one it allows. The zero value is ready to use.
type Pool struct {
	classes [maxBufferClass + 1]sync.Pool
}

const (
	minBufferShift = 12
	maxBufferClass = 25 - minBufferShift // 32 MiB: the kernel's largest request, NBD's largest block
)

// MaxSize is the largest buffer a Pool hands out.
const MaxSize = 1 << (maxBufferClass + minBufferShift)

func bufferClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// Get returns a buffer of n bytes (n at most MaxSize), not zeroed.
func (p *Pool) Get(n int) []byte {
	c := bufferClass(n)
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+minBufferShift))
}

// Put gives back a buffer from Get, for another Get.
func (p *Pool) Put(b []byte) {
	b = b[:cap(b)]
	p.classes[bufferClass(len(b))].Put(&b)
}
