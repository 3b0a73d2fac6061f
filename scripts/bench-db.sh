#!/usr/bin/env bash
# bench-db.sh -- the database workloads of test/e2e/db-workloads.sh on a
# zq-csi ublk volume and on a memory-backed zoned null_blk of the same
# geometry (the ceiling), in one VM harness guest, with the ratios.
#
#   scripts/bench-db.sh [FS:WORKLOAD...]
#
# With no argument it runs btrfs:rocksdb f2fs:rocksdb btrfs:postgres; name
# some of them to run those only.
# The geometry is the database tests' (1 GiB, 16 MiB zones, 3 of them
# conventional; 8 open/active zones under f2fs, no limit under btrfs, whose
# transactions abort under an active-zone limit on the guest's kernel);
# RocksDB's db_bench on btrfs and on f2fs, PostgreSQL's pgbench on btrfs. Prints one line per workload and device
# and a table of zq-csi/null_blk. Under TCG the absolute numbers are low;
# compare the ratios.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

guest=0
[[ ${1:-} == --guest ]] && guest=1 && shift
runs=("$@")
((${#runs[@]})) || runs=(btrfs:rocksdb f2fs:rocksdb btrfs:postgres)
for run in "${runs[@]}"; do
	case $run in
	btrfs:rocksdb | f2fs:rocksdb | btrfs:postgres) ;;
	*)
		echo "bench-db: unknown run $run (btrfs:rocksdb, f2fs:rocksdb or btrfs:postgres)" >&2
		exit 2
		;;
	esac
done
if ((!guest)); then
	(cd "$root" && go build -o bin/zq-csi ./cmd/zq-csi)
	ZQ_VM_MEM=${ZQ_VM_MEM:-3072} ZQ_VM_TIMEOUT=${ZQ_VM_TIMEOUT:-1800} \
		"$root/test/e2e/vm.sh" -- "$root/scripts/bench-db.sh" --guest "${runs[@]}"
	exit 0
fi

bin=$root/bin/zq-csi
work=$(mktemp -d /tmp/bench-db.XXXXXX)
chmod 755 "$work" # PostgreSQL runs as the user postgres, below it
zone_mb=16 nzones=64 conv=3
pid=
cleanup() {
	mountpoint -q "$work/mnt" && umount "$work/mnt"
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt"
declare -A figures

# measure DEVICE-NAME DEV FS WORKLOAD: mkfs, mount, the workload, umount;
# its figures go to figures[WORKLOAD-FIGURE,DEVICE-NAME].
measure() {
	local name=$1 dev=$2 fs=$3 workload=$4 out line key
	case $fs in
	btrfs) mkfs.btrfs -q -f -m single -d single "$dev" >/dev/null ;;
	f2fs) mkfs.f2fs -q -f -m "$dev" >/dev/null ;;
	esac
	mount -t "$fs" "$dev" "$work/mnt"
	out=$(bash "$root/test/e2e/db-workloads.sh" "$workload" "$work/mnt" 2>&1) || {
		echo "bench-db: $workload on $fs on $name failed:" >&2
		grep '^not ok' <<<"$out" >&2
	}
	umount "$work/mnt"
	grep '^# figure: ' <<<"$out" >"$work/figures"
	while read -r line; do
		set -- $line # "# figure: NAME VALUE UNIT"
		key="$3 on $fs"
		figures[$key,$name]="$4 $5"
		echo "$name: $key: $4 $5"
	done <"$work/figures" # (a file: the guest's /dev has no /dev/fd)
}

# limit FS: the open and active zone limit of the geometry under FS
limit() { if [[ $1 == btrfs ]]; then echo 0; else echo 8; fi; }

# the zq-csi volume: an image of the geometry attached through ublk
on_zqcsi() {
	local img=$work/vol.qcow2 limit
	limit=$(limit "$1")
	"$bin" image create -f qcow2 -o "zone.mode=host-managed,zone.size=${zone_mb}M,zone.conventional_zones=$conv,zone.max_open_zones=$limit,zone.max_active_zones=$limit" \
		"$img" $((nzones * zone_mb))M >/dev/null
	"$bin" attach --frontend ublk "$img" >"$work/dev" 2>"$work/attach.log" &
	pid=$!
	for _ in $(seq 300); do
		[[ -s $work/dev ]] && break
		sleep 0.1
	done
	[[ -s $work/dev ]] || {
		echo "bench-db: zq-csi attach printed no device: $(cat "$work/attach.log")" >&2
		exit 1
	}
	measure zq-csi "$(<"$work/dev")" "$@"
	"$bin" detach "$(<"$work/dev")"
	wait "$pid"
	pid=
	rm -f "$img" "$work/dev"
}

on_nullblk() {
	local nb=/sys/kernel/config/nullb/zqdb
	mkdir "$nb"
	echo $((nzones * zone_mb)) >"$nb/size"
	echo 1 >"$nb/memory_backed"
	echo 4096 >"$nb/blocksize"
	echo 1 >"$nb/zoned"
	echo "$zone_mb" >"$nb/zone_size"
	echo "$conv" >"$nb/zone_nr_conv"
	echo "$(limit "$1")" >"$nb/zone_max_open"
	echo "$(limit "$1")" >"$nb/zone_max_active"
	echo 1 >"$nb/power"
	[[ -b /dev/zqdb ]] || {
		echo "bench-db: no /dev/zqdb after powering the null_blk on" >&2
		exit 1
	}
	measure null_blk /dev/zqdb "$@"
	echo 0 >"$nb/power"
	rmdir "$nb"
}

for run in "${runs[@]}"; do
	on_zqcsi "${run%%:*}" "${run#*:}"
	on_nullblk "${run%%:*}" "${run#*:}"
done

echo "== zq-csi / null_blk (same geometry, same guest)"
printf '%-28s %16s %16s %8s\n' workload zq-csi null_blk ratio
for key in "${!figures[@]}"; do
	[[ $key == *,zq-csi ]] || continue
	key=${key%,zq-csi}
	read -r z unit <<<"${figures[$key,zq-csi]}"
	read -r n _ <<<"${figures[$key,null_blk]:-0 x}"
	printf '%-28s %12s %-3s %12s %-3s %8s\n' "$key" "$z" "$unit" "$n" "$unit" \
		"$(awk -v a="$z" -v b="$n" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
done | sort
