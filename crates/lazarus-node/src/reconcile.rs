//! A new primary reconciles the live copies before it serves (DESIGN.md, "A promotion
//! never leaves live copies that differ").
//!
//! The old primary sends each write to every replica at once. If it dies after one
//! replica applied a write and before another did, the replicas differ, and neither
//! write was acknowledged. Whichever is promoted, the other would stay `live` with
//! different contents: reads would change at the next failover and the roots would
//! never agree again. So a primary serves a volume at an epoch only after it compared
//! its checksum root with every live replica's at that epoch (each replica answers
//! only once it has applied the epoch, and from then on it refuses the old primary's
//! updates); a replica whose root differs, or that cannot be asked, is committed `dead`
//! first and then resyncs from the new primary by Merkle diff. The same check runs when
//! a node restarts as primary: its replicas may hold writes its own crash lost.

use crate::cluster::Cluster;
use crate::decide::{verdict, Verdict};
use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{MetaCommand, MetaResponse, ReplicaState, VolumeInfo};
pub use lazarus_rpc::msg::RootReq;
use lazarus_rpc::KIND_ROOT;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a replica waits for its metadata to reach the asked epoch.
const EPOCH_CATCH_UP: Duration = Duration::from_millis(1000);
const ROOT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Per volume this node is primary of: whether its live copies were compared with its
/// own at the current epoch (it serves only then).
#[derive(Default)]
pub struct Reconciliation {
    /// The epoch at which the comparison was done.
    done: parking_lot::Mutex<HashMap<String, u64>>,
    /// Comparisons under way.
    running: parking_lot::Mutex<HashSet<String>>,
    /// Bumped whenever a volume must be compared again (`reconcile_again`): a
    /// comparison that started before does not count.
    gen: parking_lot::Mutex<HashMap<String, u64>>,
}

impl Cluster {
    /// On a replica: its checksum root for `req.volume`, once its metadata is at
    /// `req.epoch` (so it already refuses the previous primary's updates).
    pub(crate) async fn serve_root(&self, req: RootReq) -> Result<Vec<u8>, String> {
        if !self.is_ready() {
            return Err("this node is starting up".into());
        }
        if self.claimed_beyond_metadata(&req.volume) {
            return Err("fenced: this node holds the volume at the recovery server".into());
        }
        let t0 = Instant::now();
        loop {
            let meta = self.store.meta();
            let v = meta
                .volumes
                .get(&req.volume)
                .ok_or_else(|| format!("volume {:?} unknown here", req.volume))?;
            if v.uid != req.uid {
                return Err(format!("volume {:?} is another uid here", req.volume));
            }
            if v.epoch > req.epoch {
                return Err(format!(
                    "epoch {} is older than this node's {}",
                    req.epoch, v.epoch
                ));
            }
            if v.epoch == req.epoch {
                if v.state_of(self.id) != Some(ReplicaState::Live) {
                    return Err("this copy is not live".into());
                }
                break;
            }
            if t0.elapsed() > EPOCH_CATCH_UP {
                return Err(format!(
                    "this node's metadata is at epoch {}, not {} yet",
                    v.epoch, req.epoch
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let local = self
            .blocks
            .volume(&req.volume)
            .filter(|l| l.meta.uid == req.uid)
            .ok_or_else(|| format!("no local copy of {:?}", req.volume))?;
        // Updates admitted under the old epoch finish first.
        let guard = self.apply_guard(&req.volume);
        let _all = guard.write().await;
        // And they are durable here before this copy counts as current: the new
        // primary knows nothing of what its predecessor wrote that no flush covered,
        // and a copy it keeps live may become a base of the recovery server's log,
        // which holds only what comes after (simulator seed 50554: a replica whose
        // device failed, still live at the failover, lost a write of the old primary
        // that a flush through the new one then vouched for; it later restored from
        // the log alone and served zeroes for it). A copy that cannot flush fails the
        // comparison, and is marked dead.
        let b = self.blocks.clone();
        lazarus_rpc::rt::blocking(move || b.flush())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("this copy cannot be made durable: {e}"))?;
        Ok(local.root().0.to_vec())
    }

    async fn ask_root(&self, v: &VolumeInfo, node: NodeId) -> Result<[u8; 16], String> {
        let addr = self.rpc_addr(node).ok_or("no address")?;
        let body = serde_json::to_vec(&RootReq {
            volume: v.name.clone(),
            uid: v.uid,
            epoch: v.epoch,
        })
        .map_err(|e| e.to_string())?;
        let b = self
            .network
            .client(&addr)
            .call(KIND_ROOT, &body, ROOT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        b.as_slice()
            .try_into()
            .map_err(|_| format!("bad root of {} bytes", b.len()))
    }

    /// Per volume, the epoch at which this node last compared its live copies with
    /// its own (as their primary).
    pub fn reconciled_epochs(&self) -> std::collections::BTreeMap<String, u64> {
        self.reconciliation
            .done
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Whether this node compared the live copies of `volume` at `epoch` with its own.
    pub fn reconciled(&self, volume: &str, epoch: u64) -> bool {
        self.reconciliation.done.lock().get(volume) == Some(&epoch)
    }

    /// Starts reconciling every volume this node is primary of and has not reconciled
    /// at its current epoch (called from the lease loop).
    pub(crate) fn reconcile_primaries(self: &Arc<Self>) {
        let meta = self.store.meta();
        for v in meta.volumes.values() {
            if v.primary != self.id || self.reconciled(&v.name, v.epoch) {
                continue;
            }
            if !self.reconciliation.running.lock().insert(v.name.clone()) {
                continue;
            }
            let c = self.clone();
            let name = v.name.clone();
            let gen = self.reconcile_gen(&v.name);
            tokio::spawn(async move {
                let r = c.reconcile_volume(&name).await;
                c.reconciliation.running.lock().remove(&name);
                match r {
                    // Unless a write diverged meanwhile: the next round compares again.
                    Ok(Some(epoch)) if c.reconcile_gen(&name) == gen => {
                        c.reconciliation.done.lock().insert(name, epoch);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(volume = %name, error = %e, "live copies not reconciled yet; not serving")
                    }
                }
            });
        }
    }

    /// A write applied to this primary's copy did not reach every replica that takes
    /// updates, and they were not marked dead either (its lease lapsed before it sent
    /// the write, a metadata change could not be committed, ...): its client got an
    /// error, but the live copies may now differ. This primary serves the volume again
    /// only after it compared them anew, as after a promotion: each copy that differs
    /// is committed dead and resyncs. (Simulator seed 1890: without it a failed write
    /// stayed on the primary alone while every copy was live, and the copies' roots
    /// never agreed again.)
    pub fn reconcile_again(&self, volume: &str) {
        *self
            .reconciliation
            .gen
            .lock()
            .entry(volume.to_string())
            .or_default() += 1;
        if self.reconciliation.done.lock().remove(volume).is_some() {
            tracing::warn!(
                volume,
                "a write reached this primary's copy but not every replica: comparing the live copies again before serving"
            );
        }
    }

    fn reconcile_gen(&self, volume: &str) -> u64 {
        self.reconciliation
            .gen
            .lock()
            .get(volume)
            .copied()
            .unwrap_or(0)
    }

    /// Compares every live replica's root with this primary's; commits each that
    /// differs (or does not answer) dead. `Ok(Some(epoch))` once done at `epoch`.
    async fn reconcile_volume(&self, name: &str) -> Result<Option<u64>, String> {
        let mut first_ask: Option<Instant> = None;
        loop {
            let Some(v) = self.store.meta().volumes.get(name).cloned() else {
                return Ok(None);
            };
            if v.primary != self.id {
                return Ok(None);
            }
            let Some(local) = self.blocks.volume(name).filter(|l| l.meta.uid == v.uid) else {
                return Err("no local copy".into());
            };
            // Writes of this primary's still on their way to the replicas (at the
            // same epoch, after `reconcile_again`) finish first: their answer says
            // whether each replica applied them, and until then the roots differ
            // without any copy having missed anything. New ones wait for this
            // comparison (the lease needs it).
            let quiet = Instant::now() + Duration::from_secs(5);
            let in_flight = self.updates_in_flight(name);
            while in_flight.load(Ordering::Acquire) > 0 && Instant::now() < quiet {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let own = {
                // As a replica this node may still be applying an update of the
                // previous primary's: let it finish first.
                let guard = self.apply_guard(name);
                let _all = guard.write().await;
                local.root().0
            };
            let live: Vec<NodeId> = v.live().into_iter().filter(|n| *n != self.id).collect();
            let mut pending = false;
            // A replica's patience counts from the first root asked for, not from
            // before the writes in flight drained: each replica flushes its store
            // before it answers, which on a busy device may outlast one request.
            let asked = *first_ask.get_or_insert_with(Instant::now);
            for n in live {
                let answer = self.ask_root(&v, n).await;
                match verdict(&own, &answer, asked.elapsed()) {
                    Verdict::Equal => {}
                    Verdict::Retry => pending = true,
                    Verdict::MarkDead(why) => {
                        self.record_out(&v, n).await?;
                        let cmd = MetaCommand::SetReplicaState {
                            volume: name.to_string(),
                            node: n,
                            state: ReplicaState::Dead,
                            epoch: v.epoch,
                            at_ms: crate::cluster::unix_ms(),
                            since: None,
                            source: None,
                        };
                        match self.propose(cmd).await {
                            Ok(MetaResponse::Volume(nv)) => {
                                self.record_out_at(&v, n, nv.changed_at).await?;
                                tracing::warn!(volume = name, replica = n, why, answer = ?answer.as_ref().map(|_| "root"), "live copy marked dead by the new primary's check; it resyncs");
                                lazarus_observe::events::record(
                                    "state",
                                    name,
                                    format!("n{n} marked dead: {why} (epoch {})", v.epoch),
                                );
                            }
                            other => {
                                return Err(format!("could not mark n{n} dead: {other:?}"));
                            }
                        }
                        // The metadata changed: look again.
                        pending = true;
                    }
                }
            }
            if !pending {
                if self.store.meta().volumes.get(name).map(|m| m.epoch) == Some(v.epoch) {
                    tracing::info!(
                        volume = name,
                        epoch = v.epoch,
                        "live copies reconciled with this primary"
                    );
                    return Ok(Some(v.epoch));
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
