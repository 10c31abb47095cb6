//! Cluster leases end to end: two hosts (two state directories, two host names, the same
//! image files) sharing a real 3-member etcd cluster on loopback, with real QEMUs (KVM, no
//! guest OS) started by the real `virt-snap` binary.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use virt_snap_e2e::{qemu_img, run, stderr, stdout, virt_snap};

/// One host: its state directory and name, in lockspace `url`.
struct Host {
    state: PathBuf,
    name: &'static str,
    url: String,
}

impl Host {
    fn vs(&self, args: &[&str]) -> Output {
        run(virt_snap()
            .arg("--state-dir")
            .arg(&self.state)
            .env("VIRT_SNAP_LOCKSPACE", &self.url)
            .env("VIRT_SNAP_HOST", self.name)
            .args(args))
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.vs(args);
        assert!(o.status.success(), "{} {args:?}: {}", self.name, stderr(&o));
        stdout(&o)
    }
    /// A failure: its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.vs(args);
        assert!(
            !o.status.success(),
            "{} {args:?} should have failed: {}",
            self.name,
            stdout(&o)
        );
        stderr(&o)
    }
    /// The domain's keeper log (for failure messages).
    fn keeper_log(&self, dom: &str) -> String {
        std::fs::read_to_string(self.state.join("run").join(dom).join("keeper.log"))
            .unwrap_or_else(|e| format!("(no keeper log: {e})"))
    }
    fn state_of(&self, dom: &str) -> String {
        self.ok(&["domstate", dom, "--reason"]).trim().to_string()
    }
    fn qemu_pid(&self, dom: &str) -> i32 {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["domstate", dom, "--output", "json"])).unwrap();
        v["pid"].as_i64().expect("a pid") as i32
    }
}

/// A pool directory with volume `sys` (qcow2), defined on both hosts, and domain `vm1` on it
/// defined on both.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    a: Host,
    b: Host,
}

fn setup(url: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let pool = dir.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let host = |n: &'static str| Host {
        state: dir.join(format!("state-{n}")),
        name: n,
        url: url.to_string(),
    };
    let (a, b) = (host("hostA"), host("hostB"));
    a.ok(&["pool-define-as", "p", "dir", pool.to_str().unwrap()]);
    b.ok(&["pool-define-as", "p", "dir", pool.to_str().unwrap()]);
    a.ok(&["vol-create-as", "p", "sys", "16M", "--format", "qcow2"]);
    let xml = dir.join("vm1.xml");
    std::fs::write(
        &xml,
        "<domain type='kvm'><name>vm1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
         <source pool='p' volume='sys'/><target dev='vda' bus='virtio'/></disk>\
         <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
    )
    .unwrap();
    a.ok(&["define", xml.to_str().unwrap()]);
    b.ok(&["define", xml.to_str().unwrap()]);
    Setup {
        _tmp: tmp,
        dir,
        a,
        b,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for h in [&self.a, &self.b] {
            let _ = h.vs(&["destroy", "vm1"]);
        }
    }
}

/// Retry `f` until it returns `Some`, for up to `within`.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Short enough for the tests, long enough that a loaded CI machine does not fence by accident.
const TTL: u64 = 5;

#[test]
fn a_domain_on_host_a_keeps_host_b_out_and_refusals_name_host_a() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let s = setup(&cluster.url("/e2e1", TTL));
    s.a.ok(&["start", "vm1"]);
    // Longer than the TTL: the keeper renews A's leases.
    std::thread::sleep(Duration::from_secs(TTL + 1));
    let e = s.b.fails(&["start", "vm1"]);
    assert!(
        e.contains("in use by domain \"vm1\" on host \"hostA\" (pid "),
        "{e}"
    );
    let e =
        s.b.fails(&["vol-snapshot-create", "sys", "snap1", "--pool", "p"]);
    assert!(e.contains("domain \"vm1\" on host \"hostA\""), "{e}");
    let locks =
        s.b.ok(&["image", "locks", s.dir.join("pool/sys").to_str().unwrap()]);
    assert!(
        locks.contains("holder: exclusive domain \"vm1\" on host \"hostA\""),
        "{locks}"
    );
    let info = s.b.ok(&["vol-info", "sys", "--pool", "p"]);
    assert!(
        info.contains("Held by:        exclusive domain \"vm1\" on host \"hostA\""),
        "{info}"
    );
    // A's own volume operation is refused too (the domain holds it), also naming host A.
    let e =
        s.a.fails(&["vol-snapshot-create", "sys", "snap1", "--pool", "p"]);
    assert!(e.contains("on host \"hostA\""), "{e}");
    // Reading the header needs no lease.
    s.b.ok(&["image", "info", s.dir.join("pool/sys").to_str().unwrap()]);
    // Once A's domain is destroyed, B can do both.
    s.a.ok(&["destroy", "vm1"]);
    s.b.ok(&["vol-snapshot-create", "sys", "snap1", "--pool", "p"]);
    s.b.ok(&["start", "vm1"]);
    let e = s.a.fails(&["start", "vm1"]);
    assert!(e.contains("on host \"hostB\""), "{e}");
}

#[test]
fn kill_9_of_host_a_s_qemu_lets_host_b_start_within_the_ttl() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let s = setup(&cluster.url("/e2e2", TTL));
    s.a.ok(&["start", "vm1"]);
    let pid = s.a.qemu_pid("vm1");
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    let started = eventually(Duration::from_secs(TTL + 2), || {
        s.b.vs(&["start", "vm1"]).status.success().then_some(())
    });
    let took = t.elapsed();
    assert!(
        started.is_some(),
        "B could not start vm1 within the TTL + 2 s"
    );
    eprintln!("B started {took:?} after A's QEMU was killed (TTL {TTL} s)");
    assert!(took < Duration::from_secs(TTL + 1), "took {took:?}");
}

#[test]
fn host_a_s_leases_survive_the_etcd_leader_being_killed() {
    let mut cluster = testbed::EtcdCluster::start(3).unwrap();
    // A keeper fences at half the TTL without a renewal; an election takes about a second
    // here (election timeout 1 s), more on a loaded machine, so the TTL must leave room for
    // it: the default, 10 s.
    const TTL: u64 = 10;
    let s = setup(&cluster.url("/e2e3", TTL));
    s.a.ok(&["start", "vm1"]);
    let leader = cluster.leader().unwrap();
    cluster.kill(leader);
    // Longer than the TTL.
    let end = Instant::now() + Duration::from_secs(TTL + 2);
    while Instant::now() < end {
        let o = s.b.vs(&["start", "vm1"]);
        assert!(
            !o.status.success(),
            "B started vm1 while A runs it; A's keeper: {}",
            s.a.keeper_log("vm1")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let e = s.b.fails(&["start", "vm1"]);
    assert!(
        e.contains("on host \"hostA\""),
        "{e}; A's keeper: {}",
        s.a.keeper_log("vm1")
    );
    assert_eq!(s.a.state_of("vm1"), "running (booted)");
}

#[test]
fn a_host_cut_off_from_etcd_fences_its_domain_and_commits_nothing_after() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let s = setup(&cluster.url("/e2e4", TTL));
    s.a.ok(&["start", "vm1"]);
    s.a.ok(&["snapshot-create-as", "vm1", "s1", "--disk-only"]);
    std::thread::sleep(Duration::from_millis(500));
    cluster.stop_all();
    let t = Instant::now();
    let fenced = eventually(Duration::from_secs(TTL + 2), || {
        s.a.state_of("vm1").contains("fenced").then(|| t.elapsed())
    });
    cluster.cont_all();
    let fenced = fenced.expect("A's domain was not fenced");
    eprintln!("fenced {fenced:?} after every etcd member was stopped (TTL {TTL} s)");
    assert!(fenced < Duration::from_secs(TTL), "fenced after {fenced:?}");
    // QEMU itself says so: paused, its nodes inactive.
    assert_eq!(s.a.state_of("vm1"), "paused (fenced: cluster leases lost)");
    // B takes over once the members are back and A's leases are gone.
    let took = eventually(Duration::from_secs(4 * TTL), || {
        s.b.vs(&["start", "vm1"]).status.success().then_some(())
    });
    assert!(took.is_some(), "B never took over");
    // A commits nothing under its old tokens, and nothing on disk changes.
    let pool = s.dir.join("pool");
    let before = files(&pool);
    let meta = s.a.ok(&["snapshot-list", "vm1", "--name"]);
    let e =
        s.a.fails(&["snapshot-create-as", "vm1", "s2", "--disk-only"]);
    assert!(e.contains("fenced"), "{e}");
    let e = s.a.fails(&["snapshot-delete", "vm1", "s1"]);
    assert!(e.contains("fenced"), "{e}");
    assert_eq!(files(&pool), before, "the pool's files changed");
    assert_eq!(s.a.ok(&["snapshot-list", "vm1", "--name"]), meta);
    // Resuming needs the leases, which B holds now: refused, naming host B.
    let e = s.a.fails(&["resume", "vm1"]);
    assert!(e.contains("on host \"hostB\""), "{e}");
    assert_eq!(s.a.state_of("vm1"), "paused (fenced: cluster leases lost)");
    // Once B lets go, A can take its leases again and run on.
    s.b.ok(&["destroy", "vm1"]);
    s.a.ok(&["resume", "vm1"]);
    assert_eq!(s.a.state_of("vm1"), "running (booted)");
}

#[test]
fn without_etcd_commands_that_need_a_lease_fail_in_bounded_time_naming_the_endpoints() {
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        })
        .collect();
    let eps: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!("etcd://{}/x?ttl={TTL}", eps.join(","));
    // The setup itself creates a volume: that needs a lease too, so define with a local
    // lockspace and then switch.
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let a = Host {
        state: dir.join("state"),
        name: "hostA",
        url: url.clone(),
    };
    let img = dir.join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    std::fs::write(
        dir.join("vm.xml"),
        format!(
            "<domain type='kvm'><name>vm1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <controller type='usb' model='none'/><memballoon model='none'/></devices>\
             </domain>",
            img.display()
        ),
    )
    .unwrap();
    a.ok(&["define", dir.join("vm.xml").to_str().unwrap()]);
    for args in [
        vec!["start", "vm1"],
        vec!["image", "snapshot", "create", img.to_str().unwrap(), "s1"],
    ] {
        let t = Instant::now();
        let e = a.fails(&args);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(6), "{args:?} took {took:?}");
        for ep in &eps {
            assert!(e.contains(ep), "{args:?}: {e}");
        }
        assert!(e.contains("unreachable"), "{e}");
    }
    assert!(a.state_of("vm1").starts_with("shut off"));
    // Reading an image's header needs no lease.
    a.ok(&["image", "info", img.to_str().unwrap()]);
}

#[test]
fn two_state_directories_sharing_a_lockspace_directory_exclude_each_other() {
    // `--lockspace DIR`: the local backend in a directory both use (an NFS lockspace, say).
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let shared = dir.join("locks");
    let s = setup(shared.to_str().unwrap());
    s.a.ok(&["start", "vm1"]);
    let e = s.b.fails(&["start", "vm1"]);
    assert!(e.contains("in use by domain \"vm1\""), "{e}");
    let e =
        s.b.fails(&["vol-snapshot-create", "sys", "snap1", "--pool", "p"]);
    assert!(e.contains("in use by domain \"vm1\""), "{e}");
    assert!(shared.is_dir());
    s.a.ok(&["destroy", "vm1"]);
    s.b.ok(&["start", "vm1"]);
}

#[test]
fn a_keeper_killed_outright_is_replaced_by_the_next_command() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let s = setup(&cluster.url("/e2e6", TTL));
    s.a.ok(&["start", "vm1"]);
    let pidfile = s.a.state.join("run/vm1/keeper.pid");
    let old: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the keeper this test's domain start spawned.
    unsafe { libc::kill(old, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    // Any command on the domain starts a new keeper...
    assert_eq!(s.a.state_of("vm1"), "running (booted)");
    let new: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(new, old);
    // ... which keeps the leases past the TTL.
    std::thread::sleep(Duration::from_secs(TTL + 1));
    let e = s.b.fails(&["start", "vm1"]);
    assert!(
        e.contains("on host \"hostA\""),
        "{e}; A's keeper: {}",
        s.a.keeper_log("vm1")
    );
}
