//! A domain's runtime state in `<state dir>/run/<domain>/`: the record of its QEMU, and how
//! to tell whether that QEMU still runs.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The run directory's subdirectory of the state directory.
pub const RUN_SUBDIR: &str = "run";

/// The record file in a domain's run directory.
pub(crate) const STATE_FILE: &str = "state.json";

/// Whether the recorded QEMU is believed to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Status {
    /// QEMU is being launched (the record of a start that may have been interrupted).
    Starting,
    /// QEMU runs (as far as the last command saw).
    Running,
    /// QEMU has ended; `reason` says how.
    ShutOff,
}

/// How the domain came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// virt-snap started its QEMU.
    Started,
    /// Another tool started its QEMU; virt-snap adopted it (`attach`).
    Attached,
}

/// A disk as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct RunDisk {
    pub target: String,
    pub qdev: String,
    pub source: PathBuf,
    pub readonly: bool,
    /// The top node's name and format, as virt-snap last set them (absent in records of
    /// older versions): with them a disk's top is checked with one `qom-get` instead of a
    /// `query-block`, whose cost grows with the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// The record: written atomically (`0600`) on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct RunState {
    pub name: String,
    pub uuid: Option<String>,
    pub origin: Origin,
    pub status: Status,
    /// For [`Status::ShutOff`]: destroyed, shutdown, from snapshot, crashed, failed.
    pub reason: Option<String>,
    pub pid: u32,
    /// QEMU's start time (`/proc/PID/stat` field 22, clock ticks since boot): a pid reused
    /// by another process has another start time.
    pub start_time: u64,
    pub qmp: PathBuf,
    pub agent: Option<PathBuf>,
    pub destroy_requested: bool,
    pub shutdown_requested: bool,
    /// A snapshot's `--halt` stops it (absent in records of older versions).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub halt_requested: bool,
    pub disks: Vec<RunDisk>,
}

/// A process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub start_time: u64,
}

/// `/proc/PID/stat`'s state (field 3) and start time (field 22); `None` if there is no
/// such process.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3.
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        start_time: f.get(22 - 3)?.parse().ok()?,
    })
}

/// Is the process `pid` that started at `start_time` alive (not a zombie, not a reused pid)?
/// Not `kill(pid, 0)`: an orphaned QEMU that exited stays a zombie until PID 1 reaps it.
pub(crate) fn alive(pid: u32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X'))
}

/// Wait up to `t` until no thread of the ended process `pid` is left exiting. On exit_group
/// the main thread can be a zombie while other threads are still on their way out, and the
/// descriptors (QEMU's leases) close only with the last of them: once this returns `true`,
/// the leases QEMU inherited are free.
pub(crate) fn wait_threads_gone(pid: u32, t: std::time::Duration) -> bool {
    let me = pid.to_string();
    let deadline = std::time::Instant::now() + t;
    loop {
        let exiting = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_str() != Some(me.as_str()));
        if !exiting {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

impl RunState {
    pub fn alive(&self) -> bool {
        alive(self.pid, self.start_time)
    }
}

/// `<state dir>/run/<name>`.
pub(crate) fn run_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(RUN_SUBDIR).join(name)
}

/// Create `dir` (and missing parents) `0700`.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(crate::state::DIR_MODE)
        .create(dir)
        .map_err(|e| Error::caused_by(format!("cannot create {}", dir.display()), e))
}

/// Read the record in `dir`; `None` if there is none.
pub(crate) fn load(dir: &Path) -> Result<Option<RunState>> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::caused_by(
                format!("damaged domain state {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
            .with_kind(ErrorKind::Corrupt)
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::caused_by(
            format!("cannot read {}", path.display()),
            e,
        )),
    }
}

/// Write the record into `dir` atomically: a `0600` temporary file, fsync, rename.
pub(crate) fn save(dir: &Path, st: &RunState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let mut bytes = serde_json::to_vec_pretty(st)
        .map_err(|e| Error::caused_by(format!("cannot write {}", path.display()), e))?;
    bytes.push(b'\n');
    write_private(&path, &bytes)
}

/// Write `bytes` to `path` atomically: a `0600` temporary file beside it, fsync, rename.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let err = |e: std::io::Error| Error::caused_by(format!("cannot write {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// A unix socket path usable with `connect`/`bind` even when `path` is longer than the
/// 107 bytes `sun_path` holds: through `/proc/self/fd/N/` of an `O_PATH` descriptor of its
/// directory (keep the returned descriptor open while using the path).
pub(crate) fn socket_path(path: &Path) -> Result<(PathBuf, Option<OwnedFd>)> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().len() <= 100 {
        return Ok((path.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok((path.to_path_buf(), None));
    };
    let fd = open_dir_path(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name);
    Ok((short, Some(fd)))
}

/// An `O_PATH` descriptor of directory `dir` (close-on-exec).
pub(crate) fn open_dir_path(dir: &Path) -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| Error::caused_by(format!("cannot open {}", dir.display()), e))?;
    Ok(f.into())
}

/// The pid of the process that listens on the unix socket `path` (`SO_PEERCRED`).
pub(crate) fn socket_peer_pid(path: &Path) -> Result<u32> {
    let (p, _keep) = socket_path(path)?;
    let s = std::os::unix::net::UnixStream::connect(&p).map_err(|e| {
        Error::caused_by(
            format!("cannot connect to the QMP socket {}", path.display()),
            e,
        )
    })?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 || cred.pid <= 0 {
        return Err(Error::caused_by(
            format!("cannot learn the pid behind {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_stat_parses_and_we_are_alive() {
        let me = std::process::id();
        let s = proc_stat(me).unwrap();
        assert!(s.start_time > 0);
        assert!(alive(me, s.start_time));
        assert!(
            !alive(me, s.start_time + 1),
            "another start time: pid reused"
        );
        assert!(proc_stat(0).is_none());
    }

    #[test]
    fn records_round_trip_privately() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let st = RunState {
            name: "vm".into(),
            uuid: None,
            origin: Origin::Started,
            status: Status::Running,
            reason: None,
            pid: 1,
            start_time: 2,
            qmp: "/x/qmp.sock".into(),
            agent: None,
            destroy_requested: false,
            shutdown_requested: false,
            halt_requested: false,
            disks: vec![],
        };
        save(d.path(), &st).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(st));
        let mode = std::fs::metadata(d.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(d.path().join(STATE_FILE), "{").unwrap();
        assert_eq!(load(d.path()).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn long_socket_paths_go_through_the_directory_descriptor() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("x".repeat(150));
        std::fs::create_dir(&deep).unwrap();
        let sock = deep.join("s.sock");
        let (p, fd) = socket_path(&sock).unwrap();
        assert!(fd.is_some() && p.as_os_str().len() < 40, "{}", p.display());
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(sock.exists());
        assert_eq!(socket_peer_pid(&sock).unwrap(), std::process::id());
    }
}
