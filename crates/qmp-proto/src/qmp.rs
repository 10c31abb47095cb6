//! The QMP (QEMU Machine Protocol) client.
//!
//! One background task reads the socket and routes what arrives: replies go to the
//! command that is waiting for them (matched by `id` through a pending map), events go
//! to every subscriber's own queue. Command lines go out whole: a lone command is written
//! by its caller in one non-blocking send, anything else (concurrent commands, the rest of
//! a line the socket did not take) by a second task, so a cancelled caller can never leave
//! half a command on the wire.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, ErrorKind};
use crate::framing::{excerpt, read_line_capped, LineError};
use crate::sock::{self, ReadSide, Writer};

/// Time allowed for a command by [`QmpClient::execute`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the greeting and `qmp_capabilities` in [`QmpClient::connect_unix`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line accepted from QEMU; a longer one is a protocol error and closes the connection.
pub const MAX_LINE: usize = 16 * 1024 * 1024;
/// Events queued per subscriber that has not read them yet; further events are dropped
/// for that subscriber (counted by [`EventStream::dropped`]) rather than blocking the reader.
pub const EVENT_QUEUE_CAP: usize = 65_536;

/// What QEMU announced in its greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version: (major, minor, micro).
    pub version: (u32, u32, u32),
    /// The package string (e.g. `"Debian 1:10.0.2+ds-2"`), possibly empty.
    pub package: String,
    /// Capabilities offered (e.g. `["oob"]`).
    pub capabilities: Vec<String>,
}

impl Greeting {
    fn parse(v: &Value) -> Result<Greeting, Error> {
        let qmp = v
            .get("QMP")
            .ok_or_else(|| Error::protocol("first message is not a QMP greeting"))?;
        let ver = &qmp["version"]["qemu"];
        let num = |k: &str| -> Result<u32, Error> {
            ver.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Error::protocol(format!("greeting lacks version.qemu.{k}")))
        };
        let version = (num("major")?, num("minor")?, num("micro")?);
        let package = qmp["version"]["package"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let capabilities = qmp["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Greeting {
            version,
            package,
            capabilities,
        })
    }
}

/// An asynchronous event from QEMU (`{"event":..,"data":..,"timestamp":..}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `"STOP"` or `"JOB_STATUS_CHANGE"`.
    pub name: String,
    /// The event's `data` member; `Value::Null` when the event has none.
    pub data: Value,
    /// QEMU's timestamp: (seconds, microseconds) since the epoch.
    pub timestamp: (i64, i64),
}

impl Event {
    fn parse(v: &mut Value) -> Option<Event> {
        let name = v.get("event")?.as_str()?.to_owned();
        let ts = &v["timestamp"];
        let timestamp = (
            ts["seconds"].as_i64().unwrap_or(0),
            ts["microseconds"].as_i64().unwrap_or(0),
        );
        let data = v.get_mut("data").map(Value::take).unwrap_or(Value::Null);
        Some(Event {
            name,
            data,
            timestamp,
        })
    }
}

type Reply = Result<Value, Error>;

/// State shared between the client handles and the connection tasks.
struct Shared {
    path: PathBuf,
    /// `None` once the connection is closed: nothing may be added after that.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
    subscribers: Mutex<Vec<Subscriber>>,
    /// Why the connection closed, once it has, and the kind of error that
    /// commands in flight at that moment fail with.
    close_reason: Mutex<Option<(ErrorKind, String)>>,
    closed_tx: watch::Sender<bool>,
}

struct Subscriber {
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl Shared {
    /// Adds a pending command; returns how many are pending now.
    fn register(&self, id: u64, tx: oneshot::Sender<Reply>) -> Result<usize, Error> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.as_mut() {
            Some(map) => {
                map.insert(id, tx);
                Ok(map.len())
            }
            None => Err(self.disconnected_error()),
        }
    }

    fn unregister(&self, id: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = pending.as_mut() {
            map.remove(&id);
        }
    }

    fn take_pending(&self, id: u64) -> Option<oneshot::Sender<Reply>> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.as_mut().and_then(|m| m.remove(&id))
    }

    fn in_flight(&self) -> usize {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.as_ref().map_or(0, HashMap::len)
    }

    fn reason(&self) -> String {
        self.close_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(|| "connection closed".to_owned(), |(_, r)| r.clone())
    }

    /// The error for commands issued after the connection closed.
    fn disconnected_error(&self) -> Error {
        Error::disconnected(format!(
            "QMP connection to {} closed: {}",
            self.path.display(),
            self.reason()
        ))
    }

    /// Closes the connection state: fails every pending command with `kind`
    /// ([`ErrorKind::Disconnected`], or [`ErrorKind::Protocol`] when QEMU broke the
    /// protocol), ends every event stream. Idempotent; the first reason wins.
    fn shutdown(&self, kind: ErrorKind, reason: String) {
        {
            let mut r = self.close_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_some() {
                return;
            }
            tracing::debug!(path = %self.path.display(), %reason, "QMP connection closed");
            *r = Some((kind, reason.clone()));
        }
        let drained = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let msg = format!("QMP connection to {} closed: {reason}", self.path.display());
        for (_, tx) in drained.into_iter().flatten() {
            let _ = tx.send(Err(Error::new(kind, msg.clone())));
        }
        // Set before clearing the subscribers: `subscribe` checks it under the same lock.
        self.closed_tx.send_replace(true);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn is_closed(&self) -> bool {
        *self.closed_tx.borrow()
    }

    fn dispatch_event(&self, ev: Event) {
        tracing::trace!(event = %ev.name, "QMP event");
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| match s.tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if s.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        event = %ev.name,
                        cap = EVENT_QUEUE_CAP,
                        "QMP subscriber not reading: its queue is full, events are dropped for it"
                    );
                }
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Routes one line received from QEMU.
    fn dispatch_line(&self, line: &[u8]) {
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            return;
        }
        let mut v: Value = match crate::deep::parse_line(trimmed) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(line = %excerpt(trimmed), error = %e, "QMP: ignoring a line that is not JSON");
                return;
            }
        };
        if !v.is_object() {
            tracing::warn!(line = %excerpt(trimmed), "QMP: ignoring a message that is not an object");
            return;
        }
        if v.get("event").is_some() {
            match Event::parse(&mut v) {
                Some(ev) => self.dispatch_event(ev),
                None => {
                    tracing::warn!(line = %excerpt(trimmed), "QMP: ignoring a malformed event")
                }
            }
            return;
        }
        let reply = if let Some(ret) = v.get_mut("return") {
            Ok(ret.take())
        } else if let Some(err) = v.get("error") {
            let class = err["class"].as_str().unwrap_or("GenericError").to_owned();
            let desc = err["desc"].as_str().unwrap_or_default().to_owned();
            Err(Error::command_failed(class, desc))
        } else if v.get("QMP").is_some() {
            tracing::warn!("QMP: ignoring an unexpected second greeting");
            return;
        } else {
            tracing::warn!(line = %excerpt(trimmed), "QMP: ignoring an unknown message");
            return;
        };
        let Some(id) = v.get("id") else {
            // QEMU answers input it could not parse with an error that has no id.
            tracing::warn!(line = %excerpt(trimmed), "QMP: reply without id (parse error?) ignored");
            return;
        };
        match id.as_u64().and_then(|id| self.take_pending(id)) {
            Some(tx) => {
                // The receiver may be gone (caller cancelled or timed out): nothing to do.
                let _ = tx.send(reply);
            }
            None => {
                tracing::trace!(%id, "QMP: reply with unknown id dropped");
            }
        }
    }
}

/// The part of a client that, once every clone is dropped, stops the connection tasks.
struct Handle {
    shared: Arc<Shared>,
    greeting: Greeting,
    next_id: AtomicU64,
    writer: Arc<Writer>,
    /// Held by a command that carries descriptors from its send until its reply: QEMU's
    /// socket chardev keeps only the descriptors of the last message read, so a second
    /// message with descriptors read before the first command ran would replace them.
    fd_command: tokio::sync::Mutex<()>,
    /// Dropped with the last client clone: tells the reader task to stop.
    _stop_tx: oneshot::Sender<()>,
}

/// An asynchronous QMP client. Cheap to clone; clones share one connection and any
/// number of tasks may have commands in flight at the same time.
///
/// ```no_run
/// # async fn f() -> Result<(), qmp_proto::Error> {
/// let qmp = qmp_proto::QmpClient::connect_unix("/run/vm/qmp.sock").await?;
/// let mut events = qmp.subscribe(); // register before the command whose events you want
/// qmp.execute("stop", None).await?;
/// events.wait_for("STOP", std::time::Duration::from_secs(5)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Handle>,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.inner.shared.path)
            .field("version", &self.inner.greeting.version)
            .field("closed", &self.inner.shared.is_closed())
            .finish()
    }
}

impl QmpClient {
    /// Connects to QEMU's QMP socket, reads the greeting and negotiates capabilities
    /// (`qmp_capabilities`, enabling `oob` when QEMU offers it).
    ///
    /// The greeting and negotiation must complete within [`CONNECT_TIMEOUT`]; see
    /// [`QmpClient::connect_unix_timeout`] to choose.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<QmpClient, Error> {
        Self::connect_unix_timeout(path, CONNECT_TIMEOUT).await
    }

    /// [`QmpClient::connect_unix`], with the greeting and negotiation bounded by `t`.
    ///
    /// QEMU serves one client per QMP socket: while another client is connected, the
    /// connection is accepted but no greeting comes, and this fails with
    /// [`ErrorKind::Timeout`] after `t`.
    pub async fn connect_unix_timeout(
        path: impl AsRef<Path>,
        t: Duration,
    ) -> Result<QmpClient, Error> {
        let deadline = crate::framing::deadline_after(t);
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| Error::io(format!("connecting to QMP socket {}", path.display()), e))?;
        let (rd, wr) = stream
            .into_std()
            .and_then(sock::split)
            .map_err(|e| Error::io(format!("setting up QMP socket {}", path.display()), e))?;
        let mut reader = BufReader::with_capacity(64 * 1024, rd);
        let mut line = Vec::new();
        let greeting = match tokio::time::timeout_at(
            deadline,
            read_line_capped(&mut reader, &mut line, MAX_LINE),
        )
        .await
        {
            Err(_) => {
                return Err(Error::timeout(format!(
                    "no QMP greeting from {} within {t:?} (QEMU serves one QMP client at a \
                     time: is another client connected?)",
                    path.display(),
                )))
            }
            Ok(Err(LineError::Io(e))) => {
                return Err(Error::io(
                    format!("reading QMP greeting from {}", path.display()),
                    e,
                ))
            }
            Ok(Err(LineError::TooLong(cap))) => {
                return Err(Error::protocol(format!(
                    "QMP greeting longer than {cap} bytes"
                )))
            }
            Ok(Ok(false)) => {
                return Err(Error::disconnected(format!(
                    "{} closed before sending a QMP greeting",
                    path.display()
                )))
            }
            Ok(Ok(true)) => {
                let v: Value = serde_json::from_slice(&line).map_err(|e| {
                    Error::protocol(format!(
                        "QMP greeting is not JSON ({e}): {}",
                        excerpt(&line)
                    ))
                })?;
                Greeting::parse(&v)?
            }
        };
        tracing::debug!(path = %path.display(), version = ?greeting.version, caps = ?greeting.capabilities, "QMP greeting");

        let (closed_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            path: path.clone(),
            pending: Mutex::new(Some(HashMap::new())),
            subscribers: Mutex::new(Vec::new()),
            close_reason: Mutex::new(None),
            closed_tx,
        });
        let writer = Arc::new(Writer::new(wr));
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(reader_task(shared.clone(), reader, stop_rx));
        tokio::spawn(writer_task(shared.clone(), writer.clone()));

        let oob = greeting.capabilities.iter().any(|c| c == "oob");
        let client = QmpClient {
            inner: Arc::new(Handle {
                shared,
                greeting,
                next_id: AtomicU64::new(1),
                writer,
                fd_command: tokio::sync::Mutex::new(()),
                _stop_tx: stop_tx,
            }),
        };
        let args = oob.then(|| json!({ "enable": ["oob"] }));
        client
            .execute_timeout(
                "qmp_capabilities",
                args,
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            )
            .await?;
        Ok(client)
    }

    /// The greeting QEMU sent when the connection was made.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Runs a command and returns its `return` value, allowing [`DEFAULT_TIMEOUT`].
    pub async fn execute(&self, cmd: &str, args: Option<Value>) -> Result<Value, Error> {
        self.execute_timeout(cmd, args, DEFAULT_TIMEOUT).await
    }

    /// Runs a command and returns its `return` value, allowing `t` for the reply.
    ///
    /// An `{"error":..}` reply becomes an [`ErrorKind::Command`]
    /// error. Dropping the returned future forgets the command (its late reply is dropped).
    pub async fn execute_timeout(
        &self,
        cmd: &str,
        args: Option<Value>,
        t: Duration,
    ) -> Result<Value, Error> {
        self.execute_inner(cmd, args, t, &[]).await
    }

    /// Runs a command with file descriptors passed to QEMU over the socket (SCM_RIGHTS,
    /// attached to the command's first byte), as `getfd` and `add-fd` need; allowing `t`.
    ///
    /// QEMU keeps its own copy of each descriptor: the caller may close `fds` once this
    /// returns. Commands that pass descriptors run one at a time (each waits for the reply
    /// of the one before); other commands go on concurrently. Errors as
    /// [`QmpClient::execute_timeout`].
    pub async fn execute_with_fds(
        &self,
        cmd: &str,
        args: Option<Value>,
        fds: &[BorrowedFd<'_>],
        t: Duration,
    ) -> Result<Value, Error> {
        let deadline = crate::framing::deadline_after(t);
        let Ok(_one_at_a_time) =
            tokio::time::timeout_at(deadline, self.inner.fd_command.lock()).await
        else {
            return Err(Error::timeout(format!(
                "another command passing descriptors still runs after {t:?}"
            ))
            .with_command(cmd));
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.execute_inner(cmd, args, left, fds).await
    }

    async fn execute_inner(
        &self,
        cmd: &str,
        args: Option<Value>,
        t: Duration,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, Error> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| {
            Error::protocol(format!("cannot encode command: {e}")).with_command(cmd)
        })?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        let in_flight = shared.register(id, tx).map_err(|e| e.with_command(cmd))?;
        let _guard = PendingGuard { shared, id };
        tracing::trace!(cmd, id, "QMP execute");
        // Alone: write now. With others in flight: let the writer task batch the lines.
        // With descriptors: own the socket until they went with the line.
        let deadline = crate::framing::deadline_after(t);
        let sent = if fds.is_empty() {
            self.inner.writer.send(&line, in_flight == 1)
        } else {
            match tokio::time::timeout_at(deadline, self.inner.writer.send_with_fds(&line, fds))
                .await
            {
                Ok(r) => r,
                // Cancelled before the descriptors went: nothing of the line was written.
                Err(_) => {
                    return Err(
                        Error::timeout(format!("could not send the command within {t:?}"))
                            .with_command(cmd),
                    )
                }
            }
        };
        if let Err(e) = sent {
            shared.shutdown(ErrorKind::Disconnected, format!("write error: {e}"));
            return Err(shared.disconnected_error().with_command(cmd));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(Error::timeout(format!("no reply within {t:?}")).with_command(cmd)),
            Ok(Err(_)) => Err(shared.disconnected_error().with_command(cmd)),
            Ok(Ok(reply)) => reply.map_err(|e| e.with_command(cmd)),
        }
    }

    /// A stream of every event received after this call.
    ///
    /// Subscribe BEFORE issuing the command whose events you want to see.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE_CAP);
        let dropped = Arc::new(AtomicU64::new(0));
        let shared = &self.inner.shared;
        let mut subs = shared.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the subscribers lock: shutdown marks the connection closed before
        // it clears the list, so a subscriber added here is either cleared or never added.
        // Forget streams that were dropped (also done when the next event arrives).
        subs.retain(|s| !s.tx.is_closed());
        if !shared.is_closed() {
            subs.push(Subscriber {
                tx,
                dropped: dropped.clone(),
            });
        }
        EventStream { rx, dropped }
    }

    /// Resolves once the connection is closed (EOF from QEMU, an I/O or protocol error).
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive: this cannot fail.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Whether the connection is closed already.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    /// How many commands are waiting for their reply right now.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.in_flight()
    }
}

/// Removes a pending entry when its `execute` future ends or is dropped.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

async fn reader_task(
    shared: Arc<Shared>,
    mut reader: BufReader<ReadSide>,
    mut stop_rx: oneshot::Receiver<()>,
) {
    let mut line = Vec::new();
    let mut closed_rx = shared.closed_tx.subscribe();
    let (kind, reason) = loop {
        tokio::select! {
            _ = &mut stop_rx => break (ErrorKind::Disconnected, "client dropped".to_owned()),
            _ = wait_closed(&mut closed_rx) => break (ErrorKind::Disconnected, "closed".to_owned()),
            r = read_line_capped(&mut reader, &mut line, MAX_LINE) => match r {
                Ok(true) => {
                    shared.dispatch_line(&line);
                    line.clear();
                }
                Ok(false) => break (ErrorKind::Disconnected, "EOF from QEMU".to_owned()),
                Err(LineError::Io(e)) => break (ErrorKind::Disconnected, format!("read error: {e}")),
                Err(LineError::TooLong(cap)) => {
                    tracing::error!(path = %shared.path.display(), cap, "QMP line too long: closing the connection");
                    break (
                        ErrorKind::Protocol,
                        format!("protocol error: QEMU sent a line longer than {cap} bytes"),
                    );
                }
            }
        }
    };
    shared.shutdown(kind, reason);
}

/// Resolves once the connection is marked closed (the watch guard is not held across awaits).
async fn wait_closed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|closed| *closed).await;
}

async fn writer_task(shared: Arc<Shared>, writer: Arc<Writer>) {
    let mut closed_rx = shared.closed_tx.subscribe();
    tokio::select! {
        _ = wait_closed(&mut closed_rx) => {}
        e = writer.run() => shared.shutdown(ErrorKind::Disconnected, format!("write error: {e}")),
    }
    writer.shutdown();
}

/// The events a subscriber receives, in arrival order. Ends (`None`) when the connection closes.
pub struct EventStream {
    rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream")
            .field("queued", &self.rx.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl EventStream {
    /// The next event; `None` once the connection is closed and the queue is drained.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `t` for the next event called `name`, discarding other events.
    pub async fn wait_for(&mut self, name: &str, t: Duration) -> Result<Event, Error> {
        let found = tokio::time::timeout(t, async {
            while let Some(ev) = self.rx.recv().await {
                if ev.name == name {
                    return Some(ev);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => Err(Error::disconnected(format!(
                "QMP connection closed while waiting for event {name}"
            ))),
            Err(_) => Err(Error::timeout(format!("no {name} event within {t:?}"))),
        }
    }

    /// How many events this subscriber missed because its queue was full
    /// ([`EVENT_QUEUE_CAP`] unread events).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
