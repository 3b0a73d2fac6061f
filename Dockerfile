# syntax=docker/dockerfile:1
# The zq-csi image: the static zq-csi binary on Debian slim with the tools the
# CSI plugin runs: mount and umount (k8s.io/mount-utils bind-mounts the device
# for NodePublishVolume), blkid, fsck and the zoned filesystems' mkfs (a
# volumeMode Filesystem volume is formatted at its first NodeStageVolume), and
# modprobe (the chart's optional init container that loads ublk_drv and nbd).
# Nothing else is executed at runtime.
#
#   make image                                  (or:)
#   docker build -t ghcr.io/zq-csi/zq-csi:0.1.0 --build-arg VERSION=0.1.0 .

ARG GO_VERSION=1.26
ARG DEBIAN_RELEASE=bookworm

FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/root/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /zq-csi ./cmd/zq-csi

FROM debian:${DEBIAN_RELEASE}-slim
# mount: mount(8)/umount(8); kmod: modprobe; util-linux: blkid, fsck, and
# blkzone, lsblk for debugging a node (kubectl exec ... blkzone report
# /dev/ublkb0); btrfs-progs, f2fs-tools: mkfs.btrfs, mkfs.f2fs, fsck.f2fs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends mount kmod util-linux btrfs-progs f2fs-tools \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /zq-csi /usr/local/bin/zq-csi
ARG VERSION=dev
LABEL org.opencontainers.image.title="zq-csi" \
      org.opencontainers.image.description="CSI driver for host-managed zoned block devices (zoned qcow2, ublk/nbd)" \
      org.opencontainers.image.source="https://github.com/zq-csi/zq-csi" \
      org.opencontainers.image.version="${VERSION}"
ENTRYPOINT ["/usr/local/bin/zq-csi"]
CMD ["serve", "--help"]
