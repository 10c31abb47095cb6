//! Reverts proven from inside the test guest (real writes through the guest, read back
//! through its agent's guest-exec): write A, snapshot, write B, revert, read A. For an
//! internal snapshot with RAM reverted in place (the same QEMU; a tmpfs file, which lives in
//! RAM only, is back too), an external disk-only snapshot reverted with `--running` (a new
//! overlay of the snapshot's image re-pointed in the same QEMU, the guest reset), and an
//! external snapshot with a RAM file (a QEMU started with `-incoming defer` loads it), and a
//! storage snapshot of a btrfs pool volume (`snapshot='storage'`: the volume reverted by its
//! backend, the guest booted afresh on it).
//!
//! The guest is a defined TCG domain (a revert may start it again from its definition; the
//! guest's kernel does not boot under this host's KVM CPU model) with an ext4 qcow2 data disk
//! at /dev/vda, mounted at /mnt by the guest's /init.

use qmp_proto::QgaClient;
use std::path::Path;
use std::time::{Duration, Instant};
use virt_snap::domain::DomainState;
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::snapshot::{
    CaptureRequest, DiskChoice, DiskRequest, Flags, MemoryChoice, RevertFlags, RevertKind,
    SnapshotName,
};
use virt_snap::{Connection, Domain};

/// Destroys the domain when the test ends, however it ends.
struct Guest {
    rt: tokio::runtime::Runtime,
    dom: Domain,
    console: std::path::PathBuf,
    tmp: tempfile::TempDir,
    /// The btrfs the data disk's pool is on, if it is a pool volume (unmounted after the
    /// domain is destroyed).
    _fs: Option<testbed::Btrfs>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.dom.destroy());
    }
}

impl Guest {
    fn define(name: &str) -> Guest {
        Guest::define_on(name, false)
    }

    /// With `btrfs`, the data disk is raw volume `data` of btrfs pool `gp` on a loop mount;
    /// else the qcow2 file `data.qcow2`.
    fn define_on(name: &str, btrfs: bool) -> Guest {
        let image = testbed::guest_dir().expect("the test guest (cargo xtask guest-image)");
        let boot = testbed::GuestBoot::from_dir(&image);
        let tmp = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(tmp.path()).unwrap();
        let conn = Connection::open(d.join("state")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut fs = None;
        let disk = if btrfs {
            let b = testbed::Btrfs::new(256).expect("btrfs testbed (cargo xtask deps)");
            let root = b.mountpoint().join("pool");
            std::fs::create_dir(&root).unwrap();
            fs = Some(b);
            conn.define_pool(PoolDef {
                name: "gp".into(),
                kind: PoolKind::Btrfs,
                target: root.display().to_string(),
                thin_pool: None,
            })
            .unwrap();
            let pool = conn.pool("gp").unwrap();
            rt.block_on(pool.create_volume(&VolumeSpec {
                name: "data".into(),
                capacity: 64 << 20,
                format: VolFormat::Raw,
                backing: None,
            }))
            .unwrap();
            let path = rt.block_on(pool.volume("data").path()).unwrap();
            testbed::make_data_disk(Path::new(&path), 64 << 20).expect("the guest's data disk");
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
             <source pool='gp' volume='data'/><target dev='vda' bus='virtio'/></disk>"
                .to_string()
        } else {
            let raw = d.join("data.raw");
            testbed::make_data_disk(&raw, 64 << 20).expect("the guest's data disk");
            let data = d.join("data.qcow2");
            testbed::qemu_img(&[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                data.to_str().unwrap(),
            ]);
            std::fs::remove_file(&raw).unwrap();
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                data.display()
            )
        };
        let console = d.join("console.log");
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type>\
             <kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline></os><devices>\
             {disk}<serial type='file'><source path='{}'/></serial>\
             <channel type='unix'><source mode='bind' path='/ignored.sock'/>\
             <target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             </devices></domain>",
            boot.kernel.display(),
            boot.initrd.display(),
            boot.cmdline,
            console.display(),
        );
        rt.block_on(conn.define(&xml)).expect("define the guest");
        let dom = conn.domain(name).unwrap();
        let g = Guest {
            rt,
            dom,
            console,
            tmp,
            _fs: fs,
        };
        g.rt.block_on(conn.start_defined(name, false))
            .expect("start the guest");
        g.wait_agent();
        g
    }

    fn file(&self, f: &str) -> std::path::PathBuf {
        std::fs::canonicalize(self.tmp.path()).unwrap().join(f)
    }

    /// Waits until the agent answers (after a boot, or a revert).
    fn wait_agent(&self) {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = self.rt.block_on(async {
                let mut c = QgaClient::connect_unix(
                    self.dom.dir().join("qga.sock"),
                    Duration::from_secs(3),
                )
                .await
                .ok()?;
                c.execute("guest-ping", None, Duration::from_secs(3))
                    .await
                    .ok()
            });
            if ok.is_some() {
                return;
            }
            assert!(
                Instant::now() < end,
                "the agent never answered; console: {}",
                std::fs::read_to_string(&self.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `sh -c SCRIPT` in the guest: its stdout (it must exit 0).
    fn sh(&self, script: &str) -> String {
        self.rt.block_on(async {
            let mut c =
                QgaClient::connect_unix(self.dom.dir().join("qga.sock"), Duration::from_secs(10))
                    .await
                    .expect("the agent");
            let out = c
                .exec(&["/bin/sh", "-c", script], None, Duration::from_secs(60))
                .await
                .expect("guest-exec");
            assert_eq!(
                out.exit_code,
                Some(0),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
    }

    /// Writes `v` to the data disk (synced) and to tmpfs (RAM only).
    fn write(&self, v: &str) {
        self.sh(&format!(
            "echo {v} > /mnt/marker && echo {v} > /tmp/marker && sync"
        ));
    }

    fn disk(&self) -> String {
        self.sh("cat /mnt/marker").trim().to_string()
    }

    fn ram(&self) -> String {
        self.sh("cat /tmp/marker 2>/dev/null || echo none")
            .trim()
            .to_string()
    }

    fn snapshot(&self, req: CaptureRequest) {
        self.rt
            .block_on(self.dom.snapshot_create(req))
            .expect("the snapshot");
    }

    fn revert(&self, name: &str, flags: RevertFlags) -> virt_snap::snapshot::RevertResult {
        let r = self
            .rt
            .block_on(self.dom.snapshot_revert(name, flags))
            .expect("the revert");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        eprintln!("{name}: {:?} in {:?}", r.kind, r.elapsed);
        r
    }
}

fn name(n: &str) -> SnapshotName {
    SnapshotName::new(n).unwrap()
}

#[test]
fn internal_with_ram_in_place_brings_back_disk_and_ram() {
    let g = Guest::define("rvg-int");
    g.write("A");
    g.snapshot(CaptureRequest::new(name("a")));
    g.write("B");
    assert_eq!((g.disk(), g.ram()), ("B".into(), "B".into()));
    let pid = g.dom.pid().unwrap();
    let r = g.revert("a", RevertFlags::default());
    assert_eq!(r.kind, RevertKind::InternalInPlace);
    assert_eq!(r.state, DomainState::Running);
    assert_eq!(g.dom.pid().unwrap(), pid, "the same QEMU");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the disk as it was at the snapshot");
    assert_eq!(g.ram(), "A", "the RAM as it was at the snapshot");
    // And again after more writes: the snapshot stays usable.
    g.write("C");
    g.revert("a", RevertFlags::default());
    g.wait_agent();
    assert_eq!((g.disk(), g.ram()), ("A".into(), "A".into()));
}

#[test]
fn external_disk_only_running_is_repointed_in_place_on_a_new_overlay() {
    let g = Guest::define("rvg-ext");
    g.write("A");
    let mut req = CaptureRequest::new(name("e1"));
    req.flags = Flags {
        disk_only: true,
        ..Default::default()
    };
    g.snapshot(req);
    g.write("B");
    assert_eq!(g.disk(), "B");
    let pid = g.dom.pid().unwrap();
    let r = g.revert(
        "e1",
        RevertFlags {
            running: true,
            ..Default::default()
        },
    );
    assert_eq!(r.kind, RevertKind::ExternalInPlace);
    assert_eq!(r.state, DomainState::Running);
    assert_eq!(g.dom.pid().unwrap(), pid, "the same QEMU");
    let blocks = g.rt.block_on(g.dom.block_devices()).unwrap();
    assert_eq!(blocks[0].source, g.file("data.e1.r1").display().to_string());
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the disk as it was at the snapshot");
    assert_eq!(
        g.ram(),
        "none",
        "a disk-only revert resets the guest: it boots afresh"
    );
    // Again: the snapshot stays usable, and the guest's writes go to the newest overlay.
    g.write("C");
    g.revert(
        "e1",
        RevertFlags {
            running: true,
            ..Default::default()
        },
    );
    g.wait_agent();
    assert_eq!(g.disk(), "A");
    assert_eq!(g.dom.pid().unwrap(), pid);
    // The snapshot's own overlay keeps B (nothing is deleted).
    assert!(Path::new(&g.file("data.e1")).exists());
}

#[test]
fn external_with_ram_loads_the_ram_file_into_a_new_qemu() {
    let g = Guest::define("rvg-mem");
    g.write("A");
    let mem = g.file("rvg-mem.m1");
    let mut req = CaptureRequest::new(name("m1"));
    req.memory = MemoryChoice::External {
        file: mem.display().to_string(),
    };
    g.snapshot(req);
    g.write("B");
    let pid = g.dom.pid().unwrap();
    let r = g.revert("m1", RevertFlags::default());
    assert_eq!(r.kind, RevertKind::ExternalMemory);
    assert_eq!(r.state, DomainState::Running);
    assert_ne!(g.dom.pid().unwrap(), pid, "a new QEMU");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the disk as it was at the snapshot");
    assert_eq!(g.ram(), "A", "the RAM as it was at the snapshot");
}

#[test]
fn a_btrfs_storage_snapshot_reverts_the_volume_and_boots_on_it() {
    let g = Guest::define_on("rvg-btrfs", true);
    g.write("A");
    let mut req = CaptureRequest::new(name("b1"));
    req.flags.disk_only = true;
    req.disks.push(DiskRequest {
        name: "vda".into(),
        choice: DiskChoice::Storage,
    });
    g.snapshot(req);
    g.write("B");
    assert_eq!(g.disk(), "B");
    let pid = g.dom.pid().unwrap();
    let running = RevertFlags {
        running: true,
        ..Default::default()
    };
    let r = g.revert("b1", running);
    assert_eq!(r.kind, RevertKind::Storage);
    assert_eq!(r.state, DomainState::Running);
    assert_ne!(g.dom.pid().unwrap(), pid, "stopped and started again");
    g.wait_agent();
    assert_eq!(g.disk(), "A", "the volume as it was at the snapshot");
    assert_eq!(g.ram(), "none", "a fresh boot");
    // Again after more writes: the volume snapshot stays usable, the undo snapshots go.
    g.write("C");
    g.revert("b1", running);
    g.wait_agent();
    assert_eq!(g.disk(), "A");
    let conn = Connection::open(g.file("state")).unwrap();
    let snaps =
        g.rt.block_on(conn.pool("gp").unwrap().volume("data").snapshots())
            .unwrap();
    let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["b1"]);
}
