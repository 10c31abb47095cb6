//! Fault injection for crash-safety tests: [`FaultyStorage`] wraps a storage and, after the
//! k-th write or flush, either fails every later write and flush ([`FaultMode::Fail`]) or
//! silently drops them ([`FaultMode::Stop`], a power cut: the caller believes they happened).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::Storage;

/// What happens to writes and flushes after the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// They return an error.
    Fail,
    /// They return success but change nothing.
    Stop,
}

/// A storage that lets the first `limit` writes/flushes through, then fails or drops the rest.
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    limit: u64,
    mode: FaultMode,
    events: AtomicU64,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wrap `inner`: `limit` writes or flushes succeed, then `mode` applies.
    pub fn new(inner: S, limit: u64, mode: FaultMode) -> Self {
        FaultyStorage {
            inner,
            limit,
            mode,
            events: AtomicU64::new(0),
        }
    }
    /// Writes and flushes attempted so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }
    /// The wrapped storage.
    pub fn into_inner(self) -> S {
        self.inner
    }
    /// Is this event past the limit? Returns the outcome to give instead, if so.
    fn tripped(&self) -> Option<io::Result<()>> {
        let n = self.events.fetch_add(1, Ordering::SeqCst);
        if n < self.limit {
            return None;
        }
        Some(match self.mode {
            FaultMode::Fail => Err(io::Error::other("injected fault")),
            FaultMode::Stop => Ok(()),
        })
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.tripped() {
            Some(r) => r,
            None => self.inner.write_at(buf, offset),
        }
    }
    fn flush(&self) -> io::Result<()> {
        match self.tripped() {
            Some(r) => r,
            None => self.inner.flush(),
        }
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        match self.tripped() {
            Some(r) => r,
            None => self.inner.set_len(len),
        }
    }
}
