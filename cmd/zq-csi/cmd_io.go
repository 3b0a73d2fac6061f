package main

// zq-csi io: qemu-io's commands and output on one open image. One
// process is one device session: the image is opened once, every -c
// command runs against it in order, and it is closed at the end. Like
// qemu-io, a failed command does not stop the next ones, but the process
// then exits 1.
//
// On a zoned image the session serves it through its zone model, and
// reads, writes and the zone commands (cmd_io_zone.go) go through it: the
// zone rules apply, and the open conditions of zones last as long as the
// session, as in qemu-io. A failed request prints qemu-io's line on
// stdout ("write failed: Invalid argument") and the cause on stderr.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
)

// maxIOBytes is qemu-io's limit for one read or write with a data buffer
// (BDRV_REQUEST_MAX_BYTES).
const maxIOBytes = 2147483136

// ioChunk bounds the buffer of one read or write: longer requests are
// split, so memory stays small whatever the length.
const ioChunk = 4 << 20

// defaultWritePattern is what `write` writes without -P, as in qemu-io.
const defaultWritePattern = 0xcd

// ioSession is one open image and where the commands print.
type ioSession struct {
	vol   *volume.Volume // the image: its blocks through the Backend
	zones volume.Zones   // vol.Zones(): nil for a plain image
	out   io.Writer      // command output (stdout)
	errw  io.Writer      // error messages (stderr)
	quit  bool
}

// ioCommand is one qemu-io command.
type ioCommand struct {
	name     string
	alias    string
	opts     string // getopt letters, ':' after a letter taking an argument
	synopsis string
	minArgs  int
	maxArgs  int // -1: no limit
	help     string
	run      func(s *ioSession, opts []opt, operands []string) error
}

// ioCommands is the command table. The zone commands' run functions are
// in cmd_io_zone.go.
var ioCommands []*ioCommand

func init() {
	ioCommands = []*ioCommand{
		{name: "read", alias: "r", opts: "P:s:l:qv", synopsis: "[-qv] [-P pattern [-s off] [-l len]] off len",
			minArgs: 2, maxArgs: 2, run: ioRead,
			help: "read len bytes at off; -P verifies that every byte equals pattern (or the -s/-l part of the range), -v dumps the data, -q prints no summary"},
		{name: "write", alias: "w", opts: "P:zufq", synopsis: "[-fqu] [-P pattern | -z] off len",
			minArgs: 2, maxArgs: 2, run: ioWrite,
			help: "write len bytes at off filled with pattern (default 0xcd); -z writes zeroes, -u with -z may unmap, -f flushes after the write (FUA), -q prints no summary"},
		{name: "discard", alias: "d", opts: "q", synopsis: "[-q] off len",
			minArgs: 2, maxArgs: 2, run: ioDiscard,
			help: "discard len bytes at off: they read as zeroes and their clusters are freed (on a zoned image: conventional zones only)"},
		{name: "flush", alias: "f", synopsis: "", run: ioFlush,
			help: "write data, metadata and refcounts to stable storage"},
		{name: "map", synopsis: "", run: ioMap,
			help: "list the allocated and unallocated ranges of the disk"},
		{name: "length", alias: "l", synopsis: "", run: ioLength,
			help: "print the virtual size"},
		{name: "zone_report", alias: "zrp", synopsis: "off nr",
			minArgs: 2, maxArgs: 2, run: ioZoneReport,
			help: "report nr zones from the zone holding off: start, len, cap and wptr in 512-byte sectors, zcond and type"},
		{name: "zone_open", alias: "zo", synopsis: "off len",
			minArgs: 2, maxArgs: 2, run: ioZoneMgmt("zone open", volume.Zones.Open),
			help: "explicitly open the zones in [off, off+len)"},
		{name: "zone_close", alias: "zc", synopsis: "off len",
			minArgs: 2, maxArgs: 2, run: ioZoneMgmt("zone close", volume.Zones.Close),
			help: "close the open zones in [off, off+len)"},
		{name: "zone_finish", alias: "zf", synopsis: "off len",
			minArgs: 2, maxArgs: 2, run: ioZoneMgmt("zone finish", volume.Zones.Finish),
			help: "finish the zones in [off, off+len): write pointer to the zone end, full"},
		{name: "zone_reset", alias: "zrs", synopsis: "off len",
			minArgs: 2, maxArgs: 2, run: ioZoneMgmt("zone reset", volume.Zones.Reset),
			help: "reset the zones in [off, off+len) to empty (0 and the disk size: every zone)"},
		{name: "zone_append", alias: "zap", opts: "pP:", synopsis: "[-p] [-P pattern] off len [len...]",
			minArgs: 2, maxArgs: -1, run: ioZoneAppend,
			help: "append the buffers of len bytes (pattern, default 0xcd) to the zone at off, in one request; -p prints the sector where the data landed"},
		{name: "help", alias: "?", synopsis: "[command]", maxArgs: 1, run: ioHelp,
			help: "list the commands, or explain one"},
		{name: "quit", alias: "q", synopsis: "", run: func(s *ioSession, _ []opt, _ []string) error { s.quit = true; return nil },
			help: "stop reading commands"},
	}
}

func findIOCommand(name string) *ioCommand {
	for _, c := range ioCommands {
		if c.name == name || (c.alias != "" && c.alias == name) {
			return c
		}
	}
	return nil
}

// errReported: the command already printed why it failed.
var errReported = errors.New("command failed")

// ioUsageError: wrong options or operands for a command.
type ioUsageError struct{ msg string }

func (e *ioUsageError) Error() string { return e.msg }

// execute parses and runs one command line. It returns false when the
// command failed.
func (s *ioSession) execute(line string) bool {
	words := SplitCommandLine(line)
	if len(words) == 0 {
		return true
	}
	c := findIOCommand(words[0])
	if c == nil {
		fmt.Fprintf(s.errw, "zq-csi: command %q not found\n", words[0])
		return false
	}
	opts, operands, err := getopt(words[1:], c.opts)
	if err == nil && (len(operands) < c.minArgs || (c.maxArgs >= 0 && len(operands) > c.maxArgs)) {
		want := fmt.Sprint(c.minArgs)
		switch {
		case c.maxArgs < 0:
			want = fmt.Sprintf("at least %d", c.minArgs)
		case c.maxArgs != c.minArgs:
			want = fmt.Sprintf("%d to %d", c.minArgs, c.maxArgs)
		}
		err = &ioUsageError{fmt.Sprintf("bad argument count %d, expected %s", len(operands), want)}
	}
	if err == nil {
		err = c.run(s, opts, operands)
	}
	if err == nil {
		return true
	}
	var ue *ioUsageError
	var de *devError
	switch {
	case errors.Is(err, errReported):
	case errors.As(err, &de):
		fmt.Fprintf(s.out, "%s failed: %s\n", de.op, strerror(s.vol.Errno(de.err)))
		fmt.Fprintf(s.errw, "zq-csi: %s failed: %v\n", de.op, de.err)
	case errors.As(err, &ue):
		fmt.Fprintf(s.errw, "zq-csi: %s: %v\nusage: %s %s\n", c.name, err, c.name, c.synopsis)
	default:
		fmt.Fprintf(s.errw, "zq-csi: %v\n", err)
	}
	return false
}

// writable refuses a change to a read-only image before the request, as
// qemu-io does ("Block node is read-only", on stderr only).
func (s *ioSession) writable(op string) error {
	if s.vol.ReadOnly() {
		return fmt.Errorf("%s failed: %w", op, image.ErrReadOnly)
	}
	return nil
}

// devError is a failed request to the volume (a zone command on a plain
// image among them). It prints as qemu-io prints a failed request, "<op>
// failed: <strerror>" on stdout, with the errno the volume maps the cause
// to, and then the cause on stderr.
type devError struct {
	op  string // "write", "zone open", ...
	err error
}

func (e *devError) Error() string { return e.op + " failed: " + e.err.Error() }
func (e *devError) Unwrap() error { return e.err }

// strerror is C's strerror text for an errno: Go's text, which is glibc's
// with a lower-case first letter.
func strerror(e syscall.Errno) string {
	s := e.Error()
	if s != "" && s[0] >= 'a' && s[0] <= 'z' {
		s = string(s[0]-'a'+'A') + s[1:]
	}
	return s
}

// parseOffLen parses the "off len" operands.
func parseOffLen(operands []string) (off, length int64, err error) {
	off, err = ParseSize(operands[0])
	if err != nil {
		return 0, 0, &ioUsageError{fmt.Sprintf("offset: %v", err)}
	}
	length, err = ParseSize(operands[1])
	if err != nil {
		return 0, 0, &ioUsageError{fmt.Sprintf("length: %v", err)}
	}
	return off, length, nil
}

func ioRead(s *ioSession, opts []opt, operands []string) error {
	var (
		pattern             byte
		patternSet, verbose bool
		quiet               bool
		pOff, pLen          int64 = 0, -1
		pOffSet             bool
	)
	for _, o := range opts {
		var err error
		switch o.name {
		case 'P':
			patternSet = true
			pattern, err = ParsePattern(o.arg)
		case 's':
			pOffSet = true
			pOff, err = ParseSize(o.arg)
		case 'l':
			pLen, err = ParseSize(o.arg)
		case 'q':
			quiet = true
		case 'v':
			verbose = true
		}
		if err != nil {
			return &ioUsageError{err.Error()}
		}
	}
	off, length, err := parseOffLen(operands)
	if err != nil {
		return err
	}
	if length > maxIOBytes {
		return &ioUsageError{fmt.Sprintf("length cannot exceed %d, given %s", maxIOBytes, operands[1])}
	}
	if (pOffSet || pLen >= 0) && !patternSet {
		return &ioUsageError{"-s and -l need -P"}
	}
	if pOff > length {
		return &ioUsageError{"pattern verification range exceeds end of read data"}
	}
	if pLen < 0 {
		pLen = length - pOff
	}
	if pLen > length-pOff {
		return &ioUsageError{"pattern verification range exceeds end of read data"}
	}
	// The verified range, in disk offsets.
	vStart, vEnd := off+pOff, off+pOff+pLen

	buf := make([]byte, min(length, ioChunk))
	var elapsed time.Duration
	mismatch := false
	for done := int64(0); done < length; {
		n := min(length-done, int64(len(buf)))
		p := buf[:n]
		start := time.Now()
		err = s.vol.ReadAt(p, off+done)
		elapsed += time.Since(start)
		if err != nil {
			return &devError{"read", err}
		}
		if patternSet && !mismatch {
			lo, hi := max(vStart, off+done), min(vEnd, off+done+n)
			if lo < hi {
				for _, b := range p[lo-off-done : hi-off-done] {
					if b != pattern {
						mismatch = true
						break
					}
				}
			}
		}
		if verbose {
			dumpBuffer(s.out, p, off+done)
		}
		done += n
	}
	if mismatch {
		fmt.Fprintf(s.out, "Pattern verification failed at offset %d, %d bytes\n", vStart, pLen)
	}
	if !quiet {
		printReport(s.out, "read", elapsed, off, length, length, 1)
	}
	if mismatch {
		return errReported
	}
	return nil
}

func ioWrite(s *ioSession, opts []opt, operands []string) error {
	pattern := byte(defaultWritePattern)
	var patternSet, zero, unmap, fua, quiet bool
	for _, o := range opts {
		switch o.name {
		case 'P':
			p, err := ParsePattern(o.arg)
			if err != nil {
				return &ioUsageError{err.Error()}
			}
			pattern, patternSet = p, true
		case 'z':
			zero = true
		case 'u':
			unmap = true
		case 'f':
			fua = true
		case 'q':
			quiet = true
		}
	}
	if zero && patternSet {
		return &ioUsageError{"-z and -P cannot be specified at the same time"}
	}
	if unmap && !zero {
		return &ioUsageError{"-u requires -z to be specified"}
	}
	off, length, err := parseOffLen(operands)
	if err != nil {
		return err
	}
	if !zero && length > maxIOBytes {
		return &ioUsageError{fmt.Sprintf("length cannot exceed %d, given %s", maxIOBytes, operands[1])}
	}
	if err := s.writable("write"); err != nil {
		return err
	}
	start := time.Now()
	if zero {
		err = s.vol.WriteZeroes(off, length, !unmap, false)
	} else {
		err = s.vol.WriteFrom(repeated(pattern), off, length)
	}
	if err == nil && fua {
		err = s.vol.Flush()
	}
	elapsed := time.Since(start)
	if err != nil {
		return &devError{"write", err}
	}
	if !quiet {
		printReport(s.out, "wrote", elapsed, off, length, length, 1)
	}
	return nil
}

// repeated reads as an endless run of b.
type repeated byte

func (b repeated) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(b)
	}
	return len(p), nil
}

func ioDiscard(s *ioSession, opts []opt, operands []string) error {
	quiet := len(opts) > 0 // only -q exists
	off, length, err := parseOffLen(operands)
	if err != nil {
		return err
	}
	if err := s.writable("discard"); err != nil {
		return err
	}
	start := time.Now()
	if s.zones != nil {
		// Only conventional zones can be discarded: a sequential zone's
		// data goes with zone_reset.
		if err := s.conventionalOnly("discard", off, length); err != nil {
			return err
		}
	}
	if err := s.vol.Img.Discard(off, length); err != nil {
		return &devError{"discard", err}
	}
	if !quiet {
		printReport(s.out, "discard", time.Since(start), off, length, length, 1)
	}
	return nil
}

func ioFlush(s *ioSession, _ []opt, _ []string) error {
	if err := s.vol.Flush(); err != nil {
		return &devError{"flush", err}
	}
	return nil
}

// ioMap prints qemu-io's map: runs of the disk backed by data clusters
// ("allocated") or not. Zero clusters count as not allocated.
func ioMap(s *ioSession, _ []opt, _ []string) error {
	size := s.vol.Img.Size()
	exts, err := s.vol.Img.Map(0, size)
	if err != nil {
		return fmt.Errorf("map failed: %w", err)
	}
	type run struct {
		off, n int64
		data   bool
	}
	var runs []run
	for _, e := range exts {
		if k := len(runs) - 1; k >= 0 && runs[k].data == e.Data && runs[k].off+runs[k].n == e.Offset {
			runs[k].n += e.Length
			continue
		}
		runs = append(runs, run{e.Offset, e.Length, e.Data})
	}
	for _, r := range runs {
		state := "not"
		if r.data {
			state = "   "
		}
		fmt.Fprintf(s.out, "%s (0x%x) bytes %s allocated at offset %s (0x%x)\n",
			cvtstr(float64(r.n)), r.n, state, cvtstr(float64(r.off)), r.off)
	}
	return nil
}

func ioLength(s *ioSession, _ []opt, _ []string) error {
	fmt.Fprintln(s.out, cvtstr(float64(s.vol.Img.Size())))
	return nil
}

func ioHelp(s *ioSession, _ []opt, operands []string) error {
	if len(operands) == 1 {
		c := findIOCommand(operands[0])
		if c == nil {
			return fmt.Errorf("command %q not found", operands[0])
		}
		fmt.Fprintf(s.out, "%s %s -- %s\n", c.name, c.synopsis, c.help)
		return nil
	}
	ioCommandList(s.out)
	return nil
}

func ioCommandList(w io.Writer) {
	for _, c := range ioCommands {
		name := c.name
		if c.alias != "" {
			name += " (or " + c.alias + ")"
		}
		fmt.Fprintf(w, "  %s %s\n      %s\n", name, c.synopsis, c.help)
	}
}

func ioUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi io [-r] [-f qcow2] [-c COMMAND]... FILE

Open FILE once and run each -c COMMAND on it in order, with qemu-io's
syntax and output. Without -c, read the commands from standard input, one a
line. A failed command does not stop the next ones; the exit status is
then 1.

  -r   open the image read-only
  -c   a command line, e.g. -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k'

Numbers (off, len) are bytes: decimal, 0x hexadecimal, or with a unit k, M,
G, T, P, E (powers of 1024): 4k, 1.5M, 64MiB, 64Mi. Patterns are one byte:
0xab, 171 or 0253.

On a zoned image the session is one zoned device: writes to sequential
zones must start at the write pointer and end within the zone capacity,
reads past the write pointer return zeros, open/closed states last until
the session ends, and the open/active limits apply. A refused request
prints qemu-io's line ("write failed: Invalid argument") and its cause on
stderr. Zone reports are in 512-byte sectors, as qemu-io prints them.

Commands:
`)
	ioCommandList(w)
}

func runIO(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	readOnly := fs.Bool("r", false, "open read-only")
	var cmds listFlag
	fs.Var(&cmds, "c", "command to run")
	file, code, done := e.parseFileOperand(fs, args, ioUsage)
	if done {
		return code
	}
	for _, c := range cmds {
		if w := SplitCommandLine(c); len(w) > 0 && findIOCommand(w[0]) == nil {
			return e.fail(usagef("command %q not found (zq-csi io -h lists them)", w[0]), nil)
		}
	}
	vol, err := openSession(file, *readOnly)
	if err != nil {
		return e.fail(err, nil)
	}
	s := &ioSession{vol: vol, zones: vol.Zones(), out: e.stdout, errw: e.stderr}
	ok := true
	if len(cmds) > 0 {
		for _, c := range cmds {
			ok = s.execute(c) && ok
			if s.quit {
				break
			}
		}
	} else {
		ok = s.runScript(e.stdin) && ok
	}
	if err := s.vol.Close(); err != nil {
		e.fail(err, nil)
		return exitFailure
	}
	if !ok {
		return exitFailure
	}
	return exitOK
}

// runScript runs commands from r, one a line; blank lines and lines
// starting with '#' are skipped. A prompt is shown on a terminal.
func (s *ioSession) runScript(r io.Reader) bool {
	prompt := false
	if f, ok := r.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			prompt = true
		}
	}
	ok := true
	sc := bufio.NewScanner(r)
	for {
		if prompt {
			fmt.Fprint(s.out, "zq-csi io> ")
		}
		if !sc.Scan() {
			break
		}
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		ok = s.execute(line) && ok
		if s.quit {
			break
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintf(s.errw, "zq-csi: io: reading commands: %v\n", err)
		return false
	}
	return ok
}
