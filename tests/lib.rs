//! Helpers for the workspace-level end-to-end tests: they drive the real `virt-snap` binary.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

pub use testbed::qemu_img;

/// The `virt-snap` binary of this build (built on first use if `cargo test` has not built it).
pub fn virt_snap_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test>-<hash> -> target/<profile>/virt-snap
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join("virt-snap");
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "virt-snap", "--bin", "virt-snap"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "building virt-snap failed");
        }
        bin
    })
    .clone()
}

/// A `virt-snap` command with a clean environment for state resolution.
pub fn virt_snap() -> Command {
    let mut cmd = Command::new(virt_snap_bin());
    cmd.env_remove("VIRT_SNAP_STATE_DIR")
        .env_remove("XDG_STATE_HOME")
        .env_remove("RUST_LOG");
    cmd
}

/// Run and capture; panics if the binary cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run virt-snap")
}

/// stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `virt-snap --state-dir STATE ARGS...` and the checks every end-to-end test makes of it.
pub mod in_state {
    use super::{run, stderr, stdout, virt_snap};
    use std::path::Path;
    use std::process::Output;

    /// Run `virt-snap --state-dir state args...`.
    pub fn vs(state: &Path, args: &[&str]) -> Output {
        run(virt_snap().arg("--state-dir").arg(state).args(args))
    }

    /// A success: its stdout.
    pub fn ok(state: &Path, args: &[&str]) -> String {
        let o = vs(state, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    }

    /// A success with `--output json`: its one JSON document.
    pub fn ok_json(state: &Path, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&ok(state, &a)).expect("one JSON document")
    }

    /// The block nodes the running domain's QEMU has (`query-named-block-nodes`, flat).
    pub fn block_nodes(state: &Path, domain: &str) -> Vec<serde_json::Value> {
        let out = ok(
            state,
            &[
                "qemu-monitor-command",
                domain,
                r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("a QMP reply");
        v["return"].as_array().expect("a list of nodes").clone()
    }

    /// A failure: one line on stderr, a non-zero exit, nothing on stdout.
    pub fn fails(state: &Path, args: &[&str]) -> String {
        let o = vs(state, args);
        assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
        assert!(o.stdout.is_empty(), "{args:?}: {}", stdout(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
        assert!(err.starts_with("virt-snap: error: "), "{err:?}");
        assert!(!err.contains("panicked"), "{err:?}");
        err
    }
}

/// A no-OS KVM domain defined from libvirt XML (and started) through the CLI, with one qcow2
/// disk per target (`<target>.qcow2`, 16 MiB) in a temporary directory whose `state` is the
/// state dir; destroyed when dropped, however the test ends.
#[derive(Debug)]
pub struct NoOsDomain {
    tmp: tempfile::TempDir,
    /// The temporary directory, canonical.
    pub dir: PathBuf,
    /// The state dir.
    pub state: PathBuf,
    /// The domain's name.
    pub name: String,
}

impl NoOsDomain {
    /// `virt-snap CMD DOMAIN REST...` for `args` = `[CMD, REST...]`: a success, its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let mut a = args.to_vec();
        a.insert(1, &self.name);
        in_state::ok(&self.state, &a)
    }

    /// [`NoOsDomain::ok`] with `--output json`: its one JSON document.
    pub fn ok_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.insert(1, &self.name);
        in_state::ok_json(&self.state, &a)
    }

    /// Defines and starts `name` with disks `targets` (`vda`, ...).
    pub fn start(name: &str, targets: &[&str]) -> NoOsDomain {
        let d = NoOsDomain::define(name, targets);
        in_state::ok(&d.state, &["start", name]);
        d
    }

    /// Defines `name` with disks `targets` (`vda`, ...), shut off.
    pub fn define(name: &str, targets: &[&str]) -> NoOsDomain {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let dir = std::fs::canonicalize(tmp.path()).expect("canonical");
        let mut disks = String::new();
        for t in targets {
            let p = dir.join(format!("{t}.qcow2"));
            qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"]);
            disks += &format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{t}' bus='virtio'/></disk>",
                p.display()
            );
        }
        let xml = dir.join(format!("{name}.xml"));
        std::fs::write(
            &xml,
            format!(
                "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory>\
                 <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
                 {disks}<controller type='usb' model='none'/><memballoon model='none'/>\
                 </devices></domain>"
            ),
        )
        .expect("write the domain XML");
        let d = NoOsDomain {
            state: dir.join("state"),
            dir,
            tmp,
            name: name.to_string(),
        };
        in_state::ok(&d.state, &["define", xml.to_str().unwrap()]);
        d
    }

    /// The state dir.
    pub fn s(&self) -> &std::path::Path {
        &self.state
    }

    /// A disk's original image, `<dir>/<target>.qcow2`.
    pub fn disk(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.qcow2"))
    }

    /// `domblklist`: (target, source) of each disk.
    pub fn blklist(&self) -> Vec<(String, String)> {
        let v = in_state::ok_json(&self.state, &["domblklist", &self.name]);
        let disks = v
            .as_array()
            .or_else(|| v["disks"].as_array())
            .expect("disks");
        disks
            .iter()
            .map(|d| {
                (
                    d["target"].as_str().unwrap_or_default().to_string(),
                    d["source"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The temporary directory (kept alive by this value).
    pub fn tmp(&self) -> &std::path::Path {
        self.tmp.path()
    }
}

impl Drop for NoOsDomain {
    fn drop(&mut self) {
        let _ = in_state::vs(&self.state, &["destroy", &self.name]);
    }
}

/// `qemu-io -c CMD` on image `p` as it is, with or without a backing file (the domain shut
/// off; testbed's `qemu_io` passes options for a backing file, which an image without one
/// refuses); panics if it fails or a pattern does not verify.
pub fn qemu_io_as_is(p: &std::path::Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-c", cmd])
        .arg(p)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmd} {}: {text} {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
