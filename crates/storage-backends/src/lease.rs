//! Taking a volume's exclusive lease before any change.

use crate::error::Result;
use locking::{Acquired, LockManager, Purpose, Resource};

/// The exclusive lease on `res` and QEMU's image locks on its file, for operation `op`.
/// Fails with [`crate::ErrorKind::InUse`] ("volume ... in use by ...") when a VM or another
/// operation holds it.
///
/// `LockManager::acquire` never waits for a lock (non-blocking OFD locks on small files in the
/// local lockspace, ~20 us), so it runs inline: handing it to `spawn_blocking` cost a thread
/// start and join per operation, which showed as most of our overhead over the bare tools.
pub(crate) async fn lease(locks: &LockManager, op: &str, res: Resource) -> Result<Acquired> {
    lease_now(locks, op, res)
}

/// [`lease`] for callers outside async code (it never waits either way).
pub(crate) fn lease_now(locks: &LockManager, op: &str, res: Resource) -> Result<Acquired> {
    let purpose = Purpose::VolumeOp {
        op: op.to_string(),
        volumes: vec![res],
    };
    Ok(locks.acquire(&purpose)?)
}
