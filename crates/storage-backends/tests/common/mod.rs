//! Helpers shared by the backend tests.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use storage_backends::{
    Backend, CommandRunner, LocalRunner, Output, PoolDef, PoolKind, VolFormat, VolumeSpec,
};

/// Lease manager in its own temporary lockspace.
pub fn locks(dir: &Path) -> locking::LockManager {
    locking::LockManager::local(dir.join("locks")).unwrap()
}

pub fn open(
    kind: PoolKind,
    target: &str,
    runner: Arc<dyn CommandRunner>,
    locks: locking::LockManager,
) -> Box<dyn Backend> {
    storage_backends::open_pool(
        PoolDef {
            name: "p".into(),
            kind,
            target: target.into(),
            thin_pool: None,
        },
        runner,
        locks,
    )
    .unwrap()
}

pub fn local() -> Arc<dyn CommandRunner> {
    Arc::new(LocalRunner)
}

pub fn spec(name: &str, size: u64, format: VolFormat) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        capacity: size,
        format,
        backing: None,
    }
}

/// Write `data` at each offset of a raw file.
pub fn write_raw(path: &Path, offsets: &[u64], data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for &o in offsets {
        f.write_all_at(data, o).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn read_raw(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Write a byte pattern into a qcow2 image with qemu-io (the real QEMU block layer).
pub fn qcow2_write(path: &Path, pattern: u8, off: u64, len: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern} {off} {len}"))
        .arg(path)
        .output()
        .expect("qemu-io (install qemu-utils: `cargo xtask deps`)");
    assert!(out.status.success(), "{out:?}");
}

/// The guest-visible bytes of a qcow2 image (qemu-img convert to raw).
pub fn qcow2_read(path: &Path, off: usize, len: usize) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(tmp.path())
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    std::fs::read(tmp.path()).unwrap()[off..off + len].to_vec()
}

/// Every entry under `dir`, recursively, relative.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Every entry under `dir` with its mode and, for files, its bytes: to check that nothing
/// outside a pool changed.
pub fn tree_with_contents(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    tree(dir)
        .into_iter()
        .map(|p| {
            let full = dir.join(&p);
            let m = std::fs::symlink_metadata(&full).unwrap();
            let data = if m.is_file() {
                std::fs::read(&full).unwrap()
            } else {
                Vec::new()
            };
            (p, m.permissions().mode(), data)
        })
        .collect()
}

/// The permission bits of `path` (not following a link).
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Run one pool operation in a child process (this test binary's `child` test), with
/// `VIRT_SNAP_FAILPOINT=failpoint` (it aborts there) and the umask `umask`. `op` is
/// `revert VOL SNAP`, `snapshot VOL SNAP`, `delete VOL`, `delete-snapshot VOL SNAP` or
/// `create-raw VOL SIZE`. Returns whether the child succeeded.
pub fn run_child(
    kind: PoolKind,
    target: &Path,
    state: &Path,
    op: &[&str],
    failpoint: Option<&str>,
    umask: Option<u32>,
) -> bool {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env("VS_CHILD_KIND", kind.as_str())
        .env("VS_CHILD_TARGET", target)
        .env("VS_CHILD_STATE", state)
        .env("VS_CHILD_OP", op.join("\t"));
    if let Some(f) = failpoint {
        c.env("VIRT_SNAP_FAILPOINT", f);
    }
    if let Some(u) = umask {
        c.env("VS_CHILD_UMASK", format!("{u:o}"));
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if failpoint.is_some() {
        // Aborted at the failpoint: killed by SIGABRT, never finished.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(6), "{out:?}");
        return false;
    }
    assert!(text.contains("CHILD-DONE"), "{out:?}");
    text.contains("CHILD-OK")
}

/// The child side of [`run_child`]: call it from a test named `child`.
pub async fn child_main() {
    let Ok(op) = std::env::var("VS_CHILD_OP") else {
        return;
    };
    if let Ok(u) = std::env::var("VS_CHILD_UMASK") {
        let u = u32::from_str_radix(&u, 8).unwrap();
        // SAFETY: plain umask; this child runs this one test on one thread.
        unsafe { libc::umask(u as libc::mode_t) };
    }
    let kind = PoolKind::parse(&std::env::var("VS_CHILD_KIND").unwrap()).unwrap();
    let target = std::env::var("VS_CHILD_TARGET").unwrap();
    let state = std::env::var("VS_CHILD_STATE").unwrap();
    let pool = open(kind, &target, local(), locks(Path::new(&state)));
    let a: Vec<&str> = op.split('\t').collect();
    let r = match a.as_slice() {
        ["revert", v, s] => pool.revert_snapshot(v, s).await,
        ["snapshot", v, s] => pool
            .create_snapshot(v, s, &Default::default())
            .await
            .map(|_| ()),
        ["delete", v] => pool.delete_volume(v).await,
        ["delete-snapshot", v, s] => pool.delete_snapshot(v, s).await,
        ["create-raw", v, n] => pool
            .create_volume(&spec(v, n.parse().unwrap(), VolFormat::Raw))
            .await
            .map(|_| ()),
        ["create-qcow2", v, n] => pool
            .create_volume(&spec(v, n.parse().unwrap(), VolFormat::Qcow2))
            .await
            .map(|_| ()),
        other => panic!("unknown child op {other:?}"),
    };
    match r {
        Ok(()) => println!("CHILD-OK"),
        Err(e) => println!("CHILD-ERR {e}"),
    }
    println!("CHILD-DONE");
}

/// Serialises the tests of one test binary. A process spawned by one test (qemu-io, a
/// child) holds copies of every descriptor of the process between its fork and exec,
/// including another test's lease fds: a lease just released can then still look held for
/// a moment. Tests that take leases one after the other hold this.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs tools inside a guest through the QEMU guest agent (`guest-exec`), connecting to the
/// agent's socket for each command (QEMU's chardev serves one client at a time).
#[derive(Debug, Clone)]
pub struct QgaRunner {
    socket: std::path::PathBuf,
    timeout: std::time::Duration,
}

impl QgaRunner {
    /// A runner on the guest agent socket `socket`; each command may take up to 120 s.
    pub fn new(socket: impl Into<std::path::PathBuf>) -> QgaRunner {
        QgaRunner {
            socket: socket.into(),
            timeout: std::time::Duration::from_secs(120),
        }
    }
    /// Allow each command `t`.
    pub fn timeout(mut self, t: std::time::Duration) -> Self {
        self.timeout = t;
        self
    }
}

#[async_trait::async_trait]
impl CommandRunner for QgaRunner {
    async fn run(&self, cmd: &storage_backends::ToolCmd) -> storage_backends::Result<Output> {
        let argv = cmd.argv();
        let io = |e: qmp_proto::Error| {
            storage_backends::Error::new(
                storage_backends::ErrorKind::Io,
                format!(
                    "guest agent {}: `{}`: {e}",
                    self.socket.display(),
                    argv.join(" ")
                ),
            )
            .with_source(e)
        };
        let mut agent =
            qmp_proto::QgaClient::connect_unix(&self.socket, std::time::Duration::from_secs(10))
                .await
                .map_err(io)?;
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = agent.exec(&refs, None, self.timeout).await.map_err(io)?;
        Ok(Output {
            status: out.exit_code.filter(|_| out.signal.is_none()),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
    fn is_local(&self) -> bool {
        false
    }
}
