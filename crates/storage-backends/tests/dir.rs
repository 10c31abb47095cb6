//! dir pools on a real directory: raw (reflink or sparse copy) and qcow2 (internal) volume
//! snapshots, in-use refusal against a real QEMU, failure injection.

mod common;

use common::*;
use std::sync::Arc;
use storage_backends::*;

#[tokio::test]
async fn dir_pool_snapshot_overwrite_revert_reads_back_the_original_bytes() {
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let target = root.path().display().to_string();
    let pool = open(PoolKind::Dir, &target, local(), locks(state.path()));

    // raw: write, snapshot, overwrite, revert, read back.
    let v = pool
        .create_volume(&spec("v1", 8 << 20, VolFormat::Raw))
        .await
        .unwrap();
    assert_eq!((v.format, v.capacity), (VolFormat::Raw, 8 << 20));
    let p = std::path::PathBuf::from(&v.path);
    write_raw(&p, &[0, 5 << 20], b"original bytes");
    let s = pool
        .create_snapshot("v1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (s.kind, s.valid, s.size),
        (SnapshotKind::File, true, Some(8 << 20))
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((s.created.unwrap() - now).abs() < 60, "{s:?}");
    write_raw(&p, &[0, 5 << 20], b"OVERWRITTEN!!!");
    let e = pool
        .create_snapshot("v1", "s1", &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    pool.revert_snapshot("v1", "s1").await.unwrap();
    assert_eq!(read_raw(&p, 0, 14), b"original bytes");
    assert_eq!(read_raw(&p, 5 << 20, 14), b"original bytes");
    // The snapshot is kept; a second revert after another overwrite works too.
    write_raw(&p, &[0], b"again overwrit");
    pool.revert_snapshot("v1", "s1").await.unwrap();
    assert_eq!(read_raw(&p, 0, 14), b"original bytes");
    assert_eq!(pool.list_snapshots("v1").await.unwrap().len(), 1);

    // qcow2: internal snapshots; data through QEMU's block layer.
    let q = pool
        .create_volume(&spec("q1", 4 << 20, VolFormat::Qcow2))
        .await
        .unwrap();
    let qp = std::path::PathBuf::from(&q.path);
    qcow2_write(&qp, 0x11, 0, 65536);
    let s = pool
        .create_snapshot("q1", "before", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(s.kind, SnapshotKind::Qcow2Internal);
    qcow2_write(&qp, 0x22, 0, 65536);
    pool.revert_snapshot("q1", "before").await.unwrap();
    assert!(qcow2_read(&qp, 0, 65536).iter().all(|&b| b == 0x11));
    let list = pool.list_snapshots("q1").await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["before"]
    );
    // qemu-img (the oracle) sees a clean image with the snapshot.
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&qp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&qp)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("before"),
        "{out:?}"
    );

    // A qcow2 overlay on a backing volume records the backing format.
    let o = pool
        .create_volume(&VolumeSpec {
            name: "o1".into(),
            capacity: 0,
            format: VolFormat::Qcow2,
            backing: Some(Backing {
                path: v.path.clone(),
                format: VolFormat::Raw,
            }),
        })
        .await
        .unwrap();
    assert_eq!(
        o.backing,
        Some(Backing {
            path: v.path.clone(),
            format: VolFormat::Raw
        })
    );
    assert_eq!(o.capacity, 8 << 20);
    assert_eq!(
        qcow2_read(std::path::Path::new(&o.path), 0, 14),
        b"original bytes"
    );
    let e = pool
        .create_volume(&VolumeSpec {
            name: "r2".into(),
            capacity: 0,
            format: VolFormat::Raw,
            backing: Some(Backing {
                path: v.path.clone(),
                format: VolFormat::Raw,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);

    // Bad names are refused and create nothing.
    for bad in ["../x", "a/b", "-x", ".snapshots", ""] {
        let e = pool
            .create_volume(&spec(bad, 1 << 20, VolFormat::Raw))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
        let e = pool
            .create_snapshot("v1", bad, &SnapshotOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    assert_eq!(
        pool.list_volumes()
            .await
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["o1", "q1", "v1"]
    );
    let e = pool.revert_snapshot("v1", "nope").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // Delete leaves nothing behind.
    pool.delete_snapshot("v1", "s1").await.unwrap();
    assert!(pool.list_snapshots("v1").await.unwrap().is_empty());
    pool.create_snapshot("v1", "s2", &SnapshotOptions::default())
        .await
        .unwrap();
    for n in ["o1", "q1", "v1"] {
        pool.delete_volume(n).await.unwrap();
    }
    assert_eq!(tree(root.path()), Vec::<String>::new());
    assert_eq!(
        pool.volume("v1").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn dir_pool_refuses_volumes_a_running_qemu_holds() {
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let pool = open(
        PoolKind::Dir,
        &root.path().display().to_string(),
        local(),
        locks(state.path()),
    );
    let raw = pool
        .create_volume(&spec("raw1", 4 << 20, VolFormat::Raw))
        .await
        .unwrap();
    let q = pool
        .create_volume(&spec("q1", 4 << 20, VolFormat::Qcow2))
        .await
        .unwrap();
    pool.create_snapshot("raw1", "s0", &SnapshotOptions::default())
        .await
        .unwrap();
    let qemu = testbed::Qemu::builder()
        .existing_disk(
            "raw1",
            testbed::DiskFormat::Raw,
            std::path::Path::new(&raw.path),
        )
        .existing_disk(
            "q1",
            testbed::DiskFormat::Qcow2,
            std::path::Path::new(&q.path),
        )
        .spawn()
        .expect("QEMU 10.0.2 (cargo xtask deps)");
    for vol in ["raw1", "q1"] {
        let e = pool
            .create_snapshot(vol, "s1", &SnapshotOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(e.to_string().contains("in use by"), "{e}");
        assert!(e.to_string().contains("qemu"), "{e}");
    }
    let e = pool.revert_snapshot("raw1", "s0").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    let e = pool.delete_volume("raw1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(std::path::Path::new(&raw.path).exists());
    drop(qemu);
    // A VM holding the lease (virt-snap's own record) is named.
    let lm = locks(state.path());
    let _vm = lm
        .acquire(&locking::Purpose::VmStart {
            domain: "vm1".into(),
            disks: vec![locking::DiskUse::writable(locking::Resource::file(&q.path))],
        })
        .unwrap();
    let e = pool
        .create_snapshot("q1", "s1", &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("in use by domain \"vm1\""), "{e}");
    drop(_vm);
    pool.create_snapshot("q1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_step_failing_halfway_leaves_the_dir_pool_as_it_was() {
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let pool = open(
        PoolKind::Dir,
        &root.path().display().to_string(),
        Arc::new(RecordingRunner::new()),
        locks(state.path()),
    );
    let v = pool
        .create_volume(&spec("v1", 4 << 20, VolFormat::Raw))
        .await
        .unwrap();
    write_raw(std::path::Path::new(&v.path), &[0], b"current data");
    // A damaged snapshot (a directory where the file should be): the revert fails after
    // making its temporary copy, which is removed; the volume is untouched.
    std::fs::create_dir_all(root.path().join(".snapshots/v1/bad/x")).unwrap();
    let before = tree(root.path());
    let e = pool.revert_snapshot("v1", "bad").await.unwrap_err();
    assert!(
        e.kind() == ErrorKind::Io || e.kind() == ErrorKind::InvalidInput,
        "{e}"
    );
    assert_eq!(tree(root.path()), before, "no temporaries left");
    assert_eq!(
        read_raw(std::path::Path::new(&v.path), 0, 12),
        b"current data"
    );
    std::fs::remove_dir_all(root.path().join(".snapshots")).unwrap();

    // A qcow2 overlay whose backing volume is missing: nothing is created.
    let e = pool
        .create_volume(&VolumeSpec {
            name: "o1".into(),
            capacity: 0,
            format: VolFormat::Qcow2,
            backing: Some(Backing {
                path: root.path().join("gone").display().to_string(),
                format: VolFormat::Raw,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(tree(root.path()), vec!["v1".to_string()]);
}
