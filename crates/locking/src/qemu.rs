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

pub use crate::owners::{lock_owners, LockOwner};
use crate::sys::{byte_locked, set_lock, LockType};
use crate::Error;
use serde::Serialize;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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

/// Probe which of QEMU's lock bytes are held on the image at `path`.
pub fn probe(path: &Path) -> Result<LockState, Error> {
    let file = open_image(path)?;
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

/// The permissions QEMU knows today (QEMU 6.2 and later): consistent read, write,
/// write-unchanged, resize. Locks are taken and tested on these; graph-mod (104/204) is only
/// reported by [`probe`].
const CURRENT: [Permission; 4] = [
    Permission::ConsistentRead,
    Permission::Write,
    Permission::WriteUnchanged,
    Permission::Resize,
];

fn bit(p: Permission) -> u8 {
    1 << (p as u8)
}

/// What a holder of QEMU's image locks takes: the permissions it holds and those it lets
/// others have, as QEMU's block layer computes them for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    held: u8,
    shared: u8,
}

impl Access {
    /// Like QEMU's writable disk, sharing only consistent read: holds consistent read, write
    /// and resize (bytes 100, 101, 103) and refuses to share write, write-unchanged and resize
    /// (201, 202, 203). QEMU then refuses to open the image for writing ("Failed to get
    /// \"write\" lock") and for reading without force-share ("Failed to get shared \"write\"
    /// lock"); `qemu-img info -U` still works. The access of offline volume operations.
    pub const WRITER: Access = Access {
        held: 0b1011,
        shared: 0b0001,
    };
    /// [`Access::WRITER`] that also refuses to share consistent read (byte 200): even
    /// force-share readers that read data are refused. QEMU's message becomes "Failed to get
    /// \"consistent read\" lock".
    pub const EXCLUSIVE: Access = Access {
        held: 0b1011,
        shared: 0,
    };
    /// Like QEMU's read-only disk: holds consistent read (100), refuses to share write (201).
    pub const READER: Access = Access {
        held: 0b0001,
        shared: 0b1101,
    };

    /// An access holding `held` and sharing `shared`.
    pub fn new(held: &[Permission], shared: &[Permission]) -> Access {
        let set = |ps: &[Permission]| {
            ps.iter()
                .filter(|p| CURRENT.contains(p))
                .fold(0u8, |a, &p| a | bit(p))
        };
        Access {
            held: set(held),
            shared: set(shared),
        }
    }
    /// The permissions held.
    pub fn held(&self) -> Vec<Permission> {
        CURRENT
            .into_iter()
            .filter(|&p| self.held & bit(p) != 0)
            .collect()
    }
    /// The permissions others may have.
    pub fn shared(&self) -> Vec<Permission> {
        CURRENT
            .into_iter()
            .filter(|&p| self.shared & bit(p) != 0)
            .collect()
    }
    /// The permissions others may not have.
    pub fn unshared(&self) -> Vec<Permission> {
        CURRENT
            .into_iter()
            .filter(|&p| self.shared & bit(p) == 0)
            .collect()
    }
    /// The bytes this access locks, ascending.
    pub fn bytes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.held().iter().map(|p| p.held_byte()).collect();
        v.extend(self.unshared().iter().map(|p| p.unshared_byte()));
        v
    }
}

/// Open the image at `path` for its locks: only a regular file or a block device. The type
/// is checked on an `O_PATH` descriptor first (no side effect on a character device, no wait
/// on a FIFO), then again on the descriptor opened (`O_NONBLOCK`: a FIFO swapped in meanwhile
/// cannot hang us either; locks and `fstat` do not care about the flag).
fn open_image(path: &Path) -> Result<File, Error> {
    let open = |flags: libc::c_int| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | flags)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    Error::invalid(
                        path.display().to_string(),
                        "symlink loop (too many levels of symbolic links)",
                    )
                } else {
                    Error::io("open image", path, e)
                }
            })
    };
    let check = |file: &File| match crate::sys::not_an_image(file) {
        Ok(None) => Ok(()),
        Ok(Some(what)) => Err(Error::invalid(
            path.display().to_string(),
            format!("is {what}, not a regular file or block device"),
        )),
        Err(e) => Err(Error::io("stat image", path, e)),
    };
    check(&open(libc::O_PATH)?)?;
    let file = open(libc::O_NONBLOCK | libc::O_NOCTTY)?;
    check(&file)?;
    Ok(file)
}

/// Test, as QEMU does after taking its own locks, whether another open file description's
/// locks conflict with `access`: for each permission held, does anyone refuse to share it;
/// for each permission not shared, does anyone hold it.
fn test_conflicts(file: &File, path: &Path, access: Access) -> Result<(), Error> {
    let t = |off: u64| {
        crate::sys::conflicts(file, LockType::Write, off)
            .map_err(|e| Error::io("test image lock", path, e))
    };
    for p in access.held() {
        if t(p.unshared_byte())? {
            return Err(Error::image_in_use(path, p, true));
        }
    }
    for p in access.unshared() {
        if t(p.held_byte())? {
            return Err(Error::image_in_use(path, p, false));
        }
    }
    Ok(())
}

/// Would QEMU's image locks let a holder with `access` in, right now? Takes no lock: for a
/// pre-flight check before starting a QEMU, which takes its own locks.
pub fn check(path: &Path, access: Access) -> Result<(), Error> {
    let file = open_image(path)?;
    test_conflicts(&file, path, access)
}

/// QEMU's image locks, held: while this lives, QEMU (any QEMU, started by any tool) and
/// qemu-img see the image as in use with [`ImageLock::access`]. Dropping it releases them.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    access: Access,
}

impl ImageLock {
    /// Take QEMU's locks for `access` on the image at `path`, lock first, then test, as QEMU
    /// does: one-byte OFD read locks on the held bytes (100+n) and the unshared bytes
    /// (200+n), then `F_OFD_GETLK` on the complementary bytes. On a conflict every lock is
    /// released and the error ([`crate::ErrorKind::ImageInUse`]) names the image and the
    /// permission. Two processes racing both fail rather than both succeeding.
    pub fn acquire(path: &Path, access: Access) -> Result<ImageLock, Error> {
        let file = open_image(path)?;
        for off in access.bytes() {
            let got = set_lock(&file, LockType::Read, off, 1)
                .map_err(|e| Error::io("lock image", path, e))?;
            if !got {
                // Someone holds a write lock on a QEMU byte: not QEMU, but in use all the same.
                let p = Permission::ALL[(off % 100) as usize];
                return Err(Error::image_in_use(path, p, off >= 200));
            }
        }
        test_conflicts(&file, path, access)?;
        Ok(ImageLock {
            file,
            path: path.to_path_buf(),
            access,
        })
    }
    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The access held.
    pub fn access(&self) -> Access {
        self.access
    }
    /// The fd holding the locks (it must stay open; passing it to a child without
    /// `FD_CLOEXEC` lets the child keep the locks).
    pub fn lock_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `--image-opts` for running qemu-img on an image whose QEMU locks this process holds:
/// qemu-img's file driver then takes and tests no lock (`file.locking=off`), while ours keep
/// every other QEMU and qemu-img out. Without it, qemu-img refuses ("Failed to get \"write\"
/// lock"), because our locks are another open file description's. Commas in the path are
/// doubled, as QEMU's option syntax wants. Use: `qemu-img snapshot -c NAME --image-opts OPTS`.
pub fn image_opts_without_locking(format: &str, path: &Path) -> String {
    format!(
        "driver={},file.driver=file,file.filename={},file.locking=off",
        format.replace(',', ",,"),
        path.to_string_lossy().replace(',', ",,")
    )
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
    fn image_opts_escape_commas() {
        assert_eq!(
            image_opts_without_locking("qcow2", Path::new("/a,b/x.qcow2")),
            "driver=qcow2,file.driver=file,file.filename=/a,,b/x.qcow2,file.locking=off"
        );
    }

    #[test]
    fn a_fifo_does_not_hang_the_probe() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we pass.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let _ = probe(&fifo);
        let _ = ImageLock::acquire(&fifo, Access::WRITER);
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
