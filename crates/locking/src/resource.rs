//! Resources that leases protect, and their canonical keys.
//!
//! A file is keyed by its canonical path: absolute, every symlink resolved, no `.` or `..`
//! (like `realpath -m`: components that do not exist yet are kept as written, so a volume
//! about to be created has the key it will have once it exists). An LVM logical volume or a
//! btrfs subvolume is keyed by its UUID where the backend has one, so that renames and other
//! paths to the same volume share one lease. The lease file is named by the SHA-256 of the
//! key, as virtlockd names its indirect leases.

use crate::Error;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What kind of UUID names a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum UuidKind {
    /// An LVM logical volume's UUID (`lvs -o lv_uuid`).
    LvmLv,
    /// A btrfs subvolume's UUID (`btrfs subvolume show`).
    BtrfsSubvolume,
}

/// A resource a lease protects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resource {
    /// A disk image or other volume file, by path (relative paths resolve against the current
    /// directory when the key is computed).
    File(PathBuf),
    /// A volume known by a UUID.
    Uuid {
        /// Which kind of UUID.
        kind: UuidKind,
        /// The UUID.
        uuid: String,
        /// How to show the volume to people (e.g. `vg0/root` or a subvolume path).
        display: String,
        /// The path QEMU opens for this volume (an LV's device node), if any: QEMU's image
        /// locks are taken and probed on it.
        image: Option<PathBuf>,
    },
    /// A btrfs pool's volume by its pool-relative identity: the subvolume directory
    /// `TARGET/NAME`, keyed by its canonical path like [`Resource::File`] (so the key exists
    /// before the subvolume does, and stays when a revert swaps in another subvolume with
    /// another UUID). `image` is the volume file inside it, which QEMU opens: QEMU's image
    /// locks are taken and probed there.
    Subvolume {
        /// The subvolume's directory.
        dir: PathBuf,
        /// The volume file QEMU opens (`TARGET/NAME/volume.FMT`).
        image: PathBuf,
    },
    /// An LVM pool's volume by its pool-relative identity `VG/LV`, keyed `lvm:VG/LV` (stays
    /// when a revert renames another LV into its place). `image` is its device node
    /// `/dev/VG/LV` when the volume group is on this host.
    LogicalVolume {
        /// The volume group.
        vg: String,
        /// The logical volume's name.
        lv: String,
        /// The device node QEMU opens, if on this host.
        image: Option<PathBuf>,
    },
    /// A domain's operation lock, by the domain's name: held (exclusively) by whatever
    /// operation works on the running domain, so that two never interleave.
    DomainOps(String),
}

impl Resource {
    /// A file resource.
    pub fn file(path: impl Into<PathBuf>) -> Resource {
        Resource::File(path.into())
    }

    /// The canonical key, resolving relative paths against the current directory.
    pub fn key(&self) -> Result<ResourceKey, Error> {
        match self {
            Resource::File(p) | Resource::Subvolume { dir: p, .. } => {
                let cwd = if p.is_absolute() {
                    PathBuf::from("/")
                } else {
                    std::env::current_dir().map_err(|e| Error::io("current directory for", p, e))?
                };
                self.key_from(&cwd)
            }
            Resource::Uuid { .. } | Resource::LogicalVolume { .. } | Resource::DomainOps(_) => {
                self.key_from(Path::new("/"))
            }
        }
    }

    /// The canonical key, resolving relative paths against `base`.
    pub fn key_from(&self, base: &Path) -> Result<ResourceKey, Error> {
        match self {
            Resource::File(p) => {
                let canon = canonical_path(base, p)?;
                Ok(ResourceKey {
                    canonical: canon.as_os_str().as_bytes().to_vec(),
                    display: canon.display().to_string(),
                    image: Some(canon),
                })
            }
            Resource::Uuid {
                kind,
                uuid,
                display,
                image,
            } => {
                let u = uuid.trim();
                let ok_chars = u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if u.is_empty() || u.len() > 64 || !ok_chars {
                    return Err(Error::invalid(uuid.clone(), "not a UUID"));
                }
                // btrfs prints lowercase hex UUIDs; LVM's are case-sensitive base-62-ish.
                let canonical = match kind {
                    UuidKind::BtrfsSubvolume => u.to_ascii_lowercase(),
                    UuidKind::LvmLv => u.to_string(),
                };
                let image = match image {
                    Some(p) => Some(canonical_path(Path::new("/"), p)?),
                    None => None,
                };
                Ok(ResourceKey {
                    canonical: canonical.into_bytes(),
                    display: if display.is_empty() {
                        u.to_string()
                    } else {
                        display.clone()
                    },
                    image,
                })
            }
            Resource::Subvolume { dir, image } => {
                let canon = canonical_path(base, dir)?;
                let image = canonical_path(base, image)?;
                Ok(ResourceKey {
                    canonical: canon.as_os_str().as_bytes().to_vec(),
                    display: image.display().to_string(),
                    image: Some(image),
                })
            }
            Resource::LogicalVolume { vg, lv, image } => {
                let bad = |n: &str| n.is_empty() || n.contains(['/', '\0']);
                if bad(vg) || bad(lv) {
                    return Err(Error::invalid(
                        format!("{vg}/{lv}"),
                        "not a logical volume (VG/LV)",
                    ));
                }
                let image = match image {
                    Some(p) => Some(canonical_path(Path::new("/"), p)?),
                    None => None,
                };
                // Never a path (no leading '/') nor a UUID (':' is not a UUID character).
                Ok(ResourceKey {
                    canonical: format!("lvm:{vg}/{lv}").into_bytes(),
                    display: format!("{vg}/{lv}"),
                    image,
                })
            }
            Resource::DomainOps(name) => {
                if name.is_empty() || name.contains('\0') {
                    return Err(Error::invalid(name.clone(), "not a domain name"));
                }
                // Never a path (no leading '/') nor a UUID (':' is not a UUID character).
                let mut canonical = b"domain-ops:".to_vec();
                canonical.extend_from_slice(name.as_bytes());
                Ok(ResourceKey {
                    canonical,
                    display: format!("domain {name:?}"),
                    image: None,
                })
            }
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::File(p) => write!(f, "{}", p.display()),
            Resource::Uuid { display, uuid, .. } if display.is_empty() => f.write_str(uuid),
            Resource::Uuid { display, .. } => f.write_str(display),
            Resource::Subvolume { image, .. } => write!(f, "{}", image.display()),
            Resource::LogicalVolume { vg, lv, .. } => write!(f, "{vg}/{lv}"),
            Resource::DomainOps(name) => write!(f, "domain {name:?}"),
        }
    }
}

/// A resource's canonical key: what the lease is named after.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    canonical: Vec<u8>,
    display: String,
    image: Option<PathBuf>,
}

impl ResourceKey {
    /// The canonical key's bytes (a canonical path, or a UUID).
    pub fn canonical(&self) -> &[u8] {
        &self.canonical
    }
    /// Is this a domain's operation lock ([`Resource::DomainOps`])?
    pub fn is_domain_ops(&self) -> bool {
        self.canonical.starts_with(b"domain-ops:")
    }
    /// How the resource is shown to people.
    pub fn display(&self) -> &str {
        &self.display
    }
    /// The file QEMU opens for the resource, if there is one (where QEMU's image locks live).
    pub fn image(&self) -> Option<&Path> {
        self.image.as_deref()
    }
    /// The lowercase hex SHA-256 of the canonical key: the lease file's name.
    pub fn hash(&self) -> String {
        let d = Sha256::digest(&self.canonical);
        let mut s = String::with_capacity(64);
        for b in d {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// Symlinks followed before giving up, as Linux does (ELOOP).
const MAX_LINKS: u32 = 40;

/// `realpath -m`: make `path` absolute against `base` (itself made absolute against `/`),
/// resolve every symlink of the components that exist, and drop `.` and `..` (a `..` after a
/// symlink goes to the parent of the link's target, as the kernel does).
pub fn canonical_path(base: &Path, path: &Path) -> Result<PathBuf, Error> {
    if path.as_os_str().is_empty() {
        return Err(Error::invalid("", "empty path"));
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(Error::invalid(
            path.display().to_string(),
            "path contains a NUL byte",
        ));
    }
    let mut todo: VecDeque<OsString> = VecDeque::new();
    let push_all = |todo: &mut VecDeque<OsString>, p: &Path, front: bool| {
        let mut parts: Vec<OsString> = Vec::new();
        for c in p.components() {
            match c {
                Component::RootDir => parts.push(OsString::from("/")),
                Component::CurDir => {}
                Component::ParentDir => parts.push(OsString::from("..")),
                Component::Normal(n) => parts.push(n.to_os_string()),
                Component::Prefix(_) => {}
            }
        }
        if front {
            for part in parts.into_iter().rev() {
                todo.push_front(part);
            }
        } else {
            todo.extend(parts);
        }
    };
    if !path.is_absolute() {
        todo.push_back(OsString::from("/"));
        push_all(&mut todo, base, false);
    }
    push_all(&mut todo, path, false);

    let mut out = PathBuf::from("/");
    let mut links = 0u32;
    while let Some(part) = todo.pop_front() {
        if part == "/" {
            out = PathBuf::from("/");
            continue;
        }
        if part == ".." {
            out.pop();
            continue;
        }
        let cand = out.join(&part);
        // Components that do not exist (or cannot be inspected) are kept as written.
        if let Ok(m) = std::fs::symlink_metadata(&cand) {
            if m.file_type().is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::invalid(
                        path.display().to_string(),
                        "symlink loop (too many levels of symbolic links)",
                    ));
                }
                let target =
                    std::fs::read_link(&cand).map_err(|e| Error::io("read symlink", &cand, e))?;
                if target.as_os_str().is_empty() {
                    return Err(Error::invalid(path.display().to_string(), "empty symlink"));
                }
                push_all(&mut todo, &target, true);
                continue;
            }
        }
        out = cand;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn pool_volume_identities() {
        let sv = |d: &str, i: &str| Resource::Subvolume {
            dir: d.into(),
            image: i.into(),
        };
        let a = sv("/nx-vs/pool/v1", "/nx-vs/pool/v1/volume.raw")
            .key()
            .unwrap();
        // The key is the subvolume's directory whatever the file's format; the image and
        // the display are the file.
        let b = sv("/nx-vs/pool/./v1", "/nx-vs/pool/v1/volume.qcow2")
            .key()
            .unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(
            a.hash(),
            Resource::file("/nx-vs/pool/v1").key().unwrap().hash()
        );
        assert_eq!(a.display(), "/nx-vs/pool/v1/volume.raw");
        assert_eq!(a.image(), Some(Path::new("/nx-vs/pool/v1/volume.raw")));
        let lv = |vg: &str, lv: &str| Resource::LogicalVolume {
            vg: vg.into(),
            lv: lv.into(),
            image: None,
        };
        let k = lv("vg0", "root").key().unwrap();
        assert_eq!(k.canonical(), b"lvm:vg0/root");
        assert_eq!(k.display(), "vg0/root");
        assert_ne!(k.hash(), lv("vg0", "root2").key().unwrap().hash());
        assert!(lv("vg0", "a/b").key().is_err());
        assert!(lv("", "a").key().is_err());
    }

    #[test]
    fn lexical_cases() {
        let c = |b: &str, p: &str| canonical_path(Path::new(b), Path::new(p)).unwrap();
        let nx = "/nonexistent-vs-test";
        assert_eq!(
            c("/", &format!("{nx}/a/./b/../c")),
            Path::new(&format!("{nx}/a/c"))
        );
        assert_eq!(c(nx, "x/y"), Path::new(&format!("{nx}/x/y")));
        assert_eq!(c(nx, "../../.."), Path::new("/"));
        assert_eq!(c("rel", "x"), Path::new("/rel/x"));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let e = canonical_path(Path::new("/"), Path::new("")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidResource);
        let p = OsString::from_vec(b"/a\0b".to_vec());
        assert!(canonical_path(Path::new("/"), Path::new(&p)).is_err());
    }

    #[test]
    fn symlink_loops_fail() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("b", d.path().join("a")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("b")).unwrap();
        let e = canonical_path(d.path(), Path::new("a/x")).unwrap_err();
        assert!(e.to_string().contains("symbolic links"), "{e}");
    }

    #[test]
    fn uuids_are_validated_and_hashed() {
        let r = Resource::Uuid {
            kind: UuidKind::BtrfsSubvolume,
            uuid: "0B7E3C4A-1111-2222-3333-444455556666".into(),
            display: "pool/vol".into(),
            image: None,
        };
        let k = r.key().unwrap();
        assert_eq!(k.canonical(), b"0b7e3c4a-1111-2222-3333-444455556666");
        assert_eq!(k.display(), "pool/vol");
        assert_eq!(k.hash().len(), 64);
        let bad = Resource::Uuid {
            kind: UuidKind::LvmLv,
            uuid: "../../etc".into(),
            display: String::new(),
            image: None,
        };
        assert_eq!(
            bad.key().unwrap_err().kind(),
            crate::ErrorKind::InvalidResource
        );
    }

    #[test]
    fn the_hash_is_sha256_of_the_path_like_virtlockd() {
        let k = Resource::file("/var/lib/images/a.qcow2")
            .key_from(Path::new("/"))
            .unwrap();
        // sha256("/var/lib/images/a.qcow2") when /var/lib/images does not hold symlinks.
        if k.canonical() == b"/var/lib/images/a.qcow2" {
            let d = Sha256::digest(b"/var/lib/images/a.qcow2");
            let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(k.hash(), hex);
        }
    }
}
