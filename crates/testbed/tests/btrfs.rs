//! The btrfs component: a real filesystem on a real loop device, cleaned up on drop.

use std::process::Command;
use testbed::Btrfs;

fn mounted(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.to_str().unwrap()))
}

/// Is `dev` still attached to `image`? (Another test may attach the same device number to
/// its own file as soon as we let it go, so the device name alone proves nothing.)
fn loop_attached(dev: &str, image: &std::path::Path) -> bool {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|b| std::path::Path::new(b.trim()) == image)
}

#[test]
fn btrfs_mounts_snapshots_and_cleans_up() {
    let fs = Btrfs::new(256).expect("btrfs testbed");
    let mnt = fs.mountpoint().to_path_buf();
    let dev = fs.loop_device().to_string();
    let image = fs.image_path().to_path_buf();
    assert!(loop_attached(&dev, &image));
    assert!(mounted(&mnt), "{} is not mounted", mnt.display());
    let fstype = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fstype.stdout).trim(), "btrfs");

    // A subvolume, a file in it, a read-only snapshot: the real btrfs tools work here.
    let sub = mnt.join("vol");
    let st = Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(&sub)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(sub.join("data"), b"before").unwrap();
    let snap = mnt.join("vol@s1");
    let st = Command::new("btrfs")
        .args(["-q", "subvolume", "snapshot", "-r"])
        .arg(&sub)
        .arg(&snap)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(sub.join("data"), b"after").unwrap();
    assert_eq!(std::fs::read(snap.join("data")).unwrap(), b"before");
    assert!(
        std::fs::write(snap.join("data"), b"x").is_err(),
        "snapshot is read-only"
    );

    drop(fs);
    assert!(!mounted(&mnt), "still mounted after drop");
    assert!(
        !loop_attached(&dev, &image),
        "{dev} still attached after drop"
    );
    assert!(!mnt.exists(), "temporary directory left behind");
}

#[test]
fn btrfs_is_cleaned_up_when_the_test_panics() {
    let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    let r = std::thread::spawn(move || {
        let fs = Btrfs::new(128).expect("btrfs testbed");
        *s2.lock().unwrap() = Some((
            fs.mountpoint().to_path_buf(),
            fs.loop_device().to_string(),
            fs.image_path().to_path_buf(),
        ));
        panic!("test failure while the filesystem is mounted");
    })
    .join();
    assert!(r.is_err());
    let (mnt, dev, image) = slot.lock().unwrap().clone().unwrap();
    assert!(!mounted(&mnt));
    assert!(!loop_attached(&dev, &image));
}

/// Run in a child process by `killed_test_process_is_swept`: mount, report, wait to be killed.
#[test]
fn child_that_mounts_and_hangs() {
    if std::env::var_os("VS_TESTBED_CHILD").is_none() {
        return; // only meaningful as the child of the test below
    }
    let fs = Btrfs::new(128).expect("btrfs testbed");
    let report = std::env::var_os("VS_TESTBED_CHILD").unwrap();
    let line = format!(
        "{}\n{}\n{}",
        fs.mountpoint().display(),
        fs.loop_device(),
        fs.image_path().display()
    );
    std::fs::write(format!("{}.tmp", report.to_string_lossy()), line).unwrap();
    std::fs::rename(format!("{}.tmp", report.to_string_lossy()), &report).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(120));
}

#[test]
fn killed_test_process_is_swept() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("child");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_that_mounts_and_hangs", "--test-threads=1"])
        .env("VS_TESTBED_CHILD", &report)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mnt, dev, image) = loop {
        if let Ok(text) = std::fs::read_to_string(&report) {
            let v: Vec<&str> = text.lines().collect();
            break (
                std::path::PathBuf::from(v[0]),
                v[1].to_string(),
                std::path::PathBuf::from(v[2]),
            );
        }
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        assert!(
            std::time::Instant::now() < deadline,
            "child did not mount in time"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(mounted(&mnt));
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    // Another test process may sweep first; either way the end state is what counts.
    testbed::sweep_stale();
    assert!(!mounted(&mnt), "sweep left {} mounted", mnt.display());
    assert!(!loop_attached(&dev, &image), "sweep left {dev} attached");
}
