#!/usr/bin/env bash
# Builds the pinned tools that scripts/check-deploy.sh needs, from the Go module
# proxy, into a cache directory outside the repository, and reuses them when
# they are there (a version is a directory: a new pin builds anew).
#
#   scripts/kube-tools.sh [helm|kubeconform|kube|node|provisioner|snapshotter|e2e|all]...   (default: all)
#
# Prints nothing but progress on stderr; the binaries end up in
#   $ZQ_TOOLS_DIR/bin/{helm,kubeconform,kube-apiserver,kubectl,etcd}
# and, for `node` (a Kubernetes node in the VM harness; not part of `all`),
#   $ZQ_TOOLS_DIR/bin/{kubelet,kube-controller-manager,kube-scheduler,
#                      containerd,containerd-shim-runc-v2,ctr,runc}
# for `provisioner` (the chart's csi-provisioner) bin/csi-provisioner, for
# `snapshotter` bin/csi-snapshotter and bin/snapshot-controller, and
# for `e2e` (Kubernetes' storage e2e suite, test/kube/e2esuite) bin/e2e.test
# (symlinks into the versioned directories). ZQ_TOOLS_DIR defaults to
# ${XDG_CACHE_HOME:-$HOME/.cache}/zq-csi-tools. runc needs cgo and Debian's
# libseccomp-dev and pkg-config.
#
# kube-apiserver, kubectl and etcd come from k8s.io/kubernetes, which is not
# meant to be used as a module: its go.mod replaces every k8s.io staging
# module with a directory of its own repository. A wrapper module requires
# k8s.io/kubernetes and replaces each of those modules with its published
# release (v0.X.Y for v1.X.Y); the list is read from kubernetes' own go.mod,
# so a new pin needs no edit here. etcd is built in the same module from
# go.etcd.io/etcd/server/v3/etcdmain, at the version kubernetes itself pins.
# Cold: about 6 minutes on 2 cores (the apiserver is most of it); warm: none.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$PATH:/usr/local/go/bin"

HELM_VERSION=${HELM_VERSION:-v3.22.0}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
RUNC_VERSION=${RUNC_VERSION:-v1.5.3}
# the chart's csi-provisioner (values.yaml sidecars.provisioner.image.tag)
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v6.4.0}
# the chart's csi-snapshotter (sidecars.snapshotter.image.tag), with the
# snapshot-controller of the same release for the test node
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.7.0}

TOOLS=${ZQ_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zq-csi-tools}
BIN=$TOOLS/bin
mkdir -p "$BIN"

log() { echo "kube-tools: $*" >&2; }

# building WHAT CMD...: run CMD, a build step that can take minutes, saying
# which one it is and its place (N/M), that it is still going (every
# minute) and how long it took.
building() {
	local what=$1 start=$SECONDS beat rc=0
	shift
	log "building $what ($((++step))/$steps; once, cached in $TOOLS)"
	# The heartbeat's sleep must not outlive it: it holds our stderr,
	# which a reader of this script's output waits on.
	(
		trap 'kill "$nap" 2>/dev/null; exit 0' TERM
		while :; do
			sleep 60 &
			nap=$!
			wait "$nap"
			log "  still building $what: $(((SECONDS - start) / 60)) min so far"
		done
	) &
	beat=$!
	"$@" || rc=$?
	kill "$beat" 2>/dev/null
	wait "$beat" 2>/dev/null
	if ((rc != 0)); then
		log "building $what failed after $((SECONDS - start))s"
		return "$rc"
	fi
	log "built $what in $((SECONDS - start))s"
}
step=0
steps=0

# link NAME PATH: $BIN/NAME -> PATH
link() { ln -sfn "$2" "$BIN/$1"; }

# goinstall DIR PKG@VERSION: go install into DIR unless the binary is there.
goinstall() {
	local dir=$1 pkg=$2 name
	name=$(basename "${pkg%@*}")
	if [ ! -x "$dir/$name" ]; then
		mkdir -p "$dir.tmp"
		GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS=-mod=mod building "$pkg" go install -trimpath -ldflags=-s "$pkg"
		rm -rf "$dir" && mv "$dir.tmp" "$dir"
	fi
	link "$name" "$dir/$name"
}

helm_tool() {
	# helm's version string comes from ldflags; set it so `helm version` is honest.
	local dir=$TOOLS/helm-$HELM_VERSION
	if [ ! -x "$dir/helm" ]; then
		mkdir -p "$dir.tmp"
		GOBIN="$dir.tmp" CGO_ENABLED=0 building "helm $HELM_VERSION" go install -trimpath \
			-ldflags="-s -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
			"helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
		rm -rf "$dir" && mv "$dir.tmp" "$dir"
	fi
	link helm "$dir/helm"
}

kubeconform_tool() {
	goinstall "$TOOLS/kubeconform-$KUBECONFORM_VERSION" "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
}

# kube_ldflags: the version the Kubernetes binaries report (they read it
# from these variables).
kube_ldflags() {
	local v=$KUBE_VERSION major minor ld="-s" p
	major=${v#v}; major=${major%%.*}; minor=${v#v*.}; minor=${minor%%.*}
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
	done
	echo "$ld"
}

kube_tool() {
	local dir=$TOOLS/kube-$KUBE_VERSION
	if [ ! -x "$dir/bin/kube-apiserver" ] || [ ! -x "$dir/bin/kubectl" ] || [ ! -x "$dir/bin/etcd" ]; then
		log "kube-apiserver, kubectl and etcd from k8s.io/kubernetes $KUBE_VERSION: the longest build (about 6 minutes cold on 2 quiet cores)"
		local mod=$dir/module
		mkdir -p "$mod/etcd"
		local gomod
		gomod=$(cd "$mod" && GOFLAGS="" go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
			sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
		[ -f "$gomod" ] || { log "cannot download k8s.io/kubernetes@$KUBE_VERSION"; exit 1; }
		local staging="v0.${KUBE_VERSION#v1.}"
		{
			echo "// Generated by scripts/kube-tools.sh: builds kube-apiserver, kubectl and etcd."
			echo "module zq-csi.local/kubetools"
			echo
			sed -n 's/^go \(.*\)$/go \1/p' "$gomod"
			echo
			echo "require k8s.io/kubernetes $KUBE_VERSION"
			echo
			echo "replace ("
			sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*$#\t\1 => \1 '"$staging"'#p' "$gomod"
			echo ")"
		} >"$mod/go.mod"
		cat >"$mod/tools.go" <<-'EOF'
			//go:build tools

			// Package tools makes `go mod tidy` keep the commands built here.
			package tools

			import (
				_ "k8s.io/kubernetes/cmd/kube-apiserver"
				_ "k8s.io/kubernetes/cmd/kubectl"
			)
		EOF
		cat >"$mod/etcd/main.go" <<-'EOF'
			// Command etcd is etcd's server, at the version k8s.io/kubernetes pins.
			package main

			import (
				"os"

				"go.etcd.io/etcd/server/v3/etcdmain"
			)

			func main() { etcdmain.Main(os.Args) }
		EOF
		(
			cd "$mod"
			export GOFLAGS=-mod=mod CGO_ENABLED=0
			building "the module graph of k8s.io/kubernetes $KUBE_VERSION (download)" \
				go get "go.etcd.io/etcd/server/v3@$(sed -n 's/^[[:space:]]*go\.etcd\.io\/etcd\/server\/v3 \(v[^ ]*\).*/\1/p' "$gomod")"
			go mod tidy
			mkdir -p "$dir/bin.tmp"
			building "kube-apiserver, kubectl and etcd $KUBE_VERSION" go build -trimpath -ldflags="$(kube_ldflags)" -o "$dir/bin.tmp/" \
				k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./etcd
		)
		rm -rf "${dir:?}/bin" && mv "$dir/bin.tmp" "$dir/bin"
	fi
	local b
	for b in kube-apiserver kubectl etcd; do link "$b" "$dir/bin/$b"; done
}

# node_tool: what a Kubernetes node adds to the control plane of kube_tool:
# kubelet, kube-controller-manager and kube-scheduler from the same wrapper
# module, containerd and its runc shim, and runc.
node_tool() {
	kube_tool
	local dir=$TOOLS/kube-$KUBE_VERSION b
	if [ ! -x "$dir/node/kubelet" ] || [ ! -x "$dir/node/kube-controller-manager" ] || [ ! -x "$dir/node/kube-scheduler" ]; then
		(
			cd "$dir/module"
			export GOFLAGS=-mod=mod CGO_ENABLED=0
			# kube_tool's module imports the control plane's commands only
			grep -q cmd/kubelet tools.go || sed -i 's#^\(\t*\)_ "k8s.io/kubernetes/cmd/kubectl"#\1_ "k8s.io/kubernetes/cmd/kube-controller-manager"\n\1_ "k8s.io/kubernetes/cmd/kube-scheduler"\n&\n\1_ "k8s.io/kubernetes/cmd/kubelet"#' tools.go
			go mod tidy
			mkdir -p "$dir/node.tmp"
			building "kubelet, kube-controller-manager and kube-scheduler $KUBE_VERSION" go build -trimpath -ldflags="$(kube_ldflags)" \
				-o "$dir/node.tmp/" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
		)
		rm -rf "${dir:?}/node" && mv "$dir/node.tmp" "$dir/node"
	fi
	for b in kubelet kube-controller-manager kube-scheduler; do link "$b" "$dir/node/$b"; done

	local cdir=$TOOLS/containerd-$CONTAINERD_VERSION
	if [ ! -x "$cdir/containerd" ] || [ ! -x "$cdir/containerd-shim-runc-v2" ] || [ ! -x "$cdir/ctr" ]; then
		mkdir -p "$cdir.tmp"
		# Without cgo the btrfs snapshotter drops out; overlayfs is the one used.
		GOBIN="$cdir.tmp" CGO_ENABLED=0 GOFLAGS=-mod=mod building "containerd, containerd-shim-runc-v2 and ctr $CONTAINERD_VERSION" \
			go install -trimpath -ldflags="-s -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
			"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
			"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
			"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
		rm -rf "$cdir" && mv "$cdir.tmp" "$cdir"
	fi
	for b in containerd containerd-shim-runc-v2 ctr; do link "$b" "$cdir/$b"; done

	local rdir=$TOOLS/runc-$RUNC_VERSION
	if [ ! -x "$rdir/runc" ]; then
		mkdir -p "$rdir.tmp"
		# seccomp (cgo, libseccomp) as the kubelet's RuntimeDefault profile needs.
		GOBIN="$rdir.tmp" CGO_ENABLED=1 GOFLAGS=-mod=mod building "runc $RUNC_VERSION" \
			go install -trimpath -tags seccomp -ldflags="-s -X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION"
		rm -rf "$rdir" && mv "$rdir.tmp" "$rdir"
	fi
	link runc "$rdir/runc"
}

# e2e_tool: Kubernetes' storage e2e suite (e2e.test) from test/kube/e2esuite,
# built in kube_tool's wrapper module (same module graph and flags: the
# packages the Kubernetes binaries share with it come from the build
# cache). The binary is kept per hash of that source.
e2e_tool() {
	kube_tool
	local dir=$TOOLS/kube-$KUBE_VERSION src=$root/test/kube/e2esuite sum
	sum=$(sha256sum <"$src/e2e_test.go" | cut -c1-12)
	local out=$dir/e2e-$sum
	if [ ! -x "$out/e2e.test" ]; then
		(
			cd "$dir/module"
			export GOFLAGS=-mod=mod CGO_ENABLED=0
			mkdir -p e2esuite
			cp "$src/e2e_test.go" e2esuite/
			go mod tidy
			mkdir -p "$out.tmp"
			building "e2e.test (k8s.io/kubernetes/test/e2e, storage suites) $KUBE_VERSION" go test -c -trimpath \
				-ldflags="$(kube_ldflags)" -o "$out.tmp/e2e.test" ./e2esuite
		)
		rm -rf "$out" && mv "$out.tmp" "$out"
	fi
	link e2e.test "$out/e2e.test"
}

# sidecar_build DIR PKG VERSION EXTRA-REPLACE CMD...: the commands CMD
# (cmd/NAME) of the module PKG at VERSION, into DIR. A sidecar's go.mod
# pins k8s.io modules with replace lines, which go install ignores: a
# wrapper module carries over those that name a release (not a directory
# of the sidecar's repository), and EXTRA-REPLACE ("" for none) stands in
# for one that does.
sidecar_build() {
	local dir=$1 pkg=$2 version=$3 extra=$4 mod=$1.module gomod c
	shift 4
	mkdir -p "$mod"
	gomod=$(cd "$mod" && GOFLAGS="" go mod download -json "$pkg@$version" |
		sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	[ -f "$gomod" ] || { log "cannot download $pkg@$version"; exit 1; }
	{
		echo "// Generated by scripts/kube-tools.sh: builds $*."
		echo "module zq-csi.local/$(basename "$dir")"
		echo
		sed -n 's/^go \(.*\)$/go \1/p' "$gomod"
		echo
		echo "require $pkg $version"
		echo
		grep '^replace .* => [^.][^ ]* v' "$gomod"
		[ -z "$extra" ] || echo "replace $extra"
	} >"$mod/go.mod"
	{
		printf '//go:build tools\n\npackage tools\n\nimport (\n'
		for c; do printf '\t_ "%s/cmd/%s"\n' "$pkg" "$c"; done
		printf ')\n'
	} >"$mod/tools.go"
	(
		cd "$mod"
		export GOFLAGS=-mod=mod CGO_ENABLED=0
		go mod tidy
		mkdir -p "$dir.tmp"
		for c; do
			building "$c $version" go build -trimpath -ldflags="-s -X main.version=$version" -o "$dir.tmp/" "$pkg/cmd/$c"
		done
	)
	rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# provisioner_tool: the chart's csi-provisioner.
provisioner_tool() {
	local dir=$TOOLS/csi-provisioner-$PROVISIONER_VERSION
	[ -x "$dir/csi-provisioner" ] ||
		sidecar_build "$dir" github.com/kubernetes-csi/external-provisioner/v6 "$PROVISIONER_VERSION" "" csi-provisioner
	link csi-provisioner "$dir/csi-provisioner"
}

# snapshotter_tool: the chart's csi-snapshotter and the snapshot-controller
# the test node runs; the snapshot client module at the same version for
# the repository's own (./client).
snapshotter_tool() {
	local dir=$TOOLS/external-snapshotter-$SNAPSHOTTER_VERSION pkg=github.com/kubernetes-csi/external-snapshotter
	[ -x "$dir/snapshot-controller" ] ||
		sidecar_build "$dir" "$pkg/v8" "$SNAPSHOTTER_VERSION" "$pkg/client/v8 => $pkg/client/v8 $SNAPSHOTTER_VERSION" \
			csi-snapshotter snapshot-controller
	link csi-snapshotter "$dir/csi-snapshotter"
	link snapshot-controller "$dir/snapshot-controller"
}

[ $# -gt 0 ] || set -- all
# The build steps to come, for "N/M" in the progress lines.
for t in "$@"; do
	case $t in
	helm) [ -x "$TOOLS/helm-$HELM_VERSION/helm" ] || steps=$((steps + 1)) ;;
	kubeconform) [ -x "$TOOLS/kubeconform-$KUBECONFORM_VERSION/kubeconform" ] || steps=$((steps + 1)) ;;
	kube) [ -x "$TOOLS/kube-$KUBE_VERSION/bin/etcd" ] || steps=$((steps + 2)) ;;
	node)
		[ -x "$TOOLS/kube-$KUBE_VERSION/bin/etcd" ] || steps=$((steps + 2))
		[ -x "$TOOLS/kube-$KUBE_VERSION/node/kubelet" ] || steps=$((steps + 1))
		[ -x "$TOOLS/containerd-$CONTAINERD_VERSION/ctr" ] || steps=$((steps + 1))
		[ -x "$TOOLS/runc-$RUNC_VERSION/runc" ] || steps=$((steps + 1))
		;;
	provisioner) [ -x "$TOOLS/csi-provisioner-$PROVISIONER_VERSION/csi-provisioner" ] || steps=$((steps + 1)) ;;
	snapshotter) [ -x "$TOOLS/external-snapshotter-$SNAPSHOTTER_VERSION/snapshot-controller" ] || steps=$((steps + 2)) ;;
	e2e)
		[ -x "$TOOLS/kube-$KUBE_VERSION/bin/etcd" ] || steps=$((steps + 2))
		ls "$TOOLS/kube-$KUBE_VERSION"/e2e-*/e2e.test >/dev/null 2>&1 || steps=$((steps + 1))
		;;
	all)
		[ -x "$TOOLS/helm-$HELM_VERSION/helm" ] || steps=$((steps + 1))
		[ -x "$TOOLS/kubeconform-$KUBECONFORM_VERSION/kubeconform" ] || steps=$((steps + 1))
		[ -x "$TOOLS/kube-$KUBE_VERSION/bin/etcd" ] || steps=$((steps + 2))
		;;
	esac
done
for t in "$@"; do
	case $t in
	helm) helm_tool ;;
	kubeconform) kubeconform_tool ;;
	kube) kube_tool ;;
	node) node_tool ;;
	provisioner) provisioner_tool ;;
	snapshotter) snapshotter_tool ;;
	e2e) e2e_tool ;;
	all) helm_tool; kubeconform_tool; kube_tool ;;
	*) echo "usage: $0 [helm|kubeconform|kube|node|provisioner|snapshotter|e2e|all]..." >&2; exit 2 ;;
	esac
done
