//! btrfs pools on a real btrfs (loop device): subvolume per volume, read-only snapshots,
//! atomic revert, failure injection, in-use refusal; and a dir pool on btrfs (reflink).

// Each test runs on its own current-thread runtime: holding `serial()` across awaits blocks
// nothing but the other tests, which is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use storage_backends::*;

fn show_uuid(path: &Path) -> String {
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "show"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("UUID:"))
        .map(|u| u.trim().to_string())
        .unwrap_or_else(|| panic!("no UUID in {text}"))
}

#[tokio::test]
async fn btrfs_pool_snapshot_revert_delete_with_failure_injection_and_leases() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(512).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let root = fs.mountpoint().join("pool");
    std::fs::create_dir(&root).unwrap();
    let target = root.display().to_string();
    let rec = Arc::new(RecordingRunner::wrapping(local()));
    let pool = open(PoolKind::Btrfs, &target, rec.clone(), locks(state.path()));
    assert!(pool.capabilities().atomic_revert);

    let v = pool
        .create_volume(&spec("v1", 16 << 20, VolFormat::Raw))
        .await
        .unwrap();
    assert_eq!(v.path, root.join("v1/volume.raw").display().to_string());
    // The lease key is the volume's identity in the pool, its subvolume's directory (not
    // its UUID, which a revert changes): the same key the create took.
    assert_eq!(v.key, root.join("v1").display().to_string());
    let p = PathBuf::from(&v.path);
    write_raw(&p, &[0, 9 << 20], b"original bytes");
    let s = pool
        .create_snapshot("v1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(s.kind, SnapshotKind::BtrfsSubvolume);
    let snap_dir = root.join(".snapshots/v1/s1");
    assert!(
        storage_backends::fsutil::subvol_info(&snap_dir)
            .unwrap()
            .readonly
    );
    write_raw(&p, &[0, 9 << 20], b"OVERWRITTEN!!!");

    // Failure injected at the last revert step (dropping the old volume): the swap is
    // undone, the new copy removed; the pool is as it was.
    let uuid_before = show_uuid(&root.join("v1"));
    let snaps_before = pool.list_snapshots("v1").await.unwrap();
    let tree_before = tree(&root);
    rec.fail_once(&["btrfs", "subvolume", "delete"], "injected failure");
    let e = pool.revert_snapshot("v1", "s1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ToolFailed, "{e}");
    assert!(e.not_undone().is_empty(), "{e}");
    assert_eq!(read_raw(&p, 0, 14), b"OVERWRITTEN!!!");
    assert_eq!(show_uuid(&root.join("v1")), uuid_before);
    assert_eq!(pool.list_snapshots("v1").await.unwrap(), snaps_before);
    assert_eq!(tree(&root), tree_before);
    // ... and at the first step.
    rec.fail_once(&["btrfs", "subvolume", "snapshot"], "injected failure");
    pool.revert_snapshot("v1", "s1").await.unwrap_err();
    assert_eq!(tree(&root), tree_before);

    pool.revert_snapshot("v1", "s1").await.unwrap();
    assert_eq!(read_raw(&p, 0, 14), b"original bytes");
    assert_eq!(read_raw(&p, 9 << 20, 14), b"original bytes");
    let after = pool.volume("v1").await.unwrap();
    assert_ne!(
        show_uuid(&root.join("v1")),
        uuid_before,
        "revert makes a new subvolume"
    );
    // ... and the lease key, the volume's identity, stays.
    assert_eq!(after.key, v.key);
    let list = pool.list_snapshots("v1").await.unwrap();
    assert_eq!(list.len(), 1, "the snapshot is kept: {list:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((list[0].created.unwrap() - now).abs() < 120, "{list:?}");
    assert_eq!(tree(&root), tree_before, "no temporaries left");

    // A second snapshot, names with spaces, qcow2 volumes in subvolumes.
    pool.create_snapshot("v1", "after revert", &SnapshotOptions::default())
        .await
        .unwrap();
    let names: Vec<String> = pool
        .list_snapshots("v1")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "after revert"]);
    let q = pool
        .create_volume(&spec("q1", 4 << 20, VolFormat::Qcow2))
        .await
        .unwrap();
    qcow2_write(Path::new(&q.path), 0x33, 0, 65536);
    pool.create_snapshot("q1", "a", &SnapshotOptions::default())
        .await
        .unwrap();
    qcow2_write(Path::new(&q.path), 0x44, 0, 65536);
    pool.revert_snapshot("q1", "a").await.unwrap();
    assert!(qcow2_read(Path::new(&q.path), 0, 65536)
        .iter()
        .all(|&b| b == 0x33));

    // In use: a VM's lease on the volume (its lease resource: the subvolume's directory)
    // refuses snapshots, revert and delete.
    let lm = locks(state.path());
    let vm = lm
        .acquire(&locking::Purpose::VmStart {
            domain: "vm1".into(),
            disks: vec![locking::DiskUse::writable(
                pool.lease_resource("v1").await.unwrap(),
            )],
        })
        .unwrap();
    for r in [
        pool.create_snapshot("v1", "x", &SnapshotOptions::default())
            .await
            .map(|_| ()),
        pool.revert_snapshot("v1", "s1").await,
        pool.delete_snapshot("v1", "s1").await,
        pool.delete_volume("v1").await,
    ] {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(e.to_string().contains("in use by domain \"vm1\""), "{e}");
    }
    drop(vm);

    // A failed create is undone (the subvolume goes again).
    // (the subvolume is made first, then the qcow2 file, whose backing volume is missing).
    let e = pool
        .create_volume(&VolumeSpec {
            name: "q2".into(),
            capacity: 0,
            format: VolFormat::Qcow2,
            backing: Some(Backing {
                path: root.join("gone").display().to_string(),
                format: VolFormat::Raw,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(!root.join("q2").exists());

    // Delete leaves nothing behind.
    pool.delete_snapshot("v1", "s1").await.unwrap();
    pool.delete_volume("v1").await.unwrap();
    pool.delete_volume("q1").await.unwrap();
    assert_eq!(tree(&root), Vec::<String>::new());
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "list"])
        .arg(fs.mountpoint())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

#[tokio::test]
async fn dir_pool_on_btrfs_snapshots_raw_volumes_by_reflink() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(512).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let target = fs.mountpoint().display().to_string();
    let pool = open(PoolKind::Dir, &target, local(), locks(state.path()));
    assert!(
        pool.info()
            .await
            .unwrap()
            .capabilities
            .space_efficient_snapshots
    );
    let v = pool
        .create_volume(&spec("big", 200 << 20, VolFormat::Raw))
        .await
        .unwrap();
    let p = PathBuf::from(&v.path);
    // 100 MiB of data: a copy would not fit twice more in the 512 MiB filesystem quickly;
    // a reflink takes no data space.
    let data = vec![0x5au8; 100 << 20];
    std::fs::write(&p, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(200 << 20).unwrap();
    f.sync_all().unwrap();
    let used = || fsutil::fs_space(fs.mountpoint()).unwrap().1;
    let before = used();
    pool.create_snapshot("big", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert!(used() < before + (10 << 20), "reflink shares the blocks");
    write_raw(&p, &[0], b"changed");
    pool.revert_snapshot("big", "s1").await.unwrap();
    assert_eq!(read_raw(&p, 0, 7), [0x5a; 7]);
    pool.delete_volume("big").await.unwrap();
    assert_eq!(tree(fs.mountpoint()), Vec::<String>::new());
}

#[tokio::test]
async fn the_local_runners_built_in_btrfs_snapshot_matches_the_tool() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
    let m = fs.mountpoint();
    let snap = |src: &str, dst: &str, readonly| ToolCmd::BtrfsSnapshot {
        src: m.join(src),
        dst: m.join(dst),
        readonly,
    };
    std::process::Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(m.join("src"))
        .status()
        .unwrap();
    std::fs::write(m.join("src/f"), b"data").unwrap();
    let out = LocalRunner.run(&snap("src", "ro", true)).await.unwrap();
    assert!(out.success(), "{out:?}");
    assert!(LocalRunner
        .run(&snap("ro", "rw", false))
        .await
        .unwrap()
        .success());
    // What btrfs-progs reports about them.
    let show = |p: &str| {
        String::from_utf8_lossy(
            &std::process::Command::new("btrfs")
                .args(["subvolume", "show"])
                .arg(m.join(p))
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    let (src, ro, rw) = (show("src"), show("ro"), show("rw"));
    let field = |t: &str, k: &str| {
        t.lines()
            .find_map(|l| l.trim().strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap()
    };
    assert_eq!(field(&ro, "Parent UUID:"), field(&src, "UUID:"));
    assert_eq!(field(&ro, "Flags:"), "readonly");
    assert_eq!(field(&rw, "Flags:"), "-");
    assert_eq!(std::fs::read(m.join("rw/f")).unwrap(), b"data");
    let info = fsutil::subvol_info(&m.join("ro")).unwrap();
    assert!(info.readonly);
    assert_eq!(info.uuid, field(&ro, "UUID:"));
    // A failure gets its kind from the system call, and names the command.
    let missing = snap("src", "no/such/dir/x", false);
    let e = runner::run_ok(&LocalRunner, &missing).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(e.command(), Some(missing.argv().as_slice()));
    assert!(e.to_string().contains(&missing.to_string()), "{e}");
    // An existing destination directory means "inside it": left to the real tool.
    std::fs::create_dir(m.join("into")).unwrap();
    assert!(LocalRunner
        .run(&snap("src", "into", false))
        .await
        .unwrap()
        .success());
    assert!(fsutil::is_subvolume(&m.join("into/src")));
    for p in ["into/src", "rw", "ro", "src"] {
        std::process::Command::new("btrfs")
            .args(["-q", "subvolume", "delete"])
            .arg(m.join(p))
            .status()
            .unwrap();
    }
}

/// The child side of the crash tests (see `common::run_child`).
#[tokio::test]
async fn child() {
    child_main().await;
}

#[tokio::test]
async fn a_btrfs_revert_killed_at_each_step_then_repeated_keeps_every_byte() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(512).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let root = fs.mountpoint().join("pool");
    std::fs::create_dir(&root).unwrap();
    let pool = open(
        PoolKind::Btrfs,
        &root.display().to_string(),
        local(),
        locks(state.path()),
    );
    let v = pool
        .create_volume(&spec("v1", 8 << 20, VolFormat::Raw))
        .await
        .unwrap();
    let p = PathBuf::from(&v.path);
    assert_eq!(mode(&p), 0o600);
    let a = vec![b'A'; 1 << 20];
    std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    write_raw(&p, &[0, 7 << 20], &a);
    pool.create_snapshot("v1", "s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(mode(&root.join(".snapshots")), 0o700);
    assert_eq!(mode(&root.join(".snapshots/v1")), 0o700);
    let whole = |b: u8| {
        let mut v = vec![0u8; 8 << 20];
        v[..1 << 20].fill(b);
        v[7 << 20..].fill(b);
        v
    };
    for (fp, after) in [
        ("btrfs-revert-snapshotted", b'B'),
        ("btrfs-revert-exchanged", b'A'),
        ("btrfs-revert-deleted", b'A'),
    ] {
        write_raw(&p, &[0, 7 << 20], &vec![b'B'; 1 << 20]);
        run_child(
            PoolKind::Btrfs,
            &root,
            state.path(),
            &["revert", "v1", "s1"],
            Some(fp),
            None,
        );
        // Old or new, byte for byte.
        assert_eq!(std::fs::read(&p).unwrap(), whole(after), "{fp}");
        let info = pool.info().await.unwrap();
        if fp != "btrfs-revert-deleted" {
            assert_eq!(info.leftovers, 1, "{fp}: {info:?}");
        }
        // Newer writes, then the revert again: it removes the leftover first and works.
        write_raw(&p, &[0, 7 << 20], &vec![b'C'; 1 << 20]);
        pool.revert_snapshot("v1", "s1").await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), whole(b'A'), "{fp}");
        assert_eq!(pool.info().await.unwrap().leftovers, 0, "{fp}");
        assert_eq!(
            tree(&root),
            [
                ".snapshots",
                ".snapshots/v1",
                ".snapshots/v1/s1",
                ".snapshots/v1/s1/volume.raw",
                "v1",
                "v1/volume.raw"
            ],
            "{fp}"
        );
        // And once more: every later revert works.
        write_raw(&p, &[0], b"x");
        pool.revert_snapshot("v1", "s1").await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), whole(b'A'), "{fp}");
    }
    // What an older version left: `.v1.revert` with the stale subvolume snapshotted *into*
    // it. The next revert removes both and reverts for real.
    let legacy = root.join(".v1.revert");
    let bt = |args: &[&std::ffi::OsStr]| {
        let st = std::process::Command::new("btrfs")
            .arg("-q")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success());
    };
    bt(&[
        "subvolume".as_ref(),
        "snapshot".as_ref(),
        root.join(".snapshots/v1/s1").as_os_str(),
        legacy.as_os_str(),
    ]);
    bt(&[
        "subvolume".as_ref(),
        "snapshot".as_ref(),
        root.join(".snapshots/v1/s1").as_os_str(),
        legacy.join("s1").as_os_str(),
    ]);
    assert_eq!(pool.info().await.unwrap().leftovers, 1);
    write_raw(&p, &[0, 7 << 20], &vec![b'D'; 1 << 20]);
    pool.revert_snapshot("v1", "s1").await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), whole(b'A'));
    assert!(!legacy.exists());
    // A delete killed after the snapshots went: repeated, it finishes.
    run_child(
        PoolKind::Btrfs,
        &root,
        state.path(),
        &["delete", "v1"],
        Some("btrfs-delete-snapshot-gone"),
        None,
    );
    pool.delete_volume("v1").await.unwrap();
    assert_eq!(tree(&root), Vec::<String>::new());
}

#[tokio::test]
async fn symlinks_in_a_btrfs_pool_are_reported_never_followed() {
    let _serial = serial();
    let fs = testbed::Btrfs::new(512).expect("btrfs testbed (cargo xtask deps)");
    let state = tempfile::tempdir().unwrap();
    let root = fs.mountpoint().join("pool");
    std::fs::create_dir(&root).unwrap();
    let pool = open(
        PoolKind::Btrfs,
        &root.display().to_string(),
        local(),
        locks(state.path()),
    );
    for level in [
        ".snapshots",
        ".snapshots/v1",
        "v1",
        ".snapshots/v1/s1",
        "v1/volume.raw",
    ] {
        pool.create_volume(&spec("v1", 1 << 20, VolFormat::Raw))
            .await
            .unwrap();
        pool.create_snapshot("v1", "s1", &SnapshotOptions::default())
            .await
            .unwrap();
        // OTHER: a directory outside the pool shaped like what the link replaces.
        let other = fs.mountpoint().join("other");
        std::fs::create_dir_all(other.join("v1/s1")).unwrap();
        std::fs::write(other.join("v1/s1/volume.raw"), b"outside").unwrap();
        std::fs::write(other.join("v1/volume.raw"), b"outside").unwrap();
        std::fs::write(other.join("volume.raw"), b"outside").unwrap();
        let real = root.join(level);
        let moved = if level == "v1/volume.raw" {
            root.join("v1/moved") // a file cannot leave its subvolume by rename
        } else {
            fs.mountpoint().join("moved")
        };
        if level == ".snapshots/v1/s1" {
            // A read-only subvolume cannot be moved: delete it.
            let st = std::process::Command::new("btrfs")
                .args(["-q", "subvolume", "delete"])
                .arg(&real)
                .status()
                .unwrap();
            assert!(st.success());
        } else {
            std::fs::rename(&real, &moved).unwrap();
        }
        let target = match level {
            ".snapshots" => other.clone(),
            ".snapshots/v1" | "v1" => other.join("v1"),
            ".snapshots/v1/s1" => other.join("v1/s1"),
            _ => other.join("volume.raw"),
        };
        std::os::unix::fs::symlink(&target, &real).unwrap();
        let before = tree_with_contents(&other);
        let o = SnapshotOptions::default();
        // A listing succeeds with the good entries and names the bad ones (shown as errors
        // here); every other operation reaching the link fails.
        let rejected = |r: Result<Vec<RejectedEntry>, Error>| match r {
            Ok(rej) => match rej.into_iter().next() {
                Some(x) => Err(x.error),
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        let out: Vec<String> = vec![
            rejected(pool.volume_listing().await.map(|l| l.rejected)),
            pool.volume("v1").await.map(|_| ()),
            rejected(pool.snapshot_listing("v1").await.map(|l| l.rejected)),
            pool.create_snapshot("v1", "new", &o).await.map(|_| ()),
            pool.revert_snapshot("v1", "s1").await,
            pool.delete_snapshot("v1", "s1").await,
            pool.delete_volume("v1").await,
        ]
        .into_iter()
        .map(|r| match r {
            Ok(()) => "ok".into(),
            Err(e) => format!("{:?}: {e}", e.kind()),
        })
        .collect();
        assert_eq!(tree_with_contents(&other), before, "{level}: {out:#?}");
        assert!(
            out.iter().any(|s| s.contains("symbolic link")),
            "{level}: {out:#?}"
        );
        for i in [4, 6] {
            assert_ne!(out[i], "ok", "{level}: {out:#?}");
        }
        // Put things back and clean up for the next level.
        std::fs::remove_file(&real).unwrap();
        if moved.exists() {
            std::fs::rename(&moved, &real).unwrap();
        }
        std::fs::remove_dir_all(&other).unwrap();
        for s in pool.list_snapshots("v1").await.unwrap() {
            pool.delete_snapshot("v1", &s.name).await.unwrap();
        }
        pool.delete_volume("v1").await.unwrap();
        assert_eq!(tree(&root), Vec::<String>::new(), "{level}");
    }
}
