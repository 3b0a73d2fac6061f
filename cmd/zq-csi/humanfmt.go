package main

// Human-readable numbers printed exactly as qemu-img and qemu-io print
// them, so that scripts and eyes used to those tools read ours the same.

import (
	"fmt"
	"io"
	"math"
	"strings"
	"time"
)

// sizeToStr is qemu's size_to_str ("1 GiB", "196 KiB", "0.977 KiB"), used
// by qemu-img info.
func sizeToStr(v int64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	// frexp's exponent minus one is floor(log2(v*1024/1000)): switch to
	// the next unit once the integer part reaches 1000.
	_, e := math.Frexp(float64(v) / (1000.0 / 1024.0))
	i := (e - 1) / 10
	if i < 0 {
		i = 0
	}
	if i >= len(suffixes) {
		i = len(suffixes) - 1
	}
	div := math.Ldexp(1, 10*i)
	return fmt.Sprintf("%s %sB", cFormatG3(float64(v)/div), suffixes[i])
}

// cFormatG3 formats like C's printf("%0.3g").
func cFormatG3(f float64) string {
	return fmt.Sprintf("%.3g", f)
}

// cvtstr is qemu-io's cvtstr ("4 KiB", "1.500 KiB", "40 bytes").
func cvtstr(v float64) string {
	units := []struct {
		suffix string
		size   float64
	}{
		{" EiB", 1 << 60}, {" PiB", 1 << 50}, {" TiB", 1 << 40},
		{" GiB", 1 << 30}, {" MiB", 1 << 20}, {" KiB", 1 << 10},
	}
	var s, suffix string
	for _, u := range units {
		if v >= u.size {
			s, suffix = fmt.Sprintf("%.3f", v/u.size), u.suffix
			break
		}
	}
	if suffix == "" {
		s, suffix = fmt.Sprintf("%f", v), " bytes"
	}
	if i := strings.Index(s, ".000"); i >= 0 {
		return s[:i] + suffix
	}
	return s + suffix
}

// timestr is qemu-io's timestr without a fixed format: "00.00 sec" under
// a second, "h:mm:ss.ss" above.
func timestr(d time.Duration) string {
	sec := d.Seconds()
	if d < time.Second {
		return fmt.Sprintf("%05.2f sec", sec)
	}
	whole := int64(sec)
	frac := sec - float64(whole)
	return fmt.Sprintf("%d:%02d:%05.2f", whole/3600, (whole/60)%60, float64(whole%60)+frac)
}

// printReport prints qemu-io's two summary lines for one command:
//
//	wrote 4096/4096 bytes at offset 0
//	4 KiB, 1 ops; 00.00 sec (1.769 MiB/sec and 452.7956 ops/sec)
func printReport(w io.Writer, op string, d time.Duration, offset, count, total int64, ops int) {
	secs := d.Seconds()
	if secs <= 0 {
		secs = 1e-9
	}
	fmt.Fprintf(w, "%s %d/%d bytes at offset %d\n", op, total, count, offset)
	fmt.Fprintf(w, "%s, %d ops; %s (%s/sec and %.4f ops/sec)\n",
		cvtstr(float64(total)), ops, timestr(d), cvtstr(float64(total)/secs), float64(ops)/secs)
}

// dumpBuffer is qemu-io's `read -v` hex dump.
func dumpBuffer(w io.Writer, p []byte, offset int64) {
	var b strings.Builder
	for i := 0; i < len(p); i += 16 {
		line := p[i:min(i+16, len(p))]
		fmt.Fprintf(&b, "%08x:  ", offset+int64(i))
		for _, c := range line {
			fmt.Fprintf(&b, "%02x ", c)
		}
		b.WriteByte(' ')
		for _, c := range line {
			if isAlnum(c) {
				b.WriteByte(c)
			} else {
				b.WriteByte('.')
			}
		}
		b.WriteByte('\n')
	}
	io.WriteString(w, b.String())
}

func isAlnum(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}
