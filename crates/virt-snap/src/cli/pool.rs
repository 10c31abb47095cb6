//! `virt-snap pool-define-as | pool-list | pool-info | pool-undefine`: storage pools
//! (virsh's names), persisted in `<state dir>/pools`.

use super::{state_dir, CliError, CliResult};
use clap::Subcommand;
use std::path::Path;
use std::sync::Arc;
use virt_snap::output::{self, Format};
use virt_snap::storage_backends::{self as sb, Backend, PoolDef, PoolKind, PoolStore};

/// Pool commands.
#[derive(Debug, Subcommand)]
// The variants are virsh's command names (clap derives `pool-define-as` from them).
#[allow(clippy::enum_variant_names)]
pub enum PoolCmd {
    /// Define a pool: `dir` or `btrfs` on a directory, `logical` on a volume group.
    PoolDefineAs {
        /// The pool's name.
        name: String,
        /// dir, btrfs or logical.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// A directory (dir, btrfs) or a volume group name (logical).
        target: String,
        /// logical: a thin pool LV of the volume group for new (thin) volumes.
        #[arg(long, value_name = "LV")]
        thin_pool: Option<String>,
    },
    /// List the defined pools.
    PoolList,
    /// Size, use, free space and capabilities of a pool.
    PoolInfo {
        /// The pool's name.
        name: String,
    },
    /// Forget a pool's definition (its volumes are left alone).
    PoolUndefine {
        /// The pool's name.
        name: String,
    },
}

/// A storage-backends error as a CLI error.
pub(crate) fn sb_err(e: sb::Error) -> CliError {
    CliError::with_source(e.to_string(), e)
}

fn out_err(e: std::io::Error) -> CliError {
    CliError::with_source("cannot write output", e)
}

/// Open pool `name` of the state directory with the local command runner.
pub(crate) fn open(state: &Path, name: &str) -> Result<Box<dyn Backend>, CliError> {
    let def = PoolStore::for_state_dir(state).get(name).map_err(sb_err)?;
    let locks = virt_snap::locking::LockManager::for_state_dir(state)
        .map_err(|e| CliError::with_source(e.to_string(), e))?;
    sb::open_pool(def, Arc::new(sb::LocalRunner), locks).map_err(sb_err)
}

/// Bytes as virsh shows them (`8.00 MiB`).
pub(crate) fn human(n: u64) -> String {
    const U: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// A text table with virsh's layout: a header, a rule, one row per line.
pub(crate) fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push(' ');
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(head.iter().map(|h| h.to_string()).collect());
    s.push_str(&"-".repeat(w.iter().sum::<usize>() + 3 * w.len()));
    s.push('\n');
    for r in rows {
        s.push_str(&line(r.clone()));
    }
    s
}

/// Run a pool command.
pub async fn run(cmd: PoolCmd, out: Format, state: Option<&Path>) -> CliResult {
    let state = state_dir(state)?;
    let store = PoolStore::for_state_dir(&state);
    match cmd {
        PoolCmd::PoolDefineAs {
            name,
            kind,
            target,
            thin_pool,
        } => {
            let kind = PoolKind::parse(&kind).map_err(sb_err)?;
            let target = match kind {
                PoolKind::Logical => target,
                // Keep the directory as an absolute path.
                _ => std::path::absolute(&target)
                    .map(|p| p.display().to_string())
                    .unwrap_or(target),
            };
            let def = PoolDef {
                name,
                kind,
                target,
                thin_pool,
            };
            store.define(&def).map_err(sb_err)?;
            match out {
                Format::Json => output::print_json(&def).map_err(out_err),
                Format::Text => {
                    println!("Pool {} defined", def.name);
                    Ok(())
                }
            }
        }
        PoolCmd::PoolList => {
            // A damaged definition is named on stderr; the others list as usual.
            let listing = store.scan().map_err(sb_err)?;
            for d in &listing.damaged {
                eprintln!("warning: {}", d.error);
            }
            let pools = listing.pools;
            match out {
                Format::Json => output::print_json(&pools).map_err(out_err),
                Format::Text => {
                    let rows: Vec<Vec<String>> = pools
                        .iter()
                        .map(|p| vec![p.name.clone(), p.kind.to_string(), p.target.clone()])
                        .collect();
                    print!("{}", table(&["Name", "Type", "Target"], &rows));
                    Ok(())
                }
            }
        }
        PoolCmd::PoolInfo { name } => {
            let info = open(&state, &name)?.info().await.map_err(sb_err)?;
            match out {
                Format::Json => output::print_json(&info).map_err(out_err),
                Format::Text => {
                    println!("{:<16}{}", "Name:", info.name);
                    println!("{:<16}{}", "Type:", info.kind);
                    println!("{:<16}{}", "Target:", info.target);
                    println!("{:<16}{}", "Capacity:", human(info.capacity));
                    println!("{:<16}{}", "Allocation:", human(info.allocation));
                    println!("{:<16}{}", "Available:", human(info.available));
                    if info.leftovers > 0 {
                        let n = info.leftovers;
                        let b = human(info.leftover_bytes);
                        println!("{:<16}{n} ({b}) of interrupted operations", "Leftovers:");
                    }
                    let c = info.capabilities;
                    let caps: Vec<&str> = [
                        (c.raw, "raw"),
                        (c.qcow2, "qcow2"),
                        (c.snapshots, "snapshots"),
                        (c.revert, "revert"),
                        (c.space_efficient_snapshots, "space-efficient-snapshots"),
                        (c.sized_snapshots, "sized-snapshots"),
                        (c.thin, "thin"),
                        (c.atomic_revert, "atomic-revert"),
                    ]
                    .into_iter()
                    .filter_map(|(on, n)| on.then_some(n))
                    .collect();
                    println!("{:<16}{}", "Capabilities:", caps.join(", "));
                    Ok(())
                }
            }
        }
        PoolCmd::PoolUndefine { name } => {
            // None: the definition was damaged; its file is removed all the same.
            let def = store.undefine(&name).map_err(sb_err)?;
            match out {
                Format::Json => match def {
                    Some(def) => output::print_json(&def).map_err(out_err),
                    None => output::print_json(&serde_json::json!({"name": name, "damaged": true}))
                        .map_err(out_err),
                },
                Format::Text => {
                    println!("Pool {name} has been undefined");
                    Ok(())
                }
            }
        }
    }
}
