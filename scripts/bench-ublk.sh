#!/usr/bin/env bash
# bench-ublk.sh: the kernel frontends, in one VM harness guest, one run:
# fio on the ublk device of a zoned image, on the nbd device of a copy of the
# same image, and on a memory-backed zoned null_blk of the same geometry (the
# ceiling: no userspace server at all). Jobs: sequential 1 MiB writes over
# 8 zones (iodepth 1: a zoned device takes one write per zone at a time) and
# random 4 KiB reads of what was written (iodepth 16). Prints MiB/s per
# device and the ratios ublk/nbd and ublk/null_blk.
#
# Usage: scripts/bench-ublk.sh [RUNTIME seconds for the read job (default 10)]
# Runs the guest half (the same script with --guest) through test/e2e/vm.sh.
# Under TCG the absolute numbers are low; compare the ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} != --guest ]]; then
	runtime=${1:-10}
	(cd "$root" && go build -o bin/zq-csi ./cmd/zq-csi)
	exec "$root/test/e2e/vm.sh" -- "$root/scripts/bench-ublk.sh" --guest "$runtime"
fi

runtime=$2
bin=$root/bin/zq-csi
work=$(mktemp -d /tmp/bench-ublk.XXXXXX)
zone_mb=64 nzones=16
write_mb=$((8 * zone_mb))
pid=
cleanup() {
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

# fio_mibs DEV RW BS DEPTH EXTRA...: one fio job, its bandwidth in MiB/s.
fio_mibs() {
	local dev=$1 rw=$2 bs=$3 depth=$4
	shift 4
	if ! fio --output-format=json --name=bench --filename="$dev" --direct=1 --ioengine=io_uring \
		--rw="$rw" --bs="$bs" --iodepth="$depth" "$@" >"$work/fio.json" 2>"$work/fio.err"; then
		echo "bench-ublk: fio $rw on $dev failed: $(cat "$work/fio.err" "$work/fio.json")" >&2
		exit 1
	fi
	python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
k = "write" if "write" in sys.argv[1] else "read"
print("%.1f" % (j[k]["bw"] / 1024))' "$rw" <"$work/fio.json"
}

declare -A mibs
# run NAME DEV ZBD: both jobs on DEV; ZBD=1 for a device the kernel knows
# as zoned.
run() {
	local zbd=()
	[[ $3 == 1 ]] && zbd=(--zonemode=zbd)
	mibs[$1,seq-write]=$(fio_mibs "$2" write 1m 1 "${zbd[@]}" --size="${write_mb}M")
	mibs[$1,rand-read]=$(fio_mibs "$2" randread 4k 16 "${zbd[@]}" --size="${write_mb}M" --time_based --runtime="$runtime")
}

# attach BACKEND IMAGE: start zq-csi attach in the background (pid), set
# dev to the device it prints.
attach() {
	"$bin" attach --backend "$1" "$2" >"$work/dev" 2>"$work/attach.log" &
	pid=$!
	for _ in $(seq 300); do
		[[ -s $work/dev ]] && { dev=$(<"$work/dev"); return; }
		sleep 0.1
	done
	echo "bench-ublk: attach --backend $1 printed no device: $(cat "$work/attach.log")" >&2
	exit 1
}

detach() {
	"$bin" detach "$1"
	wait "$pid"
	pid=
	rm -f "$work/dev"
}

for backend in ublk nbd; do
	img=$work/$backend.qcow2
	"$bin" image create -f qcow2 -o "zone.mode=host-managed,zone.size=${zone_mb}M,zone.max_open_zones=8,zone.max_active_zones=8" \
		"$img" $((nzones * zone_mb))M >/dev/null
	attach "$backend" "$img"
	run "$backend" "$dev" $([[ $backend == ublk ]] && echo 1 || echo 0)
	detach "$dev"
	rm "$img" # the guest's /tmp is memory
done

# null_blk through configfs, memory-backed, same geometry.
nb=/sys/kernel/config/nullb/zqbench
mkdir "$nb"
echo $((nzones * zone_mb)) >"$nb/size"
echo 1 >"$nb/memory_backed"
echo 1 >"$nb/zoned"
echo "$zone_mb" >"$nb/zone_size"
echo 8 >"$nb/zone_max_open"
echo 8 >"$nb/zone_max_active"
echo 1 >"$nb/power"
run null_blk /dev/zqbench 1
echo 0 >"$nb/power"
rmdir "$nb"

ratio() { python3 -c 'import sys; a,b=map(float,sys.argv[1:]); print("%.2f" % (a/b if b else 0))' "$1" "$2"; }
printf "%-10s %10s %10s %10s %10s %14s\n" workload "ublk MiB/s" nbd null_blk ublk/nbd ublk/null_blk
for job in seq-write rand-read; do
	printf "%-10s %10s %10s %10s %10s %14s\n" "$job" "${mibs[ublk,$job]}" "${mibs[nbd,$job]}" "${mibs[null_blk,$job]}" \
		"$(ratio "${mibs[ublk,$job]}" "${mibs[nbd,$job]}")" "$(ratio "${mibs[ublk,$job]}" "${mibs[null_blk,$job]}")"
done
