//! Crash safety by fault injection: each operation (snapshot create, apply, delete) runs on
//! an in-memory copy behind a `FaultyStorage` that fails, or silently drops, every write and
//! flush after the k-th; for every k the resulting image must:
//! - never have a refcount too low or any other corruption in `qemu-img check`, except a
//!   stale COPIED flag (see below), and after `qemu-img check -r all` be fully clean;
//! - hold the snapshot wholly or not at all, every listed snapshot with exactly its data, and
//!   the active state either as before or as after the operation.
//!
//! COPIED flags and refcounts live in different clusters, so between the refcount write and
//! the L2 table write there is a window (QEMU has the same one) where `qemu-img check` counts
//! a flag that disagrees with the refcount as a corruption. Both directions are harmless for
//! the data: a clear flag only makes QEMU copy on write, and a set flag with refcount 2 is
//! only possible before the snapshot is committed (or after it is gone). The test allows
//! exactly those lines and requires `check -r all` to repair them.

mod write_common;
use write_common::*;

use image_formats::fault::{FaultMode, FaultyStorage};
use image_formats::qcow2_write::{SnapshotEditor, SnapshotRef};
use image_formats::MemStorage;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
enum Op {
    Create,
    Apply,
    Delete,
}

fn run_op(storage: &FaultyStorage<&MemStorage>, op: Op) -> image_formats::Result<()> {
    let mut ed = SnapshotEditor::open(storage)?;
    match op {
        Op::Create => ed.create(b"new", now()).map(drop),
        Op::Apply => ed.apply(&SnapshotRef::IdOrName(b"1".to_vec())).map(drop),
        Op::Delete => ed.delete(&SnapshotRef::Name(b"one".to_vec())).map(drop),
    }
}

/// Everything the image holds: snapshot (id, name) -> data, and the active data.
type Snapshots = BTreeMap<(String, String), Vec<u8>>;

fn state(p: &Path) -> (Snapshots, Vec<u8>) {
    let snaps = snapshot_list(p)
        .into_iter()
        .map(|(id, name)| {
            let d = raw(p, Some(&id));
            ((id, name), d)
        })
        .collect();
    (snaps, raw(p, None))
}

fn faults_on(opts: &str) {
    faults_with(opts, false, true)
}

/// `resize`: the image grows (to 64 MiB) after snapshot "one", so applying it also shrinks the image
/// (a new active L1 and one header write for size and L1).
/// `two`: a second snapshot "two" shares the data; without it, deleting "one" drops shared
/// refcounts to 1 (the delete's COPIED window).
fn faults_with(opts: &str, resize: bool, two: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "base.qcow2", opts, "2M");
    write_pattern(&p, 1, 0, 512 << 10);
    ok("qemu-img", &["snapshot", "-c", "one", s(&p)]);
    if resize {
        ok("qemu-img", &["resize", "-q", s(&p), "64M"]);
    }
    write_pattern(&p, 2, 256 << 10, 512 << 10);
    if two {
        ok("qemu-img", &["snapshot", "-c", "two", s(&p)]);
    }
    write_pattern(&p, 3, 1 << 20, 256 << 10);
    let base = std::fs::read(&p).unwrap();
    let before = state(&p);
    let work = dir.path().join("work.qcow2");

    for op in [Op::Create, Op::Apply, Op::Delete] {
        // The complete operation: how many writes and flushes, and the state after.
        let mem = MemStorage::from_bytes(base.clone());
        let full = FaultyStorage::new(&mem, u64::MAX, FaultMode::Fail);
        run_op(&full, op).unwrap();
        let events = full.events();
        std::fs::write(&work, mem.to_bytes()).unwrap();
        assert_clean(&work);
        let after = state(&work);
        assert!(events >= 3, "{op:?}: only {events} writes/flushes");

        for mode in [FaultMode::Fail, FaultMode::Stop] {
            let mut stale_copied = 0;
            for k in 0..events {
                let mem = MemStorage::from_bytes(base.clone());
                let st = FaultyStorage::new(&mem, k, mode);
                let res = run_op(&st, op);
                assert_eq!(
                    res.is_err(),
                    mode == FaultMode::Fail,
                    "{op:?} {mode:?} k={k}"
                );
                std::fs::write(&work, mem.to_bytes()).unwrap();
                let ctx = format!("{opts:?} {op:?} {mode:?} after {k} of {events} writes");
                let errors = check_errors(&work);
                assert!(
                    errors.iter().all(|l| l.contains("OFLAG_COPIED")),
                    "{ctx}: {errors:#?}"
                );
                let got = state(&work);
                assert!(
                    got.0 == before.0 || got.0 == after.0,
                    "{ctx}: snapshots are neither before nor after: {:?}",
                    got.0.keys().collect::<Vec<_>>()
                );
                assert!(
                    got.1 == before.1 || got.1 == after.1,
                    "{ctx}: active data torn"
                );
                if !errors.is_empty() {
                    stale_copied += 1;
                    ok("qemu-img", &["check", "-q", "-r", "all", s(&work)]);
                    assert_clean(&work);
                    assert_eq!(state(&work), got, "{ctx}: repair changed the data");
                }
            }
            eprintln!(
                "{opts}: {op:?} {mode:?}: {events} crash points, {stale_copied} with only a stale COPIED flag"
            );
        }
    }
}

#[test]
fn every_crash_point_is_safe_v3() {
    faults_on("cluster_size=65536");
}

#[test]
fn every_crash_point_is_safe_when_apply_resizes() {
    faults_with("", true, true);
}

#[test]
fn every_crash_point_is_safe_with_one_snapshot() {
    faults_with("refcount_bits=4", false, false);
}

#[test]
fn every_crash_point_is_safe_small_clusters_8bit_v2() {
    faults_on("compat=0.10,cluster_size=4096");
}

/// A write (offset, bytes), or `None` for a flush.
type Event = Option<(u64, Vec<u8>)>;

/// Records every write and flush, so that crash states can be rebuilt afterwards.
#[derive(Debug, Default)]
struct Recorder {
    inner: MemStorage,
    log: std::sync::Mutex<Vec<Event>>,
}

impl image_formats::Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.log.lock().unwrap().push(Some((offset, buf.to_vec())));
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().push(None);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

fn apply_writes(mut img: Vec<u8>, writes: &[&(u64, Vec<u8>)]) -> Vec<u8> {
    for (off, data) in writes {
        let (o, e) = (*off as usize, *off as usize + data.len());
        if img.len() < e {
            img.resize(e, 0);
        }
        img[o..e].copy_from_slice(data);
    }
    img
}

/// A crash may persist any subset of the writes issued since the last flush, in any order
/// (writes do not overlap within an epoch, so order does not matter). For every epoch of
/// every operation: every subset when it has at most 5 writes, else each write alone and
/// each all-but-one. The same checks as above hold for every such image.
#[test]
fn every_subset_of_unflushed_writes_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "base.qcow2", "", "2M");
    write_pattern(&p, 1, 0, 512 << 10);
    ok("qemu-img", &["snapshot", "-c", "one", s(&p)]);
    write_pattern(&p, 2, 256 << 10, 512 << 10);
    ok("qemu-img", &["snapshot", "-c", "two", s(&p)]);
    write_pattern(&p, 3, 1 << 20, 256 << 10);
    let base = std::fs::read(&p).unwrap();
    let before = state(&p);
    let work = dir.path().join("work.qcow2");
    for op in [Op::Create, Op::Apply, Op::Delete] {
        let rec = Recorder {
            inner: MemStorage::from_bytes(base.clone()),
            ..Default::default()
        };
        {
            let mut ed = SnapshotEditor::open(&rec).unwrap();
            match op {
                Op::Create => ed.create(b"new", now()).map(drop),
                Op::Apply => ed.apply(&SnapshotRef::IdOrName(b"1".to_vec())).map(drop),
                Op::Delete => ed.delete(&SnapshotRef::Name(b"one".to_vec())).map(drop),
            }
            .unwrap();
        }
        std::fs::write(&work, rec.inner.to_bytes()).unwrap();
        let after = state(&work);
        let log = rec.log.into_inner().unwrap();
        let epochs: Vec<Vec<&(u64, Vec<u8>)>> = log
            .split(Option::is_none)
            .map(|e| e.iter().flatten().collect())
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut prefix = base.clone();
        let mut states = 0;
        for (ei, epoch) in epochs.iter().enumerate() {
            let n = epoch.len();
            let subsets: Vec<Vec<usize>> = if n <= 5 {
                (0..1usize << n)
                    .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
                    .collect()
            } else {
                (0..n)
                    .map(|i| vec![i])
                    .chain((0..n).map(|i| (0..n).filter(|&j| j != i).collect()))
                    .collect()
            };
            for sub in subsets {
                let img = apply_writes(
                    prefix.clone(),
                    &sub.iter().map(|&i| epoch[i]).collect::<Vec<_>>(),
                );
                if !seen.insert(img.clone()) {
                    continue;
                }
                states += 1;
                std::fs::write(&work, &img).unwrap();
                let ctx = format!("{op:?}: epoch {ei} writes {sub:?} of {n}");
                let errors = check_errors(&work);
                assert!(
                    errors.iter().all(|l| l.contains("OFLAG_COPIED")),
                    "{ctx}: {errors:#?}"
                );
                let got = state(&work);
                assert!(
                    got.0 == before.0 || got.0 == after.0,
                    "{ctx}: snapshots torn"
                );
                assert!(
                    got.1 == before.1 || got.1 == after.1,
                    "{ctx}: active data torn"
                );
            }
            prefix = apply_writes(prefix, epoch);
        }
        eprintln!(
            "{op:?}: {} epochs, {states} distinct crash images",
            epochs.len()
        );
    }
}
