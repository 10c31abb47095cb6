//! The locking crate's error type.

use std::path::PathBuf;

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file could not be opened or a lock call failed.
    Io,
}

/// An error from the locking crate, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}", path = path.display())]
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            op,
            path: path.into(),
            source,
        }
    }
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The file concerned.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}
