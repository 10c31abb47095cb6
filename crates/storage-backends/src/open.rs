//! Opening a pool's backend from its definition.

use crate::error::Result;
use crate::model::{PoolDef, PoolKind};
use crate::runner::CommandRunner;
use crate::{btrfs, dir, lvm, Backend};
use std::sync::Arc;

/// Open the backend of pool `def`, running its tools with `runner` and taking leases from
/// `locks`.
pub fn open_pool(
    def: PoolDef,
    runner: Arc<dyn CommandRunner>,
    locks: locking::LockManager,
) -> Result<Box<dyn Backend>> {
    Ok(match def.kind {
        PoolKind::Dir => Box::new(dir::DirPool::new(def, runner, locks)?),
        PoolKind::Btrfs => Box::new(btrfs::BtrfsPool::new(def, runner, locks)?),
        PoolKind::Logical => Box::new(lvm::LvmPool::new(def, runner, locks)?),
    })
}
