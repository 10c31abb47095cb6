//! qcow2 volumes, natively through image-formats: creating images and overlays
//! (`qcow2_write::create`, byte-identical to qemu-img) and internal snapshots
//! (`qcow2_write::SnapshotEditor`: create, apply, delete in QEMU's write order). No process
//! is spawned; the caller holds the volume's lease and QEMU's image locks.

use crate::error::{Error, Result};
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

/// Write a new qcow2 image for `spec` into the new, empty file `f` (named `path` in
/// messages) and flush it. The caller creates the file (mode 0600, relative to the pool's
/// directory), resolves the backing volume and its size (`spec.capacity`), and removes the
/// file on failure.
pub(crate) fn create(f: std::fs::File, path: &Path, spec: &VolumeSpec) -> Result<()> {
    let size = spec.capacity;
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
    r.map_err(|e| e.context(format!("create qcow2 volume {}", path.display())))
}

/// Run a snapshot operation on the qcow2 image open (read-write) as `f`, named `path`.
pub(crate) fn snapshot(f: std::fs::File, path: &Path, op: Op) -> Result<()> {
    let storage = FileStorage::from_file(f);
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
