//! Nodes marked out and their copies rebuilt elsewhere (re-replication).
//!
//! A node that answers no one for the cluster's out-time (`out_after_secs`, default
//! 10 minutes) is marked out by the leader (`MetaCommand::SetOut`). From then on no
//! copy is placed on it and it resyncs none of the copies it still holds; each of them
//! is rebuilt on another node: the leader places a new copy (`AddCopy`, dead and stale:
//! it holds nothing), which turns live at the end of an ordinary Merkle resync from the
//! primary (so only mapped data moves, one page at a time), and only then drops the out
//! node's copy (`DropCopy`). Until the replacement is live the old copy stays in the
//! placement, where a repair or a promotion that needs it still finds it. A node whose
//! copies are all gone from the placement and that answers again is marked back in;
//! when it starts, or as soon as its metadata shows the drop, it deletes the copies it
//! still holds (`Cluster::reconcile`): a stale copy is removed, never served.
//!
//! The decisions are pure functions (`decide::placement_step`, `decide::may_mark_in`);
//! this loop gathers what they need and proposes what they say, one step per volume
//! and round, on the leader only.

use crate::cluster::Cluster;
use crate::decide::{
    copies_held, desired_voters, handover_target, leaving, may_mark_in, move_to_cancel,
    placement_step, primaries_held, rebalance_step, replacement_candidates, PlacementStep,
    RebalanceStep,
};
use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{MetaCommand, MetaResponse};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often the leader looks at the placement.
const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(1);
/// How long an out node must answer before it is marked back in.
const ANSWERING_BEFORE_IN: Duration = Duration::from_secs(3);
/// How long the leader waits for a retire to commit.
const PROPOSE_WAIT: Duration = Duration::from_secs(15);
/// A peer whose pings went unanswered this long does not seem up.
const RECENT: Duration = Duration::from_secs(3);
/// How long the leader waits for a Raft membership change to commit.
const GROUP_CHANGE_WAIT: Duration = Duration::from_secs(15);
/// A learner this many log entries or fewer behind the leader has caught up: it may
/// become a voter.
const CAUGHT_UP_ENTRIES: u64 = 64;

/// When each peer last answered, and since when it answers without a miss.
#[derive(Default)]
pub struct PeerSeen {
    inner: parking_lot::Mutex<HashMap<NodeId, Seen>>,
}

#[derive(Default, Clone, Copy)]
struct Seen {
    last_ok: Option<Instant>,
    ok_since: Option<Instant>,
    /// The first miss since it last answered.
    missing_since: Option<Instant>,
}

impl PeerSeen {
    pub fn record(&self, node: NodeId, ok: bool) {
        let now = Instant::now();
        let mut m = self.inner.lock();
        let s = m.entry(node).or_default();
        if ok {
            s.last_ok = Some(now);
            s.ok_since.get_or_insert(now);
            s.missing_since = None;
        } else {
            s.ok_since = None;
            s.missing_since.get_or_insert(now);
        }
    }

    fn get(&self, node: NodeId) -> Seen {
        self.inner.lock().get(&node).copied().unwrap_or_default()
    }

    /// How long `node` has answered none of this node's pings, counted from `since` at
    /// the earliest (when this node began to watch: it does not know before).
    pub(crate) fn silent_for(&self, node: NodeId, since: Instant) -> Duration {
        self.get(node)
            .last_ok
            .map_or(since, |t| t.max(since))
            .elapsed()
    }

    /// How long `node` has answered without a miss (zero if it does not answer).
    fn answering_for(&self, node: NodeId) -> Duration {
        self.get(node)
            .ok_since
            .map_or(Duration::ZERO, |t| t.elapsed())
    }
}

impl Cluster {
    /// Whether `node` seems up: anything but a node whose pings have all gone
    /// unanswered for a few seconds (this node, one not pinged yet, one that answers,
    /// one that just missed a ping).
    pub fn seems_up(&self, node: NodeId) -> bool {
        node == self.id
            || self
                .seen
                .get(node)
                .missing_since
                .is_none_or(|t| t.elapsed() < RECENT)
    }

    /// On the Raft leader, once a second: marks silent nodes out and answering ones
    /// back in, and moves each copy off an out node one step (see the module's text).
    pub fn watch_membership(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut leading_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(MEMBERSHIP_INTERVAL).await;
                let leader = c.raft.metrics().borrow().current_leader == Some(c.id);
                if !leader || c.is_isolated() || !c.is_ready() {
                    leading_since = None;
                    continue;
                }
                // Silence counts from when this node began to watch as leader: a new
                // leader does not know how long a node was silent before.
                let since = *leading_since.get_or_insert_with(Instant::now);
                c.membership_round(since).await;
            }
        });
    }

    async fn membership_round(&self, leading_since: Instant) {
        self.group_round().await;
        let meta = self.store.meta();
        let mut confirmed = false;
        for &n in meta.nodes.keys() {
            if n == self.id || meta.out.contains(&n) {
                continue;
            }
            let silent = self.seen.silent_for(n, leading_since);
            if silent < self.out_after {
                continue;
            }
            // Only a leader that a quorum follows decides (as for promotions).
            if !confirmed {
                if !self.confirm_leadership().await {
                    return;
                }
                confirmed = true;
            }
            let why = format!(
                "n{n} marked out: it answered no one for {} s; its copies are rebuilt on other nodes",
                silent.as_secs()
            );
            if self
                .propose_membership(
                    MetaCommand::SetOut {
                        node: n,
                        out: true,
                        removed: false,
                    },
                    "",
                    &why,
                )
                .await
            {
                tracing::warn!(node = n, silent_s = silent.as_secs(), "node marked out");
            }
        }
        for &n in meta.out.difference(&meta.removed) {
            let back = n == self.id || self.seen.answering_for(n) >= ANSWERING_BEFORE_IN;
            if back && may_mark_in(&meta, n) {
                let why = format!("n{n} answers again and holds no copy being replaced: back in");
                self.propose_membership(
                    MetaCommand::SetOut {
                        node: n,
                        out: false,
                        removed: false,
                    },
                    "",
                    &why,
                )
                .await;
            }
        }
        let meta = self.store.meta();
        if !meta.primary_wanted.is_empty() {
            self.wanted_primary_round(&meta).await;
        }
        let meta = self.store.meta();
        if meta.rebalancing {
            self.rebalance_round(&meta).await;
        }
        let meta = self.store.meta();
        let surplus = meta
            .volumes
            .values()
            .any(|v| v.replicas.len() > v.replication_factor());
        if meta.out.is_empty() && meta.moving.is_empty() && !surplus {
            return;
        }
        // The recovery server's view, asked now: a volume it knows at another failure
        // count ID (claimed there without a majority: a survivor, a take-over) is left
        // alone until the metadata has adopted or fenced that; and while it does not
        // answer, no copy that may count there is retired.
        let rs = match &self.recovery {
            Some(r) => r.states_now().await,
            None => Some(HashMap::new()),
        };
        let mut held = copies_held(&meta);
        let mut candidates = self.placement_candidates(&meta, &held).await;
        for v in meta.volumes.values() {
            let rs_moved = rs.as_ref().is_some_and(|m| {
                m.get(&v.name)
                    .is_some_and(|s| s.coord.uid == v.uid && s.coord.fcid != v.failure_count_id)
            });
            if rs_moved || self.rs_overrides(v) || self.claimed_beyond_metadata(&v.name) {
                continue;
            }
            if move_to_cancel(&meta, v, !meta.rebalancing) {
                let why = format!(
                    "the move of n{}'s copy is cancelled (it cannot finish now); the copy stays",
                    meta.moving.get(&v.name).copied().unwrap_or(0)
                );
                let cmd = MetaCommand::CancelMove {
                    volume: v.name.clone(),
                };
                self.propose_membership(cmd, &v.name, &why).await;
                continue;
            }
            // A copy on a node being replaced waits for its replacement node, for as
            // long as a silent node gets before it is marked out; then it goes to the
            // best node that answers.
            let ordered = match replacement_candidates(&meta, v, &candidates) {
                Some(c) => {
                    self.replacement_waits.lock().remove(&v.name);
                    c
                }
                None => {
                    let since = *self
                        .replacement_waits
                        .lock()
                        .entry(v.name.clone())
                        .or_insert_with(Instant::now);
                    if since.elapsed() < self.out_after {
                        continue;
                    }
                    candidates.clone()
                }
            };
            let step = placement_step(v, &leaving(&meta, v), &ordered);
            if rs.is_none() && matches!(step, PlacementStep::Retire(_) | PlacementStep::Drop(_)) {
                continue;
            }
            if let PlacementStep::Retire(n) = step {
                // Decided on metadata read before the recovery server and the pings
                // answered: retire only if the current metadata still says so.
                let now = self.store.meta();
                let still = now.volumes.get(&v.name).is_some_and(|w| {
                    w.epoch == v.epoch && placement_step(w, &leaving(&now, w), &ordered) == step
                });
                if still {
                    self.retire(v, n).await;
                }
                continue;
            }
            if let PlacementStep::Handover(n) = step {
                let n = handover_target(&meta, v, &ordered).unwrap_or(n);
                self.hand_over(v, n, "its node is leaving").await;
                continue;
            }
            let (cmd, why) = match step {
                PlacementStep::Stay => continue,
                PlacementStep::Add(n) => (
                    MetaCommand::AddCopy {
                        volume: v.name.clone(),
                        node: n,
                        epoch: v.epoch,
                    },
                    format!(
                        "new copy on n{n} (replacing the copy on out node(s) {:?}); it resyncs from n{}",
                        v.replicas.iter().filter(|r| meta.out.contains(r)).collect::<Vec<_>>(),
                        v.primary
                    ),
                ),
                PlacementStep::Retire(_) | PlacementStep::Handover(_) => {
                    unreachable!("done above")
                }
                PlacementStep::Leave(n) => (
                    MetaCommand::LeaveCopy {
                        volume: v.name.clone(),
                        node: n,
                        epoch: v.epoch,
                    },
                    format!(
                        "n{n}'s copy leaves: {} copies placed for {} (an out node came back before its replacement was dropped)",
                        v.replicas.len(),
                        v.replication_factor()
                    ),
                ),
                PlacementStep::Drop(n) => (
                    MetaCommand::DropCopy {
                        volume: v.name.clone(),
                        node: n,
                        epoch: v.epoch,
                    },
                    format!(
                        "n{n}'s copy dropped: {} live copies elsewhere",
                        v.replication_factor()
                    ),
                ),
            };
            if self.propose_membership(cmd, &v.name, &why).await {
                if let PlacementStep::Add(n) = step {
                    // The next volume's copy goes to the next least-loaded node.
                    *held.entry(n).or_default() += 1;
                    candidates.sort_by_key(|n| (held.get(n).copied().unwrap_or(0), *n));
                }
            }
        }
    }

    /// The Raft group follows the metadata's members, one change a round: a node being
    /// added (`ClusterMeta::joining`) becomes a learner; the voters are kept at three
    /// or five (`decide::desired_voters`: a caught-up learner is promoted, an out voter
    /// steps down to learner); a removed node that holds no copy leaves the group, and
    /// then the metadata forgets it.
    async fn group_round(&self) {
        let meta = self.store.meta();
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let joint = membership.get_joint_config();
        if joint.len() > 1 {
            // A change left half done (its leader changed, or the wait for it ran
            // out): finish it, towards its new voters.
            let target = joint.last().cloned().unwrap_or_default();
            let why = format!("Raft membership change to voters {target:?} finished");
            self.change_group(target.into(), true, why).await;
            return;
        }
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: std::collections::BTreeSet<NodeId> = membership.learner_ids().collect();
        let in_group = |n: &NodeId| voters.contains(n) || learners.contains(n);
        // Nodes being added, and members that should be in the group and are not (a
        // removal cancelled after the node left the group): learners.
        let missing = meta
            .joining
            .iter()
            .map(|(id, j)| (*id, j.name.clone(), j.rpc.clone()))
            .chain(
                meta.nodes
                    .iter()
                    .filter(|(id, _)| !meta.out.contains(id))
                    .map(|(id, n)| (*id, n.name.clone(), n.rpc.clone())),
            )
            .find(|(id, _, _)| !in_group(id) && !meta.forgotten.contains(id));
        if let Some((id, name, rpc)) = missing {
            let node = openraft::BasicNode { addr: rpc.clone() };
            let r = tokio::time::timeout(GROUP_CHANGE_WAIT, self.raft.add_learner(id, node, false))
                .await;
            self.group_changed(
                r,
                format!("{name} joins the Raft group as a learner at {rpc}"),
            );
            return;
        }
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.clone().unwrap_or_default();
        let caught_up = |n: NodeId| {
            matched
                .get(&n)
                .and_then(|l| l.as_ref())
                .is_some_and(|l| l.index + CAUGHT_UP_ENTRIES >= last)
        };
        if let Some(want) = desired_voters(
            &meta,
            &voters,
            &learners,
            self.id,
            |n| n == self.id || self.seems_up(n) && self.seen.answering_for(n) > Duration::ZERO,
            caught_up,
        ) {
            let why = format!(
                "Raft voters {:?} -> {:?} (three or five voters, none out)",
                voters, want
            );
            self.change_group(want.into(), true, why).await;
            return;
        }
        // A forgotten node still in the group (it left the metadata first), and a
        // removed node that holds no copy: out of the group, then forgotten.
        let held = copies_held(&meta);
        let gone = learners
            .iter()
            .copied()
            .find(|n| meta.forgotten.contains(n));
        let emptied = meta
            .removed
            .iter()
            .copied()
            .find(|n| !voters.contains(n) && held.get(n).copied().unwrap_or(0) == 0);
        if let Some(n) = gone.or(emptied.filter(|n| in_group(n))) {
            let why = format!("removed node n{n} holds no copy: it leaves the Raft group");
            let change = openraft::ChangeMembers::RemoveNodes([n].into());
            self.change_group(change, false, why).await;
        } else if let Some(n) = emptied {
            let why = format!("removed node n{n} has left the Raft group: forgotten");
            self.propose_membership(MetaCommand::ForgetNode { id: n }, "", &why)
                .await;
        }
    }

    async fn change_group(
        &self,
        change: openraft::ChangeMembers<NodeId, openraft::BasicNode>,
        retain: bool,
        why: String,
    ) {
        let r = tokio::time::timeout(
            GROUP_CHANGE_WAIT,
            self.raft.change_membership(change, retain),
        )
        .await;
        self.group_changed(r, why);
    }

    /// Logs a Raft membership change that ran under `GROUP_CHANGE_WAIT`, and records
    /// it on the event timeline once committed.
    fn group_changed<T, E: std::fmt::Display>(
        &self,
        r: Result<Result<T, E>, tokio::time::error::Elapsed>,
        why: String,
    ) {
        match r {
            Err(_) => tracing::warn!("Raft membership change not committed in time: {why}"),
            Ok(Ok(_)) => {
                tracing::info!("{why}");
                lazarus_observe::events::record("membership", "", why);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Raft membership change not committed: {why}")
            }
        }
    }

    /// `lazarus rebalance`: one copy moved at a time (`decide::rebalance_step`); the
    /// move itself runs as re-replication does (the new copy resyncs, then the old one
    /// is retired and dropped). Once nothing is left to move, the rebalance ends.
    async fn rebalance_round(&self, meta: &lazarus_cluster::ClusterMeta) {
        let held = copies_held(meta);
        let candidates = self.placement_candidates(meta, &held).await;
        match rebalance_step(meta, &candidates) {
            RebalanceStep::Wait => {}
            RebalanceStep::Move { volume, from, to } => {
                let Some(v) = meta.volumes.get(&volume) else {
                    return;
                };
                let why = format!(
                    "rebalance: {volume}'s copy moves from n{from} ({} copies) to n{to} ({}); it resyncs from n{}",
                    held.get(&from).copied().unwrap_or(0),
                    held.get(&to).copied().unwrap_or(0),
                    v.primary
                );
                let cmd = MetaCommand::MoveCopy {
                    volume: volume.clone(),
                    from,
                    to,
                    epoch: v.epoch,
                };
                self.propose_membership(cmd, &volume, &why).await;
            }
            RebalanceStep::HandOver { volume, from, to } => {
                let Some(v) = meta.volumes.get(&volume) else {
                    return;
                };
                let p = primaries_held(meta);
                let why = format!(
                    "rebalance: n{from} is the primary of {} volumes, n{to} of {}",
                    p.get(&from).copied().unwrap_or(0),
                    p.get(&to).copied().unwrap_or(0)
                );
                self.hand_over(v, to, &why).await;
            }
            RebalanceStep::Done => {
                let p = primaries_held(meta);
                let mut shares: Vec<String> = meta
                    .nodes
                    .keys()
                    .filter(|n| !meta.out.contains(n))
                    .map(|n| {
                        format!(
                            "n{n}: {} ({} primary)",
                            held.get(n).copied().unwrap_or(0),
                            p.get(n).copied().unwrap_or(0)
                        )
                    })
                    .collect();
                shares.sort();
                let why = format!("rebalanced: copies per node {}", shares.join(", "));
                self.propose_membership(MetaCommand::SetRebalance { on: false }, "", &why)
                    .await;
            }
        }
    }

    /// `lazarus volume primary`: each requested primary role is handed over once the
    /// node's copy is live and current and the node answers; a request that cannot be
    /// met any more (the volume or the copy gone, the node out) is withdrawn, and one
    /// met is cleared.
    async fn wanted_primary_round(&self, meta: &lazarus_cluster::ClusterMeta) {
        for (volume, &n) in &meta.primary_wanted {
            let v = meta.volumes.get(volume);
            let gone = match v {
                None => Some("the volume is gone".to_string()),
                Some(v) if v.primary == n => Some(format!("n{n} is its primary")),
                Some(v) if !v.replicas.contains(&n) => Some(format!("n{n} holds no copy")),
                Some(_) if meta.out.contains(&n) => Some(format!("n{n} is out")),
                Some(v) if v.recovery_flag => Some(
                    "the volume is in jeopardy (its primary holds it at the recovery server; only a failover moves the role)".to_string(),
                ),
                Some(_) => None,
            };
            if let Some(why) = gone {
                let cmd = MetaCommand::WantPrimary {
                    volume: volume.clone(),
                    node: None,
                };
                let why = format!("request for n{n} as primary of {volume} cleared: {why}");
                self.propose_membership(cmd, volume, &why).await;
                continue;
            }
            let Some(v) = v else { continue };
            let ready = v.state_of(n) == Some(lazarus_cluster::ReplicaState::Live)
                && !v.stale.contains(&n)
                && !meta.moving.contains_key(volume)
                && self.seems_up(n);
            if ready {
                self.hand_over(v, n, "requested by an administrator").await;
            }
        }
    }

    /// Hands the primary role of `v` to live copy `n` (a node leaving, a rebalance), as
    /// a failover does (`watch_primaries`): no lease for the old primary from here on,
    /// its last one runs out, the change is fenced at the recovery server, then
    /// committed as a `HandOver`. Requests in flight at the old primary wait for the
    /// change and go on at the new one, and connections to it follow the role there
    /// (the NBD front end); clients of the other nodes are routed to the new primary.
    async fn hand_over(&self, v: &lazarus_cluster::VolumeInfo, n: NodeId, why: &str) {
        if !self.confirm_leadership().await {
            return;
        }
        if !self.leases.handing_over.lock().insert(v.name.clone()) {
            return;
        }
        self.leases.begin_promotion(&v.name);
        let end = || {
            self.leases.end_promotion(&v.name);
            self.leases.handing_over.lock().remove(&v.name);
        };
        if v.primary == self.id {
            self.leases.revoke(&v.name);
        } else {
            tokio::time::sleep(crate::cluster::LEASE).await;
        }
        let fcid = match self.fence_promotion(v, n).await {
            Ok(f) => f,
            Err(e) => {
                end();
                tracing::warn!(volume = %v.name, candidate = n, error = %e, "hand-over not fenced; trying again later");
                return;
            }
        };
        let cmd = MetaCommand::HandOver {
            volume: v.name.clone(),
            node: n,
            epoch: v.epoch,
            fcid,
        };
        let why = format!("primary role handed from n{} to n{n}: {why}", v.primary);
        self.propose_membership(cmd, &v.name, &why).await;
        end();
    }

    /// Commits an out node's copy that still takes updates dead, as a primary does
    /// with a replica it stops waiting for: recorded out at the recovery server first
    /// (so it never claims the volume as its survivor with writes it then lacks), then
    /// the metadata, then the record again at the change's log index.
    async fn retire(&self, v: &lazarus_cluster::VolumeInfo, n: NodeId) {
        match self.commit_dead_recorded(v, n, PROPOSE_WAIT).await {
            Ok(_) => {
                let why = format!("n{n}'s copy retired (it is leaving; its replacement is live)");
                tracing::info!(volume = %v.name, "{why}");
                lazarus_observe::events::record("membership", &v.name, why);
            }
            Err(e) => {
                tracing::info!(volume = %v.name, node = n, error = %e, "out copy not retired yet")
            }
        }
    }

    /// Nodes a new copy may go to, best first: not out, answering, with a usable
    /// device; those holding the fewest copies first (then by id).
    async fn placement_candidates(
        &self,
        meta: &lazarus_cluster::ClusterMeta,
        held: &HashMap<NodeId, usize>,
    ) -> Vec<NodeId> {
        let mut out = Vec::new();
        for &n in meta.nodes.keys() {
            if meta.out.contains(&n) {
                continue;
            }
            if self.seems_up(n) && self.device_ok(meta, n).await {
                out.push(n);
            }
        }
        out.sort_by_key(|n| (held.get(n).copied().unwrap_or(0), *n));
        out
    }

    /// Proposes one membership change; logs and records it on the event timeline when
    /// committed. Whether it was.
    async fn propose_membership(&self, cmd: MetaCommand, volume: &str, why: &str) -> bool {
        match self.propose(cmd).await {
            Ok(MetaResponse::Ok | MetaResponse::Volume(_)) => {
                tracing::info!(volume, "{why}");
                lazarus_observe::events::record("membership", volume, why.to_string());
                true
            }
            Ok(other) => {
                tracing::info!(volume, response = ?other, "membership change refused: {why}");
                false
            }
            Err(e) => {
                tracing::warn!(volume, error = %e, "membership change not committed: {why}");
                false
            }
        }
    }
}
