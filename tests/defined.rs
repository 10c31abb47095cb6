//! Defined domains on the real binary against QEMU 10.0.2: define from libvirt XML, start
//! (file and pool-volume disks), list, domstate, domblklist, dumpxml, monitor commands,
//! leases against volume operations both ways, kill -9 and restart, destroy, undefine; the
//! test guest defined from XML answering its agent; user errors.

use locking::{LockManager, Purpose, Resource};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testbed::{DiskFormat, Qemu};
use virt_snap_e2e::in_state::{fails, ok, ok_json, vs};
use virt_snap_e2e::{stderr, stdout};

/// Kills the QEMUs the test started when it ends, however it ends.
#[derive(Default)]
struct KillGuard(Vec<u32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                // SAFETY: kill(2) on a QEMU this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// The QEMU pid of a running domain.
fn pid_of(state: &Path, dom: &str) -> u32 {
    ok_json(state, &["domstate", dom])["pid"]
        .as_u64()
        .expect("a pid") as u32
}

fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("32M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    p
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A no-OS KVM domain with the given `<disk>` elements.
fn domain_xml(name: &str, disks: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <metadata>\n    \
         <app:tag xmlns:app='urn:example:app' rank='1'>kept</app:tag>\n  </metadata>\n  \
         <memory unit='MiB'>128</memory>\n  <vcpu placement='static'>1</vcpu>\n  <os>\n    \
         <type arch='x86_64' machine='q35'>hvm</type>\n    <boot dev='hd'/>\n  </os>\n  \
         <on_crash>destroy</on_crash>\n  <devices>\n{disks}    <memballoon model='none'/>\n  \
         </devices>\n</domain>\n"
    )
}

fn file_disk(path: &Path, format: &str, dev: &str) -> String {
    format!(
        "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}' \
         cache='none'/>\n      <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    \
         </disk>\n",
        path.display()
    )
}

fn volume_disk(pool: &str, vol: &str, dev: &str) -> String {
    format!(
        "    <disk type='volume' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
         <source pool='{pool}' volume='{vol}'/>\n      <target dev='{dev}' bus='virtio'/>\n    \
         </disk>\n"
    )
}

#[test]
fn define_start_list_dumpxml_leases_kill_9_restart_destroy_undefine() {
    let tmp = tempfile::tempdir().unwrap();
    let s = &tmp.path().join("state");
    let mut guard = KillGuard::default();
    let d0 = std::fs::canonicalize(qcow2(tmp.path(), "d0.qcow2")).unwrap();
    let pool_dir = tmp.path().join("pool");
    std::fs::create_dir(&pool_dir).unwrap();
    ok(
        s,
        &["pool-define-as", "p1", "dir", pool_dir.to_str().unwrap()],
    );
    ok(s, &["vol-create-as", "p1", "v1", "16M"]);
    let v1 = ok_json(s, &["vol-path", "v1", "--pool", "p1"])["path"]
        .as_str()
        .unwrap()
        .to_string();
    let xml = domain_xml(
        "vm1",
        &(file_disk(&d0, "qcow2", "vda") + &volume_disk("p1", "v1", "vdb")),
    );
    let file = write(tmp.path(), "vm1.xml", &xml);

    assert_eq!(
        ok(s, &["define", &file]),
        format!("Domain 'vm1' defined from {file}\n")
    );
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&s.join("domains")), 0o700);
    assert_eq!(mode(&s.join("domains/vm1.xml")), 0o600);
    let out = ok(s, &["list", "--all"]);
    assert!(out.contains(" -    vm1    shut off\n"), "{out}");
    assert_eq!(ok(s, &["list"]).lines().count(), 3, "{out}");
    assert_eq!(
        ok(s, &["domstate", "vm1", "--reason"]),
        "shut off (unknown)\n\n"
    );

    // dumpxml: the definition as libvirt writes it, unknown parts kept, a uuid added.
    let dump = ok(s, &["dumpxml", "vm1"]);
    for kept in [
        "<app:tag xmlns:app='urn:example:app' rank='1'>kept</app:tag>",
        "cache='none'",
        "<boot dev='hd'/>",
        "<on_crash>destroy</on_crash>",
        "<source pool='p1' volume='v1'/>",
    ] {
        assert!(dump.contains(kept), "{kept}: {dump}");
    }
    let uuid = ok_json(s, &["dumpxml", "vm1"]);
    assert_eq!(uuid["xml"], dump);
    let uuid = dump
        .split_once("<uuid>")
        .and_then(|(_, r)| r.split_once("</uuid>"))
        .unwrap()
        .0
        .to_string();
    // Redefining without a uuid keeps it.
    ok(s, &["define", &file]);
    assert!(ok(s, &["dumpxml", "vm1"]).contains(&uuid));

    // Start refused while a volume operation holds a disk: the pool volume, the plain file.
    let locks = LockManager::for_state_dir(s).unwrap();
    for (held, what) in [
        (Resource::file(&v1), &v1),
        (Resource::file(&d0), &d0.display().to_string()),
    ] {
        let h = locks
            .acquire(&Purpose::VolumeOp {
                op: "snapshot revert".into(),
                volumes: vec![held],
            })
            .unwrap();
        let e = fails(s, &["start", "vm1"]);
        assert!(e.contains("snapshot revert"), "{e}");
        assert!(e.contains(what.as_str()), "{what}: {e}");
        drop(h);
    }
    assert_eq!(
        ok(s, &["domstate", "vm1", "--reason"]),
        "shut off (unknown)\n\n",
        "a start refused on its leases leaves no record"
    );

    assert_eq!(ok(s, &["start", "vm1"]), "Domain 'vm1' started\n");
    let pid = pid_of(s, "vm1");
    guard.0.push(pid);
    let e = fails(s, &["start", "vm1"]);
    assert!(e.contains("already running"), "{e}");
    let out = ok(s, &["list"]);
    assert!(out.contains(&format!(" {pid}   vm1    running\n")), "{out}");
    let v = ok_json(s, &["list", "--all"]);
    assert_eq!(v[0]["persistent"], true);
    assert_eq!(ok(s, &["domstate", "vm1"]), "running\n\n");
    let out = ok(s, &["domblklist", "vm1"]);
    assert!(
        out.contains(&format!(" vda      {}\n", d0.display())),
        "{out}"
    );
    assert!(out.contains(&format!(" vdb      {v1}\n")), "{out}");
    let v: serde_json::Value = serde_json::from_str(&ok(
        s,
        &[
            "qemu-monitor-command",
            "vm1",
            r#"{"execute":"query-status"}"#,
        ],
    ))
    .unwrap();
    assert_eq!(v["return"]["status"], "running");
    // The uuid of the definition is the VM's.
    let v: serde_json::Value = serde_json::from_str(&ok(
        s,
        &["qemu-monitor-command", "vm1", r#"{"execute":"query-uuid"}"#],
    ))
    .unwrap();
    assert_eq!(v["return"]["UUID"], uuid.as_str());
    assert_eq!(ok(s, &["dumpxml", "vm1"]), dump, "running: the same XML");

    // Volume operations are refused while it runs, naming the domain.
    let e = fails(s, &["vol-snapshot-create", "v1", "s1", "--pool", "p1"]);
    assert!(e.contains("domain \"vm1\""), "{e}");
    let e = fails(
        s,
        &["image", "snapshot", "create", d0.to_str().unwrap(), "s1"],
    );
    assert!(e.contains("domain \"vm1\""), "{e}");
    let e = fails(s, &["undefine", "vm1"]);
    assert!(e.contains("is running"), "{e}");

    // kill -9: shut off (crashed), the leases gone, volume operations and a restart work.
    // SAFETY: kill(2) on the QEMU this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t = Instant::now();
    loop {
        let out = ok(s, &["domstate", "vm1", "--reason"]);
        if out == "shut off (crashed)\n\n" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    while locks
        .holders(&Resource::file(&d0))
        .is_ok_and(|h| !h.is_empty())
    {
        assert!(t.elapsed() < Duration::from_secs(5), "leases stay");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(locks.holders(&Resource::file(&v1)).unwrap().is_empty());
    ok(s, &["vol-snapshot-create", "v1", "s1", "--pool", "p1"]);
    ok(
        s,
        &["image", "snapshot", "create", d0.to_str().unwrap(), "s1"],
    );
    let v = ok_json(s, &["start", "vm1", "--paused"]);
    assert_eq!(v["name"], "vm1");
    let pid = v["pid"].as_u64().unwrap() as u32;
    guard.0.push(pid);
    assert_eq!(
        ok(s, &["domstate", "vm1", "--reason"]),
        "paused (starting up)\n\n"
    );

    assert_eq!(ok(s, &["destroy", "vm1"]), "Domain 'vm1' destroyed\n");
    let out = ok(s, &["list", "--all"]);
    assert!(out.contains(" -    vm1    shut off\n"), "{out}");
    assert_eq!(
        ok(s, &["undefine", "vm1"]),
        "Domain 'vm1' has been undefined\n"
    );
    assert_eq!(
        ok(s, &["list", "--all"]),
        " Id   Name   State\n--------------------\n\n"
    );
    let e = fails(s, &["dumpxml", "vm1"]);
    assert!(e.contains("not defined"), "{e}");
    assert!(!s.join("domains/vm1.xml").exists());
}

#[test]
fn the_test_guest_defined_from_xml_answers_guest_ping() {
    let image = testbed::guest_dir().expect("the test guest (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().unwrap();
    let s = &tmp.path().join("state");
    let mut guard = KillGuard::default();
    // The guest's /init mounts an ext4 data disk at /dev/vda.
    let data = tmp.path().join("data.raw");
    testbed::make_data_disk(&data, 64 << 20).expect("the guest's data disk");
    let boot = testbed::GuestBoot::from_dir(&image);
    let console = tmp.path().join("console.log");
    let xml = format!(
        "<domain type='qemu'>\n  <name>guest1</name>\n  <memory unit='KiB'>262144</memory>\n  \
         <currentMemory unit='KiB'>262144</currentMemory>\n  <vcpu>1</vcpu>\n  <os>\n    \
         <type arch='x86_64' machine='q35'>hvm</type>\n    <kernel>{}</kernel>\n    \
         <initrd>{}</initrd>\n    <cmdline>{}</cmdline>\n  </os>\n  <devices>\n    \
         <emulator>/usr/bin/qemu-system-x86_64</emulator>\n{}    <serial type='file'>\n      \
         <source path='{}'/>\n      <target port='0'/>\n    </serial>\n    \
         <channel type='unix'>\n      <source mode='bind' path='/nonexistent/ignored.sock'/>\n      \
         <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n  \
         </devices>\n</domain>\n",
        boot.kernel.display(),
        boot.initrd.display(),
        boot.cmdline,
        file_disk(&data, "raw", "vda"),
        console.display(),
    );
    let file = write(tmp.path(), "guest1.xml", &xml);
    let v = ok_json(s, &["define", &file]);
    assert_eq!(v["name"], "guest1");
    ok(s, &["start", "guest1"]);
    guard.0.push(pid_of(s, "guest1"));
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let o = vs(
            s,
            &[
                "qemu-agent-command",
                "guest1",
                r#"{"execute":"guest-ping"}"#,
                "--timeout",
                "3",
            ],
        );
        if o.status.success() {
            assert_eq!(stdout(&o), "{\"return\":{}}\n");
            break;
        }
        assert!(
            Instant::now() < end,
            "the agent never answered: {}; console: {}",
            stderr(&o),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(std::fs::read_to_string(&console).unwrap().contains("Linux"));
    ok(s, &["destroy", "guest1"]);
    ok(s, &["undefine", "guest1"]);
}

#[test]
fn user_errors_are_one_line_and_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let s = &tmp.path().join("state");
    let mut guard = KillGuard::default();
    let d = tmp.path();
    for args in [
        &["start", "nosuch"][..],
        &["dumpxml", "nosuch"],
        &["undefine", "nosuch"],
    ] {
        let e = fails(s, args);
        assert!(e.contains("\"nosuch\" is not defined"), "{args:?}: {e}");
    }
    let e = fails(s, &["define", d.join("missing.xml").to_str().unwrap()]);
    assert!(e.contains("missing.xml"), "{e}");
    let e = fails(
        s,
        &[
            "define",
            &write(d, "bad.xml", "<domain type='kvm'><name>x</nam"),
        ],
    );
    assert!(e.contains("invalid domain XML"), "{e}");
    let e = fails(s, &["define", &write(d, "empty.xml", "")]);
    assert!(e.contains("invalid domain XML"), "{e}");
    let img = qcow2(d, "i.qcow2");
    let nic = domain_xml("vm1", &file_disk(&img, "qcow2", "vda"))
        .replace("<devices>\n", "<devices>\n    <interface type='user'/>\n");
    let e = fails(s, &["define", &write(d, "nic.xml", &nic)]);
    assert!(e.contains("devices/interface"), "{e}");
    let xen = domain_xml("vm1", "").replace("type='kvm'", "type='xen'");
    let e = fails(s, &["define", &write(d, "xen.xml", &xen)]);
    assert!(e.contains("domain type='xen'"), "{e}");
    let net = domain_xml(
        "vm1",
        "    <disk type='network'><source protocol='nbd' name='x'/><target dev='vda'/></disk>\n",
    );
    let e = fails(s, &["define", &write(d, "net.xml", &net)]);
    assert!(e.contains("disk type='network'"), "{e}");
    for bad in ["a/b", "..", "."] {
        let e = fails(s, &["define", &write(d, "n.xml", &domain_xml(bad, ""))]);
        assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
    }
    for bad in ["a/b", ".."] {
        let e = fails(s, &["start", bad]);
        assert!(e.contains("invalid domain name"), "{e}");
    }
    assert!(
        !s.join("domains").read_dir().unwrap().any(|_| true),
        "nothing stored"
    );

    // A missing disk file: defined, and the start names it.
    let gone = d.join("gone.qcow2");
    ok(
        s,
        &[
            "define",
            &write(
                d,
                "g.xml",
                &domain_xml("g", &file_disk(&gone, "qcow2", "vda")),
            ),
        ],
    );
    let e = fails(s, &["start", "g"]);
    assert!(e.contains(gone.to_str().unwrap()), "{e}");
    // A relative path is refused.
    let rel = domain_xml("r", &file_disk(Path::new("rel.qcow2"), "qcow2", "vda"));
    ok(s, &["define", &write(d, "r.xml", &rel)]);
    let e = fails(s, &["start", "r"]);
    assert!(e.contains("not an absolute path"), "{e}");
    // No format given for a qcow2 image: refused rather than probed.
    let nofmt = file_disk(&img, "qcow2", "vda").replace(" type='qcow2'", "");
    ok(s, &["define", &write(d, "f.xml", &domain_xml("f", &nofmt))]);
    let e = fails(s, &["start", "f"]);
    assert!(e.contains("is a qcow2 image"), "{e}");

    // A disk a QEMU of another tool holds.
    let qemu = Qemu::builder()
        .disk("d0", DiskFormat::Qcow2, 32 << 20)
        .spawn()
        .expect("start QEMU");
    let held = std::fs::canonicalize(&qemu.disk("d0").path).unwrap();
    ok(
        s,
        &[
            "define",
            &write(
                d,
                "h.xml",
                &domain_xml("h", &file_disk(&held, "qcow2", "vda")),
            ),
        ],
    );
    let e = fails(s, &["start", "h"]);
    assert!(e.contains(held.to_str().unwrap()), "{e}");
    assert!(e.contains(&qemu.pid().to_string()), "names the QEMU: {e}");
    drop(qemu);

    // Start twice, undefine while running.
    ok(
        s,
        &[
            "define",
            &write(
                d,
                "ok.xml",
                &domain_xml("vm1", &file_disk(&img, "qcow2", "vda")),
            ),
        ],
    );
    let v = ok_json(s, &["start", "vm1"]);
    guard.0.push(v["pid"].as_u64().unwrap() as u32);
    let e = fails(s, &["start", "vm1"]);
    assert!(e.contains("already running"), "{e}");
    let e = fails(s, &["undefine", "vm1"]);
    assert!(e.contains("is running"), "{e}");
    // A different uuid for a defined name is refused.
    let other = domain_xml("vm1", "").replace(
        "<name>vm1</name>",
        "<name>vm1</name><uuid>00000000-0000-4000-8000-000000000001</uuid>",
    );
    let e = fails(s, &["define", &write(d, "u.xml", &other)]);
    assert!(e.contains("already defined with uuid"), "{e}");
    ok(s, &["destroy", "vm1"]);
    ok(s, &["undefine", "vm1"]);
}

#[test]
fn a_defined_domains_disk_files_are_recorded_as_the_users() {
    // A user's overlay named as virt-snap names its own (`vda.s1` on `vda.qcow2`).
    let d = virt_snap_e2e::NoOsDomain::define("def-owner", &["vda"]);
    let base = d.disk("vda");
    let mine = d.dir.join("vda.s1");
    virt_snap_e2e::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        mine.to_str().unwrap(),
    ]);
    let xml = ok(d.s(), &["dumpxml", "def-owner"]).replace(
        &format!("file='{}'", base.display()),
        &format!("file='{}'", mine.display()),
    );
    let f = d.dir.join("redefined.xml");
    std::fs::write(&f, xml).unwrap();
    ok(d.s(), &["define", f.to_str().unwrap()]);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.s().join("snapshots/def-owner/overlays")).unwrap())
            .unwrap();
    for p in [&base, &mine] {
        assert_eq!(
            rec["overlays"][p.to_str().unwrap()]["by"],
            "user",
            "{p:?}: {rec}"
        );
    }
    // Their snapshots' deletes keep them: the disk ends on the user's file, both there.
    ok(
        d.s(),
        &["snapshot-create-as", "def-owner", "s2", "--disk-only"],
    );
    ok(d.s(), &["snapshot-delete", "def-owner", "s2"]);
    assert!(mine.exists() && base.exists());
    let xml = ok(d.s(), &["dumpxml", "def-owner"]);
    assert!(xml.contains(&format!("file='{}'", mine.display())), "{xml}");
}
