//! dir pools: volumes are files in a directory.
//!
//! - raw volumes: `TARGET/NAME`, created sparse, mode 0600. Snapshots are read-only files
//!   `TARGET/.snapshots/NAME/SNAP` with the volume's mode minus write bits and minus any
//!   access for others (directories 0700): a reflink clone (FICLONE) where the filesystem
//!   supports it (btrfs, XFS), else a sparse copy. A snapshot is cloned to
//!   `.snapshots/NAME/.vs-snap` and linked to its name when complete. Revert clones the
//!   snapshot to `.snapshots/NAME/.vs-revert` and renames it over the volume (atomic).
//! - qcow2 volumes: created natively (image-formats' `qcow2_write::create`, the image
//!   qemu-img would write, backing format recorded), mode 0600; snapshots are internal
//!   qcow2 snapshots made, applied and deleted natively (`qcow2_write::SnapshotEditor`,
//!   crash-atomic: copied metadata, one header write) and listed from the snapshot table. No process is spawned.
//!
//! Every file is reached relative to a directory descriptor ([`crate::pooldir`]): a symlink
//! anywhere in the pool is reported and never followed. Temporaries have fixed names
//! starting with `.` in the volume's own `.snapshots/NAME/` (snapshot names never start with
//! `.`); every operation on a volume holds its exclusive lease, so a temporary found there
//! by the next operation on that volume is a dead operation's leftover: it is removed first.
//!
//! The lease is keyed on the volume's canonical path; QEMU's image locks are held on the
//! file for the whole operation, so no QEMU can open it meanwhile.

use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::{self, CloneMethod};
use crate::image::{self, SnapshotOp, SnapshotRef, SystemClock};
use crate::lease::{delete_lock, for_domain, key_string, lease};
use crate::model::*;
use crate::name::{check_name, NameOf};
use crate::pooldir::{self, shown_name, symlink_error, utf8_name, DirFd, EntryKind, EntryStat};
use crate::runner::CommandRunner;
use crate::util::{exists, failpoint, find_listed, find_snapshot, no_snapshot};
use crate::volfile::{check_spec, count_leftovers, create_file, not_a_pool_volume, probe};
use crate::{Backend, Blocking};
use async_trait::async_trait;
use locking::{LockManager, Resource};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Directory of raw volumes' snapshots under a pool's target.
pub const SNAPSHOT_DIR: &str = crate::volfile::SNAPSHOT_DIR;
/// A raw snapshot being made, in `.snapshots/VOL/`.
const SNAP_TMP: &str = ".vs-snap";
/// A raw revert's new volume being made, in `.snapshots/VOL/`.
const REVERT_TMP: &str = ".vs-revert";

/// A dir pool.
#[derive(Debug)]
pub struct DirPool {
    def: PoolDef,
    root: PathBuf,
    locks: LockManager,
    blocking: Blocking,
}

fn by_name(snapshot: &str) -> SnapshotRef {
    SnapshotRef::Name(snapshot.as_bytes().to_vec())
}

/// The snapshots in the qcow2 image open as `f`: its internal snapshot table.
pub(crate) fn qcow2_snapshots(f: File, path: &Path, volume: &str) -> Result<Vec<VolSnapshot>> {
    let storage = image_formats::FileStorage::from_file(f);
    let info = image_formats::ImageInfo::read(
        &path.to_string_lossy(),
        &storage,
        Some(image_formats::Format::Qcow2),
    )?;
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
        DirFd::open_root(&root).map_err(|e| {
            if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::Io {
                Error::new(
                    ErrorKind::NotFound,
                    format!("pool {:?}: {} is not a directory", def.name, root.display()),
                )
            } else {
                e.context(format!("pool {:?}", def.name))
            }
        })?;
        let _ = runner;
        Ok(DirPool {
            def,
            root,
            locks,
            blocking: Blocking::default(),
        })
    }

    /// Run the blocking file work (clones, copies, fsyncs, qcow2 writes) as `b` says
    /// (default: [`Blocking::SpawnBlocking`]).
    pub fn with_blocking(mut self, b: Blocking) -> DirPool {
        self.blocking = b;
        self
    }

    /// The pool's directory, opened for this operation.
    fn open_root(&self) -> Result<DirFd> {
        DirFd::open_root(&self.root)
    }

    fn not_found(&self, name: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!("pool {:?} has no volume {name:?}", self.def.name),
        )
    }

    /// The volume file `name`: its facts, or NotFound, or the symlink error.
    fn vol_stat(&self, root: &DirFd, name: &str) -> Result<EntryStat> {
        check_name(NameOf::Volume, name)?;
        match root.stat(name)? {
            None => Err(self.not_found(name)),
            Some(s) if s.kind == EntryKind::Symlink => Err(symlink_error(&root.join(name))),
            Some(s) if s.kind != EntryKind::File => Err(self.not_found(name)),
            Some(s) => Ok(s),
        }
    }

    fn describe(&self, root: &DirFd, name: &str) -> Result<Volume> {
        let st = self.vol_stat(root, name)?;
        let path = root.join(name);
        let (format, capacity, backing) = probe(root.open_file(name, false)?, &path)?;
        Ok(Volume {
            name: name.to_string(),
            pool: self.def.name.clone(),
            path: path.display().to_string(),
            format,
            capacity,
            allocation: Some(st.allocated),
            backing,
            key: key_string(&Resource::file(&path)),
        })
    }

    /// `.snapshots/VOL`, `None` if absent; created (0700) when `create`.
    fn snap_dir(root: &DirFd, volume: &str, create: bool) -> Result<Option<DirFd>> {
        if create {
            let s = root.open_or_create_dir(SNAPSHOT_DIR, 0o700)?;
            return s.open_or_create_dir(volume, 0o700).map(Some);
        }
        match root.open_dir(SNAPSHOT_DIR)? {
            None => Ok(None),
            Some(s) => s.open_dir(volume),
        }
    }

    /// Remove what dead operations on `volume` left (the caller holds its lease): hidden
    /// entries of `.snapshots/VOL/`, an older version's `.VOL.revert-PID` in the target.
    fn clean_leftovers(root: &DirFd, volume: &str) -> Result<()> {
        for e in root.entries()? {
            if let Some(n) = e
                .to_str()
                .filter(|n| pooldir::is_legacy_root_temp(n, volume))
            {
                tracing::info!(
                    "removing {} (left by an interrupted operation)",
                    root.join(n).display()
                );
                root.remove_tree(n)?;
            }
        }
        if let Some(d) = Self::snap_dir(root, volume, false)? {
            let mut kept = 0;
            for e in d.entries()? {
                if let Some(n) = e.to_str().filter(|n| n.starts_with('.')) {
                    tracing::info!(
                        "removing {} (left by an interrupted operation)",
                        d.join(n).display()
                    );
                    d.remove_tree(n)?;
                } else {
                    kept += 1;
                }
            }
            // Snapshots are kept: no need to try removing the (non-empty) directories.
            if kept == 0 {
                Self::drop_empty_snap_dir(root, volume);
            }
        }
        Ok(())
    }

    /// Remove `.snapshots/VOL` and `.snapshots` if they are empty.
    fn drop_empty_snap_dir(root: &DirFd, volume: &str) {
        if let Ok(Some(s)) = root.open_dir(SNAPSHOT_DIR) {
            s.rmdir_if_empty(volume);
        }
        root.rmdir_if_empty(SNAPSHOT_DIR);
    }

    /// The snapshot file `n` of `volume` in its snapshot directory `dir`: `None` if absent,
    /// an inner error for an entry that is no snapshot file (a symlink, a directory).
    fn raw_entry(
        dir: &DirFd,
        volume: &str,
        n: &str,
    ) -> Result<Option<std::result::Result<VolSnapshot, Error>>> {
        Ok(match dir.stat(n)? {
            Some(s) if s.kind == EntryKind::File => {
                let created = dir.open_file(n, false).ok().and_then(|f| {
                    let m = f.metadata().ok()?;
                    let t = m.created().or_else(|_| m.modified()).ok()?;
                    t.duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs() as i64)
                });
                Some(Ok(VolSnapshot {
                    name: n.to_string(),
                    volume: volume.to_string(),
                    kind: SnapshotKind::File,
                    created,
                    size: Some(s.len),
                    valid: true,
                    usage_percent: None,
                }))
            }
            Some(s) if s.kind == EntryKind::Symlink => Some(Err(symlink_error(&dir.join(n)))),
            Some(_) => Some(Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is not a snapshot file", dir.join(n).display()),
            ))),
            None => None,
        })
    }

    /// The raw snapshots of `volume`; symlinks, non-UTF-8 names and other entries that are
    /// no snapshot file are rejected by name.
    fn raw_snapshots(root: &DirFd, volume: &str) -> Result<Listing<VolSnapshot>> {
        let Some(dir) = Self::snap_dir(root, volume, false)? else {
            return Ok(Listing::default());
        };
        let mut out = Vec::new();
        let mut rejected = Vec::new();
        for e in dir.entries()? {
            let n = match utf8_name(dir.path(), &e) {
                Ok(n) => n,
                Err(error) => {
                    rejected.push(RejectedEntry {
                        name: shown_name(&e),
                        error,
                    });
                    continue;
                }
            };
            if n.starts_with('.') {
                continue; // temporaries
            }
            match Self::raw_entry(&dir, volume, &n)? {
                Some(Ok(s)) => out.push(s),
                Some(Err(error)) => rejected.push(RejectedEntry { name: n, error }),
                None => {}
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(Listing {
            items: out,
            rejected,
        })
    }

    /// Make the raw snapshot `snapshot` of `volume` (the caller holds what protects the
    /// volume); `reflink_only`: refuse rather than copy where the filesystem cannot clone.
    async fn new_raw_snapshot(
        &self,
        root: DirFd,
        volume: &str,
        snapshot: &str,
        reflink_only: bool,
    ) -> Result<VolSnapshot> {
        if let Some(d) = Self::snap_dir(&root, volume, false)? {
            match d.stat(snapshot)? {
                Some(s) if s.kind == EntryKind::Symlink => {
                    return Err(symlink_error(&d.join(snapshot)))
                }
                Some(_) => return Err(exists(volume, snapshot)),
                None => {}
            }
        }
        let (vs, snap) = (volume.to_string(), snapshot.to_string());
        let root = self
            .blocking
            .run(move || {
                let r = raw_snapshot(&root, &vs, &snap, reflink_only);
                if r.is_err() {
                    DirPool::drop_empty_snap_dir(&root, &vs);
                }
                r.map(|m| {
                    tracing::debug!("raw snapshot by {m:?}");
                    root
                })
            })
            .await?;
        // The new snapshot alone (not the whole listing: a volume may have many).
        Self::snap_dir(&root, volume, false)?
            .and_then(|d| Self::raw_entry(&d, volume, snapshot).transpose())
            .unwrap_or_else(|| Err(no_snapshot(volume, snapshot)))?
    }

    /// The backing volume of `spec` resolved in this pool: its path must name one of the
    /// pool's volumes. Returns the spec with the capacity filled in (0: the backing's).
    fn resolve_backing(&self, root: &DirFd, spec: &VolumeSpec) -> Result<VolumeSpec> {
        let mut spec = spec.clone();
        if let Some(b) = &spec.backing {
            let name = Path::new(&b.path)
                .strip_prefix(&self.root)
                .ok()
                .and_then(|r| r.to_str())
                .filter(|r| !r.is_empty() && !r.contains('/'))
                .ok_or_else(|| not_a_pool_volume(&self.def.name, &b.path))?;
            let v = self.describe(root, name).map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::new(
                    ErrorKind::NotFound,
                    format!("backing volume {} does not exist", b.path),
                ),
                _ => e.context(format!("backing volume {}", b.path)),
            })?;
            if spec.capacity == 0 {
                spec.capacity = v.capacity;
            }
        }
        Ok(spec)
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
            // Where the filesystem reflinks (info() probes it).
            open_volume_snapshots: &[SnapshotKind::File],
        }
    }

    async fn info(&self) -> Result<PoolInfo> {
        let root = self.open_root()?;
        let (capacity, allocation, available) = fsutil::fs_space(&self.root)?;
        let mut caps = self.capabilities();
        let (leftovers, leftover_bytes) = count_leftovers(&root)?;
        // Reflink support decides whether raw snapshots share blocks, and whether an open
        // volume can be snapshotted (a full copy would stretch a paused guest's pause).
        let reflink = self.blocking.run(move || Ok(probe_reflink(&root))).await?;
        caps.space_efficient_snapshots = reflink;
        if !reflink {
            caps.open_volume_snapshots = &[];
        }
        Ok(PoolInfo {
            name: self.def.name.clone(),
            kind: self.def.kind,
            target: self.def.target.clone(),
            capacity,
            allocation,
            available,
            capabilities: caps,
            leftovers,
            leftover_bytes,
        })
    }

    async fn volume_listing(&self) -> Result<Listing<Volume>> {
        let root = self.open_root()?;
        let mut l = Listing::default();
        for e in root.entries()? {
            let n = match utf8_name(root.path(), &e) {
                Ok(n) => n,
                Err(error) => {
                    l.rejected.push(RejectedEntry {
                        name: shown_name(&e),
                        error,
                    });
                    continue;
                }
            };
            if n.starts_with('.') {
                continue;
            }
            match root.stat(&n)? {
                Some(s) if s.kind == EntryKind::Symlink => {
                    l.rejected.push(RejectedEntry {
                        error: symlink_error(&root.join(&n)),
                        name: n,
                    });
                    continue;
                }
                Some(s) if s.kind == EntryKind::File => {}
                _ => continue,
            }
            match self.describe(&root, &n) {
                Ok(v) => l.items.push(v),
                Err(e) if e.kind() == ErrorKind::NotFound => {} // gone meanwhile
                Err(error) => l.rejected.push(RejectedEntry { name: n, error }),
            }
        }
        l.items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(l)
    }

    async fn volume(&self, name: &str) -> Result<Volume> {
        self.describe(&self.open_root()?, name)
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        check_spec(spec)?;
        let root = self.open_root()?;
        let path = root.join(&spec.name);
        let spec = self.resolve_backing(&root, spec)?;
        let _l = lease(&self.locks, "volume create", Resource::file(&path)).await?;
        match root.stat(&spec.name)? {
            Some(s) if s.kind == EntryKind::Symlink => return Err(symlink_error(&path)),
            Some(_) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "pool {:?} already has a volume {:?}",
                        self.def.name, spec.name
                    ),
                ))
            }
            None => {}
        }
        Self::clean_leftovers(&root, &spec.name)?;
        let name = spec.name.clone();
        let root = self
            .blocking
            .run(move || create_file(&root, &spec.name, &spec).map(|_| root))
            .await?;
        self.describe(&root, &name)
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let root = self.open_root()?;
        let path = root.join(name);
        self.vol_stat(&root, name)?;
        let _l = lease(&self.locks, "volume delete", Resource::file(&path)).await?;
        self.describe(&root, name)?;
        Self::clean_leftovers(&root, name)?;
        // A symlink at `.snapshots`, `.snapshots/VOL` or a snapshot fails here, before
        // anything is gone.
        Self::raw_snapshots(&root, name)?.strict()?;
        if Self::snap_dir(&root, name, false)?.is_some() {
            let snaps = root.open_dir(SNAPSHOT_DIR)?.expect("opened just before");
            snaps.remove_tree(name)?;
            Self::drop_empty_snap_dir(&root, name);
        }
        failpoint("dir-delete-snapshots-gone");
        root.unlink(name)?;
        root.sync()
    }

    async fn create_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        _opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        check_name(NameOf::Snapshot, snapshot)?;
        let root = self.open_root()?;
        let path = root.join(volume);
        let vol = self.describe(&root, volume)?;
        let _l = lease(&self.locks, "volume snapshot create", Resource::file(&path)).await?;
        Self::clean_leftovers(&root, volume)?;
        match vol.format {
            VolFormat::Qcow2 => {
                let list = qcow2_snapshots(root.open_file(volume, false)?, &path, volume)?;
                if list.iter().any(|s| s.name == snapshot) {
                    return Err(exists(volume, snapshot));
                }
                let f = root.open_file(volume, true)?;
                let p = path.clone();
                let op = SnapshotOp::Create(snapshot.as_bytes().to_vec());
                self.blocking
                    .run(move || image::snapshot_file(f, &p, &op, &SystemClock))
                    .await?;
                let list = qcow2_snapshots(root.open_file(volume, false)?, &path, volume)?;
                find_snapshot(list, volume, snapshot)
            }
            VolFormat::Raw => self.new_raw_snapshot(root, volume, snapshot, false).await,
        }
    }

    async fn lease_resource(&self, volume: &str) -> Result<Resource> {
        let root = self.open_root()?;
        self.vol_stat(&root, volume)?;
        Ok(Resource::file(root.join(volume)))
    }

    async fn create_snapshot_for_domain(
        &self,
        volume: &str,
        snapshot: &str,
        domain: &DomainRef,
        _opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        check_name(NameOf::Snapshot, snapshot)?;
        let root = self.open_root()?;
        let path = root.join(volume);
        let vol = self.describe(&root, volume)?;
        if vol.format == VolFormat::Qcow2 {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "volume {volume:?} is qcow2: an internal snapshot of an image a running QEMU has open is taken through QEMU (QMP), not by the pool"
                ),
            ));
        }
        let op = "volume snapshot create (for a domain)";
        let _l = for_domain(&self.locks, op, Resource::file(&path), domain)?;
        // The domain's QEMU holds the volume's exclusive lease and we hold the domain's
        // operation lock: nothing else works on this volume, so a temporary is a leftover.
        Self::clean_leftovers(&root, volume)?;
        self.new_raw_snapshot(root, volume, snapshot, true).await
    }

    async fn snapshot_listing(&self, volume: &str) -> Result<Listing<VolSnapshot>> {
        let root = self.open_root()?;
        let vol = self.describe(&root, volume)?;
        match vol.format {
            VolFormat::Qcow2 => Ok(Listing {
                items: qcow2_snapshots(root.open_file(volume, false)?, &root.join(volume), volume)?,
                rejected: Vec::new(),
            }),
            VolFormat::Raw => Self::raw_snapshots(&root, volume),
        }
    }

    async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        check_name(NameOf::Snapshot, snapshot)?;
        let root = self.open_root()?;
        let path = root.join(volume);
        let vol = self.describe(&root, volume)?;
        let _l = lease(&self.locks, "volume snapshot revert", Resource::file(&path)).await?;
        Self::clean_leftovers(&root, volume)?;
        match vol.format {
            VolFormat::Qcow2 => {
                let list = qcow2_snapshots(root.open_file(volume, false)?, &path, volume)?;
                find_snapshot(list, volume, snapshot)?;
                let f = root.open_file(volume, true)?;
                let op = SnapshotOp::Apply(by_name(snapshot));
                self.blocking
                    .run(move || image::snapshot_file(f, &path, &op, &SystemClock).map(drop))
                    .await
            }
            VolFormat::Raw => {
                find_listed(Self::raw_snapshots(&root, volume)?, volume, snapshot)?;
                let (vs, snap) = (volume.to_string(), snapshot.to_string());
                self.blocking
                    .run(move || raw_revert(&root, &vs, &snap))
                    .await
            }
        }
    }

    async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        self.delete_snapshot_as(volume, snapshot, None).await
    }

    async fn delete_snapshot_for_domain(
        &self,
        volume: &str,
        snapshot: &str,
        domain: &DomainRef,
    ) -> Result<()> {
        self.delete_snapshot_as(volume, snapshot, Some(domain))
            .await
    }
}

/// Snapshot the raw volume `volume` as `.snapshots/VOL/SNAP`: clone to `.vs-snap`, give it
/// the volume's owner and read-only mode, link it to its name (never over an existing one).
/// With `reflink_only`, a filesystem that cannot clone fails the snapshot
/// ([`ErrorKind::NotSupported`]) before any data is copied.
fn raw_snapshot(
    root: &DirFd,
    volume: &str,
    snapshot: &str,
    reflink_only: bool,
) -> Result<CloneMethod> {
    let src = root.open_file(volume, false)?;
    let st = root.stat(volume)?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{} vanished", root.join(volume).display()),
        )
    })?;
    let dir = DirPool::snap_dir(root, volume, true)?.expect("created");
    let tmp = dir.join(SNAP_TMP);
    let t = dir.create_file(SNAP_TMP, 0o600)?;
    let r = (|| -> Result<CloneMethod> {
        let m = if reflink_only {
            fsutil::reflink_fd(&src, &t, &tmp).map(|_| CloneMethod::Reflink)?
        } else {
            fsutil::clone_fd(&src, &t, &tmp)?
        };
        failpoint("dir-snapshot-cloned");
        pooldir::set_mode_owner(&t, &tmp, pooldir::snapshot_mode(st.mode), st.uid, st.gid)?;
        dir.link(SNAP_TMP, snapshot)?;
        failpoint("dir-snapshot-linked");
        Ok(m)
    })();
    let _ = dir.unlink(SNAP_TMP);
    let m = r?;
    dir.sync()?;
    Ok(m)
}

/// Revert the raw volume `volume` to its snapshot `snapshot`: clone the snapshot to
/// `.snapshots/VOL/.vs-revert`, give it the volume's owner and mode, rename it over the
/// volume (one rename: the volume is all old or all new).
fn raw_revert(root: &DirFd, volume: &str, snapshot: &str) -> Result<()> {
    let dir =
        DirPool::snap_dir(root, volume, false)?.ok_or_else(|| no_snapshot(volume, snapshot))?;
    let src = dir.open_file(snapshot, false)?;
    let st = root.stat(volume)?.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{} vanished", root.join(volume).display()),
        )
    })?;
    let tmp = dir.join(REVERT_TMP);
    let t = dir.create_file(REVERT_TMP, 0o600)?;
    let r = (|| -> Result<()> {
        fsutil::clone_fd(&src, &t, &tmp)?;
        failpoint("dir-revert-cloned");
        pooldir::set_mode_owner(&t, &tmp, st.mode, st.uid, st.gid)?;
        dir.rename(REVERT_TMP, root, volume)?;
        failpoint("dir-revert-renamed");
        root.sync()
    })();
    if r.is_err() {
        let _ = dir.unlink(REVERT_TMP);
    }
    r
}

/// Whether FICLONE works in `dir`: two unnamed files (O_TMPFILE), so nothing can be left.
fn probe_reflink(dir: &DirFd) -> bool {
    use rustix::fs::{Mode, OFlags};
    let tmp = || {
        rustix::fs::openat(
            dir.fd(),
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map(File::from)
    };
    let (Ok(a), Ok(b)) = (tmp(), tmp()) else {
        return false;
    };
    use std::io::Write;
    if (&a).write_all(b"x").is_err() {
        return false;
    }
    matches!(
        fsutil::clone_fd(&a, &b, &dir.join("(reflink probe)")),
        Ok(CloneMethod::Reflink)
    )
}

impl DirPool {
    /// Deletes a snapshot under the volume's lease, or for the running domain `domain`
    /// (under its operation lock, its QEMU holding the volume).
    async fn delete_snapshot_as(
        &self,
        volume: &str,
        snapshot: &str,
        domain: Option<&DomainRef>,
    ) -> Result<()> {
        check_name(NameOf::Snapshot, snapshot)?;
        let root = self.open_root()?;
        let path = root.join(volume);
        let vol = self.describe(&root, volume)?;
        let _l = delete_lock(&self.locks, Resource::file(&path), domain).await?;
        Self::clean_leftovers(&root, volume)?;
        match vol.format {
            VolFormat::Qcow2 if domain.is_some() => Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "volume {volume:?} is qcow2: its internal snapshots are deleted through QEMU (QMP) while a domain runs it"
                ),
            )),
            VolFormat::Qcow2 => {
                let list = qcow2_snapshots(root.open_file(volume, false)?, &path, volume)?;
                find_snapshot(list, volume, snapshot)?;
                let f = root.open_file(volume, true)?;
                let op = SnapshotOp::Delete(by_name(snapshot));
                self.blocking
                    .run(move || image::snapshot_file(f, &path, &op, &SystemClock).map(drop))
                    .await
            }
            VolFormat::Raw => {
                find_listed(Self::raw_snapshots(&root, volume)?, volume, snapshot)?;
                let dir = Self::snap_dir(&root, volume, false)?
                    .ok_or_else(|| no_snapshot(volume, snapshot))?;
                dir.unlink(snapshot)?;
                dir.sync()?;
                Self::drop_empty_snap_dir(&root, volume);
                Ok(())
            }
        }
    }
}
