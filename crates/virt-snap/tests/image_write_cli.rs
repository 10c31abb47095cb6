//! `virt-snap image create` and `image snapshot create|apply|delete` against qemu-img, and the
//! lock: an image a running QEMU holds is refused and left unchanged.

use std::path::Path;
use std::process::{Command, Output};

const HINT: &str = "run `cargo xtask deps` (installs QEMU 10.0.2)";

fn run(prog: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("VIRT_SNAP_STATE_DIR", dir.join("state"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} ({e}): {HINT}"))
}

fn ok(prog: &str, args: &[&str], dir: &Path) -> String {
    let out = run(prog, args, dir);
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const VS: &str = env!("CARGO_BIN_EXE_virt-snap");

fn info(f: &str, dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", f], dir)).unwrap();
    strip_filenames(&mut v);
    v
}

fn strip_filenames(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.remove("filename");
            o.values_mut().for_each(strip_filenames);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_filenames),
        _ => {}
    }
}

fn check_clean(f: &str, dir: &Path) {
    let out = run("qemu-img", &["check", f], dir);
    assert!(
        out.status.success(),
        "qemu-img check {f}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn create_matches_qemu_img_info() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir(dir.join("sub")).unwrap();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", "sub/base.raw", "8M"],
        dir,
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "sub/q.qcow2", "3G"],
        dir,
    );
    // Plain image.
    ok(
        VS,
        &["image", "create", "-f", "qcow2", "ours.qcow2", "1G"],
        dir,
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "theirs.qcow2", "1G"],
        dir,
    );
    assert_eq!(info("ours.qcow2", dir), info("theirs.qcow2", dir));
    check_clean("ours.qcow2", dir);
    // Overlays: size from the backing file (resolved against the overlay's directory).
    for (b, f) in [("base.raw", "raw"), ("q.qcow2", "qcow2")] {
        let (o, t) = (format!("sub/o-{f}.qcow2"), format!("sub/t-{f}.qcow2"));
        ok(
            VS,
            &["image", "create", "-f", "qcow2", "-b", b, "-F", f, &o],
            dir,
        );
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", b, "-F", f, &t],
            dir,
        );
        assert_eq!(info(&o, dir), info(&t, dir), "{o}");
        assert_eq!(
            std::fs::read(dir.join(&o)).unwrap(),
            std::fs::read(dir.join(&t)).unwrap()
        );
        check_clean(&o, dir);
    }
    // No format given: refused (no probing by default), nothing created.
    let out = run(
        VS,
        &[
            "image",
            "create",
            "-f",
            "qcow2",
            "-b",
            "sub/base.raw",
            "x.qcow2",
        ],
        dir,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-F"));
    assert!(!dir.join("x.qcow2").exists());
    // --allow-probe records the probed format.
    ok(
        VS,
        &[
            "image",
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "--allow-probe",
            "sub/p.qcow2",
        ],
        dir,
    );
    assert_eq!(
        std::fs::read(dir.join("sub/p.qcow2")).unwrap(),
        std::fs::read(dir.join("sub/t-raw.qcow2")).unwrap()
    );
    // A wrong -F is refused: the backing file must read as recorded.
    let out = run(
        VS,
        &[
            "image",
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "qcow2",
            "sub/w.qcow2",
        ],
        dir,
    );
    assert!(!out.status.success());
    assert!(!dir.join("sub/w.qcow2").exists());
}

#[test]
fn snapshot_commands_interoperate_with_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        VS,
        &["image", "create", "-f", "qcow2", "d.qcow2", "16M"],
        dir,
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 1M", "d.qcow2"],
        dir,
    );
    let out = ok(
        VS,
        &["-o", "json", "image", "snapshot", "create", "d.qcow2", "a"],
        dir,
    );
    assert!(
        out.contains("\"id\": \"1\"") || out.contains("\"id\":\"1\""),
        "{out}"
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 0 1M", "d.qcow2"],
        dir,
    );
    ok("qemu-img", &["snapshot", "-c", "b", "d.qcow2"], dir);
    ok(VS, &["image", "snapshot", "apply", "d.qcow2", "a"], dir);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 1 0 1M", "d.qcow2"],
        dir,
    );
    ok(
        VS,
        &["image", "snapshot", "apply", "d.qcow2", "--id", "2"],
        dir,
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 2 0 1M", "d.qcow2"],
        dir,
    );
    ok(VS, &["image", "snapshot", "delete", "d.qcow2", "a"], dir);
    ok(
        VS,
        &["image", "snapshot", "delete", "d.qcow2", "--id", "2"],
        dir,
    );
    check_clean("d.qcow2", dir);
    assert_eq!(ok("qemu-img", &["snapshot", "-l", "d.qcow2"], dir), "");
    let out = run(VS, &["image", "snapshot", "delete", "d.qcow2", "a"], dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn image_held_by_a_running_qemu_is_refused_and_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "vm.qcow2", "64M"],
        dir,
    );
    ok("qemu-img", &["snapshot", "-c", "s", "vm.qcow2"], dir);
    let path = dir.join("vm.qcow2");
    let qemu = testbed::Qemu::builder()
        .existing_disk("d0", testbed::DiskFormat::Qcow2, &path)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    // Wait until QEMU holds the image's locks (qemu-img then fails to open it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while run("qemu-img", &["info", "vm.qcow2"], dir).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU never locked the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = std::fs::read(&path).unwrap();
    for args in [
        &["image", "snapshot", "create", "vm.qcow2", "x"][..],
        &["image", "snapshot", "apply", "vm.qcow2", "s"][..],
        &["image", "snapshot", "delete", "vm.qcow2", "s"][..],
        &["image", "create", "-f", "qcow2", "vm.qcow2", "1G"][..],
    ] {
        let out = run(VS, args, dir);
        assert!(
            !out.status.success(),
            "{args:?} succeeded on an image QEMU holds"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use"), "{args:?}: {err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{args:?} changed the image"
        );
    }
    // Reading takes no lock.
    ok(VS, &["image", "snapshot", "list", "vm.qcow2"], dir);
    drop(qemu);
}

#[test]
fn image_held_by_another_virt_snap_is_refused_and_unchanged() {
    use locking::{LockManager, Purpose, Resource};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "held.qcow2", "4M"],
        dir,
    );
    let path = dir.join("held.qcow2");
    let mgr = LockManager::for_state_dir(&dir.join("state")).unwrap();
    let held = mgr
        .acquire(&Purpose::VolumeOp {
            op: "volume revert by someone else".into(),
            volumes: vec![Resource::file(&path)],
        })
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    let out = run(VS, &["image", "snapshot", "create", "held.qcow2", "x"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains("volume revert by someone else"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    drop(held);
    // Released: the write goes through. (A process another test of this binary forked while
    // `held` was alive keeps a copy of its lock descriptors until it execs: allow that
    // window to close.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let out = run(VS, &["image", "snapshot", "create", "held.qcow2", "x"], dir);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::time::Instant::now() < deadline && err.contains("in use"),
            "{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    check_clean("held.qcow2", dir);
}

/// Issue 10: `image create` that fails (a size too large) leaves no file at the new path.
#[test]
fn failed_create_leaves_no_file() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let out = run(
        VS,
        &["image", "create", "-f", "qcow2", "big.qcow2", "8E"],
        dir,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too large"), "{err}");
    assert!(!dir.join("big.qcow2").exists());
}
