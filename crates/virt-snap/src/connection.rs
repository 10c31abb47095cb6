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
}

impl ConnectionBuilder {
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
        let locks = locking::LockManager::for_state_dir(&dir)?;
        Ok(Connection {
            inner: Arc::new(Inner {
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

    /// A connection to open with another runner or clock.
    pub fn builder(state_dir: impl Into<PathBuf>) -> ConnectionBuilder {
        ConnectionBuilder {
            state_dir: state_dir.into(),
            runner: Arc::new(LocalRunner),
            clock: Arc::new(SystemClock),
            blocking: Blocking::default(),
            progress: Arc::new(crate::progress::Silent),
        }
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
        Ok(Pool::new(backend))
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
