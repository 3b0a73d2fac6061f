// Test infrastructure for a Kubernetes node in the VM harness: a module of
// its own, so that what it needs (go-containerregistry) stays out of the
// driver's dependencies.
module github.com/zq-csi/zq-csi/test/kube

go 1.26

require github.com/google/go-containerregistry v0.22.1

require (
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
)
