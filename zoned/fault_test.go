package zoned

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"
)

// zs is the zone size of small.
const zs = 4096

func TestReadOnlyZoneReadsButRefusesEveryChange(t *testing.T) {
	d, _ := newDev(t, small)
	mustDo(t, wantN(d.WriteAt(fill(1024, 7), 2*zs)))
	mustDo(t, d.SetCondition(2, ReadOnly))
	if z := zoneN(d, 2); z.Cond != ReadOnly || z.WritePointer != 2*zs+1024 {
		t.Fatalf("report: %+v, want read-only keeping its write pointer", z)
	}
	if got := readAll(t, d, 2*zs, 1024); !bytes.Equal(got, fill(1024, 7)) {
		t.Errorf("read of a read-only zone lost its data")
	}
	changes := map[string]func() error{
		"write":  func() error { _, err := d.WriteAt(fill(512, 1), 2*zs+1024); return err },
		"append": func() error { _, err := d.Append(fill(512, 1), 2*zs); return err },
		"zeros": func() error {
			return d.WriteFrom(bytes.NewReader(make([]byte, 512)), 2*zs+1024, 512)
		},
		"open":                     func() error { return d.Open(2*zs, zs) },
		"close":                    func() error { return d.Close(2*zs, zs) },
		"finish":                   func() error { return d.Finish(2*zs, zs) },
		"reset":                    func() error { return d.Reset(2*zs, zs) },
		"reset of a range over it": func() error { return d.Reset(zs, 3*zs) },
	}
	for name, change := range changes {
		err := change()
		if !errors.Is(err, ErrZoneReadOnly) || Errno(err) != syscall.EIO {
			t.Errorf("%s: %v, want ErrZoneReadOnly (EIO)", name, err)
		}
	}
	if z := zoneN(d, 2); z.Cond != ReadOnly || z.WritePointer != 2*zs+1024 {
		t.Errorf("after the refused changes: %+v", z)
	}
	mustDo(t, wantN(d.WriteAt(fill(512, 3), 3*zs)))
	mustDo(t, d.ResetAll())
	if z2, z3 := zoneN(d, 2), zoneN(d, 3); z2.Cond != ReadOnly || z3.Cond != Empty {
		t.Errorf("reset all: zone 2 %v, zone 3 %v; want it to skip the read-only zone only", z2.Cond, z3.Cond)
	}
	mustDo(t, d.SetCondition(2, Empty))
	if z := zoneN(d, 2); z.Cond != Closed || z.WritePointer != 2*zs+1024 {
		t.Errorf("cleared: %+v, want closed at its old write pointer", z)
	}
	mustDo(t, wantN(d.WriteAt(fill(512, 1), 2*zs+1024)))
}

func TestOfflineZoneRefusesReadsToo(t *testing.T) {
	d, _ := newDev(t, small)
	mustDo(t, d.SetCondition(4, Offline))
	for name, err := range map[string]error{
		"read": func() error { _, err := d.ReadAt(make([]byte, 512), 4*zs); return err }(),
		"read across it": func() error {
			_, err := d.ReadAt(make([]byte, 2*zs), 3*zs)
			return err
		}(),
		"write": func() error { _, err := d.WriteAt(fill(512, 1), 4*zs); return err }(),
		"reset": d.Reset(4*zs, zs),
	} {
		if !errors.Is(err, ErrZoneOffline) || Errno(err) != syscall.EIO {
			t.Errorf("%s: %v, want ErrZoneOffline (EIO)", name, err)
		}
	}
	if _, err := d.ReadAt(make([]byte, 512), 3*zs); err != nil {
		t.Errorf("read of the zone below: %v", err)
	}
	if got := d.Conditions(); len(got) != 1 || got[4] != Offline {
		t.Errorf("Conditions() = %v", got)
	}
}

func TestTakingAZoneOutOfServiceFreesItsResources(t *testing.T) {
	g := small
	g.MaxOpenZones, g.MaxActiveZones = 1, 1
	d, _ := newDev(t, g)
	mustDo(t, wantN(d.WriteAt(fill(512, 1), 1*zs)))
	if _, err := d.WriteAt(fill(512, 1), 2*zs); !errors.Is(err, ErrActiveResources) {
		t.Fatalf("second zone with max_active 1: %v", err)
	}
	mustDo(t, d.SetCondition(1, ReadOnly))
	if open, active := d.Resources(); open != 0 || active != 0 {
		t.Errorf("resources with the only open zone read-only: open %d, active %d", open, active)
	}
	mustDo(t, wantN(d.WriteAt(fill(512, 1), 2*zs)))
}

func TestSetConditionRefusesWhatItCannotApply(t *testing.T) {
	d, _ := newDev(t, small)
	for _, tc := range []struct {
		zone int
		c    Condition
	}{{0, ReadOnly}, {8, Offline}, {-1, ReadOnly}, {2, Full}, {2, ExplicitOpen}} {
		if err := d.SetCondition(tc.zone, tc.c); !errors.Is(err, ErrInvalidFault) {
			t.Errorf("SetCondition(%d, %v) = %v, want ErrInvalidFault", tc.zone, tc.c, err)
		}
	}
}

func wantN(_ int, err error) error { return err }

func TestFailRules(t *testing.T) {
	tests := []struct {
		name string
		rule Fault
		// writes are 512-byte writes at zone 2's write pointer; fails
		// lists the (1-based) ones that must fail.
		writes int
		fails  []int
		errno  syscall.Errno
	}{
		{"nth write to the zone, once", Fault{Action: Fail, Op: OpWrite, Start: 2 * zs, Length: zs, Nth: 3, Count: 1, Errno: syscall.ENOSPC},
			5, []int{3}, syscall.ENOSPC},
		{"every write from the nth until removed", Fault{Action: Fail, Op: OpWrite, Start: 2 * zs, Length: zs, Nth: 2},
			4, []int{2, 3, 4}, syscall.EIO},
		{"another zone's range does not match", Fault{Action: Fail, Op: OpWrite, Start: 3 * zs, Length: zs},
			3, nil, 0},
		{"reads only: writes pass", Fault{Action: Fail, Op: OpRead},
			3, nil, 0},
		{"twice from the first", Fault{Action: Fail, Op: OpWrite | OpFlush, Count: 2, Errno: syscall.EREMOTEIO},
			4, []int{1, 2}, syscall.EREMOTEIO},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := newDev(t, small)
			id, err := d.AddFault(tc.rule)
			mustDo(t, err)
			wp := int64(2 * zs)
			for w := 1; w <= tc.writes; w++ {
				_, err := d.WriteAt(fill(512, byte(w)), wp)
				wantFail := bytes.Contains([]byte(fmt.Sprint(tc.fails)), []byte(fmt.Sprint(w)))
				switch {
				case wantFail && (!errors.Is(err, ErrInjected) || Errno(err) != tc.errno):
					t.Errorf("write %d: %v, want an injected %v", w, err, tc.errno)
				case !wantFail && err != nil:
					t.Errorf("write %d: %v", w, err)
				case err == nil:
					wp += 512
				}
				if got := zoneN(d, 2).WritePointer; got != wp {
					t.Fatalf("write %d: write pointer %#x, want %#x (a failed write moves nothing)", w, got, wp)
				}
			}
			st := d.Faults()
			if len(st) != 1 || st[0].ID != id || st[0].Fired != int64(len(tc.fails)) {
				t.Errorf("Faults() = %+v, want rule %d fired %d times", st, id, len(tc.fails))
			}
			if d.RemoveFault(id) != 1 || d.Faults() != nil {
				t.Errorf("RemoveFault left %+v", d.Faults())
			}
			if _, err := d.WriteAt(fill(512, 1), wp); err != nil {
				t.Errorf("write after the rule was removed: %v", err)
			}
		})
	}
}

func TestPartialWriteLandsItsFirstBytes(t *testing.T) {
	d, _ := newDev(t, small)
	_, err := d.AddFault(Fault{Action: Fail, Op: OpWrite, Partial: 1024, Count: 1})
	mustDo(t, err)
	n, err := d.WriteAt(fill(2048, 9), 2*zs)
	if !errors.Is(err, ErrInjected) || n != 1024 {
		t.Fatalf("partial write: n %d, %v; want 1024 and the injected error", n, err)
	}
	if z := zoneN(d, 2); z.WritePointer != 2*zs+1024 {
		t.Errorf("write pointer %#x, want the 1024 bytes that landed", z.WritePointer)
	}
	want := append(fill(1024, 9), make([]byte, 1024)...)
	if got := readAll(t, d, 2*zs, 2048); !bytes.Equal(got, want) {
		t.Errorf("read back: not the first 1024 bytes then zeros")
	}
}

func TestDelayRuleHoldsTheRequest(t *testing.T) {
	d, _ := newDev(t, small)
	_, err := d.AddFault(Fault{Action: Delay, Op: OpRead, Delay: 20 * time.Millisecond})
	mustDo(t, err)
	start := time.Now()
	readAll(t, d, 0, 512)
	if el := time.Since(start); el < 20*time.Millisecond {
		t.Errorf("delayed read took %v, less than the 20ms delay", el)
	}
	if _, err := d.WriteAt(fill(512, 1), 0); err != nil {
		t.Errorf("a write, which the rule does not select: %v", err)
	}
	if st := d.Faults(); st[0].Fired != 1 || st[0].Matched != 1 {
		t.Errorf("Faults() = %+v, want one read matched and delayed", st)
	}
}

func TestPercentFiresOnAboutThatShare(t *testing.T) {
	d, _ := newDev(t, small)
	_, err := d.AddFault(Fault{Action: Fail, Op: OpRead, Percent: 25})
	mustDo(t, err)
	failed := 0
	for range 2000 {
		if _, err := d.ReadAt(make([]byte, 512), 0); err != nil {
			failed++
		}
	}
	// Binomial(2000, 0.25): mean 500, sd 19; the bounds are 10 sd away.
	if failed < 310 || failed > 690 {
		t.Errorf("%d of 2000 reads failed with percent 25", failed)
	}
}

func TestAddFaultRefusesBadRules(t *testing.T) {
	d, _ := newDev(t, small)
	for _, f := range []Fault{
		{Op: OpRead},
		{Action: Fail},
		{Action: Fail, Op: OpRead, Start: small.Size},
		{Action: Fail, Op: OpRead, Start: 0, Length: small.Size + 1},
		{Action: Fail, Op: OpRead, Percent: 101},
		{Action: Fail, Op: OpWrite, Partial: 100},
		{Action: Fail, Op: OpRead, Partial: 512},
		{Action: Delay, Op: OpRead},
		{Action: Fail, Op: OpRead, Delay: time.Second},
		{Action: Delay, Op: OpRead, Delay: 2 * time.Minute},
		{Action: PowerCut, Op: OpRead},
	} {
		if _, err := d.AddFault(f); !errors.Is(err, ErrInvalidFault) {
			t.Errorf("AddFault(%+v) = %v, want ErrInvalidFault", f, err)
		}
	}
	if _, err := d.AddFault(Fault{Action: PowerCut, Op: OpFlush}); !errors.Is(err, ErrNoVolatileCache) {
		t.Errorf("power cut rule without a volatile cache: %v", err)
	}
	if _, err := d.PowerCut(); !errors.Is(err, ErrNoVolatileCache) {
		t.Errorf("PowerCut without a volatile cache: %v", err)
	}
}

func TestOpStringsParseBack(t *testing.T) {
	for _, o := range []Op{OpRead, OpWrite, OpFlush, OpZoneManagement, OpRead | OpWrite, OpWrite | OpFlush | OpZoneManagement, OpAll} {
		got, err := ParseOp(o.String())
		if err != nil || got != o {
			t.Errorf("ParseOp(%q) = %v, %v; want %v", o.String(), got, err, o)
		}
	}
	if _, err := ParseOp("trim"); !errors.Is(err, ErrInvalidFault) {
		t.Errorf("ParseOp(trim): %v", err)
	}
}

// newVolatileDev is newDev with a volatile cache.
func newVolatileDev(t testing.TB, g Geometry) (*Device, *memStore) {
	d, s := newDev(t, g)
	d.SetVolatileCache()
	return d, s
}

// sameDevice compares two devices' zone reports and every byte.
func sameDevice(t *testing.T, what string, got, want *Device) {
	t.Helper()
	g := want.Geometry()
	gr, wr := got.Report(0, g.NumZones()), want.Report(0, g.NumZones())
	for i := range wr {
		if gr[i] != wr[i] {
			t.Errorf("%s: zone %d: %+v, want %+v", what, i, gr[i], wr[i])
		}
	}
	if !bytes.Equal(readAll(t, got, 0, g.Size), readAll(t, want, 0, g.Size)) {
		t.Errorf("%s: data differs", what)
	}
}

// TestPowerCutLeavesWhatACrashWould checks PowerCut against the store's own
// model of a crash: after random writes, appends, finishes, resets and
// flushes, the device after a cut must read and report exactly as a device
// opened anew over what the store's last flush made durable.
func TestPowerCutLeavesWhatACrashWould(t *testing.T) {
	g := Geometry{Size: 16 * zs, ZoneSize: zs, ZoneCapacity: 3072, ConventionalZones: 2, MaxAppendBytes: 2048, MaxOpenZones: 3, MaxActiveZones: 5}
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 1))
		d, s := newVolatileDev(t, g)
		for op := range 60 {
			z := 2 + rng.IntN(14)
			switch rng.IntN(10) {
			case 0, 1, 2:
				wp := zoneN(d, z).WritePointer
				d.WriteAt(fill(512*(1+rng.IntN(3)), byte(op)), wp) // may be refused: full, limits
			case 3:
				d.Append(fill(512, byte(op)), int64(z)*zs)
			case 4, 5:
				off := rng.Int64N(2*zs - 700)
				mustDo(t, wantN(d.WriteAt(fill(1+rng.IntN(700), byte(op)), off)))
			case 6:
				d.Finish(int64(z)*zs, zs)
			case 7:
				d.Reset(int64(z)*zs, zs)
			default:
				mustDo(t, d.Flush())
			}
		}
		crashed, wps := s.crashed()
		want, err := New(crashed, g, wps)
		mustDo(t, err)
		if _, err := d.PowerCut(); err != nil {
			t.Fatalf("seed %d: PowerCut: %v", seed, err)
		}
		sameDevice(t, fmt.Sprintf("seed %d", seed), d, want)
		// And it serves on: every zone takes a write at its pointer.
		for z := 2; z < 16; z++ {
			if zn := zoneN(d, z); zn.Cond != Full {
				if _, err := d.WriteAt(fill(512, 0xAB), zn.WritePointer); err != nil && !errors.Is(err, ErrActiveResources) && !errors.Is(err, ErrOpenResources) {
					t.Errorf("seed %d: zone %d after the cut: %v", seed, z, err)
				}
			}
		}
	}
}

func TestPowerCutRules(t *testing.T) {
	t.Run("at the next flush, which fails", func(t *testing.T) {
		d, _ := newVolatileDev(t, small)
		mustDo(t, wantN(d.WriteAt(fill(512, 1), 2*zs)))
		mustDo(t, d.Flush())
		mustDo(t, wantN(d.WriteAt(fill(512, 2), 2*zs+512)))
		mustDo(t, wantN(d.WriteAt(fill(100, 3), 10)))
		var cuts []PowerCutReport
		d.NotifyPowerCut(func(r PowerCutReport, err error) { mustDo(t, err); cuts = append(cuts, r) })
		_, err := d.AddFault(Fault{Action: PowerCut, Op: OpFlush, Count: 1})
		mustDo(t, err)
		if err := d.Flush(); !errors.Is(err, ErrInjected) || Errno(err) != syscall.EIO {
			t.Fatalf("the flush the power cut replaced: %v, want an injected EIO", err)
		}
		if z := zoneN(d, 2); z.WritePointer != 2*zs+512 || z.Cond != Closed {
			t.Errorf("zone 2 after the cut: %+v, want closed at the flushed 512 bytes", z)
		}
		if got := readAll(t, d, 0, 110); !bytes.Equal(got, make([]byte, 110)) {
			t.Errorf("unflushed conventional write survived the cut")
		}
		if len(cuts) != 1 || cuts[0].Zones != 1 {
			t.Errorf("notified of %+v, want one cut that rolled one zone back", cuts)
		}
		mustDo(t, d.Flush()) // the rule fired its once
	})
	t.Run("after the nth write, which succeeds", func(t *testing.T) {
		d, _ := newVolatileDev(t, small)
		_, err := d.AddFault(Fault{Action: PowerCut, Op: OpWrite, Nth: 3, Count: 1})
		mustDo(t, err)
		for w := range 3 {
			if _, err := d.WriteAt(fill(512, 1), 3*zs+int64(w)*512); err != nil {
				t.Fatalf("write %d: %v", w+1, err)
			}
		}
		if z := zoneN(d, 3); z.WritePointer != 3*zs || z.Cond != Empty {
			t.Errorf("zone 3 after the cut: %+v, want empty (nothing was flushed)", z)
		}
	})
}

func TestPowerCutKeepsInjectedConditionsAndResets(t *testing.T) {
	d, _ := newVolatileDev(t, small)
	mustDo(t, wantN(d.WriteAt(fill(1024, 1), 2*zs)))
	mustDo(t, d.Flush())
	mustDo(t, d.Reset(2*zs, zs)) // a reset is durable when it returns
	mustDo(t, wantN(d.WriteAt(fill(512, 1), 3*zs)))
	mustDo(t, d.SetCondition(3, ReadOnly))
	_, err := d.PowerCut()
	mustDo(t, err)
	if z := zoneN(d, 2); z.Cond != Empty {
		t.Errorf("reset zone after the cut: %+v", z)
	}
	if z := zoneN(d, 3); z.Cond != ReadOnly || z.WritePointer != 3*zs {
		t.Errorf("read-only zone after the cut: %+v, want read-only at its durable pointer", z)
	}
}
