//! The one path for writing qcow2 images: creating images and overlays
//! ([`create`], byte-identical to `qemu-img create -f qcow2`) and internal snapshots
//! ([`snapshot`]: create, apply, delete, each crash-atomic: copied metadata switched by one
//! header write), natively through image-formats.
//! No process is spawned.
//!
//! Used alike by the dir and btrfs pools and by the virt-snap facade's `Image` handle, so that
//! every qcow2 write has:
//!
//! - **one lease call**: [`lease`], the volume's exclusive lease plus QEMU's writer image locks
//!   on the file (a VM started by any tool is seen and cannot open the image meanwhile). The
//!   writing functions below expect the caller to hold it.
//! - **one clock**: snapshot dates come from the [`Clock`] the caller passes, stamped at whole
//!   microseconds like qemu-img ([`SystemClock`] in production, [`FixedClock`] in tests).
//! - **one fsync policy**: the image file is fsynced after every change, and the directory too
//!   after a new file was created.
//! - **one mode**: new image files are created `0600` (never readable by other users) with
//!   `O_EXCL`; a failed create removes the file only if this call created it.

use crate::error::{Error, ErrorKind, Result};
use crate::model::VolumeSpec;
use image_formats::qcow2_write::{self, SnapshotEditor};
use image_formats::FileStorage;
use locking::{Acquired, LockManager, Resource};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

pub use image_formats::qcow2::Snapshot;
pub use image_formats::qcow2_write::{CreateOptions, SnapshotRef};

/// The mode of image files this module creates.
pub const IMAGE_MODE: u32 = 0o600;

/// Where snapshot dates come from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that always says the same time (tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub SystemTime);

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// A qcow2 snapshot date from `clock`: seconds and whole microseconds (in nanoseconds), as
/// qemu-img stamps them.
pub fn snapshot_date(clock: &dyn Clock) -> (u32, u32) {
    let d = clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

/// The lease every write of the image file `path` takes first, for operation `op`: the
/// exclusive lease and QEMU's writer image locks. Fails with [`ErrorKind::InUse`] while a VM
/// or another operation holds it.
pub fn lease(locks: &LockManager, op: &str, path: &Path) -> Result<Acquired> {
    crate::lease::lease_now(locks, op, Resource::file(path))
}

/// What [`create`] does when the file exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    /// Fail with [`ErrorKind::AlreadyExists`].
    Refuse,
    /// Overwrite it in place, as `qemu-img create` does (its mode and owner are kept; it is
    /// never removed, also when the create fails).
    Overwrite,
}

/// Write a new qcow2 image at `path` (the caller holds [`lease`]). A new file is created
/// [`IMAGE_MODE`] with `O_EXCL` and removed again if the create fails.
pub fn create(path: &Path, opts: &CreateOptions, if_exists: IfExists) -> Result<()> {
    let mut created = true;
    // Non-blocking, then checked: an existing FIFO, directory, ... is refused at once.
    let open = |new: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        if new {
            o.create_new(true).mode(IMAGE_MODE);
        }
        o.open(path).and_then(image_formats::checked_image_file)
    };
    let file = match open(true) {
        Ok(f) => f,
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                && if_exists == IfExists::Overwrite =>
        {
            created = false;
            open(false).map_err(|e| Error::io(format!("open {}", path.display()), e))?
        }
        Err(e) => return Err(Error::io(format!("create {}", path.display()), e)),
    };
    let r = write_new(file, path, opts).and_then(|_| if created { sync_dir(path) } else { Ok(()) });
    if r.is_err() && created {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Write a new qcow2 image into `file`, a new empty file the caller created (a pool opens it
/// relative to its directory, following no symlink; `path` names it in messages), and fsync
/// it. The caller holds [`lease`], syncs the directory, and removes the file on failure.
pub fn create_in(file: std::fs::File, path: &Path, opts: &CreateOptions) -> Result<()> {
    write_new(file, path, opts)
        .map_err(|e| e.context(format!("create qcow2 volume {}", path.display())))
}

fn write_new(file: std::fs::File, path: &Path, opts: &CreateOptions) -> Result<()> {
    let storage = FileStorage::from_file(file);
    qcow2_write::create(&storage, opts)
        .map_err(Error::from)
        .and_then(|_| sync(storage.file(), path))
}

/// The qcow2 image a volume `spec` asks for: its size and recorded backing file and format.
/// The pool has resolved the backing volume (one of its own) and the size already.
pub(crate) fn volume_options(spec: &VolumeSpec) -> CreateOptions {
    let size = spec.capacity;
    CreateOptions {
        size,
        backing_file: spec.backing.as_ref().map(|b| b.path.clone().into_bytes()),
        backing_format: spec
            .backing
            .as_ref()
            .map(|b| b.format.as_str().as_bytes().to_vec()),
    }
}

/// An internal-snapshot operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    /// Snapshot the current state under this name (the id is the highest numeric id + 1).
    Create(Vec<u8>),
    /// Make the image's content the snapshot's again (the snapshot is kept).
    Apply(SnapshotRef),
    /// Delete the snapshot.
    Delete(SnapshotRef),
}

/// Run a snapshot operation on the qcow2 image `path` (the caller holds [`lease`]), dating a
/// new snapshot by `clock`. Returns the snapshot created, applied or deleted.
pub fn snapshot(path: &Path, op: &SnapshotOp, clock: &dyn Clock) -> Result<Snapshot> {
    let storage = FileStorage::open_read_write(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    snapshot_storage(storage, path, op, clock)
}

/// [`snapshot`] on the image open read-write as `file` (a pool opens it relative to its
/// directory, following no symlink; `path` names it in messages).
pub fn snapshot_file(
    file: std::fs::File,
    path: &Path,
    op: &SnapshotOp,
    clock: &dyn Clock,
) -> Result<Snapshot> {
    snapshot_storage(FileStorage::from_file(file), path, op, clock)
}

fn snapshot_storage(
    storage: FileStorage,
    path: &Path,
    op: &SnapshotOp,
    clock: &dyn Clock,
) -> Result<Snapshot> {
    let mut ed = SnapshotEditor::open(storage)?;
    let sn = match op {
        SnapshotOp::Create(name) => {
            let id = ed.create(name, snapshot_date(clock))?;
            ed.image()
                .snapshots
                .iter()
                .find(|s| s.id == id)
                .cloned()
                .ok_or_else(|| {
                    Error::new(ErrorKind::Image, "the new snapshot is not in the table")
                })?
        }
        SnapshotOp::Apply(which) => ed.apply(which)?,
        SnapshotOp::Delete(which) => ed.delete(which)?,
    };
    sync(ed.into_storage().file(), path)?;
    Ok(sn)
}

fn sync(f: &std::fs::File, path: &Path) -> Result<()> {
    f.sync_all()
        .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}
