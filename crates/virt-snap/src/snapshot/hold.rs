//! The manual hold: a domain left paused after a snapshot with `snapshot='manual'` disks, so
//! that the user snapshots those disks by other means, then resumes it (`virt-snap resume`);
//! at the latest at the hold's deadline it is resumed without them.
//!
//! The hold is a file in the domain's run directory, `manual-hold-<token>.json` (0600): the
//! snapshot, its manual disks and the deadline. [`arm`] writes it and forks the resumer, a
//! child that outlives virt-snap: it sleeps until the deadline (`CLOCK_MONOTONIC`), and if
//! its hold file still exists (nobody resumed the domain meanwhile), connects to the domain's
//! QMP socket, sends `qmp_capabilities` and `cont`, waits for both replies and removes the
//! file. A resume by the user removes every hold file first, so a later resumer does
//! nothing; the token keeps the resumer of an older hold from ending a newer one.
//!
//! Like the thaw watchdog (`watchdog.rs`), the child is forked from a multi-threaded process
//! and calls only async-signal-safe functions on values prepared before the fork: no
//! allocation, no lock, errors end in `_exit`.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::watchdog::{add, child_poll, errno, monotonic_now, reap_in_background};

/// A hold, as its file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ManualHold {
    /// The snapshot whose manual disks the user snapshots.
    pub snapshot: String,
    /// Those disks' targets.
    pub disks: Vec<String>,
    /// When the domain is resumed at the latest (seconds since the epoch).
    pub until: u64,
}

const PREFIX: &str = "manual-hold-";

/// How long the resumer waits for the monitor (another client may hold it) and for replies.
const MONITOR_WAIT_MS: i32 = 30_000;

fn hold_files(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(PREFIX) && n.ends_with(".json")
        })
        .map(|e| e.path())
        .collect()
}

/// The holds in force on the domain whose run directory is `run_dir` (normally at most one).
pub(crate) fn current(run_dir: &Path) -> Vec<ManualHold> {
    hold_files(run_dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// Ends every hold of the domain (before its vCPUs are resumed).
pub(crate) fn clear(run_dir: &Path) -> Result<()> {
    for p in hold_files(run_dir) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::caused_by(format!("cannot end {}", p.display()), e)),
        }
    }
    Ok(())
}

/// Records the hold in `run_dir` and forks its resumer, which resumes the domain over `qmp`
/// after `hold` unless the hold has ended by then.
pub(crate) fn arm(
    run_dir: &Path,
    qmp: &Path,
    snapshot: &str,
    disks: &[String],
    hold: Duration,
) -> Result<ManualHold> {
    use std::os::unix::fs::OpenOptionsExt;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let rec = ManualHold {
        snapshot: snapshot.to_string(),
        disks: disks.to_vec(),
        until: (now + hold).as_secs(),
    };
    let token = format!("{:x}{:x}", now.as_nanos(), std::process::id());
    let path = run_dir.join(format!("{PREFIX}{token}.json"));
    let body = serde_json::to_vec(&rec).expect("plain data");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&body)?;
        f.sync_all()
    };
    write().map_err(|e| Error::caused_by(format!("cannot record {}", path.display()), e))?;
    let undo = |e: Error| {
        let _ = std::fs::remove_file(&path);
        e
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| undo(Error::caused_by("hold file path", e)))?;
    let addr = sockaddr(qmp).map_err(undo)?;
    let deadline = monotonic_now()
        .map(|now| add(now, hold))
        .map_err(|e| undo(Error::caused_by("clock", e)))?;
    // SAFETY: the child runs only `resume_at`, async-signal-safe calls on the values
    // prepared above, and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(undo(Error::caused_by(
            "cannot start the process that ends the manual hold",
            std::io::Error::last_os_error(),
        ))),
        0 => resume_at(&c_path, &addr, deadline),
        pid => {
            tracing::debug!(pid, ?hold, "manual hold armed");
            reap_in_background(pid);
            Ok(rec)
        }
    }
}

fn sockaddr(qmp: &Path) -> Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = qmp.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("QMP socket path too long: {}", qmp.display()),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok(a)
}

// Everything below runs in the forked child: async-signal-safe calls only.

/// Does the hold file still exist?
fn held(path: &CString) -> bool {
    // SAFETY: access(2) on a NUL-terminated path prepared before the fork.
    unsafe { libc::access(path.as_ptr(), libc::F_OK) == 0 }
}

/// Reads from `fd` until `want` reply lines (`{"return"` or `{"error"` at a line start) have
/// arrived, for at most [`MONITOR_WAIT_MS`] per read. False on EOF, error or timeout.
fn await_replies(fd: libc::c_int, want: usize) -> bool {
    let mut buf = [0u8; 4096];
    let mut got = 0;
    // The first bytes of the current line (enough to tell a reply).
    let mut head = [0u8; 8];
    let mut head_len = 0;
    while got < want {
        if child_poll(fd, libc::POLLIN, MONITOR_WAIT_MS) & libc::POLLIN == 0 {
            return false;
        }
        // SAFETY: read(2) into a buffer on this stack, at most its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return false;
        }
        for &b in &buf[..n as usize] {
            if b == b'\n' {
                head_len = 0;
            } else if head_len < head.len() {
                head[head_len] = b;
                head_len += 1;
                if head_len == head.len()
                    && (&head == b"{\"return" || head.starts_with(b"{\"error"))
                {
                    got += 1;
                }
            }
        }
    }
    true
}

fn send_all(fd: libc::c_int, mut b: &[u8]) -> bool {
    while !b.is_empty() {
        // SAFETY: send(2) from a live buffer; MSG_NOSIGNAL: a closed peer is EPIPE.
        let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return false;
        }
        b = &b[n as usize..];
    }
    true
}

fn exit(code: libc::c_int) -> ! {
    // SAFETY: _exit(2) ends the child without running the parent's destructors or atexit
    // handlers.
    unsafe { libc::_exit(code) }
}

/// The resumer: sleep until `deadline`, then, if the hold stands, `cont` over QMP.
fn resume_at(hold: &CString, addr: &libc::sockaddr_un, deadline: libc::timespec) -> ! {
    // SAFETY: setsid(2) and close_range(2) on descriptor numbers: the child needs none of
    // the descriptors it inherited (it opens its own socket below).
    unsafe {
        libc::setsid();
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
    }
    // SAFETY: clock_nanosleep(2) with a timespec on this stack.
    while unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &deadline,
            std::ptr::null_mut(),
        )
    } == libc::EINTR
    {}
    if !held(hold) {
        exit(0);
    }
    // SAFETY: socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        exit(1);
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: connect(2) with an address prepared before the fork and its size.
    if unsafe { libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), len) } != 0 {
        // QEMU is gone: nothing to resume, the hold is over.
        // SAFETY: unlink(2) on a NUL-terminated path.
        unsafe { libc::unlink(hold.as_ptr()) };
        exit(0);
    }
    // The greeting comes once QEMU serves this client (after any other client left).
    if child_poll(fd, libc::POLLIN, MONITOR_WAIT_MS) & libc::POLLIN == 0 {
        exit(1);
    }
    // Resumed by the user while this waited for the monitor?
    if !held(hold) {
        exit(0);
    }
    let cmds = b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"cont\"}\n";
    if !send_all(fd, cmds) || !await_replies(fd, 2) {
        exit(1);
    }
    // SAFETY: unlink(2) on a NUL-terminated path.
    unsafe { libc::unlink(hold.as_ptr()) };
    exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_is_recorded_private_listed_and_cleared() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        // No QMP socket: the resumer finds no QEMU at the deadline and ends the hold.
        let qmp = d.path().join("qmp.sock");
        let h = arm(
            d.path(),
            &qmp,
            "s1",
            &["vdb".to_string()],
            Duration::from_secs(3600),
        )
        .unwrap();
        assert_eq!(current(d.path()), vec![h.clone()]);
        let f = hold_files(d.path());
        assert_eq!(f.len(), 1);
        let mode = std::fs::metadata(&f[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        clear(d.path()).unwrap();
        assert!(current(d.path()).is_empty());
    }

    #[test]
    fn the_resumer_ends_a_hold_whose_qemu_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let qmp = d.path().join("qmp.sock");
        arm(d.path(), &qmp, "s1", &[], Duration::from_millis(50)).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !current(d.path()).is_empty() {
            assert!(std::time::Instant::now() < end, "hold not ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
