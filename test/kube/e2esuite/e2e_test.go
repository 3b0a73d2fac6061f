// Package e2esuite is Kubernetes' end-to-end test binary cut down to the
// storage suites that run against an installed CSI driver
// (test/e2e/storage/external): the same suite setup, flags and reporting
// as the upstream e2e.test (k8s.io/kubernetes/test/e2e), without the
// thousands of specs for the rest of Kubernetes, which would only make the
// binary slower to build and every --ginkgo.focus slower to evaluate.
//
// The driver comes from --storage.testdriver=FILE (test/kube/e2e-driver.yaml);
// test/kube/e2e-k8s.sh runs it on the node of test/kube/node-up.sh.
package e2esuite

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"k8s.io/kubernetes/test/e2e"
	"k8s.io/kubernetes/test/e2e/framework"
	"k8s.io/kubernetes/test/e2e/framework/config"
	"k8s.io/kubernetes/test/e2e/framework/testfiles"
	e2etestingmanifests "k8s.io/kubernetes/test/e2e/testing-manifests"

	// the suites for a driver named by --storage.testdriver
	_ "k8s.io/kubernetes/test/e2e/storage/external"

	// what the upstream binary sets up in the framework
	_ "k8s.io/kubernetes/test/e2e/framework/debug/init"
	_ "k8s.io/kubernetes/test/e2e/framework/node/init"
	_ "k8s.io/kubernetes/test/utils/ktesting/format"
)

func TestMain(m *testing.M) {
	// config.Flags holds --storage.testdriver: parsing it defines the specs.
	config.CopyFlags(config.Flags, flag.CommandLine)
	framework.RegisterCommonFlags(flag.CommandLine)
	framework.RegisterClusterFlags(flag.CommandLine)
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unknown arguments: %q\n", flag.Args())
		os.Exit(2)
	}
	testfiles.AddFileSource(e2etestingmanifests.GetE2ETestingManifestsFS())
	framework.AfterReadingAllFlags(&framework.TestContext)
	if framework.TestContext.RepoRoot != "" {
		// the driver definition's StorageClass file, relative to --repo-root
		testfiles.AddFileSource(testfiles.RootFileSource{Root: framework.TestContext.RepoRoot})
	}
	os.Exit(m.Run())
}

func TestE2E(t *testing.T) { e2e.RunE2ETests(t) }
