package main

import (
	"bytes"
	"testing"
	"time"
)

func TestSizeToStrMatchesQemuImg(t *testing.T) {
	tests := []struct {
		in   int64
		want string
	}{
		{0, "0 B"},
		{512, "512 B"},
		{1000, "0.977 KiB"},
		{200704, "196 KiB"},
		{331776, "324 KiB"},
		{1 << 20, "1 MiB"},
		{1 << 30, "1 GiB"},
		{3 << 29, "1.5 GiB"},
		{1023 << 20, "0.999 GiB"},
		{1 << 40, "1 TiB"},
	}
	for _, tt := range tests {
		if got := sizeToStr(tt.in); got != tt.want {
			t.Errorf("sizeToStr(%d) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestCvtstrMatchesQemuIO(t *testing.T) {
	tests := []struct {
		in   float64
		want string
	}{
		{0, "0 bytes"},
		{1, "1 bytes"},
		{40, "40 bytes"},
		{1.5, "1.500000 bytes"},
		{1024, "1 KiB"},
		{1536, "1.500 KiB"},
		{4096, "4 KiB"},
		{65536, "64 KiB"},
		{1 << 20, "1 MiB"},
		{1.769 * (1 << 20), "1.769 MiB"},
		{1 << 30, "1 GiB"},
	}
	for _, tt := range tests {
		if got := cvtstr(tt.in); got != tt.want {
			t.Errorf("cvtstr(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestTimestrMatchesQemuIO(t *testing.T) {
	tests := []struct {
		in   time.Duration
		want string
	}{
		{0, "00.00 sec"},
		{2 * time.Millisecond, "00.00 sec"},
		{250 * time.Millisecond, "00.25 sec"},
		{1500 * time.Millisecond, "0:00:01.50"},
		{3723 * time.Second, "1:02:03.00"},
	}
	for _, tt := range tests {
		if got := timestr(tt.in); got != tt.want {
			t.Errorf("timestr(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestPrintReportIsQemuIOFormat(t *testing.T) {
	var b bytes.Buffer
	printReport(&b, "wrote", 250*time.Millisecond, 0, 4096, 4096, 1)
	want := "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; 00.25 sec (16 KiB/sec and 4.0000 ops/sec)\n"
	if b.String() != want {
		t.Fatalf("got %q, want %q", b.String(), want)
	}
}

func TestDumpBufferIsQemuIOFormat(t *testing.T) {
	p := append(bytes.Repeat([]byte{0xab}, 16), 'a', 'Z', '9', ' ', 0)
	var b bytes.Buffer
	dumpBuffer(&b, p, 0x20)
	want := "00000020:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n" +
		"00000030:  61 5a 39 20 00  aZ9..\n"
	if b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
}
