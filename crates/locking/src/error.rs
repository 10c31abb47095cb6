//! The locking crate's error type.

use crate::qemu::{LockOwner, Permission};
use crate::record::HolderRecord;
use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file could not be opened or a lock call failed.
    Io,
    /// A lease is held by someone else in a conflicting mode ([`Error::holders`] says who,
    /// when their records are readable).
    Conflict,
    /// Another process (a QEMU, qemu-img, ...) holds QEMU image locks that conflict with the
    /// access asked for ([`Error::permission`] says which).
    ImageInUse,
    /// The resource cannot be named: an empty path, a malformed UUID, a symlink loop.
    InvalidResource,
    /// Work on a domain's behalf ([`crate::Purpose::ForDomain`]) on a volume whose lease that
    /// domain's QEMU does not hold ([`Error::holders`] says who does).
    NotHolder,
    /// The lockspace cannot be reached in time (a cluster lockspace whose endpoints do not
    /// answer): nothing was taken. The message names the endpoints.
    Unavailable,
    /// A lease this process (or its domain) held is gone, or another holder has it now: its
    /// fencing token is no longer current, so nothing may be committed under it.
    LeaseLost,
}

/// An error from the locking crate: its kind, what was being done, the resource concerned and,
/// for conflicts, who holds it.
#[derive(Debug)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    op: String,
    resource: String,
    path: Option<PathBuf>,
    holders: Vec<HolderRecord>,
    owners: Vec<LockOwner>,
    permission: Option<(Permission, bool)>,
    waited: Option<std::time::Duration>,
    source: Option<std::io::Error>,
}

impl Inner {
    /// An error of `kind` about `resource` while doing `op`, nothing else known yet.
    fn bare(kind: ErrorKind, op: impl Into<String>, resource: impl Into<String>) -> Inner {
        Inner {
            kind,
            op: op.into(),
            resource: resource.into(),
            path: None,
            holders: Vec::new(),
            owners: Vec::new(),
            permission: None,
            waited: None,
            source: None,
        }
    }

    fn at(mut self, path: PathBuf) -> Inner {
        self.path = Some(path);
        self
    }
}

impl Error {
    pub(crate) fn io(
        op: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        let path = path.into();
        Error::from(
            Inner {
                source: Some(source),
                ..Inner::bare(ErrorKind::Io, op, path.display().to_string())
            }
            .at(path),
        )
    }

    pub(crate) fn invalid(resource: impl Into<String>, why: impl Into<String>) -> Self {
        Error::from(Inner::bare(ErrorKind::InvalidResource, why, resource))
    }

    /// A lease conflict on `resource` (its display name), held by `holders` (possibly none
    /// known). Public so that other [`crate::LeaseBackend`]s report conflicts the same way.
    pub fn conflict(resource: impl Into<String>, holders: Vec<HolderRecord>) -> Self {
        Error::from(Inner {
            holders,
            ..Inner::bare(ErrorKind::Conflict, "", resource)
        })
    }

    /// `domain` (QEMU pid `pid`) asked to act on `resource` whose lease it does not hold.
    pub(crate) fn not_holder(
        resource: impl Into<String>,
        domain: &str,
        pid: u32,
        holders: Vec<HolderRecord>,
    ) -> Self {
        Error::from(Inner {
            holders,
            ..Inner::bare(
                ErrorKind::NotHolder,
                format!("domain {domain:?} (pid {pid})"),
                resource,
            )
        })
    }

    /// A QEMU image lock conflict on `path`: `perm` is the permission whose byte is held by
    /// another process; `unshared` tells whether that process refuses to share it (byte
    /// 200+n) rather than holding it (byte 100+n).
    pub(crate) fn image_in_use(path: &Path, perm: Permission, unshared: bool) -> Self {
        Error::from(
            Inner {
                permission: Some((perm, unshared)),
                ..Inner::bare(ErrorKind::ImageInUse, "", path.display().to_string())
            }
            .at(path.to_path_buf()),
        )
    }

    /// The lockspace `lockspace` could not be reached while doing `op`; `why` says what
    /// failed (a timeout, a refused connection).
    pub(crate) fn unavailable(
        lockspace: impl Into<String>,
        op: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Error::from(Inner {
            source: Some(std::io::Error::other(why.into())),
            ..Inner::bare(ErrorKind::Unavailable, op, lockspace)
        })
    }

    /// The lease on `resource` with token `token` is no longer current; `holders` are who
    /// holds it now.
    pub(crate) fn lease_lost(
        resource: impl Into<String>,
        token: u64,
        holders: Vec<HolderRecord>,
    ) -> Self {
        Error::from(Inner {
            holders,
            ..Inner::bare(ErrorKind::LeaseLost, format!("token {token}"), resource)
        })
    }

    pub(crate) fn with_holders(mut self, holders: Vec<HolderRecord>) -> Self {
        self.inner.holders = holders;
        self
    }

    pub(crate) fn with_owners(mut self, owners: Vec<LockOwner>) -> Self {
        self.inner.owners = owners;
        self
    }

    pub(crate) fn with_waited(mut self, waited: std::time::Duration) -> Self {
        self.inner.waited = Some(waited);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// Is this a conflict with another holder (a lease or QEMU's image locks)? Waiting and
    /// retrying may help; for other kinds it will not.
    pub fn is_conflict(&self) -> bool {
        matches!(self.inner.kind, ErrorKind::Conflict | ErrorKind::ImageInUse)
    }

    /// The file concerned, if the error concerns a file.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The resource concerned, as it is shown to people (a path, or an LV / subvolume name).
    pub fn resource(&self) -> &str {
        &self.inner.resource
    }

    /// For [`ErrorKind::Conflict`] and [`ErrorKind::ImageInUse`]: the known virt-snap holders.
    pub fn holders(&self) -> &[HolderRecord] {
        &self.inner.holders
    }

    /// For [`ErrorKind::ImageInUse`]: the processes holding QEMU lock bytes on the image, as
    /// far as `/proc` shows them (a QEMU, with its `-name`).
    pub fn owners(&self) -> &[LockOwner] {
        &self.inner.owners
    }

    /// For [`ErrorKind::ImageInUse`]: the conflicting QEMU permission, and whether the other
    /// process refuses to share it (`true`) or holds it (`false`).
    pub fn permission(&self) -> Option<(Permission, bool)> {
        self.inner.permission
    }
}

fn write_holders(f: &mut fmt::Formatter<'_>, holders: &[HolderRecord]) -> fmt::Result {
    for (i, h) in holders.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{h}")?;
    }
    Ok(())
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.kind {
            ErrorKind::Io => {
                write!(f, "{} {}", self.inner.op, self.inner.resource)?;
                if let Some(s) = &self.inner.source {
                    write!(f, ": {s}")?;
                }
            }
            ErrorKind::InvalidResource => {
                write!(
                    f,
                    "invalid resource {:?}: {}",
                    self.inner.resource, self.inner.op
                )?;
            }
            // A domain's operation lock (Resource::DomainOps shows as `domain "NAME"`).
            ErrorKind::Conflict if self.inner.resource.starts_with("domain \"") => {
                write!(f, "{} is busy: ", self.inner.resource)?;
                if self.inner.holders.is_empty() {
                    f.write_str("another operation holds its operation lock")?;
                } else {
                    write_holders(f, &self.inner.holders)?;
                }
            }
            ErrorKind::Conflict => {
                write!(f, "volume {} in use by ", self.inner.resource)?;
                if self.inner.holders.is_empty() {
                    f.write_str(
                        "another holder (no virt-snap record: another tool, or virtlockd)",
                    )?;
                } else {
                    write_holders(f, &self.inner.holders)?;
                }
            }
            ErrorKind::NotHolder => {
                write!(
                    f,
                    "volume {} is not held by {}: ",
                    self.inner.resource, self.inner.op
                )?;
                if self.inner.holders.is_empty() {
                    f.write_str("no virt-snap holder")?;
                } else {
                    f.write_str("held by ")?;
                    write_holders(f, &self.inner.holders)?;
                }
            }
            ErrorKind::Unavailable => {
                write!(f, "{} unreachable: {}", self.inner.resource, self.inner.op)?;
                if let Some(s) = &self.inner.source {
                    write!(f, ": {s}")?;
                }
            }
            ErrorKind::LeaseLost => {
                write!(
                    f,
                    "lease on volume {} lost ({} is no longer current), so nothing is committed",
                    self.inner.resource, self.inner.op
                )?;
                if !self.inner.holders.is_empty() {
                    f.write_str(": now held by ")?;
                    write_holders(f, &self.inner.holders)?;
                }
            }
            ErrorKind::ImageInUse => {
                let (perm, unshared) = self.inner.permission.unwrap_or((Permission::Write, false));
                write!(f, "image {} in use by ", self.inner.resource)?;
                if self.inner.owners.is_empty() {
                    f.write_str("another process")?;
                }
                for (i, o) in self.inner.owners.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{o}")?;
                }
                f.write_str(": ")?;
                if unshared {
                    write!(f, "it does not share the \"{}\" permission", perm.name())?;
                } else {
                    write!(f, "it holds the \"{}\" permission", perm.name())?;
                }
                f.write_str(" (QEMU image lock")?;
                if !self.inner.holders.is_empty() {
                    f.write_str("; lease held by ")?;
                    write_holders(f, &self.inner.holders)?;
                }
                f.write_str(")")?;
            }
        }
        if let Some(w) = self.inner.waited {
            write!(f, " (waited {:.1} s)", w.as_secs_f64())?;
        }
        Ok(())
    }
}

impl From<Inner> for Error {
    fn from(inner: Inner) -> Self {
        Error {
            inner: Box::new(inner),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
