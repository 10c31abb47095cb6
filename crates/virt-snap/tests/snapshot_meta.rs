//! Snapshot metadata through the library: `--redefine` building a tree (parent checks,
//! replacing a snapshot, cycles refused), the queries (list, tree text, info, dumpxml, current,
//! parent), a damaged file named without hiding the others, the request check, unknown
//! domains, and a 500-snapshot chain listed in linear work (counted, not timed).

use std::path::Path;
use virt_snap::snapshot::{DomainSnapshot, ListFilter, Scope, SnapshotName, SNAPSHOTS_SUBDIR};
use virt_snap::{Connection, ErrorKind};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn domain_xml(name: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>128</memory>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file'><driver name='qemu' type='qcow2'/>\
         <source file='/images/{name}.qcow2'/><target dev='vda' bus='virtio'/></disk>\
         </devices></domain>"
    )
}

/// A connection with domain `vm1` defined.
fn conn_with_vm1(dir: &Path) -> Connection {
    let conn = Connection::open(dir.join("state")).unwrap();
    rt().block_on(conn.define(&domain_xml("vm1"))).unwrap();
    conn
}

fn snap(name: &str, parent: Option<&str>, time: i64, body: &str) -> String {
    let parent = parent.map_or(String::new(), |p| {
        format!("<parent><name>{p}</name></parent>")
    });
    format!(
        "<domainsnapshot><name>{name}</name>{parent}<creationTime>{time}</creationTime>\
         {body}</domainsnapshot>"
    )
}

const INTERNAL: &str = "<state>running</state><memory snapshot='internal'/>\
                        <disks><disk name='vda' snapshot='internal'/></disks>";
const EXTERNAL: &str = "<state>disk-snapshot</state><memory snapshot='no'/>\
                        <disks><disk name='vda' snapshot='external'>\
                        <source file='/images/vm1.x'/></disk></disks>";
const STORAGE: &str = "<state>running</state><memory snapshot='no'/>\
                       <disks><disk name='vda' snapshot='storage'/></disks>";

fn names(conn: &Connection, filter: &ListFilter) -> Vec<String> {
    conn.snapshot_list("vm1", filter)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

#[test]
fn redefine_builds_a_tree_the_queries_read() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = conn_with_vm1(tmp.path());
    conn.snapshot_redefine("vm1", &snap("a", None, 100, INTERNAL), false)
        .unwrap();
    conn.snapshot_redefine("vm1", &snap("b", Some("a"), 200, EXTERNAL), true)
        .unwrap();
    let c = conn
        .snapshot_redefine("vm1", &snap("c", Some("a"), 300, STORAGE), false)
        .unwrap();
    assert_eq!(c.name.as_deref(), Some("c"));

    let all = conn.snapshot_list("vm1", &ListFilter::default()).unwrap();
    assert_eq!(all.len(), 3);
    let a = &all[0];
    assert_eq!(
        (a.name.as_str(), a.creation_time, a.state.as_deref()),
        ("a", Some(100), Some("running"))
    );
    assert_eq!(
        (a.parent.as_deref(), a.children, a.current),
        (None, 2, false)
    );
    assert_eq!(a.location, "internal");
    assert_eq!((all[1].location, all[1].current), ("external", true));
    assert_eq!(all[1].parent.as_deref(), Some("a"));
    assert_eq!(all[2].location, "storage");

    let leaves = ListFilter {
        leaves: true,
        ..Default::default()
    };
    assert_eq!(names(&conn, &leaves), ["b", "c"]);
    let ext = ListFilter {
        external: true,
        ..Default::default()
    };
    assert_eq!(names(&conn, &ext), ["b", "c"]);
    let kids = ListFilter {
        scope: Scope::Children(SnapshotName::new("a").unwrap()),
        ..Default::default()
    };
    assert_eq!(names(&conn, &kids), ["b", "c"]);

    let (text, damaged) = conn.snapshot_tree_text("vm1").unwrap();
    assert!(damaged.is_empty());
    // virsh's vshTreePrint: no separator between leaf siblings, a blank line after the last.
    assert_eq!(text, "a\n  |\n  +- b\n  +- c\n    \n");

    let i = conn.snapshot_info("vm1", "a").unwrap();
    assert_eq!((i.children, i.descendants, i.current), (2, 2, false));
    assert_eq!((i.domain.as_str(), i.metadata), ("vm1", true));
    let i = conn.snapshot_info("vm1", "b").unwrap();
    assert_eq!((i.parent.as_deref(), i.current), (Some("a"), true));

    assert_eq!(
        conn.snapshot_current("vm1")
            .unwrap()
            .unwrap()
            .name
            .as_deref(),
        Some("b")
    );
    assert_eq!(
        conn.snapshot_parent("vm1", "c").unwrap().as_deref(),
        Some("a")
    );
    assert_eq!(conn.snapshot_parent("vm1", "a").unwrap(), None);
    let xml = conn.snapshot_dumpxml("vm1", "b").unwrap();
    assert_eq!(
        DomainSnapshot::from_xml(&xml).unwrap(),
        DomainSnapshot::from_xml(&snap("b", Some("a"), 200, EXTERNAL)).unwrap()
    );

    // Redefining a snapshot replaces it (same name: not a duplicate); its children stay.
    conn.snapshot_redefine(
        "vm1",
        &snap(
            "a",
            None,
            100,
            &format!("<description>new</description>{INTERNAL}"),
        ),
        false,
    )
    .unwrap();
    assert_eq!(names(&conn, &ListFilter::default()), ["a", "b", "c"]);
    assert!(conn.snapshot_dumpxml("vm1", "a").unwrap().contains("new"));
    assert_eq!(conn.snapshot_info("vm1", "a").unwrap().children, 2);
    // Moving c under b is a redefinition too.
    conn.snapshot_redefine("vm1", &snap("c", Some("b"), 300, STORAGE), false)
        .unwrap();
    assert_eq!(conn.snapshot_info("vm1", "a").unwrap().descendants, 2);
    assert_eq!(
        conn.snapshot_parent("vm1", "c").unwrap().as_deref(),
        Some("b")
    );
}

#[test]
fn redefine_refuses_what_libvirt_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = conn_with_vm1(tmp.path());
    conn.snapshot_redefine("vm1", &snap("a", None, 1, INTERNAL), false)
        .unwrap();
    conn.snapshot_redefine("vm1", &snap("b", Some("a"), 2, INTERNAL), false)
        .unwrap();
    let kind = |xml: &str| conn.snapshot_redefine("vm1", xml, false).unwrap_err();
    let e = kind(&snap("o", Some("nope"), 3, INTERNAL));
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("\"nope\""), "{e}");
    let e = kind(&snap("a", Some("b"), 1, INTERNAL));
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = kind("<domainsnapshot><description>x</description></domainsnapshot>");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("<name>"), "{e}");
    let e = kind("<domainsnapshot><name>x</name>");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = kind("<domainsnapshot><name>x/y</name></domainsnapshot>");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    // Nothing of the refused ones was stored.
    assert_eq!(names(&conn, &ListFilter::default()), ["a", "b"]);
    assert_eq!(conn.snapshot_parent("vm1", "a").unwrap(), None);
    let e = conn.snapshot_info("vm1", "gone").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("\"gone\""), "{e}");
    assert_eq!(
        conn.snapshot_dumpxml("vm1", "gone").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        conn.snapshot_dumpxml("vm1", "../x").unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn unknown_domain_is_not_found_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = conn_with_vm1(tmp.path());
    let f = ListFilter::default();
    let errs = [
        conn.snapshot_list("ghost", &f).unwrap_err(),
        conn.snapshot_tree_text("ghost").unwrap_err(),
        conn.snapshot_info("ghost", "a").unwrap_err(),
        conn.snapshot_dumpxml("ghost", "a").unwrap_err(),
        conn.snapshot_current("ghost").unwrap_err(),
        conn.snapshot_parent("ghost", "a").unwrap_err(),
        conn.snapshot_redefine("ghost", &snap("a", None, 1, INTERNAL), false)
            .unwrap_err(),
    ];
    for e in errs {
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("\"ghost\""), "{e}");
    }
    // A defined domain without snapshots lists nothing.
    assert!(conn.snapshot_list("vm1", &f).unwrap().is_empty());
    assert_eq!(conn.snapshot_current("vm1").unwrap(), None);
}

#[test]
fn a_damaged_file_is_named_and_hides_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = conn_with_vm1(tmp.path());
    for (n, p) in [("a", None), ("b", Some("a")), ("c", Some("b"))] {
        conn.snapshot_redefine("vm1", &snap(n, p, 1, INTERNAL), false)
            .unwrap();
    }
    let dir = conn.state_dir().join(SNAPSHOTS_SUBDIR).join("vm1");
    std::fs::write(dir.join("b.xml"), "<domainsnapshot><name>b").unwrap();
    let l = conn
        .snapshot_listing("vm1", &ListFilter::default())
        .unwrap();
    let got: Vec<&str> = l.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(got, ["a", "c"]);
    assert_eq!(l.damaged.len(), 1);
    assert_eq!(l.damaged[0].name.as_deref(), Some("b"));
    assert_eq!(l.damaged[0].path, dir.join("b.xml"));
    // c lost its parent: it is a root now; a is a leaf.
    assert_eq!(l.snapshots[1].parent, None);
    assert_eq!(conn.snapshot_info("vm1", "a").unwrap().children, 0);
    let (_, damaged) = conn.snapshot_tree_text("vm1").unwrap();
    assert_eq!(damaged.len(), 1);
}

#[test]
fn requests_are_checked_against_the_definition() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = conn_with_vm1(tmp.path());
    conn.snapshot_redefine("vm1", &snap("a", None, 1, INTERNAL), false)
        .unwrap();
    let req = |xml: &str| DomainSnapshot::from_xml(xml).unwrap();
    let ok = "<domainsnapshot><name>n</name><disks><disk name='vda' snapshot='external'/>\
              </disks></domainsnapshot>";
    conn.snapshot_check_request("vm1", &req(ok)).unwrap();
    let by_path = "<domainsnapshot><disks><disk name='/images/vm1.qcow2' snapshot='no'/>\
                   </disks></domainsnapshot>";
    conn.snapshot_check_request("vm1", &req(by_path)).unwrap();
    let e = conn
        .snapshot_check_request("vm1", &req(&ok.replace("vda", "vdz")))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("no disk \"vdz\""), "{e}");
    let e = conn
        .snapshot_check_request("vm1", &req(&ok.replace(">n<", ">a<")))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let e = conn.snapshot_check_request("ghost", &req(ok)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn a_chain_of_500_lists_in_linear_work() {
    const N: usize = 500;
    let tmp = tempfile::tempdir().unwrap();
    let conn = conn_with_vm1(tmp.path());
    // The files as the capture writes them (redefining 500 one by one reloads the tree
    // each time: quadratic setup, not what is measured here).
    let dir = conn.state_dir().join(SNAPSHOTS_SUBDIR).join("vm1");
    std::fs::create_dir_all(&dir).unwrap();
    let name = |i: usize| format!("s{i:03}");
    for i in 0..N {
        let parent = (i > 0).then(|| name(i - 1));
        let xml = snap(&name(i), parent.as_deref(), i as i64, EXTERNAL);
        std::fs::write(dir.join(format!("{}.xml", name(i))), xml).unwrap();
    }
    // And one more through the facade, on top, current.
    conn.snapshot_redefine("vm1", &snap("top", Some("s499"), 999, EXTERNAL), true)
        .unwrap();
    let total = N + 1;

    let topo = ListFilter {
        topological: true,
        ..Default::default()
    };
    let l = conn.snapshot_listing("vm1", &topo).unwrap();
    assert_eq!(l.snapshots.len(), total);
    assert!(l.damaged.is_empty());
    assert_eq!(l.snapshots[0].name, "s000");
    assert_eq!(l.snapshots[N - 1].name, "s499");
    assert_eq!(l.snapshots[N].name, "top");
    assert!(l.snapshots[N].current);
    assert!(
        l.visits <= 4 * total as u64,
        "{} tree visits for {total} snapshots",
        l.visits
    );
    let leaves = ListFilter {
        leaves: true,
        ..Default::default()
    };
    let l = conn.snapshot_listing("vm1", &leaves).unwrap();
    assert_eq!(l.snapshots.len(), 1);
    assert!(l.visits <= 4 * total as u64, "{}", l.visits);
    let desc = ListFilter {
        scope: Scope::Descendants(SnapshotName::new("s000").unwrap()),
        ..Default::default()
    };
    let l = conn.snapshot_listing("vm1", &desc).unwrap();
    assert_eq!(l.snapshots.len(), total - 1);
    assert!(l.visits <= 4 * total as u64, "{}", l.visits);
    assert_eq!(conn.snapshot_info("vm1", "s000").unwrap().descendants, N);
    assert_eq!(
        conn.snapshot_parent("vm1", "top").unwrap().as_deref(),
        Some("s499")
    );
    let (text, _) = conn.snapshot_tree_text("vm1").unwrap();
    assert_eq!(text.lines().filter(|l| l.contains("+- ")).count(), N);
}
