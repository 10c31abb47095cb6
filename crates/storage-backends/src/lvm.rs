//! LVM (logical) pools: volumes are logical volumes of a volume group.
//!
//! - Volumes: linear LVs (`lvcreate -n NAME -L SIZEb VG`), or thin LVs in the pool's thin
//!   pool (`lvcreate -n NAME -V SIZEb --thinpool VG/TP`). Raw only.
//! - Snapshots are LVs named `VOL.SNAP` tagged `vs_snap` (volume names may not contain `.`,
//!   so the split is unambiguous): classic COW snapshots, sized (`-L`, default the volume's
//!   size, so they cannot overflow), of linear volumes; thin snapshots (no size, activation
//!   skipped) of thin volumes. All read-only (`-pr`).
//! - Listing: one `lvs --reportformat json --units b --nosuffix -o ... VG` (lvm2 2.03.16 has
//!   no `json_std`: every value is a string, numbers are parsed here). A COW snapshot whose
//!   COW area overflowed (`lv_attr[4] == 'I'`) is reported invalid and cannot be reverted to.
//! - Revert keeps the snapshot. Thin: a writable thin snapshot of the snapshot
//!   (`VOL.vs-revert`), `lvrename` the volume to `VOL.vs-old`, `lvrename` the new one to
//!   `VOL`, `lvremove` the old one; each step undone on failure. COW: LVM cannot snapshot a
//!   snapshot, so `lvconvert --merge VG/VOL.SNAP` (which consumes the snapshot; it cannot be
//!   undone) and a new COW snapshot `VOL.SNAP` of the same size is taken of the merged
//!   volume.
//! - The lease is keyed on the volume's identity `VG/NAME` (`lvm:VG/NAME`, the same for
//!   create and every later operation; not the UUID, which a thin revert changes); the device
//!   node `/dev/VG/LV` carries QEMU's image locks when the tools run on this host. A
//!   snapshot for a running domain (`create_snapshot_for_domain`) takes the same
//!   `lvcreate -s` under the domain's operation lock instead.
//!
//! Every tool runs through the [`CommandRunner`]: locally, recorded (golden argv), or in the
//! LVM test guest through the guest agent.

use crate::error::{Error, ErrorKind, Result};
use crate::lease::{delete_lock, for_domain, key_string, lease};
use crate::model::*;
use crate::name::{check_lvm_name, NameOf};
use crate::reverter::Reverter;
use crate::runner::{run_ok, CommandRunner, ToolCmd};
use crate::util::{exists, find_snapshot, no_snapshot};
use crate::Backend;
use async_trait::async_trait;
use locking::{LockManager, Resource};
use std::sync::Arc;

/// The tag on every snapshot LV this backend makes.
pub const SNAPSHOT_TAG: &str = "vs_snap";

/// The `lvs -o` fields read.
pub const LVS_FIELDS: &str =
    "lv_name,lv_uuid,lv_attr,lv_size,origin,pool_lv,segtype,snap_percent,data_percent,lv_time,lv_tags";

/// One row of `lvs` output.
#[derive(Debug, Clone, PartialEq)]
pub struct LvRow {
    /// LV name.
    pub name: String,
    /// LV UUID.
    pub uuid: String,
    /// The 10-character attribute string.
    pub attr: String,
    /// Size in bytes (a COW snapshot's: its COW area).
    pub size: u64,
    /// The origin LV of a snapshot.
    pub origin: Option<String>,
    /// The thin pool of a thin LV.
    pub pool_lv: Option<String>,
    /// Segment type (`linear`, `thin`, `thin-pool`, ...).
    pub segtype: String,
    /// COW snapshots: how full the COW area is.
    pub snap_percent: Option<f64>,
    /// Thin LVs: how much of the virtual size is mapped.
    pub data_percent: Option<f64>,
    /// Creation time as LVM prints it (`2026-11-27 10:01:02 +0000`).
    pub time: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
}

impl LvRow {
    fn attr_at(&self, i: usize) -> char {
        self.attr.chars().nth(i).unwrap_or('-')
    }
    /// A COW snapshot (attr\[0\] `s`; its segtype reads `linear`) that overflowed
    /// (attr\[4\] `I`) or is full.
    pub fn is_invalid_snapshot(&self) -> bool {
        self.attr_at(4) == 'I' || (self.attr_at(0) == 's' && self.snap_percent >= Some(100.0))
    }
    /// A thin LV.
    pub fn is_thin(&self) -> bool {
        self.segtype == "thin"
    }
    fn is_ours_snapshot(&self) -> bool {
        self.tags.iter().any(|t| t == SNAPSHOT_TAG)
    }
}

fn opt(v: &serde_json::Value, k: &str) -> Option<String> {
    v.get(k)
        .and_then(|x| x.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

fn num<T: std::str::FromStr>(v: &serde_json::Value, k: &str) -> Option<T> {
    match v.get(k)? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Number(n) => n.to_string().parse().ok(),
        _ => None,
    }
}

/// Parse `lvs --reportformat json --units b --nosuffix -o LVS_FIELDS` output (values are
/// strings in lvm2 2.03.16's `json`; numbers are accepted too, as `json_std` prints them).
pub fn parse_lvs(out: &str) -> Result<Vec<LvRow>> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::ToolFailed,
            format!("unexpected `lvs` JSON output ({why})"),
        )
    };
    let v: serde_json::Value = serde_json::from_str(out).map_err(|e| bad(&e.to_string()))?;
    let mut rows = Vec::new();
    let reports = v["report"].as_array().ok_or_else(|| bad("no report"))?;
    for r in reports {
        for lv in r["lv"].as_array().ok_or_else(|| bad("no lv list"))? {
            rows.push(LvRow {
                name: opt(lv, "lv_name").ok_or_else(|| bad("lv without a name"))?,
                uuid: opt(lv, "lv_uuid").unwrap_or_default(),
                attr: opt(lv, "lv_attr").unwrap_or_default(),
                size: num(lv, "lv_size").unwrap_or(0),
                origin: opt(lv, "origin"),
                pool_lv: opt(lv, "pool_lv"),
                segtype: opt(lv, "segtype").unwrap_or_default(),
                snap_percent: num(lv, "snap_percent"),
                data_percent: num(lv, "data_percent"),
                time: opt(lv, "lv_time"),
                tags: opt(lv, "lv_tags")
                    .map(|t| t.split(',').map(String::from).collect())
                    .unwrap_or_default(),
            });
        }
    }
    Ok(rows)
}

/// (size, free) in bytes from `vgs --reportformat json --units b --nosuffix -o
/// vg_name,vg_size,vg_free VG`.
pub fn parse_vgs(out: &str) -> Result<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(out).map_err(|e| {
        Error::new(
            ErrorKind::ToolFailed,
            format!("unexpected `vgs` output: {e}"),
        )
    })?;
    let vg = &v["report"][0]["vg"][0];
    match (num(vg, "vg_size"), num(vg, "vg_free")) {
        (Some(s), Some(f)) => Ok((s, f)),
        _ => Err(Error::new(ErrorKind::ToolFailed, "unexpected `vgs` output")),
    }
}

/// An LVM pool on a volume group.
#[derive(Debug)]
pub struct LvmPool {
    def: PoolDef,
    vg: String,
    runner: Arc<dyn CommandRunner>,
    locks: LockManager,
}

impl LvmPool {
    /// Open an LVM pool (the volume group is checked by the first command).
    pub fn new(
        def: PoolDef,
        runner: Arc<dyn CommandRunner>,
        locks: LockManager,
    ) -> Result<LvmPool> {
        check_lvm_name(NameOf::Pool, &def.target).map_err(|e| e.context("volume group"))?;
        Ok(LvmPool {
            vg: def.target.clone(),
            def,
            runner,
            locks,
        })
    }

    async fn tool(&self, cmd: ToolCmd) -> Result<String> {
        run_ok(self.runner.as_ref(), &cmd)
            .await
            .map(|o| o.stdout_str())
    }

    /// Every LV of the volume group.
    pub async fn lvs(&self) -> Result<Vec<LvRow>> {
        let out = self
            .tool(ToolCmd::Lvs {
                vg: self.vg.clone(),
            })
            .await?;
        parse_lvs(&out)
    }

    fn is_volume(lv: &LvRow) -> bool {
        !lv.name.starts_with('[')
            && !lv.name.contains('.')
            && !lv.is_ours_snapshot()
            && !matches!(lv.attr_at(0), 't' | 's' | 'S' | 'e' | 'd')
    }

    fn to_volume(&self, lv: &LvRow) -> Volume {
        Volume {
            name: lv.name.clone(),
            pool: self.def.name.clone(),
            path: format!("/dev/{}/{}", self.vg, lv.name),
            format: VolFormat::Raw,
            capacity: lv.size,
            allocation: match lv.data_percent {
                Some(p) if lv.is_thin() => Some((lv.size as f64 * p / 100.0) as u64),
                _ => Some(lv.size),
            },
            backing: None,
            key: key_string(&self.resource(&lv.name)),
        }
    }

    /// The lease resource of volume `name`: its pool-relative identity `VG/NAME` (not the
    /// LV's UUID: a thin revert renames another LV into the name), with the device node as
    /// QEMU's image when the tools run on this host.
    fn resource(&self, name: &str) -> Resource {
        Resource::LogicalVolume {
            vg: self.vg.clone(),
            lv: name.to_string(),
            image: self
                .runner
                .is_local()
                .then(|| format!("/dev/{}/{}", self.vg, name).into()),
        }
    }

    fn find_volume(&self, lvs: &[LvRow], name: &str) -> Result<LvRow> {
        check_lvm_name(NameOf::Volume, name)?;
        lvs.iter()
            .find(|l| l.name == name && Self::is_volume(l))
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "pool {:?} (VG {}) has no volume {name:?}",
                        self.def.name, self.vg
                    ),
                )
            })
    }

    /// The LV of `volume`'s snapshot `snapshot`, or [`ErrorKind::NotFound`].
    fn find_snapshot_lv(
        &self,
        lvs: &[LvRow],
        volume: &str,
        snapshot: &str,
    ) -> Result<(LvRow, VolSnapshot)> {
        self.snapshots_of(lvs, volume)
            .into_iter()
            .find(|(_, s)| s.name == snapshot)
            .ok_or_else(|| no_snapshot(volume, snapshot))
    }

    fn snapshots_of(&self, lvs: &[LvRow], volume: &str) -> Vec<(LvRow, VolSnapshot)> {
        let prefix = format!("{volume}.");
        let mut v: Vec<(LvRow, VolSnapshot)> = lvs
            .iter()
            .filter(|l| l.is_ours_snapshot())
            .filter_map(|l| {
                let snap = l.name.strip_prefix(&prefix)?;
                Some((
                    l.clone(),
                    VolSnapshot {
                        name: snap.to_string(),
                        volume: volume.to_string(),
                        kind: if l.is_thin() {
                            SnapshotKind::LvmThin
                        } else {
                            SnapshotKind::LvmCow
                        },
                        created: l.time.as_deref().and_then(crate::util::parse_time_utc),
                        size: Some(l.size),
                        valid: !l.is_invalid_snapshot(),
                        usage_percent: if l.is_thin() {
                            l.data_percent
                        } else {
                            l.snap_percent
                        },
                    },
                ))
            })
            .collect();
        v.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.1.name.cmp(&b.1.name)));
        v
    }

    fn lv(&self, name: &str) -> String {
        format!("{}/{}", self.vg, name)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        self.tool(ToolCmd::LvRemove { lv: self.lv(name) })
            .await
            .map(|_| ())
    }

    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.tool(ToolCmd::LvRename {
            vg: self.vg.clone(),
            from: from.to_string(),
            to: to.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// The volumes, sorted by name (LV names are always text: nothing is rejected).
    async fn lvs_volumes(&self) -> Result<Vec<Volume>> {
        let mut v: Vec<Volume> = self
            .lvs()
            .await?
            .iter()
            .filter(|l| Self::is_volume(l))
            .map(|l| self.to_volume(l))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Take snapshot `snapshot` of `volume` (the caller holds what protects the volume).
    async fn new_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        let lvs = self.lvs().await?;
        let vol = self.find_volume(&lvs, volume)?;
        if vol.is_thin() && opts.size.is_some() {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "thin snapshots have no size (they share the thin pool)",
            ));
        }
        let lvname = format!("{volume}.{snapshot}");
        if lvs.iter().any(|l| l.name == lvname) {
            return Err(exists(volume, snapshot));
        }
        self.snapshot_lv(&vol, &lvname, opts.size).await?;
        let lvs = self.lvs().await?;
        find_snapshot(
            self.snapshots_of(&lvs, volume)
                .into_iter()
                .map(|(_, s)| s)
                .collect(),
            volume,
            snapshot,
        )
    }

    async fn snapshot_lv(&self, vol: &LvRow, lvname: &str, cow_size: Option<u64>) -> Result<()> {
        let origin = self.lv(&vol.name);
        let cow_size = if vol.is_thin() {
            None
        } else {
            Some(cow_size.unwrap_or(vol.size))
        };
        self.tool(ToolCmd::LvCreateSnapshot {
            origin,
            name: lvname.to_string(),
            cow_size,
        })
        .await
        .map(|_| ())
    }
}

#[async_trait]
impl Backend for LvmPool {
    fn def(&self) -> &PoolDef {
        &self.def
    }

    fn capabilities(&self) -> Capabilities {
        let thin = self.def.thin_pool.is_some();
        Capabilities {
            raw: true,
            qcow2: false,
            snapshots: true,
            revert: true,
            space_efficient_snapshots: thin,
            sized_snapshots: !thin,
            thin,
            atomic_revert: false,
            open_volume_snapshots: if thin {
                &[SnapshotKind::LvmThin]
            } else {
                &[SnapshotKind::LvmCow]
            },
        }
    }

    async fn info(&self) -> Result<PoolInfo> {
        let out = self
            .tool(ToolCmd::Vgs {
                vg: self.vg.clone(),
            })
            .await?;
        let (capacity, available) = parse_vgs(&out)?;
        Ok(PoolInfo {
            name: self.def.name.clone(),
            kind: self.def.kind,
            target: self.def.target.clone(),
            capacity,
            allocation: capacity - available.min(capacity),
            available,
            capabilities: self.capabilities(),
            leftovers: 0,
            leftover_bytes: 0,
        })
    }

    async fn volume_listing(&self) -> Result<Listing<Volume>> {
        Ok(Listing {
            items: self.lvs_volumes().await?,
            rejected: Vec::new(),
        })
    }

    async fn snapshot_listing(&self, volume: &str) -> Result<Listing<VolSnapshot>> {
        let lvs = self.lvs().await?;
        self.find_volume(&lvs, volume)?;
        Ok(Listing {
            items: self
                .snapshots_of(&lvs, volume)
                .into_iter()
                .map(|(_, s)| s)
                .collect(),
            rejected: Vec::new(),
        })
    }

    async fn volume(&self, name: &str) -> Result<Volume> {
        let lvs = self.lvs().await?;
        Ok(self.to_volume(&self.find_volume(&lvs, name)?))
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> Result<Volume> {
        check_lvm_name(NameOf::Volume, &spec.name)?;
        if spec.format != VolFormat::Raw || spec.backing.is_some() {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "logical pools hold raw volumes only (no qcow2, no backing volume)",
            ));
        }
        if spec.capacity == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, "a volume needs a size"));
        }
        let _l = lease(&self.locks, "volume create", self.resource(&spec.name)).await?;
        let lvs = self.lvs().await?;
        if lvs.iter().any(|l| l.name == spec.name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("VG {} already has an LV {:?}", self.vg, spec.name),
            ));
        }
        match &self.def.thin_pool {
            Some(tp) => {
                let tp = self.lv(tp);
                self.tool(ToolCmd::LvCreateThin {
                    name: spec.name.clone(),
                    size: spec.capacity,
                    thin_pool: tp,
                })
                .await?
            }
            None => {
                self.tool(ToolCmd::LvCreate {
                    vg: self.vg.clone(),
                    name: spec.name.clone(),
                    size: spec.capacity,
                })
                .await?
            }
        };
        self.volume(&spec.name).await
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        check_lvm_name(NameOf::Volume, name)?;
        let _l = lease(&self.locks, "volume delete", self.resource(name)).await?;
        let lvs = self.lvs().await?;
        self.find_volume(&lvs, name)?;
        // Deletions cannot be undone: a failure part way says what is already gone.
        let mut rev = Reverter::new();
        for (lv, _) in self.snapshots_of(&lvs, name) {
            if let Err(e) = self.remove(&lv.name).await {
                return Err(rev.fail(e).await);
            }
            rev.add_irreversible(format!("the removal of snapshot LV {}", self.lv(&lv.name)));
        }
        if let Err(e) = self.remove(name).await {
            return Err(rev.fail(e).await);
        }
        rev.success();
        Ok(())
    }

    async fn create_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        crate::name::check_lvm_snapshot_lv(volume, snapshot)?;
        let _l = lease(&self.locks, "volume snapshot create", self.resource(volume)).await?;
        self.new_snapshot(volume, snapshot, opts).await
    }

    async fn lease_resource(&self, volume: &str) -> Result<Resource> {
        let lvs = self.lvs().await?;
        self.find_volume(&lvs, volume)?;
        Ok(self.resource(volume))
    }

    async fn create_snapshot_for_domain(
        &self,
        volume: &str,
        snapshot: &str,
        domain: &DomainRef,
        opts: &SnapshotOptions,
    ) -> Result<VolSnapshot> {
        crate::name::check_lvm_snapshot_lv(volume, snapshot)?;
        let op = "volume snapshot create (for a domain)";
        let _l = for_domain(&self.locks, op, self.resource(volume), domain)?;
        self.new_snapshot(volume, snapshot, opts).await
    }

    async fn revert_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        crate::name::check_lvm_snapshot_lv(volume, snapshot)?;
        let _l = lease(&self.locks, "volume snapshot revert", self.resource(volume)).await?;
        let lvs = self.lvs().await?;
        let vol = self.find_volume(&lvs, volume)?;
        let (snap_lv, snap) = self.find_snapshot_lv(&lvs, volume, snapshot)?;
        if !snap.valid {
            return Err(Error::new(
                ErrorKind::InvalidSnapshot,
                format!(
                    "snapshot {snapshot:?} of {volume:?} is invalid (its COW area overflowed): it cannot be reverted to"
                ),
            ));
        }
        let new = format!("{volume}.vs-revert");
        let old = format!("{volume}.vs-old");
        let mut rev = Reverter::new();
        if snap_lv.is_thin() {
            if lvs.iter().any(|l| l.name == new || l.name == old) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{}/{new} or {}/{old} exists: an earlier revert was interrupted; remove it first",
                        self.vg, self.vg
                    ),
                ));
            }
            let steps: Result<()> = async {
                self.tool(ToolCmd::LvCreateWritableThinSnapshot {
                    origin: self.lv(&snap_lv.name),
                    name: new.clone(),
                })
                .await?;
                rev.add(format!("lvremove {}", self.lv(&new)), self.remove(&new));
                self.rename(volume, &old).await?;
                rev.add(
                    format!("lvrename {old} {volume}"),
                    self.rename(&old, volume),
                );
                self.rename(&new, volume).await?;
                rev.add(
                    format!("lvrename {volume} {new}"),
                    self.rename(volume, &new),
                );
                self.remove(&old).await
            }
            .await;
            if let Err(e) = steps {
                return Err(rev.fail(e).await);
            }
        } else {
            // LVM cannot snapshot a COW snapshot: merge it (this consumes it), then take it
            // again of the merged volume, the same size.
            let steps: Result<()> = async {
                self.tool(ToolCmd::LvConvertMerge {
                    lv: self.lv(&snap_lv.name),
                })
                    .await?;
                rev.add_irreversible(format!(
                    "the merge of {} into {} (the volume holds the snapshot's data; the snapshot is gone)",
                    self.lv(&snap_lv.name),
                    self.lv(volume)
                ));
                self.snapshot_lv(&vol, &snap_lv.name, Some(snap_lv.size)).await
            }
            .await;
            if let Err(e) = steps {
                return Err(rev.fail(e).await);
            }
        }
        rev.success();
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

impl LvmPool {
    /// Deletes a snapshot under the volume's lease, or for the running domain `domain`
    /// (under its operation lock, its QEMU holding the volume).
    async fn delete_snapshot_as(
        &self,
        volume: &str,
        snapshot: &str,
        domain: Option<&DomainRef>,
    ) -> Result<()> {
        crate::name::check_lvm_snapshot_lv(volume, snapshot)?;
        let _l = delete_lock(&self.locks, self.resource(volume), domain).await?;
        let lvs = self.lvs().await?;
        self.find_volume(&lvs, volume)?;
        let (lv, _) = self.find_snapshot_lv(&lvs, volume, snapshot)?;
        self.remove(&lv.name).await
    }
}
