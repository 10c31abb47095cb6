//! Any bytes as domainsnapshot XML: the reader must never panic, and whatever it accepts
//! must write out and read back to the same value (and the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot_core::DomainSnapshot;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = DomainSnapshot::from_xml_bytes(data) {
        let xml = s.to_xml();
        let again = DomainSnapshot::from_xml(&xml).expect("our own output must parse");
        assert_eq!(again, s);
        assert_eq!(again.to_xml(), xml);
    }
});
