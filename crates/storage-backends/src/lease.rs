//! Taking a volume's exclusive lease before any change.

use crate::error::{Error, ErrorKind, Result};
use crate::model::DomainRef;
use locking::{Acquired, Holder, LockManager, Mode, Purpose, Resource};

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
    let held = locks.acquire(&purpose)?;
    // A cluster lease: the operation is recorded under its fencing token before anything
    // changes (a no-op in the local lockspace).
    held.commit(op)?;
    Ok(held)
}

/// Act for the running domain `d` on `res` (operation `op`): the domain's operation lock,
/// and a check that `d`'s QEMU holds `res`'s lease ([`Purpose::ForDomain`]); no volume lease
/// and no QEMU image lock is taken. The domain must hold the lease exclusively (a disk it
/// shares with other VMs is refused: they could be acting on it at the same time). Fails
/// with [`ErrorKind::InUse`] when another operation on the domain runs, or when the lease is
/// not the domain's.
pub(crate) fn for_domain(
    locks: &LockManager,
    op: &str,
    res: Resource,
    d: &DomainRef,
) -> Result<Acquired> {
    let purpose = Purpose::ForDomain {
        domain: d.domain.clone(),
        qemu_pid: d.qemu_pid,
        op: op.to_string(),
        volumes: vec![res.clone()],
    };
    let held = locks.acquire(&purpose)?;
    let me = Holder::Domain(d.domain.clone());
    let shared = locks
        .holders(&res)?
        .iter()
        .any(|h| h.holder == me && h.pid == d.qemu_pid && h.mode != Mode::Exclusive);
    if shared {
        return Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "volume {res} is attached shared (read-only or shareable) to domain {:?}: a snapshot for one domain needs its exclusive lease",
                d.domain
            ),
        ));
    }
    Ok(held)
}

/// `res`'s canonical key as text (a volume's [`crate::Volume::key`]).
pub(crate) fn key_string(res: &Resource) -> String {
    match res.key() {
        Ok(k) => String::from_utf8_lossy(k.canonical()).into_owned(),
        Err(_) => res.to_string(),
    }
}

/// The lock a snapshot deletion takes: the volume's lease, or, for the running domain `d`
/// (undoing a snapshot taken for it), the domain's operation lock and the check that its
/// QEMU holds the volume.
pub(crate) async fn delete_lock(
    locks: &LockManager,
    res: Resource,
    d: Option<&DomainRef>,
) -> Result<Acquired> {
    match d {
        None => lease(locks, "volume snapshot delete", res).await,
        Some(d) => for_domain(locks, "volume snapshot delete (for a domain)", res, d),
    }
}
