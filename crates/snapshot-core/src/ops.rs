//! What the operations of a domain share: the one journal file they write
//! (`<snapshots>/<domain>/journal`), whose records are [`OpRecord`]s, and the reading of a
//! pending operation's plan and steps back from it for recovery.
//!
//! Every operation kind journals the same shape: its whole plan first, then each step (with
//! its undo data) before it acts. An operation's records carry its own record type
//! ([`CaptureRecord`], [`RevertRecord`], [`DeleteRecord`]); [`OpRecord`] is their union, written as the inner
//! record alone (untagged: the inner records' `record` tags differ), so a journal written
//! before another kind existed reads the same.

use crate::capture::CaptureRecord;
use crate::delete::DeleteRecord;
use crate::journal::{Journal, OpId, PendingOp, StepState};
use crate::revert::RevertRecord;
use serde::{Deserialize, Serialize};

/// One step record of a domain's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OpRecord {
    /// A capture's (`snapshot-create`).
    Capture(CaptureRecord),
    /// A revert's (`snapshot-revert`).
    Revert(RevertRecord),
    /// A delete's (`snapshot-delete`).
    Delete(DeleteRecord),
}

/// A domain's journal.
pub type DomainJournal = Journal<OpRecord>;

/// What a `recover` did with one pending operation (a capture's or a revert's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// It had not reached its commit point: undone.
    RolledBack {
        /// The journal operation.
        op: OpId,
        /// The snapshot's name (none if killed before the plan was recorded).
        name: Option<String>,
        /// What could not be undone.
        undo_failures: Vec<String>,
    },
    /// It had reached (a revert) or passed (a capture) its commit point: completed.
    Completed {
        /// The journal operation.
        op: OpId,
        /// The snapshot's name.
        name: String,
        /// Failures of the remaining steps.
        warnings: Vec<String>,
    },
}

/// One recorded step of a pending operation, as recovery needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recorded<S> {
    /// The journal's step index.
    pub index: u32,
    /// The plan step's index.
    pub at: usize,
    /// The step.
    pub step: S,
    /// Where it stands.
    pub state: StepState,
}

/// A pending operation read back: its plan (none if it was killed before recording it) and
/// its recorded steps, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingPlan<P, S> {
    pub op: OpId,
    pub plan: Option<P>,
    pub steps: Vec<Recorded<S>>,
}

/// How one operation kind's records split into a plan and steps.
pub(crate) trait PlanRecord: Sized {
    /// The plan type.
    type Plan: Clone;
    /// The step type.
    type Step: Clone;
    /// This kind's record of a journal record, if it is one.
    fn of(r: &OpRecord) -> Option<&Self>;
    /// The plan, or the step and its plan index.
    fn split(&self) -> Result<&Self::Plan, (usize, &Self::Step)>;
}

impl<P: Clone, S: Clone> PendingPlan<P, S> {
    /// The commit point's step was recorded (it may have acted).
    pub fn reached(&self, commit_point: usize) -> bool {
        self.steps.iter().any(|s| s.at == commit_point)
    }

    /// The commit point's step is marked done.
    pub fn passed(&self, commit_point: usize) -> bool {
        self.steps
            .iter()
            .any(|s| s.at == commit_point && s.state == StepState::Done)
    }

    /// The steps not undone (they may have acted), as (journal index, step).
    pub fn acted(&self) -> Vec<(u32, S)> {
        self.steps
            .iter()
            .filter(|s| s.state != StepState::Undone)
            .map(|s| (s.index, s.step.clone()))
            .collect()
    }

    /// The first plan step from `from` on that is not marked done, with every later step:
    /// where a roll forward starts again.
    pub fn resume_from(&self, from: usize) -> usize {
        self.steps
            .iter()
            .filter(|s| s.at >= from && s.state == StepState::Done)
            .map(|s| s.at + 1)
            .max()
            .unwrap_or(from)
    }
}

/// The pending operations of `kind` in `journal`, read back with record type `R`.
pub(crate) fn pending<R: PlanRecord>(
    journal: &DomainJournal,
    kind: &str,
) -> Vec<PendingPlan<R::Plan, R::Step>> {
    journal
        .pending()
        .into_iter()
        .filter(|p| p.kind == kind)
        .map(|p: &PendingOp<OpRecord>| {
            let mut plan = None;
            let mut steps = Vec::new();
            for s in &p.steps {
                match R::of(&s.undo).map(R::split) {
                    Some(Ok(pl)) => plan = Some(pl.clone()),
                    Some(Err((at, step))) => steps.push(Recorded {
                        index: s.index,
                        at,
                        step: step.clone(),
                        state: s.state,
                    }),
                    None => {}
                }
            }
            PendingPlan {
                op: p.id,
                plan,
                steps,
            }
        })
        .collect()
}

/// Undoes `touched` (journal step index, step) in reverse order through `undo`, marking each
/// undone step in the journal; returns what could not be undone, one line each (`label` names
/// the step).
pub(crate) async fn undo_in_reverse<'a, S, Fut>(
    journal: &mut DomainJournal,
    op: OpId,
    touched: &'a [(u32, S)],
    label: impl Fn(&S) -> String,
    undo: impl Fn(&'a S) -> Fut,
) -> Vec<String>
where
    Fut: std::future::Future<Output = crate::error::Result<()>>,
{
    let mut failures = Vec::new();
    for (j, step) in touched.iter().rev() {
        match undo(step).await {
            Ok(()) => {
                if let Err(e) = journal.step_undone(op, *j) {
                    failures.push(format!("journal: {e}"));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", label(step))),
        }
    }
    failures
}

/// Ends `op` rolled back (or abandoned, when something could not be undone: the failures are
/// in `undo_failures`, to which a journal failure is added).
pub(crate) fn end_rolled_back(
    journal: &mut DomainJournal,
    op: OpId,
    undo_failures: &mut Vec<String>,
) {
    let outcome = if undo_failures.is_empty() {
        crate::journal::Outcome::RolledBack
    } else {
        crate::journal::Outcome::Abandoned
    };
    if let Err(je) = journal.finish(op, outcome) {
        undo_failures.push(format!("journal: {je}"));
    }
}
