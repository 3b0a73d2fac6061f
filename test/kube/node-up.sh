#!/usr/bin/env bash
# node-up.sh: a single-node Kubernetes cluster in a VM harness guest (issue
# 17, first part): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd with runc, and a kubelet, all built from the Go
# module proxy by scripts/kube-tools.sh node, with images made offline by
# test/kube/ocibuild and imported before the kubelet starts. The guest has
# no NIC: the node's address is on a dummy interface and the pods' on a CNI
# bridge, both reachable only inside the guest.
#
#   test/kube/node-up.sh [CHECKS.sh...]   bring the node up, check that a pod
#                                         runs, install the chart, run a pod
#                                         with a zq-csi PVC, then source each
#                                         CHECKS.sh in the guest
#
# A CHECKS.sh (restart.sh, storage-e2e.sh) runs with this script's helpers
# and variables (ok, not_ok, expect, wait_for, capacity; KUBECONFIG, $work,
# $root), so its checks count in the same total. Prints "ok"/"not ok" per
# check and the plain line "N passed, N failed"; exits 1 if any failed.
# ZQ_KUBE_LOGS=DIR keeps a copy of the guest's logs (the components', the
# pods', the e2e suite's report and its list of skipped specs) in DIR.
# Needs 6 GiB for the guest (ZQ_VM_MEM); under TCG on 2 cores the node and
# the chart's checks take about 3 minutes, restart.sh 3 and storage-e2e.sh
# 5, once the tools are built (the first run builds them:
# scripts/kube-tools.sh node provisioner e2e, about 8 minutes on top of
# deploy-check's kube-apiserver build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
TOOLS=${ZQ_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zq-csi-tools}
# Snapshots on the node (external-snapshotter's csi-snapshotter and
# snapshot-controller built, its CRDs, the controller and the chart's
# sidecar and VolumeSnapshotClass) only for a run that may take snapshot
# specs: ZQ_KUBE_E2E_ALL=1, a focus, or ZQ_KUBE_SNAPSHOTS=1. CI runs none
# of them (e2e-skip.tsv, "time:"), and the chart's default has none.
if [[ -z ${ZQ_KUBE_SNAPSHOTS:-} ]]; then
	ZQ_KUBE_SNAPSHOTS=0
	[[ ${ZQ_KUBE_E2E_ALL:-0} == 1 || -n ${ZQ_KUBE_E2E_FOCUS:-} ]] && ZQ_KUBE_SNAPSHOTS=1
fi
export ZQ_KUBE_SNAPSHOTS
snapshots() { [[ $ZQ_KUBE_SNAPSHOTS == 1 ]]; }

if [[ ${1:-} != --guest ]]; then
	# runc's seccomp needs libseccomp-dev and pkg-config to build; the
	# guest (the host's root) needs the CNI plugins, ip and openssl.
	# zbd-utils, fio and busybox-static go into the workload image,
	# btrfs-progs and f2fs-tools into the plugin's.
	ZQ_EXTRA_PKGS="libseccomp-dev pkg-config containernetworking-plugins iproute2 openssl zbd-utils busybox-static btrfs-progs f2fs-tools" \
		bash "$root/scripts/deps.sh"
	bash "$root/scripts/kube-tools.sh" node provisioner $(snapshots && echo snapshotter) e2e
	work=$(mktemp -d /var/tmp/zq-kube.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	(cd "$root" && go build -o "$work/zq-csi" ./cmd/zq-csi)
	(cd "$root/test/kube" && go build -o "$work/ocibuild" ./ocibuild && go build -o "$work/bin/e2ereport" ./e2ereport &&
		CGO_ENABLED=0 go build -o "$work/pause" ./pause)
	# The e2e suite's pods name their images (e2e.test --list-images); no
	# registry is reachable, so stand-ins carry those names: our pause,
	# busybox (Debian's static one, with its applets), and for
	# glibc-dns-testing, in which the storage suites run shell commands and
	# GNU dd (oflag=nocache), the same busybox with Debian's dd, sha256sum
	# and base64 ahead of it in PATH and dash as /bin/sh (busybox's sh runs
	# its own applets before PATH's).
	"$TOOLS/bin/e2e.test" --list-images >"$work/e2e-images"
	# e2e_tags NAME...: --tag for every image of those names, any version
	e2e_tags() { local n; for n; do grep "/$n:" "$work/e2e-images" | sed 's/^/--tag=/'; done; }
	# shellcheck disable=SC2046 # one word per tag
	"$work/ocibuild" --tag zq-csi.local/pause:1 $(e2e_tags pause) --out "$work/pause.tar" \
		--entrypoint /pause --add "$work/pause=/pause"
	mkdir -p "$work/busybox/bin" "$work/busybox/tmp" && chmod 1777 "$work/busybox/tmp"
	cp /bin/busybox "$work/busybox/bin/"
	for a in $(/bin/busybox --list); do [ -e "$work/busybox/bin/$a" ] || ln -s busybox "$work/busybox/bin/$a"; done
	# shellcheck disable=SC2046
	"$work/ocibuild" $(e2e_tags busybox) --out "$work/e2e-busybox.tar" \
		--add "$work/busybox/bin=/bin" --add "$work/busybox/tmp=/tmp" --cmd sh
	# shellcheck disable=SC2046
	"$work/ocibuild" $(e2e_tags glibc-dns-testing) --out "$work/e2e-glibc.tar" \
		--add "$work/busybox/bin=/bin" --add /usr/bin/dash=/bin/sh --add "$work/busybox/tmp=/tmp" --cmd sh \
		--bin /usr/bin/dd --bin /usr/bin/sha256sum --bin /usr/bin/base64
	"$work/ocibuild" --tag zq-csi.local/zq-csi:dev --out "$work/zq-csi.tar" --entrypoint /usr/local/bin/zq-csi \
		--add "$work/zq-csi=/usr/local/bin/zq-csi" --bin /usr/bin/mount --bin /usr/bin/umount --bin /usr/sbin/blkzone \
		--bin /usr/sbin/blkid --bin /usr/sbin/mkfs.btrfs --bin /usr/sbin/mkfs.f2fs --bin /usr/sbin/fsck --bin /usr/sbin/fsck.f2fs \
		--add /usr/sbin/fsck.btrfs=/usr/sbin/fsck.btrfs --add /usr/bin/dash=/bin/sh --bin /usr/bin/btrfs --bin /usr/sbin/blockdev
	"$work/ocibuild" --tag zq-csi.local/csi-provisioner:dev --out "$work/csi-provisioner.tar" --entrypoint /csi-provisioner \
		--add "$(readlink -f "$TOOLS/bin/csi-provisioner")=/csi-provisioner"
	if snapshots; then
		"$work/ocibuild" --tag zq-csi.local/csi-snapshotter:dev --out "$work/csi-snapshotter.tar" --entrypoint /csi-snapshotter \
			--add "$(readlink -f "$TOOLS/bin/csi-snapshotter")=/csi-snapshotter"
		# The snapshot CRDs, from external-snapshotter's client module of the
		# snapshotter's release (scripts/kube-tools.sh SNAPSHOTTER_VERSION).
		snapshot_client=$(cd "$work" && go mod download -json \
			"github.com/kubernetes-csi/external-snapshotter/client/v8@${SNAPSHOTTER_VERSION:-v8.7.0}" |
			sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
		mkdir -p "$work/snapshot-crds"
		cp "$snapshot_client"/config/crd/snapshot.storage.k8s.io_*.yaml "$work/snapshot-crds/"
	fi
	# what a user's zoned test pod runs: fio, util-linux's blkzone, libzbd's
	# zbd, and a shell
	"$work/ocibuild" --tag zq-csi.local/workload:1 --out "$work/workload.tar" --entrypoint /bin/sh \
		--add /bin/busybox=/bin/sh --add /bin/busybox=/bin/busybox --bin /usr/bin/fio --bin /usr/sbin/blkzone --bin /usr/bin/zbd
	shares=$work
	# The guest mounts fresh tmpfs on /tmp, /var/tmp and /run: tools kept
	# there (HOME=/tmp/...) reach it as a share of their own.
	case $TOOLS/ in /tmp/* | /var/tmp/* | /run/*) shares+=:$TOOLS ;; esac
	if [[ -n ${ZQ_KUBE_LOGS:-} ]]; then
		mkdir -p "$ZQ_KUBE_LOGS" && ZQ_KUBE_LOGS=$(cd "$ZQ_KUBE_LOGS" && pwd) && shares+=:$ZQ_KUBE_LOGS
		export ZQ_KUBE_LOGS
	fi
	ZQ_VM_MEM=${ZQ_VM_MEM:-6144} ZQ_VM_TIMEOUT=${ZQ_VM_TIMEOUT:-3600} ZQ_VM_SHARES="$shares" ZQ_KUBE_WORK="$work" \
		ZQ_TOOLS_DIR="$TOOLS" "$root/test/e2e/vm.sh" -- "$0" --guest "$@"
	exit
fi
shift

# ---- in the guest ------------------------------------------------------------
BIN=$TOOLS/bin
export PATH=$BIN:$ZQ_KUBE_WORK/bin:$PATH
img=$ZQ_KUBE_WORK
work=/tmp/kube
mkdir -p "$work"
# The runtime's and the kubelet's filesystem must be a mount of its own:
# the kubelet's stats (cadvisor) find a filesystem by its mount point.
mount -t tmpfs -o size=3g kube "$work"
mkdir -p "$work"/{pki,etcd,manifests,cni,containerd,kubelet,logs}
# shellcheck source=../e2e/tap.sh
. "$root/test/e2e/tap.sh"
pids=()
finish() {
	local rc=$?
	# a command that failed outside any check (set -e) fails the run too
	((rc == 0 || FAIL > 0)) || not_ok "node-up.sh stopped at a failed command (status $rc; its output is above)"
	if [[ -n ${ZQ_KUBE_LOGS:-} ]]; then
		cp -r "$work/logs/." "$ZQ_KUBE_LOGS/" && echo "# logs: $work/logs, copied to $ZQ_KUBE_LOGS"
	else
		echo "# logs: $work/logs (in the guest; ZQ_KUBE_LOGS=DIR keeps a copy)"
	fi
	if ((FAIL > 0)) && [[ -n ${KUBECONFIG:-} ]]; then
		{
			echo "# --- the cluster's objects and events"
			kubectl get nodes,pods,pvc,pv,volumeattachments -A -o wide
			kubectl get events -A --sort-by=.lastTimestamp | tail -n 40
			kubectl -n zq-test describe pods
			kubectl -n zq-csi logs -l app.kubernetes.io/component=node-plugin --all-containers --prefix --tail=40
			kubectl -n zq-csi logs -l app.kubernetes.io/component=node-plugin -c csi-provisioner --previous --tail=25
		} 2>&1 | sed 's/^/#   /'
	fi
	if ((FAIL > 0)); then
		for f in "$work"/logs/*.log; do
			echo "# --- $(basename "$f") (last 15 lines)"
			tail -n 15 "$f" | sed 's/^/#   /'
		done
	fi
	kill "${pids[@]}" 2>/dev/null || true
	echo "$PASS passed, $FAIL failed"
	((FAIL == 0))
	exit
}
trap finish EXIT
# wait_for DESC SECONDS CMD...: until CMD succeeds
wait_for() {
	local desc=$1 limit=$2 start=$SECONDS
	shift 2
	while ((SECONDS - start < limit)); do
		if "$@" >/dev/null 2>&1; then
			ok "$desc ($((SECONDS - start))s)"
			return 0
		fi
		sleep 2
	done
	not_ok "$desc: not within ${limit}s"
	exit 1
}

# The kernel side: cgroup v2 with every controller delegated, the
# networking modules, a node address.
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup
for c in $(</sys/fs/cgroup/cgroup.controllers); do echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true; done
modprobe -a bridge veth br_netfilter overlay loop # loop: the kubelet pins each block volume with a loop device
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 || true
ip link set lo up
# Bidirectional mount propagation (the plugin's publish mounts) needs a
# shared mount underneath.
mount --make-rshared /
ip link add zq0 type dummy && ip addr add 10.200.0.1/24 dev zq0 && ip link set zq0 up
# No kube-proxy: the kubernetes Service's address is the node's own, and the
# apiserver listens on its port, so pods reach it (in-cluster clients).
ip addr add 10.96.0.1/32 dev zq0
ip route add default dev zq0 2>/dev/null || true
node_ip=10.200.0.1
hostname zq-node
ok "kernel: cgroup2 ($(</sys/fs/cgroup/cgroup.subtree_control)), node address $node_ip"

# ---- control plane -----------------------------------------------------------
openssl genrsa -out "$work/pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$work/pki/sa.key" -pubout -out "$work/pki/sa.pub" 2>/dev/null
token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
echo "$token,admin,admin,system:masters" >"$work/pki/tokens.csv"
cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: local
    cluster: {server: "https://$node_ip:443", insecure-skip-tls-verify: true}
users:
  - name: admin
    user: {token: $token}
contexts:
  - name: local
    context: {cluster: local, user: admin}
current-context: local
EOF
export KUBECONFIG=$work/kubeconfig
etcd --name zq --data-dir "$work/etcd" --unsafe-no-fsync \
	--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
	--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
	--initial-cluster zq=http://127.0.0.1:2380 --log-level error >"$work/logs/etcd.log" 2>&1 &
pids+=($!)
kube-apiserver --etcd-servers http://127.0.0.1:2379 \
	--bind-address 0.0.0.0 --advertise-address "$node_ip" --secure-port 443 --cert-dir "$work/pki" \
	--token-auth-file "$work/pki/tokens.csv" --authorization-mode Node,RBAC \
	--service-account-key-file "$work/pki/sa.pub" --service-account-signing-key-file "$work/pki/sa.key" \
	--service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.96.0.0/16 \
	--allow-privileged=true --kubelet-preferred-address-types InternalIP >"$work/logs/apiserver.log" 2>&1 &
pids+=($!)
wait_for "kube-apiserver ready" 300 bash -c '[[ $(kubectl get --raw /readyz) == ok ]]'
kube-controller-manager --kubeconfig "$KUBECONFIG" --service-account-private-key-file "$work/pki/sa.key" \
	--root-ca-file "$work/pki/apiserver.crt" --use-service-account-credentials=false \
	--leader-elect=false --controllers '*,-nodeipam' >"$work/logs/controller-manager.log" 2>&1 &
pids+=($!)
kube-scheduler --kubeconfig "$KUBECONFIG" --leader-elect=false >"$work/logs/scheduler.log" 2>&1 &
pids+=($!)
# Snapshots: the CRDs and the snapshot-controller, a process as the
# control plane's are (a cluster runs it as a Deployment), in its
# distributed mode: it labels each dynamic VolumeSnapshotContent with its
# volume's node, whose csi-snapshotter (the chart's, per node) takes it.
if ! snapshots; then
	echo "# snapshots: none on this node (ZQ_KUBE_SNAPSHOTS=1, ZQ_KUBE_E2E_ALL=1 or a focus adds them)"
elif kubectl apply -f "$img/snapshot-crds/" >"$work/logs/snapshot-crds.log" 2>&1 &&
	kubectl wait --for condition=established --timeout=120s crd/volumesnapshots.snapshot.storage.k8s.io \
		crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io >>"$work/logs/snapshot-crds.log" 2>&1; then
	ok "the snapshot CRDs established"
	snapshot-controller --kubeconfig "$KUBECONFIG" --leader-election=false --enable-distributed-snapshotting \
		>"$work/logs/snapshot-controller.log" 2>&1 &
	pids+=($!)
else
	not_ok "the snapshot CRDs: $(tail -n 5 "$work/logs/snapshot-crds.log")"
fi

# ---- container runtime -------------------------------------------------------
cat >"$work/cni/10-zq.conflist" <<'EOF'
{"cniVersion": "1.0.0", "name": "zq", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
EOF
cat >"$work/containerd.toml" <<EOF
version = 3
root = "$work/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "zq-csi.local/pause:1"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    BinaryName = "$BIN/runc"
    SystemdCgroup = false
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "$work/cni"
EOF
containerd --config "$work/containerd.toml" >"$work/logs/containerd.log" 2>&1 &
pids+=($!)
wait_for "containerd serving" 120 ctr --address /run/containerd/containerd.sock version
for t in "$img"/*.tar; do
	if ctr --address /run/containerd/containerd.sock -n k8s.io images import --all-platforms "$t" >>"$work/logs/import.log" 2>&1; then
		ok "image $(basename "$t") imported"
	else
		not_ok "image $(basename "$t") imported"
	fi
done

# ---- kubelet -----------------------------------------------------------------
cat >"$work/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
staticPodPath: $work/manifests
localStorageCapacityIsolation: false
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}
resolvConf: ""
EOF
# start_kubelet: run the kubelet in the background, its pid in $kubelet_pid
# (restart.sh restarts it).
start_kubelet() {
	kubelet --config "$work/kubelet.yaml" --kubeconfig "$KUBECONFIG" --root-dir "$work/kubelet" \
		--hostname-override zq-node --node-ip "$node_ip" >>"$work/logs/kubelet.log" 2>&1 &
	kubelet_pid=$!
	pids+=("$kubelet_pid")
}
node_ready() { [[ $(kubectl get node zq-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]; }
start_kubelet
wait_for "node zq-node Ready" 600 node_ready

# ---- a pod -------------------------------------------------------------------
kubectl create namespace zq-test >/dev/null
kubectl -n zq-test apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: probe}
spec:
  containers:
    - name: zq
      image: zq-csi.local/zq-csi:dev
      imagePullPolicy: Never
      command: [/usr/local/bin/zq-csi, image, create, -o, zone.mode=host-managed, /data/z.qcow2, 64M]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, emptyDir: {}}]
  restartPolicy: Never
EOF
phase() { kubectl -n zq-test get pod probe -o jsonpath={.status.phase}; }
wait_for "a pod ran on the node" 600 bash -c '[[ $(kubectl -n zq-test get pod probe -o jsonpath={.status.phase}) =~ ^(Succeeded|Failed)$ ]]'
logs=$(kubectl -n zq-test logs probe 2>&1 || true)
if [[ $(phase) == Succeeded && $logs == *"Formatting '/data/z.qcow2', fmt=qcow2"* ]]; then
	ok "the pod's zq-csi made a zoned image in its emptyDir"
else
	not_ok "the pod: phase $(phase), logs: $logs"
fi

# ---- the chart: a PVC in a pod ----------------------------------------------
# The user's path: helm install with a zoned StorageClass, a Block PVC bound
# on first consumer, a pod that renames the device (devicePath /dev/zoned,
# the host's is /dev/ublkbN) and looks at it with blkzone, libzbd's zbd, its
# sysfs queue and fio's zoned mode with verify.
cat >"$work/values.yaml" <<EOF
kubeletDir: $work/kubelet
image: {repository: zq-csi.local/zq-csi, tag: dev, pullPolicy: Never}
# node-driver-registrar and livenessprobe are not on the Go module proxy:
# the plugin registers itself and answers an exec probe instead (the
# chart's options for a node without those images).
sidecars:
  nodeDriverRegistrar: {enabled: false}
  livenessProbe: {enabled: false}
  provisioner:
    image: {repository: zq-csi.local/csi-provisioner, tag: dev, pullPolicy: Never}
    capacityPollInterval: 10s
  snapshotter:
    enabled: $(snapshots && echo true || echo false)
    image: {repository: zq-csi.local/csi-snapshotter, tag: dev, pullPolicy: Never}
volumeSnapshotClass: {create: $(snapshots && echo true || echo false)}
storageClasses:
  - name: zq-csi
    default: false
    reclaimPolicy: Delete
    allowVolumeExpansion: null
    attach: ublk
    zone: {size: 64Mi, capacity: 48Mi, conventionalZones: 1, maxOpenZones: 3, maxActiveZones: 4, maxAppendBytes: 256Ki}
    clusterSize: null
    scheduler: mq-deadline
    extraParameters: {}
    labels: {}
    annotations: {}
  # a volumeMode Filesystem class: f2fs, its metadata in 3 conventional
  # zones (of 64 on a 1 GiB claim)
  - name: zq-csi-f2fs
    default: false
    reclaimPolicy: Delete
    allowVolumeExpansion: null
    attach: ublk
    zone: {size: 16Mi, capacity: null, conventionalZones: 3, maxOpenZones: 8, maxActiveZones: 8, maxAppendBytes: null}
    clusterSize: null
    scheduler: null
    fsType: f2fs
    mountOptions: [noatime]
    extraParameters: {}
    labels: {}
    annotations: {}
  # Kubernetes' storage e2e suite's class (e2e-driver.yaml): a conventional
  # first zone, since the suite rewrites the start of a volume
  - name: zq-csi-e2e
    default: false
    reclaimPolicy: Delete
    allowVolumeExpansion: null
    attach: ublk
    zone: {size: 32Mi, capacity: null, conventionalZones: 1, maxOpenZones: null, maxActiveZones: null, maxAppendBytes: null}
    clusterSize: null
    scheduler: null
    extraParameters: {}
    labels: {}
    annotations: {}
EOF
if helm install zq-csi "$root/charts/zq-csi" -n zq-csi --create-namespace -f "$work/values.yaml" >"$work/logs/helm.log" 2>&1; then
	ok "helm install of the chart"
else
	not_ok "helm install of the chart: $(cat "$work/logs/helm.log")"
fi
plugin=(-n zq-csi -l app.kubernetes.io/component=node-plugin)
wait_for "the plugin's pod Ready (all its containers)" 600 kubectl wait "${plugin[@]}" --for=condition=Ready pod --timeout=10s
wait_for "the kubelet registered the driver (CSINode zq-node, topology key)" 300 \
	bash -c '[[ $(kubectl get csinode zq-node -o jsonpath="{.spec.drivers[?(@.name==\"zq-csi.io\")].topologyKeys}") == *topology.zq-csi.io/node* ]]'
wait_for "CSIStorageCapacity for the class on the node" 300 \
	bash -c '[[ -n $(kubectl -n zq-csi get csistoragecapacities -o jsonpath="{.items[?(@.storageClassName==\"zq-csi\")].capacity}") ]]'
# The liveness probe is an exec probe: the kubelet runs zq-csi probe in the
# plugin's container, as kubectl exec does.
plugin_pod=$(kubectl get pod "${plugin[@]}" -o name)
if out=$(kubectl -n zq-csi exec "$plugin_pod" -c zq-csi -- /usr/local/bin/zq-csi probe --endpoint=unix:///csi/csi.sock --timeout=3s 2>&1); then
	ok "zq-csi probe in the plugin's container (the liveness probe's command): $out"
else
	not_ok "zq-csi probe in the plugin's container: $out"
fi
# capacity: the class's CSIStorageCapacity on the node, in bytes (the pool's
# free space, polled by csi-provisioner every 10s)
capacity() {
	local q
	q=$(kubectl -n zq-csi get csistoragecapacities -o jsonpath='{.items[?(@.storageClassName=="zq-csi")].capacity}')
	case $q in
	*Ki) echo $((${q%Ki} << 10)) ;;
	*Mi) echo $((${q%Mi} << 20)) ;;
	*Gi) echo $((${q%Gi} << 30)) ;;
	*k) echo $((${q%k} * 1000)) ;;
	*M) echo $((${q%M} * 1000000)) ;;
	*G) echo $((${q%G} * 1000000000)) ;;
	*) echo "$q" ;;
	esac
}
export -f capacity # for wait_for's bash -c
capacity_before=$(capacity)

# claim NAME: a Block claim of 512Mi in the class zq-csi, as YAML
claim() {
	printf '%s\n' "apiVersion: v1" "kind: PersistentVolumeClaim" "metadata: {name: $1}" "spec:" \
		"  storageClassName: zq-csi" "  volumeMode: Block" "  accessModes: [ReadWriteOnce]" \
		"  resources: {requests: {storage: 512Mi}}" "---"
}
{ claim zoned && cat; } <<'EOF' | kubectl -n zq-test apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: zones}
spec:
  containers:
    - name: zq
      image: zq-csi.local/workload:1
      imagePullPolicy: Never
      command:
        - /bin/sh
        - -c
        - |
          set -e
          q=/sys/block/zoned/queue
          echo "queue zoned=$(/bin/busybox cat $q/zoned) chunk_sectors=$(/bin/busybox cat $q/chunk_sectors)" \
            "max_open=$(/bin/busybox cat $q/max_open_zones) max_active=$(/bin/busybox cat $q/max_active_zones)" \
            "append=$(/bin/busybox cat $q/zone_append_max_bytes) scheduler=$(/bin/busybox cat $q/scheduler)"
          echo "--- blkzone"; blkzone report /dev/zoned
          echo "--- zbd"; zbd report -i /dev/zoned
          echo "--- fio"
          fio --name=verify --filename=/dev/zoned --zonemode=zbd --direct=1 --ioengine=psync --rw=write --bs=64k \
            --offset=64M --size=64M --max_open_zones=3 --verify=crc32c --do_verify=1
      volumeDevices: [{name: zoned, devicePath: /dev/zoned}]
  volumes: [{name: zoned, persistentVolumeClaim: {claimName: zoned}}]
  restartPolicy: Never
EOF
wait_for "a pod with a zq-csi PVC ran" 900 bash -c '[[ $(kubectl -n zq-test get pod zones -o jsonpath={.status.phase}) =~ ^(Succeeded|Failed)$ ]]'
out=$(kubectl -n zq-test logs zones 2>&1 || true)
echo "$out" >"$work/logs/zones-pod.log"
phase=$(kubectl -n zq-test get pod zones -o jsonpath={.status.phase})
expect "the pod's script finished" Succeeded "$phase"
blkzone=$(sed -n '/^--- blkzone/,/^--- zbd/p' <<<"$out")
expect "blkzone report: 8 zones of 64 MiB (131072 sectors)" 8 "$(grep -c 'len 0x020000' <<<"$blkzone" || true)"
expect "blkzone report: the first zone conventional, 7 sequential" "1 7" \
	"$(grep -c 'CONVENTIONAL' <<<"$blkzone" || true) $(grep -c 'SEQ_WRITE_REQUIRED' <<<"$blkzone" || true)"
expect "blkzone report: sequential zones have capacity 48 MiB (98304 sectors)" 7 "$(grep -c 'cap 0x018000.*SEQ_WRITE_REQUIRED' <<<"$blkzone" || true)"
expect "the pod's sysfs under its own device name (/sys/block/zoned: NRI)" \
	"queue zoned=host-managed chunk_sectors=131072 max_open=3 max_active=4 append=262144" \
	"$(grep '^queue ' <<<"$out" | sed 's/ scheduler=.*//' || true)"
expect "the class's queue.scheduler on the device, as the pod sees it" "[mq-deadline]" \
	"$(grep '^queue ' <<<"$out" | grep -o '\[[a-z-]*\]' || true)"
zbd=$(sed -n '/^--- zbd/,/^--- fio/p' <<<"$out")
zbd_info="$(grep -o 'Zone model: [a-z-]*' <<<"$zbd" || true), $(grep -o 'Zones: [0-9]* zones' <<<"$zbd" || true)"
zbd_info+=", open $(sed -n 's/.*open zones: *//p' <<<"$zbd"), active $(sed -n 's/.*active zones: *//p' <<<"$zbd")"
zbd_info+=", $(grep -cE '^Zone [0-9]+: swr,' <<<"$zbd" || true) swr"
expect "libzbd's zbd report -i under the pod's name /dev/zoned (not its kernel name)" \
	"Zone model: host-managed, Zones: 8 zones, open 3, active 4, 7 swr" "$zbd_info"
if [[ $out == *"err= 0"* && $out == *"verify"* ]]; then
	ok "fio --zonemode=zbd --verify=crc32c in the pod: err= 0"
else
	not_ok "fio in the pod: $(sed -n '/^--- fio/,$p' <<<"$out" | tail -n 20)"
fi

# fio filled zone 1 (48 MiB, its capacity) and the image holds that: the
# pool has that much less free, and the class's CSIStorageCapacity says so
# within a poll or two.
image_bytes=$(du -cB1 /var/lib/zq-csi/pool | tail -n 1 | cut -f1)
for ((i = 0; i < 60; i++)); do
	shrink=$((capacity_before - $(capacity)))
	((shrink < image_bytes - (16 << 20))) || break
	sleep 2
done
if ((image_bytes >= 48 << 20 && shrink >= image_bytes - (16 << 20))); then
	ok "CSIStorageCapacity shrank by what the image holds: $((shrink >> 20)) MiB, image $((image_bytes >> 20)) MiB"
else
	not_ok "CSIStorageCapacity shrank by $((shrink >> 20)) MiB, the image holds $((image_bytes >> 20)) MiB (want 48 or more, and a shrink within 16 of it)"
fi
# delete_volume POD PVC: delete the pod and its claim (the only one in the
# cluster); the device, the image and the node's record go, and the
# capacity comes back to $capacity_before.
delete_volume() {
	kubectl -n zq-test delete pod "$1" --wait=true --timeout=300s >/dev/null
	kubectl -n zq-test delete pvc "$2" --wait=true --timeout=300s >/dev/null
	wait_for "$2: the PV is gone" 300 bash -c '[[ -z $(kubectl get pv -o name) ]]'
	expect "$2: no ublk device left on the node" "" "$(ls /dev | grep '^ublkb' || true)"
	expect "$2: no image left in the pool" "" "$(ls /var/lib/zq-csi/pool 2>/dev/null || true)"
	expect "$2: no staged-volume record left" "" "$(ls /var/lib/zq-csi/state/volumes 2>/dev/null || true)"
	wait_for "$2: CSIStorageCapacity grew back (within 16 MiB of before)" 120 \
		bash -c "(( \$(capacity) > $capacity_before - (16 << 20) ))"
}
delete_volume zones zoned

# ---- faults from the claim: its namespace annotates it ----------------------
# Whoever may patch a claim puts faults on its volume (zq-csi.io/faults); the
# node plugin applies each change within a poll (5s). Zone 2 of the class's
# 64 MiB zones starts at sector 0x40000 (128 MiB).
{ claim faulty && cat; } <<'EOF2' | kubectl -n zq-test apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: faulty}
spec:
  containers:
    - name: zq
      image: zq-csi.local/workload:1
      imagePullPolicy: Never
      command: [/bin/busybox, sleep, "3600"]
      volumeDevices: [{name: zoned, devicePath: /dev/zoned}]
  volumes: [{name: zoned, persistentVolumeClaim: {claimName: faulty}}]
  restartPolicy: Never
EOF2
wait_for "a pod with a claim to fault is running" 900 bash -c '[[ $(kubectl -n zq-test get pod faulty -o jsonpath={.status.phase}) == Running ]]'
zone2() { kubectl -n zq-test exec faulty -- blkzone report -o 0x40000 -c 1 /dev/zoned; }
export -f zone2 # for wait_for's bash -c
kubectl -n zq-test annotate pvc faulty zq-csi.io/faults='readonly:zone=2;delay:op=read,delay=1ms' >/dev/null
wait_for "the claim's annotation made zone 2 read-only in the pod (blkzone zcond 13)" 120 bash -c 'zone2 | grep -q "zcond:13(ro)"'
out=$(kubectl -n zq-test exec faulty -- fio --name=ro --filename=/dev/zoned --rw=write --bs=4k --size=4k --offset=128M \
	--direct=1 --ioengine=psync 2>&1 || true)
if [[ $out == *"Input/output error"* ]]; then
	ok "a write to the read-only zone fails in the pod with EIO"
else
	not_ok "a write to the read-only zone in the pod: $(tail -n 5 <<<"$out")"
fi
out=$(kubectl -n zq-csi exec "$plugin_pod" -c zq-csi -- /usr/local/bin/zq-csi fault list 2>&1 || true)
if [[ $out == *"delay:op=read,delay=1ms  (annotation;"* && $out == *"zone 2  read-only"* ]]; then
	ok "zq-csi fault list in the plugin's container shows the annotation's faults"
else
	not_ok "zq-csi fault list in the plugin's container: $out"
fi
kubectl -n zq-test annotate pvc faulty zq-csi.io/faults- >/dev/null
wait_for "the annotation removed, zone 2 is back (blkzone zcond 1)" 120 bash -c 'zone2 | grep -q "zcond: 1(em)"'
delete_volume faulty faulty

# ---- a Filesystem PVC: f2fs in zoned mode, in a pod -------------------------
# The class zq-csi-f2fs: the node formats the volume at its first stage and
# the pod sees a mounted f2fs with the class's mount options; fio writes and
# verifies files in it. (The kubelet's volume stats, which come from the
# plugin's NodeGetVolumeStats, are not looked at here: on this node the
# kubelet reports none, since cadvisor finds no filesystem information for
# the tmpfs its directory is on. The VM tier checks NodeGetVolumeStats of
# Filesystem volumes against df.)
kubectl -n zq-test apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: files}
spec:
  storageClassName: zq-csi-f2fs
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: files}
spec:
  containers:
    - name: zq
      image: zq-csi.local/workload:1
      imagePullPolicy: Never
      command:
        - /bin/sh
        - -c
        - |
          set -e
          echo "mount: $(/bin/busybox grep ' /data ' /proc/self/mounts)"
          fio --name=files --directory=/data --nrfiles=4 --size=64M --bs=64k --rw=write --ioengine=psync \
            --verify=crc32c --do_verify=1 --fsync_on_close=1
          echo finished
          exec /bin/busybox sleep 3600
      volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: files}}]
  restartPolicy: Never
EOF
wait_for "a pod with an f2fs PVC wrote and verified files" 900 bash -c 'kubectl -n zq-test logs files 2>/dev/null | grep -q "^finished"'
out=$(kubectl -n zq-test logs files 2>&1 || true)
echo "$out" >"$work/logs/files-pod.log"
expect "the pod's /data: f2fs with the class's noatime" "f2fs noatime" \
	"$(sed -n 's/^mount: [^ ]* \/data \([a-z0-9]*\) .*\(noatime\).*/\1 \2/p' <<<"$out")"
if [[ $out == *"err= 0"* ]]; then ok "fio --verify=crc32c on f2fs files in the pod: err= 0"; else not_ok "fio on f2fs in the pod: $(tail -n 20 <<<"$out")"; fi
delete_volume files files
# The kubelet ran the exec liveness probe all along and never restarted the
# plugin (under TCG, with fio running, a probe can time out now and then:
# the chart allows 5 in a row).
expect "the kubelet's liveness probe never restarted the plugin" 0 \
	"$(kubectl get pod "${plugin[@]}" -o jsonpath='{.items[0].status.containerStatuses[?(@.name=="zq-csi")].restartCount}')"
echo "# liveness probe failures (Unhealthy events): $(kubectl -n zq-csi get events --field-selector reason=Unhealthy -o name | wc -l)"

for checks in "$@"; do
	# shellcheck source=/dev/null
	. "$checks"
done
