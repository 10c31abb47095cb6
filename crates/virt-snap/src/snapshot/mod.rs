//! Domain snapshots: live capture ([`capture`]) and the snapshot metadata.

pub mod capture;

pub use capture::{
    CaptureRequest, CaptureResult, DiskChoice, DiskRequest, DomainSnapshot, Flags, MemoryChoice,
    SnapshotName,
};
