//! Pool, volume and snapshot names: what is refused, and why.

use crate::error::{Error, ErrorKind, Result};

/// What a name names (for messages and per-backend rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameOf {
    /// A pool.
    Pool,
    /// A volume.
    Volume,
    /// A volume snapshot.
    Snapshot,
}

impl NameOf {
    fn as_str(self) -> &'static str {
        match self {
            NameOf::Pool => "pool",
            NameOf::Volume => "volume",
            NameOf::Snapshot => "snapshot",
        }
    }
}

/// Longest volume or snapshot name accepted (btrfs and most filesystems allow 255 bytes
/// per path component; LVM names are limited further, see [`check_lvm_name`]). The dir and
/// btrfs backends derive no longer names from them: their temporaries have fixed names
/// (`.vs-snap`, `.vs-revert`) and their files are `NAME`, `.snapshots/NAME/SNAP`,
/// `NAME/volume.qcow2`.
pub const MAX_NAME_LEN: usize = 255;

/// Longest pool name: the pool store writes `NAME.json` through the temporary
/// `.NAME.json.tmp-PID` (PID up to 10 digits), which must fit in 255 bytes.
pub const MAX_POOL_NAME_LEN: usize = MAX_NAME_LEN - ".".len() - ".json.tmp-".len() - 10;

/// LVM's limit on an LV name (NAME_LEN 128 with the NUL).
pub const LVM_MAX_LV_NAME: usize = 127;

/// The longest suffix the LVM backend adds to a volume's name (`VOL.vs-revert`).
pub const LVM_VOLUME_SUFFIX: &str = ".vs-revert";

fn bad(of: NameOf, name: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("invalid {} name {name:?}: {why}", of.as_str()),
    )
}

/// Check a name valid for every backend: not empty, at most 255 bytes, no `/`, no NUL, no
/// control characters, not `.` or `..`, not starting with `-` (it would read as an option to
/// the tools) or `.` (hidden names are the backends' own: `.snapshots`, temporaries).
pub fn check_name(of: NameOf, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(bad(of, name, "it is empty"));
    }
    let max = if of == NameOf::Pool {
        MAX_POOL_NAME_LEN
    } else {
        MAX_NAME_LEN
    };
    if name.len() > max {
        return Err(bad(of, name, &format!("longer than {max} bytes")));
    }
    if name.contains('/') {
        return Err(bad(of, name, "it contains a path separator '/'"));
    }
    if name.contains('\0') {
        return Err(bad(of, name, "it contains a NUL byte"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad(of, name, "it contains a control character"));
    }
    if name == "." || name == ".." {
        return Err(bad(of, name, "it names a directory"));
    }
    if name.starts_with('-') {
        return Err(bad(
            of,
            name,
            "it starts with '-' (tools would read it as an option)",
        ));
    }
    if name.starts_with('.') {
        return Err(bad(
            of,
            name,
            "it starts with '.' (reserved for the backends' own files)",
        ));
    }
    Ok(())
}

/// LVM's own rules on top of [`check_name`]: only `A-Za-z0-9+_.-`, not starting with
/// `snapshot` or `pvmove`, and none of LVM's reserved sub-LV suffixes. Every LV name the
/// backend derives must fit LVM's 127 characters: a volume name at most 117 (for
/// `VOL.vs-revert`), a snapshot name at most 125 (and `VOL.SNAP` at most 127, see
/// [`check_lvm_snapshot_lv`]). Our snapshot LVs are named `VOL.SNAP`, so a volume name may
/// not contain `.`.
pub fn check_lvm_name(of: NameOf, name: &str) -> Result<()> {
    check_name(of, name)?;
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c)))
    {
        return Err(bad(
            of,
            name,
            &format!("LVM allows only A-Za-z0-9+_.- in names, not {c:?}"),
        ));
    }
    let max = match of {
        NameOf::Volume => LVM_MAX_LV_NAME - LVM_VOLUME_SUFFIX.len(),
        NameOf::Snapshot => LVM_MAX_LV_NAME - 2,
        NameOf::Pool => LVM_MAX_LV_NAME,
    };
    if name.len() > max {
        return Err(bad(
            of,
            name,
            &format!(
                "longer than {max} characters (LVM names are limited to 127, with the \
                 suffixes virt-snap adds)"
            ),
        ));
    }
    if of == NameOf::Volume && name.contains('.') {
        return Err(bad(
            of,
            name,
            "'.' separates a volume from its snapshots' names in LVM pools",
        ));
    }
    for p in ["snapshot", "pvmove"] {
        if name.starts_with(p) {
            return Err(bad(
                of,
                name,
                &format!("LVM reserves names starting with {p:?}"),
            ));
        }
    }
    for s in [
        "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_mlog", "_mimage", "_pmspare",
        "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_imeta", "_iorig",
    ] {
        if name.contains(s) {
            return Err(bad(of, name, &format!("LVM reserves the part {s:?}")));
        }
    }
    Ok(())
}

/// The LV name `VOL.SNAP` of a snapshot must fit LVM's 127 characters.
pub fn check_lvm_snapshot_lv(volume: &str, snapshot: &str) -> Result<()> {
    check_lvm_name(NameOf::Snapshot, snapshot)?;
    if volume.len() + 1 + snapshot.len() > LVM_MAX_LV_NAME {
        return Err(bad(
            NameOf::Snapshot,
            snapshot,
            &format!(
                "its LV name {volume}.{snapshot} would be longer than LVM's 127 characters \
                 (at most {} for volume {volume:?})",
                LVM_MAX_LV_NAME - 1 - volume.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_names_say_why() {
        for (n, why) in [
            ("", "empty"),
            ("a/b", "path separator"),
            ("..", "directory"),
            ("-rf", "option"),
            (".hidden", "reserved"),
            ("a\0b", "NUL"),
            ("a\nb", "control"),
        ] {
            let e = check_name(NameOf::Volume, n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(why), "{n:?}: {e}");
        }
        check_name(NameOf::Volume, "vm1-root.qcow2").unwrap();
        check_name(NameOf::Snapshot, "before upgrade").unwrap();
        assert!(check_lvm_name(NameOf::Snapshot, "before upgrade").is_err());
        assert!(check_lvm_name(NameOf::Volume, "a.b").is_err());
        assert!(check_lvm_name(NameOf::Volume, "snapshot1").is_err());
        assert!(check_lvm_name(NameOf::Volume, "x_tmeta").is_err());
        check_lvm_name(NameOf::Volume, "vm1-root").unwrap();
        check_lvm_name(NameOf::Snapshot, "s1.daily").unwrap();
        let long = "x".repeat(256);
        assert!(check_name(NameOf::Pool, &long).is_err());
        check_name(NameOf::Volume, &"x".repeat(255)).unwrap();
        check_name(NameOf::Pool, &"x".repeat(MAX_POOL_NAME_LEN)).unwrap();
        assert!(check_name(NameOf::Pool, &"x".repeat(MAX_POOL_NAME_LEN + 1)).is_err());
        // The store's temporary for the longest pool name fits.
        assert!(format!(".{}.json.tmp-4294967295", "x".repeat(MAX_POOL_NAME_LEN)).len() <= 255);
        // LVM: every derived LV name fits 127 characters.
        check_lvm_name(NameOf::Volume, &"v".repeat(117)).unwrap();
        assert!(check_lvm_name(NameOf::Volume, &"v".repeat(118)).is_err());
        assert_eq!(format!("{}.vs-revert", "v".repeat(117)).len(), 127);
        check_lvm_snapshot_lv(&"v".repeat(100), &"s".repeat(26)).unwrap();
        let e = check_lvm_snapshot_lv(&"v".repeat(100), &"s".repeat(27)).unwrap_err();
        assert!(e.to_string().contains("127"), "{e}");
    }
}
