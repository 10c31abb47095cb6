//! Taking a volume's exclusive lease before any change.

use crate::error::Result;
use locking::{Acquired, LockManager, Purpose, Resource};

/// The exclusive lease on `res` and QEMU's image locks on its file, for operation `op`.
/// Fails with [`crate::ErrorKind::InUse`] ("volume ... in use by ...") when a VM or another
/// operation holds it.
pub(crate) async fn lease(locks: &LockManager, op: &str, res: Resource) -> Result<Acquired> {
    let (locks, purpose) = (
        locks.clone(),
        Purpose::VolumeOp {
            op: op.to_string(),
            volumes: vec![res],
        },
    );
    let got = tokio::task::spawn_blocking(move || locks.acquire(&purpose))
        .await
        .map_err(|e| crate::Error::new(crate::ErrorKind::Io, format!("lease task: {e}")))??;
    Ok(got)
}
