package main

// zq-csi image convert: qemu-img convert between qcow2 and raw, keeping a
// zoned image's zones, write pointers and zone conditions.

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/imageopt"
	"github.com/zq-csi/zq-csi/volume"
)

func convertUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: zq-csi image convert [-p] [-q] [-f qcow2|raw] [-O qcow2|raw] [-o OPTIONS]... SRC DST

Copy the disk SRC reads as into the new image DST, as qemu-img convert does:
only what is not zeros is written, so DST is sparse. A zoned qcow2 SRC
gives a qcow2 DST its zones, write pointers and zone conditions (-o may
set other qcow2 options, not zone ones); a raw DST is the bytes alone.
A raw SRC with -o zone.* makes a zoned DST whose zones are written up to
their last non-zero sector. A backing chain is read whole: DST has none.
-p prints the progress, as qemu-img does. DST must not exist.
`)
}

const convertChunk = 1 << 20

func runImageConvert(e *env, args []string) int {
	fs := newFlagSet(e.prog)
	srcFormat := fs.String("f", "qcow2", "source format: qcow2 or raw")
	dstFormat := fs.String("O", "qcow2", "destination format: qcow2 or raw")
	progress := fs.Bool("p", false, "show progress")
	fs.Bool("q", false, "print nothing on success")
	var olists listFlag
	fs.Var(&olists, "o", "options KEY=VALUE[,KEY=VALUE...] of a qcow2 destination")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		convertUsage(e.stdout)
		return exitOK
	}
	if err != nil {
		return e.fail(err, convertUsage)
	}
	for _, f := range []string{*srcFormat, *dstFormat} {
		if f != "qcow2" && f != "raw" {
			return e.fail(usagef("unsupported format %q: qcow2 or raw", f), convertUsage)
		}
	}
	if len(operands) != 2 {
		return e.fail(usagef("want SRC and DST, got %d operands", len(operands)), convertUsage)
	}
	spec := &imageopt.CreateSpec{}
	if _, err := applyCreateOptions(spec, olists); err != nil {
		return e.fail(usagef("%v", err), nil)
	}
	if len(olists) > 0 && *dstFormat == "raw" {
		return e.fail(usagef("-o: a raw destination takes no options"), nil)
	}
	src, dst := operands[0], operands[1]
	if _, err := os.Lstat(dst); !errors.Is(err, os.ErrNotExist) {
		// Refused before anything is written: a failed convert removes
		// what it made, and must not remove what was there.
		return e.fail(fmt.Errorf("%s: exists, or cannot be checked (%v): convert makes a new image", dst, err), nil)
	}
	if err := convert(e, src, *srcFormat, dst, *dstFormat, spec, *progress); err != nil {
		os.Remove(dst)
		return e.fail(err, nil)
	}
	return exitOK
}

// source is what convert reads: the disk, and the zones of a zoned one.
type source struct {
	io.ReaderAt
	size   int64
	zones  *image.Zones
	wps    []int64
	extent func(off, n int64) (data bool, err error) // nil: everything may be data
}

func openSource(path, format string) (*source, func() error, error) {
	if format == "raw" {
		f, err := os.Open(path)
		if err != nil {
			return nil, nil, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, nil, err
		}
		return &source{ReaderAt: f, size: st.Size()}, f.Close, nil
	}
	img, err := image.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		return nil, nil, err
	}
	s := &source{ReaderAt: img, size: img.Size(), extent: func(off, n int64) (bool, error) {
		ext, err := img.Map(off, n)
		if err != nil {
			return false, err
		}
		for _, x := range ext {
			if x.Data {
				return true, nil
			}
		}
		return false, nil
	}}
	if z, ok := img.Zones(); ok {
		wps, err := img.WritePointers()
		if err != nil {
			img.Close()
			return nil, nil, err
		}
		s.zones, s.wps = &z, wps
	}
	return s, img.Close, nil
}

// destination is what convert writes.
type destination interface {
	io.WriterAt
	Close() error
}

func convert(e *env, src, srcFormat, dst, dstFormat string, spec *imageopt.CreateSpec, progress bool) error {
	s, closeSrc, err := openSource(src, srcFormat)
	if err != nil {
		return err
	}
	defer closeSrc()
	geom, err := spec.Geometry()
	if err != nil {
		return usagef("%v", err)
	}
	if geom != nil && s.zones != nil {
		return usagef("-o zone.*: the zoned source gives the destination its zones")
	}
	var out destination
	var img *image.Image
	zones := s.zones
	if dstFormat == "raw" {
		f, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return err
		}
		if err := f.Truncate(s.size); err != nil {
			f.Close()
			return err
		}
		out, zones = f, nil
	} else {
		spec.SetSize(s.size)
		opts := spec.Options()
		if geom != nil {
			if _, err := volume.CreateZoned(dst, opts, *geom); err != nil {
				return err
			}
		} else {
			opts.Zones = s.zones
			if err := image.Create(dst, opts); err != nil {
				return err
			}
		}
		if img, err = image.Open(dst, image.OpenOptions{}); err != nil {
			return err
		}
		out = img
		if z, ok := img.Zones(); ok {
			zones = &z
		}
	}
	lastData := map[int]int64{} // per zone, the end of its last non-zero sector
	buf := make([]byte, convertChunk)
	p := newProgress(e.stdout, progress)
	for off := int64(0); off < s.size; off += convertChunk {
		n := min(convertChunk, s.size-off)
		p.update(off, s.size)
		if s.extent != nil {
			if data, err := s.extent(off, n); err != nil {
				return err
			} else if !data {
				continue
			}
		}
		chunk := buf[:n]
		if _, err := s.ReadAt(chunk, off); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("%s at %#x: %w", src, off, err)
		}
		if isZero(chunk) {
			continue
		}
		if _, err := out.WriteAt(chunk, off); err != nil {
			return fmt.Errorf("%s at %#x: %w", dst, off, err)
		}
		if zones != nil {
			noteLastData(lastData, zones.ZoneSize, chunk, off)
		}
	}
	if img != nil && zones != nil {
		for zone := int(zones.ConventionalZones); zone < int(zones.NrZones); zone++ {
			wp := lastData[zone]
			if s.wps != nil {
				wp = s.wps[zone]
			}
			if wp == 0 {
				continue // empty: where it starts
			}
			if err := img.SetWritePointer(zone, wp); err != nil {
				return err
			}
		}
		if s.zones != nil {
			if err := volume.CopyConditions(src, dst); err != nil {
				return err
			}
		}
	}
	if err := out.Close(); err != nil {
		return err
	}
	p.finish()
	return nil
}

// noteLastData records, for the zones p (at off) covers, the end of the
// last non-zero sector p holds.
func noteLastData(last map[int]int64, zoneSize int64, p []byte, off int64) {
	for i := len(p) - 512; i >= 0; i -= 512 {
		if !isZero(p[i : i+512]) {
			end := off + int64(i) + 512
			zone := int((end - 1) / zoneSize)
			if end > last[zone] {
				last[zone] = end
			}
			// Earlier zones of this chunk may hold data too.
			if zs := int64(zone) * zoneSize; zs > off {
				noteLastData(last, zoneSize, p[:zs-off], off)
			}
			return
		}
	}
}

func isZero(p []byte) bool {
	var zero [4096]byte
	for len(p) > 0 {
		n := min(len(p), len(zero))
		if !bytes.Equal(p[:n], zero[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}
