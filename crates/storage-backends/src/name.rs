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

/// Longest name accepted (btrfs and most filesystems allow 255 bytes per path component;
/// LVM names are limited to 127 characters, see [`check_lvm_name`]).
pub const MAX_NAME_LEN: usize = 255;

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
    if name.len() > MAX_NAME_LEN {
        return Err(bad(of, name, "longer than 255 bytes"));
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

/// LVM's own rules on top of [`check_name`]: only `A-Za-z0-9+_.-`, at most 127 characters,
/// not starting with `snapshot` or `pvmove`, and none of LVM's reserved sub-LV suffixes. Our
/// snapshot LVs are named `VOL.SNAP` (see the LVM backend), so a volume name may not contain
/// `.` and the two names together must stay under the limit.
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
    if name.len() > 120 {
        return Err(bad(of, name, "LVM names are limited to 127 characters"));
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
    }
}
