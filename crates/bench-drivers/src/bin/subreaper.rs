//! `subreaper CMD ARGS...`: run CMD with this process as its child subreaper, reaping every
//! process that ends below it at once.
//!
//! PID 1 on the benchmark machines reaps orphans only about once a second, so a daemon that
//! double-forks its children (libvirtd and its QEMUs) sees each child's end up to a second
//! late. Under this program the orphans are reparented here (PR_SET_CHILD_SUBREAPER) and
//! reaped as soon as SIGCHLD arrives.
//!
//! - SIGTERM, SIGINT and SIGHUP are forwarded to CMD.
//! - When CMD exits, leftovers (processes reparented here that still run, e.g. QEMUs that
//!   libvirtd leaves behind by design) get SIGTERM, then SIGKILL after 5 s, and are reaped;
//!   then this program exits with CMD's status (128 + signal when CMD was killed). It never
//!   lingers after CMD, so stopping CMD stops everything that was started below it.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// Grace between SIGTERM and SIGKILL for the leftovers.
const GRACE: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: subreaper CMD [ARGS...]");
        std::process::exit(2);
    };
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER and an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "subreaper: prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // Block the signals we wait for before spawning: none is lost. The child gets the
    // empty mask back before exec (std does not reset it on every spawn path).
    let set = sigset(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    // SAFETY: set is initialised; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut command = Command::new(cmd);
    command.args(rest);
    // SAFETY: the closure only calls sigprocmask, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let empty = sigset(&[]);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("subreaper: cannot run {cmd}: {e}");
            std::process::exit(127);
        }
    };
    let main_pid = child.id() as libc::pid_t;
    // `child` is reaped by the waitpid(-1) loop below, never through std.
    std::mem::forget(child);
    let mut main_status: Option<i32> = None;
    while main_status.is_none() {
        let sig = wait_signal(&set, None);
        match sig {
            Some(libc::SIGCHLD) => reap(main_pid, &mut main_status),
            Some(s) => {
                // SAFETY: kill(2) on our own child (not yet reaped, so the pid is still ours).
                unsafe { libc::kill(main_pid, s) };
            }
            None => {}
        }
        // A SIGCHLD may be coalesced with one that arrived while reaping: reap again.
        reap(main_pid, &mut main_status);
    }
    // CMD is gone: stop whatever is left below us.
    let left = children();
    if !left.is_empty() {
        eprintln!(
            "subreaper: {cmd} exited; stopping {} leftover process(es): {left:?}",
            left.len()
        );
        for &p in &left {
            // SAFETY: p is our child (its parent is us per /proc), unreaped.
            unsafe { libc::kill(p, libc::SIGTERM) };
        }
        let deadline = Instant::now() + GRACE;
        loop {
            reap(main_pid, &mut main_status);
            if no_children() {
                break;
            }
            let now = Instant::now();
            let wait = if now >= deadline {
                // Past the grace: SIGKILL every child each round (orphans may still be
                // reparented here as their parents die).
                for p in children() {
                    // SAFETY: as above.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                Duration::from_millis(100)
            } else {
                deadline - now
            };
            wait_signal(&set, Some(wait));
        }
    }
    let st = main_status.unwrap_or(0);
    let code = if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else if libc::WIFSIGNALED(st) {
        128 + libc::WTERMSIG(st)
    } else {
        1
    };
    std::process::exit(code);
}

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Wait for one of the (blocked) signals in `set`, up to `timeout` (forever when None).
fn wait_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<libc::c_int> {
    // SAFETY: set is initialised; info and ts outlive the calls.
    let r = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        match timeout {
            None => libc::sigwaitinfo(set, &mut info),
            Some(t) => {
                let ts = libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: t.subsec_nanos() as libc::c_long,
                };
                libc::sigtimedwait(set, &mut info, &ts)
            }
        }
    };
    (r > 0).then_some(r)
}

/// Reap every ended child; record CMD's status when it is among them.
fn reap(main_pid: libc::pid_t, main_status: &mut Option<i32>) {
    loop {
        let mut st = 0;
        // SAFETY: waitpid on any child, non-blocking; st outlives the call.
        let p = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if p <= 0 {
            return;
        }
        if p == main_pid {
            *main_status = Some(st);
        }
    }
}

/// Whether we have no children left at all (waitpid says ECHILD).
fn no_children() -> bool {
    // SAFETY: an all-zero siginfo is valid; WNOWAIT leaves any ended child to `reap`.
    let p = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    p < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD)
}

/// Our live children, from /proc (the parent pid field of /proc/PID/stat).
fn children() -> Vec<libc::pid_t> {
    let me = std::process::id() as libc::pid_t;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, ppid.
        let Some(tail) = stat.rsplit_once(')').map(|(_, t)| t) else {
            continue;
        };
        let mut f = tail.split_whitespace();
        let state = f.next();
        let ppid: Option<libc::pid_t> = f.next().and_then(|s| s.parse().ok());
        if ppid == Some(me) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}
