package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// freshImage returns the bytes of a new, empty image.
func freshImage(t testing.TB, opts CreateOptions) []byte {
	t.Helper()
	return createMem(t, opts).bytes()
}

func TestBadImagesAreRefusedWithoutWriting(t *testing.T) {
	be := binary.BigEndian
	good := freshImage(t, CreateOptions{Size: 1 << 30})
	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name  string
		file  []byte
		want  error
		words string
	}{
		{"empty file", nil, ErrCorrupt, "too short"},
		{"truncated header", good[:50], ErrCorrupt, "too short"},
		{"truncated tables", good[:65536*2], ErrCorrupt, "past the end of the file"},
		{"wrong magic", mutate(func(b []byte) []byte { b[0] = 'X'; return b }), ErrCorrupt, "magic"},
		{"version 2", mutate(func(b []byte) []byte { be.PutUint32(b[4:], 2); return b }), ErrUnsupported, "version 2"},
		{"version 9", mutate(func(b []byte) []byte { be.PutUint32(b[4:], 9); return b }), ErrUnsupported, "version 9"},
		{"cluster bits 30", mutate(func(b []byte) []byte { be.PutUint32(b[20:], 30); return b }), ErrCorrupt, "cluster_bits 30"},
		{"cluster bits 8", mutate(func(b []byte) []byte { be.PutUint32(b[20:], 8); return b }), ErrCorrupt, "cluster_bits 8"},
		{"absurd size", mutate(func(b []byte) []byte { be.PutUint64(b[24:], 1<<61); return b }), ErrCorrupt, "l1_size"},
		{"L1 past the end", mutate(func(b []byte) []byte { be.PutUint64(b[40:], 1<<40); return b }), ErrCorrupt, "L1 table"},
		{"L1 unaligned", mutate(func(b []byte) []byte { be.PutUint64(b[40:], 65536+8); return b }), ErrCorrupt, "L1 table offset"},
		{"huge L1", mutate(func(b []byte) []byte { be.PutUint32(b[36:], 1<<30); return b }), ErrCorrupt, "l1_size"},
		{"refcount table past the end", mutate(func(b []byte) []byte { be.PutUint64(b[48:], 1<<50); return b }), ErrCorrupt, "refcount table"},
		{"no refcount table", mutate(func(b []byte) []byte { be.PutUint32(b[56:], 0); return b }), ErrCorrupt, "refcount_table_clusters"},
		{"refcount order 7", mutate(func(b []byte) []byte { be.PutUint32(b[96:], 7); return b }), ErrCorrupt, "refcount_order"},
		{"header length odd", mutate(func(b []byte) []byte { be.PutUint32(b[100:], 105); return b }), ErrCorrupt, "header_length"},
		{"unknown incompatible bit 6", mutate(func(b []byte) []byte { b[79] |= 1 << 6; return b }), ErrUnsupported, "bit 6"},
		{"unknown incompatible bit 40", mutate(func(b []byte) []byte { b[74] |= 1; return b }), ErrUnsupported, "bit 40"},
		{"external data file", mutate(func(b []byte) []byte { b[79] |= incompatDataFile; return b }), ErrUnsupported, "external data"},
		{"zstd", mutate(func(b []byte) []byte { b[79] |= incompatCompression; b[104] = 1; return b }), ErrUnsupported, "zstd"},
		{"encrypted", mutate(func(b []byte) []byte { be.PutUint32(b[32:], 1); return b }), ErrUnsupported, "encrypted"},
		{"backing file", mutate(func(b []byte) []byte {
			be.PutUint64(b[8:], 1000)
			be.PutUint32(b[16:], 8)
			copy(b[1000:], "base.img")
			return b
		}), ErrInvalidOption, `"base.img"`},
		{"backing file name past the cluster", mutate(func(b []byte) []byte {
			be.PutUint64(b[8:], 65530)
			be.PutUint32(b[16:], 8)
			return b
		}), ErrCorrupt, "backing file name"},
		{"backing file name too long", mutate(func(b []byte) []byte {
			be.PutUint64(b[8:], 1000)
			be.PutUint32(b[16:], 2000)
			return b
		}), ErrCorrupt, "backing file name"},
		{"extension past the cluster", mutate(func(b []byte) []byte {
			be.PutUint32(b[112:], 0x12345678)
			be.PutUint32(b[116:], 1<<20)
			return b
		}), ErrCorrupt, "extension"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, ro := range []bool{true, false} {
				s := newMemStorage(c.file)
				_, err := OpenStorage(s, OpenOptions{ReadOnly: ro})
				if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.words) {
					t.Fatalf("read-only=%v: err = %v, want %v mentioning %q", ro, err, c.want, c.words)
				}
				if s.writes != 0 || !bytes.Equal(s.bytes(), c.file) {
					t.Fatalf("read-only=%v: refusing the image changed it", ro)
				}
			}
		})
	}
}

// TestFileIsUnchangedWhenRefused covers the real-file path: Open takes the
// lock, reads, refuses, and the bytes on disk are what they were.
func TestFileIsUnchangedWhenRefused(t *testing.T) {
	b := freshImage(t, CreateOptions{Size: 1 << 20})
	b[79] |= 1 << 6
	p := filepath.Join(t.TempDir(), "bad.qcow2")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p, OpenOptions{}); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), p) {
		t.Fatalf("err = %v, want ErrUnsupported naming the file", err)
	}
	after, _ := os.ReadFile(p)
	if !bytes.Equal(after, b) {
		t.Fatal("the refused file was modified")
	}
}

func TestUnknownBitsAreNamedFromTheImagesTable(t *testing.T) {
	h := &header{names: []featureName{{featureIncompatible, 7, "frobnication"}, {featureCompatible, 8, "other kind"}}}
	if got := h.describeBits(featureIncompatible, 1<<7|1<<8); got != "frobnication, bit 8" {
		t.Fatalf("describeBits = %q, want %q", got, "frobnication, bit 8")
	}
}

func TestUnknownExtensionSurvivesHeaderRewrite(t *testing.T) {
	b := freshImage(t, CreateOptions{Size: 32 << 20, ClusterSize: 1024, RefcountBits: 64})
	h, err := parseHeader(b, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	h.extensions = append(h.extensions, extension{typ: 0x11223344, data: []byte("keep me")})
	h.autoclear = 1 // the bitmaps bit: a read-write open clears it, a header rewrite
	hdr, err := h.encode()
	if err != nil {
		t.Fatal(err)
	}
	copy(b, hdr)
	s := newMemStorage(b)
	img := openMem(t, s, OpenOptions{})
	// 20 MiB of data outgrow the one-cluster refcount table (16 MiB of
	// 1 KiB clusters with 64-bit refcounts): it moves, another rewrite.
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, 20<<20), 0); err != nil {
		t.Fatal(err)
	}
	img.Close()
	out := s.bytes()
	h2, err := parseHeader(out, int64(len(out)))
	if err != nil {
		t.Fatal(err)
	}
	if h2.refcountTableOffset == h.refcountTableOffset {
		t.Error("the refcount table did not move: the test lost its point")
	}
	if h2.autoclear != 0 {
		t.Errorf("autoclear = %#x after a read-write open, want 0", h2.autoclear)
	}
	if len(h2.extensions) != 1 || h2.extensions[0].typ != 0x11223344 || string(h2.extensions[0].data) != "keep me" {
		t.Errorf("extensions after rewrite = %+v", h2.extensions)
	}
	if len(h2.names) != len(featureNames) {
		t.Errorf("feature name table has %d entries, want %d", len(h2.names), len(featureNames))
	}
}

func TestCreateOptionsAreValidated(t *testing.T) {
	cases := []struct {
		opts CreateOptions
		key  string
	}{
		{CreateOptions{Size: 0}, "size"},
		{CreateOptions{Size: 1 << 20, ClusterSize: 1000}, "cluster_size"},
		{CreateOptions{Size: 1 << 20, ClusterSize: 256}, "cluster_size"},
		{CreateOptions{Size: 1 << 20, ClusterSize: 4 << 20}, "cluster_size"},
		{CreateOptions{Size: 1 << 20, RefcountBits: 3}, "refcount_bits"},
		{CreateOptions{Size: 1 << 20, RefcountBits: 128}, "refcount_bits"},
		{CreateOptions{Size: 1 << 20, Preallocation: "full"}, "preallocation"},
		{CreateOptions{Size: 1 << 50, ClusterSize: 512}, "size"},
	}
	for _, c := range cases {
		s := newMemStorage(nil)
		err := CreateStorage(s, c.opts)
		if !errors.Is(err, ErrInvalidOption) || !strings.HasPrefix(err.Error(), c.key+" ") {
			t.Errorf("%+v: err = %v, want ErrInvalidOption naming %s", c.opts, err, c.key)
		}
		if s.writes != 0 {
			t.Errorf("%+v: wrote to the file before refusing", c.opts)
		}
	}
}

func TestCreateRefusesAnExistingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.qcow2")
	if err := os.WriteFile(p, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Create(p, CreateOptions{Size: 1 << 20}); !errors.Is(err, os.ErrExist) {
		t.Fatalf("err = %v, want ErrExist", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "precious" {
		t.Fatal("existing file was overwritten")
	}
}

func TestSecondWriterIsLockedOut(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := Open(p, OpenOptions{}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second read-write open: err = %v, want 'in use'", err)
	}
	if _, err := Open(p, OpenOptions{ReadOnly: true}); err == nil {
		t.Fatal("read-only open of an image open for writing succeeded")
	}
}

// FuzzParseHeader: no input panics, and whatever parses re-encodes into a
// header that parses to the same fields.
func FuzzParseHeader(f *testing.F) {
	f.Add(freshImage(f, CreateOptions{Size: 1 << 30})[:65536])
	f.Add(freshImage(f, CreateOptions{Size: 1 << 20, ClusterSize: 512, RefcountBits: 1})[:512])
	// An overlay's header whose backing file name lies past the first
	// sector, apart from the extensions (as Rebase places a new name).
	moved := freshImage(f, CreateOptions{Size: 1 << 20})[:65536]
	binary.BigEndian.PutUint64(moved[8:], 1000)
	binary.BigEndian.PutUint32(moved[16:], 11)
	copy(moved[1000:], "base.qcow2x")
	f.Add(moved)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b, 1<<40)
		if err != nil {
			return
		}
		out, err := h.encode()
		if err != nil {
			return
		}
		h2, err := parseHeader(out, 1<<40)
		if err != nil {
			t.Fatalf("re-encoded header does not parse: %v", err)
		}
		if h2.size != h.size || h2.l1TableOffset != h.l1TableOffset || h2.incompatible != h.incompatible || len(h2.extensions) != len(h.extensions) ||
			h2.backingFile != h.backingFile || h2.backingFileOffset < h.backingFileOffset { // a name past the extensions stays where it is
			t.Fatalf("round trip changed the header: %+v -> %+v", h, h2)
		}
	})
}

// FuzzOpenReadOnly: a read-only open of any bytes, and reads and a check
// of what opens, never panic and never write.
func FuzzOpenReadOnly(f *testing.F) {
	img := createMem(f, CreateOptions{Size: 4 << 20, ClusterSize: 4096})
	w := openMem(f, img, OpenOptions{})
	w.WriteAt(bytes.Repeat([]byte{9}, 10000), 5000)
	w.Close()
	f.Add(img.bytes())
	f.Add(freshImage(f, CreateOptions{Size: 1 << 20, ClusterSize: 512}))
	f.Fuzz(func(t *testing.T, b []byte) {
		s := newMemStorage(b)
		img, err := OpenStorage(s, OpenOptions{ReadOnly: true, CacheSize: 1})
		if err != nil {
			return
		}
		buf := make([]byte, 8192)
		for _, off := range []int64{0, 4096, img.Size() / 2, img.Size() - 8192} {
			if off >= 0 && off+8192 <= img.Size() {
				img.ReadAt(buf, off)
			}
		}
		img.Map(0, min(img.Size(), 64<<20))
		img.Check(false)
		img.Close()
		if s.writes != 0 {
			t.Fatal("a read-only open wrote to the file")
		}
	})
}
