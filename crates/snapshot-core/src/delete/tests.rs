//! A recording fake of the domain's images (their backing files, data and internal
//! snapshots, QEMU's view of the disk's top) and definition; every kind of delete run to
//! completion and checked against the files (the current data and every remaining
//! snapshot's data read back through the chains), a failure injected at every step (as it
//! was before the commit point, finished by a second delete after it), a kill at every step
//! recovered, and the planning rules.

use super::*;
use crate::capture::default_overlay_path;
use crate::capture::{DomainDisk, DomainInfo, RunState};
use crate::error::{Error, ErrorKind};
use crate::name::SnapshotName;
use crate::ops::DomainJournal;
use crate::revert::Definition;
use crate::store::{DomainStore, MadeBy, OverlayOwner, SnapshotStore};
use crate::testkit::{block_on, Faults, Faulty, Inject, Killed};
use crate::xml::{self, DomainSnapshot, Location, RawXml};
use crate::{DomainDef, SnapshotTree};
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Img {
    backing: Option<String>,
    /// What was written to this image (a later write wins over the backing's).
    data: Option<String>,
    tags: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    up: bool,
    /// The disk's top in the running QEMU.
    top: String,
    images: BTreeMap<String, Img>,
    definition: String,
    violations: Vec<String>,
    /// Commits refused before they start, counted down: `Some(0)` refuses the next one.
    refuse_commit: Option<usize>,
    faults: Faults,
    /// The domain's store, whose overlay record answers [`Facts::owner`].
    store: Option<DomainStore>,
    /// The overlays merged away (their files removed later).
    merged: std::collections::BTreeSet<String>,
    /// Pool volumes of storage disks, by `pool/volume`.
    volumes: crate::testkit::FakeVolumes,
}

impl State {
    fn chain(&self, top: &str) -> Vec<String> {
        let mut out = vec![top.to_string()];
        while let Some(b) = self
            .images
            .get(out.last().unwrap())
            .and_then(|i| i.backing.clone())
        {
            out.push(b);
        }
        out
    }

    fn read(&self, top: &str) -> String {
        self.chain(top)
            .iter()
            .find_map(|i| self.images.get(i).and_then(|x| x.data.clone()))
            .unwrap_or_default()
    }

    fn open_in_qemu(&self, image: &str) -> bool {
        self.up && self.chain(&self.top).iter().any(|i| i == image)
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

#[async_trait::async_trait]
impl crate::revert::Volumes for World {
    async fn snapshot(&self, _: &crate::capture::PoolVolume, _: &str) -> Result<()> {
        unreachable!("a delete takes no volume snapshot")
    }
    async fn revert(&self, _: &crate::capture::PoolVolume, _: &str) -> Result<()> {
        unreachable!("a delete reverts no volume")
    }
    async fn delete_snapshot(&self, volume: &crate::capture::PoolVolume, name: &str) -> Result<()> {
        // Running or not: the backend deletes a running domain's volume snapshot under the
        // domain's hold (the facade's business).
        self.effect("vol_delete_snapshot", |s| {
            s.volumes.delete_snapshot(volume, name)
        })
        .await
    }
}

impl World {
    fn caps(&self) -> Capabilities<'_> {
        Capabilities {
            images: self,
            definition: self,
            volumes: self,
        }
    }
}

#[async_trait::async_trait]
impl Images for World {
    async fn delete_internal_live(&self, tag: &str, disks: &[InternalDisk]) -> Result<()> {
        self.effect("delete_internal_live", |s| {
            if !s.up {
                return Err(Error::backend("snapshot-delete", "QEMU is not running"));
            }
            for d in disks {
                if !s.open_in_qemu(&d.image) {
                    s.violations
                        .push(format!("snapshot-delete on {}, not open in QEMU", d.image));
                }
                s.images.get_mut(&d.image).unwrap().tags.remove(tag);
            }
            Ok(())
        })
        .await
    }
    async fn delete_internal_offline(&self, tag: &str, disks: &[InternalDisk]) -> Result<()> {
        self.effect("delete_internal_offline", |s| {
            for d in disks {
                if s.open_in_qemu(&d.image) {
                    s.violations
                        .push(format!("offline delete in {}, open in QEMU", d.image));
                }
                s.images.get_mut(&d.image).unwrap().tags.remove(tag);
            }
            Ok(())
        })
        .await
    }
    async fn commit(&self, m: &Merge) -> Result<()> {
        self.effect("commit", |s| {
            match s.refuse_commit {
                Some(0) => {
                    s.refuse_commit = None;
                    return Err(Error::not_started("block-commit", "refused"));
                }
                Some(k) => s.refuse_commit = Some(k - 1),
                None => {}
            }
            let in_chain = s.chain(&s.top).contains(&m.overlay)
                || s.images
                    .values()
                    .any(|i| i.backing.as_deref() == Some(&m.overlay));
            if !in_chain {
                return Ok(());
            }
            match m.mode {
                CommitMode::Active if !s.up || s.top != m.overlay => s
                    .violations
                    .push(format!("active commit of {}, not the top", m.overlay)),
                CommitMode::Intermediate
                    if !s.up
                        || s.images[m.above.as_ref().unwrap()].backing.as_deref()
                            != Some(&m.overlay) =>
                {
                    s.violations.push(format!("bad intermediate {}", m.overlay))
                }
                CommitMode::Offline if s.up => {
                    s.violations.push("offline commit while QEMU runs".into())
                }
                _ => {}
            }
            let o = s.images[&m.overlay].clone();
            if o.backing.as_deref() != Some(&m.base) {
                s.violations
                    .push(format!("{} is not on {}", m.overlay, m.base));
            }
            if let Some(d) = o.data {
                s.images.get_mut(&m.base).unwrap().data = Some(d);
            }
            // As QEMU does: only the image above the overlay in the chain being committed is
            // re-pointed (a file off that chain keeps its header).
            s.merged.insert(m.overlay.clone());
            let chain = s.chain(&s.top);
            let above = match &m.above {
                Some(a) => Some(a.clone()),
                None => chain
                    .iter()
                    .position(|x| *x == m.overlay)
                    .and_then(|k| k.checked_sub(1))
                    .map(|k| chain[k].clone()),
            };
            if let Some(a) = above.and_then(|a| s.images.get_mut(&a)) {
                if a.backing.as_deref() == Some(&m.overlay) {
                    a.backing = Some(m.base.clone());
                }
            }
            if s.top == m.overlay {
                s.top = m.base.clone();
            }
            Ok(())
        })
        .await
    }
    async fn stream(&self, st: &Stream) -> Result<()> {
        self.effect("stream", |s| {
            let Some(o) = s.images.get(&st.overlay).cloned() else {
                s.violations
                    .push(format!("stream into {}, missing", st.overlay));
                return Ok(());
            };
            if o.backing.as_deref() != Some(&st.image) {
                // Streamed already.
                return Ok(());
            }
            let live = s.open_in_qemu(&st.overlay);
            match st.mode {
                StreamMode::Live if !live => s
                    .violations
                    .push(format!("live stream into {}, not open in QEMU", st.overlay)),
                StreamMode::Offline if live => s
                    .violations
                    .push(format!("offline stream into {}, open in QEMU", st.overlay)),
                _ => {}
            }
            if s.chain(&st.image).get(1) != st.base.as_ref() {
                s.violations
                    .push(format!("{} is not on {:?}", st.image, st.base));
            }
            // What the overlay reads now is what it holds afterwards.
            let data = s.read(&st.overlay);
            let o = s.images.get_mut(&st.overlay).unwrap();
            o.data = Some(data);
            o.backing = st.base.clone();
            Ok(())
        })
        .await
    }
    async fn remove_overlay(&self, path: &str, backing: &str) -> Result<()> {
        self.effect("remove_overlay", |s| {
            let Some(i) = s.images.get(path) else {
                return Ok(());
            };
            if i.backing.as_deref() != Some(backing) {
                s.violations
                    .push(format!("removed {path}, not an overlay of {backing}"));
            }
            // (A file merged away whose own removal failed is garbage: being its backing
            // is no use.)
            if s.chain(&s.top).iter().any(|x| x == path)
                || s.images
                    .iter()
                    .any(|(p, x)| x.backing.as_deref() == Some(path) && !s.merged.contains(p))
            {
                s.violations.push(format!("removed {path}, still in use"));
            }
            s.images.remove(path);
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Definition for World {
    async fn set(&self, xml: &str) -> Result<()> {
        self.effect("definition", |s| {
            s.definition = xml.to_string();
            Ok(())
        })
        .await
    }
}

impl Facts for World {
    fn exists(&self, path: &str) -> bool {
        self.st().images.contains_key(path)
    }
    fn internal_snapshots(&self, image: &str) -> Vec<String> {
        self.st()
            .images
            .get(image)
            .map(|i| i.tags.iter().cloned().collect())
            .unwrap_or_default()
    }
    fn backing(&self, image: &str) -> Option<String> {
        self.st().images.get(image).and_then(|i| i.backing.clone())
    }
    fn volume_path(&self, _: &str, _: &str) -> Option<String> {
        None
    }
    fn backed_by(&self, image: &str) -> Vec<String> {
        let s = self.st();
        s.images
            .iter()
            .filter(|(_, i)| i.backing.as_deref() == Some(image))
            .map(|(k, _)| k.clone())
            .collect()
    }
    fn backing_format(&self, image: &str) -> Option<String> {
        self.backing(image).map(|_| "qcow2".into())
    }
    fn owner(&self, path: &str) -> Option<crate::store::OverlayOwner> {
        let s = self.st();
        s.store.as_ref()?.overlays().ok()?.owner(path).cloned()
    }
}

const BASE: &str = "/d/vda.qcow2";

fn domain_xml(src: &str) -> String {
    format!(
        "<domain type='kvm'><name>vm</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{src}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
}

fn def_source(xml: &str) -> String {
    let d = DomainDef::from_xml(xml).unwrap();
    d.disk("vda")
        .unwrap()
        .source
        .as_ref()
        .unwrap()
        .file
        .clone()
        .unwrap()
}

fn n(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

/// A snapshot of disk vda: external onto `overlay` (taken with the disk on `on`), or internal
/// (in `on`).
fn snap(name: &str, parent: Option<&str>, on: &str, overlay: Option<&str>) -> DomainSnapshot {
    let disk = match overlay {
        Some(o) => xml::Disk {
            name: "vda".into(),
            snapshot: Some(Location::External),
            source_type: Some("file".into()),
            driver: Some(xml::Driver {
                format: Some("qcow2".into()),
                ..Default::default()
            }),
            source: Some(xml::Source {
                file: Some(o.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        None => xml::Disk {
            name: "vda".into(),
            snapshot: Some(Location::Internal),
            ..Default::default()
        },
    };
    DomainSnapshot {
        name: Some(n(name)),
        parent: parent.map(n),
        disks: vec![disk],
        domain: Some(RawXml::element(&domain_xml(on)).unwrap()),
        ..Default::default()
    }
}

/// A scenario: the snapshots, the images and the domain's state.
/// An image: its path, backing, data and internal snapshots.
type ImageSpec = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Vec<&'static str>,
);

/// A request and what it leaves: (case, snapshot, flags, kind, remaining, current after,
/// the disk's top after).
type Request = (
    Case,
    &'static str,
    DeleteFlags,
    DeleteKind,
    Vec<&'static str>,
    Option<&'static str>,
    &'static str,
);

#[derive(Clone)]
struct Case {
    label: &'static str,
    snaps: Vec<DomainSnapshot>,
    current: Option<&'static str>,
    images: Vec<ImageSpec>,
    top: &'static str,
    up: bool,
    /// Each snapshot's data as read back (external: through its image; internal: its tag).
    data: Vec<(&'static str, &'static str)>,
}

/// base (A) <- vda.s1 (B) <- vda.s2 (C): s1 and s2 external, s2 current, disk on vda.s2.
fn external(up: bool) -> Case {
    Case {
        label: if up {
            "external running"
        } else {
            "external offline"
        },
        snaps: vec![
            snap("s1", None, BASE, Some("/d/vda.s1")),
            snap("s2", Some("s1"), "/d/vda.s1", Some("/d/vda.s2")),
        ],
        current: Some("s2"),
        images: vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s1", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s2", Some("/d/vda.s1"), Some("C"), vec![]),
        ],
        top: "/d/vda.s2",
        up,
        data: vec![("s1", "A"), ("s2", "B")],
    }
}

/// base (A) <- vda.s1 (B) <- vda.s2 (no data of its own) <- vda.s3 (X): s1, s2, s3 external,
/// then reverted to s2: vda.s2.r1 on vda.s1 (C), the disk on it, s2 current. vda.s1 (s1's
/// overlay, s2's image) has two overlays that stay: vda.s2 (s3's image) and the disk's.
fn streamed(up: bool) -> Case {
    Case {
        label: if up {
            "stream running"
        } else {
            "stream offline"
        },
        snaps: vec![
            snap("s1", None, BASE, Some("/d/vda.s1")),
            snap("s2", Some("s1"), "/d/vda.s1", Some("/d/vda.s2")),
            snap("s3", Some("s2"), "/d/vda.s2", Some("/d/vda.s3")),
        ],
        current: Some("s2"),
        images: vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s1", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s2", Some("/d/vda.s1"), None, vec![]),
            ("/d/vda.s3", Some("/d/vda.s2"), Some("X"), vec![]),
            ("/d/vda.s2.r1", Some("/d/vda.s1"), Some("C"), vec![]),
        ],
        top: "/d/vda.s2.r1",
        up,
        data: vec![("s1", "A"), ("s2", "B"), ("s3", "B")],
    }
}

/// base (A) <- vda.s1 (B) <- vda.s2 (no data of its own) <- vda.s3 (X): s1, s2, s3 external,
/// then reverted to s1: vda.s1.r1 on the base (C), the disk on it, s1 current. s2's overlay
/// vda.s2 (s3's image) is the only overlay of vda.s1 and off the disk's active chain.
fn off_chain(up: bool) -> Case {
    let mut c = streamed(up);
    c.label = if up {
        "off-chain stream running"
    } else {
        "off-chain stream offline"
    };
    c.current = Some("s1");
    c.images[4] = ("/d/vda.s1.r1", Some(BASE), Some("C"), vec![]);
    c.top = "/d/vda.s1.r1";
    c
}

/// Internal s1 and s2 (its child) in the base image, current s2.
fn internal(up: bool) -> Case {
    Case {
        label: if up {
            "internal running"
        } else {
            "internal offline"
        },
        snaps: vec![
            snap("s1", None, BASE, None),
            snap("s2", Some("s1"), BASE, None),
        ],
        current: Some("s2"),
        images: vec![(BASE, None, Some("C"), vec!["s1", "s2"])],
        top: BASE,
        up,
        data: vec![],
    }
}

/// Internal s1 in the base, then external s2 onto vda.s2 (s1 now in a backing file).
fn mixed(up: bool) -> Case {
    Case {
        label: if up { "mixed running" } else { "mixed offline" },
        snaps: vec![
            snap("s1", None, BASE, None),
            snap("s2", Some("s1"), BASE, Some("/d/vda.s2")),
        ],
        current: Some("s2"),
        images: vec![
            (BASE, None, Some("B"), vec!["s1"]),
            ("/d/vda.s2", Some(BASE), Some("C"), vec![]),
        ],
        top: "/d/vda.s2",
        up,
        data: vec![("s2", "B")],
    }
}

struct Env {
    _dir: tempfile::TempDir,
    store: DomainStore,
    world: World,
    case: Case,
}

fn env(case: &Case) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(dir.path().join("snapshots"))
        .domain("vm")
        .unwrap();
    for s in &case.snaps {
        store.save(s).unwrap();
    }
    store.set_current(case.current.map(n).as_ref()).unwrap();
    let world = World::default();
    {
        let mut s = world.st();
        for (p, b, d, tags) in &case.images {
            s.images.insert(
                p.to_string(),
                Img {
                    backing: b.map(str::to_string),
                    data: d.map(str::to_string),
                    tags: tags.iter().map(|t| t.to_string()).collect(),
                },
            );
        }
        s.top = case.top.into();
        s.up = case.up;
        s.definition = domain_xml(case.top);
        s.store = Some(store.clone());
    }
    Env {
        _dir: dir,
        store,
        world,
        case: case.clone(),
    }
}

fn info(e: &Env) -> DomainInfo {
    let s = e.world.st();
    DomainInfo {
        name: "vm".into(),
        state: if s.up {
            RunState::Running
        } else {
            RunState::ShutOff
        },
        has_agent: false,
        disks: vec![DomainDisk {
            target: "vda".into(),
            source: Some(if s.up {
                s.top.clone()
            } else {
                def_source(&s.definition)
            }),
            format: "qcow2".into(),
            volume: None,
            readonly: false,
            cdrom: false,
            node: if s.up {
                "node-vda".into()
            } else {
                String::new()
            },
        }],
        current: e.store.current().unwrap(),
        domain_xml: Some(RawXml::element(&s.definition).unwrap()),
        running_xml: None,
    }
}

fn tree(e: &Env) -> SnapshotTree {
    e.store.load().unwrap().tree
}

fn req(name: &str, flags: DeleteFlags) -> DeleteRequest {
    DeleteRequest {
        name: n(name),
        flags,
    }
}

fn plan(e: &Env, name: &str, flags: DeleteFlags) -> Result<DeletePlan> {
    DeletePlan::new(&req(name, flags), &info(e), &tree(e), &e.world)
}

fn journal(e: &Env) -> DomainJournal {
    DomainJournal::open(e.store.journal_path()).unwrap()
}

fn delete(e: &Env, name: &str, flags: DeleteFlags) -> Result<DeleteOutcome> {
    let p = plan(e, name, flags)?;
    let mut j = journal(e);
    block_on(run(&p, &e.world.caps(), &mut j, &e.store))
}

/// What must hold after every delete: nothing done behind QEMU's back, QEMU's top and the
/// definition agree, the current data is there, and every remaining snapshot still reads its
/// data (external: its overlay on its image, unchanged; internal: its tag).
fn consistent(e: &Env, ctx: &str) {
    let s = e.world.st();
    assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
    let top = def_source(&s.definition);
    if s.up {
        assert_eq!(top, s.top, "{ctx}: QEMU's top and the definition");
    }
    assert_eq!(s.read(&top), "C", "{ctx}: the current data");
    let t = e.store.load().unwrap();
    assert!(t.damaged.is_empty() && t.problems.is_empty(), "{ctx}");
    for name in t.tree.topological() {
        let d = t.tree.get(name.as_str()).unwrap();
        let on = def_source(d.domain.as_ref().unwrap().as_str());
        match d.disks[0].source.as_ref().and_then(|x| x.file.clone()) {
            Some(o) => {
                assert_eq!(
                    s.images.get(&o).and_then(|i| i.backing.clone()).as_deref(),
                    Some(on.as_str()),
                    "{ctx}: {name}'s overlay on its image"
                );
                let want = e
                    .case
                    .data
                    .iter()
                    .find(|(x, _)| *x == name.as_str())
                    .unwrap()
                    .1;
                assert_eq!(s.read(&on), want, "{ctx}: {name}'s data");
                // In the disk's chain, or (a branch) a leaf of its own or another
                // snapshot's image (its backing is checked above).
                let data_of_another = t.tree.topological().iter().any(|x| {
                    def_source(
                        t.tree
                            .get(x.as_str())
                            .unwrap()
                            .domain
                            .as_ref()
                            .unwrap()
                            .as_str(),
                    ) == o
                });
                let leaf = !s.images.values().any(|i| i.backing.as_deref() == Some(&o));
                assert!(
                    s.chain(&top).contains(&o) || data_of_another || leaf,
                    "{ctx}: {name}'s overlay in the disk's chain"
                );
            }
            None => assert!(
                s.images[&on].tags.contains(name.as_str()),
                "{ctx}: {name}'s tag"
            ),
        }
        assert!(!d.disks[0].delete_in_progress, "{ctx}: {name} marked");
    }
    // No file left that nothing names.
    for p in s.images.keys() {
        let used = s.chain(&top).contains(p)
            || t.tree.topological().iter().any(|x| {
                let on = def_source(
                    t.tree
                        .get(x.as_str())
                        .unwrap()
                        .domain
                        .as_ref()
                        .unwrap()
                        .as_str(),
                );
                let own = t.tree.get(x.as_str()).unwrap().disks[0]
                    .source
                    .as_ref()
                    .and_then(|x| x.file.clone());
                s.chain(&on).contains(p) || own.is_some_and(|o| s.chain(&o).contains(p))
            });
        assert!(used, "{ctx}: {p} left over");
    }
}

fn names(e: &Env) -> Vec<String> {
    let mut v: Vec<String> = e
        .store
        .names()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    v.sort();
    v
}

fn current(e: &Env) -> Option<String> {
    e.store.current().unwrap().map(|c| c.to_string())
}

const NONE: DeleteFlags = DeleteFlags {
    children: false,
    children_only: false,
    metadata: false,
};
const CHILDREN: DeleteFlags = DeleteFlags {
    children: true,
    ..NONE
};
const CHILDREN_ONLY: DeleteFlags = DeleteFlags {
    children_only: true,
    ..NONE
};
const METADATA: DeleteFlags = DeleteFlags {
    metadata: true,
    ..NONE
};

/// Every case and request, with what remains: (case, snapshot, flags, kind, remaining,
/// current after, the disk's top after).
fn requests() -> Vec<Request> {
    let mut v = Vec::new();
    for up in [true, false] {
        v.push((
            external(up),
            "s2",
            NONE,
            DeleteKind::External,
            vec!["s1"],
            Some("s1"),
            "/d/vda.s1",
        ));
        v.push((
            external(up),
            "s1",
            NONE,
            DeleteKind::External,
            vec!["s2"],
            Some("s2"),
            "/d/vda.s2",
        ));
        v.push((
            external(up),
            "s1",
            CHILDREN,
            DeleteKind::External,
            vec![],
            None,
            BASE,
        ));
        v.push((
            external(up),
            "s1",
            CHILDREN_ONLY,
            DeleteKind::External,
            vec!["s1"],
            Some("s1"),
            "/d/vda.s1",
        ));
        v.push((
            internal(up),
            "s2",
            NONE,
            DeleteKind::Internal,
            vec!["s1"],
            Some("s1"),
            BASE,
        ));
        v.push((
            internal(up),
            "s1",
            CHILDREN,
            DeleteKind::Internal,
            vec![],
            None,
            BASE,
        ));
        v.push((
            mixed(up),
            "s2",
            NONE,
            DeleteKind::External,
            vec!["s1"],
            Some("s1"),
            BASE,
        ));
        // A snapshot's overlay off the active chain, on virt-snap's overlay: streamed.
        v.push((
            off_chain(up),
            "s2",
            NONE,
            DeleteKind::External,
            vec!["s1", "s3"],
            Some("s1"),
            "/d/vda.s1.r1",
        ));
        // A branch whose image is virt-snap's overlay: streamed up into both dependents.
        v.push((
            streamed(up),
            "s2",
            NONE,
            DeleteKind::External,
            vec!["s1", "s3"],
            Some("s1"),
            "/d/vda.s2.r1",
        ));
    }
    for up in [false, true] {
        // The internal snapshot in a backing file goes too: offline, or in QEMU (which
        // reopens the backing node read-write for the job).
        v.push((
            mixed(up),
            "s1",
            CHILDREN,
            DeleteKind::Mixed,
            vec![],
            None,
            BASE,
        ));
        v.push((
            mixed(up),
            "s1",
            NONE,
            DeleteKind::Internal,
            vec!["s2"],
            Some("s2"),
            "/d/vda.s2",
        ));
    }
    v
}

#[test]
fn every_kind_deletes_and_keeps_the_rest_readable() {
    for (case, name, flags, kind, left, cur, top) in requests() {
        let ctx = format!("{} delete {name} {flags:?}", case.label);
        let e = env(&case);
        let p = plan(&e, name, flags).unwrap_or_else(|err| panic!("{ctx}: {err}"));
        assert_eq!(p.kind, kind, "{ctx}");
        delete(&e, name, flags).unwrap_or_else(|err| panic!("{ctx}: {err}"));
        assert_eq!(names(&e), left, "{ctx}");
        assert_eq!(current(&e).as_deref(), cur, "{ctx}");
        assert_eq!(def_source(&e.world.st().definition), top, "{ctx}");
        consistent(&e, &ctx);
        assert!(journal(&e).pending().is_empty(), "{ctx}");
    }
}

#[test]
fn deleting_everything_leaves_the_disk_on_its_own_file_with_the_current_data() {
    for up in [true, false] {
        let e = env(&external(up));
        delete(&e, "s2", NONE).unwrap();
        delete(&e, "s1", NONE).unwrap();
        let s = e.world.st();
        assert_eq!(s.images.keys().collect::<Vec<_>>(), [BASE]);
        assert_eq!(def_source(&s.definition), BASE);
        assert_eq!(s.images[BASE].data.as_deref(), Some("C"));
        assert!(s.images[BASE].backing.is_none());
    }
}

#[test]
fn a_root_external_delete_merges_the_middle_and_rewrites_the_child() {
    let e = env(&external(true));
    let p = plan(&e, "s1", NONE).unwrap();
    let Step::Commit { merge, .. } = &p.steps[p.commit_point] else {
        panic!("{:?}", p.steps)
    };
    assert_eq!(merge.mode, CommitMode::Intermediate);
    assert_eq!(merge.above.as_deref(), Some("/d/vda.s2"));
    delete(&e, "s1", NONE).unwrap();
    let s2 = e.store.read(&n("s2")).unwrap();
    assert_eq!(s2.parent, None);
    assert_eq!(def_source(s2.domain.as_ref().unwrap().as_str()), BASE);
    assert_eq!(
        e.world.st().images["/d/vda.s2"].backing.as_deref(),
        Some(BASE)
    );
}

#[test]
fn the_leaf_on_top_is_an_active_commit() {
    let e = env(&external(true));
    let p = plan(&e, "s2", NONE).unwrap();
    let modes: Vec<CommitMode> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Commit { merge, .. } => Some(merge.mode),
            _ => None,
        })
        .collect();
    assert_eq!(modes, [CommitMode::Active]);
    let e = env(&external(false));
    let p = plan(&e, "s2", NONE).unwrap();
    assert!(matches!(&p.steps[0], Step::Commit { merge, .. } if merge.mode == CommitMode::Offline));
}

#[test]
fn metadata_only_touches_no_image() {
    for case in [external(true), internal(true), mixed(false)] {
        let e = env(&case);
        let before = e.world.st().images.clone();
        let p = plan(&e, "s1", METADATA).unwrap();
        assert_eq!(p.kind, DeleteKind::Metadata);
        assert!(p.steps.iter().all(|s| matches!(s, Step::Metadata { .. })));
        delete(&e, "s1", METADATA).unwrap();
        assert_eq!(e.world.st().images, before, "{}", case.label);
        assert_eq!(names(&e), ["s2"]);
        assert_eq!(e.store.read(&n("s2")).unwrap().parent, None);
        assert_eq!(current(&e).as_deref(), Some("s2"));
        assert_eq!(e.world.st().faults.calls, 0);
    }
}

#[test]
fn children_only_of_a_leaf_deletes_nothing() {
    let e = env(&external(true));
    let p = plan(&e, "s2", CHILDREN_ONLY).unwrap();
    assert!(p.steps.is_empty() && p.deleted.is_empty());
    delete(&e, "s2", CHILDREN_ONLY).unwrap();
    assert_eq!(names(&e), ["s1", "s2"]);
}

fn refused(e: &Env, name: &str, flags: DeleteFlags, needle: &str) {
    let err = plan(e, name, flags).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidPlan, "{err}");
    assert!(err.to_string().contains(needle), "{err}");
}

#[test]
fn planning_refuses_what_it_cannot_do_safely() {
    // Flags.
    let e = env(&external(true));
    refused(
        &e,
        "s1",
        DeleteFlags {
            children: true,
            children_only: true,
            metadata: false,
        },
        "mutually exclusive",
    );
    // The overlay is gone.
    e.world.st().images.remove("/d/vda.s2");
    e.world.st().images.get_mut("/d/vda.s1").unwrap().data = Some("C".into());
    refused(&e, "s2", NONE, "is missing");
    // An unknown snapshot.
    let err = plan(&e, "nope", NONE).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

/// external(true), then reverted to s1 (vda.s1.r1 on the base, data D) and s3 taken on it
/// (vda.s3, data E; current, the disk on it): s1 has children s2 and s3.
fn branched() -> Env {
    let e = env(&external(true));
    {
        let mut s = e.world.st();
        s.images.insert(
            "/d/vda.s1.r1".into(),
            Img {
                backing: Some(BASE.into()),
                data: Some("D".into()),
                ..Default::default()
            },
        );
        s.images.insert(
            "/d/vda.s3".into(),
            Img {
                backing: Some("/d/vda.s1.r1".into()),
                data: Some("E".into()),
                ..Default::default()
            },
        );
        s.top = "/d/vda.s3".into();
        s.definition = domain_xml("/d/vda.s3");
    }
    e.store
        .save(&snap("s3", Some("s1"), "/d/vda.s1.r1", Some("/d/vda.s3")))
        .unwrap();
    e.store.set_current(Some(&n("s3"))).unwrap();
    e
}

#[test]
fn branches_are_not_merged_but_what_nothing_needs_goes() {
    let e = branched();
    // s1: its base has two overlays (vda.s1 under s2, the revert's under s3): nothing is
    // merged, and vda.s1 stays (s2's image).
    let p = plan(&e, "s1", NONE).unwrap();
    assert_eq!(p.kind, DeleteKind::Metadata, "{:?}", p.steps);
    assert!(p.notes[0].contains("has 2 overlays"), "{:?}", p.notes);
    delete(&e, "s1", NONE).unwrap();
    assert!(e.world.st().images.contains_key("/d/vda.s1"));
    // s2: off the disk's active chain, and nothing needs its overlay any more: removed; nor
    // its image vda.s1 (s1's overlay, s1 deleted first): removed too.
    let p = plan(&e, "s2", NONE).unwrap();
    assert!(
        matches!(&p.steps[..], [Step::Metadata { .. }, Step::RemoveOverlay { path, .. }, Step::RemoveOverlay { path: b, .. }] if path == "/d/vda.s2" && b == "/d/vda.s1"),
        "{:?}",
        p.steps
    );
    delete(&e, "s2", NONE).unwrap();
    assert!(!e.world.st().images.contains_key("/d/vda.s2"));
    assert!(!e.world.st().images.contains_key("/d/vda.s1"));
    // s3 (on top): an active commit into the revert's overlay.
    delete(&e, "s3", NONE).unwrap();
    let s = e.world.st();
    assert_eq!(s.top, "/d/vda.s1.r1");
    assert_eq!(s.read(&s.top), "E");
    assert!(s.violations.is_empty(), "{:?}", s.violations);
}

#[test]
fn a_branch_on_our_overlay_is_streamed_into_its_dependents_and_the_overlay_goes() {
    for up in [true, false] {
        let e = env(&streamed(up));
        let p = plan(&e, "s2", NONE).unwrap();
        let streams: Vec<(String, StreamMode)> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Stream { stream, .. } => Some((stream.overlay.clone(), stream.mode)),
                _ => None,
            })
            .collect();
        let live = if up {
            StreamMode::Live
        } else {
            StreamMode::Offline
        };
        let mut want = vec![
            ("/d/vda.s2.r1".to_string(), live),
            ("/d/vda.s2".to_string(), StreamMode::Offline),
        ];
        if !up {
            want.reverse();
        }
        assert_eq!(streams, want, "{:?}", p.steps);
        assert!(p.steps[p.commit_point].changes_data());
        assert!(
            p.steps.iter().any(
                |s| matches!(s, Step::RemoveOverlay { path, backing } if path == "/d/vda.s1" && backing == BASE)
            ),
            "{:?}",
            p.steps
        );
        delete(&e, "s2", NONE).unwrap();
        consistent(&e, "stream");
        let s = e.world.st();
        assert!(!s.images.contains_key("/d/vda.s1"));
        assert_eq!(s.images["/d/vda.s2"].backing.as_deref(), Some(BASE));
        assert_eq!(s.images["/d/vda.s2.r1"].backing.as_deref(), Some(BASE));
        assert_eq!(s.read("/d/vda.s2"), "B");
        assert_eq!(s.read("/d/vda.s3"), "X");
        drop(s);
        // s1's overlay is now the disk's (on the base), s3 under s1.
        let s1 = e.store.read(&n("s1")).unwrap();
        assert_eq!(
            s1.disks[0].source.as_ref().unwrap().file.as_deref(),
            Some("/d/vda.s2.r1")
        );
        // Then s1: the base has two overlays and is the user's: nothing streamed.
        let p = plan(&e, "s1", NONE).unwrap();
        assert!(
            !p.steps.iter().any(|s| matches!(s, Step::Stream { .. })),
            "{:?}",
            p.steps
        );
    }
}

#[test]
fn an_overlay_off_the_active_chain_on_our_overlay_is_streamed() {
    let e = env(&off_chain(true));
    let p = plan(&e, "s2", NONE).unwrap();
    assert!(
        matches!(&p.steps[0], Step::Stream { stream, .. } if stream.overlay == "/d/vda.s2" && stream.mode == StreamMode::Offline && stream.base.as_deref() == Some(BASE)),
        "{:?}",
        p.steps
    );
    delete(&e, "s2", NONE).unwrap();
    consistent(&e, "off chain");
    let s = e.world.st();
    assert!(!s.images.contains_key("/d/vda.s1"));
    assert_eq!(s.read("/d/vda.s2"), "B");
    drop(s);
    let s1 = e.store.read(&n("s1")).unwrap();
    assert_eq!(
        s1.disks[0].source.as_ref().unwrap().file.as_deref(),
        Some("/d/vda.s1.r1")
    );
}

#[test]
fn streams_of_one_delete_follow_each_other_onto_the_image_below() {
    // s1 <- s2 <- s3 external; reverted to s2 (vda.s2.r1 on vda.s1) and to s3 (vda.s3.r1 on
    // vda.s2, the disk on it), and a file next to them on vda.s2 that no metadata names.
    // Deleting s2 with its child streams vda.s2 up (s3 first), then vda.s1 into every
    // overlay of it, the file found by its header on vda.s2 included.
    let case = Case {
        label: "streams in a row",
        snaps: vec![
            snap("s1", None, BASE, Some("/d/vda.s1")),
            snap("s2", Some("s1"), "/d/vda.s1", Some("/d/vda.s2")),
            snap("s3", Some("s2"), "/d/vda.s2", Some("/d/vda.s3")),
        ],
        current: Some("s3"),
        images: vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s1", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s2", Some("/d/vda.s1"), None, vec![]),
            ("/d/vda.s3", Some("/d/vda.s2"), Some("X"), vec![]),
            ("/d/vda.s2.r1", Some("/d/vda.s1"), Some("Y"), vec![]),
            ("/d/vda.s3.x", Some("/d/vda.s2"), None, vec![]),
            ("/d/vda.s3.r1", Some("/d/vda.s2"), Some("C"), vec![]),
        ],
        top: "/d/vda.s3.r1",
        up: true,
        data: vec![("s1", "A")],
    };
    let e = env(&case);
    let p = plan(&e, "s2", CHILDREN).unwrap();
    let into: Vec<(String, String)> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Stream { stream, .. } => Some((stream.image.clone(), stream.overlay.clone())),
            _ => None,
        })
        .collect();
    assert!(
        into.contains(&("/d/vda.s1".into(), "/d/vda.s3.x".into())),
        "{into:?}"
    );
    delete(&e, "s2", CHILDREN).unwrap();
    // (The two files no metadata names stay: consistent() would count them left over.)
    let s = e.world.st();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(s.top, "/d/vda.s3.r1");
    assert_eq!(s.read(&s.top), "C");
    assert_eq!(s.chain(&s.top), ["/d/vda.s3.r1", BASE]);
    assert_eq!(s.read("/d/vda.s3.x"), "B");
    // s2's revert overlay off the active chain, which nothing needs, goes with s2 (a
    // discarded state; see "What is removed").
    assert!(!s.images.contains_key("/d/vda.s2.r1"));
    assert!(!s.images.contains_key("/d/vda.s1") && !s.images.contains_key("/d/vda.s2"));
}

#[test]
fn a_branch_on_another_snapshots_image_or_the_users_file_is_not_streamed() {
    // s2's image vda.s1 is s4's image too: its content must stay.
    let e = env(&streamed(true));
    e.store
        .save(&snap("s4", Some("s1"), "/d/vda.s1", Some("/d/vda.s4")))
        .unwrap();
    e.world.st().images.insert(
        "/d/vda.s4".into(),
        Img {
            backing: Some("/d/vda.s1".into()),
            ..Default::default()
        },
    );
    let p = plan(&e, "s2", NONE).unwrap();
    assert!(
        !p.steps.iter().any(|s| matches!(s, Step::Stream { .. })),
        "{:?}",
        p.steps
    );
    // The branched case: the base is the user's file.
    let e = branched();
    let p = plan(&e, "s1", NONE).unwrap();
    assert!(
        !p.steps.iter().any(|s| matches!(s, Step::Stream { .. })),
        "{:?}",
        p.steps
    );
}

#[test]
fn a_reverted_to_snapshot_deleted_takes_its_revert_overlay_back_into_its_image() {
    // s1 alone, reverted to: vda.s1 (the discarded state) and vda.s1.r1 (the disk's top,
    // data C) on the base.
    let mut case = external(true);
    case.snaps.truncate(1);
    case.current = Some("s1");
    case.images.truncate(2);
    case.images
        .push(("/d/vda.s1.r1", Some(BASE), Some("C"), vec![]));
    case.top = "/d/vda.s1.r1";
    let e = env(&case);
    let p = plan(&e, "s1", NONE).unwrap();
    assert_eq!(p.kind, DeleteKind::External, "{:?}", p.steps);
    delete(&e, "s1", NONE).unwrap();
    assert_home(&e, "C", "the disk on its own file");
}

#[test]
fn a_snapshot_reverted_to_twice_deleted_drops_the_first_revert_and_merges_the_second() {
    // s1 alone, reverted to twice: vda.s1 and vda.s1.r1 (discarded states, off the active
    // chain) and vda.s1.r2 (the disk's top, data C) on the base.
    let mut case = external(true);
    case.snaps.truncate(1);
    case.current = Some("s1");
    case.images.truncate(2);
    case.images
        .push(("/d/vda.s1.r1", Some(BASE), Some("B"), vec![]));
    case.images
        .push(("/d/vda.s1.r2", Some(BASE), Some("C"), vec![]));
    case.top = "/d/vda.s1.r2";
    let e = env(&case);
    let p = plan(&e, "s1", NONE).unwrap();
    assert_eq!(p.kind, DeleteKind::External, "{:?}", p.steps);
    delete(&e, "s1", NONE).unwrap();
    assert_home(&e, "C", "the disk on its own file");
}

#[test]
fn a_revert_overlay_a_revert_to_the_child_discarded_does_not_block_the_merge() {
    // s1 <- s2 reverted to s1 (vda.s1.r1 on the base, then discarded) and then to s2
    // (vda.s2.r1 on vda.s1, the disk's top, data D).
    for up in [false, true] {
        let mut case = external(up);
        case.images
            .push(("/d/vda.s1.r1", Some(BASE), Some("B"), vec![]));
        case.images
            .push(("/d/vda.s2.r1", Some("/d/vda.s1"), Some("D"), vec![]));
        case.top = "/d/vda.s2.r1";
        let e = env(&case);
        delete(&e, "s1", CHILDREN).unwrap();
        assert_home(&e, "D", &format!("up {up}: the disk on its own file"));
    }
}

/// s3 taken on vda.s2.r1 (its overlay named after that top: vda.s2.s3), whose image a
/// delete of s2 then merged into the base, then reverted to: vda.s2.s3 and the revert's
/// overlay `top` (data D, the disk's top) on the base. Who made each file is `owners`.
fn renamed(up: bool, top: &'static str, owners: &[(&str, MadeBy)]) -> Env {
    let mut case = external(up);
    case.snaps = vec![snap("s3", None, BASE, Some("/d/vda.s2.s3"))];
    case.current = Some("s3");
    case.images = vec![
        (BASE, None, Some("A"), vec![]),
        ("/d/vda.s2.s3", Some(BASE), Some("X"), vec![]),
        (top, Some(BASE), Some("D"), vec![]),
    ];
    case.top = top;
    case.data = vec![("s3", "A")];
    let e = env(&case);
    for (p, by) in owners {
        e.store
            .record_overlay(
                p,
                OverlayOwner {
                    by: *by,
                    snapshot: Some("s3".into()),
                },
            )
            .unwrap();
    }
    e
}

#[test]
fn the_overlay_record_not_the_name_tells_whose_an_overlay_is() {
    for up in [false, true] {
        // No record (metadata from before it): the name decides, vda.s2.s3 is not the name
        // a capture picks on the base, so it is taken for the user's and kept, and the
        // revert's overlay with it.
        let e = renamed(up, "/d/vda.s3.r1", &[]);
        let out = delete(&e, "s3", NONE).unwrap();
        assert!(
            out.warnings.iter().any(|w| w.contains("vda.s2.s3 is kept")),
            "{out:?}"
        );
        assert!(e.world.st().images.contains_key("/d/vda.s2.s3"));
        // The record says virt-snap made both: vda.s2.s3 goes, the revert's overlay is
        // merged into the base, the disk back on its own file; also a revert overlay whose
        // name is not the one a revert picks on the base now.
        for top in ["/d/vda.s3.r1", "/d/vda.s2.s3.r1"] {
            let e = renamed(
                up,
                top,
                &[("/d/vda.s2.s3", MadeBy::Capture), (top, MadeBy::Revert)],
            );
            let out = delete(&e, "s3", NONE).unwrap();
            assert!(out.warnings.is_empty(), "{top}: {out:?}");
            let s = e.world.st();
            assert_eq!(s.images.keys().collect::<Vec<_>>(), [BASE], "{top}");
            assert_eq!(s.top, BASE);
            assert_eq!(def_source(&s.definition), BASE);
            assert_eq!(s.images[BASE].data.as_deref(), Some("D"));
            assert!(s.violations.is_empty(), "{:?}", s.violations);
            drop(s);
            assert_eq!(e.store.overlays().unwrap().overlays.len(), 0, "forgotten");
        }
        // The record says the user gave vda.s2.s3 (--reuse-external): kept.
        let e = renamed(up, "/d/vda.s3.r1", &[("/d/vda.s2.s3", MadeBy::User)]);
        delete(&e, "s3", NONE).unwrap();
        assert!(e.world.st().images.contains_key("/d/vda.s2.s3"));
    }
}

#[test]
fn a_revert_overlay_of_a_deleted_snapshot_goes_home_when_its_image_goes() {
    // Found by tests/history.rs (seed 2): s1 <- s2, reverted to s2 (vda.s2.r1 on vda.s1) and
    // then to s1 (vda.s1.r1 on the base, data D, the disk's top). Deleting s1 merges nothing
    // (vda.s1 is s2's image); deleting s2 removes vda.s2, vda.s2.r1 and vda.s1, which leaves
    // s1's revert overlay the only overlay of the base, needed by nothing: merged into it.
    for (up, recorded) in [(false, true), (true, true), (true, false)] {
        let mut case = external(up);
        case.current = Some("s1");
        case.images
            .push(("/d/vda.s2.r1", Some("/d/vda.s1"), None, vec![]));
        case.images
            .push(("/d/vda.s1.r1", Some(BASE), Some("D"), vec![]));
        case.top = "/d/vda.s1.r1";
        let e = env(&case);
        if recorded {
            for (p, by, snap) in [
                ("/d/vda.s1", MadeBy::Capture, "s1"),
                ("/d/vda.s2", MadeBy::Capture, "s2"),
                ("/d/vda.s2.r1", MadeBy::Revert, "s2"),
                ("/d/vda.s1.r1", MadeBy::Revert, "s1"),
            ] {
                let o = OverlayOwner {
                    by,
                    snapshot: Some(snap.into()),
                };
                e.store.record_overlay(p, o).unwrap();
            }
        }
        delete(&e, "s1", NONE).unwrap();
        delete(&e, "s2", NONE).unwrap();
        let s = e.world.st();
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        if !recorded {
            // Metadata from before the record: the names cannot tell that s1 is gone.
            assert_eq!(s.top, "/d/vda.s1.r1");
            continue;
        }
        assert_eq!(
            s.images.keys().collect::<Vec<_>>(),
            [BASE],
            "up {up}: the disk on its own file"
        );
        assert_eq!(s.top, BASE);
        assert_eq!(def_source(&s.definition), BASE);
        assert_eq!(s.images[BASE].data.as_deref(), Some("D"));
        drop(s);
        assert!(e.store.overlays().unwrap().overlays.is_empty());
    }
}

#[test]
fn an_overlay_with_a_branch_on_it_is_not_merged() {
    // Found by tests/history.rs (seeds 1 and 23 with 24 steps): s2 <- s3, s3 reverted to and
    // then left (vda.s3.r1 on vda.s2, discarded), the disk back on vda.s3. Deleting s2 must
    // not merge vda.s2 into the base: the commit would re-point vda.s3 only, and s3's
    // metadata would name the base while vda.s3.r1 stays on vda.s2 (the next delete of s3
    // was refused: "not an overlay of"). Deleting s3 then removes its discarded revert
    // overlay and merges vda.s3 into vda.s2, which that leaves on the top, virt-snap's
    // overlay of a snapshot that is gone: merged home too.
    for up in [false, true] {
        let mut case = external(up);
        case.snaps = vec![
            snap("s2", None, BASE, Some("/d/vda.s2")),
            snap("s3", Some("s2"), "/d/vda.s2", Some("/d/vda.s3")),
        ];
        case.current = Some("s3");
        case.images = vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s2", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s3", Some("/d/vda.s2"), Some("X"), vec![]),
            ("/d/vda.s3.r1", Some("/d/vda.s2"), Some("C"), vec![]),
        ];
        case.top = "/d/vda.s3";
        case.data = vec![("s2", "A"), ("s3", "B")];
        let e = env(&case);
        for (p, by, snap) in [
            ("/d/vda.s2", MadeBy::Capture, "s2"),
            ("/d/vda.s3", MadeBy::Capture, "s3"),
            ("/d/vda.s3.r1", MadeBy::Revert, "s3"),
        ] {
            let o = OverlayOwner {
                by,
                snapshot: Some(snap.into()),
            };
            e.store.record_overlay(p, o).unwrap();
        }
        let out = delete(&e, "s2", NONE).unwrap();
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains("vda.s2 has 2 overlays")),
            "up {up}: {out:?}"
        );
        assert_eq!(
            e.world.st().images["/d/vda.s3"].backing.as_deref(),
            Some("/d/vda.s2")
        );
        delete(&e, "s3", NONE).unwrap();
        let s = e.world.st();
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        assert_eq!(s.images.keys().collect::<Vec<_>>(), [BASE], "up {up}");
        assert_eq!(s.top, BASE);
        assert_eq!(def_source(&s.definition), BASE);
        assert_eq!(s.read(BASE), "X");
    }
}

#[test]
fn a_metadata_delete_leaves_the_files_to_the_user() {
    // s2's files after `--metadata`: the user's; deleting s1 then merges nothing into them
    // and removes none of them.
    let e = env(&external(false));
    for (p, snap) in [("/d/vda.s1", "s1"), ("/d/vda.s2", "s2")] {
        let o = OverlayOwner {
            by: MadeBy::Capture,
            snapshot: Some(snap.into()),
        };
        e.store.record_overlay(p, o).unwrap();
    }
    delete(&e, "s2", METADATA).unwrap();
    let rec = e.store.overlays().unwrap();
    assert!(!rec.owner("/d/vda.s2").unwrap().is_ours());
    assert!(rec.owner("/d/vda.s1").unwrap().is_ours());
    delete(&e, "s1", NONE).unwrap();
    let s = e.world.st();
    assert!(s.images.contains_key("/d/vda.s2"), "{:?}", s.images.keys());
    assert_eq!(s.top, "/d/vda.s2");
}

#[test]
fn a_file_the_user_gave_at_our_name_is_kept() {
    // s2's overlay at the name a capture picks, but the user's (--reuse-external): merged
    // (the disk's top, active or offline), kept.
    for up in [false, true] {
        let e = env(&external(up));
        e.store
            .record_overlay(
                "/d/vda.s2",
                OverlayOwner {
                    by: MadeBy::User,
                    snapshot: Some("s2".into()),
                },
            )
            .unwrap();
        let out = delete(&e, "s2", NONE).unwrap();
        assert!(
            out.warnings.iter().any(|w| w.contains("vda.s2 is kept")),
            "{out:?}"
        );
        let s = e.world.st();
        assert!(s.images.contains_key("/d/vda.s2"));
        assert_eq!(def_source(&s.definition), "/d/vda.s1");
    }
}

#[test]
fn an_overlay_the_user_named_is_merged_but_kept() {
    let mut case = external(true);
    case.snaps[1] = snap("s2", Some("s1"), "/d/vda.s1", Some("/d/mine.qcow2"));
    case.images[2].0 = "/d/mine.qcow2";
    case.top = "/d/mine.qcow2";
    let e = env(&case);
    let out = delete(&e, "s2", NONE).unwrap();
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("mine.qcow2 is kept")),
        "{out:?}"
    );
    assert!(e.world.st().images.contains_key("/d/mine.qcow2"));
    assert_eq!(e.world.st().top, "/d/vda.s1");
}

#[test]
fn manual_disks_are_left_to_the_user() {
    let e = env(&internal(false));
    let mut m = snap("m", Some("s2"), BASE, None);
    m.disks[0].snapshot = Some(Location::Manual);
    e.store.save(&m).unwrap();
    let p = plan(&e, "m", NONE).unwrap();
    assert_eq!(p.kind, DeleteKind::Metadata);
    assert!(p.notes[0].contains("manual"), "{:?}", p.notes);
}

/// A storage snapshot `st` (child of s2) of vda on pool volume p/v1, whose backend snapshot
/// `st` is there, with another volume snapshot beside it.
fn storage_env(up: bool) -> Env {
    let e = env(&internal(up));
    let mut st = snap("st", Some("s2"), BASE, None);
    st.disks[0].snapshot = Some(Location::Storage);
    st.domain = Some(
        RawXml::element(&domain_xml(BASE).replace(
            &format!("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{BASE}'/>"),
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='p' volume='v1'/>",
        ))
        .unwrap(),
    );
    e.store.save(&st).unwrap();
    let mut vol = crate::testkit::FakeVolume {
        data: "now".into(),
        ..Default::default()
    };
    vol.snaps.insert("st".into(), "then".into());
    vol.snaps.insert("other".into(), "other".into());
    e.world.st().volumes.0.insert("p/v1".into(), vol);
    e
}

#[test]
fn a_storage_snapshot_is_deleted_by_its_backend() {
    for up in [false, true] {
        let e = storage_env(up);
        let p = plan(&e, "st", NONE).unwrap();
        assert_eq!(p.kind, DeleteKind::Storage, "up {up}");
        assert!(matches!(
            &p.steps[p.commit_point],
            Step::DeleteVolumeSnapshot { volume, .. } if volume.pool == "p" && volume.volume == "v1"
        ));
        delete(&e, "st", NONE).unwrap();
        let s = e.world.st();
        let v = s.volumes.get("p", "v1").unwrap();
        assert_eq!(v.snaps.keys().collect::<Vec<_>>(), ["other"], "up {up}");
        assert_eq!(v.data, "now", "the volume's data untouched");
        drop(s);
        assert!(!names(&e).contains(&"st".to_string()));
        // Already gone (deleted behind virt-snap's back): the metadata goes all the same.
        let e = storage_env(up);
        e.world
            .st()
            .volumes
            .0
            .get_mut("p/v1")
            .unwrap()
            .snaps
            .remove("st");
        delete(&e, "st", NONE).unwrap();
        assert!(!names(&e).contains(&"st".to_string()));
        // --metadata leaves the volume snapshot.
        let e = storage_env(up);
        delete(&e, "st", METADATA).unwrap();
        assert!(e
            .world
            .st()
            .volumes
            .get("p", "v1")
            .unwrap()
            .snaps
            .contains_key("st"));
        // --children of s2: the storage child's backend snapshot, then s2's tag.
        let e = storage_env(up);
        let p = plan(&e, "s2", CHILDREN).unwrap();
        assert_eq!(p.kind, DeleteKind::Mixed);
        delete(&e, "s2", CHILDREN).unwrap();
        assert!(!e
            .world
            .st()
            .volumes
            .get("p", "v1")
            .unwrap()
            .snaps
            .contains_key("st"));
        let left = names(&e);
        assert!(!left.iter().any(|n| n == "s2" || n == "st"), "{left:?}");
    }
}

#[test]
fn a_failed_or_killed_volume_snapshot_delete_is_finished_or_left_as_it_was() {
    for up in [false, true] {
        // Failed at the step (it is the commit point): nothing changed, the snapshot kept.
        let e = storage_env(up);
        e.world.st().faults.arm(0, Inject::Fail);
        let err = delete(&e, "st", NONE).unwrap_err();
        assert!(err.to_string().contains("delete-volume-snapshot"), "{err}");
        assert!(names(&e).contains(&"st".to_string()));
        assert!(e
            .world
            .st()
            .volumes
            .get("p", "v1")
            .unwrap()
            .snaps
            .contains_key("st"));
        // Killed before and after it: recovery rolls forward.
        for how in [Inject::KillBefore, Inject::KillAfter] {
            let e = storage_env(up);
            e.world.st().faults.arm(0, how);
            let p = plan(&e, "st", NONE).unwrap();
            let mut j = journal(&e);
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                block_on(run(&p, &e.world.caps(), &mut j, &e.store))
            }));
            assert!(r.is_err(), "{how:?}: not killed");
            drop(j);
            let mut j = journal(&e);
            block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
            assert!(!names(&e).contains(&"st".to_string()), "{how:?}");
            assert!(!e
                .world
                .st()
                .volumes
                .get("p", "v1")
                .unwrap()
                .snaps
                .contains_key("st"));
        }
    }
}

#[test]
fn a_missing_internal_tag_deletes_the_metadata_alone() {
    let e = env(&internal(false));
    e.world.st().images.get_mut(BASE).unwrap().tags.remove("s2");
    let p = plan(&e, "s2", NONE).unwrap();
    assert_eq!(p.kind, DeleteKind::Metadata);
    let out = delete(&e, "s2", NONE).unwrap();
    assert!(
        out.warnings[0].contains("holds no internal snapshot"),
        "{out:?}"
    );
}

/// Runs `f` on every request, each in its own thread (the journal's and the store's fsyncs
/// wait on the disk, not the CPU).
fn in_parallel(f: fn(Request)) {
    std::thread::scope(|sc| {
        for r in requests() {
            sc.spawn(move || f(r));
        }
    });
}

/// The forward effect calls of a plan (all but the metadata steps, which are the store's).
fn effects(p: &DeletePlan) -> Vec<(usize, usize, String)> {
    p.steps
        .iter()
        .enumerate()
        .filter(|(_, s)| !matches!(s, Step::Metadata { .. }))
        .enumerate()
        .map(|(k, (i, s))| (k, i, s.label()))
        .collect()
}

fn snapshot_of(e: &Env) -> (BTreeMap<String, Img>, String, Vec<String>, Option<String>) {
    let s = e.world.st();
    (s.images.clone(), s.definition.clone(), names(e), current(e))
}

#[test]
fn a_failure_at_every_step_leaves_things_as_they_were_or_finishable() {
    in_parallel(fail_at_every_step);
}

fn fail_at_every_step((case, name, flags, _, left, cur, _): Request) {
    let probe = env(&case);
    let p = plan(&probe, name, flags).unwrap();
    for (k, idx, label) in effects(&p) {
        let ctx = format!(
            "{} delete {name} {flags:?}: fail at {k} ({label})",
            case.label
        );
        let e = env(&case);
        let before = snapshot_of(&e);
        e.world.st().faults.arm(k, Inject::Fail);
        let res = delete(&e, name, flags);
        e.world.st().faults.disarm();
        if label == "switch-definition" && idx >= p.commit_point {
            // Stored after the data changed: left pending, the next command completes it.
            let err = res.unwrap_err();
            assert!(
                err.to_string().contains("the next command completes it"),
                "{ctx}"
            );
            let mut j = journal(&e);
            let rec = block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
            assert!(matches!(&rec[0], Recovered::Completed { .. }), "{ctx}");
            assert_eq!(names(&e), left, "{ctx}");
            consistent(&e, &ctx);
            continue;
        }
        assert!(
            journal(&e).pending().is_empty(),
            "{ctx}: nothing left pending"
        );
        match res {
            Err(err) if idx < p.commit_point => {
                assert_eq!(err.kind(), ErrorKind::DeleteFailed, "{ctx}");
                assert_eq!(snapshot_of(&e), before, "{ctx}: as it was");
            }
            Err(err) => {
                // A data step failed: the snapshot is marked and a second delete finishes.
                assert_eq!(err.kind(), ErrorKind::DeleteFailed, "{ctx}");
                assert!(err.to_string().contains("partly deleted"), "{ctx}: {err}");
                let marked = e
                    .store
                    .load()
                    .unwrap()
                    .tree
                    .topological()
                    .iter()
                    .any(|x| e.store.read(x).unwrap().disks[0].delete_in_progress);
                assert!(marked, "{ctx}: marked");
                delete(&e, name, flags).unwrap_or_else(|err| panic!("{ctx}: again: {err}"));
                assert_eq!(names(&e), left, "{ctx}");
                assert_eq!(current(&e).as_deref(), cur, "{ctx}");
                consistent(&e, &ctx);
            }
            Ok(out) => {
                // Only an overlay's removal fails without failing the delete.
                assert!(label.starts_with("remove-overlay"), "{ctx}");
                assert!(out.warnings.iter().any(|w| w.contains("is left")), "{ctx}");
                assert_eq!(names(&e), left, "{ctx}");
                let s = e.world.st();
                assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
            }
        }
    }
}

#[test]
fn a_kill_at_every_step_is_recovered() {
    in_parallel(kill_at_every_step);
}

fn kill_at_every_step((case, name, flags, _, left, cur, top): Request) {
    let probe = env(&case);
    let p = plan(&probe, name, flags).unwrap();
    for (k, idx, label) in effects(&p) {
        for how in [Inject::KillBefore, Inject::KillAfter] {
            let ctx = format!(
                "{} delete {name} {flags:?}: {how:?} at {k} ({label})",
                case.label
            );
            let e = env(&case);
            let before = snapshot_of(&e);
            e.world.st().faults.arm(k, how);
            let mut j = journal(&e);
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                block_on(run(&p, &e.world.caps(), &mut j, &e.store))
            }));
            let payload = r.err().unwrap_or_else(|| panic!("{ctx}: not killed"));
            assert!(payload.is::<Killed>(), "{ctx}: a real panic");
            drop(j);
            e.world.st().faults.disarm();
            let mut j = journal(&e);
            let rec = block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
            assert!(j.pending().is_empty(), "{ctx}");
            drop(j);
            assert_eq!(rec.len(), 1, "{ctx}");
            match &rec[0] {
                Recovered::RolledBack { undo_failures, .. } => {
                    assert!(idx < p.commit_point, "{ctx}: rolled back");
                    assert!(undo_failures.is_empty(), "{ctx}: {undo_failures:?}");
                    assert_eq!(snapshot_of(&e), before, "{ctx}: as it was");
                }
                Recovered::Completed { .. } => {
                    assert_eq!(names(&e), left, "{ctx}");
                    assert_eq!(current(&e).as_deref(), cur, "{ctx}");
                    assert_eq!(def_source(&e.world.st().definition), top, "{ctx}");
                    consistent(&e, &ctx);
                }
            }
        }
    }
}

/// External s1 (vda.s1 on the base), then internal i2 in vda.s1 (its child); the disk on
/// vda.s1.
fn internal_under_external(up: bool) -> Case {
    Case {
        label: "internal under external",
        snaps: vec![
            snap("s1", None, BASE, Some("/d/vda.s1")),
            snap("i2", Some("s1"), "/d/vda.s1", None),
        ],
        current: Some("i2"),
        images: vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s1", Some(BASE), Some("C"), vec!["i2"]),
        ],
        top: "/d/vda.s1",
        up,
        data: vec![("s1", "A")],
    }
}

#[test]
fn an_overlay_holding_internal_snapshots_is_not_merged_away() {
    for up in [true, false] {
        let e = env(&internal_under_external(up));
        let p = plan(&e, "s1", NONE).unwrap();
        assert_eq!(p.kind, DeleteKind::Metadata, "{:?}", p.steps);
        assert!(
            p.notes[0].contains("holds internal snapshots"),
            "{:?}",
            p.notes
        );
        delete(&e, "s1", NONE).unwrap();
        consistent(&e, "s1 deleted, i2 kept in vda.s1");
        assert!(e.world.st().images["/d/vda.s1"].tags.contains("i2"));
        // With i2 gone first (--children), the merge goes ahead.
        let e = env(&internal_under_external(up));
        let p = plan(&e, "s1", CHILDREN).unwrap();
        assert_eq!(p.kind, DeleteKind::Mixed, "{:?}", p.steps);
        delete(&e, "s1", CHILDREN).unwrap();
        let s = e.world.st();
        assert_eq!(s.images.keys().collect::<Vec<_>>(), [BASE]);
        assert_eq!(s.images[BASE].data.as_deref(), Some("C"));
        assert!(s.violations.is_empty(), "{:?}", s.violations);
    }
}

#[test]
fn a_merge_refused_before_it_started_changes_nothing_of_its_snapshot() {
    // At the commit point: as it was, nothing marked, nothing pending.
    let e = env(&external(true));
    let before = snapshot_of(&e);
    e.world.st().refuse_commit = Some(0);
    let err = delete(&e, "s1", CHILDREN).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeleteFailed);
    assert_eq!(snapshot_of(&e), before);
    assert!(journal(&e).pending().is_empty());
    // After it (s2 merged and deleted, s1's merge refused): s1 kept, not marked.
    e.world.st().refuse_commit = Some(1);
    let err = delete(&e, "s1", CHILDREN).unwrap_err();
    assert!(
        err.to_string().contains("before it changed anything"),
        "{err}"
    );
    assert_eq!(names(&e), ["s1"]);
    assert!(!e.store.read(&n("s1")).unwrap().disks[0].delete_in_progress);
    assert!(journal(&e).pending().is_empty());
    consistent(&e, "s1 kept");
    delete(&e, "s1", NONE).unwrap();
    assert!(names(&e).is_empty());
}

#[test]
fn delete_records_share_the_journal_with_the_others() {
    let e = env(&external(true));
    let p = plan(&e, "s2", NONE).unwrap();
    let mut j = journal(&e);
    let op = j.begin(JOURNAL_KIND, "vm").unwrap();
    j.record_step(
        op,
        crate::ops::OpRecord::Delete(DeleteRecord::DeletePlan {
            plan: Box::new(p.clone()),
        }),
    )
    .unwrap();
    drop(j);
    let mut j = journal(&e);
    // A revert's recovery does not see it.
    assert!(
        crate::ops::pending::<crate::revert::RevertRecord>(&j, crate::revert::JOURNAL_KIND)
            .is_empty()
    );
    let rec = block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
    assert!(matches!(&rec[0], Recovered::RolledBack { name: Some(x), .. } if x == "s2"));
    assert_eq!(names(&e), ["s1", "s2"]);
}

/// A small deterministic generator (xorshift64*) for the random sequences below.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// One random history on the fake: captures (external and internal), external reverts, guest
/// writes, starts and stops, and deletes of random snapshots with random flags; after every
/// delete, what the planner accepted left the disk's current data, QEMU's top and the
/// definition agreeing, and every remaining external snapshot's data readable through its
/// image; nothing acted behind QEMU's back, no file in use was removed.
fn random_history(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let case = Case {
        label: "random",
        snaps: vec![],
        current: None,
        images: vec![(BASE, None, Some("w0"), vec![])],
        top: BASE,
        up: true,
        data: vec![],
    };
    let e = env(&case);
    // Each snapshot's data as taken.
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    let mut writes = 0;
    let mut next = 0;
    let steps: usize = std::env::var("DELETE_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let names: Vec<String> = names(&e);
        if std::env::var("DELETE_TRACE").is_ok() {
            let s = e.world.st();
            eprintln!(
                "{ctx}: up {} top {} images {:?} snaps {names:?} current {:?}",
                s.up,
                s.top,
                s.images
                    .iter()
                    .map(|(k, v)| (k.clone(), v.backing.clone(), v.tags.clone()))
                    .collect::<Vec<_>>(),
                e.store.current().unwrap()
            );
        }
        match rng.below(10) {
            0 | 1 => {
                // A guest write (only while it runs; offline, as a write with qemu-io).
                writes += 1;
                let mut s = e.world.st();
                let top = if s.up {
                    s.top.clone()
                } else {
                    def_source(&s.definition)
                };
                s.images.get_mut(&top).unwrap().data = Some(format!("w{writes}"));
            }
            2 | 3 => {
                // An external capture onto a new overlay of the top.
                next += 1;
                let name = format!("e{next}");
                let mut s = e.world.st();
                let top = def_source(&s.definition);
                let o = default_overlay_path(&top, &name);
                let data = s.read(&top);
                s.images.insert(
                    o.clone(),
                    Img {
                        backing: Some(top.clone()),
                        ..Default::default()
                    },
                );
                s.top = o.clone();
                s.definition = domain_xml(&o);
                let cur = e.store.current().unwrap();
                let sn = snap(&name, cur.as_ref().map(|c| c.as_str()), &top, Some(&o));
                e.store.save(&sn).unwrap();
                e.store.set_current(Some(&n(&name))).unwrap();
                taken.insert(name, data);
            }
            4 => {
                // An internal capture in the top image.
                next += 1;
                let name = format!("i{next}");
                let mut s = e.world.st();
                let top = def_source(&s.definition);
                s.images.get_mut(&top).unwrap().tags.insert(name.clone());
                let cur = e.store.current().unwrap();
                let sn = snap(&name, cur.as_ref().map(|c| c.as_str()), &top, None);
                e.store.save(&sn).unwrap();
                e.store.set_current(Some(&n(&name))).unwrap();
            }
            5 => {
                // An external revert: a new overlay of the snapshot's image.
                let ext: Vec<&String> = names.iter().filter(|x| x.starts_with('e')).collect();
                if ext.is_empty() {
                    continue;
                }
                let name = ext[rng.below(ext.len())].clone();
                let d = e.store.read(&n(&name)).unwrap();
                let base = def_source(d.domain.as_ref().unwrap().as_str());
                let mut s = e.world.st();
                let r = (1..)
                    .map(|k| format!("{}.r{k}", default_overlay_path(&base, &name)))
                    .find(|p| !s.images.contains_key(p))
                    .unwrap();
                s.images.insert(
                    r.clone(),
                    Img {
                        backing: Some(base),
                        ..Default::default()
                    },
                );
                s.top = r.clone();
                s.definition = domain_xml(&r);
                e.store.set_current(Some(&n(&name))).unwrap();
            }
            6 => {
                let mut s = e.world.st();
                s.up = !s.up;
                s.top = def_source(&s.definition);
            }
            _ => {
                if names.is_empty() {
                    continue;
                }
                let name = names[rng.below(names.len())].clone();
                let flags = match rng.below(6) {
                    0 => CHILDREN,
                    1 => CHILDREN_ONLY,
                    2 => METADATA,
                    _ => NONE,
                };
                let current = {
                    let s = e.world.st();
                    let top = def_source(&s.definition);
                    s.read(&top)
                };
                let p = match plan(&e, &name, flags) {
                    Ok(p) => p,
                    // A refusal (an internal snapshot in a backing file of the running
                    // domain): nothing to check but that nothing changed.
                    Err(err) => {
                        assert_eq!(err.kind(), ErrorKind::InvalidPlan, "{ctx}: {err}");
                        continue;
                    }
                };
                let before_images: Vec<_> = e
                    .world
                    .st()
                    .images
                    .iter()
                    .map(|(k, v)| (k.clone(), v.backing.clone()))
                    .collect();
                let mut j = journal(&e);
                block_on(run(&p, &e.world.caps(), &mut j, &e.store))
                    .unwrap_or_else(|err| panic!("{ctx}: delete {name} {flags:?}: {err}"));
                let ctx = format!(
                    "{ctx}: delete {name} {flags:?} (images before: {before_images:?}; plan: {:?})",
                    p.steps.iter().map(|s| s.label()).collect::<Vec<_>>()
                );
                let s = e.world.st();
                assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
                let top = def_source(&s.definition);
                if s.up {
                    assert_eq!(top, s.top, "{ctx}: QEMU's top and the definition");
                }
                assert_eq!(s.read(&top), current, "{ctx}: the current data");
                for left in names_in(&e) {
                    let d = e.store.read(&n(&left)).unwrap();
                    let on = def_source(d.domain.as_ref().unwrap().as_str());
                    assert!(s.images.contains_key(&on), "{ctx}: {left}'s image {on}");
                    match d.disks[0].source.as_ref().and_then(|x| x.file.clone()) {
                        Some(o) => {
                            assert!(s.images.contains_key(&o), "{ctx}: {left}'s overlay {o}");
                            assert_eq!(s.read(&on), taken[&left], "{ctx}: {left}'s data");
                        }
                        None => assert!(s.images[&on].tags.contains(&left), "{ctx}: {left}'s tag"),
                    }
                }
            }
        }
    }
}

fn names_in(e: &Env) -> Vec<String> {
    names(e)
}

#[test]
fn random_histories_keep_files_graph_and_metadata_agreeing() {
    std::thread::scope(|sc| {
        let only: Option<u64> = std::env::var("DELETE_SEED")
            .ok()
            .and_then(|v| v.parse().ok());
        let seeds: u64 = std::env::var("DELETE_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8);
        for seed in 1..=seeds {
            if only.is_some_and(|o| o != seed) {
                continue;
            }
            sc.spawn(move || random_history(seed));
        }
    });
}

#[test]
fn a_deleted_snapshots_overlay_left_on_top_by_a_merge_of_the_same_delete_goes_home() {
    // Found by tests/history.rs (seed 1, 24 operations): s1's overlay vda.s1 kept when s1
    // was deleted (s2's image), then s2 and its child s3 deleted with --children: s3's
    // overlay merged into vda.s2, vda.s2 into vda.s1, which is left on the disk's top,
    // virt-snap's, needed by nothing: it goes back into the base too.
    for up in [false, true] {
        let mut case = external(up);
        case.snaps = vec![
            snap("s2", None, "/d/vda.s1", Some("/d/vda.s2")),
            snap("s3", Some("s2"), "/d/vda.s2", Some("/d/vda.s3")),
        ];
        case.current = Some("s3");
        case.images = vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s1", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s2", Some("/d/vda.s1"), Some("C"), vec![]),
            ("/d/vda.s3", Some("/d/vda.s2"), Some("D"), vec![]),
        ];
        case.top = "/d/vda.s3";
        case.data = vec![("s2", "B"), ("s3", "C")];
        let e = env(&case);
        record(
            &e,
            &[
                ("/d/vda.s1", MadeBy::Capture, "s1"),
                ("/d/vda.s2", MadeBy::Capture, "s2"),
                ("/d/vda.s3", MadeBy::Capture, "s3"),
            ],
        );
        delete(&e, "s2", CHILDREN).unwrap();
        assert_home(&e, "D", &format!("up {up}: the disk on its own file"));
    }
}

#[test]
fn a_gone_snapshots_discarded_revert_overlay_beside_the_top_goes_and_the_disk_comes_home() {
    // Found by tests/history.rs (seed 10, 24 operations): s3 deleted while its overlay
    // vda.s3 was s4's image and its revert overlay vda.s3.r1 the disk's top; a revert to s4
    // discarded vda.s3.r1. Deleting s4 merges s4's revert overlay into vda.s3, which is
    // left on the top beside vda.s3.r1, both on the base: vda.s3.r1 (needed by nothing)
    // goes, then vda.s3 goes home.
    for up in [false, true] {
        let mut case = external(up);
        case.snaps = vec![snap("s4", None, "/d/vda.s3", Some("/d/vda.s4"))];
        case.current = Some("s4");
        case.images = vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s3", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s3.r1", Some(BASE), Some("X"), vec![]),
            ("/d/vda.s4", Some("/d/vda.s3"), Some("Y"), vec![]),
            ("/d/vda.s4.r1", Some("/d/vda.s3"), Some("C"), vec![]),
        ];
        case.top = "/d/vda.s4.r1";
        case.data = vec![("s4", "B")];
        let e = env(&case);
        record(
            &e,
            &[
                ("/d/vda.s3", MadeBy::Capture, "s3"),
                ("/d/vda.s3.r1", MadeBy::Revert, "s3"),
                ("/d/vda.s4", MadeBy::Capture, "s4"),
                ("/d/vda.s4.r1", MadeBy::Revert, "s4"),
            ],
        );
        delete(&e, "s4", NONE).unwrap();
        assert_home(&e, "C", &format!("up {up}: the disk on its own file"));
    }
}

/// The disk back on its own file after the deletes: no other image, the definition and the
/// top on the base, holding `data`, and no violation.
fn assert_home(e: &Env, data: &str, ctx: &str) {
    let s = e.world.st();
    assert_eq!(s.images.keys().collect::<Vec<_>>(), [BASE], "{ctx}");
    assert_eq!(s.top, BASE, "{ctx}");
    assert_eq!(def_source(&s.definition), BASE, "{ctx}");
    assert_eq!(s.images[BASE].data.as_deref(), Some(data), "{ctx}");
    assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
}

/// Records who made each overlay (path, by, snapshot) in the overlay record.
fn record(e: &Env, entries: &[(&str, MadeBy, &str)]) {
    for (p, by, s) in entries {
        e.store
            .record_overlay(
                p,
                OverlayOwner {
                    by: *by,
                    snapshot: Some((*s).into()),
                },
            )
            .unwrap();
    }
}

#[test]
fn a_gone_snapshots_overlay_on_the_top_goes_home_after_a_stream_under_it() {
    // Found by tests/history.rs (seed 42, 48 operations): s6's data is vda.s5 (the overlay
    // of a snapshot that is gone), which has s6's overlay and a gone snapshot's revert
    // overlay (the disk's top) on it. Deleting s6 removes s6's overlay and streams vda.s5
    // up into the top, which then sits on the base alone, needed by nothing: merged home
    // after the stream.
    for up in [false, true] {
        let mut case = external(up);
        case.snaps = vec![snap("s6", None, "/d/vda.s5", Some("/d/vda.s6"))];
        case.current = Some("s6");
        case.images = vec![
            (BASE, None, Some("A"), vec![]),
            ("/d/vda.s5", Some(BASE), Some("B"), vec![]),
            ("/d/vda.s6", Some("/d/vda.s5"), Some("X"), vec![]),
            ("/d/vda.s7.r1", Some("/d/vda.s5"), Some("C"), vec![]),
        ];
        case.top = "/d/vda.s7.r1";
        case.data = vec![("s6", "B")];
        let e = env(&case);
        record(
            &e,
            &[
                ("/d/vda.s5", MadeBy::Capture, "s5"),
                ("/d/vda.s6", MadeBy::Capture, "s6"),
                ("/d/vda.s7.r1", MadeBy::Revert, "s7"),
            ],
        );
        delete(&e, "s6", NONE).unwrap();
        assert_home(&e, "C", &format!("up {up}"));
    }
}
