//! A quiesced disk-only snapshot of the test guest (TCG, direct kernel boot, the real guest
//! agent) started through a `RunSpec`: the agent freezes the guest's file systems around the
//! transaction and thaws them after; the disk ends on its overlay.

use std::time::{Duration, Instant};
use virt_snap::domain::{DiskFormat, DiskSpec, DomainKind, DomainState};
use virt_snap::snapshot::{CaptureRequest, SnapshotName};
use virt_snap::{Connection, RunSpec};

struct KillGuard(Option<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on the QEMU this test started (it may be gone already).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn quiesced_disk_only_snapshot_of_the_test_guest() {
    let image = testbed::guest_dir().expect("the test guest (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    // The guest's /init mounts an ext4 data disk at /dev/vda.
    let data = tmp.path().join("data.raw");
    testbed::make_data_disk(&data, 64 << 20).expect("the guest's data disk");
    let boot = testbed::GuestBoot::from_dir(&image);
    let console = tmp.path().join("console.log");
    let mut spec = RunSpec::new("qguest");
    spec.kind = DomainKind::Tcg;
    spec.memory_bytes = 256 << 20;
    spec.kernel = Some(boot.kernel);
    spec.initrd = Some(boot.initrd);
    spec.cmdline = Some(boot.cmdline);
    spec.serial_file = Some(console.clone());
    spec.disks
        .push(DiskSpec::file(&data, DiskFormat::Raw, "vda"));
    spec.agent = true;
    spec.extra_args = vec!["-no-reboot".into()];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dom = rt.block_on(conn.start(&spec)).expect("start the guest");
    let _g = KillGuard(dom.pid().unwrap());
    let agent = |cmd: &str| {
        rt.block_on(dom.agent_command(
            &format!("{{\"execute\":\"{cmd}\"}}"),
            Duration::from_secs(5),
        ))
    };
    let end = Instant::now() + Duration::from_secs(120);
    while agent("guest-ping").is_err() {
        assert!(
            Instant::now() < end,
            "the agent never answered; console: {}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let mut r = CaptureRequest::new(SnapshotName::new("q1").unwrap());
    r.flags.disk_only = true;
    r.flags.quiesce = true;
    r.freeze_budget_ms = 10_000;
    let res = rt
        .block_on(dom.snapshot_create(r))
        .expect("quiesced capture");
    let frozen = res.frozen.expect("the guest was frozen");
    assert!(frozen < Duration::from_secs(10), "{frozen:?}");
    assert_eq!(
        agent("guest-fsfreeze-status").unwrap()["return"],
        "thawed",
        "thawed after"
    );
    assert_eq!(
        rt.block_on(dom.state()).unwrap().state,
        DomainState::Running
    );
    let overlay = tmp.path().join("data.q1");
    let blocks = rt.block_on(dom.block_devices()).unwrap();
    assert_eq!(blocks[0].source, overlay.display().to_string());
    assert_eq!(blocks[0].format, "qcow2");
}
