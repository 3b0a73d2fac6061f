package faultctl

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/zq-csi/zq-csi/volume"
	"github.com/zq-csi/zq-csi/zoned"
)

// Sentinel errors of Server's operations.
var (
	ErrNoVolume  = errors.New("no such volume")
	ErrNotZoned  = errors.New("faults apply to zoned volumes only")
	ErrNoRule    = errors.New("no such fault rule")
	ErrForbidden = errors.New("control socket: peer is neither root nor the server's user")
)

// Source says who asked for a fault, so that each one can replace only its
// own: the control socket, a StorageClass, a claim's annotation.
type Source string

// Sources of faults.
const (
	FromSocket     Source = "socket"
	FromClass      Source = "storageclass"
	FromAnnotation Source = "annotation"
	allSources     Source = ""
)

// removeEveryRule, as RemoveRule's id, removes every rule of the source.
const removeEveryRule = 0

// Server holds the live zoned volumes faults can be injected into, by
// name (the volume ID in the node plugin, the image path in attach), and
// serves the control socket.
type Server struct {
	mu   sync.Mutex
	vols map[string]*entry
}

type entry struct {
	z     *volume.Zoned
	rules map[int]appliedRule
	// conditions set, by zone, with the source that set them.
	conditions map[int]Source
	powerCuts  atomic.Int64
}

type appliedRule struct {
	text   string
	source Source
}

// NewServer returns a Server with no volume.
func NewServer() *Server { return &Server{vols: map[string]*entry{}} }

// Add registers volume v under name; a plain volume is refused with
// ErrNotZoned. Power cuts its rules cause are logged and counted.
func (s *Server) Add(name string, v *volume.Volume) error {
	z, ok := v.Backend.(*volume.Zoned)
	if !ok {
		return ErrNotZoned
	}
	e := &entry{z: z, rules: map[int]appliedRule{}, conditions: map[int]Source{}}
	for i, c := range z.Dev.Conditions() {
		klog.InfoS("Zone condition kept from before", "volume", name, "zone", i, "condition", c)
		e.conditions[i] = FromSocket
	}
	z.Dev.NotifyPowerCut(func(rep zoned.PowerCutReport, err error) {
		e.powerCuts.Add(1)
		klog.InfoS("Power cut by a fault rule", "volume", name, "zonesRolledBack", rep.Zones, "bytesDropped", rep.Bytes, "err", err)
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	s.vols[name] = e
	return nil
}

// Remove forgets volume name, which is being closed, and takes its rules
// out of force so that closing it (a flush, a device's sync) is not failed
// by them. Its zone conditions stay, kept beside the image.
func (s *Server) Remove(name string) {
	s.mu.Lock()
	e := s.vols[name]
	delete(s.vols, name)
	s.mu.Unlock()
	if e != nil {
		e.z.Dev.RemoveFault(0)
	}
}

func (s *Server) get(name string) (*entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name == "" {
		if len(s.vols) == 1 {
			for _, e := range s.vols {
				return e, nil
			}
		}
		return nil, fmt.Errorf("%w: no volume named, and the server holds %d (zq-csi fault list names them)", ErrNoVolume, len(s.vols))
	}
	e, ok := s.vols[name]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrNoVolume, name)
	}
	return e, nil
}

// Apply puts specs in force on volume name for source and returns the ids
// of the rules among them. Every spec is checked against the volume first:
// one that does not apply changes nothing.
func (s *Server) Apply(name string, source Source, specs []Spec) ([]int, error) {
	e, err := s.get(name)
	if err != nil {
		return nil, err
	}
	if err := e.check(specs); err != nil {
		return nil, err
	}
	var ids []int
	for _, sp := range specs {
		sp, _ := sp.Resolve(e.z.Geometry())
		if !sp.Rule() {
			for i := sp.FirstZone; i <= sp.LastZone; i++ {
				var err error
				switch sp.Kind {
				case KindResetRecommended:
					err = e.z.Dev.SetResetRecommended(i, true)
				case KindOnline:
					err = e.online(i)
				default:
					err = e.z.SetCondition(i, sp.Condition())
				}
				if err != nil {
					return ids, err
				}
				s.mu.Lock()
				if sp.Kind == KindOnline {
					delete(e.conditions, i)
				} else {
					e.conditions[i] = source
				}
				s.mu.Unlock()
			}
			klog.InfoS("Zone condition injected", "volume", name, "fault", sp.String(), "source", source)
			continue
		}
		id, err := e.z.Dev.AddFault(sp.Fault)
		if err != nil {
			return ids, fmt.Errorf("%q: %w", sp, err)
		}
		s.mu.Lock()
		e.rules[id] = appliedRule{sp.String(), source}
		s.mu.Unlock()
		ids = append(ids, id)
		klog.InfoS("Fault rule injected", "volume", name, "id", id, "fault", sp.String(), "source", source)
	}
	return ids, nil
}

// online takes zone i's injected conditions and attributes away.
func (e *entry) online(i int) error {
	return errors.Join(e.z.SetCondition(i, zoned.Empty), e.z.Dev.SetResetRecommended(i, false))
}

// check checks that every spec applies to the volume.
func (e *entry) check(specs []Spec) error {
	for _, sp := range specs {
		if _, err := sp.Resolve(e.z.Geometry()); err != nil {
			return err
		}
		if sp.Kind == KindPowerCut && !e.z.Dev.VolatileCache() {
			return fmt.Errorf("%q: %w (the volume's cache is not volatile)", sp, zoned.ErrNoVolatileCache)
		}
	}
	return nil
}

// RemoveRule takes rule id (removeEveryRule: every rule of source, or
// every rule at all for allSources) out of force on volume name.
func (s *Server) RemoveRule(name string, source Source, id int) (int, error) {
	e, err := s.get(name)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	var ids []int
	for rid, r := range e.rules {
		if (id == removeEveryRule || rid == id) && (source == allSources || r.source == source) {
			ids = append(ids, rid)
		}
	}
	for _, rid := range ids {
		delete(e.rules, rid)
	}
	s.mu.Unlock()
	if id != removeEveryRule && len(ids) == 0 {
		return 0, fmt.Errorf("%w %d on volume %q", ErrNoRule, id, name)
	}
	for _, rid := range ids {
		e.z.Dev.RemoveFault(rid)
	}
	if len(ids) > 0 {
		klog.InfoS("Fault rules removed", "volume", name, "ids", ids, "source", source)
	}
	return len(ids), nil
}

// Replace makes specs the faults of source on volume name: that source's
// rules and conditions not among them are cleared, the others applied.
func (s *Server) Replace(name string, source Source, specs []Spec) error {
	e, err := s.get(name)
	if err != nil {
		return err
	}
	if err := e.check(specs); err != nil {
		return err
	}
	if _, err := s.RemoveRule(name, source, removeEveryRule); err != nil {
		return err
	}
	keep := map[int]bool{}
	for _, sp := range specs {
		if !sp.Rule() && sp.Kind != KindOnline {
			for i := sp.FirstZone; i <= sp.LastZone; i++ {
				keep[i] = true
			}
		}
	}
	s.mu.Lock()
	var clear []int
	for i, src := range e.conditions {
		if src == source && !keep[i] {
			clear = append(clear, i)
		}
	}
	s.mu.Unlock()
	for _, i := range clear {
		if err := e.online(i); err != nil {
			return err
		}
		s.mu.Lock()
		delete(e.conditions, i)
		s.mu.Unlock()
	}
	_, err = s.Apply(name, source, specs)
	return err
}

// PowerCut cuts the power of volume name now.
func (s *Server) PowerCut(name string) (zoned.PowerCutReport, error) {
	e, err := s.get(name)
	if err != nil {
		return zoned.PowerCutReport{}, err
	}
	rep, err := e.z.Dev.PowerCut()
	if err == nil {
		e.powerCuts.Add(1)
		klog.InfoS("Power cut", "volume", name, "zonesRolledBack", rep.Zones, "bytesDropped", rep.Bytes)
	}
	return rep, err
}

// VolumeStatus is what is injected into one volume.
type VolumeStatus struct {
	Name          string            `json:"name"`
	VolatileCache bool              `json:"volatileCache"`
	Rules         []RuleStatus      `json:"rules,omitempty"`
	Conditions    map[string]string `json:"conditions,omitempty"` // zone index: read-only or offline
	PowerCuts     int64             `json:"powerCuts"`
}

// RuleStatus is one rule in force.
type RuleStatus struct {
	ID      int    `json:"id"`
	Fault   string `json:"fault"`
	Source  Source `json:"source"`
	Matched int64  `json:"matched"`
	Fired   int64  `json:"fired"`
	Done    bool   `json:"done,omitempty"`
}

// Active reports whether any fault is in force or has struck.
func (v VolumeStatus) Active() bool {
	return len(v.Rules) > 0 || len(v.Conditions) > 0 || v.PowerCuts > 0
}

// Summary is the status in one line, for a volume condition's message.
func (v VolumeStatus) Summary() string {
	msg := fmt.Sprintf("faults injected: %d rules, %d zones in an injected condition, %d power cuts", len(v.Rules), len(v.Conditions), v.PowerCuts)
	for _, r := range v.Rules {
		msg += fmt.Sprintf("; #%d %s (fired %d)", r.ID, r.Fault, r.Fired)
	}
	return msg
}

// Status returns what is injected into volume name.
func (s *Server) Status(name string) (VolumeStatus, error) {
	e, err := s.get(name)
	if err != nil {
		return VolumeStatus{}, err
	}
	st := VolumeStatus{Name: name, VolatileCache: e.z.Dev.VolatileCache(), PowerCuts: e.powerCuts.Load()}
	s.mu.Lock()
	rules := maps.Clone(e.rules)
	s.mu.Unlock()
	for _, f := range e.z.Dev.Faults() {
		r := rules[f.ID]
		st.Rules = append(st.Rules, RuleStatus{ID: f.ID, Fault: r.text, Source: r.source, Matched: f.Matched, Fired: f.Fired, Done: f.Done})
	}
	g := e.z.Geometry()
	for _, z := range e.z.Report(0, g.NumZones()) {
		var what string
		switch {
		case z.Cond == zoned.ReadOnly || z.Cond == zoned.Offline:
			what = z.Cond.String()
		case z.ResetRecommended:
			what = KindResetRecommended
		default:
			continue
		}
		if st.Conditions == nil {
			st.Conditions = map[string]string{}
		}
		st.Conditions[fmt.Sprint(g.ZoneIndex(z.Start))] = what
	}
	return st, nil
}

// Names lists the registered volumes, sorted.
func (s *Server) Names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.vols))
	for n := range s.vols {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Request is one control-socket call, as JSON.
type Request struct {
	// Verb is list, add, remove or powercut.
	Verb   string `json:"verb"`
	Volume string `json:"volume,omitempty"` // "": the only volume
	Faults string `json:"faults,omitempty"` // add: specs joined with ";"
	ID     int    `json:"id,omitempty"`     // remove: the rule; 0 every rule
}

// Response is the answer to a Request.
type Response struct {
	Error    string                `json:"error,omitempty"`
	Volumes  []VolumeStatus        `json:"volumes,omitempty"`
	IDs      []int                 `json:"ids,omitempty"`
	Removed  int                   `json:"removed,omitempty"`
	PowerCut *zoned.PowerCutReport `json:"powerCut,omitempty"`
}

// Listen creates the control socket at path, readable and writable by its
// owner only (a socket left by a dead server is replaced).
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	old := unix.Umask(0o177)
	l, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return l, nil
}

// Serve answers requests on l, one per connection, until l is closed.
func (s *Server) Serve(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		go s.serveConn(c)
	}
}

func (s *Server) serveConn(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	var resp Response
	if err := checkPeer(c); err != nil {
		resp.Error = err.Error()
	} else {
		var req Request
		if err := json.NewDecoder(c).Decode(&req); err != nil {
			resp.Error = fmt.Sprintf("control socket: bad request: %v", err)
		} else {
			resp = s.do(req)
		}
	}
	json.NewEncoder(c).Encode(resp)
}

// checkPeer lets in root and the server's own user only: the socket's
// mode says so already, this holds if it is ever loosened.
func checkPeer(c net.Conn) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ErrForbidden
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("%w (uid %d)", ErrForbidden, cred.Uid)
	}
	return nil
}

func (s *Server) do(req Request) Response {
	var resp Response
	var err error
	switch req.Verb {
	case "list":
		names := s.Names()
		if req.Volume != "" {
			names = []string{req.Volume}
		}
		for _, n := range names {
			var st VolumeStatus
			if st, err = s.Status(n); err != nil {
				break
			}
			resp.Volumes = append(resp.Volumes, st)
		}
	case "add":
		var specs []Spec
		if specs, err = ParseList(req.Faults); err == nil && len(specs) == 0 {
			err = fmt.Errorf("%w: add: no fault given", ErrSyntax)
		}
		if err == nil {
			resp.IDs, err = s.Apply(req.Volume, FromSocket, specs)
		}
	case "remove":
		resp.Removed, err = s.RemoveRule(req.Volume, allSources, req.ID)
	case "powercut":
		var rep zoned.PowerCutReport
		if rep, err = s.PowerCut(req.Volume); err == nil {
			resp.PowerCut = &rep
		}
	default:
		err = fmt.Errorf("control socket: unknown verb %q (want list, add, remove or powercut)", req.Verb)
	}
	if err != nil {
		resp.Error = err.Error()
	}
	return resp
}

// Do sends req to the control socket at path and returns the answer; an
// error the server reports comes back as an error.
func Do(path string, req Request) (Response, error) {
	c, err := net.DialTimeout("unix", path, 10*time.Second)
	if err != nil {
		return Response{}, fmt.Errorf("control socket: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return Response{}, fmt.Errorf("control socket: %w", err)
	}
	var resp Response
	if err := json.NewDecoder(c).Decode(&resp); err != nil {
		return Response{}, fmt.Errorf("control socket: reading the answer: %w", err)
	}
	if resp.Error != "" {
		return resp, errors.New(resp.Error)
	}
	return resp, nil
}
