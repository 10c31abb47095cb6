//! The QEMU component: a real QEMU 10.0.2 under KVM with -blockdev disks and a QMP socket.

use testbed::{DiskFormat, Qemu};

#[test]
fn qemu_starts_with_blockdev_disks_and_greets_on_qmp() {
    let mut qemu = Qemu::builder()
        .disk("disk0", DiskFormat::Qcow2, 64 << 20)
        .disk("disk1", DiskFormat::Raw, 16 << 20)
        .spawn()
        .expect("start QEMU");
    assert!(qemu.qmp_path().exists());
    assert_eq!(qemu.disks().len(), 2);
    let d0 = qemu.disk("disk0").path.clone();
    // A running QEMU holds its images with QEMU's byte-range locks: our disks are really open.
    assert_eq!(
        locking::qemu::probe(&d0).unwrap().bytes(),
        vec![100, 101, 103, 201, 203]
    );
    assert!(qemu.exited().is_none());
    let pid = qemu.pid();
    let dir = qemu.dir().to_path_buf();
    drop(qemu);
    // Gone: no process, no directory.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "QEMU {pid} still running"
    );
    assert!(!dir.exists());
}

#[test]
fn qemu_start_failure_reports_qemu_stderr() {
    let err = Qemu::builder()
        .arg("-device")
        .arg("no-such-device")
        .spawn()
        .unwrap_err();
    assert!(
        err.to_string().contains("no-such-device"),
        "error should carry QEMU's message: {err}"
    );
}

#[tokio::test]
async fn qemu_speaks_qmp() {
    let qemu = Qemu::builder()
        .disk("disk0", DiskFormat::Qcow2, 64 << 20)
        .spawn()
        .expect("start QEMU");
    let qmp = qemu.qmp().await.expect("QMP");
    let (major, minor, micro) = qmp.greeting().version;
    assert_eq!(format!("{major}.{minor}.{micro}"), testbed::QEMU_VERSION);
    let status = qmp.execute("query-status", None).await.unwrap();
    assert_eq!(status["status"], "running");
    let nodes = qmp.execute("query-named-block-nodes", None).await.unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        names.contains(&"disk0") && names.contains(&"disk0-file"),
        "{names:?}"
    );
}
