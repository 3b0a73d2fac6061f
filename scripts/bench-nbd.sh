#!/usr/bin/env bash
# bench-nbd.sh: `zq-csi export` against `qemu-nbd --cache=writeback -f qcow2`
# with fio's nbd engine on fresh qcow2 images on the same disk, in the same
# run: sequential 1 MiB write/read and random 4 KiB write/read at iodepth 16.
# Prints each result in MiB/s and the ratio zq-csi/qemu-nbd (1.00: as fast).
# Usage: scripts/bench-nbd.sh [SIZE (default 512M)] [RUNTIME seconds (default 5)]
set -euo pipefail
size=${1:-512M}
runtime=${2:-5}
for tool in fio qemu-nbd qemu-img python3 go; do
	command -v "$tool" >/dev/null || { echo "bench-nbd: $tool not found (make deps)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench-nbd: this fio has no nbd engine" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bench-nbd.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
(cd "$root" && go build -o "$work/zq-csi" ./cmd/zq-csi)

jobs="seq-write:write:1m seq-read:read:1m rand-write:randwrite:4k rand-read:randread:4k"

# serve SERVER IMAGE SOCKET: start the server in the background, set pid.
serve() {
	case $1 in
	zq-csi) "$work/zq-csi" export --socket "$3" "$2" >/dev/null & ;;
	qemu-nbd) qemu-nbd --persistent --shared=0 --cache=writeback --aio=threads -f qcow2 --socket "$3" "$2" & ;;
	esac
	pid=$!
	for _ in $(seq 100); do [ -S "$3" ] && return; sleep 0.05; done
	echo "bench-nbd: $1 did not create $3" >&2; exit 1
}

declare -A mibs
for server in zq-csi qemu-nbd; do
	img="$work/$server.qcow2" sock="$work/$server.sock"
	qemu-img create -q -f qcow2 "$img" "$size"
	serve "$server" "$img" "$sock"
	for j in $jobs; do
		IFS=: read -r name rw bs <<<"$j"
		# The first write job fills the image, so reads read data.
		extra=()
		case $rw in write|read) extra=(--size="$size") ;; *) extra=(--size="$size" --time_based --runtime="$runtime") ;; esac
		out=$(fio --output-format=json --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
			--rw="$rw" --bs="$bs" --iodepth=16 "${extra[@]}" 2>/dev/null)
		mibs[$server,$name]=$(python3 -c '
import json, sys
s = sys.stdin.read()  # the nbd engine prints a line before the JSON
j = json.loads(s[s.index("{"):])["jobs"][0]
k = "write" if "write" in sys.argv[1] else "read"
print("%.1f" % (j[k]["bw"] / 1024))' "$rw" <<<"$out")
	done
	kill -TERM "$pid"; wait "$pid" || true; pid=
done

printf "%-12s %12s %12s %8s\n" workload "zq-csi MiB/s" "qemu-nbd" ratio
for j in $jobs; do
	name=${j%%:*}
	printf "%-12s %12s %12s %8s\n" "$name" "${mibs[zq-csi,$name]}" "${mibs[qemu-nbd,$name]}" \
		"$(python3 -c 'import sys; a,b=map(float,sys.argv[1:]); print("%.2f" % (a/b if b else 0))' "${mibs[zq-csi,$name]}" "${mibs[qemu-nbd,$name]}")"
done
