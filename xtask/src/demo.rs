//! `cargo xtask demo`: README's main job. It runs what virt-snap can do today on real images
//! and a real QEMU, printing every command it runs and what it showed.
//!
//! Today: native image inspection (`virt-snap image info`, `--backing-chain`,
//! `image snapshot list`), also while a running QEMU holds the image, and QMP through
//! qmp-proto. Later issues extend it with live snapshots, reverts and volume snapshots.

use crate::util::{self, step, target_dir};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Print a command line as a user would type it, run it, and show its output.
fn show(cmd: &mut Command) -> Result<(), String> {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("\n$ {prog} {}", args.join(" "));
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("{prog} failed: {}", out.status));
    }
    Ok(())
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<(), String> {
    crate::deps::run()?;
    step("building virt-snap");
    util::cargo(&[
        "build",
        "--quiet",
        "-p",
        "virt-snap",
        "-p",
        "qmp-proto",
        "--examples",
    ])?;
    util::cargo(&["build", "--quiet", "-p", "virt-snap"])?;
    let bin_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(target_dir)
        .join("debug");
    let vs = bin_dir.join("virt-snap");
    let dir = target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let at = |n: &str| dir.join(n);
    let virt_snap = || {
        let mut c = Command::new(&vs);
        c.current_dir(&dir);
        c
    };

    step("1. images made by qemu-img: a base with two internal snapshots, an overlay on it");
    for args in [
        &["create", "-q", "-f", "qcow2", "base.qcow2", "256M"][..],
        &["snapshot", "-c", "installed", "base.qcow2"],
        &["snapshot", "-c", "configured", "base.qcow2"],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "vm.qcow2",
        ],
    ] {
        show(Command::new("qemu-img").args(args).current_dir(&dir))?;
    }

    step("2. virt-snap reads them natively (no qemu-img, no locks)");
    show(virt_snap().args(["image", "info", "--backing-chain", "vm.qcow2"]))?;
    show(virt_snap().args(["image", "snapshot", "list", "base.qcow2"]))?;
    show(virt_snap().args([
        "--output",
        "json",
        "image",
        "snapshot",
        "list",
        "base.qcow2",
    ]))?;

    step("3. a running QEMU 10.0.2 (KVM, no guest OS) opens vm.qcow2");
    let sock = at("qmp.sock");
    let log = std::fs::File::create(at("qemu.log")).map_err(|e| e.to_string())?;
    let mut qemu = KillOnDrop(
        Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=kvm",
                "-m",
                "128",
                "-nodefaults",
                "-display",
                "none",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=vm-file",
                at("vm.qcow2").display()
            ))
            .args(["-blockdev", "driver=qcow2,file=vm-file,node-name=vm"])
            .args(["-device", "virtio-blk-pci,drive=vm,id=vm-dev"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e} (run `cargo xtask deps`)"))?,
    );
    wait_for_qmp(&sock, &mut qemu.0)?;
    show(Command::new(bin_dir.join("examples/query_status")).arg(&sock))?;

    step("4. while QEMU holds the image, reading its invariant header still works");
    show(virt_snap().args(["image", "info", "vm.qcow2"]))?;
    step("   ... whereas qemu-img refuses to open it for writing (QEMU's image locks)");
    let out = Command::new("qemu-img")
        .args(["snapshot", "-c", "nope", "vm.qcow2"])
        .current_dir(&dir)
        .output()
        .map_err(|e| e.to_string())?;
    println!("\n$ qemu-img snapshot -c nope vm.qcow2");
    print!("{}", String::from_utf8_lossy(&out.stderr));
    drop(qemu);

    println!(
        "\ndemo done: read qcow2 headers, backing chains and snapshot tables natively \
         (also under a running QEMU) and spoke QMP to QEMU 10.0.2. Files are in {}.",
        dir.display()
    );
    Ok(())
}

fn wait_for_qmp(sock: &Path, qemu: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = qemu.try_wait() {
            return Err(format!("QEMU exited: {st}"));
        }
        if let Ok(s) = UnixStream::connect(sock) {
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() && line.contains("QMP") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("QEMU's monitor did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
