//! Running domains' raw pool volumes snapshotted by their backends (`snapshot='storage'`)
//! while the vCPUs are paused briefly, against real QEMU 10.0.2 on a real btrfs (loop
//! device): a btrfs pool's volume (a subvolume snapshot) and a dir pool's volume whose target
//! is on btrfs (a reflink clone, FICLONE). The snapshot holds exactly the bytes written
//! through QEMU before it, not those written after; it is also a volume snapshot of the pool.

use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use tokio::sync::Mutex;
use virt_snap::domain::DomainState;
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::snapshot::{CaptureRequest, CaptureResult, DiskChoice, DiskRequest, SnapshotName};
use virt_snap::{Connection, Domain, Pool};

/// The tests of this binary run one at a time: one of them sets `VIRT_SNAP_FAILPOINT` in
/// the process environment, which every capture in the process reads.
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn write(dom: &Domain, pattern: u8) {
    let cmd = json!({
        "execute": "human-monitor-command",
        "arguments": {"command-line": format!(
            "qemu-io -d /machine/peripheral/vs-vda/virtio-backend \"write -P 0x{pattern:02x} 0 64k\""
        )}
    });
    let out = dom.monitor_command(&cmd.to_string()).await.unwrap();
    let text = out["return"].as_str().unwrap_or("?");
    assert!(text.is_empty() || text.contains("wrote 65536"), "{out}");
}

fn first_64k(p: &Path) -> Vec<u8> {
    let mut b = vec![0; 65536];
    std::fs::File::open(p).unwrap().read_exact(&mut b).unwrap();
    b
}

/// Kills the QEMU this test started when the test ends, however it ends.
struct Kill(u32);

impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the QEMU this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// A running KVM domain `name` on a btrfs loop mount: `vda` is the raw volume `v1` (4 MiB)
/// of pool `name` of `kind` whose target is `<mount>/pool`; `vdb` a qcow2 file outside it.
struct OnPool {
    _k: Kill,
    dom: Domain,
    pool: Pool,
    /// The pool's target directory.
    root: PathBuf,
    /// Where vdb's image is.
    tmp: tempfile::TempDir,
    _conn: Connection,
    _fs: testbed::Btrfs,
}

async fn running_on_pool(name: &str, kind: PoolKind) -> OnPool {
    let fs = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    let root = fs.mountpoint().join("pool");
    std::fs::create_dir(&root).unwrap();
    conn.define_pool(PoolDef {
        name: name.into(),
        kind,
        target: root.display().to_string(),
        thin_pool: None,
    })
    .unwrap();
    let pool = conn.pool(name).unwrap();
    pool.create_volume(&VolumeSpec {
        name: "v1".into(),
        capacity: 4 << 20,
        format: VolFormat::Raw,
        backing: None,
    })
    .await
    .unwrap();
    let vdb = tmp.path().join("vdb.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", vdb.to_str().unwrap(), "16M"])
        .status()
        .unwrap();
    assert!(st.success());
    let vdb = format!(
        "<disk type='file'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='vdb' bus='virtio'/></disk>",
        vdb.display()
    );
    conn.define(&format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='volume'><driver name='qemu' type='raw'/><source pool='{name}' volume='v1'/>\
         <target dev='vda' bus='virtio'/></disk>{vdb}\
         <controller type='usb' model='none'/></devices></domain>"
    ))
    .await
    .unwrap();
    let dom = conn.start_defined(name, false).await.unwrap();
    let k = Kill(dom.pid().unwrap().unwrap());
    OnPool {
        _k: k,
        dom,
        pool,
        root,
        tmp,
        _conn: conn,
        _fs: fs,
    }
}

/// A disk-only snapshot `name` with `vda` by its storage backend (`snapshot='storage'`),
/// the other disks external (the default).
async fn storage_snapshot(dom: &Domain, name: &str) -> virt_snap::Result<CaptureResult> {
    let mut r = CaptureRequest::new(SnapshotName::new(name).unwrap());
    r.flags.disk_only = true;
    r.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    dom.snapshot_create(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_volume_of_a_running_domain_snapshotted_by_its_backend() {
    let _serial = SERIAL.lock().await;
    let OnPool {
        dom,
        pool,
        root,
        tmp,
        ..
    } = &running_on_pool("bp", PoolKind::Btrfs).await;
    write(dom, 0xab).await;
    let res = storage_snapshot(dom, "st1").await.expect("capture");
    let paused = res.paused.expect("paused for the backend snapshot");
    assert!(paused.as_millis() < 1000, "a brief pause: {paused:?}");
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
    write(dom, 0xcd).await;

    let snaps = pool.volume("v1").snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].name, "st1", "also a volume snapshot of the pool");
    let file = root.join(".snapshots/v1/st1/volume.raw");
    assert_eq!(first_64k(&file), vec![0xab; 65536], "the bytes before it");
    let live = PathBuf::from(pool.volume("v1").path().await.unwrap());
    assert_eq!(first_64k(&live), vec![0xcd; 65536], "the volume runs on");
    let xml = res.xml.unwrap();
    assert!(xml.contains("snapshot='storage'"), "{xml}");
    assert!(
        xml.contains("vdb.st1"),
        "vdb external in the same pause: {xml}"
    );

    // The same plan failing at its transaction (QEMU refuses it: a wrong node name): the
    // backend snapshot taken before it in the same pause is deleted for the domain.
    // (The tests of this binary run one at a time: the environment is this one's.)
    std::env::set_var("VIRT_SNAP_FAILPOINT", "capture:transaction-bad-node");
    let e = storage_snapshot(dom, "st2").await.unwrap_err();
    std::env::remove_var("VIRT_SNAP_FAILPOINT");
    assert!(e.to_string().contains("st2"), "{e}");
    let undo = format!("{e:?}");
    assert!(
        !undo.contains("undo_failures: [\""),
        "everything undone: {undo}"
    );
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
    let names: Vec<_> = pool
        .volume("v1")
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        ["st1"],
        "the backend snapshot of the failed capture is gone"
    );
    assert!(!tmp.path().join("vdb.st2").exists());
    assert!(!tmp.path().join("vdb.st1.st2").exists());
}

/// Whether every extent of `p` is shared with another file (`filefrag -v`'s `shared` flag:
/// a reflink clone, not a copy).
fn all_extents_shared(p: &Path) -> bool {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(p)
        .output()
        .expect("filefrag (e2fsprogs)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let extents: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.trim_start()
                .split(':')
                .next()
                .is_some_and(|n| n.trim().parse::<u32>().is_ok())
        })
        .collect();
    let shared = !extents.is_empty() && extents.iter().all(|l| l.contains("shared"));
    if !shared {
        eprintln!("{text}");
    }
    shared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_volume_of_a_reflink_dir_pool_snapshotted_by_its_backend() {
    let _serial = SERIAL.lock().await;
    let OnPool {
        dom,
        pool,
        root,
        tmp,
        ..
    } = &running_on_pool("rp", PoolKind::Dir).await;
    // A dir pool on btrfs reflinks: it snapshots an open volume (a clone is instant, so the
    // guest's pause stays short), which the planner maps to the reflink backend.
    let info = pool.info().await.unwrap();
    assert!(
        info.capabilities
            .open_volume_snapshots
            .contains(&virt_snap::pool::SnapshotKind::File),
        "{info:?}"
    );
    assert!(info.capabilities.space_efficient_snapshots, "{info:?}");

    write(dom, 0xa5).await;
    let res = storage_snapshot(dom, "st1").await.expect("capture");
    let paused = res.paused.expect("paused for the backend snapshot");
    assert!(paused.as_millis() < 1000, "a brief pause: {paused:?}");
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
    let file = root.join(".snapshots/v1/st1");
    assert!(
        all_extents_shared(&file),
        "a reflink clone of the volume, not a copy"
    );
    write(dom, 0x5a).await;

    let snaps = pool.volume("v1").snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].name, "st1", "also a volume snapshot of the pool");
    assert_eq!(snaps[0].kind, virt_snap::pool::SnapshotKind::File);
    assert_eq!(first_64k(&file), vec![0xa5; 65536], "the bytes before it");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 4 << 20);
    let live = PathBuf::from(pool.volume("v1").path().await.unwrap());
    assert_eq!(live, root.join("v1"));
    assert_eq!(first_64k(&live), vec![0x5a; 65536], "the volume runs on");
    let xml = res.xml.unwrap();
    assert!(xml.contains("snapshot='storage'"), "{xml}");
    assert!(
        xml.contains("vdb.st1"),
        "vdb external in the same pause: {xml}"
    );
    assert!(tmp.path().join("vdb.st1").exists());
    // The domain runs on the volume itself (no overlay on vda) and on vdb's overlay.
    let blocks = dom.block_devices().await.unwrap();
    let src = |t: &str| {
        blocks
            .iter()
            .find(|b| b.target == t)
            .map(|b| b.source.clone())
            .unwrap_or_else(|| panic!("{t} in {blocks:?}"))
    };
    assert_eq!(src("vda"), live.display().to_string());
    assert_eq!(src("vdb"), tmp.path().join("vdb.st1").display().to_string());
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
}
