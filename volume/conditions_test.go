package volume

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/zoned"
)

func TestInjectedConditionsSurviveReopenOutsideTheImage(t *testing.T) {
	g := zoned.Geometry{ZoneSize: zoneSize, ZoneCapacity: zoneSize, ConventionalZones: 1, MaxAppendBytes: 64 << 10}
	path := createTestImage(t, g, 8*zoneSize)
	open := func() *Volume {
		t.Helper()
		v, err := Open(path, image.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	v := open()
	z := v.Backend.(*Zoned)
	if err := z.WriteAt(bytes.Repeat([]byte{5}, 4096), 3*zoneSize); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	v = open()
	z = v.Backend.(*Zoned)
	for i, c := range map[int]zoned.Condition{3: zoned.ReadOnly, 6: zoned.Offline} {
		if err := z.SetCondition(i, c); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("injecting zone conditions changed the image file: a reader that does not know them would see it")
	}

	v = open()
	z = v.Backend.(*Zoned)
	if got := z.Dev.Conditions(); len(got) != 2 || got[3] != zoned.ReadOnly || got[6] != zoned.Offline {
		t.Fatalf("after reopen: conditions %v, want zone 3 read-only and 6 offline", got)
	}
	if r := z.Report(3, 1)[0]; r.WritePointer != 3*zoneSize+4096 {
		t.Errorf("read-only zone after reopen: %+v, want its write pointer kept", r)
	}
	for _, i := range []int{3, 6} {
		if err := z.SetCondition(i, zoned.Empty); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(ConditionsPath(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("conditions file after clearing every condition: %v, want it removed", err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestBadConditionsFileIsRefusedNamingIt(t *testing.T) {
	g := zoned.Geometry{ZoneSize: zoneSize, ZoneCapacity: zoneSize, ConventionalZones: 1, MaxAppendBytes: 64 << 10}
	for name, content := range map[string]string{
		"not json":          "{",
		"unknown condition": `{"zones": {"2": "melted"}}`,
		"not an index":      `{"zones": {"two": "offline"}}`,
		"conventional zone": `{"zones": {"0": "offline"}}`,
		"past the last":     `{"zones": {"8": "read-only"}}`,
	} {
		t.Run(name, func(t *testing.T) {
			path := createTestImage(t, g, 8*zoneSize)
			if err := os.WriteFile(ConditionsPath(path), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			before, _ := os.ReadFile(path)
			v, err := Open(path, image.OpenOptions{})
			if err == nil {
				v.Close()
				t.Fatalf("opened with conditions %s", content)
			}
			if !errors.Is(err, ErrBadConditions) || !bytes.Contains([]byte(err.Error()), []byte(ConditionsPath(path))) {
				t.Errorf("error %v: want ErrBadConditions naming the file", err)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Errorf("the refused open changed the image")
			}
		})
	}
}
