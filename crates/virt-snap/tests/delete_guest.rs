//! Deletes proven from inside the test guest (real writes through the guest, read back
//! through its agent's guest-exec): write A, snapshot s1, write B, snapshot s2, write C, then
//! delete the snapshots while the guest runs (block-commit in its QEMU) and read C back from
//! inside the guest, the disk back on its own file; and a merge below the top proven by
//! reverting to the snapshot above it afterwards (its data, B, read back in the guest).
//!
//! The guest is a defined TCG domain with an ext4 qcow2 data disk at /dev/vda, mounted at
//! /mnt by the guest's /init (as in revert_guest.rs).

mod common;
use common::{name, Guest};
use virt_snap::snapshot::{CaptureRequest, DeleteFlags, DeleteKind, Flags, RevertFlags};

impl Guest {
    fn disk_only(&self, n: &str) {
        let mut req = CaptureRequest::new(name(n));
        req.flags = Flags {
            disk_only: true,
            ..Default::default()
        };
        self.snapshot(req);
    }

    fn delete(&self, n: &str) {
        let r = self
            .rt
            .block_on(self.dom.snapshot_delete(n, DeleteFlags::default()))
            .expect("the delete");
        assert_eq!(r.kind, DeleteKind::External);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        eprintln!("delete {n}: {:?}", r.elapsed);
    }

    fn source(&self) -> String {
        self.rt.block_on(self.dom.block_devices()).unwrap()[0]
            .source
            .clone()
    }

    /// A, s1, B, s2, C.
    fn three_writes(&self) {
        self.write("A");
        self.disk_only("s1");
        self.write("B");
        self.disk_only("s2");
        self.write("C");
        assert_eq!(self.source(), self.file("data.s2").display().to_string());
    }
}

#[test]
fn deleting_the_snapshots_live_keeps_the_current_data_on_the_own_file() {
    let g = Guest::define("dlg-live");
    g.three_writes();
    let pid = g.dom.pid().unwrap();
    g.delete("s2");
    assert_eq!(g.source(), g.file("data.s1").display().to_string());
    assert_eq!(g.disk(), "C", "read back in the guest after the pivot");
    g.delete("s1");
    assert_eq!(g.dom.pid().unwrap(), pid, "the same QEMU all along");
    assert_eq!(g.source(), g.file("data.qcow2").display().to_string());
    assert!(!g.file("data.s1").exists() && !g.file("data.s2").exists());
    // The guest goes on reading and writing its disk.
    assert_eq!(g.disk(), "C");
    assert_eq!(g.ram(), "C", "the guest was never restarted");
    g.write("D");
    assert_eq!(g.disk(), "D");
}

#[test]
fn a_merge_below_the_top_keeps_the_snapshot_above_it_whole() {
    let g = Guest::define("dlg-mid");
    g.three_writes();
    g.delete("s1");
    assert_eq!(g.source(), g.file("data.s2").display().to_string());
    assert!(!g.file("data.s1").exists());
    assert_eq!(g.disk(), "C");
    // s2's data is in data.qcow2 now: reverting to it brings B back.
    g.revert(
        "s2",
        RevertFlags {
            running: true,
            ..Default::default()
        },
    );
    g.wait_agent();
    assert_eq!(g.disk(), "B", "s2 as it was taken");
}
