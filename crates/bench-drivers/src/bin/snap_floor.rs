//! `cargo xtask bench snapshot`, the floor of a disk-only atomic snapshot: a bare QMP client
//! doing only the QMP work of one (the overlays are made beforehand, untimed, by the bench).
//!
//! Usage: `snap_floor QMP_SOCKET TAG TOP_NODE=OVERLAY_FILE...`
//!
//! Connects to QEMU's monitor with qmp-proto (greeting, `qmp_capabilities`), then for each
//! disk `blockdev-add`s the overlay file as `TAG-N-f` (file) and `TAG-N` (qcow2, `backing:
//! null`), then runs ONE `transaction` of `blockdev-snapshot` (`TOP_NODE` onto `TAG-N`) for
//! every disk: what virt-snap's capture does over QMP, without its planning, journal, leases
//! and metadata. Prints one JSON line, `{"connect_ns", "add_ns", "transaction_ns", "total_ns"}`,
//! times measured inside this process (the bench also times the whole process).

use qmp_proto::commands::TransactionAction;
use qmp_proto::commands::{BlockdevAdd, BlockdevOptions, BlockdevSnapshot, Transaction};
use qmp_proto::QmpClient;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: snap_floor QMP_SOCKET TAG TOP_NODE=OVERLAY_FILE...");
        std::process::exit(2);
    }
    let (sock, tag) = (&args[0], &args[1]);
    let disks: Vec<(String, String)> = args[2..]
        .iter()
        .map(|a| {
            let (n, f) = a.split_once('=').unwrap_or_else(|| {
                eprintln!("snap_floor: {a:?} is not TOP_NODE=OVERLAY_FILE");
                std::process::exit(2)
            });
            (n.to_string(), f.to_string())
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async {
        let t0 = Instant::now();
        let qmp = QmpClient::connect_unix(sock).await?;
        let t1 = Instant::now();
        let mut actions = Vec::new();
        for (i, (top, file)) in disks.iter().enumerate() {
            let node = format!("{tag}-{i}");
            let fnode = format!("{node}-f");
            qmp.run(&BlockdevAdd(BlockdevOptions::file(&fnode, file)))
                .await?;
            qmp.run(&BlockdevAdd(
                BlockdevOptions::new("qcow2", &node)
                    .set("file", fnode.as_str())
                    .backing(None),
            ))
            .await?;
            actions.push(TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                node: top.clone(),
                overlay: node,
            }));
        }
        let t2 = Instant::now();
        qmp.run(&Transaction::new(actions)).await?;
        let t3 = Instant::now();
        Ok::<_, qmp_proto::Error>([t1 - t0, t2 - t1, t3 - t2, t3 - t0])
    });
    match r {
        Ok([c, a, t, all]) => println!(
            "{}",
            serde_json::json!({
                "connect_ns": c.as_nanos() as u64,
                "add_ns": a.as_nanos() as u64,
                "transaction_ns": t.as_nanos() as u64,
                "total_ns": all.as_nanos() as u64,
            })
        ),
        Err(e) => {
            eprintln!("snap_floor: {e}");
            std::process::exit(1);
        }
    }
}
