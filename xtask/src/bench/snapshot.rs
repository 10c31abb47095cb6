//! `cargo xtask bench snapshot [--runs N] [--only ours|peer]
//! [--part disk|ram|storage|revert|delete]... [--ram 256,1024,4096] [--save-max N]`: live
//! snapshots of running no-OS KVM domains (q35, 1 vCPU, no guest OS: the vCPU idles in the
//! firmware), reverts to them and deletes of them, virt-snap
//! against libvirt 11.3 and against bare floors, in one run, interleaved (issue 13's and
//! issue 14's figures; see docs/benchmarks.md):
//!
//! - **disk**: a disk-only atomic snapshot of a domain with 4 qcow2 disks: the whole
//!   `virt-snap snapshot-create-as DOM sN --disk-only --atomic --output json` process, its
//!   reported I/O stall (`stall-ms`: the one `transaction`), against `virsh
//!   snapshot-create-as DOM sN --disk-only --atomic` on a libvirt domain of the same shape and
//!   against `snap_floor` (crates/bench-drivers: a bare QMP client that `blockdev-add`s
//!   overlays made beforehand and runs one `transaction`) on a bare QEMU of the same shape.
//! - **ram**: a RAM snapshot of a running domain per `--ram` size: ours `--live` (external
//!   memory file, disks external; `paused-ms`, `memory-downtime-ms`), our snapshot-save
//!   (internal with RAM; its pause from QEMU's STOP/RESUME events), and `virsh
//!   snapshot-create-as --memspec ... --diskspec ... --live` (its pause from QEMU's STOP/RESUME
//!   events, read with `virsh qemu-monitor-event`).
//! - **delete**: deletes of external disk-only snapshots of a running domain with 2 qcow2
//!   disks, ours against `virsh snapshot-delete` on a libvirt domain of the same shape: the
//!   middle of a chain (intermediate block-commits) and the leaf on top (active block-commits
//!   with pivot).
//! - **storage**: a backend snapshot (`--diskspec vda,snapshot=storage`) of a running
//!   domain's raw volume in a btrfs pool (a loop device): ours `paused-ms` against a bare
//!   `btrfs subvolume snapshot -r` of the same volume.
//! - **revert** (`snapshot/revert.rs`): `snapshot-revert` of a running domain (2 qcow2 disks)
//!   to an internal snapshot with RAM and, `--running`, to an external disk-only one: ours
//!   in place (the same QEMU) against `virsh snapshot-revert` (libvirt restarts QEMU).
//! - **delete** (`snapshot/delete.rs`): `snapshot-delete` of an external disk-only snapshot
//!   of a running domain (2 qcow2 disks, chain base <- s1 <- s2, built untimed each round):
//!   the leaf s2 (active commit with pivot) and s1 in the middle (intermediate commit),
//!   against `virsh snapshot-delete`.
//!
//! Before a part measures, its QEMUs must be quiet (a fresh no-OS domain spends seconds of
//! CPU in its firmware), and before each measured call the domain's QEMU must be idle (no
//! job, no migration running). Everything
//! the bench starts or makes (domains, daemons, the floor QEMU, files, the loop device and its
//! mount) is removed at the end, also on error.

mod delete;
mod revert;

use super::harness::{ms, report, report_series, Series};
use super::libvirt::{self, Libvirtd};
use super::storage::LoopBtrfs;
use super::{build_release, num_arg, runs_arg};
use crate::util::{self, step};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Every domain the bench defines (ours and libvirt's) starts with this.
const PREFIX: &str = "vsbench-snap-";
const FLOOR_NAME: &str = "vsbench-snap-floor";
const DISK_SIZE: &str = "64M";
/// Targets (issue 13).
const STALL_MAX: Duration = Duration::from_millis(3);
const ABOVE_FLOOR_MAX: Duration = Duration::from_millis(10);
const PEER_RATIO_MIN: f64 = 3.0;
const LIVE_PAUSE_MAX: Duration = Duration::from_millis(10);
/// "Flat in RAM size": the largest size's median pause at most this many times the smallest's.
const FLAT_FACTOR: f64 = 2.0;
const STORAGE_ABOVE_BARE_MAX: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Disk,
    Ram,
    Storage,
    Revert,
    Delete,
}

struct Opts {
    runs: usize,
    ours: bool,
    peer: bool,
    parts: Vec<Part>,
    ram_mib: Vec<u64>,
    save_max: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let runs = runs_arg(args, 10)?;
    let save_max = num_arg(args, "--save-max", 3)?;
    let mut only = None;
    let mut parts = Vec::new();
    let mut ram_mib = vec![256, 1024, 4096];
    let mut i = 0;
    while i < args.len() {
        let val = |what: &str| {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| format!("{} takes {what}", args[i]))
        };
        match args[i].as_str() {
            "--runs" | "--save-max" => {}
            "--only" => match val("ours or peer")?.as_str() {
                s @ ("ours" | "peer") => only = Some(s.to_string()),
                _ => return Err("--only takes ours or peer".into()),
            },
            "--part" => {
                for p in val("disk, ram, storage, revert or delete")?.split(',') {
                    parts.push(match p.trim() {
                        "disk" => Part::Disk,
                        "ram" => Part::Ram,
                        "storage" => Part::Storage,
                        "revert" => Part::Revert,
                        "delete" => Part::Delete,
                        other => {
                            return Err(format!(
                            "--part {other:?}: the parts are disk, ram, storage, revert and delete"
                        ))
                        }
                    });
                }
            }
            "--ram" => {
                ram_mib = val("a list of MiB")?
                    .split(',')
                    .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n >= 64))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("--ram takes sizes in MiB (at least 64), comma separated")?;
                if ram_mib.is_empty() {
                    return Err("--ram needs at least one size".into());
                }
            }
            other => return Err(format!("unknown option {other:?}")),
        }
        i += 2;
    }
    if parts.is_empty() {
        parts = vec![
            Part::Disk,
            Part::Ram,
            Part::Storage,
            Part::Revert,
            Part::Delete,
        ];
    }
    parts.dedup();
    Ok(Opts {
        runs,
        ours: only.as_deref() != Some("peer"),
        peer: only.as_deref() != Some("ours"),
        parts,
        ram_mib,
        save_max,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Run `cmd` to success and time it (spawn to exit); returns the wall time and stdout.
fn timed(cmd: &mut Command) -> Result<(Duration, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((wall, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn json(out: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(out.trim()).map_err(|e| format!("not JSON ({e}): {out:?}"))
}

/// A JSON member in milliseconds as a duration (`None` for null or missing).
fn json_ms(v: &serde_json::Value, key: &str) -> Option<Duration> {
    v[key]
        .as_f64()
        .map(|m| Duration::from_secs_f64(m.max(0.0) / 1000.0))
}

fn file_disks(files: &[PathBuf]) -> String {
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
                 <source file='{}'/>\n      <target dev='vd{}' bus='virtio'/>\n    </disk>\n",
                f.display(),
                (b'a' + i as u8) as char
            )
        })
        .collect()
}

/// A no-OS KVM domain (q35, 1 vCPU, no network, no graphics) with `disks` (`<disk>` elements).
fn domain_xml(name: &str, memory_mib: u64, disks: &str) -> String {
    format!(
        "<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>{QEMU}</emulator>
{disks}  </devices>
</domain>
"
    )
}

/// `n` new qcow2 disks `DIR/TAG-vdX.qcow2`.
fn qcow2_disks(dir: &Path, tag: &str, n: usize) -> Result<Vec<PathBuf>, String> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{tag}-vd{}.qcow2", (b'a' + i as u8) as char));
            util::output(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&p)
                    .arg(DISK_SIZE),
            )?;
            Ok(p)
        })
        .collect()
}

/// Is the monitor's reply to `query-jobs` / `query-migrate` idle?
fn idle_reply(reply: &str) -> bool {
    let Ok(v) = json(reply) else { return false };
    let r = v.get("return").unwrap_or(&v);
    match r {
        serde_json::Value::Array(jobs) => jobs.iter().all(|j| {
            matches!(
                j["status"].as_str(),
                Some("concluded") | Some("null") | None
            )
        }),
        serde_json::Value::Object(m) => !matches!(
            m.get("status").and_then(|s| s.as_str()),
            Some("setup" | "active" | "cancelling" | "device" | "wait-unplug")
        ),
        _ => false,
    }
}

/// Wait until the monitor (`monitor(json)` runs one QMP command) shows no job and no
/// migration running.
fn wait_idle(what: &str, monitor: &dyn Fn(&str) -> Result<String, String>) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = monitor(r#"{"execute":"query-jobs"}"#)?;
        let mig = monitor(r#"{"execute":"query-migrate"}"#)?;
        if idle_reply(&jobs) && idle_reply(&mig) {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!(
                "{what}: QEMU is still busy after 120 s: {jobs} {mig}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The QEMUs this bench started (their command line names a `vsbench-snap-` domain or the
/// floor), by pid.
fn bench_qemus() -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_qemu = args
            .first()
            .is_some_and(|a| a.ends_with(b"qemu-system-x86_64"));
        let ours = args.windows(2).any(|w| {
            w[0] == b"-name"
                && (w[1].starts_with(PREFIX.as_bytes())
                    || w[1].starts_with(format!("guest={PREFIX}").as_bytes()))
        });
        if is_qemu && ours {
            out.push(pid);
        }
    }
    out
}

/// User + system CPU of `pid` so far, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Wait until the bench's QEMUs are quiet: a freshly started no-OS domain spends seconds of
/// CPU in its firmware (boot attempts) before it idles, and measuring then would measure
/// that contention. Quiet: each used at most 2% of a core over half a second (up to 60 s).
fn wait_quiet(what: &str) {
    let (quiet, n, took) = settle();
    eprintln!(
        "    {what}: the bench's {n} QEMUs {} after {:.1} s",
        if quiet { "quiet" } else { "still busy" },
        took.as_secs_f64()
    );
}

/// [`wait_quiet`] without the line: whether the QEMUs went quiet, how many, how long it took.
fn settle() -> (bool, usize, Duration) {
    let t = Instant::now();
    loop {
        let pids = bench_qemus();
        let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let busy = pids
            .iter()
            .zip(&before)
            .any(|(&p, &b)| cpu_ticks(p).saturating_sub(b) * 1000 / hz > 10);
        if !busy || t.elapsed() > Duration::from_secs(60) {
            return (!busy, pids.len(), t.elapsed());
        }
    }
}

/// Removes the work directory on drop (declared first: dropped last).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// virt-snap's side: the binary and its state directory; the domains it defined are
/// destroyed and undefined on drop.
struct Ours {
    bin: PathBuf,
    state: PathBuf,
    domains: Vec<String>,
}

impl Ours {
    fn new(bin: &Path, state: &Path) -> Ours {
        Ours {
            bin: bin.to_path_buf(),
            state: state.to_path_buf(),
            domains: Vec::new(),
        }
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--state-dir").arg(&self.state).args(args);
        c
    }
    fn ok(&self, args: &[&str]) -> Result<String, String> {
        util::output(&mut self.cmd(args))
    }
    /// Define `xml` as domain `name` and start it.
    fn start(&mut self, name: &str, xml: &str, dir: &Path) -> Result<(), String> {
        let f = dir.join(format!("{name}.xml"));
        std::fs::write(&f, xml).map_err(|e| e.to_string())?;
        self.domains.push(name.to_string());
        self.ok(&["define", &f.display().to_string()])?;
        self.ok(&["start", name])?;
        Ok(())
    }
    fn monitor(&self, dom: &str, cmd: &str) -> Result<String, String> {
        self.ok(&["qemu-monitor-command", dom, cmd])
    }
    fn wait_idle(&self, dom: &str) -> Result<(), String> {
        wait_idle(dom, &|c| self.monitor(dom, c))
    }
    fn remove(&mut self, dom: &str) {
        let _ = self.cmd(&["destroy", dom]).output();
        let _ = self.cmd(&["undefine", dom]).output();
        self.domains.retain(|d| d != dom);
    }
    /// Destroy and undefine what an interrupted earlier run left in `state`.
    fn clear_leftovers(bin: &Path, state: &Path) {
        if !state.exists() {
            return;
        }
        let mut o = Ours::new(bin, state);
        let names = o
            .ok(&["list", "--all", "--output", "json"])
            .unwrap_or_default();
        let mut found = Vec::new();
        if let Ok(v) = json(&names) {
            collect_names(&v, &mut found);
        }
        o.domains = found
            .into_iter()
            .filter(|n| n.starts_with(PREFIX))
            .collect();
    }
}

fn collect_names(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_names(x, out)),
        serde_json::Value::Object(m) => {
            if let Some(n) = m.get("name").and_then(|n| n.as_str()) {
                out.push(n.to_string());
            }
            m.values().for_each(|x| collect_names(x, out));
        }
        _ => {}
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        for d in std::mem::take(&mut self.domains) {
            let _ = self.cmd(&["destroy", &d]).output();
            let _ = self.cmd(&["undefine", &d]).output();
        }
    }
}

/// `virsh qemu-monitor-command DOM JSON`.
fn virsh_monitor(dom: &str, cmd: &str) -> Result<String, String> {
    util::output(&mut libvirt::virsh(&["qemu-monitor-command", dom, cmd]))
}

fn virsh_wait_idle(dom: &str) -> Result<(), String> {
    wait_idle(dom, &|c| virsh_monitor(dom, c))
}

fn virsh_start(dom: &str, xml: &str, dir: &Path) -> Result<(), String> {
    let f = dir.join(format!("{dom}.xml"));
    std::fs::write(&f, xml).map_err(|e| e.to_string())?;
    util::output(&mut libvirt::virsh(&["define", &f.display().to_string()]))?;
    util::output(&mut libvirt::virsh(&["start", dom]))?;
    Ok(())
}

fn virsh_remove(dom: &str) {
    let _ = libvirt::virsh(&["destroy", dom]).output();
    let _ = libvirt::virsh(&["undefine", dom, "--snapshots-metadata"]).output();
}

/// A bare QEMU of the disk part's shape (`-daemonize`, disks as `-blockdev` file + qcow2
/// nodes `fN`/`qN` on virtio-blk-pci), killed on drop.
struct FloorQemu {
    pid_file: PathBuf,
    qmp: PathBuf,
}

impl FloorQemu {
    fn start(dir: &Path, disks: &[PathBuf]) -> Result<FloorQemu, String> {
        let f = FloorQemu {
            pid_file: dir.join("floor.pid"),
            qmp: dir.join("floor.qmp"),
        };
        let mut c = Command::new(QEMU);
        c.args(["-name", FLOOR_NAME, "-machine", "q35,accel=kvm"])
            .args(["-m", "256", "-smp", "1", "-nodefaults", "-display", "none"])
            .args(["-no-user-config", "-daemonize", "-pidfile"])
            .arg(&f.pid_file)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", f.qmp.display()));
        for (i, d) in disks.iter().enumerate() {
            c.arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=f{i}",
                    d.display()
                ))
                .arg("-blockdev")
                .arg(format!("driver=qcow2,file=f{i},node-name=q{i}"))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=q{i},id=vd{i}"));
        }
        util::output(&mut c)?;
        Ok(f)
    }
}

impl Drop for FloorQemu {
    fn drop(&mut self) {
        let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("qemu-system") {
            // SAFETY: kill(2) on the QEMU this bench started (pid from its pid file, name
            // checked).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// QEMU's STOP and RESUME events of a libvirt domain, as `virsh qemu-monitor-event --loop`
/// prints them (with QEMU's own timestamps), collected by a thread; stopped on drop.
struct EventWatch {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl EventWatch {
    fn start(dom: &str) -> Result<EventWatch, String> {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "virsh", "-q", "-c", libvirt::URI])
            .args(["qemu-monitor-event", "--domain", dom, "--loop"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run virsh qemu-monitor-event: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        // Let virsh connect and register before the first measured call.
        std::thread::sleep(Duration::from_millis(500));
        Ok(EventWatch {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// The pause (first STOP to the next RESUME) whose events are stamped within
    /// [`from`, `to`] (seconds since the epoch); waits up to a second for the RESUME line.
    fn pause_between(&self, from: f64, to: f64) -> Option<Duration> {
        let end = Instant::now() + Duration::from_secs(1);
        loop {
            let p = {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                pause_in(&lines, from, to)
            };
            if p.is_some() || Instant::now() > end {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `event NAME at SECS.MICROS for domain ...` -> (NAME, seconds).
fn parse_event(line: &str) -> Option<(&str, f64)> {
    let rest = line.trim().strip_prefix("event ")?;
    let (name, rest) = rest.split_once(" at ")?;
    let ts = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, ts))
}

fn pause_in(lines: &[String], from: f64, to: f64) -> Option<Duration> {
    let mut stop = None;
    for (name, ts) in lines.iter().filter_map(|l| parse_event(l)) {
        if ts < from - 0.001 || ts > to + 0.001 {
            continue;
        }
        match name {
            "STOP" if stop.is_none() => stop = Some(ts),
            "RESUME" => {
                if let Some(s) = stop {
                    return Some(Duration::from_secs_f64((ts - s).max(0.0)));
                }
            }
            _ => {}
        }
    }
    None
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child (stdbuf execs virsh in place).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// One target's verdict.
struct Verdict {
    what: String,
    pass: bool,
    detail: String,
}

fn verdict(what: impl Into<String>, pass: bool, detail: impl Into<String>) -> Verdict {
    let v = Verdict {
        what: what.into(),
        pass,
        detail: detail.into(),
    };
    println!(
        "target: {} -> {} ({})",
        v.what,
        if v.pass { "PASS" } else { "FAIL" },
        v.detail
    );
    v
}

/// A series of durations taken from reports (no process rusage).
fn push(s: &mut Series, d: Duration) {
    s.wall.push(d);
}

/// Print the rows of `series` with medians and p90s (report's format, no cpu/rss).
fn rows(title: &str, series: &[&Series]) {
    report_series(title, series);
}

/// The binaries the bench runs.
struct Bins {
    virt_snap: Option<PathBuf>,
    snap_floor: PathBuf,
    subreaper: PathBuf,
}

/// Run the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    for t in ["qemu-img", QEMU, "stdbuf"] {
        if !util::have(t) {
            return Err(format!("`{t}` is not installed: run `cargo xtask deps`"));
        }
    }
    if o.parts.contains(&Part::Storage) {
        for t in ["btrfs", "mkfs.btrfs", "losetup"] {
            if !util::have(t) {
                return Err(format!("`{t}` is not installed: run `cargo xtask deps`"));
            }
        }
    }
    super::require(&[], true)?;
    let virt_snap = if o.ours {
        Some(build_release("virt-snap")?.join("virt-snap"))
    } else {
        eprintln!("    --only peer: virt-snap is not measured");
        None
    };
    let drivers = build_release("bench-drivers")?;
    let bins = Bins {
        virt_snap,
        snap_floor: drivers.join("snap_floor"),
        subreaper: drivers.join("subreaper"),
    };

    let work = util::target_dir().join("bench").join("snapshot");
    let state = work.join("state");
    // What an interrupted earlier run (kill -9) may have left.
    if let Some(bin) = &bins.virt_snap {
        Ours::clear_leftovers(bin, &state);
    }
    super::domain::kill_qemu_named(FLOOR_NAME);
    LoopBtrfs::clear_leftovers(&work.join("btrfs"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let _work = WorkDir(work.clone());

    let needs_libvirt = o.peer && o.parts.iter().any(|p| *p != Part::Storage);
    let daemons = if needs_libvirt {
        Some(Libvirtd::start(
            &util::target_dir().join("bench/libvirt"),
            &bins.subreaper,
            PREFIX,
        )?)
    } else {
        None
    };
    let load_before = loadavg();
    let mut verdicts = Vec::new();
    for part in &o.parts {
        let dir = work.join(match part {
            Part::Disk => "disk",
            Part::Ram => "ram",
            Part::Storage => "btrfs",
            Part::Revert => "revert",
            Part::Delete => "delete",
        });
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let v = match part {
            Part::Disk => disk_part(&o, &bins, &state, &dir, daemons.is_some())?,
            Part::Ram => ram_part(&o, &bins, &state, &dir, daemons.is_some())?,
            Part::Storage => storage_part(&o, &bins, &state, &dir)?,
            Part::Revert => revert::revert_part(&o, &bins, &state, &dir, daemons.is_some())?,
            Part::Delete => delete::delete_part(&o, &bins, &state, &dir, daemons.is_some())?,
        };
        verdicts.extend(v);
    }
    let load_after = loadavg();
    println!(
        "\nsummary (QEMU 10.0.2, libvirt 11.3 as the peer; {} runs):",
        o.runs
    );
    for v in &verdicts {
        println!(
            "  {:<4} {} ({})",
            if v.pass { "PASS" } else { "FAIL" },
            v.what,
            v.detail
        );
    }
    println!("load average (1/5/15 min): before {load_before}, after {load_after}");
    drop(daemons);
    Ok(())
}

/// (a) disk-only atomic snapshot of 4 qcow2 disks.
fn disk_part(
    o: &Opts,
    bins: &Bins,
    state: &Path,
    dir: &Path,
    peer: bool,
) -> Result<Vec<Verdict>, String> {
    const OURS: &str = "vsbench-snap-disk-ours";
    const PEER: &str = "vsbench-snap-disk-libvirt";
    const N: usize = 4;
    step("disk: 4 qcow2 disks per domain (ours, libvirt's) and a bare floor QEMU");
    let floor_disks = qcow2_disks(dir, "floor", N)?;
    let floor = FloorQemu::start(dir, &floor_disks)?;
    let mut ours = bins.virt_snap.as_ref().map(|b| Ours::new(b, state));
    if let Some(us) = &mut ours {
        let xml = domain_xml(OURS, 256, &file_disks(&qcow2_disks(dir, "ours", N)?));
        us.start(OURS, &xml, dir)?;
    }
    struct PeerDom;
    impl Drop for PeerDom {
        fn drop(&mut self) {
            virsh_remove(PEER);
        }
    }
    let _peer_dom = if peer {
        let xml = domain_xml(PEER, 256, &file_disks(&qcow2_disks(dir, "libvirt", N)?));
        let g = PeerDom;
        virsh_start(PEER, &xml, dir)?;
        Some(g)
    } else {
        None
    };

    let mut o_wall = Series::new("virt-snap snapshot-create-as --disk-only --atomic");
    let mut p_wall = Series::new("virsh snapshot-create-as --disk-only --atomic");
    let mut f_wall = Series::new("floor: snap_floor process (bare QMP)");
    let mut o_stall = Series::new("virt-snap stall-ms (the transaction)");
    let mut f_txn = Series::new("floor: the transaction (in snap_floor)");
    let mut f_qmp = Series::new("floor: connect + 8 blockdev-add + transaction");
    let mut o_paused = Vec::new();
    wait_quiet("disk");
    let mut tops: Vec<(String, PathBuf)> = floor_disks
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("q{i}"), f.clone()))
        .collect();
    step(&format!(
        "disk: {} runs each after a warm-up, ours / libvirt / floor interleaved (order rotating), QEMU idle before each",
        o.runs
    ));
    for i in 0..=o.runs {
        let keep = i > 0;
        for k in 0..3 {
            match (i + k) % 3 {
                0 => {
                    let Some(us) = &ours else { continue };
                    us.wait_idle(OURS)?;
                    let (wall, out) = timed(&mut us.cmd(&[
                        "snapshot-create-as",
                        OURS,
                        &format!("s{i}"),
                        "--disk-only",
                        "--atomic",
                        "--output",
                        "json",
                    ]))?;
                    let j = json(&out)?;
                    let stall = json_ms(&j, "stall-ms")
                        .ok_or_else(|| format!("no stall-ms in virt-snap's report: {out}"))?;
                    if keep {
                        push(&mut o_wall, wall);
                        push(&mut o_stall, stall);
                        o_paused.push(json_ms(&j, "paused-ms"));
                    }
                }
                1 => {
                    if !peer {
                        continue;
                    }
                    virsh_wait_idle(PEER)?;
                    let (wall, _) = timed(&mut libvirt::virsh(&[
                        "snapshot-create-as",
                        PEER,
                        &format!("s{i}"),
                        "--disk-only",
                        "--atomic",
                    ]))?;
                    if keep {
                        push(&mut p_wall, wall);
                    }
                }
                _ => {
                    let mut files = Vec::new();
                    for (d, (_, top)) in tops.iter().enumerate() {
                        let ov = dir.join(format!("floor-{d}.f{i}.qcow2"));
                        util::output(
                            Command::new("qemu-img")
                                .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2"])
                                .arg("-b")
                                .arg(top)
                                .arg(&ov)
                                .arg(DISK_SIZE),
                        )?;
                        files.push(ov);
                    }
                    let mut c = Command::new(&bins.snap_floor);
                    c.arg(&floor.qmp).arg(format!("f{i}"));
                    for ((node, _), f) in tops.iter().zip(&files) {
                        c.arg(format!("{node}={}", f.display()));
                    }
                    let (wall, out) = timed(&mut c)?;
                    let j = json(&out)?;
                    let ns = |k: &str| Duration::from_nanos(j[k].as_u64().unwrap_or(0));
                    if keep {
                        push(&mut f_wall, wall);
                        push(&mut f_txn, ns("transaction_ns"));
                        push(&mut f_qmp, ns("total_ns"));
                    }
                    tops = files
                        .into_iter()
                        .enumerate()
                        .map(|(d, f)| (format!("f{i}-{d}"), f))
                        .collect();
                }
            }
        }
    }
    drop(floor);
    if let Some(mut us) = ours.take() {
        us.remove(OURS);
    }
    drop(_peer_dom);

    let title = "snapshot (a): disk-only atomic snapshot of 4 qcow2 disks, running no-OS KVM domain (q35, 256 MiB, 1 vCPU)";
    let mut v = Vec::new();
    let have_ours = bins.virt_snap.is_some();
    if have_ours && peer {
        report(title, &[(&o_wall, &p_wall)]);
        rows("", &[&f_wall]);
    } else if have_ours {
        rows(title, &[&o_wall, &f_wall]);
    } else {
        rows(title, &[&p_wall, &f_wall]);
    }
    if have_ours {
        rows("", &[&o_stall, &f_txn, &f_qmp]);
        let paused = o_paused.iter().filter(|p| p.is_some()).count();
        println!(
            "virt-snap paused-ms: {} of {} runs report a pause (a disk-only snapshot needs none)",
            paused,
            o_paused.len()
        );
        let s = o_stall.median();
        v.push(verdict(
            "(a) I/O stall (the transaction) <= 3 ms",
            s <= STALL_MAX,
            format!("median {}, p90 {}", ms(s), ms(o_stall.p90())),
        ));
        let (a, f) = (o_wall.median(), f_wall.median());
        let above = a.saturating_sub(f);
        v.push(verdict(
            "(a) whole CLI call <= 10 ms above the bare QMP floor",
            above <= ABOVE_FLOOR_MAX,
            format!("ours {} - floor {} = {}", ms(a), ms(f), ms(above)),
        ));
        if peer {
            let r = p_wall.median().as_secs_f64() / a.as_secs_f64().max(1e-9);
            v.push(verdict(
                "(a) >= 3x faster than virsh --disk-only --atomic",
                r >= PEER_RATIO_MIN,
                format!("virsh {} / ours {} = {r:.2}x", ms(p_wall.median()), ms(a)),
            ));
        }
    }
    Ok(v)
}

/// (b) RAM snapshot of a running domain, per RAM size.
fn ram_part(
    o: &Opts,
    bins: &Bins,
    state: &Path,
    dir: &Path,
    peer: bool,
) -> Result<Vec<Verdict>, String> {
    let mut v = Vec::new();
    let mut live_medians = Vec::new();
    let have_ours = bins.virt_snap.is_some();
    for &mib in &o.ram_mib {
        let live_dom = format!("vsbench-snap-ram{mib}-live");
        let save_dom = format!("vsbench-snap-ram{mib}-save");
        let peer_dom = format!("vsbench-snap-ram{mib}-libvirt");
        step(&format!(
            "ram {mib} MiB: domains with 2 qcow2 disks (ours --live, ours snapshot-save, libvirt's)"
        ));
        let mut ours = bins.virt_snap.as_ref().map(|b| Ours::new(b, state));
        if let Some(us) = &mut ours {
            for (d, tag) in [(&live_dom, "live"), (&save_dom, "save")] {
                let xml = domain_xml(
                    d,
                    mib,
                    &file_disks(&qcow2_disks(dir, &format!("{tag}{mib}"), 2)?),
                );
                us.start(d, &xml, dir)?;
            }
        }
        struct PeerDom(String);
        impl Drop for PeerDom {
            fn drop(&mut self) {
                virsh_remove(&self.0);
            }
        }
        let (_peer_dom, watch) = if peer {
            let xml = domain_xml(
                &peer_dom,
                mib,
                &file_disks(&qcow2_disks(dir, &format!("libvirt{mib}"), 2)?),
            );
            let g = PeerDom(peer_dom.clone());
            virsh_start(&peer_dom, &xml, dir)?;
            (Some(g), Some(EventWatch::start(&peer_dom)?))
        } else {
            (None, None)
        };
        wait_quiet(&format!("ram {mib} MiB"));
        let ram = |tag: &str, i: usize| dir.join(format!("{tag}{mib}-{i}.save"));
        let mut l_pause = Series::new(format!("virt-snap --live: paused-ms ({mib} MiB)"));
        let mut l_down = Series::new(format!("virt-snap --live: memory-downtime-ms ({mib} MiB)"));
        let mut l_wall = Series::new(format!("virt-snap --live: whole call ({mib} MiB)"));
        let mut l_ours = Series::new(format!("  paused-ms - QEMU's downtime ({mib} MiB)"));
        let mut s_pause = Series::new(format!("virt-snap snapshot-save: pause ({mib} MiB)"));
        let mut s_wall = Series::new(format!("virt-snap snapshot-save: whole call ({mib} MiB)"));
        let mut p_pause = Series::new(format!("virsh --live: pause, STOP->RESUME ({mib} MiB)"));
        let mut p_wall = Series::new(format!("virsh --live: whole call ({mib} MiB)"));
        let mut p_nopause = 0;
        step(&format!(
            "ram {mib} MiB: {} runs each after a warm-up (snapshot-save: {} runs, no warm-up), interleaved",
            o.runs, o.save_max
        ));
        for i in 0..=o.runs {
            let keep = i > 0;
            for k in 0..3 {
                match (i + k) % 3 {
                    0 => {
                        let Some(us) = &ours else { continue };
                        us.wait_idle(&live_dom)?;
                        let f = ram("ours", i);
                        let spec = format!("file={},snapshot=external", f.display());
                        let (wall, out) = timed(&mut us.cmd(&[
                            "snapshot-create-as",
                            &live_dom,
                            &format!("l{i}"),
                            "--memspec",
                            &spec,
                            "--live",
                            "--output",
                            "json",
                        ]))?;
                        let _ = std::fs::remove_file(&f);
                        let j = json(&out)?;
                        if keep {
                            push(&mut l_wall, wall);
                            let p = json_ms(&j, "paused-ms")
                                .ok_or_else(|| format!("--live reported no pause: {out}"))?;
                            push(&mut l_pause, p);
                            if let Some(d) = j["memory-downtime-ms"].as_u64() {
                                let d = Duration::from_millis(d);
                                push(&mut l_down, d);
                                push(&mut l_ours, p.saturating_sub(d));
                            }
                        }
                    }
                    1 => {
                        let Some(w) = &watch else { continue };
                        virsh_wait_idle(&peer_dom)?;
                        let f = ram("libvirt", i);
                        let mem = format!("file={},snapshot=external", f.display());
                        let from = now_unix();
                        let (wall, _) = timed(&mut libvirt::virsh(&[
                            "snapshot-create-as",
                            &peer_dom,
                            &format!("l{i}"),
                            "--memspec",
                            &mem,
                            "--diskspec",
                            "vda,snapshot=external",
                            "--diskspec",
                            "vdb,snapshot=external",
                            "--live",
                        ]))?;
                        let to = now_unix();
                        let pause = w.pause_between(from, to);
                        let _ = std::fs::remove_file(&f);
                        if keep {
                            push(&mut p_wall, wall);
                            match pause {
                                Some(p) => push(&mut p_pause, p),
                                None => p_nopause += 1,
                            }
                        }
                    }
                    _ => {
                        let Some(us) = &ours else { continue };
                        if i == 0 || i > o.save_max {
                            continue;
                        }
                        us.wait_idle(&save_dom)?;
                        let (wall, out) = timed(&mut us.cmd(&[
                            "snapshot-create-as",
                            &save_dom,
                            &format!("i{i}"),
                            "--output",
                            "json",
                        ]))?;
                        let j = json(&out)?;
                        push(&mut s_wall, wall);
                        if let Some(p) = json_ms(&j, "paused-ms") {
                            push(&mut s_pause, p);
                        }
                    }
                }
            }
        }
        drop(watch);
        drop(_peer_dom);
        if let Some(mut us) = ours.take() {
            us.remove(&live_dom);
            us.remove(&save_dom);
        }
        let title = format!(
            "snapshot (b): RAM snapshot of a running no-OS KVM domain, {mib} MiB (2 qcow2 disks; RAM is mostly untouched zero pages)"
        );
        if have_ours && peer {
            report(&title, &[(&l_pause, &p_pause), (&l_wall, &p_wall)]);
            rows("", &[&l_down, &l_ours, &s_pause, &s_wall]);
        } else if have_ours {
            rows(
                &title,
                &[&l_pause, &l_down, &l_ours, &l_wall, &s_pause, &s_wall],
            );
        } else {
            rows(&title, &[&p_pause, &p_wall]);
        }
        if peer && p_nopause > 0 {
            println!(
                "virsh: {p_nopause} runs without a STOP/RESUME pair in qemu-monitor-event's output"
            );
        }
        if have_ours {
            let m = l_pause.median();
            live_medians.push((mib, m));
            v.push(verdict(
                format!("(b) --live pause <= 10 ms at {mib} MiB"),
                m <= LIVE_PAUSE_MAX,
                format!(
                    "median {}, p90 {}; snapshot-save pause {}{}",
                    ms(m),
                    ms(l_pause.p90()),
                    ms(s_pause.median()),
                    if peer {
                        format!(", virsh --live pause {}", ms(p_pause.median()))
                    } else {
                        String::new()
                    }
                ),
            ));
        }
    }
    if live_medians.len() > 1 {
        let lo = live_medians.iter().map(|x| x.1).min().unwrap_or_default();
        let hi = live_medians.iter().map(|x| x.1).max().unwrap_or_default();
        let f = hi.as_secs_f64() / lo.as_secs_f64().max(1e-9);
        v.push(verdict(
            "(b) --live pause flat in RAM size (largest median <= 2x smallest)",
            f <= FLAT_FACTOR,
            live_medians
                .iter()
                .map(|(m, d)| format!("{m} MiB {}", ms(*d)))
                .collect::<Vec<_>>()
                .join(", ")
                + &format!(" ({f:.1}x)"),
        ));
    }
    Ok(v)
}

/// (c) backend snapshot of a running domain's raw volume in a btrfs pool.
fn storage_part(o: &Opts, bins: &Bins, state: &Path, dir: &Path) -> Result<Vec<Verdict>, String> {
    const DOM: &str = "vsbench-snap-btrfs";
    step("storage: btrfs on a loop device (4 GiB sparse file), a btrfs pool, a 64 MiB raw volume");
    let fs = LoopBtrfs::new(dir, "4G")?;
    let bpool = fs.mnt.join("bpool");
    let bare = fs.mnt.join("bare");
    for d in [&bpool, &bare] {
        std::fs::create_dir(d).map_err(|e| e.to_string())?;
    }
    let mut ours = bins.virt_snap.as_ref().map(|b| Ours::new(b, state));
    if let Some(us) = &mut ours {
        us.ok(&[
            "pool-define-as",
            "vsbench-btrfs",
            "btrfs",
            &bpool.display().to_string(),
        ])?;
        us.ok(&["vol-create-as", "vsbench-btrfs", "v", DISK_SIZE])?;
        let disk = "    <disk type='volume' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
                    <source pool='vsbench-btrfs' volume='v'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n";
        us.start(DOM, &domain_xml(DOM, 256, disk), dir)?;
    } else {
        // The bare side alone: a subvolume of the same size.
        util::output(
            Command::new("btrfs")
                .args(["-q", "subvolume", "create"])
                .arg(bpool.join("v")),
        )?;
        util::run(
            Command::new("truncate")
                .args(["-s", DISK_SIZE])
                .arg(bpool.join("v/volume.raw")),
        )?;
    }
    wait_quiet("storage");
    let mut o_pause = Series::new("virt-snap snapshot=storage: paused-ms");
    let mut o_wall = Series::new("virt-snap snapshot=storage: whole call");
    let mut b_wall = Series::new("bare btrfs subvolume snapshot -r (process)");
    step(&format!(
        "storage: {} runs each after a warm-up, ours / bare interleaved (order alternating)",
        o.runs
    ));
    for i in 0..=o.runs {
        let keep = i > 0;
        for k in 0..2 {
            if (i + k) % 2 == 0 {
                let Some(us) = &ours else { continue };
                us.wait_idle(DOM)?;
                let (wall, out) = timed(&mut us.cmd(&[
                    "snapshot-create-as",
                    DOM,
                    &format!("s{i}"),
                    "--disk-only",
                    "--diskspec",
                    "vda,snapshot=storage",
                    "--output",
                    "json",
                ]))?;
                let j = json(&out)?;
                let p = json_ms(&j, "paused-ms")
                    .ok_or_else(|| format!("snapshot=storage reported no pause: {out}"))?;
                if keep {
                    push(&mut o_pause, p);
                    push(&mut o_wall, wall);
                }
            } else {
                let snap = bare.join(format!("h{i}"));
                let (wall, _) = timed(
                    Command::new("btrfs")
                        .args(["-q", "subvolume", "snapshot", "-r"])
                        .arg(bpool.join("v"))
                        .arg(&snap),
                )?;
                util::output(
                    Command::new("btrfs")
                        .args(["-q", "subvolume", "delete"])
                        .arg(&snap),
                )?;
                if keep {
                    push(&mut b_wall, wall);
                }
            }
        }
    }
    if let Some(mut us) = ours.take() {
        us.remove(DOM);
    }
    drop(fs);
    let title = "snapshot (c): btrfs backend snapshot of a running domain's 64 MiB raw volume (no-OS KVM, 256 MiB)";
    let mut v = Vec::new();
    if bins.virt_snap.is_some() {
        report(title, &[(&o_pause, &b_wall)]);
        rows("", &[&o_wall]);
        let (p, b) = (o_pause.median(), b_wall.median());
        v.push(verdict(
            "(c) btrfs snapshot pause <= bare btrfs snapshot + 2 ms",
            p <= b + STORAGE_ABOVE_BARE_MAX,
            format!(
                "pause median {} (p90 {}), bare median {} (p90 {})",
                ms(p),
                ms(o_pause.p90()),
                ms(b),
                ms(b_wall.p90())
            ),
        ));
    } else {
        rows(title, &[&b_wall]);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let a = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse(&a(
            "--runs 3 --part disk,ram --part storage,delete --ram 256,1024 --only ours",
        ))
        .unwrap();
        assert_eq!(o.runs, 3);
        assert_eq!(
            o.parts,
            vec![Part::Disk, Part::Ram, Part::Storage, Part::Delete]
        );
        assert_eq!(o.ram_mib, vec![256, 1024]);
        assert!(o.ours && !o.peer);
        let o = parse(&[]).unwrap();
        assert_eq!(
            o.parts,
            vec![
                Part::Disk,
                Part::Ram,
                Part::Storage,
                Part::Revert,
                Part::Delete
            ]
        );
        assert_eq!(
            parse(&a("--part revert,delete")).unwrap().parts,
            vec![Part::Revert, Part::Delete]
        );
        assert_eq!(
            parse(&a("--part revert")).unwrap().parts,
            vec![Part::Revert]
        );
        assert_eq!(o.ram_mib, vec![256, 1024, 4096]);
        assert!(parse(&a("--part cpu")).is_err());
        assert!(parse(&a("--only both")).is_err());
        assert!(parse(&a("--ram 1G")).is_err());
        assert!(parse(&a("--bogus")).is_err());
    }

    #[test]
    fn monitor_replies() {
        assert!(idle_reply(r#"{"return":[],"id":"libvirt-1"}"#));
        assert!(!idle_reply(r#"{"return":[{"id":"j","status":"running"}]}"#));
        assert!(idle_reply(r#"{"return":{}}"#));
        assert!(idle_reply(r#"{"status":"completed"}"#));
        assert!(!idle_reply(r#"{"return":{"status":"active"}}"#));
        assert!(!idle_reply("garbage"));
    }

    #[test]
    fn libvirt_events() {
        let lines: Vec<String> = [
            "event STOP at 100.000500 for domain 'd': <null>",
            "event RESUME at 100.020500 for domain 'd': <null>",
            "event STOP at 200.000000 for domain 'd': <null>",
        ]
        .map(String::from)
        .to_vec();
        let p = pause_in(&lines, 99.0, 101.0).unwrap();
        assert_eq!(p.as_micros(), 20_000);
        assert!(pause_in(&lines, 150.0, 250.0).is_none());
    }
}
