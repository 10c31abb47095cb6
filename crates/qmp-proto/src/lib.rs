//! Async (tokio) clients for QEMU's QMP monitor and the QEMU guest agent.
//!
//! - [`QmpClient`]: one connection to a QMP socket shared by any number of tasks;
//!   commands are matched to replies by id, events are fanned out to every
//!   [`EventStream`] from [`QmpClient::subscribe`], every command has a timeout.
//! - [`QgaClient`]: the guest agent, with the `guest-sync-delimited` handshake,
//!   re-synchronisation after failures and [`QgaClient::exec`] for `guest-exec`.
//!
//! Both report failures as [`Error`], whose [`ErrorKind`] callers match on.
//! See the crate README and docs/qmp-proto.md.
#![deny(missing_docs)]

pub mod error;
mod framing;
pub mod qga;
pub mod qmp;

pub use error::{Error, ErrorKind};
pub use qga::{ExecOutput, QgaClient};
pub use qmp::{Event, EventStream, Greeting, QmpClient};
