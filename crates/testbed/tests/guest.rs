//! The test guest, for real: boot it under TCG, talk to its agent, freeze its filesystem, and
//! take LVM snapshots inside it. Needs `cargo xtask guest-image` (fails saying so otherwise).
//!
//! One guest per test (each boot is about 5 s under TCG); the two tests run in parallel.

use serde_json::json;
use std::time::{Duration, Instant};
use testbed::{DiskFormat, LvmGuest, TestGuest};

const T: Duration = Duration::from_secs(30);

/// `len` bytes of a recognisable pattern.
fn pattern(tag: &str, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(format!("{tag} {i:08}\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn guest_boots_answers_ping_exec_and_freezes_mnt() {
    let t0 = Instant::now();
    // A qcow2 data disk here (the LVM test below boots the default raw one).
    let guest = TestGuest::builder()
        .data_disk_format(DiskFormat::Qcow2)
        .start()
        .await
        .expect("boot the test guest");
    assert_eq!(guest.data_disk().format, DiskFormat::Qcow2);
    eprintln!("test guest ready in {:?}", guest.boot_time());

    // The agent answers, and runs commands.
    let mut agent = guest.agent().await.unwrap();
    agent.ping(T).await.unwrap();
    let info = agent.execute("guest-info", None, T).await.unwrap();
    assert!(info["version"].is_string(), "guest-info: {info}");
    drop(agent);
    let uname = guest.exec_ok(&["uname", "-r"]).await.unwrap();
    assert!(uname.trim().ends_with("-cloud-amd64"), "kernel: {uname}");

    // The data disk is ext4 on /dev/vda at /mnt; write a file there and read it back.
    let mounts = guest.exec_ok(&["cat", "/proc/mounts"]).await.unwrap();
    assert!(
        mounts.lines().any(|l| l.starts_with("/dev/vda /mnt ext4 ")),
        "/mnt is not the ext4 data disk: {mounts}"
    );
    let out = guest
        .exec_with(
            &[
                "/bin/sh",
                "-c",
                "cat > /mnt/hello && sync && cat /mnt/hello",
            ],
            Some(b"hello from the host\n"),
            T,
        )
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello from the host\n");
    // stderr and exit codes come back too.
    let out = guest
        .exec(&["/bin/sh", "-c", "echo oops >&2; exit 3"])
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stderr, b"oops\n");

    // Freeze: exactly one filesystem (the ext4 on /mnt) is frozen, then thawed.
    let mut agent = guest.agent().await.unwrap();
    let frozen = agent
        .execute("guest-fsfreeze-freeze", None, T)
        .await
        .unwrap();
    assert_eq!(frozen, json!(1), "guest-fsfreeze-freeze");
    let status = agent
        .execute("guest-fsfreeze-status", None, T)
        .await
        .unwrap();
    assert_eq!(status, json!("frozen"));
    // While frozen, QMP still works: the VM runs.
    let qmp = guest.qmp().await.unwrap();
    let st = qmp.execute("query-status", None).await.unwrap();
    assert_eq!(st["status"], json!("running"), "{st}");
    let blocks = qmp.execute("query-block", None).await.unwrap();
    let data = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["inserted"]["node-name"] == "data")
        .unwrap_or_else(|| panic!("no node `data` in {blocks}"));
    assert_eq!(data["inserted"]["drv"], json!("qcow2"), "{data}");
    drop(qmp);
    let thawed = agent.execute("guest-fsfreeze-thaw", None, T).await.unwrap();
    assert_eq!(thawed, json!(1), "guest-fsfreeze-thaw");
    let status = agent
        .execute("guest-fsfreeze-status", None, T)
        .await
        .unwrap();
    assert_eq!(status, json!("thawed"));
    drop(agent);
    // Writable again after the thaw.
    guest.sh("echo after-thaw > /mnt/x && sync").await.unwrap();

    // The console shows the guest's /init messages.
    let console = guest.console();
    assert!(
        console.contains("guest-init: mounted /dev/vda (ext4) at /mnt"),
        "console: {}",
        guest.console_tail(20)
    );

    // Dropping the guest kills and reaps QEMU.
    let pid = guest.qemu().pid();
    let dir = guest.dir().to_path_buf();
    drop(guest);
    assert!(is_gone(pid), "QEMU {pid} still runs after drop");
    assert!(!dir.exists(), "{} left behind", dir.display());
    eprintln!("whole test: {:?}", t0.elapsed());
}

#[tokio::test]
async fn lvm_guest_cow_and_thin_snapshots_keep_the_original_bytes() {
    let t0 = Instant::now();
    let g = LvmGuest::start("vg0", 256 << 20)
        .await
        .expect("boot the LVM guest");
    eprintln!("LVM guest ready in {:?} (VG made)", t0.elapsed());
    let vgs = g
        .lvm(&["vgs", "--noheadings", "-o", "vg_name,pv_count", "vg0"])
        .await
        .unwrap();
    assert_eq!(vgs.split_whitespace().collect::<Vec<_>>(), ["vg0", "1"]);

    const LEN: usize = 256 << 10;
    let original = pattern("original", LEN);
    let changed = pattern("CHANGED!", LEN);
    let write = |dev: &'static str, data: Vec<u8>| {
        let g = &g;
        async move {
            let out = g
                .exec_with(
                    &["dd", &format!("of={dev}"), "bs=64k", "conv=fsync"],
                    Some(&data),
                    T,
                )
                .await
                .unwrap();
            assert!(out.success(), "dd to {dev}: {out:?}");
        }
    };
    let read = |dev: &'static str| {
        let g = &g;
        async move {
            let out = g
                .exec(&[
                    "dd",
                    &format!("if={dev}"),
                    "bs=64k",
                    &format!("count={}", LEN / (64 << 10)),
                    "iflag=direct",
                ])
                .await
                .unwrap();
            assert!(out.success(), "dd from {dev}: {out:?}");
            out.stdout
        }
    };

    // A classic (COW) snapshot keeps the origin's bytes after the origin is overwritten.
    let t = Instant::now();
    g.lvm(&["lvcreate", "-q", "-n", "lv0", "-L", "16m", "vg0"])
        .await
        .unwrap();
    write("/dev/vg0/lv0", original.clone()).await;
    g.lvm(&["lvcreate", "-q", "-s", "-n", "snap0", "-L", "8m", "vg0/lv0"])
        .await
        .unwrap();
    write("/dev/vg0/lv0", changed.clone()).await;
    assert!(
        read("/dev/vg0/lv0").await == changed,
        "origin not overwritten"
    );
    assert!(
        read("/dev/vg0/snap0").await == original,
        "the COW snapshot lost the original bytes"
    );
    let attr = g
        .lvm(&["lvs", "--noheadings", "-o", "lv_attr", "vg0/snap0"])
        .await
        .unwrap();
    assert!(attr.trim().starts_with('s'), "snapshot attr {attr:?}");
    eprintln!("COW snapshot part: {:?}", t.elapsed());

    // A thin pool, a thin volume and a thin snapshot (activation-skip: activate with -K).
    let t = Instant::now();
    g.lvm(&["lvcreate", "-q", "-T", "-L", "64m", "vg0/pool"])
        .await
        .unwrap();
    g.lvm(&[
        "lvcreate", "-q", "-V", "32m", "-T", "vg0/pool", "-n", "thin0",
    ])
    .await
    .unwrap();
    write("/dev/vg0/thin0", original.clone()).await;
    g.lvm(&["lvcreate", "-q", "-s", "-n", "thinsnap0", "vg0/thin0"])
        .await
        .unwrap();
    write("/dev/vg0/thin0", changed.clone()).await;
    g.lvm(&["lvchange", "-ay", "-K", "vg0/thinsnap0"])
        .await
        .unwrap();
    assert!(
        read("/dev/vg0/thin0").await == changed,
        "thin origin not overwritten"
    );
    assert!(
        read("/dev/vg0/thinsnap0").await == original,
        "the thin snapshot lost the original bytes"
    );
    let attrs = g
        .lvm(&[
            "lvs",
            "--noheadings",
            "-o",
            "lv_name,lv_attr,pool_lv,origin",
            "vg0",
        ])
        .await
        .unwrap();
    let row = |name: &str| {
        attrs
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .unwrap_or_else(|| panic!("{name} missing from lvs: {attrs}"))
    };
    assert!(row("pool")[1].starts_with('t'), "{attrs}");
    assert!(row("thinsnap0")[1].starts_with('V'), "{attrs}");
    assert_eq!(row("thinsnap0")[2..], ["pool", "thin0"], "{attrs}");
    eprintln!("thin snapshot part: {:?}", t.elapsed());
    eprintln!("whole test: {:?}", t0.elapsed());
}

#[test]
fn a_missing_guest_image_fails_saying_how_to_build_it() {
    let empty = tempfile::tempdir().unwrap();
    let err = testbed::guest::check_guest_dir(empty.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("test guest not built"), "{msg}");
    assert!(msg.contains("cargo xtask guest-image"), "{msg}");
}

#[tokio::test]
async fn a_guest_that_cannot_boot_fails_fast_with_its_console() {
    // No init in the initramfs: the kernel cannot mount a root filesystem and panics, QEMU
    // exits (panic=-1, -no-reboot) and the error shows the console at once instead of after
    // the 60 s boot timeout.
    let t = Instant::now();
    let err = TestGuest::builder()
        .kernel_arg("rdinit=/no-such-init")
        .start()
        .await
        .expect_err("a guest without init must not boot");
    let msg = err.to_string();
    assert!(msg.contains("stopped while booting"), "{msg}");
    assert!(msg.contains("Kernel panic"), "{msg}");
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("failed boot reported after {:?}:\n{msg}", t.elapsed());
}
