//! qcow2 volumes, natively through image-formats: creating images and overlays
//! (`qcow2_write::create`, byte-identical to qemu-img) and internal snapshots
//! (`qcow2_write::SnapshotEditor`: create, apply, delete in QEMU's write order). No process
//! is spawned; the caller holds the volume's lease and QEMU's image locks.

use crate::error::{Error, ErrorKind, Result};
use crate::model::VolumeSpec;
use image_formats::qcow2_write::{self, SnapshotEditor, SnapshotRef};
use image_formats::FileStorage;
use std::path::Path;

/// A snapshot operation.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Create(String),
    Apply(String),
    Delete(String),
}

/// Create the qcow2 image `path` (which must not exist) for `spec`; removed on failure.
pub(crate) fn create(path: &Path, spec: &VolumeSpec) -> Result<()> {
    if let Some(b) = &spec.backing {
        // Only a regular file or block device, checked without opening it for I/O (a FIFO
        // would block the open).
        match image_formats::check_image_path(Path::new(&b.path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("backing volume {} does not exist", b.path),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("backing volume {} {e}", b.path),
                ))
            }
            Err(e) => return Err(Error::io(format!("backing volume {}", b.path), e)),
        }
    }
    let size = match (&spec.backing, spec.capacity) {
        (Some(b), 0) => {
            crate::dir::probe_file(Path::new(&b.path))
                .map_err(|e| e.context(format!("backing volume {}", b.path)))?
                .1
        }
        (_, n) => n,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    let storage = FileStorage::from_file(f);
    let opts = qcow2_write::CreateOptions {
        size,
        backing_file: spec.backing.as_ref().map(|b| b.path.clone().into_bytes()),
        backing_format: spec
            .backing
            .as_ref()
            .map(|b| b.format.as_str().as_bytes().to_vec()),
    };
    let r = qcow2_write::create(&storage, &opts)
        .map_err(Error::from)
        .and_then(|_| {
            storage
                .file()
                .sync_all()
                .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r.map_err(|e| e.context(format!("create qcow2 volume {}", path.display())))
}

/// Run a snapshot operation on the qcow2 image `path`.
pub(crate) fn snapshot(path: &Path, op: Op) -> Result<()> {
    let storage = FileStorage::open_read_write(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut ed = SnapshotEditor::open(storage)?;
    match op {
        Op::Create(name) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            ed.create(name.as_bytes(), (now.as_secs() as u32, now.subsec_nanos()))?;
        }
        Op::Apply(name) => {
            ed.apply(&SnapshotRef::Name(name.as_bytes().to_vec()))?;
        }
        Op::Delete(name) => {
            ed.delete(&SnapshotRef::Name(name.as_bytes().to_vec()))?;
        }
    }
    let storage = ed.into_storage();
    storage
        .file()
        .sync_all()
        .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
}
