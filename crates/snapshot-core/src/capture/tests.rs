//! Recording fakes of the capability traits, failure injection at every step, kills at
//! every step with recovery, planning rules, a property test and a 500-deep chain.

use super::*;
use crate::error::{Error, ErrorKind};
use crate::journal::Journal;
use crate::name::SnapshotName;
use crate::store::{DomainStore, SnapshotStore};
use crate::testkit::{block_on, Faults, Faulty, Inject, Killed};
use crate::xml::{Location, RawXml};
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct State {
    running: bool,
    halted: bool,
    frozen: bool,
    ever_frozen_while_saving: bool,
    files: BTreeSet<String>,
    user_files: BTreeSet<String>,
    nodes: BTreeSet<String>,
    active: BTreeSet<String>,
    internal: BTreeSet<String>,
    memory: BTreeSet<String>,
    backend: BTreeSet<String>,
    violations: Vec<String>,
    faults: Faults,
    now_ms: u64,
    /// The budget each freeze call was given.
    freeze_budgets: Vec<Duration>,
    /// QEMU refuses background-snapshot.
    refuse_background: bool,
    /// How long a save with the guest paused takes (fake clock).
    paused_save_ms: u64,
    /// Held paused for manual snapshots: the snapshot, its manual disks, the hold.
    held: Option<(String, Vec<String>, Duration)>,
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
    fn running() -> Self {
        let w = World::default();
        w.st().running = true;
        w
    }

    fn arm(&self, at: usize, how: Inject) {
        self.st().faults.arm(at, how);
    }

    fn disarm(&self) {
        self.st().faults.disarm();
    }

    fn caps(&self) -> Capabilities<'_> {
        Capabilities {
            vcpus: self,
            agent: self,
            block: self,
            memory: self,
            backends: self,
            clock: self,
        }
    }
}

fn exists(what: &str) -> Error {
    Error::backend(what, "already exists")
}

#[async_trait]
impl Vcpus for World {
    async fn pause(&self) -> Result<()> {
        self.effect("pause", |s| {
            s.running = false;
            Ok(())
        })
        .await
    }
    async fn resume(&self) -> Result<()> {
        self.effect("resume", |s| {
            s.running = !s.halted;
            s.held = None;
            Ok(())
        })
        .await
    }
    async fn is_running(&self) -> Result<bool> {
        Ok(self.st().running)
    }
    async fn halt(&self) -> Result<()> {
        self.effect("halt", |s| {
            s.halted = true;
            s.running = false;
            Ok(())
        })
        .await
    }
    async fn hold(&self, snapshot: &str, disks: &[String], hold: Duration) -> Result<()> {
        self.effect("hold", |s| {
            if s.running {
                s.violations.push("held while running".into());
            }
            s.held = Some((snapshot.to_string(), disks.to_vec(), hold));
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl GuestAgent for World {
    async fn freeze(&self, budget: Duration) -> Result<u32> {
        self.effect("freeze", |s| {
            s.frozen = true;
            s.freeze_budgets.push(budget);
            Ok(2)
        })
        .await
    }
    async fn thaw(&self) -> Result<u32> {
        self.effect("thaw", |s| {
            s.frozen = false;
            Ok(2)
        })
        .await
    }
    async fn is_frozen(&self) -> Result<bool> {
        Ok(self.st().frozen)
    }
}

#[async_trait]
impl BlockLayer for World {
    async fn create_overlay(&self, path: &str, _: &str, _: &str, _: &str) -> Result<()> {
        self.effect("create_overlay", |s| {
            if !s.files.insert(path.to_string()) {
                return Err(exists(path));
            }
            Ok(())
        })
        .await
    }
    async fn check_overlay(&self, path: &str, _: &str) -> Result<()> {
        self.effect("check_overlay", |s| {
            if s.files.contains(path) {
                Ok(())
            } else {
                Err(Error::backend(path, "no such file"))
            }
        })
        .await
    }
    async fn remove_overlay(&self, path: &str, _: &str) -> Result<()> {
        self.undo_call();
        let mut s = self.st();
        if s.user_files.contains(path) {
            s.violations.push(format!("removed the user's {path}"));
        }
        s.files.remove(path);
        Ok(())
    }
    async fn add_node(&self, node: &str, _: &str, _: &str) -> Result<()> {
        self.effect("add_node", |s| {
            if !s.nodes.insert(node.to_string()) {
                return Err(exists(node));
            }
            Ok(())
        })
        .await
    }
    async fn del_node(&self, node: &str) -> Result<()> {
        self.undo_call();
        let mut s = self.st();
        if s.active.contains(node) {
            s.violations.push(format!("deleted the active node {node}"));
        }
        s.nodes.remove(node);
        Ok(())
    }
    async fn snapshot_transaction(&self, actions: &[OverlayAction]) -> Result<()> {
        self.effect("transaction", |s| {
            if let Some(a) = actions.iter().find(|a| !s.nodes.contains(&a.overlay)) {
                return Err(Error::backend(&a.overlay, "no such node"));
            }
            for a in actions {
                s.active.insert(a.overlay.clone());
            }
            Ok(())
        })
        .await
    }
    async fn merge_back(&self, actions: &[OverlayAction]) -> Result<()> {
        self.undo_call();
        let mut s = self.st();
        for a in actions {
            s.active.remove(&a.overlay);
        }
        Ok(())
    }
    async fn internal_snapshot(&self, tag: &str, _: &[String], _: Option<&str>) -> Result<()> {
        self.effect("internal_snapshot", |s| {
            if s.frozen {
                s.ever_frozen_while_saving = true;
            }
            s.internal.insert(tag.to_string());
            Ok(())
        })
        .await
    }
    async fn delete_internal_snapshot(&self, tag: &str, _: &[String]) -> Result<()> {
        self.undo_call();
        self.st().internal.remove(tag);
        Ok(())
    }
}

#[async_trait]
impl MemorySaver for World {
    async fn save(&self, file: &str, live: bool, fallback: bool) -> Result<Saved> {
        self.effect("save", |s| {
            if s.frozen {
                s.ever_frozen_while_saving = true;
            }
            let saved = match (live, s.refuse_background, fallback) {
                (true, false, _) => Saved::Live,
                (true, true, false) => {
                    return Err(Error::backend(file, "background-snapshot refused"))
                }
                _ => {
                    // A save with the guest paused takes its time.
                    s.now_ms += s.paused_save_ms;
                    Saved::Complete
                }
            };
            s.memory.insert(file.to_string());
            Ok(saved)
        })
        .await
    }
    async fn wait(&self, _file: &str) -> Result<()> {
        self.effect("wait", |s| {
            if s.frozen {
                s.ever_frozen_while_saving = true;
            }
            Ok(())
        })
        .await
    }
    async fn discard(&self, file: &str) -> Result<()> {
        self.undo_call();
        self.st().memory.remove(file);
        Ok(())
    }
}

#[async_trait]
impl BackendSnapshots for World {
    async fn create(&self, volume: &PoolVolume, _: BackendKind, name: &str) -> Result<()> {
        let key = format!("{}/{}@{name}", volume.pool, volume.volume);
        self.effect("backend", |s| {
            if !s.backend.insert(key.clone()) {
                return Err(exists(&key));
            }
            Ok(())
        })
        .await
    }
    async fn delete(&self, volume: &PoolVolume, _: BackendKind, name: &str) -> Result<()> {
        self.undo_call();
        let key = format!("{}/{}@{name}", volume.pool, volume.volume);
        self.st().backend.remove(&key);
        Ok(())
    }
}

#[async_trait]
impl Clock for World {
    fn unix_time(&self) -> i64 {
        1_700_000_000
    }
    fn monotonic(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.st().now_ms)
    }
    async fn sleep(&self, d: std::time::Duration) {
        self.st().now_ms += d.as_millis() as u64;
    }
}

fn qcow2(target: &str) -> DomainDisk {
    DomainDisk {
        target: target.into(),
        source: Some(format!("/img/{target}.qcow2")),
        format: "qcow2".into(),
        volume: None,
        readonly: false,
        cdrom: false,
        node: format!("node-{target}"),
    }
}

fn pool_disk(target: &str, kind: BackendKind) -> DomainDisk {
    DomainDisk {
        target: target.into(),
        source: Some(format!("/pool/{target}.raw")),
        format: "raw".into(),
        volume: Some(PoolVolume {
            pool: "p".into(),
            volume: format!("{target}.raw"),
            backend: Some(kind),
        }),
        readonly: false,
        cdrom: false,
        node: format!("node-{target}"),
    }
}

fn cdrom() -> DomainDisk {
    DomainDisk {
        target: "sda".into(),
        source: Some("/iso/x.iso".into()),
        format: "raw".into(),
        volume: None,
        readonly: true,
        cdrom: true,
        node: "node-sda".into(),
    }
}

fn domain(disks: Vec<DomainDisk>) -> DomainInfo {
    DomainInfo {
        name: "vm".into(),
        state: RunState::Running,
        has_agent: true,
        disks,
        current: None,
        domain_xml: None,
        running_xml: None,
    }
}

fn req(name: &str) -> CaptureRequest {
    CaptureRequest::new(SnapshotName::new(name).unwrap())
}

fn spec(name: &str, choice: DiskChoice) -> DiskRequest {
    DiskRequest {
        name: name.into(),
        choice,
    }
}

fn ext() -> DiskChoice {
    DiskChoice::External {
        file: None,
        format: None,
    }
}

/// A capture mode: the request, the domain, user files that exist beforehand.
struct Mode {
    label: &'static str,
    req: CaptureRequest,
    dom: DomainInfo,
    user_files: Vec<String>,
}

fn modes() -> Vec<Mode> {
    let four = || domain(["vda", "vdb", "vdc", "vdd"].map(qcow2).to_vec());
    let mut v = Vec::new();
    for quiesce in [false, true] {
        let mut r = req("s1");
        r.flags.disk_only = true;
        r.flags.atomic = true;
        r.flags.quiesce = quiesce;
        v.push(Mode {
            label: if quiesce {
                "disk-only atomic 4 disks quiesced"
            } else {
                "disk-only atomic 4 disks"
            },
            req: r,
            dom: four(),
            user_files: vec![],
        });
    }
    v.push(Mode {
        label: "internal with RAM",
        req: req("s1"),
        dom: domain(vec![qcow2("vda"), qcow2("vdb"), cdrom()]),
        user_files: vec![],
    });
    for live in [false, true] {
        let mut r = req("s1");
        r.memory = MemoryChoice::External {
            file: "/img/vm.mem".into(),
        };
        r.flags.live = live;
        v.push(Mode {
            label: if live {
                "external RAM live"
            } else {
                "external RAM paused"
            },
            req: r,
            dom: domain(vec![qcow2("vda"), qcow2("vdb")]),
            user_files: vec![],
        });
    }
    for quiesce in [false, true] {
        let mut r = req("s1");
        r.flags.disk_only = true;
        r.flags.quiesce = quiesce;
        r.disks = vec![
            spec("vdb", DiskChoice::Storage),
            spec("vdc", DiskChoice::Storage),
        ];
        v.push(Mode {
            label: if quiesce {
                "storage + external quiesced"
            } else {
                "storage + external"
            },
            req: r,
            dom: domain(vec![
                qcow2("vda"),
                pool_disk("vdb", BackendKind::Btrfs),
                pool_disk("vdc", BackendKind::Lvm),
            ]),
            user_files: vec![],
        });
    }
    let mut r = req("s1");
    r.flags.disk_only = true;
    r.disks = vec![spec("vdb", DiskChoice::No)];
    v.push(Mode {
        label: "subset with no",
        req: r,
        dom: domain(vec![qcow2("vda"), qcow2("vdb"), qcow2("vdc"), cdrom()]),
        user_files: vec![],
    });
    let mut r = req("s1");
    r.flags.disk_only = true;
    r.flags.reuse_external = true;
    v.push(Mode {
        label: "reuse external",
        req: r,
        dom: domain(vec![qcow2("vda"), qcow2("vdb")]),
        user_files: vec!["/img/vda.s1".into(), "/img/vdb.s1".into()],
    });
    let mut r = req("s1");
    r.flags.disk_only = true;
    r.flags.halt = true;
    v.push(Mode {
        label: "disk-only halt",
        req: r,
        dom: domain(vec![qcow2("vda")]),
        user_files: vec![],
    });
    let mut d = domain(vec![qcow2("vda"), pool_disk("vdb", BackendKind::Reflink)]);
    d.state = RunState::ShutOff;
    let mut r = req("s1");
    r.disks = vec![spec("vdb", DiskChoice::Storage)];
    v.push(Mode {
        label: "shut off external + storage",
        req: r,
        dom: d,
        user_files: vec![],
    });
    // Manual disks: paused and held for the user's own snapshots after the capture.
    let mut r = req("s1");
    r.flags.disk_only = true;
    r.disks = vec![spec("vdb", DiskChoice::Manual)];
    v.push(Mode {
        label: "manual + external",
        req: r,
        dom: domain(vec![qcow2("vda"), qcow2("vdb")]),
        user_files: vec![],
    });
    let mut r = req("s1");
    r.disks = vec![spec("vda", DiskChoice::Manual)];
    v.push(Mode {
        label: "manual only",
        req: r,
        dom: domain(vec![qcow2("vda")]),
        user_files: vec![],
    });
    let mut d = domain(vec![qcow2("vda")]);
    d.state = RunState::ShutOff;
    let mut r = req("s1");
    r.disks = vec![spec("vda", DiskChoice::Manual)];
    v.push(Mode {
        label: "shut off manual only",
        req: r,
        dom: d,
        user_files: vec![],
    });
    // Offline overlays alone: the last overlay made is the commit point.
    let mut d = domain(vec![qcow2("vda"), qcow2("vdb")]);
    d.state = RunState::ShutOff;
    let mut r = req("s1");
    r.flags.disk_only = true;
    v.push(Mode {
        label: "shut off disk-only external",
        req: r,
        dom: d,
        user_files: vec![],
    });
    v
}

struct Env {
    _dir: tempfile::TempDir,
    store: DomainStore,
    journal_path: std::path::PathBuf,
    world: World,
}

fn env(mode: &Mode) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(dir.path().join("snapshots"))
        .domain("vm")
        .unwrap();
    std::fs::create_dir_all(store.dir()).unwrap();
    let world = if mode.dom.state == RunState::ShutOff {
        World::default()
    } else {
        World::running()
    };
    {
        let mut s = world.st();
        for f in &mode.user_files {
            s.files.insert(f.clone());
            s.user_files.insert(f.clone());
        }
    }
    Env {
        journal_path: store.journal_path(),
        _dir: dir,
        store,
        world,
    }
}

fn plan_of(mode: &Mode, w: &World) -> CapturePlan {
    CapturePlan::new(&mode.req, &mode.dom, w).unwrap_or_else(|e| panic!("{}: {e}", mode.label))
}

/// How many forward effect calls the plan makes (one per step but the metadata commit).
fn effect_steps(plan: &CapturePlan) -> Vec<(usize, String)> {
    plan.steps
        .iter()
        .filter(|s| !matches!(s, Step::CommitMetadata { .. }))
        .map(Step::label)
        .enumerate()
        .collect()
}

fn journal(e: &Env) -> crate::ops::DomainJournal {
    Journal::open(&e.journal_path).unwrap()
}

/// The guarantees after an undone capture.
fn assert_nothing_left(e: &Env, mode: &Mode, ctx: &str) {
    let s = e.world.st();
    let was_running = mode.dom.state == RunState::Running;
    assert_eq!(s.running, was_running, "{ctx}: running");
    assert!(!s.frozen, "{ctx}: frozen");
    assert!(!s.ever_frozen_while_saving, "{ctx}: frozen while RAM saved");
    assert_eq!(s.files, s.user_files, "{ctx}: files");
    assert!(s.nodes.is_empty(), "{ctx}: nodes {:?}", s.nodes);
    assert!(s.active.is_empty(), "{ctx}: active {:?}", s.active);
    assert!(s.internal.is_empty(), "{ctx}: internal");
    assert!(s.held.is_none(), "{ctx}: held");
    assert!(s.memory.is_empty(), "{ctx}: memory");
    assert!(s.backend.is_empty(), "{ctx}: backend {:?}", s.backend);
    assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
    drop(s);
    assert!(e.store.names().unwrap().is_empty(), "{ctx}: metadata");
    assert_eq!(e.store.current().unwrap(), None, "{ctx}: current");
    // The overlay record names no file of ours (a reused file stays the user's).
    let rec = e.store.overlays().unwrap();
    assert!(
        rec.overlays.values().all(|o| !o.is_ours()),
        "{ctx}: overlay record {rec:?}"
    );
    assert!(journal(e).pending().is_empty(), "{ctx}: journal pending");
}

/// The guarantees after a completed capture.
fn assert_completed(e: &Env, mode: &Mode, plan: &CapturePlan, ctx: &str) {
    let s = e.world.st();
    // A failed --halt leaves it running; so does a hold for manual disks that failed.
    assert_eq!(
        s.running,
        mode.dom.state == RunState::Running && !s.halted && s.held.is_none(),
        "{ctx}: running"
    );
    let holds = plan.steps.iter().find_map(|s| match s {
        Step::HoldPaused { disks, .. } => Some(disks.clone()),
        _ => None,
    });
    if let Some((snap, disks, _)) = &s.held {
        assert_eq!(snap, plan.name.as_str(), "{ctx}: held for");
        assert_eq!(Some(disks), holds.as_ref(), "{ctx}: held disks");
    }
    assert!(mode.req.flags.halt || !s.halted, "{ctx}: halted");
    assert!(!s.frozen, "{ctx}: frozen");
    assert!(!s.ever_frozen_while_saving, "{ctx}: frozen while RAM saved");
    assert!(s.violations.is_empty(), "{ctx}: {:?}", s.violations);
    for step in &plan.steps {
        match step {
            Step::PreCreateOverlay { path, .. } => assert!(s.files.contains(path), "{ctx}"),
            Step::AddOverlayNode { node, .. } => assert!(s.active.contains(node), "{ctx}"),
            Step::BackendSnapshot { .. } => assert!(!s.backend.is_empty(), "{ctx}"),
            Step::InternalSnapshot { tag, .. } => assert!(s.internal.contains(tag), "{ctx}"),
            Step::SaveMemory { file, .. } => assert!(s.memory.contains(file), "{ctx}"),
            _ => {}
        }
    }
    drop(s);
    let name = &plan.name;
    // Each overlay's maker recorded: the capture's own, the user's when reused or named.
    let rec = e.store.overlays().unwrap();
    for step in &plan.steps {
        if let Step::PreCreateOverlay {
            path,
            backing,
            reuse,
            ..
        } = step
        {
            let o = rec
                .owner(path)
                .unwrap_or_else(|| panic!("{ctx}: {path} not recorded"));
            let ours = !reuse && *path == super::default_overlay_path(backing, name.as_str());
            assert_eq!(o.is_ours(), ours, "{ctx}: {path}: {o:?}");
            assert_eq!(o.snapshot.as_deref(), Some(name.as_str()), "{ctx}");
        }
    }
    let snap = e.store.read(name).unwrap();
    assert_eq!(e.store.current().unwrap().as_ref(), Some(name), "{ctx}");
    for (target, loc) in &plan.disks {
        let d = snap.disks.iter().find(|d| &d.name == target).unwrap();
        assert_eq!(d.snapshot, Some(*loc), "{ctx}");
    }
    assert!(journal(e).pending().is_empty(), "{ctx}: journal pending");
    let loaded = e.store.load().unwrap();
    assert!(loaded.tree.contains(name.as_str()), "{ctx}: tree");
}

#[test]
fn every_mode_succeeds_and_commits() {
    for mode in modes() {
        let e = env(&mode);
        let plan = plan_of(&mode, &e.world);
        let mut j = journal(&e);
        let out = block_on(run(&plan, &e.world.caps(), &mut j, &e.store))
            .unwrap_or_else(|err| panic!("{}: {err}", mode.label));
        assert!(
            out.warnings.is_empty(),
            "{}: {:?}",
            mode.label,
            out.warnings
        );
        drop(j);
        assert_completed(&e, &mode, &plan, mode.label);
    }
}

#[test]
fn a_failure_at_every_step_of_every_mode_undoes_everything() {
    for mode in modes() {
        let probe = env(&mode);
        let plan = plan_of(&mode, &probe.world);
        for (k, label) in effect_steps(&plan) {
            let mut injections = vec![Inject::Fail];
            // Hangs where a budget bounds them: the freeze, the pause and the paused window.
            let pause = plan
                .steps
                .iter()
                .position(|s| matches!(s, Step::Pause { .. }));
            let resume = plan.steps.iter().position(|s| matches!(s, Step::Resume));
            let idx = plan.steps.iter().position(|s| s.label() == label).unwrap();
            let after = |f: fn(&Step) -> bool| plan.steps.iter().position(f);
            let freeze = after(|s| matches!(s, Step::Freeze { .. }));
            let thaw = after(|s| matches!(s, Step::Thaw));
            let inside = |from: Option<usize>, to: Option<usize>| matches!((from, to), (Some(f), Some(t)) if idx > f && idx < t);
            // A RAM save with the guest paused is the pause the user asked for: bounded by
            // the facade's job timeout, not by the pause budget.
            let bounded_kind = !matches!(
                plan.steps[idx],
                Step::Resume
                    | Step::Thaw
                    | Step::AwaitMemory { .. }
                    | Step::Halt
                    | Step::SaveMemory { live: false, .. }
            );
            let in_window = matches!(plan.steps[idx], Step::Freeze { .. } | Step::Pause { .. })
                || (bounded_kind && (inside(pause, resume) || inside(freeze, thaw)));
            if in_window {
                injections.push(Inject::HangAfterEffect);
            }
            for how in injections {
                let ctx = format!("{}: {how:?} at {k} ({label})", mode.label);
                let e = env(&mode);
                e.world.arm(k, how);
                let mut j = journal(&e);
                let res = block_on(run(&plan, &e.world.caps(), &mut j, &e.store));
                drop(j);
                if idx <= plan.commit_point {
                    let err = res.expect_err(&ctx);
                    assert_eq!(err.kind(), ErrorKind::CaptureFailed, "{ctx}");
                    assert!(err.undo_failures().is_empty(), "{ctx}: {err}");
                    assert!(err.to_string().contains(&label), "{ctx}: {err}");
                    assert_nothing_left(&e, &mode, &ctx);
                } else {
                    // After the commit point: the snapshot stands, the failure is a warning.
                    let out = res.unwrap_or_else(|err| panic!("{ctx}: {err}"));
                    assert!(!out.warnings.is_empty(), "{ctx}");
                    assert_completed(&e, &mode, &plan, &ctx);
                }
            }
        }
    }
}

#[test]
fn a_hung_freeze_fails_within_its_budget_and_thaws() {
    let mut mode = modes().remove(1);
    mode.req.freeze_budget_ms = 300;
    let e = env(&mode);
    let plan = plan_of(&mode, &e.world);
    let k = effect_steps(&plan)
        .into_iter()
        .find(|(_, l)| l == "freeze")
        .unwrap()
        .0;
    e.world.arm(k, Inject::HangAfterEffect);
    let mut j = journal(&e);
    let err = block_on(run(&plan, &e.world.caps(), &mut j, &e.store)).unwrap_err();
    drop(j);
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("300 ms"), "{cause}");
    assert!(e.world.st().now_ms <= 300, "bounded by the budget");
    assert_nothing_left(&e, &mode, "hung freeze");
}

#[test]
fn the_freeze_is_given_its_budget() {
    // Every quiesced mode: the one freeze call receives the request's budget (the facade's
    // watchdog thaws the guest at its end if virt-snap dies meanwhile).
    let quiesced: Vec<Mode> = modes()
        .into_iter()
        .filter(|m| m.req.flags.quiesce)
        .collect();
    assert!(!quiesced.is_empty());
    for mut mode in quiesced {
        mode.req.freeze_budget_ms = 1_234;
        let e = env(&mode);
        let plan = plan_of(&mode, &e.world);
        let mut j = journal(&e);
        block_on(run(&plan, &e.world.caps(), &mut j, &e.store))
            .unwrap_or_else(|err| panic!("{}: {err}", mode.label));
        drop(j);
        assert_eq!(
            e.world.st().freeze_budgets,
            [Duration::from_millis(1_234)],
            "{}",
            mode.label
        );
        assert_completed(&e, &mode, &plan, mode.label);
    }
}

#[test]
fn the_pause_is_bounded_by_its_budget() {
    let mut mode = modes().remove(6); // storage + external (not quiesced)
    mode.req.pause_budget_ms = 50;
    let e = env(&mode);
    let plan = plan_of(&mode, &e.world);
    let k = effect_steps(&plan)
        .into_iter()
        .find(|(_, l)| l.starts_with("backend-snapshot"))
        .unwrap()
        .0;
    e.world.arm(k, Inject::HangAfterEffect);
    let mut j = journal(&e);
    let err = block_on(run(&plan, &e.world.caps(), &mut j, &e.store)).unwrap_err();
    drop(j);
    assert!(err.to_string().contains("50 ms"), "{err}");
    assert_eq!(e.world.st().now_ms, 50);
    assert_nothing_left(&e, &mode, "hung backend snapshot");
}

/// Runs `plan` with a kill injected at effect call `k`, then recovers with a new journal.
fn kill_and_recover(mode: &Mode, plan: &CapturePlan, k: usize, how: Inject, ctx: &str) {
    let e = env(mode);
    e.world.arm(k, how);
    let mut j = journal(&e);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        block_on(run(plan, &e.world.caps(), &mut j, &e.store))
    }));
    let payload = r.err().unwrap_or_else(|| panic!("{ctx}: not killed"));
    assert!(payload.is::<Killed>(), "{ctx}: a real panic");
    drop(j);
    e.world.disarm();
    let mut j = journal(&e);
    let rec = block_on(recover(&e.world.caps(), &mut j, &e.store)).unwrap();
    drop(j);
    assert_eq!(rec.len(), 1, "{ctx}");
    match &rec[0] {
        Recovered::RolledBack { undo_failures, .. } => {
            assert!(undo_failures.is_empty(), "{ctx}: {undo_failures:?}");
            assert_nothing_left(&e, mode, ctx);
        }
        Recovered::Completed { .. } => assert_completed(&e, mode, plan, ctx),
    }
}

#[test]
fn a_kill_at_every_step_is_recovered() {
    for mode in modes() {
        let probe = env(&mode);
        let plan = plan_of(&mode, &probe.world);
        for (k, label) in effect_steps(&plan) {
            for how in [Inject::KillBefore, Inject::KillAfter] {
                let ctx = format!("{}: {how:?} at {k} ({label})", mode.label);
                kill_and_recover(&mode, &plan, k, how, &ctx);
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

// ---- planning ----

fn plan_err(r: &CaptureRequest, d: &DomainInfo) -> String {
    let e = CapturePlan::new(r, d, &World::default()).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::InvalidPlan | ErrorKind::Unsupported),
        "{e}"
    );
    e.to_string()
}

fn labels(p: &CapturePlan) -> Vec<String> {
    p.steps.iter().map(Step::label).collect()
}

#[test]
fn virsh_defaults() {
    let w = World::default();
    // A running VM with only qcow2 disks: internal with RAM; the cdrom is left alone.
    let p = CapturePlan::new(&req("s"), &domain(vec![qcow2("vda"), cdrom()]), &w).unwrap();
    assert_eq!(labels(&p), ["internal-snapshot", "commit-metadata"]);
    assert_eq!(p.memory, Location::Internal);
    assert_eq!(
        p.disks,
        [
            ("vda".to_string(), Location::Internal),
            ("sda".to_string(), Location::No)
        ]
    );
    // --disk-only: every writable disk external, overlays named as libvirt does.
    let mut r = req("s");
    r.flags.disk_only = true;
    let p = CapturePlan::new(&r, &domain(vec![qcow2("vda"), qcow2("vdb"), cdrom()]), &w).unwrap();
    assert_eq!(
        labels(&p),
        [
            "pre-create-overlay vda",
            "add-overlay-node vda",
            "pre-create-overlay vdb",
            "add-overlay-node vdb",
            "transaction",
            "commit-metadata"
        ]
    );
    assert_eq!(p.commit_point, 4);
    match &p.steps[0] {
        Step::PreCreateOverlay {
            path,
            backing,
            backing_format,
            format,
            reuse,
            ..
        } => {
            assert_eq!(path, "/img/vda.s");
            assert_eq!(backing, "/img/vda.qcow2");
            assert_eq!(
                (backing_format.as_str(), format.as_str()),
                ("qcow2", "qcow2")
            );
            assert!(!reuse);
        }
        s => panic!("{s:?}"),
    }
    let Step::CommitMetadata { snapshot } = p.steps.last().unwrap() else {
        panic!()
    };
    assert_eq!(snapshot.state, Some(crate::SnapshotState::DiskSnapshot));
    assert_eq!(snapshot.creation_time, Some(1_700_000_000));
    assert_eq!(
        snapshot.disks[0].source.as_ref().unwrap().file.as_deref(),
        Some("/img/vda.s")
    );
    assert_eq!(default_overlay_path("/a.b/img", "s"), "/a.b/img.s");
    assert_eq!(default_overlay_path("/a/.hidden", "s"), "/a/.hidden.s");
    assert!(overlay_node_name("a-very-long-disk-name", "s").len() <= 31);
}

#[test]
fn impossible_requests_are_refused() {
    let d2 = || domain(vec![qcow2("vda"), pool_disk("vdb", BackendKind::Btrfs)]);
    let mut r = req("s");
    r.disks = vec![spec("vdb", DiskChoice::Internal)];
    assert!(plan_err(&r, &d2()).contains("qcow2"));
    let mut r = req("s");
    r.disks = vec![spec("vda", DiskChoice::Storage)];
    assert!(plan_err(&r, &d2()).contains("storage"));
    let mut r = req("s");
    r.flags.disk_only = true;
    r.memory = MemoryChoice::External { file: "/m".into() };
    assert!(plan_err(&r, &d2()).contains("disk-only"));
    let mut r = req("s");
    r.flags.disk_only = true;
    r.flags.quiesce = true;
    let mut d = d2();
    d.has_agent = false;
    assert!(plan_err(&r, &d).contains("agent"));
    let mut r = req("s");
    r.disks = vec![spec("vda", ext()), spec("/img/vda.qcow2", DiskChoice::No)];
    assert!(plan_err(&r, &d2()).contains("more than once"));
    let mut r = req("s");
    r.disks = vec![spec("vdz", ext())];
    assert!(plan_err(&r, &d2()).contains("no such disk"));
    let mut r = req("s");
    r.memory = MemoryChoice::External { file: "/m".into() };
    r.disks = vec![
        spec("vda", DiskChoice::Internal),
        spec("vdb", DiskChoice::No),
    ];
    assert!(plan_err(&r, &d2()).contains("external memory"));
    let mut r = req("s");
    r.disks = vec![
        spec("vda", DiskChoice::Internal),
        spec("vdb", DiskChoice::Storage),
    ];
    assert!(plan_err(&r, &d2()).contains("mixed"));
    let mut r = req("s");
    r.memory = MemoryChoice::External { file: "/m".into() };
    r.flags.quiesce = true;
    assert!(plan_err(&r, &d2()).contains("never frozen"));
    let mut r = req("s");
    r.flags.live = true;
    r.flags.disk_only = true;
    assert!(plan_err(&r, &d2()).contains("--live"));
    let mut r = req("s");
    r.disks = vec![spec("sda", ext())];
    assert!(plan_err(&r, &domain(vec![qcow2("vda"), cdrom()])).contains("read-only"));
    let mut r = req("s");
    r.flags.reuse_external = true;
    assert!(plan_err(&r, &domain(vec![qcow2("vda")])).contains("reuse"));
    let mut r = req("s");
    r.disks = vec![spec("vda", DiskChoice::Manual)];
    r.memory = MemoryChoice::Internal;
    assert!(plan_err(&r, &d2()).contains("manual"));
    let mut r = req("s");
    r.flags.disk_only = true;
    r.flags.quiesce = true;
    r.disks = vec![spec("vda", DiskChoice::Manual)];
    assert!(plan_err(&r, &d2()).contains("manual"));
    // Relative names: virt-snap, QEMU and the next start would each resolve them elsewhere.
    for reuse in [false, true] {
        let mut r = req("s");
        r.flags.disk_only = true;
        r.flags.reuse_external = reuse;
        r.disks = vec![spec(
            "vda",
            DiskChoice::External {
                file: Some("vda.s".into()),
                format: None,
            },
        )];
        assert!(plan_err(&r, &d2()).contains("\"vda.s\" must be an absolute path"));
    }
    let mut r = req("s");
    r.memory = MemoryChoice::External { file: "m".into() };
    r.disks = vec![spec("vdb", DiskChoice::No)];
    assert!(plan_err(&r, &d2()).contains("\"m\" must be an absolute path"));
    let mut d = d2();
    d.state = RunState::ShutOff;
    let mut r = req("s");
    r.memory = MemoryChoice::Internal;
    assert!(plan_err(&r, &d).contains("not running"));
}

#[test]
fn request_from_domainsnapshot_xml() {
    let def = crate::DomainSnapshot::from_xml(
        "<domainsnapshot><name>s</name><memory snapshot='external' file='/m'/>\
         <disks><disk name='vda' snapshot='external'><source file='/o'/></disk>\
         <disk name='vdb' snapshot='storage'/></disks></domainsnapshot>",
    )
    .unwrap();
    let r = CaptureRequest::from_xml(&def, Flags::default()).unwrap();
    assert_eq!(r.memory, MemoryChoice::External { file: "/m".into() });
    assert_eq!(
        r.disks,
        vec![
            spec(
                "vda",
                DiskChoice::External {
                    file: Some("/o".into()),
                    format: None
                }
            ),
            spec("vdb", DiskChoice::Storage)
        ]
    );
}

// ---- random plans and failure points ----

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn choice() -> impl Strategy<Value = u8> {
        0u8..4
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_plans_and_failures_keep_the_guarantees(
            kinds in proptest::collection::vec(choice(), 1..5),
            memory in 0u8..3,
            quiesce: bool,
            fail_at in 0usize..16,
            how in 0u8..3,
        ) {
            let disks: Vec<DomainDisk> = kinds.iter().enumerate().map(|(i, k)| {
                let t = format!("vd{}", (b'a' + i as u8) as char);
                match k {
                    0 | 1 => qcow2(&t),
                    2 => pool_disk(&t, BackendKind::Btrfs),
                    _ => DomainDisk { readonly: true, ..qcow2(&t) },
                }
            }).collect();
            let mut r = req("p");
            r.disks = kinds.iter().enumerate().filter(|(_, k)| **k == 2)
                .map(|(i, _)| spec(&format!("vd{}", (b'a' + i as u8) as char), DiskChoice::Storage))
                .collect();
            match memory {
                0 => r.flags.disk_only = true,
                1 => r.memory = MemoryChoice::External { file: "/m".into() },
                _ => { r.memory = MemoryChoice::External { file: "/m".into() }; r.flags.live = true; }
            }
            r.flags.quiesce = quiesce;
            let mode = Mode { label: "prop", req: r, dom: domain(disks), user_files: vec![] };
            let w = World::default();
            let Ok(plan) = CapturePlan::new(&mode.req, &mode.dom, &w) else { return Ok(()) };
            let steps = effect_steps(&plan);
            let (k, label) = steps[fail_at % steps.len()].clone();
            let ctx = format!("{kinds:?} {memory} {quiesce} {how} at {k} {label}");
            if how == 0 {
                let e = env(&mode);
                e.world.arm(k, Inject::Fail);
                let mut j = journal(&e);
                let res = block_on(run(&plan, &e.world.caps(), &mut j, &e.store));
                drop(j);
                let idx = plan.steps.iter().position(|s| s.label() == label).unwrap();
                if idx <= plan.commit_point {
                    prop_assert!(res.is_err());
                    assert_nothing_left(&e, &mode, &ctx);
                } else {
                    prop_assert!(res.is_ok());
                    assert_completed(&e, &mode, &plan, &ctx);
                }
            } else {
                let how = if how == 1 { Inject::KillBefore } else { Inject::KillAfter };
                kill_and_recover(&mode, &plan, k, how, &ctx);
            }
        }
    }
}

// ---- a 500-deep chain ----

#[test]
fn the_500th_external_snapshot_plans_and_commits_in_constant_work() {
    let mode = Mode {
        label: "chain",
        req: req("x"),
        dom: domain(vec![qcow2("vda")]),
        user_files: vec![],
    };
    let e = env(&mode);
    let mut dom = mode.dom.clone();
    let mut per_snapshot = Vec::new();
    let mut j = journal(&e);
    for i in 1..=500 {
        let mut r = req(&format!("s{i}"));
        r.flags.disk_only = true;
        let before = e.world.st().faults.calls;
        let plan = CapturePlan::new(&r, &dom, &e.world).unwrap();
        let out = block_on(run(&plan, &e.world.caps(), &mut j, &e.store)).unwrap();
        per_snapshot.push((e.world.st().faults.calls - before, plan.steps.len()));
        let snap = out.snapshot.unwrap();
        // The new overlay is the disk's top now; the new snapshot is current.
        let d = &mut dom.disks[0];
        d.source = snap.disks[0].source.as_ref().unwrap().file.clone();
        d.node = overlay_node_name("vda", &format!("s{i}"));
        dom.current = snap.name.clone();
        if i % 100 == 0 {
            j.compact().unwrap();
        }
    }
    assert!(
        per_snapshot.iter().all(|c| *c == per_snapshot[0]),
        "{per_snapshot:?}"
    );
    // Overlay names stay short: the snapshot name replaces the previous one's suffix.
    assert_eq!(dom.disks[0].source.as_deref(), Some("/img/vda.s500"));
    let loaded = e.store.load().unwrap();
    assert_eq!(loaded.tree.len(), 500);
    assert_eq!(loaded.tree.ancestors("s500").unwrap().len(), 499);
    assert_eq!(e.store.current().unwrap().unwrap().as_str(), "s500");
}

#[test]
fn manual_disks_leave_the_domain_paused_and_held() {
    let mode = modes()
        .into_iter()
        .find(|m| m.label == "manual + external")
        .unwrap();
    let mut mode = mode;
    mode.req.manual_hold_ms = 42_000;
    let e = env(&mode);
    let plan = plan_of(&mode, &e.world);
    assert_eq!(
        labels(&plan),
        [
            "pre-create-overlay vda",
            "add-overlay-node vda",
            "pause",
            "transaction",
            "commit-metadata",
            "hold-paused"
        ]
    );
    let mut j = journal(&e);
    let out = block_on(run(&plan, &e.world.caps(), &mut j, &e.store)).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let s = e.world.st();
    assert!(!s.running, "paused for the manual snapshot");
    assert_eq!(
        s.held,
        Some((
            "s1".into(),
            vec!["vdb".into()],
            Duration::from_millis(42_000)
        ))
    );
    drop(s);
    let snap = e.store.read(&plan.name).unwrap();
    let vdb = snap.disks.iter().find(|d| d.name == "vdb").unwrap();
    assert_eq!(vdb.snapshot, Some(Location::Manual));

    // Only manual disks: the pause is the commit point; a stopped domain is not held.
    let only = modes()
        .into_iter()
        .find(|m| m.label == "manual only")
        .unwrap();
    let p = plan_of(&only, &World::running());
    assert_eq!(labels(&p), ["pause", "commit-metadata", "hold-paused"]);
    assert_eq!(p.commit_point, 0);
    let off = modes()
        .into_iter()
        .find(|m| m.label == "shut off manual only")
        .unwrap();
    let p = plan_of(&off, &World::default());
    assert_eq!(labels(&p), ["commit-metadata"]);
    // --halt: no hold, the domain is stopped.
    let mut halt = only;
    halt.req.flags.halt = true;
    let p = plan_of(&halt, &World::running());
    assert_eq!(labels(&p), ["pause", "resume", "commit-metadata", "halt"]);
}

#[test]
fn a_refused_background_snapshot_fails_clearly_or_falls_back_when_asked() {
    let live = || {
        modes()
            .into_iter()
            .find(|m| m.label == "external RAM live")
            .unwrap()
    };
    // Refused, no fallback: the capture fails, nothing is left, the guest runs.
    let mode = live();
    let e = env(&mode);
    e.world.st().refuse_background = true;
    let plan = plan_of(&mode, &e.world);
    let mut j = journal(&e);
    let err = block_on(run(&plan, &e.world.caps(), &mut j, &e.store)).unwrap_err();
    drop(j);
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("background-snapshot"), "{cause}");
    assert_nothing_left(&e, &mode, "refused, no fallback");

    // Refused with --fallback-paused: saved with the guest paused (for as long as the save
    // takes, past the pause budget), then the disks, then resumed.
    let mut mode = live();
    mode.req.flags.fallback_paused = true;
    mode.req.pause_budget_ms = 50;
    let e = env(&mode);
    {
        let mut s = e.world.st();
        s.refuse_background = true;
        s.paused_save_ms = 5_000;
    }
    let plan = plan_of(&mode, &e.world);
    assert!(plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::SaveMemory { fallback: true, .. })));
    let mut j = journal(&e);
    let out = block_on(run(&plan, &e.world.caps(), &mut j, &e.store)).unwrap();
    drop(j);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert_completed(&e, &mode, &plan, "fallback");
    assert!(e.world.st().now_ms >= 5_000);

    // --fallback-paused is the fallback of --live only.
    let mut r = req("s");
    r.flags.fallback_paused = true;
    r.memory = MemoryChoice::External { file: "/m".into() };
    assert!(plan_err(&r, &domain(vec![qcow2("vda")])).contains("--fallback-paused"));
}

#[test]
fn a_snapshot_keeps_the_running_configuration_with_the_stored_disks() {
    let def = |mem: u32, src: &str| {
        format!(
            "<domain type='kvm'><name>vm</name><uuid>0b0e6b0a-6f7e-4a5e-9d6c-2d1f3b7b9a01</uuid>\
             <memory unit='KiB'>{mem}</memory><os><type arch='x86_64'>hvm</type></os>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{src}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
    };
    let mut d = domain(vec![]);
    // Stored: redefined with more memory while it runs; its disk moved to an overlay.
    d.domain_xml = Some(RawXml::element(&def(262144, "/img/vda.s1")).unwrap());
    assert_eq!(
        d.snapshot_copy(),
        d.domain_xml,
        "not running: the stored one"
    );
    d.running_xml = Some(RawXml::element(&def(131072, "/img/vda.qcow2")).unwrap());
    let copy = crate::DomainDef::from_xml(d.snapshot_copy().unwrap().as_str()).unwrap();
    assert_eq!(copy.memory_bytes(), Some(128 << 20));
    assert_eq!(
        copy.disks()[0].source_ref(),
        Some(crate::domain::SourceRef::File("/img/vda.s1"))
    );
}
