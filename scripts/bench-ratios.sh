#!/usr/bin/env bash
# bench-ratios.sh BENCH-OUTPUT: the ratio of each benchmark's subject to
# its peer measured in the same run (qcow2 against raw file I/O, the zoned
# Device against plain image writes, fault injection's modes against none,
# a clone's reads against its source's, a snapshot against qemu-img making
# an overlay),
# from the MB/s columns of `go test
# -bench` output. A ratio of 1.00 means as fast as the peer.
set -euo pipefail
awk '
BEGIN { modes["unmatched-rule"]; modes["volatile-cache"] }
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	n = split(name, part, "/")
	if (n < 2) next
	group = part[1]; for (i = 2; i < n; i++) group = group "/" part[i]
	sub_ = part[n]
	for (i = 1; i <= NF; i++) {
		if ($(i) == "MB/s") speed[group, sub_] = $(i - 1)
		if ($(i) == "ns/op") nsop[group, sub_] = $(i - 1)
	}
	groups[group] = 1
}
END {
	for (g in groups) {
		if ((g, "qcow2") in speed && (g, "raw") in speed)
			printf "%-40s qcow2/raw     %.2f\n", g, speed[g, "qcow2"] / speed[g, "raw"]
		if ((g, "device") in speed && (g, "plain") in speed)
			printf "%-40s device/plain  %.2f\n", g, speed[g, "device"] / speed[g, "plain"]
		if ((g, "clone") in speed && (g, "source") in speed)
			printf "%-40s clone/source  %.2f\n", g, speed[g, "clone"] / speed[g, "source"]
		if ((g, "snapshot") in nsop && (g, "qemu-img-overlay") in nsop)
			printf "%-40s snapshot %.1f ms, restore %.1f ms, clone %.1f ms; qemu-img-overlay/snapshot %.2f\n", g, nsop[g, "snapshot"] / 1e6, nsop[g, "restore"] / 1e6, nsop[g, "clone"] / 1e6, nsop[g, "qemu-img-overlay"] / nsop[g, "snapshot"]
		for (m in modes) if ((g, m) in speed && (g, "none") in speed)
			printf "%-40s %s/none  %.2f\n", g, m, speed[g, m] / speed[g, "none"]
	}
}' "$1" | sort
