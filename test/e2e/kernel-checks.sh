#!/usr/bin/env bash
# kernel-checks.sh -- proves the guest kernel and the host tools in it can do
# what the project's kernel tests need. Runs INSIDE the guest:
#
#   test/e2e/vm.sh -- test/e2e/kernel-checks.sh [SECTION...]
#
# SECTION is devices, nullblk (blkzone, fio and btrfs on a zoned null_blk) or
# f2fs; all of them by default.
#
# Every check asserts an exact outcome (a sysfs value, a zone count, a zone
# condition, an fstype), so a kernel or tool that behaves differently fails
# here instead of passing silently. Ends with "N passed, N failed" and exits
# non-zero if anything failed.
set -euo pipefail

if [[ ${ZQ_VM:-} != 1 ]]; then
	echo "kernel-checks.sh runs inside the test VM: test/e2e/vm.sh -- $0" >&2
	exit 2
fi

# shellcheck source=tap.sh
. "$(dirname "${BASH_SOURCE[0]}")/tap.sh"

NULLB=/sys/kernel/config/nullb
ZONE_MB=64
NR_ZONES=16

# make_zoned NAME CONVENTIONAL_ZONES ZONE_MB NR_ZONES: a memory-backed
# host-managed null_blk device (4 KiB blocks); prints its /dev path.
make_zoned() {
	local d=$NULLB/$1
	mkdir "$d"
	echo 1 >"$d/memory_backed"
	echo 4096 >"$d/blocksize"
	echo $(($3 * $4)) >"$d/size" # MiB
	echo 1 >"$d/zoned"
	echo "$3" >"$d/zone_size" # MiB
	echo "$2" >"$d/zone_nr_conv"
	echo 1 >"$d/power"
	# Since Linux 6.x the disk is named after the configfs item; older
	# kernels call it nullb<index>.
	local dev=/dev/$1
	[[ -b $dev ]] || dev=/dev/nullb$(<"$d/index")
	[[ -b $dev ]] || {
		echo "null_blk $1 powered on but no block device appeared" >&2
		return 1
	}
	echo "$dev"
}
# count_cond DEV COND: zones of DEV in condition COND (em, oi, fu, nw, ...),
# from util-linux's "zcond:14(fu)" / "zcond: 1(em)" report format.
count_cond() {
	blkzone report "$1" | grep -cE "zcond: *[0-9]+\($2\)" || true
}
remove_zoned() {
	echo 0 >"$NULLB/$1/power"
	rmdir "$NULLB/$1"
}

check_devices() {
	if [[ -c /dev/ublk-control ]]; then ok "/dev/ublk-control is a character device"; else not_ok "/dev/ublk-control missing"; fi
	if [[ -b /dev/nbd0 ]]; then ok "/dev/nbd0 is a block device"; else not_ok "/dev/nbd0 missing"; fi
	expect "ublk_drv module loaded" yes "$([[ -d /sys/module/ublk_drv ]] && echo yes || echo no)"
	expect "nbd devices (nbds_max)" 16 "$(find /sys/block -maxdepth 1 -name 'nbd*' | wc -l)"
}

# A zoned null_blk: sysfs, blkzone, fio zonemode=zbd, then btrfs zoned mode.
check_nullblk() {
	local dev name report fio_out fio_rc mnt sum1
	if ! dev=$(make_zoned zqcheck 0 "$ZONE_MB" "$NR_ZONES"); then
		not_ok "create a zoned null_blk through configfs"
		return
	fi
	name=${dev#/dev/}
	echo "# $dev: $NR_ZONES x ${ZONE_MB}MiB zones"
	expect "$name queue/zoned" host-managed "$(<"/sys/block/$name/queue/zoned")"
	expect "$name queue/nr_zones" "$NR_ZONES" "$(<"/sys/block/$name/queue/nr_zones")"
	expect "$name queue/chunk_sectors" $((ZONE_MB * 2048)) "$(<"/sys/block/$name/queue/chunk_sectors")"

	report=$(blkzone report "$dev")
	expect "blkzone report: zone count" "$NR_ZONES" "$(grep -c 'start:' <<<"$report")"
	expect "blkzone report: empty sequential-write-required zones" "$NR_ZONES" \
		"$(grep -c 'cond: 1(em) \[type: 2(SEQ_WRITE_REQUIRED)\]' <<<"$report")"
	expect "blkzone report: last zone start" "0x$(printf '%09x' $(((NR_ZONES - 1) * ZONE_MB * 2048)))" \
		"$(tail -n1 <<<"$report" | sed -n 's/^ *start: \(0x[0-9a-f]*\),.*/\1/p')"

	# fio zonemode=zbd: a verified sequential write over 4 zones. The verify
	# phase reads everything back, so a good run reports the same amount
	# written and read, and leaves exactly 4 zones full.
	fio_out=$(fio --name=zbdseq --filename="$dev" --zonemode=zbd --direct=1 \
		--ioengine=psync --rw=write --bs=256k --size=$((4 * ZONE_MB))M \
		--verify=crc32c --do_verify=1 2>&1) && fio_rc=0 || fio_rc=$?
	expect "fio zbd write+verify exit status" 0 "$fio_rc"
	expect "fio job error" "err= 0" "$(grep -o 'err= *[0-9]*' <<<"$fio_out" | head -n1)"
	expect "fio bytes written" "io=$((4 * ZONE_MB))MiB" "$(sed -n 's/^ *WRITE: .*\(io=[0-9.]*[KMG]iB\).*/\1/p' <<<"$fio_out")"
	expect "fio bytes read back by verify" "io=$((4 * ZONE_MB))MiB" "$(sed -n 's/^ *READ: .*\(io=[0-9.]*[KMG]iB\).*/\1/p' <<<"$fio_out")"
	# shellcheck disable=SC2001 # prefixing every line
	((fio_rc == 0)) || sed 's/^/# fio: /' <<<"$fio_out"
	expect "zones full after fio" 4 "$(count_cond "$dev" fu)"
	expect "zones still empty after fio" $((NR_ZONES - 4)) "$(count_cond "$dev" em)"
	blkzone reset "$dev"
	expect "zones empty after blkzone reset" "$NR_ZONES" "$(count_cond "$dev" em)"

	# btrfs zoned mode (the module is loaded on demand by mount).
	mnt=$(mktemp -d)
	if mkfs.btrfs -q -f -m single -d single "$dev" >/tmp/mkfs.btrfs.log 2>&1; then
		ok "mkfs.btrfs on $dev"
	else
		not_ok "mkfs.btrfs on $dev: $(cat /tmp/mkfs.btrfs.log)"
	fi
	if mount -t btrfs "$dev" "$mnt"; then
		ok "mount btrfs"
		expect "btrfs fstype" btrfs "$(findmnt -n -o FSTYPE "$mnt")"
		# The kernel says so when it mounts a filesystem in zoned mode.
		expect "btrfs zoned mode" "zoned mode enabled with zone size $((ZONE_MB << 20))" \
			"$(dmesg | grep -o "BTRFS info (device $name): zoned mode enabled with zone size [0-9]*" | tail -n1 | sed 's/.*: //')"
		head -c 8M /dev/urandom >"$mnt/data"
		sum1=$(sha256sum <"$mnt/data")
		umount "$mnt"
		mount -t btrfs "$dev" "$mnt"
		expect "btrfs data survives remount" "$sum1" "$(sha256sum <"$mnt/data")"
		expect "btrfs wrote into sequential zones" yes "$( (($(count_cond "$dev" em) < NR_ZONES)) && echo yes || echo no)"
		umount "$mnt"
	else
		not_ok "mount btrfs on $dev: $(dmesg | tail -n 5)"
	fi
	rmdir "$mnt"
	remove_zoned zqcheck
}

# f2fs zoned mode: f2fs keeps its metadata in conventional zones and wants
# many sections (one per zone): 4 conventional + 124 sequential 8 MiB zones.
check_f2fs() {
	local dev mnt sum1
	if ! dev=$(make_zoned zqf2fs 4 8 128); then
		not_ok "create a zoned null_blk through configfs"
		return
	fi
	mnt=$(mktemp -d)
	if mkfs.f2fs -f -m "$dev" >/tmp/mkfs.f2fs.log 2>&1; then
		ok "mkfs.f2fs -m on $dev"
	else
		not_ok "mkfs.f2fs -m on $dev: $(tail -n 5 /tmp/mkfs.f2fs.log)"
	fi
	if mount -t f2fs "$dev" "$mnt"; then
		ok "mount f2fs"
		expect "f2fs fstype" f2fs "$(findmnt -n -o FSTYPE "$mnt")"
		head -c 8M /dev/urandom >"$mnt/data"
		sum1=$(sha256sum <"$mnt/data")
		umount "$mnt"
		mount -t f2fs "$dev" "$mnt"
		expect "f2fs data survives remount" "$sum1" "$(sha256sum <"$mnt/data")"
		expect "f2fs wrote into sequential zones" yes "$( (($(count_cond "$dev" em) < 124)) && echo yes || echo no)"
		umount "$mnt"
	else
		not_ok "mount f2fs on $dev: $(dmesg | tail -n 5)"
	fi
	rmdir "$mnt"
	remove_zoned zqf2fs
}

echo "# kernel $(uname -r)"
sections=("$@")
((${#sections[@]} > 0)) || sections=(devices nullblk f2fs)
for s in "${sections[@]}"; do
	case $s in
	devices | nullblk | f2fs) "check_$s" ;;
	*)
		echo "unknown section $s (devices, nullblk, f2fs)" >&2
		exit 2
		;;
	esac
done

echo "$PASS passed, $FAIL failed"
((FAIL == 0))
