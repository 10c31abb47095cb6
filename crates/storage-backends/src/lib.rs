//! dir, btrfs and LVM storage pools with offline volume snapshots: the
//! `virStorageVolSnapshot` API libvirt never got.
//!
//! - [`model`]: pools ([`PoolDef`], persisted by [`PoolStore`]), volumes, volume snapshots,
//!   capability flags.
//! - [`Backend`]: the one async trait every pool kind implements: volumes (create, list,
//!   delete) and their snapshots (create, list, revert keeping the snapshot, delete).
//! - [`dir`], [`btrfs`], [`lvm`]: the backends. Every operation takes the volume's exclusive
//!   lease (the `locking` crate) and fails with "volume ... in use by ..." while a VM holds
//!   it; every multi-step change records its undo steps in a [`Reverter`].
//! - [`image`]: the one path for writing qcow2 images (create, overlays, internal snapshots),
//!   used by the dir and btrfs pools and by the virt-snap facade.
//! - [`runner`]: every tool runs through a [`CommandRunner`] as a typed [`ToolCmd`] that
//!   renders its argv: local, and recording (golden argv, canned output, failure
//!   injection); the LVM tests add a guest-agent runner.
//!
//! docs/storage-backends.md describes each backend's commands and revert semantics.
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod btrfs;
pub mod dir;
mod error;
pub mod fsutil;
pub mod image;
mod lease;
pub mod lvm;
pub mod model;
pub mod name;
mod open;
pub mod pooldir;
pub mod reverter;
pub mod runner;
mod store;
mod tool;
mod util;
mod volfile;

pub use error::{Error, ErrorKind, Result};
pub use model::{
    parse_size, Backing, Capabilities, DomainRef, Listing, PoolDef, PoolInfo, PoolKind,
    RejectedEntry, SnapshotKind, SnapshotOptions, VolFormat, VolSnapshot, Volume, VolumeBacking,
    VolumeSpec,
};
pub use open::{open_pool, open_pool_with};
pub use reverter::Reverter;
pub use runner::{CommandRunner, LocalRunner, Output, RecordingRunner, ToolCmd};
pub use store::{DamagedPool, PoolListing, PoolStore, POOLS_SUBDIR};
pub use util::{failpoint, Blocking};

use async_trait::async_trait;

/// A storage pool's backend: volumes and their offline snapshots.
///
/// Every method that changes something takes the volume's exclusive lease first and fails
/// with [`ErrorKind::InUse`] while a VM (or another operation) holds it.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The pool's definition.
    fn def(&self) -> &PoolDef;
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;
    /// Size, use and free space of the pool.
    async fn info(&self) -> Result<PoolInfo>;
    /// The volumes, sorted by name, and the entries that are no volume to list (a symlink,
    /// a name that is not UTF-8, an unreadable file), each by name.
    async fn volume_listing(&self) -> Result<Listing<Volume>>;
    /// The volumes, sorted by name: [`Backend::volume_listing`]'s good ones (the rejected
    /// entries are logged).
    async fn list_volumes(&self) -> Result<Vec<Volume>> {
        let l = self.volume_listing().await?;
        for r in &l.rejected {
            tracing::warn!("{}", r.error);
        }
        Ok(l.items)
    }
    /// One volume ([`ErrorKind::NotFound`] if absent).
    async fn volume(&self, name: &str) -> Result<Volume>;
    /// Create a volume.
    async fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume>;
    /// Delete a volume and all its snapshots.
    async fn delete_volume(&self, name: &str) -> Result<()>;
    /// Snapshot an inactive volume.
    async fn create_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot>;
    /// The resource volume `volume`'s lease is keyed on: the one key every operation on the
    /// volume takes, create included, and the one a VM start must take for it
    /// (`locking::DiskUse::writable(pool.lease_resource("v1").await?)`). Dir: the file
    /// (`Resource::File`); btrfs: the subvolume directory with the volume file as image
    /// (`Resource::Subvolume`); logical: `VG/LV` (`Resource::LogicalVolume`).
    /// [`ErrorKind::NotFound`] if the volume does not exist.
    async fn lease_resource(&self, volume: &str) -> Result<locking::Resource>;
    /// Snapshot volume `volume` for the running domain `domain`, whose QEMU holds the
    /// volume's lease and has it open (the VM paused by the caller, e.g. QMP `stop`): a kind
    /// among [`Capabilities::open_volume_snapshots`]. Takes `locking::Purpose::ForDomain`
    /// (the domain's operation lock, a check of the recorded holder: domain name and QEMU
    /// pid), never the volume's lease nor QEMU's image locks. Anyone else is refused with
    /// [`ErrorKind::InUse`] (the lease is not theirs, or another operation on the domain
    /// runs); a qcow2 volume (its internal snapshots go through QMP) and a raw file whose
    /// filesystem cannot reflink (a full copy would stretch the guest's pause) are refused
    /// with [`ErrorKind::NotSupported`] before anything is written.
    async fn create_snapshot_for_domain(
        &self,
        volume: &str,
        snapshot: &str,
        domain: &DomainRef,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot>;
    /// A volume's snapshots, oldest first, and the entries of its snapshot directory that
    /// are no snapshot to list (a symlink, a name that is not UTF-8), each by name.
    async fn snapshot_listing(&self, volume: &str) -> Result<Listing<VolSnapshot>>;
    /// A volume's snapshots, oldest first: [`Backend::snapshot_listing`]'s good ones (the
    /// rejected entries are logged).
    async fn list_snapshots(&self, volume: &str) -> Result<Vec<VolSnapshot>> {
        let l = self.snapshot_listing(volume).await?;
        for r in &l.rejected {
            tracing::warn!("{}", r.error);
        }
        Ok(l.items)
    }
    /// Make the volume's content the snapshot's again; the snapshot is kept.
    async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<()>;
    /// Delete a snapshot.
    async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()>;
    /// Delete snapshot `snapshot` of `volume` for the running domain `domain` whose QEMU holds
    /// the volume (the undo of [`Backend::create_snapshot_for_domain`]): under
    /// `locking::Purpose::ForDomain`, like the create, never the volume's lease.
    async fn delete_snapshot_for_domain(
        &self,
        volume: &str,
        snapshot: &str,
        domain: &DomainRef,
    ) -> Result<()>;
}
