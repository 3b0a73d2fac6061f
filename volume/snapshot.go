package volume

import (
	"errors"
	"fmt"
	"os"
)

// Snapshot freezes the volume's present contents, with its zone
// conditions, as the read-only image at path and goes on as an overlay of
// it (image.SnapshotTo). The zone model flushes first, so the snapshot
// holds every zone as that flush left it: a crash-consistent image, taken
// while the volume serves.
func (v *Volume) Snapshot(path string) error {
	if err := v.Flush(); err != nil {
		return fmt.Errorf("snapshot: flush: %w", err)
	}
	if err := CopyConditions(v.Path, path); err != nil {
		return err
	}
	if err := v.Img.SnapshotTo(path); err != nil {
		os.Remove(ConditionsPath(path))
		return err
	}
	return nil
}

// CopyConditions gives the image at to the zone conditions the image at
// from has (conditions.go); none, if it has none.
func CopyConditions(from, to string) error {
	b, err := os.ReadFile(ConditionsPath(from))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err == nil {
		err = os.WriteFile(ConditionsPath(to), b, 0o644)
	}
	if err != nil {
		return fmt.Errorf("zone conditions: %w", err)
	}
	return nil
}
