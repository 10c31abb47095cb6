//! The oracles the tests check images with: qemu-img and qemu-io, run as a user runs them.

use std::path::Path;
use std::process::Command;

const HINT: &str = "install QEMU's tools with `cargo xtask deps`";

/// `qemu-img ARGS` in `dir` (else the current directory): its stdout. Panics, saying how to
/// install it, if qemu-img is missing, and with its stderr if it fails.
pub fn qemu_img_in(dir: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img ({e}): {HINT}"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`: its stdout (see [`qemu_img_in`]).
pub fn qemu_img(args: &[&str]) -> String {
    qemu_img_in(None, args)
}

/// `qemu-io -c CMD` on the qcow2 image `image`, whose backing image a running QEMU may hold
/// (the backing is opened read-only, sharing its lock); `read_only` opens the image itself
/// read-only. Its output; panics if qemu-io fails or reports a failed command.
pub fn qemu_io(image: &Path, cmd: &str, read_only: bool) -> String {
    let opts = format!(
        "driver=qcow2,file.filename={},backing.read-only=on,backing.force-share=on",
        image.display()
    );
    let mut c = Command::new("qemu-io");
    if read_only {
        c.arg("-r");
    }
    let out = c
        .args(["--image-opts", "-c", cmd, &opts])
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io ({e}): {HINT}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd} {}: {text}{}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
