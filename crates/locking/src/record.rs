//! Who holds a lease: holder identities and the records written beside each lease.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Who asks for a lease: a domain (a VM) or a named operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "kebab-case")]
pub enum Holder {
    /// A running (or starting) domain, by name.
    Domain(String),
    /// A volume operation, e.g. `"snapshot create"`.
    Operation(String),
}

impl Holder {
    /// The holder's name.
    pub fn name(&self) -> &str {
        match self {
            Holder::Domain(n) | Holder::Operation(n) => n,
        }
    }
    /// `"domain"` or `"operation"`.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Holder::Domain(_) => "domain",
            Holder::Operation(_) => "operation",
        }
    }
    /// The same holder with its name cut to at most `max` bytes (on a char boundary).
    pub(crate) fn truncated(&self, max: usize) -> Holder {
        let cut = |s: &str| {
            let mut end = s.len().min(max);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        };
        match self {
            Holder::Domain(n) => Holder::Domain(cut(n)),
            Holder::Operation(n) => Holder::Operation(cut(n)),
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind_str(), self.name())
    }
}

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Any number of shared holders, no exclusive one.
    Shared,
    /// One holder only.
    Exclusive,
}

impl Mode {
    /// Can a holder in mode `self` coexist with one in mode `other`?
    pub fn compatible_with(self, other: Mode) -> bool {
        self == Mode::Shared && other == Mode::Shared
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        })
    }
}

/// What a lease holder records about itself, so that a refusal can name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    /// Who holds the lease.
    pub holder: Holder,
    /// The mode it holds the lease in.
    pub mode: Mode,
    /// The process that took the lease.
    pub pid: u32,
    /// When the lease was taken (RFC 3339, UTC, seconds).
    pub since: String,
    /// The host the holder runs on.
    pub host: String,
    /// The resource as shown to people.
    pub resource: String,
    /// The fencing token of a cluster lease (etcd: the revision that created the holder's
    /// key; it only grows). `None` in the local lockspace, whose leases cannot be lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

impl HolderRecord {
    /// A record for `holder` taking `resource` in `mode` now, in this process.
    pub fn now(holder: &Holder, mode: Mode, resource: &str) -> HolderRecord {
        HolderRecord {
            holder: holder.clone(),
            mode,
            pid: std::process::id(),
            since: rfc3339(std::time::SystemTime::now()),
            host: hostname(),
            resource: resource.to_string(),
            token: None,
        }
    }
}

impl fmt::Display for HolderRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.holder)?;
        // A cluster record always names its host; a local one only when it is not this one.
        if !self.host.is_empty() && (self.token.is_some() || self.host != hostname()) {
            write!(f, " on host {:?}", self.host)?;
        }
        write!(f, " (pid {}, since {})", self.pid, self.since)
    }
}

/// This machine's host name ("" if unknown).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.max(std::time::UNIX_EPOCH)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_771_800)),
            "2026-11-27T09:30:00Z"
        );
    }

    #[test]
    fn a_record_reads_like_the_refusal_message() {
        let r = HolderRecord {
            holder: Holder::Domain("vm1".into()),
            mode: Mode::Exclusive,
            pid: 1234,
            since: "2026-11-27T09:30:00Z".into(),
            host: hostname(),
            resource: "/p/x.qcow2".into(),
            token: None,
        };
        assert_eq!(
            r.to_string(),
            "domain \"vm1\" (pid 1234, since 2026-11-27T09:30:00Z)"
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["holder"]["kind"], "domain");
        assert_eq!(j["mode"], "exclusive");
        let back: HolderRecord = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
        let cluster = HolderRecord {
            host: "hostA".into(),
            token: Some(7),
            ..r
        };
        assert_eq!(
            cluster.to_string(),
            "domain \"vm1\" on host \"hostA\" (pid 1234, since 2026-11-27T09:30:00Z)"
        );
    }

    #[test]
    fn modes() {
        assert!(Mode::Shared.compatible_with(Mode::Shared));
        assert!(!Mode::Shared.compatible_with(Mode::Exclusive));
        assert!(!Mode::Exclusive.compatible_with(Mode::Shared));
        assert!(!Mode::Exclusive.compatible_with(Mode::Exclusive));
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        let h = Holder::Domain("ééé".into()).truncated(3);
        assert_eq!(h.name(), "é");
    }
}
