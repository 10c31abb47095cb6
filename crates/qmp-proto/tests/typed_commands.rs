//! Every typed command of `qmp_proto::commands` against a real QEMU 10.0.2 (KVM, no guest
//! OS) started by the testbed; outcomes are checked through QMP and with `qemu-img` on the
//! files.
//!
//! Needs qemu-system-x86_64 10.0.2, qemu-img and /dev/kvm: run `cargo xtask deps` first. A
//! missing component fails the test with that hint; nothing is skipped.

use std::path::Path;
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use qmp_proto::commands::*;
use qmp_proto::{ErrorKind, QmpClient};
use serde_json::Value;
use testbed::{DiskFormat, Qemu};

const T: Duration = Duration::from_secs(20);
const SIZE: u64 = 64 << 20;

fn qemu(disks: &[&str]) -> Qemu {
    let mut b = Qemu::builder();
    for d in disks {
        b = b.disk(d, DiskFormat::Qcow2, SIZE);
    }
    b.spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU (run `cargo xtask deps`): {e}"))
}

async fn connect(q: &Qemu) -> QmpClient {
    tokio::time::timeout(T, QmpClient::connect_unix(q.qmp_path()))
        .await
        .expect("connect hung")
        .unwrap_or_else(|e| panic!("QMP connect failed: {e}\nQEMU log:\n{}", q.log()))
}

/// The node inserted in the device whose qdev id is `<disk>-dev` (under -blockdev,
/// query-block's `device` is "").
async fn active(c: &QmpClient, disk: &str) -> BlockDeviceInfo {
    let blocks = c.run(&QueryBlock).await.unwrap();
    let qdev = format!("{disk}-dev");
    let b = blocks
        .iter()
        .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains(&qdev)))
        .unwrap_or_else(|| panic!("no device {qdev} in {blocks:#?}"));
    assert_eq!(b.device, "", "-blockdev disks have no backend name");
    b.inserted.clone().expect("medium inserted")
}

fn qemu_img_json(args: &[&str], path: &Path) -> Value {
    let out = Proc::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .expect("run qemu-img (run `cargo xtask deps`)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img JSON")
}

fn image_info(path: &Path) -> Value {
    qemu_img_json(&["info", "-U", "--output=json"], path)
}

/// Names of the internal snapshots `qemu-img snapshot -l` lists.
fn qemu_img_snapshots(path: &Path) -> Vec<String> {
    let out = Proc::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(path)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "ID  TAG  VM_SIZE  DATE  VM_CLOCK  ICOUNT" rows after a header line.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn typed_stop_cont_query_status() {
    let q = qemu(&[]);
    let c = connect(&q).await;
    let st = c.run(&QueryStatus).await.unwrap();
    assert_eq!(
        st,
        StatusInfo {
            running: true,
            status: RunState::Running
        }
    );
    let mut ev = c.subscribe();
    c.run(&Stop).await.unwrap();
    ev.wait_for("STOP", T).await.unwrap();
    let st = c.run(&QueryStatus).await.unwrap();
    assert!(!st.running);
    assert_eq!(st.status, RunState::Paused);
    c.run(&Cont).await.unwrap();
    ev.wait_for("RESUME", T).await.unwrap();
    assert_eq!(c.run(&QueryStatus).await.unwrap().status, RunState::Running);
    // The raw form still works next to the typed one.
    let raw = c.execute("query-status", None).await.unwrap();
    assert_eq!(raw["status"], "running");
}

#[tokio::test]
async fn typed_query_block_and_named_nodes_identify_the_disks() {
    let q = qemu(&["d0", "d1"]);
    let c = connect(&q).await;
    for d in ["d0", "d1"] {
        let node = active(&c, d).await;
        assert_eq!(node.node_name.as_deref(), Some(d));
        assert_eq!(node.drv, "qcow2");
        assert!(!node.ro);
        assert_eq!(node.file, path_str(&q.disk(d).path));
        assert_eq!(node.image.virtual_size, SIZE);
        assert_eq!(node.image.format, "qcow2");
        assert_eq!(node.backing_file_depth, 0);
    }
    let nodes = c
        .run(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    let find = |n: &str| {
        nodes
            .iter()
            .find(|b| b.node_name.as_deref() == Some(n))
            .unwrap_or_else(|| panic!("{n} missing from {nodes:#?}"))
    };
    for d in ["d0", "d1"] {
        assert_eq!(find(d).drv, "qcow2");
        let f = find(&format!("{d}-file"));
        assert_eq!(f.drv, "file");
        assert_eq!(f.file, path_str(&q.disk(d).path));
    }
    assert_eq!(nodes.len(), 4, "{nodes:#?}");
}

#[tokio::test]
async fn typed_blockdev_create_add_snapshot_and_del() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    let base = q.disk("d0").path.clone();
    let ovl = q.dir().join("d0.ovl.qcow2");
    // Create the overlay file and format it, both as jobs.
    c.run_job_command(
        &BlockdevCreate {
            job_id: "mkfile".into(),
            options: BlockdevCreateOptions::file(&ovl, 0),
        },
        T,
    )
    .await
    .unwrap();
    c.run(&BlockdevAdd(BlockdevOptions::file("ovl-file", &ovl)))
        .await
        .unwrap();
    c.run_job_command(
        &BlockdevCreate {
            job_id: "fmt".into(),
            options: BlockdevCreateOptions::qcow2("ovl-file", SIZE).backing_file(&base, "qcow2"),
        },
        T,
    )
    .await
    .unwrap();
    c.run(&BlockdevAdd(
        BlockdevOptions::qcow2("ovl", "ovl-file").backing(None),
    ))
    .await
    .unwrap();
    assert!(
        c.run(&QueryJobs).await.unwrap().is_empty(),
        "jobs dismissed"
    );
    c.run(&BlockdevSnapshot {
        node: "d0".into(),
        overlay: "ovl".into(),
    })
    .await
    .unwrap();
    let top = active(&c, "d0").await;
    assert_eq!(top.node_name.as_deref(), Some("ovl"));
    assert_eq!(top.file, path_str(&ovl));
    assert_eq!(top.backing_file_depth, 1);
    let backing = top.image.backing_image.expect("backing image");
    assert_eq!(backing.filename, path_str(&base));
    let info = image_info(&ovl);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], SIZE);
    assert_eq!(info["backing-filename"], path_str(&base).as_str(), "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2");

    // blockdev-del of a node nothing uses; of a node in use it fails.
    let spare = q.dir().join("spare.raw");
    std::fs::write(&spare, vec![0u8; 4096]).unwrap();
    c.run(&BlockdevAdd(
        BlockdevOptions::file("spare", &spare).read_only(true),
    ))
    .await
    .unwrap();
    c.run(&BlockdevDel {
        node_name: "spare".into(),
    })
    .await
    .unwrap();
    let nodes = c.run(&QueryNamedBlockNodes::default()).await.unwrap();
    assert!(nodes
        .iter()
        .all(|n| n.node_name.as_deref() != Some("spare")));
    let e = c
        .run(&BlockdevDel {
            node_name: "ovl".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
    assert_eq!(e.class(), Some("GenericError"));
    assert_eq!(e.command(), Some("blockdev-del"));
}

#[tokio::test]
async fn typed_transaction_of_two_disks_and_its_atomic_failure() {
    let q = qemu(&["d0", "d1"]);
    let c = connect(&q).await;
    let s = |d: &str, n: u32| q.dir().join(format!("{d}.s{n}.qcow2"));
    let sync = |d: &str, n: u32| {
        TransactionAction::BlockdevSnapshotSync(
            BlockdevSnapshotSync::node(d, s(d, n)).snapshot_node_name(&format!("{d}-s{n}")),
        )
    };
    let t0 = Instant::now();
    c.run(
        &Transaction::new(vec![sync("d0", 1), sync("d1", 1)])
            .completion_mode(ActionCompletionMode::Individual),
    )
    .await
    .unwrap();
    eprintln!("2-disk transaction: {:?}", t0.elapsed());
    for d in ["d0", "d1"] {
        let top = active(&c, d).await;
        assert_eq!(top.node_name.as_deref(), Some(format!("{d}-s1").as_str()));
        assert_eq!(top.backing_file_depth, 1);
        let info = image_info(&s(d, 1));
        assert_eq!(info["backing-filename"], path_str(&q.disk(d).path).as_str());
    }

    // One action fails (its directory does not exist): neither disk changes.
    let bad = TransactionAction::BlockdevSnapshotSync(
        BlockdevSnapshotSync::node("d1", q.dir().join("no/such/dir/x.qcow2"))
            .snapshot_node_name("d1-s2"),
    );
    let e = c
        .run(&Transaction::new(vec![sync("d0-s1", 2), bad]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
    assert_eq!(e.command(), Some("transaction"));
    for d in ["d0", "d1"] {
        let top = active(&c, d).await;
        assert_eq!(
            top.node_name.as_deref(),
            Some(format!("{d}-s1").as_str()),
            "{d} changed"
        );
        assert_eq!(top.backing_file_depth, 1);
    }
    // The `abort` action fails a transaction on purpose.
    let e = c
        .run(&Transaction::new(vec![
            sync("d0-s1", 3),
            TransactionAction::Abort(Empty {}),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
    assert_eq!(active(&c, "d0").await.node_name.as_deref(), Some("d0-s1"));
}

#[tokio::test]
async fn typed_internal_snapshot_sync_and_delete() {
    let q = qemu(&["d0", "d1"]);
    let c = connect(&q).await;
    let p0 = q.disk("d0").path.clone();
    c.run(&BlockdevSnapshotInternalSync {
        device: "d0".into(),
        name: "int1".into(),
    })
    .await
    .unwrap();
    assert_eq!(qemu_img_snapshots(&p0), ["int1"]);
    let node = active(&c, "d0").await;
    let snaps = node.image.snapshots.expect("snapshots listed");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, "int1");
    // As a transaction action, for both disks at once.
    c.run(&Transaction::new(
        ["d0", "d1"]
            .iter()
            .map(|d| {
                TransactionAction::BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync {
                    device: (*d).into(),
                    name: "int2".into(),
                })
            })
            .collect(),
    ))
    .await
    .unwrap();
    assert_eq!(qemu_img_snapshots(&p0), ["int1", "int2"]);
    assert_eq!(qemu_img_snapshots(&q.disk("d1").path), ["int2"]);
    let gone = c
        .run(&BlockdevSnapshotDeleteInternalSync {
            device: "d0".into(),
            id: None,
            name: Some("int1".into()),
        })
        .await
        .unwrap();
    assert_eq!(gone.name, "int1");
    assert_eq!(gone.vm_state_size, 0);
    assert!(gone.date_sec > 1_600_000_000, "{gone:?}");
    assert_eq!(qemu_img_snapshots(&p0), ["int2"]);
    let e = c
        .run(&BlockdevSnapshotDeleteInternalSync {
            device: "d0".into(),
            id: None,
            name: Some("int1".into()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
}

#[tokio::test]
async fn typed_snapshot_save_load_delete_jobs() {
    let q = qemu(&["d0", "d1"]);
    let c = connect(&q).await;
    let devs = vec!["d0".to_owned(), "d1".to_owned()];
    let t0 = Instant::now();
    c.run_job_command(
        &SnapshotSave {
            job_id: "save".into(),
            tag: "vm1".into(),
            vmstate: "d0".into(),
            devices: devs.clone(),
        },
        T,
    )
    .await
    .unwrap();
    eprintln!("snapshot-save: {:?}", t0.elapsed());
    let info = image_info(&q.disk("d0").path);
    let snaps = info["snapshots"].as_array().expect("snapshots");
    assert_eq!(snaps[0]["name"], "vm1");
    assert!(snaps[0]["vm-state-size"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(qemu_img_snapshots(&q.disk("d1").path), ["vm1"]);
    assert!(c.run(&QueryJobs).await.unwrap().is_empty());

    c.run_job_command(
        &SnapshotLoad {
            job_id: "load".into(),
            tag: "vm1".into(),
            vmstate: "d0".into(),
            devices: devs.clone(),
        },
        T,
    )
    .await
    .unwrap();
    // A failing save: the command answers {} and the job concludes with an error.
    let e = c
        .run_job_command(
            &SnapshotSave {
                job_id: "bad".into(),
                tag: "vm2".into(),
                vmstate: "nosuchnode".into(),
                devices: devs.clone(),
            },
            T,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(e.desc().unwrap().contains("nosuchnode"), "{e}");
    assert!(
        c.run(&QueryJobs).await.unwrap().is_empty(),
        "failed job dismissed"
    );
    c.run_job_command(
        &SnapshotDelete {
            job_id: "del".into(),
            tag: "vm1".into(),
            devices: devs,
        },
        T,
    )
    .await
    .unwrap();
    assert!(qemu_img_snapshots(&q.disk("d0").path).is_empty());
    assert!(qemu_img_snapshots(&q.disk("d1").path).is_empty());
    assert_eq!(c.run(&QueryStatus).await.unwrap().status, RunState::Running);
}

/// Waits for `JOB_STATUS_CHANGE` to `want`.
async fn wait_status(ev: &mut qmp_proto::EventStream, want: &str) {
    let deadline = Instant::now() + T;
    loop {
        let e = tokio::time::timeout(deadline - Instant::now(), ev.next())
            .await
            .unwrap_or_else(|_| panic!("no JOB_STATUS_CHANGE to {want}"))
            .expect("connection open");
        if e.name == "JOB_STATUS_CHANGE" && e.data["status"] == want {
            return;
        }
    }
}

/// Snapshot `d0` into an overlay `ovl` (QEMU creates the file).
async fn overlay(c: &QmpClient, q: &Qemu, node: &str, name: &str) -> std::path::PathBuf {
    let f = q.dir().join(format!("{name}.qcow2"));
    c.run(&BlockdevSnapshotSync::node(node, &f).snapshot_node_name(name))
        .await
        .unwrap();
    f
}

#[tokio::test]
async fn typed_block_commit_active_layer_ready_then_complete() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    overlay(&c, &q, "d0", "ovl").await;
    assert_eq!(active(&c, "d0").await.node_name.as_deref(), Some("ovl"));
    let mut ev = c.subscribe();
    let t0 = Instant::now();
    c.run(&BlockCommit {
        job_id: Some("commit".into()),
        device: "ovl".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ready = ev.wait_for("BLOCK_JOB_READY", T).await.unwrap();
    assert_eq!(ready.data["device"], "commit");
    eprintln!("active commit to READY: {:?}", t0.elapsed());
    let jobs = c.run(&QueryJobs).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, "commit");
    assert_eq!(jobs[0].kind, "commit");
    assert_eq!(jobs[0].status, JobStatus::Ready);
    c.run(&JobComplete::new("commit")).await.unwrap();
    let done = ev.wait_for("BLOCK_JOB_COMPLETED", T).await.unwrap();
    assert!(done.data.get("error").is_none(), "{done:?}");
    // Pivoted back to the base.
    let top = active(&c, "d0").await;
    assert_eq!(top.node_name.as_deref(), Some("d0"));
    assert_eq!(top.backing_file_depth, 0);
    assert!(c.run(&QueryJobs).await.unwrap().is_empty());
}

#[tokio::test]
async fn typed_block_commit_pending_finalize_dismiss_and_job_cancel() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    overlay(&c, &q, "d0", "mid").await;
    let top_file = overlay(&c, &q, "mid", "top").await;
    // Non-active commit of `mid` into `d0`, held at pending and at concluded.
    let mut ev = c.subscribe();
    let commit = BlockCommit {
        job_id: Some("c1".into()),
        device: "top".into(),
        top_node: Some("mid".into()),
        base_node: Some("d0".into()),
        auto_finalize: Some(false),
        auto_dismiss: Some(false),
        ..Default::default()
    };
    c.run(&commit).await.unwrap();
    wait_status(&mut ev, "pending").await;
    assert_eq!(
        c.run(&QueryJobs).await.unwrap()[0].status,
        JobStatus::Pending
    );
    c.run(&JobFinalize::new("c1")).await.unwrap();
    wait_status(&mut ev, "concluded").await;
    let jobs = c.run(&QueryJobs).await.unwrap();
    assert_eq!(jobs[0].status, JobStatus::Concluded);
    assert_eq!(jobs[0].error, None);
    c.run(&JobDismiss::new("c1")).await.unwrap();
    assert!(c.run(&QueryJobs).await.unwrap().is_empty());
    let top = active(&c, "d0").await;
    assert_eq!(top.node_name.as_deref(), Some("top"));
    assert_eq!(top.backing_file_depth, 1, "mid committed away");
    assert_eq!(
        image_info(&top_file)["backing-filename"],
        path_str(&q.disk("d0").path).as_str()
    );

    // job-cancel of a ready active commit: no pivot, BLOCK_JOB_CANCELLED.
    c.run(&BlockCommit {
        job_id: Some("c2".into()),
        device: "top".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    ev.wait_for("BLOCK_JOB_READY", T).await.unwrap();
    c.run(&JobCancel::new("c2")).await.unwrap();
    let e = ev.wait_for("BLOCK_JOB_CANCELLED", T).await.unwrap();
    assert_eq!(e.data["device"], "c2");
    assert_eq!(active(&c, "d0").await.node_name.as_deref(), Some("top"));
    let e = c.run(&JobCancel::new("c2")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "no such job any more: {e}");
}

#[tokio::test]
async fn typed_block_stream_flattens_the_chain() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    let f = overlay(&c, &q, "d0", "ovl").await;
    assert!(image_info(&f).get("backing-filename").is_some());
    c.run_job_command(
        &BlockStream {
            job_id: Some("stream".into()),
            device: "ovl".into(),
            ..Default::default()
        },
        T,
    )
    .await
    .unwrap();
    let top = active(&c, "d0").await;
    assert_eq!(top.node_name.as_deref(), Some("ovl"));
    assert_eq!(top.backing_file_depth, 0);
    let info = image_info(&f);
    assert!(info.get("backing-filename").is_none(), "{info}");
}

#[tokio::test]
async fn typed_blockdev_reopen_read_only() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    let f = q.dir().join("extra.qcow2");
    let st = Proc::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&f)
        .arg("1M")
        .status()
        .expect("run qemu-img");
    assert!(st.success());
    c.run(&BlockdevAdd(BlockdevOptions::file("x-file", &f)))
        .await
        .unwrap();
    c.run(&BlockdevAdd(BlockdevOptions::qcow2("x", "x-file")))
        .await
        .unwrap();
    let ro = |nodes: &[BlockDeviceInfo], n: &str| {
        nodes
            .iter()
            .find(|b| b.node_name.as_deref() == Some(n))
            .unwrap()
            .ro
    };
    let nodes = c
        .run(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    assert!(!ro(&nodes, "x"));
    c.run(&BlockdevReopen {
        options: vec![
            BlockdevOptions::file("x-file", &f).read_only(true),
            BlockdevOptions::qcow2("x", "x-file").read_only(true),
        ],
    })
    .await
    .unwrap();
    let nodes = c
        .run(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    assert!(ro(&nodes, "x"));
    assert!(ro(&nodes, "x-file"));
    // Reopening an unknown node is QEMU's error.
    let e = c
        .run(&BlockdevReopen {
            options: vec![BlockdevOptions::qcow2("nope", "x-file")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
}

#[tokio::test]
async fn typed_migrate_background_snapshot_to_a_file() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    let before = c.run(&QueryMigrate).await.unwrap();
    assert_eq!(before.status, None);
    c.run(&MigrateSetCapabilities {
        capabilities: vec![MigrationCapabilityStatus::new("background-snapshot", true)],
    })
    .await
    .unwrap();
    let caps = c.run(&QueryMigrateCapabilities).await.unwrap();
    assert!(caps
        .iter()
        .any(|x| x.capability == "background-snapshot" && x.state));
    let state = q.dir().join("ram.state");
    let t0 = Instant::now();
    c.run(&Migrate::to(format!("file:{}", state.display())))
        .await
        .unwrap();
    let info = loop {
        let info = c.run(&QueryMigrate).await.unwrap();
        match &info.status {
            Some(MigrationStatus::Completed) => break info,
            Some(MigrationStatus::Failed) => panic!("migration failed: {info:?}"),
            _ if t0.elapsed() > T => panic!("migration did not complete: {info:?}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    eprintln!(
        "background snapshot: {:?}, downtime {:?} ms",
        t0.elapsed(),
        info.downtime
    );
    let ram = info.ram.expect("ram stats");
    assert!(ram.total >= 128 << 20, "{ram:?}");
    let len = std::fs::metadata(&state).expect("state file").len();
    assert!(len > 0);
    assert_eq!(c.run(&QueryStatus).await.unwrap().status, RunState::Running);
    // Nothing to cancel any more: QEMU accepts it and stays completed.
    c.run(&MigrateCancel).await.unwrap();
}

#[tokio::test]
async fn typed_quit_ends_qemu() {
    let mut q = qemu(&[]);
    let c = connect(&q).await;
    c.run(&Quit).await.unwrap();
    tokio::time::timeout(T, c.closed()).await.unwrap();
    let e = c.run(&QueryStatus).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Disconnected);
    assert!(q.wait_exit(T).is_some(), "QEMU did not exit after quit");
}

#[tokio::test]
async fn typed_dirty_bitmaps_in_a_transaction() {
    let q = qemu(&["d0"]);
    let c = connect(&q).await;
    c.run(&Transaction::new(vec![
        TransactionAction::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
            node: "d0".into(),
            name: "b0".into(),
            granularity: Some(65536),
            persistent: Some(true),
            disabled: None,
        }),
        TransactionAction::BlockDirtyBitmapDisable(BlockDirtyBitmap {
            node: "d0".into(),
            name: "b0".into(),
        }),
    ]))
    .await
    .unwrap();
    // query-block lists bitmaps in the raw reply (not modelled): check it there.
    let raw = c.execute("query-named-block-nodes", None).await.unwrap();
    let d0 = raw
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "d0")
        .unwrap();
    let bm = &d0["dirty-bitmaps"][0];
    assert_eq!(bm["name"], "b0");
    assert_eq!(bm["recording"], false);
    assert_eq!(bm["granularity"], 65536);
    c.run(&BlockDirtyBitmapRemove(BlockDirtyBitmap {
        node: "d0".into(),
        name: "b0".into(),
    }))
    .await
    .unwrap();
    let raw = c.execute("query-named-block-nodes", None).await.unwrap();
    let d0 = raw
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "d0")
        .unwrap();
    assert!(d0
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .is_none_or(|a| a.is_empty()));
}

#[tokio::test]
async fn typed_reply_that_does_not_decode_is_a_protocol_error() {
    // A command whose declared reply type does not match what QEMU returns.
    #[derive(serde::Serialize)]
    struct QueryVersionAsStatus;
    impl qmp_proto::Command for QueryVersionAsStatus {
        const NAME: &'static str = "query-version";
        type Returns = StatusInfo;
    }
    let q = qemu(&[]);
    let c = connect(&q).await;
    let e = c.run(&QueryVersionAsStatus).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert_eq!(e.command(), Some("query-version"));
    // The connection is fine afterwards.
    assert!(c.run(&QueryStatus).await.unwrap().running);
}

/// QEMU's own schema (`query-qmp-schema`), indexed by entity name.
struct Schema(std::collections::HashMap<String, Value>);

impl Schema {
    async fn fetch(c: &QmpClient) -> Schema {
        let all = c.execute("query-qmp-schema", None).await.unwrap();
        Schema(
            all.as_array()
                .unwrap()
                .iter()
                .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
                .collect(),
        )
    }

    /// Checks that `v` is a valid value of schema type `ty`; problems go to `errs`.
    fn check(&self, ty: &str, v: &Value, path: &str, errs: &mut Vec<String>) {
        if let Some(elem) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            match v.as_array() {
                Some(a) => {
                    for (i, x) in a.iter().enumerate() {
                        self.check(elem, x, &format!("{path}[{i}]"), errs);
                    }
                }
                None => errs.push(format!("{path}: not an array: {v}")),
            }
            return;
        }
        let Some(t) = self.0.get(ty) else {
            errs.push(format!("{path}: unknown type {ty}"));
            return;
        };
        match t["meta-type"].as_str().unwrap() {
            "builtin" => {
                let ok = match t["json-type"].as_str().unwrap() {
                    "string" => v.is_string(),
                    "int" => v.is_i64() || v.is_u64(),
                    "number" => v.is_number(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    _ => true,
                };
                if !ok {
                    errs.push(format!("{path}: {v} is not a {ty}"));
                }
            }
            "enum" => {
                let known = t["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| Some(x) == Some(v));
                if !known {
                    errs.push(format!("{path}: {v} is not a value of enum {ty}"));
                }
            }
            "alternate" => {
                // Accept the value if any alternative takes it.
                let ok = t["members"].as_array().unwrap().iter().any(|m| {
                    let mut e = Vec::new();
                    self.check(m["type"].as_str().unwrap(), v, path, &mut e);
                    e.is_empty()
                });
                if !ok {
                    errs.push(format!("{path}: {v} fits no alternative of {ty}"));
                }
            }
            "object" => {
                let Some(obj) = v.as_object() else {
                    errs.push(format!("{path}: not an object: {v}"));
                    return;
                };
                let mut members: Vec<&Value> = t["members"].as_array().unwrap().iter().collect();
                if let Some(tag) = t["tag"].as_str() {
                    let case = obj.get(tag).and_then(Value::as_str).unwrap_or_default();
                    match t["variants"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|x| x["case"] == case)
                    {
                        Some(var) => {
                            let vt = &self.0[var["type"].as_str().unwrap()];
                            members.extend(vt["members"].as_array().unwrap());
                        }
                        None => errs.push(format!("{path}: no variant {tag}={case} in {ty}")),
                    }
                }
                for (k, x) in obj {
                    match members.iter().find(|m| m["name"] == k.as_str()) {
                        Some(m) => {
                            self.check(m["type"].as_str().unwrap(), x, &format!("{path}.{k}"), errs)
                        }
                        None => errs.push(format!("{path}: QEMU knows no member `{k}` in {ty}")),
                    }
                }
                for m in &members {
                    let name = m["name"].as_str().unwrap();
                    if m.get("default").is_none() && !obj.contains_key(name) {
                        errs.push(format!("{path}: required member `{name}` missing"));
                    }
                }
            }
            other => errs.push(format!("{path}: unexpected meta-type {other}")),
        }
    }

    /// Checks a typed command's name and its arguments (every optional one set by the caller).
    fn command<C: qmp_proto::Command>(&self, cmd: &C, errs: &mut Vec<String>) {
        let Some(entry) = self.0.get(C::NAME) else {
            errs.push(format!("QEMU has no command {}", C::NAME));
            return;
        };
        assert_eq!(entry["meta-type"], "command");
        let args = serde_json::to_value(cmd).unwrap();
        let args = if args.is_null() {
            serde_json::json!({})
        } else {
            args
        };
        self.check(entry["arg-type"].as_str().unwrap(), &args, C::NAME, errs);
    }
}

#[tokio::test]
async fn typed_commands_match_qemus_schema_with_every_optional_argument() {
    let q = qemu(&[]);
    let c = connect(&q).await;
    let s = Schema::fetch(&c).await;
    let mut e = Vec::new();
    let some = |x: &str| Some(x.to_owned());
    s.command(&Stop, &mut e);
    s.command(&Cont, &mut e);
    s.command(&Quit, &mut e);
    s.command(&QueryStatus, &mut e);
    s.command(&QueryBlock, &mut e);
    s.command(&QueryNamedBlockNodes { flat: Some(true) }, &mut e);
    s.command(
        &BlockdevAdd(BlockdevOptions::file("f", "/x").read_only(true)),
        &mut e,
    );
    s.command(
        &BlockdevAdd(BlockdevOptions::qcow2("q", "f").backing(None)),
        &mut e,
    );
    s.command(
        &BlockdevAdd(BlockdevOptions::qcow2("q", "f").backing(Some("b"))),
        &mut e,
    );
    s.command(&BlockdevAdd(BlockdevOptions::raw("r", "f")), &mut e);
    s.command(
        &BlockdevDel {
            node_name: "q".into(),
        },
        &mut e,
    );
    s.command(
        &BlockdevReopen {
            options: vec![BlockdevOptions::qcow2("q", "f").read_only(true)],
        },
        &mut e,
    );
    for options in [
        BlockdevCreateOptions::file("/x", 1 << 20),
        BlockdevCreateOptions::qcow2("f", 1 << 20).backing_file("/b", "qcow2"),
    ] {
        s.command(
            &BlockdevCreate {
                job_id: "j".into(),
                options,
            },
            &mut e,
        );
    }
    let sync = BlockdevSnapshotSync {
        device: some("d"),
        node_name: some("n"),
        snapshot_file: "/o".into(),
        snapshot_node_name: some("o"),
        format: some("qcow2"),
        mode: Some(NewImageMode::Existing),
    };
    s.command(&sync, &mut e);
    let sync2 = BlockdevSnapshotSync {
        mode: Some(NewImageMode::AbsolutePaths),
        ..sync.clone()
    };
    s.command(&sync2, &mut e);
    let snap = BlockdevSnapshot {
        node: "n".into(),
        overlay: "o".into(),
    };
    s.command(&snap, &mut e);
    let internal = BlockdevSnapshotInternalSync {
        device: "d".into(),
        name: "s".into(),
    };
    s.command(&internal, &mut e);
    s.command(
        &BlockdevSnapshotDeleteInternalSync {
            device: "d".into(),
            id: some("1"),
            name: some("s"),
        },
        &mut e,
    );
    let add = BlockDirtyBitmapAdd {
        node: "n".into(),
        name: "b".into(),
        granularity: Some(65536),
        persistent: Some(true),
        disabled: Some(false),
    };
    s.command(&add, &mut e);
    let bm = BlockDirtyBitmap {
        node: "n".into(),
        name: "b".into(),
    };
    s.command(&BlockDirtyBitmapRemove(bm.clone()), &mut e);
    for mode in [
        ActionCompletionMode::Individual,
        ActionCompletionMode::Grouped,
    ] {
        s.command(
            &Transaction::new(vec![
                TransactionAction::Abort(Empty {}),
                TransactionAction::BlockdevSnapshot(snap.clone()),
                TransactionAction::BlockdevSnapshotSync(sync.clone()),
                TransactionAction::BlockdevSnapshotInternalSync(internal.clone()),
                TransactionAction::BlockDirtyBitmapAdd(add.clone()),
                TransactionAction::BlockDirtyBitmapRemove(bm.clone()),
                TransactionAction::BlockDirtyBitmapClear(bm.clone()),
                TransactionAction::BlockDirtyBitmapEnable(bm.clone()),
                TransactionAction::BlockDirtyBitmapDisable(bm.clone()),
            ])
            .completion_mode(mode),
            &mut e,
        );
    }
    let devs = vec!["d".to_owned()];
    s.command(
        &SnapshotSave {
            job_id: "j".into(),
            tag: "t".into(),
            vmstate: "d".into(),
            devices: devs.clone(),
        },
        &mut e,
    );
    s.command(
        &SnapshotLoad {
            job_id: "j".into(),
            tag: "t".into(),
            vmstate: "d".into(),
            devices: devs.clone(),
        },
        &mut e,
    );
    s.command(
        &SnapshotDelete {
            job_id: "j".into(),
            tag: "t".into(),
            devices: devs,
        },
        &mut e,
    );
    s.command(&QueryJobs, &mut e);
    s.command(&JobDismiss::new("j"), &mut e);
    s.command(&JobFinalize::new("j"), &mut e);
    s.command(&JobComplete::new("j"), &mut e);
    s.command(&JobCancel::new("j"), &mut e);
    s.command(
        &BlockCommit {
            job_id: some("j"),
            device: "d".into(),
            base_node: some("b"),
            top_node: some("t"),
            backing_file: some("/b"),
            speed: Some(1),
            filter_node_name: some("f"),
            auto_finalize: Some(true),
            auto_dismiss: Some(true),
        },
        &mut e,
    );
    s.command(
        &BlockStream {
            job_id: some("j"),
            device: "d".into(),
            base_node: some("b"),
            bottom: some("x"),
            backing_file: some("/b"),
            speed: Some(1),
            auto_finalize: Some(true),
            auto_dismiss: Some(true),
        },
        &mut e,
    );
    s.command(
        &MigrateSetCapabilities {
            capabilities: vec![
                MigrationCapabilityStatus::new("background-snapshot", true),
                MigrationCapabilityStatus::new("events", false),
            ],
        },
        &mut e,
    );
    s.command(&QueryMigrateCapabilities, &mut e);
    s.command(&Migrate::to("file:/x"), &mut e);
    s.command(&MigrateCancel, &mut e);
    s.command(&QueryMigrate, &mut e);
    s.command(&Getfd { fdname: "f".into() }, &mut e);
    s.command(&Closefd { fdname: "f".into() }, &mut e);
    s.command(
        &AddFd {
            fdset_id: Some(1),
            opaque: Some("o".into()),
        },
        &mut e,
    );
    s.command(
        &RemoveFd {
            fdset_id: 1,
            fd: Some(3),
        },
        &mut e,
    );
    s.command(&QueryFdsets, &mut e);
    // The checker itself catches a wrong name and a wrong member.
    let mut neg = Vec::new();
    #[derive(serde::Serialize)]
    struct Bogus {
        #[serde(rename = "snapshot_file")]
        f: String,
    }
    impl qmp_proto::Command for Bogus {
        const NAME: &'static str = "blockdev-snapshot-sync";
        type Returns = Empty;
    }
    s.command(&Bogus { f: "x".into() }, &mut neg);
    assert!(
        neg.iter().any(|m| m.contains("no member `snapshot_file`")),
        "{neg:?}"
    );
    // ... and nested ones: a transaction action's data, an enum value, a missing member.
    #[derive(serde::Serialize)]
    #[serde(transparent)]
    struct RawTransaction(Value);
    impl qmp_proto::Command for RawTransaction {
        const NAME: &'static str = "transaction";
        type Returns = Empty;
    }
    let mut neg = Vec::new();
    s.command(
        &RawTransaction(serde_json::json!({
            "actions": [
                {"type": "blockdev-snapshot", "data": {"node": "n", "overlay-x": "o"}},
                {"type": "no-such-action", "data": {}},
            ],
            "properties": {"completion-mode": "sometimes"}
        })),
        &mut neg,
    );
    let joined = neg.join("\n");
    for want in [
        "no member `overlay-x`",
        "required member `overlay` missing",
        "no variant type=no-such-action",
        "\"sometimes\" is not a value of enum",
    ] {
        assert!(joined.contains(want), "{want}: {joined}");
    }
    assert!(
        e.is_empty(),
        "typed commands disagree with QEMU's schema:\n{}",
        e.join("\n")
    );
}

/// The member names a reply struct reads (serde hands them to `deserialize_struct`).
fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct Grab(Option<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for &mut Grab {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            Err(serde::de::Error::custom("fields grabbed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut g = Grab(None);
    let _ = T::deserialize(&mut g);
    g.0.expect("a struct")
}

impl Schema {
    /// The object type behind `ty` (through arrays).
    fn object(&self, ty: &str) -> &Value {
        let ty = ty.trim_start_matches('[').trim_end_matches(']');
        let t = &self.0[ty];
        assert_eq!(t["meta-type"], "object", "{t}");
        t
    }

    /// The type of member `name` of object type `ty`.
    fn member_type(&self, ty: &str, name: &str) -> String {
        self.object(ty)["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no member {name} in {ty}"))["type"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn ret_type(&self, cmd: &str) -> String {
        self.0[cmd]["ret-type"].as_str().unwrap().to_owned()
    }

    /// Every field `T` reads must be a member of `ty`.
    fn reply<T: serde::de::DeserializeOwned>(&self, ty: &str, what: &str, errs: &mut Vec<String>) {
        let obj = self.object(ty);
        let members: Vec<&str> = obj["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        for f in fields_of::<T>() {
            if !members.contains(f) {
                errs.push(format!(
                    "{what}: QEMU sends no member `{f}` (has {members:?})"
                ));
            }
        }
    }
}

#[tokio::test]
async fn typed_replies_read_only_members_qemus_schema_has() {
    let q = qemu(&[]);
    let c = connect(&q).await;
    let s = Schema::fetch(&c).await;
    let mut e = Vec::new();
    s.reply::<StatusInfo>(&s.ret_type("query-status"), "StatusInfo", &mut e);
    let block = s.ret_type("query-block");
    s.reply::<BlockInfo>(&block, "BlockInfo", &mut e);
    let dev = s.member_type(&block, "inserted");
    s.reply::<BlockDeviceInfo>(&dev, "BlockDeviceInfo (query-block)", &mut e);
    s.reply::<BlockDeviceInfo>(
        &s.ret_type("query-named-block-nodes"),
        "BlockDeviceInfo (query-named-block-nodes)",
        &mut e,
    );
    let image = s.member_type(&dev, "image");
    s.reply::<ImageInfo>(&image, "ImageInfo", &mut e);
    s.reply::<ImageInfo>(
        &s.member_type(&image, "backing-image"),
        "ImageInfo (backing)",
        &mut e,
    );
    s.reply::<SnapshotInfo>(&s.member_type(&image, "snapshots"), "SnapshotInfo", &mut e);
    s.reply::<SnapshotInfo>(
        &s.ret_type("blockdev-snapshot-delete-internal-sync"),
        "SnapshotInfo (delete)",
        &mut e,
    );
    s.reply::<JobInfo>(&s.ret_type("query-jobs"), "JobInfo", &mut e);
    let mig = s.ret_type("query-migrate");
    s.reply::<MigrationInfo>(&mig, "MigrationInfo", &mut e);
    s.reply::<MigrationStats>(&s.member_type(&mig, "ram"), "MigrationStats", &mut e);
    s.reply::<MigrationCapabilityStatus>(
        &s.ret_type("query-migrate-capabilities"),
        "MigrationCapabilityStatus",
        &mut e,
    );
    s.reply::<AddfdInfo>(&s.ret_type("add-fd"), "AddfdInfo", &mut e);
    let sets = s.ret_type("query-fdsets");
    s.reply::<FdsetInfo>(&sets, "FdsetInfo", &mut e);
    s.reply::<FdsetFdInfo>(&s.member_type(&sets, "fds"), "FdsetFdInfo", &mut e);
    assert!(fields_of::<StatusInfo>().contains(&"running"));
    // The check catches a misspelt member.
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Misspelt {
        runing: bool,
    }
    let mut neg = Vec::new();
    s.reply::<Misspelt>(&s.ret_type("query-status"), "Misspelt", &mut neg);
    assert!(neg[0].contains("no member `runing`"), "{neg:?}");
    assert!(
        e.is_empty(),
        "reply structs disagree with QEMU's schema:\n{}",
        e.join("\n")
    );
}
