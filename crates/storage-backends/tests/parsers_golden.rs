//! Parsers over captured real tool output (lvm2 2.03.16 in the test guest, btrfs-progs 6.2
//! on the host), and the LVM backend's argv checked against golden files with canned `lvs`
//! output (libvirt's approach), including the undo steps of an injected failure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use storage_backends::btrfs::{parse_subvolume_list, parse_time_utc};
use storage_backends::lvm::{parse_lvs, parse_vgs};
use storage_backends::*;

fn data(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[test]
fn lvs_json_of_lvm_2_03_16() {
    let rows = parse_lvs(&data("lvs-2.03.16.json")).unwrap();
    assert_eq!(rows.len(), 9);
    let lin = rows.iter().find(|r| r.name == "lin").unwrap();
    assert_eq!(lin.size, 8 << 20);
    assert_eq!(lin.uuid, "WgV0vU-wx7s-5sLB-n0ps-oIXu-UCsN-NFoh16");
    assert!(!lin.is_thin() && !lin.is_invalid_snapshot());
    assert_eq!(
        parse_time_utc(lin.time.as_deref().unwrap()),
        parse_time_utc("2026-11-27 09:59:56")
    );
    // A COW snapshot that overflowed: attr[4] 'I', 100 %.
    let full = rows.iter().find(|r| r.name == "lin.full").unwrap();
    assert!(full.is_invalid_snapshot());
    assert_eq!(full.snap_percent, Some(100.0));
    assert_eq!(full.origin.as_deref(), Some("lin"));
    assert_eq!(full.tags, ["vs_snap"]);
    let t1 = rows.iter().find(|r| r.name == "thinvol.t1").unwrap();
    assert!(t1.is_thin() && !t1.is_invalid_snapshot());
    assert_eq!(t1.pool_lv.as_deref(), Some("tp"));
    assert_eq!(t1.snap_percent, None);
    assert_eq!(t1.attr.chars().nth(9), Some('k'), "activation skip");
    let tv = rows.iter().find(|r| r.name == "thinvol").unwrap();
    assert_eq!(tv.data_percent, Some(0.0));
    assert!(rows.iter().any(|r| r.name == "[tp_tmeta]"));
    // json_std prints numbers as numbers: accepted too.
    let std_form = r#"{"report":[{"lv":[{"lv_name":"a","lv_size":4194304,"snap_percent":12.5,"lv_attr":"swi-a-s---"}]}]}"#;
    let r = parse_lvs(std_form).unwrap();
    assert_eq!((r[0].size, r[0].snap_percent), (4 << 20, Some(12.5)));
    assert_eq!(
        parse_lvs("Volume group not found").unwrap_err().kind(),
        ErrorKind::ToolFailed
    );
    assert_eq!(
        parse_vgs(&data("vgs-2.03.16.json")).unwrap(),
        (264241152, 171966464)
    );
}

#[test]
fn btrfs_subvolume_list_of_btrfs_progs_6_2() {
    let e = parse_subvolume_list(&data("btrfs-6.2-subvolume-list-s-o.txt")).unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].id, 257);
    assert_eq!(e[0].path, ".snapshots/vol1/s1");
    assert_eq!(e[1].path, ".snapshots/vol1/s 2", "paths keep their spaces");
    assert_eq!(e[1].otime.as_deref(), Some("2026-11-27 09:52:50"));
    let e = parse_subvolume_list(&data("btrfs-6.2-subvolume-list-o.txt")).unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(e[0].otime, None);
    assert!(parse_subvolume_list("garbage line").is_err());
}

/// The captured lvs output, with extra rows and changed fields.
fn lvs_with(extra: &[serde_json::Value], change: &[(&str, &str, &str)]) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&data("lvs-2.03.16.json")).unwrap();
    let lvs = v["report"][0]["lv"].as_array_mut().unwrap();
    for (name, k, val) in change {
        let row = lvs.iter_mut().find(|r| r["lv_name"] == *name).unwrap();
        row[*k] = serde_json::Value::String(val.to_string());
    }
    lvs.extend(extra.iter().cloned());
    v.to_string()
}

fn row(name: &str, attr: &str, seg: &str, origin: &str) -> serde_json::Value {
    serde_json::json!({"lv_name": name, "lv_uuid": format!("uuid-{name}"), "lv_attr": attr,
        "lv_size": "8388608", "origin": origin, "pool_lv": "", "segtype": seg,
        "snap_percent": "0.00", "data_percent": "", "lv_time": "2026-11-27 10:00:00 +0000",
        "lv_tags": "vs_snap"})
}

fn is_lvs(a: &[String]) -> bool {
    a.first().is_some_and(|p| p == "lvs")
}

/// A dry-run pool on vg0 (thin pool tp) whose `lvs` answers `first` once, then `then`.
fn pool(
    first: String,
    then: String,
) -> (Arc<RecordingRunner>, Box<dyn Backend>, tempfile::TempDir) {
    let rec = Arc::new(RecordingRunner::new().remote());
    rec.answer(is_lvs, Output::ok(first), Some(1));
    rec.answer(is_lvs, Output::ok(then), None);
    let state = tempfile::tempdir().unwrap();
    let b = open_pool(
        PoolDef {
            name: "lv".into(),
            kind: PoolKind::Logical,
            target: "vg0".into(),
            thin_pool: Some("tp".into()),
        },
        rec.clone(),
        locking::LockManager::local(state.path().join("locks")).unwrap(),
    )
    .unwrap();
    (rec, b, state)
}

fn check(rec: &RecordingRunner, name: &str) {
    if let Err(e) = rec.check_golden(&golden(name)) {
        panic!("{e}");
    }
}

#[tokio::test]
async fn lvm_snapshot_create_golden_argv() {
    let base = data("lvs-2.03.16.json");
    let (rec, p, _s) = pool(
        base.clone(),
        lvs_with(&[row("lin.s2", "sri-a-s---", "linear", "lin")], &[]),
    );
    let s = p
        .create_snapshot(
            "lin",
            "s2",
            &SnapshotOptions {
                size: Some(4 << 20),
            },
        )
        .await
        .unwrap();
    assert_eq!((s.kind, s.valid), (SnapshotKind::LvmCow, true));
    check(&rec, "lvm-create-cow-snapshot.argv");

    let thin = {
        let mut r = row("thinvol.t2", "Vri---tz-k", "thin", "thinvol");
        r["pool_lv"] = "tp".into();
        r
    };
    let (rec, p, _s) = pool(base.clone(), lvs_with(&[thin], &[]));
    let s = p
        .create_snapshot("thinvol", "t2", &SnapshotOptions::default())
        .await
        .unwrap();
    assert_eq!(s.kind, SnapshotKind::LvmThin);
    check(&rec, "lvm-create-thin-snapshot.argv");
    // Thin snapshots have no size.
    let e = p
        .create_snapshot(
            "thinvol",
            "t3",
            &SnapshotOptions {
                size: Some(1 << 20),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);

    // Listing reports the overflowed COW snapshot as invalid, and refuses to revert to it.
    let (_rec, p, _s) = pool(base.clone(), base.clone());
    let list = p.list_snapshots("lin").await.unwrap();
    let names: Vec<(&str, bool)> = list.iter().map(|s| (s.name.as_str(), s.valid)).collect();
    assert_eq!(names, [("s1", false), ("full", false)]);
    let e = p.revert_snapshot("lin", "full").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidSnapshot, "{e}");
    let vols: Vec<String> = p
        .list_volumes()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(vols, ["lin", "thinvol"]);
}

/// Acting for a running domain: the same `lvcreate -s` as an offline snapshot, under the
/// domain's operation lock, checked against the VM start's lease on the LV's identity
/// (`vg0/thinvol`, the key of every operation on it); anyone else runs no command.
#[tokio::test]
async fn lvm_snapshot_for_a_domain_golden_argv() {
    let base = data("lvs-2.03.16.json");
    let thin = {
        let mut r = row("thinvol.t2", "Vri---tz-k", "thin", "thinvol");
        r["pool_lv"] = "tp".into();
        r
    };
    let (rec, p, state) = pool(base.clone(), lvs_with(&[thin], &[]));
    assert!(p
        .capabilities()
        .open_volume_snapshots
        .contains(&SnapshotKind::LvmThin));
    let res = locking::Resource::LogicalVolume {
        vg: "vg0".into(),
        lv: "thinvol".into(),
        image: None,
    };
    let lm = locking::LockManager::local(state.path().join("locks")).unwrap();
    let _vm = lm
        .acquire(&locking::Purpose::VmStart {
            domain: "vm1".into(),
            disks: vec![locking::DiskUse::writable(res)],
        })
        .unwrap();
    let me = DomainRef {
        domain: "vm1".into(),
        qemu_pid: std::process::id(),
    };
    let opts = SnapshotOptions::default();
    // Refused without running anything: a plain operation, a wrong domain, a wrong pid.
    let e = p.create_snapshot("thinvol", "t2", &opts).await.unwrap_err();
    assert!(e.to_string().contains("in use by domain \"vm1\""), "{e}");
    for d in [
        DomainRef {
            domain: "vm2".into(),
            qemu_pid: me.qemu_pid,
        },
        DomainRef {
            domain: "vm1".into(),
            qemu_pid: me.qemu_pid + 1,
        },
    ] {
        let e = p
            .create_snapshot_for_domain("thinvol", "t2", &d, &opts)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(e.to_string().contains("is not held by domain"), "{e}");
    }
    // Create takes the new volume's lease too (the key a VM start on it would take).
    let held = lm
        .acquire(&locking::Purpose::VolumeOp {
            op: "other".into(),
            volumes: vec![locking::Resource::LogicalVolume {
                vg: "vg0".into(),
                lv: "newvol".into(),
                image: None,
            }],
        })
        .unwrap();
    let e = p
        .create_volume(&VolumeSpec {
            name: "newvol".into(),
            capacity: 1 << 20,
            format: VolFormat::Raw,
            backing: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    drop(held);
    assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    let s = p
        .create_snapshot_for_domain("thinvol", "t2", &me, &opts)
        .await
        .unwrap();
    assert_eq!(s.kind, SnapshotKind::LvmThin);
    check(&rec, "lvm-create-snapshot-for-domain.argv");
}

#[tokio::test]
async fn lvm_revert_golden_argv_and_undo_of_an_injected_failure() {
    let base = data("lvs-2.03.16.json");
    let (rec, p, _s) = pool(base.clone(), base.clone());
    p.revert_snapshot("thinvol", "t1").await.unwrap();
    check(&rec, "lvm-revert-thin.argv");

    // COW: a valid snapshot is merged, then taken again with the same size.
    let valid = lvs_with(
        &[],
        &[
            ("lin.s1", "lv_attr", "sri-a-s---"),
            ("lin.s1", "snap_percent", "3.00"),
        ],
    );
    let (rec, p, _s) = pool(valid.clone(), valid);
    p.revert_snapshot("lin", "s1").await.unwrap();
    check(&rec, "lvm-revert-cow.argv");

    // The second rename fails: the steps done are undone, last first.
    let (rec, p, _s) = pool(base.clone(), base.clone());
    rec.fail_once(
        &["lvrename", "-q", "vg0", "thinvol.vs-revert"],
        "  injected failure",
    );
    let e = p.revert_snapshot("thinvol", "t1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ToolFailed);
    assert!(e.not_undone().is_empty(), "{e}");
    check(&rec, "lvm-revert-thin-injected-failure.argv");

    // The re-snapshot after a COW merge fails: the merge cannot be undone, and says so.
    let valid = lvs_with(
        &[],
        &[
            ("lin.s1", "lv_attr", "sri-a-s---"),
            ("lin.s1", "snap_percent", "3.00"),
        ],
    );
    let (rec, p, _s) = pool(valid.clone(), valid);
    rec.fail_once(
        &["lvcreate"],
        "  Volume group \"vg0\" has insufficient free space",
    );
    let e = p.revert_snapshot("lin", "s1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert_eq!(e.not_undone().len(), 1, "{e}");
    assert!(
        e.to_string()
            .contains("could not undo: the merge of vg0/lin.s1"),
        "{e}"
    );

    // Deleting a volume whose last step fails says which snapshots are already gone.
    let (rec, p, _s) = pool(base.clone(), base.clone());
    rec.fail_once(&["lvremove", "-q", "-y", "vg0/lin"], "  injected failure");
    let e = p.delete_volume("lin").await.unwrap_err();
    assert_eq!(e.not_undone().len(), 2, "{e}");
    assert!(
        e.to_string()
            .contains("the removal of snapshot LV vg0/lin.full"),
        "{e}"
    );
}

#[tokio::test]
async fn lvm_volume_create_delete_info_golden_argv() {
    let base = data("lvs-2.03.16.json");
    let new = {
        let mut r = row("v2", "Vwi-a-tz--", "thin", "");
        r["lv_tags"] = "".into();
        r
    };
    let (rec, p, _s) = pool(base.clone(), lvs_with(&[new], &[]));
    rec.answer(
        |a| a.first().is_some_and(|p| p == "vgs"),
        Output::ok(data("vgs-2.03.16.json")),
        None,
    );
    let v = p
        .create_volume(&VolumeSpec {
            name: "v2".into(),
            capacity: 8 << 20,
            format: VolFormat::Raw,
            backing: None,
        })
        .await
        .unwrap();
    assert_eq!(v.path, "/dev/vg0/v2");
    let info = p.info().await.unwrap();
    assert_eq!((info.capacity, info.available), (264241152, 171966464));
    p.delete_volume("lin").await.unwrap();
    check(&rec, "lvm-create-info-delete.argv");
    for bad in ["a.b", "snapshot0", "x y", "../x"] {
        let e = p
            .create_volume(&VolumeSpec {
                name: bad.into(),
                capacity: 8 << 20,
                format: VolFormat::Raw,
                backing: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
    }
    let e = p
        .create_volume(&VolumeSpec {
            name: "q".into(),
            capacity: 8 << 20,
            format: VolFormat::Qcow2,
            backing: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
}
