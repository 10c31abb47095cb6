//! Real images made hostile: every truncation of a qemu-img image, unknown extensions and
//! unknown feature bits (named through the feature name table), QEMU's limits.

use image_formats::qcow2::{self, FeatureName, FeatureType, HeaderExtension, Qcow2};
use image_formats::{ErrorKind, ImageInfo, MemStorage};
use std::path::Path;
use std::process::Command;

const HINT: &str = "run `cargo xtask deps` (installs QEMU 10.0.2)";

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): {HINT}"))
}

fn ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A qcow2 image with two snapshots, a bitmap and a backing file.
fn rich_image(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.qcow2");
    let p = dir.join("rich.qcow2");
    ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p.to_str().unwrap(),
    ]);
    ok(&["snapshot", "-c", "one", p.to_str().unwrap()]);
    ok(&["snapshot", "-c", "two", p.to_str().unwrap()]);
    ok(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    std::fs::read(&p).unwrap()
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let img = rich_image(d.path());
    let full = ImageInfo::read("rich", &MemStorage::from_bytes(img.clone()), None).unwrap();
    assert_eq!(full.snapshots().len(), 2);
    let q = full.qcow2().unwrap();
    let table_end = q
        .snapshots
        .iter()
        .map(|s| s.entry_offset + s.encoded_len())
        .max()
        .unwrap();
    for len in (0..img.len()).step_by(7) {
        let r = ImageInfo::read("t", &MemStorage::from_bytes(&img[..len]), None);
        if (len as u64) < table_end {
            // Cut inside the metadata we read: an error (qcow2 metadata or not recognised).
            if let Ok(i) = &r {
                assert!(
                    i.qcow2().is_none() || len >= 4096,
                    "len {len}: read a truncated header"
                );
            }
        }
        if let Err(e) = r {
            assert!(
                matches!(e.kind(), ErrorKind::Truncated | ErrorKind::Invalid),
                "len {len}: {e}"
            );
        }
    }
}

/// Rewrite the extension area of cluster 0 and move the backing file name after it.
fn set_extensions(img: &mut [u8], exts: &[HeaderExtension]) {
    let q = Qcow2::read(&MemStorage::from_bytes(img.to_vec())).unwrap();
    let start = q.header.header_length as usize;
    let name = q.backing_file.clone().unwrap();
    let mut area = qcow2::encode_extensions(exts);
    let name_off = start + area.len();
    area.extend_from_slice(&name);
    let cluster = q.header.cluster_size() as usize;
    assert!(start + area.len() <= cluster, "extensions do not fit");
    img[start..cluster].fill(0);
    img[start..start + area.len()].copy_from_slice(&area);
    img[8..16].copy_from_slice(&(name_off as u64).to_be_bytes());
}

#[test]
fn unknown_extensions_are_kept_and_unknown_features_named() {
    let d = tempfile::tempdir().unwrap();
    let mut img = rich_image(d.path());
    let q = Qcow2::read(&MemStorage::from_bytes(img.clone())).unwrap();
    let mut exts = q.extensions.clone();
    let unknown = HeaderExtension::Unknown {
        ext_type: 0x1234_5678,
        data: b"kept as is".to_vec(),
    };
    exts.insert(1, unknown.clone());
    set_extensions(&mut img, &exts);
    let p = d.path().join("ext.qcow2");
    std::fs::write(&p, &img).unwrap();

    // qemu-img ignores the unknown extension; so do we, but we keep it.
    let theirs: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--output=json", p.to_str().unwrap()])).unwrap();
    let info = ImageInfo::open(&p, None).unwrap();
    let ours = info.to_json();
    for k in [
        "virtual-size",
        "cluster-size",
        "snapshots",
        "format-specific",
        "backing-filename",
        "backing-filename-format",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    assert!(info.qcow2().unwrap().extensions.contains(&unknown));
    assert_eq!(ours["x-unknown-header-extensions"][0]["type"], "0x12345678");

    // An unknown incompatible bit with a name in the feature name table: qemu-img refuses
    // the image naming the feature; we read the header and report the feature by name.
    let future = FeatureName {
        feature_type: FeatureType::Incompatible,
        bit: 9,
        name: b"future feature".to_vec(),
    };
    let mut exts2 = exts.clone();
    match exts2
        .iter_mut()
        .find(|e| matches!(e, HeaderExtension::FeatureNames(_)))
    {
        Some(HeaderExtension::FeatureNames(v)) => v.push(future),
        // qemu-img drops the table when it rewrites the header (e.g. `bitmap --add`).
        _ => exts2.push(HeaderExtension::FeatureNames(vec![future])),
    }
    set_extensions(&mut img, &exts2);
    img[72 + 6] |= 0x02; // incompatible bit 9
    img[80 + 7] |= 0x80; // compatible bit 7, unnamed
    std::fs::write(&p, &img).unwrap();
    let out = qemu_img(&["info", p.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("future feature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = ImageInfo::open(&p, None).unwrap();
    let unknown = info.qcow2().unwrap().unknown_features();
    assert_eq!(unknown.len(), 2);
    assert_eq!(unknown[0].feature_type, FeatureType::Incompatible);
    assert_eq!(unknown[0].bit, 9);
    assert_eq!(unknown[0].name.as_deref(), Some("future feature"));
    assert_eq!(unknown[1].feature_type, FeatureType::Compatible);
    assert_eq!(unknown[1].name, None);
    let j = info.to_json();
    assert_eq!(j["x-unknown-features"][0]["name"], "future feature");
}

fn patch_and_read(img: &[u8], patch: impl Fn(&mut Vec<u8>)) -> image_formats::Error {
    let mut b = img.to_vec();
    patch(&mut b);
    ImageInfo::read("p", &MemStorage::from_bytes(b), None).unwrap_err()
}

#[test]
fn qemu_limits_are_enforced() {
    let d = tempfile::tempdir().unwrap();
    let img = rich_image(d.path());
    let q = Qcow2::read(&MemStorage::from_bytes(img.clone())).unwrap();
    let put32 =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    // Too many snapshots.
    let e = patch_and_read(&img, |b| put32(b, 60, 65537));
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    // Too much extra data in the first snapshot entry.
    let first = q.snapshots[0].entry_offset as usize;
    let e = patch_and_read(&img, |b| put32(b, first + 36, 1025));
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    assert_eq!(e.offset(), Some(first as u64 + 36));
    // Cluster size out of range.
    for bits in [8, 22] {
        let e = patch_and_read(&img, |b| put32(b, 20, bits));
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    }
    // Refcount order above 6.
    let e = patch_and_read(&img, |b| put32(b, 96, 7));
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    // Backing file name too long.
    let e = patch_and_read(&img, |b| put32(b, 16, 1024));
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    // Unsupported version.
    let e = patch_and_read(&img, |b| put32(b, 4, 4));
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // Snapshot table offset not cluster aligned.
    let e = patch_and_read(&img, |b| b[71] = 8);
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    // Snapshot table pointing past the end of the file.
    let e = patch_and_read(&img, |b| b[64] = 0x7f);
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
}
