//! A running domain's btrfs pool volume (raw) snapshotted by its backend
//! (`snapshot='storage'`) while the vCPUs are paused briefly, against real QEMU 10.0.2 on a
//! real btrfs (loop device): the snapshot holds exactly the bytes written through QEMU before
//! it, not those written after; it is also a volume snapshot of the pool.

use serde_json::json;
use std::io::Read;
use virt_snap::domain::DomainState;
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::snapshot::{CaptureRequest, DiskChoice, DiskRequest, SnapshotName};
use virt_snap::{Connection, Domain};

async fn write(dom: &Domain, pattern: u8) {
    let cmd = json!({
        "execute": "human-monitor-command",
        "arguments": {"command-line": format!(
            "qemu-io -d /machine/peripheral/vs-vda/virtio-backend \"write -P 0x{pattern:02x} 0 64k\""
        )}
    });
    let out = dom.monitor_command(&cmd.to_string()).await.unwrap();
    let text = out["return"].as_str().unwrap_or("?");
    assert!(text.is_empty() || text.contains("wrote 65536"), "{out}");
}

fn first_64k(p: &std::path::Path) -> Vec<u8> {
    let mut b = vec![0; 65536];
    std::fs::File::open(p).unwrap().read_exact(&mut b).unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_volume_of_a_running_domain_snapshotted_by_its_backend() {
    let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    let root = fs.mountpoint().join("pool");
    std::fs::create_dir(&root).unwrap();
    conn.define_pool(PoolDef {
        name: "bp".into(),
        kind: PoolKind::Btrfs,
        target: root.display().to_string(),
        thin_pool: None,
    })
    .unwrap();
    let pool = conn.pool("bp").unwrap();
    pool.create_volume(&VolumeSpec {
        name: "v1".into(),
        capacity: 4 << 20,
        format: VolFormat::Raw,
        backing: None,
    })
    .await
    .unwrap();
    let vdb = tmp.path().join("vdb.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", vdb.to_str().unwrap(), "16M"])
        .status()
        .unwrap();
    assert!(st.success());
    let vdb = format!(
        "<disk type='file'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='vdb' bus='virtio'/></disk>",
        vdb.display()
    );
    conn.define(&format!(
        "<domain type='kvm'><name>capbtrfs</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='volume'><driver name='qemu' type='raw'/><source pool='bp' volume='v1'/>\
         <target dev='vda' bus='virtio'/></disk>{vdb}\
         <controller type='usb' model='none'/></devices></domain>"
    ))
    .await
    .unwrap();
    let dom = conn.start_defined("capbtrfs", false).await.unwrap();
    let pid = dom.pid().unwrap().unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the QEMU this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _k = Kill(pid);

    write(&dom, 0xab).await;
    let mut r = CaptureRequest::new(SnapshotName::new("st1").unwrap());
    r.flags.disk_only = true;
    r.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    let res = dom.snapshot_create(r).await.expect("capture");
    let paused = res.paused.expect("paused for the backend snapshot");
    assert!(paused.as_millis() < 1000, "a brief pause: {paused:?}");
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
    write(&dom, 0xcd).await;

    let snaps = pool.volume("v1").snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].name, "st1", "also a volume snapshot of the pool");
    let file = root.join(".snapshots/v1/st1/volume.raw");
    assert_eq!(first_64k(&file), vec![0xab; 65536], "the bytes before it");
    let live = std::path::PathBuf::from(pool.volume("v1").path().await.unwrap());
    assert_eq!(first_64k(&live), vec![0xcd; 65536], "the volume runs on");
    let xml = res.xml.unwrap();
    assert!(xml.contains("snapshot='storage'"), "{xml}");
    assert!(
        xml.contains("vdb.st1"),
        "vdb external in the same pause: {xml}"
    );

    // The same plan failing at its transaction (QEMU refuses it: a wrong node name): the
    // backend snapshot taken before it in the same pause is deleted for the domain.
    // (The only test in this binary: the environment is its own.)
    std::env::set_var("VIRT_SNAP_FAILPOINT", "capture:transaction-bad-node");
    let mut r = CaptureRequest::new(SnapshotName::new("st2").unwrap());
    r.flags.disk_only = true;
    r.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    let e = dom.snapshot_create(r).await.unwrap_err();
    std::env::remove_var("VIRT_SNAP_FAILPOINT");
    assert!(e.to_string().contains("st2"), "{e}");
    let undo = format!("{e:?}");
    assert!(
        !undo.contains("undo_failures: [\""),
        "everything undone: {undo}"
    );
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
    let names: Vec<_> = pool
        .volume("v1")
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        ["st1"],
        "the backend snapshot of the failed capture is gone"
    );
    assert!(!tmp.path().join("vdb.st2").exists());
    assert!(!tmp.path().join("vdb.st1.st2").exists());
}
