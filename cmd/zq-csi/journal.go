package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/zq-csi/zq-csi/image"
)

// writeOptions are the options of every read-write open of an image by a
// zq-csi command: a redo journal (image.OpenOptions.JournalDir) carries the
// writes a command acknowledged across its death (kill -9 of `attach`, whose
// device a new `attach --recover` takes over), and the next command that
// opens the image replays it. All commands use the same directory, so
// whichever opens the image next finds what a killed one left:
// $ZQ_CSI_JOURNAL_DIR, else /run/zq-csi/journal for root, else under
// $XDG_RUNTIME_DIR, else under the temporary directory (per user).
func writeOptions() image.OpenOptions {
	return image.OpenOptions{JournalDir: journalDir()}
}

func journalDir() string {
	if d := os.Getenv("ZQ_CSI_JOURNAL_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/run/zq-csi/journal"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "zq-csi", "journal")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("zq-csi-%d", os.Geteuid()), "journal")
}
