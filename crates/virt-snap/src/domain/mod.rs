//! Domains: running VMs, with no daemon.
//!
//! Every command is a short process. [`Connection::start`] launches QEMU (`-daemonize`) so
//! that it outlives the command; the domain's leases are inherited by QEMU alone, so they live
//! exactly as long as QEMU, however it ends. The run directory (`<state dir>/run/<domain>/`,
//! `0700`) and QEMU itself are the truth: the record there names the QEMU (pid and start
//! time), its QMP and agent sockets, and whether a stop was asked for; each command checks
//! the QEMU is still the one recorded (`/proc/PID/stat`) and records how it ended (destroyed,
//! shut down, or crashed when nobody asked). [`Connection::attach`] adopts a QEMU that another
//! tool started. See docs/domains.md.
//!
//! Every operation on a running domain holds the domain's operation lock (QEMU serves one
//! QMP client per socket): a second one waits for it, up to [`Domain::op_timeout`], then fails
//! naming the operation in the way.

pub(crate) mod argv;
mod define;
pub mod keeper;
pub mod runstate;
mod spec;

pub use define::DOMAINS_SUBDIR;
pub use runstate::Origin;
pub use spec::{DiskBus, DiskDevice, DiskFormat, DiskLease, DiskSpec, DomainKind, RunSpec};

use crate::connection::Connection;
use crate::error::{Error, ErrorKind, Result};
use locking::{DiskUse, Purpose, Resource};
use qmp_proto::QmpClient;
use runstate::{RunDisk, RunState, Status};
use serde::Serialize;
use serde_json::Value;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long an operation waits for another one on the same domain by default.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting to QEMU's monitor may take.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The definition a running domain's QEMU was started from, in its run directory (only
/// when it was started from one).
pub(crate) const LIVE_XML: &str = "live.xml";

/// A domain's state, as virsh names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DomainState {
    /// The vCPUs run.
    #[serde(rename = "running")]
    Running,
    /// The vCPUs are paused.
    #[serde(rename = "paused")]
    Paused,
    /// No QEMU runs.
    #[serde(rename = "shut off")]
    ShutOff,
    /// The guest crashed (QEMU still runs).
    #[serde(rename = "crashed")]
    Crashed,
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
        })
    }
}

/// Why the domain is in its state, as virsh names the reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateReason {
    /// Running since it started.
    Booted,
    /// Paused on request.
    User,
    /// Paused for the user's own snapshots of a snapshot's `manual` disks (until resumed,
    /// at the latest at the hold's end).
    Snapshot,
    /// Paused before the guest ran (started with `--paused`).
    StartingUp,
    /// Paused by its lease keeper, which could not renew the domain's cluster leases in
    /// time (self-fencing; `resume` takes the leases again first).
    Fenced,
    /// Paused on an I/O error.
    IoError,
    /// The guest panicked.
    Panicked,
    /// Ended by destroy.
    Destroyed,
    /// Ended by a shutdown: asked for by virt-snap, or a poweroff from inside the guest
    /// (QEMU exited normally).
    Shutdown,
    /// Stopped by a snapshot's `--halt` once it was taken (virsh's "from snapshot").
    FromSnapshot,
    /// QEMU ended without virt-snap asking and without exiting normally (killed, crashed;
    /// for an attached QEMU, any end virt-snap did not ask for).
    Crashed,
    /// QEMU failed to start.
    Failed,
    /// Something else.
    Unknown,
}

impl std::fmt::Display for StateReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateReason::Booted => "booted",
            StateReason::User => "user",
            StateReason::Snapshot => "snapshot",
            StateReason::Fenced => "fenced: cluster leases lost",
            StateReason::StartingUp => "starting up",
            StateReason::IoError => "I/O error",
            StateReason::Panicked => "panicked",
            StateReason::Destroyed => "destroyed",
            StateReason::Shutdown => "shutdown",
            StateReason::FromSnapshot => "from snapshot",
            StateReason::Crashed => "crashed",
            StateReason::Failed => "failed",
            StateReason::Unknown => "unknown",
        })
    }
}

/// A domain's state with its reason (`virsh domstate --reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StateInfo {
    /// The state.
    pub state: DomainState,
    /// Why.
    pub reason: StateReason,
    /// The QEMU's pid while it runs.
    pub pid: Option<u32>,
}

/// A line of [`Connection::domains`] (`virsh list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DomainSummary {
    /// The id: the QEMU's pid while it runs.
    pub id: Option<u32>,
    /// The name.
    pub name: String,
    /// The state.
    pub state: DomainState,
    /// Started by virt-snap, or adopted.
    pub origin: Origin,
    /// Defined (its XML is stored), not only run or adopted.
    pub persistent: bool,
}

/// A disk of a running domain, as its QEMU reports it (`virsh domblklist`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDevice {
    /// The guest's name for it (`vda`); for an adopted QEMU, the device's id.
    pub target: String,
    /// The image QEMU has open on top.
    pub source: String,
    /// The device's qdev id.
    pub qdev: String,
    /// The top node's name.
    pub node_name: Option<String>,
    /// The top image's format.
    pub format: String,
    /// Read-only.
    pub readonly: bool,
}

/// A domain, by name: the handle every domain operation is a method of.
#[derive(Debug, Clone)]
pub struct Domain {
    pub(crate) conn: Connection,
    pub(crate) name: String,
    op_timeout: Duration,
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("domain {name:?} not found (no domain of that name is defined, runs or ran here)"),
    )
}

fn not_running(name: &str) -> Error {
    Error::new(
        ErrorKind::NotRunning,
        format!("domain {name:?} is not running"),
    )
}

/// The short id of a qdev QOM path: `/machine/peripheral/vs-vda/virtio-backend` -> `vs-vda`.
pub(crate) fn short_qdev(q: &str) -> String {
    let q = q.strip_suffix("/virtio-backend").unwrap_or(q);
    q.rsplit('/').next().unwrap_or(q).to_string()
}

/// The last lines of the files `paths`, joined into one line.
fn log_tail(paths: &[PathBuf]) -> String {
    let mut lines: Vec<String> = Vec::new();
    for p in paths {
        if let Ok(t) = std::fs::read_to_string(p) {
            lines.extend(
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
    }
    let n = lines.len();
    lines[n.saturating_sub(3)..].join("; ")
}

impl Connection {
    /// The domain `name` (nothing is read yet; its operations fail with
    /// [`ErrorKind::NotFound`] when no domain of that name ran here).
    pub fn domain(&self, name: &str) -> Result<Domain> {
        spec::check_name(name)?;
        Ok(Domain {
            conn: self.clone(),
            name: name.to_string(),
            op_timeout: DEFAULT_OP_TIMEOUT,
        })
    }

    /// The running domains, and with `all`, the defined ones that do not run (`shut off`)
    /// and those that ran here and ended. Sorted by name. A QEMU found dead is recorded as
    /// ended on the way.
    pub async fn domains(&self, all: bool) -> Result<Vec<DomainSummary>> {
        let root = self.state_dir().join(runstate::RUN_SUBDIR);
        let mut names: Vec<String> = match std::fs::read_dir(&root) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| spec::check_name(n).is_ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(Error::caused_by(
                    format!("cannot list {}", root.display()),
                    e,
                ))
            }
        };
        names.extend(self.defined_names()?);
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for n in names {
            let mut d = self.domain(&n)?;
            let persistent = self.is_defined(&n);
            let Some(st) = runstate::load(&d.dir())? else {
                if all && persistent {
                    out.push(DomainSummary {
                        id: None,
                        name: n,
                        state: DomainState::ShutOff,
                        origin: Origin::Started,
                        persistent,
                    });
                }
                continue;
            };
            let st = d.refresh(st, false)?;
            let state = match st.status {
                Status::ShutOff => DomainState::ShutOff,
                _ => {
                    // A busy domain is listed as running rather than waiting for it.
                    d.op_timeout = Duration::from_millis(500);
                    match d.state().await {
                        Ok(i) => i.state,
                        Err(_) => DomainState::Running,
                    }
                }
            };
            if state == DomainState::ShutOff && !all {
                continue;
            }
            out.push(DomainSummary {
                id: (state != DomainState::ShutOff).then_some(st.pid),
                name: n,
                state,
                origin: st.origin,
                persistent,
            });
        }
        Ok(out)
    }

    /// Start a domain: take its leases (exclusive for writable disks, shared for read-only
    /// and shareable ones and for every backing image), launch QEMU so that it inherits them
    /// and outlives this process, and record it. Fails naming the holder when a disk is in
    /// use (a volume operation, another domain, a QEMU of another tool), and with
    /// [`ErrorKind::AlreadyExists`] when the domain runs already.
    pub async fn start(&self, spec: &RunSpec) -> Result<Domain> {
        spec.validate()?;
        let dom = self.domain(&spec.name)?;
        // A revert killed midway may have left the domain stopped, its definition switched:
        // recovered first (which may start the domain again).
        let _op = dom.recover_pending(dom.op_lock("start").await?).await?;
        self.start_locked(spec).await
    }

    /// [`Connection::start`] under the domain's operation lock, which the caller holds.
    pub(crate) async fn start_locked(&self, spec: &RunSpec) -> Result<Domain> {
        spec.validate()?;
        let dom = self.domain(&spec.name)?;
        let dir = dom.dir();
        if let Some(st) = runstate::load(&dir)? {
            let st = dom.refresh(st, true)?;
            if st.status != Status::ShutOff {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("domain {:?} is already running (pid {})", spec.name, st.pid),
                ));
            }
        }
        let mut uses = Vec::new();
        let mut paths = Vec::new();
        let mut disks = Vec::new();
        for d in &spec.disks {
            let path = std::fs::canonicalize(&d.path).map_err(|e| {
                Error::caused_by(format!("disk {}: {}", d.target, d.path.display()), e)
            })?;
            let backing = if d.backing.is_empty() && d.format != DiskFormat::Raw {
                chain_below(&path, d.format)
                    .map_err(|e| Error::caused_by(format!("disk {}", d.target), e))?
            } else {
                d.backing.clone()
            };
            let ro = d.readonly || d.device == DiskDevice::Cdrom;
            uses.push(DiskUse {
                resource: d.lease.0.clone(),
                read_only: ro,
                shareable: d.shareable,
            });
            uses.extend(
                backing
                    .iter()
                    .map(|b| DiskUse::read_only(Resource::file(b))),
            );
            disks.push(RunDisk {
                target: d.target.clone(),
                qdev: d.qdev(),
                source: path.clone(),
                readonly: ro,
                node: Some(d.format_node()),
                format: Some(d.format.as_str().to_string()),
            });
            paths.push(path);
        }
        let leases = self.inner().locks.acquire(&Purpose::VmStart {
            domain: spec.name.clone(),
            disks: uses.clone(),
        })?;

        runstate::create_dir(&dir)?;
        let cluster = !leases.tickets().is_empty();
        keeper::remove(&dir);
        for f in [
            "qmp.sock",
            "qga.sock",
            "qemu.pid",
            "qemu.log",
            "launch.log",
            LIVE_XML,
            keeper::MONITOR,
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let mut st = RunState {
            name: spec.name.clone(),
            uuid: Some(spec.uuid.clone().unwrap_or_else(spec::random_uuid)),
            origin: Origin::Started,
            status: Status::Starting,
            reason: None,
            pid: 0,
            start_time: 0,
            qmp: dir.join("qmp.sock"),
            agent: spec.agent.then(|| dir.join("qga.sock")),
            destroy_requested: false,
            shutdown_requested: false,
            halt_requested: false,
            disks,
        };
        runstate::save(&dir, &st)?;
        if let Some(xml) = &spec.definition {
            runstate::write_private(&dir.join(LIVE_XML), xml.as_bytes())?;
        }
        let kind = spec.kind.resolve();
        let dirfd = runstate::open_dir_path(&dir)?;
        let via = format!("/proc/self/fd/{}", dirfd.as_raw_fd());
        let args = argv::build(
            spec,
            st.uuid.as_deref().unwrap_or_default(),
            kind,
            &paths,
            &argv::RunFiles {
                dir: &via,
                keeper: cluster,
            },
        );
        let mut inherit: Vec<i32> = leases.lock_fds().iter().map(|f| f.as_raw_fd()).collect();
        inherit.push(dirfd.as_raw_fd());
        let emulator = spec
            .emulator
            .clone()
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let launched = launch(&emulator, &args, &dir, inherit).await;
        drop(dirfd);
        let logs = [dir.join("launch.log"), dir.join("qemu.log")];
        let fail = |st: &mut RunState, msg: String| {
            st.status = Status::ShutOff;
            st.reason = Some("failed".into());
            let _ = runstate::save(&dir, st);
            Error::new(ErrorKind::ToolFailed, msg)
        };
        if let Err(e) = launched {
            let tail = log_tail(&logs);
            return Err(fail(
                &mut st,
                format!(
                    "cannot start domain {:?}: {}: {e}{}",
                    spec.name,
                    emulator.display(),
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                ),
            ));
        }
        let pid = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let stat = pid.and_then(runstate::proc_stat);
        let (Some(pid), Some(stat)) = (pid, stat.filter(|s| s.state != 'Z')) else {
            return Err(fail(
                &mut st,
                format!(
                    "cannot start domain {:?}: QEMU ended at once: {}",
                    spec.name,
                    log_tail(&logs)
                ),
            ));
        };
        st.pid = pid;
        st.start_time = stat.start_time;
        // In a cluster lockspace the keeper renews the leases from now on (and revokes them
        // when QEMU exits).
        if let Err(e) = keeper::hand_to_qemu(self, &dir, leases, &uses, pid, stat.start_time) {
            // The leases are not recorded as QEMU's: do not leave it running with them.
            // SAFETY: kill(2) on the pid we just started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err(fail(
                &mut st,
                format!("cannot start domain {:?}: {e}", spec.name),
            ));
        }
        st.status = Status::Running;
        runstate::save(&dir, &st)?;
        tracing::info!(domain = %spec.name, pid, "started");
        Ok(dom)
    }

    /// Adopt a QEMU that another tool started, given its QMP socket (and its guest agent's
    /// socket): its pid comes from the socket (`SO_PEERCRED`), its disks from `query-block`.
    /// Its images get leases like a started domain's, passed to the QEMU over QMP (`getfd`),
    /// so that volume operations are refused while it runs and the leases go when it exits.
    pub async fn attach(&self, name: &str, qmp: &Path, agent: Option<&Path>) -> Result<Domain> {
        let dom = self.domain(name)?;
        let _op = dom.op_lock("attach").await?;
        let dir = dom.dir();
        if let Some(st) = runstate::load(&dir)? {
            let st = dom.refresh(st, true)?;
            if st.status != Status::ShutOff {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("domain {name:?} is already running (pid {})", st.pid),
                ));
            }
        }
        let qmp = spec::absolute(qmp);
        let agent = agent.map(spec::absolute);
        let pid = runstate::socket_peer_pid(&qmp)?;
        let stat = runstate::proc_stat(pid).ok_or_else(|| not_running(name))?;
        let client = connect_qmp(&qmp).await?;
        let blocks = client.run(&qmp_proto::commands::QueryBlock).await?;
        let mut uses = Vec::new();
        let mut disks = Vec::new();
        for b in &blocks {
            let Some(ins) = &b.inserted else { continue };
            let qdev = short_qdev(b.qdev.as_deref().unwrap_or(&b.device));
            let mut image = Some(&ins.image);
            let mut top = true;
            while let Some(img) = image {
                let p = Path::new(&img.filename);
                if !p.is_absolute() || !p.exists() {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "disk {qdev}: {:?} is not a local file virt-snap can lease",
                            img.filename
                        ),
                    ));
                }
                uses.push(if top {
                    DiskUse {
                        resource: Resource::file(p),
                        read_only: ins.ro,
                        shareable: false,
                    }
                } else {
                    DiskUse::read_only(Resource::file(p))
                });
                top = false;
                image = img.backing_image.as_deref();
            }
            disks.push(RunDisk {
                target: qdev.clone(),
                qdev,
                source: PathBuf::from(&ins.image.filename),
                readonly: ins.ro,
                node: ins.node_name.clone(),
                format: Some(ins.image.format.clone()),
            });
        }
        let leases = self.inner().locks.acquire(&Purpose::VmAttach {
            domain: name.to_string(),
            qemu_pid: pid,
            disks: uses.clone(),
        })?;
        for (i, fd) in leases.lock_fds().into_iter().enumerate() {
            client
                .getfd(&format!("vs-lease-{i}"), fd)
                .await
                .map_err(|e| {
                    Error::caused_by(format!("cannot pass leases to QEMU (pid {pid})"), e)
                })?;
        }
        drop(client);
        runstate::create_dir(&dir)?;
        keeper::hand_to_qemu(self, &dir, leases, &uses, pid, stat.start_time)?;
        let st = RunState {
            name: name.to_string(),
            uuid: None,
            origin: Origin::Attached,
            status: Status::Running,
            reason: None,
            pid,
            start_time: stat.start_time,
            qmp,
            agent,
            destroy_requested: false,
            shutdown_requested: false,
            halt_requested: false,
            disks,
        };
        runstate::save(&dir, &st)?;
        Ok(dom)
    }
}

/// The images below `top` in its backing chain (canonical paths).
fn chain_below(top: &Path, format: DiskFormat) -> Result<Vec<PathBuf>> {
    let fmt = image_formats::Format::from_name(format.as_str())?;
    let chain = image_formats::backing_chain(top, Some(fmt), Default::default())?;
    Ok(chain
        .iter()
        .skip(1)
        .map(|i| std::fs::canonicalize(&i.filename).unwrap_or_else(|_| i.filename.clone().into()))
        .collect())
}

/// Run the emulator with `args` from `dir` (`-daemonize`: the process we start exits once
/// QEMU runs on in the background), letting it inherit exactly the descriptors `inherit`
/// besides stdio, and wait for it.
async fn launch(emulator: &Path, args: &[String], dir: &Path, inherit: Vec<i32>) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("launch.log"))?;
    let mut cmd = tokio::process::Command::new(emulator);
    cmd.args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: between fork and exec this only calls umask and fcntl (async-signal-safe) on
    // descriptors numbers copied beforehand; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(0o077);
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::caused_by(format!("cannot run {}", emulator.display()), e)
            .with_kind(ErrorKind::ToolFailed)
    })?;
    let status = match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
        Ok(r) => r?,
        Err(_) => {
            let _ = child.kill().await;
            return Err(Error::new(
                ErrorKind::ToolFailed,
                "QEMU did not finish starting within 120 s",
            ));
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::ToolFailed, format!("QEMU {status}")))
    }
}

/// Connect to a QMP socket (long paths through the directory's descriptor).
pub(crate) async fn connect_qmp(path: &Path) -> Result<QmpClient> {
    let (p, _keep) = runstate::socket_path(path)?;
    QmpClient::connect_unix_timeout(&p, QMP_CONNECT_TIMEOUT)
        .await
        .map_err(|e| {
            Error::caused_by(
                format!("cannot talk to QEMU's monitor {}", path.display()),
                e,
            )
        })
}

/// Wait until `st`'s QEMU is gone (exited, even if not yet reaped), up to `t`.
async fn wait_gone(st: &RunState, t: Duration) -> bool {
    let end = Instant::now() + t;
    loop {
        if !st.alive() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Domain {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long an operation waits for another one on this domain to finish.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The same handle, waiting up to `t` for other operations on the domain.
    pub fn with_op_timeout(mut self, t: Duration) -> Domain {
        self.op_timeout = t;
        self
    }

    /// The domain's run directory.
    pub fn dir(&self) -> PathBuf {
        runstate::run_dir(self.conn.state_dir(), &self.name)
    }

    /// The pid of the domain's QEMU, if it runs (as far as `/proc` shows).
    pub fn pid(&self) -> Result<Option<u32>> {
        let st = match self.record() {
            Err(e) if e.kind() == ErrorKind::NotRunning => return Ok(None),
            r => r?,
        };
        Ok((st.status != Status::ShutOff && st.alive()).then_some(st.pid))
    }

    /// Started by virt-snap or adopted.
    pub fn origin(&self) -> Result<Origin> {
        Ok(self.record()?.origin)
    }

    /// The run record; a defined domain that never ran has none: [`ErrorKind::NotRunning`].
    pub(crate) fn record(&self) -> Result<RunState> {
        match runstate::load(&self.dir())? {
            Some(st) => Ok(st),
            None if self.conn.is_defined(&self.name) => Err(not_running(&self.name)),
            None => Err(not_found(&self.name)),
        }
    }

    pub(crate) async fn op_lock(&self, op: &str) -> Result<locking::Acquired> {
        let p = Purpose::ForDomain {
            domain: self.name.clone(),
            qemu_pid: 0,
            op: op.to_string(),
            volumes: vec![],
        };
        let held = self
            .conn
            .inner()
            .locks
            .acquire_timeout(&p, self.op_timeout)
            .await?;
        // A cluster domain's keeper killed outright: a new one (which fences at once if the
        // leases are gone meanwhile).
        if keeper::ensure_keeper(&self.conn, &self.dir()) {
            tracing::warn!(domain = %self.name, "the lease keeper was gone: started a new one");
        }
        Ok(held)
    }

    /// [`Domain::op_lock`] for an operation that changes the domain's disks or snapshots: it
    /// begins only while the domain's cluster leases are current, recorded under their tokens
    /// (a no-op in a local lockspace, or for a domain not running here).
    pub(crate) async fn op_lock_to_change(&self, op: &str) -> Result<locking::Acquired> {
        let held = self.op_lock(op).await?;
        keeper::leases_current(&self.conn, &self.name, op)?;
        Ok(held)
    }

    /// Does the domain's journal hold an operation a killed virt-snap left pending (a capture
    /// or a revert)? Read without the lock and without changing the file (it is compacted
    /// after each operation, so it stays small); an unreadable journal counts as pending, for
    /// recovery to report.
    pub(crate) fn has_pending_operations(&self) -> bool {
        use snapshot_core::journal::{read_records, Entry};
        let path = self
            .conn
            .state_dir()
            .join(crate::snapshot::SNAPSHOTS_SUBDIR)
            .join(&self.name)
            .join("journal");
        if !path.exists() {
            return false;
        }
        let Ok(r) = read_records::<snapshot_core::ops::OpRecord>(&path) else {
            return true;
        };
        let mut open = std::collections::BTreeSet::new();
        for (_, e) in r.records {
            match e {
                Entry::Begin { op, .. } => {
                    open.insert(op);
                }
                Entry::End { op, .. } => {
                    open.remove(&op);
                }
                _ => {}
            }
        }
        !open.is_empty()
    }

    /// Recovers captures a killed virt-snap left pending (under the operation lock `op`); a
    /// failure is logged, not fatal to the command at hand.
    /// Returns the operation lock `op` (held throughout).
    async fn recover_pending(&self, op: locking::Acquired) -> Result<locking::Acquired> {
        let (r, op) = self.recover_captures(op).await;
        if let Err(e) = r {
            tracing::warn!(domain = %self.name, "cannot recover an interrupted snapshot: {e}");
        }
        op
    }

    /// Bring the record up to date with `/proc`: a QEMU that is gone is recorded as ended
    /// (destroyed or shut down if that was asked for, crashed otherwise) and its sockets
    /// removed. A record of a start in progress is only judged under the operation lock
    /// (`locked`): then the start was interrupted.
    pub(crate) fn refresh(&self, mut st: RunState, locked: bool) -> Result<RunState> {
        let dir = self.dir();
        match st.status {
            Status::ShutOff => return Ok(st),
            Status::Running if st.alive() => return Ok(st),
            Status::Starting if !locked => return Ok(st),
            Status::Starting => {
                // A start that was interrupted after QEMU began: adopt it, if it runs.
                let pid = std::fs::read_to_string(dir.join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                if let Some(s) = pid.and_then(runstate::proc_stat) {
                    if s.state != 'Z' {
                        st.pid = pid.unwrap_or(0);
                        st.start_time = s.start_time;
                        st.status = Status::Running;
                        runstate::save(&dir, &st)?;
                        return Ok(st);
                    }
                }
                st.reason = Some("failed".into());
            }
            Status::Running => {
                st.reason = Some(
                    if st.destroy_requested {
                        "destroyed"
                    } else if st.halt_requested {
                        "from snapshot"
                    } else if st.shutdown_requested || exited_cleanly(&st, &dir) {
                        "shutdown"
                    } else {
                        "crashed"
                    }
                    .into(),
                );
            }
        }
        st.status = Status::ShutOff;
        // So that "shut off" also means its leases are free (bounded: a stuck thread is
        // reported as shut off all the same).
        if st.pid != 0 && !runstate::wait_threads_gone(st.pid, std::time::Duration::from_secs(2)) {
            tracing::warn!(domain = %self.name, pid = st.pid, "QEMU's threads are slow to exit");
        }
        if st.origin == Origin::Started {
            for f in ["qmp.sock", "qga.sock", "qemu.pid"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        runstate::save(&dir, &st)?;
        tracing::info!(domain = %self.name, reason = ?st.reason, "QEMU has ended");
        Ok(st)
    }

    /// The record of the running domain (under the operation lock), or
    /// [`ErrorKind::NotRunning`].
    pub(crate) fn running(&self) -> Result<RunState> {
        let st = self.refresh(self.record()?, true)?;
        if st.status == Status::ShutOff {
            return Err(not_running(&self.name));
        }
        Ok(st)
    }

    pub(crate) async fn qmp(&self, st: &RunState) -> Result<QmpClient> {
        match connect_qmp(&st.qmp).await {
            Ok(c) => Ok(c),
            Err(e) => {
                if ended_meanwhile(st).await {
                    self.refresh(st.clone(), true)?;
                    return Err(not_running(&self.name));
                }
                Err(e)
            }
        }
    }

    /// The state and its reason: `running (booted)`, `paused (user)`, `shut off
    /// (destroyed)`, `shut off (crashed)` when QEMU ended without virt-snap asking, ...
    pub async fn state(&self) -> Result<StateInfo> {
        let st = match self.record() {
            Err(e) if e.kind() == ErrorKind::NotRunning => {
                // Never started, but an offline operation may have been interrupted.
                if self.has_pending_operations() {
                    let _op = self
                        .recover_pending(self.op_lock("domstate").await?)
                        .await?;
                }
                return Ok(StateInfo {
                    state: DomainState::ShutOff,
                    reason: StateReason::Unknown,
                    pid: None,
                });
            }
            r => r?,
        };
        let st = self.refresh(st, false)?;
        if st.status == Status::ShutOff && !self.has_pending_operations() {
            return Ok(shut_off(&st));
        }
        let _op = self
            .recover_pending(self.op_lock("domstate").await?)
            .await?;
        let st = self.refresh(self.record()?, true)?;
        if st.status == Status::ShutOff {
            return Ok(shut_off(&st));
        }
        let qmp = match self.qmp(&st).await {
            Err(e) if e.kind() == ErrorKind::NotRunning => {
                return Ok(shut_off(&self.record()?));
            }
            r => r?,
        };
        let v = match qmp.execute("query-status", None).await {
            Ok(v) => v,
            Err(_) if ended_meanwhile(&st).await => {
                return Ok(shut_off(&self.refresh(st, true)?));
            }
            Err(e) => return Err(e.into()),
        };
        let status = v.get("status").and_then(Value::as_str).unwrap_or("");
        let (state, reason) = match status {
            "running" => (DomainState::Running, StateReason::Booted),
            "paused" | "suspended" if keeper::fenced(&self.dir()).is_some() => {
                (DomainState::Paused, StateReason::Fenced)
            }
            "paused" | "suspended" if !crate::snapshot::hold::current(&self.dir()).is_empty() => {
                (DomainState::Paused, StateReason::Snapshot)
            }
            "paused" | "suspended" => (DomainState::Paused, StateReason::User),
            "prelaunch" => (DomainState::Paused, StateReason::StartingUp),
            "io-error" => (DomainState::Paused, StateReason::IoError),
            "guest-panicked" => (DomainState::Crashed, StateReason::Panicked),
            _ if v.get("running").and_then(Value::as_bool) == Some(true) => {
                (DomainState::Running, StateReason::Unknown)
            }
            _ => (DomainState::Paused, StateReason::Unknown),
        };
        Ok(StateInfo {
            state,
            reason,
            pid: Some(st.pid),
        })
    }

    /// Pause the domain's vCPUs (`virsh suspend`).
    pub async fn suspend(&self) -> Result<()> {
        let _op = self.recover_pending(self.op_lock("suspend").await?).await?;
        let st = self.running()?;
        self.qmp(&st).await?.run(&qmp_proto::commands::Stop).await?;
        Ok(())
    }

    /// Resume the domain's vCPUs (`virsh resume`); this also ends a manual hold (the
    /// domain paused after a snapshot with `manual` disks, for the user's own snapshots of
    /// them), which is ended first, so that its resumer does nothing later.
    pub async fn resume(&self) -> Result<()> {
        let _op = self.recover_pending(self.op_lock("resume").await?).await?;
        let st = self.running()?;
        let dir = self.dir();
        crate::snapshot::hold::clear(&dir)?;
        let qmp = self.qmp(&st).await?;
        if keeper::fenced(&dir).is_some() {
            self.regain_leases(&st, &qmp).await?;
        }
        qmp.run(&qmp_proto::commands::Cont).await?;
        Ok(())
    }

    /// After a fence: take the domain's cluster leases again (refused, naming the holder,
    /// when another host has them now), start a new keeper, and let QEMU write again.
    async fn regain_leases(&self, st: &RunState, qmp: &QmpClient) -> Result<()> {
        let dir = self.dir();
        let old = keeper::load(&dir).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "domain {:?} was fenced, but its lease record is gone",
                    self.name
                ),
            )
        })?;
        let leases = self
            .conn
            .inner()
            .locks
            .acquire(&Purpose::VmAttach {
                domain: self.name.clone(),
                qemu_pid: st.pid,
                disks: old.uses.clone(),
            })
            .map_err(|e| {
                Error::caused_by(
                    format!(
                        "domain {:?} stays paused: its leases cannot be taken again",
                        self.name
                    ),
                    e,
                )
            })?;
        keeper::remove(&dir);
        keeper::hand_to_qemu(&self.conn, &dir, leases, &old.uses, st.pid, st.start_time)?;
        // A keeper whose fence could not reach the monitor stopped QEMU with SIGSTOP.
        // SAFETY: kill(2) with SIGCONT on the domain's own QEMU.
        unsafe { libc::kill(st.pid as i32, libc::SIGCONT) };
        keeper::unfence(qmp).await?;
        tracing::info!(domain = %self.name, "leases regained after a fence");
        Ok(())
    }

    /// The manual holds in force: a domain left paused after a snapshot with `manual`
    /// disks ([`crate::snapshot::CaptureResult::held`]).
    pub fn manual_holds(&self) -> Vec<crate::snapshot::ManualHold> {
        crate::snapshot::hold::current(&self.dir())
    }

    /// Stop the domain now: QMP `quit`, then SIGKILL after a short wait. Returns once the
    /// QEMU is gone and its leases are free.
    pub async fn destroy(&self) -> Result<()> {
        let _op = self.recover_pending(self.op_lock("destroy").await?).await?;
        self.destroy_locked().await
    }

    /// [`Domain::destroy`] under the domain's operation lock, which the caller holds.
    pub(crate) async fn destroy_locked(&self) -> Result<()> {
        let mut st = self.running()?;
        st.destroy_requested = true;
        runstate::save(&self.dir(), &st)?;
        if let Ok(qmp) = connect_qmp(&st.qmp).await {
            let _ = qmp
                .execute_timeout("quit", None, Duration::from_secs(2))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(3), qmp.closed()).await;
        }
        if !wait_gone(&st, Duration::from_secs(3)).await {
            if st.alive() {
                // SAFETY: kill(2) on the recorded QEMU, checked by pid and start time above.
                unsafe { libc::kill(st.pid as i32, libc::SIGKILL) };
            }
            if !wait_gone(&st, Duration::from_secs(10)).await {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "domain {:?}: QEMU (pid {}) did not end after SIGKILL",
                        self.name, st.pid
                    ),
                ));
            }
        }
        self.wait_leases_free(&st).await;
        self.refresh(st, true)?;
        Ok(())
    }

    /// Notes in the run record that the QEMU about to end is stopped by a snapshot's
    /// `--halt`, so that its state reads `shut off (from snapshot)`.
    pub(crate) fn mark_halt(&self) -> Result<()> {
        let mut st = self.running()?;
        st.halt_requested = true;
        runstate::save(&self.dir(), &st)
    }

    /// Ask the guest to power off (ACPI, `system_powerdown`) and wait up to `timeout` for
    /// QEMU to end. Returns the state then: `shut off (shutdown)`, or still running when the
    /// guest did not react (a guest without ACPI support, or still busy).
    pub async fn shutdown(&self, timeout: Duration) -> Result<StateInfo> {
        let _op = self
            .recover_pending(self.op_lock("shutdown").await?)
            .await?;
        let mut st = self.running()?;
        st.shutdown_requested = true;
        runstate::save(&self.dir(), &st)?;
        let qmp = self.qmp(&st).await?;
        qmp.execute("system_powerdown", None).await?;
        if wait_gone(&st, timeout).await {
            drop(qmp);
            self.wait_leases_free(&st).await;
            let st = self.refresh(st, true)?;
            return Ok(shut_off(&st));
        }
        Ok(StateInfo {
            state: DomainState::Running,
            reason: StateReason::Booted,
            pid: Some(st.pid),
        })
    }

    /// Wait (briefly) until no lease of the domain's disks names its ended QEMU.
    async fn wait_leases_free(&self, st: &RunState) {
        let end = Instant::now() + Duration::from_secs(2);
        for d in &st.disks {
            while Instant::now() < end {
                let held = self
                    .conn
                    .inner()
                    .locks
                    .holders(&Resource::file(&d.source))
                    .map(|hs| hs.iter().any(|h| h.pid == st.pid))
                    .unwrap_or(false);
                if !held {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// The disks of the running QEMU (`query-block`).
    pub async fn block_devices(&self) -> Result<Vec<BlockDevice>> {
        let _op = self
            .recover_pending(self.op_lock("domblklist").await?)
            .await?;
        let st = self.running()?;
        let qmp = self.qmp(&st).await?;
        block_devices(&qmp, &st).await
    }

    /// Run a QMP command given as JSON (`{"execute": NAME, "arguments": {..}}`) on the
    /// domain's QEMU; returns the reply (`{"return": ..}`).
    pub async fn monitor_command(&self, json: &str) -> Result<Value> {
        let (cmd, args) = parse_command(json)?;
        let _op = self
            .recover_pending(self.op_lock("qemu-monitor-command").await?)
            .await?;
        let st = self.running()?;
        let qmp = self.qmp(&st).await?;
        let r = qmp.execute(&cmd, args).await?;
        Ok(serde_json::json!({ "return": r }))
    }

    /// Run a guest agent command given as JSON (`{"execute": NAME, "arguments": {..}}`)
    /// through the domain's agent channel, allowing `timeout`; returns the reply
    /// (`{"return": ..}`).
    pub async fn agent_command(&self, json: &str, timeout: Duration) -> Result<Value> {
        let (cmd, args) = parse_command(json)?;
        let _op = self
            .recover_pending(self.op_lock("qemu-agent-command").await?)
            .await?;
        let st = self.running()?;
        let Some(agent) = &st.agent else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("domain {:?} has no guest agent channel", self.name),
            ));
        };
        let (p, _keep) = runstate::socket_path(agent)?;
        let mut qga = qmp_proto::QgaClient::connect_unix(&p, timeout)
            .await
            .map_err(|e| {
                Error::caused_by(
                    format!("domain {:?}: the guest agent does not answer", self.name),
                    e,
                )
            })?;
        let r = qga.execute(&cmd, args, timeout).await?;
        Ok(serde_json::json!({ "return": r }))
    }
}

/// After the monitor failed: whether QEMU is ending (a kill -9 closes its socket before its
/// process is gone), waiting up to a second for it to be gone.
async fn ended_meanwhile(st: &RunState) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while st.alive() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Whether a QEMU we started, now gone, exited by itself (a poweroff from inside the guest, a
/// `quit` from another monitor): QEMU removes its pidfile when it exits normally, and only
/// then (kill -9, a crash leave it behind).
fn exited_cleanly(st: &RunState, dir: &std::path::Path) -> bool {
    st.origin == Origin::Started && !dir.join("qemu.pid").exists()
}

fn shut_off(st: &RunState) -> StateInfo {
    let reason = match st.reason.as_deref() {
        Some("destroyed") => StateReason::Destroyed,
        Some("shutdown") => StateReason::Shutdown,
        Some("from snapshot") => StateReason::FromSnapshot,
        Some("crashed") => StateReason::Crashed,
        Some("failed") => StateReason::Failed,
        _ => StateReason::Unknown,
    };
    StateInfo {
        state: DomainState::ShutOff,
        reason,
        pid: None,
    }
}

/// `{"execute": NAME, "arguments": {...}}` -> (NAME, arguments).
fn parse_command(json: &str) -> Result<(String, Option<Value>)> {
    let bad = |m: String| Error::new(ErrorKind::InvalidInput, m);
    let v: Value = serde_json::from_str(json).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(bad(
            "the command must be a JSON object like {\"execute\": \"query-status\"}".into(),
        ));
    };
    let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
        return Err(bad("the command has no \"execute\" string".into()));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["execute", "arguments"].contains(&k.as_str()))
    {
        return Err(bad(format!("unexpected key {k:?} in the command")));
    }
    let args = obj.get("arguments").cloned();
    if args.as_ref().is_some_and(|a| !a.is_object()) {
        return Err(bad("\"arguments\" must be a JSON object".into()));
    }
    Ok((cmd.to_string(), args))
}

/// The disks of the running QEMU of `st`: from the record, each top node checked with one
/// `qom-get` of its device's `drive` (constant cost), else (a record without node names, a
/// top changed behind virt-snap's back, an adopted QEMU's devices) from `query-block`, whose
/// cost grows with the backing chains (QEMU describes every image of them).
pub(crate) async fn block_devices(qmp: &QmpClient, st: &RunState) -> Result<Vec<BlockDevice>> {
    if let Some(d) = recorded_block_devices(qmp, st).await {
        return Ok(d);
    }
    let blocks = qmp.run(&qmp_proto::commands::QueryBlock).await?;
    Ok(blocks
        .into_iter()
        .filter_map(|b| {
            let ins = b.inserted?;
            let qdev = short_qdev(b.qdev.as_deref().unwrap_or(&b.device));
            let target = st
                .disks
                .iter()
                .find(|d| d.qdev == qdev)
                .map_or_else(|| qdev.clone(), |d| d.target.clone());
            Some(BlockDevice {
                target,
                source: ins.image.filename.clone(),
                qdev,
                node_name: ins.node_name.clone(),
                format: ins.image.format.clone(),
                readonly: ins.ro,
            })
        })
        .collect())
}

/// The record's disks, if each has its top node recorded and QEMU's device still has it on
/// top.
async fn recorded_block_devices(qmp: &QmpClient, st: &RunState) -> Option<Vec<BlockDevice>> {
    let mut out = Vec::with_capacity(st.disks.len());
    for d in &st.disks {
        let (node, format) = (d.node.as_ref()?, d.format.as_ref()?);
        let path = if d.qdev.starts_with('/') {
            d.qdev.clone()
        } else {
            format!("/machine/peripheral/{}", d.qdev)
        };
        let top = qmp
            .run(&qmp_proto::commands::QomGet {
                path,
                property: "drive".into(),
            })
            .await
            .ok()?;
        if top.as_str() != Some(node) {
            return None;
        }
        out.push(BlockDevice {
            target: d.target.clone(),
            source: d.source.display().to_string(),
            qdev: d.qdev.clone(),
            node_name: Some(node.clone()),
            format: format.clone(),
            readonly: d.readonly,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_strictly() {
        let (c, a) = parse_command(r#"{"execute":"query-status"}"#).unwrap();
        assert_eq!((c.as_str(), a), ("query-status", None));
        let (_, a) = parse_command(r#"{"execute":"x","arguments":{"a":1}}"#).unwrap();
        assert_eq!(a.unwrap()["a"], 1);
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"execute":1}"#,
            r#"{"execute":"x","y":1}"#,
        ] {
            let e = parse_command(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn qdev_paths_shorten_to_the_id() {
        assert_eq!(
            short_qdev("/machine/peripheral/vs-vda/virtio-backend"),
            "vs-vda"
        );
        assert_eq!(short_qdev("vs-sda"), "vs-sda");
    }
}
