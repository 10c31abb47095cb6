//! The delete state machine: a delete request, the domain and its snapshot tree become a
//! validated [`DeletePlan`] (a list of [`Step`]s), which [`run`] executes through small
//! capability traits the facade implements over QMP, image-formats, qemu-storage-daemon and
//! the stored definition, journaling each step and its undo before it acts (in the domain's
//! journal, kind [`JOURNAL_KIND`]); [`recover`] finishes or undoes what a killed run left.
//!
//! ```text
//! per snapshot deleted (children before parents, with --children / --children-only):
//!   [DeleteInternal*] -> [Commit*..] -> [Stream*..] -> [SwitchDefinition] -> Metadata -> [RemoveOverlay..]
//! --metadata:  Metadata* (per snapshot)
//! ```
//!
//! `*`: the commit point ([`DeletePlan::commit_point`]) is the first step that changes
//! snapshot data (an internal snapshot deleted from an image, an overlay merged by
//! block-commit, an image streamed up by block-stream), none of which can be undone; a plan without one commits at its first
//! metadata step. A failure before it undoes every step in reverse order; from it on the
//! delete rolls forward. See docs/delete.md.
//!
//! This module does nothing by itself: every effect goes through the traits below.

mod plan;
mod runner;
#[cfg(test)]
mod tests;

pub use plan::{
    CommitMode, DeleteFlags, DeleteKind, DeletePlan, DeleteRequest, Facts, Merge, Step, Stream,
    StreamMode,
};
pub use runner::{recover, run, DeleteOutcome, DeleteRecord, Recovered, JOURNAL_KIND};

use crate::error::Result;
use crate::revert::{Definition, InternalDisk};
use async_trait::async_trait;

/// The disk images: internal snapshots, merges and overlay files.
///
/// Every method can run again after it acted (recovery re-runs the steps from the commit
/// point on): a tag already gone, an overlay no longer in the chain, a file already removed
/// are success.
#[async_trait]
pub trait Images: Send + Sync {
    /// In the running QEMU: the `snapshot-delete` job of `tag` on the nodes of the disks'
    /// images (by target; each image is the disk's active image, or an image below it in
    /// its chain, which QEMU reopens read-write for the job and read-only after it).
    async fn delete_internal_live(&self, tag: &str, disks: &[InternalDisk]) -> Result<()>;
    /// Offline: deletes internal snapshot `tag` from each image (no QEMU has it open).
    async fn delete_internal_offline(&self, tag: &str, disks: &[InternalDisk]) -> Result<()>;
    /// Merges `merge.overlay` into `merge.base` ([`Merge`], [`CommitMode`]); afterwards the
    /// image above (or the disk, for an active commit) is backed by (on) the base, and no
    /// node of the overlay is left in QEMU.
    async fn commit(&self, merge: &Merge) -> Result<()>;
    /// Starts `merge`'s commit job without waiting for it (a live merge; nothing to do if
    /// it runs or is done already), so that the merges of one snapshot's disks run side by
    /// side; [`Images::commit`] then finds the job and finishes it. The default does
    /// nothing (the commit then starts it).
    async fn start_commit(&self, _merge: &Merge) -> Result<()> {
        Ok(())
    }
    /// Streams `stream.image`'s data into `stream.overlay` ([`Stream`], [`StreamMode`]);
    /// afterwards the overlay is backed by `stream.base`, and (live) no node of the image is
    /// left in QEMU. An overlay no longer backed by the image is success.
    async fn stream(&self, stream: &Stream) -> Result<()>;
    /// Deletes the merged overlay `path`: only if its recorded backing is `backing`; missing
    /// is success.
    async fn remove_overlay(&self, path: &str, backing: &str) -> Result<()>;
}

/// Everything the runner acts through.
#[derive(Clone, Copy)]
pub struct Capabilities<'a> {
    /// The images.
    pub images: &'a dyn Images,
    /// The stored definition.
    pub definition: &'a dyn Definition,
    /// The pool volumes of `snapshot='storage'` disks (only
    /// [`crate::revert::Volumes::delete_snapshot`] is used).
    pub volumes: &'a dyn crate::revert::Volumes,
}

impl std::fmt::Debug for Capabilities<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capabilities { .. }")
    }
}
