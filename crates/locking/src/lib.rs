//! Volume leases and QEMU-compatible image locks.
#![deny(missing_docs)]
