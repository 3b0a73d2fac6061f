package driver

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/zq-csi/zq-csi/faultctl"
	"github.com/zq-csi/zq-csi/zoned"
)

func mustParse(t *testing.T, text string) []faultctl.Spec {
	t.Helper()
	specs, err := faultctl.ParseList(text)
	if err != nil {
		t.Fatal(err)
	}
	return specs
}

// fakeClaims is the API server's claims, in memory.
type fakeClaims struct {
	mu  sync.Mutex
	ann map[string]map[string]string // "ns/name" -> annotations
}

func (f *fakeClaims) Annotations(_ context.Context, ns, name string) (map[string]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, ok := f.ann[ns+"/"+name]
	if !ok {
		return nil, errors.New("not found")
	}
	return maps.Clone(a), nil
}

func (f *fakeClaims) set(claim, faults string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ann[claim] = map[string]string{FaultsAnnotation: faults}
}

// createWith creates volume name from zoneParams plus extra.
func (e *testEnv) createWith(t *testing.T, name string, extra map[string]string) *csi.Volume {
	t.Helper()
	params := maps.Clone(zoneParams)
	maps.Copy(params, extra)
	r, err := e.d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: name, Parameters: params,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Volume
}

func (e *testEnv) condition(t *testing.T, id, path string) *csi.VolumeCondition {
	t.Helper()
	r, err := e.d.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: path})
	if err != nil {
		t.Fatal(err)
	}
	return r.VolumeCondition
}

func TestClassFaultsAreInForceFromStageAndAfterARestart(t *testing.T) {
	e := newTestDriver(t)
	v := e.createWith(t, "pvc-f", map[string]string{"faults": "readonly:zone=3;error:op=read,zone=5,errno=ENODATA", "cache": "volatile"})
	staging := e.stage(t, v.VolumeId)
	sv := e.d.node.get(v.VolumeId)
	if err := sv.vol.WriteAt(make([]byte, 512), 3*(4<<20)); !errors.Is(err, zoned.ErrZoneReadOnly) {
		t.Errorf("write to the class's read-only zone: %v", err)
	}
	if err := sv.vol.ReadAt(make([]byte, 512), 5*(4<<20)); zoned.Errno(err) != 61 {
		t.Errorf("read under the class's rule: %v, want ENODATA", err)
	}
	c := e.condition(t, v.VolumeId, staging)
	for _, want := range []string{"faults injected: 1 rules, 1 zones in an injected condition", "error:op=read,zone=5,errno=ENODATA (fired 1)", "read-only 1"} {
		if !c.Abnormal || !strings.Contains(c.Message, want) {
			t.Errorf("condition %+v: want abnormal saying %q", c, want)
		}
	}
	var metrics strings.Builder
	e.d.writeMetrics(&metrics)
	for _, want := range []string{`zq_csi_volume_fault_rules{volume="` + v.VolumeId, `fault="error:op=read,zone=5,errno=ENODATA",source="storageclass"} 1`, `condition="read_only"} 1`} {
		if !strings.Contains(metrics.String(), want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	sv.vol.Img.Close() // the old process dies: its image's lock goes with it
	e.restart(t)
	if st, err := e.d.Faults().Status(v.VolumeId); err != nil || len(st.Rules) != 1 || st.Conditions["3"] != "read-only" || !st.VolatileCache {
		t.Errorf("after a restart: %+v, %v; want the class's rule again, the zone still read-only, the cache volatile", st, err)
	}
	// A rule failing everything, left in force: unstaging ends it first,
	// so the image's closing flush is not failed by it.
	if _, err := e.d.Faults().Apply(v.VolumeId, "socket", mustParse(t, "error:op=all")); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage with faults in force: %v", err)
	}
	if _, err := e.d.Faults().Status(v.VolumeId); err == nil {
		t.Errorf("unstaged volume still has faults")
	}
	if _, err := e.d.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.d.pool.imagePath(v.VolumeId) + ".conditions"); !os.IsNotExist(err) {
		t.Errorf("conditions file after DeleteVolume: %v", err)
	}
}

func TestClaimAnnotationFaultsFollowTheClaim(t *testing.T) {
	e := newTestDriver(t)
	claims := &fakeClaims{ann: map[string]map[string]string{}}
	v := e.createWith(t, "pvc-a", map[string]string{paramClaimNamespace: "team-a", paramClaimName: "data"})
	staging := e.stage(t, v.VolumeId)
	sv := e.d.node.get(v.VolumeId)
	sync := func() { e.d.syncClaimFaults(context.Background(), claims, sv) }

	claims.set("team-a/data", "offline:zone=2;error:op=write,zone=4")
	sync()
	st, _ := e.d.Faults().Status(v.VolumeId)
	if len(st.Rules) != 1 || st.Rules[0].Source != "annotation" || st.Conditions["2"] != "offline" {
		t.Fatalf("after the annotation: %+v", st)
	}
	claims.set("team-a/data", "readonly:zone=3")
	sync()
	st, _ = e.d.Faults().Status(v.VolumeId)
	if len(st.Rules) != 0 || len(st.Conditions) != 1 || st.Conditions["3"] != "read-only" {
		t.Fatalf("after changing the annotation: %+v, want only zone 3 read-only", st)
	}
	claims.set("team-a/data", "readonly:zone=99")
	sync()
	if c := e.condition(t, v.VolumeId, staging); !c.Abnormal || !strings.Contains(c.Message, "annotation was refused") || !strings.Contains(c.Message, "zone 99") {
		t.Errorf("a bad annotation: condition %+v", c)
	}
	if st, _ := e.d.Faults().Status(v.VolumeId); st.Conditions["3"] != "read-only" {
		t.Errorf("a refused annotation changed the faults: %+v", st)
	}
	claims.set("team-a/data", "")
	sync()
	if c := e.condition(t, v.VolumeId, staging); c.Abnormal {
		t.Errorf("annotation emptied: condition %+v, want healthy", c)
	}
}

func TestInClusterClaimsReadsTheAnnotationWithTheToken(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok-1" {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		if r.URL.Path != "/api/v1/namespaces/team-a/persistentvolumeclaims/data" {
			http.Error(w, "not found", http.StatusNotFound)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"metadata": map[string]any{"annotations": map[string]string{FaultsAnnotation: "readonly:zone=3"}}})
	}))
	// On a unix socket: the VM harness's guest, where this package's
	// tests run too, has no loopback network.
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = l
	srv.StartTLS()
	defer srv.Close()
	client := srv.Client()
	client.Transport.(*http.Transport).DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("tok-1\n"), 0o600)
	c := &apiClaims{base: "https://127.0.0.1", tokenFile: token, client: client}
	ann, err := c.Annotations(context.Background(), "team-a", "data")
	if err != nil || ann[FaultsAnnotation] != "readonly:zone=3" {
		t.Fatalf("Annotations: %v, %v", ann, err)
	}
	if _, err := c.Annotations(context.Background(), "team-b", "data"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("another claim: %v, want the 404 named", err)
	}
	os.WriteFile(token, []byte("tok-2"), 0o600)
	if _, err := c.Annotations(context.Background(), "team-a", "data"); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("a rotated token the server refuses: %v", err)
	}
}
