//! Inputs that are not images, through the CLI: a FIFO (or a socket, a directory, a
//! character device) as image, backing file or backing volume is refused within a second
//! with one error line saying what it is; a damaged pool definition is named and hides no
//! other pool; a read-only lockspace is not "in use".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VS: &str = env!("CARGO_BIN_EXE_virt-snap");

/// Run virt-snap in `dir`; fail if it has not finished within a second (killed then).
fn vs(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(VS)
        .args(args)
        .current_dir(dir)
        .env("VIRT_SNAP_STATE_DIR", dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run virt-snap");
    let deadline = Instant::now() + Duration::from_secs(1);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("virt-snap {args:?} did not finish within a second");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(dir: &Path, args: &[&str], words: &str) {
    let (ok, _, err) = vs(dir, args);
    assert!(!ok, "{args:?} succeeded");
    assert!(err.contains(words), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one error line: {err}");
    assert!(!err.contains("in use"), "{args:?}: {err}");
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn non_files_are_refused_within_a_second_everywhere() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let sock = dir.join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let sub = dir.join("subdir");
    std::fs::create_dir(&sub).unwrap();
    let target = dir.join("pool");
    std::fs::create_dir(&target).unwrap();
    let (ok, _, err) = vs(
        dir,
        &["pool-define-as", "p", "dir", target.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            fifo.clone(),
            "is a FIFO, not a regular file or block device",
        ),
        (sock, "is a socket, not a regular file or block device"),
        (sub, "is a directory, not a regular file or block device"),
        (
            PathBuf::from("/dev/null"),
            "is a character device, not a regular file or block device",
        ),
    ];
    for (i, (p, words)) in cases.iter().enumerate() {
        let ps = p.to_str().unwrap();
        fails_with(dir, &["image", "info", ps], words);
        fails_with(dir, &["image", "info", "--backing-chain", ps], words);
        fails_with(dir, &["image", "snapshot", "list", ps], words);
        fails_with(dir, &["image", "snapshot", "create", ps, "s1"], words);
        // As a backing file: of a new image (with and without a size) and down a chain.
        let top = format!("top{i}.qcow2");
        fails_with(
            dir,
            &[
                "image", "create", "-f", "qcow2", "-b", ps, "-F", "raw", &top,
            ],
            words,
        );
        fails_with(
            dir,
            &[
                "image", "create", "-f", "qcow2", "-b", ps, "-F", "raw", &top, "1M",
            ],
            words,
        );
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", ps, "-F", "raw", &top, "1M",
            ],
        );
        fails_with(dir, &["image", "info", "--backing-chain", &top], words);
        // As a backing volume (outside the pool: not one of its volumes), with the backing
        // size and with a size of its own.
        for size in ["0", "1M"] {
            let name = format!("v{i}-{size}");
            fails_with(
                dir,
                &[
                    "vol-create-as",
                    "p",
                    &name,
                    size,
                    "--format",
                    "qcow2",
                    "--backing-vol",
                    ps,
                    "--backing-vol-format",
                    "raw",
                ],
                "is not a volume of pool \"p\"",
            );
            assert!(!target.join(&name).exists());
        }
    }
    // A FIFO inside the pool, named as the backing volume: refused at once, not opened.
    let pool_fifo = target.join("pf");
    assert!(Command::new("mkfifo")
        .arg(&pool_fifo)
        .status()
        .unwrap()
        .success());
    for size in ["0", "1M"] {
        let (ok, _, err) = vs(
            dir,
            &[
                "vol-create-as",
                "p",
                "vf",
                size,
                "--format",
                "qcow2",
                "--backing-vol",
                "pf",
                "--backing-vol-format",
                "raw",
            ],
        );
        assert!(!ok && err.lines().count() == 1, "{err}");
        assert!(err.contains("pf"), "{err}");
        assert!(!target.join("vf").exists());
    }
    std::fs::remove_file(&pool_fifo).unwrap();
    // The FIFO was never written to or replaced.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    // A new image over an existing FIFO is refused too.
    fails_with(
        dir,
        &[
            "image",
            "create",
            "-f",
            "qcow2",
            fifo.to_str().unwrap(),
            "1M",
        ],
        "is a FIFO",
    );
}

#[test]
fn a_damaged_pool_is_named_and_the_others_still_list() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let target = dir.join("pool");
    std::fs::create_dir(&target).unwrap();
    let t = target.to_str().unwrap();
    for p in ["a", "z"] {
        assert!(vs(dir, &["pool-define-as", p, "dir", t]).0);
    }
    let (ok, before, _) = vs(dir, &["pool-list"]);
    assert!(ok);
    let (ok, before_json, _) = vs(dir, &["pool-list", "--output", "json"]);
    assert!(ok);
    let bad = dir.join("state/pools/m.json");
    std::fs::write(&bad, b"{\"name\": \"m\", \"kind\"").unwrap();
    let (ok, out, err) = vs(dir, &["pool-list"]);
    assert!(ok, "{err}");
    assert_eq!(out, before, "the good pools list byte for byte as before");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("warning: pool definition "), "{err}");
    assert!(err.contains(&*bad.to_string_lossy()), "{err}");
    assert!(err.contains("is damaged"), "{err}");
    let (ok, out, _) = vs(dir, &["pool-list", "--output", "json"]);
    assert!(ok);
    assert_eq!(out, before_json);
    let (ok, _, err) = vs(dir, &["pool-info", "m"]);
    assert!(!ok);
    assert!(err.contains("is damaged"), "{err}");
    let (ok, out, err) = vs(dir, &["pool-undefine", "m"]);
    assert!(ok, "{err}");
    assert_eq!(out, "Pool m has been undefined\n");
    assert!(!bad.exists());
    let (ok, out, err) = vs(dir, &["pool-list"]);
    assert!(ok);
    assert_eq!(out, before);
    assert_eq!(err, "");
}

#[test]
fn a_read_only_lockspace_is_not_in_use() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    let locks = dir.join("state/locks");
    std::fs::create_dir_all(&locks).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "vs-ro-test"])
        .arg(&locks)
        .status()
        .unwrap();
    assert!(st.success());
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(locks.clone());
    let (ok, _, err) = vs(dir, &["image", "snapshot", "create", "a.qcow2", "s1"]);
    assert!(!ok);
    assert!(err.contains("cannot lock the image"), "{err}");
    assert!(err.contains(&*locks.to_string_lossy()), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!err.contains("in use"), "{err}");
}
