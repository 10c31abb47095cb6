//! QEMU's command line for a [`RunSpec`].

use super::spec::{DiskBus, DiskDevice, DomainKind, RunSpec};
use std::path::Path;

/// The files of a domain's run directory, as QEMU names them: `dir` is how QEMU reaches the
/// run directory (`/proc/self/fd/N` of an inherited `O_PATH` descriptor, so that a long
/// state-dir path never exceeds the 107 bytes of a unix socket path, and stays valid after
/// `-daemonize` changes QEMU's working directory to `/`).
#[derive(Debug, Clone)]
pub(crate) struct RunFiles<'a> {
    pub dir: &'a str,
    /// A second QMP monitor for the lease keeper (cluster lockspaces).
    pub keeper: bool,
}

impl RunFiles<'_> {
    pub fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }
}

/// QEMU's option syntax doubles commas inside values.
/// QEMU's protocol driver for image `path`: `host_device` for a block device (QEMU's `file`
/// driver refuses one), else `file`.
pub(crate) fn protocol_driver(path: &Path) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => "host_device",
        _ => "file",
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The arguments (without the binary) for `spec`, under kind `kind` (resolved), with the
/// disk images at `paths` (canonical, in `spec.disks` order) and the run directory `run`.
pub(crate) fn build(
    spec: &RunSpec,
    uuid: &str,
    kind: DomainKind,
    paths: &[std::path::PathBuf],
    run: &RunFiles<'_>,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    let accel = if kind == DomainKind::Kvm {
        "kvm"
    } else {
        "tcg"
    };
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", esc(&spec.name)),
    ]);
    push(&["-uuid", uuid]);
    push(&["-machine", &format!("{},accel={accel}", esc(&spec.machine))]);
    push(&["-m", &format!("{}M", spec.memory_bytes >> 20)]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=vs-monitor,path={},server=on,wait=off",
            esc(&run.file("qmp.sock"))
        ),
        "-mon",
        "chardev=vs-monitor,mode=control",
    ]);
    if run.keeper {
        push(&[
            "-chardev",
            &format!(
                "socket,id=vs-keeper,path={},server=on,wait=off",
                esc(&run.file(super::keeper::MONITOR))
            ),
            "-mon",
            "chardev=vs-keeper,mode=control",
        ]);
    }
    push(&["-pidfile", &run.file("qemu.pid")]);
    push(&["-D", &run.file("qemu.log")]);
    push(&["-daemonize"]);
    if spec.paused {
        push(&["-S"]);
    }
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &lossy(k)]);
    }
    if let Some(i) = &spec.initrd {
        push(&["-initrd", &lossy(i)]);
    }
    if let Some(c) = &spec.cmdline {
        push(&["-append", c]);
    }
    if let Some(s) = &spec.serial_file {
        push(&[
            "-chardev",
            &format!("file,id=vs-serial0,path={}", esc(&lossy(s))),
            "-serial",
            "chardev:vs-serial0",
        ]);
    }
    if spec.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
        push(&["-device", "virtio-scsi-pci,id=vs-scsi0"]);
    }
    let mut sata_port = 0;
    for (d, path) in spec.disks.iter().zip(paths) {
        let ro = d.readonly || d.device == DiskDevice::Cdrom;
        let ro = if ro { "on" } else { "off" };
        let proto = protocol_driver(path);
        push(&[
            "-blockdev",
            &format!(
                "driver={proto},filename={},node-name={},read-only={ro},discard=unmap",
                esc(&lossy(path)),
                d.file_node()
            ),
        ]);
        push(&[
            "-blockdev",
            &format!(
                "driver={},file={},node-name={},read-only={ro},discard=unmap",
                d.format.as_str(),
                d.file_node(),
                d.format_node()
            ),
        ]);
        let model = match (d.bus, d.device) {
            (DiskBus::Virtio, _) => "virtio-blk-pci".to_string(),
            (DiskBus::Sata, DiskDevice::Disk) => "ide-hd".into(),
            (DiskBus::Sata, DiskDevice::Cdrom) => "ide-cd".into(),
            (DiskBus::Scsi, DiskDevice::Disk) => "scsi-hd".into(),
            (DiskBus::Scsi, DiskDevice::Cdrom) => "scsi-cd".into(),
        };
        let mut dev = format!("{model},drive={},id={}", d.format_node(), d.qdev());
        match d.bus {
            DiskBus::Sata => {
                dev.push_str(&format!(",bus=ide.{sata_port}"));
                sata_port += 1;
            }
            DiskBus::Scsi => dev.push_str(",bus=vs-scsi0.0"),
            DiskBus::Virtio => {}
        }
        if d.shareable {
            dev.push_str(",share-rw=on");
        }
        push(&["-device", &dev]);
    }
    if spec.agent {
        push(&[
            "-chardev",
            &format!(
                "socket,id=vs-agent,path={},server=on,wait=off",
                esc(&run.file("qga.sock"))
            ),
            "-device",
            "virtio-serial-pci,id=vs-vser0",
            "-device",
            "virtserialport,bus=vs-vser0.0,chardev=vs-agent,name=org.qemu.guest_agent.0",
        ]);
    }
    a.extend(spec.extra_args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::spec::{DiskFormat, DiskSpec};

    #[test]
    fn disks_get_stable_node_names_and_sockets_live_in_the_run_dir() {
        let mut s = RunSpec::new("vm,1");
        s.disks
            .push(DiskSpec::file("/i/a,b.qcow2", DiskFormat::Qcow2, "vda"));
        let mut cd = DiskSpec::file("/i/c.iso", DiskFormat::Raw, "sda");
        cd.bus = DiskBus::Sata;
        cd.device = DiskDevice::Cdrom;
        s.disks.push(cd);
        s.agent = true;
        let paths: Vec<_> = s.disks.iter().map(|d| d.path.clone()).collect();
        let run = RunFiles {
            dir: "/proc/self/fd/7",
            keeper: false,
        };
        let a = build(&s, "u", DomainKind::Kvm, &paths, &run).join(" ");
        assert!(a.contains("-name guest=vm,,1,debug-threads=on"), "{a}");
        assert!(a.contains("-machine q35,accel=kvm -m 256M"), "{a}");
        assert!(a.contains("path=/proc/self/fd/7/qmp.sock,server=on,wait=off"));
        assert!(
            a.contains("driver=file,filename=/i/a,,b.qcow2,node-name=vs-vda-file,read-only=off")
        );
        assert!(a.contains("driver=qcow2,file=vs-vda-file,node-name=vs-vda-fmt"));
        assert!(a.contains("-device virtio-blk-pci,drive=vs-vda-fmt,id=vs-vda"));
        assert!(a.contains("node-name=vs-sda-file,read-only=on"));
        assert!(a.contains("-device ide-cd,drive=vs-sda-fmt,id=vs-sda,bus=ide.0"));
        assert!(a.contains("path=/proc/self/fd/7/qga.sock"));
        assert!(a.contains("name=org.qemu.guest_agent.0"));
        assert!(a.contains("-daemonize") && a.contains("-pidfile /proc/self/fd/7/qemu.pid"));
    }
}
