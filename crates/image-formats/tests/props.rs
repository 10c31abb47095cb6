//! Property tests over the parsers: arbitrary and mutated input never panics and never makes
//! the reader allocate beyond what the input's size and QEMU's limits allow; what we encode
//! we read back unchanged.

use image_formats::qcow2::{self, Header, HeaderExtension, Qcow2, Snapshot, SnapshotExtra};
use image_formats::{ImageInfo, MemStorage};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the bytes allocated by the current thread (peak of live bytes).
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; the bookkeeping only touches const-initialised
// thread-locals (no allocation, no destructors).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|c| {
            let v = c.get() + l.size();
            c.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get().saturating_sub(l.size())));
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Run `f` and return the peak of bytes it had allocated at once on this thread.
fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get) - base)
}

/// Allowed allocation when reading an image of `len` bytes: a small multiple of the file
/// (the window, parsed copies of names and extra data, grown vectors) plus a constant.
fn budget(len: usize) -> usize {
    8 * len + (1 << 20)
}

const CLUSTER_BITS: u32 = 16;

fn v3_header(nb_snapshots: u32, snapshots_offset: u64) -> Header {
    Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: CLUSTER_BITS,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 16,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots,
        snapshots_offset,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
        header_tail: vec![0; 7],
    }
}

/// A qcow2 image (metadata only) with these extensions and snapshots.
fn build_image(exts: &[HeaderExtension], snaps: &[Snapshot]) -> Vec<u8> {
    let table_off = 1u64 << CLUSTER_BITS;
    let h = v3_header(
        snaps.len() as u32,
        if snaps.is_empty() { 0 } else { table_off },
    );
    let mut img = h.encode();
    img.extend(qcow2::encode_extensions(exts));
    img.resize(table_off as usize, 0);
    for s in snaps {
        img.extend(s.encode());
    }
    img
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<(u32, u32, u64, u32)>(),
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec(any::<u8>(), 0..300),
        0usize..4,
        prop::collection::vec(any::<u8>(), 0..64),
        any::<(u64, u64, u64)>(),
    )
        .prop_map(
            |(l1, l1_size, (ds, dn, clock, vm32), id, name, known, unknown, (a, b, c))| {
                let (vm_state_size_large, disk_size, icount) = match known {
                    0 => (None, None, None),
                    1 => (Some(a), None, None),
                    2 => (Some(a), Some(b), None),
                    _ => (Some(a), Some(b), Some(c)),
                };
                // Unknown extra data only follows all three known fields.
                let unknown = if known == 3 { unknown } else { Vec::new() };
                Snapshot {
                    entry_offset: 0,
                    l1_table_offset: l1,
                    l1_size,
                    date_sec: ds,
                    date_nsec: dn,
                    vm_clock_nsec: clock,
                    vm_state_size_32: vm32,
                    extra: SnapshotExtra {
                        vm_state_size_large,
                        disk_size,
                        icount,
                        unknown,
                    },
                    id,
                    name,
                }
            },
        )
}

fn arb_unknown_ext() -> impl Strategy<Value = HeaderExtension> {
    (
        any::<u32>().prop_filter("not a known type", |t| {
            ![
                qcow2::EXT_END,
                qcow2::EXT_BACKING_FORMAT,
                qcow2::EXT_FEATURE_NAMES,
                qcow2::EXT_BITMAPS,
                qcow2::EXT_CRYPTO,
                qcow2::EXT_DATA_FILE,
            ]
            .contains(t)
        }),
        prop::collection::vec(any::<u8>(), 0..100),
    )
        .prop_map(|(ext_type, data)| HeaderExtension::Unknown { ext_type, data })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Snapshot tables and unknown extensions we encode read back unchanged.
    #[test]
    fn snapshot_table_roundtrip(
        snaps in prop::collection::vec(arb_snapshot(), 0..40),
        exts in prop::collection::vec(arb_unknown_ext(), 0..4),
    ) {
        let img = build_image(&exts, &snaps);
        let q = Qcow2::read(&MemStorage::from_bytes(img)).unwrap();
        prop_assert_eq!(&q.extensions, &exts);
        prop_assert_eq!(q.snapshots.len(), snaps.len());
        for (got, want) in q.snapshots.iter().zip(&snaps) {
            let mut got = got.clone();
            got.entry_offset = 0;
            prop_assert_eq!(&got, want);
        }
    }

    /// Arbitrary bytes: an error or an image, never a panic, bounded allocation.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096), magic in 0usize..3) {
        let mut bytes = bytes;
        let m: &[u8] = match magic { 0 => b"QFI\xfb", 1 => b"QED\0", _ => b"" };
        for (i, b) in m.iter().enumerate() {
            if i < bytes.len() { bytes[i] = *b; }
        }
        let len = bytes.len();
        let s = MemStorage::from_bytes(bytes);
        let (_, peak) = peak_alloc(|| ImageInfo::read("fuzz", &s, None).map(|i| i.to_json()));
        prop_assert!(peak <= budget(len), "allocated {peak} for {len} bytes");
    }

    /// A valid image with hostile header fields and random byte flips.
    #[test]
    fn mutated_images_never_panic(
        snaps in prop::collection::vec(arb_snapshot(), 1..8),
        fields in prop::collection::vec((0usize..112, any::<u8>()), 0..12),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        truncate in any::<prop::sample::Index>(),
        do_truncate in any::<bool>(),
    ) {
        let mut img = build_image(&[], &snaps);
        for (off, v) in fields { img[off] = v; }
        let n = img.len();
        for (i, v) in flips { img[i.index(n)] ^= v; }
        if do_truncate { img.truncate(truncate.index(n)); }
        let len = img.len();
        let s = MemStorage::from_bytes(img);
        let (_, peak) = peak_alloc(|| ImageInfo::read("fuzz", &s, None).map(|i| i.to_json()));
        prop_assert!(peak <= budget(len), "allocated {peak} for {len} bytes");
    }

    /// Headers we encode parse back to the same values.
    #[test]
    fn header_roundtrip(
        cluster_bits in 9u32..=21,
        refcount_order in 0u32..=6,
        size in any::<u64>(),
        lazy in any::<bool>(),
        nb in 0u32..=65536,
    ) {
        let mut h = v3_header(nb, 0);
        h.cluster_bits = cluster_bits;
        h.refcount_order = refcount_order;
        h.size = size;
        h.compatible_features = u64::from(lazy);
        h.refcount_table_clusters = 1;
        h.snapshots_offset = if nb > 0 { 1 << cluster_bits } else { 0 };
        let parsed = Header::parse(&h.encode()).unwrap();
        prop_assert_eq!(parsed, h);
    }
}

#[test]
fn huge_counts_in_a_small_file_stay_bounded() {
    // 65536 snapshots claimed, table at 64 KiB, file ends 100 bytes later.
    let mut img = build_image(&[], &[]);
    let mut h = v3_header(65536, 1 << CLUSTER_BITS);
    h.l1_size = 4 << 20; // the largest active L1 QEMU accepts
    img[..112].copy_from_slice(&h.encode());
    img.resize((1 << CLUSTER_BITS) + 100, 0xff);
    let len = img.len();
    let s = MemStorage::from_bytes(img);
    let (r, peak) = peak_alloc(|| ImageInfo::read("x", &s, None));
    assert!(r.is_err());
    assert!(peak <= budget(len), "allocated {peak}");
}
