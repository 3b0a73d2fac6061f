package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"strings"
)

// cpuProfile is a --cpu-profile OUT of a serving command (attach, export).
// The file is created when the command starts, so that a bad path fails
// it before it serves anything; the profile covers start to stop. A nil
// *cpuProfile (no flag) does nothing.
type cpuProfile struct{ f *os.File }

func createProfile(path string) (*cpuProfile, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	return &cpuProfile{f}, nil
}

// start starts the profile and returns what stops it and writes it out.
func (p *cpuProfile) start(e *env) (stop func()) {
	if p == nil {
		return func() {}
	}
	if err := pprof.StartCPUProfile(p.f); err != nil {
		e.errorf("%s: --cpu-profile: %v", strings.TrimPrefix(e.prog, "zq-csi "), err)
		return func() {}
	}
	return pprof.StopCPUProfile
}

func (p *cpuProfile) close() {
	if p != nil {
		p.f.Close()
	}
}
