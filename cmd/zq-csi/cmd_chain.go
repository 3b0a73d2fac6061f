package main

// zq-csi image commit and rebase: qemu-img's verbs on backing chains.

import (
	"flag"
	"fmt"
	"io"

	"github.com/zq-csi/zq-csi/image"
)

func commitUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi image commit [-f qcow2] [-d] [-p] [-q] FILE

Write what the overlay FILE holds into its backing file, as qemu-img commit
does: its data, the ranges it reads as zeros, its size if larger, and a
zoned overlay's write pointers (zone limits and injected zone conditions
stay each image's own). Every other overlay of that backing file reads the
merged contents too. FILE is emptied afterwards unless -d is given; it
reads the same either way, and a crash or an error midway leaves it
reading as before (commit again to finish). -p prints the progress.
`)
}

func runImageCommit(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	keep := fs.Bool("d", false, "do not empty FILE after the commit")
	progress := fs.Bool("p", false, "show progress")
	quiet := fs.Bool("q", false, "print nothing on success")
	file, code, done := e.parseFileOperand(fs, args, commitUsage)
	if done {
		return code
	}
	p := newProgress(e.stdout, *progress)
	opts := image.MergeOptions{KeepOverlay: *keep, ChainOptions: image.ChainOptions{JournalDir: journalDir(), Progress: p.update}}
	if err := image.Merge(file, opts); err != nil {
		return e.fail(err, nil)
	}
	p.finish()
	if !*quiet {
		fmt.Fprintln(e.stdout, "Image committed.")
	}
	return exitOK
}

func rebaseUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi image rebase [-f qcow2] [-u] [-p] [-q] -b BACKING [-F qcow2] FILE

Make the overlay FILE read through BACKING (a qcow2 image; "" for none) in
place of its backing file, as qemu-img rebase does. First FILE gets what
it reads through its old chain wherever BACKING reads otherwise, so that
it reads as before; with -u (unsafe) only the name changes, for a backing
file that moved and whose contents are the old one's. BACKING is recorded
as given and, unless absolute, found relative to FILE's directory. A
zoned FILE needs a zoned BACKING of the same zone size, capacity and
conventional zones. A crash midway leaves FILE over one chain or the
other, reading the same. -p prints the progress.
`)
}

func runImageRebase(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	backing := fs.String("b", "", `new backing file ("" for none)`)
	backingFormat := fs.String("F", "qcow2", "backing file format (only qcow2)")
	unsafe := fs.Bool("u", false, "only change the backing file's name")
	progress := fs.Bool("p", false, "show progress")
	fs.Bool("q", false, "print nothing on success")
	file, code, done := e.parseFileOperand(fs, args, rebaseUsage)
	if done {
		return code
	}
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == "b" })
	if !given {
		return e.fail(usagef(`missing -b BACKING (-b "" for none)`), rebaseUsage)
	}
	if err := checkFormat(*backingFormat); err != nil {
		return e.fail(usagef("-F: %v", err), rebaseUsage)
	}
	p := newProgress(e.stdout, *progress && !*unsafe)
	opts := image.RebaseOptions{Unsafe: *unsafe, ChainOptions: image.ChainOptions{JournalDir: journalDir(), Progress: p.update}}
	if err := image.Rebase(file, *backing, opts); err != nil {
		return e.fail(err, nil)
	}
	p.finish()
	return exitOK
}

// progress prints qemu-img's progress line, "    (42.00/100%)", as work
// goes on: a nil *progress prints nothing.
type progress struct {
	w     io.Writer
	shown int64 // the progress last printed, in hundredths of a percent
}

func newProgress(w io.Writer, on bool) *progress {
	if !on {
		return nil
	}
	return &progress{w: w, shown: -1}
}

func (p *progress) update(done, total int64) {
	if p == nil {
		return
	}
	n := int64(10000)
	if total > 0 {
		n = min(10000, done*10000/total)
	}
	if n != p.shown {
		fmt.Fprintf(p.w, "    (%d.%02d/100%%)\r", n/100, n%100)
		p.shown = n
	}
}

func (p *progress) finish() {
	if p != nil {
		fmt.Fprintf(p.w, "    (100.00/100%%)\n")
	}
}
