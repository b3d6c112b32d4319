//! A model of Lazarus's failover protocol, checked exhaustively with stateright.
//!
//! One volume on three nodes (n1 n2 n3, a copy on each) and a recovery server (RS).
//! The Raft-replicated metadata is one atomic store (`State::meta`): a step may change
//! it only if the node taking it is in a partition with a majority of the nodes. Each
//! node also has its own, possibly lagging, view of it (`Node::view`). Contents of a
//! copy are the set of write ids it applied (a bit mask); every acknowledged write is
//! treated as flushed. docs/model.md says which code each action stands for.
//!
//! The protocol modelled is the fixed one; each `Bugs` flag brings back one old bug,
//! or one behaviour of the code that this model found unsafe (docs/model.md).
//!
//! With `Config::survivor`, the surviving-replica protocol too (`survivor.rs`):
//! heartbeats and pings, the contact rule for serving on a Raft lease, OUT/IN records at
//! the RS, a silent replica's claim, and the `CONTACT_WINDOW` waits; its timing
//! (`SURVIVOR_SILENCE` > `CONTACT_WINDOW`, a message is sent before it is received) is
//! encoded as enabling conditions, as for leases.

use stateright::{Model, Property};
use std::fmt;

/// Nodes of the model.
pub const N: usize = 3;
/// A set of nodes or of write ids, as a bit mask.
pub type Set = u8;

fn has(s: Set, i: usize) -> bool {
    s & (1 << i) != 0
}
fn bit(i: usize) -> Set {
    1 << i
}
fn count(s: Set) -> u32 {
    s.count_ones()
}
fn members(s: Set) -> impl Iterator<Item = usize> {
    (0..N).filter(move |i| has(s, *i))
}

/// Old bugs, each brought back by its flag (all off: the fixed protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bugs {
    /// bug0: a Raft leader cut off from the other nodes (not from the RS) fences a
    /// promotion of itself on its own old view, and the majority later adopts any RS
    /// claim it does not know, making a dead, stale copy primary.
    pub unchecked_fence: bool,
    /// bug2: a new primary serves without first reconciling the live replicas (one may
    /// hold a write the old primary sent it just before dying, which the new one lacks).
    pub no_reconcile: bool,
    /// bug3: in jeopardy, a primary whose live replicas failed an update and whose dead
    /// marks cannot commit acknowledges on its RS hold without winning a CAS first.
    pub jeopardy_isolated_ack: bool,
    /// A restarted node asks for a lease and answers the leader as a promotion
    /// candidate before it has caught up with the metadata.
    pub acts_before_caught_up: bool,
    /// Found by this model (the code as of writing): in jeopardy the primary still
    /// serves on its Raft lease alone. Cut from the RS but not from the majority, it
    /// keeps that lease while a base copy takes the volume over at the RS.
    pub jeopardy_serves_on_raft_lease: bool,
    /// Found by this model (the code as of writing): a primary acknowledges a write
    /// once it is on every live copy without checking that its lease or hold still
    /// holds; paused past both, it acknowledges after a base copy took the volume over
    /// at the RS without that write.
    pub ack_without_lease_check: bool,
    /// Found by this model (the code as of writing): a write whose replicas failed
    /// while the primary had no majority enters jeopardy at the RS and, the majority
    /// back, commits `SetRecovery` but leaves those replicas live; a promotion in
    /// jeopardy of one of them (no log replay) loses the write.
    pub jeopardy_entry_keeps_failed_live: bool,
    /// The code as of writing: leaving jeopardy commits the flag off before the RS
    /// deletes its log, so for a moment the RS is in jeopardy, its holder silent, while
    /// the primary serves on a Raft lease.
    pub clear_flag_before_rs: bool,
    /// Found by this model (the code as of writing): the RS checks the holder's
    /// silence only while the volume is in jeopardy, so right after the RS left
    /// jeopardy (its holder, the primary, still serving on a valid hold) the leader's
    /// fence of a promotion goes through.
    pub fence_ignores_hold_outside_jeopardy: bool,
    /// Found by this model (the code as of writing): `enter_jeopardy` on the write
    /// path claims the volume at the RS on the node's fresh view without checking that
    /// it is still the primary: a primary deposed while its write was in flight wins
    /// the CAS (the new primary's fence left no renewing holder) and serves under the
    /// hold next to the new primary.
    pub claim_after_deposed: bool,
    /// Found by this model (the code as of writing): the leader's `decide` enters
    /// jeopardy at the RS on the primary's behalf (CAS, holder the primary), then
    /// commits `SetRecovery`. Until the primary learns of it, it acknowledges writes
    /// without the log, committing failed replicas dead; a base copy among them can
    /// take the volume over from a log that lacks those writes. Fixed: the leader only
    /// commits the flag, and the primary makes the CAS itself when it sees it.
    pub leader_enters_for_primary: bool,
    /// Found by this model (the code as of writing): `claim_last_domain` takes the
    /// expected fcid as the larger of its old hold's and its view's, but the epoch from
    /// the old hold even when that hold is older than the view: a primary adopted at
    /// a later epoch claims back its first epoch and acknowledges a write it sent there
    /// (as a deposed primary) whose data a resync has since replaced.
    pub claim_with_stale_hold_epoch: bool,
    /// Survivor protocol without the OUT record: a primary acknowledges writes
    /// without a failed replica without recording it out at the RS, so that stale
    /// replica, cut off with its old view, may claim the volume as its survivor.
    pub survivor_without_out: bool,
    /// Survivor protocol without the contact rule: a primary serves on its Raft lease
    /// without fresh contact with every live replica or the RS, so it serves on in the
    /// majority while a replica cut off with the RS claims the volume as its survivor.
    pub survivor_without_contact_rule: bool,
}

impl Bugs {
    /// The flags by name, as the command line and the docs spell them.
    pub const NAMES: [&'static str; 14] = [
        "unchecked_fence",
        "no_reconcile",
        "jeopardy_isolated_ack",
        "acts_before_caught_up",
        "jeopardy_serves_on_raft_lease",
        "ack_without_lease_check",
        "jeopardy_entry_keeps_failed_live",
        "clear_flag_before_rs",
        "fence_ignores_hold_outside_jeopardy",
        "claim_after_deposed",
        "leader_enters_for_primary",
        "claim_with_stale_hold_epoch",
        "survivor_without_out",
        "survivor_without_contact_rule",
    ];

    /// Turns on the flag called `name`; false if there is none.
    pub fn set(&mut self, name: &str) -> bool {
        let f = match name {
            "unchecked_fence" => &mut self.unchecked_fence,
            "no_reconcile" => &mut self.no_reconcile,
            "jeopardy_isolated_ack" => &mut self.jeopardy_isolated_ack,
            "acts_before_caught_up" => &mut self.acts_before_caught_up,
            "jeopardy_serves_on_raft_lease" => &mut self.jeopardy_serves_on_raft_lease,
            "ack_without_lease_check" => &mut self.ack_without_lease_check,
            "jeopardy_entry_keeps_failed_live" => &mut self.jeopardy_entry_keeps_failed_live,
            "clear_flag_before_rs" => &mut self.clear_flag_before_rs,
            "fence_ignores_hold_outside_jeopardy" => &mut self.fence_ignores_hold_outside_jeopardy,
            "claim_after_deposed" => &mut self.claim_after_deposed,
            "leader_enters_for_primary" => &mut self.leader_enters_for_primary,
            "claim_with_stale_hold_epoch" => &mut self.claim_with_stale_hold_epoch,
            "survivor_without_out" => &mut self.survivor_without_out,
            "survivor_without_contact_rule" => &mut self.survivor_without_contact_rule,
            _ => return false,
        };
        *f = true;
        true
    }
}

/// What a run explores: the bounds of its faults and writes, where it starts, which
/// bugs are back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Client writes (ids 0..writes).
    pub writes: u8,
    /// Node crashes (each followed by any number of restarts).
    pub crashes: u8,
    /// Cuts of one node from the other nodes (`fault isolate`: not from the RS).
    pub isolations: u8,
    /// Cuts of one node from the recovery server.
    pub rs_cuts: u8,
    /// Replication updates failed on purpose to a reachable replica (`fault drop`).
    pub drops: u8,
    /// Pauses (SIGSTOP, a stalled VM, renewals lost): every lease and hold of a node
    /// runs out. Otherwise a lease or hold runs out only once it cannot be renewed.
    pub pauses: u8,
    /// Start in jeopardy, protected by an administrator (flag on, RS holder n1, base
    /// every copy, fcid 1); otherwise start with every copy live, flag off.
    pub protected: bool,
    /// Epochs and failure count IDs above this are outside the explored space.
    pub max_counter: u8,
    /// The surviving-replica protocol (`survivor.rs`): heartbeats and pings, the
    /// contact rule for serving on a Raft lease, OUT/IN records at the RS, survivor
    /// claims. Off, those actions are left out and the contact rule is not checked
    /// (the state space of the other configurations stays as it was).
    pub survivor: bool,
    pub bugs: Bugs,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            writes: 2,
            crashes: 1,
            isolations: 1,
            rs_cuts: 0,
            drops: 1,
            pauses: 1,
            protected: false,
            max_counter: 5,
            survivor: false,
            bugs: Bugs::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Copy {
    Live,
    Dead,
    Resyncing,
}

/// The volume's metadata (`VolumeInfo` in crates/lazarus-cluster/src/meta.rs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Meta {
    pub primary: u8,
    pub epoch: u8,
    pub st: [Copy; N],
    /// Copies that may lack acknowledged writes.
    pub stale: Set,
    /// `recovery_flag`: jeopardy on.
    pub flag: bool,
    /// `failure_count_id`.
    pub fcid: u8,
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st: String = self
            .st
            .iter()
            .map(|s| match s {
                Copy::Live => 'L',
                Copy::Dead => 'D',
                Copy::Resyncing => 'R',
            })
            .collect();
        write!(
            f,
            "{{P n{} e{} {st} stale {} {}fcid {}}}",
            self.primary + 1,
            self.epoch,
            nodes(self.stale),
            if self.flag { "JEOPARDY " } else { "" },
            self.fcid
        )
    }
}

/// Formats a node set as "{n1,n3}".
pub fn nodes(s: Set) -> String {
    let v: Vec<String> = members(s).map(|i| format!("n{}", i + 1)).collect();
    format!("{{{}}}", v.join(","))
}
/// Formats a write set as "{w0,w1}".
pub fn writes(s: Set) -> String {
    let v: Vec<String> = (0..8)
        .filter(|i| s & (1 << i) != 0)
        .map(|i| format!("w{i}"))
        .collect();
    format!("{{{}}}", v.join(","))
}

impl Meta {
    pub fn live(&self) -> Set {
        (0..N)
            .filter(|n| self.st[*n] == Copy::Live)
            .fold(0, |s, n| s | bit(n))
    }

    /// Replicas (not the primary) that take updates: live and resyncing.
    pub fn update_targets(&self) -> Set {
        (0..N)
            .filter(|n| *n != self.primary as usize && self.st[*n] != Copy::Dead)
            .fold(0, |s, n| s | bit(n))
    }

    /// `VolumeInfo::promotable_dead`.
    pub fn promotable_dead(&self, n: usize) -> bool {
        let any_live = (0..N).any(|r| r != self.primary as usize && self.st[r] == Copy::Live);
        n != self.primary as usize
            && !self.flag
            && !any_live
            && self.st[n] == Copy::Dead
            && !has(self.stale, n)
    }

    /// `SetReplicaState { Dead, at_ms > 0 }` (a failed update: stale).
    fn mark_dead(&mut self, n: usize) {
        self.st[n] = Copy::Dead;
        self.stale |= bit(n);
    }

    /// `SetRecovery { on, fcid }`.
    fn set_recovery(&mut self, on: bool, fcid: u8) {
        self.flag = on;
        self.fcid = fcid;
        for n in 0..N {
            if n != self.primary as usize && self.st[n] != Copy::Live {
                self.stale |= bit(n);
            }
        }
    }
}

/// A lease or hold from the recovery server (`jeopardy::Hold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hold {
    pub fcid: u8,
    pub epoch: u8,
    /// Renewed within `HOLD_LEASE`: it may serve on it.
    pub valid: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    pub up: bool,
    /// Start-up self-check done (after catching up with the metadata).
    pub ready: bool,
    pub view: Meta,
    /// Write ids applied to this node's copy.
    pub data: Set,
    /// A valid Raft lease, at this epoch.
    pub lease: Option<u8>,
    /// That lease was granted while the RS was in jeopardy (ghost, for the timing
    /// argument of take-overs).
    pub lease_in_jeopardy: bool,
    pub hold: Option<Hold>,
    /// The epoch at which this node, as primary, reconciled the live copies.
    pub reconciled: u8,
    /// Survivor protocol. As primary (in its view), it heard from every live replica
    /// of its view within `CONTACT_WINDOW` (a ping answered, not "held").
    pub contact_peers: bool,
    /// Its heartbeat to the RS was answered within `CONTACT_WINDOW` (the reply did not
    /// show another holder at a newer fcid than its view's).
    pub contact_rs: bool,
    /// It received no ping from any other node for `SURVIVOR_SILENCE`.
    pub quiet: bool,
    /// A take-over or survivor claim granted, waiting `CONTACT_WINDOW` before it
    /// serves (`Hold::restoring`).
    pub restoring: bool,
    /// That claim is a survivor's (it looks again before serving).
    pub surviving: bool,
}

/// The recovery server's state for the volume (`VolumeCoord` + the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rs {
    pub fcid: u8,
    pub holder: Option<u8>,
    pub epoch: u8,
    pub jeopardy: bool,
    pub base: Set,
    /// Write ids in the log.
    pub log: Set,
}

/// A client write on its way through the primary (`Engine` + `Cluster::replicate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Write {
    pub id: u8,
    pub from: u8,
    pub epoch: u8,
    /// Replicas still to be sent the update.
    pub pending: Set,
    /// Targets that were live in the primary's view.
    pub live: Set,
    pub applied: Set,
    pub failed: Set,
    /// Already durable on the RS (written log-first, in jeopardy).
    pub logged: bool,
    /// Some metadata change it needs could not be committed (no majority).
    pub no_majority: bool,
    /// Resolved; must still go through the RS before it is acknowledged.
    pub needs_rs: bool,
}

/// A leader's fenced decision waiting for its Raft commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `Promote { node, epoch, fcid }`.
    Promote { cand: u8, epoch: u8, fcid: u8 },
    /// `SetRecovery { on: true, fcid }` after the RS entered jeopardy.
    Enter { fcid: u8 },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub meta: Meta,
    pub nodes: [Node; N],
    pub rs: Rs,
    /// Nodes cut from the other nodes (not from the RS).
    pub cut: Set,
    /// Nodes cut from the recovery server.
    pub rs_cut: Set,
    pub next_write: u8,
    pub acked: Set,
    pub write: Option<Write>,
    pub op: Option<Op>,
    pub crashes: u8,
    pub isolations: u8,
    pub rs_cuts: u8,
    pub drops: u8,
    pub pauses: u8,
    // History (ghost variables, for the properties).
    /// A copy lacking an acknowledged write was made primary.
    pub stale_promoted: bool,
    /// A write was acknowledged at an epoch after the first.
    pub acked_after_failover: bool,
    /// A base copy took over from the RS log.
    pub took_over: bool,
    /// A jeopardy claim made without the metadata was adopted.
    pub adopted: bool,
    /// Survivor protocol: copies recorded OUT at the RS.
    pub out: Set,
    /// Copies that turned live whose IN has not reached the RS yet (dropped by a
    /// later OUT: the RS ignores an IN not newer than the last OUT).
    pub in_pending: Set,
    /// Nodes the RS has not heard a heartbeat from for `SURVIVOR_SILENCE`.
    pub rs_quiet: Set,
    /// Ghost: the survivor serving (claimed and waited), and whether it acknowledged a write.
    pub survivor: Option<u8>,
    pub survivor_acked: bool,
    /// The configuration runs the survivor protocol (constant).
    pub survivor_on: bool,
    /// Ghost, for the `CONTACT_WINDOW` wait after a take-over or survivor claim: nodes
    /// whose contact dates from before that claim (not refreshed since).
    pub pre_claim: Set,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    // Client writes on the primary.
    WriteStart(u8),
    Deliver(u8),
    DropUpdate(u8),
    WriteResolve,
    WriteThroughRs,
    // Leases and holds.
    RenewLease(u8),
    ExpireLease(u8),
    RenewHold(u8),
    ExpireHold(u8),
    // Nodes.
    Learn(u8),
    SelfCheck(u8),
    Reconcile(u8),
    ResyncBegin(u8),
    ResyncEnd(u8),
    ClaimLastDomain(u8),
    TakeOver(u8),
    // Survivor protocol.
    Contact(u8),
    LoseContactPeers(u8),
    LoseContactRs(u8),
    Quiet(u8),
    RsQuiet(u8),
    SurviveClaim(u8),
    Restored(u8),
    // The Raft leader (any node of a majority partition).
    Fence(u8),
    Commit,
    Abort,
    EnterJeopardy,
    ClearFlag,
    ClearRs,
    Adopt,
    /// bug0: a leader cut off from the other nodes fences itself on its own view.
    IsolatedLeaderFence(u8),
    // Faults.
    Crash(u8),
    Restart(u8),
    Isolate(u8),
    Reconnect(u8),
    CutRs(u8),
    HealRs(u8),
    Pause(u8),
}

impl Action {
    /// Faults, and expiry of leases/holds that could still be renewed: what the
    /// "after healing" check leaves out.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Action::Crash(_)
                | Action::Pause(_)
                | Action::Isolate(_)
                | Action::CutRs(_)
                | Action::DropUpdate(_)
                | Action::IsolatedLeaderFence(_)
        )
    }
}

pub struct Lazarus {
    pub cfg: Config,
    /// Check only the properties whose names start with this.
    pub only: Option<String>,
}

impl State {
    /// Nodes of the majority partition (empty without one). Partitions are single
    /// nodes cut off, so it is the up nodes not cut off, if there are two or more.
    pub fn majority(&self) -> Set {
        let s = (0..N)
            .filter(|n| self.nodes[*n].up && !has(self.cut, *n))
            .fold(0, |s, n| s | bit(n));
        if count(s) * 2 > N as u32 {
            s
        } else {
            0
        }
    }
    pub fn in_majority(&self, n: usize) -> bool {
        has(self.majority(), n)
    }
    /// Node-to-node traffic between `a` and `b` gets through.
    pub fn connected(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up && self.nodes[b].up && (a == b || !has(self.cut, a) && !has(self.cut, b))
    }
    pub fn reaches_rs(&self, n: usize) -> bool {
        self.nodes[n].up && !has(self.rs_cut, n)
    }
    /// The leader of the majority reaches the RS (some node of it does: the leader
    /// may be any of them).
    pub fn leader_reaches_rs(&self) -> bool {
        members(self.majority()).any(|n| !has(self.rs_cut, n))
    }
    /// The RS's holder has not renewed for `HOLDER_SILENCE_MAX` (so its hold, valid
    /// `HOLD_LEASE` from a renewal's send, has run out).
    ///
    /// Every hold still valid was renewed after the RS's last change of holder (a
    /// claim), which restarts that count: so silence means no valid hold anywhere.
    pub fn holder_silent(&self) -> bool {
        !self.nodes.iter().any(|n| n.hold.is_some_and(|h| h.valid))
    }

    /// The volume as node `n` acts on it (`Cluster::effective`): its view, unless the
    /// RS granted it a hold beyond the metadata.
    pub fn effective(&self, n: usize) -> Meta {
        let node = &self.nodes[n];
        let mut v = node.view;
        if let Some(h) = node.hold {
            if h.fcid > v.fcid {
                v.primary = n as u8;
                v.epoch = h.epoch;
                v.flag = true;
                v.fcid = h.fcid;
                for r in 0..N {
                    v.st[r] = if r == n { Copy::Live } else { Copy::Dead };
                }
            }
        }
        v
    }

    fn lease_ok(&self, n: usize, bugs: &Bugs) -> bool {
        let node = &self.nodes[n];
        let e = self.effective(n);
        // In jeopardy the RS is the coordination point: only its hold counts (fixed).
        let raft_counts = !e.flag || bugs.jeopardy_serves_on_raft_lease;
        node.up
            && e.primary as usize == n
            && (raft_counts
                && node.lease == Some(e.epoch)
                && (node.ready || bugs.acts_before_caught_up)
                && self.contact_ok(n, bugs)
                || node.hold.is_some_and(|h| h.valid && h.epoch == e.epoch) && !node.restoring)
    }

    /// Survivor protocol (`Cluster::contact_valid`): a Raft lease counts only with
    /// fresh contact with every live replica or with the RS. Checked only in
    /// configurations with the survivor protocol (`survivor` set in `State`).
    fn contact_ok(&self, n: usize, bugs: &Bugs) -> bool {
        let node = &self.nodes[n];
        !self.survivor_on
            || bugs.survivor_without_contact_rule
            || node.contact_peers
            || node.contact_rs
    }

    /// Node `n` may acknowledge writes and answer reads for the volume now: primary
    /// in its own view, under a valid lease or hold, reconciled at that epoch.
    pub fn serving(&self, n: usize, bugs: &Bugs) -> bool {
        let e = self.effective(n);
        self.lease_ok(n, bugs)
            && (bugs.no_reconcile
                || self.nodes[n].reconciled == e.epoch
                || e.fcid > self.nodes[n].view.fcid)
    }

    pub fn servers(&self, bugs: &Bugs) -> Set {
        (0..N)
            .filter(|n| self.serving(*n, bugs))
            .fold(0, |s, n| s | bit(n))
    }

    /// Every fault healed: every node up and connected, the RS reachable.
    pub fn healed(&self) -> bool {
        self.nodes.iter().all(|n| n.up) && self.cut == 0 && self.rs_cut == 0
    }

    /// Compare-and-set at the RS (`RecoveryServer::claim`). `Err` when refused.
    #[allow(clippy::too_many_arguments)]
    fn rs_claim(
        &mut self,
        fence_ignores_hold: bool,
        takeover: bool,
        expect: u8,
        holder: usize,
        epoch: u8,
        jeopardy: bool,
        base: Set,
    ) -> Result<u8, ()> {
        let cur = self.rs;
        if cur.fcid != expect {
            return Err(());
        }
        if cur.holder.is_some_and(|h| h as usize != holder) {
            // Fixed: whoever renews a hold is waited for, in jeopardy or not.
            if (cur.jeopardy || !fence_ignores_hold) && !self.holder_silent() {
                return Err(());
            }
            if cur.jeopardy && !has(cur.base, holder) {
                return Err(());
            }
        }
        // Survivor protocol: a copy OUT is never made the holder, except a base copy
        // taking over in jeopardy (it replays the log).
        let takes_over_from_log = cur.jeopardy && takeover && has(cur.base, holder);
        if cur.holder != Some(holder as u8) && has(self.out, holder) && !takes_over_from_log {
            return Err(());
        }
        let entering = jeopardy && !cur.jeopardy;
        self.rs = Rs {
            fcid: expect + 1,
            holder: Some(holder as u8),
            epoch: epoch.max(cur.epoch),
            jeopardy: cur.jeopardy || jeopardy,
            base: if entering { base } else { cur.base },
            log: if entering { 0 } else { cur.log },
        };
        Ok(expect + 1)
    }

    /// A commit proposed by node `n`: it learns the result.
    fn learn(&mut self, n: usize) {
        self.nodes[n].view = self.meta;
    }

    /// A copy became primary (in the metadata, or at the RS by a take-over). Counted
    /// only where it can take effect: a `Promote` committed after its fence was
    /// overtaken at the RS (RS ahead) serves nothing before the metadata adopts or
    /// re-fences the RS's state.
    fn note_new_primary(&mut self, n: usize) {
        if self.rs.fcid > self.meta.fcid && self.rs.holder != Some(n as u8) {
            return;
        }
        if self.acked & !self.nodes[n].data != 0 {
            self.stale_promoted = true;
        }
    }
}

impl Lazarus {
    pub fn new(cfg: Config) -> Self {
        Lazarus { cfg, only: None }
    }

    fn bugs(&self) -> &Bugs {
        &self.cfg.bugs
    }

    /// The RS knows a newer holder than the metadata's primary (`rs_overrides`): no
    /// resync runs from or to the volume until that is adopted.
    fn rs_overrides(&self, s: &State) -> bool {
        s.rs.fcid > s.meta.fcid && s.rs.holder.is_some_and(|h| h != s.meta.primary)
    }

    /// A node answers the leader's ping (it refuses while starting up, fixed).
    fn answers(&self, s: &State, n: usize) -> bool {
        s.in_majority(n) && (s.nodes[n].ready || self.bugs().acts_before_caught_up)
    }

    fn initial(&self) -> State {
        let mut meta = Meta {
            primary: 0,
            epoch: 1,
            st: [Copy::Live; N],
            stale: 0,
            flag: false,
            fcid: 0,
        };
        let mut rs = Rs {
            fcid: 0,
            holder: None,
            epoch: 0,
            jeopardy: false,
            base: 0,
            log: 0,
        };
        let mut hold = None;
        if self.cfg.protected {
            meta.flag = true;
            meta.fcid = 1;
            rs = Rs {
                fcid: 1,
                holder: Some(0),
                epoch: 1,
                jeopardy: true,
                base: 0b111,
                log: 0,
            };
            hold = Some(Hold {
                fcid: 1,
                epoch: 1,
                valid: true,
            });
        }
        let node = |i: usize| Node {
            up: true,
            ready: true,
            view: meta,
            data: 0,
            lease: if i == 0 && !self.cfg.protected {
                Some(1)
            } else {
                None
            },
            lease_in_jeopardy: false,
            hold: if i == 0 { hold } else { None },
            reconciled: if i == 0 { 1 } else { 0 },
            contact_peers: i == 0,
            contact_rs: true,
            quiet: false,
            restoring: false,
            surviving: false,
        };
        State {
            meta,
            nodes: [node(0), node(1), node(2)],
            rs,
            cut: 0,
            rs_cut: 0,
            next_write: 0,
            acked: 0,
            write: None,
            op: None,
            crashes: 0,
            isolations: 0,
            rs_cuts: 0,
            drops: 0,
            pauses: 0,
            stale_promoted: false,
            acked_after_failover: false,
            took_over: false,
            adopted: false,
            out: 0,
            in_pending: 0,
            rs_quiet: 0,
            survivor: None,
            survivor_acked: false,
            survivor_on: self.cfg.survivor,
            pre_claim: 0,
        }
    }

    /// Acknowledges the write, if its primary still serves (fixed: checked after the
    /// write is durable everywhere, as reads are); otherwise it fails.
    fn ack(&self, s: &mut State, w: &Write) {
        let n = w.from as usize;
        let still_serving = s.serving(n, self.bugs()) && s.effective(n).epoch == w.epoch;
        if !self.bugs().ack_without_lease_check && !still_serving {
            s.write = None;
            return;
        }
        s.acked |= bit(w.id as usize);
        if s.survivor == Some(w.from) {
            s.survivor_acked = true;
        }
        if w.epoch > 1 || s.meta.epoch > 1 {
            s.acked_after_failover = true;
        }
        s.write = None;
    }

    /// Survivor protocol, `record_out`: node `n` records `copies` OUT at the RS at its
    /// view's fcid before acknowledging writes without them. False when it may not go
    /// on: fenced (the RS is at another fcid) or the RS out of reach (policy
    /// `suspend`, past its deadline). Nothing to do held beyond the metadata, without
    /// the protocol, or with `survivor_without_out`.
    fn record_out(&self, s: &mut State, n: usize, copies: Set) -> bool {
        let v = s.nodes[n].view;
        if !self.cfg.survivor || self.bugs().survivor_without_out || s.effective(n).fcid > v.fcid {
            return true;
        }
        if !s.reaches_rs(n) || s.rs.fcid != v.fcid {
            return false;
        }
        s.out |= copies;
        s.in_pending &= !copies;
        true
    }

    /// `record_in`: a copy that turned live tells the RS (ordered by index: an IN
    /// older than the last OUT was dropped from `in_pending` by that OUT).
    fn record_in(s: &mut State, n: usize) {
        if has(s.in_pending, n) && s.reaches_rs(n) && s.rs.fcid == s.nodes[n].view.fcid {
            s.out &= !bit(n);
            s.in_pending &= !bit(n);
        }
    }

    // ---------------------------------------------------------------- write path

    /// `Engine` write + `Cluster::replicate` start: log first in jeopardy
    /// (`log_update`), `MarkStale` for crash-reported dead copies, apply locally.
    fn write_start(&self, s: &State, n: usize) -> Option<State> {
        if s.write.is_some() || s.next_write >= self.cfg.writes || !s.serving(n, self.bugs()) {
            return None;
        }
        let mut s = s.clone();
        let e = s.effective(n);
        let id = s.next_write;
        let mut no_majority = false;
        // Dead copies that went dead by reporting their crash: recorded stale before
        // the first write acknowledged without them.
        if !e.flag {
            let unmarked: Vec<usize> = (0..N)
                .filter(|r| *r != e.primary as usize && e.st[*r] == Copy::Dead && !has(e.stale, *r))
                .collect();
            for r in unmarked {
                if s.in_majority(n) {
                    if s.meta.epoch != e.epoch || r == s.meta.primary as usize {
                        return None; // refused: the write fails
                    }
                    s.meta.stale |= bit(r);
                    s.learn(n);
                } else {
                    no_majority = true;
                }
            }
        }
        let e = s.effective(n);
        let log_first = e.flag || count(e.live()) <= 1;
        let mut logged = false;
        if log_first {
            if !s.reaches_rs(n) {
                return None; // suspended, then EIO
            }
            if s.rs.fcid != e.fcid || s.rs.holder != Some(n as u8) {
                // "fenced": the hold is dropped, the write fails.
                s.nodes[n].hold?;
                s.nodes[n].hold = None;
                return Some(s);
            }
            if s.rs.jeopardy {
                s.rs.log |= bit(id as usize);
                logged = true;
            }
        }
        s.next_write += 1;
        s.nodes[n].data |= bit(id as usize);
        let targets = e.update_targets();
        s.write = Some(Write {
            id,
            from: n as u8,
            epoch: e.epoch,
            pending: targets,
            live: targets & e.live(),
            applied: 0,
            failed: 0,
            logged,
            no_majority,
            needs_rs: false,
        });
        Some(s)
    }

    /// A replica applies the update (`Cluster::apply_update`) or refuses it.
    fn deliver(&self, s: &State, t: usize, drop: bool) -> Option<State> {
        let w = s.write?;
        if !has(w.pending, t) || !s.nodes[w.from as usize].up {
            return None;
        }
        let node = &s.nodes[t];
        let ok = s.connected(w.from as usize, t)
            && node.ready
            && w.epoch >= node.view.epoch
            && node.view.st[t] != Copy::Dead;
        if drop && (!ok || s.drops >= self.cfg.drops) {
            return None;
        }
        let mut s = s.clone();
        let mut w = w;
        w.pending &= !bit(t);
        if ok && !drop {
            s.nodes[t].data |= bit(w.id as usize);
            w.applied |= bit(t);
        } else {
            w.failed |= bit(t);
        }
        if drop {
            s.drops += 1;
        }
        s.write = Some(w);
        Some(s)
    }

    /// Every target answered: commit the failed ones dead before acknowledging; with
    /// no majority, or no live replica reached, the write goes to the RS.
    fn write_resolve(&self, s: &State) -> Option<State> {
        let mut w = s.write?;
        let n = w.from as usize;
        if w.pending != 0 || w.needs_rs || !s.nodes[n].up {
            return None;
        }
        let mut s = s.clone();
        let e = s.effective(n);
        // Survivor protocol: out at the RS before the write can be acknowledged
        // without them (`record_out` in `replicate`).
        if w.failed != 0 && !self.record_out(&mut s, n, w.failed) {
            s.write = None;
            return Some(s);
        }
        if w.failed != 0 {
            if s.in_majority(n) {
                for t in members(w.failed) {
                    if s.meta.epoch != w.epoch || t == s.meta.primary as usize {
                        if e.fcid > s.meta.fcid {
                            continue; // held at the RS: the metadata is behind
                        }
                        s.write = None; // could not mark it dead: EIO
                        return Some(s);
                    }
                    s.meta.mark_dead(t);
                }
                s.learn(n);
            } else {
                w.no_majority = true;
            }
        }
        let acked_live = count(w.applied & w.live);
        // The volume may have entered jeopardy meanwhile (a claim at the RS): a write
        // not logged yet is logged before it is acknowledged (`note_replicated` says
        // `LogIt` once the unflushed writes were drained).
        let in_jeopardy = s.effective(n).flag;
        let through_rs = if w.logged {
            w.no_majority && !self.bugs().jeopardy_isolated_ack
        } else {
            acked_live == 0 || w.no_majority || in_jeopardy
        };
        if through_rs {
            w.needs_rs = true;
            s.write = Some(w);
        } else {
            self.ack(&mut s, &w);
        }
        Some(s)
    }

    /// The write's trip to the RS before its acknowledgement: `enter_jeopardy` then
    /// `log_update` (flag off), or (fixed bug3) a CAS winning the volume for this
    /// primary when its live replicas failed and their dead marks did not commit.
    fn write_through_rs(&self, s: &State) -> Option<State> {
        let w = s.write?;
        let n = w.from as usize;
        if !w.needs_rs || !s.reaches_rs(n) {
            return None;
        }
        let mut s = s.clone();
        let e = s.effective(n);
        // Fixed: only while still the primary at the write's epoch.
        if !self.bugs().claim_after_deposed && (e.primary as usize != n || e.epoch != w.epoch) {
            s.write = None;
            return Some(s);
        }
        let fcid;
        if w.logged {
            // bug3's fix: win the volume at the RS before acknowledging.
            match s.rs_claim(
                self.bugs().fence_ignores_hold_outside_jeopardy,
                false,
                e.fcid,
                n,
                e.epoch,
                true,
                0,
            ) {
                Ok(f) => fcid = f,
                Err(()) => {
                    s.write = None;
                    return Some(s);
                }
            }
            s.nodes[n].hold = Some(Hold {
                fcid,
                epoch: e.epoch,
                valid: true,
            });
            self.ack(&mut s, &w);
            return Some(s);
        }
        if e.flag {
            fcid = e.fcid;
        } else {
            match s.rs_claim(
                self.bugs().fence_ignores_hold_outside_jeopardy,
                false,
                e.fcid,
                n,
                e.epoch,
                true,
                e.live(),
            ) {
                Ok(f) => fcid = f,
                Err(()) => {
                    // Refused, unless the RS already has it ours.
                    let c = s.rs;
                    if !(c.jeopardy && c.holder == Some(n as u8) && c.epoch == e.epoch) {
                        s.write = None;
                        return Some(s);
                    }
                    fcid = c.fcid;
                }
            }
            s.nodes[n].hold = Some(Hold {
                fcid,
                epoch: e.epoch,
                valid: true,
            });
            // `SetRecovery { on }` through Raft, if it commits; fixed, with the dead
            // marks of the replicas that failed this write (their copies lack it).
            if s.in_majority(n) && fcid >= s.meta.fcid {
                if !self.bugs().jeopardy_entry_keeps_failed_live && s.meta.epoch == w.epoch {
                    for t in members(w.failed) {
                        if t != s.meta.primary as usize {
                            s.meta.mark_dead(t);
                        }
                    }
                }
                s.meta.set_recovery(true, fcid);
                s.learn(n);
            }
        }
        // `log_update`: fenced unless this node holds the volume at that fcid.
        if s.rs.fcid != fcid || s.rs.holder != Some(n as u8) {
            s.nodes[n].hold = None;
            s.write = None;
            return Some(s);
        }
        if s.rs.jeopardy {
            s.rs.log |= bit(w.id as usize);
        }
        self.ack(&mut s, &w);
        Some(s)
    }

    // ------------------------------------------------------------ leases, holds

    /// Whether the leader would grant node `n` a lease now.
    fn lease_renewable(&self, s: &State, n: usize) -> bool {
        let node = &s.nodes[n];
        let rs_ahead = s.rs.fcid > s.meta.fcid;
        // Fixed: no Raft lease for a volume in jeopardy (its primary serves on the
        // RS's hold); the code grants one and lets it serve (see `Bugs`).
        let in_jeopardy = s.meta.flag && !self.bugs().jeopardy_serves_on_raft_lease;
        node.up
            && (node.ready || self.bugs().acts_before_caught_up)
            && !in_jeopardy
            && s.in_majority(n)
            && node.view.primary as usize == n
            && s.meta.primary as usize == n
            && node.view.epoch == s.meta.epoch
            && !rs_ahead
            // `gives_up_lease`: no contact, no lease asked for.
            && s.contact_ok(n, self.bugs())
    }

    /// `lease_loop` + `serve_lease`: granted by a leader that confirmed its
    /// leadership, if the metadata's primary at the asked epoch is the asker and the
    /// RS is not ahead of the metadata.
    fn renew_lease(&self, s: &State, n: usize) -> Option<State> {
        if !self.lease_renewable(s, n) || s.nodes[n].lease == Some(s.meta.epoch) {
            return None;
        }
        let mut s = s.clone();
        s.nodes[n].lease = Some(s.meta.epoch);
        s.nodes[n].lease_in_jeopardy = s.rs.jeopardy;
        Some(s)
    }

    /// `hold_loop`: renew a hold, take one the metadata says this node needs, drop
    /// one the metadata caught up with or the RS fenced.
    fn renew_hold(&self, s: &State, n: usize) -> Option<State> {
        if !s.reaches_rs(n) {
            return None;
        }
        let node = s.nodes[n];
        let v = node.view;
        let mut s = s.clone();
        match node.hold {
            Some(h) => {
                if v.fcid >= h.fcid && !(v.primary as usize == n && v.flag) {
                    s.nodes[n].hold = None;
                } else if s.rs.fcid == h.fcid && s.rs.holder == Some(n as u8) {
                    if h.valid {
                        return None;
                    }
                    s.nodes[n].hold = Some(Hold { valid: true, ..h });
                } else {
                    s.nodes[n].hold = None;
                }
            }
            None => {
                if !(v.primary as usize == n && v.flag && s.rs.fcid == v.fcid) {
                    return None;
                }
                if s.rs.holder == Some(n as u8) && s.rs.jeopardy {
                    s.nodes[n].hold = Some(Hold {
                        fcid: v.fcid,
                        epoch: v.epoch,
                        valid: true,
                    });
                } else if !self.bugs().leader_enters_for_primary && node.ready {
                    // Fixed: the primary enters jeopardy at the RS itself
                    // (`enter_jeopardy`), base its live copies.
                    let fcid = s
                        .rs_claim(
                            self.bugs().fence_ignores_hold_outside_jeopardy,
                            false,
                            v.fcid,
                            n,
                            v.epoch,
                            true,
                            v.live(),
                        )
                        .ok()?;
                    s.nodes[n].hold = Some(Hold {
                        fcid,
                        epoch: v.epoch,
                        valid: true,
                    });
                } else {
                    return None;
                }
            }
        }
        Some(s)
    }

    // -------------------------------------------------------------------- nodes

    /// A node applies the committed metadata (it hears from the leader).
    fn learn(&self, s: &State, n: usize) -> Option<State> {
        if !s.in_majority(n) || s.nodes[n].view == s.meta {
            return None;
        }
        let mut s = s.clone();
        s.learn(n);
        Some(s)
    }

    /// `Cluster::self_check` after a restart, once caught up: a replica reports its
    /// copy dead (not stale: a crash loses no flushed write).
    fn self_check(&self, s: &State, n: usize) -> Option<State> {
        if s.nodes[n].ready || !s.in_majority(n) || s.nodes[n].view != s.meta {
            return None;
        }
        let mut s = s.clone();
        if s.meta.primary as usize != n && s.meta.st[n] != Copy::Dead {
            s.meta.st[n] = Copy::Dead;
            s.learn(n);
        }
        s.nodes[n].ready = true;
        Some(s)
    }

    /// `reconcile.rs` (fixed bug2): before serving at a new epoch, the primary
    /// compares its copy with every live replica that has applied that epoch and
    /// commits dead each that differs or cannot be asked.
    fn reconcile(&self, s: &State, n: usize) -> Option<State> {
        if self.bugs().no_reconcile {
            return None;
        }
        let node = &s.nodes[n];
        let e = s.effective(n);
        if !node.up || e.primary as usize != n || node.reconciled == e.epoch {
            return None;
        }
        let mut dead = 0;
        for r in (0..N).filter(|r| *r != n && e.st[*r] == Copy::Live) {
            if !s.connected(n, r) || !s.nodes[r].ready {
                dead |= bit(r);
            } else if s.nodes[r].view.epoch < e.epoch {
                return None; // asked again once it has applied the epoch
            } else if s.nodes[r].data != node.data {
                dead |= bit(r);
            }
        }
        let mut s = s.clone();
        if dead != 0 {
            if !s.in_majority(n) || s.meta.epoch != e.epoch || s.meta.primary as usize != n {
                return None;
            }
            if !self.record_out(&mut s, n, dead) {
                return None;
            }
            for r in members(dead) {
                s.meta.mark_dead(r);
            }
            s.learn(n);
        }
        s.nodes[n].reconciled = e.epoch;
        Some(s)
    }

    /// `resync.rs`: a dead copy that reaches its primary commits itself resyncing
    /// (the primary applies that before it answers) ...
    fn resync_begin(&self, s: &State, d: usize) -> Option<State> {
        let p = s.meta.primary as usize;
        if d == p
            || self.rs_overrides(s)
            || s.effective(d).primary as usize == d
            || s.meta.st[d] != Copy::Dead
            || !s.nodes[d].ready
            || !s.in_majority(d)
            || !s.in_majority(p)
            || s.nodes[d].view != s.meta
        {
            return None;
        }
        let mut s = s.clone();
        s.meta.st[d] = Copy::Resyncing;
        s.learn(d);
        s.learn(p);
        Some(s)
    }

    /// ... copies what differs from the primary's tree, and commits itself live.
    fn resync_end(&self, s: &State, d: usize) -> Option<State> {
        let p = s.meta.primary as usize;
        if d == p
            || self.rs_overrides(s)
            || s.effective(d).primary as usize == d
            || s.meta.st[d] != Copy::Resyncing
            || !s.in_majority(d)
            || !s.in_majority(p)
        {
            return None;
        }
        let mut s = s.clone();
        s.nodes[d].data = s.nodes[p].data;
        s.meta.st[d] = Copy::Live;
        s.meta.stale &= !bit(d);
        s.learn(d);
        if has(s.out, d) {
            s.in_pending |= bit(d);
            Self::record_in(&mut s, d);
        }
        Some(s)
    }

    /// `claim_last_domain`: a primary whose lease is gone (no majority) claims the
    /// volume at the RS and serves on under a hold.
    fn claim_last_domain(&self, s: &State, n: usize) -> Option<State> {
        let node = s.nodes[n];
        let v = node.view;
        let e = s.effective(n);
        let rs_overrides = s.rs.fcid > v.fcid && s.rs.holder.is_some_and(|h| h != v.primary);
        if !node.up
            || !node.ready
            || v.primary as usize != n
            || !s.reaches_rs(n)
            || rs_overrides
            || node.lease == Some(v.epoch)
            || node.hold.is_some_and(|h| h.valid && h.epoch == e.epoch)
        {
            return None;
        }
        let expect = node.hold.map_or(v.fcid, |h| h.fcid.max(v.fcid));
        let epoch = match node.hold {
            Some(h) if h.fcid > v.fcid || self.bugs().claim_with_stale_hold_epoch => h.epoch,
            _ => v.epoch,
        };
        let mut s = s.clone();
        let fcid = match s.rs_claim(
            self.bugs().fence_ignores_hold_outside_jeopardy,
            false,
            expect,
            n,
            epoch,
            true,
            v.live(),
        ) {
            Ok(f) => f,
            Err(()) => {
                let c = s.rs;
                if !(c.holder == Some(n as u8)
                    && c.jeopardy
                    && c.epoch == epoch
                    && c.fcid == expect)
                {
                    return None;
                }
                c.fcid
            }
        };
        s.nodes[n].hold = Some(Hold {
            fcid,
            epoch,
            valid: true,
        });
        Some(s)
    }

    /// `maybe_take_over`: a base copy whose holder in jeopardy went silent and does
    /// not answer claims the volume, replays the log onto its copy, and serves.
    fn take_over(&self, s: &State, y: usize) -> Option<State> {
        let node = s.nodes[y];
        let v = node.view;
        let c = s.rs;
        if !node.up
            || !s.reaches_rs(y)
            || !c.jeopardy
            || c.holder == Some(y as u8)
            || !has(c.base, y)
            || !s.holder_silent()
            || node.hold.is_some()
        {
            return None;
        }
        // A live copy under a working majority is promoted by the leader instead.
        if v.st[y] == Copy::Live && v.primary as usize != y && s.in_majority(y) && v.fcid >= c.fcid
        {
            return None;
        }
        if c.holder.is_some_and(|h| s.connected(y, h as usize)) {
            return None;
        }
        // Timing: a Raft lease granted before the RS entered jeopardy ran out
        // (`LEASE` 400 ms) before the RS counts the holder silent (`HOLDER_SILENCE_MAX`
        // 1 s from the claim or a later renewal). Fixed, none is granted while the RS
        // is in jeopardy (the metadata's flag on, or the RS ahead of it).
        if s.nodes
            .iter()
            .any(|n| n.lease.is_some() && !n.lease_in_jeopardy)
        {
            return None;
        }
        let epoch = c.epoch.max(v.epoch) + 1;
        let mut s = s.clone();
        let fcid = s
            .rs_claim(
                self.bugs().fence_ignores_hold_outside_jeopardy,
                true,
                c.fcid,
                y,
                epoch,
                true,
                0,
            )
            .ok()?;
        s.nodes[y].data |= s.rs.log;
        s.nodes[y].hold = Some(Hold {
            fcid,
            epoch,
            valid: true,
        });
        // Fixed: it serves only after `CONTACT_WINDOW` (`Restored`), so that a primary
        // serving on a contact from before the claim has stopped. Only with the
        // survivor protocol: without its contact rule the wait changes nothing but
        // the depth of every trace through a take-over.
        if self.cfg.survivor {
            s.nodes[y].restoring = true;
            s.pre_claim = !bit(y) & 0b111;
        }
        s.took_over = true;
        s.note_new_primary(y);
        Some(s)
    }

    // --------------------------------------------------------- surviving replica

    /// Node `n` pings the live replicas of its view if it is the primary there, and
    /// may heartbeat the RS: what a round of `contact_loop` would give it now.
    /// (peers contact, RS contact, RS reply shows another holder at a newer fcid.)
    fn contact_now(&self, s: &State, n: usize) -> (bool, bool, bool) {
        let node = &s.nodes[n];
        let v = node.view;
        let active = node.up && (node.ready || node.hold.is_some_and(|h| h.valid));
        if !active {
            return (false, false, false);
        }
        let blocks =
            s.reaches_rs(n) && s.rs.fcid > v.fcid && s.rs.holder.is_some_and(|h| h as usize != n);
        let rs = s.reaches_rs(n) && !blocks;
        // A replica answers a ping "held" while it holds the volume beyond the
        // metadata: not a contact.
        let peers = v.primary as usize == n
            && !blocks
            && members(v.live() & !bit(n))
                .all(|r| s.connected(n, r) && s.effective(r).primary as usize != r);
        (peers, rs, blocks)
    }

    /// Node `n` pings replica `r` now (it is primary in its view with `r` live there).
    fn pings(&self, s: &State, n: usize, r: usize) -> bool {
        let node = &s.nodes[n];
        n != r
            && node.up
            && (node.ready || node.hold.is_some_and(|h| h.valid))
            && node.view.primary as usize == n
            && node.view.st[r] == Copy::Live
            && s.connected(n, r)
    }

    /// `contact_loop`, one round: heartbeat to the RS (which notes it; its reply gives
    /// the RS's holders, and a copy live again but still out sends IN), pings to the
    /// live replicas of the volume if primary (each records the sender).
    fn contact(&self, s: &State, n: usize) -> Option<State> {
        if !self.cfg.survivor {
            return None;
        }
        let (peers, rs, blocks) = self.contact_now(s, n);
        let node = s.nodes[n];
        if !node.up || !(node.ready || node.hold.is_some_and(|h| h.valid)) {
            return None;
        }
        let mut t = s.clone();
        if s.reaches_rs(n) {
            t.rs_quiet &= !bit(n);
            Self::record_in(&mut t, n);
        }
        for r in 0..N {
            if self.pings(s, n, r) {
                t.nodes[r].quiet = false;
            }
        }
        let m = &mut t.nodes[n];
        if blocks {
            m.contact_peers = false;
            m.contact_rs = false;
        } else {
            m.contact_peers |= peers;
            m.contact_rs |= rs;
            if peers || rs {
                t.pre_claim &= !bit(n);
            }
        }
        (t != *s).then_some(t)
    }

    /// A contact runs out `CONTACT_WINDOW` after its send, only once it could not be
    /// renewed now (or by a pause).
    fn lose_contact(&self, s: &State, n: usize, rs: bool) -> Option<State> {
        if !self.cfg.survivor {
            return None;
        }
        let (peers_now, rs_now, _) = self.contact_now(s, n);
        let mut t = s.clone();
        let m = &mut t.nodes[n];
        if rs {
            if !m.contact_rs || rs_now {
                return None;
            }
            m.contact_rs = false;
        } else {
            if !m.contact_peers || peers_now {
                return None;
            }
            m.contact_peers = false;
        }
        Some(t)
    }

    /// Replica `y` has received no ping for `SURVIVOR_SILENCE`: nobody pings it now,
    /// and (timing: 1.5 s > 0.6 s, a ping is sent before it is received) every
    /// primary's contact that counted a ping to `y` has run out.
    fn quiet(&self, s: &State, y: usize) -> Option<State> {
        if !self.cfg.survivor || !s.nodes[y].up || s.nodes[y].quiet {
            return None;
        }
        for p in (0..N).filter(|p| *p != y) {
            let pn = &s.nodes[p];
            if self.pings(s, p, y)
                || pn.contact_peers && pn.view.primary as usize == p && pn.view.st[y] == Copy::Live
            {
                return None;
            }
        }
        let mut t = s.clone();
        t.nodes[y].quiet = true;
        Some(t)
    }

    /// The RS has heard no heartbeat from `n` for `SURVIVOR_SILENCE`: `n` cannot send
    /// one now, and (timing) its last answered heartbeat's contact has run out.
    fn rs_quiet(&self, s: &State, n: usize) -> Option<State> {
        let node = &s.nodes[n];
        if !self.cfg.survivor
            || has(s.rs_quiet, n)
            || node.contact_rs
            || node.up && !has(s.rs_cut, n) && (node.ready || node.hold.is_some_and(|h| h.valid))
        {
            return None;
        }
        let mut t = s.clone();
        t.rs_quiet |= bit(n);
        Some(t)
    }

    /// `maybe_survive`: a live replica outside jeopardy that heard from nobody for
    /// `SURVIVOR_SILENCE` and reaches nobody now claims the volume at the RS
    /// (`survivor_refusal`: not out, every other node silent there, RS not in jeopardy).
    fn survive_claim(&self, s: &State, y: usize) -> Option<State> {
        let node = s.nodes[y];
        let v = node.view;
        if !self.cfg.survivor
            || !node.up
            || !node.ready
            || node.hold.is_some()
            || !node.quiet
            || v.primary as usize == y
            || v.st[y] != Copy::Live
            || v.flag
            || !s.reaches_rs(y)
            || s.rs.jeopardy
            || has(s.out, y)
            || (0..N).any(|r| r != y && (s.connected(y, r) || !has(s.rs_quiet, r)))
        {
            return None;
        }
        let epoch = s.rs.epoch.max(v.epoch) + 1;
        let mut t = s.clone();
        let fcid = t
            .rs_claim(
                self.bugs().fence_ignores_hold_outside_jeopardy,
                false,
                v.fcid,
                y,
                epoch,
                true,
                bit(y),
            )
            .ok()?;
        t.nodes[y].hold = Some(Hold {
            fcid,
            epoch,
            valid: true,
        });
        t.nodes[y].restoring = true;
        t.nodes[y].surviving = true;
        t.pre_claim = !bit(y) & 0b111;
        Some(t)
    }

    /// A take-over or survivor claim waited `CONTACT_WINDOW`: every other node's
    /// contact not refreshed since the claim has run out (refreshed ones: the RS's
    /// reply shows the new holder, and the claimant answers pings "held"). A survivor
    /// then looks again: still nobody heard from, it serves; otherwise it drops the
    /// hold. A take-over serves (`maybe_take_over`).
    fn restored(&self, s: &State, y: usize) -> Option<State> {
        let node = s.nodes[y];
        if !node.up || !node.restoring {
            return None;
        }
        let mut t = s.clone();
        for p in members(s.pre_claim) {
            t.nodes[p].contact_peers = false;
            t.nodes[p].contact_rs = false;
        }
        t.pre_claim = 0;
        t.nodes[y].restoring = false;
        if !node.surviving {
            return Some(t);
        }
        t.nodes[y].surviving = false;
        if !node.quiet {
            t.nodes[y].hold = None;
            return Some(t);
        }
        t.survivor = Some(y as u8);
        t.note_new_primary(y);
        Some(t)
    }

    // ------------------------------------------------------------------- leader

    /// `watch_primaries`: the primary has been silent for `PRIMARY_SILENCE_MAX`
    /// (its lease, `LEASE` from its send, has run out): pick a live replica that
    /// answers (or, none live and flag off, a dead copy not stale) and fence the
    /// promotion at the RS (`fence_promotion`).
    fn fence(&self, s: &State, c: usize) -> Option<State> {
        let m = s.meta;
        let p = m.primary as usize;
        if s.majority() == 0 || !s.leader_reaches_rs() || s.op.is_some() || c == p {
            return None;
        }
        if s.nodes[p].lease == Some(m.epoch) {
            return None;
        }
        let live_candidates: Vec<usize> = (0..N)
            .filter(|r| *r != p && m.st[*r] == Copy::Live && self.answers(s, *r))
            .collect();
        let ok = if live_candidates.is_empty() {
            m.promotable_dead(c) && self.answers(s, c)
        } else {
            live_candidates.contains(&c)
        };
        if !ok {
            return None;
        }
        let mut s = s.clone();
        let fcid = s
            .rs_claim(
                self.bugs().fence_ignores_hold_outside_jeopardy,
                false,
                m.fcid,
                c,
                m.epoch + 1,
                false,
                0,
            )
            .ok()?;
        s.op = Some(Op::Promote {
            cand: c as u8,
            epoch: m.epoch,
            fcid,
        });
        Some(s)
    }

    /// bug0: a leader cut off from the other nodes (not from the RS) does the same on
    /// its own old view; the only candidate that answers it is itself. Its `Promote`
    /// cannot commit.
    fn isolated_leader_fence(&self, s: &State, l: usize) -> Option<State> {
        if !self.bugs().unchecked_fence || !s.nodes[l].up || !has(s.cut, l) || !s.reaches_rs(l) {
            return None;
        }
        let v = s.nodes[l].view;
        if v.primary as usize == l || v.st[l] != Copy::Live {
            return None;
        }
        let mut s = s.clone();
        s.rs_claim(
            self.bugs().fence_ignores_hold_outside_jeopardy,
            false,
            v.fcid,
            l,
            v.epoch + 1,
            false,
            0,
        )
        .ok()?;
        Some(s)
    }

    /// The leader's Raft commit of its fenced decision (`Promote`, `SetRecovery`).
    fn commit(&self, s: &State) -> Option<State> {
        let op = s.op?;
        if s.majority() == 0 {
            return None;
        }
        let mut s = s.clone();
        s.op = None;
        let m = &mut s.meta;
        match op {
            Op::Promote { cand, epoch, fcid } => {
                let c = cand as usize;
                if m.epoch == epoch
                    && fcid >= m.fcid
                    && c != m.primary as usize
                    && (m.st[c] == Copy::Live || m.promotable_dead(c))
                {
                    let old = m.primary as usize;
                    m.st[old] = Copy::Dead;
                    m.stale |= bit(old);
                    m.st[c] = Copy::Live;
                    m.stale &= !bit(c);
                    m.primary = cand;
                    m.epoch += 1;
                    m.fcid = fcid;
                    s.note_new_primary(c);
                }
            }
            Op::Enter { fcid } => {
                if fcid >= m.fcid {
                    m.set_recovery(true, fcid);
                }
            }
        }
        Some(s)
    }

    /// `decide` step 2: fewer than two failure domains, or protected: the RS enters
    /// jeopardy (holder the primary, base the live copies), then `SetRecovery`.
    fn enter_jeopardy(&self, s: &State) -> Option<State> {
        let m = s.meta;
        let maj = s.majority();
        if maj == 0
            || !s.leader_reaches_rs()
            || s.op.is_some()
            || m.flag
            || s.rs.fcid > m.fcid
            || !has(maj, m.primary as usize)
        {
            return None;
        }
        let domains = count(m.live() & maj);
        if domains > 1 && !self.cfg.protected {
            return None;
        }
        let mut s = s.clone();
        if !self.bugs().leader_enters_for_primary {
            // Fixed: the flag only; the primary claims at the RS when it sees it.
            s.meta.set_recovery(true, m.fcid);
            return Some(s);
        }
        let fcid = s
            .rs_claim(
                self.bugs().fence_ignores_hold_outside_jeopardy,
                false,
                m.fcid,
                m.primary as usize,
                m.epoch,
                true,
                m.live(),
            )
            .ok()?;
        s.op = Some(Op::Enter { fcid });
        Some(s)
    }

    /// `decide` step 3: two failure domains again (not protected): flag off.
    fn clear_flag(&self, s: &State) -> Option<State> {
        let m = s.meta;
        let maj = s.majority();
        if maj == 0
            || !s.leader_reaches_rs()
            || !m.flag
            || self.cfg.protected
            || s.rs.fcid > m.fcid
            || count(m.live() & maj) < 2
        {
            return None;
        }
        // Fixed: the RS deletes its log first (`clear_rs`), so the RS is never in
        // jeopardy while the metadata's flag is off.
        if s.rs.jeopardy && s.rs.fcid == m.fcid && !self.bugs().clear_flag_before_rs {
            return None;
        }
        let mut s = s.clone();
        let f = m.fcid;
        s.meta.set_recovery(false, f);
        Some(s)
    }

    /// `decide` step 4: the RS deletes its configuration copy and log.
    fn clear_rs(&self, s: &State) -> Option<State> {
        let m = s.meta;
        let maj = s.majority();
        let ready_to_clear = if self.bugs().clear_flag_before_rs {
            !m.flag
        } else {
            // The same decision as `clear_flag`, taken first.
            m.flag && !self.cfg.protected && count(m.live() & maj) >= 2
        };
        if maj == 0
            || !s.leader_reaches_rs()
            || !ready_to_clear
            || !s.rs.jeopardy
            || s.rs.fcid != m.fcid
        {
            return None;
        }
        let mut s = s.clone();
        s.rs.jeopardy = false;
        s.rs.log = 0;
        s.rs.base = 0;
        Some(s)
    }

    /// `decide` step 1: the RS is ahead of the metadata (decided there without a
    /// majority) for `ADOPT_AFTER`: no lease was granted meanwhile, so the metadata's
    /// primary has stopped serving on one. Fixed: adopt only a jeopardy claim whose
    /// holder is the primary or a base copy (it replayed the log); otherwise fence the
    /// RS back to the primary (`Refence`, which only raises the metadata's fcid).
    fn adopt(&self, s: &State) -> Option<State> {
        let m = s.meta;
        if s.majority() == 0 || !s.leader_reaches_rs() || s.rs.fcid <= m.fcid {
            return None;
        }
        if s.nodes[m.primary as usize].lease == Some(m.epoch) {
            return None;
        }
        let mut s = s.clone();
        let rs = s.rs;
        let holder = rs.holder.unwrap_or(m.primary) as usize;
        let p = m.primary as usize;
        let adoptable =
            self.bugs().unchecked_fence || rs.jeopardy && (holder == p || has(rs.base, holder));
        if !adoptable {
            let fcid = s
                .rs_claim(
                    self.bugs().fence_ignores_hold_outside_jeopardy,
                    false,
                    rs.fcid,
                    p,
                    rs.epoch.max(m.epoch),
                    false,
                    0,
                )
                .ok()?;
            s.meta.fcid = fcid;
            return Some(s);
        }
        let live = if rs.jeopardy {
            bit(holder)
        } else {
            m.live() & !(if holder == p { 0 } else { bit(p) })
        };
        let v = &mut s.meta;
        v.fcid = rs.fcid;
        v.flag = rs.jeopardy;
        v.epoch = rs.epoch.max(v.epoch);
        v.primary = holder as u8;
        for r in 0..N {
            if r == holder || has(live, r) && v.st[r] == Copy::Live {
                v.st[r] = Copy::Live;
                v.stale &= !bit(r);
            } else {
                v.st[r] = Copy::Dead;
                v.stale |= bit(r);
            }
        }
        s.adopted = true;
        s.note_new_primary(holder);
        Some(s)
    }

    // ------------------------------------------------------------------- faults

    fn fault(&self, s: &State, a: Action) -> Option<State> {
        let mut s = s.clone();
        match a {
            Action::Crash(n) => {
                let n = n as usize;
                if !s.nodes[n].up || s.crashes >= self.cfg.crashes {
                    return None;
                }
                s.crashes += 1;
                let node = &mut s.nodes[n];
                node.up = false;
                node.ready = false;
                node.lease = None;
                node.hold = None;
                node.reconciled = 0;
                if self.cfg.survivor {
                    node.contact_peers = false;
                    node.contact_rs = false;
                    node.quiet = false;
                    node.restoring = false;
                    node.surviving = false;
                }
                if s.write.is_some_and(|w| w.from as usize == n) {
                    s.write = None;
                }
            }
            Action::Restart(n) => {
                if s.nodes[n as usize].up {
                    return None;
                }
                s.nodes[n as usize].up = true;
            }
            Action::Isolate(n) => {
                if has(s.cut, n as usize) || s.cut != 0 || s.isolations >= self.cfg.isolations {
                    return None;
                }
                s.isolations += 1;
                s.cut |= bit(n as usize);
            }
            Action::Reconnect(n) => {
                if !has(s.cut, n as usize) {
                    return None;
                }
                s.cut &= !bit(n as usize);
            }
            Action::CutRs(n) => {
                if has(s.rs_cut, n as usize) || s.rs_cuts >= self.cfg.rs_cuts {
                    return None;
                }
                s.rs_cuts += 1;
                s.rs_cut |= bit(n as usize);
            }
            Action::Pause(n) => {
                let node = &mut s.nodes[n as usize];
                let held = node.hold.is_some_and(|h| h.valid);
                if !node.up || (node.lease.is_none() && !held) || s.pauses >= self.cfg.pauses {
                    return None;
                }
                s.pauses += 1;
                node.lease = None;
                if self.cfg.survivor {
                    node.contact_peers = false;
                    node.contact_rs = false;
                }
                if let Some(h) = &mut node.hold {
                    h.valid = false;
                }
            }
            Action::HealRs(n) => {
                if !has(s.rs_cut, n as usize) {
                    return None;
                }
                s.rs_cut &= !bit(n as usize);
            }
            _ => unreachable!(),
        }
        Some(s)
    }
}

impl Model for Lazarus {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.initial()]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        for i in 0..N as u8 {
            out.push(Action::WriteStart(i));
        }
        if let Some(w) = s.write {
            for t in members(w.pending) {
                out.push(Action::Deliver(t as u8));
                out.push(Action::DropUpdate(t as u8));
            }
            out.push(Action::WriteResolve);
            out.push(Action::WriteThroughRs);
        }
        for i in 0..N as u8 {
            out.extend([
                Action::RenewLease(i),
                Action::ExpireLease(i),
                Action::RenewHold(i),
                Action::ExpireHold(i),
                Action::Learn(i),
                Action::SelfCheck(i),
                Action::Reconcile(i),
                Action::ResyncBegin(i),
                Action::ResyncEnd(i),
                Action::ClaimLastDomain(i),
                Action::TakeOver(i),
                Action::Contact(i),
                Action::LoseContactPeers(i),
                Action::LoseContactRs(i),
                Action::Quiet(i),
                Action::RsQuiet(i),
                Action::SurviveClaim(i),
                Action::Restored(i),
                Action::Fence(i),
                Action::IsolatedLeaderFence(i),
            ]);
        }
        out.extend([
            Action::Commit,
            Action::Abort,
            Action::EnterJeopardy,
            Action::ClearFlag,
            Action::ClearRs,
            Action::Adopt,
        ]);
        for i in 0..N as u8 {
            out.extend([
                Action::Crash(i),
                Action::Restart(i),
                Action::Isolate(i),
                Action::Reconnect(i),
                Action::CutRs(i),
                Action::HealRs(i),
                Action::Pause(i),
            ]);
        }
    }

    fn next_state(&self, s: &State, a: Action) -> Option<State> {
        match a {
            Action::WriteStart(n) => self.write_start(s, n as usize),
            Action::Deliver(t) => self.deliver(s, t as usize, false),
            Action::DropUpdate(t) => self.deliver(s, t as usize, true),
            Action::WriteResolve => self.write_resolve(s),
            Action::WriteThroughRs => self.write_through_rs(s),
            Action::RenewLease(n) => self.renew_lease(s, n as usize),
            Action::ExpireLease(n) => {
                s.nodes[n as usize].lease?;
                // A lease the leader would renew now does not run out (but see Pause).
                if self.lease_renewable(s, n as usize) {
                    return None;
                }
                let mut s = s.clone();
                s.nodes[n as usize].lease = None;
                Some(s)
            }
            Action::RenewHold(n) => self.renew_hold(s, n as usize),
            Action::ExpireHold(n) => {
                let h = s.nodes[n as usize].hold.filter(|h| h.valid)?;
                if s.reaches_rs(n as usize) && s.rs.fcid == h.fcid && s.rs.holder == Some(n) {
                    return None;
                }
                let mut s = s.clone();
                s.nodes[n as usize].hold = Some(Hold { valid: false, ..h });
                Some(s)
            }
            Action::Learn(n) => self.learn(s, n as usize),
            Action::SelfCheck(n) => self.self_check(s, n as usize),
            Action::Reconcile(n) => self.reconcile(s, n as usize),
            Action::ResyncBegin(n) => self.resync_begin(s, n as usize),
            Action::ResyncEnd(n) => self.resync_end(s, n as usize),
            Action::ClaimLastDomain(n) => self.claim_last_domain(s, n as usize),
            Action::TakeOver(n) => self.take_over(s, n as usize),
            Action::Contact(n) => self.contact(s, n as usize),
            Action::LoseContactPeers(n) => self.lose_contact(s, n as usize, false),
            Action::LoseContactRs(n) => self.lose_contact(s, n as usize, true),
            Action::Quiet(n) => self.quiet(s, n as usize),
            Action::RsQuiet(n) => self.rs_quiet(s, n as usize),
            Action::SurviveClaim(n) => self.survive_claim(s, n as usize),
            Action::Restored(n) => self.restored(s, n as usize),
            Action::Fence(c) => self.fence(s, c as usize),
            Action::IsolatedLeaderFence(l) => self.isolated_leader_fence(s, l as usize),
            Action::Commit => self.commit(s),
            Action::Abort => {
                s.op?;
                let mut s = s.clone();
                s.op = None;
                Some(s)
            }
            Action::EnterJeopardy => self.enter_jeopardy(s),
            Action::ClearFlag => self.clear_flag(s),
            Action::ClearRs => self.clear_rs(s),
            Action::Adopt => self.adopt(s),
            Action::Crash(_)
            | Action::Restart(_)
            | Action::Isolate(_)
            | Action::Reconnect(_)
            | Action::CutRs(_)
            | Action::HealRs(_)
            | Action::Pause(_) => self.fault(s, a),
        }
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.meta.epoch <= self.cfg.max_counter
            && s.meta.fcid <= self.cfg.max_counter
            && s.rs.fcid <= self.cfg.max_counter
            && s.rs.epoch <= self.cfg.max_counter + 1
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut all: Vec<Property<Self>> = vec![
            Property::<Self>::always(P_ONE_SERVER, |m, s| count(s.servers(m.bugs())) <= 1),
            Property::<Self>::always(P_ACKED_ON_SERVER, |m, s| {
                members(s.servers(m.bugs())).all(|n| s.acked & !s.nodes[n].data == 0)
            }),
            Property::<Self>::always(P_LIVE_AGREE, |m, s| {
                // The live replicas the metadata gives the serving primary (a node
                // serving beyond the metadata has every other copy dead once adopted).
                let p = s.meta.primary as usize;
                members(s.servers(m.bugs()) & bit(p)).all(|n| {
                    s.effective(n).epoch != s.meta.epoch
                        || s.effective(n).fcid > s.meta.fcid
                        || (0..N).all(|r| {
                            r == n
                                || s.meta.st[r] != Copy::Live
                                || s.nodes[r].data & !s.nodes[n].data == 0
                        })
                })
            }),
            Property::<Self>::always(P_NO_STALE_PROMOTED, |_, s| !s.stale_promoted),
            Property::<Self>::sometimes(S_FAILOVER, |_, s| s.meta.epoch > 1),
            Property::<Self>::sometimes(S_ACK_AFTER_FAILOVER, |_, s| s.acked_after_failover),
            Property::<Self>::sometimes(S_JEOPARDY_CLAIM, |_, s| {
                s.rs.jeopardy && s.rs.fcid > s.meta.fcid
            }),
            Property::<Self>::sometimes(S_TAKE_OVER, |_, s| s.took_over),
            Property::<Self>::sometimes(S_ADOPTED, |_, s| s.adopted),
            Property::<Self>::sometimes(S_HEALED_ONE_SERVER, |m, s| {
                s.healed() && s.meta.epoch > 1 && count(s.servers(m.bugs())) == 1
            }),
        ];
        if self.cfg.survivor {
            all.push(Property::<Self>::sometimes(S_SURVIVOR_ACKS, |_, s| {
                s.survivor_acked
            }));
        }
        if let Some(o) = &self.only {
            all.retain(|p| p.name.starts_with(o.as_str()));
        }
        all
    }
}

pub const P_ONE_SERVER: &str = "1. at most one node serves (acknowledges writes)";
pub const P_ACKED_ON_SERVER: &str = "2. a serving node has every acknowledged write";
pub const P_LIVE_AGREE: &str =
    "2b. no live copy holds a write the serving node lacks (reads never go back)";
pub const P_NO_STALE_PROMOTED: &str = "3. no copy lacking an acknowledged write is made primary";
pub const S_FAILOVER: &str = "sometimes: a failover happens";
pub const S_ACK_AFTER_FAILOVER: &str = "sometimes: a write is acknowledged after a failover";
pub const S_JEOPARDY_CLAIM: &str = "sometimes: the RS is ahead of the metadata in jeopardy";
pub const S_TAKE_OVER: &str = "sometimes: a base copy takes over from the RS log";
pub const S_ADOPTED: &str = "sometimes: the metadata adopts the RS's state";
pub const S_HEALED_ONE_SERVER: &str =
    "sometimes: after a failover, faults healed, exactly one primary serves";

pub const S_SURVIVOR_ACKS: &str = "sometimes: a surviving replica serves and acknowledges a write";

/// The safety properties (`always`).
pub const SAFETY: [&str; 4] = [
    P_ONE_SERVER,
    P_ACKED_ON_SERVER,
    P_LIVE_AGREE,
    P_NO_STALE_PROMOTED,
];

// ------------------------------------------------------------------ running it

/// The configurations the tests and scripts/model.sh check: `normal`, `protected`
/// and `rs` for the fixed protocol; `small` and `small-protected` (fewer writes and
/// faults) reach the deeper counterexamples sooner.
pub fn configs() -> Vec<(&'static str, Config)> {
    vec![
        (
            "normal",
            Config {
                writes: 2,
                crashes: 1,
                isolations: 1,
                rs_cuts: 0,
                drops: 1,
                protected: false,
                ..Config::default()
            },
        ),
        (
            "protected",
            Config {
                writes: 2,
                crashes: 1,
                isolations: 1,
                rs_cuts: 0,
                drops: 0,
                protected: true,
                ..Config::default()
            },
        ),
        (
            "small",
            Config {
                writes: 1,
                crashes: 1,
                isolations: 1,
                rs_cuts: 0,
                drops: 0,
                protected: false,
                ..Config::default()
            },
        ),
        (
            "small-protected",
            Config {
                writes: 1,
                crashes: 0,
                isolations: 1,
                rs_cuts: 0,
                drops: 0,
                protected: true,
                ..Config::default()
            },
        ),
        (
            "rs",
            Config {
                writes: 1,
                crashes: 1,
                isolations: 1,
                rs_cuts: 1,
                drops: 0,
                protected: false,
                ..Config::default()
            },
        ),
        (
            "survivor",
            Config {
                writes: 1,
                crashes: 0,
                isolations: 1,
                rs_cuts: 2,
                drops: 0,
                pauses: 0,
                protected: false,
                survivor: true,
                ..Config::default()
            },
        ),
        (
            "survivor-crash",
            Config {
                writes: 1,
                crashes: 2,
                isolations: 0,
                rs_cuts: 0,
                drops: 1,
                pauses: 0,
                protected: false,
                survivor: true,
                ..Config::default()
            },
        ),
    ]
}

/// How far to check.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub depth: usize,
    /// Stop at the first counterexample (bug hunts).
    pub first: bool,
    pub threads: usize,
    pub timeout: Option<std::time::Duration>,
}

pub struct Report {
    pub states: usize,
    pub unique: usize,
    pub depth: usize,
    pub elapsed: std::time::Duration,
    /// Safety properties checked.
    pub checked: Vec<&'static str>,
    /// Safety properties with a counterexample: (name, trace).
    pub violations: Vec<(&'static str, String)>,
    /// `sometimes` properties with an example: (name, trace length).
    pub examples: Vec<(&'static str, usize)>,
    /// `sometimes` properties never reached (vacuity).
    pub unreached: Vec<&'static str>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "states {} (unique {}), depth {}, {:.1} s",
            self.states,
            self.unique,
            self.depth,
            self.elapsed.as_secs_f64()
        )?;
        for p in &self.checked {
            match self.violations.iter().find(|v| v.0 == *p) {
                None => writeln!(f, "  holds: {p}")?,
                Some((_, t)) => writeln!(f, "  VIOLATED: {p}\n{t}")?,
            }
        }
        for (p, len) in &self.examples {
            writeln!(f, "  reached (an example of {len} steps): {p}")?;
        }
        for p in &self.unreached {
            writeln!(f, "  NOT REACHED: {p}")?;
        }
        Ok(())
    }
}

/// One line per step of a trace: the action, then what it left.
pub fn format_trace(m: &Lazarus, path: &stateright::Path<State, Action>) -> String {
    let mut out = String::new();
    let steps = path.clone().into_vec();
    // Each step is (state, the action taken from it); the last has none.
    for (i, (_, a)) in steps.iter().enumerate() {
        let Some(a) = a else { continue };
        let next = &steps[i + 1].0;
        out.push_str(&format!(
            "    {:>2}. {:<24} {}\n",
            i + 1,
            format!("{a:?}"),
            summary(m, next)
        ));
    }
    out
}

/// A one-line picture of a state.
pub fn summary(m: &Lazarus, s: &State) -> String {
    let mut parts = vec![format!("meta {:?}", s.meta)];
    let rs = s.rs;
    parts.push(format!(
        "RS fcid {} holder {} e{}{}{} log {}",
        rs.fcid,
        rs.holder.map_or("-".into(), |h| format!("n{}", h + 1)),
        rs.epoch,
        if rs.jeopardy { " JEOPARDY" } else { "" },
        if rs.jeopardy {
            format!(" base {}", nodes(rs.base))
        } else {
            String::new()
        },
        writes(rs.log)
    ));
    if m.cfg.survivor {
        parts.push(format!(
            "out {} rs-silent {}",
            nodes(s.out),
            nodes(s.rs_quiet)
        ));
    }
    let ns: Vec<String> = (0..N)
        .map(|i| {
            let n = &s.nodes[i];
            let mut t = format!("n{}", i + 1);
            if !n.up {
                t.push_str(" DOWN");
            }
            if has(s.cut, i) {
                t.push_str(" CUT");
            }
            if has(s.rs_cut, i) {
                t.push_str(" no-RS");
            }
            t.push_str(&format!(" {}", writes(n.data)));
            if n.view != s.meta {
                t.push_str(&format!(" view {:?}", n.view));
            }
            if let Some(e) = n.lease {
                t.push_str(&format!(" lease e{e}"));
            }
            if let Some(h) = n.hold {
                t.push_str(&format!(
                    " hold f{} e{}{}",
                    h.fcid,
                    h.epoch,
                    if h.valid { "" } else { " (expired)" }
                ));
            }
            if m.cfg.survivor {
                if !n.contact_peers && !n.contact_rs {
                    t.push_str(" no-contact");
                } else if !n.contact_rs {
                    t.push_str(" contact(peers)");
                } else if !n.contact_peers && n.view.primary as usize == i {
                    t.push_str(" contact(RS)");
                }
                if n.quiet {
                    t.push_str(" quiet");
                }
                if n.restoring {
                    t.push_str(" restoring");
                }
            }
            if s.serving(i, &m.cfg.bugs) {
                t.push_str(" SERVING");
            }
            t
        })
        .collect();
    parts.push(ns.join("; "));
    parts.push(format!("acked {}", writes(s.acked)));
    if let Some(w) = s.write {
        parts.push(format!(
            "write w{} from n{} pending {} failed {}",
            w.id,
            w.from + 1,
            nodes(w.pending),
            nodes(w.failed)
        ));
    }
    parts.join(" | ")
}

/// Checks every property of `cfg` by breadth-first search to `run.depth`.
pub fn check(cfg: Config, run: Run) -> Report {
    check_only(cfg, run, None)
}

/// As `check`, with only the properties whose names start with `only` (if given).
pub fn check_only(cfg: Config, run: Run, only: Option<&str>) -> Report {
    use stateright::Checker;
    let model = Lazarus {
        cfg,
        only: only.map(str::to_string),
    };
    let props = model.properties();
    let t0 = std::time::Instant::now();
    let mut b = Lazarus {
        cfg,
        only: only.map(str::to_string),
    }
    .checker()
    .threads(run.threads.max(1))
    .target_max_depth(run.depth);
    if let Some(t) = run.timeout {
        b = b.timeout(t);
    }
    if run.first {
        b = b.finish_when(stateright::HasDiscoveries::AnyFailures);
    }
    let c = b.spawn_bfs().join();
    let elapsed = t0.elapsed();
    let mut violations = Vec::new();
    let mut examples = Vec::new();
    let mut unreached = Vec::new();
    for p in &props {
        let d = c.discovery(p.name);
        match (p.expectation.discovery_is_failure(), d) {
            (true, Some(path)) => violations.push((p.name, format_trace(&model, &path))),
            (false, Some(path)) => examples.push((p.name, path.into_actions().len())),
            (false, None) => unreached.push(p.name),
            (true, None) => {}
        }
    }
    Report {
        states: c.state_count(),
        unique: c.unique_state_count(),
        depth: c.max_depth(),
        elapsed,
        checked: props
            .iter()
            .filter(|p| p.expectation.discovery_is_failure())
            .map(|p| p.name)
            .collect(),
        violations,
        examples,
        unreached,
    }
}

// ------------------------------------------------------- property 4: healing

/// What `check_healing` found.
pub struct HealReport {
    /// Reachable states (to the depth) explored.
    pub states: usize,
    /// Of which with every fault healed.
    pub healed: usize,
    /// The most recovery steps any healed state needed.
    pub max_steps: usize,
    pub elapsed: std::time::Duration,
    /// A healed state from which no state with exactly one serving primary is
    /// reachable within the bound: the trace to it.
    pub stuck: Option<String>,
}

impl fmt::Display for HealReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "states {}, healed {}, recovery needs at most {} steps, {:.1} s",
            self.states,
            self.healed,
            self.max_steps,
            self.elapsed.as_secs_f64()
        )?;
        match &self.stuck {
            None => writeln!(
                f,
                "  holds: 4. once faults heal, exactly one primary serves"
            ),
            Some(t) => writeln!(
                f,
                "  VIOLATED: 4. once faults heal, exactly one primary serves\n{t}"
            ),
        }
    }
}

/// Property 4, "once faults heal, exactly one primary serves": from every state
/// reachable within `depth` steps in which every node is up and connected and the RS
/// reachable, a state in which exactly one node serves is reachable within `bound`
/// steps that are not faults (no crash, pause, cut, dropped update) and start no new
/// write; leases and holds still run out only when they cannot be renewed.
pub fn check_healing(cfg: Config, depth: usize, bound: usize) -> HealReport {
    use std::collections::hash_map::DefaultHasher;
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::hash::{Hash, Hasher};
    let t0 = std::time::Instant::now();
    let m = Lazarus::new(cfg);
    let fp = |s: &State| {
        let mut h = DefaultHasher::new();
        s.hash(&mut h);
        h.finish()
    };
    // Every reachable state, with its parent for traces.
    let mut states: Vec<(State, u32, Option<Action>)> = Vec::new();
    let mut index: HashMap<u64, u32> = HashMap::new();
    let init = m.initial();
    index.insert(fp(&init), 0);
    states.push((init, 0, None));
    let mut frontier = vec![0u32];
    let mut actions = Vec::new();
    for _ in 1..depth {
        let mut next = Vec::new();
        for &i in &frontier {
            let s = states[i as usize].0.clone();
            actions.clear();
            m.actions(&s, &mut actions);
            for a in actions.drain(..) {
                let Some(t) = m.next_state(&s, a) else {
                    continue;
                };
                if !m.within_boundary(&t) {
                    continue;
                }
                let f = fp(&t);
                if index.contains_key(&f) {
                    continue;
                }
                let id = states.len() as u32;
                index.insert(f, id);
                states.push((t, i, Some(a)));
                next.push(id);
            }
        }
        frontier = next;
    }
    let bugs = cfg.bugs;
    let one = |s: &State| count(s.servers(&bugs)) == 1;
    let progress = |a: &Action| !a.is_fault() && !matches!(a, Action::WriteStart(_));
    // States known to reach exactly one server under progress steps.
    let mut good: HashSet<u64> = HashSet::new();
    let mut healed = 0;
    let mut max_steps = 0;
    let mut stuck = None;
    for i in 0..states.len() {
        let s = &states[i].0;
        if !s.healed() {
            continue;
        }
        healed += 1;
        let f0 = fp(s);
        if good.contains(&f0) || one(s) {
            good.insert(f0);
            continue;
        }
        // Breadth-first over progress steps, remembering parents to mark the path.
        let mut seen: HashMap<u64, (u64, usize)> = HashMap::new();
        seen.insert(f0, (f0, 0));
        let mut queue = VecDeque::from([(s.clone(), f0, 0usize)]);
        let mut found = None;
        while let Some((t, ft, d)) = queue.pop_front() {
            if one(&t) || good.contains(&ft) {
                found = Some((ft, d));
                break;
            }
            if d == bound {
                continue;
            }
            let mut acts = Vec::new();
            m.actions(&t, &mut acts);
            for a in acts.into_iter().filter(progress) {
                let Some(u) = m.next_state(&t, a) else {
                    continue;
                };
                let fu = fp(&u);
                if let std::collections::hash_map::Entry::Vacant(e) = seen.entry(fu) {
                    e.insert((ft, d + 1));
                    queue.push_back((u, fu, d + 1));
                }
            }
        }
        match found {
            Some((mut f, d)) => {
                max_steps = max_steps.max(d);
                loop {
                    good.insert(f);
                    let (p, _) = seen[&f];
                    if p == f {
                        break;
                    }
                    f = p;
                }
            }
            None => {
                let mut path = Vec::new();
                let mut j = i as u32;
                while let (_, p, Some(a)) = &states[j as usize] {
                    path.push((*a, j));
                    j = *p;
                }
                path.reverse();
                let mut t = String::new();
                for (k, (a, j)) in path.iter().enumerate() {
                    t.push_str(&format!(
                        "    {:>2}. {:<24} {}\n",
                        k + 1,
                        format!("{a:?}"),
                        summary(&m, &states[*j as usize].0)
                    ));
                }
                stuck = Some(t);
                break;
            }
        }
    }
    HealReport {
        states: states.len(),
        healed,
        max_steps,
        elapsed: t0.elapsed(),
        stuck,
    }
}
