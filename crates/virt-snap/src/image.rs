//! [`Image`]: one disk image file. Reading (info, backing chain, snapshot table, who holds
//! it) takes no lock and works while a VM uses the image; every write (create, overlay,
//! internal snapshot create/apply/delete) takes the image's lease and QEMU's image locks
//! first and goes through storage-backends' one image-write path, the one the dir and btrfs
//! pools use too.
//!
//! Image operations are synchronous (plain file I/O, no tools run).

use crate::connection::Connection;
use crate::error::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};
use storage_backends::image::{self as write, IfExists, SnapshotOp};

pub use image_formats::info::SnapshotsJson;
pub use image_formats::{Format, ImageInfo, ProbePolicy};
pub use locking::qemu::{LockOwner, Permission};
pub use locking::HolderRecord;
pub use storage_backends::image::{Clock, FixedClock, Snapshot, SnapshotRef, SystemClock};

/// The image file at a path. [`Image::at`] makes one for reading; a [`Connection`]'s
/// ([`Connection::image`]) can also write, taking leases in the connection's lockspace.
#[derive(Debug, Clone)]
pub struct Image {
    path: PathBuf,
    conn: Option<Connection>,
}

/// What [`Image::create`] writes: a qcow2 image, or an overlay of a backing file.
#[derive(Debug, Clone, Default)]
pub struct NewImage {
    /// Virtual size in bytes; `None` takes the backing file's.
    pub size: Option<u64>,
    /// The backing file, if this is an overlay.
    pub backing: Option<NewBacking>,
}

/// The backing file of a [`NewImage`].
#[derive(Debug, Clone)]
pub struct NewBacking {
    /// The name to record (a relative name resolves against the new image's directory).
    pub file: String,
    /// Its format, recorded in the image. `None` probes it, which `probe` must allow.
    pub format: Option<Format>,
    /// Whether the backing file's format may be guessed from its content (unsafe with
    /// guest-written data).
    pub probe: ProbePolicy,
}

/// What [`Image::create`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedImage {
    /// The image file.
    pub filename: PathBuf,
    /// Its format (always qcow2).
    pub format: Format,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
}

/// Who holds an image: QEMU's image locks on it and the virt-snap lease holders.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageLocks {
    /// The image's canonical path.
    pub image: PathBuf,
    /// Whether anyone holds it (a QEMU lock or a lease).
    pub in_use: bool,
    /// QEMU permissions someone holds.
    pub held: Vec<Permission>,
    /// QEMU permissions someone does not share.
    pub unshared: Vec<Permission>,
    /// The lock bytes held.
    pub bytes: Vec<u64>,
    /// The processes holding QEMU locks.
    pub processes: Vec<LockOwner>,
    /// The lease file, when a lockspace is known.
    pub lease_file: Option<PathBuf>,
    /// The lease's holders, when a lockspace is known.
    pub holders: Option<Vec<HolderRecord>>,
}

/// Parse an image format name (`qcow2`, `qed`, `raw`).
pub fn parse_format(name: &str) -> Result<Format> {
    Ok(Format::from_name(name)?)
}

/// Parse a size as qemu-img does: bytes, or a number (fractions allowed) with a binary
/// suffix k, M, G, T, P or E (`64M`, `1.5G`).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::new(ErrorKind::InvalidInput, format!("invalid size '{s}'"));
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(bad()),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    let bytes = v * mul as f64;
    if bytes >= u64::MAX as f64 || (mul == 1 && num.contains('.')) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

impl Image {
    /// The image at `path`, for reading (writes need [`Connection::image`]).
    pub fn at(path: impl Into<PathBuf>) -> Image {
        Image {
            path: path.into(),
            conn: None,
        }
    }

    pub(crate) fn with_connection(path: PathBuf, conn: Connection) -> Image {
        Image {
            path,
            conn: Some(conn),
        }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's metadata, what `qemu-img info` shows; `format` instead of probing.
    pub fn info(&self, format: Option<Format>) -> Result<ImageInfo> {
        ImageInfo::open(&self.path, format).map_err(|e| Error::caused_by("cannot read image", e))
    }

    /// The image and every backing file, top first (`qemu-img info --backing-chain`). Backing
    /// formats the images do not record are probed only if `probe` allows it.
    pub fn chain(&self, format: Option<Format>, probe: ProbePolicy) -> Result<Vec<ImageInfo>> {
        let opts = image_formats::ChainOptions {
            probe,
            ..image_formats::ChainOptions::default()
        };
        image_formats::backing_chain(&self.path, format, opts).map_err(|e| {
            if e.kind() == image_formats::ErrorKind::ProbeRefused {
                Error::caused_by(
                    "cannot read the backing chain (pass --allow-probe to probe \
                     backing formats the images do not record)",
                    e,
                )
            } else {
                Error::caused_by("cannot read image", e)
            }
        })
    }

    /// The internal snapshots of a qcow2 image ([`ErrorKind::Unsupported`] for other
    /// formats).
    pub fn snapshots(&self, format: Option<Format>) -> Result<Vec<Snapshot>> {
        let info = self.info(format)?;
        if info.format() != Format::Qcow2 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: {} images have no internal snapshots",
                    self.path.display(),
                    info.format()
                ),
            ));
        }
        Ok(info.snapshots().to_vec())
    }

    /// Who holds the image: QEMU's image locks, and the lease holders recorded in
    /// `lockspace` (default: the connection's; none for an [`Image::at`]), a directory or a
    /// cluster (whose records name each holder's host). Takes no lock.
    pub fn locks(&self, lockspace: Option<&crate::Lockspace>) -> Result<ImageLocks> {
        use crate::Lockspace;
        use locking::{LeaseBackend, LocalBackend, Resource};
        let key = Resource::file(&self.path).key()?;
        let image = key.image().unwrap_or(&self.path).to_path_buf();
        let state = locking::qemu::probe(&image)?;
        let (space, host) = match (lockspace, &self.conn) {
            (Some(l), c) => (
                Some(l.clone()),
                c.as_ref()
                    .map_or_else(crate::default_host, |c| c.host().to_string()),
            ),
            (None, Some(c)) => (Some(c.lockspace().clone()), c.host().to_string()),
            (None, None) => (None, String::new()),
        };
        let (lease_file, holders) = match space {
            Some(Lockspace::Dir(dir)) => {
                let backend = LocalBackend::at(dir);
                let holders = backend.holders(&key)?;
                (Some(backend.lease_path(&key)), Some(holders))
            }
            Some(l @ Lockspace::Etcd(_)) => {
                let holders = l.backend(&host)?.holders(&key)?;
                (None, Some(holders))
            }
            None => (None, None),
        };
        Ok(ImageLocks {
            in_use: state.in_use() || holders.as_ref().is_some_and(|h| !h.is_empty()),
            bytes: state.bytes(),
            processes: if state.in_use() {
                locking::qemu::lock_owners(&image)
            } else {
                Vec::new()
            },
            image,
            held: state.held,
            unshared: state.unshared,
            lease_file,
            holders,
        })
    }

    fn conn(&self) -> Result<&Connection> {
        self.conn.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: writing an image needs a Connection (Connection::image)",
                    self.path.display()
                ),
            )
        })
    }

    fn lease(&self, op: &str) -> Result<locking::Acquired> {
        let conn = self.conn()?;
        write::lease(&conn.inner().locks, op, &self.path).map_err(|e| {
            // Only a conflict is "in use"; a read-only lockspace or a symlink loop says so.
            let what = if e.kind() == storage_backends::ErrorKind::InUse {
                "image is in use, not changing it"
            } else {
                "cannot lock the image"
            };
            Error::caused_by(format!("{}: {what}", self.path.display()), e)
        })
    }

    /// Create a qcow2 image (or overlay) here, like `qemu-img create -f qcow2 [-b B -F FMT]`:
    /// the image qemu-img would write. An existing file is overwritten in place (as qemu-img
    /// does) but never removed; a new file is created `0600` and removed again if the create
    /// fails.
    pub fn create(&self, new: &NewImage) -> Result<CreatedImage> {
        self.conn()?;
        let mut backing_format = None;
        let mut backing_size = None;
        if let Some(b) = &new.backing {
            let dir = self
                .path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let path = if Path::new(&b.file).is_absolute() {
                PathBuf::from(&b.file)
            } else {
                dir.join(&b.file)
            };
            if b.format.is_none() && b.probe != ProbePolicy::Allow {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "backing file '{}' given without its format: pass -F FMT \
                         (or --allow-probe to guess it, which is unsafe with guest-written data)",
                        b.file
                    ),
                ));
            }
            backing_format = b.format;
            // Reading the backing file as recorded tells its size (and that it is what the
            // format says).
            match ImageInfo::open(&path, b.format) {
                Ok(info) => {
                    backing_size = Some(info.virtual_size());
                    backing_format.get_or_insert(info.format());
                }
                // Like qemu-img -u: a missing backing file is fine when the size is given.
                Err(e)
                    if new.size.is_some()
                        && b.format.is_some()
                        && e.kind() == image_formats::ErrorKind::BackingMissing => {}
                Err(e) => {
                    return Err(Error::caused_by(
                        format!("{}: cannot read the backing file", path.display()),
                        e,
                    ))
                }
            }
        }
        let size = new.size.or(backing_size).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "a size is needed when there is no backing file",
            )
        })?;
        let opts = write::CreateOptions {
            size,
            backing_file: new.backing.as_ref().map(|b| b.file.as_bytes().to_vec()),
            backing_format: backing_format.map(|f| f.as_str().as_bytes().to_vec()),
        };
        let _held = self.lease("image create")?;
        write::create(&self.path, &opts, IfExists::Overwrite).map_err(|e| {
            Error::caused_by(
                format!("{}: cannot create the image", self.path.display()),
                e,
            )
        })?;
        Ok(CreatedImage {
            filename: self.path.clone(),
            format: Format::Qcow2,
            virtual_size: size,
        })
    }

    fn snapshot_op(&self, lease_op: &str, what: &str, op: SnapshotOp) -> Result<Snapshot> {
        let _held = self.lease(lease_op)?;
        let clock = self.conn()?.inner().clock.clone();
        write::snapshot(&self.path, &op, clock.as_ref())
            .map_err(|e| Error::caused_by(format!("{}: {what}", self.path.display()), e))
    }

    /// Snapshot the image's current state as `name`, like `qemu-img snapshot -c` (names may
    /// repeat; the id is the highest numeric id + 1). Dated by the connection's clock.
    pub fn snapshot_create(&self, name: &[u8]) -> Result<Snapshot> {
        self.snapshot_op(
            "snapshot create",
            "cannot create the snapshot",
            SnapshotOp::Create(name.to_vec()),
        )
    }

    /// Make the image's content the snapshot's again, like `qemu-img snapshot -a`.
    pub fn snapshot_apply(&self, which: &SnapshotRef) -> Result<Snapshot> {
        self.snapshot_op(
            "snapshot apply",
            "cannot apply the snapshot",
            SnapshotOp::Apply(which.clone()),
        )
    }

    /// Delete a snapshot, like `qemu-img snapshot -d`.
    pub fn snapshot_delete(&self, which: &SnapshotRef) -> Result<Snapshot> {
        self.snapshot_op(
            "snapshot delete",
            "cannot delete the snapshot",
            SnapshotOp::Delete(which.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("8g").unwrap(), 8 << 30);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("").is_err());
    }
}
