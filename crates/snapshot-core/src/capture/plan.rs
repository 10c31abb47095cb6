//! The plan: a snapshot request checked against the domain's disks, as a list of [`Step`]s.

use crate::error::{Error, ErrorKind, Result};
use crate::name::SnapshotName;
use crate::xml::{self, DomainSnapshot, Location, RawXml, SnapshotState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

use super::Clock;

/// The default freeze budget: how long the guest may stay frozen (agent freeze to thaw).
pub const DEFAULT_FREEZE_BUDGET_MS: u64 = 2_000;
/// The default pause budget: how long the vCPUs may stay paused for the capture.
pub const DEFAULT_PAUSE_BUDGET_MS: u64 = 1_000;
/// The default manual hold: how long a domain stays paused for the user's own snapshots of
/// its `snapshot='manual'` disks before it is resumed without them.
pub const DEFAULT_MANUAL_HOLD_MS: u64 = 300_000;

/// What the request asks for one disk (`--diskspec` or a `<disk>` of the domainsnapshot XML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskChoice {
    /// `snapshot='no'`.
    No,
    /// `snapshot='internal'`: a qcow2 internal snapshot.
    Internal,
    /// `snapshot='external'`: a new overlay; `file` and `format` default to libvirt's
    /// `<source minus extension>.<snapshot name>` and qcow2.
    External {
        /// The overlay's path.
        file: Option<String>,
        /// The overlay's format (qcow2).
        format: Option<String>,
    },
    /// `snapshot='storage'` (our extension): the storage backend's snapshot of the volume.
    Storage,
    /// `snapshot='manual'`: the user snapshots the disk by other means while the domain is
    /// paused (see [`Step::HoldPaused`]).
    Manual,
}

/// One disk's entry of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRequest {
    /// The disk's target (`vda`) or its current source path, as libvirt accepts.
    pub name: String,
    /// What to do with it.
    pub choice: DiskChoice,
}

/// What the request asks for the memory (`--memspec` or `<memory>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryChoice {
    /// Not said: virsh's default (internal for a running domain unless the disks are
    /// external, none with `--disk-only` or for a stopped domain).
    #[default]
    Default,
    /// `snapshot='no'`.
    No,
    /// `snapshot='internal'`: the vmstate in the qcow2 images (snapshot-save).
    Internal,
    /// `snapshot='external' file=...`: RAM to a file.
    External {
        /// The RAM file.
        file: String,
    },
}

/// The request's flags (`snapshot-create-as` options).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    /// `--disk-only`: no RAM, every writable disk external unless said otherwise.
    pub disk_only: bool,
    /// `--quiesce`: freeze the guest's file systems through the agent around the disk part.
    pub quiesce: bool,
    /// `--live`: save RAM with the guest running (background-snapshot).
    pub live: bool,
    /// `--fallback-paused` (with `--live`): where QEMU refuses background-snapshot (VFIO
    /// devices, no userfaultfd write-protect), save RAM with the guest paused instead of
    /// failing. Without it such a refusal is an error: never a silent long pause.
    #[serde(default)]
    pub fallback_paused: bool,
    /// `--atomic`: all disks or none. Always the case here (one transaction, undo on
    /// failure); accepted for virsh compatibility.
    pub atomic: bool,
    /// `--halt`: stop the domain once captured.
    pub halt: bool,
    /// `--no-metadata`: capture without recording the snapshot.
    pub no_metadata: bool,
    /// `--reuse-external`: the overlay files exist already (the user made them); they are
    /// checked, used, and never deleted.
    pub reuse_external: bool,
}

/// A snapshot request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRequest {
    /// The snapshot's name.
    pub name: SnapshotName,
    /// Its description.
    pub description: Option<String>,
    /// Per-disk choices; disks not named get the default.
    pub disks: Vec<DiskRequest>,
    /// The memory.
    pub memory: MemoryChoice,
    /// The flags.
    pub flags: Flags,
    /// The freeze budget (`--quiesce`), in milliseconds.
    pub freeze_budget_ms: u64,
    /// The pause budget, in milliseconds.
    pub pause_budget_ms: u64,
    /// With `manual` disks of a running domain: how long it stays paused for them at most,
    /// in milliseconds.
    pub manual_hold_ms: u64,
}

impl CaptureRequest {
    /// A request for `name` with no disk choices, virsh's default memory, no flags and the
    /// default budgets.
    pub fn new(name: SnapshotName) -> Self {
        CaptureRequest {
            name,
            description: None,
            disks: Vec::new(),
            memory: MemoryChoice::Default,
            flags: Flags::default(),
            freeze_budget_ms: DEFAULT_FREEZE_BUDGET_MS,
            pause_budget_ms: DEFAULT_PAUSE_BUDGET_MS,
            manual_hold_ms: DEFAULT_MANUAL_HOLD_MS,
        }
    }

    /// The request a domainsnapshot XML (`snapshot-create DOM FILE`) makes, with `flags`.
    /// A missing name is an error: the caller generates one first.
    pub fn from_xml(def: &DomainSnapshot, flags: Flags) -> Result<Self> {
        let name = def.name.clone().ok_or_else(|| {
            plan_error("domainsnapshot XML", "the request has no name".to_string())
        })?;
        let mut r = CaptureRequest::new(name);
        r.description = def.description.clone();
        r.flags = flags;
        r.memory = match def
            .memory
            .as_ref()
            .and_then(|m| m.location().map(|l| (l, m)))
        {
            None => MemoryChoice::Default,
            Some((Location::No, _)) => MemoryChoice::No,
            Some((Location::Internal, _)) => MemoryChoice::Internal,
            Some((Location::External, m)) => MemoryChoice::External {
                file: m.file.clone().ok_or_else(|| {
                    plan_error("memory", "an external memory snapshot needs a file".into())
                })?,
            },
            Some((l, _)) => {
                return Err(plan_error(
                    "memory",
                    format!("snapshot='{}' is not a memory location", l.as_str()),
                ))
            }
        };
        for d in &def.disks {
            let external = || DiskChoice::External {
                file: d.source.as_ref().and_then(|s| s.path()).map(str::to_string),
                format: d.driver.as_ref().and_then(|x| x.format.clone()),
            };
            let choice = match d.location() {
                Some(Location::External) => external(),
                None if d.source.is_some() || d.driver.is_some() => external(),
                None => continue,
                Some(Location::No) => DiskChoice::No,
                Some(Location::Internal) => DiskChoice::Internal,
                Some(Location::Storage) => DiskChoice::Storage,
                Some(Location::Manual) => DiskChoice::Manual,
            };
            r.disks.push(DiskRequest {
                name: d.name.clone(),
                choice,
            });
        }
        Ok(r)
    }
}

/// A storage backend that can snapshot a pool volume itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// A btrfs subvolume snapshot.
    Btrfs,
    /// An LVM (thin) snapshot.
    Lvm,
    /// A reflink copy in a dir pool.
    Reflink,
}

/// A pool volume a disk uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PoolVolume {
    /// The pool.
    pub pool: String,
    /// The volume in the pool.
    pub volume: String,
    /// The pool's backend, if it snapshots volumes itself.
    pub backend: Option<BackendKind>,
}

/// One of the domain's disks as the planner needs it (the facade builds these from the
/// domain definition, its pools and QEMU's block graph).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDisk {
    /// The target (`vda`).
    pub target: String,
    /// The current top image's path (file or block device); `None` for an empty cdrom.
    pub source: Option<String>,
    /// The current top image's format (`qcow2`, `raw`).
    pub format: String,
    /// The pool volume, if the disk is one.
    pub volume: Option<PoolVolume>,
    /// `<readonly/>`.
    pub readonly: bool,
    /// A cdrom.
    pub cdrom: bool,
    /// The QEMU node name of the current top image (when the domain runs).
    pub node: String,
}

/// The domain's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Running vCPUs.
    Running,
    /// QEMU runs with its vCPUs paused.
    Paused,
    /// No QEMU.
    ShutOff,
}

/// The domain as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// The domain's name.
    pub name: String,
    /// Its run state.
    pub state: RunState,
    /// A guest agent is configured and connected.
    pub has_agent: bool,
    /// Its disks.
    pub disks: Vec<DomainDisk>,
    /// The current snapshot (the new one's parent).
    pub current: Option<SnapshotName>,
    /// The domain definition to embed in the snapshot's metadata (the stored one).
    pub domain_xml: Option<RawXml>,
    /// The definition the running QEMU was started from, when the domain runs and it is
    /// known (its disks may have moved since; only the rest is read): a revert compares a
    /// snapshot's configuration with it to tell whether the snapshot loads in place.
    /// `None`: the stored definition is taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_xml: Option<RawXml>,
}

impl DomainInfo {
    /// The copy of the definition a snapshot keeps: the stored definition, with the
    /// configuration the running QEMU was started from when it differs (a definition
    /// changed while the domain runs applies from its next start; a snapshot's RAM is the
    /// running configuration's), as libvirt keeps the live definition.
    pub fn snapshot_copy(&self) -> Option<RawXml> {
        let stored = self.domain_xml.as_ref()?;
        let merged = self.running_xml.as_ref().and_then(|r| {
            let mut d = crate::DomainDef::from_xml(stored.as_str()).ok()?;
            d.take_config_of(&crate::DomainDef::from_xml(r.as_str()).ok()?);
            RawXml::element(&d.to_xml()).ok()
        });
        Some(merged.unwrap_or_else(|| stored.clone()))
    }
}

/// One `blockdev-snapshot` action of the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayAction {
    /// The disk's target.
    pub disk: String,
    /// The node the overlay goes on (the disk's current top).
    pub node: String,
    /// The overlay's node (added by [`Step::AddOverlayNode`]).
    pub overlay: String,
}

/// One step of a capture. Each step's undo is documented on it and in docs/capture.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Freeze the guest's file systems (agent `guest-fsfreeze-freeze`), bounded by `budget_ms`.
    /// Undo: thaw, always (also after a failed or timed-out freeze).
    Freeze {
        /// The freeze budget.
        budget_ms: u64,
    },
    /// Create the overlay file (native qcow2, 0600, recorded backing format), or with
    /// `reuse` check the user's. Undo: delete it, unless `reuse` (a file the user gave is
    /// never deleted).
    PreCreateOverlay {
        /// The disk's target.
        disk: String,
        /// The overlay.
        path: String,
        /// Its backing file (the disk's current source).
        backing: String,
        /// The backing file's format.
        backing_format: String,
        /// The overlay's format.
        format: String,
        /// `--reuse-external`: the file is the user's.
        reuse: bool,
    },
    /// `blockdev-add` the overlay (no backing attached yet). Undo: `blockdev-del`.
    AddOverlayNode {
        /// The disk's target.
        disk: String,
        /// The node name.
        node: String,
        /// The overlay's path.
        path: String,
        /// Its format.
        format: String,
    },
    /// Stop the vCPUs (drains and flushes guest I/O). Starts the pause budget. Undo: resume.
    Pause {
        /// The pause budget.
        budget_ms: u64,
    },
    /// Save RAM to `file`. Without `live`, while paused, to completion. With `live`, start
    /// the background-snapshot migration (RAM fixed at this instant, while paused);
    /// [`Step::AwaitMemory`] waits for it. Undo: cancel the save and delete the file.
    SaveMemory {
        /// The RAM file.
        file: String,
        /// Background-snapshot.
        live: bool,
        /// With `live`: a refused background-snapshot falls back to a save with the guest
        /// paused.
        #[serde(default)]
        fallback: bool,
    },
    /// Take the storage backend's snapshot of a pool volume (while paused). Undo: delete
    /// that backend snapshot.
    BackendSnapshot {
        /// The disk's target.
        disk: String,
        /// The volume.
        volume: PoolVolume,
        /// The backend.
        kind: BackendKind,
        /// The backend snapshot's name (the domain snapshot's).
        snapshot: String,
    },
    /// ONE `transaction` of `blockdev-snapshot` actions: every external disk at once.
    /// Atomic in QEMU: when it fails, nothing changed. Undo (only needed when a later step
    /// before the commit point fails: a live RAM save): merge each overlay back into its
    /// backing node (active block-commit) and pivot back.
    Transaction {
        /// The actions.
        actions: Vec<OverlayAction>,
    },
    /// The snapshot-save job over `nodes` (with the vmstate on `vmstate`), or an offline
    /// internal snapshot of a stopped domain's images. Undo: delete the internal snapshot.
    InternalSnapshot {
        /// The internal snapshot's tag.
        tag: String,
        /// The nodes (or, offline, the image paths).
        nodes: Vec<String>,
        /// The node that takes the vmstate; `None`: disks only (stopped domain).
        vmstate: Option<String>,
    },
    /// Resume the vCPUs. Undo: none (the VM ends running anyway).
    Resume,
    /// Wait for the live RAM save to complete. Undo: as [`Step::SaveMemory`]'s.
    AwaitMemory {
        /// The RAM file.
        file: String,
    },
    /// Thaw the guest's file systems. Undo: none.
    Thaw,
    /// Write the snapshot's metadata and make it current. Undo: none (it is after the commit
    /// point).
    CommitMetadata {
        /// The metadata.
        snapshot: Box<DomainSnapshot>,
    },
    /// `--halt`: stop the domain. After the commit point; a failure is reported, the
    /// snapshot stands.
    Halt,
    /// `snapshot='manual'` disks of a running domain: instead of resuming, leave the vCPUs
    /// paused for the user's own snapshots of `disks`, resumed by the user's next resume or
    /// at the latest `hold_ms` from now (by a process that outlives this one). After the
    /// commit point; if the hold cannot be set up the domain is resumed and that is reported.
    HoldPaused {
        /// The snapshot's name.
        snapshot: String,
        /// The manual disks' targets.
        disks: Vec<String>,
        /// The longest hold, in milliseconds.
        hold_ms: u64,
    },
}

impl Step {
    /// A short name for messages and journals.
    pub fn label(&self) -> String {
        match self {
            Step::Freeze { .. } => "freeze".into(),
            Step::PreCreateOverlay { disk, .. } => format!("pre-create-overlay {disk}"),
            Step::AddOverlayNode { disk, .. } => format!("add-overlay-node {disk}"),
            Step::Pause { .. } => "pause".into(),
            Step::SaveMemory { .. } => "save-memory".into(),
            Step::BackendSnapshot { disk, .. } => format!("backend-snapshot {disk}"),
            Step::Transaction { .. } => "transaction".into(),
            Step::InternalSnapshot { .. } => "internal-snapshot".into(),
            Step::Resume => "resume".into(),
            Step::AwaitMemory { .. } => "await-memory".into(),
            Step::Thaw => "thaw".into(),
            Step::CommitMetadata { .. } => "commit-metadata".into(),
            Step::Halt => "halt".into(),
            Step::HoldPaused { .. } => "hold-paused".into(),
        }
    }

    /// Does the step capture something (the candidates for the commit point)?
    pub fn captures(&self) -> bool {
        matches!(
            self,
            Step::SaveMemory { live: false, .. }
                | Step::BackendSnapshot { .. }
                | Step::Transaction { .. }
                | Step::InternalSnapshot { .. }
                | Step::AwaitMemory { .. }
        )
    }
}

/// A validated plan: the steps in order and the commit point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturePlan {
    /// The domain.
    pub domain: String,
    /// The snapshot's name.
    pub name: SnapshotName,
    /// The domain's run state when planned: a running domain ends running.
    pub run_state: RunState,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The index of the commit point: the last capturing step. A failure before it is done
    /// undoes everything; once it is done the capture rolls forward (resume, thaw, commit).
    pub commit_point: usize,
    /// What each disk gets (target, location), in the domain's order.
    pub disks: Vec<(String, Location)>,
    /// The memory's location.
    pub memory: Location,
}

fn plan_error(object: &str, what: String) -> Error {
    Error::new(ErrorKind::InvalidPlan, object, what)
}

/// libvirt's default overlay name: the source without its extension, then `.NAME`.
pub fn default_overlay_path(source: &str, name: &str) -> String {
    let (dir, file) = match source.rfind('/') {
        Some(i) => source.split_at(i + 1),
        None => ("", source),
    };
    let stem = match file.rfind('.') {
        Some(i) if i > 0 => &file[..i],
        _ => file,
    };
    format!("{dir}{stem}.{name}")
}

/// A QEMU node name for the overlay of `disk` in snapshot `name` (at most 31 characters,
/// starting with a letter, unique per disk and snapshot).
pub fn overlay_node_name(disk: &str, name: &str) -> String {
    let disk: String = disk
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("snap-{disk}-{:08x}", crc32fast::hash(name.as_bytes()))
}

impl CapturePlan {
    /// Plans `req` against `dom`; `clock` gives the snapshot's creation time. Refuses what
    /// cannot be done ([`ErrorKind::InvalidPlan`], naming the disk or flag); nothing is done.
    pub fn new(req: &CaptureRequest, dom: &DomainInfo, clock: &dyn Clock) -> Result<Self> {
        let name = req.name.as_str();
        let f = &req.flags;
        let live_vm = dom.state != RunState::ShutOff;

        // Resolve the requested disks to targets, refusing unknown and duplicate ones.
        let mut chosen: Vec<Option<DiskChoice>> = vec![None; dom.disks.len()];
        for r in &req.disks {
            let i = dom
                .disks
                .iter()
                .position(|d| d.target == r.name || d.source.as_deref() == Some(r.name.as_str()))
                .ok_or_else(|| plan_error(&r.name, "no such disk in the domain".into()))?;
            if chosen[i].is_some() {
                return Err(plan_error(
                    &dom.disks[i].target,
                    "disk named more than once".into(),
                ));
            }
            chosen[i] = Some(r.choice.clone());
        }

        // The memory.
        let mem = match (&req.memory, f.disk_only) {
            (MemoryChoice::Default, true) | (MemoryChoice::No, _) => None,
            (MemoryChoice::Default, false) => {
                let any_external = chosen.iter().flatten().any(|c| {
                    matches!(
                        c,
                        DiskChoice::External { .. } | DiskChoice::Storage | DiskChoice::Manual
                    )
                });
                if live_vm && !any_external {
                    Some(MemoryChoice::Internal)
                } else {
                    None
                }
            }
            (m, true) => {
                return Err(plan_error(
                    "--disk-only",
                    format!("a disk-only snapshot cannot save memory ({m:?})"),
                ))
            }
            (m, false) => Some(m.clone()),
        };
        if mem.is_some() && !live_vm {
            return Err(plan_error(
                "memory",
                "the domain is not running: there is no memory to save".into(),
            ));
        }
        // virt-snap, QEMU and the next start resolve a relative name each against their own
        // directory: refused, as libvirt does.
        if let Some(MemoryChoice::External { file }) = &mem {
            if !file.starts_with('/') {
                return Err(plan_error(
                    "memory",
                    format!("the memory file {file:?} must be an absolute path"),
                ));
            }
        }
        let external_mem = matches!(mem, Some(MemoryChoice::External { .. }));
        if f.fallback_paused && !f.live {
            return Err(plan_error(
                "--fallback-paused",
                "--fallback-paused is the fallback of --live".into(),
            ));
        }
        if f.live && !external_mem {
            return Err(plan_error(
                "--live",
                "--live needs an external memory file (--memspec file=...)".into(),
            ));
        }
        if f.quiesce {
            if mem.is_some() {
                return Err(plan_error(
                    "--quiesce",
                    "a snapshot with memory is consistent without quiescing, and the guest \
                     is never frozen while its RAM is written: use --disk-only with --quiesce"
                        .into(),
                ));
            }
            if dom.state != RunState::Running || !dom.has_agent {
                return Err(plan_error(
                    "--quiesce",
                    "quiescing needs a running domain with a connected guest agent".into(),
                ));
            }
        }
        if f.halt && !live_vm {
            return Err(plan_error("--halt", "the domain is not running".into()));
        }

        // Per-disk defaults and checks.
        let default = if f.disk_only
            || external_mem
            || chosen.iter().flatten().any(|c| {
                matches!(
                    c,
                    DiskChoice::External { .. } | DiskChoice::Storage | DiskChoice::Manual
                )
            }) {
            DiskChoice::External {
                file: None,
                format: None,
            }
        } else {
            DiskChoice::Internal
        };
        let mut resolved = Vec::with_capacity(dom.disks.len());
        for (d, c) in dom.disks.iter().zip(chosen) {
            let c = match c {
                Some(c) => c,
                None if d.readonly || d.cdrom || d.source.is_none() => DiskChoice::No,
                None => default.clone(),
            };
            let t = &d.target;
            match &c {
                DiskChoice::No => {}
                _ if d.source.is_none() => {
                    return Err(plan_error(t, "the disk has no source (empty cdrom)".into()))
                }
                _ if d.readonly || d.cdrom => {
                    return Err(plan_error(
                        t,
                        "a read-only disk or cdrom cannot be snapshotted: use snapshot='no'".into(),
                    ))
                }
                DiskChoice::Internal if d.format != "qcow2" => {
                    return Err(plan_error(
                        t,
                        format!(
                            "an internal snapshot needs a qcow2 image, this disk is {}",
                            d.format
                        ),
                    ))
                }
                DiskChoice::Storage if d.volume.as_ref().and_then(|v| v.backend).is_none() => {
                    return Err(plan_error(
                        t,
                        "snapshot='storage' needs a volume of a pool whose backend snapshots \
                         volumes (btrfs, LVM, reflink dir); this disk is not one"
                            .into(),
                    ))
                }
                DiskChoice::Storage if !live_vm => {}
                DiskChoice::External { file: None, .. }
                    if d.volume.is_none()
                        && d.source.as_deref().is_some_and(|s| s.starts_with("/dev/")) =>
                {
                    return Err(plan_error(
                        t,
                        "an external snapshot of a block device needs an explicit overlay file"
                            .into(),
                    ))
                }
                DiskChoice::External {
                    format: Some(fmt), ..
                } if fmt != "qcow2" => {
                    return Err(plan_error(
                        t,
                        format!("an overlay must be qcow2, not {fmt}"),
                    ))
                }
                _ => {}
            }
            resolved.push(c);
        }
        let has = |p: fn(&DiskChoice) -> bool| resolved.iter().any(p);
        let internal = has(|c| matches!(c, DiskChoice::Internal));
        let external = has(|c| matches!(c, DiskChoice::External { .. }));
        let storage = has(|c| matches!(c, DiskChoice::Storage));
        let manual = has(|c| matches!(c, DiskChoice::Manual));
        if manual && mem.is_some() {
            return Err(plan_error(
                "disks",
                "manual disks are snapshotted by the user while the domain is paused, after \
                 the capture: a snapshot with manual disks saves no memory (use --disk-only)"
                    .into(),
            ));
        }
        if manual && f.quiesce {
            return Err(plan_error(
                "--quiesce",
                "the guest would stay frozen for as long as the manual snapshots take, past \
                 the freeze budget: quiesce is not combined with manual disks"
                    .into(),
            ));
        }
        if internal && (external || storage) {
            return Err(plan_error(
                "disks",
                "internal and external (or storage) disk snapshots cannot be mixed".into(),
            ));
        }
        if internal && external_mem {
            return Err(plan_error(
                "memory",
                "internal disk snapshots cannot be combined with an external memory file".into(),
            ));
        }
        if matches!(mem, Some(MemoryChoice::Internal)) && (external || storage) {
            return Err(plan_error(
                "memory",
                "an internal memory snapshot needs internal disk snapshots".into(),
            ));
        }
        if matches!(mem, Some(MemoryChoice::Internal)) && !internal {
            return Err(plan_error(
                "memory",
                "an internal memory snapshot needs at least one internal (qcow2) disk".into(),
            ));
        }
        if internal && live_vm && mem.is_none() {
            return Err(plan_error(
                "disks",
                "internal disk-only snapshots of a running domain are not supported: use \
                 external disks, or include the memory"
                    .into(),
            ));
        }
        if !internal && !external && !storage && !manual && mem.is_none() {
            return Err(plan_error("disks", "nothing to capture".into()));
        }
        if f.reuse_external && !external {
            return Err(plan_error(
                "--reuse-external",
                "no external disk to reuse an overlay for".into(),
            ));
        }
        // Overlay paths must not collide with each other or with a disk's source.
        let mut paths = BTreeSet::new();

        // The steps.
        let mut steps = Vec::new();
        let running = dom.state == RunState::Running;
        let mut actions = Vec::new();
        let mut snap_disks = Vec::new();
        let mut locations = Vec::new();
        for (d, c) in dom.disks.iter().zip(&resolved) {
            let loc = match c {
                DiskChoice::No => Location::No,
                DiskChoice::Internal => Location::Internal,
                DiskChoice::Storage => Location::Storage,
                DiskChoice::Manual => Location::Manual,
                DiskChoice::External { .. } => Location::External,
            };
            locations.push((d.target.clone(), loc));
            let mut md = xml::Disk {
                name: d.target.clone(),
                snapshot: Some(loc),
                ..Default::default()
            };
            if let DiskChoice::External { file, format } = c {
                let source = d.source.clone().unwrap_or_default();
                let path = file
                    .clone()
                    .unwrap_or_else(|| default_overlay_path(&source, name));
                let format = format.clone().unwrap_or_else(|| "qcow2".into());
                if !path.starts_with('/') {
                    return Err(plan_error(
                        &d.target,
                        format!("the overlay file {path:?} must be an absolute path"),
                    ));
                }
                if !paths.insert(path.clone())
                    || dom.disks.iter().any(|o| o.source.as_deref() == Some(&path))
                {
                    return Err(plan_error(
                        &d.target,
                        format!("overlay {path} is used twice or is a disk's image"),
                    ));
                }
                steps.push(Step::PreCreateOverlay {
                    disk: d.target.clone(),
                    path: path.clone(),
                    backing: source,
                    backing_format: d.format.clone(),
                    format: format.clone(),
                    reuse: f.reuse_external,
                });
                if live_vm {
                    let node = overlay_node_name(&d.target, name);
                    steps.push(Step::AddOverlayNode {
                        disk: d.target.clone(),
                        node: node.clone(),
                        path: path.clone(),
                        format: format.clone(),
                    });
                    actions.push(OverlayAction {
                        disk: d.target.clone(),
                        node: d.node.clone(),
                        overlay: node,
                    });
                }
                md.source_type = Some("file".into());
                md.driver = Some(xml::Driver {
                    format: Some(format),
                    ..Default::default()
                });
                md.source = Some(xml::Source {
                    file: Some(path),
                    ..Default::default()
                });
            }
            snap_disks.push(md);
        }
        // Overlays are made before the freeze, so that the guest is frozen for the capture
        // alone.
        if f.quiesce {
            steps.push(Step::Freeze {
                budget_ms: req.freeze_budget_ms,
            });
        }
        let hold = running && manual && !f.halt;
        let pause = running && (storage || external_mem || manual);
        if pause {
            steps.push(Step::Pause {
                budget_ms: req.pause_budget_ms,
            });
        }
        if let Some(MemoryChoice::External { file }) = &mem {
            steps.push(Step::SaveMemory {
                fallback: f.live && f.fallback_paused,
                file: file.clone(),
                live: f.live,
            });
        }
        for (d, c) in dom.disks.iter().zip(&resolved) {
            if let (DiskChoice::Storage, Some(v)) = (c, &d.volume) {
                steps.push(Step::BackendSnapshot {
                    disk: d.target.clone(),
                    volume: v.clone(),
                    kind: v.backend.expect("checked above"),
                    snapshot: name.to_string(),
                });
            }
        }
        if !actions.is_empty() {
            steps.push(Step::Transaction { actions });
        }
        if internal {
            let nodes = dom
                .disks
                .iter()
                .zip(&resolved)
                .filter(|(_, c)| matches!(c, DiskChoice::Internal))
                .map(|(d, _)| {
                    if live_vm {
                        d.node.clone()
                    } else {
                        d.source.clone().unwrap_or_default()
                    }
                })
                .collect::<Vec<_>>();
            steps.push(Step::InternalSnapshot {
                tag: name.to_string(),
                vmstate: mem.as_ref().map(|_| nodes[0].clone()),
                nodes,
            });
        }
        if pause && !hold {
            steps.push(Step::Resume);
        }
        if let (Some(MemoryChoice::External { file }), true) = (&mem, f.live) {
            steps.push(Step::AwaitMemory { file: file.clone() });
        }
        if f.quiesce {
            steps.push(Step::Thaw);
        }
        // Offline, an external disk is captured by its overlay file alone (no node, no
        // transaction): the last overlay made is the commit point.
        // Manual disks alone capture nothing here: the pause (running) or the metadata
        // (stopped) is the commit point.
        let commit_point = steps
            .iter()
            .rposition(Step::captures)
            .or_else(|| {
                steps
                    .iter()
                    .rposition(|s| !live_vm && matches!(s, Step::PreCreateOverlay { .. }))
            })
            .or_else(|| {
                let p = steps.iter().rposition(|s| matches!(s, Step::Pause { .. }));
                p.filter(|_| manual)
            });
        let manual_only_offline = commit_point.is_none() && manual;

        let memory = match &mem {
            None => Location::No,
            Some(MemoryChoice::Internal) => Location::Internal,
            Some(_) => Location::External,
        };
        let state = match (dom.state, memory) {
            (RunState::ShutOff, _) => SnapshotState::Shutoff,
            (_, Location::No) => SnapshotState::DiskSnapshot,
            (RunState::Running, _) => SnapshotState::Running,
            (RunState::Paused, _) => SnapshotState::Paused,
        };
        if !f.no_metadata {
            let snapshot = DomainSnapshot {
                name: Some(req.name.clone()),
                description: req.description.clone(),
                state: Some(state),
                parent: dom.current.clone(),
                creation_time: Some(clock.unix_time()),
                memory: Some(xml::Memory {
                    snapshot: Some(memory),
                    file: match &mem {
                        Some(MemoryChoice::External { file }) => Some(file.clone()),
                        _ => None,
                    },
                    ..Default::default()
                }),
                disks: snap_disks,
                domain: dom.snapshot_copy(),
                ..Default::default()
            };
            steps.push(Step::CommitMetadata {
                snapshot: Box::new(snapshot),
            });
        }
        let commit_point =
            match commit_point {
                Some(c) => c,
                None if manual_only_offline && !f.no_metadata => steps.len() - 1,
                None => return Err(plan_error(
                    "disks",
                    "nothing to capture: only manual disks of a stopped domain, and no metadata"
                        .into(),
                )),
            };
        if f.halt {
            steps.push(Step::Halt);
        }
        if hold {
            steps.push(Step::HoldPaused {
                snapshot: name.to_string(),
                disks: dom
                    .disks
                    .iter()
                    .zip(&resolved)
                    .filter(|(_, c)| matches!(c, DiskChoice::Manual))
                    .map(|(d, _)| d.target.clone())
                    .collect(),
                hold_ms: req.manual_hold_ms,
            });
        }
        Ok(CapturePlan {
            domain: dom.name.clone(),
            name: req.name.clone(),
            run_state: dom.state,
            steps,
            commit_point,
            disks: locations,
            memory,
        })
    }

    /// Does the plan pause the vCPUs?
    pub fn pauses(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Pause { .. }))
    }

    /// Does the plan freeze the guest?
    pub fn freezes(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Freeze { .. }))
    }
}
