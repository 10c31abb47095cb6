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

/// The device of the superblock of the mount `path` is on (`/proc/self/mountinfo`, found by
/// the mount id `statx` gives), as `MAJ:MIN` in decimal.
fn superblock_dev(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statx is a valid value; statx fills it.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path and stx outlives the call.
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MNT_ID, &mut stx) };
    if r != 0 || stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return None;
    }
    mount_dev(
        &std::fs::read_to_string("/proc/self/mountinfo").ok()?,
        stx.stx_mnt_id,
    )
}

/// The `MAJ:MIN` field of mount `id` in mountinfo `text`.
fn mount_dev(text: &str, id: u64) -> Option<(u64, u64)> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        if f.next()?.parse::<u64>().ok()? != id {
            return None;
        }
        let (maj, min) = f.nth(1)?.split_once(':')?;
        Some((maj.parse().ok()?, min.parse().ok()?))
    })
}

/// The processes other than this one that hold QEMU lock bytes on the file at `path`.
///
/// Lock lines name the file by its superblock's device (`s_dev`) and inode, while `stat`
/// gives a btrfs file its subvolume's anonymous device instead: both devices are looked for.
pub fn lock_owners(path: &Path) -> Vec<LockOwner> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let id_of = |(maj, min): (u64, u64)| format!("{maj:02x}:{min:02x}:{}", meta.ino());
    let mut ids = vec![id_of(major_minor(meta.dev()))];
    if let Some(sb) = superblock_dev(path).map(id_of) {
        if !ids.contains(&sb) {
            ids.push(sb);
        }
    }
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
            for id in ids.iter().filter(|id| text.contains(id.as_str())) {
                for line in text.lines() {
                    let bytes = qemu_bytes(line, id);
                    if !bytes.is_empty() {
                        found.entry(pid).or_default().extend(bytes);
                    }
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
    fn mountinfo_gives_the_superblock_device() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    97 29 0:45 /vol /mnt/b rw,relatime - btrfs /dev/loop3 rw,subvol=/vol\n";
        assert_eq!(mount_dev(text, 97), Some((0, 45)));
        assert_eq!(mount_dev(text, 22), Some((0, 21)));
        assert_eq!(mount_dev(text, 5), None);
        assert_eq!(mount_dev("garbage\n7 x\n", 7), None);
        // This process's own root is found through statx and mountinfo.
        assert!(superblock_dev(Path::new("/")).is_some());
    }

    #[test]
    fn devices_split_like_glibc() {
        assert_eq!(major_minor(0xfe00), (0xfe, 0));
        assert_eq!(major_minor(0x0803), (8, 3));
    }
}
