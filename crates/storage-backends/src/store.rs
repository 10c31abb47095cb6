//! Pool definitions persisted in the state directory: `<state>/pools/NAME.json`.

use crate::error::{Error, ErrorKind, Result};
use crate::model::{PoolDef, PoolKind};
use crate::name::{check_lvm_name, check_name, NameOf};
use std::path::{Path, PathBuf};

/// The directory of pool definitions under a state directory.
pub const POOLS_SUBDIR: &str = "pools";

/// Pool definitions in `<state>/pools`, one JSON file per pool (mode 0600, in a 0700
/// directory), written atomically (temporary file, fsync, link, fsync of the directory).
/// A damaged file is that pool's problem only: [`PoolStore::scan`] lists the others and
/// names it, [`PoolStore::undefine`] removes it.
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
    /// Make the directory's entries (a new or removed definition) durable.
    fn sync_dir(&self) -> std::io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
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
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| Error::io(format!("create {}", self.dir.display()), e))?;
        }
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
            std::fs::remove_file(&tmp)?;
            self.sync_dir()
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
    /// The definition of pool `name`. [`ErrorKind::Damaged`] if its file cannot be read
    /// back as one (the message names the file).
    pub fn get(&self, name: &str) -> Result<PoolDef> {
        check_name(NameOf::Pool, name)?;
        let path = self.path(name);
        let damaged = |why: String| {
            Error::new(
                ErrorKind::Damaged,
                format!(
                    "pool definition {} is damaged: {why} (`pool-undefine {name}` removes it)",
                    path.display()
                ),
            )
        };
        let data = read_regular(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::new(ErrorKind::NotFound, format!("pool {name:?} is not defined"))
            }
            std::io::ErrorKind::InvalidData => damaged(e.to_string()),
            _ => Error::io(format!("read {}", path.display()), e),
        })?;
        let def: PoolDef = serde_json::from_slice(&data).map_err(|e| damaged(e.to_string()))?;
        if def.name != name {
            return Err(damaged(format!("it defines pool {:?}", def.name)));
        }
        Ok(def)
    }
    /// All definitions that can be read, sorted by name, and the damaged ones (sorted by
    /// name, each with its error): one damaged file does not hide the other pools.
    pub fn scan(&self) -> Result<PoolListing> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PoolListing::default()),
            Err(e) => return Err(Error::io(format!("read {}", self.dir.display()), e)),
        };
        let mut out = PoolListing::default();
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("read {}", self.dir.display()), e))?;
            let n = ent.file_name().to_string_lossy().into_owned();
            let Some(name) = n.strip_suffix(".json") else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            match self.get(name) {
                Ok(def) => out.pools.push(def),
                // A file name that is no pool name is damage too (written by hand).
                Err(e) if matches!(e.kind(), ErrorKind::Damaged | ErrorKind::InvalidInput) => {
                    out.damaged.push(DamagedPool {
                        name: name.to_string(),
                        path: ent.path(),
                        error: e,
                    })
                }
                // Removed meanwhile by a racing undefine.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.pools.sort_by(|a, b| a.name.cmp(&b.name));
        out.damaged.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    /// All definitions that can be read, sorted by name (damaged ones are left out: see
    /// [`PoolStore::scan`]).
    pub fn list(&self) -> Result<Vec<PoolDef>> {
        Ok(self.scan()?.pools)
    }
    /// Forget pool `name` (its volumes are left alone, as `virsh pool-undefine` does). A
    /// damaged definition is removed all the same: `Ok(None)`.
    pub fn undefine(&self, name: &str) -> Result<Option<PoolDef>> {
        let def = match self.get(name) {
            Ok(def) => Some(def),
            Err(e) if e.kind() == ErrorKind::Damaged => None,
            Err(e) => return Err(e),
        };
        let path = self.path(name);
        // A directory named NAME.json is damage too; it is only removed if empty.
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&path),
            _ => std::fs::remove_file(&path),
        };
        removed.map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
        self.sync_dir()
            .map_err(|e| Error::io(format!("fsync {}", self.dir.display()), e))?;
        Ok(def)
    }
}

/// What [`PoolStore::scan`] found.
#[derive(Debug, Default)]
pub struct PoolListing {
    /// The readable definitions, sorted by name.
    pub pools: Vec<PoolDef>,
    /// The damaged ones, sorted by name.
    pub damaged: Vec<DamagedPool>,
}

/// A pool definition file that cannot be read back.
#[derive(Debug)]
pub struct DamagedPool {
    /// The pool's name (the file name without `.json`).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it ([`ErrorKind::Damaged`], or `InvalidInput` for a file name
    /// that is no pool name); its message names the file.
    pub error: Error,
}

/// Read `path` if it is a regular file (without blocking on a FIFO); `InvalidData` if it is
/// something else.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(data)
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
        assert_eq!(s.undefine("p1").unwrap(), Some(def.clone()));
        assert_eq!(s.get("p1").unwrap_err().kind(), ErrorKind::NotFound);
        assert!(target.path().exists());
    }

    #[test]
    fn a_damaged_definition_is_named_and_hides_no_other_pool() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        let s = PoolStore::for_state_dir(state.path());
        let def = |name: &str| PoolDef {
            name: name.into(),
            kind: PoolKind::Dir,
            target: target.path().display().to_string(),
            thin_pool: None,
        };
        s.define(&def("a")).unwrap();
        s.define(&def("z")).unwrap();
        let dir = state.path().join(POOLS_SUBDIR);
        // Nobody else may read them.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("a.json")), 0o600);
        std::fs::write(dir.join("bad.json"), b"{\"name\": \"bad\", trunc").unwrap();
        std::fs::write(
            dir.join("other.json"),
            serde_json::to_vec(&def("someone")).unwrap(),
        )
        .unwrap();
        std::fs::create_dir(dir.join("adir.json")).unwrap();
        assert!(std::process::Command::new("mkfifo")
            .arg(dir.join("fifo.json"))
            .status()
            .unwrap()
            .success());
        std::fs::write(dir.join("bad name!.json"), b"{}").unwrap();
        // Answered at once (a FIFO does not block the scan), the good pools all there.
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || tx.send(s2.scan().map(|l| (l.pools, l.damaged))));
        let (pools, damaged) = rx
            .recv_timeout(std::time::Duration::from_secs(1))
            .expect("scan answered within a second")
            .unwrap();
        assert_eq!(pools, vec![def("a"), def("z")]);
        assert_eq!(s.list().unwrap(), vec![def("a"), def("z")]);
        let names: Vec<&str> = damaged.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["adir", "bad", "bad name!", "fifo", "other"]);
        for d in &damaged {
            let msg = d.error.to_string();
            assert_eq!(d.error.kind(), ErrorKind::Damaged, "{msg}");
            assert!(msg.contains(&*d.path.to_string_lossy()), "{msg}");
            assert!(msg.contains("is damaged"), "{msg}");
        }
        assert!(damaged[4]
            .error
            .to_string()
            .contains("defines pool \"someone\""));
        assert_eq!(s.get("bad").unwrap_err().kind(), ErrorKind::Damaged);
        // Undefining a damaged pool removes its file; the others stay.
        for n in ["bad", "other", "adir", "fifo", "bad name!"] {
            assert_eq!(s.undefine(n).unwrap(), None, "{n}");
            assert!(std::fs::symlink_metadata(dir.join(format!("{n}.json"))).is_err());
        }
        assert_eq!(s.get("bad").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(s.list().unwrap(), vec![def("a"), def("z")]);
        assert_eq!(s.undefine("a").unwrap(), Some(def("a")));
    }
}
