package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// The kubelet's side of plugin registration, as its plugin watcher does it:
// find the socket, GetInfo, validate, NotifyRegistrationStatus. (The real
// kubelet does the same in the Kubernetes node tier.)
func TestRegistrationAnswersTheKubelet(t *testing.T) {
	e := newTestDriver(t)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const endpoint = "/var/lib/kubelet/plugins/zq-csi.io/csi.sock"
	done, err := e.d.ServeRegistration(ctx, Registration{Dir: dir, Endpoint: endpoint})
	if err != nil {
		t.Fatal(err)
	}
	sock := RegistrationSocket(dir, e.d.cfg.Name)
	if sock != filepath.Join(dir, DefaultName+"-reg.sock") {
		t.Fatalf("socket %s, want <dir>/%s-reg.sock as node-driver-registrar names it", sock, DefaultName)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := registerapi.NewRegistrationClient(conn)
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	info, err := c.GetInfo(cctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != DefaultName || info.Endpoint != endpoint || !slices.Contains(info.SupportedVersions, "1.0.0") {
		t.Fatalf("GetInfo = %+v, want a CSIPlugin %s at %s speaking CSI 1.0.0", info, DefaultName, endpoint)
	}
	for _, ok := range []bool{false, true} {
		if _, err := c.NotifyRegistrationStatus(cctx, &registerapi.RegistrationStatus{PluginRegistered: ok, Error: "test"}); err != nil {
			t.Fatalf("NotifyRegistrationStatus(%v): %v", ok, err)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("registration ended with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("registration did not stop with its context")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind after the stop: %v", err)
	}
}

func TestRegistrationRefusesWhatTheKubeletCouldNotUse(t *testing.T) {
	e := newTestDriver(t)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		r    Registration
		want string
	}{
		{"no directory", Registration{Endpoint: "/var/lib/kubelet/plugins/x/csi.sock"}, "registration directory"},
		{"a relative endpoint", Registration{Dir: t.TempDir(), Endpoint: "csi.sock"}, "absolute path"},
		{"a directory that is a file", Registration{Dir: file, Endpoint: "/csi.sock"}, "not a directory"},
		{"a directory that does not exist", Registration{Dir: filepath.Join(file, "x"), Endpoint: "/csi.sock"}, "not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.d.ServeRegistration(context.Background(), tc.r)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one naming %q", err, tc.want)
			}
		})
	}
}
