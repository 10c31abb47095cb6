//! The live capture state machine: a snapshot request becomes a validated [`CapturePlan`]
//! (a list of [`Step`]s), which [`run`] executes through small capability traits the facade
//! implements over QMP and the storage backends, journaling each step and its undo before it
//! acts; [`recover`] finishes or undoes what a killed run left in the journal.
//!
//! ```text
//! plan -> [Freeze] -> PreCreateOverlay/AddOverlayNode* -> [Pause] -> [SaveMemory]
//!      -> BackendSnapshot* -> [Transaction] | [InternalSnapshot] -> [Resume] -> [AwaitMemory]
//!      -> [Thaw] -> [CommitMetadata] -> [Halt] | [HoldPaused]
//! ```
//!
//! The commit point is the last capturing step ([`CapturePlan::commit_point`]): a failure
//! before it is done undoes every step in reverse order; once it is done the capture rolls
//! forward. Whatever happens the vCPUs of a domain that was running end running and a guest
//! that was frozen ends thawed. See docs/capture.md.
//!
//! This module does nothing by itself: every effect goes through the traits below.

mod plan;
mod runner;
#[cfg(test)]
mod tests;

pub use plan::{
    default_overlay_path, overlay_node_name, BackendKind, CapturePlan, CaptureRequest, DiskChoice,
    DiskRequest, DomainDisk, DomainInfo, Flags, MemoryChoice, OverlayAction, PoolVolume, RunState,
    Step, DEFAULT_FREEZE_BUDGET_MS, DEFAULT_MANUAL_HOLD_MS, DEFAULT_PAUSE_BUDGET_MS,
};
pub use runner::{recover, run, CaptureOutcome, CaptureRecord, Recovered, JOURNAL_KIND};

use crate::error::Result;
use async_trait::async_trait;
use std::time::Duration;

/// The domain's vCPUs (QMP `stop`, `cont`, `query-status`, `quit`).
#[async_trait]
pub trait Vcpus: Send + Sync {
    /// Stops the vCPUs (guest I/O drained and flushed when it returns).
    async fn pause(&self) -> Result<()>;
    /// Resumes them; resuming running vCPUs is not an error.
    async fn resume(&self) -> Result<()>;
    /// Are they running?
    async fn is_running(&self) -> Result<bool>;
    /// Stops the domain (`--halt`).
    async fn halt(&self) -> Result<()>;
    /// Leaves the paused vCPUs paused for the user's own snapshots of the manual `disks` of
    /// snapshot `snapshot`, until the user resumes the domain or, at the latest, `hold` from
    /// now (resumed then by something that outlives this process).
    async fn hold(&self, snapshot: &str, disks: &[String], hold: Duration) -> Result<()>;
}

/// The guest agent's file-system freeze (`guest-fsfreeze-*`).
#[async_trait]
pub trait GuestAgent: Send + Sync {
    /// Freezes the guest's file systems; returns how many. The runner bounds it with the
    /// freeze `budget`, which also bounds the frozen window: an implementation arranges for
    /// the guest to be thawed at the budget's end even if this process dies before its
    /// thaw (the facade forks a watchdog that outlives it).
    async fn freeze(&self, budget: Duration) -> Result<u32>;
    /// Thaws them; thawing a thawed guest is not an error.
    async fn thaw(&self) -> Result<u32>;
    /// Is the guest frozen?
    async fn is_frozen(&self) -> Result<bool>;
}

/// QEMU's block layer and the overlay files (image-formats, blockdev-*, transaction, the
/// snapshot-save job).
///
/// Undo methods are idempotent: what does not exist (any more) is success, because recovery
/// calls them for steps that may not have acted.
#[async_trait]
pub trait BlockLayer: Send + Sync {
    /// Creates `path` (exclusively: an existing file is an error; mode 0600) as a `format`
    /// overlay of `backing` recording `backing_format`.
    async fn create_overlay(
        &self,
        path: &str,
        backing: &str,
        backing_format: &str,
        format: &str,
    ) -> Result<()>;
    /// `--reuse-external`: checks that the user's `path` exists and can be an overlay of
    /// `backing`.
    async fn check_overlay(&self, path: &str, backing: &str) -> Result<()>;
    /// Deletes an overlay this code created: only if `path` is an overlay of `backing`.
    async fn remove_overlay(&self, path: &str, backing: &str) -> Result<()>;
    /// `blockdev-add` of the overlay file as node `node`, without its backing.
    async fn add_node(&self, node: &str, path: &str, format: &str) -> Result<()>;
    /// `blockdev-del` of `node`.
    async fn del_node(&self, node: &str) -> Result<()>;
    /// ONE `transaction` of `blockdev-snapshot` actions (atomic: all or nothing).
    async fn snapshot_transaction(&self, actions: &[OverlayAction]) -> Result<()>;
    /// Undoes a transaction that succeeded: each overlay merged back into its node
    /// (active block-commit, pivot), the overlay node left added.
    async fn merge_back(&self, actions: &[OverlayAction]) -> Result<()>;
    /// The snapshot-save job: internal snapshot `tag` on `nodes`, the vmstate on `vmstate`
    /// (for a stopped domain `nodes` are image paths and there is no vmstate).
    async fn internal_snapshot(
        &self,
        tag: &str,
        nodes: &[String],
        vmstate: Option<&str>,
    ) -> Result<()>;
    /// Deletes internal snapshot `tag` from `nodes` (snapshot-delete).
    async fn delete_internal_snapshot(&self, tag: &str, nodes: &[String]) -> Result<()>;
}

/// How a RAM save went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Background-snapshot started: RAM is fixed, the guest may run on, the save completes
    /// later ([`MemorySaver::wait`]).
    Live,
    /// Saved completely with the guest paused (without `live`, or its fallback).
    Complete,
}

/// Saving RAM to a file (migration to a file; `live`: the background-snapshot capability).
#[async_trait]
pub trait MemorySaver: Send + Sync {
    /// Without `live`: saves RAM to `file` and returns when done ([`Saved::Complete`]). With
    /// `live`: starts the background-snapshot migration and returns once RAM is fixed
    /// (write-protected; [`Saved::Live`]); the guest may run on. Where background-snapshot is
    /// not available, `live` fails clearly, never by a long pause, unless `fallback`: then
    /// RAM is saved with the guest paused ([`Saved::Complete`]).
    async fn save(&self, file: &str, live: bool, fallback: bool) -> Result<Saved>;
    /// Waits for a live save to complete.
    async fn wait(&self, file: &str) -> Result<()>;
    /// Cancels a save in progress (if any) and deletes `file` (if it exists).
    async fn discard(&self, file: &str) -> Result<()>;
}

/// The storage backends' own snapshots of pool volumes (through the facade's domain-operation
/// path), visible as volume snapshots of the pool.
#[async_trait]
pub trait BackendSnapshots: Send + Sync {
    /// Takes snapshot `name` of `volume`.
    async fn create(&self, volume: &PoolVolume, kind: BackendKind, name: &str) -> Result<()>;
    /// Deletes snapshot `name` of `volume`.
    async fn delete(&self, volume: &PoolVolume, kind: BackendKind, name: &str) -> Result<()>;
}

/// Time: the creation time of snapshots, and the budgets.
#[async_trait]
pub trait Clock: Send + Sync {
    /// Seconds since the epoch.
    fn unix_time(&self) -> i64;
    /// A monotonic instant, as a duration since some fixed point.
    fn monotonic(&self) -> Duration;
    /// Sleeps for `d`.
    async fn sleep(&self, d: Duration);
}

/// Everything the runner acts through.
#[derive(Clone, Copy)]
pub struct Capabilities<'a> {
    /// The vCPUs.
    pub vcpus: &'a dyn Vcpus,
    /// The guest agent.
    pub agent: &'a dyn GuestAgent,
    /// The block layer.
    pub block: &'a dyn BlockLayer,
    /// The RAM saver.
    pub memory: &'a dyn MemorySaver,
    /// The storage backends.
    pub backends: &'a dyn BackendSnapshots,
    /// The clock.
    pub clock: &'a dyn Clock,
}

impl std::fmt::Debug for Capabilities<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capabilities { .. }")
    }
}
