// Package driver is the zq-csi CSI plugin: the Identity, Controller and
// Node services of the CSI spec (v1) over gRPC on a unix socket.
//
// The controller keeps volumes as zoned qcow2 images in a node-local pool
// directory (one image and one metadata file per volume), created from
// StorageClass parameters that are qemu-img's option names (see
// ParseParameters); every volume is accessible from its node only
// (topology key TopologyKey), which is what external-provisioner's
// node-deployment mode and WaitForFirstConsumer expect.
//
// The node service serves each staged volume from this process: it opens
// the image and attaches it to the kernel through ublk (a host-managed
// zoned block device) or nbd, then bind-mounts the device node at each
// publish target (volumeMode: Block). What is staged is recorded under the
// state directory, so that a restarted plugin takes its devices back
// (ublk user recovery, nbd reconnect) without the pods' I/O failing.
package driver
