//! Writing qcow2 images natively: creating images and overlays ([`create()`]) and internal
//! snapshots ([`SnapshotEditor`]: create, apply, delete), compatible with QEMU.
//!
//! Refcounts are counted per L1 path (an L2 table shared by N snapshots and the active
//! table has refcount N+1, and so have its data clusters; a compressed cluster adds 1 to
//! every host cluster its bytes touch). Each snapshot operation is atomic by copy on write:
//!
//! 1. the new state is computed in memory (refcount changes, frees included, COPIED
//!    flags); a refusal writes nothing;
//! 2. every metadata cluster it changes is written to clusters free in the old state: the
//!    active L1 table, copies of the L2 tables whose COPIED flags change, the snapshot
//!    table, the changed refcount blocks and a new refcount table (the allocator skips
//!    clusters freed in the same operation, which the old state still uses); one flush;
//! 3. bytes 24-71 of the header (size, L1 size and offset, refcount table offset and
//!    clusters, snapshot count and table offset), one write inside one sector: the commit
//!    point; one flush.
//!
//! A crash leaves the old state (the new clusters are free in it) or the new one, whose
//! refcounts already count the old metadata as freed: `qemu-img check` finds no corruption
//! and no leak at any point. See docs/image-snapshots.md.

pub mod create;
pub mod refcount;
mod snapshot_ops;

pub use create::{create, CreateOptions};
pub use snapshot_ops::{SnapshotEditor, SnapshotRef};
