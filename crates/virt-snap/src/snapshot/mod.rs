//! Domain snapshots: the metadata queries and `--redefine` ([`meta`]), and the types a
//! caller builds requests and reads results with, re-exported from the lower crates so that
//! users (the CLI among them) name no lower crate.

pub mod meta;

pub use meta::{DamagedSnapshot, SnapshotInfo, SnapshotListing, SnapshotSummary, SNAPSHOTS_SUBDIR};
pub use snapshot_core::capture::{CaptureRequest, DiskChoice, DiskRequest, Flags, MemoryChoice};
pub use snapshot_core::tree::{ListFilter, Scope, TreeRow};
pub use snapshot_core::xml::{
    Disk, DomainSnapshot, Driver, Location, Memory, SnapshotState, Source,
};
pub use snapshot_core::SnapshotName;
