package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// The kubelet finds a CSI plugin through plugin registration: a unix socket
// in its plugins_registry directory that answers GetInfo with the driver's
// name and the path of its CSI socket as the kubelet sees it, and then hears
// from the kubelet whether the registration took. The node-driver-registrar
// sidecar serves this for plugins that do not; zq-csi serves it itself, so
// that a node runs the plugin without that image (and machines that reach
// no registry can build every image the chart needs).

// supportedVersions are the CSI versions the kubelet may speak to us (it
// takes the highest it knows).
var supportedVersions = []string{"1.0.0"}

// Registration says where to register: Dir is the kubelet's
// plugins_registry directory as this process sees it, Endpoint the path of
// the CSI socket as the kubelet sees it (on the host, e.g.
// /var/lib/kubelet/plugins/zq-csi.io/csi.sock).
type Registration struct {
	Dir      string
	Endpoint string
}

// registrationServer answers the kubelet's registration calls.
type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (r *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.V(2).InfoS("kubelet asked for the plugin's registration", "driver", r.name, "endpoint", r.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: supportedVersions,
	}, nil
}

func (r *registrationServer) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		klog.InfoS("registered with the kubelet", "driver", r.name, "endpoint", r.endpoint)
	} else {
		// The kubelet asks again when it restarts or the socket is
		// recreated; until then no volume of this driver can be staged
		// on this node, so say so loudly.
		klog.ErrorS(errors.New(s.Error), "the kubelet refused the plugin's registration", "driver", r.name, "endpoint", r.endpoint)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// RegistrationSocket is the socket ServeRegistration creates in dir for the
// driver name, named as node-driver-registrar names it.
func RegistrationSocket(dir, name string) string {
	return filepath.Join(dir, name+"-reg.sock")
}

// ServeRegistration registers the plugin with the kubelet (r) and answers
// the kubelet until ctx is done, then removes its socket; the channel gets
// the result then. A directory or socket it cannot use is an error at once,
// so that a misconfigured node fails at start.
func (d *Driver) ServeRegistration(ctx context.Context, r Registration) (<-chan error, error) {
	if r.Dir == "" || !filepath.IsAbs(r.Endpoint) {
		return nil, fmt.Errorf("registration: need the kubelet's registration directory and the absolute path of the CSI socket on the host (got %q, %q)", r.Dir, r.Endpoint)
	}
	if fi, err := os.Stat(r.Dir); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("registration: the kubelet's registration directory %s: not a directory (%v)", r.Dir, err)
	}
	path := RegistrationSocket(r.Dir, d.cfg.Name)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("registration: removing the old socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("registration: %w", err)
	}
	s := grpc.NewServer()
	registerapi.RegisterRegistrationServer(s, &registrationServer{name: d.cfg.Name, endpoint: r.Endpoint})
	done := make(chan error, 1)
	go func() {
		<-ctx.Done()
		s.GracefulStop()
	}()
	go func() {
		err := s.Serve(l)
		os.Remove(path)
		done <- err
	}()
	klog.InfoS("serving the kubelet's plugin registration", "socket", path, "endpoint", r.Endpoint)
	return done, nil
}
