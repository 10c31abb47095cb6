//! [`RunSpec`]: what a domain's QEMU runs, in plain Rust (the libvirt XML maps onto it).

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which accelerator the domain runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainKind {
    /// KVM (`<domain type='kvm'>`).
    Kvm,
    /// TCG, software emulation (`<domain type='qemu'>`).
    Tcg,
    /// KVM when `/dev/kvm` can be opened for reading and writing, else TCG.
    #[default]
    Auto,
}

impl DomainKind {
    /// `Auto` resolved on this host.
    pub fn resolve(self) -> DomainKind {
        match self {
            DomainKind::Auto => {
                let ok = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if ok {
                    DomainKind::Kvm
                } else {
                    DomainKind::Tcg
                }
            }
            k => k,
        }
    }
    /// QEMU's accelerator name (`kvm`, `tcg`) of the resolved kind.
    pub fn accel(self) -> &'static str {
        match self.resolve() {
            DomainKind::Kvm => "kvm",
            _ => "tcg",
        }
    }
}

/// A disk image format QEMU opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// raw
    Raw,
    /// qcow2
    Qcow2,
    /// QED
    Qed,
}

impl DiskFormat {
    /// QEMU's driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Qed => "qed",
        }
    }
    /// Parse `raw`, `qcow2` or `qed`.
    pub fn parse(s: &str) -> Result<DiskFormat> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            "qed" => Ok(DiskFormat::Qed),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("disk format {s:?} is not supported (raw, qcow2, qed)"),
            )),
        }
    }
}

/// The bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk (`virtio-blk-pci`).
    #[default]
    Virtio,
    /// SATA on the q35 machine's built-in AHCI controller (`ide-hd`, `ide-cd`).
    Sata,
    /// SCSI on a virtio-scsi controller (`scsi-hd`, `scsi-cd`).
    Scsi,
}

/// What the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskDevice {
    /// A hard disk.
    #[default]
    Disk,
    /// A CD-ROM (read-only; SATA or SCSI).
    Cdrom,
}

/// The lease a disk is protected by: what volume operations lock, so that they are refused
/// while the domain runs. For a file (a plain image or a `dir` pool's volume) it is the file;
/// LVM and btrfs volumes are keyed by UUID by their pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLease(pub(crate) locking::Resource);

impl DiskLease {
    /// The lease of the file (or block device) at `path`.
    pub fn file(path: impl Into<PathBuf>) -> DiskLease {
        DiskLease(locking::Resource::file(path))
    }
}

impl From<locking::Resource> for DiskLease {
    /// The lease of a pool volume: what [`crate::Volume::lease_resource`] returns, the key
    /// every operation on the volume takes.
    fn from(r: locking::Resource) -> DiskLease {
        DiskLease(r)
    }
}

impl DiskLease {
    /// The lease of the pool volume `vol`: the one key every operation on it takes (the
    /// file for a `dir` pool, the subvolume or logical volume for btrfs and LVM).
    pub async fn volume(vol: &crate::Volume) -> Result<DiskLease> {
        Ok(vol.lease_resource().await?.into())
    }
}

impl std::fmt::Display for DiskLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One disk of a [`RunSpec`].
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// The image (file or block device), already resolved (a pool volume resolves to its
    /// path and [`DiskSpec::lease`]).
    pub path: PathBuf,
    /// The lease volume operations on this disk take ([`DiskLease::file`] of `path` for a
    /// file).
    pub lease: DiskLease,
    /// The image format.
    pub format: DiskFormat,
    /// The guest's name for the disk: `vda`, `sdb`, ... (libvirt's target dev). Lowercase
    /// letters and digits.
    pub target: String,
    /// The bus.
    pub bus: DiskBus,
    /// Disk or CD-ROM.
    pub device: DiskDevice,
    /// Attached read-only (a shared lease).
    pub readonly: bool,
    /// Shared with other VMs that write it (`share-rw=on`, a shared lease).
    pub shareable: bool,
    /// Every image below `path` in its backing chain (each gets a shared lease). Empty: read
    /// from the image's headers at start.
    pub backing: Vec<PathBuf>,
}

impl DiskSpec {
    /// A writable virtio disk of `format` at `path` named `target`, leased by its file.
    pub fn file(path: impl Into<PathBuf>, format: DiskFormat, target: &str) -> DiskSpec {
        let path = path.into();
        DiskSpec {
            lease: DiskLease::file(&path),
            path,
            format,
            target: target.into(),
            bus: DiskBus::Virtio,
            device: DiskDevice::Disk,
            readonly: false,
            shareable: false,
            backing: Vec::new(),
        }
    }
    /// The same disk, read-only.
    pub fn read_only(mut self) -> DiskSpec {
        self.readonly = true;
        self
    }
    /// QEMU's node name of the disk's protocol (file) node: `vs-<target>-file`.
    pub fn file_node(&self) -> String {
        format!("vs-{}-file", self.target)
    }
    /// QEMU's node name of the disk's format node: `vs-<target>-fmt`.
    pub fn format_node(&self) -> String {
        format!("vs-{}-fmt", self.target)
    }
    /// The qdev id of the guest device: `vs-<target>`.
    pub fn qdev(&self) -> String {
        format!("vs-{}", self.target)
    }
}

/// What a domain's QEMU runs: [`crate::Connection::start`] takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// The domain's name (letters, digits, `_ - . +`; not starting with `.` or `-`).
    pub name: String,
    /// The domain's UUID; `None`: a random one.
    pub uuid: Option<String>,
    /// KVM, TCG or whichever this host can run.
    pub kind: DomainKind,
    /// Guest memory in bytes (a multiple of 1 MiB).
    pub memory_bytes: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// The machine type (`q35`, `pc`, `pc-q35-10.0`, ...).
    pub machine: String,
    /// Direct kernel boot: the kernel.
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initrd.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the kernel command line.
    pub cmdline: Option<String>,
    /// The first serial port writes to this file.
    pub serial_file: Option<PathBuf>,
    /// The disks, in order.
    pub disks: Vec<DiskSpec>,
    /// A guest agent channel (`org.qemu.guest_agent.0`).
    pub agent: bool,
    /// Start with the vCPUs paused (`-S`).
    pub paused: bool,
    /// The QEMU binary; `None`: `qemu-system-x86_64` from `PATH`.
    pub emulator: Option<PathBuf>,
    /// Arguments appended to QEMU's command line (tests).
    pub extra_args: Vec<String>,
    /// The domain XML this spec was made from ([`crate::Connection::run_spec`]): kept in the
    /// run directory while the domain runs (`live.xml`), so that a snapshot revert knows
    /// what the running QEMU runs even after the definition changed.
    pub definition: Option<String>,
}

impl RunSpec {
    /// A domain `name` with 256 MiB, one vCPU, a q35 machine, no disk.
    pub fn new(name: &str) -> RunSpec {
        RunSpec {
            name: name.into(),
            uuid: None,
            kind: DomainKind::Auto,
            memory_bytes: 256 << 20,
            vcpus: 1,
            machine: "q35".into(),
            kernel: None,
            initrd: None,
            cmdline: None,
            serial_file: None,
            disks: Vec::new(),
            agent: false,
            paused: false,
            emulator: None,
            extra_args: Vec::new(),
            definition: None,
        }
    }

    /// Check what QEMU cannot run or what would be ambiguous, naming the field.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        if let Some(u) = &self.uuid {
            check_uuid(u)?;
        }
        let bad = |m: String| Err(Error::new(ErrorKind::InvalidInput, m));
        if self.memory_bytes == 0 || self.memory_bytes % (1 << 20) != 0 {
            return bad(format!(
                "memory: {} bytes is not a positive multiple of 1 MiB",
                self.memory_bytes
            ));
        }
        if self.vcpus == 0 || self.vcpus > 1024 {
            return bad(format!("vcpus: {} is out of range (1..=1024)", self.vcpus));
        }
        if self.machine.is_empty()
            || !self
                .machine
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(format!("machine type {:?} is not valid", self.machine));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.cmdline.is_some()) {
            return bad("os: an initrd or a kernel command line needs a kernel".into());
        }
        let mut targets = std::collections::BTreeSet::new();
        for d in &self.disks {
            let t = &d.target;
            if t.is_empty()
                || t.len() > 16
                || !t.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return bad(format!(
                    "disk target {t:?}: use lowercase letters and digits, like vda"
                ));
            }
            if !targets.insert(t.clone()) {
                return bad(format!("disk target {t:?} is used twice"));
            }
            if d.device == DiskDevice::Cdrom && d.bus == DiskBus::Virtio {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("disk {t}: a cdrom cannot be on the virtio bus (use sata or scsi)"),
                ));
            }
            if d.path.as_os_str().is_empty() {
                return bad(format!("disk {t}: no source path"));
            }
        }
        Ok(())
    }
}

/// A domain name that is safe as a directory name and in QEMU's `-name guest=`.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "invalid domain name {name:?}: use up to 64 letters, digits and _ - . + \
                 (not starting with . or -)"
            ),
        ))
    }
}

fn check_uuid(u: &str) -> Result<()> {
    let groups: Vec<&str> = u.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("invalid UUID {u:?} (want xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"),
        ))
    }
}

/// A random (version 4) UUID.
pub(crate) fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut b);
    }
    if b == [0; 16] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ ((std::process::id() as u128) << 64);
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `path` made absolute (against the current directory), not resolving symlinks.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uuids() {
        for ok in ["vm1", "a.b-c_d+e", "X"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "a/b", "..", ".x", "-x", "a b", "é", &"x".repeat(65)] {
            assert_eq!(check_name(bad).unwrap_err().kind(), ErrorKind::InvalidInput);
        }
        let u = random_uuid();
        check_uuid(&u).unwrap();
        assert_eq!(&u[14..15], "4");
        assert!(check_uuid("not-a-uuid").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = RunSpec::new("vm");
        s.disks.push(DiskSpec::file("/x", DiskFormat::Raw, "vda"));
        s.disks.push(DiskSpec::file("/y", DiskFormat::Raw, "vda"));
        assert!(s.validate().unwrap_err().to_string().contains("used twice"));
        s.disks[1].target = "Vdb".into();
        assert!(s.validate().unwrap_err().to_string().contains("\"Vdb\""));
        s.disks.pop();
        s.memory_bytes = 1000;
        assert!(s.validate().unwrap_err().to_string().starts_with("memory"));
    }
}
