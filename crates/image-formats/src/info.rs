//! What `qemu-img info` reports about one image, read natively, and its JSON form with
//! `qemu-img info --output=json`'s field names and values.

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{self, Qcow2, Snapshot};
use crate::qed::{self, Qed};
use crate::storage::{FileStorage, Storage};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::path::Path;

/// An image format this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// qcow2 version 2 or 3.
    Qcow2,
    /// QED.
    Qed,
    /// No recognised header: the bytes are the disk.
    Raw,
}

impl Format {
    /// The name QEMU uses ("qcow2", "qed", "raw").
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Raw => "raw",
        }
    }
    /// Parse a format name as recorded in an image header or given by a user.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "qed" => Ok(Format::Qed),
            "raw" => Ok(Format::Raw),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("image format '{other}' is not supported"),
            )),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Formats we recognise only to refuse them (rather than reading them as raw).
const OTHER_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"KDMV", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"XenSource Bochs", "bochs"),
];

/// Probe the format from the first bytes. Formats we do not read are an
/// [`ErrorKind::Unsupported`] error; anything unrecognised is raw.
pub fn probe<S: Storage + ?Sized>(storage: &S) -> Result<Format> {
    let len = storage
        .len()
        .map_err(|e| Error::io("cannot get the image size", e))?;
    let mut b = [0u8; 512];
    let n = len.min(512) as usize;
    storage
        .read_at(&mut b[..n], 0)
        .map_err(|e| Error::io("cannot read the image header", e).at(0))?;
    let b = &b[..n];
    if b.starts_with(&qcow2::MAGIC) {
        if b.len() >= 8 && u32::from_be_bytes([b[4], b[5], b[6], b[7]]) < 2 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "qcow (version 1) images are not supported",
            ));
        }
        return Ok(Format::Qcow2);
    }
    if b.starts_with(&qed::MAGIC) {
        return Ok(Format::Qed);
    }
    for (off, magic, name) in OTHER_MAGICS {
        if b.len() >= off + magic.len() && &b[*off..off + magic.len()] == *magic {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("image format '{name}' is not supported"),
            ));
        }
    }
    Ok(Format::Raw)
}

/// Format-specific metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Details {
    /// qcow2 metadata.
    Qcow2(Box<Qcow2>),
    /// QED metadata.
    Qed(Qed),
    /// A raw image has none.
    Raw,
}

/// One image as `qemu-img info` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The name the image was opened by (as given; relative names stay relative).
    pub filename: String,
    /// Length of the file in bytes.
    pub file_length: u64,
    /// Space allocated on the host (st_blocks * 512), if known.
    pub actual_size: Option<u64>,
    /// Format-specific metadata.
    pub details: Details,
    /// Is the image a block device (QEMU's `host_device` protocol) rather than a file?
    pub block_device: bool,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// QEMU's `path_combine`: a relative backing name is relative to the overlay's directory.
pub fn combine_backing_path(overlay: &str, backing: &str) -> String {
    if backing.starts_with('/') || backing.is_empty() {
        return backing.to_string();
    }
    match overlay.rfind('/') {
        Some(i) => format!("{}{}", &overlay[..=i], backing),
        None => backing.to_string(),
    }
}

impl ImageInfo {
    /// Read the metadata of an image in `storage`; `format` None probes the header.
    pub fn read<S: Storage + ?Sized>(
        filename: &str,
        storage: &S,
        format: Option<Format>,
    ) -> Result<ImageInfo> {
        let go = || -> Result<ImageInfo> {
            let format = match format {
                Some(f) => f,
                None => probe(storage)?,
            };
            let file_length = storage
                .len()
                .map_err(|e| Error::io("cannot get the image size", e))?;
            let details = match format {
                Format::Qcow2 => Details::Qcow2(Box::new(Qcow2::read(storage)?)),
                Format::Qed => Details::Qed(Qed::read(storage)?),
                Format::Raw => Details::Raw,
            };
            Ok(ImageInfo {
                filename: filename.to_string(),
                file_length,
                actual_size: None,
                details,
                block_device: false,
            })
        };
        go().map_err(|e| e.with_path(filename))
    }

    /// Open `path` read-only, without locks (works on images a running QEMU holds), and read
    /// its metadata. `format` None probes the header.
    pub fn open(path: &Path, format: Option<Format>) -> Result<ImageInfo> {
        let storage = FileStorage::open_read_only(path).map_err(|e| Error::open_failed(path, e))?;
        let name = path.to_string_lossy();
        let mut info = ImageInfo::read(&name, &storage, format)?;
        {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let meta = storage.file().metadata().ok();
            info.actual_size = meta.as_ref().map(|m| m.blocks() * 512);
            info.block_device = meta.is_some_and(|m| m.file_type().is_block_device());
        }
        Ok(info)
    }

    /// QEMU's protocol driver for the image: "host_device" for block devices, else "file".
    pub fn protocol(&self) -> &'static str {
        if self.block_device {
            "host_device"
        } else {
            "file"
        }
    }

    /// The format.
    pub fn format(&self) -> Format {
        match self.details {
            Details::Qcow2(_) => Format::Qcow2,
            Details::Qed(_) => Format::Qed,
            Details::Raw => Format::Raw,
        }
    }
    /// The qcow2 metadata, if this is a qcow2 image.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.details {
            Details::Qcow2(q) => Some(q),
            _ => None,
        }
    }
    /// Virtual disk size as QEMU reports it (whole 512-byte sectors).
    pub fn virtual_size(&self) -> u64 {
        match &self.details {
            Details::Qcow2(q) => q.header.size & !511,
            Details::Qed(q) => q.header.image_size & !511,
            Details::Raw => self.file_length.div_ceil(512) * 512,
        }
    }
    /// Cluster size (not for raw).
    pub fn cluster_size(&self) -> Option<u64> {
        match &self.details {
            Details::Qcow2(q) => Some(q.header.cluster_size()),
            Details::Qed(q) => Some(u64::from(q.header.cluster_size)),
            Details::Raw => None,
        }
    }
    /// The dirty flag as qemu-img reports it: qcow2's dirty bit. (QEMU does not report
    /// QED's need-check bit here; see [`qed::Header::needs_check`].)
    pub fn dirty(&self) -> bool {
        match &self.details {
            Details::Qcow2(q) => q.header.is_dirty(),
            _ => false,
        }
    }
    /// Is the image encrypted?
    pub fn encrypted(&self) -> bool {
        matches!(&self.details, Details::Qcow2(q) if q.header.crypt_method != 0)
    }
    /// The backing file name as recorded.
    pub fn backing_filename(&self) -> Option<String> {
        match &self.details {
            Details::Qcow2(q) => q.backing_file.as_deref().map(lossy),
            Details::Qed(q) => q.backing_file.as_deref().map(lossy),
            Details::Raw => None,
        }
    }
    /// The backing file name resolved against this image's directory.
    pub fn full_backing_filename(&self) -> Option<String> {
        self.backing_filename()
            .map(|b| combine_backing_path(&self.filename, &b))
    }
    /// The backing file's format, if the image records it (QED records only "raw").
    pub fn backing_format(&self) -> Option<String> {
        match &self.details {
            Details::Qcow2(q) if q.backing_file.is_some() => q.backing_format().map(lossy),
            Details::Qed(q) if q.backing_file.is_some() && q.header.backing_no_probe() => {
                Some("raw".into())
            }
            _ => None,
        }
    }
    /// The internal snapshots (qcow2 only).
    pub fn snapshots(&self) -> &[Snapshot] {
        match &self.details {
            Details::Qcow2(q) => &q.snapshots,
            _ => &[],
        }
    }

    /// The JSON `qemu-img info --output=json` prints for this image: same names and values
    /// on every field qemu-img prints, plus `x-`-prefixed extras (unknown features and
    /// extensions) when there are any.
    pub fn to_json(&self) -> Value {
        let mut m = self.json_without_snapshots();
        if !self.snapshots().is_empty() {
            m.insert(
                "snapshots".into(),
                Value::Array(self.snapshots().iter().map(snapshot_json).collect()),
            );
        }
        Value::Object(m)
    }

    /// The same document as [`ImageInfo::to_json`] as a serializable view that writes the
    /// snapshot list without building a `Value` per snapshot (fast for big tables).
    pub fn json(&self) -> InfoJson<'_> {
        InfoJson(self)
    }

    fn json_without_snapshots(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("filename".into(), json!(self.filename));
        m.insert("format".into(), json!(self.format().as_str()));
        m.insert("virtual-size".into(), json!(self.virtual_size()));
        if let Some(a) = self.actual_size {
            m.insert("actual-size".into(), json!(a));
        }
        m.insert("dirty-flag".into(), json!(self.dirty()));
        if let Some(c) = self.cluster_size() {
            m.insert("cluster-size".into(), json!(c));
        }
        if self.encrypted() {
            m.insert("encrypted".into(), json!(true));
        }
        if let Some(b) = self.backing_filename() {
            m.insert("backing-filename".into(), json!(b));
            m.insert(
                "full-backing-filename".into(),
                json!(self.full_backing_filename()),
            );
            if let Some(f) = self.backing_format() {
                m.insert("backing-filename-format".into(), json!(f));
            }
        }
        if let Details::Qcow2(q) = &self.details {
            m.insert("format-specific".into(), qcow2_specific(q));
            let unknown = q.unknown_features();
            if !unknown.is_empty() {
                m.insert(
                    "x-unknown-features".into(),
                    Value::Array(
                        unknown
                            .iter()
                            .map(|u| {
                                json!({"type": u.feature_type.as_str(), "bit": u.bit, "name": u.name})
                            })
                            .collect(),
                    ),
                );
            }
            let exts: Vec<Value> = q
                .extensions
                .iter()
                .filter_map(|e| match e {
                    qcow2::HeaderExtension::Unknown { ext_type, data } => {
                        Some(json!({"type": format!("{ext_type:#010x}"), "length": data.len()}))
                    }
                    _ => None,
                })
                .collect();
            if !exts.is_empty() {
                m.insert("x-unknown-header-extensions".into(), Value::Array(exts));
            }
        }
        let mut file = Map::new();
        file.insert("children".into(), json!([]));
        file.insert(
            "virtual-size".into(),
            json!(self.file_length.div_ceil(512) * 512),
        );
        file.insert("filename".into(), json!(self.filename));
        file.insert("format".into(), json!(self.protocol()));
        if let Some(a) = self.actual_size {
            file.insert("actual-size".into(), json!(a));
        }
        file.insert(
            "format-specific".into(),
            json!({"type": "file", "data": {}}),
        );
        file.insert("dirty-flag".into(), json!(false));
        m.insert(
            "children".into(),
            json!([{"name": "file", "info": Value::Object(file)}]),
        );
        m
    }
}

/// One snapshot as `qemu-img info --output=json` prints it. Like QEMU, ids are cut to 127
/// bytes and names to 255 bytes when listed.
#[derive(Debug, Serialize)]
pub struct SnapshotJson<'a> {
    id: Cow<'a, str>,
    name: Cow<'a, str>,
    #[serde(rename = "vm-state-size")]
    vm_state_size: u64,
    #[serde(rename = "date-sec")]
    date_sec: u32,
    #[serde(rename = "date-nsec")]
    date_nsec: u32,
    #[serde(rename = "vm-clock-sec")]
    vm_clock_sec: u64,
    #[serde(rename = "vm-clock-nsec")]
    vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
}

impl<'a> From<&'a Snapshot> for SnapshotJson<'a> {
    fn from(s: &'a Snapshot) -> Self {
        SnapshotJson {
            id: String::from_utf8_lossy(&s.id[..s.id.len().min(127)]),
            name: String::from_utf8_lossy(&s.name[..s.name.len().min(255)]),
            vm_state_size: s.vm_state_size(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount(),
        }
    }
}

/// The snapshot list as `qemu-img info --output=json` prints it (a JSON array).
#[derive(Debug)]
pub struct SnapshotsJson<'a>(pub &'a [Snapshot]);

impl Serialize for SnapshotsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        ser.collect_seq(self.0.iter().map(SnapshotJson::from))
    }
}

/// [`ImageInfo::to_json`]'s document, serialized directly (see [`ImageInfo::json`]).
#[derive(Debug)]
pub struct InfoJson<'a>(&'a ImageInfo);

impl Serialize for InfoJson<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let head = self.0.json_without_snapshots();
        let snaps = self.0.snapshots();
        let mut map = ser.serialize_map(Some(head.len() + usize::from(!snaps.is_empty())))?;
        let mut pending = !snaps.is_empty();
        for (k, v) in &head {
            // Keep the keys sorted, as in `to_json`.
            if pending && k.as_str() > "snapshots" {
                map.serialize_entry("snapshots", &SnapshotsJson(snaps))?;
                pending = false;
            }
            map.serialize_entry(k, v)?;
        }
        if pending {
            map.serialize_entry("snapshots", &SnapshotsJson(snaps))?;
        }
        map.end()
    }
}

/// The JSON `qemu-img info --output=json` prints for one snapshot.
pub fn snapshot_json(s: &Snapshot) -> Value {
    serde_json::to_value(SnapshotJson::from(s)).unwrap_or(Value::Null)
}

fn qcow2_specific(q: &Qcow2) -> Value {
    let h = &q.header;
    let mut d = Map::new();
    if h.version == 2 {
        d.insert("compat".into(), json!("0.10"));
    } else {
        d.insert("compat".into(), json!("1.1"));
        d.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        d.insert("corrupt".into(), json!(h.is_corrupt()));
        d.insert("extended-l2".into(), json!(h.extended_l2()));
        if !q.bitmaps.is_empty() {
            d.insert(
                "bitmaps".into(),
                Value::Array(
                    q.bitmaps
                        .iter()
                        .map(|b| {
                            json!({
                                "name": lossy(&b.name),
                                "granularity": b.granularity(),
                                "flags": b.flag_names(),
                            })
                        })
                        .collect(),
                ),
            );
        }
        if let Some(f) = q.data_file() {
            d.insert("data-file".into(), json!(lossy(f)));
        }
        if q.has_data_file() {
            d.insert("data-file-raw".into(), json!(q.data_file_raw()));
        }
    }
    d.insert("refcount-bits".into(), json!(h.refcount_bits()));
    d.insert("compression-type".into(), json!(h.compression_type_name()));
    match h.crypt_method {
        1 => {
            d.insert("encrypt".into(), json!({"format": "aes"}));
        }
        2 => {
            let e = q
                .luks
                .as_ref()
                .map(crate::luks::LuksHeader::to_json)
                .unwrap_or_else(|| json!({"format": "luks"}));
            d.insert("encrypt".into(), e);
        }
        _ => {}
    }
    json!({"type": "qcow2", "data": Value::Object(d)})
}
