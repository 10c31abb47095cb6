//! Cluster-wide leases in etcd ([`EtcdBackend`]), for VMs whose images live on storage that
//! several hosts share. Only etcd's v3 API as etcd 3.4 serves it is used (KV ranges, `Txn`
//! with range compares, leases).
//!
//! # Keys
//!
//! Under the configured prefix `P` (default `/virt-snap`), for a resource whose key hashes to
//! `H` (the local lockspace's file name, [`ResourceKey::hash`]):
//!
//! | key | value | attached to |
//! |---|---|---|
//! | `P/leases/H/x` | the exclusive holder's [`HolderRecord`] (JSON) | the holder's etcd lease |
//! | `P/leases/H/s/<lease id, 16 hex>` | one shared holder's record | that holder's etcd lease |
//! | `P/commits/H` | the last commit made under a lease: token, host, what | nothing |
//!
//! An exclusive grant is one `Txn`: *if* no key under `P/leases/H/` exists (a range compare,
//! `create_revision == 0` over the prefix) *then* put `x`, *else* read the prefix (the
//! refusal names the holders). A shared grant compares `x` alone. Every holder key is
//! attached to an etcd lease with a TTL: when its holder stops renewing it (crashed, fenced,
//! cut off), etcd deletes the key after the TTL. The grant's revision, which is the key's
//! `create_revision`, is the **fencing token**: it only grows, and a later holder's key has
//! a larger one. A commit under a lease ([`EtcdBackend`]'s `commit`) is one `Txn` that
//! compares each key's `create_revision` with the token it was granted and records the
//! commit: a holder whose lease expired, even if it does not know it yet, is refused.
//!
//! # Liveness without a daemon
//!
//! This process renews the etcd leases it holds (a task on the backend's own runtime, every
//! TTL/4). A lease handed over to a VM ([`HeldLease::hand_over`]) is renewed by the domain's
//! keeper process instead ([`keep`]: given the [`Ticket`]s, it renews until QEMU exits, then
//! revokes, or tells its caller to fence the VM when it could not renew for half the TTL).

use crate::lease::{HeldLease, LeaseBackend};
use crate::record::{Holder, HolderRecord, Mode};
use crate::resource::ResourceKey;
use crate::Error;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/virt-snap";
/// The default lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// How long one request to etcd may take before the lockspace counts as unreachable.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and how: parsed from `etcd://HOST:PORT[,HOST:PORT...][/PREFIX][?ttl=SECS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// The key prefix, without a trailing `/` (default [`DEFAULT_PREFIX`]).
    pub prefix: String,
    /// The TTL of each lease (default [`DEFAULT_TTL`]; etcd's minimum is a few seconds).
    pub ttl: Duration,
    /// The time one request may take (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// The host name written into holder records.
    pub host: String,
}

impl EtcdConfig {
    /// Parse an `etcd://` URL; `host` is this host's identity in the cluster.
    pub fn parse(url: &str, host: &str) -> Result<EtcdConfig, Error> {
        let bad = |why: &str| Error::invalid(url, format!("not an etcd lockspace URL: {why}"));
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it must start with etcd://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let Some((name, port)) = h.rsplit_once(':') else {
                return Err(bad(&format!("endpoint {h:?} has no :PORT")));
            };
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(&format!("endpoint {h:?} is not HOST:PORT")));
            }
            endpoints.push(format!("http://{h}"));
        }
        let mut ttl = DEFAULT_TTL;
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            match kv.split_once('=') {
                Some(("ttl", v)) => {
                    let secs: u64 = v.parse().map_err(|_| bad("ttl must be whole seconds"))?;
                    if !(2..=3600).contains(&secs) {
                        return Err(bad("ttl must be 2 to 3600 seconds"));
                    }
                    ttl = Duration::from_secs(secs);
                }
                _ => return Err(bad(&format!("unknown parameter {kv:?} (only ttl=SECS)"))),
            }
        }
        if host.is_empty() || host.contains('/') {
            return Err(Error::invalid(
                host,
                "a host name must be non-empty, without '/'",
            ));
        }
        Ok(EtcdConfig {
            endpoints,
            prefix: if prefix.is_empty() {
                DEFAULT_PREFIX.to_string()
            } else {
                prefix.to_string()
            },
            ttl,
            timeout: DEFAULT_TIMEOUT,
            host: host.to_string(),
        })
    }

    /// Enough to renew or revoke a [`Ticket`]'s lease (leases need no prefix nor host).
    fn of_ticket(t: &Ticket, ttl: Duration, timeout: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints: t.endpoints.clone(),
            prefix: String::new(),
            ttl,
            timeout,
            host: String::new(),
        }
    }

    /// `etcd://h1:p1,h2:p2/prefix`, for messages.
    pub fn url(&self) -> String {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        format!("etcd://{}{}", hosts.join(","), self.prefix)
    }

    fn lease_prefix(&self, key: &ResourceKey) -> String {
        self.prefix_of(&key.hash())
    }
    fn prefix_of(&self, hash: &str) -> String {
        format!("{}/leases/{hash}/", self.prefix)
    }
    fn commit_key(&self, hash: &str) -> String {
        format!("{}/commits/{hash}", self.prefix)
    }
    fn unavailable(&self, op: &str, why: impl std::fmt::Display) -> Error {
        Error::unavailable(
            format!("etcd lockspace {}", self.url()),
            op,
            format!("{why} (within {:.1} s)", self.timeout.as_secs_f64()),
        )
    }
}

/// A fencing token to commit under: the resource (its key's hash, as the lease is named, and
/// its name for messages) and the token its lease was granted with. Serialisable, so that a
/// domain's tokens can be recorded when it starts and checked by later commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// [`ResourceKey::hash`].
    pub hash: String,
    /// [`ResourceKey::display`].
    pub resource: String,
    /// The token.
    pub token: u64,
}

impl Fence {
    /// The fence of `key`'s lease granted with `token`.
    pub fn new(key: &ResourceKey, token: u64) -> Fence {
        Fence {
            hash: key.hash(),
            resource: key.display().to_string(),
            token,
        }
    }
}

/// What a keeper needs to renew one etcd lease: serialisable, so that it can be passed to
/// another process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The members' `http://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// The etcd lease id.
    pub lease: i64,
    /// The TTL it was granted with, in milliseconds.
    pub ttl_ms: u64,
}

/// The connection and the runtime it runs on. Requests from synchronous callers (the
/// [`LeaseBackend`] trait) are spawned here and waited for over a channel, so they may be
/// made from inside another tokio runtime too.
struct Shared {
    cfg: EtcdConfig,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    /// The member requests go to, and its client (see [`Endpoints`]).
    members: tokio::sync::Mutex<Endpoints>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("cfg", &self.cfg).finish()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Allowed from inside another runtime (a plain drop of a runtime is not).
        if let Some(rt) = self.rt.lock().unwrap_or_else(|e| e.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

/// One member at a time: a client of a single member that accepted a TCP connection,
/// moved on to the next member when a request to it fails. (A client balanced over all the
/// members keeps sending some requests to a member that died, which then fail.)
#[derive(Default)]
struct Endpoints {
    next: usize,
    client: Option<Client>,
}

impl Endpoints {
    /// The current member's client, or the first member from the next one on that accepts
    /// a connection.
    async fn client(&mut self, cfg: &EtcdConfig) -> Result<Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let n = cfg.endpoints.len();
        let mut why = String::from("no endpoints");
        for i in 0..n {
            let idx = (self.next + i) % n;
            let ep = &cfg.endpoints[idx];
            let addr = ep.trim_start_matches("http://");
            let probe = tokio::time::timeout(
                cfg.timeout.min(Duration::from_secs(1)),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            match probe {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    why = format!("{addr}: {e}");
                    continue;
                }
                Err(_) => {
                    why = format!("{addr}: no answer");
                    continue;
                }
            }
            let opts = ConnectOptions::new()
                .with_connect_timeout(cfg.timeout)
                .with_timeout(cfg.timeout)
                .with_keep_alive(Duration::from_secs(2), cfg.timeout);
            match Client::connect([ep.as_str()], Some(opts)).await {
                Ok(c) => {
                    self.next = idx;
                    self.client = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => why = format!("{addr}: {e}"),
            }
        }
        Err(why)
    }

    /// A request to the current member failed: use the next one from now on.
    fn failed(&mut self) {
        if self.client.take().is_some() {
            self.next += 1;
        }
    }
}

impl Shared {
    async fn client(&self) -> Result<Client, String> {
        self.members.lock().await.client(&self.cfg).await
    }

    async fn failed(&self) {
        self.members.lock().await.failed();
    }

    /// Run `f` on the backend's runtime, waiting at most the configured timeout. A failure
    /// to reach the member moves later requests on to the next member.
    fn run<T, F>(
        self: &Arc<Self>,
        op: &str,
        f: impl FnOnce(Arc<Shared>, Client) -> F + Send + 'static,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let (sh, what) = (self.clone(), op.to_string());
        let fut = async move {
            let c = sh
                .client()
                .await
                .map_err(|e| sh.cfg.unavailable(&what, e))?;
            f(sh, c).await
        };
        let limit = self.cfg.timeout;
        let op_owned = op.to_string();
        let me = self.clone();
        self.handle.spawn(async move {
            let r = match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Err(me.cfg.unavailable(&op_owned, "no answer")),
            };
            if r.as_ref()
                .is_err_and(|e| e.kind() == crate::ErrorKind::Unavailable)
            {
                me.failed().await;
            }
            let _ = tx.send(r);
        });
        rx.recv_timeout(limit + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(self.cfg.unavailable(op, "no answer")))
    }

    /// `f` (one [`Shared::run`]), tried once more, on the next member, when the first one
    /// could not be reached (a member killed since the last request): within twice the
    /// timeout in all.
    fn twice<T>(&self, mut f: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
        match f() {
            Err(e) if e.kind() == crate::ErrorKind::Unavailable && self.cfg.endpoints.len() > 1 => {
                f()
            }
            r => r,
        }
    }
}

fn etcd_err<'a>(cfg: &'a EtcdConfig, op: &str) -> impl Fn(etcd_client::Error) -> Error + 'a {
    let op = op.to_string();
    move |e| cfg.unavailable(&op, e)
}

fn records(kvs: &[etcd_client::KeyValue]) -> Vec<HolderRecord> {
    kvs.iter()
        .filter_map(|kv| {
            let mut r: HolderRecord = serde_json::from_slice(kv.value()).ok()?;
            r.token = Some(kv.create_revision() as u64);
            Some(r)
        })
        .collect()
}

/// Leases in an etcd cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EtcdBackend {
    shared: Arc<Shared>,
}

impl EtcdBackend {
    /// A backend for `cfg`. Connects lazily, on the first request.
    pub fn new(cfg: EtcdConfig) -> Result<EtcdBackend, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("virt-snap-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the etcd client's runtime", "", e))?;
        let handle = rt.handle().clone();
        Ok(EtcdBackend {
            shared: Arc::new(Shared {
                cfg,
                rt: Mutex::new(Some(rt)),
                handle,
                members: tokio::sync::Mutex::new(Endpoints::default()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EtcdConfig {
        &self.shared.cfg
    }

    /// Commit under fencing tokens: one etcd transaction that checks, for each `(resource,
    /// token)`, that the holder key granted with `token` still exists with that very
    /// `create_revision`, and records `what` as the resource's last commit. Refused with
    /// [`crate::ErrorKind::LeaseLost`] (naming today's holders) when one is not current.
    pub fn commit(&self, fences: &[Fence], what: &str) -> Result<(), Error> {
        if fences.is_empty() {
            return Ok(());
        }
        self.shared.twice(|| {
            let fences = fences.to_vec();
            let what = what.to_string();
            self.shared
                .run("commit under a lease", move |sh, mut c| async move {
                    let cfg = &sh.cfg;
                    let err = etcd_err(cfg, "commit under a lease");
                    let mut compares = Vec::new();
                    let mut puts = Vec::new();
                    for Fence {
                        hash,
                        resource,
                        token,
                    } in &fences
                    {
                        let prefix = cfg.prefix_of(hash);
                        let r = c
                            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                            .await
                            .map_err(&err)?;
                        let Some(kv) = r
                            .kvs()
                            .iter()
                            .find(|kv| kv.create_revision() as u64 == *token)
                        else {
                            return Err(Error::lease_lost(resource, *token, records(r.kvs())));
                        };
                        compares.push(Compare::create_revision(
                            kv.key().to_vec(),
                            CompareOp::Equal,
                            *token as i64,
                        ));
                        let rec = serde_json::json!({
                            "token": token,
                            "host": cfg.host,
                            "what": what,
                            "pid": std::process::id(),
                            "at": crate::record::rfc3339(std::time::SystemTime::now()),
                        });
                        puts.push(TxnOp::put(cfg.commit_key(hash), rec.to_string(), None));
                    }
                    let r = c
                        .txn(Txn::new().when(compares).and_then(puts))
                        .await
                        .map_err(&err)?;
                    if r.succeeded() {
                        return Ok(());
                    }
                    // Lost between the read and the transaction: say to whom.
                    let f = &fences[0];
                    let now = c
                        .get(
                            cfg.prefix_of(&f.hash),
                            Some(GetOptions::new().with_prefix()),
                        )
                        .await
                        .map(|r| records(r.kvs()))
                        .unwrap_or_default();
                    Err(Error::lease_lost(&f.resource, f.token, now))
                })
        })
    }

    fn revoke(&self, lease: i64) {
        let r = self
            .shared
            .run("revoke a lease", move |sh, mut c| async move {
                revoke_one(&mut c, lease)
                    .await
                    .map_err(|e| sh.cfg.unavailable("revoke a lease", e))
            });
        if let Err(e) = r {
            tracing_like_warn(&format!("{e}; the lease expires on its own within its TTL"));
        }
    }
}

/// Revoke `lease`; one that expired already (etcd: "lease not found") is the same outcome.
async fn revoke_one(c: &mut Client, lease: i64) -> Result<(), etcd_client::Error> {
    match c.lease_revoke(lease).await {
        Ok(_) => Ok(()),
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The locking crate does not depend on a logging framework: warnings go to stderr only when
/// `VIRT_SNAP_LOCKING_DEBUG` is set.
fn tracing_like_warn(msg: &str) {
    if std::env::var_os("VIRT_SNAP_LOCKING_DEBUG").is_some() {
        eprintln!("locking: {msg}");
    }
}

/// Renew `lease` every TTL/4 until `stop` is set; a renewal answered with TTL 0 (the lease
/// expired or was revoked) sets `lost`.
async fn renew_loop(sh: Arc<Shared>, lease: i64, stop: Arc<AtomicBool>, lost: Arc<AtomicBool>) {
    let every = (sh.cfg.ttl / 4).max(Duration::from_millis(250));
    // One attempt may not take longer than a quarter of the TTL: a member that died keeps
    // a stream open but never answers.
    let limit = (sh.cfg.ttl / 4).clamp(Duration::from_millis(200), sh.cfg.timeout);
    let mut keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut wait = every;
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(wait).await;
        if stop.load(Ordering::Acquire) {
            break;
        }
        let attempt = async {
            if keeper.is_none() {
                let mut c = sh.client().await.ok()?;
                keeper = Some(c.lease_keep_alive(lease).await.ok()?);
            }
            let (k, s) = keeper.as_mut()?;
            k.keep_alive().await.ok()?;
            s.message().await.ok()?
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(Some(r)) if r.ttl() <= 0 => {
                lost.store(true, Ordering::Release);
                break;
            }
            Ok(Some(_)) => wait = every,
            _ => {
                // Try the next member soon.
                keeper = None;
                sh.failed().await;
                wait = Duration::from_millis(100);
            }
        }
    }
}

impl LeaseBackend for EtcdBackend {
    fn try_acquire(
        &self,
        key: &ResourceKey,
        mode: Mode,
        holder: &Holder,
    ) -> Result<Box<dyn HeldLease>, Error> {
        let mut rec = HolderRecord::now(holder, mode, key.display());
        rec.host = self.shared.cfg.host.clone();
        let value = serde_json::to_string(&rec)
            .map_err(|e| Error::io("encode holder record", "", std::io::Error::other(e)))?;
        let (lease, token, etcd_key) = self.shared.twice(|| {
            let (k, value) = (key.clone(), value.clone());
            self.shared
                .run("acquire a lease", move |sh, mut c| async move {
                    let cfg = &sh.cfg;
                    let err = etcd_err(cfg, "acquire a lease");
                    let ttl = cfg.ttl.as_secs().max(1) as i64;
                    let lease = c.lease_grant(ttl, None).await.map_err(&err)?.id();
                    let prefix = cfg.lease_prefix(&k);
                    let (cmp, mine) = match mode {
                        Mode::Exclusive => (
                            Compare::create_revision(prefix.clone(), CompareOp::Equal, 0)
                                .with_prefix(),
                            format!("{prefix}x"),
                        ),
                        Mode::Shared => (
                            Compare::create_revision(format!("{prefix}x"), CompareOp::Equal, 0),
                            format!("{prefix}s/{lease:016x}"),
                        ),
                    };
                    let txn = Txn::new()
                        .when([cmp])
                        .and_then([TxnOp::put(
                            mine.clone(),
                            value,
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(
                            prefix.clone(),
                            Some(GetOptions::new().with_prefix()),
                        )]);
                    let r = match c.txn(txn).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = c.lease_revoke(lease).await;
                            return Err(err(e));
                        }
                    };
                    if r.succeeded() {
                        let token = r.header().map(|h| h.revision()).unwrap_or_default() as u64;
                        return Ok((lease, token, mine));
                    }
                    let _ = c.lease_revoke(lease).await;
                    let mut holders = Vec::new();
                    for op in r.op_responses() {
                        if let TxnOpResponse::Get(g) = op {
                            holders.extend(records(g.kvs()));
                        }
                    }
                    // A shared request is refused by the exclusive holder only.
                    if mode == Mode::Shared {
                        holders.retain(|h| h.mode == Mode::Exclusive);
                    }
                    Err(Error::conflict(k.display(), holders))
                })
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        self.shared.handle.spawn(renew_loop(
            self.shared.clone(),
            lease,
            stop.clone(),
            lost.clone(),
        ));
        rec.token = Some(token);
        Ok(Box::new(EtcdLease {
            backend: self.clone(),
            key: key.clone(),
            mode,
            lease,
            token,
            etcd_key,
            record: rec,
            stop,
            lost,
            handed: false,
        }))
    }

    fn holders(&self, key: &ResourceKey) -> Result<Vec<HolderRecord>, Error> {
        self.shared.twice(|| {
            let k = key.clone();
            self.shared
                .run("read lease holders", move |sh, mut c| async move {
                    let err = etcd_err(&sh.cfg, "read lease holders");
                    let r = c
                        .get(
                            sh.cfg.lease_prefix(&k),
                            Some(GetOptions::new().with_prefix()),
                        )
                        .await
                        .map_err(&err)?;
                    Ok(records(r.kvs()))
                })
        })
    }

    fn describe(&self) -> String {
        format!("etcd lockspace {}", self.shared.cfg.url())
    }

    fn commit(&self, fences: &[Fence], what: &str) -> Result<(), Error> {
        EtcdBackend::commit(self, fences, what)
    }

    fn host(&self) -> Option<&str> {
        Some(&self.shared.cfg.host)
    }
}

/// A lease held in etcd: its key, attached to an etcd lease this process renews until the
/// lease is dropped (revoked) or handed over (then the domain's keeper renews it).
#[derive(Debug)]
pub struct EtcdLease {
    backend: EtcdBackend,
    key: ResourceKey,
    mode: Mode,
    lease: i64,
    token: u64,
    etcd_key: String,
    record: HolderRecord,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    handed: bool,
}

impl EtcdLease {
    /// Has a renewal found the lease gone?
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl HeldLease for EtcdLease {
    fn key(&self) -> &ResourceKey {
        &self.key
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn token(&self) -> Option<u64> {
        Some(self.token)
    }
    fn ticket(&self) -> Option<Ticket> {
        Some(Ticket {
            endpoints: self.backend.shared.cfg.endpoints.clone(),
            lease: self.lease,
            ttl_ms: self.backend.shared.cfg.ttl.as_millis() as u64,
        })
    }
    fn hand_over(mut self: Box<Self>, pid: u32) -> Result<(), Error> {
        // The record now names the process that holds the disks, if the key is still ours.
        self.record.pid = pid;
        let mut rec = self.record.clone();
        rec.token = None;
        let value = serde_json::to_string(&rec)
            .map_err(|e| Error::io("encode holder record", "", std::io::Error::other(e)))?;
        let (k, token, lease) = (self.etcd_key.clone(), self.token, self.lease);
        let display = self.key.display().to_string();
        self.backend.shared.twice(|| {
            let (k, value, display) = (k.clone(), value.clone(), display.clone());
            self.backend
                .shared
                .run("hand a lease over", move |sh, mut c| async move {
                    let err = etcd_err(&sh.cfg, "hand a lease over");
                    let r = c
                        .txn(
                            Txn::new()
                                .when([Compare::create_revision(
                                    k.clone(),
                                    CompareOp::Equal,
                                    token as i64,
                                )])
                                .and_then([TxnOp::put(
                                    k,
                                    value,
                                    Some(PutOptions::new().with_lease(lease)),
                                )]),
                        )
                        .await
                        .map_err(&err)?;
                    if r.succeeded() {
                        Ok(())
                    } else {
                        Err(Error::lease_lost(display, token, Vec::new()))
                    }
                })
        })?;
        // From now on the keeper renews it; dropping this handle neither renews nor revokes.
        self.handed = true;
        self.stop.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for EtcdLease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if !self.handed {
            // Revoking deletes the key at once, so the next holder need not wait for the TTL.
            self.backend.revoke(self.lease);
        }
    }
}

/// How [`keep`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// `exited` completed (the domain's QEMU is gone): the leases were revoked (or, if etcd
    /// could not be reached, expire within their TTL).
    Released,
    /// The leases could not be renewed for half their TTL, or etcd said one is gone: the
    /// caller must fence now (pause the VM), before the TTL runs out and another host may
    /// take the leases. `why` says what happened.
    MustFence {
        /// What failed.
        why: String,
    },
}

/// Renew the etcd leases of `tickets` until `exited` completes (then revoke them), or until
/// they cannot be renewed safely any more ([`Kept::MustFence`], at the latest half a TTL
/// after the last renewal that etcd confirmed was sent). `more` is asked before every round
/// for leases to add (a snapshot's new overlay, handed to the same QEMU). Used by the domain
/// keeper process.
pub async fn keep(
    tickets: &[Ticket],
    mut more: impl FnMut() -> Vec<Ticket>,
    exited: impl Future<Output = ()>,
) -> Kept {
    let mut tickets: Vec<Ticket> = tickets.to_vec();
    let Some(first) = tickets.first().cloned() else {
        exited.await;
        return Kept::Released;
    };
    let ttl = Duration::from_millis(tickets.iter().map(|t| t.ttl_ms).min().unwrap_or(10_000));
    let cfg = EtcdConfig::of_ticket(&first, ttl, (ttl / 4).max(Duration::from_millis(500)));
    let every = (ttl / 5).max(Duration::from_millis(200));
    // Renewals count from when they were sent: etcd extends the lease from when it received
    // them, which is later.
    let mut last_ok = Instant::now();
    let fence_at = |last: Instant| last + ttl / 2;
    let members = tokio::sync::Mutex::new(Endpoints::default());
    type Slot = Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>;
    let mut keepers: Vec<Slot> = tickets.iter().map(|_| None).collect();
    tokio::pin!(exited);
    let mut why = String::from("no renewal confirmed");
    let mut failed = 0u32;
    loop {
        for t in more() {
            if !tickets.iter().any(|k| k.lease == t.lease) {
                tickets.push(t);
                keepers.push(None);
            }
        }
        let round = async {
            let sent = Instant::now();
            let mut c = members
                .lock()
                .await
                .client(&cfg)
                .await
                .map_err(|e| format!("cannot reach {}: {e}", cfg.url()))?;
            for (t, slot) in tickets.iter().zip(keepers.iter_mut()) {
                if slot.is_none() {
                    *slot = Some(
                        tokio::time::timeout(cfg.timeout, c.lease_keep_alive(t.lease))
                            .await
                            .map_err(|_| format!("renew lease {:x}: no answer", t.lease))?
                            .map_err(|e| format!("renew lease {:x}: {e}", t.lease))?,
                    );
                }
                let (k, s) = slot.as_mut().expect("set");
                let r = async {
                    k.keep_alive().await?;
                    s.message().await
                };
                match tokio::time::timeout(cfg.timeout, r).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        return Err(format!("lease {:x} is gone (expired or revoked)", t.lease))
                    }
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                        *slot = None;
                        return Err(format!("renew lease {:x}: no answer", t.lease));
                    }
                }
            }
            Ok(sent)
        };
        let deadline = tokio::time::Instant::from_std(fence_at(last_ok));
        tokio::select! {
            biased;
            _ = &mut exited => {
                revoke_all(&cfg, &tickets).await;
                return Kept::Released;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Kept::MustFence { why };
            }
            r = round => match r {
                Ok(sent) => {
                    last_ok = sent;
                    failed = 0;
                }
                Err(e) if e.contains("is gone") => return Kept::MustFence { why: e },
                Err(e) => {
                    why = e;
                    failed += 1;
                    // A member went away (a leader killed, say): after a second failure
                    // connect afresh, so that the next round reaches the others.
                    if failed >= 2 {
                        if let Ok(mut m) = members.try_lock() {
                            m.failed();
                        }
                        keepers.iter_mut().for_each(|k| *k = None);
                    }
                }
            },
        }
        // After a failure, try again soon: the deadline is what matters now.
        let next = tokio::time::Instant::now()
            + if failed > 0 {
                Duration::from_millis(100)
            } else {
                every
            };
        tokio::select! {
            biased;
            _ = &mut exited => {
                revoke_all(&cfg, &tickets).await;
                return Kept::Released;
            }
            _ = tokio::time::sleep_until(deadline.min(next)) => {}
        }
        if Instant::now() >= fence_at(last_ok) {
            return Kept::MustFence { why };
        }
    }
}

async fn revoke_all(cfg: &EtcdConfig, tickets: &[Ticket]) {
    if let Ok(mut c) = Endpoints::default().client(cfg).await {
        for t in tickets {
            let _ = tokio::time::timeout(cfg.timeout, c.lease_revoke(t.lease)).await;
        }
    }
}

/// Revoke the leases of `tickets`, trying for up to `within` (after a fence: so that another
/// host need not wait for the TTL once etcd answers again). Returns whether all were revoked.
pub async fn revoke(tickets: &[Ticket], within: Duration) -> bool {
    let Some(first) = tickets.first() else {
        return true;
    };
    let cfg = EtcdConfig::of_ticket(first, DEFAULT_TTL, Duration::from_secs(1));
    let end = Instant::now() + within;
    let mut members = Endpoints::default();
    let mut left: Vec<i64> = tickets.iter().map(|t| t.lease).collect();
    while !left.is_empty() && Instant::now() < end {
        if let Ok(mut c) = members.client(&cfg).await {
            let mut still = Vec::new();
            for l in left {
                if !matches!(
                    tokio::time::timeout(cfg.timeout, revoke_one(&mut c, l)).await,
                    Ok(Ok(()))
                ) {
                    still.push(l);
                }
            }
            if !still.is_empty() {
                members.failed();
            }
            left = still;
        }
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    left.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let c =
            EtcdConfig::parse("etcd://127.0.0.1:2379,127.0.0.1:2381/vs/test?ttl=4", "a").unwrap();
        assert_eq!(
            c.endpoints,
            vec!["http://127.0.0.1:2379", "http://127.0.0.1:2381"]
        );
        assert_eq!(c.prefix, "/vs/test");
        assert_eq!(c.ttl, Duration::from_secs(4));
        assert_eq!(c.url(), "etcd://127.0.0.1:2379,127.0.0.1:2381/vs/test");
        let d = EtcdConfig::parse("etcd://h:1", "a").unwrap();
        assert_eq!(d.prefix, DEFAULT_PREFIX);
        assert_eq!(d.ttl, DEFAULT_TTL);
        for bad in [
            "http://h:1",
            "etcd://h",
            "etcd://h:x",
            "etcd://:1",
            "etcd://h:1?ttl=1",
            "etcd://h:1?foo=2",
        ] {
            let e = EtcdConfig::parse(bad, "a").unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidResource, "{bad}");
        }
        assert!(EtcdConfig::parse("etcd://h:1", "").is_err());
        assert!(EtcdConfig::parse("etcd://h:1", "a/b").is_err());
    }
}
