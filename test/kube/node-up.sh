#!/usr/bin/env bash
# node-up.sh: a single-node Kubernetes cluster in a VM harness guest (issue
# 17, first part): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd with runc, and a kubelet, all built from the Go
# module proxy by scripts/kube-tools.sh node, with images made offline by
# test/kube/ocibuild and imported before the kubelet starts. The guest has
# no NIC: the node's address is on a dummy interface and the pods' on a CNI
# bridge, both reachable only inside the guest.
#
#   test/kube/node-up.sh [CMD...]   bring the node up, check that a pod runs,
#                                   then run CMD in the guest (KUBECONFIG set)
#   ZQ_KUBE_CHART=1 ...             also install the chart and run a pod with a
#                                   zq-csi PVC (in progress: see below)
#
# Prints "ok"/"not ok" per check; exits 1 if any failed. Needs 6 GiB for the
# guest (ZQ_VM_MEM); under TCG about 2 minutes once the tools are built
# (the first run builds them: scripts/kube-tools.sh node, ~4 minutes on top
# of deploy-check's kube-apiserver build).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
TOOLS=${ZQ_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zq-csi-tools}

if [[ ${1:-} != --guest ]]; then
	# runc's seccomp needs libseccomp-dev and pkg-config to build; the
	# guest (the host's root) needs the CNI plugins, ip and openssl.
	ZQ_EXTRA_PKGS="libseccomp-dev pkg-config containernetworking-plugins iproute2 openssl" bash "$root/scripts/deps.sh"
	bash "$root/scripts/kube-tools.sh" node $([[ ${ZQ_KUBE_CHART:-0} == 1 ]] && echo provisioner)
	work=$(mktemp -d /var/tmp/zq-kube.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	(cd "$root" && go build -o "$work/zq-csi" ./cmd/zq-csi)
	(cd "$root/test/kube" && go build -o "$work/ocibuild" ./ocibuild && CGO_ENABLED=0 go build -o "$work/pause" ./pause)
	"$work/ocibuild" --tag zq-csi.local/pause:1 --out "$work/pause.tar" --entrypoint /pause --add "$work/pause=/pause"
	"$work/ocibuild" --tag zq-csi.local/zq-csi:dev --out "$work/zq-csi.tar" --entrypoint /usr/local/bin/zq-csi \
		--add "$work/zq-csi=/usr/local/bin/zq-csi" --bin /usr/bin/mount --bin /usr/bin/umount --bin /usr/sbin/blkzone
	if [[ ${ZQ_KUBE_CHART:-0} == 1 ]]; then
		"$work/ocibuild" --tag zq-csi.local/csi-provisioner:dev --out "$work/csi-provisioner.tar" --entrypoint /csi-provisioner \
			--add "$(readlink -f "$TOOLS/bin/csi-provisioner")=/csi-provisioner"
	fi
	ZQ_VM_MEM=${ZQ_VM_MEM:-6144} ZQ_VM_TIMEOUT=${ZQ_VM_TIMEOUT:-2400} ZQ_VM_SHARES="$work" ZQ_KUBE_WORK="$work" \
		ZQ_TOOLS_DIR="$TOOLS" ZQ_KUBE_CHART="${ZQ_KUBE_CHART:-0}" "$root/test/e2e/vm.sh" -- "$0" --guest "$@"
	exit
fi
shift

# ---- in the guest ------------------------------------------------------------
BIN=$TOOLS/bin
export PATH=$BIN:$PATH
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
	echo "# logs: $work/logs (in the guest)"
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
kubelet --config "$work/kubelet.yaml" --kubeconfig "$KUBECONFIG" --root-dir "$work/kubelet" \
	--hostname-override zq-node --node-ip "$node_ip" >"$work/logs/kubelet.log" 2>&1 &
pids+=($!)
wait_for "node zq-node Ready" 600 bash -c '[[ $(kubectl get node zq-node -o jsonpath="{.status.conditions[?(@.type==\"Ready\")].status}") == True ]]'

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

# ---- the chart: a PVC in a pod (ZQ_KUBE_CHART=1; not in the tier yet) --------
# Where it stands (2026-12-02): it passes (the chart installs, the kubelet
# registers the driver through `zq-csi serve --kubelet-registration-path`,
# the PVC is provisioned and the pod sees 4 zones), but the kubelet's exec
# liveness probe cannot start /usr/local/bin/zq-csi in the plugin container
# ("no such file or directory", counted as unknown, not failed), so it is
# not in the tier yet: that, then the e2e suite, is the next step of issue 17.
if [[ ${ZQ_KUBE_CHART:-0} == 1 ]]; then
cat >"$work/values.yaml" <<EOF
kubeletDir: $work/kubelet
image: {repository: zq-csi.local/zq-csi, tag: dev, pullPolicy: Never}
sidecars:
  provisioner:
    image: {repository: zq-csi.local/csi-provisioner, tag: dev, pullPolicy: Never}
storageClasses:
  - name: zq-csi
    default: false
    reclaimPolicy: Delete
    allowVolumeExpansion: null
    attach: ublk
    zone: {size: 64Mi, capacity: null, conventionalZones: 1, maxOpenZones: null, maxActiveZones: null, maxAppendBytes: null}
    clusterSize: null
    extraParameters: {}
    labels: {}
    annotations: {}
EOF
if helm install zq-csi "$root/charts/zq-csi" -n zq-csi --create-namespace -f "$work/values.yaml" >"$work/logs/helm.log" 2>&1; then
	ok "helm install of the chart"
else
	not_ok "helm install of the chart: $(cat "$work/logs/helm.log")"
fi
wait_for "the plugin's pod Ready (all its containers)" 600 kubectl -n zq-csi wait --for=condition=Ready pod -l app.kubernetes.io/component=node-plugin --timeout=10s
wait_for "the kubelet registered the driver (CSINode zq-node)" 300 bash -c '[[ $(kubectl get csinode zq-node -o jsonpath={.spec.drivers[*].name}) == *zq-csi.io* ]]'
kubectl -n zq-test apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: zoned}
spec:
  storageClassName: zq-csi
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 256Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: zones}
spec:
  containers:
    - name: zq
      image: zq-csi.local/zq-csi:dev
      imagePullPolicy: Never
      command: [/usr/sbin/blkzone, report, /dev/zoned]
      volumeDevices: [{name: zoned, devicePath: /dev/zoned}]
  volumes: [{name: zoned, persistentVolumeClaim: {claimName: zoned}}]
  restartPolicy: Never
EOF
wait_for "a pod with a zq-csi PVC ran" 600 bash -c '[[ $(kubectl -n zq-test get pod zones -o jsonpath={.status.phase}) =~ ^(Succeeded|Failed)$ ]]'
report=$(kubectl -n zq-test logs zones 2>&1 || true)
zones=$(grep -c 'start: ' <<<"$report" || true)
if [[ $zones == 4 && $report == *"type: 1(CONVENTIONAL)"* && $report == *"type: 2(SEQ_WRITE_REQUIRED)"* ]]; then
	ok "the pod saw a host-managed zoned disk: 4 zones of 64 MiB, the first conventional"
else
	not_ok "the pod's blkzone report ($zones zones): $report"
fi

fi

if (($# > 0)); then
	"$@"
fi
