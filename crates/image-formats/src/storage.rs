//! All image I/O goes through [`Storage`]: positioned reads and writes, flush, length.
//!
//! [`FileStorage`] is a plain file (opened read-only for inspection, never locked);
//! [`MemStorage`] keeps the bytes in memory, for tests and for building images.
//!
//! Images are regular files or block devices, nothing else: [`open_image_file`] refuses a
//! FIFO, socket, directory or character device (`InvalidInput`, naming what it is) without
//! blocking, since opening a FIFO waits for a writer and reading it waits for data forever.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

/// Positioned I/O on an image file. Implementations must be usable through `&self`.
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; reading past the end is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make previous writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Is the storage empty?
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// What a file type is, for messages: "a FIFO", "a directory", ...
fn type_name(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFBLK => "a block device",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFDIR => "a directory",
        libc::S_IFCHR => "a character device",
        libc::S_IFLNK => "a symbolic link",
        _ => "not a file",
    }
}

fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor and st outlives the call.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The messages name what the path is, not the path: callers say which path.
fn not_an_image(mode: libc::mode_t) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not a regular file or block device", type_name(mode)),
    )
}

fn refine(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "symlink loop (too many levels of symbolic links)",
        )
    } else {
        e
    }
}

/// Check that `path` names a regular file or a block device, without opening it for I/O
/// (an `O_PATH` descriptor: no side effect, never blocks). `InvalidInput` otherwise (a FIFO,
/// socket, directory, character device, or a symlink loop); other errors as the kernel says
/// (`NotFound`, ...).
pub fn check_image_path(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(refine)?;
    let st = fstat(f.as_raw_fd())?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFBLK => Ok(()),
        m => Err(not_an_image(m)),
    }
}

/// Check that an open `file` (opened with `O_NONBLOCK` so that a FIFO could not
/// hang the open) is a regular file or a block device, and clear `O_NONBLOCK`. Use it after
/// opening an image with options of your own (say, `create`); [`open_image_file`] does both.
pub fn checked_image_file(file: File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let st = fstat(fd)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFBLK => {}
        m => return Err(not_an_image(m)),
    }
    // SAFETY: plain fcntl calls on an open descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0
        || (flags & libc::O_NONBLOCK != 0
            // SAFETY: as above.
            && unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0)
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Open the image at `path` (read-only, or read-write with `write`) if it is a regular file
/// or a block device: never blocks on a FIFO, never opens a character device (no side
/// effects on, say, a tape or a tty). `InvalidInput` for anything else, saying what it is
/// ("is a FIFO, not a regular file or block device"; the message does not repeat the path).
pub fn open_image_file(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    check_image_path(path)?;
    // The path may have been replaced since: the open is non-blocking and checked again.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(refine)?;
    checked_image_file(f)
}

/// A file or block device on the host. Opening never takes a lock, so images held by a
/// running QEMU can be read.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Open `path` read-only (no lock). Only a regular file or a block device: anything
    /// else is `InvalidInput` (see [`open_image_file`]), at once.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: open_image_file(path, false)?,
        })
    }
    /// Open `path` for reading and writing (no lock; locking is the caller's business). Only
    /// a regular file or a block device, as [`FileStorage::open_read_only`].
    pub fn open_read_write(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: open_image_file(path, true)?,
        })
    }
    /// Wrap an already open file.
    pub fn from_file(file: File) -> Self {
        FileStorage { file }
    }
    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let meta = self.file.metadata()?;
        if meta.file_type().is_block_device() {
            // A block device's size is not in its metadata; I/O is positioned, so moving
            // the file position does not matter.
            (&self.file).seek(io::SeekFrom::End(0))
        } else {
            Ok(meta.len())
        }
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// An image held in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }
    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        MemStorage {
            data: Mutex::new(bytes.into()),
        }
    }
    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
    let end = start
        .checked_add(len)
        .ok_or(io::Error::from(io::ErrorKind::UnexpectedEof))?;
    Ok((start, end))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let (start, end) = range(offset, buf.len())?;
        if end > data.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let (start, end) = range(offset, buf.len())?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.lock().resize(len, 0);
        Ok(())
    }
}

impl<S: Storage + ?Sized> Storage for &S {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}
