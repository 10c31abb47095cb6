//! Helpers the backends share: finding a snapshot in a listing and the errors for a missing
//! or an existing one, the crash-test failpoint, running blocking file work, tool times.

use crate::error::{Error, ErrorKind, Result};
use crate::model::{Listing, VolSnapshot};

/// The snapshot `snapshot` among `list`, or [`ErrorKind::NotFound`].
pub(crate) fn find_snapshot(
    list: Vec<VolSnapshot>,
    volume: &str,
    snapshot: &str,
) -> Result<VolSnapshot> {
    list.into_iter()
        .find(|s| s.name == snapshot)
        .ok_or_else(|| no_snapshot(volume, snapshot))
}

/// The snapshot `snapshot` in `list`: a rejected entry of that name gives its error (a
/// symlink, say), else [`find_snapshot`].
pub(crate) fn find_listed(
    list: Listing<VolSnapshot>,
    volume: &str,
    snapshot: &str,
) -> Result<VolSnapshot> {
    if let Some(r) = list.rejected.into_iter().find(|r| r.name == snapshot) {
        return Err(r.error);
    }
    find_snapshot(list.items, volume, snapshot)
}

/// The error for a snapshot a volume does not have.
pub(crate) fn no_snapshot(volume: &str, snapshot: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("volume {volume:?} has no snapshot {snapshot:?}"),
    )
}

/// A test hook: when the environment variable `VIRT_SNAP_FAILPOINT` equals `name`, the
/// process aborts here (as if killed at this step). The crash tests run an operation in a
/// child process with it set, then check what the next operation finds. Named steps are
/// listed in docs/storage-backends.md ("After a crash").
pub fn failpoint(name: &str) {
    if std::env::var_os("VIRT_SNAP_FAILPOINT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// Where a backend runs its blocking file work (reflink clones, copies, fsyncs, qcow2
/// writes): [`crate::open_pool_with`], `DirPool::with_blocking`, `BtrfsPool::with_blocking`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Blocking {
    /// On tokio's blocking pool (`spawn_blocking`): the runtime's threads stay free for the
    /// other tasks while a copy runs. The default, for library users sharing a runtime.
    #[default]
    SpawnBlocking,
    /// On the calling task's thread: no thread start and no hand-off (a thread start, two
    /// futex wake-ups and a join, about a fifth of a reflink snapshot create's process
    /// time). For a process that runs one operation and has nothing else to run meanwhile,
    /// such as the CLI; other tasks on that runtime thread wait while a copy runs.
    Inline,
}

impl Blocking {
    /// Run `f` where this says.
    pub(crate) async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match self {
            Blocking::Inline => f(),
            Blocking::SpawnBlocking => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| Error::new(ErrorKind::Io, format!("blocking task failed: {e}")))?,
        }
    }
}

/// The error for a snapshot name a volume already has.
pub(crate) fn exists(volume: &str, snapshot: &str) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("volume {volume:?} already has a snapshot {snapshot:?}"),
    )
}

/// `YYYY-MM-DD HH:MM:SS` read as UTC, in seconds since the epoch (`btrfs subvolume
/// show`/`list` and `lvs` print times so).
pub fn parse_time_utc(s: &str) -> Option<i64> {
    let (d, t) = s.trim().split_once(' ')?;
    let mut dp = d.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (dp.next()??, dp.next()??, dp.next()??);
    let mut tp = t
        .split(' ')
        .next()?
        .split(':')
        .map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (tp.next()??, tp.next()??, tp.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut secs = days * 86400 + hh * 3600 + mm * 60 + ss;
    // An offset like "+0100" (lvs, btrfs show) when present.
    if let Some(off) = t.split(' ').nth(1) {
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let digits = off.trim_start_matches(['+', '-']);
        if digits.len() == 4 {
            let h: i64 = digits[..2].parse().ok()?;
            let mi: i64 = digits[2..].parse().ok()?;
            secs -= sign * (h * 3600 + mi * 60);
        }
    }
    Some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inline_work_runs_on_the_calling_thread_and_the_default_off_it() {
        let me = std::thread::current().id();
        let on =
            |b: Blocking| async move { b.run(|| Ok(std::thread::current().id())).await.unwrap() };
        assert_eq!(on(Blocking::Inline).await, me);
        assert_ne!(on(Blocking::SpawnBlocking).await, me);
        assert_eq!(Blocking::default(), Blocking::SpawnBlocking);
        let e = Blocking::Inline
            .run(|| Err::<(), _>(Error::new(ErrorKind::InUse, "x")))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "an inline error keeps its kind");
    }
}
