//! Snapshots across a volume's copies. The primary takes one at a point that includes
//! every write it acknowledged before: it holds every block lock of the node (each
//! replicated write holds its blocks' locks until every live copy applied it), takes
//! the snapshot of its own copy, then has each live replica take its own
//! (`KIND_VOLUME_SNAPSHOT`), and only then lets writes go on. Every live copy thus
//! freezes the same writes, and a snapshot survives the loss of any node the volume
//! survives. The store keeps each copy's snapshot (`lazarus_store::snapshot`).

use crate::engine::{Engine, IoError};
use lazarus_nbd::consts::{EINVAL, EIO};
use lazarus_store::{Snapshot, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How long the primary waits for a replica to take or delete its snapshot (a
/// checkpoint and a small file).
const SNAPSHOT_RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A snapshot operation the primary sends to a copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotOp {
    pub volume: String,
    /// The primary's epoch: a copy that knows a newer one refuses.
    pub epoch: u64,
    pub name: String,
    /// The snapshot's id (`Snapshot::id`), the same on every copy.
    pub id: u64,
    /// The root of the primary's snapshot (hex; empty for a deletion): a copy whose
    /// own snapshot comes out with another root (it took it late, after writes the
    /// primary's did not include, or missed one) deletes it and refuses.
    #[serde(default)]
    pub root: String,
    /// Create (else delete).
    pub create: bool,
}

/// What a snapshot operation did on each copy.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotOutcome {
    pub volume: String,
    pub snapshot: String,
    /// Nodes whose copy now has it (create) or no longer has it (delete).
    pub done: Vec<String>,
    /// Nodes where it failed, with why.
    pub failed: Vec<(String, String)>,
    pub elapsed_us: u64,
}

/// How long the primary waits for a replica to reset its copy to a snapshot (it maps
/// the snapshot's ids, no data: seconds even for a large volume).
const RESET_RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a replica waits for its copy of a volume just created (a clone) to appear.
const RESET_COPY_WAIT: Duration = Duration::from_secs(10);

/// A reset (revert or clone) the primary sends to a copy (`KIND_VOLUME_RESET`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetOp {
    /// The volume to reset.
    pub volume: String,
    /// The primary's epoch of it: a copy that knows a newer one refuses.
    pub epoch: u64,
    /// The volume whose snapshot it is (the same one for a revert).
    pub source: String,
    pub snapshot: String,
    /// The snapshot's id (`Snapshot::id`).
    pub id: u64,
    /// The root the primary's copy came to (hex): a copy that comes to another one
    /// says so, and the copies are compared again.
    pub root: String,
    /// The uid of the volume to reset (0: whichever the name is): a copy of another
    /// volume under the name refuses (a clone given up while its fill went on, its
    /// name since taken by a new volume).
    #[serde(default)]
    pub uid: u64,
}

/// What a revert or clone did.
#[derive(Debug, Clone, Serialize)]
pub struct ResetSummary {
    pub volume: String,
    pub source: String,
    pub snapshot: String,
    /// Bytes of the volume that now map the snapshot's blocks (none copied).
    pub changed_bytes: u64,
    pub changed_pages: u64,
    /// The volume's checksum root afterwards.
    pub root: String,
    /// Nodes whose copy was reset.
    pub done: Vec<String>,
    /// Copies that were not, with why: they are compared with the primary's again
    /// and brought up to date from it (resync).
    pub failed: Vec<(String, String)>,
    pub elapsed_us: u64,
}

fn store_error(e: StoreError) -> IoError {
    match e {
        StoreError::Invalid(m) => IoError::new(EINVAL, m),
        StoreError::NoSuchSnapshot(m) => IoError::new(EINVAL, format!("no snapshot {m}")),
        StoreError::NoSuchVolume(m) => IoError::new(EINVAL, format!("no volume {m:?} here")),
        other => IoError::new(EIO, other.to_string()),
    }
}

/// `Engine::snapshot_current` for a node's cluster member (none: running alone).
pub fn snapshot_current(
    cluster: Option<&Arc<lazarus_node::cluster::Cluster>>,
    volume: &str,
    snap: &Snapshot,
) -> bool {
    match cluster {
        None => true,
        // A node still starting may hold metadata from before a deletion; one that
        // serves the volume on the recovery server's hold (it took the volume over
        // from the log while the metadata has no majority) holds what the metadata
        // named when its copies were last live: no snapshot of the volume was made or
        // dropped since without this copy (none is taken while writes go through the
        // recovery server, and a deletion the metadata did not commit is none).
        Some(c) => {
            (c.is_ready()
                || c.effective_primary(volume)
                    .is_some_and(|(p, e)| p == c.id && c.hold_valid(volume, e)))
                && c.store
                    .meta()
                    .volumes
                    .get(volume)
                    .and_then(|v| v.snapshots.get(&snap.name))
                    == Some(&snap.id)
        }
    }
}

/// A reset of a volume under way on this node (its writes wait: `wait_for_reset`),
/// until dropped.
struct ResetRunning<'a> {
    engine: &'a Engine,
    volume: String,
}

impl<'a> ResetRunning<'a> {
    fn start(engine: &'a Engine, volume: &str) -> Result<ResetRunning<'a>, IoError> {
        if !engine.resetting.lock().insert(volume.to_string()) {
            return Err(IoError::new(
                EINVAL,
                format!("a revert or clone of {volume:?} is under way"),
            ));
        }
        engine
            .resets_running
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(ResetRunning {
            engine,
            volume: volume.to_string(),
        })
    }
}

impl Drop for ResetRunning<'_> {
    fn drop(&mut self) {
        self.engine.resetting.lock().remove(&self.volume);
        self.engine
            .resets_running
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Sends request `op` of `kind` to each of `nodes` at once; (done, failed with why),
/// nodes named as outcomes name them ("n2").
async fn call_copies(
    c: &Arc<lazarus_node::cluster::Cluster>,
    nodes: &[u64],
    kind: u8,
    op: &impl Serialize,
    timeout: Duration,
) -> (Vec<String>, Vec<(String, String)>) {
    let body = serde_json::to_vec(op).expect("serializable");
    let calls = nodes.iter().map(|n| {
        let (c, body) = (c.clone(), body.clone());
        let n = *n;
        async move {
            let name = format!("n{n}");
            let r = match c.rpc_addr(n) {
                None => Err("no address known".to_string()),
                Some(addr) => c
                    .network
                    .client(&addr)
                    .call(kind, &body, timeout)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            (name, r)
        }
    });
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (name, r) in futures::future::join_all(calls).await {
        match r {
            Ok(()) => done.push(name),
            Err(e) => failed.push((name, e)),
        }
    }
    (done, failed)
}

impl Engine {
    /// Whether this node's snapshot `snap` of `volume` is the one the cluster knows by
    /// its name (always, for a node running alone): only such a snapshot is served.
    pub fn snapshot_current(&self, volume: &str, snap: &Snapshot) -> bool {
        snapshot_current(self.cluster.get(), volume, snap)
    }

    /// Makes volume `volume` read as snapshot `name` of volume `source` (itself for a
    /// revert; another for a clone, whose copies are on the same nodes), on every
    /// live copy, atomically on each (`Store::reset_to_snapshot`: an intent file, then
    /// the snapshot's block ids mapped where the volume differs; no data moves). The
    /// volume's writes wait meanwhile (`ResetRunning`), so each copy resets at the
    /// same point. This node must be the volume's primary (or run alone).
    pub async fn reset_to_snapshot(
        &self,
        volume: &str,
        source: &str,
        name: &str,
        uid: Option<u64>,
    ) -> Result<ResetSummary, IoError> {
        let t0 = tokio::time::Instant::now();
        // `uid`: only that volume (a clone's fill: the name may have been given up
        // and taken by another volume meanwhile).
        let other = || {
            IoError::new(
                EINVAL,
                format!("volume {volume:?} is no longer the one this reset is for"),
            )
        };
        let vol = self
            .store
            .volume(volume)
            .ok_or_else(|| IoError::new(EINVAL, format!("no volume {volume:?} here")))?;
        if uid.is_some_and(|u| u != vol.meta.uid) {
            return Err(other());
        }
        let src = self
            .store
            .volume(source)
            .ok_or_else(|| IoError::new(EINVAL, format!("no volume {source:?} here")))?;
        let snap = src
            .snapshot(name)
            .filter(|s| self.snapshot_current(source, s))
            .ok_or_else(|| IoError::new(EINVAL, format!("no snapshot {source}@{name} here")))?;
        let cluster = self.cluster.get().cloned();
        let epoch = match &cluster {
            None => None,
            Some(_) => Some(self.primary_epoch(volume).ok_or_else(|| {
                IoError::new(
                    EINVAL,
                    format!("this node is not the primary of {volume:?}; ask the primary"),
                )
            })?),
        };
        self.serving(&vol).await?;
        // Writes to the volume wait (under their own block locks) until the reset
        // ends, on every copy: every copy resets at the same point, and no write is
        // acknowledged between a copy's commit and the end of its reset. The writes
        // in flight when it starts end first (every block lock taken once). Other
        // volumes' writes go on.
        let running = ResetRunning::start(self, volume)?;
        drop(self.lock_blocks(0, 1 << 20).await);
        self.still_primary(&vol, epoch).await?;
        if let Some(c) = &cluster {
            let last_domain = || {
                IoError::new(
                    EINVAL,
                    format!("volume {volume:?} is down to its last failure domain (its writes go through the recovery server first, whose log would not hold this): revert or clone it once its copies are back"),
                )
            };
            // A clone being made, not in jeopardy mode, is filled outside it: it
            // enters only once made, its base then the filled copies (decide.rs).
            let v = c.effective(volume);
            let being_made = v.as_ref().is_some_and(|v| v.cloning.is_some());
            if v.is_some_and(|v| {
                lazarus_node::decide::writes_through(&v) && (v.recovery_flag || !being_made)
            }) && c.recovery.is_some()
            {
                return Err(last_domain());
            }
            // What was written before the reset durable on every live copy first: the
            // primary's record of writes its replicas have not flushed is then empty,
            // so no jeopardy drain can put a write the reset undid into the recovery
            // log, from which a base copy would restore it over the reset (simulator
            // seed 54872: a revert undone 60 ms after it was reported done). Not a
            // clone being made: nothing was written to it, and a flush that a
            // replica failed would enter jeopardy mode with its empty copies as the
            // log's base.
            if !being_made {
                self.flush(&vol).await?;
            }
            // In jeopardy mode since the check above (a write's or flush's entry).
            if c.effective(volume).is_some_and(|v| v.recovery_flag) {
                return Err(last_domain());
            }
        }
        // Only the volume this reset is for, checked just before the store's reset
        // (which goes by name): the waits above may have outlasted a clone's give-up.
        let named = self.store.volume(volume).map(|l| l.meta.uid);
        let meta_uid = cluster
            .as_ref()
            .map(|c| c.store.meta().volumes.get(volume).map(|v| v.uid));
        if named != Some(vol.meta.uid) || meta_uid.is_some_and(|m| m != Some(vol.meta.uid)) {
            return Err(other());
        }
        let (store, d, sv, n, id) = (
            self.store.clone(),
            volume.to_string(),
            source.to_string(),
            name.to_string(),
            snap.id,
        );
        let out = lazarus_rpc::rt::block_in_place(move || store.reset_to_snapshot(&d, &sv, &n, id))
            .map_err(store_error)?;
        let mut done = vec![self.node_label()];
        let mut failed = Vec::new();
        if let (Some(c), Some(epoch)) = (&cluster, epoch) {
            // Not sent by a primary replaced meanwhile (its lease lapsed during the
            // reset): the copies it would reach may already be compared with another.
            if let Err(e) = self.still_primary(&vol, Some(epoch)).await {
                c.reconcile_again(volume);
                return Err(e);
            }
            // A copy catching up (resync) takes writes but not this: it starts over,
            // or it could turn live holding pages from before the reset. Before the
            // live copies are listed: a copy that turns live meanwhile was either
            // live by then (and is sent the reset) or is made to start over (its
            // turning live, proposed for a copy still resyncing, fails, or this
            // overrides it), never live without the reset.
            let catching_up: Vec<u64> = c
                .effective(volume)
                .map(|v| {
                    v.replicas
                        .iter()
                        .copied()
                        .filter(|n| {
                            v.state_of(*n) == Some(lazarus_cluster::ReplicaState::Resyncing)
                        })
                        .collect()
                })
                .unwrap_or_default();
            for n in catching_up {
                let cmd = lazarus_cluster::MetaCommand::SetReplicaState {
                    volume: volume.to_string(),
                    node: n,
                    state: lazarus_cluster::ReplicaState::Dead,
                    epoch,
                    at_ms: 0,
                    since: None,
                    source: None,
                };
                match c.propose(cmd).await {
                    Ok(lazarus_cluster::MetaResponse::Volume(_)) => {
                        tracing::info!(
                            volume,
                            node = n,
                            "a resyncing copy starts over after a reset"
                        );
                    }
                    other => {
                        failed.push((
                            format!("n{n}"),
                            format!("resyncing, and could not be made to start over: {other:?}"),
                        ));
                    }
                }
            }
            // Copies that are not live (dead, or sent back just now) lack the reset:
            // recorded stale, so that none is ever promoted in place of a reset copy.
            let unmarked = c
                .effective(volume)
                .map(|v| lazarus_node::decide::unmarked_dead(&v))
                .unwrap_or_default();
            for n in unmarked.into_iter().filter(|n| *n != c.id) {
                let cmd = lazarus_cluster::MetaCommand::MarkStale {
                    volume: volume.to_string(),
                    node: n,
                    epoch,
                };
                if let Err(e) = c.propose(cmd).await {
                    failed.push((
                        format!("n{n}"),
                        format!("not live, and could not be recorded as lacking the reset: {e}"),
                    ));
                }
            }
            // Still the primary after those proposals (each may wait): a primary
            // replaced meanwhile must not send the reset to copies another primary
            // may already serve from.
            if let Err(e) = self.still_primary(&vol, Some(epoch)).await {
                c.reconcile_again(volume);
                return Err(e);
            }
            let v = c.effective(volume);
            let live: Vec<u64> = v
                .as_ref()
                .map(|v| v.live())
                .unwrap_or_default()
                .into_iter()
                .filter(|n| *n != c.id)
                .collect();
            let op = ResetOp {
                volume: volume.to_string(),
                epoch,
                source: source.to_string(),
                snapshot: name.to_string(),
                id: snap.id,
                root: out.root.clone(),
                uid: vol.meta.uid,
            };
            let (d, f) = call_copies(
                c,
                &live,
                lazarus_rpc::KIND_VOLUME_RESET,
                &op,
                RESET_RPC_TIMEOUT,
            )
            .await;
            done.extend(d);
            failed.extend(f);
            if !failed.is_empty() {
                for (n, e) in &failed {
                    tracing::warn!(volume, node = %n, error = %e, "a copy was not reset; the copies are compared again");
                }
                // Served again (and this answered) only once the copies that differ
                // are committed dead, as after a write some replica missed.
                c.reconcile_again(volume);
                drop(running);
                let t0 = tokio::time::Instant::now();
                while let Err(e) = self.serving(&vol).await {
                    if t0.elapsed() > Duration::from_secs(30) {
                        return Err(IoError::new(
                            EIO,
                            format!("reset on {done:?} but not on {failed:?}, and the copies could not be compared again yet ({}); those that differ resync", e.message),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracing::info!(
            volume,
            source,
            snapshot = name,
            changed_blocks = out.changed_blocks,
            "volume reset to a snapshot on its copies"
        );
        Ok(ResetSummary {
            volume: volume.to_string(),
            source: source.to_string(),
            snapshot: name.to_string(),
            changed_bytes: out.changed_blocks * lazarus_types::BLOCK_SIZE_U64,
            changed_pages: out.changed_pages,
            root: out.root,
            done,
            failed,
            elapsed_us: t0.elapsed().as_micros() as u64,
        })
    }

    /// The cluster and this node's view of `volume` for a request its primary sent
    /// at `epoch`: refused if this node knows a newer epoch.
    fn copy_request(
        &self,
        volume: &str,
        epoch: u64,
        what: &str,
    ) -> Result<
        (
            Arc<lazarus_node::cluster::Cluster>,
            lazarus_cluster::VolumeInfo,
        ),
        String,
    > {
        let c = self.cluster.get().ok_or("this node runs alone")?.clone();
        let v = c
            .effective(volume)
            .ok_or_else(|| format!("volume {volume:?} unknown here"))?;
        if epoch < v.epoch {
            return Err(format!(
                "{what} of {volume:?} from epoch {epoch} refused: this node is at epoch {}",
                v.epoch
            ));
        }
        Ok((c, v))
    }

    /// A copy's part of a reset its primary sent (`KIND_VOLUME_RESET`). The primary
    /// holds the volume's writes meanwhile: none reaches this copy.
    pub async fn serve_reset_op(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let op: ResetOp =
            serde_json::from_slice(body).map_err(|e| format!("bad reset request: {e}"))?;
        let (c, v) = self.copy_request(&op.volume, op.epoch, "reset")?;
        if op.uid != 0 && op.uid != v.uid {
            return Err(format!(
                "volume {:?} here is not the one the reset is for (uid {} here, {} asked)",
                op.volume, v.uid, op.uid
            ));
        }
        if v.state_of(c.id) != Some(lazarus_cluster::ReplicaState::Live) {
            return Err(format!("this copy of {:?} is not live", op.volume));
        }
        // A clone's copy is created by this node's metadata loop, perhaps a moment
        // after the primary's.
        let t0 = tokio::time::Instant::now();
        while self
            .store
            .volume(&op.volume)
            .is_none_or(|l| l.meta.uid != v.uid)
        {
            if t0.elapsed() > RESET_COPY_WAIT {
                return Err(format!("no copy of {:?} here", op.volume));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let current = self
            .store
            .volume(&op.source)
            .and_then(|s| s.snapshot(&op.snapshot))
            .is_some_and(|s| s.id == op.id);
        if !current {
            return Err(format!(
                "this node has no copy of snapshot {}@{} (id {})",
                op.source, op.snapshot, op.id
            ));
        }
        let store = self.store.clone();
        let (d, sv, n, id) = (
            op.volume.clone(),
            op.source.clone(),
            op.snapshot.clone(),
            op.id,
        );
        let out = lazarus_rpc::rt::blocking(move || store.reset_to_snapshot(&d, &sv, &n, id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if out.root != op.root {
            return Err(format!(
                "this copy came to root {} where the primary's came to {}: it differed before",
                out.root, op.root
            ));
        }
        Ok(Vec::new())
    }

    /// This node as outcomes name it.
    fn node_label(&self) -> String {
        self.cluster
            .get()
            .map_or_else(|| "this node".to_string(), |c| format!("n{}", c.id))
    }

    /// Takes snapshot `name` of `volume` on every live copy (this node must be its
    /// primary, or run alone).
    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<(Arc<Snapshot>, SnapshotOutcome), IoError> {
        lazarus_store::snapshot::check_snapshot_name(name).map_err(|m| IoError::new(EINVAL, m))?;
        let t0 = tokio::time::Instant::now();
        let vol = self
            .store
            .volume(volume)
            .ok_or_else(|| IoError::new(EINVAL, format!("no volume {volume:?} here")))?;
        let me = self.node_label();
        let id = lazarus_store::store::new_snapshot_id(name);
        let Some(c) = self.cluster.get().cloned() else {
            let (store, v, n) = (self.store.clone(), volume.to_string(), name.to_string());
            let s = lazarus_rpc::rt::blocking(move || store.create_snapshot(&v, &n, id))
                .await
                .map_err(|e| IoError::new(EIO, e.to_string()))?
                .map_err(store_error)?;
            return Ok((
                s,
                SnapshotOutcome {
                    volume: volume.to_string(),
                    snapshot: name.to_string(),
                    done: vec![me],
                    failed: Vec::new(),
                    elapsed_us: t0.elapsed().as_micros() as u64,
                },
            ));
        };
        let epoch = self.primary_epoch(volume).ok_or_else(|| {
            IoError::new(
                EINVAL,
                format!("this node is not the primary of {volume:?}; ask the primary"),
            )
        })?;
        if c.store
            .meta()
            .volumes
            .get(volume)
            .is_some_and(|v| v.snapshots.contains_key(name))
        {
            return Err(IoError::new(
                EINVAL,
                format!("volume {volume:?} already has a snapshot {name:?}"),
            ));
        }
        if vol.snapshot(name).is_some() {
            // A leftover the metadata does not name (this copy missed its deletion).
            let (store, v, n) = (self.store.clone(), volume.to_string(), name.to_string());
            lazarus_rpc::rt::blocking(move || store.delete_snapshot(&v, &n))
                .await
                .map_err(|e| IoError::new(EIO, e.to_string()))?
                .map_err(store_error)?;
        }
        self.serving(&vol).await?;
        // Every write acknowledged so far is on every live copy; none is in flight
        // until these are dropped.
        let _all = self.lock_blocks(0, 1 << 20).await;
        self.still_primary(&vol, Some(epoch)).await?;
        if c.recovery.is_some()
            && c.effective(volume).is_some_and(|v| {
                lazarus_node::decide::writes_through(&v) && v.live().len() < v.replicas.len()
            })
        {
            // Down to its last failure domain, the volume survives this node's loss
            // through the recovery log, which holds writes, not snapshots: a snapshot
            // taken here alone would not outlive this node.
            return Err(IoError::new(
                EINVAL,
                format!("volume {volume:?} is down to its last failure domain (its writes go through the recovery server first, whose log would not hold a snapshot): take it once its copies are back"),
            ));
        }
        let live: Vec<u64> = c
            .effective(volume)
            .map(|v| v.live())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| *n != c.id)
            .collect();
        let (store, v, n) = (self.store.clone(), volume.to_string(), name.to_string());
        let s = lazarus_rpc::rt::block_in_place(move || store.create_snapshot(&v, &n, id))
            .map_err(store_error)?;
        let op = SnapshotOp {
            volume: volume.to_string(),
            epoch,
            name: name.to_string(),
            id,
            root: s.root.to_hex(),
            create: true,
        };
        let (done, failed) = self.snapshot_on(&c, &live, &op).await;
        drop(_all);
        // Served (and listed) once the metadata names it.
        let cmd = lazarus_cluster::MetaCommand::SetSnapshot {
            volume: volume.to_string(),
            name: name.to_string(),
            id: Some(id),
            size_bytes: s.size_bytes,
        };
        match c.propose(cmd).await {
            Ok(lazarus_cluster::MetaResponse::Ok) => {}
            other => {
                let why = match other {
                    Ok(r) => format!("{r:?}"),
                    Err(e) => e.to_string(),
                };
                // Not recorded: take it back everywhere (it would never be served).
                let undo = SnapshotOp {
                    create: false,
                    ..op.clone()
                };
                let (store, v, n) = (self.store.clone(), volume.to_string(), name.to_string());
                let _ = lazarus_rpc::rt::blocking(move || store.delete_snapshot(&v, &n)).await;
                let _ = self.snapshot_on(&c, &live, &undo).await;
                return Err(IoError::new(
                    EIO,
                    format!("snapshot {volume}@{name} could not be recorded in the cluster metadata: {why}"),
                ));
            }
        }
        let mut all_done = vec![me];
        all_done.extend(done);
        for (n, e) in &failed {
            tracing::warn!(volume, snapshot = name, node = %n, error = %e, "a live copy did not take the snapshot");
        }
        Ok((
            s,
            SnapshotOutcome {
                volume: volume.to_string(),
                snapshot: name.to_string(),
                done: all_done,
                failed,
                elapsed_us: t0.elapsed().as_micros() as u64,
            },
        ))
    }

    /// Deletes snapshot `name` of `volume` on every copy that answers (this node must
    /// be its primary, or run alone).
    pub async fn delete_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<SnapshotOutcome, IoError> {
        let t0 = tokio::time::Instant::now();
        let me = self.node_label();
        let mut id = 0;
        if let Some(c) = self.cluster.get() {
            if self.primary_epoch(volume).is_none() {
                return Err(IoError::new(
                    EINVAL,
                    format!("this node is not the primary of {volume:?}; ask the primary"),
                ));
            }
            let recorded = c
                .store
                .meta()
                .volumes
                .get(volume)
                .and_then(|v| v.snapshots.get(name).copied());
            if let Some(r) = recorded {
                id = r;
                // No longer served anywhere once this commits.
                let cmd = lazarus_cluster::MetaCommand::SetSnapshot {
                    volume: volume.to_string(),
                    name: name.to_string(),
                    id: None,
                    size_bytes: 0,
                };
                match c.propose(cmd).await {
                    Ok(lazarus_cluster::MetaResponse::Ok) => {}
                    Ok(r) => return Err(IoError::new(EIO, format!("{r:?}"))),
                    Err(e) => return Err(IoError::new(EIO, e.to_string())),
                }
            }
        }
        let (store, v, n) = (self.store.clone(), volume.to_string(), name.to_string());
        let local = lazarus_rpc::rt::blocking(move || store.delete_snapshot(&v, &n))
            .await
            .map_err(|e| IoError::new(EIO, e.to_string()))?;
        let Some(c) = self.cluster.get().cloned() else {
            local.map_err(store_error)?;
            return Ok(SnapshotOutcome {
                volume: volume.to_string(),
                snapshot: name.to_string(),
                done: vec![me],
                failed: Vec::new(),
                elapsed_us: t0.elapsed().as_micros() as u64,
            });
        };
        let Some(epoch) = self.primary_epoch(volume) else {
            return Err(IoError::new(
                EINVAL,
                format!("this node is not the primary of {volume:?}; ask the primary"),
            ));
        };
        let mut done = Vec::new();
        match local {
            Ok(()) => done.push(me),
            Err(StoreError::NoSuchSnapshot(m)) if id == 0 => {
                return Err(IoError::new(EINVAL, format!("no snapshot {m}")))
            }
            // Not here: a copy rebuilt since may lack it; the others may have it.
            Err(StoreError::NoSuchSnapshot(_)) => {}
            Err(e) => return Err(store_error(e)),
        }
        let others: Vec<u64> = c
            .effective(volume)
            .map(|v| v.replicas.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| *n != c.id)
            .collect();
        let op = SnapshotOp {
            volume: volume.to_string(),
            epoch,
            name: name.to_string(),
            id,
            root: String::new(),
            create: false,
        };
        let (d, failed) = self.snapshot_on(&c, &others, &op).await;
        done.extend(d);
        Ok(SnapshotOutcome {
            volume: volume.to_string(),
            snapshot: name.to_string(),
            done,
            failed,
            elapsed_us: t0.elapsed().as_micros() as u64,
        })
    }

    /// Sends `op` to each of `nodes` at once; (done, failed with why).
    async fn snapshot_on(
        &self,
        c: &Arc<lazarus_node::cluster::Cluster>,
        nodes: &[u64],
        op: &SnapshotOp,
    ) -> (Vec<String>, Vec<(String, String)>) {
        call_copies(
            c,
            nodes,
            lazarus_rpc::KIND_VOLUME_SNAPSHOT,
            op,
            // A deletion first makes the pages clones share with the snapshot their
            // own (a mapping per block, as a revert's): as long as a reset may take.
            if op.create {
                SNAPSHOT_RPC_TIMEOUT
            } else {
                RESET_RPC_TIMEOUT
            },
        )
        .await
    }

    /// A copy's part of a snapshot operation its primary sent (`KIND_VOLUME_SNAPSHOT`).
    pub async fn serve_snapshot_op(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let op: SnapshotOp =
            serde_json::from_slice(body).map_err(|e| format!("bad snapshot request: {e}"))?;
        let (c, v) = self.copy_request(&op.volume, op.epoch, "snapshot")?;
        let local = self
            .store
            .volume(&op.volume)
            .filter(|l| l.meta.uid == v.uid)
            .ok_or_else(|| format!("no copy of {:?} here", op.volume))?;
        if op.create && v.state_of(c.id) != Some(lazarus_cluster::ReplicaState::Live) {
            return Err(format!(
                "this copy of {:?} is not live: it takes no snapshot",
                op.volume
            ));
        }
        let store = self.store.clone();
        let (vol, name, create, id) = (local.meta.name.clone(), op.name.clone(), op.create, op.id);
        let root = op.root.clone();
        let r = lazarus_rpc::rt::blocking(move || {
            if create {
                // A leftover under the name that the metadata no longer names (this
                // copy missed its deletion) makes way.
                if store
                    .volume(&vol)
                    .and_then(|v| v.snapshot(&name))
                    .is_some_and(|s| s.id != id)
                {
                    let _ = store.delete_snapshot(&vol, &name);
                }
                let s = store.create_snapshot(&vol, &name, id)?;
                if s.root.to_hex() != root {
                    // Not what the primary froze: never to be served.
                    let _ = store.delete_snapshot(&vol, &name);
                    return Err(StoreError::Invalid(format!(
                        "this copy's snapshot has root {} where the primary's has {root}: its copy differs (it took the snapshot late, or missed a write); not kept",
                        s.root.to_hex()
                    )));
                }
                Ok(())
            } else {
                // Only the snapshot named (id 0: whichever is there).
                match store.delete_snapshot_if(&vol, &name, |s| id == 0 || s.id == id) {
                    Err(StoreError::NoSuchSnapshot(_)) => Ok(()),
                    r => r,
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        r.map_err(|e| e.to_string())?;
        Ok(Vec::new())
    }
}
