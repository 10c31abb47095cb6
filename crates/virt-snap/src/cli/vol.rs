//! `virt-snap vol-*`: volumes of a pool (virsh's names) and the volume snapshot commands
//! libvirt never got: `vol-snapshot-create|list|revert|delete`.

use super::output::{self, Format};
use super::render::virsh::{human, table, time};
use super::{CliError, CliResult};
use clap::Subcommand;
use std::path::Path;
use virt_snap::pool::{self, SnapshotOptions, VolumeSpec};

/// Volume commands.
#[derive(Debug, Subcommand)]
// The variants are virsh's command names (clap derives `vol-create-as` from them).
#[allow(clippy::enum_variant_names)]
pub enum VolCmd {
    /// Create a volume.
    VolCreateAs {
        /// The pool.
        pool: String,
        /// The volume's name.
        name: String,
        /// Its size (`1G`, `512M`, bytes); with --backing-vol, 0 takes the backing size.
        size: String,
        /// raw or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
        /// A backing volume: the name or path of a volume of the same pool.
        #[arg(long, value_name = "VOL")]
        backing_vol: Option<String>,
        /// The backing volume's format (default: what the pool knows of it).
        #[arg(long, value_name = "FMT")]
        backing_vol_format: Option<String>,
    },
    /// List a pool's volumes.
    VolList {
        /// The pool.
        pool: String,
    },
    /// A volume's format, sizes, backing and lease key.
    VolInfo {
        /// The volume.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// The path a VM opens for a volume.
    VolPath {
        /// The volume.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// Delete a volume and its snapshots.
    VolDelete {
        /// The volume.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// Snapshot an inactive volume.
    VolSnapshotCreate {
        /// The volume.
        vol: String,
        /// The snapshot's name.
        snap: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
        /// LVM COW snapshots: the COW area's size (default: the volume's size).
        #[arg(long)]
        size: Option<String>,
    },
    /// List a volume's snapshots.
    VolSnapshotList {
        /// The volume.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// Revert an inactive volume to a snapshot (the snapshot is kept).
    VolSnapshotRevert {
        /// The volume.
        vol: String,
        /// The snapshot.
        snap: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// Delete a volume snapshot.
    VolSnapshotDelete {
        /// The volume.
        vol: String,
        /// The snapshot.
        snap: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
}

fn out_err(e: std::io::Error) -> CliError {
    CliError::with_source("cannot write output", e)
}

fn done(out: Format, json: serde_json::Value, text: String) -> CliResult {
    match out {
        Format::Json => output::print_json(&json).map_err(out_err),
        Format::Text => {
            println!("{text}");
            Ok(())
        }
    }
}

/// Run a volume command.
pub async fn run(cmd: VolCmd, out: Format, state: Option<&Path>) -> CliResult {
    let conn = super::connect(state)?;
    match cmd {
        VolCmd::VolCreateAs {
            pool,
            name,
            size,
            format,
            backing_vol,
            backing_vol_format,
        } => {
            let p = conn.pool(&pool)?;
            let format = pool::parse_format(&format)?;
            let capacity = pool::parse_size(&size)?;
            let backing = match backing_vol {
                None => None,
                Some(b) => {
                    let fmt = backing_vol_format
                        .as_deref()
                        .map(pool::parse_format)
                        .transpose()?;
                    if b.starts_with('/') && fmt.is_none() {
                        return Err(CliError::new(format!(
                            "--backing-vol-format is required for the backing path {b} \
                             (its format is recorded, never probed)"
                        )));
                    }
                    Some(p.backing(&b, fmt).await?)
                }
            };
            let v = p
                .create_volume(&VolumeSpec {
                    name,
                    capacity,
                    format,
                    backing,
                })
                .await?;
            let text = format!("Vol {} created", v.name);
            done(out, serde_json::to_value(&v).unwrap(), text)
        }
        VolCmd::VolList { pool } => {
            // An entry that cannot be listed is named on stderr; the others list as usual.
            let listing = conn.pool(&pool)?.volume_listing().await?;
            for r in &listing.rejected {
                eprintln!("warning: {}", r.error);
            }
            let vols = listing.items;
            let rows: Vec<Vec<String>> = vols
                .iter()
                .map(|v| vec![v.name.clone(), v.path.clone()])
                .collect();
            match out {
                Format::Json => output::print_json(&vols).map_err(out_err),
                Format::Text => {
                    print!("{}", table(&["Name", "Path"], &rows));
                    Ok(())
                }
            }
        }
        VolCmd::VolInfo { vol, pool } => {
            let v = conn.pool(&pool)?.volume(&vol).info().await?;
            let mut text = format!(
                "{:<16}{}\n{:<16}{}\n{:<16}{}\n{:<16}{}\n{:<16}{}\n{:<16}{}",
                "Name:",
                v.name,
                "Pool:",
                v.pool,
                "Path:",
                v.path,
                "Format:",
                v.format,
                "Capacity:",
                human(v.capacity),
                "Allocation:",
                v.allocation.map(human).unwrap_or_else(|| "-".into()),
            );
            if let Some(b) = &v.backing {
                text.push_str(&format!(
                    "\n{:<16}{} ({})",
                    "Backing:",
                    b.path,
                    b.format_str()
                ));
            }
            text.push_str(&format!("\n{:<16}{}", "Lease key:", v.key));
            let volume = conn.pool(&pool)?.volume(&vol);
            let holders = volume.holders().await?;
            if holders.is_empty() {
                text.push_str(&format!("\n{:<16}none", "Held by:"));
            }
            for h in &holders {
                text.push_str(&format!("\n{:<16}{} {h}", "Held by:", h.mode));
            }
            let mut json = serde_json::to_value(&v).unwrap();
            json["holders"] = serde_json::to_value(&holders).unwrap();
            done(out, json, text)
        }
        VolCmd::VolPath { vol, pool } => {
            let v = conn.pool(&pool)?.volume(&vol).info().await?;
            let text = v.path.clone();
            done(out, serde_json::json!({ "path": v.path }), text)
        }
        VolCmd::VolDelete { vol, pool } => {
            conn.pool(&pool)?.volume(&vol).delete().await?;
            done(
                out,
                serde_json::json!({ "deleted": vol, "pool": pool }),
                format!("Vol {vol} deleted"),
            )
        }
        VolCmd::VolSnapshotCreate {
            vol,
            snap,
            pool,
            size,
        } => {
            let size = size.as_deref().map(pool::parse_size).transpose()?;
            let s = conn
                .pool(&pool)?
                .volume(&vol)
                .create_snapshot(&snap, &SnapshotOptions { size })
                .await?;
            let text = format!("Volume snapshot {snap} of {vol} created");
            done(out, serde_json::to_value(&s).unwrap(), text)
        }
        VolCmd::VolSnapshotList { vol, pool } => {
            // An entry that cannot be listed is named on stderr; the others list as usual.
            let listing = conn.pool(&pool)?.volume(&vol).snapshot_listing().await?;
            for r in &listing.rejected {
                eprintln!("warning: {}", r.error);
            }
            let list = listing.items;
            match out {
                Format::Json => output::print_json(&list).map_err(out_err),
                Format::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                time(s.created),
                                serde_json::to_value(s.kind)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default(),
                                s.size.map(human).unwrap_or_else(|| "-".into()),
                                if s.valid { "valid" } else { "INVALID" }.into(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["Name", "Creation Time", "Kind", "Size", "State"], &rows)
                    );
                    Ok(())
                }
            }
        }
        VolCmd::VolSnapshotRevert { vol, snap, pool } => {
            conn.pool(&pool)?.volume(&vol).revert(&snap).await?;
            done(
                out,
                serde_json::json!({ "volume": vol, "reverted-to": snap, "pool": pool }),
                format!("Volume {vol} reverted to snapshot {snap}"),
            )
        }
        VolCmd::VolSnapshotDelete { vol, snap, pool } => {
            conn.pool(&pool)?
                .volume(&vol)
                .delete_snapshot(&snap)
                .await?;
            done(
                out,
                serde_json::json!({ "volume": vol, "deleted": snap, "pool": pool }),
                format!("Volume snapshot {snap} of {vol} deleted"),
            )
        }
    }
}
