//! Creating qcow2 images the way `qemu-img create -f qcow2 [-b B -F FMT] FILE SIZE` does:
//! version 3 (compat 1.1), 64 KiB clusters, 16-bit refcounts, a 112-byte header with the
//! compression type, the backing format extension, the feature name table and the backing
//! file name in cluster 0; the refcount table in cluster 1, one refcount block in cluster 2,
//! the L1 table from cluster 3. The result is byte-identical to qemu-img's.

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{
    FeatureName, FeatureType, Header, HeaderExtension, MAX_BACKING_FILE_NAME,
    MAX_BACKING_FORMAT_LEN, MAX_L1_TABLE_SIZE,
};
use crate::storage::Storage;

const CLUSTER_BITS: u32 = 16;

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512 like qemu-img).
    pub size: u64,
    /// Backing file name as it is to be recorded.
    pub backing_file: Option<Vec<u8>>,
    /// Backing format to record (e.g. "qcow2", "raw").
    pub backing_format: Option<Vec<u8>>,
}

fn feature_table() -> Vec<FeatureName> {
    let f = |t, bit, name: &str| FeatureName {
        feature_type: t,
        bit,
        name: name.as_bytes().to_vec(),
    };
    use FeatureType::*;
    vec![
        f(Incompatible, 0, "dirty bit"),
        f(Incompatible, 1, "corrupt bit"),
        f(Incompatible, 2, "external data file"),
        f(Incompatible, 3, "compression type"),
        f(Incompatible, 4, "extended L2 entries"),
        f(Compatible, 0, "lazy refcounts"),
        f(Autoclear, 0, "bitmaps"),
        f(Autoclear, 1, "raw external data"),
    ]
}

/// Write a new qcow2 image to `storage` (whose previous contents are discarded).
pub fn create<S: Storage + ?Sized>(storage: &S, opts: &CreateOptions) -> Result<()> {
    let cs = 1u64 << CLUSTER_BITS;
    let size = opts
        .size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::new(ErrorKind::LimitExceeded, "image size too large"))?;
    let per_l2 = cs / 8;
    let l1_size = size.div_ceil(cs * per_l2);
    if l1_size * 8 > MAX_L1_TABLE_SIZE {
        return Err(Error::new(ErrorKind::LimitExceeded, "image size too large"));
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(Error::new(
            ErrorKind::Invalid,
            "a backing format needs a backing file",
        ));
    }
    let mut exts = Vec::new();
    if let Some(f) = &opts.backing_format {
        if f.len() as u32 > MAX_BACKING_FORMAT_LEN || f.is_empty() {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                "backing format name invalid",
            ));
        }
        exts.push(HeaderExtension::BackingFormat(f.clone()));
    }
    exts.push(HeaderExtension::FeatureNames(feature_table()));
    let mut ext_bytes = crate::qcow2::encode_extensions(&exts);
    let mut header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: CLUSTER_BITS,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: 3 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
        header_tail: vec![0; 7],
    };
    let backing_at = 112 + ext_bytes.len() as u64;
    if let Some(b) = &opts.backing_file {
        if b.len() as u32 > MAX_BACKING_FILE_NAME || b.is_empty() {
            return Err(Error::new(
                ErrorKind::LimitExceeded,
                format!("backing file name must be 1-{MAX_BACKING_FILE_NAME} bytes"),
            ));
        }
        header.backing_file_offset = backing_at;
        header.backing_file_size = b.len() as u32;
        ext_bytes.extend_from_slice(b);
    }
    let mut c0 = header.encode();
    c0.extend_from_slice(&ext_bytes);
    if c0.len() as u64 > cs {
        return Err(Error::new(
            ErrorKind::LimitExceeded,
            "header does not fit in cluster 0",
        ));
    }
    c0.resize(cs as usize, 0);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let used = 3 + l1_clusters;
    if used > cs / 2 {
        return Err(Error::new(ErrorKind::LimitExceeded, "image size too large"));
    }
    let mut reftable = vec![0u8; cs as usize];
    reftable[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut refblock = vec![0u8; cs as usize];
    for c in 0..used as usize {
        refblock[2 * c..2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let io = |what: &'static str| move |e| Error::io(what, e);
    storage
        .set_len(0)
        .map_err(io("cannot truncate the image"))?;
    storage
        .write_at(&c0, 0)
        .map_err(io("cannot write the header"))?;
    storage
        .write_at(&reftable, cs)
        .map_err(io("cannot write the refcount table"))?;
    storage
        .write_at(&refblock, 2 * cs)
        .map_err(io("cannot write the refcount block"))?;
    if l1_size > 0 {
        storage
            .write_at(&vec![0u8; (l1_size * 8) as usize], 3 * cs)
            .map_err(io("cannot write the L1 table"))?;
    }
    storage.flush().map_err(io("cannot flush the image"))?;
    Ok(())
}
