//! The virt-snap facade: composes the layered crates into one library and the `virt-snap` CLI.
//!
//! - [`state`]: where virt-snap keeps its state (pool and domain definitions, snapshot metadata,
//!   leases, sockets), resolved the same way by the library and the CLI.
//! - [`output`]: the CLI's output conventions (`--output text|json`).
#![deny(missing_docs)]

pub mod output;
pub mod state;

pub use image_formats;
pub use locking;
pub use qmp_proto;
pub use snapshot_core;
pub use storage_backends;
