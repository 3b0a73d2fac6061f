package main

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The image read back as a container runtime reads it: the config names
// the platform and entrypoint, and the one layer holds the files, the
// binary's libraries with the links to them, and their parent directories.
func TestBuiltImageHoldsTheFilesAndTheirLibraries(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "conf")
	if err := os.MkdirAll(filepath.Join(conf, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "sub", "a.txt"), []byte("zoned\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	bin, err := filepath.EvalSymlinks("/usr/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "img.tar")
	if err := build([]string{"zq-csi.local/test:1", "registry.example/stand-in:2"}, out, bin, []string{conf + "=/etc/zq"}, []string{bin}, []string{"--version"}); err != nil {
		t.Fatal(err)
	}

	tag, _ := name.NewTag("zq-csi.local/test:1")
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	// the second name is the same image
	other, _ := name.NewTag("registry.example/stand-in:2")
	img2, err := tarball.ImageFromPath(out, &other)
	if err != nil {
		t.Fatal(err)
	}
	if d1, d2 := digest(t, img), digest(t, img2); d1 != d2 {
		t.Fatalf("the two tags hold different images: %s, %s", d1, d2)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "amd64" || !slices.Equal(cf.Config.Entrypoint, []string{bin}) || !slices.Equal(cf.Config.Cmd, []string{"--version"}) {
		t.Fatalf("config: os %q arch %q entrypoint %q cmd %q", cf.OS, cf.Architecture, cf.Config.Entrypoint, cf.Config.Cmd)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	entries := map[string]*tar.Header{}
	contents := map[string]string{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		entries[h.Name] = h
		b, _ := io.ReadAll(tr)
		contents[h.Name] = string(b)
	}
	for _, want := range []string{"etc/", "etc/zq/", "etc/zq/sub/", "etc/zq/sub/a.txt", bin[1:], "lib64/ld-linux-x86-64.so.2"} {
		if entries[want] == nil {
			t.Errorf("the layer has no %s", want)
		}
	}
	if h := entries["etc/zq/sub/a.txt"]; h != nil && (contents[h.Name] != "zoned\n" || h.Mode&0o777 != 0o640 || h.Uid != 0) {
		t.Errorf("a.txt: %q, mode %o, uid %d", contents[h.Name], h.Mode, h.Uid)
	}
	libc := false
	for n, h := range entries {
		if filepath.Base(n) == "libc.so.6" && (h.Typeflag == tar.TypeReg || h.Typeflag == tar.TypeSymlink) {
			libc = true
		}
	}
	if !libc {
		t.Errorf("no libc.so.6 for %s among %d entries", bin, len(entries))
	}
}

func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "img.tar")
	for _, tc := range []struct {
		name       string
		tag, entry string
		adds       []string
	}{
		{"a bad tag", "Not A Tag", "", nil},
		{"an add without an image path", "x/y:1", "", []string{dir}},
		{"an entrypoint the image lacks", "x/y:1", "/bin/nothing", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := build([]string{tc.tag}, out, tc.entry, tc.adds, nil, nil); err == nil {
				t.Fatal("built")
			}
		})
	}
}

func digest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}
