#!/usr/bin/env bash
# vm.sh -- run a command as root in a throwaway Linux guest that has the kernel
# features this project needs (ublk, nbd, null_blk with zoned support, btrfs,
# f2fs), which the host kernel may lack or may not let us load.
#
#   test/e2e/vm.sh [--] COMMAND [ARGS...]
#
# The guest is Debian's bookworm-backports kernel booted by QEMU (TCG: no KVM
# needed) with a busybox initramfs. Its root is the host's root filesystem,
# shared read-only over 9p under a throwaway overlay, so every host tool and
# library works unchanged; the repository (and any ZQ_VM_SHARES) is shared
# read-write at the same absolute path, so binaries built on the host run in
# the guest and files the guest writes there show up on the host. COMMAND runs
# as root in the host's current directory (falling back to the repository
# root), with ZQ_VM=1 and the host's ZQ_* variables set. Its stdout and stderr
# are printed as they come, and vm.sh exits with its exit status.
#
# Exit status: the command's, or
#   124  the guest ran longer than ZQ_VM_TIMEOUT seconds and was killed,
#   125  the harness itself failed (setup, boot, guest init).
# In both cases the tail of the guest console is printed to stderr.
#
# Everything comes from Debian packages through apt, set up on first use:
# missing host packages are installed (needs root), the kernel .deb is fetched
# with a private apt configuration (the system's sources are left alone) and
# unpacked into the cache. See README.md for the cache layout and variables.
set -euo pipefail

readonly ZQ_VM_BUILDER_VERSION=1 # bump to force initramfs rebuilds

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Physical path: the guest mounts the share there, and a symlink on the way
# would resolve against the initramfs instead of the guest root.
REPO_DIR=$(cd "$E2E_DIR/../.." && pwd -P)

HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_DIR=${ZQ_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zq-csi-vm}
TIMEOUT=${ZQ_VM_TIMEOUT:-600}
MEM=${ZQ_VM_MEM:-2048}
CPUS=${ZQ_VM_CPUS:-2}
MIRROR=${ZQ_VM_MIRROR:-http://deb.debian.org/debian}
SUITE=${ZQ_VM_SUITE:-bookworm-backports}
# Modules loaded before the command runs (name or name:param=v,param=v).
# null_blk gets nr_devices=0 so tests create exactly the devices they want
# through configfs. Every other module of the guest kernel (btrfs, f2fs,
# zonefs, loop, scsi_debug...) is loadable with modprobe, and the kernel
# loads filesystems by itself on mount; preloading btrfs and f2fs would cost
# every boot about two seconds under TCG.
MODULES=${ZQ_VM_MODULES-null_blk:nr_devices=0 nbd ublk_drv}

# Host packages providing the guest's machinery and the tools tests use in it.
HOST_PACKAGES=(
	qemu-system-x86 # the VM
	busybox-static  # initramfs userland
	cpio            # initramfs packing
	kmod            # depmod on the host, modprobe in the guest
	xz-utils        # .ko.xz decompression for the initramfs
	zstd            # vmlinux extraction from the (zstd) vmlinuz
	util-linux      # blkzone, flock, losetup, ...
	fio             # zonemode=zbd workloads
	btrfs-progs     # mkfs.btrfs (zoned mode)
	f2fs-tools      # mkfs.f2fs (zoned mode)
	qemu-utils      # qemu-img, qemu-io, qemu-nbd
	libnbd-bin      # nbdinfo, nbdcopy
	rocksdb-tools   # db_bench, ldb (the database tests)
	postgresql-15   # postgres, pgbench, pg_amcheck (the database tests)
)
# Extra packages (space-separated) a caller wants on host and so in the guest.
read -r -a EXTRA_PACKAGES <<<"${ZQ_VM_EXTRA_PACKAGES:-}"

log() { echo "zq-vm: $*" >&2; }
die() {
	log "ERROR: $*"
	exit 125
}

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit "$1"
}

# ---------------------------------------------------------------- host setup

ensure_host_packages() {
	local pkgs=("${HOST_PACKAGES[@]}" "${EXTRA_PACKAGES[@]}") missing=() p
	local -A installed=()
	while read -r p; do installed[$p]=1; done < <(
		dpkg-query -W -f='${db:Status-Status} ${Package}\n' "${pkgs[@]}" 2>/dev/null |
			sed -n 's/^installed //p'
	)
	for p in "${pkgs[@]}"; do
		[[ -n ${installed[$p]:-} ]] || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	if ((EUID != 0)); then
		die "missing host packages: ${missing[*]} (run: sudo apt-get install -y --no-install-recommends ${missing[*]})"
	fi
	log "installing host packages: ${missing[*]}"
	# Only the system's configured suites are used here; a failure is fatal.
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
		apt-get update >&2 || die "apt-get update failed"
		apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
			die "apt-get install ${missing[*]} failed"
	fi
}

# apt options for a private apt state under the cache: only $SUITE's index is
# fetched (a few hundred KB) and the system's sources.list is never modified.
APT_DIR=$CACHE_DIR/apt
apt_private() {
	local cmd=$1
	shift
	"$cmd" -o Dir::Etc::SourceList="$APT_DIR/sources.list" \
		-o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$APT_DIR/lists" \
		-o Dir::Cache="$APT_DIR/cache" \
		-o APT::Sandbox::User=root \
		"$@"
}

# Prints the name of the newest -unsigned kernel image package in $SUITE
# (e.g. linux-image-6.12.95+deb12-amd64-unsigned), or $ZQ_VM_KERNEL_PKG.
resolve_kernel_package() {
	mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
	echo "deb $MIRROR $SUITE main" >"$APT_DIR/sources.list"
	apt_private apt-get -qq update >&2 || die "apt-get update of $SUITE failed"
	if [[ -n ${ZQ_VM_KERNEL_PKG:-} ]]; then
		echo "$ZQ_VM_KERNEL_PKG"
		return
	fi
	# The linux-image-amd64 metapackage depends on the current signed image;
	# its -unsigned twin has the same files without the signing wrapper.
	local dep
	dep=$(apt_private apt-cache depends linux-image-amd64 |
		sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
	[[ -n $dep ]] || die "cannot find the kernel package in $SUITE (linux-image-amd64 has no image dependency)"
	echo "$dep-unsigned"
}

# Downloads and unpacks one kernel package into $CACHE_DIR/kernels/<key>,
# atomically: it is built in a temporary directory and renamed into place
# only when complete, so an interrupted setup never leaves a half cache entry.
# Prints the entry's directory.
install_kernel() {
	local pkg=$1 ver krel key dir tmp deb
	ver=$(apt_private apt-cache show --no-all-versions "$pkg" 2>/dev/null |
		sed -n 's/^Version: //p' | head -n1)
	[[ -n $ver ]] || die "kernel package $pkg not found in $SUITE"
	krel=${pkg#linux-image-}
	krel=${krel%-unsigned}
	key="${krel}_${ver}"
	dir=$CACHE_DIR/kernels/$key
	if [[ -f $dir/complete ]]; then
		echo "$dir"
		return
	fi
	log "setting up guest kernel $pkg $ver (first use)"
	rm -rf "$dir"
	tmp=$(mktemp -d "$CACHE_DIR/kernels/.build.XXXXXX")
	(cd "$tmp" && apt_private apt-get -qq download "$pkg=$ver" >&2) ||
		die "apt-get download $pkg=$ver failed"
	deb=$(echo "$tmp"/*.deb)
	[[ -f $deb ]] || die "apt-get download produced no .deb for $pkg"
	dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb failed"
	rm -f "$deb"
	# Debian's postinst would run depmod; we do it on the unpacked tree.
	depmod -b "$tmp/root" "$krel" || die "depmod for $krel failed"
	[[ -f $tmp/root/boot/vmlinuz-$krel ]] || die "$pkg has no /boot/vmlinuz-$krel"
	printf 'ZQ_KREL=%q\nZQ_KVER=%q\nZQ_KPKG=%q\n' "$krel" "$ver" "$pkg" >"$tmp/kernel.env"
	touch "$tmp/complete"
	mv "$tmp" "$dir"
	echo "$dir"
}

# Extracts the uncompressed kernel (vmlinux, an ELF with a PVH entry note)
# from vmlinuz into $1/vmlinux. QEMU starts such a kernel directly in 32-bit
# mode: no firmware boot path and no self-decompression, which under TCG
# saves about half of the boot time (~6.5s -> ~2.5s to a kernel panic).
ensure_vmlinux() {
	local kdir=$1 krel=$2 vmlinuz off tmp
	[[ -s $kdir/vmlinux ]] && return 0
	vmlinuz=$kdir/root/boot/vmlinuz-$krel
	tmp=$kdir/.vmlinux.tmp
	# Debian's x86 kernels are zstd-compressed: find the zstd frame that
	# decompresses to an ELF image (zstd complains about the trailing data
	# after the frame, hence the ignored status).
	while read -r off; do
		tail -c +$((off + 1)) "$vmlinuz" | zstd -dcq >"$tmp" 2>/dev/null || true
		if [[ $(head -c 4 "$tmp" | od -An -c | tr -d ' ') == 177ELF ]]; then
			mv "$tmp" "$kdir/vmlinux"
			return 0
		fi
	done < <(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$vmlinuz" | LC_ALL=C cut -d: -f1)
	rm -f "$tmp"
	die "cannot extract vmlinux from $vmlinuz (no zstd-compressed ELF inside; did Debian change the kernel compression?)"
}

# Builds (or reuses) the initramfs for kernel entry $1: static busybox, our
# init, and decompressed copies of the modules to load at boot: 9p and overlay
# (to mount the root) and $MODULES, each with its dependencies and softdeps.
# Loading them from the initramfs is much faster than modprobe over 9p in the
# guest, which spends seconds in xz under TCG. Its name carries a hash of
# everything that goes into it, so editing vm-init.sh or this function,
# changing ZQ_VM_MODULES or upgrading busybox builds a new one. Prints its path.
build_initramfs() {
	local kdir=$1 krel=$2 hash out tmp ko base m name params
	local early=(9p 9pnet_virtio overlay) names=() mods
	local -A param_of=()
	for m in $MODULES; do
		name=${m%%:*}
		names+=("$name")
		[[ $name != "$m" ]] && param_of[${name//-/_}]=${m#*:}
	done
	hash=$({
		echo "$ZQ_VM_BUILDER_VERSION ${early[*]} $MODULES"
		declare -f build_initramfs # this very code
		cat "$E2E_DIR/vm-init.sh"
		sha256sum </bin/busybox
	} | sha256sum | cut -c1-16)
	out=$kdir/initramfs-$hash.cpio
	if [[ -s $out ]]; then
		touch "$out" # most recently used: see the pruning below
		echo "$out"
		return
	fi
	log "building initramfs for $krel (modules: ${early[*]} ${names[*]})"
	tmp=$(mktemp -d "$kdir/.initramfs.XXXXXX")
	mkdir -p "$tmp/bin" "$tmp/proc" "$tmp/sys" "$tmp/dev" "$tmp/modules"
	cp /bin/busybox "$tmp/bin/busybox"
	ldd "$tmp/bin/busybox" >/dev/null 2>&1 && die "/bin/busybox is not static (install busybox-static)"
	install -m 0755 "$E2E_DIR/vm-init.sh" "$tmp/init"
	# modprobe --show-depends lists "insmod PATH" in load order, dependencies
	# and softdeps first; decompress each module once, keep that order for the
	# guest, and append the parameters given in ZQ_VM_MODULES.
	for name in "${early[@]}" "${names[@]}"; do
		modprobe -d "$kdir/root" -S "$krel" --show-depends "$name" >/dev/null 2>&1 ||
			die "kernel $krel has no module $name (ZQ_VM_MODULES)"
	done
	mods=$(modprobe -d "$kdir/root" -S "$krel" --show-depends -a "${early[@]}" "${names[@]}" |
		awk '$1 == "insmod" { print $2 }') || die "cannot resolve modules: ${early[*]} ${names[*]}"
	: >"$tmp/modules/order"
	for ko in $mods; do
		base=$(basename "$ko" .xz)
		[[ -e $tmp/modules/$base ]] && continue
		case $ko in
		*.xz) xz -dc "$ko" >"$tmp/modules/$base" ;;
		*) cp "$ko" "$tmp/modules/$base" ;;
		esac
		name=${base%.ko}
		params=${param_of[${name//-/_}]:-}
		echo "$base ${params//,/ }" >>"$tmp/modules/order"
	done
	(cd "$tmp" && find . | cpio -o -H newc -R 0:0 --quiet) >"$tmp.cpio" ||
		die "cpio failed"
	rm -rf "$tmp"
	mv "$tmp.cpio" "$out"
	# Keep the few most recently used builds (ZQ_VM_MODULES variants).
	find "$kdir" -maxdepth 1 -name 'initramfs-*.cpio' -printf '%T@ %p\n' |
		sort -rn | tail -n +7 | cut -d' ' -f2- | xargs -r rm -f
	echo "$out"
}

# Everything above, under a lock so concurrent first uses do not race.
# Sets KDIR, KREL, INITRD.
setup() {
	mkdir -p "$CACHE_DIR/kernels"
	exec 9>"$CACHE_DIR/.lock"
	flock 9
	ensure_host_packages
	# Leftovers of interrupted builds.
	rm -rf "$CACHE_DIR"/kernels/.build.* "$CACHE_DIR"/kernels/*/.initramfs.*

	# The kernel in use is remembered by the "current" link so warm runs do
	# not touch the network; ZQ_VM_REFRESH=1 (or ZQ_VM_KERNEL_PKG) asks apt
	# again and moves to a newer kernel when there is one.
	# A damaged entry (files removed behind our back) is rebuilt once.
	local pkg try
	for try in 1 2; do
		KDIR=
		if [[ -z ${ZQ_VM_KERNEL_PKG:-} && ${ZQ_VM_REFRESH:-0} != 1 && -f $CACHE_DIR/current/complete ]]; then
			KDIR=$(readlink -f "$CACHE_DIR/current")
		else
			pkg=$(resolve_kernel_package)
			KDIR=$(install_kernel "$pkg")
			ln -sfn "kernels/$(basename "$KDIR")" "$CACHE_DIR/current"
		fi
		KREL=
		# shellcheck disable=SC1091
		[[ -f $KDIR/kernel.env ]] && . "$KDIR/kernel.env" && KREL=$ZQ_KREL
		if [[ -n $KREL && -f $KDIR/root/boot/vmlinuz-$KREL &&
			-f $KDIR/root/lib/modules/$KREL/modules.dep ]]; then
			break
		fi
		((try == 1)) || die "cache entry $KDIR is still damaged after a rebuild"
		log "cache entry $KDIR is damaged: rebuilding it"
		rm -rf "$KDIR"
	done
	ensure_vmlinux "$KDIR" "$KREL"
	INITRD=$(build_initramfs "$KDIR" "$KREL")
	exec 9>&-
}

# ---------------------------------------------------------------- the run
# All of it in a function, so bash has read the whole script before running
# any of it: editing vm.sh while a guest runs cannot derail that run.
main() {
	[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
	[[ ${1:-} == -- ]] && shift
	(($# > 0)) || usage 125
	[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "ZQ_VM_TIMEOUT must be a number of seconds"

	setup

	JOB=$(mktemp -d "${TMPDIR:-/tmp}/zq-vm.XXXXXX")
	QEMU_PID=
	# shellcheck disable=SC2317 # called by the EXIT trap
	cleanup() {
		if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
			kill "$QEMU_PID" 2>/dev/null || true
		fi
		if [[ -n ${ZQ_VM_CONSOLE_LOG:-} && -f $JOB/console.log ]]; then
			cp "$JOB/console.log" "$ZQ_VM_CONSOLE_LOG" || true
		fi
		if [[ -n ${ZQ_VM_DMESG:-} && -f $JOB/dmesg ]]; then
			cp "$JOB/dmesg" "$ZQ_VM_DMESG" || true
		fi
		if [[ ${ZQ_VM_KEEP:-0} == 1 ]]; then
			log "job directory kept: $JOB"
		else
			rm -rf "$JOB"
		fi
	}
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	# Read-write shares: the repository, then ZQ_VM_SHARES (colon-separated).
	SHARES=("$REPO_DIR")
	if [[ -n ${ZQ_VM_SHARES:-} ]]; then
		IFS=: read -r -a extra <<<"$ZQ_VM_SHARES"
		for s in "${extra[@]}"; do
			[[ -n $s ]] || continue
			[[ -d $s ]] || die "ZQ_VM_SHARES: $s is not a directory"
			SHARES+=("$(cd "$s" && pwd -P)")
		done
	fi

	# The guest init reads this (busybox sh: keep to plain assignments).
	{
		printf 'ZQ_KREL=%q\n' "$KREL"
		printf 'ZQ_MODDIR=%q\n' "$KDIR/root/lib/modules/$KREL"
		printf 'ZQ_SHARES=%d\n' "${#SHARES[@]}"
		for i in "${!SHARES[@]}"; do
			printf 'ZQ_SHARE_%d=%q\n' "$i" "${SHARES[$i]}"
		done
	} >"$JOB/config"

	# The command script (run by the host's bash inside the guest under env -i).
	{
		echo '# generated by vm.sh'
		printf 'export PATH=%q\n' "/usr/local/sbin:/usr/sbin:/sbin:${PATH}"
		echo 'export HOME=/root TERM=dumb ZQ_VM=1'
		for v in LANG LC_ALL TZ $(compgen -e | grep '^ZQ_' || true) ${ZQ_VM_ENV:-}; do
			[[ $v == ZQ_VM ]] && continue
			[[ -n ${!v+set} ]] && printf 'export %s=%q\n' "$v" "${!v}"
		done
		# Same working directory as on the host when the guest has it (the
		# guest's /tmp, /run and /var/tmp are fresh tmpfs, not the host's).
		printf 'cd -- %q 2>/dev/null || { echo "zq-vm: %s: not in the guest, running in %s" >&2; cd -- %q; }\n' \
			"$PWD" "$PWD" "$REPO_DIR" "$REPO_DIR"
		printf 'exec'
		printf ' %q' "$@"
		printf '\n'
	} >"$JOB/cmd.sh"

	# shellcheck disable=SC2054 # the commas belong to QEMU options
	qemu=(
		qemu-system-x86_64
		-nodefaults -no-user-config -display none
		-machine "${ZQ_VM_MACHINE:-pc}" -accel "${ZQ_VM_ACCEL:-tcg,thread=multi}" -cpu max
		-smp "$CPUS" -m "$MEM" -no-reboot
		-kernel "$KDIR/vmlinux" -initrd "$INITRD"
		# loglevel=5: warnings and worse on the console (the full log is saved
		# from the guest's dmesg at the end); more would slow the boot, the serial
		# console being synchronous. panic=-1 with -no-reboot turns a guest panic
		# (oops=panic: also an oops) into a prompt QEMU exit. mitigations=off:
		# a throwaway test guest, no need to pay for them under emulation.
		-append "console=ttyS0 loglevel=5 panic=-1 oops=panic tsc=reliable no_timer_check mitigations=off ${ZQ_VM_APPEND:-}"
		-serial "file:$JOB/console.log"
		-device virtio-serial-pci
		# append=on: vm.sh is already following these files, do not truncate.
		-chardev "file,id=zqout,path=$JOB/stdout,append=on"
		-device virtserialport,chardev=zqout,name=zq.stdout
		-chardev "file,id=zqerr,path=$JOB/stderr,append=on"
		-device virtserialport,chardev=zqerr,name=zq.stderr
		# The host root, read-only. multidevs=remap keeps inode numbers unique
		# across the host's mounts (the overlay on top needs that).
		-fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
		-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
		-fsdev "local,id=zqjob,path=$JOB,security_model=none"
		-device virtio-9p-pci,fsdev=zqjob,mount_tag=zqjob
	)
	for i in "${!SHARES[@]}"; do
		qemu+=(-fsdev "local,id=zqshare$i,path=${SHARES[$i]},security_model=none,multidevs=remap"
			-device "virtio-9p-pci,fsdev=zqshare$i,mount_tag=zqshare$i")
	done

	console_tail() {
		log "---- last ${1} lines of the guest console ----"
		tail -n "$1" "$JOB/console.log" | sed 's/^/console: /' >&2
		if [[ -s $JOB/qemu.log ]]; then
			log "---- qemu output ----"
			cat "$JOB/qemu.log" >&2
		fi
	}

	# A guest that dies before the command starts (an emulation fault at
	# boot, seen about once in a hundred boots under TCG) is booted once
	# more: the command never ran, so nothing is hidden. A failure once the
	# command has started (the guest wrote "started"), or one the init
	# reported itself (FATAL: a bad module or share), is final.
	for attempt in 1 2; do
		rm -f "$JOB/started" "$JOB/status" "$JOB/dmesg"
		: >"$JOB/stdout"
		: >"$JOB/stderr"
		: >"$JOB/console.log"
		START=$EPOCHREALTIME
		# timeout(1) kills a hung guest; it exits 124 when it had to.
		timeout --kill-after=10 "$TIMEOUT" "${qemu[@]}" </dev/null >"$JOB/qemu.log" 2>&1 &
		QEMU_PID=$!

		# Stream the command's output while the guest runs; tail exits once
		# QEMU has and the files are drained.
		tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$JOB/stdout" &
		T1=$!
		tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$JOB/stderr" >&2 &
		T2=$!
		if [[ ${ZQ_VM_DEBUG:-0} == 1 ]]; then
			tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$JOB/console.log" | sed 's/^/console: /' >&2 &
		fi

		rc=0
		wait "$QEMU_PID" || rc=$?
		QEMU_PID=
		QEMU_END=$EPOCHREALTIME
		wait "$T1" "$T2" || true

		if ((rc == 124 || rc == 137)); then
			log "TIMEOUT: guest still running after ${TIMEOUT}s (ZQ_VM_TIMEOUT), killed"
			console_tail 60
			exit 124
		fi
		failure='' fatal=''
		if grep -qE '^zq-vm-init: \[[0-9. ]*\] FATAL' "$JOB/console.log"; then
			fatal=1 # the init's own verdict on the setup: booting again changes nothing
		fi
		if ((rc != 0)); then
			failure="qemu failed with status $rc"
		elif [[ ! -s $JOB/status ]]; then
			failure="guest did not report an exit status (boot or init failure)"
		elif [[ -n $fatal ]]; then
			failure="guest init failed"
		fi
		[[ -z $failure ]] && break
		log "$failure"
		console_tail 60
		if ((attempt == 1)) && [[ ! -e $JOB/started && -z $fatal ]]; then
			log "the guest failed before the command started: booting it once more"
			continue
		fi
		exit 125
	done
	status=$(<"$JOB/status")
	[[ $status =~ ^[0-9]+$ ]] || die "bad status from guest: $status"
	# Kernel trouble (a WARN splat, a hung task...) is worth seeing even when the
	# command passed; it does not change the exit status.
	if [[ -f $JOB/dmesg ]] && grep -qE '(BUG:|Oops|WARNING:|Call Trace:|INFO: task .* blocked)' "$JOB/dmesg"; then
		log "the guest kernel logged a problem (ZQ_VM_DMESG=FILE keeps the whole log):"
		grep -E -A25 '(BUG:|Oops|WARNING:|INFO: task .* blocked)' "$JOB/dmesg" | head -n 80 | sed 's/^/dmesg: /' >&2
	fi
	if [[ ${ZQ_VM_DEBUG:-0} == 1 ]]; then
		log "$(awk -v a="$START" -v q="$QEMU_END" -v b="$EPOCHREALTIME" 'BEGIN { printf "qemu ran %.2fs, output drained %.2fs later", q - a, b - q }')"
	fi
	exit "$status"
}

main "$@"
