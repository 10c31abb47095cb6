//! The QEMU guest agent (qemu-ga) client.
//!
//! The agent speaks QMP-style JSON without a greeting, without events and without
//! timeouts of its own. A connection can hold stale bytes (replies to commands a
//! previous client gave up on, half-written input), so the client synchronises with
//! `guest-sync-delimited` on connect and again after anything went wrong: it sends
//! `0xFF` (which resets the agent's JSON parser) and a sync request with a fresh id,
//! then discards everything until the `0xFF`-prefixed reply carrying that id.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::error::Error;
use crate::framing::{excerpt, read_line_capped, LineError};

/// Longest line accepted from the agent. guest-exec output is capped at 16 MiB by the
/// agent and grows by 4/3 in base64; a longer line is a protocol error.
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// First interval between two `guest-exec-status` polls.
const POLL_MIN: Duration = Duration::from_millis(20);
/// Longest interval between two `guest-exec-status` polls.
const POLL_MAX: Duration = Duration::from_millis(50);

/// The result of a command run in the guest with [`QgaClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    /// The exit code, when the process exited normally.
    pub exit_code: Option<i32>,
    /// The signal number, when the process was killed by a signal.
    pub signal: Option<i32>,
    /// Everything the process wrote to stdout (the agent keeps at most 16 MiB).
    pub stdout: Vec<u8>,
    /// Everything the process wrote to stderr (the agent keeps at most 16 MiB).
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Exited normally with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.signal.is_none()
    }
}

/// A client for the QEMU guest agent on a unix socket (QEMU's chardev for the
/// `org.qemu.guest_agent.0` virtio-serial port).
///
/// Every call takes a timeout because the agent has none. Calls take `&mut self`: the
/// agent answers one command at a time.
pub struct QgaClient {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    next_id: u64,
    /// Set while a command is on the wire and after any failure: the next call
    /// re-synchronises first.
    needs_sync: bool,
}

impl fmt::Debug for QgaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QgaClient")
            .field("path", &self.path)
            .field("needs_sync", &self.needs_sync)
            .finish()
    }
}

/// The connected socket, for a process that must still reach the agent on this connection
/// after this one is gone (virt-snap's thaw watchdog inherits it across `fork`: the agent's
/// chardev serves one client at a time, so a second connection would not be answered).
///
/// The descriptor is non-blocking. Whatever else writes to it must write whole lines, and a
/// command it sends must carry an `id` that is not a number: this client drops replies
/// with an id other than its own, and errors without an id (the agent's answer to a `0xFF`
/// parser reset).
impl AsFd for QgaClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.writer.as_ref().as_fd()
    }
}

impl QgaClient {
    /// Connects to the agent's socket and synchronises with it, all within `t`.
    ///
    /// Fails with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) when the agent does
    /// not answer (e.g. the guest has not started it yet); callers may retry.
    pub async fn connect_unix(path: impl AsRef<Path>, t: Duration) -> Result<QgaClient, Error> {
        let deadline = crate::framing::deadline_after(t);
        let path = path.as_ref().to_path_buf();
        let stream = match tokio::time::timeout_at(deadline, UnixStream::connect(&path)).await {
            Err(_) => {
                return Err(Error::timeout(format!(
                    "connecting to guest agent socket {} took over {t:?}",
                    path.display()
                )))
            }
            Ok(Err(e)) => {
                return Err(Error::io(
                    format!("connecting to guest agent socket {}", path.display()),
                    e,
                ))
            }
            Ok(Ok(s)) => s,
        };
        let (rd, wr) = stream.into_split();
        // A per-process random-ish base makes ids of earlier clients unlikely to match.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 20);
        let mut client = QgaClient {
            path,
            reader: BufReader::with_capacity(64 * 1024, rd),
            writer: wr,
            line: Vec::new(),
            next_id: (seed % 1_000_000_000) + 1,
            needs_sync: true,
        };
        client.sync(deadline).await?;
        Ok(client)
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1) % (1 << 52);
        self.next_id
    }

    /// Sends `0xFF` + `guest-sync-delimited` and discards input until the matching reply.
    async fn sync(&mut self, deadline: Instant) -> Result<(), Error> {
        self.needs_sync = true;
        self.line.clear();
        let id = self.fresh_id();
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } })
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.write(&msg, deadline, "guest-sync-delimited").await?;
        loop {
            let Some(line) = self.read_line(deadline, "guest-sync-delimited").await? else {
                continue;
            };
            match serde_json::from_slice::<Value>(line) {
                Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => {
                    tracing::trace!(id, "guest agent synchronised");
                    self.needs_sync = false;
                    return Ok(());
                }
                _ => tracing::trace!(line = %excerpt(line), "guest agent: discarded while syncing"),
            }
        }
    }

    async fn write(&mut self, msg: &[u8], deadline: Instant, cmd: &str) -> Result<(), Error> {
        match tokio::time::timeout_at(deadline, self.writer.write_all(msg)).await {
            Err(_) => Err(Error::timeout("writing to the guest agent timed out").with_command(cmd)),
            Ok(Err(e)) => {
                let kind_disconnected = matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                );
                if kind_disconnected {
                    Err(Error::disconnected(format!(
                        "guest agent socket {} closed: {e}",
                        self.path.display()
                    ))
                    .with_command(cmd))
                } else {
                    Err(Error::io("writing to the guest agent", e).with_command(cmd))
                }
            }
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads one line; returns the part after the last `0xFF` with whitespace trimmed,
    /// or `None` for an empty line.
    async fn read_line(&mut self, deadline: Instant, cmd: &str) -> Result<Option<&[u8]>, Error> {
        self.line.clear();
        match tokio::time::timeout_at(
            deadline,
            read_line_capped(&mut self.reader, &mut self.line, MAX_LINE),
        )
        .await
        {
            Err(_) => {
                Err(Error::timeout("no reply from the guest agent in time").with_command(cmd))
            }
            Ok(Err(LineError::Io(e))) => {
                Err(Error::io("reading from the guest agent", e).with_command(cmd))
            }
            Ok(Err(LineError::TooLong(cap))) => Err(Error::protocol(format!(
                "guest agent sent a line longer than {cap} bytes"
            ))
            .with_command(cmd)),
            Ok(Ok(false)) => Err(Error::disconnected(format!(
                "guest agent socket {} closed (EOF)",
                self.path.display()
            ))
            .with_command(cmd)),
            Ok(Ok(true)) => {
                let start = self
                    .line
                    .iter()
                    .rposition(|&b| b == 0xFF)
                    .map_or(0, |i| i + 1);
                let l = self.line[start..].trim_ascii();
                Ok((!l.is_empty()).then_some(l))
            }
        }
    }

    /// Runs an agent command and returns its `return` value, allowing `t` in all
    /// (including a re-synchronisation if the previous call failed or was cancelled).
    pub async fn execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        t: Duration,
    ) -> Result<Value, Error> {
        self.execute_until(cmd, args, crate::framing::deadline_after(t))
            .await
    }

    async fn execute_until(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, Error> {
        if self.needs_sync {
            self.sync(deadline).await.map_err(|e| e.with_command(cmd))?;
        }
        let id = self.fresh_id();
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        // Until the reply is read the stream is in an unknown state: if this call fails
        // or its future is dropped, the next call re-synchronises.
        self.needs_sync = true;
        self.write(&bytes, deadline, cmd).await?;
        loop {
            let Some(line) = self.read_line(deadline, cmd).await? else {
                continue;
            };
            let mut v: Value = match crate::deep::parse_line(line) {
                Ok(v) => v,
                Err(_) => {
                    tracing::warn!(line = %excerpt(line), "guest agent: ignoring a line that is not JSON");
                    continue;
                }
            };
            // The agent echoes ids; a reply with another id is stale.
            if let Some(got) = v.get("id") {
                if got.as_u64() != Some(id) {
                    tracing::trace!(%got, "guest agent: stale reply dropped");
                    continue;
                }
            }
            if let Some(ret) = v.get_mut("return") {
                self.needs_sync = false;
                return Ok(ret.take());
            }
            if let Some(err) = v.get("error") {
                let class = err["class"].as_str().unwrap_or("GenericError").to_owned();
                let desc = err["desc"].as_str().unwrap_or_default().to_owned();
                if v.get("id").is_none() {
                    // A parse error without id: not the answer to our (valid) command.
                    tracing::trace!(%desc, "guest agent: error without id ignored");
                    continue;
                }
                self.needs_sync = false;
                return Err(Error::command_failed(class, desc).with_command(cmd));
            }
            tracing::trace!(line = %excerpt(line), "guest agent: unknown message ignored");
        }
    }

    /// Sends a command that does not answer on success (`guest-shutdown`,
    /// `guest-suspend-disk`, ...), within `t`, and returns once it is written.
    ///
    /// An error reply the agent may still send is discarded by the re-synchronisation
    /// the next call performs.
    pub async fn execute_no_reply(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        t: Duration,
    ) -> Result<(), Error> {
        let deadline = crate::framing::deadline_after(t);
        if self.needs_sync {
            self.sync(deadline).await.map_err(|e| e.with_command(cmd))?;
        }
        let mut msg = json!({ "execute": cmd });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.needs_sync = true;
        self.write(&bytes, deadline, cmd).await
    }

    /// `guest-ping` within `t`.
    pub async fn ping(&mut self, t: Duration) -> Result<(), Error> {
        self.execute("guest-ping", None, t).await.map(|_| ())
    }

    /// Runs `argv` in the guest (`guest-exec` with captured output), feeding `stdin`
    /// if given, and polls `guest-exec-status` until it exits; all within `t`.
    ///
    /// On timeout the process may still be running in the guest.
    pub async fn exec(
        &mut self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        t: Duration,
    ) -> Result<ExecOutput, Error> {
        let deadline = crate::framing::deadline_after(t);
        let b64 = base64::engine::general_purpose::STANDARD;
        let (path, rest) = argv
            .split_first()
            .ok_or_else(|| Error::protocol("exec: argv is empty").with_command("guest-exec"))?;
        let mut args = json!({ "path": path, "arg": rest, "capture-output": true });
        if let Some(input) = stdin {
            args["input-data"] = Value::String(b64.encode(input));
        }
        let ret = self
            .execute_until("guest-exec", Some(args), deadline)
            .await?;
        let pid = ret["pid"].as_i64().ok_or_else(|| {
            Error::protocol(format!("guest-exec returned no pid: {ret}")).with_command("guest-exec")
        })?;
        let mut interval = POLL_MIN;
        loop {
            let st = self
                .execute_until("guest-exec-status", Some(json!({ "pid": pid })), deadline)
                .await
                .map_err(|e| {
                    if e.kind() == crate::ErrorKind::Timeout {
                        Error::timeout(format!(
                            "{argv:?} (guest pid {pid}) did not finish in time; it may still run"
                        ))
                        .with_command("guest-exec-status")
                    } else {
                        e
                    }
                })?;
            if st["exited"].as_bool() == Some(true) {
                let decode = |key: &str| -> Result<Vec<u8>, Error> {
                    match st.get(key).and_then(Value::as_str) {
                        None => Ok(Vec::new()),
                        Some(s) => b64.decode(s).map_err(|e| {
                            Error::protocol(format!("guest-exec-status {key} is not base64: {e}"))
                                .with_command("guest-exec-status")
                        }),
                    }
                };
                for key in ["out-truncated", "err-truncated"] {
                    if st[key].as_bool() == Some(true) {
                        tracing::warn!(?argv, pid, key, "guest-exec output truncated by the agent");
                    }
                }
                let as_i32 = |key: &str| {
                    st.get(key)
                        .and_then(Value::as_i64)
                        .and_then(|n| i32::try_from(n).ok())
                };
                return Ok(ExecOutput {
                    exit_code: as_i32("exitcode"),
                    signal: as_i32("signal"),
                    stdout: decode("out-data")?,
                    stderr: decode("err-data")?,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::timeout(format!(
                    "{argv:?} (guest pid {pid}) did not finish in time; it may still run"
                ))
                .with_command("guest-exec-status"));
            }
            tokio::time::sleep_until((now + interval).min(deadline)).await;
            interval = (interval * 3 / 2).min(POLL_MAX);
        }
    }
}
