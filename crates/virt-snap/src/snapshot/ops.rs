//! What the capabilities of the domain operations (revert, delete) share: the QMP
//! connection to the domain's QEMU, made on first use, the test-only failpoints, and how an
//! image name QEMU reports is matched with a file.

use super::capture::be;
use crate::domain::Domain;
use qmp_proto::QmpClient;
use snapshot_core::Result as CoreResult;

/// The domain's QEMU as an operation's capabilities reach it: a QMP connection made on first
/// use and kept until [`DomainQmp::forget`] (the QEMU stopped or is replaced).
pub(crate) struct DomainQmp {
    dom: Domain,
    qmp: tokio::sync::Mutex<Option<QmpClient>>,
}

impl DomainQmp {
    pub(crate) fn new(dom: &Domain) -> Self {
        DomainQmp {
            dom: dom.clone(),
            qmp: tokio::sync::Mutex::new(None),
        }
    }

    /// The QMP connection to the running QEMU.
    pub(crate) async fn get(&self) -> CoreResult<QmpClient> {
        let mut g = self.qmp.lock().await;
        if let Some(q) = &*g {
            return Ok(q.clone());
        }
        let st = self.dom.running().map_err(|e| be(&self.dom.name, e))?;
        let q = self.dom.qmp(&st).await.map_err(|e| be(&self.dom.name, e))?;
        *g = Some(q.clone());
        Ok(q)
    }

    /// Drops the connection (the QEMU it led to is gone).
    pub(crate) async fn forget(&self) {
        self.qmp.lock().await.take();
    }

    /// Does the domain's QEMU run (paused or not)?
    pub(crate) fn up(&self) -> CoreResult<bool> {
        Ok(self
            .dom
            .running_or_off()
            .map_err(|e| be(&self.dom.name, e))?
            .is_some())
    }
}

/// A lower error of a step that changed nothing yet, as snapshot-core's
/// [`snapshot_core::ErrorKind::NotStarted`] (the facade error as its source).
pub(crate) fn ns(object: &str, e: impl Into<crate::Error>) -> snapshot_core::Error {
    let e: crate::Error = e.into();
    snapshot_core::Error::not_started(object, e.to_string()).caused_by(e)
}

/// A test-only failpoint: `VIRT_SNAP_FAILPOINT=<op>:<name>` aborts the process here, as a
/// kill would (`op` is `revert` or `delete`; each module lists its names).
pub(crate) fn failpoint(op: &str, name: &str) {
    let hit = std::env::var("VIRT_SNAP_FAILPOINT")
        .is_ok_and(|v| v.strip_prefix(op).and_then(|r| r.strip_prefix(':')) == Some(name));
    if hit {
        tracing::error!("failpoint {op}:{name}: aborting");
        std::process::abort();
    }
}

/// The format nodes (not protocol nodes) QEMU has of image `path`.
pub(crate) fn nodes_of<'a>(
    nodes: &'a [qmp_proto::commands::BlockDeviceInfo],
    path: &str,
) -> Vec<&'a str> {
    nodes
        .iter()
        .filter(|n| !matches!(n.drv.as_str(), "file" | "host_device") && same_image(&n.file, path))
        .filter_map(|n| n.node_name.as_deref())
        .collect()
}

/// Do the image names `a` (as QEMU reports it) and `b` name the same file?
pub(crate) fn same_image(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    a == b
        || match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
}

/// The domain's operation lock as an operation's capabilities hold it: lent to a storage
/// backend's domain path (which takes the domain's operation lock itself) for the call, and
/// taken again after it.
pub(crate) struct OpLock {
    dom: Domain,
    /// The operation, as the lock names it.
    what: &'static str,
    op: tokio::sync::Mutex<Option<locking::Acquired>>,
}

impl OpLock {
    /// Holding `op` (none: nothing to lend, a backend call takes the lock itself).
    pub(crate) fn new(dom: &Domain, what: &'static str, op: Option<locking::Acquired>) -> Self {
        OpLock {
            dom: dom.clone(),
            what,
            op: tokio::sync::Mutex::new(op),
        }
    }

    /// Holds `op` from now on.
    pub(crate) async fn put(&self, op: locking::Acquired) {
        *self.op.lock().await = Some(op);
    }

    /// The lock back (taken again if it was lent and could not be taken back).
    pub(crate) async fn take(&self) -> crate::Result<locking::Acquired> {
        match self.op.lock().await.take() {
            Some(op) => Ok(op),
            None => self.dom.op_lock_to_change(self.what).await,
        }
    }

    /// Runs `f` with the lock lent: released before, taken again after (if it was held).
    pub(crate) async fn lend<T>(
        &self,
        f: impl std::future::Future<Output = crate::Result<T>>,
    ) -> crate::Result<T> {
        let mut op = self.op.lock().await;
        let held = op.take().is_some();
        let r = f.await;
        if held {
            *op = Some(self.dom.op_lock_to_change(self.what).await?);
        }
        r
    }
}

/// Deletes volume snapshot `name` of pool volume `v`: while the domain's QEMU runs (and
/// holds the volume), for the domain, under its operation lock `lock` lends; shut off, under
/// the volume's lease (as `vol-snapshot-delete`). A snapshot that is not there is success.
pub(crate) async fn delete_volume_snapshot(
    dom: &Domain,
    lock: &OpLock,
    v: &snapshot_core::capture::PoolVolume,
    name: &str,
) -> CoreResult<()> {
    let obj = format!("{}/{}", v.pool, v.volume);
    // Until the backend is called nothing changed: refused (not started).
    let vol = dom
        .conn
        .pool(&v.pool)
        .map_err(|e| ns(&obj, e))?
        .volume(&v.volume);
    let listed = vol.snapshots().await.map_err(|e| ns(&obj, e))?;
    if !listed.iter().any(|s| s.name == name) {
        return Ok(());
    }
    let r = match dom.pid().map_err(|e| ns(&obj, e))? {
        Some(qemu_pid) => {
            let d = storage_backends::DomainRef {
                domain: dom.name.clone(),
                qemu_pid,
            };
            lock.lend(vol.delete_snapshot_for_domain(name, &d)).await
        }
        None => vol.delete_snapshot(name).await,
    };
    match r {
        Err(e) if e.kind() != crate::error::ErrorKind::NotFound => Err(be(&obj, e)),
        _ => Ok(()),
    }
}
