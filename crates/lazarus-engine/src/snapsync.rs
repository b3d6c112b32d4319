//! Snapshots follow their volume's copies. A copy that was down, dead or not yet
//! built when a snapshot was taken has no such snapshot; once it is live again (or
//! rebuilt on another node), it installs the snapshot from a copy that has it: the
//! snapshot's page checksums (its file), then only the pages it cannot read from its
//! own volume or page blocks, then only the blocks those pages name that it does not
//! store, each verified against its checksum or id (`Store::install_snapshot`). A
//! snapshot thus survives the loss of any node its volume survives, not just of the
//! nodes live when it was taken.
//!
//! The same loop removes what a copy kept of a snapshot the cluster no longer names
//! (it missed the deletion): once the snapshot is older than a grace period, so a
//! snapshot being taken (on the copies before the metadata records it) is left alone.

use crate::engine::{Engine, IoError};
use lazarus_cluster::ReplicaState;
use lazarus_nbd::consts::EIO;
use lazarus_node::cluster::Cluster;
use lazarus_store::volume::{decode_page, encode_page};
use lazarus_store::{Allocation, Snapshot};
use lazarus_types::{BlockId, Checksum, BLOCK_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often a node compares its copies' snapshots with the metadata's.
const POLL: Duration = Duration::from_secs(2);
/// Wait after a failed installation before the next attempt.
const BACKOFF: Duration = Duration::from_secs(5);
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// A client's read through another node waits this long for each node asked.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A snapshot the metadata does not name is removed only once this old: a snapshot
/// being taken exists on the copies before the metadata records it.
const ZOMBIE_GRACE_SECS: u64 = 120;
/// `ZOMBIE_GRACE_SECS`, or `LAZARUS_SNAPSHOT_GRACE_SECS` (tests).
fn zombie_grace_secs() -> u64 {
    std::env::var("LAZARUS_SNAPSHOT_GRACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ZOMBIE_GRACE_SECS)
}

/// The snapshot file is fetched in parts of this many bytes (16 MiB: 24 bytes per
/// mapped slice page, so one part for a volume of up to 700 GiB mapped), whatever
/// its size: a frame holds at most 64 MiB.
const FILE_PART_BYTES: u32 = 16 << 20;
/// `FILE_PART_BYTES`, or `LAZARUS_SNAPSHOT_FILE_PART_BYTES` (tests: many parts).
fn file_part_bytes() -> u32 {
    std::env::var("LAZARUS_SNAPSHOT_FILE_PART_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| (1..=FILE_PART_BYTES).contains(n))
        .unwrap_or(FILE_PART_BYTES)
}

/// Pages per request (256 KiB of page data).
const PAGES_PER_FETCH: usize = 64;
/// Blocks per request (1 MiB of data).
const BLOCKS_PER_FETCH: usize = 256;
/// Attempts at an installation whose pages the volume keeps changing.
const INSTALL_ATTEMPTS: usize = 4;

/// A request for (part of) a snapshot another copy holds (`KIND_SNAPSHOT_FETCH`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFetch {
    pub volume: String,
    pub name: String,
    /// The id the metadata records: a copy whose snapshot has another refuses.
    pub id: u64,
    pub what: FetchWhat,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum FetchWhat {
    /// The snapshot's file (`Snapshot::encode`): its page checksums, root and CRC.
    /// (Nodes of this version ask for `FilePart`s; a node of an older one answers
    /// only this, and only for files that fit a frame.)
    File,
    /// Bytes `offset..offset + length` of the snapshot's file (fewer at its end).
    FilePart { offset: u64, length: u32 },
    /// Slice pages of the snapshot, 4 KiB each, in the order asked.
    Pages(Vec<u64>),
    /// Blocks by id (the ids follow the request's JSON): a JSON list of which are
    /// present, then their data.
    Blocks,
    /// Bytes `offset..offset + length` of the snapshot: a node without a copy serving
    /// it over NBD.
    Read { offset: u64, length: u32 },
    /// The snapshot's allocation from block `first`, over `count` blocks, in at most
    /// `max` runs: a JSON list of (blocks, 0 data | 1 hole | 2 zero).
    Allocation { first: u64, count: u64, max: usize },
}

/// How a copy answers for a snapshot it does not hold under the id asked, or that its
/// metadata does not name.
const NOT_HERE: &str = "no such snapshot named here";

/// The largest `FetchWhat::Read` (the NBD front end's largest request).
const READ_MAX: u32 = lazarus_nbd::PAYLOAD_MAX_BYTES;
/// The most runs a `FetchWhat::Allocation` reply holds.
const RUNS_MAX: usize = 4096;

fn allocation_code(a: Allocation) -> u8 {
    match a {
        Allocation::Data => 0,
        Allocation::Hole => 1,
        Allocation::Zero => 2,
    }
}

fn allocation_of_code(c: u8) -> Result<Allocation, String> {
    match c {
        0 => Ok(Allocation::Data),
        1 => Ok(Allocation::Hole),
        2 => Ok(Allocation::Zero),
        other => Err(format!("bad allocation code {other}")),
    }
}

impl SnapshotFetch {
    fn with(&self, what: FetchWhat) -> SnapshotFetch {
        SnapshotFetch {
            what,
            ..self.clone()
        }
    }
}

fn label(n: u64) -> String {
    format!("n{n}")
}

impl Engine {
    /// Starts the loop that installs missed snapshots and removes deleted ones.
    pub fn snapshot_sync_loop(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff: HashMap<(String, String), Instant> = HashMap::new();
            loop {
                tokio::time::sleep(POLL).await;
                let Some(e) = weak.upgrade() else { return };
                let Some(c) = e.cluster.get().cloned() else {
                    continue;
                };
                if !c.is_ready() || e.store.has_failed() {
                    continue;
                }
                e.sync_snapshots(&c, &mut backoff).await;
            }
        });
    }

    async fn sync_snapshots(
        &self,
        c: &Arc<Cluster>,
        backoff: &mut HashMap<(String, String), Instant>,
    ) {
        let meta = c.store.meta();
        // Errors only of snapshots still named and still missing here.
        self.snapshot_sync_errors.lock().retain(|k, _| {
            k.split_once('@').is_some_and(|(vol, name)| {
                meta.volumes
                    .get(vol)
                    .is_some_and(|v| v.snapshots.contains_key(name))
                    && self
                        .store
                        .volume(vol)
                        .is_none_or(|l| l.snapshot(name).is_none())
            })
        });
        let now_unix = (lazarus_io::rt::wall_clock_nanos() / 1_000_000_000) as u64;
        let grace = zombie_grace_secs();
        for v in meta.volumes.values() {
            let Some(local) = self.store.volume(&v.name).filter(|l| l.meta.uid == v.uid) else {
                continue;
            };
            if v.state_of(c.id) != Some(ReplicaState::Live) {
                continue;
            }
            // The other copies, the primary first: where missing snapshot pages come from.
            let sources: Vec<u64> = std::iter::once(v.primary)
                .chain(v.replicas.iter().copied())
                .filter(|n| *n != c.id)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for s in local.snapshots() {
                if v.snapshots.get(&s.name) == Some(&s.id)
                    || now_unix.saturating_sub(s.created_unix) < grace
                    || !self.confirm_zombie(c, &v.name, &s).await
                {
                    continue;
                }
                let (store, vol, name, id) =
                    (self.store.clone(), v.name.clone(), s.name.clone(), s.id);
                let r = lazarus_rpc::rt::blocking(move || {
                    store.delete_snapshot_if(&vol, &name, |s| s.id == id)
                })
                .await;
                match r {
                    Ok(Ok(())) => {
                        tracing::info!(volume = %v.name, snapshot = %s.name, id = s.id, "removed a snapshot the cluster no longer names (this copy missed its deletion)")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(volume = %v.name, snapshot = %s.name, error = %e, "cannot remove a snapshot the cluster no longer names")
                    }
                    Err(e) => tracing::warn!(error = %e, "snapshot removal did not run"),
                }
            }
            // Pages of a snapshot held here that this copy can no longer read (lost
            // to damage before it kept them): fetched from the copies that have them.
            for s in local.snapshots() {
                if v.snapshots.get(&s.name) != Some(&s.id) {
                    continue;
                }
                let key = (v.name.clone(), format!("{}#pages", s.name));
                if backoff.get(&key).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                let (store, vol, snap) = (self.store.clone(), v.name.clone(), s.clone());
                let lost = lazarus_rpc::rt::blocking(move || {
                    store.snapshot_pages_unavailable(&vol, &snap.l1, &HashSet::new())
                })
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
                if lost.is_empty() {
                    continue;
                }
                match self
                    .heal_snapshot_pages(c, &sources, &v.name, &s, &lost)
                    .await
                {
                    Ok(n) => {
                        tracing::info!(volume = %v.name, snapshot = %s.name, pages = n, "snapshot pages this copy had lost fetched from another copy");
                        backoff.remove(&key);
                    }
                    Err(e) => {
                        // Said once, until they are fetched (a page lost everywhere
                        // stays so, its reads errors).
                        if backoff.insert(key, Instant::now() + BACKOFF).is_none() {
                            tracing::warn!(volume = %v.name, snapshot = %s.name, pages = lost.len(), error = %e, "snapshot pages this copy lost cannot be fetched yet; will retry");
                        }
                    }
                }
            }
            for (name, id) in &v.snapshots {
                if local.snapshot(name).is_some()
                    || local.failed_snapshots().iter().any(|(n, _)| n == name)
                {
                    continue;
                }
                let key = (v.name.clone(), name.clone());
                if backoff.get(&key).is_some_and(|t| Instant::now() < *t) {
                    continue;
                }
                let r = self.install_from(c, &sources, &v.name, name, *id).await;
                let which = format!("{}@{name}", v.name);
                match r {
                    Ok((s, used)) => {
                        let from: Vec<String> = used.iter().map(|n| label(*n)).collect();
                        tracing::info!(volume = %v.name, snapshot = %name, sources = ?from, mapped_pages = s.mapped_pages(), "snapshot installed from other copies (this copy missed it)");
                        backoff.remove(&key);
                        self.snapshot_sync_errors.lock().remove(&which);
                    }
                    Err(e) => {
                        let mut errs = self.snapshot_sync_errors.lock();
                        if errs.get(&which) != Some(&e) {
                            tracing::warn!(volume = %v.name, snapshot = %name, error = %e, "this copy misses a snapshot and cannot install it yet; will retry");
                            errs.insert(which, e);
                        }
                        backoff.insert(key, Instant::now() + BACKOFF);
                    }
                }
            }
        }
    }

    /// Snapshots this node's copies miss and cannot install yet: `VOLUME@NAME` -> why
    /// (every copy asked; "lacks block": the copies that have it lost a block of it,
    /// which it then reads as an error, and no copy can be given it whole).
    pub fn snapshot_sync_errors(&self) -> std::collections::BTreeMap<String, String> {
        self.snapshot_sync_errors.lock().clone()
    }

    /// Whether this copy's snapshot `s` of `volume` is a leftover the cluster no
    /// longer names: this node's metadata as it is now does not name it under its id,
    /// and no other copy that answers holds it under that id with its metadata naming
    /// it (this node's metadata may lag, after a partition), while at least one
    /// answers.
    async fn confirm_zombie(&self, c: &Arc<Cluster>, volume: &str, s: &Snapshot) -> bool {
        let meta = c.store.meta();
        let Some(v) = meta.volumes.get(volume) else {
            return false;
        };
        if v.snapshots.get(&s.name) == Some(&s.id) {
            return false;
        }
        let req = SnapshotFetch {
            volume: volume.to_string(),
            name: s.name.clone(),
            id: s.id,
            what: FetchWhat::FilePart {
                offset: 0,
                length: 0,
            },
        };
        let mut answered = false;
        for n in v.replicas.iter().copied().filter(|n| *n != c.id) {
            match self.fetch(c, n, &req, &[]).await {
                Ok(_) => return false,
                Err(e) if e.contains(NOT_HERE) => answered = true,
                Err(_) => {}
            }
        }
        answered
    }

    async fn fetch(
        &self,
        c: &Arc<Cluster>,
        node: u64,
        req: &SnapshotFetch,
        raw: &[u8],
    ) -> Result<Vec<u8>, String> {
        let addr = c.rpc_addr(node).ok_or("no address known")?;
        let json = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let body = lazarus_rpc::pack(&json, raw);
        let timeout = match req.what {
            FetchWhat::Read { .. } | FetchWhat::Allocation { .. } => READ_TIMEOUT,
            _ => RPC_TIMEOUT,
        };
        let reply = c
            .network
            .client(&addr)
            .call(lazarus_rpc::KIND_SNAPSHOT_FETCH, &body, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if matches!(
            req.what,
            FetchWhat::File | FetchWhat::FilePart { .. } | FetchWhat::Pages(_) | FetchWhat::Blocks
        ) {
            let m = &*lazarus_observe::metrics::METRICS;
            m.resync_bytes
                .get_or_create(&lazarus_observe::metrics::vol(&req.volume))
                .inc_by((body.len() + reply.len()) as u64);
        }
        Ok(reply)
    }

    /// The snapshot file `req` names, from `node`, part by part (a node of an older
    /// version, which knows no parts, is asked for it whole).
    async fn fetch_file(
        &self,
        c: &Arc<Cluster>,
        node: u64,
        req: &SnapshotFetch,
    ) -> Result<Vec<u8>, String> {
        let part = file_part_bytes();
        let mut file = Vec::new();
        loop {
            let what = FetchWhat::FilePart {
                offset: file.len() as u64,
                length: part,
            };
            let got = match self.fetch(c, node, &req.with(what), &[]).await {
                Ok(b) => b,
                Err(e) if file.is_empty() && e.contains("unknown variant") => {
                    return self.fetch(c, node, &req.with(FetchWhat::File), &[]).await
                }
                Err(e) => return Err(e),
            };
            let last = got.len() < part as usize;
            file.extend_from_slice(&got);
            if last {
                return Ok(file);
            }
        }
    }

    /// Installs snapshot `name` (`id`) of `volume` from the copies on `sources`: its
    /// file from the first that sends it, and each page and block from the first that
    /// has it whole. Two copies may each have lost a different page of it (a device
    /// error on each); together they still hold all of it (simulator seed 6491).
    /// Returns the snapshot and the copies it took anything from.
    async fn install_from(
        &self,
        c: &Arc<Cluster>,
        sources: &[u64],
        volume: &str,
        name: &str,
        id: u64,
    ) -> Result<(Arc<Snapshot>, Vec<u64>), String> {
        let req = SnapshotFetch {
            volume: volume.to_string(),
            name: name.to_string(),
            id,
            what: FetchWhat::File,
        };
        let mut errors = Vec::new();
        let mut snap = None;
        for &n in sources {
            let r = self.fetch_file(c, n, &req).await.and_then(|file| {
                let s = Snapshot::decode(&file, Default::default())
                    .map_err(|e| format!("its snapshot file does not verify: {e}"))?;
                if s.id != id || s.name != name {
                    return Err("it sent another snapshot than the one asked for".to_string());
                }
                Ok(s)
            });
            match r {
                Ok(s) => {
                    snap = Some((s, n));
                    break;
                }
                Err(e) => errors.push(format!("{}: {e}", label(n))),
            }
        }
        let Some((snap, from)) = snap else {
            return Err(errors.join("; "));
        };
        let mut staged: Vec<Checksum> = Vec::new();
        let mut used = vec![from];
        let r = self
            .stage_and_install(c, sources, &snap, &req, &mut staged, &mut used)
            .await;
        if r.is_err() && !staged.is_empty() {
            let store = self.store.clone();
            let _ = lazarus_rpc::rt::blocking(move || store.unstage_snapshot_pages(&staged)).await;
        }
        r.map(|s| (s, used))
    }

    /// Pages `ask` of the snapshot from the first source that sends them all, else
    /// each from the first that sends it (and verifies against `want`).
    async fn fetch_pages(
        &self,
        c: &Arc<Cluster>,
        sources: &[u64],
        req: &SnapshotFetch,
        ask: &[(u64, Checksum)],
        used: &mut Vec<u64>,
    ) -> Result<Vec<Vec<u8>>, String> {
        let verified = |raw: Vec<u8>, ask: &[(u64, Checksum)]| -> Result<Vec<Vec<u8>>, String> {
            if raw.len() != ask.len() * BLOCK_SIZE {
                return Err("page reply does not match its request".into());
            }
            raw.chunks_exact(BLOCK_SIZE)
                .zip(ask)
                .map(|(pg, (p, ck))| {
                    if Checksum::of_page(pg) == *ck {
                        Ok(pg.to_vec())
                    } else {
                        Err(format!("page {p} of the snapshot does not verify"))
                    }
                })
                .collect()
        };
        let pages =
            |ask: &[(u64, Checksum)]| FetchWhat::Pages(ask.iter().map(|(p, _)| *p).collect());
        let mut errors = Vec::new();
        // Copies that answered but lacked a page (not ones that did not answer).
        let mut partial = Vec::new();
        for &n in sources {
            let r = self.fetch(c, n, &req.with(pages(ask)), &[]).await;
            let fetched = r.is_ok();
            match r.and_then(|raw| verified(raw, ask)) {
                Ok(v) => {
                    if !used.contains(&n) {
                        used.push(n);
                    }
                    return Ok(v);
                }
                Err(e) => {
                    if fetched || e.contains("cannot be read here") {
                        partial.push(n);
                    }
                    errors.push(format!("{}: {e}", label(n)));
                }
            }
        }
        if ask.len() == 1 || partial.len() < 2 {
            return Err(errors.join("; "));
        }
        // No copy sent them all: page by page, from the copies that have some.
        let mut out = Vec::with_capacity(ask.len());
        for one in ask.chunks(1) {
            let mut got = None;
            let mut errors = Vec::new();
            for &n in &partial {
                let r = self.fetch(c, n, &req.with(pages(one)), &[]).await;
                match r.and_then(|raw| verified(raw, one)) {
                    Ok(mut v) => {
                        if !used.contains(&n) {
                            used.push(n);
                        }
                        got = v.pop();
                        break;
                    }
                    Err(e) => errors.push(format!("{}: {e}", label(n))),
                }
            }
            out.push(got.ok_or_else(|| errors.join("; "))?);
        }
        Ok(out)
    }

    async fn stage_and_install(
        &self,
        c: &Arc<Cluster>,
        sources: &[u64],
        snap: &Snapshot,
        req: &SnapshotFetch,
        staged: &mut Vec<Checksum>,
        used: &mut Vec<u64>,
    ) -> Result<Arc<Snapshot>, String> {
        let volume = req.volume.clone();
        for _ in 0..INSTALL_ATTEMPTS {
            let set: HashSet<Checksum> = staged.iter().copied().collect();
            let mut need: Vec<(u64, Checksum)> = Vec::new();
            let mut seen = set.clone();
            for p in self
                .store
                .snapshot_pages_unavailable(&volume, &snap.l1, &set)
                .map_err(|e| e.to_string())?
            {
                let c = snap.l1[p as usize];
                if seen.insert(c) {
                    need.push((p, c));
                }
            }
            for chunk in need.chunks(PAGES_PER_FETCH) {
                self.stage_pages(c, sources, req, chunk, staged, used)
                    .await?;
            }
            let store = self.store.clone();
            let (vol, s) = (volume.clone(), snap.clone());
            let st = staged.clone();
            let r = lazarus_rpc::rt::blocking(move || store.install_snapshot(&vol, &s, &st))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            match r {
                Ok(s) => return Ok(s),
                Err(missing) => {
                    tracing::debug!(volume = %volume, snapshot = %snap.name, pages = missing.len(), "pages changed during a snapshot's installation; fetching them");
                }
            }
        }
        Err("the volume kept changing the pages the snapshot needs".into())
    }

    /// Stages pages `chunk` of the snapshot `req` names (`stage_snapshot_page`): each
    /// read from a page block this store holds, else fetched from `sources`, with the
    /// blocks they name that this store lacks. The staged checksums are added to
    /// `staged` as they are (their references are the caller's).
    async fn stage_pages(
        &self,
        c: &Arc<Cluster>,
        sources: &[u64],
        req: &SnapshotFetch,
        chunk: &[(u64, Checksum)],
        staged: &mut Vec<Checksum>,
        used: &mut Vec<u64>,
    ) -> Result<(), String> {
        // A page block this store holds already (another volume's snapshot,
        // or an earlier attempt's) is read here, not fetched.
        let mut pages: Vec<Option<Vec<u8>>> = chunk
            .iter()
            .map(|(_, c)| self.store.page_block(*c))
            .collect();
        let ask: Vec<(u64, Checksum)> = chunk
            .iter()
            .zip(&pages)
            .filter(|(_, have)| have.is_none())
            .map(|(pc, _)| *pc)
            .collect();
        if !ask.is_empty() {
            let mut got = self
                .fetch_pages(c, sources, req, &ask, used)
                .await?
                .into_iter();
            for slot in pages.iter_mut().filter(|s| s.is_none()) {
                *slot = Some(got.next().expect("one page per page asked"));
            }
        }
        // The blocks these pages name that this store lacks.
        let mut want: Vec<BlockId> = Vec::new();
        let mut wanted: HashSet<BlockId> = HashSet::new();
        for ((p, ck), page) in chunk.iter().zip(&pages) {
            let page = page.as_ref().expect("filled");
            if Checksum::of_page(page) != *ck {
                return Err(format!("page {p} of the snapshot does not verify"));
            }
            for id in decode_page(page).iter() {
                if !self.store.has_block(*id) && wanted.insert(*id) {
                    want.push(*id);
                }
            }
        }
        let data = self.fetch_blocks(c, sources, req, &want, used).await?;
        let store = self.store.clone();
        let chunk = chunk.to_vec();
        let staged_now = lazarus_rpc::rt::blocking(move || {
            let mut done = Vec::new();
            for ((_, ck), page) in chunk.iter().zip(pages) {
                match store.stage_snapshot_page(*ck, &page.expect("filled"), &data) {
                    Ok(()) => done.push(*ck),
                    Err(e) => return (done, Err(e.to_string())),
                }
            }
            (done, Ok(()))
        })
        .await
        .map_err(|e| e.to_string())?;
        staged.extend(staged_now.0);
        staged_now.1
    }

    /// Pages `lost` of snapshot `snap`, which this copy holds but can no longer read
    /// (damaged before it kept them as page blocks: the volume's page changed since),
    /// fetched from the copies that have them and taken into the snapshot. Whether
    /// they all were.
    async fn heal_snapshot_pages(
        &self,
        c: &Arc<Cluster>,
        sources: &[u64],
        volume: &str,
        snap: &Snapshot,
        lost: &[u64],
    ) -> Result<usize, String> {
        let req = SnapshotFetch {
            volume: volume.to_string(),
            name: snap.name.clone(),
            id: snap.id,
            what: FetchWhat::File,
        };
        let mut need: Vec<(u64, Checksum)> = Vec::new();
        let mut seen = HashSet::new();
        for p in lost {
            if let Some(c) = snap.l1.get(*p as usize).filter(|c| seen.insert(**c)) {
                need.push((*p, *c));
            }
        }
        let (mut staged, mut used) = (Vec::new(), Vec::new());
        let mut r = Ok(());
        for chunk in need.chunks(PAGES_PER_FETCH) {
            r = self
                .stage_pages(c, sources, &req, chunk, &mut staged, &mut used)
                .await;
            if r.is_err() {
                break;
            }
        }
        let store = self.store.clone();
        let (vol, id, all) = (volume.to_string(), snap.id, staged.clone());
        let release = lazarus_rpc::rt::blocking(move || {
            let release = store.hold_snapshot_pages(&vol, id, &all);
            store.unstage_snapshot_pages(&release);
            release
        })
        .await
        .map_err(|e| e.to_string())?;
        r?;
        Ok(staged.len() - release.len())
    }

    /// Blocks `ids` of the snapshot, each from the first source that has it whole (a
    /// reply's block is checked against its id by `decode_blocks_reply`). A copy
    /// whose reply for a batch failed (a device error on one block fails the batch) is
    /// asked again block by block for what no copy sent. "Lacks block" is said only
    /// of a block every copy answered it does not have (the simulator's heal check
    /// counts on it).
    async fn fetch_blocks(
        &self,
        c: &Arc<Cluster>,
        sources: &[u64],
        req: &SnapshotFetch,
        ids: &[BlockId],
        used: &mut Vec<u64>,
    ) -> Result<HashMap<BlockId, Vec<u8>>, String> {
        let mut out = HashMap::new();
        let mut errors = Vec::new();
        let mut failed: Vec<u64> = Vec::new();
        let took = |out: &mut HashMap<BlockId, Vec<u8>>,
                    used: &mut Vec<u64>,
                    n: u64,
                    got: Vec<(BlockId, Vec<u8>)>| {
            if !got.is_empty() && !used.contains(&n) {
                used.push(n);
            }
            out.extend(got);
        };
        for &n in sources {
            let left: Vec<BlockId> = ids
                .iter()
                .filter(|id| !out.contains_key(*id))
                .copied()
                .collect();
            if left.is_empty() {
                break;
            }
            for chunk in left.chunks(BLOCKS_PER_FETCH) {
                match self.fetch_block_chunk(c, n, req, chunk).await {
                    Ok(got) => took(&mut out, used, n, got),
                    // A copy that holds no such snapshot is no copy of its blocks.
                    Err(e) if e.contains(NOT_HERE) => break,
                    Err(e) => {
                        errors.push(format!("{}: {e}", label(n)));
                        failed.push(n);
                        break;
                    }
                }
            }
        }
        for n in failed {
            let left: Vec<BlockId> = ids
                .iter()
                .filter(|id| !out.contains_key(*id))
                .copied()
                .collect();
            let mut errs = 0;
            for one in left.chunks(1) {
                match self.fetch_block_chunk(c, n, req, one).await {
                    Ok(got) => took(&mut out, used, n, got),
                    // That block unreadable there, or the copy not answering (each
                    // costs a timeout): a few, then this copy is done.
                    Err(e) => {
                        errors.push(format!("{}: {e}", label(n)));
                        errs += 1;
                        if errs >= 3 {
                            break;
                        }
                    }
                }
            }
        }
        if let Some(id) = ids.iter().find(|id| !out.contains_key(*id)) {
            if errors.is_empty() {
                errors.push(format!(
                    "every copy asked lacks block {} of its snapshot",
                    id.to_hex()
                ));
            } else {
                errors.push(format!("block {} of its snapshot not fetched", id.to_hex()));
            }
            return Err(errors.join("; "));
        }
        Ok(out)
    }

    /// The blocks of `chunk` copy `n` sends (those it has whole).
    async fn fetch_block_chunk(
        &self,
        c: &Arc<Cluster>,
        n: u64,
        req: &SnapshotFetch,
        chunk: &[BlockId],
    ) -> Result<Vec<(BlockId, Vec<u8>)>, String> {
        let raw: Vec<u8> = chunk.iter().flat_map(|id| id.0).collect();
        let reply = self.fetch(c, n, &req.with(FetchWhat::Blocks), &raw).await?;
        let got = lazarus_node::resync::decode_blocks_reply(chunk, &reply)?;
        Ok(chunk
            .iter()
            .zip(got)
            .filter_map(|(id, b)| b.map(|b| (*id, b)))
            .collect())
    }

    /// Asks a copy holding snapshot `name` (`id`) of `volume` for `what`: how a node
    /// without a copy serves the snapshot. Live copies are asked first.
    async fn ask_snapshot_holder(
        &self,
        volume: &str,
        name: &str,
        id: u64,
        what: FetchWhat,
    ) -> Result<Vec<u8>, IoError> {
        let c = self
            .cluster
            .get()
            .cloned()
            .ok_or_else(|| IoError::new(EIO, "this node runs alone"))?;
        let v = c
            .store
            .meta()
            .volumes
            .get(volume)
            .cloned()
            .ok_or_else(|| IoError::new(EIO, format!("no volume {volume:?}")))?;
        // The metadata must still name it: a connection opened before a deletion
        // reads nothing after it.
        if v.snapshots.get(name) != Some(&id) {
            return Err(IoError::new(
                EIO,
                format!("snapshot {volume}@{name} was deleted"),
            ));
        }
        let preferred = self.snapshot_holders.lock().get(volume).copied();
        let mut nodes: Vec<u64> = preferred.into_iter().collect();
        for n in v.live().into_iter().chain(v.replicas.iter().copied()) {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        nodes.retain(|n| *n != c.id);
        let req = SnapshotFetch {
            volume: volume.to_string(),
            name: name.to_string(),
            id,
            what,
        };
        let mut errors = Vec::new();
        for n in nodes {
            match self.fetch(&c, n, &req, &[]).await {
                Ok(r) => {
                    self.snapshot_holders.lock().insert(volume.to_string(), n);
                    return Ok(r);
                }
                Err(e) => errors.push(format!("{}: {e}", label(n))),
            }
        }
        Err(IoError::new(
            EIO,
            format!(
                "no copy of {volume}@{name} answered ({})",
                errors.join("; ")
            ),
        ))
    }

    /// Bytes `offset..offset + length` of a snapshot this node holds no copy of.
    pub async fn remote_snapshot_read(
        &self,
        volume: &str,
        name: &str,
        id: u64,
        offset: u64,
        length: u32,
    ) -> Result<Vec<u8>, IoError> {
        let r = self
            .ask_snapshot_holder(volume, name, id, FetchWhat::Read { offset, length })
            .await?;
        if r.len() != length as usize {
            return Err(IoError::new(EIO, "a snapshot read came back short"));
        }
        Ok(r)
    }

    /// `Store::snapshot_allocation` of a snapshot this node holds no copy of.
    pub async fn remote_snapshot_allocation(
        &self,
        volume: &str,
        name: &str,
        id: u64,
        first: u64,
        count: u64,
        max: usize,
    ) -> Result<Vec<(u64, Allocation)>, IoError> {
        let what = FetchWhat::Allocation { first, count, max };
        let r = self.ask_snapshot_holder(volume, name, id, what).await?;
        let runs: Vec<(u64, u8)> = serde_json::from_slice(&r)
            .map_err(|e| IoError::new(EIO, format!("bad allocation reply: {e}")))?;
        runs.into_iter()
            .map(|(n, a)| allocation_of_code(a).map(|a| (n, a)))
            .collect::<Result<_, _>>()
            .map_err(|e| IoError::new(EIO, e))
    }

    /// Repairs from other nodes, by id, what snapshot `snap` of `vol` reads for blocks
    /// `first..first + count` and this node does not hold intact: page blocks, then
    /// the blocks they name (a snapshot's pages and blocks are blocks like any other,
    /// and the copies that took it hold the same ones). Whether anything was repaired.
    pub async fn repair_snapshot_range(
        &self,
        vol: &Arc<lazarus_store::Volume>,
        snap: &Arc<Snapshot>,
        first: u64,
        count: u64,
    ) -> bool {
        let mut any = false;
        // Twice: a repaired page block shows which of its blocks are damaged too.
        for _ in 0..2 {
            let (store, v, s) = (self.store.clone(), vol.clone(), snap.clone());
            let bad =
                lazarus_rpc::rt::blocking(move || store.snapshot_damage(&v, &s, first, count))
                    .await
                    .unwrap_or_default();
            let mut fixed = false;
            for id in bad {
                if self.repair_block(&vol.meta.name, id).await {
                    fixed = true;
                }
            }
            any |= fixed;
            if !fixed {
                break;
            }
        }
        any
    }

    /// Serves a snapshot this node holds to a copy that misses it
    /// (`KIND_SNAPSHOT_FETCH`): only the snapshot the metadata names under that id.
    pub async fn serve_snapshot_fetch(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let (json, raw) = lazarus_rpc::unpack(body)?;
        let req: SnapshotFetch =
            serde_json::from_slice(json).map_err(|e| format!("bad snapshot fetch: {e}"))?;
        let c = self.cluster.get().ok_or("this node runs alone")?.clone();
        let v = c
            .store
            .meta()
            .volumes
            .get(&req.volume)
            .cloned()
            .ok_or_else(|| format!("volume {:?} unknown here", req.volume))?;
        let local = self
            .store
            .volume(&req.volume)
            .filter(|l| l.meta.uid == v.uid)
            .ok_or_else(|| format!("no copy of {:?} here", req.volume))?;
        // Only the snapshot the metadata names under that id (never a leftover this
        // copy keeps of a deleted one).
        let snap = local
            .snapshot(&req.name)
            .filter(|s| {
                s.id == req.id && crate::snapshots::snapshot_current(Some(&c), &req.volume, s)
            })
            .ok_or_else(|| format!("{NOT_HERE}: {}@{}", req.volume, req.name))?;
        let store = self.store.clone();
        let raw = raw.to_vec();
        lazarus_rpc::rt::blocking(move || match req.what {
            FetchWhat::File => Ok(snap.encode()),
            FetchWhat::FilePart { offset, length } => {
                if length > FILE_PART_BYTES {
                    return Err(format!(
                        "a part of at most {FILE_PART_BYTES} bytes, not {length}"
                    ));
                }
                let file = snap.encode();
                let start = (offset as usize).min(file.len());
                let end = start.saturating_add(length as usize).min(file.len());
                Ok(file[start..end].to_vec())
            }
            FetchWhat::Pages(pages) => {
                if pages.len() > PAGES_PER_FETCH {
                    return Err("too many pages asked".to_string());
                }
                let mut out = Vec::with_capacity(pages.len() * BLOCK_SIZE);
                for p in pages {
                    let pg = store
                        .snapshot_page(&local, &snap, p)
                        .ok_or_else(|| format!("page {p} of the snapshot cannot be read here"))?;
                    out.extend_from_slice(&encode_page(&pg[..]));
                }
                Ok(out)
            }
            FetchWhat::Blocks => lazarus_node::resync::read_blocks_by_id(&store, &raw),
            FetchWhat::Read { offset, length } => {
                let end = offset.checked_add(length as u64).ok_or("bad range")?;
                if length > READ_MAX || end > snap.size_bytes {
                    return Err(format!(
                        "read of {length} bytes at {offset} outside the snapshot's {} bytes",
                        snap.size_bytes
                    ));
                }
                store
                    .read_snapshot_range(&local, &snap, offset, length as u64)
                    .map_err(|e| e.to_string())
            }
            FetchWhat::Allocation { first, count, max } => {
                let blocks = snap.block_count();
                // What one NBD_CMD_BLOCK_STATUS can ask (a u32 length).
                let most = (u32::MAX as u64).div_ceil(lazarus_types::BLOCK_SIZE_U64);
                if first >= blocks || count == 0 || count > blocks - first || count > most {
                    return Err(format!("blocks {first}+{count} outside the snapshot"));
                }
                let runs: Vec<(u64, u8)> = store
                    .snapshot_allocation(&local, &snap, first, count, max.clamp(1, RUNS_MAX))
                    .into_iter()
                    .map(|(n, a)| (n, allocation_code(a)))
                    .collect();
                serde_json::to_vec(&runs).map_err(|e| e.to_string())
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
