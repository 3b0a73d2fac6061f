package main

// zq-csi fault: inject faults into a zoned volume that a running attach,
// export or serve holds, over its control socket (faultctl), and the flags
// with which attach and export open that socket.

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/zq-csi/zq-csi/faultctl"
	"github.com/zq-csi/zq-csi/volume"
)

// defaultFaultSocket is where `zq-csi serve` listens and `zq-csi fault`
// connects without --socket.
const defaultFaultSocket = "/run/zq-csi/fault.sock"

func faultUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi fault [--socket PATH] [--volume NAME] list [--json]
       zq-csi fault [--socket PATH] [--volume NAME] add FAULT...
       zq-csi fault [--socket PATH] [--volume NAME] remove ID|all
       zq-csi fault [--socket PATH] [--volume NAME] powercut

Inject faults into a live zoned volume held by a running 'zq-csi attach'
or 'export' (started with --fault-socket PATH) or by the node plugin
('zq-csi serve', whose socket is %s; run this in its
container: kubectl exec). The socket is its owner's only (root).

  --socket PATH   the control socket (default %s)
  --volume NAME   the volume: its ID in the node plugin; may be left out when
                  the server holds one volume (attach, export)

Verbs:
  list            what is injected into each volume: rules with how often
                  they matched and fired, zones out of service, power cuts
  add FAULT...    put faults in force (each checked first: a bad one adds none)
  remove ID|all   take rule ID, or every rule, out of force (zone conditions
                  are cleared with 'add online:zone=N')
  powercut        drop every write not yet flushed, now (the volume must have
                  been opened with a volatile cache)

FAULT is KIND[:KEY=VALUE[,KEY=VALUE]...]:
  error      fail requests: errno=NAME|N (default EIO), partial=SIZE (writes:
             bytes that land before the error)
  delay      hold requests: delay=DURATION, jitter=DURATION (uniform extra)
  powercut   cut the power instead of a flush (the flush fails with EIO) or
             right after a write or zone operation (op=write|zone); count 1
  readonly, offline, online   a zone condition (zone= only): read-only
             zones read but refuse changes, offline ones refuse everything,
             online gives a zone back its condition. Kept across restarts in
             IMAGE.conditions beside the image, never in it.
Keys of error, delay and powercut:
  op=read|write|flush|zone|all   requests selected, joined with | (default:
             write; powercut: flush)
  zone=N or zone=N-M, or offset=SIZE,length=SIZE   where (default: anywhere)
  nth=N      from the Nth selected request on;  count=N  N times in all
  percent=P  on P%% of the selected requests
Examples:
  zq-csi fault add 'readonly:zone=5' 'error:op=write,zone=7,nth=3,count=1,errno=ENOSPC'
  zq-csi fault add 'delay:op=read,delay=2ms,jitter=8ms,percent=10'
  zq-csi fault add 'powercut:op=write,nth=1000'
`, defaultFaultSocket, defaultFaultSocket)
}

func runFault(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	sock := fs.String("socket", defaultFaultSocket, "control socket")
	vol := fs.String("volume", "", "volume name")
	asJSON := fs.Bool("json", false, "list as JSON")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		faultUsage(e.stdout)
		return exitOK
	}
	var req faultctl.Request
	if err == nil {
		req, err = faultRequest(operands, *vol)
	}
	if err == nil && *asJSON && req.Verb != "list" {
		err = usagef("--json applies to list")
	}
	if err != nil {
		return e.fail(err, faultUsage)
	}
	resp, err := faultctl.Do(*sock, req)
	if err != nil {
		return e.fail(err, nil)
	}
	switch req.Verb {
	case "list":
		if *asJSON {
			enc := json.NewEncoder(e.stdout)
			enc.SetIndent("", "  ")
			enc.Encode(resp.Volumes)
			break
		}
		printFaults(e.stdout, resp.Volumes)
	case "add":
		for _, id := range resp.IDs {
			fmt.Fprintf(e.stdout, "rule %d\n", id)
		}
	case "remove":
		fmt.Fprintf(e.stdout, "removed %d rules\n", resp.Removed)
	case "powercut":
		fmt.Fprintf(e.stdout, "power cut: %d zones rolled back, %d bytes dropped\n", resp.PowerCut.Zones, resp.PowerCut.Bytes)
	}
	return exitOK
}

// faultRequest turns the verb and its operands into a request.
func faultRequest(operands []string, vol string) (faultctl.Request, error) {
	if len(operands) == 0 {
		return faultctl.Request{}, usagef("no verb given (list, add, remove or powercut)")
	}
	req := faultctl.Request{Verb: operands[0], Volume: vol}
	rest := operands[1:]
	switch req.Verb {
	case "list", "powercut":
		if len(rest) != 0 {
			return req, usagef("%s takes no operands (the volume is --volume)", req.Verb)
		}
	case "add":
		if len(rest) == 0 {
			return req, usagef("add: no FAULT given")
		}
		for _, f := range rest {
			if _, err := faultctl.ParseList(f); err != nil {
				return req, usagef("%v", err)
			}
		}
		req.Faults = strings.Join(rest, ";")
	case "remove":
		if len(rest) != 1 {
			return req, usagef("remove: want one rule ID or all")
		}
		if rest[0] != "all" {
			id, err := strconv.Atoi(rest[0])
			if err != nil || id <= 0 {
				return req, usagef("remove %q: want a rule ID (a positive number) or all", rest[0])
			}
			req.ID = id
		}
	default:
		return req, usagef("unknown verb %q (want list, add, remove or powercut)", req.Verb)
	}
	return req, nil
}

func printFaults(w io.Writer, vols []faultctl.VolumeStatus) {
	for _, v := range vols {
		cache := "durable"
		if v.VolatileCache {
			cache = "volatile"
		}
		fmt.Fprintf(w, "%s: cache %s, %d power cuts\n", v.Name, cache, v.PowerCuts)
		for _, r := range v.Rules {
			done := ""
			if r.Done {
				done = ", done"
			}
			fmt.Fprintf(w, "  rule %d  %s  (%s; matched %d, fired %d%s)\n", r.ID, r.Fault, r.Source, r.Matched, r.Fired, done)
		}
		zones := make([]int, 0, len(v.Conditions))
		for z := range v.Conditions {
			n, _ := strconv.Atoi(z)
			zones = append(zones, n)
		}
		sort.Ints(zones)
		for _, z := range zones {
			fmt.Fprintf(w, "  zone %d  %s\n", z, v.Conditions[strconv.Itoa(z)])
		}
	}
}

// faultFlags are the fault-injection flags of attach and export.
type faultFlags struct {
	socket   *string
	volatile *bool
	faults   *string
}

func addFaultFlags(fs *flag.FlagSet) faultFlags {
	return faultFlags{
		socket:   fs.String("fault-socket", "", "control socket for zq-csi fault"),
		volatile: fs.Bool("volatile-cache", false, "keep unflushed writes separable, for power cuts"),
		faults:   fs.String("faults", "", "faults in force from the start"),
	}
}

const faultFlagsUsage = `faults (zq-csi fault -h):
  --fault-socket PATH    listen for 'zq-csi fault --socket PATH' (owner only; default: none)
  --volatile-cache       a volatile write cache: unflushed writes can be dropped by a power cut
  --faults 'F;F...'      faults in force from the start
`

// check validates the flags before the image is opened.
func (f faultFlags) check() error {
	if _, err := faultctl.ParseList(*f.faults); err != nil {
		return usagef("--faults: %v", err)
	}
	return nil
}

// start applies the flags to vol before it serves: the volatile cache, the
// faults, and the control socket, whose listener stop closes.
func (f faultFlags) start(e *env, vol *volume.Volume) (stop func(), err error) {
	stop = func() {}
	if *f.socket == "" && !*f.volatile && *f.faults == "" {
		return stop, nil
	}
	if *f.volatile {
		if err := vol.SetVolatileCache(); err != nil {
			return stop, fmt.Errorf("--volatile-cache: %w", err)
		}
	}
	srv := faultctl.NewServer()
	name := vol.Path
	if err := srv.Add(name, vol); err != nil {
		return stop, fmt.Errorf("faults: %w", err)
	}
	specs, _ := faultctl.ParseList(*f.faults)
	if _, err := srv.Apply(name, faultctl.FromSocket, specs); err != nil {
		return stop, fmt.Errorf("--faults: %w", err)
	}
	if *f.socket == "" {
		return stop, nil
	}
	l, err := faultctl.Listen(*f.socket)
	if err != nil {
		return stop, err
	}
	go func() {
		if err := srv.Serve(l); err != nil {
			e.errorf("fault socket: %v", err)
		}
	}()
	return func() { l.Close() }, nil
}
