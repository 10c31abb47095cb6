//! `snapshot-revert` of `snapshot='storage'` snapshots on the real binary: a no-OS KVM domain
//! whose disk is a pool volume on a real btrfs (loop device, testbed): a btrfs pool's qcow2
//! volume (subvolume snapshots) and a dir pool's raw volume whose target is on that btrfs
//! (reflink copies). Pattern A written with qemu-io while the domain is shut off, a storage
//! snapshot of the running domain, pattern B, the revert (running and shut off), A read back;
//! the undo volume snapshot gone; a revert killed midway undone or completed by the next
//! command.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use virt_snap_e2e::in_state::{ok, ok_json};
use virt_snap_e2e::{run, stderr, virt_snap};

/// A defined domain `name` whose `vda` is volume `v1` of pool `p` (`kind` on a btrfs loop
/// mount), shut off; destroyed when dropped.
struct OnPool {
    name: &'static str,
    state: PathBuf,
    format: &'static str,
    /// The volume's file.
    vol: PathBuf,
    /// The temporary directory (canonical), where vdb's image is if there is one.
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    _fs: testbed::Btrfs,
}

impl Drop for OnPool {
    fn drop(&mut self) {
        let _ = virt_snap_e2e::in_state::vs(&self.state, &["destroy", self.name]);
    }
}

fn qemu_io(format: &str, p: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", cmd])
        .arg(p)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd} {}: {text} {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OnPool {
    /// `None` (with a message) where the pool cannot snapshot an open volume (a dir pool on
    /// a filesystem without reflink).
    /// With `vdb`, a second disk: a qcow2 file `vdb.qcow2` outside the pool.
    fn new(name: &'static str, kind: &str, format: &'static str, vdb: bool) -> Option<OnPool> {
        let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let state = dir.join("state");
        let mut vdb_xml = String::new();
        if vdb {
            let p = dir.join("vdb.qcow2");
            virt_snap_e2e::qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"]);
            vdb_xml = format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='vdb' bus='virtio'/></disk>",
                p.display()
            );
        }
        let root = fs.mountpoint().join("pool");
        std::fs::create_dir(&root).unwrap();
        ok(
            &state,
            &["pool-define-as", "p", kind, root.to_str().unwrap()],
        );
        let info = ok_json(&state, &["pool-info", "p"]);
        let open = info["capabilities"]["open-volume-snapshots"].to_string();
        if kind == "dir" && !open.contains("file") {
            eprintln!("skipped: this filesystem cannot reflink ({info})");
            return None;
        }
        ok(
            &state,
            &["vol-create-as", "p", "v1", "16M", "--format", format],
        );
        let vol = ok_json(&state, &["vol-path", "v1", "--pool", "p"])["path"]
            .as_str()
            .unwrap()
            .into();
        let xml = tmp.path().join("dom.xml");
        std::fs::write(
            &xml,
            format!(
                "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>\
                 <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
                 <disk type='volume' device='disk'><driver name='qemu' type='{format}'/>\
                 <source pool='p' volume='v1'/><target dev='vda' bus='virtio'/></disk>\
                 {vdb_xml}<controller type='usb' model='none'/><memballoon model='none'/></devices>\
                 </domain>"
            ),
        )
        .unwrap();
        ok(&state, &["define", xml.to_str().unwrap()]);
        Some(OnPool {
            name,
            state,
            format,
            vol,
            dir,
            _tmp: tmp,
            _fs: fs,
        })
    }

    fn vs(&self, args: &[&str]) -> String {
        let mut a = args.to_vec();
        a.insert(1, self.name);
        ok(&self.state, &a)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.insert(1, self.name);
        ok_json(&self.state, &a)
    }

    fn write(&self, pattern: u8) {
        qemu_io(
            self.format,
            &self.vol,
            &format!("write -P {pattern:#x} 0 64k"),
        );
    }

    fn holds(&self, pattern: u8) {
        qemu_io(
            self.format,
            &self.vol,
            &format!("read -P {pattern:#x} 0 64k"),
        );
    }

    fn state(&self) -> String {
        self.vs(&["domstate"]).trim().to_string()
    }

    fn pid(&self) -> Option<u64> {
        self.json(&["domstate"])["pid"].as_u64()
    }

    /// The names of v1's volume snapshots.
    fn vol_snapshots(&self) -> Vec<String> {
        ok_json(&self.state, &["vol-snapshot-list", "v1", "--pool", "p"])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn revert(&self, args: &[&str]) -> Value {
        let mut a = vec!["snapshot-revert"];
        a.extend(args);
        self.json(&a)
    }

    /// `snapshot-revert` aborted right after `effect` (a test failpoint).
    fn killed_revert(&self, flags: &[&str], effect: &str) {
        let o = run(virt_snap()
            .env("VIRT_SNAP_FAILPOINT", format!("revert:{effect}"))
            .arg("--state-dir")
            .arg(&self.state)
            .args(["snapshot-revert", self.name, "s1"])
            .args(flags));
        assert!(!o.status.success(), "not killed: {}", stderr(&o));
    }
}

/// A, a storage snapshot of the running domain, B; reverted running and shut off (A back
/// each time, no undo snapshot left); killed reverts recovered.
fn storage_revert_round_trip(d: &OnPool) {
    d.write(0xaa);
    d.vs(&["start"]);
    d.vs(&[
        "snapshot-create-as",
        "s1",
        "--diskspec",
        "vda,snapshot=storage",
    ]);
    assert_eq!(d.vol_snapshots(), ["s1"], "the capture's volume snapshot");
    d.vs(&["destroy"]);
    d.write(0xbb);
    d.vs(&["start"]);
    let pid = d.pid().expect("running");

    // Running, --running: stopped, the volume reverted by its backend, started again.
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["kind"], "storage", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["warnings"].as_array().map_or(0, Vec::len), 0, "{r}");
    assert_eq!(d.state(), "running");
    assert_ne!(d.pid(), Some(pid), "a new QEMU");
    assert_eq!(
        d.vs(&["snapshot-current", "--name"]).trim(),
        "s1",
        "current"
    );
    d.vs(&["destroy"]);
    d.holds(0xaa);
    assert_eq!(d.vol_snapshots(), ["s1"], "the undo snapshot is gone");

    // Shut off: stays shut off (a disk-only snapshot), A back.
    d.write(0xcc);
    let r = d.revert(&["s1"]);
    assert_eq!(r["kind"], "storage", "{r}");
    assert_eq!(r["state"], "shut off", "{r}");
    assert_eq!(d.state(), "shut off");
    d.holds(0xaa);
    assert_eq!(d.vol_snapshots(), ["s1"]);

    // Killed right after the volume was reverted (before the commit point), the domain
    // running: the next command undoes it: the volume holds B again (reverted to the undo
    // snapshot, which is then deleted), the domain runs again.
    d.write(0xbb);
    d.vs(&["start"]);
    d.killed_revert(&["--running"], "revert-volume");
    assert_eq!(d.state(), "running", "started again by the recovery");
    d.vs(&["destroy"]);
    d.holds(0xbb);
    assert_eq!(d.vol_snapshots(), ["s1"], "the undo snapshot is gone");

    // Killed after the commit point, while dropping the undo snapshot: completed by the
    // next command (the undo snapshot dropped, the domain started as asked).
    d.killed_revert(&["--running"], "drop-volume-saved");
    assert_eq!(d.state(), "running", "completed by the recovery");
    d.vs(&["destroy"]);
    d.holds(0xaa);
    assert_eq!(d.vol_snapshots(), ["s1"]);

    // Killed right after the undo snapshot was taken, shut off: `start` undoes it first.
    d.write(0xdd);
    d.killed_revert(&[], "save-volume");
    d.vs(&["start"]);
    d.vs(&["destroy"]);
    d.holds(0xdd);
    assert_eq!(d.vol_snapshots(), ["s1"]);
}

#[test]
fn a_storage_snapshot_of_a_btrfs_pool_volume_reverts() {
    let d = OnPool::new("rvs-btrfs", "btrfs", "qcow2", false).expect("a btrfs pool");
    storage_revert_round_trip(&d);
}

#[test]
fn a_storage_snapshot_of_a_reflink_dir_pool_volume_reverts() {
    let Some(d) = OnPool::new("rvs-reflink", "dir", "raw", false) else {
        return;
    };
    storage_revert_round_trip(&d);
}

/// A storage disk and an external qcow2 disk in one snapshot (the capture's default for the
/// other disks): both reverted, the volume by its backend, the qcow2 disk onto a new overlay
/// on the snapshot's image; with a RAM file too, loaded into a QEMU started on them.
#[test]
fn a_storage_snapshot_with_an_external_disk_reverts_both() {
    let d = OnPool::new("rvs-mixed", "btrfs", "raw", true).expect("a btrfs pool");
    let vdb = d.dir.join("vdb.qcow2");
    d.write(0xaa);
    qemu_io("qcow2", &vdb, "write -P 0x11 0 64k");
    d.vs(&["start"]);
    d.vs(&[
        "snapshot-create-as",
        "s1",
        "--diskspec",
        "vda,snapshot=storage",
    ]);
    d.vs(&["destroy"]);
    let s1 = d.dir.join("vdb.s1");
    d.write(0xbb);
    qemu_io("qcow2", &s1, "write -P 0x22 0 64k");
    d.vs(&["start"]);
    let r = d.revert(&["s1", "--running"]);
    assert_eq!(r["kind"], "storage", "{r}");
    assert_eq!(r["state"], "running", "{r}");
    let r1 = d.dir.join("vdb.s1.r1");
    let blk = ok_json(&d.state, &["domblklist", d.name]).to_string();
    assert!(
        blk.contains(r1.to_str().unwrap()),
        "vdb on its new overlay: {blk}"
    );
    d.vs(&["destroy"]);
    d.holds(0xaa);
    qemu_io("qcow2", &r1, "read -P 0x11 0 64k");
    // The discarded state is kept in the snapshot's overlay.
    qemu_io("qcow2", &s1, "read -P 0x22 0 64k");
    assert_eq!(d.vol_snapshots(), ["s1"]);

    // With RAM (a file): the volume reverted, the qcow2 disk onto a new overlay, then a
    // QEMU started on them with `-incoming defer` loads the RAM; the snapshot's state
    // (running) comes back. The undo volume snapshot is dropped after the load, for the
    // running domain (its QEMU holds the volume).
    d.write(0x33);
    d.vs(&["start"]);
    let mem = d.dir.join("s2.mem");
    let spec = format!("snapshot=external,file={}", mem.display());
    d.vs(&[
        "snapshot-create-as",
        "s2",
        "--memspec",
        &spec,
        "--diskspec",
        "vda,snapshot=storage",
    ]);
    d.vs(&["destroy"]);
    d.write(0x44);
    d.vs(&["start"]);
    let pid = d.pid();
    let r = d.revert(&["s2"]);
    assert_eq!(r["kind"], "storage-memory", "{r}");
    assert_eq!(r["state"], "running", "the snapshot's state: {r}");
    assert_eq!(r["warnings"].as_array().map_or(0, Vec::len), 0, "{r}");
    assert_eq!(d.state(), "running");
    assert_ne!(d.pid(), pid, "a new QEMU, started for the RAM");
    assert_eq!(d.vol_snapshots(), ["s1", "s2"], "the undo snapshot is gone");
    let blk = ok_json(&d.state, &["domblklist", d.name]);
    let vdb_now = blk[1]["source"].as_str().unwrap_or_default();
    assert!(vdb_now.ends_with(".s2.r1"), "vdb on a new overlay: {blk}");
    d.vs(&["destroy"]);
    d.holds(0x33);

    // Killed right after the RAM was loaded (before the commit point): the next command
    // undoes it: that QEMU stopped, the volume holds what it held, the domain running again
    // on its disks as they were.
    d.write(0x55);
    d.vs(&["start"]);
    let o = run(virt_snap()
        .env("VIRT_SNAP_FAILPOINT", "revert:load-memory")
        .arg("--state-dir")
        .arg(&d.state)
        .args(["snapshot-revert", d.name, "s2"]));
    assert!(!o.status.success(), "not killed: {}", stderr(&o));
    assert_eq!(d.state(), "running", "started again by the recovery");
    assert_eq!(d.vol_snapshots(), ["s1", "s2"], "the undo snapshot is gone");

    // Killed after the commit point, while dropping the undo snapshot (the reverted domain's
    // QEMU holds the volume): completed by another command's recovery, which lends its hold
    // of the domain to the backend's delete; the RAM-loaded QEMU goes on.
    let o = run(virt_snap()
        .env("VIRT_SNAP_FAILPOINT", "revert:before-drop-volume-saved")
        .arg("--state-dir")
        .arg(&d.state)
        .args(["snapshot-revert", d.name, "s2"]));
    assert!(!o.status.success(), "not killed: {}", stderr(&o));
    let undo = |v: Vec<String>| v.iter().any(|s| s.starts_with("vs-revert-undo"));
    assert!(
        undo(d.vol_snapshots()),
        "killed before the undo snapshot went"
    );
    assert_eq!(d.state(), "running", "completed by the recovery");
    assert_eq!(d.vol_snapshots(), ["s1", "s2"], "the undo snapshot is gone");
    d.vs(&["destroy"]);
    d.holds(0x33);
}

/// `snapshot-delete` of storage snapshots: running (under the domain's hold: its QEMU keeps
/// the volume) and shut off, the backend snapshot gone, the volume's current data intact; one
/// killed right after the backend delete finished by the next command.
fn storage_delete_round_trip(d: &OnPool) {
    d.write(0xaa);
    d.vs(&["start"]);
    for s in ["d1", "d2", "d3"] {
        d.vs(&[
            "snapshot-create-as",
            s,
            "--diskspec",
            "vda,snapshot=storage",
        ]);
    }
    assert_eq!(d.vol_snapshots(), ["d1", "d2", "d3"]);
    let pid = d.pid().expect("running");
    // Running: the same QEMU goes on.
    let r = d.json(&["snapshot-delete", "d3"]);
    assert_eq!(r["kind"], "storage", "{r}");
    assert_eq!(d.vol_snapshots(), ["d1", "d2"]);
    assert_eq!(d.pid(), Some(pid));
    assert_eq!(d.state(), "running");
    // Killed right after the backend delete: the next command finishes it.
    let o = run(virt_snap()
        .env("VIRT_SNAP_FAILPOINT", "delete:delete-volume-snapshot")
        .arg("--state-dir")
        .arg(&d.state)
        .args(["snapshot-delete", d.name, "d2"]));
    assert!(!o.status.success(), "not killed: {}", stderr(&o));
    assert_eq!(d.state(), "running");
    let names = d.vs(&["snapshot-list", "--name"]);
    assert_eq!(
        names.split_whitespace().collect::<Vec<_>>(),
        ["d1"],
        "{names}"
    );
    assert_eq!(d.vol_snapshots(), ["d1"]);
    // Killed right before it, the domain running: recovered by another command (`domstate`,
    // not a snapshot-delete), which lends its hold of the domain to the backend's delete.
    d.vs(&[
        "snapshot-create-as",
        "d4",
        "--diskspec",
        "vda,snapshot=storage",
    ]);
    let o = run(virt_snap()
        .env(
            "VIRT_SNAP_FAILPOINT",
            "delete:before-delete-volume-snapshot",
        )
        .arg("--state-dir")
        .arg(&d.state)
        .args(["snapshot-delete", d.name, "d4"]));
    assert!(!o.status.success(), "not killed: {}", stderr(&o));
    assert_eq!(
        d.vol_snapshots(),
        ["d1", "d4"],
        "killed before the backend call"
    );
    assert_eq!(d.state(), "running");
    assert_eq!(d.vol_snapshots(), ["d1"], "finished by the recovery");
    let names = d.vs(&["snapshot-list", "--name"]);
    assert_eq!(names.split_whitespace().collect::<Vec<_>>(), ["d1"]);
    assert_eq!(d.pid(), Some(pid));
    // Shut off: under the volume's lease.
    d.vs(&["destroy"]);
    d.write(0xbb);
    let r = d.json(&["snapshot-delete", "d1"]);
    assert_eq!(r["kind"], "storage", "{r}");
    assert!(d.vol_snapshots().is_empty());
    assert!(d.vs(&["snapshot-list", "--name"]).trim().is_empty());
    d.holds(0xbb);
}

#[test]
fn storage_snapshots_of_a_btrfs_pool_volume_are_deleted() {
    let d = OnPool::new("dls-btrfs", "btrfs", "qcow2", false).expect("a btrfs pool");
    storage_delete_round_trip(&d);
}

#[test]
fn storage_snapshots_of_a_reflink_dir_pool_volume_are_deleted() {
    let Some(d) = OnPool::new("dls-reflink", "dir", "raw", false) else {
        return;
    };
    storage_delete_round_trip(&d);
}
