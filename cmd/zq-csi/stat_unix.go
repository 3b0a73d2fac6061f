//go:build unix

package main

import (
	"os"
	"syscall"
)

// allocatedBytes is the space a file takes on disk (st_blocks * 512).
func allocatedBytes(fi os.FileInfo) (int64, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int64(st.Blocks) * 512, true
}
