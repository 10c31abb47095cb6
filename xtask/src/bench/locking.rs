//! `cargo xtask bench locking [--runs N]`: what a cluster (etcd) lockspace costs over the
//! local one, in two halves.
//!
//! 1. In-process, by the driver `lock_bench` (`crates/bench-drivers`), which starts its own
//!    3-member etcd 3.4 cluster on loopback: `LockManager::acquire` + release of an exclusive
//!    `VolumeOp` lease on one file, local lockspace vs etcd lockspace, and the floor, the bare
//!    etcd-client calls of one grant (`lease_grant`, the grant's `Txn`, `lease_revoke`); and a
//!    `VmStart` with two read-only disks (two shared leases), local vs etcd.
//! 2. Whole processes: a no-OS KVM domain (the XML of `bench domain`, two 64 MiB qcow2 disks),
//!    defined once per side (untimed), then `virt-snap start NAME` and `virt-snap destroy
//!    NAME` timed, one state directory in the default local lockspace, one with `--lockspace
//!    etcd://...` (a 3-member cluster kept running by `lock_bench cluster`, so `start` also
//!    spawns the domain's lease keeper), interleaved, the order alternating from run to run.
//!
//! Medians, p90 and the ratios etcd / local and etcd / floor; for the domain, the difference
//! etcd - local of the start and destroy medians. Everything started (etcd members, QEMUs,
//! keepers) is stopped also on error; the work directory target/bench/locking is removed at
//! the end.

use super::domain::{
    domain_xml, expect_running, kill_qemu_named, loadavg, quote, Ours, WorkDir, QEMU,
};
use super::harness::{ms, parse_driver_output, report_series, time_process, Series};
use super::{build_release, build_release_bin, runs_arg};
use crate::util::{self, step};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LOCAL: &str = "vsbench-lock-local";
const ETCD: &str = "vsbench-lock-etcd";

/// The etcd cluster of the domain half: a `lock_bench cluster` process, which stops its
/// members when its stdin closes (or when it dies).
struct Cluster {
    child: Option<Child>,
    endpoints: String,
}

impl Cluster {
    fn start(driver: &Path) -> Result<Cluster, String> {
        let mut child = Command::new(driver)
            .arg("cluster")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", driver.display()))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|o| std::io::BufReader::new(o).read_line(&mut line));
        let mut c = Cluster {
            child: Some(child),
            endpoints: line.trim().to_string(),
        };
        if !matches!(read, Some(Ok(n)) if n > 0) || c.endpoints.is_empty() {
            c.stop();
            return Err("lock_bench cluster did not report the etcd endpoints".into());
        }
        Ok(c)
    }

    fn url(&self, prefix: &str, ttl_secs: u64) -> String {
        format!("etcd://{}/{prefix}?ttl={ttl_secs}", self.endpoints)
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // EOF on its stdin: it stops the members and exits.
        drop(child.stdin.take());
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `-name` as virt-snap gives it to the QEMU of domain `name`.
fn qemu_name(name: &str) -> String {
    format!("guest={name},debug-threads=on")
}

fn find<'a>(series: &'a [Series], label: &str) -> Result<&'a Series, String> {
    series
        .iter()
        .find(|s| s.label == label)
        .ok_or_else(|| format!("lock_bench reported no series {label:?}"))
}

fn ratio(a: &Series, b: &Series) -> f64 {
    a.median().as_secs_f64() / b.median().as_secs_f64().max(1e-12)
}

fn diff_ms(a: &Series, b: &Series) -> String {
    let d = a.median().as_secs_f64() - b.median().as_secs_f64();
    format!("{:+.2} ms", d * 1000.0)
}

/// Half 1: the driver's in-process figures.
fn in_process(driver: &Path, runs: usize, work: &Path) -> Result<(), String> {
    let load_before = loadavg();
    step(&format!(
        "lock_bench: acquire + release, {runs} interleaved rounds after 5 warm-up rounds (load {load_before})"
    ));
    let out = util::output(
        Command::new(driver)
            .arg("run")
            .arg(runs.to_string())
            .arg(work.join("driver")),
    )?;
    let load_after = loadavg();
    let series = parse_driver_output(&out)?;
    let get = |l: &str| find(&series, l);
    let parts = ["acquire + release", "acquire", "release"];
    let op = |side: &str| -> Result<Vec<&Series>, String> {
        parts.iter().map(|p| get(&format!("{side}: {p}"))).collect()
    };
    let (local, etcd, floor) = (
        op("local VolumeOp, 1 exclusive")?,
        op("etcd VolumeOp, 1 exclusive")?,
        op("floor: etcd-client grant")?,
    );
    report_series(
        "locking: one exclusive VolumeOp lease on a file, LockManager::acquire + drop (in-process)",
        &[
            local[0], etcd[0], floor[0], local[1], etcd[1], floor[1], local[2], etcd[2], floor[2],
        ],
    );
    println!(
        "  => acquire + release: etcd / local = {:.1}x, etcd / floor = {:.2}x (etcd - floor = {})",
        ratio(etcd[0], local[0]),
        ratio(etcd[0], floor[0]),
        diff_ms(etcd[0], floor[0])
    );
    let (vl, ve) = (
        op("local VmStart, 2 shared")?,
        op("etcd VmStart, 2 shared")?,
    );
    report_series(
        "locking: VmStart with 2 read-only disks (2 shared leases), acquire + drop (in-process)",
        &[vl[0], ve[0], vl[1], ve[1], vl[2], ve[2]],
    );
    println!(
        "  => acquire + release: etcd / local = {:.1}x (etcd - local = {}); etcd VmStart / etcd VolumeOp = {:.2}x",
        ratio(ve[0], vl[0]),
        diff_ms(ve[0], vl[0]),
        ratio(ve[0], etcd[0])
    );
    println!("load average (1/5/15 min): before {load_before}, after {load_after}");
    Ok(())
}

/// Half 2: `virt-snap start` / `destroy` of a no-OS KVM domain, local vs etcd lockspace.
fn domain_start(vs: PathBuf, driver: &Path, runs: usize, work: &Path) -> Result<(), String> {
    step("two 64 MiB qcow2 disks per side, the domain XML; a 3-member etcd cluster");
    let mut xmls = Vec::new();
    for name in [LOCAL, ETCD] {
        let disks = super::domain::two_disks(work, name)?;
        let xml = work.join(format!("{name}.xml"));
        std::fs::write(&xml, domain_xml(name, &disks)).map_err(|e| e.to_string())?;
        xmls.push(xml);
    }
    let cluster = Cluster::start(driver)?;
    // Declared after the cluster: dropped (destroyed, undefined) while etcd still runs.
    let local = Ours {
        bin: vs.clone(),
        state: work.join("state-local"),
        global: Vec::new(),
        name: LOCAL.into(),
    };
    let etcd = Ours {
        bin: vs,
        state: work.join("state-etcd"),
        global: vec![
            "--lockspace".into(),
            cluster.url("vsbench-dom", 10),
            "--host".into(),
            "hostA".into(),
        ],
        name: ETCD.into(),
    };
    for (o, xml) in [(&local, &xmls[0]), (&etcd, &xmls[1])] {
        util::output(&mut o.cmd(&["define", &xml.display().to_string()]))
            .map_err(|e| format!("define {}: {e}", quote(xml)))?;
    }

    let load_before = loadavg();
    step(&format!(
        "virt-snap start, destroy: {runs} runs each after a warm-up, interleaved (load {load_before})"
    ));
    let mut s_local = Series::new("virt-snap start, local lockspace");
    let mut s_etcd = Series::new("virt-snap start, etcd lockspace");
    let mut d_local = Series::new("virt-snap destroy, local lockspace");
    let mut d_etcd = Series::new("virt-snap destroy, etcd lockspace");
    for i in 0..=runs {
        for k in 0..2 {
            let (o, s, d) = if (i + k) % 2 == 0 {
                (&local, &mut s_local, &mut d_local)
            } else {
                (&etcd, &mut s_etcd, &mut d_etcd)
            };
            let started = time_process(&mut o.cmd(&["start", &o.name]))?;
            expect_running(&o.name, util::output(&mut o.cmd(&["domstate", &o.name])))?;
            let destroyed = time_process(&mut o.cmd(&["destroy", &o.name]))?;
            if i > 0 {
                s.push(started);
                d.push(destroyed);
            }
        }
    }
    let load_after = loadavg();
    report_series(
        "locking: virt-snap start of a no-OS KVM domain (q35, 256 MiB, 1 vCPU, 2 qcow2 disks)",
        &[&s_local, &s_etcd],
    );
    println!(
        "  => etcd - local = {} ({:.2}x)",
        diff_ms(&s_etcd, &s_local),
        ratio(&s_etcd, &s_local)
    );
    report_series(
        "locking: virt-snap destroy of the running domain",
        &[&d_local, &d_etcd],
    );
    println!(
        "  => etcd - local = {} ({:.2}x)",
        diff_ms(&d_etcd, &d_local),
        ratio(&d_etcd, &d_local)
    );
    println!(
        "medians: start {} local, {} etcd; destroy {} local, {} etcd",
        ms(s_local.median()),
        ms(s_etcd.median()),
        ms(d_local.median()),
        ms(d_etcd.median())
    );
    println!("load average (1/5/15 min): before {load_before}, after {load_after}");
    drop(etcd);
    drop(local);
    drop(cluster);
    Ok(())
}

/// Run the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let runs = runs_arg(args, 20)?;
    super::require(&["qemu-img", QEMU, "etcd", "etcdctl"], true)?;
    let driver = build_release_bin("bench-drivers", "lock_bench")?.join("lock_bench");
    let vs = build_release("virt-snap")?.join("virt-snap");

    let work = util::target_dir().join("bench").join("locking");
    // What an interrupted earlier run may have left: its domains' QEMUs (their keepers end
    // with them), its state.
    for name in [LOCAL, ETCD] {
        kill_qemu_named(&qemu_name(name));
    }
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let _work = WorkDir(work.clone());

    in_process(&driver, runs, &work)?;
    let r = domain_start(vs, &driver, runs, &work);
    // Whatever happened, no QEMU of ours outlives the bench.
    for name in [LOCAL, ETCD] {
        kill_qemu_named(&qemu_name(name));
    }
    r
}
