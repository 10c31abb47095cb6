//! `snapshot='manual'` disks on real QEMU through the CLI: the domain is left paused (reason
//! "snapshot") for the user's own snapshots of them, refuses another capture meanwhile, and is
//! resumed by `virt-snap resume` or, at the latest, at the hold's end by the resumer process,
//! without any further virt-snap command.

use std::path::Path;
use std::time::{Duration, Instant};
use virt_snap_e2e::in_state::{fails, ok, ok_json, vs};

struct Destroy<'a>(&'a Path);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let _ = vs(self.0, &["destroy", "man"]);
    }
}

fn start(dir: &Path, s: &Path) {
    let mut disks = String::new();
    for t in ["vda", "vdb"] {
        let p = dir.join(format!("{t}.qcow2"));
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("16M")
            .status()
            .expect("qemu-img (run `cargo xtask deps`)");
        assert!(st.success());
        disks += &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='{t}' bus='virtio'/></disk>",
            p.display()
        );
    }
    let xml = dir.join("man.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='kvm'><name>man</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{disks}\
             <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"
        ),
    )
    .unwrap();
    ok(s, &["define", xml.to_str().unwrap()]);
    ok(s, &["start", "man"]);
}

fn state(s: &Path) -> String {
    ok(s, &["domstate", "man", "--reason"])
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn manual_disks_pause_until_resume_or_the_hold_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let s = &tmp.path().join("state");
    start(tmp.path(), s);
    let _d = Destroy(s);

    // Held for 3 s: paused for the snapshot, vda captured, vdb left to the user.
    let o = vs(
        s,
        &[
            "snapshot-create-as",
            "man",
            "s1",
            "--disk-only",
            "--diskspec",
            "vdb,snapshot=manual",
            "--manual-hold",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", virt_snap_e2e::stderr(&o));
    let t0 = Instant::now();
    let err = virt_snap_e2e::stderr(&o);
    assert!(
        err.contains("paused for your snapshots of its manual disks (vdb)"),
        "{err}"
    );
    assert_eq!(state(s), "paused (snapshot)");
    let xml = ok(s, &["snapshot-dumpxml", "man", "s1"]);
    assert!(
        xml.contains("<disk name='vdb' snapshot='manual'/>"),
        "{xml}"
    );
    assert!(
        xml.contains("<disk name='vda' snapshot='external' type='file'>"),
        "{xml}"
    );
    let blk = ok_json(s, &["domblklist", "man"]);
    assert!(blk.to_string().contains("vda.s1"), "{blk}");
    let e = fails(s, &["snapshot-create-as", "man", "s2", "--disk-only"]);
    assert!(e.contains("resume it first"), "{e}");

    // No command: the resumer resumes it at the hold's end.
    while state(s) != "running (booted)" {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "not resumed at the hold's end: {}",
            state(s)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(2_500),
        "{:?}",
        t0.elapsed()
    );

    // Held for an hour, ended by resume.
    ok(
        s,
        &[
            "snapshot-create-as",
            "man",
            "s2",
            "--disk-only",
            "--diskspec",
            "vdb,snapshot=manual",
            "--manual-hold",
            "3600",
        ],
    );
    assert_eq!(state(s), "paused (snapshot)");
    assert_eq!(ok(s, &["resume", "man"]), "Domain 'man' resumed\n");
    assert_eq!(state(s), "running (booted)");
    ok(s, &["snapshot-create-as", "man", "s3", "--disk-only"]);
    // suspend / resume by hand: reason user.
    ok(s, &["suspend", "man"]);
    assert_eq!(state(s), "paused (user)");
    ok(s, &["resume", "man"]);
    assert_eq!(state(s), "running (booted)");
    // Manual disks with memory or --quiesce are refused before anything is done.
    let e = fails(
        s,
        &[
            "snapshot-create-as",
            "man",
            "s4",
            "--diskspec",
            "vdb,snapshot=manual",
            "--memspec",
            "file=/tmp/never.mem",
        ],
    );
    assert!(e.contains("manual"), "{e}");
    assert_eq!(state(s), "running (booted)");
}
