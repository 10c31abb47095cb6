//! A bounded, growing read buffer over a region of a [`Storage`]: parsers ask for byte ranges
//! relative to the region's start and the window reads more in large steps, never past the
//! region's limit or the end of the storage. This is how the snapshot table is read in one or
//! a few large reads instead of several small reads per entry.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// The first read of a window is at least this large.
const MIN_READ: u64 = 64 * 1024;

pub(crate) struct Window<'s, S: Storage + ?Sized> {
    storage: &'s S,
    base: u64,
    /// Bytes of the region we may ever read: min(format limit, storage length - base).
    limit: u64,
    buf: Vec<u8>,
    what: &'static str,
}

impl<'s, S: Storage + ?Sized> Window<'s, S> {
    /// A window over `[base, base + max_len)`, clipped to the storage length.
    /// `hint` is the expected size of the region: the first read covers it.
    pub(crate) fn new(
        storage: &'s S,
        base: u64,
        max_len: u64,
        file_len: u64,
        what: &'static str,
    ) -> Self {
        let limit = max_len.min(file_len.saturating_sub(base));
        Window {
            storage,
            base,
            limit,
            buf: Vec::new(),
            what,
        }
    }

    /// The bytes `[off, off + len)` of the region.
    pub(crate) fn get(&mut self, off: u64, len: u64) -> Result<&[u8]> {
        let end = off.checked_add(len).ok_or_else(|| self.too_far(off))?;
        if end > self.limit {
            return Err(self.too_far(off));
        }
        let have = self.buf.len() as u64;
        if end > have {
            // Grow at least geometrically, bounded by the limit.
            let want = end
                .max(have.saturating_mul(2))
                .max(MIN_READ)
                .min(self.limit);
            let new_len = usize::try_from(want)
                .map_err(|_| Error::new(ErrorKind::LimitExceeded, "region too large"))?;
            let old_len = self.buf.len();
            self.buf.resize(new_len, 0);
            if let Err(e) = self
                .storage
                .read_at(&mut self.buf[old_len..], self.base + have)
            {
                self.buf.truncate(old_len);
                return Err(Error::io(format!("cannot read {}", self.what), e).at(self.base + have));
            }
        }
        // In range: end <= buf.len().
        Ok(&self.buf[off as usize..end as usize])
    }

    /// Pre-read the first `len` bytes (clipped to the limit) in one read.
    pub(crate) fn prefetch(&mut self, len: u64) -> Result<()> {
        let len = len.min(self.limit);
        if len > 0 {
            self.get(0, len)?;
        }
        Ok(())
    }

    fn too_far(&self, off: u64) -> Error {
        Error::new(
            ErrorKind::Truncated,
            format!(
                "{} extends past the end of the image or its size limit",
                self.what
            ),
        )
        .at(self.base.saturating_add(off))
    }
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}
pub(crate) fn align8(x: u64) -> u64 {
    x.saturating_add(7) & !7
}
