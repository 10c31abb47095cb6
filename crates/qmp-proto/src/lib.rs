//! Async (tokio) clients for QEMU's QMP monitor and the QEMU guest agent.
#![deny(missing_docs)]
