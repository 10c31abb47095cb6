//! Domain snapshots: live capture ([`capture`]) and the snapshot metadata.

pub mod capture;

pub use capture::{
    CaptureRequest, CaptureResult, DiskChoice, DiskRequest, DomainSnapshot, Flags, MemoryChoice,
    SnapshotName, DEFAULT_FREEZE_BUDGET_MS, DEFAULT_PAUSE_BUDGET_MS,
};
