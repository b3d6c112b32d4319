//! Repair of a primary's damaged slice pages (DESIGN.md, "Repair order"; the patent on
//! slice-file recovery from dead replicas, FIG. 4-7).
//!
//! For a damaged page the primary tries, in order:
//! 1. each live replica: its page, accepted if it hashes to the page's recorded
//!    checksum (or, if the page was partly rewritten since, if it agrees with every
//!    slot the primary still knows);
//! 2. each dead (or resyncing) replica: walking down from the root along the path to
//!    the page, comparing the replica's checksum at each level with the primary's
//!    recorded one; an equal entry proves the whole subtree, the page included, current
//!    on that replica. The page is then fetched and accepted only if it hashes to the
//!    recorded checksum. Different pages may come from different replicas (the union).
//! 3. otherwise the page stays unrecoverable: its unknown LBAs answer EIO, are listed
//!    in status, counted and logged. (The recovery server's log comes with the
//!    Last-failure-domain issue.)
//!
//! Blocks a repaired page maps but this node lacks are fetched by id from the source,
//! then from any other node, each verified against its id. Filling the page's unknown
//! slots happens under the page's write locks, so a client write meanwhile wins.

use crate::engine::Engine;
use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::ReplicaState;
use lazarus_node::cluster::Cluster;
use lazarus_node::resync::{ResyncState, Source, SyncReq};
use lazarus_store::Volume;
use lazarus_types::{BlockId, Checksum, BLOCK_SIZE, FANOUT_U64};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A read waits this long for the repair of its page, then answers EIO.
const REPAIR_DEADLINE: Duration = Duration::from_secs(10);
/// An unrecoverable page is not tried again by reads for this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
const EVENTS_KEPT: usize = 200;

#[derive(Debug, Clone, Serialize)]
pub struct RepairEvent {
    pub volume: String,
    /// The slice page repaired (absent for a block).
    pub page: Option<u64>,
    pub first_lba: Option<u64>,
    /// "live n2", "dead n3", or "unrecoverable".
    pub source: String,
    pub unix_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairCounters {
    pub from_live: u64,
    pub from_dead: u64,
    /// Rebuilt from a dead replica's stale page plus the recovery server's log.
    pub from_recovery: u64,
    pub unrecoverable: u64,
    pub rejected_copies: u64,
    pub blocks_restored: u64,
}

#[derive(Default)]
struct Inner {
    lock: tokio::sync::Mutex<()>,
    counters: parking_lot::Mutex<BTreeMap<String, RepairCounters>>,
    events: parking_lot::Mutex<VecDeque<RepairEvent>>,
    /// Pages found unrecoverable: when, and the view of the volume's copies then
    /// (`sources_view`). Retried after `RETRY_AFTER`, or at once when a copy changed
    /// state (a dead one came back to resync, a new primary): a source may be there now.
    failed_at: parking_lot::Mutex<HashMap<(String, u64), (Instant, u64)>>,
    bytes: ResyncState,
    scrub: parking_lot::Mutex<ScrubProgress>,
    /// Pages checked by the running scrub (read without the lock, page by page).
    scrub_done: std::sync::atomic::AtomicU64,
}

/// The running (or last) scrub on this node, for `GET /api/v1/scrub`, the CLI's
/// progress bar and the dashboard.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubProgress {
    pub running: bool,
    /// Started by `lazarus scrub` (false: the paced background scrubber).
    pub requested: bool,
    /// "pages", "blocks", "repair" while running; "done" after.
    pub phase: String,
    pub volume: String,
    /// Slice and checksum pages checked, of `pages_total`.
    pub pages_done: u64,
    pub pages_total: u64,
    pub started_unix_ms: u64,
    pub elapsed_ms: u64,
    pub runs: u64,
}

#[derive(Clone, Default)]
pub struct RepairState(Arc<Inner>);

impl RepairState {
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "counters": *self.0.counters.lock(),
            "events": self.0.events.lock().iter().cloned().collect::<Vec<_>>(),
            "bytes": self.0.bytes.progress(),
        })
    }

    pub fn scrub_progress(&self) -> ScrubProgress {
        let mut p = self.0.scrub.lock().clone();
        if p.running {
            p.pages_done = self.0.scrub_done.load(std::sync::atomic::Ordering::Relaxed);
            let now = lazarus_io::rt::unix_ms();
            p.elapsed_ms = now.saturating_sub(p.started_unix_ms);
        }
        p
    }

    fn scrub_phase(&self, phase: &str, volume: &str) {
        let mut p = self.0.scrub.lock();
        p.phase = phase.to_string();
        p.volume = volume.to_string();
    }

    fn record(&self, volume: &str, page: Option<u64>, source: &str) {
        lazarus_observe::metrics::METRICS
            .repairs
            .get_or_create(&lazarus_observe::metrics::SourceLabels {
                volume: volume.to_string(),
                source: source.split(' ').next().unwrap_or("?").to_string(),
            })
            .inc();
        let mut c = self.0.counters.lock();
        let e = c.entry(volume.to_string()).or_default();
        match source.split(' ').next() {
            Some("live") => e.from_live += 1,
            Some("dead") => e.from_dead += 1,
            Some("recovery") => e.from_recovery += 1,
            Some("block") => e.blocks_restored += 1,
            _ => e.unrecoverable += 1,
        }
        drop(c);
        let mut ev = self.0.events.lock();
        if ev.len() == EVENTS_KEPT {
            ev.pop_front();
        }
        ev.push_back(RepairEvent {
            volume: volume.to_string(),
            page,
            first_lba: page.map(|p| p * FANOUT_U64),
            source: source.to_string(),
            unix_ms: lazarus_io::rt::unix_ms(),
        });
    }

    fn rejected(&self, volume: &str) {
        self.0
            .counters
            .lock()
            .entry(volume.to_string())
            .or_default()
            .rejected_copies += 1;
    }
}

/// Outcome of repairing one stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRepair {
    Repaired,
    /// Every other node hosting the volume answered: none holds it intact.
    Lost,
    /// Not repaired, and some node could not be asked.
    Unknown,
}

/// Outcome of repairing one page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    AlreadyWhole,
    Repaired(String),
    Unrecoverable,
}

impl Engine {
    /// A read that repairs what it finds damaged (a slice page, a block) before it is
    /// answered (bounded), then reads again; still damaged answers EIO, never wrong
    /// data. Reads of other pages never wait for it.
    pub async fn read_repairing(
        &self,
        vol: &Volume,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), crate::engine::IoError> {
        let mut r = self.read_into(vol, offset, out);
        // This primary's lease lapsed for a moment, before or during the read: read
        // again once it holds one at the same epoch.
        if r.is_err() && !self.serves_locally(vol) && self.serving(vol).await.is_ok() {
            r = self.read_into(vol, offset, out);
        }
        for _ in 0..4 {
            let fixed = match &r {
                Err(crate::engine::IoError {
                    damaged_page: Some(p),
                    ..
                }) => self.repair_before_read(vol, *p).await,
                Err(crate::engine::IoError {
                    damaged_block: Some(id),
                    ..
                }) => match self.repair_block_or_lost(&vol.meta.name, *id).await {
                    BlockRepair::Repaired => true,
                    BlockRepair::Lost => {
                        self.declare_lost(vol, offset, out.len() as u64, *id).await
                    }
                    BlockRepair::Unknown => false,
                },
                _ => break,
            };
            if !fixed {
                break;
            }
            r = self.read_into(vol, offset, out);
        }
        r
    }

    /// On the volume's primary: the slots of this read that map a block no copy holds
    /// intact become unknown (`Volume::mark_lost`): listed unrecoverable, handed on by
    /// resyncs, which otherwise would wait for that block for ever (simulator seed 909
    /// with device and disk faults: one lost block kept every other copy resyncing).
    /// Returns true if the block was found in the recovery server's log after all (the
    /// read tries again).
    async fn declare_lost(&self, vol: &Volume, offset: u64, len: u64, id: BlockId) -> bool {
        let Some(c) = self.cluster.get().cloned() else {
            return false;
        };
        let Some(v) = c.store.meta().volumes.get(&vol.meta.name).cloned() else {
            return false;
        };
        if v.primary != c.id {
            return false;
        }
        let bs = lazarus_types::BLOCK_SIZE as u64;
        let first = offset / bs;
        let end = (offset + len).div_ceil(bs);
        // In jeopardy the recovery server's log may hold it (a write the other copies
        // never got): a logged write of these LBAs whose data hashes to the id.
        match c.logged_changes(&v.name, v.uid, first, end).await {
            Some(changes) => {
                for (kind, lba, count, data) in &changes {
                    if *kind != lazarus_recovery::log::RecordKind::Write {
                        continue;
                    }
                    for k in 0..*count as usize {
                        let b = &data[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
                        if BlockId::of(b) != id {
                            continue;
                        }
                        let store = self.store.clone();
                        let b = b.to_vec();
                        if let Ok(Ok(_)) =
                            lazarus_rpc::rt::blocking(move || store.restore_block(id, &b)).await
                        {
                            tracing::info!(volume = %v.name, lba = lba + k as u64, id = %id.to_hex(), "corrupt block repaired from the recovery server's log");
                            self.repair.record(
                                &v.name,
                                None,
                                &format!("block {} from the recovery log", id.to_hex()),
                            );
                            return true;
                        }
                    }
                }
            }
            // In jeopardy and the log cannot be read now: not lost for sure.
            None if v.recovery_flag => return false,
            None => {}
        }
        match vol.mark_lost(lazarus_types::Lba(first), end - first, id) {
            Ok(lbas) if !lbas.is_empty() => {
                tracing::error!(volume = %vol.meta.name, ?lbas, id = %id.to_hex(), "a stored block failed its checksum and no copy holds it: its blocks are unrecoverable (EIO, listed) until written again");
                self.repair.record(
                    &vol.meta.name,
                    None,
                    &format!(
                        "block {} lost on every copy: LBAs {lbas:?} unrecoverable",
                        id.to_hex()
                    ),
                );
                // The page's new checksum on disk now, with the damage list: a crash
                // before the next checkpoint would otherwise pair the list with the
                // whole page's checksum.
                let store = self.store.clone();
                if let Ok(Err(e)) = lazarus_rpc::rt::blocking(move || store.checkpoint()).await {
                    tracing::warn!(volume = %vol.meta.name, error = %e, "checkpoint after a lost block failed");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(volume = %vol.meta.name, error = %e, "a lost block not recorded as damage")
            }
        }
        false
    }

    /// For a read that hit damaged page `p`: repairs it if this node is the volume's
    /// primary in a cluster, within `REPAIR_DEADLINE`. True if the page is whole now.
    pub async fn repair_before_read(&self, vol: &Volume, p: u64) -> bool {
        if self.cluster.get().is_none() {
            return false;
        }
        if self.failed_recently(&vol.meta.name, p) {
            return false;
        }
        match tokio::time::timeout(REPAIR_DEADLINE, self.repair_page(vol, p)).await {
            Ok(Outcome::AlreadyWhole | Outcome::Repaired(_)) => true,
            Ok(Outcome::Unrecoverable) => false,
            Err(_) => {
                tracing::warn!(volume = %vol.meta.name, page = p, "repair did not finish before the read's deadline");
                false
            }
        }
    }

    /// Whether page `p` of `volume` was found unrecoverable less than `RETRY_AFTER`
    /// ago, with the volume's copies as they are now.
    fn failed_recently(&self, volume: &str, p: u64) -> bool {
        let Some((at, view)) = self
            .repair
            .0
            .failed_at
            .lock()
            .get(&(volume.to_string(), p))
            .copied()
        else {
            return false;
        };
        let now = self
            .cluster
            .get()
            .and_then(|c| c.store.meta().volumes.get(volume).map(sources_view));
        at.elapsed() < RETRY_AFTER && now == Some(view)
    }

    /// Repairs damaged page `p` of `vol` (this node must be its primary).
    pub async fn repair_page(&self, vol: &Volume, p: u64) -> Outcome {
        let Some(c) = self.cluster.get().cloned() else {
            return Outcome::Unrecoverable;
        };
        let _one_at_a_time = self.repair.0.lock.lock().await;
        if vol.unknown_slots(p).is_none() {
            return Outcome::AlreadyWhole;
        }
        let name = vol.meta.name.clone();
        // 0. This copy's own disk, read again: a read error may have passed.
        if lazarus_rpc::rt::block_in_place(|| vol.reread_damaged_page(p)) {
            return self.done(&name, p, "this node's disk, read again".into());
        }
        let meta = c.store.meta();
        let Some(v) = meta.volumes.get(&name).cloned() else {
            return Outcome::Unrecoverable;
        };
        let expected = vol.recorded_checksum(p);
        let others: Vec<NodeId> = v.replicas.iter().copied().filter(|n| *n != c.id).collect();
        // 1. Live replicas.
        for n in others.iter().copied() {
            if v.state_of(n) != Some(ReplicaState::Live) {
                continue;
            }
            let src = self.repair_source(&c, n, &name, v.epoch);
            let Ok(ids) = src.page(p).await else { continue };
            if !self.acceptable(vol, p, &ids, expected) {
                tracing::warn!(volume = %name, page = p, replica = n, "live replica's page does not match what the primary recorded; rejected");
                self.repair.rejected(&name);
                continue;
            }
            if self.install(&c, vol, p, &ids, n, &others).await {
                return self.done(&name, p, format!("live n{n}"));
            }
        }
        // 2. Dead replicas, proven current by the checksum tree.
        if let Some(expected) = expected {
            for n in others.iter().copied() {
                if !matches!(
                    v.state_of(n),
                    Some(ReplicaState::Dead | ReplicaState::Resyncing)
                ) {
                    continue;
                }
                let src = self.repair_source(&c, n, &name, v.epoch);
                match self.proves_current(vol, &src, p).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::debug!(volume = %name, page = p, replica = n, error = %e, "dead replica unreachable for repair");
                        continue;
                    }
                }
                let Ok(ids) = src.page(p).await else {
                    // Its checksum says current, but it cannot produce the page (damaged
                    // there too): rejected, next source.
                    tracing::warn!(volume = %name, page = p, replica = n, "dead replica proves the page current but cannot serve it; next source");
                    self.repair.rejected(&name);
                    continue;
                };
                if page_checksum(&ids) != expected {
                    // Its tree says current but the page itself is damaged: next source.
                    tracing::warn!(volume = %name, page = p, replica = n, "dead replica's page does not hash to its checksum; rejected");
                    self.repair.rejected(&name);
                    continue;
                }
                if self.install(&c, vol, p, &ids, n, &others).await {
                    return self.done(&name, p, format!("dead n{n}"));
                }
            }
        }
        // 2b. The page was written to since its damage was found: a dead replica whose
        //     page still hashes to the page as it was then took no update of it since,
        //     and its unknown slots are current (nothing was written to them). The
        //     slots written since stay as they are here (`repair_slots` fills unknown
        //     slots only).
        if let Some(before) = vol.checksum_before_rewrites(p) {
            for n in others.iter().copied() {
                if v.state_of(n) == Some(ReplicaState::Live) {
                    continue;
                }
                let src = self.repair_source(&c, n, &name, v.epoch);
                let Ok(ids) = src.page(p).await else { continue };
                if page_checksum(&ids) != before {
                    continue;
                }
                if self.install(&c, vol, p, &ids, n, &others).await {
                    return self.done(
                        &name,
                        p,
                        format!("dead n{n}, as the page was before its writes since the damage"),
                    );
                }
            }
        }
        // 3. A dead replica's stale page plus the recovery server's logged writes to
        //    the page's LBAs, accepted only if the result hashes to the recorded
        //    checksum.
        if let Some(expected) = expected {
            let first = p * FANOUT_U64;
            if let Some(changes) = c
                .logged_changes(&name, v.uid, first, first + FANOUT_U64)
                .await
            {
                for n in others.iter().copied() {
                    if v.state_of(n) == Some(ReplicaState::Live) {
                        continue;
                    }
                    let src = self.repair_source(&c, n, &name, v.epoch);
                    let Ok(mut ids) = src.page(p).await else {
                        continue;
                    };
                    let mut supplied: HashMap<BlockId, Vec<u8>> = HashMap::new();
                    for (kind, lba, count, data) in &changes {
                        for k in 0..*count {
                            let l = lba + k;
                            if l < first || l >= first + FANOUT_U64 {
                                continue;
                            }
                            let slot = (l - first) as usize;
                            ids[slot] = match kind {
                                lazarus_recovery::log::RecordKind::Write => {
                                    let b = &data
                                        [(k as usize) * BLOCK_SIZE..(k as usize + 1) * BLOCK_SIZE];
                                    let id = BlockId::of(b);
                                    if !id.is_zero() {
                                        supplied.insert(id, b.to_vec());
                                    }
                                    id
                                }
                                lazarus_recovery::log::RecordKind::Zero => BlockId::ZERO,
                                lazarus_recovery::log::RecordKind::ZeroProvision => {
                                    BlockId::hash_of(&[0u8; BLOCK_SIZE])
                                }
                            };
                        }
                    }
                    if page_checksum(&ids) != expected {
                        tracing::info!(volume = %name, page = p, replica = n, records = changes.len(), "dead replica's page plus the recovery log does not hash to the recorded checksum");
                        continue;
                    }
                    if self
                        .install_with(&c, vol, p, &ids, n, &others, supplied)
                        .await
                    {
                        return self.done(&name, p, format!("recovery server + dead n{n}"));
                    }
                }
            }
        }
        tracing::error!(volume = %name, page = p, first_lba = p * FANOUT_U64, "damaged slice page is unrecoverable: no live or dead copy proves current; its LBAs answer EIO");
        self.repair
            .0
            .failed_at
            .lock()
            .insert((name.clone(), p), (Instant::now(), sources_view(&v)));
        self.repair.record(&name, Some(p), "unrecoverable");
        Outcome::Unrecoverable
    }

    fn done(&self, volume: &str, p: u64, source: String) -> Outcome {
        tracing::info!(volume, page = p, source = %source, "damaged slice page repaired");
        self.repair
            .0
            .failed_at
            .lock()
            .remove(&(volume.to_string(), p));
        self.repair.record(volume, Some(p), &source);
        Outcome::Repaired(source)
    }

    fn repair_source(&self, c: &Cluster, n: NodeId, volume: &str, epoch: u64) -> Source {
        Source {
            client: c.network.client(&c.rpc_addr(n).unwrap_or_default()),
            req: SyncReq {
                from: c.id,
                volume: volume.to_string(),
                epoch,
                level: 0,
                index: 0,
                repair: true,
                damaged_ok: false,
            },
            state: self.repair.0.bytes.clone(),
        }
    }

    /// Whether `ids` may fill damaged page `p`: it hashes to the recorded checksum, or
    /// (the page was written since the damage) it agrees with every known slot.
    fn acceptable(
        &self,
        vol: &Volume,
        p: u64,
        ids: &[BlockId],
        expected: Option<Checksum>,
    ) -> bool {
        if let Some(e) = expected {
            return page_checksum(ids) == e;
        }
        let unknown: HashSet<usize> = vol
            .unknown_slots(p)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let known = vol.page_ids_partial(p);
        (0..ids.len()).all(|s| unknown.contains(&s) || known[s] == ids[s])
    }

    /// Walks from the root down the path to page `p`, comparing the replica's checksum
    /// with this node's recorded one at each level: equal at any level proves the page
    /// current there.
    async fn proves_current(&self, vol: &Volume, src: &Source, p: u64) -> Result<bool, String> {
        let top = vol.level_lens().len() - 1;
        for k in (0..=top).rev() {
            let idx = p / FANOUT_U64.pow(k as u32);
            let group = idx / FANOUT_U64;
            let slot = (idx % FANOUT_U64) as usize;
            let theirs = src.tree(k, group).await?;
            let mine = vol
                .checksum_group(k, group)
                .ok_or("checksum group out of range")?;
            match (theirs.get(slot), mine.get(slot)) {
                (Some(a), Some(b)) if a == b => return Ok(true),
                (Some(_), Some(_)) => {}
                _ => return Err("checksum trees of another shape".into()),
            }
        }
        Ok(false)
    }

    /// Fetches what the page needs and fills its unknown slots under its write locks.
    async fn install(
        &self,
        c: &Cluster,
        vol: &Volume,
        p: u64,
        ids: &[BlockId],
        from: NodeId,
        others: &[NodeId],
    ) -> bool {
        self.install_with(c, vol, p, ids, from, others, HashMap::new())
            .await
    }

    /// `install`, with some blocks already at hand (from the recovery server's log).
    #[allow(clippy::too_many_arguments)]
    async fn install_with(
        &self,
        c: &Cluster,
        vol: &Volume,
        p: u64,
        ids: &[BlockId],
        from: NodeId,
        others: &[NodeId],
        mut supplied: HashMap<BlockId, Vec<u8>>,
    ) -> bool {
        supplied.retain(|id, data| BlockId::of(data) == *id);
        let unknown = vol.unknown_slots(p).unwrap_or_default();
        let mut need: Vec<BlockId> = Vec::new();
        let mut seen = HashSet::new();
        for s in unknown {
            let id = ids[s];
            if !id.is_zero() && !self.store.has_block(id) && seen.insert(id) {
                need.push(id);
            }
        }
        let order = std::iter::once(from).chain(others.iter().copied().filter(|n| *n != from));
        for n in order {
            let missing: Vec<BlockId> = need
                .iter()
                .copied()
                .filter(|id| !supplied.contains_key(id))
                .collect();
            if missing.is_empty() {
                break;
            }
            let src = self.repair_source(c, n, &vol.meta.name, 0);
            if let Ok(got) = src.blocks(&missing).await {
                supplied.extend(got);
            }
        }
        if need.iter().any(|id| !supplied.contains_key(id)) {
            tracing::warn!(volume = %vol.meta.name, page = p, "blocks of the repaired page are on no reachable node");
            return false;
        }
        let first = p * FANOUT_U64;
        let _g = self.lock_blocks(first, first + FANOUT_U64 - 1).await;
        let store = self.store.clone();
        let r = lazarus_rpc::rt::block_in_place(|| store.repair_slots(vol, p, ids, &supplied));
        match r {
            Ok(Ok(_)) => true,
            Ok(Err(id)) => {
                tracing::warn!(volume = %vol.meta.name, page = p, id = %id.to_hex(), "a block vanished while repairing");
                false
            }
            Err(e) => {
                tracing::error!(volume = %vol.meta.name, page = p, error = %e, "repair could not write");
                false
            }
        }
    }

    /// Restores a stored block that failed verification, fetched by id from any other
    /// node (live or dead copy) and accepted only if it hashes to the id.
    pub async fn repair_block(&self, volume: &str, id: BlockId) -> bool {
        self.repair_block_or_lost(volume, id).await == BlockRepair::Repaired
    }

    /// `repair_block`, telling a block no other node holds (every node hosting the
    /// volume answered) from one some node could not be asked for.
    pub async fn repair_block_or_lost(&self, volume: &str, id: BlockId) -> BlockRepair {
        let Some(c) = self.cluster.get().cloned() else {
            return BlockRepair::Unknown;
        };
        let hosts: HashSet<NodeId> = c
            .store
            .meta()
            .volumes
            .get(volume)
            .map(|v| v.replicas.iter().copied().collect())
            .unwrap_or_default();
        let mut unasked = hosts
            .len()
            .saturating_sub(usize::from(hosts.contains(&c.id)));
        let mut restore_failed = false;
        let meta = c.store.meta();
        let mut nodes: Vec<NodeId> = meta
            .volumes
            .get(volume)
            .map(|v| v.replicas.clone())
            .unwrap_or_default();
        nodes.extend(meta.nodes.keys().copied());
        let mut seen = HashSet::new();
        for n in nodes {
            if n == c.id || !seen.insert(n) {
                continue;
            }
            let src = self.repair_source(&c, n, volume, 0);
            let Ok(got) = src.blocks(&[id]).await else {
                continue;
            };
            if hosts.contains(&n) {
                unasked -= 1;
            }
            let Some(data) = got.get(&id) else { continue };
            let store = self.store.clone();
            let data = data.clone();
            match lazarus_rpc::rt::blocking(move || store.restore_block(id, &data)).await {
                Ok(Ok(true)) => {
                    self.repair
                        .record(volume, None, &format!("block {} from n{n}", id.to_hex()));
                    tracing::info!(volume, id = %id.to_hex(), source = n, "corrupt block repaired");
                    return BlockRepair::Repaired;
                }
                // No longer stored here: the read retries.
                Ok(Ok(false)) => return BlockRepair::Repaired,
                // Found, but not written here: not lost.
                _ => {
                    restore_failed = true;
                    continue;
                }
            }
        }
        tracing::error!(volume, id = %id.to_hex(), every_host_answered = unasked == 0, "corrupt block found on no other node");
        if unasked == 0 && !restore_failed {
            BlockRepair::Lost
        } else {
            BlockRepair::Unknown
        }
    }

    /// Repairs every damaged page of `vol` now; returns (page, outcome) pairs.
    pub async fn repair_volume(&self, vol: &Volume) -> Vec<(u64, Outcome)> {
        let mut out = Vec::new();
        for (p, _) in vol.damaged_pages() {
            out.push((p, self.repair_page(vol, p).await));
        }
        out
    }
}

fn page_checksum(ids: &[BlockId]) -> Checksum {
    Checksum::of_page(&lazarus_store::volume::encode_page(ids))
}

/// How often the background repairer looks for known-damaged pages to repair.
const BACKGROUND_REPAIR_INTERVAL: Duration = Duration::from_secs(5);
/// How often the background scrubber walks every page and block of this node.
const SCRUB_INTERVAL: Duration = Duration::from_secs(600);
/// Background scrub pace: a pause after every batch of pages (about 25 MiB/s of slice
/// pages at most), so it never competes with client I/O for long.
const SCRUB_BATCH_PAGES: u64 = 64;
const SCRUB_PACE: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubReport {
    pub volume: String,
    pub slice_pages_checked: u64,
    /// On-disk slice pages that no longer hashed to their checksum (rewritten from the
    /// verified copy in memory, or marked damaged when there was none).
    pub slice_pages_bad: u64,
    pub checksum_pages_checked: u64,
    pub checksum_pages_rebuilt: u64,
    /// Damaged pages and what became of them ("live n2", "dead n3", "unrecoverable").
    pub repairs: Vec<(u64, String)>,
}

impl Engine {
    /// Scrubs this node's copies (all, or one volume): every slice page and checksum
    /// page on disk, every stored block (corrupt ones re-fetched by id from another
    /// node), then repairs the damaged pages of volumes this node is primary of.
    pub async fn scrub(&self, only: Option<&str>) -> serde_json::Value {
        self.scrub_paced(only, None).await
    }

    /// `scrub`, pausing `pace` after every `SCRUB_BATCH_PAGES` pages (the background
    /// scrubber's rate limit; `lazarus scrub` runs at full speed).
    pub async fn scrub_paced(
        &self,
        only: Option<&str>,
        pace: Option<Duration>,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        let mut reports = Vec::new();
        let vols: Vec<_> = self
            .store
            .volumes()
            .into_iter()
            .filter(|v| only.is_none_or(|n| n == v.meta.name))
            .collect();
        {
            let total = vols
                .iter()
                .map(|v| v.page_count() + v.checksum_pages_per_level().iter().sum::<u64>())
                .sum();
            let mut p = self.repair.0.scrub.lock();
            *p = ScrubProgress {
                running: true,
                requested: pace.is_none(),
                phase: "pages".into(),
                pages_total: total,
                started_unix_ms: lazarus_io::rt::unix_ms(),
                runs: p.runs + 1,
                ..Default::default()
            };
            self.repair
                .0
                .scrub_done
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        for vol in vols {
            self.repair.scrub_phase("pages", &vol.meta.name);
            let mut r = ScrubReport {
                volume: vol.meta.name.clone(),
                ..Default::default()
            };
            let v = vol.clone();
            let state = self.repair.clone();
            let (slice, ck) = lazarus_rpc::rt::blocking(move || {
                let tick = || {
                    state
                        .0
                        .scrub_done
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                };
                let mut s = (0u64, 0u64);
                for p in 0..v.page_count() {
                    tick();
                    s.0 += 1;
                    if v.scrub_slice_page(p).unwrap_or(false) {
                        s.1 += 1;
                    }
                    if let Some(d) = pace.filter(|_| p % SCRUB_BATCH_PAGES == SCRUB_BATCH_PAGES - 1)
                    {
                        std::thread::sleep(d);
                    }
                }
                let mut c = (0u64, 0u64);
                for (k, n) in v.checksum_pages_per_level().into_iter().enumerate() {
                    for j in 0..n {
                        tick();
                        c.0 += 1;
                        if v.scrub_checksum_page(k, j).unwrap_or(false) {
                            c.1 += 1;
                        }
                    }
                }
                (s, c)
            })
            .await
            .unwrap_or_default();
            (r.slice_pages_checked, r.slice_pages_bad) = slice;
            (r.checksum_pages_checked, r.checksum_pages_rebuilt) = ck;
            if self.primary_epoch(&vol.meta.name).is_some() {
                self.repair.scrub_phase("repair", &vol.meta.name);
                for (p, o) in self.repair_volume(&vol).await {
                    let s = match o {
                        Outcome::AlreadyWhole => "whole".to_string(),
                        Outcome::Repaired(s) => s,
                        Outcome::Unrecoverable => "unrecoverable".to_string(),
                    };
                    r.repairs.push((p, s));
                }
            }
            reports.push(r);
        }
        self.repair.scrub_phase("blocks", "");
        let store = self.store.clone();
        let bad = lazarus_rpc::rt::blocking(move || store.verify_blocks(10_000))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let mut restored = 0;
        let any_volume = self
            .store
            .volumes()
            .first()
            .map(|v| v.meta.name.clone())
            .unwrap_or_default();
        for id in &bad {
            if self.repair_block(&any_volume, *id).await {
                restored += 1;
            }
        }
        if !bad.is_empty()
            || reports
                .iter()
                .any(|r| r.slice_pages_bad + r.checksum_pages_rebuilt > 0)
        {
            tracing::warn!(
                blocks_bad = bad.len(),
                blocks_restored = restored,
                "scrub found damage"
            );
        }
        {
            let mut p = self.repair.0.scrub.lock();
            p.running = false;
            p.phase = "done".into();
            p.volume.clear();
            p.pages_done = self
                .repair
                .0
                .scrub_done
                .load(std::sync::atomic::Ordering::Relaxed);
            p.elapsed_ms = t0.elapsed().as_millis() as u64;
        }
        serde_json::json!({
            "volumes": reports,
            "blocks_bad": bad.len(),
            "blocks_restored": restored,
            "elapsed_ms": t0.elapsed().as_millis() as u64,
        })
    }

    /// Background: repairs known-damaged pages of the volumes this node is primary of
    /// (nobody has to read them first), and scrubs everything every `SCRUB_INTERVAL`.
    /// This node's live copy of `volume` (not its primary's) has damaged pages: it is
    /// marked dead (stale: it lacks what the pages held) so that it resyncs, and does
    /// not count as a failure domain meanwhile.
    async fn resync_damaged_replica(&self, volume: &str) {
        let Some(c) = self.cluster.get().cloned() else {
            return;
        };
        let Some(v) = c.store.meta().volumes.get(volume).cloned() else {
            return;
        };
        if v.primary == c.id || v.state_of(c.id) != Some(ReplicaState::Live) {
            return;
        }
        let cmd = lazarus_cluster::MetaCommand::SetReplicaState {
            volume: volume.to_string(),
            node: c.id,
            state: ReplicaState::Dead,
            epoch: v.epoch,
            at_ms: lazarus_io::rt::unix_ms().max(1),
            since: None,
            source: None,
        };
        match c.propose(cmd).await {
            Ok(lazarus_cluster::MetaResponse::Volume(_)) => {
                tracing::warn!(volume, "this copy has damaged slice pages: marked dead until it resyncs them from the primary");
            }
            other => {
                tracing::warn!(volume, result = ?other.map_err(|e| e.to_string()), "could not mark this damaged copy dead");
            }
        }
    }

    /// Whether the primary has repaired a page whose damage this live replica took
    /// from it in a resync (`Volume::adopt_damage`): this copy then resyncs the page.
    async fn mirrored_pages_whole_at_primary(&self, vol: &Volume) -> bool {
        let mirrored = vol.mirrored_pages();
        let Some(c) = self.cluster.get().cloned() else {
            return false;
        };
        if mirrored.is_empty() {
            return false;
        }
        let Some(v) = c.store.meta().volumes.get(&vol.meta.name).cloned() else {
            return false;
        };
        if v.primary == c.id || v.state_of(c.id) != Some(ReplicaState::Live) {
            return false;
        }
        let src = self.repair_source(&c, v.primary, &vol.meta.name, v.epoch);
        for p in mirrored {
            if let Ok((_, None)) = src.page_state(p).await {
                tracing::info!(volume = %vol.meta.name, page = p, primary = v.primary, "the primary repaired a page this copy took as damaged from it");
                return true;
            }
        }
        false
    }

    pub fn background_repair(self: &Arc<Self>) {
        let e = self.clone();
        tokio::spawn(async move {
            let mut last_scrub = Instant::now();
            loop {
                tokio::time::sleep(BACKGROUND_REPAIR_INTERVAL).await;
                if last_scrub.elapsed() >= SCRUB_INTERVAL {
                    last_scrub = Instant::now();
                    e.scrub_paced(None, Some(SCRUB_PACE)).await;
                    continue;
                }
                for vol in e.store.volumes() {
                    if e.primary_epoch(&vol.meta.name).is_none() {
                        // A live replica with damaged pages is no whole copy: it turns
                        // dead and resyncs, which copies its damaged pages from the
                        // primary (pages damaged at the primary too, whose damage it
                        // took from there, are as current as the primary's).
                        if !vol.own_damaged_pages().is_empty()
                            || e.mirrored_pages_whole_at_primary(&vol).await
                        {
                            e.resync_damaged_replica(&vol.meta.name).await;
                        }
                        continue;
                    }
                    for (p, _) in vol.damaged_pages() {
                        if !e.failed_recently(&vol.meta.name, p) {
                            e.repair_page(&vol, p).await;
                        }
                    }
                }
            }
        });
    }
}

/// What decides which sources a repair can use: the volume's primary and epoch, each
/// copy's state, and its jeopardy (the recovery server's log).
fn sources_view(v: &lazarus_cluster::VolumeInfo) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        v.uid,
        v.primary,
        v.epoch,
        v.failure_count_id,
        v.recovery_flag,
    )
        .hash(&mut h);
    for n in &v.replicas {
        (n, v.state_of(*n).map(|s| format!("{s:?}"))).hash(&mut h);
    }
    h.finish()
}
