//! Domains through the library against real QEMU 10.0.2: start with leases, state, disks,
//! monitor commands, destroy, kill -9, a QEMU outliving the process that started it, attach.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use virt_snap::domain::{DiskFormat, DiskSpec, DomainKind, DomainState, StateReason};
use virt_snap::{Connection, ErrorKind, RunSpec};

/// One test at a time: a process another test forks holds copies of this process's lease
/// descriptors until it execs, which would blur the "leases are gone" checks.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills the QEMU of a domain when the test ends, however it ends.
struct KillGuard(Vec<u32>);

impl KillGuard {
    fn add(&mut self, pid: Option<u32>) {
        self.0.extend(pid);
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if is_alive(pid) {
                // SAFETY: kill(2) on a QEMU this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// An error and its causes, as the CLI prints them.
fn chain(e: &virt_snap::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

/// Alive: the main thread is not a zombie, or other threads of the group are still exiting
/// (they hold the descriptors until the last one is gone).
fn is_alive(pid: u32) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    });
    match zombie {
        Err(_) => false,
        Ok(false) => true,
        Ok(true) => std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1),
    }
}

fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    testbed::qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    p
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn spec(name: &str, disks: &[&Path]) -> RunSpec {
    let mut s = RunSpec::new(name);
    s.kind = DomainKind::Kvm;
    s.memory_bytes = 128 << 20;
    let targets = ["vda", "vdb", "vdc"];
    for (d, t) in disks.iter().zip(targets) {
        s.disks.push(DiskSpec::file(d, DiskFormat::Qcow2, t));
    }
    s
}

/// A state directory whose path is about 200 bytes long.
fn long_state_dir(base: &Path) -> PathBuf {
    let mut p = base.to_path_buf();
    while p.as_os_str().len() < 190 {
        p.push("a-rather-long-directory-name");
    }
    p.join("state")
}

fn wait_until(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + t;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn start_two_qcow2_disks_with_a_long_state_dir_then_query_and_destroy() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let state = long_state_dir(tmp.path());
    assert!(state.as_os_str().len() > 190);
    let conn = Connection::open(&state).unwrap();
    let a = qcow2(tmp.path(), "a.qcow2");
    let base = qcow2(tmp.path(), "base.qcow2");
    let b = tmp.path().join("b.qcow2");
    testbed::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    let rt = rt();
    let mut guard = KillGuard(vec![]);
    let dom = rt
        .block_on(conn.start(&spec("vm1", &[&a, &b])))
        .expect("start");
    let pid = dom.pid().unwrap().expect("running");
    guard.add(Some(pid));

    // The run directory is private; the sockets are in it despite the long path.
    use std::os::unix::fs::PermissionsExt;
    let run = dom.dir();
    assert!(run.join("qmp.sock").as_os_str().len() > 107);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&run.join("state.json")), 0o600);

    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(
        (st.state, st.reason),
        (DomainState::Running, StateReason::Booted)
    );
    assert_eq!(st.pid, Some(pid));

    let list = rt.block_on(conn.domains(false)).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].id), ("vm1", Some(pid)));

    let blk = rt.block_on(dom.block_devices()).unwrap();
    let rows: Vec<(String, String)> = blk
        .iter()
        .map(|b| (b.target.clone(), b.source.clone()))
        .collect();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    assert_eq!(
        rows,
        vec![("vda".into(), canon(&a)), ("vdb".into(), canon(&b))]
    );
    assert_eq!(blk[0].node_name.as_deref(), Some("vs-vda-fmt"));

    // A monitor command, and the state it changes.
    let r = rt
        .block_on(dom.monitor_command(r#"{"execute":"stop"}"#))
        .unwrap();
    assert_eq!(r, serde_json::json!({"return": {}}));
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(
        (st.state, st.reason),
        (DomainState::Paused, StateReason::User)
    );
    let e = rt
        .block_on(dom.monitor_command(r#"{"execute":"no-such-command"}"#))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Monitor, "{e}");

    // Volume operations are refused while it runs, on the disks and on the backing file.
    for img in [&a, &base] {
        let e = conn.image(img).snapshot_create(b"s1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(chain(&e).contains("domain \"vm1\""), "{}", chain(&e));
    }
    // Starting it twice is refused.
    let e = rt
        .block_on(conn.start(&spec("vm1", &[&a, &b])))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    // Another domain on the same disk is refused, naming the first.
    let e = rt.block_on(conn.start(&spec("vm2", &[&a]))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("domain \"vm1\""), "{e}");

    rt.block_on(dom.destroy()).unwrap();
    assert!(!is_alive(pid));
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(
        (st.state, st.reason),
        (DomainState::ShutOff, StateReason::Destroyed)
    );
    assert!(!run.join("qmp.sock").exists());
    let e = rt.block_on(dom.destroy()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotRunning, "{e}");
    assert!(rt.block_on(conn.domains(false)).unwrap().is_empty());
    assert_eq!(rt.block_on(conn.domains(true)).unwrap().len(), 1);
    // The leases went with QEMU.
    conn.image(&a).snapshot_create(b"after").unwrap();
    conn.image(&base).snapshot_create(b"after").unwrap();
}

#[test]
fn kill_9_is_a_crash_and_frees_the_leases() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    let a = qcow2(tmp.path(), "a.qcow2");
    let b = qcow2(tmp.path(), "b.qcow2");
    let rt = rt();
    let mut guard = KillGuard(vec![]);
    let dom = rt.block_on(conn.start(&spec("crashy", &[&a, &b]))).unwrap();
    let pid = dom.pid().unwrap().unwrap();
    guard.add(Some(pid));
    // Operations on one domain are serialised: one held elsewhere makes the next wait, then
    // fail naming it.
    let locks = locking::LockManager::for_state_dir(conn.state_dir()).unwrap();
    let busy = locks
        .acquire(&locking::Purpose::ForDomain {
            domain: "crashy".into(),
            qemu_pid: pid,
            op: "snapshot create".into(),
            volumes: vec![],
        })
        .unwrap();
    let slow = dom.clone().with_op_timeout(Duration::from_millis(300));
    let t0 = Instant::now();
    let e = rt.block_on(slow.state()).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(
        e.to_string()
            .starts_with("domain \"crashy\" is busy: operation \"snapshot create\""),
        "{e}"
    );
    drop(busy);
    // SAFETY: kill(2) on the QEMU just started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until("QEMU to die", Duration::from_secs(5), || !is_alive(pid));

    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(
        (st.state, st.reason),
        (DomainState::ShutOff, StateReason::Crashed)
    );
    assert!(!dom.dir().join("qmp.sock").exists(), "cleaned up");
    assert!(locks
        .holders(&locking::Resource::file(&a))
        .unwrap()
        .is_empty());
    conn.image(&a).snapshot_create(b"after-crash").unwrap();

    // It starts again on the same disks.
    let dom = rt.block_on(conn.start(&spec("crashy", &[&a, &b]))).unwrap();
    let pid = dom.pid().unwrap().unwrap();
    guard.add(Some(pid));
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(st.state, DomainState::Running);
    // QEMU exiting normally by itself (as on a poweroff from inside the guest; here a `quit`
    // virt-snap did not ask for as a destroy) is a shutdown, not a crash.
    rt.block_on(dom.monitor_command(r#"{"execute":"quit"}"#))
        .unwrap();
    wait_until("QEMU to exit", Duration::from_secs(5), || !is_alive(pid));
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(
        (st.state, st.reason),
        (DomainState::ShutOff, StateReason::Shutdown)
    );
    // The leases go with QEMU's last thread, a moment after its main thread is a zombie.
    wait_until("the leases to go", Duration::from_secs(5), || {
        locks
            .holders(&locking::Resource::file(&a))
            .unwrap()
            .is_empty()
    });
}

#[test]
fn start_is_refused_while_a_volume_operation_holds_a_disk() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    let a = qcow2(tmp.path(), "a.qcow2");
    let locks = locking::LockManager::for_state_dir(conn.state_dir()).unwrap();
    let held = locks
        .acquire(&locking::Purpose::VolumeOp {
            op: "snapshot create".into(),
            volumes: vec![locking::Resource::file(&a)],
        })
        .unwrap();
    let rt = rt();
    let e = rt
        .block_on(conn.start(&spec("blocked", &[&a])))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(
        e.to_string().contains("operation \"snapshot create\""),
        "{e}"
    );
    // Nothing was started or left behind.
    let e = rt
        .block_on(conn.domain("blocked").unwrap().state())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    drop(held);
    let dom = rt.block_on(conn.start(&spec("blocked", &[&a]))).unwrap();
    let _g = KillGuard(dom.pid().unwrap().into_iter().collect());
    rt.block_on(dom.destroy()).unwrap();
}

/// Runs in a child process (see the next test): starts a domain and exits.
#[test]
fn helper_start_and_exit() {
    let Some(state) = std::env::var_os("VS_HELPER_STATE") else {
        return;
    };
    let disk = PathBuf::from(std::env::var_os("VS_HELPER_DISK").unwrap());
    let conn = Connection::open(state).unwrap();
    let dom = rt()
        .block_on(conn.start(&spec("outliver", &[&disk])))
        .unwrap();
    println!("started pid {}", dom.pid().unwrap().unwrap());
}

#[test]
fn qemu_outlives_the_process_that_started_it_and_keeps_its_leases() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let a = qcow2(tmp.path(), "a.qcow2");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_start_and_exit", "--nocapture"])
        .env("VS_HELPER_STATE", &state)
        .env("VS_HELPER_DISK", &a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let conn = Connection::open(&state).unwrap();
    let dom = conn.domain("outliver").unwrap();
    let pid = dom.pid().unwrap().expect("QEMU still runs");
    let _g = KillGuard(vec![pid]);
    // Its parent is no longer the helper (which exited): QEMU was reparented.
    let rt = rt();
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(st.state, DomainState::Running);
    // The lease is QEMU's: recorded with its pid, and it refuses volume operations.
    let locks = locking::LockManager::for_state_dir(&state).unwrap();
    let hs = locks.holders(&locking::Resource::file(&a)).unwrap();
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].pid, pid);
    let e = conn.image(&a).snapshot_create(b"x").unwrap_err();
    assert!(chain(&e).contains("domain \"outliver\""), "{}", chain(&e));
    rt.block_on(dom.destroy()).unwrap();
    conn.image(&a).snapshot_create(b"x").unwrap();
}

#[test]
fn attach_adopts_a_qemu_of_another_tool_and_leases_its_disks() {
    let _one = serial();
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    let mut qemu = testbed::Qemu::builder()
        .disk("d0", testbed::DiskFormat::Qcow2, 64 << 20)
        .disk("d1", testbed::DiskFormat::Raw, 8 << 20)
        .read_only()
        .spawn()
        .expect("start QEMU");
    let d0 = qemu.disk("d0").path.clone();
    let rt = rt();
    // Starting a domain on a disk that QEMU of another tool has open is refused, naming it.
    let e = rt
        .block_on(conn.start(&spec("second", &[&d0])))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(
        chain(&e).contains(&format!("qemu-system-x86 (pid {})", qemu.pid())),
        "{}",
        chain(&e)
    );
    let dom = rt
        .block_on(conn.attach("adopted", qemu.qmp_path(), None))
        .expect("attach");
    assert_eq!(dom.pid().unwrap(), Some(qemu.pid()));
    let blk = rt.block_on(dom.block_devices()).unwrap();
    let targets: Vec<&str> = blk.iter().map(|b| b.target.as_str()).collect();
    assert_eq!(targets, ["d0-dev", "d1-dev"]);
    assert!(blk[1].readonly);
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(st.state, DomainState::Running);

    // The lease, not only QEMU's image lock, refuses the volume operation, naming the domain.
    let e = conn.image(&d0).snapshot_create(b"s").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(chain(&e).contains("domain \"adopted\""), "{}", chain(&e));

    // QEMU quits (through its other tool): the leases go with it.
    rt.block_on(async {
        let _ = dom.monitor_command(r#"{"execute":"quit"}"#).await;
    });
    assert!(qemu.wait_exit(Duration::from_secs(10)).is_some());
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(st.state, DomainState::ShutOff);
    conn.image(&d0).snapshot_create(b"s").unwrap();
}
