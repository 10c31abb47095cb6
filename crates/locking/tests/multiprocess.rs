//! Leases between real processes: this test binary re-runs itself as the child
//! (`child_process_entry`, told what to do by environment variables), and parent and children
//! talk through files in a temporary directory.

use locking::qemu::{probe, Access};
use locking::{DiskUse, ErrorKind, LockManager, Purpose, Resource, UuidKind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const CHILD_TEST: &str = "child_process_entry";

/// The child side. Without `VS_LOCK_CHILD` it is an ordinary, empty test.
#[test]
fn child_process_entry() {
    let Ok(what) = std::env::var("VS_LOCK_CHILD") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("child needs {k}"));
    // Races other than "leases" use a per-process in-memory table: no lease exclusion.
    let race_mode = std::env::var("VS_LOCK_RACE").unwrap_or_else(|_| "leases".into());
    let space = env("VS_LOCK_SPACE");
    let locks = if let Some(url) = space.strip_prefix("etcd:") {
        // The cluster lockspace, as host VS_LOCK_HOST. "etcd-split" (the negative control)
        // gives each process a prefix of its own: the real etcd path, but nothing excludes.
        let url = if race_mode == "etcd-split" {
            format!(
                "etcd:{}",
                url.replacen("?", &format!("-{}?", env("VS_LOCK_ID")), 1)
            )
        } else {
            space.clone()
        };
        let cfg = locking::EtcdConfig::parse(&url, &env("VS_LOCK_HOST")).unwrap();
        LockManager::with_backend(std::sync::Arc::new(locking::EtcdBackend::new(cfg).unwrap()))
    } else if race_mode != "leases" {
        LockManager::with_backend(std::sync::Arc::new(locking::MemoryBackend::new()))
    } else {
        LockManager::local(space).unwrap()
    };
    let out = PathBuf::from(env("VS_LOCK_OUT"));
    let id = env("VS_LOCK_ID");
    match what.as_str() {
        "hold" => {
            let purpose = purpose(&env("VS_LOCK_PURPOSE"), &id, &out);
            let held = locks.acquire(&purpose);
            let msg = match &held {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("err {:?}: {e}", e.kind()),
            };
            write_atomic(&out.join(format!("ready-{id}")), &msg);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !out.join(format!("release-{id}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(held);
        }
        "race" => race(
            &locks,
            &out,
            &id,
            env("VS_LOCK_ROUNDS").parse().unwrap(),
            &race_mode,
        ),
        // virtlockd's lock call: a classic POSIX F_SETLK on byte 0 of the lease file. Report
        // whether it was granted, and keep it until released.
        "posix" => {
            use std::os::fd::AsRawFd;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(env("VS_LOCK_FILE"))
                .unwrap();
            // SAFETY: an all-zero flock is valid; F_SETLK reads it during the call.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = 0;
            fl.l_len = 1;
            // SAFETY: as above.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
            write_atomic(
                &out.join(format!("ready-{id}")),
                if r == 0 { "granted" } else { "refused" },
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while !out.join(format!("release-{id}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Hold nothing of our own: just live (with whatever fds we inherited) until released.
        "sleep" => {
            write_atomic(&out.join(format!("ready-{id}")), "ok");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !out.join(format!("release-{id}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        other => panic!("unknown child job {other}"),
    }
}

fn file_a(out: &Path) -> Resource {
    Resource::file(out.join("a.img"))
}

fn uuid_b() -> Resource {
    Resource::Uuid {
        kind: UuidKind::LvmLv,
        uuid: "dR3kzF-9a2B-Xc4d-Ef5g-Hi6j-Kl7m-No8pQr".into(),
        display: "vg0/b".into(),
        image: None,
    }
}

/// `exclusive`: a volume operation on a.img; `shared:NAME`: VM NAME starting with a.img
/// read-only.
fn purpose(spec: &str, id: &str, out: &Path) -> Purpose {
    match spec.split_once(':') {
        Some(("shared", dom)) => Purpose::VmStart {
            domain: dom.into(),
            disks: vec![DiskUse::read_only(file_a(out))],
        },
        _ => Purpose::VolumeOp {
            op: format!("hold-child {id}"),
            volumes: vec![file_a(out)],
        },
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Many rounds of: an exclusive volume operation on a.img and LV b, or a shared VM start on
/// a.img. Inside, markers prove nobody else is inside in a conflicting mode, and a counter is
/// incremented without any other synchronisation. `mode`: "leases" (the real thing), "none"
/// (the negative control: LV b only, with per-process leases, so nothing excludes) or
/// "image-only" (per-process leases, exclusive rounds on a.img only: QEMU's image locks alone
/// must exclude).
fn race(locks: &LockManager, out: &Path, id: &str, rounds: u32, mode: &str) {
    let excl = Purpose::VolumeOp {
        op: format!("racer {id}"),
        volumes: match mode {
            // Leases only (etcd): no image file, so no QEMU image locks to exclude instead.
            "none" | "etcd" | "etcd-split" => vec![uuid_b()],
            "image-only" => vec![file_a(out)],
            _ => vec![file_a(out), uuid_b()],
        },
    };
    let shared = Purpose::VmStart {
        domain: format!("racer-{id}"),
        disks: vec![DiskUse::read_only(
            if matches!(mode, "none" | "etcd" | "etcd-split") {
                uuid_b()
            } else {
                file_a(out)
            },
        )],
    };
    // Start together: announce, then wait for the parent's "go".
    write_atomic(&out.join(format!("started-{id}")), "");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.join("go").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let (mut exclusive_wins, mut shared_wins, mut violations) = (0u32, 0u32, Vec::new());
    let me = std::process::id();
    let marker = out.join("inside-exclusive");
    let shared_dir = out.join("shared");
    let counter = out.join("counter");
    for round in 0..rounds {
        let spin = Duration::from_micros(50 + u64::from((round * 37 + me) % 200));
        if mode == "image-only" || (round + me) % 3 != 0 {
            let Ok(_held) = locks.acquire(&excl) else {
                std::thread::sleep(spin);
                continue;
            };
            if std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_err()
            {
                violations.push(format!("round {round}: another exclusive holder inside"));
            }
            if std::fs::read_dir(&shared_dir).unwrap().next().is_some() {
                violations.push(format!("round {round}: exclusive while shared inside"));
            }
            let n: u64 = std::fs::read_to_string(&counter)
                .unwrap_or_default()
                .trim()
                .parse()
                .unwrap_or(0);
            std::thread::sleep(spin);
            std::fs::write(&counter, (n + 1).to_string()).unwrap();
            let _ = std::fs::remove_file(&marker);
            exclusive_wins += 1;
        } else {
            let Ok(_held) = locks.acquire(&shared) else {
                std::thread::sleep(spin);
                continue;
            };
            let mine = shared_dir.join(format!("{me}"));
            std::fs::write(&mine, "").unwrap();
            if marker.exists() {
                violations.push(format!("round {round}: shared while exclusive inside"));
            }
            std::thread::sleep(spin);
            std::fs::remove_file(&mine).unwrap();
            shared_wins += 1;
        }
    }
    write_atomic(
        &out.join(format!("result-{id}")),
        &format!("{exclusive_wins} {shared_wins}\n{}", violations.join("\n")),
    );
}

/// A child process of this test binary (killed with SIGKILL when dropped).
struct ChildProc {
    child: Child,
    id: String,
    out: PathBuf,
}

impl ChildProc {
    fn spawn(space: &Path, out: &Path, job: &str, id: &str, extra: &[(&str, &str)]) -> Self {
        ChildProc::spawn_inheriting(space, out, job, id, extra, Vec::new())
    }
    /// Like `spawn`, and the child inherits the fds `inherit` (FD_CLOEXEC cleared in it).
    fn spawn_inheriting(
        space: &Path,
        out: &Path,
        job: &str,
        id: &str,
        extra: &[(&str, &str)],
        inherit: Vec<std::os::fd::RawFd>,
    ) -> Self {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", CHILD_TEST, "--test-threads=1", "--nocapture"])
            .env("VS_LOCK_CHILD", job)
            .env("VS_LOCK_SPACE", space)
            .env("VS_LOCK_OUT", out)
            .env("VS_LOCK_ID", id)
            .stdout(std::process::Stdio::null());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        if !inherit.is_empty() {
            // SAFETY: between fork and exec we only call fcntl, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &inherit {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        ChildProc {
            child: cmd.spawn().expect("re-run the test binary as a child"),
            id: id.into(),
            out: out.to_path_buf(),
        }
    }
    fn hold(space: &Path, out: &Path, id: &str, purpose: &str) -> Self {
        ChildProc::spawn(space, out, "hold", id, &[("VS_LOCK_PURPOSE", purpose)])
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// What the child reported after trying to acquire.
    fn ready(&mut self) -> String {
        let f = self.out.join(format!("ready-{}", self.id));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::fs::read_to_string(&f) {
                return s;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("child {} exited before it was ready: {st}", self.id);
            }
            assert!(
                Instant::now() < deadline,
                "child {} never got ready",
                self.id
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fn release(mut self) {
        std::fs::write(self.out.join(format!("release-{}", self.id)), "").unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "child {} failed: {st}", self.id);
    }
    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    space: PathBuf,
    out: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let space = tmp.path().join("locks");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("shared")).unwrap();
    std::fs::write(out.join("a.img"), vec![0u8; 4096]).unwrap();
    Setup {
        _tmp: tmp,
        space,
        out,
    }
}

fn exclusive_op(s: &Setup) -> Purpose {
    Purpose::VolumeOp {
        op: "parent".into(),
        volumes: vec![file_a(&s.out)],
    }
}

#[test]
fn a_second_exclusive_acquire_fails_and_names_the_holder() {
    let s = setup();
    let mut holder = ChildProc::hold(&s.space, &s.out, "h1", "exclusive");
    assert_eq!(holder.ready(), "ok");
    // Its QEMU image locks are visible to any process, as a QEMU writer's would be.
    assert_eq!(
        probe(&s.out.join("a.img")).unwrap().bytes(),
        Access::WRITER.bytes()
    );
    let owners = locking::qemu::lock_owners(&s.out.join("a.img"));
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(owners[0].pid, holder.pid());
    assert_eq!(owners[0].bytes, Access::WRITER.bytes());
    let mut second = ChildProc::hold(&s.space, &s.out, "h2", "exclusive");
    let msg = second.ready();
    assert!(msg.starts_with("err Conflict: "), "{msg}");
    second.release();

    let locks = LockManager::local(&s.space).unwrap();
    let e = locks.acquire(&exclusive_op(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let a = std::fs::canonicalize(s.out.join("a.img")).unwrap();
    let want = format!(
        "volume {} in use by operation \"hold-child h1\" (pid {}, since ",
        a.display(),
        holder.pid()
    );
    assert!(e.to_string().starts_with(&want), "{e}\nwanted: {want}");
    assert_eq!(e.holders()[0].pid, holder.pid());
    // Starting a VM on the volume, writable or read-only, is refused the same way.
    for disk in [
        DiskUse::writable(file_a(&s.out)),
        DiskUse::read_only(file_a(&s.out)),
    ] {
        let e = locks
            .acquire(&Purpose::VmStart {
                domain: "vm1".into(),
                disks: vec![disk],
            })
            .unwrap_err();
        assert!(e.to_string().starts_with(&want), "{e}");
    }
    holder.release();
    locks.acquire(&exclusive_op(&s)).unwrap();
}

#[test]
fn shared_holders_block_an_exclusive_one_until_the_last_leaves() {
    let s = setup();
    let mut a = ChildProc::hold(&s.space, &s.out, "a", "shared:vm-a");
    let mut b = ChildProc::hold(&s.space, &s.out, "b", "shared:vm-b");
    assert_eq!(a.ready(), "ok");
    assert_eq!(b.ready(), "ok");
    let locks = LockManager::local(&s.space).unwrap();
    // Another VM may share the read-only disk.
    let vm_c = Purpose::VmStart {
        domain: "vm-c".into(),
        disks: vec![DiskUse::read_only(file_a(&s.out))],
    };
    drop(locks.acquire(&vm_c).unwrap());
    let e = locks.acquire(&exclusive_op(&s)).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("domain \"vm-a\""), "{text}");
    assert!(text.contains("domain \"vm-b\""), "{text}");
    a.release();
    let e = locks.acquire(&exclusive_op(&s)).unwrap_err();
    assert_eq!(e.holders().len(), 1, "{e}");
    assert_eq!(e.holders()[0].pid, b.pid());
    b.release();
    locks.acquire(&exclusive_op(&s)).unwrap();
}

#[test]
fn kill_9_of_the_holder_releases_the_lease_and_its_record() {
    let s = setup();
    let mut holder = ChildProc::hold(&s.space, &s.out, "k", "exclusive");
    assert_eq!(holder.ready(), "ok");
    let locks = LockManager::local(&s.space).unwrap();
    assert_eq!(locks.holders(&file_a(&s.out)).unwrap().len(), 1);
    assert!(locks.acquire(&exclusive_op(&s)).is_err());
    holder.kill9();
    // The record is still in the file but its slot lock died with the process.
    assert!(locks.holders(&file_a(&s.out)).unwrap().is_empty());
    assert!(!probe(&s.out.join("a.img")).unwrap().in_use());
    let held = locks.acquire(&exclusive_op(&s)).unwrap();
    assert_eq!(
        locks.holders(&file_a(&s.out)).unwrap()[0].holder.name(),
        "parent"
    );
    drop(held);
}

/// Run `procs` racers; (exclusive wins, shared wins, violations, counter).
fn run_race(s: &Setup, procs: u32, rounds: u32, mode: &str) -> (u64, u64, Vec<String>, u64) {
    run_race_in(&s.space, s, procs, rounds, mode)
}

/// [`run_race`] in lockspace `space` (a directory, or `etcd://...`); racer `i` runs as host
/// `hostA` or `hostB` (`i` even or odd).
fn run_race_in(
    space: &Path,
    s: &Setup,
    procs: u32,
    rounds: u32,
    mode: &str,
) -> (u64, u64, Vec<String>, u64) {
    let rounds = rounds.to_string();
    let kids: Vec<ChildProc> = (0..procs)
        .map(|i| {
            let host = if i % 2 == 0 { "hostA" } else { "hostB" };
            let env = [
                ("VS_LOCK_ROUNDS", rounds.as_str()),
                ("VS_LOCK_RACE", mode),
                ("VS_LOCK_HOST", host),
            ];
            ChildProc::spawn(space, &s.out, "race", &format!("r{i}"), &env)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..procs).any(|i| !s.out.join(format!("started-r{i}")).exists()) {
        assert!(Instant::now() < deadline, "racers did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::write(s.out.join("go"), "").unwrap();
    let (mut excl, mut shared, mut violations) = (0u64, 0u64, Vec::new());
    for mut k in kids {
        let st = k.child.wait().unwrap();
        assert!(st.success(), "racer {} failed: {st}", k.id);
        let r = std::fs::read_to_string(s.out.join(format!("result-{}", k.id))).unwrap();
        let (counts, v) = r.split_once('\n').unwrap();
        violations.extend(v.lines().map(|l| format!("racer {}: {l}", k.id)));
        let (e, sh) = counts.split_once(' ').unwrap();
        excl += e.parse::<u64>().unwrap();
        shared += sh.parse::<u64>().unwrap();
    }
    let counter: u64 = std::fs::read_to_string(s.out.join("counter"))
        .unwrap_or_else(|_| "0".into())
        .parse()
        .unwrap();
    (excl, shared, violations, counter)
}

#[test]
fn the_race_detects_overlaps_when_nothing_excludes() {
    let s = setup();
    let (excl, _, violations, counter) = run_race(&s, 6, 60, "none");
    assert!(
        !violations.is_empty() || counter != excl,
        "without real leases the racers should have been caught overlapping"
    );
}

#[test]
fn leases_and_virtlockd_style_posix_locks_exclude_each_other() {
    // virtlockd locks byte 0 of the same SHA-256-named file with classic POSIX F_SETLK;
    // OFD and POSIX locks conflict, so a shared lockspace directory excludes both ways.
    let s = setup();
    let locks = LockManager::local(&s.space).unwrap();
    let lease_file = locking::LocalBackend::at(&s.space)
        .lease_path(&file_a(&s.out).key().unwrap())
        .to_str()
        .unwrap()
        .to_string();
    let env = [("VS_LOCK_FILE", lease_file.as_str())];
    let mut posix = ChildProc::spawn(&s.space, &s.out, "posix", "p1", &env);
    assert_eq!(posix.ready(), "granted");
    let e = locks.acquire(&exclusive_op(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(
        e.to_string().ends_with(
            "in use by another holder (no virt-snap record: another tool, or virtlockd)"
        ),
        "{e}"
    );
    posix.release();
    let held = locks.acquire(&exclusive_op(&s)).unwrap();
    let mut posix = ChildProc::spawn(&s.space, &s.out, "posix", "p2", &env);
    assert_eq!(posix.ready(), "refused");
    posix.release();
    drop(held);
}

#[test]
fn qemu_image_locks_alone_exclude_racers_lock_then_test() {
    // Without leases, only the lock-then-test of QEMU's bytes keeps racers apart: two
    // racers may both fail, but two never both succeed.
    let s = setup();
    let (excl, _, violations, counter) = run_race(&s, 8, 150, "image-only");
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(counter, excl, "an unsynchronised counter lost updates");
    assert!(excl > 0, "somebody must have won");
    eprintln!("image locks only: {excl} exclusive holds of 1200 attempts");
    assert!(!probe(&s.out.join("a.img")).unwrap().in_use());
}

#[test]
fn a_lease_handed_to_a_child_lives_exactly_as_long_as_the_child() {
    // What the facade does for a VM: take the lease, start QEMU with the lease fd inherited,
    // hand the lease over to QEMU's pid, exit. Here the child is this test binary.
    use std::os::fd::AsRawFd;
    let s = setup();
    let locks = LockManager::local(&s.space).unwrap();
    let held = locks
        .acquire(&Purpose::VmStart {
            domain: "handed".into(),
            disks: vec![DiskUse::writable(file_a(&s.out))],
        })
        .unwrap();
    let fds: Vec<_> = held.lock_fds().iter().map(|f| f.as_raw_fd()).collect();
    assert_eq!(fds.len(), 1);
    let mut child = ChildProc::spawn_inheriting(&s.space, &s.out, "sleep", "vm", &[], fds);
    assert_eq!(child.ready(), "ok");
    held.hand_over(child.pid()).unwrap();

    // This process let go; the child holds the lease, and the record names it.
    let e = locks.acquire(&exclusive_op(&s)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(e.holders().len(), 1, "{e}");
    assert_eq!(e.holders()[0].pid, child.pid());
    assert!(
        e.to_string()
            .contains(&format!("domain \"handed\" (pid {}", child.pid())),
        "{e}"
    );
    // Work on the domain's behalf (a storage snapshot while its QEMU has the volume open):
    // allowed for the recorded holder, refused for this process's pid or another domain.
    let for_domain = |domain: &str, pid: u32| Purpose::ForDomain {
        domain: domain.into(),
        qemu_pid: pid,
        op: "snapshot create".into(),
        volumes: vec![file_a(&s.out)],
    };
    let op = locks.acquire(&for_domain("handed", child.pid())).unwrap();
    assert!(op.image_locks().is_empty(), "the child keeps QEMU's role");
    assert_eq!(
        locks
            .acquire(&for_domain("handed", child.pid()))
            .unwrap_err()
            .kind(),
        ErrorKind::Conflict,
        "one operation per domain at a time"
    );
    drop(op);
    for (d, pid) in [("handed", std::process::id()), ("other", child.pid())] {
        let e = locks.acquire(&for_domain(d, pid)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotHolder, "{e}");
    }
    let pid = child.pid();
    child.kill9();
    // Nothing on behalf of a dead QEMU. Another test of this binary forking at the moment
    // the lease was taken holds a copy of its descriptor until that child execs, so allow
    // that window to close.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match locks.acquire(&for_domain("handed", pid)) {
            Err(e) if e.kind() == ErrorKind::NotHolder => break,
            r => assert!(
                Instant::now() < deadline,
                "still acting for a dead QEMU: {r:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(locks.holders(&file_a(&s.out)).unwrap().is_empty());
    locks.acquire(&exclusive_op(&s)).unwrap();
}

#[test]
fn racing_processes_never_hold_exclusively_together() {
    let s = setup();
    const PROCS: u32 = 16;
    const ROUNDS: u32 = 200;
    let t = Instant::now();
    let (excl, shared, violations, counter) = run_race(&s, PROCS, ROUNDS, "leases");
    assert!(violations.is_empty(), "{violations:#?}");
    eprintln!(
        "{PROCS} processes x {ROUNDS} rounds: {excl} exclusive and {shared} shared holds in {:?}",
        t.elapsed()
    );
    assert_eq!(counter, excl, "an unsynchronised counter lost updates");
    assert!(excl > 0 && shared > 0, "both modes must have won sometimes");
    // Nothing is left behind.
    let locks = LockManager::local(&s.space).unwrap();
    assert!(locks.holders(&file_a(&s.out)).unwrap().is_empty());
    assert!(locks.holders(&uuid_b()).unwrap().is_empty());
    assert!(!probe(&s.out.join("a.img")).unwrap().in_use());
}

#[test]
fn acquire_timeout_waits_without_blocking_the_runtime() {
    let s = setup();
    let mut holder = ChildProc::hold(&s.space, &s.out, "t", "exclusive");
    assert_eq!(holder.ready(), "ok");
    let locks = LockManager::local(&s.space)
        .unwrap()
        .poll_interval(Duration::from_millis(10));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let op = exclusive_op(&s);
    let release = s.out.join("release-t");
    rt.block_on(async {
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t2 = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                t2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let start = Instant::now();
        let e = locks
            .acquire_timeout(&op, Duration::from_millis(300))
            .await
            .unwrap_err();
        let waited = start.elapsed();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.to_string().contains(" (waited "), "{e}");
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        let n = ticks.load(std::sync::atomic::Ordering::Relaxed);
        // One thread runs both: the ticker only ticks if acquiring never blocks it (a
        // blocking wait would leave it near 0; a loaded machine only slows it down).
        assert!(
            n >= 10,
            "the runtime was blocked: {n} ticks of 5 ms in {waited:?}"
        );

        // The holder leaves after 200 ms; the waiter gets the lease soon after.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::fs::write(release, "").unwrap();
        });
        let start = Instant::now();
        let held = locks
            .acquire_timeout(&op, Duration::from_secs(10))
            .await
            .unwrap();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(held.leases().len(), 1);
        ticker.abort();
    });
    let st = holder.child.wait().unwrap();
    assert!(st.success());
}

/// The cluster lockspace: 16 processes as two hosts, each with its own etcd client, racing
/// for one exclusive lease (and sometimes a shared one) through a real 3-member cluster.
#[test]
fn racing_processes_on_two_hosts_never_hold_an_etcd_lease_together() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let s = setup();
    const PROCS: u32 = 16;
    const ROUNDS: u32 = 40;
    let url = cluster.url("/race", 5);
    let t = Instant::now();
    let (excl, shared, violations, counter) =
        run_race_in(Path::new(&url), &s, PROCS, ROUNDS, "etcd");
    eprintln!(
        "etcd: {PROCS} processes x {ROUNDS} rounds: {excl} exclusive and {shared} shared holds in {:?}",
        t.elapsed()
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(counter, excl, "an unsynchronised counter lost updates");
    assert!(excl > 0 && shared > 0, "both modes must have won sometimes");
    // Nothing left: every lease was revoked when its holder let go.
    let keys = cluster
        .ctl(&["get", "--prefix", "--keys-only", "/race/leases/"])
        .unwrap();
    assert!(keys.trim().is_empty(), "leftover keys: {keys}");

    // The negative control: the same racers through the same cluster, each under a prefix of
    // its own, must be caught overlapping.
    let s = setup();
    let (excl, _, violations, counter) =
        run_race_in(Path::new(&url), &s, PROCS, ROUNDS, "etcd-split");
    assert!(
        !violations.is_empty() || counter != excl,
        "with nothing excluding them the racers should have been caught overlapping"
    );
}
