#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod commands;
mod deep;
pub mod error;
mod framing;
mod jobs;
pub mod qga;
pub mod qmp;
mod sock;

pub use commands::{Command, JobCommand};
pub use error::{Error, ErrorKind};
pub use qga::{ExecOutput, QgaClient};
pub use qmp::{Event, EventStream, Greeting, QmpClient};
