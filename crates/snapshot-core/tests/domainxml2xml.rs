//! The domain xml2xml suite: every `tests/domainxml2xml/CASE.xml` is defined and dumped back;
//! the output must equal `CASE.out.xml` when it exists, else the input itself (XML as libvirt
//! writes it comes back byte for byte), and a second round trip changes nothing. A case is
//! runnable unless `CASE.unsupported` lists, one a line, the elements
//! [`DomainDef::check_runnable`] must name. Every `bad/CASE.xml` must be refused with an
//! error whose message contains the text of `bad/CASE.err`.

use snapshot_core::{DomainDef, ErrorKind};
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/domainxml2xml")
}

/// Deterministic "random" bytes: 0, 1, 2, ...
fn counting(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8;
    }
}

fn define(xml: &str) -> snapshot_core::Result<DomainDef> {
    DomainDef::from_xml_with(xml, &mut counting)
}

#[test]
fn xml2xml_cases() {
    let dir = suite_dir();
    let all = cases(&dir);
    assert!(all.len() >= 10, "only {} cases", all.len());
    let mut failures = Vec::new();
    for input in &all {
        let src = std::fs::read_to_string(input).unwrap();
        let expected = std::fs::read_to_string(input.with_extension("out.xml"))
            .unwrap_or_else(|_| src.clone());
        let def = match define(&src) {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("{}: {e}", input.display()));
                continue;
            }
        };
        let written = def.to_xml();
        if written != expected {
            failures.push(format!(
                "{}: output differs\n--- expected\n{expected}--- got\n{written}",
                input.display()
            ));
            continue;
        }
        let again = define(&written).unwrap();
        assert_eq!(again, def, "{}", input.display());
        assert_eq!(again.to_xml(), written, "{}", input.display());
        let json = serde_json::to_string(&def).unwrap();
        let back: DomainDef = serde_json::from_str(&json).unwrap();
        assert_eq!(back, def, "{}", input.display());

        let want: Vec<String> = std::fs::read_to_string(input.with_extension("unsupported"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let got: Vec<String> = match def.check_runnable() {
            Ok(()) => Vec::new(),
            Err(v) => v.into_iter().map(|u| u.element).collect(),
        };
        if got != want {
            failures.push(format!(
                "{}: check_runnable named {got:?}, expected {want:?}",
                input.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_cases_are_refused_with_a_clear_error() {
    let dir = suite_dir().join("bad");
    let all = cases(&dir);
    assert!(all.len() >= 25, "only {} bad cases", all.len());
    for input in &all {
        let src = std::fs::read(input).unwrap();
        let want = std::fs::read_to_string(input.with_extension("err")).unwrap();
        let want = want.trim();
        let err = DomainDef::from_xml_bytes(&src)
            .expect_err(&format!("{} was accepted", input.display()));
        assert!(
            matches!(err.kind(), ErrorKind::Xml | ErrorKind::InvalidName),
            "{}: {:?}",
            input.display(),
            err.kind()
        );
        let msg = err.to_string();
        assert!(
            msg.contains(want),
            "{}: {msg:?} does not contain {want:?}",
            input.display()
        );
        if err.kind() == ErrorKind::Xml {
            assert!(msg.starts_with("domain XML"), "{}: {msg}", input.display());
        }
    }
}
