//! Every storage tool (btrfs, lvm) runs through a [`CommandRunner`], as a typed
//! [`ToolCmd`] that renders its argv:
//!
//! - [`LocalRunner`]: spawns the tool on this host (production), with `LC_ALL=C`.
//! - [`RecordingRunner`]: records every argv (checked against golden files with
//!   [`RecordingRunner::check_golden`]), answers with canned output, delegates to an inner
//!   runner, and injects failures: the fake for failure injection and golden argv tests.
//!
//! The LVM tests run the tools inside a guest through the QEMU guest agent (`guest-exec`), so
//! that LVM is exercised for real from a host without device-mapper: their `QgaRunner` is a
//! test helper (`tests/common/mod.rs`), not part of this crate, which depends on no qmp-proto.
//!
//! Error kinds: a command's failure gets its kind where something typed decides it (the
//! backends check names and existence before they run a tool; the built-in btrfs snapshot
//! fails with its system call's error). The tools themselves do not say: LVM exits 5 and
//! btrfs-progs 1 for every failure, so for a tool's non-zero exit the kind is read from its
//! stderr, in one place: [`Error::tool`].

use crate::error::{Error, ErrorKind, Result};
pub use crate::tool::ToolCmd;
use async_trait::async_trait;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What a tool did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code (None: killed by a signal).
    pub status: Option<i32>,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// A successful run printing `stdout`.
    pub fn ok(stdout: impl Into<Vec<u8>>) -> Output {
        Output {
            status: Some(0),
            stdout: stdout.into(),
            stderr: Vec::new(),
        }
    }
    /// A failed run with exit code `code` and `stderr`.
    pub fn failed(code: i32, stderr: impl Into<Vec<u8>>) -> Output {
        Output {
            status: Some(code),
            stdout: Vec::new(),
            stderr: stderr.into(),
        }
    }
    /// Exited with 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
    /// stdout as text.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs storage tools. Implementations: [`LocalRunner`], [`RecordingRunner`]; the LVM tests
/// add one that runs them in a guest through the guest agent (`tests/common`).
#[async_trait]
pub trait CommandRunner: Send + Sync + fmt::Debug {
    /// Run `cmd` (its [`ToolCmd::argv`]; argv\[0\] is looked up in `PATH`) and return what
    /// it did; an `Err` when it could not be run at all, or when a command the runner
    /// performs itself failed (with the kind its system call's error gives). A tool's
    /// non-zero exit is an `Ok` [`Output`].
    async fn run(&self, cmd: &ToolCmd) -> Result<Output>;
    /// Whether the tools run on this host (so that device paths they name exist here).
    fn is_local(&self) -> bool {
        true
    }
}

/// Run `cmd` and fail unless it exits 0: the error carries the argv and stderr, with a kind
/// derived from the stderr text (see [`Error::tool`]).
pub async fn run_ok(runner: &dyn CommandRunner, cmd: &ToolCmd) -> Result<Output> {
    let out = runner.run(cmd).await?;
    if out.success() {
        Ok(out)
    } else {
        Err(Error::tool(
            &cmd.argv(),
            out.status,
            &String::from_utf8_lossy(&out.stderr),
        ))
    }
}

/// A command line as is ([`ToolCmd::Argv`]), from string-likes.
pub fn argv<I, S>(items: I) -> ToolCmd
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    ToolCmd::Argv(items.into_iter().map(|s| s.as_ref().to_string()).collect())
}

fn install_hint(prog: &str) -> &'static str {
    match prog {
        "btrfs" => "install btrfs-progs (`apt-get install btrfs-progs`)",
        "lvm" | "lvs" | "vgs" | "lvcreate" | "lvremove" | "lvrename" | "lvconvert" | "lvchange" => {
            "install lvm2 (`apt-get install lvm2`)"
        }
        "qemu-img" => "install qemu-utils (`cargo xtask deps` installs QEMU 10.0.2)",
        _ => "install it",
    }
}

/// Spawns tools on this host with `LC_ALL=C` (stable, parseable messages) and no stdin.
///
/// One command is built in: [`ToolCmd::BtrfsSnapshot`] where DST does not exist runs
/// in-process as the one ioctl btrfs-progs itself makes (`BTRFS_IOC_SNAP_CREATE_V2`),
/// saving a process (about half the time of a snapshot create on this kind of machine). Its
/// failure is the system call's error (`NotFound` for a missing parent directory, ...), the
/// command named. `VIRT_SNAP_NO_BUILTINS=1` spawns the real tool instead.
#[derive(Debug, Clone, Default)]
pub struct LocalRunner;

/// The built-in commands of [`LocalRunner`]: `Some(result)` when `cmd` is one of them.
fn builtin(cmd: &ToolCmd) -> Option<Result<Output>> {
    let ToolCmd::BtrfsSnapshot { src, dst, readonly } = cmd else {
        return None;
    };
    if std::env::var_os("VIRT_SNAP_NO_BUILTINS").is_some_and(|v| v == "1") {
        return None;
    }
    // An existing DST means "inside DST" to btrfs-progs: leave that to the tool.
    if std::fs::symlink_metadata(dst).is_ok() || !crate::fsutil::is_subvolume(src) {
        return None;
    }
    Some(
        crate::fsutil::btrfs_snapshot(src, dst, *readonly)
            .map(|()| Output::ok(Vec::new()))
            .map_err(|e| {
                Error::io(
                    format!("`{cmd}` (built in): cannot snapshot {}", src.display()),
                    e,
                )
                .with_command(cmd.argv())
            }),
    )
}

#[async_trait]
impl CommandRunner for LocalRunner {
    async fn run(&self, cmd: &ToolCmd) -> Result<Output> {
        if let Some(out) = builtin(cmd) {
            return out;
        }
        let argv = cmd.argv();
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "empty command line"))?;
        let out = tokio::process::Command::new(prog)
            .args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("`{prog}` is not installed: {}", install_hint(prog)),
                    )
                } else {
                    Error::io(format!("cannot run `{cmd}`"), e)
                }
            })?;
        Ok(Output {
            status: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

type Matcher = Box<dyn Fn(&[String]) -> bool + Send + Sync>;

struct Canned {
    matches: Matcher,
    output: Output,
    /// Answer this many times (None: always).
    times: Option<usize>,
}

/// The fake: records every argv, answers from canned outputs (first match wins), else passes
/// the command to an inner runner, else answers success with empty output.
pub struct RecordingRunner {
    calls: Mutex<Vec<Vec<String>>>,
    canned: Mutex<Vec<Canned>>,
    inner: Option<Arc<dyn CommandRunner>>,
    local: bool,
}

impl fmt::Debug for RecordingRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingRunner")
            .field("calls", &self.calls.lock().unwrap().len())
            .field("inner", &self.inner)
            .finish()
    }
}

impl Default for RecordingRunner {
    fn default() -> Self {
        RecordingRunner::new()
    }
}

impl RecordingRunner {
    /// A dry-run recorder: every command "succeeds" with no output unless canned.
    pub fn new() -> RecordingRunner {
        RecordingRunner {
            calls: Mutex::new(Vec::new()),
            canned: Mutex::new(Vec::new()),
            inner: None,
            local: true,
        }
    }
    /// A recorder in front of a real runner: commands without a canned answer run for real.
    pub fn wrapping(inner: Arc<dyn CommandRunner>) -> RecordingRunner {
        let local = inner.is_local();
        RecordingRunner {
            inner: Some(inner),
            local,
            ..RecordingRunner::new()
        }
    }
    /// Answer commands for which `matches` holds with `output`, `times` times (None: always).
    pub fn answer(
        &self,
        matches: impl Fn(&[String]) -> bool + Send + Sync + 'static,
        output: Output,
        times: Option<usize>,
    ) {
        self.canned.lock().unwrap().push(Canned {
            matches: Box::new(matches),
            output,
            times,
        });
    }
    /// Answer exactly `argv` with `output`, always.
    pub fn answer_argv(&self, argv: &[&str], output: Output) {
        let want: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        self.answer(move |a| a == want.as_slice(), output, None);
    }
    /// Inject a failure: the first command whose argv starts with `prefix` fails once with
    /// exit code 5 and `stderr`.
    pub fn fail_once(&self, prefix: &[&str], stderr: &str) {
        let want: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        self.answer(
            move |a| a.starts_with(&want),
            Output::failed(5, stderr.as_bytes().to_vec()),
            Some(1),
        );
    }
    /// Every argv run so far.
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }
    /// Forget the recorded calls.
    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
    /// The recorded calls, one per line, arguments separated by spaces (an argument with a
    /// space or quote is written in double quotes).
    pub fn transcript(&self) -> String {
        let mut s = String::new();
        for c in self.calls() {
            let line: Vec<String> = c
                .iter()
                .map(|a| {
                    if a.is_empty() || a.contains([' ', '"', '\'', '\t']) {
                        format!("{a:?}")
                    } else {
                        a.clone()
                    }
                })
                .collect();
            s.push_str(&line.join(" "));
            s.push('\n');
        }
        s
    }
    /// Compare [`RecordingRunner::transcript`] with the golden file at `path`; with
    /// `VIRT_SNAP_UPDATE_GOLDEN=1` write it instead. Returns a diff-like message on mismatch.
    pub fn check_golden(&self, path: &Path) -> std::result::Result<(), String> {
        let got = self.transcript();
        if std::env::var_os("VIRT_SNAP_UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            }
            return std::fs::write(path, &got).map_err(|e| e.to_string());
        }
        let want = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "golden file {}: {e} (VIRT_SNAP_UPDATE_GOLDEN=1 writes it)",
                path.display()
            )
        })?;
        if want == got {
            return Ok(());
        }
        Err(format!(
            "argv differs from golden file {}\n--- want\n{want}--- got\n{got}",
            path.display()
        ))
    }
    /// Pretend the tools run on another host (see [`CommandRunner::is_local`]).
    pub fn remote(mut self) -> Self {
        self.local = false;
        self
    }
}

#[async_trait]
impl CommandRunner for RecordingRunner {
    async fn run(&self, cmd: &ToolCmd) -> Result<Output> {
        let argv = cmd.argv();
        self.calls.lock().unwrap().push(argv.clone());
        let canned = {
            let mut canned = self.canned.lock().unwrap();
            let mut hit = None;
            for (i, c) in canned.iter_mut().enumerate() {
                if (c.matches)(&argv) {
                    if let Some(t) = &mut c.times {
                        *t -= 1;
                    }
                    hit = Some((i, c.output.clone(), c.times == Some(0)));
                    break;
                }
            }
            if let Some((i, _, true)) = &hit {
                canned.remove(*i);
            }
            hit.map(|(_, o, _)| o)
        };
        match (canned, &self.inner) {
            (Some(o), _) => Ok(o),
            (None, Some(inner)) => inner.run(cmd).await,
            (None, None) => Ok(Output::ok(Vec::new())),
        }
    }
    fn is_local(&self) -> bool {
        self.local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recorder_answers_canned_then_delegates_and_injects_failures() {
        let r = RecordingRunner::wrapping(Arc::new(LocalRunner));
        r.answer_argv(&["lvs", "vg0"], Output::ok("canned"));
        r.fail_once(&["true"], "injected");
        let a = r.run(&argv(["lvs", "vg0"])).await.unwrap();
        assert_eq!(a.stdout, b"canned");
        let e = run_ok(&r, &argv(["true", "x"])).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ToolFailed);
        assert!(e.to_string().contains("injected"), "{e}");
        // Once only: the next `true` runs for real.
        run_ok(&r, &argv(["true"])).await.unwrap();
        let out = run_ok(&r, &argv(["sh", "-c", "echo $LC_ALL"]))
            .await
            .unwrap();
        assert_eq!(out.stdout_str().trim(), "C");
        assert_eq!(r.calls().len(), 4);
        assert!(r.transcript().contains("sh -c \"echo $LC_ALL\"\n"));
    }

    #[tokio::test]
    async fn a_missing_tool_says_how_to_install_it() {
        let e = LocalRunner
            .run(&argv(["no-such-tool-vs", "x"]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("not installed"), "{e}");
    }
}
