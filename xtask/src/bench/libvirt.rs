//! libvirt 11.3 as the peer of a benchmark: `virtlogd` and `libvirtd` started by the bench
//! (there is no systemd here), with the system configuration (`qemu:///system`), and stopped
//! when the [`Libvirtd`] guard drops (also on error or panic).
//!
//! libvirtd runs under `subreaper` (crates/bench-drivers): PID 1 here reaps orphans only about
//! once a second, and libvirtd's QEMUs are double-forked orphans, so without a subreaper every
//! QEMU stop under libvirtd would take 1-1.5 s longer than it does on a normal host.
//!
//! The first connection makes libvirtd probe QEMU's capabilities (about 12 s, cached in
//! /var/cache/libvirt after): [`Libvirtd::start`] does it, untimed, before it returns.

use crate::{deps, util};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The connection URI every virsh call uses.
pub const URI: &str = "qemu:///system";
const LIBVIRTD_SOCK: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
const PID_FILES: &[(&str, &str)] = &[
    ("libvirtd", "/run/libvirtd.pid"),
    ("virtlogd", "/run/virtlogd.pid"),
];
/// How long the first connection (QEMU capability probe) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(180);

/// `virsh -c qemu:///system ARGS...`.
pub fn virsh(args: &[&str]) -> Command {
    let mut c = Command::new("virsh");
    c.args(["-q", "-c", URI]).args(args);
    c
}

/// Running virtlogd and libvirtd (under the subreaper); stopped on drop, after the domains
/// whose names start with `prefix` are destroyed and undefined.
pub struct Libvirtd {
    virtlogd: Option<Child>,
    reaper: Option<Child>,
    prefix: String,
    marker: PathBuf,
}

/// The pid of a live process named `name` recorded in `pid_file`, if any.
fn live_pid(pid_file: &str, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let zombie = stat
        .rsplit_once(')')
        .map(|(_, t)| t.trim_start().starts_with('Z'));
    (comm.trim() == name && zombie == Some(false)).then_some(pid)
}

/// Pids of live processes whose command name is `name`.
fn pids_named(name: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name) {
            out.push(pid);
        }
    }
    out
}

fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn stop(child: &mut Child, what: &str) {
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if !wait_exit(child, Duration::from_secs(15)) {
        eprintln!("    {what} did not stop on SIGTERM: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Libvirtd {
    /// Start virtlogd and libvirtd (`subreaper` is the path of the subreaper binary), logs in
    /// `work` (kept for reading after the run), and wait for the first `virsh version` (the capability probe). Refuses when a
    /// libvirtd or virtlogd not started by an earlier bench run is already running.
    pub fn start(work: &Path, subreaper: &Path, prefix: &str) -> Result<Libvirtd, String> {
        if !deps::libvirt_ok() {
            return Err(format!(
                "libvirt {} is not installed: run `cargo xtask deps --libvirt`",
                deps::LIBVIRT_VERSION
            ));
        }
        std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
        let marker = util::target_dir().join("bench/libvirt-daemons.pids");
        Self::clear_leftovers(&marker)?;
        let log = |name: &str| -> Result<Stdio, String> {
            let f = std::fs::File::create(work.join(format!("{name}.log")))
                .map_err(|e| format!("{name}.log: {e}"))?;
            Ok(Stdio::from(f))
        };
        util::step("starting virtlogd and libvirtd (under subreaper), qemu:///system");
        let mut guard = Libvirtd {
            virtlogd: None,
            reaper: None,
            prefix: prefix.to_string(),
            marker: marker.clone(),
        };
        guard.virtlogd = Some(
            Command::new("virtlogd")
                .stdin(Stdio::null())
                .stdout(log("virtlogd")?)
                .stderr(log("virtlogd")?)
                .spawn()
                .map_err(|e| format!("cannot run virtlogd: {e}"))?,
        );
        wait_socket(
            VIRTLOGD_SOCK,
            Duration::from_secs(20),
            guard.virtlogd.as_mut(),
        )?;
        guard.reaper = Some(
            Command::new(subreaper)
                .arg("libvirtd")
                .stdin(Stdio::null())
                .stdout(log("libvirtd")?)
                .stderr(log("libvirtd")?)
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", subreaper.display()))?,
        );
        let ids: Vec<String> = [&guard.virtlogd, &guard.reaper]
            .iter()
            .filter_map(|c| c.as_ref().map(|c| c.id().to_string()))
            .collect();
        std::fs::write(&marker, ids.join("\n") + "\n").map_err(|e| e.to_string())?;
        wait_socket(
            LIBVIRTD_SOCK,
            Duration::from_secs(30),
            guard.reaper.as_mut(),
        )?;
        util::step("first virsh connect (libvirtd probes QEMU's capabilities; untimed)");
        let t = Instant::now();
        let mut c = virsh(&["version"]);
        run_timeout(&mut c, PROBE_TIMEOUT)?;
        eprintln!("    connected in {:.1} s", t.elapsed().as_secs_f64());
        guard.remove_domains();
        Ok(guard)
    }

    /// A libvirtd/virtlogd left running by an earlier bench run (pids in `marker`) is stopped;
    /// any other one is a reason to refuse.
    fn clear_leftovers(marker: &Path) -> Result<(), String> {
        let ours: Vec<i32> = std::fs::read_to_string(marker)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for (name, pid_file) in PID_FILES {
            let mut pids = pids_named(name);
            pids.extend(live_pid(pid_file, name));
            pids.sort();
            pids.dedup();
            for pid in pids {
                let mine = ours.contains(&pid) || parent_of(pid).is_some_and(|p| ours.contains(&p));
                if !mine {
                    return Err(format!(
                        "a {name} (pid {pid}) is already running and was not started by a bench: \
                         stop it first (the bench runs its own, under a subreaper)"
                    ));
                }
                eprintln!("    stopping {name} (pid {pid}) left by an earlier bench run");
                // SAFETY: kill(2) on a libvirt daemon that an earlier bench run started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let end = Instant::now() + Duration::from_secs(15);
                while Instant::now() < end && live_pid_of(pid, name) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if live_pid_of(pid, name) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if UnixStream::connect(LIBVIRTD_SOCK).is_ok() {
            return Err(format!(
                "something already serves {LIBVIRTD_SOCK}: stop that libvirtd first"
            ));
        }
        let _ = std::fs::remove_file(marker);
        Ok(())
    }

    /// User + system CPU that libvirtd and virtlogd have used so far (clock-tick resolution,
    /// 10 ms here): the daemons' share of an operation, which virsh's own rusage lacks.
    pub fn daemon_cpu(&self) -> Duration {
        let reaper = self.reaper.as_ref().map(|c| c.id() as i32);
        let libvirtd = pids_named("libvirtd")
            .into_iter()
            .find(|&p| reaper.is_some() && parent_of(p) == reaper);
        let virtlogd = self.virtlogd.as_ref().map(|c| c.id() as i32);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ticks: u64 = [libvirtd, virtlogd]
            .into_iter()
            .flatten()
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after ')'.
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .sum();
        Duration::from_secs_f64(ticks as f64 / hz)
    }

    /// Destroy and undefine (with its snapshots' metadata) every domain whose name starts with
    /// the prefix (errors ignored).
    pub fn remove_domains(&self) {
        let Ok(names) = util::output(&mut virsh(&["list", "--all", "--name"])) else {
            return;
        };
        for n in names.lines().map(str::trim) {
            if n.is_empty() || !n.starts_with(&self.prefix) {
                continue;
            }
            let _ = virsh(&["destroy", n]).output();
            let _ = virsh(&["undefine", n, "--snapshots-metadata"]).output();
        }
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn live_pid_of(pid: i32, name: &str) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    comm.trim() == name
        && stat
            .rsplit_once(')')
            .is_some_and(|(_, t)| !t.trim_start().starts_with('Z'))
}

/// Wait until `path` accepts connections (failing early when `child` exits).
fn wait_socket(path: &str, timeout: Duration, child: Option<&mut Child>) -> Result<(), String> {
    let end = Instant::now() + timeout;
    let mut child = child;
    while Instant::now() < end {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!(
                    "the daemon serving {path} exited ({st}) before it listened: see its log under target/bench"
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{path} did not appear within {timeout:?}"))
}

/// Run `cmd` to success within `timeout` (killed after it).
fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<(), String> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !wait_exit(&mut child, timeout) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{cmd:?} did not finish within {timeout:?}"));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        util::step("stopping libvirtd and virtlogd");
        if self.reaper.is_some() {
            self.remove_domains();
        }
        // SIGTERM to the subreaper reaches libvirtd; the subreaper then stops any QEMU left.
        if let Some(mut r) = self.reaper.take() {
            stop(&mut r, "libvirtd (subreaper)");
        }
        if let Some(mut v) = self.virtlogd.take() {
            stop(&mut v, "virtlogd");
        }
        let _ = std::fs::remove_file(&self.marker);
    }
}
