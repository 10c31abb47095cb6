//! Output conventions of the CLI: every command that prints data takes `--output text|json`.

use serde::Serialize;

/// How a command prints its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text (the default).
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Print `value` as pretty JSON followed by a newline, in one write (stdout is line-buffered:
/// serializing straight into it would make a system call per line).
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let mut buf = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    std::io::stdout().lock().write_all(&buf)
}

/// The latest second RFC 3339 (and humantime) can show: 9999-12-31T23:59:59Z.
const MAX_STAMP_SECS: i64 = 253_402_300_799;

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch, clamped to 1970..=9999 (times read
/// from images or tools may be anything; formatting must not fail on them).
pub fn utc_stamp(secs: i64) -> String {
    let secs = secs.clamp(0, MAX_STAMP_SECS) as u64;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), the form qemu-img and virsh print.
pub fn utc_date_time(secs: i64) -> String {
    let s = utc_stamp(secs);
    format!("{} {}", &s[..10], &s[11..19])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_and_clamped() {
        assert_eq!(utc_stamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_stamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_date_time(1_795_771_419), "2026-11-27 09:23:39");
        assert_eq!(utc_stamp(-5), "1970-01-01T00:00:00Z");
        assert_eq!(utc_stamp(i64::MAX), "9999-12-31T23:59:59Z");
    }
}
