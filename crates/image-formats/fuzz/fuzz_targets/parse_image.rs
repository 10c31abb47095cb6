//! Any bytes as an image: probing, qcow2/QED parsing and the qemu-img JSON must never panic.
//! The bytes are also read as qcow2 and as QED whatever their magic says (the parsers must
//! refuse, not crash).
#![no_main]

use image_formats::{Format, ImageInfo, MemStorage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = MemStorage::from_bytes(data.to_vec());
    if let Ok(info) = ImageInfo::read("fuzz", &s, None) {
        let _ = info.to_json();
    }
    for f in [Format::Qcow2, Format::Qed] {
        if let Ok(info) = ImageInfo::read("fuzz", &s, Some(f)) {
            let _ = info.to_json();
        }
    }
});
