//! The tiny test guest: a Debian cloud kernel and an initramfs with busybox, the QEMU guest
//! agent and LVM, booted under TCG (see docs/test-guest.md).
//!
//! The image is built by `cargo xtask guest-image` into `target/guest` (or the directory named
//! by `VIRT_SNAP_GUEST_DIR`). [`TestGuest`] boots it in a temporary directory with an ext4 data
//! disk (`/dev/vda`, mounted at `/mnt` in the guest) and any extra raw disks (`/dev/vdb`, ...),
//! and is ready once the guest agent answers `guest-ping`. [`LvmGuest`] adds a raw PV disk and a
//! volume group on it.
//!
//! QEMU's chardev sockets accept one client at a time, so this type keeps no connection open:
//! [`TestGuest::exec`] connects to the agent for each call, and [`TestGuest::agent`] /
//! [`TestGuest::qmp`] hand a new connection to the caller (drop it before calling `exec`, or
//! before code under test connects to the same socket).
//!
//! Boots are CPU-bound under TCG, so a process boots at most one guest per CPU at a time (the
//! others wait for a boot to finish before starting QEMU; the boot timeout starts with QEMU).
//!
//! QEMU is killed and reaped when the guest is dropped (also while a test panics) and gets
//! `PR_SET_PDEATHSIG(SIGKILL)`: it dies with the thread that started it, so start guests on
//! the test's own thread (`#[tokio::test]` does), not in `spawn_blocking`. The temporary
//! directory of a guest whose test process was killed is removed by the next guest's start.

use crate::process::run;
use crate::qemu::{Accel, Disk, DiskFormat, Qemu};
use crate::{Error, Result};
use qmp_proto::{ExecOutput, QgaClient, QmpClient};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How to get the guest image when it is missing.
pub const BUILD_HINT: &str = "run `cargo xtask guest-image`";

/// Default time allowed for a boot until the agent answers (about 5 s is usual under TCG).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time allowed for one command run with [`TestGuest::exec`].
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the guest image is: `$VIRT_SNAP_GUEST_DIR`, else `<workspace>/target/guest`.
/// Fails, saying how to build it, unless it holds `vmlinuz` and `initrd.img`.
pub fn guest_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("VIRT_SNAP_GUEST_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => crate::workspace_root().join("target/guest"),
    };
    check_guest_dir(&dir)
}

/// Check that `dir` holds a built guest image (`vmlinuz` and `initrd.img`); fails with
/// "test guest not built: ... run `cargo xtask guest-image`" otherwise.
pub fn check_guest_dir(dir: &Path) -> Result<PathBuf> {
    for f in ["vmlinuz", "initrd.img"] {
        if !dir.join(f).is_file() {
            return Err(Error(format!(
                "test guest not built: {} is missing: {BUILD_HINT}",
                dir.join(f).display()
            )));
        }
    }
    Ok(dir.to_path_buf())
}

/// Kernel arguments that shorten a TCG boot by about 0.5 s and change nothing the tests look
/// at: no crypto self-tests, no TSC watchdog or timer check, no CPU-bug mitigations (fewer code
/// patches, which are slow under TCG).
const BOOT_SPEEDUPS: &[&str] = &[
    "cryptomgr.notests",
    "tsc=reliable",
    "no_timer_check",
    "mitigations=off",
];

/// What booting the test guest directly takes (QEMU `-kernel/-initrd/-append`, or a domain
/// XML's `os/kernel`, `os/initrd`, `os/cmdline`).
#[derive(Debug, Clone)]
pub struct GuestBoot {
    /// The kernel: the uncompressed one where the image has it (it boots with PVH, skipping
    /// the bzImage's decompression under TCG, about 1.4 s), else the bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line: serial console, panic reboots (QEMU runs with -no-reboot),
    /// and the boot speed-ups.
    pub cmdline: String,
}

impl GuestBoot {
    /// The boot files of the guest image in `dir` (see [`guest_dir`]).
    pub fn from_dir(dir: &Path) -> GuestBoot {
        let kernel = match dir.join("vmlinux") {
            k if k.is_file() => k,
            _ => dir.join("vmlinuz"),
        };
        let cmdline = ["console=ttyS0", "panic=-1"]
            .iter()
            .chain(BOOT_SPEEDUPS)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        GuestBoot {
            kernel,
            initrd: dir.join("initrd.img"),
            cmdline,
        }
    }
}

/// Create the guest's data disk at `path`: a raw file of `bytes` with the ext4 file system
/// (label `vs-data`) its /init mounts at /mnt from /dev/vda.
pub fn make_data_disk(path: &Path, bytes: u64) -> Result<()> {
    crate::require_tool("mkfs.ext4", "run `cargo xtask deps` (installs e2fsprogs)")?;
    std::fs::File::create(path)?.set_len(bytes)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vs-data"])
        .arg(path))
    .map(drop)
}

/// Prefix of the guests' temporary directories (in the system's temporary directory).
const DIR_PREFIX: &str = "vs-guest-";

/// Remove guest directories left by test processes that were killed (their QEMU died with
/// them, PR_SET_PDEATHSIG): each directory has an `owner` file with the owner's pid.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(e.path().join("owner")) else {
            continue; // being created, or not ours
        };
        let alive = owner.trim().parse::<u32>().is_ok_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
        });
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Limits how many guests of this process boot at the same time (one per CPU).
fn boot_gate() -> &'static tokio::sync::Semaphore {
    static GATE: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    GATE.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cpus)
    })
}

#[derive(Debug, Clone)]
enum ExtraDisk {
    New(String, DiskFormat, u64),
    Existing(String, DiskFormat, PathBuf),
}

/// Builds a [`TestGuest`].
#[derive(Debug, Clone)]
pub struct TestGuestBuilder {
    memory_mib: u32,
    data_disk_size: u64,
    data_disk_format: DiskFormat,
    disks: Vec<ExtraDisk>,
    boot_timeout: Duration,
    append: Vec<String>,
    qemu_args: Vec<String>,
}

impl Default for TestGuestBuilder {
    fn default() -> Self {
        TestGuestBuilder {
            memory_mib: 256,
            data_disk_size: 64 << 20,
            data_disk_format: DiskFormat::Raw,
            disks: Vec::new(),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            append: Vec::new(),
            qemu_args: Vec::new(),
        }
    }
}

impl TestGuestBuilder {
    /// Guest memory in MiB (default 256; the initramfs alone takes about 45 MiB).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    /// Size of the ext4 data disk `/dev/vda` (node name `data`; default 64 MiB).
    pub fn data_disk_size(mut self, bytes: u64) -> Self {
        self.data_disk_size = bytes;
        self
    }
    /// Format of the ext4 data disk: raw (default) or qcow2 (made with `qemu-img convert`
    /// from the raw ext4 image; needed for internal snapshots such as `snapshot-save`).
    pub fn data_disk_format(mut self, format: DiskFormat) -> Self {
        self.data_disk_format = format;
        self
    }
    /// An extra raw disk of `bytes` (sparse), node name `name`: `/dev/vdb`, `/dev/vdc`, ... in
    /// the order added.
    pub fn raw_disk(mut self, name: &str, bytes: u64) -> Self {
        self.disks
            .push(ExtraDisk::New(name.to_string(), DiskFormat::Raw, bytes));
        self
    }
    /// An extra disk in `format` (created empty, `bytes` long), node name `name`.
    pub fn new_disk(mut self, name: &str, format: DiskFormat, bytes: u64) -> Self {
        self.disks
            .push(ExtraDisk::New(name.to_string(), format, bytes));
        self
    }
    /// An existing image file as an extra disk, node name `name` (the caller keeps the file).
    pub fn existing_disk(mut self, name: &str, format: DiskFormat, path: &Path) -> Self {
        self.disks.push(ExtraDisk::Existing(
            name.to_string(),
            format,
            path.to_path_buf(),
        ));
        self
    }
    /// Time allowed until the agent answers (default 60 s).
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }
    /// Extra kernel command-line words.
    pub fn kernel_arg(mut self, a: impl Into<String>) -> Self {
        self.append.push(a.into());
        self
    }
    /// Extra QEMU command-line arguments.
    pub fn qemu_arg(mut self, a: impl Into<String>) -> Self {
        self.qemu_args.push(a.into());
        self
    }

    /// Create the disks, boot the guest and wait until its agent answers `guest-ping`.
    pub async fn start(self) -> Result<TestGuest> {
        let image = guest_dir()?;
        sweep_stale_dirs();
        let tmp = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("owner"), std::process::id().to_string())?;

        let raw = dir.join("data.raw");
        make_data_disk(&raw, self.data_disk_size)?;
        let data = match self.data_disk_format {
            DiskFormat::Raw => raw,
            DiskFormat::Qcow2 => {
                let q = dir.join("data.qcow2");
                run(Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&q))?;
                std::fs::remove_file(&raw)?;
                q
            }
        };

        let boot = GuestBoot::from_dir(&image);
        let qga_path = dir.join("qga.sock");
        let console_path = dir.join("console.log");
        let mut append = vec![boot.cmdline.clone()];
        append.extend(self.append.iter().cloned());

        let mut b = Qemu::builder()
            .accel(Accel::Tcg)
            .memory_mib(self.memory_mib)
            .in_dir(&dir)
            .existing_disk("data", self.data_disk_format, &data);
        for d in &self.disks {
            b = match d {
                ExtraDisk::New(name, format, size) => b.disk(name, *format, *size),
                ExtraDisk::Existing(name, format, path) => b.existing_disk(name, *format, path),
            };
        }
        b = b
            .arg("-kernel")
            .arg(boot.kernel.to_string_lossy())
            .arg("-initrd")
            .arg(boot.initrd.to_string_lossy())
            .arg("-append")
            .arg(append.join(" "))
            .arg("-no-reboot")
            .arg("-serial")
            .arg(format!("file:{}", console_path.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                qga_path.display()
            ))
            .arg("-device")
            .arg("virtio-serial-pci,id=vser0")
            .arg("-device")
            .arg("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0");
        for a in &self.qemu_args {
            b = b.arg(a.clone());
        }
        // Booting under TCG is CPU-bound: boot at most one guest per CPU at a time (in this
        // process), so that parallel tests do not slow every boot down together.
        let _permit = boot_gate()
            .acquire()
            .await
            .map_err(|e| Error(format!("boot gate: {e}")))?;
        let started = Instant::now();
        let qemu = b.spawn()?;
        let mut guest = TestGuest {
            qemu,
            qga_path,
            console_path,
            boot_time: Duration::ZERO,
            _tmp: tmp,
        };
        guest.wait_ready(started, self.boot_timeout).await?;
        guest.boot_time = started.elapsed();
        Ok(guest)
    }
}

/// A running test guest (QEMU under TCG), killed and reaped on drop.
#[derive(Debug)]
pub struct TestGuest {
    qemu: Qemu,
    qga_path: PathBuf,
    console_path: PathBuf,
    boot_time: Duration,
    // Dropped after `qemu`: removes the directory once QEMU is gone.
    _tmp: tempfile::TempDir,
}

impl TestGuest {
    /// A builder with defaults: 256 MiB, a 64 MiB ext4 data disk, no extra disks.
    pub fn builder() -> TestGuestBuilder {
        TestGuestBuilder::default()
    }

    /// Boot a guest with the defaults.
    pub async fn start() -> Result<TestGuest> {
        Self::builder().start().await
    }

    async fn wait_ready(&mut self, started: Instant, timeout: Duration) -> Result<()> {
        let deadline = started + timeout;
        let mut last_err = String::from("no attempt yet");
        loop {
            if let Some(status) = self.qemu.exited() {
                return Err(Error(format!(
                    "the test guest stopped while booting (QEMU {status}); QEMU said: {}\n\
                     last lines of its console:\n{}",
                    self.qemu.log().trim(),
                    self.console_tail(40)
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error(format!(
                    "the test guest's agent did not answer guest-ping within {timeout:?} \
                     (last error: {last_err}); last lines of its console:\n{}",
                    self.console_tail(40)
                )));
            }
            let t = (deadline - now).min(Duration::from_secs(2));
            match QgaClient::connect_unix(&self.qga_path, t).await {
                Ok(mut c) => match c.ping(t).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last_err = e.to_string(),
                },
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How long the boot took, from starting QEMU to the first `guest-ping` answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// A new connection to the guest agent (one client at a time: drop it when done).
    pub async fn agent(&self) -> Result<QgaClient> {
        QgaClient::connect_unix(&self.qga_path, Duration::from_secs(10))
            .await
            .map_err(|e| Error(format!("guest agent: {e}")))
    }

    /// A new connection to QEMU's QMP monitor (one client at a time: drop it when done).
    pub async fn qmp(&self) -> Result<QmpClient> {
        QmpClient::connect_unix(self.qemu.qmp_path())
            .await
            .map_err(|e| Error(format!("QMP: {e}")))
    }

    /// Run `argv` in the guest through the agent (`guest-exec`), within 60 s.
    /// `PATH` in the guest is `/usr/sbin:/usr/bin:/sbin:/bin`.
    pub async fn exec(&self, argv: &[&str]) -> Result<ExecOutput> {
        self.exec_with(argv, None, DEFAULT_EXEC_TIMEOUT).await
    }

    /// Run `argv` in the guest, feeding `stdin`, within `timeout`.
    pub async fn exec_with(
        &self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let mut agent = self.agent().await?;
        agent
            .exec(argv, stdin, timeout)
            .await
            .map_err(|e| Error(format!("guest-exec {argv:?}: {e}")))
    }

    /// Run `argv` in the guest; fail unless it exits 0. Returns its stdout.
    pub async fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv).await?;
        if !out.success() {
            return Err(Error(format!(
                "in the guest, {argv:?} failed (exit {:?}, signal {:?}): {}{}",
                out.exit_code,
                out.signal,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run a busybox `sh -c SCRIPT` in the guest; fail unless it exits 0. Returns its stdout.
    pub async fn sh(&self, script: &str) -> Result<String> {
        self.exec_ok(&["/bin/sh", "-c", script]).await
    }

    /// The QEMU process (its disks, QMP socket, log).
    pub fn qemu(&self) -> &Qemu {
        &self.qemu
    }

    /// The QEMU process, mutably (to kill it, or wait for it to exit).
    pub fn qemu_mut(&mut self) -> &mut Qemu {
        &mut self.qemu
    }

    /// The temporary directory holding the disks, sockets and logs.
    pub fn dir(&self) -> &Path {
        self.qemu.dir()
    }

    /// QEMU's QMP socket.
    pub fn qmp_path(&self) -> &Path {
        self.qemu.qmp_path()
    }

    /// The guest agent's socket (QEMU's chardev for `org.qemu.guest_agent.0`).
    pub fn qga_path(&self) -> &Path {
        &self.qga_path
    }

    /// The serial console's log file.
    pub fn console_path(&self) -> &Path {
        &self.console_path
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console_path).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the serial console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The ext4 data disk (`/dev/vda` in the guest, mounted at `/mnt`).
    pub fn data_disk(&self) -> &Disk {
        self.qemu.disk("data")
    }

    /// The disk whose node name is `name`.
    pub fn disk(&self, name: &str) -> &Disk {
        self.qemu.disk(name)
    }

    /// The guest's device for the disk whose node name is `name` (`/dev/vda`, `/dev/vdb`, ...).
    pub fn guest_device(&self, name: &str) -> String {
        let i = self
            .qemu
            .disks()
            .iter()
            .position(|d| d.node_name == name)
            .unwrap_or_else(|| panic!("no disk named {name}"));
        format!("/dev/vd{}", (b'a' + i as u8) as char)
    }
}

/// A test guest with a raw PV disk (`/dev/vdb`, node name `pv`) and a volume group on it.
///
/// Dereferences to its [`TestGuest`].
#[derive(Debug)]
pub struct LvmGuest {
    guest: TestGuest,
    vg: String,
}

impl LvmGuest {
    /// Boot a guest with a `pv_size` PV disk and create the volume group `vg` on it
    /// (`pvcreate` + `vgcreate`).
    pub async fn start(vg: &str, pv_size: u64) -> Result<LvmGuest> {
        let guest = TestGuest::builder().raw_disk("pv", pv_size).start().await?;
        let pv = guest.guest_device("pv");
        let lg = LvmGuest {
            guest,
            vg: vg.to_string(),
        };
        lg.lvm(&["pvcreate", "-q", &pv]).await?;
        lg.lvm(&["vgcreate", "-q", vg, &pv]).await?;
        Ok(lg)
    }

    /// The volume group's name.
    pub fn vg(&self) -> &str {
        &self.vg
    }

    /// The guest's PV device (`/dev/vdb`).
    pub fn pv_device(&self) -> String {
        self.guest.guest_device("pv")
    }

    /// The guest.
    pub fn guest(&self) -> &TestGuest {
        &self.guest
    }

    /// Run `lvm ARGS...` in the guest; fail unless it exits 0. Returns its stdout.
    pub async fn lvm(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["lvm"];
        argv.extend_from_slice(args);
        self.guest.exec_ok(&argv).await
    }
}

impl std::ops::Deref for LvmGuest {
    type Target = TestGuest;
    fn deref(&self) -> &TestGuest {
        &self.guest
    }
}
