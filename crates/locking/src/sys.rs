//! Open file description (OFD) byte-range locks: the only system calls of this crate.
//!
//! OFD locks (`F_OFD_SETLK`, `F_OFD_GETLK`) belong to an open file description, not to a
//! process: two opens of the same file in one process conflict like two processes do, a lock
//! lives while any fd of that description is open and dies with the last one (close, exit,
//! kill -9). They conflict with classic POSIX `F_SETLK` locks (virtlockd's) as well.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The kind of a byte-range lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockType {
    Read,
    Write,
}

impl LockType {
    fn raw(self) -> libc::c_short {
        (match self {
            LockType::Read => libc::F_RDLCK,
            LockType::Write => libc::F_WRLCK,
        }) as libc::c_short
    }
}

fn flock(ty: LockType, offset: u64, len: u64) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value; we set the fields we use.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty.raw();
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl.l_pid = 0; // must be 0 for OFD commands
    fl
}

/// Try to take a lock on `len` bytes at `offset` without
/// waiting. `Ok(false)`: another open file description holds a conflicting lock.
pub(crate) fn set_lock(file: &File, ty: LockType, offset: u64, len: u64) -> io::Result<bool> {
    let fl = flock(ty, offset, len);
    loop {
        // SAFETY: F_OFD_SETLK reads the flock we pass, which lives across the call.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Release this open file description's lock on `len` bytes at `offset`.
pub(crate) fn unlock(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut fl = flock(LockType::Read, offset, len);
    fl.l_type = libc::F_UNLCK as libc::c_short;
    // SAFETY: F_OFD_SETLK reads the flock we pass, which lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What kind of file `file` is, if it is not one QEMU's image locks apply to (a regular file
/// or a block device): "a FIFO", "a socket", ...
pub(crate) fn not_an_image(file: &File) -> io::Result<Option<&'static str>> {
    // SAFETY: an all-zero stat is a valid value; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and st outlives the call.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFBLK => None,
        libc::S_IFIFO => Some("a FIFO"),
        libc::S_IFSOCK => Some("a socket"),
        libc::S_IFDIR => Some("a directory"),
        libc::S_IFCHR => Some("a character device"),
        _ => Some("not a file"),
    })
}

/// Would a lock of type `ty` on the byte at `offset` conflict with a lock another open file
/// description holds? (Locks of `file`'s own description never count.)
pub(crate) fn conflicts(file: &File, ty: LockType, offset: u64) -> io::Result<bool> {
    let mut fl = flock(ty, offset, 1);
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass, which lives across the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Is a lock (of any type) held by another open file description on the byte at `offset`?
pub(crate) fn byte_locked(file: &File, offset: u64) -> io::Result<bool> {
    conflicts(file, LockType::Write, offset)
}
