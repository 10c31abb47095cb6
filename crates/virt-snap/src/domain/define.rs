//! Defined domains: libvirt domain XML kept in `<state dir>/domains/NAME.xml` (snapshot-core's
//! [`DefinitionStore`]: `0700` directory, `0600` files, atomic writes), and the glue from a
//! definition to the [`RunSpec`] the runtime starts. See docs/domains.md.

use super::runstate::{self, Status};
use super::spec::{self, DiskBus, DiskDevice, DiskFormat, DiskLease, DiskSpec, DomainKind};
use super::{Domain, RunSpec};
use crate::connection::Connection;
use crate::error::{Error, ErrorKind, Result};
use snapshot_core::domain::{RandomBytes, SourceRef, SystemRandom};
use snapshot_core::{DefinitionStore, DomainDef, DomainName};
use std::path::{Path, PathBuf};

/// The definitions' directory in the state dir.
pub const DOMAINS_SUBDIR: &str = "domains";

fn not_defined(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("domain {name:?} is not defined"),
    )
}

impl Connection {
    pub(crate) fn definitions(&self) -> DefinitionStore {
        DefinitionStore::new(self.state_dir().join(DOMAINS_SUBDIR))
    }

    /// Is `name` defined (its file exists; not read)?
    pub(crate) fn is_defined(&self, name: &str) -> bool {
        DomainName::new(name).is_ok_and(|n| self.definitions().path(&n).exists())
    }

    /// The names of the defined domains, sorted.
    pub(crate) fn defined_names(&self) -> Result<Vec<String>> {
        Ok(self
            .definitions()
            .names()?
            .into_iter()
            .map(|n| n.to_string())
            .filter(|n| spec::check_name(n).is_ok())
            .collect())
    }

    fn read_definition(&self, name: &str) -> Result<Option<DomainDef>> {
        spec::check_name(name)?;
        let n = DomainName::new(name)?;
        Ok(self.definitions().read(&n)?)
    }

    /// Define a domain from libvirt domain XML (`virsh define`): parsed, checked that
    /// virt-snap can run it ([`DomainDef::ensure_runnable`]: the error names each element it
    /// cannot), and stored. Redefining a domain replaces its definition and keeps its UUID
    /// when the new XML has none (a different UUID is refused); for a running domain only
    /// the stored definition changes, the next start uses it. Returns the stored definition.
    pub async fn define(&self, xml: &str) -> Result<DomainDef> {
        let mut generated = false;
        let mut rng = |b: &mut [u8]| {
            generated = true;
            SystemRandom.fill(b);
        };
        let mut def = DomainDef::from_xml_with(xml, &mut rng)
            .map_err(|e| Error::caused_by(format!("invalid domain XML: {e}"), e))?;
        spec::check_name(&def.name)?;
        def.ensure_runnable()?;
        let dom = self.domain(&def.name)?;
        let _op = dom.op_lock("define").await?;
        if let Some(old) = self.read_definition(&def.name)? {
            if generated {
                def.set_uuid(old.uuid);
            } else if def.uuid != old.uuid {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "domain {:?} is already defined with uuid {}",
                        def.name.as_str(),
                        old.uuid
                    ),
                ));
            }
        }
        for other in self.defined_names()? {
            if other == def.name.as_str() {
                continue;
            }
            if self
                .read_definition(&other)
                .ok()
                .flatten()
                .is_some_and(|o| o.uuid == def.uuid)
            {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("domain {other:?} already has uuid {}", def.uuid),
                ));
            }
        }
        // Its disk files are the user's: a snapshot-delete never removes them, whatever they
        // are named (an entry virt-snap made for its own overlay stays).
        let files = self.defined_files(&def).await;
        dom.snapshot_store()?.record_users_files(&files)?;
        self.definitions().save(&def)?;
        Ok(def)
    }

    /// The files `def`'s disks name (a pool volume resolved to its file, where its pool is
    /// defined) and the images below each in its backing chain (read from the headers, where
    /// they can be), as given and canonical.
    async fn defined_files(&self, def: &DomainDef) -> Vec<String> {
        let mut out = Vec::new();
        for d in def.disks() {
            let path = match d.source_ref() {
                Some(SourceRef::File(p)) | Some(SourceRef::Block(p)) => PathBuf::from(p),
                Some(SourceRef::Volume { pool, volume }) => match self.pool(pool) {
                    Ok(p) => match p.volume(volume).path().await {
                        Ok(v) => PathBuf::from(v),
                        Err(_) => continue,
                    },
                    Err(_) => continue,
                },
                None => continue,
            };
            let format = d
                .format()
                .and_then(|f| image_formats::Format::from_name(f).ok());
            let mut chain = vec![path.clone()];
            if let Ok(c) = image_formats::backing_chain(&path, format, Default::default()) {
                chain.extend(c.iter().skip(1).map(|i| PathBuf::from(&i.filename)));
            }
            for p in chain {
                if let Ok(c) = std::fs::canonicalize(&p) {
                    out.push(c.display().to_string());
                }
                out.push(p.display().to_string());
            }
        }
        out.dedup();
        out
    }

    /// The stored definition of domain `name` ([`ErrorKind::NotFound`] if it is not defined).
    pub fn definition(&self, name: &str) -> Result<DomainDef> {
        self.read_definition(name)?.ok_or_else(|| not_defined(name))
    }

    /// The stored definition of `name` as libvirt domain XML (`virsh dumpxml`), unknown
    /// elements and attributes included. For a running domain it is the same: the
    /// definition it was started from, or the one defined since.
    pub fn dumpxml(&self, name: &str) -> Result<String> {
        Ok(self.definition(name)?.to_xml())
    }

    /// Forget domain `name`'s definition (`virsh undefine`) and its run record; refused
    /// with [`ErrorKind::InUse`] while it runs. Returns what it was.
    pub async fn undefine(&self, name: &str) -> Result<DomainDef> {
        let dom = self.domain(name)?;
        let _op = dom.op_lock("undefine").await?;
        let def = self.definition(name)?;
        if let Some(st) = runstate::load(&dom.dir())? {
            let st = dom.refresh(st, true)?;
            if st.status != Status::ShutOff {
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!(
                        "domain {name:?} is running (pid {}): destroy it before undefining it",
                        st.pid
                    ),
                ));
            }
            if let Err(e) = std::fs::remove_dir_all(dom.dir()) {
                return Err(Error::caused_by(
                    format!("cannot remove {}", dom.dir().display()),
                    e,
                ));
            }
        }
        self.definitions().remove(&def.name)?;
        Ok(def)
    }

    /// Start the defined domain `name` (`virsh start`, with `paused`: `--paused`): its
    /// definition becomes a [`RunSpec`] ([`Connection::run_spec`]) and starts like any.
    /// [`ErrorKind::AlreadyExists`] when it runs already.
    pub async fn start_defined(&self, name: &str, paused: bool) -> Result<Domain> {
        let def = self.definition(name)?;
        if let Some(pid) = self.domain(name)?.pid()? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("domain {name:?} is already running (pid {pid})"),
            ));
        }
        let mut spec = self.run_spec(&def).await?;
        spec.paused = paused;
        self.start(&spec).await
    }

    /// What the definition `def` runs: disks resolved (a pool volume to its path and its
    /// lease), formats from `<driver type>`, accelerator, memory, vCPUs, machine, direct
    /// kernel boot, serial file, agent channel, emulator. docs/domains.md has the mapping.
    pub async fn run_spec(&self, def: &DomainDef) -> Result<RunSpec> {
        def.ensure_runnable()?;
        let name = def.name.as_str();
        let mut s = RunSpec::new(name);
        s.uuid = Some(def.uuid.to_string());
        s.definition = Some(def.to_xml());
        s.kind = if def.is_kvm() {
            if let Err(e) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "domain {name:?} is type='kvm' but /dev/kvm cannot be used ({e}); \
                         define it with <domain type='qemu'> to run under TCG"
                    ),
                ));
            }
            DomainKind::Kvm
        } else {
            DomainKind::Tcg
        };
        s.memory_bytes = def.memory_bytes().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("domain {name:?}: memory: unknown unit or too large"),
            )
        })?;
        s.vcpus = def.current_vcpus();
        let ot = &def.os.os_type;
        if let Some(a) = ot.arch.as_deref().filter(|a| *a != "x86_64") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("domain {name:?}: os/type arch='{a}': virt-snap runs x86_64 guests"),
            ));
        }
        if let Some(m) = &ot.machine {
            s.machine = m.clone();
        }
        if let Some(k) = def.kernel_boot() {
            s.kernel = Some(absolute_path("os/kernel", k.kernel)?);
            s.initrd = k
                .initrd
                .map(|p| absolute_path("os/initrd", p))
                .transpose()?;
            s.cmdline = k.cmdline.map(String::from);
        }
        s.serial_file = def
            .serial_file()
            .map(|p| absolute_path("serial source", p))
            .transpose()?;
        s.agent = def.agent_channel().is_some();
        s.emulator = def.emulator().map(PathBuf::from);
        for d in def.disks() {
            s.disks.push(self.disk_spec(d).await?);
        }
        s.validate()?;
        Ok(s)
    }

    async fn disk_spec(&self, d: &snapshot_core::domain::Disk) -> Result<DiskSpec> {
        let t = d.target.dev.as_str();
        let (path, lease, vol_format) = match d.source_ref() {
            None => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "disk {t}: a disk without a <source> (an empty cdrom) is not supported"
                    ),
                ))
            }
            Some(SourceRef::File(p)) | Some(SourceRef::Block(p)) => {
                let p = absolute_path(&format!("disk {t} source"), p)?;
                (p.clone(), DiskLease::file(p), None)
            }
            Some(SourceRef::Volume { pool, volume }) => {
                let vol = self
                    .pool(pool)
                    .map_err(|e| Error::caused_by(format!("disk {t}: pool {pool:?}"), e))?
                    .volume(volume);
                let ctx = |e| Error::caused_by(format!("disk {t}: volume {pool}/{volume}"), e);
                let info = vol.info().await.map_err(ctx)?;
                let lease = DiskLease::volume(&vol).await.map_err(ctx)?;
                (PathBuf::from(info.path), lease, Some(info.format.as_str()))
            }
        };
        let format =
            match d.format().or(vol_format) {
                Some(f) => DiskFormat::parse(f)
                    .map_err(|e| Error::caused_by(format!("disk {t}: {e}"), e))?,
                None => {
                    // No format given: raw, as libvirt assumes, but never a raw view of an image
                    // whose header says otherwise.
                    let info = self.image(&path).info(None).map_err(|e| {
                        Error::caused_by(format!("disk {t}: {}", path.display()), e)
                    })?;
                    let f = info.format().to_string();
                    if f != "raw" {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            format!(
                                "disk {t}: no <driver type=...> given but {} is a {f} image: \
                             name its format in the XML (virt-snap does not probe it)",
                                path.display()
                            ),
                        ));
                    }
                    DiskFormat::Raw
                }
            };
        let mut backing = Vec::new();
        for b in d.backing_chain() {
            let p = match b.source_ref() {
                Some(SourceRef::File(p)) | Some(SourceRef::Block(p)) => {
                    absolute_path(&format!("disk {t} backingStore source"), p)?
                }
                Some(SourceRef::Volume { pool, volume }) => {
                    let vol = self.pool(pool)?.volume(volume);
                    PathBuf::from(vol.path().await.map_err(|e| {
                        Error::caused_by(format!("disk {t}: backing volume {pool}/{volume}"), e)
                    })?)
                }
                None => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("disk {t}: a <backingStore> without a source is not supported"),
                    ))
                }
            };
            backing.push(std::fs::canonicalize(&p).map_err(|e| {
                Error::caused_by(format!("disk {t}: backing image {}", p.display()), e)
            })?);
        }
        let bus = match d.target.bus.as_deref() {
            Some("virtio") => DiskBus::Virtio,
            Some("sata") => DiskBus::Sata,
            Some("scsi") => DiskBus::Scsi,
            None if t.starts_with("vd") => DiskBus::Virtio,
            None if t.starts_with("sd") => DiskBus::Scsi,
            b => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "disk {t}: target bus={}: virt-snap attaches disks on virtio, sata or \
                         scsi (give <target bus=...>)",
                        b.unwrap_or("(none)")
                    ),
                ))
            }
        };
        Ok(DiskSpec {
            path,
            lease,
            format,
            target: t.to_string(),
            bus,
            device: if d.is_cdrom() {
                DiskDevice::Cdrom
            } else {
                DiskDevice::Disk
            },
            readonly: d.readonly || d.is_cdrom(),
            shareable: d.shareable,
            backing,
        })
    }
}

/// `p` from the XML, which must be absolute (as libvirt requires): commands run from any
/// directory.
fn absolute_path(what: &str, p: &str) -> Result<PathBuf> {
    if Path::new(p).is_absolute() {
        Ok(PathBuf::from(p))
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what}: {p:?} is not an absolute path"),
        ))
    }
}
