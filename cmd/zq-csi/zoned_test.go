package main

// In-process tests of the zoned parts of the CLI: the zone.* create
// options, image info of zoned images, the shared test vectors, zq-csi io
// sessions on a zoned device, and bad zoned images. Every cli() call is
// one session, as one zq-csi process is: open states last within it, and
// a later call sees the zones as the write pointers on disk say.

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// vectorReport is the README's expected `zrp 0 4` of the shared vectors
// (shared/testdata/README.md), produced by another tool: copied here
// verbatim.
const vectorReport = `start: 0x0, len 0x8000, cap 0x8000, wptr 0x0, zcond:0, [type: 1]
start: 0x8000, len 0x8000, cap 0x8000, wptr 0x8000, zcond:0, [type: 1]
start: 0x10000, len 0x8000, cap 0x8000, wptr 0x10000, zcond:0, [type: 1]
start: 0x18000, len 0x8000, cap 0x6000, wptr 0x18000, zcond:1, [type: 2]
`

var vectorNames = []string{"zoned-le-1g-16m-conv3.qcow2", "zoned-be-1g-16m-conv3.qcow2"}

// vectorPath is a shared test vector: shared/ lies beside the checkout
// (CI copies it beside the clone). A missing vector fails the test.
func vectorPath(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join("..", "..", "..", "shared", "testdata", name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("test vector missing: %v (the tests expect the project's shared/ folder beside the checkout, "+
			"shared/testdata from cmd/zq-csi is ../../../shared/testdata)", err)
	}
	return p
}

// vectorCopy is a writable copy of a shared vector.
func vectorCopy(t testing.TB, name string) string {
	t.Helper()
	data, err := os.ReadFile(vectorPath(t, name))
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(f, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// The vectors' geometry: 16 MiB zones of 12 MiB capacity, 3 conventional,
// 64 zones, max open 5, max active 9, max append 128 KiB.
const (
	vZone    = 16 << 20
	vZoneSec = vZone / 512
	vCapSec  = 12 << 20 / 512
)

// seqLine is the zrp line of the vectors' sequential zone i with the
// write pointer wpSec sectors past its start.
func seqLine(i, wpSec int64, cond int) string {
	return fmt.Sprintf("start: 0x%x, len 0x%x, cap 0x%x, wptr 0x%x, zcond:%d, [type: 2]",
		i*vZoneSec, vZoneSec, vCapSec, i*vZoneSec+wpSec, cond)
}

// zoneIO runs one zq-csi io session with the commands; a "command"
// starting with '-' is a flag of zq-csi io (-r). Numbers in the commands
// may be sums, "48M+64k-512", written out before zq-csi sees them
// (qemu-io's syntax has no arithmetic).
func zoneIO(t *testing.T, f string, cmds ...string) (stdout, stderr string, code int) {
	t.Helper()
	args := []string{"io"}
	for _, c := range cmds {
		if strings.HasPrefix(c, "-") {
			args = append(args, c)
			continue
		}
		words := strings.Fields(c)
		for i, w := range words {
			words[i] = evalSum(t, w)
		}
		args = append(args, "-c", strings.Join(words, " "))
	}
	return cli(t, "", append(args, f)...)
}

var sumTerm = regexp.MustCompile(`[+-]?[0-9][0-9a-zA-Z]*`)

// evalSum writes out a word like "48M+64k-512" as a byte count; other
// words are returned as they are.
func evalSum(t testing.TB, w string) string {
	t.Helper()
	if w == "" || w[0] == '-' || !strings.ContainsAny(w[1:], "+-") {
		return w
	}
	var sum int64
	for _, term := range sumTerm.FindAllString(w, -1) {
		sign := int64(1)
		switch term[0] {
		case '-':
			sign, term = -1, term[1:]
		case '+':
			term = term[1:]
		}
		n, err := ParseSize(term)
		if err != nil {
			t.Fatalf("test command word %q: %v", w, err)
		}
		sum += sign * n
	}
	return fmt.Sprint(sum)
}

// mustIO runs a session that must succeed.
func mustIO(t *testing.T, f string, cmds ...string) string {
	t.Helper()
	stdout, stderr, code := zoneIO(t, f, cmds...)
	if code != 0 {
		t.Fatalf("io %q: exit %d\nstdout:\n%s\nstderr:\n%s", cmds, code, stdout, stderr)
	}
	return stdout
}

// report is the zone report of n zones from zone first, in a new
// read-only session.
func report(t *testing.T, f string, first, n int) []string {
	t.Helper()
	stdout, stderr, code := cli(t, "", "io", "-r", "-c", fmt.Sprintf("zrp %d %d", int64(first)*vZone, n), f)
	if code != 0 {
		t.Fatalf("zrp: exit %d: %s", code, stderr)
	}
	return strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
}

// wantReport compares a report with the expected lines.
func wantReport(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("zone report:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// ---- image create -o zone.* --------------------------------------------

func TestCreateZoneOptions(t *testing.T) {
	dir := t.TempDir()
	// The Formatting line shows the zone keys given, with the values
	// given, in QEMU's order and place (shared/testdata/qemu/*.cmds.out);
	// image info shows what the image holds, defaults and clamps applied.
	const line = "cluster_size=65536 extended_l2=off compression_type=zlib %s size=%d lazy_refcounts=off refcount_bits=16"
	tests := []struct {
		name   string
		opts   string
		size   string
		given  string // the zone part of the Formatting line
		stored string // the geometry the image holds
		notes  []string
	}{
		{"defaults", "zone.mode=host-managed", "1G",
			"zone.mode=host-managed",
			"zone.mode=host-managed zone.size=268435456 zone.capacity=268435456 zone.conventional_zones=0 zone.max_open_zones=0 zone.max_active_zones=0 zone.max_append_bytes=65536", nil},
		{"sizes with M", "zone.mode=host-managed,zone.size=64M,zone.capacity=48M,zone.max_append_bytes=256k", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=50331648 zone.max_append_bytes=262144",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=50331648 zone.conventional_zones=0 zone.max_open_zones=0 zone.max_active_zones=0 zone.max_append_bytes=262144", nil},
		{"sizes with MiB", "zone.mode=host-managed,zone.size=64MiB,zone.capacity=48MiB,zone.max_append_bytes=256KiB", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=50331648 zone.max_append_bytes=262144",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=50331648 zone.conventional_zones=0 zone.max_open_zones=0 zone.max_active_zones=0 zone.max_append_bytes=262144", nil},
		{"sizes with Mi", "zone.mode=host-managed,zone.size=64Mi,zone.capacity=48Mi,zone.max_append_bytes=256Ki", "1Gi",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=50331648 zone.max_append_bytes=262144",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=50331648 zone.conventional_zones=0 zone.max_open_zones=0 zone.max_active_zones=0 zone.max_append_bytes=262144", nil},
		{"the demo's geometry", "zone.mode=host-managed,zone.size=64M,zone.conventional_zones=2,zone.max_open_zones=6,zone.max_active_zones=8,zone.max_append_bytes=256k", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.conventional_zones=2 zone.max_append_bytes=262144 zone.max_active_zones=8 zone.max_open_zones=6",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=2 zone.max_open_zones=6 zone.max_active_zones=8 zone.max_append_bytes=262144", nil},
		{"only max_active: max_open follows, without a note", "zone.mode=host-managed,zone.size=64M,zone.max_active_zones=8", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.max_active_zones=8",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=0 zone.max_open_zones=8 zone.max_active_zones=8 zone.max_append_bytes=65536", nil},
		{"counts in hex, keys in any order and -o lists", "zone.max_open_zones=0x3,zone.conventional_zones=0x2,zone.size=64M,zone.mode=host-managed", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.conventional_zones=2 zone.max_open_zones=3",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=2 zone.max_open_zones=3 zone.max_active_zones=0 zone.max_append_bytes=65536", nil},
		{"a short last zone", "zone.mode=host-managed,zone.size=64M", "100M",
			"zone.mode=host-managed zone.size=67108864",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=0 zone.max_open_zones=0 zone.max_active_zones=0 zone.max_append_bytes=65536", nil},
		{"max_active above the zone count is clamped", "zone.mode=host-managed,zone.size=64M,zone.max_active_zones=100", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.max_active_zones=100",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=0 zone.max_open_zones=16 zone.max_active_zones=16 zone.max_append_bytes=65536",
			[]string{"zq-csi: note: zone.max_active_zones 100 > 16 zones: clamped to 16"}},
		{"max_open above the sequential zones is clamped", "zone.mode=host-managed,zone.size=64M,zone.conventional_zones=4,zone.max_open_zones=13", "1G",
			"zone.mode=host-managed zone.size=67108864 zone.conventional_zones=4 zone.max_open_zones=13",
			"zone.mode=host-managed zone.size=67108864 zone.capacity=67108864 zone.conventional_zones=4 zone.max_open_zones=12 zone.max_active_zones=0 zone.max_append_bytes=65536",
			[]string{"zq-csi: note: zone.max_open_zones 13 > 12 sequential zones: clamped to 12"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := filepath.Join(dir, fmt.Sprintf("z%d.qcow2", i))
			stdout, stderr, code := cli(t, "", "image", "create", "-f", "qcow2", "-o", tt.opts, f, tt.size)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			size, _ := ParseSize(tt.size)
			want := fmt.Sprintf("Formatting '%s', fmt=qcow2 "+line+"\n", f, tt.given, size)
			if stdout != want {
				t.Fatalf("stdout\n%q\nwant\n%q", stdout, want)
			}
			wantErr := ""
			for _, n := range tt.notes {
				wantErr += n + "\n"
			}
			if stderr != wantErr {
				t.Fatalf("stderr %q, want %q", stderr, wantErr)
			}
			out, _, code := cli(t, "", "image", "info", "--output=json", f)
			var j struct {
				Zoned map[string]int64 `json:"zoned"`
			}
			if err := json.Unmarshal([]byte(out), &j); err != nil || code != 0 {
				t.Fatalf("info: exit %d, %v", code, err)
			}
			keys := map[string]string{"zone.size": "zone-size", "zone.capacity": "zone-capacity",
				"zone.conventional_zones": "conventional-zones", "zone.max_open_zones": "max-open-zones",
				"zone.max_active_zones": "max-active-zones", "zone.max_append_bytes": "max-append-bytes"}
			for _, kv := range strings.Fields(tt.stored)[1:] {
				k, v, _ := strings.Cut(kv, "=")
				if fmt.Sprint(j.Zoned[keys[k]]) != v {
					t.Errorf("info: %s = %d, want %s", keys[k], j.Zoned[keys[k]], v)
				}
			}
			if wantN := (size + j.Zoned["zone-size"] - 1) / j.Zoned["zone-size"]; j.Zoned["nr-zones"] != wantN {
				t.Errorf("nr-zones %d, want %d", j.Zoned["nr-zones"], wantN)
			}
			if out, _, code := cli(t, "", "image", "check", f); code != 0 {
				t.Errorf("check: exit %d\n%s", code, out)
			}
		})
	}
}

func TestCreateZoneOptionsRefused(t *testing.T) {
	dir := t.TempDir()
	const hm = "zone.mode=host-managed,"
	tests := []struct {
		opts, size string
		key        string // the key the message must name
		msg        string // and a part of it
	}{
		{"zone.mode=host-aware", "1G", "zone.mode", `invalid value "host-aware": only host-managed`},
		{"zone.mode=none", "1G", "zone.mode", "only host-managed"},
		{"zone.mode=", "1G", "zone.mode", "only host-managed"},
		{"zone.mode=Host-Managed", "1G", "zone.mode", "only host-managed"},
		{"zone.size=64M", "1G", "zone.size", "needs zone.mode=host-managed"},
		{"zone.capacity=64M", "1G", "zone.capacity", "needs zone.mode=host-managed"},
		{"zone.conventional_zones=1", "1G", "zone.conventional_zones", "needs zone.mode=host-managed"},
		{"zone.max_open_zones=1", "1G", "zone.max_open_zones", "needs zone.mode=host-managed"},
		{"zone.max_active_zones=1", "1G", "zone.max_active_zones", "needs zone.mode=host-managed"},
		{"zone.max_append_bytes=4k", "1G", "zone.max_append_bytes", "needs zone.mode=host-managed"},
		{"zone.size=x", "1G", "zone.size", `invalid size "x"`},
		{hm + "zone.size=0", "1G", "zone.size", "must be a positive multiple of 512"},
		{hm + "zone.size=256", "1G", "zone.size", "positive multiple of 512"},
		{hm + "zone.size=1000", "1G", "zone.size", "positive multiple of 512"},
		{hm + "zone.size=-1", "1G", "zone.size", "invalid size"},
		{hm + "zone.capacity=0", "1G", "zone.capacity", "positive multiple of 512"},
		{hm + "zone.capacity=1000", "1G", "zone.capacity", "positive multiple of 512"},
		{hm + "zone.size=64M,zone.capacity=65M", "1G", "zone.capacity", "> zone.size"},
		{hm + "zone.capacity=512M", "1G", "zone.capacity", "> zone.size"},
		{hm + "zone.conventional_zones=4", "1G", "zone.conventional_zones", "no sequential zone left"},
		{hm + "zone.size=64M,zone.conventional_zones=16", "1G", "zone.conventional_zones", "no sequential zone left"},
		{hm + "zone.conventional_zones=-1", "1G", "zone.conventional_zones", `invalid number "-1"`},
		{hm + "zone.conventional_zones=two", "1G", "zone.conventional_zones", `invalid number "two"`},
		{hm + "zone.conventional_zones=4294967296", "1G", "zone.conventional_zones", "out of range"},
		{hm + "zone.max_open_zones=-1", "1G", "zone.max_open_zones", "invalid number"},
		{hm + "zone.max_open_zones=1.5", "1G", "zone.max_open_zones", "invalid number"},
		{hm + "zone.max_active_zones=abc", "1G", "zone.max_active_zones", "invalid number"},
		{hm + "zone.max_active_zones=0x", "1G", "zone.max_active_zones", "invalid number"},
		{hm + "zone.max_open_zones=10,zone.max_active_zones=4", "1G", "zone.max_open_zones", "> zone.max_active_zones 4: open zones are active zones"},
		{hm + "zone.max_append_bytes=0", "1G", "zone.max_append_bytes", "at least 512"},
		{hm + "zone.max_append_bytes=500", "1G", "zone.max_append_bytes", "at least 512"},
		{hm + "zone.size=1M,zone.max_append_bytes=1048064", "1G", "zone.max_append_bytes", "smaller than zone.capacity"},
		{hm + "zone.size=1M,zone.capacity=64k", "1G", "zone.max_append_bytes", "smaller than zone.capacity"}, // the default 64k
		{hm + "zone.size=8G,zone.max_append_bytes=4G", "16G", "zone.max_append_bytes", "32-bit"},
		{hm + "zone.size=512", "4T", "zone.size", "32-bit zone count"},
	}
	for i, tt := range tests {
		t.Run(tt.opts, func(t *testing.T) {
			f := filepath.Join(dir, fmt.Sprintf("a%d.qcow2", i))
			stdout, stderr, code := cli(t, "", "image", "create", "-o", tt.opts, f, tt.size)
			if code != exitUsage {
				t.Fatalf("exit %d, want %d (usage); stderr %q", code, exitUsage, stderr)
			}
			if !strings.HasPrefix(stderr, "zq-csi: image create: ") || !strings.Contains(stderr, tt.key) || !strings.Contains(stderr, tt.msg) {
				t.Fatalf("stderr %q: want it to name %s and say %q", stderr, tt.key, tt.msg)
			}
			if stdout != "" {
				t.Fatalf("a refused create printed %q", stdout)
			}
			if _, err := os.Stat(f); !os.IsNotExist(err) {
				t.Fatalf("a refused create left %s behind", f)
			}
		})
	}
}

// QEMU creates images with these geometries (shared/testdata/qemu v5, v6),
// so zq-csi does too, saying on stderr what they cannot do.
func TestCreateAcceptsQemusGeometriesWithANote(t *testing.T) {
	tests := []struct {
		opts, note string
		want       string // the zone line of image info
	}{
		{"zone.mode=host-managed,zone.size=48M", "note: zone.size 50331648 is not a power of two: Linux cannot attach the image as a zoned disk",
			"zone size: 48 MiB"},
		{"zone.mode=host-managed,zone.size=64M,zone.max_append_bytes=1000", "note: zone.max_append_bytes 1000 is not a multiple of 512: appends are limited to 512",
			"max append bytes: 512 B"},
	}
	for i, tt := range tests {
		t.Run(tt.opts, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), fmt.Sprintf("a%d.qcow2", i))
			stdout, stderr, code := cli(t, "", "image", "create", "-o", tt.opts, f, "1G")
			if code != 0 || !strings.HasPrefix(stdout, "Formatting ") || !strings.Contains(stderr, tt.note) {
				t.Fatalf("exit %d, stdout %q, stderr %q: want success, a Formatting line and %q", code, stdout, stderr, tt.note)
			}
			info, stderr, code := cli(t, "", "image", "info", f)
			if code != 0 || !strings.Contains(info, tt.want) {
				t.Fatalf("image info: exit %d, stderr %q\n%s\nwant %q", code, stderr, info, tt.want)
			}
		})
	}
}

func TestCreateOptionHelpListsZoneKeys(t *testing.T) {
	stdout, _, code := cli(t, "", "image", "create", "-o", "help")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, k := range []string{"zone.mode", "zone.size", "zone.capacity", "zone.conventional_zones",
		"zone.max_open_zones", "zone.max_active_zones", "zone.max_append_bytes"} {
		if !regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(k) + ` +\S`).MatchString(stdout) {
			t.Errorf("-o help does not list %s:\n%s", k, stdout)
		}
	}
}

// ---- the shared vectors --------------------------------------------------

func TestZonedVectors(t *testing.T) {
	for _, name := range vectorNames {
		t.Run(name, func(t *testing.T) {
			f := vectorPath(t, name)
			before := fileHash(t, f)

			stdout, stderr, code := cli(t, "", "io", "-r", "-c", "zrp 0 4", f)
			if code != 0 || stdout != vectorReport {
				t.Fatalf("zrp 0 4: exit %d, stderr %q\n%s\nwant (shared/testdata/README.md):\n%s", code, stderr, stdout, vectorReport)
			}
			// Zones 3 to 63 are empty; past the last zone there is none.
			stdout, _, code = cli(t, "", "io", "-r", "-c", "zrp 0 100", "-c", "zrp 1008M 1", "-c", "zrp 1023M 5", f)
			lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
			if code != 0 || len(lines) != 64+1+1 || strings.Join(lines[:4], "\n")+"\n" != vectorReport {
				t.Fatalf("zrp 0 100: exit %d, %d lines:\n%s", code, len(lines), stdout)
			}
			for i := int64(3); i < 64; i++ {
				if lines[i] != seqLine(i, 0, 1) {
					t.Fatalf("zone %d: %q, want %q", i, lines[i], seqLine(i, 0, 1))
				}
			}
			if lines[64] != seqLine(63, 0, 1) || lines[65] != seqLine(63, 0, 1) {
				t.Fatalf("zrp of the last zone: %q", lines[64:])
			}

			stdout, stderr, code = cli(t, "", "image", "info", f)
			want := `Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
    zoned:
        zone model: host-managed
        zone size: 16 MiB
        zone capacity: 12 MiB
        conventional zones: 3
        nr zones: 64
        max open zones: 5
        max active zones: 9
        max append bytes: 128 KiB
`
			if code != 0 || !strings.HasSuffix(stdout, want) || !strings.Contains(stdout, "virtual size: 1 GiB (1073741824 bytes)\n") {
				t.Fatalf("info: exit %d, stderr %q\n%s\nwant it to end with:\n%s", code, stderr, stdout, want)
			}
			stdout, _, code = cli(t, "", "image", "info", "--output=json", f)
			var j struct {
				Zoned          map[string]any `json:"zoned"`
				FormatSpecific struct {
					Data struct {
						Zoned map[string]any `json:"zoned"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(stdout), &j); err != nil || code != 0 {
				t.Fatalf("info --output=json: exit %d, %v\n%s", code, err, stdout)
			}
			wantJSON := map[string]any{"zone-size": 16777216.0, "zone-capacity": 12582912.0, "conventional-zones": 3.0,
				"nr-zones": 64.0, "max-open-zones": 5.0, "max-active-zones": 9.0, "max-append-bytes": 131072.0}
			for k, v := range wantJSON {
				if j.Zoned[k] != v || j.FormatSpecific.Data.Zoned[k] != v {
					t.Errorf("json zoned.%s = %v, format-specific.data.zoned.%s = %v; want %v",
						k, j.Zoned[k], k, j.FormatSpecific.Data.Zoned[k], v)
				}
			}
			if j.FormatSpecific.Data.Zoned["mode"] != "host-managed" {
				t.Errorf("json format-specific.data.zoned.mode = %v", j.FormatSpecific.Data.Zoned["mode"])
			}

			stdout, stderr, code = cli(t, "", "image", "check", f)
			if code != exitCheckClean || !strings.HasPrefix(stdout, "No errors were found on the image.\n") {
				t.Fatalf("check: exit %d\n%s%s", code, stdout, stderr)
			}
			if fileHash(t, f) != before {
				t.Fatal("read-only commands changed the vector")
			}
		})
	}
}

// A writable session on the big-endian vector rewrites the table in
// little-endian order (docs/qcow2-zoned.md section 3) and keeps the zones.
func TestZonedVectorBigEndianRewrittenOnWrite(t *testing.T) {
	f := vectorCopy(t, vectorNames[1])
	mustIO(t, f, "write -P 0x42 48M 4k")
	wps := make([]byte, 8*64)
	fd, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	if _, err := fd.ReadAt(wps, 0x40000); err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		v := binary.LittleEndian.Uint64(wps[i*8:])
		want := uint64(i) * vZone
		switch {
		case i < 3:
			want |= 1 << 59
		case i == 3:
			want += 4096
		}
		if v != want {
			t.Fatalf("table entry %d: %#x (read little-endian), want %#x", i, v, want)
		}
	}
	wantReport(t, report(t, f, 3, 2), seqLine(3, 8, 4), seqLine(4, 0, 1))
	if out, _, code := cli(t, "", "image", "check", f); code != 0 {
		t.Fatalf("check: exit %d\n%s", code, out)
	}
}

// ---- sessions --------------------------------------------------------------

func TestZonedWriteAtTheWritePointer(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	stdout, stderr, code := zoneIO(t, f,
		"write -P 0xa1 48M 64k",         // at the write pointer
		"write -P 0xa2 48M 4k",          // behind it
		"write -P 0xa3 50M 4k",          // ahead of it
		"write -P 0xa4 48M+64k 100",     // not a whole sector
		"zrp 48M 1",                     // in this session: implicitly open
		"read -P 0xa1 48M 64k",          // the data
		"read -P 0 48M+64k 16M-64k",     // zeros past the write pointer, and past the capacity
		"write -P 0xa5 0 100",           // conventional zones take any write
		"write -P 0xa6 47M 2M",          // but not into a sequential zone
		"write -P 0xa7 1023M+512k 1M",   // past the end
		"read -P 0xa5 0 100",            //
		"write -z 48M+64k 64k",          // zeroes, at the write pointer
		"write -z -u 16M 32M",           // and in conventional zones
		"read -P 0 16M 32M",             //
		"write -f -P 0xa8 48M+128k 512", // with a flush
	)
	if code != exitFailure {
		t.Fatalf("exit %d, want 1:\n%s\n%s", code, stdout, stderr)
	}
	got := stripTiming(stdout)
	want := `wrote 65536/65536 bytes at offset 50331648
64 KiB, 1 ops; TIME
write failed: Invalid argument
write failed: Invalid argument
write failed: Invalid argument
` + seqLine(3, 0x80, 2) + `
read 65536/65536 bytes at offset 50331648
64 KiB, 1 ops; TIME
read 16711680/16711680 bytes at offset 50397184
15.938 MiB, 1 ops; TIME
wrote 100/100 bytes at offset 0
100 bytes, 1 ops; TIME
write failed: Invalid argument
write failed: No space left on device
read 100/100 bytes at offset 0
100 bytes, 1 ops; TIME
wrote 65536/65536 bytes at offset 50397184
64 KiB, 1 ops; TIME
wrote 33554432/33554432 bytes at offset 16777216
32 MiB, 1 ops; TIME
read 33554432/33554432 bytes at offset 16777216
32 MiB, 1 ops; TIME
wrote 512/512 bytes at offset 50462720
512 bytes, 1 ops; TIME
`
	if got != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s", got, want)
	}
	for _, cause := range []string{
		"zq-csi: write failed: zone 3: write at 0x3000000, write pointer at 0x3010000: write not at the write pointer",
		"zq-csi: write failed: zone 3: write at 0x3200000, write pointer at 0x3010000: write not at the write pointer",
		"zq-csi: write failed: zone 3: write at 0x3010000+0x64: not a multiple of 512: unaligned request",
		"from conventional zone 2 into sequential zone 3: write crosses a zone boundary",
		"write past the end",
	} {
		if !strings.Contains(stderr, cause+"\n") && !strings.Contains(stderr, cause) {
			t.Errorf("stderr lacks %q:\n%s", cause, stderr)
		}
	}
	// A new session: the refused writes changed nothing, the open zone
	// is closed now, and the data is there.
	wantReport(t, report(t, f, 3, 2), seqLine(3, 0x101, 4), seqLine(4, 0, 1))
	mustIO(t, f, "-r", "read -P 0xa1 48M 64k", "read -P 0 48M+64k 64k", "read -P 0xa8 48M+128k 512",
		"read -P 0 48M+128k+512 16M-128k-512", "read -P 0xa5 0 100", "read -P 0 100 48M-100")
	if out, _, code := cli(t, "", "image", "check", f); code != 0 {
		t.Fatalf("check: exit %d\n%s", code, out)
	}
}

func TestZonedWritePastCapacity(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	stdout, stderr, code := zoneIO(t, f,
		"write -P 0x11 48M 8M",        // two buffers, at the write pointer
		"write -P 0x12 56M 8M",        // would end past the 12M capacity: refused whole
		"write -P 0x13 56M 4M-4k",     //
		"write -P 0x14 60M-4k 8k",     // one buffer past the capacity
		"write -P 0x15 60M-4k 4k",     // exactly to it: full
		"write -P 0x16 60M 4k",        // a full zone takes nothing
		"write -P 0x17 64M 20M",       // across a zone end
		"write -P 0x18 64M 5M+1",      // long and unaligned
		"write -P 0x19 64M 16M",       // a whole zone is more than its capacity
		"write -P 0x1a 40M 16M",       // long, from conventional into sequential
		"write -P 0x1b 64M 6M",        // a long write in zone 4
		"write -P 0x1c 1023M+512k 8M", // long, past the end
	)
	if code != exitFailure {
		t.Fatalf("exit %d, want 1", code)
	}
	fails := regexp.MustCompile(`(?m)^write failed: .*$`).FindAllString(stdout, -1)
	want := []string{"Invalid argument", "Invalid argument", "Invalid argument", "Invalid argument", "Invalid argument",
		"Invalid argument", "Invalid argument", "No space left on device"}
	if len(fails) != len(want) {
		t.Fatalf("%d failures, want %d:\n%s\n%s", len(fails), len(want), stdout, stderr)
	}
	for i := range want {
		if fails[i] != "write failed: "+want[i] {
			t.Errorf("failure %d: %q, want %q", i, fails[i], "write failed: "+want[i])
		}
	}
	for _, cause := range []string{"capacity ends at 0x3c00000: write beyond zone capacity", "zone is full: write beyond zone capacity",
		"zone ends at 0x5000000: write crosses a zone boundary", "not a multiple of 512: unaligned request"} {
		if !strings.Contains(stderr, cause) {
			t.Errorf("stderr lacks %q:\n%s", cause, stderr)
		}
	}
	wantReport(t, report(t, f, 3, 3), seqLine(3, vCapSec, 14), seqLine(4, 6<<11, 4), seqLine(5, 0, 1))
	mustIO(t, f, "-r", "read -P 0x11 48M 8M", "read -P 0x13 56M 4M-4k", "read -P 0x15 60M-4k 4k", "read -P 0 60M 4M",
		"read -P 0x1b 64M 6M", "read -P 0 70M 10M", "read -P 0 40M 8M")
}

func TestZonedAppend(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	stdout, stderr, code := zoneIO(t, f,
		"zap -p 48M 4k 4k",       // two buffers, one request
		"zap -p -P 0x5c 48M 1k",  // a pattern
		"zap 48M 512",            // quiet without -p
		"zone_append -p 64M 64k", // the long name, another zone
		"zrp 48M 2",
		"zap 48M 128k 512", // more than max_append_bytes
		"zap -p 0 4k",      // a conventional zone
		"zap 48M 4k 100",   // a buffer not a multiple of 512
		"zap 49M 4k",       // not a zone start
		"zap 2G 4k",        // past the end
		"write 64M 4k",     // appends moved the write pointer: a write is at the new one
		"write 64M+64k 4k",
		"zap -p 64M 4k",
	)
	if code != exitFailure {
		t.Fatalf("exit %d, want 1:\n%s\n%s", code, stdout, stderr)
	}
	got := stripTiming(stdout)
	want := `After zap done, the append sector is 0x18000
After zap done, the append sector is 0x18010
After zap done, the append sector is 0x20000
` + seqLine(3, 0x13, 2) + "\n" + seqLine(4, 0x80, 2) + `
zone append failed: Invalid argument
zone append failed: Input/output error
zone append failed: Invalid argument
zone append failed: Invalid argument
zone append failed: Invalid argument
write failed: Invalid argument
wrote 4096/4096 bytes at offset 67174400
4 KiB, 1 ops; TIME
After zap done, the append sector is 0x20088
`
	if got != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s\nstderr:\n%s", got, want, stderr)
	}
	for _, cause := range []string{"max_append_bytes 0x20000: zone append larger than max_append_bytes",
		"operation not allowed on a conventional zone", "buffer 2 of 100 bytes is not a multiple of 512",
		"not a zone start", "request outside the device"} {
		if !strings.Contains(stderr, cause) {
			t.Errorf("stderr lacks %q:\n%s", cause, stderr)
		}
	}
	mustIO(t, f, "-r", "read -P 0xcd 48M 8k", "read -P 0x5c 48M+8k 1k", "read -P 0xcd 48M+9k 512", "read -P 0 48M+9k+512 64k",
		"read -P 0xcd 64M 64k", "read -P 0xcd 64M+64k 8k", "read -P 0 64M+72k 64k")
	wantReport(t, report(t, f, 3, 2), seqLine(3, 0x13, 4), seqLine(4, 0x90, 4))
}

func TestZonedManagement(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	stdout, stderr, code := zoneIO(t, f,
		"zo 64M 16M", "zrp 64M 1", // empty -> explicitly open
		"zc 64M 16M", "zrp 64M 1", // nothing written: empty again
		"zo 64M 16M", "write -P 0x44 64M 4k", "zrp 64M 1", // a write keeps it explicitly open
		"zc 64M 16M", "zrp 64M 1", // closed
		"zo 64M 16M", "zrp 64M 1", // closed -> explicitly open
		"zone_close 64M 16M",
		"zf 64M 16M", "zrp 64M 1", // closed -> full, write pointer at the zone end
		"read -P 0x44 64M 4k", "read -P 0 64M+4k 16M-4k",
		"write 64M+4k 4k",          // full
		"zrs 64M 16M", "zrp 64M 1", // empty
		"read -P 0 64M 16M",       // its data is gone
		"write -P 0x45 80M 4k",    // zone 5 implicitly open
		"zf 96M 32M", "zrp 80M 4", // zones 6 and 7 finished from empty
		"zone_finish 1008M 16M",          // the last zone
		"zone_open 48M 32M", "zrp 48M 2", // two zones at once
		"zrs 0 1G", "zrp 48M 5", // every zone
		"zrp 1008M 1",
		// Refused: conventional zones, unaligned offsets and lengths,
		// ranges past the end.
		"zo 0 16M", "zc 16M 16M", "zf 32M 16M", "zrs 0 16M",
		"zo 65M 16M", "zf 64M 1M", "zrs 64M 0", "zc 2G 16M", "zrs 1008M 32M",
	)
	if code != exitFailure {
		t.Fatalf("exit %d, want 1:\n%s\n%s", code, stdout, stderr)
	}
	got := stripTiming(stdout)
	want := strings.Join([]string{
		seqLine(4, 0, 3),
		seqLine(4, 0, 1),
		"wrote 4096/4096 bytes at offset 67108864", "4 KiB, 1 ops; TIME",
		seqLine(4, 8, 3),
		seqLine(4, 8, 4),
		seqLine(4, 8, 3),
		seqLine(4, vZoneSec, 14),
		"read 4096/4096 bytes at offset 67108864", "4 KiB, 1 ops; TIME",
		"read 16773120/16773120 bytes at offset 67112960", "15.996 MiB, 1 ops; TIME",
		"write failed: Invalid argument",
		seqLine(4, 0, 1),
		"read 16777216/16777216 bytes at offset 67108864", "16 MiB, 1 ops; TIME",
		"wrote 4096/4096 bytes at offset 83886080", "4 KiB, 1 ops; TIME",
		seqLine(5, 8, 2), seqLine(6, vZoneSec, 14), seqLine(7, vZoneSec, 14), seqLine(8, 0, 1),
		seqLine(3, 0, 3), seqLine(4, 0, 3),
		seqLine(3, 0, 1), seqLine(4, 0, 1), seqLine(5, 0, 1), seqLine(6, 0, 1), seqLine(7, 0, 1),
		seqLine(63, 0, 1),
		"zone open failed: Input/output error",
		"zone close failed: Input/output error",
		"zone finish failed: Input/output error",
		"zone reset failed: Input/output error",
		"zone open failed: Invalid argument",
		"zone finish failed: Invalid argument",
		"zone reset failed: Invalid argument",
		"zone close failed: Invalid argument",
		"zone reset failed: Invalid argument",
	}, "\n") + "\n"
	if got != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s\nstderr:\n%s", got, want, stderr)
	}
	if n := strings.Count(stderr, "zq-csi: zone "); n != 9 {
		t.Errorf("%d causes on stderr, want 9:\n%s", n, stderr)
	}
	if out, _, code := cli(t, "", "image", "check", f); code != 0 {
		t.Fatalf("check: exit %d\n%s", code, out)
	}
}

// The vectors allow 5 open and 9 active zones. A write to a zone that
// needs an open one closes the least recently written implicitly open
// zone while an active slot is left; open states end with the session.
func TestZonedOpenLimitsAndLRU(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	w := func(zone int) string { return fmt.Sprintf("write -q %dM 4k", zone*16) }
	wa := func(zone int, at string) string { return fmt.Sprintf("write -q %dM+%s 4k", zone*16, at) }
	z := func(cmd string, zone int) string { return fmt.Sprintf("%s %dM 16M", cmd, zone*16) }
	stdout, stderr, code := zoneIO(t, f,
		w(3), w(4), w(5), w(6), w(7), "zrp 48M 6",
		w(8), "zrp 48M 6", // zone 3, least recently written, is closed
		wa(3, "4k"), "zrp 48M 6", // zone 3 is written again: zone 4 closes
		w(9), w(10), w(11), // 5 open + 4 closed = 9 active
		w(12),        // an empty zone needs an active slot: none
		z("zo", 12),  // the same for an explicit open
		z("zf", 12),  // and a finish
		z("zf", 4),   // a closed zone needs an open slot, and none can be freed
		z("zrs", 4),  // frees an active slot
		w(12),        // now zone 12 opens, closing zone 8
		"zrp 48M 10", //
		z("zc", 12),  // 4 open zones, 5 closed
		w(4),         // closing does not free an active slot: still 9 active
		z("zrs", 5),  // resetting a closed zone does
		w(4),         // so zone 4 opens
		"zrp 48M 3",  //
		z("zo", 13),  // 5 open, 9 active: a 10th zone cannot become active
		z("zf", 3),   // finishing frees a slot
		z("zo", 13),  // explicitly open now
		"zrp 48M 11", //
		z("zo", 14),  // 10 zones would be active
	)
	if code != exitFailure {
		t.Fatalf("exit %d, want 1:\n%s\n%s", code, stdout, stderr)
	}
	const (
		tooManyActive = "Value too large for defined data type"
		tooManyOpen   = "Too many references: cannot splice"
	)
	want := strings.Join([]string{
		seqLine(3, 8, 2), seqLine(4, 8, 2), seqLine(5, 8, 2), seqLine(6, 8, 2), seqLine(7, 8, 2), seqLine(8, 0, 1),
		seqLine(3, 8, 4), seqLine(4, 8, 2), seqLine(5, 8, 2), seqLine(6, 8, 2), seqLine(7, 8, 2), seqLine(8, 8, 2),
		seqLine(3, 16, 2), seqLine(4, 8, 4), seqLine(5, 8, 2), seqLine(6, 8, 2), seqLine(7, 8, 2), seqLine(8, 8, 2),
		"write failed: " + tooManyActive,
		"zone open failed: " + tooManyActive,
		"zone finish failed: " + tooManyActive,
		"zone finish failed: " + tooManyOpen,
		seqLine(3, 16, 2), seqLine(4, 0, 1), seqLine(5, 8, 4), seqLine(6, 8, 4), seqLine(7, 8, 4),
		seqLine(8, 8, 4), seqLine(9, 8, 2), seqLine(10, 8, 2), seqLine(11, 8, 2), seqLine(12, 8, 2),
		"write failed: " + tooManyActive,
		seqLine(3, 16, 2), seqLine(4, 8, 2), seqLine(5, 0, 1),
		"zone open failed: " + tooManyActive,
		seqLine(3, vZoneSec, 14), seqLine(4, 8, 2), seqLine(5, 0, 1), seqLine(6, 8, 4), seqLine(7, 8, 4),
		seqLine(8, 8, 4), seqLine(9, 8, 2), seqLine(10, 8, 2), seqLine(11, 8, 2), seqLine(12, 8, 4), seqLine(13, 0, 3),
		"zone open failed: " + tooManyActive,
	}, "\n") + "\n"
	if stdout != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s\nstderr:\n%s", stdout, want, stderr)
	}
	for _, cause := range []string{"max_active_zones 9: too many active zones", "max_open_zones 5, 9 active, max_active_zones 9: too many open zones"} {
		if !strings.Contains(stderr, cause) {
			t.Errorf("stderr lacks %q:\n%s", cause, stderr)
		}
	}

	// A new session: the open zones come back closed (only write pointers
	// persist), an explicitly opened empty zone empty.
	wantReport(t, report(t, f, 3, 12),
		seqLine(3, vZoneSec, 14), seqLine(4, 8, 4), seqLine(5, 0, 1), seqLine(6, 8, 4), seqLine(7, 8, 4),
		seqLine(8, 8, 4), seqLine(9, 8, 4), seqLine(10, 8, 4), seqLine(11, 8, 4), seqLine(12, 8, 4), seqLine(13, 0, 1),
		seqLine(14, 0, 1))
	// 8 closed zones are active: one more may become active (zone 13),
	// closed zones reopen while open slots are free (zone 6), and a 10th
	// active zone is refused (zone 14).
	stdout, _, code = zoneIO(t, f, w(13), wa(6, "4k"), w(14), "zrp 96M 1", "zrp 208M 2")
	if code != exitFailure || stdout != strings.Join([]string{
		"write failed: " + tooManyActive,
		seqLine(6, 16, 2), seqLine(13, 8, 2), seqLine(14, 0, 1)}, "\n")+"\n" {
		t.Fatalf("exit %d:\n%s", code, stdout)
	}
}

// Without an implicitly open zone to close, max_open is a hard limit.
func TestZonedExplicitOpenLimit(t *testing.T) {
	f := vectorCopy(t, vectorNames[1])
	stdout, stderr, code := zoneIO(t, f, "zo 48M 80M", "zo 128M 16M", "write 128M 4k", "zap 128M 4k", "zf 128M 16M",
		"write 48M 4k", "zc 48M 16M", "zo 128M 16M", "zrp 48M 6")
	if code != exitFailure {
		t.Fatalf("exit %d, want 1:\n%s\n%s", code, stdout, stderr)
	}
	got := stripTiming(stdout)
	const tooManyOpen = "Too many references: cannot splice"
	want := strings.Join([]string{
		"zone open failed: " + tooManyOpen, "write failed: " + tooManyOpen,
		"zone append failed: " + tooManyOpen, "zone finish failed: " + tooManyOpen,
		"wrote 4096/4096 bytes at offset 50331648", "4 KiB, 1 ops; TIME",
		seqLine(3, 8, 4), seqLine(4, 0, 3), seqLine(5, 0, 3), seqLine(6, 0, 3), seqLine(7, 0, 3), seqLine(8, 0, 3),
	}, "\n") + "\n"
	if got != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s", got, want)
	}
}

func TestZonedReadOnlySession(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	mustIO(t, f, "write -P 0x77 48M 4k")
	before := fileHash(t, f)
	stdout, stderr, code := zoneIO(t, f, "-r", "write 48M+4k 4k", "write -z 0 4k", "zap 48M 4k", "zo 64M 16M", "zc 48M 16M",
		"zf 48M 16M", "zrs 48M 16M", "discard 0 64k", "read -P 0x77 48M 4k", "zrp 48M 1", "flush")
	if code != exitFailure {
		t.Fatalf("exit %d, want 1", code)
	}
	if n := strings.Count(stderr, "image is read-only"); n != 8 {
		t.Fatalf("%d refusals, want 8:\n%s", n, stderr)
	}
	if got := stripTiming(stdout); got != "read 4096/4096 bytes at offset 50331648\n4 KiB, 1 ops; TIME\n"+seqLine(3, 8, 4)+"\n" {
		t.Fatalf("stdout:\n%s", got)
	}
	if fileHash(t, f) != before {
		t.Fatal("a read-only session changed the image")
	}
}

// A session ends with a flush: what it wrote is durable, write pointers
// included, and stdin scripts work as -c does.
func TestZonedScriptFromStdin(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	stdout, stderr, code := cli(t, "# zoned\nwrite -q -P 1 48M 8k\nzap -p 48M 4k\nzrp 48M 1\nquit\nwrite 64M 4k\n", "io", f)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if stdout != "After zap done, the append sector is 0x18010\n"+seqLine(3, 0x18, 2)+"\n" {
		t.Fatalf("stdout:\n%s", stdout)
	}
	wantReport(t, report(t, f, 3, 2), seqLine(3, 0x18, 4), seqLine(4, 0, 1))
}

func TestZoneCommandsOnAPlainImage(t *testing.T) {
	f := newImage(t, "1M")
	stdout, stderr, code := zoneIO(t, f, "zrp 0 1", "zo 0 1M", "zc 0 1M", "zf 0 1M", "zrs 0 1M", "zap -p 0 4k", "write 0 4k")
	if code != exitFailure {
		t.Fatalf("exit %d, want 1", code)
	}
	want := "zone report failed: Operation not supported\nzone open failed: Operation not supported\n" +
		"zone close failed: Operation not supported\nzone finish failed: Operation not supported\n" +
		"zone reset failed: Operation not supported\nzone append failed: Operation not supported\n" +
		"wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; TIME\n"
	if got := stripTiming(stdout); got != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s", got, want)
	}
	if strings.Count(stderr, "image is not zoned") != 6 {
		t.Fatalf("stderr:\n%s", stderr)
	}
}

func TestZoneCommandUsageErrors(t *testing.T) {
	f := vectorCopy(t, vectorNames[0])
	before := fileHash(t, f)
	for _, tt := range []struct{ cmd, stderr string }{
		{"zrp 0", "bad argument count 1, expected 2"},
		{"zrp 0 1 2", "bad argument count 3, expected 2"},
		{"zo 0", "bad argument count 1, expected 2"},
		{"zap -p 48M", "bad argument count 1, expected at least 2"},
		{"zap -x 48M 4k", "invalid option -- 'x'"},
		{"zap -P 300 48M 4k", "300 is not a valid pattern byte"},
		{"zap 48M 3G", "exceeds maximum size 2147483136"},
		{"zap 48M 1G 1G 1G", "the total number of bytes exceeds the maximum size"},
		{"zrp x 1", `offset: invalid size "x"`},
		{"zf 0 y", `length: invalid size "y"`},
	} {
		t.Run(tt.cmd, func(t *testing.T) {
			_, stderr, code := zoneIO(t, f, tt.cmd)
			if code != exitFailure || !strings.Contains(stderr, tt.stderr) {
				t.Fatalf("exit %d, stderr %q; want 1 and %q", code, stderr, tt.stderr)
			}
		})
	}
	// help knows the zone commands by both names.
	stdout, _, _ := zoneIO(t, f, "help zrp", "help zone_append")
	if !strings.Contains(stdout, "zone_report off nr -- ") || !strings.Contains(stdout, "zone_append [-p] [-P pattern] off len [len...] -- ") {
		t.Fatalf("help:\n%s", stdout)
	}
	if fileHash(t, f) != before {
		t.Fatal("refused commands changed the image")
	}
}

// ---- bad zoned images --------------------------------------------------------

// zonedExtOffset finds the zoned header extension (magic 0x007a6264) of
// an image: the offset of its 8-byte extension header.
func zonedExtOffset(t *testing.T, f string) int64 {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	off := int64(binary.BigEndian.Uint32(b[100:])) // header_length
	for off+8 <= int64(len(b)) && off < 65536 {
		magic, n := binary.BigEndian.Uint32(b[off:]), binary.BigEndian.Uint32(b[off+4:])
		if magic == 0x007a6264 {
			return off
		}
		if magic == 0 {
			break
		}
		off += 8 + (int64(n)+7)&^7
	}
	t.Fatalf("%s has no zoned header extension", f)
	return 0
}

func TestZonedBadImagesRefusedAndUnchanged(t *testing.T) {
	const table = 0x40000
	tests := []struct {
		name   string
		vector int // 0 little-endian, 1 big-endian
		damage func(t *testing.T, f string)
		err    string // regexp the message must match
		// model: the format is consistent (image.Open accepts it) but the
		// zone model refuses it: image check reports it as a corruption.
		model bool
		// table: only the write-pointer table is damaged: image check
		// reports it as a corruption and check --repair rebuilds it.
		table bool
	}{
		{"table entry outside its zone", 0, func(t *testing.T, f string) {
			b := make([]byte, 8)
			binary.LittleEndian.PutUint64(b, 7*vZone) // zone 5's entry
			writeAt(t, f, table+5*8, b)
		}, `write-pointer table.*valid in neither byte order`, false, true},
		{"big-endian table entry outside its zone", 1, func(t *testing.T, f string) {
			putU64(t, f, table+63*8, 64*vZone+512)
		}, `write-pointer table.*valid in neither byte order`, false, true},
		{"truncated extension", 0, func(t *testing.T, f string) {
			putU32(t, f, zonedExtOffset(t, f)+4, 48)
		}, `zoned header extension is 48 bytes, want at least 56`, false, false},
		{"unknown zone model", 0, func(t *testing.T, f string) {
			writeAt(t, f, zonedExtOffset(t, f)+8, []byte{2})
		}, `unknown zone model 2`, false, false},
		{"zone model 0 with the zoned bit", 1, func(t *testing.T, f string) {
			writeAt(t, f, zonedExtOffset(t, f)+8, []byte{0})
		}, `zoned format bit set but the extension says not zoned`, false, false},
		{"zoned bit without the extension", 0, func(t *testing.T, f string) {
			putU32(t, f, zonedExtOffset(t, f), 0x12345678)
		}, `zoned header extension is missing`, false, false},
		{"nr_zones wrong", 0, func(t *testing.T, f string) {
			putU32(t, f, zonedExtOffset(t, f)+8+24, 63)
		}, `nr_zones 63`, false, false},
		{"table past the end of the file", 1, func(t *testing.T, f string) {
			if err := os.Truncate(f, table+100); err != nil {
				t.Fatal(err)
			}
		}, `(?i)write-pointer table.*(end of the file|past|beyond|file ends)`, false, true},
		{"write pointer not sector-aligned", 0, func(t *testing.T, f string) {
			b := make([]byte, 8)
			binary.LittleEndian.PutUint64(b, 4*vZone+100)
			writeAt(t, f, table+4*8, b)
		}, `zone 4: write pointer 0x4000064 is not a multiple of 512`, true, false},
		// Geometries the image format accepts but the zone model refuses:
		// on the big-endian vector, whose table a writable session would
		// rewrite in little-endian order if it got that far.
		{"every zone conventional", 1, func(t *testing.T, f string) {
			putU32(t, f, zonedExtOffset(t, f)+8+20, 64)
		}, `zone.conventional_zones 64 >= 64 zones`, true, false},
		{"max append too large", 1, func(t *testing.T, f string) {
			putU32(t, f, zonedExtOffset(t, f)+8+36, 12<<20)
		}, `zone.max_append_bytes 12582912: must be smaller than zone.capacity`, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := vectorCopy(t, vectorNames[tt.vector])
			tt.damage(t, f)
			before := fileHash(t, f)
			re := regexp.MustCompile(tt.err)
			runs := [][]string{
				{"io", "-c", "zrp 0 4", f},
				{"io", "-c", "write 48M 4k", "-c", "zrs 0 1G", f},
				{"io", "-r", "-c", "zrp 0 4", f},
			}
			switch {
			case tt.model:
				stdout, stderr, code := cli(t, "", "image", "check", f)
				if code != exitCheckCorrupt || !regexp.MustCompile(`(?m)^ERROR zone model: .*`+tt.err).MatchString(stdout) {
					t.Errorf("check: exit %d, stdout %q, stderr %q; want exit 2 and ERROR zone model: %s", code, stdout, stderr, tt.err)
				}
			case tt.table:
				stdout, stderr, code := cli(t, "", "image", "check", f)
				if code != exitCheckCorrupt || !regexp.MustCompile(`(?m)^ERROR .*`+tt.err).MatchString(stdout) {
					t.Errorf("check: exit %d, stdout %q, stderr %q; want exit 2 and ERROR %s", code, stdout, stderr, tt.err)
				}
				runs = append(runs, []string{"image", "info", f})
			default:
				runs = append(runs, []string{"image", "check", f}, []string{"image", "check", "--repair", f},
					[]string{"image", "info", f})
			}
			for _, args := range runs {
				stdout, stderr, code := cli(t, "", args...)
				if code != exitFailure || !re.MatchString(stderr) || !strings.HasPrefix(stderr, "zq-csi: ") || stdout != "" {
					t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 1 and an error matching %q", args[:len(args)-1], code, stdout, stderr, tt.err)
				}
				if fileHash(t, f) != before {
					t.Fatalf("%q changed the file", args[:len(args)-1])
				}
			}
			if !tt.table {
				return
			}
			// The vectors hold no data: every zone comes back empty.
			stdout, stderr, code := cli(t, "", "image", "check", "-r", "all", f)
			if code != exitCheckClean || !strings.Contains(stdout, "write-pointer table rebuilt at ") {
				t.Fatalf("check -r all: exit %d, stdout %q, stderr %q; want exit 0 and the table rebuilt", code, stdout, stderr)
			}
			stdout, stderr, code = zoneIO(t, f, "-r", "zrp 0 4")
			if code != 0 || stdout != vectorReport {
				t.Fatalf("zrp after the repair: exit %d, stderr %q\n%s\nwant\n%s", code, stderr, stdout, vectorReport)
			}
		})
	}
}

// FuzzZonedIOCommandLine runs arbitrary command lines in sessions on a
// zoned image: they may fail, but must not panic, and a read-only session
// must not change the file.
func FuzzZonedIOCommandLine(f *testing.F) {
	for _, s := range []string{"zrp 0 4", "zrp 1G 1", "zrp 1023M 9223372036854775807", "zo 48M 16M", "zc 48M 1G",
		"zf 1008M 16M", "zrs 0 1G", "zrs 0 0", "zap -p 48M 4k 4k", "zap -P 0x5c 48M 0 0", "zap 48M 128k 512",
		"zap -p 0x3000000 512", "write 48M 4k", "write -z 40M 16M", "write -z 0 8E", "write 48M 12M",
		"write -zu 16M 1M", "read 48M 16M", "discard 40M 16M", "zone_report -1 1", "zap 48M"} {
		f.Add(s)
	}
	rw := vectorCopy(f, vectorNames[0])
	ro := vectorCopy(f, vectorNames[1])
	data, err := os.ReadFile(ro)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, line string) {
		if strings.ContainsAny(line, "\n\r") {
			return
		}
		cli(t, "", "io", "-c", line, rw)
		cli(t, "", "io", "-r", "-c", line, ro)
		if after, _ := os.ReadFile(ro); string(after) != string(data) {
			t.Fatalf("read-only %q changed the image", line)
		}
	})
}
