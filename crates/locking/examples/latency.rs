//! How long acquiring and releasing takes: `cargo run --release -p locking --example latency`.
//! Prints p50 / p99 / max for a lease only (an LV by UUID), a lease plus QEMU image locks (a
//! file), and a contended attempt that is refused and names the holder.

use locking::{LockManager, Purpose, Resource, UuidKind};
use std::time::{Duration, Instant};

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<40} n={} p50={:>7.1?} p99={:>7.1?} max={:>7.1?}",
        v.len(),
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("vs-lock-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 4096])?;
    let locks = LockManager::local(dir.join("locks"))?;
    let lv = Purpose::VolumeOp {
        op: "bench".into(),
        volumes: vec![Resource::Uuid {
            kind: UuidKind::LvmLv,
            uuid: "dR3kzF-9a2B-Xc4d-Ef5g-Hi6j-Kl7m-No8pQr".into(),
            display: "vg0/lv".into(),
            image: None,
        }],
    };
    let file = Purpose::VolumeOp {
        op: "bench".into(),
        volumes: vec![Resource::file(&img)],
    };
    const N: usize = 2000;
    for (name, p) in [
        ("acquire+release, lease only", &lv),
        ("acquire+release, lease + QEMU locks", &file),
    ] {
        let mut v = Vec::with_capacity(N);
        for _ in 0..N {
            let t = Instant::now();
            drop(locks.acquire(p)?);
            v.push(t.elapsed());
        }
        stats(name, v);
    }
    let _held = locks.acquire(&file)?;
    let mut v = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        let e = locks.acquire(&file).expect_err("held");
        v.push(t.elapsed());
        assert!(!e.holders().is_empty());
    }
    stats("refused, holder named", v);
    drop(_held);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
