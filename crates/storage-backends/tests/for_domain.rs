//! Acting for a running domain, with a real QEMU 10.0.2 holding the volume: the VM start's
//! lease (taken on the volume's lease resource, the key every volume operation takes) is
//! handed to QEMU over QMP (`getfd`), QEMU writes the disk, a plain volume operation is
//! refused naming the domain, and the domain path snapshots the paused VM's volume: a reflink
//! in a dir pool on btrfs, a subvolume snapshot in a btrfs pool. The snapshot holds the bytes
//! QEMU wrote; a wrong domain or pid is refused; operations on one domain never overlap.

#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use storage_backends::*;

/// A QEMU holding `path` (raw) through the VmStart lease of domain "vm1", handed to it.
async fn start_vm(
    lm: &locking::LockManager,
    res: locking::Resource,
    path: &Path,
) -> (testbed::Qemu, qmp_proto::QmpClient) {
    let lease = lm
        .acquire(&locking::Purpose::VmStart {
            domain: "vm1".into(),
            disks: vec![locking::DiskUse::writable(res)],
        })
        .unwrap();
    let qemu = testbed::Qemu::builder()
        .existing_disk("d0", testbed::DiskFormat::Raw, path)
        .spawn()
        .expect("QEMU (cargo xtask deps)");
    let qmp = qemu.qmp().await.unwrap();
    for (i, fd) in lease.lock_fds().into_iter().enumerate() {
        qmp.getfd(&format!("vs-lease-{i}"), fd).await.unwrap();
    }
    lease.hand_over(qemu.pid()).unwrap();
    (qemu, qmp)
}

/// Write `pattern` over the first 64 KiB of the disk through QEMU's block layer (the
/// virtio-blk device's backend), as the guest would.
async fn qemu_write(qmp: &qmp_proto::QmpClient, pattern: u8) {
    let out = qmp
        .execute(
            "human-monitor-command",
            Some(json!({
                "command-line": format!("qemu-io -d /machine/peripheral/d0-dev/virtio-backend \"write -P 0x{pattern:02x} 0 64k\"")
            })),
        )
        .await
        .unwrap();
    // HMP answers "" on success (qemu-io's report goes to QEMU's stdout), an error text
    // otherwise; the bytes are checked by reading the files back.
    let text = out.as_str().unwrap_or("?");
    assert!(text.is_empty() || text.contains("wrote 65536"), "{out}");
}

fn source_kind(e: &Error) -> Option<locking::ErrorKind> {
    std::error::Error::source(e)?
        .downcast_ref::<locking::Error>()
        .map(|l| l.kind())
}

/// The whole scenario on `pool`'s raw volume `v1`; `snap_file` names the snapshot's file.
async fn scenario(
    pool: &dyn Backend,
    lm: &locking::LockManager,
    snap_file: impl Fn(&str) -> PathBuf,
) {
    let v = pool
        .create_volume(&spec("v1", 4 << 20, VolFormat::Raw))
        .await
        .unwrap();
    let res = pool.lease_resource("v1").await.unwrap();
    // The VM start takes exactly the key the volume operations take.
    assert_eq!(
        String::from_utf8_lossy(res.key().unwrap().canonical()),
        v.key
    );
    let path = PathBuf::from(&v.path);
    let (qemu, qmp) = start_vm(lm, res.clone(), &path).await;
    let me = DomainRef {
        domain: "vm1".into(),
        qemu_pid: qemu.pid(),
    };
    qemu_write(&qmp, 0xab).await;

    // Anyone else is refused as before: the plain operation names the domain.
    let e = pool
        .create_snapshot("v1", "plain", &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("in use by domain \"vm1\""), "{e}");

    qmp.execute("stop", None).await.unwrap();
    let s = pool
        .create_snapshot_for_domain("v1", "live", &me, &SnapshotOptions::default())
        .await
        .unwrap();
    qmp.execute("cont", None).await.unwrap();
    assert!(pool.capabilities().open_volume_snapshots.contains(&s.kind));
    let snap = snap_file("live");
    assert_eq!(read_raw(&snap, 0, 65536), vec![0xab; 65536]);
    assert_eq!(read_raw(&snap, 65536, 4096), vec![0; 4096]);
    let names: Vec<String> = pool
        .list_snapshots("v1")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["live"]);

    // A later write through QEMU changes the volume, not the snapshot.
    qemu_write(&qmp, 0xcd).await;
    qmp.execute("stop", None).await.unwrap(); // flushes QEMU's writes to the file
    assert_eq!(read_raw(&path, 0, 65536), vec![0xcd; 65536]);
    assert_eq!(read_raw(&snap, 0, 65536), vec![0xab; 65536]);

    // A wrong domain name or pid is not the holder.
    for d in [
        DomainRef {
            domain: "vm2".into(),
            qemu_pid: qemu.pid(),
        },
        DomainRef {
            domain: "vm1".into(),
            qemu_pid: std::process::id(),
        },
    ] {
        let e = pool
            .create_snapshot_for_domain("v1", "x", &d, &SnapshotOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert_eq!(source_kind(&e), Some(locking::ErrorKind::NotHolder), "{e}");
        assert!(e.to_string().contains("is not held by domain"), "{e}");
    }

    // Two operations on one domain never run at once: while one holds the domain's
    // operation lock, a second is refused as busy (and takes nothing).
    let first = lm
        .acquire(&locking::Purpose::ForDomain {
            domain: "vm1".into(),
            qemu_pid: qemu.pid(),
            op: "snapshot create".into(),
            volumes: vec![res.clone()],
        })
        .unwrap();
    let e = pool
        .create_snapshot_for_domain("v1", "second", &me, &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("domain \"vm1\" is busy"), "{e}");
    drop(first);
    let again = pool
        .create_snapshot_for_domain("v1", "second", &me, &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(again.name, "second");
    assert_eq!(read_raw(&snap_file("second"), 0, 65536), vec![0xcd; 65536]);
    qmp.execute("cont", None).await.unwrap();
    assert!(qemu_alive(&qemu));

    // Once QEMU is gone, its lease went with it: plain operations work again.
    drop(qmp);
    drop(qemu);
    pool.create_snapshot("v1", "after", &SnapshotOptions::default())
        .await
        .unwrap();
}

fn qemu_alive(q: &testbed::Qemu) -> bool {
    Path::new(&format!("/proc/{}", q.pid())).exists()
}

#[tokio::test]
async fn dir_pool_on_btrfs_reflinks_an_open_volume_for_its_domain() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let root = fs.mountpoint().join("dirpool");
    std::fs::create_dir(&root).unwrap();
    let lm = locks(state.path());
    let pool = open(
        PoolKind::Dir,
        &root.display().to_string(),
        local(),
        lm.clone(),
    );
    let caps = pool.info().await.unwrap().capabilities;
    assert_eq!(caps.open_volume_snapshots, &[SnapshotKind::File]);
    scenario(pool.as_ref(), &lm, |s| root.join(".snapshots/v1").join(s)).await;
}

#[tokio::test]
async fn btrfs_pool_snapshots_an_open_volume_for_its_domain() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let root = fs.mountpoint().join("pool");
    std::fs::create_dir(&root).unwrap();
    let lm = locks(state.path());
    let pool = open(
        PoolKind::Btrfs,
        &root.display().to_string(),
        local(),
        lm.clone(),
    );
    assert_eq!(
        pool.capabilities().open_volume_snapshots,
        &[SnapshotKind::BtrfsSubvolume]
    );
    scenario(pool.as_ref(), &lm, |s| {
        root.join(".snapshots/v1").join(s).join("volume.raw")
    })
    .await;
}

/// Without reflink (a full copy would stretch the guest's pause) and for qcow2 (internal
/// snapshots go through QMP), the domain path refuses before writing anything. The domain's
/// lease is held by this process here (no QEMU needed to reach the refusals).
#[tokio::test]
async fn no_reflink_and_qcow2_are_refused_for_a_domain() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let lm = locks(state.path());
    let target = dir.path().display().to_string();
    let pool = open(PoolKind::Dir, &target, local(), lm.clone());
    pool.create_volume(&spec("r", 1 << 20, VolFormat::Raw))
        .await
        .unwrap();
    pool.create_volume(&spec("q", 1 << 20, VolFormat::Qcow2))
        .await
        .unwrap();
    let me = DomainRef {
        domain: "vm1".into(),
        qemu_pid: std::process::id(),
    };
    let e = pool
        .create_snapshot_for_domain("q", "s", &me, &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert!(e.to_string().contains("through QEMU (QMP)"), "{e}");

    let reflinks = pool
        .info()
        .await
        .unwrap()
        .capabilities
        .space_efficient_snapshots;
    let vm = lm
        .acquire(&locking::Purpose::VmStart {
            domain: "vm1".into(),
            disks: vec![locking::DiskUse::writable(
                pool.lease_resource("r").await.unwrap(),
            )],
        })
        .unwrap();
    let r = pool
        .create_snapshot_for_domain("r", "s", &me, &SnapshotOptions::default())
        .await;
    if reflinks {
        eprintln!("{target} reflinks: the refusal is not reachable here");
        r.unwrap();
        return;
    }
    assert!(pool
        .info()
        .await
        .unwrap()
        .capabilities
        .open_volume_snapshots
        .is_empty());
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert!(e.to_string().contains("cannot clone (reflink)"), "{e}");
    // Nothing left behind: no snapshot, no temporary, no snapshot directory.
    assert!(!dir.path().join(".snapshots").exists());
    drop(vm);
    assert!(pool.list_snapshots("r").await.unwrap().is_empty());
}
