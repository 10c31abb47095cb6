//! The test guest as a defined TCG domain, shared by the tests that prove snapshots from
//! inside it (revert_guest.rs, delete_guest.rs): a guest with its agent and an ext4 data disk
//! at /dev/vda (a qcow2 file, or a raw volume of a btrfs pool), mounted at /mnt by the guest's
//! /init; writes and reads through the agent's guest-exec.
#![allow(dead_code)]

use qmp_proto::QgaClient;
use std::path::Path;
use std::time::{Duration, Instant};
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::snapshot::{CaptureRequest, RevertFlags, SnapshotName};
use virt_snap::{Connection, Domain};

/// Destroys the domain when the test ends, however it ends.
pub struct Guest {
    pub rt: tokio::runtime::Runtime,
    pub dom: Domain,
    pub console: std::path::PathBuf,
    pub tmp: tempfile::TempDir,
    /// The btrfs the data disk's pool is on, if it is a pool volume (unmounted after the
    /// domain is destroyed).
    pub _fs: Option<testbed::Btrfs>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.dom.destroy());
    }
}

impl Guest {
    pub fn define(name: &str) -> Guest {
        Guest::define_on(name, false)
    }

    /// With `btrfs`, the data disk is raw volume `data` of btrfs pool `gp` on a loop mount;
    /// else the qcow2 file `data.qcow2`.
    pub fn define_on(name: &str, btrfs: bool) -> Guest {
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

    pub fn file(&self, f: &str) -> std::path::PathBuf {
        std::fs::canonicalize(self.tmp.path()).unwrap().join(f)
    }

    /// Waits until the agent answers (after a boot, or a revert).
    pub fn wait_agent(&self) {
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
    pub fn sh(&self, script: &str) -> String {
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
    pub fn write(&self, v: &str) {
        self.sh(&format!(
            "echo {v} > /mnt/marker && echo {v} > /tmp/marker && sync"
        ));
    }

    pub fn disk(&self) -> String {
        self.sh("cat /mnt/marker").trim().to_string()
    }

    pub fn ram(&self) -> String {
        self.sh("cat /tmp/marker 2>/dev/null || echo none")
            .trim()
            .to_string()
    }

    pub fn snapshot(&self, req: CaptureRequest) {
        self.rt
            .block_on(self.dom.snapshot_create(req))
            .expect("the snapshot");
    }

    pub fn revert(&self, name: &str, flags: RevertFlags) -> virt_snap::snapshot::RevertResult {
        let r = self
            .rt
            .block_on(self.dom.snapshot_revert(name, flags))
            .expect("the revert");
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        eprintln!("{name}: {:?} in {:?}", r.kind, r.elapsed);
        r
    }
}

pub fn name(n: &str) -> SnapshotName {
    SnapshotName::new(n).unwrap()
}
