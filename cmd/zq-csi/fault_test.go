package main

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestFaultRefusesBadArguments(t *testing.T) {
	for _, tc := range []struct {
		args []string
		says string
	}{
		{[]string{"fault"}, "no verb given"},
		{[]string{"fault", "explode"}, `unknown verb "explode"`},
		{[]string{"fault", "add"}, "no FAULT given"},
		{[]string{"fault", "add", "error:zone=x"}, "zone=x"},
		{[]string{"fault", "remove"}, "want one rule ID"},
		{[]string{"fault", "remove", "0"}, "positive number"},
		{[]string{"fault", "list", "vol"}, "takes no operands"},
		{[]string{"fault", "--json", "powercut"}, "--json applies to list"},
		{[]string{"export", "--faults", "bogus", "x.qcow2"}, `unknown kind "bogus"`},
		{[]string{"attach", "--faults", "error:nth=x", "x.qcow2"}, "nth=x"},
	} {
		_, stderr, code := cli(t, "", tc.args...)
		if code != exitUsage || !strings.Contains(stderr, tc.says) {
			t.Errorf("%q: exit %d, stderr %q; want usage saying %q", tc.args, code, stderr, tc.says)
		}
	}
	_, stderr, code := cli(t, "", "fault", "--socket", filepath.Join(t.TempDir(), "none.sock"), "list")
	if code != exitFailure || !strings.Contains(stderr, "none.sock") {
		t.Errorf("no server: exit %d, stderr %q", code, stderr)
	}
}

// TestInteropFaultsOverExport injects faults into a live export and sees
// them from Debian's qemu-io over NBD.
func TestInteropFaultsOverExport(t *testing.T) {
	interop(t)
	f := newImage(t, "8M", "zone.mode=host-managed,zone.size=1M,zone.conventional_zones=1,zone.max_append_bytes=64k")
	dir := shortDir(t)
	ctl := filepath.Join(dir, "ctl.sock")
	uri, stop := startExport(t, "--socket", filepath.Join(dir, "z.sock"), "--fault-socket", ctl, "--volatile-cache",
		"--faults", "readonly:zone=3", f)
	out := mustOK(t, "fault add", zq(t, "fault", "--socket", ctl, "add", "error:op=write,zone=4,errno=ENOSPC,count=1")).stdout
	if out != "rule 1\n" {
		t.Errorf("fault add printed %q", out)
	}
	for _, tc := range []struct{ cmd, want string }{
		{"write -P 7 3M 4k", "write failed: Input/output error"},      // read-only zone
		{"write -P 7 4M 4k", "write failed: No space left on device"}, // the rule, once
		{"write -P 7 4M 4k", "wrote 4096/4096 bytes"},
		{"read -P 0 3M 4k", "read 4096/4096 bytes"},
	} {
		if r := runTool(t, "qemu-io", "-f", "raw", "-c", tc.cmd, uri); !strings.Contains(r.stdout, tc.want) {
			t.Errorf("qemu-io %q: %v, want %q", tc.cmd, r, tc.want)
		}
	}
	// qemu-io with cache=writeback writes without FUA and flushes when
	// asked and on exit: the first session's flush makes 8k durable, a
	// rule puts a power cut in place of the second's, which drops the 4k
	// written before it.
	mustOK(t, "qemu-io", runTool(t, "qemu-io", "-t", "writeback", "-f", "raw", "-c", "write -P 1 6M 8k", uri))
	mustOK(t, "fault add", zq(t, "fault", "--socket", ctl, "add", "powercut:op=flush"))
	if r := runTool(t, "qemu-io", "-t", "writeback", "-f", "raw", "-c", "write -P 2 6299648 4k", "-c", "flush", uri); r.code != 1 || !strings.Contains(r.stdout, "wrote 4096/4096") {
		t.Errorf("qemu-io whose flush the power cut replaced: %v, want the write done and exit 1", r)
	}
	// A cut now, with nothing unflushed, drops nothing.
	out = mustOK(t, "fault powercut", zq(t, "fault", "--socket", ctl, "powercut")).stdout
	if out != "power cut: 0 zones rolled back, 0 bytes dropped\n" {
		t.Errorf("fault powercut printed %q", out)
	}
	list := mustOK(t, "fault list", zq(t, "fault", "--socket", ctl, "list")).stdout
	for _, want := range []string{"cache volatile, 2 power cuts", "rule 1  error:op=write,zone=4,errno=ENOSPC,count=1  (socket; matched 2, fired 1, done)",
		"rule 2  powercut:op=flush  (socket; matched 2, fired 1, done)", "zone 3  read-only"} {
		if !strings.Contains(list, want) {
			t.Errorf("fault list lacks %q:\n%s", want, list)
		}
	}
	if code, stderr := stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("export after SIGTERM: exit %d\n%s", code, stderr)
	}
	rep := mustOK(t, "zq-csi io zrp", zq(t, "io", "-r", "-c", "zrp 3M 4", f)).stdout
	want := "start: 0x1800, len 0x800, cap 0x800, wptr 0x1800, zcond:13, [type: 2]\n" +
		"start: 0x2000, len 0x800, cap 0x800, wptr 0x2008, zcond:4, [type: 2]\n" +
		"start: 0x2800, len 0x800, cap 0x800, wptr 0x2800, zcond:1, [type: 2]\n" +
		"start: 0x3000, len 0x800, cap 0x800, wptr 0x3010, zcond:4, [type: 2]\n"
	if rep != want {
		t.Errorf("zone report after the export:\n%s\nwant (zone 3 still read-only, zone 6 at its flushed 8k):\n%s", rep, want)
	}
	mustOK(t, "read back", zq(t, "io", "-r", "-c", "read -P 1 6M 8k", "-c", "read -P 0 6299648 4k", f))
}
