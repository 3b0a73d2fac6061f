#!/bin/busybox sh
# shellcheck shell=sh
# PID 1 of the test guest, copied into the initramfs as /init by vm.sh.
# It runs under busybox (the only binary in the initramfs) and:
#   1. loads the modules vm.sh packed into the initramfs (9p, overlay, and
#      ZQ_VM_MODULES: null_blk, nbd, ublk_drv by default),
#   2. mounts the job share (a host temp dir) to learn what to run,
#   3. builds the guest root: the host's / (9p, read-only) under a tmpfs-backed
#      overlay, so host binaries and their libraries run unchanged, plus the
#      repository (and any extra shares) mounted read-write at their host paths,
#   4. makes every other module loadable: the guest kernel's module tree from
#      the vm.sh cache is bound to /lib/modules/<release> for the host's kmod
#      modprobe, which the kernel also uses for on-demand loads (mount -t btrfs),
#   5. runs the command in that root (moved onto / in a mount namespace of its
#      own, see below) with stdout/stderr on their own
#      virtio-serial ports (so the host sees them clean, apart from the
#      kernel console), writes its exit status to the job share and powers off.
# Anything that goes wrong before the command runs is reported on the console
# ("FATAL: ...") and ends in status 125 (or no status at all if the job share
# is not mounted yet), so vm.sh fails loudly.

PATH=/bin
export PATH

# Milestones go to the console with the guest uptime: the context for a
# timeout's console tail, and where the boot time goes.
log() { echo "zq-vm-init: [$(cut -d" " -f1 /proc/uptime)] $*" >/dev/console; }

# busybox here has no mountpoint(1).
is_mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }

# Record the status where vm.sh looks for it, then stop the machine. Called
# exactly once, on every path out of this script.
finish() {
	st=$1
	if is_mounted /job; then
		# The whole kernel log (the console only gets warnings and worse),
		# for vm.sh to show on trouble and ZQ_VM_DMESG to keep.
		dmesg >/job/dmesg 2>&1
		echo "$st" >/job/status.tmp && mv /job/status.tmp /job/status
	fi
	log "exit status $st"
	# Nothing to unmount cleanly: the root's upper layer is a tmpfs and the
	# shares are 9p (writes reach the host as they happen); sync flushes the
	# mmap-written pages of the cache=mmap shares.
	sync
	log "synced, powering off"
	poweroff -f
	# poweroff -f does not return; if it ever does, panic=-1 + -no-reboot ends QEMU.
	exit "$st"
}

die() {
	log "FATAL: $*"
	# The kernel's side of the failure (loglevel=5 keeps info off the console).
	dmesg 2>/dev/null | tail -n 15 >/dev/console
	finish 125
}

/bin/busybox --install -s /bin

mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"
log "init started"

# 9p, overlayfs and the modules the tests need are modules in Debian's kernel:
# vm.sh put their decompressed .ko files (with dependencies and softdeps, in
# load order, each line "file.ko [param=value...]") into /modules.
while read -r ko params; do
	# shellcheck disable=SC2086 # params are split on purpose
	insmod "/modules/$ko" $params || die "insmod $ko $params"
done </modules/order
log "modules loaded"

# msize: 9p's per-message payload; larger than the default, for fewer round
# trips when reading big binaries (go test binaries, fio, mkfs).
P9OPTS=trans=virtio,version=9p2000.L,msize=262144

mkdir -p /job
mount -t 9p -o "$P9OPTS,cache=none" zqjob /job || die "mount job share"
# config defines: ZQ_KREL (guest kernel release), ZQ_MODDIR (host path of its
# module tree), ZQ_SHARES (count), ZQ_SHARE_<i> (host path of share zqshare<i>).
# shellcheck disable=SC1091
. /job/config || die "read /job/config"

# The host root is read-only and cached aggressively (cache=loose): it does
# not change under a test, and exec of host binaries over 9p is the main boot
# cost otherwise. The overlay's upper layer is a tmpfs, so writes outside the
# read-write shares succeed but are thrown away at poweroff.
mkdir -p /lower /rw /newroot
log "config read"
mount -t 9p -o "$P9OPTS,ro,cache=loose" hostroot /lower || die "mount host root"
mount -t tmpfs -o mode=0755 tmpfs /rw || die "mount overlay tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
	die "mount overlay root"

R=/newroot
mount -t proc proc $R/proc || die "mount root /proc"
mount -t sysfs sysfs $R/sys || die "mount root /sys"
mount -t devtmpfs devtmpfs $R/dev || die "mount root /dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts || die "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || die "mount /dev/shm"
# Fresh, empty scratch dirs like on a booted machine (the host's /tmp and /run
# would otherwise show through the overlay).
for d in /tmp /var/tmp; do
	mount -t tmpfs -o mode=1777 tmpfs "$R$d" || die "mount $d"
done
mount -t tmpfs -o mode=0755 tmpfs $R/run || die "mount /run"

# The job share also appears inside the root, where the command script is.
mkdir -p $R/run/zq-vm
mount --bind /job $R/run/zq-vm || die "bind job share"

# Read-write shares: the repository first, then ZQ_VM_SHARES. cache=mmap keeps
# the guest coherent with the host (no caching) while still allowing shared
# writable mmap, which some tools need on their output files.
i=0
while [ "$i" -lt "$ZQ_SHARES" ]; do
	eval "p=\$ZQ_SHARE_$i"
	mkdir -p "$R$p" || die "mkdir $p"
	mount -t 9p -o "$P9OPTS,cache=mmap" "zqshare$i" "$R$p" || die "mount share $p"
	i=$((i + 1))
done

# The guest kernel's modules: bind its tree to the standard place so the
# host's kmod modprobe finds it, both for tests that modprobe and for the
# kernel's own on-demand requests (fs-* aliases on mount, crypto algorithms
# for btrfs). The tree is in the vm.sh cache on the host; take it from /lower,
# the plain host root, as the cache may be under a path the guest covers (/tmp).
mkdir -p "$R/lib/modules/$ZQ_KREL"
mount --bind "/lower$ZQ_MODDIR" "$R/lib/modules/$ZQ_KREL" || die "bind module tree $ZQ_MODDIR"
# The kernel runs its modprobe helper in PID 1's root, which is this
# initramfs, not the chroot: point it at a wrapper that enters the chroot.
printf '#!/bin/sh\nexec chroot %s /sbin/modprobe "$@"\n' "$R" >/bin/zq-modprobe
chmod 0755 /bin/zq-modprobe
echo /bin/zq-modprobe >/proc/sys/kernel/modprobe

# configfs is how null_blk devices are made (loaded with null_blk above, or
# on demand here).
[ -d $R/sys/kernel/config ] || chroot $R /sbin/modprobe configfs || die "modprobe configfs"
mount -t configfs configfs $R/sys/kernel/config || die "mount configfs"
log "root ready"

# virtio-serial ports named by vm.sh; devtmpfs has no udev-style symlinks, so
# look the names up in sysfs.
port() {
	for p in /sys/class/virtio-ports/*; do
		if [ "$(cat "$p/name" 2>/dev/null)" = "$1" ]; then
			echo "/dev/${p##*/}"
			return 0
		fi
	done
	return 1
}
OUT=$(port zq.stdout) || die "no stdout port"
ERR=$(port zq.stderr) || die "no stderr port"

log "running the command"
# From here on a failure is the command's: vm.sh boots again only a guest
# that never got this far.
: >/job/started
# env -i: the command gets only what the job script exports. (busybox's env,
# unshare, mount and chroot: only bash itself has to be loaded over 9p.)
# The root is moved onto / in a mount namespace of the command's own, as
# switch_root would, rather than merely chrooted into: a process that joins
# a mount namespace (setns: runc exec, kubectl exec, the kubelet's exec
# probes, nsenter) gets that namespace's root, which under a bare chroot is
# this initramfs, not the root the command sees. This namespace (PID 1's)
# keeps /job and busybox for finish.
env -i /bin/unshare -m --propagation private /bin/sh -c \
	"cd $R && /bin/mount --move . / && exec /bin/chroot . /bin/bash /run/zq-vm/cmd.sh" \
	<$R/dev/null >"$OUT" 2>"$ERR"
finish $?
