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

/// Do the image names `a` (as QEMU reports it) and `b` name the same file?
pub(crate) fn same_image(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    a == b
        || match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
}
