//! qemu-img's text: `qemu-img info` and the `qemu-img snapshot -l` table, byte for byte.

use crate::cli::output;
use std::fmt::Write as _;
use std::io::Write as _;
use virt_snap::image::{ImageInfo, Snapshot};

/// QEMU's `size_to_str`: three significant digits and a binary unit ("204 KiB", "0 B").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp's exponent of val / (1000/1024): the number of bits of that value.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = (((exp - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`.
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = format!("{v:.2e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mant = strip_zeros(mant);
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    strip_zeros(&format!("{v:.decimals$}")).to_string()
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
#[cfg(test)]
fn format_date(secs: u32) -> String {
    let mut s = String::new();
    write_date(&mut s, secs);
    s
}

/// Append `YYYY-MM-DD HH:MM:SS` in the local time zone (`TZ`), as qemu-img prints dates.
fn write_local_date(out: &mut String, secs: u32) {
    let t = libc::time_t::from(secs);
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        write_date(out, secs);
        return;
    }
    let _ = write!(
        out,
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    );
}

/// Append `YYYY-MM-DD HH:MM:SS` (UTC) to `out`.
fn write_date(out: &mut String, secs: u32) {
    out.push_str(&output::utc_date_time(i64::from(secs)));
}

pub fn snapshot_table(s: &mut Vec<u8>, snaps: &[Snapshot]) {
    let _ = writeln!(s, "Snapshot list:");
    let _ = writeln!(
        s,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    // One row per snapshot, written straight into `s` (1000-snapshot tables are common:
    // no per-field allocations). printf pads by bytes, not characters: so do we.
    let mut field = String::with_capacity(32);
    let spaces = |s: &mut Vec<u8>, n: usize| s.extend(std::iter::repeat_n(b' ', n));
    let right = |s: &mut Vec<u8>, field: &str, width: usize| {
        spaces(s, width.saturating_sub(field.len()));
        s.extend_from_slice(field.as_bytes());
    };
    for sn in snaps {
        // Raw bytes, as printf prints them (names need not be UTF-8).
        let id = &sn.id[..sn.id.len().min(127)];
        let name = &sn.name[..sn.name.len().min(255)];
        s.extend_from_slice(id);
        spaces(s, 7usize.saturating_sub(id.len()));
        s.push(b' ');
        s.extend_from_slice(name);
        spaces(s, 16usize.saturating_sub(name.len()));
        s.push(b' ');
        field.clear();
        let vm = sn.vm_state_size();
        if vm < 1000 {
            let _ = write!(field, "{vm} B");
        } else {
            field.push_str(&size_to_str(vm));
        }
        right(s, &field, 8);
        s.push(b' ');
        field.clear();
        write_local_date(&mut field, sn.date_sec);
        right(s, &field, 19);
        s.push(b' ');
        field.clear();
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let _ = write!(
            field,
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000 % 1000
        );
        right(s, &field, 15);
        s.push(b' ');
        field.clear();
        match sn.icount() {
            Some(i) => {
                let _ = write!(field, "{i}");
            }
            None => field.push_str("--"),
        }
        right(s, &field, 10);
        s.push(b'\n');
    }
}

/// The LUKS details in the order qemu-img prints them (its dictionary's hash order).
fn luks_text(s: &mut Vec<u8>, e: &serde_json::Value) {
    let scalar = |v: &serde_json::Value| match v {
        serde_json::Value::String(x) => x.clone(),
        other => other.to_string(),
    };
    for key in [
        "ivgen-alg",
        "ivgen-hash-alg",
        "detached-header",
        "hash-alg",
        "cipher-alg",
        "uuid",
        "format",
        "cipher-mode",
        "slots",
        "payload-offset",
        "master-key-iters",
    ] {
        let Some(v) = e.get(key) else { continue };
        let label = key.replace('-', " ");
        if let Some(slots) = v.as_array() {
            let _ = writeln!(s, "        {label}:");
            for (i, slot) in slots.iter().enumerate() {
                let _ = writeln!(s, "            [{i}]:");
                for k in ["active", "iters", "key-offset", "stripes"] {
                    if let Some(x) = slot.get(k) {
                        let _ =
                            writeln!(s, "                {}: {}", k.replace('-', " "), scalar(x));
                    }
                }
            }
        } else {
            let _ = writeln!(s, "        {label}: {}", scalar(v));
        }
    }
}

/// The text `qemu-img info` prints for one image.
pub fn info_text(info: &ImageInfo) -> Vec<u8> {
    let mut s = Vec::new();
    let disk = info
        .actual_size
        .map(size_to_str)
        .unwrap_or_else(|| "unavailable".into());
    let v = info.virtual_size();
    let _ = writeln!(s, "image: {}", info.filename);
    let _ = writeln!(s, "file format: {}", info.format());
    let _ = writeln!(s, "virtual size: {} ({v} bytes)", size_to_str(v));
    let _ = writeln!(s, "disk size: {disk}");
    if info.encrypted() {
        let _ = writeln!(s, "encrypted: yes");
    }
    if let Some(c) = info.cluster_size() {
        let _ = writeln!(s, "cluster_size: {c}");
    }
    if info.dirty() {
        let _ = writeln!(s, "cleanly shut down: no");
    }
    if let Some(b) = info.backing_filename() {
        let full = info.full_backing_filename().unwrap_or_default();
        if full != b {
            let _ = writeln!(s, "backing file: {b} (actual path: {full})");
        } else {
            let _ = writeln!(s, "backing file: {b}");
        }
        if let Some(f) = info.backing_format() {
            let _ = writeln!(s, "backing file format: {f}");
        }
    }
    if !info.snapshots().is_empty() {
        snapshot_table(&mut s, info.snapshots());
    }
    if let Some(q) = info.qcow2() {
        let h = &q.header;
        let _ = writeln!(s, "Format specific information:");
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if h.version == 2 {
            let _ = writeln!(s, "    compat: 0.10");
        } else {
            let _ = writeln!(s, "    compat: 1.1");
        }
        let _ = writeln!(s, "    compression type: {}", h.compression_type_name());
        if h.version >= 3 {
            let _ = writeln!(s, "    lazy refcounts: {}", h.lazy_refcounts());
            if !q.bitmaps.is_empty() {
                let _ = writeln!(s, "    bitmaps:");
                for (i, b) in q.bitmaps.iter().enumerate() {
                    let _ = writeln!(s, "        [{i}]:");
                    let _ = writeln!(s, "            flags:");
                    for (j, f) in b.flag_names().iter().enumerate() {
                        let _ = writeln!(s, "                [{j}]: {f}");
                    }
                    let _ = writeln!(s, "            name: {}", lossy(&b.name));
                    let _ = writeln!(s, "            granularity: {}", b.granularity());
                }
            }
        }
        let _ = writeln!(s, "    refcount bits: {}", h.refcount_bits());
        if h.crypt_method != 0 {
            let _ = writeln!(s, "    encrypt:");
            match &q.luks {
                Some(l) => luks_text(&mut s, &l.to_json()),
                None => {
                    let _ = writeln!(
                        s,
                        "        format: {}",
                        if h.crypt_method == 1 { "aes" } else { "luks" }
                    );
                }
            }
        }
        if h.version >= 3 {
            if let Some(f) = q.data_file() {
                let _ = writeln!(s, "    data file: {}", lossy(f));
            }
            if q.has_data_file() {
                let _ = writeln!(s, "    data file raw: {}", q.data_file_raw());
            }
            let _ = writeln!(s, "    corrupt: {}", h.is_corrupt());
            let _ = writeln!(s, "    extended l2: {}", h.extended_l2());
        }
        for u in q.unknown_features() {
            let _ = writeln!(
                s,
                "    unknown {} feature bit {}{}",
                u.feature_type.as_str(),
                u.bit,
                u.name.map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
    }
    let _ = writeln!(s, "Child node '/file':");
    let _ = writeln!(s, "    filename: {}", info.filename);
    let _ = writeln!(s, "    protocol type: {}", info.protocol());
    let len = info.file_length.div_ceil(512) * 512;
    let _ = writeln!(s, "    file length: {} ({len} bytes)", size_to_str(len));
    let _ = writeln!(s, "    disk size: {disk}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(208_896), "204 KiB");
        assert_eq!(size_to_str(328_192), "320 KiB");
        assert_eq!(size_to_str(67_108_864), "64 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(147_968), "144 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1536), "1.5 KiB");
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_770_760), "2026-11-27 09:12:40");
    }
}
