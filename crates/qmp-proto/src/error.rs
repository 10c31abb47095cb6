//! The one error type of this crate.

use std::fmt;

/// What went wrong, for callers to match on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An I/O error on the socket (connect, read or write).
    Io,
    /// The peer did not answer within the time allowed.
    Timeout,
    /// The connection is closed (EOF, reset, or closed by us after a protocol error).
    /// Commands in flight when it closed fail with this kind (or with
    /// [`ErrorKind::Protocol`] when the peer's protocol violation closed it); commands
    /// issued afterwards always fail with this kind.
    Disconnected,
    /// The peer sent something that breaks the protocol (bad greeting, over-long line, ...).
    Protocol,
    /// The peer executed the command and answered with an error; see [`Error::class`]
    /// and [`Error::desc`].
    Command,
    /// A QEMU job (e.g. `snapshot-save`) was started but concluded with an error or was
    /// cancelled; [`Error::desc`] holds QEMU's message.
    Job,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Command => "command failed",
            ErrorKind::Job => "job failed",
        })
    }
}

/// An error from the QMP or guest-agent client.
///
/// Match on [`Error::kind`]; for [`ErrorKind::Command`] the peer's error class
/// (e.g. `"GenericError"`, `"CommandNotFound"`, `"DeviceNotFound"`) is in [`Error::class`]
/// and its human-readable description in [`Error::desc`].
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct Error {
    kind: ErrorKind,
    message: String,
    command: Option<String>,
    class: Option<String>,
    desc: Option<String>,
    #[source]
    source: Option<std::io::Error>,
}

impl Error {
    /// An error of `kind` with a message (for fakes that inject failures in tests of
    /// code built on this crate; the clients build their own).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            command: None,
            class: None,
            desc: None,
            source: None,
        }
    }

    pub(crate) fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Error {
            source: Some(source),
            ..Error::new(ErrorKind::Io, message)
        }
    }

    pub(crate) fn timeout(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Timeout, message)
    }

    pub(crate) fn disconnected(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Disconnected, message)
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Protocol, message)
    }

    /// The error for a reply `{"error":{"class":..,"desc":..}}` (public for fakes that
    /// inject QEMU's errors in tests of code built on this crate).
    pub fn command_failed(class: String, desc: String) -> Self {
        Error {
            class: Some(class),
            desc: Some(desc),
            ..Error::new(ErrorKind::Command, "")
        }
    }

    /// A job that concluded with `desc` as its error.
    pub(crate) fn job_failed(job_id: &str, desc: String) -> Self {
        Error {
            desc: Some(desc),
            ..Error::new(ErrorKind::Job, format!("job `{job_id}`"))
        }
    }

    /// Attach the name of the command this error belongs to (context for Display).
    pub fn with_command(mut self, cmd: &str) -> Self {
        if self.command.is_none() {
            self.command = Some(cmd.to_owned());
        }
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The peer's error class for [`ErrorKind::Command`] errors (e.g. `"GenericError"`).
    pub fn class(&self) -> Option<&str> {
        self.class.as_deref()
    }

    /// The peer's error description for [`ErrorKind::Command`] and [`ErrorKind::Job`]
    /// errors (meant for humans; do not match on it).
    pub fn desc(&self) -> Option<&str> {
        self.desc.as_deref()
    }

    /// The command this error belongs to, when it belongs to one.
    pub fn command(&self) -> Option<&str> {
        self.command.as_deref()
    }

    fn render(&self) -> String {
        let mut s = String::new();
        if let Some(cmd) = &self.command {
            s.push_str(&format!("command `{cmd}`: "));
        }
        match (self.kind, &self.class, &self.desc) {
            (ErrorKind::Command, Some(class), Some(desc)) => {
                s.push_str(&format!("{class}: {desc}"));
            }
            (ErrorKind::Job, _, Some(desc)) => {
                s.push_str(&format!("{} failed: {desc}", self.message));
            }
            _ => {
                s.push_str(&self.kind.to_string());
                if !self.message.is_empty() {
                    s.push_str(": ");
                    s.push_str(&self.message);
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_includes_command_class_and_desc() {
        let e = Error::command_failed("GenericError".into(), "no such node".into())
            .with_command("blockdev-del");
        assert_eq!(e.kind(), ErrorKind::Command);
        assert_eq!(e.class(), Some("GenericError"));
        assert_eq!(e.desc(), Some("no such node"));
        assert_eq!(
            e.to_string(),
            "command `blockdev-del`: GenericError: no such node"
        );
    }

    #[test]
    fn display_of_other_kinds() {
        let e = Error::timeout("no reply within 1s").with_command("query-status");
        assert_eq!(
            e.to_string(),
            "command `query-status`: timed out: no reply within 1s"
        );
        assert_eq!(e.class(), None);
    }
}
