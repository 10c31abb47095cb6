//! Helpers shared by the backend tests.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use storage_backends::{
    Backend, CommandRunner, LocalRunner, PoolDef, PoolKind, VolFormat, VolumeSpec,
};

/// Lease manager in its own temporary lockspace.
pub fn locks(dir: &Path) -> locking::LockManager {
    locking::LockManager::local(dir.join("locks")).unwrap()
}

pub fn open(
    kind: PoolKind,
    target: &str,
    runner: Arc<dyn CommandRunner>,
    locks: locking::LockManager,
) -> Box<dyn Backend> {
    storage_backends::open_pool(
        PoolDef {
            name: "p".into(),
            kind,
            target: target.into(),
            thin_pool: None,
        },
        runner,
        locks,
    )
    .unwrap()
}

pub fn local() -> Arc<dyn CommandRunner> {
    Arc::new(LocalRunner)
}

pub fn spec(name: &str, size: u64, format: VolFormat) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        capacity: size,
        format,
        backing: None,
    }
}

/// Write `data` at each offset of a raw file.
pub fn write_raw(path: &Path, offsets: &[u64], data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for &o in offsets {
        f.write_all_at(data, o).unwrap();
    }
    f.sync_all().unwrap();
}

pub fn read_raw(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Write a byte pattern into a qcow2 image with qemu-io (the real QEMU block layer).
pub fn qcow2_write(path: &Path, pattern: u8, off: u64, len: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern} {off} {len}"))
        .arg(path)
        .output()
        .expect("qemu-io (install qemu-utils: `cargo xtask deps`)");
    assert!(out.status.success(), "{out:?}");
}

/// The guest-visible bytes of a qcow2 image (qemu-img convert to raw).
pub fn qcow2_read(path: &Path, off: usize, len: usize) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(tmp.path())
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    std::fs::read(tmp.path()).unwrap()[off..off + len].to_vec()
}

/// Every entry under `dir`, recursively, relative.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}
