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

/// Blocks a revert rewrites per write (4 MiB).
const REVERT_CHUNK_BLOCKS: u64 = 1024;

/// What a revert did.
#[derive(Debug, Clone, Serialize)]
pub struct RevertOutcome {
    pub volume: String,
    pub snapshot: String,
    pub rewritten_bytes: u64,
    pub runs: u64,
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
        // A node still starting may hold metadata from before a deletion.
        Some(c) => {
            c.is_ready()
                && c.store
                    .meta()
                    .volumes
                    .get(volume)
                    .and_then(|v| v.snapshots.get(&snap.name))
                    == Some(&snap.id)
        }
    }
}

impl Engine {
    /// Whether this node's snapshot `snap` of `volume` is the one the cluster knows by
    /// its name (always, for a node running alone): only such a snapshot is served.
    pub fn snapshot_current(&self, volume: &str, snap: &Snapshot) -> bool {
        snapshot_current(self.cluster.get(), volume, snap)
    }

    /// Makes `volume` read as its snapshot `name` again: every block where the two
    /// differ is rewritten through the ordinary (replicated, journaled) write path,
    /// then flushed. Killed midway, the volume holds a mix; running it again finishes
    /// it. Writers should be stopped first: a write that lands meanwhile may survive.
    /// This node must be the primary (or run alone).
    pub async fn revert_to_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<RevertOutcome, IoError> {
        let t0 = tokio::time::Instant::now();
        let vol = self
            .store
            .volume(volume)
            .ok_or_else(|| IoError::new(EINVAL, format!("no volume {volume:?} here")))?;
        if self.cluster.get().is_some() && self.primary_epoch(volume).is_none() {
            return Err(IoError::new(
                EINVAL,
                format!("this node is not the primary of {volume:?}; ask the primary"),
            ));
        }
        let snap = vol
            .snapshot(name)
            .filter(|s| self.snapshot_current(volume, s))
            .ok_or_else(|| IoError::new(EINVAL, format!("no snapshot {volume}@{name}")))?;
        let (store, v, s) = (self.store.clone(), vol.clone(), snap.clone());
        let runs = lazarus_rpc::rt::blocking(move || store.revert_runs(&v, &s))
            .await
            .map_err(|e| IoError::new(EIO, e.to_string()))??;
        let bs = lazarus_types::BLOCK_SIZE_U64;
        let mut bytes = 0u64;
        for (first, count) in &runs {
            let mut lba = *first;
            let end = first + count;
            while lba < end {
                let n = REVERT_CHUNK_BLOCKS.min(end - lba);
                let mut buf = vec![0u8; (n * bs) as usize];
                // Past the snapshot's size the volume grew later: zeroes.
                let inside = snap.block_count().saturating_sub(lba).min(n);
                if inside > 0 {
                    let (store, v, s) = (self.store.clone(), vol.clone(), snap.clone());
                    let mut part = vec![0u8; (inside * bs) as usize];
                    let part = lazarus_rpc::rt::blocking(move || {
                        store
                            .read_snapshot(&v, &s, lazarus_types::Lba(lba), &mut part)
                            .map(|()| part)
                    })
                    .await
                    .map_err(|e| IoError::new(EIO, e.to_string()))??;
                    buf[..part.len()].copy_from_slice(&part);
                }
                if lazarus_types::is_zero(&buf) {
                    self.zero(&vol, lba * bs, n * bs, true, false, false)
                        .await?;
                } else {
                    self.write(&vol, lba * bs, &buf, false).await?;
                }
                bytes += n * bs;
                lba += n;
            }
        }
        self.flush(&vol).await?;
        tracing::info!(
            volume,
            snapshot = name,
            bytes,
            "volume reverted to its snapshot"
        );
        Ok(RevertOutcome {
            volume: volume.to_string(),
            snapshot: name.to_string(),
            rewritten_bytes: bytes,
            runs: runs.len() as u64,
            elapsed_us: t0.elapsed().as_micros() as u64,
        })
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
                        .call(
                            lazarus_rpc::KIND_VOLUME_SNAPSHOT,
                            &body,
                            SNAPSHOT_RPC_TIMEOUT,
                        )
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

    /// A copy's part of a snapshot operation its primary sent (`KIND_VOLUME_SNAPSHOT`).
    pub async fn serve_snapshot_op(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let op: SnapshotOp =
            serde_json::from_slice(body).map_err(|e| format!("bad snapshot request: {e}"))?;
        let c = self.cluster.get().ok_or("this node runs alone")?.clone();
        let v = c
            .effective(&op.volume)
            .ok_or_else(|| format!("volume {:?} unknown here", op.volume))?;
        if op.epoch < v.epoch {
            return Err(format!(
                "snapshot of {:?} from epoch {} refused: this node is at epoch {}",
                op.volume, op.epoch, v.epoch
            ));
        }
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
