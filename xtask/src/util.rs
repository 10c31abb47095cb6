//! Small helpers shared by the xtask commands.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `<workspace>/target`, whatever CARGO_TARGET_DIR says: caches (guest image, venv, debs) live here.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

/// Print a step heading.
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Run cargo with the given arguments in the workspace root.
pub fn cargo(args: &[&str]) -> Result<(), String> {
    cargo_env(args, &[])
}

/// Run cargo with extra environment variables.
pub fn cargo_env(args: &[&str], envs: &[(&str, &OsStr)]) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(workspace_root());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// Run a command, failing with its name and exit status.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

/// Run a command and capture stdout as a string.
pub fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Is `prog` on PATH (or an absolute path that exists)?
pub fn have(prog: &str) -> bool {
    if prog.contains('/') {
        return std::path::Path::new(prog).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}
