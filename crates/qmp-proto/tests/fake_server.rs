//! qmp-proto against in-process fake QMP servers and a fake guest agent on unix sockets.
//!
//! The fakes exist to inject what a healthy QEMU never does on demand (out-of-order
//! replies, garbage, unknown ids, disconnects mid-command, silence, floods); the same
//! client is exercised against a real QEMU in tests/real_qemu.rs.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use qmp_proto::{ErrorKind, QgaClient, QmpClient};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

const T: Duration = Duration::from_secs(10);

/// A listening socket in a fresh temp dir.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    Server {
        _dir: dir,
        path,
        listener,
    }
}

/// The fake side of one connection.
struct Peer {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Peer {
    async fn accept(l: &UnixListener) -> Peer {
        let (s, _) = l.accept().await.unwrap();
        Peer::from(s)
    }

    fn from(s: UnixStream) -> Peer {
        let (r, w) = s.into_split();
        Peer {
            r: BufReader::new(r),
            w,
        }
    }

    async fn send(&mut self, v: Value) {
        let mut b = v.to_string().into_bytes();
        b.push(b'\n');
        self.w.write_all(&b).await.unwrap();
    }

    async fn send_raw(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }

    async fn recv_raw(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self.r.read_until(b'\n', &mut buf).await.unwrap();
        (n > 0).then_some(buf)
    }

    async fn recv(&mut self) -> Value {
        let raw = self.recv_raw().await.expect("client closed the connection");
        serde_json::from_slice(&raw).unwrap()
    }

    async fn reply(&mut self, cmd: &Value, ret: Value) {
        self.send(json!({ "return": ret, "id": cmd["id"] })).await;
    }

    /// Greeting + the client's qmp_capabilities; returns that negotiation command.
    async fn negotiate_with(&mut self, caps: Value) -> Value {
        self.send(
            json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": caps}}),
        )
        .await;
        let cmd = self.recv().await;
        assert_eq!(
            cmd["execute"], "qmp_capabilities",
            "the first command must be qmp_capabilities: {cmd}"
        );
        self.reply(&cmd, json!({})).await;
        cmd
    }

    async fn negotiate(&mut self) -> Value {
        self.negotiate_with(json!(["oob"])).await
    }
}

fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": {"seconds": 1700000000, "microseconds": 123456}})
}

/// Runs the fake server script and the client side together, failing on a hang.
async fn run<S, C>(srv: Server, script: impl FnOnce(UnixListener) -> S, client: C)
where
    S: Future<Output = ()> + Send + 'static,
    C: Future<Output = ()>,
{
    let server = tokio::spawn(script(srv.listener));
    tokio::time::timeout(T, client)
        .await
        .expect("client side hung");
    tokio::time::timeout(T, server)
        .await
        .expect("server side hung")
        .expect("server script failed");
}

#[tokio::test]
async fn greeting_and_negotiation_enable_oob() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            let neg = p.negotiate().await;
            assert_eq!(neg["arguments"], json!({"enable": ["oob"]}));
            assert!(neg["id"].is_u64(), "commands carry ids: {neg}");
            let cmd = p.recv().await;
            assert_eq!(cmd["execute"], "query-status");
            assert!(cmd.get("arguments").is_none());
            p.reply(&cmd, json!({"running": true, "status": "running"}))
                .await;
            let cmd = p.recv().await;
            assert_eq!(cmd["arguments"], json!({"device": "x"}));
            assert_ne!(cmd["id"], neg["id"]);
            p.reply(&cmd, json!([])).await;
        },
        async {
            // Duration::MAX means no limit (no overflow).
            let c = QmpClient::connect_unix_timeout(&path, Duration::MAX)
                .await
                .unwrap();
            let g = c.greeting();
            assert_eq!(g.version, (10, 0, 2));
            assert_eq!(g.package, "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1");
            assert_eq!(g.capabilities, vec!["oob".to_owned()]);
            let st = c
                .execute_timeout("query-status", None, Duration::MAX)
                .await
                .unwrap();
            assert_eq!(st["status"], "running");
            let r = c
                .execute("query-block", Some(json!({"device": "x"})))
                .await
                .unwrap();
            assert_eq!(r, json!([]));
        },
    )
    .await;
}

#[tokio::test]
async fn negotiation_without_oob_sends_no_arguments() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            let neg = p.negotiate_with(json!([])).await;
            assert!(neg.get("arguments").is_none(), "{neg}");
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            assert!(c.greeting().capabilities.is_empty());
        },
    )
    .await;
}

#[tokio::test]
async fn failed_negotiation_and_bad_greetings_are_errors() {
    // The server refuses qmp_capabilities.
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.send(json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}})).await;
            let cmd = p.recv().await;
            p.send(json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": cmd["id"]}))
                .await;
        },
        async {
            let e = QmpClient::connect_unix(&path).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Command, "{e}");
            assert_eq!(e.class(), Some("CommandNotFound"));
            assert_eq!(e.command(), Some("qmp_capabilities"));
        },
    )
    .await;

    // Not a greeting, not JSON, EOF before a greeting.
    for (first, want) in [
        (&b"{\"return\": {}}\n"[..], ErrorKind::Protocol),
        (&b"hello\n"[..], ErrorKind::Protocol),
        (&b"{\"QMP\": {\"version\": {}}}\n"[..], ErrorKind::Protocol),
        (&b""[..], ErrorKind::Disconnected),
    ] {
        let srv = server();
        let path = srv.path.clone();
        run(
            srv,
            move |l| async move {
                let mut p = Peer::accept(&l).await;
                p.send_raw(first).await;
            },
            async {
                let e = QmpClient::connect_unix(&path).await.unwrap_err();
                assert_eq!(e.kind(), want, "{e}");
            },
        )
        .await;
    }

    // No socket at all.
    let dir = tempfile::tempdir().unwrap();
    let e = QmpClient::connect_unix(dir.path().join("absent.sock"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
}

#[tokio::test]
async fn events_interleaved_with_replies_reach_every_subscriber() {
    let srv = server();
    let path = srv.path.clone();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let cmd = p.recv().await;
            assert_eq!(cmd["execute"], "stop");
            p.send(event("STOP", Value::Null)).await;
            p.reply(&cmd, json!({})).await;
            p.send(
                json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "created"},
                "timestamp": {"seconds": 5, "microseconds": 6}}),
            )
            .await;
            go_rx.await.unwrap();
            p.send(event("RESUME", Value::Null)).await;
            // Keep the connection open until the client is done.
            assert!(p.recv_raw().await.is_none());
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let mut a = c.subscribe();
            let mut b = c.clone().subscribe();
            c.execute("stop", None).await.unwrap();
            let ev = a.next().await.unwrap();
            assert_eq!(ev.name, "STOP");
            assert_eq!(ev.data, Value::Null);
            assert_eq!(ev.timestamp, (1_700_000_000, 123_456));
            let ev = a.next().await.unwrap();
            assert_eq!(ev.name, "JOB_STATUS_CHANGE");
            assert_eq!(ev.data["status"], "created");
            assert_eq!(ev.timestamp, (5, 6));
            // b sees the same events, and skips to the one it waits for.
            let ev = b
                .wait_for("JOB_STATUS_CHANGE", Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(ev.data["id"], "j1");
            // A late subscriber only sees what comes after it subscribed.
            let mut late = c.subscribe();
            go_tx.send(()).unwrap();
            assert_eq!(late.next().await.unwrap().name, "RESUME");
            assert_eq!(a.next().await.unwrap().name, "RESUME");
            // wait_for times out when the event never comes.
            let e = a
                .wait_for("SHUTDOWN", Duration::from_millis(50))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Timeout);
            assert_eq!(a.dropped(), 0);
        },
    )
    .await;
}

#[tokio::test]
async fn out_of_order_replies_are_routed_by_id() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let mut cmds = Vec::new();
            for _ in 0..5 {
                cmds.push(p.recv().await);
            }
            // Answer in reverse order, each with its own argument.
            for cmd in cmds.iter().rev() {
                p.reply(cmd, json!({"n": cmd["arguments"]["n"]})).await;
            }
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let futs = (0..5).map(|n| {
                let c = c.clone();
                async move { c.execute("echo", Some(json!({"n": n}))).await }
            });
            let results = futures_join_all(futs).await;
            for (n, r) in results.into_iter().enumerate() {
                assert_eq!(r.unwrap()["n"], n);
            }
            assert_eq!(c.in_flight(), 0);
        },
    )
    .await;
}

/// Joins futures concurrently on the current task (no extra crate needed).
async fn futures_join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn unknown_ids_garbage_and_id_less_errors_are_ignored() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let cmd = p.recv().await;
            p.send(json!({"return": {"wrong": 1}, "id": 424242})).await;
            p.send(json!({"return": {"wrong": 2}, "id": "not-ours"}))
                .await;
            p.send(json!({"return": {"wrong": 3}})).await;
            p.send_raw(b"this is not json\n").await;
            p.send_raw(b"\n\r\n   \n").await;
            p.send_raw(b"[1,2,3]\n").await;
            p.send_raw(&[0xFF, 0xFE, b'{', b'\n']).await;
            p.send(json!({"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword"}}))
                .await;
            p.send(json!({"event": 7})).await;
            p.send(json!({"QMP": {"version": {}}})).await;
            p.send(json!({"something": "else", "id": cmd["id"]})).await;
            p.send(event("STOP", json!({}))).await;
            p.reply(&cmd, json!({"right": true})).await;
            let cmd = p.recv().await;
            p.reply(&cmd, json!(2)).await;
            assert!(p.recv_raw().await.is_none());
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let mut ev = c.subscribe();
            let r = c.execute("query-x", None).await.unwrap();
            assert_eq!(r, json!({"right": true}));
            assert_eq!(c.execute("query-y", None).await.unwrap(), json!(2));
            assert!(!c.is_closed());
            // The malformed event was dropped, the good one delivered.
            assert_eq!(ev.next().await.unwrap().name, "STOP");
        },
    )
    .await;
}

#[tokio::test]
async fn error_reply_carries_class_and_desc() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let cmd = p.recv().await;
            p.send(json!({"error": {"class": "GenericError",
                "desc": "Failed to find node with node-name='nope'"}, "id": cmd["id"]}))
                .await;
            let cmd = p.recv().await;
            p.reply(&cmd, json!({})).await;
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let e = c
                .execute("blockdev-del", Some(json!({"node-name": "nope"})))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Command);
            assert_eq!(e.class(), Some("GenericError"));
            assert_eq!(e.desc(), Some("Failed to find node with node-name='nope'"));
            assert_eq!(e.command(), Some("blockdev-del"));
            assert!(e.to_string().contains("blockdev-del"), "{e}");
            // The connection is still usable.
            c.execute("cont", None).await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn disconnect_mid_command_fails_every_pending_command() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            for _ in 0..3 {
                p.recv().await;
            }
            drop(p);
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let mut ev = c.subscribe();
            let futs = (0..3).map(|_| {
                let c = c.clone();
                async move { c.execute("query-status", None).await }
            });
            for r in futures_join_all(futs).await {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
            }
            c.closed().await;
            assert!(c.is_closed());
            assert_eq!(c.in_flight(), 0);
            assert!(ev.next().await.is_none(), "event streams end at disconnect");
            let e = c.execute("query-status", None).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Disconnected);
            assert!(e.to_string().contains("EOF"), "{e}");
            assert!(c.subscribe().next().await.is_none());
            let e = c
                .subscribe()
                .wait_for("STOP", Duration::from_secs(1))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Disconnected);
        },
    )
    .await;
}

#[tokio::test]
async fn timeout_forgets_the_command_and_its_late_reply() {
    let srv = server();
    let path = srv.path.clone();
    let (late_tx, late_rx) = tokio::sync::oneshot::channel::<()>();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let slow = p.recv().await;
            late_rx.await.unwrap();
            p.reply(&slow, json!("late")).await;
            let cmd = p.recv().await;
            p.reply(&cmd, json!("fresh")).await;
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let t0 = std::time::Instant::now();
            let e = c
                .execute_timeout("query-slow", None, Duration::from_millis(100))
                .await
                .unwrap_err();
            let took = t0.elapsed();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
            assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(2));
            assert_eq!(
                c.in_flight(),
                0,
                "a timed-out command leaves no pending entry"
            );
            late_tx.send(()).unwrap();
            assert_eq!(c.execute("query-status", None).await.unwrap(), "fresh");
        },
    )
    .await;
}

/// Timeouts come from one deadline task per connection: a short timeout issued while a long
/// one is pending must still fire on time, and each command times out on its own.
#[tokio::test]
async fn a_short_timeout_behind_a_long_one_fires_on_time() {
    let srv = server();
    let path = srv.path.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let long = p.recv().await;
            let _short = p.recv().await; // never answered
            done_rx.await.unwrap();
            p.reply(&long, json!("long answered")).await;
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let long = c.execute_timeout("query-long", None, Duration::from_secs(30));
            let short = async {
                // Issued after the long one is pending.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let t0 = std::time::Instant::now();
                let e = c
                    .execute_timeout("query-short", None, Duration::from_millis(150))
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
                let took = t0.elapsed();
                assert!(
                    took >= Duration::from_millis(150) && took < Duration::from_secs(3),
                    "short timeout fired after {took:?}"
                );
                assert_eq!(c.in_flight(), 1, "only the timed-out command is gone");
                done_tx.send(()).unwrap();
            };
            let (long, ()) = tokio::join!(long, short);
            assert_eq!(long.unwrap(), "long answered");
            assert_eq!(c.in_flight(), 0);
        },
    )
    .await;
}

#[tokio::test]
async fn dropping_an_execute_future_removes_its_pending_entry() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let never = p.recv().await;
            let cmd = p.recv().await;
            p.reply(&never, json!("too late")).await;
            p.reply(&cmd, json!("ok")).await;
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let task = tokio::spawn({
                let c = c.clone();
                async move { c.execute("query-never", None).await }
            });
            // Wait until it is in flight, then cancel it.
            while c.in_flight() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
            assert_eq!(c.in_flight(), 0);
            assert_eq!(c.execute("query-status", None).await.unwrap(), "ok");
        },
    )
    .await;
}

#[tokio::test]
async fn over_long_line_is_a_protocol_error_and_closes() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            p.recv().await;
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..(qmp_proto::qmp::MAX_LINE / chunk.len() + 2) {
                if p.w.write_all(&chunk).await.is_err() {
                    break; // the client closed: expected
                }
            }
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let e = c.execute("query-status", None).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(e.to_string().contains("longer than"), "{e}");
            c.closed().await;
            let e = c.execute("query-status", None).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
        },
    )
    .await;
}

#[tokio::test]
async fn many_tasks_share_one_client() {
    let srv = server();
    let path = srv.path.clone();
    const N: usize = 64;
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            for _ in 0..N {
                let cmd = p.recv().await;
                p.reply(&cmd, cmd["arguments"].clone()).await;
            }
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let tasks: Vec<_> = (0..N)
                .map(|i| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let r = c.execute("echo", Some(json!({"task": i}))).await.unwrap();
                        assert_eq!(r["task"], i);
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        },
    )
    .await;
}

/// Commands far larger than the socket buffer while the server does not read: the writes
/// would block, wait for room and complete in order once the server reads again.
#[tokio::test]
async fn writes_that_would_block_complete_once_the_server_reads() {
    let srv = server();
    let path = srv.path.clone();
    const N: usize = 4;
    let big = "x".repeat(1 << 20);
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            // Not reading for a while: the client's writes fill the socket buffer.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for i in 0..N {
                let cmd = p.recv().await;
                assert_eq!(
                    cmd["arguments"]["n"], i,
                    "commands arrive whole and in order"
                );
                assert_eq!(cmd["arguments"]["pad"].as_str().unwrap().len(), 1 << 20);
                p.reply(&cmd, json!({"n": i})).await;
            }
        },
        async move {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let futs = (0..N).map(|i| {
                let c = c.clone();
                let pad = big.clone();
                async move { c.execute("big", Some(json!({"n": i, "pad": pad}))).await }
            });
            // Issued in order, all in flight at once.
            let replies = futures_join_all(futs).await;
            for (i, r) in replies.into_iter().enumerate() {
                assert_eq!(r.unwrap()["n"], i);
            }
            assert_eq!(c.in_flight(), 0);
        },
    )
    .await;
}

#[tokio::test]
async fn an_idle_subscriber_never_blocks_replies() {
    let srv = server();
    let path = srv.path.clone();
    const EXTRA: usize = 5;
    let total = qmp_proto::qmp::EVENT_QUEUE_CAP + EXTRA;
    run(
        srv,
        move |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let cmd = p.recv().await;
            let mut burst = Vec::new();
            for i in 0..total {
                burst.extend_from_slice(event("TICK", json!({"i": i})).to_string().as_bytes());
                burst.push(b'\n');
            }
            p.send_raw(&burst).await;
            p.reply(&cmd, json!("after the flood")).await;
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let mut idle = c.subscribe();
            assert_eq!(c.execute("x", None).await.unwrap(), "after the flood");
            // Everything up to the cap is queued in order; the rest counted as dropped.
            for i in 0..qmp_proto::qmp::EVENT_QUEUE_CAP {
                let ev = idle.next().await.unwrap();
                assert_eq!(ev.data["i"], i);
            }
            assert_eq!(idle.dropped(), EXTRA as u64);
        },
    )
    .await;
}

#[tokio::test]
async fn dropping_the_last_clone_closes_the_socket() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let cmd = p.recv().await;
            p.reply(&cmd, json!({})).await;
            // EOF once every clone is gone.
            assert!(p.recv_raw().await.is_none());
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let c2 = c.clone();
            let ev = c.subscribe();
            drop(c);
            c2.execute("x", None).await.unwrap();
            drop(c2);
            drop(ev);
        },
    )
    .await;
}

#[tokio::test]
async fn run_job_reads_errors_of_auto_dismissed_block_jobs_and_times_out() {
    let srv = server();
    let path = srv.path.clone();
    let status = |s: &str| {
        json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "c0", "status": s},
        "timestamp": {"seconds": 1, "microseconds": 2}})
    };
    run(
        srv,
        move |l| async move {
            let mut p = Peer::accept(&l).await;
            p.negotiate().await;
            let cmd = p.recv().await;
            assert_eq!(cmd["execute"], "block-commit");
            assert_eq!(cmd["arguments"]["job-id"], "c0");
            p.send(status("created")).await;
            p.reply(&cmd, json!({})).await;
            p.send(status("running")).await;
            // Another job's events are not ours.
            p.send(
                json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "other", "error": "x"},
                "timestamp": {"seconds": 1, "microseconds": 2}}),
            )
            .await;
            p.send(status("concluded")).await;
            p.send(status("null")).await;
            let q = p.recv().await;
            assert_eq!(q["execute"], "query-jobs");
            // The completion event (with the error) arrives while query-jobs runs.
            p.send(
                json!({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "c0", "type": "commit",
                "len": 1, "offset": 0, "speed": 0, "error": "No space left on device"},
                "timestamp": {"seconds": 1, "microseconds": 3}}),
            )
            .await;
            p.reply(&q, json!([])).await;
            // A job that never concludes.
            let cmd = p.recv().await;
            p.reply(&cmd, json!({})).await;
            assert!(p.recv_raw().await.is_none());
        },
        async {
            let c = QmpClient::connect_unix(&path).await.unwrap();
            let e = c
                .run_job(
                    "block-commit",
                    json!({"job-id": "c0", "device": "d"}),
                    "c0",
                    T,
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Job, "{e}");
            assert_eq!(e.desc(), Some("No space left on device"));
            assert!(e.to_string().contains("job `c0` failed"), "{e}");
            let e = c
                .run_job(
                    "block-stream",
                    json!({"job-id": "s0"}),
                    "s0",
                    Duration::from_millis(100),
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// Guest agent

/// A fake qemu-ga: handles 0xFF + guest-sync-delimited like the real agent (a parse
/// error for the stray 0xFF first, then the 0xFF-prefixed reply), hands other commands
/// to the test.
struct Agent {
    p: Peer,
    syncs: usize,
}

impl Agent {
    async fn accept(l: &UnixListener) -> Agent {
        Agent {
            p: Peer::accept(l).await,
            syncs: 0,
        }
    }

    /// The next non-sync command, or None at EOF.
    async fn next_command(&mut self) -> Option<Value> {
        loop {
            let raw = self.p.recv_raw().await?;
            let body = match raw.iter().rposition(|&b| b == 0xFF) {
                Some(i) => {
                    self.p
                        .send(json!({"error": {"class": "GenericError",
                            "desc": "JSON parse error, stray '\u{fffd}'"}}))
                        .await;
                    &raw[i + 1..]
                }
                None => &raw[..],
            };
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                self.p
                    .send(json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}))
                    .await;
                continue;
            };
            if v["execute"] == "guest-sync-delimited" {
                self.syncs += 1;
                let mut b = vec![0xFF];
                b.extend_from_slice(
                    json!({"return": v["arguments"]["id"]})
                        .to_string()
                        .as_bytes(),
                );
                b.push(b'\n');
                self.p.send_raw(&b).await;
                continue;
            }
            return Some(v);
        }
    }

    async fn reply(&mut self, cmd: &Value, ret: Value) {
        self.p.reply(cmd, ret).await;
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test]
async fn qga_sync_discards_stray_output_and_ping_works() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut a = Agent::accept(&l).await;
            // Leftovers of an earlier client: a stale reply, garbage, half a line.
            a.p.send(json!({"return": {"stale": true}, "id": 7})).await;
            a.p.send_raw(b"garbage\n{\"return\": 12345}\n{\"retu").await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(a.syncs, 1);
            assert_eq!(cmd["execute"], "guest-ping");
            a.reply(&cmd, json!({})).await;
            // A reply without id (older agents) is accepted too.
            let cmd = a.next_command().await.unwrap();
            assert_eq!(cmd["execute"], "guest-info");
            a.p.send(json!({"return": {"version": "7.2"}})).await;
            assert!(a.next_command().await.is_none());
            assert_eq!(a.syncs, 1, "no re-sync while all goes well");
        },
        async {
            let mut g = QgaClient::connect_unix(&path, Duration::MAX).await.unwrap();
            g.ping(Duration::MAX).await.unwrap();
            let info = g
                .execute("guest-info", None, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(info["version"], "7.2");
        },
    )
    .await;
}

/// Another writer on the client's own connection (virt-snap's thaw watchdog, which
/// inherits `as_fd()`): its `0xFF`-prefixed command with a string id makes the agent send an
/// id-less parse error and a reply with that id; the client drops both and reads its own
/// reply, without re-synchronising.
#[tokio::test]
async fn qga_replies_to_another_writer_on_the_connection_are_dropped() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut a = Agent::accept(&l).await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(cmd["execute"], "guest-fsfreeze-status");
            // The other writer's line, on the same connection.
            let other = a.next_command().await.unwrap();
            assert_eq!(other["execute"], "guest-fsfreeze-thaw");
            assert_eq!(other["id"], "vs-watchdog");
            a.reply(&other, json!(1)).await;
            a.p.send(json!({"error": {"class": "GenericError", "desc": "no"},
                "id": "vs-watchdog"}))
                .await;
            a.reply(&cmd, json!("thawed")).await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(cmd["execute"], "guest-ping");
            a.reply(&cmd, json!({})).await;
            assert_eq!(a.syncs, 1, "no re-sync");
        },
        async {
            use std::os::fd::AsFd;
            let mut g = QgaClient::connect_unix(&path, Duration::from_secs(5))
                .await
                .unwrap();
            let other =
                std::os::unix::net::UnixStream::from(g.as_fd().try_clone_to_owned().unwrap());
            let status = g.execute("guest-fsfreeze-status", None, Duration::from_secs(5));
            let write_other = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let line = b"\xff{\"execute\":\"guest-fsfreeze-thaw\",\"id\":\"vs-watchdog\"}\n";
                std::io::Write::write_all(&mut &other, line).unwrap();
            };
            let (st, ()) = tokio::join!(status, write_other);
            assert_eq!(st.unwrap(), "thawed");
            g.ping(Duration::from_secs(5)).await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn qga_exec_polls_until_exited_and_decodes_output() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut a = Agent::accept(&l).await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(cmd["execute"], "guest-exec");
            let args = &cmd["arguments"];
            assert_eq!(args["path"], "/bin/sh");
            assert_eq!(args["arg"], json!(["-c", "cat; echo err >&2; exit 3"]));
            assert_eq!(args["capture-output"], true);
            let input = base64::engine::general_purpose::STANDARD
                .decode(args["input-data"].as_str().unwrap())
                .unwrap();
            assert_eq!(input, b"hello\x00\xff binary");
            a.reply(&cmd, json!({"pid": 4242})).await;
            let mut polls = 0;
            let mut last = None;
            loop {
                let st = a.next_command().await.unwrap();
                assert_eq!(st["execute"], "guest-exec-status");
                assert_eq!(st["arguments"]["pid"], 4242);
                let now = std::time::Instant::now();
                if let Some(prev) = last {
                    let gap = now - prev;
                    assert!(gap >= Duration::from_millis(15), "polls too fast: {gap:?}");
                }
                last = Some(now);
                polls += 1;
                if polls < 4 {
                    a.reply(&st, json!({"exited": false})).await;
                } else {
                    a.reply(
                        &st,
                        json!({"exited": true, "exitcode": 3,
                        "out-data": b64(&input), "err-data": b64(b"err\n")}),
                    )
                    .await;
                    break;
                }
            }
            // A second exec killed by a signal, without output.
            let cmd = a.next_command().await.unwrap();
            assert!(cmd["arguments"].get("input-data").is_none());
            assert_eq!(cmd["arguments"]["arg"], json!([]));
            a.reply(&cmd, json!({"pid": 5})).await;
            let st = a.next_command().await.unwrap();
            a.reply(&st, json!({"exited": true, "signal": 9})).await;
        },
        async {
            let mut g = QgaClient::connect_unix(&path, Duration::from_secs(5))
                .await
                .unwrap();
            let out = g
                .exec(
                    &["/bin/sh", "-c", "cat; echo err >&2; exit 3"],
                    Some(b"hello\x00\xff binary"),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            assert_eq!(out.exit_code, Some(3));
            assert_eq!(out.signal, None);
            assert_eq!(out.stdout, b"hello\x00\xff binary");
            assert_eq!(out.stderr, b"err\n");
            assert!(!out.success());
            let out = g
                .exec(&["/bin/sleep"], None, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(out.signal, Some(9));
            assert_eq!(out.exit_code, None);
            assert!(out.stdout.is_empty());
            assert!(!out.success());
            let e = g.exec(&[], None, Duration::from_secs(1)).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol);
        },
    )
    .await;
}

#[tokio::test]
async fn qga_timeout_resyncs_and_drops_the_late_reply() {
    let srv = server();
    let path = srv.path.clone();
    let (late_tx, late_rx) = tokio::sync::oneshot::channel::<()>();
    run(
        srv,
        |l| async move {
            let mut a = Agent::accept(&l).await;
            let slow = a.next_command().await.unwrap();
            assert_eq!(slow["execute"], "guest-fsfreeze-freeze");
            late_rx.await.unwrap();
            // The late answer arrives before the client's re-sync is read.
            a.reply(&slow, json!(1)).await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(a.syncs, 2, "the client re-synced after its timeout");
            assert_eq!(cmd["execute"], "guest-fsfreeze-status");
            a.reply(&cmd, json!("thawed")).await;
            // A command error keeps the stream in sync: no third sync.
            let cmd = a.next_command().await.unwrap();
            a.p.send(json!({"error": {"class": "CommandNotFound",
                "desc": "The command guest-nope has not been found"}, "id": cmd["id"]}))
                .await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(a.syncs, 2);
            a.reply(&cmd, json!({})).await;
            // No reply on success; the next call re-syncs past the error sent late.
            let cmd = a.next_command().await.unwrap();
            assert_eq!(cmd["execute"], "guest-shutdown");
            assert_eq!(cmd["arguments"], json!({"mode": "powerdown"}));
            a.p.send(json!({"error": {"class": "GenericError", "desc": "late"}, "id": 1}))
                .await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(a.syncs, 3);
            a.reply(&cmd, json!({})).await;
        },
        async {
            let mut g = QgaClient::connect_unix(&path, Duration::from_secs(5))
                .await
                .unwrap();
            let e = g
                .execute("guest-fsfreeze-freeze", None, Duration::from_millis(100))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
            late_tx.send(()).unwrap();
            let st = g
                .execute("guest-fsfreeze-status", None, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(st, "thawed");
            let e = g
                .execute("guest-nope", None, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Command);
            assert_eq!(e.class(), Some("CommandNotFound"));
            g.ping(Duration::from_secs(5)).await.unwrap();
            g.execute_no_reply(
                "guest-shutdown",
                Some(json!({"mode": "powerdown"})),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            g.ping(Duration::from_secs(5)).await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn qga_over_long_line_is_a_protocol_error_then_resyncs() {
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut a = Agent::accept(&l).await;
            a.next_command().await.unwrap();
            let chunk = vec![b'y'; 1 << 20];
            for _ in 0..(qmp_proto::qga::MAX_LINE / chunk.len() + 1) {
                a.p.send_raw(&chunk).await;
            }
            a.p.send_raw(b"\n").await;
            let cmd = a.next_command().await.unwrap();
            assert_eq!(a.syncs, 2);
            a.reply(&cmd, json!({})).await;
        },
        async {
            let mut g = QgaClient::connect_unix(&path, Duration::from_secs(5))
                .await
                .unwrap();
            let e = g.ping(Duration::from_secs(5)).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            g.ping(Duration::from_secs(5)).await.unwrap();
        },
    )
    .await;
}

#[tokio::test]
async fn qga_silent_agent_times_out_and_eof_is_disconnected() {
    // Nobody answers the sync (a guest whose agent has not started yet).
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut p = Peer::accept(&l).await;
            let _ = p.recv_raw().await;
            assert!(p.recv_raw().await.is_none());
        },
        async {
            let e = QgaClient::connect_unix(&path, Duration::from_millis(200))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        },
    )
    .await;

    // The agent goes away mid-command.
    let srv = server();
    let path = srv.path.clone();
    run(
        srv,
        |l| async move {
            let mut a = Agent::accept(&l).await;
            a.next_command().await.unwrap();
        },
        async {
            let mut g = QgaClient::connect_unix(&path, Duration::from_secs(5))
                .await
                .unwrap();
            let e = g.ping(Duration::from_secs(5)).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
        },
    )
    .await;

    // No socket.
    let dir = tempfile::tempdir().unwrap();
    let e = QgaClient::connect_unix(dir.path().join("none"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
}
