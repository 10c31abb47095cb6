//! `cargo xtask`: every developer workflow of virt-snap.
//!
//! - `cargo xtask deps`         install what the tests and benchmarks need (idempotent)
//! - `cargo xtask guest-image`  build the test guest (kernel + initramfs) into target/guest
//! - `cargo xtask test`         deps + guest image + lint + the whole test suite (README's test command)
//! - `cargo xtask bench NAME`   run a benchmark side by side with its peer
//! - `cargo xtask demo`         README's main job: show what virt-snap does today
//! - `cargo xtask completions`  shell completions of the CLI into target/completions
//! - `cargo xtask man`          man pages of the CLI into target/man

mod bench;
mod demo;
mod deps;
mod generate;
mod guest_image;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  deps [--libvirt]     install QEMU 10.0.2, btrfs-progs, lvm2 and the benchmark peers (idempotent; root);
                       --libvirt adds libvirt 11.3 (bookworm-backports, systemd left as it is)
  guest-image          build the test guest into target/guest (cached)
  test [ARGS...]       deps + guest-image + fmt/clippy/doc + the whole test suite; ARGS go to cargo test
  bench NAME|list      run a benchmark against its peer in the same run
  demo [--keep]        run what virt-snap can do today and say what it did (in target/demo,
                       removed at the end unless --keep)
  completions [--out DIR]  bash, zsh, fish, elvish and powershell completions of virt-snap
                       (default target/completions)
  man [--out DIR]      man pages: virt-snap.1 and one per subcommand (default target/man)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("deps") => deps::Extras::parse(&args[1..]).and_then(deps::run_with),
        Some("guest-image") => guest_image::run().map(|dir| {
            println!("test guest ready in {}", dir.display());
        }),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("completions") => generate::completions(&args[1..]),
        Some("man") => generate::man(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// README's test command: everything a fresh machine needs, then the whole suite.
fn test(extra: &[String]) -> Result<(), String> {
    deps::run()?;
    let guest = guest_image::run()?;
    util::step("cargo fmt --check");
    util::cargo(&["fmt", "--all", "--", "--check"])?;
    util::step("cargo clippy -D warnings");
    util::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ])?;
    util::step("cargo doc -D warnings (every crate's docs build, links resolve)");
    util::cargo_env(
        &["doc", "--workspace", "--no-deps", "--quiet"],
        &[("RUSTDOCFLAGS", std::ffi::OsStr::new("-D warnings"))],
    )?;
    util::step("cargo test (whole workspace, real components)");
    let mut args: Vec<&str> = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    util::cargo_env(&args, &[("VIRT_SNAP_GUEST_DIR", guest.as_os_str())])
}
