// Package faultctl is how users inject faults into live zoned volumes: the
// text form of a fault (Spec, the same in `zq-csi fault`, a StorageClass's
// faults parameter and a claim's annotation), and the control socket over
// which a running `zq-csi attach`, `export` or node plugin takes them
// (Server, Do). The rules themselves are zoned.Device's (zoned/fault.go);
// zone conditions are kept beside the image by package volume.
package faultctl

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/imageopt"
	"github.com/zq-csi/zq-csi/zoned"
)

// ErrSyntax: a fault's text that does not parse; the message names the part.
var ErrSyntax = errors.New("fault syntax")

// Kinds of fault, as the text names them.
const (
	KindError    = "error"
	KindDelay    = "delay"
	KindPowerCut = "powercut"
	KindReadOnly = "readonly"
	KindOffline  = "offline"
	KindOnline   = "online" // clears readonly, offline and reset-recommended
	// KindResetRecommended sets ZBC's "reset recommended" zone attribute
	// (blkzone's reset:1), which the zone's reset clears.
	KindResetRecommended = "reset-recommended"
)

// Spec is one fault as a user writes it:
//
//	KIND[:KEY=VALUE[,KEY=VALUE]...]
//
// KIND is error, delay or powercut (a rule on requests), or readonly,
// offline, reset-recommended or online (a zone condition or attribute;
// online clears the others). Keys:
//
//	zone=N or zone=N-M   the zones the fault covers (conditions need it)
//	offset=SIZE, length=SIZE   a byte range instead (rules only)
//	op=read|write|flush|zone|all  requests selected, joined with |
//	                     (default: error and delay write, powercut flush)
//	nth=N                fire from the Nth selected request on
//	count=N              fire N times, then stay idle (powercut: default 1)
//	percent=P            fire on P% of the selected requests
//	errno=NAME|NUMBER    error: what the request gets (default EIO)
//	partial=SIZE         error on writes: bytes that land before it
//	delay=DURATION, jitter=DURATION   delay: fixed part, uniform extra
//
// Sizes are as in image options (4k, 1M, 0x1000); durations as Go writes
// them (5ms, 1.5s). Several faults are joined with ";".
type Spec struct {
	Kind string
	// Fault is the rule of error, delay and powercut, its range still to
	// resolve from the zones (Resolve).
	Fault zoned.Fault
	// FirstZone and LastZone are the zone= range; -1 when not given.
	FirstZone, LastZone int
	text                string
}

// String returns the spec as it was written.
func (s Spec) String() string { return s.text }

// Rule reports whether the spec is a rule on requests (not a zone condition).
func (s Spec) Rule() bool {
	return s.Kind == KindError || s.Kind == KindDelay || s.Kind == KindPowerCut
}

// Condition is the zone condition a readonly, offline or online spec sets.
func (s Spec) Condition() zoned.Condition {
	switch s.Kind {
	case KindReadOnly:
		return zoned.ReadOnly
	case KindOffline:
		return zoned.Offline
	}
	return zoned.Empty
}

// ParseList parses faults joined with ";" (blanks around each allowed; an
// empty string is no fault).
func ParseList(text string) ([]Spec, error) {
	var specs []Spec
	for _, part := range strings.Split(text, ";") {
		if part = strings.TrimSpace(part); part == "" {
			continue
		}
		s, err := Parse(part)
		if err != nil {
			return nil, err
		}
		specs = append(specs, s)
	}
	return specs, nil
}

// Parse parses one fault. It checks what does not depend on the volume;
// Resolve checks the rest.
func Parse(text string) (Spec, error) {
	kind, args, _ := strings.Cut(strings.TrimSpace(text), ":")
	s := Spec{Kind: kind, FirstZone: -1, LastZone: -1, text: strings.TrimSpace(text)}
	f := &s.Fault
	switch kind {
	case KindError:
		f.Action, f.Op = zoned.Fail, zoned.OpWrite
	case KindDelay:
		f.Action, f.Op = zoned.Delay, zoned.OpWrite
	case KindPowerCut:
		f.Action, f.Op, f.Count = zoned.PowerCut, zoned.OpFlush, 1
	case KindReadOnly, KindOffline, KindOnline, KindResetRecommended:
	default:
		return Spec{}, fmt.Errorf("%w: %q: unknown kind %q (want error, delay, powercut, readonly, offline, reset-recommended or online)", ErrSyntax, text, kind)
	}
	seen := map[string]bool{}
	for _, kv := range strings.Split(args, ",") {
		if kv == "" && args == "" {
			break
		}
		key, value, ok := strings.Cut(kv, "=")
		if !ok || value == "" {
			return Spec{}, fmt.Errorf("%w: %q: %q is not KEY=VALUE", ErrSyntax, text, kv)
		}
		if seen[key] {
			return Spec{}, fmt.Errorf("%w: %q: %s given twice", ErrSyntax, text, key)
		}
		seen[key] = true
		if !s.Rule() && key != "zone" {
			return Spec{}, fmt.Errorf("%w: %q: a zone condition takes only zone=", ErrSyntax, text)
		}
		if err := s.set(key, value); err != nil {
			return Spec{}, fmt.Errorf("%w: %q: %s=%s: %w", ErrSyntax, text, key, value, err)
		}
	}
	switch {
	case !s.Rule() && s.FirstZone < 0:
		return Spec{}, fmt.Errorf("%w: %q: %s needs zone=", ErrSyntax, text, kind)
	case s.FirstZone >= 0 && (seen["offset"] || seen["length"]):
		return Spec{}, fmt.Errorf("%w: %q: zone= or offset=/length=, not both", ErrSyntax, text)
	case seen["length"] && !seen["offset"]:
		return Spec{}, fmt.Errorf("%w: %q: length= needs offset=", ErrSyntax, text)
	}
	return s, nil
}

func (s *Spec) set(key, value string) error {
	f := &s.Fault
	var err error
	switch key {
	case "zone":
		first, last, isRange := strings.Cut(value, "-")
		if s.FirstZone, err = strconv.Atoi(first); err == nil {
			s.LastZone = s.FirstZone
			if isRange {
				s.LastZone, err = strconv.Atoi(last)
			}
		}
		if err == nil && (s.FirstZone < 0 || s.LastZone < s.FirstZone) {
			err = errors.New("want N or N-M with N <= M")
		}
	case "offset":
		f.Start, err = imageopt.ParseSize(value)
	case "length":
		f.Length, err = imageopt.ParseSize(value)
	case "op":
		f.Op, err = zoned.ParseOp(value)
	case "nth":
		f.Nth, err = strconv.Atoi(value)
	case "count":
		f.Count, err = strconv.Atoi(value)
	case "percent":
		f.Percent, err = strconv.ParseFloat(value, 64)
	case "errno":
		f.Errno, err = parseErrno(value)
	case "partial":
		f.Partial, err = imageopt.ParseSize(value)
	case "delay":
		f.Delay, err = time.ParseDuration(value)
	case "jitter":
		f.Jitter, err = time.ParseDuration(value)
	default:
		return errors.New("unknown key (want zone, offset, length, op, nth, count, percent, errno, partial, delay, jitter)")
	}
	return err
}

func parseErrno(v string) (unix.Errno, error) {
	for e := unix.Errno(1); e < 200; e++ {
		if unix.ErrnoName(e) == strings.ToUpper(v) {
			return e, nil
		}
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 || n > 4095 {
		return 0, errors.New("want an errno name (EIO, ENOSPC, ...) or number")
	}
	return unix.Errno(n), nil
}

// Resolve turns the spec's zones into its byte range on a device of
// geometry g and checks it there.
func (s Spec) Resolve(g zoned.Geometry) (Spec, error) {
	if s.LastZone >= g.NumZones() {
		return Spec{}, fmt.Errorf("%w: %q: zone %d: the volume has zones 0 to %d", zoned.ErrInvalidFault, s.text, s.LastZone, g.NumZones()-1)
	}
	if !s.Rule() {
		if s.FirstZone < g.ConventionalZones {
			return Spec{}, fmt.Errorf("%w: %q: zone %d is conventional (sequential zones start at %d)", zoned.ErrInvalidFault, s.text, s.FirstZone, g.ConventionalZones)
		}
		return s, nil
	}
	if s.FirstZone >= 0 {
		s.Fault.Start = int64(s.FirstZone) * g.ZoneSize
		s.Fault.Length = min(int64(s.LastZone+1)*g.ZoneSize, g.Size) - s.Fault.Start
	}
	if err := s.Fault.Check(g); err != nil {
		return Spec{}, fmt.Errorf("%q: %w", s.text, err)
	}
	return s, nil
}
