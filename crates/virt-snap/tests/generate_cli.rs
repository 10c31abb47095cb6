//! `virt-snap __generate` (what `cargo xtask completions` and `cargo xtask man` write): the
//! completions know the subcommands, the man pages exist and render, and the hidden command
//! shows nowhere.

use std::path::Path;
use std::process::{Command, Output};

const VS: &str = env!("CARGO_BIN_EXE_virt-snap");

fn vs(args: &[&str]) -> Output {
    let out = Command::new(VS).args(args).output().expect("run virt-snap");
    assert!(
        out.status.success(),
        "virt-snap {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bash_completion_names_the_subcommands_and_not_the_hidden_one() {
    let bash = text(&vs(&["__generate", "completions", "bash"]).stdout);
    for sub in [
        "snapshot-create-as",
        "snapshot-list",
        "vol-snapshot-create",
        "pool-define-as",
    ] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    assert!(
        bash.contains("--memspec"),
        "bash completion lacks --memspec"
    );
    assert!(
        !bash.contains("__generate"),
        "the hidden command is completed"
    );
    let help = text(&vs(&["--help"]).stdout);
    assert!(
        !help.contains("__generate"),
        "--help shows the hidden command"
    );
}

#[test]
fn every_shell_gets_a_file_in_the_out_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("completions");
    for (shell, file) in [
        ("bash", "virt-snap.bash"),
        ("zsh", "_virt-snap"),
        ("fish", "virt-snap.fish"),
        ("elvish", "virt-snap.elv"),
        ("powershell", "_virt-snap.ps1"),
    ] {
        let out = vs(&[
            "__generate",
            "completions",
            shell,
            "--out",
            dir.to_str().unwrap(),
        ]);
        let path = dir.join(file);
        assert_eq!(text(&out.stdout).trim(), path.to_str().unwrap(), "{shell}");
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(body.contains("snapshot-create-as"), "{shell}: {body:.200}");
    }
}

#[test]
fn man_pages_exist_one_per_subcommand_and_render() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man");
    let out = vs(&["__generate", "man", dir.to_str().unwrap()]);
    let listed: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    let top = dir.join("virt-snap.1");
    assert!(top.is_file(), "no virt-snap.1 in {listed:?}");
    for page in [
        "virt-snap-snapshot-create-as.1",
        "virt-snap-image-snapshot-list.1",
    ] {
        assert!(dir.join(page).is_file(), "no {page} in {listed:?}");
        assert!(listed.contains(&dir.join(page).display().to_string()));
    }
    assert!(!listed
        .iter()
        .any(|p| p.contains("generate") || p.contains("-help.1")));
    let roff = std::fs::read_to_string(&top).unwrap();
    assert!(roff.contains(".TH virt-snap 1"), "{roff:.300}");
    assert!(roff.contains(".SH NAME"), "{roff:.300}");
    assert!(roff.contains("snapshot\\-create\\-as"), "{roff:.300}");
    render(&top);
}

/// `man -l PAGE` renders the page (where man is installed) with its sections.
fn render(page: &Path) {
    let Ok(out) = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
    else {
        eprintln!("no man here: the roff header was checked only");
        return;
    };
    assert!(out.status.success(), "man -l: {}", text(&out.stderr));
    let shown = text(&out.stdout);
    for part in [
        "NAME",
        "SYNOPSIS",
        "OPTIONS",
        "SUBCOMMANDS",
        "virt-snap-snapshot-create-as(1)",
    ] {
        assert!(shown.contains(part), "man -l shows no {part}: {shown:.500}");
    }
}
