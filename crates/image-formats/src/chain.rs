//! Backing chains: follow backing files from an overlay down to the base image.
//!
//! Relative backing names resolve against the overlay's directory (QEMU's rule). Loops and
//! chains deeper than [`ChainOptions::max_depth`] are errors; a missing backing file is an
//! error naming the chain so far. A backing file whose format the overlay does not record is
//! never probed unless the caller allows it ([`ProbePolicy::Allow`]): probing lets a guest
//! that writes a qcow2 header into a raw disk make the host open arbitrary files.

use crate::error::{Error, ErrorKind, Result};
use crate::info::{Format, ImageInfo};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Whether a backing file's format may be guessed from its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbePolicy {
    /// Refuse backing files whose format is not recorded (the default; safe).
    #[default]
    Never,
    /// Probe them, as qemu-img does.
    Allow,
}

/// How to walk a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainOptions {
    /// Probe policy for backing files without a recorded format.
    pub probe: ProbePolicy,
    /// Most images in a chain, the top included.
    pub max_depth: usize,
}

/// Default maximum chain length: far past what users make (libvirt caps chains at 200;
/// virt-snap's domains are tested with 500 snapshots in one chain), low enough that a
/// runaway chain is an error instead of thousands of opened files. The walk is a loop, so
/// depth costs no stack.
pub const DEFAULT_MAX_DEPTH: usize = 2048;

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            probe: ProbePolicy::Never,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

fn names(chain: &[ImageInfo]) -> String {
    chain
        .iter()
        .map(|i| i.filename.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn with_top(chain: &[ImageInfo], last: &ImageInfo) -> String {
    let mut n = names(chain);
    if !n.is_empty() {
        n.push_str(" -> ");
    }
    n.push_str(&last.filename);
    n
}

/// Open `top` (format `format`, or probed: the top image is what the user named) and every
/// backing file below it. Returns the images top first, as `qemu-img info --backing-chain`.
pub fn backing_chain(
    top: &Path,
    format: Option<Format>,
    opts: ChainOptions,
) -> Result<Vec<ImageInfo>> {
    let mut chain: Vec<ImageInfo> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut next: Option<(String, Option<Format>)> =
        Some((top.to_string_lossy().into_owned(), format));
    while let Some((name, fmt)) = next.take() {
        if chain.len() >= opts.max_depth {
            return Err(Error::new(
                ErrorKind::ChainTooDeep,
                format!(
                    "backing chain longer than {} images: {} -> {name}",
                    opts.max_depth,
                    names(&chain)
                ),
            ));
        }
        let path = PathBuf::from(&name);
        // Only regular files and block devices, checked without blocking (a FIFO would hang
        // the open) and before anything else reads the path.
        let canonical = match crate::storage::check_image_path(&path)
            .and_then(|()| std::fs::canonicalize(&path))
        {
            Ok(c) => c,
            Err(e) if chain.is_empty() => return Err(Error::open_failed(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("backing file '{name}' {e}; chain so far: {}", names(&chain)),
                ))
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::BackingMissing,
                    format!(
                        "backing file '{name}' cannot be opened ({e}); chain so far: {}",
                        names(&chain)
                    ),
                ))
            }
        };
        if !seen.insert(canonical) {
            return Err(Error::new(
                ErrorKind::BackingLoop,
                format!("backing chain loops: {} -> {name}", names(&chain)),
            ));
        }
        let info = ImageInfo::open(&path, fmt).map_err(|e| {
            if chain.is_empty() {
                e
            } else {
                Error::new(e.kind(), format!("{e}; chain so far: {}", names(&chain)))
            }
        })?;
        if let Some(full) = info.full_backing_filename() {
            let fmt = match info.backing_format() {
                Some(f) => Some(Format::from_name(&f).map_err(|e| e.with_path(&path))?),
                None => match opts.probe {
                    ProbePolicy::Allow => None,
                    ProbePolicy::Never => {
                        return Err(Error::new(
                            ErrorKind::ProbeRefused,
                            format!(
                                "backing format of '{full}' not recorded; refusing to probe \
                                 (chain so far: {} -> {full})",
                                with_top(&chain, &info)
                            ),
                        )
                        .with_path(&path))
                    }
                },
            };
            next = Some((full, fmt));
        }
        chain.push(info);
    }
    Ok(chain)
}
