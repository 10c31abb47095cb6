//! The probe against a real QEMU holding real images.

use locking::qemu::{probe, Access, Permission::*};
use locking::{DiskUse, ErrorKind, LockManager, Purpose, Resource};
use testbed::{DiskFormat, Qemu};

#[test]
fn probe_sees_a_running_qemus_locks_and_their_release() {
    let mut qemu = Qemu::builder()
        .disk("rw", DiskFormat::Qcow2, 32 << 20)
        .disk("ro", DiskFormat::Raw, 8 << 20)
        .read_only()
        .spawn()
        .expect("start QEMU");
    let rw = qemu.disk("rw").path.clone();
    let ro = qemu.disk("ro").path.clone();
    let s = probe(&rw).unwrap();
    assert_eq!(s.held, vec![ConsistentRead, Write, Resize]);
    assert_eq!(s.unshared, vec![Write, Resize]);
    assert_eq!(s.bytes(), vec![100, 101, 103, 201, 203]);
    let s = probe(&ro).unwrap();
    // A read-only device: consistent read held, write not shared (a read-only *backing*
    // file additionally refuses to share resize: 100, 201, 203).
    assert_eq!(s.bytes(), vec![100, 201], "read-only disk");
    // Copy the image aside: after QEMU is gone, no lock remains.
    let keep = qemu
        .dir()
        .parent()
        .unwrap()
        .join(format!("vs-lock-{}.qcow2", std::process::id()));
    std::fs::copy(&rw, &keep).unwrap();
    qemu.kill();
    assert!(!probe(&rw).unwrap().in_use());
    assert!(!probe(&keep).unwrap().in_use());
    std::fs::remove_file(keep).unwrap();
}

fn volume_op(path: &std::path::Path) -> Purpose {
    Purpose::VolumeOp {
        op: "snapshot create".into(),
        volumes: vec![Resource::file(path)],
    }
}

#[test]
fn a_volume_operation_is_refused_while_qemu_runs_and_allowed_after_it_quits() {
    let space = tempfile::tempdir().unwrap();
    let locks = LockManager::local(space.path()).unwrap();
    let mut qemu = Qemu::builder()
        .disk("d0", DiskFormat::Qcow2, 64 << 20)
        .arg("-name")
        .arg("guest=other-tools-vm,debug-threads=on")
        .spawn()
        .expect("start QEMU");
    let d0 = qemu.disk("d0").path.clone();
    let canon = std::fs::canonicalize(&d0).unwrap();

    // No lease names QEMU (another tool started it): its image locks refuse us.
    let e = locks.acquire(&volume_op(&d0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ImageInUse);
    assert_eq!(e.permission(), Some((Write, true)));
    // The refusal names the QEMU, found through /proc/PID/fdinfo.
    assert_eq!(
        e.to_string(),
        format!(
            "image {} in use by qemu-system-x86 (pid {}, guest \"other-tools-vm\"): it does \
             not share the \"write\" permission (QEMU image lock)",
            canon.display(),
            qemu.pid()
        )
    );
    assert_eq!(e.owners()[0].bytes, vec![100, 101, 103, 201, 203]);
    // All or nothing: the refused attempt left neither a lease nor image locks behind.
    assert!(locks.holders(&Resource::file(&d0)).unwrap().is_empty());
    assert_eq!(probe(&d0).unwrap().bytes(), vec![100, 101, 103, 201, 203]);
    // Starting a second VM on it, writable or read-only, is refused before launching QEMU.
    for disk in [
        DiskUse::writable(Resource::file(&d0)),
        DiskUse::read_only(Resource::file(&d0)),
    ] {
        let e = locks
            .acquire(&Purpose::VmStart {
                domain: "vm2".into(),
                disks: vec![disk],
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ImageInUse, "{e}");
        assert!(e.to_string().contains(&canon.display().to_string()), "{e}");
    }
    // Reading the header takes no lock and still works.
    assert_eq!(std::fs::read(&d0).unwrap()[..4], *b"QFI\xfb");

    // QEMU quits: the same acquire succeeds.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let qmp = qemu.qmp().await.expect("QMP");
        let _ = qmp.execute("quit", None).await;
    });
    assert!(
        qemu.wait_exit(std::time::Duration::from_secs(10)).is_some(),
        "QEMU did not quit"
    );
    let held = locks.acquire(&volume_op(&d0)).unwrap();
    assert_eq!(held.image_locks().len(), 1);
    assert_eq!(probe(&d0).unwrap().bytes(), Access::WRITER.bytes());
    let hs = locks.holders(&Resource::file(&d0)).unwrap();
    assert_eq!(
        hs[0].holder,
        locking::Holder::Operation("snapshot create".into())
    );
}

#[test]
fn qemu_refuses_to_start_on_an_image_we_hold() {
    let space = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("held.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .expect("qemu-img (run `cargo xtask deps`)");
    assert!(st.success());
    let locks = LockManager::local(space.path()).unwrap();
    let held = locks.acquire(&volume_op(&img)).unwrap();

    let err = Qemu::builder()
        .existing_disk("d0", DiskFormat::Qcow2, &img)
        .spawn()
        .expect_err("QEMU must not start on an image we hold");
    let msg = err.to_string();
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    let ro = Qemu::builder()
        .existing_disk("d0", DiskFormat::Qcow2, &img)
        .read_only()
        .spawn()
        .expect_err("nor read-only");
    assert!(
        ro.to_string()
            .contains("Failed to get shared \"write\" lock"),
        "{ro}"
    );

    // qemu-img: plain `info` is refused like any reader; `info -U` (force-share) works,
    // and so does reading the header ourselves.
    let info = std::process::Command::new("qemu-img")
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    assert!(!info.status.success());
    assert!(String::from_utf8_lossy(&info.stderr).contains("Failed to get shared \"write\" lock"));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );

    // Released: QEMU starts, and now we are the ones refused.
    drop(held);
    let mut qemu = Qemu::builder()
        .existing_disk("d0", DiskFormat::Qcow2, &img)
        .spawn()
        .expect("QEMU starts once we let go");
    assert_eq!(
        locks.acquire(&volume_op(&img)).unwrap_err().kind(),
        ErrorKind::ImageInUse
    );
    qemu.kill();
}

#[test]
fn shareable_disks_can_join_a_qemu_that_shares_writes() {
    let space = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("shared.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut qemu = Qemu::builder()
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f0",
            img.display()
        ))
        .arg("-blockdev")
        .arg("driver=raw,file=f0,node-name=s0")
        .arg("-device")
        .arg("virtio-blk-pci,drive=s0,share-rw=on")
        .spawn()
        .expect("start QEMU with a share-rw disk");
    // A share-rw writer holds consistent read and write, and refuses nothing.
    assert_eq!(probe(&img).unwrap().bytes(), vec![100, 101]);
    let locks = LockManager::local(space.path()).unwrap();
    let start = |disk: DiskUse| Purpose::VmStart {
        domain: "vm2".into(),
        disks: vec![disk],
    };
    let shareable = DiskUse {
        resource: Resource::file(&img),
        read_only: false,
        shareable: true,
    };
    locks
        .acquire(&start(shareable))
        .expect("a shareable disk joins");
    let e = locks
        .acquire(&start(DiskUse::writable(Resource::file(&img))))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ImageInUse, "{e}");
    assert_eq!(
        locks.acquire(&volume_op(&img)).unwrap_err().kind(),
        ErrorKind::ImageInUse
    );
    qemu.kill();
}

#[test]
fn our_own_qemu_img_runs_under_our_locks_with_locking_off() {
    let space = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("op,1.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .expect("qemu-img (run `cargo xtask deps`)");
    assert!(st.success());
    let locks = LockManager::local(space.path()).unwrap();
    let _held = locks.acquire(&volume_op(&img)).unwrap();
    // A plain qemu-img is refused like everyone else...
    let plain = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!plain.status.success());
    assert!(String::from_utf8_lossy(&plain.stderr).contains("Failed to get \"write\" lock"));
    // ...the operation's own qemu-img, told not to lock, works under our locks.
    let ours = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", "s1", "--image-opts"])
        .arg(locking::qemu::image_opts_without_locking("qcow2", &img))
        .output()
        .unwrap();
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let list = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(" s1 "));
    // Our locks are still there.
    assert_eq!(probe(&img).unwrap().bytes(), Access::WRITER.bytes());
}

#[test]
fn attaching_to_a_running_qemu_ignores_its_own_locks_only() {
    let space = tempfile::tempdir().unwrap();
    let locks = LockManager::local(space.path()).unwrap();
    let qemu = Qemu::builder()
        .disk("rw", DiskFormat::Qcow2, 32 << 20)
        .disk("ro", DiskFormat::Raw, 8 << 20)
        .read_only()
        .spawn()
        .expect("start QEMU");
    let rw = qemu.disk("rw").path.clone();
    let ro = qemu.disk("ro").path.clone();
    let disks = vec![
        DiskUse::writable(Resource::file(&rw)),
        DiskUse::read_only(Resource::file(&ro)),
    ];
    // A start on these disks is refused: the running QEMU holds them.
    let e = locks
        .acquire(&Purpose::VmStart {
            domain: "adopted".into(),
            disks: disks.clone(),
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ImageInUse, "{e}");
    // Adopting another pid is refused as well (the locks are not that process's).
    let e = locks
        .acquire(&Purpose::VmAttach {
            domain: "adopted".into(),
            qemu_pid: std::process::id() + 1_000_000,
            disks: disks.clone(),
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ImageInUse, "{e}");
    assert!(locks.holders(&Resource::file(&rw)).unwrap().is_empty());
    // Adopting the QEMU itself: its own locks are no conflict; the leases are taken.
    let got = locks
        .acquire(&Purpose::VmAttach {
            domain: "adopted".into(),
            qemu_pid: qemu.pid(),
            disks,
        })
        .unwrap();
    assert_eq!(got.leases().len(), 2);
    assert!(got.image_locks().is_empty(), "attach holds no image lock");
    let hs = locks.holders(&Resource::file(&rw)).unwrap();
    assert_eq!(hs[0].holder, locking::Holder::Domain("adopted".into()));
    // A volume operation is now refused by the lease, naming the domain.
    let e = locks.acquire(&volume_op(&rw)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("domain \"adopted\""), "{e}");
}
