//! The snapshot metadata store: one directory per domain in the state directory, one
//! domainsnapshot XML file per snapshot (as libvirt's `/var/lib/libvirt/qemu/snapshot/DOM/`),
//! and a pointer to the current snapshot.
//!
//! ```text
//! ROOT/                 0700
//!   DOMAIN/             0700
//!     NAME.xml          0600  the snapshot's domainsnapshot XML (DomainSnapshot::to_xml)
//!     current           0600  the current snapshot's name and a newline; absent: none
//!     journal           0600  the domain's journal of in-flight operations (crate::journal)
//!     overlays          0600  who made each overlay file (JSON, [`OverlayRecord`]); absent:
//!                             none recorded (metadata from before the record existed)
//! ```
//!
//! Every change is atomic: a temporary file in the same directory (`.NAME.tmp-PID`, created
//! 0600), written, fsynced, renamed over the old file, then the directory fsynced. After a
//! crash a file holds its old content or its new content, never a mix; a left-over temporary
//! file is ignored by readers and replaced by the next write. Removal is followed by a
//! directory fsync too.
//!
//! [`DomainStore::load`] reads every snapshot file; one that cannot be read or parsed is
//! reported by path in [`Loaded::damaged`] and the others load regardless.
//!
//! The store works on a real directory the caller gives (tests use temporary directories):
//! its effects are plain file operations on the caller's state directory.

use crate::domain::DomainDef;
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;
use crate::name::{check_component, DomainName, SnapshotName};
use crate::tree::{SnapshotTree, TreeProblem};
use crate::xml::DomainSnapshot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The name of the current-snapshot pointer file.
pub const CURRENT_FILE: &str = "current";
/// The name of a domain's journal file.
pub const JOURNAL_FILE: &str = "journal";
/// The name of a domain's overlay ownership record.
pub const OVERLAYS_FILE: &str = "overlays";

/// Who made an overlay file (docs/delete.md, "Whose overlay is it").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MadeBy {
    /// A capture created it at the name it picked itself: virt-snap's.
    Capture,
    /// A revert created it: virt-snap's.
    Revert,
    /// The user gave it (`--reuse-external`) or named it (`--diskspec disk,file=PATH`):
    /// never removed.
    User,
}

/// One overlay file's entry in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayOwner {
    /// Who made it.
    pub by: MadeBy,
    /// The snapshot it was made for (the capture's snapshot, the snapshot reverted to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

impl OverlayOwner {
    /// Is the file virt-snap's own (made by a capture or a revert)?
    pub fn is_ours(&self) -> bool {
        self.by != MadeBy::User
    }

    /// Was it made by a revert to `snapshot`?
    pub fn is_revert_of(&self, snapshot: &str) -> bool {
        self.by == MadeBy::Revert && self.snapshot.as_deref() == Some(snapshot)
    }
}

/// A domain's record of the overlay files virt-snap created and of the ones the user gave,
/// by path. A path it does not name was made before the record existed (its owner is told by
/// its name, as before).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayRecord {
    /// The format's version (1).
    pub version: u32,
    /// Each file's owner.
    pub overlays: BTreeMap<String, OverlayOwner>,
}

impl OverlayRecord {
    /// The owner the record gives `path`, if it names it.
    pub fn owner(&self, path: &str) -> Option<&OverlayOwner> {
        self.overlays.get(path)
    }
}

/// Checked before every change of a domain's metadata (a snapshot written or removed, the
/// current pointer moved): the facade's guard checks that the domain's cluster leases are
/// still current (their fencing tokens), so that a host that lost them commits nothing.
pub trait CommitGuard: Send + Sync + std::fmt::Debug {
    /// May `what` be committed to `domain`'s metadata now? An error refuses it (and is the
    /// source of the [`ErrorKind::Backend`] error the write then fails with).
    fn check(
        &self,
        domain: &str,
        what: &str,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// The store root: a directory holding one directory per domain.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
    guard: Option<std::sync::Arc<dyn CommitGuard>>,
}

impl SnapshotStore {
    /// A store rooted at `root` (created on the first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SnapshotStore {
            root: root.into(),
            guard: None,
        }
    }

    /// The same store, checking `guard` before every metadata change.
    pub fn with_guard(mut self, guard: std::sync::Arc<dyn CommitGuard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store of one domain; `domain` follows the same rules as a snapshot name.
    pub fn domain(&self, domain: &str) -> Result<DomainStore> {
        check_component(domain, "domain name")?;
        Ok(DomainStore {
            dir: self.root.join(domain),
            guard: self.guard.clone(),
        })
    }
}

/// The domain definitions: one domain XML file per defined domain (as libvirt's
/// `/etc/libvirt/qemu/NAME.xml`), written atomically like every file of the store.
///
/// ```text
/// DIR/                  0700
///   NAME.xml            0600  the definition (DomainDef::to_xml)
/// ```
#[derive(Debug, Clone)]
pub struct DefinitionStore {
    dir: PathBuf,
}

impl DefinitionStore {
    /// A store in `dir` (created on the first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DefinitionStore { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of domain `name`.
    pub fn path(&self, name: &DomainName) -> PathBuf {
        self.dir.join(format!("{}.xml", name.as_str()))
    }

    /// Writes a definition (atomically, creating the directory 0700, the file 0600).
    pub fn save(&self, def: &DomainDef) -> Result<()> {
        fsutil::create_dir(&self.dir)?;
        fsutil::write_atomic(&self.path(&def.name), def.to_xml().as_bytes())
    }

    /// Reads domain `name`'s definition; `None` if it has no file.
    pub fn read(&self, name: &DomainName) -> Result<Option<DomainDef>> {
        let path = self.path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        let def = DomainDef::from_xml_bytes(&bytes).map_err(|e| e.with_path(&path))?;
        if def.name != *name {
            return Err(Error::new(
                ErrorKind::Xml,
                path.display().to_string(),
                format!(
                    "the file is for domain {:?} but defines {:?}",
                    name.as_str(),
                    def.name.as_str()
                ),
            )
            .with_path(&path));
        }
        Ok(Some(def))
    }

    /// Removes domain `name`'s definition (durably); a missing file is not an error.
    pub fn remove(&self, name: &DomainName) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        fsutil::remove_durable(&self.path(name))
    }

    /// The defined domains (by name, sorted), without reading their files; file names that
    /// are not domain names (left-over temporary files among them) are skipped.
    pub fn names(&self) -> Result<Vec<DomainName>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("cannot list", &self.dir, e)),
        };
        let mut v = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("cannot list", &self.dir, e))?;
            let raw = ent.file_name();
            let Some(stem) = raw.to_str().and_then(|f| f.strip_suffix(".xml")) else {
                continue;
            };
            if stem.starts_with('.') {
                continue;
            }
            if let Ok(n) = DomainName::new(stem) {
                v.push(n);
            }
        }
        v.sort();
        Ok(v)
    }
}

/// One domain's snapshot metadata directory.
#[derive(Debug, Clone)]
pub struct DomainStore {
    dir: PathBuf,
    guard: Option<std::sync::Arc<dyn CommitGuard>>,
}

/// A snapshot file that could not be loaded.
#[derive(Debug)]
pub struct DamagedFile {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub error: Error,
}

/// What [`DomainStore::load`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The snapshots that loaded, with the current one set.
    pub tree: SnapshotTree,
    /// Files that could not be read or parsed (the tree lacks them).
    pub damaged: Vec<DamagedFile>,
    /// What building the tree worked around (orphans of a damaged parent, ...).
    pub problems: Vec<TreeProblem>,
    /// The current pointer names a snapshot that is not in the tree.
    pub stale_current: Option<String>,
}

impl DomainStore {
    /// Ask the guard whether `what` may be committed.
    fn guarded(&self, what: impl FnOnce() -> String) -> Result<()> {
        let Some(g) = &self.guard else {
            return Ok(());
        };
        let what = what();
        let domain = self.dir.file_name().unwrap_or_default().to_string_lossy();
        g.check(&domain, &what).map_err(|e| {
            Error::backend(self.dir.display().to_string(), format!("{what} refused"))
                .caused_by(BoxedError(e))
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where this domain's journal lives.
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Where this domain's overlay ownership record lives.
    pub fn overlays_path(&self) -> PathBuf {
        self.dir.join(OVERLAYS_FILE)
    }

    /// The overlay ownership record (empty if there is none).
    pub fn overlays(&self) -> Result<OverlayRecord> {
        let path = self.overlays_path();
        match std::fs::read(&path) {
            Ok(b) => {
                let rec: OverlayRecord = serde_json::from_slice(&b).map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        path.display().to_string(),
                        format!("the overlay record is not valid: {e}"),
                    )
                    .with_path(&path)
                })?;
                if rec.version > 1 {
                    return Err(Error::new(
                        ErrorKind::UnsupportedVersion,
                        path.display().to_string(),
                        format!("overlay record version {} is not known", rec.version),
                    )
                    .with_path(&path));
                }
                Ok(rec)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(OverlayRecord::default()),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    fn write_overlays(&self, rec: &OverlayRecord) -> Result<()> {
        fsutil::create_dir(&self.dir)?;
        let mut rec = rec.clone();
        rec.version = 1;
        let bytes = serde_json::to_vec_pretty(&rec).expect("a map of strings serializes");
        fsutil::write_atomic(&self.overlays_path(), &bytes)
    }

    /// Records (atomically) who made the overlay file `path`; the same entry again writes
    /// nothing.
    pub fn record_overlay(&self, path: &str, owner: OverlayOwner) -> Result<()> {
        let mut rec = self.overlays()?;
        if rec.overlays.get(path) == Some(&owner) {
            return Ok(());
        }
        rec.overlays.insert(path.to_string(), owner);
        self.write_overlays(&rec)
    }

    /// Records (atomically, in one write) each of `paths` that the record does not name as a
    /// file the user gave (a domain's defined disk sources and the images below them): a
    /// file virt-snap made keeps its entry. Nothing new writes nothing.
    pub fn record_users_files(&self, paths: &[String]) -> Result<()> {
        let mut rec = self.overlays()?;
        let mut changed = false;
        for p in paths {
            if !rec.overlays.contains_key(p) {
                rec.overlays.insert(
                    p.clone(),
                    OverlayOwner {
                        by: MadeBy::User,
                        snapshot: None,
                    },
                );
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        self.write_overlays(&rec)
    }

    /// Drops the entry of `path` (atomically; the file was removed), keeping the entry of a
    /// file the user gave unless `user_too`; no entry writes nothing.
    pub fn forget_overlay(&self, path: &str, user_too: bool) -> Result<()> {
        let mut rec = self.overlays()?;
        match rec.overlays.get(path) {
            Some(o) if o.is_ours() || user_too => {}
            _ => return Ok(()),
        }
        rec.overlays.remove(path);
        self.write_overlays(&rec)
    }

    /// Makes the entries of the overlays made for `snapshot` the user's (atomically; a
    /// `--metadata` delete leaves them to the user); none writes nothing.
    pub fn hand_over_overlays(&self, snapshot: &str) -> Result<()> {
        let mut rec = self.overlays()?;
        let mut changed = false;
        for o in rec.overlays.values_mut() {
            if o.is_ours() && o.snapshot.as_deref() == Some(snapshot) {
                o.by = MadeBy::User;
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        self.write_overlays(&rec)
    }

    /// The file of snapshot `name`.
    pub fn snapshot_path(&self, name: &SnapshotName) -> PathBuf {
        self.dir.join(format!("{}.xml", name.as_str()))
    }

    /// Writes a snapshot's metadata (atomically, creating the directories 0700).
    pub fn save(&self, def: &DomainSnapshot) -> Result<()> {
        let name = def.name.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidName,
                "snapshot",
                "a snapshot needs a name to be stored",
            )
        })?;
        self.guarded(|| format!("save snapshot {:?}", name.as_str()))?;
        fsutil::create_dir(&self.dir)?;
        fsutil::write_atomic(&self.snapshot_path(name), def.to_xml().as_bytes())
    }

    /// Reads one snapshot's metadata; [`ErrorKind::NotFound`] if it has no file.
    pub fn read(&self, name: &SnapshotName) -> Result<DomainSnapshot> {
        let path = self.snapshot_path(name);
        let def = read_snapshot_file(&path)?;
        if def.name.as_ref() != Some(name) {
            return Err(Error::new(
                ErrorKind::Xml,
                path.display().to_string(),
                format!(
                    "the file is for snapshot {:?} but holds {:?}",
                    name.as_str(),
                    def.name.as_deref().unwrap_or("")
                ),
            )
            .with_path(&path));
        }
        Ok(def)
    }

    /// Removes a snapshot's file (durably); a missing file is not an error.
    pub fn remove(&self, name: &SnapshotName) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        self.guarded(|| format!("remove snapshot {:?}", name.as_str()))?;
        fsutil::remove_durable(&self.snapshot_path(name))
    }

    /// Sets (or, with `None`, clears) the current-snapshot pointer, atomically.
    pub fn set_current(&self, name: Option<&SnapshotName>) -> Result<()> {
        let path = self.dir.join(CURRENT_FILE);
        self.guarded(|| "move the current snapshot".to_string())?;
        match name {
            Some(n) => {
                fsutil::create_dir(&self.dir)?;
                fsutil::write_atomic(&path, format!("{}\n", n.as_str()).as_bytes())
            }
            None if self.dir.exists() => fsutil::remove_durable(&path),
            None => Ok(()),
        }
    }

    /// The current-snapshot pointer as stored (not checked against the snapshot files).
    pub fn current(&self) -> Result<Option<SnapshotName>> {
        let path = self.dir.join(CURRENT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let s = s.strip_suffix('\n').unwrap_or(&s);
                SnapshotName::new(s)
                    .map(Some)
                    .map_err(|e| e.with_path(&path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    /// The snapshot files present (by name, sorted), without reading them.
    pub fn names(&self) -> Result<Vec<SnapshotName>> {
        let mut v: Vec<SnapshotName> = self
            .entries()?
            .into_iter()
            .filter_map(|(_, n)| n.ok())
            .collect();
        v.sort();
        Ok(v)
    }

    /// Every `*.xml` entry: its path and its snapshot name (or why the file name is not one).
    fn entries(&self) -> Result<Vec<(PathBuf, Result<SnapshotName>)>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("cannot list", &self.dir, e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("cannot list", &self.dir, e))?;
            let path = ent.path();
            let raw = ent.file_name();
            let Some(fname) = raw.to_str() else {
                if raw.as_encoded_bytes().ends_with(b".xml") {
                    let e = Error::new(
                        ErrorKind::InvalidName,
                        path.display().to_string(),
                        "not UTF-8",
                    )
                    .with_path(&path);
                    out.push((path, Err(e)));
                }
                continue;
            };
            let Some(stem) = fname.strip_suffix(".xml") else {
                continue;
            };
            out.push((
                path.clone(),
                SnapshotName::new(stem).map_err(|e| e.with_path(&path)),
            ));
        }
        Ok(out)
    }

    /// Loads the domain's tree: every snapshot file, and the current pointer (or, without
    /// one, the snapshot whose libvirt `<active>` says 1). Damaged files are reported, not
    /// fatal; only failing to list the directory is an error.
    pub fn load(&self) -> Result<Loaded> {
        let mut damaged = Vec::new();
        let mut defs = Vec::new();
        for (path, name) in self.entries()? {
            let loaded = name.and_then(|n| self.read(&n));
            match loaded {
                Ok(d) => defs.push(d),
                Err(error) => damaged.push(DamagedFile { path, error }),
            }
        }
        damaged.sort_by(|a, b| a.path.cmp(&b.path));
        let active = defs
            .iter()
            .find(|d| d.active == Some(true))
            .and_then(|d| d.name.clone());
        let (mut tree, problems) = SnapshotTree::from_snapshots(defs);
        let mut stale_current = None;
        let current = match self.current() {
            Ok(c) => c.or(active),
            Err(error) => {
                damaged.push(DamagedFile {
                    path: self.dir.join(CURRENT_FILE),
                    error,
                });
                active
            }
        };
        if let Some(c) = current {
            if tree.set_current(Some(&c)).is_err() {
                stale_current = Some(c.to_string());
            }
        }
        Ok(Loaded {
            tree,
            damaged,
            problems,
            stale_current,
        })
    }
}

fn read_snapshot_file(path: &Path) -> Result<DomainSnapshot> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::new(
                ErrorKind::NotFound,
                path.display().to_string(),
                "no such snapshot file",
            )
            .with_path(path))
        }
        Err(e) => return Err(Error::io("cannot read", path, e)),
    };
    DomainSnapshot::from_xml_bytes(&bytes).map_err(|e| {
        Error::new(ErrorKind::Xml, path.display().to_string(), "cannot parse")
            .with_path(path)
            .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn definitions_round_trip_privately_and_durably() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DefinitionStore::new(tmp.path().join("domains"));
        assert!(store.names().unwrap().is_empty());
        let xml = "<domain type='kvm'><name>vm1</name><memory>1024</memory>\
                   <os><type>hvm</type></os><devices><interface type='user'/></devices>\
                   </domain>";
        let def = DomainDef::from_xml(xml).unwrap();
        store.save(&def).unwrap();
        let name = DomainName::new("vm1").unwrap();
        assert_eq!(store.read(&name).unwrap().as_ref(), Some(&def));
        assert!(std::fs::read_to_string(store.path(&name))
            .unwrap()
            .contains("<interface type='user'/>"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        assert_eq!(mode(&store.path(&name)), 0o600);
        std::fs::write(store.dir().join(".vm1.xml.tmp-1"), "junk").unwrap();
        assert_eq!(store.names().unwrap(), vec![name.clone()]);
        store.remove(&name).unwrap();
        assert_eq!(store.read(&name).unwrap(), None);
        store.remove(&name).unwrap();
    }

    #[test]
    fn the_overlay_record_round_trips_privately() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(tmp.path().join("snapshots"))
            .domain("vm")
            .unwrap();
        // None yet: every file is told by its name.
        assert_eq!(store.overlays().unwrap(), OverlayRecord::default());
        assert!(!store.overlays_path().exists());
        let own = |by, s: &str| OverlayOwner {
            by,
            snapshot: Some(s.into()),
        };
        store
            .record_overlay("/d/vda.s1", own(MadeBy::Capture, "s1"))
            .unwrap();
        store
            .record_overlay("/d/vda.s1.r1", own(MadeBy::Revert, "s1"))
            .unwrap();
        store
            .record_overlay("/d/mine", own(MadeBy::User, "s2"))
            .unwrap();
        let mode = std::fs::metadata(store.overlays_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let rec = store.overlays().unwrap();
        assert_eq!(rec.version, 1);
        assert!(rec.owner("/d/vda.s1").unwrap().is_ours());
        assert!(rec.owner("/d/vda.s1.r1").unwrap().is_revert_of("s1"));
        assert!(!rec.owner("/d/vda.s1").unwrap().is_revert_of("s1"));
        assert!(!rec.owner("/d/mine").unwrap().is_ours());
        assert!(rec.owner("/d/other").is_none());
        // A file the user gave keeps its entry unless asked; ours go.
        store.forget_overlay("/d/mine", false).unwrap();
        store.forget_overlay("/d/vda.s1", false).unwrap();
        store.forget_overlay("/d/nothing", false).unwrap();
        let rec = store.overlays().unwrap();
        assert!(rec.owner("/d/mine").is_some());
        assert!(rec.owner("/d/vda.s1").is_none());
        store.forget_overlay("/d/mine", true).unwrap();
        assert!(store.overlays().unwrap().owner("/d/mine").is_none());
        // A domain's defined sources: the user's, unless virt-snap made them.
        store
            .record_users_files(&["/d/vda.s1.r1".into(), "/d/vda.qcow2".into()])
            .unwrap();
        let rec = store.overlays().unwrap();
        assert!(rec.owner("/d/vda.s1.r1").unwrap().is_revert_of("s1"));
        assert!(!rec.owner("/d/vda.qcow2").unwrap().is_ours());
        // A newer format is refused, never overwritten.
        std::fs::write(store.overlays_path(), r#"{"version":2,"overlays":{}}"#).unwrap();
        let e = store
            .record_overlay("/d/x", own(MadeBy::Capture, "s"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
    }
}

/// A boxed error as an error (for [`Error::caused_by`]).
#[derive(Debug)]
struct BoxedError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for BoxedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BoxedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
