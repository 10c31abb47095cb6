//! Regression (found by domain_props in CI): unknown `<vcpu>` attributes in any order must
//! survive write + read unchanged.
use snapshot_core::DomainDef;

fn fixed(buf: &mut [u8]) {
    buf.fill(7);
}

#[test]
fn unknown_vcpu_attributes_in_any_order_round_trip() {
    for attrs in [
        "pl\u{1c}cement='static' cpuset='0-3' current='2'",
        "cpuset='0-3' pl\u{1c}cement='static' current='2'",
        "current='2' zz='1' cpuset='0-3' placement='static' aa='2'",
    ] {
        let xml = format!(
            "<domain type='kvm'><name>v</name><memory>1024</memory><vcpu {attrs}>4</vcpu>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        );
        let d = DomainDef::from_xml_with(&xml, &mut fixed).unwrap();
        let out = d.to_xml();
        let again = DomainDef::from_xml_with(&out, &mut fixed).unwrap();
        assert_eq!(again, d, "{attrs}\n{out}");
        assert_eq!(again.to_xml(), out);
    }
}
