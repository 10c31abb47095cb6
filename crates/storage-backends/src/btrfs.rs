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
//! Revert: `btrfs subvolume snapshot SNAP .NAME.revert` (a writable snapshot of the
//! snapshot), then one `renameat2(RENAME_EXCHANGE)` swaps it with the volume (atomic: a VM
//! started at any moment sees the old or the new volume, never none), then the old volume is
//! deleted. The snapshot is kept.

use crate::dir::{check_spec, create_qcow2, exists, probe_file};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;
use crate::lease::lease;
use crate::model::*;
use crate::name::{check_name, NameOf};
use crate::reverter::Reverter;
use crate::runner::{argv, run_ok, CommandRunner};
use crate::{blocking, find_snapshot, Backend};
use async_trait::async_trait;
use locking::{LockManager, Resource, UuidKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Directory of snapshots under a btrfs pool's target.
pub const SNAPSHOT_DIR: &str = ".snapshots";

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

/// `YYYY-MM-DD HH:MM:SS` read as UTC, in seconds since the epoch.
pub fn parse_time_utc(s: &str) -> Option<i64> {
    let (d, t) = s.trim().split_once(' ')?;
    let mut dp = d.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (dp.next()??, dp.next()??, dp.next()??);
    let mut tp = t
        .split(' ')
        .next()?
        .split(':')
        .map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (tp.next()??, tp.next()??, tp.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut secs = days * 86400 + hh * 3600 + mm * 60 + ss;
    // An offset like "+0100" (lvs, btrfs show) when present.
    if let Some(off) = t.split(' ').nth(1) {
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let digits = off.trim_start_matches(['+', '-']);
        if digits.len() == 4 {
            let h: i64 = digits[..2].parse().ok()?;
            let mi: i64 = digits[2..].parse().ok()?;
            secs -= sign * (h * 3600 + mi * 60);
        }
    }
    Some(secs)
}

/// A btrfs pool.
#[derive(Debug)]
pub struct BtrfsPool {
    def: PoolDef,
    root: PathBuf,
    runner: Arc<dyn CommandRunner>,
    locks: LockManager,
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
        })
    }

    fn subvol(&self, name: &str) -> Result<PathBuf> {
        check_name(NameOf::Volume, name)?;
        Ok(self.root.join(name))
    }

    fn snap_path(&self, volume: &str, snapshot: &str) -> Result<PathBuf> {
        check_name(NameOf::Snapshot, snapshot)?;
        Ok(self.root.join(SNAPSHOT_DIR).join(volume).join(snapshot))
    }

    /// The volume file inside subvolume `sv`, and its format.
    fn vol_file(sv: &Path) -> Option<(PathBuf, VolFormat)> {
        [VolFormat::Raw, VolFormat::Qcow2]
            .into_iter()
            .map(|f| (sv.join(format!("volume.{}", f.as_str())), f))
            .find(|(p, _)| p.is_file())
    }

    fn describe(&self, name: &str) -> Result<(Volume, Resource)> {
        let sv = self.subvol(name)?;
        let not_found = || {
            Error::new(
                ErrorKind::NotFound,
                format!("pool {:?} has no volume {name:?}", self.def.name),
            )
        };
        if !fsutil::is_subvolume(&sv) {
            return Err(not_found());
        }
        let (file, _) = Self::vol_file(&sv).ok_or_else(not_found)?;
        let info = fsutil::subvol_info(&sv)?;
        let (format, capacity, backing) = probe_file(&file)?;
        use std::os::unix::fs::MetadataExt;
        let res = Resource::Uuid {
            kind: UuidKind::BtrfsSubvolume,
            uuid: info.uuid.clone(),
            display: format!("{} ({})", file.display(), info.uuid),
            image: Some(file.clone()),
        };
        Ok((
            Volume {
                name: name.to_string(),
                pool: self.def.name.clone(),
                path: file.display().to_string(),
                format,
                capacity,
                allocation: std::fs::metadata(&file).ok().map(|m| m.blocks() * 512),
                backing,
                key: info.uuid,
            },
            res,
        ))
    }

    async fn btrfs(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["btrfs"];
        a.extend_from_slice(args);
        run_ok(self.runner.as_ref(), &argv(a)).await.map(|_| ())
    }

    async fn delete_subvol(&self, p: &Path) -> Result<()> {
        self.btrfs(&["subvolume", "delete", &p.display().to_string()])
            .await
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
        }
    }

    async fn info(&self) -> Result<PoolInfo> {
        let (capacity, allocation, available) = fsutil::fs_space(&self.root)?;
        Ok(PoolInfo {
            name: self.def.name.clone(),
            kind: self.def.kind,
            target: self.def.target.clone(),
            capacity,
            allocation,
            available,
            capabilities: self.capabilities(),
        })
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>> {
        let rd = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("read {}", self.root.display()), e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("read {}", self.root.display()), e))?;
            let n = ent.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') || check_name(NameOf::Volume, &n).is_err() {
                continue;
            }
            if let Ok((v, _)) = self.describe(&n) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn volume(&self, name: &str) -> Result<Volume> {
        self.describe(name).map(|(v, _)| v)
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        check_spec(spec)?;
        let sv = self.subvol(&spec.name)?;
        let file = sv.join(format!("volume.{}", spec.format.as_str()));
        let _l = lease(&self.locks, "volume create", Resource::file(&file)).await?;
        if sv.exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "pool {:?} already has a volume {:?}",
                    self.def.name, spec.name
                ),
            ));
        }
        let mut rev = Reverter::new();
        let svs = sv.display().to_string();
        if let Err(e) = self.btrfs(&["subvolume", "create", &svs]).await {
            return Err(rev.fail(e).await);
        }
        rev.add(format!("delete subvolume {svs}"), self.delete_subvol(&sv));
        let made = match spec.format {
            VolFormat::Raw => {
                let f = file.clone();
                let cap = spec.capacity;
                blocking(move || {
                    let fh = std::fs::File::create_new(&f)
                        .map_err(|e| Error::io(format!("create {}", f.display()), e))?;
                    fh.set_len(cap)
                        .map_err(|e| Error::io(format!("size {}", f.display()), e))
                })
                .await
            }
            VolFormat::Qcow2 => create_qcow2(&file, spec).await,
        };
        if let Err(e) = made {
            return Err(rev.fail(e).await);
        }
        rev.success();
        self.describe(&spec.name).map(|(v, _)| v)
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let (_, res) = self.describe(name)?;
        let _l = lease(&self.locks, "volume delete", res).await?;
        // Deletions cannot be undone: a failure part way says what is already gone.
        let mut rev = Reverter::new();
        for s in self.list_snapshots(name).await? {
            let p = self.snap_path(name, &s.name)?;
            if let Err(e) = self.delete_subvol(&p).await {
                return Err(rev.fail(e).await);
            }
            rev.add_irreversible(format!("the deletion of snapshot {}", p.display()));
        }
        let _ = std::fs::remove_dir(self.root.join(SNAPSHOT_DIR).join(name));
        let _ = std::fs::remove_dir(self.root.join(SNAPSHOT_DIR));
        if let Err(e) = self.delete_subvol(&self.subvol(name)?).await {
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
        let dst = self.snap_path(volume, snapshot)?;
        let (_, res) = self.describe(volume)?;
        let _l = lease(&self.locks, "volume snapshot create", res).await?;
        if dst.exists() {
            return Err(exists(volume, snapshot));
        }
        let parent = dst.parent().expect("snapshot path has a parent");
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        let src = self.subvol(volume)?;
        self.btrfs(&[
            "subvolume",
            "snapshot",
            "-r",
            &src.display().to_string(),
            &dst.display().to_string(),
        ])
        .await?;
        let info = fsutil::subvol_info(&dst)?;
        Ok(VolSnapshot {
            name: snapshot.to_string(),
            volume: volume.to_string(),
            kind: SnapshotKind::BtrfsSubvolume,
            created: Some(info.otime),
            size: Self::vol_file(&dst)
                .and_then(|(p, _)| std::fs::metadata(p).ok().map(|m| m.len())),
            valid: true,
            usage_percent: None,
        })
    }

    async fn list_snapshots(&self, volume: &str) -> Result<Vec<VolSnapshot>> {
        self.describe(volume)?;
        let dir = self.root.join(SNAPSHOT_DIR).join(volume);
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let out = run_ok(
            self.runner.as_ref(),
            &argv([
                "btrfs",
                "subvolume",
                "list",
                "-s",
                "-o",
                &dir.display().to_string(),
            ]),
        )
        .await?;
        let mut v = Vec::new();
        for e in parse_subvolume_list(&out.stdout_str())? {
            // Paths are relative to the filesystem's top level: match on the last two parts.
            let mut parts = e.path.rsplitn(3, '/');
            let (name, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if parent != volume || name.starts_with('.') {
                continue;
            }
            let p = dir.join(name);
            let info = fsutil::subvol_info(&p).ok();
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
                    size: Self::vol_file(&p)
                        .and_then(|(f, _)| std::fs::metadata(f).ok().map(|m| m.len())),
                    valid: info.is_none_or(|i| i.readonly),
                    usage_percent: None,
                },
            ));
        }
        // Oldest first; subvolume ids break ties within a second (they only grow).
        v.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
        Ok(v.into_iter().map(|(_, s)| s).collect())
    }

    async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let snap = self.snap_path(volume, snapshot)?;
        let (_, res) = self.describe(volume)?;
        let _l = lease(&self.locks, "volume snapshot revert", res).await?;
        if !fsutil::is_subvolume(&snap) {
            return Err(crate::no_snapshot(volume, snapshot));
        }
        let cur = self.subvol(volume)?;
        let new = self.root.join(format!(".{volume}.revert"));
        let (news, snaps) = (new.display().to_string(), snap.display().to_string());
        let mut rev = Reverter::new();
        if let Err(e) = self.btrfs(&["subvolume", "snapshot", &snaps, &news]).await {
            return Err(rev.fail(e).await);
        }
        rev.add(format!("delete subvolume {news}"), self.delete_subvol(&new));
        if let Err(e) = fsutil::rename_exchange(&new, &cur) {
            return Err(rev.fail(e).await);
        }
        let (a, b) = (new.clone(), cur.clone());
        rev.add(
            format!("swap {} back with {}", cur.display(), new.display()),
            async move { fsutil::rename_exchange(&a, &b) },
        );
        // `new` now holds the old volume.
        if let Err(e) = self.delete_subvol(&new).await {
            return Err(rev.fail(e).await);
        }
        rev.success();
        Ok(())
    }

    async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let snap = self.snap_path(volume, snapshot)?;
        let (_, res) = self.describe(volume)?;
        let _l = lease(&self.locks, "volume snapshot delete", res).await?;
        find_snapshot(self.list_snapshots(volume).await?, volume, snapshot)?;
        self.delete_subvol(&snap).await?;
        let _ = std::fs::remove_dir(snap.parent().expect("parent"));
        let _ = std::fs::remove_dir(self.root.join(SNAPSHOT_DIR));
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
