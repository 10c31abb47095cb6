//! Argument parsing and dispatch for the `virt-snap` binary.

//!
//! The CLI is a shell over the `virt_snap` library: each subcommand parses its arguments,
//! calls one method of a handle (`Image`, `Pool`, `Volume`, `Domain`) and renders the typed result as
//! text ([`render`]: qemu-img's and virsh's formats) or JSON. It names no lower crate.

mod domain;
pub mod generate;
mod image;
mod image_write;
mod locks;
pub mod output;
mod pool;
pub mod progress;
pub mod render;
mod snapshot;
mod vol;

use clap::{Parser, Subcommand};
use output::Format;
use std::path::PathBuf;

/// The error every subcommand returns: a message (with an optional cause) and an exit code.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CliError {
    msg: String,
    code: u8,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl CliError {
    /// A failure with exit code 1.
    pub fn new(msg: impl Into<String>) -> Self {
        CliError {
            msg: msg.into(),
            code: 1,
            source: None,
        }
    }
    /// A failure caused by `source`, with exit code 1.
    pub fn with_source(
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        CliError {
            msg: msg.into(),
            code: 1,
            source: Some(Box::new(source)),
        }
    }
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        self.code
    }
}

/// The exit code of a library error of `kind`. Every failure exits 1 today; the kind is
/// there for finer codes later.
fn exit_code(kind: virt_snap::ErrorKind) -> u8 {
    match kind {
        virt_snap::ErrorKind::InUse | virt_snap::ErrorKind::NotFound => 1,
        _ => 1,
    }
}

impl From<virt_snap::Error> for CliError {
    fn from(e: virt_snap::Error) -> CliError {
        CliError {
            msg: e.to_string(),
            code: exit_code(e.kind()),
            source: Some(Box::new(e)),
        }
    }
}

/// Result of a subcommand.
pub type CliResult = Result<(), CliError>;

/// virt-snap: snapshots of QEMU/KVM virtual machines and of their disk volumes.
#[derive(Debug, Parser)]
#[command(name = "virt-snap", version, about, propagate_version = true)]
pub struct Cli {
    /// State directory (pools, domains, snapshot metadata, leases, sockets).
    #[arg(long, global = true, env = "VIRT_SNAP_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where leases live: a directory (default `<state dir>/locks`) or an etcd cluster shared
    /// by several hosts, `etcd://HOST:PORT[,HOST:PORT...][/PREFIX][?ttl=SECS]`.
    #[arg(
        long,
        global = true,
        env = "VIRT_SNAP_LOCKSPACE",
        value_name = "DIR|URL"
    )]
    pub lockspace: Option<String>,
    /// This host's name in a cluster lockspace (default: the machine's host name).
    #[arg(long, global = true, env = "VIRT_SNAP_HOST", value_name = "NAME")]
    pub host: Option<String>,
    /// Output format of commands that print data.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the resolved state directory.
    StateDir,
    /// Inspect disk images: `image info`, `image snapshot list`.
    Image(image::ImageCmd),
    /// Storage pools: pool-define-as, pool-list, pool-info, pool-undefine.
    #[command(flatten)]
    Pool(pool::PoolCmd),
    /// Volumes and volume snapshots: vol-create-as, vol-list, vol-info, vol-path, vol-delete,
    /// vol-snapshot-create, vol-snapshot-list, vol-snapshot-revert, vol-snapshot-delete.
    #[command(flatten)]
    Vol(vol::VolCmd),
    /// Domains: define, undefine, start, dumpxml, attach, destroy, shutdown, list, domstate,
    /// domblklist, qemu-monitor-command, qemu-agent-command.
    #[command(flatten)]
    Domain(domain::DomainCmd),
    /// Domain snapshots: snapshot-list, snapshot-info, snapshot-dumpxml, snapshot-current,
    /// snapshot-parent, snapshot-create (--redefine), snapshot-create-as, snapshot-revert,
    /// snapshot-delete.
    #[command(flatten)]
    Snapshot(snapshot::SnapshotCmd),
}

/// Set up logging on stderr from `-v` and `RUST_LOG`.
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let fmt = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if std::env::var_os(EnvFilter::DEFAULT_ENV).is_none() {
        // No RUST_LOG: one level for every target, what EnvFilter::new("warn") would filter,
        // without building and parsing a directive filter at every start.
        let _ = fmt.with_max_level(level).try_init();
        return;
    }
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.to_string().to_lowercase()));
    let _ = fmt.with_env_filter(filter).try_init();
}

/// Resolve the state directory or fail with a clear message.
pub fn state_dir(cli_choice: Option<&std::path::Path>) -> Result<PathBuf, CliError> {
    virt_snap::state::resolve_from_env(cli_choice).ok_or_else(|| {
        CliError::new("no state directory: pass --state-dir, or set VIRT_SNAP_STATE_DIR or HOME")
    })
}

/// Open the state directory the command line or the environment names. The process runs
/// one operation: blocking file work runs inline (no thread start and hand-off). Long jobs
/// report their progress on stderr ([`progress`]).
pub fn connect(cli_choice: Option<&std::path::Path>) -> Result<virt_snap::Connection, CliError> {
    let mut b = virt_snap::Connection::builder(state_dir(cli_choice)?)
        .blocking(virt_snap::Blocking::Inline)
        .progress(std::sync::Arc::new(progress::StderrProgress::new()));
    let g = GLOBALS.get();
    if let Some(l) = g.and_then(|g| g.lockspace.as_deref()) {
        b = b.lockspace(virt_snap::Lockspace::parse(l));
    }
    if let Some(h) = g.and_then(|g| g.host.as_deref()) {
        b = b.host(h);
    }
    if let Ok(exe) = std::env::current_exe() {
        b = b.keeper_program(exe);
    }
    Ok(b.open()?)
}

/// The global options that choose the wiring (`--lockspace`, `--host`), set once per process
/// before a command runs.
#[derive(Debug, Default)]
pub(crate) struct Globals {
    pub(crate) lockspace: Option<String>,
    pub(crate) host: Option<String>,
}

pub(crate) static GLOBALS: std::sync::OnceLock<Globals> = std::sync::OnceLock::new();

/// Run the parsed command line.
pub fn run(cli: Cli) -> CliResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::with_source("cannot start the async runtime", e))?;
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> CliResult {
    let _ = GLOBALS.set(Globals {
        lockspace: cli.lockspace.clone(),
        host: cli.host.clone(),
    });
    match cli.command {
        Command::Image(cmd) => image::run(cmd, cli.output, cli.state_dir.as_deref()),
        Command::Pool(cmd) => pool::run(cmd, cli.output, cli.state_dir.as_deref()).await,
        Command::Vol(cmd) => vol::run(cmd, cli.output, cli.state_dir.as_deref()).await,
        Command::Domain(cmd) => domain::run(cmd, cli.output, cli.state_dir.as_deref()).await,
        Command::Snapshot(cmd) => snapshot::run(cmd, cli.output, cli.state_dir.as_deref()).await,
        Command::StateDir => {
            let dir = state_dir(cli.state_dir.as_deref())?;
            match cli.output {
                Format::Json => output::print_json(&serde_json::json!({ "state-dir": dir }))
                    .map_err(|e| CliError::with_source("cannot write output", e)),
                Format::Text => {
                    println!("{}", dir.display());
                    Ok(())
                }
            }
        }
    }
}
