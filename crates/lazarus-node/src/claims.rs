//! Claims this node was granted at the recovery server, kept on its own disk.
//!
//! A node that holds a volume at the recovery server beyond what the metadata records
//! (a survivor, a take-over, a primary without a majority) acknowledges writes that
//! exist only on its copy and in the recovery log. The hold itself lives in memory; if
//! the node crashes while the recovery server is down too, nothing that answers says
//! the node's copy is ahead of the metadata's primary. Before the start-up self-check
//! would mark the copy dead, it would resync from that primary, overwriting the writes
//! it held, and the cluster would adopt the emptied copy once the recovery server came
//! back (RELIABILITY.md, finding 9: simulator seed 2421 with disk faults read zeroes
//! for a flushed block).
//!
//! So a granted claim is written to `claims.json` (atomically, synced) before the hold
//! serves anything. While a claim on disk is newer than the metadata's failure count ID
//! (`Cluster::claimed_beyond_metadata`), the copy is neither marked dead by the
//! self-check nor resynced, it answers no root check and takes no update from another
//! primary, and its pings say it holds the volume: no primary of the older state can
//! reconcile without it, nor mark it dead without the recovery server, which refuses
//! that once it is back. The leader then adopts what the recovery server decided.
//! Once the metadata caught up, the claim is forgotten (`Cluster::settle_claims`).

use crate::cluster::Cluster;
use lazarus_cluster::{MetaCommand, ReplicaState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One claim granted to this node: the volume's uid, the failure count ID it was
/// granted at, and the epoch the holder serves at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldClaim {
    pub uid: u64,
    pub fcid: u64,
    pub epoch: u64,
}

/// The claims file and its contents.
pub struct HeldClaims {
    path: PathBuf,
    map: parking_lot::Mutex<BTreeMap<String, HeldClaim>>,
    /// Serializes writes of the file (each writes the whole map).
    file: tokio::sync::Mutex<()>,
}

impl HeldClaims {
    /// Loads `claims.json` from `data_dir` (none yet: no claims). A file that cannot be
    /// read or parsed is reported and moved aside (`claims.json.unreadable`).
    pub fn load(data_dir: &std::path::Path) -> HeldClaims {
        let path = data_dir.join("claims.json");
        let map = if lazarus_io::fs::exists(&path) {
            match lazarus_io::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(m) => m,
                Err(e) => {
                    // Kept aside for an operator; this node goes on as if it held
                    // none (its copies resync as after any crash).
                    let aside = data_dir.join("claims.json.unreadable");
                    let _ = lazarus_io::fs::rename(&path, &aside);
                    tracing::error!(path = %path.display(), kept = %aside.display(), error = %e, "the file of claims held at the recovery server is unreadable: this node cannot tell whether it holds writes the metadata does not know of");
                    BTreeMap::new()
                }
            }
        } else {
            BTreeMap::new()
        };
        HeldClaims {
            path,
            map: parking_lot::Mutex::new(map),
            file: Default::default(),
        }
    }

    pub fn get(&self, volume: &str) -> Option<HeldClaim> {
        self.map.lock().get(volume).copied()
    }

    pub fn all(&self) -> BTreeMap<String, HeldClaim> {
        self.map.lock().clone()
    }

    /// Records `claim` for `volume` durably: when this returns `Ok`, a crash keeps it.
    pub async fn set(&self, volume: &str, claim: HeldClaim) -> Result<(), String> {
        self.change(|m| {
            m.insert(volume.to_string(), claim);
            true
        })
        .await
    }

    /// Forgets the volume's claim if it is still `claim` (a newer one granted since
    /// stays).
    pub async fn forget(&self, volume: &str, claim: HeldClaim) -> Result<(), String> {
        self.change(|m| m.get(volume) == Some(&claim) && m.remove(volume).is_some())
            .await
    }

    async fn change(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, HeldClaim>) -> bool,
    ) -> Result<(), String> {
        let _file = self.file.lock().await;
        let data = {
            let mut m = self.map.lock();
            if !f(&mut m) {
                return Ok(());
            }
            serde_json::to_vec_pretty(&*m).map_err(|e| e.to_string())?
        };
        let path = self.path.clone();
        lazarus_io::rt::blocking(move || lazarus_io::fs::write_atomic(&path, &data))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot record the claim in {}: {e}", self.path.display()))
    }
}

impl Cluster {
    /// Records a claim the recovery server granted this node, before the node serves
    /// anything under it.
    pub(crate) async fn persist_claim(
        &self,
        volume: &str,
        uid: u64,
        fcid: u64,
        epoch: u64,
    ) -> Result<(), String> {
        let Some(r) = self.recovery.as_ref() else {
            return Ok(());
        };
        r.claims.set(volume, HeldClaim { uid, fcid, epoch }).await
    }

    /// Whether this node holds, or held before it restarted, a claim on `volume` at the
    /// recovery server newer than the metadata knows: its copy may hold acknowledged
    /// writes no other copy has.
    pub fn claimed_beyond_metadata(&self, volume: &str) -> bool {
        if self.held_beyond_metadata(volume) {
            return true;
        }
        let Some(c) = self.recovery.as_ref().and_then(|r| r.claims.get(volume)) else {
            return false;
        };
        self.store
            .meta()
            .volumes
            .get(volume)
            .is_some_and(|v| v.uid == c.uid && c.fcid > v.failure_count_id)
    }

    /// Whether `claimed_beyond_metadata` holds for some volume.
    pub fn claimed_beyond_metadata_any(&self) -> bool {
        if self.holds_beyond_metadata_any() {
            return true;
        }
        let Some(r) = self.recovery.as_ref() else {
            return false;
        };
        r.claims
            .all()
            .keys()
            .any(|n| self.claimed_beyond_metadata(n))
    }

    /// Whether the recovery server answers and no longer knows `claim` (it lost its
    /// state: its failure count ID for the volume is below the claim's, or it has none).
    /// The leader has nothing to adopt then; the copy stops waiting for it. Asked
    /// anew, so a state polled before the claim was granted cannot pass for it.
    async fn claim_lost_at_rs(&self, volume: &str, claim: &HeldClaim) -> bool {
        let Some(r) = self.recovery.as_ref() else {
            return false;
        };
        let Some(states) = r.states_now().await else {
            return false;
        };
        let known = states
            .get(volume)
            .is_some_and(|s| s.coord.uid == claim.uid && s.coord.fcid >= claim.fcid);
        if !known {
            tracing::error!(volume, fcid = claim.fcid, "the recovery server no longer knows this node's claim (its state was lost): writes acknowledged under it may exist on this copy alone; it follows the metadata's primary from now on");
            lazarus_observe::events::record(
                "adopt",
                volume,
                format!(
                    "n{}'s claim (failure count ID {}) is unknown to the recovery server: not adopted",
                    self.id, claim.fcid
                ),
            );
        }
        !known
    }

    /// Forgets the claims the metadata has caught up with (or whose volume is gone).
    /// A copy whose claim the metadata passed without making it primary (another
    /// holder was adopted, or the recovery server was fenced back to the old primary)
    /// may differ from the primary's: it is committed dead first, and resyncs.
    pub(crate) async fn settle_claims(&self) {
        let Some(r) = self.recovery.as_ref() else {
            return;
        };
        if !self.is_ready() {
            return;
        }
        for (name, c) in r.claims.all() {
            let meta = self.store.meta();
            let v = meta.volumes.get(&name).filter(|v| v.uid == c.uid);
            if let Some(v) = v {
                if c.fcid > v.failure_count_id && !self.claim_lost_at_rs(&name, &c).await {
                    continue;
                }
                if v.primary != self.id
                    && v.state_of(self.id) == Some(ReplicaState::Live)
                    && r.hold(&name).is_none_or(|h| h.fcid < v.failure_count_id)
                {
                    let cmd = MetaCommand::SetReplicaState {
                        volume: name.clone(),
                        node: self.id,
                        state: ReplicaState::Dead,
                        epoch: v.epoch,
                        at_ms: 0,
                        since: None,
                        source: None,
                    };
                    match tokio::time::timeout(std::time::Duration::from_secs(2), self.propose(cmd))
                        .await
                    {
                        Ok(Ok(_)) => {
                            tracing::warn!(volume = %name, fcid = c.fcid, now = v.failure_count_id, primary = v.primary, "the cluster moved past this node's claim with another primary: this copy may differ from it; marked dead until it resyncs")
                        }
                        other => {
                            tracing::warn!(volume = %name, result = ?other.map(|r| r.map_err(|e| e.to_string())), "a passed claim's copy not marked dead yet");
                            continue;
                        }
                    }
                }
            }
            if let Err(e) = r.claims.forget(&name, c).await {
                tracing::warn!(volume = %name, error = %e, "claim not forgotten");
            }
        }
    }
}
