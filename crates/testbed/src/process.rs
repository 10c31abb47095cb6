//! Child processes that die with us.

use crate::{Error, Result};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Fail with an install hint unless `prog` is on PATH.
pub fn require_tool(prog: &str, hint: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(Error(format!("`{prog}` is not installed: {hint}")))
    }
}

/// Make the child get SIGKILL when the thread that spawned it exits (a killed test process).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

/// Run a command to completion, failing with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| Error(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Error(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct KillOnDrop {
    child: Option<Child>,
}

impl KillOnDrop {
    /// Spawn `cmd` so that it dies with us.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| Error(format!("cannot start {:?}: {e}", cmd.get_program())))?;
        Ok(KillOnDrop { child: Some(child) })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Has the process exited? Returns its status if so (the process is reaped).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kill (SIGKILL) and reap the process now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
