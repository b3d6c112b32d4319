//! The cluster metadata: what Raft replicates. A pure state machine — `apply` is a
//! function of the state and one command — so every rule here is tested without a
//! network. A replica state change is a command: it takes effect on a node only once
//! committed and applied (DESIGN.md, "a change of state is committed before it takes
//! effect").

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub type NodeId = u64;

/// Replication factor limits.
pub const REPLICATION_FACTOR_MAX: usize = 5;
pub const REPLICATION_FACTOR_DEFAULT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Up to date: receives every update synchronously; counts as a failure domain.
    Live,
    /// Missed updates: receives nothing until it resyncs.
    Dead,
    /// Catching up by Merkle diff while taking new writes; not yet a failure domain.
    Resyncing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub rpc: String,
    pub nbd: String,
    pub admin: String,
    /// Random per process start: a node that sees its own incarnation in its applied
    /// metadata knows it has caught up with everything committed before it started.
    #[serde(default)]
    pub incarnation: u64,
    /// The jeopardy policy this node was started with (none: registered before nodes
    /// said; counts as `suspend`).
    #[serde(default)]
    pub jeopardy_policy: Option<lazarus_types::JeopardyPolicy>,
    /// This node's process stores a replicated write under the block ids its primary
    /// sends with it (`KIND_REPLICATE_IDS`); false for a node of an older version,
    /// which is sent the blocks alone.
    #[serde(default)]
    pub takes_ids: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub uid: u64,
    pub size_bytes: u64,
    /// Hosting nodes, primary included.
    pub replicas: Vec<NodeId>,
    pub primary: NodeId,
    /// Bumped at every change of primary; updates from an older epoch are refused.
    pub epoch: u64,
    pub states: BTreeMap<NodeId, ReplicaState>,
    /// Jeopardy protection on: the primary writes every change through the recovery
    /// server first (DESIGN.md, "Last failure domain").
    #[serde(default)]
    pub recovery_flag: bool,
    /// Bumped at each entry into jeopardy and at each promotion fenced at the recovery
    /// server; a rejoining node compares it with its own.
    #[serde(default)]
    pub failure_count_id: u64,
    /// An administrator asked for jeopardy protection (`lazarus volume protect`).
    #[serde(default)]
    pub protected: bool,
    /// Copies that may lack acknowledged writes: marked dead for failing an update,
    /// deposed primaries, copies a write was acknowledged without (`MarkStale`, which
    /// the primary commits before the first such write). A dead copy *not* in here
    /// went dead by reporting its own crash and has every flushed write, so it may be
    /// promoted when no live copy is left. Cleared when the copy turns live.
    #[serde(default)]
    pub stale: BTreeSet<NodeId>,
    /// `stale` has been kept since the volume was created (false for metadata written
    /// before it existed: no dead copy of such a volume is ever promoted).
    #[serde(default)]
    pub stale_tracked: bool,
    /// Per copy, the Raft log index at which it last turned live: orders its "back in"
    /// at the recovery server after any earlier "out" (survivor claims).
    #[serde(default)]
    pub live_at: BTreeMap<NodeId, u64>,
    /// The Raft log index of the last change to this volume.
    #[serde(default)]
    pub changed_at: u64,
    /// Per copy, the Raft log index at which it last turned resyncing.
    #[serde(default)]
    pub resyncing_at: BTreeMap<NodeId, u64>,
    /// Copies the volume is meant to have (0: metadata from before it was kept, where
    /// it is the number of replicas). While a copy is rebuilt elsewhere (`AddCopy`)
    /// `replicas` holds one more until the copy it replaces is dropped.
    #[serde(default)]
    pub replication: usize,
    /// The epoch whose primary handed the role over on purpose (`HandOver`: a
    /// rebalance, a node taken out while it still serves), alive and serving until
    /// then. Connections that wrote through it may follow the role to its successor
    /// at the next epoch instead of failing (the NBD front end). None after a
    /// failover.
    #[serde(default)]
    pub handed_over: Option<u64>,
    /// The volume's snapshots: name -> id. A node serves `VOLUME@NAME` only from a
    /// copy whose snapshot file carries this id (one that missed a deletion and a
    /// re-creation under the name is never served).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshots: BTreeMap<String, u64>,
    /// Snapshot name -> its size in bytes, where recorded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshot_sizes: BTreeMap<String, u64>,
    /// The epoch at which the primary's tenure began: set when the primary changes
    /// (a promotion, a hand-over, an adoption that names another node), kept when an
    /// adoption moves the epoch on under the same primary. What a primary noted in an
    /// earlier tenure may have been overwritten by another primary since (the jeopardy
    /// drain's `Unflushed`, simulator seed 14193).
    #[serde(default)]
    pub primary_since: u64,
    /// A clone being filled from its snapshot (`lazarus volume clone`): not served,
    /// listed as cloning, until `CloneDone` either ends the fill or removes the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloning: Option<CloneFill>,
}

/// Where a clone being filled comes from, and which node fills it (`VolumeInfo::cloning`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneFill {
    pub source: String,
    pub snapshot: String,
    /// The node whose process fills it: the clone is given up (removed) once that
    /// process is gone (the node restarted, or is out).
    pub by: NodeId,
}

impl VolumeInfo {
    /// The number of copies the volume is meant to have.
    pub fn replication_factor(&self) -> usize {
        if self.replication == 0 {
            self.replicas.len()
        } else {
            self.replication
        }
    }

    /// Whether dead copy `n` may be promoted: no replica is live, the volume is not in
    /// jeopardy, and `n` went dead only by reporting its own crash with nothing
    /// acknowledged without it since (so it has every flushed write).
    pub fn promotable_dead(&self, n: NodeId) -> bool {
        let any_live = self
            .replicas
            .iter()
            .any(|r| *r != self.primary && self.state_of(*r) == Some(ReplicaState::Live));
        n != self.primary
            && self.stale_tracked
            && !self.recovery_flag
            && !any_live
            && self.state_of(n) == Some(ReplicaState::Dead)
            && !self.stale.contains(&n)
    }

    pub fn state_of(&self, node: NodeId) -> Option<ReplicaState> {
        self.states.get(&node).copied()
    }

    /// Copies in state `live`, the primary included.
    pub fn live(&self) -> Vec<NodeId> {
        self.replicas
            .iter()
            .copied()
            .filter(|n| self.state_of(*n) == Some(ReplicaState::Live))
            .collect()
    }

    /// Replicas (not the primary) that receive updates: live and resyncing ones.
    pub fn update_targets(&self) -> Vec<NodeId> {
        self.replicas
            .iter()
            .copied()
            .filter(|n| {
                *n != self.primary
                    && matches!(
                        self.state_of(*n),
                        Some(ReplicaState::Live | ReplicaState::Resyncing)
                    )
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub volumes: BTreeMap<String, VolumeInfo>,
    /// Next volume uid to hand out (uids are never reused).
    pub next_uid: u64,
    /// Uids of deleted volumes: a node still holding a copy of one deletes it.
    #[serde(default)]
    pub deleted: std::collections::BTreeSet<u64>,
    /// Per node, when (unix ms, as proposed) a copy of it was marked dead: its failure
    /// history, which can keep it from counting as a failure domain.
    #[serde(default)]
    pub failures: BTreeMap<NodeId, Vec<u64>>,
    /// Nodes marked out (silent for longer than the cluster's out-time, or taken out
    /// by an administrator): no new copy is placed on them, their copies are rebuilt on
    /// other nodes and then dropped, and they do not resync the copies they still hold.
    #[serde(default)]
    pub out: BTreeSet<NodeId>,
    /// Out nodes an administrator removed (`lazarus node remove`): never marked back in
    /// on their own.
    #[serde(default)]
    pub removed: BTreeSet<NodeId>,
    /// Nodes an administrator added (`lazarus node add`) that have not registered yet:
    /// the leader makes each a Raft learner at its address; the node's own
    /// registration (`SetNode`) ends the entry.
    #[serde(default)]
    pub joining: BTreeMap<NodeId, Joining>,
    /// `lazarus node replace`: a removed node and the node its copies are rebuilt on.
    #[serde(default)]
    pub replacing: BTreeMap<NodeId, NodeId>,
    /// `lazarus rebalance` asked for, not finished: the leader moves copies one at a
    /// time until the nodes hold similar shares.
    #[serde(default)]
    pub rebalancing: bool,
    /// Per volume, the node whose copy moves off it (`MoveCopy`): it is rebuilt on
    /// another node, then retired and dropped as an out node's copy would be.
    #[serde(default)]
    pub moving: BTreeMap<String, NodeId>,
    /// Per volume, the node an administrator asked to be its primary (`lazarus volume
    /// primary`, `WantPrimary`): the leader hands the role over once that node's copy
    /// is live and current, then clears the request.
    #[serde(default)]
    pub primary_wanted: BTreeMap<String, NodeId>,
    /// Ids of nodes removed and forgotten (or whose join was cancelled): never used
    /// again. The recovery server's records of a volume name nodes by id; a new node
    /// under an old id would inherit what they say of the old one.
    #[serde(default)]
    pub forgotten: BTreeSet<NodeId>,
}

/// A node being added: its name and RPC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joining {
    pub name: String,
    pub rpc: String,
}

impl ClusterMeta {
    /// The nodes whose copy of `volume` is on its way out: the out nodes, and the node
    /// a move or a leave takes its copy off (`moving`).
    pub fn leaving(&self, volume: &str) -> BTreeSet<NodeId> {
        let mut gone = self.out.clone();
        gone.extend(self.moving.get(volume));
        gone
    }

    /// The jeopardy policy in force: `accept` only while every registered node was
    /// started with it, else `suspend`. Every node decides on this one value, so a
    /// node started with another policy than the rest can never act on a rule the
    /// others do not follow (one serving on a Raft lease while another takes the
    /// volume over at the recovery server, say).
    pub fn jeopardy_policy(&self) -> lazarus_types::JeopardyPolicy {
        use lazarus_types::JeopardyPolicy::*;
        if !self.nodes.is_empty()
            && self
                .nodes
                .values()
                .all(|n| n.jeopardy_policy == Some(Accept))
        {
            Accept
        } else {
            Suspend
        }
    }
}

/// Failure history entries kept per node.
pub const FAILURE_HISTORY_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Registers (or updates the addresses of) a node.
    SetNode {
        id: NodeId,
        info: NodeInfo,
    },
    /// Creates a volume on `replicas` (the first is the primary unless `primary` says).
    CreateVolume {
        name: String,
        size_bytes: u64,
        replicas: Vec<NodeId>,
        primary: Option<NodeId>,
        /// A clone: created in state cloning (not served until `CloneDone`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clone_of: Option<CloneFill>,
    },
    DeleteVolume {
        name: String,
    },
    /// Ends the fill of clone `name` (uid `uid`): `filled`, it is served from now on;
    /// otherwise it is removed. Nothing is done to a volume that is not that clone
    /// still being filled (answered `NotFound`).
    CloneDone {
        name: String,
        uid: u64,
        filled: bool,
    },
    /// Records snapshot `name` of `volume` with its id (`Some`), once its copies took
    /// it, or forgets it (`None`) before they delete it.
    SetSnapshot {
        volume: String,
        name: String,
        id: Option<u64>,
        /// The snapshot's size (0: not recorded), so that nodes without a copy can
        /// serve it.
        #[serde(default)]
        size_bytes: u64,
    },
    /// Grows a volume (never shrinks it: that would discard data). Each node grows its
    /// copy when it applies this.
    ResizeVolume {
        name: String,
        size_bytes: u64,
    },
    /// Changes one replica's state. `epoch` must be the volume's current epoch, so a
    /// decision taken on an old view of the volume is refused.
    SetReplicaState {
        volume: String,
        node: NodeId,
        state: ReplicaState,
        epoch: u64,
        /// When the proposer saw the failure (unix ms); recorded in the node's failure
        /// history when `state` is dead. 0: not a failure (a restart, say).
        #[serde(default)]
        at_ms: u64,
        /// For `Live` at the end of a resync: the Raft log index at which the copy
        /// turned resyncing for it (`VolumeInfo::resyncing_at`). Refused if the copy
        /// turned resyncing again since (a later resync is running, and this one may
        /// have missed updates sent while the copy was dead in between).
        #[serde(default)]
        since: Option<u64>,
        /// For `Live` at the end of a resync: the primary it copied from and that
        /// process's incarnation. Refused if the node registered another incarnation
        /// since: a primary that restarted meanwhile may have lost what the resync
        /// compared (writes a crash took, a restore from the recovery log).
        #[serde(default)]
        source: Option<(NodeId, u64)>,
    },
    /// Records that writes are about to be acknowledged without `node`'s copy (the
    /// primary commits it before the first such write).
    MarkStale {
        volume: String,
        node: NodeId,
        epoch: u64,
    },
    /// Makes `node` the primary with epoch `epoch + 1`; the old primary becomes dead.
    /// `node` must be live (a dead replica is never promoted while a live one exists:
    /// callers only ever pass live nodes, and this check makes it impossible) — or, when
    /// no replica is live and the volume is not in jeopardy, a dead copy that is not
    /// stale (it went dead by reporting its own crash: it has every flushed write).
    Promote {
        volume: String,
        node: NodeId,
        epoch: u64,
        /// The failure count ID the recovery server granted for this promotion (its
        /// compare-and-set fences the old primary); none without a recovery server.
        #[serde(default)]
        fcid: Option<u64>,
    },
    /// Asks for `node` to become `volume`'s primary (`lazarus volume primary`); None
    /// withdraws the request. `node` must hold a copy and be in.
    WantPrimary {
        volume: String,
        node: Option<NodeId>,
    },
    /// `Promote`, decided while the primary still serves and renews its lease (a
    /// rebalance, a node taken out by an administrator): the same change, recorded in
    /// `VolumeInfo::handed_over`. `node` must be live and not stale.
    HandOver {
        volume: String,
        node: NodeId,
        epoch: u64,
        #[serde(default)]
        fcid: Option<u64>,
    },
    /// Turns jeopardy protection on or off at failure count ID `fcid`.
    SetRecovery {
        volume: String,
        on: bool,
        fcid: u64,
        /// The primary proposing it held the volume at the recovery server beyond the
        /// metadata (it claimed `fcid` there first): while it did, it acknowledged
        /// writes on its own copy and the recovery log only, so every other copy may
        /// lack some and turns dead (and stale) here, as an adoption's would.
        #[serde(default)]
        alone: bool,
    },
    /// An administrator's protection request (`volume protect` / `unprotect`).
    SetProtected {
        volume: String,
        protected: bool,
    },
    /// Adopts the recovery server's newer state for a volume (decided there while the
    /// metadata had no majority): `primary` holds it at `epoch`; copies not in `live`
    /// missed writes and are dead.
    AdoptRecovery {
        volume: String,
        uid: u64,
        fcid: u64,
        primary: NodeId,
        epoch: u64,
        jeopardy: bool,
        live: Vec<NodeId>,
        /// `primary` took over from a silent holder by replaying the recovery log onto
        /// a copy that was current when the log began. Only then may a copy other than
        /// the current primary be adopted: a dead or stale copy is never made primary
        /// on the recovery server's word alone.
        #[serde(default)]
        restored: bool,
    },
    /// Marks a node out (or back in): see `ClusterMeta::out`.
    SetOut {
        node: NodeId,
        out: bool,
        /// An administrator's removal (`ClusterMeta::removed`); `out: false` cancels it.
        #[serde(default)]
        removed: bool,
    },
    /// An administrator adds a node (`lazarus node add`): the leader makes it a Raft
    /// learner at `rpc` (`ClusterMeta::joining`) and, once it has caught up, a voter if
    /// the cluster wants one more.
    AddNode {
        id: NodeId,
        name: String,
        rpc: String,
    },
    /// An administrator replaces `node` with `with` (`lazarus node replace`): `node` is
    /// removed as by `SetOut { removed }`, and its copies are rebuilt on `with` (a
    /// member, or a node being added).
    ReplaceNode {
        node: NodeId,
        with: NodeId,
    },
    /// `lazarus rebalance` (or its cancellation: the move under way finishes).
    SetRebalance {
        on: bool,
    },
    /// Moves `from`'s copy of `volume` to `to` (rebalancing): a new copy on `to`, dead
    /// and stale like `AddCopy`'s, and `from` recorded as leaving (`ClusterMeta::
    /// moving`). Only a copy of a volume whose copies are all live, one move per
    /// volume at a time. The primary's copy may move: its role is handed to a staying
    /// copy before it leaves (`HandOver`).
    MoveCopy {
        volume: String,
        from: NodeId,
        to: NodeId,
        epoch: u64,
    },
    /// Records `node`'s copy of `volume` as leaving (`ClusterMeta::moving`) when the
    /// volume holds more copies than its factor (an out node came back before its
    /// replacement was dropped): it is then retired and dropped, never resynced.
    LeaveCopy {
        volume: String,
        node: NodeId,
        epoch: u64,
    },
    /// Ends `volume`'s move (or leave) before its copy was dropped: the copy stays, a
    /// copy like any other (the leader cancels a move that cannot finish; a copy too
    /// many then leaves through `LeaveCopy`).
    CancelMove {
        volume: String,
    },
    /// Forgets a removed node that holds no copy and has left the Raft group: its id
    /// may be added again.
    ForgetNode {
        id: NodeId,
    },
    /// Places a new copy of `volume` on `node` (re-replication): it starts dead and
    /// stale (it holds nothing: never promoted, never counted), and turns live at the
    /// end of a Merkle resync from the primary like any dead copy.
    AddCopy {
        volume: String,
        node: NodeId,
        epoch: u64,
    },
    /// Removes `node`'s copy of `volume` from the placement; that node then deletes it.
    /// Only a dead copy that is not the primary, and only while the volume keeps as
    /// many live copies on nodes that are not out as its replication factor.
    DropCopy {
        volume: String,
        node: NodeId,
        epoch: u64,
    },
    /// Records a failure count ID the leader moved the recovery server to (fencing a
    /// stray claim back to the current primary); changes nothing else.
    Refence {
        volume: String,
        fcid: u64,
        epoch: u64,
    },
}

// A response lives for one proposal; boxing the volume would only cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Ok,
    Volume(VolumeInfo),
    /// The command is invalid in the current state (the reason says why).
    Rejected(String),
    /// The command names a volume that does not exist.
    NotFound(String),
    /// `CreateVolume` of a name that exists.
    Exists(String),
}

/// Why `try_apply` refused a command; callers act on the kind, never on the text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MetaError {
    Rejected(String),
    NotFound(String),
    Exists(String),
}

impl From<String> for MetaError {
    fn from(m: String) -> MetaError {
        MetaError::Rejected(m)
    }
}

impl From<&str> for MetaError {
    fn from(m: &str) -> MetaError {
        MetaError::Rejected(m.to_string())
    }
}

impl ClusterMeta {
    /// Applies one committed command. Invalid commands change nothing and answer
    /// `Rejected`: every node applies the same log, so every node rejects the same way.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        self.apply_at(cmd, 0)
    }

    /// `apply` of the command at Raft log index `index`, which the volume records
    /// (`changed_at`, and `live_at` for a copy that turns live).
    pub fn apply_at(&mut self, cmd: &MetaCommand, index: u64) -> MetaResponse {
        let r = self.apply_inner(cmd);
        if let MetaResponse::Volume(v) = &r {
            if let Some(m) = self.volumes.get_mut(&v.name) {
                m.changed_at = index;
                match cmd {
                    MetaCommand::SetReplicaState {
                        node,
                        state: ReplicaState::Live,
                        ..
                    } => {
                        m.live_at.insert(*node, index);
                    }
                    MetaCommand::SetReplicaState {
                        node,
                        state: ReplicaState::Resyncing,
                        ..
                    } => {
                        m.resyncing_at.insert(*node, index);
                    }
                    _ => {}
                }
                return MetaResponse::Volume(m.clone());
            }
        }
        r
    }

    fn apply_inner(&mut self, cmd: &MetaCommand) -> MetaResponse {
        match self.try_apply(cmd) {
            Ok(r) => r,
            Err(MetaError::Rejected(m)) => MetaResponse::Rejected(m),
            Err(MetaError::NotFound(m)) => MetaResponse::NotFound(m),
            Err(MetaError::Exists(m)) => MetaResponse::Exists(m),
        }
    }

    /// The volume, if `epoch` is its current epoch: decisions taken on an older view
    /// of the volume (before a promotion) are refused.
    fn volume_at_epoch(&mut self, name: &str, epoch: u64) -> Result<&mut VolumeInfo, MetaError> {
        let v = self.volume_mut(name)?;
        if epoch != v.epoch {
            return Err(format!("stale epoch {epoch} (volume {name:?} is at {})", v.epoch).into());
        }
        Ok(v)
    }

    /// Forgets volume `name`: each node deletes its copy once it applies this.
    fn remove_volume(&mut self, name: &str) {
        if let Some(v) = self.volumes.remove(name) {
            self.deleted.insert(v.uid);
        }
        self.moving.remove(name);
        self.primary_wanted.remove(name);
    }

    fn volume_mut(&mut self, name: &str) -> Result<&mut VolumeInfo, MetaError> {
        self.volumes
            .get_mut(name)
            .ok_or_else(|| MetaError::NotFound(format!("volume {name:?} does not exist")))
    }

    fn try_apply(&mut self, cmd: &MetaCommand) -> Result<MetaResponse, MetaError> {
        match cmd {
            MetaCommand::SetNode { id, info } => {
                if self.forgotten.contains(id) {
                    return Err(format!(
                        "node {id} was removed from the cluster: its id is not used again"
                    )
                    .into());
                }
                self.nodes.insert(*id, info.clone());
                self.joining.remove(id);
                Ok(MetaResponse::Ok)
            }
            MetaCommand::AddNode { id, name, rpc } => {
                if *id == 0 {
                    return Err("node id 0 is not a Raft id".into());
                }
                if self.forgotten.contains(id) {
                    return Err(format!(
                        "node id {id} belonged to a node removed from the cluster: ids are never used again (pick another name)"
                    )
                    .into());
                }
                if let Some(j) = self
                    .joining
                    .get(id)
                    .filter(|j| j.name != *name || j.rpc != *rpc)
                {
                    return Err(format!(
                        "node id {id} is already being added as {} at {} (cancel that with `lazarus node remove {}` first)",
                        j.name, j.rpc, j.name
                    )
                    .into());
                }
                if let Some(n) = self.nodes.values().find(|n| n.rpc == *rpc) {
                    return Err(format!("{rpc} is the RPC address of member {}", n.name).into());
                }
                if let Some(n) = self.nodes.get(id) {
                    return Err(if self.removed.contains(id) {
                        format!(
                            "node {} ({id}) was removed but is not forgotten yet: it still holds copies or is still in the Raft group",
                            n.name
                        )
                    } else {
                        format!("node {} ({id}) is already a member", n.name)
                    }
                    .into());
                }
                self.joining.insert(
                    *id,
                    Joining {
                        name: name.clone(),
                        rpc: rpc.clone(),
                    },
                );
                Ok(MetaResponse::Ok)
            }
            MetaCommand::ReplaceNode { node, with } => {
                if !self.nodes.contains_key(node) {
                    return Err(format!("node {node} is not a cluster member").into());
                }
                if node == with {
                    return Err("a node does not replace itself".into());
                }
                if !self.nodes.contains_key(with) && !self.joining.contains_key(with) {
                    return Err(format!(
                        "node {with} is neither a member nor being added (add it first)"
                    )
                    .into());
                }
                if self.out.contains(with) {
                    return Err(format!("node {with} is out: it takes no copies").into());
                }
                self.out.insert(*node);
                self.removed.insert(*node);
                self.replacing.insert(*node, *with);
                Ok(MetaResponse::Ok)
            }
            MetaCommand::WantPrimary { volume, node } => {
                let Some(n) = node else {
                    self.primary_wanted.remove(volume);
                    return Ok(MetaResponse::Ok);
                };
                if self.out.contains(n) {
                    return Err(format!("n{n} is out: it does not become a primary").into());
                }
                let v = self.volumes.get(volume).ok_or_else(|| {
                    MetaError::NotFound(format!("volume {volume:?} does not exist"))
                })?;
                if !v.replicas.contains(n) {
                    return Err(format!(
                        "n{n} holds no copy of {volume:?} (its copies: {:?})",
                        v.replicas
                    )
                    .into());
                }
                if v.primary == *n {
                    self.primary_wanted.remove(volume);
                } else {
                    self.primary_wanted.insert(volume.clone(), *n);
                }
                Ok(MetaResponse::Ok)
            }
            MetaCommand::SetRebalance { on } => {
                self.rebalancing = *on;
                Ok(MetaResponse::Ok)
            }
            MetaCommand::MoveCopy {
                volume,
                from,
                to,
                epoch,
            } => {
                if !self.nodes.contains_key(to) || self.out.contains(to) {
                    return Err(format!("node {to} is not a member that is in").into());
                }
                if self.moving.contains_key(volume) {
                    return Err(format!("a copy of {volume:?} is already moving").into());
                }
                let out = self.out.clone();
                let v = self.volume_at_epoch(volume, *epoch)?;
                if !v.replicas.contains(from) {
                    return Err(format!("node {from} holds no copy of {volume:?}").into());
                }
                if v.replicas.contains(to) {
                    return Err(format!("node {to} already holds a copy of {volume:?}").into());
                }
                let rf = v.replication_factor();
                if v.replicas.len() != rf
                    || v.live().len() != rf
                    || v.replicas.iter().any(|n| out.contains(n))
                {
                    return Err(format!(
                        "{volume:?} does not have its {rf} copies all live on nodes that are in: it is not moved now"
                    )
                    .into());
                }
                v.replication = rf;
                v.replicas.push(*to);
                v.states.insert(*to, ReplicaState::Dead);
                v.stale.insert(*to);
                let v = v.clone();
                self.moving.insert(volume.clone(), *from);
                Ok(MetaResponse::Volume(v))
            }
            MetaCommand::CancelMove { volume } => {
                if self.moving.remove(volume).is_none() {
                    return Err(format!("no copy of {volume:?} is moving").into());
                }
                Ok(MetaResponse::Ok)
            }
            MetaCommand::LeaveCopy {
                volume,
                node,
                epoch,
            } => {
                if self.moving.contains_key(volume) {
                    return Err(format!("a copy of {volume:?} is already leaving").into());
                }
                let v = self.volume_at_epoch(volume, *epoch)?;
                if !v.replicas.contains(node) || *node == v.primary {
                    return Err(format!(
                        "node {node} holds no copy of {volume:?} that may leave (the primary's does not)"
                    )
                    .into());
                }
                if v.replicas.len() <= v.replication_factor() {
                    return Err(format!(
                        "{volume:?} holds no more copies than its factor {}",
                        v.replication_factor()
                    )
                    .into());
                }
                let v = v.clone();
                self.moving.insert(volume.clone(), *node);
                Ok(MetaResponse::Volume(v))
            }
            MetaCommand::ForgetNode { id } => {
                // A join cancelled before the node registered.
                if !self.nodes.contains_key(id) && self.joining.remove(id).is_some() {
                    self.forgotten.insert(*id);
                    self.replacing.retain(|_, b| b != id);
                    return Ok(MetaResponse::Ok);
                }
                if !self.removed.contains(id) {
                    return Err(format!("node {id} was not removed: it is not forgotten").into());
                }
                if let Some(v) = self.volumes.values().find(|v| v.replicas.contains(id)) {
                    return Err(format!("node {id} still holds a copy of {:?}", v.name).into());
                }
                self.nodes.remove(id);
                self.out.remove(id);
                self.removed.remove(id);
                self.failures.remove(id);
                self.joining.remove(id);
                self.replacing.retain(|a, b| a != id && b != id);
                self.forgotten.insert(*id);
                Ok(MetaResponse::Ok)
            }
            MetaCommand::CreateVolume {
                name,
                size_bytes,
                replicas,
                primary,
                clone_of,
            } => {
                lazarus_types::check_volume_name(name)?;
                lazarus_types::check_volume_size(*size_bytes)?;
                if self.volumes.contains_key(name) {
                    return Err(MetaError::Exists(format!("volume {name:?} already exists")));
                }
                if replicas.is_empty() || replicas.len() > REPLICATION_FACTOR_MAX {
                    return Err(format!(
                        "replication factor must be 1 to {REPLICATION_FACTOR_MAX}"
                    )
                    .into());
                }
                let mut seen = replicas.clone();
                seen.sort_unstable();
                seen.dedup();
                if seen.len() != replicas.len() {
                    return Err("a node can hold only one copy of a volume".into());
                }
                if let Some(n) = replicas.iter().find(|n| !self.nodes.contains_key(n)) {
                    return Err(format!("node {n} is not a cluster member").into());
                }
                let primary = primary.unwrap_or(replicas[0]);
                if !replicas.contains(&primary) {
                    return Err(format!("primary {primary} is not one of the replicas").into());
                }
                self.next_uid += 1;
                let v = VolumeInfo {
                    name: name.clone(),
                    uid: self.next_uid,
                    size_bytes: *size_bytes,
                    replicas: replicas.clone(),
                    primary,
                    epoch: 1,
                    states: replicas.iter().map(|n| (*n, ReplicaState::Live)).collect(),
                    recovery_flag: false,
                    failure_count_id: 0,
                    protected: false,
                    stale: BTreeSet::new(),
                    stale_tracked: true,
                    live_at: BTreeMap::new(),
                    changed_at: 0,
                    resyncing_at: BTreeMap::new(),
                    replication: replicas.len(),
                    handed_over: None,
                    snapshots: BTreeMap::new(),
                    snapshot_sizes: BTreeMap::new(),
                    primary_since: 1,
                    cloning: clone_of.clone(),
                };
                self.volumes.insert(name.clone(), v.clone());
                Ok(MetaResponse::Volume(v))
            }
            MetaCommand::DeleteVolume { name } => {
                if !self.volumes.contains_key(name) {
                    return Err(MetaError::NotFound(format!(
                        "volume {name:?} does not exist"
                    )));
                }
                self.remove_volume(name);
                Ok(MetaResponse::Ok)
            }
            MetaCommand::CloneDone { name, uid, filled } => match self.volumes.get_mut(name) {
                Some(v) if v.uid == *uid && v.cloning.is_some() => {
                    if *filled {
                        v.cloning = None;
                    } else {
                        self.remove_volume(name);
                    }
                    Ok(MetaResponse::Ok)
                }
                _ => Err(MetaError::NotFound(format!(
                    "no clone {name:?} (uid {uid}) is being filled"
                ))),
            },
            MetaCommand::SetSnapshot {
                volume,
                name,
                id,
                size_bytes,
            } => {
                let v = self.volume_mut(volume)?;
                match id {
                    Some(id) => match v.snapshots.get(name) {
                        Some(had) if had != id => {
                            return Err(MetaError::Exists(format!(
                                "volume {volume:?} already has a snapshot {name:?}"
                            )))
                        }
                        _ => {
                            v.snapshots.insert(name.clone(), *id);
                            if *size_bytes > 0 {
                                v.snapshot_sizes.insert(name.clone(), *size_bytes);
                            }
                        }
                    },
                    None => {
                        v.snapshots.remove(name);
                        v.snapshot_sizes.remove(name);
                    }
                }
                Ok(MetaResponse::Ok)
            }
            MetaCommand::ResizeVolume { name, size_bytes } => {
                lazarus_types::check_volume_size(*size_bytes)?;
                let v = self.volumes.get_mut(name).ok_or_else(|| {
                    MetaError::NotFound(format!("volume {name:?} does not exist"))
                })?;
                if v.cloning.is_some() {
                    return Err(format!(
                        "volume {name:?} is a clone still being made; resize it once it is"
                    )
                    .into());
                }
                if *size_bytes < v.size_bytes {
                    return Err(format!(
                        "volume {name:?} is {} bytes: shrinking it to {size_bytes} would discard data; only growing is supported",
                        v.size_bytes
                    ).into());
                }
                v.size_bytes = *size_bytes;
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::SetReplicaState {
                volume,
                node,
                state,
                epoch,
                at_ms,
                since,
                source,
            } => {
                if let Some((p, inc)) = source.filter(|_| *state == ReplicaState::Live) {
                    let now = self.nodes.get(&p).map(|n| n.incarnation);
                    if now != Some(inc) {
                        return Err(format!(
                            "n{p} restarted (incarnation {now:?}, not {inc}) during the resync that would turn node {node}'s copy of {volume:?} live: it resyncs again"
                        )
                        .into());
                    }
                }
                if *state == ReplicaState::Resyncing
                    && (self.out.contains(node) || self.moving.get(volume) == Some(node))
                {
                    return Err(format!(
                        "node {node} is out or its copy moves: its copy of {volume:?} is rebuilt elsewhere, not resynced"
                    )
                    .into());
                }
                let v = self.volume_at_epoch(volume, *epoch)?;
                if !v.replicas.contains(node) {
                    return Err(format!("node {node} holds no copy of {volume:?}").into());
                }
                if *node == v.primary && *state != ReplicaState::Live {
                    return Err(
                        "the primary's state changes only by promoting another replica".into(),
                    );
                }
                // A copy turns live only at the end of a resync that ran while it stayed
                // resyncing, so that every update the primary acknowledged meanwhile
                // reached it. A copy marked dead in between (it missed updates from
                // then on: a jeopardy holder's `SetRecovery { alone }`, a failed
                // update) must resync again.
                let now = v.state_of(*node);
                if let Some(since) = since.filter(|_| *state == ReplicaState::Live) {
                    let at = v.resyncing_at.get(node).copied();
                    if now != Some(ReplicaState::Resyncing) || at != Some(since) {
                        return Err(format!(
                            "node {node}'s copy of {volume:?} is {now:?} (resyncing since index {at:?}), not resyncing since index {since}: another resync turns it live"
                        )
                        .into());
                    }
                }
                if *state == ReplicaState::Live
                    && *node != v.primary
                    && !matches!(now, Some(ReplicaState::Resyncing | ReplicaState::Live))
                {
                    return Err(format!(
                        "node {node}'s copy of {volume:?} is {now:?}: it turns live only at the end of a resync that it stayed resyncing through"
                    )
                    .into());
                }
                let was = v.states.insert(*node, *state);
                match state {
                    // Failed an update that is not acknowledged yet: it lacks it.
                    ReplicaState::Dead if *at_ms > 0 => {
                        v.stale.insert(*node);
                    }
                    ReplicaState::Live => {
                        v.stale.remove(node);
                    }
                    _ => {}
                }
                let v = v.clone();
                if *state == ReplicaState::Dead && was != Some(ReplicaState::Dead) && *at_ms > 0 {
                    let h = self.failures.entry(*node).or_default();
                    h.push(*at_ms);
                    if h.len() > FAILURE_HISTORY_MAX {
                        h.remove(0);
                    }
                }
                Ok(MetaResponse::Volume(v))
            }
            MetaCommand::Promote {
                volume,
                node,
                epoch,
                fcid,
            }
            | MetaCommand::HandOver {
                volume,
                node,
                epoch,
                fcid,
            } => {
                let graceful = matches!(cmd, MetaCommand::HandOver { .. });
                let v = self.volume_at_epoch(volume, *epoch)?;
                if graceful
                    && (v.state_of(*node) != Some(ReplicaState::Live) || v.stale.contains(node))
                {
                    return Err(format!(
                        "n{node} is not a live, current copy of {volume:?}: the primary role is not handed to it"
                    )
                    .into());
                }
                if let Some(f) = fcid {
                    if *f < v.failure_count_id {
                        return Err(format!(
                            "failure count ID {f} is older than the volume's {}",
                            v.failure_count_id
                        )
                        .into());
                    }
                }
                if *node == v.primary {
                    return Err(format!("node {node} is already the primary").into());
                }
                if v.state_of(*node) != Some(ReplicaState::Live) && !v.promotable_dead(*node) {
                    return Err(format!(
                        "node {node} is not a live replica of {volume:?} (nor a dead one that has every flushed write while no replica is live)"
                    ).into());
                }
                let old = v.primary;
                v.states.insert(old, ReplicaState::Dead);
                v.stale.insert(old);
                v.states.insert(*node, ReplicaState::Live);
                v.stale.remove(node);
                v.primary = *node;
                v.handed_over = graceful.then_some(v.epoch);
                v.epoch += 1;
                v.primary_since = v.epoch;
                if let Some(f) = fcid {
                    v.failure_count_id = *f;
                }
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::MarkStale {
                volume,
                node,
                epoch,
            } => {
                let v = self.volume_at_epoch(volume, *epoch)?;
                if !v.replicas.contains(node) || *node == v.primary {
                    return Err(format!("node {node} holds no replica of {volume:?}").into());
                }
                v.stale.insert(*node);
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::SetRecovery {
                volume,
                on,
                fcid,
                alone,
            } => {
                let v = self.volume_mut(volume)?;
                if *fcid < v.failure_count_id {
                    return Err(format!(
                        "failure count ID {fcid} is older than the volume's {}",
                        v.failure_count_id
                    )
                    .into());
                }
                // Only when the metadata learns the claim here: an adoption of the same
                // claim (AdoptRecovery) marked the copies already, and they may have
                // resynced since.
                if *alone && *on && *fcid > v.failure_count_id {
                    for n in v.replicas.clone() {
                        if n != v.primary {
                            v.states.insert(n, ReplicaState::Dead);
                            v.stale.insert(n);
                        }
                    }
                }
                v.recovery_flag = *on;
                v.failure_count_id = *fcid;
                // In jeopardy writes are acknowledged without the copies that are not
                // live (and none is promoted meanwhile): they are stale either way.
                let not_live: Vec<NodeId> = v
                    .replicas
                    .iter()
                    .copied()
                    .filter(|n| *n != v.primary && v.state_of(*n) != Some(ReplicaState::Live))
                    .collect();
                v.stale.extend(not_live);
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::SetProtected { volume, protected } => {
                let v = self.volume_mut(volume)?;
                v.protected = *protected;
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::AdoptRecovery {
                volume,
                uid,
                fcid,
                primary,
                epoch,
                jeopardy,
                live,
                restored,
            } => {
                let v = self.volume_mut(volume)?;
                if *primary != v.primary && !(*jeopardy && *restored) {
                    return Err(format!(
                        "n{primary} is not the primary of {volume:?} and did not restore from the recovery log: not adopted"
                    ).into());
                }
                if v.uid != *uid {
                    return Err(format!("volume {volume:?} is uid {}, not {uid}", v.uid).into());
                }
                if *fcid <= v.failure_count_id {
                    return Err(format!(
                        "failure count ID {fcid} is not newer than the volume's {}",
                        v.failure_count_id
                    )
                    .into());
                }
                if !v.replicas.contains(primary) {
                    return Err(format!("node {primary} holds no copy of {volume:?}").into());
                }
                v.failure_count_id = *fcid;
                v.recovery_flag = *jeopardy;
                v.epoch = (*epoch).max(v.epoch);
                if v.primary != *primary {
                    v.primary_since = v.epoch;
                }
                v.primary = *primary;
                for n in v.replicas.clone() {
                    let s = if n == *primary
                        || live.contains(&n) && v.state_of(n) == Some(ReplicaState::Live)
                    {
                        ReplicaState::Live
                    } else {
                        ReplicaState::Dead
                    };
                    if s == ReplicaState::Dead {
                        v.stale.insert(n);
                    } else {
                        v.stale.remove(&n);
                    }
                    v.states.insert(n, s);
                }
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::SetOut { node, out, removed } => {
                if !self.nodes.contains_key(node) {
                    return Err(format!("node {node} is not a cluster member").into());
                }
                if *out {
                    self.out.insert(*node);
                    if *removed {
                        self.removed.insert(*node);
                    }
                } else {
                    self.out.remove(node);
                    self.removed.remove(node);
                    self.replacing.remove(node);
                }
                Ok(MetaResponse::Ok)
            }
            MetaCommand::AddCopy {
                volume,
                node,
                epoch,
            } => {
                if !self.nodes.contains_key(node) {
                    return Err(format!("node {node} is not a cluster member").into());
                }
                if self.out.contains(node) {
                    return Err(format!("node {node} is out: no copy is placed on it").into());
                }
                let out = self.leaving(volume);
                let v = self.volume_at_epoch(volume, *epoch)?;
                if v.replicas.contains(node) {
                    return Err(format!("node {node} already holds a copy of {volume:?}").into());
                }
                let kept = v.replicas.iter().filter(|n| !out.contains(n)).count();
                if kept >= v.replication_factor() {
                    return Err(format!(
                        "{volume:?} has {kept} copies on nodes that are not out, for {} copies: no more is placed",
                        v.replication_factor()
                    )
                    .into());
                }
                v.replication = v.replication_factor();
                v.replicas.push(*node);
                v.states.insert(*node, ReplicaState::Dead);
                v.stale.insert(*node);
                Ok(MetaResponse::Volume(v.clone()))
            }
            MetaCommand::DropCopy {
                volume,
                node,
                epoch,
            } => {
                let out = self.out.clone();
                let v = self.volume_at_epoch(volume, *epoch)?;
                if !v.replicas.contains(node) {
                    return Err(format!("node {node} holds no copy of {volume:?}").into());
                }
                if *node == v.primary {
                    return Err(format!("node {node} is the primary of {volume:?}").into());
                }
                if v.state_of(*node) != Some(ReplicaState::Dead) {
                    return Err(format!(
                        "node {node}'s copy of {volume:?} is {:?}: only a dead copy is dropped",
                        v.state_of(*node)
                    )
                    .into());
                }
                let live = v.live().iter().filter(|n| !out.contains(n)).count();
                if live < v.replication_factor() {
                    return Err(format!(
                        "{volume:?} has {live} live copies of {}: no copy is dropped before its replacement is live",
                        v.replication_factor()
                    )
                    .into());
                }
                v.replication = v.replication_factor();
                v.replicas.retain(|n| n != node);
                v.states.remove(node);
                v.stale.remove(node);
                v.live_at.remove(node);
                v.resyncing_at.remove(node);
                let v = v.clone();
                if self.moving.get(volume) == Some(node) {
                    self.moving.remove(volume);
                }
                Ok(MetaResponse::Volume(v))
            }
            MetaCommand::Refence {
                volume,
                fcid,
                epoch,
            } => {
                let v = self.volume_at_epoch(volume, *epoch)?;
                if *fcid <= v.failure_count_id {
                    return Err(format!(
                        "failure count ID {fcid} is not newer than the volume's {}",
                        v.failure_count_id
                    )
                    .into());
                }
                v.failure_count_id = *fcid;
                Ok(MetaResponse::Volume(v.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta3() -> ClusterMeta {
        let mut m = ClusterMeta::default();
        for id in 1..=3 {
            let info = NodeInfo {
                name: format!("n{id}"),
                rpc: String::new(),
                nbd: String::new(),
                admin: String::new(),
                incarnation: 0,
                jeopardy_policy: None,
                takes_ids: false,
            };
            assert_eq!(
                m.apply(&MetaCommand::SetNode { id, info }),
                MetaResponse::Ok
            );
        }
        m
    }

    #[test]
    fn accept_holds_only_while_every_node_says_accept() {
        use lazarus_types::JeopardyPolicy::*;
        let mut m = meta3();
        assert_eq!(m.jeopardy_policy(), Suspend, "registered before nodes said");
        for n in m.nodes.values_mut() {
            n.jeopardy_policy = Some(Accept);
        }
        assert_eq!(m.jeopardy_policy(), Accept);
        m.nodes.get_mut(&2).unwrap().jeopardy_policy = Some(Suspend);
        assert_eq!(m.jeopardy_policy(), Suspend);
        m.nodes.get_mut(&2).unwrap().jeopardy_policy = None;
        assert_eq!(m.jeopardy_policy(), Suspend);
        assert_eq!(ClusterMeta::default().jeopardy_policy(), Suspend);
    }

    fn create(m: &mut ClusterMeta) -> VolumeInfo {
        let r = m.apply(&MetaCommand::CreateVolume {
            name: "vol0".into(),
            size_bytes: 1 << 30,
            replicas: vec![1, 2, 3],
            primary: None,
            clone_of: None,
        });
        let MetaResponse::Volume(v) = r else {
            panic!("{r:?}")
        };
        v
    }

    /// A clone is created being filled; `CloneDone` either ends the fill or removes
    /// it, and only for that clone (its uid) while it is still being filled.
    #[test]
    fn clone_done_ends_or_removes_the_fill() {
        let mut m = meta3();
        let fill = CloneFill {
            source: "vol0".into(),
            snapshot: "s1".into(),
            by: 2,
        };
        let clone = |m: &mut ClusterMeta, name: &str| {
            let r = m.apply(&MetaCommand::CreateVolume {
                name: name.into(),
                size_bytes: 1 << 20,
                replicas: vec![2, 1, 3],
                primary: Some(2),
                clone_of: Some(fill.clone()),
            });
            let MetaResponse::Volume(v) = r else {
                panic!("{r:?}")
            };
            assert_eq!(v.cloning.as_ref(), Some(&fill));
            v
        };
        let done = |name: &str, uid: u64, filled: bool| MetaCommand::CloneDone {
            name: name.into(),
            uid,
            filled,
        };
        let a = clone(&mut m, "a");
        let b = clone(&mut m, "b");
        assert!(matches!(
            m.apply(&done("a", b.uid, true)),
            MetaResponse::NotFound(_)
        ));
        assert!(m.volumes["a"].cloning.is_some(), "another uid ends nothing");
        assert_eq!(m.apply(&done("a", a.uid, true)), MetaResponse::Ok);
        assert_eq!(m.volumes["a"].cloning, None);
        assert!(
            matches!(m.apply(&done("a", a.uid, false)), MetaResponse::NotFound(_)),
            "a filled clone is never removed by a late give-up"
        );
        assert!(m.volumes.contains_key("a"));
        assert_eq!(m.apply(&done("b", b.uid, false)), MetaResponse::Ok);
        assert!(!m.volumes.contains_key("b"));
        assert!(m.deleted.contains(&b.uid), "its copies are deleted");
        let b2 = clone(&mut m, "b");
        assert!(matches!(
            m.apply(&done("b", b.uid, true)),
            MetaResponse::NotFound(_)
        ));
        assert!(m.volumes["b"].cloning.is_some() && b2.uid != b.uid);
    }

    #[test]
    fn create_validates() {
        let mut m = meta3();
        let v = create(&mut m);
        assert_eq!(v.primary, 1);
        assert_eq!(v.epoch, 1);
        assert_eq!(v.update_targets(), vec![2, 3]);
        let bad = |m: &mut ClusterMeta, replicas: Vec<u64>, size: u64, name: &str| {
            matches!(
                m.apply(&MetaCommand::CreateVolume {
                    name: name.into(),
                    size_bytes: size,
                    replicas,
                    primary: None,
                    clone_of: None,
                }),
                MetaResponse::Rejected(_) | MetaResponse::Exists(_)
            )
        };
        assert!(
            matches!(
                m.apply(&MetaCommand::CreateVolume {
                    name: "vol0".into(),
                    size_bytes: 1 << 30,
                    replicas: vec![1, 2, 3],
                    primary: None,
                    clone_of: None,
                }),
                MetaResponse::Exists(_)
            ),
            "duplicate name"
        );
        assert!(bad(&mut m, vec![1, 1], 1 << 30, "v"), "same node twice");
        assert!(bad(&mut m, vec![1, 9], 1 << 30, "v"), "unknown node");
        assert!(bad(&mut m, vec![], 1 << 30, "v"), "no replicas");
        assert!(bad(&mut m, vec![1], 4095, "v"), "bad size");
        assert!(!bad(&mut m, vec![2], 1 << 20, "single"), "RF 1 is allowed");
    }

    /// Who may be promoted when no replica is live: a copy that reported its own crash
    /// (it has every flushed write), never one that failed an update, was marked stale
    /// before a write was acknowledged without it, or is a deposed primary.
    #[test]
    fn crash_reported_copy_promoted_only_when_nothing_live_and_never_a_stale_one() {
        let mut m = meta3();
        let v = create(&mut m);
        let dead = |m: &mut ClusterMeta, node, at_ms| {
            m.apply(&MetaCommand::SetReplicaState {
                volume: v.name.clone(),
                node,
                state: ReplicaState::Dead,
                epoch: 1,
                at_ms,
                since: None,
                source: None,
            })
        };
        let promote = |m: &mut ClusterMeta, node, epoch| {
            m.apply(&MetaCommand::Promote {
                volume: v.name.clone(),
                node,
                epoch,
                fcid: None,
            })
        };
        // n3 failed an update (stale); n2 reported its crash (not stale) while n3 was
        // still live: not promotable while a live replica exists.
        dead(&mut m, 2, 0);
        assert!(
            matches!(promote(&mut m, 2, 1), MetaResponse::Rejected(_)),
            "n3 is live"
        );
        dead(&mut m, 3, 1234);
        assert!(
            matches!(promote(&mut m, 3, 1), MetaResponse::Rejected(_)),
            "n3 is stale"
        );
        let r = promote(&mut m, 2, 1);
        let MetaResponse::Volume(nv) = r else {
            panic!("{r:?}")
        };
        assert_eq!((nv.primary, nv.epoch), (2, 2));
        assert_eq!(nv.state_of(2), Some(ReplicaState::Live));
        assert!(nv.stale.contains(&1) && nv.stale.contains(&3) && !nv.stale.contains(&2));
        // A crash-reported copy a write was acknowledged without is stale too.
        let mut m = meta3();
        let v = create(&mut m);
        dead(&mut m, 2, 0);
        dead(&mut m, 3, 0);
        assert!(matches!(
            m.apply(&MetaCommand::MarkStale {
                volume: v.name.clone(),
                node: 2,
                epoch: 1
            }),
            MetaResponse::Volume(_)
        ));
        assert!(matches!(promote(&mut m, 2, 1), MetaResponse::Rejected(_)));
        assert!(matches!(promote(&mut m, 3, 1), MetaResponse::Volume(_)));
    }

    /// Found by the simulator (`LAZARUS_SIM_DISK_FAULTS=1 lazarus-sim seed 7 6 20`): a
    /// primary that held the volume at the recovery server beyond the metadata wrote to
    /// its copy and the log alone; when its jeopardy entry commits late, the copies it
    /// left out must not stay live (they would count as failure domains, the log would
    /// be deleted, and they would be promotable without those writes).
    #[test]
    fn a_late_jeopardy_entry_of_a_holder_marks_the_other_copies_dead() {
        let set = |m: &mut ClusterMeta, fcid, alone| {
            m.apply(&MetaCommand::SetRecovery {
                volume: "vol0".into(),
                on: true,
                fcid,
                alone,
            })
        };
        let mut m = meta3();
        let v = create(&mut m);
        let MetaResponse::Volume(nv) = set(&mut m, v.failure_count_id + 1, true) else {
            panic!()
        };
        assert_eq!(nv.live(), vec![v.primary], "{nv:?}");
        assert!(v
            .replicas
            .iter()
            .filter(|n| **n != v.primary)
            .all(|n| nv.stale.contains(n)));
        // Once known (adopted, say) the same ID marks nothing again.
        for n in v.replicas.iter().filter(|n| **n != v.primary) {
            m.volumes
                .get_mut("vol0")
                .unwrap()
                .states
                .insert(*n, ReplicaState::Live);
        }
        let MetaResponse::Volume(nv) = set(&mut m, v.failure_count_id + 1, true) else {
            panic!()
        };
        assert_eq!(nv.live().len(), 3);
        // A proposer that held nothing leaves the live copies live.
        let mut m = meta3();
        let v = create(&mut m);
        let MetaResponse::Volume(nv) = set(&mut m, v.failure_count_id + 1, false) else {
            panic!()
        };
        assert_eq!(nv.live().len(), 3);
    }

    /// Section 0 of the correctness issue: a stale, dead copy is never made primary by
    /// adoption; only the current primary, or a copy that restored from the log.
    /// Simulator seed 2678: a copy marked dead while its resync ran (a jeopardy holder's
    /// late entry) missed the updates from then on; the resync's end must not turn it
    /// live. It turns live only from resyncing.
    #[test]
    fn a_copy_turns_live_only_from_resyncing() {
        let mut m = meta3();
        let v = create(&mut m);
        let state = |m: &mut ClusterMeta, state| {
            m.apply(&MetaCommand::SetReplicaState {
                volume: v.name.clone(),
                node: 3,
                state,
                epoch: 1,
                at_ms: 0,
                since: None,
                source: None,
            })
        };
        assert!(matches!(
            state(&mut m, ReplicaState::Resyncing),
            MetaResponse::Volume(_)
        ));
        assert!(matches!(
            state(&mut m, ReplicaState::Dead),
            MetaResponse::Volume(_)
        ));
        let r = state(&mut m, ReplicaState::Live);
        assert!(matches!(r, MetaResponse::Rejected(_)), "{r:?}");
        assert_eq!(m.volumes["vol0"].state_of(3), Some(ReplicaState::Dead));
        assert!(matches!(
            state(&mut m, ReplicaState::Resyncing),
            MetaResponse::Volume(_)
        ));
        let MetaResponse::Volume(nv) = state(&mut m, ReplicaState::Live) else {
            panic!()
        };
        assert_eq!(nv.live().len(), 3);
        // Already live: a repeated proposal changes nothing and is not refused.
        assert!(matches!(
            state(&mut m, ReplicaState::Live),
            MetaResponse::Volume(_)
        ));

        // A resync's `Live` names when its copy turned resyncing: one proposed by an
        // earlier resync (delayed, retried) is refused once a later one started.
        let at = |m: &mut ClusterMeta, state, since, index| {
            m.apply_at(
                &MetaCommand::SetReplicaState {
                    volume: v.name.clone(),
                    node: 3,
                    state,
                    epoch: 1,
                    at_ms: 0,
                    since,
                    source: None,
                },
                index,
            )
        };
        at(&mut m, ReplicaState::Resyncing, None, 10);
        at(&mut m, ReplicaState::Dead, None, 11);
        at(&mut m, ReplicaState::Resyncing, None, 12);
        let r = at(&mut m, ReplicaState::Live, Some(10), 13);
        assert!(matches!(r, MetaResponse::Rejected(_)), "{r:?}");
        let MetaResponse::Volume(nv) = at(&mut m, ReplicaState::Live, Some(12), 14) else {
            panic!()
        };
        assert_eq!(nv.state_of(3), Some(ReplicaState::Live));
    }

    /// Simulator seed 980 (connections cut, failed devices): a resync compared its copy
    /// with the primary's old process, which then restarted without the writes a
    /// failed device had kept it from syncing; the copy turned live holding blocks the
    /// primary no longer had, and the live copies differed for ever. A resync's `Live`
    /// names the primary's process it copied from, and is refused once that node has
    /// registered another.
    #[test]
    fn a_resync_from_a_primary_that_restarted_does_not_turn_live() {
        let mut m = meta3();
        let v = create(&mut m);
        let register = |m: &mut ClusterMeta, incarnation| {
            let mut info = m.nodes[&1].clone();
            info.incarnation = incarnation;
            m.apply(&MetaCommand::SetNode { id: 1, info })
        };
        let set = |m: &mut ClusterMeta, state, source| {
            m.apply(&MetaCommand::SetReplicaState {
                volume: v.name.clone(),
                node: 3,
                state,
                epoch: 1,
                at_ms: 0,
                since: None,
                source,
            })
        };
        register(&mut m, 7);
        assert!(matches!(
            set(&mut m, ReplicaState::Resyncing, None),
            MetaResponse::Volume(_)
        ));
        register(&mut m, 8);
        let r = set(&mut m, ReplicaState::Live, Some((1, 7)));
        assert!(matches!(r, MetaResponse::Rejected(_)), "{r:?}");
        assert_eq!(m.volumes["vol0"].state_of(3), Some(ReplicaState::Resyncing));
        let MetaResponse::Volume(nv) = set(&mut m, ReplicaState::Live, Some((1, 8))) else {
            panic!("a resync from the current process turns the copy live")
        };
        assert_eq!(nv.state_of(3), Some(ReplicaState::Live));
    }

    #[test]
    fn adoption_never_makes_a_dead_or_stale_copy_primary() {
        let mut m = meta3();
        let v = create(&mut m);
        // n1 failed an update: dead and stale.
        m.apply(&MetaCommand::SetReplicaState {
            volume: v.name.clone(),
            node: 1,
            state: ReplicaState::Dead,
            epoch: 1,
            at_ms: 0,
            since: None,
            source: None,
        });
        let r = m.apply(&MetaCommand::Promote {
            volume: v.name.clone(),
            node: 3,
            epoch: 1,
            fcid: Some(3),
        });
        assert!(matches!(r, MetaResponse::Volume(_)), "{r:?}");
        let adopt = |m: &mut ClusterMeta, primary, jeopardy, restored| {
            m.apply(&MetaCommand::AdoptRecovery {
                volume: v.name.clone(),
                uid: v.uid,
                fcid: 4,
                primary,
                epoch: 4,
                jeopardy,
                live: vec![primary],
                restored,
            })
        };
        for (jeopardy, restored) in [(false, false), (true, false), (false, true)] {
            assert!(
                matches!(
                    adopt(&mut m, 1, jeopardy, restored),
                    MetaResponse::Rejected(_)
                ),
                "jeopardy {jeopardy} restored {restored}"
            );
        }
        assert_eq!(m.volumes["vol0"].primary, 3);
        // Fenced back instead: the failure count ID moves, nothing else.
        let r = m.apply(&MetaCommand::Refence {
            volume: v.name.clone(),
            fcid: 5,
            epoch: 2,
        });
        let MetaResponse::Volume(nv) = r else {
            panic!("{r:?}")
        };
        assert_eq!((nv.primary, nv.epoch, nv.failure_count_id), (3, 2, 5));
        assert!(matches!(
            m.apply(&MetaCommand::Refence {
                volume: v.name.clone(),
                fcid: 5,
                epoch: 2
            }),
            MetaResponse::Rejected(_)
        ));
        // A late Promote fenced at the older ID is refused.
        assert!(matches!(
            m.apply(&MetaCommand::Promote {
                volume: v.name.clone(),
                node: 2,
                epoch: 2,
                fcid: Some(4)
            }),
            MetaResponse::Rejected(_)
        ));
        // The current primary claiming without a majority, or a restored take-over, is.
        let r = m.apply(&MetaCommand::AdoptRecovery {
            volume: v.name.clone(),
            uid: v.uid,
            fcid: 6,
            primary: 3,
            epoch: 2,
            jeopardy: true,
            live: vec![3],
            restored: false,
        });
        assert!(matches!(r, MetaResponse::Volume(ref x) if x.primary == 3 && x.recovery_flag));
        // n3's tenure began at its promotion to epoch 2, and goes on.
        assert_eq!(m.volumes["vol0"].primary_since, 2);
        let r = m.apply(&MetaCommand::AdoptRecovery {
            volume: v.name.clone(),
            uid: v.uid,
            fcid: 7,
            primary: 2,
            epoch: 3,
            jeopardy: true,
            live: vec![2],
            restored: true,
        });
        assert!(matches!(r, MetaResponse::Volume(ref x) if x.primary == 2 && x.epoch == 3));
        // A new primary: a new tenure.
        assert_eq!(m.volumes["vol0"].primary_since, 3);
    }

    /// A hand-over goes only to a live, current copy, bumps the epoch as a promotion
    /// does (the old primary's copy dead and stale: it resyncs) and records the epoch
    /// handed over; a failover after it clears the record.
    #[test]
    fn a_hand_over_goes_to_a_live_current_copy_and_is_recorded() {
        let mut m = meta3();
        create(&mut m);
        let hand = |m: &mut ClusterMeta, node: u64, epoch: u64| {
            m.apply(&MetaCommand::HandOver {
                volume: "vol0".into(),
                node,
                epoch,
                fcid: None,
            })
        };
        m.volumes.get_mut("vol0").unwrap().stale.insert(2);
        assert!(matches!(hand(&mut m, 2, 1), MetaResponse::Rejected(_)));
        m.volumes.get_mut("vol0").unwrap().stale.clear();
        m.volumes
            .get_mut("vol0")
            .unwrap()
            .states
            .insert(2, ReplicaState::Resyncing);
        assert!(matches!(hand(&mut m, 2, 1), MetaResponse::Rejected(_)));
        assert!(matches!(hand(&mut m, 3, 1), MetaResponse::Volume(_)));
        let v = &m.volumes["vol0"];
        assert_eq!((v.primary, v.epoch, v.handed_over), (3, 2, Some(1)));
        assert_eq!(v.state_of(1), Some(ReplicaState::Dead));
        assert!(v.stale.contains(&1));
        let r = m.apply(&MetaCommand::Promote {
            volume: "vol0".into(),
            node: 2,
            epoch: 2,
            fcid: None,
        });
        assert!(matches!(r, MetaResponse::Rejected(_)), "n2 is resyncing");
        m.volumes
            .get_mut("vol0")
            .unwrap()
            .states
            .insert(2, ReplicaState::Live);
        let r = m.apply(&MetaCommand::Promote {
            volume: "vol0".into(),
            node: 2,
            epoch: 2,
            fcid: None,
        });
        assert!(matches!(r, MetaResponse::Volume(_)));
        assert_eq!(m.volumes["vol0"].handed_over, None);
    }

    #[test]
    fn resize_grows_only() {
        let mut m = meta3();
        let v = create(&mut m);
        let resize = |m: &mut ClusterMeta, size_bytes: u64| {
            m.apply(&MetaCommand::ResizeVolume {
                name: v.name.clone(),
                size_bytes,
            })
        };
        assert!(
            matches!(resize(&mut m, v.size_bytes * 2), MetaResponse::Volume(ref x) if x.size_bytes == v.size_bytes * 2)
        );
        assert!(
            matches!(resize(&mut m, v.size_bytes), MetaResponse::Rejected(_)),
            "shrink"
        );
        assert!(
            matches!(
                resize(&mut m, v.size_bytes * 2 + 1),
                MetaResponse::Rejected(_)
            ),
            "unaligned"
        );
        assert!(matches!(
            m.apply(&MetaCommand::ResizeVolume {
                name: "nope".into(),
                size_bytes: 1 << 30
            }),
            MetaResponse::NotFound(_)
        ));
        assert_eq!(m.volumes[&v.name].size_bytes, v.size_bytes * 2);
    }

    #[test]
    fn snapshots_are_recorded_by_name_and_id() {
        let mut m = meta3();
        let v = create(&mut m);
        let set = |m: &mut ClusterMeta, name: &str, id: Option<u64>| {
            m.apply(&MetaCommand::SetSnapshot {
                volume: v.name.clone(),
                name: name.into(),
                id,
                size_bytes: 4096,
            })
        };
        let changed = m.volumes[&v.name].changed_at;
        assert_eq!(set(&mut m, "monday", Some(7)), MetaResponse::Ok);
        // The same again (a retried proposal) is fine; another id under the name not.
        assert_eq!(set(&mut m, "monday", Some(7)), MetaResponse::Ok);
        assert!(matches!(
            set(&mut m, "monday", Some(8)),
            MetaResponse::Exists(_)
        ));
        assert_eq!(m.volumes[&v.name].snapshots["monday"], 7);
        assert_eq!(m.volumes[&v.name].snapshot_sizes["monday"], 4096);
        // Recording a snapshot is no change of the volume's copies or roles.
        assert_eq!(m.volumes[&v.name].changed_at, changed);
        assert_eq!(set(&mut m, "monday", None), MetaResponse::Ok);
        assert!(m.volumes[&v.name].snapshots.is_empty());
        assert!(m.volumes[&v.name].snapshot_sizes.is_empty());
        assert_eq!(set(&mut m, "monday", Some(8)), MetaResponse::Ok);
        assert!(matches!(
            m.apply(&MetaCommand::SetSnapshot {
                volume: "nope".into(),
                name: "x".into(),
                id: Some(1),
                size_bytes: 0,
            }),
            MetaResponse::NotFound(_)
        ));
        // Metadata written before snapshots existed still reads.
        let mut j = serde_json::to_value(&m.volumes[&v.name]).unwrap();
        j.as_object_mut().unwrap().remove("snapshots");
        let back: VolumeInfo = serde_json::from_value(j).unwrap();
        assert!(back.snapshots.is_empty());
    }

    #[test]
    fn dead_replica_gets_no_updates_and_is_never_promoted() {
        let mut m = meta3();
        create(&mut m);
        let r = m.apply(&MetaCommand::SetReplicaState {
            volume: "vol0".into(),
            node: 3,
            state: ReplicaState::Dead,
            epoch: 1,
            at_ms: 0,
            since: None,
            source: None,
        });
        assert!(matches!(r, MetaResponse::Volume(_)));
        assert_eq!(m.volumes["vol0"].update_targets(), vec![2]);
        let r = m.apply(&MetaCommand::Promote {
            volume: "vol0".into(),
            node: 3,
            epoch: 1,
            fcid: None,
        });
        assert!(
            matches!(r, MetaResponse::Rejected(_)),
            "a dead replica must not be promoted"
        );
        let r = m.apply(&MetaCommand::Promote {
            volume: "vol0".into(),
            node: 2,
            epoch: 1,
            fcid: None,
        });
        let MetaResponse::Volume(v) = r else { panic!() };
        assert_eq!((v.primary, v.epoch), (2, 2));
        assert_eq!(
            v.state_of(1),
            Some(ReplicaState::Dead),
            "the deposed primary is dead"
        );
        // Decisions taken on the old epoch are refused.
        let r = m.apply(&MetaCommand::SetReplicaState {
            volume: "vol0".into(),
            node: 3,
            state: ReplicaState::Resyncing,
            epoch: 1,
            at_ms: 0,
            since: None,
            source: None,
        });
        assert!(matches!(r, MetaResponse::Rejected(_)));
        let r = m.apply(&MetaCommand::SetReplicaState {
            volume: "vol0".into(),
            node: 2,
            state: ReplicaState::Dead,
            epoch: 2,
            at_ms: 0,
            since: None,
            source: None,
        });
        assert!(
            matches!(r, MetaResponse::Rejected(_)),
            "the primary cannot be marked dead directly"
        );
        let r = m.apply(&MetaCommand::SetReplicaState {
            volume: "vol0".into(),
            node: 3,
            state: ReplicaState::Resyncing,
            epoch: 2,
            at_ms: 0,
            since: None,
            source: None,
        });
        assert!(matches!(r, MetaResponse::Volume(_)));
        assert_eq!(m.volumes["vol0"].update_targets(), vec![3]);
    }

    #[test]
    fn state_roundtrips_through_json() {
        let mut m = meta3();
        create(&mut m);
        let text = serde_json::to_string(&m).unwrap();
        let back: ClusterMeta = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn a_copy_is_rebuilt_elsewhere_before_the_out_node_loses_it() {
        let mut m = meta3();
        let info = m.nodes[&1].clone();
        assert_eq!(
            m.apply(&MetaCommand::SetNode { id: 4, info }),
            MetaResponse::Ok
        );
        create(&mut m);
        let set = |m: &mut ClusterMeta, node, state, since| {
            m.apply(&MetaCommand::SetReplicaState {
                volume: "vol0".into(),
                node,
                state,
                epoch: 1,
                at_ms: 0,
                since,
                source: None,
            })
        };
        let add = |m: &mut ClusterMeta, node| {
            m.apply(&MetaCommand::AddCopy {
                volume: "vol0".into(),
                node,
                epoch: 1,
            })
        };
        let drop = |m: &mut ClusterMeta, node| {
            m.apply(&MetaCommand::DropCopy {
                volume: "vol0".into(),
                node,
                epoch: 1,
            })
        };
        // n3 dies and is marked out.
        assert!(matches!(
            set(&mut m, 3, ReplicaState::Dead, None),
            MetaResponse::Volume(_)
        ));
        assert_eq!(
            m.apply(&MetaCommand::SetOut {
                node: 3,
                out: true,
                removed: false
            }),
            MetaResponse::Ok
        );
        assert!(
            matches!(
                set(&mut m, 3, ReplicaState::Resyncing, None),
                MetaResponse::Rejected(_)
            ),
            "an out node's copy does not resync"
        );
        assert!(
            matches!(add(&mut m, 3), MetaResponse::Rejected(_)),
            "no copy on an out node"
        );
        assert!(
            matches!(add(&mut m, 2), MetaResponse::Rejected(_)),
            "one copy per node"
        );
        assert!(
            matches!(drop(&mut m, 3), MetaResponse::Rejected(_)),
            "not dropped while the volume has fewer live copies than its factor"
        );
        let MetaResponse::Volume(v) = add(&mut m, 4) else {
            panic!("AddCopy refused")
        };
        assert_eq!(v.replicas, vec![1, 2, 3, 4]);
        assert_eq!(v.replication_factor(), 3);
        assert_eq!(v.state_of(4), Some(ReplicaState::Dead));
        assert!(
            v.stale.contains(&4) && !v.promotable_dead(4),
            "an empty copy is never promoted"
        );
        assert!(matches!(add(&mut m, 4), MetaResponse::Rejected(_)));
        let info = m.nodes[&1].clone();
        m.apply(&MetaCommand::SetNode { id: 5, info });
        assert!(
            matches!(add(&mut m, 5), MetaResponse::Rejected(_)),
            "one replacement per out copy"
        );
        // The new copy resyncs; n3's copy stays until it is live.
        assert!(matches!(
            set(&mut m, 4, ReplicaState::Resyncing, None),
            MetaResponse::Volume(_)
        ));
        assert!(matches!(drop(&mut m, 3), MetaResponse::Rejected(_)));
        let since = m.volumes["vol0"].resyncing_at.get(&4).copied();
        assert!(matches!(
            set(&mut m, 4, ReplicaState::Live, since),
            MetaResponse::Volume(_)
        ));
        assert!(
            matches!(drop(&mut m, 1), MetaResponse::Rejected(_)),
            "never the primary"
        );
        assert!(
            matches!(drop(&mut m, 2), MetaResponse::Rejected(_)),
            "never a live copy"
        );
        m.apply(&MetaCommand::SetOut {
            node: 2,
            out: true,
            removed: false,
        });
        assert!(
            matches!(drop(&mut m, 3), MetaResponse::Rejected(_)),
            "live copies on out nodes do not count"
        );
        m.apply(&MetaCommand::SetOut {
            node: 2,
            out: false,
            removed: false,
        });
        let MetaResponse::Volume(v) = drop(&mut m, 3) else {
            panic!("DropCopy refused")
        };
        assert_eq!(v.replicas, vec![1, 2, 4]);
        assert_eq!(v.live(), vec![1, 2, 4]);
        assert!(v.state_of(3).is_none() && !v.stale.contains(&3));
        // Back in: it may hold copies again.
        assert_eq!(
            m.apply(&MetaCommand::SetOut {
                node: 3,
                out: false,
                removed: false,
            }),
            MetaResponse::Ok
        );
        assert!(m.out.is_empty());
        // An administrator's removal sticks until it is cancelled.
        let set = |m: &mut ClusterMeta, out, removed| {
            m.apply(&MetaCommand::SetOut {
                node: 3,
                out,
                removed,
            })
        };
        assert_eq!(set(&mut m, true, true), MetaResponse::Ok);
        assert!(m.out.contains(&3) && m.removed.contains(&3));
        assert_eq!(set(&mut m, false, false), MetaResponse::Ok);
        assert!(m.out.is_empty() && m.removed.is_empty());
    }

    #[test]
    fn nodes_join_are_replaced_and_forgotten() {
        let mut m = meta3();
        create(&mut m);
        let add = |m: &mut ClusterMeta, id| {
            m.apply(&MetaCommand::AddNode {
                id,
                name: format!("n{id}"),
                rpc: format!("127.0.0.1:{}", 9000 + id),
            })
        };
        assert!(
            matches!(add(&mut m, 2), MetaResponse::Rejected(_)),
            "a member is not added again"
        );
        assert_eq!(add(&mut m, 4), MetaResponse::Ok);
        assert_eq!(m.joining[&4].rpc, "127.0.0.1:9004");
        // Its own registration ends the join.
        let mut info = m.nodes[&1].clone();
        info.name = "n4".into();
        m.apply(&MetaCommand::SetNode { id: 4, info });
        assert!(m.joining.is_empty() && m.nodes.contains_key(&4));
        // Replacing: with a node being added, or a member; never itself or an out node.
        let replace =
            |m: &mut ClusterMeta, node, with| m.apply(&MetaCommand::ReplaceNode { node, with });
        assert!(matches!(replace(&mut m, 2, 2), MetaResponse::Rejected(_)));
        assert!(
            matches!(replace(&mut m, 2, 6), MetaResponse::Rejected(_)),
            "n6 is neither a member nor joining"
        );
        assert_eq!(add(&mut m, 5), MetaResponse::Ok);
        assert_eq!(replace(&mut m, 2, 5), MetaResponse::Ok);
        assert!(m.out.contains(&2) && m.removed.contains(&2));
        assert_eq!(m.replacing.get(&2), Some(&5));
        assert!(
            matches!(replace(&mut m, 3, 2), MetaResponse::Rejected(_)),
            "an out node takes no copies"
        );
        // Forgotten only once it holds nothing.
        assert!(
            matches!(
                m.apply(&MetaCommand::ForgetNode { id: 2 }),
                MetaResponse::Rejected(_)
            ),
            "n2 still holds a copy"
        );
        assert!(
            matches!(
                m.apply(&MetaCommand::ForgetNode { id: 3 }),
                MetaResponse::Rejected(_)
            ),
            "n3 was not removed"
        );
        m.volumes
            .get_mut("vol0")
            .unwrap()
            .replicas
            .retain(|n| *n != 2);
        assert!(matches!(
            add(&mut m, 2),
            MetaResponse::Rejected(r) if r.contains("not forgotten")
        ));
        assert_eq!(
            m.apply(&MetaCommand::ForgetNode { id: 2 }),
            MetaResponse::Ok
        );
        assert!(!m.nodes.contains_key(&2) && m.out.is_empty() && m.replacing.is_empty());
        assert!(
            matches!(add(&mut m, 2), MetaResponse::Rejected(r) if r.contains("never used again")),
            "a forgotten id is not used again"
        );
        let info = m.nodes[&1].clone();
        assert!(matches!(
            m.apply(&MetaCommand::SetNode { id: 2, info }),
            MetaResponse::Rejected(_)
        ));
        // A join is cancelled before the node registers; its id is retired too.
        assert_eq!(add(&mut m, 6), MetaResponse::Ok);
        assert!(
            matches!(
                m.apply(&MetaCommand::AddNode {
                    id: 6,
                    name: "n6".into(),
                    rpc: "127.0.0.1:1".into()
                }),
                MetaResponse::Rejected(_)
            ),
            "already being added elsewhere"
        );
        assert!(
            matches!(
                m.apply(&MetaCommand::AddNode {
                    id: 7,
                    name: "n7".into(),
                    rpc: m.nodes[&1].rpc.clone()
                }),
                MetaResponse::Rejected(_)
            ),
            "a member's address"
        );
        assert_eq!(
            m.apply(&MetaCommand::ForgetNode { id: 6 }),
            MetaResponse::Ok
        );
        assert!(!m.joining.contains_key(&6) && m.forgotten.contains(&6));
    }
}
