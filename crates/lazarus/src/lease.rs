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
use lazarus_cluster::raft_store::NodeId;
use lazarus_rpc::KIND_LEASE;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const LEASE_RENEW_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub node: NodeId,
    /// (volume, epoch) pairs the asker is primary of in its metadata.
    pub volumes: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseReply {
    pub granted: Vec<(String, u64)>,
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
        let mut seen = self.lease_requests.lock();
        for (name, epoch) in req.volumes {
            // Not while the recovery server knows a newer holder than the metadata
            // does: that state is adopted first.
            let rs_ahead = |v: &lazarus_cluster::VolumeInfo| self.rs_overrides(v);
            if meta
                .volumes
                .get(&name)
                .is_some_and(|v| v.primary == req.node && v.epoch == epoch && !rs_ahead(v))
                && !self.promoting.lock().contains(&name)
            {
                seen.insert(name.clone(), (epoch, now));
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
                let req = LeaseRequest {
                    node: c.id,
                    volumes: mine,
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
                        .client(&addr)
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
