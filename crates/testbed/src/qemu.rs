//! A real QEMU process with disks attached with `-blockdev` and a QMP socket.

use crate::process::{require_tool, run, KillOnDrop};
use crate::{Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "run `cargo xtask deps` (installs QEMU 10.0.2 from bookworm-backports)";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM: for VMs without a guest OS (starts in about 0.1 s).
    Kvm,
    /// TCG: software emulation, for the test guest.
    Tcg,
}

/// Format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2 (created with `qemu-img create -f qcow2`).
    Qcow2,
    /// raw (a sparse file).
    Raw,
}

impl DiskFormat {
    /// The QEMU driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// A disk attached to a [`Qemu`].
#[derive(Debug, Clone)]
pub struct Disk {
    /// The format node's name (also the device id prefix): `<name>` and `<name>-file`.
    pub node_name: String,
    /// The qdev id of the virtio-blk device: `<name>-dev`.
    pub qdev: String,
    /// The image file.
    pub path: PathBuf,
    /// The image format.
    pub format: DiskFormat,
    /// Attached read-only.
    pub read_only: bool,
}

#[derive(Debug, Clone)]
enum DiskSource {
    New { size: u64 },
    Existing(PathBuf),
}

#[derive(Debug, Clone)]
struct DiskSpec {
    name: String,
    format: DiskFormat,
    source: DiskSource,
    read_only: bool,
}

/// Builds a [`Qemu`].
#[derive(Debug, Clone)]
pub struct QemuBuilder {
    accel: Accel,
    memory_mib: u32,
    disks: Vec<DiskSpec>,
    args: Vec<String>,
    dir: Option<PathBuf>,
}

impl Default for QemuBuilder {
    fn default() -> Self {
        QemuBuilder {
            accel: Accel::Kvm,
            memory_mib: 128,
            disks: Vec::new(),
            args: Vec::new(),
            dir: None,
        }
    }
}

impl QemuBuilder {
    /// Choose the accelerator (default KVM).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }
    /// Guest memory in MiB (default 128).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    /// A new disk image of `size` bytes, created in the temporary directory as `<name>.<fmt>`.
    pub fn disk(mut self, name: &str, format: DiskFormat, size: u64) -> Self {
        self.disks.push(DiskSpec {
            name: name.into(),
            format,
            source: DiskSource::New { size },
            read_only: false,
        });
        self
    }
    /// An existing image file.
    pub fn existing_disk(mut self, name: &str, format: DiskFormat, path: &Path) -> Self {
        self.disks.push(DiskSpec {
            name: name.into(),
            format,
            source: DiskSource::Existing(path.to_path_buf()),
            read_only: false,
        });
        self
    }
    /// Attach the last added disk read-only.
    pub fn read_only(mut self) -> Self {
        if let Some(d) = self.disks.last_mut() {
            d.read_only = true;
        }
        self
    }
    /// Extra command-line arguments.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Put sockets, logs and new disks in `dir` instead of a new temporary directory (the
    /// caller owns and removes it).
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Create the disks, start QEMU and wait until its QMP monitor greets.
    pub fn spawn(self) -> Result<Qemu> {
        require_tool("qemu-system-x86_64", INSTALL_HINT)?;
        require_tool("qemu-img", INSTALL_HINT)?;
        if self.accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(Error::msg(
                "/dev/kvm is missing: KVM tests need a machine with KVM (or use Accel::Tcg)",
            ));
        }
        let (tmp, dir) = match &self.dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new().prefix("vs-qemu-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut disks = Vec::new();
        for spec in &self.disks {
            let path = match &spec.source {
                DiskSource::Existing(p) => p.clone(),
                DiskSource::New { size } => {
                    let p = dir.join(format!("{}.{}", spec.name, spec.format.as_str()));
                    run(Command::new("qemu-img")
                        .args(["create", "-q", "-f", spec.format.as_str()])
                        .arg(&p)
                        .arg(size.to_string()))?;
                    p
                }
            };
            disks.push(Disk {
                node_name: spec.name.clone(),
                qdev: format!("{}-dev", spec.name),
                path,
                format: spec.format,
                read_only: spec.read_only,
            });
        }
        let qmp_path = dir.join("qmp.sock");
        let log_path = dir.join("qemu.log");
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", &format!("q35,accel={accel}")])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        for d in &disks {
            let ro = if d.read_only { "on" } else { "off" };
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name={}-file,read-only={ro}",
                escape_opt(&d.path.to_string_lossy()),
                d.node_name
            ));
            cmd.arg("-blockdev").arg(format!(
                "driver={},file={}-file,node-name={},read-only={ro}",
                d.format.as_str(),
                d.node_name,
                d.node_name
            ));
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,drive={},id={}",
                d.node_name, d.qdev
            ));
        }
        cmd.args(&self.args);
        let log = std::fs::File::create(&log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let process = KillOnDrop::spawn(cmd)?;
        let mut qemu = Qemu {
            process,
            qmp_path,
            log_path,
            disks,
            dir,
            args_have_s: self.args.iter().any(|a| a == "-S"),
            _tmp: tmp,
        };
        qemu.wait_for_monitor(Duration::from_secs(30))?;
        Ok(qemu)
    }
}

/// QEMU's option syntax doubles commas inside values.
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// A running QEMU (killed and reaped on drop).
#[derive(Debug)]
pub struct Qemu {
    process: KillOnDrop,
    qmp_path: PathBuf,
    log_path: PathBuf,
    disks: Vec<Disk>,
    dir: PathBuf,
    args_have_s: bool,
    // Dropped last: removes the directory after the process is gone.
    _tmp: Option<tempfile::TempDir>,
}

impl Qemu {
    /// A builder with defaults: KVM, 128 MiB, no disks.
    pub fn builder() -> QemuBuilder {
        QemuBuilder::default()
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp_path
    }

    /// The directory holding the sockets, the log and new disks.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The attached disks, in the order they were added.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The disk whose node name is `name`.
    pub fn disk(&self, name: &str) -> &Disk {
        self.disks
            .iter()
            .find(|d| d.node_name == name)
            .unwrap_or_else(|| panic!("no disk named {name}"))
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// What QEMU printed on stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A new QMP connection (QEMU serves one client at a time on this socket).
    pub async fn qmp(&self) -> Result<qmp_proto::QmpClient> {
        qmp_proto::QmpClient::connect_unix(&self.qmp_path)
            .await
            .map_err(|e| Error(format!("QMP connect to {}: {e}", self.qmp_path.display())))
    }

    /// Has QEMU exited? (reaps it if so)
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.try_wait()
    }

    /// Wait up to `timeout` for QEMU to exit by itself (e.g. after `quit`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_timeout(timeout)
    }

    /// Kill QEMU now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Greeting, negotiation, then `query-status` until the VM has started (or sits in
    /// `prelaunch` under `-S`): QEMU applies some image locks only when the VM starts, after
    /// the greeting.
    fn monitor_ready(&self, s: UnixStream) -> Result<bool> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        if !line.contains("\"QMP\"") {
            return Ok(false);
        }
        let mut ask = |cmd: &str| -> Result<String> {
            writeln!(w, "{{\"execute\":\"{cmd}\"}}")?;
            loop {
                let mut reply = String::new();
                if r.read_line(&mut reply)? == 0 {
                    return Err(Error::msg("QMP closed during start-up"));
                }
                if !reply.contains("\"event\"") {
                    return Ok(reply);
                }
            }
        };
        ask("qmp_capabilities")?;
        let prelaunch_ok = self.args_have_s;
        loop {
            let status = ask("query-status")?;
            if status.contains("\"running\": true")
                || (prelaunch_ok && status.contains("\"prelaunch\""))
            {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_for_monitor(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait() {
                return Err(Error(format!(
                    "QEMU exited during start-up ({status}): {}",
                    self.log().trim()
                )));
            }
            if let Ok(s) = UnixStream::connect(&self.qmp_path) {
                // A failure here (QEMU exiting under us) is judged by the exit check above.
                if let Ok(true) = self.monitor_ready(s) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(Error(format!(
                    "QEMU's QMP monitor did not answer within {timeout:?}: {}",
                    self.log().trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
