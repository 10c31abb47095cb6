//! Shared pieces of the benchmark drivers: each driver prints one JSON line per measured
//! series, `{"label": ..., "wall_ns": [...]}`, which `cargo xtask bench` parses.

use std::time::Duration;

/// Print one series as a JSON line.
pub fn emit(label: &str, wall: &[Duration]) {
    let ns: Vec<u64> = wall.iter().map(|d| d.as_nanos() as u64).collect();
    println!("{}", serde_json::json!({ "label": label, "wall_ns": ns }));
}

/// The QEMU command line every start-up measurement uses (no guest OS, KVM, no disks).
pub fn qemu_args(qmp_socket: &std::path::Path) -> Vec<String> {
    [
        "-machine",
        "q35,accel=kvm",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-qmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("unix:{},server=on,wait=off", qmp_socket.display())])
    .collect()
}
