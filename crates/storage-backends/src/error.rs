//! The storage-backends error type.

use std::fmt;

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// A pool, volume or snapshot name (or another argument) is not acceptable.
    InvalidInput,
    /// The backend cannot do this (e.g. a thin snapshot on a pool without a thin pool).
    NotSupported,
    /// A VM or another operation holds the volume.
    InUse,
    /// The pool, volume or snapshot does not exist.
    NotFound,
    /// Something of that name exists already.
    AlreadyExists,
    /// Not enough space in the pool.
    NoSpace,
    /// An external tool failed; the error carries its argv and stderr.
    ToolFailed,
    /// A snapshot is unusable (an invalid, full LVM COW snapshot).
    InvalidSnapshot,
    /// A system call or file operation failed.
    Io,
    /// An image's metadata could not be read (image-formats).
    Image,
    /// A stored definition (a pool's `pools/NAME.json`) cannot be read back: not JSON, not a
    /// pool definition, not a regular file.
    Damaged,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotSupported => "not supported",
            ErrorKind::InUse => "in use",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::NoSpace => "no space",
            ErrorKind::ToolFailed => "tool failed",
            ErrorKind::InvalidSnapshot => "invalid snapshot",
            ErrorKind::Io => "I/O error",
            ErrorKind::Image => "image error",
            ErrorKind::Damaged => "damaged definition",
        })
    }
}

/// An error from a storage backend: its kind, a message with context, the command and its
/// stderr when a tool failed, and what a failed multi-step operation could not undo.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    command: Option<Vec<String>>,
    stderr: Option<String>,
    not_undone: Vec<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` with message `msg`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            command: None,
            stderr: None,
            not_undone: Vec::new(),
            source: None,
        }
    }
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Error {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            std::io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            std::io::ErrorKind::Unsupported => ErrorKind::NotSupported,
            std::io::ErrorKind::ResourceBusy => ErrorKind::InUse,
            _ => ErrorKind::Io,
        };
        Error::new(kind, format!("{}: {e}", what.into())).with_source(e)
    }
    /// A tool failure: `argv` exited with `status` and wrote `stderr`. The kind is derived
    /// from the stderr text (no space, not found, in use, exists), else `ToolFailed`.
    ///
    /// The one place a kind is read from a tool's text: LVM exits 5 and btrfs-progs 1 for
    /// every failure, so neither the exit code nor anything typed can tell them apart. The
    /// backends check names and existence themselves before running a tool (so the usual
    /// "exists"/"not found" cases never reach here), and the built-in btrfs snapshot fails
    /// with its system call's error instead.
    pub fn tool(argv: &[String], status: Option<i32>, stderr: &str) -> Error {
        let low = stderr.to_ascii_lowercase();
        let kind = if low.contains("insufficient free space")
            || low.contains("no space left")
            || low.contains("insufficient suitable")
        {
            ErrorKind::NoSpace
        } else if low.contains("failed to get \"write\" lock")
            || low.contains("is another process using the image")
            || low.contains("logical volume in use")
            || low.contains("device or resource busy")
            || low.contains("contains a filesystem in use")
        {
            ErrorKind::InUse
        } else if low.contains("failed to find logical volume")
            || low.contains("not found")
            || low.contains("no such file or directory")
            || low.contains("can't find snapshot")
        {
            ErrorKind::NotFound
        } else if low.contains("already exists") || low.contains("file exists") {
            ErrorKind::AlreadyExists
        } else {
            ErrorKind::ToolFailed
        };
        let code = match status {
            Some(c) => format!("exit {c}"),
            None => "killed by a signal".into(),
        };
        let mut e = Error::new(
            kind,
            format!("`{}` failed ({code}): {}", argv.join(" "), stderr.trim()),
        );
        e.command = Some(argv.to_vec());
        e.stderr = Some(stderr.to_string());
        e
    }
    /// Record the command that failed (a runner's built-in command).
    pub(crate) fn with_command(mut self, argv: Vec<String>) -> Error {
        self.command = Some(argv);
        self
    }
    /// Attach a source error.
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(e));
        self
    }
    /// Prefix the message with context (`"{ctx}: {msg}"`).
    pub fn context(mut self, ctx: impl fmt::Display) -> Error {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }
    /// Record undo steps that failed (a failed multi-step operation).
    pub fn with_not_undone(mut self, steps: Vec<String>) -> Error {
        self.not_undone.extend(steps);
        self
    }
    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message without the not-undone list.
    pub fn message(&self) -> &str {
        &self.msg
    }
    /// The argv of the tool that failed, if a tool failed.
    pub fn command(&self) -> Option<&[String]> {
        self.command.as_deref()
    }
    /// The failed tool's stderr.
    pub fn stderr(&self) -> Option<&str> {
        self.stderr.as_deref()
    }
    /// Undo steps of a failed multi-step operation that themselves failed: what is left
    /// changed, for the operator to fix.
    pub fn not_undone(&self) -> &[String] {
        &self.not_undone
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)?;
        if !self.not_undone.is_empty() {
            write!(f, "; could not undo: {}", self.not_undone.join("; "))?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<locking::Error> for Error {
    fn from(e: locking::Error) -> Error {
        let kind = match e.kind() {
            locking::ErrorKind::Conflict
            | locking::ErrorKind::ImageInUse
            | locking::ErrorKind::NotHolder
            | locking::ErrorKind::LeaseLost => ErrorKind::InUse,
            locking::ErrorKind::InvalidResource => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        };
        let msg = match e.kind() {
            // "volume X in use by domain "vm1" (pid ..)" / "volume X is not held by ..." already.
            locking::ErrorKind::Conflict
            | locking::ErrorKind::NotHolder
            | locking::ErrorKind::LeaseLost
            | locking::ErrorKind::Unavailable => e.to_string(),
            // "image X in use by a QEMU (pid ..): it does not share ..."
            locking::ErrorKind::ImageInUse => format!("volume in use by a process: {e}"),
            _ => format!("lease: {e}"),
        };
        Error::new(kind, msg).with_source(e)
    }
}

impl From<image_formats::Error> for Error {
    fn from(e: image_formats::Error) -> Error {
        let kind = match e.kind() {
            image_formats::ErrorKind::NotFound | image_formats::ErrorKind::BackingMissing => {
                ErrorKind::NotFound
            }
            image_formats::ErrorKind::Unsupported => ErrorKind::NotSupported,
            image_formats::ErrorKind::Io => ErrorKind::Io,
            // Not a regular file or block device (a FIFO, a directory, ...), a symlink loop.
            image_formats::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ => ErrorKind::Image,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
