package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// A volume ID is also a file name in the pool and the state directory, so
// it is checked against this before it touches a path: letters, digits,
// '.', '_' and '-', not starting with '.', at most 128 bytes (the CSI
// limit for names).
var idPattern = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`)

// errBadID: a volume ID that cannot be one of ours.
var errBadID = errors.New("invalid volume ID")

func checkID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("%w %q: must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'", errBadID, id)
	}
	return nil
}

// idForName is the volume ID of a CreateVolume name: the name itself when
// it is a valid ID (Kubernetes' pvc-<uid> names are), else a digest of it.
func idForName(name string) string {
	if checkID(name) == nil {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return "zq-" + hex.EncodeToString(sum[:16])
}

// volumeMeta is what the pool records of a volume beside its image.
type volumeMeta struct {
	ID         string            `json:"id"`
	Name       string            `json:"name"`
	Size       int64             `json:"size"`
	Parameters map[string]string `json:"parameters"`
	Attach     string            `json:"attach"`
}

// geometry is what the volume's StorageClass asked for and the zone
// geometry the volume has at its size.
func (m *volumeMeta) geometry() (VolumeParams, zoned.Geometry, error) {
	params, err := ParseParameters(m.Parameters)
	if err != nil {
		return VolumeParams{}, zoned.Geometry{}, fmt.Errorf("stored parameters: %w", err)
	}
	_, g, err := params.Size(m.Size, 0)
	if err != nil {
		return VolumeParams{}, zoned.Geometry{}, fmt.Errorf("stored parameters at size %d: %w", m.Size, err)
	}
	return params, g, nil
}

// pool is the node-local directory of volume images: <id>.qcow2 and
// <id>.json. The metadata file is the volume's existence: it is written
// (atomically) after the image, so an image without one is a leftover of
// an interrupted create.
type pool struct{ dir string }

func (p pool) imagePath(id string) string { return filepath.Join(p.dir, id+".qcow2") }
func (p pool) metaPath(id string) string  { return filepath.Join(p.dir, id+".json") }

// lookup returns a volume's metadata; os.ErrNotExist when there is none.
func (p pool) lookup(id string) (*volumeMeta, error) {
	var m volumeMeta
	if err := readJSON(p.metaPath(id), &m); err != nil {
		return nil, err
	}
	return &m, nil
}

func (p pool) save(m *volumeMeta) error { return writeJSON(p.metaPath(m.ID), m) }

// remove deletes a volume: its metadata first (from then on it does not
// exist), then the image and the zone conditions kept beside it.
func (p pool) remove(id string) error {
	for _, path := range []string{p.metaPath(id), p.imagePath(id), volume.ConditionsPath(p.imagePath(id))} {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return syncDir(p.dir)
}

// list returns the IDs of the pool's volumes, sorted.
func (p pool) list() ([]string, error) {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if id, ok := strings.CutSuffix(e.Name(), ".json"); ok && checkID(id) == nil {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids, nil
}

// free is the space available to new images, in bytes.
func (p pool) free() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(p.dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", p.dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// inUse reports whether a process has the image open for writing: its
// server (image.Open takes an exclusive flock for that).
func inUse(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return true, nil
	}
	return false, err
}

// growImage grows a volume's image, which nobody serves, to size. With the
// node's journal directory, whatever a killed plugin left is replayed first.
func growImage(path, journalDir string, size int64) error {
	img, err := image.Open(path, image.OpenOptions{JournalDir: journalDir})
	if err != nil {
		return err
	}
	err = img.Grow(size)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return err
}

// writeJSON replaces path with v's JSON, durably: a temporary file, fsync,
// rename, fsync of the directory.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return syncDir(filepath.Dir(path))
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
