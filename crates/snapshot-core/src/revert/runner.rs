//! Executing a revert plan, undoing it, and recovering a killed run from the journal.

use super::plan::{RevertPlan, Step};
use super::Capabilities;
use crate::capture::RunState;
use crate::error::{Error, ErrorKind, Result};
use crate::journal::{OpId, Outcome};
pub use crate::ops::Recovered;
use crate::ops::{self, DomainJournal, OpRecord, PlanRecord};
use crate::store::{DomainStore, MadeBy, OverlayOwner};
use serde::{Deserialize, Serialize};

/// The journal `kind` of a revert operation.
pub const JOURNAL_KIND: &str = "snapshot-revert";

/// A revert's journal record (in the domain's journal, as [`OpRecord::Revert`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum RevertRecord {
    /// The whole plan, recorded first, so that recovery knows the steps not yet recorded.
    RevertPlan {
        /// The plan.
        plan: Box<RevertPlan>,
    },
    /// Plan step `at` is about to act; the step carries its undo data.
    RevertStep {
        /// Its index in the plan.
        at: usize,
        /// The step.
        step: Step,
    },
}

impl PlanRecord for RevertRecord {
    type Plan = RevertPlan;
    type Step = Step;
    fn of(r: &OpRecord) -> Option<&Self> {
        match r {
            OpRecord::Revert(r) => Some(r),
            _ => None,
        }
    }
    fn split(&self) -> std::result::Result<&RevertPlan, (usize, &Step)> {
        match self {
            RevertRecord::RevertPlan { plan } => Ok(plan),
            RevertRecord::RevertStep { at, step } => Err((*at, step)),
        }
    }
}

/// A successful revert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertOutcome {
    /// Failures after the commit point that did not undo the revert (a resume that failed,
    /// an undo snapshot that could not be dropped).
    pub warnings: Vec<String>,
}

type J = DomainJournal;

/// Performs one step's effect.
async fn act(
    caps: &Capabilities<'_>,
    store: &DomainStore,
    plan: &RevertPlan,
    step: &Step,
) -> Result<()> {
    let (m, i) = (caps.machine, caps.images);
    match step {
        Step::Pause => m.pause().await,
        Step::LoadInternal {
            tag,
            disks,
            vmstate,
        } => i.load_internal(tag, disks, vmstate).await,
        Step::Destroy { .. } => m.destroy().await,
        Step::SaveCurrent { tag, disks } => i.save_internal(tag, disks).await,
        Step::ApplyInternal { tag, disks, .. } => i.apply_internal(tag, disks).await,
        Step::CreateOverlay {
            path,
            backing,
            backing_format,
            ..
        } => {
            i.create_overlay(path, backing, backing_format).await?;
            // virt-snap's own, recorded once it is there (a crash before leaves the step
            // recorded: its undo removes the file).
            store.record_overlay(
                path,
                OverlayOwner {
                    by: MadeBy::Revert,
                    snapshot: Some(plan.name.to_string()),
                },
            )
        }
        Step::AddOverlayNode { node, path, .. } => i.add_node(node, path).await,
        Step::Repoint { swaps } => i.repoint(swaps).await,
        Step::ResetGuest => m.reset().await,
        Step::DropNodes { nodes } => {
            for n in nodes {
                i.del_node(n).await?;
            }
            Ok(())
        }
        Step::SwitchDefinition { after, .. } => caps.definition.set(after).await,
        Step::Start { incoming } => m.start(*incoming).await,
        Step::LoadMemory { file } => m.load_memory(file).await,
        Step::SetCurrent { name, .. } => store.set_current(Some(name)),
        Step::Resume => m.resume().await,
        Step::DropSaved { tag, disks } => i.delete_internal(tag, disks).await,
        Step::SaveVolume { volume, tag, .. } => caps.volumes.snapshot(volume, tag).await,
        Step::RevertVolume {
            volume, snapshot, ..
        } => caps.volumes.revert(volume, snapshot).await,
        Step::DropVolumeSaved { volume, tag, .. } => {
            caps.volumes.delete_snapshot(volume, tag).await
        }
    }
}

/// Undoes one step's effect (idempotently: it may not have acted).
async fn undo(caps: &Capabilities<'_>, store: &DomainStore, step: &Step) -> Result<()> {
    let (m, i) = (caps.machine, caps.images);
    match step {
        Step::Pause => m.resume().await,
        // Started in place it is the commit point (never undone); in a QEMU this revert
        // started, that QEMU's stop undoes it.
        Step::LoadInternal { .. } | Step::LoadMemory { .. } => Ok(()),
        // The domain runs again on its definition (restored before, in reverse order);
        // a domain that was running is resumed at the end.
        Step::Destroy { .. } => m.start(false).await,
        Step::SaveCurrent { tag, disks } => i.delete_internal(tag, disks).await,
        Step::ApplyInternal {
            disks, undo_tag, ..
        } => i.apply_internal(undo_tag, disks).await,
        Step::CreateOverlay { path, backing, .. } => {
            i.remove_overlay(path, backing).await?;
            store.forget_overlay(path, false)
        }
        Step::SwitchDefinition { before, .. } => caps.definition.set(before).await,
        Step::AddOverlayNode { node, .. } => i.del_node(node).await,
        Step::Repoint { swaps } => i.unpoint(swaps).await,
        // The commit point, and after it.
        Step::ResetGuest | Step::DropNodes { .. } => Ok(()),
        Step::Start { .. } => m.destroy().await,
        Step::SetCurrent { before, .. } => store.set_current(before.as_ref()),
        Step::SaveVolume { volume, tag, .. } => caps.volumes.delete_snapshot(volume, tag).await,
        Step::RevertVolume {
            volume, undo_tag, ..
        } => caps.volumes.revert(volume, undo_tag).await,
        Step::Resume | Step::DropSaved { .. } | Step::DropVolumeSaved { .. } => Ok(()),
    }
}

/// Does a failed step still need its undo? Every undo is idempotent, and most steps may
/// have acted in part (an apply to some of the images, a QEMU that started and then
/// failed), so all but an overlay's creation and a volume's undo snapshot: an exclusive
/// create that failed made no file of ours, and a backend's snapshot create that failed
/// leaves no snapshot of that name (it is made under a temporary name, or not at all), so
/// a snapshot of that name that is there is not ours.
fn undo_after_failure(step: &Step) -> bool {
    !matches!(step, Step::CreateOverlay { .. } | Step::SaveVolume { .. })
}

/// Undoes `touched` in reverse order, then makes sure a domain that was running runs.
async fn roll_back(
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
    op: OpId,
    plan: &RevertPlan,
    touched: &[(u32, Step)],
) -> Vec<String> {
    let mut failures =
        ops::undo_in_reverse(journal, op, touched, Step::label, |s| undo(caps, store, s)).await;
    if plan.run_state == RunState::Running {
        let m = caps.machine;
        match (m.is_up().await, m.is_running().await) {
            (Ok(true), Ok(true)) => {}
            (Ok(true), _) => {
                if let Err(e) = m.resume().await {
                    failures.push(format!("resume: {e}"));
                }
            }
            (Ok(false), _) => failures.push("the domain is not running".into()),
            (Err(e), _) => failures.push(format!("is the domain running: {e}")),
        }
    }
    failures
}

fn failed(plan: &RevertPlan, what: String, cause: Error, undo_failures: Vec<String>) -> Error {
    Error::new(ErrorKind::RevertFailed, plan.name.as_str(), what)
        .with_source(cause)
        .with_undo_failures(undo_failures)
}

/// Runs `plan`: each step is journaled (with its undo data, fsynced) before it acts and
/// marked done after. A failure up to the commit point undoes every step that acted (a
/// failed one too, but a failed overlay creation), in reverse order, and fails with
/// [`ErrorKind::RevertFailed`]: the domain ends as it was. After the commit point the
/// remaining steps run regardless, their failures warnings, except making the snapshot
/// current: then the operation is left pending for [`recover`] to complete.
pub async fn run(
    plan: &RevertPlan,
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
) -> Result<RevertOutcome> {
    let op = journal.begin(JOURNAL_KIND, &plan.domain)?;
    let rec = OpRecord::Revert(RevertRecord::RevertPlan {
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
    for (at, step) in plan.steps.iter().enumerate().take(plan.commit_point + 1) {
        let rec = OpRecord::Revert(RevertRecord::RevertStep {
            at,
            step: step.clone(),
        });
        let res = match journal.record_step(op, rec) {
            Ok(j) => match act(caps, store, plan, step).await {
                Ok(()) => {
                    touched.push((j, step.clone()));
                    journal.step_done(op, j)
                }
                Err(e) => {
                    if undo_after_failure(step) {
                        touched.push((j, step.clone()));
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            let mut undo_failures = roll_back(caps, journal, store, op, plan, &touched).await;
            ops::end_rolled_back(journal, op, &mut undo_failures);
            return Err(failed(
                plan,
                format!("step {} failed", step.label()),
                e,
                undo_failures,
            ));
        }
    }
    roll_forward(plan, caps, journal, store, op, plan.commit_point + 1).await
}

/// Runs plan steps `from..` (each journaled; at or after the commit point, each of them can
/// run again), and ends the operation; failing to make the snapshot current leaves it
/// pending.
async fn roll_forward(
    plan: &RevertPlan,
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
    op: OpId,
    from: usize,
) -> Result<RevertOutcome> {
    let mut warnings = Vec::new();
    let mut current_error = None;
    for (at, step) in plan.steps.iter().enumerate().skip(from) {
        let rec = OpRecord::Revert(RevertRecord::RevertStep {
            at,
            step: step.clone(),
        });
        let res = match journal.record_step(op, rec) {
            Ok(j) => match act(caps, store, plan, step).await {
                Ok(()) => journal.step_done(op, j),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match (res, step) {
            (Ok(()), _) => {}
            (Err(e), Step::SetCurrent { .. }) => current_error = Some(e),
            (Err(e), Step::DropNodes { nodes }) => warnings.push(format!(
                "the old nodes {} stay open in QEMU, unused: {e}",
                nodes.join(", ")
            )),
            (Err(e), Step::DropSaved { tag, .. }) => warnings.push(format!(
                "the undo snapshot {tag} is left in the images (delete it with `virt-snap \
                 image snapshot delete`): {e}"
            )),
            (Err(e), Step::Start { .. }) => warnings.push(format!(
                "reverted, but the domain could not be started (start it with `virt-snap \
                 start`): {e}"
            )),
            (Err(e), Step::DropVolumeSaved { volume, tag, .. }) => warnings.push(format!(
                "the undo volume snapshot {tag} is left on pool volume {}/{} (delete it with \
                 `virt-snap vol-snapshot-delete {} {tag} --pool {}`): {e}",
                volume.pool, volume.volume, volume.volume, volume.pool
            )),
            (Err(e), _) => warnings.push(format!("{}: {e}", step.label())),
        }
    }
    if let Some(e) = current_error {
        return Err(failed(
            plan,
            "reverted, but the snapshot could not be made current; the next command \
             completes it"
                .into(),
            e,
            warnings,
        ));
    }
    journal.finish(op, Outcome::Committed)?;
    Ok(RevertOutcome { warnings })
}

/// Recovers every pending revert of `journal` (after virt-snap was killed): one whose commit
/// point was recorded (it may have acted) is completed, from its first step not marked done
/// on (each step from the commit point on can run again); any other is undone, every
/// recorded step in reverse order whether or not it was marked done (undo is idempotent),
/// and a domain that was running resumed.
pub async fn recover(
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
) -> Result<Vec<Recovered>> {
    let mut out = Vec::new();
    for p in ops::pending::<RevertRecord>(journal, JOURNAL_KIND) {
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
            let o = roll_forward(&plan, caps, journal, store, op, from).await?;
            out.push(Recovered::Completed {
                op,
                name: plan.name.to_string(),
                warnings: o.warnings,
            });
        } else {
            let acted = p.acted();
            let mut undo_failures = roll_back(caps, journal, store, op, &plan, &acted).await;
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
