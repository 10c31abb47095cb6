//! QED: the 64-byte little-endian header and the backing file name.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use crate::window::{le32, le64};

/// `QED\0`.
pub const MAGIC: [u8; 4] = *b"QED\0";
/// Size of the header structure.
pub const HEADER_SIZE: usize = 64;
/// Feature bit 0: the image has a backing file.
pub const F_BACKING_FILE: u64 = 0x1;
/// Feature bit 1: the image needs a consistency check (not closed cleanly).
pub const F_NEED_CHECK: u64 = 0x2;
/// Feature bit 2: the backing file is raw; do not probe its format.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
const KNOWN_FEATURES: u64 = 0x7;
/// Smallest cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// Largest table size in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;

/// The QED header. All fields little-endian; comments give each field's byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes 4-7: cluster size in bytes (power of two, 4 KiB-64 MiB).
    pub cluster_size: u32,
    /// Bytes 8-11: L1/L2 table size in clusters (power of two, 1-16).
    pub table_size: u32,
    /// Bytes 12-15: header size in clusters.
    pub header_size: u32,
    /// Bytes 16-23: feature bits.
    pub features: u64,
    /// Bytes 24-31: compatible feature bits.
    pub compat_features: u64,
    /// Bytes 32-39: autoclear feature bits.
    pub autoclear_features: u64,
    /// Bytes 40-47: offset of the L1 table.
    pub l1_table_offset: u64,
    /// Bytes 48-55: virtual disk size in bytes.
    pub image_size: u64,
    /// Bytes 56-59: offset of the backing file name.
    pub backing_filename_offset: u32,
    /// Bytes 60-63: length of the backing file name.
    pub backing_filename_size: u32,
}

impl Header {
    /// Parse and validate the 64-byte header (checks mirror QEMU's open checks).
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SIZE {
            return Err(Error::new(ErrorKind::Truncated, "QED header is truncated").at(0));
        }
        if b[0..4] != MAGIC {
            return Err(Error::invalid("not a QED image (bad magic)", 0));
        }
        let h = Header {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        };
        if h.features & !KNOWN_FEATURES != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "unsupported QED features {:#x}",
                    h.features & !KNOWN_FEATURES
                ),
            )
            .at(16));
        }
        if !h.cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&h.cluster_size)
        {
            return Err(Error::invalid("invalid QED cluster size", 4));
        }
        if !h.table_size.is_power_of_two() || h.table_size > MAX_TABLE_SIZE {
            return Err(Error::invalid("invalid QED table size", 8));
        }
        if h.header_size == 0 || u64::from(h.header_size) * u64::from(h.cluster_size) > 1 << 32 {
            return Err(Error::invalid("invalid QED header size", 12));
        }
        if h.l1_table_offset % u64::from(h.cluster_size) != 0 {
            return Err(Error::invalid(
                "QED L1 table offset not cluster aligned",
                40,
            ));
        }
        let max_size = max_image_size(h.cluster_size, h.table_size);
        if h.image_size % 512 != 0 || h.image_size > max_size {
            return Err(Error::invalid("invalid QED image size", 48));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size);
            if end > u64::from(h.cluster_size) * u64::from(h.header_size) {
                return Err(Error::invalid(
                    "QED backing file name outside the header",
                    56,
                ));
            }
        }
        Ok(h)
    }

    /// QEMU's table offset check: the first and the last cluster of the table must be
    /// cluster-aligned offsets past the header and before the end of the file (rounded down
    /// to a cluster). Like QEMU, a table of one cluster never passes (its last cluster is its
    /// first, which QEMU's overflow check rejects).
    pub fn table_offset_valid(&self, offset: u64, file_len: u64) -> bool {
        let cs = u64::from(self.cluster_size);
        let file_size = file_len / cs * cs;
        let header_bytes = u64::from(self.header_size) * cs;
        let cluster_ok = |o: u64| o % cs == 0 && o >= header_bytes && o < file_size;
        let end = offset.saturating_add(u64::from(self.table_size.saturating_sub(1)) * cs);
        end > offset && cluster_ok(offset) && cluster_ok(end)
    }

    /// Does the header record a backing file?
    pub fn has_backing_file(&self) -> bool {
        self.features & F_BACKING_FILE != 0
    }
    /// Is the need-check (dirty) bit set?
    pub fn needs_check(&self) -> bool {
        self.features & F_NEED_CHECK != 0
    }
    /// Is the backing file recorded as raw (do not probe)?
    pub fn backing_no_probe(&self) -> bool {
        self.features & F_BACKING_FORMAT_NO_PROBE != 0
    }
}

fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(cluster_size) * u64::from(table_size) / 8;
    entries
        .saturating_mul(entries)
        .saturating_mul(u64::from(cluster_size))
}

/// A QED image's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qed {
    /// The header.
    pub header: Header,
    /// The backing file name as recorded.
    pub backing_file: Option<Vec<u8>>,
}

impl Qed {
    /// Read the header and the backing file name.
    pub fn read<S: Storage + ?Sized>(storage: &S) -> Result<Qed> {
        let mut b = [0u8; HEADER_SIZE];
        storage
            .read_at(&mut b, 0)
            .map_err(|e| Error::io("cannot read the QED header", e).at(0))?;
        let header = Header::parse(&b)?;
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot get the image size", e))?;
        if !header.table_offset_valid(header.l1_table_offset, file_len) {
            return Err(Error::invalid("QED table offset is invalid", 40));
        }
        let backing_file = if header.has_backing_file() {
            // QEMU reads the name into a PATH_MAX buffer (with its NUL).
            if header.backing_filename_size >= 4096 {
                return Err(
                    Error::new(ErrorKind::LimitExceeded, "backing file name too long").at(60),
                );
            }
            let mut name = vec![0u8; header.backing_filename_size as usize];
            storage
                .read_at(&mut name, u64::from(header.backing_filename_offset))
                .map_err(|e| {
                    Error::io("cannot read the backing file name", e)
                        .at(u64::from(header.backing_filename_offset))
                })?;
            Some(name)
        } else {
            None
        };
        Ok(Qed {
            header,
            backing_file,
        })
    }
}
