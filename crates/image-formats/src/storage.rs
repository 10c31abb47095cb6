//! All image I/O goes through [`Storage`]: positioned reads and writes, flush, length.
//!
//! [`FileStorage`] is a plain file (opened read-only for inspection, never locked);
//! [`MemStorage`] keeps the bytes in memory, for tests and for building images.

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

/// A file or block device on the host. Opening never takes a lock, so images held by a
/// running QEMU can be read.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Open `path` read-only (no lock).
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: File::open(path)?,
        })
    }
    /// Open `path` for reading and writing (no lock; locking is the caller's business).
    pub fn open_read_write(path: &Path) -> io::Result<Self> {
        Ok(FileStorage {
            file: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?,
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
