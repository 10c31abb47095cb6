//! The xml2xml suite: every `tests/xml2xml/CASE.xml` is read and written back; the output must
//! equal `CASE.out.xml` when it exists, else the input itself (libvirt-formatted input comes
//! back unchanged). Every `tests/xml2xml/bad/CASE.xml` must be refused with an error whose
//! message contains the text of `bad/CASE.err`.

use snapshot_core::DomainSnapshot;
use std::path::{Path, PathBuf};

fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.ends_with(".xml") && !n.ends_with(".out.xml")
        })
        .collect();
    v.sort();
    v
}

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xml2xml")
}

#[test]
fn xml2xml_cases() {
    let dir = suite_dir();
    let all = cases(&dir);
    assert!(all.len() >= 15, "only {} cases", all.len());
    let mut failures = Vec::new();
    for input in &all {
        let src = std::fs::read_to_string(input).unwrap();
        let out_path = input.with_extension("out.xml");
        let expected = std::fs::read_to_string(&out_path).unwrap_or_else(|_| src.clone());
        let parsed = match DomainSnapshot::from_xml(&src) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{}: {e}", input.display()));
                continue;
            }
        };
        let written = parsed.to_xml();
        if written != expected {
            failures.push(format!(
                "{}: output differs\n--- expected\n{expected}--- got\n{written}",
                input.display()
            ));
            continue;
        }
        // Stable: the output reads back to the same value and writes the same bytes.
        let again = DomainSnapshot::from_xml(&written).unwrap();
        assert_eq!(again, parsed, "{}", input.display());
        assert_eq!(again.to_xml(), written, "{}", input.display());
        // The opaque subtrees are the input's bytes.
        for raw in [&parsed.domain, &parsed.inactive_domain, &parsed.cookie]
            .into_iter()
            .flatten()
        {
            assert!(src.contains(raw.as_str()), "{}", input.display());
            assert!(written.contains(raw.as_str()), "{}", input.display());
        }
        // And the JSON form carries the same value.
        let json = serde_json::to_string(&parsed).unwrap();
        let back: DomainSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, parsed, "{}", input.display());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_cases_are_refused_with_a_clear_error() {
    let dir = suite_dir().join("bad");
    let all = cases(&dir);
    assert!(all.len() >= 20, "only {} bad cases", all.len());
    for input in &all {
        let src = std::fs::read(input).unwrap();
        let want = std::fs::read_to_string(input.with_extension("err")).unwrap();
        let want = want.trim();
        let err = DomainSnapshot::from_xml_bytes(&src)
            .expect_err(&format!("{} was accepted", input.display()));
        assert_eq!(
            err.kind(),
            snapshot_core::ErrorKind::Xml,
            "{}",
            input.display()
        );
        let msg = err.to_string();
        assert!(
            msg.contains(want),
            "{}: {msg:?} does not contain {want:?}",
            input.display()
        );
    }
}
