//! dir, btrfs and LVM storage pools with offline volume snapshots.
#![deny(missing_docs)]
