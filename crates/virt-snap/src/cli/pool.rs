//! `virt-snap pool-define-as | pool-list | pool-info | pool-undefine`: storage pools
//! (virsh's names), persisted in `<state dir>/pools`.

use super::output::{self, Format};
use super::render::virsh::{human, table};
use super::{CliError, CliResult};
use clap::Subcommand;
use std::path::Path;
use virt_snap::pool::{self, PoolDef};

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

fn out_err(e: std::io::Error) -> CliError {
    CliError::with_source("cannot write output", e)
}

/// Run a pool command.
pub async fn run(cmd: PoolCmd, out: Format, state: Option<&Path>) -> CliResult {
    let conn = super::connect(state)?;
    match cmd {
        PoolCmd::PoolDefineAs {
            name,
            kind,
            target,
            thin_pool,
        } => {
            let def = conn.define_pool(PoolDef {
                name,
                kind: pool::parse_kind(&kind)?,
                target,
                thin_pool,
            })?;
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
            let listing = conn.pool_listing()?;
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
            let info = conn.pool(&name)?.info().await?;
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
            let def = conn.undefine_pool(&name)?;
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
