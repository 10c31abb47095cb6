//! virt-snap: snapshots of QEMU/KVM virtual machines and of their disk volumes, as a library.
//!
//! A [`Connection`] opens a state directory ([`state`]: pools, leases, later domains and
//! snapshot metadata) and owns the wiring: the lock manager, the pool store, the command
//! runner storage tools run through, and the clock. It hands out handles, and every operation
//! is a method of one of them returning typed results:
//!
//! - [`Image`] ([`image`]): a disk image file: info, backing chain, internal snapshots
//!   (list, create, apply, delete), create and overlay, who holds it. Reads take no lock;
//!   writes take the image's lease and QEMU's image locks.
//! - [`Pool`] ([`pool`]): a defined storage pool (dir, btrfs, LVM): info and volumes.
//! - [`Domain`] ([`domain`]): a VM: defined from libvirt domain XML
//!   ([`Connection::define`], `undefine`, `dumpxml`, `start_defined`) or started from a
//!   [`RunSpec`] (QEMU holding the disks' leases, outliving the command), attach to a QEMU of
//!   another tool, state, destroy, shutdown, disks, monitor and guest agent commands.
//! - Domain snapshots ([`snapshot`]): the metadata queries of [`Connection`]
//!   (`snapshot_list`, `snapshot_info`, `snapshot_dumpxml`, `snapshot_current`,
//!   `snapshot_parent`, `snapshot_tree_text`) and `snapshot_redefine` (libvirt's
//!   domainsnapshot XML imported as metadata); docs/snapshot-cli.md.
//! - [`Volume`]: a pool's volume: info, path, delete, and its snapshots (create, list, revert,
//!   delete).
//!
//! Long jobs (RAM saves and loads, QEMU's snapshot and block jobs) report their progress to
//! the [`progress::Progress`] given to [`ConnectionBuilder::progress`].
//!
//! Every failure is an [`Error`] whose [`ErrorKind`] says what went wrong, whichever layer it
//! came from (the lower crate's error is its source).
//!
//! ```no_run
//! # async fn demo() -> Result<(), virt_snap::Error> {
//! let conn = virt_snap::Connection::open_default()?;
//! for img in conn.image("/var/lib/images/vm1.qcow2").chain(None, Default::default())? {
//!     println!("{} ({})", img.filename, img.format());
//! }
//! let vol = conn.pool("default")?.volume("vm1");
//! vol.create_snapshot("before-upgrade", &Default::default()).await?;
//! # Ok(()) }
//! ```
//!
//! The `virt-snap` CLI is a shell over this library: it parses arguments and renders text or
//! JSON, nothing else.
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod connection;
pub mod domain;
mod error;
pub mod image;
pub mod pool;
pub mod progress;
pub mod snapshot;
pub mod state;

pub use connection::{default_host, Connection, ConnectionBuilder, Lockspace};
pub use domain::{Domain, RunSpec};
pub use error::{Error, ErrorKind, Result};
pub use image::{Clock, FixedClock, Image, SystemClock};
pub use pool::{Listing, Pool, RejectedEntry, Volume};
pub use storage_backends::{Blocking, CommandRunner, LocalRunner, RecordingRunner};
