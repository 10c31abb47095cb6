//! Typed QMP commands for the snapshot set, built with serde.
//!
//! Each command is a struct named after the QMP command (`blockdev-snapshot-sync` is
//! [`BlockdevSnapshotSync`]) whose fields are the command's arguments in `kebab-case`,
//! optional ones skipped when `None`. [`Command::Returns`] is the typed reply; reply
//! structs ignore members they do not know, so newer QEMUs keep working. Run them with
//! [`QmpClient::run`]; jobs ([`JobCommand`]) with [`QmpClient::run_job_command`].
//! Anything not covered here goes through [`QmpClient::execute`] with JSON arguments.
//!
//! ```no_run
//! # async fn f(qmp: qmp_proto::QmpClient) -> Result<(), qmp_proto::Error> {
//! use qmp_proto::commands::*;
//! let st = qmp.run(&QueryStatus).await?;
//! assert_eq!(st.status, RunState::Running);
//! qmp.run(&Transaction::new(vec![
//!     TransactionAction::BlockdevSnapshotSync(BlockdevSnapshotSync::node("d0", "/s/d0.ovl.qcow2")),
//!     TransactionAction::BlockdevSnapshotSync(BlockdevSnapshotSync::node("d1", "/s/d1.ovl.qcow2")),
//! ])).await?;
//! # Ok(()) }
//! ```

use std::os::fd::BorrowedFd;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::qmp::{QmpClient, DEFAULT_TIMEOUT};

/// A QMP command: its arguments are the serialized struct, its reply is `Returns`.
///
/// A command without arguments is a unit struct (serialized as `null`); an argument
/// object that serializes to `{}` is sent without `arguments` as well.
pub trait Command: Serialize {
    /// The QMP command name, e.g. `"blockdev-snapshot-sync"`.
    const NAME: &'static str;
    /// What the command's `return` member decodes to.
    type Returns: DeserializeOwned + Send;
}

/// A command that starts a QEMU job (its `{}` reply says nothing about the job's outcome).
pub trait JobCommand: Command {
    /// The id of the job the command starts.
    fn job_id(&self) -> &str;
}

impl QmpClient {
    /// Runs a typed command, allowing [`DEFAULT_TIMEOUT`] for the reply.
    pub async fn run<C: Command>(&self, cmd: &C) -> Result<C::Returns, Error> {
        self.run_timeout(cmd, DEFAULT_TIMEOUT).await
    }

    /// Runs a typed command, allowing `t` for the reply.
    ///
    /// Errors as [`QmpClient::execute_timeout`]; a reply that does not decode to
    /// `C::Returns` is an [`ErrorKind::Protocol`](crate::ErrorKind::Protocol) error.
    pub async fn run_timeout<C: Command>(&self, cmd: &C, t: Duration) -> Result<C::Returns, Error> {
        let args = encode_args(cmd)?;
        let reply = self.execute_timeout(C::NAME, args, t).await?;
        decode_reply::<C::Returns>(reply).map_err(|e| e.with_command(C::NAME))
    }

    /// Runs a typed command that takes descriptors over the socket ([`Getfd`], [`AddFd`]),
    /// allowing `t`; see [`QmpClient::execute_with_fds`].
    pub async fn run_with_fds<C: Command>(
        &self,
        cmd: &C,
        fds: &[BorrowedFd<'_>],
        t: Duration,
    ) -> Result<C::Returns, Error> {
        let args = encode_args(cmd)?;
        let reply = self.execute_with_fds(C::NAME, args, fds, t).await?;
        decode_reply::<C::Returns>(reply).map_err(|e| e.with_command(C::NAME))
    }

    /// Passes `fd` to QEMU under `name` (`getfd`), for commands that take a descriptor
    /// by name; QEMU keeps its own copy until [`Closefd`].
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
        let cmd = Getfd {
            fdname: name.to_owned(),
        };
        self.run_with_fds(&cmd, &[fd], DEFAULT_TIMEOUT).await?;
        Ok(())
    }

    /// Adds `fd` to a descriptor set (`add-fd`; a new set when `fdset_id` is `None`), so
    /// that `/dev/fdset/N` names it in a filename; QEMU keeps its own copy until
    /// [`RemoveFd`].
    pub async fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<i64>,
        opaque: Option<&str>,
    ) -> Result<AddfdInfo, Error> {
        let cmd = AddFd {
            fdset_id,
            opaque: opaque.map(str::to_owned),
        };
        self.run_with_fds(&cmd, &[fd], DEFAULT_TIMEOUT).await
    }

    /// Runs a job command to the job's end within `t` (see [`QmpClient::run_job`]): a job
    /// that concludes with an error is an [`ErrorKind::Job`](crate::ErrorKind::Job) error
    /// carrying QEMU's message from `query-jobs`, even though the command answered `{}`.
    pub async fn run_job_command<C: JobCommand>(&self, cmd: &C, t: Duration) -> Result<(), Error> {
        let args = serde_json::to_value(cmd).map_err(|e| {
            Error::protocol(format!("cannot encode arguments: {e}")).with_command(C::NAME)
        })?;
        self.run_job(C::NAME, args, cmd.job_id(), t).await
    }
}

/// A command's `arguments` member: `None` for a unit struct or an empty object.
fn encode_args<C: Command>(cmd: &C) -> Result<Option<Value>, Error> {
    match serde_json::to_value(cmd) {
        Ok(Value::Null) => Ok(None),
        Ok(Value::Object(m)) if m.is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            Err(Error::protocol(format!("cannot encode arguments: {e}")).with_command(C::NAME))
        }
    }
}

fn decode_reply<T: DeserializeOwned + Send>(reply: Value) -> Result<T, Error> {
    crate::deep::decode(reply).map_err(Error::protocol)
}

/// The reply of commands that return nothing (`{}`); also an argument-less object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Defines an enum of QAPI string values that keeps values it does not know.
macro_rules! qapi_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $var,)*
            /// A value this crate does not know (a newer QEMU).
            Other(String),
        }

        impl $name {
            /// The QAPI spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$var => $s,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($s => $name::$var,)*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok($name::from(s.as_ref()))
            }
        }
    };
}

qapi_enum! {
    /// A VM's run state (`RunState`).
    RunState {
        /// `debug`
        Debug = "debug",
        /// `inmigrate`
        Inmigrate = "inmigrate",
        /// `internal-error`
        InternalError = "internal-error",
        /// `io-error`
        IoError = "io-error",
        /// `paused`
        Paused = "paused",
        /// `postmigrate`
        Postmigrate = "postmigrate",
        /// `prelaunch`
        Prelaunch = "prelaunch",
        /// `finish-migrate`
        FinishMigrate = "finish-migrate",
        /// `restore-vm`
        RestoreVm = "restore-vm",
        /// `running`
        Running = "running",
        /// `save-vm`
        SaveVm = "save-vm",
        /// `shutdown`
        Shutdown = "shutdown",
        /// `suspended`
        Suspended = "suspended",
        /// `watchdog`
        Watchdog = "watchdog",
        /// `guest-panicked`
        GuestPanicked = "guest-panicked",
        /// `colo`
        Colo = "colo",
    }
}

qapi_enum! {
    /// A job's status (`JobStatus`).
    JobStatus {
        /// `undefined`
        Undefined = "undefined",
        /// `created`
        Created = "created",
        /// `running`
        Running = "running",
        /// `paused`
        Paused = "paused",
        /// `ready`: waits for `job-complete` (active commit, mirror).
        Ready = "ready",
        /// `standby`
        Standby = "standby",
        /// `waiting`
        Waiting = "waiting",
        /// `pending`: waits for `job-finalize` (`auto-finalize: false`).
        Pending = "pending",
        /// `aborting`
        Aborting = "aborting",
        /// `concluded`: waits for `job-dismiss` (`auto-dismiss: false`).
        Concluded = "concluded",
        /// `null`: gone.
        Null = "null",
    }
}

qapi_enum! {
    /// A migration's status (`MigrationStatus`).
    MigrationStatus {
        /// `none`
        None = "none",
        /// `setup`
        Setup = "setup",
        /// `cancelling`
        Cancelling = "cancelling",
        /// `cancelled`
        Cancelled = "cancelled",
        /// `active`
        Active = "active",
        /// `postcopy-active`
        PostcopyActive = "postcopy-active",
        /// `postcopy-paused`
        PostcopyPaused = "postcopy-paused",
        /// `postcopy-recover-setup`
        PostcopyRecoverSetup = "postcopy-recover-setup",
        /// `postcopy-recover`
        PostcopyRecover = "postcopy-recover",
        /// `completed`
        Completed = "completed",
        /// `failed`
        Failed = "failed",
        /// `colo`
        Colo = "colo",
        /// `pre-switchover`
        PreSwitchover = "pre-switchover",
        /// `device`
        Device = "device",
        /// `wait-unplug`
        WaitUnplug = "wait-unplug",
    }
}

qapi_enum! {
    /// How `blockdev-snapshot-sync` treats the overlay file (`NewImageMode`).
    NewImageMode {
        /// `existing`: the file exists already; QEMU opens it.
        Existing = "existing",
        /// `absolute-paths`: QEMU creates it, recording the backing file's absolute path.
        AbsolutePaths = "absolute-paths",
    }
}

qapi_enum! {
    /// What happens to a transaction's actions when one fails (`ActionCompletionMode`).
    ActionCompletionMode {
        /// `individual`: each action succeeds or fails on its own.
        Individual = "individual",
        /// `grouped`: jobs started by the transaction fail together.
        Grouped = "grouped",
    }
}

/// Defines a command struct without arguments.
macro_rules! unit_command {
    ($(#[$m:meta])* $name:ident = $qmp:literal -> $ret:ty) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct $name;

        impl Command for $name {
            const NAME: &'static str = $qmp;
            type Returns = $ret;
        }
    };
}

/// Implements [`Command`] for an argument struct.
macro_rules! command {
    ($name:ident = $qmp:literal -> $ret:ty) => {
        impl Command for $name {
            const NAME: &'static str = $qmp;
            type Returns = $ret;
        }
    };
}

// ---------------------------------------------------------------------------------------
// Run state

unit_command!(
    /// `stop`: pauses the vCPUs (event `STOP`).
    Stop = "stop" -> Empty
);
unit_command!(
    /// `cont`: resumes the vCPUs (event `RESUME`).
    Cont = "cont" -> Empty
);
unit_command!(
    /// `quit`: QEMU exits (the connection closes after the reply).
    Quit = "quit" -> Empty
);
unit_command!(
    /// `query-status`.
    QueryStatus = "query-status" -> StatusInfo
);

/// The reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

// ---------------------------------------------------------------------------------------
// Block queries

unit_command!(
    /// `query-block`: the block backends (devices) and their inserted media.
    QueryBlock = "query-block" -> Vec<BlockInfo>
);

/// `query-named-block-nodes`: every named block node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryNamedBlockNodes {
    /// Leave out the `backing-image` chains of the images (a flat list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}
command!(QueryNamedBlockNodes = "query-named-block-nodes" -> Vec<BlockDeviceInfo>);

/// `qom-get`: a property of a QOM object. `path` `/machine/peripheral/ID` and property
/// `drive` give the root node of a disk device's block backend: the top of its chain, which
/// `query-block` also says but at a cost that grows with the chain (QEMU describes every image
/// of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QomGet {
    /// The object's QOM path.
    pub path: String,
    /// The property.
    pub property: String,
}
command!(QomGet = "qom-get" -> Value);

/// One entry of `query-block`.
///
/// Under `-blockdev`, `device` is `""`: identify a disk by [`BlockInfo::qdev`] and the
/// node name of what is inserted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockInfo {
    /// The backend name (`""` for devices attached to `-blockdev` nodes).
    pub device: String,
    /// The qdev id or QOM path of the device using it.
    pub qdev: Option<String>,
    /// The device type (`"unknown"` for most).
    #[serde(rename = "type")]
    pub kind: String,
    /// Removable media.
    pub removable: bool,
    /// Media locked.
    pub locked: bool,
    /// What is inserted; `None` for an empty drive.
    pub inserted: Option<BlockDeviceInfo>,
    /// Tray open (removable media only).
    pub tray_open: Option<bool>,
    /// I/O status (`ok`, `failed`, `nospace`) when the device reports it.
    #[serde(rename = "io-status")]
    pub io_status: Option<String>,
}

/// A block node (`BlockDeviceInfo`): from `query-named-block-nodes`, or the root node of
/// a `query-block` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockDeviceInfo {
    /// The node's filename (for a qcow2 node: the image file).
    pub file: String,
    /// The node name.
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    /// Read-only.
    pub ro: bool,
    /// The driver (`qcow2`, `file`, ...).
    pub drv: String,
    /// The backing file's name, if any.
    pub backing_file: Option<String>,
    /// The depth of the backing chain.
    pub backing_file_depth: u64,
    /// Encrypted.
    pub encrypted: bool,
    /// The image, with its backing chain unless `flat`.
    pub image: ImageInfo,
}

/// An image (`ImageInfo`), as the block layer sees it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The filename.
    pub filename: String,
    /// The format (`qcow2`, `raw`, `file`).
    pub format: String,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host.
    pub actual_size: Option<u64>,
    /// The cluster size.
    pub cluster_size: Option<u64>,
    /// The image is marked dirty (needs a check).
    pub dirty_flag: Option<bool>,
    /// The backing file's name as recorded in the image.
    pub backing_filename: Option<String>,
    /// The backing file's full name.
    pub full_backing_filename: Option<String>,
    /// The backing file's format as recorded in the image.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Option<Vec<SnapshotInfo>>,
    /// The backing image (absent with `flat`).
    pub backing_image: Option<Box<ImageInfo>>,
    /// Format-specific details, as QEMU sent them.
    pub format_specific: Option<Value>,
}

/// An internal snapshot (`SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// The snapshot's id.
    pub id: String,
    /// Its name (tag).
    pub name: String,
    /// Size of its saved VM state in bytes (0: disk only).
    pub vm_state_size: u64,
    /// Creation time: seconds.
    pub date_sec: i64,
    /// Creation time: nanoseconds.
    pub date_nsec: i64,
    /// Guest clock at creation: seconds.
    pub vm_clock_sec: i64,
    /// Guest clock at creation: nanoseconds.
    pub vm_clock_nsec: i64,
}

// ---------------------------------------------------------------------------------------
// Nodes

/// Options of a block node (`BlockdevOptions`): the driver, the node name and the
/// driver's options as JSON (the union has dozens of drivers; helpers build the common ones).
///
/// ```
/// use qmp_proto::commands::BlockdevOptions;
/// let file = BlockdevOptions::file("ovl-file", "/s/ovl.qcow2");
/// let ovl = BlockdevOptions::qcow2("ovl", "ovl-file").backing(None);
/// assert_eq!(serde_json::to_value(&ovl).unwrap(),
///     serde_json::json!({"driver": "qcow2", "node-name": "ovl", "file": "ovl-file", "backing": null}));
/// # let _ = file;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockdevOptions {
    /// The block driver (`file`, `qcow2`, `raw`, ...).
    pub driver: String,
    /// The node name.
    #[serde(rename = "node-name", skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The driver's other options (`kebab-case` keys as in QAPI).
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

impl BlockdevOptions {
    /// A node of `driver` named `node_name` with no other options.
    pub fn new(driver: &str, node_name: &str) -> Self {
        BlockdevOptions {
            driver: driver.to_owned(),
            node_name: Some(node_name.to_owned()),
            options: Map::new(),
        }
    }

    /// A `file` protocol node for `filename`.
    pub fn file(node_name: &str, filename: impl AsRef<std::path::Path>) -> Self {
        Self::new("file", node_name)
            .set("filename", filename.as_ref().to_string_lossy().into_owned())
    }

    /// A `qcow2` format node on the node `file_node`. Its backing chain is opened from
    /// the image header unless [`BlockdevOptions::backing`] says otherwise.
    pub fn qcow2(node_name: &str, file_node: &str) -> Self {
        Self::new("qcow2", node_name).set("file", file_node)
    }

    /// A `raw` format node on the node `file_node`.
    pub fn raw(node_name: &str, file_node: &str) -> Self {
        Self::new("raw", node_name).set("file", file_node)
    }

    /// Sets `backing`: `None` (JSON `null`) opens no backing file, as an overlay for
    /// `blockdev-snapshot` must; `Some(node)` uses that node.
    pub fn backing(self, node: Option<&str>) -> Self {
        self.set("backing", node.map_or(Value::Null, Value::from))
    }

    /// Sets `read-only`.
    pub fn read_only(self, ro: bool) -> Self {
        self.set("read-only", ro)
    }

    /// Sets any option.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.options.insert(key.to_owned(), value.into());
        self
    }
}

/// `blockdev-add`: opens a new block node.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct BlockdevAdd(pub BlockdevOptions);
command!(BlockdevAdd = "blockdev-add" -> Empty);

/// `blockdev-del`: closes a node nothing uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node to close.
    pub node_name: String,
}
command!(BlockdevDel = "blockdev-del" -> Empty);

/// `blockdev-reopen`: changes options of existing nodes (e.g. `read-only`, `backing`);
/// each entry must give the node's full options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockdevReopen {
    /// The nodes' new options.
    pub options: Vec<BlockdevOptions>,
}
command!(BlockdevReopen = "blockdev-reopen" -> Empty);

/// Options of `blockdev-create` (`BlockdevCreateOptions`): the driver plus its options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockdevCreateOptions {
    /// The driver (`file`, `qcow2`, ...).
    pub driver: String,
    /// The driver's options (`kebab-case` keys as in QAPI).
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

impl BlockdevCreateOptions {
    /// Create a file of `size` bytes (`driver: file`).
    pub fn file(filename: impl AsRef<std::path::Path>, size: u64) -> Self {
        BlockdevCreateOptions {
            driver: "file".into(),
            options: Map::new(),
        }
        .set("filename", filename.as_ref().to_string_lossy().into_owned())
        .set("size", size)
    }

    /// Format the node `file_node` as a qcow2 image of `size` bytes.
    pub fn qcow2(file_node: &str, size: u64) -> Self {
        BlockdevCreateOptions {
            driver: "qcow2".into(),
            options: Map::new(),
        }
        .set("file", file_node)
        .set("size", size)
    }

    /// Record a backing file (and its format) in the image header.
    pub fn backing_file(self, path: impl AsRef<std::path::Path>, format: &str) -> Self {
        self.set("backing-file", path.as_ref().to_string_lossy().into_owned())
            .set("backing-fmt", format)
    }

    /// Sets any option.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.options.insert(key.to_owned(), value.into());
        self
    }
}

/// `blockdev-create`: a job that creates an image (see [`QmpClient::run_job_command`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCreate {
    /// The job's id.
    pub job_id: String,
    /// What to create.
    pub options: BlockdevCreateOptions,
}
command!(BlockdevCreate = "blockdev-create" -> Empty);
impl JobCommand for BlockdevCreate {
    fn job_id(&self) -> &str {
        &self.job_id
    }
}

// ---------------------------------------------------------------------------------------
// External snapshots

/// `blockdev-snapshot-sync`: QEMU creates (or opens, with [`NewImageMode::Existing`]) an
/// overlay file and makes it the active layer on top of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSnapshotSync {
    /// The backend name (not for `-blockdev` disks: use `node_name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The node to snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The overlay's file name.
    pub snapshot_file: String,
    /// The overlay node's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_node_name: Option<String>,
    /// The overlay's format (default `qcow2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Create the file or open an existing one (default `absolute-paths`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<NewImageMode>,
}

impl BlockdevSnapshotSync {
    /// Snapshot node `node_name` into a new qcow2 file `snapshot_file`.
    pub fn node(node_name: &str, snapshot_file: impl AsRef<std::path::Path>) -> Self {
        BlockdevSnapshotSync {
            device: None,
            node_name: Some(node_name.to_owned()),
            snapshot_file: snapshot_file.as_ref().to_string_lossy().into_owned(),
            snapshot_node_name: None,
            format: None,
            mode: None,
        }
    }

    /// Name the overlay node.
    pub fn snapshot_node_name(mut self, name: &str) -> Self {
        self.snapshot_node_name = Some(name.to_owned());
        self
    }
}
command!(BlockdevSnapshotSync = "blockdev-snapshot-sync" -> Empty);

/// `blockdev-snapshot`: makes an existing node (added with `"backing": null`) the overlay
/// of `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevSnapshot {
    /// The node that becomes the backing file.
    pub node: String,
    /// The overlay node.
    pub overlay: String,
}
command!(BlockdevSnapshot = "blockdev-snapshot" -> Empty);

// ---------------------------------------------------------------------------------------
// Internal snapshots

/// `blockdev-snapshot-internal-sync`: an internal (qcow2) disk-only snapshot of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevSnapshotInternalSync {
    /// The backend name or the node name of a root node.
    pub device: String,
    /// The snapshot's name.
    pub name: String,
}
command!(BlockdevSnapshotInternalSync = "blockdev-snapshot-internal-sync" -> Empty);

/// `blockdev-snapshot-delete-internal-sync`: deletes an internal snapshot by id and/or name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockdevSnapshotDeleteInternalSync {
    /// The backend name or the node name of a root node.
    pub device: String,
    /// The snapshot's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The snapshot's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
command!(BlockdevSnapshotDeleteInternalSync = "blockdev-snapshot-delete-internal-sync" -> SnapshotInfo);

// ---------------------------------------------------------------------------------------
// Dirty bitmaps (for transactions)

/// `block-dirty-bitmap-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmapAdd {
    /// The node.
    pub node: String,
    /// The bitmap's name.
    pub name: String,
    /// Bytes per bit (a power of two).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u32>,
    /// Stored in the image (qcow2) on close.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// Created disabled (not recording writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}
command!(BlockDirtyBitmapAdd = "block-dirty-bitmap-add" -> Empty);

/// A bitmap of a node (`BlockDirtyBitmap`), the argument of `block-dirty-bitmap-remove`
/// and of the clear/enable/disable transaction actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyBitmap {
    /// The node.
    pub node: String,
    /// The bitmap's name.
    pub name: String,
}

/// `block-dirty-bitmap-remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BlockDirtyBitmapRemove(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapRemove = "block-dirty-bitmap-remove" -> Empty);

// ---------------------------------------------------------------------------------------
// Transactions

/// One action of a `transaction`, serialized as `{"type": "...", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// `abort`: always fails (tests the rollback).
    Abort(Empty),
    /// `blockdev-snapshot`.
    BlockdevSnapshot(BlockdevSnapshot),
    /// `blockdev-snapshot-sync`.
    BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// `blockdev-snapshot-internal-sync`.
    BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync),
    /// `block-dirty-bitmap-add`.
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    /// `block-dirty-bitmap-remove`.
    BlockDirtyBitmapRemove(BlockDirtyBitmap),
    /// `block-dirty-bitmap-clear`.
    BlockDirtyBitmapClear(BlockDirtyBitmap),
    /// `block-dirty-bitmap-enable`.
    BlockDirtyBitmapEnable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-disable`.
    BlockDirtyBitmapDisable(BlockDirtyBitmap),
}

/// Options of a `transaction`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransactionProperties {
    /// How the actions complete (default `individual`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_mode: Option<ActionCompletionMode>,
}

/// `transaction`: all actions take effect, or none does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transaction {
    /// The actions, in order.
    pub actions: Vec<TransactionAction>,
    /// Options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TransactionProperties>,
}

impl Transaction {
    /// A transaction of `actions` with default properties.
    pub fn new(actions: Vec<TransactionAction>) -> Self {
        Transaction {
            actions,
            properties: None,
        }
    }

    /// Sets the completion mode.
    pub fn completion_mode(mut self, mode: ActionCompletionMode) -> Self {
        self.properties = Some(TransactionProperties {
            completion_mode: Some(mode),
        });
        self
    }
}
command!(Transaction = "transaction" -> Empty);

// ---------------------------------------------------------------------------------------
// VM snapshots (jobs)

/// `snapshot-save`: a job saving the VM state and an internal snapshot of `devices`.
/// The vCPUs are stopped while it runs. Its `{}` reply does not mean success: run it
/// with [`QmpClient::run_job_command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotSave {
    /// The job's id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The node that receives the VM state.
    pub vmstate: String,
    /// The nodes to snapshot (include every writable one).
    pub devices: Vec<String>,
}
command!(SnapshotSave = "snapshot-save" -> Empty);
impl JobCommand for SnapshotSave {
    fn job_id(&self) -> &str {
        &self.job_id
    }
}

/// `snapshot-load`: a job reverting the VM to a snapshot made by `snapshot-save`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotLoad {
    /// The job's id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The node holding the VM state.
    pub vmstate: String,
    /// The nodes to revert.
    pub devices: Vec<String>,
}
command!(SnapshotLoad = "snapshot-load" -> Empty);
impl JobCommand for SnapshotLoad {
    fn job_id(&self) -> &str {
        &self.job_id
    }
}

/// `snapshot-delete`: a job deleting a snapshot from `devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDelete {
    /// The job's id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The nodes to delete it from.
    pub devices: Vec<String>,
}
command!(SnapshotDelete = "snapshot-delete" -> Empty);
impl JobCommand for SnapshotDelete {
    fn job_id(&self) -> &str {
        &self.job_id
    }
}

// ---------------------------------------------------------------------------------------
// Jobs

unit_command!(
    /// `query-jobs`: every job, including concluded ones waiting for `job-dismiss`.
    QueryJobs = "query-jobs" -> Vec<JobInfo>
);

/// One job of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Its type (`snapshot-save`, `commit`, `stream`, `create`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its status.
    pub status: JobStatus,
    /// Progress so far (units of the job's choosing).
    pub current_progress: u64,
    /// Estimated total progress.
    pub total_progress: u64,
    /// Why it failed, once it concluded with an error.
    pub error: Option<String>,
}

/// Defines a job-control command taking the job's `id`.
macro_rules! job_control {
    ($(#[$m:meta])* $name:ident = $qmp:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        pub struct $name {
            /// The job's id.
            pub id: String,
        }

        impl $name {
            /// For job `id`.
            pub fn new(id: &str) -> Self {
                $name { id: id.to_owned() }
            }
        }

        command!($name = $qmp -> Empty);
    };
}

job_control!(
    /// `job-dismiss`: removes a concluded job.
    JobDismiss = "job-dismiss"
);
job_control!(
    /// `job-finalize`: finalizes a pending job (`auto-finalize: false`).
    JobFinalize = "job-finalize"
);
job_control!(
    /// `job-complete`: completes a ready job (pivots an active commit or a mirror).
    JobComplete = "job-complete"
);
job_control!(
    /// `job-cancel`: cancels a job (event `BLOCK_JOB_CANCELLED` for block jobs).
    JobCancel = "job-cancel"
);

// ---------------------------------------------------------------------------------------
// Block jobs

/// `block-commit`: merges `top_node` (default: the active layer) down into `base_node`
/// (default: the bottom of the chain). Committing the active layer stops in `ready`:
/// `job-complete` pivots to the base.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockCommit {
    /// The job's id (QEMU's default: the device name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The backend name or root node name.
    pub device: String,
    /// The node to commit into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// The top node to commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    /// The backing file name to record in the image above `top` (non-active commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Speed limit in bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Name of the filter node the job inserts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_node_name: Option<String>,
    /// Finalize on its own (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Dismiss on its own (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockCommit = "block-commit" -> Empty);
impl JobCommand for BlockCommit {
    fn job_id(&self) -> &str {
        self.job_id.as_deref().unwrap_or(&self.device)
    }
}

/// `block-stream`: copies the backing chain's data (down to `base_node`, exclusive)
/// into `device` and drops it from the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    /// The job's id (QEMU's default: the device name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The backend name or node name to stream into.
    pub device: String,
    /// The node that becomes the new backing file (default: none, all data is copied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// The last node to copy from (instead of `base_node`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bottom: Option<String>,
    /// The backing file name to record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Speed limit in bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Finalize on its own (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Dismiss on its own (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockStream = "block-stream" -> Empty);
impl JobCommand for BlockStream {
    fn job_id(&self) -> &str {
        self.job_id.as_deref().unwrap_or(&self.device)
    }
}

// ---------------------------------------------------------------------------------------
// Migration (RAM snapshots)

/// A migration capability and its state (`MigrationCapabilityStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// The capability (`background-snapshot`, `events`, ...).
    pub capability: String,
    /// On or off.
    pub state: bool,
}

impl MigrationCapabilityStatus {
    /// `capability` set to `state`.
    pub fn new(capability: &str, state: bool) -> Self {
        MigrationCapabilityStatus {
            capability: capability.to_owned(),
            state,
        }
    }
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities to set.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}
command!(MigrateSetCapabilities = "migrate-set-capabilities" -> Empty);

unit_command!(
    /// `query-migrate-capabilities`.
    QueryMigrateCapabilities = "query-migrate-capabilities" -> Vec<MigrationCapabilityStatus>
);

/// `migrate`: starts a migration (with `background-snapshot`, a RAM snapshot while the
/// VM runs on) and returns at once; poll `query-migrate` or wait for `MIGRATION` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    /// The destination, e.g. `file:/path/state` or `unix:/path/sock`.
    pub uri: String,
}

impl Migrate {
    /// Migrate to `uri`.
    pub fn to(uri: impl Into<String>) -> Self {
        Migrate { uri: uri.into() }
    }
}
command!(Migrate = "migrate" -> Empty);

unit_command!(
    /// `migrate_cancel`: cancels the running migration.
    MigrateCancel = "migrate_cancel" -> Empty
);
unit_command!(
    /// `query-migrate`.
    QueryMigrate = "query-migrate" -> MigrationInfo
);

/// The reply of `query-migrate` (times in milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The status; `None` when no migration ever started.
    pub status: Option<MigrationStatus>,
    /// RAM transfer statistics.
    pub ram: Option<MigrationStats>,
    /// Total time so far or of the whole migration.
    pub total_time: Option<u64>,
    /// The VM's downtime (once completed).
    pub downtime: Option<u64>,
    /// Expected downtime (while active).
    pub expected_downtime: Option<u64>,
    /// Setup time.
    pub setup_time: Option<u64>,
    /// Why it failed.
    pub error_desc: Option<String>,
}

/// RAM statistics of a migration (`MigrationStats`, the members this crate reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes transferred.
    pub transferred: u64,
    /// Bytes remaining.
    pub remaining: u64,
    /// Total RAM bytes.
    pub total: u64,
    /// Zero pages.
    pub duplicate: Option<u64>,
    /// Normal pages sent.
    pub normal: Option<u64>,
    /// Dirty-sync rounds.
    pub dirty_sync_count: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// Descriptor passing (SCM_RIGHTS): run with [`QmpClient::run_with_fds`]

/// `getfd`: QEMU takes the descriptor sent with this command and names it `fdname`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Getfd {
    /// The name other commands use for it.
    pub fdname: String,
}
command!(Getfd = "getfd" -> Empty);

/// `closefd`: QEMU closes the descriptor it took under `fdname`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Closefd {
    /// The name given to `getfd`.
    pub fdname: String,
}
command!(Closefd = "closefd" -> Empty);

/// `add-fd`: QEMU adds the descriptor sent with this command to a descriptor set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFd {
    /// The set to add to; a new set when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdset_id: Option<i64>,
    /// Free text QEMU keeps beside the descriptor (shown by `query-fdsets`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}
command!(AddFd = "add-fd" -> AddfdInfo);

/// The reply of `add-fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddfdInfo {
    /// The set the descriptor is in.
    pub fdset_id: i64,
    /// QEMU's number for its copy of the descriptor.
    pub fd: i64,
}

/// `remove-fd`: removes one descriptor (or, with `fd` `None`, every one) from a set;
/// QEMU closes its copy once no open image uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoveFd {
    /// The set.
    pub fdset_id: i64,
    /// QEMU's number of the descriptor ([`AddfdInfo::fd`]); all of the set when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i64>,
}
command!(RemoveFd = "remove-fd" -> Empty);

unit_command!(
    /// `query-fdsets`.
    QueryFdsets = "query-fdsets" -> Vec<FdsetInfo>
);

/// One descriptor set (`FdsetInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FdsetInfo {
    /// The set's id.
    pub fdset_id: i64,
    /// Its descriptors.
    pub fds: Vec<FdsetFdInfo>,
}

/// A descriptor in a set (`FdsetFdInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FdsetFdInfo {
    /// QEMU's number for it.
    pub fd: i64,
    /// The text given to `add-fd`.
    pub opaque: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_kebab_case_and_skip_none() {
        let c = BlockdevSnapshotSync::node("d0", "/s/o.qcow2").snapshot_node_name("o");
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"node-name": "d0", "snapshot-file": "/s/o.qcow2", "snapshot-node-name": "o"})
        );
        assert_eq!(serde_json::to_value(QueryStatus).unwrap(), Value::Null);
        let c = BlockCommit {
            device: "d0".into(),
            job_id: Some("c".into()),
            auto_dismiss: Some(false),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"job-id": "c", "device": "d0", "auto-dismiss": false})
        );
        assert_eq!(c.job_id(), "c");
    }

    #[test]
    fn transaction_actions_are_type_and_data() {
        let t = Transaction::new(vec![
            TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                node: "d0".into(),
                overlay: "o".into(),
            }),
            TransactionAction::BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync {
                device: "d1".into(),
                name: "s".into(),
            }),
            TransactionAction::Abort(Empty {}),
        ])
        .completion_mode(ActionCompletionMode::Grouped);
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({
                "actions": [
                    {"type": "blockdev-snapshot", "data": {"node": "d0", "overlay": "o"}},
                    {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d1", "name": "s"}},
                    {"type": "abort", "data": {}},
                ],
                "properties": {"completion-mode": "grouped"}
            })
        );
    }

    #[test]
    fn replies_ignore_unknown_members_and_keep_unknown_enum_values() {
        let st: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "x-new", "extra": 1}))
                .unwrap();
        assert_eq!(st.status, RunState::Other("x-new".into()));
        let st: StatusInfo =
            serde_json::from_value(json!({"running": true, "status": "running"})).unwrap();
        assert_eq!(st.status, RunState::Running);
        assert_eq!(st.status.to_string(), "running");
        let j: JobInfo = serde_json::from_value(json!({
            "id": "j", "type": "snapshot-save", "status": "concluded",
            "current-progress": 1, "total-progress": 1, "error": "boom", "new": []
        }))
        .unwrap();
        assert_eq!(j.status, JobStatus::Concluded);
        assert_eq!(j.error.as_deref(), Some("boom"));
    }

    #[test]
    fn blockdev_options_helpers() {
        let o = BlockdevOptions::file("f", "/a,b").read_only(true);
        assert_eq!(
            serde_json::to_value(BlockdevAdd(o)).unwrap(),
            json!({"driver": "file", "node-name": "f", "filename": "/a,b", "read-only": true})
        );
        let c = BlockdevCreate {
            job_id: "j".into(),
            options: BlockdevCreateOptions::qcow2("f", 1 << 20).backing_file("/b.qcow2", "qcow2"),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": 1048576,
                   "backing-file": "/b.qcow2", "backing-fmt": "qcow2"}})
        );
    }
}
