//! `snapshot-create-as --disk-only` with `--halt`, `--reuse-external` and `--no-metadata` on
//! the real binary against a running no-OS KVM domain (QEMU 10.0.2): domstate, domblklist,
//! snapshot-list and snapshot-current as the user sees them, QEMU's query-block and
//! query-named-block-nodes, and qemu-img / qemu-io on the files as the oracles. A failure is
//! injected late in a `--reuse-external` capture (QEMU refuses the transaction, after the
//! overlays were added as nodes): the user's files stay.

use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use testbed::qemu_io;
use virt_snap_e2e::in_state::{fails, ok, ok_json};
use virt_snap_e2e::{qemu_img, run, stderr, stdout, virt_snap, NoOsDomain};

/// A running domain with qcow2 disks `vda` and `vdb` (see [`NoOsDomain`]).
struct Dom {
    d: NoOsDomain,
    name: &'static str,
}

impl Dom {
    fn start(name: &'static str) -> Dom {
        Dom {
            d: NoOsDomain::start(name, &["vda", "vdb"]),
            name,
        }
    }

    fn s(&self) -> &Path {
        self.d.s()
    }

    fn dir(&self) -> PathBuf {
        self.d.dir.clone()
    }

    fn disk(&self, t: &str) -> PathBuf {
        self.d.disk(t)
    }

    fn blklist(&self) -> Vec<(String, String)> {
        self.d.blklist()
    }

    fn sources(&self, files: [&Path; 2]) -> Vec<(String, String)> {
        ["vda", "vdb"]
            .into_iter()
            .zip(files)
            .map(|(t, f)| (t.to_string(), f.display().to_string()))
            .collect()
    }

    fn qmp(&self, cmd: &str, args: Value) -> Value {
        let mut c = serde_json::json!({ "execute": cmd });
        if !args.is_null() {
            c["arguments"] = args;
        }
        let out = ok(
            self.s(),
            &["qemu-monitor-command", self.name, &c.to_string()],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        v["return"].clone()
    }

    /// QEMU's top image file of each disk and its backing file (query-block).
    fn tops(&self) -> Vec<(String, Option<String>)> {
        // QEMU names an image whose backing node is not the one its header records
        // `json:{..., "file": {"filename": F}}`.
        let file = |v: &Value| {
            let f = v.as_str()?;
            match f.strip_prefix("json:") {
                Some(j) => serde_json::from_str::<Value>(j).ok()?["file"]["filename"]
                    .as_str()
                    .map(String::from),
                None => Some(f.to_string()),
            }
        };
        let blocks = self.qmp("query-block", Value::Null);
        ["vda", "vdb"]
            .iter()
            .map(|t| {
                let b = blocks
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| {
                        b["qdev"]
                            .as_str()
                            .unwrap_or("")
                            .contains(&format!("vs-{t}"))
                    })
                    .unwrap_or_else(|| panic!("{t} in {blocks}"));
                let img = &b["inserted"]["image"];
                (
                    file(&img["filename"]).unwrap(),
                    file(&img["backing-image"]["filename"]),
                )
            })
            .collect()
    }

    fn node_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .qmp("query-named-block-nodes", serde_json::json!({"flat": true}))
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str().map(String::from))
            .collect();
        v.sort();
        v
    }

    fn domstate(&self) -> String {
        ok(self.s(), &["domstate", self.name])
    }

    fn snapshot_names(&self) -> String {
        ok(self.s(), &["snapshot-list", self.name, "--name"])
    }
}

/// The user's own overlay `p` of `backing`, made with qemu-img, with 64 KiB of `marker`
/// written at 1 MiB.
fn user_overlay(p: &Path, backing: &Path, marker: u8) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing.to_str().unwrap(),
        "-F",
        "qcow2",
        p.to_str().unwrap(),
    ]);
    qemu_io(p, &format!("write -P 0x{marker:02x} 1M 64k"), false);
}

fn stamp(p: &Path) -> (u64, std::time::SystemTime, u64) {
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.modified().unwrap(), m.len())
}

fn diskspec(t: &str, f: &Path) -> String {
    format!("{t},snapshot=external,file={}", f.display())
}

#[test]
fn halt_shuts_the_domain_off_records_the_snapshot_and_the_next_start_uses_the_overlays() {
    let dom = Dom::start("halt1");
    let s = dom.s();
    assert_eq!(
        ok(
            s,
            &["snapshot-create-as", "halt1", "h1", "--disk-only", "--halt"]
        ),
        "Domain snapshot h1 created\n"
    );
    assert_eq!(dom.domstate(), "shut off\n\n", "shut off once it returns");
    assert_eq!(
        ok(s, &["domstate", "halt1", "--reason"]),
        "shut off (from snapshot)\n\n",
        "virsh's reason"
    );
    let l = ok(s, &["list", "--all"]);
    let row: Vec<&str> = l
        .lines()
        .find(|r| r.contains("halt1"))
        .unwrap_or_else(|| panic!("{l}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, ["-", "halt1", "shut", "off"], "{l}");

    // Recorded and current, as a disk snapshot naming the overlays.
    assert_eq!(dom.snapshot_names(), "h1\n");
    assert_eq!(ok(s, &["snapshot-current", "halt1", "--name"]), "h1\n");
    let info = ok_json(s, &["snapshot-info", "halt1", "h1"]);
    assert_eq!(info["state"], "disk-snapshot", "{info}");
    let xml = ok(s, &["snapshot-dumpxml", "halt1", "h1"]);
    let ovl = |t: &str| dom.dir().join(format!("{t}.h1"));
    for t in ["vda", "vdb"] {
        assert!(
            xml.contains(&format!("<source file='{}'/>", ovl(t).display())),
            "{xml}"
        );
        let info: Value = serde_json::from_str(&qemu_img(&[
            "info",
            "--output=json",
            ovl(t).to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(info["backing-filename"], dom.disk(t).display().to_string());
    }

    // The next start opens the overlays on top of the old images.
    ok(s, &["start", "halt1"]);
    assert_eq!(dom.domstate(), "running\n\n");
    assert_eq!(dom.blklist(), dom.sources([&ovl("vda"), &ovl("vdb")]));
    assert_eq!(
        dom.tops(),
        ["vda", "vdb"]
            .map(|t| (
                ovl(t).display().to_string(),
                Some(dom.disk(t).display().to_string())
            ))
            .to_vec()
    );
}

#[test]
fn reuse_external_uses_the_users_files_and_never_deletes_them() {
    let dom = Dom::start("reuse1");
    let s = dom.s();
    let mine = |t: &str| dom.dir().join(format!("mine-{t}.qcow2"));
    for (t, m) in [("vda", 0x61), ("vdb", 0x62)] {
        user_overlay(&mine(t), &dom.disk(t), m);
    }
    let before = ["vda", "vdb"].map(|t| stamp(&mine(t)));
    let nodes = dom.node_names();
    let blk = dom.blklist();
    let (a, b) = (diskspec("vda", &mine("vda")), diskspec("vdb", &mine("vdb")));
    let args = [
        "--state-dir",
        s.to_str().unwrap(),
        "snapshot-create-as",
        "reuse1",
        "r1",
        "--disk-only",
        "--reuse-external",
        "--diskspec",
        &a,
        "--diskspec",
        &b,
    ];

    // QEMU refuses the transaction (its last action names a node it does not have), after
    // both files were checked and added as nodes.
    let o = run(virt_snap()
        .env("VIRT_SNAP_FAILPOINT", "capture:transaction-bad-node")
        .args(args));
    assert!(!o.status.success(), "{}", stdout(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    assert!(e.contains("r1") && e.contains("transaction"), "{e}");
    assert_eq!(dom.domstate(), "running\n\n");
    assert_eq!(dom.node_names(), nodes, "the added nodes are gone");
    assert_eq!(dom.blklist(), blk);
    assert_eq!(dom.snapshot_names(), "");
    for (i, (t, m)) in [("vda", 0x61), ("vdb", 0x62)].into_iter().enumerate() {
        assert_eq!(stamp(&mine(t)), before[i], "{t}: the user's file untouched");
        qemu_io(&mine(t), &format!("read -P 0x{m:02x} 1M 64k"), true);
    }

    // Without the failure: the user's files are QEMU's tops, as they are.
    assert_eq!(
        stdout(&run(virt_snap().args(args))),
        "Domain snapshot r1 created\n"
    );
    assert_eq!(dom.domstate(), "running\n\n");
    assert_eq!(dom.blklist(), dom.sources([&mine("vda"), &mine("vdb")]));
    assert_eq!(
        dom.tops(),
        ["vda", "vdb"]
            .map(|t| (
                mine(t).display().to_string(),
                Some(dom.disk(t).display().to_string())
            ))
            .to_vec()
    );
    for (i, t) in ["vda", "vdb"].into_iter().enumerate() {
        assert_eq!(stamp(&mine(t)).0, before[i].0, "{t}: the same inode");
        assert!(!dom.dir().join(format!("{t}.r1")).exists());
    }
    assert_eq!(dom.snapshot_names(), "r1\n");
    let xml = ok(s, &["snapshot-dumpxml", "reuse1", "r1"]);
    assert!(xml.contains(&mine("vda").display().to_string()), "{xml}");

    // A file that is not an overlay of the disk's current top (the user's file is vda's
    // top now; this one is on vda's old image): refused, nothing changes.
    let wrong = dom.dir().join("wrong.qcow2");
    user_overlay(&wrong, &dom.disk("vda"), 0x63);
    let w = stamp(&wrong);
    let bytes = std::fs::read(&wrong).unwrap();
    let nodes = dom.node_names();
    let e = fails(
        s,
        &[
            "snapshot-create-as",
            "reuse1",
            "r2",
            "--disk-only",
            "--reuse-external",
            "--diskspec",
            &diskspec("vda", &wrong),
            "--diskspec",
            "vdb,snapshot=no",
        ],
    );
    assert!(
        e.contains("--reuse-external")
            && e.contains(wrong.to_str().unwrap())
            && e.contains(mine("vda").to_str().unwrap()),
        "names the file and the disk's top: {e}"
    );
    assert_eq!(e.matches("--reuse-external").count(), 1, "said once: {e}");
    assert_eq!(dom.domstate(), "running\n\n");
    assert_eq!(dom.node_names(), nodes);
    assert_eq!(dom.blklist(), dom.sources([&mine("vda"), &mine("vdb")]));
    assert_eq!((stamp(&wrong), std::fs::read(&wrong).unwrap()), (w, bytes));
    assert_eq!(dom.snapshot_names(), "r1\n");
    assert_eq!(ok(s, &["snapshot-current", "reuse1", "--name"]), "r1\n");
}

#[test]
fn no_metadata_captures_but_lists_nothing_and_sets_no_current() {
    let dom = Dom::start("nometa1");
    let s = dom.s();
    let nm = |name: &str| {
        ok(
            s,
            &[
                "snapshot-create-as",
                "nometa1",
                name,
                "--disk-only",
                "--no-metadata",
            ],
        );
        assert_eq!(dom.domstate(), "running\n\n");
    };
    nm("nm1");
    let at = |f: &str| dom.dir().join(f);
    assert_eq!(
        dom.tops(),
        ["vda", "vdb"]
            .map(|t| (
                at(&format!("{t}.nm1")).display().to_string(),
                Some(dom.disk(t).display().to_string())
            ))
            .to_vec(),
        "captured: the overlays on top in QEMU"
    );
    assert_eq!(dom.blklist(), dom.sources([&at("vda.nm1"), &at("vdb.nm1")]));
    assert_eq!(dom.snapshot_names(), "");
    let e = fails(s, &["snapshot-current", "nometa1", "--name"]);
    assert!(e.contains("no current snapshot"), "{e}");
    let e = fails(s, &["snapshot-info", "nometa1", "nm1"]);
    assert!(e.contains("nm1"), "{e}");

    // With a current snapshot: it stays current, the list does not grow.
    ok(s, &["snapshot-create-as", "nometa1", "s1", "--disk-only"]);
    nm("nm2");
    assert_eq!(dom.blklist(), dom.sources([&at("vda.nm2"), &at("vdb.nm2")]));
    assert_eq!(dom.snapshot_names(), "s1\n");
    assert_eq!(ok(s, &["snapshot-current", "nometa1", "--name"]), "s1\n");
}

#[test]
fn relative_overlay_and_memory_files_are_refused_before_anything_is_made() {
    let dom = Dom::start("rel1");
    let s = dom.s();
    let blk = dom.blklist();
    let nodes = dom.node_names();
    for (extra, file) in [
        (
            &["--disk-only", "--diskspec", "vda,file=rel.qcow2"][..],
            "rel.qcow2",
        ),
        (
            &[
                "--disk-only",
                "--reuse-external",
                "--diskspec",
                "vda,file=rel.qcow2",
            ][..],
            "rel.qcow2",
        ),
        (&["--memspec", "file=rel.mem"][..], "rel.mem"),
    ] {
        // From the domain's directory: a relative name would be made here by virt-snap and
        // looked for elsewhere by QEMU.
        let o = run(virt_snap()
            .current_dir(dom.dir())
            .arg("--state-dir")
            .arg(s)
            .args(["snapshot-create-as", "rel1", "r"])
            .args(extra));
        assert!(!o.status.success(), "{extra:?}: {}", stdout(&o));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.contains(&format!("{file:?} must be an absolute path")),
            "{extra:?}: {e}"
        );
        assert!(!dom.dir().join(file).exists(), "{extra:?}: nothing made");
        assert_eq!(dom.blklist(), blk);
        assert_eq!(dom.node_names(), nodes);
        assert_eq!(dom.domstate(), "running\n\n");
        assert_eq!(dom.snapshot_names(), "");
    }
}
