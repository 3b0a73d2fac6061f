// The storage e2e suite's test binary (e2e.test) is built from this
// directory by scripts/kube-tools.sh e2e, inside the wrapper module that
// builds the Kubernetes binaries (the module graph of k8s.io/kubernetes,
// with each staging module replaced by its release): this go.mod only
// keeps the directory out of the test/kube module.
module zq-csi.local/e2esuite

go 1.26
