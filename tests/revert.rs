//! `snapshot-revert` on the real binary against a no-OS KVM domain (QEMU 10.0.2): an
//! internal snapshot with RAM reverted in place (the same QEMU process before and after,
//! QMP's query-status), internal snapshots reverted offline, external disk-only snapshots
//! reverted offline and on a running domain (new overlays on the snapshot's images), and a
//! revert killed midway recovered by the next command. The images' data, written and read
//! with qemu-io while the domain is shut off, are the oracle; domstate, domblklist, dumpxml,
//! snapshot-current and qemu-img as the user sees them.

use serde_json::Value;
use std::path::{Path, PathBuf};
use virt_snap_e2e::in_state::{fails, ok, ok_json};
use virt_snap_e2e::{qemu_img, qemu_io_as_is as qemu_io, run, stderr, virt_snap, NoOsDomain};

/// A defined domain with one qcow2 disk `vda` holding pattern 0xaa, shut off (destroyed
/// when the test ends, however it ends).
struct Dom {
    d: NoOsDomain,
    name: &'static str,
}

fn write(p: &Path, pattern: u8) {
    qemu_io(p, &format!("write -P {pattern:#x} 0 64k"));
}

fn holds(p: &Path, pattern: u8) {
    qemu_io(p, &format!("read -P {pattern:#x} 0 64k"));
}

impl Dom {
    fn define(name: &'static str) -> Dom {
        let d = NoOsDomain::define(name, &["vda"]);
        write(&d.disk("vda"), 0xaa);
        Dom { d, name }
    }

    fn s(&self) -> &Path {
        self.d.s()
    }

    fn file(&self, f: &str) -> PathBuf {
        self.d.dir.join(f)
    }

    /// Starts the domain and gives its firmware a second: on this host, a `system_reset` of
    /// a no-OS KVM guest within its first moments (SeaBIOS starting) now and then leaves it
    /// in `internal-error` (seen with bare QMP stop/system_reset/cont too, 1 in 15; never
    /// after a second), and an in-place external revert resets the guest.
    fn start_settled(&self) {
        self.vs(&["start"]);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }

    fn vs(&self, args: &[&str]) -> String {
        self.d.ok(args)
    }

    fn json(&self, args: &[&str]) -> Value {
        self.d.ok_json(args)
    }

    fn pid(&self) -> Option<u64> {
        self.json(&["domstate"])["pid"].as_u64()
    }

    fn state(&self) -> String {
        self.vs(&["domstate"]).trim().to_string()
    }

    fn status(&self) -> String {
        let v: Value = serde_json::from_str(
            &self.vs(&["qemu-monitor-command", r#"{"execute":"query-status"}"#]),
        )
        .unwrap();
        v["return"]["status"].as_str().unwrap().to_string()
    }

    fn source(&self) -> String {
        self.d.blklist().remove(0).1
    }

    fn defined_source(&self) -> String {
        let xml = self.vs(&["dumpxml"]);
        let at = xml.find("<source file='").expect("a file source") + 14;
        xml[at..at + xml[at..].find('\'').unwrap()].to_string()
    }

    /// The image file of every node QEMU has.
    fn node_files(&self) -> Vec<String> {
        virt_snap_e2e::in_state::block_nodes(self.s(), self.name)
            .iter()
            .map(|n| n["file"].as_str().unwrap().to_string())
            .collect()
    }

    fn current(&self) -> String {
        self.vs(&["snapshot-current", "--name"]).trim().to_string()
    }

    fn revert(&self, args: &[&str]) -> Value {
        let mut a = vec!["snapshot-revert"];
        a.extend(args);
        self.json(&a)
    }

    fn internal_tags(&self, image: &Path) -> String {
        qemu_img(&["snapshot", "-U", "-l", image.to_str().unwrap()])
    }
}

#[test]
fn internal_with_ram_reverts_in_place_in_the_same_qemu() {
    let d = Dom::define("rv-inplace");
    let vda = d.file("vda.qcow2");
    d.vs(&["start"]);
    d.vs(&["snapshot-create-as", "s1"]);
    d.vs(&["destroy"]);
    // After the snapshot: other data, and the domain running again (another QEMU).
    write(&vda, 0xbb);
    d.vs(&["start"]);
    let pid = d.pid().expect("running");
    let r = d.revert(&["s1"]);
    assert_eq!(r["kind"], "internal-in-place", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    assert!(r["elapsed-ms"].as_u64().is_some(), "{r}");
    assert_eq!(d.pid(), Some(pid), "the same QEMU process");
    assert_eq!(d.status(), "running");
    assert_eq!(d.current(), "s1");
    // --paused: the same process, paused.
    let r = d.revert(&["s1", "--paused"]);
    assert_eq!(r["state"], "paused", "{r}");
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.status(), "paused");
    assert_eq!(d.state(), "paused");
    // --running from paused.
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.status(), "running");
    d.vs(&["destroy"]);
    holds(&vda, 0xaa);
    // No undo snapshot left in the image; s1 still there.
    let tags = d.internal_tags(&vda);
    assert!(tags.contains("s1") && !tags.contains("vs-revert"), "{tags}");
}

#[test]
fn internal_snapshots_revert_offline() {
    let d = Dom::define("rv-offline");
    let vda = d.file("vda.qcow2");
    // A disk-only internal snapshot of the shut-off domain, and one with RAM.
    d.vs(&["snapshot-create-as", "off"]);
    d.vs(&["start"]);
    d.vs(&["snapshot-create-as", "ram"]);
    d.vs(&["destroy"]);
    write(&vda, 0xbb);

    // Shut off, to a shut-off snapshot: stays shut off, the data is back.
    let r = d.revert(&["off"]);
    assert_eq!(r["kind"], "internal-offline", "{r}");
    assert_eq!(r["state"], "shut off", "{r}");
    assert_eq!(d.state(), "shut off");
    assert_eq!(d.current(), "off");
    holds(&vda, 0xaa);

    // To a snapshot with RAM: started, its RAM loaded, running.
    write(&vda, 0xcc);
    let r = d.revert(&["ram"]);
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(d.status(), "running");
    assert_eq!(d.current(), "ram");
    // Running, to the shut-off snapshot: stopped, reverted, left shut off (virsh) ...
    let r = d.revert(&["off"]);
    assert_eq!(r["kind"], "internal-restart", "{r}");
    assert_eq!(d.state(), "shut off");
    holds(&vda, 0xaa);
    // ... or started with --paused.
    write(&vda, 0xdd);
    let r = d.revert(&["off", "--paused"]);
    assert_eq!(r["state"], "paused", "{r}");
    assert_eq!(d.status(), "prelaunch");
    d.vs(&["destroy"]);
    holds(&vda, 0xaa);
    let tags = d.internal_tags(&vda);
    assert!(!tags.contains("vs-revert"), "no undo snapshot left: {tags}");
}

#[test]
fn external_disk_only_reverts_onto_new_overlays() {
    let d = Dom::define("rv-external");
    let vda = d.file("vda.qcow2");
    let s1 = d.file("vda.s1");
    // Offline: the overlay holds what comes after the snapshot.
    d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
    assert_eq!(d.defined_source(), s1.display().to_string());
    write(&s1, 0xbb);
    let r = d.revert(&["s1"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert_eq!(r["state"], "shut off", "{r}");
    let r1 = d.file("vda.s1.r1");
    assert_eq!(d.defined_source(), r1.display().to_string());
    let info = qemu_img(&["info", r1.to_str().unwrap()]);
    assert!(
        info.contains(&format!("backing file: {}", vda.display())),
        "{info}"
    );
    holds(&r1, 0xaa);
    // The discarded state is kept (nothing deleted): s1's overlay still holds it.
    holds(&s1, 0xbb);
    assert_eq!(d.current(), "s1");

    // Running, with --running: re-pointed in place, in the same QEMU (the guest reset) ...
    d.start_settled();
    let pid = d.pid().unwrap();
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    let r2 = d.file("vda.s1.r2");
    assert_eq!(d.source(), r2.display().to_string());
    assert_eq!(d.defined_source(), r2.display().to_string());
    assert_eq!(d.pid(), Some(pid), "the same QEMU");
    assert_eq!(d.status(), "running");
    // The old top is gone from QEMU; the new overlay sits on the snapshot's image.
    let nodes = d.node_files();
    assert!(!nodes.iter().any(|f| f.ends_with("/vda.s1")), "{nodes:?}");
    assert_eq!(
        nodes.iter().filter(|f| f.ends_with("/vda.s1.r2")).count(),
        2
    );
    // ... and is left shut off without it (a disk-only snapshot, as virsh).
    let r = d.revert(&["s1"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert_eq!(r["state"], "shut off", "{r}");
    assert_eq!(
        d.defined_source(),
        d.file("vda.s1.r3").display().to_string()
    );
    holds(&d.file("vda.s1.r3"), 0xaa);
    holds(&r2, 0xaa);
    let mode = std::fs::metadata(d.file("vda.s1.r3")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    // A live disk-only snapshot of the running domain (on vda.s1.r3), reverted running in
    // place.
    d.start_settled();
    let pid = d.pid().unwrap();
    d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
    let r = d.revert(&["s2", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    // s2's image is vda.s1.r3: its overlay vda.s1.s2, the revert's next to it.
    let s2r = d.file("vda.s1.s2.r1");
    assert_eq!(d.source(), s2r.display().to_string());
    assert_eq!(d.pid(), Some(pid));
    // Back to s1 in place (vda.qcow2 is in the chain), then to s2 again: its image
    // vda.s1.r3 is on another branch now (off the chain): opened for the new overlay, on
    // the node QEMU has of vda.qcow2, in place too.
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    assert_eq!(d.pid(), Some(pid));
    let r = d.revert(&["s2", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    assert_eq!(d.pid(), Some(pid), "the same QEMU");
    assert_eq!(d.status(), "running");
    let s2r2 = d.file("vda.s1.s2.r2");
    assert_eq!(d.source(), s2r2.display().to_string());
    assert_eq!(d.defined_source(), s2r2.display().to_string());
    // One node per image of the new chain, none of the discarded one.
    let nodes = d.node_files();
    let count = |f: &Path| nodes.iter().filter(|n| Path::new(n) == f).count();
    assert_eq!(count(&s2r2), 2, "{nodes:?}");
    assert_eq!(count(&d.file("vda.s1.r3")), 2, "{nodes:?}");
    assert_eq!(count(&vda), 2, "{nodes:?}");
    assert_eq!(count(&d.file("vda.s1.r4")), 0, "{nodes:?}");
    d.vs(&["destroy"]);
    for f in [&s2r, &s2r2] {
        let info = qemu_img(&["info", f.to_str().unwrap()]);
        assert!(
            info.contains(&format!("backing file: {}", d.file("vda.s1.r3").display())),
            "{info}"
        );
    }
}

/// Long jobs say on stderr what they did, one line each, when stderr is not a terminal
/// (here a pipe); stdout keeps only the command's own output.
#[test]
fn long_jobs_report_one_line_each_on_stderr() {
    let d = Dom::define("rv-progress");
    d.vs(&["start"]);
    let out = run(virt_snap().env("VIRT_SNAP_STATE_DIR", d.s()).args([
        "snapshot-create-as",
        "rv-progress",
        "s1",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.lines().count() == 1
            && err.starts_with(
                "virt-snap: saving snapshot s1 (RAM and disks, inside the images): done in "
            ),
        "{err:?}"
    );
    let out = run(virt_snap().env("VIRT_SNAP_STATE_DIR", d.s()).args([
        "--output",
        "json",
        "snapshot-revert",
        "rv-progress",
        "s1",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON alone");
    assert_eq!(v["kind"], "internal-in-place");
    let err = stderr(&out);
    assert!(
        err.lines().count() == 1 && err.starts_with("virt-snap: loading snapshot s1 "),
        "{err:?}"
    );
    // RAM to a file: the bytes of RAM in the line.
    let mem = d.file("s2.mem");
    let spec = format!("file={},snapshot=external", mem.display());
    let out = run(virt_snap().env("VIRT_SNAP_STATE_DIR", d.s()).args([
        "snapshot-create-as",
        "rv-progress",
        "s2",
        "--memspec",
        &spec,
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "virt-snap: saving RAM to {}: done in ",
            mem.display()
        )) && err.trim_end().ends_with(" MiB of RAM"),
        "{err:?}"
    );
}

/// A domain whose disk is a dir-pool volume: the snapshot's copy of the definition names the
/// volume, which the revert resolves to its file (the new overlay goes next to it).
#[test]
fn a_snapshot_of_a_pool_volume_disk_reverts_onto_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let state = dir.join("state");
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    ok(
        &state,
        &["pool-define-as", "p", "dir", pool.to_str().unwrap()],
    );
    ok(
        &state,
        &["vol-create-as", "p", "sys", "16M", "--format", "qcow2"],
    );
    let vol = pool.join("sys");
    write(&vol, 0xaa);
    let xml = dir.join("rv-vol.xml");
    std::fs::write(
        &xml,
        "<domain type='kvm'><name>rv-vol</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
         <source pool='p' volume='sys'/><target dev='vda' bus='virtio'/></disk>\
         <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
    )
    .unwrap();
    ok(&state, &["define", xml.to_str().unwrap()]);
    struct Destroy<'a>(&'a Path);
    impl Drop for Destroy<'_> {
        fn drop(&mut self) {
            let _ = virt_snap_e2e::in_state::vs(self.0, &["destroy", "rv-vol"]);
        }
    }
    let _guard = Destroy(&state);
    ok(&state, &["start", "rv-vol"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    ok(
        &state,
        &["snapshot-create-as", "rv-vol", "s1", "--disk-only"],
    );
    ok(&state, &["destroy", "rv-vol"]);
    let s1 = pool.join("sys.s1");
    write(&s1, 0xbb);
    ok(&state, &["start", "rv-vol"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let r = ok_json(&state, &["snapshot-revert", "rv-vol", "s1", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    ok(&state, &["destroy", "rv-vol"]);
    let r1 = pool.join("sys.s1.r1");
    let info = qemu_img(&["info", r1.to_str().unwrap()]);
    assert!(
        info.contains(&format!("backing file: {}", vol.display())),
        "{info}"
    );
    holds(&r1, 0xaa);
    holds(&s1, 0xbb);
    // Reverted shut off too (a new overlay, the definition on it).
    let r = ok_json(&state, &["snapshot-revert", "rv-vol", "s1"]);
    assert_eq!(r["kind"], "external", "{r}");
    holds(&pool.join("sys.s1.r2"), 0xaa);
    // A volume that is gone is a clear refusal naming it.
    ok(&state, &["vol-delete", "sys", "--pool", "p"]);
    let err = fails(&state, &["snapshot-revert", "rv-vol", "s1"]);
    assert!(err.contains("pool volume p/sys"), "{err}");
}

/// An in-place revert closes the whole old chain it detaches, not only its top: afterwards
/// every image QEMU has open is in the disk's chain (found by tests/history.rs).
#[test]
fn an_in_place_revert_leaves_no_detached_node_open() {
    let d = Dom::define("rv-sweep");
    d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
    d.start_settled();
    d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    let r1 = d.file("vda.s1.r1").display().to_string();
    assert_eq!(d.source(), r1);
    let chain = [r1, d.file("vda.qcow2").display().to_string()];
    let nodes = d.node_files();
    assert!(
        nodes.iter().all(|f| chain.contains(f)),
        "nodes outside the disk's chain: {nodes:?}"
    );
    // Twice in a row: the first revert's overlay node is closed by the second.
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    let chain = [
        d.file("vda.s1.r2").display().to_string(),
        d.file("vda.qcow2").display().to_string(),
    ];
    let nodes = d.node_files();
    assert!(
        nodes.iter().all(|f| chain.contains(f)),
        "nodes outside the disk's chain: {nodes:?}"
    );
    assert_eq!(d.status(), "running");
}

#[test]
fn user_errors_are_one_clear_line() {
    let d = Dom::define("rv-errors");
    let e = fails(d.s(), &["snapshot-revert", d.name, "nope"]);
    assert!(e.contains("no snapshot \"nope\""), "{e}");
    d.vs(&["snapshot-create-as", "s1"]);
    let o = virt_snap_e2e::in_state::vs(
        d.s(),
        &["snapshot-revert", d.name, "s1", "--running", "--paused"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("'--running' cannot be used with '--paused'"),
        "{}",
        stderr(&o)
    );
    // An internal snapshot whose image the disk moved off (an external snapshot since).
    d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
    let e = fails(d.s(), &["snapshot-revert", d.name, "s1"]);
    assert!(e.contains("does not hold internal snapshot"), "{e}");
    assert_eq!(d.current(), "s2");
    // --current reverts to the current one.
    let r = d.revert(&["--current"]);
    assert_eq!(r["name"], "s2", "{r}");
    // Not while the domain is held paused for a capture's manual disks.
    d.vs(&["start"]);
    d.vs(&[
        "snapshot-create-as",
        "m",
        "--diskspec",
        "vda,snapshot=manual",
    ]);
    let e = fails(d.s(), &["snapshot-revert", d.name, "s2"]);
    assert!(e.contains("resume it first"), "{e}");
    d.vs(&["resume"]);
    d.revert(&["s2", "--running"]);
    assert_eq!(d.current(), "s2");
}

/// `virt-snap snapshot-revert` aborted right after `effect` (a test failpoint).
fn killed_revert(d: &Dom, snap: &str, flags: &[&str], effect: &str) {
    let o = run(virt_snap()
        .env("VIRT_SNAP_FAILPOINT", format!("revert:{effect}"))
        .arg("--state-dir")
        .arg(d.s())
        .args(["snapshot-revert", d.name, snap])
        .args(flags));
    assert!(!o.status.success(), "not killed: {}", stderr(&o));
}

#[test]
fn a_killed_revert_is_recovered_by_the_next_command() {
    let d = Dom::define("rv-kill");
    let vda = d.file("vda.qcow2");
    d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
    let s1 = d.file("vda.s1");
    write(&s1, 0xbb);
    d.start_settled();
    let pid = d.pid().unwrap();

    // Killed once re-pointed in place, before the guest reset (the commit point): undone.
    // The domain runs on its own overlay again in the same QEMU, the new one is gone, s1 is
    // not current.
    killed_revert(&d, "s1", &["--running"], "repoint");
    assert_eq!(d.state(), "running");
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.status(), "running");
    assert_eq!(d.source(), s1.display().to_string());
    assert_eq!(d.defined_source(), s1.display().to_string());
    assert!(!d.file("vda.s1.r1").exists());
    let nodes = d.node_files();
    assert!(!nodes.iter().any(|f| f.contains(".r1")), "{nodes:?}");
    assert_eq!(
        d.current(),
        "s1",
        "s1 was current already (made by the capture)"
    );
    // Killed right after the guest reset: completed by the next command.
    killed_revert(&d, "s1", &["--running"], "reset-guest");
    assert_eq!(d.state(), "running");
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.source(), d.file("vda.s1.r1").display().to_string());
    assert_eq!(d.status(), "running");
    // A revert that stops the domain (no --running: it ends shut off), killed right after
    // the stop: undone, the domain started again from its disks (a new QEMU).
    killed_revert(&d, "s1", &[], "destroy");
    assert_eq!(d.state(), "running");
    assert_ne!(d.pid(), Some(pid));
    assert_eq!(d.source(), d.file("vda.s1.r1").display().to_string());
    assert!(!d.file("vda.s1.r2").exists());

    // An internal snapshot with RAM, killed right after the in-place load (the commit
    // point): completed by the next command.
    d.vs(&["destroy"]);
    holds(&s1, 0xbb);
    let d2 = Dom::define("rv-kill2");
    let v2 = d2.file("vda.qcow2");
    d2.vs(&["start"]);
    d2.vs(&["snapshot-create-as", "ram"]);
    d2.vs(&["destroy"]);
    write(&v2, 0xbb);
    d2.vs(&["start"]);
    let pid = d2.pid().unwrap();
    killed_revert(&d2, "ram", &["--paused"], "load-internal");
    assert_eq!(d2.state(), "paused");
    assert_eq!(d2.pid(), Some(pid));
    assert_eq!(d2.current(), "ram");
    d2.vs(&["destroy"]);
    holds(&v2, 0xaa);

    // Shut off, killed right after the offline apply: the domain is left shut off with the
    // revert pending; `start` recovers it first (the image as it was, the undo snapshot
    // gone), then starts.
    write(&v2, 0xcc);
    killed_revert(&d2, "ram", &[], "apply-internal");
    d2.vs(&["start"]);
    d2.vs(&["destroy"]);
    holds(&v2, 0xcc);
    let tags = d2.internal_tags(&v2);
    assert!(
        tags.contains("ram") && !tags.contains("vs-revert"),
        "{tags}"
    );
    let _ = vda;
}

/// QEMU's guest memory in MiB (`query-memory-size-summary`).
fn qemu_mib(d: &Dom) -> u64 {
    let v: Value = serde_json::from_str(&d.vs(&[
        "qemu-monitor-command",
        r#"{"execute":"query-memory-size-summary"}"#,
    ]))
    .unwrap();
    v["return"]["base-memory"].as_u64().unwrap() >> 20
}

/// The domain's XML with its `<memory>` set to `mib`, defined again.
fn redefine_memory(d: &Dom, mib: u32) {
    let xml = d.vs(&["dumpxml"]);
    let at = xml.find("<memory").unwrap();
    let end = at + xml[at..].find("</memory>").unwrap() + "</memory>".len();
    let new = format!(
        "{}<memory unit='MiB'>{mib}</memory>{}",
        &xml[..at],
        &xml[end..]
    );
    let f = d.file("redefined.xml");
    std::fs::write(&f, new).unwrap();
    ok(d.s(), &["define", f.to_str().unwrap()]);
}

/// The defined `<memory>` in MiB (dumpxml).
fn defined_mib(d: &Dom) -> u64 {
    let xml = d.vs(&["dumpxml"]);
    let at = xml.find("<memory").unwrap();
    let tag = &xml[at..at + xml[at..].find('>').unwrap()];
    let value: u64 = xml[at + tag.len() + 1..][..xml[at + tag.len() + 1..].find('<').unwrap()]
        .trim()
        .parse()
        .unwrap();
    match tag {
        t if t.contains("'MiB'") => value,
        t if t.contains("'GiB'") => value << 10,
        _ => value >> 10,
    }
}

#[test]
fn the_snapshot_configuration_comes_back_and_a_different_qemu_is_restarted_only_with_force() {
    let d = Dom::define("rv-config");
    let vda = d.file("vda.qcow2");
    d.vs(&["start"]);
    assert_eq!(qemu_mib(&d), 64);
    d.vs(&["snapshot-create-as", "s1"]);
    // Redefined while it runs: the stored definition changes, the QEMU does not.
    redefine_memory(&d, 96);
    assert_eq!(defined_mib(&d), 96);
    let pid = d.pid().expect("running");
    let r = d.revert(&["s1"]);
    assert_eq!(r["kind"], "internal-in-place", "{r}");
    assert_eq!(d.pid(), Some(pid), "the same QEMU");
    assert_eq!(defined_mib(&d), 64, "the snapshot's configuration is back");

    // Started with more memory since: the snapshot does not load into this QEMU.
    d.vs(&["destroy"]);
    write(&vda, 0xbb);
    redefine_memory(&d, 96);
    d.vs(&["start"]);
    assert_eq!(qemu_mib(&d), 96);
    let pid = d.pid().expect("running");
    let err = fails(d.s(), &["snapshot-revert", d.name, "s1"]);
    assert!(
        err.contains("memory: 96 MiB now, 64 MiB in the snapshot") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(d.pid(), Some(pid), "nothing changed");
    assert_eq!(defined_mib(&d), 96);
    let r = d.revert(&["s1", "--force"]);
    assert_eq!(r["kind"], "internal-restart", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    assert_ne!(d.pid(), Some(pid), "a new QEMU");
    assert_eq!(qemu_mib(&d), 64, "started with the snapshot's memory");
    assert_eq!(d.status(), "running");
    assert_eq!(defined_mib(&d), 64);
    d.vs(&["destroy"]);
    holds(&vda, 0xaa);
}

#[test]
fn a_ram_file_loads_into_a_qemu_with_the_snapshots_configuration() {
    let d = Dom::define("rv-config-mem");
    d.vs(&["start"]);
    let mem = d.file("s1.mem");
    let memspec = format!("file={}", mem.display());
    d.vs(&["snapshot-create-as", "s1", "--memspec", &memspec]);
    d.vs(&["destroy"]);
    // More memory since: a RAM state of 64 MiB does not load into a 96 MiB guest.
    redefine_memory(&d, 96);
    d.vs(&["start"]);
    assert_eq!(qemu_mib(&d), 96);
    let r = d.revert(&["s1"]);
    assert_eq!(r["kind"], "external-memory", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(qemu_mib(&d), 64);
    assert_eq!(defined_mib(&d), 64);
    assert_eq!(d.status(), "running");
}

/// A disk-only snapshot whose image is on another branch of the tree, neither in the running
/// QEMU's chain nor opened by it since its start: re-pointed in place all the same (the
/// image opened read-only for the new overlay, on the node QEMU has of the image below it,
/// with a shared lease, so an offline write to it is refused while QEMU has it); a revert
/// killed after the re-pointing is undone by the next command, which closes that node again.
#[test]
fn a_snapshot_on_another_branch_is_reverted_in_place() {
    let d = Dom::define("rv-branch");
    let vda = d.file("vda.qcow2");
    // s1 on vda.qcow2 (0xaa); s2 on vda.s1 (0xbb); then back to s1 (vda.s1.r1, 0xcc).
    d.vs(&["snapshot-create-as", "s1", "--disk-only"]);
    let s1 = d.file("vda.s1");
    write(&s1, 0xbb);
    d.vs(&["snapshot-create-as", "s2", "--disk-only"]);
    d.revert(&["s1"]);
    let r1 = d.file("vda.s1.r1");
    write(&r1, 0xcc);
    d.start_settled();
    let pid = d.pid().unwrap();
    // Killed right after the re-pointing: undone, the same QEMU on vda.s1.r1, vda.s1 closed.
    killed_revert(&d, "s2", &["--running"], "repoint");
    assert_eq!(d.status(), "running");
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.source(), r1.display().to_string());
    let nodes = d.node_files();
    assert!(!nodes.iter().any(|f| Path::new(f) == s1), "{nodes:?}");
    // ... and its lease given back: an offline change of vda.s1 is allowed again.
    let img = |args: &[&str]| {
        let mut a = vec!["image", "snapshot"];
        a.extend(args);
        virt_snap_e2e::in_state::vs(d.s(), &a)
    };
    let s1s = s1.to_str().unwrap();
    let o = img(&["create", s1s, "x"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = img(&["delete", s1s, "x"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Now to the end: in place, onto a new overlay of vda.s1.
    let r = d.revert(&["s2", "--running"]);
    assert_eq!(r["kind"], "external-in-place", "{r}");
    assert_eq!(d.pid(), Some(pid), "the same QEMU");
    let new = PathBuf::from(d.source());
    assert!(new.display().to_string().ends_with(".s2.r1"), "{new:?}");
    let nodes = d.node_files();
    let count = |f: &Path| nodes.iter().filter(|n| Path::new(n) == f).count();
    assert_eq!(count(&s1), 2, "vda.s1 opened once: {nodes:?}");
    assert_eq!(
        count(&vda),
        2,
        "vda.qcow2 shared, not opened again: {nodes:?}"
    );
    assert_eq!(count(&r1), 0, "the discarded top closed: {nodes:?}");
    // QEMU holds vda.s1 now: an offline change of it is refused.
    let o = img(&["create", s1s, "x"]);
    assert!(!o.status.success(), "vda.s1 changed while QEMU reads it");
    d.vs(&["destroy"]);
    holds(&new, 0xbb);
    holds(&r1, 0xcc);
    let info = qemu_img(&["info", new.to_str().unwrap()]);
    assert!(
        info.contains(&format!("backing file: {}", s1.display())),
        "{info}"
    );
}

/// The domain defined again without its disk `target` (dumpxml, that `<disk>` cut out).
fn redefine_without(d: &Dom, target: &str) {
    let xml = d.vs(&["dumpxml"]);
    let mut out = String::new();
    let mut rest = xml.as_str();
    while let Some(at) = rest.find("<disk") {
        let end = at + rest[at..].find("</disk>").unwrap() + "</disk>".len();
        out += &rest[..at];
        if !rest[at..end].contains(&format!("dev='{target}'"))
            && !rest[at..end].contains(&format!("dev=\"{target}\""))
        {
            out += &rest[at..end];
        }
        rest = &rest[end..];
    }
    out += rest;
    assert_ne!(out, xml, "no disk {target} in {xml}");
    let f = d.file("without.xml");
    std::fs::write(&f, out).unwrap();
    ok(d.s(), &["define", f.to_str().unwrap()]);
}

/// A disk removed from the domain after a snapshot comes back with the revert, as the
/// snapshot's copy of the definition describes it (libvirt's revert puts the snapshot's whole
/// definition back): internal offline (its image reverted), and external of a running
/// domain, whose QEMU lacks the disk: restarted, which an otherwise in-place revert does
/// only with --force (refused without it, naming the disk).
#[test]
fn a_disk_removed_since_the_snapshot_comes_back() {
    let d = Dom {
        d: NoOsDomain::define("rv-back", &["vda", "vdb"]),
        name: "rv-back",
    };
    let (vda, vdb) = (d.file("vda.qcow2"), d.file("vdb.qcow2"));
    write(&vda, 0xaa);
    write(&vdb, 0xaa);
    // Internal, shut off.
    d.vs(&["snapshot-create-as", "i1"]);
    write(&vdb, 0xbb);
    redefine_without(&d, "vdb");
    assert!(!d.vs(&["dumpxml"]).contains("vdb.qcow2"));
    let r = d.revert(&["i1"]);
    assert_eq!(r["kind"], "internal-offline", "{r}");
    assert!(
        d.vs(&["dumpxml"]).contains(vdb.to_str().unwrap()),
        "vdb defined again"
    );
    holds(&vdb, 0xaa);
    holds(&vda, 0xaa);
    // External disk-only of the running domain, then vdb removed (and the domain started
    // without it).
    d.start_settled();
    d.vs(&["snapshot-create-as", "e1", "--disk-only"]);
    d.vs(&["destroy"]);
    let e1 = d.file("vdb.e1");
    write(&e1, 0xcc);
    redefine_without(&d, "vdb");
    d.start_settled();
    let pid = d.pid();
    let e = fails(d.s(), &["snapshot-revert", d.name, "e1", "--running"]);
    assert!(e.contains("disk vdb") && e.contains("--force"), "{e}");
    assert_eq!(d.pid(), pid, "nothing changed");
    let r = d.revert(&["e1", "--running", "--force"]);
    assert_eq!(r["kind"], "external", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    assert_ne!(d.pid(), pid, "restarted with the disk");
    let blk = d.d.blklist();
    let vdb_now = &blk.iter().find(|(t, _)| t == "vdb").expect("vdb is back").1;
    assert!(vdb_now.ends_with("vdb.e1.r1"), "{blk:?}");
    d.vs(&["destroy"]);
    holds(Path::new(vdb_now), 0xaa);
}
