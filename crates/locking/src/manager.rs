//! The one `acquire` path callers use.

use crate::etcd::Fence;
use crate::lease::{HeldLease, LeaseBackend, LocalBackend};
use crate::qemu::{self, Access, ImageLock};
use crate::record::{Holder, HolderRecord, Mode};
use crate::resource::{Resource, ResourceKey};
use crate::Error;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A disk of a VM about to start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskUse {
    /// The volume.
    pub resource: Resource,
    /// Attached read-only.
    pub read_only: bool,
    /// Attached shareable (several VMs write it, e.g. a cluster filesystem's disk).
    pub shareable: bool,
}

impl DiskUse {
    /// A writable, not shareable disk.
    pub fn writable(resource: Resource) -> DiskUse {
        DiskUse {
            resource,
            read_only: false,
            shareable: false,
        }
    }
    /// A read-only disk.
    pub fn read_only(resource: Resource) -> DiskUse {
        DiskUse {
            resource,
            read_only: true,
            shareable: false,
        }
    }
    /// The lease mode this disk needs.
    pub fn mode(&self) -> Mode {
        if self.read_only || self.shareable {
            Mode::Shared
        } else {
            Mode::Exclusive
        }
    }
    /// The QEMU image locks the QEMU that will open this disk takes.
    fn qemu_access(&self) -> Access {
        use qemu::Permission::*;
        if self.read_only {
            Access::READER
        } else if self.shareable {
            // A device with share-rw=on: QEMU 10.0.2 holds 100 and 101 only.
            Access::new(
                &[ConsistentRead, Write],
                &[ConsistentRead, Write, WriteUnchanged, Resize],
            )
        } else {
            Access::new(
                &[ConsistentRead, Write, Resize],
                &[ConsistentRead, WriteUnchanged],
            )
        }
    }
}

/// Why leases are asked for; this decides the modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Starting a VM: a shared lease for each read-only or shareable disk, an exclusive one
    /// for the others. QEMU's image locks are checked (not held: the QEMU about to start takes
    /// them itself) so that a VM started by another tool is seen.
    VmStart {
        /// The domain's name.
        domain: String,
        /// Its disks.
        disks: Vec<DiskUse>,
    },
    /// Adopting a VM that is already running (started by another tool): the leases of
    /// [`Purpose::VmStart`], for the QEMU `qemu_pid` that has the disks open. QEMU's image
    /// locks are checked as for a start, except that the locks of `qemu_pid` itself (the QEMU
    /// being adopted) are no conflict: only another process holding the images refuses.
    VmAttach {
        /// The domain's name.
        domain: String,
        /// The pid of the running QEMU being adopted.
        qemu_pid: u32,
        /// Its disks.
        disks: Vec<DiskUse>,
    },
    /// An offline operation that modifies volumes: an exclusive lease on each, and QEMU's
    /// image locks ([`Access::WRITER`]) on each that has a file, so that no QEMU opens it for
    /// writing until the operation ends.
    VolumeOp {
        /// What the operation is, e.g. `"snapshot create"`.
        op: String,
        /// The volumes it modifies.
        volumes: Vec<Resource>,
    },
    /// Work on a running domain's behalf, e.g. a storage-level snapshot of its volumes while
    /// its QEMU has them open and paused: the domain's operation lock
    /// ([`Resource::DomainOps`], exclusive, so that operations on one domain never run at
    /// once), and a check that every volume's lease is held by that domain's QEMU (the
    /// recorded holder is `Domain(domain)` with pid `qemu_pid`). No volume lease and no QEMU
    /// image lock is taken: the domain's QEMU holds them. A volume the domain does not hold
    /// is refused with [`crate::ErrorKind::NotHolder`]. With no volumes this is the domain's
    /// operation lock alone (monitor and agent work).
    ForDomain {
        /// The domain's name.
        domain: String,
        /// The pid of the domain's QEMU, which holds its leases.
        qemu_pid: u32,
        /// What the operation is, e.g. `"snapshot create"`.
        op: String,
        /// The volumes it works on.
        volumes: Vec<Resource>,
    },
    /// Read-only inspection of headers: takes nothing.
    Inspect,
}

impl Purpose {
    fn holder(&self) -> Option<Holder> {
        match self {
            Purpose::VmStart { domain, .. } | Purpose::VmAttach { domain, .. } => {
                Some(Holder::Domain(domain.clone()))
            }
            Purpose::VolumeOp { op, .. } => Some(Holder::Operation(op.clone())),
            Purpose::ForDomain { op, .. } => Some(Holder::Operation(op.clone())),
            Purpose::Inspect => None,
        }
    }
}

/// One resource of a request, resolved.
#[derive(Debug)]
struct Item {
    key: ResourceKey,
    mode: Mode,
    /// Hold these image locks (volume operations).
    hold: Option<Access>,
    /// Only check these image locks (VM start).
    check: Option<Access>,
}

/// What [`LockManager::acquire`] took. Dropping it releases everything: QEMU's image locks
/// first, then the leases.
#[derive(Debug)]
pub struct Acquired {
    images: Vec<ImageLock>,
    leases: Vec<Box<dyn HeldLease>>,
    /// The domain's leases found by a [`Purpose::ForDomain`] check, with their tokens: a
    /// commit on the domain's behalf checks them too.
    domain_fences: Vec<Fence>,
    backend: Option<Arc<dyn LeaseBackend>>,
}

impl Acquired {
    /// The leases held, in the order they were taken (sorted by key).
    pub fn leases(&self) -> &[Box<dyn HeldLease>] {
        &self.leases
    }
    /// QEMU's image locks held.
    pub fn image_locks(&self) -> &[ImageLock] {
        &self.images
    }
    /// Release everything now (the same as dropping).
    pub fn release(self) {}

    /// The fencing tokens this covers: each lease's own (cluster backends), and those of the
    /// domain's leases a [`Purpose::ForDomain`] request found. Empty in the local lockspace.
    pub fn fences(&self) -> Vec<Fence> {
        self.leases
            .iter()
            .filter_map(|l| l.token().map(|t| Fence::new(l.key(), t)))
            .chain(self.domain_fences.iter().cloned())
            .collect()
    }

    /// What a keeper process needs to renew these leases after [`Acquired::hand_over`]
    /// (cluster backends; empty in the local lockspace, whose leases live in fds).
    pub fn tickets(&self) -> Vec<crate::etcd::Ticket> {
        self.leases.iter().filter_map(|l| l.ticket()).collect()
    }

    /// Check, atomically with recording it, that every lease [`Acquired::fences`] names is
    /// still current, before committing `what` (metadata, a volume change): refused with
    /// [`crate::ErrorKind::LeaseLost`] when a lease was lost meanwhile (expired while this
    /// process was cut off from the cluster, say), so that nothing is committed.
    pub fn commit(&self, what: &str) -> Result<(), Error> {
        match &self.backend {
            Some(b) => b.commit(&self.fences(), what),
            None => Ok(()),
        }
    }

    /// The fds whose open file descriptions hold the leases and image locks. To make them
    /// live as long as a child process (a VM's QEMU), let the child inherit them (clear
    /// `FD_CLOEXEC` on them between fork and exec), then call [`Acquired::hand_over`].
    pub fn lock_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.leases
            .iter()
            .filter_map(|l| l.lock_fd())
            .chain(self.images.iter().map(|i| i.lock_fd()))
            .collect()
    }

    /// Hand everything over to process `pid`, which inherited [`Acquired::lock_fds`]: the
    /// holder records now name `pid`, and this process lets go of its handles. The leases
    /// and locks stay until `pid` exits (kill -9 included). On an error the rest is released.
    pub fn hand_over(self, pid: u32) -> Result<(), Error> {
        let Acquired { images, leases, .. } = self;
        drop(images);
        let mut result = Ok(());
        for l in leases {
            let r = l.hand_over(pid);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Takes leases and QEMU image locks for a [`Purpose`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LockManager {
    backend: Arc<dyn LeaseBackend>,
    /// Where domains' operation locks live when `backend` is a cluster: they serialise work
    /// on one host's state directory, so they stay on the host (fast, and usable while the
    /// cluster is unreachable).
    ops: Option<Arc<dyn LeaseBackend>>,
    poll: Duration,
}

/// The lockspace directory under a state directory.
pub const LOCKSPACE_SUBDIR: &str = "locks";

impl LockManager {
    /// Leases in the local lockspace directory `dir` (created if missing).
    pub fn local(dir: impl Into<std::path::PathBuf>) -> Result<LockManager, Error> {
        Ok(LockManager::with_backend(Arc::new(LocalBackend::new(dir)?)))
    }

    /// Leases in `<state_dir>/locks`, the default lockspace.
    pub fn for_state_dir(state_dir: &Path) -> Result<LockManager, Error> {
        LockManager::local(state_dir.join(LOCKSPACE_SUBDIR))
    }

    /// Leases in `backend`.
    pub fn with_backend(backend: Arc<dyn LeaseBackend>) -> LockManager {
        LockManager {
            backend,
            ops: None,
            poll: Duration::from_millis(20),
        }
    }

    /// Leases in `cluster` (shared by several hosts), except domains' operation locks, which
    /// are this host's own and live in `local` ([`Resource::DomainOps`]).
    pub fn with_cluster(
        cluster: Arc<dyn LeaseBackend>,
        local: Arc<dyn LeaseBackend>,
    ) -> LockManager {
        LockManager {
            ops: Some(local),
            ..LockManager::with_backend(cluster)
        }
    }

    /// The backend that holds `key`'s lease.
    fn backend_for(&self, key: &ResourceKey) -> &Arc<dyn LeaseBackend> {
        match &self.ops {
            Some(local) if key.is_domain_ops() => local,
            _ => &self.backend,
        }
    }

    /// How often [`LockManager::acquire_timeout`] retries (default 20 ms).
    pub fn poll_interval(mut self, every: Duration) -> LockManager {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// The lease backend.
    pub fn backend(&self) -> &Arc<dyn LeaseBackend> {
        &self.backend
    }

    /// Was `h` written by a holder on this host (always, in a local lockspace)?
    fn is_ours(&self, h: &HolderRecord) -> bool {
        h.token.is_none() || self.backend.host().is_none_or(|me| me == h.host)
    }

    /// The fencing tokens of the leases `domain`'s QEMU `qemu_pid` holds on this host, among
    /// `resources` (those it does not hold are left out). Empty in the local lockspace.
    pub fn domain_fences(
        &self,
        domain: &str,
        qemu_pid: u32,
        resources: &[Resource],
    ) -> Result<Vec<Fence>, Error> {
        let me = Holder::Domain(domain.to_string());
        let mut out = Vec::new();
        for r in resources {
            let key = r.key()?;
            for h in self.backend.holders(&key)? {
                if h.holder == me && h.pid == qemu_pid && self.is_ours(&h) {
                    if let Some(t) = h.token {
                        out.push(Fence::new(&key, t));
                    }
                }
            }
        }
        Ok(out)
    }

    /// [`LeaseBackend::commit`] of `fences` (from [`LockManager::domain_fences`], or recorded
    /// when the domain started): refused with [`crate::ErrorKind::LeaseLost`] when one is
    /// no longer current.
    pub fn commit(&self, fences: &[Fence], what: &str) -> Result<(), Error> {
        self.backend.commit(fences, what)
    }

    /// The known holders of `resource`'s lease.
    pub fn holders(&self, resource: &Resource) -> Result<Vec<HolderRecord>, Error> {
        let key = resource.key()?;
        self.backend_for(&key).holders(&key)
    }

    fn plan(purpose: &Purpose) -> Result<Vec<Item>, Error> {
        let mut items: Vec<Item> = Vec::new();
        let mut add = |item: Item| match items.iter_mut().find(|i| i.key == item.key) {
            // The same volume twice: the stronger mode and access win.
            Some(i) => {
                i.mode = i.mode.max(item.mode);
                i.hold = i.hold.or(item.hold);
                if item.mode == Mode::Exclusive || i.check.is_none() {
                    i.check = item.check.or(i.check);
                }
            }
            None => items.push(item),
        };
        match purpose {
            Purpose::Inspect => {}
            Purpose::ForDomain { domain, .. } => add(Item {
                key: Resource::DomainOps(domain.clone()).key()?,
                mode: Mode::Exclusive,
                hold: None,
                check: None,
            }),
            Purpose::VmStart { disks, .. } | Purpose::VmAttach { disks, .. } => {
                for d in disks {
                    let key = d.resource.key()?;
                    add(Item {
                        mode: d.mode(),
                        hold: None,
                        check: key.image().map(|_| d.qemu_access()),
                        key,
                    });
                }
            }
            Purpose::VolumeOp { volumes, .. } => {
                for r in volumes {
                    let key = r.key()?;
                    add(Item {
                        mode: Mode::Exclusive,
                        hold: key.image().map(|_| Access::WRITER),
                        check: None,
                        key,
                    });
                }
            }
        }
        // One global order, so that two requests for overlapping sets do not keep taking
        // halves from each other.
        items.sort_by_cached_key(|i| i.key.hash());
        Ok(items)
    }

    /// Take everything `purpose` needs, without waiting: all or nothing. A conflict is an
    /// error of kind [`crate::ErrorKind::Conflict`] (a lease; the error names the resource and
    /// its known holders) or [`crate::ErrorKind::ImageInUse`] (QEMU's image locks: a VM or
    /// qemu-img, started by any tool).
    ///
    /// This makes a few non-blocking system calls on local files; from async code prefer
    /// [`LockManager::acquire_timeout`], which runs them off the runtime's threads.
    pub fn acquire(&self, purpose: &Purpose) -> Result<Acquired, Error> {
        self.acquire_inner(purpose, true)
    }

    /// `identify`: on an [`crate::ErrorKind::ImageInUse`] refusal, scan `/proc` for the
    /// processes holding the image's QEMU locks (a few ms; skipped while polling).
    fn acquire_inner(&self, purpose: &Purpose, identify: bool) -> Result<Acquired, Error> {
        let items = LockManager::plan(purpose)?;
        let mut acquired = Acquired {
            images: Vec::new(),
            leases: Vec::new(),
            domain_fences: Vec::new(),
            backend: Some(self.backend.clone()),
        };
        let Some(holder) = purpose.holder() else {
            return Ok(acquired);
        };
        for item in &items {
            acquired.leases.push(
                self.backend_for(&item.key)
                    .try_acquire(&item.key, item.mode, &holder)?,
            );
        }
        if let Purpose::ForDomain {
            domain,
            qemu_pid,
            volumes,
            ..
        } = purpose
        {
            // Under the domain's operation lock: the domain's QEMU must hold each volume.
            let me = Holder::Domain(domain.clone());
            for r in volumes {
                let key = r.key()?;
                let holders = self.backend.holders(&key)?;
                let Some(h) = holders
                    .iter()
                    .find(|h| h.holder == me && h.pid == *qemu_pid && self.is_ours(h))
                else {
                    return Err(Error::not_holder(key.display(), domain, *qemu_pid, holders));
                };
                if let Some(t) = h.token {
                    acquired.domain_fences.push(Fence::new(&key, t));
                }
            }
        }
        // Leases first: a conflict among virt-snap's own holders names the holder. Then QEMU's
        // locks, which also see VMs and tools that take no lease.
        for item in &items {
            // QEMU opens files and block devices, never directories (a btrfs subvolume by
            // path): those only have the lease.
            let Some(image) = item.key.image().filter(|p| !p.is_dir()) else {
                continue;
            };
            let res = match (item.hold, item.check) {
                (Some(access), _) => match ImageLock::acquire(image, access) {
                    Ok(l) => {
                        acquired.images.push(l);
                        Ok(())
                    }
                    // A volume about to be created: no QEMU can have it open yet, and the
                    // lease keeps other virt-snap callers away.
                    Err(e) if e.kind() == crate::ErrorKind::Io && !image.exists() => Ok(()),
                    Err(e) => Err(e),
                },
                (None, Some(access)) => match qemu::check(image, access) {
                    // A volume that does not exist yet has no QEMU locks to check.
                    Err(e) if e.kind() == crate::ErrorKind::Io && !image.exists() => Ok(()),
                    // Adopting a running QEMU: its own locks are expected.
                    Err(e) if e.kind() == crate::ErrorKind::ImageInUse => match purpose {
                        Purpose::VmAttach { qemu_pid, .. } => {
                            let owners = qemu::lock_owners(image);
                            if !owners.is_empty() && owners.iter().all(|o| o.pid == *qemu_pid) {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        }
                        _ => Err(e),
                    },
                    r => r,
                },
                (None, None) => Ok(()),
            };
            if let Err(e) = res {
                // Let go first, so that the records read are other holders' only (say, the
                // VM whose QEMU holds the image, sharing a read-only disk with us).
                drop(acquired);
                let holders = self.backend.holders(&item.key).unwrap_or_default();
                let e = e.with_holders(holders);
                return Err(if identify && e.kind() == crate::ErrorKind::ImageInUse {
                    e.with_owners(qemu::lock_owners(image))
                } else {
                    e
                });
            }
        }
        Ok(acquired)
    }

    /// [`LockManager::acquire`], retrying conflicts until `timeout` has passed. Each attempt
    /// runs on tokio's blocking pool (`spawn_blocking`) and the waits between attempts are
    /// `tokio::time::sleep`, so the runtime's threads are never blocked and dropping the
    /// future cancels the wait. Errors other than conflicts are returned at once; the last
    /// conflict is returned when the time is up, saying how long it waited.
    pub async fn acquire_timeout(
        &self,
        purpose: &Purpose,
        timeout: Duration,
    ) -> Result<Acquired, Error> {
        let start = Instant::now();
        loop {
            let (me, p) = (self.clone(), purpose.clone());
            let attempt = tokio::task::spawn_blocking(move || me.acquire_inner(&p, false))
                .await
                .unwrap_or_else(|e| {
                    Err(Error::io(
                        "acquire (task failed)",
                        "",
                        std::io::Error::other(e.to_string()),
                    ))
                });
            match attempt {
                Err(e) if e.is_conflict() => {
                    let waited = start.elapsed();
                    if waited >= timeout {
                        let e = match (e.kind(), e.path().map(Path::to_path_buf)) {
                            (crate::ErrorKind::ImageInUse, Some(image)) => {
                                let owners =
                                    tokio::task::spawn_blocking(move || qemu::lock_owners(&image))
                                        .await
                                        .unwrap_or_default();
                                e.with_owners(owners)
                            }
                            _ => e,
                        };
                        return Err(e.with_waited(waited));
                    }
                    tokio::time::sleep(self.poll.min(timeout - waited)).await;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::MemoryBackend;
    use crate::ErrorKind;

    fn mgr() -> (LockManager, MemoryBackend) {
        let b = MemoryBackend::new();
        (LockManager::with_backend(Arc::new(b.clone())), b)
    }

    fn uuid(u: &str) -> Resource {
        Resource::Uuid {
            kind: crate::UuidKind::LvmLv,
            uuid: u.into(),
            display: format!("vg0/{u}"),
            image: None,
        }
    }

    #[test]
    fn vm_start_modes_follow_the_disk_flags() {
        let (m, _) = mgr();
        let a = m
            .acquire(&Purpose::VmStart {
                domain: "vm1".into(),
                disks: vec![
                    DiskUse::writable(uuid("a")),
                    DiskUse::read_only(uuid("b")),
                    DiskUse {
                        resource: uuid("c"),
                        read_only: false,
                        shareable: true,
                    },
                ],
            })
            .unwrap();
        let mut modes: Vec<(String, Mode)> = a
            .leases()
            .iter()
            .map(|l| (l.key().display().to_string(), l.mode()))
            .collect();
        modes.sort();
        assert_eq!(
            modes,
            vec![
                ("vg0/a".into(), Mode::Exclusive),
                ("vg0/b".into(), Mode::Shared),
                ("vg0/c".into(), Mode::Shared),
            ]
        );
        // A second VM may share b and c but not a.
        let e = m
            .acquire(&Purpose::VmStart {
                domain: "vm2".into(),
                disks: vec![DiskUse::read_only(uuid("b")), DiskUse::writable(uuid("a"))],
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(
            e.to_string()
                .contains("volume vg0/a in use by domain \"vm1\""),
            "{e}"
        );
        // All or nothing: vm2 kept nothing, so an operation on b only conflicts with vm1.
        let e = m
            .acquire(&Purpose::VolumeOp {
                op: "snapshot".into(),
                volumes: vec![uuid("b")],
            })
            .unwrap_err();
        assert_eq!(e.holders().len(), 1, "{e}");
        drop(a);
        m.acquire(&Purpose::VolumeOp {
            op: "snapshot".into(),
            volumes: vec![uuid("a"), uuid("b"), uuid("a")],
        })
        .unwrap();
    }

    #[test]
    fn work_for_a_domain_needs_its_qemu_to_hold_the_volumes_and_is_serialised() {
        let (m, _) = mgr();
        let me = std::process::id();
        let vm = m
            .acquire(&Purpose::VmStart {
                domain: "vm1".into(),
                disks: vec![DiskUse::writable(uuid("a")), DiskUse::read_only(uuid("b"))],
            })
            .unwrap();
        let for_vm1 = |volumes: Vec<Resource>, pid: u32, domain: &str| Purpose::ForDomain {
            domain: domain.into(),
            qemu_pid: pid,
            op: "snapshot create".into(),
            volumes,
        };
        // A plain volume operation is refused, naming the domain.
        let e = m
            .acquire(&Purpose::VolumeOp {
                op: "snapshot create".into(),
                volumes: vec![uuid("a")],
            })
            .unwrap_err();
        assert!(e.to_string().contains("domain \"vm1\""), "{e}");
        // The domain's own path succeeds, taking no volume lease.
        let op = m
            .acquire(&for_vm1(vec![uuid("a"), uuid("b")], me, "vm1"))
            .unwrap();
        assert_eq!(op.leases().len(), 1, "only the domain's operation lock");
        assert_eq!(op.leases()[0].key().display(), "domain \"vm1\"");
        assert!(op.image_locks().is_empty());
        // A second operation on the same domain waits its turn.
        let e = m.acquire(&for_vm1(vec![uuid("a")], me, "vm1")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(
            e.to_string()
                .starts_with("domain \"vm1\" is busy: operation \"snapshot create\""),
            "{e}"
        );
        drop(op);
        // Wrong pid, wrong domain, a volume the domain does not use: refused, nothing kept.
        for (p, why) in [
            (for_vm1(vec![uuid("a")], me + 1, "vm1"), "pid"),
            (for_vm1(vec![uuid("a")], me, "vm2"), "domain"),
            (for_vm1(vec![uuid("a"), uuid("c")], me, "vm1"), "volume"),
        ] {
            let e = m.acquire(&p).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotHolder, "{why}: {e}");
            assert!(e.to_string().contains("is not held by domain"), "{e}");
        }
        let e = m.acquire(&for_vm1(vec![uuid("a")], me, "vm2")).unwrap_err();
        assert!(
            e.to_string().contains("held by domain \"vm1\""),
            "names the real holder: {e}"
        );
        // The refusals left no operation lock behind.
        drop(m.acquire(&for_vm1(vec![], me, "vm2")).unwrap());
        drop(m.acquire(&for_vm1(vec![], me, "vm1")).unwrap());
        drop(vm);
        // Once the domain's QEMU is gone, nothing can be done on its behalf.
        let e = m.acquire(&for_vm1(vec![uuid("a")], me, "vm1")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotHolder);
    }

    #[test]
    fn a_directory_gets_a_lease_but_no_image_locks() {
        let d = tempfile::tempdir().unwrap();
        let m = LockManager::local(d.path().join("locks")).unwrap();
        let vol = d.path().join("subvol");
        std::fs::create_dir(&vol).unwrap();
        let op = Purpose::VolumeOp {
            op: "snapshot".into(),
            volumes: vec![Resource::file(&vol)],
        };
        let a = m.acquire(&op).unwrap();
        assert_eq!(a.leases().len(), 1);
        assert!(a.image_locks().is_empty());
        assert_eq!(m.acquire(&op).unwrap_err().kind(), ErrorKind::Conflict);
    }

    #[test]
    fn a_volume_not_created_yet_gets_its_lease() {
        let d = tempfile::tempdir().unwrap();
        let m = LockManager::local(d.path().join("locks")).unwrap();
        let op = Purpose::VolumeOp {
            op: "create".into(),
            volumes: vec![Resource::file(d.path().join("new.qcow2"))],
        };
        let a = m.acquire(&op).unwrap();
        assert!(a.image_locks().is_empty());
        assert_eq!(m.acquire(&op).unwrap_err().kind(), ErrorKind::Conflict);
    }

    #[test]
    fn inspection_takes_nothing() {
        let (m, b) = mgr();
        let _x = m
            .acquire(&Purpose::VolumeOp {
                op: "revert".into(),
                volumes: vec![uuid("a")],
            })
            .unwrap();
        let a = m.acquire(&Purpose::Inspect).unwrap();
        assert!(a.leases().is_empty());
        assert_eq!(b.holders(&uuid("a").key().unwrap()).unwrap().len(), 1);
    }

    #[test]
    fn errors_other_than_conflicts_are_not_retried() {
        let (m, b) = mgr();
        b.fail_with(Some(std::io::ErrorKind::PermissionDenied));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Instant::now();
        let e = rt
            .block_on(m.acquire_timeout(
                &Purpose::VolumeOp {
                    op: "x".into(),
                    volumes: vec![uuid("a")],
                },
                Duration::from_secs(5),
            ))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
