//! Resync: a replica that missed updates (`dead`) catches up with its primary.
//!
//! The replica marks itself `resyncing` (committed), so the primary sends it every new
//! update from then on, and tells the primary it starts (the primary answers once it
//! has applied that state: no update it makes afterwards skips the replica). It then
//! walks its checksum tree against the primary's from the root, fetching a checksum
//! page only under an entry that differs, so the bytes moved follow what changed, not
//! the volume's size. For every slice page whose checksum differs it fetches the
//! primary's page (256 block ids), fetches by id the blocks it does not store (any
//! copy of a content-addressed block will do; each is verified against its id), and
//! maps the differing slots. Updates keep arriving meanwhile: a page is installed only
//! if no update touched it since its fetch began (else it is fetched again), which
//! keeps a stale page image from overwriting a newer update. The replica turns `live`
//! once a pass finds its tree equal to the primary's, or every differing page of a
//! pass installed cleanly (under a steady stream of writes the roots are never equal
//! at one instant; the updates in flight arrive anyway).

use crate::cluster::Cluster;
use lazarus_cluster::raft_store::NodeId;
use lazarus_cluster::{MetaCommand, MetaResponse, ReplicaState, VolumeInfo};
pub use lazarus_rpc::msg::SyncReq;
use lazarus_rpc::{
    self as rpc, RpcClient, KIND_BLOCKS, KIND_FORWARD, KIND_PAGE, KIND_RESYNC_BEGIN, KIND_TREE,
};
use lazarus_store::volume::SlotBits;
use lazarus_store::Volume;
use lazarus_types::{BlockId, Checksum, Lba, BLOCK_SIZE, FANOUT, FANOUT_U64, ID_LEN};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often a node looks for copies of its own that need a resync.
const RESYNC_POLL: Duration = Duration::from_millis(300);
/// Wait after a failed attempt before the next.
const RESYNC_BACKOFF: Duration = Duration::from_secs(1);
const RESYNC_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// A read asked of the primary so that it repairs a block there (`read_through_primary`).
const READ_THROUGH_TIMEOUT: Duration = Duration::from_secs(10);
const READ_THROUGH_ATTEMPTS: u32 = 5;
const READ_THROUGH_BACKOFF: Duration = Duration::from_millis(200);
/// How long the primary waits to see the replica's `resyncing` state applied.
/// Shorter than the RPC deadline, so a replica gets the reason, not a timeout.
const BEGIN_WAIT: Duration = Duration::from_secs(5);
const PASSES_MAX: u32 = 30;
const PAGE_ATTEMPTS_MAX: u32 = 5;
/// Blocks per fetch (1 MiB of data).
const BLOCKS_PER_FETCH: usize = 256;
/// A zero covering more pages than this marks the whole volume touched.
const TOUCH_PAGES_MAX: u64 = 4096;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub state: String,
    pub primary: NodeId,
    pub epoch: u64,
    pub pass: u32,
    pub pages_differing: u64,
    pub pages_copied: u64,
    /// Checksum-tree and slice-page bytes moved (requests and replies).
    pub tree_bytes: u64,
    pub page_bytes: u64,
    /// Block data fetched by id.
    pub block_bytes: u64,
    pub blocks_fetched: u64,
    /// Changed-block records (and bytes) applied from the recovery server first.
    pub restore_records: u64,
    pub restore_bytes: u64,
    pub elapsed_ms: u64,
    pub error: Option<String>,
}

#[derive(Default)]
struct Touch {
    counter: u64,
    vols: HashMap<String, VolTouch>,
}

impl Touch {
    /// The last update counter that touched `page` of `volume` (0: none tracked).
    fn seq(&self, volume: &str, page: u64) -> u64 {
        self.vols.get(volume).map_or(0, |vt| {
            vt.all.max(vt.pages.get(&page).copied().unwrap_or(0))
        })
    }
}

#[derive(Default)]
struct VolTouch {
    all: u64,
    pages: HashMap<u64, u64>,
}

#[derive(Default)]
struct Inner {
    touch: parking_lot::Mutex<Touch>,
    progress: parking_lot::Mutex<BTreeMap<String, Progress>>,
}

/// Per-node resync bookkeeping, shared by the update path and the resync task.
#[derive(Clone, Default)]
pub struct ResyncState(Arc<Inner>);

impl ResyncState {
    /// Records that an update touched `count` blocks from `lba` of `volume` (only
    /// while that volume resyncs). Called before the update is applied.
    pub fn touch(&self, volume: &str, lba: u64, count: u64) {
        let mut t = self.0.touch.lock();
        if count == 0 || !t.vols.contains_key(volume) {
            return;
        }
        t.counter += 1;
        let c = t.counter;
        let vt = t.vols.get_mut(volume).expect("checked above");
        let (first, last) = (lba / FANOUT_U64, (lba + count - 1) / FANOUT_U64);
        if last - first >= TOUCH_PAGES_MAX {
            vt.all = c;
        } else {
            for p in first..=last {
                vt.pages.insert(p, c);
            }
        }
    }

    fn seq(&self, volume: &str, page: u64) -> u64 {
        self.0.touch.lock().seq(volume, page)
    }

    /// Runs `f` under the touch lock if page `page` was not touched since `seen`.
    fn install_if_untouched<T>(
        &self,
        volume: &str,
        page: u64,
        seen: u64,
        f: impl FnOnce() -> T,
    ) -> Option<T> {
        let t = self.0.touch.lock();
        (t.seq(volume, page) == seen).then(f)
    }

    fn track(&self, volume: &str) -> Tracking {
        self.0
            .touch
            .lock()
            .vols
            .insert(volume.to_string(), VolTouch::default());
        Tracking {
            state: self.clone(),
            volume: volume.to_string(),
        }
    }

    fn update(&self, volume: &str, f: impl FnOnce(&mut Progress)) {
        f(self
            .0
            .progress
            .lock()
            .entry(volume.to_string())
            .or_default())
    }

    pub fn progress(&self) -> BTreeMap<String, Progress> {
        self.0.progress.lock().clone()
    }
}

/// Touch tracking of one volume, for the life of its resync.
struct Tracking {
    state: ResyncState,
    volume: String,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.state.0.touch.lock().vols.remove(&self.volume);
    }
}

/// The primary as a resync source.
pub struct Source {
    pub client: Arc<RpcClient>,
    pub req: SyncReq,
    pub state: ResyncState,
}

impl Source {
    pub async fn call(
        &self,
        kind: u8,
        level: usize,
        index: u64,
        raw: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.call_as(&self.req, kind, level, index, raw).await
    }

    async fn call_as(
        &self,
        base: &SyncReq,
        kind: u8,
        level: usize,
        index: u64,
        raw: &[u8],
    ) -> Result<Vec<u8>, String> {
        let req = SyncReq {
            level,
            index,
            ..base.clone()
        };
        let json = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let body = rpc::pack(&json, raw);
        let reply = self.client.call(kind, &body, RESYNC_RPC_TIMEOUT).await?;
        let moved = (body.len() + reply.len()) as u64;
        let m = &*lazarus_observe::metrics::METRICS;
        let l = lazarus_observe::metrics::vol(&self.req.volume);
        if self.req.repair {
            m.repair_bytes.get_or_create(&l).inc_by(moved);
        } else {
            m.resync_bytes.get_or_create(&l).inc_by(moved);
        }
        self.state.update(&self.req.volume, |p| match kind {
            KIND_TREE | KIND_RESYNC_BEGIN => p.tree_bytes += moved,
            KIND_PAGE => p.page_bytes += moved,
            _ => p.block_bytes += moved,
        });
        Ok(reply)
    }

    pub async fn tree(&self, level: usize, group: u64) -> Result<Vec<Checksum>, String> {
        let raw = self.call(KIND_TREE, level, group, &[]).await?;
        if raw.is_empty() || raw.len() % ID_LEN != 0 || raw.len() > FANOUT * ID_LEN {
            return Err(format!("bad checksum group of {} bytes", raw.len()));
        }
        Ok(raw
            .chunks_exact(ID_LEN)
            .map(|c| Checksum(c.try_into().expect("16 bytes")))
            .collect())
    }

    pub async fn page(&self, p: u64) -> Result<Vec<BlockId>, String> {
        let raw = self.call(KIND_PAGE, 0, p, &[]).await?;
        if raw.len() != FANOUT * ID_LEN {
            return Err(format!("bad slice page of {} bytes", raw.len()));
        }
        Ok(raw
            .chunks_exact(ID_LEN)
            .map(|c| BlockId(c.try_into().expect("16 bytes")))
            .collect())
    }

    /// Slice page `p`'s ids and, if it is damaged at the source, its damage (unknown
    /// slots read as zero ids).
    pub async fn page_state(&self, p: u64) -> Result<(Vec<BlockId>, Option<PageDamage>), String> {
        let req = SyncReq {
            damaged_ok: true,
            ..self.req.clone()
        };
        let raw = self.call_as(&req, KIND_PAGE, 0, p, &[]).await?;
        decode_page_state(&raw)
    }

    /// Fetches blocks by id; those the source no longer has are left out. Every block
    /// returned was verified against its id.
    pub async fn blocks(&self, ids: &[BlockId]) -> Result<HashMap<BlockId, Vec<u8>>, String> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(BLOCKS_PER_FETCH) {
            let raw: Vec<u8> = chunk.iter().flat_map(|id| id.0).collect();
            let reply = self.call(KIND_BLOCKS, 0, 0, &raw).await?;
            for (id, b) in chunk.iter().zip(decode_blocks_reply(chunk, &reply)?) {
                if let Some(b) = b {
                    out.insert(*id, b);
                }
            }
            self.state
                .update(&self.req.volume, |p| p.blocks_fetched += out.len() as u64);
        }
        Ok(out)
    }
}

/// Reads blocks by id (`raw`: at most `BLOCKS_PER_FETCH` ids) for another node: a
/// JSON list of which are here intact, then the data of those that are (the reply to
/// `KIND_BLOCKS`, and to a snapshot's blocks).
pub fn read_blocks_by_id(store: &lazarus_store::Store, raw: &[u8]) -> Result<Vec<u8>, String> {
    if !raw.len().is_multiple_of(ID_LEN) || raw.len() / ID_LEN > BLOCKS_PER_FETCH {
        return Err("bad block list".into());
    }
    let mut present = Vec::with_capacity(raw.len() / ID_LEN);
    let mut data = Vec::new();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for c in raw.chunks_exact(ID_LEN) {
        let id = BlockId(c.try_into().expect("16 bytes"));
        let ok = store.read_block(id, &mut buf).map_err(|e| e.to_string())?;
        present.push(ok);
        if ok {
            data.extend_from_slice(&buf);
        }
    }
    let json = serde_json::to_vec(&present).map_err(|e| e.to_string())?;
    Ok(rpc::pack(&json, &data))
}

/// Decodes `read_blocks_by_id`'s reply to a request for `ids`: per id its data, each
/// verified against its id, or `None` where the other node does not have it.
pub fn decode_blocks_reply(ids: &[BlockId], reply: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let (json, data) = rpc::unpack(reply)?;
    let present: Vec<bool> =
        serde_json::from_slice(json).map_err(|e| format!("bad block reply: {e}"))?;
    if present.len() != ids.len()
        || data.len() != present.iter().filter(|p| **p).count() * BLOCK_SIZE
    {
        return Err("block reply does not match its request".into());
    }
    let mut blocks = data.chunks_exact(BLOCK_SIZE).zip(BlockId::hash_each(data));
    let mut out = Vec::with_capacity(ids.len());
    for (id, here) in ids.iter().zip(present) {
        if !here {
            out.push(None);
            continue;
        }
        let (b, got) = blocks.next().expect("length checked");
        if got != *id {
            return Err(format!("block {} sent does not match its id", id.to_hex()));
        }
        out.push(Some(b.to_vec()));
    }
    Ok(out)
}

/// A checksum group (TREE) or a slice page's ids (PAGE) of `local`, as raw bytes: what
/// resync and repair reads return.
pub(crate) fn serve_tree_or_page(
    local: &Volume,
    kind: u8,
    req: &SyncReq,
) -> Result<Vec<u8>, String> {
    if kind == KIND_TREE {
        return local
            .checksum_group(req.level, req.index)
            .map(|g| g.iter().flat_map(|c| c.0).collect())
            .ok_or_else(|| format!("no checksum page {}/{}", req.level, req.index));
    }
    if let Some(ids) = local.page_ids(req.index) {
        return Ok(ids.iter().flat_map(|id| id.0).collect());
    }
    match local.damage_state(req.index) {
        Some((ids, unknown, checksum, before)) if req.damaged_ok => {
            let mut out: Vec<u8> = ids.iter().flat_map(|id| id.0).collect();
            out.extend(unknown.iter().flat_map(|w| w.to_be_bytes()));
            out.extend(checksum.0);
            out.push(before.is_some() as u8);
            out.extend(before.unwrap_or(Checksum::ZERO).0);
            Ok(out)
        }
        _ => Err(format!(
            "slice page {} is damaged here or out of range",
            req.index
        )),
    }
}

/// A damaged page's state as the source answers it (`serve_tree_or_page`): which slots
/// are unknown, its level-1 checksum, and what it hashed to before it was written to
/// since its damage.
pub(crate) type PageDamage = (SlotBits, Checksum, Option<Checksum>);

fn decode_page_state(raw: &[u8]) -> Result<(Vec<BlockId>, Option<PageDamage>), String> {
    let ids_len = FANOUT * ID_LEN;
    let damage_len = FANOUT / 8 + ID_LEN + 1 + ID_LEN;
    if raw.len() != ids_len && raw.len() != ids_len + damage_len {
        return Err(format!("bad slice page of {} bytes", raw.len()));
    }
    let ids = raw[..ids_len]
        .chunks_exact(ID_LEN)
        .map(|c| BlockId(c.try_into().expect("16 bytes")))
        .collect();
    if raw.len() == ids_len {
        return Ok((ids, None));
    }
    let d = &raw[ids_len..];
    let mut unknown: SlotBits = [0; FANOUT / 64];
    for (i, w) in unknown.iter_mut().enumerate() {
        *w = u64::from_be_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    }
    let at = FANOUT / 8;
    let checksum = Checksum(d[at..at + ID_LEN].try_into().expect("16 bytes"));
    let before =
        (d[at + ID_LEN] == 1).then(|| Checksum(d[at + ID_LEN + 1..].try_into().expect("16 bytes")));
    if unknown.iter().all(|w| *w == 0) {
        return Err("a damaged page with no unknown slot".into());
    }
    Ok((ids, Some((unknown, checksum, before))))
}

impl Cluster {
    /// Serves a resync request from a replica (this node is the primary).
    pub(crate) async fn serve_resync(&self, kind: u8, body: &[u8]) -> Result<Vec<u8>, String> {
        let (json, raw) = rpc::unpack(body)?;
        let req: SyncReq = serde_json::from_slice(json).map_err(|e| format!("bad request: {e}"))?;
        if req.repair {
            return self.serve_repair_read(kind, &req, raw).await;
        }
        if self.drops.lock().contains(&req.from) {
            return Err(format!(
                "replication to n{} dropped by fault injection (lazarus fault drop)",
                req.from
            ));
        }
        let primary_at = |meta: &lazarus_cluster::ClusterMeta| -> Result<VolumeInfo, String> {
            let v = meta
                .volumes
                .get(&req.volume)
                .ok_or_else(|| format!("volume {:?} unknown here", req.volume))?;
            if v.primary != self.id || v.epoch != req.epoch {
                return Err(format!(
                    "this node is not the primary of {:?} at epoch {}",
                    req.volume, req.epoch
                ));
            }
            if self.rs_overrides(v) {
                return Err(format!(
                    "the recovery server knows a newer holder of {:?}: not a resync source until the cluster adopts it",
                    req.volume
                ));
            }
            Ok(v.clone())
        };
        let uid = primary_at(&self.store.meta())?.uid;
        let local = self
            .blocks
            .volume(&req.volume)
            .filter(|l| l.meta.uid == uid)
            .ok_or_else(|| format!("no local copy of {:?}", req.volume))?;
        match kind {
            KIND_RESYNC_BEGIN => {
                let t0 = Instant::now();
                loop {
                    let v = primary_at(&self.store.meta())?;
                    // Resyncing as this node acts on the volume too: while it holds the
                    // volume at the recovery server beyond its metadata (no majority),
                    // it sends updates to no other copy, whatever its metadata says,
                    // and a copy resynced from it would miss them (simulator seed 3254).
                    let updated = self
                        .effective(&req.volume)
                        .is_some_and(|e| e.state_of(req.from) == Some(ReplicaState::Resyncing));
                    if v.state_of(req.from) == Some(ReplicaState::Resyncing) && updated {
                        return Ok(Vec::new());
                    }
                    if t0.elapsed() > BEGIN_WAIT {
                        return Err(format!(
                            "n{} is not resyncing {:?} in this node's metadata",
                            req.from, req.volume
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            KIND_TREE | KIND_PAGE => serve_tree_or_page(&local, kind, &req),
            KIND_BLOCKS => self.serve_blocks(raw).await,
            other => Err(format!("unknown resync request {other}")),
        }
    }

    /// Reads blocks by id for another node (`read_blocks_by_id`).
    pub(crate) async fn serve_blocks(&self, raw: &[u8]) -> Result<Vec<u8>, String> {
        let store = self.blocks.clone();
        let raw = raw.to_vec();
        lazarus_rpc::rt::blocking(move || read_blocks_by_id(&store, &raw))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Looks for copies of this node's that are dead or resyncing and resyncs them,
    /// one at a time.
    pub fn resync_loop(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut backoff: HashMap<String, Instant> = HashMap::new();
            let mut last_error: HashMap<String, String> = HashMap::new();
            loop {
                tokio::time::sleep(RESYNC_POLL).await;
                if !c.is_ready() {
                    continue;
                }
                let meta = c.store.meta();
                // An out node's copies are rebuilt elsewhere, not resynced here.
                if meta.out.contains(&c.id) {
                    continue;
                }
                for v in meta.volumes.values() {
                    // Not while this node holds the volume at the recovery server, nor
                    // while the recovery server knows a newer holder than the
                    // metadata (the leader adopts it first).
                    let holds = c.effective(&v.name).is_some_and(|e| e.primary == c.id)
                        || c.claimed_beyond_metadata(&v.name);
                    // A copy moving off this node is dropped, not resynced.
                    if holds || c.rs_overrides(v) || meta.moving.get(&v.name) == Some(&c.id) {
                        continue;
                    }
                    if v.primary == c.id
                        || !matches!(
                            v.state_of(c.id),
                            Some(ReplicaState::Dead | ReplicaState::Resyncing)
                        )
                        || backoff.get(&v.name).is_some_and(|t| Instant::now() < *t)
                    {
                        continue;
                    }
                    let t0 = Instant::now();
                    match c.resync_volume(v).await {
                        Ok(()) => {
                            last_error.remove(&v.name);
                            let p = c.resync.progress().remove(&v.name).unwrap_or_default();
                            tracing::info!(volume = %v.name, primary = v.primary, pages = p.pages_copied, blocks = p.blocks_fetched, tree_bytes = p.tree_bytes, page_bytes = p.page_bytes, block_bytes = p.block_bytes, elapsed_ms = t0.elapsed().as_millis() as u64, "resync done; copy is live");
                        }
                        Err(e) => {
                            if last_error.get(&v.name) != Some(&e) {
                                tracing::warn!(volume = %v.name, primary = v.primary, error = %e, "resync failed; will retry");
                                last_error.insert(v.name.clone(), e.clone());
                            }
                            c.resync.update(&v.name, |p| {
                                p.state = "failed".into();
                                p.error = Some(e);
                            });
                            backoff.insert(v.name.clone(), Instant::now() + RESYNC_BACKOFF);
                        }
                    }
                }
            }
        });
    }

    async fn resync_volume(&self, v: &VolumeInfo) -> Result<(), String> {
        let local = self
            .blocks
            .volume(&v.name)
            .filter(|l| l.meta.uid == v.uid)
            .ok_or("no local copy yet")?;
        if local.size_bytes() < v.size_bytes {
            // Grown while this copy was away: the trees compare only at equal sizes.
            self.grow_local(&v.name, v.size_bytes).await;
            if local.size_bytes() < v.size_bytes {
                return Err("the local copy could not be grown to the volume's size".into());
            }
        }
        let addr = self
            .rpc_addr(v.primary)
            .ok_or("the primary has no address")?;
        self.resync.update(&v.name, |p| {
            // What an earlier, failed attempt restored from the recovery server
            // stays counted.
            let retry = p.state != "done";
            *p = Progress {
                state: "starting".into(),
                primary: v.primary,
                epoch: v.epoch,
                restore_records: if retry { p.restore_records } else { 0 },
                restore_bytes: if retry { p.restore_bytes } else { 0 },
                ..Default::default()
            }
        });
        let src = Source {
            client: self.network.client(&addr),
            req: SyncReq {
                from: self.id,
                volume: v.name.clone(),
                epoch: v.epoch,
                level: 0,
                index: 0,
                repair: false,
                damaged_ok: false,
            },
            state: self.resync.clone(),
        };
        let top = local.level_lens().len() - 1;
        // Reachable, and not cut off by a fault, before changing any state.
        src.tree(top, 0).await?;
        self.replacing_copy(&v.name);
        let _tracking = self.resync.track(&v.name);
        if v.state_of(self.id) == Some(ReplicaState::Dead) {
            // In jeopardy, the writes this copy missed are on the recovery server:
            // apply them from there first (while dead, no update races them), so the
            // Merkle diff against the overloaded last copy moves only what remains.
            let logged = match (&self.recovery, v.recovery_flag) {
                (Some(r), true) => r.fresh_state(&v.name).await,
                _ => None,
            }
            .filter(|s| {
                s.coord.uid == v.uid && s.coord.jeopardy && s.log_bytes > 0 && s.damaged.is_empty()
            });
            if v.recovery_flag && logged.is_some() {
                self.resync.update(&v.name, |p| {
                    p.state = "restoring from the recovery server".into()
                });
                let (records, bytes) = self.restore_from_log(&v.name, v.uid, &local).await?;
                tracing::info!(volume = %v.name, records, bytes, fcid = v.failure_count_id, "rejoin: changed blocks restored from the recovery server");
                lazarus_observe::events::record("restore", &v.name, format!("n{}: {records} changed-block records ({bytes} bytes) restored from the recovery server", self.id));
                self.resync.update(&v.name, |p| {
                    p.restore_records = records;
                    p.restore_bytes = bytes;
                });
            }
            let cmd = MetaCommand::SetReplicaState {
                volume: v.name.clone(),
                node: self.id,
                state: ReplicaState::Resyncing,
                epoch: v.epoch,
                at_ms: 0,
                since: None,
                source: None,
            };
            match self.propose(cmd).await.map_err(|e| e.to_string())? {
                MetaResponse::Volume(_) => {
                    tracing::info!(volume = %v.name, primary = v.primary, "copy is resyncing");
                    // Committed; wait until applied here too.
                    let t0 = Instant::now();
                    while self
                        .store
                        .meta()
                        .volumes
                        .get(&v.name)
                        .and_then(|x| x.state_of(self.id))
                        != Some(ReplicaState::Resyncing)
                        && t0.elapsed() < BEGIN_WAIT
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                other => return Err(format!("cannot start resyncing: {other:?}")),
            }
        }
        // The resync turns the copy live only if it stayed resyncing since now (no
        // other resync took over: meta.rs, `since`).
        let since = self
            .store
            .meta()
            .volumes
            .get(&v.name)
            .filter(|x| x.state_of(self.id) == Some(ReplicaState::Resyncing))
            .and_then(|x| x.resyncing_at.get(&self.id).copied());
        // The primary's process: one that restarts meanwhile may have replaced part
        // of its copy (a restore from the recovery log, writes a crash lost) without
        // an update reaching this copy, so what was compared before no longer holds.
        let incarnation =
            |m: &lazarus_cluster::ClusterMeta| m.nodes.get(&v.primary).map(|n| n.incarnation);
        let source = incarnation(&self.store.meta());
        src.call(KIND_RESYNC_BEGIN, 0, 0, &[]).await?;
        let t0 = Instant::now();
        let mut converged = false;
        let mut previous_clean = false;
        let same_source = |c: &Self| {
            let m = c.store.meta();
            let ok = m.volumes.get(&v.name).is_some_and(|now| {
                now.epoch == v.epoch
                    && now.primary == v.primary
                    && now.state_of(c.id) == Some(ReplicaState::Resyncing)
            });
            ok && incarnation(&m) == source
        };
        for pass in 1..=PASSES_MAX {
            if !same_source(self) {
                return Err(
                    "the volume's primary, its process or this copy's state changed".into(),
                );
            }
            self.resync.update(&v.name, |p| {
                p.state = "walking".into();
                p.pass = pass;
            });
            let mut pages = self.diff(&local, &src, top).await?;
            // A page damaged here is copied whatever its checksum says: a damaged page
            // that took no write since keeps the checksum it had, equal to the
            // primary's, and the diff alone would leave it damaged.
            for (p, _) in local.damaged_pages() {
                if !pages.contains(&p) {
                    pages.push(p);
                }
            }
            self.resync.update(&v.name, |p| {
                p.pages_differing = pages.len() as u64;
                p.state = "copying".into();
                p.elapsed_ms = t0.elapsed().as_millis() as u64;
            });
            if pages.is_empty() {
                converged = true;
                break;
            }
            if previous_clean && pass > 2 {
                // Every page that differed last pass was installed consistently; what
                // differs now is updates in flight, which reach this copy anyway.
                converged = true;
                break;
            }
            let mut clean = true;
            for p in pages {
                clean &= self.copy_page(&local, &src, p).await?;
                self.pace_resync(&v.name, t0).await;
                lazarus_observe::metrics::METRICS
                    .resync_pages
                    .get_or_create(&lazarus_observe::metrics::vol(&v.name))
                    .inc();
                self.resync.update(&v.name, |pr| pr.pages_copied += 1);
            }
            previous_clean = clean;
        }
        if !converged {
            return Err(format!("did not converge in {PASSES_MAX} passes"));
        }
        let store = self.blocks.clone();
        lazarus_rpc::rt::blocking(move || store.flush())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if !same_source(self) {
            return Err("the volume's primary, its process or this copy's state changed".into());
        }
        let cmd = MetaCommand::SetReplicaState {
            volume: v.name.clone(),
            node: self.id,
            state: ReplicaState::Live,
            epoch: v.epoch,
            at_ms: 0,
            since,
            source: source.map(|inc| (v.primary, inc)),
        };
        match self.propose(cmd).await.map_err(|e| e.to_string())? {
            MetaResponse::Volume(nv) => self.record_in(&nv).await,
            other => return Err(format!("cannot turn live: {other:?}")),
        }
        self.resync.update(&v.name, |p| {
            p.state = "done".into();
            p.error = None;
            p.elapsed_ms = t0.elapsed().as_millis() as u64;
        });
        Ok(())
    }

    /// Keeps a resync's block copying under the node's rate (`resync_max_mib_s`), so a
    /// rebuilt copy does not take the cores and links clients need: sleeps until the
    /// bytes fetched since `t0` are within the rate.
    async fn pace_resync(&self, volume: &str, t0: Instant) {
        let Some(rate) = self.resync_rate else {
            return;
        };
        let fetched = self
            .resync
            .progress()
            .get(volume)
            .map_or(0, |p| p.block_bytes + p.page_bytes);
        let due = t0 + Duration::from_secs_f64(fetched as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
    }

    /// Slice pages whose checksum differs from the primary's, found by descending from
    /// the root only into differing entries.
    async fn diff(&self, local: &Volume, src: &Source, top: usize) -> Result<Vec<u64>, String> {
        let mut groups: Vec<u64> = vec![0];
        let mut k = top;
        loop {
            let mut differing = Vec::new();
            for j in groups {
                let theirs = src.tree(k, j).await?;
                let mine = local
                    .checksum_group(k, j)
                    .ok_or_else(|| format!("checksum page {k}/{j} out of range here"))?;
                if mine.len() != theirs.len() {
                    return Err("the primary's checksum tree has another shape".into());
                }
                for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
                    if a != b {
                        differing.push(j * FANOUT_U64 + i as u64);
                    }
                }
            }
            if k == 0 || differing.is_empty() {
                return Ok(differing);
            }
            groups = differing;
            k -= 1;
        }
    }

    /// Copies slice page `p` from the primary. `Ok(false)` when updates kept touching
    /// it (the next pass looks again).
    /// Reads, through the primary, one block of page `p` per id the primary did not
    /// supply twice running: a block damaged in the primary's store (it fails its
    /// checksum) is missing there until a read repairs it from another copy, and a
    /// resync asking for it by id alone would never converge (simulator seed 909
    /// with device and disk faults).
    async fn repair_at_primary(
        &self,
        volume: &str,
        p: u64,
        runs: &[(usize, usize)],
        theirs: &[BlockId],
        need: &[BlockId],
        supplied: &HashMap<BlockId, Vec<u8>>,
    ) {
        let missing: HashSet<BlockId> = need
            .iter()
            .filter(|id| !supplied.contains_key(id))
            .copied()
            .collect();
        let mut asked = HashSet::new();
        for (a, n) in runs {
            for (s, id) in theirs.iter().enumerate().skip(*a).take(*n) {
                if !missing.contains(id) || !asked.insert(*id) {
                    continue;
                }
                let lba = p * FANOUT_U64 + s as u64;
                self.read_through_primary(
                    volume,
                    lba,
                    "a block the primary could not supply for a resync",
                )
                .await;
            }
        }
    }

    /// Reads block `lba` of `volume` through its primary, whose read repairs what it
    /// finds damaged there (or lists it unrecoverable); the data is not used.
    async fn read_through_primary(&self, volume: &str, lba: u64, why: &str) {
        let req = lazarus_rpc::msg::ForwardReq {
            volume: volume.to_string(),
            op: lazarus_rpc::msg::Op::Read,
            offset: lba * BLOCK_SIZE as u64,
            length: BLOCK_SIZE as u64,
            fua: false,
            no_hole: false,
            fence: None,
            uid: 0,
        };
        let once = || async {
            let json = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            let body = rpc::pack(&json, &[]);
            let primary = self
                .effective(volume)
                .map(|v| v.primary)
                .ok_or("no such volume")?;
            let reply = if primary == self.id {
                self.ask_front(KIND_FORWARD, body).await?
            } else {
                let addr = self
                    .rpc_addr(primary)
                    .ok_or("the primary's address is unknown")?;
                self.network
                    .client(&addr)
                    .call(KIND_FORWARD, &body, READ_THROUGH_TIMEOUT)
                    .await
                    .map_err(String::from)?
            };
            let (json, _) = rpc::unpack(&reply)?;
            let r: lazarus_rpc::msg::ForwardReply =
                serde_json::from_slice(json).map_err(|e| format!("bad forward reply: {e}"))?;
            if r.errno == 0 {
                Ok(())
            } else {
                Err(r.message)
            }
        };
        // A primary failing over meanwhile: asked again, as a forwarded read would be.
        let mut r = once().await;
        for _ in 1..READ_THROUGH_ATTEMPTS {
            if r.is_ok() {
                break;
            }
            tokio::time::sleep(READ_THROUGH_BACKOFF).await;
            r = once().await;
        }
        tracing::info!(volume, lba, result = ?r, "{why}: read through the primary (which repairs it there)");
    }

    async fn copy_page(&self, local: &Arc<Volume>, src: &Source, p: u64) -> Result<bool, String> {
        let name = local.meta.name.clone();
        // Blocks this store holds whose content no longer verifies (bit rot): fetched
        // like missing ones, and written over the bad copy (`Store::write_ids`). An
        // index that still locates them must not stop the page from ever installing
        // (simulator seed 6468: a copy resynced for ever).
        let mut rotten: HashSet<BlockId> = HashSet::new();
        for attempt in 0..PAGE_ATTEMPTS_MAX {
            let seen = self.resync.seq(&name, p);
            let (theirs, damage) = src.page_state(p).await?;
            // Damaged at the primary too (unrecoverable there): already mirrored here?
            if let Some((unknown, checksum, _)) = &damage {
                let same = local
                    .damage_state(p)
                    .is_some_and(|(ids, u, c, _)| ids == theirs && u == *unknown && c == *checksum);
                // (A restart forgot that this damage came from the primary.)
                if same && local.mark_mirrored(p) {
                    return Ok(true);
                }
                // Found damaged there just now, perhaps, and not repaired yet: a read
                // through the primary repairs it first (from any copy that proves
                // current); only damage that outlives it is taken on here (simulator
                // seed 2105 with device and disk faults: a copy took damage the
                // primary repaired a moment later, was promoted, and read zeroes for a
                // flushed block after a restart).
                if attempt == 0 {
                    let slot = (0..FANOUT).find(|s| unknown[s / 64] & (1 << (s % 64)) != 0);
                    if let Some(s) = slot {
                        self.read_through_primary(
                            &name,
                            p * FANOUT_U64 + s as u64,
                            "a page damaged at the primary",
                        )
                        .await;
                        continue;
                    }
                }
            }
            let mine = local.page_ids(p);
            let differs = |s: usize| mine.as_ref().is_none_or(|m| m[s] != theirs[s]);
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for s in 0..FANOUT {
                if !differs(s) {
                    continue;
                }
                match runs.last_mut() {
                    Some((a, n)) if *a + *n == s => *n += 1,
                    _ => runs.push((s, 1)),
                }
            }
            if runs.is_empty() && damage.is_none() {
                return Ok(true);
            }
            let mut need: Vec<BlockId> = Vec::new();
            let mut seen_ids = HashSet::new();
            for (a, n) in &runs {
                for id in &theirs[*a..*a + *n] {
                    if !id.is_zero()
                        && (!self.blocks.has_block(*id) || rotten.contains(id))
                        && seen_ids.insert(*id)
                    {
                        need.push(*id);
                    }
                }
            }
            let supplied = src.blocks(&need).await?;
            if supplied.len() < need.len() {
                // Overwritten on the primary since the page was read: read it again.
                // Or damaged there (a block that fails its checksum): a read at the
                // primary repairs it from another copy, or lists it unrecoverable.
                if attempt > 0 {
                    self.repair_at_primary(&name, p, &runs, &theirs, &need, &supplied)
                        .await;
                }
                continue;
            }
            let (store, vol, resync, name2) = (
                self.blocks.clone(),
                local.clone(),
                self.resync.clone(),
                name.clone(),
            );
            let bad = std::sync::Arc::new(parking_lot::Mutex::new(None));
            let bad2 = bad.clone();
            // The blocks of the runs taken from this store, to check all of them once
            // one fails: a damaged stretch of slots holds several.
            let held: Vec<BlockId> = runs
                .iter()
                .flat_map(|(a, n)| theirs[*a..*a + *n].iter().copied())
                .filter(|id| !id.is_zero() && !supplied.contains_key(id))
                .collect();
            let installed = lazarus_rpc::rt::blocking(move || {
                resync.install_if_untouched(&name2, p, seen, || -> Result<bool, String> {
                    if let Some((unknown, _, _)) = &damage {
                        vol.persist_damage_ahead(p, *unknown)
                            .map_err(|e| e.to_string())?;
                    }
                    for (a, n) in runs {
                        let lba = Lba(p * FANOUT_U64 + a as u64);
                        match store.write_ids(&vol, lba, &theirs[a..a + n], &supplied) {
                            Ok(None) => {}
                            Ok(Some(id)) => {
                                *bad2.lock() = Some(id);
                                return Ok(false);
                            }
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    // The primary cannot serve some slots of this page (damaged and
                    // unrecoverable there): they are unknown here too, and the copies
                    // agree on the page's checksum.
                    if let Some((unknown, checksum, before)) = damage {
                        vol.adopt_damage(p, unknown, checksum, before)
                            .map_err(|e| e.to_string())?;
                        tracing::warn!(volume = %vol.meta.name, page = p, "slice page damaged at the primary: its unrecoverable slots are unknown on this copy too");
                    }
                    Ok(true)
                })
            })
            .await
            .map_err(|e| e.to_string())?;
            let first_bad = bad.lock().take();
            if let Some(id) = first_bad {
                rotten.insert(id);
                let store = self.blocks.clone();
                let more = lazarus_rpc::rt::blocking(move || {
                    let mut buf = vec![0u8; lazarus_types::BLOCK_SIZE];
                    held.into_iter()
                        .filter(|id| !matches!(store.read_block(*id, &mut buf), Ok(true)))
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                rotten.extend(more);
            }
            match installed {
                Some(Ok(true)) => return Ok(true),
                Some(Err(e)) => return Err(e),
                Some(Ok(false)) | None => continue,
            }
        }
        Ok(false)
    }
}

impl Cluster {
    /// Serves a repair read from a primary: checksum groups, pages and blocks of this
    /// node's copy, whatever its state (dead copies serve repairs).
    pub(crate) async fn serve_repair_read(
        &self,
        kind: u8,
        req: &SyncReq,
        raw: &[u8],
    ) -> Result<Vec<u8>, String> {
        if kind == KIND_BLOCKS {
            return self.serve_blocks(raw).await;
        }
        let meta = self.store.meta();
        let uid = meta.volumes.get(&req.volume).map(|v| v.uid);
        let local = self
            .blocks
            .volume(&req.volume)
            .filter(|l| uid.is_none_or(|u| u == l.meta.uid))
            .ok_or_else(|| format!("no copy of {:?} here", req.volume))?;
        match kind {
            KIND_TREE | KIND_PAGE => serve_tree_or_page(&local, kind, req),
            other => Err(format!("unknown repair request {other}")),
        }
    }
}
