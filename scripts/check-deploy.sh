#!/usr/bin/env bash
# The deployment tests: the Helm chart, the plain manifests in deploy/ and
# the examples, checked by helm, kubeconform and a real kube-apiserver.
#
#   scripts/check-deploy.sh
#
# 1. helm lint --strict, with the default values and test/deploy/values-custom.yaml;
# 2. helm template with both; every bad values file in test/deploy/bad/ must be
#    refused (by values.schema.json or the chart's own checks) with the message
#    its "# expect:" line names;
# 3. a few properties of the rendered objects (node-deployment provisioner,
#    WaitForFirstConsumer, attachRequired: false, ...);
# 4. etcd and kube-apiserver (built from k8s.io/kubernetes, see
#    scripts/kube-tools.sh) on localhost, on free ports, in a temporary directory,
#    with --allow-privileged=true as every cluster that runs CSI node plugins,
#    and external-snapshotter's CRDs (from its client module) installed;
# 5. kubeconform -strict on the rendered chart, deploy/ and examples/, offline,
#    with schemas generated from that apiserver's OpenAPI document (cached per
#    Kubernetes version beside the tools), and one object with an unknown field
#    that it must refuse;
# 6. kubectl apply --dry-run=server --validate=strict of every object: the
#    apiserver validates and admits each one (the namespaces are created for real);
# 7. deploy/ is what scripts/gen-deploy.sh renders from the chart (no drift).
#
# Prints one "ok N - ..." or "not ok N - ..." line per check (TAP) and exits
# 1 when any failed. Needs go, openssl and the Go module proxy on the first
# run (the tools build once, several minutes; later runs reuse them).
# shellcheck disable=SC2317 # functions called through check() and the EXIT trap
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
exec </dev/null
export PATH="$PATH:/usr/local/go/bin"

KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
TOOLS=${ZQ_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zq-csi-tools}
BIN=$TOOLS/bin
HELM=$BIN/helm
KUBECONFORM=$BIN/kubeconform
KUBECTL=$BIN/kubectl

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $*"; }
# indent: show a command's output under a result line
indent() { sed 's/^/#   /'; }
# check DESC CMD...: ok when CMD succeeds; its output is shown when it fails.
check() {
	local desc=$1 out
	shift
	if out=$("$@" 2>&1); then
		ok "$desc"
	else
		notok "$desc"
		printf '%s\n' "$out" | tail -n 40 | indent
	fi
}
finish() {
	echo "1..$n"
	if [ "$failed" -ne 0 ]; then
		echo "# check-deploy: $failed of $n checks failed"
		exit 1
	fi
	echo "# check-deploy: all $n checks passed"
	exit 0
}

work=$(mktemp -d "${TMPDIR:-/tmp}/zq-csi-deploy.XXXXXX")
pids=()
# stop PID: SIGTERM, and SIGKILL when it has not exited after 10 seconds
# (kube-apiserver can hang in its graceful shutdown).
stop() {
	local p=$1 i
	kill "$p" 2>/dev/null || return 0
	for i in $(seq 20); do
		kill -0 "$p" 2>/dev/null || break
		sleep 0.5
	done
	kill -9 "$p" 2>/dev/null
	wait "$p" 2>/dev/null
}
cleanup() {
	local i
	# the apiserver first, then etcd (the reverse of the start order)
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[$i]}"; done
	rm -rf "$work"
}
trap cleanup EXIT

# --- tools --------------------------------------------------------------------
# The first run builds the tools (minutes): their progress shows as it
# comes, as TAP comments.
start=$SECONDS
if bash scripts/kube-tools.sh all 2>&1 | sed -u 's/^/# /'; then
	ok "tools: helm, kubeconform, kube-apiserver, kubectl, etcd ($KUBE_VERSION) in $BIN ($((SECONDS - start))s)"
else
	notok "tools: scripts/kube-tools.sh (its output is above)"
	finish
fi

# --- helm lint and template ---------------------------------------------------
CHART=charts/zq-csi
CUSTOM=test/deploy/values-custom.yaml
check "helm lint --strict (default values)" \
	"$HELM" lint --strict "$CHART" --kube-version "$KUBE_VERSION"
check "helm lint --strict ($CUSTOM)" \
	"$HELM" lint --strict "$CHART" --kube-version "$KUBE_VERSION" -f "$CUSTOM"

# render NAME NAMESPACE [HELM ARGS...]: the chart into $work/NAME.yaml
render() {
	local name=$1 ns=$2
	shift 2
	"$HELM" template zq-csi "$CHART" --namespace "$ns" --kube-version "$KUBE_VERSION" "$@" >"$work/$name.yaml"
}
check "helm template (default values)" render default zq-csi
check "helm template ($CUSTOM)" render custom zq-csi-custom -f "$CUSTOM"

# Every bad values file must be refused, with the expected message.
for bad in test/deploy/bad/*.yaml; do
	expect=$(sed -n 's/^# expect: //p' "$bad" | head -n 1)
	if [ -z "$expect" ]; then
		notok "bad values $bad: no '# expect: MESSAGE' line"
		continue
	fi
	if out=$("$HELM" template zq-csi "$CHART" --kube-version "$KUBE_VERSION" -f "$bad" 2>&1); then
		notok "bad values $bad: accepted, should be refused ($expect)"
	elif grep -qF -- "$expect" <<<"$out"; then
		ok "bad values $bad: refused ($expect)"
	else
		notok "bad values $bad: refused, but not with '$expect'"
		printf '%s\n' "$out" | tail -n 10 | indent
	fi
done

# has FILE DESC PATTERN: the rendered FILE contains a line matching PATTERN
has() {
	if grep -qE -- "$3" "$work/$1.yaml"; then ok "rendered $1: $2"; else notok "rendered $1: $2 (no line matching '$3')"; fi
}
# hasnot FILE DESC PATTERN: no line of the rendered FILE matches PATTERN
hasnot() {
	if grep -qE -- "$3" "$work/$1.yaml"; then notok "rendered $1: $2 (a line matches '$3')"; else ok "rendered $1: $2"; fi
}
if [ -s "$work/default.yaml" ]; then
	has default "CSIDriver without attach, Persistent, storage capacity" '^  attachRequired: false$'
	has default "CSIDriver publishes storage capacity" '^  storageCapacity: true$'
	has default "StorageClass binds on first consumer" '^volumeBindingMode: WaitForFirstConsumer$'
	has default "provisioner in node-deployment mode" '- --node-deployment=true$'
	has default "provisioner tracks capacity" '- --enable-capacity=true$'
	has default "plugin serves all services for its node" '- --node-id=\$\(NODE_NAME\)$'
	has default "kubelet dir with Bidirectional propagation" 'mountPropagation: Bidirectional$'
	has default "metrics port" '- --metrics-address=0.0.0.0:9809$'
	has default "registrar sidecar" '- name: node-driver-registrar$'
	has default "livenessprobe sidecar" '- name: liveness-probe$'
	hasnot default "the plugin leaves registration to the sidecar" '- --registration-dir='
	has default "the plugin gives renamed zoned devices a /sys/block entry through NRI" '- --nri-socket=/nri/nri.sock$'
	has default "the NRI socket's directory from the host" '^            path: /var/run/nri$'
	has default "the plugin serves zq-csi fault in its container" '- --fault-socket=/run/zq-csi/fault.sock$'
	has default "the plugin applies the claims' faults annotation" '- --claim-faults$'
	has default "default image is the appVersion" "image: ghcr.io/zq-csi/zq-csi:$(sed -n 's/^appVersion: "\(.*\)"/\1/p' "$CHART/Chart.yaml")$"
fi
if [ -s "$work/custom.yaml" ]; then
	has custom "zone geometry parameters" '^  zone.max_active_zones: "8"$'
	has custom "nbd class" '^  attach: "nbd"$'
	has custom "the I/O scheduler of a class" '^  queue.scheduler: "mq-deadline"$'
	has custom "the filesystem of a class's Filesystem claims" '^  csi.storage.k8s.io/fstype: "f2fs"$'
	has custom "a class's mount options" '^  - noatime$'
	has default "the kubelet applies a pod's fsGroup to Filesystem volumes" '^  fsGroupPolicy: File$'
	hasnot default "no fstype unless a class names one" 'csi.storage.k8s.io/fstype'
	has custom "resizer sidecar" '- name: csi-resizer$'
	has custom "the plugin registers itself with the kubelet" '- --kubelet-registration-path=/var/lib/k0s/kubelet/plugins/zoned.example.com/csi.sock$'
	has custom "the kubelet probes the plugin with zq-csi probe" 'command: \[/usr/local/bin/zq-csi, probe, '
	hasnot custom "no registrar or livenessprobe sidecar" '- name: (node-driver-registrar|liveness-probe)$'
	hasnot custom "podSysfs.enabled false: no NRI" '(--nri-socket|path: /var/run/nri)'
	has custom "modprobe init container" '^        - name: modprobe$'
	has custom "metrics Service" '^  name: zq-custom-metrics$'
	has custom "a class's volatile cache" '^  cache: "volatile"$'
	has custom "a class's faults" '^  faults: "readonly:zone=9;delay:op=read,delay=1ms"$'
	hasnot custom "faults.socket and claimAnnotations false: neither flag" '(--fault-socket|--claim-faults|name: fault-run)'
	has custom "snapshotter sidecar, one per node" '- name: csi-snapshotter$'
	has custom "the VolumeSnapshotClass" '^kind: VolumeSnapshotClass$'
	hasnot default "no snapshotter sidecar unless asked" '- name: csi-snapshotter$'
fi

# --- etcd and kube-apiserver --------------------------------------------------
# freeport: a TCP port nothing listens on (random, then probed)
freeport() {
	local p
	while :; do
		p=$((20000 + RANDOM % 40000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
}
etcd_port=$(freeport)
etcd_peer=$(freeport)
api_port=$(freeport)
mkdir -p "$work/etcd" "$work/pki"
"$BIN/etcd" --name zq --data-dir "$work/etcd" --unsafe-no-fsync \
	--listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
	--listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
	--initial-cluster "zq=http://127.0.0.1:$etcd_peer" --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)

# The service-account keys and a static token for kubectl (system:masters).
openssl genrsa -out "$work/pki/sa.key" 2048 2>/dev/null &&
	openssl rsa -in "$work/pki/sa.key" -pubout -out "$work/pki/sa.pub" 2>/dev/null
token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
echo "$token,admin,admin,system:masters" >"$work/pki/tokens.csv"

"$BIN/kube-apiserver" \
	--etcd-servers "http://127.0.0.1:$etcd_port" \
	--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
	--cert-dir "$work/pki" \
	--token-auth-file "$work/pki/tokens.csv" --authorization-mode RBAC \
	--service-account-key-file "$work/pki/sa.pub" \
	--service-account-signing-key-file "$work/pki/sa.key" \
	--service-account-issuer https://kubernetes.default.svc \
	--service-cluster-ip-range 10.96.0.0/16 \
	--allow-privileged=true \
	--endpoint-reconciler-type none \
	>"$work/apiserver.log" 2>&1 &
pids+=($!)
api_pid=$!

cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: local
    cluster:
      server: https://127.0.0.1:$api_port
      insecure-skip-tls-verify: true
users:
  - name: admin
    user:
      token: $token
contexts:
  - name: local
    context: {cluster: local, user: admin}
current-context: local
EOF
export KUBECONFIG=$work/kubeconfig
kc() { "$KUBECTL" --request-timeout=60s "$@"; }

start=$SECONDS
ready=false
while [ $((SECONDS - start)) -lt 120 ]; do
	if ! kill -0 "$api_pid" 2>/dev/null; then break; fi
	if [ "$(kc get --raw /readyz 2>/dev/null)" = ok ]; then
		ready=true
		break
	fi
	sleep 1
done
if $ready; then
	ok "kube-apiserver $KUBE_VERSION ready on 127.0.0.1:$api_port, etcd on :$etcd_port ($((SECONDS - start))s)"
else
	notok "kube-apiserver did not become ready in 120s"
	tail -n 30 "$work/apiserver.log" | indent
	tail -n 10 "$work/etcd.log" | indent
	finish
fi

# --- the snapshot CRDs -----------------------------------------------------------
# The chart's VolumeSnapshotClass is validated as on a cluster with
# snapshots: against external-snapshotter's own CRDs, from its client module
# (through the Go module proxy), installed for real.
SNAPSHOT_CLIENT=github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0
snapshot_crds() {
	local dir crd
	dir=$(cd "$work" && go mod download -json "$SNAPSHOT_CLIENT" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') &&
		[ -n "$dir" ] || return 1
	for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
		kc apply -f "$dir/config/crd/snapshot.storage.k8s.io_$crd.yaml" &&
			kc wait --for condition=established --timeout=60s "crd/$crd.snapshot.storage.k8s.io" || return 1
	done
	# The apiserver publishes a new CRD's schema a moment after it is established.
	for _ in $(seq 60); do
		kc get --raw /openapi/v2 | grep -q '"io.k8s.storage.snapshot.v1.VolumeSnapshotClass"' && return 0
		sleep 1
	done
	echo "VolumeSnapshotClass is not in /openapi/v2 after 60s"
	return 1
}
check "the snapshot CRDs ($SNAPSHOT_CLIENT) installed" snapshot_crds

# --- kubeconform, with schemas from the apiserver -------------------------------
SCHEMAS=$TOOLS/schemas-$KUBE_VERSION
if [ ! -s "$SCHEMAS/volumesnapshotclass-snapshot-v1.json" ]; then
	rm -rf "$SCHEMAS.tmp" && mkdir -p "$SCHEMAS.tmp"
	if kc get --raw /openapi/v2 >"$work/openapi-v2.json" &&
		out=$(go run test/deploy/openapi2jsonschema.go "$work/openapi-v2.json" "$SCHEMAS.tmp" 2>&1); then
		rm -rf "$SCHEMAS" && mv "$SCHEMAS.tmp" "$SCHEMAS"
		ok "kubeconform schemas generated from the apiserver's /openapi/v2: $(find "$SCHEMAS" -name '*.json' | wc -l) in $SCHEMAS"
	else
		notok "kubeconform schemas from /openapi/v2"
		printf '%s\n' "${out:-}" | indent
	fi
fi
LOCATION="$SCHEMAS/{{ .ResourceKind }}{{ .KindSuffix }}.json"
manifests=("$work/default.yaml" "$work/custom.yaml" deploy/*.yaml examples/*.yaml)
for f in "${manifests[@]}"; do
	label=${f#"$work/"}
	if out=$("$KUBECONFORM" -strict -summary -kubernetes-version "${KUBE_VERSION#v}" \
		-schema-location "$LOCATION" "$f" 2>&1); then
		ok "kubeconform -strict $label: $(tail -n 1 <<<"$out")"
	else
		notok "kubeconform -strict $label"
		printf '%s\n' "$out" | tail -n 20 | indent
	fi
done
# Strict mode really refuses unknown fields with these schemas.
cat >"$work/typo.yaml" <<'EOF'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: typo
provisioner: zq-csi.io
volumeBindingMod: WaitForFirstConsumer
EOF
if out=$("$KUBECONFORM" -strict -schema-location "$LOCATION" "$work/typo.yaml" 2>&1); then
	notok "kubeconform -strict refuses an unknown field (it accepted volumeBindingMod)"
elif grep -q volumeBindingMod <<<"$out"; then
	ok "kubeconform -strict refuses an unknown field (volumeBindingMod)"
else
	notok "kubeconform -strict refuses an unknown field: wrong error"
	printf '%s\n' "$out" | indent
fi

# --- server-side dry run --------------------------------------------------------
for ns in zq-csi zq-csi-custom; do
	check "namespace $ns created" kc create namespace "$ns" --save-config
done
# dryrun LABEL FILE [KUBECTL ARGS]: every object in FILE passes a server-side
# dry run (validation, defaulting, admission), and kubectl saw them all.
dryrun() {
	local label=$1 f=$2 out objects seen
	shift 2
	objects=$(grep -c '^kind: ' "$f")
	if out=$(kc apply --dry-run=server --validate=strict -f "$f" "$@" 2>&1); then
		seen=$(grep -c '(server dry run)$' <<<"$out")
		if [ "$seen" -eq "$objects" ]; then
			ok "apiserver accepts $label ($seen objects, server-side dry run)"
		else
			notok "apiserver dry run of $label: $seen of $objects objects reported"
			printf '%s\n' "$out" | indent
		fi
	else
		notok "apiserver refuses $label (server-side dry run)"
		printf '%s\n' "$out" | tail -n 20 | indent
	fi
}
dryrun "the chart, default values" "$work/default.yaml"
dryrun "the chart, $CUSTOM" "$work/custom.yaml"
for f in deploy/*.yaml; do dryrun "$f" "$f"; done
for f in examples/*.yaml; do dryrun "$f" "$f" --namespace default; done

# --- deploy/ in sync with the chart -------------------------------------------
check "deploy/ is what scripts/gen-deploy.sh renders from the chart" \
	env HELM="$HELM" KUBE_VERSION="$KUBE_VERSION" bash scripts/gen-deploy.sh --check

finish
