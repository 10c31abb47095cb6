//! Real LVM, inside the LVM test guest: the backend's commands run there through the guest
//! agent (QgaRunner); data is written and read back with `dd` in the guest. One guest boot
//! for every section.

mod common;

use common::QgaRunner;
use std::sync::Arc;
use storage_backends::*;

const LV_FIELDS: &str = "lv_name,lv_uuid,lv_attr,lv_size,lv_tags";

fn pool(
    guest: &testbed::TestGuest,
    thin: Option<&str>,
    runner: Arc<dyn CommandRunner>,
    state: &std::path::Path,
) -> Box<dyn Backend> {
    let _ = guest;
    open_pool(
        PoolDef {
            name: "lv".into(),
            kind: PoolKind::Logical,
            target: "vg0".into(),
            thin_pool: thin.map(String::from),
        },
        runner,
        locking::LockManager::local(state.join("locks")).unwrap(),
    )
    .unwrap()
}

/// Fill the first 256 KiB of `lv` with fresh random data; returns its md5.
async fn write_random(g: &testbed::TestGuest, lv: &str) -> String {
    g.sh(&format!(
        "dd if=/dev/urandom of=/tmp/d bs=64k count=4 2>/dev/null && \
         dd if=/tmp/d of=/dev/vg0/{lv} bs=64k conv=fsync 2>/dev/null && md5sum < /tmp/d"
    ))
    .await
    .unwrap()
}

async fn read_md5(g: &testbed::TestGuest, lv: &str) -> String {
    g.sh(&format!(
        "dd if=/dev/vg0/{lv} bs=64k count=4 2>/dev/null | md5sum"
    ))
    .await
    .unwrap()
}

async fn lvs(g: &testbed::TestGuest) -> String {
    g.exec_ok(&["lvs", "--noheadings", "-o", LV_FIELDS, "vg0"])
        .await
        .unwrap()
}

#[tokio::test]
async fn lvm_thin_and_cow_snapshots_in_the_test_guest() {
    let g = testbed::TestGuest::builder()
        .raw_disk("pv", 384 << 20)
        .start()
        .await
        .expect("test guest (cargo xtask guest-image)");
    g.sh(
        "lvm pvcreate -q /dev/vdb && lvm vgcreate -q vg0 /dev/vdb && \
          lvm lvcreate -q -y -n tp -L 96m --type thin-pool vg0",
    )
    .await
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let qga: Arc<dyn CommandRunner> = Arc::new(QgaRunner::new(g.qga_path()));
    let rec = Arc::new(RecordingRunner::wrapping(qga.clone()));

    // --- thin: snapshot, overwrite, revert, read back; the snapshot is kept.
    let thin = pool(&g, Some("tp"), rec.clone(), state.path());
    assert!(thin.capabilities().thin);
    let v = thin
        .create_volume(&VolumeSpec {
            name: "t1".into(),
            capacity: 16 << 20,
            format: VolFormat::Raw,
            backing: None,
        })
        .await
        .unwrap();
    assert_eq!((v.path.as_str(), v.capacity), ("/dev/vg0/t1", 16 << 20));
    let orig = write_random(&g, "t1").await;
    let s = thin
        .create_snapshot("t1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!((s.kind, s.valid), (SnapshotKind::LvmThin, true));
    let changed = write_random(&g, "t1").await;
    assert_ne!(orig, changed);

    // Failure injected at the second rename of the revert: everything is undone.
    let before = lvs(&g).await;
    rec.fail_once(
        &["lvrename", "-q", "vg0", "t1.vs-revert"],
        "injected failure",
    );
    let e = thin.revert_snapshot("t1", "s1").await.unwrap_err();
    assert!(e.not_undone().is_empty(), "{e}");
    assert_eq!(lvs(&g).await, before, "the pool is as it was");
    assert_eq!(read_md5(&g, "t1").await, changed);

    thin.revert_snapshot("t1", "s1").await.unwrap();
    assert_eq!(
        read_md5(&g, "t1").await,
        orig,
        "reverted to the snapshot's bytes"
    );
    let list = thin.list_snapshots("t1").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].valid), ("s1", true));
    // The reverted volume is writable and can be reverted again.
    write_random(&g, "t1").await;
    thin.revert_snapshot("t1", "s1").await.unwrap();
    assert_eq!(read_md5(&g, "t1").await, orig);

    // In use: a VM holding the LV's lease (its lease resource, `vg0/t1`).
    let vol = thin.volume("t1").await.unwrap();
    assert_eq!(vol.key, "lvm:vg0/t1");
    let lm = locking::LockManager::local(state.path().join("locks")).unwrap();
    let vm = lm
        .acquire(&locking::Purpose::VmStart {
            domain: "vm1".into(),
            disks: vec![locking::DiskUse::writable(
                thin.lease_resource("t1").await.unwrap(),
            )],
        })
        .unwrap();
    let e = thin
        .create_snapshot("t1", "s2", &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("in use by domain \"vm1\""), "{e}");
    assert_eq!(
        thin.revert_snapshot("t1", "s1").await.unwrap_err().kind(),
        ErrorKind::InUse
    );
    drop(vm);

    // --- classic COW on a linear volume: revert merges and re-takes the snapshot.
    let lin = pool(&g, None, qga.clone(), state.path());
    lin.create_volume(&VolumeSpec {
        name: "c1".into(),
        capacity: 16 << 20,
        format: VolFormat::Raw,
        backing: None,
    })
    .await
    .unwrap();
    let orig = write_random(&g, "c1").await;
    let s = lin
        .create_snapshot("c1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!((s.kind, s.size), (SnapshotKind::LvmCow, Some(16 << 20)));
    write_random(&g, "c1").await;
    lin.revert_snapshot("c1", "s1").await.unwrap();
    assert_eq!(read_md5(&g, "c1").await, orig);
    let list = lin.list_snapshots("c1").await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0].name.as_str(), list[0].valid, list[0].size),
        ("s1", true, Some(16 << 20))
    );
    // The re-taken snapshot still holds the original bytes: revert once more after a write.
    write_random(&g, "c1").await;
    lin.revert_snapshot("c1", "s1").await.unwrap();
    assert_eq!(read_md5(&g, "c1").await, orig);

    // A small COW snapshot overflows: listed invalid, refused as a revert target.
    lin.create_snapshot(
        "c1",
        "small",
        &SnapshotOptions {
            size: Some(4 << 20),
        },
    )
    .await
    .unwrap();
    g.sh("dd if=/dev/urandom of=/dev/vg0/c1 bs=1M count=8 conv=fsync 2>/dev/null")
        .await
        .unwrap();
    let list = lin.list_snapshots("c1").await.unwrap();
    let small = list.iter().find(|s| s.name == "small").unwrap();
    assert!(!small.valid, "{list:?}");
    let e = lin.revert_snapshot("c1", "small").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSnapshot, "{e}");
    assert!(list.iter().find(|s| s.name == "s1").unwrap().valid);

    // Not enough space is a typed error.
    let e = lin
        .create_volume(&VolumeSpec {
            name: "huge".into(),
            capacity: 4 << 30,
            format: VolFormat::Raw,
            backing: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert!(
        e.stderr().unwrap().contains("insufficient free space"),
        "{e}"
    );
    let e = lin.volume("nope").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);

    // --- delete leaves nothing behind (snapshots first, then the volume).
    thin.delete_snapshot("t1", "s1").await.unwrap();
    assert!(thin.list_snapshots("t1").await.unwrap().is_empty());
    thin.create_snapshot("t1", "s3", &SnapshotOptions::default())
        .await
        .unwrap();
    thin.delete_volume("t1").await.unwrap();
    lin.delete_volume("c1").await.unwrap();
    let left: Vec<String> = lvs(&g)
        .await
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    assert_eq!(left, ["tp"]);
    assert!(lin.list_volumes().await.unwrap().is_empty());
}
