//! Domain commands on the real binary: attach to QEMUs started by the test, list, domstate,
//! domblklist, monitor and agent commands, shutdown, destroy, kill -9, and user errors.

use testbed::{DiskFormat, Qemu};
use virt_snap_e2e::in_state::{fails, ok};

#[test]
fn attach_list_domstate_domblklist_monitor_kill_9_and_destroy() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let mut qemu = Qemu::builder()
        .disk("d0", DiskFormat::Qcow2, 32 << 20)
        .disk("d1", DiskFormat::Qcow2, 32 << 20)
        .spawn()
        .expect("start QEMU");
    let d0 = std::fs::canonicalize(&qemu.disk("d0").path).unwrap();
    let d1 = std::fs::canonicalize(&qemu.disk("d1").path).unwrap();
    let qmp = qemu.qmp_path().to_str().unwrap().to_string();
    let pid = qemu.pid();

    let out = ok(s, &["attach", "vm1", "--qmp", &qmp]);
    assert_eq!(out, format!("Domain 'vm1' attached (pid {pid})\n"));
    let e = fails(s, &["attach", "vm1", "--qmp", &qmp]);
    assert!(e.contains("already running"), "{e}");

    let out = ok(s, &["list"]);
    let lines: Vec<&str> = out.lines().collect();
    // virsh's layout: columns two spaces apart after the widest cell.
    let w = pid.to_string().len();
    assert_eq!(lines[0], format!(" Id{}   Name   State", " ".repeat(w - 2)));
    assert!(lines[1].chars().all(|c| c == '-'), "{out}");
    assert_eq!(lines[2], format!(" {pid}   vm1    running"));
    let v: serde_json::Value = serde_json::from_str(&ok(s, &["list", "--output", "json"])).unwrap();
    assert_eq!(v[0]["name"], "vm1");
    assert_eq!(v[0]["id"], pid);
    assert_eq!(v[0]["state"], "running");

    assert_eq!(ok(s, &["domstate", "vm1"]), "running\n\n");
    assert_eq!(
        ok(s, &["domstate", "vm1", "--reason"]),
        "running (booted)\n\n"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(s, &["domstate", "vm1", "-o", "json"])).unwrap();
    assert_eq!(v["reason"], "booted");

    let out = ok(s, &["domblklist", "vm1"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], " Target   Source");
    assert_eq!(lines[2], format!(" d0-dev   {}", d0.display()));
    assert_eq!(lines[3], format!(" d1-dev   {}", d1.display()));

    let out = ok(
        s,
        &[
            "qemu-monitor-command",
            "vm1",
            r#"{"execute":"query-status"}"#,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["return"]["status"], "running");
    let e = fails(s, &["qemu-monitor-command", "vm1", "{not json"]);
    assert!(e.contains("invalid JSON"), "{e}");
    let e = fails(s, &["qemu-monitor-command", "vm1", r#"{"execute":"nope"}"#]);
    assert!(e.contains("nope"), "{e}");
    let e = fails(
        s,
        &["qemu-agent-command", "vm1", r#"{"execute":"guest-ping"}"#],
    );
    assert!(e.contains("no guest agent channel"), "{e}");

    // No ACPI in a guest without an OS: the shutdown is asked for, and it still runs.
    let out = ok(s, &["shutdown", "vm1", "--timeout", "1"]);
    assert_eq!(
        out,
        "Domain 'vm1' is being shutdown (still running after 1 s)\n"
    );

    // A volume operation is refused while it runs, naming the domain.
    let e = fails(
        s,
        &["image", "snapshot", "create", d0.to_str().unwrap(), "s1"],
    );
    assert!(e.contains("domain \"vm1\""), "{e}");

    // QEMU ends after the shutdown asked for: shut off (shutdown). The crash needs another.
    qemu.kill();
    let out = ok(s, &["domstate", "vm1", "--reason"]);
    assert_eq!(out, "shut off (shutdown)\n\n");
    ok(
        s,
        &["image", "snapshot", "create", d0.to_str().unwrap(), "s1"],
    );

    let qemu2 = Qemu::builder()
        .existing_disk("d0", DiskFormat::Qcow2, &d0)
        .spawn()
        .expect("start QEMU");
    let qmp2 = qemu2.qmp_path().to_str().unwrap().to_string();
    ok(s, &["attach", "vm1", "--qmp", &qmp2]);
    kill_9(qemu2.pid());
    let t = std::time::Instant::now();
    loop {
        let out = ok(s, &["domstate", "vm1", "--reason"]);
        if out == "shut off (crashed)\n\n" {
            break;
        }
        assert!(t.elapsed().as_secs() < 5, "{out}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(qemu2);
    ok(
        s,
        &["image", "snapshot", "create", d0.to_str().unwrap(), "s2"],
    );
    let out = ok(s, &["list", "--all"]);
    assert!(out.contains(" -    vm1    shut off"), "{out}");
    assert_eq!(
        ok(s, &["list"]).lines().count(),
        3,
        "header, rule, blank line"
    );

    // destroy
    let qemu3 = Qemu::builder()
        .existing_disk("d0", DiskFormat::Qcow2, &d0)
        .spawn()
        .expect("start QEMU");
    let qmp3 = qemu3.qmp_path().to_str().unwrap().to_string();
    ok(s, &["attach", "vm1", "--qmp", &qmp3]);
    assert_eq!(ok(s, &["destroy", "vm1"]), "Domain 'vm1' destroyed\n");
    assert_eq!(
        ok(s, &["domstate", "vm1", "--reason"]),
        "shut off (destroyed)\n\n"
    );
    let e = fails(s, &["destroy", "vm1"]);
    assert!(e.contains("is not running"), "{e}");
}

/// SIGKILL `pid`.
fn kill_9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn the_test_guest_answers_guest_ping_through_attach_agent() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let guest = rt
        .block_on(testbed::TestGuest::builder().start())
        .expect("the test guest (cargo xtask guest-image)");
    let qmp = guest.qmp_path().to_str().unwrap().to_string();
    let qga = guest.qga_path().to_str().unwrap().to_string();
    ok(s, &["attach", "g1", "--qmp", &qmp, "--agent", &qga]);
    let out = ok(
        s,
        &["qemu-agent-command", "g1", r#"{"execute":"guest-ping"}"#],
    );
    assert_eq!(out, "{\"return\":{}}\n");
    let v: serde_json::Value = serde_json::from_str(&ok(
        s,
        &[
            "qemu-agent-command",
            "g1",
            r#"{"execute":"guest-info"}"#,
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert!(v["return"]["version"].is_string(), "{v}");
    assert_eq!(ok(s, &["destroy", "g1"]), "Domain 'g1' destroyed\n");
}

#[test]
fn user_errors_are_one_line_and_never_panic() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let e = fails(s, &["domstate", "nosuch"]);
    assert!(e.contains("domain \"nosuch\" not found"), "{e}");
    for bad in ["a/b", "..", ""] {
        let e = fails(s, &["domstate", bad]);
        assert!(e.contains("invalid domain name"), "{e}");
    }
    let e = fails(s, &["destroy", "nosuch"]);
    assert!(e.contains("not found"), "{e}");
    let e = fails(s, &["attach", "x", "--qmp", "/nonexistent/qmp.sock"]);
    assert!(e.contains("/nonexistent/qmp.sock"), "{e}");
    let e = fails(s, &["qemu-monitor-command", "nosuch", r#"{"execute":"x"}"#]);
    assert!(e.contains("not found") || e.contains("invalid"), "{e}");
    assert_eq!(
        ok(s, &["list", "--all"]),
        " Id   Name   State\n--------------------\n\n"
    );
}
