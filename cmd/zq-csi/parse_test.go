package main

import (
	"reflect"
	"strconv"
	"strings"
	"testing"
)

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
