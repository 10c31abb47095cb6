//! Which processes hold QEMU's lock bytes on an image, found in `/proc/PID/fdinfo`.
//!
//! `F_OFD_GETLK` and `/proc/locks` report OFD locks with pid -1, but since Linux 4.x every
//! `/proc/PID/fdinfo/FD` lists the locks of that fd's open file description as
//! `lock:\t1: OFDLCK ADVISORY  READ -1 MAJ:MIN:INODE START END`. Scanning them names the
//! QEMU (or qemu-img, or any tool) behind a refusal. Read-only, best effort: processes that
//! vanish or cannot be read are skipped.

use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A process holding some of QEMU's lock bytes on an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockOwner {
    /// Its process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`; for QEMU, its binary name cut to 15 bytes).
    pub command: String,
    /// The guest name of a QEMU started with `-name`, if any.
    pub guest: Option<String>,
    /// The QEMU lock bytes (100-104, 200-204) it holds, ascending.
    pub bytes: Vec<u64>,
}

impl std::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {}", self.command, self.pid)?;
        if let Some(g) = &self.guest {
            write!(f, ", guest {g:?}")?;
        }
        f.write_str(")")
    }
}

/// glibc's `gnu_dev_major` / `gnu_dev_minor`.
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The QEMU bytes in a `lock:` line about `id` (`MAJ:MIN:INODE`), if it is one.
fn qemu_bytes(line: &str, id: &str) -> Vec<u64> {
    let Some(rest) = line.strip_prefix("lock:") else {
        return Vec::new();
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // ["1:", "OFDLCK", "ADVISORY", "READ", "-1", "fe:00:123", "100", "101"]; a blocked
    // waiter's line has "->" after the number.
    let Some(pos) = f.iter().position(|x| *x == id) else {
        return Vec::new();
    };
    let start: u64 = match f.get(pos + 1).and_then(|s| s.parse().ok()) {
        Some(s) => s,
        None => return Vec::new(),
    };
    let end: u64 = match f.get(pos + 2) {
        Some(&"EOF") => u64::MAX,
        Some(s) => match s.parse() {
            Ok(e) => e,
            Err(_) => return Vec::new(),
        },
        None => return Vec::new(),
    };
    (100..=104)
        .chain(200..=204)
        .filter(|b| (start..=end).contains(b))
        .collect()
}

/// A QEMU's guest name from its command line (`-name vm1` or `-name guest=vm1,...`).
fn guest_name(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let i = args.iter().position(|a| *a == b"-name")?;
    let v = String::from_utf8_lossy(args.get(i + 1)?).into_owned();
    let name = v
        .split(',')
        .find_map(|kv| kv.strip_prefix("guest="))
        .or_else(|| v.split(',').next().filter(|s| !s.contains('=')))?;
    Some(name.to_string())
}

/// The processes other than this one that hold QEMU lock bytes on the file at `path`.
pub fn lock_owners(path: &Path) -> Vec<LockOwner> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let (maj, min) = major_minor(meta.dev());
    let id = format!("{maj:02x}:{min:02x}:{}", meta.ino());
    let me = std::process::id();
    let mut found: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if !text.contains(&id) {
                continue;
            }
            for line in text.lines() {
                let bytes = qemu_bytes(line, &id);
                if !bytes.is_empty() {
                    found.entry(pid).or_default().extend(bytes);
                }
            }
        }
    }
    found
        .into_iter()
        .map(|(pid, mut bytes)| {
            bytes.sort_unstable();
            bytes.dedup();
            let proc_dir = Path::new("/proc").join(pid.to_string());
            LockOwner {
                pid,
                command: std::fs::read_to_string(proc_dir.join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                guest: std::fs::read(proc_dir.join("cmdline"))
                    .ok()
                    .and_then(|c| guest_name(&c)),
                bytes,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines_parse() {
        let id = "fe:00:10029348";
        assert_eq!(
            qemu_bytes(
                "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10029348 100 101",
                id
            ),
            vec![100, 101]
        );
        assert_eq!(
            qemu_bytes(
                "lock:\t2: POSIX  ADVISORY  WRITE 77 fe:00:10029348 0 EOF",
                id
            ),
            vec![100, 101, 102, 103, 104, 200, 201, 202, 203, 204]
        );
        assert!(qemu_bytes("lock:\t3: OFDLCK ADVISORY READ -1 fe:00:10029348 0 0", id).is_empty());
        assert!(qemu_bytes("lock:\t3: OFDLCK ADVISORY READ -1 fe:00:1 100 100", id).is_empty());
        assert!(qemu_bytes("lock: garbage fe:00:10029348 x", id).is_empty());
        assert!(qemu_bytes("ino:\t10029348", id).is_empty());
    }

    #[test]
    fn guest_names_come_from_dash_name() {
        assert_eq!(
            guest_name(b"qemu\0-name\0guest=vm1,debug-threads=on\0"),
            Some("vm1".into())
        );
        assert_eq!(
            guest_name(b"qemu\0-name\0vm2\0-m\x00256\x00"),
            Some("vm2".into())
        );
        assert_eq!(guest_name(b"qemu\0-m\x00256\x00"), None);
        assert_eq!(guest_name(b"qemu\0-name"), None);
    }

    #[test]
    fn devices_split_like_glibc() {
        assert_eq!(major_minor(0xfe00), (0xfe, 0));
        assert_eq!(major_minor(0x0803), (8, 3));
    }
}
