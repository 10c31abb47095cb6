//! The pool, volume and volume snapshot commands on the real binary: a dir pool and a btrfs
//! pool (real loop mount), bytes read back after revert, and refusal while a real QEMU holds
//! the volume.

use std::os::unix::fs::FileExt;
use std::path::Path;
use testbed::{DiskFormat, Qemu};
use virt_snap_e2e::{run, stderr, stdout, virt_snap};

fn vs(state: &Path, args: &[&str]) -> std::process::Output {
    run(virt_snap().arg("--state-dir").arg(state).args(args))
}

fn ok_json(state: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let o = vs(state, &a);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&o)))
}

fn write_at(path: &str, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &str, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

/// create, write, snapshot, overwrite, revert, read back, list, delete: on pool `pool`.
fn round_trip(state: &Path, pool: &str) {
    let v = ok_json(state, &["vol-create-as", pool, "v1", "8M"]);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["capacity"], 8 << 20);
    let path = ok_json(state, &["vol-path", "v1", "--pool", pool])["path"]
        .as_str()
        .unwrap()
        .to_string();
    write_at(&path, 4096, b"the original");
    let s = ok_json(state, &["vol-snapshot-create", "v1", "s1", "--pool", pool]);
    assert_eq!(s["name"], "s1");
    write_at(&path, 4096, b"OVERWRITTEN!");
    ok_json(state, &["vol-snapshot-revert", "v1", "s1", "--pool", pool]);
    assert_eq!(read_at(&path, 4096, 12), b"the original");
    let list = ok_json(state, &["vol-snapshot-list", "v1", "--pool", pool]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["valid"], true);
    let o = vs(state, &["vol-snapshot-list", "v1", "--pool", pool]);
    assert!(stdout(&o).contains(" s1 "), "{}", stdout(&o));
    // qcow2 overlay on v1: the backing format is recorded.
    let o = ok_json(
        state,
        &[
            "vol-create-as",
            pool,
            "ov",
            "0",
            "--format",
            "qcow2",
            "--backing-vol",
            "v1",
        ],
    );
    assert_eq!(o["backing"]["path"], path.as_str());
    assert_eq!(o["backing"]["format"], "raw");
    let info = ok_json(state, &["vol-info", "ov", "--pool", pool]);
    assert_eq!(info["capacity"], 8 << 20);
    ok_json(state, &["vol-snapshot-delete", "v1", "s1", "--pool", pool]);
    assert_eq!(
        ok_json(state, &["vol-snapshot-list", "v1", "--pool", pool]),
        serde_json::json!([])
    );
    ok_json(state, &["vol-delete", "ov", "--pool", pool]);
    ok_json(state, &["vol-delete", "v1", "--pool", pool]);
    assert_eq!(ok_json(state, &["vol-list", pool]), serde_json::json!([]));
}

#[test]
fn dir_pool_commands_round_trip_and_refuse_bad_input() {
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().display().to_string();
    let d = ok_json(state.path(), &["pool-define-as", "p1", "dir", &target]);
    assert_eq!(d["type"], "dir");
    assert!(state.path().join("pools/p1.json").is_file(), "persisted");
    let list = ok_json(state.path(), &["pool-list"]);
    assert_eq!(list[0]["name"], "p1");
    let info = ok_json(state.path(), &["pool-info", "p1"]);
    assert_eq!(info["capabilities"]["snapshots"], true);
    round_trip(state.path(), "p1");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing left"
    );

    // Bad input: a clear one-line error, exit 1, nothing created.
    for args in [
        &["vol-create-as", "p1", "../evil", "1M"][..],
        &["vol-create-as", "p1", "--", "-x", "1M"],
        &["vol-create-as", "p1", "v", "12Q"],
        &["vol-snapshot-create", "nope", "s", "--pool", "p1"],
        &["vol-snapshot-create", "v", "s", "--pool", "nope"],
        &["pool-define-as", "p2", "zfs", "/tmp"],
        &["pool-define-as", "p1", "dir", "/tmp"],
    ] {
        let o = vs(state.path(), args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(
            e.starts_with("virt-snap: error: ") && e.lines().count() == 1,
            "{e}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    ok_json(state.path(), &["pool-undefine", "p1"]);
    assert_eq!(ok_json(state.path(), &["pool-list"]), serde_json::json!([]));
}

#[test]
fn btrfs_pool_commands_round_trip() {
    let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let target = fs.mountpoint().display().to_string();
    ok_json(state.path(), &["pool-define-as", "b1", "btrfs", &target]);
    let info = ok_json(state.path(), &["pool-info", "b1"]);
    assert_eq!(info["capabilities"]["atomic-revert"], true);
    round_trip(state.path(), "b1");
    assert_eq!(std::fs::read_dir(fs.mountpoint()).unwrap().count(), 0);
}

#[test]
fn vol_snapshot_create_refuses_a_volume_a_running_qemu_holds() {
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().display().to_string();
    ok_json(state.path(), &["pool-define-as", "p1", "dir", &target]);
    for (name, fmt) in [("r1", "raw"), ("q1", "qcow2")] {
        ok_json(
            state.path(),
            &["vol-create-as", "p1", name, "4M", "--format", fmt],
        );
    }
    let qemu = Qemu::builder()
        .existing_disk("r1", DiskFormat::Raw, &dir.path().join("r1"))
        .existing_disk("q1", DiskFormat::Qcow2, &dir.path().join("q1"))
        .arg("-name")
        .arg("busy-vm")
        .spawn()
        .expect("start QEMU");
    for vol in ["r1", "q1"] {
        let o = vs(
            state.path(),
            &["vol-snapshot-create", vol, "s1", "--pool", "p1"],
        );
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(e.contains("in use by"), "{e}");
        assert!(e.contains("busy-vm"), "names the VM: {e}");
        assert_eq!(
            ok_json(state.path(), &["vol-snapshot-list", vol, "--pool", "p1"]),
            serde_json::json!([])
        );
    }
    drop(qemu);
    ok_json(
        state.path(),
        &["vol-snapshot-create", "r1", "s1", "--pool", "p1"],
    );
}

/// One bad entry in a pool directory (a symlink, a name that is not UTF-8) does not break
/// `vol-list` or `vol-snapshot-list`: stdout lists the good ones exactly as without it, stderr
/// names each bad entry on a `warning:` line; an operation on the bad entry fails.
#[test]
fn bad_entries_in_a_pool_are_named_on_stderr_and_the_rest_lists() {
    use std::os::unix::ffi::OsStrExt;
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().display().to_string();
    ok_json(state.path(), &["pool-define-as", "p", "dir", &target]);
    ok_json(state.path(), &["vol-create-as", "p", "v1", "1M"]);
    ok_json(
        state.path(),
        &["vol-snapshot-create", "v1", "s1", "--pool", "p"],
    );
    let clean_list = vs(state.path(), &["vol-list", "p"]);
    let clean_snaps = vs(state.path(), &["vol-snapshot-list", "v1", "--pool", "p"]);
    assert!(stderr(&clean_list).is_empty(), "{}", stderr(&clean_list));

    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("lnk")).unwrap();
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"v\xff1"));
    std::fs::write(&odd, b"x").unwrap();
    let sd = dir.path().join(".snapshots/v1");
    std::os::unix::fs::symlink("/etc/passwd", sd.join("slink")).unwrap();

    let o = vs(state.path(), &["vol-list", "p"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), stdout(&clean_list));
    let err = stderr(&o);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(err.contains("lnk is a symbolic link"), "{err}");
    assert!(
        err.contains("v\\xff1 has a name that is not UTF-8"),
        "{err}"
    );
    let j = ok_json(state.path(), &["vol-list", "p"]);
    assert_eq!(j.as_array().unwrap().len(), 1);

    let o = vs(state.path(), &["vol-snapshot-list", "v1", "--pool", "p"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), stdout(&clean_snaps));
    assert!(stderr(&o).contains("warning: ") && stderr(&o).contains("slink is a symbolic link"));

    let o = vs(state.path(), &["vol-info", "lnk", "--pool", "p"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
}
