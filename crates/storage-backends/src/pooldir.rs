//! Directory-relative file operations that never follow a symbolic link.
//!
//! Every file operation of the dir and btrfs backends goes through a [`DirFd`]: the pool's
//! target directory is opened once per operation (`O_DIRECTORY|O_NOFOLLOW`), and each level
//! below it (`.snapshots`, `.snapshots/VOL`, a subvolume) is opened relative to its parent
//! with `O_NOFOLLOW` too. Files are opened, created, listed, renamed, linked and deleted
//! relative to those descriptors, so a symlink planted anywhere in a pool is reported
//! ([`ErrorKind::InvalidInput`], "... is a symbolic link ...") and never followed out of it,
//! whoever can write the pool directory.
//!
//! The one path the pool's definition names (its target) is resolved as given except for its
//! last component, which must not be a symlink either.

use crate::error::{Error, ErrorKind, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What a directory entry is (`lstat`: links are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, FIFO, socket).
    Other,
}

/// Facts of a directory entry, not following links.
#[derive(Debug, Clone, Copy)]
pub struct EntryStat {
    /// Its kind.
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Length in bytes.
    pub len: u64,
    /// Bytes allocated.
    pub allocated: u64,
    /// Inode number.
    pub ino: u64,
}

impl EntryStat {
    fn from(st: &rustix::fs::Stat) -> EntryStat {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => EntryKind::File,
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        EntryStat {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            len: st.st_size as u64,
            allocated: st.st_blocks as u64 * 512,
            ino: st.st_ino,
        }
    }
}

/// The error for a symlink met where a pool's file or directory should be.
pub fn symlink_error(path: &Path) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "{} is a symbolic link: virt-snap never follows symlinks inside a pool \
             (remove it or replace it with the real file)",
            path.display()
        ),
    )
}

/// A file name as text for messages and listings: UTF-8 names as they are, others refused
/// with their bytes escaped (so two different names never show as one).
pub fn utf8_name(dir: &Path, name: &OsStr) -> Result<String> {
    name.to_str().map(str::to_string).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}/{} has a name that is not UTF-8: virt-snap cannot name it (rename or \
                 remove it)",
                dir.display(),
                name.as_bytes().escape_ascii()
            ),
        )
    })
}

/// A file name for a listing's [`crate::RejectedEntry`]: as it is if UTF-8, else its bytes
/// escaped (`v\xff1`), as [`utf8_name`]'s error shows it.
pub fn shown_name(name: &OsStr) -> String {
    match name.to_str() {
        Some(n) => n.to_string(),
        None => name.as_bytes().escape_ascii().to_string(),
    }
}

fn io(what: impl Into<String>, e: rustix::io::Errno) -> Error {
    Error::io(what, std::io::Error::from(e))
}

/// An open directory of a pool (see the module documentation).
#[derive(Debug)]
pub struct DirFd {
    fd: OwnedFd,
    path: PathBuf,
}

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC);

impl DirFd {
    /// Open a pool's target directory; its last component must not be a symlink.
    pub fn open_root(path: &Path) -> Result<DirFd> {
        match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(DirFd {
                fd,
                path: path.to_path_buf(),
            }),
            Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                    Err(symlink_error(path))
                } else {
                    Err(io(format!("open {}", path.display()), e))
                }
            }
            Err(e) => Err(io(format!("open {}", path.display()), e)),
        }
    }

    /// The directory's path (for messages and for the tools that take paths).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of entry `name`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Facts of entry `name` (links not followed), `None` if it does not exist.
    pub fn stat(&self, name: &str) -> Result<Option<EntryStat>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(EntryStat::from(&st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io(format!("stat {}", self.join(name).display()), e)),
        }
    }

    /// Facts of this directory itself.
    pub fn stat_self(&self) -> Result<EntryStat> {
        rustix::fs::fstat(&self.fd)
            .map(|s| EntryStat::from(&s))
            .map_err(|e| io(format!("stat {}", self.path.display()), e))
    }

    fn refuse_symlink(&self, name: &str, e: rustix::io::Errno, what: &str) -> Error {
        if matches!(self.stat(name), Ok(Some(s)) if s.kind == EntryKind::Symlink) {
            symlink_error(&self.join(name))
        } else {
            io(format!("{what} {}", self.join(name).display()), e)
        }
    }

    /// Open the subdirectory `name`; `None` if it does not exist. A symlink is an error.
    pub fn open_dir(&self, name: &str) -> Result<Option<DirFd>> {
        match rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Some(DirFd {
                fd,
                path: self.join(name),
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.refuse_symlink(name, e, "open")),
        }
    }

    /// Open the subdirectory `name`, creating it with `mode` if absent.
    pub fn open_or_create_dir(&self, name: &str, mode: u32) -> Result<DirFd> {
        if let Some(d) = self.open_dir(name)? {
            return Ok(d);
        }
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io(format!("create {}", self.join(name).display()), e)),
        }
        let d = self.open_dir(name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("{} vanished after creation", self.join(name).display()),
            )
        })?;
        // The umask may have taken bits away, never added: set exactly `mode`.
        rustix::fs::fchmod(&d.fd, Mode::from_raw_mode(mode))
            .map_err(|e| io(format!("chmod {}", d.path.display()), e))?;
        Ok(d)
    }

    /// Open the regular file `name` (read-only or read-write). A symlink, or anything but a
    /// regular file, is an error.
    pub fn open_file(&self, name: &str, write: bool) -> Result<File> {
        let acc = if write { OFlags::RDWR } else { OFlags::RDONLY };
        let flags = acc | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty())
            .map_err(|e| self.refuse_symlink(name, e, "open"))?;
        let st = rustix::fs::fstat(&fd)
            .map_err(|e| io(format!("stat {}", self.join(name).display()), e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.join(name).display()),
            ));
        }
        // Back to blocking I/O (O_NONBLOCK only kept the open from hanging on a FIFO).
        let fl = rustix::fs::fcntl_getfl(&fd)
            .map_err(|e| io(format!("fcntl {}", self.join(name).display()), e))?;
        rustix::fs::fcntl_setfl(&fd, fl - OFlags::NONBLOCK)
            .map_err(|e| io(format!("fcntl {}", self.join(name).display()), e))?;
        Ok(File::from(fd))
    }

    /// Create the new regular file `name` (it must not exist, not even as a symlink) with
    /// exactly `mode`, open for reading and writing.
    pub fn create_file(&self, name: &str, mode: u32) -> Result<File> {
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))
            .map_err(|e| io(format!("create {}", self.join(name).display()), e))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
            .map_err(|e| io(format!("chmod {}", self.join(name).display()), e))?;
        Ok(File::from(fd))
    }

    /// Remove the file (or symlink: the link itself) `name`.
    pub fn unlink(&self, name: &str) -> Result<()> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
            .map_err(|e| io(format!("remove {}", self.join(name).display()), e))
    }

    /// Remove the empty directory `name`.
    pub fn rmdir(&self, name: &str) -> Result<()> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
            .map_err(|e| io(format!("remove {}", self.join(name).display()), e))
    }

    /// Remove `name` if it is an empty directory; anything else is left alone.
    pub fn rmdir_if_empty(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR);
    }

    /// Remove `name` and, for a directory, everything below it, never following a symlink
    /// (a symlink is removed itself). Returns the bytes allocated to what was removed.
    pub fn remove_tree(&self, name: &str) -> Result<u64> {
        let Some(st) = self.stat(name)? else {
            return Ok(0);
        };
        if st.kind != EntryKind::Dir {
            self.unlink(name)?;
            return Ok(st.allocated);
        }
        let mut freed = 0;
        if let Some(sub) = self.open_dir(name)? {
            for n in sub.entries()? {
                match n.to_str() {
                    Some(s) => freed += sub.remove_tree(s)?,
                    None => {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "{}/{}: not a UTF-8 name, left in place",
                                sub.path.display(),
                                n.as_bytes().escape_ascii()
                            ),
                        ))
                    }
                }
            }
        }
        self.rmdir(name)?;
        Ok(freed)
    }

    /// The names in this directory (without `.` and `..`), exactly as stored.
    pub fn entries(&self) -> Result<Vec<OsString>> {
        let mut d = rustix::fs::Dir::read_from(&self.fd)
            .map_err(|e| io(format!("read {}", self.path.display()), e))?;
        let mut out = Vec::new();
        while let Some(ent) = d.read() {
            let ent = ent.map_err(|e| io(format!("read {}", self.path.display()), e))?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(out)
    }

    /// Rename `from` (here) to `to` in `dir`, replacing `to` if it exists (never following
    /// a link: a symlink at `to` is itself replaced).
    pub fn rename(&self, from: &str, dir: &DirFd, to: &str) -> Result<()> {
        rustix::fs::renameat(&self.fd, from, &dir.fd, to).map_err(|e| {
            io(
                format!(
                    "rename {} to {}",
                    self.join(from).display(),
                    dir.join(to).display()
                ),
                e,
            )
        })
    }

    /// Exchange the names `a` (here) and `b` (in `dir`) atomically.
    pub fn exchange(&self, a: &str, dir: &DirFd, b: &str) -> Result<()> {
        rustix::fs::renameat_with(&self.fd, a, &dir.fd, b, RenameFlags::EXCHANGE).map_err(|e| {
            io(
                format!(
                    "exchange {} and {}",
                    self.join(a).display(),
                    dir.join(b).display()
                ),
                e,
            )
        })
    }

    /// Give the file `from` (here) the new name `to` (here) too; fails if `to` exists.
    pub fn link(&self, from: &str, to: &str) -> Result<()> {
        rustix::fs::linkat(&self.fd, from, &self.fd, to, AtFlags::empty())
            .map_err(|e| io(format!("create {}", self.join(to).display()), e))
    }

    /// Flush the directory (its entries) to disk.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::fsync(&self.fd).map_err(|e| io(format!("fsync {}", self.path.display()), e))
    }
}

/// Give `f` exactly `mode` and the owner `uid:gid`.
pub fn set_mode_owner(f: &File, path: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain fchown on an open fd.
    if unsafe { libc::fchown(std::os::fd::AsRawFd::as_raw_fd(f), uid, gid) } != 0 {
        return Err(Error::io(
            format!("chown {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    rustix::fs::fchmod(f, Mode::from_raw_mode(mode))
        .map_err(|e| io(format!("chmod {}", path.display()), e))
}

/// The mode of a read-only copy of a file with mode `mode`: no write bits, nothing for
/// others (the volume's mode or stricter, never world-readable).
pub fn snapshot_mode(mode: u32) -> u32 {
    mode & 0o440
}

/// Name of a temporary of an operation on one volume, in that volume's own snapshot
/// directory: a fixed short name, found again by [`is_temp`] (the volume's exclusive lease
/// makes any temporary found while holding it a dead operation's leftover).
pub const TEMP_PREFIX: &str = ".vs-";

/// Whether `name` (in a volume's snapshot directory) is one of our temporaries: ours
/// (`.vs-*`) or an older version's (`.SNAP.tmp-PID`).
pub fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
        || name.starts_with('.')
            && name
                .rsplit_once(".tmp-")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` in a pool's target directory is an older version's temporary of volume
/// `volume` (`.VOL.revert-PID`, `.VOL.revert`).
pub fn is_legacy_root_temp(name: &str, volume: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|r| r.strip_prefix(volume))
        .and_then(|r| r.strip_prefix(".revert"))
        .is_some_and(|pid| {
            pid.is_empty()
                || pid
                    .strip_prefix('-')
                    .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised() {
        assert!(is_temp(".vs-revert"));
        assert!(is_temp(".s1.tmp-123"));
        assert!(!is_temp("s1.tmp-123"));
        assert!(!is_temp(".s1.tmp-"));
        assert!(is_legacy_root_temp(".v1.revert-77", "v1"));
        assert!(is_legacy_root_temp(".v1.revert", "v1"));
        assert!(!is_legacy_root_temp(".v1.revert-77.revert-5", "v1"));
        assert!(!is_legacy_root_temp(".v10.revert", "v1"));
    }

    #[test]
    fn symlinks_are_refused_at_every_call() {
        let d = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("f"), b"outside").unwrap();
        std::os::unix::fs::symlink(out.path(), d.path().join("ld")).unwrap();
        std::os::unix::fs::symlink(out.path().join("f"), d.path().join("lf")).unwrap();
        let r = DirFd::open_root(d.path()).unwrap();
        assert!(r
            .open_dir("ld")
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        assert!(r
            .open_file("lf", false)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        assert!(r.create_file("lf", 0o600).is_err());
        assert_eq!(r.stat("lf").unwrap().unwrap().kind, EntryKind::Symlink);
        r.remove_tree("ld").unwrap();
        assert_eq!(std::fs::read(out.path().join("f")).unwrap(), b"outside");
        let e = DirFd::open_root(&d.path().join("lf")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}
