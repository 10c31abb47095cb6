//! Deleting snapshots of a domain: snapshot-core's delete capability traits implemented over
//! the domain's QMP monitor (the `snapshot-delete` job, `block-commit`), a guestless
//! `qemu-storage-daemon` for a shut-off domain's merges, image-formats for offline internal
//! snapshots, the stored definition, and [`Domain::snapshot_delete`]. See docs/delete.md.

use super::capture::{
    be, crc, del_overlay_node, delete_internal_snapshot, remove_overlay_file, sweep_detached_nodes,
    JOB_TIMEOUT,
};
use super::ops::{delete_volume_snapshot, nodes_of, ns, same_image, DomainQmp, OpLock};
use crate::domain::runstate;
use crate::domain::Domain;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{Progress, Unit};
use async_trait::async_trait;
use qmp_proto::commands::{self as qc, BlockDeviceInfo, JobStatus};
use qmp_proto::QmpClient;
use snapshot_core::capture::PoolVolume;
use snapshot_core::delete::{
    self as core, Capabilities, CommitMode, DeletePlan, Facts, Merge, Stream, StreamMode,
};
use snapshot_core::ops::{DomainJournal, Recovered};
use snapshot_core::revert::InternalDisk;
use snapshot_core::store::DomainStore;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use snapshot_core::delete::{DeleteFlags, DeleteKind};

type CoreResult<T> = snapshot_core::Result<T>;

/// What [`Domain::snapshot_delete`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteResult {
    /// The snapshots deleted, children before parents.
    pub deleted: Vec<String>,
    /// What it touched.
    pub kind: DeleteKind,
    /// How long it took, planning included.
    pub elapsed: Duration,
    /// What is kept that a user may expect gone, and what failed without undoing the delete.
    pub warnings: Vec<String>,
}

/// A test-only failpoint: `VIRT_SNAP_FAILPOINT=delete:<effect>` aborts the process right
/// after the effect (`delete-internal`, `reopen-rw` (a backing node made writable for an
/// internal delete), `name-node` (a node QEMU opened itself replaced: the new one added,
/// not yet put in place), `delete-volume-snapshot` (and `before-delete-volume-snapshot`: right
/// before it), `commit`, `stream`, `switch-definition`, `remove-overlay`), as
/// a kill would; `delete:commit-ready` right after an active commit became ready, before it
/// is completed.
fn failpoint(name: &str) {
    super::ops::failpoint("delete", name);
}

/// The capabilities of one delete of one domain.
pub(crate) struct Deleting {
    dom: Domain,
    qmp: DomainQmp,
    /// The domain's operation lock, lent to a backend call that takes it itself (a running
    /// domain's volume snapshot deleted under its hold).
    op: OpLock,
}

/// The one format node of image `path` (of disk `disk`); several or none: refused before
/// anything changed.
fn one_node_of<'a>(nodes: &'a [BlockDeviceInfo], path: &str, disk: &str) -> CoreResult<&'a str> {
    match nodes_of(nodes, path)[..] {
        [n] => Ok(n),
        ref found => Err(snapshot_core::Error::not_started(
            disk,
            format!("QEMU has {} nodes of {path}, not one", found.len()),
        )),
    }
}

/// The `blockdev-reopen` options (read-only unset) that keep format node `node` of backing
/// image `image` as virt-snap opened it: the command line's nodes (`vs-<disk>-fmt` on
/// `vs-<disk>-file`, `discard=unmap`) and the captures' and reverts' overlay nodes (`<node>`
/// on `<node>-f`, and the nodes [`named_chain_node`] puts in place of those QEMU opened
/// itself), on the same protocol node and backing node. The protocol node is left as it is
/// (opened read-write: it follows its format node's permissions; reopened read-only
/// explicitly, it would stay so when a later commit makes the format node writable). A node
/// virt-snap did not open (an auto-generated `#block...` name, or another tool's) is
/// refused before anything changed: its options are not known.
fn reopen_options(
    graph: &[BlockDeviceInfo],
    node: &str,
    image: &str,
    disk: &str,
) -> CoreResult<qc::BlockdevOptions> {
    let info = graph
        .iter()
        .find(|n| n.node_name.as_deref() == Some(node))
        .expect("found by one_node_of");
    let file = super::capture::file_child(node);
    let has_file = graph
        .iter()
        .any(|n| n.node_name.as_deref() == Some(file.as_str()));
    if node.starts_with('#') || !has_file {
        return Err(snapshot_core::Error::not_started(
            disk,
            format!(
                "the internal snapshot is in {image}, and its node {node} (or one above it) \
                 was not opened by virt-snap (a QEMU started by another tool?), so its \
                 options to reopen it read-write are not known: shut the domain off to delete \
                 it, or --metadata"
            ),
        ));
    }
    let below = match &info.backing_file {
        Some(b) => Some(one_node_of(graph, b, disk)?),
        None => None,
    };
    let mut f = qc::BlockdevOptions::new(&info.drv, node)
        .set("file", file.as_str())
        .backing(below);
    if node.ends_with("-fmt") {
        f = f.set("discard", "unmap");
    }
    Ok(f)
}

/// The node of backing image `image` on disk `disk`'s chain from its top node `top`, named by
/// virt-snap: a node QEMU opened itself from a header on the way down (an auto-generated
/// `#block...` name, which `blockdev-reopen` cannot name) is replaced by one virt-snap
/// names, `vs-n-<hash>` on `vs-n-<hash>-f`: the same image opened again (`blockdev-add`
/// of the protocol node, then of the format node read-only; the protocol node, opened
/// read-write with no permission taken, follows the format node's, so that a later reopen
/// or commit can make it writable), with the same backing node, then put under its parent with a
/// `blockdev-reopen` of the parent (same options, the new backing); QEMU closes the old node,
/// which nothing uses then. Top-down, so that each parent is named when it is reopened.
/// Nothing in the guest's view changes: the same data, read-only, under the same top.
async fn named_chain_node(
    qmp: &QmpClient,
    top: &str,
    image: &str,
    disk: &str,
) -> CoreResult<(String, Vec<BlockDeviceInfo>)> {
    let graph_now = || async {
        qmp.run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(|e| ns("query-named-block-nodes", e))
    };
    // A node a killed run added and did not put in place yet is attached to nothing: closed
    // first, so that each image has one node again.
    sweep_detached_nodes(qmp).await;
    let mut graph = graph_now().await?;
    let mut parent = top.to_string();
    // A chain is short; the bound only stops a graph that loops.
    for _ in 0..64 {
        let info = graph
            .iter()
            .find(|n| n.node_name.as_deref() == Some(parent.as_str()))
            .ok_or_else(|| {
                snapshot_core::Error::not_started(disk, format!("QEMU has no node {parent}"))
            })?;
        if same_image(&info.file, image) {
            return Ok((parent, graph));
        }
        let Some(b) = info.backing_file.clone() else {
            return Err(snapshot_core::Error::not_started(
                disk,
                format!("{image} is not in the disk's chain in QEMU"),
            ));
        };
        let child = one_node_of(&graph, &b, disk)?.to_string();
        if !child.starts_with('#') {
            parent = child;
            continue;
        }
        let cinfo = graph
            .iter()
            .find(|n| n.node_name.as_deref() == Some(child.as_str()))
            .expect("found by one_node_of");
        let below = match &cinfo.backing_file {
            Some(bb) => Some(one_node_of(&graph, bb, disk)?.to_string()),
            None => None,
        };
        let named = format!("vs-n-{:08x}", crc(&format!("{disk}:{}", cinfo.file)));
        let fnode = super::capture::file_node(&named);
        // Two nodes, as the captures' overlays have (del_overlay_node closes both).
        let proto = crate::domain::argv::protocol_driver(Path::new(&cinfo.file));
        let file = qc::BlockdevOptions::new(proto, &fnode).set("filename", cinfo.file.as_str());
        qmp.run(&qc::BlockdevAdd(file))
            .await
            .map_err(|e| ns("blockdev-add", e))?;
        let add = qc::BlockdevOptions::new(&cinfo.drv, &named)
            .set("file", fnode.as_str())
            .read_only(true)
            .backing(below.as_deref());
        if let Err(e) = qmp.run(&qc::BlockdevAdd(add)).await {
            let _ = del_overlay_node(qmp, &named).await;
            return Err(ns("blockdev-add", e));
        }
        failpoint("name-node");
        let pinfo = graph
            .iter()
            .find(|n| n.node_name.as_deref() == Some(parent.as_str()))
            .expect("found above");
        let reopen = reopen_options(&graph, &parent, &pinfo.file, disk)?
            .read_only(pinfo.ro)
            .backing(Some(&named));
        if let Err(e) = qmp
            .run(&qc::BlockdevReopen {
                options: vec![reopen],
            })
            .await
        {
            let _ = del_overlay_node(qmp, &named).await;
            return Err(ns("blockdev-reopen", e));
        }
        graph = graph_now().await?;
        parent = named;
    }
    Err(snapshot_core::Error::not_started(
        disk,
        format!("{image} not found down the disk's chain in QEMU"),
    ))
}

fn job_id(m: &Merge) -> String {
    format!(
        "vs-commit-{:08x}",
        crc(&format!("{}:{}", m.disk, m.overlay))
    )
}

/// Runs (or, after a kill, finds and finishes) the commit job `job` of `m` in the QEMU (or
/// storage daemon) behind `qmp`, whose disk's top node is `root`: started unless it exists,
/// completed when ready (an active commit pivots), dismissed when concluded.
async fn commit_job(
    qmp: &QmpClient,
    m: &Merge,
    root: &str,
    job: &str,
    progress: &dyn Progress,
) -> CoreResult<()> {
    start_commit_job(qmp, m, root, job).await?;
    progress.start(
        &format!("merging {} into {}", m.overlay, m.base),
        Unit::Work,
    );
    let what = format!("{} into {}", m.overlay, m.base);
    let r = follow_job(qmp, job, &m.disk, "commit", &what, true, progress).await;
    progress.finish(r.is_ok());
    r
}

/// Starts the commit job `job` of `m` on the disk whose top node is `root`, unless QEMU has
/// it already or the overlay is out of the disk's chain (merged already).
async fn start_commit_job(qmp: &QmpClient, m: &Merge, root: &str, job: &str) -> CoreResult<()> {
    // Until QEMU accepted the job, nothing changed.
    let jobs = qmp
        .run(&qc::QueryJobs)
        .await
        .map_err(|e| ns("query-jobs", e))?;
    if !jobs.iter().any(|j| j.id == job) {
        let nodes = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(false) })
            .await
            .map_err(|e| ns("query-named-block-nodes", e))?;
        // Merged already (a run killed after the job): the overlay is out of the disk's chain
        // (its node may still be there, detached, until the step drops it).
        let chain_has = |path: &str| {
            let root_node = nodes.iter().find(|n| n.node_name.as_deref() == Some(root));
            std::iter::successors(root_node.map(|n| &n.image), |i| i.backing_image.as_deref())
                .any(|i| same_image(&i.filename, path))
        };
        if !chain_has(&m.overlay) {
            return Ok(());
        }
        let top = nodes_of(&nodes, &m.overlay);
        let Some(top) = top.first() else {
            return Ok(());
        };
        let base = one_node_of(&nodes, &m.base, &m.disk)?;
        qmp.run(&qc::BlockCommit {
            job_id: Some(job.to_string()),
            device: root.to_string(),
            top_node: Some(top.to_string()),
            base_node: Some(base.to_string()),
            auto_dismiss: Some(false),
            ..Default::default()
        })
        .await
        .map_err(|e| ns("block-commit", e))?;
    }
    Ok(())
}

/// Waits for the block job `job` (a `kind` job, `commit` or `stream`, doing `what`, of disk
/// `disk`) to end, reporting its progress; with `pivot`, completes it once it is ready (an
/// active commit's pivot). Dismisses it when concluded; a job QEMU no longer lists has ended.
/// Looks at the job (`query-jobs`) again on each of its `JOB_STATUS_CHANGE` events, and every
/// 100 ms for its progress.
async fn follow_job(
    qmp: &QmpClient,
    job: &str,
    disk: &str,
    kind: &str,
    what: &str,
    pivot: bool,
    progress: &dyn Progress,
) -> CoreResult<()> {
    let end = Instant::now() + JOB_TIMEOUT;
    let mut completed = false;
    // Subscribed before the first look: every status change after it comes as an event, so
    // the job is looked at again as soon as it moves (not after a fixed sleep).
    let mut events = qmp.subscribe();
    loop {
        let jobs = qmp
            .run(&qc::QueryJobs)
            .await
            .map_err(|e| be("query-jobs", e))?;
        let Some(j) = jobs.into_iter().find(|j| j.id == job) else {
            return Ok(());
        };
        progress.update(j.current_progress, j.total_progress);
        match j.status {
            JobStatus::Ready if pivot && !completed => {
                failpoint("commit-ready");
                qmp.run(&qc::JobComplete::new(job))
                    .await
                    .map_err(|e| be("job-complete", e))?;
                completed = true;
                continue;
            }
            JobStatus::Concluded => {
                let _ = qmp.run(&qc::JobDismiss::new(job)).await;
                return match j.error {
                    None => Ok(()),
                    Some(e) => Err(snapshot_core::Error::backend(
                        disk,
                        format!("the {kind} of {what} failed: {e}"),
                    )),
                };
            }
            _ if Instant::now() > end => {
                return Err(snapshot_core::Error::backend(
                    disk,
                    format!("the {kind} job {job} did not end in {JOB_TIMEOUT:?}; it runs on"),
                ))
            }
            _ => {
                // The job's next status change, or a look at its progress every 100 ms.
                let moved = async {
                    while let Some(e) = events.next().await {
                        if e.name == "JOB_STATUS_CHANGE" && e.data["id"] == job {
                            return;
                        }
                    }
                    // The connection's event stream ended: look again after a pause.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let _ = tokio::time::timeout(Duration::from_millis(100), moved).await;
            }
        }
    }
}

fn stream_job_id(s: &Stream) -> String {
    format!(
        "vs-stream-{:08x}",
        crc(&format!("{}:{}", s.disk, s.overlay))
    )
}

/// Runs (or, after a kill, finds and follows) the stream job `job` of `s` in the QEMU (or
/// storage daemon) behind `qmp`: started on the overlay's node unless it exists (an overlay
/// no longer backed by the image is streamed already), followed to its end, dismissed.
async fn stream_job(
    qmp: &QmpClient,
    s: &Stream,
    job: &str,
    progress: &dyn Progress,
) -> CoreResult<()> {
    // Until QEMU accepted the job, nothing changed.
    let jobs = qmp
        .run(&qc::QueryJobs)
        .await
        .map_err(|e| ns("query-jobs", e))?;
    if !jobs.iter().any(|j| j.id == job) {
        let nodes = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(false) })
            .await
            .map_err(|e| ns("query-named-block-nodes", e))?;
        let tops = nodes_of(&nodes, &s.overlay);
        // The overlay's node whose backing is the image (none: streamed already).
        let Some(top) = nodes.iter().find(|n| {
            n.node_name.as_deref().is_some_and(|x| tops.contains(&x))
                && n.image
                    .backing_image
                    .as_ref()
                    .is_some_and(|b| same_image(&b.filename, &s.image))
        }) else {
            return Ok(());
        };
        let top = top.node_name.clone().unwrap_or_default();
        let base_node = match &s.base {
            None => None,
            Some(b) => Some(one_node_of(&nodes, b, &s.disk)?.to_string()),
        };
        qmp.run(&qc::BlockStream {
            job_id: Some(job.to_string()),
            device: top,
            base_node,
            auto_dismiss: Some(false),
            ..Default::default()
        })
        .await
        .map_err(|e| ns("block-stream", e))?;
    }
    progress.start(
        &format!("streaming {} into {}", s.image, s.overlay),
        Unit::Work,
    );
    let what = format!("{} into {}", s.image, s.overlay);
    let r = follow_job(qmp, job, &s.disk, "stream", &what, false, progress).await;
    progress.finish(r.is_ok());
    r
}

impl Deleting {
    /// Holding the domain's operation lock `op` (lent to backend calls, given back by
    /// `self.op.take()`).
    fn holding(dom: &Domain, op: locking::Acquired) -> Self {
        Deleting {
            dom: dom.clone(),
            qmp: DomainQmp::new(dom),
            op: OpLock::new(dom, "snapshot delete", Some(op)),
        }
    }

    async fn qmp(&self) -> CoreResult<QmpClient> {
        self.qmp.get().await
    }

    fn up(&self) -> CoreResult<bool> {
        self.qmp.up()
    }

    /// Each disk's (target, top node) in the running QEMU.
    async fn tops(&self) -> CoreResult<Vec<(String, String)>> {
        let qmp = self.qmp().await?;
        let st = self.dom.running().map_err(|e| be(&self.dom.name, e))?;
        let blocks = crate::domain::block_devices(&qmp, &st)
            .await
            .map_err(|e| be("query-block", e))?;
        Ok(blocks
            .into_iter()
            .filter_map(|b| b.node_name.map(|n| (b.target, n)))
            .collect())
    }

    async fn top_of(&self, target: &str) -> CoreResult<String> {
        self.tops()
            .await?
            .into_iter()
            .find(|(t, _)| t == target)
            .map(|(_, n)| n)
            .ok_or_else(|| {
                snapshot_core::Error::backend(target, "the running QEMU has no such disk")
            })
    }

    /// A merge in the running QEMU.
    /// The running QEMU and disk `disk`'s top node there; failing to reach either changed
    /// nothing (not started).
    async fn live_disk(&self, disk: &str) -> CoreResult<(QmpClient, String)> {
        let not_started = |e: snapshot_core::Error| {
            snapshot_core::Error::not_started(disk, e.to_string()).caused_by(e)
        };
        let qmp = self.qmp().await.map_err(not_started)?;
        let root = self.top_of(disk).await.map_err(not_started)?;
        Ok((qmp, root))
    }

    async fn commit_live(&self, m: &Merge) -> CoreResult<()> {
        let (qmp, root) = self.live_disk(&m.disk).await?;
        commit_job(&qmp, m, &root, &job_id(m), self.dom.conn.progress()).await?;
        failpoint("commit");
        // The overlay's nodes, out of the graph now, dropped (QEMU drops the ones it opened
        // itself from the images' headers).
        let nodes = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(|e| be("query-named-block-nodes", e))?;
        for n in nodes_of(&nodes, &m.overlay) {
            if !n.starts_with('#') {
                del_overlay_node(&qmp, n).await?;
            }
        }
        // The run record names the disk's top as QEMU has it now.
        if m.mode == CommitMode::Active {
            let node = self.top_of(&m.disk).await?;
            let mut rec = self.dom.running().map_err(|e| be(&self.dom.name, e))?;
            if let Some(d) = rec.disks.iter_mut().find(|d| d.target == m.disk) {
                d.source = m.base.clone().into();
                d.node = Some(node);
                d.format = Some(m.base_format.clone());
            }
            runstate::save(&self.dom.dir(), &rec).map_err(|e| be(&self.dom.name, e))?;
        }
        Ok(())
    }

    /// A stream in the running QEMU (the overlay on the disk's active chain); the image's
    /// nodes, out of the graph then, dropped.
    async fn stream_live(&self, st: &Stream) -> CoreResult<()> {
        let qmp = self.qmp().await.map_err(|e| {
            snapshot_core::Error::not_started(st.disk.as_str(), e.to_string()).caused_by(e)
        })?;
        stream_job(&qmp, st, &stream_job_id(st), self.dom.conn.progress()).await?;
        failpoint("stream");
        let nodes = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(|e| be("query-named-block-nodes", e))?;
        for n in nodes_of(&nodes, &st.image) {
            if !n.starts_with('#') {
                del_overlay_node(&qmp, n).await?;
            }
        }
        Ok(())
    }

    /// A stream into an overlay no QEMU has open (off the disk's active chain, or the domain
    /// shut off), in a `qemu-storage-daemon` (no guest) with its monitor in the domain's
    /// private directory.
    async fn stream_offline(&self, st: &Stream) -> CoreResult<()> {
        if self.up()? {
            let qmp = self.qmp().await.map_err(|e| {
                snapshot_core::Error::not_started(st.disk.as_str(), e.to_string()).caused_by(e)
            })?;
            let nodes = qmp
                .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
                .await
                .map_err(|e| ns("query-named-block-nodes", e))?;
            if !nodes_of(&nodes, &st.overlay).is_empty() {
                return Err(snapshot_core::Error::not_started(
                    st.disk.as_str(),
                    format!("{} is open in the running QEMU", st.overlay),
                ));
            }
        }
        let dir = self.dom.dir();
        crate::snapshot::capture::create_private_dir(&dir).map_err(|e| be(&st.disk, e))?;
        let sock = dir.join(format!("qsd-{:08x}.qmp", crc(&st.overlay)));
        let _ = std::fs::remove_file(&sock);
        let mut child = spawn_storage_daemon(&sock).map_err(|e| ns("qemu-storage-daemon", e))?;
        let res = async {
            let qmp = connect_when_there(&sock, &mut child).await?;
            let root = "vs-del-top";
            let opts = serde_json::json!({
                "driver": "qcow2",
                "node-name": root,
                "file": { "driver": "file", "filename": st.overlay },
            });
            qmp.execute("blockdev-add", Some(opts))
                .await
                .map_err(|e| ns("blockdev-add", e))?;
            stream_job(&qmp, st, &stream_job_id(st), self.dom.conn.progress()).await?;
            let _ = qmp
                .execute(
                    "blockdev-del",
                    Some(serde_json::json!({ "node-name": root })),
                )
                .await;
            let _ = qmp.execute("quit", None).await;
            Ok::<(), snapshot_core::Error>(())
        }
        .await;
        stop_storage_daemon(&mut child).await;
        let _ = std::fs::remove_file(&sock);
        res?;
        failpoint("stream");
        Ok(())
    }

    /// A merge of a shut-off domain's images, in a `qemu-storage-daemon` (no guest) with its
    /// monitor in the domain's private directory.
    async fn commit_offline(&self, m: &Merge) -> CoreResult<()> {
        if self.up()? {
            return Err(snapshot_core::Error::not_started(
                m.disk.as_str(),
                "the domain runs: its images are not merged offline",
            ));
        }
        let dir = self.dom.dir();
        crate::snapshot::capture::create_private_dir(&dir).map_err(|e| be(&m.disk, e))?;
        let sock = dir.join(format!("qsd-{:08x}.qmp", crc(&m.overlay)));
        let _ = std::fs::remove_file(&sock);
        let mut child = spawn_storage_daemon(&sock).map_err(|e| ns("qemu-storage-daemon", e))?;
        let res = async {
            let qmp = connect_when_there(&sock, &mut child).await?;
            let root = "vs-del-top";
            let opts = serde_json::json!({
                "driver": "qcow2",
                "node-name": root,
                "file": { "driver": "file", "filename": m.top },
            });
            let top_fmt = if m.top == m.overlay {
                m.overlay_format.as_str()
            } else {
                "qcow2"
            };
            let mut opts = opts;
            opts["driver"] = top_fmt.into();
            qmp.execute("blockdev-add", Some(opts))
                .await
                .map_err(|e| ns("blockdev-add", e))?;
            commit_job(&qmp, m, root, &job_id(m), self.dom.conn.progress()).await?;
            let _ = qmp
                .execute(
                    "blockdev-del",
                    Some(serde_json::json!({ "node-name": root })),
                )
                .await;
            let _ = qmp.execute("quit", None).await;
            Ok::<(), snapshot_core::Error>(())
        }
        .await;
        stop_storage_daemon(&mut child).await;
        let _ = std::fs::remove_file(&sock);
        res?;
        failpoint("commit");
        Ok(())
    }
}

/// Waits up to 10 s for the storage daemon to quit, then kills it.
async fn stop_storage_daemon(child: &mut std::process::Child) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
}

/// The `qemu-storage-daemon` binary: `$VIRT_SNAP_QSD`, else on `PATH`.
fn storage_daemon() -> PathBuf {
    std::env::var_os("VIRT_SNAP_QSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-storage-daemon"))
}

/// The storage daemon's binary, if it can be run: a missing one fails before anything changed,
/// saying how to install it.
fn require_storage_daemon() -> Result<PathBuf> {
    let bin = storage_daemon();
    let found = if bin.components().count() > 1 {
        bin.is_file().then(|| bin.clone())
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(&bin))
                .find(|c| c.is_file())
        })
    };
    found.ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} is not installed: a shut-off domain's external snapshots are merged by it \
                 (Debian: apt-get install qemu-utils; or `cargo xtask deps`)",
                bin.display()
            ),
        )
    })
}

fn spawn_storage_daemon(sock: &Path) -> Result<std::process::Child> {
    let bin = require_storage_daemon()?;
    let mut cmd = std::process::Command::new(&bin);
    // It dies with virt-snap: a killed delete leaves no daemon holding the images (the next
    // command's recovery merges again in a new one).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.arg("--chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=vs-mon",
            sock.display()
        ))
        .args(["--monitor", "chardev=vs-mon"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} is not installed: a shut-off domain's external snapshots are \
                         merged by it (Debian: apt-get install qemu-utils; or `cargo xtask \
                         deps`)",
                        bin.display()
                    ),
                )
            } else {
                Error::caused_by(format!("cannot start {}", bin.display()), e)
            }
        })
}

/// How long a storage daemon may take to bring its monitor up: seconds on a loaded host
/// (10 s was once not enough under tests/history.rs with builds running).
const QSD_START: Duration = Duration::from_secs(30);

async fn connect_when_there(sock: &Path, child: &mut std::process::Child) -> CoreResult<QmpClient> {
    let end = Instant::now() + QSD_START;
    loop {
        if sock.exists() {
            if let Ok(q) = QmpClient::connect_unix(sock).await {
                return Ok(q);
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(snapshot_core::Error::not_started(
                "qemu-storage-daemon",
                format!("it ended at start ({st})"),
            ));
        }
        if Instant::now() > end {
            return Err(snapshot_core::Error::not_started(
                "qemu-storage-daemon",
                format!("its monitor did not come up in {} s", QSD_START.as_secs()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[async_trait]
impl core::Images for Deleting {
    async fn delete_internal_live(&self, tag: &str, disks: &[InternalDisk]) -> CoreResult<()> {
        let qmp = self.qmp().await?;
        let graph = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(|e| ns("query-named-block-nodes", e))?;
        let mut at = Vec::new();
        let mut backing = Vec::new();
        for d in disks {
            let top = self.top_of(&d.target).await.map_err(|e| ns(&d.target, e))?;
            let on_top = graph
                .iter()
                .any(|n| n.node_name.as_deref() == Some(&top) && same_image(&n.file, &d.image));
            if on_top {
                at.push(top);
            } else {
                let (node, graph) = named_chain_node(&qmp, &top, &d.image, &d.target).await?;
                backing.push(reopen_options(&graph, &node, &d.image, &d.target)?);
                at.push(node);
            }
        }
        // QEMU deletes an internal snapshot only in a node it has open read-write: a
        // backing node is reopened read-write for the job, and read-only again after it,
        // whatever the job's outcome.
        let reopen = |ro: bool| {
            let options = backing.iter().map(|o| o.clone().read_only(ro)).collect();
            qc::BlockdevReopen { options }
        };
        if !backing.is_empty() {
            qmp.run(&reopen(false))
                .await
                .map_err(|e| ns("blockdev-reopen", e))?;
            failpoint("reopen-rw");
        }
        let deleted = delete_internal_snapshot(&self.dom.conn, Some(&qmp), tag, &at).await;
        if !backing.is_empty() {
            let back = qmp.run(&reopen(true)).await;
            if let (Ok(()), Err(e)) = (&deleted, back) {
                return Err(be("blockdev-reopen (read-only again)", e));
            }
        }
        deleted?;
        failpoint("delete-internal");
        Ok(())
    }

    async fn delete_internal_offline(&self, tag: &str, disks: &[InternalDisk]) -> CoreResult<()> {
        let images: Vec<String> = disks.iter().map(|d| d.image.clone()).collect();
        delete_internal_snapshot(&self.dom.conn, None, tag, &images).await?;
        failpoint("delete-internal");
        Ok(())
    }

    async fn start_commit(&self, m: &Merge) -> CoreResult<()> {
        if m.mode == CommitMode::Offline {
            return Ok(());
        }
        let (qmp, root) = self.live_disk(&m.disk).await?;
        start_commit_job(&qmp, m, &root, &job_id(m)).await
    }

    async fn commit(&self, m: &Merge) -> CoreResult<()> {
        match m.mode {
            CommitMode::Active | CommitMode::Intermediate => self.commit_live(m).await,
            CommitMode::Offline => self.commit_offline(m).await,
        }
    }

    async fn stream(&self, st: &Stream) -> CoreResult<()> {
        match st.mode {
            StreamMode::Live => self.stream_live(st).await,
            StreamMode::Offline => self.stream_offline(st).await,
        }
    }

    async fn remove_overlay(&self, path: &str, backing: &str) -> CoreResult<()> {
        remove_overlay_file(path, backing)?;
        failpoint("remove-overlay");
        Ok(())
    }
}

#[async_trait]
impl snapshot_core::revert::Volumes for Deleting {
    async fn snapshot(&self, v: &PoolVolume, _: &str) -> CoreResult<()> {
        Err(snapshot_core::Error::backend(
            &v.volume,
            "a delete takes no volume snapshot",
        ))
    }

    async fn revert(&self, v: &PoolVolume, _: &str) -> CoreResult<()> {
        Err(snapshot_core::Error::backend(
            &v.volume,
            "a delete reverts no volume",
        ))
    }

    /// Shut off: under the volume's lease (as `vol-snapshot-delete`). Running: for the
    /// domain whose QEMU holds the volume, under the domain's operation lock (which this
    /// delete hands over for the call), never the volume's lease.
    async fn delete_snapshot(&self, v: &PoolVolume, name: &str) -> CoreResult<()> {
        failpoint("before-delete-volume-snapshot");
        delete_volume_snapshot(&self.dom, &self.op, v, name).await?;
        failpoint("delete-volume-snapshot");
        Ok(())
    }
}

#[async_trait]
impl snapshot_core::revert::Definition for Deleting {
    async fn set(&self, xml: &str) -> CoreResult<()> {
        let def = snapshot_core::DomainDef::from_xml(xml)?;
        self.dom
            .conn
            .definitions()
            .save(&def)
            .map_err(|e| be(&self.dom.name, e))?;
        failpoint("switch-definition");
        Ok(())
    }
}

/// What the planner asks, answered from the file system (and the pools' volumes, resolved
/// before planning).
struct FsFacts {
    volumes: std::collections::BTreeMap<(String, String), String>,
    /// Per directory read: each image file in it and its backing file (resolved).
    dirs: std::sync::Mutex<std::collections::BTreeMap<PathBuf, Vec<(PathBuf, String)>>>,
    /// The domain's overlay record: who made each overlay file (empty where there is none,
    /// or it cannot be read: then every file's name tells, as before the record existed).
    owners: snapshot_core::store::OverlayRecord,
}

impl FsFacts {
    /// Resolves the pool volumes the snapshots' copies of the definition name.
    async fn new(dom: &Domain, tree: &snapshot_core::SnapshotTree, store: &DomainStore) -> FsFacts {
        let mut volumes = std::collections::BTreeMap::new();
        for n in tree.topological() {
            let Some(raw) = tree.get(n.as_str()).and_then(|s| s.domain.as_ref()) else {
                continue;
            };
            let Ok(def) = snapshot_core::DomainDef::from_xml(raw.as_str()) else {
                continue;
            };
            for d in def.disks() {
                if let Some(snapshot_core::domain::SourceRef::Volume { pool, volume }) =
                    d.source_ref()
                {
                    let key = (pool.to_string(), volume.to_string());
                    if volumes.contains_key(&key) {
                        continue;
                    }
                    if let Ok(p) = dom.conn.pool(pool) {
                        if let Ok(path) = p.volume(volume).path().await {
                            volumes.insert(key, path);
                        }
                    }
                }
            }
        }
        let owners = store.overlays().unwrap_or_else(|e| {
            tracing::warn!(domain = %dom.name, "overlay record not read, names decide: {e}");
            Default::default()
        });
        FsFacts {
            volumes,
            dirs: Default::default(),
            owners,
        }
    }
}

impl Facts for FsFacts {
    fn exists(&self, path: &str) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn internal_snapshots(&self, image: &str) -> Vec<String> {
        image_formats::ImageInfo::open(Path::new(image), Some(image_formats::Format::Qcow2))
            .map(|i| {
                i.snapshots()
                    .iter()
                    .map(|s| String::from_utf8_lossy(&s.name).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn backing(&self, image: &str) -> Option<String> {
        let info = image_formats::ImageInfo::open(Path::new(image), None).ok()?;
        info.full_backing_filename()
    }

    fn backed_by(&self, image: &str) -> Vec<String> {
        let Some(dir) = Path::new(image).parent() else {
            return Vec::new();
        };
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let files = dirs.entry(dir.to_path_buf()).or_insert_with(|| {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return Vec::new();
            };
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| {
                    let p = e.path();
                    let b = image_formats::ImageInfo::open(&p, None)
                        .ok()?
                        .full_backing_filename()?;
                    Some((p, b))
                })
                .collect()
        });
        files
            .iter()
            .filter(|(p, b)| p != Path::new(image) && same_image(b, image))
            .map(|(p, _)| p.display().to_string())
            .collect()
    }

    fn volume_path(&self, pool: &str, volume: &str) -> Option<String> {
        self.volumes
            .get(&(pool.to_string(), volume.to_string()))
            .cloned()
    }

    fn backing_format(&self, image: &str) -> Option<String> {
        image_formats::ImageInfo::open(Path::new(image), None)
            .ok()?
            .backing_format()
    }

    fn owner(&self, path: &str) -> Option<snapshot_core::store::OverlayOwner> {
        if let Some(o) = self.owners.owner(path) {
            return Some(o.clone());
        }
        // The same file spelled differently.
        self.owners
            .overlays
            .iter()
            .find(|(p, _)| same_image(p, path))
            .map(|(_, o)| o.clone())
    }
}

fn caps(d: &Deleting) -> Capabilities<'_> {
    Capabilities {
        images: d,
        definition: d,
        volumes: d,
    }
}

/// Recovers the deletes a killed virt-snap left pending in `journal`, under the domain's
/// operation lock `op` (given back).
pub(crate) async fn recover(
    dom: &Domain,
    journal: &mut DomainJournal,
    store: &DomainStore,
    op: locking::Acquired,
) -> (Result<Vec<Recovered>>, Result<locking::Acquired>) {
    let d = Deleting::holding(dom, op);
    let r = core::recover(&caps(&d), journal, store).await;
    (r.map_err(Error::from), d.op.take().await)
}

impl Domain {
    /// Delete snapshot `name` (`virsh snapshot-delete`), with `flags` its descendants too or
    /// instead, or only their metadata: planned from the domain's state, its snapshot tree and
    /// the images, run step by step through the domain's journal under its operation lock
    /// (pending operations a killed virt-snap left are recovered first). Internal snapshots
    /// leave their images (through QEMU when it runs); external ones are merged by
    /// block-commit and their overlays removed (or, in a branch on virt-snap's own overlay,
    /// that overlay streamed up into its dependents by block-stream and removed); the files
    /// the user gave are never removed.
    /// docs/delete.md has the kinds and what a failure leaves.
    /// Long jobs (the merges, internal deletes through QEMU) report their progress to the
    /// connection's [`Progress`].
    pub async fn snapshot_delete(&self, name: &str, flags: DeleteFlags) -> Result<DeleteResult> {
        let t0 = Instant::now();
        let op = self.op_lock_to_change("snapshot delete").await?;
        let (recovered, op) = self.recover_captures(op).await;
        let op = op?;
        recovered?;
        let st = self.running_or_off()?;
        self.refuse_if_held(st.as_ref())?;
        let def = self.conn.definition(&self.name).ok();
        if st.is_none() && def.is_none() {
            return Err(self.record().err().unwrap_or_else(|| {
                Error::new(ErrorKind::NotRunning, "the domain is not running")
            }));
        }
        let sname = snapshot_core::SnapshotName::new(name)?;
        let store = self.snapshot_store()?;
        if !store.snapshot_path(&sname).exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("domain {:?} has no snapshot {name:?}", self.name),
            ));
        }
        let loaded = store.load()?;
        let info = {
            let live = self.live(st.as_ref()).await?;
            self.domain_info(&live, st.as_ref(), def.as_ref(), &store)
                .await?
        };
        let req = core::DeleteRequest { name: sname, flags };
        let facts = FsFacts::new(self, &loaded.tree, &store).await;
        let plan = DeletePlan::new(&req, &info, &loaded.tree, &facts)?;
        let offline = |s: &core::Step| match s {
            core::Step::Commit { merge, .. } => merge.mode == CommitMode::Offline,
            core::Step::Stream { stream, .. } => stream.mode == StreamMode::Offline,
            _ => false,
        };
        if plan.steps.iter().any(offline) {
            require_storage_daemon()?;
        }
        let mut journal = self.journal(&store)?;
        let d = Deleting::holding(self, op);
        let outcome = core::run(&plan, &caps(&d), &mut journal, &store).await;
        if let Err(e) = journal.compact() {
            tracing::warn!(domain = %self.name, "cannot compact the journal: {e}");
        }
        let outcome = outcome?;
        Ok(DeleteResult {
            deleted: plan.deleted.iter().map(|n| n.to_string()).collect(),
            kind: plan.kind,
            elapsed: t0.elapsed(),
            warnings: outcome.warnings,
        })
    }
}
