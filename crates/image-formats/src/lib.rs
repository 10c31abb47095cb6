//! qcow2 and QED headers, backing chains and the qcow2 snapshot table, read natively.
//!
//! - [`storage`]: all I/O goes through the [`Storage`] trait ([`FileStorage`], [`MemStorage`]).
//! - [`qcow2`]: header (every field, offsets documented), extensions (unknown ones kept),
//!   bitmap directory, snapshot table (unknown extra data kept), QEMU's limits.
//! - [`qed`]: the QED header and backing file.
//! - [`luks`]: the LUKS header of LUKS-encrypted qcow2 images (what qemu-img reports).
//! - [`info`]: one image as `qemu-img info` reports it, and the same JSON.
//! - [`chain`]: backing chains with an explicit [`ProbePolicy`].
//! - [`qcow2_write`]: qcow2 images and overlays created, internal snapshots created, applied
//!   and deleted natively (crash-safe ordering, byte-compatible with QEMU).
//! - [`fault`]: a storage wrapper that fails or stops after the k-th write (for tests).
//!
//! This crate spawns no processes and takes no locks: reading works on images a running QEMU
//! holds. Hostile input yields errors, never panics, and never makes the reader allocate more
//! than the file's size and QEMU's limits allow.
#![deny(missing_docs)]

pub mod chain;
pub mod error;
pub mod fault;
pub mod info;
pub mod luks;
pub mod qcow2;
pub mod qcow2_write;
pub mod qed;
pub mod storage;
mod window;

pub use chain::{backing_chain, ChainOptions, ProbePolicy};
pub use error::{Error, ErrorKind, Result};
pub use info::{Format, ImageInfo};
pub use storage::{
    check_image_path, checked_image_file, open_image_file, FileStorage, MemStorage, Storage,
};
