//! The snapshot tree: structure, virsh's list filters and `--tree` text, libvirt's deletion
//! semantics, lenient loading, and linear cost on 10,000 snapshots (counted, not timed).

use snapshot_core::tree::{DeleteScope, TreeProblem, TreeRow};
use snapshot_core::xml::{Disk, Memory};
use snapshot_core::{
    DomainSnapshot, ErrorKind, ListFilter, Location, Scope, SnapshotName, SnapshotState,
    SnapshotTree,
};

fn n(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

fn snap(name: &str, parent: Option<&str>, state: SnapshotState, external: bool) -> DomainSnapshot {
    DomainSnapshot {
        name: Some(n(name)),
        parent: parent.map(n),
        state: Some(state),
        memory: Some(Memory {
            snapshot: Some(if state == SnapshotState::Running {
                if external {
                    Location::External
                } else {
                    Location::Internal
                }
            } else {
                Location::No
            }),
            file: (external && state == SnapshotState::Running).then(|| "/ram".into()),
            ..Default::default()
        }),
        disks: vec![Disk {
            name: "vda".into(),
            snapshot: Some(if external {
                Location::External
            } else {
                Location::Internal
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn simple(name: &str, parent: Option<&str>) -> DomainSnapshot {
    snap(name, parent, SnapshotState::Running, false)
}

fn names(v: Vec<&DomainSnapshot>) -> Vec<&str> {
    v.into_iter().map(|d| d.name.as_deref().unwrap()).collect()
}

fn strs(v: Vec<&SnapshotName>) -> Vec<&str> {
    v.into_iter().map(|s| s.as_str()).collect()
}

/// a ─┬─ b ── c
///    └─ d
/// e
fn sample() -> SnapshotTree {
    let mut t = SnapshotTree::new();
    t.insert(snap("a", None, SnapshotState::Shutoff, false))
        .unwrap();
    t.insert(snap("b", Some("a"), SnapshotState::Running, false))
        .unwrap();
    t.insert(snap("c", Some("b"), SnapshotState::DiskSnapshot, true))
        .unwrap();
    t.insert(snap("d", Some("a"), SnapshotState::Running, true))
        .unwrap();
    t.insert(snap("e", None, SnapshotState::Paused, false))
        .unwrap();
    t.set_current(Some("c")).unwrap();
    t
}

#[test]
fn structure_queries() {
    let t = sample();
    assert_eq!(t.len(), 5);
    assert_eq!(strs(t.roots()), ["a", "e"]);
    assert_eq!(strs(t.children("a").unwrap()), ["b", "d"]);
    assert_eq!(t.parent("c").map(|p| p.as_str()), Some("b"));
    assert_eq!(t.parent("a"), None);
    assert_eq!(strs(t.descendants("a").unwrap()), ["b", "c", "d"]);
    assert_eq!(strs(t.ancestors("c").unwrap()), ["b", "a"]);
    assert_eq!(strs(t.leaves()), ["c", "d", "e"]);
    assert_eq!(strs(t.topological()), ["a", "b", "c", "d", "e"]);
    assert_eq!(t.current().map(|c| c.as_str()), Some("c"));
    assert_eq!(t.children("zz").unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn insert_refuses_duplicates_missing_parents_and_unnamed() {
    let mut t = sample();
    assert_eq!(
        t.insert(simple("a", None)).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        t.insert(simple("x", Some("nope"))).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let unnamed = DomainSnapshot::default();
    assert_eq!(
        t.insert(unnamed).unwrap_err().kind(),
        ErrorKind::InvalidName
    );
    assert_eq!(t.len(), 5);
}

#[test]
fn list_filters_like_virsh() {
    let t = sample();
    let all = ListFilter::default();
    assert_eq!(names(t.list(&all).unwrap()), ["a", "b", "c", "d", "e"]);
    let f = |g: fn(&mut ListFilter)| {
        let mut x = ListFilter::default();
        g(&mut x);
        names(t.list(&x).unwrap())
    };
    assert_eq!(f(|x| x.scope = Scope::Roots), ["a", "e"]);
    assert_eq!(f(|x| x.scope = Scope::Children(n("a"))), ["b", "d"]);
    assert_eq!(f(|x| x.scope = Scope::Descendants(n("a"))), ["b", "c", "d"]);
    assert_eq!(f(|x| x.leaves = true), ["c", "d", "e"]);
    assert_eq!(f(|x| x.no_leaves = true), ["a", "b"]);
    assert_eq!(
        f(|x| {
            x.leaves = true;
            x.no_leaves = true
        }),
        ["a", "b", "c", "d", "e"]
    );
    assert_eq!(f(|x| x.external = true), ["c", "d"]);
    assert_eq!(f(|x| x.internal = true), ["a", "b", "e"]);
    assert_eq!(f(|x| x.disk_only = true), ["c"]);
    assert_eq!(f(|x| x.inactive = true), ["a"]);
    assert_eq!(f(|x| x.active = true), ["b", "d", "e"]);
    assert_eq!(
        f(|x| {
            x.active = true;
            x.disk_only = true
        }),
        ["b", "c", "d", "e"]
    );
    assert_eq!(
        f(|x| {
            x.scope = Scope::Descendants(n("a"));
            x.leaves = true;
            x.external = true
        }),
        ["c", "d"]
    );
    // Name order by default, parents first with --topological.
    let mut t2 = SnapshotTree::new();
    t2.insert(simple("z", None)).unwrap();
    t2.insert(simple("m", Some("z"))).unwrap();
    t2.insert(simple("a", Some("m"))).unwrap();
    assert_eq!(
        names(t2.list(&ListFilter::default()).unwrap()),
        ["a", "m", "z"]
    );
    let topo = ListFilter {
        topological: true,
        ..Default::default()
    };
    assert_eq!(names(t2.list(&topo).unwrap()), ["z", "m", "a"]);
}

#[test]
fn tree_text_is_virshs() {
    let t = sample();
    let want = "a\n  |\n  +- b\n  |   |\n  |   +- c\n  |     \n  +- d\n    \ne\n\n";
    assert_eq!(t.render_tree(), want);
    let mut chain = SnapshotTree::new();
    chain.insert(simple("s1", None)).unwrap();
    chain.insert(simple("s2", Some("s1"))).unwrap();
    chain.insert(simple("s3", Some("s2"))).unwrap();
    assert_eq!(
        chain.render_tree(),
        "s1\n  |\n  +- s2\n      |\n      +- s3\n        \n"
    );
    let rows = t.tree_rows();
    assert_eq!(
        rows,
        vec![
            TreeRow {
                name: &n("a"),
                depth: 0,
                last: true
            },
            TreeRow {
                name: &n("b"),
                depth: 1,
                last: false
            },
            TreeRow {
                name: &n("c"),
                depth: 2,
                last: true
            },
            TreeRow {
                name: &n("d"),
                depth: 1,
                last: true
            },
            TreeRow {
                name: &n("e"),
                depth: 0,
                last: true
            },
        ]
    );
}

#[test]
fn remove_reparents_children_and_moves_current() {
    let mut t = sample();
    t.set_current(Some("b")).unwrap();
    let gone = t.remove("b").unwrap();
    assert_eq!(gone.name.as_deref(), Some("b"));
    assert!(!t.contains("b"));
    assert_eq!(t.parent("c").map(|p| p.as_str()), Some("a"));
    // The child's own metadata says so too (it is what the store writes back).
    assert_eq!(t.get("c").unwrap().parent.as_deref(), Some("a"));
    assert_eq!(strs(t.children("a").unwrap()), ["c", "d"]);
    assert_eq!(t.current().map(|c| c.as_str()), Some("a"));
    // Removing a root makes its children roots.
    t.remove("a").unwrap();
    assert_eq!(strs(t.roots()), ["c", "d", "e"]);
    assert_eq!(t.get("d").unwrap().parent, None);
    assert_eq!(t.current(), None);
}

#[test]
fn delete_with_children_and_children_only() {
    let mut t = sample();
    assert_eq!(
        strs(t.deletion_order("a", DeleteScope::WithDescendants).unwrap()),
        ["d", "c", "b", "a"]
    );
    assert_eq!(
        strs(t.deletion_order("a", DeleteScope::DescendantsOnly).unwrap()),
        ["d", "c", "b"]
    );
    assert_eq!(
        strs(t.deletion_order("b", DeleteScope::Snapshot).unwrap()),
        ["b"]
    );

    let gone = t.remove_descendants("a").unwrap();
    let gone: Vec<_> = gone.iter().map(|d| d.name.as_deref().unwrap()).collect();
    assert_eq!(gone, ["c", "b", "d"]);
    assert!(t.contains("a") && t.children("a").unwrap().is_empty());
    assert_eq!(
        t.current().map(|c| c.as_str()),
        Some("a"),
        "current c was removed"
    );

    let mut t = sample();
    let gone = t.remove_with_descendants("b").unwrap();
    assert_eq!(gone.len(), 2);
    assert_eq!(t.current().map(|c| c.as_str()), Some("a"));
    assert_eq!(strs(t.topological()), ["a", "d", "e"]);
    // Freed slots are reused without confusion.
    t.insert(simple("b", Some("d"))).unwrap();
    assert_eq!(strs(t.topological()), ["a", "d", "b", "e"]);
}

#[test]
fn reparent_and_redefine_refuse_cycles() {
    let mut t = sample();
    assert_eq!(
        t.reparent("a", Some("c")).unwrap_err().kind(),
        ErrorKind::Cycle
    );
    assert_eq!(
        t.reparent("a", Some("a")).unwrap_err().kind(),
        ErrorKind::Cycle
    );
    t.reparent("d", Some("c")).unwrap();
    assert_eq!(t.get("d").unwrap().parent.as_deref(), Some("c"));
    let mut b = t.get("b").unwrap().clone();
    b.parent = Some(n("d"));
    assert_eq!(t.redefine(b.clone()).unwrap_err().kind(), ErrorKind::Cycle);
    b.parent = Some(n("e"));
    b.description = Some("moved".into());
    t.redefine(b).unwrap();
    assert_eq!(strs(t.children("e").unwrap()), ["b"]);
    assert_eq!(t.get("b").unwrap().description.as_deref(), Some("moved"));
    t.redefine(simple("new", Some("b"))).unwrap();
    assert_eq!(strs(t.descendants("e").unwrap()), ["b", "c", "d", "new"]);
}

#[test]
fn from_snapshots_works_around_damage() {
    let defs = vec![
        simple("child", Some("root")),
        simple("root", None),
        simple("orphan", Some("missing")),
        simple("root", None),
        DomainSnapshot::default(),
        simple("x", Some("y")),
        simple("y", Some("x")),
        simple("self", Some("self")),
        simple("under-x", Some("x")),
    ];
    let (t, problems) = SnapshotTree::from_snapshots(defs);
    assert_eq!(t.len(), 7);
    assert!(problems.contains(&TreeProblem::Duplicate(n("root"))));
    assert!(problems.contains(&TreeProblem::Unnamed));
    assert!(problems.contains(&TreeProblem::MissingParent {
        name: n("orphan"),
        parent: n("missing")
    }));
    assert!(problems.contains(&TreeProblem::Cycle(n("self"))));
    assert!(problems
        .iter()
        .any(|p| matches!(p, TreeProblem::Cycle(c) if c.as_str() == "x" || c.as_str() == "y")));
    assert_eq!(t.parent("child").map(|p| p.as_str()), Some("root"));
    assert_eq!(t.topological().len(), 7, "every snapshot is reachable");
    assert_eq!(t.get("orphan").unwrap().parent, None);
}

const N: usize = 10_000;

#[test]
fn a_10000_deep_chain_costs_linear_work() {
    let mut t = SnapshotTree::new();
    t.insert(simple("s0", None)).unwrap();
    for i in 1..N {
        t.insert(simple(&format!("s{i}"), Some(&format!("s{}", i - 1))))
            .unwrap();
    }
    t.set_current(Some(&format!("s{}", N - 1))).unwrap();
    let before = t.visits();
    assert_eq!(t.topological().len(), N);
    assert_eq!(t.descendants("s0").unwrap().len(), N - 1);
    assert_eq!(t.ancestors(&format!("s{}", N - 1)).unwrap().len(), N - 1);
    assert_eq!(t.leaves().len(), 1);
    assert_eq!(t.list(&ListFilter::default()).unwrap().len(), N);
    let leaves = ListFilter {
        scope: Scope::Descendants(n("s0")),
        leaves: true,
        ..Default::default()
    };
    assert_eq!(t.list(&leaves).unwrap().len(), 1);
    assert_eq!(t.tree_rows().len(), N);
    assert_eq!(t.tree_rows()[N - 1].depth, N - 1);
    // Ten walks of the whole chain: about ten visits per snapshot, not N.
    let walked = t.visits() - before;
    assert!(walked <= 10 * N as u64, "{walked} visits");

    // Removing from the middle reparents in constant work; a cycle check costs the depth.
    let before = t.visits();
    t.remove("s5000").unwrap();
    assert_eq!(t.parent("s5001").map(|p| p.as_str()), Some("s4999"));
    assert!(t.visits() - before <= 2);
    assert_eq!(
        t.reparent("s0", Some("s9999")).unwrap_err().kind(),
        ErrorKind::Cycle
    );

    // Deleting the bottom half with its descendants, then building from the store's order.
    let before = t.visits();
    let gone = t.remove_with_descendants("s5001").unwrap();
    assert_eq!(gone.len(), N - 5001);
    assert!(t.visits() - before <= N as u64);
    assert_eq!(t.current().map(|c| c.as_str()), Some("s4999"));

    let defs: Vec<DomainSnapshot> = (0..N)
        .rev()
        .map(|i| {
            let p = (i > 0).then(|| format!("s{}", i - 1));
            simple(&format!("s{i}"), p.as_deref())
        })
        .collect();
    let (t, problems) = SnapshotTree::from_snapshots(defs);
    assert!(problems.is_empty());
    assert!(t.visits() <= 3 * N as u64, "{} visits to load", t.visits());
    assert_eq!(t.topological()[N - 1].as_str(), format!("s{}", N - 1));
    // The text of a deep chain renders without recursion (its size grows with depth
    // squared, so 2,000 levels: 4,000 lines).
    let mut deep = SnapshotTree::new();
    deep.insert(simple("s0", None)).unwrap();
    for i in 1..2000 {
        deep.insert(simple(&format!("s{i}"), Some(&format!("s{}", i - 1))))
            .unwrap();
    }
    let text = deep.render_tree();
    assert_eq!(text.lines().count(), 4000);
    // Depth d is drawn 2 + 4 (d - 1) columns in (a last child's bar is a space).
    let last = format!("\n{}+- s1999\n", " ".repeat(2 + 4 * 1998));
    assert!(text.contains(&last), "{:?}", &text[text.len() - 200..]);
}

#[test]
fn a_10000_wide_tree_costs_linear_work() {
    let mut t = SnapshotTree::new();
    t.insert(simple("root", None)).unwrap();
    for i in 0..N {
        t.insert(simple(&format!("c{i:05}"), Some("root"))).unwrap();
    }
    let before = t.visits();
    assert_eq!(t.leaves().len(), N);
    assert_eq!(t.children("root").unwrap().len(), N);
    let no_leaves = ListFilter {
        no_leaves: true,
        ..Default::default()
    };
    assert_eq!(names(t.list(&no_leaves).unwrap()), ["root"]);
    assert!(t.visits() - before <= 3 * N as u64);

    // Deleting every child one by one: constant work each.
    let before = t.visits();
    for i in (0..N).step_by(2) {
        t.remove(&format!("c{i:05}")).unwrap();
    }
    assert!(t.visits() - before <= N as u64);
    assert_eq!(t.children("root").unwrap().len(), N / 2);
    // Deleting the root moves all children to the top: one visit each.
    let before = t.visits();
    t.remove("root").unwrap();
    assert_eq!(t.roots().len(), N / 2);
    assert!(t.visits() - before <= N as u64);
    assert_eq!(t.get("c00001").unwrap().parent, None);
}
