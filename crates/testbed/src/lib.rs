//! Real test components for virt-snap's tests.
//!
//! Every crate's tests get REAL components from here, never stand-ins:
//!
//! - [`Qemu`]: a QEMU 10.0.2 process (KVM, no guest OS) with disks attached with `-blockdev`
//!   and a QMP socket in a temporary directory;
//! - [`Btrfs`]: a btrfs filesystem on a loop device, mounted in a temporary directory;
//! - the tiny test guest and the LVM guest (TCG, with the QEMU guest agent) in [`guest`];
//! - [`EtcdCluster`]: a real etcd 3.4 cluster (1, 3 or 5 members) on loopback.
//!
//! Each component is cleaned up when dropped, also while a test panics: processes are killed
//! and reaped, filesystems unmounted, loop devices detached. Child processes get
//! `PR_SET_PDEATHSIG(SIGKILL)`, so a test process that is killed outright takes its QEMUs with
//! it, and mounts or loop devices left by a killed test process are swept by the next
//! [`Btrfs::new`] (see [`sweep_stale`]).
//!
//! A component whose tools are missing fails with an error that says how to install them
//! (`cargo xtask deps`, `cargo xtask guest-image`); nothing is silently skipped.

mod btrfs;
mod error;
mod etcd;
pub mod guest;
pub mod oracle;
mod process;
mod qemu;
mod registry;

pub use btrfs::Btrfs;
pub use error::{Error, Result};
pub use etcd::EtcdCluster;
pub use guest::{guest_dir, make_data_disk, GuestBoot, LvmGuest, TestGuest, TestGuestBuilder};
pub use oracle::{qemu_img, qemu_img_in, qemu_io};
pub use process::{require_tool, KillOnDrop};
pub use qemu::{Accel, Disk, DiskFormat, Qemu, QemuBuilder};
pub use registry::sweep_stale;

/// The QEMU version the project is written against.
pub const QEMU_VERSION: &str = "10.0.2";

/// The workspace root (for locating caches under `target/`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testbed lives at crates/testbed")
        .to_path_buf()
}
