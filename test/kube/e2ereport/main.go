// Command e2ereport turns the JSON report of a Ginkgo suite (e2e.test
// --ginkgo.json-report=FILE) into the VM tier's check lines: "ok - SPEC
// (Ns)" for each spec that passed, "not ok - SPEC: FAILURE" for each that
// failed, and, for the specs that did not run, one comment line per reason
// with how many, each spec and its reason listed in full in --skipped FILE.
//
//	e2ereport [--scope REGEXP] [--reasons FILE] [--skipped FILE] REPORT.json
//
// A spec skipped while running (the suite's own Skip: an unsupported
// capability) has its reason in the report. A spec left out by
// --ginkgo.skip has none there: --reasons FILE gives one per regular
// expression, "REGEXP<TAB>REASON" per line (the same expressions the
// runner joins into --ginkgo.skip); a spec matching none of them was left
// out by --ginkgo.focus. Specs whose name --scope does not match (the rest of the binary's specs)
// are not counted at all. Exits 1 if a spec failed or none ran.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"
)

// report is the part of Ginkgo's types.Report this command reads.
type report struct {
	SpecReports []struct {
		ContainerHierarchyTexts []string
		LeafNodeType            string
		LeafNodeText            string
		State                   string
		RunTime                 time.Duration
		Failure                 struct{ Message string }
	}
}

// reason is a --reasons line: specs whose name matches re were left out
// because of text.
type reason struct {
	re   *regexp.Regexp
	text string
}

func main() {
	reasonsFile := flag.String("reasons", "", "REGEXP<TAB>REASON lines for the specs --ginkgo.skip leaves out")
	skippedFile := flag.String("skipped", "", "write every spec that did not run, with its reason, to this file")
	scopeExpr := flag.String("scope", "", "count only the specs whose full name this regular expression matches")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: e2ereport [--scope REGEXP] [--reasons FILE] [--skipped FILE] REPORT.json")
		os.Exit(2)
	}
	scope, err := regexp.Compile(*scopeExpr)
	if err != nil {
		fatal(fmt.Errorf("--scope: %w", err))
	}
	// the catch-all last: a left-out spec no --reasons line names
	reasons := []reason{}
	if *reasonsFile != "" {
		if reasons, err = readReasons(*reasonsFile); err != nil {
			fatal(err)
		}
	}
	reasons = append(reasons, reason{regexp.MustCompile(""), "not selected (--ginkgo.focus)"})
	data, err := os.ReadFile(flag.Arg(0))
	if err != nil {
		fatal(err)
	}
	var reports []report
	if err := json.Unmarshal(data, &reports); err != nil {
		fatal(fmt.Errorf("%s: %w", flag.Arg(0), err))
	}
	var skipped io.Writer = io.Discard
	if *skippedFile != "" {
		f, err := os.Create(*skippedFile)
		if err != nil {
			fatal(err)
		}
		defer f.Close()
		skipped = f
	}
	s := summarize(reports, scope, reasons, os.Stdout, skipped)
	if s.failed > 0 || s.passed == 0 {
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "e2ereport:", err)
	os.Exit(2)
}

func readReasons(name string) ([]reason, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rs []reason
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		expr, text, ok := strings.Cut(line, "\t")
		if !ok || text == "" {
			return nil, fmt.Errorf("%s:%d: want REGEXP<TAB>REASON", name, n)
		}
		re, err := regexp.Compile(expr)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, n, err)
		}
		rs = append(rs, reason{re, text})
	}
	return rs, sc.Err()
}

type summary struct{ passed, failed, skipped int }

// summarize writes the check lines to out and the left-out specs to
// skipped: the specs in scope, each left-out one with the reason of the
// first of reasons that matches it. Suite-level nodes (BeforeSuite and the
// like) count only when they fail: a failed setup fails every spec after it.
func summarize(reports []report, scope *regexp.Regexp, reasons []reason, out, skipped io.Writer) summary {
	var s summary
	byReason := map[string]int{}
	for _, r := range reports {
		for _, spec := range r.SpecReports {
			name := strings.Join(append(slices.Clone(spec.ContainerHierarchyTexts), spec.LeafNodeText), " ")
			if spec.LeafNodeType != "It" {
				name = strings.TrimSpace(spec.LeafNodeType + " " + name)
			} else if !scope.MatchString(name) {
				continue
			}
			switch spec.State {
			case "passed":
				if spec.LeafNodeType == "It" {
					s.passed++
					fmt.Fprintf(out, "ok - %s (%.0fs)\n", name, spec.RunTime.Seconds())
				}
			case "skipped", "pending":
				if spec.LeafNodeType != "It" {
					continue
				}
				s.skipped++
				why := firstLine(spec.Failure.Message)
				if why == "" {
					why = reasonFor(name, reasons)
				}
				byReason[why]++
				fmt.Fprintf(skipped, "%s\t%s\n", name, why)
			default: // failed, panicked, timedout, interrupted, aborted
				s.failed++
				fmt.Fprintf(out, "not ok - %s: %s: %s\n", name, spec.State, firstLine(spec.Failure.Message))
			}
		}
	}
	whys := make([]string, 0, len(byReason))
	for w := range byReason {
		whys = append(whys, w)
	}
	slices.Sort(whys)
	fmt.Fprintf(out, "# %d specs did not run:\n", s.skipped)
	for _, w := range whys {
		fmt.Fprintf(out, "#   %4d  %s\n", byReason[w], w)
	}
	return s
}

// reasonFor is the text of the first of reasons that matches name.
func reasonFor(name string, reasons []reason) string {
	for _, r := range reasons {
		if r.re.MatchString(name) {
			return r.text
		}
	}
	return ""
}

// firstLine is the first non-empty line of a failure message, which is
// often a multi-line dump.
func firstLine(msg string) string {
	for l := range strings.Lines(msg) {
		if l = strings.TrimSpace(l); l != "" {
			return l
		}
	}
	return ""
}
