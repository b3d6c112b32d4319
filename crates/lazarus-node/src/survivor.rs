//! Whichever two of three nodes fail, the survivor serves (DESIGN.md, "Whichever two
//! of three fail"; docs/jeopardy.md, "A surviving replica").
//!
//! A replica cannot tell "the primary is dead" from "I am cut off while the primary
//! serves under the majority's lease", so the recovery server decides, as a witness
//! that sees both sides:
//!
//! - every node tells the recovery server it is alive every 100 ms (`HEARTBEAT`);
//! - a primary serves a volume only while, within `CONTACT_WINDOW` (counted from its
//!   request's send time), it heard from every live replica of it (a ping carrying its
//!   id, which the replica records) or from the recovery server;
//! - before it acknowledges a write without a copy that was live (the dead mark), the
//!   primary records that copy *out* at the recovery server, at its failure count ID;
//! - a live replica that has heard from none of the volume's other nodes for
//!   `SURVIVOR_SILENCE`, and cannot reach them now, claims the volume there: granted
//!   only if it is not out, none of the others was heard from there within
//!   `SURVIVOR_SILENCE` either, and the failure count ID is the one it knows (no
//!   promotion happened). It then serves in jeopardy, every write on the recovery
//!   server first, and the cluster adopts it when a majority is back.
//!
//! `SURVIVOR_SILENCE` (1.5 s) > `CONTACT_WINDOW` (0.6 s): a primary's last contact with
//! the replica or the recovery server was sent before it was received, so the primary
//! stopped serving before the survivor may start. The argument and its model are in
//! docs/jeopardy.md and docs/model.md.

use crate::cluster::{Cluster, PING_TIMEOUT};
use crate::config::JeopardyPolicy;
use crate::decide::{contact_ok, may_claim_survivor};
use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{ReplicaState, VolumeInfo};
use lazarus_recovery::server::{
    ClaimReq, HeartbeatReq, MemberReq, VolumeState, CONTACT_WINDOW, KIND_RS_HEARTBEAT,
    KIND_RS_MEMBER,
};
use lazarus_rpc::KIND_PING;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const CONTACT_INTERVAL: Duration = Duration::from_millis(100);
use lazarus_rpc::msg::PING_HELD;

/// A volume's (failure count ID, holder, copies out) as a heartbeat reply gives them.
pub type RsCoord = (u64, Option<NodeId>, Vec<NodeId>);

/// Whom this node heard from, and when: what the survivor protocol decides on.
#[derive(Default)]
pub struct Contacts {
    /// When (send time) each peer last answered this node's ping.
    peers: parking_lot::Mutex<HashMap<NodeId, Instant>>,
    /// When each peer's ping last arrived here.
    heard: parking_lot::Mutex<HashMap<NodeId, Instant>>,
    /// When (send time) the recovery server last acknowledged this node's heartbeat.
    rs: parking_lot::Mutex<Option<Instant>>,
    /// Per volume, the recovery server's (failure count ID, holder, copies out) as its
    /// last heartbeat reply gave them.
    rs_coord: parking_lot::Mutex<HashMap<String, RsCoord>>,
    /// When the contact loop first ran.
    since: parking_lot::Mutex<Option<Instant>>,
}

/// How long a copy's record at the recovery server, refused at a failure count ID this
/// node's own claim may just have moved, waits for that claim to show here.
const CLAIM_SETTLE: Duration = Duration::from_secs(2);

impl Cluster {
    /// A ping's body: the sender's id, so the receiver knows whom it heard from.
    pub(crate) fn ping_body(&self) -> [u8; 8] {
        self.id.to_be_bytes()
    }

    /// Records an incoming ping's sender.
    pub(crate) fn heard_from(&self, body: &[u8]) {
        // Only members are recorded: a ping from anyone else (any id in 8 bytes)
        // must not grow the map.
        if let Ok(b) = <[u8; 8]>::try_from(body) {
            let from = u64::from_be_bytes(b);
            if self.store.meta().nodes.contains_key(&from) {
                self.contacts.heard.lock().insert(from, Instant::now());
            }
        }
    }

    /// See `contact_ok`: for a volume this node is primary of (always true without a
    /// recovery server: then no replica ever claims a volume on its own).
    pub fn contact_valid(&self, volume: &str) -> bool {
        if self.recovery.is_none() {
            return true;
        }
        let meta = self.store.meta();
        let Some(v) = meta.volumes.get(volume) else {
            return true;
        };
        // The recovery server says another node claimed the volume after this node's
        // view of it: stop serving it, whatever the replicas answer.
        if self
            .contacts
            .rs_coord
            .lock()
            .get(volume)
            .is_some_and(|(fcid, holder, _)| *fcid > v.failure_count_id && *holder != Some(self.id))
        {
            return false;
        }
        let live: Vec<NodeId> = v.live().into_iter().filter(|n| *n != self.id).collect();
        let contact = self.contacts.peers.lock();
        contact_ok(
            &live,
            |n| contact.get(&n).copied(),
            *self.contacts.rs.lock(),
            Instant::now(),
        )
    }

    /// A primary that has heard from neither every live replica nor the recovery server
    /// for a while stops asking for its lease, so the leader promotes a replica that
    /// may be in contact (the primary cannot serve anyway).
    pub fn gives_up_lease(&self, volume: &str) -> bool {
        self.recovery.is_some()
            && self
                .contacts
                .since
                .lock()
                .is_some_and(|t| t.elapsed() > CONTACT_WINDOW * 2)
            && !self.contact_valid(volume)
    }

    /// Every 100 ms: tells the recovery server this node is alive, and (for the volumes
    /// it is primary of) pings their live replicas, recording each answer's send time.
    pub fn contact_loop(self: &Arc<Self>) {
        let Some(r) = self.recovery.clone() else {
            return;
        };
        let c = self.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&HeartbeatReq { node: c.id }).unwrap_or_default();
            // Per peer: since when its pings have failed.
            let mut failing: std::collections::HashMap<NodeId, Instant> = Default::default();
            loop {
                tokio::time::sleep(CONTACT_INTERVAL).await;
                if !c.is_ready() && !c.serves_on_hold() {
                    continue;
                }
                let sent = Instant::now();
                c.contacts.since.lock().get_or_insert(sent);
                let rs = r.client.call(KIND_RS_HEARTBEAT, &body, PING_TIMEOUT);
                let meta = c.store.meta();
                let mut targets: Vec<NodeId> = meta
                    .volumes
                    .values()
                    .filter(|v| v.primary == c.id)
                    .flat_map(|v| v.live())
                    .filter(|n| *n != c.id)
                    .collect();
                targets.sort_unstable();
                targets.dedup();
                let ping = c.ping_body();
                let pings = targets.iter().map(|n| {
                    let addr = c.rpc_addr(*n).unwrap_or_default();
                    let client = c.network.control(&addr);
                    async move { (*n, client.call(KIND_PING, &ping, PING_TIMEOUT).await) }
                });
                let (rs, pings) = tokio::join!(rs, futures::future::join_all(pings));
                if let Ok(reply) = rs {
                    if let Ok(coord) =
                        serde_json::from_slice::<std::collections::HashMap<String, RsCoord>>(&reply)
                    {
                        // This node's copies that are live again but still out there
                        // (its "in" was lost): say so again (ordered by index).
                        for v in meta.volumes.values() {
                            if v.state_of(c.id) == Some(ReplicaState::Live)
                                && coord.get(&v.name).is_some_and(|x| x.2.contains(&c.id))
                            {
                                c.record_in(v).await;
                            }
                        }
                        *c.contacts.rs_coord.lock() = coord;
                    }
                    *c.contacts.rs.lock() = Some(sent);
                }
                {
                    let mut contact = c.contacts.peers.lock();
                    for (n, res) in &pings {
                        if res.as_ref().is_ok_and(|b| b != PING_HELD) {
                            contact.insert(*n, sent);
                            failing.remove(n);
                        } else {
                            failing.entry(*n).or_insert(sent);
                        }
                    }
                }
                // Policy `accept` with the recovery server out of reach: a live replica
                // that stopped answering is marked dead at once, so the primary serves
                // on with the copies it hears from (under `suspend` it waits for the
                // recovery server or the replica, rather than risk a survivor serving
                // without its writes).
                let rs_fresh = c
                    .contacts
                    .rs
                    .lock()
                    .is_some_and(|t| t.elapsed() < CONTACT_WINDOW);
                if c.policy() == JeopardyPolicy::Accept && !rs_fresh && c.is_ready() {
                    for (n, since) in &failing {
                        if since.elapsed() < CONTACT_WINDOW {
                            continue;
                        }
                        for v in meta.volumes.values().filter(|v| {
                            v.primary == c.id && v.state_of(*n) == Some(ReplicaState::Live)
                        }) {
                            c.mark_unreachable_dead(v, *n).await;
                        }
                    }
                }
            }
        });
    }

    /// Commits `node`'s copy of `v` dead as a primary does before it acknowledges a
    /// write without it: recorded out at the recovery server first (so it never claims
    /// the volume as its survivor), then the metadata (within `wait`), then the record
    /// again at the change's log index. The volume as committed, or why not.
    pub(crate) async fn commit_dead_recorded(
        &self,
        v: &VolumeInfo,
        node: NodeId,
        wait: Duration,
    ) -> Result<VolumeInfo, String> {
        self.record_out(v, node).await?;
        let cmd = lazarus_cluster::MetaCommand::SetReplicaState {
            volume: v.name.clone(),
            node,
            state: ReplicaState::Dead,
            epoch: v.epoch,
            at_ms: crate::cluster::unix_ms(),
            since: None,
            source: None,
        };
        match tokio::time::timeout(wait, self.propose(cmd)).await {
            Ok(Ok(lazarus_cluster::MetaResponse::Volume(nv))) => {
                let _ = self.record_out_at(v, node, nv.changed_at).await;
                Ok(nv)
            }
            Ok(Ok(other)) => Err(format!("{other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("not committed within {wait:?}")),
        }
    }

    /// Commits a live replica that stopped answering dead (recorded out first, under
    /// the policy), as a failed update would.
    async fn mark_unreachable_dead(&self, v: &VolumeInfo, node: NodeId) {
        match self
            .commit_dead_recorded(v, node, Duration::from_secs(2))
            .await
        {
            Ok(_) => {
                tracing::warn!(volume = %v.name, replica = node, "replica stopped answering with the recovery server out of reach: marked dead (policy accept)");
                lazarus_observe::events::record(
                    "state",
                    &v.name,
                    format!(
                        "n{node} marked dead (stopped answering; recovery server out of reach)"
                    ),
                );
            }
            Err(e) => {
                tracing::info!(volume = %v.name, replica = node, error = %e, "unreachable replica not marked dead")
            }
        }
    }

    /// Before the primary acknowledges writes without `node`'s copy: records it out at
    /// the recovery server, so it never claims the volume as its survivor. Unreachable
    /// recovery server: `suspend` retries until its deadline, `accept` goes on (logged);
    /// fenced (the volume moved on: a survivor or a promotion claimed it): an error —
    /// this primary must not acknowledge the write.
    pub(crate) async fn record_out(&self, v: &VolumeInfo, node: NodeId) -> Result<(), String> {
        self.record_out_at(v, node, self.applied_index().max(v.changed_at))
            .await
    }

    /// The Raft log index this node has applied (0 before any).
    pub(crate) fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// `record_out` with the Raft log index it is ordered by.
    pub(crate) async fn record_out_at(
        &self,
        v: &VolumeInfo,
        node: NodeId,
        index: u64,
    ) -> Result<(), String> {
        let Some(r) = self.recovery.as_ref() else {
            return Ok(());
        };
        if v.replicas.len() < 2 || self.held_beyond_metadata(&v.name) {
            return Ok(());
        }
        let mut fcid = v.failure_count_id;
        let deadline = Instant::now() + r.suspend;
        loop {
            let body = serde_json::to_vec(&MemberReq {
                volume: v.name.clone(),
                uid: v.uid,
                fcid,
                node,
                out: true,
                index,
            })
            .map_err(|e| e.to_string())?;
            match r.client.call(KIND_RS_MEMBER, &body, PING_TIMEOUT * 3).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_fenced() => {
                    // This node's own claim (the jeopardy loop entering jeopardy for
                    // the volume) may have moved the failure count ID on since the
                    // caller's view: once that claim is in place, its hold supersedes
                    // the record (in jeopardy no copy survives without the log, and
                    // this write goes to the log), or the record goes again at the
                    // newer ID while this node is still the primary. Anyone else's
                    // claim fences the write.
                    // The claim may have just been granted there while its hold or
                    // its metadata change is still on its way here (a write that
                    // finds both replicas gone while the jeopardy loop claims: five
                    // nodes, two killed at once): wait for it a moment before
                    // calling the write fenced.
                    drop(r.claiming.lock().await);
                    let settle = Instant::now() + CLAIM_SETTLE;
                    let newer = loop {
                        if self.held_beyond_metadata(&v.name) {
                            return Ok(());
                        }
                        match self.effective(&v.name) {
                            Some(nv)
                                if nv.uid == v.uid
                                    && nv.primary == self.id
                                    && nv.failure_count_id > fcid =>
                            {
                                break Some(nv.failure_count_id);
                            }
                            Some(nv) if nv.uid == v.uid && nv.primary == self.id => {}
                            _ => break None,
                        }
                        if Instant::now() >= settle {
                            break None;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    };
                    match newer {
                        Some(f) => fcid = f,
                        None => {
                            return Err(format!(
                                "the recovery server refused to record n{node} out: {e}"
                            ))
                        }
                    }
                }
                Err(e) if e.is_unreachable() && self.policy() == JeopardyPolicy::Accept => {
                    tracing::error!(volume = %v.name, node, error = %e, "copy not recorded out at the recovery server (policy accept): it could claim the volume as its survivor");
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(volume = %v.name, node, error = %e, "recording a copy out: recovery server unreachable (policy suspend)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(format!(
                        "could not record n{node} out at the recovery server within {:?}: {e}",
                        r.suspend
                    ))
                }
            }
        }
    }

    /// A copy turned live: it may be a survivor again (best effort; a stale `out` only
    /// keeps it from claiming).
    pub(crate) async fn record_in(&self, v: &VolumeInfo) {
        let Some(r) = self.recovery.as_ref() else {
            return;
        };
        let Ok(body) = serde_json::to_vec(&MemberReq {
            volume: v.name.clone(),
            uid: v.uid,
            fcid: v.failure_count_id,
            node: self.id,
            out: false,
            index: v.live_at.get(&self.id).copied().unwrap_or(0),
        }) else {
            return;
        };
        if let Err(e) = r.client.call(KIND_RS_MEMBER, &body, PING_TIMEOUT * 3).await {
            tracing::info!(volume = %v.name, error = %e, "copy not recorded back in at the recovery server");
        }
    }

    /// On a live replica whose primary and fellow replicas have all gone silent:
    /// claims the volume at the recovery server as its survivor and serves it in
    /// jeopardy.
    ///
    /// Not under policy `accept`: there a primary that cannot reach the recovery
    /// server marks a silent replica dead and acknowledges writes without recording
    /// it out first (`record_out`), so the recovery server cannot tell a replica that
    /// missed acknowledged writes from one that did not, and a stale copy would serve
    /// (docs/model.md, `survivor_without_out`). The volume waits for another node.
    /// Nor on a node started with `accept`, whatever the cluster's policy: a node cut
    /// off while the others were restarted with `accept` still sees `suspend` in its
    /// view, so the view alone cannot vouch that no primary goes on without recording
    /// it out. A survivor claim needs both the cluster and the node under `suspend`.
    pub(crate) async fn maybe_survive(&self, v: &VolumeInfo, rs: Option<&VolumeState>) {
        let Some(r) = self.recovery.as_ref() else {
            return;
        };
        if self.policy() == JeopardyPolicy::Accept || r.configured_policy == JeopardyPolicy::Accept
        {
            return;
        }
        if !self.is_ready() || r.hold(&v.name).is_some() || !self.device_usable() {
            return;
        }
        if rs.is_some_and(|s| s.coord.jeopardy || s.coord.out.contains(&self.id)) {
            return;
        }
        let now = Instant::now();
        // Never heard from a node since this process started: count from the start.
        let silent_enough = |now: Instant| {
            let heard = self.contacts.heard.lock();
            may_claim_survivor(
                v,
                self.id,
                |n| heard.get(&n).copied().or(Some(self.started)),
                now,
            )
        };
        if !silent_enough(now) {
            return;
        }
        let meta = self.store.meta();
        let others: Vec<NodeId> = v
            .replicas
            .iter()
            .copied()
            .filter(|n| *n != self.id)
            .collect();
        for n in &others {
            if self.answers(&meta, *n).await {
                return;
            }
        }
        let epoch = rs.map_or(v.epoch, |s| s.coord.epoch.max(v.epoch)) + 1;
        let sent = Instant::now();
        let req = ClaimReq {
            base_index: None,
            takeover: true,
            survivor_of: Some(others.clone()),
            volume: v.name.clone(),
            uid: v.uid,
            expect_fcid: v.failure_count_id,
            holder: self.id,
            epoch,
            jeopardy: true,
            config: serde_json::to_value(&*meta).ok(),
            base: vec![self.id],
        };
        let Some(fcid) = self.claim_and_hold(&req, sent, "survivor", false).await else {
            return;
        };
        // What this copy applied is the volume; make it durable before serving (the
        // log starts from it). Then wait out a contact window and look again: a ping
        // that reached this node after its check above may have let the primary serve
        // on for that long.
        let store = self.blocks.clone();
        let flushed = lazarus_rpc::rt::blocking(move || store.flush()).await;
        tokio::time::sleep(CONTACT_WINDOW).await;
        if !silent_enough(Instant::now()) {
            tracing::warn!(volume = %v.name, "survivor claim granted, but another node was heard from since: not serving; the cluster sorts it out");
            r.holds.lock().remove(&v.name);
            return;
        }
        match flushed {
            Ok(Ok(())) => {
                if let Some(h) = r.holds.lock().get_mut(&v.name) {
                    h.restoring = false;
                }
                tracing::warn!(volume = %v.name, fcid, epoch, silent = ?others, "the primary and every other copy are silent: this replica serves the volume as its survivor, every write on the recovery server first");
                lazarus_observe::events::record(
                    "survivor",
                    &v.name,
                    format!(
                        "n{} serves as the surviving replica (failure count ID {fcid}); n{:?} silent",
                        self.id, others
                    ),
                );
            }
            other => {
                tracing::error!(volume = %v.name, result = ?other.map(|r| r.map_err(|e| e.to_string())), "survivor claim granted but this copy cannot be made durable; not serving");
                r.holds.lock().remove(&v.name);
            }
        }
    }
}
