//! [`Pool`] and [`Volume`]: storage pools (dir, btrfs, LVM) and their volumes, with offline
//! volume snapshots. Every change takes the volume's lease first and fails with
//! [`ErrorKind::InUse`] naming the holder while a VM (or another operation) holds it.
//!
//! Pool and volume operations are async: LVM and btrfs ones run tools.

use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;
use storage_backends::Backend;

pub use storage_backends::{
    Backing, Capabilities, DomainRef, PoolDef, PoolInfo, PoolKind, SnapshotKind, SnapshotOptions,
    VolFormat, VolSnapshot, Volume as VolumeInfo, VolumeBacking, VolumeSpec,
};

/// The defined pools ([`crate::Connection::pool_listing`]).
#[derive(Debug, Default)]
pub struct PoolListing {
    /// The readable definitions, sorted by name.
    pub pools: Vec<PoolDef>,
    /// The damaged ones, sorted by name.
    pub damaged: Vec<DamagedPool>,
}

/// A pool definition file that cannot be read back.
#[derive(Debug)]
pub struct DamagedPool {
    /// The pool's name (the file name without `.json`).
    pub name: String,
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong with it ([`ErrorKind::Corrupt`], or [`ErrorKind::InvalidInput`] for a
    /// file name that is no pool name); its message names the file.
    pub error: Error,
}

/// A listing of a pool's volumes ([`Pool::volume_listing`]) or a volume's snapshots
/// ([`Volume::snapshot_listing`]): the good entries, and each entry that cannot be listed.
#[derive(Debug)]
pub struct Listing<T> {
    /// The good entries (volumes by name, snapshots oldest first).
    pub items: Vec<T>,
    /// The entries that cannot be listed (a symlink, a name that is not UTF-8, a file that
    /// is no readable volume), in directory order.
    pub rejected: Vec<RejectedEntry>,
}

/// An entry of a pool's directories that a listing cannot list.
#[derive(Debug)]
pub struct RejectedEntry {
    /// Its file name (not UTF-8: its bytes escaped, e.g. `v\xff1`).
    pub name: String,
    /// Why ([`ErrorKind::InvalidInput`] for a symlink or a non-UTF-8 name); its message
    /// names the entry's path.
    pub error: Error,
}

impl<T> From<storage_backends::Listing<T>> for Listing<T> {
    fn from(l: storage_backends::Listing<T>) -> Self {
        Listing {
            items: l.items,
            rejected: l
                .rejected
                .into_iter()
                .map(|r| RejectedEntry {
                    name: r.name,
                    error: r.error.into(),
                })
                .collect(),
        }
    }
}

/// Parse a pool type (`dir`, `btrfs`, `logical`).
pub fn parse_kind(s: &str) -> Result<PoolKind> {
    Ok(PoolKind::parse(s)?)
}

/// Parse a volume format (`raw`, `qcow2`).
pub fn parse_format(s: &str) -> Result<VolFormat> {
    Ok(VolFormat::parse(s)?)
}

/// Parse a volume size as virsh does (`1G`, `512M`, bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    Ok(storage_backends::parse_size(s)?)
}

/// A defined pool, opened ([`crate::Connection::pool`]).
#[derive(Debug, Clone)]
pub struct Pool {
    backend: Arc<dyn Backend>,
    locks: locking::LockManager,
}

impl Pool {
    pub(crate) fn new(backend: Box<dyn Backend>, locks: locking::LockManager) -> Pool {
        Pool {
            backend: backend.into(),
            locks,
        }
    }

    /// The pool's definition.
    pub fn def(&self) -> &PoolDef {
        self.backend.def()
    }

    /// What the pool's backend can do.
    pub fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// Size, use, free space and capabilities.
    pub async fn info(&self) -> Result<PoolInfo> {
        Ok(self.backend.info().await?)
    }

    /// The volumes, sorted by name.
    pub async fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self.backend.list_volumes().await?)
    }

    /// The volumes, sorted by name, and the entries of the pool that cannot be listed, each by
    /// name (one bad entry does not hide the others).
    pub async fn volume_listing(&self) -> Result<Listing<VolumeInfo>> {
        Ok(self.backend.volume_listing().await?.into())
    }

    /// The volume `name` of this pool (nothing is read yet).
    pub fn volume(&self, name: &str) -> Volume {
        Volume {
            backend: self.backend.clone(),
            name: name.to_string(),
            locks: self.locks.clone(),
        }
    }

    /// Create a volume.
    pub async fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeInfo> {
        Ok(self.backend.create_volume(spec).await?)
    }

    /// The backing of a new volume: `vol` is a volume of this pool (its path and format are
    /// known) or an absolute path of any pool's volume, whose `format` must then be given
    /// (formats are recorded, never probed). `format` overrides what the pool knows.
    pub async fn backing(&self, vol: &str, format: Option<VolFormat>) -> Result<Backing> {
        let (path, known) = if vol.starts_with('/') {
            (vol.to_string(), None)
        } else {
            let v = self.volume(vol).info().await?;
            (v.path, Some(v.format))
        };
        let format = format.or(known).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the format of the backing path {vol} is needed \
                     (its format is recorded, never probed)"
                ),
            )
        })?;
        Ok(Backing { path, format })
    }
}

/// A volume of a pool ([`Pool::volume`]).
#[derive(Debug, Clone)]
pub struct Volume {
    backend: Arc<dyn Backend>,
    name: String,
    locks: locking::LockManager,
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its format, sizes, backing, path and lease key ([`ErrorKind::NotFound`] if absent).
    pub async fn info(&self) -> Result<VolumeInfo> {
        Ok(self.backend.volume(&self.name).await?)
    }

    /// Who holds the volume's lease now (in a cluster lockspace, on any host: each record
    /// names its host).
    pub async fn holders(&self) -> Result<Vec<crate::image::HolderRecord>> {
        let r = self.backend.lease_resource(&self.name).await?;
        Ok(self.locks.holders(&r)?)
    }

    /// The path a VM opens for it.
    pub async fn path(&self) -> Result<String> {
        Ok(self.info().await?.path)
    }

    /// Delete it and its snapshots.
    pub async fn delete(&self) -> Result<()> {
        Ok(self.backend.delete_volume(&self.name).await?)
    }

    /// Snapshot it (it must be inactive).
    pub async fn create_snapshot(
        &self,
        snapshot: &str,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        Ok(self
            .backend
            .create_snapshot(&self.name, snapshot, opts)
            .await?)
    }

    /// Snapshot it for the running domain `domain`, whose QEMU holds its lease and has it
    /// open, paused by the caller (QMP `stop`): a btrfs subvolume snapshot, an LVM snapshot or
    /// a reflink of a raw file ([`Capabilities::open_volume_snapshots`]). Checked against the
    /// recorded lease holder (domain name and QEMU pid) under the domain's operation lock; no
    /// lease or QEMU lock is taken. Refused with [`ErrorKind::InUse`] for anyone else or while
    /// another operation on the domain runs, with [`ErrorKind::Unsupported`] for a qcow2
    /// volume (through QMP instead) or a filesystem that cannot reflink.
    pub async fn create_snapshot_for_domain(
        &self,
        snapshot: &str,
        domain: &DomainRef,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        Ok(self
            .backend
            .create_snapshot_for_domain(&self.name, snapshot, domain, opts)
            .await?)
    }

    /// The lease resource a VM start takes for it (the key every volume operation takes):
    /// `locking::DiskUse::writable(volume.lease_resource().await?)`.
    pub async fn lease_resource(&self) -> Result<locking::Resource> {
        Ok(self.backend.lease_resource(&self.name).await?)
    }

    /// Its snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<VolSnapshot>> {
        Ok(self.backend.list_snapshots(&self.name).await?)
    }

    /// Its snapshots, oldest first, and the entries of its snapshot directory that cannot be
    /// listed, each by name.
    pub async fn snapshot_listing(&self) -> Result<Listing<VolSnapshot>> {
        Ok(self.backend.snapshot_listing(&self.name).await?.into())
    }

    /// Make its content the snapshot's again (it must be inactive); the snapshot is kept.
    pub async fn revert(&self, snapshot: &str) -> Result<()> {
        Ok(self.backend.revert_snapshot(&self.name, snapshot).await?)
    }

    /// Delete one of its snapshots.
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        Ok(self.backend.delete_snapshot(&self.name, snapshot).await?)
    }

    /// Delete snapshot `snapshot` for the running domain `domain` whose QEMU holds the
    /// volume (undoing [`Volume::create_snapshot_for_domain`]): under the domain's
    /// operation lock, never the volume's lease.
    pub async fn delete_snapshot_for_domain(
        &self,
        snapshot: &str,
        domain: &DomainRef,
    ) -> Result<()> {
        Ok(self
            .backend
            .delete_snapshot_for_domain(&self.name, snapshot, domain)
            .await?)
    }
}
