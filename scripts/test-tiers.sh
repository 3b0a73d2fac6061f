#!/usr/bin/env bash
# test-tiers.sh: every test tier of `make test`, one after the other, each
# run even when one before it failed, then a table of tier, result and time.
# Exits 1 when any tier failed, 0 when all passed.
#
#   scripts/test-tiers.sh [TIER...]     (default: every tier, in this order)
#
# A tier is a make target (see the Makefile): vet, unit, crash-default,
# interop, deploy-check, e2e, e2e-k8s. Each prints its own progress as it goes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# name|what it runs|usual time on a quiet 2-core machine (warm; cold)
all=(
	"vet|go vet ./...|~40 s"
	"unit|unit and property tests, fuzz seeds, race detector, long loops sampled|~1.7 min"
	"crash-default|power cuts, process deaths and random-model runs of image/ and zoned/, whole|~1 min"
	"interop|qemu-img, qemu-io, qemu-nbd and libnbd against zq-csi|~15 s"
	"deploy-check|Helm chart and manifests on a real kube-apiserver|~10 s warm; ~10 min cold (tools built once)"
	"e2e|VM harness: ublk and nbd attach, zoned workloads, csi-sanity, Filesystem volumes, databases, a power cut, fio's zoned suite|~14-18 min; a minute or two more cold (kernel, csi-sanity)"
	"e2e-k8s|a Kubernetes node in the VM harness: the chart, PVCs in pods, restarts, the storage e2e suite|~20 min warm; ~30 min cold (node tools, e2e.test)"
)
want=("$@")

selected=()
for t in "${all[@]}"; do
	name=${t%%|*}
	if ((${#want[@]} == 0)) || [[ " ${want[*]} " == *" $name "* ]]; then
		selected+=("$t")
	fi
done
if ((${#selected[@]} == 0)); then
	echo "test-tiers: no tier among: ${want[*]}" >&2
	exit 2
fi

echo "make test: ${#selected[@]} tier(s). Measured on 2 cores (README, Testing): all seven take about 35 minutes"
echo "with warm caches on a quiet machine, and about 50 minutes cold (tools, kernel and modules"
echo "fetched and built)."
names=() results=() times=()
start_all=$SECONDS
i=0
for t in "${selected[@]}"; do
	i=$((i + 1))
	IFS='|' read -r name what usual <<<"$t"
	echo
	echo "== tier $i/${#selected[@]}: $name: $what (usually $usual), started $(date +%H:%M:%S)"
	start=$SECONDS
	if make --no-print-directory "$name"; then
		result=ok
	else
		result=FAILED
	fi
	took=$((SECONDS - start))
	echo "== tier $i/${#selected[@]}: $name: $result in $((took / 60))m$((took % 60))s"
	names+=("$name") results+=("$result") times+=("$took")
done

echo
echo "== make test summary"
printf '%-14s %-7s %8s\n' tier result time
failed=0
for j in "${!names[@]}"; do
	printf '%-14s %-7s %5dm%02ds\n' "${names[$j]}" "${results[$j]}" $((times[j] / 60)) $((times[j] % 60))
	[[ ${results[$j]} == ok ]] || failed=$((failed + 1))
done
total=$((SECONDS - start_all))
printf '%-14s %-7s %5dm%02ds\n' total "$((${#names[@]} - failed))/${#names[@]}" $((total / 60)) $((total % 60))
echo "tiers: $((${#names[@]} - failed)) passed, $failed failed"
((failed == 0))
