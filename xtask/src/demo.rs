//! `cargo xtask demo [--keep]`: README's main job. It runs what virt-snap can do today on real
//! images and a real QEMU, printing every step with the exact command lines it runs, their
//! output (indented) and how long each took.
//!
//! The live path first: a dir pool with two qcow2 volumes; a no-OS KVM domain defined from
//! libvirt XML on them and started; an internal snapshot with RAM, reverted to in place; a live atomic disk-only
//! snapshot (its I/O stall measured); a `--live` RAM snapshot (its pause measured); the
//! snapshot tree; a revert to the RAM snapshot (a new QEMU loading it) and one to the disk-only
//! snapshot in the same QEMU; two deletes (the disks back on their volumes); a volume snapshot
//! refused while the domain runs, and done once it is destroyed. Then the image layer: native
//! image inspection (also while a running QEMU holds
//! the image), QEMU's image locks seen and respected, native internal snapshots checked by
//! qemu-img, and an offline volume snapshot reverted.
//!
//! Everything lives under target/demo (virt-snap's state included) and is made by the demo
//! itself; at the end, also on failure or Ctrl-C, the domain is destroyed and target/demo is
//! removed (`--keep` leaves the files).

use crate::util::{self, step, target_dir};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The domain the live path runs.
const DOMAIN: &str = "vm1";

/// Set by SIGINT/SIGTERM: the demo stops after the command under way and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// `demo`'s options.
struct Options {
    keep: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        match args {
            [] => Ok(Options { keep: false }),
            [k] if k == "--keep" => Ok(Options { keep: true }),
            _ => Err("usage: cargo xtask demo [--keep]".into()),
        }
    }
}

/// A duration as people read it: `8.1 ms`, `143 ms`, `2.4 s`.
fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 10_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// An argument as a shell would need it written.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Print `text` indented under its command line (a blank line stays blank).
fn indented(text: &str) {
    for line in text.lines() {
        if line.trim().is_empty() {
            println!();
        } else {
            println!("      {line}");
        }
    }
}

/// The running demo: where it works, how it runs virt-snap, and what its steps took.
struct Demo {
    vs: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    /// Each finished step: title, what it came to, how long it took.
    steps: Vec<(String, String, Duration)>,
    /// The step under way: title and start.
    current: Option<(String, Instant)>,
}

impl Demo {
    /// A virt-snap command in the demo's directory, with the demo's state dir.
    fn virt_snap(&self) -> Command {
        let mut c = Command::new(&self.vs);
        c.current_dir(&self.dir)
            .env("VIRT_SNAP_STATE_DIR", &self.state);
        c
    }

    /// Another tool (qemu-img, qemu-io) in the demo's directory.
    fn tool(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.current_dir(&self.dir);
        c
    }

    /// A path under the demo's directory.
    fn at(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Start step `title` (the previous one is done).
    fn step(&mut self, title: &str) {
        self.finish("ok");
        let n = self.steps.len() + 1;
        println!("\n==> {n}. {title}");
        self.current = Some((format!("{n}. {title}"), Instant::now()));
    }

    /// The step under way is over, with `result`.
    fn finish(&mut self, result: &str) {
        if let Some((title, t0)) = self.current.take() {
            self.steps.push((title, result.to_string(), t0.elapsed()));
        }
    }

    /// A line of explanation under the step.
    fn note(&self, text: &str) {
        println!("    {text}");
    }

    /// Print the command line, run it, print its output indented; returns the output and
    /// the time it took.
    fn exec(&self, cmd: &mut Command) -> Result<(Output, Duration), String> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        let prog = Path::new(cmd.get_program())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut line = vec![prog.clone()];
        line.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
        println!("\n    $ {}", line.join(" "));
        let t0 = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {prog}: {e}"))?;
        let took = t0.elapsed();
        indented(&String::from_utf8_lossy(&out.stdout));
        indented(&String::from_utf8_lossy(&out.stderr));
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        Ok((out, took))
    }

    /// Run a command that must succeed.
    fn show(&self, cmd: &mut Command) -> Result<Output, String> {
        let (out, took) = self.exec(cmd)?;
        if !out.status.success() {
            return Err(format!(
                "{:?} failed: {}",
                Path::new(cmd.get_program()).file_name().unwrap_or_default(),
                out.status
            ));
        }
        println!("    -> ok, {}", human(took));
        Ok(out)
    }

    /// Run virt-snap with `args`; it must succeed.
    fn vs(&self, args: &[&str]) -> Result<Output, String> {
        self.show(self.virt_snap().args(args))
    }

    /// A `snapshot-create-as ... --output json`: run it and say what it measured.
    fn snapshot(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["--output", "json", "snapshot-create-as"];
        all.extend_from_slice(args);
        let (out, took) = self.exec(self.virt_snap().args(&all))?;
        if !out.status.success() {
            return Err(format!("snapshot-create-as failed: {}", out.status));
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("snapshot-create-as printed no JSON: {e}"))?;
        let m = |k: &str| match &v[k] {
            Value::Null => "none".to_string(),
            n => format!("{n} ms"),
        };
        println!(
            "    -> ok, {} in all; vCPUs paused: {}, disk I/O stalled: {}, QEMU's RAM-save \
             downtime: {}",
            human(took),
            m("paused-ms"),
            m("stall-ms"),
            m("memory-downtime-ms")
        );
        Ok(v)
    }

    /// A `snapshot-revert ... --output json`: run it and say how it went.
    fn revert(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["--output", "json", "snapshot-revert"];
        all.extend_from_slice(args);
        let (out, took) = self.exec(self.virt_snap().args(&all))?;
        if !out.status.success() {
            return Err(format!("snapshot-revert failed: {}", out.status));
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("snapshot-revert printed no JSON: {e}"))?;
        println!(
            "    -> ok, {} in all ({} ms inside virt-snap): kind {}, the domain now {}",
            human(took),
            v["elapsed-ms"],
            v["kind"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?")
        );
        if let Some(w) = v["warnings"].as_array().filter(|w| !w.is_empty()) {
            for w in w {
                println!("    warning: {}", w.as_str().unwrap_or_default());
            }
        }
        Ok(v)
    }

    /// Run a command that must fail (a refusal), showing what it said.
    fn refused(&self, cmd: &mut Command) -> Result<(), String> {
        let (out, took) = self.exec(cmd)?;
        if out.status.success() {
            return Err(format!(
                "{:?} should have been refused",
                Path::new(cmd.get_program()).file_name().unwrap_or_default()
            ));
        }
        println!(
            "    -> refused as it should be (exit {}), {}",
            out.status.code().unwrap_or(-1),
            human(took)
        );
        Ok(())
    }
}

/// At the end, whatever happened: the domain destroyed, target/demo removed (unless --keep).
struct Cleanup {
    virt_snap: Command,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        println!("\n==> cleaning up");
        // Quietly: the domain is usually gone already.
        let gone = self
            .virt_snap
            .args(["destroy", DOMAIN])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if gone.is_ok_and(|s| s.success()) {
            println!("    {DOMAIN} destroyed (it was still running)");
        }
        if self.keep {
            println!("    files kept in {} (--keep)", self.dir.display());
        } else {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => println!("    {} removed", self.dir.display()),
                Err(e) => println!("    cannot remove {}: {e}", self.dir.display()),
            }
        }
    }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let opts = Options::parse(args)?;
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
        .map(PathBuf::from)
        .unwrap_or_else(target_dir)
        .join("debug");
    let dir = target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut demo = Demo {
        vs: bin_dir.join("virt-snap"),
        // All of virt-snap's state (pools, domains, snapshot metadata, leases) lives under
        // the demo's own directory.
        state: dir.join("state"),
        dir: dir.clone(),
        steps: Vec::new(),
        current: None,
    };
    // Ctrl-C reaches the command under way (same process group), which ends; the demo then
    // stops and cleans up instead of dying with a QEMU left running.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let handler = on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    let cleanup = Cleanup {
        virt_snap: demo.virt_snap(),
        dir: dir.clone(),
        keep: opts.keep,
    };
    println!(
        "\nEvery command below runs in {} with VIRT_SNAP_STATE_DIR={}.",
        dir.display(),
        demo.state.display()
    );
    let t0 = Instant::now();
    let result = live_path(&mut demo)
        .and_then(|()| image_layer(&mut demo, &bin_dir))
        .and_then(|()| volume_revert(&mut demo));
    demo.finish(if result.is_ok() { "ok" } else { "FAILED" });
    drop(cleanup);
    summary(&demo, t0.elapsed(), &result);
    result
}

/// The steps, what each came to and how long it took; then the one-paragraph summary.
fn summary(demo: &Demo, total: Duration, result: &Result<(), String>) {
    println!("\n==> summary");
    let width = demo.steps.iter().map(|s| s.0.len()).max().unwrap_or(0);
    for (title, res, took) in &demo.steps {
        println!("    {title:<width$}  {res:<6}  {:>8}", human(*took));
    }
    println!("    {:<width$}          {:>8}", "total", human(total));
    match result {
        Ok(()) => println!(
            "\ndemo done: a domain on pool volumes snapshotted live three ways (internal with \
             RAM, atomic disk-only, RAM saved with the guest running), reverted twice (its RAM \
             loaded into a new QEMU; its disks re-pointed in the same QEMU), two snapshots \
             deleted (the disks back on their volumes), its volumes guarded while it ran; qcow2 \
             headers, chains and snapshot tables read natively (also under a \
             running QEMU), QEMU's image locks seen and respected, internal snapshots taken and \
             applied natively (qemu-img agrees), a pool volume snapshotted and reverted."
        ),
        Err(e) => println!("\ndemo FAILED: {e}"),
    }
}

/// The live path: a domain on two qcow2 pool volumes, snapshotted while it runs.
fn live_path(d: &mut Demo) -> Result<(), String> {
    d.step("a dir pool with two qcow2 volumes");
    let pool = d.at("pool");
    std::fs::create_dir_all(&pool).map_err(|e| format!("{}: {e}", pool.display()))?;
    let pool_s = pool.display().to_string();
    d.vs(&["pool-define-as", "demo", "dir", &pool_s])?;
    d.vs(&["vol-create-as", "demo", "sys", "64M", "--format", "qcow2"])?;
    d.vs(&["vol-create-as", "demo", "data", "64M", "--format", "qcow2"])?;
    d.vs(&["vol-list", "demo"])?;

    d.step("a domain defined from libvirt XML on those volumes, and started");
    let xml = d.at("vm1.xml");
    std::fs::write(&xml, DOMAIN_XML).map_err(|e| format!("{}: {e}", xml.display()))?;
    d.note("vm1.xml (no guest OS: KVM, SeaBIOS finds nothing to boot; disks are pool volumes):");
    indented(DOMAIN_XML);
    d.vs(&["define", "vm1.xml"])?;
    d.vs(&["start", DOMAIN])?;
    d.vs(&["list"])?;
    d.vs(&["domblklist", DOMAIN])?;
    d.vs(&[
        "qemu-monitor-command",
        DOMAIN,
        r#"{"execute":"query-status"}"#,
    ])?;

    d.step("an internal snapshot with RAM (QEMU's snapshot-save: inside both qcow2 volumes)");
    d.note("internal first: it needs qcow2 disks with no external overlay above them");
    d.snapshot(&[DOMAIN, "booted", "--description", "internal, with RAM"])?;
    d.note("the snapshot is in the image itself, read natively while QEMU holds it:");
    d.vs(&["image", "snapshot", "list", "pool/sys"])?;

    d.step("a revert to it in place (snapshot-load in the same QEMU process: no restart)");
    d.revert(&[DOMAIN, "booted"])?;
    d.vs(&["domstate", DOMAIN, "--reason"])?;

    d.step("a live atomic disk-only snapshot (new qcow2 overlays, one QMP transaction)");
    d.note("no pause: the guest runs on; what it costs is the disks' I/O stall");
    d.snapshot(&[DOMAIN, "disks", "--disk-only", "--atomic"])?;
    d.vs(&["domblklist", DOMAIN])?;

    d.step("a --live RAM snapshot (RAM saved with the guest running, disks external)");
    let mem = d.at("vm1.live.mem");
    let memspec = format!("file={},snapshot=external", mem.display());
    d.snapshot(&[DOMAIN, "live", "--memspec", &memspec, "--live"])?;
    d.vs(&["domblklist", DOMAIN])?;

    d.step("the snapshot tree");
    d.vs(&["snapshot-list", DOMAIN, "--tree"])?;
    d.vs(&["snapshot-list", DOMAIN, "--parent"])?;
    d.vs(&["snapshot-info", DOMAIN, "--current"])?;

    d.step("a revert to the --live RAM snapshot (a new QEMU loads its RAM: -incoming defer)");
    d.note("the snapshot's images stay as they are: the disks get new overlays on them");
    d.revert(&[DOMAIN, "live"])?;
    d.vs(&["domblklist", DOMAIN])?;
    d.vs(&["snapshot-list", DOMAIN, "--tree"])?;

    d.step("a revert to the disk-only snapshot, in place (same QEMU: blockdev-reopen, reset)");
    d.note("disk-only: the guest restarts on the snapshot's disks; --running keeps QEMU up");
    d.revert(&[DOMAIN, "disks", "--running"])?;
    d.vs(&["domblklist", DOMAIN])?;
    d.vs(&["snapshot-list", DOMAIN, "--tree"])?;

    d.step("delete by live commit: the current layer merged down, then the one below");
    d.note("live's overlays merge into those of disks (active block-commit, the disks pivot);");
    d.note("its RAM file is kept");
    d.vs(&["snapshot-delete", DOMAIN, "live"])?;
    d.vs(&["domblklist", DOMAIN])?;
    d.note("disks' overlays merge into the volumes: the disks are back on their own files");
    d.vs(&["snapshot-delete", DOMAIN, "disks"])?;
    d.vs(&["domblklist", DOMAIN])?;
    d.vs(&["snapshot-list", DOMAIN, "--tree"])?;
    // PLACEHOLDER (delete): the delete of a snapshot with two children goes here once
    // block-stream is in (today it is refused with the reason, docs/delete.md).

    d.step("a volume snapshot refused while the domain runs");
    d.note("QEMU holds the volumes' leases (also of the backing files under the overlays):");
    d.refused(
        d.virt_snap()
            .args(["vol-snapshot-create", "data", "offline", "--pool", "demo"]),
    )?;

    d.step("the domain destroyed");
    d.vs(&["destroy", DOMAIN])?;
    d.vs(&["domstate", DOMAIN, "--reason"])?;

    d.step("the same volume snapshot, now that no QEMU holds the volume");
    d.vs(&["vol-snapshot-create", "data", "offline", "--pool", "demo"])?;
    d.note("(booted is the domain's internal snapshot, kept inside the same qcow2 volume)");
    d.vs(&["vol-snapshot-list", "data", "--pool", "demo"])?;
    Ok(())
}

/// The image layer: native reads, QEMU's locks, native internal snapshots.
fn image_layer(d: &mut Demo, bin_dir: &Path) -> Result<(), String> {
    d.step("images made by qemu-img: a base with two internal snapshots, an overlay on it");
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
        d.show(d.tool("qemu-img").args(args))?;
    }

    d.step("virt-snap reads them natively (no qemu-img, no locks)");
    d.vs(&["image", "info", "--backing-chain", "vm.qcow2"])?;
    d.vs(&["image", "snapshot", "list", "base.qcow2"])?;
    d.vs(&[
        "--output",
        "json",
        "image",
        "snapshot",
        "list",
        "base.qcow2",
    ])?;

    d.step("a bare QEMU 10.0.2 (KVM, no guest OS, started by the demo) opens vm.qcow2");
    let sock = d.at("qmp.sock");
    let log = std::fs::File::create(d.at("qemu.log")).map_err(|e| e.to_string())?;
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
                d.at("vm.qcow2").display()
            ))
            .args(["-blockdev", "driver=qcow2,file=vm-file,node-name=vm"])
            .args(["-device", "virtio-blk-pci,drive=vm,id=vm-dev"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Its own process group: Ctrl-C goes to the demo, which kills it on the way out.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("qemu-system-x86_64: {e} (run `cargo xtask deps`)"))?,
    );
    wait_for_qmp(&sock, &mut qemu.0)?;
    d.note("its status through qmp-proto (crates/qmp-proto/examples/query_status.rs):");
    d.show(Command::new(bin_dir.join("examples/query_status")).arg(&sock))?;

    d.step("while QEMU holds the image: read, see its locks, refuse to write");
    d.vs(&["image", "info", "vm.qcow2"])?;
    d.vs(&["image", "locks", "vm.qcow2"])?;
    d.note("virt-snap refuses to modify the image (so does qemu-img):");
    d.refused(
        d.virt_snap()
            .args(["image", "snapshot", "create", "vm.qcow2", "nope"]),
    )?;
    d.refused(
        d.tool("qemu-img")
            .args(["snapshot", "-c", "nope", "vm.qcow2"]),
    )?;
    drop(qemu);

    d.step("QEMU gone: native internal snapshots, checked by qemu-img");
    d.vs(&["image", "snapshot", "create", "vm.qcow2", "before-upgrade"])?;
    d.show(
        d.tool("qemu-io")
            .args(["-c", "write -P 0x42 0 1M", "vm.qcow2"]),
    )?;
    d.vs(&["image", "snapshot", "apply", "vm.qcow2", "before-upgrade"])?;
    d.show(d.tool("qemu-io").args(["-c", "read -P 0 0 1M", "vm.qcow2"]))?;
    d.show(d.tool("qemu-img").args(["snapshot", "-l", "vm.qcow2"]))?;
    d.show(d.tool("qemu-img").args(["check", "vm.qcow2"]))?;
    Ok(())
}

/// An offline volume snapshot taken, the volume changed, and reverted.
fn volume_revert(d: &mut Demo) -> Result<(), String> {
    d.step("an offline raw volume snapshotted, changed and reverted");
    d.vs(&["vol-create-as", "demo", "disk0", "64M", "--format", "raw"])?;
    let vol = d.at("pool/disk0");
    write_at(d, &vol, b"original data")?;
    d.vs(&["vol-snapshot-create", "disk0", "s1", "--pool", "demo"])?;
    write_at(d, &vol, b"CHANGED DATA!")?;
    d.vs(&["vol-snapshot-list", "disk0", "--pool", "demo"])?;
    d.vs(&["vol-snapshot-revert", "disk0", "s1", "--pool", "demo"])?;
    let mut back = [0u8; 13];
    {
        use std::io::Read;
        std::fs::File::open(&vol)
            .and_then(|mut f| f.read_exact(&mut back))
            .map_err(|e| format!("{}: {e}", vol.display()))?;
    }
    d.note(&format!(
        "after the revert the volume reads {:?}",
        String::from_utf8_lossy(&back)
    ));
    if &back != b"original data" {
        return Err("revert did not bring the original bytes back".into());
    }
    Ok(())
}

/// The demo's domain: no guest OS (KVM, SeaBIOS halts), two qcow2 volumes of the demo pool.
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
      <driver name='qemu' type='qcow2'/>
      <source pool='demo' volume='data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
";

/// Overwrite the start of a file, as a guest would write its disk.
fn write_at(d: &Demo, path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!();
    d.note(&format!(
        "(the demo wrote {:?} at the start of {})",
        String::from_utf8_lossy(data),
        path.strip_prefix(&d.dir).unwrap_or(path).display()
    ));
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
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err("interrupted".into());
        }
        if Instant::now() > deadline {
            return Err("QEMU's monitor did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
