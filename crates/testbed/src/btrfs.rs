//! A real btrfs filesystem on a loop device, mounted in a temporary directory.

use crate::process::{require_tool, run};
use crate::registry::{self, Entry};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const HINT: &str = "run `cargo xtask deps` (installs btrfs-progs)";

/// A mounted btrfs filesystem backed by a sparse file on a loop device.
///
/// Dropping it unmounts the filesystem, detaches the loop device and removes the files.
#[derive(Debug)]
pub struct Btrfs {
    mountpoint: PathBuf,
    image: PathBuf,
    loop_device: String,
    _entry: Entry,
    _tmp: tempfile::TempDir,
}

impl Btrfs {
    /// Make a btrfs filesystem of `size_mib` MiB (at least 128) and mount it.
    pub fn new(size_mib: u64) -> Result<Self> {
        require_tool("mkfs.btrfs", HINT)?;
        require_tool("btrfs", HINT)?;
        require_tool("losetup", "install util-linux")?;
        registry::sweep_stale();
        let tmp = tempfile::Builder::new().prefix("vs-btrfs-").tempdir()?;
        let image = tmp.path().join("btrfs.img");
        let f = std::fs::File::create(&image)?;
        f.set_len(size_mib.max(128) * 1024 * 1024)?;
        drop(f);
        let entry = Entry::new()?;
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))?;
        let loop_device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        entry.record(&format!("loop {loop_device} {}", image.display()));
        let mountpoint = tmp.path().join("mnt");
        let made = (|| -> Result<()> {
            run(Command::new("mkfs.btrfs").args(["-q", "-f", &loop_device]))?;
            std::fs::create_dir(&mountpoint)?;
            run(Command::new("mount")
                .args(["-t", "btrfs", &loop_device])
                .arg(&mountpoint))
            .map_err(|e| {
                Error(format!(
                    "mounting btrfs failed (is btrfs in this kernel?): {e}"
                ))
            })?;
            entry.record(&format!("mount {}", mountpoint.display()));
            Ok(())
        })();
        if let Err(e) = made {
            registry::detach_loop(&loop_device);
            return Err(e);
        }
        Ok(Btrfs {
            mountpoint,
            image,
            loop_device,
            _entry: entry,
            _tmp: tmp,
        })
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The sparse file behind the loop device.
    pub fn image_path(&self) -> &Path {
        &self.image
    }

    /// The loop device (`/dev/loopN`).
    pub fn loop_device(&self) -> &str {
        &self.loop_device
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        registry::unmount(&self.mountpoint);
        registry::detach_loop(&self.loop_device);
        registry::wait_detached(&self.loop_device, &self.image);
        // _entry and _tmp drop next: the record, then the files.
    }
}
