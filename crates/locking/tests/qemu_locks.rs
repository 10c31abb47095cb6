//! The probe against a real QEMU holding real images.

use locking::qemu::{probe, Permission::*};
use testbed::{DiskFormat, Qemu};

#[test]
fn probe_sees_a_running_qemus_locks_and_their_release() {
    let mut qemu = Qemu::builder()
        .disk("rw", DiskFormat::Qcow2, 32 << 20)
        .disk("ro", DiskFormat::Raw, 8 << 20)
        .read_only()
        .spawn()
        .expect("start QEMU");
    let rw = qemu.disk("rw").path.clone();
    let ro = qemu.disk("ro").path.clone();
    let s = probe(&rw).unwrap();
    assert_eq!(s.held, vec![ConsistentRead, Write, Resize]);
    assert_eq!(s.unshared, vec![Write, Resize]);
    assert_eq!(s.bytes(), vec![100, 101, 103, 201, 203]);
    let s = probe(&ro).unwrap();
    // A read-only device: consistent read held, write not shared (a read-only *backing*
    // file additionally refuses to share resize: 100, 201, 203).
    assert_eq!(s.bytes(), vec![100, 201], "read-only disk");
    // Copy the image aside: after QEMU is gone, no lock remains.
    let keep = qemu
        .dir()
        .parent()
        .unwrap()
        .join(format!("vs-lock-{}.qcow2", std::process::id()));
    std::fs::copy(&rw, &keep).unwrap();
    qemu.kill();
    assert!(!probe(&rw).unwrap().in_use());
    assert!(!probe(&keep).unwrap().in_use());
    std::fs::remove_file(keep).unwrap();
}
