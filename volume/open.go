package volume

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"path/filepath"

	"github.com/zq-csi/zq-csi/image"
)

// Volume is an open image as a frontend serves it: its Backend (Plain, or
// Zoned for a zoned image, whose zone side is Zones()) is the one way to
// its blocks and zones.
type Volume struct {
	Backend
	Path string       // the image file
	Img  *image.Image // the image, for what is not I/O: info, journal, closing
}

// Open opens the image at path with opts and, if it is zoned, its zone
// model with the zone conditions injected faults left (conditions.go). A zoned image is validated read-only first: image.Open accepts
// some geometries that the zone model refuses (volume.OpenZones), and a
// read-write image rewrites on close what it normalized on open (a
// big-endian write-pointer table, for one), so a bad image is refused
// before anything can change its bytes.
func Open(path string, opts image.OpenOptions) (*Volume, error) {
	img, err := image.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	_, isZoned := img.Zones()
	if isZoned {
		dev, err := OpenZones(img)
		if err == nil {
			err = loadConditions(path, dev)
		}
		if err != nil {
			img.Close()
			return nil, fmt.Errorf("zoned image: %w", err)
		}
	}
	if !opts.ReadOnly {
		if err := img.Close(); err != nil {
			return nil, err
		}
		if img, err = image.Open(path, opts); err != nil {
			return nil, err
		}
	}
	if !isZoned {
		return &Volume{Backend: Plain{Img: img}, Path: path, Img: img}, nil
	}
	dev, err := OpenZones(img)
	if err == nil {
		err = loadConditions(path, dev)
	}
	if err != nil {
		img.Close()
		return nil, fmt.Errorf("zoned image: %w", err)
	}
	return &Volume{Backend: &Zoned{Img: img, Dev: dev, path: path}, Path: path, Img: img}, nil
}

// SetVolatileCache gives a zoned volume a volatile write cache
// (zoned.Device.SetVolatileCache), which power cuts need. Call it before
// the volume serves.
func (v *Volume) SetVolatileCache() error {
	z, ok := v.Backend.(*Zoned)
	if !ok {
		return ErrNotZoned
	}
	z.Dev.SetVolatileCache()
	return nil
}

// Tag identifies the image at path for the kernel frontends, which keep it
// with the device they serve it through (ublk's ublksrv_flags, nbd's
// backend identifier): a hash of the absolute path, never 0. A server taking
// a device back checks it, so that a stale record never puts one image
// under another's device.
func Tag(path string) uint64 {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	h := fnv.New64a()
	h.Write([]byte(path))
	return h.Sum64() | 1
}

// BackendID is Tag as nbd's backend identifier (/sys/block/nbdN/backend).
func BackendID(path string) string { return fmt.Sprintf("zq-csi:%016x", Tag(path)) }

// Close flushes a writable volume (through the zone model: every write
// pointer durable after its data) and closes the image.
func (v *Volume) Close() error {
	var err error
	if !v.Img.ReadOnly() {
		if err = v.Flush(); err != nil {
			err = fmt.Errorf("flush: %w", err)
		}
	}
	return errors.Join(err, v.Img.Close())
}

// WriteFrom writes n bytes read from r at off as one request: on a zoned
// volume the zone model checks the whole range first (Zones.WriteFrom);
// a plain one takes it in pieces.
func (v *Volume) WriteFrom(r io.Reader, off, n int64) error {
	if z := v.Zones(); z != nil {
		return z.WriteFrom(r, off, n)
	}
	buf := make([]byte, min(max(n, 0), writeFromChunk))
	for done := int64(0); done < n; {
		p := buf[:min(n-done, int64(len(buf)))]
		if _, err := io.ReadFull(r, p); err != nil {
			return fmt.Errorf("write at %#x: reading the data: %w", off+done, err)
		}
		if err := v.WriteAt(p, off+done); err != nil {
			return err
		}
		done += int64(len(p))
	}
	return nil
}

// writeFromChunk bounds the buffer of a plain volume's WriteFrom.
const writeFromChunk = 1 << 20
