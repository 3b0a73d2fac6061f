package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/zq-csi/zq-csi/zoned"
)

// Injected zone conditions (read-only, offline) outlive the process in a
// file beside the image, IMAGE.conditions, never in the image: the zoned
// qcow2 format has no such conditions, and an implementation that does not
// know them (QEMU) must open the image as it always did. The file is JSON:
//
//	{"zones": {"5": "read-only", "9": "offline"}}
//
// keyed by zone index. No file, or an empty map, means no injected
// condition; the file is removed when the last one is cleared.

// ConditionsPath is the file that keeps the injected zone conditions of the
// image at path.
func ConditionsPath(path string) string { return path + ".conditions" }

// ErrBadConditions: a conditions file that does not parse or names a zone
// the image does not have as a sequential zone.
var ErrBadConditions = errors.New("bad zone conditions file")

type conditionsFile struct {
	Zones map[string]string `json:"zones"`
}

var conditionNames = map[string]zoned.Condition{"read-only": zoned.ReadOnly, "offline": zoned.Offline}

// loadConditions applies the conditions kept for the image at path.
func loadConditions(path string, dev *zoned.Device) error {
	b, err := os.ReadFile(ConditionsPath(path))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("zone conditions: %w", err)
	}
	var f conditionsFile
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("%w %s: %w", ErrBadConditions, ConditionsPath(path), err)
	}
	for k, name := range f.Zones {
		i, err := strconv.Atoi(k)
		c, ok := conditionNames[name]
		if err != nil || !ok {
			return fmt.Errorf("%w %s: zone %q: %q (want a zone index and read-only or offline)", ErrBadConditions, ConditionsPath(path), k, name)
		}
		if err := dev.SetCondition(i, c); err != nil {
			return fmt.Errorf("%w %s: %w", ErrBadConditions, ConditionsPath(path), err)
		}
	}
	return nil
}

// saveConditions writes the device's injected conditions to the file of
// the image at path, replacing it whole (write, sync, rename), or removes
// it when there are none.
func saveConditions(path string, dev *zoned.Device) error {
	conds := dev.Conditions()
	name := ConditionsPath(path)
	if len(conds) == 0 {
		if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("zone conditions: %w", err)
		}
		return nil
	}
	f := conditionsFile{Zones: map[string]string{}}
	for i, c := range conds {
		for n, v := range conditionNames {
			if v == c {
				f.Zones[strconv.Itoa(i)] = n
			}
		}
	}
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(name), filepath.Base(name)+".*")
	if err != nil {
		return fmt.Errorf("zone conditions: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(append(b, '\n'))
	err = errors.Join(err, tmp.Sync(), tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), name)
	}
	if err != nil {
		return fmt.Errorf("zone conditions: %w", err)
	}
	return nil
}

// SetCondition puts sequential zone i in condition c (zoned.ReadOnly or
// zoned.Offline, or zoned.Empty to clear one) and keeps it across reopens
// (ConditionsPath).
func (b *Zoned) SetCondition(i int, c zoned.Condition) error {
	if err := b.Dev.SetCondition(i, c); err != nil {
		return err
	}
	if b.path == "" {
		return nil
	}
	return saveConditions(b.path, b.Dev)
}
