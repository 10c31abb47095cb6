//! Writing qcow2 images natively: creating images and overlays ([`create`]) and internal
//! snapshots ([`SnapshotEditor`]: create, apply, delete), byte-compatible with QEMU.
//!
//! Refcounts are counted per L1 path (an L2 table shared by N snapshots and the active
//! table has refcount N+1, and so have its data clusters; a compressed cluster adds 1 to
//! every host cluster its bytes touch). Each operation changes refcounts in memory and
//! writes every touched refcount block once, in offset order, with one flush per ordering
//! barrier:
//!
//! 1. new metadata (L1 copy, snapshot table, raised refcounts, cleared COPIED flags) is
//!    written and flushed;
//! 2. the 12 bytes at offset 60 (snapshot count and table offset) are written and flushed:
//!    the commit point;
//! 3. only then are old metadata and references dropped (refcounts lowered).
//!
//! A crash can leak clusters but never leaves a refcount too low. See docs/image-snapshots.md.

pub mod create;
pub mod refcount;
mod snapshot_ops;

pub use create::{create, CreateOptions};
pub use snapshot_ops::{SnapshotEditor, SnapshotRef};
