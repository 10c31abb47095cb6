//! `cargo xtask guest-image`: build the test guest (kernel + initramfs) into target/guest.

use std::path::PathBuf;

/// Build (or reuse) the test guest; returns the directory holding `vmlinuz` and `initrd.img`.
pub fn run() -> Result<PathBuf, String> {
    Err("guest-image: not written yet".into())
}
