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
