//! The node's decisions as pure functions of what it knows: no I/O, no clock of their
//! own, each unit-tested here (as the metadata's own rules are in `lazarus_cluster::meta`).
//! The loops that act on them live in `jeopardy`, `survivor`, `reconcile` and `cluster`.
//!
//! - `jeopardy_step`: when a volume enters or leaves jeopardy;
//! - `adoption`: what the leader does with a recovery-server state newer than its metadata;
//! - `writes_through`: whether a write must be on the recovery server first;
//! - `contact_ok`, `may_claim_survivor`: when a primary may serve on its contacts, and
//!   when a surviving replica may claim the volume;
//! - `verdict`: what a new primary does about a live replica whose root it asked for;
//! - `unmarked_dead`: the dead copies a failover must mark stale first.
//! - `placement_step`, `may_mark_in`: re-replication of the copies on nodes marked out.

use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{ReplicaState, VolumeInfo};
use lazarus_recovery::log::VolumeCoord;
use lazarus_recovery::server::{CONTACT_WINDOW, SURVIVOR_SILENCE};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// What the jeopardy loop does about a volume whose metadata is not behind the
/// recovery server (that case is `adoption`'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JeopardyStep {
    /// Claim it at the recovery server: from then on every write is logged there
    /// before it is acknowledged. The reason, for the log and the event timeline.
    Enter(String),
    /// Leave: the recovery server stops being the coordination point, then the flag
    /// goes off.
    Exit,
    /// Nothing changes.
    Stay,
}

/// Enter when the volume is down to one failure domain (`domains`: its live copies
/// that can be counted on, one domain each) or an administrator protected it; leave once it has two or more again and
/// is not protected. `flaky` (live copies whose failure history makes them not count)
/// only explains the entry.
///
/// A clone still being made does not enter: it is served by no node and written only
/// by its fill, which resets its copies (durably) outside the log; entered before
/// that, the log's base would be the empty copies, and a take-over from it would
/// serve the clone empty. Once made, it enters like any volume, its base the filled
/// copies.
pub fn jeopardy_step(v: &VolumeInfo, domains: &[NodeId], flaky: &[NodeId]) -> JeopardyStep {
    let endangered = domains.len() <= 1 || v.protected;
    if !v.recovery_flag && endangered && v.cloning.is_some() {
        JeopardyStep::Stay
    } else if !v.recovery_flag && endangered {
        let why = if v.protected {
            "an administrator protected it".to_string()
        } else if !flaky.is_empty() {
            format!("failure history: {flaky:?} cannot be counted on")
        } else {
            format!("{} failure domain(s) left: {domains:?}", domains.len())
        };
        JeopardyStep::Enter(why)
    } else if v.recovery_flag && !endangered {
        JeopardyStep::Exit
    } else {
        JeopardyStep::Stay
    }
}

/// What the leader does with a recovery-server state newer than its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// The holder becomes (stays) primary; `restored`: it took over by replaying the
    /// log onto a copy that was current when the log began.
    Adopt { restored: bool },
    /// The holder is no current copy: fence the recovery server back to the metadata.
    Refence,
    /// A base copy took over but does not serve yet (it restores from the log, or its
    /// restore failed): not adopted until it does; meanwhile no primary of the
    /// metadata's serves (the recovery server is ahead), and if the holder stays silent
    /// a base copy takes over again.
    Wait,
}

/// Decides adoption. Only a holder that is already the metadata's primary (it claimed
/// without a majority), or a base copy that took over and replays the log, is ever
/// adopted; a promotion fenced at the recovery server but never committed through Raft
/// (`jeopardy` off, or a live replica fenced in jeopardy) is not: its holder may be
/// dead or stale in the metadata, and making it primary would lose acknowledged writes.
/// A take-over is adopted only once its holder serves (it restored from the log): a
/// holder whose restore failed, or that crashed in the middle of it, has a stale copy
/// (simulator seed 158 with device and disk faults read a block older than a flush).
pub fn adoption(v: &VolumeInfo, c: &VolumeCoord) -> Adoption {
    let holder = c.holder.unwrap_or(v.primary);
    if c.jeopardy && c.takeover && c.base.contains(&holder) && !c.serving {
        // Restoring (even the metadata's own primary, taking its volume back over).
        Adoption::Wait
    } else if c.jeopardy && holder == v.primary {
        Adoption::Adopt { restored: false }
    } else if c.jeopardy && c.takeover && c.base.contains(&holder) {
        Adoption::Adopt { restored: true }
    } else {
        Adoption::Refence
    }
}

/// Whether writes to `v` must be on the recovery server before they are written
/// locally: its flag is on, or it is down to one live copy (of two or more).
pub fn writes_through(v: &VolumeInfo) -> bool {
    v.recovery_flag || (v.replicas.len() >= 2 && v.live().len() <= 1)
}

/// Whether a primary may serve on its contacts: every live replica heard from within
/// `CONTACT_WINDOW`, or the recovery server. `last` gives a contact's send time.
pub fn contact_ok(
    live_replicas: &[NodeId],
    last: impl Fn(NodeId) -> Option<Instant>,
    rs_last: Option<Instant>,
    now: Instant,
) -> bool {
    let fresh =
        |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < CONTACT_WINDOW);
    live_replicas.iter().all(|n| fresh(last(*n))) || fresh(rs_last)
}

/// Whether replica `me` may claim `v` as its survivor, on its own knowledge: a live,
/// non-primary copy outside jeopardy that has heard from none of the other hosting
/// nodes for `SURVIVOR_SILENCE`.
pub fn may_claim_survivor(
    v: &VolumeInfo,
    me: NodeId,
    heard: impl Fn(NodeId) -> Option<Instant>,
    now: Instant,
) -> bool {
    v.replicas.len() >= 2
        && v.replicas.contains(&me)
        && v.primary != me
        && !v.recovery_flag
        && v.state_of(me) == Some(ReplicaState::Live)
        && v.replicas
            .iter()
            .filter(|n| **n != me)
            .all(|n| heard(*n).is_none_or(|t| now.saturating_duration_since(t) >= SURVIVOR_SILENCE))
}

/// How long a replica that does not answer is retried before it is marked dead.
pub const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(2);

/// What the primary does about one live replica, given what asking it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Same root: the copies are equal.
    Equal,
    /// Not asked successfully yet: ask again.
    Retry,
    /// Commit it dead (it resyncs from the primary).
    MarkDead(&'static str),
}

/// The decision for one replica: `answer` is its root (or why not), `own` the primary's
/// root, `waited` how long this replica has failed to answer.
pub fn verdict(own: &[u8; 16], answer: &Result<[u8; 16], String>, waited: Duration) -> Verdict {
    match answer {
        Ok(r) if r == own => Verdict::Equal,
        Ok(_) => Verdict::MarkDead("its checksum root differs from the new primary's"),
        Err(_) if waited < UNREACHABLE_PATIENCE => Verdict::Retry,
        Err(_) => Verdict::MarkDead("it did not answer the new primary's root check"),
    }
}

/// Dead copies of a volume not yet marked stale (see `VolumeInfo::stale`); in
/// jeopardy none count (no dead copy is promoted then, and leaving jeopardy marks them).
pub fn unmarked_dead(v: &VolumeInfo) -> Vec<NodeId> {
    if v.recovery_flag || !v.stale_tracked {
        return Vec::new();
    }
    v.replicas
        .iter()
        .copied()
        .filter(|n| {
            *n != v.primary && v.state_of(*n) == Some(ReplicaState::Dead) && !v.stale.contains(n)
        })
        .collect()
}

/// How many copies each node holds.
pub fn copies_held(
    meta: &lazarus_cluster::ClusterMeta,
) -> std::collections::HashMap<NodeId, usize> {
    let mut held = std::collections::HashMap::new();
    for v in meta.volumes.values() {
        for n in &v.replicas {
            *held.entry(*n).or_default() += 1;
        }
    }
    held
}

/// Where a new volume goes: `[primary, other copies...]`. Nodes marked out get
/// nothing, nodes that answer (`answering`) come first; the primary is `asked` if
/// given, else the node that is primary of the fewest volumes (`me`, the node taking
/// the request, among equals, then the lowest id); the other copies go to the nodes
/// holding the fewest copies.
pub fn place_volume(
    meta: &lazarus_cluster::ClusterMeta,
    rf: usize,
    asked: Option<NodeId>,
    me: NodeId,
    answering: impl Fn(NodeId) -> bool,
) -> Result<Vec<NodeId>, String> {
    let eligible: Vec<NodeId> = meta
        .nodes
        .keys()
        .copied()
        .filter(|n| !meta.out.contains(n))
        .collect();
    if rf == 0 || rf > eligible.len() {
        return Err(format!(
            "replication factor {rf} needs {rf} nodes that are not out; the cluster has {}",
            eligible.len()
        ));
    }
    let copies = copies_held(meta);
    let mut primaries = std::collections::HashMap::<NodeId, usize>::new();
    for v in meta.volumes.values() {
        *primaries.entry(v.primary).or_default() += 1;
    }
    let count =
        |m: &std::collections::HashMap<NodeId, usize>, n: NodeId| m.get(&n).copied().unwrap_or(0);
    let primary = match asked {
        Some(p) if eligible.contains(&p) => p,
        Some(p) => return Err(format!("n{p} is not a cluster member that is in")),
        None => *eligible
            .iter()
            .min_by_key(|n| (!answering(**n), count(&primaries, **n), **n != me, **n))
            .expect("rf >= 1 eligible nodes"),
    };
    let mut others: Vec<NodeId> = eligible.into_iter().filter(|n| *n != primary).collect();
    others.sort_by_key(|n| (!answering(*n), count(&copies, *n), *n));
    let mut placed = vec![primary];
    placed.extend(others.into_iter().take(rf - 1));
    Ok(placed)
}

/// What the leader does next about one volume's placement (`membership.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementStep {
    /// Place a new copy on this node (`AddCopy`): it resyncs from the primary.
    Add(NodeId),
    /// This out node's copy still takes updates: commit it dead first.
    Retire(NodeId),
    /// Drop this out node's dead copy (`DropCopy`): its replacement is live.
    Drop(NodeId),
    /// The volume holds more copies than its factor and none is leaving: this one
    /// leaves (`LeaveCopy`), then goes as an out copy would.
    Leave(NodeId),
    /// The primary is on an out node (taken out by an administrator) and the volume
    /// has its full count of live copies elsewhere: hand the primary role to this one.
    Handover(NodeId),
    Stay,
}

/// Re-replication, one step at a time: while a copy sits on a node marked out, a new
/// copy is placed on the first of `candidates` (nodes that answer with a usable
/// device, not out, best first) that holds none; once the volume has as many live
/// copies on nodes that are not out as its replication factor, the out copy is retired
/// and dropped. Never before: until then it may be the copy that a repair or a
/// promotion needs. A primary on an out node keeps the role until the copies elsewhere
/// are complete, then hands it to a live one of them (its own copy is then dropped
/// like any other).
pub fn placement_step(
    v: &VolumeInfo,
    out: &std::collections::BTreeSet<NodeId>,
    candidates: &[NodeId],
) -> PlacementStep {
    let rf = v.replication_factor();
    let Some(&gone) = v.replicas.iter().find(|n| out.contains(n)) else {
        return surplus_step(v, rf);
    };
    let kept: Vec<NodeId> = v
        .replicas
        .iter()
        .copied()
        .filter(|n| !out.contains(n))
        .collect();
    if kept.len() < rf {
        return candidates
            .iter()
            .find(|n| !v.replicas.contains(n))
            .map_or(PlacementStep::Stay, |n| PlacementStep::Add(*n));
    }
    let live_kept = kept
        .iter()
        .filter(|n| v.state_of(**n) == Some(ReplicaState::Live))
        .count();
    if live_kept < rf {
        return PlacementStep::Stay;
    }
    if out.contains(&v.primary) {
        let next = kept
            .iter()
            .copied()
            .find(|n| v.state_of(*n) == Some(ReplicaState::Live) && candidates.contains(n));
        return next.map_or(PlacementStep::Stay, PlacementStep::Handover);
    }
    if v.state_of(gone) == Some(ReplicaState::Dead) {
        PlacementStep::Drop(gone)
    } else {
        PlacementStep::Retire(gone)
    }
}

/// The candidates for a new copy of `v` when a node it is on is being replaced
/// (`lazarus node replace`): the replacing node first. None while that node cannot take
/// it yet (it is still joining, or does not answer): the copy waits for it rather than
/// going elsewhere. Without a replacement, `candidates` as they are.
pub fn replacement_candidates(
    meta: &lazarus_cluster::ClusterMeta,
    v: &VolumeInfo,
    candidates: &[NodeId],
) -> Option<Vec<NodeId>> {
    let with = v
        .replicas
        .iter()
        .filter_map(|n| meta.replacing.get(n))
        .find(|w| !v.replicas.contains(w) && !meta.out.contains(w));
    match with {
        None => Some(candidates.to_vec()),
        Some(w) if candidates.contains(w) => {
            let mut c = vec![*w];
            c.extend(candidates.iter().copied().filter(|n| n != w));
            Some(c)
        }
        Some(_) => None,
    }
}

/// The Raft voters the cluster wants: three, or five once five members can vote, so
/// that voters stay an odd number whose majority survives one failure (two with
/// five). A current voter may stay unless it is out; a learner may become one once it
/// is registered, not out, answers (`up`) and has caught up with the leader's log
/// (`caught_up`). Current voters are kept first (the leader, then those that answer,
/// then by id), then learners by id. None: leave the voters as they are (fewer than
/// three may vote, or the choice is the current set).
pub fn desired_voters(
    meta: &lazarus_cluster::ClusterMeta,
    voters: &std::collections::BTreeSet<NodeId>,
    learners: &std::collections::BTreeSet<NodeId>,
    leader: NodeId,
    up: impl Fn(NodeId) -> bool,
    caught_up: impl Fn(NodeId) -> bool,
) -> Option<std::collections::BTreeSet<NodeId>> {
    let mut eligible: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|n| !meta.out.contains(n) && !meta.forgotten.contains(n))
        .collect();
    eligible.sort_by_key(|n| (*n != leader, !up(*n), *n));
    eligible.extend(learners.iter().copied().filter(|n| {
        !voters.contains(n)
            && meta.nodes.contains_key(n)
            && !meta.out.contains(n)
            && up(*n)
            && caught_up(*n)
    }));
    let want = match eligible.len() {
        0..=2 => return None,
        3 | 4 => 3,
        _ => 5,
    };
    let chosen: std::collections::BTreeSet<NodeId> = eligible.into_iter().take(want).collect();
    (chosen != *voters).then_some(chosen)
}

/// The nodes whose copy of `v` is on its way out: the out nodes, and the node a
/// rebalance moves its copy off (`ClusterMeta::moving`).
pub fn leaving(
    meta: &lazarus_cluster::ClusterMeta,
    v: &VolumeInfo,
) -> std::collections::BTreeSet<NodeId> {
    meta.leaving(&v.name)
}

/// Whether `volume`'s move (`ClusterMeta::moving`) should be cancelled rather than
/// finished: another copy sits on an out node (re-replication takes over, with the
/// moving copy as a copy like any other), or the moving copy stopped being live before
/// the copies staying were complete (it missed updates: it must resync, and may not
/// while it leaves). `cancelled`: the administrator cancelled the rebalance, and the
/// move is not yet at its retire. A moving copy that is the primary's (moved so, or
/// promoted since) goes on: the role is handed to a staying copy once they are
/// complete (`placement_step`), unless the volume is in jeopardy (its primary holds it
/// at the recovery server, which refuses the hand-over's fence).
pub fn move_to_cancel(
    meta: &lazarus_cluster::ClusterMeta,
    v: &VolumeInfo,
    cancelled: bool,
) -> bool {
    let Some(&from) = meta.moving.get(&v.name) else {
        return false;
    };
    let staying_live = v
        .replicas
        .iter()
        .filter(|n| **n != from && !meta.out.contains(n))
        .filter(|n| v.state_of(**n) == Some(ReplicaState::Live))
        .count();
    let complete = staying_live >= v.replication_factor();
    v.replicas
        .iter()
        .any(|n| *n != from && meta.out.contains(n))
        || from == v.primary && v.recovery_flag
        || v.state_of(from) != Some(ReplicaState::Live) && !complete
        || cancelled && !complete
}

/// What a rebalance does next (`lazarus rebalance`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceStep {
    /// Move `from`'s copy of `volume` to `to` (`MoveCopy`).
    Move {
        volume: String,
        from: NodeId,
        to: NodeId,
    },
    /// Hand `volume`'s primary role from `from` to its live copy on `to`
    /// (`MetaCommand::HandOver`): primaries spread like copies.
    HandOver {
        volume: String,
        from: NodeId,
        to: NodeId,
    },
    /// A copy is being moved or rebuilt: the next move waits for it.
    Wait,
    /// The nodes' shares differ by at most one copy, or no move can narrow them.
    Done,
}

/// One step at a time, first for copies, then for primaries (among `candidates`:
/// nodes that are in, answer and have a usable device).
///
/// Copies: a copy moves from the node holding the most to the one holding the fewest
/// while their counts differ by two or more, of a volume whose copies are all live; a
/// copy that is not its volume's primary first (the primary's copy moves too when no
/// other does: its role is handed to a staying copy before it leaves).
///
/// Primaries: once no copy moves, the primary role of a volume whose copies are all
/// live is handed from the node that is primary of the most volumes to a live,
/// current copy on the node that is primary of the fewest, while those counts differ
/// by two or more. No data moves; the old primary's copy resyncs (by checksums).
///
/// Each step narrows the spread it acts on and leaves the other as it is, so a
/// rebalance ends. Volumes in name order, so the plan is the same on any leader.
pub fn rebalance_step(meta: &lazarus_cluster::ClusterMeta, candidates: &[NodeId]) -> RebalanceStep {
    let busy = !meta.moving.is_empty()
        || meta
            .volumes
            .values()
            .any(|v| v.replicas.iter().any(|n| meta.out.contains(n)));
    if busy {
        return RebalanceStep::Wait;
    }
    // In jeopardy the primary holds the volume at the recovery server, which refuses
    // a hand-over's fence while it renews its hold: such a volume is left as it is.
    // A clone still being made is left alone too (its maker resets its copies).
    let settled = |v: &VolumeInfo| {
        v.replicas.len() == v.replication_factor()
            && v.live().len() == v.replicas.len()
            && !v.recovery_flag
            && v.cloning.is_none()
    };
    let pairs = spread_pairs(&copies_held(meta), candidates);
    for primary_s in [false, true] {
        for &(from, to) in &pairs {
            let v = meta.volumes.values().find(|v| {
                v.replicas.contains(&from)
                    && !v.replicas.contains(&to)
                    && settled(v)
                    && (v.primary == from) == primary_s
            });
            if let Some(v) = v {
                return RebalanceStep::Move {
                    volume: v.name.clone(),
                    from,
                    to,
                };
            }
        }
    }
    let primaries = primaries_held(meta);
    for (from, to) in spread_pairs(&primaries, candidates) {
        let v = meta.volumes.values().find(|v| {
            v.primary == from && settled(v) && v.replicas.contains(&to) && !v.stale.contains(&to)
        });
        if let Some(v) = v {
            return RebalanceStep::HandOver {
                volume: v.name.clone(),
                from,
                to,
            };
        }
    }
    RebalanceStep::Done
}

/// The (from, to) pairs of `candidates` whose `counts` differ by two or more: the
/// highest count first, each with the lowest first (then by id).
fn spread_pairs(counts: &HashMap<NodeId, usize>, candidates: &[NodeId]) -> Vec<(NodeId, NodeId)> {
    let count = |n: &NodeId| counts.get(n).copied().unwrap_or(0);
    let mut most: Vec<NodeId> = candidates.to_vec();
    most.sort_by_key(|n| (std::cmp::Reverse(count(n)), *n));
    let mut fewest = most.clone();
    fewest.sort_by_key(|n| (count(n), *n));
    let mut pairs = Vec::new();
    for from in &most {
        for to in &fewest {
            if count(from) < count(to) + 2 {
                break;
            }
            pairs.push((*from, *to));
        }
    }
    pairs
}

/// The number of volumes each node is the primary of.
pub fn primaries_held(meta: &lazarus_cluster::ClusterMeta) -> HashMap<NodeId, usize> {
    let mut held = HashMap::new();
    for v in meta.volumes.values() {
        *held.entry(v.primary).or_default() += 1;
    }
    held
}

/// The copy a leaving primary hands its role to (`PlacementStep::Handover`): a live,
/// current copy that is not leaving, on one of `candidates`; one that was not just
/// rebuilt first, then on the node that is primary of the fewest volumes, then in
/// `candidates`' order.
pub fn handover_target(
    meta: &lazarus_cluster::ClusterMeta,
    v: &VolumeInfo,
    candidates: &[NodeId],
) -> Option<NodeId> {
    let leaving = meta.leaving(&v.name);
    let primaries = primaries_held(meta);
    // The copy placed last while the volume holds one more than its factor is the one
    // just rebuilt: it may lack writes acknowledged before it took updates and not yet
    // flushed, so a FLUSH there would answer EIO (`Acks`). Another goes first.
    let added = (v.replicas.len() > v.replication_factor())
        .then(|| v.replicas.last().copied())
        .flatten();
    candidates
        .iter()
        .enumerate()
        .filter(|(_, n)| v.replicas.contains(n) && !leaving.contains(n) && !v.stale.contains(n))
        .filter(|(_, n)| v.state_of(**n) == Some(ReplicaState::Live))
        .min_by_key(|(i, n)| {
            (
                Some(**n) == added,
                primaries.get(n).copied().unwrap_or(0),
                *i,
            )
        })
        .map(|(_, n)| *n)
}

/// A volume with more copies than its factor and none leaving: an out node came back
/// (marked in) before its replacement was dropped, or the other way round. One copy
/// goes, never the primary's, once the factor's count of copies is live: a copy that is
/// not live first (a rebuild or a resync cancelled), else the last placed. It is
/// recorded as leaving first, so that it does not resync while it is retired.
fn surplus_step(v: &VolumeInfo, rf: usize) -> PlacementStep {
    if v.replicas.len() <= rf || v.live().len() < rf {
        return PlacementStep::Stay;
    }
    let mut others = v.replicas.iter().rev().copied().filter(|n| *n != v.primary);
    let not_live = others
        .clone()
        .find(|n| v.state_of(*n) != Some(ReplicaState::Live));
    let pick = not_live.or_else(|| others.next().filter(|_| v.live().len() > rf));
    pick.map_or(PlacementStep::Stay, PlacementStep::Leave)
}

/// Whether an out node that answers again may be marked back in: none of its copies
/// has a replacement placed (it then resyncs them as any returning node would). A
/// node whose copies are being rebuilt elsewhere stays out until they are dropped.
/// Volumes it is primary of do not count.
pub fn may_mark_in(meta: &lazarus_cluster::ClusterMeta, node: NodeId) -> bool {
    // A volume it became primary of (promoted while out) keeps it: the copy being
    // rebuilt meanwhile only adds one.
    meta.volumes
        .values()
        .filter(|v| v.replicas.contains(&node) && v.primary != node)
        .all(|v| {
            v.replicas.iter().filter(|n| !meta.out.contains(n)).count() < v.replication_factor()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_info(id: NodeId) -> lazarus_cluster::NodeInfo {
        lazarus_cluster::NodeInfo {
            name: format!("n{id}"),
            rpc: String::new(),
            nbd: String::new(),
            admin: String::new(),
            incarnation: 0,
            jeopardy_policy: None,
            takes_ids: false,
        }
    }

    fn volume(primary: NodeId) -> VolumeInfo {
        VolumeInfo {
            name: "vol0".into(),
            uid: 1,
            size_bytes: 1 << 30,
            replicas: vec![1, 2, 3],
            primary,
            epoch: 2,
            states: [1, 2, 3]
                .into_iter()
                .map(|n| (n, ReplicaState::Live))
                .collect(),
            recovery_flag: false,
            failure_count_id: 3,
            protected: false,
            stale: Default::default(),
            stale_tracked: true,
            live_at: Default::default(),
            changed_at: 0,
            resyncing_at: Default::default(),
            replication: 3,
            handed_over: None,
            snapshots: Default::default(),
            snapshot_sizes: Default::default(),
            primary_since: 2,
            cloning: None,
        }
    }

    /// Only the metadata's own primary (claimed without a majority) or a base copy that
    /// took over from the log is adopted; any other holder is fenced back.
    #[test]
    fn adoption_rules() {
        let v = volume(3);
        let coord = |holder, jeopardy, takeover, base: Vec<NodeId>| VolumeCoord {
            uid: 1,
            fcid: 4,
            holder: Some(holder),
            epoch: 3,
            jeopardy,
            config: None,
            base,
            takeover,
            serving: true,
            out: Default::default(),
            member_index: Default::default(),
        };
        // A fenced promotion that never committed (section 0's stray claim).
        assert_eq!(
            adoption(&v, &coord(1, false, false, vec![])),
            Adoption::Refence
        );
        // A live replica fenced in jeopardy but never promoted: not restored from the log.
        assert_eq!(
            adoption(&v, &coord(2, true, false, vec![1, 2, 3])),
            Adoption::Refence
        );
        // A take-over by a copy that was not current when the log began.
        assert_eq!(
            adoption(&v, &coord(1, true, true, vec![2, 3])),
            Adoption::Refence
        );
        assert_eq!(
            adoption(&v, &coord(3, true, false, vec![3])),
            Adoption::Adopt { restored: false }
        );
        assert_eq!(
            adoption(&v, &coord(2, true, true, vec![2, 3])),
            Adoption::Adopt { restored: true }
        );
        // The same take-over before its holder serves (restoring, or its restore
        // failed): neither adopted nor fenced back; the metadata's own primary taking
        // the volume back over neither.
        let mut restoring = coord(2, true, true, vec![2, 3]);
        restoring.serving = false;
        assert_eq!(adoption(&v, &restoring), Adoption::Wait);
        let mut own = coord(3, true, true, vec![2, 3]);
        own.serving = false;
        assert_eq!(adoption(&v, &own), Adoption::Wait);
    }

    /// Down to one failure domain, or protected: enter; two or more and not protected:
    /// leave; the reason names what caused it.
    #[test]
    fn jeopardy_steps() {
        let mut v = volume(1);
        let two = vec![1, 2];
        let one = vec![1];
        assert_eq!(jeopardy_step(&v, &two, &[]), JeopardyStep::Stay);
        assert!(
            matches!(jeopardy_step(&v, &one, &[]), JeopardyStep::Enter(w) if w.contains("1 failure domain"))
        );
        assert!(matches!(
            jeopardy_step(&v, &[], &[]),
            JeopardyStep::Enter(_)
        ));
        assert!(
            matches!(jeopardy_step(&v, &one, &[2]), JeopardyStep::Enter(w) if w.contains("failure history"))
        );
        v.protected = true;
        assert!(
            matches!(jeopardy_step(&v, &two, &[]), JeopardyStep::Enter(w) if w.contains("administrator"))
        );
        v.recovery_flag = true;
        assert_eq!(
            jeopardy_step(&v, &two, &[]),
            JeopardyStep::Stay,
            "protected: stays"
        );
        v.protected = false;
        assert_eq!(jeopardy_step(&v, &two, &[]), JeopardyStep::Exit);
        assert_eq!(jeopardy_step(&v, &one, &[]), JeopardyStep::Stay);
        // A clone being made: never enters; made, it does.
        let mut c = volume(1);
        c.cloning = Some(lazarus_cluster::CloneFill {
            source: "v".into(),
            snapshot: "s".into(),
            by: 1,
        });
        assert_eq!(jeopardy_step(&c, &one, &[]), JeopardyStep::Stay);
        c.protected = true;
        assert_eq!(jeopardy_step(&c, &two, &[]), JeopardyStep::Stay);
        c.cloning = None;
        assert!(matches!(
            jeopardy_step(&c, &two, &[]),
            JeopardyStep::Enter(_)
        ));
    }

    /// A failover marks stale only the dead copies not marked yet, and none in
    /// jeopardy or before stale marks are tracked.
    #[test]
    fn unmarked_dead_copies() {
        let mut v = volume(1);
        assert!(unmarked_dead(&v).is_empty());
        v.states.insert(2, ReplicaState::Dead);
        v.states.insert(3, ReplicaState::Dead);
        assert_eq!(unmarked_dead(&v), vec![2, 3]);
        v.stale.insert(2);
        assert_eq!(unmarked_dead(&v), vec![3]);
        v.states.insert(1, ReplicaState::Dead);
        assert_eq!(unmarked_dead(&v), vec![3], "the primary is not counted");
        v.recovery_flag = true;
        assert!(unmarked_dead(&v).is_empty());
        v.recovery_flag = false;
        v.stale_tracked = false;
        assert!(unmarked_dead(&v).is_empty());
    }

    #[test]
    fn contact_rules() {
        let now = Instant::now() + Duration::from_secs(10);
        let fresh = Some(now - Duration::from_millis(100));
        let stale = Some(now - CONTACT_WINDOW);
        assert!(contact_ok(&[2, 3], |_| fresh, None, now));
        assert!(!contact_ok(
            &[2, 3],
            |n| if n == 2 { fresh } else { stale },
            None,
            now
        ));
        assert!(contact_ok(&[2, 3], |_| None, fresh, now));
        assert!(!contact_ok(&[2, 3], |_| None, stale, now));
        assert!(
            contact_ok(&[], |_| None, None, now),
            "no live replica to lose"
        );
    }

    #[test]
    fn survivor_rules() {
        let mut v = volume(1);
        let now = Instant::now() + Duration::from_secs(10);
        let long_ago = Some(now - SURVIVOR_SILENCE);
        let recent = Some(now - Duration::from_millis(200));
        assert!(may_claim_survivor(&v, 3, |_| long_ago, now));
        assert!(may_claim_survivor(&v, 3, |_| None, now));
        assert!(!may_claim_survivor(
            &v,
            3,
            |n| if n == 2 { recent } else { long_ago },
            now
        ));
        assert!(
            !may_claim_survivor(&v, 1, |_| None, now),
            "the primary claims otherwise"
        );
        v.states.insert(3, ReplicaState::Dead);
        assert!(!may_claim_survivor(&v, 3, |_| None, now), "a dead copy");
        v.states.insert(3, ReplicaState::Live);
        v.recovery_flag = true;
        assert!(
            !may_claim_survivor(&v, 3, |_| None, now),
            "jeopardy: base copies take over"
        );
    }

    #[test]
    fn verdicts() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        let short = Duration::from_millis(10);
        assert_eq!(verdict(&a, &Ok(a), short), Verdict::Equal);
        assert!(matches!(verdict(&a, &Ok(b), short), Verdict::MarkDead(_)));
        assert_eq!(verdict(&a, &Err("down".into()), short), Verdict::Retry);
        assert!(matches!(
            verdict(&a, &Err("down".into()), UNREACHABLE_PATIENCE),
            Verdict::MarkDead(_)
        ));
    }

    #[test]
    fn an_out_copy_is_replaced_then_dropped_never_before() {
        use PlacementStep::*;
        let out: std::collections::BTreeSet<NodeId> = [3].into();
        let mut v = volume(1);
        v.states.insert(3, ReplicaState::Dead);
        assert_eq!(
            placement_step(&v, &Default::default(), &[4]),
            Stay,
            "nothing out"
        );
        assert_eq!(placement_step(&v, &out, &[]), Stay, "nowhere to go");
        assert_eq!(
            placement_step(&v, &out, &[2, 4, 5]),
            Add(4),
            "first candidate without a copy"
        );
        v.replicas.push(4);
        v.states.insert(4, ReplicaState::Dead);
        assert_eq!(placement_step(&v, &out, &[4, 5]), Stay, "rebuild under way");
        v.states.insert(4, ReplicaState::Resyncing);
        assert_eq!(placement_step(&v, &out, &[5]), Stay, "not live yet");
        v.states.insert(4, ReplicaState::Live);
        assert_eq!(placement_step(&v, &out, &[5]), Drop(3));
        v.states.insert(3, ReplicaState::Live);
        assert_eq!(
            placement_step(&v, &out, &[5]),
            Retire(3),
            "a copy taking updates goes dead first"
        );
        // The rebuilt copy's node went out too: another one is placed.
        let out2: std::collections::BTreeSet<NodeId> = [3, 4].into();
        v.states.insert(3, ReplicaState::Dead);
        assert_eq!(placement_step(&v, &out2, &[5]), Add(5));
        // An out primary (taken out while it answers): the copy elsewhere first, then
        // the role to a live copy that answers, then its own copy goes.
        let mut v1 = volume(3);
        assert_eq!(placement_step(&v1, &out, &[4]), Add(4));
        v1.replicas.push(4);
        v1.states.insert(4, ReplicaState::Resyncing);
        assert_eq!(
            placement_step(&v1, &out, &[1, 2, 4]),
            Stay,
            "not before it is live"
        );
        v1.states.insert(4, ReplicaState::Live);
        assert_eq!(
            placement_step(&v1, &out, &[2, 4]),
            Handover(2),
            "a candidate that answers"
        );
        v1.primary = 2;
        v1.states.insert(3, ReplicaState::Dead);
        assert_eq!(placement_step(&v1, &out, &[1, 4]), Drop(3));
    }

    #[test]
    fn an_out_node_returns_only_while_nothing_replaces_its_copies() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        let mut v = volume(1);
        m.out.insert(3);
        m.volumes.insert("vol0".into(), v.clone());
        assert!(
            may_mark_in(&m, 3),
            "no replacement placed: it resyncs its copy"
        );
        v.replicas.push(4);
        m.volumes.insert("vol0".into(), v.clone());
        assert!(!may_mark_in(&m, 3), "a replacement is being rebuilt");
        v.replicas.retain(|n| *n != 3);
        m.volumes.insert("vol0".into(), v.clone());
        assert!(may_mark_in(&m, 3), "its copy was dropped");
        // Promoted while out (its copy was the live one left): it comes back in.
        v.replicas.push(3);
        v.primary = 3;
        m.volumes.insert("vol0".into(), v);
        assert!(may_mark_in(&m, 3), "primary of the volume");
    }

    #[test]
    fn new_volumes_spread_their_primaries_and_copies() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        for id in 1..=5 {
            m.nodes.insert(id, node_info(id));
        }
        let all = |_| true;
        assert_eq!(place_volume(&m, 3, None, 1, all).unwrap(), vec![1, 2, 3]);
        assert_eq!(
            place_volume(&m, 3, None, 4, all).unwrap(),
            vec![4, 1, 2],
            "the asking node among equals"
        );
        assert_eq!(
            place_volume(&m, 6, None, 1, all).unwrap_err(),
            "replication factor 6 needs 6 nodes that are not out; the cluster has 5"
        );
        // Five volumes created through n1: one primary each, copies spread.
        for i in 0..5 {
            let r = place_volume(&m, 3, None, 1, all).unwrap();
            let mut v = volume(r[0]);
            v.name = format!("v{i}");
            v.replicas = r;
            m.volumes.insert(v.name.clone(), v);
        }
        let mut primaries: Vec<NodeId> = m.volumes.values().map(|v| v.primary).collect();
        primaries.sort_unstable();
        assert_eq!(primaries, vec![1, 2, 3, 4, 5]);
        for n in 1..=5 {
            let held = m
                .volumes
                .values()
                .filter(|v| v.replicas.contains(&n))
                .count();
            assert_eq!(held, 3, "n{n} holds {held} copies");
        }
        // Out and silent nodes come last or not at all; an asked primary is kept.
        m.out.insert(5);
        let r = place_volume(&m, 3, None, 1, |n| n != 2).unwrap();
        assert!(!r.contains(&5) && !r.contains(&2), "{r:?}");
        assert_eq!(place_volume(&m, 1, Some(3), 1, all).unwrap(), vec![3]);
        assert!(place_volume(&m, 1, Some(5), 1, all).is_err(), "an out node");
        assert!(
            place_volume(&m, 1, Some(9), 1, all).is_err(),
            "not a member"
        );
    }

    #[test]
    fn voters_stay_three_or_five_and_never_an_out_node() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        for n in 1..=6 {
            m.nodes.insert(n, node_info(n));
        }
        let set = |v: &[NodeId]| v.iter().copied().collect::<std::collections::BTreeSet<_>>();
        let yes = |_| true;
        // Four voters (`up --nodes 4`): one steps down, never the leader.
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3, 4]), &set(&[]), 1, yes, yes),
            Some(set(&[1, 2, 3]))
        );
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3, 4]), &set(&[]), 4, yes, yes),
            Some(set(&[1, 2, 4]))
        );
        // A learner that has caught up and answers joins a three to make five only
        // with a second one.
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4]), 1, yes, yes),
            None
        );
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4, 5]), 1, yes, yes),
            Some(set(&[1, 2, 3, 4, 5]))
        );
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4, 5]), 1, yes, |n| n != 5),
            None,
            "not before it has caught up"
        );
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4, 5]), 1, |n| n != 4, yes),
            None,
            "not while it does not answer"
        );
        // An out voter is replaced by a learner; a silent voter that is not out stays.
        m.out.insert(3);
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4]), 2, yes, yes),
            Some(set(&[1, 2, 4]))
        );
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[]), 2, yes, yes),
            None,
            "never fewer than three"
        );
        m.out.clear();
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4]), 1, |n| n != 2, yes),
            None
        );
        // Four voters, one silent: the silent one steps down, not one that answers.
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3, 4]), &set(&[]), 3, |n| n != 2, yes),
            Some(set(&[1, 3, 4]))
        );
        // Voters that have not registered yet (a cluster starting) stay voters.
        let mut fresh = lazarus_cluster::ClusterMeta::default();
        fresh.nodes.insert(1, node_info(1));
        assert_eq!(
            desired_voters(&fresh, &set(&[1, 2, 3, 4, 5]), &set(&[]), 1, yes, yes),
            None
        );
        // Five, one removed: three remain voters.
        m.out.insert(5);
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3, 4, 5]), &set(&[]), 1, yes, yes),
            Some(set(&[1, 2, 3]))
        );
        // An unregistered learner (still joining) never votes.
        m.out.clear();
        assert_eq!(
            desired_voters(&m, &set(&[1, 2, 3]), &set(&[4, 7]), 1, yes, yes),
            None
        );
    }

    #[test]
    fn a_replaced_node_s_copies_go_to_its_replacement_only() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        for n in 1..=5 {
            m.nodes.insert(n, node_info(n));
        }
        let v = volume(1);
        m.out.insert(3);
        m.removed.insert(3);
        assert_eq!(
            replacement_candidates(&m, &v, &[4, 5]),
            Some(vec![4, 5]),
            "a removal without a replacement takes the best candidate"
        );
        m.replacing.insert(3, 5);
        assert_eq!(replacement_candidates(&m, &v, &[4, 5]), Some(vec![5, 4]));
        assert_eq!(
            replacement_candidates(&m, &v, &[4]),
            None,
            "the copy waits for its replacement node"
        );
    }

    #[test]
    fn a_rebalance_moves_one_copy_at_a_time_a_primary_s_last() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        for n in 1..=5 {
            m.nodes.insert(n, node_info(n));
        }
        // Three volumes on n1-n3, one primary each; n4 and n5 hold nothing.
        for (name, primary) in [("a", 1), ("b", 2), ("c", 3)] {
            let mut v = volume(primary);
            v.name = name.into();
            m.volumes.insert(name.into(), v);
        }
        let all = [1, 2, 3, 4, 5];
        let mut moves = Vec::new();
        loop {
            match rebalance_step(&m, &all) {
                RebalanceStep::Move { volume, from, to } => {
                    let v = m.volumes.get_mut(&volume).unwrap();
                    assert_ne!(v.primary, from, "another copy could move");
                    assert!(!v.replicas.contains(&to));
                    // As MoveCopy, the rebuild, the retire and DropCopy leave it.
                    v.replicas.retain(|n| *n != from);
                    v.replicas.push(to);
                    v.states.remove(&from);
                    v.states.insert(to, ReplicaState::Live);
                    moves.push((volume, from, to));
                }
                RebalanceStep::HandOver { .. } => panic!("one primary per node already"),
                RebalanceStep::Wait => panic!("nothing is moving"),
                RebalanceStep::Done => break,
            }
            assert!(moves.len() < 10, "{moves:?}");
        }
        let held = copies_held(&m);
        let (lo, hi) = (
            all.iter()
                .map(|n| held.get(n).copied().unwrap_or(0))
                .min()
                .unwrap(),
            all.iter()
                .map(|n| held.get(n).copied().unwrap_or(0))
                .max()
                .unwrap(),
        );
        assert!(hi - lo <= 1, "{held:?} after {moves:?}");
        assert_eq!(moves.len(), 3, "{moves:?}");
        // While a copy moves, or one sits on an out node, the next waits.
        m.moving.insert("a".into(), 2);
        assert_eq!(rebalance_step(&m, &all), RebalanceStep::Wait);
        m.moving.clear();
        let on = m.volumes["a"].replicas[1];
        m.out.insert(on);
        assert_eq!(rebalance_step(&m, &all), RebalanceStep::Wait);
        m.out.clear();
        // A node that does not answer is neither a source nor a target.
        assert_eq!(rebalance_step(&m, &[1, 2, 3]), RebalanceStep::Done);
    }

    #[test]
    fn a_surplus_copy_goes_once_the_factor_is_live() {
        let none = std::collections::BTreeSet::new();
        let mut v = volume(1);
        v.replicas.push(4);
        v.states.insert(4, ReplicaState::Resyncing);
        // The out node came back first: the rebuild still under way is cancelled.
        assert_eq!(placement_step(&v, &none, &[]), PlacementStep::Leave(4));
        // Leaving, it goes as an out copy would: retired, then dropped.
        let leaving4: std::collections::BTreeSet<NodeId> = [4].into();
        assert_eq!(placement_step(&v, &leaving4, &[]), PlacementStep::Retire(4));
        v.states.insert(4, ReplicaState::Dead);
        assert_eq!(placement_step(&v, &leaving4, &[]), PlacementStep::Drop(4));
        // All four live: the last placed goes.
        v.states.insert(4, ReplicaState::Live);
        assert_eq!(placement_step(&v, &none, &[]), PlacementStep::Leave(4));
        // A copy that is not live goes first, whichever it is; never the primary.
        v.states.insert(2, ReplicaState::Resyncing);
        assert_eq!(placement_step(&v, &none, &[]), PlacementStep::Leave(2));
        v.primary = 4;
        v.states.insert(2, ReplicaState::Live);
        assert_eq!(placement_step(&v, &none, &[]), PlacementStep::Leave(3));
        // Not while fewer than the factor are live.
        v.states.insert(1, ReplicaState::Dead);
        v.states.insert(2, ReplicaState::Dead);
        assert_eq!(placement_step(&v, &none, &[]), PlacementStep::Stay);
        // Exactly the factor: nothing to do.
        let w = volume(1);
        assert_eq!(placement_step(&w, &none, &[]), PlacementStep::Stay);
    }

    #[test]
    fn a_move_that_cannot_finish_is_cancelled() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        let mut v = volume(1);
        v.replicas.push(4);
        v.states.insert(4, ReplicaState::Resyncing);
        m.moving.insert("vol0".into(), 2);
        assert!(!move_to_cancel(&m, &v, false), "a move under way");
        assert!(move_to_cancel(&m, &v, true), "cancelled before its retire");
        // The new copy's node went out: re-replication takes over.
        m.out.insert(4);
        assert!(move_to_cancel(&m, &v, false));
        m.out.clear();
        // The moving copy missed updates before the staying copies were complete.
        v.states.insert(2, ReplicaState::Dead);
        assert!(move_to_cancel(&m, &v, false));
        // ... but once they are, its being dead is its retire.
        v.states.insert(4, ReplicaState::Live);
        assert!(!move_to_cancel(&m, &v, false));
        assert!(
            !move_to_cancel(&m, &v, true),
            "past its retire: it finishes"
        );
        // The moving copy is the primary's (moved so, or promoted since): the move goes
        // on, and once the staying copies are complete the role goes to one of them.
        v.states.insert(2, ReplicaState::Live);
        v.primary = 2;
        assert!(!move_to_cancel(&m, &v, false));
        // ... but not in jeopardy: the recovery server would refuse the hand-over.
        let mut held = v.clone();
        held.recovery_flag = true;
        assert!(move_to_cancel(&m, &held, false));
        let leaving2: std::collections::BTreeSet<NodeId> = [2].into();
        assert_eq!(
            placement_step(&v, &leaving2, &[4, 3, 1]),
            PlacementStep::Handover(1)
        );
        m.volumes.insert("vol0".into(), v.clone());
        // To the staying copy on the node that is primary of the fewest volumes, the
        // copy just rebuilt (placed last, one copy too many) last of all.
        let mut other = volume(4);
        other.name = "other".into();
        m.volumes.insert("other".into(), other);
        assert_eq!(handover_target(&m, &v, &[4, 3, 1]), Some(3));
        let mut grown = v.clone();
        grown.replicas = vec![1, 2, 4, 3];
        assert_eq!(handover_target(&m, &grown, &[4, 3, 1]), Some(1));
        // Never to a stale copy, nor to the leaving one.
        m.volumes.get_mut("vol0").unwrap().stale.insert(3);
        let v = m.volumes["vol0"].clone();
        assert_eq!(handover_target(&m, &v, &[4, 3, 1, 2]), Some(1));
    }

    /// Primaries spread too: once copies are even, the role of a volume whose copies
    /// are all live goes from the node that is primary of the most to a live copy on
    /// the node that is primary of the fewest; a node whose only copies are primaries'
    /// still gives one up (its role handed over first).
    #[test]
    fn a_rebalance_spreads_primaries_and_moves_a_primary_s_copy_when_it_must() {
        let mut m = lazarus_cluster::ClusterMeta::default();
        for n in 1..=3 {
            m.nodes.insert(n, node_info(n));
        }
        for name in ["a", "b", "c"] {
            let mut v = volume(1);
            v.name = name.into();
            m.volumes.insert(name.into(), v);
        }
        let all = [1, 2, 3];
        let mut steps = Vec::new();
        loop {
            match rebalance_step(&m, &all) {
                RebalanceStep::HandOver { volume, from, to } => {
                    let v = m.volumes.get_mut(&volume).unwrap();
                    assert_eq!(v.primary, from);
                    assert_eq!(v.state_of(to), Some(ReplicaState::Live));
                    v.primary = to;
                    steps.push((volume, from, to));
                }
                RebalanceStep::Move { .. } => panic!("copies are even"),
                RebalanceStep::Wait => panic!("nothing is moving"),
                RebalanceStep::Done => break,
            }
            assert!(steps.len() < 5, "{steps:?}");
        }
        let p = primaries_held(&m);
        assert_eq!((p[&1], p[&2], p[&3]), (1, 1, 1), "{steps:?}");
        // A volume in jeopardy is left as it is (its primary holds it at the recovery
        // server, which refuses a hand-over's fence).
        let mut j = m.clone();
        for v in j.volumes.values_mut() {
            v.primary = 1;
            v.recovery_flag = true;
        }
        assert_eq!(rebalance_step(&j, &all), RebalanceStep::Done);
        // A stale copy is never given the role.
        for v in m.volumes.values_mut() {
            v.primary = 1;
            v.stale.insert(2);
            v.stale.insert(3);
        }
        assert_eq!(rebalance_step(&m, &all), RebalanceStep::Done);
        // n4 joins; n1-n3 each hold one volume's copy, all of them primaries (one copy
        // per volume): the primary's copy moves, as no other can.
        let mut m = lazarus_cluster::ClusterMeta::default();
        for n in 1..=4 {
            m.nodes.insert(n, node_info(n));
        }
        for (name, n) in [("a", 1), ("b", 1), ("c", 2), ("d", 3)] {
            let mut v = volume(n);
            v.name = name.into();
            v.replicas = vec![n];
            v.states = [(n, ReplicaState::Live)].into();
            v.replication = 1;
            m.volumes.insert(name.into(), v);
        }
        assert_eq!(
            rebalance_step(&m, &[1, 2, 3, 4]),
            RebalanceStep::Move {
                volume: "a".into(),
                from: 1,
                to: 4
            }
        );
    }
}
