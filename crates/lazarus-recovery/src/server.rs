//! `lazarus recovery-server`: configuration copies and changed-block logs of volumes in
//! jeopardy, and the coordination point (compare-and-set on each volume's failure
//! count ID) for when the cluster metadata has lost its majority. Not a Raft member.
//! Speaks the node-to-node RPC framing (`lazarus-rpc`) with its own request kinds.

use crate::log::{self as recovery_log, ChangeLog, Coord, RecordKind, VolumeCoord};
use lazarus_rpc::{self as rpc, Refusal, Remote, KIND_PING};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub use lazarus_rpc::kind::{
    KIND_RS_APPEND, KIND_RS_CLAIM, KIND_RS_CLEAR, KIND_RS_CONFIG, KIND_RS_HEARTBEAT,
    KIND_RS_MEMBER, KIND_RS_READ, KIND_RS_RENEW, KIND_RS_STATE,
};

/// How long the recovery server must have heard nothing from every other node of a
/// volume before a surviving replica may claim it. Longer than `CONTACT_WINDOW`, within
/// which a primary must have heard from each live replica or from the recovery server
/// (counted from its request's send time) to go on serving.
pub const SURVIVOR_SILENCE: Duration = Duration::from_millis(1500);
pub const CONTACT_WINDOW: Duration = Duration::from_millis(600);
/// Nodes whose last heartbeat the recovery server remembers.
const HEARD_MAX: usize = 4096;

/// A holder in jeopardy that has not renewed for this long (recovery server's clock,
/// from receipt) may be replaced. Longer than `HOLD_LEASE`, which the holder counts
/// from when it *sent* its renewal, so it has stopped serving first.
pub const HOLDER_SILENCE_MAX: Duration = Duration::from_millis(1000);
/// How long a holder may serve on one renewal, counted from its send time.
pub const HOLD_LEASE: Duration = Duration::from_millis(500);

/// A request that names a volume. The name becomes part of a log file's name, so it is
/// checked (`check_volume_name`: letters, digits, `-`, `_`, `.`, no `..`) before the
/// request does anything.
trait NamesVolume {
    fn volume(&self) -> &str;
}

macro_rules! names_volume {
    ($($t:ty),*) => {$(
        impl NamesVolume for $t {
            fn volume(&self) -> &str {
                &self.volume
            }
        }
    )*};
}
names_volume!(ClaimReq, MemberReq, AppendReq, RenewReq, ClearReq, ConfigReq, ReadReq);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimReq {
    pub volume: String,
    pub uid: u64,
    /// Compare: the failure count ID the claimant believes current.
    pub expect_fcid: u64,
    /// Set: the node that holds the volume from now on, at `epoch`.
    pub holder: u64,
    pub epoch: u64,
    /// Turn jeopardy protection on (it stays on until `clear`).
    pub jeopardy: bool,
    pub config: Option<serde_json::Value>,
    /// Copies current at the start of the log (used when jeopardy starts here).
    #[serde(default)]
    pub base: Vec<u64>,
    /// The Raft log index the claimant had applied when it read `base` (or earlier). A
    /// copy recorded out at a later index is left out of the base: the volume's primary
    /// may have acknowledged writes without it since, before this claim, and those
    /// writes are not in the log that begins here.
    #[serde(default)]
    pub base_index: Option<u64>,
    /// A base copy taking over from a silent holder (it restores from the log first).
    #[serde(default)]
    pub takeover: bool,
    /// A live replica claiming the volume as its survivor (its primary and the other
    /// copies silent): these nodes must all have been silent here too.
    #[serde(default)]
    pub survivor_of: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatReq {
    pub node: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReq {
    pub volume: String,
    pub uid: u64,
    /// The caller's failure count ID: refused (fenced) when the volume moved on.
    pub fcid: u64,
    pub node: u64,
    /// True: the copy is out (writes go on without it); false: it is live again.
    pub out: bool,
    /// Raft log index: for "out", at or after the dead mark's (sent before the mark
    /// with the primary's applied index and again after it with the mark's own); for
    /// "in", when the copy turned live. An "in" not newer than the last "out" is
    /// ignored.
    #[serde(default)]
    pub index: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimReply {
    pub granted: bool,
    pub reason: String,
    /// The state after the call (the winner's, when refused).
    pub coord: VolumeCoord,
    pub log_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendReq {
    pub volume: String,
    pub uid: u64,
    pub fcid: u64,
    pub holder: u64,
    pub epoch: u64,
    pub kind: RecordKind,
    pub lba: u64,
    pub count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendReply {
    /// False when jeopardy protection was cleared at this fcid: not needed any more.
    pub stored: bool,
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewReq {
    pub volume: String,
    pub fcid: u64,
    pub holder: u64,
    /// The holder serves under its hold (restored, or made durable): recorded in the
    /// coordination record (`VolumeCoord::serving`).
    #[serde(default)]
    pub serving: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClearReq {
    pub volume: String,
    pub uid: u64,
    pub fcid: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigReq {
    pub volume: String,
    pub uid: u64,
    pub fcid: u64,
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadReq {
    pub volume: String,
    pub uid: u64,
    pub offset: u64,
    pub max_bytes: usize,
    /// Only records touching LBAs `[first, end)` (repair of one page).
    #[serde(default)]
    pub lbas: Option<(u64, u64)>,
    /// Leave out records every block of which a later record rewrites (a restore that
    /// reads to the end then writes each block once).
    #[serde(default)]
    pub latest: bool,
    /// The log generation of the reply that gave `offset` (compaction changes it, and
    /// every offset with it): refused with `Refusal::Restart` when it changed.
    #[serde(default)]
    pub generation: u64,
}

/// A record header as sent on the wire; the data follows in the raw payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecord {
    pub kind: RecordKind,
    pub seq: u64,
    pub lba: u64,
    pub count: u32,
    pub fcid: u64,
    pub epoch: u64,
    pub data_len: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadReply {
    pub records: Vec<WireRecord>,
    pub next: u64,
    /// True once `next` is the end of the log (as synced when read).
    pub done: bool,
    /// Damaged ranges of the log: records there are lost.
    pub damaged: Vec<(u64, u64)>,
    /// Superseded records left out (`latest`).
    #[serde(default)]
    pub skipped: u64,
    /// The log generation `next` belongs to: send it back with `next`.
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VolumeState {
    pub coord: VolumeCoord,
    pub log_bytes: u64,
    pub log_records: u64,
    pub last_seq: u64,
    pub damaged: Vec<(u64, u64)>,
    /// Milliseconds since the holder last renewed (absent: never, since start).
    pub holder_silent_ms: Option<u64>,
}

struct VolLog {
    log: parking_lot::Mutex<ChangeLog>,
    /// Offsets of superseded records as of the last restore that started (any such
    /// snapshot stays right for a reader that reads to the end: the records that
    /// supersede lie after those they supersede).
    /// Computed for one log generation (offsets change with it).
    superseded: parking_lot::Mutex<Option<(u64, Arc<std::collections::HashSet<u64>>)>>,
    /// Serializes syncs; a sync covers every record written before it started.
    sync: tokio::sync::Mutex<()>,
    /// A compaction is running.
    compacting: std::sync::atomic::AtomicBool,
}

pub struct RecoveryServer {
    dir: PathBuf,
    coord: parking_lot::Mutex<Coord>,
    /// Serializes coordination-file updates (compare, set, save) with each other.
    coord_write: tokio::sync::Mutex<()>,
    logs: parking_lot::Mutex<HashMap<String, Arc<VolLog>>>,
    renewed: parking_lot::Mutex<HashMap<String, Instant>>,
    /// When each node last said it is alive.
    heard: parking_lot::Mutex<HashMap<u64, Instant>>,
    started: Instant,
    /// Logs are compacted once past this size (and doubled since the last time).
    /// (`LAZARUS_RS_COMPACT_MIN_BYTES` in the environment, else 64 MiB.)
    pub compact_min_bytes: std::sync::atomic::AtomicU64,
}

/// Tests make the next log sync fail (the way a device reports a lost write-back).
#[cfg(test)]
static FAIL_NEXT_SYNC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn sync_data(file: &lazarus_rpc::fs::File) -> std::io::Result<()> {
    #[cfg(test)]
    if FAIL_NEXT_SYNC.swap(false, std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    file.sync_data()
}

/// Compacts a volume's log (`log.rs`, "Compaction"): the kept records are copied
/// without the log's lock; appends wait only while the records written meanwhile are
/// copied and the new file is synced and put in place.
async fn compact_log(l: &Arc<VolLog>) -> std::io::Result<()> {
    let Some((from, entries, mut draft)) = l.log.lock().start_compaction()? else {
        return Ok(());
    };
    let draft = lazarus_rpc::rt::blocking(move || draft.copy(&from, &entries).map(|_| draft))
        .await
        .map_err(std::io::Error::other)??;
    // No sync in flight while the file changes under the offsets.
    let _s = l.sync.lock().await;
    let l2 = l.clone();
    let done = lazarus_rpc::rt::blocking(move || l2.log.lock().finish_compaction(draft))
        .await
        .map_err(std::io::Error::other)??;
    if let Some(c) = done {
        *l.superseded.lock() = None;
        tracing::info!(
            records_before = c.records_before,
            records_after = c.records_after,
            bytes_before = c.bytes_before,
            bytes_after = c.bytes_after,
            "recovery log compacted"
        );
    }
    Ok(())
}

fn log_path(dir: &Path, volume: &str, uid: u64) -> PathBuf {
    dir.join("logs").join(format!("{volume}.{uid}.log"))
}

impl RecoveryServer {
    pub fn open(dir: &Path) -> anyhow::Result<Arc<RecoveryServer>> {
        lazarus_rpc::fs::create_dir_all(&dir.join("logs"))
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let coord = recovery_log::load_coord(dir).map_err(anyhow::Error::msg)?;
        let rs = RecoveryServer {
            dir: dir.to_path_buf(),
            coord: parking_lot::Mutex::new(coord.clone()),
            coord_write: Default::default(),
            logs: Default::default(),
            renewed: Default::default(),
            heard: Default::default(),
            started: Instant::now(),
            compact_min_bytes: std::env::var("LAZARUS_RS_COMPACT_MIN_BYTES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(recovery_log::COMPACT_MIN_BYTES)
                .into(),
        };
        // Open (and check, cutting torn tails) the log of every volume in jeopardy now,
        // not on first use: damage is reported at start. A holder's renewals from
        // before the restart are forgotten: count its silence from now, so a holder
        // that died meanwhile can still be replaced once HOLDER_SILENCE_MAX has passed
        // (any hold it had ran out HOLD_LEASE after a renewal sent before the restart).
        // Compactions a crash interrupted, of logs deleted since (those of open logs
        // are removed when the log opens).
        if let Ok(paths) = lazarus_rpc::fs::list_dir(&dir.join("logs")) {
            for p in paths {
                if p.extension().is_some_and(|x| x == "compact") {
                    tracing::warn!(file = %p.display(), "unfinished log compaction removed");
                    let _ = lazarus_rpc::fs::remove_file(&p);
                }
            }
        }
        let now = Instant::now();
        for (name, c) in &coord.volumes {
            if c.holder.is_some() {
                rs.renewed.lock().insert(name.clone(), now);
            }
            if c.jeopardy {
                let l = rs.log(name, c.uid)?;
                let s = l.log.lock().scan.clone();
                tracing::info!(volume = %name, fcid = c.fcid, holder = ?c.holder, records = s.records, bytes = s.bytes, torn_bytes = s.torn_bytes, damaged = s.damaged.len(), "recovery log opened");
            }
        }
        Ok(Arc::new(rs))
    }

    fn log(&self, volume: &str, uid: u64) -> std::io::Result<Arc<VolLog>> {
        // The one place a name becomes a path: never outside `logs/`.
        lazarus_types::check_volume_name(volume).map_err(std::io::Error::other)?;
        let mut logs = self.logs.lock();
        if let Some(l) = logs.get(volume) {
            return Ok(l.clone());
        }
        let l = Arc::new(VolLog {
            log: parking_lot::Mutex::new(ChangeLog::open(&log_path(&self.dir, volume, uid))?),
            superseded: Default::default(),
            sync: Default::default(),
            compacting: Default::default(),
        });
        logs.insert(volume.to_string(), l.clone());
        Ok(l)
    }

    /// Forgets a volume's open log before its file is deleted: a compaction of it
    /// still running finds it retired and puts no file back.
    fn drop_log(&self, volume: &str) -> bool {
        let l = self.logs.lock().remove(volume);
        if let Some(l) = &l {
            l.log.lock().retire();
        }
        l.is_some()
    }

    fn state_of(&self, volume: &str) -> VolumeState {
        let coord = self
            .coord
            .lock()
            .volumes
            .get(volume)
            .cloned()
            .unwrap_or_default();
        let mut s = VolumeState {
            holder_silent_ms: self
                .renewed
                .lock()
                .get(volume)
                .map(|t| t.elapsed().as_millis() as u64),
            ..Default::default()
        };
        if let Some(l) = self.logs.lock().get(volume) {
            let l = l.log.lock();
            s.log_bytes = l.bytes();
            s.log_records = l.scan.records;
            s.last_seq = l.last_seq();
            s.damaged = l.scan.damaged.clone();
        }
        s.coord = coord;
        s
    }

    async fn save(&self, coord: Coord) -> Result<(), String> {
        let dir = self.dir.clone();
        let c = coord.clone();
        lazarus_rpc::rt::blocking(move || recovery_log::save_coord(&dir, &c))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot save the coordination state: {e}"))?;
        *self.coord.lock() = coord;
        Ok(())
    }

    async fn claim(&self, req: ClaimReq) -> Result<ClaimReply, String> {
        let _w = self.coord_write.lock().await;
        let mut coord = self.coord.lock().clone();
        let cur = coord
            .volumes
            .get(&req.volume)
            .cloned()
            .filter(|c| c.uid >= req.uid)
            .unwrap_or(VolumeCoord {
                uid: req.uid,
                ..Default::default()
            });
        let refuse = |reason: String| {
            tracing::info!(volume = %req.volume, holder = req.holder, expect = req.expect_fcid, %reason, "claim refused");
            let mut st = self.state_of(&req.volume);
            st.coord = cur.clone();
            Ok(ClaimReply {
                granted: false,
                reason,
                coord: cur.clone(),
                log_bytes: st.log_bytes,
            })
        };
        if cur.uid != req.uid {
            return refuse(format!("volume uid {} is newer than {}", cur.uid, req.uid));
        }
        if cur.fcid != req.expect_fcid {
            return refuse(format!(
                "failure count ID is {}, not {}",
                cur.fcid, req.expect_fcid
            ));
        }
        if cur.holder.is_some_and(|h| h != req.holder) {
            // In jeopardy or not: a holder that renewed (or was granted) within
            // HOLDER_SILENCE_MAX may still serve under its hold.
            let silent = self.renewed.lock().get(&req.volume).map(|t| t.elapsed());
            if silent.is_none_or(|s| s < HOLDER_SILENCE_MAX) {
                return refuse(format!(
                    "held by n{} (renewed {} ms ago)",
                    cur.holder.unwrap_or(0),
                    silent.map_or(0, |s| s.as_millis())
                ));
            }
        }
        if cur.jeopardy
            && cur.holder.is_some_and(|h| h != req.holder)
            && !cur.base.contains(&req.holder)
        {
            return refuse(format!(
                "n{} was not current when the log began (base {:?}): its copy plus the log is not the volume",
                req.holder, cur.base
            ));
        }
        // A copy out never becomes the holder — except a base copy taking over in
        // jeopardy: it replays the log, which has every write acknowledged since the
        // log began (a primary that did not know of the jeopardy could not record a
        // copy out at the new failure count ID, so it acknowledged nothing without it).
        let takes_over_from_log = cur.jeopardy && req.takeover && cur.base.contains(&req.holder);
        if cur.holder != Some(req.holder) && cur.out.contains(&req.holder) && !takes_over_from_log {
            return refuse(format!(
                "n{} is out: writes were acknowledged without its copy",
                req.holder
            ));
        }
        if let Some(others) = &req.survivor_of {
            if let Some(reason) = self.survivor_refusal(&cur, req.holder, others) {
                return refuse(reason);
            }
        }
        let entering = req.jeopardy && !cur.jeopardy;
        let next = VolumeCoord {
            uid: req.uid,
            fcid: req.expect_fcid + 1,
            holder: Some(req.holder),
            epoch: req.epoch.max(cur.epoch),
            jeopardy: cur.jeopardy || req.jeopardy,
            config: req.config.clone().or(cur.config.clone()),
            base: if entering {
                let (base, late): (Vec<u64>, Vec<u64>) = req.base.iter().partition(|n| {
                    !(cur.out.contains(n)
                        && req.base_index.is_some_and(|i| {
                            cur.member_index.get(n).is_some_and(|out_at| *out_at > i)
                        }))
                });
                if !late.is_empty() {
                    tracing::warn!(volume = %req.volume, named = ?req.base, left_out = ?late, base_index = ?req.base_index, "copies recorded out after the claimant's view are left out of the log's base");
                }
                base
            } else {
                cur.base.clone()
            },
            takeover: req.takeover && (cur.jeopardy || req.survivor_of.is_some()),
            // A survivor's copy is current as it stands (it was live, and nothing
            // was written since without it): adoptable from the grant. A take-over
            // is adoptable once it restored from the log (its renewals say so).
            serving: req.survivor_of.is_some(),
            // Kept across jeopardy and its end: a copy out stays out until it is live
            // again (`MEMBER` in).
            out: cur.out.clone(),
            member_index: cur.member_index.clone(),
        };
        if entering {
            // A fresh log: anything left from an earlier jeopardy is gone.
            self.drop_log(&req.volume);
            let p = log_path(&self.dir, &req.volume, req.uid);
            let _ = lazarus_rpc::fs::remove_file(&p);
        }
        coord.volumes.insert(req.volume.clone(), next.clone());
        self.save(coord).await?;
        if next.jeopardy {
            self.log(&req.volume, req.uid).map_err(|e| e.to_string())?;
        }
        self.renewed
            .lock()
            .insert(req.volume.clone(), Instant::now());
        tracing::info!(volume = %req.volume, fcid = next.fcid, holder = req.holder, epoch = next.epoch, jeopardy = next.jeopardy, base = ?next.base, "claim granted");
        Ok(ClaimReply {
            granted: true,
            reason: String::new(),
            log_bytes: self.state_of(&req.volume).log_bytes,
            coord: next,
        })
    }

    /// Why a surviving replica may not claim the volume, if it may not: it was recorded
    /// out (writes were acknowledged without it), or one of the volume's other nodes was
    /// heard from within `SURVIVOR_SILENCE` (it may still serve, or hold a lease), or this
    /// server has not been up that long (it would not know).
    fn survivor_refusal(&self, cur: &VolumeCoord, holder: u64, others: &[u64]) -> Option<String> {
        if cur.jeopardy {
            return Some("the volume is in jeopardy: only a base copy takes over".into());
        }
        if cur.out.contains(&holder) {
            return Some(format!(
                "n{holder} is out: writes were acknowledged without its copy"
            ));
        }
        if self.started.elapsed() < SURVIVOR_SILENCE {
            return Some("the recovery server started too recently to vouch for silence".into());
        }
        let heard = self.heard.lock();
        if heard.len() >= HEARD_MAX {
            return Some("too many nodes heard from to vouch for anyone's silence".into());
        }
        for n in others.iter().filter(|n| **n != holder) {
            if let Some(t) = heard.get(n).filter(|t| t.elapsed() < SURVIVOR_SILENCE) {
                return Some(format!(
                    "n{n} was heard from {} ms ago: it may still serve",
                    t.elapsed().as_millis()
                ));
            }
        }
        None
    }

    /// Records a copy out (before the primary acknowledges a write without it) or back
    /// in, at the caller's failure count ID.
    async fn member(&self, req: MemberReq) -> Result<(), Remote> {
        let _w = self.coord_write.lock().await;
        let mut coord = self.coord.lock().clone();
        let fresh = VolumeCoord {
            uid: req.uid,
            fcid: req.fcid,
            ..Default::default()
        };
        let c = coord
            .volumes
            .entry(req.volume.clone())
            .or_insert_with(|| fresh.clone());
        // A volume deleted and created again under the same name: its old entry goes.
        if c.uid < req.uid {
            *c = fresh;
        }
        if c.uid != req.uid || c.fcid != req.fcid {
            return Err(Remote::new(
                Refusal::Fenced,
                format!(
                    "fenced: {:?} is at failure count ID {} (uid {}), caller at {} (uid {})",
                    req.volume, c.fcid, c.uid, req.fcid, req.uid
                ),
            ));
        }
        let last = c.member_index.get(&req.node).copied().unwrap_or(0);
        let changed = if req.out {
            c.member_index.insert(req.node, last.max(req.index));
            c.out.insert(req.node) || req.index > last
        } else if req.index > last {
            c.member_index.insert(req.node, req.index);
            c.out.remove(&req.node)
        } else {
            tracing::info!(volume = %req.volume, node = req.node, index = req.index, out_at = last, "stale 'in' ignored: the copy was recorded out after it turned live");
            false
        };
        if changed {
            self.save(coord).await?;
            tracing::info!(volume = %req.volume, node = req.node, out = req.out, "copy recorded {}", if req.out { "out" } else { "in" });
        }
        Ok(())
    }

    fn check_holder(&self, volume: &str, fcid: u64, holder: u64) -> Result<VolumeCoord, Remote> {
        let coord = self.coord.lock();
        let c = coord.volumes.get(volume).ok_or_else(|| {
            Remote::new(
                Refusal::NotFound,
                format!("volume {volume:?} unknown to the recovery server"),
            )
        })?;
        if c.fcid != fcid || c.holder != Some(holder) {
            return Err(Remote::new(
                Refusal::Fenced,
                format!(
                    "fenced: {volume:?} is at failure count ID {} held by n{} (caller: {fcid}, n{holder})",
                    c.fcid,
                    c.holder.unwrap_or(0)
                ),
            ));
        }
        Ok(c.clone())
    }

    async fn append(&self, req: AppendReq, data: &[u8]) -> Result<AppendReply, Remote> {
        let c = self.check_holder(&req.volume, req.fcid, req.holder)?;
        if c.uid != req.uid {
            return Err(Remote::new(Refusal::Fenced, "fenced: volume uid differs"));
        }
        if !c.jeopardy {
            return Ok(AppendReply {
                stored: false,
                seq: 0,
            });
        }
        let l = self.log(&req.volume, req.uid).map_err(|e| e.to_string())?;
        let (seq, end) = {
            let mut log = l.log.lock();
            log.append(req.kind, req.lba, req.count, req.fcid, req.epoch, data)
                .map_err(|e| format!("recovery log write failed: {e}"))?
        };
        self.renewed
            .lock()
            .insert(req.volume.clone(), Instant::now());
        // Group commit: whoever syncs covers every record written before the sync.
        let _s = l.sync.lock().await;
        {
            let log = l.log.lock();
            if let Some(e) = log.failed() {
                // A sync that covered this record failed: it is not durable.
                return Err(format!("recovery log sync failed: {e}").into());
            }
            if log.synced() >= end {
                return Ok(AppendReply { stored: true, seq });
            }
        }
        let (file, upto) = {
            let log = l.log.lock();
            (log.sync_handle().map_err(|e| e.to_string())?, log.bytes())
        };
        let synced = lazarus_rpc::rt::blocking(move || sync_data(&file))
            .await
            .map_err(|e| e.to_string())?;
        if let Err(e) = synced {
            let msg = e.to_string();
            l.log.lock().latch_failure(&msg);
            return Err(format!("recovery log sync failed: {msg}").into());
        }
        let compact = {
            let mut log = l.log.lock();
            log.mark_synced(upto);
            log.wants_compaction(
                self.compact_min_bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        if compact && !l.compacting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let l = l.clone();
            let volume = req.volume.clone();
            tokio::spawn(async move {
                if let Err(e) = compact_log(&l).await {
                    // Tried again once the log doubled again (a full disk, say).
                    l.log.lock().compaction_failed();
                    tracing::error!(volume, error = %e, "recovery log compaction failed");
                }
                l.compacting
                    .store(false, std::sync::atomic::Ordering::Release);
            });
        }
        Ok(AppendReply { stored: true, seq })
    }

    fn read(&self, req: ReadReq) -> Result<Vec<u8>, Remote> {
        let c = self
            .coord
            .lock()
            .volumes
            .get(&req.volume)
            .cloned()
            .ok_or_else(|| {
                Remote::new(Refusal::NotFound, "volume unknown to the recovery server")
            })?;
        if c.uid != req.uid || !c.jeopardy {
            return Err(Remote::new(
                Refusal::NotFound,
                format!("no log for {:?} (uid {})", req.volume, req.uid),
            ));
        }
        let l = self.log(&req.volume, req.uid).map_err(|e| e.to_string())?;
        // One hold of the log's lock from the generation check to the read: a
        // compaction cannot change the offsets in between.
        let mut cached = l.superseded.lock();
        let log = l.log.lock();
        if req.offset != 0 && !log.offsets_valid(req.generation) {
            return Err(Remote::new(
                Refusal::Restart,
                "the recovery log was compacted since the last read: read it again from the start",
            ));
        }
        let skip = if req.latest && req.lbas.is_none() {
            let gen = log.generation();
            let fresh = cached.as_ref().is_some_and(|(g, _)| *g == gen);
            if req.offset == 0 || !fresh {
                // Only records already durable may supersede: a reader stops at the
                // synced end, and must not skip a record whose successor is not there.
                let synced = log.synced();
                let entries: Vec<recovery_log::Entry> = log
                    .entries()
                    .iter()
                    .copied()
                    .filter(|e| e.offset + e.len <= synced)
                    .collect();
                *cached = Some((gen, Arc::new(recovery_log::superseded(&entries))));
            }
            cached.as_ref().map(|(_, s)| s.clone())
        } else {
            None
        };
        drop(cached);
        let (recs, next, skipped) = log
            .read_skipping(
                req.offset,
                req.max_bytes.clamp(1 << 20, 16 << 20),
                skip.as_deref(),
            )
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let records = recs
            .into_iter()
            .filter(|r| {
                req.lbas
                    .is_none_or(|(a, b)| r.lba < b && a < r.lba + r.count as u64)
            })
            .map(|r| {
                raw.extend_from_slice(&r.data);
                WireRecord {
                    kind: r.kind,
                    seq: r.seq,
                    lba: r.lba,
                    count: r.count,
                    fcid: r.fcid,
                    epoch: r.epoch,
                    data_len: r.data.len() as u32,
                }
            })
            .collect();
        let reply = ReadReply {
            records,
            next,
            done: next >= log.synced(),
            damaged: log.scan.damaged.clone(),
            skipped,
            generation: log.generation(),
        };
        let json = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
        Ok(rpc::pack(&json, &raw))
    }

    async fn clear(&self, req: ClearReq) -> Result<(), Remote> {
        let _w = self.coord_write.lock().await;
        let mut coord = self.coord.lock().clone();
        let Some(c) = coord.volumes.get_mut(&req.volume) else {
            return Ok(());
        };
        if c.uid != req.uid || c.fcid != req.fcid {
            return Err(Remote::new(
                Refusal::Fenced,
                format!(
                    "fenced: {:?} is at failure count ID {} (caller: {})",
                    req.volume, c.fcid, req.fcid
                ),
            ));
        }
        c.jeopardy = false;
        c.config = None;
        c.base.clear();
        self.save(coord).await?;
        // The failure count ID and holder stay (a few bytes): a stale claim must
        // still lose the compare-and-set.
        let dropped = self.drop_log(&req.volume);
        let p = log_path(&self.dir, &req.volume, req.uid);
        let bytes = lazarus_rpc::fs::file_len(&p).unwrap_or(0);
        if dropped || lazarus_rpc::fs::exists(&p) {
            lazarus_rpc::fs::remove_file(&p)
                .map_err(|e| format!("cannot delete {}: {e}", p.display()))?;
        }
        tracing::info!(volume = %req.volume, fcid = req.fcid, bytes, "jeopardy cleared: configuration copy and changed blocks deleted");
        Ok(())
    }

    /// Records that the holder serves (a renewal said so), durably.
    async fn set_serving(&self, req: &RenewReq) -> Result<(), Remote> {
        let _w = self.coord_write.lock().await;
        let mut coord = self.coord.lock().clone();
        match coord.volumes.get_mut(&req.volume) {
            Some(c) if c.fcid == req.fcid && c.holder == Some(req.holder) => c.serving = true,
            _ => {
                return Err(Remote::new(
                    Refusal::Fenced,
                    "fenced: the volume moved on during the renewal",
                ))
            }
        }
        tracing::info!(volume = %req.volume, fcid = req.fcid, holder = req.holder, "holder serves");
        Ok(self.save(coord).await?)
    }

    async fn set_config(&self, req: ConfigReq) -> Result<(), Remote> {
        let _w = self.coord_write.lock().await;
        let mut coord = self.coord.lock().clone();
        let Some(c) = coord.volumes.get_mut(&req.volume) else {
            return Err(Remote::new(
                Refusal::NotFound,
                "volume unknown to the recovery server",
            ));
        };
        if c.uid != req.uid || c.fcid != req.fcid {
            return Err(Remote::new(
                Refusal::Fenced,
                "fenced: stale failure count ID",
            ));
        }
        c.config = Some(req.config);
        Ok(self.save(coord).await?)
    }

    /// One request from the wire: every body is decoded and every volume name checked
    /// before anything is done; a bad one is refused with its reason.
    pub async fn handle(&self, kind: u8, body: Vec<u8>) -> Result<Vec<u8>, Remote> {
        fn de<T: serde::de::DeserializeOwned + NamesVolume>(b: &[u8]) -> Result<T, Remote> {
            let req: T = serde_json::from_slice(b)
                .map_err(|e| Remote::new(Refusal::Refused, format!("bad request: {e}")))?;
            lazarus_types::check_volume_name(req.volume())
                .map_err(|e| Remote::new(Refusal::Refused, format!("bad request: {e}")))?;
            Ok(req)
        }
        fn ser<T: Serialize>(v: &T) -> Result<Vec<u8>, Remote> {
            serde_json::to_vec(v).map_err(|e| Remote::from(e.to_string()))
        }
        match kind {
            KIND_PING => Ok(Vec::new()),
            KIND_RS_CLAIM => ser(&self.claim(de(&body)?).await?),
            KIND_RS_APPEND => {
                let (json, raw) = rpc::unpack(&body)?;
                let req: AppendReq = de(json)?;
                ser(&self.append(req, raw).await?)
            }
            KIND_RS_RENEW => {
                let req: RenewReq = de(&body)?;
                let c = self.check_holder(&req.volume, req.fcid, req.holder)?;
                self.renewed
                    .lock()
                    .insert(req.volume.clone(), Instant::now());
                if req.serving && !c.serving {
                    self.set_serving(&req).await?;
                }
                Ok(Vec::new())
            }
            KIND_RS_STATE => {
                let names: Vec<String> = self.coord.lock().volumes.keys().cloned().collect();
                let all: HashMap<String, VolumeState> = names
                    .into_iter()
                    .map(|n| (n.clone(), self.state_of(&n)))
                    .collect();
                ser(&all)
            }
            KIND_RS_READ => self.read(de(&body)?),
            KIND_RS_CLEAR => {
                self.clear(de(&body)?).await?;
                Ok(Vec::new())
            }
            KIND_RS_CONFIG => {
                self.set_config(de(&body)?).await?;
                Ok(Vec::new())
            }
            KIND_RS_HEARTBEAT => {
                let req: HeartbeatReq = serde_json::from_slice(&body)
                    .map_err(|e| Remote::new(Refusal::Refused, format!("bad request: {e}")))?;
                {
                    // Bounded: ids come from the wire (the recovery server does not
                    // know the members). Full, it records no new id and vouches for
                    // no silence (`survivor_refusal`): forgetting a node would make
                    // it look silent.
                    let mut heard = self.heard.lock();
                    if heard.len() < HEARD_MAX || heard.contains_key(&req.node) {
                        heard.insert(req.node, Instant::now());
                    }
                }
                // Each volume's failure count ID and holder: a primary learns here that
                // someone claimed its volume, and stops serving it.
                let coord: HashMap<String, (u64, Option<u64>, Vec<u64>)> = self
                    .coord
                    .lock()
                    .volumes
                    .iter()
                    .map(|(n, c)| {
                        (
                            n.clone(),
                            (c.fcid, c.holder, c.out.iter().copied().collect()),
                        )
                    })
                    .collect();
                ser(&coord)
            }
            KIND_RS_MEMBER => {
                self.member(de(&body)?).await?;
                Ok(Vec::new())
            }
            other => Err(format!("unknown recovery-server request kind {other}").into()),
        }
    }
}

/// Runs the recovery server until killed; with a credential directory (`tls`), only
/// members of the cluster (mutual TLS) get any answer.
pub async fn run(dir: &Path, listen: SocketAddr, tls: Option<&Path>) -> anyhow::Result<()> {
    let tls = match tls {
        Some(d) => Some(rpc::Credentials::load(d).map_err(|e| {
            anyhow::anyhow!("cluster credentials (--cluster-tls {}): {e}", d.display())
        })?),
        None => {
            tracing::warn!("no --cluster-tls: the recovery server answers anyone who reaches its port (SECURITY.md)");
            None
        }
    };
    let rs = RecoveryServer::open(dir)?;
    let listener = lazarus_rpc::net::Listener::bind(&listen.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    lazarus_rpc::fs::write(&dir.join("endpoint"), addr.to_string().as_bytes())?;
    tracing::info!(%addr, data = %dir.display(), "recovery server listening");
    println!("recovery server listening on {addr}");
    let h = rs.clone();
    rpc::serve(
        listener,
        tls,
        Arc::new(move |kind, body| {
            let h = h.clone();
            Box::pin(async move { h.handle(kind, body).await })
        }),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn claim_req(holder: u64, expect_fcid: u64, base: Vec<u64>) -> ClaimReq {
        ClaimReq {
            volume: "vol0".into(),
            uid: 1,
            expect_fcid,
            holder,
            epoch: 1,
            jeopardy: true,
            config: None,
            base,
            base_index: None,
            takeover: false,
            survivor_of: None,
        }
    }

    /// A jeopardy claim whose base was read before a copy was recorded out (the
    /// primary may have acknowledged writes without it since) leaves that copy out of
    /// the base; one read after it, or a claim naming no index, keeps what it names.
    #[tokio::test]
    async fn a_copy_recorded_out_after_the_claimants_view_is_no_base() {
        for (index, want) in [
            (Some(5), vec![1, 2]),
            (Some(12), vec![1, 2, 3]),
            (None, vec![1, 2, 3]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let rs = RecoveryServer::open(&dir.path().join("rs")).unwrap();
            let out = MemberReq {
                volume: "vol0".into(),
                uid: 1,
                fcid: 0,
                node: 3,
                out: true,
                index: 10,
            };
            rs.handle(KIND_RS_MEMBER, serde_json::to_vec(&out).unwrap())
                .await
                .unwrap();
            let mut c = claim_req(1, 0, vec![1, 2, 3]);
            c.base_index = index;
            let reply: ClaimReply = serde_json::from_slice(
                &rs.handle(KIND_RS_CLAIM, serde_json::to_vec(&c).unwrap())
                    .await
                    .unwrap(),
            )
            .unwrap();
            assert!(reply.granted, "{index:?}: {}", reply.reason);
            assert_eq!(reply.coord.base, want, "base index {index:?}");
        }
    }

    fn append_req(fcid: u64, holder: u64, lba: u64) -> AppendReq {
        AppendReq {
            volume: "vol0".into(),
            uid: 1,
            fcid,
            holder,
            epoch: 1,
            kind: RecordKind::Write,
            lba,
            count: 1,
        }
    }

    /// A volume name from the wire never leaves the log folder: a name with a path in
    /// it is refused before any file or coordination entry is made.
    #[tokio::test]
    async fn a_path_in_a_volume_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rs = RecoveryServer::open(&dir.path().join("rs")).unwrap();
        for name in ["../escape", "a/b", "..", "", ".hidden", "/abs"] {
            let mut c = claim_req(1, 0, vec![1, 2, 3]);
            c.volume = name.into();
            let e = rs
                .handle(KIND_RS_CLAIM, serde_json::to_vec(&c).unwrap())
                .await
                .unwrap_err();
            assert_eq!(e.code, Refusal::Refused, "{name:?}: {e:?}");
            let mut a = append_req(1, 1, 0);
            a.volume = name.into();
            let body = rpc::pack(&serde_json::to_vec(&a).unwrap(), &[7u8; 4096]);
            let e = rs.handle(KIND_RS_APPEND, body).await.unwrap_err();
            assert_eq!(e.code, Refusal::Refused, "{name:?}: {e:?}");
        }
        assert!(rs.coord.lock().volumes.is_empty());
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        files.sort();
        assert_eq!(files, vec![std::ffi::OsString::from("rs")]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("rs/logs"))
                .unwrap()
                .count(),
            0
        );
        // A well-formed claim still works.
        let ok = rs
            .handle(
                KIND_RS_CLAIM,
                serde_json::to_vec(&claim_req(1, 0, vec![1, 2, 3])).unwrap(),
            )
            .await
            .unwrap();
        let r: ClaimReply = serde_json::from_slice(&ok).unwrap();
        assert!(r.granted, "{r:?}");
    }

    /// After a failed sync no append is acknowledged again (a later sync could succeed
    /// without the earlier records having reached the disk), until a restart rescans.
    #[tokio::test]
    async fn a_failed_sync_is_latched() {
        let dir = tempfile::tempdir().unwrap();
        let rs = RecoveryServer::open(dir.path()).unwrap();
        let c = rs.claim(claim_req(1, 0, vec![1, 2])).await.unwrap();
        assert!(c.granted);
        let block = vec![7u8; 4096];
        assert!(rs.append(append_req(1, 1, 0), &block).await.unwrap().stored);
        FAIL_NEXT_SYNC.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = rs.append(append_req(1, 1, 1), &block).await.unwrap_err();
        assert!(e.message.contains("sync failed"), "{e:?}");
        // The next sync would succeed: still refused.
        let e = rs.append(append_req(1, 1, 2), &block).await.unwrap_err();
        assert!(
            e.message.contains("earlier sync of this log failed"),
            "{e:?}"
        );
        drop(rs);
        // A restart rescans the file and takes appends again.
        let rs = RecoveryServer::open(dir.path()).unwrap();
        assert!(rs.append(append_req(1, 1, 3), &block).await.unwrap().stored);
    }

    fn read_req(offset: u64, generation: u64) -> Vec<u8> {
        serde_json::to_vec(&ReadReq {
            volume: "vol0".into(),
            uid: 1,
            offset,
            max_bytes: 1 << 20,
            lbas: None,
            latest: true,
            generation,
        })
        .unwrap()
    }

    /// Reads the whole log as a restore does; `Err` on a refusal.
    async fn restore(rs: &RecoveryServer) -> Result<BTreeMap<u64, u8>, Remote> {
        let (mut offset, mut generation) = (0, 0);
        let mut vol = BTreeMap::new();
        loop {
            let b = rs
                .handle(KIND_RS_READ, read_req(offset, generation))
                .await?;
            let (json, raw) = rpc::unpack(&b).unwrap();
            let rr: ReadReply = serde_json::from_slice(json).unwrap();
            let mut at = 0;
            for w in rr.records {
                vol.insert(w.lba, raw[at]);
                at += w.data_len as usize;
            }
            if rr.done {
                return Ok(vol);
            }
            (offset, generation) = (rr.next, rr.generation);
        }
    }

    /// A log in jeopardy is compacted once it doubled past the threshold: it shrinks to
    /// about one record a block, a restore reads the latest of every block, and a
    /// reader whose log was compacted under it is told to start again (never handed
    /// records at offsets of the old file).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_growing_log_is_compacted_and_readers_start_again() {
        let dir = tempfile::tempdir().unwrap();
        let rs = RecoveryServer::open(dir.path()).unwrap();
        rs.compact_min_bytes
            .store(256 << 10, std::sync::atomic::Ordering::Relaxed);
        assert!(rs.claim(claim_req(1, 0, vec![1, 2])).await.unwrap().granted);
        let mut want = BTreeMap::new();
        // A reader part-way through the log.
        for i in 0..40u64 {
            let b = vec![(i % 200) as u8 + 1; 4096];
            rs.append(append_req(1, 1, i % 8), &b).await.unwrap();
            want.insert(i % 8, b[0]);
        }
        let first = rs.handle(KIND_RS_READ, read_req(0, 0)).await.unwrap();
        let (json, _) = rpc::unpack(&first).unwrap();
        let rr: ReadReply = serde_json::from_slice(json).unwrap();
        let (next, gen) = (rr.next, rr.generation);
        assert!(rr.done);
        for i in 0..400u64 {
            let b = vec![(i % 200) as u8 + 1; 4096];
            rs.append(append_req(1, 1, i % 8), &b).await.unwrap();
            want.insert(i % 8, b[0]);
        }
        // The compaction runs in the background.
        let l = rs.log("vol0", 1).unwrap();
        let t0 = Instant::now();
        while l.log.lock().bytes() > 256 << 10
            || l.compacting.load(std::sync::atomic::Ordering::Acquire)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "never compacted: {} bytes",
                l.log.lock().bytes()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = rs
            .handle(KIND_RS_READ, read_req(next, gen))
            .await
            .unwrap_err();
        assert_eq!(e.code, Refusal::Restart, "{e:?}");
        assert_eq!(restore(&rs).await.unwrap(), want);
        // It survives a restart.
        drop(l);
        drop(rs);
        let rs = RecoveryServer::open(dir.path()).unwrap();
        assert_eq!(restore(&rs).await.unwrap(), want);
        let l = rs.log("vol0", 1).unwrap();
        assert!(l.log.lock().scan.records < 100, "{:?}", l.log.lock().scan);
    }

    /// A restarted recovery server counts a holder's silence from its own start, so a
    /// holder that died while it was down can still be replaced by a base copy.
    #[tokio::test]
    async fn silent_holder_replaceable_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let rs = RecoveryServer::open(dir.path()).unwrap();
        assert!(rs.claim(claim_req(1, 0, vec![1, 2])).await.unwrap().granted);
        drop(rs);
        let rs = RecoveryServer::open(dir.path()).unwrap();
        assert!(rs.state_of("vol0").holder_silent_ms.is_some());
        // At once: the holder may still be serving on a renewal sent before the restart.
        let r = rs.claim(claim_req(2, 1, vec![])).await.unwrap();
        assert!(!r.granted, "{}", r.reason);
        tokio::time::sleep(HOLDER_SILENCE_MAX + Duration::from_millis(50)).await;
        let r = rs.claim(claim_req(2, 1, vec![])).await.unwrap();
        assert!(r.granted, "{}", r.reason);
        assert_eq!(r.coord.holder, Some(2));
        // A copy that was not current when the log began may never take over.
        tokio::time::sleep(HOLDER_SILENCE_MAX + Duration::from_millis(50)).await;
        let r = rs.claim(claim_req(3, 2, vec![])).await.unwrap();
        assert!(!r.granted);
    }
}
