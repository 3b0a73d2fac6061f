#!/usr/bin/env bash
# Builds the zq-csi container image from the Dockerfile with the first
# container engine that works (docker, then podman).
#
#   scripts/deploy-image.sh [IMAGE]     (default: ghcr.io/zq-csi/zq-csi:<chart appVersion>)
#
# Where no engine runs (no binary, or a client without a daemon, as on the
# development machines), it says so and exits 0 without building: the image
# is then built by CI or a release machine. ZQ_IMAGE_REQUIRED=1 makes that an
# error instead.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/zq-csi/Chart.yaml)
image=${1:-ghcr.io/zq-csi/zq-csi:$version}

engine=""
for e in docker podman; do
	if command -v "$e" >/dev/null 2>&1 && "$e" info >/dev/null 2>&1; then
		engine=$e
		break
	fi
done
if [ -z "$engine" ]; then
	why="no docker or podman"
	command -v docker >/dev/null 2>&1 && why="docker is only a client here: no Docker engine answers"
	echo "image: NOT BUILT: $why. Build $image where an engine runs:"
	echo "image:   docker build -t $image --build-arg VERSION=$version ."
	if [ "${ZQ_IMAGE_REQUIRED:-0}" = 1 ]; then exit 1; fi
	exit 0
fi
echo "image: building $image with $engine"
DOCKER_BUILDKIT=1 "$engine" build -t "$image" --build-arg VERSION="$version" .
echo "image: built $image"
"$engine" run --rm --entrypoint /usr/local/bin/zq-csi "$image" serve --help >/dev/null
"$engine" run --rm --entrypoint /bin/sh "$image" -c 'command -v mount && command -v umount && command -v modprobe' >/dev/null
echo "image: $image runs zq-csi and has mount, umount and modprobe"
