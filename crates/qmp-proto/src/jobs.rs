//! Running QEMU jobs (snapshot-save/-load/-delete, blockdev-create, block-stream,
//! non-active block-commit, ...) to their conclusion.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::error::Error;
use crate::qmp::{Event, QmpClient};

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// What the job's own events said about how it ended.
#[derive(Debug, Default)]
struct Seen {
    error: Option<String>,
    cancelled: bool,
}

impl Seen {
    /// Notes a block job's completion events; returns true once the job has concluded.
    fn note(&mut self, ev: &Event, job_id: &str) -> bool {
        match ev.name.as_str() {
            "BLOCK_JOB_COMPLETED" if ev.data["device"] == job_id => {
                if let Some(e) = ev.data["error"].as_str() {
                    self.error = Some(e.to_owned());
                }
                false
            }
            "BLOCK_JOB_CANCELLED" if ev.data["device"] == job_id => {
                self.cancelled = true;
                false
            }
            "JOB_STATUS_CHANGE" if ev.data["id"] == job_id => {
                matches!(ev.data["status"].as_str(), Some("concluded" | "null"))
            }
            _ => false,
        }
    }
}

impl QmpClient {
    /// Starts a job with `cmd` and `args` (which must name it `"job-id": job_id`) and waits
    /// until it concludes, all within `t`; then reads its result from `query-jobs` and
    /// dismisses it if it waits for that.
    ///
    /// A job that concluded with an error (e.g. a `snapshot-save` whose command returned
    /// `{}`) or was cancelled fails with [`ErrorKind::Job`](crate::ErrorKind::Job), QEMU's
    /// message in [`Error::desc`]. For jobs that finish on their own: a job that stops in
    /// `ready` (active block-commit, mirror) or `pending` (`auto-finalize: false`) needs
    /// its next step from the caller (use [`QmpClient::subscribe`] and `execute`), and
    /// times out here. On timeout the job is left running.
    pub async fn run_job(
        &self,
        cmd: &str,
        args: Value,
        job_id: &str,
        t: Duration,
    ) -> Result<(), Error> {
        let deadline = crate::framing::deadline_after(t);
        // Subscribed before the command: the job's events cannot be missed.
        let mut events = self.subscribe();
        self.execute_timeout(cmd, Some(args), left(deadline))
            .await?;
        let mut seen = Seen::default();
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Err(_) => {
                    return Err(Error::timeout(format!(
                        "job `{job_id}` did not conclude within {t:?}; it is left running"
                    ))
                    .with_command(cmd))
                }
                Ok(None) => {
                    return Err(Error::disconnected(format!(
                        "QMP connection closed while job `{job_id}` ran"
                    ))
                    .with_command(cmd))
                }
                Ok(Some(ev)) => {
                    if seen.note(&ev, job_id) {
                        break;
                    }
                }
            }
        }
        let jobs = self
            .execute_timeout("query-jobs", None, left(deadline))
            .await?;
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == job_id));
        if let Some(job) = job {
            if let Some(e) = job["error"].as_str() {
                seen.error = Some(e.to_owned());
            }
            if job["status"] == "concluded" {
                self.execute_timeout("job-dismiss", Some(json!({ "id": job_id })), left(deadline))
                    .await?;
            }
        }
        // Events that arrived while query-jobs ran (auto-dismissed block jobs).
        while let Some(ev) = events.try_next() {
            seen.note(&ev, job_id);
        }
        match seen {
            Seen { error: Some(e), .. } => Err(Error::job_failed(job_id, e).with_command(cmd)),
            Seen {
                cancelled: true, ..
            } => Err(Error::job_failed(job_id, "cancelled".to_owned()).with_command(cmd)),
            _ => Ok(()),
        }
    }
}
