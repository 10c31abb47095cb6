//! Undo steps for multi-step operations (Incus's reverter): each change registers how to
//! undo it as it is made; on failure the steps run last first, and the error says which of
//! them failed, so that nothing is left changed silently.

use crate::error::{Error, Result};
use std::future::Future;
use std::pin::Pin;

type Step<'a> = (
    String,
    Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>,
);

/// Collects undo steps. Call [`Reverter::success`] when the operation is complete, or
/// [`Reverter::fail`] with the error that stopped it.
#[must_use = "call success() or fail()"]
pub struct Reverter<'a> {
    steps: Vec<Step<'a>>,
}

impl std::fmt::Debug for Reverter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.steps.iter().map(|(d, _)| d.as_str()).collect();
        f.debug_struct("Reverter").field("steps", &names).finish()
    }
}

impl Default for Reverter<'_> {
    fn default() -> Self {
        Reverter::new()
    }
}

impl<'a> Reverter<'a> {
    /// No steps yet.
    pub fn new() -> Self {
        Reverter { steps: Vec::new() }
    }
    /// Register how to undo the change just made; `what` describes the undo step (e.g.
    /// `"remove LV vg0/vm1.s1"`). The future runs only on failure.
    pub fn add(
        &mut self,
        what: impl Into<String>,
        undo: impl Future<Output = Result<()>> + Send + 'a,
    ) {
        self.steps.push((what.into(), Box::pin(undo)));
    }
    /// Register a step that cannot be undone (e.g. an LVM merge): on failure the error lists
    /// it as not undone.
    pub fn add_irreversible(&mut self, what: impl Into<String>) {
        let what = what.into();
        let msg = what.clone();
        self.add(what, async move {
            Err(Error::new(
                crate::ErrorKind::NotSupported,
                format!("{msg} cannot be undone"),
            ))
        });
    }
    /// How many undo steps are registered.
    pub fn len(&self) -> usize {
        self.steps.len()
    }
    /// No undo steps registered.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
    /// The operation completed: forget the undo steps.
    pub fn success(mut self) {
        self.steps.clear();
    }
    /// Run the undo steps, last first; returns the descriptions of those that failed, with
    /// their errors.
    pub async fn undo(mut self) -> Vec<String> {
        let mut failed = Vec::new();
        while let Some((what, fut)) = self.steps.pop() {
            if let Err(e) = fut.await {
                tracing::warn!("undo step {what:?} failed: {e}");
                failed.push(format!("{what} ({e})"));
            }
        }
        failed
    }
    /// The operation failed with `err`: undo, and return `err` naming the steps that could
    /// not be undone.
    pub async fn fail(self, err: Error) -> Error {
        let failed = self.undo().await;
        err.with_not_undone(failed)
    }
}

impl Drop for Reverter<'_> {
    fn drop(&mut self) {
        if !self.steps.is_empty() {
            tracing::warn!(
                "reverter dropped with {} undo steps not run (neither success() nor fail())",
                self.steps.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::Mutex;

    #[tokio::test]
    async fn undo_runs_last_first_and_reports_what_failed() {
        let log = Mutex::new(Vec::new());
        let mut r = Reverter::new();
        r.add("one", async {
            log.lock().unwrap().push(1);
            Ok(())
        });
        r.add("two", async {
            log.lock().unwrap().push(2);
            Err(Error::new(ErrorKind::Io, "disk gone"))
        });
        r.add_irreversible("merge vg0/a.s1");
        let e = r
            .fail(Error::new(ErrorKind::ToolFailed, "step 4 failed"))
            .await;
        assert_eq!(*log.lock().unwrap(), vec![2, 1]);
        let s = e.to_string();
        assert!(
            s.starts_with("step 4 failed; could not undo: merge vg0/a.s1"),
            "{s}"
        );
        assert!(s.contains("two (disk gone)"), "{s}");
        assert_eq!(e.not_undone().len(), 2);

        let mut ok = Reverter::new();
        ok.add("never", async { panic!("must not run") });
        ok.success();
    }
}
