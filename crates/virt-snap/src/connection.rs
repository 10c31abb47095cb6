//! [`Connection`]: the state directory and everything wired to it.

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Clock, Image, SystemClock};
use crate::pool::{DamagedPool, Pool, PoolDef, PoolListing};
use crate::progress::Progress;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use storage_backends::{Blocking, CommandRunner, LocalRunner, PoolStore};

/// An open state directory: the lock manager (leases in `locks/`), the pool store (`pools/`),
/// the command runner storage tools run through, and the clock snapshot dates come from. It
/// hands out the handles every operation is a method of: [`Image`], [`Pool`] and its
/// [`Volume`](crate::Volume)s.
///
/// Cloning is cheap (the wiring is shared).
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) state_dir: PathBuf,
    pub(crate) locks: locking::LockManager,
    pub(crate) pools: PoolStore,
    pub(crate) runner: Arc<dyn CommandRunner>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) blocking: Blocking,
    pub(crate) progress: Arc<dyn Progress>,
    pub(crate) lockspace: Lockspace,
    /// This host's name in a cluster lockspace.
    pub(crate) host: String,
    /// The program whose hidden `__keeper` subcommand keeps a domain's cluster leases alive.
    pub(crate) keeper: PathBuf,
}

/// Where leases live: a local lockspace directory (the default, `<state dir>/locks`) or an
/// etcd cluster shared by several hosts (`etcd://HOST:PORT[,HOST:PORT...][/PREFIX][?ttl=SECS]`,
/// see docs/locking.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lockspace {
    /// Leases as OFD locks on files in this directory.
    Dir(PathBuf),
    /// Leases in an etcd cluster: the `etcd://` URL.
    Etcd(String),
}

impl Lockspace {
    /// `etcd://...` is a cluster, anything else a directory.
    pub fn parse(s: &str) -> Lockspace {
        if s.starts_with("etcd://") {
            Lockspace::Etcd(s.to_string())
        } else {
            Lockspace::Dir(PathBuf::from(s))
        }
    }

    /// Is this a cluster lockspace?
    pub fn is_cluster(&self) -> bool {
        matches!(self, Lockspace::Etcd(_))
    }

    /// The lease backend, for this host (`host`: its name in a cluster).
    pub(crate) fn backend(&self, host: &str) -> Result<Arc<dyn locking::LeaseBackend>> {
        Ok(match self {
            Lockspace::Dir(d) => Arc::new(locking::LocalBackend::new(d)?),
            Lockspace::Etcd(url) => Arc::new(locking::EtcdBackend::new(
                locking::EtcdConfig::parse(url, host)?,
            )?),
        })
    }
}

impl std::fmt::Display for Lockspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lockspace::Dir(d) => write!(f, "{}", d.display()),
            Lockspace::Etcd(u) => f.write_str(u),
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), the default host identity.
pub fn default_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The default keeper program: `$VIRT_SNAP_KEEPER`, else this program if it is virt-snap,
/// else a `virt-snap` beside it or one directory up (a test binary in target/debug/deps),
/// else `virt-snap` on PATH.
fn default_keeper() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRT_SNAP_KEEPER") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "virt-snap") {
            return exe;
        }
        for dir in exe.ancestors().skip(1).take(2) {
            let c = dir.join("virt-snap");
            if c.is_file() {
                return c;
            }
        }
    }
    PathBuf::from("virt-snap")
}

/// Options of [`Connection::builder`]: another command runner or clock (tests, failure
/// injection), where blocking file work runs.
#[derive(Debug)]
pub struct ConnectionBuilder {
    state_dir: PathBuf,
    runner: Arc<dyn CommandRunner>,
    clock: Arc<dyn Clock>,
    blocking: Blocking,
    progress: Arc<dyn Progress>,
    lockspace: Option<Lockspace>,
    host: Option<String>,
    keeper: Option<PathBuf>,
}

impl ConnectionBuilder {
    /// Keep leases in `l` instead of `<state dir>/locks`.
    pub fn lockspace(mut self, l: Lockspace) -> ConnectionBuilder {
        self.lockspace = Some(l);
        self
    }

    /// This host's name in a cluster lockspace (default: the machine's host name). Two
    /// state directories with two names act as two hosts.
    pub fn host(mut self, name: impl Into<String>) -> ConnectionBuilder {
        self.host = Some(name.into());
        self
    }

    /// The virt-snap program that runs a domain's lease keeper (`virt-snap __keeper`) in a
    /// cluster lockspace (default: see [`Connection::builder`]).
    pub fn keeper_program(mut self, p: impl Into<PathBuf>) -> ConnectionBuilder {
        self.keeper = Some(p.into());
        self
    }

    /// Report long jobs' progress (RAM saves and loads, snapshot and block jobs) to `p`
    /// instead of nowhere ([`crate::progress`]).
    pub fn progress(mut self, p: Arc<dyn Progress>) -> ConnectionBuilder {
        self.progress = p;
        self
    }

    /// Run storage tools through `runner` instead of as local processes.
    pub fn runner(mut self, runner: Arc<dyn CommandRunner>) -> ConnectionBuilder {
        self.runner = runner;
        self
    }

    /// Take snapshot dates from `clock` instead of the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> ConnectionBuilder {
        self.clock = clock;
        self
    }

    /// Run the pools' blocking file work (reflink clones, copies, fsyncs, qcow2 writes) as
    /// `b` says. The default, [`Blocking::SpawnBlocking`], keeps the runtime's threads free
    /// for other tasks; [`Blocking::Inline`] saves a thread start and hand-off per
    /// operation, for a process that runs one operation at a time (the CLI does).
    pub fn blocking(mut self, b: Blocking) -> ConnectionBuilder {
        self.blocking = b;
        self
    }

    /// Create the state directory if missing (`0700`, see [`crate::state`]) and open it.
    pub fn open(self) -> Result<Connection> {
        let dir = self.state_dir;
        crate::state::create(&dir).map_err(|e| {
            Error::caused_by(
                format!("cannot create the state directory {}", dir.display()),
                e,
            )
        })?;
        let lockspace = self
            .lockspace
            .unwrap_or_else(|| Lockspace::Dir(crate::state::lockspace(&dir)));
        let host = self.host.unwrap_or_else(default_host);
        let locks = match &lockspace {
            // Domains' operation locks stay on this host, in <state dir>/locks.
            Lockspace::Etcd(_) => locking::LockManager::with_cluster(
                lockspace.backend(&host)?,
                Arc::new(locking::LocalBackend::new(crate::state::lockspace(&dir))?),
            ),
            Lockspace::Dir(_) => locking::LockManager::with_backend(lockspace.backend(&host)?),
        };
        Ok(Connection {
            inner: Arc::new(Inner {
                lockspace,
                host,
                keeper: self.keeper.unwrap_or_else(default_keeper),
                pools: PoolStore::for_state_dir(&dir),
                state_dir: dir,
                locks,
                runner: self.runner,
                clock: self.clock,
                blocking: self.blocking,
                progress: self.progress,
            }),
        })
    }
}

impl Connection {
    /// Open the state directory `state_dir` (created `0700` if missing), with local tools and
    /// the system clock.
    pub fn open(state_dir: impl Into<PathBuf>) -> Result<Connection> {
        Connection::builder(state_dir).open()
    }

    /// Open the state directory the environment names: `$VIRT_SNAP_STATE_DIR`, else
    /// `$XDG_STATE_HOME/virt-snap`, else `$HOME/.local/state/virt-snap`
    /// ([`crate::state::resolve_from_env`]).
    pub fn open_default() -> Result<Connection> {
        let dir = crate::state::resolve_from_env(None).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                "no state directory: set VIRT_SNAP_STATE_DIR or HOME",
            )
        })?;
        Connection::open(dir)
    }

    /// A connection to open with another runner, clock or lockspace. The keeper program
    /// (cluster lockspaces only) defaults to `$VIRT_SNAP_KEEPER`, else this program if it is
    /// virt-snap, else a `virt-snap` beside it or one directory up, else `virt-snap` on PATH.
    pub fn builder(state_dir: impl Into<PathBuf>) -> ConnectionBuilder {
        ConnectionBuilder {
            state_dir: state_dir.into(),
            runner: Arc::new(LocalRunner),
            clock: Arc::new(SystemClock),
            blocking: Blocking::default(),
            progress: Arc::new(crate::progress::Silent),
            lockspace: None,
            host: None,
            keeper: None,
        }
    }

    /// Where the leases live.
    pub fn lockspace(&self) -> &Lockspace {
        &self.inner.lockspace
    }

    /// This host's name (in a cluster lockspace's holder records).
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The image file `path` (a qcow2, QED or raw image; nothing is opened yet).
    pub fn image(&self, path: impl Into<PathBuf>) -> Image {
        Image::with_connection(path.into(), self.clone())
    }

    /// Define a pool. A `dir` or `btrfs` pool's target is kept as an absolute path.
    pub fn define_pool(&self, mut def: PoolDef) -> Result<PoolDef> {
        if def.kind != crate::pool::PoolKind::Logical {
            if let Ok(p) = std::path::absolute(&def.target) {
                def.target = p.display().to_string();
            }
        }
        self.inner.pools.define(&def)?;
        Ok(def)
    }

    /// The defined pools, sorted by name (damaged definitions left out: see
    /// [`Connection::pool_listing`]).
    pub fn pools(&self) -> Result<Vec<PoolDef>> {
        Ok(self.inner.pools.list()?)
    }

    /// The defined pools, and the definition files that cannot be read back (each named,
    /// none hiding the others).
    pub fn pool_listing(&self) -> Result<PoolListing> {
        let l = self.inner.pools.scan()?;
        Ok(PoolListing {
            pools: l.pools,
            damaged: l
                .damaged
                .into_iter()
                .map(|d| DamagedPool {
                    name: d.name,
                    path: d.path,
                    error: d.error.into(),
                })
                .collect(),
        })
    }

    /// The pool `name` ([`ErrorKind::NotFound`] if it is not defined).
    pub fn pool(&self, name: &str) -> Result<Pool> {
        let def = self.inner.pools.get(name)?;
        let backend = storage_backends::open_pool_with(
            def,
            self.inner.runner.clone(),
            self.inner.locks.clone(),
            self.inner.blocking,
        )?;
        Ok(Pool::new(backend, self.inner.locks.clone()))
    }

    /// Forget pool `name`'s definition (its volumes are left alone); returns what it was, or
    /// `None` when the definition was damaged (its file is removed all the same).
    pub fn undefine_pool(&self, name: &str) -> Result<Option<PoolDef>> {
        Ok(self.inner.pools.undefine(name)?)
    }

    /// Where long jobs report their progress.
    pub(crate) fn progress(&self) -> &dyn Progress {
        &*self.inner.progress
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}
