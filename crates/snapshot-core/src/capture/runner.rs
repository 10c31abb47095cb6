//! Executing a plan, undoing it, and recovering a killed run from the journal.

use super::plan::{CapturePlan, RunState, Step};
use super::{Capabilities, Clock, Saved};
use crate::error::{Error, ErrorKind, Result};
use crate::journal::{OpId, Outcome};
pub use crate::ops::Recovered;
use crate::ops::{self, DomainJournal, OpRecord, PlanRecord};
use crate::store::{DomainStore, MadeBy, OverlayOwner};
use crate::xml::DomainSnapshot;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::task::Poll;
use std::time::Duration;

/// The journal `kind` of a capture operation.
pub const JOURNAL_KIND: &str = "snapshot-create";

/// A capture's journal record (the journal's step type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum CaptureRecord {
    /// The whole plan, recorded first, so that recovery knows the steps not yet recorded.
    Plan {
        /// The plan.
        plan: Box<CapturePlan>,
    },
    /// Plan step `at` is about to act; the step carries its undo data.
    Step {
        /// Its index in the plan.
        at: usize,
        /// The step.
        step: Step,
    },
}

/// A successful capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOutcome {
    /// The metadata written (`None` with `--no-metadata`).
    pub snapshot: Option<DomainSnapshot>,
    /// Failures after the commit point that did not undo the snapshot (a failed `--halt`).
    pub warnings: Vec<String>,
}

type J = DomainJournal;

impl PlanRecord for CaptureRecord {
    type Plan = CapturePlan;
    type Step = Step;
    fn of(r: &OpRecord) -> Option<&Self> {
        match r {
            OpRecord::Capture(c) => Some(c),
            _ => None,
        }
    }
    fn split(&self) -> std::result::Result<&CapturePlan, (usize, &Step)> {
        match self {
            CaptureRecord::Plan { plan } => Ok(plan),
            CaptureRecord::Step { at, step } => Err((*at, step)),
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Runs `fut`, failing with [`ErrorKind::Timeout`] if it is not done within `budget`.
async fn within<T>(
    clock: &dyn Clock,
    budget: Option<Duration>,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let Some(b) = budget else {
        return fut.await;
    };
    let mut fut = std::pin::pin!(fut);
    let mut sleep = clock.sleep(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Error::new(
                ErrorKind::Timeout,
                what,
                format!("not done within its budget ({} ms)", b.as_millis()),
            )));
        }
        Poll::Pending
    })
    .await
}

/// The deadlines in force: the guest frozen, the vCPUs paused (and the pause budget, which
/// starts again after a RAM save with the guest paused: that pause is the save's own).
#[derive(Default)]
struct Windows {
    frozen_until: Option<Duration>,
    paused_until: Option<Duration>,
    pause_budget: Option<Duration>,
}

impl Windows {
    fn remaining(&self, clock: &dyn Clock) -> Option<Duration> {
        let now = clock.monotonic();
        [self.frozen_until, self.paused_until]
            .into_iter()
            .flatten()
            .min()
            .map(|d| d.saturating_sub(now))
    }
}

/// Performs one step's effect.
async fn act(
    caps: &Capabilities<'_>,
    store: &DomainStore,
    plan: &CapturePlan,
    step: &Step,
    win: &mut Windows,
) -> Result<()> {
    let c = caps.clock;
    let label = step.label();
    let bounded = win.remaining(c);
    match step {
        Step::Freeze { budget_ms } => {
            win.frozen_until = Some(c.monotonic() + ms(*budget_ms));
            let budget = ms(*budget_ms);
            within(c, Some(budget), &label, caps.agent.freeze(budget)).await?;
        }
        Step::PreCreateOverlay {
            path,
            backing,
            backing_format,
            format,
            reuse,
            ..
        } => {
            let f = async {
                if *reuse {
                    caps.block.check_overlay(path, backing).await
                } else {
                    caps.block
                        .create_overlay(path, backing, backing_format, format)
                        .await
                }
            };
            within(c, bounded, &label, f).await?;
            // Whose file it is, recorded once it is there (a crash before leaves the step
            // recorded: its undo removes the file). The user's: reused, or named by the user
            // (a path other than the one virt-snap picks).
            let by = if *reuse || *path != super::default_overlay_path(backing, plan.name.as_str())
            {
                MadeBy::User
            } else {
                MadeBy::Capture
            };
            store.record_overlay(
                path,
                OverlayOwner {
                    by,
                    snapshot: Some(plan.name.to_string()),
                },
            )?;
        }
        Step::AddOverlayNode {
            node, path, format, ..
        } => within(c, bounded, &label, caps.block.add_node(node, path, format)).await?,
        Step::Pause { budget_ms } => {
            let until = c.monotonic() + ms(*budget_ms);
            win.paused_until = Some(until);
            win.pause_budget = Some(ms(*budget_ms));
            let b = win.remaining(c);
            within(c, b, &label, caps.vcpus.pause()).await?;
        }
        Step::SaveMemory {
            file,
            live,
            fallback,
        } => {
            // A save with the guest paused takes as long as the RAM needs (the user asked for
            // it): only the live start, which must not stall the guest, is bounded.
            let bound = if *live && !*fallback {
                bounded
            } else {
                win.frozen_until.map(|d| d.saturating_sub(c.monotonic()))
            };
            let saved = within(c, bound, &label, caps.memory.save(file, *live, *fallback)).await?;
            if saved == Saved::Complete {
                if let Some(b) = win.pause_budget {
                    win.paused_until = Some(c.monotonic() + b);
                }
            }
        }
        Step::BackendSnapshot {
            volume,
            kind,
            snapshot,
            ..
        } => {
            within(
                c,
                bounded,
                &label,
                caps.backends.create(volume, *kind, snapshot),
            )
            .await?
        }
        Step::Transaction { actions } => {
            within(c, bounded, &label, caps.block.snapshot_transaction(actions)).await?
        }
        Step::InternalSnapshot {
            tag,
            nodes,
            vmstate,
        } => {
            within(
                c,
                bounded,
                &label,
                caps.block.internal_snapshot(tag, nodes, vmstate.as_deref()),
            )
            .await?
        }
        Step::Resume => {
            caps.vcpus.resume().await?;
            win.paused_until = None;
        }
        Step::AwaitMemory { file } => caps.memory.wait(file).await?,
        Step::Thaw => {
            caps.agent.thaw().await?;
            win.frozen_until = None;
        }
        Step::CommitMetadata { snapshot } => {
            store.save(snapshot)?;
            store.set_current(snapshot.name.as_ref())?;
        }
        Step::Halt => caps.vcpus.halt().await?,
        Step::HoldPaused {
            snapshot,
            disks,
            hold_ms,
        } => caps.vcpus.hold(snapshot, disks, ms(*hold_ms)).await?,
    }
    Ok(())
}

/// Undoes one step's effect (idempotently: it may not have acted).
async fn undo(caps: &Capabilities<'_>, store: &DomainStore, step: &Step) -> Result<()> {
    match step {
        Step::Freeze { .. } => caps.agent.thaw().await.map(drop),
        // The file is the user's: it stays, and so does its entry in the overlay record.
        Step::PreCreateOverlay { reuse: true, .. } => Ok(()),
        Step::PreCreateOverlay { path, backing, .. } => {
            caps.block.remove_overlay(path, backing).await?;
            store.forget_overlay(path, true)
        }
        Step::AddOverlayNode { node, .. } => caps.block.del_node(node).await,
        Step::Pause { .. } => caps.vcpus.resume().await,
        Step::SaveMemory { file, .. } | Step::AwaitMemory { file } => {
            caps.memory.discard(file).await
        }
        Step::BackendSnapshot {
            volume,
            kind,
            snapshot,
            ..
        } => caps.backends.delete(volume, *kind, snapshot).await,
        Step::Transaction { actions } => caps.block.merge_back(actions).await,
        Step::InternalSnapshot { tag, nodes, .. } => {
            caps.block.delete_internal_snapshot(tag, nodes).await
        }
        Step::HoldPaused { .. } => caps.vcpus.resume().await,
        Step::Resume | Step::Thaw | Step::CommitMetadata { .. } | Step::Halt => Ok(()),
    }
}

/// Does a failed step still need its undo? A freeze or a pause may have acted (or act later)
/// even when it failed or timed out; any timed-out step may still land.
fn undo_after_failure(step: &Step, e: &Error) -> bool {
    matches!(step, Step::Freeze { .. } | Step::Pause { .. }) || e.kind() == ErrorKind::Timeout
}

/// Undoes `touched` (journal step index, plan step) in reverse order, then makes sure a
/// domain that was running runs and a guest that may have been frozen is thawed. Returns
/// what could not be undone.
async fn roll_back(
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
    op: OpId,
    plan: &CapturePlan,
    touched: &[(u32, Step)],
) -> Vec<String> {
    let mut failures =
        ops::undo_in_reverse(journal, op, touched, Step::label, |s| undo(caps, store, s)).await;
    failures.extend(ensure_safe(caps, plan, touched).await);
    failures
}

/// The guarantees: a domain that was running ends running; a guest that may have been frozen
/// is thawed.
async fn ensure_safe(
    caps: &Capabilities<'_>,
    plan: &CapturePlan,
    touched: &[(u32, Step)],
) -> Vec<String> {
    let mut failures = Vec::new();
    if touched
        .iter()
        .any(|(_, s)| matches!(s, Step::Freeze { .. }))
    {
        if let Err(e) = caps.agent.thaw().await {
            failures.push(format!("thaw: {e}"));
        }
    }
    if plan.run_state == RunState::Running {
        match caps.vcpus.is_running().await {
            Ok(true) => {}
            _ => {
                if let Err(e) = caps.vcpus.resume().await {
                    failures.push(format!("resume: {e}"));
                }
            }
        }
    }
    failures
}

fn failed(plan: &CapturePlan, what: String, cause: Error, undo_failures: Vec<String>) -> Error {
    Error::new(ErrorKind::CaptureFailed, plan.name.as_str(), what)
        .with_source(cause)
        .with_undo_failures(undo_failures)
}

/// Runs `plan`: each step is journaled (with its undo data, fsynced) before it acts and
/// marked done after. A failure before the commit point undoes every step that acted, in
/// reverse order, and fails with [`ErrorKind::CaptureFailed`] (the cause as its source, what
/// could not be undone in [`Error::undo_failures`]). Past the commit point the remaining
/// steps run regardless; a failure to write the metadata leaves the operation pending in the
/// journal for [`recover`] to complete. The vCPUs of a running domain always end running, a
/// frozen guest always ends thawed.
pub async fn run(
    plan: &CapturePlan,
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
) -> Result<CaptureOutcome> {
    let op = journal.begin(JOURNAL_KIND, &plan.domain)?;
    if let Err(e) = journal.record_step(
        op,
        OpRecord::Capture(CaptureRecord::Plan {
            plan: Box::new(plan.clone()),
        }),
    ) {
        let _ = journal.finish(op, Outcome::RolledBack);
        return Err(failed(
            plan,
            "cannot journal the plan".into(),
            e,
            Vec::new(),
        ));
    }
    let mut win = Windows::default();
    let mut touched: Vec<(u32, Step)> = Vec::new();
    for (at, step) in plan.steps.iter().enumerate() {
        if at > plan.commit_point {
            return roll_forward(plan, caps, journal, store, op, at, touched).await;
        }
        let rec = OpRecord::Capture(CaptureRecord::Step {
            at,
            step: step.clone(),
        });
        let res = match journal.record_step(op, rec) {
            Ok(j) => match act(caps, store, plan, step, &mut win).await {
                Ok(()) => {
                    touched.push((j, step.clone()));
                    journal.step_done(op, j)
                }
                Err(e) => {
                    if undo_after_failure(step, &e) {
                        touched.push((j, step.clone()));
                    }
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            let undo_failures = roll_back(caps, journal, store, op, plan, &touched).await;
            let outcome = if undo_failures.is_empty() {
                Outcome::RolledBack
            } else {
                Outcome::Abandoned
            };
            let mut undo_failures = undo_failures;
            if let Err(je) = journal.finish(op, outcome) {
                undo_failures.push(format!("journal: {je}"));
            }
            return Err(failed(
                plan,
                format!("step {} failed", step.label()),
                e,
                undo_failures,
            ));
        }
    }
    roll_forward(plan, caps, journal, store, op, plan.steps.len(), touched).await
}

/// Runs plan steps `from..` after the commit point (each journaled), then the guarantees,
/// and ends the operation; a metadata failure leaves it pending.
async fn roll_forward(
    plan: &CapturePlan,
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
    op: OpId,
    from: usize,
    mut touched: Vec<(u32, Step)>,
) -> Result<CaptureOutcome> {
    let mut warnings = Vec::new();
    let mut win = Windows::default();
    let mut metadata_error = None;
    let mut snapshot = None;
    let mut held = false;
    for (at, step) in plan.steps.iter().enumerate().skip(from) {
        let res = match journal.record_step(
            op,
            OpRecord::Capture(CaptureRecord::Step {
                at,
                step: step.clone(),
            }),
        ) {
            Ok(j) => {
                let r = act(caps, store, plan, step, &mut win).await;
                touched.push((j, step.clone()));
                r.and_then(|()| journal.step_done(op, j))
            }
            Err(e) => Err(e),
        };
        match (res, step) {
            (Ok(()), Step::CommitMetadata { snapshot: s }) => snapshot = Some((**s).clone()),
            (Ok(()), Step::HoldPaused { .. }) => held = true,
            (Err(e), Step::HoldPaused { .. }) => warnings.push(format!(
                "the domain cannot be held paused for the manual snapshots, so it was \
                 resumed: {e}"
            )),
            (Ok(()), _) => {}
            (Err(e), Step::CommitMetadata { .. }) => metadata_error = Some(e),
            (Err(e), _) => warnings.push(format!("{}: {e}", step.label())),
        }
    }
    // A `--halt`ed domain is not resumed, nor one held paused for manual snapshots (a hold
    // that failed is reported and the domain resumed).
    if !plan.steps.iter().any(|s| matches!(s, Step::Halt)) && !held {
        warnings.extend(ensure_safe(caps, plan, &touched).await);
    }
    if let Some(e) = metadata_error {
        return Err(failed(
            plan,
            "captured, but the metadata could not be written; the next command completes it".into(),
            e,
            warnings,
        ));
    }
    journal.finish(op, Outcome::Committed)?;
    Ok(CaptureOutcome { snapshot, warnings })
}

/// Recovers every pending capture of `journal` (after virt-snap was killed): one that had
/// done its commit point is completed (its remaining steps run: resume, thaw, metadata);
/// any other is undone, every recorded step in reverse order whether or not it was marked
/// done (undo is idempotent), and the domain resumed and thawed.
pub async fn recover(
    caps: &Capabilities<'_>,
    journal: &mut J,
    store: &DomainStore,
) -> Result<Vec<Recovered>> {
    let mut out = Vec::new();
    for p in ops::pending::<CaptureRecord>(journal, JOURNAL_KIND) {
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
        let committed = p.passed(plan.commit_point);
        let acted = p.acted();
        if committed {
            // The first step after the commit point not done yet, and everything after it.
            let from = p.resume_from(plan.commit_point + 1);
            match roll_forward(&plan, caps, journal, store, op, from, acted).await {
                Ok(o) => out.push(Recovered::Completed {
                    op,
                    name: plan.name.to_string(),
                    warnings: o.warnings,
                }),
                Err(e) => return Err(e),
            }
        } else {
            let undo_failures = roll_back(caps, journal, store, op, &plan, &acted).await;
            let outcome = if undo_failures.is_empty() {
                Outcome::RolledBack
            } else {
                Outcome::Abandoned
            };
            journal.finish(op, outcome)?;
            out.push(Recovered::RolledBack {
                op,
                name: Some(plan.name.to_string()),
                undo_failures,
            });
        }
    }
    Ok(out)
}
