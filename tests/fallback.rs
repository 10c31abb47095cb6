//! `--live` where QEMU refuses background-snapshot (as with VFIO devices or a kernel without
//! userfaultfd write-protect; simulated by a test-only failpoint in front of the real QEMU's
//! capability call): a clear error that names `--fallback-paused`, nothing left behind and the
//! guest running; with `--fallback-paused` the RAM is saved with the guest paused, and that
//! is reported.

use std::path::Path;
use virt_snap_e2e::in_state::ok;
use virt_snap_e2e::{stderr, NoOsDomain};

fn refused(state: &Path, args: &[&str]) -> std::process::Output {
    virt_snap_e2e::run(
        virt_snap_e2e::virt_snap()
            .env("VIRT_SNAP_FAILPOINT", "capture:refuse-background-snapshot")
            .arg("--state-dir")
            .arg(state)
            .args(args),
    )
}

#[test]
fn a_refused_background_snapshot_is_an_error_or_an_announced_paused_save() {
    let dom = NoOsDomain::start("fb", &["vda"]);
    let s = dom.s();
    let tmp = &dom.dir;
    let mem = tmp.join("s1.mem");
    let memspec = format!("file={}", mem.display());

    let o = refused(
        s,
        &[
            "snapshot-create-as",
            "fb",
            "s1",
            "--memspec",
            &memspec,
            "--live",
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("background-snapshot") && err.contains("--fallback-paused"),
        "{err}"
    );
    assert!(!mem.exists(), "the RAM file was left behind");
    assert!(!tmp.join("vda.s1").exists(), "an overlay was left behind");
    assert_eq!(ok(s, &["domstate", "fb"]), "running\n\n");
    assert_eq!(ok(s, &["snapshot-list", "fb", "--name"]), "");

    let o = refused(
        s,
        &[
            "snapshot-create-as",
            "fb",
            "s1",
            "--memspec",
            &memspec,
            "--live",
            "--fallback-paused",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("RAM was saved with the guest paused (--fallback-paused)"),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(&mem).expect("the RAM file");
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert!(m.len() > 0);
    assert_eq!(ok(s, &["domstate", "fb"]), "running\n\n");
    let xml = ok(s, &["snapshot-dumpxml", "fb", "s1"]);
    assert!(xml.contains("<memory snapshot='external'"), "{xml}");
    assert!(xml.contains("<state>running</state>"), "{xml}");
}
