//! The etcd lease backend against a real 3-member etcd 3.4 cluster on loopback.

use locking::etcd::{keep, Kept};
use locking::{ErrorKind, EtcdBackend, EtcdConfig, LockManager, Purpose, Resource, UuidKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn lv(name: &str) -> Resource {
    Resource::Uuid {
        kind: UuidKind::LvmLv,
        uuid: format!("uuid-{name}"),
        display: format!("vg0/{name}"),
        image: None,
    }
}

fn manager(url: &str, host: &str) -> LockManager {
    let cfg = EtcdConfig::parse(url, host).unwrap();
    LockManager::with_backend(Arc::new(EtcdBackend::new(cfg).unwrap()))
}

fn op(name: &str, vols: &[&str]) -> Purpose {
    Purpose::VolumeOp {
        op: name.into(),
        volumes: vols.iter().map(|v| lv(v)).collect(),
    }
}

fn start(domain: &str, rw: &[&str], ro: &[&str]) -> Purpose {
    Purpose::VmStart {
        domain: domain.into(),
        disks: rw
            .iter()
            .map(|v| locking::DiskUse::writable(lv(v)))
            .chain(ro.iter().map(|v| locking::DiskUse::read_only(lv(v))))
            .collect(),
    }
}

#[test]
fn leases_exclude_across_hosts_name_the_holder_and_carry_growing_tokens() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let url = cluster.url("/t1", 5);
    let (a, b) = (manager(&url, "hostA"), manager(&url, "hostB"));

    let vm = a.acquire(&start("vm1", &["root"], &["base"])).unwrap();
    let t1: Vec<u64> = vm.fences().iter().map(|f| f.token).collect();
    assert_eq!(t1.len(), 2);
    // Exclusive from the other host: refused, naming host A.
    let e = b.acquire(&op("snapshot create", &["root"])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let msg = e.to_string();
    assert!(
        msg.starts_with("volume vg0/root in use by domain \"vm1\" on host \"hostA\" (pid "),
        "{msg}"
    );
    // All or nothing: B asked for two volumes, one free: it kept neither.
    let e = b.acquire(&op("x", &["free", "root"])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(a.holders(&lv("free")).unwrap().is_empty());
    // Shared with shared is fine; exclusive against shared is not.
    let vm2 = b.acquire(&start("vm2", &[], &["base"])).unwrap();
    assert_eq!(a.holders(&lv("base")).unwrap().len(), 2);
    let e = b.acquire(&op("rebase", &["base"])).unwrap_err();
    assert_eq!(e.holders().len(), 2, "{e}");
    // Dropping releases at once (revoked, not left to expire).
    drop(vm);
    drop(vm2);
    let again = b.acquire(&op("snapshot create", &["root"])).unwrap();
    let t2 = again.fences()[0].token;
    assert!(
        t2 > t1.iter().copied().max().unwrap(),
        "tokens grow: {t1:?} then {t2}"
    );
    again.commit("snapshot create").unwrap();
    let commit = cluster
        .ctl(&["get", "--print-value-only", "--prefix", "/t1/commits/"])
        .unwrap();
    assert!(commit.contains("\"host\":\"hostB\""), "{commit}");
    assert!(commit.contains(&format!("\"token\":{t2}")), "{commit}");
}

#[test]
fn a_lost_lease_cannot_commit_and_the_next_holder_can() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let url = cluster.url("/t2", 3);
    let (a, b) = (manager(&url, "hostA"), manager(&url, "hostB"));
    let held = a.acquire(&op("revert", &["root"])).unwrap();
    held.commit("first commit").unwrap();
    // The lease disappears behind A's back (an operator, or expiry while A was cut off).
    let out = cluster.ctl(&["lease", "list"]).unwrap();
    for id in out.lines().skip(1).map(str::trim).filter(|l| !l.is_empty()) {
        cluster.ctl(&["lease", "revoke", id]).unwrap();
    }
    let b_held = b.acquire(&op("snapshot", &["root"])).unwrap();
    let e = held.commit("late commit").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseLost);
    assert!(
        e.to_string()
            .contains("now held by operation \"snapshot\" on host \"hostB\""),
        "{e}"
    );
    b_held.commit("b's commit").unwrap();
    let last = cluster
        .ctl(&["get", "--print-value-only", "--prefix", "/t2/commits/"])
        .unwrap();
    assert!(last.contains("b's commit"), "{last}");
}

#[test]
fn a_lease_survives_the_leader_being_killed() {
    let mut cluster = testbed::EtcdCluster::start(3).unwrap();
    let url = cluster.url("/t3", 3);
    let (a, b) = (manager(&url, "hostA"), manager(&url, "hostB"));
    let held = a.acquire(&op("long operation", &["root"])).unwrap();
    let leader = cluster.leader().unwrap();
    cluster.kill(leader);
    // Longer than the TTL: A's process keeps renewing through the remaining quorum.
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Err(e) = b.acquire(&op("x", &["root"])) {
            assert!(
                matches!(e.kind(), ErrorKind::Conflict | ErrorKind::Unavailable),
                "{e}"
            );
        } else {
            panic!("B got the lease while A holds it");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let e = b.acquire(&op("x", &["root"])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("on host \"hostA\""), "{e}");
    held.commit("after the election").unwrap();
}

#[test]
fn an_unreachable_cluster_fails_in_bounded_time_naming_the_endpoints() {
    // Ports nobody listens on.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        })
        .collect();
    let url = format!("etcd://127.0.0.1:{},127.0.0.1:{}/x", ports[0], ports[1]);
    let m = manager(&url, "hostA");
    let t = Instant::now();
    let e = m.acquire(&op("snapshot", &["root"])).unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{}", ports[0]))
            && msg.contains(&format!("127.0.0.1:{}", ports[1])),
        "{msg}"
    );
    // Inspection needs no lease.
    m.acquire(&Purpose::Inspect).unwrap();
}

#[test]
fn a_keeper_renews_until_told_to_stop_then_revokes_and_asks_to_fence_when_cut_off() {
    let cluster = testbed::EtcdCluster::start(3).unwrap();
    let url = cluster.url("/t5", 3);
    let (a, b) = (manager(&url, "hostA"), manager(&url, "hostB"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Handed over: this process stops renewing; the keeper renews for longer than the TTL.
    let held = a.acquire(&start("vm1", &["root"], &[])).unwrap();
    let tickets = held.tickets();
    assert_eq!(tickets.len(), 1);
    held.hand_over(4242).unwrap();
    let kept = rt.block_on(async {
        keep(
            &tickets,
            Vec::new,
            tokio::time::sleep(Duration::from_secs(5)),
        )
        .await
    });
    assert_eq!(kept, Kept::Released);
    // Released on "QEMU exit": B can take it at once.
    b.acquire(&op("x", &["root"])).unwrap();

    // Cut off (every member stopped): the keeper asks to fence before the TTL has run out.
    let held = a.acquire(&start("vm1", &["root"], &[])).unwrap();
    let tickets = held.tickets();
    held.hand_over(4242).unwrap();
    let t = Instant::now();
    let kept = rt.block_on(async {
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.stop_all();
            std::future::pending::<()>().await
        };
        keep(&tickets, Vec::new, stopper).await
    });
    let took = t.elapsed();
    cluster.cont_all();
    assert!(matches!(kept, Kept::MustFence { .. }), "{kept:?}");
    assert!(
        took < Duration::from_millis(500) + Duration::from_secs(3),
        "fenced after {took:?}, TTL 3 s"
    );
    // Once the members are back and the lease has expired, B takes over.
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match b.acquire(&op("take over", &["root"])) {
            Ok(_) => break,
            Err(e) if Instant::now() < end => {
                assert!(
                    matches!(e.kind(), ErrorKind::Conflict | ErrorKind::Unavailable),
                    "{e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("B never took over: {e}"),
        }
    }
}
