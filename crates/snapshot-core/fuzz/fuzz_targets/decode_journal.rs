//! Any bytes as a journal: decoding must never panic and never allocate beyond the input,
//! and the good prefix it reports must decode again to the same records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot_core::journal::decode_records;

fuzz_target!(|data: &[u8]| {
    let r = decode_records::<serde_json::Value>(data);
    assert!(r.valid_len as usize <= data.len());
    let again = decode_records::<serde_json::Value>(&data[..r.valid_len as usize]);
    assert_eq!(again.records, r.records);
    assert!(again.damage.is_none());
});
