//! A record of the mounts and loop devices each test process made, so that a later test
//! process can clean up after one that was killed before its destructors ran.
//!
//! Each live resource has a file `/tmp/virt-snap-testbed/<pid>-<seq>` whose lines are
//! `mount <path>` and `loop <device> <backing file>`. [`sweep_stale`] undoes the entries of dead processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

fn registry_dir() -> PathBuf {
    std::env::temp_dir().join("virt-snap-testbed")
}

/// One registered resource; its record is removed when dropped.
#[derive(Debug)]
pub(crate) struct Entry {
    file: PathBuf,
}

impl Entry {
    pub(crate) fn new() -> std::io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = registry_dir();
        std::fs::create_dir_all(&dir)?;
        let file = dir.join(format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, "")?;
        Ok(Entry { file })
    }

    pub(crate) fn record(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.file) {
            let _ = writeln!(f, "{line}");
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name; 'Z' is a zombie, i.e. dead.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Undo the mounts and loop devices recorded by test processes that are no longer alive.
/// Returns how many records were swept.
pub fn sweep_stale() -> usize {
    let Ok(entries) = std::fs::read_dir(registry_dir()) else {
        return 0;
    };
    let mut swept = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        // Undo in reverse order of creation: unmount before detaching the loop device.
        for line in text.lines().rev() {
            if let Some(p) = line.strip_prefix("mount ") {
                unmount(Path::new(p));
                let _ = std::fs::remove_dir(p);
            } else if let Some(rest) = line.strip_prefix("loop ") {
                // Detach only if the device still serves the recorded file: its number may
                // have been reused by another process since.
                if let Some((dev, image)) = rest.split_once(' ') {
                    if loop_backing_file(dev).as_deref() == Some(Path::new(image)) {
                        detach_loop(dev);
                        wait_detached(dev, Path::new(image));
                    }
                }
            }
        }
        let _ = std::fs::remove_file(e.path());
        swept += 1;
    }
    swept
}

pub(crate) fn unmount(p: &Path) {
    let ok = Command::new("umount")
        .arg(p)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(p).output();
    }
}

pub(crate) fn detach_loop(dev: &str) {
    let _ = Command::new("losetup").args(["-d", dev]).output();
}

/// The file a loop device serves, if it is attached.
pub(crate) fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|b| PathBuf::from(b.trim()))
}

/// Wait (up to 5 s) until `dev` no longer has `image` as its backing file: the kernel detaches a
/// loop device asynchronously after `losetup -d` when the device was still busy.
pub(crate) fn wait_detached(dev: &str, image: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline && loop_backing_file(dev).as_deref() == Some(image) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
