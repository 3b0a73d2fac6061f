package driver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/faultctl"
)

// FaultsAnnotation on a PersistentVolumeClaim holds the faults (faultctl's
// syntax, joined with ";") its namespace wants in force on the claim's
// volume: the node plugin reads it while the volume is staged and applies
// every change, replacing the faults it applied from it before. Whoever
// may patch the claim (its namespace's RBAC) may fault its volume, and no
// other.
const FaultsAnnotation = "zq-csi.io/faults"

// The keys external-provisioner (--extra-create-metadata) adds to
// CreateVolume's parameters: the claim a volume was made for.
const (
	paramClaimNamespace = "csi.storage.k8s.io/pvc/namespace"
	paramClaimName      = "csi.storage.k8s.io/pvc/name"
)

// ClaimReader reads a PersistentVolumeClaim's annotations.
type ClaimReader interface {
	Annotations(ctx context.Context, namespace, name string) (map[string]string, error)
}

// DefaultClaimPoll is how often the node plugin reads its volumes' claims.
const DefaultClaimPoll = 5 * time.Second

// Faults is the node service's fault server (nil without one), for the
// control socket.
func (d *Driver) Faults() *faultctl.Server {
	if d.node == nil {
		return nil
	}
	return d.node.faults
}

// armFaults readies a staged volume's faults before it serves: the
// volatile cache its class asks for, its registration with the fault
// server, and its class's faults.
func (d *Driver) armFaults(v *stagedVolume) error {
	if v.Volatile {
		if err := v.vol.SetVolatileCache(); err != nil {
			return fmt.Errorf("%s=%s: %w", ParamCache, CacheVolatile, err)
		}
	}
	if v.vol.Zones() == nil {
		return nil
	}
	if err := d.node.faults.Add(v.ID, v.vol); err != nil {
		return err
	}
	specs, err := faultctl.ParseList(v.Faults)
	if err == nil {
		_, err = d.node.faults.Apply(v.ID, faultctl.FromClass, specs)
	}
	if err != nil {
		d.node.faults.Remove(v.ID)
		return fmt.Errorf("%s: %w", ParamFaults, err)
	}
	v.annotation = ""
	return nil
}

// watchClaims applies the faults of the staged volumes' claims' annotations
// every poll, until ctx is done.
func (d *Driver) watchClaims(ctx context.Context, claims ClaimReader, poll time.Duration) {
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.node.mu.Lock()
		var vols []*stagedVolume
		for _, v := range d.node.volumes {
			if v.Claim != "" {
				vols = append(vols, v)
			}
		}
		d.node.mu.Unlock()
		for _, v := range vols {
			d.syncClaimFaults(ctx, claims, v)
		}
	}
}

// syncClaimFaults applies the faults annotation of v's claim if it changed.
func (d *Driver) syncClaimFaults(ctx context.Context, claims ClaimReader, v *stagedVolume) {
	ns, name, _ := strings.Cut(v.Claim, "/")
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ann, err := claims.Annotations(ctx, ns, name)
	if err != nil {
		klog.V(2).InfoS("reading the claim's annotations", "volume", v.ID, "claim", v.Claim, "err", err)
		return
	}
	text := ann[FaultsAnnotation]
	defer d.lock(v.ID)()
	if d.node.get(v.ID) != v || v.vol == nil || text == v.annotation {
		return
	}
	specs, err := faultctl.ParseList(text)
	if err == nil {
		err = d.node.faults.Replace(v.ID, faultctl.FromAnnotation, specs)
	}
	v.annotation, v.annotationErr = text, err
	if err != nil {
		klog.ErrorS(err, "refused the claim's faults annotation", "volume", v.ID, "claim", v.Claim, "annotation", FaultsAnnotation)
		return
	}
	klog.InfoS("applied the claim's faults annotation", "volume", v.ID, "claim", v.Claim, "faults", text)
}

// apiClaims reads claims from the Kubernetes API server with the pod's
// service account, over plain HTTPS: one GET per claim and poll needs no
// client library.
type apiClaims struct {
	base      string // https://host:port
	tokenFile string
	client    *http.Client
}

// The service account's files in every pod.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// InClusterClaims is a ClaimReader for a plugin running in a pod: the API
// server from KUBERNETES_SERVICE_HOST and _PORT, the pod's service account
// token and CA.
func InClusterClaims() (ClaimReader, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, errors.New("not in a pod: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are unset")
	}
	ca, err := os.ReadFile(filepath.Join(serviceAccountDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("the service account's CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, errors.New("the service account's CA: no certificate in ca.crt")
	}
	return &apiClaims{
		base:      "https://" + net.JoinHostPort(host, port),
		tokenFile: filepath.Join(serviceAccountDir, "token"),
		client: &http.Client{Timeout: 30 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}},
	}, nil
}

func (c *apiClaims) Annotations(ctx context.Context, namespace, name string) (map[string]string, error) {
	// The kubelet rotates the token: read it for each request.
	token, err := os.ReadFile(c.tokenFile)
	if err != nil {
		return nil, fmt.Errorf("the service account's token: %w", err)
	}
	u := c.base + "/api/v1/namespaces/" + url.PathEscape(namespace) + "/persistentvolumeclaims/" + url.PathEscape(name)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	req.Header.Set("Accept", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("claim %s/%s: %w", namespace, name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("claim %s/%s: %w", namespace, name, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("claim %s/%s: %s: %.200s", namespace, name, resp.Status, body)
	}
	var pvc struct {
		Metadata struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(body, &pvc); err != nil {
		return nil, fmt.Errorf("claim %s/%s: %w", namespace, name, err)
	}
	return pvc.Metadata.Annotations, nil
}
