// Command zq-csi is the zq-csi binary: the CSI driver and its tools for
// zoned qcow2 images, as subcommands.
//
//	zq-csi image create|info|check|convert|commit|rebase ...  qemu-img-like image tools
//	zq-csi io [-r] [-c CMD]... FILE       qemu-io-like I/O on one image
//	zq-csi export [--socket P|--tcp A] FILE  qemu-nbd-like NBD export
//	zq-csi attach [--frontend ublk|nbd] FILE attach to the kernel, print /dev/ublkbN or /dev/nbdN
//	zq-csi detach DEV                     remove an attached device
//	zq-csi serve --endpoint unix:///PATH ...  the CSI plugin
//	zq-csi probe [--endpoint unix:///PATH]    is the plugin ready (liveness)
//	zq-csi fault list|add|remove|powercut ... faults in a live volume
//
// Exit codes: 0 success, 1 failure, 2 usage error; `image check` uses
// qemu-img check's codes (see cmd_image.go).
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// subcommand is one top-level verb of the binary.
type subcommand struct {
	name    string
	summary string
	// run executes the subcommand with the arguments after its name and
	// returns the process exit code.
	run func(e *env, args []string) int
}

// subcommands is the table of verbs. A new verb adds one entry here and
// lives in its own cmd_<name>.go file.
var subcommands = []subcommand{
	{"image", "create, inspect and check qcow2 images (like qemu-img)", runImage},
	{"io", "run I/O commands on an image (like qemu-io)", runIO},
	{"export", "serve an image over NBD (like qemu-nbd)", runExport},
	{"attach", "attach an image to the kernel (ublk or nbd) and serve it", runAttach},
	{"detach", "remove a device attached by attach", runDetach},
	{"serve", "run the CSI plugin (identity, controller, node services)", runServe},
	{"probe", "ask a running plugin whether it is ready (for a liveness probe)", runProbe},
	{"fault", "inject faults into a live zoned volume (errors, delays, zone conditions, power cuts)", runFault},
}

// env is what a subcommand talks to: its output streams and its name for
// messages. Tests run subcommands in-process with buffers.
type env struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	prog   string // e.g. "zq-csi image create", for usage text
}

// Exit codes shared by all subcommands.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// usageError is returned by a subcommand's argument parsing: it prints
// the message and the usage text and exits with exitUsage.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error {
	return &usageError{fmt.Sprintf(format, a...)}
}

// errorf prints "zq-csi: <prefix>: msg" to stderr.
func (e *env) errorf(format string, a ...any) {
	fmt.Fprintf(e.stderr, "zq-csi: "+format+"\n", a...)
}

// fail reports err and returns the exit code it deserves: usage errors
// print the usage text of the subcommand and give exitUsage.
func (e *env) fail(err error, usage func(io.Writer)) int {
	var ue *usageError
	if errors.As(err, &ue) {
		e.errorf("%s: %s", strings.TrimPrefix(e.prog, "zq-csi "), ue.msg)
		if usage != nil {
			usage(e.stderr)
		}
		return exitUsage
	}
	e.errorf("%s: %v", strings.TrimPrefix(e.prog, "zq-csi "), err)
	return exitFailure
}

func mainUsage(w io.Writer) {
	fmt.Fprintf(w, "Usage: zq-csi COMMAND [ARGS]\n\n")
	fmt.Fprintf(w, "zq-csi gives Kubernetes pods host-managed zoned block devices backed by zoned\nqcow2 images.\n\nCommands:\n")
	cmds := append([]subcommand(nil), subcommands...)
	sort.Slice(cmds, func(i, j int) bool { return cmds[i].name < cmds[j].name })
	for _, c := range cmds {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'zq-csi COMMAND -h' for the usage of a command.\n")
}

// run is main without os.Exit, for tests.
func run(e *env, args []string) int {
	return e.dispatch("", subcommands, args, mainUsage)
}

// dispatch runs the command of cmds that args name, the commands of group
// ("" for the top level, "image" for `zq-csi image`).
func (e *env) dispatch(group string, cmds []subcommand, args []string, usage func(io.Writer)) int {
	prefix, prog := "", "zq-csi "
	if group != "" {
		prefix, prog = group+": ", prog+group+" "
	}
	if len(args) == 0 {
		e.errorf("%sno command given", prefix)
		usage(e.stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(e.stdout)
		return exitOK
	}
	for _, c := range cmds {
		if c.name == args[0] {
			e.prog = prog + c.name
			return c.run(e, args[1:])
		}
	}
	e.errorf("%sunknown command %q", prefix, args[0])
	usage(e.stderr)
	return exitUsage
}

func main() {
	os.Exit(run(&env{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:]))
}
