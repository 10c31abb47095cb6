//! Crash safety by fault injection: each operation (snapshot create, apply, delete) runs on
//! an in-memory copy behind a `FaultyStorage` that fails, or silently drops, every write and
//! flush after the k-th; for every k the resulting image must be exactly the old state or
//! exactly the new one (snapshot list, every snapshot's data and the active data together),
//! and `qemu-img check` must report nothing: no corruption, not even a leaked cluster. The
//! same holds for every image a crash could leave when the disk keeps any subset of the
//! writes since the last flush, and for a create interrupted 60 times in a row. Covered:
//! 64 KiB and 4 KiB clusters, v2 and v3, refcount widths 1, 4, 16 and 64 bits, an apply
//! that resizes, a delete that drops shared refcounts to 1.
//!
//! That works because no operation writes over metadata in use until one header write (see
//! `qcow2_write`): everything before it goes to clusters free in the old state.

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
/// The snapshots and the active data.
type State = (Snapshots, Vec<u8>);

fn state(p: &Path) -> State {
    let snaps = snapshot_list(p)
        .into_iter()
        .map(|(id, name)| {
            let d = raw(p, Some(&id));
            ((id, name), d)
        })
        .collect();
    (snaps, raw(p, None))
}

/// How the image under test is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// Data, snapshot "one", more data, snapshot "two" sharing most of it, more data.
    TwoSnapshots,
    /// The same without "two": deleting "one" drops shared refcounts to 1 (COPIED set
    /// again in the active tables).
    OneSnapshot,
    /// `TwoSnapshots`, but the image grows (to 64 MiB) after "one", so applying it also
    /// shrinks the image (a new L1 size and the virtual size in the same header write).
    Resize,
    /// For 1-bit refcounts, which cannot count a shared cluster: snapshot "one" of the empty
    /// image, then data. Create is refused (overflow) and must leave the file unchanged.
    NothingShared,
}

fn build(dir: &Path, opts: &str, setup: Setup) -> std::path::PathBuf {
    let p = qimg(dir, "base.qcow2", opts, "2M");
    if setup == Setup::NothingShared {
        ok("qemu-img", &["snapshot", "-c", "one", s(&p)]);
        write_pattern(&p, 3, 256 << 10, 1 << 20);
        return p;
    }
    write_pattern(&p, 1, 0, 512 << 10);
    ok("qemu-img", &["snapshot", "-c", "one", s(&p)]);
    if setup == Setup::Resize {
        ok("qemu-img", &["resize", "-q", s(&p), "64M"]);
    }
    write_pattern(&p, 2, 256 << 10, 512 << 10);
    if setup != Setup::OneSnapshot {
        ok("qemu-img", &["snapshot", "-c", "two", s(&p)]);
    }
    write_pattern(&p, 3, 1 << 20, 256 << 10);
    p
}

/// The image a crash left must be exactly the state before or exactly the state after the
/// operation (snapshot list, every snapshot's data and the active data together), and
/// `qemu-img check` must find nothing at all: no corruption, no leak.
fn assert_old_or_new(work: &Path, before: &State, after: &State, ctx: &str) {
    let (code, corruptions, leaks) = check(work);
    assert!(
        code == 0 && corruptions == 0 && leaks == 0,
        "{ctx}: qemu-img check: exit {code}, {corruptions} corruptions, {leaks} leaked clusters: {:#?}",
        check_errors(work)
    );
    let got = state(work);
    assert!(
        got == *before || got == *after,
        "{ctx}: neither the old nor the new state: snapshots {:?}, active data {}",
        got.0.keys().collect::<Vec<_>>(),
        if got.1 == before.1 {
            "old"
        } else if got.1 == after.1 {
            "new"
        } else {
            "torn"
        }
    );
}

fn faults_on(opts: &str, setup: Setup) {
    let dir = tempfile::tempdir().unwrap();
    let p = build(dir.path(), opts, setup);
    let base = std::fs::read(&p).unwrap();
    let before = state(&p);
    let work = dir.path().join("work.qcow2");

    for op in [Op::Create, Op::Apply, Op::Delete] {
        // The complete operation: how many writes and flushes, and the state after.
        let mem = MemStorage::from_bytes(base.clone());
        let full = FaultyStorage::new(&mem, u64::MAX, FaultMode::Fail);
        if setup == Setup::NothingShared && matches!(op, Op::Create) {
            let e = run_op(&full, op).unwrap_err();
            assert_eq!(e.kind(), image_formats::ErrorKind::LimitExceeded, "{e}");
            assert_eq!(full.events(), 0, "a refused create wrote");
            assert!(mem.to_bytes() == base, "a refused create changed the file");
            continue;
        }
        run_op(&full, op).unwrap();
        let events = full.events();
        std::fs::write(&work, mem.to_bytes()).unwrap();
        assert_clean(&work);
        let after = state(&work);
        assert!(after != before, "{op:?} changed nothing");
        assert!(events >= 3, "{op:?}: only {events} writes/flushes");

        for mode in [FaultMode::Fail, FaultMode::Stop] {
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
                let ctx =
                    format!("{opts:?} {setup:?} {op:?} {mode:?} after {k} of {events} writes");
                assert_old_or_new(&work, &before, &after, &ctx);
            }
        }
        eprintln!("{opts} {setup:?}: {op:?}: {events} crash points, each old or new and clean");
    }
}

#[test]
fn every_crash_point_is_safe_v3_64k() {
    faults_on("cluster_size=65536", Setup::TwoSnapshots);
}

#[test]
fn every_crash_point_is_safe_when_apply_resizes() {
    faults_on("", Setup::Resize);
}

#[test]
fn every_crash_point_is_safe_with_one_snapshot_4bit() {
    faults_on("refcount_bits=4", Setup::OneSnapshot);
}

#[test]
fn every_crash_point_is_safe_small_clusters_v2() {
    faults_on("compat=0.10,cluster_size=4096", Setup::TwoSnapshots);
}

#[test]
fn every_crash_point_is_safe_4k_16bit_one_snapshot() {
    faults_on("cluster_size=4096", Setup::OneSnapshot);
}

#[test]
fn every_crash_point_is_safe_4k_4bit() {
    faults_on("cluster_size=4096,refcount_bits=4", Setup::TwoSnapshots);
}

#[test]
fn every_crash_point_is_safe_4k_64bit() {
    faults_on("cluster_size=4096,refcount_bits=64", Setup::TwoSnapshots);
}

/// 512-byte clusters with 64-bit refcounts: a block covers 64 clusters and a table cluster
/// 64 blocks, so an operation moves dozens of blocks and a table of several clusters.
#[test]
fn every_crash_point_is_safe_many_blocks_growing_table() {
    faults_on("cluster_size=512,refcount_bits=64", Setup::TwoSnapshots);
}

#[test]
fn every_crash_point_is_safe_1bit() {
    faults_on("cluster_size=4096,refcount_bits=1", Setup::NothingShared);
}

/// The case: create interrupted over and over (a power cut at a different point each
/// round, the crashed image the next round's start). Each round leaves the image clean with
/// nothing leaked and the state as before; the file does not keep growing; a create that is
/// finally let through works.
#[test]
fn repeatedly_interrupted_create_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = build(dir.path(), "cluster_size=4096", Setup::TwoSnapshots);
    let before = state(&p);
    let work = dir.path().join("work.qcow2");
    let mut img = std::fs::read(&p).unwrap();
    // The complete create: its writes and flushes, and the file length it leaves. Its
    // allocations depend on the refcounts only, which no interrupted round changes, so every
    // round writes (a prefix of) the same clusters.
    let mem = MemStorage::from_bytes(img.clone());
    let st = FaultyStorage::new(&mem, u64::MAX, FaultMode::Fail);
    run_op(&st, Op::Create).unwrap();
    let (n, longest) = (st.events(), mem.to_bytes().len());
    for round in 0..60u64 {
        // Stop before the header write (the last write and flush): the create is lost.
        let k = (round * 7) % (n - 1);
        let mode = if round % 2 == 0 {
            FaultMode::Stop
        } else {
            FaultMode::Fail
        };
        let mem = MemStorage::from_bytes(img.clone());
        let _ = run_op(&FaultyStorage::new(&mem, k, mode), Op::Create);
        img = mem.to_bytes();
        std::fs::write(&work, &img).unwrap();
        assert_clean(&work);
        assert!(state(&work) == before, "round {round}: state changed");
        assert!(
            img.len() <= longest,
            "round {round}: the file grows ({} > {longest} bytes)",
            img.len()
        );
    }
    let mem = MemStorage::from_bytes(img);
    run_op(
        &FaultyStorage::new(&mem, u64::MAX, FaultMode::Fail),
        Op::Create,
    )
    .unwrap();
    std::fs::write(&work, mem.to_bytes()).unwrap();
    assert_clean(&work);
    assert_eq!(snapshot_list(&work).len(), before.0.len() + 1);
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
/// every operation: every subset when it has at most 7 writes, else each write alone, each
/// all-but-one and 64 pseudo-random subsets. Every such image must be the old or the new
/// state with `qemu-img check` finding nothing (see `assert_old_or_new`).
fn subsets_on(opts: &str, setup: Setup) {
    let dir = tempfile::tempdir().unwrap();
    let p = build(dir.path(), opts, setup);
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
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for (ei, epoch) in epochs.iter().enumerate() {
            let n = epoch.len();
            let subsets: Vec<Vec<usize>> = if n <= 7 {
                (0..1usize << n)
                    .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
                    .collect()
            } else {
                let mut random = Vec::new();
                for _ in 0..64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    random.push((0..n).filter(|&i| rng >> (i % 64) & 1 != 0).collect());
                }
                (0..n)
                    .map(|i| vec![i])
                    .chain((0..n).map(|i| (0..n).filter(|&j| j != i).collect()))
                    .chain(random)
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
                let ctx = format!("{opts:?} {op:?}: epoch {ei} writes {sub:?} of {n}");
                assert_old_or_new(&work, &before, &after, &ctx);
            }
            prefix = apply_writes(prefix, epoch);
        }
        eprintln!(
            "{opts:?} {op:?}: {} epochs ({:?} writes), {states} distinct crash images",
            epochs.len(),
            epochs.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}

#[test]
fn every_subset_of_unflushed_writes_is_safe_64k() {
    subsets_on("", Setup::TwoSnapshots);
}

#[test]
fn every_subset_of_unflushed_writes_is_safe_4k_64bit() {
    subsets_on("cluster_size=4096,refcount_bits=64", Setup::OneSnapshot);
}

#[test]
fn every_subset_of_unflushed_writes_is_safe_v2_4k() {
    subsets_on("compat=0.10,cluster_size=4096", Setup::TwoSnapshots);
}
