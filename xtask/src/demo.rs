//! `cargo xtask demo`: README's main job. It runs what virt-snap can do today on real images
//! and a real QEMU, printing every command it runs and what it showed.
//!
//! Today: native image inspection (`image info`, `--backing-chain`, `image snapshot list`),
//! also while a running QEMU holds the image; QMP through qmp-proto; QEMU's image locks seen
//! (`image locks`) and respected (a write is refused while QEMU runs); native internal
//! snapshots checked by qemu-img; a dir-pool volume snapshot and revert; a domain defined
//! from libvirt XML on pool volumes, started (QEMU holds the volumes' leases: an offline
//! volume snapshot is refused until it is destroyed). Live snapshots of running VMs come
//! with the capture layer.

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
    // All of virt-snap's state (leases, pools) lives under the demo's own directory.
    let state = at("state");
    let virt_snap = || {
        let mut c = Command::new(&vs);
        c.current_dir(&dir).env("VIRT_SNAP_STATE_DIR", &state);
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
    step("   virt-snap sees QEMU's image locks, and who holds them");
    show(virt_snap().args(["image", "locks", "vm.qcow2"]))?;
    step("   ... and refuses to modify the image (so does qemu-img)");
    expect_refusal(virt_snap().args(["image", "snapshot", "create", "vm.qcow2", "nope"]))?;
    expect_refusal(
        Command::new("qemu-img")
            .args(["snapshot", "-c", "nope", "vm.qcow2"])
            .current_dir(&dir),
    )?;
    drop(qemu);

    step("5. QEMU gone: native internal snapshots, checked by qemu-img");
    show(virt_snap().args(["image", "snapshot", "create", "vm.qcow2", "before-upgrade"]))?;
    show(
        Command::new("qemu-io")
            .args(["-c", "write -P 0x42 0 1M", "vm.qcow2"])
            .current_dir(&dir),
    )?;
    show(virt_snap().args(["image", "snapshot", "apply", "vm.qcow2", "before-upgrade"]))?;
    show(
        Command::new("qemu-io")
            .args(["-c", "read -P 0 0 1M", "vm.qcow2"])
            .current_dir(&dir),
    )?;
    show(
        Command::new("qemu-img")
            .args(["snapshot", "-l", "vm.qcow2"])
            .current_dir(&dir),
    )?;
    show(
        Command::new("qemu-img")
            .args(["check", "vm.qcow2"])
            .current_dir(&dir),
    )?;

    step("6. offline volume snapshots on a dir pool (state in target/demo/state)");
    std::fs::create_dir_all(at("pool")).map_err(|e| e.to_string())?;
    show(
        virt_snap()
            .args(["pool-define-as", "demo", "dir"])
            .arg(at("pool")),
    )?;
    show(virt_snap().args(["vol-create-as", "demo", "disk0", "64M", "--format", "raw"]))?;
    let vol = at("pool/disk0");
    let vol = if vol.exists() {
        vol
    } else {
        at("pool/disk0.raw")
    };
    write_at(&vol, b"original data")?;
    show(virt_snap().args(["vol-snapshot-create", "disk0", "s1", "--pool", "demo"]))?;
    write_at(&vol, b"CHANGED DATA!")?;
    show(virt_snap().args(["vol-snapshot-list", "disk0", "--pool", "demo"]))?;
    show(virt_snap().args(["vol-snapshot-revert", "disk0", "s1", "--pool", "demo"]))?;
    let mut back = [0u8; 13];
    {
        use std::io::Read;
        std::fs::File::open(&vol)
            .and_then(|mut f| f.read_exact(&mut back))
            .map_err(|e| format!("{}: {e}", vol.display()))?;
    }
    println!(
        "\nafter revert the volume reads {:?}",
        String::from_utf8_lossy(&back)
    );
    if &back != b"original data" {
        return Err("revert did not bring the original bytes back".into());
    }

    step("7. a domain defined from libvirt XML on two pool volumes; QEMU holds their leases");
    show(virt_snap().args(["vol-create-as", "demo", "sys", "64M", "--format", "qcow2"]))?;
    let xml = at("vm1.xml");
    std::fs::write(&xml, DOMAIN_XML).map_err(|e| format!("{}: {e}", xml.display()))?;
    println!("\n(vm1.xml: a no-OS KVM domain, disks vda = volume demo/sys, vdb = demo/disk0)");
    show(virt_snap().arg("define").arg(&xml))?;
    let started = Instant::now();
    show(virt_snap().args(["start", "vm1"]))?;
    println!("(started in {} ms)", started.elapsed().as_millis());
    // Whatever happens next, the demo's QEMU does not outlive it.
    let _stop = DestroyOnDrop(virt_snap());
    show(virt_snap().args(["list"]))?;
    show(virt_snap().args(["domblklist", "vm1"]))?;
    show(virt_snap().args([
        "qemu-monitor-command",
        "vm1",
        r#"{"execute":"query-status"}"#,
    ]))?;
    step("   while vm1 runs, its volumes cannot be snapshotted offline");
    expect_refusal(virt_snap().args(["vol-snapshot-create", "disk0", "s2", "--pool", "demo"]))?;
    let started = Instant::now();
    show(virt_snap().args(["destroy", "vm1"]))?;
    println!("(destroyed in {} ms)", started.elapsed().as_millis());
    show(virt_snap().args(["domstate", "vm1", "--reason"]))?;
    step("   vm1 gone: the same volume snapshot succeeds");
    show(virt_snap().args(["vol-snapshot-create", "disk0", "s2", "--pool", "demo"]))?;
    show(virt_snap().args(["undefine", "vm1"]))?;

    println!(
        "\ndemo done: read qcow2 headers, backing chains and snapshot tables natively (also \
         under a running QEMU), saw and respected QEMU's image locks, took and applied internal \
         snapshots natively (qemu-img agrees), snapshotted and reverted a pool volume, and ran \
         a domain defined from libvirt XML whose QEMU held its volumes' leases. Files are in {}.",
        dir.display()
    );
    Ok(())
}

/// The demo's domain: no guest OS (KVM, SeaBIOS halts), two volumes of the demo pool.
const DOMAIN_XML: &str = "<domain type='kvm'>
  <name>vm1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='demo' volume='sys'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='demo' volume='disk0'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
";

/// Destroys the demo's domain when dropped (quietly: it is usually gone already).
struct DestroyOnDrop(Command);
impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        let _ = self
            .0
            .args(["destroy", "vm1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Run a command that must fail (a refusal), showing what it said.
fn expect_refusal(cmd: &mut Command) -> Result<(), String> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let name = Path::new(&prog)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or(prog);
    println!("\n$ {name} {}", args.join(" "));
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    print!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        return Err(format!("{name} should have been refused"));
    }
    println!("(refused, exit {})", out.status.code().unwrap_or(-1));
    Ok(())
}

/// Overwrite the start of a file, as a guest would write its disk.
fn write_at(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "\n(wrote {:?} at the start of {})",
        String::from_utf8_lossy(data),
        path.display()
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
