//! Domain snapshots: live capture ([`capture`]), revert ([`revert`]), delete ([`delete`]), the metadata queries and `--redefine`
//! ([`meta`]), and the types a caller builds requests and reads results with, re-exported
//! from the lower crates so that users (the CLI among them) name no lower crate.

pub mod capture;
pub mod delete;
pub(crate) mod hold;
pub mod meta;
mod ops;
pub mod revert;
mod watchdog;

pub use capture::{
    CaptureRequest, CaptureResult, DiskChoice, DiskRequest, DomainSnapshot, Flags, MemoryChoice,
    SnapshotName, DEFAULT_FREEZE_BUDGET_MS, DEFAULT_MANUAL_HOLD_MS, DEFAULT_PAUSE_BUDGET_MS,
};
pub use delete::{DeleteFlags, DeleteKind, DeleteResult};
pub use hold::ManualHold;
pub use meta::{DamagedSnapshot, SnapshotInfo, SnapshotListing, SnapshotSummary, SNAPSHOTS_SUBDIR};
pub use revert::{RevertFlags, RevertKind, RevertResult};
pub use snapshot_core::tree::{ListFilter, Scope, TreeRow};
pub use snapshot_core::xml::{Disk, Driver, Location, Memory, SnapshotState, Source};
