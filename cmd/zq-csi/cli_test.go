package main

// In-process tests of the subcommands: argument handling, messages, exit
// codes and output formats. They run the real image package on files in
// t.TempDir().

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// cli runs zq-csi in-process.
func cli(t testing.TB, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(&env{stdin: strings.NewReader(stdin), stdout: &o, stderr: &e}, args)
	return o.String(), e.String(), code
}

// timingLine matches qemu-io's second summary line, which varies.
var timingLine = regexp.MustCompile(`(?m)^(.*, \d+ ops; )\S+ sec \(.*\)$`)

func stripTiming(s string) string { return timingLine.ReplaceAllString(s, "${1}TIME") }

func newImage(t testing.TB, size string, opts ...string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "disk.qcow2")
	args := []string{"image", "create", "-q"}
	for _, o := range opts {
		args = append(args, "-o", o)
	}
	if _, stderr, code := cli(t, "", append(args, f, size)...); code != 0 {
		t.Fatalf("image create: exit %d: %s", code, stderr)
	}
	return f
}

func TestExitCodesAndMessages(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.qcow2")
	tests := []struct {
		name   string
		args   []string
		code   int
		stderr string // substring
	}{
		{"no command is a usage error", nil, exitUsage, "zq-csi: no command given"},
		{"unknown command is a usage error", []string{"frobnicate"}, exitUsage, `zq-csi: unknown command "frobnicate"`},
		{"help succeeds", []string{"help"}, exitOK, ""},
		{"image without a command", []string{"image"}, exitUsage, "zq-csi: image: no command given"},
		{"image create -h succeeds", []string{"image", "create", "-h"}, exitOK, ""},
		{"create without operands", []string{"image", "create"}, exitUsage, "zq-csi: image create: missing FILE"},
		{"create without a size", []string{"image", "create", filepath.Join(dir, "a")}, exitUsage, "missing SIZE"},
		{"create with a bad size", []string{"image", "create", filepath.Join(dir, "a"), "12q"}, exitUsage, `invalid size "12q"`},
		{"create with an unknown option names it", []string{"image", "create", "-o", "foo=1", filepath.Join(dir, "a"), "1M"},
			exitUsage, `zq-csi: image create: unknown option "foo"`},
		{"create with a backing file is refused", []string{"image", "create", "-o", "backing_file=x", filepath.Join(dir, "a"), "1M"},
			exitUsage, `option "backing_file" is not supported`},
		{"create with another format is refused", []string{"image", "create", "-f", "raw", filepath.Join(dir, "a"), "1M"},
			exitUsage, `unsupported format "raw"`},
		{"create with an unknown flag", []string{"image", "create", "-x", filepath.Join(dir, "a"), "1M"},
			exitUsage, "flag provided but not defined: -x"},
		{"info of a missing file fails", []string{"image", "info", missing}, exitFailure, "zq-csi: image info: "},
		{"info with a bad output format", []string{"image", "info", "--output=xml", missing}, exitUsage, "must be one of human, json"},
		{"check of a missing file is exit 1", []string{"image", "check", missing}, exitCheckError, "zq-csi: image check: "},
		{"io of a missing file fails", []string{"io", "-c", "flush", missing}, exitFailure, "zq-csi: io: "},
		{"io with an unknown command is a usage error", []string{"io", "-c", "bogus 1", missing}, exitUsage, `command "bogus" not found`},
		{"io without a file", []string{"io", "-c", "flush"}, exitUsage, "expected one FILE"},
		{"commit without a file", []string{"image", "commit"}, exitUsage, "expected one FILE"},
		{"commit of a missing file fails", []string{"image", "commit", missing}, exitFailure, "zq-csi: image commit: "},
		{"rebase without -b", []string{"image", "rebase", missing}, exitUsage, `missing -b BACKING (-b "" for none)`},
		{"rebase onto another format", []string{"image", "rebase", "-b", "x", "-F", "raw", missing}, exitUsage, `-F: unsupported format "raw"`},
		{"rebase of a missing file fails", []string{"image", "rebase", "-b", "", missing}, exitFailure, "zq-csi: image rebase: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := cli(t, "", tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d; stderr %q", code, tt.code, stderr)
			}
			if !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tt.stderr)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Errorf("a refused create left a file behind: %v", err)
	}
}

func TestCreatePrintsQemuImgFormattingLine(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"defaults", []string{"F", "1G"},
			"Formatting 'F', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"},
		{"options from repeated -o lists", []string{"-o", "cluster_size=4k", "-o", "refcount_bits=1,lazy_refcounts=on", "-o", "preallocation=metadata", "F", "1M"},
			"Formatting 'F', fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=metadata compression_type=zlib size=1048576 lazy_refcounts=on refcount_bits=1"},
		{"a later value wins", []string{"-o", "cluster_size=4k", "-o", "cluster_size=2M", "F", "64MiB"},
			"Formatting 'F', fmt=qcow2 cluster_size=2097152 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16"},
		{"flags after the operands", []string{"F", "64Mi", "-f", "qcow2", "-o", "compat=1.1"},
			"Formatting 'F', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16 compat=1.1"},
		{"size as an option", []string{"-o", "size=1.5G", "F"},
			"Formatting 'F', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1610612736 lazy_refcounts=off refcount_bits=16"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := filepath.Join(dir, strings.Repeat("x", i+1)+".qcow2")
			for j := range tt.args {
				if tt.args[j] == "F" {
					tt.args[j] = f
				}
			}
			stdout, stderr, code := cli(t, "", append([]string{"image", "create"}, tt.args...)...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			want := strings.ReplaceAll(tt.want, "'F'", "'"+f+"'") + "\n"
			if stdout != want {
				t.Fatalf("stdout\n%q\nwant\n%q", stdout, want)
			}
		})
	}
}

func TestCreateOptionHelpListsKeys(t *testing.T) {
	stdout, _, code := cli(t, "", "image", "create", "-o", "help")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, k := range []string{"cluster_size", "refcount_bits", "preallocation", "lazy_refcounts"} {
		if !strings.Contains(stdout, k) {
			t.Errorf("-o help does not list %s:\n%s", k, stdout)
		}
	}
}

func TestCreateRefusesBadOptionValues(t *testing.T) {
	dir := t.TempDir()
	for _, o := range []string{"cluster_size=x", "cluster_size=4M", "refcount_bits=abc", "preallocation=full",
		"preallocation=sometimes", "lazy_refcounts=maybe", "extended_l2=on", "compression_type=zstd", "compat=0.10"} {
		t.Run(o, func(t *testing.T) {
			f := filepath.Join(dir, "a.qcow2")
			_, stderr, code := cli(t, "", "image", "create", "-o", o, f, "1M")
			key := o[:strings.IndexByte(o, '=')]
			if code == 0 || !strings.Contains(stderr, key) {
				t.Fatalf("exit %d, stderr %q: want a failure naming %s", code, stderr, key)
			}
			if _, err := os.Stat(f); !os.IsNotExist(err) {
				t.Fatalf("a refused create left %s behind", f)
			}
		})
	}
}

func TestCreateRefusesAnExistingFile(t *testing.T) {
	f := newImage(t, "1M")
	before, _ := os.ReadFile(f)
	_, stderr, code := cli(t, "", "image", "create", f, "2M")
	if code != exitFailure || !strings.HasPrefix(stderr, "zq-csi: image create: ") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	if after, _ := os.ReadFile(f); !bytes.Equal(before, after) {
		t.Fatal("create over an existing image changed it")
	}
}

func TestInfoHumanAndJSON(t *testing.T) {
	f := newImage(t, "1G", "cluster_size=4k,refcount_bits=64,lazy_refcounts=on")
	stdout, stderr, code := cli(t, "", "image", "info", f)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, line := range []string{
		"image: " + f,
		"file format: qcow2",
		"virtual size: 1 GiB (1073741824 bytes)",
		"cluster_size: 4096",
		"Format specific information:",
		"    compat: 1.1",
		"    compression type: zlib",
		"    lazy refcounts: true",
		"    refcount bits: 64",
		"    corrupt: false",
		"    extended l2: false",
	} {
		if !strings.Contains(stdout, line+"\n") {
			t.Errorf("info lacks %q:\n%s", line, stdout)
		}
	}
	if !regexp.MustCompile(`(?m)^disk size: [0-9.]+ [KMG]?i?B$`).MatchString(stdout) {
		t.Errorf("info has no disk size:\n%s", stdout)
	}

	stdout, stderr, code = cli(t, "", "image", "info", "--output=json", f)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var j map[string]any
	if err := json.Unmarshal([]byte(stdout), &j); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, stdout)
	}
	for k, want := range map[string]any{"virtual-size": 1073741824.0, "filename": f, "cluster-size": 4096.0,
		"format": "qcow2", "dirty-flag": false} {
		if j[k] != want {
			t.Errorf("json %s = %v, want %v", k, j[k], want)
		}
	}
	data, _ := j["format-specific"].(map[string]any)["data"].(map[string]any)
	for k, want := range map[string]any{"compat": "1.1", "lazy-refcounts": true, "refcount-bits": 64.0, "corrupt": false, "extended-l2": false} {
		if data[k] != want {
			t.Errorf("json format-specific.data.%s = %v, want %v", k, data[k], want)
		}
	}
}

func TestCheckCleanImage(t *testing.T) {
	f := newImage(t, "16M")
	if _, stderr, code := cli(t, "", "io", "-c", "write -P 1 0 1M", f); code != 0 {
		t.Fatalf("io: exit %d: %s", code, stderr)
	}
	stdout, stderr, code := cli(t, "", "image", "check", f)
	if code != exitCheckClean {
		t.Fatalf("exit %d: %s%s", code, stdout, stderr)
	}
	if !strings.HasPrefix(stdout, "No errors were found on the image.\n") ||
		!regexp.MustCompile(`(?m)^\d+/256 = [0-9.]+% allocated`).MatchString(stdout) ||
		!regexp.MustCompile(`(?m)^Image end offset: \d+$`).MatchString(stdout) {
		t.Fatalf("unexpected summary:\n%s", stdout)
	}
	stdout, _, code = cli(t, "", "image", "check", "--output=json", f)
	var j map[string]any
	if err := json.Unmarshal([]byte(stdout), &j); err != nil || code != 0 {
		t.Fatalf("exit %d, %v:\n%s", code, err, stdout)
	}
	if j["check-errors"] != 0.0 || j["total-clusters"] != 256.0 || j["format"] != "qcow2" || j["corruptions"] != nil {
		t.Fatalf("unexpected JSON: %s", stdout)
	}
}

func TestIOCommandsOutput(t *testing.T) {
	f := newImage(t, "1M")
	stdout, stderr, code := cli(t, "", "io",
		"-c", "write -P 0xab 0 4k",
		"-c", "read -P 0xab 0 4k",
		"-c", "write -z 8k 4k",
		"-c", "read -P 0 8k 4k",
		"-c", "read -v 0 20",
		"-c", "discard 0 64k",
		"-c", "read -P 0 0 4k",
		"-c", "flush",
		"-c", "length",
		f)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	want := `wrote 4096/4096 bytes at offset 0
4 KiB, 1 ops; TIME
read 4096/4096 bytes at offset 0
4 KiB, 1 ops; TIME
wrote 4096/4096 bytes at offset 8192
4 KiB, 1 ops; TIME
read 4096/4096 bytes at offset 8192
4 KiB, 1 ops; TIME
00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................
00000010:  ab ab ab ab  ....
read 20/20 bytes at offset 0
20 bytes, 1 ops; TIME
discard 65536/65536 bytes at offset 0
64 KiB, 1 ops; TIME
read 4096/4096 bytes at offset 0
4 KiB, 1 ops; TIME
1 MiB
`
	if got := stripTiming(stdout); got != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s", got, want)
	}
	if !regexp.MustCompile(`(?m)^4 KiB, 1 ops; \d\d\.\d\d sec \([0-9.]+ [KMGT]?i?B(ytes)?/sec and [0-9.]+ ops/sec\)$`).MatchString(stdout) {
		t.Fatalf("timing line not in qemu-io's format:\n%s", stdout)
	}
}

func TestIOPatternMismatchFailsButContinues(t *testing.T) {
	f := newImage(t, "1M")
	stdout, _, code := cli(t, "", "io",
		"-c", "write -P 0x11 4096 4096",
		"-c", "read -P 0x22 4096 4096",
		"-c", "read -P 0x11 -s 1k -l 1k 4096 4096",
		"-c", "write -P 0x33 0 512",
		f)
	if code != exitFailure {
		t.Fatalf("exit %d, want 1", code)
	}
	got := stripTiming(stdout)
	for _, want := range []string{
		"Pattern verification failed at offset 4096, 4096 bytes\nread 4096/4096 bytes at offset 4096\n",
		"read 4096/4096 bytes at offset 4096\n4 KiB, 1 ops; TIME\nwrote 512/512 bytes at offset 0\n",
	} {
		if !strings.Contains(got, want) {
			t.Fatalf("stdout lacks %q:\n%s", want, got)
		}
	}
	// The write after the failure ran.
	if _, _, code := cli(t, "", "io", "-r", "-c", "read -P 0x33 0 512", f); code != 0 {
		t.Fatal("the command after a failed one did not run")
	}
}

func TestIOCommandErrors(t *testing.T) {
	f := newImage(t, "1M")
	tests := []struct {
		name   string
		cmd    string
		stderr string
	}{
		{"read past the end", "read 1M 1", "zq-csi: read failed: "},
		{"write past the end", "write 1048575 2", "zq-csi: write failed: "},
		{"bad number", "read x 1", `zq-csi: read: offset: invalid size "x"`},
		{"bad pattern", "write -P 300 0 1", "zq-csi: write: 300 is not a valid pattern byte"},
		{"-z with -P", "write -z -P 1 0 1", "-z and -P cannot be specified at the same time"},
		{"-u without -z", "write -u 0 1", "-u requires -z to be specified"},
		{"too many operands", "read 0 1 2", "bad argument count 3, expected 2"},
		{"unknown option", "read -x 0 1", "invalid option -- 'x'"},
		{"read too long", "read 0 3G", "length cannot exceed 2147483136, given 3G"},
		{"pattern range beyond the read", "read -P 0 -s 1k 0 512", "pattern verification range exceeds end of read data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, stderr, code := cli(t, "", "io", "-c", tt.cmd, f)
			if code != exitFailure || !strings.Contains(stderr, tt.stderr) {
				t.Fatalf("exit %d, stderr %q; want 1 and %q", code, stderr, tt.stderr)
			}
		})
	}
}

func TestIOReadOnlyRefusesWrites(t *testing.T) {
	f := newImage(t, "1M")
	before, _ := os.ReadFile(f)
	_, stderr, code := cli(t, "", "io", "-r", "-c", "write 0 4k", "-c", "write -z 0 4k", "-c", "discard 0 64k", f)
	if code != exitFailure || strings.Count(stderr, "failed: ") != 3 {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	if after, _ := os.ReadFile(f); !bytes.Equal(before, after) {
		t.Fatal("a read-only session changed the file")
	}
}

func TestIOCommandsFromStdin(t *testing.T) {
	f := newImage(t, "1M")
	stdout, stderr, code := cli(t, "# a script\nwrite -q -P 7 0 512\n\nread -P 7 0 512\nquit\nread -P 8 0 512\n", "io", f)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if got := stripTiming(stdout); got != "read 512/512 bytes at offset 0\n512 bytes, 1 ops; TIME\n" {
		t.Fatalf("stdout %q", got)
	}
}

func TestIOMap(t *testing.T) {
	f := newImage(t, "1M")
	stdout, stderr, code := cli(t, "", "io", "-c", "write 64k 128k", "-c", "map", f)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	want := "64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)\n" +
		"128 KiB (0x20000) bytes     allocated at offset 64 KiB (0x10000)\n" +
		"832 KiB (0xd0000) bytes not allocated at offset 192 KiB (0x30000)\n"
	if !strings.HasSuffix(stdout, want) {
		t.Fatalf("map:\n%s\nwant:\n%s", stdout, want)
	}
}

func TestIOHelpListsEveryCommand(t *testing.T) {
	stdout, _, code := cli(t, "", "io", "-h")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, c := range ioCommands {
		if !strings.Contains(stdout, "  "+c.name) {
			t.Errorf("io -h does not list %s", c.name)
		}
	}
}

// FuzzIOCommandLine runs arbitrary command lines on a small image: they
// may fail, but must not panic, and a read-only session must not change
// the file.
func FuzzIOCommandLine(f *testing.F) {
	for _, s := range []string{"write -P 0xab 0 4k", "read -P 0xab -s 1 -l 2 0 4k", "write -zu 0 64k",
		"discard 0 1M", "read -v 0 17", "map", "flush", "length", "help read", "read 1M 1", "write -z 0 8E",
		"read -P 1 -s 9223372036854775807 0 1", "write 0x fffff"} {
		f.Add(s)
	}
	dir := f.TempDir()
	img := newImage(f, "1M")
	ro := filepath.Join(dir, "ro.qcow2")
	data, _ := os.ReadFile(img)
	if err := os.WriteFile(ro, data, 0o644); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, line string) {
		if strings.ContainsAny(line, "\n\r") {
			return
		}
		cli(t, "", "io", "-c", line, img)
		cli(t, "", "io", "-r", "-c", line, ro)
		if after, _ := os.ReadFile(ro); !bytes.Equal(after, data) {
			t.Fatalf("read-only %q changed the image", line)
		}
	})
}
