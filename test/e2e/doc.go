// Package e2e holds the project's end-to-end and kernel-level tests and the VM
// harness that runs them (vm.sh, vm-go-test.sh, run-vm-tests.sh; see
// README.md). Its tests carry the vmtest build tag: plain `go test ./...` on
// the host compiles none of them, and test/e2e/vm-go-test.sh runs them inside
// the guest kernel.
package e2e
