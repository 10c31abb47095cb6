//! `virt-snap image info` and `virt-snap image snapshot list` against qemu-img: the same text
//! (byte for byte, dates in the local time zone as qemu-img) and the same JSON fields.

use std::path::Path;
use std::process::{Command, Output};

const HINT: &str = "run `cargo xtask deps` (installs QEMU 10.0.2)";

fn run(prog: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("TZ", "UTC")
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

fn vs(args: &[&str], dir: &Path) -> Output {
    run(env!("CARGO_BIN_EXE_virt-snap"), args, dir)
}

fn vs_ok(args: &[&str], dir: &Path) -> String {
    ok(env!("CARGO_BIN_EXE_virt-snap"), args, dir)
}

/// A small tree: base.raw <- sub/mid.qcow2 (snapshots with odd names) <- top.qcow2.
fn tree() -> tempfile::TempDir {
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
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/mid.qcow2",
        ],
        dir,
    );
    for name in [
        "first",
        "a much longer snapshot name than the column",
        "d\u{e9}j\u{e0} vu",
        "first",
        "\u{65e5}\u{672c}",
    ] {
        ok("qemu-img", &["snapshot", "-c", name, "sub/mid.qcow2"], dir);
    }
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,lazy_refcounts=on",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        dir,
    );
    d
}

#[test]
fn text_output_is_qemu_imgs() {
    let d = tree();
    let dir = d.path();
    for f in ["top.qcow2", "sub/mid.qcow2", "sub/base.raw"] {
        assert_eq!(
            vs_ok(&["image", "info", f], dir),
            ok("qemu-img", &["info", f], dir),
            "image info {f}"
        );
    }
    assert_eq!(
        vs_ok(&["image", "snapshot", "list", "sub/mid.qcow2"], dir),
        ok("qemu-img", &["snapshot", "-l", "sub/mid.qcow2"], dir)
    );
    assert_eq!(
        vs_ok(&["image", "snapshot", "list", "top.qcow2"], dir),
        ok("qemu-img", &["snapshot", "-l", "top.qcow2"], dir)
    );
    assert_eq!(
        vs_ok(&["image", "info", "--backing-chain", "top.qcow2"], dir),
        ok("qemu-img", &["info", "--backing-chain", "top.qcow2"], dir)
    );
}

#[test]
fn json_output_has_qemu_imgs_fields() {
    let d = tree();
    let dir = d.path();
    let ours: serde_json::Value = serde_json::from_str(&vs_ok(
        &["-o", "json", "image", "info", "sub/mid.qcow2"],
        dir,
    ))
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["info", "--output=json", "sub/mid.qcow2"],
        dir,
    ))
    .unwrap();
    for (k, v) in theirs.as_object().unwrap() {
        assert_eq!(&ours[k], v, "field {k}");
    }
    let snaps: serde_json::Value = serde_json::from_str(&vs_ok(
        &[
            "image",
            "snapshot",
            "list",
            "--output",
            "json",
            "sub/mid.qcow2",
        ],
        dir,
    ))
    .unwrap();
    assert_eq!(snaps, theirs["snapshots"]);

    let chain: serde_json::Value = serde_json::from_str(&vs_ok(
        &[
            "-o",
            "json",
            "image",
            "info",
            "--backing-chain",
            "top.qcow2",
        ],
        dir,
    ))
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&ok(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
        dir,
    ))
    .unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 3);
    for (o, t) in chain
        .as_array()
        .unwrap()
        .iter()
        .zip(theirs.as_array().unwrap())
    {
        for (k, v) in t.as_object().unwrap() {
            assert_eq!(&o[k], v, "field {k} of {}", t["filename"]);
        }
    }
}

#[test]
fn probing_is_refused_unless_allowed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", "b.raw", "1M"],
        dir,
    );
    // QED records no backing format unless it is raw; here it claims qcow2 (not recorded).
    ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-u", "-b", "b.raw", "-F", "qcow2", "o.qed", "1M",
        ],
        dir,
    );
    let out = vs(&["image", "info", "--backing-chain", "o.qed"], dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to probe"), "{err}");
    assert!(err.contains("o.qed"), "{err}");
    let text = vs_ok(
        &["image", "info", "--backing-chain", "--allow-probe", "o.qed"],
        dir,
    );
    assert!(text.contains("image: b.raw\nfile format: raw\n"), "{text}");
    // Without --backing-chain the backing file is not opened at all.
    vs_ok(&["image", "info", "o.qed"], dir);
}

#[test]
fn errors_are_one_line_with_exit_code_1() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let out = vs(&["image", "info", "missing.qcow2"], dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("virt-snap: error: ") && err.contains("missing.qcow2"),
        "{err}"
    );
    std::fs::write(dir.join("r.raw"), [0u8; 4096]).unwrap();
    let out = vs(&["image", "snapshot", "list", "r.raw"], dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no internal snapshots"));
    let out = vs(&["image", "info", "-f", "vmdk", "r.raw"], dir);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn snapshots_with_vm_state_read_like_qemu_img() {
    use std::io::{BufRead, BufReader, Write};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "vm.qcow2", "64M"],
        dir,
    );
    let qemu = testbed::Qemu::builder()
        .existing_disk("d0", testbed::DiskFormat::Qcow2, &dir.join("vm.qcow2"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    std::thread::sleep(std::time::Duration::from_millis(700));
    let s = std::os::unix::net::UnixStream::connect(qemu.qmp_path()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    for cmd in [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"savevm running"}}"#,
    ] {
        writeln!(w, "{cmd}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(line.contains("\"return\""), "{line}");
                break;
            }
        }
    }
    // QEMU still holds the image: qemu-img needs -U; we take no lock at all.
    assert_eq!(
        vs_ok(&["image", "snapshot", "list", "vm.qcow2"], dir),
        ok("qemu-img", &["snapshot", "-l", "-U", "vm.qcow2"], dir)
    );
    let text = vs_ok(&["image", "info", "vm.qcow2"], dir);
    assert!(text.contains(" KiB 2") || text.contains(" MiB 2"), "{text}");
    drop(qemu);
}

#[test]
fn dates_are_local_time_like_qemu_img() {
    let d = tree();
    let dir = d.path();
    for tz in ["Asia/Kolkata", "America/New_York", "UTC"] {
        let list = |prog: &str, args: &[&str]| {
            let out = Command::new(prog)
                .args(args)
                .current_dir(dir)
                .env("TZ", tz)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {prog} ({e}): {HINT}"));
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(
            list(
                env!("CARGO_BIN_EXE_virt-snap"),
                &["image", "snapshot", "list", "sub/mid.qcow2"]
            ),
            list("qemu-img", &["snapshot", "-l", "sub/mid.qcow2"]),
            "TZ={tz}"
        );
    }
}

#[test]
fn names_that_are_not_utf8_print_as_qemu_img_prints_them() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
        dir,
    );
    for name in [&b"n\xff\xfeme"[..], b"\xe6\x97", b"ok"] {
        let out = Command::new("qemu-img")
            .args([
                OsStr::new("snapshot"),
                OsStr::new("-c"),
                OsStr::from_bytes(name),
            ])
            .arg("b.qcow2")
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): {HINT}"));
        assert!(out.status.success());
    }
    let raw = |prog: &str, args: &[&str]| run(prog, args, dir).stdout;
    assert_eq!(
        raw(
            env!("CARGO_BIN_EXE_virt-snap"),
            &["image", "snapshot", "list", "b.qcow2"]
        ),
        raw("qemu-img", &["snapshot", "-l", "b.qcow2"])
    );
    // In JSON both replace invalid sequences with U+FFFD.
    let ours: serde_json::Value = serde_json::from_slice(&raw(
        env!("CARGO_BIN_EXE_virt-snap"),
        &["-o", "json", "image", "info", "b.qcow2"],
    ))
    .unwrap();
    let theirs: serde_json::Value =
        serde_json::from_slice(&raw("qemu-img", &["info", "--output=json", "b.qcow2"])).unwrap();
    assert_eq!(ours["snapshots"], theirs["snapshots"]);
}
