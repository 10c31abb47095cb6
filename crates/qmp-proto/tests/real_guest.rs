//! QgaClient against the real QEMU guest agent in the tiny test guest (TCG) from testbed.
//!
//! Needs QEMU 10.0.2 and the guest image: run `cargo xtask deps` and
//! `cargo xtask guest-image`. A missing component fails the test with that hint.

use std::time::{Duration, Instant};

use qmp_proto::{ErrorKind, QgaClient};
use serde_json::json;
use testbed::TestGuest;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn real_guest_agent_sync_exec_freeze_and_resync() {
    let guest = TestGuest::start().await.unwrap_or_else(|e| {
        panic!("cannot boot the test guest (run `cargo xtask deps` and `cargo xtask guest-image`): {e}")
    });
    eprintln!("guest booted in {:?}", guest.boot_time());

    // Connect + 0xFF/guest-sync-delimited handshake against the real agent.
    let t0 = Instant::now();
    let mut ga = QgaClient::connect_unix(guest.qga_path(), T).await.unwrap();
    let sync_time = t0.elapsed();
    let t0 = Instant::now();
    ga.ping(T).await.unwrap();
    eprintln!("sync {sync_time:?}, ping {:?}", t0.elapsed());
    let info = ga.execute("guest-info", None, T).await.unwrap();
    assert!(info["version"].is_string(), "{info}");
    assert!(
        info["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "guest-exec"),
        "{info}"
    );

    // guest-exec with stdin, stdout, stderr and an exit code.
    let t0 = Instant::now();
    let out = ga
        .exec(
            &["/bin/sh", "-c", "cat; echo oops >&2; exit 3"],
            Some(b"binary \x00\x01\xff stdin\n"),
            T,
        )
        .await
        .unwrap();
    eprintln!("guest-exec round trip {:?}", t0.elapsed());
    assert_eq!(out.exit_code, Some(3), "{out:?}");
    assert_eq!(out.signal, None);
    assert_eq!(out.stdout, b"binary \x00\x01\xff stdin\n");
    assert_eq!(out.stderr, b"oops\n");
    assert!(!out.success());

    let out = ga.exec(&["/bin/true"], None, T).await.unwrap();
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.is_empty());

    // A process killed by a signal.
    let out = ga
        .exec(&["/bin/sh", "-c", "kill -9 $$"], None, T)
        .await
        .unwrap();
    assert_eq!(out.signal, Some(9), "{out:?}");
    assert!(!out.success());

    // 1 MiB of output comes back intact.
    let out = ga
        .exec(
            &[
                "/bin/sh",
                "-c",
                "dd if=/dev/zero bs=1024 count=1024 2>/dev/null | tr '\\0' x",
            ],
            None,
            T,
        )
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(out.stdout.iter().all(|&b| b == b'x'));

    // A program that does not exist: the agent's error reply, stream still in sync.
    let e = ga.exec(&["/no/such/program"], None, T).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Command, "{e}");
    assert_eq!(e.class(), Some("GenericError"), "{e}");
    ga.ping(T).await.unwrap();

    // A command the agent lacks.
    let e = ga.execute("guest-no-such", None, T).await.unwrap_err();
    assert_eq!(e.class(), Some("CommandNotFound"), "{e}");

    // An exec that outlives its timeout.
    let e = ga
        .exec(&["/bin/sleep", "3"], None, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");

    // A reply that arrives after the client gave up: the next call re-syncs and the
    // stale reply never reaches it.
    let e = ga
        .execute("guest-info", None, Duration::from_micros(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let st = ga.execute("guest-fsfreeze-status", None, T).await.unwrap();
    assert_eq!(st, "thawed");

    // Freeze / thaw the ext4 data disk mounted at /mnt.
    let n = ga
        .execute(
            "guest-fsfreeze-freeze-list",
            Some(json!({"mountpoints": ["/mnt"]})),
            T,
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        ga.execute("guest-fsfreeze-status", None, T).await.unwrap(),
        "frozen"
    );
    let n = ga.execute("guest-fsfreeze-thaw", None, T).await.unwrap();
    assert_eq!(n, 1);

    // The chardev takes a new client once the previous one is gone.
    drop(ga);
    let mut ga = QgaClient::connect_unix(guest.qga_path(), T).await.unwrap();
    ga.ping(T).await.unwrap();
    let out = ga
        .exec(&["/bin/cat", "/proc/mounts"], None, T)
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" /mnt ext4 "),
        "{out:?}"
    );
}
