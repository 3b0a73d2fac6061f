# shellcheck shell=bash
# restart.sh: restarts under a pod's I/O (issue 17, step 4), sourced by
# node-up.sh in the guest once the chart is installed. A pod writes one
# zone of a zq-csi volume with fio (zoned mode, crc32c verify, rate-limited
# so that the writing spans what follows); meanwhile the plugin's pod is
# deleted (the DaemonSet makes a new one, which takes the ublk device back
# from the old process) and then the kubelet is restarted. fio must finish
# with no error and every block verified; its largest request latency is
# the longest stall the pod saw. Then the pod and the claim are deleted and
# the device, image, record and capacity checked as for any volume.

{ claim restart && cat; } <<'YAML' | kubectl -n zq-test apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: writer}
spec:
  containers:
    - name: fio
      image: zq-csi.local/workload:1
      imagePullPolicy: Never
      # zone 1 (48 MiB writable) at 256 KiB/s: about 3 minutes of writing
      # (both restarts took about a minute under TCG on 2 cores, the
      # waits between them included), then the verify pass reads it back
      command: [fio, --name=restart, --filename=/dev/zoned, --zonemode=zbd, --direct=1, --ioengine=psync,
                --rw=write, --bs=64k, --offset=64M, --size=64M, --rate=256k, --verify=crc32c, --do_verify=1]
      volumeDevices: [{name: zoned, devicePath: /dev/zoned}]
  volumes: [{name: zoned, persistentVolumeClaim: {claimName: restart}}]
  restartPolicy: Never
YAML
writer_phase() { kubectl -n zq-test get pod writer -o jsonpath='{.status.phase}'; }
writer_running() { [[ $(writer_phase) == Running ]]; }
writer_done() { [[ $(writer_phase) =~ ^(Succeeded|Failed)$ ]]; }
wait_for "restart: the fio pod running" 900 writer_running
io_start=$SECONDS
sleep 20

# The plugin's pod, deleted: the DaemonSet's next pod serves the volume.
old_plugin=$(kubectl get pod "${plugin[@]}" -o jsonpath='{.items[0].metadata.name}')
t0=$SECONDS
kubectl -n zq-csi delete pod "$old_plugin" --wait=false >/dev/null
new_plugin_ready() {
	local p
	p=$(kubectl get pod "${plugin[@]}" -o jsonpath='{.items[?(@.status.phase=="Running")].metadata.name}')
	[[ -n $p && $p != "$old_plugin" ]] && kubectl -n zq-csi wait pod "$p" --for=condition=Ready --timeout=5s >/dev/null
}
wait_for "restart: a new plugin pod Ready after deleting $old_plugin" 600 new_plugin_ready
plugin_back=$((SECONDS - t0))
expect "restart: fio still running after the plugin's restart" Running "$(writer_phase)"
sleep 20

# The kubelet, restarted: the containers run on (containerd keeps them);
# the new kubelet finds the pod, its volume and the plugin again.
t0=$SECONDS
kill "$kubelet_pid"
wait "$kubelet_pid" 2>/dev/null || true
start_kubelet
sleep 5 # the node's Ready condition is stale until the new kubelet reports
wait_for "restart: node Ready again after a kubelet restart" 600 node_ready
kubelet_back=$((SECONDS - t0))
during=$((SECONDS - io_start))
expect "restart: fio still running after the kubelet's restart" Running "$(writer_phase)"

wait_for "restart: the fio pod finished" 1200 writer_done
out=$(kubectl -n zq-test logs writer 2>&1 || true)
echo "$out" >"$work/logs/restart-fio.log"
expect "restart: fio exited 0" Succeeded "$(writer_phase)"
if [[ $out == *"err= 0"* ]] && ! grep -q 'err= *[1-9]' <<<"$out"; then
	ok "restart: fio --verify=crc32c: err= 0, every block verified"
else
	not_ok "restart: fio: $(tail -n 20 <<<"$out")"
fi
# WRITE: bw=..., io=..., run=MIN-MAXmsec: the restarts fell inside it
write_ms=$(sed -n 's/.*WRITE: .*run=[0-9]*-\([0-9]*\)msec.*/\1/p' <<<"$out")
if [[ -n $write_ms ]] && ((during * 1000 < write_ms)); then
	ok "restart: both restarts within fio's writing (${during}s of $((write_ms / 1000))s)"
else
	not_ok "restart: the restarts took ${during}s, fio wrote for ${write_ms:-?} ms: not all of them under I/O"
fi
# fio's completion latencies ("lat (usec): min=..., max=...", with k/M
# suffixes on large numbers): the largest is the longest stall.
stall=$(awk '$1 == "lat" && $2 ~ /^\((nsec|usec|msec)\):$/ {
	unit = $2; gsub(/[():]/, "", unit)
	v = $4; sub(/^max=/, "", v); sub(/,$/, "", v)
	mult = 1
	if (v ~ /k$/) { mult = 1e3; sub(/k$/, "", v) } else if (v ~ /M$/) { mult = 1e6; sub(/M$/, "", v) }
	s = v * mult * (unit == "nsec" ? 1e-9 : unit == "usec" ? 1e-6 : 1e-3)
	if (s > max) max = s
} END { printf "%.1f", max }' <<<"$out")
echo "# restart: plugin pod replaced and Ready in ${plugin_back}s, kubelet back in ${kubelet_back}s, both within ${during}s of fio's writing"
echo "# restart: longest I/O stall the pod saw (fio's largest request latency): ${stall}s"
if [[ -n $stall && $stall != 0.0 ]]; then
	ok "restart: fio's longest stall measured: ${stall}s"
else
	not_ok "restart: no latency figure in fio's output"
fi
delete_volume writer restart
