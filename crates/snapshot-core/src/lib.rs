//! The snapshot state machine, domainsnapshot XML metadata, the snapshot tree and its store.
//!
//! This crate is pure logic: it spawns no processes and talks to no hypervisor or storage.
//! Its metadata layer is:
//!
//! - [`xml`]: libvirt's domainsnapshot XML ([`DomainSnapshot`]), read and written;
//! - [`domain`]: libvirt's domain XML ([`DomainDef`]), read and written, and what of it
//!   virt-snap can run;
//! - [`tree`]: a domain's snapshots as a tree with a current snapshot, and virsh's list filters;
//! - [`store`]: the per-domain metadata directory, updated atomically;
//! - [`journal`]: the journal of in-flight operations, for recovery after a crash;
//! - [`capture`]: the live capture state machine (plan, steps, runner, recovery) over
//!   capability traits the facade implements;
//! - [`revert`]: the revert state machine, built the same way;
//! - [`delete`]: the delete state machine, built the same way;
//! - [`ops`]: the journal record of every operation kind, and what their recovery shares.
//!
//! See docs/snapshot-metadata.md for the formats and the crash guarantees.
#![deny(missing_docs)]

pub mod capture;
pub mod delete;
pub mod domain;
mod error;
mod fsutil;
pub mod journal;
mod name;
pub mod ops;
pub mod revert;
pub mod store;
#[cfg(test)]
mod testkit;
pub mod tree;
pub mod xml;
mod xmltree;

pub use domain::{DomainDef, Unsupported, Uuid};
pub use error::{Error, ErrorKind, Result};
pub use journal::Journal;
pub use name::{DomainName, SnapshotName};
pub use store::{DefinitionStore, DomainStore, SnapshotStore};
pub use tree::{ListFilter, Scope, SnapshotTree};
pub use xml::{DomainSnapshot, Location, SnapshotState};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
