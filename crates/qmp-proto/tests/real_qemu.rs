//! qmp-proto against a real QEMU 10.0.2 (KVM, no guest OS) started by the testbed.
//!
//! Needs qemu-system-x86_64 10.0.2 and /dev/kvm: run `cargo xtask deps` first. A missing
//! component fails the test with that hint; nothing is skipped.

use std::time::{Duration, Instant};

use qmp_proto::{ErrorKind, QmpClient};
use serde_json::json;
use testbed::{DiskFormat, Qemu};

const T: Duration = Duration::from_secs(10);

fn qemu() -> Qemu {
    Qemu::builder()
        .disk("disk0", DiskFormat::Qcow2, 64 << 20)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU (run `cargo xtask deps`): {e}"))
}

async fn connect(q: &Qemu) -> QmpClient {
    tokio::time::timeout(T, QmpClient::connect_unix(q.qmp_path()))
        .await
        .expect("connect hung")
        .unwrap_or_else(|e| panic!("QMP connect failed: {e}\nQEMU log:\n{}", q.log()))
}

#[tokio::test]
async fn real_greeting_and_query_status() {
    let q = qemu();
    let c = connect(&q).await;
    let g = c.greeting();
    assert_eq!(g.version, (10, 0, 2), "greeting: {g:?}");
    assert!(g.capabilities.iter().any(|c| c == "oob"), "{g:?}");
    let st = c.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["running"], true);
    let v = c.execute("query-version", None).await.unwrap();
    assert_eq!(v["qemu"], json!({"major": 10, "minor": 0, "micro": 2}));
}

#[tokio::test]
async fn real_stop_cont_emit_stop_and_resume_events() {
    let q = qemu();
    let c = connect(&q).await;
    let mut events = c.subscribe();
    c.execute("stop", None).await.unwrap();
    let ev = events.wait_for("STOP", T).await.unwrap();
    assert!(ev.timestamp.0 > 1_600_000_000, "{ev:?}");
    let st = c.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "paused");
    assert_eq!(st["running"], false);
    c.execute("cont", None).await.unwrap();
    events.wait_for("RESUME", T).await.unwrap();
    let st = c.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
    assert_eq!(events.dropped(), 0);
}

#[tokio::test]
async fn real_query_block_lists_the_blockdev_disk() {
    let q = qemu();
    let c = connect(&q).await;
    let blocks = c.execute("query-block", None).await.unwrap();
    let blocks = blocks.as_array().expect("query-block returns an array");
    let disk = blocks
        .iter()
        .find(|b| b["inserted"]["node-name"] == "disk0")
        .unwrap_or_else(|| panic!("disk0 not in query-block: {blocks:?}"));
    assert!(
        disk["qdev"]
            .as_str()
            .unwrap_or_default()
            .contains("disk0-dev"),
        "{disk}"
    );
    assert_eq!(disk["inserted"]["drv"], "qcow2");
    assert_eq!(
        disk["inserted"]["image"]["filename"],
        q.disk("disk0").path.to_string_lossy().as_ref()
    );
}

#[tokio::test]
async fn real_error_replies_carry_class_and_desc() {
    let q = qemu();
    let c = connect(&q).await;
    let e = c
        .execute("blockdev-del", Some(json!({"node-name": "no-such-node"})))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
    assert_eq!(e.class(), Some("GenericError"), "{e}");
    assert!(e.desc().unwrap().contains("no-such-node"), "{e}");
    assert_eq!(e.command(), Some("blockdev-del"));

    let e = c.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"), "{e}");

    // Wrong arguments are reported, and the connection keeps working.
    let e = c
        .execute("query-status", Some(json!({"bogus": 1})))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
    c.execute("query-status", None).await.unwrap();
}

#[tokio::test]
async fn real_eight_concurrent_commands_in_flight() {
    let q = qemu();
    let c = connect(&q).await;
    let cmds = [
        "query-status",
        "query-block",
        "query-version",
        "query-name",
        "query-named-block-nodes",
        "query-jobs",
        "query-kvm",
        "query-commands",
    ];
    let tasks: Vec<_> = cmds
        .iter()
        .map(|&cmd| {
            let c = c.clone();
            tokio::spawn(async move { (cmd, c.execute(cmd, None).await) })
        })
        .collect();
    // Let the spawned tasks issue their commands, then look: they overlap on the wire.
    let mut max_in_flight = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        max_in_flight = max_in_flight.max(c.in_flight());
        tokio::task::yield_now().await;
    }
    eprintln!("8 concurrent commands: at most {max_in_flight} in flight at once");
    assert!(
        max_in_flight >= 2,
        "commands were not in flight together ({max_in_flight})"
    );
    for t in tasks {
        let (cmd, r) = t.await.unwrap();
        let v = r.unwrap_or_else(|e| panic!("{cmd}: {e}"));
        match cmd {
            "query-status" => assert_eq!(v["status"], "running"),
            "query-version" => assert_eq!(v["qemu"]["major"], 10),
            "query-kvm" => assert_eq!(v["enabled"], true),
            "query-jobs" => assert_eq!(v, json!([])),
            "query-commands" => assert!(v.as_array().unwrap().len() > 100),
            "query-block" | "query-named-block-nodes" => assert!(v.is_array()),
            _ => assert!(v.is_object()),
        }
    }
    assert_eq!(c.in_flight(), 0);

    // A pipelined burst from 8 tasks sharing the client: every reply reaches its caller.
    const N: usize = 2000;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..N / 8 {
                    let v = c.execute("query-status", None).await.unwrap();
                    assert_eq!(v["status"], "running");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = t0.elapsed();
    eprintln!(
        "{N} query-status from 8 tasks: {took:?} ({:.0} commands/s)",
        N as f64 / took.as_secs_f64()
    );
}

#[tokio::test]
async fn real_closed_resolves_after_quit() {
    let mut q = qemu();
    let c = connect(&q).await;
    let mut events = c.subscribe();
    match c.execute("quit", None).await {
        Ok(v) => assert_eq!(v, json!({})),
        // QEMU may close the socket before its reply is read.
        Err(e) => assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}"),
    }
    tokio::time::timeout(T, c.closed())
        .await
        .expect("closed() did not resolve after quit");
    assert!(c.is_closed());
    let ev = events.wait_for("SHUTDOWN", T).await.unwrap();
    assert_eq!(ev.data["reason"], "host-qmp-quit");
    assert!(events.next().await.is_none());
    let e = c.execute("query-status", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Disconnected);
    assert!(q.wait_exit(T).is_some(), "QEMU did not exit after quit");
}

fn signal(q: &Qemu, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &q.pid().to_string()])
        .status()
        .expect("run kill(1)");
    assert!(st.success(), "kill {sig} failed");
}

#[tokio::test]
async fn real_timeout_while_qemu_is_frozen_then_recovers() {
    let q = qemu();
    let c = connect(&q).await;
    // A stopped QEMU answers nothing: the command times out and leaves no pending entry.
    signal(&q, "-STOP");
    let t0 = Instant::now();
    let e = c
        .execute_timeout("query-status", None, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(c.in_flight(), 0);
    signal(&q, "-CONT");
    // The late reply to the timed-out command is dropped; new commands get their own.
    let v = c.execute("query-version", None).await.unwrap();
    assert_eq!(v["qemu"]["major"], 10);
    let st = c.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
}

#[tokio::test]
async fn real_qemu_killed_mid_command_fails_it_with_disconnected() {
    let mut q = qemu();
    let c = connect(&q).await;
    let mut events = c.subscribe();
    signal(&q, "-STOP");
    let pending = tokio::spawn({
        let c = c.clone();
        async move { c.execute("query-status", None).await }
    });
    while c.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    q.kill();
    let e = tokio::time::timeout(T, pending)
        .await
        .expect("pending command not failed after QEMU died")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
    tokio::time::timeout(T, c.closed()).await.unwrap();
    assert!(events.next().await.is_none());
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn real_second_client_waits_for_the_first() {
    let q = qemu();
    let c = connect(&q).await;
    // QEMU serves one QMP client at a time: no greeting while `c` is connected.
    let e = QmpClient::connect_unix_timeout(q.qmp_path(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("another client"), "{e}");
    c.execute("query-status", None).await.unwrap();
    drop(c);
    let c2 = QmpClient::connect_unix_timeout(q.qmp_path(), T)
        .await
        .unwrap();
    c2.execute("query-status", None).await.unwrap();
}

#[tokio::test]
async fn real_run_job_snapshot_save_load_delete_and_a_failing_job() {
    let q = qemu();
    let c = connect(&q).await;
    let t0 = Instant::now();
    c.run_job(
        "snapshot-save",
        json!({"job-id": "save0", "tag": "s1", "vmstate": "disk0", "devices": ["disk0"]}),
        "save0",
        T,
    )
    .await
    .unwrap();
    eprintln!("snapshot-save job: {:?}", t0.elapsed());
    // The job was dismissed, the VM runs again, the internal snapshot exists.
    assert_eq!(c.execute("query-jobs", None).await.unwrap(), json!([]));
    let st = c.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], "running");
    let blocks = c.execute("query-block", None).await.unwrap();
    let disk = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["inserted"]["node-name"] == "disk0")
        .unwrap();
    let snaps = disk["inserted"]["image"]["snapshots"].as_array().unwrap();
    assert!(snaps.iter().any(|s| s["name"] == "s1"), "{snaps:?}");

    c.run_job(
        "snapshot-load",
        json!({"job-id": "load0", "tag": "s1", "vmstate": "disk0", "devices": ["disk0"]}),
        "load0",
        T,
    )
    .await
    .unwrap();

    // A snapshot-save that fails inside the job: the command itself returns {}.
    let e = c
        .run_job(
            "snapshot-save",
            json!({"job-id": "bad0", "tag": "s2", "vmstate": "no-such-node", "devices": ["disk0"]}),
            "bad0",
            T,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Job, "{e}");
    assert!(e.desc().unwrap().contains("no-such-node"), "{e}");
    assert_eq!(c.execute("query-jobs", None).await.unwrap(), json!([]));

    c.run_job(
        "snapshot-delete",
        json!({"job-id": "del0", "tag": "s1", "devices": ["disk0"]}),
        "del0",
        T,
    )
    .await
    .unwrap();

    // A command refused outright is a Command error, not a Job error.
    let e = c
        .run_job("snapshot-save", json!({"job-id": "x"}), "x", T)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
}

#[tokio::test]
async fn real_two_hundred_commands_at_once_none_dropped() {
    // QEMU queues at most 8 requests per monitor and stops reading beyond that: commands
    // beyond the queue wait in the socket, none is dropped.
    let q = qemu();
    let c = connect(&q).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let cmd = if i % 2 == 0 {
                    "query-status"
                } else {
                    "query-name"
                };
                (i, c.execute_timeout(cmd, None, T).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        let v = r.unwrap_or_else(|e| panic!("command {i}: {e}"));
        if i % 2 == 0 {
            assert_eq!(v["status"], "running");
        } else {
            assert!(v.is_object());
        }
    }
    assert_eq!(c.in_flight(), 0);
}
