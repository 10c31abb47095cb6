//! `cargo xtask bench locking`: the driver that times lease grants in-process, and keeps an
//! etcd cluster running for the bench's whole-process half.
//!
//! Usage:
//!
//! - `lock_bench run RUNS DIR`: starts a 3-member etcd cluster on loopback
//!   ([`testbed::EtcdCluster`]), makes three empty volume files under `DIR`, and times, `RUNS`
//!   rounds after warm-up rounds, the order rotating from round to round:
//!   - `LockManager::acquire` of an exclusive `VolumeOp` lease on one `Resource::file`, then
//!     its release (the drop of `Acquired`), in a local lockspace (`DIR/locks`) and in the
//!     etcd lockspace (`EtcdBackend`, TTL 10 s);
//!   - the floor: what one etcd grant and release are on the wire, made with etcd-client
//!     directly on a current-thread runtime (one `lease_grant`, the grant's `Txn` with the
//!     same range compare and put with the lease, one `lease_revoke`), on the member the
//!     backend uses (the first);
//!   - `LockManager::acquire` of a `VmStart` with two read-only disks (two shared leases),
//!     then its release, local and etcd.
//!
//!   Prints one JSON line per series, `{"label", "wall_ns": [..], "cpu_ns": [..]}` (CPU: this
//!   process's user+sys over the operation, all threads, CLOCK_PROCESS_CPUTIME_ID; etcd's own
//!   CPU is not counted). Acquire and release are also reported apart.
//! - `lock_bench cluster`: starts a 3-member etcd cluster, prints its endpoints
//!   (`127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`) on one line, and keeps it running until stdin
//!   is closed (the members also die with this process: `PR_SET_PDEATHSIG`).

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use locking::{
    DiskUse, EtcdBackend, EtcdConfig, Holder, HolderRecord, LockManager, Mode, Purpose, Resource,
};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Untimed rounds before the measured ones (connections made, caches warm).
const WARMUP: usize = 5;

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("lock_bench: {what}: {e}");
    std::process::exit(1)
}

/// This process's CPU time (user + system, all threads).
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Default)]
struct Series {
    wall: Vec<u64>,
    cpu: Vec<u64>,
}

impl Series {
    fn push(&mut self, wall: Duration, cpu: Duration) {
        self.wall.push(wall.as_nanos() as u64);
        self.cpu.push(cpu.as_nanos() as u64);
    }
    fn print(&self, label: &str) {
        println!(
            "{}",
            serde_json::json!({"label": label, "wall_ns": self.wall, "cpu_ns": self.cpu})
        );
    }
}

/// Acquire + release, and each half.
#[derive(Default)]
struct Split {
    total: Series,
    acquire: Series,
    release: Series,
}

impl Split {
    fn print(&self, label: &str) {
        self.total.print(&format!("{label}: acquire + release"));
        self.acquire.print(&format!("{label}: acquire"));
        self.release.print(&format!("{label}: release"));
    }
}

/// Time one acquire and one release of `purpose` in `locks`; `keep` decides whether the
/// sample is recorded.
fn time_acquire(locks: &LockManager, purpose: &Purpose, out: &mut Split, keep: bool) {
    let (w0, c0) = (Instant::now(), cpu_now());
    let held = locks
        .acquire(purpose)
        .unwrap_or_else(|e| fail("acquire", e));
    let (w1, c1) = (Instant::now(), cpu_now());
    drop(held);
    let (w2, c2) = (Instant::now(), cpu_now());
    if keep {
        out.acquire.push(w1 - w0, c1 - c0);
        out.release.push(w2 - w1, c2 - c1);
        out.total.push(w2 - w0, c2 - c0);
    }
}

/// The floor: one grant and release of an exclusive lease with etcd-client alone.
struct Floor {
    rt: tokio::runtime::Runtime,
    client: Client,
    prefix: String,
    value: String,
}

impl Floor {
    fn new(endpoint: &str, key_hash: &str, display: &str) -> Floor {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail("tokio runtime", e));
        let client = rt
            .block_on(Client::connect([format!("http://{endpoint}")], None))
            .unwrap_or_else(|e| fail("connect to etcd", e));
        // A holder record like the backend's, so that the put carries as many bytes.
        let mut rec =
            HolderRecord::now(&Holder::Operation("bench".into()), Mode::Exclusive, display);
        rec.host = "hostA".into();
        Floor {
            rt,
            client,
            prefix: format!("/vsbench-floor/leases/{key_hash}/"),
            value: serde_json::to_string(&rec).unwrap_or_else(|e| fail("encode", e)),
        }
    }

    fn grant_release(&self, out: &mut Split, keep: bool) {
        let mut c = self.client.clone();
        let (w0, c0) = (Instant::now(), cpu_now());
        let lease = self.rt.block_on(async {
            let lease = c
                .lease_grant(10, None)
                .await
                .unwrap_or_else(|e| fail("lease_grant", e))
                .id();
            let txn = Txn::new()
                .when([
                    Compare::create_revision(self.prefix.clone(), CompareOp::Equal, 0)
                        .with_prefix(),
                ])
                .and_then([TxnOp::put(
                    format!("{}x", self.prefix),
                    self.value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(
                    self.prefix.clone(),
                    Some(GetOptions::new().with_prefix()),
                )]);
            let r = c.txn(txn).await.unwrap_or_else(|e| fail("txn", e));
            if !r.succeeded() {
                fail("floor txn", "the key is taken");
            }
            lease
        });
        let (w1, c1) = (Instant::now(), cpu_now());
        self.rt
            .block_on(c.lease_revoke(lease))
            .unwrap_or_else(|e| fail("lease_revoke", e));
        let (w2, c2) = (Instant::now(), cpu_now());
        if keep {
            out.acquire.push(w1 - w0, c1 - c0);
            out.release.push(w2 - w1, c2 - c1);
            out.total.push(w2 - w0, c2 - c0);
        }
    }
}

fn volume(dir: &Path, name: &str) -> Resource {
    let p = dir.join(name);
    std::fs::write(&p, b"").unwrap_or_else(|e| fail("create a volume file", e));
    Resource::file(p)
}

fn run(runs: usize, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| fail("create the work directory", e));
    let cluster = testbed::EtcdCluster::start(3).unwrap_or_else(|e| fail("start etcd", e));
    let vol = volume(dir, "vol.img");
    let disks = [volume(dir, "disk-a.img"), volume(dir, "disk-b.img")];

    let local = LockManager::local(dir.join("locks")).unwrap_or_else(|e| fail("lockspace", e));
    let cfg = EtcdConfig::parse(&cluster.url("vsbench", 10), "hostA")
        .unwrap_or_else(|e| fail("etcd URL", e));
    let etcd = LockManager::with_backend(Arc::new(
        EtcdBackend::new(cfg).unwrap_or_else(|e| fail("etcd backend", e)),
    ));
    let key = vol.key().unwrap_or_else(|e| fail("resource key", e));
    let floor = Floor::new(&cluster.endpoints()[0], &key.hash(), key.display());

    let op = Purpose::VolumeOp {
        op: "bench".into(),
        volumes: vec![vol],
    };
    let start = Purpose::VmStart {
        domain: "vsbench-lock".into(),
        disks: disks.iter().cloned().map(DiskUse::read_only).collect(),
    };
    let (mut op_local, mut op_etcd, mut op_floor) = Default::default();
    let (mut vm_local, mut vm_etcd): (Split, Split) = Default::default();
    for round in 0..WARMUP + runs {
        let keep = round >= WARMUP;
        for k in 0..5 {
            match (round + k) % 5 {
                0 => time_acquire(&local, &op, &mut op_local, keep),
                1 => time_acquire(&etcd, &op, &mut op_etcd, keep),
                2 => floor.grant_release(&mut op_floor, keep),
                3 => time_acquire(&local, &start, &mut vm_local, keep),
                _ => time_acquire(&etcd, &start, &mut vm_etcd, keep),
            }
        }
    }
    op_local.print("local VolumeOp, 1 exclusive");
    op_etcd.print("etcd VolumeOp, 1 exclusive");
    op_floor.print("floor: etcd-client grant");
    vm_local.print("local VmStart, 2 shared");
    vm_etcd.print("etcd VmStart, 2 shared");
    drop(etcd);
    drop(cluster);
}

fn cluster() {
    let cluster = testbed::EtcdCluster::start(3).unwrap_or_else(|e| fail("start etcd", e));
    println!("{}", cluster.endpoints().join(","));
    use std::io::{Read, Write};
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(cluster);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["run", runs, dir] => {
            let runs = runs
                .parse()
                .unwrap_or_else(|e| fail("RUNS must be a number", e));
            run(runs, Path::new(dir));
        }
        ["cluster"] => cluster(),
        _ => {
            eprintln!("usage: lock_bench run RUNS DIR | lock_bench cluster");
            std::process::exit(2);
        }
    }
}
