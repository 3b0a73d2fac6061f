# zq-csi. `make help` lists the targets.
#
# On a fresh Debian machine, as root: `make demo` and `make test` install
# what they need (make deps) and run. Go must be on PATH or in /usr/local/go.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build
export PATH := $(PATH):/usr/local/go/bin

GO ?= go
BIN := bin/zq-csi

# staticcheck v0.8.2 is release 2026.2.2, which supports Go 1.26.
STATICCHECK_VERSION ?= v0.8.2
STATICCHECK := $(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

# Each fuzz target runs this long in `make fuzz`.
FUZZTIME ?= 15s

# Power cuts per crash test in `make crash` (the tests' defaults are 500 and 600;
# 5000 takes about 5 minutes on a 2-core machine).
CRASH_CUTS ?= 5000

# The VM tier (test/e2e, owned by the VM harness): the script and its
# arguments. `make test` runs it when the script exists.
E2E_SCRIPT ?= test/e2e/run-vm-tests.sh
E2E_ARGS ?=

# The interop tier's tests are named TestInterop*: `make unit` skips them
# (it runs under the race detector), `make interop` runs only them.
INTEROP_TESTS := ^TestInterop

.PHONY: all build deps test vet unit interop e2e e2e-k8s lint bench fuzz crash crash-default demo tour deploy-check deploy-manifests image clean help

all: build

help:
	@echo "make build    build $(BIN)"
	@echo "make deps     install the Debian packages the tests need (only the missing ones; root)"
	@echo "make demo     deps + build, then the CSI demo: provision, stage, publish a zoned volume, show its zones"
	@echo "              (in the VM harness where this kernel has no ublk)"
	@echo "make tour     deps + build, then the image tools: create, write, verify, info, check; a zoned image"
	@echo "make deploy-check      chart, deploy/, examples/: helm lint, values schema, kubeconform, apiserver dry run"
	@echo "make deploy-manifests  regenerate deploy/ from charts/zq-csi"
	@echo "make image             build the container image (needs a docker or podman engine)"
	@echo "make test     deps, go vet, unit tests (race), interop tests (qemu-img/qemu-io), VM tests"
	@echo "make unit     unit and property tests, fuzz seeds, under the race detector (long loops sampled)"
	@echo "make crash-default  the long power-cut, process-death and random-model tests, whole"
	@echo "make interop  the interop tier alone"
	@echo "make e2e      the VM tier alone ($(E2E_SCRIPT) $(E2E_ARGS))"
	@echo "make e2e-k8s  a Kubernetes node in the VM harness: chart, PVCs in pods, restarts, Kubernetes' storage e2e suite"
	@echo "make lint     gofmt, go vet, staticcheck $(STATICCHECK_VERSION)"
	@echo "make bench    benchmarks with ratios to their peers (raw file, plain image, qemu-io, qemu-nbd), also in bench.txt"
	@echo "make fuzz     every fuzz target for FUZZTIME=$(FUZZTIME)"
	@echo "make crash    the crash (power cut) tests of image/ and zoned/ with CRASH_CUTS=$(CRASH_CUTS) cuts each"
	@echo "make clean    remove build outputs"

build:
	$(GO) build -o $(BIN) ./cmd/zq-csi

deps:
	bash scripts/deps.sh

# Every tier runs even when one before it failed; a table of tier, result
# and time ends the run, and it fails if any tier did (scripts/test-tiers.sh).
test: deps
	bash scripts/test-tiers.sh

# test/kube is a module of its own (the Kubernetes node tier's tools and
# their dependencies): ./... at the root does not reach it.
vet:
	$(GO) vet ./...
	cd test/kube && $(GO) vet ./...

# Explicit limits, with room for a busy machine: go test's own default (10
# minutes) is what a slow package hit under load.
UNIT_TIMEOUT ?= 20m
INTEROP_TIMEOUT ?= 20m
CRASH_TIMEOUT ?= 45m

# -short: the long randomized and power-cut loops run a sample here (they
# run whole in crash-default, without the race detector).
unit:
	$(GO) test -race -short -count=1 -timeout $(UNIT_TIMEOUT) -skip '$(INTEROP_TESTS)' ./...
	cd test/kube && $(GO) test -race -short -count=1 -timeout $(UNIT_TIMEOUT) ./...

interop:
	$(GO) test -count=1 -timeout $(INTEROP_TIMEOUT) -run '$(INTEROP_TESTS)' ./...

# The VM tests that run the binary use this build rather than compiling
# it again in the guest (vm.sh passes ZQ_* variables through).
# csi-sanity, the CSI conformance suite, from the Go module proxy (built
# on the host, run against `zq-csi serve` in the VM); the file is named
# after its version, so a new pin builds anew.
CSI_SANITY = bin/csi-sanity-$(CSI_SANITY_VERSION)
CSI_SANITY_VERSION = v5.6.0

$(CSI_SANITY):
	@echo "building csi-sanity $(CSI_SANITY_VERSION) from the Go module proxy into $(CSI_SANITY) (first run only: a few minutes)"
	GOBIN=$(CURDIR)/bin/.csi-sanity $(GO) install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$(CSI_SANITY_VERSION)
	mv bin/.csi-sanity/csi-sanity $@ && rmdir bin/.csi-sanity

e2e: build $(CSI_SANITY)
	ZQ_CSI_BIN=$(CURDIR)/$(BIN) ZQ_CSI_SANITY_BIN=$(CURDIR)/$(CSI_SANITY) bash $(E2E_SCRIPT) $(E2E_ARGS)

# A single-node Kubernetes in a VM harness guest (test/kube, README
# "Kubernetes"): the chart installed, PVCs in pods, the plugin and the
# kubelet restarted under I/O, every spec of Kubernetes' storage e2e suite
# that applies to zq-csi.
e2e-k8s:
	bash test/kube/node-up.sh test/kube/restart.sh test/kube/storage-e2e.sh

lint:
	@unformatted=$$(gofmt -l .); \
	if [ -n "$$unformatted" ]; then echo "gofmt -l: these files need gofmt -w:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

bench:
	$(GO) test -run='^$$' -bench=. -benchmem ./... | tee bench.txt
	@echo "== snapshots and clones of a 10 GiB volume 90% full (each deepens its chain: a fixed count)"
	$(GO) test -run='^$$' -bench=Golden10GiB -benchtime=20x -benchmem ./driver | tee -a bench.txt
	@echo "== ratios to the peer measured in the same run"
	@bash scripts/bench-ratios.sh bench.txt
	@echo "== zq-csi export against qemu-nbd, fio's nbd engine"
	bash scripts/bench-nbd.sh | tee -a bench.txt
	bash scripts/bench-ublk.sh | tee -a bench.txt
	bash scripts/bench-db.sh | tee -a bench.txt
	@echo "== 32 idle staged volumes: the plugin's memory and CPU (VM harness)"
	$(MAKE) build
	ZQ_CSI_BIN=$(CURDIR)/$(BIN) test/e2e/vm-go-test.sh ./driver -- -test.run '^$$' -test.bench IdleStagedVolumes -test.benchtime 1x | tee -a bench.txt

# go test -fuzz takes one target of one package at a time: list them all.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for target in $$($(GO) test -list '^Fuzz' "$$pkg" | grep '^Fuzz' || true); do \
			echo "== $$pkg $$target ($(FUZZTIME))"; \
			$(GO) test -run='^$$' -fuzz="^$$target\$$" -fuzztime=$(FUZZTIME) -fuzzminimizetime=5s "$$pkg"; \
		done; \
	done

# The long tests: power cuts, process deaths and random operation sequences
# against a model. `make unit` runs a sample of each under the race detector;
# crash-default (in `make test`) runs them whole without it (about 1,600
# power cuts in all); `make crash` runs CRASH_CUTS cuts per crash test.
LONG_TESTS := Crash|PowerCut|ProcessDeath|RandomOperations

crash-default:
	$(GO) test -count=1 -timeout $(CRASH_TIMEOUT) -run '$(LONG_TESTS)' ./image/ ./zoned/

crash:
	ZQ_CRASH_CUTS=$(CRASH_CUTS) $(GO) test -count=1 -timeout 90m -run 'Crash' ./image/

demo: deps build
	bash scripts/demo.sh

tour: deps build
	bash scripts/tour.sh $(BIN)

# The deployment tier: charts/zq-csi, deploy/ and examples/ through helm
# lint/template, values.schema.json, kubeconform -strict and a server-side
# dry run on a real kube-apiserver. Its tools (helm, kubeconform,
# kube-apiserver, kubectl, etcd) are built once from the Go module proxy
# into ~/.cache/zq-csi-tools (about 7 minutes cold), then reused (~10 s).
deploy-check:
	bash scripts/check-deploy.sh

# deploy/ is generated from the chart: run this after editing charts/zq-csi.
deploy-manifests:
	bash scripts/gen-deploy.sh

# The container image; without a docker/podman engine it says so and exits 0.
IMAGE ?=
image:
	bash scripts/deploy-image.sh $(IMAGE)

clean:
	rm -rf bin bench.txt
