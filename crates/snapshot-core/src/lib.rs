//! The snapshot state machine, domainsnapshot XML metadata, the snapshot tree and its store.
#![deny(missing_docs)]
