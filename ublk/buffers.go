package ublk

import (
	"math/bits"
	"sync"
)

// bufferPool hands out request buffers by size class, powers of two from
// 4 KiB, so the memory a device holds follows the sizes of its requests
// rather than the largest one it allows.
type bufferPool struct {
	classes [maxBufferClass + 1]sync.Pool
}

const (
	minBufferShift = 12
	maxBufferClass = 25 - minBufferShift // 32 MiB, the kernel's largest request
)

func bufferClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// get returns a buffer of n bytes (n at most 32 MiB).
func (p *bufferPool) get(n int) []byte {
	c := bufferClass(n)
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+minBufferShift))
}

// put returns a buffer from get.
func (p *bufferPool) put(b []byte) {
	b = b[:cap(b)]
	p.classes[bufferClass(len(b))].Put(&b)
}
