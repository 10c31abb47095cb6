//! Random histories of create / revert / delete on a real no-OS KVM domain (QEMU 10.0.2), with
//! the real `virt-snap` binary (issue 14, "Tests and figures"). A model keeps, for each
//! snapshot, its parent, its kind and the data its disks held when it was taken, the current
//! snapshot, the run state and the current data; after every step the test checks that the
//! metadata (`snapshot-list`), the definition (`dumpxml`), QEMU's graph (`query-block`,
//! `domblklist`) and the files (`qemu-img info --backing-chain`, `qemu-img check`) agree with
//! it, and that the current data and every snapshot's data read back (qemu-io, `qemu-img
//! convert -l` for internal snapshots). Data are written with qemu-io into each disk's current
//! top while the domain is shut off. At the end of each case every snapshot is deleted and each
//! disk must be back on its own file, holding the current data.
//!
//! Deterministic (a fixed seed; `VS_HISTORY_SEED`, `VS_HISTORY_CASES`, `VS_HISTORY_OPS`
//! change it); no shrinking: a failure prints the whole history of the case (the commands run,
//! in order) for reproduction. Files no metadata and no definition needs, and a disk not back
//! on its own file at the end, are findings: printed on stderr, and they fail the test
//! (`VS_HISTORY_STRICT=0` only prints them, to survey a longer run).

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use virt_snap_e2e::in_state::vs;
use virt_snap_e2e::{qemu_img, stderr, stdout, NoOsDomain};

const TARGETS: [&str; 2] = ["vda", "vdb"];

/// One operation as generated; interpreted against the model (a pick is an index into the
/// snapshots there are).
#[derive(Clone, Debug)]
enum Op {
    /// Start a shut-off domain, destroy a running one.
    Power,
    /// A new pattern into one disk (destroying the domain first if it runs).
    Write {
        disk: usize,
    },
    /// `snapshot-create-as DOM sN --disk-only`.
    External,
    /// `snapshot-create-as DOM sN`: internal (with RAM if running); only while every disk is
    /// on its own file.
    Internal,
    Revert {
        pick: usize,
        running: bool,
    },
    Delete {
        pick: usize,
        children: bool,
        metadata: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Power),
        3 => (0..TARGETS.len()).prop_map(|disk| Op::Write { disk }),
        3 => Just(Op::External),
        2 => Just(Op::Internal),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, running)| Op::Revert { pick, running }),
        3 => (any::<usize>(), prop::bool::weighted(0.3), prop::bool::weighted(0.06))
            .prop_map(|(pick, children, metadata)| Op::Delete { pick, children, metadata }),
    ]
}

#[derive(Clone, Debug)]
struct Snap {
    name: String,
    parent: Option<String>,
    internal: bool,
    /// Taken running (internal: with RAM).
    ram: bool,
    /// Each disk's pattern when it was taken.
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Model {
    running: bool,
    data: Vec<u8>,
    snaps: Vec<Snap>,
    current: Option<String>,
    /// A `--metadata` delete happened: its files stay, so the disks need not end on their own.
    metadata_used: bool,
}

impl Model {
    fn get(&self, n: &str) -> &Snap {
        self.snaps
            .iter()
            .find(|s| s.name == n)
            .expect("in the model")
    }

    /// Deletes `n` alone, as virsh does: children to its parent, current to its parent.
    fn remove(&mut self, n: &str) {
        let parent = self.get(n).parent.clone();
        for s in &mut self.snaps {
            if s.parent.as_deref() == Some(n) {
                s.parent = parent.clone();
            }
        }
        if self.current.as_deref() == Some(n) {
            self.current = parent;
        }
        self.snaps.retain(|s| s.name != n);
    }

    /// `n` and its descendants, leaves first.
    fn subtree(&self, n: &str) -> Vec<String> {
        let mut out = vec![];
        for c in self.snaps.iter().filter(|s| s.parent.as_deref() == Some(n)) {
            out.extend(self.subtree(&c.name));
        }
        out.push(n.to_string());
        out
    }
}

struct History {
    d: NoOsDomain,
    m: Model,
    next: u32,
    pattern: u8,
    started: Option<Instant>,
    /// The commands run so far (printed when the case fails).
    log: Vec<String>,
    findings: BTreeSet<String>,
    /// The files the metadata and the definition needed at the last check.
    needed: BTreeSet<String>,
}

/// The disks' `<source file>` by target in a `<domain>` document (or the part of one).
fn sources(xml: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for part in xml.split("<disk ").skip(1) {
        let part = &part[..part.find("</disk>").unwrap_or(part.len())];
        let attr = |key: &str| {
            part.find(key).map(|at| {
                let v = &part[at + key.len()..];
                v[..v.find('\'').unwrap()].to_string()
            })
        };
        if let (Some(t), Some(s)) = (attr("<target dev='"), attr("<source file='")) {
            out.insert(t, s);
        }
    }
    out
}

/// `<source minus extension>` as the capture and the revert name overlays.
fn stem(p: &str) -> String {
    let p = Path::new(p);
    p.parent()
        .unwrap()
        .join(p.file_stem().unwrap())
        .display()
        .to_string()
}

fn qemu_io_ok(image: &str, cmd: &str) -> Result<(), String> {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-c", cmd, image])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && !text.contains("failed") && !text.contains("Pattern verification") {
        Ok(())
    } else {
        Err(format!(
            "qemu-io -r -U -c '{cmd}' {image}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The filenames of `top`'s backing chain, top first.
fn chain(top: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--backing-chain",
        "--output",
        "json",
        top,
    ]))
    .expect("qemu-img info JSON");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect()
}

impl History {
    fn new(case: usize) -> History {
        let d = NoOsDomain::define(&format!("hist{case}"), &TARGETS);
        History {
            d,
            m: Model {
                data: vec![0; TARGETS.len()],
                ..Model::default()
            },
            next: 0,
            pattern: 0x10 + (case as u8 % 8) * 0x20,
            started: None,
            log: vec![],
            findings: BTreeSet::new(),
            needed: BTreeSet::new(),
        }
    }

    fn cli(&mut self, args: &[&str]) -> Output {
        let mut a = args.to_vec();
        a.insert(1, &self.d.name);
        self.log.push(format!("virt-snap {}", a.join(" ")));
        vs(self.d.s(), &a)
    }

    fn ok(&mut self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
        stdout(&o)
    }

    /// A query (not logged).
    fn q(&self, args: &[&str]) -> String {
        let mut a = args.to_vec();
        a.insert(1, &self.d.name);
        let o = vs(self.d.s(), &a);
        assert!(o.status.success(), "{a:?} failed: {}", stderr(&o));
        stdout(&o)
    }

    fn original(&self, i: usize) -> String {
        self.d.disk(TARGETS[i]).display().to_string()
    }

    /// Each disk's top as the stored definition names it.
    fn defined_tops(&self) -> Vec<String> {
        let s = sources(&self.q(&["dumpxml"]));
        TARGETS.iter().map(|t| s[*t].clone()).collect()
    }

    fn start(&mut self) {
        self.ok(&["start"]);
        self.m.running = true;
        self.started = Some(Instant::now());
    }

    fn destroy(&mut self) {
        self.ok(&["destroy"]);
        self.m.running = false;
    }

    /// Lets a freshly started guest's firmware settle before a guest reset (docs/revert.md).
    fn settle(&self) {
        if let Some(t) = self.started {
            let left = Duration::from_secs(1).saturating_sub(t.elapsed());
            std::thread::sleep(left);
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Power => {
                if self.m.running {
                    self.destroy()
                } else {
                    self.start()
                }
            }
            Op::Write { disk } => {
                if self.m.running {
                    self.destroy();
                }
                self.pattern = self.pattern.wrapping_add(1).max(1);
                let top = self.defined_tops()[disk].clone();
                self.log.push(format!(
                    "qemu-io -c 'write -P {:#x} 0 64k' {top}",
                    self.pattern
                ));
                let out = Command::new("qemu-io")
                    .args(["-c", &format!("write -P {:#x} 0 64k", self.pattern), &top])
                    .output()
                    .expect("qemu-io");
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success() && !text.contains("failed"),
                    "qemu-io write into {top}: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                self.m.data[disk] = self.pattern;
            }
            Op::External | Op::Internal => {
                let internal = matches!(op, Op::Internal);
                let tops = self.defined_tops();
                if internal && (0..TARGETS.len()).any(|i| tops[i] != self.original(i)) {
                    self.log
                        .push("# internal skipped: a disk is on an overlay".into());
                    return;
                }
                self.next += 1;
                let name = format!("s{}", self.next);
                if internal {
                    self.ok(&["snapshot-create-as", &name]);
                } else {
                    self.ok(&["snapshot-create-as", &name, "--disk-only"]);
                }
                self.m.snaps.push(Snap {
                    name: name.clone(),
                    parent: self.m.current.clone(),
                    internal,
                    ram: internal && self.m.running,
                    data: self.m.data.clone(),
                });
                self.m.current = Some(name.clone());
                let now = self.defined_tops();
                for i in 0..TARGETS.len() {
                    let want = if internal {
                        tops[i].clone()
                    } else {
                        format!("{}.{name}", stem(&tops[i]))
                    };
                    assert_eq!(now[i], want, "{}: the top after the capture", TARGETS[i]);
                }
            }
            Op::Revert { pick, running } => {
                if self.m.snaps.is_empty() {
                    return;
                }
                let s = self.m.snaps[pick % self.m.snaps.len()].clone();
                let tops = self.defined_tops();
                let images = self.images(&s.name);
                // An internal snapshot not in a disk's current image is refused.
                let refused = s.internal && (0..TARGETS.len()).any(|i| tops[i] != images[i]);
                let mut args = vec!["snapshot-revert", s.name.as_str()];
                if running {
                    args.push("--running");
                    if self.m.running {
                        self.settle();
                    }
                }
                if refused {
                    let o = self.cli(&args);
                    assert!(
                        !o.status.success(),
                        "revert of {} predicted refused, succeeded",
                        s.name
                    );
                    self.log.push(format!("# refused: {}", stderr(&o).trim()));
                    assert_eq!(
                        self.defined_tops(),
                        tops,
                        "a refused revert changed the disks"
                    );
                    return;
                }
                let was_running = self.m.running;
                self.ok(&args);
                self.m.running = running || (s.internal && s.ram);
                if self.m.running && !was_running || !s.internal {
                    // A new QEMU, or an in-place reset: settle before the next reset.
                    self.started = Some(Instant::now());
                }
                self.m.data = s.data.clone();
                self.m.current = Some(s.name.clone());
                let now = self.defined_tops();
                for i in 0..TARGETS.len() {
                    if s.internal {
                        assert_eq!(now[i], tops[i], "an internal revert moved {}", TARGETS[i]);
                    } else {
                        let prefix = format!("{}.{}.r", stem(&images[i]), s.name);
                        assert!(
                            now[i].starts_with(&prefix),
                            "{}: {} is not a revert overlay {prefix}N",
                            TARGETS[i],
                            now[i]
                        );
                    }
                }
            }
            Op::Delete {
                pick,
                children,
                metadata,
            } => {
                if self.m.snaps.is_empty() {
                    return;
                }
                let name = self.m.snaps[pick % self.m.snaps.len()].name.clone();
                self.delete(&name, children, metadata);
            }
        }
    }

    fn delete(&mut self, name: &str, children: bool, metadata: bool) {
        let set = if children {
            self.m.subtree(name)
        } else {
            vec![name.to_string()]
        };
        let on_own = {
            let tops = self.defined_tops();
            (0..TARGETS.len()).all(|i| tops[i] == self.original(i))
        };
        let internal_in = set.iter().any(|n| self.m.get(n).internal);
        let mut args = vec!["snapshot-delete", name];
        if children {
            args.push("--children");
        }
        if metadata {
            args.push("--metadata");
        }
        let mut done = false;
        if !metadata && self.m.running && internal_in && !on_own {
            if set.len() == 1 {
                // An internal snapshot in a backing file: deleted in the running QEMU (the
                // backing node, named by virt-snap first where QEMU opened it itself from a
                // header, reopened read-write for the job).
                let o = self.cli(&args);
                assert!(o.status.success(), "delete of {name}: {}", stderr(&o));
                done = true;
            } else {
                // Whether the children's merges bring the disks back onto the image holding
                // the internal snapshot is beyond the model: delete offline.
                self.destroy();
            }
        }
        if !done {
            self.ok(&args);
        }
        for n in &set {
            self.m.remove(n);
        }
        if metadata {
            self.m.metadata_used = true;
        }
    }

    /// The disk sources in snapshot `n`'s `<domain>` copy: the images holding its data.
    fn images(&self, n: &str) -> Vec<String> {
        let xml = self.q(&["snapshot-dumpxml", n]);
        let copy = &xml[xml.find("<domain ").expect("a <domain> copy")..];
        let s = sources(copy);
        TARGETS.iter().map(|t| s[*t].clone()).collect()
    }

    fn check(&mut self, deleted: bool) {
        // (1) The metadata's tree and current snapshot are the model's.
        let list: Value =
            serde_json::from_str(&self.q(&["snapshot-list", "--output", "json"])).unwrap();
        let got: BTreeMap<String, (Option<String>, bool, bool)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    (
                        s["parent"].as_str().map(str::to_string),
                        s["location"] == "internal",
                        s["current"] == true,
                    ),
                )
            })
            .collect();
        let want: BTreeMap<String, (Option<String>, bool, bool)> = self
            .m
            .snaps
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    (
                        s.parent.clone(),
                        s.internal,
                        self.m.current.as_deref() == Some(&s.name),
                    ),
                )
            })
            .collect();
        assert_eq!(got, want, "snapshot-list (parent, internal, current)");
        let tree = self.q(&["snapshot-list", "--tree"]);
        for s in &self.m.snaps {
            let lines = tree
                .lines()
                .filter(|l| l.trim_start_matches([' ', '|', '+', '-']) == s.name)
                .count();
            assert_eq!(lines, 1, "{} once in the tree:\n{tree}", s.name);
        }
        let current = vs(self.d.s(), &["snapshot-current", &self.d.name, "--name"]);
        match &self.m.current {
            Some(c) => assert_eq!(stdout(&current).trim(), c, "snapshot-current"),
            None => assert!(
                !current.status.success(),
                "snapshot-current: {}, the model has none",
                stdout(&current)
            ),
        }

        // (3) Running: QEMU's top == domblklist == the definition; the run state.
        let state = self.q(&["domstate"]);
        assert_eq!(
            state.trim() == "running",
            self.m.running,
            "domstate {state:?}"
        );
        let tops = self.defined_tops();
        if self.m.running {
            let blk: Value =
                serde_json::from_str(&self.q(&["domblklist", "--output", "json"])).unwrap();
            let blk: BTreeMap<String, String> = blk
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["target"].as_str().unwrap().to_string(),
                        d["source"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let qb: Value = serde_json::from_str(
                &self.q(&["qemu-monitor-command", r#"{"execute":"query-block"}"#]),
            )
            .unwrap();
            for (i, t) in TARGETS.iter().enumerate() {
                assert_eq!(blk[*t], tops[i], "{t}: domblklist vs dumpxml");
                let qdev = format!("/vs-{t}/");
                let dev = qb["return"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(&qdev)))
                    .unwrap_or_else(|| panic!("{t} in query-block: {qb}"));
                assert_eq!(dev["inserted"]["file"], tops[i].as_str(), "{t}: QEMU's top");
            }
            // Every image QEMU has open is in a disk's chain (no node left over from a
            // merge or a re-pointing); one that is not is a finding.
            let in_chains: BTreeSet<String> = tops.iter().flat_map(|t| chain(t)).collect();
            for n in &virt_snap_e2e::in_state::block_nodes(self.d.s(), &self.d.name) {
                let f = n["file"].as_str().unwrap_or_default();
                if n["drv"] == "qcow2" && !in_chains.contains(f) {
                    self.findings.insert(format!(
                        "QEMU has {f} open ({}), in no disk's chain, after: {}",
                        n["node-name"],
                        self.log.last().unwrap()
                    ));
                }
            }
        }

        // (2) Every image of each disk's chain exists and checks clean; (4) the current data.
        let mut needed: BTreeSet<String> = BTreeSet::new();
        for (i, t) in TARGETS.iter().enumerate() {
            let c = chain(&tops[i]);
            assert_eq!(
                c.last().unwrap(),
                &self.original(i),
                "{t}: the chain ends on the disk's own file"
            );
            for img in &c {
                assert!(Path::new(img).exists(), "{t}: {img} missing");
                if !self.m.running {
                    qemu_img(&["check", "-q", img]);
                }
            }
            needed.extend(c);
            if !self.m.running {
                let p = self.m.data[i];
                if let Err(e) = qemu_io_ok(&tops[i], &format!("read -P {p:#x} 0 64k")) {
                    panic!("{t}: the current data is not {p:#x}: {e}");
                }
            }
        }

        // (5) Every snapshot reads back its data.
        for s in self.m.snaps.clone() {
            let images = self.images(&s.name);
            for (i, t) in TARGETS.iter().enumerate() {
                let p = s.data[i];
                assert!(
                    Path::new(&images[i]).exists(),
                    "{}: {t}: {} missing",
                    s.name,
                    images[i]
                );
                needed.extend(chain(&images[i]));
                if s.internal {
                    let tags = qemu_img(&["snapshot", "-U", "-l", &images[i]]);
                    assert!(
                        tags.split_whitespace().any(|w| w == s.name),
                        "{}: {t}: no tag in {}: {tags}",
                        s.name,
                        images[i]
                    );
                    let raw = self.d.dir.join("read.raw");
                    qemu_img(&[
                        "convert",
                        "-U",
                        "-f",
                        "qcow2",
                        "-O",
                        "raw",
                        "-l",
                        &format!("snapshot.name={}", s.name),
                        &images[i],
                        raw.to_str().unwrap(),
                    ]);
                    let bytes = std::fs::read(&raw).unwrap();
                    std::fs::remove_file(&raw).unwrap();
                    assert!(
                        bytes[..65536].iter().all(|b| *b == p),
                        "{}: {t}: the internal snapshot in {} does not hold {p:#x}",
                        s.name,
                        images[i]
                    );
                } else {
                    if let Err(e) = qemu_io_ok(&images[i], &format!("read -P {p:#x} 0 64k")) {
                        panic!("{}: {t}: its data is not {p:#x}: {e}", s.name);
                    }
                    // Its overlay, if still there, is needed too (a child may be on it).
                    let xml = self.q(&["snapshot-dumpxml", &s.name]);
                    let disks = &xml[..xml.find("<domain ").unwrap()];
                    for part in disks.split("<source file='").skip(1) {
                        let o = &part[..part.find('\'').unwrap()];
                        if Path::new(o).exists() {
                            needed.insert(o.to_string());
                        }
                    }
                }
            }
        }

        // (6) No file that a delete made unneeded is left: needed before it, needed by
        // neither the metadata nor the definition after it, still there. (A revert keeps the
        // overlays of the state it discards, docs/revert.md; the end of the case checks that
        // deleting every snapshot removes them.)
        if deleted && !self.m.metadata_used {
            // A remaining snapshot's revert overlays (`<image minus extension>.S.rN`) are kept
            // until S goes (docs/revert.md, docs/delete.md).
            let reverts_of_remaining = |p: &str| {
                self.m.snaps.iter().any(|s| {
                    p.rsplit_once(&format!(".{}.r", s.name))
                        .is_some_and(|(_, n)| {
                            !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
                        })
                })
            };
            // ... and so is what they are backed by.
            let mut kept = BTreeSet::new();
            for e in std::fs::read_dir(&self.d.dir).unwrap() {
                let f = e.unwrap().path().display().to_string();
                if reverts_of_remaining(&f) {
                    kept.extend(chain(&f));
                }
            }
            for p in self.needed.difference(&needed) {
                if Path::new(p).exists() && !reverts_of_remaining(p) && !kept.contains(p) {
                    self.findings.insert(format!(
                        "{p} left, needed by nothing after: {}",
                        self.log.last().unwrap()
                    ));
                }
            }
        }
        self.needed = needed;
    }

    /// Deletes every snapshot (roots with --children); each disk back on its own file,
    /// holding the current data.
    fn finish(&mut self) {
        while let Some(root) = self.m.snaps.iter().find(|s| s.parent.is_none()) {
            let root = root.name.clone();
            self.delete(&root, true, false);
            assert!(
                !self.m.snaps.iter().any(|s| s.name == root),
                "{root} still there after its delete"
            );
            self.check(true);
        }
        if self.m.running {
            self.destroy();
        }
        let tops = self.defined_tops();
        for (i, t) in TARGETS.iter().enumerate() {
            if !self.m.metadata_used {
                if tops[i] == self.original(i) {
                    let info = qemu_img(&["info", "-U", &tops[i]]);
                    assert!(!info.contains("backing file"), "{t}: {info}");
                } else {
                    // The issue's requirement; a finding (fatal unless VS_HISTORY_STRICT=0).
                    self.findings.insert(format!(
                        "{t} not back on its own file after every snapshot was deleted: on {} \
                         (chain {:?})",
                        tops[i],
                        chain(&tops[i])
                    ));
                }
            }
            let p = self.m.data[i];
            if let Err(e) = qemu_io_ok(&tops[i], &format!("read -P {p:#x} 0 64k")) {
                panic!("{t}: the current data is not {p:#x} at the end: {e}");
            }
        }
        let left: Vec<String> = std::fs::read_dir(&self.d.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.is_dir() && p.extension().is_none_or(|x| x != "xml"))
            .filter(|p| !TARGETS.iter().any(|t| *p == self.d.disk(t)))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        if !left.is_empty() && !self.m.metadata_used {
            self.findings
                .insert(format!("after every snapshot was deleted, left: {left:?}"));
        }
    }
}

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_histories_keep_files_graph_and_metadata_in_agreement() {
    let cases = env("VS_HISTORY_CASES", 10) as u32;
    let ops = env("VS_HISTORY_OPS", 12) as usize;
    // Strict unless asked not to (`VS_HISTORY_STRICT=0`, to survey a longer run's findings).
    let strict = std::env::var_os("VS_HISTORY_STRICT").is_none_or(|v| v != "0");
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 0,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(env("VS_HISTORY_SEED", 14)),
        ..Config::default()
    });
    let case = std::cell::Cell::new(0usize);
    let findings = std::cell::RefCell::new(Vec::<String>::new());
    let started = Instant::now();
    let result = runner.run(&prop::collection::vec(op(), ops..=ops), |ops| {
        case.set(case.get() + 1);
        let mut h = History::new(case.get());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.check(false);
            for o in &ops {
                h.log.push(format!("# {o:?}"));
                h.apply(o);
                h.check(matches!(o, Op::Delete { .. }));
            }
            h.log.push("# finish: every snapshot deleted".into());
            h.finish();
        }));
        if let Err(e) = r {
            eprintln!(
                "history of case {} (dir {}), the failing step last:\n  {}",
                case.get(),
                h.d.dir.display(),
                h.log.join("\n  ")
            );
            std::panic::resume_unwind(e);
        }
        if !h.findings.is_empty() {
            let list: Vec<&str> = h.findings.iter().map(String::as_str).collect();
            findings.borrow_mut().push(format!(
                "case {}:\n  - {}\n  history:\n    {}",
                case.get(),
                list.join("\n  - "),
                h.log.join("\n    ")
            ));
        }
        Ok(())
    });
    let findings = findings.into_inner();
    for f in &findings {
        eprintln!("finding: {f}");
    }
    eprintln!(
        "{} cases of {ops} operations in {:.1} s; {} findings",
        case.get(),
        started.elapsed().as_secs_f64(),
        findings.len()
    );
    result.unwrap();
    assert!(
        !strict || findings.is_empty(),
        "findings (VS_HISTORY_STRICT=0 lists them without failing): {findings:#?}"
    );
}
