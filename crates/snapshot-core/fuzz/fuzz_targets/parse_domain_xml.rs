//! Any bytes as libvirt domain XML: the reader must never panic, and whatever it accepts must
//! write out and read back to the same value (and the same bytes); checking what of it can
//! run must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot_core::DomainDef;

fn zeros(buf: &mut [u8]) {
    buf.fill(0);
}

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        assert!(DomainDef::from_xml_bytes(data).is_err());
        return;
    };
    if let Ok(d) = DomainDef::from_xml_with(xml, &mut zeros) {
        let out = d.to_xml();
        let again = DomainDef::from_xml_with(&out, &mut zeros).expect("our own output must parse");
        assert_eq!(again, d);
        assert_eq!(again.to_xml(), out);
        let _ = d.check_runnable();
    }
});
