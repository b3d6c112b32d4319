//! Last failure domain protection (DESIGN.md, "Last failure domain").
//!
//! The rule every write obeys: a write is acknowledged only once it is on two failure
//! domains, i.e. on a live replica as well as the primary, or on the recovery server.
//! While a volume is in jeopardy (its recovery flag is on, or it is down to one live
//! copy) the primary makes each write durable on the recovery server *before* writing
//! it locally; a write that finds every live replica gone on the way (the write during
//! which the volume fell to its last failure domain) enters jeopardy and goes to the
//! recovery server before it is acknowledged.
//!
//! The recovery server is also the coordination point when Raft has lost its majority:
//! it changes a volume's failure count ID (and who holds the volume) only by
//! compare-and-set. A primary without a majority claims the volume there and serves on
//! under a *hold* (a lease from the recovery server, renewed every 100 ms); the
//! majority fences its own promotions through the same compare-and-set; a base copy
//! (current when the log began) takes over when the holder has died, from its stale
//! copy plus the log. The Raft leader adopts whatever the recovery server decided while
//! it had no majority.

use crate::cluster::{Cluster, Update};
use crate::config::{JeopardyPolicy, NodeConfig};
use crate::decide::{adoption, jeopardy_step, Adoption, JeopardyStep};
use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{MetaCommand, MetaResponse, ReplicaState, VolumeInfo};
use lazarus_recovery::log::RecordKind;
use lazarus_recovery::server::{
    AppendReply, AppendReq, ClaimReply, ClaimReq, ClearReq, ReadReply, ReadReq, RenewReq,
    VolumeState, HOLDER_SILENCE_MAX, HOLD_LEASE, KIND_RS_APPEND, KIND_RS_CLAIM, KIND_RS_CLEAR,
    KIND_RS_READ, KIND_RS_RENEW, KIND_RS_STATE,
};
use lazarus_rpc::{self as rpc, Refusal, RpcClient, RpcError};
use lazarus_types::BLOCK_SIZE;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const RS_TIMEOUT: Duration = Duration::from_secs(5);
const RENEW_INTERVAL: Duration = Duration::from_millis(100);
const WATCH_INTERVAL: Duration = Duration::from_millis(300);
/// How long a primary's Raft lease must have been gone before it claims the volume at
/// the recovery server (a leader election takes less; a lost majority, forever).
const NO_MAJORITY_GRACE: Duration = Duration::from_millis(1500);
/// How long the recovery server must be ahead of the metadata before the leader adopts
/// its state (a claim made with a majority is committed through Raft within this).
const ADOPT_AFTER: Duration = Duration::from_secs(2);
/// How long a proposal made on the write path may wait for Raft.
const PROPOSE_ON_WRITE_PATH: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 8 << 20;
/// How often a read of the recovery log starts again because the log was compacted
/// under it (each compaction halves the log at least, so a few are plenty).
const READ_RESTARTS: u32 = 8;
/// Unflushed replicated writes kept per volume before the primary forces a flush.
const UNFLUSHED_MAX_BYTES: usize = 128 << 20;

/// Per volume, the primary's record of replicated writes since the last flush that
/// every live replica completed. A replica's copy is durable only up to its last
/// flush: when the volume enters jeopardy these go to the recovery server first, so a
/// base copy (durable as of that flush) plus the log is the whole volume.
#[derive(Default)]
pub struct Unflushed {
    /// The tenure (`VolumeInfo::primary_since`) of this node as the volume's primary
    /// the entries were noted in. Entries of an earlier tenure are stale once this
    /// node is primary again: another primary may have written their blocks since
    /// (simulator seed 14193: a jeopardy drain put a block's old version on the
    /// recovery server, and a restore from it brought it back over a newer, flushed
    /// one). An epoch alone does not tell: an adoption moves it on under the same
    /// primary, whose entries still have to be drained.
    tenure: u64,
    next_seq: u64,
    entries: std::collections::VecDeque<(u64, Update, Kept)>,
    bytes: usize,
    /// Drained into the recovery server: writes from now on go there themselves.
    drained: bool,
    /// Every drained write is on the recovery server. Until then a new write must not
    /// be logged: a record after it for the same block would be restored over it.
    logged: bool,
}

/// A replicated write's data, kept until a flush covers it: a range of the body its
/// replicas were sent, shared with it rather than copied (`Kept::copy` otherwise).
#[derive(Clone, Debug)]
pub struct Kept {
    buf: Arc<Vec<u8>>,
    at: std::ops::Range<usize>,
}

impl Kept {
    pub fn copy(raw: &[u8]) -> Self {
        Kept {
            at: 0..raw.len(),
            buf: Arc::new(raw.to_vec()),
        }
    }

    /// `buf[at]`; `None` if `at` is not within `buf`.
    pub fn within(buf: Arc<Vec<u8>>, at: std::ops::Range<usize>) -> Option<Self> {
        (at.start <= at.end && at.end <= buf.len()).then_some(Kept { buf, at })
    }
}

impl std::ops::Deref for Kept {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.at.clone()]
    }
}

impl Unflushed {
    /// Drops the entries of an earlier tenure of this node as the primary, once it is
    /// the primary in a new one (`tenure`: `None` while the metadata names another
    /// primary): what they wrote may have been overwritten by another primary since,
    /// and made durable there.
    fn forget_other_tenures(&mut self, tenure: Option<u64>) {
        if let Some(t) = tenure.filter(|t| *t != self.tenure) {
            self.clear();
            self.tenure = t;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// A lease on a volume granted by the recovery server.
#[derive(Debug, Clone)]
pub struct Hold {
    pub fcid: u64,
    pub epoch: u64,
    pub until: Instant,
    /// Restoring from the log: claimed, not serving yet.
    pub restoring: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreProgress {
    pub state: String,
    pub records: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

pub struct Recovery {
    pub addr: String,
    pub(crate) client: RpcClient,
    /// The policy this node was started with; the one in force is the cluster's
    /// (`Cluster::policy`).
    pub configured_policy: JeopardyPolicy,
    pub(crate) suspend: Duration,
    failures_max: usize,
    failure_window: Duration,
    pub(crate) holds: parking_lot::Mutex<HashMap<String, Hold>>,
    /// Fault injection (`lazarus fault isolate --recovery-server`): every call to the
    /// recovery server fails while set, as if the link were cut.
    pub cut: Arc<std::sync::atomic::AtomicBool>,
    /// The recovery server's state as last polled, and when.
    polled: parking_lot::Mutex<(Option<Instant>, HashMap<String, VolumeState>)>,
    /// Per volume: writes acknowledged without the recovery server (`accept` policy).
    /// Per volume: blocks acknowledged without the recovery server (policy `accept`),
    /// re-logged from the local copy once it answers again.
    lag: parking_lot::Mutex<HashMap<String, std::collections::BTreeSet<u64>>>,
    /// Serializes claims (rare), so concurrent writes falling into jeopardy claim once.
    pub(crate) claiming: tokio::sync::Mutex<()>,
    /// Per volume: since when the recovery server has been ahead of the metadata.
    ahead: parking_lot::Mutex<HashMap<String, Instant>>,
    pub restores: parking_lot::Mutex<BTreeMap<String, RestoreProgress>>,
    unflushed: parking_lot::Mutex<HashMap<String, Unflushed>>,
    /// Claims granted to this node, on its disk (claims.rs).
    pub(crate) claims: crate::claims::HeldClaims,
}

impl Recovery {
    pub fn new(
        cfg: &NodeConfig,
        tls: Option<Arc<lazarus_rpc::Credentials>>,
    ) -> Option<Arc<Recovery>> {
        let addr = cfg.recovery_server.clone()?;
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        Some(Arc::new(Recovery {
            client: RpcClient::with_block(&addr, cut.clone()).with_credentials(tls),
            cut,
            addr,
            configured_policy: cfg.jeopardy_policy,
            suspend: Duration::from_secs(cfg.jeopardy_suspend_secs),
            failures_max: cfg.failures_max,
            failure_window: Duration::from_secs(cfg.failure_window_minutes * 60),
            holds: Default::default(),
            polled: Default::default(),
            lag: Default::default(),
            claiming: Default::default(),
            ahead: Default::default(),
            restores: Default::default(),
            claims: crate::claims::HeldClaims::load(&cfg.data_dir),
            unflushed: Default::default(),
        }))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        kind: u8,
        body: &[u8],
    ) -> Result<T, RpcError> {
        let b = self.client.call(kind, body, RS_TIMEOUT).await?;
        serde_json::from_slice(&b)
            .map_err(|e| RpcError::BadReply(format!("bad recovery-server reply: {e}")))
    }

    pub async fn claim(&self, req: &ClaimReq) -> Result<ClaimReply, RpcError> {
        let body = serde_json::to_vec(req).map_err(|e| RpcError::BadReply(e.to_string()))?;
        self.call(KIND_RS_CLAIM, &body).await
    }

    /// The recovery server's state for `volume`, asked now (and cached).
    pub async fn fresh_state(&self, volume: &str) -> Option<VolumeState> {
        self.states_now().await?.get(volume).cloned()
    }

    /// Every volume's state at the recovery server, asked now (and cached); `None`
    /// when it does not answer.
    pub async fn states_now(&self) -> Option<HashMap<String, VolumeState>> {
        let s = self
            .call::<HashMap<String, VolumeState>>(KIND_RS_STATE, b"{}")
            .await
            .ok()?;
        *self.polled.lock() = (Some(Instant::now()), s.clone());
        Some(s)
    }

    pub fn state(&self, volume: &str) -> Option<VolumeState> {
        self.polled.lock().1.get(volume).cloned()
    }

    pub fn reachable(&self) -> bool {
        self.polled
            .lock()
            .0
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
    }

    pub fn hold(&self, volume: &str) -> Option<Hold> {
        self.holds.lock().get(volume).cloned()
    }

    pub fn lag(&self, volume: &str) -> u64 {
        self.lag.lock().get(volume).map_or(0, |s| s.len() as u64)
    }
}

fn unix_ms() -> u64 {
    lazarus_io::rt::unix_ms()
}

/// Why a volume could not be put in jeopardy; the write path acts on the kind.
#[derive(Debug, thiserror::Error)]
pub enum JeopardyError {
    /// The recovery server did not answer: the jeopardy policy decides what a write
    /// does (`suspend` waits, `accept` goes on without it).
    #[error("the recovery server does not answer: {0}")]
    Unreachable(RpcError),
    /// It answered no: the claim lost its compare-and-set, or this node's hold on the
    /// volume is fenced. The write fails at once, whatever the policy.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl From<RpcError> for JeopardyError {
    fn from(e: RpcError) -> JeopardyError {
        if e.is_unreachable() {
            JeopardyError::Unreachable(e)
        } else if matches!(e.code(), Some(Refusal::Fenced | Refusal::Refused)) {
            JeopardyError::Refused(e.to_string())
        } else {
            JeopardyError::Failed(e.to_string())
        }
    }
}

impl From<String> for JeopardyError {
    fn from(m: String) -> JeopardyError {
        JeopardyError::Failed(m)
    }
}

impl From<&str> for JeopardyError {
    fn from(m: &str) -> JeopardyError {
        JeopardyError::Failed(m.to_string())
    }
}

impl From<JeopardyError> for String {
    fn from(e: JeopardyError) -> String {
        e.to_string()
    }
}

/// What `note_replicated` decided.
pub enum Noted {
    /// Kept until the next flush.
    Kept,
    /// Kept, and the volume has more unflushed writes than it may: flush now.
    FlushDue,
    /// The volume is in jeopardy: the write must go to the recovery server itself.
    LogIt,
}

impl Recovery {
    /// Forgets the writes noted for `volume` unless they are of tenure `keep`, this
    /// node's as the primary now (`Cluster::claim_and_hold`).
    fn forget_unflushed(&self, volume: &str, keep: Option<u64>) {
        if let Some(j) = self.unflushed.lock().get_mut(volume) {
            if keep != Some(j.tenure) {
                j.clear();
            }
        }
    }

    /// On the primary, after a write reached its live replicas.
    /// `tenure`: this node's tenure as the volume's primary (`Cluster::tenure`).
    pub fn note_replicated(
        &self,
        volume: &str,
        tenure: Option<u64>,
        in_jeopardy: bool,
        u: &Update,
        raw: Kept,
    ) -> Noted {
        let mut m = self.unflushed.lock();
        if !m.contains_key(volume) {
            m.insert(volume.to_string(), Unflushed::default());
        }
        let j = m.get_mut(volume).expect("inserted");
        if j.drained {
            if in_jeopardy {
                return Noted::LogIt;
            }
            j.drained = false;
            j.logged = false;
        }
        j.forget_other_tenures(tenure);
        j.next_seq += 1;
        j.bytes += raw.len() + 64;
        j.entries.push_back((j.next_seq, u.clone(), raw));
        if j.bytes > UNFLUSHED_MAX_BYTES {
            Noted::FlushDue
        } else {
            Noted::Kept
        }
    }

    /// The sequence a flush sent now covers.
    pub fn flush_mark(&self, volume: &str) -> u64 {
        self.unflushed.lock().get(volume).map_or(0, |j| j.next_seq)
    }

    /// A flush that every live replica completed: what it covers is durable there.
    pub fn flushed(&self, volume: &str, mark: u64) {
        if let Some(j) = self.unflushed.lock().get_mut(volume) {
            while j.entries.front().is_some_and(|e| e.0 <= mark) {
                let (_, _, raw) = j.entries.pop_front().expect("front");
                j.bytes -= raw.len() + 64;
            }
        }
    }

    /// The unflushed writes to put on the recovery server, once (`None` once they are
    /// there): from now on writes are logged themselves. They stay here until
    /// `drain_logged`, so a drain cut short (an error, or its caller gone) is made
    /// again, whole and in order, by the next.
    fn drain(&self, volume: &str, tenure: Option<u64>) -> Option<Vec<(u64, Update, Kept)>> {
        let mut m = self.unflushed.lock();
        let j = m.entry(volume.to_string()).or_default();
        j.forget_other_tenures(tenure);
        if j.drained && j.logged {
            return None;
        }
        j.drained = true;
        j.logged = false;
        Some(j.entries.iter().cloned().collect())
    }

    /// Every unflushed write is on the recovery server: writes are logged themselves.
    fn drain_done(&self, volume: &str) -> bool {
        self.unflushed
            .lock()
            .get(volume)
            .is_some_and(|j| j.drained && j.logged)
    }

    /// What `drain` took, up to `seq`, is on the recovery server.
    fn drain_logged(&self, volume: &str, seq: u64) {
        if let Some(j) = self.unflushed.lock().get_mut(volume) {
            while j.entries.front().is_some_and(|e| e.0 <= seq) {
                let (_, _, raw) = j.entries.pop_front().expect("front");
                j.bytes -= raw.len() + 64;
            }
            j.logged = j.drained;
        }
    }

    /// A drain failed: its writes are kept, as are those noted from now on, for the
    /// next drain.
    fn undrain(&self, volume: &str) {
        if let Some(j) = self.unflushed.lock().get_mut(volume) {
            j.drained = false;
            j.logged = false;
        }
    }
}

/// Records a drain keeps in flight to the recovery server at once.
const DRAIN_IN_FLIGHT: usize = 64;

/// The blocks `[first, end)` an update writes (`None`: a flush, which writes none).
fn blocks_of(u: &Update, raw: &[u8]) -> Option<(u64, u64)> {
    match u {
        Update::Write { lba, .. } => Some((*lba, lba + (raw.len() / BLOCK_SIZE) as u64)),
        Update::Zero { lba, count, .. } => Some((*lba, lba.saturating_add(*count))),
        Update::Flush => None,
    }
}

/// `pending` cut into consecutive waves of at most `DRAIN_IN_FLIGHT` records, no two
/// of a wave writing the same block.
fn drain_waves(pending: &[(u64, Update, Kept)]) -> Vec<std::ops::Range<usize>> {
    let mut waves = Vec::new();
    let mut start = 0;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, (_, u, raw)) in pending.iter().enumerate() {
        let r = blocks_of(u, raw);
        let clash = r.is_some_and(|(a, b)| ranges.iter().any(|&(x, y)| a < y && x < b));
        if clash || i - start == DRAIN_IN_FLIGHT {
            waves.push(start..i);
            start = i;
            ranges.clear();
        }
        ranges.extend(r);
    }
    if start < pending.len() {
        waves.push(start..pending.len());
    }
    waves
}

impl Cluster {
    /// In jeopardy, on the primary: puts the writes its replicas may not have made
    /// durable yet on the recovery server, before any later write (callers hold the
    /// claiming lock).
    async fn drain_unflushed(&self, v: &VolumeInfo) -> Result<(), JeopardyError> {
        let r = self.recovery.as_ref().ok_or("no recovery server")?;
        let Some(pending) = r.drain(&v.name, self.tenure(&v.name)) else {
            return Ok(());
        };
        let n = pending.len();
        let last = pending.last().map_or(0, |e| e.0);
        let t0 = Instant::now();
        // Many records in flight at once (their syncs shared by the server's group
        // commit), in waves of records that share no block: the order within a wave
        // cannot change what a restore reads, and a record overlapping one of its
        // wave waits for the next, so writes of the same block land in their order.
        for wave in drain_waves(&pending) {
            let wave = &pending[wave];
            let results = futures::future::join_all(
                wave.iter().map(|(_, u, raw)| self.log_update(v, u, raw)),
            )
            .await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                // Not all on the recovery server: the next write tries again, from the
                // first (records logged twice in the same order restore the same).
                r.undrain(&v.name);
                return Err(e);
            }
        }
        r.drain_logged(&v.name, last);
        if n > 0 {
            tracing::info!(volume = %v.name, writes = n, elapsed_ms = t0.elapsed().as_millis() as u64, "jeopardy: writes not yet flushed on the replicas put on the recovery server");
        }
        Ok(())
    }

    /// Makes sure the primary's unflushed writes are on the recovery server once the
    /// volume is in jeopardy (entered here, or by the leader).
    pub async fn ensure_drained(&self, v: &VolumeInfo) -> Result<(), JeopardyError> {
        let Some(r) = self.recovery.as_ref() else {
            return Ok(());
        };
        // Drained and logged: done. Drained only: a drain is under way (under the
        // claiming lock), and this write waits for it: logged before the drain's older
        // records, it would be restored under them.
        if r.drain_done(&v.name) {
            return Ok(());
        }
        let _g = r.claiming.lock().await;
        self.drain_unflushed(v).await
    }

    /// The volume as this node must act on it: the committed metadata, unless the
    /// recovery server granted this node a newer hold (the metadata had no majority to
    /// record it): then this node is its primary, in jeopardy, and no other copy takes
    /// updates.
    pub fn effective(&self, volume: &str) -> Option<VolumeInfo> {
        let meta = self.store.meta();
        let mut v = meta.volumes.get(volume)?.clone();
        if let Some(h) = self.hold_over(&v) {
            v.primary = self.id;
            v.epoch = h.epoch;
            v.recovery_flag = true;
            v.failure_count_id = h.fcid;
            for n in v.replicas.clone() {
                let s = if n == self.id {
                    ReplicaState::Live
                } else {
                    ReplicaState::Dead
                };
                v.states.insert(n, s);
            }
        }
        Some(v)
    }

    /// This node's hold of `v` at the recovery server, when it is newer than the
    /// metadata's view (`effective` then names this node primary at the hold's epoch).
    fn hold_over(&self, v: &VolumeInfo) -> Option<Hold> {
        self.recovery
            .as_ref()
            .and_then(|r| r.hold(&v.name))
            .filter(|h| h.fcid > v.failure_count_id)
    }

    /// This node's tenure as the primary of `volume`, as the metadata names it
    /// (`VolumeInfo::primary_since`; `None` when it names another node).
    pub fn tenure(&self, volume: &str) -> Option<u64> {
        let meta = self.store.meta();
        let v = meta.volumes.get(volume)?;
        (v.primary == self.id).then_some(v.primary_since)
    }

    /// `effective(volume)`'s primary and epoch, without copying the volume's record
    /// (the write path asks this on every request).
    pub fn effective_primary(&self, volume: &str) -> Option<(NodeId, u64)> {
        let meta = self.store.meta();
        let v = meta.volumes.get(volume)?;
        Some(match self.hold_over(v) {
            Some(h) => (self.id, h.epoch),
            None => (v.primary, v.epoch),
        })
    }

    /// Whether the recovery server (as last polled) knows a newer holder of the volume
    /// than its metadata's primary: until the leader adopts that, nobody acts on the
    /// metadata's view of the volume (no lease, no resync).
    pub fn rs_overrides(&self, v: &VolumeInfo) -> bool {
        self.recovery
            .as_ref()
            .and_then(|r| r.state(&v.name))
            .is_some_and(|s| {
                s.coord.uid == v.uid
                    && s.coord.fcid > v.failure_count_id
                    && s.coord.holder.is_some_and(|h| h != v.primary)
            })
    }

    /// A primary that lost its majority asks the recovery server to let it go on as
    /// the volume's last failure domain: compare-and-set of the failure count ID.
    pub(crate) async fn claim_last_domain(&self, v: &VolumeInfo) -> Result<u64, String> {
        let r = self.recovery.as_ref().ok_or("no recovery server")?;
        // A clone being made is never held at the recovery server: its copies are
        // filled outside the log, which could not be a base for them (decide.rs,
        // `jeopardy_step`). Without a majority its fill stops, and it is given up.
        if v.cloning.is_some() {
            return Err(format!(
                "volume {:?} is a clone still being made: not held at the recovery server",
                v.name
            ));
        }
        let _g = r.claiming.lock().await;
        let held = r.hold(&v.name);
        // Claimed meanwhile (by a concurrent write): once is enough.
        if let Some(h) = held.as_ref().filter(|h| {
            !h.restoring && Instant::now() < h.until && self.held_beyond_metadata(&v.name)
        }) {
            return Ok(h.fcid);
        }
        // The failure count ID and the epoch from the same source: the hold, if it is
        // newer than the metadata, else the metadata.
        let (expect, epoch) = match held.as_ref() {
            Some(h) if h.fcid >= v.failure_count_id => (h.fcid, h.epoch),
            _ => (v.failure_count_id, v.epoch),
        };
        let sent = Instant::now();
        let req = ClaimReq {
            base_index: None,
            takeover: false,
            survivor_of: None,
            volume: v.name.clone(),
            uid: v.uid,
            expect_fcid: expect,
            holder: self.id,
            epoch,
            jeopardy: true,
            config: serde_json::to_value(&*self.store.meta()).ok(),
            base: v.live(),
        };
        let reply = r.claim(&req).await?;
        let c = reply.coord;
        // Granted, or already ours (a hold this node lost track of).
        let ours = c.holder == Some(self.id) && c.jeopardy && c.epoch == epoch && c.fcid == expect;
        if !reply.granted && !ours {
            return Err(reply.reason);
        }
        self.persist_claim(&v.name, v.uid, c.fcid, epoch).await?;
        r.holds.lock().insert(
            v.name.clone(),
            Hold {
                fcid: c.fcid,
                epoch,
                until: sent + HOLD_LEASE,
                restoring: false,
            },
        );
        let jv = self.effective(&v.name).ok_or("volume unknown")?;
        self.drain_unflushed(&jv).await?;
        lazarus_observe::events::record("jeopardy", &v.name, format!("n{} holds the volume at the recovery server without a majority (failure count ID {})", self.id, c.fcid));
        Ok(c.fcid)
    }

    /// Whether this node holds `volume` at the recovery server beyond what the
    /// metadata records (claimed without a majority): its effective view then has no
    /// other live copy to reconcile.
    pub fn held_beyond_metadata(&self, volume: &str) -> bool {
        let Some(h) = self.recovery.as_ref().and_then(|r| r.hold(volume)) else {
            return false;
        };
        self.store
            .meta()
            .volumes
            .get(volume)
            .is_some_and(|v| h.fcid > v.failure_count_id)
    }

    /// Whether this node holds some volume at the recovery server beyond what the
    /// metadata records.
    pub fn holds_beyond_metadata_any(&self) -> bool {
        let Some(r) = self.recovery.as_ref() else {
            return false;
        };
        let names: Vec<String> = r.holds.lock().keys().cloned().collect();
        names.iter().any(|n| self.held_beyond_metadata(n))
    }

    /// Whether this node serves some volume under a hold from the recovery server (the
    /// coordination point when no majority is reachable): such a node serves it even
    /// before it could catch up with a leader, since there is none to catch up with.
    pub fn serves_on_hold(&self) -> bool {
        self.recovery.as_ref().is_some_and(|r| {
            let now = Instant::now();
            r.holds
                .lock()
                .values()
                .any(|h| !h.restoring && now < h.until)
        })
    }

    /// Whether only the recovery server's hold lets this node serve `volume`, not a
    /// Raft lease: in jeopardy (as this node's metadata view says) under policy
    /// `suspend`. The recovery server is then the volume's coordination point: a copy
    /// may take the volume over there once its holder is silent, and a Raft lease
    /// does not see that; the holder's renewals do (a renewal the recovery server
    /// answers `fenced` ends the hold). The leader grants no Raft lease for such a
    /// volume either (`serve_lease`), so a node whose view lags behind the flag
    /// stops serving on its last one within `LEASE`. Under `accept` the primary goes
    /// on without the recovery server by choice, and so on a Raft lease
    /// (docs/model.md, `jeopardy_serves_on_raft_lease`).
    pub fn hold_only(&self, volume: &str) -> bool {
        let meta = self.store.meta();
        self.recovery.is_some()
            && meta.volumes.get(volume).is_some_and(|v| v.recovery_flag)
            && meta.jeopardy_policy() == JeopardyPolicy::Suspend
    }

    /// The jeopardy policy in force: the cluster's, the same on every node
    /// (`ClusterMeta::jeopardy_policy`: `accept` only while every node registered it).
    pub fn policy(&self) -> JeopardyPolicy {
        self.store.meta().jeopardy_policy()
    }

    /// Whether the recovery server's hold lets this node serve `volume` at `epoch`.
    pub fn hold_valid(&self, volume: &str, epoch: u64) -> bool {
        self.recovery.as_ref().is_some_and(|r| {
            r.hold(volume)
                .is_some_and(|h| !h.restoring && h.epoch == epoch && Instant::now() < h.until)
        })
    }

    /// Puts one update on the recovery server (durable when this returns `Ok(true)`).
    /// `Ok(false)`: protection was cleared meanwhile, or (policy `accept`) the recovery
    /// server does not answer and the write goes on without it.
    pub async fn log_update(
        &self,
        v: &VolumeInfo,
        u: &Update,
        raw: &[u8],
    ) -> Result<bool, JeopardyError> {
        let Some(r) = self.recovery.as_ref() else {
            return Ok(false);
        };
        let (kind, lba, count) = match u {
            Update::Write { lba, .. } => (RecordKind::Write, *lba, (raw.len() / BLOCK_SIZE) as u64),
            Update::Zero {
                lba,
                count,
                provision,
                ..
            } => (
                if *provision {
                    RecordKind::ZeroProvision
                } else {
                    RecordKind::Zero
                },
                *lba,
                *count,
            ),
            Update::Flush => return Ok(true),
        };
        // A record holds at most DATA_MAX bytes, and a count fits in u32.
        let per = (lazarus_recovery::log::DATA_MAX / BLOCK_SIZE) as u64;
        let mut stored = true;
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(if kind == RecordKind::Write {
                per
            } else {
                u32::MAX as u64
            });
            let req = AppendReq {
                volume: v.name.clone(),
                uid: v.uid,
                fcid: v.failure_count_id,
                holder: self.id,
                epoch: v.epoch,
                kind,
                lba: lba + done,
                count: n as u32,
            };
            let json = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            let data = if kind == RecordKind::Write {
                &raw[(done as usize) * BLOCK_SIZE..((done + n) as usize) * BLOCK_SIZE]
            } else {
                &[][..]
            };
            let body = rpc::pack(&json, data);
            let deadline = Instant::now() + r.suspend;
            let reply: AppendReply = loop {
                match r.call::<AppendReply>(KIND_RS_APPEND, &body).await {
                    Ok(a) => break a,
                    Err(e) if e.is_fenced() => {
                        r.holds.lock().remove(&v.name);
                        return Err(JeopardyError::Refused(format!(
                            "the recovery server refused the write: {e}"
                        )));
                    }
                    Err(e) => match self.policy() {
                        JeopardyPolicy::Accept => {
                            r.lag
                                .lock()
                                .entry(v.name.clone())
                                .or_default()
                                .extend(lba + done..lba + done + n);
                            lazarus_observe::metrics::METRICS
                                .recovery_unlogged_writes
                                .inc();
                            tracing::error!(volume = %v.name, lba = lba + done, blocks = n, error = %e, "IN JEOPARDY WITHOUT THE RECOVERY SERVER: write acknowledged on one copy only (policy accept)");
                            stored = false;
                            break AppendReply {
                                stored: false,
                                seq: 0,
                            };
                        }
                        JeopardyPolicy::Suspend if Instant::now() < deadline => {
                            tracing::warn!(volume = %v.name, error = %e, "recovery server unreachable in jeopardy; write suspended (policy suspend)");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        JeopardyPolicy::Suspend => {
                            return Err(JeopardyError::Failed(format!(
                                "the recovery server did not answer for {:?} while {:?} is in jeopardy (policy suspend): {e}",
                                r.suspend, v.name
                            )));
                        }
                    },
                }
            };
            stored &= reply.stored;
            done += n;
        }
        Ok(stored)
    }

    /// Makes sure `volume` is in jeopardy with this node as its holder; returns the
    /// volume as it must be written from now on. `base`: copies current when the log
    /// begins.
    pub async fn enter_jeopardy(
        &self,
        volume: &str,
        base: Vec<NodeId>,
    ) -> Result<VolumeInfo, JeopardyError> {
        let r = self.recovery.as_ref().ok_or(
            "no recovery server is configured: the volume's last copy cannot be protected",
        )?;
        let _g = r.claiming.lock().await;
        let v = self.effective(volume).ok_or("volume unknown")?;
        // Nor a clone still being made (see `claim_last_domain`): nothing writes to
        // one; its fill does not flush it.
        if v.cloning.is_some() {
            return Err(JeopardyError::Refused(format!(
                "volume {volume:?} is a clone still being made: it enters jeopardy mode only once made"
            )));
        }
        // A primary deposed meanwhile claims nothing (it would hold the volume next to
        // the new primary).
        if v.primary != self.id {
            return Err(JeopardyError::Refused(format!(
                "n{} is no longer the primary of {volume:?}",
                self.id
            )));
        }
        if v.recovery_flag {
            self.drain_unflushed(&v).await?;
            return Ok(v);
        }
        let sent = Instant::now();
        let req = ClaimReq {
            base_index: None,
            takeover: false,
            survivor_of: None,
            volume: v.name.clone(),
            uid: v.uid,
            expect_fcid: v.failure_count_id,
            holder: self.id,
            epoch: v.epoch,
            jeopardy: true,
            config: serde_json::to_value(&*self.store.meta()).ok(),
            base,
        };
        let reply = r.claim(&req).await?;
        let c = reply.coord;
        let ours = c.jeopardy && c.holder == Some(self.id) && c.epoch == v.epoch;
        if !reply.granted && !ours {
            return Err(JeopardyError::Refused(format!(
                "the recovery server refused jeopardy for {volume:?}: {}",
                reply.reason
            )));
        }
        self.persist_claim(volume, v.uid, c.fcid, c.epoch).await?;
        r.holds.lock().insert(
            volume.to_string(),
            Hold {
                fcid: c.fcid,
                epoch: c.epoch,
                until: sent + HOLD_LEASE,
                restoring: false,
            },
        );
        let jv = self.effective(volume).ok_or("volume unknown")?;
        self.drain_unflushed(&jv).await?;
        lazarus_observe::events::record(
            "jeopardy",
            volume,
            format!("entered jeopardy, failure count ID {}", c.fcid),
        );
        tracing::warn!(volume, fcid = c.fcid, base = ?c.base, "volume in jeopardy: every write goes to the recovery server first");
        // This node held the volume at the recovery server from the claim on, its
        // writes going to its copy and the log alone (`effective`).
        let cmd = MetaCommand::SetRecovery {
            volume: volume.to_string(),
            on: true,
            fcid: c.fcid,
            alone: true,
        };
        match tokio::time::timeout(PROPOSE_ON_WRITE_PATH, self.propose(cmd)).await {
            Ok(Ok(MetaResponse::Volume(_))) => {}
            other => {
                tracing::warn!(volume, result = ?other.map(|r| r.map_err(|e| e.to_string())), "jeopardy not committed through Raft; holding the volume at the recovery server")
            }
        }
        self.effective(volume)
            .ok_or_else(|| "volume unknown".into())
    }

    /// `enter_jeopardy` on the write path, under the policy: while the recovery server
    /// does not answer, `suspend` retries until its deadline, `accept` goes on without
    /// it (`Ok(None)`, the write counted as lag). A refusal fails at once.
    pub async fn enter_jeopardy_patiently(
        &self,
        volume: &str,
        base: Vec<NodeId>,
        u: &Update,
        raw: &[u8],
    ) -> Result<Option<VolumeInfo>, String> {
        let r = self
            .recovery
            .as_ref()
            .ok_or("no recovery server is configured")?;
        let deadline = Instant::now() + r.suspend;
        loop {
            match self.enter_jeopardy(volume, base.clone()).await {
                Ok(v) => return Ok(Some(v)),
                Err(JeopardyError::Refused(e)) => return Err(e),
                Err(e) if self.policy() == JeopardyPolicy::Accept => {
                    let (lba, n) = match u {
                        Update::Write { lba, .. } => (*lba, (raw.len() / BLOCK_SIZE) as u64),
                        Update::Zero { lba, count, .. } => (*lba, *count),
                        Update::Flush => return Ok(None),
                    };
                    r.lag
                        .lock()
                        .entry(volume.to_string())
                        .or_default()
                        .extend(lba..lba + n);
                    lazarus_observe::metrics::METRICS
                        .recovery_unlogged_writes
                        .inc_by(n);
                    tracing::error!(volume, lba, blocks = n, error = %e, "LAST COPY WITHOUT THE RECOVERY SERVER: write acknowledged on one copy only (policy accept)");
                    return Ok(None);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(volume, error = %e, "last copy, recovery server unreachable: write suspended (policy suspend)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Keeps this node's holds alive, and takes holds for volumes the metadata says
    /// it holds in jeopardy.
    pub fn hold_loop(self: &Arc<Self>) {
        let Some(r) = self.recovery.clone() else {
            return;
        };
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_INTERVAL).await;
                let meta = c.store.meta();
                let mut want: HashMap<String, (u64, u64, bool)> = HashMap::new();
                for (name, h) in r.holds.lock().iter() {
                    want.insert(name.clone(), (h.fcid, h.epoch, h.restoring));
                }
                for v in meta.volumes.values() {
                    if v.primary == c.id && v.recovery_flag {
                        let e = want.entry(v.name.clone()).or_insert((
                            v.failure_count_id,
                            v.epoch,
                            false,
                        ));
                        // The metadata's record wins once it is as new as the hold: a
                        // claim may have stored the recovery server's epoch (moved on
                        // by a promotion fenced there and fenced back), or the
                        // adoption raised the metadata's; the node serves at the
                        // metadata's, and in jeopardy under `suspend` on the hold alone.
                        if v.failure_count_id > e.0 || v.failure_count_id == e.0 && !e.2 {
                            *e = (v.failure_count_id, v.epoch, false);
                        }
                    }
                }
                for (name, (fcid, epoch, restoring)) in want {
                    // The metadata caught up and no longer needs the hold.
                    if let Some(v) = meta.volumes.get(&name) {
                        if v.failure_count_id >= fcid
                            && !(v.primary == c.id && v.recovery_flag)
                            && !restoring
                        {
                            r.holds.lock().remove(&name);
                            continue;
                        }
                    }
                    let sent = Instant::now();
                    let body = serde_json::to_vec(&RenewReq {
                        volume: name.clone(),
                        fcid,
                        holder: c.id,
                        serving: !restoring,
                    })
                    .unwrap_or_default();
                    match r.client.call(KIND_RS_RENEW, &body, HOLD_LEASE).await {
                        Ok(_) => {
                            let mut holds = r.holds.lock();
                            // A restoring hold dropped meanwhile (its restore failed, a
                            // survivor that saw another node) stays dropped; only the
                            // metadata's primary in jeopardy gets its hold back here.
                            if restoring && !holds.contains_key(&name) {
                                continue;
                            }
                            let h = holds.entry(name.clone()).or_insert(Hold {
                                fcid,
                                epoch,
                                until: sent,
                                restoring,
                            });
                            // The recovery server confirmed this node as holder at
                            // `fcid`: an older hold it kept is replaced.
                            if h.fcid < fcid {
                                *h = Hold {
                                    fcid,
                                    epoch,
                                    until: sent + HOLD_LEASE,
                                    restoring,
                                };
                            } else if h.fcid == fcid {
                                h.until = sent + HOLD_LEASE;
                                h.epoch = epoch;
                            }
                        }
                        Err(e) if e.is_fenced() => {
                            if r.holds.lock().remove(&name).is_some() {
                                tracing::error!(volume = %name, error = %e, "hold lost at the recovery server: another node holds the volume; this node stops serving it");
                            }
                        }
                        Err(e) => tracing::debug!(volume = %name, error = %e, "hold not renewed"),
                    }
                }
            }
        });
    }

    /// Policy `accept`: once the recovery server answers again, puts the current data
    /// of every block acknowledged without it there (under the blocks' write locks,
    /// so no newer write to them is logged before it).
    async fn catch_up(&self, volume: &str) -> Result<(), String> {
        let Some(r) = self.recovery.as_ref() else {
            return Ok(());
        };
        loop {
            let batch: Vec<u64> = match r.lag.lock().get(volume) {
                Some(s) if !s.is_empty() => s.iter().take(256).copied().collect(),
                _ => return Ok(()),
            };
            let Some(v) = self
                .effective(volume)
                .filter(|v| v.primary == self.id && v.recovery_flag)
            else {
                return Ok(());
            };
            let Some(local) = self.blocks.volume(volume).filter(|l| l.meta.uid == v.uid) else {
                return Ok(());
            };
            for lba in batch {
                let _g = self.stripes.lock(lba, lba).await;
                let mut buf = vec![0u8; BLOCK_SIZE];
                self.blocks
                    .read_blocks(&local, lazarus_types::Lba(lba), &mut buf)
                    .map_err(|e| e.to_string())?;
                let u = Update::Write {
                    volume: volume.to_string(),
                    epoch: v.epoch,
                    lba,
                };
                // Taken out first: a failure under `accept` puts it back.
                if let Some(s) = r.lag.lock().get_mut(volume) {
                    s.remove(&lba);
                }
                if !self.log_update(&v, &u, &buf).await? {
                    return Ok(());
                }
            }
            tracing::info!(
                volume,
                left = r.lag(volume),
                "recovery server caught up with writes acknowledged without it"
            );
        }
    }

    /// The recovery server's logged changes touching LBAs `[first, end)`, in order:
    /// (kind, lba, count, data). `None` when it holds no usable log for the volume.
    pub async fn logged_changes(
        &self,
        volume: &str,
        uid: u64,
        first: u64,
        end: u64,
    ) -> Option<Vec<(RecordKind, u64, u64, Vec<u8>)>> {
        let r = self.recovery.as_ref()?;
        let st = r.fresh_state(volume).await?;
        if st.coord.uid != uid || !st.coord.jeopardy || !st.damaged.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        let mut offset = 0u64;
        let mut generation = 0u64;
        let mut restarts = 0;
        loop {
            let body = serde_json::to_vec(&ReadReq {
                volume: volume.to_string(),
                uid,
                offset,
                max_bytes: READ_CHUNK,
                lbas: Some((first, end)),
                latest: false,
                generation,
            })
            .ok()?;
            let reply = match r.client.call(KIND_RS_READ, &body, RS_TIMEOUT * 2).await {
                Ok(b) => b,
                // Compacted meanwhile: its latest records say the same; read again.
                Err(e) if e.code() == Some(Refusal::Restart) && restarts < READ_RESTARTS => {
                    restarts += 1;
                    out.clear();
                    offset = 0;
                    continue;
                }
                Err(_) => return None,
            };
            lazarus_observe::metrics::METRICS
                .recovery_restore_bytes
                .inc_by(reply.len() as u64);
            let (json, raw) = rpc::unpack(&reply).ok()?;
            let rr: ReadReply = serde_json::from_slice(json).ok()?;
            generation = rr.generation;
            let mut at = 0usize;
            for w in rr.records {
                let end_at = at + w.data_len as usize;
                out.push((w.kind, w.lba, w.count as u64, raw.get(at..end_at)?.to_vec()));
                at = end_at;
            }
            if rr.done || rr.next == offset {
                return Some(out);
            }
            offset = rr.next;
        }
    }

    /// Whether this node's device takes writes: no injected device failure, and the
    /// block store has not latched a failed journal write or flush.
    pub(crate) fn device_usable(&self) -> bool {
        !self.blocks.device_failed() && !self.blocks.has_failed()
    }

    /// Whether `node`'s device is healthy (its ping says so).
    pub(crate) async fn device_ok(
        &self,
        meta: &lazarus_cluster::ClusterMeta,
        node: NodeId,
    ) -> bool {
        if node == self.id {
            return self.device_usable();
        }
        if !meta.nodes.contains_key(&node) {
            return false;
        }
        let Some(addr) = self.rpc_addr(node) else {
            return false;
        };
        matches!(self.network.control(&addr).call(lazarus_rpc::KIND_PING, &self.ping_body(), crate::cluster::PING_TIMEOUT).await, Ok(b) if b != lazarus_rpc::msg::PING_DEVICE_FAILED)
    }

    /// Whether `node` answers that its device failed (`device_ok` also counts a node
    /// that does not answer).
    async fn device_failed(&self, meta: &lazarus_cluster::ClusterMeta, node: NodeId) -> bool {
        if node == self.id {
            return !self.device_usable();
        }
        let Some(addr) = self
            .rpc_addr(node)
            .filter(|_| meta.nodes.contains_key(&node))
        else {
            return false;
        };
        matches!(self.network.control(&addr).call(lazarus_rpc::KIND_PING, &self.ping_body(), crate::cluster::PING_TIMEOUT).await, Ok(b) if b == lazarus_rpc::msg::PING_DEVICE_FAILED)
    }

    /// Whether `v`'s primary compared its live copies with its own at `v.epoch` (its
    /// summary's `reconciled`; a Raft lease alone says nothing of it).
    async fn primary_reconciled(&self, v: &VolumeInfo) -> bool {
        if v.primary == self.id {
            return self.reconciled(&v.name, v.epoch);
        }
        match self.peer_stats(v.primary, Duration::from_millis(500)).await {
            Ok(s) => s["reconciled"][v.name.as_str()].as_u64() == Some(v.epoch),
            Err(_) => false,
        }
    }

    fn flaky(&self, meta: &lazarus_cluster::ClusterMeta, node: NodeId) -> bool {
        let Some(r) = self.recovery.as_ref() else {
            return false;
        };
        let since = unix_ms().saturating_sub(r.failure_window.as_millis() as u64);
        meta.failures
            .get(&node)
            .is_some_and(|h| h.iter().filter(|t| **t >= since).count() > r.failures_max)
    }

    /// The volume's failure domains: hosting nodes that answer, with a healthy
    /// device, a live copy, and a failure history that lets them be counted on.
    pub async fn failure_domains(
        &self,
        meta: &lazarus_cluster::ClusterMeta,
        v: &VolumeInfo,
    ) -> Vec<NodeId> {
        let mut out = Vec::new();
        for n in v.live() {
            if self.device_ok(meta, n).await && !self.flaky(meta, n) {
                out.push(n);
            }
        }
        out
    }

    /// Polls the recovery server; on the Raft leader, decides jeopardy entry and exit
    /// and adopts what the recovery server decided without a majority; on every node,
    /// claims a volume it is primary of once its majority is gone, and takes over a
    /// volume whose holder in jeopardy has died when its copy is a base of the log.
    pub fn jeopardy_loop(self: &Arc<Self>) {
        let Some(r) = self.recovery.clone() else {
            return;
        };
        let r2 = r.clone();
        tokio::spawn(async move {
            loop {
                match r2
                    .call::<HashMap<String, VolumeState>>(KIND_RS_STATE, b"{}")
                    .await
                {
                    Ok(s) => *r2.polled.lock() = (Some(Instant::now()), s),
                    Err(e) => tracing::debug!(error = %e, "recovery server not reachable"),
                }
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
        });
        let c = self.clone();
        tokio::spawn(async move {
            let mut lease_lost: HashMap<String, Instant> = HashMap::new();
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                c.settle_claims().await;
                if !r.reachable() {
                    continue;
                }
                let meta = c.store.meta();
                let leader = c.raft.metrics().borrow().current_leader == Some(c.id);
                for v in meta.volumes.values() {
                    if v.replicas.len() < 2 || !v.replicas.contains(&c.id) && !leader {
                        continue;
                    }
                    let rs = r.state(&v.name).filter(|s| s.coord.uid == v.uid);
                    if leader {
                        if let Err(e) = c.decide(v, rs.as_ref()).await {
                            tracing::warn!(volume = %v.name, error = %e, "jeopardy decision not carried out");
                        }
                    }
                    // A primary whose lease is gone for good (no majority) claims.
                    if v.primary == c.id && v.replicas.contains(&c.id) {
                        let raft_ok = c.raft_lease_valid(&v.name, v.epoch);
                        let held =
                            c.hold_valid(&v.name, c.effective(&v.name).map_or(0, |e| e.epoch));
                        if raft_ok || held {
                            lease_lost.remove(&v.name);
                        } else {
                            let since = *lease_lost
                                .entry(v.name.clone())
                                .or_insert_with(Instant::now);
                            if since.elapsed() >= NO_MAJORITY_GRACE
                                && c.is_ready()
                                && !c.rs_overrides(v)
                                && v.cloning.is_none()
                            {
                                match c.claim_last_domain(v).await {
                                    Ok(_) => {
                                        tracing::warn!(volume = %v.name, "no majority: this node holds the volume at the recovery server as its last failure domain")
                                    }
                                    Err(e) => {
                                        tracing::warn!(volume = %v.name, error = %e, "no majority, and the recovery server did not let this node go on; not serving")
                                    }
                                }
                                lease_lost.remove(&v.name);
                            }
                        }
                    }
                    if let Some(rs) = rs.as_ref() {
                        c.maybe_take_over(v, rs).await;
                    }
                    if v.replicas.contains(&c.id) && v.primary != c.id {
                        c.maybe_survive(v, rs.as_ref()).await;
                    }
                    if r.lag(&v.name) > 0 {
                        if let Err(e) = c.catch_up(&v.name).await {
                            tracing::warn!(volume = %v.name, error = %e, "recovery server catch-up failed");
                        }
                    }
                }
            }
        });
    }

    async fn propose_bounded(&self, cmd: MetaCommand) -> Result<MetaResponse, String> {
        match tokio::time::timeout(PROPOSE_ON_WRITE_PATH, self.propose(cmd)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("not committed in time (no majority?)".into()),
        }
    }

    /// The recovery server is ahead of the metadata with a holder the metadata must
    /// not adopt (a promotion fenced there whose `Promote` never committed: a leader
    /// that lost its quorum, a candidate the metadata refused): the compare-and-set
    /// is moved on once more, back to the metadata's own primary, and the metadata
    /// records the new failure count ID. A late `Promote` carrying the old one is then
    /// refused, and the recovery server no longer holds leases back.
    async fn refence(&self, v: &VolumeInfo, s: &VolumeState) -> Result<(), String> {
        let r = self.recovery.as_ref().ok_or("no recovery server")?;
        let req = ClaimReq {
            base_index: None,
            takeover: false,
            survivor_of: None,
            volume: v.name.clone(),
            uid: v.uid,
            expect_fcid: s.coord.fcid,
            holder: v.primary,
            epoch: v.epoch,
            jeopardy: false,
            config: None,
            base: Vec::new(),
        };
        let reply = r.claim(&req).await?;
        if !reply.granted {
            return Err(format!("re-fence refused: {}", reply.reason));
        }
        let cmd = MetaCommand::Refence {
            volume: v.name.clone(),
            fcid: reply.coord.fcid,
            epoch: v.epoch,
        };
        let res = self.propose_bounded(cmd).await?;
        tracing::warn!(volume = %v.name, stray_holder = ?s.coord.holder, fcid = reply.coord.fcid, primary = v.primary, result = ?res, "the recovery server named a holder the metadata does not know as current; fenced back to the metadata's primary");
        lazarus_observe::events::record(
            "adopt",
            &v.name,
            format!(
                "not adopted: n{} at the recovery server (failure count ID {}) is not a current copy; fenced back to n{}",
                s.coord.holder.unwrap_or(0),
                s.coord.fcid,
                v.primary
            ),
        );
        Ok(())
    }

    /// Leader duties for one volume.
    async fn decide(&self, v: &VolumeInfo, rs: Option<&VolumeState>) -> Result<(), String> {
        let r = self.recovery.as_ref().ok_or("no recovery server")?;
        // 1. Adopt what the recovery server decided while the metadata could not.
        if let Some(s) = rs.filter(|s| s.coord.fcid > v.failure_count_id) {
            let since = *r
                .ahead
                .lock()
                .entry(v.name.clone())
                .or_insert_with(Instant::now);
            let holder = s.coord.holder.unwrap_or(v.primary);
            // No lease is granted while the recovery server is ahead (lease.rs), so
            // once ADOPT_AFTER has passed no primary of the old state still serves.
            if since.elapsed() >= ADOPT_AFTER {
                match adoption(v, &s.coord) {
                    Adoption::Adopt { restored } => {
                        let cmd = MetaCommand::AdoptRecovery {
                            volume: v.name.clone(),
                            uid: v.uid,
                            fcid: s.coord.fcid,
                            primary: holder,
                            epoch: s.coord.epoch,
                            jeopardy: s.coord.jeopardy,
                            live: vec![holder],
                            restored,
                        };
                        let res = self.propose_bounded(cmd).await?;
                        tracing::warn!(volume = %v.name, fcid = s.coord.fcid, holder, result = ?res, "adopted the recovery server's newer state for the volume");
                        lazarus_observe::events::record("adopt", &v.name, format!("adopted the recovery server's state: n{holder} primary, failure count ID {}", s.coord.fcid));
                    }
                    Adoption::Refence => {
                        self.refence(v, s).await?;
                    }
                    Adoption::Wait => {
                        tracing::info!(volume = %v.name, holder, fcid = s.coord.fcid, "the recovery server's holder took over but does not serve yet: not adopted");
                        return Ok(());
                    }
                }
                r.ahead.lock().remove(&v.name);
            }
            return Ok(());
        }
        r.ahead.lock().remove(&v.name);
        let meta = self.store.meta();
        let domains = self.failure_domains(&meta, v).await;
        let flaky: Vec<NodeId> = v
            .live()
            .into_iter()
            .filter(|n| self.flaky(&meta, *n))
            .collect();
        let step = jeopardy_step(v, &domains, &flaky);
        // 2. Enter — unless the primary itself is gone: nothing writes then, and the
        // failover comes first (watch_primaries); the new primary's domains decide.
        if let JeopardyStep::Enter(why) = step {
            if v.primary != self.id && !self.answers(&meta, v.primary).await {
                return Ok(());
            }
            // Not before the primary compared its live copies with its own at this
            // epoch (reconcile.rs: each is made durable, or marked dead): until then a
            // copy still live may lack what an earlier primary wrote, and the log's
            // base must hold everything written before the log began. The primary
            // serves nothing meanwhile, so nothing waits for the log.
            if !self.primary_reconciled(v).await {
                return Ok(());
            }
            // The copies live now, not when this round read the metadata (the checks
            // above wait for other nodes, meanwhile a replica may have been marked
            // dead); a round whose volume changed otherwise is left to the next. The
            // index applied before that read goes with the claim: a copy the primary
            // records out after it (and so may acknowledge writes without before the
            // claim is granted) is left out of the base by the recovery server.
            let applied = self.applied_index();
            let fresh = self.store.meta().volumes.get(&v.name).cloned();
            let Some(fresh) = fresh.filter(|f| {
                f.uid == v.uid
                    && f.primary == v.primary
                    && f.epoch == v.epoch
                    && f.failure_count_id == v.failure_count_id
                    && !f.recovery_flag
            }) else {
                return Ok(());
            };
            // A copy whose device says it failed is no base, live or not yet marked
            // dead: what it held unsynced may be gone. (One that does not answer may
            // just be down, its copy whole: it stays a base.)
            let mut base = Vec::new();
            for n in fresh.live() {
                if !self.device_failed(&meta, n).await {
                    base.push(n);
                }
            }
            let sent = Instant::now();
            let req = ClaimReq {
                base_index: Some(applied),
                takeover: false,
                survivor_of: None,
                volume: v.name.clone(),
                uid: v.uid,
                expect_fcid: v.failure_count_id,
                holder: v.primary,
                epoch: v.epoch,
                jeopardy: true,
                config: serde_json::to_value(&*meta).ok(),
                base,
            };
            let reply = r.claim(&req).await?;
            if !reply.granted {
                return Err(format!("claim refused: {}", reply.reason));
            }
            if v.primary == self.id {
                self.persist_claim(&v.name, v.uid, reply.coord.fcid, v.epoch)
                    .await?;
                r.holds.lock().insert(
                    v.name.clone(),
                    Hold {
                        fcid: reply.coord.fcid,
                        epoch: v.epoch,
                        until: sent + HOLD_LEASE,
                        restoring: false,
                    },
                );
            }
            let cmd = MetaCommand::SetRecovery {
                volume: v.name.clone(),
                on: true,
                fcid: reply.coord.fcid,
                alone: v.primary == self.id,
            };
            self.propose_bounded(cmd).await?;
            tracing::warn!(volume = %v.name, fcid = reply.coord.fcid, %why, "volume in jeopardy: its primary writes through the recovery server");
            lazarus_observe::events::record(
                "jeopardy",
                &v.name,
                format!(
                    "entered jeopardy ({why}), failure count ID {}",
                    reply.coord.fcid
                ),
            );
            return Ok(());
        }
        // 3. Exit: the recovery server stops being the coordination point first (no
        // take-over can start against a primary that, once the flag is off, serves
        // on its Raft lease without a hold), then the flag goes off.
        if step == JeopardyStep::Exit {
            if let Some(s) = rs.filter(|s| s.coord.jeopardy && s.coord.fcid == v.failure_count_id) {
                self.clear_at_rs(v, s).await?;
            }
            let cmd = MetaCommand::SetRecovery {
                volume: v.name.clone(),
                on: false,
                fcid: v.failure_count_id,
                alone: false,
            };
            self.propose_bounded(cmd).await?;
            tracing::info!(volume = %v.name, domains = ?domains, "volume out of jeopardy: {} failure domains", domains.len());
            lazarus_observe::events::record(
                "jeopardy",
                &v.name,
                format!("left jeopardy: failure domains {domains:?}"),
            );
        }
        // 4. Delete the recovery server's copy once the flag is off.
        if !v.recovery_flag {
            if let Some(s) = rs.filter(|s| s.coord.jeopardy && s.coord.fcid == v.failure_count_id) {
                self.clear_at_rs(v, s).await?;
            }
        }
        Ok(())
    }

    /// On a base copy of a volume whose holder in jeopardy has gone silent at the
    /// recovery server and does not answer: claim it, restore from the stale copy plus
    /// the log, then serve.
    async fn maybe_take_over(&self, v: &VolumeInfo, rs: &VolumeState) {
        let Some(r) = self.recovery.as_ref() else {
            return;
        };
        let c = &rs.coord;
        // A node whose device failed restores nothing. Its own claim it takes over
        // again only if it never served under it (its restore failed, or it crashed in
        // the middle of it); it serves nothing while it restores (`lease_valid`).
        let own_retry = c.holder == Some(self.id) && !c.serving;
        if !c.jeopardy
            || !self.device_usable()
            || c.holder == Some(self.id) && !own_retry
            || !c.base.contains(&self.id)
            || rs
                .holder_silent_ms
                .is_none_or(|ms| ms < HOLDER_SILENCE_MAX.as_millis() as u64)
            || r.hold(&v.name).is_some()
            || !v.replicas.contains(&self.id)
        {
            return;
        }
        // A live copy under a working majority is promoted by the leader instead.
        if v.state_of(self.id) == Some(ReplicaState::Live)
            && v.primary != self.id
            && self.raft.metrics().borrow().current_leader.is_some()
            && v.failure_count_id >= c.fcid
        {
            return;
        }
        let meta = self.store.meta();
        // A holder that answers but whose device failed restores nothing either.
        if let Some(h) = c.holder.filter(|h| *h != self.id) {
            if self.answers(&meta, h).await && self.device_ok(&meta, h).await {
                return;
            }
        }
        if !rs.damaged.is_empty() {
            tracing::error!(volume = %v.name, damaged = ?rs.damaged, "the recovery log is damaged: this copy cannot be brought current from it; not taking over");
            return;
        }
        let Some(local) = self.blocks.volume(&v.name).filter(|l| l.meta.uid == v.uid) else {
            return;
        };
        let epoch = c.epoch.max(v.epoch) + 1;
        let sent = Instant::now();
        let req = ClaimReq {
            base_index: None,
            takeover: true,
            survivor_of: None,
            volume: v.name.clone(),
            uid: v.uid,
            expect_fcid: c.fcid,
            holder: self.id,
            epoch,
            jeopardy: true,
            config: serde_json::to_value(&*meta).ok(),
            base: c.base.clone(),
        };
        let Some(fcid) = self
            .claim_and_hold(&req, sent, "take-over", own_retry)
            .await
        else {
            return;
        };
        tracing::warn!(volume = %v.name, old = ?c.holder, fcid, epoch, "the last failure domain is gone: restoring this copy from the recovery server's log to serve the volume");
        lazarus_observe::events::record(
            "takeover",
            &v.name,
            format!(
                "n{} restores from the recovery log and takes over (failure count ID {fcid})",
                self.id
            ),
        );
        // From now on this node's pings say it holds the volume, so the old holder
        // stops counting it as a contact; wait out the window in which the old holder
        // may still serve on an earlier contact before this copy serves (the restore
        // usually takes longer anyway).
        let waited = tokio::time::sleep(lazarus_recovery::server::CONTACT_WINDOW);
        let (restored, ()) = tokio::join!(self.restore_from_log(&v.name, v.uid, &local), waited);
        match restored {
            Ok((records, bytes)) => {
                if let Some(h) = r.holds.lock().get_mut(&v.name) {
                    h.restoring = false;
                }
                tracing::warn!(volume = %v.name, records, bytes, "restored from the recovery log; serving the volume in jeopardy");
                let cmd = MetaCommand::AdoptRecovery {
                    volume: v.name.clone(),
                    uid: v.uid,
                    fcid,
                    primary: self.id,
                    epoch,
                    jeopardy: true,
                    live: vec![self.id],
                    restored: true,
                };
                match tokio::time::timeout(PROPOSE_ON_WRITE_PATH, self.propose(cmd)).await {
                    Ok(Ok(_)) => {}
                    _ => {
                        tracing::warn!(volume = %v.name, "take-over not committed through Raft (no majority); serving under the recovery server's hold")
                    }
                }
            }
            Err(e) => {
                tracing::error!(volume = %v.name, error = %e, "restore from the recovery log failed; not serving");
                r.holds.lock().remove(&v.name);
            }
        }
    }

    /// Claims a volume at the recovery server for this node (a take-over or a
    /// survivor: `what`), and on a grant records its hold, not serving yet
    /// (`restoring`). Returns the failure count ID granted. `own`: this node's own
    /// claim, under which it never served, taken again.
    pub(crate) async fn claim_and_hold(
        &self,
        req: &ClaimReq,
        sent: Instant,
        what: &str,
        own: bool,
    ) -> Option<u64> {
        let r = self.recovery.as_ref()?;
        let reply = match r.claim(req).await {
            Ok(rep) if rep.granted => rep,
            Ok(rep) => {
                tracing::info!(volume = %req.volume, reason = %rep.reason, "{what} refused");
                return None;
            }
            Err(e) => {
                tracing::warn!(volume = %req.volume, error = %e, "{what} claim failed");
                return None;
            }
        };
        let fcid = reply.coord.fcid;
        // Writes this node noted as the primary before may have been overwritten by
        // a later primary or holder since: a take-over or survivor claim never drains
        // them. Only those of its tenure now, when it takes its own claim again (the
        // metadata's primary whose jeopardy claim was never renewed), are still owed
        // to the log: nobody held the volume in between.
        r.forget_unflushed(&req.volume, self.tenure(&req.volume).filter(|_| own));
        if let Err(e) = self
            .persist_claim(&req.volume, req.uid, fcid, req.epoch)
            .await
        {
            tracing::error!(volume = %req.volume, error = %e, "{what} claim granted but not recorded on this node's disk; not serving");
            return None;
        }
        r.holds.lock().insert(
            req.volume.clone(),
            Hold {
                fcid,
                epoch: req.epoch,
                until: sent + HOLD_LEASE,
                restoring: true,
            },
        );
        Some(fcid)
    }

    /// Deletes a volume's configuration copy and log at the recovery server (jeopardy
    /// is over), at the failure count ID it is at.
    async fn clear_at_rs(&self, v: &VolumeInfo, s: &VolumeState) -> Result<(), String> {
        let r = self.recovery.as_ref().ok_or("no recovery server")?;
        let body = serde_json::to_vec(&ClearReq {
            volume: v.name.clone(),
            uid: v.uid,
            fcid: s.coord.fcid,
        })
        .map_err(|e| e.to_string())?;
        r.client.call(KIND_RS_CLEAR, &body, RS_TIMEOUT).await?;
        tracing::info!(volume = %v.name, bytes = s.log_bytes, "recovery server's configuration copy and changed blocks deleted");
        lazarus_observe::events::record(
            "jeopardy",
            &v.name,
            format!("recovery server copy deleted ({} log bytes)", s.log_bytes),
        );
        Ok(())
    }

    /// Applies the recovery server's changed-block log for `volume` to the local copy,
    /// in sequence order, then makes it durable. Returns (records, bytes).
    pub(crate) async fn restore_from_log(
        &self,
        volume: &str,
        uid: u64,
        local: &Arc<lazarus_store::Volume>,
    ) -> Result<(u64, u64), String> {
        let r = self.recovery.as_ref().ok_or("no recovery server")?;
        self.replacing_copy(volume);
        let t0 = Instant::now();
        let set = |f: &dyn Fn(&mut RestoreProgress)| {
            let mut m = r.restores.lock();
            let p = m.entry(volume.to_string()).or_default();
            f(p);
            p.elapsed_ms = t0.elapsed().as_millis() as u64;
        };
        set(&|p| {
            *p = RestoreProgress {
                state: "restoring".into(),
                ..Default::default()
            }
        });
        let mut offset = 0u64;
        let (mut records, mut bytes) = (0u64, 0u64);
        let mut generation = 0u64;
        let mut restarts = 0;
        // The next part of the log is fetched while this one is applied (in order:
        // one apply at a time).
        type Apply =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send>>;
        let mut applying: Option<Apply> = None;
        loop {
            let body = serde_json::to_vec(&ReadReq {
                volume: volume.to_string(),
                uid,
                offset,
                max_bytes: READ_CHUNK,
                lbas: None,
                latest: true,
                generation,
            })
            .map_err(|e| e.to_string())?;
            let call = r.client.call(KIND_RS_READ, &body, RS_TIMEOUT * 2);
            let reply = match applying.take() {
                Some(a) => {
                    let (applied, reply) = futures::future::join(a, call).await;
                    records += applied?;
                    set(&|p| p.records = records);
                    reply
                }
                None => call.await,
            };
            let reply = match reply {
                Ok(b) => b,
                // The log was compacted under this restore: replaying the compacted
                // log from its start over what was applied gives the same result.
                Err(e) if e.code() == Some(Refusal::Restart) && restarts < READ_RESTARTS => {
                    restarts += 1;
                    tracing::info!(volume, restarts, "recovery log compacted during the restore: reading it again from the start");
                    offset = 0;
                    (records, bytes) = (0, 0);
                    continue;
                }
                Err(e) => {
                    let e = e.to_string();
                    set(&|p| {
                        p.state = "failed".into();
                        p.error = Some(e.clone());
                    });
                    return Err(e);
                }
            };
            bytes += reply.len() as u64;
            let (json, raw) = rpc::unpack(&reply)?;
            let rr: ReadReply = serde_json::from_slice(json).map_err(|e| e.to_string())?;
            generation = rr.generation;
            if !rr.damaged.is_empty() {
                return Err(format!("the recovery log is damaged at {:?}", rr.damaged));
            }
            let b = self.blocks.clone();
            let local = local.clone();
            let recs = rr.records;
            let raw = raw.to_vec();
            let n = recs.len() as u64;
            applying = Some(Box::pin(async move {
                lazarus_rpc::rt::blocking(move || -> Result<(), String> {
                    let mut at = 0usize;
                    for w in &recs {
                        let end = at + w.data_len as usize;
                        let lba = lazarus_types::Lba(w.lba);
                        if w.lba + w.count as u64 > local.block_count() {
                            return Err(format!(
                                "log record past the end of the volume (lba {})",
                                w.lba
                            ));
                        }
                        match w.kind {
                            RecordKind::Write => b
                                .write_blocks(&local, lba, &raw[at..end])
                                .map_err(|e| e.to_string())?,
                            RecordKind::Zero => b
                                .write_zeroes(&local, lba, w.count as u64, false)
                                .map_err(|e| e.to_string())?,
                            RecordKind::ZeroProvision => b
                                .write_zeroes(&local, lba, w.count as u64, true)
                                .map_err(|e| e.to_string())?,
                        }
                        at = end;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())??;
                Ok(n)
            }));
            set(&|p| p.bytes = bytes);
            lazarus_observe::metrics::METRICS
                .recovery_restore_bytes
                .inc_by(reply.len() as u64);
            if rr.done || rr.next == offset {
                break;
            }
            offset = rr.next;
        }
        if let Some(a) = applying.take() {
            records += a.await?;
            set(&|p| p.records = records);
        }
        let store = self.blocks.clone();
        lazarus_rpc::rt::blocking(move || store.flush())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        set(&|p| p.state = "done".into());
        Ok((records, bytes))
    }

    /// Fences a promotion at the recovery server: compare-and-set of the failure count
    /// ID with the new primary as holder. `Ok(None)` without a recovery server.
    pub(crate) async fn fence_promotion(
        &self,
        v: &VolumeInfo,
        node: NodeId,
    ) -> Result<Option<u64>, String> {
        let Some(r) = self.recovery.as_ref() else {
            return Ok(None);
        };
        let req = ClaimReq {
            base_index: None,
            takeover: false,
            survivor_of: None,
            volume: v.name.clone(),
            uid: v.uid,
            expect_fcid: v.failure_count_id,
            holder: node,
            epoch: v.epoch + 1,
            jeopardy: false,
            config: None,
            base: Vec::new(),
        };
        let reply = r.claim(&req).await?;
        if !reply.granted {
            return Err(format!(
                "the recovery server refused the promotion: {}",
                reply.reason
            ));
        }
        Ok(Some(reply.coord.fcid))
    }

    /// Per volume, for status: jeopardy state, failure count ID, recovery server lag
    /// and log size.
    pub fn jeopardy_status(&self) -> serde_json::Value {
        let meta = self.store.meta();
        let r = self.recovery.as_ref();
        let vols: serde_json::Map<String, serde_json::Value> = meta
            .volumes
            .values()
            .map(|v0| {
                let v = self.effective(&v0.name).unwrap_or_else(|| v0.clone());
                let rs = r.and_then(|r| r.state(&v.name)).filter(|s| s.coord.uid == v.uid);
                (
                    v.name.clone(),
                    serde_json::json!({
                        "jeopardy": v.recovery_flag,
                        "failure_count_id": v.failure_count_id,
                        "protected": v.protected,
                        "recovery_lag": r.map_or(0, |r| r.lag(&v.name)),
                        "recovery_log_bytes": rs.as_ref().map_or(0, |s| s.log_bytes),
                        "recovery_server": rs.as_ref().map(|s| serde_json::json!({
                            "failure_count_id": s.coord.fcid,
                            "holder": s.coord.holder,
                            "jeopardy": s.coord.jeopardy,
                            "base": s.coord.base,
                            "log_records": s.log_records,
                            "damaged": s.damaged,
                        })),
                        "held_at_recovery_server": r.and_then(|r| r.hold(&v.name)).map(|h| h.fcid > v0.failure_count_id).unwrap_or(false),
                        "restore": r.and_then(|r| r.restores.lock().get(&v.name).cloned()),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "recovery_server": r.map(|r| serde_json::json!({
                "address": r.addr,
                "reachable": r.reachable(),
                "policy": self.policy(),
                "configured_policy": r.configured_policy,
            })),
            "volumes": vols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recovery() -> Arc<Recovery> {
        let cfg: NodeConfig = toml::from_str(
            "id = \"n1\"\ndata_dir = \"/nonexistent\"\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrecovery_server = \"127.0.0.1:9\"\n",
        )
        .expect("config");
        Recovery::new(&cfg, None).expect("a recovery server is configured")
    }

    fn write(lba: u64) -> Update {
        Update::Write {
            volume: "v".into(),
            epoch: 1,
            lba,
        }
    }

    /// A drain's waves keep the records' order, hold at most `DRAIN_IN_FLIGHT` each,
    /// and never put two records writing the same block in one wave (their order on
    /// the recovery server would then be left to chance).
    #[test]
    fn drain_waves_never_hold_two_writes_of_one_block() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..200 {
            let n = rng.usize(0..300);
            let span = if round % 2 == 0 { 64 } else { 100_000 };
            let pending: Vec<(u64, Update, Kept)> = (0..n)
                .map(|i| {
                    let lba = rng.u64(0..span);
                    let u = match rng.u32(0..10) {
                        0 => Update::Flush,
                        1 => Update::Zero {
                            volume: "v".into(),
                            epoch: 1,
                            lba,
                            count: rng.u64(1..40),
                            provision: false,
                        },
                        _ => write(lba),
                    };
                    let raw = Kept::copy(&vec![0u8; BLOCK_SIZE * rng.usize(1..4)]);
                    (i as u64, u, raw)
                })
                .collect();
            let waves = drain_waves(&pending);
            let mut next = 0;
            for w in &waves {
                assert_eq!(w.start, next, "waves in order, none skipped");
                assert!(!w.is_empty() && w.len() <= DRAIN_IN_FLIGHT);
                next = w.end;
                let wave = &pending[w.clone()];
                for (i, a) in wave.iter().enumerate() {
                    for b in &wave[i + 1..] {
                        if let (Some((a0, a1)), Some((b0, b1))) =
                            (blocks_of(&a.1, &a.2), blocks_of(&b.1, &b.2))
                        {
                            assert!(a1 <= b0 || b1 <= a0, "records {} and {} overlap", a.0, b.0);
                        }
                    }
                }
            }
            assert_eq!(next, n);
            if round % 2 == 1 && n > 200 {
                assert!(waves.len() < n / 2, "sparse writes go many at a time");
            }
        }
    }

    fn lbas(d: &[(u64, Update, Kept)]) -> Vec<u64> {
        d.iter()
            .map(|(_, u, _)| match u {
                Update::Write { lba, .. } => *lba,
                _ => u64::MAX,
            })
            .collect()
    }

    /// The drain's bookkeeping (seed 171 of the simulator): until every drained write
    /// is on the recovery server, no write counts the volume as drained (it would be
    /// logged ahead of an older record of its block), and a drain cut short is made
    /// again whole and in order.
    #[test]
    fn a_drain_is_done_only_once_every_drained_write_is_logged() {
        let r = recovery();
        assert!(matches!(
            r.note_replicated("v", Some(1), false, &write(882), Kept::copy(&[1; 4096])),
            Noted::Kept
        ));
        assert!(matches!(
            r.note_replicated("v", Some(1), false, &write(7), Kept::copy(&[2; 4096])),
            Noted::Kept
        ));
        assert!(!r.drain_done("v"));
        let d = r.drain("v", Some(1)).expect("writes to drain");
        assert_eq!(lbas(&d), vec![882, 7]);
        // Under way: a write of the volume in jeopardy is logged by the claiming path
        // (which waits for the drain), and `ensure_drained` does not pass it.
        assert!(!r.drain_done("v"), "a drain under way is not done");
        assert!(matches!(
            r.note_replicated("v", Some(1), true, &write(882), Kept::copy(&[3; 4096])),
            Noted::LogIt
        ));
        // Cut short before `drain_logged`: the next drain takes the same writes again.
        let again = r.drain("v", Some(1)).expect("the same writes again");
        assert_eq!(lbas(&again), vec![882, 7]);
        assert_eq!(&*again[0].2, &[1; 4096][..]);
        r.drain_logged("v", again.last().unwrap().0);
        assert!(r.drain_done("v"));
        assert!(r.drain("v", Some(1)).is_none(), "drained once");
        assert!(matches!(
            r.note_replicated("v", Some(1), true, &write(9), Kept::copy(&[4; 4096])),
            Noted::LogIt
        ));
    }

    /// Writes noted in an earlier tenure of this node as the primary are not drained
    /// in a later one: another primary may have written their blocks since, and a
    /// restore from the recovery server would bring the old versions back (simulator
    /// seed 14193). Within one tenure nothing is dropped.
    #[test]
    fn a_drain_takes_only_writes_of_the_current_tenure() {
        let r = recovery();
        r.note_replicated("v", Some(2), false, &write(378), Kept::copy(&[1; 4096]));
        // Noted while the metadata names another primary (a hold beyond it): kept.
        r.note_replicated("v", None, false, &write(5), Kept::copy(&[2; 4096]));
        let d = r.drain("v", None).expect("writes to drain");
        assert_eq!(lbas(&d), vec![378, 5]);
        r.undrain("v");
        let d = r.drain("v", Some(2)).expect("writes to drain");
        assert_eq!(lbas(&d), vec![378, 5]);
        r.undrain("v");
        // Primary again in a tenure that began at epoch 4: what it noted before is gone.
        assert!(r.drain("v", Some(4)).is_none_or(|d| d.is_empty()));
        r.undrain("v");
        r.note_replicated("v", Some(4), false, &write(6), Kept::copy(&[3; 4096]));
        let d = r.drain("v", Some(4)).expect("writes to drain");
        assert_eq!(lbas(&d), vec![6]);
        // A note in a new tenure drops the older tenure's writes as well.
        r.undrain("v");
        r.note_replicated("v", Some(5), false, &write(7), Kept::copy(&[4; 4096]));
        let d = r.drain("v", Some(5)).expect("writes to drain");
        assert_eq!(lbas(&d), vec![7]);
        // A claim by the primary of that tenure keeps them; one by a node the
        // metadata no longer names, or names in another tenure, forgets them.
        r.undrain("v");
        r.forget_unflushed("v", Some(5));
        assert_eq!(lbas(&r.drain("v", Some(5)).expect("kept")), vec![7]);
        r.undrain("v");
        r.forget_unflushed("v", None);
        assert!(r.drain("v", None).is_none_or(|d| d.is_empty()));
    }

    /// A drain that failed keeps its writes ahead of those noted after it.
    #[test]
    fn a_failed_drain_keeps_its_writes_first() {
        let r = recovery();
        r.note_replicated("v", Some(1), false, &write(1), Kept::copy(&[1; 4096]));
        let d = r.drain("v", Some(1)).expect("writes to drain");
        assert_eq!(lbas(&d), vec![1]);
        r.undrain("v");
        assert!(!r.drain_done("v"));
        r.note_replicated("v", Some(1), false, &write(2), Kept::copy(&[2; 4096]));
        let d = r.drain("v", Some(1)).expect("writes to drain");
        assert_eq!(lbas(&d), vec![1, 2]);
        // A flush that completed meanwhile covers the first: it is not logged again.
        r.flushed("v", d[0].0);
        r.drain_logged("v", d[1].0);
        assert!(r.drain_done("v"));
        assert!(r.unflushed.lock()["v"].entries.is_empty());
    }
}
