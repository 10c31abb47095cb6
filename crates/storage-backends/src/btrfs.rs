//! btrfs pools: each volume in its own subvolume, snapshots as read-only subvolume
//! snapshots.
//!
//! Layout under the pool's target directory (on btrfs):
//! - `NAME/` a subvolume holding the volume file `volume.raw` or `volume.qcow2`;
//! - `.snapshots/NAME/SNAP/` read-only snapshots of it.
//!
//! Commands (through the [`CommandRunner`]): `btrfs subvolume create|snapshot [-r]|delete`,
//! `btrfs subvolume list -s -o DIR` (snapshot names and creation times). Subvolume UUIDs
//! (the lease key) and exact creation times are read with the `BTRFS_IOC_GET_SUBVOL_INFO`
//! ioctl, without a process.
//!
//! Revert: `btrfs subvolume snapshot SNAP .snapshots/NAME/.vs-revert` (a writable snapshot
//! of the snapshot; the destination never exists: btrfs-progs would snapshot *into* an
//! existing directory), then one `renameat2(RENAME_EXCHANGE)` swaps it with the volume
//! (atomic: a VM started at any moment sees the old or the new volume, never none), then the
//! old volume, now `.vs-revert`, is deleted. The snapshot is kept. Killed at any step, the
//! volume is the old or the new one, and the next operation on it deletes `.vs-revert`.
//!
//! Files and directories are reached through directory descriptors that never follow a
//! symlink ([`crate::pooldir`]); the paths handed to `btrfs` are checked level by level just
//! before. Hidden entries of `.snapshots/NAME/` are temporaries of operations on NAME: the
//! next operation on NAME (holding its lease) removes them.

use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;
use crate::lease::{delete_lock, for_domain, key_string, lease};
use crate::model::*;
use crate::name::{check_name, NameOf};
use crate::pooldir::{self, shown_name, symlink_error, utf8_name, DirFd, EntryKind};
use crate::reverter::Reverter;
use crate::runner::{run_ok, CommandRunner, ToolCmd};
use crate::util::{exists, failpoint, find_listed, no_snapshot};
use crate::volfile::{check_spec, count_leftovers, create_file, not_a_pool_volume, probe};
use crate::{Backend, Blocking};
use async_trait::async_trait;
use locking::{LockManager, Resource};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

/// Directory of snapshots under a btrfs pool's target.
pub const SNAPSHOT_DIR: &str = crate::volfile::SNAPSHOT_DIR;

/// One line of `btrfs subvolume list -s` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    /// Subvolume id.
    pub id: u64,
    /// Creation time as printed (`YYYY-MM-DD HH:MM:SS`, the host's local time).
    pub otime: Option<String>,
    /// Path relative to the filesystem's top level.
    pub path: String,
}

/// Parse `btrfs subvolume list [-s] [-o]` output (btrfs-progs 5.x/6.x):
/// `ID 257 gen 7 cgen 7 top level 5 otime 2026-11-27 09:52:50 path .snapshots/vol1/s1`.
/// The path is everything after ` path ` (it may contain spaces).
pub fn parse_subvolume_list(out: &str) -> Result<Vec<ListEntry>> {
    let mut v = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || {
            Error::new(
                ErrorKind::ToolFailed,
                format!("unexpected `btrfs subvolume list` line: {line:?}"),
            )
        };
        let rest = line.strip_prefix("ID ").ok_or_else(bad)?;
        let id: u64 = rest
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let (head, path) = line.split_once(" path ").ok_or_else(bad)?;
        let otime = head
            .split_once(" otime ")
            .map(|(_, t)| t.trim().to_string());
        v.push(ListEntry {
            id,
            otime,
            path: path.to_string(),
        });
    }
    Ok(v)
}

/// `YYYY-MM-DD HH:MM:SS` (an optional `+HHMM` offset) read as UTC (shared with the LVM
/// backend's `lvs` times).
pub use crate::util::parse_time_utc;

/// A btrfs pool.
#[derive(Debug)]
pub struct BtrfsPool {
    def: PoolDef,
    root: PathBuf,
    runner: Arc<dyn CommandRunner>,
    locks: LockManager,
    blocking: Blocking,
}

/// A revert's new volume being made, in `.snapshots/VOL/`.
const REVERT_TMP: &str = ".vs-revert";

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Whether the directory open as `d` is a subvolume's root (inode 256 on btrfs).
fn is_subvol(d: &DirFd) -> bool {
    d.stat_self().is_ok_and(|s| s.ino == 256)
}

impl BtrfsPool {
    /// Open a btrfs pool (its target must be a directory on btrfs).
    pub fn new(
        def: PoolDef,
        runner: Arc<dyn CommandRunner>,
        locks: LockManager,
    ) -> Result<BtrfsPool> {
        let root = PathBuf::from(&def.target);
        if !root.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("pool {:?}: {} is not a directory", def.name, root.display()),
            ));
        }
        DirFd::open_root(&root).map_err(|e| e.context(format!("pool {:?}", def.name)))?;
        if !fsutil::is_btrfs(&root)? {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("pool {:?}: {} is not on btrfs", def.name, root.display()),
            ));
        }
        Ok(BtrfsPool {
            def,
            root,
            runner,
            locks,
            blocking: Blocking::default(),
        })
    }

    /// Run the blocking file work (volume file creation) as `b` says (default:
    /// [`Blocking::SpawnBlocking`]).
    pub fn with_blocking(mut self, b: Blocking) -> BtrfsPool {
        self.blocking = b;
        self
    }

    fn open_root(&self) -> Result<DirFd> {
        DirFd::open_root(&self.root)
    }

    fn not_found(&self, name: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!("pool {:?} has no volume {name:?}", self.def.name),
        )
    }

    /// The volume's subvolume `NAME/`, checked: not a symlink, a subvolume.
    fn open_subvol(&self, root: &DirFd, name: &str) -> Result<DirFd> {
        check_name(NameOf::Volume, name)?;
        match root.stat(name)? {
            None => return Err(self.not_found(name)),
            Some(s) if s.kind == EntryKind::Symlink => return Err(symlink_error(&root.join(name))),
            Some(s) if s.kind != EntryKind::Dir => return Err(self.not_found(name)),
            Some(_) => {}
        }
        let d = root.open_dir(name)?.ok_or_else(|| self.not_found(name))?;
        if !is_subvol(&d) {
            return Err(self.not_found(name));
        }
        Ok(d)
    }

    /// The volume file inside subvolume `sv`, and its format (a symlink is an error).
    fn vol_file(sv: &DirFd) -> Result<Option<(String, VolFormat)>> {
        for f in [VolFormat::Raw, VolFormat::Qcow2] {
            let n = format!("volume.{}", f.as_str());
            match sv.stat(&n)? {
                Some(s) if s.kind == EntryKind::File => return Ok(Some((n, f))),
                Some(s) if s.kind == EntryKind::Symlink => return Err(symlink_error(&sv.join(&n))),
                _ => {}
            }
        }
        Ok(None)
    }

    fn describe(&self, root: &DirFd, name: &str) -> Result<(Volume, Resource)> {
        let sv = self.open_subvol(root, name)?;
        let (fname, _) = Self::vol_file(&sv)?.ok_or_else(|| self.not_found(name))?;
        let file = sv.join(&fname);
        let (format, capacity, backing) = probe(sv.open_file(&fname, false)?, &file)?;
        let allocation = sv.stat(&fname)?.map(|s| s.allocated);
        let res = Self::resource(root, name, format);
        Ok((
            Volume {
                name: name.to_string(),
                pool: self.def.name.clone(),
                path: file.display().to_string(),
                format,
                capacity,
                allocation,
                backing,
                key: key_string(&res),
            },
            res,
        ))
    }

    /// The lease resource of volume `name` (of format `format`): its pool-relative identity,
    /// the subvolume directory `TARGET/NAME`, whatever subvolume (UUID) is there now; the
    /// volume file is where QEMU's image locks live.
    fn resource(root: &DirFd, name: &str, format: VolFormat) -> Resource {
        let dir = root.join(name);
        Resource::Subvolume {
            image: dir.join(format!("volume.{}", format.as_str())),
            dir,
        }
    }

    /// Take the read-only snapshot `.snapshots/VOL/SNAP` of `volume` (the caller holds
    /// what protects the volume and has removed leftovers).
    async fn snapshot_subvol(
        &self,
        root: &DirFd,
        volume: &str,
        snapshot: &str,
    ) -> Result<VolSnapshot> {
        let dir = Self::snap_dir(root, volume, true)?.expect("created");
        match dir.stat(snapshot)? {
            Some(s) if s.kind == EntryKind::Symlink => {
                return Err(symlink_error(&dir.join(snapshot)))
            }
            Some(_) => return Err(exists(volume, snapshot)),
            None => {}
        }
        let src = self.open_subvol(root, volume)?;
        let dst = dir.join(snapshot);
        let r = self
            .btrfs(ToolCmd::BtrfsSnapshot {
                src: src.path().to_path_buf(),
                dst,
                readonly: true,
            })
            .await;
        if let Err(e) = r {
            Self::drop_empty_snap_dir(root, volume);
            return Err(e);
        }
        let sd = Self::open_snap(&dir, volume, snapshot)?;
        let info = fsutil::subvol_info_fd(sd.fd(), sd.path())?;
        let size = match Self::vol_file(&sd)? {
            Some((f, _)) => sd.stat(&f)?.map(|s| s.len),
            None => None,
        };
        Ok(VolSnapshot {
            name: snapshot.to_string(),
            volume: volume.to_string(),
            kind: SnapshotKind::BtrfsSubvolume,
            created: Some(info.otime),
            size,
            valid: true,
            usage_percent: None,
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

    /// Remove `.snapshots/VOL` and `.snapshots` if they are empty.
    fn drop_empty_snap_dir(root: &DirFd, volume: &str) {
        if let Ok(Some(s)) = root.open_dir(SNAPSHOT_DIR) {
            s.rmdir_if_empty(volume);
        }
        root.rmdir_if_empty(SNAPSHOT_DIR);
    }

    /// The snapshot `snapshot` of `dir` (`.snapshots/VOL`), checked: not a symlink, a
    /// subvolume.
    fn open_snap(dir: &DirFd, volume: &str, snapshot: &str) -> Result<DirFd> {
        check_name(NameOf::Snapshot, snapshot)?;
        match dir.stat(snapshot)? {
            Some(s) if s.kind == EntryKind::Symlink => Err(symlink_error(&dir.join(snapshot))),
            Some(s) if s.kind == EntryKind::Dir => match dir.open_dir(snapshot)? {
                Some(d) if is_subvol(&d) => Ok(d),
                _ => Err(no_snapshot(volume, snapshot)),
            },
            _ => Err(no_snapshot(volume, snapshot)),
        }
    }

    async fn btrfs(&self, cmd: ToolCmd) -> Result<()> {
        run_ok(self.runner.as_ref(), &cmd).await.map(|_| ())
    }

    async fn delete_subvol(&self, p: &Path) -> Result<()> {
        self.btrfs(ToolCmd::BtrfsSubvolumeDelete {
            path: p.to_path_buf(),
        })
        .await
    }

    /// Remove `name` of `dir` whatever it is: a subvolume (with any subvolumes nested in it,
    /// e.g. an older version's revert that snapshotted *into* its leftover), a directory or a
    /// file. Links are never followed.
    fn remove_any<'a>(&'a self, dir: &'a DirFd, name: String) -> Fut<'a, ()> {
        Box::pin(async move {
            let Some(st) = dir.stat(&name)? else {
                return Ok(());
            };
            if st.kind != EntryKind::Dir {
                return dir.unlink(&name);
            }
            let Some(d) = dir.open_dir(&name)? else {
                return Ok(());
            };
            for e in d.entries()? {
                let Some(n) = e.to_str() else { continue };
                if d.stat(n)?.is_some_and(|s| s.kind == EntryKind::Dir) {
                    self.remove_any(&d, n.to_string()).await?;
                }
            }
            if is_subvol(&d) {
                self.delete_subvol(&dir.join(&name)).await
            } else {
                dir.remove_tree(&name).map(|_| ())
            }
        })
    }

    /// Remove what dead operations on `volume` left (the caller holds its lease): hidden
    /// entries of `.snapshots/VOL/` and an older version's `.VOL.revert` in the target.
    async fn clean_leftovers(&self, root: &DirFd, volume: &str) -> Result<()> {
        for e in root.entries()? {
            if let Some(n) = e
                .to_str()
                .filter(|n| pooldir::is_legacy_root_temp(n, volume))
            {
                tracing::info!(
                    "removing {} (left by an interrupted operation)",
                    root.join(n).display()
                );
                self.remove_any(root, n.to_string()).await?;
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
                    self.remove_any(&d, n.to_string()).await?;
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

    /// The names in `.snapshots/VOL/` that are not temporaries; a symlink or a non-UTF-8
    /// name is rejected.
    fn snapshot_names(dir: &DirFd) -> Result<Listing<String>> {
        let mut l = Listing::default();
        for e in dir.entries()? {
            let n = match utf8_name(dir.path(), &e) {
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
            if dir.stat(&n)?.is_some_and(|s| s.kind == EntryKind::Symlink) {
                l.rejected.push(RejectedEntry {
                    error: symlink_error(&dir.join(&n)),
                    name: n,
                });
                continue;
            }
            l.items.push(n);
        }
        Ok(l)
    }

    /// The backing volume of `spec` resolved in this pool (`NAME/volume.FMT` of one of its
    /// volumes); the spec with the capacity filled in.
    fn resolve_backing(&self, root: &DirFd, spec: &VolumeSpec) -> Result<VolumeSpec> {
        let mut spec = spec.clone();
        if let Some(b) = &spec.backing {
            let bad = || not_a_pool_volume(&self.def.name, &b.path);
            let rel = Path::new(&b.path)
                .strip_prefix(&self.root)
                .map_err(|_| bad())?;
            let name = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .ok_or_else(bad)?;
            let (v, _) = self.describe(root, name).map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::new(
                    ErrorKind::NotFound,
                    format!("backing volume {} does not exist", b.path),
                ),
                _ => e.context(format!("backing volume {}", b.path)),
            })?;
            if Path::new(&v.path) != Path::new(&b.path) {
                return Err(bad());
            }
            if spec.capacity == 0 {
                spec.capacity = v.capacity;
            }
        }
        Ok(spec)
    }
}

#[async_trait]
impl Backend for BtrfsPool {
    fn def(&self) -> &PoolDef {
        &self.def
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            raw: true,
            qcow2: true,
            snapshots: true,
            revert: true,
            space_efficient_snapshots: true,
            sized_snapshots: false,
            thin: false,
            atomic_revert: true,
            open_volume_snapshots: &[SnapshotKind::BtrfsSubvolume],
        }
    }

    async fn info(&self) -> Result<PoolInfo> {
        let root = self.open_root()?;
        let (capacity, allocation, available) = fsutil::fs_space(&self.root)?;
        let (leftovers, leftover_bytes) = count_leftovers(&root)?;
        Ok(PoolInfo {
            name: self.def.name.clone(),
            kind: self.def.kind,
            target: self.def.target.clone(),
            capacity,
            allocation,
            available,
            capabilities: self.capabilities(),
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
            if n.starts_with('.') || check_name(NameOf::Volume, &n).is_err() {
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
                Some(s) if s.kind == EntryKind::Dir => {}
                _ => continue,
            }
            match self.describe(&root, &n) {
                Ok((v, _)) => l.items.push(v),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(error) => l.rejected.push(RejectedEntry { name: n, error }),
            }
        }
        l.items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(l)
    }

    async fn volume(&self, name: &str) -> Result<Volume> {
        self.describe(&self.open_root()?, name).map(|(v, _)| v)
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        check_spec(spec)?;
        let root = self.open_root()?;
        let spec = self.resolve_backing(&root, spec)?;
        let sv = root.join(&spec.name);
        let fname = format!("volume.{}", spec.format.as_str());
        let res = Self::resource(&root, &spec.name, spec.format);
        let _l = lease(&self.locks, "volume create", res).await?;
        match root.stat(&spec.name)? {
            Some(s) if s.kind == EntryKind::Symlink => return Err(symlink_error(&sv)),
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
        self.clean_leftovers(&root, &spec.name).await?;
        let mut rev = Reverter::new();
        let svs = sv.display().to_string();
        let create = ToolCmd::BtrfsSubvolumeCreate { path: sv.clone() };
        if let Err(e) = self.btrfs(create).await {
            return Err(rev.fail(e).await);
        }
        rev.add(format!("delete subvolume {svs}"), self.delete_subvol(&sv));
        let made = match self.open_subvol(&root, &spec.name) {
            Ok(d) => {
                let s = spec.clone();
                self.blocking.run(move || create_file(&d, &fname, &s)).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            return Err(rev.fail(e).await);
        }
        rev.success();
        self.describe(&root, &spec.name).map(|(v, _)| v)
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let root = self.open_root()?;
        let (_, res) = self.describe(&root, name)?;
        let _l = lease(&self.locks, "volume delete", res).await?;
        self.clean_leftovers(&root, name).await?;
        // Everything is checked (no symlink anywhere) before anything is deleted.
        let dir = Self::snap_dir(&root, name, false)?;
        let names = match &dir {
            Some(d) => Self::snapshot_names(d)?.strict()?,
            None => Vec::new(),
        };
        // Deletions cannot be undone: a failure part way says what is already gone.
        let mut rev = Reverter::new();
        if let Some(d) = &dir {
            for s in names {
                let p = d.join(&s);
                let is_snap = d.open_dir(&s)?.is_some_and(|sd| is_subvol(&sd));
                if !is_snap {
                    continue;
                }
                if let Err(e) = self.delete_subvol(&p).await {
                    return Err(rev.fail(e).await);
                }
                rev.add_irreversible(format!("the deletion of snapshot {}", p.display()));
                failpoint("btrfs-delete-snapshot-gone");
            }
            Self::drop_empty_snap_dir(&root, name);
        }
        self.open_subvol(&root, name)?;
        if let Err(e) = self.delete_subvol(&root.join(name)).await {
            return Err(rev.fail(e).await);
        }
        rev.success();
        Ok(())
    }

    async fn create_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        _opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        check_name(NameOf::Snapshot, snapshot)?;
        let root = self.open_root()?;
        let (_, res) = self.describe(&root, volume)?;
        let _l = lease(&self.locks, "volume snapshot create", res).await?;
        self.clean_leftovers(&root, volume).await?;
        self.snapshot_subvol(&root, volume, snapshot).await
    }

    async fn lease_resource(&self, volume: &str) -> Result<Resource> {
        self.describe(&self.open_root()?, volume).map(|(_, r)| r)
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
        let (_, res) = self.describe(&root, volume)?;
        let op = "volume snapshot create (for a domain)";
        let _l = for_domain(&self.locks, op, res, domain)?;
        // The domain's QEMU holds the volume's exclusive lease and we hold the domain's
        // operation lock: nothing else works on this volume, so a temporary is a leftover.
        self.clean_leftovers(&root, volume).await?;
        self.snapshot_subvol(&root, volume, snapshot).await
    }

    async fn snapshot_listing(&self, volume: &str) -> Result<Listing<VolSnapshot>> {
        let root = self.open_root()?;
        self.describe(&root, volume)?;
        let Some(dir) = Self::snap_dir(&root, volume, false)? else {
            return Ok(Listing::default());
        };
        let Listing {
            items: names,
            rejected,
        } = Self::snapshot_names(&dir)?;
        let out = run_ok(
            self.runner.as_ref(),
            &ToolCmd::BtrfsSnapshotList {
                dir: dir.path().to_path_buf(),
            },
        )
        .await?;
        let mut v = Vec::new();
        for e in parse_subvolume_list(&out.stdout_str())? {
            // Paths are relative to the filesystem's top level: match on the last two parts.
            let mut parts = e.path.rsplitn(3, '/');
            let (name, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if parent != volume || name.starts_with('.') || !names.iter().any(|n| n == name) {
                continue;
            }
            let Ok(sd) = Self::open_snap(&dir, volume, name) else {
                continue;
            };
            let info = fsutil::subvol_info_fd(sd.fd(), sd.path()).ok();
            let size = match Self::vol_file(&sd)? {
                Some((f, _)) => sd.stat(&f)?.map(|s| s.len),
                None => None,
            };
            v.push((
                e.id,
                VolSnapshot {
                    name: name.to_string(),
                    volume: volume.to_string(),
                    kind: SnapshotKind::BtrfsSubvolume,
                    created: info
                        .as_ref()
                        .map(|i| i.otime)
                        .or_else(|| e.otime.as_deref().and_then(parse_time_utc)),
                    size,
                    valid: info.is_none_or(|i| i.readonly),
                    usage_percent: None,
                },
            ));
        }
        // Oldest first; subvolume ids break ties within a second (they only grow).
        v.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
        Ok(Listing {
            items: v.into_iter().map(|(_, s)| s).collect(),
            rejected,
        })
    }

    async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        check_name(NameOf::Snapshot, snapshot)?;
        let root = self.open_root()?;
        let (_, res) = self.describe(&root, volume)?;
        let _l = lease(&self.locks, "volume snapshot revert", res).await?;
        // First remove what an interrupted revert left (`.vs-revert`): the destination of
        // the snapshot below must not exist.
        self.clean_leftovers(&root, volume).await?;
        let dir =
            Self::snap_dir(&root, volume, false)?.ok_or_else(|| no_snapshot(volume, snapshot))?;
        let snap = Self::open_snap(&dir, volume, snapshot)?;
        if dir.stat(REVERT_TMP)?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} exists and could not be removed",
                    dir.join(REVERT_TMP).display()
                ),
            ));
        }
        let new = dir.join(REVERT_TMP);
        let news = new.display().to_string();
        let mut rev = Reverter::new();
        let snapshot_cmd = ToolCmd::BtrfsSnapshot {
            src: snap.path().to_path_buf(),
            dst: new.clone(),
            readonly: false,
        };
        if let Err(e) = self.btrfs(snapshot_cmd).await {
            return Err(rev.fail(e).await);
        }
        rev.add(format!("delete subvolume {news}"), self.delete_subvol(&new));
        failpoint("btrfs-revert-snapshotted");
        if let Err(e) = dir.exchange(REVERT_TMP, &root, volume) {
            return Err(rev.fail(e).await);
        }
        let (d, r) = (&dir, &root);
        rev.add(
            format!("swap {} back with {news}", root.join(volume).display()),
            async move { d.exchange(REVERT_TMP, r, volume) },
        );
        failpoint("btrfs-revert-exchanged");
        // `.vs-revert` now holds the old volume.
        if let Err(e) = self.delete_subvol(&new).await {
            return Err(rev.fail(e).await);
        }
        rev.success();
        failpoint("btrfs-revert-deleted");
        Self::drop_empty_snap_dir(&root, volume);
        Ok(())
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

impl BtrfsPool {
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
        let (_, res) = self.describe(&root, volume)?;
        let _l = delete_lock(&self.locks, res, domain).await?;
        self.clean_leftovers(&root, volume).await?;
        find_listed(self.snapshot_listing(volume).await?, volume, snapshot)?;
        let dir =
            Self::snap_dir(&root, volume, false)?.ok_or_else(|| no_snapshot(volume, snapshot))?;
        Self::open_snap(&dir, volume, snapshot)?;
        self.delete_subvol(&dir.join(snapshot)).await?;
        Self::drop_empty_snap_dir(&root, volume);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_parsing() {
        assert_eq!(parse_time_utc("1970-01-02 00:00:01"), Some(86401));
        assert_eq!(
            parse_time_utc("2026-11-27 09:52:50 +0000"),
            Some(1795773170)
        );
        assert_eq!(
            parse_time_utc("2026-11-27 10:52:50 +0100"),
            Some(1795773170)
        );
        assert_eq!(parse_time_utc("garbage"), None);
    }
}
