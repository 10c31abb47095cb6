//! Quiesced disk-only snapshots of the test guest (TCG, direct kernel boot, the real guest
//! agent) started through a `RunSpec`: the agent freezes the guest's file systems around the
//! transaction and thaws them after; the disk ends on its overlay; the thaw watchdog is gone
//! after a normal capture, thaws the guest when the `virt-snap` binary dies while it is
//! frozen (no further virt-snap command), and at the freeze budget's end when virt-snap is
//! stuck.

use qmp_proto::QgaClient;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use virt_snap::domain::{DiskFormat, DiskSpec, DomainKind, DomainState};
use virt_snap::snapshot::{CaptureRequest, SnapshotName};
use virt_snap::{Connection, Domain, RunSpec};

struct KillGuard(Option<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on the QEMU this test started (it may be gone already).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The test guest, running, its agent answering.
struct Guest {
    // Dropped in this order: QEMU killed first, the directory removed last.
    _kill: KillGuard,
    dom: Domain,
    rt: tokio::runtime::Runtime,
    state: PathBuf,
    console: PathBuf,
    tmp: tempfile::TempDir,
}

impl Guest {
    fn start(name: &str) -> Guest {
        let image = testbed::guest_dir().expect("the test guest (cargo xtask guest-image)");
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let conn = Connection::open(&state).unwrap();
        // The guest's /init mounts an ext4 data disk at /dev/vda.
        let data = tmp.path().join("data.raw");
        testbed::make_data_disk(&data, 64 << 20).expect("the guest's data disk");
        let boot = testbed::GuestBoot::from_dir(&image);
        let console = tmp.path().join("console.log");
        let mut spec = RunSpec::new(name);
        spec.kind = DomainKind::Tcg;
        spec.memory_bytes = 256 << 20;
        spec.kernel = Some(boot.kernel);
        spec.initrd = Some(boot.initrd);
        spec.cmdline = Some(boot.cmdline);
        spec.serial_file = Some(console.clone());
        spec.disks
            .push(DiskSpec::file(&data, DiskFormat::Raw, "vda"));
        spec.agent = true;
        spec.extra_args = vec!["-no-reboot".into()];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dom = rt.block_on(conn.start(&spec)).expect("start the guest");
        let g = Guest {
            _kill: KillGuard(dom.pid().unwrap()),
            rt,
            tmp,
            state,
            console,
            dom,
        };
        let end = Instant::now() + Duration::from_secs(120);
        while g.agent("guest-ping").is_err() {
            assert!(
                Instant::now() < end,
                "the agent never answered; console: {}",
                std::fs::read_to_string(&g.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        g
    }

    /// An agent command through the facade (which recovers pending captures first).
    fn agent(&self, cmd: &str) -> virt_snap::Result<serde_json::Value> {
        self.rt.block_on(self.dom.agent_command(
            &format!("{{\"execute\":\"{cmd}\"}}"),
            Duration::from_secs(5),
        ))
    }

    /// The agent's socket, to talk to it with no virt-snap code in between.
    fn agent_socket(&self) -> PathBuf {
        self.dom.dir().join("qga.sock")
    }

    /// The `virt-snap` binary: `snapshot-create-as DOM k1 --disk-only --quiesce
    /// --freeze-budget MS` with `VIRT_SNAP_FAILPOINT=capture:<failpoint>`.
    fn virt_snap_failing_at(&self, failpoint: &str, budget_ms: u64) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_virt-snap"));
        c.arg("--state-dir")
            .arg(&self.state)
            .args(["snapshot-create-as", self.dom.name(), "k1", "--disk-only"])
            .args(["--quiesce", "--freeze-budget", &budget_ms.to_string()])
            .env("VIRT_SNAP_FAILPOINT", format!("capture:{failpoint}"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }
}

/// Thaw watchdogs this process left: children that run its own executable (a fork) or lead
/// their own session (the watchdog calls setsid; a zombie one too, had it not been reaped).
/// Other tests' children (the virt-snap binary, QEMU's launcher) are neither.
fn watchdogs_left() -> Vec<String> {
    let me = std::process::id().to_string();
    let exe = std::env::current_exe().unwrap();
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp session ...
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        if f.get(1) != Some(&me.as_str()) {
            continue;
        }
        let is_fork = std::fs::read_link(e.path().join("exe")).is_ok_and(|x| x == exe);
        if is_fork || f.get(3) == Some(&pid.as_str()) {
            left.push(format!("{pid}: {}", stat.trim()));
        }
    }
    left
}

/// No thaw watchdog left (waiting up to 2 s: one whose reaping went to a thread).
fn assert_no_watchdog_left() {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let left = watchdogs_left();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "thaw watchdogs left: {left:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Talks to the agent directly until `f` succeeds or `until`; each connection is served
/// only once no other client (a watchdog holding virt-snap's connection) has the agent.
fn with_agent<T>(
    g: &Guest,
    until: Instant,
    mut f: impl FnMut(&mut QgaClient) -> Result<T, String>,
) -> T {
    let sock = g.agent_socket();
    let mut last = String::new();
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match g.rt.block_on(QgaClient::connect_unix(
            &sock,
            left.max(Duration::from_millis(100)),
        )) {
            Ok(mut a) => match f(&mut a) {
                Ok(v) => return v,
                Err(e) => last = e,
            },
            Err(e) => last = format!("connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agent did not answer in time: {last}");
}

fn fsfreeze_status(g: &Guest, a: &mut QgaClient) -> Result<String, String> {
    g.rt.block_on(a.execute("guest-fsfreeze-status", None, Duration::from_secs(3)))
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .map_err(|e| e.to_string())
}

/// A file written on the guest's frozen-then-thawed file system (hangs, so fails, while
/// frozen).
fn guest_writes(g: &Guest, a: &mut QgaClient, what: &str) -> Result<(), String> {
    let script = format!("echo {what} > /mnt/{what} && sync && cat /mnt/{what}");
    let out =
        g.rt.block_on(a.exec(&["/bin/sh", "-c", &script], None, Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
    if out.success() && out.stdout == format!("{what}\n").as_bytes() {
        Ok(())
    } else {
        Err(format!("{out:?}"))
    }
}

/// After the killed capture: the next virt-snap command recovers it (overlay removed,
/// running, nothing recorded).
fn recovered(g: &Guest) {
    let st = g.rt.block_on(g.dom.state()).unwrap();
    assert_eq!(st.state, DomainState::Running);
    assert!(!g.tmp.path().join("data.k1").exists(), "overlay left");
    assert!(!g
        .state
        .join("snapshots")
        .join(g.dom.name())
        .join("k1.xml")
        .exists());
    assert_eq!(
        g.agent("guest-fsfreeze-status").unwrap()["return"],
        "thawed"
    );
}

#[test]
fn quiesced_disk_only_snapshot_of_the_test_guest() {
    let g = Guest::start("qguest");
    let mut r = CaptureRequest::new(SnapshotName::new("q1").unwrap());
    r.flags.disk_only = true;
    r.flags.quiesce = true;
    r.freeze_budget_ms = 10_000;
    let res =
        g.rt.block_on(g.dom.snapshot_create(r))
            .expect("quiesced capture");
    let frozen = res.frozen.expect("the guest was frozen");
    assert!(frozen < Duration::from_secs(10), "{frozen:?}");
    // The watchdog armed for the freeze was disarmed and reaped by the thaw.
    assert_no_watchdog_left();
    assert_eq!(
        g.agent("guest-fsfreeze-status").unwrap()["return"],
        "thawed",
        "thawed after"
    );
    assert_eq!(
        g.rt.block_on(g.dom.state()).unwrap().state,
        DomainState::Running
    );
    let overlay = g.tmp.path().join("data.q1");
    let blocks = g.rt.block_on(g.dom.block_devices()).unwrap();
    assert_eq!(blocks[0].source, overlay.display().to_string());
    assert_eq!(blocks[0].format, "qcow2");
}

/// virt-snap dies (abort right after guest-fsfreeze-freeze returned: the guest is frozen)
/// and no virt-snap command follows: its watchdog thaws the guest, within the budget
/// (3 s) + 2 s of the death, and the guest writes to the file system again. The agent is
/// reached directly; its next client is served only once the watchdog, which thaws as soon
/// as virt-snap is gone, has let virt-snap's connection go.
#[test]
fn virt_snap_killed_while_the_guest_is_frozen_the_watchdog_thaws_it() {
    let g = Guest::start("qkill");
    let budget = Duration::from_secs(3);
    let out = g
        .virt_snap_failing_at("freeze", budget.as_millis() as u64)
        .output()
        .unwrap();
    // output() returned: the watchdog holds neither of virt-snap's stdout and stderr.
    let died = Instant::now();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("failpoint capture:freeze"),
        "virt-snap died right after the freeze: {:?} {err}",
        out.status
    );
    let until = died + budget + Duration::from_secs(2);
    with_agent(&g, until, |a| match fsfreeze_status(&g, a)?.as_str() {
        "thawed" => Ok(()),
        other => Err(format!("still {other}")),
    });
    let thawed_after = died.elapsed();
    eprintln!("thawed (seen by the next agent client) {thawed_after:?} after virt-snap died");
    assert!(
        thawed_after <= budget + Duration::from_secs(2),
        "{thawed_after:?}"
    );
    with_agent(&g, Instant::now() + Duration::from_secs(20), |a| {
        guest_writes(&g, a, "after-kill")
    });
    recovered(&g);
}

/// The last tick number the guest's ticker wrote to the serial console.
fn last_tick(console: &Path) -> u64 {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// virt-snap stuck (blocked right after the freeze, for the budget + 4 s, then it dies):
/// the watchdog thaws the guest at the budget's end while virt-snap still lives. A guest
/// ticker that writes to the frozen file system and then to the serial console shows it:
/// it stalls for about the budget and resumes before virt-snap is gone.
#[test]
fn virt_snap_stuck_while_the_guest_is_frozen_is_thawed_at_the_budgets_end() {
    let g = Guest::start("qstall");
    let ticker = "i=0; while :; do i=$((i+1)); echo $i > /mnt/tick; \
                  echo \"tick $i\" > /dev/ttyS0; sleep 0.1; done";
    with_agent(&g, Instant::now() + Duration::from_secs(20), |a| {
        let bg = format!("({ticker}) </dev/null >/dev/null 2>&1 &");
        g.rt.block_on(a.exec(&["/bin/sh", "-c", &bg], None, Duration::from_secs(5)))
            .map_err(|e| e.to_string())
            .map(drop)
    });
    let t0 = last_tick(&g.console);
    let end = Instant::now() + Duration::from_secs(20);
    while last_tick(&g.console) < t0 + 5 {
        assert!(Instant::now() < end, "the guest's ticker does not tick");
        std::thread::sleep(Duration::from_millis(50));
    }

    let budget = Duration::from_secs(3);
    let mut child = g
        .virt_snap_failing_at("freeze-stall", budget.as_millis() as u64)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // (when, tick) at each change, while virt-snap lives.
    let mut changes = vec![(Instant::now(), last_tick(&g.console))];
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "virt-snap did not end");
        let t = last_tick(&g.console);
        if t != changes.last().unwrap().1 {
            changes.push((Instant::now(), t));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let exited = Instant::now();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success() && err.contains("failpoint capture:freeze-stall"),
        "virt-snap stalled then died: {status:?} {err}"
    );
    // The longest stall of the ticker while virt-snap lived, and whether it ended then.
    let (stall, resumed) = changes
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, true))
        .chain(std::iter::once((exited - changes.last().unwrap().0, false)))
        .max_by_key(|(d, _)| *d)
        .unwrap();
    eprintln!("the ticker stalled for {stall:?} (budget {budget:?})");
    assert!(
        resumed,
        "the ticker resumed only after virt-snap died (stall {stall:?}): {changes:?}"
    );
    assert!(
        stall >= budget - Duration::from_millis(1500) && stall <= budget + Duration::from_secs(2),
        "frozen for about the budget ({budget:?}), not {stall:?}"
    );
    with_agent(
        &g,
        Instant::now() + Duration::from_secs(20),
        |a| match fsfreeze_status(&g, a)?.as_str() {
            "thawed" => guest_writes(&g, a, "after-stall"),
            other => Err(format!("still {other}")),
        },
    );
    recovered(&g);
}

/// The guest agent stops answering (SIGSTOP inside the guest, sent by a child it spawned):
/// `--quiesce` fails within its budget (plus the half-second thaw try; 3 s of slack for a
/// loaded machine, against 20 s before), the VM runs on, no
/// overlay file or block node is left and nothing is recorded.
#[test]
fn an_agent_that_stops_answering_fails_the_quiesce_within_its_budget() {
    let g = Guest::start("qstop");
    // The agent's child stops its parent, the agent, a moment after guest-exec returned.
    let stop = r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 1; kill -STOP $PPID"]}}"#;
    g.rt.block_on(g.dom.agent_command(stop, Duration::from_secs(5)))
        .expect("guest-exec");
    std::thread::sleep(Duration::from_secs(2));
    let nodes_before =
        g.rt.block_on(
            g.dom.monitor_command(
                r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            ),
        )
        .unwrap()["return"]
            .as_array()
            .unwrap()
            .len();
    let budget = Duration::from_millis(1500);
    let mut r = CaptureRequest::new(SnapshotName::new("h1").unwrap());
    r.flags.disk_only = true;
    r.flags.quiesce = true;
    r.freeze_budget_ms = budget.as_millis() as u64;
    let t0 = Instant::now();
    let err =
        g.rt.block_on(g.dom.snapshot_create(r))
            .expect_err("a capture with a stopped agent");
    let took = t0.elapsed();
    let msg = format!("{err:#}");
    assert!(msg.contains("budget") || msg.contains("freeze"), "{msg}");
    assert!(
        took < budget + Duration::from_millis(3000),
        "failed after {took:?} (budget {budget:?}): {msg}"
    );
    assert_eq!(
        g.rt.block_on(g.dom.state()).unwrap().state,
        DomainState::Running
    );
    assert!(!g.tmp.path().join("data.h1").exists(), "overlay left");
    let nodes_after =
        g.rt.block_on(
            g.dom.monitor_command(
                r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            ),
        )
        .unwrap()["return"]
            .as_array()
            .unwrap()
            .len();
    assert_eq!(nodes_after, nodes_before, "block nodes left");
    let snaps = g.state.join("snapshots").join(g.dom.name());
    assert!(!snaps.join("h1.xml").exists(), "metadata written");
    assert!(!snaps.join("current").exists(), "current set");
}
