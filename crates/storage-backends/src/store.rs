//! Pool definitions persisted in the state directory: `<state>/pools/NAME.json`.

use crate::error::{Error, ErrorKind, Result};
use crate::model::{PoolDef, PoolKind};
use crate::name::{check_lvm_name, check_name, NameOf};
use std::path::{Path, PathBuf};

/// The directory of pool definitions under a state directory.
pub const POOLS_SUBDIR: &str = "pools";

/// Pool definitions in `<state>/pools`, one JSON file per pool, written atomically
/// (temporary file, fsync, rename).
#[derive(Debug, Clone)]
pub struct PoolStore {
    dir: PathBuf,
}

impl PoolStore {
    /// The store under `state_dir` (created on first write).
    pub fn for_state_dir(state_dir: &Path) -> PoolStore {
        PoolStore {
            dir: state_dir.join(POOLS_SUBDIR),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }
    /// Validate and persist a new definition. The target must exist: a directory for dir and
    /// btrfs pools (on btrfs for the latter), a valid volume group name for logical pools
    /// (its existence is checked when the pool is used, by the tools).
    pub fn define(&self, def: &PoolDef) -> Result<()> {
        check_name(NameOf::Pool, &def.name)?;
        match def.kind {
            PoolKind::Dir | PoolKind::Btrfs => {
                let t = Path::new(&def.target);
                if !t.is_absolute() {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("pool target {:?} must be an absolute path", def.target),
                    ));
                }
                if !t.is_dir() {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("pool target {} is not a directory", t.display()),
                    ));
                }
                if def.kind == PoolKind::Btrfs && !crate::fsutil::is_btrfs(t)? {
                    return Err(Error::new(
                        ErrorKind::NotSupported,
                        format!("pool target {} is not on a btrfs filesystem", t.display()),
                    ));
                }
                if def.thin_pool.is_some() {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "a thin pool is for logical pools only",
                    ));
                }
            }
            PoolKind::Logical => {
                check_lvm_name(NameOf::Pool, &def.target)
                    .map_err(|e| e.context("volume group name"))?;
                if let Some(tp) = &def.thin_pool {
                    check_lvm_name(NameOf::Volume, tp).map_err(|e| e.context("thin pool"))?;
                }
            }
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("create {}", self.dir.display()), e))?;
        let path = self.path(&def.name);
        if path.exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("pool {:?} is already defined", def.name),
            ));
        }
        let json = serde_json::to_vec_pretty(def).expect("pool definitions serialize");
        let tmp = self
            .dir
            .join(format!(".{}.json.tmp-{}", def.name, std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Not readable by other users.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            // No replacing: a racing define of the same name loses.
            std::fs::hard_link(&tmp, &path)?;
            std::fs::remove_file(&tmp)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    ErrorKind::AlreadyExists,
                    format!("pool {:?} is already defined", def.name),
                )
            } else {
                Error::io(format!("write {}", path.display()), e)
            }
        })
    }
    /// The definition of pool `name`.
    pub fn get(&self, name: &str) -> Result<PoolDef> {
        check_name(NameOf::Pool, name)?;
        let path = self.path(name);
        let data = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, format!("pool {name:?} is not defined"))
            } else {
                Error::io(format!("read {}", path.display()), e)
            }
        })?;
        serde_json::from_slice(&data).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("pool definition {} is damaged: {e}", path.display()),
            )
        })
    }
    /// All definitions, sorted by name.
    pub fn list(&self) -> Result<Vec<PoolDef>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", self.dir.display()), e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("read {}", self.dir.display()), e))?;
            let n = ent.file_name().to_string_lossy().into_owned();
            if let Some(name) = n.strip_suffix(".json") {
                if !name.starts_with('.') {
                    out.push(self.get(name)?);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    /// Forget pool `name` (its volumes are left alone, as `virsh pool-undefine` does).
    pub fn undefine(&self, name: &str) -> Result<PoolDef> {
        let def = self.get(name)?;
        let path = self.path(name);
        std::fs::remove_file(&path)
            .map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
        Ok(def)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_get_list_undefine() {
        let state = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let s = PoolStore::for_state_dir(state.path());
        assert!(s.list().unwrap().is_empty());
        let def = PoolDef {
            name: "p1".into(),
            kind: PoolKind::Dir,
            target: target.path().display().to_string(),
            thin_pool: None,
        };
        s.define(&def).unwrap();
        assert_eq!(s.define(&def).unwrap_err().kind(), ErrorKind::AlreadyExists);
        assert_eq!(s.get("p1").unwrap(), def);
        let lv = PoolDef {
            name: "lv".into(),
            kind: PoolKind::Logical,
            target: "vg0".into(),
            thin_pool: Some("tp".into()),
        };
        s.define(&lv).unwrap();
        assert_eq!(s.list().unwrap(), vec![lv.clone(), def.clone()]);
        // btrfs on a non-btrfs directory (the tempdir is on the host's ext4 or tmpfs).
        let e = s
            .define(&PoolDef {
                name: "b".into(),
                kind: PoolKind::Btrfs,
                ..def.clone()
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
        let e = s
            .define(&PoolDef {
                name: "../x".into(),
                ..def.clone()
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(s.undefine("p1").unwrap(), def);
        assert_eq!(s.get("p1").unwrap_err().kind(), ErrorKind::NotFound);
        assert!(target.path().exists());
    }
}
