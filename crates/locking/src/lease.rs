//! Leases: where they live ([`LeaseBackend`]), the local lockspace directory
//! ([`LocalBackend`], the default) and an in-memory fake ([`MemoryBackend`]).
//!
//! # The local lockspace
//!
//! One lease file per resource in the lockspace directory, named by the lowercase hex SHA-256
//! of the resource's canonical key (see [`crate::ResourceKey`]). Inside it:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 (lock only) | the lease: an OFD read lock per shared holder, one OFD write lock for an exclusive holder (virtlockd locks the same byte, so the two exclude each other when they share a lockspace directory) |
//! | `1 MiB + i` (lock only) | slot `i` is in use: its holder keeps a write lock on it |
//! | `4096 + 1024 i` .. +1024 | slot `i`'s [`HolderRecord`] as JSON, NUL padded |
//!
//! A holder takes the lease byte, then the first free slot, then writes its record there. A
//! record counts only while its slot byte is locked, so records of holders that died (kill -9
//! included) are ignored without any pid check: the kernel drops OFD locks when the last fd of
//! the open file description closes, which happens before a process even becomes a zombie.
//! Lease files are never deleted: unlinking a lock file while another process opens it would
//! let two holders lock two different files.

use crate::record::{Holder, HolderRecord, Mode};
use crate::resource::ResourceKey;
use crate::sys::{byte_locked, set_lock, LockType};
use crate::Error;
use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where leases live. The local lockspace directory is the default; a cluster-wide backend
/// (NFS lockspace, sanlock, etcd) implements the same trait.
pub trait LeaseBackend: Send + Sync + fmt::Debug {
    /// Take the lease on `key` in `mode` for `holder` without waiting. A conflict is an
    /// [`crate::ErrorKind::Conflict`] error naming the known holders.
    fn try_acquire(
        &self,
        key: &ResourceKey,
        mode: Mode,
        holder: &Holder,
    ) -> Result<Box<dyn HeldLease>, Error>;

    /// The live holders of `key`'s lease, as far as their records tell.
    fn holders(&self, key: &ResourceKey) -> Result<Vec<HolderRecord>, Error>;

    /// A short description for messages and `--output json` (e.g. the lockspace directory).
    fn describe(&self) -> String;

    /// Commit under fencing tokens: check that each `(resource, token)` lease is still the
    /// one granted with that token, and record `what` as committed under it, atomically;
    /// refused with [`crate::ErrorKind::LeaseLost`] otherwise. Backends whose leases cannot
    /// be lost while held (the local lockspace: a lock dies only with its holder) accept.
    fn commit(&self, fences: &[crate::etcd::Fence], what: &str) -> Result<(), Error> {
        let _ = (fences, what);
        Ok(())
    }

    /// The host identity this backend writes into holder records, for cluster backends
    /// (`None`: every holder is on this host).
    fn host(&self) -> Option<&str> {
        None
    }
}

/// A lease that is held; dropping it releases it.
pub trait HeldLease: Send + Sync + fmt::Debug {
    /// The resource.
    fn key(&self) -> &ResourceKey;
    /// The mode it is held in.
    fn mode(&self) -> Mode;
    /// The fd whose open file description holds the lock, for backends that have one. A
    /// caller that passes it to a child process (without `FD_CLOEXEC`) lets the child keep
    /// the lease for its whole life, as QEMU keeps its image locks.
    fn lock_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// The lease's fencing token, for backends that have one (a cluster lease: it grows with
    /// every grant, see [`crate::etcd`]).
    fn token(&self) -> Option<u64> {
        None
    }
    /// What another process needs to keep the lease alive after [`HeldLease::hand_over`],
    /// for backends whose leases expire unless renewed (etcd).
    fn ticket(&self) -> Option<crate::etcd::Ticket> {
        None
    }
    /// Hand the lease over to process `pid`, which inherited [`HeldLease::lock_fd`]: record
    /// `pid` as the holder and let go of this handle without clearing the record. The lease
    /// then lives exactly as long as that process keeps the fd open. Backends without an fd
    /// just release.
    fn hand_over(self: Box<Self>, pid: u32) -> Result<(), Error> {
        let _ = pid;
        Ok(())
    }
}

const LEASE_BYTE: u64 = 0;
const SLOT_LOCK_BASE: u64 = 1 << 20;
const RECORD_BASE: u64 = 4096;
const RECORD_SIZE: usize = 1024;
const MAX_SLOTS: u64 = 512;
/// How long a refused acquirer waits for the holder's record to appear.
const RECORD_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Leases as OFD locks on files in a local lockspace directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    dir: PathBuf,
}

impl LocalBackend {
    /// Use (and create, if missing) the lockspace directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<LocalBackend, Error> {
        let dir = dir.into();
        // Private to the user, like every file under it (lease files are 0600).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io("create lockspace", &dir, e))?;
        Ok(LocalBackend { dir })
    }

    /// Use the lockspace directory `dir` without creating it: for read-only inspection
    /// ([`LeaseBackend::holders`] of a missing directory is empty; acquiring fails).
    pub fn at(dir: impl Into<PathBuf>) -> LocalBackend {
        LocalBackend { dir: dir.into() }
    }

    /// The lockspace directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lease file of `key`.
    pub fn lease_path(&self, key: &ResourceKey) -> PathBuf {
        self.dir.join(key.hash())
    }

    fn open(&self, key: &ResourceKey) -> Result<File, Error> {
        let path = self.lease_path(key);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::io("open lease file", &path, e))
    }
}

/// Is `file` still the file at `path`?
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn record_offset(slot: u64) -> u64 {
    RECORD_BASE + slot * RECORD_SIZE as u64
}

/// Read the records of every slot another open file description holds.
fn read_records(file: &File, path: &Path) -> Result<Vec<HolderRecord>, Error> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat lease file", path, e))?
        .len();
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECORD_SIZE];
    let mut slot = 0;
    while slot < MAX_SLOTS && record_offset(slot) < len {
        let held = byte_locked(file, SLOT_LOCK_BASE + slot)
            .map_err(|e| Error::io("test slot lock", path, e))?;
        if held {
            // A short read or a record being written is no record: the holder is unknown.
            if let Ok(n) = file.read_at(&mut buf, record_offset(slot)) {
                let text = &buf[..n];
                let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                if let Ok(r) = serde_json::from_slice::<HolderRecord>(&text[..end]) {
                    out.push(r);
                }
            }
        }
        slot += 1;
    }
    Ok(out)
}

/// Serialise `record` into exactly RECORD_SIZE bytes (NUL padded), shortening names if needed.
fn encode_record(record: &HolderRecord) -> Vec<u8> {
    let mut r = record.clone();
    let mut max = 256;
    loop {
        let mut v = serde_json::to_vec(&r).unwrap_or_default();
        if v.len() < RECORD_SIZE {
            v.resize(RECORD_SIZE, 0);
            return v;
        }
        max /= 2;
        r.holder = record.holder.truncated(max);
        r.resource = Holder::Operation(record.resource.clone())
            .truncated(max)
            .name()
            .to_string();
        r.host = Holder::Operation(record.host.clone())
            .truncated(max)
            .name()
            .to_string();
    }
}

/// Who holds the lease `file` refused us (`ty` for `mode`): the records of the holders in
/// the way (or of all holders, if none of them is; empty if nobody left one: another tool,
/// virtlockd). `None`: nobody is in the way any more, the caller may try again.
fn refusal(
    file: &File,
    path: &Path,
    ty: LockType,
    mode: Mode,
) -> Result<Option<Vec<HolderRecord>>, Error> {
    // The holder writes its record just after taking the lease: give it a moment (a
    // virt-snap that just won a race may be descheduled in between on a busy host).
    let deadline = std::time::Instant::now() + RECORD_WAIT;
    let records = loop {
        let records = read_records(file, path)?;
        if !crate::sys::conflicts(file, ty, LEASE_BYTE)
            .map_err(|e| Error::io("test lease lock", path, e))?
        {
            return Ok(None);
        }
        if !records.is_empty() || std::time::Instant::now() >= deadline {
            break records;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    let blocking: Vec<HolderRecord> = records
        .iter()
        .filter(|r| !mode.compatible_with(r.mode))
        .cloned()
        .collect();
    Ok(Some(if blocking.is_empty() {
        records
    } else {
        blocking
    }))
}

impl LeaseBackend for LocalBackend {
    fn try_acquire(
        &self,
        key: &ResourceKey,
        mode: Mode,
        holder: &Holder,
    ) -> Result<Box<dyn HeldLease>, Error> {
        let path = self.lease_path(key);
        let ty = match mode {
            Mode::Shared => LockType::Read,
            Mode::Exclusive => LockType::Write,
        };
        // virtlockd unlinks the lease files it created when it releases them: a lock taken on
        // a file that was unlinked (and maybe recreated) meanwhile protects nothing, so check
        // that the locked file is still the one at the path, as virtlockd does.
        let mut attempts = 0;
        let mut again = |why: &str| {
            attempts += 1;
            if attempts >= 100 {
                return Err(Error::io(
                    "lock lease",
                    &path,
                    std::io::Error::other(why.to_string()),
                ));
            }
            Ok(())
        };
        let file = loop {
            let file = self.open(key)?;
            let locked = set_lock(&file, ty, LEASE_BYTE, 1)
                .map_err(|e| Error::io("lock lease", &path, e))?;
            if locked {
                if same_file(&file, &path) {
                    break file;
                }
                again("the lease file keeps being replaced")?;
                continue;
            }
            match refusal(&file, &path, ty, mode)? {
                Some(holders) => return Err(Error::conflict(key.display(), holders)),
                // The holder left meanwhile: try again.
                None => again("the lease keeps changing hands")?,
            }
        };
        let mut slot = None;
        for i in 0..MAX_SLOTS {
            if set_lock(&file, LockType::Write, SLOT_LOCK_BASE + i, 1)
                .map_err(|e| Error::io("lock record slot", &path, e))?
            {
                slot = Some(i);
                break;
            }
        }
        let rec = HolderRecord::now(holder, mode, key.display());
        if let Some(i) = slot {
            file.write_all_at(&encode_record(&rec), record_offset(i))
                .map_err(|e| Error::io("write holder record", &path, e))?;
        }
        Ok(Box::new(LocalLease {
            file,
            key: key.clone(),
            mode,
            slot,
            record: rec,
            path,
        }))
    }

    fn holders(&self, key: &ResourceKey) -> Result<Vec<HolderRecord>, Error> {
        let path = self.lease_path(key);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("open lease file", &path, e)),
        };
        read_records(&file, &path)
    }

    fn describe(&self) -> String {
        format!("lockspace {}", self.dir.display())
    }
}

/// A lease held in a [`LocalBackend`]: the open lease file with its locks.
#[derive(Debug)]
pub struct LocalLease {
    file: File,
    key: ResourceKey,
    mode: Mode,
    slot: Option<u64>,
    record: HolderRecord,
    path: PathBuf,
}

impl HeldLease for LocalLease {
    fn key(&self) -> &ResourceKey {
        &self.key
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn lock_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
    fn hand_over(mut self: Box<Self>, pid: u32) -> Result<(), Error> {
        if let Some(i) = self.slot.take() {
            self.record.pid = pid;
            self.file
                .write_all_at(&encode_record(&self.record), record_offset(i))
                .map_err(|e| Error::io("write holder record", &self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        // Let go of the lease first, then clear the record while the slot is still ours
        // (closing the file drops the slot lock): someone refused meanwhile still finds the
        // record, rather than a lease held without one.
        // A lease handed over (slot None) lives on in the child's fd of this same open file
        // description: unlocking here would release it there too.
        if let Some(i) = self.slot {
            let _ = crate::sys::unlock(&self.file, LEASE_BYTE, 1);
            let _ = self
                .file
                .write_all_at(&[0u8; RECORD_SIZE], record_offset(i));
        }
    }
}

type Table = HashMap<Vec<u8>, Vec<(u64, HolderRecord)>>;

/// Leases in this process's memory: the fake for tests of callers (failure injection, pure
/// logic). Clones share one table.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Mutex<(Table, u64, Option<std::io::ErrorKind>)>>,
}

impl MemoryBackend {
    /// An empty table.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }
    /// Make every following call fail with an I/O error of `kind` (None: stop failing).
    pub fn fail_with(&self, kind: Option<std::io::ErrorKind>) {
        self.lock().2 = kind;
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, (Table, u64, Option<std::io::ErrorKind>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LeaseBackend for MemoryBackend {
    fn try_acquire(
        &self,
        key: &ResourceKey,
        mode: Mode,
        holder: &Holder,
    ) -> Result<Box<dyn HeldLease>, Error> {
        let mut g = self.lock();
        if let Some(k) = g.2 {
            return Err(Error::io("lock lease", key.display(), k.into()));
        }
        g.1 += 1;
        let id = g.1;
        let entry = g.0.entry(key.canonical().to_vec()).or_default();
        let blocking: Vec<HolderRecord> = entry
            .iter()
            .filter(|(_, r)| !mode.compatible_with(r.mode))
            .map(|(_, r)| r.clone())
            .collect();
        if !blocking.is_empty() {
            return Err(Error::conflict(key.display(), blocking));
        }
        entry.push((id, HolderRecord::now(holder, mode, key.display())));
        Ok(Box::new(MemoryLease {
            backend: self.clone(),
            key: key.clone(),
            mode,
            id,
        }))
    }

    fn holders(&self, key: &ResourceKey) -> Result<Vec<HolderRecord>, Error> {
        let g = self.lock();
        if let Some(k) = g.2 {
            return Err(Error::io("read holders", key.display(), k.into()));
        }
        Ok(g.0
            .get(key.canonical())
            .map(|v| v.iter().map(|(_, r)| r.clone()).collect())
            .unwrap_or_default())
    }

    fn describe(&self) -> String {
        "in-memory leases".into()
    }
}

/// A lease held in a [`MemoryBackend`].
#[derive(Debug)]
pub struct MemoryLease {
    backend: MemoryBackend,
    key: ResourceKey,
    mode: Mode,
    id: u64,
}

impl HeldLease for MemoryLease {
    fn key(&self) -> &ResourceKey {
        &self.key
    }
    fn mode(&self) -> Mode {
        self.mode
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        let mut g = self.backend.lock();
        if let Some(v) = g.0.get_mut(self.key.canonical()) {
            v.retain(|(id, _)| *id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, Resource};

    fn key(p: &str) -> ResourceKey {
        Resource::file(p).key_from(Path::new("/")).unwrap()
    }

    fn check_backend(b: &dyn LeaseBackend) {
        let k = key("/nonexistent-vs/a.qcow2");
        let vm = Holder::Domain("vm1".into());
        let op = Holder::Operation("snapshot create".into());
        let s1 = b.try_acquire(&k, Mode::Shared, &vm).unwrap();
        let s2 = b.try_acquire(&k, Mode::Shared, &vm).unwrap();
        let e = b.try_acquire(&k, Mode::Exclusive, &op).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(e.holders().len(), 2, "{e}");
        assert!(
            e.to_string()
                .starts_with("volume /nonexistent-vs/a.qcow2 in use by domain \"vm1\" (pid "),
            "{e}"
        );
        drop((s1, s2));
        assert!(b.holders(&k).unwrap().is_empty());
        let x = b.try_acquire(&k, Mode::Exclusive, &op).unwrap();
        assert_eq!(x.mode(), Mode::Exclusive);
        let hs = b.holders(&k).unwrap();
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].holder, op);
        assert_eq!(hs[0].pid, std::process::id());
        let e = b.try_acquire(&k, Mode::Shared, &vm).unwrap_err();
        assert!(
            e.to_string().contains("operation \"snapshot create\""),
            "{e}"
        );
        drop(x);
        b.try_acquire(&k, Mode::Shared, &vm).unwrap();
    }

    #[test]
    fn local_backend_semantics_within_one_process() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path().join("locks")).unwrap();
        check_backend(&b);
        // The lease file is named by the key's hash and stays.
        assert!(b.lease_path(&key("/nonexistent-vs/a.qcow2")).exists());
    }

    #[test]
    fn memory_backend_semantics_and_failure_injection() {
        let b = MemoryBackend::new();
        check_backend(&b);
        b.fail_with(Some(std::io::ErrorKind::PermissionDenied));
        let e = b
            .try_acquire(&key("/x"), Mode::Shared, &Holder::Domain("d".into()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn long_and_hostile_names_fit_a_record() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path()).unwrap();
        let k = key("/nonexistent-vs/b");
        let name = "\"\u{1}é".repeat(2000);
        let _l = b
            .try_acquire(&k, Mode::Exclusive, &Holder::Domain(name.clone()))
            .unwrap();
        let hs = b.holders(&k).unwrap();
        assert_eq!(hs.len(), 1);
        assert!(name.starts_with(hs[0].holder.name()));
    }

    #[test]
    fn a_lease_file_replaced_under_a_holder_is_not_trusted() {
        // virtlockd unlinks lease files on release. A holder of the unlinked inode must not
        // make a newcomer believe it holds the same lease as the file now at the path.
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path()).unwrap();
        let k = key("/nonexistent-vs/d");
        let op = Holder::Operation("x".into());
        let old = b.try_acquire(&k, Mode::Exclusive, &op).unwrap();
        std::fs::remove_file(b.lease_path(&k)).unwrap();
        // The newcomer locks the new file: no conflict with the lock on the unlinked inode.
        let new = b.try_acquire(&k, Mode::Exclusive, &op).unwrap();
        assert!(same_file(
            &File::open(b.lease_path(&k)).unwrap(),
            &b.lease_path(&k)
        ));
        drop((old, new));
    }

    #[test]
    fn garbage_in_a_lease_file_is_no_holder() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path()).unwrap();
        let k = key("/nonexistent-vs/c");
        std::fs::write(b.lease_path(&k), vec![0xffu8; 300_000]).unwrap();
        let _l = b
            .try_acquire(&k, Mode::Shared, &Holder::Domain("a".into()))
            .unwrap();
        let hs = b.holders(&k).unwrap();
        assert_eq!(hs.len(), 1, "only our own record parses: {hs:?}");
    }
}
