//! `snapshot='manual'` disks on real QEMU through the CLI: the domain is left paused (reason
//! "snapshot") for the user's own snapshots of them, refuses another capture meanwhile, and is
//! resumed by `virt-snap resume` or, at the latest, at the hold's end by the resumer process,
//! without any further virt-snap command.

use std::path::Path;
use std::time::{Duration, Instant};
use virt_snap_e2e::in_state::{fails, ok, ok_json, vs};
use virt_snap_e2e::NoOsDomain;

fn state(s: &Path) -> String {
    ok(s, &["domstate", "man", "--reason"])
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn manual_disks_pause_until_resume_or_the_hold_ends() {
    let dom = NoOsDomain::start("man", &["vda", "vdb"]);
    let s = dom.s();

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
