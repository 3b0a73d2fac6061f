#!/usr/bin/env bash
# The main job, as a newcomer sees it: `zq-csi serve` runs the CSI plugin,
# and test/e2e/csidemo, speaking the CSI API as Kubernetes would, provisions
# a 1 GiB zoned volume (64 MiB zones, 2 conventional, max 6 open / 8 active),
# stages it (the plugin attaches the image through ublk), publishes it (the
# device node bind-mounted where a pod would see it), shows its zones with
# lsblk and blkzone, writes into a zone, reads the volume's stats and cleans
# up. Where the host kernel has no ublk, it runs in the VM harness
# (test/e2e/vm.sh: a Debian 6.12 kernel under QEMU).
#
#   bash scripts/demo.sh            (make demo)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} != --here ]]; then
	# Colour only for a terminal here: in the VM harness the demo's output is
	# a virtio console, a character device that is not the user's terminal.
	if [[ -t 1 ]]; then export ZQ_DEMO_COLOR=1; else export ZQ_DEMO_COLOR=0; fi
	(cd "$root" && go build -o bin/zq-csi ./cmd/zq-csi && go build -o bin/csidemo ./test/e2e/csidemo)
	if [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null; then
		exec "$0" --here
	fi
	echo "# This kernel ($(uname -r)) has no ublk: running the demo in the VM harness (test/e2e/vm.sh)."
	exec "$root/test/e2e/vm.sh" -- "$root/scripts/demo.sh" --here
fi

work=$(mktemp -d /tmp/zq-csi-demo.XXXXXX)
pid=
cleanup() {
	if [[ -n $pid ]]; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

echo "\$ zq-csi serve --endpoint unix://$work/csi.sock --node-id demo-node --pool $work/pool --state-dir $work/state"
"$root/bin/zq-csi" serve --endpoint "unix://$work/csi.sock" --node-id demo-node \
	--pool "$work/pool" --state-dir "$work/state" 2>"$work/serve.log" &
pid=$!
for _ in $(seq 100); do
	[[ -S $work/csi.sock ]] && break
	sleep 0.1
done
[[ -S $work/csi.sock ]] || {
	echo "demo: zq-csi serve did not start:" >&2
	cat "$work/serve.log" >&2
	exit 1
}
"$root/bin/csidemo" --endpoint "unix://$work/csi.sock" --dir "$work/demo" --color="$([[ ${ZQ_DEMO_COLOR:-0} == 1 ]] && echo true || echo false)"
echo
echo "# The plugin's log (klog):"
sed 's/^/  /' "$work/serve.log"
