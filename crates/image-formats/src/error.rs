//! The crate's error type: a [`ErrorKind`] callers match on, plus context (path, offset).

use std::fmt;
use std::path::PathBuf;

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The underlying storage failed (open, read, write, stat).
    Io,
    /// The file ends before a structure it claims to contain.
    Truncated,
    /// A field holds a value the format does not allow.
    Invalid,
    /// A valid value this crate (or QEMU) does not support, e.g. qcow2 version 4.
    Unsupported,
    /// A count or size is above QEMU's limits (snapshots, table sizes, extra data).
    LimitExceeded,
    /// A backing file of the chain does not exist or cannot be opened.
    BackingMissing,
    /// The backing chain refers back to an image already in it.
    BackingLoop,
    /// The backing chain is deeper than the configured maximum.
    ChainTooDeep,
    /// A backing file's format is not recorded and probing was not allowed.
    ProbeRefused,
    /// The named snapshot (or other object) does not exist.
    NotFound,
    /// The path is not an image: not a regular file or block device (a FIFO, a socket, a
    /// directory, a character device), or a symlink loop.
    InvalidInput,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Truncated => "truncated image",
            ErrorKind::Invalid => "invalid image",
            ErrorKind::Unsupported => "unsupported image",
            ErrorKind::LimitExceeded => "image exceeds limits",
            ErrorKind::BackingMissing => "backing file missing",
            ErrorKind::BackingLoop => "backing chain loop",
            ErrorKind::ChainTooDeep => "backing chain too deep",
            ErrorKind::ProbeRefused => "refusing to probe backing format",
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "not a regular file or block device",
        })
    }
}

/// An error of this crate: kind, message, and where (path, byte offset) it happened.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    #[source]
    source: Option<std::io::Error>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        f.write_str(&self.msg)?;
        if let Some(o) = self.offset {
            write!(f, " (at offset {o:#x})")?;
        }
        Ok(())
    }
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            path: None,
            offset: None,
            source: None,
        }
    }
    /// An [`ErrorKind::Invalid`] error at `offset`.
    pub(crate) fn invalid(msg: impl Into<String>, offset: u64) -> Self {
        Error::new(ErrorKind::Invalid, msg).at(offset)
    }
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let kind = if source.kind() == std::io::ErrorKind::UnexpectedEof {
            ErrorKind::Truncated
        } else {
            ErrorKind::Io
        };
        Error {
            kind,
            msg: format!("{}: {source}", what.into()),
            path: None,
            offset: None,
            source: Some(source),
        }
    }
    /// The error of opening the image at `path` failing with `source`: `BackingMissing` for a
    /// missing file, `InvalidInput` for what is not a regular file or block device (see
    /// [`crate::open_image_file`]), else `Io`.
    pub fn open_failed(path: &std::path::Path, source: std::io::Error) -> Self {
        let (kind, msg) = match source.kind() {
            std::io::ErrorKind::NotFound => {
                (ErrorKind::BackingMissing, format!("cannot open: {source}"))
            }
            std::io::ErrorKind::InvalidInput => (ErrorKind::InvalidInput, source.to_string()),
            _ => (ErrorKind::Io, format!("cannot open: {source}")),
        };
        Error {
            kind,
            msg,
            path: Some(path.to_path_buf()),
            offset: None,
            source: Some(source),
        }
    }
    /// Attach the byte offset the error refers to (kept if already set).
    pub fn at(mut self, offset: u64) -> Self {
        self.offset.get_or_insert(offset);
        self
    }
    /// Attach the path of the image (kept if already set).
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.into());
        }
        self
    }
    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The image the error refers to, if known.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
    /// The byte offset in the image the error refers to, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
    /// The message without path and offset.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
