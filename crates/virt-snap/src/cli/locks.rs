//! `virt-snap image locks FILE`: which of QEMU's image locks are held on an image, and which
//! virt-snap holders (VMs, volume operations) hold its lease. Takes no lock itself.

use super::output::{self, Format};
use super::{CliError, CliResult};
use clap::Args;
use std::path::{Path, PathBuf};
use virt_snap::image::{Image, Permission};

/// Arguments of `virt-snap image locks`.
#[derive(Debug, Args)]
pub struct LocksArgs {
    /// The image file (or block device).
    file: PathBuf,
}

fn names(ps: &[Permission]) -> String {
    ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

fn byte_list(bs: impl Iterator<Item = u64>) -> String {
    bs.map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
}

/// Run `virt-snap image locks`.
pub fn run(args: LocksArgs, out: Format, state_dir: Option<&Path>) -> CliResult {
    // The global --lockspace (a directory or an etcd cluster), else <state dir>/locks.
    let g = super::GLOBALS.get();
    let lockspace = match g.and_then(|g| g.lockspace.as_deref()) {
        Some(l) => Some(virt_snap::Lockspace::parse(l)),
        None => virt_snap::state::resolve_from_env(state_dir)
            .map(|s| virt_snap::Lockspace::Dir(virt_snap::state::lockspace(&s))),
    };
    let report = Image::at(&args.file).locks(lockspace.as_ref())?;
    match out {
        Format::Json => {
            output::print_json(&report).map_err(|e| CliError::with_source("cannot write output", e))
        }
        Format::Text => {
            let mut s = format!("image: {}\n", report.image.display());
            s += &format!("in use: {}\n", if report.in_use { "yes" } else { "no" });
            if report.held.is_empty() && report.unshared.is_empty() {
                s += "qemu locks: none\n";
            } else {
                if !report.held.is_empty() {
                    s += &format!(
                        "qemu permissions held: {} (bytes {})\n",
                        names(&report.held),
                        byte_list(report.held.iter().map(|p| p.held_byte()))
                    );
                }
                if !report.unshared.is_empty() {
                    s += &format!(
                        "qemu permissions not shared: {} (bytes {})\n",
                        names(&report.unshared),
                        byte_list(report.unshared.iter().map(|p| p.unshared_byte()))
                    );
                }
            }
            for p in &report.processes {
                s += &format!(
                    "process: {p} (bytes {})\n",
                    byte_list(p.bytes.iter().copied())
                );
            }
            match (&report.lease_file, &report.holders) {
                (f, Some(hs)) => {
                    match (f, &lockspace) {
                        (Some(f), _) => s += &format!("lease: {}\n", f.display()),
                        (None, Some(l)) => s += &format!("lease: in {l}\n"),
                        (None, None) => {}
                    }
                    if hs.is_empty() {
                        s += "holders: none\n";
                    }
                    for h in hs {
                        s += &format!("holder: {} {h}\n", h.mode);
                    }
                }
                _ => s += "lease: unknown (no state directory)\n",
            }
            use std::io::Write;
            std::io::stdout()
                .lock()
                .write_all(s.as_bytes())
                .map_err(|e| CliError::with_source("cannot write output", e))
        }
    }
}
