//! The revert state machine: a revert request and the target snapshot's metadata become a
//! validated [`RevertPlan`] (a list of [`Step`]s), which [`run`] executes through small
//! capability traits the facade implements over QMP, image-formats and the domain's
//! definition, journaling each step and its undo before it acts (in the domain's journal,
//! kind [`JOURNAL_KIND`]); [`recover`] finishes or undoes what a killed run left there.
//!
//! ```text
//! internal, in place:   [SwitchDefinition] -> [Pause] -> LoadInternal* -> SetCurrent -> [Resume]
//! internal, offline:    [Destroy] -> SaveCurrent -> ApplyInternal -> [SwitchDefinition]
//!                       -> [Start -> [LoadInternal]]
//!                       -> SetCurrent* -> [Resume] -> DropSaved
//! external:             CreateOverlay.. -> [Destroy] -> SwitchDefinition
//!                       -> [Start{incoming} -> [LoadMemory]] -> SetCurrent* -> [Resume]
//! external, in place:   CreateOverlay.. -> AddOverlayNode.. -> SwitchDefinition -> [Pause]
//!                       -> Repoint -> ResetGuest* -> SetCurrent -> [Resume] -> [DropNodes]
//! storage:              [CreateOverlay..] -> [Destroy] -> SaveVolume.. -> RevertVolume..
//!                       -> [SwitchDefinition] -> SetCurrent* -> DropVolumeSaved..
//!                       -> [Start] -> [Resume]
//! ```
//!
//! `*` is the commit point ([`RevertPlan::commit_point`]): a failure before it undoes every
//! step in reverse order, so that the domain ends as it was (files, definition, metadata and
//! run state); from it on the revert rolls forward. `SwitchDefinition` is there whenever the
//! stored definition changes: the snapshot's configuration comes back with it
//! ([`crate::DomainDef::take_config_of`]). See docs/revert.md.
//!
//! This module does nothing by itself: every effect goes through the traits below.

mod plan;
mod runner;
#[cfg(test)]
mod tests;

pub use plan::{
    revert_node_name, revert_overlay_path, Facts, InternalDisk, RevertFlags, RevertKind,
    RevertPlan, RevertRequest, Step, Swap,
};
pub use runner::{recover, run, Recovered, RevertOutcome, RevertRecord, JOURNAL_KIND};

use crate::capture::PoolVolume;
use crate::error::Result;
use async_trait::async_trait;

/// The domain's QEMU: its vCPUs, stopping it and starting it from its stored definition.
///
/// Undo methods are idempotent (recovery calls them for steps that may not have acted):
/// stopping a stopped domain, starting a running one, resuming running vCPUs succeed.
#[async_trait]
pub trait Machine: Send + Sync {
    /// Stops the vCPUs.
    async fn pause(&self) -> Result<()>;
    /// Resumes them.
    async fn resume(&self) -> Result<()>;
    /// Does QEMU run (paused or not)?
    async fn is_up(&self) -> Result<bool>;
    /// Are the vCPUs running?
    async fn is_running(&self) -> Result<bool>;
    /// Stops QEMU (`quit`, then kill); returns once it is gone and its images are free.
    async fn destroy(&self) -> Result<()>;
    /// Starts QEMU from the stored definition with its vCPUs paused; with `incoming`, it
    /// waits for its RAM state (`-incoming defer`).
    async fn start(&self, incoming: bool) -> Result<()>;
    /// Loads the RAM state from `file` into a QEMU started with `incoming`
    /// (`migrate-incoming`), and waits for it; the vCPUs stay paused.
    async fn load_memory(&self, file: &str) -> Result<()>;
    /// Resets the guest (`system_reset`); paused vCPUs stay paused.
    async fn reset(&self) -> Result<()>;
}

/// The disk images: overlay files and internal snapshots.
#[async_trait]
pub trait Images: Send + Sync {
    /// Creates `path` (exclusively, mode 0600) as a qcow2 overlay of `backing`, recording
    /// `backing_format`.
    async fn create_overlay(&self, path: &str, backing: &str, backing_format: &str) -> Result<()>;
    /// Deletes an overlay this code created: only if `path` is an overlay of `backing`;
    /// missing is success.
    async fn remove_overlay(&self, path: &str, backing: &str) -> Result<()>;
    /// Offline: takes internal snapshot `tag` of each image (an existing `tag` is replaced).
    async fn save_internal(&self, tag: &str, disks: &[InternalDisk]) -> Result<()>;
    /// Offline: applies internal snapshot `tag` to each image.
    async fn apply_internal(&self, tag: &str, disks: &[InternalDisk]) -> Result<()>;
    /// In the running QEMU: the `snapshot-load` job of `tag` on the disks' nodes, the
    /// vmstate from `vmstate`'s.
    async fn load_internal(
        &self,
        tag: &str,
        disks: &[InternalDisk],
        vmstate: &InternalDisk,
    ) -> Result<()>;
    /// Deletes internal snapshot `tag` from each image: through QEMU (`snapshot-delete`)
    /// when it runs, offline otherwise; missing is success.
    async fn delete_internal(&self, tag: &str, disks: &[InternalDisk]) -> Result<()>;
    /// `blockdev-add` of the qcow2 overlay `path` as node `node`, without its backing.
    async fn add_node(&self, node: &str, path: &str) -> Result<()>;
    /// `blockdev-del` of `node` (and its file node); missing is success.
    async fn del_node(&self, node: &str) -> Result<()>;
    /// Puts each swap's overlay on top of its disk, backed by the node of its `base` image
    /// ([`Step::Repoint`]).
    async fn repoint(&self, swaps: &[Swap]) -> Result<()>;
    /// Undoes [`Images::repoint`] where it acted: each disk's old top on top again.
    async fn unpoint(&self, swaps: &[Swap]) -> Result<()>;
}

/// The pool volumes of `snapshot='storage'` disks, snapshotted and reverted by their pool's
/// backend (btrfs subvolume snapshots, LVM snapshots, reflink copies in a dir pool), offline:
/// the domain is stopped, so its leases of the volumes are free (a volume snapshot is also
/// deleted while the domain's QEMU runs on the volume).
#[async_trait]
pub trait Volumes: Send + Sync {
    /// Takes volume snapshot `name` of `volume`'s current state.
    async fn snapshot(&self, volume: &PoolVolume, name: &str) -> Result<()>;
    /// Makes `volume`'s content that of its volume snapshot `name` (the snapshot is kept).
    async fn revert(&self, volume: &PoolVolume, name: &str) -> Result<()>;
    /// Deletes volume snapshot `name` of `volume`; missing is success. Unlike the two
    /// above, also while the domain's QEMU runs on the volume (for the domain).
    async fn delete_snapshot(&self, volume: &PoolVolume, name: &str) -> Result<()>;
}

/// The domain's stored definition.
#[async_trait]
pub trait Definition: Send + Sync {
    /// Stores `xml` as the domain's definition.
    async fn set(&self, xml: &str) -> Result<()>;
}

/// Everything the runner acts through.
#[derive(Clone, Copy)]
pub struct Capabilities<'a> {
    /// The QEMU process and its vCPUs.
    pub machine: &'a dyn Machine,
    /// The images.
    pub images: &'a dyn Images,
    /// The stored definition.
    pub definition: &'a dyn Definition,
    /// The storage disks' pool volumes.
    pub volumes: &'a dyn Volumes,
}

impl std::fmt::Debug for Capabilities<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capabilities { .. }")
    }
}
