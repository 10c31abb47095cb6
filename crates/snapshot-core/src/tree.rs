//! A domain's snapshots as a tree: each snapshot's parent and children, and the current
//! snapshot; virsh's `snapshot-list` filters and its `--tree` rendering; and the changes later
//! operations make (add, redefine, delete with libvirt's re-parenting, delete a subtree or only
//! the children).
//!
//! Every snapshot is indexed by name and every walk touches each snapshot it reports once, so
//! every operation is linear (or `n log n` where it sorts) in the number of snapshots it
//! concerns: a 10,000-deep chain is as cheap per snapshot as a flat list. Walks are iterative,
//! so depth never exhausts the stack. [`SnapshotTree::visits`] counts the nodes walks touch, for
//! tests to assert the complexity.
//!
//! Children are kept in name order, so listings and renderings are deterministic whatever
//! order the snapshots were loaded in.

use crate::error::{Error, ErrorKind, Result};
use crate::name::SnapshotName;
use crate::xml::DomainSnapshot;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
struct Node {
    def: DomainSnapshot,
    name: SnapshotName,
    parent: Option<usize>,
    children: BTreeMap<SnapshotName, usize>,
}

/// The snapshots of one domain, as a tree with a current snapshot.
#[derive(Debug, Default)]
pub struct SnapshotTree {
    slots: Vec<Option<Node>>,
    free: Vec<usize>,
    index: HashMap<SnapshotName, usize>,
    roots: BTreeMap<SnapshotName, usize>,
    current: Option<usize>,
    visits: AtomicU64,
}

/// A problem [`SnapshotTree::from_snapshots`] worked around while building a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TreeProblem {
    /// A snapshot without a `<name>`: left out.
    Unnamed,
    /// A second snapshot with the same name: left out (the first one is kept).
    Duplicate(SnapshotName),
    /// The snapshot's parent does not exist: it was made a root.
    MissingParent {
        /// The snapshot.
        name: SnapshotName,
        /// The parent it names.
        parent: SnapshotName,
    },
    /// The snapshot was part of a parent cycle: it was made a root, breaking the cycle.
    Cycle(SnapshotName),
}

/// Which snapshots [`SnapshotTree::list`] starts from (virsh's `--roots`, `--from`,
/// `--descendants`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every snapshot.
    #[default]
    All,
    /// Snapshots without a parent (`--roots`).
    Roots,
    /// The direct children of a snapshot (`--from X`).
    Children(SnapshotName),
    /// All descendants of a snapshot, not itself (`--from X --descendants`).
    Descendants(SnapshotName),
}

/// virsh's `snapshot-list` selection. Within each group of flags, none set means "no
/// filtering" and several set means "any of them" (libvirt's rule).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Where to start.
    pub scope: Scope,
    /// `--leaves`: snapshots without children.
    pub leaves: bool,
    /// `--no-leaves`: snapshots with children.
    pub no_leaves: bool,
    /// `--internal`: snapshots that are not external.
    pub internal: bool,
    /// `--external`: snapshots with external memory or disks ([`DomainSnapshot::is_external`]).
    pub external: bool,
    /// `--active`: snapshots of a running domain with memory.
    pub active: bool,
    /// `--inactive`: snapshots of a shut-off domain.
    pub inactive: bool,
    /// `--disk-only`: disk-only snapshots.
    pub disk_only: bool,
    /// `--topological`: parents before children, instead of name order.
    pub topological: bool,
}

impl ListFilter {
    fn keeps(&self, d: &DomainSnapshot, leaf: bool) -> bool {
        let any = |flags: &[bool], hits: &[bool]| {
            !flags.iter().any(|f| *f) || flags.iter().zip(hits).any(|(f, h)| *f && *h)
        };
        any(&[self.leaves, self.no_leaves], &[leaf, !leaf])
            && any(
                &[self.internal, self.external],
                &[!d.is_external(), d.is_external()],
            )
            && any(
                &[self.active, self.inactive, self.disk_only],
                &[d.is_active(), d.is_inactive(), d.is_disk_only()],
            )
    }
}

/// One line of the `--tree` rendering: a snapshot, its depth, and whether it is its
/// parent's last child (roots count as last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeRow<'a> {
    /// The snapshot.
    pub name: &'a SnapshotName,
    /// 0 for roots.
    pub depth: usize,
    /// The last of its parent's children (always true for roots).
    pub last: bool,
}

/// What [`SnapshotTree::deletion_order`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteScope {
    /// The snapshot only (its children move to its parent).
    Snapshot,
    /// The snapshot and all its descendants (`--children`).
    WithDescendants,
    /// Only its descendants (`--children-only`).
    DescendantsOnly,
}

impl SnapshotTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a tree from snapshots in any order, working around what is wrong (unnamed or
    /// duplicate snapshots are left out, orphans and cycle members become roots) and saying
    /// so. Linear in the number of snapshots (plus the name sorting).
    pub fn from_snapshots(
        defs: impl IntoIterator<Item = DomainSnapshot>,
    ) -> (Self, Vec<TreeProblem>) {
        let mut t = SnapshotTree::new();
        let mut problems = Vec::new();
        for def in defs {
            let Some(name) = def.name.clone() else {
                problems.push(TreeProblem::Unnamed);
                continue;
            };
            if t.index.contains_key(&name) {
                problems.push(TreeProblem::Duplicate(name));
                continue;
            }
            t.alloc(Node {
                def,
                name,
                parent: None,
                children: BTreeMap::new(),
            });
        }
        // Link parents.
        let ids: Vec<usize> = (0..t.slots.len()).collect();
        for &id in &ids {
            t.tick();
            let node = t.node(id);
            let Some(pname) = node.def.parent.clone() else {
                continue;
            };
            match t.index.get(&pname).copied() {
                Some(pid) if pid != id => t.node_mut(id).parent = Some(pid),
                Some(_) => {
                    problems.push(TreeProblem::Cycle(pname));
                    t.node_mut(id).def.parent = None;
                }
                None => {
                    problems.push(TreeProblem::MissingParent {
                        name: node.name.clone(),
                        parent: pname,
                    });
                    t.node_mut(id).def.parent = None;
                }
            }
        }
        // Break cycles: 0 = unseen, 1 = on the current upward walk, 2 = known acyclic.
        let mut mark = vec![0u8; t.slots.len()];
        for &start in &ids {
            let mut walk = Vec::new();
            let mut at = Some(start);
            while let Some(id) = at {
                t.tick();
                match mark[id] {
                    2 => break,
                    1 => {
                        // `id` closes a cycle: detach it from its parent.
                        problems.push(TreeProblem::Cycle(t.node(id).name.clone()));
                        let n = t.node_mut(id);
                        n.parent = None;
                        n.def.parent = None;
                        break;
                    }
                    _ => {
                        mark[id] = 1;
                        walk.push(id);
                        at = t.node(id).parent;
                    }
                }
            }
            for id in walk {
                mark[id] = 2;
            }
        }
        for &id in &ids {
            let (name, parent) = {
                let n = t.node(id);
                (n.name.clone(), n.parent)
            };
            match parent {
                Some(p) => t.node_mut(p).children.insert(name, id),
                None => t.roots.insert(name, id),
            };
        }
        (t, problems)
    }

    fn alloc(&mut self, node: Node) -> usize {
        let name = node.name.clone();
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(node);
                id
            }
            None => {
                self.slots.push(Some(node));
                self.slots.len() - 1
            }
        };
        self.index.insert(name, id);
        id
    }

    fn tick(&self) {
        self.visits.fetch_add(1, Ordering::Relaxed);
    }

    fn node(&self, id: usize) -> &Node {
        self.slots[id].as_ref().expect("live slot")
    }

    fn node_mut(&mut self, id: usize) -> &mut Node {
        self.slots[id].as_mut().expect("live slot")
    }

    fn id(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("snapshot {name:?}"),
                "no such snapshot",
            )
        })
    }

    /// How many nodes the tree's walks have touched so far: a work counter for tests that
    /// assert an operation's complexity.
    pub fn visits(&self) -> u64 {
        self.visits.load(Ordering::Relaxed)
    }

    /// The number of snapshots.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No snapshots.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Is there a snapshot called `name`?
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The snapshot called `name`.
    pub fn get(&self, name: &str) -> Option<&DomainSnapshot> {
        self.index.get(name).map(|&id| &self.node(id).def)
    }

    /// Its parent's name, `None` for a root (or an unknown name).
    pub fn parent(&self, name: &str) -> Option<&SnapshotName> {
        let id = *self.index.get(name)?;
        self.node(id).parent.map(|p| &self.node(p).name)
    }

    /// Its children, in name order.
    pub fn children(&self, name: &str) -> Result<Vec<&SnapshotName>> {
        let id = self.id(name)?;
        Ok(self.node(id).children.keys().collect())
    }

    /// The snapshots without a parent, in name order.
    pub fn roots(&self) -> Vec<&SnapshotName> {
        self.roots.keys().collect()
    }

    /// The current snapshot (the one the domain runs on top of).
    pub fn current(&self) -> Option<&SnapshotName> {
        self.current.map(|id| &self.node(id).name)
    }

    /// Makes `name` the current snapshot, or clears it with `None`.
    pub fn set_current(&mut self, name: Option<&str>) -> Result<()> {
        self.current = name.map(|n| self.id(n)).transpose()?;
        Ok(())
    }

    /// Its ancestors, nearest first (its parent, the parent's parent, ...).
    pub fn ancestors(&self, name: &str) -> Result<Vec<&SnapshotName>> {
        let mut out = Vec::new();
        let mut at = self.node(self.id(name)?).parent;
        while let Some(id) = at {
            self.tick();
            out.push(&self.node(id).name);
            at = self.node(id).parent;
        }
        Ok(out)
    }

    /// All its descendants, parents before children (not itself).
    pub fn descendants(&self, name: &str) -> Result<Vec<&SnapshotName>> {
        let id = self.id(name)?;
        Ok(self
            .preorder_from(&[id])
            .into_iter()
            .skip(1)
            .map(|i| &self.node(i).name)
            .collect())
    }

    /// Pre-order walk from `starts` (each with its subtree), children in name order.
    fn preorder_from(&self, starts: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack: Vec<usize> = starts.iter().rev().copied().collect();
        while let Some(id) = stack.pop() {
            self.tick();
            out.push(id);
            stack.extend(self.node(id).children.values().rev());
        }
        out
    }

    /// Every snapshot, parents before children (virsh's `--topological`).
    pub fn topological(&self) -> Vec<&SnapshotName> {
        let roots: Vec<usize> = self.roots.values().copied().collect();
        self.preorder_from(&roots)
            .into_iter()
            .map(|i| &self.node(i).name)
            .collect()
    }

    /// The snapshots without children, in name order.
    pub fn leaves(&self) -> Vec<&SnapshotName> {
        let mut v: Vec<&SnapshotName> = self
            .slots
            .iter()
            .flatten()
            .inspect(|_| self.tick())
            .filter(|n| n.children.is_empty())
            .map(|n| &n.name)
            .collect();
        v.sort();
        v
    }

    /// virsh `snapshot-list`: the snapshots `filter` selects, in name order or, with
    /// `topological`, parents before children.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<&DomainSnapshot>> {
        let ids: Vec<usize> = match &filter.scope {
            Scope::All => {
                let roots: Vec<usize> = self.roots.values().copied().collect();
                self.preorder_from(&roots)
            }
            Scope::Roots => self.roots.values().copied().collect(),
            Scope::Children(n) => self.node(self.id(n)?).children.values().copied().collect(),
            Scope::Descendants(n) => {
                let mut v = self.preorder_from(&[self.id(n)?]);
                v.remove(0);
                v
            }
        };
        let mut out: Vec<&Node> = ids
            .into_iter()
            .map(|i| self.node(i))
            .filter(|n| filter.keeps(&n.def, n.children.is_empty()))
            .collect();
        if !filter.topological {
            out.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(out.into_iter().map(|n| &n.def).collect())
    }

    /// The `--tree` rows: every snapshot in pre-order with its depth.
    pub fn tree_rows(&self) -> Vec<TreeRow<'_>> {
        let mut out = Vec::with_capacity(self.len());
        let mut stack: Vec<(usize, usize, bool)> = Vec::new();
        for &r in self.roots.values().rev() {
            stack.push((r, 0, true));
        }
        while let Some((id, depth, last)) = stack.pop() {
            self.tick();
            let node = self.node(id);
            out.push(TreeRow {
                name: &node.name,
                depth,
                last,
            });
            let k = node.children.len();
            for (i, &c) in node.children.values().enumerate().rev() {
                stack.push((c, depth + 1, i + 1 == k));
            }
        }
        out
    }

    /// The `--tree` text exactly as virsh prints it:
    ///
    /// ```text
    /// s1
    ///   |
    ///   +- s2
    ///   |   |
    ///   |   +- s3
    ///   |
    ///   +- s4
    /// ```
    ///
    /// (virsh leaves trailing spaces on the blank lines after a last leaf; so does this.)
    ///
    /// Its size grows with the depth of each line (a deep chain's text is long); the work
    /// is proportional to the text.
    pub fn render_tree(&self) -> String {
        enum Task {
            Enter(usize, bool, bool),
            Exit(bool, bool, bool),
        }
        let mut s = String::new();
        let mut indent = String::new();
        let mut tasks: Vec<Task> = self
            .roots
            .values()
            .rev()
            .map(|&r| Task::Enter(r, true, true))
            .collect();
        while let Some(t) = tasks.pop() {
            match t {
                Task::Enter(id, last, root) => {
                    self.tick();
                    let node = self.node(id);
                    s.push_str(&indent);
                    if !root {
                        s.push_str("+- ");
                    }
                    s.push_str(node.name.as_str());
                    s.push('\n');
                    if !root {
                        indent.push(if last { ' ' } else { '|' });
                        indent.push(' ');
                    }
                    let has_children = !node.children.is_empty();
                    if has_children {
                        s.push_str(&indent);
                        s.push_str("  |\n");
                    }
                    indent.push_str("  ");
                    tasks.push(Task::Exit(last, root, has_children));
                    let k = node.children.len();
                    for (i, &c) in node.children.values().enumerate().rev() {
                        tasks.push(Task::Enter(c, i + 1 == k, false));
                    }
                }
                Task::Exit(last, root, has_children) => {
                    indent.truncate(indent.len() - 2);
                    if !has_children && last {
                        s.push_str(&indent);
                        s.push('\n');
                    }
                    if !root {
                        indent.truncate(indent.len() - 2);
                    }
                }
            }
        }
        s
    }

    /// Adds a new snapshot. It must have a name not yet used; its parent, if it names one,
    /// must exist. Does not change the current snapshot.
    pub fn insert(&mut self, def: DomainSnapshot) -> Result<()> {
        let name = def.name.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidName,
                "snapshot",
                "a snapshot needs a name",
            )
        })?;
        if self.index.contains_key(&name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("snapshot {:?}", name.as_str()),
                "a snapshot of that name exists",
            ));
        }
        let parent = def.parent.as_deref().map(|p| self.id(p)).transpose()?;
        let id = self.alloc(Node {
            def,
            name: name.clone(),
            parent,
            children: BTreeMap::new(),
        });
        match parent {
            Some(p) => self.node_mut(p).children.insert(name, id),
            None => self.roots.insert(name, id),
        };
        Ok(())
    }

    /// Replaces an existing snapshot's metadata (`--redefine`), moving it if its parent
    /// changed (refused if that would make it its own ancestor), or inserts it if new.
    pub fn redefine(&mut self, def: DomainSnapshot) -> Result<()> {
        let Some(id) = def.name.as_deref().and_then(|n| self.index.get(n).copied()) else {
            return self.insert(def);
        };
        let new_parent = def.parent.clone();
        let name = self.node(id).name.clone();
        self.reparent(&name, new_parent.as_deref())?;
        self.node_mut(id).def = def;
        Ok(())
    }

    /// Moves `name` under `new_parent` (or makes it a root); refused if `new_parent` is
    /// `name` or one of its descendants. Costs the depth of `new_parent`.
    pub fn reparent(&mut self, name: &str, new_parent: Option<&str>) -> Result<()> {
        let id = self.id(name)?;
        let np = new_parent.map(|p| self.id(p)).transpose()?;
        let mut at = np;
        while let Some(a) = at {
            self.tick();
            if a == id {
                return Err(Error::new(
                    ErrorKind::Cycle,
                    format!("snapshot {name:?}"),
                    format!(
                        "cannot become a child of {:?}, its own descendant",
                        new_parent.unwrap_or_default()
                    ),
                ));
            }
            at = self.node(a).parent;
        }
        self.detach(id);
        self.attach(id, np);
        Ok(())
    }

    fn detach(&mut self, id: usize) {
        let name = self.node(id).name.clone();
        match self.node(id).parent {
            Some(p) => self.node_mut(p).children.remove(&name),
            None => self.roots.remove(&name),
        };
    }

    fn attach(&mut self, id: usize, parent: Option<usize>) {
        let name = self.node(id).name.clone();
        let pname = parent.map(|p| self.node(p).name.clone());
        {
            let n = self.node_mut(id);
            n.parent = parent;
            n.def.parent = pname;
        }
        match parent {
            Some(p) => self.node_mut(p).children.insert(name, id),
            None => self.roots.insert(name, id),
        };
    }

    fn free_node(&mut self, id: usize) -> DomainSnapshot {
        let node = self.slots[id].take().expect("live slot");
        self.index.remove(&node.name);
        self.free.push(id);
        node.def
    }

    /// Deletes one snapshot the libvirt way: its children become children of its parent
    /// (roots if it had none); if it was current, its parent becomes current. Returns its
    /// metadata. The children whose `<parent>` changed are [`SnapshotTree::children`] of the
    /// parent and must be written back to the store.
    pub fn remove(&mut self, name: &str) -> Result<DomainSnapshot> {
        let id = self.id(name)?;
        let parent = self.node(id).parent;
        self.detach(id);
        let kids: Vec<usize> = std::mem::take(&mut self.node_mut(id).children)
            .into_values()
            .collect();
        for k in kids {
            self.tick();
            self.attach(k, parent);
        }
        if self.current == Some(id) {
            self.current = parent;
        }
        Ok(self.free_node(id))
    }

    /// The names an operation of `scope` on `name` deletes, children before parents (the
    /// order to delete their data in).
    pub fn deletion_order(&self, name: &str, scope: DeleteScope) -> Result<Vec<&SnapshotName>> {
        let id = self.id(name)?;
        let mut ids = match scope {
            DeleteScope::Snapshot => vec![id],
            DeleteScope::WithDescendants => self.preorder_from(&[id]),
            DeleteScope::DescendantsOnly => {
                let mut v = self.preorder_from(&[id]);
                v.remove(0);
                v
            }
        };
        ids.reverse();
        Ok(ids.into_iter().map(|i| &self.node(i).name).collect())
    }

    /// Deletes `name` and all its descendants (`--children`); if the current snapshot was
    /// among them, the parent of `name` becomes current. Returns their metadata, children
    /// before parents.
    pub fn remove_with_descendants(&mut self, name: &str) -> Result<Vec<DomainSnapshot>> {
        let id = self.id(name)?;
        let parent = self.node(id).parent;
        self.detach(id);
        Ok(self.remove_subtree(id, parent))
    }

    /// Deletes all descendants of `name`, keeping it (`--children-only`); if the current
    /// snapshot was among them, `name` becomes current. Returns their metadata, children
    /// before parents.
    pub fn remove_descendants(&mut self, name: &str) -> Result<Vec<DomainSnapshot>> {
        let id = self.id(name)?;
        let kids: Vec<usize> = std::mem::take(&mut self.node_mut(id).children)
            .into_values()
            .collect();
        let mut out = Vec::new();
        for k in kids {
            out.extend(self.remove_subtree(k, Some(id)));
        }
        Ok(out)
    }

    /// Frees the (already detached) subtree at `id`; a current snapshot inside it moves to
    /// `heir`.
    fn remove_subtree(&mut self, id: usize, heir: Option<usize>) -> Vec<DomainSnapshot> {
        let mut ids = self.preorder_from(&[id]);
        ids.reverse();
        let mut out = Vec::with_capacity(ids.len());
        for i in ids {
            if self.current == Some(i) {
                self.current = heir;
            }
            out.push(self.free_node(i));
        }
        out
    }
}
