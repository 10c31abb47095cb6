//! Measures QMP command throughput and latency through one shared client.
//!
//! ```text
//! cargo run --release -p qmp-proto --example throughput -- QMP_SOCKET [COMMANDS] [TASKS]
//! ```
//! Sends COMMANDS (default 5000) `query-status` from TASKS (default 8) tasks sharing one
//! connection; prints commands/s and the p50/p99 latency of a single round trip.

use std::process::ExitCode;
use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: throughput QMP_SOCKET [COMMANDS] [TASKS]");
        return ExitCode::from(2);
    };
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5000);
    let tasks: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8).max(1);
    match run(path, n, tasks).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &str, n: usize, tasks: usize) -> Result<(), qmp_proto::Error> {
    let qmp = qmp_proto::QmpClient::connect_unix(path).await?;
    // Sequential round trips: latency.
    let mut lat: Vec<Duration> = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t0 = Instant::now();
        qmp.execute("query-status", None).await?;
        lat.push(t0.elapsed());
    }
    lat.sort();
    println!(
        "sequential query-status: p50 {:?} p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    // Concurrent: throughput.
    let t0 = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let qmp = qmp.clone();
            let count = n / tasks + usize::from(i < n % tasks);
            tokio::spawn(async move {
                for _ in 0..count {
                    qmp.execute("query-status", None).await?;
                }
                Ok::<(), qmp_proto::Error>(())
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task panicked")?;
    }
    let took = t0.elapsed();
    println!(
        "{n} query-status from {tasks} tasks: {took:?} = {:.0} commands/s",
        n as f64 / took.as_secs_f64()
    );
    Ok(())
}
