//! `virt-snap snapshot-list | snapshot-info | snapshot-dumpxml | snapshot-current |
//! snapshot-parent | snapshot-create | snapshot-create-as | snapshot-revert`: domain snapshots
//! (virsh's names, options and output).

use super::output::{self, Format};
use super::render::virsh::{table, time};
use super::{CliError, CliResult};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use virt_snap::snapshot::{
    CaptureRequest, CaptureResult, DamagedSnapshot, DeleteFlags, Disk, DomainSnapshot, Driver,
    Flags, ListFilter, Location, Memory, RevertFlags, Scope, SnapshotName, Source,
};
use virt_snap::Connection;

/// Snapshot commands (virsh's names, hence the common prefix).
#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)]
pub enum SnapshotCmd {
    /// List a domain's snapshots (virsh's table, `--tree`, `--name`).
    SnapshotList(ListArgs),
    /// A snapshot's details.
    SnapshotInfo {
        /// The domain.
        domain: String,
        /// The snapshot.
        #[arg(required_unless_present = "current", conflicts_with = "current")]
        snapshotname: Option<String>,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
    },
    /// A snapshot's domainsnapshot XML.
    SnapshotDumpxml {
        /// The domain.
        domain: String,
        /// The snapshot.
        snapshotname: String,
    },
    /// The current snapshot's XML (with --name, its name).
    SnapshotCurrent {
        /// The domain.
        domain: String,
        /// Print the name only.
        #[arg(long)]
        name: bool,
    },
    /// A snapshot's parent's name.
    SnapshotParent {
        /// The domain.
        domain: String,
        /// The snapshot.
        snapshotname: String,
    },
    /// Create a snapshot from domainsnapshot XML (with --redefine: record its metadata only).
    SnapshotCreate {
        /// The domain.
        domain: String,
        /// The domainsnapshot XML file (none: virsh's defaults).
        xmlfile: Option<PathBuf>,
        /// Record the XML as a snapshot's metadata, capturing nothing.
        #[arg(long)]
        redefine: bool,
        /// With --redefine: make it the current snapshot.
        #[arg(long, requires = "redefine")]
        current: bool,
        #[command(flatten)]
        flags: FlagArgs,
    },
    /// Revert the domain to a snapshot (it becomes the current one).
    SnapshotRevert {
        /// The domain.
        domain: String,
        /// The snapshot.
        #[arg(required_unless_present = "current", conflicts_with = "current")]
        snapshotname: Option<String>,
        /// Revert to the current snapshot.
        #[arg(long)]
        current: bool,
        /// The domain ends running, whatever the snapshot's state.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// The domain ends paused, whatever the snapshot's state.
        #[arg(long)]
        paused: bool,
        /// Revert where it is risky: a snapshot without a copy of the domain definition, or
        /// whose disks are not the domain's disks now.
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot (its children move to its parent); internal snapshots leave their
    /// images, external ones are merged into the images below by block-commit.
    SnapshotDelete {
        /// The domain.
        domain: String,
        /// The snapshot.
        #[arg(required_unless_present = "current", conflicts_with = "current")]
        snapshotname: Option<String>,
        /// Delete the current snapshot.
        #[arg(long)]
        current: bool,
        /// Delete its descendants too.
        #[arg(long, conflicts_with = "children_only")]
        children: bool,
        /// Delete its descendants only; it stays.
        #[arg(long)]
        children_only: bool,
        /// Delete the metadata only; no image is touched.
        #[arg(long)]
        metadata: bool,
    },
    /// Create a snapshot from options (virsh's --memspec and --diskspec).
    SnapshotCreateAs {
        /// The domain.
        domain: String,
        /// The snapshot's name (default: the creation time in seconds).
        #[arg(conflicts_with = "name")]
        snapshotname: Option<String>,
        /// The snapshot's name.
        #[arg(long)]
        name: Option<String>,
        /// Its description.
        #[arg(long)]
        description: Option<String>,
        /// Print the domainsnapshot XML instead of creating the snapshot.
        #[arg(long)]
        print_xml: bool,
        /// The memory: `[file=]PATH[,snapshot=internal|external|no]`.
        #[arg(long, value_name = "MEMSPEC")]
        memspec: Option<String>,
        /// A disk: `TARGET[,snapshot=internal|external|storage|manual|no][,driver=FMT]
        /// [,stype=file|block][,file=PATH]`; `,,` or `\,` for a comma in a value.
        #[arg(long, value_name = "DISKSPEC")]
        diskspec: Vec<String>,
        #[command(flatten)]
        flags: FlagArgs,
    },
}

/// `snapshot-list`'s options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The domain.
    domain: String,
    /// virsh's tree of parents and children (of every snapshot: no filter applies).
    #[arg(long, conflicts_with_all = [
        "parent", "name", "roots", "from", "leaves", "no_leaves", "topological", "internal",
        "external", "disk_only", "active", "inactive",
    ])]
    tree: bool,
    /// Add a Parent column.
    #[arg(long, conflicts_with_all = ["roots", "name"])]
    parent: bool,
    /// Only snapshots without a parent.
    #[arg(long, conflicts_with = "from")]
    roots: bool,
    /// Only snapshots without children.
    #[arg(long)]
    leaves: bool,
    /// Only snapshots with children.
    #[arg(long)]
    no_leaves: bool,
    /// Names only.
    #[arg(long)]
    name: bool,
    /// Parents before children.
    #[arg(long)]
    topological: bool,
    /// Only snapshots kept inside the images.
    #[arg(long)]
    internal: bool,
    /// Only snapshots with external (or storage-backend) parts.
    #[arg(long)]
    external: bool,
    /// Only disk-only snapshots.
    #[arg(long)]
    disk_only: bool,
    /// Only snapshots of a running domain (with RAM).
    #[arg(long)]
    active: bool,
    /// Only snapshots of a shut-off domain.
    #[arg(long)]
    inactive: bool,
    /// Only the children of this snapshot.
    #[arg(long, value_name = "SNAP")]
    from: Option<String>,
    /// With --from: all its descendants.
    #[arg(long, requires = "from")]
    descendants: bool,
}

/// The capture flags `snapshot-create` and `snapshot-create-as` share.
#[derive(Debug, Args)]
pub struct FlagArgs {
    /// Disks only, no RAM.
    #[arg(long)]
    disk_only: bool,
    /// All disks or none (always so here; accepted for virsh).
    #[arg(long)]
    atomic: bool,
    /// Freeze the guest's file systems through the agent.
    #[arg(long)]
    quiesce: bool,
    /// With --quiesce: how long the guest may stay frozen, in milliseconds (default 2000).
    /// The capture fails and thaws if it is not done by then; should virt-snap die or hang
    /// meanwhile, a watchdog process thaws the guest at the latest then.
    #[arg(long, value_name = "MS", requires = "quiesce",
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    freeze_budget: Option<u64>,
    /// With snapshot=manual disks: how long the domain stays paused at most for your own
    /// snapshots of them, in seconds (default 300); `virt-snap resume DOM` ends it sooner.
    #[arg(long, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    manual_hold: Option<u64>,
    /// Save RAM with the guest running.
    #[arg(long)]
    live: bool,
    /// With --live: where QEMU refuses background-snapshot (VFIO devices, no userfaultfd
    /// write-protect), save RAM with the guest paused instead of failing (reported).
    #[arg(long, requires = "live")]
    fallback_paused: bool,
    /// Stop the domain once captured.
    #[arg(long)]
    halt: bool,
    /// Do not record the snapshot's metadata.
    #[arg(long)]
    no_metadata: bool,
    /// The external files exist already.
    #[arg(long)]
    reuse_external: bool,
}

impl FlagArgs {
    fn flags(&self) -> Flags {
        Flags {
            disk_only: self.disk_only,
            quiesce: self.quiesce,
            live: self.live,
            fallback_paused: self.fallback_paused,
            atomic: self.atomic,
            halt: self.halt,
            no_metadata: self.no_metadata,
            reuse_external: self.reuse_external,
        }
    }
}

fn out_err(e: std::io::Error) -> CliError {
    CliError::with_source("cannot write output", e)
}

fn warn(damaged: &[DamagedSnapshot]) {
    for d in damaged {
        eprintln!(
            "warning: snapshot {} cannot be loaded ({}): {}",
            d.name.as_deref().unwrap_or("?"),
            d.path.display(),
            d.error
        );
    }
}

fn print_xml_text(xml: &str) {
    print!("{xml}");
    if !xml.ends_with('\n') {
        println!();
    }
}

/// virsh's `vshStringToArray`: split on `,`; `,,` (virsh's escape) and `\,` are a comma.
pub fn split_spec(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' | ',' if it.peek() == Some(&',') => {
                it.next();
                cur.push(',');
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// `--memspec [file=]PATH[,snapshot=internal|external|no]` (virsh's grammar).
pub fn parse_memspec(spec: &str) -> Result<Memory, CliError> {
    let bad = |why: &str| CliError::new(format!("unable to parse memspec {spec:?}: {why}"));
    let (mut snapshot, mut file) = (None, None);
    for part in split_spec(spec) {
        if let (None, Some(v)) = (&snapshot, part.strip_prefix("snapshot=")) {
            snapshot = Some(match Location::parse(v) {
                Some(l @ (Location::Internal | Location::External | Location::No)) => l,
                _ => {
                    return Err(bad(&format!(
                        "snapshot={v} is not internal, external or no"
                    )))
                }
            });
        } else if let (None, Some(v)) = (&file, part.strip_prefix("file=")) {
            file = Some(v.to_string());
        } else if file.is_none() && part.starts_with('/') {
            file = Some(part);
        } else {
            return Err(bad(&format!("unexpected {part:?}")));
        }
    }
    if file.as_deref() == Some("") {
        return Err(bad("empty file"));
    }
    match (snapshot, &file) {
        (None | Some(Location::External), None) => {
            Err(bad("an external memory snapshot needs a file"))
        }
        (Some(Location::Internal | Location::No), Some(_)) => {
            Err(bad("a file is only for snapshot=external"))
        }
        _ => Ok(Memory {
            snapshot: snapshot.or(Some(Location::External)),
            file,
            ..Default::default()
        }),
    }
}

/// `--diskspec TARGET[,snapshot=...][,driver=FMT][,stype=file|block][,file=PATH]` (virsh's
/// grammar).
pub fn parse_diskspec(spec: &str) -> Result<Disk, CliError> {
    let bad = |why: &str| CliError::new(format!("unable to parse diskspec {spec:?}: {why}"));
    let mut parts = split_spec(spec).into_iter();
    let name = parts.next().unwrap_or_default();
    if name.is_empty() || name.contains('=') {
        return Err(bad("it must start with the disk's target"));
    }
    let (mut snapshot, mut driver, mut stype, mut file) = (None, None, None, None);
    for part in parts {
        if let (None, Some(v)) = (&snapshot, part.strip_prefix("snapshot=")) {
            snapshot = Some(Location::parse(v).ok_or_else(|| {
                bad(&format!(
                    "snapshot={v} is not internal, external, storage, manual or no"
                ))
            })?);
        } else if let (None, Some(v)) = (&driver, part.strip_prefix("driver=")) {
            driver = Some(v.to_string());
        } else if let (None, Some(v)) = (&stype, part.strip_prefix("stype=")) {
            if v != "file" && v != "block" {
                return Err(bad(&format!("unknown storage type {v:?}")));
            }
            stype = Some(v.to_string());
        } else if let (None, Some(v)) = (&file, part.strip_prefix("file=")) {
            file = Some(v.to_string());
        } else {
            return Err(bad(&format!("unexpected {part:?}")));
        }
    }
    if (driver.is_some() || file.is_some())
        && matches!(snapshot, Some(l) if l != Location::External)
    {
        return Err(bad("driver= and file= are only for snapshot=external"));
    }
    let block = stype.as_deref() == Some("block");
    Ok(Disk {
        name,
        snapshot,
        source_type: stype,
        driver: driver.map(|format| Driver {
            format: Some(format),
            ..Default::default()
        }),
        source: file.map(|f| {
            if block {
                Source {
                    dev: Some(f),
                    ..Default::default()
                }
            } else {
                Source {
                    file: Some(f),
                    ..Default::default()
                }
            }
        }),
        ..Default::default()
    })
}

fn snapshot_name(n: &str) -> Result<SnapshotName, CliError> {
    SnapshotName::new(n)
        .map_err(|e| CliError::with_source(format!("invalid snapshot name {n:?}"), e))
}

/// The domainsnapshot XML `snapshot-create-as`'s options make (virsh's
/// `virshSnapshotCreateXMLBuild`): name, description, memory, disks.
pub fn create_as_xml(
    name: Option<&str>,
    description: Option<&str>,
    memspec: Option<&str>,
    diskspecs: &[String],
) -> Result<DomainSnapshot, CliError> {
    Ok(DomainSnapshot {
        name: name.map(snapshot_name).transpose()?,
        description: description.map(str::to_string),
        memory: memspec.map(parse_memspec).transpose()?,
        disks: diskspecs
            .iter()
            .map(|d| parse_diskspec(d))
            .collect::<Result<_, _>>()?,
        ..Default::default()
    })
}

/// The capture: the request checked against the domain's metadata, then
/// `Domain::snapshot_create`; what failed after the snapshot was taken is shown as warnings.
async fn capture(
    conn: &Connection,
    domain: &str,
    def: DomainSnapshot,
    flags: &FlagArgs,
) -> Result<CaptureResult, CliError> {
    conn.snapshot_check_request(domain, &def)?;
    let mut req = CaptureRequest::from_xml(&def, flags.flags())
        .map_err(|e| CliError::with_source("the snapshot request is not valid", e))?;
    if let Some(ms) = flags.freeze_budget {
        req.freeze_budget_ms = ms;
    }
    if let Some(secs) = flags.manual_hold {
        req.manual_hold_ms = secs * 1000;
    }
    let r = conn.domain(domain)?.snapshot_create(req).await?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(h) = &r.held {
        eprintln!(
            "Domain '{domain}' is paused for your snapshots of its manual disks ({}): run \
             `virt-snap resume {domain}` when they are done (it resumes by itself at {})",
            h.disks.join(", "),
            output::utc_date_time(h.until as i64)
        );
    }
    Ok(r)
}

/// Give `def` virsh's default name (the current time in seconds) if it has none.
fn default_name(def: &mut DomainSnapshot) -> Result<(), CliError> {
    if def.name.is_none() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        def.name = Some(snapshot_name(&now.to_string())?);
    }
    Ok(())
}

/// A duration in milliseconds with microsecond resolution (`null` when there is none).
fn ms(d: Option<std::time::Duration>) -> serde_json::Value {
    match d {
        Some(d) => serde_json::json!(d.as_micros() as f64 / 1000.0),
        None => serde_json::Value::Null,
    }
}

/// What a create printed: with `--output json` also the capture's timings (`null` for a
/// redefinition, or where a step did not happen).
fn created(
    out: Format,
    name: &str,
    from: Option<&Path>,
    captured: Option<&CaptureResult>,
) -> CliResult {
    match out {
        Format::Json => output::print_json(&serde_json::json!({
            "name": name, "file": from, "redefined": captured.is_none(),
            "paused-ms": ms(captured.and_then(|c| c.paused)),
            "frozen-ms": ms(captured.and_then(|c| c.frozen)),
            "stall-ms": ms(captured.and_then(|c| c.stall)),
            "memory-downtime-ms": captured.and_then(|c| c.memory_downtime_ms),
        }))
        .map_err(out_err),
        Format::Text => {
            match from {
                Some(f) => println!("Domain snapshot {name} created from '{}'", f.display()),
                None => println!("Domain snapshot {name} created"),
            }
            Ok(())
        }
    }
}

fn list(conn: &Connection, a: ListArgs, out: Format) -> CliResult {
    if a.tree && out == Format::Text {
        let (text, damaged) = conn.snapshot_tree_text(&a.domain)?;
        warn(&damaged);
        print!("{text}");
        return Ok(());
    }
    let scope = match (a.from, a.descendants, a.roots) {
        (Some(f), true, _) => Scope::Descendants(snapshot_name(&f)?),
        (Some(f), false, _) => Scope::Children(snapshot_name(&f)?),
        (None, _, true) => Scope::Roots,
        _ => Scope::All,
    };
    let filter = ListFilter {
        scope,
        leaves: a.leaves,
        no_leaves: a.no_leaves,
        internal: a.internal,
        external: a.external,
        active: a.active,
        inactive: a.inactive,
        disk_only: a.disk_only,
        topological: a.topological || a.tree,
    };
    let listing = conn.snapshot_listing(&a.domain, &filter)?;
    warn(&listing.damaged);
    let snaps = listing.snapshots;
    match out {
        Format::Json if a.name => {
            let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
            output::print_json(&names).map_err(out_err)
        }
        Format::Json => output::print_json(&snaps).map_err(out_err),
        Format::Text if a.name => {
            let mut s = String::new();
            for sn in &snaps {
                s.push_str(&sn.name);
                s.push('\n');
            }
            print!("{s}");
            Ok(())
        }
        Format::Text => {
            let rows: Vec<Vec<String>> = snaps
                .iter()
                .map(|s| {
                    let mut r = vec![
                        s.name.clone(),
                        time(s.creation_time),
                        s.state.clone().unwrap_or_default(),
                    ];
                    if a.parent {
                        r.push(s.parent.clone().unwrap_or_default());
                    }
                    r
                })
                .collect();
            let head: &[&str] = if a.parent {
                &["Name", "Creation Time", "State", "Parent"]
            } else {
                &["Name", "Creation Time", "State"]
            };
            print!("{}", table(head, &rows));
            println!();
            Ok(())
        }
    }
}

/// Run a snapshot command.
pub async fn run(cmd: SnapshotCmd, out: Format, state: Option<&Path>) -> CliResult {
    let conn = super::connect(state)?;
    match cmd {
        SnapshotCmd::SnapshotList(a) => list(&conn, a, out),
        SnapshotCmd::SnapshotInfo {
            domain,
            snapshotname,
            current,
        } => {
            let name = match (snapshotname, current) {
                (Some(n), _) => n,
                (None, _) => conn
                    .snapshot_current(&domain)?
                    .and_then(|c| c.name.map(|n| n.to_string()))
                    .ok_or_else(|| no_current(&domain))?,
            };
            let i = conn.snapshot_info(&domain, &name)?;
            match out {
                Format::Json => output::print_json(&i).map_err(out_err),
                Format::Text => {
                    let yes = |b: bool| if b { "yes" } else { "no" };
                    let mut s = String::new();
                    let mut field = |k: &str, v: &str| {
                        s.push_str(&format!("{:<15} {v}\n", format!("{k}:")));
                    };
                    field("Name", &i.name);
                    field("Domain", &i.domain);
                    field("Current", yes(i.current));
                    field("State", i.state.as_deref().unwrap_or("-"));
                    field("Location", i.location);
                    field("Parent", i.parent.as_deref().unwrap_or("-"));
                    field("Children", &i.children.to_string());
                    field("Descendants", &i.descendants.to_string());
                    field("Metadata", yes(i.metadata));
                    print!("{s}");
                    Ok(())
                }
            }
        }
        SnapshotCmd::SnapshotDumpxml {
            domain,
            snapshotname,
        } => {
            let xml = conn.snapshot_dumpxml(&domain, &snapshotname)?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": snapshotname, "xml": xml,
                }))
                .map_err(out_err),
                Format::Text => {
                    print_xml_text(&xml);
                    Ok(())
                }
            }
        }
        SnapshotCmd::SnapshotCurrent { domain, name } => {
            let cur = conn
                .snapshot_current(&domain)?
                .ok_or_else(|| no_current(&domain))?;
            let n = cur.name.as_deref().unwrap_or_default().to_string();
            match out {
                Format::Json if name => {
                    output::print_json(&serde_json::json!({ "name": n })).map_err(out_err)
                }
                Format::Json => output::print_json(&serde_json::json!({
                    "name": n, "xml": cur.to_xml(),
                }))
                .map_err(out_err),
                Format::Text if name => {
                    println!("{n}");
                    Ok(())
                }
                Format::Text => {
                    print_xml_text(&cur.to_xml());
                    Ok(())
                }
            }
        }
        SnapshotCmd::SnapshotParent {
            domain,
            snapshotname,
        } => {
            let parent = conn
                .snapshot_parent(&domain, &snapshotname)?
                .ok_or_else(|| {
                    CliError::new(format!(
                        "snapshot {snapshotname:?} of domain {domain:?} has no parent"
                    ))
                })?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": snapshotname, "parent": parent,
                }))
                .map_err(out_err),
                Format::Text => {
                    println!("{parent}");
                    Ok(())
                }
            }
        }
        SnapshotCmd::SnapshotCreate {
            domain,
            xmlfile,
            redefine,
            current,
            flags,
        } => {
            let xml = match &xmlfile {
                Some(f) => std::fs::read_to_string(f).map_err(|e| {
                    CliError::with_source(format!("cannot read {}", f.display()), e)
                })?,
                None if redefine => {
                    return Err(CliError::new("--redefine needs the snapshot's XML file"))
                }
                None => "<domainsnapshot/>".to_string(),
            };
            if redefine {
                let def = conn.snapshot_redefine(&domain, &xml, current)?;
                let name = def.name.as_deref().unwrap_or_default();
                return created(out, name, xmlfile.as_deref(), None);
            }
            let mut def = DomainSnapshot::from_xml(&xml)
                .map_err(|e| CliError::with_source("the domainsnapshot XML cannot be parsed", e))?;
            default_name(&mut def)?;
            let r = capture(&conn, &domain, def, &flags).await?;
            created(out, &r.name, xmlfile.as_deref(), Some(&r))
        }
        SnapshotCmd::SnapshotRevert {
            domain,
            snapshotname,
            current,
            running,
            paused,
            force,
        } => {
            let name = match snapshotname {
                Some(n) => n,
                None if current => conn
                    .snapshot_current(&domain)?
                    .and_then(|s| s.name.map(|n| n.to_string()))
                    .ok_or_else(|| no_current(&domain))?,
                None => unreachable!("clap requires one"),
            };
            let flags = RevertFlags {
                running,
                paused,
                force,
            };
            revert(&conn, &domain, &name, flags, out).await
        }
        SnapshotCmd::SnapshotDelete {
            domain,
            snapshotname,
            current,
            children,
            children_only,
            metadata,
        } => {
            let name = match snapshotname {
                Some(n) => n,
                None if current => conn
                    .snapshot_current(&domain)?
                    .and_then(|s| s.name.map(|n| n.to_string()))
                    .ok_or_else(|| no_current(&domain))?,
                None => unreachable!("clap requires one"),
            };
            let flags = DeleteFlags {
                children,
                children_only,
                metadata,
            };
            delete(&conn, &domain, &name, flags, out).await
        }
        SnapshotCmd::SnapshotCreateAs {
            domain,
            snapshotname,
            name,
            description,
            print_xml,
            memspec,
            diskspec,
            flags,
        } => {
            let mut def = create_as_xml(
                snapshotname.or(name).as_deref(),
                description.as_deref(),
                memspec.as_deref(),
                &diskspec,
            )?;
            if print_xml {
                let xml = def.to_xml();
                return match out {
                    Format::Json => {
                        output::print_json(&serde_json::json!({ "xml": xml })).map_err(out_err)
                    }
                    Format::Text => {
                        print_xml_text(&xml);
                        Ok(())
                    }
                };
            }
            default_name(&mut def)?;
            let r = capture(&conn, &domain, def, &flags).await?;
            created(out, &r.name, None, Some(&r))
        }
    }
}

/// `snapshot-revert`: silent on success, as virsh is (warnings on stderr); `--output json`
/// prints the snapshot, the state after, the kind of revert and how long it took.
async fn revert(
    conn: &Connection,
    domain: &str,
    name: &str,
    flags: RevertFlags,
    out: Format,
) -> CliResult {
    let r = conn.domain(domain)?.snapshot_revert(name, flags).await?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    match out {
        Format::Json => output::print_json(&serde_json::json!({
            "name": r.name,
            "state": r.state,
            "kind": r.kind.as_str(),
            "elapsed-ms": r.elapsed.as_millis() as u64,
            "warnings": r.warnings,
        }))
        .map_err(out_err),
        Format::Text => Ok(()),
    }
}

/// `snapshot-delete`: virsh's line (`Domain snapshot S deleted`, `... children deleted` with
/// --children-only), warnings on stderr; `--output json` prints the snapshots deleted, the
/// kind, how long it took and the warnings.
async fn delete(
    conn: &Connection,
    domain: &str,
    name: &str,
    flags: DeleteFlags,
    out: Format,
) -> CliResult {
    let r = conn.domain(domain)?.snapshot_delete(name, flags).await?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    match out {
        Format::Json => output::print_json(&serde_json::json!({
            "name": name,
            "deleted": r.deleted,
            "kind": r.kind.as_str(),
            "elapsed-ms": r.elapsed.as_millis() as u64,
            "warnings": r.warnings,
        }))
        .map_err(out_err),
        Format::Text if flags.children_only => {
            println!("Domain snapshot {name} children deleted");
            Ok(())
        }
        Format::Text => {
            println!("Domain snapshot {name} deleted");
            Ok(())
        }
    }
}

fn no_current(domain: &str) -> CliError {
    CliError::new(format!("domain {domain:?} has no current snapshot"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_split_like_virsh() {
        assert_eq!(split_spec("vda,file=/a,,b"), ["vda", "file=/a,b"]);
        assert_eq!(
            split_spec(r"vda,file=/a\,b,driver=qcow2"),
            ["vda", "file=/a,b", "driver=qcow2"]
        );
        assert_eq!(split_spec("/ram"), ["/ram"]);
    }

    #[test]
    fn default_name_is_the_time_in_seconds() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut def = create_as_xml(None, None, None, &[]).unwrap();
        default_name(&mut def).unwrap();
        let n: u64 = def.name.unwrap().as_str().parse().unwrap();
        assert!((before..before + 5).contains(&n), "{n}");
        let mut def = create_as_xml(Some("mine"), None, None, &[]).unwrap();
        default_name(&mut def).unwrap();
        assert_eq!(def.name.unwrap().as_str(), "mine");
    }

    #[test]
    fn memspecs() {
        let m = parse_memspec("/var/ram.save").unwrap();
        assert_eq!(
            (m.snapshot, m.file.as_deref()),
            (Some(Location::External), Some("/var/ram.save"))
        );
        let m = parse_memspec("snapshot=no").unwrap();
        assert_eq!((m.snapshot, m.file), (Some(Location::No), None));
        for bad in [
            "",
            "snapshot=storage",
            "file=/a,file=/b",
            "x=1",
            "snapshot=external",
            "/a,snapshot=internal",
        ] {
            assert!(parse_memspec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn diskspecs() {
        let d = parse_diskspec("vdb,snapshot=external,driver=qcow2,stype=block,file=/dev/vg/o")
            .unwrap();
        assert_eq!(d.name, "vdb");
        assert_eq!(d.source.unwrap().dev.as_deref(), Some("/dev/vg/o"));
        assert_eq!(d.driver.unwrap().format.as_deref(), Some("qcow2"));
        assert_eq!(
            parse_diskspec("vda,snapshot=storage").unwrap().snapshot,
            Some(Location::Storage)
        );
        for bad in [
            "",
            "snapshot=no",
            "vda,snapshot=bogus",
            "vda,stype=net",
            "vda,snapshot=no,file=/x",
            "vda,colour=red",
        ] {
            assert!(parse_diskspec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn freeze_budget_flag() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut a = vec!["virt-snap", "snapshot-create-as", "d", "--disk-only"];
            a.extend(extra);
            super::super::Cli::try_parse_from(a).map(|c| match c.command {
                super::super::Command::Snapshot(SnapshotCmd::SnapshotCreateAs {
                    flags, ..
                }) => flags.freeze_budget,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(
            parse(&["--quiesce", "--freeze-budget", "3000"]).unwrap(),
            Some(3000)
        );
        assert_eq!(parse(&["--quiesce"]).unwrap(), None);
        assert!(
            parse(&["--freeze-budget", "3000"]).is_err(),
            "needs --quiesce"
        );
        assert!(parse(&["--quiesce", "--freeze-budget", "0"]).is_err());
    }
}
