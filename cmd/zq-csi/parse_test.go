package main

import (
	"math"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want int64
	}{
		{"plain bytes", "4096", 4096},
		{"zero", "0", 0},
		{"leading zeros are decimal not octal", "012", 12},
		{"hexadecimal", "0x1000", 4096},
		{"hexadecimal upper case", "0X1F", 31},
		{"b suffix means bytes", "512b", 512},
		{"B suffix means bytes", "512B", 512},
		{"k is 1024", "4k", 4096},
		{"K is 1024", "4K", 4096},
		{"M is a power of 1024", "64M", 64 << 20},
		{"m is case-insensitive", "64m", 64 << 20},
		{"G", "1G", 1 << 30},
		{"T", "2T", 2 << 40},
		{"P", "1P", 1 << 50},
		{"E", "1E", 1 << 60},
		{"IEC KiB", "4KiB", 4096},
		{"IEC MiB", "64MiB", 64 << 20},
		{"IEC GiB", "1GiB", 1 << 30},
		{"Kubernetes Ki", "4Ki", 4096},
		{"Kubernetes Mi", "64Mi", 64 << 20},
		{"Kubernetes Gi", "1Gi", 1 << 30},
		{"fraction with a unit", "1.5k", 1536},
		{"fraction is truncated to whole bytes", "1.0001k", 1024},
		{"fraction with IEC unit", "1.5GiB", 3 << 29},
		{"trailing dot with a unit", "1.k", 1024},
		{"largest int64", "9223372036854775807", math.MaxInt64},
		{"largest hex", "0x7fffffffffffffff", math.MaxInt64},
		{"7E fits", "7E", 7 << 60},
		{"long fraction stays exact", "1.99999999999999999999999999k", 2047},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if err != nil {
				t.Fatalf("ParseSize(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseSize(%q) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseSizeRefuses(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		errText string
	}{
		{"empty", "", "non-numeric"},
		{"letters", "x", "non-numeric"},
		{"negative", "-1", "non-numeric"},
		{"plus sign", "+1", "non-numeric"},
		{"fraction without a unit", "1.5", "non-numeric"},
		{"fraction with bytes unit", "1.5b", "non-numeric"},
		{"leading dot", ".5k", "non-numeric"},
		{"exponent notation", "1e3", "non-numeric"},
		{"decimal kB is not a unit", "1kb", "non-numeric"},
		{"lower-case IEC i only after a unit", "1i", "non-numeric"},
		{"hex with a unit", "0x1k", "non-numeric"},
		{"hex without digits", "0x", "non-numeric"},
		{"binary literal", "0b11", "non-numeric"},
		{"blank inside", "1 k", "non-numeric"},
		{"leading blank", " 12", "non-numeric"},
		{"unit twice", "1kk", "non-numeric"},
		{"one past int64", "9223372036854775808", "too large"},
		{"8E overflows", "8E", "too large"},
		{"huge decimal", strings.Repeat("9", 40), "too large"},
		{"huge hex", "0x" + strings.Repeat("f", 17), "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSize(tt.in)
			if err == nil {
				t.Fatalf("ParseSize(%q) = %d, want an error", tt.in, got)
			}
			if !strings.Contains(err.Error(), tt.errText) || !strings.Contains(err.Error(), strconv.Quote(tt.in)) {
				t.Fatalf("ParseSize(%q) error %q: want it to quote the input and say %q", tt.in, err, tt.errText)
			}
		})
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "4096", "0x1000", "4k", "1.5M", "64MiB", "64Mi", "1E", "8E",
		"9223372036854775807", "1.k", ".5k", "0x", "", "1.0001k", "1kb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseSize(s)
		if err != nil {
			return
		}
		if v < 0 {
			t.Fatalf("ParseSize(%q) = %d, negative", s, v)
		}
		// The decimal form of any accepted value parses to itself.
		if w, err := ParseSize(strconv.FormatInt(v, 10)); err != nil || w != v {
			t.Fatalf("ParseSize(%d) = %d, %v", v, w, err)
		}
		// A plain decimal number means exactly its value.
		if n, err := strconv.ParseInt(s, 10, 64); err == nil && s[0] != '+' && s[0] != '-' && n != v {
			t.Fatalf("ParseSize(%q) = %d, want %d", s, v, n)
		}
		// A unit multiplies: "<s>k" is 1024 times "<s>" when both are whole.
		if !strings.ContainsAny(s, ".xXkKmMgGtTpPeEbBiI") && v <= math.MaxInt64>>10 {
			if w, err := ParseSize(s + "k"); err != nil || w != v<<10 {
				t.Fatalf("ParseSize(%q) = %d, %v; want %d", s+"k", w, err, v<<10)
			}
		}
	})
}

func TestParsePattern(t *testing.T) {
	good := []struct {
		name string
		in   string
		want byte
	}{
		{"decimal", "171", 171},
		{"hexadecimal", "0xab", 0xab},
		{"hexadecimal upper case", "0XAB", 0xab},
		{"octal with a leading zero", "0253", 0253},
		{"zero", "0", 0},
		{"largest", "255", 255},
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParsePattern(tt.in)
			if err != nil || got != tt.want {
				t.Fatalf("ParsePattern(%q) = %#x, %v; want %#x", tt.in, got, err, tt.want)
			}
		})
	}
	for _, in := range []string{"", "256", "0x100", "-1", "0x", "09", "ab", "1k", "0xabc"} {
		t.Run("refuses "+strconv.Quote(in), func(t *testing.T) {
			if got, err := ParsePattern(in); err == nil {
				t.Fatalf("ParsePattern(%q) = %#x, want an error", in, got)
			} else if err.Error() != in+" is not a valid pattern byte" {
				t.Fatalf("ParsePattern(%q) error %q: want qemu-io's message", in, err)
			}
		})
	}
}

func FuzzParsePattern(f *testing.F) {
	for _, s := range []string{"0", "0xcd", "0253", "255", "256", "", "0x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := ParsePattern(s)
		if err != nil {
			return
		}
		for _, form := range []string{strconv.Itoa(int(b)), "0x" + strconv.FormatInt(int64(b), 16), "0" + strconv.FormatInt(int64(b), 8)} {
			if c, err := ParsePattern(form); err != nil || c != b {
				t.Fatalf("ParsePattern(%q) = %d, %v; want %d like %q", form, c, err, b, s)
			}
		}
	})
}

func TestParseOptList(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want [][2]string
	}{
		{"one pair", "cluster_size=4k", [][2]string{{"cluster_size", "4k"}}},
		{"several pairs in order", "cluster_size=4k,refcount_bits=1,lazy_refcounts=on",
			[][2]string{{"cluster_size", "4k"}, {"refcount_bits", "1"}, {"lazy_refcounts", "on"}}},
		{"double comma is a literal comma", "backing_file=a,,b,fmt=x",
			[][2]string{{"backing_file", "a,b"}, {"fmt", "x"}}},
		{"a flag without a value is on", "lazy_refcounts", [][2]string{{"lazy_refcounts", "on"}}},
		{"help has no value", "help", [][2]string{{"help", ""}}},
		{"question mark is help", "?", [][2]string{{"?", ""}}},
		{"empty value", "preallocation=", [][2]string{{"preallocation", ""}}},
		{"value may hold equals signs", "k=a=b", [][2]string{{"k", "a=b"}}},
		{"trailing comma ends the list", "a=1,", [][2]string{{"a", "1"}}},
		{"dotted zone keys", "zone.mode=host-managed,zone.size=64M",
			[][2]string{{"zone.mode", "host-managed"}, {"zone.size", "64M"}}},
		{"empty list", "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseOptList(tt.in)
			if err != nil {
				t.Fatalf("ParseOptList(%q): %v", tt.in, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ParseOptList(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
	for _, in := range []string{"=1", ",a=1", "a=1,,,=2", "a,,b"} {
		t.Run("refuses an empty key in "+strconv.Quote(in), func(t *testing.T) {
			if got, err := ParseOptList(in); err == nil {
				t.Fatalf("ParseOptList(%q) = %q, want an error", in, got)
			}
		})
	}
}

// encodeOptList is ParseOptList's inverse.
func encodeOptList(kvs [][2]string) string {
	var parts []string
	for _, kv := range kvs {
		if kv[1] == "" && (kv[0] == "help" || kv[0] == "?") {
			parts = append(parts, kv[0])
			continue
		}
		parts = append(parts, kv[0]+"="+strings.ReplaceAll(kv[1], ",", ",,"))
	}
	return strings.Join(parts, ",")
}

func FuzzParseOptList(f *testing.F) {
	for _, s := range []string{"cluster_size=4k,refcount_bits=1", "a=b,,c", "help", "lazy_refcounts", "a=,b=", "=x", ",", "a,,b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		kvs, err := ParseOptList(s)
		if err != nil {
			return
		}
		for _, kv := range kvs {
			if kv[0] == "" || strings.ContainsAny(kv[0], "=,") {
				t.Fatalf("ParseOptList(%q): bad key %q", s, kv[0])
			}
		}
		again, err := ParseOptList(encodeOptList(kvs))
		if err != nil || !reflect.DeepEqual(again, kvs) {
			t.Fatalf("ParseOptList(%q) = %q; re-encoded %q parses to %q, %v", s, kvs, encodeOptList(kvs), again, err)
		}
	})
}

func TestGetopt(t *testing.T) {
	tests := []struct {
		name     string
		args     string
		opts     []opt
		operands []string
	}{
		{"no options", "0 4k", nil, []string{"0", "4k"}},
		{"option with a separate argument", "-P 0xab 0 4k", []opt{{'P', "0xab"}}, []string{"0", "4k"}},
		{"option with an attached argument", "-P0xab 0 4k", []opt{{'P', "0xab"}}, []string{"0", "4k"}},
		{"combined flags", "-zu 0 4k", []opt{{'z', ""}, {'u', ""}}, []string{"0", "4k"}},
		{"flags then an argument in one word", "-qP0xab 0 1", []opt{{'q', ""}, {'P', "0xab"}}, []string{"0", "1"}},
		{"options after operands are permuted", "0 4k -P 5", []opt{{'P', "5"}}, []string{"0", "4k"}},
		{"double dash ends options", "-q -- -1 2", []opt{{'q', ""}}, []string{"-1", "2"}},
		{"a lone dash is an operand", "- 1", nil, []string{"-", "1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts, operands, err := getopt(SplitCommandLine(tt.args), "P:qzu")
			if err != nil {
				t.Fatalf("getopt(%q): %v", tt.args, err)
			}
			if !reflect.DeepEqual(opts, tt.opts) || !reflect.DeepEqual(operands, tt.operands) {
				t.Fatalf("getopt(%q) = %v %q, want %v %q", tt.args, opts, operands, tt.opts, tt.operands)
			}
		})
	}
	for _, tt := range []struct{ name, args, err string }{
		{"unknown option", "-x 0 1", "invalid option -- 'x'"},
		{"negative number looks like an option", "0 -1", "invalid option -- '1'"},
		{"missing argument", "0 1 -P", "option requires an argument -- 'P'"},
		{"colon is not an option", "-: 0 1", "invalid option -- ':'"},
	} {
		t.Run("refuses "+tt.name, func(t *testing.T) {
			_, _, err := getopt(SplitCommandLine(tt.args), "P:qzu")
			if err == nil || err.Error() != tt.err {
				t.Fatalf("getopt(%q) error %v, want %q", tt.args, err, tt.err)
			}
		})
	}
}

func FuzzGetopt(f *testing.F) {
	for _, s := range []string{"-P 0xab 0 4k", "-zu 0 4k", "-- -1", "-P", "-qvP1 0 1 -s 1 -l 2", "-:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		const spec = "P:s:l:qv"
		words := SplitCommandLine(line)
		opts, operands, err := getopt(words, spec)
		if err != nil {
			return
		}
		// Every option is one of spec's, and re-spelt one per word
		// ("-P arg"), followed by "--" and the operands, it parses the same.
		var again []string
		for _, o := range opts {
			i := strings.IndexByte(spec, o.name)
			if i < 0 || o.name == ':' {
				t.Fatalf("getopt(%q): option %q not in %q", line, o.name, spec)
			}
			again = append(again, "-"+string(o.name))
			if i+1 < len(spec) && spec[i+1] == ':' {
				again = append(again, o.arg)
			} else if o.arg != "" {
				t.Fatalf("getopt(%q): flag %q has an argument %q", line, o.name, o.arg)
			}
		}
		again = append(append(again, "--"), operands...)
		opts2, operands2, err := getopt(again, spec)
		if err != nil || !reflect.DeepEqual(opts2, opts) || len(operands2) != len(operands) ||
			(len(operands) > 0 && !reflect.DeepEqual(operands2, operands)) {
			t.Fatalf("getopt(%q) = %v %q; respelt %q gives %v %q, %v", line, opts, operands, again, opts2, operands2, err)
		}
	})
}

func TestSplitCommandLine(t *testing.T) {
	got := SplitCommandLine("  write\t-P 0xab   0 4k ")
	want := []string{"write", "-P", "0xab", "0", "4k"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestParseBool(t *testing.T) {
	for in, want := range map[string]bool{"on": true, "off": false, "yes": true, "no": false, "true": true, "false": false, "ON": true} {
		if got, err := ParseBool(in); err != nil || got != want {
			t.Errorf("ParseBool(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseBool("maybe"); err == nil {
		t.Error("ParseBool(maybe): want an error")
	}
}
