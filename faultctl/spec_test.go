package faultctl

import (
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zq-csi/zq-csi/zoned"
)

var geometry = zoned.Geometry{Size: 8 << 20, ZoneSize: 1 << 20, ZoneCapacity: 1 << 20, ConventionalZones: 1, MaxAppendBytes: 64 << 10}

func TestParseResolvesWhatTheTextSays(t *testing.T) {
	tests := []struct {
		text string
		want zoned.Fault
	}{
		{"error", zoned.Fault{Action: zoned.Fail, Op: zoned.OpWrite}},
		{"error:op=write,zone=4,nth=3,count=1,errno=ENOSPC",
			zoned.Fault{Action: zoned.Fail, Op: zoned.OpWrite, Start: 4 << 20, Length: 1 << 20, Nth: 3, Count: 1, Errno: syscall.ENOSPC}},
		{"error:op=read|flush,offset=1M,length=4k,errno=61",
			zoned.Fault{Action: zoned.Fail, Op: zoned.OpRead | zoned.OpFlush, Start: 1 << 20, Length: 4096, Errno: syscall.ENODATA}},
		{"error:zone=2-3,partial=4k,errno=eio",
			zoned.Fault{Action: zoned.Fail, Op: zoned.OpWrite, Start: 2 << 20, Length: 2 << 20, Partial: 4096, Errno: syscall.EIO}},
		{"delay:op=all,delay=5ms,jitter=1ms,percent=12.5",
			zoned.Fault{Action: zoned.Delay, Op: zoned.OpAll, Delay: 5 * time.Millisecond, Jitter: time.Millisecond, Percent: 12.5}},
		{"powercut", zoned.Fault{Action: zoned.PowerCut, Op: zoned.OpFlush, Count: 1}},
		{"powercut:op=write,nth=100", zoned.Fault{Action: zoned.PowerCut, Op: zoned.OpWrite, Nth: 100, Count: 1}},
		{"error:zone=7", zoned.Fault{Action: zoned.Fail, Op: zoned.OpWrite, Start: 7 << 20, Length: 1 << 20}},
	}
	for _, tc := range tests {
		s, err := Parse(tc.text)
		if err == nil {
			s, err = s.Resolve(geometry)
		}
		if err != nil {
			t.Errorf("%q: %v", tc.text, err)
			continue
		}
		if s.Fault != tc.want || !s.Rule() || s.String() != tc.text {
			t.Errorf("%q: %+v, want %+v", tc.text, s.Fault, tc.want)
		}
	}
}

func TestParseZoneConditions(t *testing.T) {
	for text, want := range map[string]zoned.Condition{"readonly:zone=3": zoned.ReadOnly, "offline:zone=2-5": zoned.Offline, "online:zone=3": zoned.Empty,
		"reset-recommended:zone=4": zoned.Empty} {
		s, err := Parse(text)
		if err == nil {
			_, err = s.Resolve(geometry)
		}
		if err != nil || s.Rule() || s.Condition() != want {
			t.Errorf("%q: %+v, %v", text, s, err)
		}
	}
}

func TestParseRefusesNamingThePart(t *testing.T) {
	tests := []struct{ text, says string }{
		{"explode", `unknown kind "explode"`},
		{"error:zone", `"zone" is not KEY=VALUE`},
		{"error:zone=1,zone=2", "zone given twice"},
		{"error:color=red", "unknown key"},
		{"error:zone=3-1", "zone=3-1"},
		{"error:errno=EWHAT", "errno=EWHAT"},
		{"error:delay=fast", "delay=fast"},
		{"error:zone=1,offset=0", "not both"},
		{"error:length=4k", "length= needs offset="},
		{"readonly", "needs zone="},
		{"readonly:zone=2,op=read", "only zone="},
		{"error:op=trim", `op "trim"`},
	}
	for _, tc := range tests {
		_, err := Parse(tc.text)
		if !errors.Is(err, ErrSyntax) || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("Parse(%q) = %v, want ErrSyntax saying %q", tc.text, err, tc.says)
		}
	}
}

func TestResolveChecksAgainstTheVolume(t *testing.T) {
	for _, text := range []string{"error:zone=8", "readonly:zone=0", "offline:zone=6-9", "error:offset=8M", "delay:op=read",
		"error:op=read,partial=4k", "powercut:op=read", "error:percent=150"} {
		s, err := Parse(text)
		if err != nil {
			t.Errorf("Parse(%q): %v", text, err)
			continue
		}
		if _, err := s.Resolve(geometry); !errors.Is(err, zoned.ErrInvalidFault) || !strings.Contains(err.Error(), text) {
			t.Errorf("Resolve(%q) = %v, want ErrInvalidFault quoting it", text, err)
		}
	}
}

func TestParseListSplitsOnSemicolons(t *testing.T) {
	specs, err := ParseList(" readonly:zone=3 ; error:zone=4,nth=2;; ")
	if err != nil || len(specs) != 2 || specs[0].Kind != KindReadOnly || specs[1].Fault.Nth != 2 {
		t.Fatalf("ParseList: %+v, %v", specs, err)
	}
	if specs, err := ParseList(""); err != nil || specs != nil {
		t.Errorf("empty list: %+v, %v", specs, err)
	}
	if _, err := ParseList("error;bogus"); !errors.Is(err, ErrSyntax) {
		t.Errorf("a bad fault in the list: %v", err)
	}
}

func FuzzParseList(f *testing.F) {
	for _, seed := range []string{"error:op=write,zone=4,nth=3,count=1,errno=ENOSPC", "delay:delay=5ms,jitter=1ms;readonly:zone=2-3", "powercut:op=write,nth=1", "error:offset=0x1000,length=4k,partial=512"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, text string) {
		specs, err := ParseList(text)
		if err != nil {
			if !errors.Is(err, ErrSyntax) {
				t.Fatalf("%q: error %v does not wrap ErrSyntax", text, err)
			}
			return
		}
		for _, s := range specs {
			r, err := s.Resolve(geometry)
			if err != nil {
				continue
			}
			if r.Rule() {
				if err := r.Fault.Check(geometry); err != nil {
					t.Fatalf("%q resolved to a rule Check refuses: %v", s, err)
				}
			} else if r.FirstZone < geometry.ConventionalZones || r.LastZone >= geometry.NumZones() {
				t.Fatalf("%q resolved to zones %d-%d", s, r.FirstZone, r.LastZone)
			}
		}
	})
}
