package image

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/bits"
	"strings"
)

// On-disk constants of qcow2 version 3 (QEMU's docs/interop/qcow2.txt).
const (
	qcowMagic = 0x514649fb // "QFI\xfb"

	// Header lengths: version 3 without and with the compression_type field.
	headerV3Len     = 104
	headerV3CompLen = 112

	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureNames = 0x6803f857
	extBitmaps      = 0x23852875
	extCrypto       = 0x0537be77
	extDataFile     = 0x44415441

	// The largest tables QEMU accepts; a header asking for more is corrupt
	// or hostile, and refusing it keeps a bad header from costing gigabytes.
	maxL1Bytes       = 32 << 20
	maxRefTableBytes = 8 << 20
)

// Feature bits.
const (
	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtendedL2  = 1 << 4

	compatLazyRefcounts = 1 << 0

	// incompatKnown are the incompatible bits this package can honour.
	// Compression is known but only the zlib type is accepted.
	incompatKnown = incompatDirty | incompatCorrupt | incompatCompression | incompatExtendedL2 | incompatZoned
)

// Table entry bits.
const (
	flagCopied     = uint64(1) << 63 // L1/L2: refcount is exactly one
	flagCompressed = uint64(1) << 62 // L2: compressed cluster
	flagZero       = uint64(1) << 0  // L2 (standard entries): reads as zeros
	offsetMask     = uint64(0x00fffffffffffe00)
	l1Reserved     = uint64(0x7f000000000001ff)
	l2Reserved     = uint64(0x3f000000000001fe)
)

const (
	featureIncompatible = 0
	featureCompatible   = 1
	featureAutoclear    = 2
)

type featureName struct {
	kind uint8
	bit  uint8
	name string
}

// featureNames is the table this package writes, so that a tool that does
// not know a bit can still name it in its refusal.
var featureNames = []featureName{
	{featureIncompatible, 0, "dirty bit"},
	{featureIncompatible, 1, "corrupt bit"},
	{featureIncompatible, 2, "external data file"},
	{featureIncompatible, 3, "compression type"},
	{featureIncompatible, 4, "extended L2 entries"},
	{featureIncompatible, 5, "zoned format"},
	{featureCompatible, 0, "lazy refcounts"},
	{featureAutoclear, 0, "bitmaps"},
	{featureAutoclear, 1, "raw external data"},
}

// extension is a header extension kept as raw bytes so that one this
// package does not know survives a header rewrite.
type extension struct {
	typ  uint32
	data []byte
}

// header is the qcow2 header and its extensions.
type header struct {
	version               uint32
	backingFileOffset     uint64
	backingFileSize       uint32
	clusterBits           uint32
	size                  uint64
	cryptMethod           uint32
	l1Size                uint32
	l1TableOffset         uint64
	refcountTableOffset   uint64
	refcountTableClusters uint32
	nbSnapshots           uint32
	snapshotsOffset       uint64
	incompatible          uint64
	compatible            uint64
	autoclear             uint64
	refcountOrder         uint32
	headerLength          uint32
	compressionType       uint8

	// extensions other than the feature name table and the end marker, in
	// file order.
	extensions []extension
	// names is the feature name table read from the file, if any.
	names []featureName
	// backingFile is the name of the backing file as recorded (relative
	// to the image's directory unless absolute), "" for none.
	backingFile string
}

func (h *header) clusterSize() int64 { return 1 << h.clusterBits }

// l2Entries is the number of entries in one L2 table.
func (h *header) l2Entries() int64 {
	if h.incompatible&incompatExtendedL2 != 0 {
		return h.clusterSize() / 16
	}
	return h.clusterSize() / 8
}

// parseHeader decodes and validates the header in buf, the image's first
// cluster (or as much of the file as there is, if shorter). fileSize bounds
// the tables the header points to. It never modifies buf.
func parseHeader(buf []byte, fileSize int64) (*header, error) {
	be := binary.BigEndian
	if len(buf) < 72 {
		return nil, fmt.Errorf("file is %d bytes, too short for a qcow2 header: %w", len(buf), ErrCorrupt)
	}
	if m := be.Uint32(buf[0:]); m != qcowMagic {
		return nil, fmt.Errorf("not a qcow2 image: magic %#08x, want %#08x: %w", m, qcowMagic, ErrCorrupt)
	}
	h := &header{
		version:               be.Uint32(buf[4:]),
		backingFileOffset:     be.Uint64(buf[8:]),
		backingFileSize:       be.Uint32(buf[16:]),
		clusterBits:           be.Uint32(buf[20:]),
		size:                  be.Uint64(buf[24:]),
		cryptMethod:           be.Uint32(buf[32:]),
		l1Size:                be.Uint32(buf[36:]),
		l1TableOffset:         be.Uint64(buf[40:]),
		refcountTableOffset:   be.Uint64(buf[48:]),
		refcountTableClusters: be.Uint32(buf[56:]),
		nbSnapshots:           be.Uint32(buf[60:]),
		snapshotsOffset:       be.Uint64(buf[64:]),
	}
	switch h.version {
	case 3:
	case 2:
		return nil, fmt.Errorf("qcow2 version 2 (compat=0.10) images are not supported; upgrade with 'qemu-img amend -o compat=1.1': %w", ErrUnsupported)
	default:
		return nil, fmt.Errorf("qcow2 version %d: %w", h.version, ErrUnsupported)
	}
	if len(buf) < headerV3Len {
		return nil, fmt.Errorf("file is %d bytes, too short for a version 3 header: %w", len(buf), ErrCorrupt)
	}
	h.incompatible = be.Uint64(buf[72:])
	h.compatible = be.Uint64(buf[80:])
	h.autoclear = be.Uint64(buf[88:])
	h.refcountOrder = be.Uint32(buf[96:])
	h.headerLength = be.Uint32(buf[100:])

	if h.clusterBits < 9 || h.clusterBits > 21 {
		return nil, fmt.Errorf("cluster_bits %d outside 9..21: %w", h.clusterBits, ErrCorrupt)
	}
	cs := h.clusterSize()
	if h.headerLength < headerV3Len || h.headerLength%8 != 0 || int64(h.headerLength) > cs {
		return nil, fmt.Errorf("header_length %d: must be a multiple of 8 from %d to the cluster size %d: %w",
			h.headerLength, headerV3Len, cs, ErrCorrupt)
	}
	if int64(len(buf)) < int64(h.headerLength) {
		return nil, fmt.Errorf("file is %d bytes, shorter than header_length %d: %w", len(buf), h.headerLength, ErrCorrupt)
	}
	if h.headerLength > headerV3Len {
		h.compressionType = buf[104]
	}
	if h.refcountOrder > 6 {
		return nil, fmt.Errorf("refcount_order %d above 6: %w", h.refcountOrder, ErrCorrupt)
	}

	exts, names, err := parseExtensions(buf[h.headerLength:min(int64(len(buf)), cs)])
	if err != nil {
		return nil, err
	}
	h.extensions, h.names = exts, names

	if unknown := h.incompatible &^ incompatKnown; unknown != 0 {
		if unknown&incompatDataFile != 0 {
			return nil, fmt.Errorf("external data files are not supported: %w", ErrUnsupported)
		}
		return nil, fmt.Errorf("unsupported qcow2 feature(s): %s: %w", h.describeBits(featureIncompatible, unknown), ErrUnsupported)
	}
	if h.incompatible&incompatCompression != 0 || h.compressionType != 0 {
		if h.compressionType != 0 {
			name := "unknown"
			if h.compressionType == 1 {
				name = "zstd"
			}
			return nil, fmt.Errorf("compression type %d (%s): only zlib is supported: %w", h.compressionType, name, ErrUnsupported)
		}
	}
	if h.cryptMethod != 0 {
		return nil, fmt.Errorf("encrypted images (crypt_method %d) are not supported: %w", h.cryptMethod, ErrUnsupported)
	}
	if err := h.parseBacking(buf); err != nil {
		return nil, err
	}
	if h.incompatible&incompatExtendedL2 != 0 && cs < 16<<10 {
		return nil, fmt.Errorf("extended L2 entries with %d-byte clusters (minimum 16 KiB): %w", cs, ErrCorrupt)
	}

	if h.size%512 != 0 || h.size > 1<<62 {
		return nil, fmt.Errorf("virtual size %d is not a multiple of 512 or too large: %w", h.size, ErrCorrupt)
	}
	// The L1 table must map the whole virtual size and no more than QEMU allows.
	coverage := uint64(cs) * uint64(h.l2Entries())
	need := (h.size + coverage - 1) / coverage
	if uint64(h.l1Size) < need {
		return nil, fmt.Errorf("l1_size %d maps less than the virtual size %d (needs %d entries): %w", h.l1Size, h.size, need, ErrCorrupt)
	}
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return nil, fmt.Errorf("l1_size %d exceeds the %d MiB limit: %w", h.l1Size, maxL1Bytes>>20, ErrCorrupt)
	}
	if err := h.checkTable("L1 table", h.l1TableOffset, uint64(h.l1Size)*8, uint64(fileSize)); err != nil {
		return nil, err
	}
	if h.refcountTableClusters == 0 {
		return nil, fmt.Errorf("refcount_table_clusters is 0: %w", ErrCorrupt)
	}
	if uint64(h.refcountTableClusters)*uint64(cs) > maxRefTableBytes {
		return nil, fmt.Errorf("refcount table of %d clusters exceeds the %d MiB limit: %w", h.refcountTableClusters, maxRefTableBytes>>20, ErrCorrupt)
	}
	if err := h.checkTable("refcount table", h.refcountTableOffset, uint64(h.refcountTableClusters)*uint64(cs), uint64(fileSize)); err != nil {
		return nil, err
	}
	return h, nil
}

// checkTable validates that a table is cluster aligned and inside the file.
func (h *header) checkTable(what string, off, length, fileSize uint64) error {
	if off == 0 && length == 0 {
		return nil
	}
	if off%uint64(h.clusterSize()) != 0 || off == 0 {
		return fmt.Errorf("%s offset %#x is not a cluster-aligned offset past the header: %w", what, off, ErrCorrupt)
	}
	if off > fileSize || length > fileSize-off {
		return fmt.Errorf("%s at %#x, %d bytes, reaches past the end of the file (%d bytes): %w", what, off, length, fileSize, ErrCorrupt)
	}
	return nil
}

// maxBackingName is QEMU's limit on a backing file name, in bytes.
const maxBackingName = 1023

// parseBacking reads the backing file name and its format from the
// first cluster. Only a qcow2 backing file is accepted: the one format
// this package reads.
func (h *header) parseBacking(buf []byte) error {
	if h.backingFileOffset == 0 {
		if h.backingFileSize != 0 {
			return fmt.Errorf("backing_file_size %d without a backing_file_offset: %w", h.backingFileSize, ErrCorrupt)
		}
		return nil
	}
	end := h.backingFileOffset + uint64(h.backingFileSize)
	if h.backingFileSize == 0 || h.backingFileSize > maxBackingName || end > uint64(min(int64(len(buf)), h.clusterSize())) {
		return fmt.Errorf("backing file name at %#x, %d bytes, is empty, longer than %d bytes or past the first cluster: %w",
			h.backingFileOffset, h.backingFileSize, maxBackingName, ErrCorrupt)
	}
	h.backingFile = string(buf[h.backingFileOffset:end])
	for _, e := range h.extensions {
		if e.typ == extBackingFmt {
			if f := string(bytes.TrimRight(e.data, "\x00")); f != "qcow2" {
				return fmt.Errorf("backing file %q has format %q: only qcow2 backing files are supported: %w", h.backingFile, f, ErrUnsupported)
			}
		}
	}
	return nil
}

// describeBits names the set bits of one feature kind, from the image's own
// feature name table where it has one.
func (h *header) describeBits(kind uint8, set uint64) string {
	var parts []string
	for b := range 64 {
		if set&(1<<b) == 0 {
			continue
		}
		name := fmt.Sprintf("bit %d", b)
		for _, f := range h.names {
			if f.kind == kind && int(f.bit) == b {
				name = f.name
			}
		}
		parts = append(parts, name)
	}
	return strings.Join(parts, ", ")
}

// parseExtensions reads header extensions from buf up to the end marker.
func parseExtensions(buf []byte) ([]extension, []featureName, error) {
	be := binary.BigEndian
	var exts []extension
	var names []featureName
	for off := 0; ; {
		if len(buf)-off < 8 {
			return nil, nil, fmt.Errorf("header extensions run past the first cluster at byte %d: %w", off, ErrCorrupt)
		}
		typ := be.Uint32(buf[off:])
		length := int(be.Uint32(buf[off+4:]))
		off += 8
		if typ == extEnd {
			return exts, names, nil
		}
		if length > len(buf)-off {
			return nil, nil, fmt.Errorf("header extension %#08x of %d bytes runs past the first cluster: %w", typ, length, ErrCorrupt)
		}
		data := buf[off : off+length]
		off += (length + 7) &^ 7
		if off > len(buf) {
			off = len(buf)
		}
		if typ == extFeatureNames {
			for i := 0; i+48 <= len(data); i += 48 {
				names = append(names, featureName{
					kind: data[i],
					bit:  data[i+1],
					name: string(bytes.TrimRight(data[i+2:i+48], "\x00")),
				})
			}
			continue
		}
		exts = append(exts, extension{typ: typ, data: bytes.Clone(data)})
	}
}

// encode serializes the header and its extensions, ending with the feature
// name table this package writes and the end marker. The result fits in the
// first cluster or encode fails.
func (h *header) encode() ([]byte, error) {
	be := binary.BigEndian
	buf := make([]byte, headerV3CompLen)
	be.PutUint32(buf[0:], qcowMagic)
	be.PutUint32(buf[4:], 3)
	be.PutUint64(buf[8:], h.backingFileOffset)
	be.PutUint32(buf[16:], h.backingFileSize)
	be.PutUint32(buf[20:], h.clusterBits)
	be.PutUint64(buf[24:], h.size)
	be.PutUint32(buf[32:], h.cryptMethod)
	be.PutUint32(buf[36:], h.l1Size)
	be.PutUint64(buf[40:], h.l1TableOffset)
	be.PutUint64(buf[48:], h.refcountTableOffset)
	be.PutUint32(buf[56:], h.refcountTableClusters)
	be.PutUint32(buf[60:], h.nbSnapshots)
	be.PutUint64(buf[64:], h.snapshotsOffset)
	be.PutUint64(buf[72:], h.incompatible)
	be.PutUint64(buf[80:], h.compatible)
	be.PutUint64(buf[88:], h.autoclear)
	be.PutUint32(buf[96:], h.refcountOrder)
	be.PutUint32(buf[100:], headerV3CompLen)
	buf[104] = h.compressionType
	h.headerLength = headerV3CompLen

	putExt := func(typ uint32, data []byte) {
		var hd [8]byte
		be.PutUint32(hd[0:], typ)
		be.PutUint32(hd[4:], uint32(len(data)))
		buf = append(buf, hd[:]...)
		buf = append(buf, data...)
		buf = append(buf, make([]byte, (8-len(data)%8)%8)...)
	}
	for _, e := range h.extensions {
		putExt(e.typ, e.data)
	}
	// The feature name table is a courtesy to tools that do not know a bit;
	// with 512-byte clusters it may not fit beside other extensions.
	withoutNames := len(buf)
	table := make([]byte, 0, 48*len(featureNames))
	for _, f := range featureNames {
		entry := make([]byte, 48)
		entry[0], entry[1] = f.kind, f.bit
		copy(entry[2:], f.name)
		table = append(table, entry...)
	}
	putExt(extFeatureNames, table)
	if int64(len(buf))+8 > h.clusterSize() {
		buf = buf[:withoutNames]
	}
	putExt(extEnd, nil)
	if h.backingFile == "" {
		h.backingFileOffset, h.backingFileSize = 0, 0
		be.PutUint64(buf[8:], 0)
		be.PutUint32(buf[16:], 0)
	} else {
		// QEMU's place for the name is right after the extensions. A name
		// placed further on (by switchBacking, or another tool) stays
		// where it is: a header rewrite that moved it could be torn
		// between the sector with its place and the one with its bytes.
		if h.backingFileOffset < uint64(len(buf)) {
			h.backingFileOffset = uint64(len(buf))
		}
		h.backingFileSize = uint32(len(h.backingFile))
		be.PutUint64(buf[8:], h.backingFileOffset)
		be.PutUint32(buf[16:], h.backingFileSize)
		if h.backingFileOffset+uint64(h.backingFileSize) > uint64(h.clusterSize()) {
			return nil, fmt.Errorf("backing file name at %#x, %d bytes, would end past the first cluster: %w", h.backingFileOffset, h.backingFileSize, ErrUnsupported)
		}
		buf = append(buf, make([]byte, h.backingFileOffset-uint64(len(buf)))...)
		buf = append(buf, h.backingFile...)
	}
	if int64(len(buf)) > h.clusterSize() {
		return nil, fmt.Errorf("header and extensions take %d bytes, more than one %d-byte cluster: %w", len(buf), h.clusterSize(), ErrUnsupported)
	}
	return buf, nil
}

// refcount geometry helpers.

func (h *header) refcountBits() int { return 1 << h.refcountOrder }

// refblockEntries is the number of refcounts in one refcount block.
func (h *header) refblockEntries() int64 {
	return h.clusterSize() * 8 / int64(h.refcountBits())
}

func isPowerOfTwo(v int64) bool { return v > 0 && bits.OnesCount64(uint64(v)) == 1 }
