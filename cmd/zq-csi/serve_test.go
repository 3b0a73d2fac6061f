package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/zq-csi/zq-csi/driver"
)

// waitFor polls until path exists.
func waitFor(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Fatalf("%s did not appear", path)
}

// A node plugin started as the chart starts it registers with the kubelet
// and answers the liveness probe; SIGTERM ends both and removes the
// registration socket.
func TestServeRegistersWithTheKubeletAndAnswersProbes(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	regDir := filepath.Join(dir, "plugins_registry")
	if err := os.Mkdir(regDir, 0o750); err != nil {
		t.Fatal(err)
	}
	const kubeletPath = "/var/lib/kubelet/plugins/zq-csi.io/csi.sock"
	var stderr bytes.Buffer
	exited := make(chan int, 1)
	go func() {
		exited <- run(&env{stdin: strings.NewReader(""), stdout: &bytes.Buffer{}, stderr: &stderr}, []string{"serve",
			"--endpoint", "unix://" + sock, "--node-id", "node-a", "--pool", filepath.Join(dir, "pool"),
			"--state-dir", filepath.Join(dir, "state"), "--kubelet-registration-path", kubeletPath, "--registration-dir", regDir})
	}()
	reg := driver.RegistrationSocket(regDir, driver.DefaultName)
	waitFor(t, sock)
	waitFor(t, reg)

	if stdout, stderr, code := cli(t, "", "probe", "--endpoint", "unix://"+sock); code != exitOK || stdout != "ready\n" {
		t.Fatalf("probe of a running plugin: exit %d, %q, %s", code, stdout, stderr)
	}
	conn, err := grpc.NewClient("unix://"+reg, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil || info.Name != driver.DefaultName || info.Endpoint != kubeletPath {
		t.Fatalf("GetInfo = %+v, %v; want %s at %s", info, err, driver.DefaultName, kubeletPath)
	}

	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-exited:
		if code != exitOK {
			t.Fatalf("serve exited %d after SIGTERM: %s", code, stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
	if _, err := os.Stat(reg); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("registration socket left behind: %v", err)
	}
	if _, stderr, code := cli(t, "", "probe", "--endpoint", "unix://"+sock, "--timeout", "2s"); code != exitFailure || !strings.Contains(stderr, sock) {
		t.Fatalf("probe of a stopped plugin: exit %d, %s", code, stderr)
	}
}

func TestServeRefusesRegistrationItCannotDo(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"a controller registers no node", []string{"--mode", "controller", "--kubelet-registration-path", "/var/lib/kubelet/plugins/x/csi.sock"}, exitUsage, "--mode controller"},
		{"a relative kubelet path", []string{"--kubelet-registration-path", "csi.sock"}, exitUsage, "absolute path"},
		{"a controller has no containers for NRI", []string{"--mode", "controller", "--nri-socket", "/var/run/nri/nri.sock"}, exitUsage, "--nri-socket: containers run on nodes"},
		{"a registration directory that is not there", []string{"--kubelet-registration-path", "/k/csi.sock", "--registration-dir", filepath.Join(dir, "none")}, exitFailure, "not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve", "--endpoint", "unix://" + filepath.Join(dir, tc.name+".sock"), "--node-id", "n",
				"--pool", filepath.Join(dir, "pool"), "--state-dir", filepath.Join(dir, "state")}, tc.args...)
			if _, stderr, code := cli(t, "", args...); code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, %s; want %d naming %q", code, stderr, tc.code, tc.want)
			}
		})
	}
}
