package nbd

import (
	"encoding/binary"
	"github.com/zq-csi/zq-csi/volume"
	"testing"
)

func TestNetlinkAttrsRoundTrip(t *testing.T) {
	a := nlAttrs(nil).u32(nbdAttrIndex, 7).u64(nbdAttrSizeBytes, 1<<40).str(2, "nbd")
	a = a.nested(nbdAttrSockets, socketsAttr([]int{3, 9}))
	if len(a)%4 != 0 {
		t.Fatalf("attributes not 4-aligned: %d bytes", len(a))
	}
	as, err := parseAttrs(a)
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != 4 {
		t.Fatalf("%d attributes, want 4", len(as))
	}
	if v, _ := attrU32(as[0]); as[0].typ != nbdAttrIndex || v != 7 {
		t.Fatalf("index attribute %+v", as[0])
	}
	if as[1].typ != nbdAttrSizeBytes || binary.NativeEndian.Uint64(as[1].val) != 1<<40 {
		t.Fatalf("size attribute %+v", as[1])
	}
	if string(as[2].val) != "nbd\x00" {
		t.Fatalf("string attribute %q", as[2].val)
	}
	// The nested flag is set on the wire and cleared by the parser.
	if typ := binary.NativeEndian.Uint16(a[len(a)-len(as[3].val)-2:]); typ&0x8000 == 0 {
		t.Fatalf("sockets attribute type %#x without NLA_F_NESTED", typ)
	}
	if as[3].typ != nbdAttrSockets {
		t.Fatalf("sockets attribute type %d", as[3].typ)
	}
	items, err := parseAttrs(as[3].val)
	if err != nil || len(items) != 2 {
		t.Fatalf("socket items %v, %v", items, err)
	}
	for i, want := range []uint32{3, 9} {
		fds, err := parseAttrs(items[i].val)
		if err != nil || len(fds) != 1 || fds[0].typ != nbdSockFD {
			t.Fatalf("socket item %d: %v, %v", i, fds, err)
		}
		if v, _ := attrU32(fds[0]); v != want {
			t.Fatalf("socket item %d: fd %d, want %d", i, v, want)
		}
	}
}

func TestNetlinkParseAttrsRejectsBadLengths(t *testing.T) {
	for _, b := range [][]byte{
		{1, 0},                    // shorter than a header
		{3, 0, 1, 0},              // length below the header
		{12, 0, 1, 0, 0, 0, 0, 0}, // length past the buffer
	} {
		if _, err := parseAttrs(b); err == nil {
			t.Errorf("parseAttrs(% x) accepted", b)
		}
	}
}

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"/dev/nbd0": 0, "nbd12": 12, "3": 3} {
		if got, err := ParseDevice(in); err != nil || got != want {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"/dev/sda", "/dev/nbd", "/dev/nbd-1", "/dev/nbd+1", "/dev/nbd0p1", ""} {
		if _, err := ParseDevice(in); err == nil {
			t.Errorf("ParseDevice(%q) accepted", in)
		}
	}
	if DevicePath(5) != "/dev/nbd5" {
		t.Errorf("DevicePath(5) = %q", DevicePath(5))
	}
}

func TestOptionsDefaults(t *testing.T) {
	if n := (Options{}).connections(); n < 1 || n > DefaultConnections {
		t.Errorf("default connections %d", n)
	}
	if bs, _ := (Options{}).blockSize(1 << 20); bs != 4096 {
		t.Errorf("default block size for 1 MiB: %d", bs)
	}
	if bs, _ := (Options{}).blockSize(1<<20 + 512); bs != 512 {
		t.Errorf("default block size for 1 MiB + 512: %d", bs)
	}
	if _, err := (Options{BlockSize: 1024}).blockSize(1 << 20); err == nil {
		t.Error("block size 1024 accepted")
	}
	if _, err := (Options{BlockSize: 4096}).blockSize(1<<20 + 512); err == nil {
		t.Error("block size 4096 accepted for a size that is not a multiple of it")
	}
	ro := serverFlags(&Export{Backend: volume.Plain{}, ReadOnly: true})
	if ro&tflagReadOnly == 0 || ro&tflagSendTrim != 0 || ro&tflagHasFlags == 0 {
		t.Errorf("read-only server flags %#x", ro)
	}
}
