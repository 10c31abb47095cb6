//! Volume leases and QEMU-compatible image locks.
//!
//! Two mechanisms keep virt-snap from modifying a disk that a VM uses, and a VM from
//! starting on a disk that virt-snap is modifying; both are OFD byte-range locks, so they
//! vanish when their holder dies (kill -9 included) and need no daemon:
//!
//! - **leases** ([`LeaseBackend`], [`LocalBackend`]): one lease file per resource in a
//!   lockspace directory (by default `<state dir>/locks`), named by the SHA-256 of the
//!   resource's canonical key, held shared or exclusive, with a record of each holder so
//!   that a refusal names it;
//! - **QEMU's image locks** ([`qemu`]): the bytes 100-104 / 200-204 QEMU locks on every
//!   image it opens. [`qemu::probe`] reads them; [`qemu::ImageLock`] takes them the way QEMU
//!   does, so that a QEMU started by any tool refuses the image while virt-snap modifies it,
//!   and virt-snap refuses an image that any QEMU uses.
//!
//! Callers go through one path, [`LockManager::acquire`] (or
//! [`LockManager::acquire_timeout`] from async code), with a [`Purpose`]:
//!
//! ```no_run
//! use locking::{LockManager, Purpose, Resource};
//! # fn main() -> Result<(), locking::Error> {
//! let locks = LockManager::for_state_dir("/var/lib/virt-snap".as_ref())?;
//! let _held = locks.acquire(&Purpose::VolumeOp {
//!     op: "snapshot create".into(),
//!     volumes: vec![Resource::file("/var/lib/images/vm1.qcow2")],
//! })?;
//! // ... modify the image; dropping `_held` releases everything.
//! # Ok(()) }
//! ```
//!
//! docs/locking.md describes the protocol and the file layout.
#![deny(missing_docs)]

mod error;
pub mod lease;
mod manager;
pub mod qemu;
mod record;
mod resource;
mod sys;

pub use error::{Error, ErrorKind};
pub use lease::{HeldLease, LeaseBackend, LocalBackend, MemoryBackend};
pub use manager::{Acquired, DiskUse, LockManager, Purpose, LOCKSPACE_SUBDIR};
pub use record::{Holder, HolderRecord, Mode};
pub use resource::{canonical_path, Resource, ResourceKey, UuidKind};
