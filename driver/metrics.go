package driver

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"

	"github.com/zq-csi/zq-csi/attach"
)

// MetricsHandler serves the plugin's metrics in the Prometheus text format
// (version 0.0.4): the pool's free space, and per staged volume its
// capacity, bytes written, zones by condition, health and, for ublk, the
// requests served.
func (d *Driver) MetricsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		d.writeMetrics(w)
	})
}

func (d *Driver) writeMetrics(w io.Writer) {
	metric := func(name, typ, help string) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	if free, err := d.pool.free(); err == nil {
		metric("zq_csi_pool_free_bytes", "gauge", "Space available to new images in the node's pool.")
		fmt.Fprintf(w, "zq_csi_pool_free_bytes %d\n", free)
	}
	if d.node == nil {
		return
	}
	d.node.mu.Lock()
	var vols []*stagedVolume
	for _, v := range d.node.volumes {
		vols = append(vols, v)
	}
	d.node.mu.Unlock()
	sort.Slice(vols, func(i, j int) bool { return vols[i].ID < vols[j].ID })

	all := make([]stats, len(vols))
	for i, v := range vols {
		unlock := d.lock(v.ID) // not while a stage or unstage changes it
		all[i] = d.volumeStats(v)
		unlock()
	}
	metric("zq_csi_volumes_staged", "gauge", "Volumes staged on this node.")
	fmt.Fprintf(w, "zq_csi_volumes_staged %d\n", len(vols))
	metric("zq_csi_volume_healthy", "gauge", "1 while the volume is served, 0 when its image or device is unhealthy.")
	for i, v := range vols {
		fmt.Fprintf(w, "zq_csi_volume_healthy{%s} %d\n", labels(v), boolInt(all[i].err == nil))
	}
	metric("zq_csi_volume_capacity_bytes", "gauge", "Size of the volume.")
	for i, v := range vols {
		fmt.Fprintf(w, "zq_csi_volume_capacity_bytes{%s} %d\n", labels(v), all[i].capacity)
	}
	metric("zq_csi_volume_written_bytes", "gauge", "Bytes below the write pointers of the sequential zones, plus the conventional zones.")
	for i, v := range vols {
		fmt.Fprintf(w, "zq_csi_volume_written_bytes{%s} %d\n", labels(v), all[i].written)
	}
	metric("zq_csi_volume_zones", "gauge", "Sequential zones of the volume by condition.")
	for i, v := range vols {
		for _, c := range zoneConditions {
			if all[i].zones != nil {
				fmt.Fprintf(w, "zq_csi_volume_zones{%s,condition=%q} %d\n", labels(v), strings.ReplaceAll(c.String(), "-", "_"), all[i].zones[c])
			}
		}
	}
	metric("zq_csi_volume_fault_rules", "gauge", "Fault rules in force on the volume (zq-csi fault list).")
	for i, v := range vols {
		fmt.Fprintf(w, "zq_csi_volume_fault_rules{%s} %d\n", labels(v), len(all[i].faults.Rules))
	}
	metric("zq_csi_volume_fault_fired_total", "counter", "Requests a fault rule acted on, by rule.")
	for i, v := range vols {
		for _, r := range all[i].faults.Rules {
			fmt.Fprintf(w, "zq_csi_volume_fault_fired_total{%s,rule=\"%d\",fault=%q,source=%q} %d\n", labels(v), r.ID, r.Fault, r.Source, r.Fired)
		}
	}
	metric("zq_csi_volume_power_cuts_total", "counter", "Power cuts injected into the volume since it was opened.")
	for i, v := range vols {
		fmt.Fprintf(w, "zq_csi_volume_power_cuts_total{%s} %d\n", labels(v), all[i].faults.PowerCuts)
	}
	ublkStats := map[string]attach.Stats{}
	for _, v := range vols {
		unlock := d.lock(v.ID)
		if v.dev != nil {
			if st, ok := v.dev.Stats(); ok {
				ublkStats[v.ID] = st
			}
		}
		unlock()
	}
	metric("zq_csi_ublk_requests_total", "counter", "Requests a ublk device served, by kind.")
	for _, v := range vols {
		st, ok := ublkStats[v.ID]
		if !ok {
			continue
		}
		for _, k := range []struct {
			kind string
			n    uint64
		}{{"read", st.Reads}, {"write", st.Writes}, {"flush", st.Flushes}, {"discard", st.Discards},
			{"write_zeroes", st.WriteZeroes}, {"zone_append", st.ZoneAppends}, {"zone_management", st.ZoneManagement},
			{"report_zones", st.ZoneReports}} {
			fmt.Fprintf(w, "zq_csi_ublk_requests_total{%s,kind=%q} %d\n", labels(v), k.kind, k.n)
		}
	}
	metric("zq_csi_ublk_request_errors_total", "counter", "Requests a ublk device failed.")
	for _, v := range vols {
		if st, ok := ublkStats[v.ID]; ok {
			fmt.Fprintf(w, "zq_csi_ublk_request_errors_total{%s} %d\n", labels(v), st.Errors)
		}
	}
}

func labels(v *stagedVolume) string {
	return fmt.Sprintf("volume=%q,device=%q", v.ID, v.Device)
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
