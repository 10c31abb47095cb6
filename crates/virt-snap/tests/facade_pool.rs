//! The facade as a library: dir and btrfs pools (btrfs on a real loop device), their volumes
//! and volume snapshots through `Connection`, `Pool` and `Volume`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use virt_snap::pool::{PoolDef, PoolKind, SnapshotKind, SnapshotOptions, VolFormat, VolumeSpec};
use virt_snap::{Connection, ErrorKind};

/// One test at a time: a process another test forks holds copies of this process's lease
/// file descriptors (and so their OFD locks) until it execs, which can make a lease taken
/// meanwhile look held "by another holder".
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, off: u64, n: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0; n];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn spec(name: &str, format: VolFormat) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        capacity: 16 << 20,
        format,
        backing: None,
    }
}

/// Define pool `name` of `kind` on `target`, then run a raw volume and a qcow2 volume
/// through create, snapshot, revert (the bytes come back), snapshot delete and delete.
async fn exercise(conn: &Connection, name: &str, kind: PoolKind, target: &Path) {
    let def = conn
        .define_pool(PoolDef {
            name: name.into(),
            kind,
            target: target.display().to_string(),
            thin_pool: None,
        })
        .unwrap();
    assert!(conn.pools().unwrap().iter().any(|p| p.name == def.name));
    let pool = conn.pool(name).unwrap();
    assert_eq!(pool.def().kind, kind);
    assert!(pool.info().await.unwrap().capabilities.snapshots);

    // Raw: the snapshot keeps the bytes, revert brings them back.
    let raw = pool
        .create_volume(&spec("r", VolFormat::Raw))
        .await
        .unwrap();
    let vol = pool.volume("r");
    let p = std::path::PathBuf::from(vol.path().await.unwrap());
    assert_eq!(p.display().to_string(), raw.path);
    write_at(&p, 4096, b"before");
    let s = vol
        .create_snapshot("s1", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(s.name, "s1");
    write_at(&p, 4096, b"after!");
    vol.revert("s1").await.unwrap();
    assert_eq!(read_at(&p, 4096, 6), b"before");
    let e = vol
        .create_snapshot("s1", &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");

    // qcow2: internal snapshots through the one image-write path.
    pool.create_volume(&spec("q", VolFormat::Qcow2))
        .await
        .unwrap();
    let q = pool.volume("q");
    let s = q
        .create_snapshot("qs", &SnapshotOptions::default())
        .await
        .unwrap();
    let expected = match kind {
        PoolKind::Btrfs => SnapshotKind::BtrfsSubvolume,
        _ => SnapshotKind::Qcow2Internal,
    };
    assert_eq!(s.kind, expected);
    assert_eq!(q.snapshots().await.unwrap().len(), 1);
    q.revert("qs").await.unwrap();
    q.delete_snapshot("qs").await.unwrap();
    assert!(q.snapshots().await.unwrap().is_empty());

    let names: Vec<String> = pool
        .volumes()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["q", "r"]);
    vol.delete_snapshot("s1").await.unwrap();
    let e = vol.delete_snapshot("s1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    vol.delete().await.unwrap();
    q.delete().await.unwrap();
    assert_eq!(
        pool.volume("r").info().await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    conn.undefine_pool(name).unwrap();
    assert_eq!(conn.pool(name).unwrap_err().kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn dir_pool_volumes_and_snapshots_through_handles() {
    let _one = SERIAL.lock().await;
    let d = tempfile::tempdir().unwrap();
    let conn = Connection::open(d.path().join("state")).unwrap();
    let target = d.path().join("pool");
    std::fs::create_dir(&target).unwrap();
    exercise(&conn, "dirpool", PoolKind::Dir, &target).await;
}

#[tokio::test]
async fn btrfs_pool_volumes_and_snapshots_through_handles() {
    let _one = SERIAL.lock().await;
    let fs = testbed::Btrfs::new(512).expect("btrfs testbed (cargo xtask deps)");
    let d = tempfile::tempdir().unwrap();
    let conn = Connection::open(d.path().join("state")).unwrap();
    let target = fs.mountpoint().join("pool");
    std::fs::create_dir(&target).unwrap();
    exercise(&conn, "btrfspool", PoolKind::Btrfs, &target).await;
}

#[tokio::test]
async fn a_volume_a_real_qemu_holds_is_refused_naming_it() {
    let _one = SERIAL.lock().await;
    let d = tempfile::tempdir().unwrap();
    let conn = Connection::open(d.path().join("state")).unwrap();
    let target = d.path().join("pool");
    std::fs::create_dir(&target).unwrap();
    conn.define_pool(PoolDef {
        name: "p".into(),
        kind: PoolKind::Dir,
        target: target.display().to_string(),
        thin_pool: None,
    })
    .unwrap();
    let pool = conn.pool("p").unwrap();
    let v = pool
        .create_volume(&spec("v", VolFormat::Raw))
        .await
        .unwrap();
    let qemu = testbed::Qemu::builder()
        .existing_disk("v", testbed::DiskFormat::Raw, Path::new(&v.path))
        .arg("-name")
        .arg("busy-vm")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    let e = pool
        .volume("v")
        .create_snapshot("s", &SnapshotOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse);
    assert!(e.to_string().contains("busy-vm"), "{e}");
    drop(qemu);
    pool.volume("v")
        .create_snapshot("s", &SnapshotOptions::default())
        .await
        .unwrap();
}
