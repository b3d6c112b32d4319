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

use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{ReplicaState, VolumeInfo};
use lazarus_recovery::log::VolumeCoord;
use lazarus_recovery::server::{CONTACT_WINDOW, SURVIVOR_SILENCE};
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
pub fn jeopardy_step(v: &VolumeInfo, domains: &[NodeId], flaky: &[NodeId]) -> JeopardyStep {
    let endangered = domains.len() <= 1 || v.protected;
    if !v.recovery_flag && endangered {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
