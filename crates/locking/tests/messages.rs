//! What a refusal says: non-files given as images, a read-only lockspace, a symlink loop, a
//! virt-snap that just won a race, and a QEMU holding an image on btrfs. Each is named for
//! what it is, not as "in use" by someone unknown.

use locking::qemu::{self, probe, Access, ImageLock};
use locking::{ErrorKind, LockManager, Purpose, Resource};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use testbed::{DiskFormat, Qemu};

fn within_a_second<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(1))
        .unwrap_or_else(|_| panic!("{what}: no answer within a second (blocked?)"))
}

fn volume_op(path: &Path) -> Purpose {
    Purpose::VolumeOp {
        op: "snapshot create".into(),
        volumes: vec![Resource::file(path)],
    }
}

#[test]
fn non_files_are_refused_at_once_and_named() {
    let d = tempfile::tempdir().unwrap();
    let space = d.path().join("locks");
    let fifo = d.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let sock = d.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let lp = d.path().join("loop");
    std::os::unix::fs::symlink("loop", &lp).unwrap();
    let sub = d.path().join("dir");
    std::fs::create_dir(&sub).unwrap();
    let cases: Vec<(PathBuf, &str, bool)> = vec![
        (fifo, "is a FIFO, not a regular file or block device", true),
        (
            sock,
            "is a socket, not a regular file or block device",
            true,
        ),
        (
            PathBuf::from("/dev/null"),
            "is a character device, not a regular file or block device",
            true,
        ),
        (lp, "symlink loop", true),
        // A directory (a btrfs subvolume) gets a lease but no image locks.
        (
            sub,
            "is a directory, not a regular file or block device",
            false,
        ),
    ];
    for (p, words, via_manager) in cases {
        let q = p.clone();
        let e = within_a_second(&format!("image lock {p:?}"), move || {
            ImageLock::acquire(&q, Access::EXCLUSIVE).unwrap_err()
        });
        assert_eq!(e.kind(), ErrorKind::InvalidResource, "{p:?}: {e}");
        assert!(e.to_string().contains(words), "{p:?}: {e}");
        let q = p.clone();
        let e = within_a_second(&format!("probe {p:?}"), move || probe(&q).unwrap_err());
        assert_eq!(e.kind(), ErrorKind::InvalidResource, "{p:?}: {e}");
        let q = p.clone();
        let e = within_a_second(&format!("check {p:?}"), move || {
            qemu::check(&q, Access::EXCLUSIVE).unwrap_err()
        });
        assert_eq!(e.kind(), ErrorKind::InvalidResource, "{p:?}: {e}");
        assert!(!e.is_conflict());
        if via_manager {
            let (q, s) = (p.clone(), space.clone());
            let e = within_a_second(&format!("manager {p:?}"), move || {
                LockManager::local(s)
                    .unwrap()
                    .acquire(&volume_op(&q))
                    .unwrap_err()
            });
            assert_eq!(e.kind(), ErrorKind::InvalidResource, "{p:?}: {e}");
            assert!(e.to_string().contains(words), "{p:?}: {e}");
            assert!(!e.to_string().contains("in use"), "{p:?}: {e}");
        }
    }
}

#[test]
fn a_read_only_lockspace_is_an_io_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let space = d.path().join("locks");
    std::fs::create_dir(&space).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "vs-ro-test"])
        .arg(&space)
        .status()
        .unwrap();
    assert!(st.success(), "mount a read-only tmpfs");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(space.clone());
    let img = d.path().join("a.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let e = LockManager::local(&space)
        .unwrap()
        .acquire(&volume_op(&img))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(!e.is_conflict());
    let msg = e.to_string();
    assert!(msg.contains(&*space.to_string_lossy()), "{msg}");
    assert!(msg.contains("Read-only file system"), "{msg}");
    assert!(!msg.contains("in use"), "{msg}");
}

#[test]
fn a_qemu_holding_an_image_on_btrfs_is_named() {
    let fs = testbed::Btrfs::new(256).unwrap();
    let sv = fs.mountpoint().join("sv");
    let out = Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(&sv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let space = tempfile::tempdir().unwrap();
    let locks = LockManager::local(space.path()).unwrap();
    for dir in [fs.mountpoint().to_path_buf(), sv] {
        let img = dir.join("d.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut qemu = Qemu::builder()
            .existing_disk("d0", DiskFormat::Qcow2, &img)
            .arg("-name")
            .arg("guest=btrfs-vm")
            .spawn()
            .expect("start QEMU");
        let e = locks.acquire(&volume_op(&img)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ImageInUse, "{e}");
        assert_eq!(e.owners().len(), 1, "{img:?}: {e}");
        assert_eq!(e.owners()[0].pid, qemu.pid());
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "in use by qemu-system-x86 (pid {}, guest \"btrfs-vm\")",
                qemu.pid()
            )),
            "{msg}"
        );
        assert!(!msg.contains("another process"), "{msg}");
        qemu.kill();
    }
}
