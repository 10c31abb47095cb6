//! Deletes proven from inside the test guest (real writes through the guest, read back
//! through its agent's guest-exec): write A, snapshot s1, write B, snapshot s2, write C, then
//! delete the snapshots while the guest runs (block-commit in its QEMU) and read C back from
//! inside the guest, the disk back on its own file; and a merge below the top proven by
//! reverting to the snapshot above it afterwards (its data, B, read back in the guest); a
//! tree with branches reverted and deleted around; an internal snapshot under an external one
//! deleted live.
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

impl Guest {
    /// The marker as the disk holds it now: the guest's page cache dropped first, so it is
    /// read from the disk (through whatever chain QEMU has now).
    fn disk_fresh(&self) -> String {
        self.sh("sync; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/marker")
            .trim()
            .to_string()
    }

    fn revert_running(&self, n: &str) {
        let r = self.revert(
            n,
            RevertFlags {
                running: true,
                ..Default::default()
            },
        );
        assert_eq!(r.kind, virt_snap::snapshot::RevertKind::ExternalInPlace);
        self.wait_agent();
    }

    fn delete_any(&self, n: &str) -> DeleteKind {
        let r = self
            .rt
            .block_on(self.dom.snapshot_delete(n, DeleteFlags::default()))
            .expect("the delete");
        eprintln!("delete {n}: {:?} {:?} {:?}", r.kind, r.elapsed, r.warnings);
        r.kind
    }
}

/// A tree with branches, built and taken apart while the guest runs in one QEMU: A, s1, B,
/// s2, C; back to s1 (a non-leaf), D, s3 (s1 has two children now), E; over to s2 on the
/// other branch (in place); s1 deleted (several children), then the leaf of the other branch,
/// then the current one: each step's data read back in the guest from the disk, the disk back
/// on its own file at the end holding what the guest wrote last.
#[test]
fn a_tree_with_branches_is_reverted_and_deleted_around_with_the_guest_running() {
    let g = Guest::define("dlg-tree");
    let pid = g.dom.pid().unwrap();
    g.three_writes();
    g.revert_running("s1");
    assert_eq!(g.disk_fresh(), "A", "s1, a snapshot with a child");
    g.write("D");
    g.disk_only("s3");
    g.write("E");
    g.revert_running("s2");
    assert_eq!(g.disk_fresh(), "B", "s2, on the other branch");
    // s1's data is the guest's own file, which has two overlays now (s1's, the branch s2
    // is on, and s1's revert overlay, the branch s3 is on): nothing to merge, its metadata
    // goes and its children move up.
    assert_eq!(g.delete_any("s1"), DeleteKind::Metadata);
    assert_eq!(g.disk_fresh(), "B", "after the delete of their parent");
    g.revert_running("s3");
    assert_eq!(
        g.disk_fresh(),
        "D",
        "s3 kept its data through its parent's delete"
    );
    g.write("F");
    g.delete_any("s2");
    assert_eq!(g.disk_fresh(), "F");
    g.delete_any("s3");
    assert_eq!(g.disk_fresh(), "F", "after the last delete");
    assert_eq!(g.dom.pid().unwrap(), pid, "one QEMU all along");
    assert_eq!(g.source(), g.file("data.qcow2").display().to_string());
    let left: Vec<String> = std::fs::read_dir(g.file(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("data.") && n != "data.qcow2")
        .collect();
    assert!(left.is_empty(), "overlays left: {left:?}");
}

/// Mixed kinds in the guest: an internal snapshot with RAM, then an external one on top;
/// the internal one deleted while the disk is on the external overlay (its image a backing
/// file now, reopened read-write for the job), then the external one by active commit:
/// the current data read back from the disk, the disk on its own file, no tag left.
#[test]
fn an_internal_snapshot_under_an_external_one_is_deleted_with_the_guest_running() {
    let g = Guest::define("dlg-mixed");
    g.write("A");
    g.snapshot(CaptureRequest::new(name("i1")));
    g.write("B");
    g.disk_only("e1");
    g.write("C");
    assert_eq!(g.delete_any("i1"), DeleteKind::Internal);
    assert_eq!(g.disk_fresh(), "C");
    assert_eq!(g.delete_any("e1"), DeleteKind::External);
    assert_eq!(g.disk_fresh(), "C");
    assert_eq!(g.source(), g.file("data.qcow2").display().to_string());
    let tags = std::process::Command::new("qemu-img")
        .args(["snapshot", "-U", "-l"])
        .arg(g.file("data.qcow2"))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tags.stdout).contains("i1"),
        "{}",
        String::from_utf8_lossy(&tags.stdout)
    );
}
