//! `virt-snap image locks` on the real binary, against a real QEMU and a real lease holder.

use locking::{LockManager, Purpose, Resource};
use testbed::{DiskFormat, Qemu};
use virt_snap_e2e::{run, stderr, stdout, virt_snap};

fn locks_json(state: &std::path::Path, file: &std::path::Path) -> serde_json::Value {
    let o = run(virt_snap()
        .args(["image", "locks", "--output", "json", "--state-dir"])
        .arg(state)
        .arg(file));
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("one JSON document")
}

#[test]
fn image_locks_shows_a_running_qemus_permissions() {
    let state = tempfile::tempdir().unwrap();
    let qemu = Qemu::builder()
        .disk("d0", DiskFormat::Qcow2, 32 << 20)
        .arg("-name")
        .arg("e2e-vm")
        .spawn()
        .expect("start QEMU");
    let d0 = std::fs::canonicalize(&qemu.disk("d0").path).unwrap();
    let v = locks_json(state.path(), &d0);
    assert_eq!(v["image"], d0.display().to_string());
    assert_eq!(v["in-use"], true);
    assert_eq!(
        v["held"],
        serde_json::json!(["consistent-read", "write", "resize"])
    );
    assert_eq!(v["unshared"], serde_json::json!(["write", "resize"]));
    assert_eq!(v["bytes"], serde_json::json!([100, 101, 103, 201, 203]));
    assert_eq!(v["holders"], serde_json::json!([]), "QEMU took no lease");
    assert_eq!(v["processes"][0]["pid"], qemu.pid());
    assert_eq!(v["processes"][0]["command"], "qemu-system-x86");
    assert_eq!(v["processes"][0]["guest"], "e2e-vm");

    let o = run(virt_snap()
        .args(["image", "locks", "--state-dir"])
        .arg(state.path())
        .arg(&d0));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("in use: yes\n"), "{text}");
    assert!(
        text.contains(
            "qemu permissions held: consistent read, write, resize (bytes 100, 101, 103)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("qemu permissions not shared: write, resize (bytes 201, 203)\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "process: qemu-system-x86 (pid {}, guest \"e2e-vm\") (bytes 100, 101, 103, 201, 203)\n",
            qemu.pid()
        )),
        "{text}"
    );
}

#[test]
fn image_locks_names_the_virt_snap_holder() {
    let state = tempfile::tempdir().unwrap();
    let img = state.path().join("v.img");
    std::fs::write(&img, vec![0u8; 1 << 16]).unwrap();
    let v = locks_json(state.path(), &img);
    assert_eq!(v["in-use"], false);
    assert_eq!(v["bytes"], serde_json::json!([]));

    let locks = LockManager::for_state_dir(state.path()).unwrap();
    let held = locks
        .acquire(&Purpose::VolumeOp {
            op: "snapshot revert".into(),
            volumes: vec![Resource::file(&img)],
        })
        .unwrap();
    let v = locks_json(state.path(), &img);
    assert_eq!(v["in-use"], true);
    assert_eq!(
        v["bytes"],
        serde_json::json!([100, 101, 103, 201, 202, 203])
    );
    let h = &v["holders"][0];
    assert_eq!(h["holder"]["kind"], "operation");
    assert_eq!(h["holder"]["name"], "snapshot revert");
    assert_eq!(h["mode"], "exclusive");
    assert_eq!(h["pid"], std::process::id());
    let o = run(virt_snap()
        .args(["image", "locks", "--state-dir"])
        .arg(state.path())
        .arg(&img));
    let text = stdout(&o);
    assert!(
        text.contains(&format!(
            "holder: exclusive operation \"snapshot revert\" (pid {}, since ",
            std::process::id()
        )),
        "{text}"
    );
    // `image info` reads the header without any lock, while we hold the image.
    let o = run(virt_snap().args(["image", "info"]).arg(&img));
    assert!(o.status.success(), "{}", stderr(&o));
    drop(held);
    assert_eq!(locks_json(state.path(), &img)["in-use"], false);

    // --lockspace: another lockspace directory than <state dir>/locks.
    let other = state.path().join("elsewhere");
    let held = LockManager::local(&other)
        .unwrap()
        .acquire(&Purpose::VolumeOp {
            op: "resize".into(),
            volumes: vec![Resource::file(&img)],
        })
        .unwrap();
    let o = run(virt_snap()
        .args(["image", "locks", "-o", "json", "--lockspace"])
        .arg(&other)
        .arg(&img));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["holders"][0]["holder"]["name"], "resize");
    assert!(v["lease-file"]
        .as_str()
        .unwrap()
        .starts_with(other.to_str().unwrap()));
    drop(held);

    let o = run(virt_snap()
        .args(["image", "locks", "--state-dir"])
        .arg(state.path())
        .arg(state.path().join("missing.qcow2")));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.qcow2"), "{}", stderr(&o));
}
