//! qcow2 and QED headers, backing chains and the qcow2 snapshot table.
#![deny(missing_docs)]
