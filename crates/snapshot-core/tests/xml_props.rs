//! Property tests of the domainsnapshot reader and writer: any bytes give a value or an error,
//! never a panic; damaged copies of valid documents likewise; any value written reads back
//! equal.

use proptest::prelude::*;
use snapshot_core::xml::{Disk, Driver, Host, Memory, RawXml, Source};
use snapshot_core::{DomainSnapshot, Location, SnapshotName, SnapshotState};

const SEED: &str = include_str!("xml2xml/source_types.xml");
const SEED2: &str = include_str!("xml2xml/external_memory_inactive_domain.xml");

fn text() -> impl Strategy<Value = String> {
    // Characters XML 1.0 can carry, including the ones that need escaping.
    "[a-zA-Z0-9 \t\n._&<>'\"/é€-]{0,24}"
}

fn name() -> impl Strategy<Value = SnapshotName> {
    "[a-zA-Z0-9 ._&<>'\"é-]{1,24}".prop_filter_map("reserved", |s| SnapshotName::new(s).ok())
}

fn location() -> impl Strategy<Value = Location> {
    prop_oneof![
        Just(Location::No),
        Just(Location::Internal),
        Just(Location::External),
        Just(Location::Manual),
        Just(Location::Storage),
    ]
}

fn state() -> impl Strategy<Value = SnapshotState> {
    prop_oneof![
        Just(SnapshotState::Running),
        Just(SnapshotState::Paused),
        Just(SnapshotState::Shutoff),
        Just(SnapshotState::DiskSnapshot),
        Just(SnapshotState::Crashed),
        Just(SnapshotState::Pmsuspended),
    ]
}

fn disk() -> impl Strategy<Value = Disk> {
    (
        "[a-z]{2,4}",
        proptest::option::of(location()),
        proptest::option::of("[a-z]{3,5}"),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(|(name, snapshot, fmt, file, host)| {
            let with_source = !matches!(
                snapshot,
                Some(Location::No | Location::Internal | Location::Manual)
            );
            Disk {
                name,
                snapshot,
                source_type: with_source.then(|| "file".to_string()),
                driver: fmt.filter(|_| with_source).map(|f| Driver {
                    format: Some(f),
                    ..Default::default()
                }),
                source: file.filter(|_| with_source).map(|f| Source {
                    file: Some(f),
                    hosts: host
                        .map(|h| {
                            vec![Host {
                                name: Some(h),
                                port: Some("10809".into()),
                                ..Default::default()
                            }]
                        })
                        .unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
}

fn snapshot() -> impl Strategy<Value = DomainSnapshot> {
    (
        proptest::option::of(name()),
        proptest::option::of(text()),
        proptest::option::of(state()),
        proptest::option::of(name()),
        proptest::option::of(any::<i64>()),
        proptest::option::of((0u8..3, proptest::option::of(text()))),
        proptest::collection::vec(disk(), 0..4),
        proptest::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(
            |(name, description, state, parent, creation_time, mem, disks, active, dom)| {
                let mut seen = std::collections::HashSet::new();
                let disks = disks
                    .into_iter()
                    .filter(|d| seen.insert(d.name.clone()))
                    .collect();
                DomainSnapshot {
                    name,
                    description,
                    state,
                    parent,
                    creation_time,
                    memory: mem.map(|(k, file)| match k {
                        0 => Memory {
                            snapshot: Some(Location::No),
                            ..Default::default()
                        },
                        1 => Memory {
                            snapshot: Some(Location::Internal),
                            ..Default::default()
                        },
                        _ => Memory {
                            snapshot: Some(Location::External),
                            file,
                            ..Default::default()
                        },
                    }),
                    disks,
                    active,
                    domain: dom.then(|| {
                        RawXml::element("<domain type='kvm'>\n    <name>x</name>\n  </domain>")
                            .unwrap()
                    }),
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = DomainSnapshot::from_xml_bytes(&bytes);
    }

    #[test]
    fn damaged_documents_never_panic(
        which in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let seed = if which { SEED } else { SEED2 };
        let mut bytes = seed.as_bytes().to_vec();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(s) = DomainSnapshot::from_xml_bytes(&bytes) {
            // Whatever was accepted writes out and reads back equal.
            let again = DomainSnapshot::from_xml(&s.to_xml()).unwrap();
            prop_assert_eq!(again, s);
        }
    }

    #[test]
    fn written_values_read_back_equal(s in snapshot()) {
        let xml = s.to_xml();
        let back = DomainSnapshot::from_xml(&xml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(back.to_xml(), xml);
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let depth = 100_000;
    let mut s = String::from("<domainsnapshot><cookie>");
    s.push_str(&"<a>".repeat(depth));
    s.push_str(&"</a>".repeat(depth));
    s.push_str("</cookie></domainsnapshot>");
    let e = DomainSnapshot::from_xml(&s).unwrap_err();
    assert!(e.to_string().contains("nested deeper"), "{e}");
}

#[test]
fn errors_carry_the_offset() {
    let e = DomainSnapshot::from_xml("<domainsnapshot>\n  <state>bogus</state>\n</domainsnapshot>")
        .unwrap_err();
    assert_eq!(e.offset(), Some(19));
    assert!(e.to_string().contains("at byte 19"), "{e}");
}

#[test]
fn filters_follow_libvirt() {
    let s = DomainSnapshot::from_xml(include_str!("xml2xml/storage_extension.xml")).unwrap();
    assert!(s.is_external() && s.is_disk_only() && !s.is_active() && !s.is_inactive());
    let s = DomainSnapshot::from_xml(include_str!("xml2xml/internal_with_memory.xml")).unwrap();
    assert!(!s.is_external() && s.is_active());
    let s = DomainSnapshot::from_xml(include_str!("xml2xml/implicit_external.xml")).unwrap();
    assert_eq!(
        s.memory.as_ref().unwrap().location(),
        Some(Location::External)
    );
    assert_eq!(s.disks[0].location(), Some(Location::External));
    assert_eq!(s.disks[1].location(), None);
    assert!(s.is_external());
}

#[test]
fn every_state_round_trips() {
    for st in [
        "nostate",
        "running",
        "blocked",
        "paused",
        "shutdown",
        "shutoff",
        "crashed",
        "pmsuspended",
        "disk-snapshot",
    ] {
        let xml = format!("<domainsnapshot>\n  <state>{st}</state>\n</domainsnapshot>\n");
        let s = DomainSnapshot::from_xml(&xml).unwrap();
        assert_eq!(s.state.unwrap().as_str(), st);
        assert_eq!(s.to_xml(), xml);
    }
}

#[test]
fn raw_xml_must_be_one_element() {
    assert!(RawXml::element("<domain/>").is_ok());
    assert_eq!(
        RawXml::element(" <cookie><a/></cookie>\n")
            .unwrap()
            .as_str(),
        "<cookie><a/></cookie>"
    );
    assert_eq!(
        RawXml::element("<x:y a='1'/>").unwrap().element_name(),
        Some("x:y")
    );
    assert!(RawXml::element("<a/><b/>").is_err());
    assert!(RawXml::element("text").is_err());
    assert!(RawXml::element("<a>").is_err());
}
