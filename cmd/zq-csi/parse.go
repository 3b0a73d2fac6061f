package main

// Parsers for the command line: qemu-img option lists (-o k=v,k=v),
// qemu-io pattern bytes and command lines. Sizes and the image options
// themselves are package volume's, shared with the CSI driver. They are
// pure functions so that table tests and fuzz targets can cover them.

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/zq-csi/zq-csi/imageopt"
)

// ParseSize is imageopt.ParseSize (qemu-img sizes plus the IEC and
// Kubernetes binary forms), the one size syntax of the whole tool.
func ParseSize(s string) (int64, error) { return imageopt.ParseSize(s) }

// ParsePattern parses a qemu-io pattern byte: a C integer literal
// (decimal, 0x hexadecimal or 0 octal) from 0 to 255.
func ParsePattern(s string) (byte, error) {
	base, digits := 10, s
	switch {
	case len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'):
		base, digits = 16, s[2:]
	case len(s) > 1 && s[0] == '0':
		base, digits = 8, s[1:]
	}
	// With an explicit base, ParseUint takes neither a sign nor '_'.
	v, err := strconv.ParseUint(digits, base, 8)
	if err != nil {
		return 0, fmt.Errorf("%s is not a valid pattern byte", s)
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
