#!/usr/bin/env bash
# Installs the Debian packages that zq-csi's build, demo and tests need,
# and only those that are missing. Run as root (or with sudo available);
# when everything is present it needs no privileges and changes nothing.
#
#   bash scripts/deps.sh              # what make deps, make demo, make test and .ci/run call
#   ZQ_EXTRA_PKGS="pkg ..." bash scripts/deps.sh   # add packages (e.g. for the VM harness)
set -euo pipefail

# qemu-utils: qemu-img/qemu-io/qemu-nbd (interop tier); libnbd-bin: nbdinfo/nbdcopy;
# fio: workloads; gcc and libc6-dev: cgo, which `go test -race` needs;
# ca-certificates and git: Go module downloads; xz-utils: the QEMU-made
# test vectors (shared/testdata/qemu/*.qcow2.xz).
pkgs=(qemu-utils libnbd-bin fio gcc libc6-dev ca-certificates git xz-utils)
# shellcheck disable=SC2206
pkgs+=(${ZQ_EXTRA_PKGS:-})

if command -v dpkg-query >/dev/null 2>&1; then
	missing=()
	for p in "${pkgs[@]}"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
			missing+=("$p")
		fi
	done
	if ((${#missing[@]})); then
		echo "deps: installing ${missing[*]}"
		sudo=()
		if [ "$(id -u)" -ne 0 ]; then
			if command -v sudo >/dev/null 2>&1; then
				sudo=(sudo)
			else
				echo "deps: missing packages (${missing[*]}) and not root: run 'make deps' as root" >&2
				exit 1
			fi
		fi
		export DEBIAN_FRONTEND=noninteractive
		for try in 1 2 3; do
			if "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null; then
				break
			fi
			if [ "$try" = 3 ]; then
				echo "deps: apt-get failed 3 times" >&2
				exit 1
			fi
			echo "deps: apt-get failed, retrying in 10 s" >&2
			sleep 10
		done
	else
		echo "deps: all packages present (${pkgs[*]})"
	fi
else
	# Not Debian: check the commands instead and say what to install.
	for c in qemu-img qemu-io nbdinfo fio gcc; do
		command -v "$c" >/dev/null 2>&1 || { echo "deps: $c not found: install it (Debian: ${pkgs[*]})" >&2; exit 1; }
	done
fi

# Go is not a Debian package here: Debian's is older than go.mod's version.
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
	want=$(sed -n 's/^go //p' "$(dirname "$0")/../go.mod")
	echo "deps: Go $want or newer is needed (https://go.dev/dl/, installed at /usr/local/go)" >&2
	exit 1
fi
