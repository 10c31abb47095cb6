//! qcow2 (versions 2 and 3): header, header extensions, backing file name, bitmap directory
//! and the internal snapshot table, read with QEMU's limits.
//!
//! Everything is kept, including what this crate does not understand (unknown header
//! extensions, unknown snapshot extra data, header bytes past the known fields), so that a
//! later rewrite can preserve it.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use crate::window::{align8, be16, be32, be64, Window};

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest cluster_bits QEMU accepts (512 B clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Most internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table QEMU accepts, in bytes.
pub const MAX_SNAPSHOT_TABLE_SIZE: u64 = 64 * 1024 * 1024;
/// Largest extra data of one snapshot entry QEMU accepts, in bytes.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Longest backing file name QEMU accepts, in bytes.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Largest active L1 table QEMU accepts, in bytes.
pub const MAX_L1_TABLE_SIZE: u64 = 32 * 1024 * 1024;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_SIZE: u64 = 8 * 1024 * 1024;
/// Most persistent bitmaps QEMU accepts.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory QEMU accepts, in bytes.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name QEMU accepts, in bytes.
pub const MAX_BITMAP_NAME: u16 = 1023;
/// QEMU's buffer for the backing format name (the name must be shorter).
pub const MAX_BACKING_FORMAT_LEN: u32 = 16;

/// Incompatible feature bit 0: the image was not closed cleanly (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is raw (readable without the metadata).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const KNOWN_INCOMPAT: u64 = 0x1f;
const KNOWN_COMPAT: u64 = 0x1;
const KNOWN_AUTOCLEAR: u64 = 0x3;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension type: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Size of the version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Size of the version 3 header without the compression type (the minimum header_length).
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// How much of cluster 0 we read first (headers are small).
const FIRST_READ: u64 = 4096;

/// The qcow2 header. All fields big-endian; the comment of each field gives its byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes 4-7: 2 or 3.
    pub version: u32,
    /// Bytes 8-15: offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Bytes 16-19: length of the backing file name (no NUL).
    pub backing_file_size: u32,
    /// Bytes 20-23: log2 of the cluster size.
    pub cluster_bits: u32,
    /// Bytes 24-31: virtual disk size in bytes.
    pub size: u64,
    /// Bytes 32-35: 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Bytes 36-39: entries in the active L1 table.
    pub l1_size: u32,
    /// Bytes 40-47: offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Bytes 48-55: offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Bytes 56-59: clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Bytes 60-63: number of internal snapshots.
    pub nb_snapshots: u32,
    /// Bytes 64-71: offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Bytes 72-79 (v3): incompatible feature bits.
    pub incompatible_features: u64,
    /// Bytes 80-87 (v3): compatible feature bits.
    pub compatible_features: u64,
    /// Bytes 88-95 (v3): autoclear feature bits.
    pub autoclear_features: u64,
    /// Bytes 96-99 (v3): refcount_bits = 1 << refcount_order (v2: 4).
    pub refcount_order: u32,
    /// Bytes 100-103 (v3): header length (v2: 72).
    pub header_length: u32,
    /// Byte 104 (v3, header_length > 104): 0 zlib (deflate), 1 zstd.
    pub compression_type: u8,
    /// Bytes 105..header_length: padding and fields unknown to us, kept as they are.
    pub header_tail: Vec<u8>,
}

impl Header {
    /// Parse and validate the header from the start of cluster 0 (`buf` holds at least 72
    /// bytes, and `header_length` bytes for v3). Checks mirror QEMU's open checks.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(Error::new(ErrorKind::Truncated, "qcow2 header is truncated").at(0));
        }
        if buf[0..4] != MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)", 0));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("unsupported qcow2 version {version}"),
            )
            .at(4));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
            header_tail: Vec::new(),
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(Error::invalid(
                format!("unsupported cluster size: 2^{}", h.cluster_bits),
                20,
            ));
        }
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LENGTH as usize {
                return Err(Error::new(ErrorKind::Truncated, "qcow2 header is truncated").at(0));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LENGTH {
                return Err(Error::invalid("qcow2 header too small", 100));
            }
            if u64::from(h.header_length) > h.cluster_size() {
                return Err(Error::invalid("qcow2 header exceeds cluster size", 100));
            }
            if buf.len() < h.header_length as usize {
                return Err(Error::new(ErrorKind::Truncated, "qcow2 header is truncated").at(0));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
                h.header_tail = buf[105..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid("refcount width exceeds 64 bits", 96));
        }
        if h.crypt_method > 2 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("unsupported encryption method {}", h.crypt_method),
            )
            .at(32));
        }
        if h.compression_type > 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown compression type {}", h.compression_type),
            )
            .at(104));
        }
        if h.compression_type != 0 && h.incompatible_features & INCOMPAT_COMPRESSION == 0 {
            return Err(Error::invalid(
                "compression type set but the compression incompatible feature bit is clear",
                72,
            ));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 && h.cluster_bits < 14 {
            return Err(Error::invalid(
                "extended L2 entries need clusters of at least 16 KiB",
                20,
            ));
        }
        if h.backing_file_offset != 0 {
            if h.backing_file_offset > h.cluster_size() {
                return Err(Error::invalid("invalid backing file offset", 8));
            }
            if h.backing_file_size > MAX_BACKING_FILE_NAME
                || u64::from(h.backing_file_size) > h.cluster_size() - h.backing_file_offset
            {
                return Err(
                    Error::new(ErrorKind::LimitExceeded, "backing file name too long").at(16),
                );
            }
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_TABLE_SIZE {
            return Err(Error::new(ErrorKind::LimitExceeded, "active L1 table too large").at(36));
        }
        if u64::from(h.refcount_table_clusters) << h.cluster_bits > MAX_REFTABLE_SIZE {
            return Err(
                Error::new(ErrorKind::LimitExceeded, "reference count table too large").at(56),
            );
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::new(ErrorKind::LimitExceeded, "too many snapshots").at(60));
        }
        if h.nb_snapshots > 0 && h.snapshots_offset % h.cluster_size() != 0 {
            return Err(Error::invalid("snapshot table offset invalid", 64));
        }
        Ok(h)
    }

    /// Encode the header into `header_length` bytes (the inverse of [`Header::parse`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_length.max(V2_HEADER_LENGTH) as usize];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 && b.len() >= V3_MIN_HEADER_LENGTH as usize {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if b.len() > 104 {
                b[104] = self.compression_type;
                let n = self.header_tail.len().min(b.len() - 105);
                b[105..105 + n].copy_from_slice(&self.header_tail[..n]);
            }
        }
        b
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }
    /// Width of a refcount entry in bits (1..=64).
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order.min(6)
    }
    /// Dirty bit (v3 incompatible bit 0).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }
    /// Corrupt bit (v3 incompatible bit 1).
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    /// Extended L2 entries (v3 incompatible bit 4).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    /// Lazy refcounts (v3 compatible bit 0).
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    /// Name of the compression type as QEMU reports it.
    pub fn compression_type_name(&self) -> &'static str {
        match self.compression_type {
            1 => "zstd",
            _ => "zlib",
        }
    }
    /// Feature bits set in the header that this crate does not know, as (type, bit).
    pub fn unknown_feature_bits(&self) -> Vec<(FeatureType, u8)> {
        let mut out = Vec::new();
        for (ty, bits, known) in [
            (
                FeatureType::Incompatible,
                self.incompatible_features,
                KNOWN_INCOMPAT,
            ),
            (
                FeatureType::Compatible,
                self.compatible_features,
                KNOWN_COMPAT,
            ),
            (
                FeatureType::Autoclear,
                self.autoclear_features,
                KNOWN_AUTOCLEAR,
            ),
        ] {
            for bit in 0..64u8 {
                if (bits & !known) & (1u64 << bit) != 0 {
                    out.push((ty, bit));
                }
            }
        }
        out
    }
}

/// The three kinds of feature bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureType {
    /// Readers that do not know the bit must refuse the image.
    Incompatible,
    /// Readers may ignore the bit.
    Compatible,
    /// Writers that do not know the bit must clear it.
    Autoclear,
    /// A feature name table entry of another type (kept as is).
    Other(u8),
}

impl FeatureType {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => FeatureType::Incompatible,
            1 => FeatureType::Compatible,
            2 => FeatureType::Autoclear,
            o => FeatureType::Other(o),
        }
    }
    /// Lower-case name: "incompatible", "compatible", "autoclear" or "other".
    pub fn as_str(&self) -> &'static str {
        match self {
            FeatureType::Incompatible => "incompatible",
            FeatureType::Compatible => "compatible",
            FeatureType::Autoclear => "autoclear",
            FeatureType::Other(_) => "other",
        }
    }
}

/// One entry of the feature name table extension (48 bytes: type, bit, 46-byte name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Byte 0: the feature type.
    pub feature_type: FeatureType,
    /// Byte 1: the bit number.
    pub bit: u8,
    /// Bytes 2-47: the name, NUL-padded (padding removed here).
    pub name: Vec<u8>,
}

/// The bitmaps extension (24 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Bytes 0-3: number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Bytes 4-7: reserved (kept).
    pub reserved: u32,
    /// Bytes 8-15: size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Bytes 16-23: offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A header extension (type u32, length u32, data padded to 8 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// 0xe2792aca: name of the backing file's format.
    BackingFormat(Vec<u8>),
    /// 0x6803f857: names of feature bits.
    FeatureNames(Vec<FeatureName>),
    /// 0x23852875: persistent dirty bitmaps.
    Bitmaps(BitmapsExtension),
    /// 0x0537be77: where the LUKS header lives.
    Crypto {
        /// Offset of the encryption header.
        offset: u64,
        /// Length of the encryption header.
        length: u64,
    },
    /// 0x44415441: name of the external data file.
    DataFile(Vec<u8>),
    /// An extension this crate does not know, kept byte for byte.
    Unknown {
        /// The extension's type.
        ext_type: u32,
        /// Its data (without padding).
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The extension's type number.
    pub fn ext_type(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNames(_) => EXT_FEATURE_NAMES,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::Crypto { .. } => EXT_CRYPTO,
            HeaderExtension::DataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { ext_type, .. } => *ext_type,
        }
    }

    /// The extension's data, without the 8-byte type/length prefix and without padding.
    pub fn data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(d) | HeaderExtension::DataFile(d) => d.clone(),
            HeaderExtension::Unknown { data, .. } => data.clone(),
            HeaderExtension::FeatureNames(v) => {
                let mut b = Vec::with_capacity(v.len() * 48);
                for f in v {
                    let mut e = [0u8; 48];
                    e[0] = match f.feature_type {
                        FeatureType::Incompatible => 0,
                        FeatureType::Compatible => 1,
                        FeatureType::Autoclear => 2,
                        FeatureType::Other(o) => o,
                    };
                    e[1] = f.bit;
                    let n = f.name.len().min(46);
                    e[2..2 + n].copy_from_slice(&f.name[..n]);
                    b.extend_from_slice(&e);
                }
                b
            }
            HeaderExtension::Bitmaps(x) => {
                let mut b = Vec::with_capacity(24);
                b.extend_from_slice(&x.nb_bitmaps.to_be_bytes());
                b.extend_from_slice(&x.reserved.to_be_bytes());
                b.extend_from_slice(&x.directory_size.to_be_bytes());
                b.extend_from_slice(&x.directory_offset.to_be_bytes());
                b
            }
            HeaderExtension::Crypto { offset, length } => {
                let mut b = offset.to_be_bytes().to_vec();
                b.extend_from_slice(&length.to_be_bytes());
                b
            }
        }
    }

    /// Encode as stored: type, length, data padded to 8 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.data();
        let mut b = Vec::with_capacity(8 + align8(data.len() as u64) as usize);
        b.extend_from_slice(&self.ext_type().to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(&data);
        b.resize(align8(b.len() as u64) as usize, 0);
        b
    }
}

/// Encode a list of extensions followed by the end marker.
pub fn encode_extensions(exts: &[HeaderExtension]) -> Vec<u8> {
    let mut b: Vec<u8> = exts.iter().flat_map(HeaderExtension::encode).collect();
    b.extend_from_slice(&[0u8; 8]);
    b
}

/// Bitmap flag bit 0: the bitmap was in use (and may be inconsistent).
pub const BITMAP_IN_USE: u32 = 1 << 0;
/// Bitmap flag bit 1: the bitmap is enabled (tracks writes).
pub const BITMAP_AUTO: u32 = 1 << 1;
/// Bitmap flag bit 2: extra data may be ignored by readers that do not know it.
pub const BITMAP_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;

/// One bitmap directory entry. The comment of each field gives its offset in the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Bytes 0-7: offset of the bitmap table.
    pub table_offset: u64,
    /// Bytes 8-11: entries in the bitmap table.
    pub table_size: u32,
    /// Bytes 12-15: flags (in_use, auto, extra_data_compatible).
    pub flags: u32,
    /// Byte 16: type (1 = dirty tracking bitmap).
    pub bitmap_type: u8,
    /// Byte 17: log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Extra data (bytes 24..), kept.
    pub extra_data: Vec<u8>,
    /// The name (after the extra data).
    pub name: Vec<u8>,
}

impl Bitmap {
    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }
    /// Flag names as QEMU reports them ("in-use", "auto").
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & BITMAP_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & BITMAP_AUTO != 0 {
            v.push("auto");
        }
        v
    }
}

/// Known fields of a snapshot's extra data; the rest is kept in `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotExtra {
    /// Extra bytes 0-7: VM state size (64-bit).
    pub vm_state_size_large: Option<u64>,
    /// Extra bytes 8-15: virtual disk size at snapshot time.
    pub disk_size: Option<u64>,
    /// Extra bytes 16-23: instruction count (-1 = none).
    pub icount: Option<u64>,
    /// Extra bytes 24..: data unknown to us, kept (also the partial tail of a known field).
    pub unknown: Vec<u8>,
}

/// One snapshot table entry. Offsets are relative to the entry's start (8-byte aligned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Where the entry starts in the image.
    pub entry_offset: u64,
    /// Bytes 0-7: offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Bytes 8-11: entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Bytes 16-19: seconds since the epoch.
    pub date_sec: u32,
    /// Bytes 20-23: nanoseconds.
    pub date_nsec: u32,
    /// Bytes 24-31: guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes 32-35: VM state size (0 if it does not fit in 32 bits).
    pub vm_state_size_32: u32,
    /// Bytes 40..: the extra data (its size is bytes 36-39).
    pub extra: SnapshotExtra,
    /// The id (length in bytes 12-13), not NUL-terminated.
    pub id: Vec<u8>,
    /// The name (length in bytes 14-15), not NUL-terminated, may repeat, may not be UTF-8.
    pub name: Vec<u8>,
}

impl Snapshot {
    /// Size of the extra data in bytes.
    pub fn extra_data_size(&self) -> usize {
        let known = if self.extra.icount.is_some() {
            24
        } else if self.extra.disk_size.is_some() {
            16
        } else if self.extra.vm_state_size_large.is_some() {
            8
        } else {
            0
        };
        known + self.extra.unknown.len()
    }
    /// VM state size in bytes (the 64-bit field when present).
    pub fn vm_state_size(&self) -> u64 {
        self.extra
            .vm_state_size_large
            .unwrap_or(u64::from(self.vm_state_size_32))
    }
    /// The instruction count, if recorded (QEMU treats -1 as none).
    pub fn icount(&self) -> Option<u64> {
        self.extra.icount.filter(|&i| i != u64::MAX)
    }
    /// Size of the encoded entry including padding to 8 bytes.
    pub fn encoded_len(&self) -> u64 {
        align8(40 + self.extra_data_size() as u64 + self.id.len() as u64 + self.name.len() as u64)
    }
    /// Encode the entry, padded to a multiple of 8 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.encoded_len() as usize);
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.date_sec.to_be_bytes());
        b.extend_from_slice(&self.date_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&self.vm_state_size_32.to_be_bytes());
        b.extend_from_slice(&(self.extra_data_size() as u32).to_be_bytes());
        for v in [
            self.extra.vm_state_size_large,
            self.extra.disk_size,
            self.extra.icount,
        ]
        .into_iter()
        .flatten()
        {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&self.extra.unknown);
        b.extend_from_slice(&self.id);
        b.extend_from_slice(&self.name);
        b.resize(align8(b.len() as u64) as usize, 0);
        b
    }
}

/// Everything the metadata of a qcow2 image says (no guest data, no refcounts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2 {
    /// The header.
    pub header: Header,
    /// The header extensions in file order, including unknown ones.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name as recorded (bytes).
    pub backing_file: Option<Vec<u8>>,
    /// The bitmap directory (empty without the extension or when the autoclear bit is clear,
    /// as QEMU then ignores the bitmaps).
    pub bitmaps: Vec<Bitmap>,
    /// The internal snapshots in table order.
    pub snapshots: Vec<Snapshot>,
    /// The LUKS header of a LUKS-encrypted image (crypt_method 2).
    pub luks: Option<crate::luks::LuksHeader>,
}

impl Qcow2 {
    /// Read the metadata of a qcow2 image.
    pub fn read<S: Storage + ?Sized>(storage: &S) -> Result<Qcow2> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot get the image size", e))?;
        let mut head = Window::new(storage, 0, 1 << MAX_CLUSTER_BITS, file_len, "qcow2 header");
        head.prefetch(FIRST_READ)?;
        let fixed = head.get(0, u64::from(V2_HEADER_LENGTH))?.to_vec();
        if fixed[0..4] != MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)", 0));
        }
        let hlen = if be32(&fixed, 4) == 3 {
            let b = head.get(0, u64::from(V3_MIN_HEADER_LENGTH))?;
            u64::from(be32(b, 100)).clamp(u64::from(V3_MIN_HEADER_LENGTH), 1 << MAX_CLUSTER_BITS)
        } else {
            u64::from(V2_HEADER_LENGTH)
        };
        let header = Header::parse(head.get(0, hlen)?)?;
        let cluster_size = header.cluster_size();

        // Extensions: from the end of the header to the backing file name or the cluster end.
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        let extensions = read_extensions(&mut head, u64::from(header.header_length), ext_end)?;

        let backing_file = if header.backing_file_offset != 0 {
            let mut name = vec![0u8; header.backing_file_size as usize];
            storage
                .read_at(&mut name, header.backing_file_offset)
                .map_err(|e| {
                    Error::io("cannot read the backing file name", e).at(header.backing_file_offset)
                })?;
            Some(name)
        } else {
            None
        };

        let mut img = Qcow2 {
            header,
            extensions,
            backing_file,
            bitmaps: Vec::new(),
            snapshots: Vec::new(),
            luks: None,
        };
        img.validate_extensions()?;
        if let Some(ext) = img.bitmaps_extension().cloned() {
            if img.header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
                img.bitmaps = read_bitmap_directory(storage, &ext, cluster_size, file_len)?;
            }
        }
        img.snapshots = read_snapshot_table(storage, &img.header, file_len)?;
        if img.header.crypt_method == 2 {
            img.luks = Some(read_luks(storage, &img)?);
        }
        Ok(img)
    }

    fn validate_extensions(&self) -> Result<()> {
        for e in &self.extensions {
            if let HeaderExtension::Crypto { .. } = e {
                if self.header.crypt_method != 2 {
                    return Err(Error::invalid(
                        "crypto header extension only expected with LUKS encryption",
                        u64::from(self.header.header_length),
                    ));
                }
            }
        }
        if self.header.incompatible_features & INCOMPAT_DATA_FILE == 0
            && self.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
        {
            // QEMU clears the bit on a rw open; read-only it is just reported (as absent).
        }
        Ok(())
    }

    /// The recorded backing file format, if any.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.as_slice()),
            _ => None,
        })
    }
    /// The external data file name, if any.
    pub fn data_file(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::DataFile(f) => Some(f.as_slice()),
            _ => None,
        })
    }
    /// Does guest data live in an external data file?
    pub fn has_data_file(&self) -> bool {
        self.header.incompatible_features & INCOMPAT_DATA_FILE != 0
    }
    /// Is the external data file raw (autoclear bit 1, only meaningful with a data file)?
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }
    /// The bitmaps extension, if any.
    pub fn bitmaps_extension(&self) -> Option<&BitmapsExtension> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(b),
            _ => None,
        })
    }
    /// The feature name table (empty if absent).
    pub fn feature_names(&self) -> impl Iterator<Item = &FeatureName> {
        self.extensions.iter().flat_map(|e| match e {
            HeaderExtension::FeatureNames(v) => v.as_slice(),
            _ => &[],
        })
    }
    /// Feature bits set that this crate does not know, named through the feature name table
    /// when it has an entry for them.
    pub fn unknown_features(&self) -> Vec<UnknownFeature> {
        self.header
            .unknown_feature_bits()
            .into_iter()
            .map(|(ty, bit)| UnknownFeature {
                feature_type: ty,
                bit,
                name: self
                    .feature_names()
                    .find(|f| f.feature_type == ty && f.bit == bit)
                    .map(|f| String::from_utf8_lossy(&f.name).into_owned()),
            })
            .collect()
    }
}

/// A feature bit set in the header that this crate does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFeature {
    /// Which feature field.
    pub feature_type: FeatureType,
    /// The bit number.
    pub bit: u8,
    /// Its name from the image's feature name table, if there is one.
    pub name: Option<String>,
}

fn read_luks<S: Storage + ?Sized>(storage: &S, img: &Qcow2) -> Result<crate::luks::LuksHeader> {
    let off = img
        .extensions
        .iter()
        .find_map(|e| match e {
            HeaderExtension::Crypto { offset, .. } => Some(*offset),
            _ => None,
        })
        .ok_or_else(|| {
            Error::invalid(
                "LUKS encryption without the crypto header extension",
                u64::from(img.header.header_length),
            )
        })?;
    let mut b = vec![0u8; crate::luks::HEADER_SIZE];
    storage
        .read_at(&mut b, off)
        .map_err(|e| Error::io("cannot read the LUKS header", e).at(off))?;
    crate::luks::LuksHeader::parse(&b).map_err(|e| e.at(off))
}

fn read_extensions<S: Storage + ?Sized>(
    head: &mut Window<'_, S>,
    start: u64,
    end: u64,
) -> Result<Vec<HeaderExtension>> {
    let mut exts = Vec::new();
    let mut off = start;
    while off < end {
        if end - off < 8 {
            // Not enough room for another extension header: QEMU stops here too.
            break;
        }
        let (ty, len) = match head.get(off, 8) {
            Ok(b) => (be32(b, 0), be32(b, 4)),
            // The file ends inside cluster 0 (possible for tiny images): no more extensions.
            Err(e) if e.kind() == ErrorKind::Truncated => break,
            Err(e) => return Err(e),
        };
        let data_off = off + 8;
        if u64::from(len) > end - data_off {
            return Err(Error::invalid("header extension too large", off));
        }
        if ty == EXT_END {
            break;
        }
        let data = head.get(data_off, u64::from(len))?;
        let ext = match ty {
            EXT_BACKING_FORMAT => {
                if len >= MAX_BACKING_FORMAT_LEN {
                    return Err(Error::new(
                        ErrorKind::LimitExceeded,
                        format!("backing format name too long ({len} bytes)"),
                    )
                    .at(off));
                }
                HeaderExtension::BackingFormat(data.to_vec())
            }
            EXT_FEATURE_NAMES => HeaderExtension::FeatureNames(
                data.chunks_exact(48)
                    .map(|c| FeatureName {
                        feature_type: FeatureType::from_u8(c[0]),
                        bit: c[1],
                        name: c[2..].split(|&b| b == 0).next().unwrap_or(&[]).to_vec(),
                    })
                    .collect(),
            ),
            EXT_BITMAPS => {
                if len != 24 {
                    return Err(Error::invalid("bitmaps extension: invalid length", off));
                }
                let b = BitmapsExtension {
                    nb_bitmaps: be32(data, 0),
                    reserved: be32(data, 4),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                };
                if b.reserved != 0 {
                    return Err(Error::invalid("bitmaps extension: reserved field set", off));
                }
                if b.nb_bitmaps == 0 {
                    return Err(Error::invalid("bitmaps extension with zero bitmaps", off));
                }
                if b.nb_bitmaps > MAX_BITMAPS {
                    return Err(Error::new(
                        ErrorKind::LimitExceeded,
                        "too many persistent bitmaps",
                    )
                    .at(off));
                }
                if b.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                    return Err(
                        Error::new(ErrorKind::LimitExceeded, "bitmap directory too large").at(off),
                    );
                }
                HeaderExtension::Bitmaps(b)
            }
            EXT_CRYPTO => {
                if len != 16 {
                    return Err(Error::invalid(
                        "crypto header extension: invalid length",
                        off,
                    ));
                }
                HeaderExtension::Crypto {
                    offset: be64(data, 0),
                    length: be64(data, 8),
                }
            }
            EXT_DATA_FILE => HeaderExtension::DataFile(data.to_vec()),
            _ => HeaderExtension::Unknown {
                ext_type: ty,
                data: data.to_vec(),
            },
        };
        exts.push(ext);
        off = data_off + align8(u64::from(len));
    }
    Ok(exts)
}

fn read_bitmap_directory<S: Storage + ?Sized>(
    storage: &S,
    ext: &BitmapsExtension,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<Bitmap>> {
    let base = ext.directory_offset;
    if base % cluster_size != 0 {
        return Err(Error::invalid(
            "bitmap directory offset not cluster aligned",
            base,
        ));
    }
    let size = ext.directory_size;
    if size > file_len.saturating_sub(base) {
        return Err(Error::new(
            ErrorKind::Truncated,
            "bitmap directory extends past the end of the image",
        )
        .at(base));
    }
    let mut w = Window::new(storage, base, size, file_len, "bitmap directory");
    w.prefetch(size)?;
    let mut out = Vec::with_capacity((ext.nb_bitmaps as u64).min(size / 24) as usize);
    let mut off = 0u64;
    for _ in 0..ext.nb_bitmaps {
        let e = w.get(off, 24)?;
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let bitmap_type = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18);
        let extra_size = be32(e, 20);
        if name_size > MAX_BITMAP_NAME {
            return Err(Error::invalid("bitmap name too long", base + off));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(Error::invalid(
                "bitmap granularity out of range",
                base + off,
            ));
        }
        let extra = w.get(off + 24, u64::from(extra_size))?.to_vec();
        let name = w
            .get(off + 24 + u64::from(extra_size), u64::from(name_size))?
            .to_vec();
        out.push(Bitmap {
            table_offset,
            table_size,
            flags,
            bitmap_type,
            granularity_bits,
            extra_data: extra,
            name,
        });
        off = align8(off + 24 + u64::from(extra_size) + u64::from(name_size));
    }
    if off != size {
        return Err(Error::invalid(
            "bitmap directory size does not match its entries",
            base,
        ));
    }
    Ok(out)
}

/// Read the snapshot table: one large read covering the expected size, growing geometrically
/// if the entries turn out larger, bounded by QEMU's limits and the file size.
fn read_snapshot_table<S: Storage + ?Sized>(
    storage: &S,
    h: &Header,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    let n = h.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    let base = h.snapshots_offset;
    let mut w = Window::new(
        storage,
        base,
        MAX_SNAPSHOT_TABLE_SIZE,
        file_len,
        "snapshot table",
    );
    // Typical entries (qemu-img: 24 bytes of extra data, short id and name) take 72-96 bytes.
    w.prefetch(u64::from(n) * 128)?;
    // Every entry takes at least 40 bytes: never reserve more than the file could hold.
    let cap = u64::from(n).min(file_len.saturating_sub(base) / 40) as usize;
    let mut out = Vec::with_capacity(cap);
    let mut off = 0u64;
    for i in 0..n {
        off = align8(off);
        let entry_offset = base + off;
        let e = w.get(off, 40)?;
        let l1_table_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = be16(e, 12);
        let name_len = be16(e, 14);
        let date_sec = be32(e, 16);
        let date_nsec = be32(e, 20);
        let vm_clock_nsec = be64(e, 24);
        let vm_state_size_32 = be32(e, 32);
        let extra_size = be32(e, 36);
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!("too much extra metadata in snapshot table entry {i}"),
            )
            .at(entry_offset + 36));
        }
        let x = w.get(off + 40, u64::from(extra_size))?;
        let field = |k: usize| (x.len() >= (k + 1) * 8).then(|| be64(x, k * 8));
        let known = (x.len() / 8).min(3) * 8;
        let extra = SnapshotExtra {
            vm_state_size_large: field(0),
            disk_size: field(1),
            icount: field(2),
            unknown: x[known..].to_vec(),
        };
        let mut p = off + 40 + u64::from(extra_size);
        let id = w.get(p, u64::from(id_len))?.to_vec();
        p += u64::from(id_len);
        let name = w.get(p, u64::from(name_len))?.to_vec();
        p += u64::from(name_len);
        if p > MAX_SNAPSHOT_TABLE_SIZE {
            return Err(Error::new(ErrorKind::LimitExceeded, "snapshot table is too big").at(base));
        }
        out.push(Snapshot {
            entry_offset,
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size_32,
            extra,
            id,
            name,
        });
        off = p;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_encode_roundtrip_lengths() {
        let s = Snapshot {
            entry_offset: 0,
            l1_table_offset: 0x30000,
            l1_size: 1,
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size_32: 0,
            extra: SnapshotExtra {
                vm_state_size_large: Some(0),
                disk_size: Some(1 << 20),
                icount: Some(u64::MAX),
                unknown: vec![1, 2, 3],
            },
            id: b"1".to_vec(),
            name: b"snap".to_vec(),
        };
        let b = s.encode();
        assert_eq!(b.len() as u64, s.encoded_len());
        assert_eq!(b.len() % 8, 0);
        assert_eq!(s.extra_data_size(), 27);
        assert_eq!(s.icount(), None);
    }
}
