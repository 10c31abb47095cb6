//! `snapshot-delete` on the real binary against a no-OS KVM domain (QEMU 10.0.2): internal
//! snapshots deleted through QEMU's snapshot-delete job and offline, external ones merged by
//! block-commit (active with pivot for the top, intermediate below it, in a
//! qemu-storage-daemon when the domain is shut off), --children, --children-only,
//! --metadata, a branch on virt-snap's overlay streamed up (block-stream, live and in the
//! daemon), the refusals, the user's files kept, and a delete killed midway recovered by
//! the next command. The images' data, written and read with qemu-io while the domain is shut
//! off, are the oracle, with qemu-img info and snapshot -l; domblklist, dumpxml and
//! snapshot-list as the user sees them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use virt_snap_e2e::in_state::fails;
use virt_snap_e2e::{qemu_img, qemu_io_as_is as qemu_io, run, stderr, virt_snap, NoOsDomain};

/// A defined domain with one qcow2 disk `vda` holding pattern 0xaa, shut off.
struct Dom {
    d: NoOsDomain,
    name: &'static str,
}

/// Pattern `p` at `at` KiB (64 KiB).
fn write(p: &Path, at: u32, pattern: u8) {
    qemu_io(p, &format!("write -P {pattern:#x} {at}k 64k"));
}

fn holds(p: &Path, at: u32, pattern: u8) {
    qemu_io(p, &format!("read -P {pattern:#x} {at}k 64k"));
}

fn info(p: &Path) -> String {
    qemu_img(&["info", "-U", p.to_str().unwrap()])
}

impl Dom {
    fn define(name: &'static str) -> Dom {
        let d = NoOsDomain::define(name, &["vda"]);
        write(&d.disk("vda"), 0, 0xaa);
        Dom { d, name }
    }

    fn s(&self) -> &Path {
        self.d.s()
    }

    fn file(&self, f: &str) -> PathBuf {
        self.d.dir.join(f)
    }

    fn vs(&self, args: &[&str]) -> String {
        self.d.ok(args)
    }

    fn json(&self, args: &[&str]) -> Value {
        self.d.ok_json(args)
    }

    fn delete(&self, args: &[&str]) -> Value {
        let mut a = vec!["snapshot-delete"];
        a.extend(args);
        self.json(&a)
    }

    fn fails(&self, args: &[&str]) -> String {
        let mut a = args.to_vec();
        a.insert(1, self.name);
        fails(self.s(), &a)
    }

    fn source(&self) -> String {
        self.d.blklist().remove(0).1
    }

    fn defined_source(&self) -> String {
        let xml = self.vs(&["dumpxml"]);
        let at = xml.find("<source file='").expect("a file source") + 14;
        xml[at..at + xml[at..].find('\'').unwrap()].to_string()
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .vs(&["snapshot-list", "--name"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// The snapshot's parent ("" for a root).
    fn parent(&self, snap: &str) -> String {
        let o = virt_snap_e2e::in_state::vs(self.s(), &["snapshot-parent", self.name, snap]);
        if !o.status.success() && stderr(&o).contains("has no parent") {
            return String::new();
        }
        assert!(o.status.success(), "{}", stderr(&o));
        virt_snap_e2e::stdout(&o).trim().to_string()
    }

    fn tags(&self, image: &Path) -> String {
        qemu_img(&["snapshot", "-U", "-l", image.to_str().unwrap()])
    }

    /// The image file of every node QEMU has.
    fn node_files(&self) -> Vec<String> {
        virt_snap_e2e::in_state::block_nodes(self.s(), self.name)
            .iter()
            .map(|n| n["file"].as_str().unwrap().to_string())
            .collect()
    }

    /// s1 and s2, external disk-only, taken shut off: vda.qcow2 (0xaa) <- vda.s1 (0xbb) <-
    /// vda.s2 (0xcc), the disk on vda.s2, s2 current.
    fn two_external(name: &'static str) -> Dom {
        let d = Dom::define(name);
        d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
        write(&d.file("vda.s1"), 0, 0xbb);
        write(&d.file("vda.s1"), 64, 0xb1);
        d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
        write(&d.file("vda.s2"), 0, 0xcc);
        assert_eq!(d.defined_source(), d.file("vda.s2").display().to_string());
        d
    }
}

/// The disk holds what was written last: 0xcc at 0, 0xb1 at 64k.
fn current_data(p: &Path) {
    holds(p, 0, 0xcc);
    holds(p, 64, 0xb1);
}

#[test]
fn internal_snapshots_are_deleted_live_and_offline() {
    let d = Dom::define("del-internal");
    let vda = d.file("vda.qcow2");
    d.vs(&["snapshot-create-as", "off1"]);
    d.vs(&["snapshot-create-as", "off2"]);
    d.vs(&["start"]);
    d.vs(&["snapshot-create-as", "ram"]);
    // Running: the snapshot-delete job in QEMU (the image is the disk's active image).
    let r = d.delete(&["ram"]);
    assert_eq!(r["kind"], "internal", "{r}");
    assert_eq!(r["deleted"], serde_json::json!(["ram"]), "{r}");
    assert!(r["elapsed-ms"].as_u64().is_some(), "{r}");
    let tags = d.tags(&vda);
    assert!(!tags.contains("ram") && tags.contains("off2"), "{tags}");
    assert_eq!(d.names(), ["off1", "off2"]);
    // Text output: virsh's line.
    d.vs(&["destroy"]);
    let out = d.vs(&["snapshot-delete", "off1"]);
    assert_eq!(out.trim(), "Domain snapshot off1 deleted");
    let tags = d.tags(&vda);
    assert!(!tags.contains("off1") && tags.contains("off2"), "{tags}");
    // off2 was off1's child: now a root.
    assert_eq!(d.parent("off2"), "");
    let r = d.delete(&["--current"]);
    assert_eq!(r["deleted"], serde_json::json!(["off2"]), "{r}");
    assert!(!d.tags(&vda).contains("off2"));
    assert!(d.names().is_empty());
    holds(&vda, 0, 0xaa);
}

#[test]
fn the_leaf_on_top_is_merged_by_active_commit_then_the_root() {
    let d = Dom::two_external("del-active");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    d.vs(&["start"]);
    // s2, the current layer: active commit of vda.s2 into vda.s1, the disk pivots.
    let r = d.delete(&["s2"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert_eq!(d.source(), s1.display().to_string());
    assert_eq!(d.defined_source(), s1.display().to_string());
    assert!(!s2.exists(), "the merged overlay is removed");
    let nodes = d.node_files();
    assert!(!nodes.iter().any(|f| f.ends_with("/vda.s2")), "{nodes:?}");
    assert_eq!(
        d.vs(&["snapshot-current", "--name"]).trim(),
        "s1",
        "its parent is current"
    );
    // s1, the root, now on top too: the disk is back on its own file.
    d.delete(&["s1"]);
    assert_eq!(d.source(), vda.display().to_string());
    assert_eq!(d.defined_source(), vda.display().to_string());
    assert!(!s1.exists());
    assert!(d.names().is_empty());
    let nodes = d.node_files();
    assert!(
        nodes.iter().all(|f| f.ends_with("/vda.qcow2")),
        "only the disk's own file is open: {nodes:?}"
    );
    d.vs(&["destroy"]);
    let i = info(&vda);
    assert!(!i.contains("backing file"), "{i}");
    current_data(&vda);
    // It starts again on it; a live snapshot (its overlay a node virt-snap added) deleted
    // while running leaves no node of it behind.
    d.vs(&["start"]);
    assert_eq!(d.source(), vda.display().to_string());
    d.vs(&["snapshot-create-as", "live", "--disk-only"]);
    let live = d.file("vda.live");
    assert_eq!(d.source(), live.display().to_string());
    d.delete(&["live"]);
    assert_eq!(d.source(), vda.display().to_string());
    assert!(!live.exists());
    let nodes = d.node_files();
    assert!(nodes.iter().all(|f| f.ends_with("/vda.qcow2")), "{nodes:?}");
    d.vs(&["destroy"]);
    current_data(&vda);
}

#[test]
fn a_root_below_the_top_is_merged_by_intermediate_commit() {
    let d = Dom::two_external("del-middle");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    d.vs(&["start"]);
    let r = d.delete(&["s1"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert!(!s1.exists());
    assert_eq!(d.source(), s2.display().to_string());
    assert_eq!(d.parent("s2"), "");
    // s2's copy of the definition names vda.qcow2 now (its image); QEMU rewrote vda.s2's
    // backing.
    let xml = d.vs(&["snapshot-dumpxml", "s2"]);
    assert!(
        xml.contains(&format!("<source file='{}'", vda.display())),
        "{xml}"
    );
    d.vs(&["destroy"]);
    let i = info(&s2);
    assert!(
        i.contains(&format!("backing file: {}", vda.display())),
        "{i}"
    );
    current_data(&s2);
    // s2's data (what the disk held when it was taken) is vda.qcow2's now.
    holds(&vda, 0, 0xbb);
    holds(&vda, 64, 0xb1);
    // Offline: s2 merged in a qemu-storage-daemon; the disk is on its own file.
    let r = d.delete(&["s2"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert!(!s2.exists());
    assert_eq!(d.defined_source(), vda.display().to_string());
    current_data(&vda);
    assert!(!info(&vda).contains("backing file"));
}

#[test]
fn children_children_only_and_metadata() {
    // --children-only of s1: s2 goes (merged offline), s1 stays and is current.
    let d = Dom::two_external("del-kids");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    let out = d.vs(&["snapshot-delete", "s1", "--children-only"]);
    assert_eq!(out.trim(), "Domain snapshot s1 children deleted");
    assert_eq!(d.names(), ["s1"]);
    assert!(!s2.exists() && s1.exists());
    assert_eq!(d.defined_source(), s1.display().to_string());
    current_data(&s1);
    holds(&vda, 0, 0xaa);

    // --children of s1, running: s2 then s1, leaves first.
    let d = Dom::two_external("del-children");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    d.vs(&["start"]);
    let r = d.delete(&["s1", "--children"]);
    assert_eq!(r["deleted"], serde_json::json!(["s2", "s1"]), "{r}");
    assert!(d.names().is_empty());
    assert!(!s1.exists() && !s2.exists());
    assert_eq!(d.source(), vda.display().to_string());
    d.vs(&["destroy"]);
    current_data(&vda);

    // --metadata: the records only, every file as it was.
    let d = Dom::two_external("del-meta");
    let before: Vec<String> = ["vda.qcow2", "vda.s1", "vda.s2"]
        .iter()
        .map(|f| info(&d.file(f)))
        .collect();
    let r = d.delete(&["s1", "--metadata"]);
    assert_eq!(r["kind"], "metadata", "{r}");
    assert_eq!(d.names(), ["s2"]);
    assert_eq!(d.parent("s2"), "");
    let after: Vec<String> = ["vda.qcow2", "vda.s1", "vda.s2"]
        .iter()
        .map(|f| info(&d.file(f)))
        .collect();
    assert_eq!(before, after);
    current_data(&d.file("vda.s2"));
}

#[test]
fn refusals_say_why_and_change_nothing() {
    let d = Dom::two_external("del-refuse");
    let e = d.fails(&["snapshot-delete", "nope"]);
    assert!(e.contains("no snapshot \"nope\""), "{e}");
    let e = d.fails(&["snapshot-delete", "../s1"]);
    assert!(e.contains("'/'") || e.contains("separator"), "{e}");
    let o = virt_snap_e2e::in_state::vs(
        d.s(),
        &[
            "snapshot-delete",
            d.name,
            "s1",
            "--children",
            "--children-only",
        ],
    );
    assert!(!o.status.success() && stderr(&o).contains("--children-only"));
    // Shut off, without qemu-storage-daemon: refused before anything changed, saying how to
    // install it.
    let o = run(virt_snap()
        .env("VIRT_SNAP_QSD", "/nonexistent/qemu-storage-daemon")
        .arg("--state-dir")
        .arg(d.s())
        .args(["snapshot-delete", d.name, "s2"]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("apt-get install qemu-utils"),
        "{}",
        stderr(&o)
    );
    assert_eq!(d.names(), ["s1", "s2"]);
    assert_eq!(d.names(), ["s1", "s2"]);
    assert!(d.file("vda.s1").exists() && d.file("vda.s2").exists());
    // A domain held paused for a capture's manual disks.
    d.vs(&["start"]);
    d.vs(&[
        "snapshot-create-as",
        "m",
        "--diskspec",
        "vda,snapshot=manual",
    ]);
    let e = d.fails(&["snapshot-delete", "ext"]);
    assert!(e.contains("resume it first"), "{e}");
    d.vs(&["resume"]);
}

#[test]
fn after_a_revert_what_nothing_needs_goes_and_the_disk_comes_home() {
    let d = Dom::two_external("del-branch");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    // Reverted to s1: vda.s1.r1 on vda.qcow2, the disk on it; vda.qcow2 has two overlays
    // now, and s2's is off the disk's active chain.
    d.vs(&["snapshot-revert", "s1"]);
    let r1 = d.file("vda.s1.r1");
    write(&r1, 0, 0xdd);
    d.vs(&["start"]);
    // s2: nothing to merge, and nothing needs its overlay any more.
    let r = d.delete(&["s2"]);
    assert_eq!(r["kind"], "metadata", "{r}");
    assert!(!s2.exists());
    // s1: its overlay goes too, and the revert's overlay is merged into vda.qcow2 (active
    // commit): the disk is back on its own file.
    let r = d.delete(&["s1"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert!(!s1.exists() && !r1.exists());
    assert_eq!(d.source(), vda.display().to_string());
    assert_eq!(d.defined_source(), vda.display().to_string());
    d.vs(&["destroy"]);
    holds(&vda, 0, 0xdd);
    assert!(!info(&vda).contains("backing file"));
}

/// Found by tests/history.rs: a snapshot reverted to twice left the first revert's overlay
/// (off the active chain, needed by nothing) behind, which kept the base with two overlays, so
/// deleting the snapshot never brought the disk back onto its own file.
#[test]
fn reverted_to_twice_then_deleted_the_disk_comes_home() {
    let d = Dom::define("del-twice");
    let vda = d.file("vda.qcow2");
    d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
    d.vs(&["snapshot-revert", "s1"]);
    d.vs(&["snapshot-revert", "s1"]);
    let (r1, r2) = (d.file("vda.s1.r1"), d.file("vda.s1.r2"));
    assert_eq!(d.defined_source(), r2.display().to_string());
    write(&r2, 0, 0xdd);
    d.vs(&["start"]);
    let r = d.delete(&["s1"]);
    assert_eq!(r["kind"], "external", "{r}");
    for f in [d.file("vda.s1"), r1, r2] {
        assert!(!f.exists(), "{} left", f.display());
    }
    assert_eq!(d.source(), vda.display().to_string());
    assert_eq!(d.defined_source(), vda.display().to_string());
    d.vs(&["destroy"]);
    holds(&vda, 0, 0xdd);
    assert!(!info(&vda).contains("backing file"));
}

/// Found by tests/history.rs (seed 5): s1's revert overlay, discarded by a revert to its
/// child s2, kept vda.qcow2 with two overlays, so s1's own overlay (back on the active chain
/// once s2's revert overlay was merged into it) was never merged.
#[test]
fn a_discarded_revert_overlay_does_not_block_the_merge() {
    let d = Dom::two_external("del-discarded");
    let vda = d.file("vda.qcow2");
    d.vs(&["snapshot-revert", "s1"]);
    d.vs(&["snapshot-revert", "s2"]);
    write(&d.file("vda.s2.r1"), 0, 0xdd);
    let r = d.delete(&["s1", "--children"]);
    assert_eq!(r["deleted"], serde_json::json!(["s2", "s1"]), "{r}");
    for f in ["vda.s1", "vda.s2", "vda.s1.r1", "vda.s2.r1"] {
        assert!(!d.file(f).exists(), "{f} left");
    }
    assert_eq!(d.defined_source(), vda.display().to_string());
    holds(&vda, 0, 0xdd);
    holds(&vda, 64, 0xb1);
    assert!(!info(&vda).contains("backing file"));
}

/// The files `vda.*` in the domain's directory other than its own disk.
fn overlays_left(d: &Dom) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&d.d.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("vda.") && f != "vda.qcow2")
        .collect();
    v.sort();
    v
}

/// Found by tests/history.rs (seed 1): a capture names its overlay after the disk's top then
/// (s3's on `vda.s2.r1` is `vda.s2.s3`); once the delete of s2 merged `vda.s2.r1` into
/// `vda.qcow2`, the name of s3's overlay was not the one a capture picks for `vda.qcow2`, so
/// deleting s3 took it for the user's and kept it, and s3's revert overlay kept the disk off
/// its own file. The overlay record (who made each file) tells instead of the name.
#[test]
fn an_overlay_named_after_an_earlier_top_is_still_ours() {
    let d = Dom::define("del-renamed");
    let vda = d.file("vda.qcow2");
    d.vs(&["start"]);
    d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
    d.vs(&["snapshot-revert", "s2"]);
    let s2r1 = d.file("vda.s2.r1");
    assert_eq!(d.defined_source(), s2r1.display().to_string());
    write(&s2r1, 0, 0xbb);
    d.vs(&["snapshot-create-as", "s3", "--disk-only"]);
    let s2s3 = d.file("vda.s2.s3");
    assert_eq!(d.defined_source(), s2s3.display().to_string());
    write(&s2s3, 0, 0xcc);
    write(&s2s3, 64, 0xc1);
    d.delete(&["s2"]);
    assert_eq!(d.names(), ["s3"]);
    d.vs(&["snapshot-revert", "s3"]);
    let s3r1 = d.file("vda.s3.r1");
    assert_eq!(d.defined_source(), s3r1.display().to_string());
    holds(&s3r1, 0, 0xbb);
    write(&s3r1, 0, 0xdd);
    d.vs(&["start"]);
    let o = virt_snap_e2e::in_state::vs(d.s(), &["snapshot-delete", d.name, "s3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("kept"), "{}", stderr(&o));
    assert_eq!(d.names(), Vec::<String>::new());
    assert_eq!(overlays_left(&d), Vec::<String>::new(), "no overlay left");
    assert_eq!(d.source(), vda.display().to_string());
    assert_eq!(d.defined_source(), vda.display().to_string());
    let nodes = d.node_files();
    assert!(
        nodes.iter().all(|f| *f == vda.display().to_string()),
        "only its own file open in QEMU: {nodes:?}"
    );
    d.vs(&["destroy"]);
    holds(&vda, 0, 0xdd);
    holds(&vda, 64, 0);
    assert!(!info(&vda).contains("backing file"));
}

/// A `--reuse-external` file at the very name a capture would pick is the user's: merged,
/// never removed (the overlay record says whose it is; its name would say virt-snap's).
#[test]
fn a_reused_file_at_our_name_is_kept() {
    let d = Dom::define("del-reused");
    let vda = d.file("vda.qcow2");
    let s1 = d.file("vda.s1");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        vda.to_str().unwrap(),
        "-F",
        "qcow2",
        s1.to_str().unwrap(),
    ]);
    d.vs(&[
        "snapshot-create-as",
        "s1",
        "--disk-only",
        "--reuse-external",
        "--diskspec",
        &format!("vda,file={}", s1.display()),
    ]);
    write(&s1, 0, 0xcc);
    let o = virt_snap_e2e::in_state::vs(d.s(), &["snapshot-delete", d.name, "s1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is kept"), "{}", stderr(&o));
    assert!(s1.exists(), "the user's file is kept");
    assert_eq!(d.defined_source(), vda.display().to_string());
    holds(&vda, 0, 0xcc);
}

#[test]
fn a_base_with_two_overlays_is_not_merged() {
    let d = Dom::two_external("del-two");
    d.vs(&["snapshot-revert", "s1"]);
    // s1's image has two overlays (its own, s2's image, and the revert's): the metadata goes,
    // every file stays, and the warning says why.
    let o = virt_snap_e2e::in_state::vs(d.s(), &["snapshot-delete", d.name, "s1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("has 2 overlays"), "{}", stderr(&o));
    assert_eq!(d.names(), ["s2"]);
    for f in ["vda.s1", "vda.s2", "vda.s1.r1"] {
        assert!(d.file(f).exists(), "{f}");
    }
    current_data(&d.file("vda.s2"));
}

/// s1, s2, s3 external disk-only, taken shut off: vda.qcow2 (0xaa) <- vda.s1 (0xbb at 0, 0xb1
/// at 64k) <- vda.s2 (0xc2 at 128k) <- vda.s3 (0xcc at 0); then reverted to s2: vda.s2.r1
/// (0xdd at 0) on vda.s1, the disk on it. vda.s1, virt-snap's overlay of s1 and s2's image,
/// has two overlays that stay: vda.s2 (s3's image) and the disk's.
fn stream_branch(name: &'static str) -> Dom {
    let d = Dom::define(name);
    d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
    write(&d.file("vda.s1"), 0, 0xbb);
    write(&d.file("vda.s1"), 64, 0xb1);
    d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
    write(&d.file("vda.s2"), 128, 0xc2);
    d.vs(&["snapshot-create-as", "s3", "--disk-only"]);
    write(&d.file("vda.s3"), 0, 0xcc);
    d.vs(&["snapshot-revert", "s2"]);
    let r1 = d.file("vda.s2.r1");
    write(&r1, 0, 0xdd);
    assert_eq!(d.defined_source(), r1.display().to_string());
    d
}

/// After s2 of [`stream_branch`] was deleted by streaming: vda.s1 is gone, both its overlays
/// are on vda.qcow2 and hold its data, s3 is s1's child, every snapshot reads its data.
fn streamed_branch_reads_right(d: &Dom) {
    let (vda, s1, s2, s3, r1) = (
        d.file("vda.qcow2"),
        d.file("vda.s1"),
        d.file("vda.s2"),
        d.file("vda.s3"),
        d.file("vda.s2.r1"),
    );
    assert!(!s1.exists());
    assert_eq!(d.names(), ["s1", "s3"]);
    assert_eq!(d.parent("s3"), "s1");
    for (f, below) in [(&s2, &vda), (&r1, &vda), (&s3, &s2)] {
        let i = info(f);
        assert!(
            i.contains(&format!("backing file: {}", below.display())),
            "{}: {i}",
            f.display()
        );
    }
    let chain = qemu_img(&["info", "--backing-chain", "-U", s3.to_str().unwrap()]);
    assert!(!chain.contains("vda.s1"), "{chain}");
    // s1: the base; s3: its image vda.s2 (s2's writes on s1's); the disk: the revert's.
    holds(&vda, 0, 0xaa);
    assert!(!info(&vda).contains("backing file"));
    holds(&s2, 0, 0xbb);
    holds(&s2, 64, 0xb1);
    holds(&s2, 128, 0xc2);
    holds(&s3, 0, 0xcc);
    holds(&s3, 64, 0xb1);
    holds(&r1, 0, 0xdd);
    holds(&r1, 64, 0xb1);
    assert_eq!(d.defined_source(), r1.display().to_string());
}

#[test]
fn a_branch_on_our_overlay_is_streamed_live_and_the_overlay_goes() {
    let d = stream_branch("del-stream");
    d.vs(&["start"]);
    // s2's image vda.s1 has two overlays that stay: streamed up into the disk's top in QEMU
    // (block-stream) and into vda.s2 in a qemu-storage-daemon, then removed.
    let r = d.delete(&["s2"]);
    assert_eq!(r["kind"], "external", "{r}");
    let nodes = d.node_files();
    assert!(nodes.iter().all(|f| !f.ends_with("/vda.s1")), "{nodes:?}");
    assert_eq!(d.source(), d.file("vda.s2.r1").display().to_string());
    d.vs(&["destroy"]);
    streamed_branch_reads_right(&d);
}

#[test]
fn a_branch_on_our_overlay_is_streamed_offline_and_the_overlay_goes() {
    let d = stream_branch("del-stream-off");
    let o = virt_snap_e2e::in_state::vs(d.s(), &["snapshot-delete", d.name, "s2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One progress line per stream (stderr is no terminal here).
    let e = stderr(&o);
    assert_eq!(e.matches("streaming ").count(), 2, "{e}");
    assert!(e.contains("vda.s1 into"), "{e}");
    streamed_branch_reads_right(&d);
    // And the rest deletes as before: s3 (off the active chain, its overlay unneeded) and s1
    // (the revert's overlay merged back: the disk on its own file).
    d.delete(&["s3"]);
    d.delete(&["s1"]);
    assert!(d.names().is_empty());
    assert_eq!(
        d.defined_source(),
        d.file("vda.qcow2").display().to_string()
    );
    holds(&d.file("vda.qcow2"), 0, 0xdd);
    holds(&d.file("vda.qcow2"), 64, 0xb1);
}

#[test]
fn a_branch_made_by_a_running_revert_is_streamed_live() {
    // Running, then reverted to s2 in the same QEMU (--running): the disk on a new overlay of
    // vda.s1, which has three overlays now (s3's image, the first revert's, the disk's).
    let d = stream_branch("del-stream-run");
    d.vs(&["start"]);
    d.vs(&["snapshot-revert", "s2", "--running"]);
    let top = PathBuf::from(d.source());
    let i = info(&top);
    assert!(i.contains("vda.s1"), "{i}");
    let r = d.delete(&["s2"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert!(!d.file("vda.s1").exists());
    let nodes = d.node_files();
    assert!(nodes.iter().all(|f| !f.ends_with("/vda.s1")), "{nodes:?}");
    assert_eq!(PathBuf::from(d.source()), top);
    d.vs(&["destroy"]);
    let vda = d.file("vda.qcow2");
    for f in [top.clone(), d.file("vda.s2")] {
        let i = info(&f);
        assert!(
            i.contains(&format!("backing file: {}", vda.display())),
            "{}: {i}",
            f.display()
        );
    }
    // The disk: s2's data (vda.s1's); s3's image: s2's writes on it; s3 itself.
    holds(&top, 0, 0xbb);
    holds(&top, 64, 0xb1);
    holds(&d.file("vda.s2"), 0, 0xbb);
    holds(&d.file("vda.s2"), 128, 0xc2);
    holds(&d.file("vda.s3"), 0, 0xcc);
    holds(&d.file("vda.s3"), 64, 0xb1);
    holds(&vda, 0, 0xaa);
    assert_eq!(d.names(), ["s1", "s3"]);
}

#[test]
fn a_delete_killed_after_a_stream_is_rolled_forward() {
    // Running: killed right after the first stream (into the disk's top, in QEMU): the next
    // command sees the top no longer backed by vda.s1 and streams the other one.
    let d = stream_branch("del-stream-kill");
    d.vs(&["start"]);
    killed_delete(&d, "s2", "stream");
    d.vs(&["domstate"]);
    assert_eq!(d.names(), ["s1", "s3"], "recovered by domstate");
    let nodes = d.node_files();
    assert!(nodes.iter().all(|f| !f.ends_with("/vda.s1")), "{nodes:?}");
    d.vs(&["destroy"]);
    streamed_branch_reads_right(&d);
    // Shut off: killed after the first stream in qemu-storage-daemon.
    let d = stream_branch("del-stream-kill-off");
    killed_delete(&d, "s2", "stream");
    d.vs(&["domstate"]);
    streamed_branch_reads_right(&d);
}

/// i1 internal in vda.qcow2, e1 external onto vda.e1 (0xbb), i2 internal in vda.e1, then
/// 0xcc at 0: a mixed tree i1 -> e1 -> i2, the disk on vda.e1.
fn mixed(name: &'static str) -> Dom {
    let d = Dom::define(name);
    d.vs(&["snapshot-create-as", "i1"]);
    d.vs(&["snapshot-create-as", "e1", "--disk-only"]);
    let e1 = d.file("vda.e1");
    write(&e1, 0, 0xbb);
    d.vs(&["snapshot-create-as", "i2"]);
    write(&e1, 0, 0xcc);
    write(&e1, 64, 0xb1);
    d
}

#[test]
fn a_mixed_tree_is_deleted_live_leaves_first() {
    let d = mixed("del-mixed");
    let (vda, e1) = (d.file("vda.qcow2"), d.file("vda.e1"));
    d.vs(&["start"]);
    assert!(d.tags(&vda).contains("i1"));
    assert_eq!(d.names(), ["e1", "i1", "i2"]);
    // i2 through QEMU (vda.e1 is the active image), then e1 by active commit into vda.qcow2
    // (i1's tag there untouched), then i1 through QEMU (vda.qcow2 is active now).
    assert_eq!(d.delete(&["i2"])["kind"], "internal");
    assert!(!d.tags(&e1).contains("i2"));
    assert_eq!(d.delete(&["e1"])["kind"], "external");
    assert!(!e1.exists());
    assert_eq!(d.source(), vda.display().to_string());
    assert!(d.tags(&vda).contains("i1"));
    assert_eq!(d.delete(&["i1"])["kind"], "internal");
    assert!(d.names().is_empty());
    d.vs(&["destroy"]);
    assert!(!d.tags(&vda).contains("i1"));
    current_data(&vda);
}

/// QEMU's nodes of image `p`: (node name, read-only).
fn nodes_of(d: &Dom, p: &Path) -> Vec<(String, bool)> {
    virt_snap_e2e::in_state::block_nodes(d.s(), d.name)
        .iter()
        .filter(|n| n["drv"] == "qcow2" && n["file"] == p.to_str().unwrap())
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_string(),
                n["ro"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_internal_snapshot_in_a_backing_file_is_deleted_in_the_running_qemu() {
    let d = Dom::define("del-int-backing");
    let vda = d.file("vda.qcow2");
    d.vs(&["start"]);
    // With RAM, in vda.qcow2; then vda.qcow2 goes below a live external overlay (its node,
    // the command line's, read-only now).
    d.vs(&["snapshot-create-as", "i1"]);
    d.vs(&["snapshot-create-as", "i2"]);
    d.vs(&["snapshot-create-as", "e1", "--disk-only"]);
    assert_eq!(nodes_of(&d, &vda), [("vs-vda-fmt".to_string(), true)]);
    let pid = d.json(&["domstate"])["pid"].as_u64();
    let r = d.delete(&["i2"]);
    assert_eq!(r["kind"], "internal", "{r}");
    assert!(!d.tags(&vda).contains("i2"), "{}", d.tags(&vda));
    // Read-only again, in the same QEMU, still running on its overlay.
    assert_eq!(nodes_of(&d, &vda), [("vs-vda-fmt".to_string(), true)]);
    assert_eq!(d.json(&["domstate"])["pid"].as_u64(), pid);
    assert_eq!(d.vs(&["domstate"]).trim(), "running");
    assert_eq!(d.source(), d.file("vda.e1").display().to_string());
    // Killed with the node read-write, before the job: the next command finishes it (the
    // node read-only again).
    killed_delete(&d, "i1", "reopen-rw");
    d.vs(&["domstate"]);
    assert_eq!(d.names(), ["e1"], "recovered by domstate");
    assert!(!d.tags(&vda).contains("i1"), "{}", d.tags(&vda));
    assert_eq!(nodes_of(&d, &vda), [("vs-vda-fmt".to_string(), true)]);
    assert_eq!(d.json(&["domstate"])["pid"].as_u64(), pid);
    // The overlay still merges home.
    d.delete(&["e1"]);
    d.vs(&["destroy"]);
    let check = qemu_img(&["check", vda.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{check}");
    holds(&vda, 0, 0xaa);
    assert!(!d.file("vda.e1").exists());
}

#[test]
fn an_overlay_holding_an_internal_snapshot_is_not_merged_away() {
    let d = mixed("del-mixed2");
    let e1 = d.file("vda.e1");
    d.vs(&["start"]);
    let o = virt_snap_e2e::in_state::vs(d.s(), &["snapshot-delete", d.name, "e1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("holds internal snapshots"),
        "{}",
        stderr(&o)
    );
    assert!(e1.exists() && d.tags(&e1).contains("i2"));
    assert_eq!(d.source(), e1.display().to_string());
    assert_eq!(d.names(), ["i1", "i2"]);
    // --children of i1 in one go (shut off: i1 is in a backing file): i2's tag, then i1's;
    // then e1's overlay, virt-snap's and needed by nothing any more, goes back into the
    // disk's own file.
    d.vs(&["destroy"]);
    let r = d.delete(&["i1", "--children"]);
    assert_eq!(r["deleted"], serde_json::json!(["i2", "i1"]), "{r}");
    let vda = d.file("vda.qcow2");
    assert!(!d.tags(&vda).contains("i1"));
    assert!(!e1.exists(), "e1's overlay merged and removed");
    assert_eq!(d.defined_source(), vda.display().to_string());
    assert!(!info(&vda).contains("backing file"));
    current_data(&vda);
}

#[test]
fn the_files_the_user_gave_are_never_removed() {
    let d = Dom::define("del-user");
    let vda = d.file("vda.qcow2");
    let mine = d.file("mine.qcow2");
    d.vs(&[
        "snapshot-create-as",
        "s1",
        "--disk-only",
        "--diskspec",
        &format!("vda,file={}", mine.display()),
    ]);
    write(&mine, 0, 0xcc);
    write(&mine, 64, 0xb1);
    d.vs(&["start"]);
    let o = virt_snap_e2e::in_state::vs(d.s(), &["snapshot-delete", d.name, "s1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is kept"), "{}", stderr(&o));
    // Not a terminal: one line once the merge is done.
    assert!(
        stderr(&o).contains(&format!(
            "virt-snap: merging {} into {}: done in ",
            mine.display(),
            vda.display()
        )),
        "{}",
        stderr(&o)
    );
    assert!(mine.exists(), "the overlay the user named is kept");
    assert!(vda.exists());
    assert_eq!(d.source(), vda.display().to_string());
    d.vs(&["destroy"]);
    current_data(&vda);
}

/// `virt-snap snapshot-delete` aborted right after `effect` (a test failpoint).
fn killed_delete(d: &Dom, snap: &str, effect: &str) {
    let o = run(virt_snap()
        .env("VIRT_SNAP_FAILPOINT", format!("delete:{effect}"))
        .arg("--state-dir")
        .arg(d.s())
        .args(["snapshot-delete", d.name, snap]));
    assert!(!o.status.success(), "not killed: {}", stderr(&o));
}

#[test]
fn a_killed_delete_is_recovered_by_the_next_command() {
    let d = Dom::two_external("del-kill");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    d.vs(&["start"]);
    // Killed with the active commit ready, before its pivot: QEMU goes on; the next command
    // finds the job, completes it and finishes the delete.
    killed_delete(&d, "s2", "commit-ready");
    assert_eq!(d.source(), s1.display().to_string());
    assert_eq!(d.defined_source(), s1.display().to_string());
    assert!(!s2.exists());
    assert_eq!(d.names(), ["s1"]);
    // Killed right after the merge, before the definition: rolled forward.
    killed_delete(&d, "s1", "commit");
    assert_eq!(d.source(), vda.display().to_string());
    assert_eq!(d.defined_source(), vda.display().to_string());
    assert!(d.names().is_empty());
    assert!(!s1.exists());
    // A live snapshot's overlay (a node virt-snap added), killed right after its merge, before
    // its node is dropped: the next command sees it out of the chain, drops it, and finishes.
    d.vs(&["snapshot-create-as", "live", "--disk-only"]);
    let live = d.file("vda.live");
    killed_delete(&d, "live", "commit");
    assert_eq!(d.source(), vda.display().to_string());
    assert!(d.names().is_empty());
    assert!(!live.exists());
    let nodes = d.node_files();
    assert!(nodes.iter().all(|f| f.ends_with("/vda.qcow2")), "{nodes:?}");
    d.vs(&["destroy"]);
    current_data(&vda);
    // Shut off (merged in qemu-storage-daemon), killed with the active commit ready: the
    // daemon dies with virt-snap, the next command merges again in a new one.
    let d = Dom::two_external("del-kill-off");
    let (vda, s1, s2) = (d.file("vda.qcow2"), d.file("vda.s1"), d.file("vda.s2"));
    killed_delete(&d, "s2", "commit-ready");
    d.vs(&["domstate"]);
    assert_eq!(d.names(), ["s1"], "recovered by domstate");
    assert!(!s2.exists());
    assert_eq!(d.defined_source(), s1.display().to_string());
    current_data(&s1);
    // And below the top (an intermediate commit in the daemon), killed right after it.
    d.vs(&["snapshot-create-as", "s3", "--disk-only"]);
    let s3 = d.file("vda.s3");
    killed_delete(&d, "s1", "commit");
    d.vs(&["domstate"]);
    assert_eq!(d.names(), ["s3"]);
    assert!(!s1.exists());
    let i = info(&s3);
    assert!(
        i.contains(&format!("backing file: {}", vda.display())),
        "{i}"
    );
    current_data(&s3);
    let d = Dom::define("del-kill-int");
    let vda = d.file("vda.qcow2");
    // Internal, shut off, killed right after the tag went: `start` completes it first.
    d.vs(&["snapshot-create-as", "int"]);
    killed_delete(&d, "int", "delete-internal");
    d.vs(&["start"]);
    assert!(d.names().is_empty());
    assert!(!d.tags(&vda).contains("int"));
}

/// An internal snapshot in a backing file the running QEMU opened itself from an image
/// header (the domain started on an overlay: `#block...` nodes, which `blockdev-reopen`
/// cannot name): the node is replaced by one virt-snap names (the same image, read-only,
/// under the same overlay), which is reopened read-write for the job; the guest's view and
/// QEMU stay; a later merge into it still works; two levels down too; a kill midway is
/// finished by the next command.
#[test]
fn an_internal_snapshot_in_a_backing_file_qemu_opened_itself_is_deleted_live() {
    let d = Dom::define("del-int-auto");
    let vda = d.file("vda.qcow2");
    write(&vda, 0, 0xaa);
    d.vs(&["snapshot-create-as", "i1"]);
    d.vs(&["snapshot-create-as", "i2"]);
    d.vs(&["snapshot-create-as", "e1", "--disk-only"]);
    let e1 = d.file("vda.e1");
    write(&e1, 64, 0xbb);
    d.vs(&["snapshot-create-as", "i3"]);
    d.vs(&["snapshot-create-as", "e2", "--disk-only"]);
    let e2 = d.file("vda.e1.e2");
    let e2 = if e2.exists() { e2 } else { d.file("vda.e2") };
    write(&e2, 128, 0xcc);
    // Started on e2's overlay: vda.e1 and vda.qcow2 opened by QEMU from the headers.
    d.vs(&["start"]);
    let auto = |f: &Path| nodes_of(&d, f).iter().all(|(n, _)| n.starts_with('#'));
    assert!(auto(&vda) && auto(&e1), "{:?}", nodes_of(&d, &vda));
    let pid = d.json(&["domstate"])["pid"].as_u64();
    // Two levels down (vda.qcow2 under vda.e1 under the top); killed once a replacing node
    // was added, before it was put in place: the next command closes it and finishes.
    killed_delete(&d, "i2", "name-node");
    d.vs(&["domstate"]);
    assert!(!d.names().contains(&"i2".to_string()), "{:?}", d.names());
    assert!(!d.tags(&vda).contains("i2"), "{}", d.tags(&vda));
    assert!(d.tags(&vda).contains("i1"));
    // Named now, read-only again, one node per image; the same QEMU, still on its top.
    for f in [&vda, &e1] {
        let n = nodes_of(&d, f);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].0.starts_with("vs-n-") && n[0].1, "{n:?}");
    }
    assert_eq!(d.json(&["domstate"])["pid"].as_u64(), pid);
    assert_eq!(d.vs(&["domstate"]).trim(), "running");
    assert_eq!(d.source(), e2.display().to_string());
    // One level down, through the node named before.
    assert_eq!(d.delete(&["i3"])["kind"], "internal");
    assert!(!d.tags(&e1).contains("i3"), "{}", d.tags(&e1));
    // The overlays still merge home (into the named nodes, made writable by the commit).
    d.delete(&["e2"]);
    d.delete(&["e1"]);
    assert_eq!(d.source(), vda.display().to_string());
    assert_eq!(d.delete(&["i1"])["kind"], "internal");
    assert!(d.names().is_empty());
    let nodes = d.node_files();
    assert!(
        nodes.iter().all(|f| !f.contains("vda.e")),
        "no node left of a removed overlay: {nodes:?}"
    );
    d.vs(&["destroy"]);
    let check = qemu_img(&["check", vda.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{check}");
    holds(&vda, 0, 0xaa);
    holds(&vda, 64, 0xbb);
    holds(&vda, 128, 0xcc);
    assert!(!e1.exists() && !e2.exists());
    assert_eq!(d.tags(&vda).lines().count(), 0, "{}", d.tags(&vda));
}
