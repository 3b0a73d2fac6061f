package main

// zq-csi image: create, info, check, convert, commit and rebase, with
// qemu-img's syntax and output.
//
// `image check` exits with qemu-img check's codes:
//
//	0  the check completed and found no inconsistencies
//	1  the check could not run: the image could not be opened or read
//	2  the check completed and found corruptions
//	3  the check completed and found only leaked clusters
//
// With --repair the code describes the image after the repair, as
// qemu-img's does.

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/imageopt"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// Exit codes of `image check` (qemu-img check's).
const (
	exitCheckClean   = 0
	exitCheckError   = 1
	exitCheckCorrupt = 2
	exitCheckLeaks   = 3
)

var imageCommands = []subcommand{
	{"create", "create a new image", runImageCreate},
	{"info", "show the format and size of an image", runImageInfo},
	{"check", "check (and repair) an image's metadata", runImageCheck},
	{"convert", "copy an image to a new qcow2 or raw image", runImageConvert},
	{"commit", "write an overlay into its backing file", runImageCommit},
	{"rebase", "change an overlay's backing file", runImageRebase},
}

func imageUsage(w io.Writer) {
	fmt.Fprintf(w, "Usage: zq-csi image COMMAND [OPTIONS] FILE ...\n\nCommands:\n")
	for _, c := range imageCommands {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'zq-csi image COMMAND -h' for the options of a command.\n")
}

func runImage(e *env, args []string) int {
	return e.dispatch("image", imageCommands, args, imageUsage)
}

// checkFormat refuses any image format but qcow2.
func checkFormat(f string) error {
	if f != "qcow2" {
		return usagef("unsupported format %q: only qcow2 is supported", f)
	}
	return nil
}

// ---- create ----------------------------------------------------------

// applyCreateOptions sets the -o lists into spec. Later values of a key
// override earlier ones, as in qemu-img; help (or ?) asks for the list of
// keys.
func applyCreateOptions(spec *imageopt.CreateSpec, lists []string) (help bool, err error) {
	for _, l := range lists {
		kvs, err := ParseOptList(l)
		if err != nil {
			return false, err
		}
		for _, kv := range kvs {
			if kv[0] == "help" || kv[0] == "?" {
				help = true
				continue
			}
			if err := spec.Set(kv[0], kv[1]); err != nil {
				return false, err
			}
		}
	}
	return help, nil
}

// formattingLine is qemu-img create's first line of output.
func formattingLine(file string, spec *imageopt.CreateSpec) string {
	return strings.Join(append([]string{fmt.Sprintf("Formatting '%s', fmt=qcow2", file)}, spec.Formatting()...), " ")
}

func createUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi image create [-q] [-f qcow2] [-b BACKING [-F qcow2]] [-o OPTIONS]... FILE [SIZE]

Create a qcow2 image of SIZE bytes. With -b, the image is a copy-on-write
overlay of the qcow2 image BACKING (a name relative to FILE's directory,
as qemu-img resolves it): SIZE defaults to BACKING's, and a zoned BACKING
gives the overlay its zones and write pointers. SIZE takes a unit: k, M, G, T, P, E
(powers of 1024, case-insensitive), or the forms 64KiB, 64MiB and 64Mi. A
fraction needs a unit (1.5G). FILE must not exist.

-o takes a comma-separated list KEY=VALUE[,KEY=VALUE...] and may repeat;
',,' is a literal comma; -o help lists the keys:
`)
	listCreateOptions(w)
}

func listCreateOptions(w io.Writer) {
	for _, o := range imageopt.CreateOptionHelp() {
		fmt.Fprintf(w, "  %-24s %s\n", o.Key, o.Help)
	}
}

func runImageCreate(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	format := fs.String("f", "qcow2", "image format (only qcow2)")
	quiet := fs.Bool("q", false, "print nothing on success")
	backing := fs.String("b", "", "backing file (qcow2)")
	backingFormat := fs.String("F", "qcow2", "backing file format (only qcow2)")
	var olists listFlag
	fs.Var(&olists, "o", "options KEY=VALUE[,KEY=VALUE...]")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		createUsage(e.stdout)
		return exitOK
	}
	if err != nil {
		return e.fail(err, createUsage)
	}
	if err := checkFormat(*format); err != nil {
		return e.fail(err, createUsage)
	}
	if err := checkFormat(*backingFormat); err != nil {
		return e.fail(usagef("-F: %v", err), createUsage)
	}
	spec := &imageopt.CreateSpec{}
	help, err := applyCreateOptions(spec, olists)
	if err != nil {
		return e.fail(usagef("%v", err), nil)
	}
	if help {
		fmt.Fprintf(e.stdout, "Supported options:\n")
		listCreateOptions(e.stdout)
		return exitOK
	}
	switch {
	case len(operands) == 0:
		return e.fail(usagef("missing FILE"), createUsage)
	case len(operands) > 2:
		return e.fail(usagef("too many operands: %q", operands[2:]), createUsage)
	case len(operands) == 2:
		n, err := ParseSize(operands[1])
		if err != nil {
			return e.fail(usagef("%v", err), createUsage)
		}
		spec.SetSize(n)
	case !spec.Given("size") && *backing == "":
		return e.fail(usagef("missing SIZE"), createUsage)
	}
	file := operands[0]
	if *backing != "" {
		return e.createOverlay(file, *backing, spec, *quiet)
	}
	geom, err := spec.Geometry()
	if err != nil {
		return e.fail(usagef("%v", err), nil)
	}
	if geom != nil {
		// Validate before printing anything, as CreateImage will: a bad
		// value or combination is a usage error naming the key.
		if _, _, err := geom.Normalize(); err != nil {
			return e.fail(usagef("%v", err), nil)
		}
	}
	if !*quiet {
		fmt.Fprintln(e.stdout, formattingLine(file, spec))
	}
	if geom == nil {
		if err := image.Create(file, spec.Options()); err != nil {
			return e.fail(err, nil)
		}
		return exitOK
	}
	notes, err := volume.CreateZoned(file, spec.Options(), *geom)
	if err == nil && geom.CheckLinux() != nil {
		notes = append(notes, fmt.Sprintf("zone.size %d is not a power of two: Linux cannot attach the image as a zoned disk "+
			"(zq-csi attach gives it as a plain nbd disk); io, export, info and check work", geom.ZoneSize))
	}
	// Notes go to stderr even with -q, like QEMU's messages: the image
	// differs from what was asked, or cannot do all a user may expect.
	for _, n := range notes {
		e.errorf("note: %s", n)
	}
	if err != nil {
		if errors.Is(err, zoned.ErrInvalidGeometry) {
			return e.fail(usagef("%v", err), nil)
		}
		return e.fail(err, nil)
	}
	return exitOK
}

// createOverlay creates file over the backing file: its zones, if any,
// are the backing file's, so zone options are refused.
func (e *env) createOverlay(file, backing string, spec *imageopt.CreateSpec, quiet bool) int {
	if geom, err := spec.Geometry(); err != nil || geom != nil {
		return e.fail(usagef("-b: a zoned overlay takes its zones from the backing file; give no zone.* options"), nil)
	}
	opts := spec.Options()
	opts.BackingFile = backing
	if !quiet {
		fmt.Fprintf(e.stdout, "%s backing_file=%s backing_fmt=qcow2\n", formattingLine(file, spec), backing)
	}
	if err := image.Create(file, opts); err != nil {
		return e.fail(err, nil)
	}
	return exitOK
}

// ---- info ------------------------------------------------------------

func infoUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi image info [-f qcow2] [--output=human|json] FILE

Show the format, sizes and qcow2 features of FILE, as qemu-img info does.
The image is opened read-only.
`)
}

// infoJSON is `image info --output=json`: image.Info's fields (qemu-img's
// key names) plus qemu-img's "format-specific" object.
type infoJSON struct {
	image.Info
	FormatSpecific struct {
		Type string          `json:"type"`
		Data qcow2InfoFields `json:"data"`
	} `json:"format-specific"`
}

type qcow2InfoFields struct {
	Compat          string         `json:"compat"`
	CompressionType string         `json:"compression-type,omitempty"`
	LazyRefcounts   bool           `json:"lazy-refcounts"`
	RefcountBits    int            `json:"refcount-bits"`
	Corrupt         bool           `json:"corrupt"`
	ExtendedL2      bool           `json:"extended-l2"`
	Zoned           *zonedInfoJSON `json:"zoned,omitempty"`
}

// zonedInfoJSON is the zone geometry in format-specific.data: the zone
// model (zone.mode's value) and image.Zones' fields.
type zonedInfoJSON struct {
	Mode string `json:"mode"`
	image.Zones
}

func compatString(version int) string {
	if version == 2 {
		return "0.10"
	}
	return "1.1"
}

func runImageInfo(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	output := &choiceFlag{val: "human", choices: []string{"human", "json"}}
	fs.Var(output, "output", "human or json")
	file, code, done := e.parseFileOperand(fs, args, infoUsage)
	if done {
		return code
	}
	img, err := image.Open(file, image.OpenOptions{ReadOnly: true})
	if err != nil {
		return e.fail(err, nil)
	}
	defer img.Close()
	info := img.Info()
	info.Filename = file
	if info.Format == "" {
		info.Format = "qcow2"
	}
	if info.ActualSize == 0 {
		info.ActualSize = diskUsage(file)
	}
	if output.val == "json" {
		var j infoJSON
		j.Info = info
		j.FormatSpecific.Type = info.Format
		j.FormatSpecific.Data = qcow2InfoFields{
			Compat:          compatString(info.Version),
			CompressionType: info.CompressionType,
			LazyRefcounts:   info.LazyRefcounts,
			RefcountBits:    info.RefcountBits,
			Corrupt:         info.Corrupt,
			ExtendedL2:      info.ExtendedL2,
		}
		if info.Zones != nil {
			j.FormatSpecific.Data.Zoned = &zonedInfoJSON{Mode: imageopt.ZoneModeHostManaged, Zones: *info.Zones}
		}
		return writeJSON(e, j)
	}
	w := e.stdout
	fmt.Fprintf(w, "image: %s\n", file)
	fmt.Fprintf(w, "file format: %s\n", info.Format)
	fmt.Fprintf(w, "virtual size: %s (%d bytes)\n", sizeToStr(info.VirtualSize), info.VirtualSize)
	fmt.Fprintf(w, "disk size: %s\n", sizeToStr(info.ActualSize))
	fmt.Fprintf(w, "cluster_size: %d\n", info.ClusterSize)
	if info.BackingFilename != "" {
		fmt.Fprintf(w, "backing file: %s", info.BackingFilename)
		if info.FullBackingFilename != info.BackingFilename {
			fmt.Fprintf(w, " (actual path: %s)", info.FullBackingFilename)
		}
		fmt.Fprintf(w, "\nbacking file format: %s\n", info.BackingFormat)
	}
	fmt.Fprintf(w, "Format specific information:\n")
	fmt.Fprintf(w, "    compat: %s\n", compatString(info.Version))
	if info.Version >= 3 {
		if info.CompressionType != "" {
			fmt.Fprintf(w, "    compression type: %s\n", info.CompressionType)
		}
		fmt.Fprintf(w, "    lazy refcounts: %t\n", info.LazyRefcounts)
		fmt.Fprintf(w, "    refcount bits: %d\n", info.RefcountBits)
		fmt.Fprintf(w, "    corrupt: %t\n", info.Corrupt)
		fmt.Fprintf(w, "    extended l2: %t\n", info.ExtendedL2)
	}
	if z := info.Zones; z != nil {
		fmt.Fprintf(w, "    zoned:\n")
		fmt.Fprintf(w, "        zone model: %s\n", imageopt.ZoneModeHostManaged)
		// What the zone model makes of the header's values, where it
		// differs: QEMU writes geometries Linux cannot attach.
		g := volume.ImageGeometry(info.VirtualSize, *z)
		sizeNote, appendNote := "", ""
		if g.CheckLinux() != nil {
			sizeNote = ", not a power of two: no zoned kernel attach"
		}
		if norm, _, err := g.Normalize(); err == nil && norm.MaxAppendBytes != g.MaxAppendBytes {
			appendNote = fmt.Sprintf(", appends limited to %d bytes", norm.MaxAppendBytes)
		}
		fmt.Fprintf(w, "        zone size: %s%s\n", exactSize(z.ZoneSize), sizeNote)
		fmt.Fprintf(w, "        zone capacity: %s\n", exactSize(z.ZoneCapacity))
		fmt.Fprintf(w, "        conventional zones: %d\n", z.ConventionalZones)
		fmt.Fprintf(w, "        nr zones: %d\n", z.NrZones)
		fmt.Fprintf(w, "        max open zones: %d\n", z.MaxOpenZones)
		fmt.Fprintf(w, "        max active zones: %d\n", z.MaxActiveZones)
		fmt.Fprintf(w, "        max append bytes: %s%s\n", exactSize(int64(z.MaxAppendBytes)), appendNote)
	}
	if info.Dirty {
		// qemu-img shows the dirty flag in JSON only; people need it too.
		fmt.Fprintf(w, "    dirty: true\n")
	}
	return exitOK
}

// exactSize is sizeToStr ("16 MiB"), followed by the byte count when the
// short form is rounded ("1000 KiB (1024000 bytes)" stays exact, "0.977
// MiB" would not).
func exactSize(v int64) string {
	s := sizeToStr(v)
	for i, u := range []string{" B", " KiB", " MiB", " GiB", " TiB", " PiB", " EiB"} {
		num, ok := strings.CutSuffix(s, u)
		if !ok {
			continue
		}
		if n, err := strconv.ParseInt(num, 10, 64); err == nil && n<<(10*i) == v {
			return s
		}
		break
	}
	return fmt.Sprintf("%s (%d bytes)", s, v)
}

// diskUsage is the space the file takes on its file system, as qemu-img's
// "disk size", when the image package does not report it.
func diskUsage(file string) int64 {
	st, err := os.Stat(file)
	if err != nil {
		return 0
	}
	if n, ok := allocatedBytes(st); ok {
		return n
	}
	return st.Size()
}

func writeJSON(e *env, v any) int {
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return e.fail(err, nil)
	}
	fmt.Fprintf(e.stdout, "%s\n", b)
	return exitOK
}

// ---- check -----------------------------------------------------------

func checkUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi image check [-f qcow2] [--repair | -r leaks|all] [--output=human|json] FILE

Check the qcow2 metadata of FILE: refcounts against references, table
bounds and alignment, overlaps. --repair (or qemu-img's -r) rewrites the
refcounts, then checks the image again.

Exit status (qemu-img check's):
  0  no inconsistencies found
  1  the check could not run (the image could not be opened or read)
  2  corruptions found
  3  only leaked clusters found
With --repair the status describes the image after the repair.
`)
}

// checkJSON is qemu-img check's JSON object, plus the problems found.
type checkJSON struct {
	Filename          string   `json:"filename"`
	Format            string   `json:"format"`
	CheckErrors       int      `json:"check-errors"`
	ImageEndOffset    int64    `json:"image-end-offset,omitempty"`
	TotalClusters     int64    `json:"total-clusters,omitempty"`
	AllocatedClusters int64    `json:"allocated-clusters,omitempty"`
	Corruptions       int64    `json:"corruptions,omitempty"`
	Leaks             int64    `json:"leaks,omitempty"`
	CorruptionsFixed  int64    `json:"corruptions-fixed,omitempty"`
	LeaksFixed        int64    `json:"leaks-fixed,omitempty"`
	Problems          []string `json:"problems,omitempty"`
	Rebuilt           []string `json:"rebuilt,omitempty"`
}

func leakCount(r *image.CheckResult) int64 {
	if r.LeakedClusters == 0 && len(r.Leaks) > 0 {
		return int64(len(r.Leaks))
	}
	return r.LeakedClusters
}

// checkExitCode maps a check result to qemu-img check's exit codes.
func checkExitCode(r *image.CheckResult) int {
	switch {
	case len(r.Corruptions) > 0:
		return exitCheckCorrupt
	case len(r.Leaks) > 0 || r.LeakedClusters > 0:
		return exitCheckLeaks
	}
	return exitCheckClean
}

func runImageCheck(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	repair := fs.Bool("repair", false, "repair the refcounts")
	repairMode := &choiceFlag{choices: []string{"leaks", "all"}}
	fs.Var(repairMode, "r", "repair: leaks or all (both rebuild the refcounts)")
	output := &choiceFlag{val: "human", choices: []string{"human", "json"}}
	fs.Var(output, "output", "human or json")
	file, exit, done := e.parseFileOperand(fs, args, checkUsage)
	if done {
		return exit
	}
	doRepair := *repair || repairMode.val != ""
	opts := image.OpenOptions{ReadOnly: true}
	if doRepair {
		opts = writeOptions()
	}
	opts.ForCheck = true
	img, err := image.Open(file, opts)
	if err != nil {
		e.fail(err, nil)
		return exitCheckError
	}
	defer img.Close()

	// Check first without repairing, to report what was found; then, if
	// asked and needed, repair (Check(true) describes the image after the
	// repair, qemu-img's "double check").
	first, err := img.Check(false)
	if err != nil {
		e.fail(err, nil)
		return exitCheckError
	}
	checkZoneModel(img, first)
	final := first
	fixedLeaks, fixedCorruptions := int64(0), int64(0)
	w := e.stdout
	human := output.val == "human"
	if human {
		printProblems(w, first)
	}
	if doRepair && !first.Clean() {
		final, err = img.Check(true)
		if err != nil {
			e.fail(err, nil)
			return exitCheckError
		}
		checkZoneModel(img, final)
		fixedLeaks = max(0, leakCount(first)-leakCount(final))
		fixedCorruptions = max(0, int64(len(first.Corruptions)-len(final.Corruptions)))
		if human {
			fmt.Fprintf(w, "The following inconsistencies were found and repaired:\n\n")
			fmt.Fprintf(w, "    %d leaked clusters\n    %d corruptions\n\n", fixedLeaks, fixedCorruptions)
			for _, r := range final.Rebuilt {
				fmt.Fprintf(w, "%s\n\n", r)
			}
			fmt.Fprintf(w, "Double checking the fixed image now...\n")
			printProblems(w, final)
		}
	}
	if err := img.Close(); err != nil {
		e.fail(err, nil)
		return exitCheckError
	}
	code := checkExitCode(final)
	if !human {
		j := checkJSON{
			Filename:          file,
			Format:            "qcow2",
			ImageEndOffset:    final.ImageEndOffset,
			TotalClusters:     final.TotalClusters,
			AllocatedClusters: final.AllocatedClusters,
			Corruptions:       int64(len(final.Corruptions)),
			Leaks:             leakCount(final),
			CorruptionsFixed:  fixedCorruptions,
			LeaksFixed:        fixedLeaks,
			Problems:          append(append([]string(nil), first.Corruptions...), first.Leaks...),
			Rebuilt:           final.Rebuilt,
		}
		if rc := writeJSON(e, j); rc != exitOK {
			return exitCheckError
		}
		return code
	}
	printCheckSummary(w, final)
	return code
}

// checkZoneModel adds to r, as a corruption, why the zone model refuses a
// zoned image whose format is consistent (image.Check's business): a
// geometry that zoned.Geometry.Normalize refuses, a write pointer that is
// not a multiple of 512. zq-csi io and the CSI node cannot open such an
// image, and a repair of the refcounts does not fix it.
func checkZoneModel(img *image.Image, r *image.CheckResult) {
	if _, ok := img.Zones(); !ok {
		return
	}
	if _, err := img.WritePointers(); err != nil {
		return // an unreadable table: the check reported it
	}
	if _, err := volume.OpenZones(img); err != nil {
		r.Corruptions = append(r.Corruptions, fmt.Sprintf("ERROR zone model: %v", err))
	}
}

// printProblems lists what a check found, one line each.
func printProblems(w io.Writer, r *image.CheckResult) {
	for _, p := range r.Corruptions {
		if !strings.HasPrefix(p, "ERROR") {
			p = "ERROR " + p
		}
		fmt.Fprintln(w, p)
	}
	for _, p := range r.Leaks {
		fmt.Fprintln(w, p)
	}
}

// printCheckSummary is qemu-img check's summary (dump_human_image_check).
func printCheckSummary(w io.Writer, r *image.CheckResult) {
	if r.Clean() {
		fmt.Fprintf(w, "No errors were found on the image.\n")
	} else {
		if n := len(r.Corruptions); n > 0 {
			fmt.Fprintf(w, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", n)
		}
		if n := leakCount(r); n > 0 {
			fmt.Fprintf(w, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", n)
		}
	}
	if r.TotalClusters != 0 && r.AllocatedClusters != 0 {
		// qemu-img goes on with the fragmented and compressed shares,
		// which image.CheckResult does not count.
		fmt.Fprintf(w, "%d/%d = %0.2f%% allocated clusters\n",
			r.AllocatedClusters, r.TotalClusters,
			float64(r.AllocatedClusters)*100/float64(r.TotalClusters))
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", r.ImageEndOffset)
	}
}
