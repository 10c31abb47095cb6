//! Opening a pool's backend from its definition.

use crate::error::Result;
use crate::model::{PoolDef, PoolKind};
use crate::runner::CommandRunner;
use crate::{btrfs, dir, lvm, Backend, Blocking};
use std::sync::Arc;

/// Open the backend of pool `def`, running its tools with `runner` and taking leases from
/// `locks`; blocking file work runs on tokio's blocking pool ([`Blocking::SpawnBlocking`]).
pub fn open_pool(
    def: PoolDef,
    runner: Arc<dyn CommandRunner>,
    locks: locking::LockManager,
) -> Result<Box<dyn Backend>> {
    open_pool_with(def, runner, locks, Blocking::default())
}

/// [`open_pool`], running blocking file work as `blocking` says.
pub fn open_pool_with(
    def: PoolDef,
    runner: Arc<dyn CommandRunner>,
    locks: locking::LockManager,
    blocking: Blocking,
) -> Result<Box<dyn Backend>> {
    Ok(match def.kind {
        PoolKind::Dir => Box::new(dir::DirPool::new(def, runner, locks)?.with_blocking(blocking)),
        PoolKind::Btrfs => {
            Box::new(btrfs::BtrfsPool::new(def, runner, locks)?.with_blocking(blocking))
        }
        // LVM's work is its tools' (run through the runner): nothing blocks in-process.
        PoolKind::Logical => Box::new(lvm::LvmPool::new(def, runner, locks)?),
    })
}
