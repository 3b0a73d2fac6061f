package bufpool

import "testing"

func TestSizeClasses(t *testing.T) {
	var p Pool
	for _, tc := range []struct{ n, cap int }{
		{1, 4096}, {4096, 4096}, {4097, 8192}, {512 << 10, 512 << 10}, {(512 << 10) + 512, 1 << 20}, {MaxSize, MaxSize},
	} {
		b := p.Get(tc.n)
		if len(b) != tc.n || cap(b) != tc.cap {
			t.Errorf("Get(%d): len %d cap %d, want cap %d", tc.n, len(b), cap(b), tc.cap)
		}
		p.Put(b)
	}
}
