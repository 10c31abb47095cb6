//! Hostile input on the write side: snapshot create/apply/delete on images with random bytes
//! changed in their metadata (header, refcount table and blocks, L1 and L2 tables, snapshot
//! table) return errors or succeed, never panic, and never allocate without bound. Runs in
//! memory (no processes), so many cases are cheap.

mod write_common;
use write_common::*;

use image_formats::qcow2_write::{SnapshotEditor, SnapshotRef};
use image_formats::MemStorage;
use proptest::prelude::*;
use std::sync::OnceLock;

/// A small image with two snapshots, some data and compressed clusters, made once.
fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = qimg(
            dir.path(),
            "h.qcow2",
            "cluster_size=4096,refcount_bits=8",
            "1M",
        );
        write_pattern(&p, 1, 0, 64 << 10);
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -c -P 9 512k 16k", s(&p)],
        );
        ok("qemu-img", &["snapshot", "-c", "a", s(&p)]);
        write_pattern(&p, 2, 32 << 10, 64 << 10);
        ok("qemu-img", &["snapshot", "-c", "b", s(&p)]);
        std::fs::read(&p).unwrap()
    })
}

fn run_all(bytes: Vec<u8>) {
    for op in 0..3 {
        let mem = MemStorage::from_bytes(bytes.clone());
        if let Ok(mut ed) = SnapshotEditor::open(&mem) {
            let _ = match op {
                0 => ed.create(b"x", (1, 2)).map(drop),
                1 => ed.apply(&SnapshotRef::IdOrName(b"1".to_vec())).map(drop),
                _ => ed.delete(&SnapshotRef::Name(b"b".to_vec())).map(drop),
            };
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, ..ProptestConfig::default() })]
    #[test]
    fn corrupted_metadata_never_panics(
        flips in prop::collection::vec((0usize..1 << 20, any::<u8>()), 1..8),
        hot in prop::collection::vec((0usize..512, any::<u8>()), 0..4),
    ) {
        let mut b = base().clone();
        // Anywhere in the file...
        for (off, v) in flips {
            let i = off % b.len();
            b[i] = v;
        }
        // ...and in the header's table pointers and counts.
        for (off, v) in hot {
            b[off % 112] = v;
        }
        run_all(b);
    }

    #[test]
    fn metadata_cluster_overwritten_never_panics(cluster in 0usize..64, fill in any::<u8>()) {
        let mut b = base().clone();
        let start = (cluster * 4096).min(b.len());
        let end = (start + 4096).min(b.len());
        b[start..end].fill(fill);
        run_all(b);
    }
}
