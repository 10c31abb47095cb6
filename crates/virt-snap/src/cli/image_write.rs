//! `virt-snap image create` and `virt-snap image snapshot create|apply|delete`: what
//! `qemu-img create -f qcow2` and `qemu-img snapshot -c|-a|-d` do, natively. Every write is
//! made while holding the image's lease and QEMU's writer image locks (taken through the
//! `locking` crate), so a VM started by any tool is seen and cannot open the image meanwhile.

use super::{CliError, CliResult};
use clap::Args;
use std::path::{Path, PathBuf};
use virt_snap::image_formats::{
    self,
    qcow2_write::{create, CreateOptions, SnapshotEditor, SnapshotRef},
    FileStorage, Format as ImgFormat, ImageInfo,
};
use virt_snap::locking::{Acquired, LockManager, Purpose, Resource};
use virt_snap::output::Format;

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

/// Parse a size like qemu-img: plain bytes or a binary suffix (k, M, G, T, P, E).
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let bad = || CliError::new(format!("invalid size '{s}'"));
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(bad()),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    let bytes = v * mul as f64;
    if bytes >= u64::MAX as f64 || (mul == 1 && num.contains('.')) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

fn lock(state_dir: Option<&Path>, op: &str, file: &Path) -> Result<Acquired, CliError> {
    let dir = super::state_dir(state_dir)?;
    let mgr = LockManager::for_state_dir(&dir)
        .map_err(|e| CliError::with_source("cannot open the lock space", e))?;
    mgr.acquire(&Purpose::VolumeOp {
        op: op.into(),
        volumes: vec![Resource::file(file)],
    })
    .map_err(|e| {
        // Only a conflict is "in use"; a read-only lockspace or a symlink loop says so.
        let what = if e.is_conflict() {
            "image is in use, not changing it"
        } else {
            "cannot lock the image"
        };
        CliError::with_source(format!("{}: {what}", file.display()), e)
    })
}

fn img_err(what: &str, file: &Path, e: image_formats::Error) -> CliError {
    CliError::with_source(format!("{}: {what}", file.display()), e)
}

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Whole microseconds, like qemu-img.
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

fn print_result(out: Format, v: serde_json::Value) -> CliResult {
    if out == Format::Json {
        virt_snap::output::print_json(&v)
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
    let mut backing_format = a.backing_format.clone();
    let mut backing_size = None;
    if let Some(b) = &a.backing {
        let dir = a
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let path = if Path::new(b).is_absolute() {
            PathBuf::from(b)
        } else {
            dir.join(b)
        };
        let fmt = match &backing_format {
            Some(f) => {
                Some(ImgFormat::from_name(f).map_err(|e| img_err("backing format", &a.file, e))?)
            }
            None if a.allow_probe => None,
            None => {
                return Err(CliError::new(format!(
                    "backing file '{b}' given without its format: pass -F FMT \
                     (or --allow-probe to guess it, which is unsafe with guest-written data)"
                )))
            }
        };
        // Reading the backing file as recorded tells its size (and that it is what -F says).
        match ImageInfo::open(&path, fmt) {
            Ok(info) => {
                backing_size = Some(info.virtual_size());
                backing_format.get_or_insert_with(|| info.format().as_str().to_string());
            }
            Err(e)
                if a.size.is_some()
                    && fmt.is_some()
                    && e.kind() == image_formats::ErrorKind::BackingMissing =>
            {
                // Like qemu-img -u: a missing backing file is fine when the size is given.
                let _ = e;
            }
            Err(e) => return Err(img_err("cannot read the backing file", &path, e)),
        }
    }
    let size = match &a.size {
        Some(s) => parse_size(s)?,
        None => backing_size
            .ok_or_else(|| CliError::new("a size is needed when there is no backing file"))?,
    };
    let opts = CreateOptions {
        size,
        backing_file: a.backing.as_ref().map(|b| b.as_bytes().to_vec()),
        backing_format: backing_format.map(String::into_bytes),
    };
    // The file must exist to be locked; it is only truncated once the lock is held.
    // Non-blocking, then checked: an existing FIFO, directory, ... is refused at once.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&a.file)
            .and_then(image_formats::checked_image_file)
            .map_err(|e| CliError::with_source(format!("{}: cannot open", a.file.display()), e))?
    };
    let _held = lock(state_dir, "image create", &a.file)?;
    create(&FileStorage::from_file(file), &opts)
        .map_err(|e| img_err("cannot create the image", &a.file, e))?;
    print_result(
        out,
        serde_json::json!({"filename": a.file, "format": "qcow2", "virtual-size": opts.size}),
    )
}

fn open_editor(file: &Path) -> Result<SnapshotEditor<FileStorage>, CliError> {
    let st = FileStorage::open_read_write(file)
        .map_err(|e| CliError::with_source(format!("{}: cannot open", file.display()), e))?;
    SnapshotEditor::open(st).map_err(|e| img_err("cannot change snapshots", file, e))
}

/// Run `image snapshot create`.
pub fn run_snap_create(a: SnapCreateArgs, out: Format, state_dir: Option<&Path>) -> CliResult {
    let _held = lock(state_dir, "snapshot create", &a.file)?;
    let mut ed = open_editor(&a.file)?;
    let id = ed
        .create(a.name.as_bytes(), now())
        .map_err(|e| img_err("cannot create the snapshot", &a.file, e))?;
    print_result(
        out,
        serde_json::json!({"id": String::from_utf8_lossy(&id), "name": a.name}),
    )
}

/// Run `image snapshot apply` (`delete = false`) or `image snapshot delete`.
pub fn run_snap_target(
    a: SnapTargetArgs,
    delete: bool,
    out: Format,
    state_dir: Option<&Path>,
) -> CliResult {
    let which = match (&a.id, &a.name) {
        (Some(id), _) => SnapshotRef::Id(id.as_bytes().to_vec()),
        (None, Some(n)) if delete => SnapshotRef::Name(n.as_bytes().to_vec()),
        (None, Some(n)) => SnapshotRef::IdOrName(n.as_bytes().to_vec()),
        (None, None) => return Err(CliError::new("name a snapshot (NAME or --id ID)")),
    };
    let op = if delete {
        "snapshot delete"
    } else {
        "snapshot apply"
    };
    let _held = lock(state_dir, op, &a.file)?;
    let mut ed = open_editor(&a.file)?;
    let sn = if delete {
        ed.delete(&which)
    } else {
        ed.apply(&which)
    }
    .map_err(|e| {
        img_err(
            if delete {
                "cannot delete the snapshot"
            } else {
                "cannot apply the snapshot"
            },
            &a.file,
            e,
        )
    })?;
    print_result(
        out,
        serde_json::json!({
            "id": String::from_utf8_lossy(&sn.id),
            "name": String::from_utf8_lossy(&sn.name),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("8g").unwrap(), 8 << 30);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("").is_err());
    }
}
