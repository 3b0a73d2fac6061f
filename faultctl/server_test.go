package faultctl

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// serveVolume opens a real zoned image and serves its faults on a real
// control socket.
func serveVolume(t *testing.T, volatile bool) (*volume.Volume, *Server, string) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "v.qcow2")
	if _, err := volume.CreateZoned(path, image.CreateOptions{Size: geometry.Size}, geometry); err != nil {
		t.Fatal(err)
	}
	v, err := volume.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if volatile {
		if err := v.SetVolatileCache(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { v.Close() })
	s := NewServer()
	if err := s.Add("vol-1", v); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "ctl", "fault.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go s.Serve(l)
	return v, s, sock
}

func TestControlSocketAddsListsAndRemovesFaults(t *testing.T) {
	v, _, sock := serveVolume(t, false)
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v, %v: want mode 0600", fi, err)
	}
	resp, err := Do(sock, Request{Verb: "add", Faults: "error:zone=2,errno=ENOSPC; readonly:zone=3"})
	if err != nil || len(resp.IDs) != 1 {
		t.Fatalf("add: %+v, %v", resp, err)
	}
	if err := v.WriteAt(make([]byte, 4096), 2<<20); zoned.Errno(err) != syscall.ENOSPC {
		t.Errorf("write under the rule: %v, want ENOSPC", err)
	}
	if err := v.WriteAt(make([]byte, 4096), 3<<20); !errors.Is(err, zoned.ErrZoneReadOnly) {
		t.Errorf("write to the read-only zone: %v", err)
	}
	resp, err = Do(sock, Request{Verb: "list"})
	if err != nil || len(resp.Volumes) != 1 {
		t.Fatalf("list: %+v, %v", resp, err)
	}
	st := resp.Volumes[0]
	if len(st.Rules) != 1 || st.Rules[0].Fired != 1 || st.Rules[0].Fault != "error:zone=2,errno=ENOSPC" || st.Conditions["3"] != "read-only" || !st.Active() {
		t.Errorf("list: %+v", st)
	}
	if _, err := Do(sock, Request{Verb: "remove", ID: resp.Volumes[0].Rules[0].ID}); err != nil {
		t.Fatal(err)
	}
	if _, err := Do(sock, Request{Verb: "add", Faults: "online:zone=3"}); err != nil {
		t.Fatal(err)
	}
	for _, zone := range []int64{2, 3} {
		if err := v.WriteAt(make([]byte, 4096), zone<<20); err != nil {
			t.Errorf("zone %d after clearing: %v", zone, err)
		}
	}
	if resp, _ := Do(sock, Request{Verb: "list"}); resp.Volumes[0].Active() {
		t.Errorf("still active after clearing: %+v", resp.Volumes[0])
	}
	// reset-recommended shows in reports until the zone is reset.
	if _, err := Do(sock, Request{Verb: "add", Faults: "reset-recommended:zone=4-5"}); err != nil {
		t.Fatal(err)
	}
	if z := v.Zones().Report(4, 2); !z[0].ResetRecommended || !z[1].ResetRecommended {
		t.Errorf("report after reset-recommended: %+v", z)
	}
	if resp, _ := Do(sock, Request{Verb: "list"}); resp.Volumes[0].Conditions["4"] != "reset-recommended" {
		t.Errorf("list: %+v", resp.Volumes[0])
	}
	if err := v.Zones().Reset(4<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if z := v.Zones().Report(4, 2); z[0].ResetRecommended || !z[1].ResetRecommended {
		t.Errorf("after resetting zone 4: %+v, want its attribute cleared and zone 5's kept", z)
	}
}

func TestControlSocketRefusesWithTheCause(t *testing.T) {
	_, _, sock := serveVolume(t, false)
	for _, tc := range []struct {
		req  Request
		says string
	}{
		{Request{Verb: "add", Faults: "error:zone=99"}, "zone 99"},
		{Request{Verb: "add", Faults: "powercut"}, "volatile"},
		{Request{Verb: "add", Faults: ""}, "no fault given"},
		{Request{Verb: "add", Volume: "vol-2", Faults: "error"}, `no such volume "vol-2"`},
		{Request{Verb: "remove", ID: 42}, "no such fault rule 42"},
		{Request{Verb: "powercut"}, "volatile"},
		{Request{Verb: "explode"}, "unknown verb"},
	} {
		if _, err := Do(sock, tc.req); err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%+v: %v, want an error saying %q", tc.req, err, tc.says)
		}
	}
}

func TestPowerCutOverTheSocketDropsUnflushedWrites(t *testing.T) {
	v, _, sock := serveVolume(t, true)
	z := v.Zones()
	if err := v.WriteAt(make([]byte, 8192), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(make([]byte, 4096), 2<<20+8192); err != nil {
		t.Fatal(err)
	}
	resp, err := Do(sock, Request{Verb: "powercut"})
	if err != nil || resp.PowerCut == nil || resp.PowerCut.Zones != 1 || resp.PowerCut.Bytes != 4096 {
		t.Fatalf("powercut: %+v, %v", resp, err)
	}
	if wp := z.Report(2, 1)[0].WritePointer; wp != 2<<20+8192 {
		t.Errorf("write pointer after the cut %#x, want the flushed %#x", wp, 2<<20+8192)
	}
	if resp, _ := Do(sock, Request{Verb: "list"}); resp.Volumes[0].PowerCuts != 1 || !resp.Volumes[0].VolatileCache {
		t.Errorf("list after the cut: %+v", resp.Volumes[0])
	}
}

func TestReplaceSwapsOneSourcesFaultsOnly(t *testing.T) {
	v, s, _ := serveVolume(t, false)
	mustSpecs := func(text string) []Spec {
		specs, err := ParseList(text)
		if err != nil {
			t.Fatal(err)
		}
		return specs
	}
	if _, err := s.Apply("vol-1", FromSocket, mustSpecs("readonly:zone=5")); err != nil {
		t.Fatal(err)
	}
	if err := s.Replace("vol-1", FromAnnotation, mustSpecs("readonly:zone=3;error:op=read,zone=2")); err != nil {
		t.Fatal(err)
	}
	if err := s.Replace("vol-1", FromAnnotation, mustSpecs("offline:zone=4")); err != nil {
		t.Fatal(err)
	}
	st, err := s.Status("vol-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Rules) != 0 || len(st.Conditions) != 2 || st.Conditions["4"] != "offline" || st.Conditions["5"] != "read-only" {
		t.Errorf("after replacing the annotation's faults: %+v; want zone 4 offline (new), 5 read-only (the socket's), 3 back", st)
	}
	if err := v.WriteAt(make([]byte, 512), 3<<20); err != nil {
		t.Errorf("zone 3, no longer in the annotation: %v", err)
	}
}
