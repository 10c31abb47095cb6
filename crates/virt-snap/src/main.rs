//! The `virt-snap` command-line tool.
//!
//! Conventions every subcommand follows: `--output json` on every command that prints data;
//! errors as one line on stderr (`virt-snap: error: ...`) and a non-zero exit code; `-v` (or
//! `RUST_LOG`) for logs on stderr; state in the state dir (`--state-dir`, `$VIRT_SNAP_STATE_DIR`,
//! `$XDG_STATE_HOME/virt-snap`, `~/.local/state/virt-snap`).

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Output into a closed pipe (`virt-snap dumpxml DOM | head`) ends the process quietly, as
    // for the C tools, instead of a panic in `println!`. Every command prints only after its
    // operation is done (a killed operation is recovered by the next command anyway).
    // SAFETY: called before any thread is started; restoring a default disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // `virt-snap __generate ...` (completions, man pages) is no subcommand of the CLI, so
    // that neither its help nor what it generates shows it.
    // `virt-snap __keeper RUNDIR`: a domain's lease keeper (cluster lockspaces), started by
    // `start`; hidden the same way.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__keeper") {
        let Some(dir) = std::env::args_os().nth(2) else {
            eprintln!("virt-snap: error: __keeper needs the run directory");
            return ExitCode::from(2);
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        return match rt {
            Ok(rt) => {
                let log = |msg: &str| {
                    eprintln!(
                        "{} virt-snap keeper[{}]: {msg}",
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                        std::process::id()
                    )
                };
                ExitCode::from(rt.block_on(virt_snap::domain::keeper::run(dir.into(), &log)) as u8)
            }
            Err(e) => {
                eprintln!("virt-snap: error: cannot start the async runtime: {e}");
                ExitCode::from(2)
            }
        };
    }
    let result = if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == cli::generate::NAME)
    {
        cli::generate::run(std::env::args_os().skip(1))
    } else {
        let args = cli::Cli::parse();
        cli::init_logging(args.verbose);
        cli::run(args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(cause) = src {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
                src = cause.source();
            }
            eprintln!("virt-snap: error: {}", msg.replace('\n', " "));
            ExitCode::from(e.exit_code())
        }
    }
}
