//! `cargo xtask bench NAME`: benchmarks that measure virt-snap and its peer in the same run.
//!
//! Each benchmark builds what it measures in release mode, runs ours and the peer side by
//! side (interleaved), and prints medians and the ratio peer / ours.

// The process-timing half of the harness serves the image benchmarks being added.
mod domain;
#[allow(dead_code)]
pub mod harness;
mod image_info;
mod image_snapshot;
mod libvirt;
mod locking;
mod qemu_start;
mod qmp;
mod snapshot;
mod storage;

use crate::util::{self, step};

/// The benchmarks: name, what it measures.
const BENCHES: &[(&str, &str)] = &[
    (
        "storage",
        "4 GiB raw volume snapshot create/revert on btrfs and dir (reflink, copy): virt-snap vs btrfs/cp by hand",
    ),
    (
        "domain",
        "define + start to running, destroy: a no-OS KVM domain with 2 qcow2 disks, virt-snap vs libvirt 11.3 (virsh)",
    ),
    (
        "locking",
        "lease acquire + release, etcd 3.4 (3 members) vs local lockspace vs bare etcd-client floor; virt-snap start/destroy of a no-OS KVM domain, etcd vs local lockspace",
    ),
    (
        "qemu-start",
        "QEMU spawn to first query-status answer: qmp-proto vs Python qemu.qmp",
    ),
    (
        "qmp",
        "query-status on one QEMU: qmp-proto vs bare-socket floors vs Python qemu.qmp (latency, 8 in flight, CPU)",
    ),
    (
        "image-info",
        "1000-snapshot qcow2: virt-snap image info / snapshot list vs qemu-img info / snapshot -l",
    ),
    (
        "snapshot",
        "live snapshots of running no-OS KVM domains: disk-only atomic (4 qcow2), RAM (--live, snapshot-save), btrfs backend, revert (internal with RAM, external --running), delete (external leaf, mid-chain): virt-snap vs libvirt 11.3 and bare floors",
    ),
    (
        "image-snapshot",
        "snapshot create/apply/delete on 8 GiB (4 GiB written) and N snapshots in a row: virt-snap vs qemu-img",
    ),
];

/// Run the named benchmark (or `list`).
pub fn run(args: &[String]) -> Result<(), String> {
    let name = args.first().map(String::as_str).unwrap_or("list");
    let rest = &args[args.len().min(1)..];
    match name {
        "list" => {
            for (n, what) in BENCHES {
                println!("{n:<16} {what}");
            }
            Ok(())
        }
        "domain" => domain::run(rest),
        "locking" => locking::run(rest),
        "qemu-start" => qemu_start::run(rest),
        "image-info" => image_info::run(rest),
        "image-snapshot" => image_snapshot::run(rest),
        "qmp" => qmp::run(rest),
        "snapshot" => snapshot::run(rest),
        "storage" => storage::run(rest),
        other => Err(format!(
            "unknown benchmark {other:?}; `cargo xtask bench list` shows them"
        )),
    }
}

/// Build the release binaries of `package` and return the release directory.
pub fn build_release(package: &str) -> Result<std::path::PathBuf, String> {
    step(&format!("cargo build --release -p {package}"));
    util::cargo(&["build", "--release", "--quiet", "-p", package])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(util::target_dir);
    Ok(target.join("release"))
}

/// Build only the binary `bin` of `package` in release mode; returns the release directory.
pub fn build_release_bin(package: &str, bin: &str) -> Result<std::path::PathBuf, String> {
    step(&format!("cargo build --release -p {package} --bin {bin}"));
    util::cargo(&["build", "--release", "--quiet", "-p", package, "--bin", bin])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(util::target_dir);
    Ok(target.join("release"))
}

/// Fail, saying how to install them, unless the programs `tools` are installed; with `kvm`,
/// also unless `/dev/kvm` can be opened (benchmarks that run KVM domains).
pub fn require(tools: &[&str], kvm: bool) -> Result<(), String> {
    for t in tools {
        if !util::have(t) {
            return Err(format!("`{t}` is not installed: run `cargo xtask deps`"));
        }
    }
    if kvm
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
    {
        return Err(
            "/dev/kvm cannot be opened: this benchmark runs KVM domains (run as root)".into(),
        );
    }
    Ok(())
}

/// Parse `--runs N` from the benchmark's arguments.
pub fn runs_arg(args: &[String], default: usize) -> Result<usize, String> {
    num_arg(args, "--runs", default)
}

/// Parse a numeric option `NAME N` from the benchmark's arguments.
pub fn num_arg(args: &[String], name: &str, default: usize) -> Result<usize, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}
