//! Reverts proven from inside the test guest (real writes through the guest, read back
//! through its agent's guest-exec): write A, snapshot, write B, revert, read A. For an
//! internal snapshot with RAM reverted in place (the same QEMU; a tmpfs file, which lives in
//! RAM only, is back too), an external disk-only snapshot reverted with `--running` (a new
//! overlay of the snapshot's image re-pointed in the same QEMU, the guest reset), and an
//! external snapshot with a RAM file (a QEMU started with `-incoming defer` loads it), and a
//! storage snapshot of a btrfs pool volume (`snapshot='storage'`: the volume reverted by its
//! backend, the guest booted afresh on it; with a RAM file, the RAM loaded into a QEMU
//! started on the reverted volume).
//!
//! The guest is a defined TCG domain (a revert may start it again from its definition; the
//! guest's kernel does not boot under this host's KVM CPU model) with an ext4 qcow2 data disk
//! at /dev/vda, mounted at /mnt by the guest's /init.

mod common;
use common::{name, Guest};
use std::path::Path;
use virt_snap::domain::DomainState;
use virt_snap::snapshot::{
    CaptureRequest, DiskChoice, DiskRequest, Flags, MemoryChoice, RevertFlags, RevertKind,
};
use virt_snap::Connection;

#[test]
fn internal_with_ram_in_place_brings_back_disk_and_ram() {
    let g = Guest::define("rvg-int");
    g.write("A");
    g.snapshot(CaptureRequest::new(name("a")));
    g.write("B");
    assert_eq!((g.disk(), g.ram()), ("B".into(), "B".into()));
    let pid = g.dom.pid().unwrap();
    let r = g.revert("a", RevertFlags::default());
    assert_eq!(r.kind, RevertKind::InternalInPlace);
    assert_eq!(r.state, DomainState::Running);
    assert_eq!(g.dom.pid().unwrap(), pid, "the same QEMU");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the disk as it was at the snapshot");
    assert_eq!(g.ram(), "A", "the RAM as it was at the snapshot");
    // And again after more writes: the snapshot stays usable.
    g.write("C");
    g.revert("a", RevertFlags::default());
    g.wait_agent();
    assert_eq!((g.disk(), g.ram()), ("A".into(), "A".into()));
}

#[test]
fn external_disk_only_running_is_repointed_in_place_on_a_new_overlay() {
    let g = Guest::define("rvg-ext");
    g.write("A");
    let mut req = CaptureRequest::new(name("e1"));
    req.flags = Flags {
        disk_only: true,
        ..Default::default()
    };
    g.snapshot(req);
    g.write("B");
    assert_eq!(g.disk(), "B");
    let pid = g.dom.pid().unwrap();
    let r = g.revert(
        "e1",
        RevertFlags {
            running: true,
            ..Default::default()
        },
    );
    assert_eq!(r.kind, RevertKind::ExternalInPlace);
    assert_eq!(r.state, DomainState::Running);
    assert_eq!(g.dom.pid().unwrap(), pid, "the same QEMU");
    let blocks = g.rt.block_on(g.dom.block_devices()).unwrap();
    assert_eq!(blocks[0].source, g.file("data.e1.r1").display().to_string());
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the disk as it was at the snapshot");
    assert_eq!(
        g.ram(),
        "none",
        "a disk-only revert resets the guest: it boots afresh"
    );
    // Again: the snapshot stays usable, and the guest's writes go to the newest overlay.
    g.write("C");
    g.revert(
        "e1",
        RevertFlags {
            running: true,
            ..Default::default()
        },
    );
    g.wait_agent();
    assert_eq!(g.disk(), "A");
    assert_eq!(g.dom.pid().unwrap(), pid);
    // The snapshot's own overlay keeps B (nothing is deleted).
    assert!(Path::new(&g.file("data.e1")).exists());
}

#[test]
fn external_with_ram_loads_the_ram_file_into_a_new_qemu() {
    let g = Guest::define("rvg-mem");
    g.write("A");
    let mem = g.file("rvg-mem.m1");
    let mut req = CaptureRequest::new(name("m1"));
    req.memory = MemoryChoice::External {
        file: mem.display().to_string(),
    };
    g.snapshot(req);
    g.write("B");
    let pid = g.dom.pid().unwrap();
    let r = g.revert("m1", RevertFlags::default());
    assert_eq!(r.kind, RevertKind::ExternalMemory);
    assert_eq!(r.state, DomainState::Running);
    assert_ne!(g.dom.pid().unwrap(), pid, "a new QEMU");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the disk as it was at the snapshot");
    assert_eq!(g.ram(), "A", "the RAM as it was at the snapshot");
}

#[test]
fn a_btrfs_storage_snapshot_reverts_the_volume_and_boots_on_it() {
    let g = Guest::define_on("rvg-btrfs", true);
    g.write("A");
    let mut req = CaptureRequest::new(name("b1"));
    req.flags.disk_only = true;
    req.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    g.snapshot(req);
    g.write("B");
    assert_eq!(g.disk(), "B");
    let pid = g.dom.pid().unwrap();
    let running = RevertFlags {
        running: true,
        ..Default::default()
    };
    let r = g.revert("b1", running);
    assert_eq!(r.kind, RevertKind::Storage);
    assert_eq!(r.state, DomainState::Running);
    assert_ne!(g.dom.pid().unwrap(), pid, "stopped and started again");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the volume as it was at the snapshot");
    assert_eq!(g.ram(), "none", "a fresh boot");
    // Again after more writes: the volume snapshot stays usable, the undo snapshots go.
    g.write("C");
    g.revert("b1", running);
    g.wait_agent();
    assert_eq!(g.disk(), "A");
    let conn = Connection::open(g.file("state")).unwrap();
    let snaps =
        g.rt.block_on(conn.pool("gp").unwrap().volume("data").snapshots())
            .unwrap();
    let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["b1"]);
}

#[test]
fn a_btrfs_storage_snapshot_with_ram_brings_back_volume_and_ram() {
    let g = Guest::define_on("rvg-btrfsm", true);
    g.write("A");
    let mut req = CaptureRequest::new(name("bm1"));
    req.memory = MemoryChoice::External {
        file: g.file("rvg-btrfsm.bm1").display().to_string(),
    };
    req.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    g.snapshot(req);
    g.write("B");
    assert_eq!((g.disk(), g.ram()), ("B".into(), "B".into()));
    let pid = g.dom.pid().unwrap();
    let r = g.revert("bm1", RevertFlags::default());
    assert_eq!(r.kind, RevertKind::StorageMemory);
    assert_eq!(r.state, DomainState::Running, "the snapshot's state");
    assert_ne!(g.dom.pid().unwrap(), pid, "a new QEMU, its RAM loaded");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the volume as it was at the snapshot");
    assert_eq!(g.ram(), "A", "the RAM as it was at the snapshot");
    // Again after more writes: the volume snapshot and the RAM file stay usable.
    g.write("C");
    g.revert("bm1", RevertFlags::default());
    g.wait_agent();
    assert_eq!((g.disk(), g.ram()), ("A".into(), "A".into()));
    let conn = Connection::open(g.file("state")).unwrap();
    let snaps =
        g.rt.block_on(conn.pool("gp").unwrap().volume("data").snapshots())
            .unwrap();
    let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["bm1"], "the undo snapshots are gone");
}
