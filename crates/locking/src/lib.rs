//! Volume leases and QEMU-compatible image locks.
//!
//! This first layer reads QEMU's own image locks: [`qemu::probe`] tells which of QEMU's
//! permission bytes are held on an image by any process (a QEMU started by any tool, or
//! qemu-img), without disturbing them. Leases and taking QEMU's locks build on it.
#![deny(missing_docs)]

mod error;
pub mod qemu;

pub use error::{Error, ErrorKind};
