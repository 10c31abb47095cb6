//! Helpers shared by the write-side tests: the oracle (qemu-img, qemu-io) and a model of
//! what every snapshot and the active state hold.
#![allow(dead_code)]

use image_formats::qcow2_write::SnapshotEditor;
use image_formats::FileStorage;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

pub const HINT: &str = "run `cargo xtask deps` (installs QEMU 10.0.2: qemu-img, qemu-io)";

pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} ({e}): {HINT}"))
}

pub fn ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` in JSON: (exit code, corruptions, leaks).
pub fn check(p: &Path) -> (i32, u64, u64) {
    let out = run("qemu-img", &["check", "--output=json", s(p)]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        v.is_object(),
        "qemu-img check {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(n("check-errors"), 0, "check errors: {v}");
    (
        out.status.code().unwrap_or(-1),
        n("corruptions"),
        n("leaks"),
    )
}

pub fn assert_clean(p: &Path) {
    let (code, c, l) = check(p);
    assert!(
        code == 0 && c == 0 && l == 0,
        "{}: exit {code}, {c} corruptions, {l} leaks",
        p.display()
    );
}

/// The `ERROR` lines of `qemu-img check`'s text output.
pub fn check_errors(p: &Path) -> Vec<String> {
    let out = run("qemu-img", &["check", s(p)]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_string)
        .collect()
}

/// Guest-visible bytes of the active state or of a snapshot.
pub fn raw(img: &Path, snapshot_id: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw");
    let mut args = vec!["convert", "-U"];
    let l;
    if let Some(id) = snapshot_id {
        l = format!("snapshot.id={id}");
        args.extend(["-l", &l]);
    }
    args.extend(["-O", "raw", s(img), s(&out)]);
    ok("qemu-img", &args);
    std::fs::read(out).unwrap()
}

pub fn write_pattern(img: &Path, pattern: u8, off: u64, len: u64) {
    write_pattern_with(img, pattern, off, len, false);
}

/// `write_pattern`, optionally as compressed clusters (`qemu-io write -c`).
pub fn write_pattern_with(img: &Path, pattern: u8, off: u64, len: u64, compressed: bool) {
    let c = format!(
        "write {}-P {pattern} {off} {len}",
        if compressed { "-c " } else { "" }
    );
    ok("qemu-io", &["-f", "qcow2", "-c", &c, s(img)]);
}

/// Our snapshot editor on an image file, opened read-write.
pub fn editor(p: &Path) -> SnapshotEditor<FileStorage> {
    SnapshotEditor::open(FileStorage::open_read_write(p).unwrap()).unwrap()
}

/// (id, name) of every snapshot, as qemu-img lists them.
pub fn snapshot_list(img: &Path) -> Vec<(String, String)> {
    let v: Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", "-U", s(img)])).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["id"].as_str().unwrap().to_string(),
                        x["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

pub fn qimg(dir: &Path, name: &str, opts: &str, size: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&p), size]);
    ok("qemu-img", &args);
    p
}
