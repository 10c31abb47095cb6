//! `cargo xtask completions [--out DIR]` and `cargo xtask man [--out DIR]`: shell completions
//! and man pages of the `virt-snap` CLI, written by the binary itself (`virt-snap __generate`,
//! a hidden command: the clap `Command` lives in the binary crate).

use crate::util::{self, step};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shells clap_complete writes for.
const SHELLS: [&str; 5] = ["bash", "zsh", "fish", "elvish", "powershell"];

/// Build the debug `virt-snap` binary and return its path.
pub fn build_virt_snap() -> Result<PathBuf, String> {
    step("cargo build -p virt-snap --bin virt-snap");
    util::cargo(&["build", "--quiet", "-p", "virt-snap", "--bin", "virt-snap"])?;
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(util::target_dir)
        .join("debug/virt-snap"))
}

/// `--out DIR` (the only option), else `default` under target/.
fn out_dir(args: &[String], default: &str) -> Result<PathBuf, String> {
    match args {
        [] => Ok(util::target_dir().join(default)),
        [flag, dir] if flag == "--out" => Ok(PathBuf::from(dir)),
        _ => Err(format!("usage: cargo xtask {default} [--out DIR]")),
    }
}

/// Run `virt-snap __generate ARGS` and return the paths it printed (the files written).
fn generate(vs: &Path, args: &[&str]) -> Result<Vec<String>, String> {
    let out = util::output(Command::new(vs).arg("__generate").args(args))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// `cargo xtask completions [--out DIR]` (default target/completions): one file per shell.
pub fn completions(args: &[String]) -> Result<(), String> {
    let dir = out_dir(args, "completions")?;
    let vs = build_virt_snap()?;
    step(&format!("shell completions into {}", dir.display()));
    let dir_s = dir.to_str().ok_or("the directory's name is no UTF-8")?;
    for shell in SHELLS {
        for f in generate(&vs, &["completions", shell, "--out", dir_s])? {
            println!("{shell:<10} {f}");
        }
    }
    println!(
        "\nbash: source {0}/virt-snap.bash (or copy it to /usr/share/bash-completion/completions/virt-snap)\n\
         zsh:  put {0}/_virt-snap in a directory of $fpath\n\
         fish: copy {0}/virt-snap.fish to ~/.config/fish/completions/",
        dir.display()
    );
    Ok(())
}

/// `cargo xtask man [--out DIR]` (default target/man): virt-snap.1 and one page per
/// subcommand.
pub fn man(args: &[String]) -> Result<(), String> {
    let dir = out_dir(args, "man")?;
    let vs = build_virt_snap()?;
    step(&format!("man pages into {}", dir.display()));
    let dir_s = dir.to_str().ok_or("the directory's name is no UTF-8")?;
    let pages = generate(&vs, &["man", dir_s])?;
    for p in &pages {
        println!("{p}");
    }
    println!(
        "\n{} pages; read them with `man -l {}/virt-snap.1` (or copy them to \
         /usr/local/share/man/man1/)",
        pages.len(),
        dir.display()
    );
    Ok(())
}
