//! Hostile input never panics and never desynchronises the clients: property tests that
//! feed arbitrary bytes from a fake QMP server and a fake guest agent.

use std::time::Duration;

use proptest::prelude::*;
use qmp_proto::{QgaClient, QmpClient};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Lines of arbitrary bytes, JSON-ish fragments and hostile-but-valid JSON messages.
fn junk_line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "[ -~]{0,100}".prop_map(String::into_bytes),
        Just(b"{\"return\": {}}".to_vec()),
        Just(b"{\"return\": 1, \"id\": {\"nested\": [1]}}".to_vec()),
        Just(b"{\"return\": 1, \"id\": -1}".to_vec()),
        Just(b"{\"return\": 1, \"id\": 1e300}".to_vec()),
        Just(b"{\"error\": 5}".to_vec()),
        Just(b"{\"error\": {\"class\": 1}, \"id\": \"x\"}".to_vec()),
        Just(b"{\"event\": null, \"data\": 1}".to_vec()),
        Just(b"{\"event\": \"X\", \"timestamp\": \"now\"}".to_vec()),
        Just(b"{\"QMP\": 1}".to_vec()),
        Just(b"null".to_vec()),
        Just(b"\"\\ud800\"".to_vec()),
        Just(b"{\"a\":".repeat(200)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn qmp_survives_junk_between_replies(junk in proptest::collection::vec(junk_line(), 0..20)) {
        rt().block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let l = UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}
"#).await.unwrap();
                for _ in 0..2 {
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    let cmd: Value = serde_json::from_str(&line).unwrap();
                    for j in &junk {
                        w.write_all(j).await.unwrap();
                        w.write_all(b"\n").await.unwrap();
                    }
                    let reply = json!({"return": {"ok": cmd["execute"]}, "id": cmd["id"]});
                    w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
                }
                let mut rest = Vec::new();
                let _ = r.read_until(b'\n', &mut rest).await;
            });
            let c = tokio::time::timeout(Duration::from_secs(10), QmpClient::connect_unix(&path))
                .await
                .unwrap()
                .unwrap();
            let v = c.execute_timeout("query-status", None, Duration::from_secs(10)).await.unwrap();
            assert_eq!(v, json!({"ok": "query-status"}));
            assert!(!c.is_closed());
            drop(c);
            server.await.unwrap();
        });
    }

    #[test]
    fn qga_sync_survives_junk(junk in proptest::collection::vec(junk_line(), 0..20)) {
        rt().block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qga.sock");
            let l = UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                for j in &junk {
                    w.write_all(j).await.unwrap();
                    w.write_all(b"\n").await.unwrap();
                }
                let mut line = Vec::new();
                r.read_until(b'\n', &mut line).await.unwrap();
                let start = line.iter().rposition(|&b| b == 0xFF).unwrap() + 1;
                let sync: Value = serde_json::from_slice(&line[start..]).unwrap();
                assert_eq!(sync["execute"], "guest-sync-delimited");
                for j in &junk {
                    w.write_all(j).await.unwrap();
                }
                let mut reply = vec![0xFF];
                reply.extend_from_slice(json!({"return": sync["arguments"]["id"]}).to_string().as_bytes());
                reply.push(b'\n');
                w.write_all(&reply).await.unwrap();
                line.clear();
                r.read_until(b'\n', &mut line).await.unwrap();
                let cmd: Value = serde_json::from_slice(&line).unwrap();
                for j in &junk {
                    // Junk lines that look like replies to other ids or without JSON.
                    if serde_json::from_slice::<Value>(j).is_err() {
                        w.write_all(j).await.unwrap();
                        w.write_all(b"\n").await.unwrap();
                    }
                }
                w.write_all(format!("{}\n", json!({"return": {}, "id": cmd["id"]})).as_bytes()).await.unwrap();
            });
            let t = Duration::from_secs(10);
            let mut g = QgaClient::connect_unix(&path, t).await.unwrap();
            g.ping(t).await.unwrap();
            server.await.unwrap();
        });
    }
}
