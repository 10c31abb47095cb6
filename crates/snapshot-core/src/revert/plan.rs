//! The plan: a revert request checked against the domain and the target snapshot's metadata,
//! as a list of [`Step`]s.

use crate::capture::{default_overlay_path, DomainDisk, DomainInfo, PoolVolume, RunState};
use crate::domain::{DomainDef, SourceRef};
use crate::error::{Error, ErrorKind, Result};
use crate::name::SnapshotName;
use crate::xml::{DomainSnapshot, Location, SnapshotState};
use serde::{Deserialize, Serialize};

/// The flags of `snapshot-revert`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertFlags {
    /// `--running`: the domain ends running, whatever the snapshot's state.
    pub running: bool,
    /// `--paused`: the domain ends paused, whatever the snapshot's state.
    pub paused: bool,
    /// `--force`: revert where it is risky: a snapshot without a copy of the domain
    /// definition (internal snapshots only), whose disks are not the domain's disks now
    /// (only the disks both have are reverted), or whose configuration differs from the
    /// running QEMU's where the revert would otherwise be done in place (QEMU is restarted).
    pub force: bool,
}

/// A revert request (`snapshot-revert DOM SNAP`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertRequest {
    /// The snapshot to revert to.
    pub name: SnapshotName,
    /// The flags.
    pub flags: RevertFlags,
}

/// How the domain is reverted (docs/revert.md has the steps of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevertKind {
    /// An internal snapshot with RAM, domain running or paused: `snapshot-load` in the same
    /// QEMU process.
    InternalInPlace,
    /// An internal snapshot of a shut-off domain: applied offline to each image, then
    /// started (and its RAM loaded) if the snapshot has RAM or the flags ask.
    InternalOffline,
    /// An internal disk-only snapshot of a running (or paused) domain: the domain is
    /// stopped, the snapshot applied offline, the domain started if the flags ask.
    InternalRestart,
    /// An external disk-only snapshot: a new overlay per disk on the snapshot's image; a
    /// running domain is stopped and started again on them if the flags ask.
    External,
    /// An external disk-only snapshot of a running (or paused) domain that ends running (or
    /// paused): new overlays re-pointed in the same QEMU process (each on the snapshot's
    /// image, which is in the disk's current chain), and the guest reset.
    ExternalInPlace,
    /// An external snapshot with a RAM file: new overlays, then a QEMU started waiting for
    /// the RAM (`-incoming defer`) that loads it from the file.
    ExternalMemory,
    /// A disk-only snapshot with `snapshot='storage'` disks (pool volumes snapshotted by
    /// their backend): the domain stopped, each volume reverted by its backend (its current
    /// state kept as an undo volume snapshot up to the commit point), the domain started
    /// after it if the flags ask; external qcow2 disks of the same snapshot get new overlays
    /// as in [`RevertKind::External`].
    Storage,
    /// A snapshot with `snapshot='storage'` disks and a RAM file: as [`RevertKind::Storage`],
    /// then a QEMU started waiting for the RAM (`-incoming defer`) loads it from the file
    /// before the commit point; the undo volume snapshots are dropped after it, while that
    /// QEMU runs.
    StorageMemory,
}

impl RevertKind {
    /// The name in messages and `--output json`.
    pub fn as_str(self) -> &'static str {
        match self {
            RevertKind::InternalInPlace => "internal-in-place",
            RevertKind::InternalOffline => "internal-offline",
            RevertKind::InternalRestart => "internal-restart",
            RevertKind::External => "external",
            RevertKind::ExternalInPlace => "external-in-place",
            RevertKind::ExternalMemory => "external-memory",
            RevertKind::Storage => "storage",
            RevertKind::StorageMemory => "storage-memory",
        }
    }
}

/// A disk whose image holds an internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalDisk {
    /// The disk's target (`vda`): the facade finds its QEMU node by it when QEMU runs.
    pub target: String,
    /// Its current image (offline operations work on it).
    pub image: String,
}

/// One step of a revert. Each step's undo is documented on it and in docs/revert.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Stop the vCPUs. Undo: resume.
    Pause,
    /// Load internal snapshot `tag` into the running QEMU (the `snapshot-load` job: the
    /// disks' images go back to it, the RAM and device state come from `vmstate`'s image).
    /// In the domain's own QEMU this cannot be undone: it is then the commit point. In a
    /// QEMU this revert started, stopping that QEMU undoes it ([`Step::Start`]'s undo).
    LoadInternal {
        /// The tag.
        tag: String,
        /// The disks.
        disks: Vec<InternalDisk>,
        /// The disk whose image holds the vmstate.
        vmstate: InternalDisk,
    },
    /// Stop the domain (QEMU quits; its RAM state is lost). Undo: start it again on its
    /// definition, paused if it was paused.
    Destroy {
        /// It was paused (not running).
        paused: bool,
    },
    /// Offline: save the images' current state as internal snapshot `tag` (the undo of the
    /// apply that follows). Undo: delete that internal snapshot.
    SaveCurrent {
        /// The undo snapshot's tag.
        tag: String,
        /// The disks.
        disks: Vec<InternalDisk>,
    },
    /// Offline: apply internal snapshot `tag` to each image. Undo: apply `undo_tag` (the
    /// state [`Step::SaveCurrent`] saved); also after a failure, which may have applied
    /// some images.
    ApplyInternal {
        /// The snapshot's tag.
        tag: String,
        /// The disks.
        disks: Vec<InternalDisk>,
        /// The saved current state.
        undo_tag: String,
    },
    /// Create a new qcow2 overlay (exclusive, 0600) on the image holding the snapshot's
    /// data. Undo: delete it (only an overlay of `backing`).
    CreateOverlay {
        /// The disk's target.
        disk: String,
        /// The new overlay.
        path: String,
        /// The image holding the snapshot's data for this disk.
        backing: String,
        /// Its format.
        backing_format: String,
    },
    /// `blockdev-add` the new overlay `path` as node `node` (no backing yet), in the running
    /// QEMU. Undo: `blockdev-del`.
    AddOverlayNode {
        /// The disk's target.
        disk: String,
        /// The node name.
        node: String,
        /// The overlay.
        path: String,
    },
    /// In the running QEMU, with the vCPUs paused: each disk's new overlay node put on top
    /// of its current top (one `transaction` of `blockdev-snapshot`), then re-pointed onto
    /// the node of the snapshot's image in the old chain (`blockdev-reopen`), which leaves
    /// the old top detached. Undo: the overlay's backing back to the old top, the overlay
    /// merged back into it (it is empty: nothing ran) and the old top on top again.
    Repoint {
        /// The disks.
        swaps: Vec<Swap>,
    },
    /// `system_reset`: the guest restarts on the re-pointed disks (its RAM and caches are of
    /// the discarded state). Cannot be undone: the commit point.
    ResetGuest,
    /// `blockdev-del` of the detached old tops. After the commit point: a failure is a
    /// warning (the nodes stay open, unused).
    DropNodes {
        /// The nodes.
        nodes: Vec<String>,
    },
    /// Store the domain definition `after` (the disks on their new overlays). Undo: store
    /// `before`.
    SwitchDefinition {
        /// The definition now.
        before: String,
        /// The definition after the revert.
        after: String,
    },
    /// Start QEMU from the stored definition with its vCPUs paused (`-S`); with `incoming`,
    /// waiting for its RAM (`-incoming defer`). Undo: stop it.
    Start {
        /// Waits for an incoming RAM state.
        incoming: bool,
    },
    /// Load the RAM state from `file` into the QEMU [`Step::Start`] started
    /// (`migrate-incoming`). Undo: none (stopping that QEMU undoes it).
    LoadMemory {
        /// The RAM file.
        file: String,
    },
    /// Make the snapshot current. Undo: make `before` current again.
    SetCurrent {
        /// The snapshot.
        name: SnapshotName,
        /// The current snapshot before the revert.
        before: Option<SnapshotName>,
    },
    /// Resume the vCPUs (the domain ends running). After the commit point.
    Resume,
    /// Delete the undo snapshot [`Step::SaveCurrent`] made. After the commit point: a
    /// failure is a warning.
    DropSaved {
        /// The undo snapshot's tag.
        tag: String,
        /// The disks.
        disks: Vec<InternalDisk>,
    },
    /// Offline (the domain stopped): the pool volume's backend snapshots its current state
    /// as volume snapshot `tag` (the undo of the revert that follows). Undo: delete that
    /// volume snapshot.
    SaveVolume {
        /// The disk's target.
        disk: String,
        /// The volume.
        volume: PoolVolume,
        /// The undo snapshot's name.
        tag: String,
    },
    /// Offline: the volume's backend reverts it to volume snapshot `snapshot` (the one the
    /// capture took, named after the domain snapshot). Undo: revert it to `undo_tag` (the
    /// state [`Step::SaveVolume`] saved); also after a failure.
    RevertVolume {
        /// The disk's target.
        disk: String,
        /// The volume.
        volume: PoolVolume,
        /// The volume snapshot reverted to.
        snapshot: String,
        /// The saved current state.
        undo_tag: String,
    },
    /// Delete the undo volume snapshot [`Step::SaveVolume`] made. After the commit point: a
    /// failure is a warning.
    DropVolumeSaved {
        /// The disk's target.
        disk: String,
        /// The volume.
        volume: PoolVolume,
        /// The undo snapshot's name.
        tag: String,
    },
}

impl Step {
    /// A short name for messages and journals.
    pub fn label(&self) -> String {
        match self {
            Step::Pause => "pause".into(),
            Step::LoadInternal { .. } => "load-internal".into(),
            Step::Destroy { .. } => "destroy".into(),
            Step::SaveCurrent { .. } => "save-current".into(),
            Step::ApplyInternal { .. } => "apply-internal".into(),
            Step::CreateOverlay { disk, .. } => format!("create-overlay {disk}"),
            Step::AddOverlayNode { disk, .. } => format!("add-overlay-node {disk}"),
            Step::Repoint { .. } => "repoint".into(),
            Step::ResetGuest => "reset-guest".into(),
            Step::DropNodes { .. } => "drop-nodes".into(),
            Step::SwitchDefinition { .. } => "switch-definition".into(),
            Step::Start { .. } => "start".into(),
            Step::LoadMemory { .. } => "load-memory".into(),
            Step::SetCurrent { .. } => "set-current".into(),
            Step::Resume => "resume".into(),
            Step::DropSaved { .. } => "drop-saved".into(),
            Step::SaveVolume { disk, .. } => format!("save-volume {disk}"),
            Step::RevertVolume { disk, .. } => format!("revert-volume {disk}"),
            Step::DropVolumeSaved { disk, .. } => format!("drop-volume-saved {disk}"),
        }
    }
}

/// One disk's re-pointing in the running QEMU ([`Step::Repoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swap {
    /// The disk's target.
    pub disk: String,
    /// Its current top node.
    pub top: String,
    /// The current top's image.
    pub top_image: String,
    /// The new overlay's node.
    pub overlay: String,
    /// The new overlay.
    pub path: String,
    /// The image holding the snapshot's data (the new overlay's backing): a node in the
    /// current top's chain (or the top itself), or an image off it (another branch of the
    /// tree), which the re-pointing opens read-only.
    pub base: String,
}

/// A QEMU node name for a revert's overlay `path` of `disk` (at most 31 characters, starting
/// with a letter, unique per overlay file).
pub fn revert_node_name(disk: &str, path: &str) -> String {
    let disk: String = disk
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("rv-{disk}-{:08x}", crc32fast::hash(path.as_bytes()))
}

/// A validated plan: the steps in order and the commit point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertPlan {
    /// The domain.
    pub domain: String,
    /// The snapshot reverted to.
    pub name: SnapshotName,
    /// How.
    pub kind: RevertKind,
    /// The domain's run state when planned: a revert that fails ends in it.
    pub run_state: RunState,
    /// The domain's run state after the revert.
    pub final_state: RunState,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The index of the commit point: the in-place load (which cannot be undone), or else
    /// making the snapshot current. A failure before it is done undoes everything; once it
    /// was started the revert rolls forward (every step from it on can be run again).
    pub commit_point: usize,
    /// The disks reverted (targets), in the snapshot's order.
    pub disks: Vec<String>,
}

/// What the planner asks about files and images (the facade answers from the file system;
/// nothing is changed).
pub trait Facts {
    /// Does `path` exist?
    fn exists(&self, path: &str) -> bool;
    /// The tags of the internal snapshots of the qcow2 image `image` (none if it is not
    /// one).
    fn internal_snapshots(&self, image: &str) -> Vec<String>;
    /// The images below `image` in its backing chain, top down (as its headers record them).
    fn backing_chain(&self, image: &str) -> Vec<String>;
    /// The file of pool volume `pool`/`volume` (none if there is no such volume): where the
    /// snapshot's data is when its copy of the definition names a volume.
    fn volume_path(&self, pool: &str, volume: &str) -> Option<String> {
        let _ = (pool, volume);
        None
    }
    /// The names of the volume snapshots of pool volume `pool`/`volume` (none if there is
    /// no such volume): a storage disk's volume must hold the snapshot's.
    fn volume_snapshots(&self, pool: &str, volume: &str) -> Option<Vec<String>> {
        let _ = (pool, volume);
        None
    }
}

/// The step that stores `after` in place of `before`, if they differ (and the domain has a
/// stored definition).
fn switch_definition(before: Option<&str>, after: Option<&DomainDef>) -> Option<Step> {
    let (before, after) = (before?, after?.to_xml());
    let same = DomainDef::from_xml(before).is_ok_and(|b| b.to_xml() == after);
    (!same).then(|| Step::SwitchDefinition {
        before: before.to_string(),
        after,
    })
}

fn plan_error(object: &str, what: String) -> Error {
    Error::new(ErrorKind::InvalidPlan, object, what)
}

/// The new overlay for reverting `disk` of snapshot `snap` onto `base`:
/// `<base minus extension>.<snap>.r<N>` next to it, with the first free N from 1.
pub fn revert_overlay_path(base: &str, snap: &str, facts: &dyn Facts, taken: &[String]) -> String {
    let stem = default_overlay_path(base, snap);
    (1..)
        .map(|n| format!("{stem}.r{n}"))
        .find(|p| !facts.exists(p) && !taken.contains(p))
        .expect("an unbounded range")
}

/// The tag of the undo snapshot an offline internal revert to `snap` saves the current
/// state as: `vs-revert-undo-<hash>`, unused in `images`.
fn undo_tag(snap: &str, disks: &[InternalDisk], facts: &dyn Facts) -> String {
    let used: Vec<String> = disks
        .iter()
        .flat_map(|d| facts.internal_snapshots(&d.image))
        .collect();
    unused_undo_tag(snap, &used)
}

/// `vs-revert-undo-<hash of snap>`, or with `-2`, `-3`, ... the first not in `used`.
fn unused_undo_tag(snap: &str, used: &[String]) -> String {
    let base = format!("vs-revert-undo-{:08x}", crc32fast::hash(snap.as_bytes()));
    std::iter::once(base.clone())
        .chain((2..).map(|n| format!("{base}-{n}")))
        .find(|t| !used.contains(t))
        .expect("an unbounded range")
}

impl RevertPlan {
    /// Plans `req` for the domain `dom` (its run state, its disks' current images and
    /// nodes, its current snapshot, its stored definition) to snapshot `snap` (its metadata);
    /// `facts` says which files exist and which internal snapshots an image holds. Refuses,
    /// with [`ErrorKind::InvalidPlan`] naming the disk or flag, what cannot be reverted.
    pub fn new(
        req: &RevertRequest,
        dom: &DomainInfo,
        snap: &DomainSnapshot,
        facts: &dyn Facts,
    ) -> Result<Self> {
        let f = req.flags;
        let name = req.name.as_str();
        if f.running && f.paused {
            return Err(plan_error(
                "--running",
                "--running and --paused are mutually exclusive".into(),
            ));
        }
        if snap.name.as_ref() != Some(&req.name) {
            return Err(plan_error(
                name,
                "the metadata is not this snapshot's".into(),
            ));
        }
        let mem = snap
            .memory
            .as_ref()
            .and_then(|m| m.location())
            .unwrap_or(Location::No);
        let copy = match &snap.domain {
            Some(raw) => Some(DomainDef::from_xml(raw.as_str()).map_err(|e| {
                plan_error(
                    name,
                    "its copy of the domain definition is not valid".into(),
                )
                .with_source(e)
            })?),
            None => None,
        };
        // A disk the snapshot captured (internal or external) that the domain no longer has
        // comes back as the snapshot's copy describes it (libvirt's revert puts the
        // snapshot's whole definition back): its image is the copy's source.
        // A snapshot disk names a domain disk by target (or by its current source).
        let is_disk =
            |x: &DomainDisk, name: &str| x.target == name || x.source.as_deref() == Some(name);
        let restored: Vec<DomainDisk> = snap
            .disks
            .iter()
            .filter(|d| {
                matches!(d.location(), Some(Location::Internal | Location::External))
                    && !dom.disks.iter().any(|x| is_disk(x, &d.name))
            })
            .filter_map(|d| {
                let cd = copy.as_ref()?.disk(&d.name)?;
                let source = match cd.source_ref()? {
                    SourceRef::File(p) | SourceRef::Block(p) => p.to_string(),
                    SourceRef::Volume { pool, volume } => facts.volume_path(pool, volume)?,
                };
                Some(DomainDisk {
                    target: d.name.clone(),
                    source: Some(source),
                    format: cd.format().unwrap_or("raw").to_string(),
                    volume: None,
                    readonly: false,
                    cdrom: false,
                    node: String::new(),
                })
            })
            .collect();
        // The disks captured, matched with the domain's.
        let mut internal = Vec::new();
        let mut external = Vec::new();
        let mut storage = Vec::new();
        let mut matched = Vec::new();
        for d in &snap.disks {
            let loc = d.location().unwrap_or(Location::No);
            let dd = dom
                .disks
                .iter()
                .chain(&restored)
                .find(|x| is_disk(x, &d.name));
            if let Some(dd) = dd {
                matched.push(dd.target.clone());
            }
            match loc {
                Location::No => continue,
                Location::Manual => {
                    return Err(plan_error(
                        &d.name,
                        "a snapshot='manual' disk was snapshotted by the user, outside \
                         virt-snap: it cannot be reverted by it"
                            .into(),
                    ))
                }
                Location::Internal | Location::External | Location::Storage => {}
            }
            let Some(dd) = dd else {
                if f.force {
                    continue;
                }
                return Err(plan_error(
                    &d.name,
                    "the domain has no such disk any more, and the snapshot's copy of the \
                     definition does not describe it: --force reverts the other disks"
                        .into(),
                ));
            };
            match loc {
                Location::Internal => internal.push(dd),
                Location::Storage => storage.push(dd),
                _ => external.push(dd),
            }
        }
        if let Some(extra) = dom
            .disks
            .iter()
            .find(|d| !matched.contains(&d.target) && !d.readonly && !d.cdrom && d.source.is_some())
        {
            if !f.force {
                return Err(plan_error(
                    &extra.target,
                    "the snapshot does not know this disk (added since): --force reverts the \
                     others and leaves it as it is"
                        .into(),
                ));
            }
        }
        let other_than_internal = !external.is_empty() || !storage.is_empty();
        if !internal.is_empty() && other_than_internal {
            return Err(plan_error(
                "disks",
                "the snapshot mixes internal and external (or storage) disks".into(),
            ));
        }
        if internal.is_empty() && external.is_empty() && storage.is_empty() {
            return Err(plan_error(
                name,
                "the snapshot captured no disk of the domain: nothing to revert".into(),
            ));
        }
        let snap_state = snap.state.unwrap_or(SnapshotState::Shutoff);
        let with_ram = matches!(mem, Location::Internal | Location::External);
        let final_state = if f.running {
            RunState::Running
        } else if f.paused {
            RunState::Paused
        } else {
            match (with_ram, snap_state) {
                (true, SnapshotState::Paused) => RunState::Paused,
                (true, _) => RunState::Running,
                // A disk-only or shut-off snapshot leaves the domain shut off (virsh).
                (false, _) => RunState::ShutOff,
            }
        };
        let up = dom.state != RunState::ShutOff;
        let current_def = dom.domain_xml.as_ref().map(|x| x.as_str().to_string());
        let stored = current_def
            .as_deref()
            .map(|b| {
                DomainDef::from_xml(b).map_err(|e| {
                    plan_error(&dom.name, "its stored definition is not valid".into())
                        .with_source(e)
                })
            })
            .transpose()?;
        // The snapshot's configuration comes back with it (libvirt's revert does the same):
        // the stored definition after the revert is the snapshot's copy with the current
        // name, UUID and disks (the external disks moved below).
        let mut after = stored.clone();
        if let (Some(a), Some(c)) = (after.as_mut(), copy.as_ref()) {
            a.take_config_of(c);
            // The disks that come back, as the copy has them (an external one is moved onto
            // its new overlay below).
            for d in &restored {
                if let Some(cd) = c.disk(&d.target) {
                    a.devices.disks.push(cd.clone());
                }
            }
        }
        // What the running QEMU runs differently from the snapshot's configuration: a
        // revert in place would keep it, so it restarts QEMU instead (with --force).
        let config_changes = match (up, &copy) {
            (true, Some(c)) => {
                let running = match &dom.running_xml {
                    Some(r) => Some(DomainDef::from_xml(r.as_str()).map_err(|e| {
                        plan_error(
                            &dom.name,
                            "the definition its QEMU was started from is not valid".into(),
                        )
                        .with_source(e)
                    })?),
                    None => stored.clone(),
                };
                let mut v = running.map_or_else(Vec::new, |r| c.restart_differences(&r));
                for d in &restored {
                    v.push(format!(
                        "disk {}: in the snapshot, not in the running domain",
                        d.target
                    ));
                }
                v
            }
            _ => Vec::new(),
        };
        let needs_force_to_restart = |kind: &str| -> Result<()> {
            if f.force {
                return Ok(());
            }
            Err(plan_error(
                name,
                format!(
                    "the snapshot's configuration differs from the running domain's ({}): \
                     it cannot be {kind} in place, and --force reverts it by restarting QEMU",
                    config_changes.join("; ")
                ),
            ))
        };
        let restartable = |what: &str| {
            if current_def.is_none() {
                return Err(plan_error(
                    &dom.name,
                    format!(
                        "{what}, and a transient domain (no stored definition) cannot be \
                         started again"
                    ),
                ));
            }
            Ok(())
        };
        let mut steps = Vec::new();
        let set_current = Step::SetCurrent {
            name: req.name.clone(),
            before: dom.current.clone(),
        };
        let kind;
        // The in-place load or guest reset, which cannot be undone; else making the snapshot
        // current.
        let mut irrevocable = None;
        let mut saved = None;
        let mut vol_drops = Vec::new();
        let mut start_after = false;
        if !internal.is_empty() {
            if mem == Location::External {
                return Err(plan_error(
                    "memory",
                    "internal disks with an external memory file cannot be reverted".into(),
                ));
            }
            if copy.is_none() && !f.force {
                return Err(plan_error(
                    name,
                    "the snapshot has no copy of the domain definition: --force reverts the \
                     disks (and RAM) without it"
                        .into(),
                ));
            }
            let disks: Vec<InternalDisk> = internal
                .iter()
                .map(|d| InternalDisk {
                    target: d.target.clone(),
                    image: d.source.clone().unwrap_or_default(),
                })
                .collect();
            for d in &disks {
                if !facts.internal_snapshots(&d.image).iter().any(|t| t == name) {
                    return Err(plan_error(
                        &d.target,
                        format!(
                            "its current image {} does not hold internal snapshot {name:?} \
                             (the disk moved on to an overlay since, or the snapshot was \
                             deleted from the image)",
                            d.image
                        ),
                    ));
                }
            }
            let vmstate = disks[0].clone();
            let load = Step::LoadInternal {
                tag: name.to_string(),
                disks: disks.clone(),
                vmstate,
            };
            if up && mem == Location::Internal && !config_changes.is_empty() {
                needs_force_to_restart("loaded")?;
            }
            if up && mem == Location::Internal && config_changes.is_empty() {
                kind = RevertKind::InternalInPlace;
                steps.extend(switch_definition(current_def.as_deref(), after.as_ref()));
                if dom.state == RunState::Running {
                    steps.push(Step::Pause);
                }
                irrevocable = Some(steps.len());
                steps.push(load);
            } else {
                let tag = undo_tag(name, &disks, facts);
                if up {
                    kind = RevertKind::InternalRestart;
                    restartable("the domain must be stopped for this revert")?;
                    steps.push(Step::Destroy {
                        paused: dom.state == RunState::Paused,
                    });
                } else {
                    kind = RevertKind::InternalOffline;
                }
                steps.push(Step::SaveCurrent {
                    tag: tag.clone(),
                    disks: disks.clone(),
                });
                steps.push(Step::ApplyInternal {
                    tag: name.to_string(),
                    disks: disks.clone(),
                    undo_tag: tag.clone(),
                });
                steps.extend(switch_definition(current_def.as_deref(), after.as_ref()));
                if final_state != RunState::ShutOff {
                    if current_def.is_none() {
                        return Err(plan_error(
                            &dom.name,
                            "no stored definition to start".into(),
                        ));
                    }
                    steps.push(Step::Start { incoming: false });
                    if mem == Location::Internal {
                        steps.push(load);
                    }
                }
                saved = Some((tag, disks));
            }
        } else {
            if !storage.is_empty() && mem == Location::Internal {
                // (The capture never makes one: internal RAM needs a qcow2 image of an
                // internal disk.)
                return Err(plan_error(
                    "memory",
                    "a snapshot with storage disks and internal RAM cannot be reverted: its \
                     RAM needs an internal disk's image"
                        .into(),
                ));
            }
            // External disks need the copy (it names the images holding their data) and a
            // stored definition to switch; storage disks alone need neither.
            let copy = match &copy {
                Some(c) => Some(c),
                None if external.is_empty() => None,
                None => {
                    return Err(plan_error(
                        name,
                        "an external snapshot without a copy of the domain definition cannot \
                         be reverted: it names the images that hold the snapshot's data"
                            .into(),
                    ))
                }
            };
            if current_def.is_none() && !external.is_empty() {
                return Err(plan_error(
                    &dom.name,
                    "reverting an external snapshot changes the domain's disks, and a \
                     transient domain has no stored definition"
                        .into(),
                ));
            }
            let ram_file = match (mem, snap.memory.as_ref().and_then(|m| m.file.clone())) {
                (Location::External, Some(file)) => {
                    if !facts.exists(&file) {
                        return Err(plan_error(
                            "memory",
                            format!("the snapshot's RAM file {file} is missing"),
                        ));
                    }
                    Some(file)
                }
                (Location::External, None) => {
                    return Err(plan_error("memory", "no RAM file recorded".into()))
                }
                _ => None,
            };
            let mut overlays = Vec::new();
            let mut swaps = Vec::new();
            for d in &external {
                let t = &d.target;
                let copy = copy.expect("required above with external disks");
                let after = after.as_mut().expect("required above with external disks");
                let cd = copy.disk(t).ok_or_else(|| {
                    plan_error(
                        t,
                        "the snapshot's domain definition has no such disk".into(),
                    )
                })?;
                let base = match cd.source_ref() {
                    Some(SourceRef::File(p)) | Some(SourceRef::Block(p)) => p.to_string(),
                    Some(SourceRef::Volume { pool, volume }) => {
                        facts.volume_path(pool, volume).ok_or_else(|| {
                            plan_error(
                                t,
                                format!(
                                    "the snapshot's image is pool volume {pool}/{volume}, \
                                     which does not exist (or its pool is not defined)"
                                ),
                            )
                        })?
                    }
                    None => {
                        return Err(plan_error(
                            t,
                            "the snapshot's domain definition gives no source".into(),
                        ))
                    }
                };
                let Some(base_format) = cd.format().map(str::to_string) else {
                    return Err(plan_error(
                        t,
                        "the snapshot's domain definition gives no format for its image".into(),
                    ));
                };
                if !facts.exists(&base) {
                    return Err(plan_error(
                        t,
                        format!("the image holding the snapshot's data, {base}, is missing"),
                    ));
                }
                let path = revert_overlay_path(&base, name, facts, &overlays);
                overlays.push(path.clone());
                let top = d.source.clone().unwrap_or_default();
                // Re-pointed in place wherever QEMU has the disk: onto the node of the
                // snapshot's image in the current chain, or (a snapshot on another branch)
                // onto a node the re-pointing opens for it.
                if !d.node.is_empty() {
                    swaps.push(Swap {
                        disk: t.clone(),
                        top: d.node.clone(),
                        top_image: top.clone(),
                        overlay: revert_node_name(t, &path),
                        path: path.clone(),
                        base: base.clone(),
                    });
                }
                steps.push(Step::CreateOverlay {
                    disk: t.clone(),
                    path: path.clone(),
                    backing: base,
                    backing_format: base_format,
                });
                let nd = after.disk_mut(t).ok_or_else(|| {
                    plan_error(t, "the stored definition has no such disk".into())
                })?;
                nd.disk_type = cd.disk_type.clone();
                nd.source = cd.source.clone();
                if let Some(fm) = cd.format() {
                    nd.set_format(fm);
                }
                nd.set_backing_store(cd.backing_store.clone());
                nd.put_overlay(&path, "qcow2");
            }
            let switch = switch_definition(current_def.as_deref(), after.as_ref());
            // Storage disks: each volume's current state saved as an undo volume snapshot,
            // then the volume reverted by its backend, offline.
            let mut saves = Vec::new();
            let mut reverts = Vec::new();
            for d in &storage {
                let t = &d.target;
                let Some(v) = d.volume.clone() else {
                    return Err(plan_error(
                        t,
                        "the snapshot is a storage snapshot of this disk's pool volume, and the \
                         disk is not on a pool volume any more"
                            .into(),
                    ));
                };
                let vol = format!("{}/{}", v.pool, v.volume);
                if v.backend.is_none() {
                    return Err(plan_error(
                        t,
                        format!(
                            "pool volume {vol} is not in a pool whose backend snapshots volumes \
                             (btrfs, LVM, reflink dir)"
                        ),
                    ));
                }
                if let Some(SourceRef::Volume { pool, volume }) =
                    copy.and_then(|c| c.disk(t)).and_then(|cd| cd.source_ref())
                {
                    if pool != v.pool || volume != v.volume {
                        return Err(plan_error(
                            t,
                            format!(
                                "the snapshot's volume is {pool}/{volume}, the disk is on {vol} \
                                 now"
                            ),
                        ));
                    }
                }
                let snaps = facts.volume_snapshots(&v.pool, &v.volume).ok_or_else(|| {
                    plan_error(
                        t,
                        format!("pool volume {vol} does not exist (or its pool is not defined)"),
                    )
                })?;
                if !snaps.iter().any(|s| s == name) {
                    return Err(plan_error(
                        t,
                        format!(
                            "pool volume {vol} holds no volume snapshot {name:?} (deleted \
                             since?)"
                        ),
                    ));
                }
                let tag = unused_undo_tag(name, &snaps);
                saves.push(Step::SaveVolume {
                    disk: t.clone(),
                    volume: v.clone(),
                    tag: tag.clone(),
                });
                reverts.push(Step::RevertVolume {
                    disk: t.clone(),
                    volume: v.clone(),
                    snapshot: name.to_string(),
                    undo_tag: tag.clone(),
                });
                vol_drops.push(Step::DropVolumeSaved {
                    disk: t.clone(),
                    volume: v,
                    tag,
                });
            }
            // In place: the domain runs and goes on running, no RAM to load, no storage disk,
            // and QEMU has every disk (a snapshot image off the current chain is opened for it).
            // (A disk that comes back has no node: QEMU must be restarted for it, which
            // config_changes says.)
            let in_place = up
                && storage.is_empty()
                && ram_file.is_none()
                && final_state != RunState::ShutOff
                && swaps.len()
                    + restored
                        .iter()
                        .filter(|r| external.iter().any(|e| e.target == r.target))
                        .count()
                    == external.len();
            if in_place && !config_changes.is_empty() {
                needs_force_to_restart("re-pointed")?;
            }
            if in_place && config_changes.is_empty() {
                kind = RevertKind::ExternalInPlace;
                for sw in &swaps {
                    steps.push(Step::AddOverlayNode {
                        disk: sw.disk.clone(),
                        node: sw.overlay.clone(),
                        path: sw.path.clone(),
                    });
                }
                steps.extend(switch);
                if dom.state == RunState::Running {
                    steps.push(Step::Pause);
                }
                // The old tops detached: all but a top that is the snapshot's image itself.
                let old: Vec<String> = swaps
                    .iter()
                    .filter(|sw| sw.top_image != sw.base)
                    .map(|sw| sw.top.clone())
                    .collect();
                steps.push(Step::Repoint { swaps });
                irrevocable = Some(steps.len());
                steps.push(Step::ResetGuest);
                steps.push(set_current);
                if final_state == RunState::Running {
                    steps.push(Step::Resume);
                }
                if !old.is_empty() {
                    steps.push(Step::DropNodes { nodes: old });
                }
                return Ok(RevertPlan {
                    domain: dom.name.clone(),
                    name: req.name.clone(),
                    kind,
                    run_state: dom.state,
                    final_state,
                    steps,
                    commit_point: irrevocable.expect("set above"),
                    disks: external.iter().map(|d| d.target.clone()).collect(),
                });
            }
            let with_storage = !storage.is_empty();
            if up {
                if with_storage {
                    restartable("the domain must be stopped to revert its storage disks")?;
                }
                steps.push(Step::Destroy {
                    paused: dom.state == RunState::Paused,
                });
            }
            steps.extend(saves);
            steps.extend(reverts);
            steps.extend(switch);
            if with_storage {
                if let Some(file) = ram_file {
                    // The RAM loaded into a QEMU started on the reverted volumes before the
                    // commit point, so that a failed load is undone (that QEMU stopped, the
                    // volumes reverted to their undo snapshots); the undo volume snapshots
                    // are dropped after it, for the running domain.
                    kind = RevertKind::StorageMemory;
                    steps.push(Step::Start { incoming: true });
                    steps.push(Step::LoadMemory { file });
                } else {
                    // Started after the commit point and after the undo volume snapshots
                    // are dropped.
                    kind = RevertKind::Storage;
                    start_after = final_state != RunState::ShutOff;
                }
            } else if let Some(file) = ram_file {
                kind = RevertKind::ExternalMemory;
                steps.push(Step::Start { incoming: true });
                steps.push(Step::LoadMemory { file });
            } else {
                kind = RevertKind::External;
                if final_state != RunState::ShutOff {
                    steps.push(Step::Start { incoming: false });
                }
            }
        }
        let commit_point = irrevocable.unwrap_or(steps.len());
        steps.push(set_current);
        steps.extend(vol_drops);
        if start_after {
            steps.push(Step::Start { incoming: false });
        }
        if final_state == RunState::Running {
            steps.push(Step::Resume);
        }
        if let Some((tag, disks)) = saved {
            steps.push(Step::DropSaved { tag, disks });
        }
        Ok(RevertPlan {
            domain: dom.name.clone(),
            name: req.name.clone(),
            kind,
            run_state: dom.state,
            final_state,
            steps,
            commit_point,
            disks: internal
                .iter()
                .chain(&external)
                .chain(&storage)
                .map(|d| d.target.clone())
                .collect(),
        })
    }
}
