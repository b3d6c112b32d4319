//! Primary leases. A primary executes client requests only while it holds a lease on
//! the volume at its epoch; this is what keeps a primary that was paused (SIGSTOP, a
//! stalled VM) and replaced meanwhile from serving stale reads or sending updates.
//!
//! The primary *asks* the Raft leader every `LEASE_RENEW_INTERVAL`; the leader confirms
//! its leadership with a quorum (`ensure_linearizable`, which also brings its metadata
//! up to date) and grants the volumes whose primary, at that epoch, is the asker. The
//! lease runs from when the primary *sent* the request, on its own clock, so a reply
//! delayed by any amount never extends it. The leader replaces a primary that has not
//! asked for `PRIMARY_SILENCE_MAX`, counted from when it *received* the last request —
//! later than the send — and longer than `LEASE`: the old primary's lease has run out
//! before a new primary exists. A primary that is itself the leader grants itself the
//! same way, counting from before its quorum check.

use crate::cluster::{Cluster, PING_TIMEOUT};
pub use lazarus_rpc::msg::{LeaseReply, LeaseRequest};
use lazarus_rpc::KIND_LEASE;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const LEASE_RENEW_INTERVAL: Duration = Duration::from_millis(100);

/// The leases of one node: those it holds as a primary, and, on the Raft leader, the
/// requests it has seen and the volumes whose primary it is replacing.
#[derive(Default)]
pub struct Leases {
    /// Per volume this node is primary of: (epoch, until when) it may serve it, granted
    /// by the Raft leader after confirming its leadership with a quorum.
    held: parking_lot::Mutex<HashMap<String, (u64, Instant)>>,
    /// On the leader: per volume, (epoch, when) its primary last asked for a lease.
    pub(crate) requests: parking_lot::Mutex<HashMap<String, (u64, Instant)>>,
    /// On the leader: volumes whose primary it is replacing (from the silence it saw
    /// to the `Promote` commit), with how many tasks are doing so (a failover and a
    /// hand-over may overlap; the set stays until the last one ends): it grants their
    /// old primary no lease meanwhile.
    promoting: parking_lot::Mutex<HashMap<String, usize>>,
    /// On the leader: volumes whose primary role it is handing over on purpose
    /// (`membership.rs`, `hand_over`). Their primary is up: its requests still count as
    /// signs of life, and no failover of them starts meanwhile.
    pub(crate) handing_over: parking_lot::Mutex<HashSet<String>>,
}

impl Leases {
    /// A promotion of `volume` begins: no lease for its old primary until it ends.
    pub(crate) fn begin_promotion(&self, volume: &str) {
        *self.promoting.lock().entry(volume.to_string()).or_default() += 1;
    }

    /// A promotion begun with `begin_promotion` ended (committed or not).
    pub(crate) fn end_promotion(&self, volume: &str) {
        let mut p = self.promoting.lock();
        if let Some(n) = p.get_mut(volume) {
            *n -= 1;
            if *n == 0 {
                p.remove(volume);
            }
        }
    }

    /// Whether a promotion of `volume` is under way on this leader.
    pub(crate) fn is_promoting(&self, volume: &str) -> bool {
        self.promoting.lock().contains_key(volume)
    }

    /// Records leases on `(volume, epoch)` pairs, valid until `until`.
    pub fn grant(&self, volumes: &[(String, u64)], until: Instant) {
        let mut held = self.held.lock();
        for (volume, epoch) in volumes {
            // This node leads and is promoting another copy of the volume (its own
            // device failed): a renewal answered just before must not put back the
            // lease the promotion dropped.
            if self.is_promoting(volume) {
                continue;
            }
            held.insert(volume.clone(), (*epoch, until));
        }
    }

    /// Whether a lease on `volume` at `epoch` runs at `now`.
    pub fn valid(&self, volume: &str, epoch: u64, now: Instant) -> bool {
        matches!(self.held.lock().get(volume), Some((e, until)) if *e == epoch && now < *until)
    }

    /// Drops the lease on `volume` (the leader replaces this node as its primary).
    pub fn revoke(&self, volume: &str) {
        self.held.lock().remove(volume);
    }

    /// The volumes with a lease running at `now`, sorted.
    pub fn held(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .held
            .lock()
            .iter()
            .filter(|(_, (_, until))| now < *until)
            .map(|(name, _)| name.clone())
            .collect();
        v.sort();
        v
    }
}

impl Cluster {
    /// On the leader: grants the leases a primary asks for, after confirming this
    /// node still leads.
    pub(crate) async fn serve_lease(&self, req: LeaseRequest) -> Result<LeaseReply, String> {
        match tokio::time::timeout(PING_TIMEOUT, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("not the leader: {e}")),
            Err(_) => return Err("leadership not confirmed in time".into()),
        }
        let meta = self.store.meta();
        let now = Instant::now();
        let mut granted = Vec::new();
        let mut seen = self.leases.requests.lock();
        for (name, epoch) in req.volumes {
            // Not while the recovery server knows a newer holder than the metadata
            // does: that state is adopted first.
            let rs_ahead = |v: &lazarus_cluster::VolumeInfo| self.rs_overrides(v);
            if meta
                .volumes
                .get(&name)
                .is_some_and(|v| v.primary == req.node && v.epoch == epoch && !rs_ahead(v))
            {
                if self.leases.is_promoting(&name) {
                    // A hand-over: the primary is up (a sign of life), but gets no
                    // lease until the change is committed or given up.
                    if self.leases.handing_over.lock().contains(&name) {
                        seen.insert(name.clone(), (epoch, now));
                    }
                    continue;
                }
                seen.insert(name.clone(), (epoch, now));
                // In jeopardy under `suspend` a primary serves on its hold at the
                // recovery server alone (`hold_only`), the Raft lease only telling it
                // that it still has a majority. One whose view has not caught up with
                // the jeopardy flag would serve on the lease (whatever the
                // policies): none for it (its request still counts as a sign of
                // life).
                if meta.volumes.get(&name).is_some_and(|v| v.recovery_flag)
                    && !req.jeopardy.contains(&name)
                {
                    continue;
                }
                granted.push((name, epoch));
            }
        }
        Ok(LeaseReply { granted })
    }

    /// On every node: keeps the leases of the volumes it is primary of.
    pub fn lease_loop(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW_INTERVAL).await;
                // A node still starting up may act on an old view: no lease yet.
                if !c.is_ready() {
                    continue;
                }
                c.reconcile_primaries();
                let meta = c.store.meta();
                let mine: Vec<(String, u64)> = meta
                    .volumes
                    .values()
                    .filter(|v| v.primary == c.id && !c.gives_up_lease(&v.name))
                    .map(|v| (v.name.clone(), v.epoch))
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let Some(leader) = c.raft.metrics().borrow().current_leader else {
                    continue;
                };
                let asked = Instant::now();
                let jeopardy = meta
                    .volumes
                    .values()
                    .filter(|v| v.primary == c.id && v.recovery_flag)
                    .map(|v| v.name.clone())
                    .collect();
                let req = LeaseRequest {
                    node: c.id,
                    volumes: mine,
                    jeopardy,
                };
                let reply = if leader == c.id {
                    c.serve_lease(req).await
                } else {
                    let Some(addr) = c.rpc_addr(leader) else {
                        continue;
                    };
                    let body = serde_json::to_vec(&req).unwrap_or_default();
                    match c
                        .network
                        .control(&addr)
                        .call(KIND_LEASE, &body, PING_TIMEOUT)
                        .await
                    {
                        Ok(b) => serde_json::from_slice::<Result<LeaseReply, String>>(&b)
                            .unwrap_or_else(|e| Err(format!("bad lease reply: {e}"))),
                        Err(e) => Err(e.to_string()),
                    }
                };
                match reply {
                    Ok(r) => c.grant(&r.granted, asked),
                    Err(e) => tracing::debug!(error = %e, "lease not renewed"),
                }
            }
        });
    }
}
