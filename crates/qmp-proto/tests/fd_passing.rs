//! Descriptor passing (SCM_RIGHTS) against a real QEMU 10.0.2 (KVM, no guest OS):
//! `getfd`/`closefd`, `add-fd`/`remove-fd`/`query-fdsets`, an image opened by QEMU through
//! `/dev/fdset/N`, and a lock on the passed descriptor living exactly as long as QEMU's copy.
//!
//! Needs qemu-system-x86_64 10.0.2, qemu-img and /dev/kvm: run `cargo xtask deps` first. A
//! missing component fails the test with that hint; nothing is skipped.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command as Proc;
use std::time::Duration;

use qmp_proto::commands::*;
use qmp_proto::{ErrorKind, QmpClient};
use rustix::fs::{flock, FlockOperation};
use testbed::{DiskFormat, Qemu};

const T: Duration = Duration::from_secs(20);

fn qemu() -> Qemu {
    Qemu::builder()
        .disk("d0", DiskFormat::Qcow2, 16 << 20)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU (run `cargo xtask deps`): {e}"))
}

async fn connect(q: &Qemu) -> QmpClient {
    tokio::time::timeout(T, QmpClient::connect_unix(q.qmp_path()))
        .await
        .expect("connect hung")
        .unwrap_or_else(|e| panic!("QMP connect failed: {e}\nQEMU log:\n{}", q.log()))
}

fn qemu_img_create(path: &Path) {
    let out = Proc::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1M")
        .output()
        .expect("run qemu-img (run `cargo xtask deps`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether another open file description can take an exclusive flock on `path` now.
fn lockable(path: &Path) -> bool {
    let f = File::open(path).unwrap();
    flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok()
}

#[tokio::test]
async fn getfd_keeps_the_descriptor_and_its_lock_until_closefd() {
    let q = qemu();
    let c = connect(&q).await;
    let lease = q.dir().join("lease");
    let f = File::create(&lease).unwrap();
    flock(&f, FlockOperation::NonBlockingLockShared).unwrap();
    c.getfd("lease0", f.as_fd()).await.unwrap();
    // Our descriptor closed: QEMU's copy still holds the open file description's lock.
    drop(f);
    assert!(!lockable(&lease), "the lock must live on in QEMU's copy");
    c.run(&Closefd {
        fdname: "lease0".into(),
    })
    .await
    .unwrap();
    assert!(lockable(&lease), "closefd must release the lock");
    let err = c
        .run(&Closefd {
            fdname: "lease0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Command, "{err}");
}

#[tokio::test]
async fn add_fd_opens_an_image_through_its_fdset_and_remove_fd_releases_it() {
    let q = qemu();
    let c = connect(&q).await;
    let img = q.dir().join("ovl.qcow2");
    qemu_img_create(&img);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let info = c.add_fd(f.as_fd(), None, Some("ovl")).await.unwrap();
    drop(f);
    let sets = c.run(&QueryFdsets).await.unwrap();
    let set = sets
        .iter()
        .find(|s| s.fdset_id == info.fdset_id)
        .unwrap_or_else(|| panic!("fdset {} not in {sets:?}", info.fdset_id));
    assert_eq!(set.fds.len(), 1);
    assert_eq!(set.fds[0].fd, info.fd);
    assert_eq!(set.fds[0].opaque.as_deref(), Some("ovl"));

    // QEMU opens the image by the set's name, not by its path.
    let fdpath = format!("/dev/fdset/{}", info.fdset_id);
    c.run(&BlockdevAdd(BlockdevOptions::file("ovl-file", &fdpath)))
        .await
        .unwrap();
    let nodes = c.run(&QueryNamedBlockNodes::default()).await.unwrap();
    let node = nodes
        .iter()
        .find(|n| n.node_name.as_deref() == Some("ovl-file"))
        .expect("node added");
    assert_eq!(node.file, fdpath);

    c.run(&BlockdevDel {
        node_name: "ovl-file".into(),
    })
    .await
    .unwrap();
    c.run(&RemoveFd {
        fdset_id: info.fdset_id,
        fd: None,
    })
    .await
    .unwrap();
    let sets = c.run(&QueryFdsets).await.unwrap();
    assert!(
        sets.iter().all(|s| s.fdset_id != info.fdset_id),
        "set gone: {sets:?}"
    );
}

#[tokio::test]
async fn descriptors_travel_with_their_own_command_among_concurrent_ones() {
    let q = qemu();
    let c = connect(&q).await;
    let files: Vec<(std::path::PathBuf, File)> = (0..8)
        .map(|i| {
            let p = q.dir().join(format!("f{i}"));
            let f = File::create(&p).unwrap();
            flock(&f, FlockOperation::NonBlockingLockShared).unwrap();
            (p, f)
        })
        .collect();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        tasks.push(tokio::spawn(
            async move { c.run(&QueryStatus).await.map(|_| i) },
        ));
    }
    // Each task owns a duplicate of its file's descriptor (same open file description,
    // same lock), so the passes run concurrently with the queries and with each other.
    for (i, (_, f)) in files.iter().enumerate() {
        let c = c.clone();
        let f = f.try_clone().unwrap();
        tasks.push(tokio::spawn(async move {
            c.getfd(&format!("fd{i}"), f.as_fd()).await.map(|_| i)
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let paths: Vec<_> = files.into_iter().map(|(p, _)| p).collect();
    // Every name got its own file: closing fdN releases exactly file N.
    for (i, p) in paths.iter().enumerate() {
        assert!(!lockable(p), "fd{i} held");
        c.run(&Closefd {
            fdname: format!("fd{i}"),
        })
        .await
        .unwrap();
        assert!(lockable(p), "closefd fd{i} released file {i}");
        for later in &paths[i + 1..] {
            assert!(!lockable(later));
        }
    }
}
