//! The pool and volume model.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The kinds of pool (libvirt's pool types where libvirt has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolKind {
    /// Files in a directory.
    Dir,
    /// Subvolumes of a btrfs filesystem.
    Btrfs,
    /// Logical volumes of an LVM volume group.
    Logical,
}

impl PoolKind {
    /// `dir`, `btrfs` or `logical`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Dir => "dir",
            PoolKind::Btrfs => "btrfs",
            PoolKind::Logical => "logical",
        }
    }
    /// Parse `dir`, `btrfs` or `logical`.
    pub fn parse(s: &str) -> Result<PoolKind> {
        match s {
            "dir" => Ok(PoolKind::Dir),
            "btrfs" => Ok(PoolKind::Btrfs),
            "logical" => Ok(PoolKind::Logical),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("unknown pool type {s:?}: dir, btrfs or logical"),
            )),
        }
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pool definition, as persisted in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PoolDef {
    /// The pool's name.
    pub name: String,
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: PoolKind,
    /// A directory (dir, btrfs) or a volume group name (logical).
    pub target: String,
    /// logical only: the thin pool LV in the volume group new volumes are created in (thin
    /// volumes get thin snapshots); without it, volumes are linear and snapshots COW.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin_pool: Option<String>,
}

/// A volume's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolFormat {
    /// Raw data.
    Raw,
    /// qcow2.
    Qcow2,
}

impl VolFormat {
    /// `raw` or `qcow2`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolFormat::Raw => "raw",
            VolFormat::Qcow2 => "qcow2",
        }
    }
    /// Parse `raw` or `qcow2`.
    pub fn parse(s: &str) -> Result<VolFormat> {
        match s {
            "raw" => Ok(VolFormat::Raw),
            "qcow2" => Ok(VolFormat::Qcow2),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("unknown volume format {s:?}: raw or qcow2"),
            )),
        }
    }
}

impl fmt::Display for VolFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backing volume of a qcow2 volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Backing {
    /// Its path (as recorded in the overlay).
    pub path: String,
    /// Its format (recorded in the overlay: never probed).
    pub format: VolFormat,
}

/// The backing volume of an existing qcow2 volume, as its header records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeBacking {
    /// Its path (as recorded in the overlay).
    pub path: String,
    /// Its format as recorded in the overlay; `None` (JSON `null`, shown `unknown`) when the
    /// overlay records none or one that is neither raw nor qcow2. Never probed or guessed:
    /// an unrecorded format is not raw.
    pub format: Option<VolFormat>,
}

impl VolumeBacking {
    /// The format as text: `raw`, `qcow2` or `unknown`.
    pub fn format_str(&self) -> &'static str {
        self.format.map_or("unknown", VolFormat::as_str)
    }
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The name.
    pub name: String,
    /// Virtual size in bytes (0 with a backing volume: the backing volume's size).
    pub capacity: u64,
    /// The format.
    pub format: VolFormat,
    /// qcow2 only: the backing volume.
    pub backing: Option<Backing>,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Volume {
    /// Its name in the pool.
    pub name: String,
    /// The pool's name.
    pub pool: String,
    /// The path a VM opens (a file, or an LV's device node).
    pub path: String,
    /// The format.
    pub format: VolFormat,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Space used on the host in bytes, where known.
    pub allocation: Option<u64>,
    /// The backing volume, for qcow2 overlays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<VolumeBacking>,
    /// What its lease is keyed on (the key of [`crate::Backend::lease_resource`]): the
    /// canonical path of the file (dir) or of the subvolume's directory (btrfs), or
    /// `lvm:VG/LV` (logical): the volume's pool-relative identity, the same for every
    /// operation on it and for a VM start.
    pub key: String,
}

/// How a volume snapshot is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SnapshotKind {
    /// An internal qcow2 snapshot (dir pools, qcow2 volumes).
    Qcow2Internal,
    /// A read-only file beside the volume: a reflink clone where the filesystem supports it,
    /// else a sparse copy (dir pools, raw volumes).
    File,
    /// A read-only btrfs subvolume snapshot.
    BtrfsSubvolume,
    /// A classic (COW) LVM snapshot, sized.
    LvmCow,
    /// A thin LVM snapshot in the volume's thin pool.
    LvmThin,
}

/// A volume snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolSnapshot {
    /// Its name.
    pub name: String,
    /// The volume's name.
    pub volume: String,
    /// How it is stored.
    pub kind: SnapshotKind,
    /// Creation time, seconds since the epoch (UTC), where known.
    pub created: Option<i64>,
    /// Size in bytes: the COW area of an LVM COW snapshot, the volume size otherwise.
    pub size: Option<u64>,
    /// False for an LVM COW snapshot that overflowed (invalid: it cannot be reverted to).
    pub valid: bool,
    /// LVM: how full the snapshot's COW area (or the thin pool's data) is, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_percent: Option<f64>,
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Capabilities {
    /// Raw volumes.
    pub raw: bool,
    /// qcow2 volumes (and qcow2 overlays on backing volumes).
    pub qcow2: bool,
    /// Volume snapshots.
    pub snapshots: bool,
    /// Revert to a snapshot, keeping it.
    pub revert: bool,
    /// Snapshots share blocks with the volume (reflink, btrfs, thin LVM, qcow2 internal).
    pub space_efficient_snapshots: bool,
    /// Snapshots have a fixed size and become invalid when full (LVM COW).
    pub sized_snapshots: bool,
    /// Thin provisioning (LVM thin pool).
    pub thin: bool,
    /// Revert replaces the volume in one atomic step.
    pub atomic_revert: bool,
    /// The snapshot kinds [`crate::Backend::create_snapshot_for_domain`] can take of a volume
    /// a running (paused) VM has open: a btrfs subvolume snapshot, an LVM snapshot, a
    /// reflink of a raw file (dir pools, only where the filesystem clones: [`PoolInfo`]
    /// says after probing). Never [`SnapshotKind::Qcow2Internal`]: an internal snapshot of
    /// an open qcow2 image goes through QEMU (QMP).
    pub open_volume_snapshots: &'static [SnapshotKind],
}

/// A pool's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PoolInfo {
    /// The name.
    pub name: String,
    /// The kind.
    #[serde(rename = "type")]
    pub kind: PoolKind,
    /// Directory or volume group.
    pub target: String,
    /// Total bytes.
    pub capacity: u64,
    /// Used bytes.
    pub allocation: u64,
    /// Free bytes.
    pub available: u64,
    /// What its backend can do.
    pub capabilities: Capabilities,
    /// Temporaries left by interrupted (killed) operations, removed by the next operation
    /// on their volume (dir and btrfs pools; 0 for LVM).
    pub leftovers: u64,
    /// Bytes allocated to those leftovers (for btrfs subvolumes: their files' apparent
    /// allocation, shared extents counted in full).
    pub leftover_bytes: u64,
}

/// A listing of a pool's volumes or a volume's snapshots: the good entries, and each entry
/// of the pool's directories that cannot be listed (a symlink, a name that is not UTF-8, a
/// file that cannot be read as a volume), reported by name, so that one bad entry does not
/// hide the others. Operations on a rejected entry itself fail with its error.
#[derive(Debug)]
pub struct Listing<T> {
    /// The good entries, in the listing's order.
    pub items: Vec<T>,
    /// The entries that could not be listed, in directory order.
    pub rejected: Vec<RejectedEntry>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Listing {
            items: Vec::new(),
            rejected: Vec::new(),
        }
    }
}

impl<T> Listing<T> {
    /// The items, or the first rejected entry's error (for operations that must see every
    /// entry, such as deleting a volume with its snapshots).
    pub fn strict(self) -> Result<Vec<T>> {
        match self.rejected.into_iter().next() {
            Some(r) => Err(r.error),
            None => Ok(self.items),
        }
    }
}

/// An entry a listing could not list.
#[derive(Debug)]
pub struct RejectedEntry {
    /// Its file name (a name that is not UTF-8 with its bytes escaped, e.g. `v\xff1`).
    pub name: String,
    /// Why: its message names the entry's path.
    pub error: Error,
}

/// The running domain an operation acts for: its name and its QEMU's pid, checked against
/// the volume's recorded lease holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRef {
    /// The domain's name (the lease holder `Domain(name)`).
    pub domain: String,
    /// The pid of its QEMU, which holds the volume's lease.
    pub qemu_pid: u32,
}

/// Options of snapshot creation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// LVM COW snapshots: the COW area's size in bytes (default: the volume's size, so that
    /// it cannot overflow).
    pub size: Option<u64>,
}

/// Parse a size like virsh: a number with an optional unit (`b`, `k`/`KiB`, `M`/`MiB`,
/// `G`/`GiB`, `T`/`TiB`; powers of 1024; `KB`, `MB`, ... are powers of 1000).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::new(
            ErrorKind::InvalidInput,
            format!("invalid size {s:?}: a number with an optional unit (b, K, M, G, T)"),
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_virsh() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
