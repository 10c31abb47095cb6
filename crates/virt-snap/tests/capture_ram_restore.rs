//! An external RAM snapshot taken with `--live` (background-snapshot) of the test guest,
//! restored in a fresh QEMU: the restored guest shows what its RAM held at the snapshot's
//! instant (a file on tmpfs, which lives only in RAM), not what it held when the first QEMU
//! was killed, and its disk (a new overlay on the snapshot's image) is at the same instant.
//!
//! The restore is done by hand here (`-incoming defer`, then `migrate-incoming` from the
//! file): it checks that the RAM file the capture writes is a complete, loadable state.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use virt_snap::domain::{DiskFormat, DiskSpec, DomainKind, DomainState};
use virt_snap::snapshot::{CaptureRequest, MemoryChoice, SnapshotName};
use virt_snap::{Connection, Domain, RunSpec};

struct KillGuard(Vec<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill(2) on a QEMU this test started (it may be gone already).
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}

fn spec(name: &str, disk: &Path, format: DiskFormat, console: &Path) -> RunSpec {
    let boot = testbed::GuestBoot::from_dir(&testbed::guest_dir().expect("the test guest"));
    let mut spec = RunSpec::new(name);
    spec.kind = DomainKind::Tcg;
    spec.memory_bytes = 256 << 20;
    spec.kernel = Some(boot.kernel);
    spec.initrd = Some(boot.initrd);
    spec.cmdline = Some(boot.cmdline);
    spec.serial_file = Some(console.to_path_buf());
    spec.disks.push(DiskSpec::file(disk, format, "vda"));
    spec.agent = true;
    spec.extra_args = vec!["-no-reboot".into()];
    spec
}

fn sh(rt: &tokio::runtime::Runtime, dom: &Domain, script: &str) -> String {
    let cmd = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}
    });
    let r = rt
        .block_on(dom.agent_command(&cmd.to_string(), Duration::from_secs(10)))
        .expect("guest-exec");
    let pid = r["return"]["pid"].as_i64().expect("a pid");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let s = rt
            .block_on(dom.agent_command(&st.to_string(), Duration::from_secs(10)))
            .expect("guest-exec-status");
        if s["return"]["exited"] == true {
            assert_eq!(s["return"]["exitcode"], 0, "{script}: {s}");
            let out = s["return"]["out-data"].as_str().unwrap_or("");
            let bytes = base64_decode(out);
            return String::from_utf8(bytes).unwrap();
        }
        assert!(Instant::now() < end, "{script} did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Standard base64 (the agent's out-data), without a dependency.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()) {
        acc = (acc << 6) | val(c) as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn wait_agent(rt: &tokio::runtime::Runtime, dom: &Domain, console: &Path) {
    let end = Instant::now() + Duration::from_secs(120);
    while rt
        .block_on(dom.agent_command(r#"{"execute":"guest-ping"}"#, Duration::from_secs(5)))
        .is_err()
    {
        assert!(
            Instant::now() < end,
            "the agent never answered; console: {}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_live_ram_snapshot_restored_in_a_fresh_qemu_shows_the_ram_of_its_instant() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("state")).unwrap();
    let data = tmp.path().join("data.raw");
    testbed::make_data_disk(&data, 64 << 20).expect("the guest's data disk");
    let console = tmp.path().join("console.log");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dom = rt
        .block_on(conn.start(&spec("ramsrc", &data, DiskFormat::Raw, &console)))
        .expect("start the guest");
    let mut guard = KillGuard(vec![dom.pid().unwrap().unwrap()]);
    wait_agent(&rt, &dom, &console);

    // Before: a value only in RAM (tmpfs) and one on the disk.
    let nonce = format!("{:x}", std::process::id() as u64 * 7919 + 17);
    sh(
        &rt,
        &dom,
        &format!("echo ram-{nonce} > /tmp/marker && echo disk-{nonce} > /mnt/marker && sync"),
    );
    let mem = tmp.path().join("ramsrc.mem");
    let mut r = CaptureRequest::new(SnapshotName::new("r1").unwrap());
    r.flags.live = true;
    r.memory = MemoryChoice::External {
        file: mem.display().to_string(),
    };
    let res = rt
        .block_on(dom.snapshot_create(r))
        .expect("live RAM capture");
    assert!(res.paused.is_some());
    assert_eq!(
        rt.block_on(dom.state()).unwrap().state,
        DomainState::Running
    );
    // After: both changed; the disk's change goes to the new overlay.
    sh(
        &rt,
        &dom,
        "echo after > /tmp/marker && echo after > /mnt/marker && sync",
    );
    assert_eq!(sh(&rt, &dom, "cat /tmp/marker").trim(), "after");
    let overlay = tmp.path().join("data.r1");
    let blocks = rt.block_on(dom.block_devices()).unwrap();
    assert_eq!(blocks[0].source, overlay.display().to_string());
    rt.block_on(dom.destroy()).unwrap();

    // The restore: a new overlay on the snapshot's disk image (data.raw, untouched since the
    // snapshot), a fresh QEMU of the same machine waiting for an incoming state, the RAM file.
    let restored = tmp.path().join("restore.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&data)
        .arg(&restored)
        .status()
        .unwrap();
    assert!(st.success());
    let mut s = spec("ramdst", &restored, DiskFormat::Qcow2, &console);
    s.paused = true;
    s.extra_args.extend(["-incoming".into(), "defer".into()]);
    let dst = rt.block_on(conn.start(&s)).expect("start the restore QEMU");
    guard.0.push(dst.pid().unwrap().unwrap());
    let t0 = Instant::now();
    rt.block_on(
        dst.monitor_command(
            &serde_json::json!({
                "execute": "migrate-incoming",
                "arguments": {"uri": format!("file:{}", mem.display())}
            })
            .to_string(),
        ),
    )
    .expect("migrate-incoming");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let q = rt
            .block_on(dst.monitor_command(r#"{"execute":"query-migrate"}"#))
            .unwrap();
        match q["return"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") => panic!("the RAM file did not load: {q}"),
            _ => {}
        }
        assert!(Instant::now() < end, "load not done: {q}");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("RAM state loaded in {:?}", t0.elapsed());
    rt.block_on(dst.monitor_command(r#"{"execute":"cont"}"#))
        .expect("cont");
    assert_eq!(
        rt.block_on(dst.state()).unwrap().state,
        DomainState::Running
    );
    wait_agent(&rt, &dst, &console);
    assert_eq!(
        sh(&rt, &dst, "cat /tmp/marker").trim(),
        format!("ram-{nonce}"),
        "the restored RAM is the snapshot's"
    );
    assert_eq!(
        sh(
            &rt,
            &dst,
            "echo 3 > /proc/sys/vm/drop_caches; cat /mnt/marker"
        )
        .trim(),
        format!("disk-{nonce}"),
        "the restored disk is the snapshot's"
    );
    rt.block_on(dst.destroy()).unwrap();
}
