//! Taking a volume's exclusive lease before any change.

use crate::error::Result;
use locking::{Acquired, HeldLease, Holder, LockManager, Mode, Purpose, Resource};
use std::path::Path;

/// What an operation holds on a volume while it runs; dropping it releases everything.
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum VolumeLease {
    /// The lease and QEMU's image locks (via [`LockManager::acquire`]).
    Full(Acquired),
    /// The lease only, QEMU's locks having been checked: for operations run by qemu-img,
    /// which takes QEMU's image locks itself (and would fail on ours).
    LeaseOnly(Box<dyn HeldLease>),
}

/// The exclusive lease on `res` and QEMU's image locks on its file, for operation `op`.
/// Fails with [`crate::ErrorKind::InUse`] ("volume ... in use by ...") when a VM or another
/// operation holds it.
pub(crate) async fn lease(locks: &LockManager, op: &str, res: Resource) -> Result<VolumeLease> {
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
    Ok(VolumeLease::Full(got))
}

/// The exclusive lease on `res`, then a check that no process holds QEMU's image locks on
/// `image` in a conflicting way. The tool run next (qemu-img) takes QEMU's locks itself.
pub(crate) async fn lease_only(
    locks: &LockManager,
    op: &str,
    res: Resource,
    image: &Path,
) -> Result<VolumeLease> {
    let locks = locks.clone();
    let op = op.to_string();
    let image = image.to_path_buf();
    let got = tokio::task::spawn_blocking(move || -> Result<VolumeLease> {
        let key = res.key()?;
        let held = locks
            .backend()
            .try_acquire(&key, Mode::Exclusive, &Holder::Operation(op))?;
        if image.exists() {
            if let Err(e) = locking::qemu::check(&image, locking::qemu::Access::WRITER) {
                let owners = locking::qemu::lock_owners(&image);
                let who: Vec<String> = owners.iter().map(|o| o.to_string()).collect();
                let who = if who.is_empty() {
                    "another process".to_string()
                } else {
                    who.join(", ")
                };
                return Err(crate::Error::new(
                    crate::ErrorKind::InUse,
                    format!("volume {} in use by {who}", image.display()),
                )
                .with_source(e));
            }
        }
        Ok(VolumeLease::LeaseOnly(held))
    })
    .await
    .map_err(|e| crate::Error::new(crate::ErrorKind::Io, format!("lease task: {e}")))??;
    Ok(got)
}
