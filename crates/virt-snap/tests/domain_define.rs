//! Defined domains through the library: the definition -> RunSpec mapping (a pool volume
//! leased by the pool's own key), redefinition keeping the uuid, a running domain's
//! definition replaced without touching its QEMU, undefine refused while it runs.

use std::path::Path;
use virt_snap::domain::{DiskBus, DiskDevice, DiskFormat, DiskLease, DomainKind, DomainState};
use virt_snap::pool::{PoolDef, PoolKind, VolFormat, VolumeSpec};
use virt_snap::{Connection, ErrorKind};

/// Kills a QEMU this test started when it ends, however it ends.
struct KillGuard(Vec<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if std::fs::metadata(format!("/proc/{pid}")).is_ok() {
                // SAFETY: kill(2) on a QEMU this test started (it may be gone already).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn xml(name: &str, memory_mib: u64, dir: &Path, uuid: Option<&str>) -> String {
    let uuid = uuid.map_or(String::new(), |u| format!("<uuid>{u}</uuid>"));
    let d = dir.display();
    format!(
        "<domain type='kvm'><name>{name}</name>{uuid}\
         <memory unit='MiB'>{memory_mib}</memory><vcpu current='1'>2</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
         <disk type='file'><driver name='qemu' type='raw'/><source file='{d}/a.raw'/>\
         <target dev='sda' bus='sata'/><shareable/></disk>\
         <disk type='volume'><source pool='p1' volume='v1'/><target dev='vdb'/></disk>\
         <disk type='file' device='cdrom'><driver type='raw'/><source file='{d}/cd.iso'/>\
         <target dev='sdc' bus='scsi'/><readonly/></disk>\
         <serial type='file'><source path='{d}/console.log'/></serial>\
         <channel type='unix'><source mode='bind' path='/anywhere.sock'/>\
         <target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <controller type='usb' model='none'/></devices></domain>"
    )
}

#[test]
fn definitions_map_onto_the_runtime_and_redefine_like_virsh() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for f in ["a.raw", "cd.iso"] {
        std::fs::File::create(d.join(f))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    std::fs::create_dir(d.join("pool")).unwrap();
    let conn = Connection::open(d.join("state")).unwrap();
    let rt = rt();
    conn.define_pool(PoolDef {
        name: "p1".into(),
        kind: PoolKind::Dir,
        target: d.join("pool").display().to_string(),
        thin_pool: None,
    })
    .unwrap();
    let pool = conn.pool("p1").unwrap();
    rt.block_on(pool.create_volume(&VolumeSpec {
        name: "v1".into(),
        capacity: 16 << 20,
        format: VolFormat::Qcow2,
        backing: None,
    }))
    .unwrap();

    let def = rt.block_on(conn.define(&xml("vm1", 128, d, None))).unwrap();
    let spec = rt.block_on(conn.run_spec(&def)).unwrap();
    assert_eq!(spec.kind, DomainKind::Kvm);
    assert_eq!(spec.uuid.as_deref(), Some(def.uuid.to_string().as_str()));
    assert_eq!((spec.memory_bytes, spec.vcpus), (128 << 20, 1));
    assert_eq!(spec.machine, "pc");
    assert_eq!(spec.serial_file, Some(d.join("console.log")));
    assert!(spec.agent, "the agent channel, its socket in the run dir");
    let [a, v, cd] = &spec.disks[..] else {
        panic!("{:?}", spec.disks)
    };
    assert_eq!(
        (a.bus, a.format, a.shareable),
        (DiskBus::Sata, DiskFormat::Raw, true)
    );
    assert_eq!(a.lease, DiskLease::file(d.join("a.raw")));
    let vol = pool.volume("v1");
    assert_eq!(
        v.path.display().to_string(),
        rt.block_on(vol.path()).unwrap()
    );
    assert_eq!(v.format, DiskFormat::Qcow2, "the volume's format");
    assert_eq!(v.bus, DiskBus::Virtio, "vd* is virtio");
    assert_eq!(v.lease, rt.block_on(DiskLease::volume(&vol)).unwrap());
    assert_eq!(
        (cd.device, cd.readonly, cd.bus),
        (DiskDevice::Cdrom, true, DiskBus::Scsi)
    );

    // Redefined without a uuid: it keeps its uuid; with another: refused.
    let again = rt.block_on(conn.define(&xml("vm1", 64, d, None))).unwrap();
    assert_eq!(again.uuid, def.uuid);
    let e = rt
        .block_on(conn.define(&xml(
            "vm1",
            64,
            d,
            Some("00000000-0000-4000-8000-000000000001"),
        )))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    // Another name with the same uuid: refused.
    let e = rt
        .block_on(conn.define(&xml("vm2", 64, d, Some(&def.uuid.to_string()))))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");

    // Running: a redefinition changes the stored definition only.
    let dom = rt.block_on(conn.start_defined("vm1", true)).unwrap();
    let _g = KillGuard(dom.pid().unwrap().into_iter().collect());
    let pid = dom.pid().unwrap();
    assert_eq!(rt.block_on(dom.state()).unwrap().state, DomainState::Paused);
    let e = rt.block_on(conn.start_defined("vm1", false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    rt.block_on(conn.define(&xml("vm1", 256, d, None))).unwrap();
    assert!(conn.dumpxml("vm1").unwrap().contains(">256<"));
    assert_eq!(dom.pid().unwrap(), pid, "the same QEMU");
    let e = rt.block_on(conn.undefine("vm1")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    rt.block_on(dom.destroy()).unwrap();
    let list = rt.block_on(conn.domains(true)).unwrap();
    assert_eq!(
        (list[0].state, list[0].persistent),
        (DomainState::ShutOff, true)
    );
    rt.block_on(conn.undefine("vm1")).unwrap();
    assert!(rt.block_on(conn.domains(true)).unwrap().is_empty());
    assert_eq!(
        conn.definition("vm1").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
