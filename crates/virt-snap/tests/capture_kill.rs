//! virt-snap killed mid-capture, or a transaction QEMU refuses, (a failpoint aborts the process right after a step's effect,
//! in a child process) against real QEMU 10.0.2: the next command on the domain recovers it:
//! the VM runs, no overlay file or block node is left, nothing is recorded.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use virt_snap::domain::DomainState;
use virt_snap::snapshot::{CaptureRequest, MemoryChoice, SnapshotName};
use virt_snap::Connection;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The child: takes snapshot `k1` of domain `CAP_DOMAIN` in `CAP_STATE` (the failpoint in
/// the environment aborts it). Does nothing unless run by [`killed_at`] (no `CAP_STATE`).
#[test]
fn child_capture() {
    let Ok(state) = std::env::var("CAP_STATE") else {
        return;
    };
    // The failpoint reports itself through tracing, on stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let conn = Connection::open(state).unwrap();
    let dom = conn.domain(&std::env::var("CAP_DOMAIN").unwrap()).unwrap();
    let mut r = CaptureRequest::new(SnapshotName::new("k1").unwrap());
    match std::env::var("CAP_MEMORY") {
        Ok(f) => {
            r.memory = MemoryChoice::External { file: f };
            r.flags.live = true;
        }
        Err(_) => r.flags.disk_only = true,
    }
    match rt().block_on(dom.snapshot_create(r)) {
        Err(e) => eprintln!("capture failed: {e}: {:?}", std::error::Error::source(&e)),
        Ok(r) => panic!("the failpoint did not fire: {r:?}"),
    }
}

fn killed_at(failpoint: &str, memory: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut disks = String::new();
    for t in ["vda", "vdb"] {
        let p = dir.join(format!("{t}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "32M"])
            .status()
            .unwrap();
        assert!(st.success());
        disks += &format!(
            "<disk type='file'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='{t}' bus='virtio'/></disk>",
            p.display()
        );
    }
    let name = "capkill";
    let xml = format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{disks}\
         <controller type='usb' model='none'/></devices></domain>"
    );
    let state = dir.join("state");
    let conn = Connection::open(&state).unwrap();
    let rt = rt();
    rt.block_on(conn.define(&xml)).unwrap();
    let dom = rt.block_on(conn.start_defined(name, false)).unwrap();
    let pid = dom.pid().unwrap().unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the QEMU this test started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _k = Kill(pid);
    let qmp = |cmd: &str| -> Value {
        let r = rt
            .block_on(dom.monitor_command(&format!("{{\"execute\":\"{cmd}\"}}")))
            .unwrap();
        r["return"].clone()
    };
    let nodes = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str().map(String::from))
            .collect()
    };
    let before = nodes(qmp("query-named-block-nodes"));

    let mem = dir.join("k1.mem");
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "child_capture", "--nocapture"])
        .env("CAP_STATE", &state)
        .env("CAP_DOMAIN", name)
        .env("VIRT_SNAP_FAILPOINT", format!("capture:{failpoint}"));
    if memory {
        child.env("CAP_MEMORY", &mem);
    }
    let out = child.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if failpoint == "transaction-bad-node" {
        assert!(
            out.status.success() && err.contains("capture failed") && err.contains("transaction"),
            "QEMU refused the transaction: {err}"
        );
    } else {
        assert!(
            err.contains(&format!("failpoint capture:{failpoint}")),
            "the child died at the failpoint: {err}"
        );
    }

    // The next command (domstate) recovers first.
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(st.state, DomainState::Running, "resumed");
    assert_eq!(
        nodes(qmp("query-named-block-nodes")),
        before,
        "no node left"
    );
    let blocks = qmp("query-block").to_string();
    assert!(
        blocks.contains("vda.qcow2") && !blocks.contains(".k1"),
        "{blocks}"
    );
    for f in ["vda.k1", "vdb.k1", "k1.mem"] {
        let p: PathBuf = dir.join(f);
        assert!(!p.exists(), "{f} left");
    }
    assert!(!state.join("snapshots").join(name).join("k1.xml").exists());
    let caps = qmp("query-migrate-capabilities");
    let bg = caps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["capability"] == "background-snapshot")
        .unwrap();
    assert_eq!(bg["state"], false, "background-snapshot reset");
    assert!(!conn.dumpxml(name).unwrap().contains(".k1"));
}

#[test]
fn killed_after_adding_an_overlay_node() {
    killed_at("add-node", false);
}

#[test]
fn killed_after_the_transaction_before_it_is_recorded_done() {
    killed_at("transaction", false);
}

#[test]
fn killed_while_paused_for_a_live_ram_snapshot() {
    killed_at("pause", true);
}

/// Not a kill: QEMU refuses the one transaction (its last action names a node QEMU does not
/// have), so none of its actions applies; the capture undoes the overlays and nodes itself.
#[test]
fn a_transaction_qemu_refuses_changes_no_disk() {
    killed_at("transaction-bad-node", false);
}

#[test]
fn killed_after_starting_a_live_ram_save() {
    killed_at("save-memory", true);
}
