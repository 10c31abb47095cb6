//! `cargo xtask bench domain [--runs N] [--only virt-snap|libvirt]`: a no-OS KVM domain
//! (q35, 256 MiB, 1 vCPU, two 64 MiB qcow2 disks, no network, no graphics), virt-snap against
//! libvirt 11.3 (`virsh -c qemu:///system`), whole processes, interleaved:
//!
//! - define + start to running: `sh -c 'virt-snap define X.xml && virt-snap start NAME'` vs
//!   `sh -c 'virsh define X.xml && virsh start NAME'`; then, untimed, domstate must say running;
//! - destroy: `virt-snap destroy NAME` vs `virsh destroy NAME`; then, untimed, undefine.
//!
//! The same XML for both, with distinct names and disk files. A floor row times a bare
//! `qemu-system-x86_64 ... -daemonize` of the same machine (it returns once QEMU is set up),
//! giving QEMU's own share of a start. libvirtd and virtlogd are started and stopped by the
//! bench ([`super::libvirt::Libvirtd`]); the disks live under target/bench/domain, removed at
//! the end. Everything started is stopped also on error.

use super::harness::{median, ms, report, report_series, time_process, Sample, Series};
use super::libvirt::{self, Libvirtd};
use super::{build_release, build_release_bin, runs_arg};
use crate::util::{self, step};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub(super) const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Every domain the bench defines starts with this (libvirt's cleanup goes by it).
const PREFIX: &str = "vsbench-dom-";
const OURS: &str = "vsbench-dom-virtsnap";
const PEER: &str = "vsbench-dom-libvirt";
const FLOOR_NAME: &str = "vsbench-dom-floor";

/// The bench domain's two 64 MiB qcow2 disks `DIR/TAG-a.qcow2` and `DIR/TAG-b.qcow2`, created.
pub(super) fn two_disks(dir: &Path, tag: &str) -> Result<[PathBuf; 2], String> {
    let d = [
        dir.join(format!("{tag}-a.qcow2")),
        dir.join(format!("{tag}-b.qcow2")),
    ];
    for p in &d {
        util::output(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(p)
                .arg("64M"),
        )?;
    }
    Ok(d)
}

/// The domain XML both sides define.
pub(super) fn domain_xml(name: &str, disks: &[PathBuf; 2]) -> String {
    format!(
        "<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>{QEMU}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
",
        disks[0].display(),
        disks[1].display()
    )
}

pub(super) fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Removes the work directory on drop (declared first: dropped after the daemons stop).
pub(super) struct WorkDir(pub(super) PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// virt-snap's side: the binary, its state directory, global options before the command
/// (`--lockspace ...`) and the bench's domain, which it destroys and undefines on drop.
pub(super) struct Ours {
    pub(super) bin: PathBuf,
    pub(super) state: PathBuf,
    pub(super) global: Vec<String>,
    pub(super) name: String,
}

impl Ours {
    /// The bench's domain `OURS` in the default lockspace.
    fn new(bin: PathBuf, state: PathBuf) -> Ours {
        Ours {
            bin,
            state,
            global: Vec::new(),
            name: OURS.into(),
        }
    }
    pub(super) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--state-dir")
            .arg(&self.state)
            .args(&self.global)
            .args(args);
        c
    }
    fn cmdline(&self, args: &str) -> String {
        let global: Vec<String> = self.global.iter().map(|g| quote(Path::new(g))).collect();
        format!(
            "{} --state-dir {} {}{args}",
            quote(&self.bin),
            quote(&self.state),
            global.iter().map(|g| format!("{g} ")).collect::<String>()
        )
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        let _ = self.cmd(&["destroy", &self.name]).output();
        let _ = self.cmd(&["undefine", &self.name]).output();
    }
}

/// The floor: a bare QEMU of the same machine, daemonized; killed on drop.
struct Floor {
    disks: [PathBuf; 2],
    pid_file: PathBuf,
    qmp: PathBuf,
}

impl Floor {
    fn cmd(&self) -> Command {
        let mut c = Command::new(QEMU);
        c.args(["-name", FLOOR_NAME, "-machine", "q35,accel=kvm"])
            .args(["-m", "256", "-smp", "1", "-nodefaults", "-display", "none"])
            .args(["-no-user-config", "-daemonize", "-pidfile"])
            .arg(&self.pid_file)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.qmp.display()));
        // The disks as virt-snap and libvirt give them: file and qcow2 nodes, virtio-blk-pci.
        for (i, d) in self.disks.iter().enumerate() {
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
        c
    }
    /// Kill the floor QEMU and wait until it has closed its files (gone or a zombie: PID 1
    /// reaps it late).
    fn stop(&self) -> Result<(), String> {
        let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return Ok(());
        };
        let _ = std::fs::remove_file(&self.pid_file);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.starts_with("qemu-system") {
            return Ok(());
        }
        // SAFETY: kill(2) on the QEMU this bench started (pid from its pid file, name checked).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return Ok(()),
                Ok(s)
                    if s.rsplit_once(')')
                        .is_some_and(|(_, t)| t.trim_start().starts_with('Z')) =>
                {
                    return Ok(())
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        Err(format!("floor QEMU (pid {pid}) did not end after SIGKILL"))
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Kill floor QEMUs an interrupted earlier run left (found by their `-name`).
fn kill_floor_leftovers() {
    kill_qemu_named(FLOOR_NAME);
}

/// Kill the QEMUs started with `-name NAME` (what an interrupted bench run left).
pub(super) fn kill_qemu_named(name: &str) {
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args
            .first()
            .is_some_and(|a| a.ends_with(b"qemu-system-x86_64"))
            && args
                .windows(2)
                .any(|w| w == [&b"-name"[..], name.as_bytes()])
        {
            // SAFETY: kill(2) on a QEMU named as a bench names its floor QEMU.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

pub(super) fn expect_running(what: &str, out: Result<String, String>) -> Result<(), String> {
    let out = out?;
    if out.trim() != "running" {
        return Err(format!(
            "{what}: domstate says {:?}, not running",
            out.trim()
        ));
    }
    Ok(())
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Run the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let runs = runs_arg(args, 10)?;
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some(s @ ("virt-snap" | "libvirt")) => Some(s),
            _ => return Err("--only takes virt-snap or libvirt".into()),
        },
        None => None,
    };
    let (do_ours, do_peer) = (only != Some("libvirt"), only != Some("virt-snap"));
    super::require(&["qemu-img", QEMU], true)?;
    let ours_bin = if do_ours {
        let bin = build_release("virt-snap")?.join("virt-snap");
        let help = util::output(Command::new(&bin).arg("--help"))?;
        let has = |c: &str| help.lines().any(|l| l.split_whitespace().next() == Some(c));
        let missing: Vec<&str> = ["define", "start", "destroy", "undefine", "domstate"]
            .into_iter()
            .filter(|c| !has(c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "this virt-snap has no `{}` command yet: run `cargo xtask bench domain --only libvirt` to measure libvirt alone",
                missing.join("`, `")
            ));
        }
        Some(bin)
    } else {
        eprintln!("    --only libvirt: virt-snap is not measured");
        None
    };
    let subreaper = if do_peer {
        Some(build_release_bin("bench-drivers", "subreaper")?.join("subreaper"))
    } else {
        None
    };

    let work = util::target_dir().join("bench").join("domain");
    // What an interrupted earlier run (kill -9) may have left: its domain, its floor QEMU.
    if let Some(bin) = &ours_bin {
        drop(Ours::new(bin.clone(), work.join("state")));
    }
    kill_floor_leftovers();
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let _work = WorkDir(work.clone());
    let disks = |tag: &str| two_disks(&work, tag);
    step("two 64 MiB qcow2 disks per side, the domain XML");
    let ours_xml = work.join("ours.xml");
    let peer_xml = work.join("libvirt.xml");
    std::fs::write(&ours_xml, domain_xml(OURS, &disks("ours")?)).map_err(|e| e.to_string())?;
    std::fs::write(&peer_xml, domain_xml(PEER, &disks("libvirt")?)).map_err(|e| e.to_string())?;
    let floor = Floor {
        disks: disks("floor")?,
        pid_file: work.join("floor.pid"),
        qmp: work.join("floor.qmp"),
    };

    let daemons = match &subreaper {
        Some(s) => Some(Libvirtd::start(
            &util::target_dir().join("bench/libvirt"),
            s,
            PREFIX,
        )?),
        None => None,
    };
    let ours = ours_bin.map(|bin| Ours::new(bin, work.join("state")));

    let load_before = loadavg();
    step(&format!(
        "define + start, destroy: {runs} runs each after a warm-up, interleaved (load {load_before})"
    ));
    let mut s_ours = Series::new("virt-snap define + start (sh)");
    let mut s_peer = Series::new("virsh define + start (sh)");
    let mut d_ours = Series::new("virt-snap destroy");
    let mut d_peer = Series::new("virsh destroy");
    let mut s_floor = Series::new("floor: qemu-system-x86_64 -daemonize");
    let (mut daemon_start, mut daemon_destroy) = (Vec::new(), Vec::new());
    let keep = |i: usize, series: &mut Series, s: Sample| {
        if i > 0 {
            series.push(s);
        }
    };
    // Each run measures the three in turn, the order rotating from run to run so that none
    // always follows the same one (a QEMU just killed, libvirtd's post-destroy work).
    for i in 0..=runs {
        for k in 0..3 {
            match (i + k) % 3 {
                0 => {
                    let Some(o) = &ours else { continue };
                    let script = format!(
                        "{} && {}",
                        o.cmdline(&format!("define {}", quote(&ours_xml))),
                        o.cmdline(&format!("start {OURS}"))
                    );
                    keep(i, &mut s_ours, time_process(&mut sh(&script))?);
                    expect_running("virt-snap", util::output(&mut o.cmd(&["domstate", OURS])))?;
                    keep(
                        i,
                        &mut d_ours,
                        time_process(&mut o.cmd(&["destroy", OURS]))?,
                    );
                    util::output(&mut o.cmd(&["undefine", OURS]))?;
                }
                1 => {
                    let Some(lv) = &daemons else { continue };
                    let script = format!(
                        "virsh -q -c {u} define {} && virsh -q -c {u} start {PEER}",
                        quote(&peer_xml),
                        u = libvirt::URI
                    );
                    let c0 = lv.daemon_cpu();
                    keep(i, &mut s_peer, time_process(&mut sh(&script))?);
                    let c1 = lv.daemon_cpu();
                    if i > 0 {
                        daemon_start.push(c1.saturating_sub(c0));
                    }
                    expect_running(
                        "libvirt",
                        util::output(&mut libvirt::virsh(&["domstate", PEER])),
                    )?;
                    let c0 = lv.daemon_cpu();
                    keep(
                        i,
                        &mut d_peer,
                        time_process(&mut libvirt::virsh(&["destroy", PEER]))?,
                    );
                    let c1 = lv.daemon_cpu();
                    if i > 0 {
                        daemon_destroy.push(c1.saturating_sub(c0));
                    }
                    util::output(&mut libvirt::virsh(&["undefine", PEER]))?;
                }
                _ => {
                    keep(i, &mut s_floor, time_process(&mut floor.cmd())?);
                    floor.stop()?;
                }
            }
        }
    }
    let load_after = loadavg();

    let title_s =
        "domain: define + start to running (no-OS KVM, q35, 256 MiB, 1 vCPU, 2 qcow2 disks)";
    let title_d = "domain: destroy a running domain";
    if ours.is_some() && daemons.is_some() {
        report(title_s, &[(&s_ours, &s_peer)]);
        report_series("", &[&s_floor]);
        report(title_d, &[(&d_ours, &d_peer)]);
    } else if ours.is_some() {
        report_series(title_s, &[&s_ours, &s_floor]);
        report_series(title_d, &[&d_ours]);
    } else {
        report_series(title_s, &[&s_peer, &s_floor]);
        report_series(title_d, &[&d_peer]);
    }
    let share =
        |s: &Series| 100.0 * s_floor.median().as_secs_f64() / s.median().as_secs_f64().max(1e-12);
    let mut shares = Vec::new();
    if ours.is_some() {
        shares.push(format!("{:.0}% of virt-snap's", share(&s_ours)));
    }
    if daemons.is_some() {
        shares.push(format!("{:.0}% of libvirt's", share(&s_peer)));
    }
    if daemons.is_some() {
        println!(
            "\nlibvirtd + virtlogd CPU (not in virsh's cpu column; 10 ms ticks): median {} per define + start, {} per destroy",
            ms(median(&daemon_start)),
            ms(median(&daemon_destroy))
        );
    }
    println!(
        "\nQEMU start share (floor median / start median): {}",
        shares.join(", ")
    );
    println!("load average (1/5/15 min): before {load_before}, after {load_after}");
    if ours.is_none() {
        println!("virt-snap not measured (--only libvirt)");
    }
    if daemons.is_none() {
        println!("libvirt not measured (--only virt-snap)");
    }
    drop(ours);
    drop(daemons);
    drop(floor);
    Ok(())
}
