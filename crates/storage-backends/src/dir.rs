//! dir pools: volumes are files in a directory.
//!
//! - raw volumes: `TARGET/NAME`, created sparse. Snapshots are read-only files
//!   `TARGET/.snapshots/NAME/SNAP`: a reflink clone (FICLONE) where the filesystem supports
//!   it (btrfs, XFS), else a sparse copy. Revert clones the snapshot to a temporary file
//!   beside the volume and renames it over the volume (atomic).
//! - qcow2 volumes: created natively (image-formats' `qcow2_write::create`, the image
//!   qemu-img would write, backing format recorded); snapshots are internal qcow2 snapshots
//!   made, applied and deleted natively (`qcow2_write::SnapshotEditor`, QEMU's write
//!   order) and listed from the snapshot table. No process is spawned by this backend.
//!
//! The lease is keyed on the volume's canonical path; QEMU's image locks are held on the
//! file for the whole operation, so no QEMU can open it meanwhile.

use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::{self, CloneMethod};
use crate::image::{self, SnapshotOp, SnapshotRef, SystemClock};
use crate::lease::lease;
use crate::model::*;
use crate::name::{check_name, NameOf};
use crate::runner::CommandRunner;
use crate::{blocking, find_snapshot, Backend};
use async_trait::async_trait;
use locking::{LockManager, Resource};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Directory of raw volumes' snapshots under a pool's target.
pub const SNAPSHOT_DIR: &str = ".snapshots";

/// A dir pool.
#[derive(Debug)]
pub struct DirPool {
    def: PoolDef,
    root: PathBuf,
    locks: LockManager,
}

/// Read a volume file's format, size and backing (image-formats, no lock taken).
pub(crate) fn probe_file(path: &Path) -> Result<(VolFormat, u64, Option<Backing>)> {
    let info = image_formats::ImageInfo::open(path, None).map_err(|e| {
        if !path.exists() {
            Error::new(
                ErrorKind::NotFound,
                format!("no volume at {}", path.display()),
            )
        } else {
            Error::from(e)
        }
    })?;
    match info.format() {
        image_formats::Format::Qcow2 => {
            let q = info.qcow2().expect("qcow2 details");
            let backing = q.backing_file.as_ref().map(|b| Backing {
                path: String::from_utf8_lossy(b).into_owned(),
                format: match q.backing_format() {
                    Some(b"qcow2") => VolFormat::Qcow2,
                    _ => VolFormat::Raw,
                },
            });
            Ok((VolFormat::Qcow2, info.virtual_size(), backing))
        }
        image_formats::Format::Raw => Ok((VolFormat::Raw, info.file_length, None)),
        other => Err(Error::new(
            ErrorKind::NotSupported,
            format!("{}: {other} volumes are not supported", path.display()),
        )),
    }
}

fn allocation(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Create a qcow2 volume at `path` natively (image-formats), off the runtime's threads.
pub(crate) async fn create_qcow2(path: &Path, spec: &VolumeSpec) -> Result<()> {
    let (p, s) = (path.to_path_buf(), spec.clone());
    blocking(move || {
        let opts = image::volume_options(&s)?;
        image::create(&p, &opts, image::IfExists::Refuse)
            .map_err(|e| e.context(format!("create qcow2 volume {}", p.display())))
    })
    .await
}

/// An internal-snapshot operation on the qcow2 volume at `path` (image-formats).
async fn qcow2_op(path: &Path, op: SnapshotOp) -> Result<()> {
    let p = path.to_path_buf();
    blocking(move || image::snapshot(&p, &op, &SystemClock).map(drop)).await
}

fn by_name(snapshot: &str) -> SnapshotRef {
    SnapshotRef::Name(snapshot.as_bytes().to_vec())
}

/// Check a spec's format/backing combination.
pub(crate) fn check_spec(spec: &VolumeSpec) -> Result<()> {
    check_name(NameOf::Volume, &spec.name)?;
    if spec.backing.is_some() && spec.format != VolFormat::Qcow2 {
        return Err(Error::new(
            ErrorKind::NotSupported,
            "a backing volume needs a qcow2 volume (raw volumes cannot have one)",
        ));
    }
    if spec.backing.is_none() && spec.capacity == 0 {
        return Err(Error::new(ErrorKind::InvalidInput, "a volume needs a size"));
    }
    if let Some(b) = &spec.backing {
        if !Path::new(&b.path).is_absolute() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("backing volume path {:?} must be absolute", b.path),
            ));
        }
    }
    Ok(())
}

/// The snapshots of a qcow2 volume: its internal snapshot table, read natively.
pub(crate) fn qcow2_snapshots(path: &Path, volume: &str) -> Result<Vec<VolSnapshot>> {
    let info = image_formats::ImageInfo::open(path, Some(image_formats::Format::Qcow2))?;
    let q = info.qcow2().expect("qcow2 details");
    Ok(q.snapshots
        .iter()
        .map(|s| VolSnapshot {
            name: String::from_utf8_lossy(&s.name).into_owned(),
            volume: volume.to_string(),
            kind: SnapshotKind::Qcow2Internal,
            created: Some(i64::from(s.date_sec)),
            size: s.extra.disk_size,
            valid: true,
            usage_percent: None,
        })
        .collect())
}

impl DirPool {
    /// Open a dir pool (its target must be a directory). Dir pools run no tools: `runner` is
    /// taken for a uniform constructor and not used.
    pub fn new(
        def: PoolDef,
        runner: Arc<dyn CommandRunner>,
        locks: LockManager,
    ) -> Result<DirPool> {
        let root = PathBuf::from(&def.target);
        if !root.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("pool {:?}: {} is not a directory", def.name, root.display()),
            ));
        }
        let _ = runner;
        Ok(DirPool { def, root, locks })
    }

    fn vol_path(&self, name: &str) -> Result<PathBuf> {
        check_name(NameOf::Volume, name)?;
        Ok(self.root.join(name))
    }

    fn snap_dir(&self, name: &str) -> PathBuf {
        self.root.join(SNAPSHOT_DIR).join(name)
    }

    fn describe(&self, name: &str, path: &Path) -> Result<Volume> {
        if !path.is_file() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("pool {:?} has no volume {name:?}", self.def.name),
            ));
        }
        let (format, capacity, backing) = probe_file(path)?;
        Ok(Volume {
            name: name.to_string(),
            pool: self.def.name.clone(),
            path: path.display().to_string(),
            format,
            capacity,
            allocation: allocation(path),
            backing,
            key: locking::canonical_path(Path::new("/"), path)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| path.display().to_string()),
        })
    }

    fn raw_snapshots(&self, volume: &str) -> Result<Vec<VolSnapshot>> {
        let dir = self.snap_dir(volume);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
            let n = ent.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') {
                continue; // temporaries
            }
            let p = ent.path();
            out.push(VolSnapshot {
                name: n,
                volume: volume.to_string(),
                kind: SnapshotKind::File,
                created: fsutil::created(&p),
                size: std::fs::metadata(&p).ok().map(|m| m.len()),
                valid: true,
                usage_percent: None,
            });
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(out)
    }
}

#[async_trait]
impl Backend for DirPool {
    fn def(&self) -> &PoolDef {
        &self.def
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            raw: true,
            qcow2: true,
            snapshots: true,
            revert: true,
            space_efficient_snapshots: false,
            sized_snapshots: false,
            thin: false,
            atomic_revert: true,
        }
    }

    async fn info(&self) -> Result<PoolInfo> {
        let (capacity, allocation, available) = fsutil::fs_space(&self.root)?;
        let mut caps = self.capabilities();
        let probe = self.root.clone();
        // Reflink support decides whether raw snapshots share blocks.
        caps.space_efficient_snapshots = blocking(move || Ok(probe_reflink(&probe))).await?;
        Ok(PoolInfo {
            name: self.def.name.clone(),
            kind: self.def.kind,
            target: self.def.target.clone(),
            capacity,
            allocation,
            available,
            capabilities: caps,
        })
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>> {
        let rd = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("read {}", self.root.display()), e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("read {}", self.root.display()), e))?;
            let n = ent.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') || !ent.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            match self.describe(&n, &ent.path()) {
                Ok(v) => out.push(v),
                Err(e) => tracing::warn!("skipping {n}: {e}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn volume(&self, name: &str) -> Result<Volume> {
        let p = self.vol_path(name)?;
        self.describe(name, &p)
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        check_spec(spec)?;
        let path = self.vol_path(&spec.name)?;
        let _l = lease(&self.locks, "volume create", Resource::file(&path)).await?;
        if path.exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "pool {:?} already has a volume {:?}",
                    self.def.name, spec.name
                ),
            ));
        }
        match spec.format {
            VolFormat::Raw => {
                let (p, cap) = (path.clone(), spec.capacity);
                blocking(move || {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&p)
                        .map_err(|e| Error::io(format!("create {}", p.display()), e))?;
                    let r = f.set_len(cap).and_then(|_| f.sync_all());
                    if let Err(e) = r {
                        let _ = std::fs::remove_file(&p);
                        return Err(Error::io(format!("size {}", p.display()), e));
                    }
                    Ok(())
                })
                .await?
            }
            VolFormat::Qcow2 => {
                create_qcow2(&path, spec).await?;
            }
        }
        self.describe(&spec.name, &path)
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let path = self.vol_path(name)?;
        let _l = lease(&self.locks, "volume delete", Resource::file(&path)).await?;
        self.describe(name, &path)?;
        let snaps = self.snap_dir(name);
        if snaps.exists() {
            std::fs::remove_dir_all(&snaps)
                .map_err(|e| Error::io(format!("remove {}", snaps.display()), e))?;
            let _ = std::fs::remove_dir(self.root.join(SNAPSHOT_DIR)); // if empty
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))
    }

    async fn create_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        _opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        check_name(NameOf::Snapshot, snapshot)?;
        let path = self.vol_path(volume)?;
        let vol = self.describe(volume, &path)?;
        match vol.format {
            VolFormat::Qcow2 => {
                let _l =
                    lease(&self.locks, "volume snapshot create", Resource::file(&path)).await?;
                if qcow2_snapshots(&path, volume)?
                    .iter()
                    .any(|s| s.name == snapshot)
                {
                    return Err(exists(volume, snapshot));
                }
                qcow2_op(&path, SnapshotOp::Create(snapshot.as_bytes().to_vec())).await?;
                find_snapshot(qcow2_snapshots(&path, volume)?, volume, snapshot)
            }
            VolFormat::Raw => {
                let _l =
                    lease(&self.locks, "volume snapshot create", Resource::file(&path)).await?;
                let dir = self.snap_dir(volume);
                let dst = dir.join(snapshot);
                if dst.exists() {
                    return Err(exists(volume, snapshot));
                }
                let tmp = dir.join(format!(".{snapshot}.tmp-{}", std::process::id()));
                blocking(move || {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
                    let _ = std::fs::remove_file(&tmp);
                    let m = fsutil::clone_file(&path, &tmp)?;
                    let ro = std::fs::Permissions::from_mode_ro();
                    let done = std::fs::set_permissions(&tmp, ro)
                        .and_then(|_| std::fs::hard_link(&tmp, &dst))
                        .map_err(|e| Error::io(format!("create {}", dst.display()), e));
                    let _ = std::fs::remove_file(&tmp);
                    done.map(|_| m)
                })
                .await
                .map(|m: CloneMethod| tracing::debug!("raw snapshot by {m:?}"))?;
                find_snapshot(self.raw_snapshots(volume)?, volume, snapshot)
            }
        }
    }

    async fn list_snapshots(&self, volume: &str) -> Result<Vec<VolSnapshot>> {
        let path = self.vol_path(volume)?;
        let vol = self.describe(volume, &path)?;
        match vol.format {
            VolFormat::Qcow2 => qcow2_snapshots(&path, volume),
            VolFormat::Raw => self.raw_snapshots(volume),
        }
    }

    async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        check_name(NameOf::Snapshot, snapshot)?;
        let path = self.vol_path(volume)?;
        let vol = self.describe(volume, &path)?;
        let _l = lease(&self.locks, "volume snapshot revert", Resource::file(&path)).await?;
        match vol.format {
            VolFormat::Qcow2 => {
                find_snapshot(qcow2_snapshots(&path, volume)?, volume, snapshot)?;
                qcow2_op(&path, SnapshotOp::Apply(by_name(snapshot))).await
            }
            VolFormat::Raw => {
                find_snapshot(self.raw_snapshots(volume)?, volume, snapshot)?;
                let src = self.snap_dir(volume).join(snapshot);
                let tmp = self
                    .root
                    .join(format!(".{volume}.revert-{}", std::process::id()));
                blocking(move || {
                    let _ = std::fs::remove_file(&tmp);
                    fsutil::clone_file(&src, &tmp)?;
                    let mode = std::fs::metadata(&path)
                        .map(|m| m.permissions())
                        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
                    // One rename: the volume is either all old or all new.
                    let r = std::fs::set_permissions(&tmp, mode)
                        .and_then(|_| std::fs::rename(&tmp, &path))
                        .map_err(|e| Error::io(format!("replace {}", path.display()), e));
                    if r.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    r
                })
                .await
            }
        }
    }

    async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        check_name(NameOf::Snapshot, snapshot)?;
        let path = self.vol_path(volume)?;
        let vol = self.describe(volume, &path)?;
        let _l = lease(&self.locks, "volume snapshot delete", Resource::file(&path)).await?;
        match vol.format {
            VolFormat::Qcow2 => {
                find_snapshot(qcow2_snapshots(&path, volume)?, volume, snapshot)?;
                qcow2_op(&path, SnapshotOp::Delete(by_name(snapshot))).await
            }
            VolFormat::Raw => {
                find_snapshot(self.raw_snapshots(volume)?, volume, snapshot)?;
                let dir = self.snap_dir(volume);
                let f = dir.join(snapshot);
                std::fs::remove_file(&f)
                    .map_err(|e| Error::io(format!("remove {}", f.display()), e))?;
                let _ = std::fs::remove_dir(&dir); // if empty
                let _ = std::fs::remove_dir(self.root.join(SNAPSHOT_DIR));
                Ok(())
            }
        }
    }
}

pub(crate) fn exists(volume: &str, snapshot: &str) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("volume {volume:?} already has a snapshot {snapshot:?}"),
    )
}

/// Whether FICLONE works in `dir` (a throwaway probe file pair).
fn probe_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".reflink-probe-{}.b", std::process::id()));
    let ok = std::fs::write(&a, b"x").is_ok()
        && matches!(fsutil::clone_file(&a, &b), Ok(CloneMethod::Reflink));
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

trait ReadOnlyMode {
    fn from_mode_ro() -> Self;
}
impl ReadOnlyMode for std::fs::Permissions {
    fn from_mode_ro() -> Self {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o444)
    }
}
