//! The lease keeper: in a cluster lockspace (etcd), a domain's leases expire unless renewed,
//! and virt-snap has no daemon. So starting a domain also starts a small keeper process
//! (`virt-snap __keeper RUNDIR`, in a session of its own, outliving the command) that:
//!
//! - renews the domain's etcd leases (the [`locking::Ticket`]s in `RUNDIR/leases.json`);
//! - revokes them as soon as the domain's QEMU exits (kill -9 included: it waits on a pidfd),
//!   so that another host can start the domain at once;
//! - **self-fences** when it cannot renew in time (at the latest half a TTL after the last
//!   renewal etcd confirmed): through QEMU's keeper monitor (`RUNDIR/keeper.sock`, a second
//!   QMP monitor nobody else uses) it pauses the vCPUs (`stop`), pauses every block job, and
//!   inactivates every block node (`blockdev-set-active false`: QEMU flushes, stops writing
//!   and drops its image locks), writes `RUNDIR/fenced.json`, then revokes the leases once
//!   etcd answers again (or lets them expire). This happens before the TTL runs out, so no
//!   other host can hold the leases while this QEMU can still write: no disk can check a
//!   token, so the writer has to stop itself.
//!
//! Resuming a fenced domain is explicit ([`crate::Domain::resume`]): the leases are taken
//! again (refused, naming the holder, when another host has them now), a new keeper starts,
//! the nodes are activated and the vCPUs resumed.
//!
//! A keeper killed outright leaves the leases to expire while QEMU runs on: documented in
//! docs/locking.md as the one case this design cannot fence.

use super::runstate;
use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `RUNDIR/leases.json`: what the keeper keeps, and the tokens commits check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseFile {
    /// The etcd leases to renew.
    pub(crate) tickets: Vec<locking::Ticket>,
    /// The fencing tokens the domain's leases were granted with.
    pub(crate) fences: Vec<locking::Fence>,
    /// What the leases were taken for (to take them again after a fence).
    pub(crate) uses: Vec<locking::DiskUse>,
    /// The domain's QEMU.
    pub(crate) pid: u32,
    /// Its start time (`/proc/PID/stat` field 22), against pid reuse.
    pub(crate) start_time: u64,
    /// The host the leases were taken as.
    pub(crate) host: String,
}

/// `RUNDIR/fenced.json`: the keeper paused the domain because its leases could not be kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fenced {
    /// When (RFC 3339).
    pub at: String,
    /// Why: what failed while renewing.
    pub why: String,
}

const LEASES: &str = "leases.json";
const FENCED: &str = "fenced.json";
/// The running keeper's pid and start time.
const KEEPER_PID: &str = "keeper.pid";
/// The keeper's own QMP monitor in the run directory.
pub(crate) const MONITOR: &str = "keeper.sock";

impl LeaseFile {
    /// Is its QEMU still the process running under that pid?
    fn qemu_runs(&self) -> bool {
        runstate::proc_stat(self.pid).map(|s| s.start_time) == Some(self.start_time)
    }
    /// Is it the record of the same QEMU as `other`?
    fn same_qemu(&self, other: &LeaseFile) -> bool {
        self.pid == other.pid && self.start_time == other.start_time
    }
}

pub(crate) fn load(dir: &Path) -> Option<LeaseFile> {
    let s = std::fs::read(dir.join(LEASES)).ok()?;
    serde_json::from_slice(&s).ok()
}

pub(crate) fn save(dir: &Path, f: &LeaseFile) -> Result<()> {
    let text = serde_json::to_vec_pretty(f).map_err(|e| Error::caused_by("encode leases", e))?;
    runstate::write_private(&dir.join(LEASES), &text)
}

/// Forget the lease record and the fence mark (a new start, or leases taken again).
pub(crate) fn remove(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(LEASES));
    let _ = std::fs::remove_file(dir.join(FENCED));
    let _ = std::fs::remove_file(dir.join(KEEPER_PID));
}

/// The fence record, if the keeper fenced the domain.
pub fn fenced(dir: &Path) -> Option<Fenced> {
    let s = std::fs::read(dir.join(FENCED)).ok()?;
    serde_json::from_slice(&s).ok()
}

/// Hand `leases` (taken for `uses`) over to the domain's QEMU `pid` (started at
/// `start_time`), the domain's run directory being `dir`. In a cluster lockspace they are
/// first recorded in `dir/leases.json`, and the keeper started if this QEMU has none yet
/// (else it picks the new leases up within a fifth of the TTL). In a local lockspace the
/// leases live in fds QEMU inherited or received: only the records change.
pub(crate) fn hand_to_qemu(
    conn: &crate::Connection,
    dir: &Path,
    leases: locking::Acquired,
    uses: &[locking::DiskUse],
    pid: u32,
    start_time: u64,
) -> Result<()> {
    let tickets = leases.tickets();
    if tickets.is_empty() {
        return Ok(leases.hand_over(pid)?);
    }
    let existing = load(dir).filter(|f| f.pid == pid && f.start_time == start_time);
    let new = existing.is_none();
    let mut f = existing.unwrap_or_else(|| LeaseFile {
        tickets: Vec::new(),
        fences: Vec::new(),
        uses: Vec::new(),
        pid,
        start_time,
        host: conn.host().to_string(),
    });
    f.tickets.extend(tickets);
    f.fences.extend(leases.fences());
    f.uses.extend(uses.iter().cloned());
    save(dir, &f)?;
    if new {
        spawn(&conn.inner().keeper, dir)?;
    }
    Ok(leases.hand_over(pid)?)
}

/// Does the keeper of `dir` still run (its pid with the recorded start time)?
fn keeper_alive(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(KEEPER_PID)) else {
        return false;
    };
    let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(pid), Some(start)) => {
            runstate::proc_stat(pid as u32).is_some_and(|s| s.start_time == start && s.state != 'Z')
        }
        _ => false,
    }
}

/// A running cluster domain whose keeper is gone (killed outright): start a new one, which
/// renews the leases if they are still current and fences the domain at once if they are
/// not. Called by every command that takes the domain's operation lock. Returns whether a
/// keeper was started.
pub(crate) fn ensure_keeper(conn: &crate::Connection, dir: &Path) -> bool {
    let Some(f) = load(dir) else {
        return false;
    };
    if fenced(dir).is_some() || !f.qemu_runs() || keeper_alive(dir) {
        return false;
    }
    spawn(&conn.inner().keeper, dir).is_ok()
}

/// Start the keeper `program __keeper DIR` for the leases recorded in `DIR/leases.json`: in a
/// session of its own, stdin and stdout on /dev/null, stderr in `DIR/keeper.log`. Returns
/// its pid.
pub(crate) fn spawn(program: &Path, dir: &Path) -> Result<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(dir.join("keeper.log"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.arg("__keeper")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid and umask are async-signal-safe; nothing else runs before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::umask(0o077);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::caused_by(
            format!(
                "cannot start the lease keeper {} (set VIRT_SNAP_KEEPER to virt-snap's path)",
                program.display()
            ),
            e,
        )
        .with_kind(ErrorKind::ToolFailed)
    })?;
    let pid = child.id();
    if let Some(st) = runstate::proc_stat(pid) {
        runstate::write_private(
            &dir.join(KEEPER_PID),
            format!("{pid} {}\n", st.start_time).as_bytes(),
        )?;
    }
    // Reaped when it exits, if this process lives that long.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// A pidfd for `pid`, readable once the process has exited.
fn pidfd(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Completes when process `pid` has exited: a thread blocks in poll(2) on its pidfd (or, on
/// a kernel without pidfds, `/proc` is polled).
async fn exited(pid: u32) {
    use std::os::fd::AsRawFd;
    let Ok(fd) = pidfd(pid) else {
        return poll_gone(pid).await;
    };
    let waited = tokio::task::spawn_blocking(move || loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own, for as long as it takes.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    })
    .await;
    if waited.is_err() {
        poll_gone(pid).await;
    }
}

async fn poll_gone(pid: u32) {
    while runstate::proc_stat(pid).is_some_and(|s| s.state != 'Z') {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pause the domain's QEMU and stop its writes through the keeper's monitor `sock`.
async fn fence(sock: &Path) -> std::result::Result<(), String> {
    let (p, _keep) = runstate::socket_path(sock).map_err(|e| e.to_string())?;
    let qmp = qmp_proto::QmpClient::connect_unix_timeout(&p, Duration::from_secs(1))
        .await
        .map_err(|e| format!("keeper monitor {}: {e}", sock.display()))?;
    let t = Duration::from_secs(2);
    let run = |cmd: &'static str, args: Option<serde_json::Value>| {
        let qmp = &qmp;
        async move {
            qmp.execute_timeout(cmd, args, t)
                .await
                .map_err(|e| format!("{cmd}: {e}"))
        }
    };
    run("stop", None).await?;
    if let Ok(jobs) = run("query-block-jobs", None).await {
        for j in jobs.as_array().into_iter().flatten() {
            if let Some(dev) = j["device"].as_str() {
                let _ = run(
                    "block-job-pause",
                    Some(serde_json::json!({ "device": dev })),
                )
                .await;
            }
        }
    }
    run(
        "blockdev-set-active",
        Some(serde_json::json!({ "active": false })),
    )
    .await?;
    Ok(())
}

/// Undo a fence through the domain's monitor: activate the nodes (QEMU takes its image
/// locks again and re-reads the images' metadata), resume block jobs and vCPUs.
pub(crate) async fn unfence(qmp: &qmp_proto::QmpClient) -> Result<()> {
    let t = Duration::from_secs(30);
    qmp.execute_timeout(
        "blockdev-set-active",
        Some(serde_json::json!({ "active": true })),
        t,
    )
    .await
    .map_err(|e| Error::caused_by("cannot activate the domain's block nodes again", e))?;
    if let Ok(jobs) = qmp.execute_timeout("query-block-jobs", None, t).await {
        for j in jobs.as_array().into_iter().flatten() {
            if let Some(dev) = j["device"].as_str() {
                let _ = qmp
                    .execute_timeout(
                        "block-job-resume",
                        Some(serde_json::json!({ "device": dev })),
                        t,
                    )
                    .await;
            }
        }
    }
    Ok(())
}

/// The keeper process's main loop (`virt-snap __keeper DIR`): `log` gets each thing it does
/// (the CLI writes them to the keeper's stderr, `DIR/keeper.log`). Returns its exit code.
pub async fn run(dir: PathBuf, log: &dyn Fn(&str)) -> i32 {
    let Some(f) = load(&dir) else {
        log(&format!("no lease file in {}", dir.display()));
        return 2;
    };
    if !f.qemu_runs() {
        // QEMU is gone already: nothing to keep.
        log("QEMU already gone: revoking");
        locking::etcd::revoke(&f.tickets, Duration::from_secs(5)).await;
        return 0;
    }
    // Who keeps them: so that a later command can tell whether this keeper still runs.
    let me = std::process::id();
    if let Some(st) = runstate::proc_stat(me) {
        let _ = runstate::write_private(
            &dir.join(KEEPER_PID),
            format!("{me} {}\n", st.start_time).as_bytes(),
        );
    }
    log(&format!(
        "keeping {} lease(s) of QEMU pid {} as host {:?}",
        f.tickets.len(),
        f.pid,
        f.host
    ));
    // Leases handed to the same QEMU later (a snapshot's new overlays) are added to the
    // file; each round picks them up.
    let more = || {
        load(&dir)
            .filter(|now| now.same_qemu(&f))
            .map(|now| now.tickets)
            .unwrap_or_default()
    };
    match locking::etcd::keep(&f.tickets, more, exited(f.pid)).await {
        locking::etcd::Kept::Released => {
            log("QEMU exited: leases revoked");
            // Only if it is still ours (a new start may have written its own).
            if load(&dir).is_some_and(|now| now.same_qemu(&f)) {
                let _ = std::fs::remove_file(dir.join(LEASES));
            }
            0
        }
        locking::etcd::Kept::MustFence { why } => {
            log(&format!("cannot keep the leases ({why}): fencing"));
            let rec = Fenced {
                at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                why,
            };
            // The keeper's own monitor; a domain adopted from another tool has only its
            // main one.
            let mut fenced_ok = fence(&dir.join(MONITOR)).await;
            if fenced_ok.is_err() {
                fenced_ok = fence(&dir.join("qmp.sock")).await;
            }
            if let Err(e) = &fenced_ok {
                log(&format!("fence through the monitor failed: {e}"));
                if f.qemu_runs() {
                    // The last resort: a QEMU that cannot be paused must not write on.
                    // SAFETY: kill(2) on the QEMU this keeper was started for (pid and start
                    // time checked just now).
                    unsafe { libc::kill(f.pid as i32, libc::SIGSTOP) };
                    log("QEMU stopped with SIGSTOP");
                }
            }
            if let Ok(text) = serde_json::to_vec_pretty(&rec) {
                let _ = runstate::write_private(&dir.join(FENCED), &text);
            }
            // Every lease of this QEMU, also those added since the keeper started.
            let tickets = load(&dir)
                .filter(|now| now.same_qemu(&f))
                .map_or(f.tickets.clone(), |now| now.tickets);
            let ttl = Duration::from_millis(tickets.iter().map(|t| t.ttl_ms).max().unwrap_or(0));
            if locking::etcd::revoke(&tickets, 2 * ttl).await {
                log("leases revoked after the fence");
            } else {
                log("leases left to expire");
            }
            1
        }
    }
}

/// The snapshot store's [`snapshot_core::store::CommitGuard`] in a cluster lockspace: a
/// running domain's metadata changes only while the leases its QEMU was started with are
/// current (one etcd transaction comparing their fencing tokens, which also records the
/// commit), and never while it is fenced. A domain that does not run here has no leases to
/// check: its metadata changes under volume leases the operation itself takes.
#[derive(Debug)]
pub(crate) struct LeaseGuard {
    pub(crate) conn: crate::Connection,
}

impl snapshot_core::store::CommitGuard for LeaseGuard {
    fn check(
        &self,
        domain: &str,
        what: &str,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        leases_current(&self.conn, domain, what).map_err(|e| Box::new(e) as _)
    }
}

/// Are the leases `domain`'s QEMU was started with here still current? Checked (and `what`
/// recorded under their tokens) before an operation that changes a running domain's disks
/// or metadata begins, and again at each metadata commit. Refused while the domain is
/// fenced, or when a lease was lost. A domain not running here, or a local lockspace, has
/// nothing to check.
pub(crate) fn leases_current(conn: &crate::Connection, domain: &str, what: &str) -> Result<()> {
    let dir = runstate::run_dir(conn.state_dir(), domain);
    let Some(f) = load(&dir) else {
        return Ok(());
    };
    if !f.qemu_runs() {
        return Ok(());
    }
    if let Some(fenced) = fenced(&dir) {
        return Err(Error::new(
            ErrorKind::InUse,
            format!(
                "domain {domain:?} was fenced at {} ({}): nothing is changed until `resume` \
                 takes its leases again",
                fenced.at, fenced.why
            ),
        ));
    }
    Ok(conn
        .inner()
        .locks
        .commit(&f.fences, &format!("domain {domain:?}: {what}"))?)
}
