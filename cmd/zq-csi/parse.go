package main

// Parsers for the command line: sizes and numbers (qemu's qemu_strtosz
// syntax, plus the MiB and Kubernetes Mi forms), qemu-img option lists
// (-o k=v,k=v) and qemu-io command lines. They are pure functions so that
// table tests and fuzz targets can cover them.

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strings"
)

// errNumSyntax and errNumRange are wrapped by ParseSize's errors; the
// texts are qemu-io's.
var (
	errNumSyntax = errors.New("non-numeric argument, or extraneous/unrecognized suffix")
	errNumRange  = errors.New("argument too large")
)

// sizeSuffixes maps a unit suffix (case-insensitive) to its power of 1024.
// qemu's single letters (B, K, M, G, T, P, E) are powers of 1024, and so
// are the IEC forms (KiB, MiB, ...) and the Kubernetes quantities (Ki, Mi,
// ...). Kubernetes' decimal suffixes (k = 1000, M = 10^6) are deliberately
// not supported: in this tool "M" always means MiB, as in qemu-img.
var sizeSuffixes = func() map[string]uint {
	m := map[string]uint{"": 0, "b": 0}
	for i, l := range []string{"k", "m", "g", "t", "p", "e"} {
		shift := uint(10 * (i + 1))
		m[l] = shift
		m[l+"i"] = shift
		m[l+"ib"] = shift
	}
	return m
}()

// ParseSize parses a byte count the way qemu-img and qemu-io do
// (qemu_strtosz with bytes as the default unit) and accepts the IEC and
// Kubernetes binary forms as well:
//
//	4096  0x1000  4k  4K  1.5M  2G  1T  1P  1E  64MiB  64Mi  512b
//
// A fraction needs a unit other than bytes and is truncated to whole
// bytes ("1.5k" is 1536). Hexadecimal takes no fraction and no unit. The
// result is at most math.MaxInt64.
func ParseSize(s string) (int64, error) {
	v, err := parseSize(s)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: %w", s, err)
	}
	return v, nil
}

func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, errNumSyntax
	}
	if len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X') {
		var v uint64
		for _, c := range s[2:] {
			d, ok := hexDigit(c)
			if !ok {
				return 0, errNumSyntax
			}
			if v > (math.MaxInt64-uint64(d))/16 {
				return 0, errNumRange
			}
			v = v*16 + uint64(d)
		}
		return int64(v), nil
	}
	i := 0
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	if i == 0 {
		return 0, errNumSyntax
	}
	intPart := s[:i]
	fracPart := ""
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && isDigit(s[j]) {
			j++
		}
		fracPart = s[i+1 : j]
		if fracPart == "" {
			fracPart = "0" // "1.k" is 1k, as in qemu
		}
		i = j
	}
	shift, ok := sizeSuffixes[strings.ToLower(s[i:])]
	if !ok {
		return 0, errNumSyntax
	}
	if fracPart != "" && shift == 0 {
		return 0, errNumSyntax
	}
	// Exact arithmetic: (int + frac/10^n) * 2^shift, truncated.
	v, _ := new(big.Int).SetString(intPart, 10)
	v.Lsh(v, shift)
	if fracPart != "" {
		f, _ := new(big.Int).SetString(fracPart, 10)
		f.Lsh(f, shift)
		f.Quo(f, new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(fracPart))), nil))
		v.Add(v, f)
	}
	if !v.IsInt64() {
		return 0, errNumRange
	}
	return v.Int64(), nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func hexDigit(c rune) (int, bool) {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0'), true
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10, true
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10, true
	}
	return 0, false
}

// ParsePattern parses a qemu-io pattern byte: a C integer literal
// (decimal, 0x hexadecimal or 0 octal) from 0 to 255.
func ParsePattern(s string) (byte, error) {
	bad := fmt.Errorf("%s is not a valid pattern byte", s)
	base, digits := 10, s
	switch {
	case len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'):
		base, digits = 16, s[2:]
	case len(s) > 1 && s[0] == '0':
		base, digits = 8, s[1:]
	}
	if digits == "" {
		return 0, bad
	}
	v := 0
	for _, c := range digits {
		d, ok := hexDigit(c)
		if !ok || d >= base {
			return 0, bad
		}
		v = v*base + d
		if v > 255 {
			return 0, bad
		}
	}
	return byte(v), nil
}

// ParseOptList splits a qemu option list "k=v,k=v" into its pairs, in
// order. A literal comma in a value is written ",,", as in qemu. A key
// without "=" gets the value "on" for flags, except "help" and "?", which
// are returned as keys with an empty value so that the caller can list
// the options.
func ParseOptList(s string) ([][2]string, error) {
	var out [][2]string
	for len(s) > 0 {
		// The key ends at '=' or ','.
		k := strings.IndexAny(s, "=,")
		if k < 0 {
			k = len(s)
		}
		key := s[:k]
		if key == "" {
			return nil, fmt.Errorf("invalid option list: empty option name in %q", s)
		}
		s = s[k:]
		if s == "" || s[0] == ',' {
			val := "on"
			if key == "help" || key == "?" {
				val = ""
			}
			out = append(out, [2]string{key, val})
			if s != "" {
				s = s[1:]
			}
			continue
		}
		// s[0] == '=': the value runs to a single ',' (",," is a comma).
		s = s[1:]
		var val strings.Builder
		for {
			c := strings.IndexByte(s, ',')
			if c < 0 {
				val.WriteString(s)
				s = ""
				break
			}
			val.WriteString(s[:c])
			if c+1 < len(s) && s[c+1] == ',' {
				val.WriteByte(',')
				s = s[c+2:]
				continue
			}
			s = s[c+1:]
			break
		}
		out = append(out, [2]string{key, val.String()})
	}
	return out, nil
}

// ParseBool parses a qemu boolean option value.
func ParseBool(s string) (bool, error) {
	switch strings.ToLower(s) {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("invalid boolean %q (use on or off)", s)
}

// SplitCommandLine splits a qemu-io command line into words at blanks.
// Like qemu-io it has no quoting.
func SplitCommandLine(line string) []string {
	return strings.Fields(line)
}

// getopt parses the options of one qemu-io command, POSIX style with GNU
// permutation: spec lists the option letters, a letter followed by ':'
// takes an argument ("P:qvz"). Options may be combined ("-zu"), an
// argument may be attached ("-P0xab") or follow, "--" ends the options,
// and options may come after the operands. It returns the options in
// order and the operands.
type opt struct {
	name byte
	arg  string
}

func getopt(args []string, spec string) ([]opt, []string, error) {
	var opts []opt
	var operands []string
args:
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			operands = append(operands, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			operands = append(operands, a)
			continue
		}
		for j := 1; j < len(a); j++ {
			c := a[j]
			k := strings.IndexByte(spec, c)
			if k < 0 || c == ':' {
				return nil, nil, fmt.Errorf("invalid option -- '%c'", c)
			}
			if k+1 < len(spec) && spec[k+1] == ':' {
				switch {
				case j+1 < len(a):
					opts = append(opts, opt{c, a[j+1:]})
				case i+1 < len(args):
					i++
					opts = append(opts, opt{c, args[i]})
				default:
					return nil, nil, fmt.Errorf("option requires an argument -- '%c'", c)
				}
				continue args
			}
			opts = append(opts, opt{c, ""})
		}
	}
	return opts, operands, nil
}
