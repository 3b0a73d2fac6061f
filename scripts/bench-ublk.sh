#!/usr/bin/env bash
# bench-ublk.sh: the kernel frontends, in VM harness guests, one run: fio on
# the ublk device of a zoned image, on the nbd device of a copy of the same
# image, on a memory-backed zoned null_blk of the same geometry (the
# ceiling: no userspace server at all), and on ublk-null, a ublk device of
# the same size served by zq-csi's ublk frontend over a backend that does
# nothing (test/e2e/ublknull: no image, no zones, no file I/O; plain, so
# its jobs run without --zonemode=zbd): the ceiling of a ublk server in
# this guest, which says how much of the gap to null_blk is the round trip
# through ublk itself. Geometry: 1 GiB, 64 MiB zones, the first 2
# conventional, max 8 open and active.
#
# Jobs (4 KiB direct I/O through io_uring unless said):
#   seq-write   1 MiB writes over 8 sequential zones, iodepth 1 (a zoned device
#               takes one write per zone at a time)
#   rand-read   random reads of what was written, iodepth 16
#   qd1-write   random writes in the conventional zones, iodepth 1
#   qd16-write  the same at iodepth 16
#   qd1-read    random reads, iodepth 1
#   qd16-read   random reads, iodepth 16 (the same job as rand-read, in IOPS)
#   zone-write  sequential 4 KiB writes in one sequential zone, iodepth 1
# For each: MiB/s or IOPS, mean and p99 latency (submission to completion), and the ratios
# ublk/null_blk and ublk/nbd. Then the same guest jobs again with a CPU hog
# on the host (one busy loop per host core), and the ratio busy/quiet: a
# server whose requests wait on its own scheduling slows down far more than
# null_blk does.
#
# Usage: scripts/bench-ublk.sh [SECONDS per timed job (default 8)]
#   ZQ_BENCH_HOG=0 skips the busy-host half; ZQ_BENCH_DEVICES="ublk null_blk"
#   picks devices (default: ublk nbd null_blk ublk-null).
# Runs the guest half (the same script with --guest) through test/e2e/vm.sh.
# Under TCG the absolute numbers are low; compare the ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [[ ${1:-} != --guest ]]; then
	runtime=${1:-8}
	(cd "$root" && go build -o bin/zq-csi ./cmd/zq-csi && go build -o bin/ublknull ./test/e2e/ublknull)
	out=$(mktemp -d /tmp/bench-ublk-host.XXXXXX)
	hogs=()
	trap 'kill "${hogs[@]}" 2>/dev/null; rm -rf "$out"' EXIT
	ZQ_VM_SHARES="$out${ZQ_VM_SHARES:+:$ZQ_VM_SHARES}" \
		"$root/test/e2e/vm.sh" -- "$root/scripts/bench-ublk.sh" --guest "$runtime" "$out/quiet.tsv"
	if [[ ${ZQ_BENCH_HOG:-1} != 0 ]]; then
		echo "== the same jobs with $(nproc) CPU hog(s) on the host"
		for _ in $(seq "$(nproc)"); do
			(while :; do :; done) &
			hogs+=($!)
		done
		ZQ_VM_SHARES="$out${ZQ_VM_SHARES:+:$ZQ_VM_SHARES}" \
			"$root/test/e2e/vm.sh" -- "$root/scripts/bench-ublk.sh" --guest "$runtime" "$out/busy.tsv"
		kill "${hogs[@]}" 2>/dev/null
		wait "${hogs[@]}" 2>/dev/null || true
		hogs=()
		echo "== busy host / quiet host (1.00: unaffected by the host's load)"
		python3 - "$out/quiet.tsv" "$out/busy.tsv" <<'EOF'
import sys
def load(p):
    rows = {}
    for line in open(p):
        dev, job, unit, value, mean, p99 = line.split()
        rows[dev, job] = (unit, float(value), float(mean), float(p99))
    return rows
quiet, busy = load(sys.argv[1]), load(sys.argv[2])
print("%-10s %-11s %12s %12s %8s %14s" % ("device", "job", "quiet", "busy", "ratio", "busy mean/p99"))
for key in quiet:
    if key not in busy:
        continue
    unit, q, _, _ = quiet[key]
    _, b, bmean, bp99 = busy[key]
    print("%-10s %-11s %7.0f %-4s %7.0f %-4s %8.2f %6.0f/%-6.0f us" % (key[0], key[1], q, unit, b, unit, b / q if q else 0, bmean, bp99))
EOF
	fi
	exit 0
fi

runtime=$2 table=$3
bin=$root/bin/zq-csi
work=$(mktemp -d /tmp/bench-ublk.XXXXXX)
zone_mb=64 nzones=16 conv=2
seq_off=$((conv * zone_mb))M
pid=
cleanup() {
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

# fio_job DEV RW BS DEPTH EXTRA...: one fio job; prints "MiB/s IOPS mean-us
# p99-us", the latencies from submission to completion.
fio_job() {
	local dev=$1 rw=$2 bs=$3 depth=$4
	shift 4
	if ! fio --output-format=json --lat_percentiles=1 --name=bench --filename="$dev" --direct=1 --ioengine=io_uring \
		--rw="$rw" --bs="$bs" --iodepth="$depth" "$@" >"$work/fio.json" 2>"$work/fio.err"; then
		echo "bench-ublk: fio $rw on $dev failed: $(cat "$work/fio.err" "$work/fio.json")" >&2
		exit 1
	fi
	python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
k = "write" if "write" in sys.argv[1] else "read"
s = j[k]
p99 = s["lat_ns"].get("percentile", {}).get("99.000000", 0)
print("%.1f %.0f %.0f %.0f" % (s["bw"] / 1024, s["iops"], s["lat_ns"]["mean"] / 1000, p99 / 1000))' "$rw" <"$work/fio.json"
}

jobs=(seq-write rand-read qd1-write qd16-write qd1-read qd16-read zone-write)
declare -A result
# run NAME DEV ZBD: every job on DEV; ZBD=1 for a device the kernel knows
# as zoned.
run() {
	local name=$1 dev=$2 zbd=() timed=(--time_based --runtime="$runtime")
	[[ $3 == 1 ]] && zbd=(--zonemode=zbd)
	[[ -b $dev ]] || {
		echo "bench-ublk: $dev is not a block device" >&2
		exit 1
	}
	local conv_area=(--offset=0 --size=$((conv * zone_mb))M)
	local written=(--offset="$seq_off" --size=$((8 * zone_mb))M)
	result[$name,seq-write]=$(fio_job "$dev" write 1m 1 "${zbd[@]}" "${written[@]}")
	result[$name,rand-read]=$(fio_job "$dev" randread 4k 16 "${zbd[@]}" "${written[@]}" "${timed[@]}")
	result[$name,qd1-write]=$(fio_job "$dev" randwrite 4k 1 "${conv_area[@]}" "${timed[@]}")
	result[$name,qd16-write]=$(fio_job "$dev" randwrite 4k 16 "${conv_area[@]}" "${timed[@]}")
	result[$name,qd1-read]=$(fio_job "$dev" randread 4k 1 "${zbd[@]}" "${written[@]}" "${timed[@]}")
	result[$name,qd16-read]=${result[$name,rand-read]}
	# One sequential zone past the written ones, from its start.
	result[$name,zone-write]=$(fio_job "$dev" write 4k 1 "${zbd[@]}" --offset=$(((conv + 8) * zone_mb))M \
		--size=${zone_mb}M "${timed[@]}")
}

# attach BACKEND IMAGE: start zq-csi attach in the background (pid), set
# dev to the device it prints.
attach() {
	"$bin" attach --frontend "$1" "$2" >"$work/dev" 2>"$work/attach.log" &
	pid=$!
	for _ in $(seq 300); do
		[[ -s $work/dev ]] && {
			dev=$(<"$work/dev")
			return
		}
		sleep 0.1
	done
	echo "bench-ublk: attach --frontend $1 printed no device: $(cat "$work/attach.log")" >&2
	exit 1
}

detach() {
	"$bin" detach "$1"
	wait "$pid"
	pid=
	rm -f "$work/dev"
}

devices=(${ZQ_BENCH_DEVICES:-ublk nbd null_blk ublk-null})
for backend in "${devices[@]}"; do
	[[ $backend == null_blk ]] && continue
	if [[ $backend == ublk-null ]]; then
		"$root/bin/ublknull" --size $((nzones * zone_mb << 20)) >"$work/dev" 2>"$work/attach.log" &
		pid=$!
		for _ in $(seq 300); do
			[[ -s $work/dev ]] && break
			sleep 0.1
		done
		dev=$(<"$work/dev")
		run ublk-null "$dev" 0
		kill "$pid"
		wait "$pid" || {
			echo "bench-ublk: ublknull: $(cat "$work/attach.log")" >&2
			exit 1
		}
		pid=
		rm -f "$work/dev"
		continue
	fi
	img=$work/$backend.qcow2
	"$bin" image create -f qcow2 -o "zone.mode=host-managed,zone.size=${zone_mb}M,zone.conventional_zones=$conv,zone.max_open_zones=8,zone.max_active_zones=8" \
		"$img" $((nzones * zone_mb))M >/dev/null
	attach "$backend" "$img"
	run "$backend" "$dev" $([[ $backend == ublk ]] && echo 1 || echo 0)
	detach "$dev"
	rm "$img" # the guest's /tmp is memory
done

if [[ " ${devices[*]} " == *" null_blk "* ]]; then
	# null_blk through configfs, memory-backed, same geometry.
	nb=/sys/kernel/config/nullb/zqbench
	mkdir "$nb"
	echo $((nzones * zone_mb)) >"$nb/size"
	echo 1 >"$nb/memory_backed"
	echo 1 >"$nb/zoned"
	echo "$zone_mb" >"$nb/zone_size"
	echo "$conv" >"$nb/zone_nr_conv"
	echo 8 >"$nb/zone_max_open"
	echo 8 >"$nb/zone_max_active"
	echo 1 >"$nb/power"
	run null_blk /dev/zqbench 1
	echo 0 >"$nb/power"
	rmdir "$nb"
fi

: >"$table"
for name in "${devices[@]}"; do
	for job in "${jobs[@]}"; do
		read -r mibs iops mean p99 <<<"${result[$name,$job]}"
		if [[ $job == seq-write || $job == rand-read ]]; then
			echo "$name $job MiB/s $mibs $mean $p99" >>"$table"
		else
			echo "$name $job IOPS $iops $mean $p99" >>"$table"
		fi
	done
done
python3 - "$table" <<'EOF'
import sys
rows = {}
order = []
for line in open(sys.argv[1]):
    dev, job, unit, value, mean, p99 = line.split()
    rows[dev, job] = (unit, float(value), float(mean), float(p99))
    if job not in order:
        order.append(job)
devs = []
for dev, _ in rows:
    if dev not in devs:
        devs.append(dev)
def ratio(a, b):
    return "%.2f" % (a / b) if b else "-"
head = "%-11s %-5s" % ("job", "unit")
for d in devs:
    head += " %20s" % (d + " (mean/p99 us)")
if "ublk" in devs and "null_blk" in devs:
    head += " %14s" % "ublk/null_blk"
if "ublk" in devs and "nbd" in devs:
    head += " %9s" % "ublk/nbd"
if "ublk-null" in devs and "null_blk" in devs:
    head += " %19s" % "ublk-null/null_blk"
if "ublk" in devs and "ublk-null" in devs:
    head += " %15s" % "ublk/ublk-null"
print(head)
for job in order:
    unit = rows[devs[0], job][0]
    line = "%-11s %-5s" % (job, unit)
    for d in devs:
        _, v, m, p = rows[d, job]
        line += " %7.0f %5.0f/%-6.0f" % (v, m, p)
    if "ublk" in devs and "null_blk" in devs:
        line += " %14s" % ratio(rows["ublk", job][1], rows["null_blk", job][1])
    if "ublk" in devs and "nbd" in devs:
        line += " %9s" % ratio(rows["ublk", job][1], rows["nbd", job][1])
    if "ublk-null" in devs and "null_blk" in devs:
        line += " %19s" % ratio(rows["ublk-null", job][1], rows["null_blk", job][1])
    if "ublk" in devs and "ublk-null" in devs:
        line += " %15s" % ratio(rows["ublk", job][1], rows["ublk-null", job][1])
    print(line)
if "ublk" in devs:
    for depth in ("write", "read"):
        q1, q16 = rows["ublk", "qd1-" + depth][1], rows["ublk", "qd16-" + depth][1]
        print("ublk qd16/qd1 %-5s %s" % (depth, ratio(q16, q1)))
EOF
