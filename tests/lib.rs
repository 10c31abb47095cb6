//! Helpers for the workspace-level end-to-end tests: they drive the real `virt-snap` binary.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

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
