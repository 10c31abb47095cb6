//! Any bytes as an image: probing, qcow2/QED parsing and the qemu-img JSON must never panic.
//! The bytes are also read as qcow2 and as QED whatever their magic says (the parsers must
//! refuse, not crash), and as a snapshot table behind a valid qcow2 header (so mutations
//! reach the snapshot parser directly).
#![no_main]

use image_formats::qcow2::Header;
use image_formats::{Format, ImageInfo, MemStorage};
use libfuzzer_sys::fuzz_target;

fn table_behind_header(data: &[u8]) -> Option<Vec<u8>> {
    let (&n, table) = data.split_first()?;
    let h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 9,
        size: 1 << 20,
        crypt_method: 0,
        l1_size: 1,
        l1_table_offset: 1024,
        refcount_table_offset: 1536,
        refcount_table_clusters: 1,
        nb_snapshots: u32::from(n),
        snapshots_offset: 512,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
        header_tail: vec![0; 7],
    };
    let mut img = h.encode();
    img.resize(512, 0);
    img.extend_from_slice(table);
    Some(img)
}

fuzz_target!(|data: &[u8]| {
    let s = MemStorage::from_bytes(data.to_vec());
    if let Ok(info) = ImageInfo::read("fuzz", &s, None) {
        let _ = info.to_json();
        let _ = serde_json::to_string(&info.json());
    }
    for f in [Format::Qcow2, Format::Qed] {
        if let Ok(info) = ImageInfo::read("fuzz", &s, Some(f)) {
            let _ = info.to_json();
        }
    }
    if let Some(img) = table_behind_header(data) {
        let s = MemStorage::from_bytes(img);
        if let Ok(info) = ImageInfo::read("fuzz", &s, None) {
            let _ = serde_json::to_string(&info.json());
        }
    }
});
