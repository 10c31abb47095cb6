//! The metadata store on a real (temporary) directory: files read back, modes, atomicity
//! leftovers, damaged files reported by name, the current pointer.

use snapshot_core::store::CURRENT_FILE;
use snapshot_core::{DomainSnapshot, ErrorKind, SnapshotName, SnapshotState, SnapshotStore};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn n(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

fn snap(name: &str, parent: Option<&str>) -> DomainSnapshot {
    DomainSnapshot {
        name: Some(n(name)),
        parent: parent.map(n),
        state: Some(SnapshotState::DiskSnapshot),
        creation_time: Some(1_700_000_000),
        ..Default::default()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn save_writes_libvirt_xml_files_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(tmp.path().join("snapshots"));
    let dom = store.domain("web1").unwrap();
    let s = snap("my snap", None);
    dom.save(&s).unwrap();
    let file = tmp.path().join("snapshots/web1/my snap.xml");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), s.to_xml());
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&tmp.path().join("snapshots")), 0o700);
    assert_eq!(mode(dom.dir()), 0o700);
    assert_eq!(dom.read(&n("my snap")).unwrap(), s);
    // Overwriting replaces the content and leaves no temporary file.
    let mut s2 = s.clone();
    s2.description = Some("second".into());
    dom.save(&s2).unwrap();
    assert_eq!(dom.read(&n("my snap")).unwrap(), s2);
    let entries: Vec<_> = std::fs::read_dir(dom.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["my snap.xml"]);
}

#[test]
fn names_and_domains_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(tmp.path());
    assert_eq!(
        store.domain("../etc").unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        store.domain("..").unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    let dom = store.domain("vm").unwrap();
    let unnamed = DomainSnapshot::default();
    assert_eq!(
        dom.save(&unnamed).unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(
        dom.read(&n("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn load_builds_the_tree_and_current() {
    let tmp = tempfile::tempdir().unwrap();
    let dom = SnapshotStore::new(tmp.path()).domain("vm").unwrap();
    // An empty (missing) directory loads as an empty tree.
    let l = dom.load().unwrap();
    assert!(l.tree.is_empty() && l.damaged.is_empty());
    for (name, parent) in [("a", None), ("b", Some("a")), ("c", Some("b"))] {
        dom.save(&snap(name, parent)).unwrap();
    }
    dom.set_current(Some(&n("c"))).unwrap();
    assert_eq!(
        std::fs::read_to_string(dom.dir().join(CURRENT_FILE)).unwrap(),
        "c\n"
    );
    assert_eq!(mode(&dom.dir().join(CURRENT_FILE)), 0o600);
    let l = dom.load().unwrap();
    assert_eq!(l.tree.len(), 3);
    assert_eq!(l.tree.current().map(|c| c.as_str()), Some("c"));
    assert_eq!(l.tree.parent("c").map(|p| p.as_str()), Some("b"));
    assert!(l.damaged.is_empty() && l.problems.is_empty() && l.stale_current.is_none());
    assert_eq!(dom.names().unwrap(), [n("a"), n("b"), n("c")]);

    // Deleting b the libvirt way: c is rewritten with its new parent, b's file goes.
    let mut tree = l.tree;
    tree.remove("b").unwrap();
    dom.save(tree.get("c").unwrap()).unwrap();
    dom.remove(&n("b")).unwrap();
    dom.set_current(tree.current()).unwrap();
    let l = dom.load().unwrap();
    assert_eq!(l.tree.parent("c").map(|p| p.as_str()), Some("a"));
    assert!(!dom.dir().join("b.xml").exists());
    dom.set_current(None).unwrap();
    assert!(!dom.dir().join(CURRENT_FILE).exists());
    assert_eq!(dom.current().unwrap(), None);
}

#[test]
fn a_damaged_file_is_reported_by_name_and_the_others_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dom = SnapshotStore::new(tmp.path()).domain("vm").unwrap();
    for (name, parent) in [
        ("a", None),
        ("b", Some("a")),
        ("c", Some("b")),
        ("d", Some("a")),
    ] {
        dom.save(&snap(name, parent)).unwrap();
    }
    std::fs::write(dom.dir().join("b.xml"), "<domainsnapshot><name>b</name>").unwrap();
    // A file whose content names another snapshot.
    std::fs::write(dom.dir().join("e.xml"), snap("zzz", None).to_xml()).unwrap();
    // Left-overs of an interrupted write and unrelated files are ignored.
    std::fs::write(dom.dir().join(".a.xml.tmp-123"), "garbage").unwrap();
    std::fs::write(dom.dir().join("notes.txt"), "x").unwrap();
    dom.set_current(Some(&n("b"))).unwrap();

    let l = dom.load().unwrap();
    let bad: Vec<String> = l
        .damaged
        .iter()
        .map(|d| d.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(bad, ["b.xml", "e.xml"]);
    let msg = l.damaged[0].error.to_string();
    assert!(
        msg.contains("b.xml") && msg.contains("ends inside"),
        "{msg}"
    );
    assert_eq!(
        l.damaged[0].error.path(),
        Some(dom.dir().join("b.xml").as_path())
    );
    assert_eq!(l.tree.len(), 3);
    // c lost its parent: it is a root now, and the problem says why.
    assert_eq!(l.tree.parent("c"), None);
    assert_eq!(l.problems.len(), 1);
    assert_eq!(l.stale_current.as_deref(), Some("b"));
    assert_eq!(l.tree.current(), None);
}

#[test]
fn libvirt_metadata_without_a_pointer_uses_active() {
    let tmp = tempfile::tempdir().unwrap();
    let dom = SnapshotStore::new(tmp.path()).domain("vm").unwrap();
    let mut a = snap("a", None);
    a.active = Some(false);
    let mut b = snap("b", Some("a"));
    b.active = Some(true);
    dom.save(&a).unwrap();
    dom.save(&b).unwrap();
    let l = dom.load().unwrap();
    assert_eq!(l.tree.current().map(|c| c.as_str()), Some("b"));
}
