#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod error;
mod framing;
mod jobs;
pub mod qga;
pub mod qmp;

pub use error::{Error, ErrorKind};
pub use qga::{ExecOutput, QgaClient};
pub use qmp::{Event, EventStream, Greeting, QmpClient};
