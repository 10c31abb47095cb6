//! libvirt's domainsnapshot XML, read and written.
//!
//! [`DomainSnapshot::from_xml`] reads every element of libvirt's `domainsnapshot.rng` into typed
//! fields; [`DomainSnapshot::to_xml`] writes them back the way libvirt formats them (two-space
//! indentation, single-quoted attributes, libvirt's element order). Three subtrees are kept
//! opaque and byte for byte as they were read ([`RawXml`]): `<domain>`, `<inactiveDomain>` and
//! `<cookie>` (domain XML is parsed by [`crate::domain`]). Elements and attributes this module does not
//! know are kept in an [`Extra`] next to the fields of the element they appeared in and written
//! back after the known ones, so nothing is dropped.
//!
//! The one extension of libvirt's values is `snapshot='storage'` on a `<disk>`
//! ([`Location::Storage`]): the disk is captured by its storage backend (btrfs, LVM, a reflink
//! copy) while guest I/O is paused. See docs/snapshot-metadata.md.
//!
//! The reader is quick-xml's pull parser over the whole document: well-formedness is checked
//! (matching end tags, attribute syntax, duplicate attributes), nesting is bounded by
//! [`MAX_DEPTH`], a `<!DOCTYPE>` (and so any custom entity) is refused. Every failure is an
//! [`ErrorKind::Xml`](crate::ErrorKind::Xml) error with the byte offset where it is known;
//! no input makes it panic. The typed model derives serde's traits, for JSON output and the
//! journal.

use crate::error::{Error, Result};
use crate::name::SnapshotName;
use crate::xmltree::{parse_tree, unit_scale, Elem, Out, OutNode};
pub use crate::xmltree::{Extra, RawXml, MAX_DEPTH};
use serde::{Deserialize, Serialize};

/// A domainsnapshot document: libvirt's snapshot metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DomainSnapshot {
    /// `<name>`: absent in a creation request (a name is then generated).
    pub name: Option<SnapshotName>,
    /// `<description>`, as written (whitespace kept).
    pub description: Option<String>,
    /// `<state>`: the domain's state when the snapshot was taken.
    pub state: Option<SnapshotState>,
    /// `<parent><name>`: the parent snapshot.
    pub parent: Option<SnapshotName>,
    /// `<creationTime>`: seconds since the Unix epoch.
    pub creation_time: Option<i64>,
    /// `<memory>`: where the guest's RAM went.
    pub memory: Option<Memory>,
    /// `<disks><disk>...`: one entry per disk named in the snapshot.
    pub disks: Vec<Disk>,
    /// Unknown attributes and children of `<disks>`.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub disks_extra: Extra,
    /// `<revertDisks><disk>...`: disk overrides used on revert (libvirt 9.x+).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revert_disks: Vec<Disk>,
    /// `<active>`: libvirt's internal "this is the current snapshot" flag (`0`/`1`).
    pub active: Option<bool>,
    /// `<domain>`: the domain definition at snapshot time, byte-preserved.
    pub domain: Option<RawXml>,
    /// `<inactiveDomain>`: the inactive definition of a running domain, byte-preserved.
    pub inactive_domain: Option<RawXml>,
    /// `<cookie>`: hypervisor-private data (QEMU's CPU model, ...), byte-preserved.
    pub cookie: Option<RawXml>,
    /// Unknown attributes of `<domainsnapshot>` and unknown children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<state>` values (libvirt's `virDomainSnapshotState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    /// `nostate`
    Nostate,
    /// `running`: the domain was running (a snapshot with memory).
    Running,
    /// `blocked`
    Blocked,
    /// `paused`
    Paused,
    /// `shutdown`
    Shutdown,
    /// `shutoff`: the domain was not running.
    Shutoff,
    /// `crashed`
    Crashed,
    /// `pmsuspended`
    Pmsuspended,
    /// `disk-snapshot`: disks only, of a running domain.
    DiskSnapshot,
}

impl SnapshotState {
    const ALL: [(SnapshotState, &'static str); 9] = [
        (SnapshotState::Nostate, "nostate"),
        (SnapshotState::Running, "running"),
        (SnapshotState::Blocked, "blocked"),
        (SnapshotState::Paused, "paused"),
        (SnapshotState::Shutdown, "shutdown"),
        (SnapshotState::Shutoff, "shutoff"),
        (SnapshotState::Crashed, "crashed"),
        (SnapshotState::Pmsuspended, "pmsuspended"),
        (SnapshotState::DiskSnapshot, "disk-snapshot"),
    ];

    /// The XML spelling.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("nostate", |(_, n)| n)
    }

    /// Parses the XML spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(s, _)| *s)
    }
}

/// Where a disk's (or the memory's) snapshot is taken: the `snapshot` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Location {
    /// `no`: not captured.
    No,
    /// `internal`: inside the image (a qcow2 internal snapshot).
    Internal,
    /// `external`: a new overlay (disks) or a RAM file (memory).
    External,
    /// `manual`: the user captures it while the guest is paused.
    Manual,
    /// `storage` (our extension): the storage backend's own snapshot (btrfs, LVM, reflink)
    /// taken while guest I/O is paused. Disks only.
    Storage,
}

impl Location {
    /// The XML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Location::No => "no",
            Location::Internal => "internal",
            Location::External => "external",
            Location::Manual => "manual",
            Location::Storage => "storage",
        }
    }

    /// Parses the XML spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "no" => Location::No,
            "internal" => Location::Internal,
            "external" => Location::External,
            "manual" => Location::Manual,
            "storage" => Location::Storage,
            _ => return None,
        })
    }
}

/// `<memory snapshot='...' file='...'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Memory {
    /// The `snapshot` attribute as written: `no`, `internal` or `external`.
    pub snapshot: Option<Location>,
    /// The `file` attribute: the RAM file of an external memory snapshot.
    pub file: Option<String>,
    /// Unknown attributes and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl Memory {
    /// The effective location: the attribute, or `external` when only a file is given.
    pub fn location(&self) -> Option<Location> {
        self.snapshot
            .or_else(|| self.file.as_ref().map(|_| Location::External))
    }
}

/// `<disk>` inside `<disks>` (or `<revertDisks>`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Disk {
    /// The `name` attribute: the target (`vda`) or the source path of a domain disk.
    pub name: String,
    /// The `snapshot` attribute as written.
    pub snapshot: Option<Location>,
    /// The `type` attribute: the storage type of the new source (`file`, `block`, `network`,
    /// ...).
    pub source_type: Option<String>,
    /// `<driver>`: the format of the new overlay.
    pub driver: Option<Driver>,
    /// `<source>`: the new overlay (external) or the backend snapshot (storage).
    pub source: Option<Source>,
    /// `<snapshotDeleteInProgress/>`: libvirt marks disks of a half-deleted snapshot so.
    #[serde(default)]
    pub delete_in_progress: bool,
    /// Unknown attributes and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl Disk {
    /// The effective location: the attribute, or `external` when a driver or a source is
    /// given (as libvirt reads it); `None` leaves the choice to the domain's defaults.
    pub fn location(&self) -> Option<Location> {
        self.snapshot.or_else(|| {
            (self.driver.is_some() || self.source.is_some()).then_some(Location::External)
        })
    }
}

/// `<driver type='qcow2'>` of a snapshot disk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Driver {
    /// The `type` attribute: the image format (`qcow2`, `qed`, `raw`, ...).
    pub format: Option<String>,
    /// `<metadata_cache>`.
    pub metadata_cache: Option<MetadataCache>,
    /// Unknown attributes and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<metadata_cache><max_size unit='bytes'>N</max_size></metadata_cache>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MetadataCache {
    /// `<max_size>`.
    pub max_size: Option<ScaledSize>,
    /// Unknown attributes and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// A number with an optional `unit` attribute (libvirt's scaledInteger).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScaledSize {
    /// The number as written.
    pub value: u64,
    /// The `unit` attribute (`bytes`, `KiB`, `M`, ...).
    pub unit: Option<String>,
}

impl ScaledSize {
    /// The value in bytes, for libvirt's units (`bytes` when none is given); `None` for an
    /// unknown unit or an overflow.
    pub fn bytes(&self) -> Option<u64> {
        let mul = unit_scale(self.unit.as_deref().unwrap_or("bytes"))?;
        self.value.checked_mul(mul)
    }
}

/// `<source>` of a snapshot disk: a file, a block device, a directory, a network volume or a
/// pool volume, with its sub-elements.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Source {
    /// `file=` (type `file`).
    pub file: Option<String>,
    /// `dev=` (type `block`).
    pub dev: Option<String>,
    /// `dir=` (type `dir`).
    pub dir: Option<String>,
    /// `protocol=` (type `network`: `nbd`, `rbd`, `iscsi`, ...).
    pub protocol: Option<String>,
    /// `name=` (type `network`: the export or image name).
    pub name: Option<String>,
    /// `pool=` (type `volume`).
    pub pool: Option<String>,
    /// `volume=` (type `volume`).
    pub volume: Option<String>,
    /// `startupPolicy=`.
    pub startup_policy: Option<String>,
    /// `<host name= port= transport= socket=/>` elements of a network source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Host>,
    /// Unknown attributes, and the sub-elements kept verbatim (`<seclabel>`, `<auth>`,
    /// `<encryption>`, `<reservations>`, ...), in document order.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl Source {
    /// The path this source names, whatever its type (`file`, `dev` or `dir`).
    pub fn path(&self) -> Option<&str> {
        self.file
            .as_deref()
            .or(self.dev.as_deref())
            .or(self.dir.as_deref())
    }
}

/// `<host>` of a network source.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Host {
    /// `name=`.
    pub name: Option<String>,
    /// `port=`.
    pub port: Option<String>,
    /// `transport=` (`tcp`, `unix`, `rdma`).
    pub transport: Option<String>,
    /// `socket=`.
    pub socket: Option<String>,
    /// Unknown attributes and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl Elem<'_> {
    fn location(&self) -> Result<Option<Location>> {
        self.attr("snapshot")
            .map(|v| Location::parse(v).ok_or_else(|| self.err(format!("unknown snapshot='{v}'"))))
            .transpose()
    }
}

fn snapshot_name(el: &Elem<'_>) -> Result<SnapshotName> {
    SnapshotName::new(el.text()?).map_err(|e| el.err(e))
}

impl DomainSnapshot {
    /// Reads a domainsnapshot document.
    pub fn from_xml(xml: &str) -> Result<Self> {
        let root = parse_tree(xml)?;
        if root.name != "domainsnapshot" {
            return Err(root.err("the root element must be <domainsnapshot>"));
        }
        let mut s = DomainSnapshot {
            extra: root.extra(
                &[],
                &[
                    "name",
                    "description",
                    "state",
                    "parent",
                    "creationTime",
                    "memory",
                    "disks",
                    "revertDisks",
                    "active",
                    "domain",
                    "inactiveDomain",
                    "cookie",
                ],
            ),
            ..Default::default()
        };
        if let Some(e) = root.child("name")? {
            s.name = Some(snapshot_name(e)?);
        }
        if let Some(e) = root.child("description")? {
            s.description = Some(e.text()?);
        }
        if let Some(e) = root.child("state")? {
            let t = e.text()?;
            s.state = Some(
                SnapshotState::parse(t.trim())
                    .ok_or_else(|| e.err(format!("unknown state {:?}", t.trim())))?,
            );
        }
        if let Some(p) = root.child("parent")? {
            if let Some((k, _)) = p.attrs.first() {
                return Err(p.err(format!("unexpected attribute {k}")));
            }
            if let Some(other) = p.elems().find(|e| e.name != "name") {
                return Err(other.err("unexpected element in <parent>"));
            }
            let n = p
                .child("name")?
                .ok_or_else(|| p.err("<parent> needs a <name>"))?;
            s.parent = Some(snapshot_name(n)?);
        }
        if let Some(e) = root.child("creationTime")? {
            let t = e.text()?;
            s.creation_time = Some(
                t.trim()
                    .parse()
                    .map_err(|_| e.err(format!("not a number of seconds: {:?}", t.trim())))?,
            );
        }
        if let Some(e) = root.child("memory")? {
            s.memory = Some(parse_memory(e)?);
        }
        if let Some(e) = root.child("disks")? {
            s.disks = parse_disks(e)?;
            s.disks_extra = e.extra(&[], &["disk"]);
        }
        if let Some(e) = root.child("revertDisks")? {
            s.revert_disks = parse_disks(e)?;
            let extra = e.extra(&[], &["disk"]);
            if !extra.is_empty() {
                return Err(e.err("unknown content in <revertDisks>"));
            }
        }
        if let Some(e) = root.child("active")? {
            s.active = Some(match e.text()?.trim() {
                "0" => false,
                "1" => true,
                other => return Err(e.err(format!("must be 0 or 1, not {other:?}"))),
            });
        }
        s.domain = root.child("domain")?.map(|e| RawXml(e.raw.to_string()));
        s.inactive_domain = root
            .child("inactiveDomain")?
            .map(|e| RawXml(e.raw.to_string()));
        s.cookie = root.child("cookie")?.map(|e| RawXml(e.raw.to_string()));
        Ok(s)
    }

    /// Reads a domainsnapshot document from bytes, which must be UTF-8.
    pub fn from_xml_bytes(xml: &[u8]) -> Result<Self> {
        let s = std::str::from_utf8(xml)
            .map_err(|e| Error::xml(format!("not UTF-8: {e}"), Some(e.valid_up_to() as u64)))?;
        DomainSnapshot::from_xml(s)
    }

    /// Writes the document as libvirt formats it (ends with a newline).
    pub fn to_xml(&self) -> String {
        let mut root = Out::new("domainsnapshot");
        if let Some(n) = &self.name {
            root.text_child("name", n.as_str());
        }
        if let Some(d) = &self.description {
            root.text_child("description", d);
        }
        if let Some(st) = self.state {
            root.text_child("state", st.as_str());
        }
        if let Some(p) = &self.parent {
            let mut pe = Out::new("parent");
            pe.text_child("name", p.as_str());
            root.child(pe);
        }
        if let Some(t) = self.creation_time {
            root.text_child("creationTime", &t.to_string());
        }
        if let Some(m) = &self.memory {
            let mut me = Out::new("memory");
            me.opt_attr("snapshot", m.snapshot.map(Location::as_str));
            me.opt_attr("file", m.file.as_deref());
            me.extra(&m.extra);
            root.child(me);
        }
        if !self.disks.is_empty() || !self.disks_extra.is_empty() {
            root.child(disks_out("disks", &self.disks, &self.disks_extra));
        }
        if !self.revert_disks.is_empty() {
            root.child(disks_out(
                "revertDisks",
                &self.revert_disks,
                &Extra::default(),
            ));
        }
        for raw in [&self.domain, &self.inactive_domain, &self.cookie]
            .into_iter()
            .flatten()
        {
            root.nodes.push(OutNode::Raw(raw.0.clone()));
        }
        if let Some(a) = self.active {
            root.text_child("active", if a { "1" } else { "0" });
        }
        root.extra(&self.extra);
        let mut s = String::new();
        root.write(&mut s, 0);
        s
    }

    /// Does the snapshot keep anything outside the disk images, the way libvirt's
    /// `--external` filter means it: an external memory file or an external disk overlay?
    /// Disks captured by their storage backend (`storage`) count as external too: their
    /// data is not inside the image.
    pub fn is_external(&self) -> bool {
        self.memory.as_ref().and_then(Memory::location) == Some(Location::External)
            || self
                .disks
                .iter()
                .any(|d| matches!(d.location(), Some(Location::External | Location::Storage)))
    }

    /// A disk-only snapshot (`<state>disk-snapshot</state>`).
    pub fn is_disk_only(&self) -> bool {
        self.state == Some(SnapshotState::DiskSnapshot)
    }

    /// A snapshot of a domain that was not running (`<state>shutoff</state>`).
    pub fn is_inactive(&self) -> bool {
        self.state == Some(SnapshotState::Shutoff)
    }

    /// A snapshot of a running domain with its memory (libvirt's `--active` filter: any state
    /// but `shutoff` and `disk-snapshot`).
    pub fn is_active(&self) -> bool {
        !self.is_inactive() && !self.is_disk_only()
    }
}

fn parse_memory(e: &Elem<'_>) -> Result<Memory> {
    let m = Memory {
        snapshot: e.location()?,
        file: e.opt_attr("file"),
        extra: e.extra(&["snapshot", "file"], &[]),
    };
    match (m.snapshot, &m.file) {
        (Some(Location::Manual | Location::Storage), _) => {
            Err(e.err("memory snapshot must be no, internal or external"))
        }
        (Some(Location::No | Location::Internal), Some(f)) => Err(e.err(format!(
            "memory file '{f}' requires an external memory snapshot"
        ))),
        _ => Ok(m),
    }
}

fn parse_disks(e: &Elem<'_>) -> Result<Vec<Disk>> {
    let mut disks: Vec<Disk> = Vec::new();
    for d in e.elems().filter(|c| c.name == "disk") {
        let disk = parse_disk(d)?;
        if disks.iter().any(|o| o.name == disk.name) {
            return Err(d.err(format!("disk '{}' is named twice", disk.name)));
        }
        disks.push(disk);
    }
    Ok(disks)
}

fn parse_disk(e: &Elem<'_>) -> Result<Disk> {
    let name = e
        .opt_attr("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| e.err("a disk needs a name"))?;
    let mut d = Disk {
        name,
        snapshot: e.location()?,
        source_type: e.opt_attr("type"),
        extra: e.extra(
            &["name", "snapshot", "type"],
            &["driver", "source", "snapshotDeleteInProgress"],
        ),
        ..Default::default()
    };
    if let Some(dr) = e.child("driver")? {
        let mut driver = Driver {
            format: dr.opt_attr("type"),
            extra: dr.extra(&["type"], &["metadata_cache"]),
            ..Default::default()
        };
        if let Some(mc) = dr.child("metadata_cache")? {
            let mut cache = MetadataCache {
                extra: mc.extra(&[], &["max_size"]),
                ..Default::default()
            };
            if let Some(ms) = mc.child("max_size")? {
                let unit = ms.attr("unit").map(str::to_string);
                if let Some((k, _)) = ms.attrs.iter().find(|(k, _)| k != "unit") {
                    return Err(ms.err(format!("unexpected attribute {k}")));
                }
                let t = ms.text_ignoring_attrs()?;
                cache.max_size = Some(ScaledSize {
                    value: t
                        .trim()
                        .parse()
                        .map_err(|_| ms.err(format!("not a size: {:?}", t.trim())))?,
                    unit,
                });
            }
            driver.metadata_cache = Some(cache);
        }
        d.driver = Some(driver);
    }
    if let Some(src) = e.child("source")? {
        d.source = Some(parse_source(src)?);
    }
    if let Some(x) = e.child("snapshotDeleteInProgress")? {
        if !x.attrs.is_empty() || x.elems().next().is_some() {
            return Err(x.err("must be empty"));
        }
        d.delete_in_progress = true;
    }
    if matches!(
        d.snapshot,
        Some(Location::No | Location::Internal | Location::Manual)
    ) && (d.source.is_some() || d.driver.is_some())
    {
        return Err(e.err(format!(
            "disk '{}': a source or driver requires an external or storage snapshot, not '{}'",
            d.name,
            d.snapshot.map_or("", Location::as_str)
        )));
    }
    Ok(d)
}

const SOURCE_ATTRS: [&str; 8] = [
    "file",
    "dev",
    "dir",
    "protocol",
    "name",
    "pool",
    "volume",
    "startupPolicy",
];

fn parse_source(e: &Elem<'_>) -> Result<Source> {
    let mut s = Source {
        file: e.opt_attr("file"),
        dev: e.opt_attr("dev"),
        dir: e.opt_attr("dir"),
        protocol: e.opt_attr("protocol"),
        name: e.opt_attr("name"),
        pool: e.opt_attr("pool"),
        volume: e.opt_attr("volume"),
        startup_policy: e.opt_attr("startupPolicy"),
        extra: e.extra(&SOURCE_ATTRS, &["host"]),
        hosts: Vec::new(),
    };
    for h in e.elems().filter(|c| c.name == "host") {
        s.hosts.push(Host {
            name: h.opt_attr("name"),
            port: h.opt_attr("port"),
            transport: h.opt_attr("transport"),
            socket: h.opt_attr("socket"),
            extra: h.extra(&["name", "port", "transport", "socket"], &[]),
        });
    }
    Ok(s)
}

fn disks_out(name: &'static str, disks: &[Disk], extra: &Extra) -> Out {
    let mut out = Out::new(name);
    for d in disks {
        let mut de = Out::new("disk");
        de.opt_attr("name", Some(&d.name));
        de.opt_attr("snapshot", d.snapshot.map(Location::as_str));
        de.opt_attr("type", d.source_type.as_deref());
        if let Some(dr) = &d.driver {
            let mut dre = Out::new("driver");
            dre.opt_attr("type", dr.format.as_deref());
            if let Some(mc) = &dr.metadata_cache {
                let mut mce = Out::new("metadata_cache");
                if let Some(ms) = &mc.max_size {
                    let mut mse = Out::new("max_size");
                    mse.opt_attr("unit", ms.unit.as_deref());
                    mse.nodes.push(OutNode::Text(ms.value.to_string()));
                    mce.child(mse);
                }
                mce.extra(&mc.extra);
                dre.child(mce);
            }
            dre.extra(&dr.extra);
            de.child(dre);
        }
        if let Some(src) = &d.source {
            let mut se = Out::new("source");
            se.opt_attr("file", src.file.as_deref());
            se.opt_attr("dev", src.dev.as_deref());
            se.opt_attr("dir", src.dir.as_deref());
            se.opt_attr("protocol", src.protocol.as_deref());
            se.opt_attr("name", src.name.as_deref());
            se.opt_attr("pool", src.pool.as_deref());
            se.opt_attr("volume", src.volume.as_deref());
            se.opt_attr("startupPolicy", src.startup_policy.as_deref());
            for h in &src.hosts {
                let mut he = Out::new("host");
                he.opt_attr("name", h.name.as_deref());
                he.opt_attr("port", h.port.as_deref());
                he.opt_attr("transport", h.transport.as_deref());
                he.opt_attr("socket", h.socket.as_deref());
                he.extra(&h.extra);
                se.child(he);
            }
            se.extra(&src.extra);
            de.child(se);
        }
        if d.delete_in_progress {
            de.child(Out::new("snapshotDeleteInProgress"));
        }
        de.extra(&d.extra);
        out.child(de);
    }
    out.extra(extra);
    out
}
