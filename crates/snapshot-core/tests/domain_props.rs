//! Property tests of the domain XML reader and writer (any bytes, damaged copies of valid
//! definitions: a value or an error, never a panic, and what is accepted writes out and reads
//! back to the same value), the limits on hostile input, the accessors the runtime uses and
//! the editing methods.

use proptest::prelude::*;
use snapshot_core::domain::{BackingStore, DiskSource, SourceRef};
use snapshot_core::{DomainDef, ErrorKind, Uuid};

const KVM: &str = include_str!("domainxml2xml/kvm_two_qcow2.xml");
const TCG: &str = include_str!("domainxml2xml/tcg_kernel_boot.xml");
const CHAIN: &str = include_str!("domainxml2xml/backing_chain.xml");
const SINK: &str = include_str!("domainxml2xml/unknown_kept.xml");

fn fixed(buf: &mut [u8]) {
    buf.fill(7);
}

fn define(xml: &str) -> snapshot_core::Result<DomainDef> {
    DomainDef::from_xml_with(xml, &mut fixed)
}

/// Whatever is accepted is stable: written, read back equal, written the same.
fn assert_stable(d: &DomainDef) {
    let xml = d.to_xml();
    let again = define(&xml).unwrap_or_else(|e| panic!("own output refused: {e}\n{xml}"));
    assert_eq!(&again, d, "{xml}");
    assert_eq!(again.to_xml(), xml);
}

fn seed() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(KVM), Just(TCG), Just(CHAIN), Just(SINK)]
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate(usize),
    Delete(usize, usize),
    Insert(usize, String),
    Flip(usize, u8),
    Duplicate(usize, usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), 1usize..40).prop_map(|(a, n)| Damage::Delete(a, n)),
        (
            any::<usize>(),
            prop_oneof![
                Just("<".to_string()),
                Just(">".to_string()),
                Just("'".to_string()),
                Just("&".to_string()),
                Just("</disk>".to_string()),
                Just("<backingStore>".to_string()),
                Just("<!--".to_string()),
                Just("<![CDATA[".to_string()),
                "[<>/='\"a-z &;-]{1,12}",
            ]
        )
            .prop_map(|(a, s)| Damage::Insert(a, s)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Damage::Flip(a, b)),
        (any::<usize>(), 1usize..200).prop_map(|(a, n)| Damage::Duplicate(a, n)),
    ]
}

fn apply(src: &str, dmg: &[Damage]) -> Vec<u8> {
    let mut b = src.as_bytes().to_vec();
    for d in dmg {
        let len = b.len().max(1);
        match d {
            Damage::Truncate(a) => b.truncate(a % len),
            Damage::Delete(a, n) => {
                let a = a % len;
                let e = (a + n).min(b.len());
                if a < e {
                    b.drain(a..e);
                }
            }
            Damage::Insert(a, s) => {
                let a = (a % len).min(b.len());
                b.splice(a..a, s.bytes());
            }
            Damage::Flip(a, x) => {
                if !b.is_empty() {
                    let a = a % b.len();
                    b[a] ^= x;
                }
            }
            Damage::Duplicate(a, n) => {
                let a = a % len;
                let e = (a + n).min(b.len());
                if a < e {
                    let part = b[a..e].to_vec();
                    b.splice(e..e, part);
                }
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(d) = DomainDef::from_xml_bytes(&data) {
            assert_stable(&d);
        }
    }

    #[test]
    fn damaged_definitions_never_panic(src in seed(), dmg in proptest::collection::vec(damage(), 1..4)) {
        let bytes = apply(src, &dmg);
        match DomainDef::from_xml_bytes(&bytes) {
            Ok(d) => assert_stable(&d),
            Err(e) => {
                prop_assert!(matches!(e.kind(), ErrorKind::Xml | ErrorKind::InvalidName), "{e}");
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn names_with_a_slash_or_dots_are_refused(a in "[a-z]{0,5}", b in "[a-z]{0,5}") {
        for bad in [format!("{a}/{b}"), "..".to_string(), ".".to_string(), format!("-{a}")] {
            let xml = format!("<domain type='kvm'><name>{bad}</name><memory>1</memory><os><type>hvm</type></os></domain>");
            let e = define(&xml).unwrap_err();
            prop_assert_eq!(e.kind(), ErrorKind::InvalidName);
        }
    }
}

fn minimal(body: &str) -> String {
    format!("<domain type='kvm'><name>v</name><memory>1024</memory><os><type>hvm</type></os>{body}</domain>")
}

#[test]
fn deep_nesting_is_refused() {
    let body = format!("{}{}", "<x>".repeat(300), "</x>".repeat(300));
    let e = define(&minimal(&body)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Xml);
    assert!(e.to_string().contains("nested deeper than"), "{e}");
    // A backing chain as deep as the limit allows is fine, and drops without trouble.
    let n = 120;
    let chain = format!(
        "<devices><disk><source file='/0'/>{}{}<target dev='vda'/></disk></devices>",
        "<backingStore type='file'><source file='/b'/>".repeat(n),
        "</backingStore>".repeat(n)
    );
    let d = define(&minimal(&chain)).unwrap();
    assert_eq!(d.disks()[0].backing_chain().count(), n);
    assert_stable(&d);
}

#[test]
fn huge_values_and_documents_are_refused() {
    let long = "a".repeat(snapshot_core::domain::MAX_VALUE_LEN + 1);
    let e = define(&minimal(&format!(
        "<devices><disk><source file='{long}'/><target dev='vda'/></disk></devices>"
    )))
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Xml);
    assert!(
        e.to_string().contains("attribute file is longer than"),
        "{e}"
    );
    let big = minimal(&format!("<metadata>{}</metadata>", "<a/>".repeat(3 << 20)));
    let e = define(&big).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
}

#[test]
fn accessors() {
    let d = define(TCG).unwrap();
    assert!(!d.is_kvm());
    assert_eq!(d.memory_bytes(), Some(256 << 20));
    assert_eq!(d.current_memory_bytes(), Some(256 << 20));
    assert_eq!((d.vcpus(), d.current_vcpus()), (1, 1));
    let k = d.kernel_boot().unwrap();
    assert_eq!(k.kernel, "/srv/boot/vmlinuz-6.1");
    assert_eq!(k.initrd, Some("/srv/boot/initrd.img-6.1"));
    assert_eq!(k.cmdline, Some("console=ttyS0 root=/dev/vda rw quiet"));
    assert_eq!(d.serial_file(), Some("/srv/tiny/console.log"));
    assert_eq!(
        d.agent_channel().unwrap().path(),
        Some("/run/virt-snap/tiny/agent.sock")
    );
    assert_eq!(d.emulator(), Some("/usr/bin/qemu-system-x86_64"));
    assert_eq!(
        d.disks()[0].source_ref(),
        Some(SourceRef::File("/srv/tiny/root.img"))
    );
    assert_eq!(d.disks()[0].format(), Some("raw"));

    let k = define(KVM).unwrap();
    assert!(k.is_kvm() && k.kernel_boot().is_none() && k.agent_channel().is_none());
    assert_eq!(k.serial_file(), None);
    assert_eq!(k.disks().len(), 2);

    let v = define(include_str!("domainxml2xml/volume_disk.xml")).unwrap();
    assert_eq!((v.vcpus(), v.current_vcpus()), (4, 1));
    assert_eq!(
        v.disk("vda").unwrap().source_ref(),
        Some(SourceRef::Volume {
            pool: "default",
            volume: "app-root.qcow2"
        })
    );
    assert!(v.disk("vdb").unwrap().readonly);

    let c = define(CHAIN).unwrap();
    let chain: Vec<_> = c
        .disk("vda")
        .unwrap()
        .backing_chain()
        .map(|b| (b.source_ref(), b.format.clone()))
        .collect();
    assert_eq!(
        chain,
        [
            (
                Some(SourceRef::File("/var/lib/libvirt/images/db.snap1")),
                Some("qcow2".to_string())
            ),
            (
                Some(SourceRef::Block("/dev/vg0/db-base")),
                Some("raw".to_string())
            ),
        ]
    );
    assert_eq!(c.disk("vdb").unwrap().backing_chain().count(), 0);
    assert!(c
        .disk("vdb")
        .unwrap()
        .backing_store
        .as_ref()
        .unwrap()
        .is_end());

    // A missing UUID comes from the random source, as a version 4 UUID.
    let n = define(&minimal("")).unwrap();
    assert_eq!(n.uuid.to_string(), "07070707-0707-4707-8707-070707070707");
}

#[test]
fn editing_updates_what_is_written() {
    let mut d = define(KVM).unwrap();
    let u = Uuid::parse("11111111-2222-4333-8444-555555555555").unwrap();
    d.set_uuid(u);
    d.disk_mut("vda")
        .unwrap()
        .push_overlay("/snap/web1.vda.s1.qcow2", "qcow2");
    let xml = d.to_xml();
    assert!(xml.contains("<uuid>11111111-2222-4333-8444-555555555555</uuid>"));
    assert!(xml.contains(
        "      <driver name='qemu' type='qcow2' discard='unmap'/>\n      <source file='/snap/web1.vda.s1.qcow2'/>\n      <backingStore type='file'>\n        <format type='qcow2'/>\n        <source file='/var/lib/libvirt/images/web1.qcow2'/>\n      </backingStore>\n      <target dev='vda' bus='virtio'/>\n"
    ), "{xml}");
    assert_stable(&d);
    assert_eq!(
        define(&xml)
            .unwrap()
            .disk("vda")
            .unwrap()
            .backing_chain()
            .count(),
        1
    );

    // Undone, the definition is the original one again.
    let top = d.disk_mut("vda").unwrap().pop_overlay().unwrap();
    assert_eq!(top, DiskSource::file("/snap/web1.vda.s1.qcow2"));
    d.set_uuid(define(KVM).unwrap().uuid);
    assert_eq!(d.to_xml(), KVM);
    assert!(d.disk_mut("vda").unwrap().pop_overlay().is_none());

    // Re-pointing a source, and ending the chain explicitly.
    let disk = d.disk_mut("vdb").unwrap();
    disk.set_source(
        "block",
        DiskSource {
            dev: Some("/dev/vg/x".into()),
            ..Default::default()
        },
    );
    disk.set_format("raw");
    disk.set_backing_store(Some(BackingStore::end()));
    let xml = d.to_xml();
    assert!(xml.contains("<disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source dev='/dev/vg/x'/>\n      <backingStore/>\n"), "{xml}");
    assert_eq!(
        d.disk("vdb").unwrap().source_ref(),
        Some(SourceRef::Block("/dev/vg/x"))
    );
    assert_stable(&d);
    assert!(d.check_runnable().is_ok());
}

#[test]
fn unsupported_is_one_error_naming_everything() {
    let d = define(include_str!("domainxml2xml/xen.xml")).unwrap();
    let e = d.ensure_runnable().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let msg = e.to_string();
    assert!(
        msg.starts_with("domain old-xen: domain type='xen': "),
        "{msg}"
    );
    assert!(
        msg.contains("bootloader: not supported by virt-snap"),
        "{msg}"
    );
    assert!(define(KVM).unwrap().ensure_runnable().is_ok());
}
