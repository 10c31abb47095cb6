//! The volume-file helpers the dir and btrfs pools share: probing a volume file's format,
//! size and backing, creating one for a spec, checking a spec, counting dead operations'
//! leftovers. A volume file is reached relative to a directory descriptor
//! ([`crate::pooldir`]).

use crate::error::{Error, ErrorKind, Result};
use crate::image;
use crate::model::*;
use crate::name::{check_name, NameOf};
use crate::pooldir::{DirFd, EntryKind};
use std::fs::File;
use std::path::Path;

/// Directory of a pool's volume snapshots (dir: raw snapshot files; btrfs: snapshot
/// subvolumes) under its target.
pub(crate) const SNAPSHOT_DIR: &str = ".snapshots";

/// Read the format, size and backing of the volume file open as `f` (named `path`).
pub(crate) fn probe(f: File, path: &Path) -> Result<(VolFormat, u64, Option<VolumeBacking>)> {
    let storage = image_formats::FileStorage::from_file(f);
    let info = image_formats::ImageInfo::read(&path.to_string_lossy(), &storage, None)?;
    match info.format() {
        image_formats::Format::Qcow2 => {
            let q = info.qcow2().expect("qcow2 details");
            // The backing format as recorded; none recorded is unknown, never raw.
            let backing = q.backing_file.as_ref().map(|b| VolumeBacking {
                path: String::from_utf8_lossy(b).into_owned(),
                format: match q.backing_format() {
                    Some(b"qcow2") => Some(VolFormat::Qcow2),
                    Some(b"raw") => Some(VolFormat::Raw),
                    _ => None,
                },
            });
            Ok((VolFormat::Qcow2, info.virtual_size(), backing))
        }
        image_formats::Format::Raw => Ok((VolFormat::Raw, info.file_length, None)),
        other => Err(Error::new(
            ErrorKind::NotSupported,
            format!("{}: {other} volumes are not supported", path.display()),
        )),
    }
}

/// Create the volume file `name` in `dir` for `spec` (mode 0600; `spec.capacity` already
/// resolved), removed again on failure.
pub(crate) fn create_file(dir: &DirFd, name: &str, spec: &VolumeSpec) -> Result<()> {
    let path = dir.join(name);
    let f = dir.create_file(name, 0o600)?;
    let r = match spec.format {
        VolFormat::Raw => f
            .set_len(spec.capacity)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("size {}", path.display()), e)),
        VolFormat::Qcow2 => image::create_in(f, &path, &image::volume_options(spec)),
    };
    if r.is_err() {
        let _ = dir.unlink(name);
    }
    r.and_then(|_| dir.sync())
}

/// Check a spec's format/backing combination.
pub(crate) fn check_spec(spec: &VolumeSpec) -> Result<()> {
    check_name(NameOf::Volume, &spec.name)?;
    if spec.backing.is_some() && spec.format != VolFormat::Qcow2 {
        return Err(Error::new(
            ErrorKind::NotSupported,
            "a backing volume needs a qcow2 volume (raw volumes cannot have one)",
        ));
    }
    if spec.backing.is_none() && spec.capacity == 0 {
        return Err(Error::new(ErrorKind::InvalidInput, "a volume needs a size"));
    }
    Ok(())
}

/// The error for a backing path that is not a volume of the pool.
pub(crate) fn not_a_pool_volume(pool: &str, path: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("backing volume {path:?} is not a volume of pool {pool:?} (a backing volume must be one of the pool's volumes)"),
    )
}

/// Leftovers (count, bytes) of dead operations in the pool whose target is `root`: hidden
/// entries of `.snapshots/*/` and an older version's `.VOL.revert-PID` files.
pub(crate) fn count_leftovers(root: &DirFd) -> Result<(u64, u64)> {
    let (mut n, mut bytes) = (0, 0);
    for e in root.entries()? {
        let Some(name) = e.to_str() else { continue };
        if name.starts_with('.') && name != SNAPSHOT_DIR && name.contains(".revert") {
            n += 1;
            bytes += tree_size(root, name);
        }
    }
    if let Some(snaps) = root.open_dir(SNAPSHOT_DIR)? {
        for v in snaps.entries()? {
            let Some(v) = v.to_str() else { continue };
            let Ok(Some(vd)) = snaps.open_dir(v) else {
                continue;
            };
            for e in vd.entries()? {
                if let Some(t) = e.to_str().filter(|t| t.starts_with('.')) {
                    n += 1;
                    bytes += tree_size(&vd, t);
                }
            }
        }
    }
    Ok((n, bytes))
}

/// Bytes allocated to `name` in `dir` and below it (links not followed).
pub(crate) fn tree_size(dir: &DirFd, name: &str) -> u64 {
    let Ok(Some(st)) = dir.stat(name) else {
        return 0;
    };
    if st.kind != EntryKind::Dir {
        return st.allocated;
    }
    let Ok(Some(sub)) = dir.open_dir(name) else {
        return 0;
    };
    sub.entries()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.to_str())
        .map(|e| tree_size(&sub, e))
        .sum()
}
