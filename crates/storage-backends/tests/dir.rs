//! dir pools on a real directory: raw (reflink or sparse copy) and qcow2 (internal) volume
//! snapshots, in-use refusal against a real QEMU, failure injection.

// Each test runs on its own current-thread runtime: holding `serial()` across awaits blocks
// nothing but the other tests, which is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use std::sync::Arc;
use storage_backends::*;

#[tokio::test]
async fn dir_pool_snapshot_overwrite_revert_reads_back_the_original_bytes() {
    let _serial = serial();
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
        Some(VolumeBacking {
            path: v.path.clone(),
            format: Some(VolFormat::Raw)
        })
    );
    // An overlay whose header records no backing format shows the format as unknown, never
    // as raw (formats are recorded, never guessed).
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(root.path().join("nofmt"))
            .unwrap();
        let st = image_formats::FileStorage::from_file(f);
        image_formats::qcow2_write::create(
            &st,
            &image_formats::qcow2_write::CreateOptions {
                size: 1 << 20,
                backing_file: Some(v.path.clone().into_bytes()),
                backing_format: None,
            },
        )
        .unwrap();
    }
    let n = pool.volume("nofmt").await.unwrap();
    let b = n.backing.clone().unwrap();
    assert_eq!((b.path.as_str(), b.format), (v.path.as_str(), None));
    assert_eq!(b.format_str(), "unknown");
    assert_eq!(
        serde_json::to_value(&n).unwrap()["backing"]["format"],
        serde_json::Value::Null
    );
    pool.delete_volume("nofmt").await.unwrap();
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
    let _serial = serial();
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
    let _serial = serial();
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

/// The child side of the crash and umask tests (see `common::run_child`).
#[tokio::test]
async fn child() {
    child_main().await;
}

fn dir_pool(root: &std::path::Path, state: &std::path::Path) -> Box<dyn Backend> {
    open(
        PoolKind::Dir,
        &root.display().to_string(),
        local(),
        locks(state),
    )
}

/// A pool with raw volume v1 ("AAAA..." at 0), snapshot s1, then "BBBB..." written; and a
/// qcow2 volume q1 with snapshot qs.
async fn populated(pool: &dyn Backend) -> std::path::PathBuf {
    let v = pool
        .create_volume(&spec("v1", 4 << 20, VolFormat::Raw))
        .await
        .unwrap();
    let p = std::path::PathBuf::from(&v.path);
    write_raw(&p, &[0, 3 << 20], &[b'A'; 4096]);
    pool.create_snapshot("v1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    write_raw(&p, &[0, 3 << 20], &[b'B'; 4096]);
    pool.create_volume(&spec("q1", 1 << 20, VolFormat::Qcow2))
        .await
        .unwrap();
    pool.create_snapshot("q1", "qs", &SnapshotOptions::default())
        .await
        .unwrap();
    p
}

/// Every operation, each one's outcome (errors as text).
async fn every_operation(pool: &dyn Backend) -> Vec<String> {
    let o = SnapshotOptions::default();
    let r = |r: Result<(), Error>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{:?}: {e}", e.kind()),
    };
    // A listing succeeds with the good entries; its rejected ones show as errors here.
    let l = |r: Result<Vec<RejectedEntry>, Error>| match r {
        Ok(rej) if rej.is_empty() => "ok".to_string(),
        Ok(rej) => rej
            .iter()
            .map(|x| format!("{:?}: {}", x.error.kind(), x.error))
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("{:?}: {e}", e.kind()),
    };
    vec![
        l(pool.volume_listing().await.map(|x| x.rejected)),
        r(pool.volume("v1").await.map(|_| ())),
        l(pool.snapshot_listing("v1").await.map(|x| x.rejected)),
        r(pool.create_snapshot("v1", "new", &o).await.map(|_| ())),
        r(pool.revert_snapshot("v1", "s1").await),
        r(pool.delete_snapshot("v1", "s1").await),
        r(pool
            .create_volume(&spec("fresh", 1 << 20, VolFormat::Raw))
            .await
            .map(|_| ())),
        r(pool.delete_volume("v1").await),
        r(pool.info().await.map(|_| ())),
    ]
}

#[tokio::test]
async fn symlinks_at_every_level_of_a_dir_pool_are_reported_never_followed() {
    let _serial = serial();
    for level in [
        ".snapshots",
        ".snapshots/v1",
        "v1",
        ".snapshots/v1/s1",
        "pool",
    ] {
        let state = tempfile::tempdir().unwrap();
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("pool");
        std::fs::create_dir(&root).unwrap();
        let pool = dir_pool(&root, state.path());
        populated(pool.as_ref()).await;
        // OTHER mirrors what the symlink replaces, with different bytes.
        let other = tempfile::tempdir().unwrap();
        let real = if level == "pool" {
            root.clone()
        } else {
            root.join(level)
        };
        let o = other.path().join("x");
        if real.is_dir() {
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&real)
                .arg(&o)
                .status()
                .unwrap();
            std::fs::remove_dir_all(&real).unwrap();
        } else {
            std::fs::copy(&real, &o).unwrap();
            std::fs::remove_file(&real).unwrap();
        }
        for f in walk_files(other.path()) {
            std::fs::write(&f, b"outside, must stay").unwrap();
        }
        std::os::unix::fs::symlink(&o, &real).unwrap();
        let before = tree_with_contents(other.path());
        let pool = if level == "pool" {
            let e = storage_backends::open_pool(
                PoolDef {
                    name: "p".into(),
                    kind: PoolKind::Dir,
                    target: root.display().to_string(),
                    thin_pool: None,
                },
                local(),
                locks(state.path()),
            )
            .unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
            assert_eq!(tree_with_contents(other.path()), before);
            continue;
        } else {
            dir_pool(&root, state.path())
        };
        let out = every_operation(pool.as_ref()).await;
        assert_eq!(
            tree_with_contents(other.path()),
            before,
            "{level}: {out:#?}"
        );
        // Each operation that reaches the link says so; none succeeds through it.
        let link_ops: Vec<&String> = out.iter().filter(|s| s.contains("symbolic link")).collect();
        assert!(!link_ops.is_empty(), "{level}: {out:#?}");
        for s in &link_ops {
            assert!(s.starts_with("InvalidInput"), "{level}: {s}");
        }
        // The link itself is still there (reported, not used or removed).
        assert!(
            std::fs::symlink_metadata(&real).is_ok_and(|m| m.file_type().is_symlink()),
            "{level}: {out:#?}"
        );
        // The revert and the volume's delete never succeed through a link.
        assert_ne!(out[4], "ok", "{level}: {out:#?}");
        assert_ne!(out[7], "ok", "{level}: {out:#?}");
    }
}

fn walk_files(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    tree(d)
        .into_iter()
        .map(|p| d.join(p))
        .filter(|p| p.is_file())
        .collect()
}

#[tokio::test]
async fn every_file_a_dir_pool_creates_is_private_under_umask_022_and_077() {
    let _serial = serial();
    for umask in [0o022, 0o077] {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for op in [
            &["create-raw", "v1", "1048576"][..],
            &["create-qcow2", "q1", "1048576"],
            &["snapshot", "v1", "s1"],
            &["snapshot", "q1", "qs"],
            &["revert", "v1", "s1"],
        ] {
            assert!(
                run_child(PoolKind::Dir, r, state.path(), op, None, Some(umask)),
                "{op:?}"
            );
        }
        assert_eq!(mode(&r.join("v1")), 0o600, "umask {umask:o}");
        assert_eq!(mode(&r.join("q1")), 0o600);
        assert_eq!(mode(&r.join(".snapshots")), 0o700);
        assert_eq!(mode(&r.join(".snapshots/v1")), 0o700);
        assert_eq!(mode(&r.join(".snapshots/v1/s1")), 0o400);
        // A volume the user opened up to its group: the snapshot keeps the group's read
        // bit, never anything for others; a revert keeps the volume's mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join("v1"), std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(run_child(
            PoolKind::Dir,
            r,
            state.path(),
            &["snapshot", "v1", "s2"],
            None,
            Some(umask)
        ));
        assert_eq!(mode(&r.join(".snapshots/v1/s2")), 0o440);
        assert!(run_child(
            PoolKind::Dir,
            r,
            state.path(),
            &["revert", "v1", "s1"],
            None,
            Some(umask)
        ));
        assert_eq!(mode(&r.join("v1")), 0o664);
    }
}

#[tokio::test]
async fn a_killed_dir_pool_operation_leaves_a_leftover_the_next_one_removes() {
    let _serial = serial();
    for (fp, op, after) in [
        ("dir-snapshot-cloned", &["snapshot", "v1", "s2"][..], b'B'),
        ("dir-snapshot-linked", &["snapshot", "v1", "s2"], b'B'),
        ("dir-revert-cloned", &["revert", "v1", "s1"], b'B'),
        ("dir-revert-renamed", &["revert", "v1", "s1"], b'A'),
        ("dir-delete-snapshots-gone", &["delete", "v1"], b'B'),
    ] {
        let state = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let pool = dir_pool(root.path(), state.path());
        let p = populated(pool.as_ref()).await;
        run_child(PoolKind::Dir, root.path(), state.path(), op, Some(fp), None);
        // The volume is wholly old or wholly new.
        assert_eq!(read_raw(&p, 0, 4096), vec![after; 4096], "{fp}");
        assert_eq!(read_raw(&p, 3 << 20, 4096), vec![after; 4096], "{fp}");
        let info = pool.info().await.unwrap();
        let killed_with_temp = matches!(
            fp,
            "dir-snapshot-cloned" | "dir-snapshot-linked" | "dir-revert-cloned"
        );
        if killed_with_temp {
            assert_eq!(info.leftovers, 1, "{fp}: {info:?}");
            assert!(info.leftover_bytes > 0, "{fp}: {info:?}");
        }
        if fp == "dir-delete-snapshots-gone" {
            // Killed between the snapshots and the volume: the delete is repeated.
            pool.delete_volume("v1").await.unwrap();
            pool.delete_volume("q1").await.unwrap();
            assert_eq!(tree(root.path()), Vec::<String>::new(), "{fp}");
            continue;
        }
        // The next operation on the volume removes the leftover and works.
        write_raw(&p, &[0], &[b'C'; 4096]);
        pool.revert_snapshot("v1", "s1").await.unwrap();
        assert_eq!(read_raw(&p, 0, 4096), vec![b'A'; 4096], "{fp}");
        assert_eq!(pool.info().await.unwrap().leftovers, 0, "{fp}");
        let hidden: Vec<String> = tree(root.path())
            .into_iter()
            .filter(|t| t.rsplit('/').next().unwrap().starts_with(".vs-"))
            .collect();
        assert!(hidden.is_empty(), "{fp}: {hidden:?}");
        pool.delete_volume("v1").await.unwrap();
        pool.delete_volume("q1").await.unwrap();
        assert_eq!(tree(root.path()), Vec::<String>::new(), "{fp}");
    }
    // An older version's leftovers (`.VOL.revert-PID`, `.SNAP.tmp-PID`) go too.
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let pool = dir_pool(root.path(), state.path());
    populated(pool.as_ref()).await;
    std::fs::write(root.path().join(".v1.revert-4242"), b"old copy").unwrap();
    std::fs::write(root.path().join(".snapshots/v1/.s9.tmp-4242"), b"old copy").unwrap();
    assert_eq!(pool.info().await.unwrap().leftovers, 2);
    pool.delete_volume("v1").await.unwrap();
    pool.delete_volume("q1").await.unwrap();
    assert_eq!(tree(root.path()), Vec::<String>::new());
}

#[tokio::test]
async fn names_at_the_length_limits_work_through_every_dir_pool_operation() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let pool = dir_pool(root.path(), state.path());
    let (v, s) = ("v".repeat(255), "s".repeat(255));
    for fmt in [VolFormat::Raw, VolFormat::Qcow2] {
        let vol = pool.create_volume(&spec(&v, 1 << 20, fmt)).await.unwrap();
        let p = std::path::PathBuf::from(&vol.path);
        if fmt == VolFormat::Raw {
            write_raw(&p, &[0], b"first");
        }
        pool.create_snapshot(&v, &s, &SnapshotOptions::default())
            .await
            .unwrap();
        assert_eq!(pool.list_snapshots(&v).await.unwrap()[0].name, s);
        if fmt == VolFormat::Raw {
            write_raw(&p, &[0], b"later");
        }
        pool.revert_snapshot(&v, &s).await.unwrap();
        if fmt == VolFormat::Raw {
            assert_eq!(read_raw(&p, 0, 5), b"first");
        }
        pool.delete_snapshot(&v, &s).await.unwrap();
        pool.delete_volume(&v).await.unwrap();
    }
    let long = "x".repeat(256);
    let e = pool
        .create_volume(&spec(&long, 1 << 20, VolFormat::Raw))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(tree(root.path()), Vec::<String>::new());
}

#[tokio::test]
async fn backing_volumes_non_utf8_names_and_enospc_in_a_dir_pool() {
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let pool = dir_pool(root.path(), state.path());
    pool.create_volume(&spec("v1", 1 << 20, VolFormat::Raw))
        .await
        .unwrap();
    // A backing volume must be a volume of the pool.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("img"), vec![0u8; 1 << 20]).unwrap();
    for path in [
        "/etc/shadow".to_string(),
        other.path().join("img").display().to_string(),
        root.path().join("../x").display().to_string(),
    ] {
        let e = pool
            .create_volume(&VolumeSpec {
                name: "o".into(),
                capacity: 0,
                format: VolFormat::Qcow2,
                backing: Some(Backing {
                    path: path.clone(),
                    format: VolFormat::Raw,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{path}: {e}");
        assert!(e.to_string().contains("not a volume of pool"), "{e}");
    }
    assert_eq!(tree(root.path()), vec!["v1".to_string()]);

    // Non-UTF-8 names are reported with their bytes, never shown lossily as another name.
    use std::os::unix::ffi::OsStrExt;
    let odd = root.path().join(std::ffi::OsStr::from_bytes(b"v\xff1"));
    std::fs::write(&odd, b"x").unwrap();
    // One bad entry (a non-UTF-8 name, a symlink) does not hide the others: the listing has
    // the good volumes and names each bad entry; operations on the bad entry itself fail.
    std::os::unix::fs::symlink(root.path().join("v1"), root.path().join("lnk")).unwrap();
    let l = pool.volume_listing().await.unwrap();
    let names: Vec<&str> = l.items.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["v1"]);
    let mut rej: Vec<(&str, String)> = l
        .rejected
        .iter()
        .map(|r| (r.name.as_str(), r.error.to_string()))
        .collect();
    rej.sort();
    assert_eq!(rej.len(), 2, "{rej:?}");
    assert_eq!(rej[0].0, "lnk");
    assert!(rej[0].1.contains("is a symbolic link"), "{rej:?}");
    assert_eq!(rej[1].0, "v\\xff1");
    assert!(
        rej[1].1.contains("v\\xff1") && rej[1].1.contains("not UTF-8"),
        "{rej:?}"
    );
    assert_eq!(pool.list_volumes().await.unwrap().len(), 1);
    let e = pool.volume("lnk").await.unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    // ... and the same in a raw volume's snapshot directory.
    pool.create_snapshot("v1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    let sd = root.path().join(".snapshots/v1");
    std::os::unix::fs::symlink("/etc/passwd", sd.join("slink")).unwrap();
    std::fs::write(sd.join(std::ffi::OsStr::from_bytes(b"s\xfe")), b"x").unwrap();
    let l = pool.snapshot_listing("v1").await.unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].name, "s1");
    let mut rej: Vec<&str> = l.rejected.iter().map(|r| r.name.as_str()).collect();
    rej.sort();
    assert_eq!(rej, ["s\\xfe", "slink"]);
    let e = pool.revert_snapshot("v1", "slink").await.unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    let e = pool.delete_snapshot("v1", "slink").await.unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    // Deleting the volume must see every entry first: it refuses, nothing is gone.
    let e = pool.delete_volume("v1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(root.path().join("v1").exists() && sd.join("s1").exists());
    std::fs::remove_file(sd.join("slink")).unwrap();
    std::fs::remove_file(sd.join(std::ffi::OsStr::from_bytes(b"s\xfe"))).unwrap();
    pool.delete_snapshot("v1", "s1").await.unwrap();
    std::fs::remove_file(&odd).unwrap();
    std::fs::remove_file(root.path().join("lnk")).unwrap();
    assert!(pool.volume_listing().await.unwrap().rejected.is_empty());

    // ENOSPC during a snapshot's copy (tmpfs: no reflink): nothing is left behind.
    let small = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(small.path())
        .status()
        .unwrap();
    assert!(st.success());
    let r = async {
        let pool = dir_pool(small.path(), state.path());
        let v = pool
            .create_volume(&spec("big", 3 << 20, VolFormat::Raw))
            .await
            .unwrap();
        write_raw(std::path::Path::new(&v.path), &[0], &vec![7u8; 3 << 20]);
        let e = pool
            .create_snapshot("big", "s1", &SnapshotOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        assert_eq!(tree(small.path()), vec!["big".to_string()]);
    };
    r.await;
    std::process::Command::new("umount")
        .arg(small.path())
        .status()
        .unwrap();
}

#[test]
fn a_dir_pool_doing_its_file_work_inline_gives_the_same_results() {
    // The CLI's mode (Blocking::Inline, one operation per process) on a current-thread
    // runtime: every operation succeeds and the bytes read back are the snapshot's.
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("pool");
    std::fs::create_dir(&root).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = storage_backends::open_pool_with(
            PoolDef {
                name: "p".into(),
                kind: PoolKind::Dir,
                target: root.display().to_string(),
                thin_pool: None,
            },
            local(),
            locks(t.path()),
            storage_backends::Blocking::Inline,
        )
        .unwrap();
        let p = populated(pool.as_ref()).await;
        pool.revert_snapshot("v1", "s1").await.unwrap();
        let mut buf = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&p).unwrap(), &mut buf, 0)
            .unwrap();
        assert_eq!(buf, [b'A'; 4096], "revert restores the snapshot's bytes");
        pool.revert_snapshot("q1", "qs").await.unwrap();
        assert_eq!(every_operation(pool.as_ref()).await, vec!["ok"; 9]);
    });
}
