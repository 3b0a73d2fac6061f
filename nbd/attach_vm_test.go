//go:build vmtest

// Kernel attach tests: they need the nbd module of the VM harness kernel
// and run only there, through
//
//	test/e2e/vm-go-test.sh ./nbd/
//
// The vmtest build tag keeps them out of plain `go test ./...` on the
// host; run any other way they fail.
package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/zq-csi/zq-csi/image"
	"github.com/zq-csi/zq-csi/test/e2e/vmtest"
	"github.com/zq-csi/zq-csi/volume"
)

func TestMain(m *testing.M) { vmtest.Main(m, "./nbd/") }

const blkGetSize64 = 0x80081272 // _IOR(0x12, 114, u64)

// deviceSize reads the size of the block device both ways: sysfs and
// BLKGETSIZE64.
func deviceSize(t *testing.T, d *Device) int64 {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/size", d.Index))
	if err != nil {
		t.Fatal(err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(raw)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size uint64
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), blkGetSize64, uintptr(unsafe.Pointer(&size))); e != 0 {
		t.Fatalf("BLKGETSIZE64 %s: %v", d.Path(), e)
	}
	if int64(size) != sectors*512 {
		t.Fatalf("%s: BLKGETSIZE64 %d, sysfs %d sectors", d.Path(), size, sectors)
	}
	return int64(size)
}

// waitDisconnected waits for NBD_CMD_STATUS to say the device is free.
func waitDisconnected(t *testing.T, index int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		connected, err := Status(index)
		if err != nil {
			t.Fatalf("status of nbd%d: %v", index, err)
		}
		if !connected {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbd%d still connected 10s after the disconnect", index)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func attach(t *testing.T, b volume.Backend, opts Options) *Device {
	t.Helper()
	d, err := Attach(b, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		select {
		case <-d.Done():
		default:
			d.Detach()
		}
	})
	if connected, err := Status(d.Index); err != nil || !connected {
		t.Fatalf("status of %s after attach: connected=%v, %v", d.Path(), connected, err)
	}
	return d
}

func detach(t *testing.T, d *Device) {
	t.Helper()
	if err := d.Detach(); err != nil {
		t.Fatalf("detach %s: %v", d.Path(), err)
	}
	if err := d.Wait(); err != nil {
		t.Fatalf("serving %s: %v", d.Path(), err)
	}
	waitDisconnected(t, d.Index)
}

// TestKernelDetachKeepsUnsyncedWrites: an application that wrote to the
// device and has not synced (it still holds it open) loses nothing when
// the device is detached.
func TestKernelDetachKeepsUnsyncedWrites(t *testing.T) {
	const size = 16 << 20
	path := filepath.Join(t.TempDir(), "unsynced.qcow2")
	if err := image.Create(path, image.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	img, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d, err := Attach(volume.Plain{Img: img}, Options{Index: Any, Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := vmtest.Pattern(256<<10, 9)
	if _, err := f.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	// No fsync, and f stays open: the pages are dirty in the page cache.
	if err := d.Detach(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("writes cached by the kernel were lost by the detach")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestKernelAttachPlainImage(t *testing.T) {
	const size = 64 << 20
	path := filepath.Join(t.TempDir(), "plain.qcow2")
	if err := image.Create(path, image.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	img, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d := attach(t, volume.Plain{Img: img}, Options{Index: Any, Connections: 2})
	if !strings.HasPrefix(d.Path(), "/dev/nbd") {
		t.Fatalf("device path %q", d.Path())
	}
	if got := deviceSize(t, d); got != size {
		t.Fatalf("%s size %d, image size %d", d.Path(), got, size)
	}

	// Buffered writes and fsync, at the start, across a cluster boundary
	// and at the end.
	writes := map[int64][]byte{
		0:                vmtest.Pattern(128<<10, 1),
		(1 << 20) - 4096: vmtest.Pattern(72<<10, 2),
		size - 8192:      vmtest.Pattern(8192, 3),
	}
	f, err := os.OpenFile(d.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for off, p := range writes {
		if _, err := f.WriteAt(p, off); err != nil {
			t.Fatalf("write at %#x: %v", off, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync %s: %v", d.Path(), err)
	}
	f.Close()
	// Read back past the page cache.
	df := vmtest.OpenDirect(t, d.Path())
	for off, p := range writes {
		if got := vmtest.DirectRead(t, df, off, len(p)); !bytes.Equal(got, p) {
			t.Fatalf("read back at %#x through %s differs", off, d.Path())
		}
	}
	if got := vmtest.DirectRead(t, df, 4<<20, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("unwritten block does not read as zeros")
	}
	df.Close()
	detach(t, d)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	// The bytes are in the image, which checks clean.
	img2, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for off, p := range writes {
		got := make([]byte, len(p))
		if _, err := img2.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, p) {
			t.Fatalf("image bytes at %#x differ from what was written to the device", off)
		}
	}
	if err := img2.Close(); err != nil {
		t.Fatal(err)
	}
	vmtest.CheckImageClean(t, path)

	// Reattach: the data is still there.
	img2, err = image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d2 := attach(t, volume.Plain{Img: img2}, Options{Index: Any})
	df2 := vmtest.OpenDirect(t, d2.Path())
	for off, p := range writes {
		if got := vmtest.DirectRead(t, df2, off, len(p)); !bytes.Equal(got, p) {
			t.Fatalf("after reattach: read at %#x through %s differs", off, d2.Path())
		}
	}
	df2.Close()
	detach(t, d2)
	if err := img2.Close(); err != nil {
		t.Fatal(err)
	}
	vmtest.CheckImageClean(t, path)
}

func TestKernelAttachReadOnly(t *testing.T) {
	img := newImage(t, 16<<20)
	if _, err := img.WriteAt(vmtest.Pattern(4096, 9), 0); err != nil {
		t.Fatal(err)
	}
	d := attach(t, volume.Plain{Img: img}, Options{Index: Any, ReadOnly: true})
	ro, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/ro", d.Index))
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(ro)) != "1" {
		t.Fatalf("/sys/block/nbd%d/ro = %q, want 1", d.Index, ro)
	}
	// The kernel refuses writes itself (EPERM) whether or not the open
	// for writing succeeds; the image is unchanged.
	if wf, err := os.OpenFile(d.Path(), os.O_RDWR|syscall.O_DIRECT, 0); err == nil {
		werr := vmtest.DirectWrite(wf, make([]byte, 4096), 0, vmtest.AlignedBuf(t, 4096))
		wf.Close()
		if !errors.Is(werr, syscall.EPERM) && !errors.Is(werr, syscall.EROFS) {
			t.Fatalf("write to read-only %s: %v, want EPERM", d.Path(), werr)
		}
	}
	f, err := os.OpenFile(d.Path(), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := vmtest.DirectRead(t, f, 0, 4096); !bytes.Equal(got, vmtest.Pattern(4096, 9)) {
		t.Fatalf("read-only device reads wrong data")
	}
	f.Close()
	detach(t, d)
}

func TestKernelAttachZonedImage(t *testing.T) {
	// Zone 0 conventional, zones 1..7 sequential (1 MiB, capacity 768 KiB).
	path, img, dev := newZonedImage(t, 8<<20, 4)
	d := attach(t, &volume.Zoned{Img: img, Dev: dev}, Options{Index: Any, BlockSize: 512})
	if got := deviceSize(t, d); got != 8<<20 {
		t.Fatalf("%s size %d, want %d", d.Path(), got, 8<<20)
	}
	f := vmtest.OpenDirect(t, d.Path())
	defer f.Close()
	buf := vmtest.AlignedBuf(t, 256<<10)
	z1 := int64(testZoneSize)
	wp1 := func() int64 {
		z, err := dev.ZoneAt(z1)
		if err != nil {
			t.Fatal(err)
		}
		return z.WritePointer
	}

	// Writes at the write pointer succeed and move it.
	a, b := vmtest.Pattern(64<<10, 11), vmtest.Pattern(64<<10, 12)
	if err := vmtest.DirectWrite(f, a, z1, buf); err != nil {
		t.Fatalf("write at the write pointer %#x: %v", z1, err)
	}
	if err := vmtest.DirectWrite(f, b, z1+64<<10, buf); err != nil {
		t.Fatalf("write at the write pointer %#x: %v", z1+64<<10, err)
	}
	if got := wp1(); got != z1+128<<10 {
		t.Fatalf("write pointer %#x after two writes, want %#x", got, z1+128<<10)
	}

	// A write elsewhere in the zone fails with EIO; the pointer stays.
	for _, off := range []int64{z1 + 512<<10, z1, z1 + 64<<10} {
		err := vmtest.DirectWrite(f, vmtest.Pattern(4096, 13), off, buf)
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("write at %#x (write pointer %#x): %v, want EIO", off, z1+128<<10, err)
		}
		if got := wp1(); got != z1+128<<10 {
			t.Fatalf("write pointer moved to %#x by a refused write at %#x", got, off)
		}
	}
	// Past the capacity of zone 2 (its pointer is at its start).
	if err := vmtest.DirectWrite(f, vmtest.Pattern(4096, 14), 2*z1+testZoneCap, buf); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write past the zone capacity: %v, want EIO", err)
	}
	// The conventional zone takes writes anywhere.
	c := vmtest.Pattern(8192, 15)
	if err := vmtest.DirectWrite(f, c, 256<<10, buf); err != nil {
		t.Fatalf("write in the conventional zone: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := vmtest.DirectRead(t, f, z1, 128<<10); !bytes.Equal(got, append(append([]byte(nil), a...), b...)) {
		t.Fatalf("zone 1 reads back wrong data")
	}
	if got := vmtest.DirectRead(t, f, z1+128<<10, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("zone 1 past the write pointer does not read as zeros")
	}
	f.Close()
	detach(t, d)
	if err := dev.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	vmtest.CheckImageClean(t, path)

	// The write pointer and the data persisted.
	img2, err := image.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img2.Close()
	dev2, err := volume.OpenZones(img2)
	if err != nil {
		t.Fatal(err)
	}
	if z, _ := dev2.ZoneAt(z1); z.WritePointer != z1+128<<10 {
		t.Fatalf("reopened: write pointer %#x, want %#x", z.WritePointer, z1+128<<10)
	}
	got := make([]byte, len(c))
	if _, err := dev2.ReadAt(got, 256<<10); err != nil || !bytes.Equal(got, c) {
		t.Fatalf("reopened: conventional zone data differs (%v)", err)
	}
}

// TestKernelRecoverAfterServerDeath: the serving side stops without a
// DISCONNECT (the process died); the kernel holds the I/O issued
// meanwhile for the dead-connection timeout; a fresh server instance on
// a reopened image takes the same /dev/nbdN back with RECONFIGURE and
// the held I/O completes.
func TestKernelRecoverAfterServerDeath(t *testing.T) {
	const size = 32 << 20
	path := filepath.Join(t.TempDir(), "recover.qcow2")
	if err := image.Create(path, image.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	img, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Index: Any, Connections: 2, DeadConnTimeout: 60 * time.Second, BackendID: volume.BackendID(path)}
	d, err := Attach(volume.Plain{Img: img}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := BackendIDOf(d.Index); err != nil || id != opts.BackendID {
		t.Fatalf("backend of %s: %q, %v; want %q", d.Path(), id, err, opts.BackendID)
	}
	f := vmtest.OpenDirect(t, d.Path())
	defer f.Close()
	buf := vmtest.AlignedBuf(t, 64<<10)
	a := vmtest.Pattern(64<<10, 21)
	if err := vmtest.DirectWrite(f, a, 0, buf); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}

	// The server dies: its ends of the sockets close, no DISCONNECT.
	d.Close()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if connected, err := Status(d.Index); err != nil || !connected {
		t.Fatalf("after the server died the device must stay configured: connected=%v, %v", connected, err)
	}

	// I/O issued now waits for the recovery.
	type result struct {
		data []byte
		err  error
	}
	held := make(chan result, 1)
	b := vmtest.Pattern(64<<10, 22)
	go func() {
		wbuf := vmtest.AlignedBuf(t, 64<<10)
		if err := vmtest.DirectWrite(f, b, 1<<20, wbuf); err != nil {
			held <- result{nil, fmt.Errorf("held write: %w", err)}
			return
		}
		rbuf := vmtest.AlignedBuf(t, 64<<10)
		_, err := f.ReadAt(rbuf, 0)
		held <- result{append([]byte(nil), rbuf...), err}
	}()
	select {
	case r := <-held:
		t.Fatalf("I/O on a device with no live connection finished before the recovery: %v", r.err)
	case <-time.After(time.Second):
	}

	// A fresh server instance takes the device back; one with another
	// image's identity is refused by the kernel.
	img2, err := image.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	other := opts
	other.BackendID = volume.BackendID(path + ".other")
	if _, err := Recover(d.Index, volume.Plain{Img: img2}, other); err == nil {
		t.Fatal("Recover with another image's backend identifier was accepted")
	}
	d2, err := Recover(d.Index, volume.Plain{Img: img2}, opts)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-held:
		if r.err != nil {
			t.Fatalf("held I/O after the recovery: %v", r.err)
		}
		if !bytes.Equal(r.data, a) {
			t.Fatalf("held read after the recovery returned wrong data")
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("held I/O did not resume within 30s of the RECONFIGURE")
	}
	// And new I/O works on the same device.
	c := vmtest.Pattern(4096, 23)
	if err := vmtest.DirectWrite(f, c, size-4096, buf); err != nil {
		t.Fatalf("write after the recovery: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := vmtest.DirectRead(t, f, 1<<20, len(b)); !bytes.Equal(got, b) {
		t.Fatalf("the held write did not land")
	}
	f.Close()
	detach(t, d2)
	if err := img2.Close(); err != nil {
		t.Fatal(err)
	}
	img3, err := image.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img3.Close()
	for off, p := range map[int64][]byte{0: a, 1 << 20: b, size - 4096: c} {
		got := make([]byte, len(p))
		if _, err := img3.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("image at %#x differs after the recovery (%v)", off, err)
		}
	}
	vmtest.CheckImageClean(t, path)
}

// applyThenDie is a zoned volume whose server dies after applying the
// write at off and making it durable, before it answers: die closes the
// server's ends of the connections, as a killed process's would.
type applyThenDie struct {
	*volume.Zoned
	off     int64
	die     func()
	applied chan struct{} // closed once the write at off is durable
}

func (b *applyThenDie) WriteAt(p []byte, off int64) error {
	err := b.Zoned.WriteAt(p, off)
	if off != b.off || err != nil {
		return err
	}
	if err := b.Zoned.Flush(); err != nil {
		return err
	}
	b.die()
	close(b.applied)
	return errors.New("the server died") // its answer goes nowhere
}

// TestKernelRecoverAcceptsAZonedWriteTheDeadServerApplied: the kernel
// sends a write that was in flight again on the recovered connection; the
// dead server had applied it, so it lands below the write pointer with the
// data already there, and must succeed, as on ublk.
func TestKernelRecoverAcceptsAZonedWriteTheDeadServerApplied(t *testing.T) {
	path, img, dev := newZonedImage(t, 8<<20, 4)
	z1 := int64(testZoneSize) // the first sequential zone
	dying := &applyThenDie{Zoned: &volume.Zoned{Img: img, Dev: dev}, off: z1, applied: make(chan struct{})}
	// The kernel sends a request that was in flight on a connection that
	// died again when the request times out: a short timeout keeps the
	// test short.
	opts := Options{Index: Any, BlockSize: 512, Timeout: 5 * time.Second, DeadConnTimeout: 60 * time.Second,
		BackendID: volume.BackendID(path)}
	d, err := Attach(dying, opts)
	if err != nil {
		t.Fatal(err)
	}
	dying.die = func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.closing = true
		for _, c := range d.conns {
			c.Close()
		}
	}
	f := vmtest.OpenDirect(t, d.Path())
	defer f.Close()
	a := vmtest.Pattern(64<<10, 31)
	held := make(chan error, 1)
	go func() { held <- vmtest.DirectWrite(f, a, z1, vmtest.AlignedBuf(t, 64<<10)) }()
	select {
	case <-dying.applied:
	case err := <-held:
		t.Fatalf("the write finished before the server died: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the write did not reach the server within 30s")
	}
	d.Close() // waits for the dead server's goroutines
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	v, err := volume.Open(path, image.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if z, _ := v.Zones().ZoneAt(z1); z.WritePointer != z1+int64(len(a)) {
		t.Fatalf("write pointer %#x after the dead server's write, want %#x", z.WritePointer, z1+int64(len(a)))
	}
	d2, err := Recover(d.Index, v.Backend, opts)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-held:
		if err != nil {
			t.Fatalf("the write the dead server applied, sent again after the recovery: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the held write did not finish within 60s of the recovery")
	}
	b := vmtest.Pattern(4096, 32)
	if err := vmtest.DirectWrite(f, b, z1+int64(len(a)), vmtest.AlignedBuf(t, 4096)); err != nil {
		t.Fatalf("the next write at the write pointer: %v", err)
	}
	if got := vmtest.DirectRead(t, f, z1, len(a)); !bytes.Equal(got, a) {
		t.Fatal("the zone does not hold the write")
	}
	f.Close()
	detach(t, d2)
}

// TestKernelDisconnectEndsServing: a DISCONNECT from outside (zq-csi
// detach) ends the serving side without error.
func TestKernelDisconnectEndsServing(t *testing.T) {
	img := newImage(t, 16<<20)
	d := attach(t, volume.Plain{Img: img}, Options{Index: Any})
	if err := Disconnect(d.Index); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("serving did not end after DISCONNECT")
	}
	if err := d.Wait(); err != nil {
		t.Fatalf("serving ended with %v", err)
	}
	waitDisconnected(t, d.Index)
	if err := Disconnect(d.Index); err == nil {
		// A second DISCONNECT of a free device is harmless in the
		// kernel; only check it does not hang.
		t.Logf("second DISCONNECT of nbd%d: ok", d.Index)
	}
}

func TestKernelRecoverWithoutDeadConnectionFails(t *testing.T) {
	img := newImage(t, 16<<20)
	d := attach(t, volume.Plain{Img: img}, Options{Index: Any})
	_, err := Recover(d.Index, volume.Plain{Img: img}, Options{Connections: 1})
	if err == nil {
		t.Fatal("Recover of a device whose connections are alive succeeded")
	}
	t.Logf("recover of a live device: %v", err)
	detach(t, d)
}

// TestKernelAttachCLI runs the zq-csi binary: attach, dd and fio against
// the device, detach; attach and SIGTERM; attach, SIGKILL and take the
// device back with attach --recover.
func TestKernelAttachCLI(t *testing.T) {
	bin := vmtest.ZQCSI(t, "../cmd/zq-csi")
	dir := t.TempDir()
	path := filepath.Join(dir, "cli.qcow2")
	if err := image.Create(path, image.CreateOptions{Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	pat := filepath.Join(dir, "pattern")
	if err := os.WriteFile(pat, vmtest.Pattern(4<<20, 31), 0o600); err != nil {
		t.Fatal(err)
	}

	// attach, dd, fio, detach.
	a := vmtest.StartAttach(t, bin, "/dev/nbd", "--backend", "nbd", "--connections", "2", path)
	vmtest.Run(t, "dd", "if="+pat, "of="+a.Dev, "bs=1M", "oflag=direct", "conv=fsync", "status=none")
	back := filepath.Join(dir, "back")
	vmtest.Run(t, "dd", "if="+a.Dev, "of="+back, "bs=1M", "count=4", "iflag=direct", "status=none")
	if got, _ := os.ReadFile(back); !bytes.Equal(got, vmtest.Pattern(4<<20, 31)) {
		t.Fatalf("dd read back from %s differs", a.Dev)
	}
	if _, err := exec.LookPath("fio"); err == nil {
		out := vmtest.Run(t, "fio", "--name=verify", "--filename="+a.Dev, "--rw=randwrite", "--bs=4k",
			"--offset=16M", "--size=4M", "--direct=1", "--ioengine=psync", "--verify=crc32c",
			"--do_verify=1", "--output-format=terse")
		t.Logf("fio: %d bytes of terse output", len(out))
	}
	vmtest.Run(t, bin, "detach", a.Dev)
	if err := a.Wait(t); err != nil {
		t.Fatalf("zq-csi attach after detach: %v; stderr: %s", err, a.Stderr)
	}
	index, _ := ParseDevice(a.Dev)
	waitDisconnected(t, index)
	img, err := image.Open(path, image.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4<<20)
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, vmtest.Pattern(4<<20, 31)) {
		t.Fatalf("image bytes after detach differ (%v)", err)
	}
	img.Close()
	vmtest.CheckImageClean(t, path)

	// SIGTERM disconnects, flushes and exits 0.
	a = vmtest.StartAttach(t, bin, "/dev/nbd", "--backend", "nbd", path)
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(t); err != nil {
		t.Fatalf("zq-csi attach after SIGTERM: %v; stderr: %s", err, a.Stderr)
	}
	index, _ = ParseDevice(a.Dev)
	waitDisconnected(t, index)

	// SIGKILL: the device stays, its I/O is held; attach --recover takes
	// it back.
	a = vmtest.StartAttach(t, bin, "/dev/nbd", "--backend", "nbd", "--dead-conn-timeout", "60", path)
	dev := a.Dev
	vmtest.Run(t, "dd", "if="+pat, "of="+dev, "bs=1M", "seek=8", "oflag=direct", "conv=fsync", "status=none")
	a.Cmd.Process.Kill()
	a.Wait(t)
	index, _ = ParseDevice(dev)
	if connected, err := Status(index); err != nil || !connected {
		t.Fatalf("%s after SIGKILL of its server: connected=%v, %v", dev, connected, err)
	}
	r := vmtest.StartAttach(t, bin, "/dev/nbd", "--recover", dev, path)
	if r.Dev != dev {
		t.Fatalf("attach --recover %s printed %s", dev, r.Dev)
	}
	vmtest.Run(t, "dd", "if="+dev, "of="+back, "bs=1M", "skip=8", "count=4", "iflag=direct", "status=none")
	if got, _ := os.ReadFile(back); !bytes.Equal(got, vmtest.Pattern(4<<20, 31)) {
		t.Fatalf("dd read back after attach --recover differs")
	}
	vmtest.Run(t, bin, "detach", dev)
	if err := r.Wait(t); err != nil {
		t.Fatalf("zq-csi attach --recover after detach: %v; stderr: %s", err, r.Stderr)
	}
	waitDisconnected(t, index)
	vmtest.CheckImageClean(t, path)
}
