//! `cargo xtask bench image-snapshot [--runs N] [--count N] [--full] [--only a|b]`: native internal
//! snapshots (`virt-snap image snapshot create|apply|delete`) against `qemu-img snapshot
//! -c|-a|-d`, whole processes, side by side on the same image.
//!
//! (a) create, apply and delete on an 8 GiB image with 4 GiB written (built once with
//!     qemu-io and cached in target/bench/image-snapshot/), interleaved: our three
//!     operations, then qemu-img's three, `--runs` times (default 15).
//! (b) `--count` (default 200) snapshots created one after another on a fresh 1 GiB image
//!     with 16 MiB written, by each tool: total time and the per-operation time of the first
//!     and last tenth (qemu-img's grows with the number of snapshots: 1000 take it about
//!     200 s here, so its loop runs to 1000 only with `--full`; ours always also runs 1000).
//! (c) peak RSS of every process.
//!
//! Before timing, each tool's result is checked with `qemu-img check` and the snapshot list.

use super::harness::{ms, report, time_process, Series};
use super::{build_release, num_arg, runs_arg};
use crate::util::{self, step};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const RECIPE_A: &str = "v1-8G-4G-data";

fn bench_dir() -> Result<PathBuf, String> {
    let dir = util::target_dir().join("bench").join("image-snapshot");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn s(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| "non-UTF-8 path".to_string())
}

/// The 8 GiB image with 4 GiB of data, made once.
fn big_image(dir: &Path) -> Result<PathBuf, String> {
    let img = dir.join(format!("{RECIPE_A}.qcow2"));
    if img.exists() {
        step(&format!("reusing {}", img.display()));
        return Ok(img);
    }
    let partial = dir.join(format!("{RECIPE_A}.qcow2.partial"));
    let p = s(&partial)?;
    step(&format!(
        "creating {} (8 GiB virtual, 4 GiB written; once)",
        img.display()
    ));
    util::output(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, "8G"]))?;
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for i in 0..16u64 {
        io.args(["-c", &format!("write -q -P 0x5a {}M 256M", i * 256)]);
    }
    io.arg(p);
    util::output(&mut io)?;
    std::fs::rename(&partial, &img).map_err(|e| format!("cannot rename: {e}"))?;
    Ok(img)
}

fn check_clean(img: &str) -> Result<(), String> {
    let st = Command::new("qemu-img")
        .args(["check", "-q", img])
        .status()
        .map_err(|e| format!("cannot run qemu-img check: {e}"))?;
    if !st.success() {
        return Err(format!("qemu-img check found problems in {img}"));
    }
    Ok(())
}

struct Tools {
    ours: PathBuf,
    state: PathBuf,
}

impl Tools {
    fn ours(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ours);
        c.env("VIRT_SNAP_STATE_DIR", &self.state);
        c.args(["image", "snapshot"]).args(args);
        c
    }
    fn qemu(args: &[&str]) -> Command {
        let mut c = Command::new("qemu-img");
        c.arg("snapshot").args(args);
        c
    }
}

fn part_a(t: &Tools, dir: &Path, runs: usize) -> Result<Vec<f64>, String> {
    let img = big_image(dir)?;
    let img = s(&img)?.to_string();
    step("(a) checking one round of each tool");
    for (who, mk) in [("virt-snap", true), ("qemu-img", false)] {
        let cmds: [Vec<&str>; 3] = [
            vec!["create", &img, "bench"],
            vec!["apply", &img, "bench"],
            vec!["delete", &img, "bench"],
        ];
        for a in &cmds {
            let mut c = if mk {
                t.ours(a)
            } else {
                let q: Vec<&str> = match a[0] {
                    "create" => vec!["-c", "bench", &img],
                    "apply" => vec!["-a", "bench", &img],
                    _ => vec!["-d", "bench", &img],
                };
                Tools::qemu(&q)
            };
            time_process(&mut c).map_err(|e| format!("{who}: {e}"))?;
        }
        check_clean(&img)?;
    }
    step(&format!(
        "(a) timing create/apply/delete, {runs} rounds, interleaved"
    ));
    let mut series: Vec<Series> = [
        "virt-snap image snapshot create",
        "qemu-img snapshot -c",
        "virt-snap image snapshot apply",
        "qemu-img snapshot -a",
        "virt-snap image snapshot delete",
        "qemu-img snapshot -d",
    ]
    .iter()
    .map(|l| Series::new(*l))
    .collect();
    for _ in 0..runs {
        series[0].push(time_process(&mut t.ours(&["create", &img, "bench"]))?);
        series[2].push(time_process(&mut t.ours(&["apply", &img, "bench"]))?);
        series[4].push(time_process(&mut t.ours(&["delete", &img, "bench"]))?);
        series[1].push(time_process(&mut Tools::qemu(&["-c", "bench", &img]))?);
        series[3].push(time_process(&mut Tools::qemu(&["-a", "bench", &img]))?);
        series[5].push(time_process(&mut Tools::qemu(&["-d", "bench", &img]))?);
    }
    check_clean(&img)?;
    let rss = |v: &[&Series]| v.iter().map(|s| s.max_rss_kib()).max().unwrap_or(0);
    let (ours_rss, peer_rss) = (
        rss(&[&series[0], &series[2], &series[4]]),
        rss(&[&series[1], &series[3], &series[5]]),
    );
    let ratios = report(
        "(a) 8 GiB qcow2 image, 4 GiB written: one snapshot created, applied, deleted",
        &[
            (&series[0], &series[1]),
            (&series[2], &series[3]),
            (&series[4], &series[5]),
        ],
    );
    println!(
        "(c) peak RSS: virt-snap {ours_rss} KiB, qemu-img {peer_rss} KiB: {}",
        if ours_rss <= peer_rss {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(ratios)
}

/// Create `n` snapshots one by one on a fresh image; per-operation samples.
fn many(dir: &Path, t: &Tools, ours: bool, n: usize) -> Result<Series, String> {
    let img = dir.join(if ours {
        "many-ours.qcow2"
    } else {
        "many-qemu.qcow2"
    });
    let p = s(&img)?;
    let _ = std::fs::remove_file(&img);
    util::output(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, "1G"]))?;
    util::output(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -q -P 0x5a 0 16M", p]))?;
    let mut series = Series::new(if ours {
        format!("virt-snap image snapshot create x{n}")
    } else {
        format!("qemu-img snapshot -c x{n}")
    });
    for i in 1..=n {
        let name = format!("snapshot-{i:04}");
        let mut c = if ours {
            t.ours(&["create", p, &name])
        } else {
            Tools::qemu(&["-c", &name, p])
        };
        series.push(time_process(&mut c)?);
        if !ours && i % 100 == 0 {
            eprintln!("    qemu-img: {i}/{n}");
        }
    }
    check_clean(p)?;
    let list = util::output(Command::new("qemu-img").args(["snapshot", "-l", p]))?;
    if list.lines().count() != n + 2 {
        return Err(format!("{p}: expected {n} snapshots"));
    }
    Ok(series)
}

fn total(s: &Series) -> Duration {
    s.wall.iter().sum()
}

fn tenth(s: &Series, last: bool) -> Duration {
    let k = (s.wall.len() / 10).max(1);
    let v = if last {
        &s.wall[s.wall.len() - k..]
    } else {
        &s.wall[..k]
    };
    super::harness::median(v)
}

fn part_b(t: &Tools, dir: &Path, n: usize, full: bool) -> Result<(f64, f64), String> {
    let peer_n = if full { 1000.max(n) } else { n };
    step(&format!(
        "(b) {n} snapshots one after another by each tool{}",
        if full { " (and 1000 by qemu-img)" } else { "" }
    ));
    let ours_n = many(dir, t, true, n)?;
    let peer = many(dir, t, false, peer_n)?;
    let ours_1000 = if n < 1000 {
        Some(many(dir, t, true, 1000)?)
    } else {
        None
    };
    println!(
        "\n(b) snapshots created one after another (whole processes, 1 GiB image, 16 MiB written)"
    );
    println!(
        "{:<44} {:>10} {:>14} {:>14} {:>10}",
        "measured", "total", "first 10%/op", "last 10%/op", "max rss"
    );
    let row = |x: &Series| {
        println!(
            "{:<44} {:>10} {:>14} {:>14} {:>10}",
            x.label,
            format!("{:.2} s", total(x).as_secs_f64()),
            ms(tenth(x, false)),
            ms(tenth(x, true)),
            format!("{} KiB", x.max_rss_kib())
        )
    };
    row(&ours_n);
    if let Some(o) = &ours_1000 {
        row(o);
    }
    row(&peer);
    // The ratio at the same count.
    let peer_at_n: Duration = peer.wall[..n.min(peer.wall.len())].iter().sum();
    let r = peer_at_n.as_secs_f64() / total(&ours_n).as_secs_f64().max(1e-9);
    println!("  => {n} snapshots: qemu-img / virt-snap = {r:.1}x");
    let ours_k = ours_1000.as_ref().unwrap_or(&ours_n);
    let r1000 = if peer.wall.len() >= 1000 && ours_k.wall.len() >= 1000 {
        let peer_1000: Duration = peer.wall[..1000].iter().sum();
        let ours_1000: Duration = ours_k.wall[..1000].iter().sum();
        let r = peer_1000.as_secs_f64() / ours_1000.as_secs_f64();
        println!(
            "  => 1000 snapshots, both measured: qemu-img {:.1} s / virt-snap {:.2} s = {r:.1}x",
            peer_1000.as_secs_f64(),
            ours_1000.as_secs_f64()
        );
        r
    } else {
        // qemu-img's per-op time grows with the count (it re-reads and rewrites the table
        // entry by entry): extrapolate its 1000-loop linearly from the growth measured here.
        let first = tenth(&peer, false).as_secs_f64();
        let last = tenth(&peer, true).as_secs_f64();
        let slope = (last - first) / (peer.wall.len() as f64 * 0.9);
        let est: f64 = (0..1000).map(|i| first + slope * i as f64).sum();
        let r = est / total(ours_k).as_secs_f64();
        println!(
            "  => 1000 snapshots: virt-snap {:.2} s measured; qemu-img ESTIMATED {est:.0} s from \
             its per-op growth over {} (run with --full to measure it) = {r:.0}x",
            total(ours_k).as_secs_f64(),
            peer.wall.len()
        );
        r
    };
    Ok((r, r1000))
}

/// Run the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    for tool in ["qemu-img", "qemu-io"] {
        if !util::have(tool) {
            return Err(format!("`{tool}` is not installed: run `cargo xtask deps`"));
        }
    }
    let runs = runs_arg(args, 15)?;
    let n = num_arg(args, "--count", 200)?;
    let full = args.iter().any(|a| a == "--full");
    let release = build_release("virt-snap")?;
    let dir = bench_dir()?;
    let t = Tools {
        ours: release.join("virt-snap"),
        state: dir.join("state"),
    };
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let started = Instant::now();
    let ra = if only != Some("b") {
        part_a(&t, &dir, runs)?
    } else {
        vec![f64::NAN]
    };
    let (rb, rb1000) = if only != Some("a") {
        part_b(&t, &dir, n, full)?
    } else {
        (f64::NAN, f64::NAN)
    };
    let worst_a = ra.iter().copied().fold(f64::INFINITY, f64::min);
    let verdict = |r: f64, target: f64| {
        if r.is_nan() || r.is_infinite() {
            "skipped"
        } else if r >= target {
            "met"
        } else {
            "NOT met"
        }
    };
    println!("\ntargets:");
    println!(
        "  (a) create/apply/delete at least 2x faster: {} (worst {worst_a:.1}x)",
        verdict(worst_a, 2.0)
    );
    println!(
        "  (b) 1000 snapshots in a row at least 20x faster: {} ({rb1000:.1}x, qemu-img {}; \
         {rb:.1}x at {n})",
        verdict(rb1000, 20.0),
        if full { "measured" } else { "estimated" }
    );
    println!("  (c) peak RSS no higher than qemu-img's: see (c) above");
    println!("(bench took {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}
