//! The state directory.
//!
//! Resolution order, the same everywhere: `--state-dir DIR`, else `$VIRT_SNAP_STATE_DIR`, else
//! `$XDG_STATE_HOME/virt-snap`, else `$HOME/.local/state/virt-snap`.
//!
//! Layout: `pools/` (one JSON file per pool), `locks/` (the lockspace: one lease file per
//! volume), `domains/` (one libvirt domain XML file per defined domain), `run/` (one directory per
//! domain that runs or ran: its record, sockets, logs). The directory and everything virt-snap creates in it are private to the user:
//! directories `0700` ([`DIR_MODE`]), files `0600`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub use locking::LOCKSPACE_SUBDIR;
pub use storage_backends::POOLS_SUBDIR;

/// The mode of the state directory and of the directories in it.
pub const DIR_MODE: u32 = 0o700;

/// The lockspace directory of the state directory `state_dir`.
pub fn lockspace(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCKSPACE_SUBDIR)
}

/// Create the state directory `state_dir` and its subdirectories, [`DIR_MODE`] (missing
/// parents too). Existing directories are left as they are.
pub fn create(state_dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(DIR_MODE);
    b.create(state_dir)?;
    for sub in [
        POOLS_SUBDIR,
        LOCKSPACE_SUBDIR,
        crate::domain::runstate::RUN_SUBDIR,
        crate::domain::DOMAINS_SUBDIR,
    ] {
        b.create(state_dir.join(sub))?;
    }
    Ok(())
}

/// Environment variable naming the state directory.
pub const ENV_STATE_DIR: &str = "VIRT_SNAP_STATE_DIR";

/// Resolve the state directory from an explicit choice and an environment lookup.
///
/// `env` is a lookup function so that resolution is testable without touching the process
/// environment. Empty variables count as unset, as the XDG base directory spec says.
pub fn resolve(explicit: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = var(ENV_STATE_DIR) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = var("XDG_STATE_HOME").filter(|p| Path::new(p).is_absolute()) {
        return Some(Path::new(&p).join("virt-snap"));
    }
    var("HOME").map(|h| Path::new(&h).join(".local/state/virt-snap"))
}

/// Resolve the state directory from the process environment.
pub fn resolve_from_env(explicit: Option<&Path>) -> Option<PathBuf> {
    resolve(explicit, |k| std::env::var(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn order_of_resolution() {
        let all = [
            ("VIRT_SNAP_STATE_DIR", "/v"),
            ("XDG_STATE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(resolve(Some(Path::new("/e")), env(&all)), Some("/e".into()));
        assert_eq!(resolve(None, env(&all)), Some("/v".into()));
        assert_eq!(resolve(None, env(&all[1..])), Some("/x/virt-snap".into()));
        assert_eq!(
            resolve(None, env(&all[2..])),
            Some("/h/.local/state/virt-snap".into())
        );
        assert_eq!(resolve(None, env(&[])), None);
    }

    #[test]
    fn empty_and_relative_xdg_are_ignored() {
        let e = env(&[
            ("VIRT_SNAP_STATE_DIR", ""),
            ("XDG_STATE_HOME", "rel"),
            ("HOME", "/h"),
        ]);
        assert_eq!(resolve(None, e), Some("/h/.local/state/virt-snap".into()));
    }
}
