package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// newFlagSet returns a flag set that reports errors instead of exiting, so
// that the subcommand decides the message and the exit code.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// parseInterspersed parses flags that may come before, between or after
// the operands, as GNU getopt lets qemu-img's users write them
// ("create FILE 1G -f qcow2"). "--" ends the flags. It returns the
// operands, or flag.ErrHelp for -h/--help, or a *usageError.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var operands []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, &usageError{err.Error()}
		}
		rest := fs.Args()
		// fs.Parse stops at the first operand or after "--"; tell them
		// apart by what preceded the rest.
		consumed := len(args) - len(rest)
		if consumed > 0 && args[consumed-1] == "--" {
			return append(operands, rest...), nil
		}
		if len(rest) == 0 {
			return operands, nil
		}
		operands = append(operands, rest[0])
		args = rest[1:]
	}
}

// listFlag is a repeatable string flag (-o a -o b).
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// choiceFlag is a string flag restricted to a set of values.
type choiceFlag struct {
	val     string
	choices []string
}

func (c *choiceFlag) String() string { return c.val }
func (c *choiceFlag) Set(s string) error {
	for _, v := range c.choices {
		if s == v {
			c.val = s
			return nil
		}
	}
	return fmt.Errorf("must be one of %s", strings.Join(c.choices, ", "))
}

// parseFileOperand parses the flags of a command on one image, adding the
// -f FORMAT flag they all take (qemu-img's; only qcow2), and its one FILE
// operand. done is true when the command has nothing more to do: help was
// shown (code exitOK) or the arguments were wrong and that was reported.
func (e *env) parseFileOperand(fs *flag.FlagSet, args []string, usage func(io.Writer)) (file string, code int, done bool) {
	format := fs.String("f", "qcow2", "image format (only qcow2)")
	operands, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		usage(e.stdout)
		return "", exitOK, true
	}
	if err == nil {
		err = checkFormat(*format)
	}
	if err == nil && len(operands) != 1 {
		err = usagef("expected one FILE, got %d operands", len(operands))
	}
	if err != nil {
		return "", e.fail(err, usage), true
	}
	return operands[0], exitOK, false
}
