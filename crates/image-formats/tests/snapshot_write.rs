//! The write side against the oracle: images we create are byte-identical to qemu-img's;
//! snapshots we create/apply/delete interoperate with qemu-img's both ways, `qemu-img check`
//! finds neither corruption nor leaks, and each snapshot holds exactly the guest data it
//! should (read back with `qemu-img convert -O raw`). Covers v2 and v3, 512 B-2 MiB
//! clusters, refcount widths 1-64, extended L2 and compressed clusters.

use image_formats::qcow2_write::{create, CreateOptions, SnapshotEditor, SnapshotRef};
use image_formats::{ErrorKind, FileStorage};
use serde_json::Value;
use std::path::Path;

mod write_common;
use write_common::*;

fn ours_create(p: &Path, name: &str) -> String {
    let id = editor(p).create(name.as_bytes(), now()).unwrap();
    String::from_utf8(id).unwrap()
}
fn ours_apply(p: &Path, name: &str) {
    editor(p)
        .apply(&SnapshotRef::IdOrName(name.as_bytes().to_vec()))
        .unwrap();
}
fn ours_delete(p: &Path, name: &str) {
    editor(p)
        .delete(&SnapshotRef::Name(name.as_bytes().to_vec()))
        .unwrap();
}

#[test]
fn create_is_byte_identical_to_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = d.join("base.raw");
    std::fs::write(&backing, vec![0u8; 3 << 20]).unwrap();
    let cases: &[(u64, Option<(&str, &str)>)] = &[
        (64 << 20, None),
        (1 << 30, None),
        (100 << 30, None),
        (5 << 40, None),
        (1000, None),
        (3 << 20, Some(("base.raw", "raw"))),
        (1 << 30, Some(("base.raw", "raw"))),
        (64 << 20, Some(("some/other name.qcow2", "qcow2"))),
    ];
    for (i, (size, backing)) in cases.iter().enumerate() {
        let theirs = d.join(format!("theirs{i}.qcow2"));
        let ours = d.join(format!("ours{i}.qcow2"));
        let sz = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
        if let Some((b, f)) = backing {
            args.extend(["-b", b, "-F", f]);
        }
        args.extend([s(&theirs), &sz]);
        ok("qemu-img", &args);
        let st = FileStorage::from_file(std::fs::File::create(&ours).unwrap());
        create(
            &st,
            &CreateOptions {
                size: *size,
                backing_file: backing.map(|(b, _)| b.as_bytes().to_vec()),
                backing_format: backing.map(|(_, f)| f.as_bytes().to_vec()),
            },
        )
        .unwrap();
        let (a, b) = (
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
        );
        assert!(a == b, "case {i}: our image differs from qemu-img's");
        if backing.is_none() || backing.unwrap().0 == "base.raw" {
            assert_clean(&ours);
        }
    }
}

/// Snapshots across formats: ours and qemu-img's interleaved, data checked at every step.
fn interop_on(opts: &str, compressed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "img.qcow2", opts, "4M");
    write_pattern_with(&p, 0x11, 0, 1 << 20, compressed);
    let v1 = raw(&p, None);
    let id1 = ours_create(&p, "one");
    assert_eq!(id1, "1");
    assert_clean(&p);
    write_pattern(&p, 0x22, 512 << 10, 1 << 20);
    write_pattern_with(&p, 0x23, 3 << 20, 64 << 10, compressed);
    let v2 = raw(&p, None);
    ok("qemu-img", &["snapshot", "-c", "two", s(&p)]);
    let id3 = ours_create(&p, "one"); // names may repeat
    assert_eq!(id3, "3");
    assert_eq!(
        snapshot_list(&p),
        vec![
            ("1".into(), "one".into()),
            ("2".into(), "two".into()),
            ("3".into(), "one".into())
        ]
    );
    assert_clean(&p);
    assert_eq!(raw(&p, Some("1")), v1);
    assert_eq!(raw(&p, Some("2")), v2);
    assert_eq!(raw(&p, Some("3")), v2);
    // qemu-img applies ours, we apply qemu-img's.
    write_pattern(&p, 0x33, 0, 2 << 20);
    ok("qemu-img", &["snapshot", "-a", "1", s(&p)]);
    assert_eq!(raw(&p, None), v1);
    assert_clean(&p);
    ours_apply(&p, "two");
    assert_eq!(raw(&p, None), v2);
    assert_clean(&p);
    write_pattern(&p, 0x44, 1 << 20, 1 << 20);
    let v4 = raw(&p, None);
    // Delete by name: the first "one" (id 1); qemu-img deletes "two".
    ours_delete(&p, "one");
    assert_clean(&p);
    ok("qemu-img", &["snapshot", "-d", "two", s(&p)]);
    assert_clean(&p);
    assert_eq!(snapshot_list(&p), vec![("3".into(), "one".into())]);
    assert_eq!(raw(&p, Some("3")), v2);
    assert_eq!(raw(&p, None), v4);
    ours_apply(&p, "3");
    assert_eq!(raw(&p, None), v2);
    ours_delete(&p, "one");
    assert_clean(&p);
    assert!(snapshot_list(&p).is_empty());
    assert_eq!(raw(&p, None), v2);
    // QEMU's header after deleting the last snapshot: count 0, offset 0.
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[60..72], &[0u8; 12]);
}

#[test]
fn interop_v3_defaults() {
    interop_on("", false);
}
#[test]
fn interop_v2() {
    interop_on("compat=0.10", false);
}
#[test]
fn interop_small_clusters_4bit_refcounts() {
    interop_on("cluster_size=512,refcount_bits=4", false);
}
#[test]
fn interop_64bit_refcounts_compressed() {
    interop_on("refcount_bits=64", true);
}
#[test]
fn interop_extended_l2_2m_clusters() {
    interop_on("extended_l2=on,cluster_size=2M", false);
}
#[test]
fn interop_extended_l2_compressed_zstd() {
    interop_on("extended_l2=on,compression_type=zstd", true);
}
#[test]
fn interop_32bit_refcounts_4k_clusters_compressed() {
    interop_on("refcount_bits=32,cluster_size=4096", true);
}
#[test]
fn interop_8bit_refcounts_lazy() {
    interop_on("refcount_bits=8,lazy_refcounts=on", false);
}

/// Our entry equals qemu-img's but for the date and the L1 offset: we do not copy the L1
/// (the active tables as they were become the snapshot's, the active state gets new ones),
/// so the layout differs; the guest data and every header field but the metadata offsets
/// are the same.
#[test]
fn entry_matches_qemu_img_but_the_date_and_l1_offset() {
    let dir = tempfile::tempdir().unwrap();
    let a = qimg(dir.path(), "a.qcow2", "", "64M");
    let b = qimg(dir.path(), "b.qcow2", "", "64M");
    for p in [&a, &b] {
        write_pattern(p, 1, 0, 128 << 10);
    }
    ok("qemu-img", &["snapshot", "-c", "first", s(&a)]);
    ours_create(&b, "first");
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // 40-59: L1 and refcount table offsets, 64-71: snapshot table offset.
    for r in [0..40, 60..64, 72..0x70] {
        assert_eq!(x[r.clone()], y[r.clone()], "header bytes {r:?} differ");
    }
    let entry = |f: &[u8]| {
        let off = u64::from_be_bytes(f[64..72].try_into().unwrap()) as usize;
        f[off..off + 56].to_vec()
    };
    let (ex, ey) = (entry(&x), entry(&y));
    assert_eq!(ex[8..16], ey[8..16]);
    assert_eq!(ex[24..], ey[24..]);
    assert_clean(&b);
    assert_eq!(snapshot_list(&a), snapshot_list(&b));
    assert!(raw(&a, Some("1")) == raw(&b, Some("1")));
    assert!(raw(&a, None) == raw(&b, None));
}

#[test]
fn refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "r.qcow2", "", "4M");
    ours_create(&p, "a");
    let set_bit = |byte: usize, bit: u8| {
        let mut b = std::fs::read(&p).unwrap();
        b[byte] |= 1 << bit;
        let path = dir.path().join(format!("r-{byte}-{bit}.qcow2"));
        std::fs::write(&path, &b).unwrap();
        (path, b)
    };
    // incompatible bits live in bytes 72-79 (big-endian: bit 0 is in byte 79).
    for (byte, bit, kind) in [
        (79, 0, ErrorKind::Unsupported), // dirty
        (79, 1, ErrorKind::Invalid),     // corrupt
        (78, 1, ErrorKind::Unsupported), // unknown bit 9
    ] {
        let (path, before) = set_bit(byte, bit);
        let e = SnapshotEditor::open(FileStorage::open_read_write(&path).unwrap()).unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
    let mut ed = editor(&p);
    let before = std::fs::read(&p).unwrap();
    let e = ed.create(&[b'x'; 256], now()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
    let e = ed
        .apply(&SnapshotRef::IdOrName(b"nope".to_vec()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = ed.delete(&SnapshotRef::Id(b"a".to_vec())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // External data file.
    let df = dir.path().join("df.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&dir.path().join("df.raw"))),
            s(&df),
            "4M",
        ],
    );
    let e = SnapshotEditor::open(FileStorage::open_read_write(&df).unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    // Persistent bitmaps: create is fine, apply is refused.
    let bm = qimg(dir.path(), "bm.qcow2", "", "4M");
    ok("qemu-img", &["bitmap", "--add", s(&bm), "b0"]);
    ours_create(&bm, "s");
    let before = std::fs::read(&bm).unwrap();
    let e = editor(&bm)
        .apply(&SnapshotRef::IdOrName(b"s".to_vec()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(std::fs::read(&bm).unwrap(), before);
}

#[test]
fn refcount_table_grows_when_needed() {
    // 512-byte clusters and 64-bit refcounts: a refcount block covers 64 clusters and a
    // table cluster 64 blocks (4096 clusters); the 1 GiB image's L1 takes 512 clusters, so a
    // few snapshots (each giving the active state a new L1) make our allocator add blocks
    // and grow the table.
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(
        dir.path(),
        "g.qcow2",
        "cluster_size=512,refcount_bits=64",
        "1G",
    );
    write_pattern(&p, 7, 0, 300 << 10);
    // Every operation writes a new table; it grows when the blocks no longer fit.
    let table_at = |p: &Path| std::fs::read(p).unwrap()[56..60].to_vec();
    let before = table_at(&p);
    let v = raw(&p, None);
    let mut n = 0;
    while table_at(&p) == before {
        n += 1;
        assert!(n < 40, "the refcount table never grew");
        ours_create(&p, &format!("s{n}"));
    }
    assert_clean(&p);
    write_pattern(&p, 8, 0, 300 << 10);
    ours_apply(&p, "s1");
    assert_eq!(raw(&p, None), v);
    for i in 1..=n {
        ours_delete(&p, &format!("s{i}"));
    }
    assert_clean(&p);
    assert_eq!(raw(&p, None), v);
}

#[test]
fn refcount_overflow_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "o.qcow2", "refcount_bits=1", "4M");
    write_pattern(&p, 7, 0, 1 << 20);
    let before = std::fs::read(&p).unwrap();
    let e = editor(&p).create(b"x", now()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let q = qimg(dir.path(), "o2.qcow2", "refcount_bits=2", "4M");
    write_pattern(&q, 7, 0, 1 << 20);
    ours_create(&q, "a");
    ours_create(&q, "b");
    let before = std::fs::read(&q).unwrap();
    let e = editor(&q).create(b"c", now()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    assert_eq!(std::fs::read(&q).unwrap(), before);
    assert_clean(&q);
}

#[test]
fn unknown_extra_data_and_short_entries_are_kept() {
    use image_formats::qcow2::Qcow2;
    use image_formats::Storage;
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "x.qcow2", "compat=0.10", "4M");
    write_pattern(&p, 5, 0, 64 << 10);
    ok("qemu-img", &["snapshot", "-c", "a", s(&p)]);
    ok("qemu-img", &["snapshot", "-c", "b", s(&p)]);
    // Rewrite the table in place (it has the rest of its cluster): entry "a" gets 8 unknown
    // extra bytes, entry "b" no extra data at all (as very old QEMU wrote).
    let st = FileStorage::open_read_write(&p).unwrap();
    let mut img = Qcow2::read(&st).unwrap();
    img.snapshots[0].extra.unknown = b"UNKNOWN!".to_vec();
    let b = &mut img.snapshots[1].extra;
    (b.vm_state_size_large, b.disk_size, b.icount) = (None, None, None);
    let table: Vec<u8> = img.snapshots.iter().flat_map(|s| s.encode()).collect();
    st.write_at(&table, img.header.snapshots_offset).unwrap();
    drop(st);
    assert_clean(&p);
    let kept = Qcow2::read(&FileStorage::open_read_only(&p).unwrap())
        .unwrap()
        .snapshots;
    ours_create(&p, "c");
    ours_delete(&p, "c");
    ours_create(&p, "d");
    assert_clean(&p);
    let now = Qcow2::read(&FileStorage::open_read_only(&p).unwrap())
        .unwrap()
        .snapshots;
    for (a, b) in kept.iter().zip(&now) {
        assert_eq!(a.encode(), b.encode(), "entry {:?} changed", a.name);
    }
    assert_eq!(now.len(), 3);
    assert_eq!(now[2].extra.disk_size, Some(4 << 20));
    assert_eq!(snapshot_list(&p).len(), 3);
}

#[test]
fn apply_resizes_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let build = |name: &str| {
        let p = qimg(dir.path(), name, "cluster_size=4096", "4M");
        write_pattern(&p, 1, 0, 1 << 20);
        ok("qemu-img", &["snapshot", "-c", "small", s(&p)]);
        ok("qemu-img", &["resize", "-q", s(&p), "256M"]);
        write_pattern(&p, 2, (128 << 20) + 4096, 1 << 20);
        ok("qemu-img", &["snapshot", "-c", "big", s(&p)]);
        p
    };
    let (ours, theirs) = (build("ours.qcow2"), build("theirs.qcow2"));
    let v_big = raw(&ours, None);
    let size = |p: &Path| -> Value {
        serde_json::from_str::<Value>(&ok("qemu-img", &["info", "--output=json", s(p)])).unwrap()
            ["virtual-size"]
            .clone()
    };
    for (name, want) in [
        ("small", 4u64 << 20),
        ("big", 256 << 20),
        ("small", 4 << 20),
    ] {
        ours_apply(&ours, name);
        ok("qemu-img", &["snapshot", "-a", name, s(&theirs)]);
        assert_clean(&ours);
        assert_eq!(size(&ours), Value::from(want), "after apply {name}");
        assert_eq!(size(&ours), size(&theirs));
        assert!(raw(&ours, None) == raw(&theirs, None), "after apply {name}");
    }
    ours_apply(&ours, "big");
    assert!(raw(&ours, None) == v_big);
    ours_delete(&ours, "small");
    ours_delete(&ours, "big");
    assert_clean(&ours);
}

#[test]
fn zero_sized_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = qimg(dir.path(), "z.qcow2", "", "0");
    ours_create(&p, "a");
    ok("qemu-img", &["snapshot", "-c", "b", s(&p)]);
    assert_clean(&p);
    ours_apply(&p, "b");
    ours_apply(&p, "a");
    ours_delete(&p, "a");
    ours_delete(&p, "b");
    assert_clean(&p);
}

#[test]
fn lookups_match_qemu_img_when_names_look_like_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |n: &str| {
        let p = qimg(dir.path(), n, "", "4M");
        for (i, name) in ["a", "1", "b"].iter().enumerate() {
            write_pattern(&p, i as u8 + 1, 0, 64 << 10);
            ok("qemu-img", &["snapshot", "-c", name, s(&p)]);
        }
        p
    };
    let (ours, theirs) = (mk("o.qcow2"), mk("t.qcow2"));
    // apply "1": by id first (snapshot "a"), in both tools.
    ours_apply(&ours, "1");
    ok("qemu-img", &["snapshot", "-a", "1", s(&theirs)]);
    assert!(raw(&ours, None) == raw(&theirs, None));
    assert!(raw(&ours, None)[0] == 1);
    // delete "1": by name only (the snapshot with id 2).
    ours_delete(&ours, "1");
    ok("qemu-img", &["snapshot", "-d", "1", s(&theirs)]);
    assert_eq!(snapshot_list(&ours), snapshot_list(&theirs));
    assert_eq!(
        snapshot_list(&ours),
        vec![("1".into(), "a".into()), ("3".into(), "b".into())]
    );
    // delete "3": no snapshot has that name (qemu-img fails too).
    let e = editor(&ours)
        .delete(&SnapshotRef::Name(b"3".to_vec()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(!run("qemu-img", &["snapshot", "-d", "3", s(&theirs)])
        .status
        .success());
    // The next id is max + 1, not count + 1.
    assert_eq!(ours_create(&ours, "c"), "4");
    assert_clean(&ours);
}
