//! The test guest (TCG, direct kernel boot, guest agent) started through a `RunSpec`.

use std::time::{Duration, Instant};
use virt_snap::domain::{DiskFormat, DiskSpec, DomainKind, DomainState};
use virt_snap::{Connection, ErrorKind, RunSpec};

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
fn the_test_guest_answers_guest_ping_through_its_agent_channel() {
    let image = testbed::guest_dir().expect("the test guest (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    // The guest's /init mounts an ext4 data disk at /dev/vda.
    let data = tmp.path().join("data.raw");
    testbed::make_data_disk(&data, 64 << 20).expect("the guest's data disk");
    let boot = testbed::GuestBoot::from_dir(&image);
    let console = tmp.path().join("console.log");
    let mut spec = RunSpec::new("guest1");
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

    let end = Instant::now() + Duration::from_secs(90);
    let reply = loop {
        match rt.block_on(dom.agent_command(r#"{"execute":"guest-ping"}"#, Duration::from_secs(3)))
        {
            Ok(r) => break r,
            Err(e) if Instant::now() < end => {
                assert_eq!(e.kind(), ErrorKind::Monitor, "{e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!(
                "the agent never answered: {e}; console: {}",
                std::fs::read_to_string(&console).unwrap_or_default()
            ),
        }
    };
    assert_eq!(reply, serde_json::json!({"return": {}}));
    let info = rt
        .block_on(dom.agent_command(r#"{"execute":"guest-info"}"#, Duration::from_secs(10)))
        .unwrap();
    assert!(info["return"]["version"].is_string(), "{info}");
    assert!(std::fs::read_to_string(&console).unwrap().contains("Linux"));
    let st = rt.block_on(dom.state()).unwrap();
    assert_eq!(st.state, DomainState::Running);
    rt.block_on(dom.destroy()).unwrap();
}
