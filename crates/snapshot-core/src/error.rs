//! The crate's one error type: a [`ErrorKind`] to match on, what was being done, the object
//! concerned (a snapshot name, a file) and the underlying cause.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A snapshot or domain name breaks the naming rules (see [`crate::SnapshotName`]).
    InvalidName,
    /// Domainsnapshot or domain XML that is not well-formed, or breaks the schema.
    Xml,
    /// A domain definition that is valid libvirt XML but asks for something virt-snap cannot
    /// run (see [`crate::domain::DomainDef::check_runnable`]).
    Unsupported,
    /// A tree operation names a snapshot that does not exist.
    NotFound,
    /// A snapshot with that name already exists.
    AlreadyExists,
    /// A change would make a snapshot its own ancestor.
    Cycle,
    /// A file or directory operation failed.
    Io,
    /// A journal record is torn or damaged somewhere other than the journal's tail.
    JournalCorrupt,
    /// A journal record was written by a newer, unknown format version.
    UnsupportedVersion,
    /// A journal call that does not fit the operation's state (unknown operation, unknown
    /// step, an operation already finished).
    InvalidOperation,
    /// A snapshot request that cannot be planned against the domain (internal on a raw disk,
    /// an unknown disk, ...): nothing was done.
    InvalidPlan,
    /// What the facade's hypervisor or storage layer reported (through the capture traits).
    Backend,
    /// A bounded step (guest freeze, the paused window) ran out of its budget.
    Timeout,
    /// A capture failed; every step was undone, or [`Error::undo_failures`] says what was
    /// not. The original failure is the [`std::error::Error::source`].
    CaptureFailed,
    /// A revert failed before its commit point; every step was undone, or
    /// [`Error::undo_failures`] says what was not. The original failure is the
    /// [`std::error::Error::source`].
    RevertFailed,
    /// A delete failed: before its commit point every step was undone (or
    /// [`Error::undo_failures`] says what was not); after it the error says what is left.
    /// The original failure is the [`std::error::Error::source`].
    DeleteFailed,
    /// What the facade reports for a step that was refused before it changed anything (a
    /// commit QEMU would not start, a helper that is not installed): the runner may treat the
    /// step as not done.
    NotStarted,
}

/// An error from snapshot-core.
#[derive(Debug)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    what: String,
    object: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    undo_failures: Vec<String>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, object: impl Into<String>, what: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                what: what.into(),
                object: object.into(),
                path: None,
                offset: None,
                source: None,
                undo_failures: Vec::new(),
            }),
        }
    }

    pub(crate) fn io(what: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, path.display().to_string(), what)
            .with_path(path)
            .with_source(source)
    }

    pub(crate) fn xml(what: impl Into<String>, offset: Option<u64>) -> Self {
        let mut e = Error::new(ErrorKind::Xml, "domainsnapshot XML", what);
        e.inner.offset = offset;
        e
    }

    /// Names the document an XML error is about (`domain XML`): XML errors say
    /// `domainsnapshot XML` until told otherwise.
    pub(crate) fn in_document(mut self, object: &str) -> Self {
        if self.inner.kind == ErrorKind::Xml {
            self.inner.object = object.to_string();
        }
        self
    }

    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        self.inner.path = Some(path.to_path_buf());
        self
    }

    pub(crate) fn with_offset(mut self, offset: u64) -> Self {
        self.inner.offset = Some(offset);
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.inner.source = Some(Box::new(source));
        self
    }

    /// An error reported by the code behind the capture traits (QMP, storage backends): the
    /// facade's implementations build theirs with this.
    pub fn backend(object: impl Into<String>, what: impl Into<String>) -> Self {
        Error::new(ErrorKind::Backend, object, what)
    }

    /// A backend error for a step that changed nothing ([`ErrorKind::NotStarted`]).
    pub fn not_started(object: impl Into<String>, what: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotStarted, object, what)
    }

    /// Attaches the underlying cause.
    pub fn caused_by(self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.with_source(source)
    }

    pub(crate) fn with_undo_failures(mut self, failures: Vec<String>) -> Self {
        self.inner.undo_failures = failures;
        self
    }

    /// For a [`ErrorKind::CaptureFailed`] error: what could not be undone, one line each
    /// (empty: everything was undone).
    pub fn undo_failures(&self) -> &[String] {
        &self.inner.undo_failures
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The file concerned, if any.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The byte offset concerned (in an XML document or a journal file), if any.
    pub fn offset(&self) -> Option<u64> {
        self.inner.offset
    }

    /// The object concerned as shown to people: a snapshot name, a path, "domainsnapshot XML".
    pub fn object(&self) -> &str {
        &self.inner.object
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        match i.kind {
            ErrorKind::Io => write!(f, "{} {}", i.what, i.object)?,
            _ => {
                write!(f, "{}", i.object)?;
                if let Some(p) = &i.path {
                    if p.display().to_string() != i.object {
                        write!(f, " ({})", p.display())?;
                    }
                }
                if let Some(o) = i.offset {
                    write!(f, " at byte {o}")?;
                }
                write!(f, ": {}", i.what)?;
            }
        }
        if let Some(s) = &i.source {
            // A backend error whose text is its source's (the facade's lower errors, kept
            // as the source for their kind) says it once.
            let s = s.to_string();
            if s != i.what {
                write!(f, ": {s}")?;
            }
        }
        for u in &i.undo_failures {
            write!(f, "; not undone: {u}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_error_made_from_its_source_says_it_once() {
        let lower = std::io::Error::other("/x/o.qcow2: cannot open");
        let e = Error::backend("/x/o.qcow2", lower.to_string()).caused_by(lower);
        assert_eq!(e.to_string(), "/x/o.qcow2: /x/o.qcow2: cannot open");
        let e = Error::backend("vda", "refused").caused_by(std::io::Error::other("why"));
        assert_eq!(e.to_string(), "vda: refused: why");
    }
}
