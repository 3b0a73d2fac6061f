#!/usr/bin/env bash
# A short tour of what zq-csi does today: create a 1 GiB qcow2 image, write
# and verify data with `zq-csi io`, inspect and check it with `zq-csi image`,
# and let Debian's qemu-img confirm the image is valid. Then a zoned image:
# writes at the write pointer, a zone append, the zone report, info and
# check.
#
#   bash scripts/tour.sh [path/to/zq-csi]      (make tour builds it first)
set -euo pipefail

zq=${1:-bin/zq-csi}
[ -x "$zq" ] || { echo "demo: $zq not found: run 'make build'" >&2; exit 1; }
zq=$(cd "$(dirname "$zq")" && pwd)/$(basename "$zq")
dir=$(mktemp -d "${TMPDIR:-/tmp}/zq-csi-demo.XXXXXX")
trap 'rm -rf "$dir"' EXIT
cd "$dir"

bold='' plain=''
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; fi
# step shows a command (quoted as you would type it, zq-csi by its name)
# and runs it.
step() {
	local shown=() a
	for a in "$@"; do
		[ "$a" = "$zq" ] && a="zq-csi"
		case $a in *[!A-Za-z0-9._/=,:-]*) a="'$a'" ;; esac
		shown+=("$a")
	done
	printf '\n%s$ %s%s\n' "$bold" "${shown[*]}" "$plain"
	"$@"
}

step "$zq" image create -f qcow2 -o cluster_size=64k,lazy_refcounts=on disk.qcow2 1G
step "$zq" io -c 'write -P 0xab 0 1M' -c 'write -P 0x5a 1000000 4096' -c 'write -z 64M 64M' -c 'flush' disk.qcow2
step "$zq" io -r -c 'read -P 0xab 0 999424' -c 'read -P 0x5a 1000000 4096' -c 'read -v 1000000 32' disk.qcow2
echo
echo "# A wrong pattern is caught, and the exit status says so:"
set +e
step "$zq" io -r -c 'read -P 0x00 0 4096' disk.qcow2
echo "exit status: $?"
set -e
step "$zq" io -r -c map disk.qcow2
step "$zq" image info disk.qcow2
step "$zq" image info --output=json disk.qcow2
step "$zq" image check disk.qcow2
if command -v qemu-img >/dev/null 2>&1; then
	echo
	echo "# The same image through Debian's qemu-img and qemu-io:"
	step qemu-img check disk.qcow2
	step qemu-io -r -f qcow2 -c 'read -P 0x5a 1000000 4096' disk.qcow2
fi

echo
echo "# A zoned image: 1 GiB in 64 MiB zones, the first 2 conventional, at most"
echo "# 6 open and 8 active zones, zone appends up to 256 KiB:"
step "$zq" image create -o zone.mode=host-managed,zone.size=64M,zone.conventional_zones=2,zone.max_open_zones=6,zone.max_active_zones=8,zone.max_append_bytes=256k zoned.qcow2 1G
echo
echo "# Zone 2 starts at 128M: write at its write pointer, append two buffers"
echo "# (-p prints the sector where they landed), finish zone 3, report:"
step "$zq" io -c 'write -P 0xab 128M 64k' -c 'zap -p 128M 4k 4k' -c 'zf 192M 64M' -c 'zrp 0 5' zoned.qcow2
echo
echo "# A write away from the write pointer is refused, as a zoned disk does:"
set +e
step "$zq" io -c 'write -P 0xee 128M 4k' zoned.qcow2
echo "exit status: $?"
set -e
echo
echo "# A new session: only write pointers persist, so zone 2 is closed (zcond:4)"
echo "# now; the data is there and reads past the write pointer return zeros:"
step "$zq" io -r -c 'zrp 128M 2' -c 'read -P 0xab 128M 64k' -c 'read -P 0xcd 131136k 8k' -c 'read -P 0 131144k 1M' zoned.qcow2
step "$zq" image info zoned.qcow2
step "$zq" image check zoned.qcow2
if command -v qemu-img >/dev/null 2>&1; then
	echo
	echo "# QEMU without the zoned format refuses the image by its feature name:"
	set +e
	step qemu-img info zoned.qcow2
	echo "exit status: $?"
	set -e
fi
echo
echo "demo: OK"
