//! libvirt's domain XML, read and written: [`DomainDef`].
//!
//! [`DomainDef::from_xml`] reads the part of libvirt's `domaincommon.rng` that virt-snap runs
//! into typed fields: the domain `type`, `<name>`, `<uuid>`, `<memory>` and `<currentMemory>`
//! with their units, `<vcpu>`, `<os>` (`<type>`, `<kernel>`, `<initrd>`, `<cmdline>`) and, in
//! `<devices>`, `<emulator>`, every `<disk>` (type, device, driver, source, the
//! `<backingStore>` chain, target, readonly, shareable), every `<serial>` and every
//! `<channel>` (the guest agent's among them). Everything else (other elements, attributes,
//! comments, other devices) is kept verbatim in an [`Extra`] beside the fields of the element
//! it appeared in and written back by [`DomainDef::to_xml`], so nothing is dropped.
//!
//! [`DomainDef::to_xml`] writes libvirt's format: two-space indentation, single-quoted
//! attributes, and libvirt's element order (known and kept elements alike are sorted into the
//! order libvirt writes them, so XML as libvirt writes it comes back byte for byte).
//!
//! Malformed input is an [`ErrorKind::Xml`] error naming the element
//! (a bad name is [`ErrorKind::InvalidName`]); valid XML that
//! virt-snap cannot run is reported by [`DomainDef::check_runnable`], one [`Unsupported`] per
//! element or attribute. No input makes the reader panic.

use crate::error::{Error, ErrorKind, Result};
use crate::name::DomainName;
pub use crate::xmltree::Extra;
use crate::xmltree::{attr_rank, parse_tree, unit_scale, Elem, Out, OutNode, RawXml};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// The largest domain document accepted, in bytes (virsh's limit for an XML file).
pub const MAX_DOMAIN_XML: usize = 10 << 20;

/// The longest attribute value or text accepted, in bytes: far above any path or command
/// line, far below what would make a hostile document expensive.
pub const MAX_VALUE_LEN: usize = 1 << 20;

/// The name of the guest agent's virtio-serial port.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";

/// libvirt's order of the children of `<domain>` (`virDomainDefFormatInternal`).
const DOMAIN_ORDER: &[&str] = &[
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "maxMemory",
    "memory",
    "currentMemory",
    "blkiotune",
    "memtune",
    "memoryBacking",
    "vcpu",
    "vcpus",
    "iothreads",
    "iothreadids",
    "defaultiothread",
    "cputune",
    "numatune",
    "resource",
    "sysinfo",
    "bootloader",
    "bootloader_args",
    "os",
    "idmap",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_lockfailure",
    "pm",
    "perf",
    "devices",
    "seclabel",
    "keywrap",
    "launchSecurity",
];

/// libvirt's order of the children of `<os>`.
const OS_ORDER: &[&str] = &[
    "type",
    "firmware",
    "loader",
    "nvram",
    "init",
    "initarg",
    "initenv",
    "initdir",
    "inituser",
    "initgroup",
    "kernel",
    "initrd",
    "cmdline",
    "shim",
    "dtb",
    "acpi",
    "boot",
    "bootmenu",
    "smbios",
    "bios",
];

/// libvirt's order of the devices.
const DEVICES_ORDER: &[&str] = &[
    "emulator",
    "disk",
    "controller",
    "lease",
    "filesystem",
    "interface",
    "smartcard",
    "serial",
    "parallel",
    "console",
    "channel",
    "input",
    "tpm",
    "graphics",
    "sound",
    "audio",
    "video",
    "hostdev",
    "redirdev",
    "redirfilter",
    "hub",
    "watchdog",
    "memballoon",
    "rng",
    "nvram",
    "panic",
    "shmem",
    "memory",
    "iommu",
    "vsock",
    "crypto",
    "pstore",
];

/// libvirt's order of the children of `<disk>` (`virDomainDiskDefFormat`).
const DISK_ORDER: &[&str] = &[
    "driver",
    "auth",
    "source",
    "backingStore",
    "backenddomain",
    "geometry",
    "blockio",
    "mirror",
    "target",
    "iotune",
    "throttlefilters",
    "readonly",
    "shareable",
    "transient",
    "serial",
    "wwn",
    "vendor",
    "product",
    "encryption",
    "boot",
    "alias",
    "address",
];

/// libvirt's order of the children of `<backingStore>`.
const BACKING_ORDER: &[&str] = &["format", "source", "backingStore"];

/// libvirt's order of the children of a character device (`<serial>`, `<channel>`).
const CHAR_ORDER: &[&str] = &["source", "protocol", "log", "target", "alias", "address"];

/// Top-level elements virt-snap accepts without acting on them (QEMU's defaults apply).
const DOMAIN_IGNORED: &[&str] = &[
    "genid",
    "title",
    "description",
    "metadata",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "pm",
    "resource",
    "seclabel",
];

/// `<os>` children virt-snap accepts without acting on them.
const OS_IGNORED: &[&str] = &["boot", "bootmenu", "smbios", "bios"];

/// Devices virt-snap accepts without acting on them: those libvirt adds to every definition.
const DEVICES_IGNORED: &[&str] = &[
    "controller",
    "input",
    "console",
    "memballoon",
    "audio",
    "panic",
];

/// A domain definition: libvirt's domain XML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDef {
    /// The `type` attribute: `kvm`, or `qemu` for TCG (anything else is kept, and refused by
    /// [`DomainDef::check_runnable`]).
    pub domain_type: String,
    /// `<name>`.
    pub name: DomainName,
    /// `<uuid>`: generated when the document has none.
    pub uuid: Uuid,
    /// `<memory>`: the maximum memory at boot.
    pub memory: MemorySize,
    /// `<currentMemory>`.
    pub current_memory: Option<MemorySize>,
    /// `<vcpu>`: absent means one.
    pub vcpu: Option<Vcpu>,
    /// `<os>`.
    pub os: Os,
    /// `<devices>` (written only when it holds something).
    pub devices: Devices,
    /// Unknown attributes of `<domain>` (`id`, namespaces) and unknown children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// A scaled integer with its `unit` (`<memory unit='KiB'>1048576</memory>`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemorySize {
    /// The number as written.
    pub value: u64,
    /// The `unit` attribute as written; absent means KiB.
    pub unit: Option<String>,
    /// Unknown attributes (`dumpCore`, ...).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl MemorySize {
    /// A size in KiB, as libvirt writes it.
    pub fn kib(value: u64) -> Self {
        MemorySize {
            value,
            unit: Some("KiB".into()),
            extra: Extra::default(),
        }
    }

    /// The size in bytes; `None` for an unknown unit or an overflow (refused when read).
    pub fn bytes(&self) -> Option<u64> {
        self.value
            .checked_mul(unit_scale(self.unit.as_deref().unwrap_or("KiB"))?)
    }
}

/// `<vcpu placement='static' current='1'>2</vcpu>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Vcpu {
    /// The maximum number of vCPUs (the text).
    pub count: u32,
    /// `placement=` (`static`, `auto`).
    pub placement: Option<String>,
    /// `current=`: the vCPUs online at boot, when fewer than `count`.
    pub current: Option<u32>,
    /// Unknown attributes (`cpuset`, ...).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<os>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Os {
    /// `<type arch= machine=>hvm</type>`.
    pub os_type: OsType,
    /// `<kernel>`: the kernel of a direct kernel boot.
    pub kernel: Option<String>,
    /// `<initrd>`.
    pub initrd: Option<String>,
    /// `<cmdline>`: the kernel command line.
    pub cmdline: Option<String>,
    /// Unknown attributes (`firmware`) and children (`<boot>`, `<loader>`, ...).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<os><type arch='x86_64' machine='q35'>hvm</type>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OsType {
    /// The text: `hvm` for a fully virtualised guest.
    pub value: String,
    /// `arch=`.
    pub arch: Option<String>,
    /// `machine=`.
    pub machine: Option<String>,
    /// Unknown attributes.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<devices>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Devices {
    /// `<emulator>`: the QEMU binary.
    pub emulator: Option<String>,
    /// `<disk>` elements, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// `<serial>` elements, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serials: Vec<CharDev>,
    /// `<channel>` elements, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<CharDev>,
    /// Every other device (`<interface>`, `<controller>`, `<graphics>`, ...), verbatim.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl Devices {
    fn is_empty(&self) -> bool {
        self.emulator.is_none()
            && self.disks.is_empty()
            && self.serials.is_empty()
            && self.channels.is_empty()
            && self.extra.is_empty()
    }
}

/// `<disk type='file' device='disk'>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Disk {
    /// The `type` attribute as written: `file` (the default), `block`, `volume`, `network`,
    /// ...
    pub disk_type: Option<String>,
    /// The `device` attribute as written: `disk` (the default), `cdrom`, `floppy`, `lun`.
    pub device: Option<String>,
    /// `<driver name='qemu' type='qcow2'/>`.
    pub driver: Option<DiskDriver>,
    /// `<source>`: absent for an empty cdrom.
    pub source: Option<DiskSource>,
    /// `<backingStore>`: the image below the source (`None`: not given, probed).
    pub backing_store: Option<BackingStore>,
    /// `<target dev='vda' bus='virtio'/>`.
    pub target: DiskTarget,
    /// `<readonly/>`.
    #[serde(default)]
    pub readonly: bool,
    /// `<shareable/>`.
    #[serde(default)]
    pub shareable: bool,
    /// Unknown attributes and children (`<address>`, `<boot>`, `<serial>`, ...).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<driver name='qemu' type='qcow2' cache='none'/>` of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskDriver {
    /// `name=`: `qemu`.
    pub name: Option<String>,
    /// `type=`: the image format (`raw`, `qcow2`, `qed`, ...).
    pub format: Option<String>,
    /// Unknown attributes (`cache`, `discard`, `io`, ...) and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<source>` of a disk or a backing store.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskSource {
    /// `file=` (type `file`).
    pub file: Option<String>,
    /// `dev=` (type `block`).
    pub dev: Option<String>,
    /// `pool=` (type `volume`).
    pub pool: Option<String>,
    /// `volume=` (type `volume`).
    pub volume: Option<String>,
    /// Unknown attributes (`index`, `startupPolicy`, `mode`, `protocol`, ...) and children
    /// (`<seclabel>`, `<host>`, ...).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl DiskSource {
    /// `<source file='PATH'/>`.
    pub fn file(path: impl Into<String>) -> Self {
        DiskSource {
            file: Some(path.into()),
            ..Default::default()
        }
    }
}

/// `<backingStore type='file'><format type='qcow2'/><source file='...'/>...</backingStore>`,
/// or the empty `<backingStore/>` that ends a chain ([`BackingStore::end`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackingStore {
    /// `type=`: as for a disk.
    pub store_type: Option<String>,
    /// `<format type='qcow2'/>`: the image format.
    pub format: Option<String>,
    /// `<source>`.
    pub source: Option<DiskSource>,
    /// The next `<backingStore>` down the chain.
    pub backing_store: Option<Box<BackingStore>>,
    /// Unknown attributes (`index`) and children; unknown attributes of `<format>` are not
    /// kept apart (a `<format>` with more than `type` is kept here whole).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl BackingStore {
    /// `<backingStore/>`: the image above has no backing image.
    pub fn end() -> Self {
        BackingStore::default()
    }

    /// Is this the empty `<backingStore/>` that ends a chain?
    pub fn is_end(&self) -> bool {
        *self == BackingStore::default()
    }

    /// What this entry's source names.
    pub fn source_ref(&self) -> Option<SourceRef<'_>> {
        source_ref(self.store_type.as_deref(), self.source.as_ref())
    }
}

/// `<target dev='vda' bus='virtio'/>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskTarget {
    /// `dev=`: the guest device name, unique in the domain.
    pub dev: String,
    /// `bus=`: `virtio`, `sata`, `scsi`, `ide`, ...
    pub bus: Option<String>,
    /// Unknown attributes (`tray`, `removable`, ...) and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// What a disk's (or backing store's) source names, resolved by its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRef<'a> {
    /// A file (`type='file'`, `<source file=>`).
    File(&'a str),
    /// A block device (`type='block'`, `<source dev=>`).
    Block(&'a str),
    /// A storage pool volume (`type='volume'`, `<source pool= volume=>`).
    Volume {
        /// The pool's name.
        pool: &'a str,
        /// The volume's name in the pool.
        volume: &'a str,
    },
}

fn source_ref<'a>(kind: Option<&str>, src: Option<&'a DiskSource>) -> Option<SourceRef<'a>> {
    let src = src?;
    match kind.unwrap_or("file") {
        "file" => src.file.as_deref().map(SourceRef::File),
        "block" => src.dev.as_deref().map(SourceRef::Block),
        "volume" => Some(SourceRef::Volume {
            pool: src.pool.as_deref()?,
            volume: src.volume.as_deref()?,
        }),
        _ => None,
    }
}

impl Disk {
    /// The disk's type: `file` unless written otherwise.
    pub fn kind(&self) -> &str {
        self.disk_type.as_deref().unwrap_or("file")
    }

    /// The guest device: `disk` unless written otherwise.
    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap_or("disk")
    }

    /// Is it a cdrom?
    pub fn is_cdrom(&self) -> bool {
        self.device() == "cdrom"
    }

    /// The image format (`<driver type=>`).
    pub fn format(&self) -> Option<&str> {
        self.driver.as_ref()?.format.as_deref()
    }

    /// What the source names, resolved by the disk's type; `None` for an empty cdrom, or a
    /// type that is not file, block or volume.
    pub fn source_ref(&self) -> Option<SourceRef<'_>> {
        source_ref(self.disk_type.as_deref(), self.source.as_ref())
    }

    /// The backing chain below the source, top down, without the final `<backingStore/>`.
    pub fn backing_chain(&self) -> impl Iterator<Item = &BackingStore> {
        std::iter::successors(self.backing_store.as_ref(), |b| b.backing_store.as_deref())
            .filter(|b| !b.is_end())
    }

    /// Points the disk at `source` of type `disk_type` (`file`, `block`, `volume`); the
    /// backing chain and the format are left alone.
    pub fn set_source(&mut self, disk_type: &str, source: DiskSource) {
        self.disk_type = Some(disk_type.to_string());
        self.source = Some(source);
    }

    /// Sets the image format (`<driver name='qemu' type=FORMAT/>`).
    pub fn set_format(&mut self, format: &str) {
        let d = self.driver.get_or_insert_with(|| DiskDriver {
            name: Some("qemu".into()),
            ..Default::default()
        });
        d.format = Some(format.to_string());
    }

    /// Replaces the backing chain (`None`: none given; [`BackingStore::end`]: no backing).
    pub fn set_backing_store(&mut self, backing: Option<BackingStore>) {
        self.backing_store = backing;
    }

    /// Puts the overlay `file` of format `format` on top: the current source, its type and
    /// format become the first entry of the backing chain (what a live external snapshot
    /// does to a disk).
    pub fn push_overlay(&mut self, file: &str, format: &str) {
        let below = BackingStore {
            store_type: Some(self.kind().to_string()),
            format: self.format().map(str::to_string),
            source: self.source.take(),
            backing_store: self.backing_store.take().map(Box::new),
            extra: Extra::default(),
        };
        self.disk_type = Some("file".into());
        self.source = Some(DiskSource::file(file));
        self.set_format(format);
        self.backing_store = Some(below);
    }

    /// Puts the overlay `file` of format `format` on top as libvirt's persistent definition
    /// does: a disk whose chain below is not written out (the images' headers name it, and
    /// the chain is read from them at start) only gets the new source and format, so the
    /// definition, and every snapshot's copy of it, stays the same size however deep the
    /// chain grows; a chain the definition writes out is extended ([`Disk::push_overlay`]).
    pub fn put_overlay(&mut self, file: &str, format: &str) {
        if self.backing_store.is_some() {
            return self.push_overlay(file, format);
        }
        self.disk_type = Some("file".into());
        self.source = Some(DiskSource::file(file));
        self.set_format(format);
    }

    /// Undoes [`Disk::push_overlay`]: the first backing image becomes the source again.
    /// Returns the overlay's source, or `None` (and changes nothing) when there is no backing
    /// image.
    pub fn pop_overlay(&mut self) -> Option<DiskSource> {
        let below = self
            .backing_store
            .take_if(|b| !b.is_end() && b.source.is_some())?;
        let top = self.source.take();
        self.disk_type = below.store_type;
        self.source = below.source;
        match (below.format, &mut self.driver) {
            (Some(f), _) => self.set_format(&f),
            (None, Some(d)) => d.format = None,
            (None, None) => {}
        }
        self.backing_store = below.backing_store.map(|b| *b);
        top
    }
}

/// A character device: `<serial>` or `<channel>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CharDev {
    /// The `type` attribute: `file`, `pty`, `null`, `unix`, ...
    pub kind: Option<String>,
    /// `<source>`.
    pub source: Option<CharSource>,
    /// `<target>`.
    pub target: Option<CharTarget>,
    /// Unknown attributes and children (`<log>`, `<alias>`, `<address>`, ...).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

impl CharDev {
    /// The source's path (the file of a file serial, the socket of a unix channel).
    pub fn path(&self) -> Option<&str> {
        self.source.as_ref()?.path.as_deref()
    }

    /// Is it the guest agent's channel (`unix`, virtio target named [`AGENT_CHANNEL`])?
    pub fn is_agent(&self) -> bool {
        self.kind.as_deref() == Some("unix")
            && self.target.as_ref().is_some_and(|t| {
                t.target_type.as_deref() == Some("virtio")
                    && t.name.as_deref() == Some(AGENT_CHANNEL)
            })
    }
}

/// `<source mode='bind' path='...'/>` of a character device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CharSource {
    /// `mode=` (`bind`, `connect`).
    pub mode: Option<String>,
    /// `path=`.
    pub path: Option<String>,
    /// Unknown attributes (`append`, ...) and children.
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// `<target type='virtio' name='...'/>` or `<target port='0'/>` of a character device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CharTarget {
    /// `type=` (`virtio`, `isa-serial`, ...).
    pub target_type: Option<String>,
    /// `port=`.
    pub port: Option<u32>,
    /// `name=`: the virtio-serial port name.
    pub name: Option<String>,
    /// Unknown attributes (`state`, ...) and children (`<model>`).
    #[serde(default, skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra,
}

/// A direct kernel boot: `<os><kernel>`, `<initrd>`, `<cmdline>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelBoot<'a> {
    /// The kernel image.
    pub kernel: &'a str,
    /// The initial ramdisk.
    pub initrd: Option<&'a str>,
    /// The kernel command line.
    pub cmdline: Option<&'a str>,
}

/// Something in a definition that virt-snap cannot run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsupported {
    /// The element or attribute, as a path: `devices/interface`, `os/loader`,
    /// `domain type='xen'`, `disk type='network'`.
    pub element: String,
    /// Why, and which device when it matters.
    pub reason: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.element, self.reason)
    }
}

// ---------------------------------------------------------------------------------------------
// UUIDs.

/// A source of random bytes, for the UUID of a definition that has none.
pub trait RandomBytes {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

impl<F: FnMut(&mut [u8])> RandomBytes for F {
    fn fill(&mut self, buf: &mut [u8]) {
        self(buf)
    }
}

/// Random bytes from std's randomly keyed hasher (keyed from the operating system's random
/// source once per thread), mixed with the time and a counter. Good for unique UUIDs; not a
/// cryptographic generator.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRandom;

impl RandomBytes for SystemRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        for chunk in buf.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            h.write_u128(now);
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            h.write_u32(std::process::id());
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
}

/// A domain's UUID. Read as libvirt reads it (32 hex digits, `-` allowed between bytes,
/// surrounding whitespace ignored), written in the canonical lowercase 8-4-4-4-12 form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Uuid([u8; 16]);

impl Uuid {
    /// The UUID with these bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Uuid(b)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A random (version 4) UUID.
    pub fn new_v4(rng: &mut dyn RandomBytes) -> Self {
        let mut b = [0u8; 16];
        rng.fill(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }

    /// Parses libvirt's spellings; `None` if `s` is not one.
    pub fn parse(s: &str) -> Option<Self> {
        let mut b = [0u8; 16];
        let mut it = s.trim().bytes();
        for byte in &mut b {
            let mut c = it.next()?;
            while c == b'-' {
                c = it.next()?;
            }
            let hi = (c as char).to_digit(16)?;
            let lo = (it.next()? as char).to_digit(16)?;
            *byte = (hi * 16 + lo) as u8;
        }
        it.next().is_none().then_some(Uuid(b))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Uuid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse(s).ok_or_else(|| Error::xml(format!("not a UUID: {s:?}"), None))
    }
}

impl TryFrom<String> for Uuid {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Uuid> for String {
    fn from(u: Uuid) -> String {
        u.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

impl DomainDef {
    /// Reads a domain definition; a missing `<uuid>` is generated with [`SystemRandom`].
    pub fn from_xml(xml: &str) -> Result<Self> {
        DomainDef::from_xml_with(xml, &mut SystemRandom)
    }

    /// Reads a domain definition from bytes, which must be UTF-8.
    pub fn from_xml_bytes(xml: &[u8]) -> Result<Self> {
        let s = std::str::from_utf8(xml).map_err(|e| {
            Error::xml(format!("not UTF-8: {e}"), Some(e.valid_up_to() as u64))
                .in_document("domain XML")
        })?;
        DomainDef::from_xml(s)
    }

    /// Reads a domain definition; a missing `<uuid>` is generated from `rng`.
    pub fn from_xml_with(xml: &str, rng: &mut dyn RandomBytes) -> Result<Self> {
        parse_domain(xml, rng).map_err(|e| e.in_document("domain XML"))
    }
}

fn check_sizes(e: &Elem<'_>) -> Result<()> {
    if let Some((k, _)) = e.attrs.iter().find(|(_, v)| v.len() > MAX_VALUE_LEN) {
        return Err(e.err(format!(
            "attribute {k} is longer than {MAX_VALUE_LEN} bytes"
        )));
    }
    e.elems().try_for_each(check_sizes)
}

fn parse_domain(xml: &str, rng: &mut dyn RandomBytes) -> Result<DomainDef> {
    if xml.len() > MAX_DOMAIN_XML {
        return Err(Error::xml(
            format!(
                "the document is {} bytes long, at most {MAX_DOMAIN_XML} are accepted",
                xml.len()
            ),
            None,
        ));
    }
    let root = parse_tree(xml)?;
    if root.name != "domain" {
        return Err(root.err("the root element must be <domain>"));
    }
    check_sizes(&root)?;
    let domain_type = root
        .opt_attr("type")
        .ok_or_else(|| root.err("needs a type attribute (kvm or qemu)"))?;
    let name_el = root
        .child("name")?
        .ok_or_else(|| root.err("needs a <name>"))?;
    let name = DomainName::new(name_el.text()?)?;
    let uuid = match root.child("uuid")? {
        Some(e) => {
            let t = e.text()?;
            Uuid::parse(&t).ok_or_else(|| e.err(format!("not a UUID: {:?}", t.trim())))?
        }
        None => Uuid::new_v4(rng),
    };
    let memory = parse_size(
        root.child("memory")?
            .ok_or_else(|| root.err("needs a <memory>"))?,
    )?;
    let current_memory = root.child("currentMemory")?.map(parse_size).transpose()?;
    let vcpu = root.child("vcpu")?.map(parse_vcpu).transpose()?;
    let os = parse_os(root.child("os")?.ok_or_else(|| root.err("needs an <os>"))?)?;
    let devices = match root.child("devices")? {
        Some(e) => parse_devices(e)?,
        None => Devices::default(),
    };
    Ok(DomainDef {
        domain_type,
        name,
        uuid,
        memory,
        current_memory,
        vcpu,
        os,
        devices,
        extra: ordered(
            root.extra(
                &["type"],
                &[
                    "name",
                    "uuid",
                    "memory",
                    "currentMemory",
                    "vcpu",
                    "os",
                    "devices",
                ],
            ),
            DOMAIN_ORDER,
        ),
    })
}

/// `extra` with its children in libvirt's order, as [`DomainDef::to_xml`] writes them.
fn ordered(mut extra: Extra, order: &[&str]) -> Extra {
    extra.order_children(order);
    extra
}

fn number<T: std::str::FromStr>(e: &Elem<'_>, text: &str, what: &str) -> Result<T> {
    text.trim()
        .parse()
        .map_err(|_| e.err(format!("not {what}: {:?}", text.trim())))
}

fn parse_size(e: &Elem<'_>) -> Result<MemorySize> {
    let m = MemorySize {
        value: number(e, &e.text_ignoring_attrs()?, "a size")?,
        unit: e.opt_attr("unit"),
        extra: e.extra_attrs(&["unit"]),
    };
    if let Some(u) = &m.unit {
        if unit_scale(u).is_none() {
            return Err(e.err(format!("unknown unit '{u}'")));
        }
    }
    if m.bytes().is_none() {
        return Err(e.err("the size overflows 64 bits of bytes"));
    }
    Ok(m)
}

/// libvirt's order of `<vcpu>`'s attributes.
const VCPU_ATTRS: &[&str] = &["placement", "cpuset", "current"];

fn parse_vcpu(e: &Elem<'_>) -> Result<Vcpu> {
    let v = Vcpu {
        count: number(e, &e.text_ignoring_attrs()?, "a number of vCPUs")?,
        placement: e.opt_attr("placement"),
        current: e
            .attr("current")
            .map(|c| number(e, c, "a number of vCPUs"))
            .transpose()?,
        extra: {
            // Kept in the order they are written back (VCPU_ATTRS first, then the rest as
            // they came), so that reading what we wrote gives the same value.
            let mut x = e.extra_attrs(&["placement", "current"]);
            x.attrs.sort_by_key(|(k, _)| attr_rank(VCPU_ATTRS, k));
            x
        },
    };
    if v.count == 0 {
        return Err(e.err("needs at least one vCPU"));
    }
    if v.current.is_some_and(|c| c == 0 || c > v.count) {
        return Err(e.err(format!("current must be between 1 and {}", v.count)));
    }
    Ok(v)
}

fn opt_text(e: &Elem<'_>, name: &str) -> Result<Option<String>> {
    e.child(name)?.map(Elem::text).transpose()
}

fn parse_os(e: &Elem<'_>) -> Result<Os> {
    let t = e
        .child("type")?
        .ok_or_else(|| e.err("needs a <type> (hvm)"))?;
    Ok(Os {
        os_type: OsType {
            value: t.text_ignoring_attrs()?.trim().to_string(),
            arch: t.opt_attr("arch"),
            machine: t.opt_attr("machine"),
            extra: t.extra_attrs(&["arch", "machine"]),
        },
        kernel: opt_text(e, "kernel")?,
        initrd: opt_text(e, "initrd")?,
        cmdline: opt_text(e, "cmdline")?,
        extra: ordered(
            e.extra(&[], &["type", "kernel", "initrd", "cmdline"]),
            OS_ORDER,
        ),
    })
}

fn parse_devices(e: &Elem<'_>) -> Result<Devices> {
    let mut d = Devices {
        emulator: opt_text(e, "emulator")?.map(|s| s.trim().to_string()),
        extra: ordered(
            e.extra(&[], &["emulator", "disk", "serial", "channel"]),
            DEVICES_ORDER,
        ),
        ..Default::default()
    };
    for c in e.elems() {
        match c.name.as_str() {
            "disk" => {
                let disk = parse_disk(c)?;
                if d.disks.iter().any(|o| o.target.dev == disk.target.dev) {
                    return Err(c.err(format!(
                        "target dev '{}' is used by two disks",
                        disk.target.dev
                    )));
                }
                d.disks.push(disk);
            }
            "serial" => d.serials.push(parse_chardev(c)?),
            "channel" => d.channels.push(parse_chardev(c)?),
            _ => {}
        }
    }
    Ok(d)
}

fn parse_disk_source(e: &Elem<'_>) -> DiskSource {
    DiskSource {
        file: e.opt_attr("file"),
        dev: e.opt_attr("dev"),
        pool: e.opt_attr("pool"),
        volume: e.opt_attr("volume"),
        extra: e.extra(&["file", "dev", "pool", "volume"], &[]),
    }
}

fn parse_disk(e: &Elem<'_>) -> Result<Disk> {
    let t = e
        .child("target")?
        .ok_or_else(|| e.err("needs a <target dev='...'/>"))?;
    let target = DiskTarget {
        dev: t
            .opt_attr("dev")
            .filter(|d| !d.is_empty())
            .ok_or_else(|| t.err("needs a dev attribute"))?,
        bus: t.opt_attr("bus"),
        extra: t.extra(&["dev", "bus"], &[]),
    };
    Ok(Disk {
        disk_type: e.opt_attr("type"),
        device: e.opt_attr("device"),
        driver: e.child("driver")?.map(|d| DiskDriver {
            name: d.opt_attr("name"),
            format: d.opt_attr("type"),
            extra: d.extra(&["name", "type"], &[]),
        }),
        source: e.child("source")?.map(parse_disk_source),
        backing_store: e.child("backingStore")?.map(parse_backing).transpose()?,
        target,
        readonly: e.child("readonly")?.map(Elem::flag).transpose()?.is_some(),
        shareable: e.child("shareable")?.map(Elem::flag).transpose()?.is_some(),
        extra: ordered(
            e.extra(
                &["type", "device"],
                &[
                    "driver",
                    "source",
                    "backingStore",
                    "target",
                    "readonly",
                    "shareable",
                ],
            ),
            DISK_ORDER,
        ),
    })
}

fn parse_backing(e: &Elem<'_>) -> Result<BackingStore> {
    // A <format> with anything but type= stays whole in the extra part.
    let format = e
        .child("format")?
        .filter(|f| f.children.is_empty() && f.attrs.iter().all(|(k, _)| k == "type"))
        .map(|f| {
            f.opt_attr("type")
                .ok_or_else(|| f.err("needs a type attribute"))
        })
        .transpose()?;
    let mut known = vec!["source", "backingStore"];
    if format.is_some() {
        known.push("format");
    }
    Ok(BackingStore {
        store_type: e.opt_attr("type"),
        format,
        source: e.child("source")?.map(parse_disk_source),
        backing_store: e
            .child("backingStore")?
            .map(|b| parse_backing(b).map(Box::new))
            .transpose()?,
        extra: ordered(e.extra(&["type"], &known), BACKING_ORDER),
    })
}

fn parse_chardev(e: &Elem<'_>) -> Result<CharDev> {
    Ok(CharDev {
        kind: e.opt_attr("type"),
        source: e.child("source")?.map(|s| CharSource {
            mode: s.opt_attr("mode"),
            path: s.opt_attr("path"),
            extra: s.extra(&["mode", "path"], &[]),
        }),
        target: e
            .child("target")?
            .map(|t| -> Result<CharTarget> {
                Ok(CharTarget {
                    target_type: t.opt_attr("type"),
                    port: t
                        .attr("port")
                        .map(|p| number(t, p, "a port number"))
                        .transpose()?,
                    name: t.opt_attr("name"),
                    extra: t.extra(&["type", "port", "name"], &[]),
                })
            })
            .transpose()?,
        extra: ordered(e.extra(&["type"], &["source", "target"]), CHAR_ORDER),
    })
}

// ---------------------------------------------------------------------------------------------
// Writing.

fn text_out(name: &'static str, text: &str, attrs: &[(&str, Option<&str>)], extra: &Extra) -> Out {
    let mut o = Out::new(name);
    for (k, v) in attrs {
        o.opt_attr(k, *v);
    }
    o.extra(extra);
    o.nodes.push(OutNode::Text(text.to_string()));
    o
}

fn size_out(name: &'static str, m: &MemorySize) -> Out {
    text_out(
        name,
        &m.value.to_string(),
        &[("unit", m.unit.as_deref())],
        &m.extra,
    )
}

fn disk_source_out(s: &DiskSource) -> Out {
    let mut o = Out::new("source");
    o.opt_attr("file", s.file.as_deref());
    o.opt_attr("dev", s.dev.as_deref());
    o.opt_attr("pool", s.pool.as_deref());
    o.opt_attr("volume", s.volume.as_deref());
    o.extra(&s.extra);
    o
}

fn backing_out(b: &BackingStore) -> Out {
    let mut o = Out::new("backingStore");
    o.opt_attr("type", b.store_type.as_deref());
    if let Some(f) = &b.format {
        let mut fe = Out::new("format");
        fe.opt_attr("type", Some(f));
        o.child(fe);
    }
    if let Some(s) = &b.source {
        o.child(disk_source_out(s));
    }
    if let Some(n) = &b.backing_store {
        o.child(backing_out(n));
    }
    o.extra(&b.extra);
    o.order_children(BACKING_ORDER);
    o
}

fn disk_out(d: &Disk) -> Out {
    let mut o = Out::new("disk");
    o.opt_attr("type", d.disk_type.as_deref());
    o.opt_attr("device", d.device.as_deref());
    if let Some(dr) = &d.driver {
        let mut de = Out::new("driver");
        de.opt_attr("name", dr.name.as_deref());
        de.opt_attr("type", dr.format.as_deref());
        de.extra(&dr.extra);
        o.child(de);
    }
    if let Some(s) = &d.source {
        o.child(disk_source_out(s));
    }
    if let Some(b) = &d.backing_store {
        o.child(backing_out(b));
    }
    let mut t = Out::new("target");
    t.opt_attr("dev", Some(&d.target.dev));
    t.opt_attr("bus", d.target.bus.as_deref());
    t.extra(&d.target.extra);
    o.child(t);
    if d.readonly {
        o.child(Out::new("readonly"));
    }
    if d.shareable {
        o.child(Out::new("shareable"));
    }
    o.extra(&d.extra);
    o.order_children(DISK_ORDER);
    o
}

fn chardev_out(name: &'static str, c: &CharDev) -> Out {
    let mut o = Out::new(name);
    o.opt_attr("type", c.kind.as_deref());
    if let Some(s) = &c.source {
        let mut se = Out::new("source");
        se.opt_attr("mode", s.mode.as_deref());
        se.opt_attr("path", s.path.as_deref());
        se.extra(&s.extra);
        o.child(se);
    }
    if let Some(t) = &c.target {
        let mut te = Out::new("target");
        te.opt_attr("type", t.target_type.as_deref());
        te.opt_attr("port", t.port.map(|p| p.to_string()).as_deref());
        te.opt_attr("name", t.name.as_deref());
        te.extra(&t.extra);
        o.child(te);
    }
    o.extra(&c.extra);
    o.order_children(CHAR_ORDER);
    o
}

impl DomainDef {
    /// Writes the definition as libvirt formats it (`virsh dumpxml`); ends with a newline.
    pub fn to_xml(&self) -> String {
        let mut root = Out::new("domain");
        root.opt_attr("type", Some(&self.domain_type));
        root.text_child("name", &self.name);
        root.text_child("uuid", &self.uuid.to_string());
        root.child(size_out("memory", &self.memory));
        if let Some(c) = &self.current_memory {
            root.child(size_out("currentMemory", c));
        }
        if let Some(v) = &self.vcpu {
            let mut ve = text_out(
                "vcpu",
                &v.count.to_string(),
                &[
                    ("placement", v.placement.as_deref()),
                    ("current", v.current.map(|c| c.to_string()).as_deref()),
                ],
                &v.extra,
            );
            ve.order_attrs(VCPU_ATTRS);
            root.child(ve);
        }
        let mut os = Out::new("os");
        let t = &self.os.os_type;
        os.child(text_out(
            "type",
            &t.value,
            &[
                ("arch", t.arch.as_deref()),
                ("machine", t.machine.as_deref()),
            ],
            &t.extra,
        ));
        for (name, v) in [
            ("kernel", &self.os.kernel),
            ("initrd", &self.os.initrd),
            ("cmdline", &self.os.cmdline),
        ] {
            if let Some(v) = v {
                os.text_child(name, v);
            }
        }
        os.extra(&self.os.extra);
        os.order_children(OS_ORDER);
        root.child(os);
        let d = &self.devices;
        if !d.is_empty() {
            let mut de = Out::new("devices");
            if let Some(e) = &d.emulator {
                de.text_child("emulator", e);
            }
            for disk in &d.disks {
                de.child(disk_out(disk));
            }
            for s in &d.serials {
                de.child(chardev_out("serial", s));
            }
            for c in &d.channels {
                de.child(chardev_out("channel", c));
            }
            de.extra(&d.extra);
            de.order_children(DEVICES_ORDER);
            root.child(de);
        }
        root.extra(&self.extra);
        root.order_children(DOMAIN_ORDER);
        let mut s = String::new();
        root.write(&mut s, 0);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// A snapshot's configuration.

/// Top-level elements that describe a domain without changing what QEMU runs: a difference
/// in them needs no restart.
const DESCRIPTIVE: [&str; 3] = ["description", "title", "metadata"];

impl DomainDef {
    /// Takes `snap`'s configuration (a snapshot's copy of the definition, for a revert):
    /// its type, memory, vCPUs, `<os>`, emulator, serials, channels, other devices and
    /// unknown elements, as libvirt's revert does. Kept from `self`: the name, the UUID and
    /// the disks (a revert moves the snapshot's disks itself; a disk added since stays).
    pub fn take_config_of(&mut self, snap: &DomainDef) {
        self.domain_type = snap.domain_type.clone();
        self.memory = snap.memory.clone();
        self.current_memory = snap.current_memory.clone();
        self.vcpu = snap.vcpu.clone();
        self.os = snap.os.clone();
        self.devices.emulator = snap.devices.emulator.clone();
        self.devices.serials = snap.devices.serials.clone();
        self.devices.channels = snap.devices.channels.clone();
        self.devices.extra = snap.devices.extra.clone();
        self.extra = snap.extra.clone();
    }

    /// What in `self` (a snapshot's configuration) a QEMU started from `running` does not
    /// run as `self` says, so that loading the snapshot into it would need a new QEMU: one
    /// line per difference, empty when none. Disks (which a revert moves itself),
    /// `<currentMemory>` and the descriptive elements (`<description>`, `<title>`,
    /// `<metadata>`) are not compared.
    pub fn restart_differences(&self, running: &DomainDef) -> Vec<String> {
        fn differ(out: &mut Vec<String>, what: &str, snap: String, now: String) {
            if snap != now {
                out.push(format!("{what}: {now} now, {snap} in the snapshot"));
            }
        }
        let mut out = Vec::new();
        differ(
            &mut out,
            "type",
            self.domain_type.clone(),
            running.domain_type.clone(),
        );
        let mib = |d: &DomainDef| match d.memory_bytes() {
            Some(b) if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
            Some(b) => format!("{b} bytes"),
            None => "an unknown size".into(),
        };
        differ(&mut out, "memory", mib(self), mib(running));
        differ(
            &mut out,
            "vcpus",
            self.vcpus().to_string(),
            running.vcpus().to_string(),
        );
        differ(
            &mut out,
            "vcpus online at boot",
            self.current_vcpus().to_string(),
            running.current_vcpus().to_string(),
        );
        if self.os != running.os {
            out.push("os: the boot settings (<os>) differ".into());
        }
        differ(
            &mut out,
            "emulator",
            self.devices
                .emulator
                .clone()
                .unwrap_or_else(|| "the default".into()),
            running
                .devices
                .emulator
                .clone()
                .unwrap_or_else(|| "the default".into()),
        );
        if self.devices.serials != running.devices.serials
            || self.devices.channels != running.devices.channels
        {
            out.push("devices: the <serial> or <channel> devices differ".into());
        }
        if self.devices.extra != running.devices.extra {
            out.push("devices: devices other than disks differ".into());
        }
        // Unknown top-level elements (<cpu>, <features>, <clock>, ...), compared by name.
        let named = |e: &'_ Extra, n: &str| -> Vec<RawXml> {
            e.children
                .iter()
                .filter(|c| c.element_name() == Some(n))
                .cloned()
                .collect()
        };
        let names: BTreeSet<&str> = self
            .extra
            .children
            .iter()
            .chain(&running.extra.children)
            .filter_map(|c| c.element_name())
            .filter(|n| !DESCRIPTIVE.contains(n))
            .collect();
        for n in names {
            if named(&self.extra, n) != named(&running.extra, n) {
                out.push(format!("<{n}> differs"));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// What the runtime needs, and what it cannot do.

impl DomainDef {
    /// The disks, in order.
    pub fn disks(&self) -> &[Disk] {
        &self.devices.disks
    }

    /// The disk with target `dev`.
    pub fn disk(&self, dev: &str) -> Option<&Disk> {
        self.devices.disks.iter().find(|d| d.target.dev == dev)
    }

    /// The disk with target `dev`, to edit (what is changed is what [`DomainDef::to_xml`]
    /// writes).
    pub fn disk_mut(&mut self, dev: &str) -> Option<&mut Disk> {
        self.devices.disks.iter_mut().find(|d| d.target.dev == dev)
    }

    /// The guest agent's channel.
    pub fn agent_channel(&self) -> Option<&CharDev> {
        self.devices.channels.iter().find(|c| c.is_agent())
    }

    /// `<memory>` in bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory.bytes()
    }

    /// `<currentMemory>` in bytes, or `<memory>` when absent.
    pub fn current_memory_bytes(&self) -> Option<u64> {
        self.current_memory.as_ref().unwrap_or(&self.memory).bytes()
    }

    /// The maximum number of vCPUs (1 when `<vcpu>` is absent).
    pub fn vcpus(&self) -> u32 {
        self.vcpu.as_ref().map_or(1, |v| v.count)
    }

    /// The vCPUs online at boot.
    pub fn current_vcpus(&self) -> u32 {
        self.vcpu
            .as_ref()
            .map_or(1, |v| v.current.unwrap_or(v.count))
    }

    /// The direct kernel boot, when `<os><kernel>` is given.
    pub fn kernel_boot(&self) -> Option<KernelBoot<'_>> {
        Some(KernelBoot {
            kernel: self.os.kernel.as_deref()?,
            initrd: self.os.initrd.as_deref(),
            cmdline: self.os.cmdline.as_deref(),
        })
    }

    /// The file of the first file-backed serial console.
    pub fn serial_file(&self) -> Option<&str> {
        self.devices
            .serials
            .iter()
            .find(|s| s.kind.as_deref() == Some("file"))
            .and_then(CharDev::path)
    }

    /// `<emulator>`: the QEMU binary, when given.
    pub fn emulator(&self) -> Option<&str> {
        self.devices.emulator.as_deref()
    }

    /// Is it a KVM domain (`type='kvm'`, as opposed to TCG's `qemu`)?
    pub fn is_kvm(&self) -> bool {
        self.domain_type == "kvm"
    }

    /// Replaces the UUID.
    pub fn set_uuid(&mut self, uuid: Uuid) {
        self.uuid = uuid;
    }

    /// What virt-snap cannot run in this definition, one entry per element or attribute;
    /// `Ok` when it can run all of it. Elements libvirt adds to every definition (controllers,
    /// input devices, the memballoon, `<features>`, `<clock>`, ...) are accepted and left to
    /// QEMU's defaults.
    pub fn check_runnable(&self) -> std::result::Result<(), Vec<Unsupported>> {
        let mut v = Vec::new();
        let mut no = |element: String, reason: String| v.push(Unsupported { element, reason });
        if !matches!(self.domain_type.as_str(), "kvm" | "qemu") {
            no(
                format!("domain type='{}'", self.domain_type),
                "virt-snap runs kvm and qemu (TCG) domains only".into(),
            );
        }
        for raw in &self.extra.children {
            if let Some(n) = raw.element_name().filter(|n| !DOMAIN_IGNORED.contains(n)) {
                no(n.to_string(), "not supported by virt-snap".into());
            }
        }
        if self.os.os_type.value != "hvm" {
            no(
                format!("os/type '{}'", self.os.os_type.value),
                "only hvm guests can be run".into(),
            );
        }
        for (k, val) in &self.os.extra.attrs {
            no(
                format!("os {k}='{val}'"),
                "not supported by virt-snap".into(),
            );
        }
        for raw in &self.os.extra.children {
            if let Some(n) = raw.element_name().filter(|n| !OS_IGNORED.contains(n)) {
                no(format!("os/{n}"), "not supported by virt-snap".into());
            }
        }
        if self.os.kernel.is_none() && (self.os.initrd.is_some() || self.os.cmdline.is_some()) {
            no(
                "os/initrd".into(),
                "an initrd or a cmdline needs a <kernel>".into(),
            );
        }
        for d in &self.devices.disks {
            check_disk(d, &mut no);
        }
        for s in &self.devices.serials {
            match s.kind.as_deref().unwrap_or("pty") {
                "pty" | "null" => {}
                "file" if s.path().is_some() => {}
                "file" => no(
                    "serial type='file' source".into(),
                    "a file serial needs <source path='...'/>".into(),
                ),
                k => no(
                    format!("serial type='{k}'"),
                    "only file, pty and null serial consoles are supported".into(),
                ),
            }
        }
        for c in &self.devices.channels {
            if !c.is_agent() {
                no(
                    format!("channel type='{}'", c.kind.as_deref().unwrap_or("")),
                    "only the guest agent's unix channel is supported".into(),
                );
            } else if c.path().is_none() {
                no(
                    "channel source".into(),
                    "the agent channel needs <source mode='bind' path='...'/>".into(),
                );
            }
        }
        for raw in &self.devices.extra.children {
            if let Some(n) = raw.element_name().filter(|n| !DEVICES_IGNORED.contains(n)) {
                no(format!("devices/{n}"), "not supported by virt-snap".into());
            }
        }
        if v.is_empty() {
            Ok(())
        } else {
            Err(v)
        }
    }

    /// [`DomainDef::check_runnable`] as one [`ErrorKind::Unsupported`] error listing
    /// everything.
    pub fn ensure_runnable(&self) -> Result<()> {
        self.check_runnable().map_err(|v| {
            let list: Vec<String> = v.iter().map(ToString::to_string).collect();
            Error::new(
                ErrorKind::Unsupported,
                format!("domain {}", self.name),
                list.join("; "),
            )
        })
    }
}

fn check_store(
    what: &str,
    dev: &str,
    kind: Option<&str>,
    format: Option<&str>,
    src: Option<&DiskSource>,
    no: &mut impl FnMut(String, String),
) {
    let kind = kind.unwrap_or("file");
    if !matches!(kind, "file" | "block" | "volume") {
        no(
            format!("{what} type='{kind}'"),
            format!("disk {dev}: only file, block and volume disks are supported"),
        );
    } else if src.is_some() && source_ref(Some(kind), src).is_none() {
        let need = match kind {
            "file" => "file=",
            "block" => "dev=",
            _ => "pool= and volume=",
        };
        no(
            format!("{what} source"),
            format!("disk {dev}: a {kind} source needs {need}"),
        );
    }
    if let Some(f) = format.filter(|f| !matches!(*f, "raw" | "qcow2" | "qed")) {
        no(
            format!("{what} format '{f}'"),
            format!("disk {dev}: only raw, qcow2 and qed images are supported"),
        );
    }
}

fn check_disk(d: &Disk, no: &mut impl FnMut(String, String)) {
    let dev = d.target.dev.as_str();
    if !matches!(d.device(), "disk" | "cdrom") {
        no(
            format!("disk device='{}'", d.device()),
            format!("disk {dev}: only disk and cdrom devices are supported"),
        );
    }
    if let Some(n) = d.driver.as_ref().and_then(|dr| dr.name.as_deref()) {
        if n != "qemu" {
            no(
                format!("disk driver name='{n}'"),
                format!("disk {dev}: the driver must be qemu"),
            );
        }
    }
    check_store(
        "disk",
        dev,
        d.disk_type.as_deref(),
        d.format(),
        d.source.as_ref(),
        no,
    );
    if d.source.is_none() && !d.is_cdrom() {
        no(
            "disk source".into(),
            format!("disk {dev}: a disk needs a <source>"),
        );
    }
    for b in d.backing_chain() {
        check_store(
            "disk backingStore",
            dev,
            b.store_type.as_deref(),
            b.format.as_deref(),
            b.source.as_ref(),
            no,
        );
    }
    if let Some(b) = d.target.bus.as_deref() {
        if !matches!(b, "virtio" | "sata" | "scsi" | "ide") {
            no(
                format!("disk target bus='{b}'"),
                format!("disk {dev}: the bus must be virtio, sata, scsi or ide"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_as_libvirt_does() {
        let want = "c7a5fdbd-edaf-9455-926a-d65c16db1809";
        for s in [
            want,
            "c7a5fdbdedaf9455926ad65c16db1809",
            " C7A5FDBD-EDAF-9455-926A-D65C16DB1809\n",
            "c7-a5-fd-bd-ed-af-94-55-92-6a-d6-5c-16-db-18-09",
        ] {
            assert_eq!(Uuid::parse(s).unwrap().to_string(), want, "{s:?}");
        }
        for s in [
            "",
            "c7a5fdbd",
            "c7a5fdbd-edaf-9455-926a-d65c16db18090",
            "c7a5fdbd-edaf-9455-926a-d65c16db180g",
            "c-7a5fdbdedaf9455926ad65c16db1809",
        ] {
            assert!(Uuid::parse(s).is_none(), "{s:?}");
        }
    }

    #[test]
    fn v4_uuids_have_their_version_bits() {
        let mut zero = |b: &mut [u8]| b.fill(0xff);
        let u = Uuid::new_v4(&mut zero);
        assert_eq!(u.to_string(), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let a = Uuid::new_v4(&mut SystemRandom);
        let b = Uuid::new_v4(&mut SystemRandom);
        assert_ne!(a, b);
    }

    #[test]
    fn units() {
        let m = |v, u: &str| MemorySize {
            value: v,
            unit: Some(u.into()),
            extra: Extra::default(),
        };
        assert_eq!(m(1, "KiB").bytes(), Some(1024));
        assert_eq!(m(1, "k").bytes(), Some(1024));
        assert_eq!(m(1, "KB").bytes(), Some(1000));
        assert_eq!(m(2, "G").bytes(), Some(2 << 30));
        assert_eq!(m(1, "TiB").bytes(), Some(1 << 40));
        assert_eq!(m(3, "bytes").bytes(), Some(3));
        assert_eq!(m(1, "furlong").bytes(), None);
        assert_eq!(m(u64::MAX, "KiB").bytes(), None);
        assert_eq!(
            MemorySize {
                value: 1,
                unit: None,
                extra: Extra::default()
            }
            .bytes(),
            Some(1024)
        );
    }
}
