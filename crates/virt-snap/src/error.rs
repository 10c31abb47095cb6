//! The facade's error type: one kind to match on, whichever lower crate failed.

use std::fmt;

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image, pool, volume, snapshot or state directory does not exist.
    NotFound,
    /// Something of that name exists already.
    AlreadyExists,
    /// A VM or another operation holds the image or volume.
    InUse,
    /// An argument is not acceptable (a name, a size, a format, a missing option).
    InvalidInput,
    /// The image, pool or backend cannot do this.
    Unsupported,
    /// Not enough space.
    NoSpace,
    /// An image's or snapshot's metadata is damaged or unusable.
    Corrupt,
    /// An external tool failed (its argv and stderr are in the source error).
    ToolFailed,
    /// A system call or file operation failed.
    Io,
    /// The domain is not running (or its QEMU ended meanwhile).
    NotRunning,
    /// QEMU's monitor or the guest agent refused a command, did not answer in time, or went
    /// away (QEMU's or the agent's message is in the source error).
    Monitor,
    /// The lockspace (an etcd cluster) did not answer in time: nothing was done.
    Unavailable,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::InUse => "in use",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Unsupported => "not supported",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::ToolFailed => "tool failed",
            ErrorKind::Io => "I/O error",
            ErrorKind::NotRunning => "not running",
            ErrorKind::Monitor => "monitor error",
            ErrorKind::Unavailable => "lockspace unavailable",
        })
    }
}

/// An error of the facade: its kind, a message with context (which image, pool, volume), and
/// the lower crate's error as its source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` with message `msg` and no source.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// `msg`, caused by `lower`: the kind is `lower`'s, `lower` the source.
    pub(crate) fn caused_by<E>(msg: impl Into<String>, lower: E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let kind = Error::from_ref_kind(&lower);
        Error {
            kind,
            msg: msg.into(),
            source: Some(Box::new(lower)),
        }
    }

    fn from_ref_kind<E: std::error::Error + 'static>(e: &E) -> ErrorKind {
        Error::dyn_kind(e)
    }

    fn dyn_kind(any: &(dyn std::error::Error + 'static)) -> ErrorKind {
        if let Some(e) = any.downcast_ref::<storage_backends::Error>() {
            // storage-backends folds image errors into one kind: the image error says more.
            match std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<image_formats::Error>())
            {
                Some(img) if e.kind() == storage_backends::ErrorKind::Image => {
                    image_kind(img.kind())
                }
                // So does a lease's (an unreachable cluster lockspace).
                _ => match std::error::Error::source(e)
                    .and_then(|s| s.downcast_ref::<locking::Error>())
                {
                    Some(l) => lock_kind(l.kind()),
                    None => sb_kind(e.kind()),
                },
            }
        } else if let Some(e) = any.downcast_ref::<image_formats::Error>() {
            image_kind(e.kind())
        } else if let Some(e) = any.downcast_ref::<locking::Error>() {
            lock_kind(e.kind())
        } else if let Some(e) = any.downcast_ref::<snapshot_core::Error>() {
            match e.kind() {
                // What failed behind the capture traits (or made a capture fail) says more.
                snapshot_core::ErrorKind::Backend
                | snapshot_core::ErrorKind::CaptureFailed
                | snapshot_core::ErrorKind::RevertFailed
                | snapshot_core::ErrorKind::DeleteFailed
                | snapshot_core::ErrorKind::NotStarted => {
                    std::error::Error::source(e).map_or(ErrorKind::Io, Error::dyn_kind)
                }
                k => core_kind(k),
            }
        } else if any.downcast_ref::<qmp_proto::Error>().is_some() {
            ErrorKind::Monitor
        } else if let Some(e) = any.downcast_ref::<std::io::Error>() {
            io_kind(e)
        } else if let Some(e) = any.downcast_ref::<Error>() {
            e.kind
        } else {
            // A wrapper (a boxed error): what it wraps says.
            any.source().map_or(ErrorKind::Io, Error::dyn_kind)
        }
    }

    /// The same error, of another kind.
    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.kind = kind;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message (without the source's).
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

fn sb_kind(k: storage_backends::ErrorKind) -> ErrorKind {
    use storage_backends::ErrorKind as K;
    match k {
        K::InvalidInput => ErrorKind::InvalidInput,
        K::NotSupported => ErrorKind::Unsupported,
        K::InUse => ErrorKind::InUse,
        K::NotFound => ErrorKind::NotFound,
        K::AlreadyExists => ErrorKind::AlreadyExists,
        K::NoSpace => ErrorKind::NoSpace,
        K::ToolFailed => ErrorKind::ToolFailed,
        K::InvalidSnapshot | K::Image | K::Damaged => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}

fn image_kind(k: image_formats::ErrorKind) -> ErrorKind {
    use image_formats::ErrorKind as K;
    match k {
        K::NotFound | K::BackingMissing => ErrorKind::NotFound,
        K::Unsupported | K::ChainTooDeep => ErrorKind::Unsupported,
        K::LimitExceeded | K::ProbeRefused | K::InvalidInput => ErrorKind::InvalidInput,
        K::Truncated | K::Invalid | K::BackingLoop => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}

fn lock_kind(k: locking::ErrorKind) -> ErrorKind {
    use locking::ErrorKind as K;
    match k {
        K::Conflict | K::ImageInUse | K::NotHolder | K::LeaseLost => ErrorKind::InUse,
        K::InvalidResource => ErrorKind::InvalidInput,
        K::Unavailable => ErrorKind::Unavailable,
        _ => ErrorKind::Io,
    }
}

fn core_kind(k: snapshot_core::ErrorKind) -> ErrorKind {
    use snapshot_core::ErrorKind as K;
    match k {
        K::InvalidName | K::Xml | K::Cycle | K::InvalidOperation | K::InvalidPlan => {
            ErrorKind::InvalidInput
        }
        K::Timeout => ErrorKind::Monitor,
        K::Unsupported | K::UnsupportedVersion => ErrorKind::Unsupported,
        K::NotFound => ErrorKind::NotFound,
        K::AlreadyExists => ErrorKind::AlreadyExists,
        K::JournalCorrupt => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        std::io::ErrorKind::StorageFull => ErrorKind::NoSpace,
        std::io::ErrorKind::Unsupported => ErrorKind::Unsupported,
        _ => ErrorKind::Io,
    }
}

impl From<storage_backends::Error> for Error {
    fn from(e: storage_backends::Error) -> Error {
        Error::caused_by(e.to_string(), e)
    }
}

impl From<image_formats::Error> for Error {
    fn from(e: image_formats::Error) -> Error {
        Error::caused_by(e.to_string(), e)
    }
}

impl From<locking::Error> for Error {
    fn from(e: locking::Error) -> Error {
        Error::caused_by(e.to_string(), e)
    }
}

impl From<snapshot_core::Error> for Error {
    fn from(e: snapshot_core::Error) -> Error {
        Error::caused_by(e.to_string(), e)
    }
}

impl From<qmp_proto::Error> for Error {
    fn from(e: qmp_proto::Error) -> Error {
        Error::caused_by(e.to_string(), e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::caused_by(e.to_string(), e)
    }
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_from_each_lower_crate() {
        let sb = storage_backends::Error::new(storage_backends::ErrorKind::InUse, "busy");
        let e = Error::from(sb);
        assert_eq!(e.kind(), ErrorKind::InUse);
        assert_eq!(e.to_string(), "busy");
        assert!(std::error::Error::source(&e).is_some());
        let img = image_formats::Error::new(image_formats::ErrorKind::LimitExceeded, "too big");
        assert_eq!(Error::from(img).kind(), ErrorKind::InvalidInput);
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = Error::caused_by("x: cannot open", io);
        assert_eq!(
            (e.kind(), e.message()),
            (ErrorKind::NotFound, "x: cannot open")
        );
    }
}
