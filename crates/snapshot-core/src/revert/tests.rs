//! A recording fake of the domain (its QEMU, its images with their internal snapshots, its
//! overlay files and definition, its pool volumes with their volume snapshots), every kind
//! of revert run to completion, a failure injected
//! at every step (the domain ends as it was), a kill at every step recovered, and the
//! planning rules.

use super::*;
use crate::capture::{BackendKind, DomainDisk, DomainInfo, PoolVolume, RunState};
use crate::error::{Error, ErrorKind};
use crate::name::SnapshotName;
use crate::ops::DomainJournal;
use crate::store::{DomainStore, SnapshotStore};
use crate::testkit::{block_on, FakeVolume as Vol, FakeVolumes, Faults, Faulty, Inject, Killed};
use crate::xml::{self, DomainSnapshot, Location, RawXml, SnapshotState};
use crate::DomainDef;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

/// An image: its current data, and its internal snapshots (disk data, RAM if it holds the
/// vmstate).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Img {
    data: String,
    tags: BTreeMap<String, (String, Option<String>)>,
}

/// What must be as it was after a failed revert.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    images: BTreeMap<String, Img>,
    volumes: FakeVolumes,
    overlays: BTreeMap<String, String>,
    definition: String,
    roots: BTreeMap<String, String>,
    nodes: BTreeMap<String, (String, Option<String>)>,
}

#[derive(Debug, Default)]
struct State {
    up: bool,
    running: bool,
    pid: u32,
    incoming: bool,
    ram: String,
    images: BTreeMap<String, Img>,
    /// Pool volumes, by `pool/volume`.
    volumes: FakeVolumes,
    /// Overlay files: path, backing.
    overlays: BTreeMap<String, String>,
    memory_files: Vec<String>,
    definition: String,
    /// The definition the running QEMU was started from.
    started_with: String,
    /// Each disk's top node in the running QEMU.
    roots: BTreeMap<String, String>,
    /// The QEMU's nodes: node, (image, backing image).
    nodes: BTreeMap<String, (String, Option<String>)>,
    violations: Vec<String>,
    faults: Faults,
}

impl State {
    fn files(&self) -> Files {
        Files {
            images: self.images.clone(),
            volumes: self.volumes.clone(),
            overlays: self.overlays.clone(),
            definition: self.definition.clone(),
            roots: self.roots.clone(),
            nodes: self.nodes.clone(),
        }
    }

    fn offline(&mut self, what: &str) {
        if self.up {
            self.violations.push(format!("{what} while QEMU runs"));
        }
    }

    fn img(&mut self, d: &InternalDisk) -> Result<&mut Img> {
        self.images
            .get_mut(&d.image)
            .ok_or_else(|| Error::backend(&d.image, "no such image"))
    }
}

#[derive(Debug, Default)]
struct World(Mutex<State>);

impl Faulty for World {
    type State = State;
    fn mutex(&self) -> &Mutex<State> {
        &self.0
    }
    fn faults(s: &mut State) -> &mut Faults {
        &mut s.faults
    }
}

impl World {
    fn caps(&self) -> Capabilities<'_> {
        Capabilities {
            machine: self,
            images: self,
            definition: self,
            volumes: self,
        }
    }
}

fn not_up(what: &str) -> Error {
    Error::backend(what, "QEMU is not running")
}

#[async_trait::async_trait]
impl Machine for World {
    async fn pause(&self) -> Result<()> {
        self.effect("pause", |s| {
            if !s.up {
                return Err(not_up("stop"));
            }
            s.running = false;
            Ok(())
        })
        .await
    }
    async fn resume(&self) -> Result<()> {
        self.effect("resume", |s| {
            if !s.up || s.incoming {
                return Err(not_up("cont"));
            }
            s.running = true;
            Ok(())
        })
        .await
    }
    async fn is_up(&self) -> Result<bool> {
        Ok(self.st().up)
    }
    async fn is_running(&self) -> Result<bool> {
        Ok(self.st().running)
    }
    async fn destroy(&self) -> Result<()> {
        self.effect("destroy", |s| {
            s.up = false;
            s.running = false;
            s.incoming = false;
            s.ram.clear();
            Ok(())
        })
        .await
    }
    async fn start(&self, incoming: bool) -> Result<()> {
        self.effect("start", |s| {
            if s.up {
                return Ok(());
            }
            s.up = true;
            s.running = false;
            s.pid += 1;
            s.incoming = incoming;
            s.ram = "booting".into();
            s.started_with = s.definition.clone();
            Ok(())
        })
        .await
    }
    async fn load_memory(&self, file: &str) -> Result<()> {
        self.effect("load_memory", |s| {
            if !s.up || !s.incoming {
                return Err(not_up("migrate-incoming"));
            }
            if !s.memory_files.iter().any(|f| f == file) {
                return Err(Error::backend(file, "no such file"));
            }
            s.ram = format!("file:{file}");
            s.incoming = false;
            Ok(())
        })
        .await
    }
    async fn reset(&self) -> Result<()> {
        self.effect("reset", |s| {
            if !s.up {
                return Err(not_up("system_reset"));
            }
            if s.running {
                s.violations.push("reset with running vCPUs".into());
            }
            s.ram = "reset".into();
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Images for World {
    async fn create_overlay(&self, path: &str, backing: &str, _: &str) -> Result<()> {
        self.effect("create_overlay", |s| {
            if s.overlays.contains_key(path) || s.images.contains_key(path) {
                return Err(Error::backend(path, "already exists"));
            }
            s.overlays.insert(path.into(), backing.into());
            Ok(())
        })
        .await
    }
    async fn remove_overlay(&self, path: &str, backing: &str) -> Result<()> {
        self.effect("remove_overlay", |s| {
            match s.overlays.get(path) {
                Some(b) if b == backing => {
                    s.overlays.remove(path);
                }
                Some(_) => s
                    .violations
                    .push(format!("asked to remove {path}, not ours")),
                None => {}
            }
            Ok(())
        })
        .await
    }
    async fn save_internal(&self, tag: &str, disks: &[InternalDisk]) -> Result<()> {
        self.effect("save_internal", |s| {
            s.offline("save_internal");
            for d in disks {
                let i = s.img(d)?;
                let data = i.data.clone();
                i.tags.insert(tag.into(), (data, None));
            }
            Ok(())
        })
        .await
    }
    async fn apply_internal(&self, tag: &str, disks: &[InternalDisk]) -> Result<()> {
        self.effect("apply_internal", |s| {
            s.offline("apply_internal");
            for d in disks {
                let i = s.img(d)?;
                let (data, _) = i
                    .tags
                    .get(tag)
                    .cloned()
                    .ok_or_else(|| Error::backend(tag, "no such internal snapshot"))?;
                i.data = data;
            }
            Ok(())
        })
        .await
    }
    async fn load_internal(
        &self,
        tag: &str,
        disks: &[InternalDisk],
        vmstate: &InternalDisk,
    ) -> Result<()> {
        self.effect("load_internal", |s| {
            if !s.up {
                return Err(not_up("snapshot-load"));
            }
            if s.running {
                s.violations.push("snapshot-load with running vCPUs".into());
            }
            let ram = s
                .img(vmstate)?
                .tags
                .get(tag)
                .and_then(|t| t.1.clone())
                .ok_or_else(|| Error::backend(tag, "no vmstate"))?;
            for d in disks {
                let i = s.img(d)?;
                let (data, _) = i
                    .tags
                    .get(tag)
                    .cloned()
                    .ok_or_else(|| Error::backend(tag, "no such internal snapshot"))?;
                i.data = data;
            }
            s.ram = ram;
            Ok(())
        })
        .await
    }
    async fn delete_internal(&self, tag: &str, disks: &[InternalDisk]) -> Result<()> {
        self.effect("delete_internal", |s| {
            for d in disks {
                s.img(d)?.tags.remove(tag);
            }
            Ok(())
        })
        .await
    }
    async fn add_node(&self, node: &str, path: &str) -> Result<()> {
        self.effect("add_node", |s| {
            if !s.up {
                return Err(not_up("blockdev-add"));
            }
            if s.nodes.contains_key(node) {
                return Err(Error::backend(node, "duplicate node"));
            }
            s.nodes.insert(node.into(), (path.into(), None));
            Ok(())
        })
        .await
    }
    async fn del_node(&self, node: &str) -> Result<()> {
        self.effect("del_node", |s| {
            if s.roots.values().any(|r| r == node) {
                s.violations.push(format!("deleted the node in use {node}"));
            }
            s.nodes.remove(node);
            Ok(())
        })
        .await
    }
    async fn repoint(&self, swaps: &[Swap]) -> Result<()> {
        self.effect("repoint", |s| {
            if s.running {
                s.violations.push("repointed with running vCPUs".into());
            }
            for sw in swaps {
                if s.roots.get(&sw.disk) != Some(&sw.top) || !s.nodes.contains_key(&sw.overlay) {
                    return Err(Error::backend(&sw.disk, "no such node"));
                }
            }
            for sw in swaps {
                s.roots.insert(sw.disk.clone(), sw.overlay.clone());
                s.nodes.get_mut(&sw.overlay).expect("checked").1 = Some(sw.base.clone());
            }
            Ok(())
        })
        .await
    }
    async fn unpoint(&self, swaps: &[Swap]) -> Result<()> {
        self.effect("unpoint", |s| {
            for sw in swaps {
                if s.roots.get(&sw.disk) == Some(&sw.overlay) {
                    s.roots.insert(sw.disk.clone(), sw.top.clone());
                    if let Some(n) = s.nodes.get_mut(&sw.overlay) {
                        n.1 = None;
                    }
                }
            }
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Definition for World {
    async fn set(&self, xml: &str) -> Result<()> {
        self.effect("set_definition", |s| {
            s.definition = xml.into();
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Volumes for World {
    async fn snapshot(&self, volume: &PoolVolume, name: &str) -> Result<()> {
        self.effect("vol_snapshot", |s| {
            s.offline("vol_snapshot");
            s.volumes.snapshot(volume, name)
        })
        .await
    }
    async fn revert(&self, volume: &PoolVolume, name: &str) -> Result<()> {
        self.effect("vol_revert", |s| {
            s.offline("vol_revert");
            s.volumes.revert(volume, name)
        })
        .await
    }
    async fn delete_snapshot(&self, volume: &PoolVolume, name: &str) -> Result<()> {
        // Also while QEMU runs (for the domain), unlike the two above.
        self.effect("vol_delete_snapshot", |s| {
            s.volumes.delete_snapshot(volume, name)
        })
        .await
    }
}

impl Facts for World {
    fn volume_snapshots(&self, pool: &str, volume: &str) -> Option<Vec<String>> {
        self.st()
            .volumes
            .get(pool, volume)
            .map(|v| v.snaps.keys().cloned().collect())
    }
    fn exists(&self, path: &str) -> bool {
        let s = self.st();
        s.images.contains_key(path)
            || s.overlays.contains_key(path)
            || s.memory_files.iter().any(|f| f == path)
    }
    fn backing_chain(&self, image: &str) -> Vec<String> {
        let s = self.st();
        std::iter::successors(s.overlays.get(image), |b| s.overlays.get(*b))
            .cloned()
            .collect()
    }
    fn internal_snapshots(&self, image: &str) -> Vec<String> {
        self.st()
            .images
            .get(image)
            .map(|i| i.tags.keys().cloned().collect())
            .unwrap_or_default()
    }
}

// ---- the modes ----

fn def_xml(sources: &[(&str, &str, &str)]) -> String {
    let disks: String = sources
        .iter()
        .map(|(t, src, fmt)| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>\
                 <source file='{src}'/><target dev='{t}' bus='virtio'/></disk>"
            )
        })
        .collect();
    format!(
        "<domain type='kvm'><name>vm</name><uuid>0b0e6b0a-6f7e-4a5e-9d6c-2d1f3b7b9a01</uuid>\
         <memory unit='KiB'>131072</memory><os><type arch='x86_64'>hvm</type></os>\
         <devices>{disks}</devices></domain>"
    )
}

fn snapshot_meta(
    state: SnapshotState,
    mem: Location,
    mem_file: Option<&str>,
    disks: &[(&str, Location, Option<&str>)],
    domain: Option<String>,
) -> DomainSnapshot {
    DomainSnapshot {
        name: Some(SnapshotName::new("s1").unwrap()),
        state: Some(state),
        creation_time: Some(1),
        memory: Some(xml::Memory {
            snapshot: Some(mem),
            file: mem_file.map(String::from),
            ..Default::default()
        }),
        disks: disks
            .iter()
            .map(|(n, l, src)| xml::Disk {
                name: n.to_string(),
                snapshot: Some(*l),
                source: src.map(|f| xml::Source {
                    file: Some(f.into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        domain: domain.map(|d| RawXml::element(&d).unwrap()),
        ..Default::default()
    }
}

/// A revert mode: the domain, the snapshot, the flags, and the world before.
struct Mode {
    label: String,
    dom: DomainInfo,
    snap: DomainSnapshot,
    flags: RevertFlags,
    kind: RevertKind,
    final_state: RunState,
    setup: fn(&mut State),
}

fn disk(target: &str, source: &str) -> DomainDisk {
    DomainDisk {
        target: target.into(),
        source: Some(source.into()),
        format: "qcow2".into(),
        volume: None,
        readonly: false,
        cdrom: false,
        node: format!("node-{target}"),
    }
}

fn internal_world(s: &mut State) {
    for (t, ram) in [("vda", Some("ram-s1")), ("vdb", None)] {
        let mut i = Img {
            data: format!("now-{t}"),
            ..Default::default()
        };
        i.tags
            .insert("s1".into(), (format!("s1-{t}"), ram.map(String::from)));
        i.tags.insert("other".into(), (format!("other-{t}"), None));
        s.images.insert(format!("/img/{t}.qcow2"), i);
    }
    s.definition = def_xml(&[
        ("vda", "/img/vda.qcow2", "qcow2"),
        ("vdb", "/img/vdb.qcow2", "qcow2"),
    ]);
}

fn external_world(s: &mut State) {
    for t in ["vda", "vdb"] {
        s.images.insert(format!("/img/{t}.qcow2"), Img::default());
        s.overlays
            .insert(format!("/img/{t}.s1"), format!("/img/{t}.qcow2"));
    }
    // A revert overlay made before: the next one is .r2.
    s.overlays
        .insert("/img/vda.s1.r1".into(), "/img/vda.qcow2".into());
    s.memory_files.push("/img/vm.mem".into());
    s.definition = def_xml(&[
        ("vda", "/img/vda.s1", "qcow2"),
        ("vdb", "/img/vdb.s1", "qcow2"),
    ]);
    for t in ["vda", "vdb"] {
        s.roots.insert(t.into(), format!("node-{t}"));
        s.nodes.insert(
            format!("node-{t}"),
            (format!("/img/{t}.s1"), Some(format!("/img/{t}.qcow2"))),
        );
    }
}

/// The domain on another branch: its disks' chains do not hold the snapshot's images (so
/// an external revert cannot re-point them in place).
fn external_world_elsewhere(s: &mut State) {
    external_world(s);
    for t in ["vda", "vdb"] {
        s.images.insert(format!("/img/{t}.other"), Img::default());
        s.overlays
            .insert(format!("/img/{t}.s1"), format!("/img/{t}.other"));
    }
}

fn pool_volume(v: &str) -> PoolVolume {
    PoolVolume {
        pool: "p".into(),
        volume: v.into(),
        backend: Some(BackendKind::Btrfs),
    }
}

/// Two pool volumes (vda on p/v1, vdb on p/v2), each with volume snapshots s1 and other.
fn storage_world(s: &mut State) {
    for (t, v) in [("vda", "v1"), ("vdb", "v2")] {
        let mut vol = Vol {
            data: format!("now-{t}"),
            ..Default::default()
        };
        vol.snaps.insert("s1".into(), format!("s1-{t}"));
        vol.snaps.insert("other".into(), format!("other-{t}"));
        s.volumes.0.insert(format!("p/{v}"), vol);
    }
    s.definition = def_xml(&[("vda", "/pool/v1", "raw"), ("vdb", "/pool/v2", "raw")]);
}

/// vda on pool volume p/v1 (a storage disk of s1), vdb an external disk of s1 (its overlay
/// /img/vdb.s1 on /img/vdb.qcow2), and s1's RAM file.
fn mixed_world(s: &mut State) {
    storage_world(s);
    s.volumes.0.remove("p/v2");
    s.images.insert("/img/vdb.qcow2".into(), Img::default());
    s.overlays
        .insert("/img/vdb.s1".into(), "/img/vdb.qcow2".into());
    s.memory_files.push("/img/vm.mem".into());
    s.definition = def_xml(&[("vda", "/pool/v1", "raw"), ("vdb", "/img/vdb.s1", "qcow2")]);
}

fn storage_disk(target: &str, volume: &str) -> DomainDisk {
    DomainDisk {
        source: Some(format!("/pool/{volume}")),
        format: "raw".into(),
        volume: Some(pool_volume(volume)),
        ..disk(target, "")
    }
}

/// The storage modes: vda and vdb on pool volumes, or vda on one and vdb external.
fn storage_modes() -> Vec<Mode> {
    let dom = |state, mixed: bool| DomainInfo {
        name: "vm".into(),
        state,
        has_agent: false,
        disks: if mixed {
            vec![storage_disk("vda", "v1"), disk("vdb", "/img/vdb.s1")]
        } else {
            vec![storage_disk("vda", "v1"), storage_disk("vdb", "v2")]
        },
        current: Some(SnapshotName::new("other").unwrap()),
        domain_xml: Some(
            RawXml::element(&if mixed {
                def_xml(&[("vda", "/pool/v1", "raw"), ("vdb", "/img/vdb.s1", "qcow2")])
            } else {
                def_xml(&[("vda", "/pool/v1", "raw"), ("vdb", "/pool/v2", "raw")])
            })
            .unwrap(),
        ),
        running_xml: None,
    };
    let only = snapshot_meta(
        SnapshotState::DiskSnapshot,
        Location::No,
        None,
        &[
            ("vda", Location::Storage, None),
            ("vdb", Location::Storage, None),
        ],
        Some(def_xml(&[
            ("vda", "/pool/v1", "raw"),
            ("vdb", "/pool/v2", "raw"),
        ])),
    );
    let only_with_ram = |st| {
        snapshot_meta(
            st,
            Location::External,
            Some("/img/vm.mem"),
            &[
                ("vda", Location::Storage, None),
                ("vdb", Location::Storage, None),
            ],
            Some(def_xml(&[
                ("vda", "/pool/v1", "raw"),
                ("vdb", "/pool/v2", "raw"),
            ])),
        )
    };
    let storage_with_ram = only_with_ram(SnapshotState::Running);
    let mixed = |mem: Location, file: Option<&str>, st| {
        snapshot_meta(
            st,
            mem,
            file,
            &[
                ("vda", Location::Storage, None),
                ("vdb", Location::External, Some("/img/vdb.s1")),
            ],
            Some(def_xml(&[
                ("vda", "/pool/v1", "raw"),
                ("vdb", "/img/vdb.qcow2", "qcow2"),
            ])),
        )
    };
    let flags = |running, paused| RevertFlags {
        running,
        paused,
        force: false,
    };
    use RunState::*;
    let m = |label: &str, dom, snap, flags, final_state, setup: fn(&mut State)| Mode {
        label: label.into(),
        dom,
        snap,
        flags,
        kind: RevertKind::Storage,
        final_state,
        setup,
    };
    vec![
        m(
            "storage, shut off",
            dom(ShutOff, false),
            only.clone(),
            flags(false, false),
            ShutOff,
            storage_world,
        ),
        m(
            "storage, shut off, --running",
            dom(ShutOff, false),
            only.clone(),
            flags(true, false),
            Running,
            storage_world,
        ),
        m(
            "storage, running",
            dom(Running, false),
            only.clone(),
            flags(false, false),
            ShutOff,
            storage_world,
        ),
        m(
            "storage, paused domain, --paused",
            dom(Paused, false),
            only,
            flags(false, true),
            Paused,
            storage_world,
        ),
        m(
            "storage and external disks, running, --running",
            dom(Running, true),
            mixed(Location::No, None, SnapshotState::DiskSnapshot),
            flags(true, false),
            Running,
            mixed_world,
        ),
        Mode {
            kind: RevertKind::StorageMemory,
            ..m(
                "storage disks with a RAM file, running",
                dom(Running, false),
                storage_with_ram,
                flags(false, false),
                Running,
                storage_ram_world,
            )
        },
        Mode {
            kind: RevertKind::StorageMemory,
            ..m(
                "storage disks with a RAM file, shut off, --paused",
                dom(ShutOff, false),
                only_with_ram(SnapshotState::Running),
                flags(false, true),
                Paused,
                storage_ram_world,
            )
        },
        Mode {
            kind: RevertKind::StorageMemory,
            ..m(
                "storage and external disks with a RAM file, paused snapshot, running",
                dom(Running, true),
                mixed(
                    Location::External,
                    Some("/img/vm.mem"),
                    SnapshotState::Paused,
                ),
                flags(false, false),
                Paused,
                mixed_world,
            )
        },
    ]
}

/// [`storage_world`] with s1's RAM file.
fn storage_ram_world(s: &mut State) {
    storage_world(s);
    s.memory_files.push("/img/vm.mem".into());
}

fn modes() -> Vec<Mode> {
    modes_without_config()
        .into_iter()
        .chain(config_modes())
        .collect()
}

fn modes_without_config() -> Vec<Mode> {
    let internal_dom = |state| DomainInfo {
        name: "vm".into(),
        state,
        has_agent: false,
        disks: vec![disk("vda", "/img/vda.qcow2"), disk("vdb", "/img/vdb.qcow2")],
        current: Some(SnapshotName::new("other").unwrap()),
        domain_xml: Some(
            RawXml::element(&def_xml(&[
                ("vda", "/img/vda.qcow2", "qcow2"),
                ("vdb", "/img/vdb.qcow2", "qcow2"),
            ]))
            .unwrap(),
        ),
        running_xml: None,
    };
    let external_dom = |state| DomainInfo {
        name: "vm".into(),
        state,
        has_agent: false,
        disks: vec![disk("vda", "/img/vda.s1"), disk("vdb", "/img/vdb.s1")],
        current: Some(SnapshotName::new("s1").unwrap()),
        domain_xml: Some(
            RawXml::element(&def_xml(&[
                ("vda", "/img/vda.s1", "qcow2"),
                ("vdb", "/img/vdb.s1", "qcow2"),
            ]))
            .unwrap(),
        ),
        running_xml: None,
    };
    let int_disks = [
        ("vda", Location::Internal, None),
        ("vdb", Location::Internal, None),
    ];
    let ext_disks = [
        ("vda", Location::External, Some("/img/vda.s1")),
        ("vdb", Location::External, Some("/img/vdb.s1")),
    ];
    let copy = || {
        Some(def_xml(&[
            ("vda", "/img/vda.qcow2", "qcow2"),
            ("vdb", "/img/vdb.qcow2", "qcow2"),
        ]))
    };
    let ram_snap = |st| snapshot_meta(st, Location::Internal, None, &int_disks, copy());
    let off_snap = snapshot_meta(
        SnapshotState::Shutoff,
        Location::No,
        None,
        &int_disks,
        copy(),
    );
    let ext_snap = snapshot_meta(
        SnapshotState::DiskSnapshot,
        Location::No,
        None,
        &ext_disks,
        copy(),
    );
    let mem_snap = snapshot_meta(
        SnapshotState::Running,
        Location::External,
        Some("/img/vm.mem"),
        &ext_disks,
        copy(),
    );
    let flags = |running, paused| RevertFlags {
        running,
        paused,
        force: false,
    };
    use RevertKind::*;
    use RunState::*;
    let m = |label: &str, dom, snap, flags, kind, final_state, setup: fn(&mut State)| Mode {
        label: label.into(),
        dom,
        snap,
        flags,
        kind,
        final_state,
        setup,
    };
    vec![
        m(
            "internal with RAM, running",
            internal_dom(Running),
            ram_snap(SnapshotState::Running),
            flags(false, false),
            InternalInPlace,
            Running,
            internal_world,
        ),
        m(
            "internal with RAM, running, --paused",
            internal_dom(Running),
            ram_snap(SnapshotState::Running),
            flags(false, true),
            InternalInPlace,
            Paused,
            internal_world,
        ),
        m(
            "internal with RAM (paused), paused domain, --running",
            internal_dom(Paused),
            ram_snap(SnapshotState::Paused),
            flags(true, false),
            InternalInPlace,
            Running,
            internal_world,
        ),
        m(
            "internal with RAM, shut off",
            internal_dom(ShutOff),
            ram_snap(SnapshotState::Running),
            flags(false, false),
            InternalOffline,
            Running,
            internal_world,
        ),
        m(
            "internal disk-only, shut off",
            internal_dom(ShutOff),
            off_snap.clone(),
            flags(false, false),
            InternalOffline,
            ShutOff,
            internal_world,
        ),
        m(
            "internal disk-only, shut off, --paused",
            internal_dom(ShutOff),
            off_snap.clone(),
            flags(false, true),
            InternalOffline,
            Paused,
            internal_world,
        ),
        m(
            "internal disk-only, running",
            internal_dom(Running),
            off_snap.clone(),
            flags(false, false),
            InternalRestart,
            ShutOff,
            internal_world,
        ),
        m(
            "internal disk-only, running, --running",
            internal_dom(Running),
            off_snap,
            flags(true, false),
            InternalRestart,
            Running,
            internal_world,
        ),
        m(
            "external disk-only, shut off",
            external_dom(ShutOff),
            ext_snap.clone(),
            flags(false, false),
            External,
            ShutOff,
            external_world,
        ),
        m(
            "external disk-only, running",
            external_dom(Running),
            ext_snap.clone(),
            flags(false, false),
            External,
            ShutOff,
            external_world,
        ),
        m(
            "external disk-only, running, --running: in place",
            external_dom(Running),
            ext_snap.clone(),
            flags(true, false),
            ExternalInPlace,
            Running,
            external_world,
        ),
        m(
            "external disk-only, paused domain, --paused: in place",
            external_dom(Paused),
            ext_snap.clone(),
            flags(false, true),
            ExternalInPlace,
            Paused,
            external_world,
        ),
        m(
            "external disk-only, running elsewhere (another branch), --running: in place",
            external_dom(Running),
            ext_snap,
            flags(true, false),
            ExternalInPlace,
            Running,
            external_world_elsewhere,
        ),
        m(
            "external with RAM, paused domain",
            external_dom(Paused),
            mem_snap.clone(),
            flags(false, false),
            ExternalMemory,
            Running,
            external_world,
        ),
        m(
            "external with RAM, shut off, --paused",
            external_dom(ShutOff),
            mem_snap,
            flags(false, true),
            ExternalMemory,
            Paused,
            external_world,
        ),
    ]
    .into_iter()
    .chain(storage_modes())
    .collect()
}

/// A snapshot's copy with twice the memory of [`def_xml`]'s (the domain's memory was
/// lowered since the snapshot).
fn bigger(xml: String) -> String {
    xml.replace(">131072<", ">262144<")
}

/// Reverts to a snapshot whose configuration (its memory) differs from the domain's now:
/// the snapshot's comes back, and a revert that would have been in place restarts QEMU
/// (with --force).
fn config_modes() -> Vec<Mode> {
    let mut out = Vec::new();
    for mut m in modes_without_config() {
        let (kind, force) = match (m.label.as_str(), m.kind) {
            ("internal with RAM, running", _) => (RevertKind::InternalRestart, true),
            ("external disk-only, running, --running: in place", _) => (RevertKind::External, true),
            (
                _,
                RevertKind::InternalOffline
                | RevertKind::External
                | RevertKind::Storage
                | RevertKind::StorageMemory,
            ) => (m.kind, false),
            _ => continue,
        };
        if out.iter().any(|o: &Mode| o.kind == kind && !force) && !force {
            continue;
        }
        m.label = format!("{}, configuration changed since", m.label);
        m.kind = kind;
        m.flags.force = force;
        m.snap.domain = m
            .snap
            .domain
            .map(|d| RawXml::element(&bigger(d.as_str().to_string())).unwrap());
        out.push(m);
    }
    out
}

struct Env {
    _dir: tempfile::TempDir,
    store: DomainStore,
    world: World,
    before: Files,
    pid: u32,
    ram: String,
}

fn env(mode: &Mode) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(dir.path().join("snapshots"))
        .domain("vm")
        .unwrap();
    std::fs::create_dir_all(store.dir()).unwrap();
    store.save(&mode.snap).unwrap();
    if let Some(c) = &mode.dom.current {
        if c.as_str() != "s1" {
            let mut other = mode.snap.clone();
            other.name = Some(c.clone());
            store.save(&other).unwrap();
        }
    }
    store.set_current(mode.dom.current.as_ref()).unwrap();
    let world = World::default();
    {
        let mut s = world.st();
        (mode.setup)(&mut s);
        s.up = mode.dom.state != RunState::ShutOff;
        s.running = mode.dom.state == RunState::Running;
        s.pid = 100;
        s.ram = if s.up { "now".into() } else { String::new() };
        s.started_with = s.definition.clone();
    }
    let before = world.st().files();
    Env {
        _dir: dir,
        store,
        world,
        before,
        pid: 100,
        ram: if mode.dom.state != RunState::ShutOff {
            "now".into()
        } else {
            String::new()
        },
    }
}

fn req(mode: &Mode) -> RevertRequest {
    RevertRequest {
        name: SnapshotName::new("s1").unwrap(),
        flags: mode.flags,
    }
}

fn plan_of(mode: &Mode, w: &World) -> RevertPlan {
    RevertPlan::new(&req(mode), &mode.dom, &mode.snap, w)
        .unwrap_or_else(|e| panic!("{}: {e}", mode.label))
}

fn journal(e: &Env) -> DomainJournal {
    DomainJournal::open(e.store.journal_path()).unwrap()
}

/// The forward effect calls (every step but making the snapshot current, which is the
/// store's).
fn effect_steps(plan: &RevertPlan) -> Vec<(usize, usize, String)> {
    plan.steps
        .iter()
        .enumerate()
        .filter(|(_, s)| !matches!(s, Step::SetCurrent { .. }))
        .enumerate()
        .map(|(k, (i, s))| (k, i, s.label()))
        .collect()
}

/// The guarantees after a failed or undone revert: everything as it was.
fn assert_as_it_was(e: &Env, mode: &Mode, plan: &RevertPlan, ctx: &str) {
    let s = e.world.st();
    assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
    assert_eq!(s.up, mode.dom.state != RunState::ShutOff, "{ctx}: up");
    assert_eq!(
        s.running,
        mode.dom.state == RunState::Running,
        "{ctx}: running"
    );
    assert_eq!(s.files(), e.before, "{ctx}: files");
    let destroyed = plan.steps.iter().any(|s| matches!(s, Step::Destroy { .. }));
    if s.up && !destroyed {
        assert_eq!(s.pid, e.pid, "{ctx}: same QEMU");
        assert_eq!(s.ram, e.ram, "{ctx}: RAM");
    }
    if s.up {
        assert_eq!(
            s.started_with, e.before.definition,
            "{ctx}: QEMU's definition"
        );
    }
    drop(s);
    assert_eq!(
        e.store.current().unwrap(),
        mode.dom.current,
        "{ctx}: current"
    );
    assert!(
        e.store.overlays().unwrap().overlays.is_empty(),
        "{ctx}: overlay record"
    );
    assert!(journal(e).pending().is_empty(), "{ctx}: journal pending");
}

/// The guarantees after a completed revert (`warned`: a step after the commit point
/// failed).
fn assert_reverted(e: &Env, mode: &Mode, plan: &RevertPlan, warned: bool, ctx: &str) {
    let s = e.world.st();
    assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
    assert_eq!(plan.kind, mode.kind, "{ctx}: kind");
    assert_eq!(plan.final_state, mode.final_state, "{ctx}: final state");
    if !warned {
        // (A storage revert's start after the commit point may be what failed.)
        assert_eq!(s.up, mode.final_state != RunState::ShutOff, "{ctx}: up");
        assert_eq!(
            s.running,
            mode.final_state == RunState::Running,
            "{ctx}: running"
        );
    }
    let with_ram = matches!(
        mode.kind,
        RevertKind::InternalInPlace | RevertKind::ExternalMemory
    ) || (mode.kind == RevertKind::InternalOffline
        && plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::LoadInternal { .. })));
    match mode.kind {
        RevertKind::Storage | RevertKind::StorageMemory => {
            for (v, vol) in &s.volumes.0 {
                assert_eq!(vol.data, vol.snaps["s1"], "{ctx}: {v} reverted");
                if !warned {
                    let keys: Vec<_> = vol.snaps.keys().collect();
                    assert_eq!(keys, ["other", "s1"], "{ctx}: {v}: undo snapshot left");
                }
            }
            assert!(!s.volumes.0.is_empty(), "{ctx}");
            let after = plan.steps.iter().find_map(|s| match s {
                Step::SwitchDefinition { after, .. } => Some(after.clone()),
                _ => None,
            });
            let external = plan
                .steps
                .iter()
                .any(|s| matches!(s, Step::CreateOverlay { .. }));
            if let Some(after) = after {
                assert_eq!(s.definition, after, "{ctx}: definition");
            }
            if external {
                // The external disk of the same snapshot: a new overlay on its image.
                assert!(s.definition.contains("/img/vdb.s1.r1"), "{ctx}");
                assert_eq!(s.overlays["/img/vdb.s1.r1"], "/img/vdb.qcow2", "{ctx}");
                assert!(s.overlays.contains_key("/img/vdb.s1"), "{ctx}: kept");
            } else if !mode.label.contains("configuration changed") {
                assert_eq!(s.definition, e.before.definition, "{ctx}: definition");
            }
            if plan
                .steps
                .iter()
                .any(|s| matches!(s, Step::LoadMemory { .. }))
            {
                assert_eq!(s.ram, "file:/img/vm.mem", "{ctx}: RAM");
            }
            if s.up {
                assert_eq!(&s.started_with, &s.definition, "{ctx}: started on it");
                assert_ne!(s.pid, e.pid, "{ctx}: a new QEMU");
            }
        }
        RevertKind::InternalInPlace | RevertKind::InternalOffline | RevertKind::InternalRestart => {
            for (p, i) in &s.images {
                assert_eq!(i.data, i.tags["s1"].0, "{ctx}: {p} reverted");
                let keys: Vec<_> = i.tags.keys().collect();
                if !warned {
                    assert_eq!(keys, ["other", "s1"], "{ctx}: {p}: undo snapshot left");
                }
            }
            let after = plan.steps.iter().find_map(|s| match s {
                Step::SwitchDefinition { after, .. } => Some(after.clone()),
                _ => None,
            });
            let want = after.as_ref().unwrap_or(&e.before.definition);
            assert_eq!(&s.definition, want, "{ctx}: definition");
            if with_ram {
                assert_eq!(s.ram, "ram-s1", "{ctx}: RAM");
            }
            if s.up && mode.kind != RevertKind::InternalInPlace {
                assert_eq!(&s.started_with, &s.definition, "{ctx}: started on it");
            }
        }
        RevertKind::External | RevertKind::ExternalMemory | RevertKind::ExternalInPlace => {
            let after = plan.steps.iter().find_map(|s| match s {
                Step::SwitchDefinition { after, .. } => Some(after.clone()),
                _ => None,
            });
            assert_eq!(Some(&s.definition), after.as_ref(), "{ctx}: definition");
            assert!(
                s.definition.contains("/img/vda.s1.r2"),
                "{ctx}: {}",
                s.definition
            );
            assert!(
                s.definition.contains("/img/vdb.s1.r1"),
                "{ctx}: {}",
                s.definition
            );
            assert_eq!(s.overlays["/img/vda.s1.r2"], "/img/vda.qcow2", "{ctx}");
            assert_eq!(s.overlays["/img/vdb.s1.r1"], "/img/vdb.qcow2", "{ctx}");
            // The snapshot's own overlays and the earlier revert's are kept.
            for f in e.before.overlays.keys() {
                assert!(s.overlays.contains_key(f), "{ctx}: {f} removed");
            }
            if mode.kind == RevertKind::ExternalInPlace {
                assert_eq!(s.pid, e.pid, "{ctx}: the same QEMU");
                assert_eq!(s.ram, "reset", "{ctx}: the guest reset");
                for (t, img) in [("vda", "/img/vda.s1.r2"), ("vdb", "/img/vdb.s1.r1")] {
                    let root = &s.roots[t];
                    let base = format!("/img/{t}.qcow2");
                    assert_eq!(s.nodes[root], (img.to_string(), Some(base)), "{ctx}: {t}");
                    if !warned {
                        let old = format!("node-{t}");
                        assert!(!s.nodes.contains_key(&old), "{ctx}: {old} left");
                    }
                }
            } else if s.up {
                assert_eq!(&s.started_with, &s.definition, "{ctx}: started on them");
            }
            if mode.kind == RevertKind::ExternalMemory {
                assert_eq!(s.ram, "file:/img/vm.mem", "{ctx}: RAM");
            }
        }
    }
    if mode.kind == RevertKind::InternalInPlace {
        assert_eq!(s.pid, e.pid, "{ctx}: the same QEMU");
    }
    // The snapshot's configuration is the domain's again (and the running QEMU's).
    let copy = DomainDef::from_xml(mode.snap.domain.as_ref().unwrap().as_str()).unwrap();
    let now = DomainDef::from_xml(&s.definition).unwrap();
    assert_eq!(now.memory_bytes(), copy.memory_bytes(), "{ctx}: memory");
    if s.up {
        let running = DomainDef::from_xml(&s.started_with).unwrap();
        assert!(
            copy.restart_differences(&running).is_empty(),
            "{ctx}: QEMU runs {:?}",
            copy.restart_differences(&running)
        );
    }
    drop(s);
    assert_eq!(
        e.store.current().unwrap().as_ref().map(|n| n.as_str()),
        Some("s1"),
        "{ctx}: current"
    );
    // Each new overlay recorded as the revert's own, of s1.
    let rec = e.store.overlays().unwrap();
    for step in &plan.steps {
        if let Step::CreateOverlay { path, .. } = step {
            let o = rec
                .owner(path)
                .unwrap_or_else(|| panic!("{ctx}: {path} not recorded"));
            assert!(o.is_revert_of("s1"), "{ctx}: {path}: {o:?}");
        }
    }
    assert!(journal(e).pending().is_empty(), "{ctx}: journal pending");
}

#[test]
fn every_kind_reverts() {
    for mode in modes() {
        let e = env(&mode);
        let plan = plan_of(&mode, &e.world);
        let mut j = journal(&e);
        let out = block_on(run(&plan, &e.world.caps(), &mut j, &e.store))
            .unwrap_or_else(|err| panic!("{}: {err}", mode.label));
        drop(j);
        assert!(
            out.warnings.is_empty(),
            "{}: {:?}",
            mode.label,
            out.warnings
        );
        assert_reverted(&e, &mode, &plan, false, &mode.label);
    }
}

#[test]
fn the_commit_point_is_the_in_place_load_or_making_the_snapshot_current() {
    for mode in modes() {
        let w = World::default();
        (mode.setup)(&mut w.st());
        let plan = plan_of(&mode, &w);
        let cp = &plan.steps[plan.commit_point];
        if mode.kind == RevertKind::InternalInPlace {
            assert!(matches!(cp, Step::LoadInternal { .. }), "{}", mode.label);
        } else if mode.kind == RevertKind::ExternalInPlace {
            assert!(matches!(cp, Step::ResetGuest), "{}", mode.label);
        } else {
            assert!(matches!(cp, Step::SetCurrent { .. }), "{}", mode.label);
        }
        // Nothing after it needs undoing: it only finishes.
        for s in &plan.steps[plan.commit_point + 1..] {
            assert!(
                matches!(
                    s,
                    Step::SetCurrent { .. }
                        | Step::Resume
                        | Step::DropSaved { .. }
                        | Step::DropVolumeSaved { .. }
                        | Step::DropNodes { .. }
                ) || (mode.kind == RevertKind::Storage
                    && matches!(s, Step::Start { incoming: false })),
                "{}: {s:?}",
                mode.label
            );
        }
    }
}

#[test]
fn a_failure_at_every_step_leaves_the_domain_as_it_was() {
    for mode in modes() {
        let probe = env(&mode);
        let plan = plan_of(&mode, &probe.world);
        for (k, idx, label) in effect_steps(&plan) {
            let ctx = format!("{}: failure at {k} ({label})", mode.label);
            let e = env(&mode);
            e.world.st().faults.arm(k, Inject::Fail);
            let mut j = journal(&e);
            let res = block_on(run(&plan, &e.world.caps(), &mut j, &e.store));
            drop(j);
            if idx <= plan.commit_point {
                let err = res.expect_err(&ctx);
                assert_eq!(err.kind(), ErrorKind::RevertFailed, "{ctx}");
                assert!(err.undo_failures().is_empty(), "{ctx}: {err}");
                assert!(err.to_string().contains(&label), "{ctx}: {err}");
                assert_as_it_was(&e, &mode, &plan, &ctx);
            } else {
                let out = res.unwrap_or_else(|err| panic!("{ctx}: {err}"));
                assert!(!out.warnings.is_empty(), "{ctx}");
                assert_reverted(&e, &mode, &plan, true, &ctx);
            }
        }
    }
}

#[test]
fn a_kill_at_every_step_is_recovered() {
    for mode in modes() {
        let probe = env(&mode);
        let plan = plan_of(&mode, &probe.world);
        for (k, idx, label) in effect_steps(&plan) {
            for how in [Inject::KillBefore, Inject::KillAfter] {
                let ctx = format!("{}: {how:?} at {k} ({label})", mode.label);
                let e = env(&mode);
                e.world.st().faults.arm(k, how);
                let mut j = journal(&e);
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    block_on(run(&plan, &e.world.caps(), &mut j, &e.store))
                }));
                let payload = r.err().unwrap_or_else(|| panic!("{ctx}: not killed"));
                assert!(payload.is::<Killed>(), "{ctx}: a real panic");
                drop(j);
                e.world.st().faults.disarm();
                let mut j = journal(&e);
                let rec = block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
                drop(j);
                assert_eq!(rec.len(), 1, "{ctx}");
                match &rec[0] {
                    Recovered::RolledBack { undo_failures, .. } => {
                        assert!(idx < plan.commit_point, "{ctx}: rolled back");
                        assert!(undo_failures.is_empty(), "{ctx}: {undo_failures:?}");
                        assert_as_it_was(&e, &mode, &plan, &ctx);
                    }
                    Recovered::Completed { warnings, .. } => {
                        assert!(warnings.is_empty(), "{ctx}: {warnings:?}");
                        assert_reverted(&e, &mode, &plan, false, &ctx);
                    }
                }
            }
        }
    }
}

#[test]
fn recovery_of_a_journal_without_a_plan_ends_it() {
    let mode = modes().remove(0);
    let e = env(&mode);
    let mut j = journal(&e);
    j.begin(JOURNAL_KIND, "vm").unwrap();
    let rec = block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
    assert!(matches!(rec[0], Recovered::RolledBack { name: None, .. }));
    assert!(j.pending().is_empty());
}

#[test]
fn capture_and_revert_records_share_the_journal() {
    // A pending revert does not disturb a capture's recovery, nor the reverse: each kind
    // reads only its own operations from the one file.
    let mode = modes().remove(0);
    let e = env(&mode);
    let plan = plan_of(&mode, &e.world);
    let mut j = journal(&e);
    let op = j.begin(JOURNAL_KIND, "vm").unwrap();
    j.record_step(
        op,
        crate::ops::OpRecord::Revert(RevertRecord::RevertPlan {
            plan: Box::new(plan),
        }),
    )
    .unwrap();
    drop(j);
    let j = journal(&e);
    let p = j.pending();
    assert_eq!(p.len(), 1);
    assert!(matches!(
        p[0].steps[0].undo,
        crate::ops::OpRecord::Revert(RevertRecord::RevertPlan { .. })
    ));
    assert!(
        crate::ops::pending::<crate::capture::CaptureRecord>(&j, crate::capture::JOURNAL_KIND)
            .is_empty()
    );
}

// ---- planning ----

fn plan_err(mode: &Mode, w: &World) -> String {
    RevertPlan::new(&req(mode), &mode.dom, &mode.snap, w)
        .expect_err(&mode.label)
        .to_string()
}

#[test]
fn planning_refuses_what_it_cannot_revert() {
    let w = World::default();
    internal_world(&mut w.st());
    let ext = World::default();
    external_world(&mut ext.st());

    let mut m = modes().remove(0);
    m.flags.running = true;
    m.flags.paused = true;
    assert!(plan_err(&m, &w).contains("mutually exclusive"));

    // The snapshot is not in the disk's current image.
    let mut m = modes().remove(0);
    m.dom.disks[1].source = Some("/img/vdb.other".into());
    assert!(plan_err(&m, &w).contains("does not hold internal snapshot"));

    // A disk the snapshot does not know, and one it knows the domain has not any more.
    let mut m = modes().remove(0);
    m.dom.disks.push(disk("vdc", "/img/vdc.qcow2"));
    assert!(plan_err(&m, &w).contains("--force"));
    m.flags.force = true;
    let p = RevertPlan::new(&req(&m), &m.dom, &m.snap, &w).unwrap();
    assert_eq!(p.disks, ["vda", "vdb"]);
    // One the domain has not any more: back from the copy (a_disk_removed_since_...), unless
    // the copy does not describe it.
    let mut m = modes().remove(0);
    m.dom.disks.pop();
    m.snap.domain = None;
    assert!(plan_err(&m, &w).contains("no such disk any more"));

    // Storage and manual disks, mixed kinds.
    for loc in [Location::Storage, Location::Manual, Location::External] {
        let mut m = modes().remove(0);
        m.snap.disks[1].snapshot = Some(loc);
        assert!(!plan_err(&m, &w).is_empty(), "{loc:?}");
    }

    // Internal without the definition's copy needs --force; external cannot.
    let mut m = modes().remove(0);
    m.snap.domain = None;
    assert!(plan_err(&m, &w).contains("--force"));
    m.flags.force = true;
    assert!(RevertPlan::new(&req(&m), &m.dom, &m.snap, &w).is_ok());
    let mut m = modes().remove(8);
    m.snap.domain = None;
    m.flags.force = true;
    assert!(plan_err(&m, &ext).contains("names the images"));

    // A transient domain cannot be stopped and started again.
    let mut m = modes().remove(6);
    m.dom.domain_xml = None;
    assert!(plan_err(&m, &w).contains("transient"));
    let mut m = modes().remove(9);
    m.dom.domain_xml = None;
    assert!(plan_err(&m, &ext).contains("transient"));
    // ... but reverts in place.
    let mut m = modes().remove(0);
    m.dom.domain_xml = None;
    assert!(RevertPlan::new(&req(&m), &m.dom, &m.snap, &w).is_ok());

    // A missing RAM file or base image.
    let m = modes().remove(13);
    let gone = World::default();
    external_world(&mut gone.st());
    gone.st().memory_files.clear();
    assert!(plan_err(&m, &gone).contains("RAM file"));
    gone.st().images.remove("/img/vdb.qcow2");
    let m = modes().remove(9);
    assert!(plan_err(&m, &gone).contains("is missing"));
}

#[test]
fn revert_overlays_take_the_first_free_number() {
    let w = World::default();
    external_world(&mut w.st());
    assert_eq!(
        revert_overlay_path("/img/vda.qcow2", "s1", &w, &[]),
        "/img/vda.s1.r2"
    );
    assert_eq!(
        revert_overlay_path("/img/vdb.qcow2", "s1", &w, &[]),
        "/img/vdb.s1.r1"
    );
    assert_eq!(
        revert_overlay_path("/img/vdb.qcow2", "s1", &w, &["/img/vdb.s1.r1".into()]),
        "/img/vdb.s1.r2"
    );
}

#[test]
fn the_undo_snapshot_tag_is_unused() {
    let mode = modes().remove(4);
    let w = World::default();
    internal_world(&mut w.st());
    let plan = plan_of(&mode, &w);
    let Some(Step::SaveCurrent { tag, .. }) = plan.steps.first() else {
        panic!("{:?}", plan.steps)
    };
    // Taken: the next one.
    for i in w.st().images.values_mut() {
        i.tags.insert(tag.clone(), (String::new(), None));
    }
    let again = plan_of(&mode, &w);
    let Some(Step::SaveCurrent { tag: t2, .. }) = again.steps.first() else {
        panic!()
    };
    assert_eq!(t2, &format!("{tag}-2"));
}

#[test]
fn storage_plans_stop_save_revert_start_and_drop() {
    let mode = storage_modes().remove(2);
    let w = World::default();
    storage_world(&mut w.st());
    let mut m = mode;
    m.flags.running = true;
    let plan = plan_of(&m, &w);
    let labels: Vec<String> = plan.steps.iter().map(Step::label).collect();
    assert_eq!(
        labels,
        [
            "destroy",
            "save-volume vda",
            "save-volume vdb",
            "revert-volume vda",
            "revert-volume vdb",
            "set-current",
            "drop-volume-saved vda",
            "drop-volume-saved vdb",
            "start",
            "resume",
        ]
    );
    assert_eq!(plan.kind.as_str(), "storage");
    assert!(matches!(
        plan.steps[plan.commit_point],
        Step::SetCurrent { .. }
    ));
    let Step::RevertVolume {
        volume,
        snapshot,
        undo_tag,
        ..
    } = &plan.steps[3]
    else {
        panic!("{:?}", plan.steps[3])
    };
    assert_eq!((volume.pool.as_str(), volume.volume.as_str()), ("p", "v1"));
    assert_eq!(snapshot, "s1");
    assert!(undo_tag.starts_with("vs-revert-undo-"), "{undo_tag}");
    // The undo snapshot's name is unused on the volume.
    w.st()
        .volumes
        .0
        .get_mut("p/v1")
        .unwrap()
        .snaps
        .insert(undo_tag.clone(), String::new());
    let again = plan_of(&m, &w);
    let Step::SaveVolume { tag, .. } = &again.steps[1] else {
        panic!()
    };
    assert_eq!(tag, &format!("{undo_tag}-2"));
    // The journal record round-trips.
    let rec = RevertRecord::RevertPlan {
        plan: Box::new(plan.clone()),
    };
    let json = serde_json::to_string(&rec).unwrap();
    assert_eq!(serde_json::from_str::<RevertRecord>(&json).unwrap(), rec);
}

#[test]
fn storage_planning_refuses_what_it_cannot_revert() {
    let w = World::default();
    storage_world(&mut w.st());
    // The disk moved off its volume (an overlay since): no volume.
    let mut m = storage_modes().remove(0);
    m.dom.disks[0].volume = None;
    assert!(plan_err(&m, &w).contains("not on a pool volume"));
    // A pool whose backend does not snapshot volumes.
    let mut m = storage_modes().remove(0);
    m.dom.disks[0].volume.as_mut().unwrap().backend = None;
    assert!(plan_err(&m, &w).contains("backend snapshots volumes"));
    // On another volume than the snapshot's.
    let mut m = storage_modes().remove(0);
    m.dom.disks[0].volume.as_mut().unwrap().volume = "v9".into();
    let copy = "<domain type='kvm'><name>vm</name><memory unit='KiB'>131072</memory>\
        <os><type arch='x86_64'>hvm</type></os><devices>\
        <disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
        <source pool='p' volume='v1'/><target dev='vda' bus='virtio'/></disk>\
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
        <source file='/pool/v2'/><target dev='vdb' bus='virtio'/></disk></devices></domain>";
    m.snap.domain = Some(RawXml::element(copy).unwrap());
    let err = plan_err(&m, &w);
    assert!(err.contains("the snapshot's volume is p/v1"), "{err}");
    // A volume that is gone, one without the snapshot's volume snapshot.
    let gone = World::default();
    storage_world(&mut gone.st());
    gone.st().volumes.0.remove("p/v2");
    let m = storage_modes().remove(0);
    assert!(plan_err(&m, &gone).contains("does not exist"));
    gone.st().volumes.0.insert("p/v2".into(), Vol::default());
    assert!(plan_err(&m, &gone).contains("holds no volume snapshot \"s1\""));
    // A transient domain cannot be stopped and started again.
    let mut m = storage_modes().remove(2);
    m.dom.domain_xml = None;
    assert!(plan_err(&m, &w).contains("transient"));
    // Internal RAM (no capture makes one), a RAM file that is gone, internal disks mixed in.
    let mut m = storage_modes().remove(2);
    m.snap.memory.as_mut().unwrap().snapshot = Some(Location::Internal);
    assert!(plan_err(&m, &w).contains("storage disks and internal RAM"));
    let m = storage_modes().remove(5);
    assert!(plan_err(&m, &w).contains("RAM file /img/vm.mem is missing"));
    let mut m = storage_modes().remove(2);
    m.snap.disks[1].snapshot = Some(Location::Internal);
    assert!(plan_err(&m, &w).contains("mixes"));
    // Without a copy of the definition, storage disks alone still revert.
    let mut m = storage_modes().remove(0);
    m.snap.domain = None;
    assert!(RevertPlan::new(&req(&m), &m.dom, &m.snap, &w).is_ok());
}

#[test]
fn a_configuration_change_is_reverted_and_restarts_qemu_only_with_force() {
    let w = World::default();
    internal_world(&mut w.st());
    let ext = World::default();
    external_world(&mut ext.st());
    let changed = |label: &str| {
        let mut m = modes()
            .into_iter()
            .find(|m| m.label == label)
            .unwrap_or_else(|| panic!("{label}"));
        m.snap.domain = m
            .snap
            .domain
            .map(|d| RawXml::element(&bigger(d.as_str().to_string())).unwrap());
        m
    };
    // In place, without --force: refused, naming what differs.
    for (label, world, verb) in [
        ("internal with RAM, running", &w, "loaded"),
        (
            "external disk-only, running, --running: in place",
            &ext,
            "re-pointed",
        ),
    ] {
        let err = plan_err(&changed(label), world);
        assert!(
            err.contains("memory: 128 MiB now, 256 MiB in the snapshot")
                && err.contains(&format!("cannot be {verb} in place"))
                && err.contains("--force"),
            "{label}: {err}"
        );
    }
    // What QEMU runs is what counts, not the stored definition: redefined with more memory
    // while it runs (as the snapshot has), the running QEMU still has less.
    let mut m = changed("internal with RAM, running");
    m.dom.domain_xml = m.snap.domain.clone();
    m.dom.running_xml = Some(RawXml::element(&internal_dom_xml()).unwrap());
    assert!(plan_err(&m, &w).contains("memory: 128 MiB now"));
    // And the other way: the running QEMU has the snapshot's configuration, the stored
    // definition was changed since: in place, and the stored definition gets the
    // snapshot's configuration back.
    let mut m = modes().remove(0);
    m.dom.domain_xml = Some(RawXml::element(&bigger(internal_dom_xml())).unwrap());
    m.dom.running_xml = Some(RawXml::element(&internal_dom_xml()).unwrap());
    let plan = plan_of(&m, &w);
    assert_eq!(plan.kind, RevertKind::InternalInPlace);
    let after = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::SwitchDefinition { after, .. } => Some(after.clone()),
            _ => None,
        })
        .expect("the stored definition switched");
    assert!(after.contains(">131072<"), "{after}");
    // Descriptive elements alone need no restart.
    let mut m = modes().remove(0);
    m.snap.domain = Some(
        RawXml::element(
            &internal_dom_xml()
                .replace("<os>", "<description>before the upgrade</description><os>"),
        )
        .unwrap(),
    );
    assert_eq!(plan_of(&m, &w).kind, RevertKind::InternalInPlace);
    // No change, no switch.
    let plan = plan_of(&modes().remove(0), &w);
    assert!(!plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::SwitchDefinition { .. })));
}

fn internal_dom_xml() -> String {
    def_xml(&[
        ("vda", "/img/vda.qcow2", "qcow2"),
        ("vdb", "/img/vdb.qcow2", "qcow2"),
    ])
}

/// `xml` (a domain definition) without its disk `vdb`.
fn without_vdb(xml: &str) -> String {
    let mut d = DomainDef::from_xml(xml).unwrap();
    d.devices.disks.retain(|x| x.target.dev != "vdb");
    d.to_xml()
}

#[test]
fn a_disk_removed_since_comes_back_from_the_snapshots_copy() {
    // Every internal and external mode, with vdb removed from the domain after the
    // snapshot: vdb comes back as the copy describes it (its image reverted, or a new
    // overlay on it), in the definition QEMU is started from; a running QEMU, which lacks
    // the disk, is restarted (with --force where the revert would have been in place).
    let mut seen = 0;
    for i in 0..modes().len() {
        let mut m = modes().remove(i);
        let kind = match m.kind {
            RevertKind::InternalInPlace => RevertKind::InternalRestart,
            RevertKind::ExternalInPlace => RevertKind::External,
            k @ (RevertKind::InternalOffline
            | RevertKind::InternalRestart
            | RevertKind::External
            | RevertKind::ExternalMemory) => k,
            _ => continue,
        };
        if m.label.contains("configuration") || m.snap.domain.is_none() {
            continue;
        }
        let ctx = format!("{}, vdb removed since", m.label);
        m.dom.disks.retain(|d| d.target != "vdb");
        for x in [&mut m.dom.domain_xml, &mut m.dom.running_xml]
            .into_iter()
            .flatten()
        {
            *x = RawXml::element(&without_vdb(x.as_str())).unwrap();
        }
        let up = m.dom.state != RunState::ShutOff;
        // In place before (the same QEMU): refused without --force, naming the disk.
        if up && kind != m.kind {
            let e = plan_err(&m, &{
                let w = World::default();
                (m.setup)(&mut w.st());
                w
            });
            assert!(
                e.contains("disk vdb: in the snapshot, not in the running domain")
                    && e.contains("--force"),
                "{ctx}: {e}"
            );
            m.flags.force = true;
        }
        m.kind = kind;
        let mut e = env(&m);
        {
            let mut s = e.world.st();
            s.definition = without_vdb(&s.definition);
            s.started_with = s.definition.clone();
            s.roots.remove("vdb");
        }
        e.before = e.world.st().files();
        let plan = plan_of(&m, &e.world);
        assert_eq!(plan.kind, kind, "{ctx}");
        assert!(
            plan.disks.contains(&"vdb".to_string()),
            "{ctx}: {:?}",
            plan.disks
        );
        let mut j = journal(&e);
        let out = block_on(run(&plan, &e.world.caps(), &mut j, &e.store))
            .unwrap_or_else(|err| panic!("{ctx}: {err}"));
        drop(j);
        assert!(out.warnings.is_empty(), "{ctx}: {:?}", out.warnings);
        assert_reverted(&e, &m, &plan, false, &ctx);
        let def = DomainDef::from_xml(&e.world.st().definition).unwrap();
        assert!(
            def.disk("vdb").is_some(),
            "{ctx}: vdb back in the definition"
        );
        seen += 1;
    }
    assert!(seen >= 6, "{seen} modes");
}
