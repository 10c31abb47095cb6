//! Executing a delete plan, undoing it before its commit point, and recovering a killed run
//! from the journal.

use super::plan::{CommitMode, DeletePlan, Merge, Step};
use super::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::journal::{OpId, Outcome};
use crate::name::SnapshotName;
pub use crate::ops::Recovered;
use crate::ops::{self, DomainJournal, OpRecord, PlanRecord};
use crate::store::DomainStore;
use serde::{Deserialize, Serialize};

/// The journal `kind` of a delete operation.
pub const JOURNAL_KIND: &str = "snapshot-delete";

/// A delete's journal record (in the domain's journal, as [`OpRecord::Delete`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum DeleteRecord {
    /// The whole plan, recorded first, so that recovery knows the steps not yet recorded.
    DeletePlan {
        /// The plan.
        plan: Box<DeletePlan>,
    },
    /// Plan step `at` is about to act; the step carries its undo data.
    DeleteStep {
        /// Its index in the plan.
        at: usize,
        /// The step.
        step: Step,
    },
}

impl PlanRecord for DeleteRecord {
    type Plan = DeletePlan;
    type Step = Step;
    fn of(r: &OpRecord) -> Option<&Self> {
        match r {
            OpRecord::Delete(r) => Some(r),
            _ => None,
        }
    }
    fn split(&self) -> std::result::Result<&DeletePlan, (usize, &Step)> {
        match self {
            DeleteRecord::DeletePlan { plan } => Ok(plan),
            DeleteRecord::DeleteStep { at, step } => Err((*at, step)),
        }
    }
}

/// A successful delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// What did not go as planned without undoing the delete (an overlay file left), and the
    /// plan's notes.
    pub warnings: Vec<String>,
}

type J = DomainJournal;

/// The live merges of `snapshot` that follow step `at` (a live commit) in `plan` without
/// another step between them, each on a disk of its own (a merge on the same disk as an
/// earlier one waits for it: the chain changes under it).
fn side_by_side<'p>(plan: &'p DeletePlan, at: usize, snapshot: &SnapshotName) -> Vec<&'p Merge> {
    let Some(Step::Commit { merge: first, .. }) = plan.steps.get(at) else {
        return Vec::new();
    };
    let mut disks = vec![first.disk.as_str()];
    let mut out = Vec::new();
    for s in &plan.steps[at + 1..] {
        let Step::Commit {
            merge,
            snapshot: sn,
        } = s
        else {
            break;
        };
        if sn != snapshot
            || !matches!(merge.mode, CommitMode::Active | CommitMode::Intermediate)
            || disks.contains(&merge.disk.as_str())
        {
            break;
        }
        disks.push(merge.disk.as_str());
        out.push(merge);
    }
    out
}

/// Performs the effect of step `at` of `plan`.
async fn act(
    caps: &Capabilities<'_>,
    store: &DomainStore,
    plan: &DeletePlan,
    at: usize,
) -> Result<()> {
    let i = caps.images;
    let step = &plan.steps[at];
    match step {
        Step::DeleteInternal {
            tag, live, offline, ..
        } => {
            if !live.is_empty() {
                i.delete_internal_live(tag, live).await?;
            }
            if !offline.is_empty() {
                i.delete_internal_offline(tag, offline).await?;
            }
            Ok(())
        }
        Step::DeleteVolumeSnapshot {
            snapshot, volume, ..
        } => {
            caps.volumes
                .delete_snapshot(volume, snapshot.as_str())
                .await
        }
        Step::Commit { merge, snapshot } => {
            if matches!(merge.mode, CommitMode::Active | CommitMode::Intermediate) {
                // This merge's job first (a refusal here changed nothing), then those of the
                // same snapshot's other disks that follow it, so that they run side by side
                // (each step then finds its job running, or finished).
                i.start_commit(merge).await?;
                for m in side_by_side(plan, at, snapshot) {
                    // One that cannot start here is started (and its error reported) by its
                    // own step.
                    let _ = i.start_commit(m).await;
                }
            }
            i.commit(merge).await
        }
        Step::Stream { stream, .. } => i.stream(stream).await,
        Step::SwitchDefinition { after, .. } => caps.definition.set(after).await,
        Step::Metadata {
            snapshot,
            after,
            current_after,
            ..
        } => {
            for d in after {
                store.save(d)?;
            }
            store.remove(snapshot)?;
            store.set_current(current_after.as_ref())?;
            // --metadata leaves the snapshot's files as they are, to the user: virt-snap no
            // longer takes them for its own (no later delete merges or removes them).
            if plan.metadata_only {
                store.hand_over_overlays(snapshot.as_str())?;
            }
            Ok(())
        }
        Step::RemoveOverlay { path, backing } => {
            i.remove_overlay(path, backing).await?;
            // Gone: its entry in the overlay record goes too.
            store.forget_overlay(path, false)
        }
    }
}

/// Undoes one step's effect (idempotently: it may not have acted).
async fn undo(caps: &Capabilities<'_>, store: &DomainStore, step: &Step) -> Result<()> {
    match step {
        Step::SwitchDefinition { before, .. } => caps.definition.set(before).await,
        Step::Metadata {
            before,
            current_before,
            ..
        } => {
            for d in before {
                store.save(d)?;
            }
            store.set_current(current_before.as_ref())
        }
        // At or after the commit point: never undone.
        Step::DeleteInternal { .. }
        | Step::DeleteVolumeSnapshot { .. }
        | Step::Commit { .. }
        | Step::Stream { .. }
        | Step::RemoveOverlay { .. } => Ok(()),
    }
}

fn failed(plan: &DeletePlan, what: String, cause: Error, undo_failures: Vec<String>) -> Error {
    Error::new(ErrorKind::DeleteFailed, plan.name.as_str(), what)
        .with_source(cause)
        .with_undo_failures(undo_failures)
}

/// Runs `plan`: each step is journaled (with its undo data, fsynced) before it acts and
/// marked done after. A failure before the commit point, or of the commit point's step
/// reported as [`ErrorKind::NotStarted`], undoes every step that acted (the failed one too),
/// in reverse order, and fails with [`ErrorKind::DeleteFailed`]: metadata and definition end
/// as they were (no image was touched). From the commit point on the delete rolls forward:
/// a data step that fails there ends the run (its snapshot marked half-deleted unless it was
/// refused before it started), failing to store the definition or the metadata leaves the
/// operation pending for [`recover`], failing to remove an overlay is a warning.
pub async fn run(
    plan: &DeletePlan,
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
) -> Result<DeleteOutcome> {
    let op = journal.begin(JOURNAL_KIND, &plan.domain)?;
    let rec = OpRecord::Delete(DeleteRecord::DeletePlan {
        plan: Box::new(plan.clone()),
    });
    if let Err(e) = journal.record_step(op, rec) {
        let _ = journal.finish(op, Outcome::RolledBack);
        return Err(failed(
            plan,
            "cannot journal the plan".into(),
            e,
            Vec::new(),
        ));
    }
    let mut touched: Vec<(u32, Step)> = Vec::new();
    // A metadata-only plan's commit point is its first metadata step, which can be undone.
    let undoable_commit = plan
        .steps
        .get(plan.commit_point)
        .is_some_and(|s| !s.changes_data());
    // The commit point's step runs here too: a data step there that fails before it changed
    // anything ([`ErrorKind::NotStarted`]) is as a failure before the commit point.
    let upto = plan.commit_point + 1;
    for (at, step) in plan.steps.iter().enumerate().take(upto) {
        let rec = OpRecord::Delete(DeleteRecord::DeleteStep {
            at,
            step: step.clone(),
        });
        let res = match journal.record_step(op, rec) {
            Ok(j) => {
                // Every undo is idempotent, and a failed step may have acted in part.
                touched.push((j, step.clone()));
                match act(caps, store, plan, at).await {
                    Ok(()) => journal.step_done(op, j),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            let acted =
                at == plan.commit_point && !undoable_commit && e.kind() != ErrorKind::NotStarted;
            if acted {
                return Err(data_step_failed(plan, journal, store, op, step, e));
            }
            let mut undo_failures =
                ops::undo_in_reverse(journal, op, &touched, Step::label, |s| undo(caps, store, s))
                    .await;
            ops::end_rolled_back(journal, op, &mut undo_failures);
            return Err(failed(
                plan,
                format!("step {} failed", step.label()),
                e,
                undo_failures,
            ));
        }
    }
    roll_forward(plan, caps, journal, store, op, upto).await
}

/// A data step failed after the commit point (or at it, having maybe acted): the operation
/// ends; a step that may have acted marks its snapshot half-deleted.
fn data_step_failed(
    plan: &DeletePlan,
    journal: &mut J,
    store: &DomainStore,
    op: OpId,
    step: &Step,
    e: Error,
) -> Error {
    let (Step::DeleteInternal { snapshot, .. }
    | Step::DeleteVolumeSnapshot { snapshot, .. }
    | Step::Commit { snapshot, .. }
    | Step::Stream { snapshot, .. }) = step
    else {
        unreachable!("a data step");
    };
    let mut notes = Vec::new();
    let untouched = e.kind() == ErrorKind::NotStarted;
    if !untouched {
        if let Err(me) = mark_in_progress(store, snapshot) {
            notes.push(format!("cannot mark {snapshot} half-deleted: {me}"));
        }
    }
    if let Err(je) = journal.finish(op, Outcome::Abandoned) {
        notes.push(format!("journal: {je}"));
    }
    let what = if untouched {
        format!(
            "step {} failed before it changed anything: snapshot {snapshot} and the ones after \
             it are kept (the ones before it are deleted)",
            step.label()
        )
    } else {
        format!(
            "step {} failed: snapshot {snapshot} is partly deleted (marked so in its \
             metadata); snapshot-delete it again to finish",
            step.label()
        )
    };
    failed(plan, what, e, notes)
}

/// Marks the disks of snapshot `name` `<snapshotDeleteInProgress/>` in its metadata (libvirt's
/// mark of a half-deleted snapshot): its data was partly deleted.
fn mark_in_progress(store: &DomainStore, name: &crate::SnapshotName) -> Result<()> {
    let mut def = store.read(name)?;
    for d in &mut def.disks {
        if d.location().is_some_and(|l| l != crate::Location::No) {
            d.delete_in_progress = true;
        }
    }
    store.save(&def)
}

/// Runs plan steps `from..` (each journaled; each of them can run again), and ends the
/// operation. A step that changes snapshot data and fails (a commit job, an internal delete)
/// stops the run and ends the operation: unless it was refused before it started
/// ([`ErrorKind::NotStarted`]), that snapshot's metadata is marked
/// `<snapshotDeleteInProgress/>` and the error says to delete it again (which finishes the
/// merge). Failing
/// to store the definition or the metadata leaves the operation pending for [`recover`];
/// failing to remove an overlay is a warning.
async fn roll_forward(
    plan: &DeletePlan,
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
    op: OpId,
    from: usize,
) -> Result<DeleteOutcome> {
    let mut warnings = plan.notes.clone();
    for (at, step) in plan.steps.iter().enumerate().skip(from) {
        let rec = OpRecord::Delete(DeleteRecord::DeleteStep {
            at,
            step: step.clone(),
        });
        let res = match journal.record_step(op, rec) {
            Ok(j) => match act(caps, store, plan, at).await {
                Ok(()) => journal.step_done(op, j),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let Err(e) = res else { continue };
        match step {
            Step::DeleteInternal { .. }
            | Step::DeleteVolumeSnapshot { .. }
            | Step::Commit { .. }
            | Step::Stream { .. } => {
                return Err(data_step_failed(plan, journal, store, op, step, e));
            }
            Step::SwitchDefinition { .. } | Step::Metadata { .. } => {
                return Err(failed(
                    plan,
                    format!(
                        "step {} failed after the data was deleted; the next command \
                         completes it",
                        step.label()
                    ),
                    e,
                    warnings,
                ))
            }
            Step::RemoveOverlay { path, .. } => {
                warnings.push(format!("the merged overlay {path} is left: {e}"))
            }
        }
    }
    journal.finish(op, Outcome::Committed)?;
    Ok(DeleteOutcome { warnings })
}

/// Recovers every pending delete of `journal` (after virt-snap was killed): one whose commit
/// point was recorded (it may have acted) is completed from its first step not marked done on
/// (every step from the commit point on can run again; a data step that fails then ends it
/// as [`run`] does, reported as a warning); any other is undone, every recorded step in
/// reverse order (undo is idempotent).
pub async fn recover(
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
) -> Result<Vec<Recovered>> {
    let mut out = Vec::new();
    for p in ops::pending::<DeleteRecord>(journal, JOURNAL_KIND) {
        let op = p.op;
        let Some(plan) = p.plan.clone() else {
            journal.finish(op, Outcome::RolledBack)?;
            out.push(Recovered::RolledBack {
                op,
                name: None,
                undo_failures: Vec::new(),
            });
            continue;
        };
        if p.reached(plan.commit_point) {
            let from = p.resume_from(plan.commit_point);
            let warnings = match roll_forward(&plan, caps, journal, store, op, from).await {
                Ok(o) => o.warnings,
                // Ended (a data step failed, the snapshot marked): reported, not fatal.
                Err(e) if !journal.pending().iter().any(|x| x.id == op) => {
                    vec![e.to_string()]
                }
                Err(e) => return Err(e),
            };
            out.push(Recovered::Completed {
                op,
                name: plan.name.to_string(),
                warnings,
            });
        } else {
            let acted = p.acted();
            let mut undo_failures =
                ops::undo_in_reverse(journal, op, &acted, Step::label, |s| undo(caps, store, s))
                    .await;
            ops::end_rolled_back(journal, op, &mut undo_failures);
            out.push(Recovered::RolledBack {
                op,
                name: Some(plan.name.to_string()),
                undo_failures,
            });
        }
    }
    Ok(out)
}
