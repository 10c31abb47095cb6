//! Snapshot metadata: virsh's `snapshot-list`, `snapshot-info`, `snapshot-dumpxml`,
//! `snapshot-current`, `snapshot-parent` and `snapshot-create --redefine`, as methods of
//! [`Connection`] over snapshot-core's store (`<state dir>/snapshots/DOMAIN/`, see
//! docs/snapshot-metadata.md).
//!
//! Every query loads the domain's tree once (linear in its snapshots). A snapshot file that
//! cannot be read is reported by name and path in [`SnapshotListing::damaged`] (logged as a
//! warning where the caller does not get the list); the other snapshots are listed regardless. A domain that is neither defined nor
//! ran here is [`ErrorKind::NotFound`], naming it.

use super::{DomainSnapshot, ListFilter, Location};
use crate::connection::Connection;
use crate::error::{Error, ErrorKind, Result};
use serde::Serialize;
use snapshot_core::store::Loaded;
use snapshot_core::{DomainStore, SnapshotName, SnapshotStore, SnapshotTree};
use std::path::PathBuf;

/// The snapshot store's directory in the state dir.
pub const SNAPSHOTS_SUBDIR: &str = "snapshots";

/// One line of `snapshot-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotSummary {
    /// The snapshot's name.
    pub name: String,
    /// `<creationTime>`, seconds since the epoch.
    pub creation_time: Option<i64>,
    /// `<state>` (`running`, `shutoff`, `disk-snapshot`, ...).
    pub state: Option<String>,
    /// The parent's name.
    pub parent: Option<String>,
    /// Where the data is: `internal`, `external` or `storage` ([`location_kind`]).
    pub location: &'static str,
    /// Is it the domain's current snapshot?
    pub current: bool,
    /// How many direct children it has.
    pub children: usize,
}

/// A snapshot file that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamagedSnapshot {
    /// The snapshot's name (from the file name), if the file name is one.
    pub name: Option<String>,
    /// The file.
    pub path: PathBuf,
    /// Why it could not be loaded.
    pub error: String,
}

/// What [`Connection::snapshot_listing`] found: the selected snapshots and the files that
/// could not be loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotListing {
    /// The snapshots the filter selects, in its order.
    pub snapshots: Vec<SnapshotSummary>,
    /// The snapshot files that could not be loaded (each named, none hiding the others).
    pub damaged: Vec<DamagedSnapshot>,
    /// How many snapshot-tree nodes the query touched: at most a small multiple of the
    /// snapshots (every query is linear), for tests to check without timing.
    #[serde(skip)]
    pub visits: u64,
}

/// virsh `snapshot-info`'s fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// `Name:`.
    pub name: String,
    /// `Domain:`.
    pub domain: String,
    /// `Current:`.
    pub current: bool,
    /// `State:`.
    pub state: Option<String>,
    /// `Location:`: `internal`, `external` or `storage`.
    pub location: &'static str,
    /// `Parent:`.
    pub parent: Option<String>,
    /// `Children:`.
    pub children: usize,
    /// `Descendants:`.
    pub descendants: usize,
    /// `Metadata:`: always true here (a snapshot without metadata is not listed).
    pub metadata: bool,
}

/// Where a snapshot's data is, as `snapshot-info`'s `Location:` says it: `storage` when a
/// disk was captured by its storage backend (our extension), else `external` when its memory
/// or a disk is outside the images (libvirt's rule), else `internal`.
pub fn location_kind(def: &DomainSnapshot) -> &'static str {
    if def
        .disks
        .iter()
        .any(|d| d.location() == Some(Location::Storage))
    {
        "storage"
    } else if def.is_external() {
        "external"
    } else {
        "internal"
    }
}

fn no_snapshot(domain: &str, name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("domain {domain:?} has no snapshot {name:?}"),
    )
}

fn summary(tree: &SnapshotTree, def: &DomainSnapshot) -> SnapshotSummary {
    let name = def.name.as_deref().unwrap_or_default();
    SnapshotSummary {
        name: name.to_string(),
        creation_time: def.creation_time,
        state: def.state.map(|s| s.as_str().to_string()),
        parent: tree.parent(name).map(|p| p.to_string()),
        location: location_kind(def),
        current: tree.current().is_some_and(|c| c.as_str() == name),
        children: tree.children(name).map_or(0, |c| c.len()),
    }
}

fn damaged(loaded: &Loaded) -> Vec<DamagedSnapshot> {
    loaded
        .damaged
        .iter()
        .map(|d| {
            let name = d
                .path
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_suffix(".xml"))
                .map(str::to_string);
            DamagedSnapshot {
                name,
                path: d.path.clone(),
                error: d.error.to_string(),
            }
        })
        .collect()
}

fn log_damaged(damaged: &[DamagedSnapshot]) {
    for d in damaged {
        tracing::warn!(
            "snapshot {} cannot be loaded ({}): {}",
            d.name.as_deref().unwrap_or("?"),
            d.path.display(),
            d.error
        );
    }
}

impl Connection {
    /// The snapshot store of the whole state dir.
    /// The snapshot metadata store. In a cluster lockspace every change of a running
    /// domain's metadata is first checked against the fencing tokens of its leases
    /// ([`crate::domain::keeper::LeaseGuard`]): a host whose leases were lost (fenced, or
    /// expired while it was cut off) commits nothing.
    pub(crate) fn snapshot_store(&self) -> SnapshotStore {
        let store = SnapshotStore::new(self.state_dir().join(SNAPSHOTS_SUBDIR));
        if self.lockspace().is_cluster() {
            store.with_guard(std::sync::Arc::new(crate::domain::keeper::LeaseGuard {
                conn: self.clone(),
            }))
        } else {
            store
        }
    }

    /// The metadata store of `domain`, which must be defined or have run here.
    fn domain_snapshots(&self, domain: &str) -> Result<DomainStore> {
        self.domain(domain)?;
        let ran = crate::domain::runstate::run_dir(self.state_dir(), domain).exists();
        if !self.is_defined(domain) && !ran {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "domain {domain:?} not found (no domain of that name is defined or ran here)"
                ),
            ));
        }
        Ok(self.snapshot_store().domain(domain)?)
    }

    fn load_snapshots(&self, domain: &str) -> Result<Loaded> {
        let loaded = self.domain_snapshots(domain)?.load()?;
        Ok(loaded)
    }

    fn snapshot_name(name: &str) -> Result<SnapshotName> {
        SnapshotName::new(name).map_err(|e| {
            Error::caused_by(format!("{name:?} is not a valid snapshot name"), e)
                .with_kind(ErrorKind::InvalidInput)
        })
    }

    /// virsh `snapshot-list DOMAIN` with `filter`: the snapshots it selects, and the
    /// snapshot files that could not be loaded.
    pub fn snapshot_listing(&self, domain: &str, filter: &ListFilter) -> Result<SnapshotListing> {
        let loaded = self.load_snapshots(domain)?;
        let tree = &loaded.tree;
        if let super::Scope::Children(n) | super::Scope::Descendants(n) = &filter.scope {
            if !tree.contains(n) {
                return Err(no_snapshot(domain, n));
            }
        }
        let snapshots = tree
            .list(filter)?
            .into_iter()
            .map(|d| summary(tree, d))
            .collect();
        Ok(SnapshotListing {
            snapshots,
            damaged: damaged(&loaded),
            visits: tree.visits(),
        })
    }

    /// virsh `snapshot-list DOMAIN` with `filter` (damaged files are logged as warnings;
    /// [`Connection::snapshot_listing`] returns them).
    pub fn snapshot_list(&self, domain: &str, filter: &ListFilter) -> Result<Vec<SnapshotSummary>> {
        let l = self.snapshot_listing(domain, filter)?;
        log_damaged(&l.damaged);
        Ok(l.snapshots)
    }

    /// virsh `snapshot-list DOMAIN --tree`: the text virsh prints, and the damaged files.
    pub fn snapshot_tree_text(&self, domain: &str) -> Result<(String, Vec<DamagedSnapshot>)> {
        let loaded = self.load_snapshots(domain)?;
        Ok((loaded.tree.render_tree(), damaged(&loaded)))
    }

    /// virsh `snapshot-info DOMAIN NAME`.
    pub fn snapshot_info(&self, domain: &str, name: &str) -> Result<SnapshotInfo> {
        let loaded = self.load_snapshots(domain)?;
        let tree = &loaded.tree;
        let def = tree.get(name).ok_or_else(|| no_snapshot(domain, name))?;
        let s = summary(tree, def);
        Ok(SnapshotInfo {
            name: s.name,
            domain: domain.to_string(),
            current: s.current,
            state: s.state,
            location: s.location,
            parent: s.parent,
            children: s.children,
            descendants: tree.descendants(name)?.len(),
            metadata: true,
        })
    }

    /// The metadata of snapshot `name` of `domain`.
    pub fn snapshot_get(&self, domain: &str, name: &str) -> Result<DomainSnapshot> {
        let store = self.domain_snapshots(domain)?;
        let n = Self::snapshot_name(name)?;
        store.read(&n).map_err(|e| {
            if e.kind() == snapshot_core::ErrorKind::NotFound {
                no_snapshot(domain, name)
            } else {
                Error::caused_by(format!("snapshot {name:?} of {domain:?} cannot be read"), e)
            }
        })
    }

    /// virsh `snapshot-dumpxml DOMAIN NAME`: the snapshot's domainsnapshot XML, unknown
    /// elements and attributes included.
    pub fn snapshot_dumpxml(&self, domain: &str, name: &str) -> Result<String> {
        Ok(self.snapshot_get(domain, name)?.to_xml())
    }

    /// virsh `snapshot-current DOMAIN`: the current snapshot, if there is one.
    pub fn snapshot_current(&self, domain: &str) -> Result<Option<DomainSnapshot>> {
        let loaded = self.load_snapshots(domain)?;
        let tree = &loaded.tree;
        Ok(tree.current().and_then(|c| tree.get(c)).cloned())
    }

    /// virsh `snapshot-parent DOMAIN NAME`: the parent's name (`None` for a root).
    pub fn snapshot_parent(&self, domain: &str, name: &str) -> Result<Option<String>> {
        let loaded = self.load_snapshots(domain)?;
        if !loaded.tree.contains(name) {
            return Err(no_snapshot(domain, name));
        }
        Ok(loaded.tree.parent(name).map(|p| p.to_string()))
    }

    /// virsh `snapshot-create DOMAIN FILE --redefine [--current]`: record libvirt's
    /// domainsnapshot XML as a snapshot's metadata, capturing nothing. The XML must name the
    /// snapshot; its parent, if it names one, must exist; a snapshot of that name is
    /// replaced (refused if the new parent is one of its descendants). With `set_current`
    /// it becomes the current snapshot. Returns what was stored.
    pub fn snapshot_redefine(
        &self,
        domain: &str,
        xml: &str,
        set_current: bool,
    ) -> Result<DomainSnapshot> {
        let store = self.domain_snapshots(domain)?;
        let def = DomainSnapshot::from_xml(xml).map_err(|e| {
            Error::caused_by("the domainsnapshot XML cannot be parsed", e)
                .with_kind(ErrorKind::InvalidInput)
        })?;
        let Some(name) = def.name.clone() else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "a redefined snapshot needs a <name>",
            ));
        };
        let mut loaded = store.load()?;
        log_damaged(&damaged(&loaded));
        if let Some(p) = &def.parent {
            if !loaded.tree.contains(p) {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "the parent {:?} of snapshot {:?} is not a snapshot of domain {domain:?}",
                        p.as_str(),
                        name.as_str()
                    ),
                ));
            }
        }
        loaded.tree.redefine(def.clone()).map_err(|e| {
            Error::caused_by(
                format!("snapshot {:?} cannot be redefined", name.as_str()),
                e,
            )
        })?;
        store.save(&def)?;
        if set_current {
            store.set_current(Some(&name))?;
        }
        Ok(def)
    }

    /// Checks a snapshot request against `domain`'s metadata before any capture: the domain
    /// is defined (or ran here), the name (if given) is not taken, and every `<disk name>` is
    /// one of the definition's disks (by target or by source path). The capture's plan
    /// checks the rest against the live domain.
    pub fn snapshot_check_request(&self, domain: &str, def: &DomainSnapshot) -> Result<()> {
        let store = self.domain_snapshots(domain)?;
        if let Some(n) = &def.name {
            if store.snapshot_path(n).exists() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("domain {domain:?} has a snapshot {:?} already", n.as_str()),
                ));
            }
        }
        if def.disks.is_empty() || !self.is_defined(domain) {
            return Ok(());
        }
        let dom = self.definition(domain)?;
        for d in &def.disks {
            let known = dom.disks().iter().any(|x| {
                x.target.dev == d.name
                    || x.source.as_ref().is_some_and(|s| {
                        [&s.file, &s.dev]
                            .into_iter()
                            .flatten()
                            .any(|p| *p == d.name)
                    })
            });
            if !known {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("domain {domain:?} has no disk {:?}", d.name),
                ));
            }
        }
        Ok(())
    }
}
