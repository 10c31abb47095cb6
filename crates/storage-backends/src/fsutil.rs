//! File system helpers: reflink clones (FICLONE) with a sparse-copy fallback, an atomic
//! exchange of two names (renameat2 RENAME_EXCHANGE), btrfs subvolume facts read with
//! `BTRFS_IOC_GET_SUBVOL_INFO` (no process), and free space.
//!
//! The FICLONE ioctl is called directly through libc (one `ioctl` call) rather than through
//! the reflink-copy crate: we need to know whether a clone or a copy was made and to do the
//! sparse copy ourselves (SEEK_DATA/SEEK_HOLE + copy_file_range), which the crate does not
//! expose.

use crate::error::{Error, ErrorKind, Result};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const FICLONE: libc::c_ulong = 0x4004_9409;
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
/// _IOR(0x94, 60, struct btrfs_ioctl_get_subvol_info_args) with the struct's 504 bytes.
const BTRFS_IOC_GET_SUBVOL_INFO: libc::c_ulong = 0x81f8_943c;
/// BTRFS_ROOT_SUBVOL_RDONLY: the root item flag the ioctl reports.
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 0;

/// How a file was duplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// A reflink: the blocks are shared until written (btrfs, XFS).
    Reflink,
    /// A sparse copy: holes stay holes, data is copied (copy_file_range).
    Copy,
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::new(ErrorKind::InvalidInput, format!("NUL in path {p:?}")))
}

/// Whether `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> Result<bool> {
    let c = cpath(path)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path; st is a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            format!("statfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// (capacity, allocation, available) in bytes of the filesystem holding `path`.
pub fn fs_space(path: &Path) -> Result<(u64, u64, u64)> {
    let c = cpath(path)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            format!("statvfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let f = st.f_frsize;
    let cap = st.f_blocks * f;
    let free = st.f_bfree * f;
    Ok((cap, cap.saturating_sub(free), st.f_bavail * f))
}

/// Duplicate `src` into a new file `dst` (which must not exist): a reflink clone when the
/// filesystem supports it, else a sparse copy (flushed with fsync). `dst` is removed again
/// on failure.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneMethod> {
    let s = File::open(src).map_err(|e| Error::io(format!("open {}", src.display()), e))?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| Error::io(format!("create {}", dst.display()), e))?;
    let r = clone_fd(&s, &d, dst);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

/// Duplicate the open file `s` into the open, empty file `d` (named `dst` in messages): a
/// reflink clone when the filesystem supports it, else a sparse copy flushed with fsync.
pub fn clone_fd(s: &File, d: &File, dst: &Path) -> Result<CloneMethod> {
    let r = (|| {
        match reflink_fd(s, d, dst) {
            Ok(()) => return Ok(CloneMethod::Reflink),
            Err(e) if e.kind() == ErrorKind::NotSupported => {}
            Err(e) => return Err(e),
        }
        sparse_copy(s, d).map_err(|e| Error::io(format!("copy to {}", dst.display()), e))?;
        Ok(CloneMethod::Copy)
    })();
    // A copy is flushed before the caller links or renames it into place (else a crash
    // could leave the name with missing data). A reflink is metadata only: btrfs and XFS
    // journal it in order with the link/rename that follows, so after a crash the name has
    // either the old or the complete new content; it is durable at the next commit.
    r.and_then(|m| {
        if m == CloneMethod::Copy {
            d.sync_all()
                .map_err(|e| Error::io(format!("fsync {}", dst.display()), e))?;
        }
        Ok(m)
    })
}

/// FICLONE `s` into `d` (named `dst`) and nothing else: [`ErrorKind::NotSupported`] when the
/// filesystem cannot (EOPNOTSUPP, EXDEV, ...), with nothing copied.
pub fn reflink_fd(s: &File, d: &File, dst: &Path) -> Result<()> {
    // SAFETY: both fds are open for the duration of the call.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP)
        | Some(libc::ENOTTY)
        | Some(libc::EXDEV)
        | Some(libc::EINVAL)
        | Some(libc::ENOSYS) => Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "{}: the filesystem cannot clone (reflink) the file: {err}",
                dst.display()
            ),
        )),
        _ => Err(Error::io(format!("FICLONE {}", dst.display()), err)),
    }
}

fn sparse_copy(s: &File, d: &File) -> std::io::Result<()> {
    let len = s.metadata()?.len();
    d.set_len(len)?;
    let (sfd, dfd) = (s.as_raw_fd(), d.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: plain lseek on an open fd.
        let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut off_in = data;
        let mut off_out = data;
        while off_in < end {
            let n = (end - off_in) as usize;
            // SAFETY: offsets are valid pointers to i64s; fds are open.
            let r = unsafe {
                libc::copy_file_range(sfd, &mut off_in, dfd, &mut off_out, n.min(1 << 30), 0)
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV)
                        | Some(libc::ENOSYS)
                        | Some(libc::EOPNOTSUPP)
                        | Some(libc::EINVAL)
                ) {
                    copy_range_rw(s, d, off_in as u64, end as u64)?;
                    break;
                }
                return Err(e);
            }
            if r == 0 {
                break;
            }
        }
        pos = end;
    }
    Ok(())
}

fn copy_range_rw(s: &File, d: &File, mut off: u64, end: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        let got = s.read_at(&mut buf[..n], off)?;
        if got == 0 {
            break;
        }
        d.write_all_at(&buf[..got], off)?;
        off += got as u64;
    }
    Ok(())
}

/// Exchange the names `a` and `b` atomically (both must exist, on one filesystem).
pub fn rename_exchange(a: &Path, b: &Path) -> Result<()> {
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("exchange {} and {}", a.display(), b.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Facts about a btrfs subvolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolInfo {
    /// The subvolume's UUID (lowercase, 8-4-4-4-12).
    pub uuid: String,
    /// Its parent's UUID (the subvolume it is a snapshot of), if any.
    pub parent_uuid: Option<String>,
    /// Creation time, seconds since the epoch.
    pub otime: i64,
    /// Read-only.
    pub readonly: bool,
}

fn fmt_uuid(b: &[u8]) -> Option<String> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Read a subvolume's UUID, parent UUID, creation time and read-only flag
/// (`BTRFS_IOC_GET_SUBVOL_INFO`, Linux 4.18+, works unprivileged). `path` must be the
/// subvolume's root directory.
pub fn subvol_info(path: &Path) -> Result<SubvolInfo> {
    let f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    subvol_info_fd(f.as_fd(), path)
}

/// [`subvol_info`] of the directory open as `f` (named `path` in messages).
pub fn subvol_info_fd(f: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<SubvolInfo> {
    // 504 bytes, 8-aligned.
    let mut buf = [0u64; 63];
    let mut rc = -1;
    for attempt in 0..2 {
        // SAFETY: buf is 504 writable bytes, the size encoded in the ioctl number.
        rc = unsafe {
            libc::ioctl(
                f.as_raw_fd(),
                BTRFS_IOC_GET_SUBVOL_INFO as _,
                buf.as_mut_ptr(),
            )
        };
        // Kernels return 1 on success here (a search result leaking out): only < 0 fails.
        if rc >= 0 {
            break;
        }
        let enoent = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
        if !enoent || attempt == 1 {
            break;
        }
        // The kernel looks the subvolume's back reference up in the committed root tree:
        // a subvolume created in the running transaction is found after a commit.
        // SAFETY: plain syncfs on an open fd.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
    if rc < 0 {
        return Err(Error::io(
            format!("{} is not a btrfs subvolume", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let b: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap());
    let uuid = fmt_uuid(&b[296..312]).unwrap_or_default();
    Ok(SubvolInfo {
        uuid,
        parent_uuid: fmt_uuid(&b[312..328]),
        otime: u64_at(392) as i64,
        readonly: u64_at(288) & BTRFS_SUBVOL_RDONLY != 0,
    })
}

/// _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2) with the struct's 4096 bytes.
const BTRFS_IOC_SNAP_CREATE_V2: libc::c_ulong = 0x5000_9417;
/// BTRFS_SUBVOL_RDONLY in `btrfs_ioctl_vol_args_v2.flags`.
const BTRFS_VOL_ARGS_RDONLY: u64 = 1 << 1;

/// Snapshot the subvolume `src` as the new subvolume `dst` (read-only if asked), with
/// `BTRFS_IOC_SNAP_CREATE_V2` on `dst`'s parent directory: what `btrfs subvolume snapshot
/// [-r] SRC DST` does when DST does not exist, without the process.
pub fn btrfs_snapshot(src: &Path, dst: &Path, readonly: bool) -> std::io::Result<()> {
    let name = dst
        .file_name()
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?
        .as_bytes();
    if name.len() > 4039 {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let pdir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(parent)?;
    let sdir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(src)?;
    // struct btrfs_ioctl_vol_args_v2: fd at 0, transid at 8, flags at 16, a 32-byte union,
    // name at 56 (4040 bytes, NUL-terminated).
    let mut args = [0u64; 512];
    args[0] = sdir.as_raw_fd() as i64 as u64;
    args[2] = if readonly { BTRFS_VOL_ARGS_RDONLY } else { 0 };
    let bytes = unsafe {
        // SAFETY: `args` is 4096 bytes owned here; viewing them as bytes is sound.
        std::slice::from_raw_parts_mut(args.as_mut_ptr().cast::<u8>(), 4096)
    };
    bytes[56..56 + name.len()].copy_from_slice(name);
    // SAFETY: args is the 4096-byte structure the ioctl number encodes; both fds are open.
    let rc = unsafe {
        libc::ioctl(
            pdir.as_raw_fd(),
            BTRFS_IOC_SNAP_CREATE_V2 as _,
            args.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` is the root of a btrfs subvolume (inode 256 on btrfs).
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == 256)
        && is_btrfs(path).unwrap_or(false)
}

/// Birth time of a file (statx), else its modification time, in seconds since the epoch.
pub fn created(path: &Path) -> Option<i64> {
    let m = std::fs::metadata(path).ok()?;
    let t = m.created().or_else(|_| m.modified()).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 20 << 20).unwrap();
        drop(f);
        let dst = d.path().join("b");
        let _m = clone_file(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Sparse: far less than 64 MiB allocated.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        // Never over an existing file.
        assert_eq!(
            clone_file(&src, &dst).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
    }
}
