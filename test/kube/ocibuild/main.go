// Command ocibuild makes a container image from files of this machine,
// with no registry and no container engine: one layer holding the given
// files (and, for each binary, the shared libraries it loads, as ldd names
// them), an image config for linux/amd64 with the entrypoint, written as an
// image tarball that `ctr images import` and `docker load` take.
//
//	ocibuild --tag zq-csi.local/zq-csi:dev --out zq-csi.tar \
//	    --entrypoint /usr/local/bin/zq-csi \
//	    --add bin/zq-csi=/usr/local/bin/zq-csi --bin /usr/bin/mount --bin /usr/sbin/blkzone
//
// --add HOST=IMAGE copies a file or directory to IMAGE; --bin PATH copies a
// binary to the same path with its libraries. Both repeat, and so does
// --tag: one image under several names (a stand-in for images the
// Kubernetes e2e suite names).
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var tags, adds, bins, cmd list
	flag.Var(&tags, "tag", "a name and tag of the image (required; repeats)")
	out := flag.String("out", "", "the image tarball to write (required)")
	entrypoint := flag.String("entrypoint", "", "the entrypoint, a path in the image")
	flag.Var(&adds, "add", "HOST=IMAGE: a file or directory (repeats)")
	flag.Var(&bins, "bin", "a binary and its shared libraries, at the same path (repeats)")
	flag.Var(&cmd, "cmd", "an argument of the image's default command (repeats)")
	flag.Parse()
	if len(tags) == 0 || *out == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: ocibuild --tag NAME:TAG --out FILE [--entrypoint PATH] [--cmd ARG]... [--add HOST=IMAGE]... [--bin PATH]...")
		os.Exit(2)
	}
	if err := build(tags, *out, *entrypoint, adds, bins, cmd); err != nil {
		fmt.Fprintln(os.Stderr, "ocibuild:", err)
		os.Exit(1)
	}
}

func build(tags []string, out, entrypoint string, adds, bins, cmd []string) error {
	refs := make([]name.Tag, len(tags))
	for i, t := range tags {
		ref, err := name.NewTag(t)
		if err != nil {
			return fmt.Errorf("--tag %q: %w", t, err)
		}
		refs[i] = ref
	}
	files := map[string]string{} // image path -> host path
	for _, a := range adds {
		host, img, ok := strings.Cut(a, "=")
		if !ok || !path.IsAbs(img) {
			return fmt.Errorf("--add %q: want HOST=/PATH/IN/IMAGE", a)
		}
		if err := walk(host, path.Clean(img), files); err != nil {
			return err
		}
	}
	for _, b := range bins {
		libs, err := sharedLibraries(b)
		if err != nil {
			return err
		}
		for _, p := range append([]string{b}, libs...) {
			files[p] = p
		}
	}
	layer, err := layerOf(files)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if entrypoint != "" {
		if _, ok := files[entrypoint]; !ok {
			return fmt.Errorf("--entrypoint %s: not a file the image holds", entrypoint)
		}
		cf.Config.Entrypoint = []string{entrypoint}
	}
	cf.Config.Cmd = cmd
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	byTag := make(map[name.Reference]v1.Image, len(refs))
	for _, ref := range refs {
		byTag[ref] = img
	}
	return tarball.MultiRefWriteToFile(out, byTag)
}

// walk adds host (a file, or a directory and everything below it) at img.
func walk(host, img string, files map[string]string) error {
	return filepath.WalkDir(host, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(host, p)
		if err != nil {
			return err
		}
		files[path.Join(img, filepath.ToSlash(rel))] = p
		return nil
	})
}

// lddPath matches the libraries in ldd's output: "libc.so.6 => /lib/... (0x...)"
// and the loader's "/lib64/ld-linux-x86-64.so.2 (0x...)".
var lddPath = regexp.MustCompile(`(?m)(?:=> |^\s+)(/\S+) \(0x[0-9a-f]+\)$`)

// sharedLibraries returns the libraries bin loads, with the symlinks that
// lead to them; none for a static binary.
func sharedLibraries(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %v: %s", bin, err, out)
	}
	var libs []string
	for _, m := range lddPath.FindAllSubmatch(out, -1) {
		p := string(m[1])
		for {
			libs = append(libs, p)
			t, err := os.Readlink(p)
			if err != nil {
				break // not a link: the library itself
			}
			if !filepath.IsAbs(t) {
				t = filepath.Join(filepath.Dir(p), t)
			}
			p = t
		}
	}
	return libs, nil
}

// layerOf makes one layer of files (image path -> host path): the parent
// directories of each, then each file, link or directory as it is on the
// host (mode, link target), owned by root, in path order.
func layerOf(files map[string]string) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	paths := make([]string, 0, len(files))
	dirs := map[string]bool{}
	for p := range files {
		paths = append(paths, p)
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	for d := range dirs {
		if _, ok := files[d]; !ok {
			paths = append(paths, d)
		}
	}
	slices.Sort(paths)
	for _, p := range paths {
		name := strings.TrimPrefix(p, "/")
		host, ok := files[p]
		if !ok {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755}); err != nil {
				return nil, err
			}
			continue
		}
		fi, err := os.Lstat(host)
		if err != nil {
			return nil, err
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(host); err != nil {
				return nil, err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return nil, err
		}
		h.Name, h.Uid, h.Gid, h.Uname, h.Gname = name, 0, 0, "", ""
		if fi.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if fi.Mode().IsRegular() {
			if err := copyFile(tw, host); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
}

func copyFile(w io.Writer, p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(w, f); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	return nil
}
