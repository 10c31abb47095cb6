//! Progress of long jobs: QEMU's `snapshot-save`, `snapshot-load` and `snapshot-delete` jobs,
//! block-commit and block-stream, and RAM saved to or loaded from a file (a migration).
//!
//! The facade reports to the [`Progress`] its [`Connection`](crate::Connection) was built with
//! ([`ConnectionBuilder::progress`](crate::ConnectionBuilder::progress); [`Silent`] by
//! default): [`Progress::start`] when a job starts, [`Progress::update`] as QEMU reports it
//! (`query-jobs`' current and total progress, `query-migrate`'s RAM bytes), and
//! [`Progress::finish`] when it ends. The CLI draws a bar on a terminal and prints one line
//! per job otherwise; a library user can forward them anywhere.

use qmp_proto::commands as qc;
use qmp_proto::QmpClient;
use std::future::Future;
use std::time::Duration;

/// What a job reports its progress in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes (RAM saved or loaded).
    Bytes,
    /// QEMU's job units (a job's `current-progress` of `total-progress`: bytes of the disk
    /// for block jobs, an opaque measure for snapshot jobs).
    Work,
}

/// Where progress goes. Called from the operation's task; must not block.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// A long job started; `what` says what it does, in words ("saving RAM to /x.mem").
    fn start(&self, what: &str, unit: Unit);
    /// It has done `done` of `total` (`total` may grow while it runs, and be 0 at first).
    fn update(&self, done: u64, total: u64);
    /// It ended: `ok` or not (a failure's error is returned to the caller as usual).
    fn finish(&self, ok: bool);
}

/// Reports nothing: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: Unit) {}
    fn update(&self, _: u64, _: u64) {}
    fn finish(&self, _: bool) {}
}

/// How often a running job's progress is asked for.
pub(crate) const POLL: Duration = Duration::from_millis(200);

/// Runs `job` (a QEMU job with id `job_id`, e.g. `run_job_command`) while reporting its
/// progress from `query-jobs` to `p`, as `what`.
pub(crate) async fn job<T, E>(
    p: &dyn Progress,
    qmp: &QmpClient,
    job_id: &str,
    what: &str,
    job: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    p.start(what, Unit::Work);
    tokio::pin!(job);
    let out = loop {
        tokio::select! {
            r = &mut job => break r,
            () = tokio::time::sleep(POLL) => {
                if let Ok(jobs) = qmp.run(&qc::QueryJobs).await {
                    if let Some(j) = jobs.iter().find(|j| j.id == job_id) {
                        p.update(j.current_progress, j.total_progress);
                    }
                }
            }
        }
    };
    p.finish(out.is_ok());
    out
}

/// Reports a migration's RAM progress to `p`: the bytes of RAM dealt with (`total` minus
/// `remaining` of `query-migrate`'s RAM statistics: zero pages count, though only a marker
/// is written for them) of the total.
pub(crate) fn migration(p: &dyn Progress, info: &qc::MigrationInfo) {
    if let Some(ram) = &info.ram {
        p.update(ram.total.saturating_sub(ram.remaining), ram.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    pub(crate) struct Recorder(pub Mutex<Vec<String>>);

    impl Progress for Recorder {
        fn start(&self, what: &str, unit: Unit) {
            self.0
                .lock()
                .unwrap()
                .push(format!("start {what} {unit:?}"));
        }
        fn update(&self, done: u64, total: u64) {
            self.0.lock().unwrap().push(format!("{done}/{total}"));
        }
        fn finish(&self, ok: bool) {
            self.0.lock().unwrap().push(format!("finish {ok}"));
        }
    }

    #[test]
    fn a_migration_reports_its_ram_bytes() {
        let r = Recorder::default();
        let info: qc::MigrationInfo = serde_json::from_value(serde_json::json!({
            "status": "active",
            "ram": {"transferred": 10, "remaining": 60, "total": 100}
        }))
        .unwrap();
        migration(&r, &info);
        let none: qc::MigrationInfo =
            serde_json::from_value(serde_json::json!({"status": "setup"})).unwrap();
        migration(&r, &none);
        assert_eq!(*r.0.lock().unwrap(), vec!["40/100".to_string()]);
    }
}
