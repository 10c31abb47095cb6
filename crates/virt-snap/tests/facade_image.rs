//! The facade as a library: `Image` against images qemu-img made and a real QEMU holding one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use virt_snap::image::{NewBacking, NewImage, ProbePolicy, SnapshotRef};
use virt_snap::{Connection, ErrorKind, FixedClock, Image};

/// One test at a time: a process another test forks (qemu-img, QEMU) holds copies of this
/// process's lease file descriptors (and so their OFD locks) until it execs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn qemu_img(args: &[&str], dir: &Path) -> String {
    testbed::qemu_img_in(Some(dir), args)
}

/// An error and its causes, as the CLI prints them.
fn chain(e: &virt_snap::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn reads_info_chain_and_snapshots_of_qemu_img_images() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    qemu_img(&["create", "-q", "-f", "raw", "base.raw", "8M"], dir);
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
        dir,
    );
    qemu_img(&["snapshot", "-c", "s1", "top.qcow2"], dir);
    let top = Image::at(dir.join("top.qcow2"));
    let info = top.info(None).unwrap();
    assert_eq!(info.virtual_size(), 8 << 20);
    assert_eq!(info.backing_filename().as_deref(), Some("base.raw"));
    let chain = top.chain(None, ProbePolicy::Never).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].format(), virt_snap::image::Format::Raw);
    let snaps = top.snapshots(None).unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, b"s1");
    // A raw image has no snapshot table; a missing one is NotFound-or-Io, never a panic.
    let e = Image::at(dir.join("base.raw")).snapshots(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let e = Image::at(dir.join("missing.qcow2")).info(None).unwrap_err();
    assert!(e.to_string().contains("cannot read image"), "{e}");
    // Reading needs no connection; writing does.
    let e = top.snapshot_create(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn writes_create_overlays_and_snapshots_that_qemu_img_reads() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_795_770_760, 123_456_789);
    let conn = Connection::builder(dir.join("state"))
        .clock(std::sync::Arc::new(FixedClock(t)))
        .open()
        .unwrap();
    let base = conn.image(dir.join("base.qcow2"));
    let made = base
        .create(&NewImage {
            size: Some(64 << 20),
            backing: None,
        })
        .unwrap();
    assert_eq!(made.virtual_size, 64 << 20);
    let over = conn.image(dir.join("over.qcow2"));
    over.create(&NewImage {
        size: None,
        backing: Some(NewBacking {
            file: "base.qcow2".into(),
            format: Some(virt_snap::image::Format::Qcow2),
            probe: ProbePolicy::Never,
        }),
    })
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&qemu_img(
        &["info", "--output=json", "--backing-chain", "over.qcow2"],
        dir,
    ))
    .unwrap();
    assert_eq!(v[0]["virtual-size"], 64 << 20);
    assert_eq!(v[0]["backing-filename-format"], "qcow2");
    let sn = base.snapshot_create(b"first").unwrap();
    assert_eq!(sn.id, b"1");
    // The connection's clock dates it, at qemu-img's resolution (microseconds).
    assert_eq!((sn.date_sec, sn.date_nsec), (1_795_770_760, 123_456_000));
    let list = qemu_img(&["snapshot", "-l", "base.qcow2"], dir);
    assert!(list.contains("first"), "{list}");
    assert_eq!(
        base.snapshot_apply(&SnapshotRef::Name(b"first".to_vec()))
            .unwrap()
            .name,
        b"first"
    );
    let e = base
        .snapshot_delete(&SnapshotRef::Name(b"nope".to_vec()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    base.snapshot_delete(&SnapshotRef::Name(b"first".to_vec()))
        .unwrap();
    qemu_img(&["check", "base.qcow2"], dir);
    assert!(base.snapshots(None).unwrap().is_empty());
}

/// Issue 10: a create that fails leaves nothing at a new path, and leaves a file the user
/// gave as it was.
#[test]
fn a_failed_create_removes_only_the_file_it_created() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let conn = Connection::open(dir.join("state")).unwrap();
    let too_big = NewImage {
        size: Some(8 << 60),
        backing: None,
    };
    let new = dir.join("new.qcow2");
    let e = conn.image(&new).create(&too_big).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(chain(&e).contains("too large"), "{}", chain(&e));
    assert!(!new.exists(), "a failed create left {}", new.display());
    let mine = dir.join("mine.img");
    std::fs::write(&mine, b"the user's bytes").unwrap();
    conn.image(&mine).create(&too_big).unwrap_err();
    assert_eq!(std::fs::read(&mine).unwrap(), b"the user's bytes");
    // An existing file is overwritten in place (like qemu-img) and keeps its mode.
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o640)).unwrap();
    conn.image(&mine)
        .create(&NewImage {
            size: Some(1 << 20),
            backing: None,
        })
        .unwrap();
    assert_eq!(Image::at(&mine).info(None).unwrap().virtual_size(), 1 << 20);
    assert_eq!(mode(&mine), 0o640);
}

#[test]
fn an_image_a_real_qemu_holds_is_in_use_and_unchanged() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "vm.qcow2", "64M"], dir);
    qemu_img(&["snapshot", "-c", "s", "vm.qcow2"], dir);
    let path = dir.join("vm.qcow2");
    let conn = Connection::open(dir.join("state")).unwrap();
    let img = conn.image(&path);
    let qemu = testbed::Qemu::builder()
        .existing_disk("d0", testbed::DiskFormat::Qcow2, &path)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !img.locks(None).unwrap().in_use {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU never locked the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let locks = img.locks(None).unwrap();
    assert!(!locks.processes.is_empty(), "{locks:?}");
    let before = std::fs::read(&path).unwrap();
    let s = SnapshotRef::Name(b"s".to_vec());
    for (what, r) in [
        ("create", img.snapshot_create(b"x").map(drop)),
        ("apply", img.snapshot_apply(&s).map(drop)),
        ("delete", img.snapshot_delete(&s).map(drop)),
        (
            "image create",
            img.create(&NewImage {
                size: Some(1 << 30),
                backing: None,
            })
            .map(drop),
        ),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::InUse, "{what}: {e}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "{what} changed it");
    }
    // Reading takes no lock.
    assert_eq!(img.snapshots(None).unwrap().len(), 1);
    drop(qemu);
}

/// Everything the facade creates is private: the state dir and its subdirectories 0700, pool
/// definitions, lease files and new images 0600.
#[test]
fn files_the_facade_creates_are_not_readable_by_others() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let state = dir.join("deep/state");
    let conn = Connection::open(&state).unwrap();
    for sub in ["", "pools", "locks"] {
        assert_eq!(mode(&state.join(sub)), 0o700, "state/{sub}");
    }
    let img = conn.image(dir.join("new.qcow2"));
    img.create(&NewImage {
        size: Some(1 << 20),
        backing: None,
    })
    .unwrap();
    img.snapshot_create(b"s").unwrap();
    assert_eq!(mode(img.path()), 0o600, "image");
    let leases: Vec<_> = std::fs::read_dir(state.join("locks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!leases.is_empty());
    for l in &leases {
        assert_eq!(mode(l), 0o600, "lease {}", l.display());
    }
    std::fs::create_dir(dir.join("vols")).unwrap();
    conn.define_pool(virt_snap::pool::PoolDef {
        name: "p".into(),
        kind: virt_snap::pool::PoolKind::Dir,
        target: dir.join("vols").display().to_string(),
        thin_pool: None,
    })
    .unwrap();
    for f in std::fs::read_dir(state.join("pools")).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(mode(&f), 0o600, "pool file {}", f.display());
    }
}
