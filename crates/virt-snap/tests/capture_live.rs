//! Live capture through the library against real QEMU 10.0.2 (no-OS KVM domains): a disk-only
//! atomic snapshot of 4 qcow2 disks, an internal snapshot with RAM (snapshot-save), an
//! external RAM snapshot with `--live` (background-snapshot), a failure in the real path
//! undone (VM running, no overlay file or block node left, metadata unchanged), and the
//! flags `--halt` (shut off once captured, the next start on the overlays),
//! `--reuse-external` (the user's own overlay files put on top as they are, never deleted,
//! refused when not backed by the disk's top) and `--no-metadata` (captured, not recorded).

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use testbed::{qemu_img, qemu_io};
use virt_snap::domain::DomainState;
use virt_snap::snapshot::{CaptureRequest, DiskChoice, DiskRequest, MemoryChoice, SnapshotName};
use virt_snap::{Connection, Domain};

/// Kills the QEMU of a domain when the test ends, however it ends.
struct KillGuard(Option<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on a QEMU this test started (it may be gone already).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const TARGETS: [&str; 4] = ["vda", "vdb", "vdc", "vdd"];

/// A defined and started KVM domain `name` with `n` qcow2 disks `d/<target>.qcow2`.
struct Vm {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    conn: Connection,
    dom: Domain,
    _guard: KillGuard,
    rt: tokio::runtime::Runtime,
}

fn start(name: &str, n: usize) -> Vm {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut disks = String::new();
    for t in &TARGETS[..n] {
        let p = dir.join(format!("{t}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "32M"]);
        disks += &format!(
            "<disk type='file'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='{t}' bus='virtio'/></disk>",
            p.display()
        );
    }
    let xml = format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{disks}\
         <controller type='usb' model='none'/></devices></domain>"
    );
    let conn = Connection::open(dir.join("state")).unwrap();
    let rt = rt();
    rt.block_on(conn.define(&xml)).unwrap();
    let dom = rt.block_on(conn.start_defined(name, false)).unwrap();
    let guard = KillGuard(dom.pid().unwrap());
    Vm {
        _tmp: tmp,
        dir,
        conn,
        dom,
        _guard: guard,
        rt,
    }
}

impl Vm {
    fn qmp(&self, cmd: &str, args: Value) -> Value {
        let json = if args.is_null() {
            serde_json::json!({ "execute": cmd })
        } else {
            serde_json::json!({"execute": cmd, "arguments": args})
        }
        .to_string();
        let r = self.rt.block_on(self.dom.monitor_command(&json)).unwrap();
        r["return"].clone()
    }

    fn running(&self) -> bool {
        self.rt.block_on(self.dom.state()).unwrap().state == DomainState::Running
    }

    fn node_names(&self) -> Vec<String> {
        self.qmp("query-named-block-nodes", serde_json::json!({"flat": true}))
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str().map(String::from))
            .collect()
    }

    fn disk(&self, t: &str) -> PathBuf {
        self.dir.join(format!("{t}.qcow2"))
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("state/snapshots").join(self.dom.name())
    }

    /// The image QEMU has on top of disk `t` (query-block) and its backing image's file.
    fn top(&self, t: &str) -> (String, Option<String>) {
        let blocks = self.qmp("query-block", Value::Null);
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
        // QEMU describes an image whose backing node is not the one its header names (a
        // relative name, a user's overlay put on top) as `json:{..., "file": {"filename":
        // F}}`: F is the image's file.
        let file = |v: &Value| {
            let f = v.as_str()?;
            match f.strip_prefix("json:") {
                Some(j) => serde_json::from_str::<Value>(j).ok()?["file"]["filename"]
                    .as_str()
                    .map(String::from),
                None => Some(f.to_string()),
            }
        };
        (
            file(&img["filename"]).unwrap(),
            file(&img["backing-image"]["filename"]),
        )
    }

    /// `qemu-io -r CMD` on what the guest sees of disk `t`: its top node, exported read-only
    /// over NBD by the domain's QEMU for the call. The output; panics if qemu-io fails.
    fn guest_io(&self, t: &str, cmd: &str) -> String {
        let node = self
            .qmp("query-block", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .find(|b| {
                b["qdev"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("vs-{t}"))
            })
            .and_then(|b| b["inserted"]["node-name"].as_str().map(String::from))
            .unwrap_or_else(|| panic!("{t}'s top node"));
        let sock = self.dir.join("nbd.sock");
        self.qmp(
            "nbd-server-start",
            serde_json::json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        self.qmp(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "vs-test", "node-name": node,
                               "writable": false}),
        );
        let out = Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", cmd])
            .arg(format!("nbd+unix:///{node}?socket={}", sock.display()))
            .output()
            .expect("qemu-io");
        self.qmp("nbd-server-stop", Value::Null);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("failed"),
            "qemu-io {cmd} on {t}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// The domain's snapshots' names (snapshot-list) and its current snapshot's.
    fn listed(&self) -> (Vec<String>, Option<String>) {
        let l = self
            .conn
            .snapshot_list(self.dom.name(), &Default::default())
            .unwrap();
        let cur = self.conn.snapshot_current(self.dom.name()).unwrap();
        (
            l.into_iter().map(|s| s.name).collect(),
            cur.and_then(|c| c.name).map(|n| n.to_string()),
        )
    }
}

fn req(name: &str) -> CaptureRequest {
    CaptureRequest::new(SnapshotName::new(name).unwrap())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn disk_only_atomic_snapshot_of_four_qcow2_disks() {
    let vm = start("cap4", 4);
    let mut r = req("s1");
    r.flags.disk_only = true;
    r.flags.atomic = true;
    let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect("capture");
    assert_eq!(res.name, "s1");
    assert!(
        res.paused.is_none(),
        "no pause: the I/O stall is the transaction"
    );
    assert!(vm.running(), "the domain still runs");

    // Each disk is on its overlay in QEMU, whose backing is the old image.
    let blocks = vm.qmp("query-block", Value::Null);
    for t in TARGETS {
        let overlay = vm.dir.join(format!("{t}.s1"));
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
        assert_eq!(img["filename"], overlay.display().to_string(), "{t}");
        assert_eq!(
            img["backing-image"]["filename"],
            vm.disk(t).display().to_string()
        );
        let info: Value = serde_json::from_str(&qemu_img(&[
            "info",
            "-U",
            "--output=json",
            overlay.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["backing-filename"], vm.disk(t).display().to_string());
        assert_eq!(info["backing-filename-format"], "qcow2");
        assert_eq!(mode(&overlay), 0o600, "{t}: the overlay is private");
        // Its lease is the domain's QEMU's (handed over with getfd), and QEMU has it open.
        let locks = vm.conn.image(&overlay).locks(None).unwrap();
        let holders = locks.holders.clone().expect("the connection's lockspace");
        let pid = vm.dom.pid().unwrap().unwrap();
        assert!(
            holders.iter().any(|h| h.pid == pid),
            "{t}: lease holders {holders:?}"
        );
        assert!(
            locks.processes.iter().any(|p| p.pid == pid),
            "{t}: {locks:?}"
        );
    }

    // The snapshot is stored and current; the journal and metadata are private.
    let snap = res.snapshot.expect("metadata");
    assert_eq!(snap.disks.len(), 4);
    let sd = vm.snapshots_dir();
    let xml = std::fs::read_to_string(sd.join("s1.xml")).expect("stored");
    assert!(xml.contains("<name>s1</name>"), "{xml}");
    assert!(res.xml.unwrap().contains("s1"));
    for f in std::fs::read_dir(&sd).unwrap() {
        let p = f.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{} is private", p.display());
    }
    // The definition now starts from the overlays.
    let def = vm.conn.dumpxml("cap4").unwrap();
    assert!(
        def.contains(&format!("{}", vm.dir.join("vda.s1").display())),
        "{def}"
    );

    // A second snapshot stacks on the first (the current top is the overlay node).
    let mut r = req("s2");
    r.flags.disk_only = true;
    let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect("second");
    assert_eq!(
        res.snapshot
            .unwrap()
            .parent
            .map(|p| p.to_string())
            .as_deref(),
        Some("s1")
    );
    let blocks = vm.qmp("query-block", Value::Null).to_string();
    assert!(blocks.contains("vda.s2"), "{blocks}");
    assert!(vm.running());

    // The overlays' leases end with QEMU.
    vm.rt.block_on(vm.dom.destroy()).unwrap();
    let locks = vm.conn.image(vm.dir.join("vda.s2")).locks(None).unwrap();
    assert!(!locks.in_use, "{locks:?}");
}

#[test]
fn a_refused_overlay_is_undone_and_the_vm_runs_on() {
    let vm = start("capfail", 4);
    let before = vm.node_names();
    let mut r = req("bad");
    r.flags.disk_only = true;
    // The last disk's overlay in a directory that does not exist: its pre-create fails
    // after the first three overlays were made and added.
    r.disks.push(DiskRequest {
        name: "vdd".into(),
        choice: DiskChoice::External {
            file: Some(vm.dir.join("missing/vdd.bad").display().to_string()),
            format: None,
        },
    });
    let e = vm.rt.block_on(vm.dom.snapshot_create(r)).unwrap_err();
    assert!(e.to_string().contains("bad"), "{e}");
    assert_eq!(
        e.kind(),
        virt_snap::ErrorKind::NotFound,
        "the cause's kind: {e}"
    );
    assert!(vm.running(), "the VM runs (not paused)");
    for t in &TARGETS[..3] {
        assert!(
            !vm.dir.join(format!("{t}.bad")).exists(),
            "{t}: no overlay left"
        );
    }
    assert_eq!(vm.node_names(), before, "no block node left");
    let sd = vm.snapshots_dir();
    assert!(!sd.join("bad.xml").exists(), "metadata unchanged");
    assert!(!vm.conn.dumpxml("capfail").unwrap().contains(".bad"));

    // A request the plan refuses is invalid input; nothing is done.
    let mut r = req("bad");
    r.flags.live = true;
    let e = vm.rt.block_on(vm.dom.snapshot_create(r)).unwrap_err();
    assert_eq!(e.kind(), virt_snap::ErrorKind::InvalidInput, "{e}");
    assert_eq!(vm.node_names(), before);
}

#[test]
fn internal_snapshot_with_ram_on_every_disk() {
    let vm = start("capint", 2);
    let res = vm
        .rt
        .block_on(vm.dom.snapshot_create(req("int1")))
        .expect("capture");
    assert!(vm.running(), "resumed after snapshot-save");
    let snap = res.snapshot.unwrap();
    assert_eq!(
        snap.memory
            .and_then(|m| m.snapshot)
            .map(|l| l.as_str().to_string()),
        Some("internal".into())
    );
    for t in &TARGETS[..2] {
        let l = qemu_img(&["snapshot", "-l", "-U", vm.disk(t).to_str().unwrap()]);
        assert!(l.contains("int1"), "{t}: {l}");
    }
}

#[test]
fn external_live_ram_snapshot_to_a_private_file() {
    let vm = start("caplive", 2);
    let mem = vm.dir.join("caplive.mem");
    let mut r = req("live1");
    r.flags.live = true;
    r.memory = MemoryChoice::External {
        file: mem.display().to_string(),
    };
    let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect("capture");
    assert!(vm.running(), "the VM kept running");
    let m = std::fs::metadata(&mem).expect("the RAM file");
    assert!(m.len() > 64 << 10, "RAM saved: {} bytes", m.len());
    assert_eq!(mode(&mem), 0o600, "not world-readable");
    let q = vm.qmp("query-migrate", Value::Null);
    assert_eq!(q["status"], "completed", "{q}");
    assert!(res.memory_downtime_ms.is_some(), "downtime reported");
    assert!(res.paused.is_some(), "paused for the disks' instant");
    let blocks = vm.qmp("query-block", Value::Null).to_string();
    assert!(
        blocks.contains("vda.live1"),
        "the disks at the same instant: {blocks}"
    );
}

#[test]
fn a_refused_blockdev_add_is_undone() {
    let vm = start("capnode", 2);
    // A node QEMU has already under the name the overlay of vdb would get.
    let taken = snapshot_core::capture::overlay_node_name("vdb", "bad2");
    vm.qmp(
        "blockdev-add",
        serde_json::json!({"driver": "null-co", "node-name": taken}),
    );
    let before = vm.node_names();
    let mut r = req("bad2");
    r.flags.disk_only = true;
    let e = vm.rt.block_on(vm.dom.snapshot_create(r)).unwrap_err();
    assert!(e.to_string().contains("bad2"), "{e}");
    assert!(vm.running(), "the VM runs (not paused)");
    assert_eq!(
        vm.node_names(),
        before,
        "no block node left (the decoy kept)"
    );
    for t in &TARGETS[..2] {
        assert!(
            !vm.dir.join(format!("{t}.bad2")).exists(),
            "{t}: no overlay"
        );
    }
    assert!(!vm.snapshots_dir().join("bad2.xml").exists());
}

#[test]
fn a_shut_off_domain_gets_offline_snapshots_and_starts_on_its_overlays() {
    let vm = start("capoff", 2);
    vm.rt.block_on(vm.dom.destroy()).unwrap();
    // virsh's default for a shut-off domain: internal disk snapshots, no memory.
    let res = vm
        .rt
        .block_on(vm.dom.snapshot_create(req("off1")))
        .expect("internal");
    assert_eq!(
        res.snapshot
            .unwrap()
            .memory
            .and_then(|m| m.snapshot)
            .map(|l| l.as_str().to_string()),
        Some("no".into())
    );
    for t in &TARGETS[..2] {
        let l = qemu_img(&["snapshot", "-l", vm.disk(t).to_str().unwrap()]);
        assert!(l.contains("off1"), "{t}: {l}");
    }
    // Disk-only: overlays made offline, the definition moved onto them.
    let mut r = req("off2");
    r.flags.disk_only = true;
    vm.rt.block_on(vm.dom.snapshot_create(r)).expect("external");
    let def = vm.conn.dumpxml("capoff").unwrap();
    assert!(
        def.contains(&vm.dir.join("vda.off2").display().to_string()),
        "{def}"
    );
    let dom = vm
        .rt
        .block_on(vm.conn.start_defined("capoff", false))
        .unwrap();
    let _g = KillGuard(dom.pid().unwrap());
    let blocks = vm.rt.block_on(dom.block_devices()).unwrap();
    for (b, t) in blocks.iter().zip(TARGETS) {
        assert_eq!(
            b.source,
            vm.dir.join(format!("{t}.off2")).display().to_string()
        );
        assert_eq!(b.format, "qcow2");
    }
}

#[test]
fn external_ram_snapshot_without_live_pauses_for_the_save_then_resumes() {
    let vm = start("capsave", 1);
    let mem = vm.dir.join("capsave.mem");
    let mut r = req("save1");
    r.memory = MemoryChoice::External {
        file: mem.display().to_string(),
    };
    r.pause_budget_ms = 30_000;
    let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect("capture");
    assert!(vm.running(), "resumed after the save");
    assert_eq!(mode(&mem), 0o600);
    assert!(std::fs::metadata(&mem).unwrap().len() > 64 << 10);
    assert_eq!(vm.qmp("query-migrate", Value::Null)["status"], "completed");
    assert!(res.paused.is_some() && res.memory_downtime_ms.is_some());
    let blocks = vm.qmp("query-block", Value::Null).to_string();
    assert!(blocks.contains("vda.save1"), "{blocks}");
}

/// An error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(e) = c {
        s += &format!(": {e}");
        c = e.source();
    }
    s
}

/// Is process `pid` alive (a zombie is not)?
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_string()))
        .is_some_and(|r| !matches!(r.trim_start().chars().next(), Some('Z' | 'X')))
}

/// The user's own overlay `p` of `backing` (qemu-img, as a user makes one), with 64 KiB of
/// `marker` at 1 MiB written into it.
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
    let out = qemu_io(p, &format!("write -P 0x{marker:02x} 1M 64k"), false);
    assert!(out.contains("wrote 65536/65536"), "{out}");
}

/// Reads 64 KiB of `pattern` at `offset` from guest-visible disk `t`.
fn assert_guest_reads(vm: &Vm, t: &str, pattern: u8, offset: &str) {
    let out = vm.guest_io(t, &format!("read -P 0x{pattern:02x} {offset} 64k"));
    assert!(
        out.contains("read 65536/65536"),
        "{t}: 0x{pattern:02x} at {offset}: {out}"
    );
}

fn ino_mtime(p: &Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.modified().unwrap())
}

fn external(t: &str, file: &Path) -> DiskRequest {
    DiskRequest {
        name: t.into(),
        choice: DiskChoice::External {
            file: Some(file.display().to_string()),
            format: None,
        },
    }
}

#[test]
fn halt_shuts_the_domain_off_after_a_disk_only_snapshot_and_it_restarts_on_the_overlays() {
    let vm = start("caphalt", 2);
    let pid = vm.dom.pid().unwrap().unwrap();
    let mut r = req("h1");
    r.flags.disk_only = true;
    r.flags.halt = true;
    let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect("capture");
    assert!(res.warnings.is_empty(), "{:?}", res.warnings);

    // Shut off once the call returns: QEMU is gone, the domain is shut off.
    let st = vm.rt.block_on(vm.dom.state()).unwrap();
    assert_eq!(st.state, DomainState::ShutOff, "{st:?}");
    assert!(!alive(pid), "QEMU {pid} has ended");
    assert_eq!(vm.dom.pid().unwrap(), None);

    // The snapshot is recorded and current.
    let snap = res.snapshot.expect("metadata");
    assert_eq!(
        snap.state,
        Some(virt_snap::snapshot::SnapshotState::DiskSnapshot)
    );
    assert!(vm.snapshots_dir().join("h1.xml").exists());
    assert_eq!(vm.listed(), (vec!["h1".to_string()], Some("h1".into())));
    for t in &TARGETS[..2] {
        let ovl = vm.dir.join(format!("{t}.h1"));
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", ovl.to_str().unwrap()]))
                .unwrap();
        assert_eq!(info["backing-filename"], vm.disk(t).display().to_string());
    }

    // The next start opens the overlays on top of the old images.
    let dom = vm
        .rt
        .block_on(vm.conn.start_defined("caphalt", false))
        .expect("start after --halt");
    let _g = KillGuard(dom.pid().unwrap());
    let blocks = vm.rt.block_on(dom.block_devices()).unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    for (b, t) in blocks.iter().zip(TARGETS) {
        assert_eq!(b.target, t);
        assert_eq!(
            b.source,
            vm.dir.join(format!("{t}.h1")).display().to_string()
        );
        assert_eq!(b.format, "qcow2");
    }
    let vm2 = Vm { dom, ..vm };
    for t in &TARGETS[..2] {
        let (top, backing) = vm2.top(t);
        assert_eq!(top, vm2.dir.join(format!("{t}.h1")).display().to_string());
        assert_eq!(backing, Some(vm2.disk(t).display().to_string()));
    }
}

#[test]
fn reuse_external_puts_the_users_own_overlay_on_top_as_it_is() {
    let vm = start("capreuse", 1);
    let ovl = vm.dir.join("mine.qcow2");
    user_overlay(&ovl, &vm.disk("vda"), 0x77);
    let before = ino_mtime(&ovl);
    let mut r = req("r1");
    r.flags.disk_only = true;
    r.flags.reuse_external = true;
    r.disks.push(external("vda", &ovl));
    let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect("capture");
    assert!(vm.running());

    // QEMU's top is the user's file, on the old image.
    assert_eq!(
        vm.top("vda"),
        (
            ovl.display().to_string(),
            Some(vm.disk("vda").display().to_string())
        )
    );
    // The same file, not recreated: its inode, and the marker written into it before the
    // capture, read through the guest-visible disk.
    assert_eq!(ino_mtime(&ovl).0, before.0, "the same inode");
    assert_guest_reads(&vm, "vda", 0x77, "1M");
    assert_guest_reads(&vm, "vda", 0x00, "0");
    assert!(
        !vm.dir.join("vda.r1").exists(),
        "no overlay of virt-snap's own"
    );

    // Recorded: the snapshot names the user's file, the definition starts from it.
    let snap = res.snapshot.expect("metadata");
    let d = &snap.disks[0];
    assert_eq!(
        d.source.as_ref().and_then(|s| s.file.as_deref()),
        Some(ovl.to_str().unwrap())
    );
    let def = vm.conn.dumpxml("capreuse").unwrap();
    assert!(def.contains(&ovl.display().to_string()), "{def}");
    assert_eq!(vm.listed(), (vec!["r1".to_string()], Some("r1".into())));

    // A user's overlay naming its backing file relative to its own directory (as `qemu-img
    // create -b mine.qcow2` in that directory writes it) is an overlay of the current top.
    let rel = vm.dir.join("mine2.qcow2");
    let out = Command::new("qemu-img")
        .current_dir(&vm.dir)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mine.qcow2",
            "-F",
            "qcow2",
        ])
        .arg("mine2.qcow2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = qemu_io(&rel, "write -P 0x78 2M 64k", false);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let mut r = req("r2");
    r.flags.disk_only = true;
    r.flags.reuse_external = true;
    r.disks.push(external("vda", &rel));
    vm.rt
        .block_on(vm.dom.snapshot_create(r))
        .expect("a relative backing path");
    assert_eq!(
        vm.top("vda"),
        (rel.display().to_string(), Some(ovl.display().to_string()))
    );
    let blocks = vm.rt.block_on(vm.dom.block_devices()).unwrap();
    assert_eq!(blocks[0].source, rel.display().to_string());
    for (p, at) in [(0x78, "2M"), (0x77, "1M"), (0, "0")] {
        assert_guest_reads(&vm, "vda", p, at);
    }
    // And the chain grows on from it.
    let mut r = req("r3");
    r.flags.disk_only = true;
    vm.rt.block_on(vm.dom.snapshot_create(r)).expect("r3");
    let r3 = vm.dir.join("mine2.r3");
    assert_eq!(vm.top("vda").0, r3.display().to_string());
    let chain = qemu_img(&["info", "-U", "--backing-chain", r3.to_str().unwrap()]);
    for f in [&r3, &rel, &ovl, &vm.disk("vda")] {
        assert!(
            chain.contains(&format!("image: {}", f.display())),
            "{chain}"
        );
    }
    assert_guest_reads(&vm, "vda", 0x78, "2M");
}

#[test]
fn reuse_external_keeps_the_users_files_when_the_capture_fails_late() {
    let vm = start("capreusefail", 2);
    let mine = |t: &str| vm.dir.join(format!("mine-{t}.qcow2"));
    for (t, m) in [("vda", 0x71), ("vdb", 0x72)] {
        user_overlay(&mine(t), &vm.disk(t), m);
    }
    let before: Vec<_> = ["vda", "vdb"].map(|t| ino_mtime(&mine(t))).to_vec();
    // A node QEMU has already under the name vdb's overlay node gets: vdb's blockdev-add
    // fails after vda's user file was checked and added to QEMU as a node.
    let taken = snapshot_core::capture::overlay_node_name("vdb", "r2");
    vm.qmp(
        "blockdev-add",
        serde_json::json!({"driver": "null-co", "node-name": taken}),
    );
    let nodes = vm.node_names();
    let req_r2 = || {
        let mut r = req("r2");
        r.flags.disk_only = true;
        r.flags.reuse_external = true;
        r.disks.push(external("vda", &mine("vda")));
        r.disks.push(external("vdb", &mine("vdb")));
        r
    };
    let e = vm
        .rt
        .block_on(vm.dom.snapshot_create(req_r2()))
        .unwrap_err();
    assert!(e.to_string().contains("r2"), "{e}");
    assert!(chain(&e).contains("add-overlay-node vdb"), "{}", chain(&e));
    assert!(vm.running(), "the VM runs (not paused)");
    assert_eq!(vm.node_names(), nodes, "vda's node removed, the decoy kept");
    for t in ["vda", "vdb"] {
        assert_eq!(vm.top(t).0, vm.disk(t).display().to_string(), "{t}");
    }
    // The user's files are there, unchanged, with their markers.
    let after: Vec<_> = ["vda", "vdb"].map(|t| ino_mtime(&mine(t))).to_vec();
    assert_eq!(after, before, "the user's files untouched");
    for (t, m) in [("vda", 0x71), ("vdb", 0x72)] {
        qemu_io(&mine(t), &format!("read -P 0x{m:02x} 1M 64k"), true);
    }
    assert!(!vm.snapshots_dir().join("r2.xml").exists(), "no metadata");
    assert_eq!(vm.listed(), (vec![], None));
    assert!(!vm.conn.dumpxml("capreusefail").unwrap().contains("mine-"));

    // Without the decoy the same request succeeds on the same files.
    vm.qmp("blockdev-del", serde_json::json!({ "node-name": taken }));
    vm.rt
        .block_on(vm.dom.snapshot_create(req_r2()))
        .expect("the retry");
    for (t, m) in [("vda", 0x71), ("vdb", 0x72)] {
        assert_eq!(vm.top(t).0, mine(t).display().to_string());
        assert_guest_reads(&vm, t, m, "1M");
    }
}

#[test]
fn reuse_external_refuses_a_file_not_backed_by_the_disks_current_top() {
    let vm = start("capreusebad", 2);
    // vda moves on to an overlay of its own; a file the user made on vda's old image (or on
    // another disk's image) is no overlay of its current top.
    let mut r = req("s1");
    r.flags.disk_only = true;
    r.disks.push(DiskRequest {
        name: "vdb".into(),
        choice: DiskChoice::No,
    });
    vm.rt.block_on(vm.dom.snapshot_create(r)).expect("s1");
    let top = vm.dir.join("vda.s1");
    assert_eq!(vm.top("vda").0, top.display().to_string());
    for (i, base) in [vm.disk("vda"), vm.disk("vdb")].iter().enumerate() {
        let wrong = vm.dir.join(format!("wrong{i}.qcow2"));
        user_overlay(&wrong, base, 0x66);
        let bytes = std::fs::read(&wrong).unwrap();
        let stamp = ino_mtime(&wrong);
        let nodes = vm.node_names();
        let mut r = req("r3");
        r.flags.disk_only = true;
        r.flags.reuse_external = true;
        r.disks.push(external("vda", &wrong));
        r.disks.push(DiskRequest {
            name: "vdb".into(),
            choice: DiskChoice::No,
        });
        let e = vm.rt.block_on(vm.dom.snapshot_create(r)).unwrap_err();
        let msg = chain(&e);
        assert!(
            msg.contains("--reuse-external")
                && msg.contains(wrong.to_str().unwrap())
                && msg.contains(&base.display().to_string())
                && msg.contains(&top.display().to_string()),
            "names the file, what it is backed by and what it should be: {msg}"
        );
        assert_eq!(e.kind(), virt_snap::ErrorKind::InvalidInput, "{msg}");
        assert!(vm.running());
        assert_eq!(vm.node_names(), nodes, "no node added");
        assert_eq!(vm.top("vda").0, top.display().to_string());
        assert_eq!(std::fs::read(&wrong).unwrap(), bytes, "the file unchanged");
        assert_eq!(ino_mtime(&wrong), stamp);
        assert_eq!(vm.listed(), (vec!["s1".to_string()], Some("s1".into())));
        assert!(!vm.conn.dumpxml("capreusebad").unwrap().contains("wrong"));
    }
}

#[test]
fn no_metadata_captures_but_records_nothing() {
    let vm = start("capnometa", 1);
    let nm = |name: &str| {
        let mut r = req(name);
        r.flags.disk_only = true;
        r.flags.no_metadata = true;
        let res = vm.rt.block_on(vm.dom.snapshot_create(r)).expect(name);
        assert!(res.snapshot.is_none() && res.xml.is_none(), "{res:?}");
        assert!(vm.running());
    };
    nm("nm1");
    let ovl = vm.dir.join("vda.nm1");
    assert_eq!(
        vm.top("vda"),
        (
            ovl.display().to_string(),
            Some(vm.disk("vda").display().to_string())
        ),
        "captured: the overlay on top in QEMU"
    );
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        ovl.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(
        info["backing-filename"],
        vm.disk("vda").display().to_string()
    );
    assert_eq!(vm.listed(), (vec![], None), "nothing listed, no current");
    assert!(!vm.snapshots_dir().join("nm1.xml").exists());

    // With a current snapshot: it stays current, and the list does not grow.
    let mut r = req("s1");
    r.flags.disk_only = true;
    vm.rt.block_on(vm.dom.snapshot_create(r)).expect("s1");
    nm("nm2");
    assert_eq!(
        vm.top("vda").0,
        vm.dir.join("vda.nm2").display().to_string()
    );
    assert_eq!(vm.listed(), (vec!["s1".to_string()], Some("s1".into())));
    assert!(!vm.snapshots_dir().join("nm2.xml").exists());
}
