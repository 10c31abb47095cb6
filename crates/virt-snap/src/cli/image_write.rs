//! `virt-snap image create` and `virt-snap image snapshot create|apply|delete`: what
//! `qemu-img create -f qcow2` and `qemu-img snapshot -c|-a|-d` do, natively, through the
//! library's `Image` handle (which holds the image's lease and QEMU's writer image locks for
//! every write, so a VM started by any tool is seen and cannot open the image meanwhile).

use super::output::Format;
use super::{CliError, CliResult};
use clap::Args;
use std::path::{Path, PathBuf};
use virt_snap::image::{self, NewBacking, NewImage, ProbePolicy, SnapshotRef};

/// `image create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image format (only qcow2 is written).
    #[arg(short = 'f', value_name = "FMT")]
    format: String,
    /// Backing file to record (relative names resolve against the new image's directory).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// The backing file's format (qcow2, qed, raw), recorded in the image.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Without -F, probe the backing file's format and record it (unsafe with guest data).
    #[arg(long)]
    allow_probe: bool,
    /// The image file to create (an existing file is overwritten, like qemu-img does).
    file: PathBuf,
    /// Virtual size (bytes, or with a k/M/G/T/P/E suffix); defaults to the backing file's.
    size: Option<String>,
}

/// `image snapshot create`.
#[derive(Debug, Args)]
pub struct SnapCreateArgs {
    /// The qcow2 image.
    file: PathBuf,
    /// The snapshot's name (names may repeat; the id is the highest numeric id + 1).
    name: String,
}

/// `image snapshot apply|delete`.
#[derive(Debug, Args)]
pub struct SnapTargetArgs {
    /// The qcow2 image.
    file: PathBuf,
    /// The snapshot (apply: by id, then by name; delete: by name).
    #[arg(required_unless_present = "id", conflicts_with = "id")]
    name: Option<String>,
    /// Name the snapshot by its id instead.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
}

/// `image snapshot apply` or `image snapshot delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Revert to the snapshot.
    Apply,
    /// Delete the snapshot.
    Delete,
}

fn print_result(out: Format, v: serde_json::Value) -> CliResult {
    if out == Format::Json {
        super::output::print_json(&v)
            .map_err(|e| CliError::with_source("cannot write output", e))?;
    }
    Ok(())
}

/// Run `image create`.
pub fn run_create(a: CreateArgs, out: Format, state_dir: Option<&Path>) -> CliResult {
    if a.format != "qcow2" {
        return Err(CliError::new(format!(
            "image create writes qcow2 only (got -f {})",
            a.format
        )));
    }
    if a.backing_format.is_some() && a.backing.is_none() {
        return Err(CliError::new("-F needs a backing file (-b)"));
    }
    let backing = match &a.backing {
        None => None,
        Some(b) => Some(NewBacking {
            file: b.clone(),
            format: a
                .backing_format
                .as_deref()
                .map(image::parse_format)
                .transpose()
                .map_err(|e| {
                    CliError::with_source(format!("{}: backing format", a.file.display()), e)
                })?,
            probe: if a.allow_probe {
                ProbePolicy::Allow
            } else {
                ProbePolicy::Never
            },
        }),
    };
    let size = a.size.as_deref().map(image::parse_size).transpose()?;
    let conn = super::connect(state_dir)?;
    let made = conn.image(&a.file).create(&NewImage { size, backing })?;
    print_result(
        out,
        serde_json::json!({"filename": made.filename, "format": "qcow2", "virtual-size": made.virtual_size}),
    )
}

/// Run `image snapshot create`.
pub fn run_snap_create(a: SnapCreateArgs, out: Format, state_dir: Option<&Path>) -> CliResult {
    let conn = super::connect(state_dir)?;
    let sn = conn.image(&a.file).snapshot_create(a.name.as_bytes())?;
    print_result(
        out,
        serde_json::json!({"id": String::from_utf8_lossy(&sn.id), "name": a.name}),
    )
}

/// Run `image snapshot apply` or `image snapshot delete`.
pub fn run_snap_target(
    a: SnapTargetArgs,
    target: Target,
    out: Format,
    state_dir: Option<&Path>,
) -> CliResult {
    let which = match (&a.id, &a.name, target) {
        (Some(id), _, _) => SnapshotRef::Id(id.as_bytes().to_vec()),
        (None, Some(n), Target::Delete) => SnapshotRef::Name(n.as_bytes().to_vec()),
        (None, Some(n), Target::Apply) => SnapshotRef::IdOrName(n.as_bytes().to_vec()),
        (None, None, _) => return Err(CliError::new("name a snapshot (NAME or --id ID)")),
    };
    let conn = super::connect(state_dir)?;
    let img = conn.image(&a.file);
    let sn = match target {
        Target::Apply => img.snapshot_apply(&which)?,
        Target::Delete => img.snapshot_delete(&which)?,
    };
    print_result(
        out,
        serde_json::json!({
            "id": String::from_utf8_lossy(&sn.id),
            "name": String::from_utf8_lossy(&sn.name),
        }),
    )
}
