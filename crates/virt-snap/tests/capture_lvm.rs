//! A running domain's LVM pool volume snapshotted by its backend (`snapshot='storage'`) while
//! the vCPUs are paused, with the LVM commands run for real inside the LVM test guest and
//! checked against their recorded argv.
//!
//! This host has no device-mapper (docs/test-guest.md), so LVM runs in the test guest: the
//! pool's runner executes every tool there through the guest agent, wrapped in a
//! `RecordingRunner` that records each argv. The domain's QEMU runs on this host (KVM, no
//! OS); the LV's device node `/dev/VG/LV` does not exist here, so the test puts a regular
//! file at that path for QEMU to open (the only stand-in: a host without device-mapper cannot
//! have the node). What is proven for real: the plan pauses the vCPUs, runs exactly the
//! backend's `lvcreate` of a thin snapshot inside that pause, resumes, records the snapshot
//! (also a volume snapshot of the pool); the snapshot LV holds the bytes the LV held before
//! (written and read back inside the guest), not those written after.

mod lvm_common;
use lvm_common::{DevDir, InGuest};
use std::path::PathBuf;
use std::sync::Arc;
use virt_snap::domain::DomainState;
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::snapshot::{CaptureRequest, DiskChoice, DiskRequest, SnapshotName};
use virt_snap::{Connection, RecordingRunner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lvm_volume_of_a_running_domain_snapshotted_in_the_lvm_guest() {
    let g = testbed::TestGuest::builder()
        .raw_disk("pv", 256 << 20)
        .start()
        .await
        .expect("test guest (cargo xtask guest-image)");
    // A volume group name of this test's own, so its stand-in node cannot meet another's.
    let vg = format!("vscap{}", std::process::id());
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
    assert_eq!(node, PathBuf::from(format!("/dev/{vg}/v1")));
    let _dev = DevDir(PathBuf::from(format!("/dev/{vg}")));
    std::fs::create_dir(format!("/dev/{vg}")).unwrap();
    std::fs::File::create(&node)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();

    conn.define(
        "<domain type='kvm'><name>caplvm</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='volume'><driver name='qemu' type='raw'/><source pool='lp' volume='v1'/>\
         <target dev='vda' bus='virtio'/></disk>\
         <controller type='usb' model='none'/></devices></domain>",
    )
    .await
    .unwrap();
    let dom = conn.start_defined("caplvm", false).await.unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the QEMU this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _k = Kill(dom.pid().unwrap().unwrap());

    // The bytes before: written inside the guest, on the real LV.
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
    g.sh(&format!(
        "dd if=/dev/urandom of=/dev/{vg}/v1 bs=64k count=4 conv=fsync 2>/dev/null"
    ))
    .await
    .unwrap();
    let before = md5(format!("{vg}/v1")).await;

    rec.clear();
    let mut r = CaptureRequest::new(SnapshotName::new("s1").unwrap());
    r.flags.disk_only = true;
    // Each tool call goes through the agent of a TCG guest: allow the pause that takes.
    r.pause_budget_ms = 30_000;
    r.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    let res = dom.snapshot_create(r).await.expect("capture");
    let paused = res.paused.expect("the vCPUs were paused for it");
    eprintln!("paused {paused:?}; tools run:\n{}", rec.transcript());
    assert_eq!(dom.state().await.unwrap().state, DomainState::Running);
    let calls = rec.calls();
    let creates: Vec<&Vec<String>> = calls
        .iter()
        .filter(|c| c.first().map(String::as_str) == Some("lvcreate"))
        .collect();
    let want: Vec<String> = [
        "lvcreate",
        "-q",
        "-y",
        "-s",
        "-n",
        "v1.s1",
        "--addtag",
        "vs_snap",
        "-pr",
        "--setactivationskip",
        "y",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("{vg}/v1")])
    .collect();
    assert_eq!(
        creates,
        vec![&want],
        "the backend's thin snapshot, once: {}",
        rec.transcript()
    );
    assert!(
        calls
            .iter()
            .all(|c| ["lvs", "vgs", "lvcreate"].contains(&c[0].as_str())),
        "nothing but queries and the one create: {}",
        rec.transcript()
    );

    // The bytes after: the volume changes, the snapshot keeps the bytes before.
    g.sh(&format!(
        "dd if=/dev/urandom of=/dev/{vg}/v1 bs=64k count=4 conv=fsync 2>/dev/null"
    ))
    .await
    .unwrap();
    assert_ne!(md5(format!("{vg}/v1")).await, before);
    // A snapshot LV is created with activation skipped: activate it to read it.
    g.sh(&format!("lvm lvchange -q -ay -K {vg}/v1.s1"))
        .await
        .unwrap();
    assert_eq!(
        md5(format!("{vg}/v1.s1")).await,
        before,
        "the snapshot's bytes"
    );
    let snaps = pool.volume("v1").snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].name, "s1", "also a volume snapshot of the pool");
    let xml = res.xml.unwrap();
    assert!(xml.contains("snapshot='storage'"), "{xml}");
    let lvs = g
        .exec_ok(&["lvs", "--noheadings", "-o", "lv_name,lv_attr", &vg])
        .await
        .unwrap();
    assert!(lvs.contains("v1.s1"), "{lvs}");
}
