//! Live capture of a domain: snapshot-core's capability traits implemented over the domain's
//! QMP monitor, its guest agent, image-formats and the storage backends, and
//! [`Domain::snapshot_create`]. See docs/capture.md.
//!
//! One `LiveDomain` serves one operation: it owns the operation's single QMP connection and
//! the guest agent connection, and measures how long the vCPUs were paused and the guest
//! frozen.

use super::hold::ManualHold;
use super::ops::{delete_volume_snapshot, OpLock};
use super::watchdog::ThawWatchdog;
use crate::domain::runstate::{self, RunState as RunRecord};
use crate::domain::Domain;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{self, Progress, Unit};
use crate::Connection;
use async_trait::async_trait;
use locking::{DiskUse, Purpose, Resource};
use qmp_proto::commands::{
    self as qc, BlockdevAdd, BlockdevDel, BlockdevOptions, BlockdevSnapshot, MigrationStatus,
    TransactionAction,
};
use qmp_proto::{QgaClient, QmpClient};
use snapshot_core::capture::{
    self as core, BackendKind, Capabilities, CapturePlan, DomainDisk, DomainInfo, OverlayAction,
    PoolVolume, Recovered, Step,
};
use snapshot_core::domain::SourceRef;
use snapshot_core::ops::DomainJournal;
use snapshot_core::store::DomainStore;
use snapshot_core::xml::RawXml;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use snapshot_core::capture::{
    CaptureRequest, DiskChoice, DiskRequest, Flags, MemoryChoice, DEFAULT_FREEZE_BUDGET_MS,
    DEFAULT_MANUAL_HOLD_MS, DEFAULT_PAUSE_BUDGET_MS,
};
pub use snapshot_core::xml::DomainSnapshot;
pub use snapshot_core::SnapshotName;

/// The snapshot metadata's directory in the state dir (`<state>/snapshots/<domain>/`).
pub const SNAPSHOTS_SUBDIR: &str = "snapshots";

/// How long a thaw after a freeze the agent never answered waits for the agent.
const UNANSWERED_THAW_WAIT: Duration = Duration::from_millis(500);

/// How long a snapshot-save or snapshot-delete job, a RAM save or a merge-back may take.
pub(crate) const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a migration's state is polled while the vCPUs are paused for it (a `--live` RAM
/// snapshot waits, paused, until QEMU has fixed RAM), and otherwise.
const POLL_IN_PAUSE: Duration = Duration::from_millis(1);
const POLL: Duration = Duration::from_millis(5);

/// What [`Domain::snapshot_create`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureResult {
    /// The snapshot's name.
    pub name: String,
    /// Its metadata (`None` with `--no-metadata`).
    pub snapshot: Option<DomainSnapshot>,
    /// Its metadata as domainsnapshot XML (`None` with `--no-metadata`).
    pub xml: Option<String>,
    /// What failed after the snapshot was taken without undoing it.
    pub warnings: Vec<String>,
    /// How long the vCPUs were paused (none if they were not): from QEMU's `STOP` event to
    /// its `RESUME` event (QEMU's own timestamps), for our `stop`/`cont` as for the
    /// snapshot-save job (internal with RAM), which pauses them itself; from `stop`'s reply
    /// to `cont`'s where the events are missing.
    pub paused: Option<Duration>,
    /// How long the guest's file systems were frozen (none if they were not).
    pub frozen: Option<Duration>,
    /// The wall time of the one QMP `transaction` of `blockdev-snapshot` (the external disks'
    /// I/O stall; none without external disks of a running domain).
    pub stall: Option<Duration>,
    /// The downtime QEMU reported for a RAM save to a file, in milliseconds.
    pub memory_downtime_ms: Option<u64>,
    /// `snapshot='manual'` disks of a running domain: the domain is left paused for the
    /// user's own snapshots of them, until [`Domain::resume`] or the hold's end.
    pub held: Option<ManualHold>,
}

/// A test-only failpoint: `VIRT_SNAP_FAILPOINT=capture:<name>` aborts the process right
/// after the effect named `<name>` (`create-overlay`, `add-node`, `freeze`, `pause`,
/// `transaction`, `save-memory`, `backend-snapshot`, `internal-snapshot`), as a kill would.
/// `capture:freeze-stall` blocks the thread for the freeze budget + 4 s after the freeze,
/// then aborts (virt-snap stuck while the guest is frozen).
fn failpoint(name: &str) {
    if failpoint_is(name) {
        tracing::error!("failpoint capture:{name}: aborting");
        std::process::abort();
    }
}

/// Is the test-only failpoint `capture:<name>` set? `capture:transaction-bad-node` makes
/// the transaction's last action name a node QEMU does not have, so that QEMU refuses the
/// whole transaction.
fn failpoint_is(name: &str) -> bool {
    std::env::var("VIRT_SNAP_FAILPOINT").is_ok_and(|v| v.strip_prefix("capture:") == Some(name))
}

/// A lower error as snapshot-core's backend error (the facade error as its source).
pub(crate) fn be(object: &str, e: impl Into<Error>) -> snapshot_core::Error {
    let e: Error = e.into();
    snapshot_core::Error::backend(object, e.to_string()).caused_by(e)
}

type CoreResult<T> = snapshot_core::Result<T>;

#[derive(Debug, Default)]
struct Timings {
    paused_at: Option<Instant>,
    paused: Option<Duration>,
    frozen_at: Option<Instant>,
    frozen: Option<Duration>,
    stall: Option<Duration>,
    /// QEMU's events from the `stop` on, to measure the pause by (see `Vcpus::pause`).
    pause_events: Option<qmp_proto::EventStream>,
    downtime_ms: Option<u64>,
    /// background-snapshot was turned on before the plan ran (see `snapshot_create`).
    background_on: bool,
    held: Option<ManualHold>,
    /// `--fallback-paused` was used: why background-snapshot was refused.
    fell_back: Option<String>,
}

/// The capabilities of one operation on one domain (running, or shut off: then there is no
/// QMP connection and only offline internal snapshots and overlay files are possible).
pub(crate) struct LiveDomain {
    conn: Connection,
    dom: Domain,
    /// The domain's operation lock, when this operation holds it through the capabilities
    /// (see [`core::BackendSnapshots::create`] below).
    op: OpLock,
    domain: String,
    qemu_pid: u32,
    qmp_path: Option<PathBuf>,
    qmp: Option<QmpClient>,
    agent_socket: Option<PathBuf>,
    agent: tokio::sync::Mutex<Option<QgaClient>>,
    /// A freeze was sent and its answer not read (yet).
    agent_unanswered: AtomicBool,
    /// A thaw after an unanswered freeze timed out: do not wait for the agent again.
    agent_gave_up: AtomicBool,
    /// Armed from a freeze until the thaw that succeeds; dropped armed (this operation
    /// ends with a thaw that failed), it thaws the guest at once.
    watchdog: Mutex<Option<ThawWatchdog>>,
    timings: Mutex<Timings>,
}

impl LiveDomain {
    fn qmp(&self) -> CoreResult<&QmpClient> {
        self.qmp.as_ref().ok_or_else(|| {
            snapshot_core::Error::backend(self.domain.as_str(), "the domain is not running")
        })
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Timings> {
        self.timings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest agent connection (made on first use, within `t`).
    async fn agent_client(
        &self,
        t: Duration,
    ) -> CoreResult<tokio::sync::MappedMutexGuard<'_, QgaClient>> {
        let Some(sock) = &self.agent_socket else {
            return Err(snapshot_core::Error::backend(
                self.domain.as_str(),
                "the domain has no guest agent channel",
            ));
        };
        let mut guard = self.agent.lock().await;
        if guard.is_none() {
            let (p, _keep) = runstate::socket_path(sock).map_err(|e| be("guest agent", e))?;
            let c = QgaClient::connect_unix(&p, t)
                .await
                .map_err(|e| be("guest agent", e))?;
            *guard = Some(c);
        }
        Ok(tokio::sync::MutexGuard::map(guard, |g| {
            g.as_mut().expect("connected above")
        }))
    }

    async fn agent_call(&self, cmd: &str, t: Duration) -> CoreResult<serde_json::Value> {
        let mut c = self.agent_client(t).await?;
        c.execute(cmd, None, t).await.map_err(|e| be(cmd, e))
    }

    fn watchdog(&self) -> std::sync::MutexGuard<'_, Option<ThawWatchdog>> {
        self.watchdog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The migration's state, polled until `done` says so (or it failed).
    /// Its RAM progress goes to `report` if given.
    async fn poll_migration(
        &self,
        every: Duration,
        report: Option<&dyn Progress>,
        done: impl Fn(&qc::MigrationInfo) -> bool,
    ) -> CoreResult<qc::MigrationInfo> {
        let end = Instant::now() + JOB_TIMEOUT;
        loop {
            let info = self
                .qmp()?
                .run(&qc::QueryMigrate)
                .await
                .map_err(|e| be("query-migrate", e))?;
            if let Some(p) = report {
                progress::migration(p, &info);
            }
            if done(&info) {
                return Ok(info);
            }
            match info.status {
                Some(MigrationStatus::Failed) | Some(MigrationStatus::Cancelled) => {
                    return Err(snapshot_core::Error::backend(
                        "migrate",
                        format!(
                            "the RAM save failed: {}",
                            info.error_desc.as_deref().unwrap_or("(no reason given)")
                        ),
                    ))
                }
                _ if Instant::now() > end => {
                    return Err(snapshot_core::Error::backend(
                        "migrate",
                        "the RAM save did not finish in time",
                    ))
                }
                _ => tokio::time::sleep(every).await,
            }
        }
    }

    fn domain_ref(&self) -> storage_backends::DomainRef {
        storage_backends::DomainRef {
            domain: self.domain.clone(),
            qemu_pid: self.qemu_pid,
        }
    }

    async fn set_background_snapshot(&self, on: bool) -> CoreResult<()> {
        self.qmp()?
            .run(&qc::MigrateSetCapabilities {
                capabilities: vec![qc::MigrationCapabilityStatus::new(
                    "background-snapshot",
                    on,
                )],
            })
            .await
            .map(drop)
            .map_err(|e| be("migrate-set-capabilities background-snapshot", e))
    }
}

/// The file node under overlay node `node`.
pub(crate) fn file_node(node: &str) -> String {
    format!("{node}-f")
}

/// The protocol node under format node `node` as virt-snap names them: `<stem>-file` under a
/// command line's `<stem>-fmt`, else `<node>-f` ([`file_node`]).
pub(crate) fn file_child(node: &str) -> String {
    match node.strip_suffix("-fmt") {
        Some(stem) => format!("{stem}-file"),
        None => file_node(node),
    }
}

/// The name QEMU keeps an overlay's lease descriptor under.
fn lease_fd_name(node: &str) -> String {
    format!("vs-lease-{node}")
}

#[async_trait]
impl core::Vcpus for LiveDomain {
    async fn pause(&self) -> CoreResult<()> {
        let qmp = self.qmp()?;
        // The pause is measured from QEMU's STOP event to its RESUME event (the vCPUs stop
        // before `stop` drains and flushes the disks and replies).
        let events = qmp.subscribe();
        qmp.run(&qc::Stop).await.map_err(|e| be("stop", e))?;
        let mut t = self.times();
        t.paused_at = Some(Instant::now());
        t.pause_events = Some(events);
        drop(t);
        failpoint("pause");
        Ok(())
    }

    async fn resume(&self) -> CoreResult<()> {
        self.qmp()?
            .run(&qc::Cont)
            .await
            .map_err(|e| be("cont", e))?;
        let (at, events) = {
            let mut t = self.times();
            (t.paused_at.take(), t.pause_events.take())
        };
        let from_events = match events {
            Some(mut ev) => stop_to_resume(&mut ev).await,
            None => None,
        };
        // Without the events (dropped, or QEMU sent none): from stop's reply to cont's.
        if let Some(p) = from_events.or_else(|| at.map(|a| a.elapsed())) {
            self.times().paused = Some(p);
        }
        Ok(())
    }

    async fn is_running(&self) -> CoreResult<bool> {
        Ok(self
            .qmp()?
            .run(&qc::QueryStatus)
            .await
            .map_err(|e| be("query-status", e))?
            .running)
    }

    async fn hold(&self, snapshot: &str, disks: &[String], hold: Duration) -> CoreResult<()> {
        let qmp = self.qmp_path.as_deref().ok_or_else(|| {
            snapshot_core::Error::backend(self.domain.as_str(), "the domain is not running")
        })?;
        let h = super::hold::arm(&self.dom.dir(), qmp, snapshot, disks, hold)
            .map_err(|e| be("manual hold", e))?;
        self.times().held = Some(h);
        Ok(())
    }

    async fn halt(&self) -> CoreResult<()> {
        let q = self.qmp()?;
        // The reason the domain's state gives after; not being able to note it only costs
        // that ("shutdown" instead).
        if let Err(e) = self.dom.mark_halt() {
            tracing::warn!(domain = %self.domain, "cannot note the halt in the run record: {e}");
        }
        // The connection ends with QEMU: no reply is no failure.
        let _ = q
            .execute_timeout("quit", None, Duration::from_secs(5))
            .await;
        Ok(())
    }
}

#[async_trait]
impl core::GuestAgent for LiveDomain {
    async fn freeze(&self, budget: Duration) -> CoreResult<u32> {
        // The runner bounds the call by the freeze budget; the agent's own timeout is a
        // backstop.
        let t = Duration::from_secs(10);
        // Set until the agent answered: a freeze the runner gave up on (budget) means an
        // agent that does not answer, which the thaws after it must not wait for long.
        self.agent_unanswered.store(true, Ordering::SeqCst);
        let mut c = self.agent_client(t).await?;
        // Before the freeze is sent: a watchdog process that thaws the guest at the
        // budget's end if this process dies (or is stuck) before its own thaw. No
        // watchdog, no freeze.
        let wd = ThawWatchdog::arm(c.as_fd(), budget).map_err(|e| {
            snapshot_core::Error::backend(
                "guest-fsfreeze-freeze",
                format!("cannot start the thaw watchdog, so the guest is not frozen: {e}"),
            )
        })?;
        if let Some(old) = self.watchdog().replace(wd) {
            // An earlier freeze's, never disarmed: this one covers the guest now.
            let _ = old.disarm();
        }
        self.times().frozen_at = Some(Instant::now());
        let v = c
            .execute("guest-fsfreeze-freeze", None, t)
            .await
            .map_err(|e| be("guest-fsfreeze-freeze", e))?;
        self.agent_unanswered.store(false, Ordering::SeqCst);
        drop(c);
        failpoint("freeze");
        if failpoint_is("freeze-stall") {
            // Stuck, not dead: the thread blocks (so the runner's budget cannot fire
            // either) past the budget, then the process dies.
            tracing::error!("failpoint capture:freeze-stall: blocking, then aborting");
            std::thread::sleep(budget + Duration::from_secs(4));
            std::process::abort();
        }
        Ok(v.as_u64().unwrap_or(0) as u32)
    }

    async fn thaw(&self) -> CoreResult<u32> {
        // After a freeze the agent never answered, one short try: the thaw is queued on the
        // connection behind the freeze either way, and the watchdog (armed until a thaw
        // succeeds) sends its own when this operation ends, so the agent thaws the guest
        // whenever it answers again. Later tries in this operation do not wait at all.
        let unanswered = self.agent_unanswered.load(Ordering::SeqCst);
        if unanswered && self.agent_gave_up.load(Ordering::SeqCst) {
            return Err(snapshot_core::Error::backend(
                "guest-fsfreeze-thaw",
                "the guest agent does not answer (its freeze never returned); the thaw is \
                 queued for it",
            ));
        }
        let t = if unanswered {
            UNANSWERED_THAW_WAIT
        } else {
            Duration::from_secs(10)
        };
        let v = match self.agent_call("guest-fsfreeze-thaw", t).await {
            Ok(v) => v,
            Err(e) => {
                if unanswered {
                    self.agent_gave_up.store(true, Ordering::SeqCst);
                }
                return Err(e);
            }
        };
        self.agent_unanswered.store(false, Ordering::SeqCst);
        // Thawed: the watchdog exits without doing anything. (A failed thaw leaves it armed:
        // it thaws at the budget's end, or when this operation ends.)
        if let Some(wd) = self.watchdog().take() {
            if let Err(e) = wd.disarm() {
                tracing::warn!(domain = %self.domain, "thaw watchdog: {e}");
            }
        }
        let mut t = self.times();
        if let Some(at) = t.frozen_at.take() {
            t.frozen = Some(at.elapsed());
        }
        Ok(v.as_u64().unwrap_or(0) as u32)
    }

    async fn is_frozen(&self) -> CoreResult<bool> {
        let v = self
            .agent_call("guest-fsfreeze-status", Duration::from_secs(5))
            .await?;
        Ok(v.as_str() == Some("frozen"))
    }
}

/// Are `a` and `b` the same existing file (device and inode)?
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The backing file `path` records, if it is a qcow2 image.
fn recorded_backing(path: &Path) -> CoreResult<Option<String>> {
    let info = image_formats::ImageInfo::open(path, Some(image_formats::Format::Qcow2))
        .map_err(|e| be(&path.display().to_string(), e))?;
    Ok(info.backing_filename())
}

#[async_trait]
impl core::BlockLayer for LiveDomain {
    async fn create_overlay(
        &self,
        path: &str,
        backing: &str,
        backing_format: &str,
        format: &str,
    ) -> CoreResult<()> {
        create_overlay_file(path, backing, backing_format, format)?;
        failpoint("create-overlay");
        Ok(())
    }

    async fn check_overlay(&self, path: &str, backing: &str) -> CoreResult<()> {
        // The recorded name as QEMU opens it (a relative one is relative to the overlay's
        // directory), and the disk's top by file identity (a path spelled differently).
        let recorded = recorded_backing(Path::new(path))?;
        let opened = recorded
            .as_deref()
            .map(|b| image_formats::info::combine_backing_path(path, b));
        let why = match &opened {
            Some(b) if b == backing || same_file(Path::new(b), Path::new(backing)) => return Ok(()),
            Some(b) => format!("it is an overlay of {b}, not of"),
            None => "it has no backing file: it is not an overlay of".to_string(),
        };
        // The user's file is not what the request says it is: invalid input.
        let e = Error::new(
            ErrorKind::InvalidInput,
            format!("--reuse-external: {why} the disk's current top {backing}"),
        );
        Err(be(path, e))
    }

    async fn remove_overlay(&self, path: &str, backing: &str) -> CoreResult<()> {
        remove_overlay_file(path, backing)
    }

    async fn add_node(&self, node: &str, path: &str, format: &str) -> CoreResult<()> {
        add_overlay_node(
            &self.conn,
            &self.domain,
            self.qemu_pid,
            self.qmp()?,
            node,
            path,
            format,
        )
        .await?;
        failpoint("add-node");
        Ok(())
    }

    async fn del_node(&self, node: &str) -> CoreResult<()> {
        del_overlay_node(self.qmp()?, node).await
    }

    async fn snapshot_transaction(&self, actions: &[OverlayAction]) -> CoreResult<()> {
        let mut list: Vec<TransactionAction> = actions
            .iter()
            .map(|a| {
                TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                    node: a.node.clone(),
                    overlay: a.overlay.clone(),
                })
            })
            .collect();
        if failpoint_is("transaction-bad-node") {
            if let Some(TransactionAction::BlockdevSnapshot(a)) = list.last_mut() {
                a.node = "vs-no-such-node".into();
            }
        }
        let t = qc::Transaction::new(list);
        let qmp = self.qmp()?;
        let start = Instant::now();
        let r = qmp.run(&t).await;
        self.times().stall = Some(start.elapsed());
        r.map_err(|e| be("transaction", e))?;
        failpoint("transaction");
        Ok(())
    }

    async fn merge_back(&self, actions: &[OverlayAction]) -> CoreResult<()> {
        merge_back(self.qmp()?, actions).await
    }

    async fn internal_snapshot(
        &self,
        tag: &str,
        nodes: &[String],
        vmstate: Option<&str>,
    ) -> CoreResult<()> {
        match (vmstate, &self.qmp) {
            (Some(vm), Some(qmp)) => {
                let cmd = qc::SnapshotSave {
                    job_id: format!("vs-save-{:08x}", crc(tag)),
                    tag: tag.to_string(),
                    vmstate: vm.to_string(),
                    devices: nodes.to_vec(),
                };
                // The job stops the vCPUs itself: its pause is QEMU's STOP to RESUME.
                let mut events = qmp.subscribe();
                progress::job(
                    self.conn.progress(),
                    qmp,
                    &cmd.job_id,
                    &format!("saving snapshot {tag} (RAM and disks, inside the images)"),
                    qmp.run_job_command(&cmd, JOB_TIMEOUT),
                )
                .await
                .map_err(|e| be("snapshot-save", e))?;
                if let Some(p) = stop_to_resume(&mut events).await {
                    self.times().paused = Some(p);
                }
            }
            (None, None) => {
                for p in nodes {
                    self.conn
                        .image(p)
                        .snapshot_create(tag.as_bytes())
                        .map_err(|e| be(p, e))?;
                }
            }
            _ => {
                return Err(snapshot_core::Error::backend(
                    tag,
                    "an internal snapshot of a running domain needs its vmstate",
                ))
            }
        }
        failpoint("internal-snapshot");
        Ok(())
    }

    async fn delete_internal_snapshot(&self, tag: &str, nodes: &[String]) -> CoreResult<()> {
        delete_internal_snapshot(&self.conn, self.qmp.as_ref(), tag, nodes).await
    }
}

/// `blockdev-add` of the overlay `path` as node `node` (format `format`, file node
/// `<node>-f`, no backing), its lease (`Purpose::VmAttach` for the domain's QEMU) passed to
/// QEMU with `getfd` as `vs-lease-<node>` and handed over; on failure both nodes removed and
/// the lease given back.
pub(crate) async fn add_overlay_node(
    conn: &Connection,
    domain: &str,
    qemu_pid: u32,
    qmp: &QmpClient,
    node: &str,
    path: &str,
    format: &str,
) -> CoreResult<()> {
    // The overlay's lease, handed to QEMU so that it lives as long as QEMU.
    lease_to_qemu(conn, domain, qemu_pid, qmp, node, path, false).await?;
    let fnode = file_node(node);
    let added = async {
        qmp.run(&BlockdevAdd(BlockdevOptions::file(&fnode, path)))
            .await?;
        let fmt = BlockdevOptions::new(format, node)
            .set("file", fnode.as_str())
            .backing(None);
        if let Err(e) = qmp.run(&BlockdevAdd(fmt)).await {
            let _ = qmp
                .run(&BlockdevDel {
                    node_name: fnode.clone(),
                })
                .await;
            return Err(e);
        }
        Ok(())
    };
    if let Err(e) = added.await {
        // The failed step is not undone: give the lease back here.
        let _ = qmp
            .run(&qc::Closefd {
                fdname: lease_fd_name(node),
            })
            .await;
        return Err(be("blockdev-add", e));
    }
    Ok(())
}

/// Takes the lease of image `path` (shared if `read_only`) for the domain's QEMU `qemu_pid`
/// and hands it to that QEMU (`getfd` as the lease of node `node`, closed with the node by
/// [`del_overlay_node`]), so that it lives as long as QEMU.
pub(crate) async fn lease_to_qemu(
    conn: &Connection,
    domain: &str,
    qemu_pid: u32,
    qmp: &QmpClient,
    node: &str,
    path: &str,
    read_only: bool,
) -> CoreResult<()> {
    let uses = vec![DiskUse {
        resource: Resource::file(path),
        read_only,
        shareable: false,
    }];
    let leases = conn
        .inner()
        .locks
        .acquire(&Purpose::VmAttach {
            domain: domain.to_string(),
            qemu_pid,
            disks: uses.clone(),
        })
        .map_err(|e| be(path, e))?;
    for fd in leases.lock_fds() {
        qmp.getfd(&lease_fd_name(node), fd.as_fd())
            .await
            .map_err(|e| be("getfd", e))?;
    }
    let start_time = crate::domain::runstate::proc_stat(qemu_pid).map_or(0, |s| s.start_time);
    let dir = crate::domain::runstate::run_dir(conn.state_dir(), domain);
    crate::domain::keeper::hand_to_qemu(conn, &dir, leases, &uses, qemu_pid, start_time)
        .map_err(|e| be(path, e))?;
    Ok(())
}

/// `blockdev-del` of what exists of node `node` and its file node (`<node>-f`, or
/// `vs-<disk>-file` for a started disk's `vs-<disk>-fmt`), and `closefd` of its lease.
pub(crate) async fn del_overlay_node(qmp: &QmpClient, node: &str) -> CoreResult<()> {
    let nodes = qmp
        .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
        .await
        .map_err(|e| be("query-named-block-nodes", e))?;
    let have: Vec<String> = nodes.into_iter().filter_map(|n| n.node_name).collect();
    let mut names = vec![node.to_string(), file_node(node)];
    if node.ends_with("-fmt") {
        names.push(file_child(node));
    }
    for n in names {
        if have.contains(&n) {
            qmp.run(&BlockdevDel { node_name: n })
                .await
                .map_err(|e| be("blockdev-del", e))?;
        }
    }
    let _ = qmp
        .run(&qc::Closefd {
            fdname: lease_fd_name(node),
        })
        .await;
    Ok(())
}

/// Closes the nodes virt-snap named (`vs-...`, the command line's; `snap-...`, the captures'
/// overlays; `rv-...`, the reverts') that nothing uses any more: an old chain left detached
/// below a node that was dropped (an in-place revert's old top; found by tests/history.rs,
/// seed 2 with 24 operations, when a capture's `snap-` nodes stayed open). QEMU refuses to delete a node still in use (a
/// disk's chain, another node's backing), so each round deletes what has no parent left, until
/// a round deletes nothing. Returns the nodes closed.
pub(crate) async fn sweep_detached_nodes(qmp: &QmpClient) -> Vec<String> {
    let mut closed = Vec::new();
    for _ in 0..16 {
        let Ok(nodes) = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
        else {
            break;
        };
        let mut progress = false;
        for n in nodes.into_iter().filter_map(|n| n.node_name) {
            if !(n.starts_with("vs-") || n.starts_with("rv-") || n.starts_with("snap-")) {
                continue;
            }
            if qmp
                .run(&BlockdevDel {
                    node_name: n.clone(),
                })
                .await
                .is_ok()
            {
                let _ = qmp
                    .run(&qc::Closefd {
                        fdname: lease_fd_name(&n),
                    })
                    .await;
                closed.push(n);
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    closed
}

/// Merges each overlay back into its node where it is on top (the transaction acted):
/// active `block-commit` into the old top, `job-complete` on ready (the overlay node stays
/// added).
pub(crate) async fn merge_back(qmp: &QmpClient, actions: &[OverlayAction]) -> CoreResult<()> {
    let blocks = qmp
        .run(&qc::QueryBlock)
        .await
        .map_err(|e| be("query-block", e))?;
    for a in actions {
        // Only where the overlay is on top (the transaction may not have acted).
        let on_top = blocks
            .iter()
            .any(|b| b.inserted.as_ref().and_then(|i| i.node_name.as_deref()) == Some(&a.overlay));
        if !on_top {
            continue;
        }
        let job = format!("vs-merge-{}", a.disk);
        let mut events = qmp.subscribe();
        qmp.run(&qc::BlockCommit {
            job_id: Some(job.clone()),
            device: a.overlay.clone(),
            top_node: Some(a.overlay.clone()),
            base_node: Some(a.node.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| be("block-commit", e))?;
        // Active commit: wait for ready, then pivot.
        let ready = async {
            while let Some(ev) = events.next().await {
                if ev.name == "BLOCK_JOB_READY"
                    && ev.data.get("device") == Some(&serde_json::json!(job))
                {
                    return true;
                }
            }
            false
        };
        if !tokio::time::timeout(JOB_TIMEOUT, ready)
            .await
            .unwrap_or(false)
        {
            let _ = qmp.run(&qc::JobCancel::new(&job)).await;
            return Err(snapshot_core::Error::backend(
                a.disk.as_str(),
                "merge-back: the commit job did not become ready",
            ));
        }
        let mut events = qmp.subscribe();
        qmp.run(&qc::JobComplete::new(&job))
            .await
            .map_err(|e| be("job-complete", e))?;
        let done = async {
            while let Some(ev) = events.next().await {
                if ev.name == "BLOCK_JOB_COMPLETED" {
                    return true;
                }
            }
            false
        };
        let _ = tokio::time::timeout(JOB_TIMEOUT, done).await;
    }
    Ok(())
}

/// Creates `path` (exclusively, mode 0600) as a `format` (qcow2) overlay of `backing`, of the
/// backing's size, recording `backing_format` (a capture's overlay, a revert's).
pub(crate) fn create_overlay_file(
    path: &str,
    backing: &str,
    backing_format: &str,
    format: &str,
) -> CoreResult<()> {
    if format != "qcow2" {
        return Err(snapshot_core::Error::backend(
            path,
            format!("an overlay must be qcow2, not {format}"),
        ));
    }
    let bfmt = crate::image::parse_format(backing_format).map_err(|e| be(path, e))?;
    let size = image_formats::ImageInfo::open(Path::new(backing), Some(bfmt))
        .map_err(|e| be(backing, e))?
        .virtual_size();
    let opts = storage_backends::image::CreateOptions {
        size,
        backing_file: Some(backing.as_bytes().to_vec()),
        backing_format: Some(backing_format.as_bytes().to_vec()),
    };
    // Exclusive create, mode 0600.
    storage_backends::image::create(
        Path::new(path),
        &opts,
        storage_backends::image::IfExists::Refuse,
    )
    .map_err(|e| be(path, e))
}

/// Deletes the overlay `path` this code made: only a file whose recorded backing is
/// `backing` (never the user's file); missing is success.
pub(crate) fn remove_overlay_file(path: &str, backing: &str) -> CoreResult<()> {
    let p = Path::new(path);
    if std::fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    match recorded_backing(p) {
        Ok(Some(b)) if b == backing => {}
        _ => {
            return Err(snapshot_core::Error::backend(
                path,
                format!("not removed: it is not an overlay of {backing} that virt-snap made"),
            ))
        }
    }
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(be(path, e)),
    }
}

/// Deletes internal snapshot `tag`: through QEMU's snapshot-delete job on the nodes `at`
/// when `qmp` is given, else offline from the images `at`; not there is success.
pub(crate) async fn delete_internal_snapshot(
    conn: &Connection,
    qmp: Option<&QmpClient>,
    tag: &str,
    at: &[String],
) -> CoreResult<()> {
    match qmp {
        Some(qmp) => {
            let cmd = qc::SnapshotDelete {
                job_id: format!("vs-del-{:08x}", crc(tag)),
                tag: tag.to_string(),
                devices: at.to_vec(),
            };
            let job = qmp.run_job_command(&cmd, JOB_TIMEOUT);
            let what = format!("deleting internal snapshot {tag}");
            match progress::job(conn.progress(), qmp, &cmd.job_id, &what, job).await {
                Ok(()) => Ok(()),
                // Not there (any more) is success.
                Err(e) if e.to_string().contains("not found") => Ok(()),
                Err(e) => Err(be("snapshot-delete", e)),
            }
        }
        None => {
            for p in at {
                let which = crate::image::SnapshotRef::Name(tag.as_bytes().to_vec());
                match conn.image(p).snapshot_delete(&which) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(be(p, e)),
                }
            }
            Ok(())
        }
    }
}

/// The time from the first `STOP` event in `events` to the next `RESUME`, by QEMU's
/// timestamps (microseconds). Only events already received are read, but once a STOP is
/// seen its RESUME is waited for a little (it may come just after a command's reply).
async fn stop_to_resume(events: &mut qmp_proto::EventStream) -> Option<Duration> {
    let us = |(s, u): (i64, i64)| s * 1_000_000 + u;
    let (mut stop, end) = (None, Instant::now() + Duration::from_millis(200));
    loop {
        let ev = match events.try_next() {
            Some(ev) => ev,
            None if stop.is_none() => return None,
            None => {
                let left = end.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, events.next()).await {
                    Ok(Some(ev)) => ev,
                    _ => return None,
                }
            }
        };
        match ev.name.as_str() {
            "STOP" if stop.is_none() => stop = Some(us(ev.timestamp)),
            "RESUME" => {
                if let Some(a) = stop {
                    return Some(Duration::from_micros(
                        us(ev.timestamp).saturating_sub(a) as u64
                    ));
                }
            }
            _ => {}
        }
    }
}

pub(crate) fn crc(s: &str) -> u32 {
    // A small stable hash for job ids (FNV-1a).
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// Creates `file` for the RAM save: new, 0600.
fn create_private(file: &str) -> CoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map(drop)
        .map_err(|e| be(file, e))
}

#[async_trait]
impl core::MemorySaver for LiveDomain {
    async fn save(&self, file: &str, live: bool, fallback: bool) -> CoreResult<core::Saved> {
        let qmp = self.qmp()?;
        let mut live = live;
        if !live {
            // Not left on by an interrupted --live capture (it is set before the plan runs).
            let _ = self.set_background_snapshot(false).await;
        } else if !self.times().background_on {
            let on = if failpoint_is("refuse-background-snapshot") {
                Err(be(
                    "migrate-set-capabilities",
                    Error::new(
                        ErrorKind::Monitor,
                        "Background-snapshot: userfaultfd write-protect not available \
                         (failpoint)",
                    ),
                ))
            } else {
                self.set_background_snapshot(true).await
            };
            match on {
                Ok(()) => {}
                Err(e) if fallback => {
                    tracing::warn!(
                        "background-snapshot refused, saving with the guest paused: {e}"
                    );
                    self.times().fell_back = Some(e.to_string());
                    live = false;
                }
                Err(e) => {
                    return Err(snapshot_core::Error::backend(
                        file,
                        format!(
                            "--live needs QEMU's background-snapshot (userfaultfd \
                             write-protect), which this QEMU refuses (--fallback-paused saves \
                             with the guest paused instead): {e}"
                        ),
                    ))
                }
            }
        }
        create_private(file)?;
        if let Err(e) = qmp.run(&qc::Migrate::to(format!("file:{file}"))).await {
            if live {
                let _ = self.set_background_snapshot(false).await;
            }
            let _ = std::fs::remove_file(file);
            return Err(be("migrate", e));
        }
        if live {
            // RAM is fixed once QEMU's background-snapshot thread has stopped the VM, saved
            // the device state and started tracking RAM writes (userfaultfd write-protect):
            // pages are only sent after that, so the first page sent (or the end) says so.
            // The status turning `active` comes before it.
            self.poll_migration(POLL_IN_PAUSE, None, |i| {
                let pages = i
                    .ram
                    .as_ref()
                    .map_or(0, |r| r.normal.unwrap_or(0) + r.duplicate.unwrap_or(0));
                i.status == Some(MigrationStatus::Completed)
                    || (i.status == Some(MigrationStatus::Active) && pages > 0)
            })
            .await?;
        } else {
            let p = self.conn.progress();
            p.start(&format!("saving RAM to {file}"), Unit::Bytes);
            let info = self
                .poll_migration(POLL_IN_PAUSE, Some(p), |i| {
                    i.status == Some(MigrationStatus::Completed)
                })
                .await;
            p.finish(info.is_ok());
            self.times().downtime_ms = info?.downtime;
        }
        failpoint("save-memory");
        Ok(if live {
            core::Saved::Live
        } else {
            core::Saved::Complete
        })
    }

    async fn wait(&self, file: &str) -> CoreResult<()> {
        let p = self.conn.progress();
        p.start(
            &format!("saving RAM to {file} (the guest runs)"),
            Unit::Bytes,
        );
        let info = self
            .poll_migration(POLL, Some(p), |i| {
                i.status == Some(MigrationStatus::Completed)
            })
            .await;
        p.finish(info.is_ok());
        let info = info?;
        self.times().downtime_ms = info.downtime;
        let _ = self.set_background_snapshot(false).await;
        Ok(())
    }

    async fn discard(&self, file: &str) -> CoreResult<()> {
        if let Ok(qmp) = self.qmp() {
            let info = qmp
                .run(&qc::QueryMigrate)
                .await
                .map_err(|e| be("query-migrate", e))?;
            if matches!(
                info.status,
                Some(MigrationStatus::Setup) | Some(MigrationStatus::Active)
            ) {
                qmp.run(&qc::MigrateCancel)
                    .await
                    .map_err(|e| be("migrate_cancel", e))?;
                self.poll_migration(POLL, None, |i| {
                    !matches!(
                        i.status,
                        Some(MigrationStatus::Setup)
                            | Some(MigrationStatus::Active)
                            | Some(MigrationStatus::Cancelling)
                    )
                })
                .await?;
            }
            let _ = self.set_background_snapshot(false).await;
        }
        match std::fs::remove_file(file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(be(file, e)),
        }
    }
}

#[async_trait]
impl core::BackendSnapshots for LiveDomain {
    async fn create(&self, volume: &PoolVolume, _kind: BackendKind, name: &str) -> CoreResult<()> {
        let obj = format!("{}/{}", volume.pool, volume.volume);
        let vol = self
            .conn
            .pool(&volume.pool)
            .map_err(|e| be(&obj, e))?
            .volume(&volume.volume);
        let d = self.domain_ref();
        self.op
            .lend(vol.create_snapshot_for_domain(name, &d, &Default::default()))
            .await
            .map_err(|e| be(&obj, e))?;
        failpoint("backend-snapshot");
        Ok(())
    }

    async fn delete(&self, volume: &PoolVolume, _kind: BackendKind, name: &str) -> CoreResult<()> {
        delete_volume_snapshot(&self.dom, &self.op, volume, name).await
    }
}

/// The real clock.
pub(crate) struct RealClock(Instant);

#[async_trait]
impl core::Clock for RealClock {
    fn unix_time(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    fn monotonic(&self) -> Duration {
        self.0.elapsed()
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}

fn caps<'a>(l: &'a LiveDomain, clock: &'a RealClock) -> Capabilities<'a> {
    Capabilities {
        vcpus: l,
        agent: l,
        block: l,
        memory: l,
        backends: l,
        clock,
    }
}

impl Domain {
    /// The domain's snapshot metadata.
    pub(crate) fn snapshot_store(&self) -> Result<DomainStore> {
        Ok(self.conn.snapshot_store().domain(&self.name)?)
    }

    pub(crate) fn journal(&self, store: &DomainStore) -> Result<DomainJournal> {
        create_private_dir(store.dir())?;
        Ok(DomainJournal::open(store.journal_path())?)
    }

    /// The capabilities for one operation: the domain's QMP connection if it runs.
    pub(crate) async fn live(&self, st: Option<&RunRecord>) -> Result<LiveDomain> {
        let qmp = match st {
            Some(st) => Some(self.qmp(st).await?),
            None => None,
        };
        Ok(LiveDomain {
            conn: self.conn.clone(),
            dom: self.clone(),
            op: OpLock::new(self, "snapshot create", None),
            domain: self.name.clone(),
            qemu_pid: st.map_or(0, |s| s.pid),
            qmp_path: st.map(|s| s.qmp.clone()),
            qmp,
            agent_socket: st.and_then(|s| s.agent.clone()),
            agent: tokio::sync::Mutex::new(None),
            agent_unanswered: AtomicBool::new(false),
            agent_gave_up: AtomicBool::new(false),
            watchdog: Mutex::new(None),
            timings: Mutex::new(Timings::default()),
        })
    }

    /// The run record if the domain runs (under the operation lock), `None` if it is shut
    /// off.
    pub(crate) fn running_or_off(&self) -> Result<Option<RunRecord>> {
        match self.running() {
            Ok(st) => Ok(Some(st)),
            Err(e) if e.kind() == ErrorKind::NotRunning => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Refuses a snapshot operation while the running domain is held paused for the manual
    /// snapshots of a capture.
    pub(crate) fn refuse_if_held(&self, st: Option<&RunRecord>) -> Result<()> {
        if let (Some(_), Some(h)) = (st, super::hold::current(&self.dir()).first()) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "domain {:?} is paused for the manual snapshots of snapshot {:?} (disks {}): \
                     resume it first (virt-snap resume {})",
                    self.name,
                    h.snapshot,
                    h.disks.join(", "),
                    self.name
                ),
            ));
        }
        Ok(())
    }

    /// Recovers the captures and reverts a killed virt-snap left pending on this domain,
    /// under the operation lock `op` (given back, held throughout): finished if they had
    /// reached their commit point, undone otherwise; a capture's VM resumed and its guest
    /// thawed either way, a revert's domain as it was or reverted. Nothing to do is cheap
    /// (no journal, or nothing pending in it).
    pub(crate) async fn recover_captures(
        &self,
        op: locking::Acquired,
    ) -> (Result<Vec<Recovered>>, Result<locking::Acquired>) {
        let store = match self.snapshot_store() {
            Ok(s) => s,
            Err(e) => return (Err(e), Ok(op)),
        };
        if !store.journal_path().exists() {
            return (Ok(Vec::new()), Ok(op));
        }
        let mut journal = match DomainJournal::open(store.journal_path()) {
            Ok(j) => j,
            Err(e) => return (Err(e.into()), Ok(op)),
        };
        let pending = |j: &DomainJournal, kind: &str| j.pending().iter().any(|p| p.kind == kind);
        let mut out = Vec::new();
        let mut op = op;
        if pending(&journal, core::JOURNAL_KIND) {
            let live = match self.running_or_off() {
                Ok(st) => self.live(st.as_ref()).await,
                Err(e) => Err(e),
            };
            let live = match live {
                Ok(l) => l,
                Err(e) => return (Err(e), Ok(op)),
            };
            live.op.put(op).await;
            let clock = RealClock(Instant::now());
            let r = core::recover(&caps(&live, &clock), &mut journal, &store)
                .await
                .map_err(Error::from);
            // A --live capture sets background-snapshot before its first step (see
            // `snapshot_create`): one killed before its RAM save was recorded leaves it on.
            if let Some(qmp) = &live.qmp {
                let busy = qmp.run(&qc::QueryMigrate).await.map_or(true, |i| {
                    matches!(
                        i.status,
                        Some(MigrationStatus::Setup) | Some(MigrationStatus::Active)
                    )
                });
                if !busy {
                    let _ = live.set_background_snapshot(false).await;
                }
            }
            op = match live.op.take().await {
                Ok(op) => op,
                Err(e) => return (r, Err(e)),
            };
            match r {
                Ok(r) => out.extend(r),
                Err(e) => return (Err(e), Ok(op)),
            }
        }
        if pending(&journal, snapshot_core::revert::JOURNAL_KIND) {
            let (r, back) = super::revert::recover(self, &mut journal, &store, op).await;
            op = match back {
                Ok(op) => op,
                Err(e) => return (r, Err(e)),
            };
            match r {
                Ok(r) => out.extend(r),
                Err(e) => return (Err(e), Ok(op)),
            }
        }
        if pending(&journal, snapshot_core::delete::JOURNAL_KIND) {
            let (r, back) = super::delete::recover(self, &mut journal, &store, op).await;
            op = match back {
                Ok(op) => op,
                Err(e) => return (r, Err(e)),
            };
            match r {
                Ok(r) => out.extend(r),
                Err(e) => return (Err(e), Ok(op)),
            }
        }
        if !out.is_empty() {
            for r in &out {
                tracing::warn!(domain = %self.name, ?r, "recovered an interrupted snapshot operation");
            }
            let _ = journal.compact();
        }
        (Ok(out), Ok(op))
    }

    /// Take snapshot `req` of the domain (`virsh snapshot-create-as`): planned against the
    /// domain's disks (their current top images, pool volumes, agent), run step by step
    /// through the journal at `<state>/snapshots/<domain>/journal` under the domain's
    /// operation lock; a failure undoes what was done and leaves the VM running, the guest
    /// thawed, the metadata unchanged. A defined domain's stored definition then points its
    /// disks at their new overlays, so that its next start uses them.
    pub async fn snapshot_create(&self, req: CaptureRequest) -> Result<CaptureResult> {
        let op = self.op_lock_to_change("snapshot create").await?;
        let (recovered, op) = self.recover_captures(op).await;
        let op = op?;
        recovered?;
        let st = self.running_or_off()?;
        self.refuse_if_held(st.as_ref())?;
        let def = self.conn.definition(&self.name).ok();
        if st.is_none() && def.is_none() {
            return Err(self.record().err().unwrap_or_else(|| {
                Error::new(ErrorKind::NotRunning, "the domain is not running")
            }));
        }
        let live = self.live(st.as_ref()).await?;
        live.op.put(op).await;
        let store = self.snapshot_store()?;
        let info = self
            .domain_info(&live, st.as_ref(), def.as_ref(), &store)
            .await?;
        let clock = RealClock(Instant::now());
        let plan = CapturePlan::new(&req, &info, &clock)?;
        let mut journal = self.journal(&store)?;
        // A --live RAM save's background-snapshot capability is set before the plan runs, so
        // that its round trip is not in the pause. If QEMU refuses it here (or the test-only
        // failpoint capture:refuse-background-snapshot is set), SaveMemory tries again and
        // falls back (--fallback-paused) or fails the capture as it would have. An
        // interrupted capture may leave it on: recovery and a RAM save that is not live turn
        // it off.
        let live_ram = plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::SaveMemory { live: true, .. }));
        if live_ram
            && live.qmp.is_some()
            && !failpoint_is("refuse-background-snapshot")
            && live.set_background_snapshot(true).await.is_ok()
        {
            live.times().background_on = true;
        }
        let outcome = core::run(&plan, &caps(&live, &clock), &mut journal, &store).await;
        if outcome.is_err() && live.times().background_on {
            let _ = live.set_background_snapshot(false).await;
        }
        // Only pending operations are kept (a failed metadata write stays for recovery).
        if let Err(e) = journal.compact() {
            tracing::warn!(domain = %self.name, "cannot compact the capture journal: {e}");
        }
        let outcome = outcome?;
        let overlays: Vec<(&str, &str, &str, &str)> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::AddOverlayNode {
                    disk,
                    node,
                    path,
                    format,
                } => Some((disk.as_str(), node.as_str(), path.as_str(), format.as_str())),
                _ => None,
            })
            .collect();
        // The run record names each disk's top image, node and format as QEMU has them now
        // (read again: the capture may have noted things in it, a `--halt`).
        let st = st.map(|rec| match runstate::load(&self.dir()) {
            Ok(Some(now)) if now.pid == rec.pid && now.start_time == rec.start_time => now,
            _ => rec,
        });
        if let (Some(mut rec), false) = (st, overlays.is_empty()) {
            for d in &mut rec.disks {
                if let Some((_, n, p, f)) = overlays.iter().find(|(t, ..)| *t == d.target) {
                    d.source = PathBuf::from(p);
                    d.node = Some(n.to_string());
                    d.format = Some(f.to_string());
                }
            }
            runstate::save(&self.dir(), &rec)?;
        }
        if let Some(mut def) = def {
            let mut changed = false;
            for s in &plan.steps {
                if let Step::PreCreateOverlay {
                    disk, path, format, ..
                } = s
                {
                    if let Some(d) = def.disk_mut(disk) {
                        d.put_overlay(path, format);
                        changed = true;
                    }
                }
            }
            if changed {
                self.conn.definitions().save(&def)?;
            }
        }
        let t = live.times();
        let mut warnings = outcome.warnings;
        if let Some(why) = &t.fell_back {
            warnings.insert(
                0,
                format!(
                    "QEMU refused background-snapshot, so RAM was saved with the guest paused \
                     (--fallback-paused) for {} ms: {why}",
                    t.paused.map_or(0, |d| d.as_millis())
                ),
            );
        }
        Ok(CaptureResult {
            name: plan.name.to_string(),
            xml: outcome.snapshot.as_ref().map(|s| s.to_xml()),
            snapshot: outcome.snapshot,
            warnings,
            paused: t.paused,
            frozen: t.frozen,
            stall: t.stall,
            memory_downtime_ms: t.downtime_ms,
            held: t.held.clone(),
        })
    }

    /// The domain as the planner sees it.
    pub(crate) async fn domain_info(
        &self,
        live: &LiveDomain,
        st: Option<&RunRecord>,
        def: Option<&snapshot_core::DomainDef>,
        store: &DomainStore,
    ) -> Result<DomainInfo> {
        let mut disks = Vec::new();
        let state;
        if let Some(st) = st {
            let qmp = live.qmp.as_ref().expect("running");
            state = if qmp.run(&qc::QueryStatus).await?.running {
                core::RunState::Running
            } else {
                core::RunState::Paused
            };
            for b in crate::domain::block_devices(qmp, st).await? {
                let Some(rd) = st.disks.iter().find(|d| d.qdev == b.qdev) else {
                    continue;
                };
                let ddef = def.and_then(|d| d.disk(&rd.target));
                disks.push(DomainDisk {
                    target: rd.target.clone(),
                    source: Some(b.source),
                    format: b.format,
                    volume: self.pool_volume(ddef).await?,
                    readonly: b.readonly || rd.readonly,
                    cdrom: ddef.is_some_and(|d| d.is_cdrom()),
                    node: b.node_name.unwrap_or_default(),
                });
            }
        } else {
            state = core::RunState::ShutOff;
            let def = def.expect("checked by the caller");
            let spec = self.conn.run_spec(def).await?;
            for (d, ddef) in spec.disks.iter().zip(def.disks()) {
                disks.push(DomainDisk {
                    target: d.target.clone(),
                    source: Some(d.path.display().to_string()),
                    format: d.format.as_str().to_string(),
                    volume: self.pool_volume(Some(ddef)).await?,
                    readonly: d.readonly,
                    cdrom: ddef.is_cdrom(),
                    node: String::new(),
                });
            }
        }
        let domain_xml = def.map(|d| RawXml::element(&d.to_xml())).transpose()?;
        let running_xml = match st {
            Some(_) => std::fs::read_to_string(self.dir().join(crate::domain::LIVE_XML))
                .ok()
                .and_then(|x| RawXml::element(&x).ok()),
            None => None,
        };
        Ok(DomainInfo {
            name: self.name.clone(),
            state,
            has_agent: st.is_some_and(|s| s.agent.is_some()),
            disks,
            current: store.current()?,
            domain_xml,
            running_xml,
        })
    }

    /// The pool volume a disk of the definition is, with its backend's snapshot kind.
    async fn pool_volume(
        &self,
        d: Option<&snapshot_core::domain::Disk>,
    ) -> Result<Option<PoolVolume>> {
        let Some(SourceRef::Volume { pool, volume }) = d.and_then(|d| d.source_ref()) else {
            return Ok(None);
        };
        let p = self.conn.pool(pool)?;
        let info = p.info().await?;
        use storage_backends::{PoolKind, SnapshotKind};
        let backend = match info.kind {
            PoolKind::Btrfs => Some(BackendKind::Btrfs),
            PoolKind::Logical => Some(BackendKind::Lvm),
            PoolKind::Dir
                if info
                    .capabilities
                    .open_volume_snapshots
                    .contains(&SnapshotKind::File) =>
            {
                Some(BackendKind::Reflink)
            }
            PoolKind::Dir => None,
        };
        Ok(Some(PoolVolume {
            pool: pool.to_string(),
            volume: volume.to_string(),
            backend,
        }))
    }
}

/// Creates `dir` (and its parents) `0700` if missing.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::caused_by(format!("cannot create {}", dir.display()), e))
}
