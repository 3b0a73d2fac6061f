package main

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
)

// A report in the shape Ginkgo writes (--ginkgo.json-report): a list of
// suites, each with its specs; State and the node type as strings, RunTime
// in nanoseconds.
const sample = `[{"SuiteDescription": "Kubernetes e2e suite", "SpecReports": [
 {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed", "RunTime": 5000000000},
 {"ContainerHierarchyTexts": ["[sig-storage] CSI Volumes", "[Driver: zq-csi.io]", "[Testpattern: Dynamic PV (block volmode)] volumes"],
  "LeafNodeType": "It", "LeafNodeText": "should store data", "State": "passed", "RunTime": 61400000000},
 {"ContainerHierarchyTexts": ["[sig-storage] CSI Volumes", "[Driver: zq-csi.io]", "[Testpattern: Dynamic PV (block volmode)] multiVolume"],
  "LeafNodeType": "It", "LeafNodeText": "should access to two volumes", "State": "failed",
  "Failure": {"Message": "\ntimed out waiting for the condition\nmore detail"}},
 {"ContainerHierarchyTexts": ["[sig-storage] CSI Volumes", "[Driver: zq-csi.io]", "[Testpattern: Dynamic PV (default fs)] volumes"],
  "LeafNodeType": "It", "LeafNodeText": "should store data", "State": "skipped"},
 {"ContainerHierarchyTexts": ["[sig-storage] CSI Volumes", "[Driver: zq-csi.io]", "[Testpattern: Dynamic Snapshot (delete policy)] snapshottable"],
  "LeafNodeType": "It", "LeafNodeText": "should check snapshot fields", "State": "skipped",
  "Failure": {"Message": "Driver zq-csi.io doesn't support snapshots -- skipping"}},
 {"ContainerHierarchyTexts": ["[sig-storage] ConfigMap"], "LeafNodeType": "It", "LeafNodeText": "should be consumable", "State": "skipped"},
 {"ContainerHierarchyTexts": ["[sig-storage] CSI Volumes", "[Driver: zq-csi.io]", "[Testpattern: Dynamic PV (block volmode)] disruptive"],
  "LeafNodeType": "It", "LeafNodeText": "should survive a kubelet restart", "State": "skipped"}
]}]`

func TestSummarize(t *testing.T) {
	var reports []report
	if err := json.Unmarshal([]byte(sample), &reports); err != nil {
		t.Fatal(err)
	}
	reasons := []reason{
		{regexp.MustCompile(`\(default fs\)`), "no Filesystem volumeMode yet"},
		{regexp.MustCompile(``), "not in the subset"},
	}
	var out, skipped strings.Builder
	s := summarize(reports, regexp.MustCompile(`\[Driver: zq-csi.io\]`), reasons, &out, &skipped)
	if s != (summary{passed: 1, failed: 1, skipped: 3}) {
		t.Errorf("summary %+v, want 1 passed, 1 failed, 3 skipped", s)
	}
	for _, want := range []string{
		"ok - [sig-storage] CSI Volumes [Driver: zq-csi.io] [Testpattern: Dynamic PV (block volmode)] volumes should store data (61s)\n",
		"not ok - [sig-storage] CSI Volumes [Driver: zq-csi.io] [Testpattern: Dynamic PV (block volmode)] multiVolume should access to two volumes: failed: timed out waiting for the condition\n",
		"# 3 specs did not run:\n",
		"#      1  Driver zq-csi.io doesn't support snapshots -- skipping\n",
		"#      1  no Filesystem volumeMode yet\n",
		"#      1  not in the subset\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q; it is:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "BeforeSuite") {
		t.Errorf("a suite node that passed is not a check line:\n%s", out.String())
	}
	if n := strings.Count(skipped.String(), "\n"); n != 3 {
		t.Errorf("skipped list has %d lines, want 3:\n%s", n, skipped.String())
	}
}

func TestSummarizeCountsAFailedSuiteNode(t *testing.T) {
	var reports []report
	if err := json.Unmarshal([]byte(`[{"SpecReports": [{"LeafNodeType": "SynchronizedBeforeSuite", "State": "failed",
		"Failure": {"Message": "nodes not schedulable"}}]}]`), &reports); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if s := summarize(reports, regexp.MustCompile(`zq-csi`), nil, &out, &strings.Builder{}); s.failed != 1 {
		t.Errorf("failed = %d, want 1; output:\n%s", s.failed, out.String())
	}
	if want := "not ok - SynchronizedBeforeSuite: failed: nodes not schedulable\n"; !strings.Contains(out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, out.String())
	}
}

func TestReadReasonsNamesTheBadLine(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ name, content, want string }{
		{"no tab", "# comment\n\\(default fs\\) no reason\n", ":2: want REGEXP<TAB>REASON"},
		{"bad regexp", "(unclosed\tsome reason\n", ":1: error parsing regexp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := dir + "/" + strings.ReplaceAll(tc.name, " ", "-")
			if err := os.WriteFile(f, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := readReasons(f)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}
