//! The thaw watchdog: a forked child that thaws a frozen guest if virt-snap dies (or is stuck)
//! while the guest's file systems are frozen, so that no freeze outlives the freeze budget.
//!
//! [`ThawWatchdog::arm`] runs just before `guest-fsfreeze-freeze` is sent. It forks; the
//! child keeps only two descriptors, the guest agent connection (inherited: the agent's
//! chardev serves one client at a time, so the child could not open a connection of its own
//! while virt-snap holds one) and the read end of a pipe whose write end only virt-snap holds
//! (close-on-exec, so nothing virt-snap spawns holds it too), and waits on the pipe until the
//! deadline (now + the budget, `CLOCK_MONOTONIC`):
//!
//! - a byte ([`ThawWatchdog::disarm`], after virt-snap's own thaw succeeded): it exits, doing
//!   nothing;
//! - end of file (virt-snap died, or dropped the watchdog without disarming it): it sends
//!   `0xFF` + `{"execute":"guest-fsfreeze-thaw","id":"vs-watchdog"}` (the `0xFF` resets the
//!   agent's parser, in case virt-snap died half-way through a line), waits until the reply
//!   carrying that id is read (at most 2 s past the later of now and the deadline: a freeze
//!   still running in the agent answers first) and exits. virt-snap is gone: the connection
//!   is the child's alone, and once it exits the agent serves the next client;
//! - the deadline (virt-snap is alive but has not thawed: it is stuck, or its own thaw is
//!   late): it sends the same thaw without reading (virt-snap may still read that connection:
//!   its `QgaClient` drops the reply, whose id is not one of its own, and the id-less parse
//!   error the `0xFF` causes) and goes on waiting on the pipe without deadline, as above.
//!
//! The child is created with `fork` in a multi-threaded process, so until it exits it calls
//! only async-signal-safe functions (raw system calls through libc: `setsid`, `close_range`,
//! `poll`, `read`, `send`, `recv`, `clock_gettime`, `_exit`) on values prepared before the
//! fork; it allocates nothing and takes no lock. A re-exec'd helper would do the same with
//! more moving parts (finding the binary, clearing close-on-exec on exactly the agent
//! descriptor, passing the deadline), for nothing the fork does not already give.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The command the watchdog sends, `0xFF` first.
const THAW: &[u8] = b"\xff{\"execute\":\"guest-fsfreeze-thaw\",\"id\":\"vs-watchdog\"}\n";
/// What identifies the agent's reply to it.
const REPLY_ID: &[u8] = b"\"vs-watchdog\"";
/// How long the watchdog waits for that reply after sending it (from the deadline at the
/// earliest).
const REPLY_WAIT: Duration = Duration::from_secs(2);

/// An armed watchdog (the child's pid and the pipe's write end). Dropped without
/// [`disarm`](ThawWatchdog::disarm), the child thaws the guest at once, as if virt-snap had
/// died, and is reaped in the background.
#[derive(Debug)]
pub(crate) struct ThawWatchdog {
    pid: libc::pid_t,
    disarm: Option<OwnedFd>,
}

impl ThawWatchdog {
    /// Forks the watchdog over `agent`, the connected guest agent socket, with its deadline
    /// `budget` from now.
    pub(crate) fn arm(agent: BorrowedFd<'_>, budget: Duration) -> io::Result<ThawWatchdog> {
        let deadline = add(monotonic_now()?, budget);
        let reply_by = add(deadline, REPLY_WAIT);
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let agent = agent.as_raw_fd();
        // SAFETY: the child runs only `watch`, which calls async-signal-safe functions on
        // the plain values prepared above, and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe { watch(agent, rd.as_raw_fd(), deadline, reply_by) },
            pid => {
                drop(rd);
                tracing::debug!(pid, ?budget, "thaw watchdog armed");
                Ok(ThawWatchdog {
                    pid,
                    disarm: Some(wr),
                })
            }
        }
    }

    /// The guest is thawed: the child exits without doing anything, and is reaped.
    pub(crate) fn disarm(mut self) -> io::Result<()> {
        let wr = self.disarm.take().expect("armed until disarmed or dropped");
        let r = loop {
            // SAFETY: a one-byte write from a live buffer to a descriptor this owns.
            match unsafe { libc::write(wr.as_raw_fd(), b"x".as_ptr().cast(), 1) } {
                1 => break Ok(()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        // The child is gone already (EPIPE): nothing to disarm.
                        break Err(e);
                    }
                }
            }
        };
        drop(wr);
        reap(self.pid);
        tracing::debug!(pid = self.pid, "thaw watchdog disarmed");
        r
    }
}

impl Drop for ThawWatchdog {
    fn drop(&mut self) {
        if let Some(wr) = self.disarm.take() {
            // End of file for the child: it thaws the guest now and exits.
            drop(wr);
            tracing::warn!(
                pid = self.pid,
                "thaw watchdog dropped armed: it thaws the guest"
            );
            reap(self.pid);
        }
    }
}

/// Waits for child `pid` briefly (a disarmed child exits at once), then leaves it to a
/// thread, so that it never stays a zombie and no caller blocks on it for long.
pub(super) fn reap(pid: libc::pid_t) {
    for _ in 0..200 {
        let mut st = 0;
        // SAFETY: waitpid on our own child, with a live status word.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid || (r == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    reap_in_background(pid);
}

/// Leaves child `pid` to a thread that waits for it.
pub(super) fn reap_in_background(pid: libc::pid_t) {
    let spawned = std::thread::Builder::new()
        .name("child-reaper".into())
        .spawn(move || loop {
            let mut st = 0;
            // SAFETY: as above, blocking.
            let r = unsafe { libc::waitpid(pid, &mut st, 0) };
            if r != -1 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to reap child process {pid}: {e}");
    }
}

pub(super) fn monotonic_now() -> io::Result<libc::timespec> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts)
}

pub(super) fn add(t: libc::timespec, d: Duration) -> libc::timespec {
    let ns = t.tv_nsec as u64 + u64::from(d.subsec_nanos());
    libc::timespec {
        tv_sec: t
            .tv_sec
            .saturating_add(d.as_secs().min(i64::MAX as u64 / 2) as libc::time_t)
            .saturating_add((ns / 1_000_000_000) as libc::time_t),
        tv_nsec: (ns % 1_000_000_000) as _,
    }
}

/// Milliseconds from `now` to `t`, rounded up, as a `poll` timeout (0 if `t` has passed).
fn ms_until(now: libc::timespec, t: libc::timespec) -> libc::c_int {
    let ns = (t.tv_sec as i128 - now.tv_sec as i128) * 1_000_000_000
        + (t.tv_nsec as i128 - now.tv_nsec as i128);
    if ns <= 0 {
        0
    } else {
        ((ns + 999_999) / 1_000_000).min(libc::c_int::MAX as i128) as libc::c_int
    }
}

fn later(a: libc::timespec, b: libc::timespec) -> libc::timespec {
    if (a.tv_sec, a.tv_nsec) >= (b.tv_sec, b.tv_nsec) {
        a
    } else {
        b
    }
}

// Everything below runs in the forked child: async-signal-safe calls only, no allocation,
// no lock, no panic path that unwinds (errors end in `_exit`).

/// `CLOCK_MONOTONIC` now, in the child (a failure, which cannot happen for this clock,
/// reads as "the deadline has passed").
fn child_now() -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: i64::MAX as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime is async-signal-safe and writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts
}

/// Polls `fd` for `events` for at most `ms` (negative: no limit), retrying on EINTR;
/// returns the revents (0: timed out).
pub(super) fn child_poll(fd: RawFd, events: libc::c_short, ms: libc::c_int) -> libc::c_short {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: poll on one pollfd that lives on this stack.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            -1 if errno() == libc::EINTR => continue,
            -1 => return libc::POLLERR,
            0 => return 0,
            _ => return p.revents,
        }
    }
}

pub(super) fn errno() -> libc::c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// Closes every descriptor but `keep` (two of them).
fn child_close_all_but(keep: [RawFd; 2]) {
    let (a, b) = (keep[0].min(keep[1]) as u32, keep[0].max(keep[1]) as u32);
    let ranges = [
        (0, a.checked_sub(1)),
        (a + 1, b.checked_sub(1)),
        (b + 1, Some(u32::MAX)),
    ];
    for (lo, hi) in ranges {
        let Some(hi) = hi else { continue };
        if lo > hi {
            continue;
        }
        // SAFETY: close_range(2) on descriptor numbers only; nothing in this process uses
        // the closed descriptors any more (only this thread exists).
        let r = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0u32) };
        if r != 0 {
            // Before Linux 5.9: one by one, up to a bound.
            for fd in lo..=hi.min(65_535) {
                // SAFETY: as above.
                unsafe { libc::close(fd as RawFd) };
            }
        }
    }
}

/// Sends the thaw (all of it, waiting for room until `until`).
fn child_send_thaw(agent: RawFd, until: libc::timespec) -> bool {
    let mut sent = 0;
    while sent < THAW.len() {
        let rest = &THAW[sent..];
        // SAFETY: send from a static buffer; MSG_NOSIGNAL: a closed peer is EPIPE, not a
        // signal; MSG_DONTWAIT: the descriptor's own mode is the parent's (non-blocking).
        let n = unsafe {
            libc::send(
                agent,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            sent += n as usize;
            continue;
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => {
                let ms = ms_until(child_now(), until);
                if ms == 0 || child_poll(agent, libc::POLLOUT, ms) == 0 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Reads from `agent` until the reply carrying [`REPLY_ID`] (or EOF, an error, or `until`).
fn child_await_reply(agent: RawFd, until: libc::timespec) {
    const N: usize = REPLY_ID.len();
    // The last N-1 bytes of the previous read are kept in front, so that an id split
    // across two reads is found.
    let mut buf = [0u8; 4096 + N];
    let mut carry = 0;
    loop {
        let ms = ms_until(child_now(), until);
        if ms == 0 || child_poll(agent, libc::POLLIN, ms) == 0 {
            return;
        }
        // SAFETY: recv into the free part of a stack buffer.
        let n = unsafe {
            libc::recv(
                agent,
                buf[carry..].as_mut_ptr().cast(),
                buf.len() - carry,
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return;
        }
        if n < 0 {
            match errno() {
                libc::EINTR | libc::EAGAIN => continue,
                _ => return,
            }
        }
        let len = carry + n as usize;
        if buf[..len].windows(N).any(|w| w == REPLY_ID) {
            return;
        }
        carry = len.min(N - 1);
        buf.copy_within(len - carry..len, 0);
    }
}

/// The watchdog child's whole life (see the module documentation).
///
/// # Safety
///
/// Only in the child of a `fork`, with `agent` and `pipe` open descriptors of the parent.
unsafe fn watch(
    agent: RawFd,
    pipe: RawFd,
    deadline: libc::timespec,
    reply_by: libc::timespec,
) -> ! {
    // Its own session: signals for virt-snap's process group or terminal do not reach it.
    // SAFETY: setsid is async-signal-safe.
    unsafe { libc::setsid() };
    // Nothing else stays open: not virt-snap's locks, not its stdout and stderr (whoever
    // waits for their end of file would wait for the watchdog), not its QMP connection.
    child_close_all_but([agent, pipe]);
    let mut fired = false;
    let code = loop {
        let ms = if fired {
            -1
        } else {
            ms_until(child_now(), deadline)
        };
        let rev = if ms == 0 {
            0
        } else {
            child_poll(pipe, libc::POLLIN, ms)
        };
        if rev == 0 {
            // The deadline, virt-snap still alive: thaw without reading its connection.
            child_send_thaw(agent, later(child_now(), reply_by));
            fired = true;
            continue;
        }
        let mut b = 0u8;
        // SAFETY: a one-byte read into a stack byte.
        let n = unsafe { libc::read(pipe, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            // Disarmed: virt-snap thawed the guest.
            break 0;
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        // End of file (or an error): virt-snap is gone; the connection is ours alone.
        let until = later(add(child_now(), REPLY_WAIT), reply_by);
        if child_send_thaw(agent, until) {
            child_await_reply(agent, until);
        }
        break if fired { 2 } else { 1 };
    };
    // SAFETY: _exit ends the child without running the parent's atexit handlers or
    // flushing its stdio buffers (copies of the parent's).
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// Gone and reaped.
    fn exited(pid: libc::pid_t) -> bool {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Running (not a zombie).
    fn alive(pid: libc::pid_t) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }

    /// The fake agent end: reads the `0xFF` + thaw line; answers it (`answer`: the parse
    /// error for the `0xFF`, then the reply, split across two writes).
    fn expect_thaw(agent: &mut UnixStream, answer: bool) {
        agent.set_nonblocking(false).unwrap();
        agent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = std::io::BufReader::new(agent.try_clone().unwrap());
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        assert_eq!(line, THAW);
        if answer {
            agent
                .write_all(b"{\"return\": 1, \"id\": \"vs-watchdog\"}\n")
                .unwrap();
        }
    }

    #[test]
    fn disarmed_it_sends_nothing_and_is_reaped() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let w =
            ThawWatchdog::arm(std::os::fd::AsFd::as_fd(&ours), Duration::from_secs(30)).unwrap();
        let pid = w.pid;
        w.disarm().unwrap();
        assert!(exited(pid), "reaped");
        drop(ours);
        let mut got = Vec::new();
        agent.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn dropped_armed_it_thaws_at_once_and_waits_for_the_reply() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let w =
            ThawWatchdog::arm(std::os::fd::AsFd::as_fd(&ours), Duration::from_secs(30)).unwrap();
        let pid = w.pid;
        drop(ours);
        let t = Instant::now();
        drop(w);
        expect_thaw(&mut agent, false);
        std::thread::sleep(Duration::from_millis(100));
        assert!(alive(pid), "waits for the reply");
        agent
            .write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"stray\"}}\n")
            .unwrap();
        agent
            .write_all(b"{\"return\": 1, \"id\": \"vs-watch")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(alive(pid), "the id is not complete yet");
        agent.write_all(b"dog\"}\n").unwrap();
        // The child exits once it has the reply: the connection ends.
        let mut rest = Vec::new();
        agent.read_to_end(&mut rest).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let end = Instant::now() + Duration::from_secs(5);
        while !exited(pid) {
            assert!(Instant::now() < end, "reaped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn at_the_deadline_it_thaws_and_waits_for_the_pipe() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let t = Instant::now();
        let w =
            ThawWatchdog::arm(std::os::fd::AsFd::as_fd(&ours), Duration::from_millis(300)).unwrap();
        expect_thaw(&mut agent, false);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(5),
            "{took:?}"
        );
        // Still alive after the deadline (its parent is): the reply is ours to read.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!exited(w.pid));
        let pid = w.pid;
        w.disarm().unwrap();
        assert!(exited(pid));
    }

    #[test]
    fn it_keeps_no_other_descriptor_and_leaves_the_session() {
        // Like a test harness's pipe for virt-snap's stderr: its reader must see EOF once
        // virt-snap is gone, whatever the watchdog does.
        let (ours, _agent) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (mut rd, wr) = UnixStream::pair().unwrap();
        let w =
            ThawWatchdog::arm(std::os::fd::AsFd::as_fd(&ours), Duration::from_secs(30)).unwrap();
        drop(wr);
        rd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).unwrap();
        // The child closes the other descriptors in up to three close_range calls: the EOF
        // above may come from the first, so the count is polled until the last is done.
        let fds = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{}/fd", w.pid))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while fds().len() != 2 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let fds = fds();
        assert_eq!(fds.len(), 2, "the agent socket and the pipe only: {fds:?}");
        // SAFETY: getsid on a pid only reads.
        assert_eq!(unsafe { libc::getsid(w.pid) }, w.pid, "its own session");
        w.disarm().unwrap();
    }

    #[test]
    fn durations_and_deadlines() {
        let t = libc::timespec {
            tv_sec: 10,
            tv_nsec: 900_000_000,
        };
        let u = add(t, Duration::from_millis(250));
        assert_eq!((u.tv_sec, u.tv_nsec), (11, 150_000_000));
        assert_eq!(ms_until(t, u), 250);
        assert_eq!(ms_until(u, t), 0);
        assert_eq!(ms_until(t, add(t, Duration::from_nanos(1))), 1);
        assert_eq!(later(t, u).tv_sec, 11);
        // No overflow, however long the budget.
        assert!(add(t, Duration::MAX).tv_sec > t.tv_sec);
    }
}
