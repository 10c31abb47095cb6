//! The QMP socket, split so that writing never wakes the reader.
//!
//! tokio's `UnixStream` registers one epoll entry for both directions; after each command
//! written, QEMU reading it frees buffer space and the kernel reports `EPOLLOUT`, which
//! wakes the runtime for nothing: one extra wake-up (and context switch) per command.
//! Here the read side is registered for readability only, and the write side is a plain
//! non-blocking socket: a write that would block (QEMU not reading) waits on a separate,
//! temporary writability registration.

use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use tokio::sync::Notify;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// Splits a connected, non-blocking socket into its two sides (the read side needs a
/// tokio runtime).
pub(crate) fn split(stream: UnixStream) -> io::Result<(ReadSide, WriteSide)> {
    stream.set_nonblocking(true)?;
    let w = stream.try_clone()?;
    let r = register(stream, Interest::READABLE)?;
    Ok((ReadSide { fd: r }, WriteSide { sock: w }))
}

/// Registers an owned socket with the runtime's reactor.
fn register(sock: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the AsyncFd owns `sock`, whose descriptor stays open and refers to the same
    // socket until the AsyncFd (and with it `sock`) is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(sock, interest) }?)
}

/// The read side: readable-only epoll registration.
pub(crate) struct ReadSide {
    fd: AsyncFd<UnixStream>,
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let len = unfilled.len();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket (edge-triggered): skip the read
                    // that would only say EAGAIN.
                    if n > 0 && n < len {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // WouldBlock: readiness cleared by try_io, wait again.
                Err(_) => continue,
            }
        }
    }
}

/// The write side: a plain non-blocking socket, no epoll registration.
pub(crate) struct WriteSide {
    sock: UnixStream,
}

impl WriteSide {
    /// Writes all of `buf`. Cancel-safety is the caller's business (the writer task
    /// never drops this future half-way except at shutdown).
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match (&self.sock).write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // QEMU is not reading (it queues at most 8 commands per monitor). Wait
                    // for room on a registration that exists only while waiting; epoll
                    // reports the current state when it is added, so no wake-up is lost.
                    let fd = register(self.sock.try_clone()?, Interest::WRITABLE)?;
                    let _ = fd.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends a first part of `buf` (at least one byte) with the descriptors `fds`
    /// (SCM_RIGHTS) attached; returns how many bytes went. Waits while the socket is full;
    /// nothing is written until it returns, so dropping the future is safe.
    async fn send_with_fds(&self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors need at least one byte to travel with",
            ));
        }
        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        loop {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(io::Error::other("ancillary buffer too small"));
            }
            match sendmsg(
                &self.sock,
                &[IoSlice::new(buf)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    let fd = register(self.sock.try_clone()?, Interest::WRITABLE)?;
                    let _ = fd.writable().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One non-blocking write attempt.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&self.sock).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                r => return r,
            }
        }
    }

    /// Shuts the write direction down (QEMU sees EOF).
    pub(crate) fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }
}

/// Ownership of the socket taken by [`Writer::send_with_fds`], given back when dropped
/// (also when its future is cancelled or fails).
struct Claim<'a> {
    writer: &'a Writer,
    rest: &'a [u8],
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.writer.release(self.rest);
    }
}

/// Whole lines to the socket, in order: a caller with the only command in flight writes
/// its line itself when nothing is queued (no task hop); otherwise (concurrent callers, whose
/// lines batch into one write), or for the rest of a line the socket did not take, the
/// bytes queue for the writer task ([`Writer::run`]). A line is therefore never left half
/// written, whatever happens to the caller afterwards.
pub(crate) struct Writer {
    side: WriteSide,
    state: Mutex<Queue>,
    wake: Notify,
    /// Signalled whenever the socket is released (`busy` goes false).
    idle: Notify,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    /// The writer task owns the socket until it has drained `bytes`.
    busy: bool,
}

impl Writer {
    pub(crate) fn new(side: WriteSide) -> Self {
        Writer {
            side,
            state: Mutex::new(Queue::default()),
            wake: Notify::new(),
            idle: Notify::new(),
        }
    }

    /// Sends one whole line now (`direct`, when nothing is queued) or queues (the rest
    /// of) it for the writer task, which writes everything queued in one go. An error
    /// means the socket is broken.
    pub(crate) fn send(&self, line: &[u8], direct: bool) -> io::Result<()> {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if q.busy || !direct {
            q.bytes.extend_from_slice(line);
            if !q.busy {
                q.busy = true;
                self.wake.notify_one();
            }
            return Ok(());
        }
        let n = self.side.try_write(line)?;
        if n < line.len() {
            q.bytes.extend_from_slice(&line[n..]);
            q.busy = true;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Sends one whole line with descriptors attached to its first byte (QMP `getfd`,
    /// `add-fd`). Waits until no other line is being written and owns the socket until the
    /// descriptors are sent; the rest of the line, if the socket did not take it all, goes
    /// to the writer task ahead of anything queued meanwhile. Cancel-safe: dropped before
    /// the descriptors went, nothing was written; after, the line is completed anyway. An
    /// error means the socket is broken.
    pub(crate) async fn send_with_fds(
        &self,
        line: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a release between the check and the wait
            // is not missed.
            idle.as_mut().enable();
            {
                let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if !q.busy {
                    q.busy = true;
                    break;
                }
            }
            idle.await;
        }
        let mut claim = Claim {
            writer: self,
            rest: &[],
        };
        let n = self.side.send_with_fds(line, fds).await?;
        claim.rest = &line[n..];
        Ok(())
    }

    /// Gives the socket back after [`Writer::send_with_fds`]: `rest` of its line first,
    /// then whatever others queued, go to the writer task.
    fn release(&self, rest: &[u8]) {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !rest.is_empty() {
            q.bytes.splice(0..0, rest.iter().copied());
        }
        if q.bytes.is_empty() {
            q.busy = false;
            self.idle.notify_waiters();
        } else {
            // Still busy: the writer task owns the socket until it has drained the queue.
            self.wake.notify_one();
        }
    }

    /// The writer task's loop: drains the queue whenever a caller hands it bytes. Returns
    /// on a write error.
    pub(crate) async fn run(&self) -> io::Error {
        loop {
            self.wake.notified().await;
            loop {
                let batch = {
                    let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    if q.bytes.is_empty() {
                        q.busy = false;
                        self.idle.notify_waiters();
                        break;
                    }
                    std::mem::take(&mut q.bytes)
                };
                if let Err(e) = self.side.write_all(&batch).await {
                    return e;
                }
            }
        }
    }

    /// Shuts the write direction down (QEMU sees EOF).
    pub(crate) fn shutdown(&self) {
        self.side.shutdown();
    }
}
