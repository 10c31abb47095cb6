//! Reverting a domain to one of its snapshots: snapshot-core's revert capability traits
//! implemented over the domain's QMP monitor, image-formats and the stored definition, and
//! [`Domain::snapshot_revert`]. See docs/revert.md.
//!
//! One `Reverting` serves one operation. Unlike a capture's, its QEMU may change under it
//! (a revert stops the domain and starts it again), so it connects to whichever QEMU runs
//! when a step needs one.

use super::capture::{
    add_overlay_node, be, crc, create_overlay_file, del_overlay_node, delete_internal_snapshot,
    file_node, lease_to_qemu, merge_back, remove_overlay_file, sweep_detached_nodes, JOB_TIMEOUT,
};
use super::ops::{delete_volume_snapshot, nodes_of, DomainQmp, OpLock};
use crate::domain::runstate;
use crate::domain::{Domain, DomainState};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{self, Unit};
use async_trait::async_trait;
use qmp_proto::commands::{self as qc, MigrationStatus};
use qmp_proto::commands::{BlockdevOptions, BlockdevReopen, BlockdevSnapshot, TransactionAction};
use qmp_proto::QmpClient;
use snapshot_core::capture::{OverlayAction, PoolVolume};
use snapshot_core::ops::{DomainJournal, Recovered};
use snapshot_core::revert::{self as core, Capabilities, Facts, InternalDisk, RevertPlan, Swap};
use snapshot_core::store::DomainStore;
use std::path::Path;
use std::time::{Duration, Instant};

pub use snapshot_core::revert::{RevertFlags, RevertKind};

type CoreResult<T> = snapshot_core::Result<T>;

/// What [`Domain::snapshot_revert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertResult {
    /// The snapshot reverted to (now the current one).
    pub name: String,
    /// How.
    pub kind: RevertKind,
    /// The domain's state after the revert.
    pub state: DomainState,
    /// How long the revert took, planning included.
    pub elapsed: Duration,
    /// What failed after the revert without undoing it (a resume, dropping the undo
    /// snapshot).
    pub warnings: Vec<String>,
}

/// A test-only failpoint: `VIRT_SNAP_FAILPOINT=revert:<effect>` aborts the process right
/// after the effect (`pause`, `load-internal`, `destroy`, `save-current`, `apply-internal`,
/// `create-overlay`, `switch-definition`, `start`, `load-memory`, `save-volume`,
/// `revert-volume`, `drop-volume-saved`; `before-drop-volume-saved` right before that delete),
/// as a kill would.
fn failpoint(name: &str) {
    super::ops::failpoint("revert", name);
}

/// The capabilities of one revert of one domain.
pub(crate) struct Reverting {
    dom: Domain,
    /// The connection to the QEMU that runs now (made on first use, dropped when it stops).
    qmp: DomainQmp,
    /// The domain's operation lock, lent to a backend call that takes it itself (an undo
    /// volume snapshot deleted while the reverted domain's QEMU runs).
    op: OpLock,
}

impl Reverting {
    /// Holding the domain's operation lock `op` (lent to backend calls, given back by
    /// `self.op.take()`).
    fn holding(dom: &Domain, op: locking::Acquired) -> Self {
        Reverting {
            dom: dom.clone(),
            qmp: DomainQmp::new(dom),
            op: OpLock::new(dom, "snapshot revert", Some(op)),
        }
    }

    /// The QMP connection to the running QEMU.
    async fn qmp(&self) -> CoreResult<QmpClient> {
        self.qmp.get().await
    }

    async fn up(&self) -> CoreResult<bool> {
        self.qmp.up()
    }

    /// The QEMU node names of `disks` (their current top nodes, by target).
    async fn nodes(&self, disks: &[InternalDisk]) -> CoreResult<Vec<String>> {
        let qmp = self.qmp().await?;
        let st = self.dom.running().map_err(|e| be(&self.dom.name, e))?;
        let blocks = crate::domain::block_devices(&qmp, &st)
            .await
            .map_err(|e| be("query-block", e))?;
        disks
            .iter()
            .map(|d| {
                blocks
                    .iter()
                    .find(|b| b.target == d.target)
                    .and_then(|b| b.node_name.clone())
                    .ok_or_else(|| {
                        snapshot_core::Error::backend(
                            d.target.as_str(),
                            "the running QEMU has no such disk",
                        )
                    })
            })
            .collect()
    }

    /// The run record names each disk's top (target, image, node) as QEMU has it now.
    fn record_tops<'a>(
        &self,
        tops: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> CoreResult<()> {
        let mut rec = self.dom.running().map_err(|e| be(&self.dom.name, e))?;
        for (t, image, node) in tops {
            if let Some(d) = rec.disks.iter_mut().find(|d| d.target == t) {
                d.source = image.into();
                d.node = Some(node.to_string());
                d.format = Some("qcow2".into());
            }
        }
        runstate::save(&self.dom.dir(), &rec).map_err(|e| be(&self.dom.name, e))
    }

    /// The internal-snapshot ops of the images, offline: refused while QEMU runs (its
    /// leases make the image operations refuse too).
    fn offline_images(&self, what: &str, disks: &[InternalDisk]) -> CoreResult<Vec<String>> {
        if self.dom.pid().map_err(|e| be(&self.dom.name, e))?.is_some() {
            return Err(snapshot_core::Error::backend(
                what,
                "the domain runs: its images are not changed offline",
            ));
        }
        Ok(disks.iter().map(|d| d.image.clone()).collect())
    }
}

#[async_trait]
impl core::Machine for Reverting {
    async fn pause(&self) -> CoreResult<()> {
        self.qmp()
            .await?
            .run(&qc::Stop)
            .await
            .map_err(|e| be("stop", e))?;
        failpoint("pause");
        Ok(())
    }

    async fn resume(&self) -> CoreResult<()> {
        self.qmp()
            .await?
            .run(&qc::Cont)
            .await
            .map_err(|e| be("cont", e))?;
        Ok(())
    }

    async fn is_up(&self) -> CoreResult<bool> {
        self.up().await
    }

    async fn is_running(&self) -> CoreResult<bool> {
        if !self.up().await? {
            return Ok(false);
        }
        Ok(self
            .qmp()
            .await?
            .run(&qc::QueryStatus)
            .await
            .map_err(|e| be("query-status", e))?
            .running)
    }

    async fn destroy(&self) -> CoreResult<()> {
        self.qmp.forget().await;
        match self.dom.destroy_locked().await {
            Ok(()) => {}
            // Stopped already: success.
            Err(e) if e.kind() == ErrorKind::NotRunning => {}
            Err(e) => return Err(be(&self.dom.name, e)),
        }
        failpoint("destroy");
        Ok(())
    }

    async fn start(&self, incoming: bool) -> CoreResult<()> {
        if self.up().await? {
            return Ok(());
        }
        self.qmp.forget().await;
        let conn = &self.dom.conn;
        let name = self.dom.name.as_str();
        let def = conn.definition(name).map_err(|e| be(name, e))?;
        let mut spec = conn.run_spec(&def).await.map_err(|e| be(name, e))?;
        spec.paused = true;
        if incoming {
            spec.extra_args.extend(["-incoming".into(), "defer".into()]);
        }
        conn.start_locked(&spec).await.map_err(|e| be(name, e))?;
        failpoint("start");
        Ok(())
    }

    async fn load_memory(&self, file: &str) -> CoreResult<()> {
        let qmp = self.qmp().await?;
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("file:{file}") })),
        )
        .await
        .map_err(|e| be("migrate-incoming", e))?;
        let p = self.dom.conn.progress();
        p.start(&format!("loading RAM from {file}"), Unit::Bytes);
        let loaded = async {
            let end = Instant::now() + JOB_TIMEOUT;
            loop {
                let info = qmp
                    .run(&qc::QueryMigrate)
                    .await
                    .map_err(|e| be("query-migrate", e))?;
                progress::migration(p, &info);
                match info.status {
                    Some(MigrationStatus::Completed) => break Ok(()),
                    Some(MigrationStatus::Failed) | Some(MigrationStatus::Cancelled) => {
                        return Err(snapshot_core::Error::backend(
                            file,
                            format!(
                                "the RAM state did not load: {}",
                                info.error_desc.as_deref().unwrap_or("(no reason given)")
                            ),
                        ))
                    }
                    _ if Instant::now() > end => {
                        return Err(snapshot_core::Error::backend(
                            file,
                            "the RAM state did not load in time",
                        ))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        .await;
        p.finish(loaded.is_ok());
        loaded?;
        failpoint("load-memory");
        Ok(())
    }

    async fn reset(&self) -> CoreResult<()> {
        self.qmp()
            .await?
            .execute("system_reset", None)
            .await
            .map_err(|e| be("system_reset", e))?;
        failpoint("reset-guest");
        Ok(())
    }
}

#[async_trait]
impl core::Images for Reverting {
    async fn create_overlay(
        &self,
        path: &str,
        backing: &str,
        backing_format: &str,
    ) -> CoreResult<()> {
        create_overlay_file(path, backing, backing_format, "qcow2")?;
        failpoint("create-overlay");
        Ok(())
    }

    async fn remove_overlay(&self, path: &str, backing: &str) -> CoreResult<()> {
        remove_overlay_file(path, backing)
    }

    async fn save_internal(&self, tag: &str, disks: &[InternalDisk]) -> CoreResult<()> {
        let conn = &self.dom.conn;
        // Replaced if it is there (a save that was interrupted): the tag is ours.
        delete_internal_snapshot(conn, None, tag, &self.offline_images(tag, disks)?).await?;
        for p in self.offline_images(tag, disks)? {
            conn.image(&p)
                .snapshot_create(tag.as_bytes())
                .map_err(|e| be(&p, e))?;
        }
        failpoint("save-current");
        Ok(())
    }

    async fn apply_internal(&self, tag: &str, disks: &[InternalDisk]) -> CoreResult<()> {
        let which = crate::image::SnapshotRef::Name(tag.as_bytes().to_vec());
        for p in self.offline_images(tag, disks)? {
            self.dom
                .conn
                .image(&p)
                .snapshot_apply(&which)
                .map_err(|e| be(&p, e))?;
        }
        failpoint("apply-internal");
        Ok(())
    }

    async fn load_internal(
        &self,
        tag: &str,
        disks: &[InternalDisk],
        vmstate: &InternalDisk,
    ) -> CoreResult<()> {
        let qmp = self.qmp().await?;
        let devices = self.nodes(disks).await?;
        let vm = self.nodes(std::slice::from_ref(vmstate)).await?.remove(0);
        let cmd = qc::SnapshotLoad {
            job_id: format!("vs-load-{:08x}", crc(tag)),
            tag: tag.to_string(),
            vmstate: vm,
            devices,
        };
        progress::job(
            self.dom.conn.progress(),
            &qmp,
            &cmd.job_id,
            &format!("loading snapshot {tag} (RAM and disks, from the images)"),
            qmp.run_job_command(&cmd, JOB_TIMEOUT),
        )
        .await
        .map_err(|e| be("snapshot-load", e))?;
        failpoint("load-internal");
        Ok(())
    }

    async fn add_node(&self, node: &str, path: &str) -> CoreResult<()> {
        let qmp = self.qmp().await?;
        let pid = self
            .dom
            .pid()
            .map_err(|e| be(&self.dom.name, e))?
            .ok_or_else(|| snapshot_core::Error::backend(node, "the domain is not running"))?;
        add_overlay_node(
            &self.dom.conn,
            &self.dom.name,
            pid,
            &qmp,
            node,
            path,
            "qcow2",
        )
        .await?;
        failpoint("add-overlay-node");
        Ok(())
    }

    async fn del_node(&self, node: &str) -> CoreResult<()> {
        if !self.up().await? {
            return Ok(());
        }
        let qmp = self.qmp().await?;
        del_overlay_node(&qmp, node).await?;
        // The old chain below a dropped top is detached too: closed with it.
        let closed = sweep_detached_nodes(&qmp).await;
        if !closed.is_empty() {
            tracing::debug!(domain = %self.dom.name, ?closed, "detached nodes closed");
        }
        Ok(())
    }

    async fn repoint(&self, swaps: &[Swap]) -> CoreResult<()> {
        let qmp = self.qmp().await?;
        // A snapshot's image off the current chain (another branch of the tree): opened
        // read-only first, on the node QEMU has of its backing image if it has one (shared:
        // the lower chain stays one node per image), else on the chain its header names.
        let nodes = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(|e| be("query-named-block-nodes", e))?;
        let mut opened: Vec<String> = Vec::new();
        for sw in swaps.iter().filter(|sw| sw.top_image != sw.base) {
            let has = !nodes_of(&nodes, &sw.base).is_empty();
            if has || opened.iter().any(|o| *o == branch_node_name(&sw.base)) {
                continue;
            }
            let r = self.open_branch_base(&qmp, &nodes, &sw.base).await;
            match r {
                Ok(node) => opened.push(node),
                Err(e) => {
                    for n in &opened {
                        let _ = del_overlay_node(&qmp, n).await;
                    }
                    return Err(e);
                }
            }
        }
        let actions = swaps
            .iter()
            .map(|sw| {
                TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                    node: sw.top.clone(),
                    overlay: sw.overlay.clone(),
                })
            })
            .collect();
        if let Err(e) = qmp.run(&qc::Transaction::new(actions)).await {
            for n in &opened {
                let _ = del_overlay_node(&qmp, n).await;
            }
            return Err(be("transaction", e));
        }
        // Each new overlay onto the node of the snapshot's image in the old chain (or the
        // one opened above).
        let nodes = qmp
            .run(&qc::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(|e| be("query-named-block-nodes", e))?;
        let mut options = Vec::new();
        for sw in swaps.iter().filter(|sw| sw.top_image != sw.base) {
            let found: Vec<&str> = nodes_of(&nodes, &sw.base)
                .into_iter()
                .filter(|n| *n != sw.overlay)
                .collect();
            let [base] = found[..] else {
                return Err(snapshot_core::Error::backend(
                    sw.disk.as_str(),
                    format!(
                        "QEMU has {} nodes of {}, not one: cannot re-point onto it",
                        found.len(),
                        sw.base
                    ),
                ));
            };
            options.push(
                BlockdevOptions::new("qcow2", &sw.overlay)
                    .set("file", file_node(&sw.overlay).as_str())
                    .backing(Some(base)),
            );
        }
        if !options.is_empty() {
            qmp.run(&BlockdevReopen { options })
                .await
                .map_err(|e| be("blockdev-reopen", e))?;
        }
        self.record_tops(
            swaps
                .iter()
                .map(|sw| (sw.disk.as_str(), sw.path.as_str(), sw.overlay.as_str())),
        )?;
        failpoint("repoint");
        Ok(())
    }

    async fn unpoint(&self, swaps: &[Swap]) -> CoreResult<()> {
        if !self.up().await? {
            return Ok(());
        }
        let qmp = self.qmp().await?;
        let blocks = qmp
            .run(&qc::QueryBlock)
            .await
            .map_err(|e| be("query-block", e))?;
        let on_top: Vec<&Swap> = swaps
            .iter()
            .filter(|sw| {
                blocks.iter().any(|b| {
                    b.inserted.as_ref().and_then(|i| i.node_name.as_deref())
                        == Some(sw.overlay.as_str())
                })
            })
            .collect();
        if !on_top.is_empty() {
            // Backed by the old top again, then merged back into it (it is empty).
            let options = on_top
                .iter()
                .map(|sw| {
                    BlockdevOptions::new("qcow2", &sw.overlay)
                        .set("file", file_node(&sw.overlay).as_str())
                        .backing(Some(&sw.top))
                })
                .collect();
            qmp.run(&BlockdevReopen { options })
                .await
                .map_err(|e| be("blockdev-reopen", e))?;
            let actions: Vec<OverlayAction> = on_top
                .iter()
                .map(|sw| OverlayAction {
                    disk: sw.disk.clone(),
                    node: sw.top.clone(),
                    overlay: sw.overlay.clone(),
                })
                .collect();
            merge_back(&qmp, &actions).await?;
        }
        self.record_tops(
            swaps
                .iter()
                .map(|sw| (sw.disk.as_str(), sw.top_image.as_str(), sw.top.as_str())),
        )?;
        Ok(())
    }

    async fn delete_internal(&self, tag: &str, disks: &[InternalDisk]) -> CoreResult<()> {
        if self.up().await? {
            let qmp = self.qmp().await?;
            let nodes = self.nodes(disks).await?;
            delete_internal_snapshot(&self.dom.conn, Some(&qmp), tag, &nodes).await
        } else {
            let images = self.offline_images(tag, disks)?;
            delete_internal_snapshot(&self.dom.conn, None, tag, &images).await
        }
    }
}

impl Reverting {
    /// Opens image `base` (its format read from its header) read-only as node `rv-b-<hash>`
    /// on protocol node `rv-b-<hash>-f`; its backing is the node QEMU has of the image its
    /// header names, if it has exactly one, else QEMU opens the chain from the header. Its
    /// lease (shared) is handed to QEMU with it.
    async fn open_branch_base(
        &self,
        qmp: &QmpClient,
        nodes: &[qc::BlockDeviceInfo],
        base: &str,
    ) -> CoreResult<String> {
        let node = branch_node_name(base);
        let pid = self
            .dom
            .pid()
            .map_err(|e| be(&self.dom.name, e))?
            .ok_or_else(|| snapshot_core::Error::backend(base, "the domain is not running"))?;
        let fnode = file_node(&node);
        let chain = image_formats::backing_chain(Path::new(base), None, Default::default())
            .map_err(|e| be(base, e))?;
        let format = chain[0].format().as_str();
        let below = chain.get(1).map(|i| i.filename.clone());
        let shared = below.as_deref().and_then(|b| match nodes_of(nodes, b)[..] {
            [one] => Some(one.to_string()),
            _ => None,
        });
        // Its lease (shared: read-only), handed to QEMU as the node's, unless this domain
        // holds it already (an image its QEMU was started on keeps its lease until QEMU
        // exits).
        let ours = self
            .dom
            .conn
            .inner()
            .locks
            .holders(&locking::Resource::file(base))
            .map_err(|e| be(base, e))?
            .iter()
            .any(|h| h.holder == locking::Holder::Domain(self.dom.name.clone()));
        if !ours {
            lease_to_qemu(&self.dom.conn, &self.dom.name, pid, qmp, &node, base, true).await?;
        }
        if let Err(e) = qmp
            .run(&qc::BlockdevAdd(
                BlockdevOptions::new(
                    crate::domain::argv::protocol_driver(Path::new(base)),
                    &fnode,
                )
                .set("filename", base),
            ))
            .await
        {
            let _ = del_overlay_node(qmp, &node).await;
            return Err(be("blockdev-add", e));
        }
        let mut fmt = BlockdevOptions::new(format, &node)
            .set("file", fnode.as_str())
            .read_only(true);
        if let (Some(b), false) = (&shared, format == "raw") {
            fmt = fmt.backing(Some(b));
        }
        if let Err(e) = qmp.run(&qc::BlockdevAdd(fmt)).await {
            let _ = del_overlay_node(qmp, &node).await;
            return Err(be("blockdev-add", e));
        }
        Ok(node)
    }

    /// The facade's handle of pool volume `v`, and its name for messages.
    fn volume(&self, v: &PoolVolume) -> CoreResult<(crate::pool::Volume, String)> {
        let obj = format!("{}/{}", v.pool, v.volume);
        let pool = self.dom.conn.pool(&v.pool).map_err(|e| be(&obj, e))?;
        Ok((pool.volume(&v.volume), obj))
    }
}

/// The node a revert opens for a snapshot image `base` off the disk's current chain.
fn branch_node_name(base: &str) -> String {
    format!("rv-b-{:08x}", crc(base))
}

/// The storage disks' volumes, through their pools' backends with each volume's lease (the
/// domain is stopped first: its leases are free; a QEMU holding one makes the backend refuse
/// with "in use").
#[async_trait]
impl core::Volumes for Reverting {
    async fn snapshot(&self, v: &PoolVolume, name: &str) -> CoreResult<()> {
        let (vol, obj) = self.volume(v)?;
        vol.create_snapshot(name, &Default::default())
            .await
            .map_err(|e| be(&obj, e))?;
        failpoint("save-volume");
        Ok(())
    }

    async fn revert(&self, v: &PoolVolume, name: &str) -> CoreResult<()> {
        let (vol, obj) = self.volume(v)?;
        vol.revert(name).await.map_err(|e| be(&obj, e))?;
        failpoint("revert-volume");
        Ok(())
    }

    /// Shut off, under the volume's lease; while the reverted domain's QEMU runs (a
    /// snapshot with RAM, loaded before the undo snapshots are dropped), for the domain.
    async fn delete_snapshot(&self, v: &PoolVolume, name: &str) -> CoreResult<()> {
        failpoint("before-drop-volume-saved");
        delete_volume_snapshot(&self.dom, &self.op, v, name).await?;
        failpoint("drop-volume-saved");
        Ok(())
    }
}

#[async_trait]
impl core::Definition for Reverting {
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

/// What the planner asks, answered from the file system; the pool volumes the snapshot's
/// copy of the definition names, resolved beforehand (a pool lookup is async).
struct FsFacts {
    volumes: std::collections::HashMap<(String, String), String>,
    /// The volume snapshots of the domain's disks' pool volumes.
    volume_snapshots: std::collections::HashMap<(String, String), Vec<String>>,
}

impl Facts for FsFacts {
    fn exists(&self, path: &str) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn backing_chain(&self, image: &str) -> Vec<String> {
        let chain = image_formats::backing_chain(Path::new(image), None, Default::default());
        chain
            .map(|c| {
                c.iter()
                    .skip(1)
                    .flat_map(|i| {
                        // As recorded and as the canonical path, so that either spelling of
                        // the snapshot's image matches.
                        let canon = std::fs::canonicalize(&i.filename)
                            .map(|p| p.display().to_string())
                            .ok();
                        std::iter::once(i.filename.clone()).chain(canon)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn volume_path(&self, pool: &str, volume: &str) -> Option<String> {
        self.volumes
            .get(&(pool.to_string(), volume.to_string()))
            .cloned()
    }

    fn volume_snapshots(&self, pool: &str, volume: &str) -> Option<Vec<String>> {
        self.volume_snapshots
            .get(&(pool.to_string(), volume.to_string()))
            .cloned()
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
}

fn caps(r: &Reverting) -> Capabilities<'_> {
    Capabilities {
        machine: r,
        images: r,
        definition: r,
        volumes: r,
    }
}

/// Recovers the reverts a killed virt-snap left pending in `journal`, under the domain's
/// operation lock `op` (given back).
pub(crate) async fn recover(
    dom: &Domain,
    journal: &mut DomainJournal,
    store: &DomainStore,
    op: locking::Acquired,
) -> (Result<Vec<Recovered>>, Result<locking::Acquired>) {
    let r = Reverting::holding(dom, op);
    let out = core::recover(&caps(&r), journal, store).await;
    (out.map_err(Error::from), r.op.take().await)
}

impl Domain {
    /// The names of the volume snapshots of each pool volume among `disks` (a volume that
    /// cannot be listed is left out: the planner then refuses a storage disk on it).
    async fn disk_volume_snapshots(
        &self,
        disks: &[snapshot_core::capture::DomainDisk],
    ) -> std::collections::HashMap<(String, String), Vec<String>> {
        let mut out = std::collections::HashMap::new();
        for v in disks.iter().filter_map(|d| d.volume.as_ref()) {
            if let Ok(p) = self.conn.pool(&v.pool) {
                if let Ok(snaps) = p.volume(&v.volume).snapshots().await {
                    out.insert(
                        (v.pool.clone(), v.volume.clone()),
                        snaps.into_iter().map(|s| s.name).collect(),
                    );
                }
            }
        }
        out
    }

    /// The files of the pool volumes `snap`'s copy of the definition names as disk sources
    /// (a volume that cannot be resolved is left out: the planner then refuses its disk).
    async fn snapshot_volumes(
        &self,
        snap: &snapshot_core::DomainSnapshot,
    ) -> std::collections::HashMap<(String, String), String> {
        let mut out = std::collections::HashMap::new();
        let Some(copy) = snap
            .domain
            .as_ref()
            .and_then(|raw| snapshot_core::domain::DomainDef::from_xml(raw.as_str()).ok())
        else {
            return out;
        };
        for d in copy.disks() {
            if let Some(snapshot_core::domain::SourceRef::Volume { pool, volume }) = d.source_ref()
            {
                if let Ok(p) = self.conn.pool(pool) {
                    if let Ok(path) = p.volume(volume).path().await {
                        out.insert((pool.to_string(), volume.to_string()), path);
                    }
                }
            }
        }
        out
    }

    /// Revert the domain to snapshot `name` (`virsh snapshot-revert`): planned from the
    /// domain's state and the snapshot's metadata, run step by step through the domain's
    /// journal under its operation lock (pending operations a killed virt-snap left are
    /// recovered first). A failure before the commit point undoes what was done: the domain
    /// ends as it was. Afterwards the snapshot is current. docs/revert.md has the kinds.
    pub async fn snapshot_revert(&self, name: &str, flags: RevertFlags) -> Result<RevertResult> {
        let t0 = Instant::now();
        let op = self.op_lock_to_change("snapshot revert").await?;
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
        let store = self.snapshot_store()?;
        let sname = snapshot_core::SnapshotName::new(name)?;
        if !store.snapshot_path(&sname).exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("domain {:?} has no snapshot {name:?}", self.name),
            ));
        }
        let snap = store.read(&sname)?;
        let info = {
            let live = self.live(st.as_ref()).await?;
            self.domain_info(&live, st.as_ref(), def.as_ref(), &store)
                .await?
        };
        let req = core::RevertRequest { name: sname, flags };
        let facts = FsFacts {
            volumes: self.snapshot_volumes(&snap).await,
            volume_snapshots: self.disk_volume_snapshots(&info.disks).await,
        };
        let plan = RevertPlan::new(&req, &info, &snap, &facts)?;
        let mut journal = self.journal(&store)?;
        let r = Reverting::holding(self, op);
        let outcome = core::run(&plan, &caps(&r), &mut journal, &store).await;
        if let Err(e) = journal.compact() {
            tracing::warn!(domain = %self.name, "cannot compact the journal: {e}");
        }
        let outcome = outcome?;
        // The lock kept to the end; the QMP connection to the QEMU the revert used dropped.
        let _op = r.op.take().await;
        drop(r);
        let state = match self.running_or_off()? {
            None => DomainState::ShutOff,
            Some(st) => {
                let qmp = self.qmp(&st).await?;
                let status = qmp.run(&qc::QueryStatus).await?;
                match status.status {
                    qc::RunState::InternalError | qc::RunState::GuestPanicked => {
                        DomainState::Crashed
                    }
                    _ if status.running => DomainState::Running,
                    _ => DomainState::Paused,
                }
            }
        };
        Ok(RevertResult {
            name: plan.name.to_string(),
            kind: plan.kind,
            state,
            elapsed: t0.elapsed(),
            warnings: outcome.warnings,
        })
    }
}
