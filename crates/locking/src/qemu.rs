//! QEMU's image locking protocol (block/file-posix.c), read from outside.
//!
//! A process that opens an image through QEMU's file driver takes one-byte OFD read locks:
//! byte `100 + n` means "I hold permission n", byte `200 + n` means "I do not let others have
//! permission n", for n in: 0 consistent read, 1 write, 2 write-unchanged, 3 resize,
//! 4 graph-mod (QEMU <= 6.1 only). A writable image in a running QEMU shows 100, 101, 103, 201
//! and 203; a read-only backing file 100, 201 and 203.
//!
//! [`probe`] asks the kernel, with `F_OFD_GETLK` for a write lock on each byte, whether any
//! other open file description holds a lock there. It takes no lock and needs only read access.

use crate::Error;
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::path::Path;

/// One of QEMU's block permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// BLK_PERM_CONSISTENT_READ
    ConsistentRead,
    /// BLK_PERM_WRITE
    Write,
    /// BLK_PERM_WRITE_UNCHANGED
    WriteUnchanged,
    /// BLK_PERM_RESIZE
    Resize,
    /// BLK_PERM_GRAPH_MOD (QEMU 6.1 and older)
    GraphMod,
}

impl Permission {
    /// All permissions in QEMU's bit order.
    pub const ALL: [Permission; 5] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
        Permission::GraphMod,
    ];
    /// The offset of the lock byte that says "a holder has this permission".
    pub fn held_byte(self) -> u64 {
        100 + self as u64
    }
    /// The offset of the lock byte that says "a holder does not share this permission".
    pub fn unshared_byte(self) -> u64 {
        200 + self as u64
    }
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
            Permission::GraphMod => "change children",
        }
    }
}

/// Which QEMU permission bytes other processes hold on an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LockState {
    /// Permissions some holder has (bytes 100..).
    pub held: Vec<Permission>,
    /// Permissions some holder refuses to share (bytes 200..).
    pub unshared: Vec<Permission>,
}

impl LockState {
    /// Is anyone holding any QEMU lock on the image?
    pub fn in_use(&self) -> bool {
        !self.held.is_empty() || !self.unshared.is_empty()
    }
    /// The raw byte offsets that are held, ascending (100.., then 200..).
    pub fn bytes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.held.iter().map(|p| p.held_byte()).collect();
        v.extend(self.unshared.iter().map(|p| p.unshared_byte()));
        v
    }
}

/// Is a lock held by another open file description on byte `offset` of `file`?
pub(crate) fn byte_locked(file: &std::fs::File, offset: u64) -> std::io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value; we set the fields we use.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0; // must be 0 for OFD commands
                  // SAFETY: F_OFD_GETLK reads and writes the flock we pass, which lives across the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Probe which of QEMU's lock bytes are held on the image at `path`.
pub fn probe(path: &Path) -> Result<LockState, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut state = LockState::default();
    for p in Permission::ALL {
        if byte_locked(&file, p.held_byte()).map_err(|e| Error::io("probe lock", path, e))? {
            state.held.push(p);
        }
        if byte_locked(&file, p.unshared_byte()).map_err(|e| Error::io("probe lock", path, e))? {
            state.unshared.push(p);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_offsets_follow_qemu() {
        assert_eq!(Permission::Write.held_byte(), 101);
        assert_eq!(Permission::Resize.unshared_byte(), 203);
        let s = LockState {
            held: vec![Permission::ConsistentRead],
            unshared: vec![Permission::Write],
        };
        assert_eq!(s.bytes(), vec![100, 201]);
        assert!(s.in_use());
    }

    #[test]
    fn an_unused_file_shows_no_locks() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let s = probe(f.path()).unwrap();
        assert!(!s.in_use());
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let e = probe(Path::new("/nonexistent/x.qcow2")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Io);
        assert!(e.to_string().contains("/nonexistent/x.qcow2"));
    }
}
