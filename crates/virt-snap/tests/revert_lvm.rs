//! A storage snapshot (`snapshot='storage'`) of a running domain's LVM thin volume reverted
//! by `snapshot_revert`, with the LVM commands run for real inside the LVM test guest (this
//! host has no device-mapper; see capture_lvm.rs for the stand-in device node QEMU opens
//! here): the volume's bytes (read inside the guest) are the snapshot's again, the undo
//! volume snapshot is gone, the snapshot LV kept, the domain running on a new QEMU.

mod lvm_common;
use lvm_common::{DevDir, InGuest};
use std::path::PathBuf;
use std::sync::Arc;
use virt_snap::domain::DomainState;
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::snapshot::{
    CaptureRequest, DiskChoice, DiskRequest, RevertFlags, RevertKind, SnapshotName,
};
use virt_snap::{Connection, RecordingRunner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_snapshot_of_an_lvm_thin_volume_reverts_in_the_lvm_guest() {
    let g = testbed::TestGuest::builder()
        .raw_disk("pv", 256 << 20)
        .start()
        .await
        .expect("test guest (cargo xtask guest-image)");
    let vg = format!("vsrev{}", std::process::id());
    g.sh(&format!(
        "lvm pvcreate -q /dev/vdb && lvm vgcreate -q {vg} /dev/vdb && \
         lvm lvcreate -q -y -n tp -L 64m --type thin-pool {vg}"
    ))
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rec = Arc::new(RecordingRunner::wrapping(Arc::new(InGuest(
        g.qga_path().to_path_buf(),
    ))));
    let conn = Connection::builder(tmp.path().join("state"))
        .runner(rec.clone())
        .open()
        .unwrap();
    conn.define_pool(PoolDef {
        name: "lp".into(),
        kind: PoolKind::Logical,
        target: vg.clone(),
        thin_pool: Some("tp".into()),
    })
    .unwrap();
    let pool = conn.pool("lp").unwrap();
    pool.create_volume(&VolumeSpec {
        name: "v1".into(),
        capacity: 8 << 20,
        format: VolFormat::Raw,
        backing: None,
    })
    .await
    .unwrap();
    let node = PathBuf::from(pool.volume("v1").path().await.unwrap());
    let _dev = DevDir(PathBuf::from(format!("/dev/{vg}")));
    std::fs::create_dir(format!("/dev/{vg}")).unwrap();
    std::fs::File::create(&node)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    conn.define(
        "<domain type='kvm'><name>revlvm</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='volume'><driver name='qemu' type='raw'/><source pool='lp' volume='v1'/>\
         <target dev='vda' bus='virtio'/></disk>\
         <controller type='usb' model='none'/></devices></domain>",
    )
    .await
    .unwrap();
    let dom = conn.start_defined("revlvm", false).await.unwrap();
    /// Kills the QEMU running for `dom` when the test ends, however it ends.
    struct Kill<'a>(&'a virt_snap::Domain);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if let Ok(Some(pid)) = self.0.pid() {
                // SAFETY: kill(2) on the QEMU this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    let _k = Kill(&dom);
    let md5 = |lv: String| {
        let g = &g;
        async move {
            g.sh(&format!(
                "dd if=/dev/{lv} bs=64k count=4 2>/dev/null | md5sum"
            ))
            .await
            .unwrap()
        }
    };
    let scribble = || {
        let g = &g;
        let vg = vg.clone();
        async move {
            g.sh(&format!(
                "dd if=/dev/urandom of=/dev/{vg}/v1 bs=64k count=4 conv=fsync 2>/dev/null"
            ))
            .await
            .unwrap();
        }
    };
    scribble().await;
    let before = md5(format!("{vg}/v1")).await;
    let mut r = CaptureRequest::new(SnapshotName::new("s1").unwrap());
    r.flags.disk_only = true;
    r.pause_budget_ms = 30_000;
    r.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    dom.snapshot_create(r).await.expect("capture");
    scribble().await;
    assert_ne!(md5(format!("{vg}/v1")).await, before);
    let pid = dom.pid().unwrap();

    rec.clear();
    let res = dom
        .snapshot_revert(
            "s1",
            RevertFlags {
                running: true,
                ..Default::default()
            },
        )
        .await
        .expect("revert");
    eprintln!("tools run:\n{}", rec.transcript());
    assert_eq!(res.kind, RevertKind::Storage);
    assert_eq!(res.state, DomainState::Running);
    assert!(res.warnings.is_empty(), "{:?}", res.warnings);
    assert_ne!(dom.pid().unwrap(), pid, "a new QEMU");
    assert_eq!(
        md5(format!("{vg}/v1")).await,
        before,
        "the volume holds the snapshot's bytes"
    );
    let names: Vec<String> = pool
        .volume("v1")
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1"], "the snapshot kept, the undo snapshot gone");
    let lvs = g
        .exec_ok(&["lvs", "--noheadings", "-o", "lv_name", &vg])
        .await
        .unwrap();
    assert!(!lvs.contains("vs-revert"), "no undo or temporary LV: {lvs}");
    assert!(lvs.contains("v1.s1"), "{lvs}");
    // The undo snapshot was taken and reverted from with the backend's thin commands.
    let t = rec.transcript();
    assert!(t.contains("-n v1.vs-revert-undo-"), "{t}");
    assert!(t.contains(&format!("{vg}/v1.s1")), "{t}");
}
