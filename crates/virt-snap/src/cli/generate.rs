//! `virt-snap __generate completions SHELL [--out DIR]` and `virt-snap __generate man DIR`:
//! shell completions and man pages from the CLI's own clap `Command`, for `cargo xtask
//! completions` and `cargo xtask man`.
//!
//! The command is hidden: it is not a subcommand of [`super::Cli`] but is recognised by
//! `main` before the CLI is parsed (only as the first argument), so it appears neither in
//! `--help` nor in the completions and man pages it writes.

use super::{CliError, CliResult};
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

/// The first argument that selects this command.
pub const NAME: &str = "__generate";

/// Write shell completions or man pages for virt-snap.
#[derive(Debug, Parser)]
#[command(name = NAME, bin_name = "virt-snap __generate")]
pub struct Generate {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Shell completions: on stdout, or with --out as the shell's usual file name in DIR.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// Write the file into this directory (created if missing) and print its path.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Man pages into DIR (created if missing): virt-snap.1 and one page per subcommand
    /// (virt-snap-snapshot-create-as.1, ...); prints each file's path.
    Man {
        /// The directory.
        dir: PathBuf,
    },
}

/// The CLI's clap `Command`, as completions and man pages describe it. Its one-line summary
/// (the man page's NAME line) is the tool's, not the crate's (which also names the library).
fn command() -> clap::Command {
    super::Cli::command().about("snapshots of QEMU/KVM virtual machines and of their disk volumes")
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> CliError {
    move |e| CliError::with_source(what, e)
}

/// Parse `args` (the first being [`NAME`]) and write what they ask for.
pub fn run(args: impl IntoIterator<Item = std::ffi::OsString>) -> CliResult {
    let Generate { what } = Generate::parse_from(args);
    match what {
        What::Completions { shell, out: None } => {
            let mut cmd = command();
            clap_complete::generate(shell, &mut cmd, "virt-snap", &mut std::io::stdout());
            Ok(())
        }
        What::Completions {
            shell,
            out: Some(dir),
        } => {
            std::fs::create_dir_all(&dir).map_err(io_err(format!("{}", dir.display())))?;
            let mut cmd = command();
            let path = clap_complete::generate_to(shell, &mut cmd, "virt-snap", &dir)
                .map_err(io_err(format!("cannot write {shell} completions")))?;
            println!("{}", path.display());
            Ok(())
        }
        What::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(io_err(format!("{}", dir.display())))?;
            // As clap_mangen::generate_to, but knowing each file written.
            let mut cmd = command().disable_help_subcommand(true);
            cmd.build();
            let mut pages = Vec::new();
            man_pages(cmd, &dir, &mut pages).map_err(io_err(format!(
                "cannot write man pages into {}",
                dir.display()
            )))?;
            pages.sort();
            for p in pages {
                println!("{}", p.display());
            }
            Ok(())
        }
    }
}

/// Write the page of `cmd` and of each of its visible subcommands, depth first, into `dir`.
fn man_pages(
    cmd: clap::Command,
    dir: &std::path::Path,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        man_pages(sub, dir, out)?;
    }
    out.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_is_well_formed() {
        Generate::command().debug_assert();
    }
}
