//! Time from spawning QEMU to the first `query-status` answer through qmp-proto.
//! Usage: qemu_start RUNS

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut wall = Vec::with_capacity(runs);
    for _ in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let t0 = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(bench_drivers::qemu_args(&sock))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64 (run `cargo xtask deps`)");
        let client = loop {
            match qmp_proto::QmpClient::connect_unix(&sock).await {
                Ok(c) => break c,
                Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Err(e) => panic!("QEMU did not answer: {e}"),
            }
        };
        client
            .execute("query-status", None)
            .await
            .expect("query-status");
        wall.push(t0.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    bench_drivers::emit("qmp-proto: spawn QEMU -> query-status answered", &wall);
}
