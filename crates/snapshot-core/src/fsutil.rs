//! File helpers shared by the store and the journal: private modes, durable renames.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of every file this crate creates.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of every directory this crate creates.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents) with mode 0700.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io("cannot create directory", dir, e))
}

/// fsyncs a directory, making the entries created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot fsync directory", dir, e))
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory
/// (created 0600, exclusively), written, fsynced, renamed over `path`, then the directory
/// fsynced. A crash leaves either the old or the new content, plus at worst a temporary
/// file (named `.NAME.tmp-PID`) that readers ignore.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(|e| Error::io("cannot create", &tmp, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot rename into place", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir)
}

/// Removes `path` durably; a missing file is not an error.
pub(crate) fn remove_durable(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("cannot remove", path, e)),
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}
