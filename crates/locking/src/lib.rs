#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod error;
pub mod etcd;
pub mod lease;
mod manager;
mod owners;
pub mod qemu;
mod record;
mod resource;
mod sys;

pub use error::{Error, ErrorKind};
pub use etcd::{EtcdBackend, EtcdConfig, Fence, Ticket};
pub use lease::{HeldLease, LeaseBackend, LocalBackend, MemoryBackend};
pub use manager::{Acquired, DiskUse, LockManager, Purpose, LOCKSPACE_SUBDIR};
pub use record::{Holder, HolderRecord, Mode};
pub use resource::{canonical_path, Resource, ResourceKey, UuidKind};
