//! `virt-snap image ...`: what `qemu-img info` and `qemu-img snapshot -l` report, read
//! natively (no locks, so it works on images a running QEMU holds).

use super::output::{self, Format};
use super::render::qemu_img::{info_text, snapshot_table};
use super::{CliError, CliResult};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use virt_snap::image::{self, Format as ImgFormat, Image, ImageInfo, ProbePolicy, SnapshotsJson};

/// Inspect disk images (qcow2, QED, raw).
#[derive(Debug, Args)]
pub struct ImageCmd {
    #[command(subcommand)]
    cmd: ImageSub,
}

#[derive(Debug, Subcommand)]
enum ImageSub {
    /// Show an image's metadata, like `qemu-img info` (same JSON field names and values).
    Info {
        /// Also show every backing file, top first (like `qemu-img info --backing-chain`).
        #[arg(long)]
        backing_chain: bool,
        /// Let --backing-chain guess the format of backing files whose format the overlay
        /// does not record. Off by default: probing is unsafe with guest-written data.
        #[arg(long)]
        allow_probe: bool,
        /// The image's format (qcow2, qed, raw) instead of probing its header.
        #[arg(long, short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// The image file.
        file: PathBuf,
    },
    /// Create a qcow2 image or overlay, like `qemu-img create -f qcow2 [-b B -F FMT] FILE [SIZE]`.
    Create(super::image_write::CreateArgs),
    /// Internal snapshots of a qcow2 image.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotSub,
    },
    /// Which QEMU image locks are held on an image, and which virt-snap holder holds its lease.
    Locks(super::locks::LocksArgs),
}

#[derive(Debug, Subcommand)]
enum SnapshotSub {
    /// List the internal snapshots, like `qemu-img snapshot -l`.
    List {
        /// The image's format instead of probing its header.
        #[arg(long, short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// The image file.
        file: PathBuf,
    },
    /// Create an internal snapshot of the current state, like `qemu-img snapshot -c`.
    Create(super::image_write::SnapCreateArgs),
    /// Revert the image to a snapshot (by id, then name), like `qemu-img snapshot -a`.
    Apply(super::image_write::SnapTargetArgs),
    /// Delete a snapshot (by name, or --id), like `qemu-img snapshot -d`.
    Delete(super::image_write::SnapTargetArgs),
}

fn parse_format(f: Option<&str>) -> Result<Option<ImgFormat>, CliError> {
    f.map(image::parse_format)
        .transpose()
        .map_err(|e| CliError::with_source("cannot read image", e))
}

fn write_out(s: &[u8]) -> CliResult {
    use std::io::Write;
    std::io::stdout()
        .lock()
        .write_all(s)
        .map_err(|e| CliError::with_source("cannot write output", e))
}

fn print_json<T: serde::Serialize + ?Sized>(v: &T) -> CliResult {
    output::print_json(v).map_err(|e| CliError::with_source("cannot write output", e))
}

/// Run `virt-snap image ...`.
pub fn run(cmd: ImageCmd, out: Format, state_dir: Option<&std::path::Path>) -> CliResult {
    match cmd.cmd {
        ImageSub::Locks(args) => super::locks::run(args, out, state_dir),
        ImageSub::Create(a) => super::image_write::run_create(a, out, state_dir),
        ImageSub::Snapshot {
            cmd: SnapshotSub::Create(a),
        } => super::image_write::run_snap_create(a, out, state_dir),
        ImageSub::Snapshot {
            cmd: SnapshotSub::Apply(a),
        } => super::image_write::run_snap_target(
            a,
            super::image_write::Target::Apply,
            out,
            state_dir,
        ),
        ImageSub::Snapshot {
            cmd: SnapshotSub::Delete(a),
        } => super::image_write::run_snap_target(
            a,
            super::image_write::Target::Delete,
            out,
            state_dir,
        ),
        ImageSub::Info {
            backing_chain: chain,
            allow_probe,
            format,
            file,
        } => {
            let fmt = parse_format(format.as_deref())?;
            let img = Image::at(file);
            if chain {
                let probe = if allow_probe {
                    ProbePolicy::Allow
                } else {
                    ProbePolicy::Never
                };
                let images = img.chain(fmt, probe)?;
                match out {
                    Format::Json => {
                        print_json(&images.iter().map(ImageInfo::json).collect::<Vec<_>>())
                    }
                    Format::Text => write_out(
                        &images
                            .iter()
                            .map(info_text)
                            .collect::<Vec<_>>()
                            .join(&b'\n'),
                    ),
                }
            } else {
                let info = img.info(fmt)?;
                match out {
                    Format::Json => print_json(&info.json()),
                    Format::Text => write_out(&info_text(&info)),
                }
            }
        }
        ImageSub::Snapshot {
            cmd: SnapshotSub::List { format, file },
        } => {
            let fmt = parse_format(format.as_deref())?;
            let snaps = Image::at(file).snapshots(fmt)?;
            match out {
                Format::Json => print_json(&SnapshotsJson(&snaps)),
                Format::Text => {
                    let mut s = Vec::new();
                    if !snaps.is_empty() {
                        snapshot_table(&mut s, &snaps);
                    }
                    write_out(&s)
                }
            }
        }
    }
}
