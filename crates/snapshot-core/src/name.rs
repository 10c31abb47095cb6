//! [`SnapshotName`] and [`DomainName`]: validated names, usable as file names in the store.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A snapshot's name, checked so that it can name a file in the metadata store:
/// not empty, at most [`SnapshotName::MAX_LEN`] bytes, no `/`, no NUL, not `.` or `..`.
///
/// Anything else libvirt accepts is accepted (spaces, punctuation, non-ASCII text).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapshotName(String);

impl SnapshotName {
    /// The longest name in bytes: a file name is at most 255 bytes, and the store adds a
    /// `.xml` suffix and, for its temporary files, a prefix and a suffix.
    pub const MAX_LEN: usize = 200;

    /// Checks `name` against the rules.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_component(&name, "snapshot name")?;
        Ok(SnapshotName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The rules for a name that becomes one path component (snapshot and domain names).
pub(crate) fn check_component(name: &str, what: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidName,
            format!("{what} {name:?}"),
            why,
        ))
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > SnapshotName::MAX_LEN {
        return bad(&format!(
            "is {} bytes long, at most {} are allowed",
            name.len(),
            SnapshotName::MAX_LEN
        ));
    }
    if name.contains('/') {
        return bad("must not contain '/'");
    }
    if name.contains('\0') {
        return bad("must not contain a NUL character");
    }
    if name == "." || name == ".." {
        return bad("must not be '.' or '..'");
    }
    Ok(())
}

/// The conversions shared by the validated name newtypes: each has a `new` that checks it.
macro_rules! name_newtype {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                $t::new(s)
            }
        }

        impl TryFrom<&str> for $t {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                $t::new(s)
            }
        }

        impl std::str::FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $t::new(s)
            }
        }

        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
    };
}

name_newtype!(SnapshotName);
name_newtype!(DomainName);

/// A domain's name: the rules of a [`SnapshotName`] (it names the domain's directory in the
/// state dir), and no leading `-` (it would read as an option on a command line).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// The longest name in bytes, as for snapshot names.
    pub const MAX_LEN: usize = SnapshotName::MAX_LEN;

    /// Checks `name` against the rules.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_component(&name, "domain name")?;
        if name.starts_with('-') {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!("domain name {name:?}"),
                "must not start with '-'",
            ));
        }
        Ok(DomainName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_libvirt_style_names() {
        for n in [
            "snap1",
            "my snap name",
            "1272917631",
            ".hidden",
            "a..b",
            "été",
            "x\ny",
        ] {
            assert_eq!(SnapshotName::new(n).unwrap().as_str(), n);
        }
        assert!(SnapshotName::new("a".repeat(SnapshotName::MAX_LEN)).is_ok());
    }

    #[test]
    fn refuses_names_that_are_not_one_file_name() {
        let long = "a".repeat(SnapshotName::MAX_LEN + 1);
        for n in ["", ".", "..", "a/b", "/", "a\0b", long.as_str()] {
            let e = SnapshotName::new(n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidName, "{n:?}");
        }
    }

    #[test]
    fn serde_validates() {
        let n: SnapshotName = serde_json::from_str("\"s1\"").unwrap();
        assert_eq!(n.as_str(), "s1");
        assert!(serde_json::from_str::<SnapshotName>("\"a/b\"").is_err());
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"s1\"");
    }

    #[test]
    fn domain_names() {
        assert_eq!(DomainName::new("vm-1").unwrap().as_str(), "vm-1");
        for n in ["", ".", "..", "a/b", "a\0b", "-rm"] {
            let e = DomainName::new(n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidName, "{n:?}");
        }
        assert!(serde_json::from_str::<DomainName>("\"../x\"").is_err());
    }
}
