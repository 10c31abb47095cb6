//! Deletes proven from inside the test guest (real writes through the guest, read back
//! through its agent's guest-exec): write A, snapshot s1, write B, snapshot s2, write C, then
//! delete the snapshots while the guest runs (block-commit in its QEMU) and read C back from
//! inside the guest, the disk back on its own file; and a merge below the top proven by
//! reverting to the snapshot above it afterwards (its data, B, read back in the guest).
//!
//! The guest is a defined TCG domain with an ext4 qcow2 data disk at /dev/vda, mounted at
//! /mnt by the guest's /init (as in revert_guest.rs).

use qmp_proto::QgaClient;
use std::time::{Duration, Instant};
use virt_snap::snapshot::{
    CaptureRequest, DeleteFlags, DeleteKind, Flags, RevertFlags, SnapshotName,
};
use virt_snap::{Connection, Domain};

/// Destroys the domain when the test ends, however it ends.
struct Guest {
    rt: tokio::runtime::Runtime,
    dom: Domain,
    console: std::path::PathBuf,
    tmp: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.dom.destroy());
    }
}

impl Guest {
    fn define(name: &str) -> Guest {
        let image = testbed::guest_dir().expect("the test guest (cargo xtask guest-image)");
        let boot = testbed::GuestBoot::from_dir(&image);
        let tmp = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(tmp.path()).unwrap();
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
        let console = d.join("console.log");
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>\
             <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type>\
             <kernel>{}</kernel><initrd>{}</initrd><cmdline>{}</cmdline></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <serial type='file'><source path='{}'/></serial>\
             <channel type='unix'><source mode='bind' path='/ignored.sock'/>\
             <target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             </devices></domain>",
            boot.kernel.display(),
            boot.initrd.display(),
            boot.cmdline,
            data.display(),
            console.display(),
        );
        let conn = Connection::open(d.join("state")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(conn.define(&xml)).expect("define the guest");
        let dom = conn.domain(name).unwrap();
        let g = Guest {
            rt,
            dom,
            console,
            tmp,
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

impl Guest {
    fn disk_only(&self, n: &str) {
        let mut req = CaptureRequest::new(name(n));
        req.flags = Flags {
            disk_only: true,
            ..Default::default()
        };
        self.snapshot(req);
    }

    fn delete(&self, n: &str) {
        let r = self
            .rt
            .block_on(self.dom.snapshot_delete(n, DeleteFlags::default()))
            .expect("the delete");
        assert_eq!(r.kind, DeleteKind::External);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        eprintln!("delete {n}: {:?}", r.elapsed);
    }

    fn source(&self) -> String {
        self.rt.block_on(self.dom.block_devices()).unwrap()[0]
            .source
            .clone()
    }

    /// A, s1, B, s2, C.
    fn three_writes(&self) {
        self.write("A");
        self.disk_only("s1");
        self.write("B");
        self.disk_only("s2");
        self.write("C");
        assert_eq!(self.source(), self.file("data.s2").display().to_string());
    }
}

#[test]
fn deleting_the_snapshots_live_keeps_the_current_data_on_the_own_file() {
    let g = Guest::define("dlg-live");
    g.three_writes();
    let pid = g.dom.pid().unwrap();
    g.delete("s2");
    assert_eq!(g.source(), g.file("data.s1").display().to_string());
    assert_eq!(g.disk(), "C", "read back in the guest after the pivot");
    g.delete("s1");
    assert_eq!(g.dom.pid().unwrap(), pid, "the same QEMU all along");
    assert_eq!(g.source(), g.file("data.qcow2").display().to_string());
    assert!(!g.file("data.s1").exists() && !g.file("data.s2").exists());
    // The guest goes on reading and writing its disk.
    assert_eq!(g.disk(), "C");
    assert_eq!(g.ram(), "C", "the guest was never restarted");
    g.write("D");
    assert_eq!(g.disk(), "D");
}

#[test]
fn a_merge_below_the_top_keeps_the_snapshot_above_it_whole() {
    let g = Guest::define("dlg-mid");
    g.three_writes();
    g.delete("s1");
    assert_eq!(g.source(), g.file("data.s2").display().to_string());
    assert!(!g.file("data.s1").exists());
    assert_eq!(g.disk(), "C");
    // s2's data is in data.qcow2 now: reverting to it brings B back.
    g.revert(
        "s2",
        RevertFlags {
            running: true,
            ..Default::default()
        },
    );
    g.wait_agent();
    assert_eq!(g.disk(), "B", "s2 as it was taken");
}
