//! Running the pools' storage tools inside the LVM test guest (this host has no
//! device-mapper), shared by capture_lvm.rs and revert_lvm.rs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;
use storage_backends::{CommandRunner, Output, ToolCmd};

/// Runs each tool inside the guest through its agent (`guest-exec`), one agent connection
/// per command (QEMU's chardev serves one client at a time).
#[derive(Debug)]
pub struct InGuest(pub PathBuf);

#[async_trait::async_trait]
impl CommandRunner for InGuest {
    async fn run(&self, cmd: &ToolCmd) -> storage_backends::Result<Output> {
        let argv = cmd.argv();
        let io = |e: qmp_proto::Error| {
            storage_backends::Error::new(
                storage_backends::ErrorKind::Io,
                format!("guest agent: `{}`: {e}", argv.join(" ")),
            )
        };
        let mut agent = qmp_proto::QgaClient::connect_unix(&self.0, Duration::from_secs(10))
            .await
            .map_err(io)?;
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = agent
            .exec(&refs, None, Duration::from_secs(120))
            .await
            .map_err(io)?;
        Ok(Output {
            status: out.exit_code.filter(|_| out.signal.is_none()),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
    fn is_local(&self) -> bool {
        false
    }
}

/// Removes the stand-in device node directory on drop.
pub struct DevDir(pub PathBuf);

impl Drop for DevDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
