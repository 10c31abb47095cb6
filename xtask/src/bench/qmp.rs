//! `cargo xtask bench qmp`: `query-status` through qmp-proto on one real QEMU (KVM, no guest
//! OS), next to QEMU's own floors and next to Python's qemu.qmp, all in the same run.
//!
//! One QEMU with three QMP monitors: the Rust driver (crates/bench-drivers/src/bin/qmp_bench.rs)
//! holds a bare blocking socket on the first and a qmp-proto client on the second and
//! alternates them command by command (sequential) or block by block (pipelined stream vs
//! 8 in flight); the Python driver (xtask/bench-py/qmp_bench.py) uses the third. Rounds of
//! the two drivers alternate so that drift in the shared machine's speed hits both alike.
//!
//! Targets checked at the end:
//! (a) qmp-proto's sequential p50 within 10% of the bare blocking socket's p50;
//! (b) qmp-proto with 8 in flight reaches at least 90% of the pipelined stream's rate;
//! (c) qmp-proto's client CPU per command at most a tenth of qemu.qmp's.

use super::harness::{median, ms, parse_driver_output, percentile, Series};
use crate::{deps, util};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sequential round trips per side per round.
const SEQ: usize = 400;
/// Commands per stream block.
const STREAM: usize = 1000;
/// Stream blocks per round.
const BLOCKS: usize = 4;

/// The QEMU under test; killed and reaped on drop.
struct Qemu {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_qemu(socks: &[&str]) -> Result<(Qemu, Vec<std::path::PathBuf>), String> {
    if !util::have("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 is missing: run `cargo xtask deps`".into());
    }
    // Short path: unix socket paths are limited to 107 bytes.
    let dir = std::env::temp_dir().join(format!("vs-bench-qmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let paths: Vec<_> = socks.iter().map(|s| dir.join(s)).collect();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35,accel=kvm", "-m", "128", "-nodefaults"])
        .args(["-no-user-config", "-display", "none"]);
    for p in &paths {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", p.display()));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let mut q = Qemu { child, dir };
    // Ready once every monitor greets (each probe connection is closed right away).
    let t0 = Instant::now();
    for p in &paths {
        loop {
            if let Ok(Some(st)) = q.child.try_wait() {
                return Err(format!("QEMU exited during start-up: {st}"));
            }
            let greeted = UnixStream::connect(p).ok().and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).ok()?;
                line.contains("\"QMP\"").then_some(())
            });
            if greeted.is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("QEMU's QMP monitors did not greet within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok((q, paths))
}

fn take(all: &[Series], label: &str) -> Series {
    let mut s = Series::new(label);
    for x in all.iter().filter(|x| x.label == label) {
        s.wall.extend(&x.wall);
        s.cpu.extend(&x.cpu);
    }
    s
}

/// The median of `a[i] / b[i]` over pairs measured back to back (robust to drift).
fn paired(a: &[Duration], b: &[Duration]) -> f64 {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64().max(1e-12))
        .collect();
    if r.is_empty() {
        return f64::NAN;
    }
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

fn rate(per_cmd: Duration) -> f64 {
    1.0 / per_cmd.as_secs_f64().max(1e-12)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let rounds = super::runs_arg(args, 8)?;
    let python = deps::bench_venv()?;
    let release = super::build_release("bench-drivers")?;
    let script = util::workspace_root().join("xtask/bench-py/qmp_bench.py");
    let (_qemu, socks) = start_qemu(&["floor.sock", "ours.sock", "py.sock"])?;
    let (seq, stream, blocks) = (SEQ.to_string(), STREAM.to_string(), BLOCKS.to_string());
    let mut all = Vec::new();
    for r in 0..rounds {
        util::step(&format!("round {}/{rounds}", r + 1));
        let out = util::output(
            Command::new(release.join("qmp_bench"))
                .args([&socks[0], &socks[1]])
                .args([&seq, &stream, &blocks]),
        )?;
        all.extend(parse_driver_output(&out)?);
        let out = util::output(
            Command::new(&python)
                .arg(&script)
                .arg(&socks[2])
                .args([&seq, &stream, &blocks]),
        )?;
        all.extend(parse_driver_output(&out)?);
    }
    let floor_seq = take(&all, "floor-seq");
    let ours_seq = take(&all, "ours-seq");
    let py_seq = take(&all, "qmp-py-seq");
    let floor_stream = take(&all, "floor-stream");
    let ours_8 = take(&all, "ours-8");
    let py_8 = take(&all, "qmp-py-8");
    let fake_seq = take(&all, "fake-seq");
    let fake_8 = take(&all, "fake-8");

    println!(
        "\nqmp: query-status on one QEMU 10.0.2 (KVM, no guest OS), {rounds} rounds; \
         sequential: {SEQ} round trips per side per round; streams: {BLOCKS} x {STREAM} commands"
    );
    println!(
        "{:<58} {:>10} {:>10} {:>12} {:>12}",
        "measured", "p50/cmd", "p90/cmd", "commands/s", "cpu/cmd"
    );
    let row = |what: &str, s: &Series| {
        let cpu = if s.cpu.is_empty() {
            "-".to_string()
        } else {
            us(median(&s.cpu))
        };
        println!(
            "{:<58} {:>10} {:>10} {:>12.0} {:>12}",
            what,
            us(s.median()),
            us(percentile(&s.wall, 0.9)),
            rate(s.median()),
            cpu
        );
    };
    row("floor: bare blocking socket, one at a time", &floor_seq);
    row("qmp-proto: run(&QueryStatus), one at a time", &ours_seq);
    row("qemu.qmp: execute('query-status'), one at a time", &py_seq);
    row(
        "floor: pipelined raw stream (all written at once)",
        &floor_stream,
    );
    row("qmp-proto: 8 tasks, 8 in flight", &ours_8);
    row("qemu.qmp: 8 coroutines, 8 in flight", &py_8);
    row(
        "qmp-proto vs in-process fake server, one at a time",
        &fake_seq,
    );
    row("qmp-proto vs in-process fake server, 8 in flight", &fake_8);

    let ratio = |peer: Duration, ours: Duration| peer.as_secs_f64() / ours.as_secs_f64().max(1e-12);
    println!(
        "  => qemu.qmp / qmp-proto: sequential latency {:.2}x, 8-in-flight time per command {:.2}x, \
         CPU per command {:.1}x (sequential) and {:.1}x (8 in flight)",
        ratio(py_seq.median(), ours_seq.median()),
        ratio(py_8.median(), ours_8.median()),
        ratio(median(&py_seq.cpu), median(&ours_seq.cpu)),
        ratio(median(&py_8.cpu), median(&ours_8.cpu)),
    );

    println!("\ntargets");
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let a = ours_seq.median().as_secs_f64() / floor_seq.median().as_secs_f64();
    println!(
        "(a) sequential p50 within 10% of the bare socket: {} ({} vs {}: {:+.1}%)",
        verdict(a <= 1.10),
        ms(ours_seq.median()),
        ms(floor_seq.median()),
        (a - 1.0) * 100.0
    );
    println!(
        "    paired (each qmp-proto round trip / the bare one next to it), median: {:+.1}%",
        (paired(&ours_seq.wall, &floor_seq.wall) - 1.0) * 100.0
    );
    let b = rate(ours_8.median()) / rate(floor_stream.median());
    println!(
        "(b) 8 in flight >= 90% of the pipelined stream: {} ({:.0} vs {:.0} commands/s: {:.0}%)",
        verdict(b >= 0.90),
        rate(ours_8.median()),
        rate(floor_stream.median()),
        b * 100.0
    );
    println!(
        "    paired (each stream block / the qmp-proto block next to it), median: {:.0}%",
        paired(&floor_stream.wall, &ours_8.wall) * 100.0
    );
    println!(
        "    (for scale: the bare blocking socket itself costs {} of CPU per command)",
        us(median(&floor_seq.cpu))
    );
    for (what, ours, py) in [
        ("sequential", &ours_seq, &py_seq),
        ("8 in flight", &ours_8, &py_8),
    ] {
        let (o, p) = (median(&ours.cpu), median(&py.cpu));
        println!(
            "(c) CPU per command <= 1/10 of qemu.qmp's, {what}: {} ({} vs {}: 1/{:.1})",
            verdict(o.as_secs_f64() * 10.0 <= p.as_secs_f64()),
            us(o),
            us(p),
            ratio(p, o)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratio_is_the_median_of_pair_ratios() {
        let us = |v: &[u64]| {
            v.iter()
                .map(|&x| Duration::from_micros(x))
                .collect::<Vec<_>>()
        };
        // Drift doubles both sides halfway through: the pair ratios stay 1.1.
        let a = us(&[110, 110, 220, 220, 220]);
        let b = us(&[100, 100, 200, 200, 200]);
        assert!((paired(&a, &b) - 1.1).abs() < 1e-9);
        assert!(paired(&[], &[]).is_nan());
        assert!((rate(Duration::from_micros(250)) - 4000.0).abs() < 1e-6);
    }
}
