//! A node's store: the block store, its volumes and the journal that makes their
//! changes atomic and durable. See docs/format.md for the crash argument.
//!
//! Write path (per request of whole blocks): hash each block; store new content in a
//! free slot; append one map record (LBA -> id, with the slot of new blocks) to the
//! journal buffer; update the slice pages in memory. FLUSH: sync blocks.dat, append a
//! commit record, write and fdatasync the journal. Checkpoint: journal the images of
//! every changed page, then write them in place, sync, and start a new journal
//! generation.

use crate::blocks::{BlockStats, BlockStore, NO_SLOT};
use crate::disk::{self, DiskFile};
use crate::error::{ReadError, StoreError, WriteError};
use crate::journal::{self, Journal, Record, KIND_COMMIT, KIND_MAP, KIND_PAGE_IMAGE};
use crate::page_cache::CacheBudget;
use crate::snapshot::Snapshot;
use crate::volume::{Allocation, FileKind, Page, PageImage, Volume, VolumeMeta};
use lazarus_types::{
    BlockId, Checksum, Lba, BLOCK_SIZE, BLOCK_SIZE_U64, FANOUT, FANOUT_U64, ID_LEN,
};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

mod clone_base;
mod reset;
pub use reset::ResetOutcome;

/// Journal record kind for a range set to one id (trim, write-zeroes).
pub const KIND_FILL: u8 = 5;
/// Largest range one fill record covers (64 slice pages), bounding the page images a
/// single record can make dirty.
pub const FILL_CHUNK_BLOCKS: u64 = 64 * FANOUT_U64;
/// Journal bytes one page image takes (record header + kind, uid, offset + page).
const IMAGE_RECORD_BYTES: u64 = (journal::RECORD_HEADER_LEN + 17 + BLOCK_SIZE) as u64;
/// Slice pages whose checksums a checkpoint computes at a time before it holds writers
/// off (each batch holds its volume's state lock for about a millisecond).
const REFRESH_CHUNK_PAGES: usize = 256;
/// Image records a checkpoint encodes and writes to the journal at a time (1 MiB).
const IMAGE_WRITE_RECORDS: usize = 256;
/// Journal bytes kept free for commit records and for the room a record skips at the
/// end of the ring (less than the largest record: a 32 MiB write's map record).
const JOURNAL_SLACK_BYTES: u64 = 512 << 10;
/// How many times a read retries a block whose content did not verify, in case the
/// LBA was rewritten (and the slot reused) between the lookup and the read.
const READ_RETRY_MAX: usize = 3;

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub journal_bytes: u64,
    /// Memory for clean slice pages (4 KiB each, 1 MiB of a volume's blocks mapped
    /// per page) past which they are evicted and read back when needed; pages changed
    /// since the last checkpoint stay in memory whatever this says.
    pub page_cache_bytes: u64,
}

/// The default `StoreOptions::page_cache_bytes`: 64 MiB, the slice pages of 16 GiB of
/// mapped blocks.
pub const DEFAULT_PAGE_CACHE_BYTES: u64 = 64 << 20;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            journal_bytes: 64 << 20,
            page_cache_bytes: DEFAULT_PAGE_CACHE_BYTES,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryReport {
    pub replayed_records: usize,
    pub applied_images: usize,
    pub discarded_tail_records: usize,
    pub damaged_pages: Vec<(String, u64)>,
    pub missing_blocks: usize,
    pub failed_volumes: Vec<String>,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    blocks: Arc<BlockStore>,
    journal: Mutex<Journal>,
    journal_file: Arc<DiskFile>,
    sync_lock: Mutex<()>,
    /// Writers hold it shared; a checkpoint holds it exclusively while it takes its
    /// page images (and for its whole length when the caller needs the files to hold
    /// the whole state: a snapshot, a resize).
    cp_lock: RwLock<()>,
    /// One checkpoint at a time, from taking its images to committing its journal
    /// generation. Taken before `cp_lock`.
    checkpoint_lock: Mutex<()>,
    /// A checkpoint is under way (writes go on while it writes its images in place).
    checkpoint_running: AtomicBool,
    /// Held for writing by a revert or clone (`reset_to_snapshot`: one at a time) and
    /// by deletions of volumes and snapshots (none under a reset); for reading by the
    /// mappings resync and repair copy (`write_ids`, `repair_slots`), so that none
    /// lands in a volume being reset (a replica's reset its primary gave up waiting
    /// for goes on). Taken before `checkpoint_lock`.
    reset_lock: RwLock<()>,
    volumes: RwLock<HashMap<String, Arc<Volume>>>,
    reserved_bytes: AtomicU64,
    /// Dirty slice pages of every volume (shared with them: `Volume::count_dirty`).
    dirty_pages: Arc<AtomicU64>,
    /// Largest number of tree levels of any volume, and the number of volumes: kept
    /// here so admission does not lock every volume on every write.
    max_levels: AtomicU64,
    volume_count: AtomicU64,
    /// Checksum pages of every volume's tree (levels 1 up), bounding a checkpoint's.
    checksum_pages: AtomicU64,
    checkpointing: AtomicBool,
    /// A durability point started by `flush_in_background` is running.
    background_flush: AtomicBool,
    /// Set when the journal could not be written: nothing more is acknowledged.
    failed: AtomicBool,
    /// Set at shutdown: no new write is admitted, so the final checkpoint holds every
    /// write the node ever applied.
    sealed: AtomicBool,
    pub recovery: RecoveryReport,
    /// The volumes' slice pages in memory, against `StoreOptions::page_cache_bytes`.
    page_cache: Arc<CacheBudget>,
}

/// A checkpoint whose images are journaled (`checkpoint_begin`), to be written in
/// place (`checkpoint_finish`).
struct Begun {
    images: Vec<(u64, PageImage)>,
    vols: Vec<Arc<Volume>>,
    /// The journal LSN past its images-done record.
    durable_at: u64,
    /// The journal room reserved for its image records.
    reserved: journal::Reserved,
}

struct Admission<'a> {
    _cp: RwLockReadGuard<'a, ()>,
    store: &'a Store,
    bytes: u64,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.store
            .reserved_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

fn encode_map(uid: u64, lba: Lba, ids: &[BlockId], slots: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + ids.len() * 24);
    b.extend_from_slice(&uid.to_le_bytes());
    b.extend_from_slice(&lba.0.to_le_bytes());
    b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for (id, slot) in ids.iter().zip(slots) {
        b.extend_from_slice(&id.0);
        b.extend_from_slice(&slot.to_le_bytes());
    }
    b
}

struct MapRecord {
    uid: u64,
    lba: Lba,
    entries: Vec<(BlockId, u64)>,
}

fn decode_map(p: &[u8]) -> Option<MapRecord> {
    let uid = u64::from_le_bytes(p.get(0..8)?.try_into().ok()?);
    let lba = Lba(u64::from_le_bytes(p.get(8..16)?.try_into().ok()?));
    let n = u32::from_le_bytes(p.get(16..20)?.try_into().ok()?) as usize;
    let body = p.get(20..)?;
    if body.len() != n * 24 {
        return None;
    }
    let entries = body
        .chunks_exact(24)
        .map(|c| {
            (
                BlockId(c[0..16].try_into().expect("16")),
                u64::from_le_bytes(c[16..24].try_into().expect("8")),
            )
        })
        .collect();
    Some(MapRecord { uid, lba, entries })
}

fn encode_fill(uid: u64, lba: Lba, count: u64, id: BlockId, slot: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(48);
    b.extend_from_slice(&uid.to_le_bytes());
    b.extend_from_slice(&lba.0.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&id.0);
    b.extend_from_slice(&slot.to_le_bytes());
    b
}

fn decode_fill(p: &[u8]) -> Option<(u64, Lba, u64, BlockId, u64)> {
    if p.len() != 48 {
        return None;
    }
    Some((
        u64::from_le_bytes(p[0..8].try_into().ok()?),
        Lba(u64::from_le_bytes(p[8..16].try_into().ok()?)),
        u64::from_le_bytes(p[16..24].try_into().ok()?),
        BlockId(p[24..40].try_into().ok()?),
        u64::from_le_bytes(p[40..48].try_into().ok()?),
    ))
}

/// A volume made in place (in the simulator) whose marker file `marker`
/// (`.creating-UID`, naming it) is still there: its creation never finished, and
/// nothing refers to it. Its directory goes first, durably, then the marker; a
/// directory there that loads as another volume (a later creation of the name) stays.
/// An I/O error stops the open (reading the directory's headers, too: only a volume
/// that is not there, is this creation, or never got a header that verifies goes).
fn remove_torn_creation(vdir: &Path, marker: &Path) -> Result<(), StoreError> {
    let named = lazarus_io::fs::read(marker).map_err(|e| StoreError::io(marker, e))?;
    let name = String::from_utf8_lossy(&named).to_string();
    let uid = marker
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(".creating-"))
        .and_then(|u| u.parse::<u64>().ok());
    if lazarus_types::check_volume_name(&name).is_ok() {
        let dir = vdir.join(&name);
        let other = match Volume::open(&dir) {
            Ok(v) => Some(v.meta.uid) != uid,
            Err(StoreError::Io { source, .. })
                if lazarus_io::fs::exists(&dir) && source.kind() != std::io::ErrorKind::NotFound =>
            {
                return Err(StoreError::Corrupted {
                    what: "volume being created (its headers cannot be read)",
                    path: dir,
                    detail: "a creation cut short left it, and whether it is that creation cannot be told; not opened".into(),
                })
            }
            Err(_) => false,
        };
        if lazarus_io::fs::exists(&dir) && !other {
            lazarus_io::fs::remove_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
            tracing::warn!(volume = %name, "a volume whose creation was cut short removed");
        }
        disk::sync_dir(vdir).map_err(|e| StoreError::io(vdir, e))?;
    }
    disk::remove_file(marker).map_err(|e| StoreError::io(marker, e))?;
    disk::sync_dir(vdir).map_err(|e| StoreError::io(vdir, e))
}

impl Store {
    /// Opens the store under `dir`, creating it if empty, and recovers: applies a
    /// finished checkpoint's page images, verifies every volume, replays the journal,
    /// recounts references and checkpoints.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        lazarus_io::fs::create_dir_all(&dir.join("volumes")).map_err(|e| StoreError::io(dir, e))?;
        let mut report = RecoveryReport {
            replayed_records: 0,
            applied_images: 0,
            discarded_tail_records: 0,
            damaged_pages: Vec::new(),
            missing_blocks: 0,
            failed_volumes: Vec::new(),
        };
        let mut volumes: HashMap<String, Arc<Volume>> = HashMap::new();
        let page_cache = Arc::new(CacheBudget::new(opts.page_cache_bytes / BLOCK_SIZE_U64));
        let vdir = dir.join("volumes");
        let mut entries: Vec<_> =
            lazarus_io::fs::list_dir(&vdir).map_err(|e| StoreError::io(&vdir, e))?;
        entries.sort();
        let entry_name = |path: &Path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string()
        };
        // First what interrupted deletions and creations left, before any volume
        // loads (a marker may name a directory that sorts before it).
        for path in &entries {
            let name = entry_name(path);
            if name.starts_with(".deleted-") || name.starts_with(".creating-") {
                // A deletion interrupted by a crash: it was already durable (renamed);
                // or a creation that never reached its rename: nothing refers to it.
                if lazarus_io::fs::is_dir(path) {
                    let _ = lazarus_io::fs::remove_dir_all(path);
                } else if name.starts_with(".creating-") && lazarus_io::net::in_simulation() {
                    remove_torn_creation(&vdir, path)?;
                }
            }
        }
        for path in entries {
            let name = entry_name(&path);
            if name.starts_with(".deleted-") || name.starts_with(".creating-") {
                continue;
            }
            if !lazarus_io::fs::is_dir(&path) {
                continue;
            }
            match Volume::open(&path) {
                Ok(v) => {
                    // Before its pages load: those past the cache's room stay on disk.
                    v.attach_cache(page_cache.clone());
                    // Snapshots that cannot be read (an I/O error, not a damaged
                    // file) stop the open: their pages would go uncounted and freed.
                    v.load_snapshots().inspect_err(|e| {
                        tracing::error!(volume = %name, error = %e, "the volume's snapshots cannot be read; the store does not open");
                    })?;
                    volumes.insert(v.meta.name.clone(), Arc::new(v));
                }
                Err(e) => {
                    tracing::error!(volume = %name, error = %e, "volume cannot be opened; it will not be served");
                    report.failed_volumes.push(name);
                }
            }
        }
        let by_uid: HashMap<u64, Arc<Volume>> =
            volumes.values().map(|v| (v.meta.uid, v.clone())).collect();

        let jpath = dir.join("journal.log");
        let (mut jr, replay) = Journal::open(&jpath, opts.journal_bytes)?;
        let records = replay.records;
        let blocks_dir = dir.to_path_buf();
        if jr.has_uncommitted_generation() {
            // A checkpoint got as far as journaling all its images: finish it (the
            // records journaled after them replay below, on top).
            let idx_path = blocks_dir.join("blocks.idx");
            let idx = DiskFile::open(&idx_path, true).map_err(|e| StoreError::io(&idx_path, e))?;
            for r in &replay.images {
                apply_image_record(r, &by_uid, &idx)?;
                report.applied_images += 1;
            }
            idx.sync_data().map_err(|e| StoreError::io(&idx_path, e))?;
            for v in by_uid.values() {
                v.sync()?;
            }
            jr.adopt()?;
        }
        let blocks = Arc::new(BlockStore::open(&blocks_dir)?);
        // Clones after the volumes whose snapshots they share pages with.
        let mut order = clone_base::load_order(&volumes)?;
        // Volumes whose files opened but whose pages could not be loaded: they hold
        // blocks (a torn creation, whose header never verified, holds none).
        let mut unloaded: Vec<String> = Vec::new();
        for (v, base) in &mut order {
            if base
                .as_ref()
                .is_some_and(|(src, _)| report.failed_volumes.contains(&src.meta.name))
            {
                // Its source is not served: its blocks go uncounted.
                tracing::error!(volume = %v.meta.name, "the volume this clone shares pages with did not load: those pages cannot be proven");
                *base = None;
                *v.base.lock() = None;
            }
            let page = |p: u64| {
                let (src, snap) = base.as_ref().expect("only called with a base");
                snapshot_page_of(&blocks, src, snap, p)
            };
            let source = base.as_ref().map(|(_, snap)| crate::volume::BaseSource {
                l1: &snap.l1,
                page: &page,
            });
            match v.load_with_base(source.as_ref()) {
                Ok(damaged) => {
                    for p in damaged {
                        tracing::error!(volume = %v.meta.name, page = p, "slice page failed verification; its LBAs are unrecoverable until repaired");
                        report.damaged_pages.push((v.meta.name.clone(), p));
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %v.meta.name, error = %e, "volume cannot be loaded; it will not be served");
                    report.failed_volumes.push(v.meta.name.clone());
                    unloaded.push(v.meta.name.clone());
                }
            }
        }
        volumes.retain(|name, _| !report.failed_volumes.contains(name));

        // Page images with no images-done record after them are a checkpoint cut
        // short: never applied, and cut off with what follows.
        let replayable = records
            .iter()
            .position(|r| r.kind == KIND_PAGE_IMAGE)
            .unwrap_or(records.len());
        // A volume that did not load but has changes in the journal (written since the
        // last checkpoint, before a crash): the checkpoint that ends this open would
        // drop them, and the volume would come back without them once it loads again.
        // The store does not open instead (the volume's directory moved away, it does).
        for name in &unloaded {
            let Some(uid) = by_uid
                .values()
                .find(|v| &v.meta.name == name)
                .map(|v| v.meta.uid)
            else {
                continue;
            };
            let pending = records[..replayable]
                .iter()
                .filter(|r| match r.kind {
                    KIND_MAP => decode_map(&r.payload).is_some_and(|m| m.uid == uid),
                    KIND_FILL => decode_fill(&r.payload).is_some_and(|f| f.0 == uid),
                    _ => false,
                })
                .count();
            if pending > 0 {
                let path = dir.join("volumes").join(name);
                tracing::error!(volume = %name, records = pending, "a volume that cannot be loaded has changes in the journal: the store does not open (they would be lost); repair the volume's files, or move its directory away to open without it");
                return Err(StoreError::Corrupted {
                    what: "volume with changes in the journal",
                    path,
                    detail: format!(
                        "it cannot be loaded and the journal holds {pending} change record(s) of it, which opening without it would drop; repair its files, or move its directory away to open the store without it"
                    ),
                });
            }
        }
        let replayed = replay_records(&records[..replayable], &by_uid, &volumes, &blocks);
        report.replayed_records = replayed;
        if let Some(cut) = records.get(replayed) {
            report.discarded_tail_records = records.len() - replayed;
            if replayed < replayable {
                tracing::warn!(lsn = cut.lsn, discarded = report.discarded_tail_records, "journal tail after the last commit named blocks that never reached disk; cut there");
            } else {
                tracing::warn!(
                    lsn = cut.lsn,
                    discarded = report.discarded_tail_records,
                    "journal ends in the images of a checkpoint cut short; cut there"
                );
            }
            jr.truncate_to(cut);
        }
        // After a crash, records of this generation may lie beyond where replay
        // stopped (written after a torn one, or a checkpoint's images): zeroed before
        // anything is appended, so that a later replay never takes them for new ones.
        let clean = replay.images.is_empty() && records.iter().all(|r| r.kind == KIND_COMMIT);
        if !clean {
            jr.zero_free()?;
        }
        for (v, base) in &order {
            if !volumes.contains_key(&v.meta.name) {
                continue;
            }
            let page = |p: u64| {
                let (src, snap) = base.as_ref().expect("only called with a base");
                snapshot_page_of(&blocks, src, snap, p)
            };
            v.preserve_replayed(
                &blocks,
                base.as_ref().map(|_| &page as &dyn Fn(u64) -> Option<Page>),
            );
        }
        drop(order);
        for v in volumes.values() {
            // A page out of memory that no longer reads back (it read at load, moments
            // ago), here or while the journal replayed, fails the start: counting
            // without it could free blocks it names, and replaying over it could drop
            // its other mappings (no reference is counted nor slot freed before this).
            if v.read_back_failed() {
                return Err(StoreError::Corrupted {
                    what: "slice page (read back from disk during the journal's replay)",
                    path: v.dir.clone(),
                    detail: "a page read at load failed to read back; not opened".into(),
                });
            }
            let unreadable = v.visit_ids(&mut |id| blocks.add_ref(id));
            if let Some((p, why)) = unreadable.into_iter().next() {
                return Err(StoreError::Corrupted {
                    what: "slice page (read back from disk)",
                    path: v.dir.clone(),
                    detail: format!("page {p}: {why}; not opened"),
                });
            }
            v.count_snapshot_refs(&blocks);
        }
        // A volume that did not load holds references nobody counted: nothing is
        // freed this run (every block kept, pinned), lest its data be reused.
        let keep = !unloaded.is_empty();
        if keep {
            tracing::error!(volumes = ?unloaded, "volumes not loaded: no block is freed until a start that loads them all");
        }
        report.missing_blocks = blocks.finish_recovery_with(keep);
        if report.missing_blocks > 0 {
            tracing::error!(
                count = report.missing_blocks,
                "slice pages reference blocks the store does not have; reads of them fail"
            );
        }
        let journal_file = jr.file_arc();
        let mut store = Store {
            dir: dir.to_path_buf(),
            blocks,
            journal: Mutex::new(jr),
            journal_file,
            sync_lock: Mutex::new(()),
            cp_lock: RwLock::new(()),
            checkpoint_lock: Mutex::new(()),
            checkpoint_running: AtomicBool::new(false),
            reset_lock: RwLock::new(()),
            volumes: RwLock::new(volumes),
            reserved_bytes: AtomicU64::new(0),
            dirty_pages: Arc::new(AtomicU64::new(0)),
            max_levels: AtomicU64::new(1),
            checksum_pages: AtomicU64::new(0),
            volume_count: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
            background_flush: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            recovery: report,
            page_cache,
        };
        store.update_volume_stats();
        for v in store.volumes.read().values() {
            let _ = v.dirty_counter.set(store.dirty_pages.clone());
            let _ = v.blocks.set(store.blocks.clone());
            v.attach_cache(store.page_cache.clone());
        }
        for v in store.volumes.read().values() {
            let st = v.state.lock();
            let dirty: Vec<u64> = st.dirty.iter().copied().collect();
            drop(st);
            for p in dirty {
                if let Err(e) = v.ensure_allocated(p, p) {
                    tracing::warn!(volume = %v.meta.name, page = p, error = %e, "cannot reserve space for a replayed page");
                }
            }
        }
        store.checkpoint()?;
        for name in store.finish_resets() {
            // Not served (its copy is half reset); its blocks stay counted. The next
            // open tries again.
            store.volumes.write().remove(&name);
            store.recovery.failed_volumes.push(name);
        }
        // Clones a crash cut before their fill was committed: given up (the command
        // that asked for one never returned), so the name is free to ask again.
        for v in store.volumes() {
            if !v.is_unfilled() {
                continue;
            }
            let name = v.meta.name.clone();
            drop(v);
            match store.delete_volume(&name) {
                Ok(()) => {
                    tracing::warn!(volume = %name, "a clone cut short by a crash before it was filled is removed")
                }
                Err(e) => {
                    tracing::error!(volume = %name, error = %e, "a clone cut short by a crash could not be removed: it is not served (the next start tries again)");
                    store.volumes.write().remove(&name);
                    store.recovery.failed_volumes.push(name);
                }
            }
        }
        Ok(store)
    }

    fn update_volume_stats(&self) {
        let vols = self.volumes.read();
        let levels = vols
            .values()
            .map(|v| v.state.lock().levels.len())
            .max()
            .unwrap_or(1);
        self.max_levels.store(levels as u64, Ordering::Release);
        self.volume_count
            .store(vols.len() as u64, Ordering::Release);
        let checksum_pages: usize = vols
            .values()
            .map(|v| {
                v.state
                    .lock()
                    .levels
                    .iter()
                    .map(|l| l.len().div_ceil(FANOUT))
                    .sum::<usize>()
            })
            .sum();
        self.checksum_pages
            .store(checksum_pages as u64, Ordering::Release);
    }

    /// Refuses every write from now on (shutdown). Writes already admitted complete,
    /// and a checkpoint taken after this call includes them.
    pub fn seal(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    /// True while a checkpoint holds writes off: a writer may block for its duration.
    pub fn is_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::Acquire)
    }

    /// True when enough overwritten blocks await a durable unmap that the node should
    /// make a durability point (in the background) to reuse their space.
    pub fn wants_flush(&self) -> bool {
        self.blocks.pending_free_pressure().0
    }

    /// Starts a durability point in the background when overwritten blocks pile up
    /// (`wants_flush`) and none is running, so that writers reach the hard limit (where
    /// they make it themselves, `write_may_block`) only when the disk cannot keep up.
    pub fn flush_in_background(self: &Arc<Self>) {
        if self.wants_flush() && !self.background_flush.swap(true, Ordering::AcqRel) {
            /// Clears the running mark however the flush ends (a panic included).
            struct Done(Arc<Store>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.background_flush.store(false, Ordering::Release);
                }
            }
            let done = Done(self.clone());
            lazarus_io::rt::detach_blocking(move || {
                if let Err(e) = done.0.flush() {
                    tracing::error!(error = %e, "background flush failed");
                }
            });
        }
    }

    /// Whether a write may block now: a checkpoint holds writes off, or the pending
    /// frees are near enough the hard limit that this write or one under way may take
    /// them past it and make the durability point itself. (Between the soft limit and
    /// there, a background flush is under way and writes go on.)
    pub fn write_may_block(&self) -> bool {
        self.is_checkpointing()
            || self.blocks.pending_free_near_hard()
            || (self.checkpoint_running.load(Ordering::Acquire) && self.journal_nearly_full())
    }

    /// Past three quarters of what admission allows: a write may have to wait for the
    /// checkpoint under way to free the journal's room.
    fn journal_nearly_full(&self) -> bool {
        let (used, cap) = {
            let j = self.journal.lock();
            (j.used_bytes(), j.capacity())
        };
        used + self.reserved_bytes.load(Ordering::Acquire) + self.image_bytes_bound()
            > (cap - journal::RECORDS_START - JOURNAL_SLACK_BYTES) / 4 * 3
    }

    /// Whether this store's device is failed (`lazarus fault device fail`).
    pub fn device_failed(&self) -> bool {
        crate::disk::device_failed(&self.dir)
    }

    /// Fails (or heals) this store's device: every I/O of its files fails with EIO.
    pub fn set_device_failed(&self, failed: bool) {
        crate::disk::set_device_failed(&self.dir, failed)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(name).cloned()
    }

    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        let mut v: Vec<_> = self.volumes.read().values().cloned().collect();
        v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        v
    }

    /// The volumes' slice pages in memory against the page cache's budget.
    pub fn page_cache_stats(&self) -> crate::page_cache::CacheStats {
        self.page_cache.stats()
    }

    pub fn block_stats(&self) -> BlockStats {
        self.blocks.stats()
    }

    /// The pending-free limits (soft, hard) in force, in blocks.
    pub fn block_stats_limits(&self) -> (usize, usize) {
        self.blocks.pending_free_limits()
    }

    pub fn journal_used_bytes(&self) -> u64 {
        self.journal.lock().used_bytes()
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<Arc<Volume>, StoreError> {
        self.create_volume_with_uid(name, size_bytes, new_uid(name))
    }

    /// Creates the volume a clone made on a node alone fills (`reset_to_snapshot`):
    /// marked unfilled (`Volume::is_unfilled`: not served) from its creation until its
    /// reset ends. A crash before the reset's commit leaves it marked, and the next
    /// open removes it: a clone cut short is gone, never there empty. (A cluster's
    /// clones are made and given up through its metadata instead.)
    pub fn create_clone_volume(
        &self,
        name: &str,
        size_bytes: u64,
        from: &str,
    ) -> Result<Arc<Volume>, StoreError> {
        self.create_volume_as(name, size_bytes, new_uid(name), Some(from))
    }

    /// Creates a volume with a given uid (a cluster volume's copies carry the uid the
    /// cluster metadata gave it, so a node can tell its copy of a deleted volume from a
    /// new volume of the same name). Uids must never be reused.
    pub fn create_volume_with_uid(
        &self,
        name: &str,
        size_bytes: u64,
        uid: u64,
    ) -> Result<Arc<Volume>, StoreError> {
        self.create_volume_as(name, size_bytes, uid, None)
    }

    fn create_volume_as(
        &self,
        name: &str,
        size_bytes: u64,
        uid: u64,
        clone_of: Option<&str>,
    ) -> Result<Arc<Volume>, StoreError> {
        lazarus_types::check_volume_name(name).map_err(StoreError::Invalid)?;
        lazarus_types::check_volume_size(size_bytes).map_err(StoreError::Invalid)?;
        let _cp = self.cp_lock.read();
        let mut vols = self.volumes.write();
        if vols.contains_key(name) {
            return Err(StoreError::VolumeExists(name.to_string()));
        }
        if vols.values().any(|v| v.meta.uid == uid) {
            return Err(StoreError::Invalid(format!("volume uid {uid} is in use")));
        }
        let dir = self.dir.join("volumes").join(name);
        if lazarus_io::fs::exists(&dir) {
            // Left over from a failed volume: refuse rather than overwrite its data.
            return Err(StoreError::Invalid(format!(
                "{} exists but is not a loadable volume",
                dir.display()
            )));
        }
        let meta = VolumeMeta {
            name: name.to_string(),
            uid,
            size_bytes,
        };
        // Made whole under a temporary name, then renamed into place (the commit
        // point): a crash midway leaves no half-made volume, only a directory the
        // next open removes.
        // (The simulator's file system renames no directory with its files: there
        // the volume is made in place, and a marker file `.creating-UID` naming it,
        // made durable first and removed once the volume is, stands for the rename.)
        let vdir = self.dir.join("volumes");
        let tmp = if lazarus_io::net::in_simulation() {
            dir.clone()
        } else {
            vdir.join(format!(".creating-{uid}"))
        };
        let marker = vdir.join(format!(".creating-{uid}"));
        if tmp != dir {
            let _ = lazarus_io::fs::remove_dir_all(&tmp);
        } else {
            disk::write_file_atomic(&marker, name.as_bytes())
                .map_err(|e| StoreError::io(&marker, e))?;
        }
        let made = Volume::create(&tmp, meta).and_then(|v| {
            drop(v);
            if let Some(from) = clone_of {
                // Durable with the volume's files, before the rename that commits them.
                let m = tmp.join(crate::volume::CLONE_PENDING);
                disk::write_file_atomic(&m, from.as_bytes()).map_err(|e| StoreError::io(&m, e))?;
            }
            let renamed =
                tmp == dir || disk::rename(&tmp, &dir).map_err(|e| StoreError::io(&dir, e))?;
            disk::sync_dir(&vdir).map_err(|e| StoreError::io(&vdir, e))?;
            if tmp == dir {
                disk::remove_file(&marker).map_err(|e| StoreError::io(&marker, e))?;
                disk::sync_dir(&vdir).map_err(|e| StoreError::io(&vdir, e))?;
            }
            // (Not renamed only with the power off, simulated: it is gone at restart.)
            let v = Volume::open(if renamed { &dir } else { &tmp })?;
            // As `Volume::create` wrote its checksum header.
            v.state.lock().header_seq = 1;
            Ok(v)
        });
        let v = match made {
            Ok(v) => {
                let _ = v.dirty_counter.set(self.dirty_pages.clone());
                let _ = v.blocks.set(self.blocks.clone());
                v.attach_cache(self.page_cache.clone());
                Arc::new(v)
            }
            Err(e) => {
                let _ = lazarus_io::fs::remove_dir_all(&tmp);
                let _ = lazarus_io::fs::remove_dir_all(&dir);
                // The marker goes only once the directory it names is gone.
                if tmp == dir
                    && !lazarus_io::fs::exists(&dir)
                    && disk::sync_dir(&vdir).is_ok()
                    && disk::remove_file(&marker).is_ok()
                {
                    let _ = disk::sync_dir(&vdir);
                }
                return Err(e);
            }
        };
        vols.insert(name.to_string(), v.clone());
        drop(vols);
        self.update_volume_stats();
        tracing::info!(volume = name, size_bytes, uid, "volume created");
        Ok(v)
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), StoreError> {
        let _reset = self.reset_lock.write();
        // After a failure a reset's intent may be left to finish at the next open: its
        // source must still be there then.
        self.check_failed()?;
        let uid = self
            .volume(name)
            .ok_or_else(|| StoreError::NoSuchVolume(name.to_string()))?
            .meta
            .uid;
        // Clones sharing pages with its snapshots make them their own first.
        self.flatten_clones_of(uid, None)?;
        let _cp = self.cp_lock.write();
        let v = self
            .volumes
            .write()
            .remove(name)
            .ok_or_else(|| StoreError::NoSuchVolume(name.to_string()))?;
        let vdir = self.dir.join("volumes");
        let grave = vdir.join(format!(".deleted-{}", v.meta.uid));
        lazarus_io::fs::rename(&v.dir, &grave).map_err(|e| StoreError::io(&v.dir, e))?;
        disk::sync_dir(&vdir).map_err(|e| StoreError::io(&vdir, e))?;
        // The rename is durable: nothing durable references these blocks any more
        // (journal records of this volume are skipped at replay).
        // A block may be shared with another volume whose unmapping of it is
        // journaled but not durable yet: the slots are reused only once everything
        // journaled so far is (else a crash would bring back that mapping over a
        // reused slot).
        let lsn = self.journal.lock().next_lsn().saturating_sub(1);
        // (Pages out of memory are read for this, writers held off: a large volume's
        // deletion pauses writes while they are read, about 4 KiB per MiB mapped.)
        let unreadable = v.visit_ids(&mut |id| self.blocks.release(id, lsn));
        for (p, why) in unreadable {
            // Its blocks keep the references it holds (a leak, never a block freed
            // while something may still name it).
            tracing::error!(volume = name, page = p, error = %why, "a page of the deleted volume could not be read: its blocks stay referenced");
        }
        for c in v.take_held() {
            self.release_page_block(c);
        }
        self.flush()?;
        let durable = self.journal.lock().durable_lsn();
        self.blocks.release_durable(durable);
        let _ = lazarus_io::fs::remove_dir_all(&grave);
        self.update_volume_stats();
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Takes snapshot `name` of volume `volume`: everything written to the volume before
    /// the call, frozen. Writers are held off for a checkpoint and the write of the
    /// snapshot's file (16 bytes per mapped slice page); no data is copied.
    /// `id` tells it from another snapshot taken later under the same name
    /// (`new_snapshot_id`).
    pub fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
        id: u64,
    ) -> Result<Arc<Snapshot>, StoreError> {
        crate::snapshot::check_snapshot_name(name).map_err(StoreError::Invalid)?;
        let v = self
            .volume(volume)
            .ok_or_else(|| StoreError::NoSuchVolume(volume.to_string()))?;
        if v.snapshot(name).is_some() {
            return Err(StoreError::Invalid(format!(
                "volume {volume:?} already has a snapshot {name:?}"
            )));
        }
        self.checkpointing.store(true, Ordering::Release);
        let r = (|| {
            let _one = self.checkpoint_lock.lock();
            let _cp = self.cp_lock.write();
            self.checkpoint_held()?;
            v.take_snapshot(name, id)
        })();
        self.checkpointing.store(false, Ordering::Release);
        if let Ok(s) = &r {
            tracing::info!(
                volume,
                snapshot = name,
                mapped_pages = s.mapped_pages(),
                "snapshot taken"
            );
        }
        r
    }

    /// Deletes a snapshot; what only it referenced is freed.
    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), StoreError> {
        self.delete_snapshot_if(volume, name, |_| true)
    }

    /// `delete_snapshot` if the snapshot under that name passes `which` (its id, say:
    /// a snapshot re-created under the name meanwhile is left alone).
    pub fn delete_snapshot_if(
        &self,
        volume: &str,
        name: &str,
        which: impl Fn(&Snapshot) -> bool,
    ) -> Result<(), StoreError> {
        let _reset = self.reset_lock.write();
        self.check_failed()?;
        let v = self
            .volume(volume)
            .ok_or_else(|| StoreError::NoSuchVolume(volume.to_string()))?;
        if let Some(s) = v.snapshot(name).filter(|s| which(s)) {
            // Clones sharing pages with it make them their own first.
            self.flatten_clones_of(v.meta.uid, Some(s.id))?;
        }
        {
            // Not while a snapshot is being installed (`install_snapshot` holds this
            // for writing): its check of what the volume's snapshots hold and its
            // commit must see the same page blocks.
            let _cp = self.cp_lock.read();
            if !v.snapshot(name).is_some_and(|s| which(&s)) {
                return Err(StoreError::NoSuchSnapshot(format!("{volume}@{name}")));
            }
            let released = v.drop_snapshot(name)?;
            // The file's removal is durable: no snapshot names these page blocks. A
            // block one of them names may have been unmapped by the volume in a
            // journal record not yet durable: the slots are reused only once
            // everything journaled so far is (else a crash would bring back that
            // mapping over a reused slot).
            for c in released {
                self.release_page_block(c);
            }
        }
        self.flush()?;
        let durable = self.journal.lock().durable_lsn();
        self.blocks.release_durable(durable);
        tracing::info!(volume, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Snapshot pages (of a snapshot with level 1 `l1`, held by another copy) that this
    /// copy of `volume` cannot read: what `install_snapshot` needs staged.
    pub fn snapshot_pages_unavailable(
        &self,
        volume: &str,
        l1: &[Checksum],
        staged: &HashSet<Checksum>,
    ) -> Result<Vec<u64>, StoreError> {
        let v = self
            .volume(volume)
            .ok_or_else(|| StoreError::NoSuchVolume(volume.to_string()))?;
        Ok(v.pages_unavailable(l1, staged))
    }

    /// A page block's content if the store holds it intact (any volume's).
    pub fn page_block(&self, c: Checksum) -> Option<Vec<u8>> {
        let mut b = vec![0u8; BLOCK_SIZE];
        matches!(self.blocks.read(BlockId(c.0), &mut b), Ok(true)).then_some(b)
    }

    /// Stores slice page content `page` (checksum `c`) for a snapshot being installed
    /// (`install_snapshot`), with the blocks it names: each is stored here already or
    /// given in `data` (verified against its id). Holds a reference on the page block
    /// and one on each block it names, which `install_snapshot` takes over or
    /// `unstage_snapshot_pages` drops. Nothing is written to any volume, so a crash
    /// leaves only unreferenced blocks, freed at the next start.
    pub fn stage_snapshot_page(
        &self,
        c: Checksum,
        page: &[u8],
        data: &HashMap<BlockId, Vec<u8>>,
    ) -> Result<(), StoreError> {
        if c == Checksum::ZERO || page.len() != BLOCK_SIZE || Checksum::of_page(page) != c {
            return Err(StoreError::Invalid(
                "a snapshot page does not match its checksum".into(),
            ));
        }
        let children = crate::volume::decode_page(page);
        let mut taken: Vec<BlockId> = Vec::new();
        let r = (|| {
            for id in children.iter().filter(|i| !i.is_zero()) {
                if self.blocks.try_retain(*id) {
                    taken.push(*id);
                    continue;
                }
                let b = data.get(id).ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "block {} of a snapshot page is neither here nor given",
                        id.to_hex()
                    ))
                })?;
                if BlockId::hash_of(b) != *id {
                    return Err(StoreError::Invalid(format!(
                        "block {} does not hash to its id",
                        id.to_hex()
                    )));
                }
                self.blocks.put(*id, b)?;
                taken.push(*id);
            }
            let pid = BlockId(c.0);
            if !self.blocks.try_retain(pid) {
                self.blocks.put(pid, page)?;
            } else if !self.blocks.holds_intact(pid) {
                // Stored, but damaged: the verified page heals it.
                taken.push(pid);
                self.blocks.rewrite(pid, page)?;
                taken.pop();
            }
            Ok(())
        })();
        if r.is_err() {
            let j = self.journal.lock();
            let lsn = j.next_lsn().saturating_sub(1);
            for id in taken {
                self.blocks.release(id, lsn);
            }
            drop(j);
        }
        r
    }

    /// Takes staged pages (`stage_snapshot_page`) into snapshot `id` of `volume`, which
    /// this copy holds but could not read them of (damaged before it kept them as page
    /// blocks): their references become the snapshot's, as `preserve` takes them (and a
    /// start counts them again from the page blocks). Returns the staged pages whose
    /// references stay the caller's to release: held already, named by no snapshot, or
    /// the volume or snapshot gone.
    pub fn hold_snapshot_pages(&self, volume: &str, id: u64, staged: &[Checksum]) -> Vec<Checksum> {
        match self
            .volume(volume)
            .filter(|v| v.snapshots().iter().any(|s| s.id == id))
        {
            Some(v) => v.hold_pages(staged),
            None => staged.to_vec(),
        }
    }

    /// Drops the references of staged snapshot pages (an installation given up).
    pub fn unstage_snapshot_pages(&self, staged: &[Checksum]) {
        for c in staged {
            self.release_page_block(*c);
        }
    }

    /// Installs snapshot `from` of `volume` as another copy holds it (its name, id,
    /// size, creation time and level 1, which must hash up to its root): this copy
    /// missed its creation. Every page
    /// this copy cannot read otherwise must be staged (`stage_snapshot_page`): the
    /// volume's own pages are shared as at a creation. Writers are held off for a
    /// checkpoint (which makes the staged blocks durable and indexed) and the file's
    /// write. `Ok(Err(pages))`: these pages became unavailable since (the volume
    /// changed them); nothing was installed and the staged references are still the
    /// caller's.
    pub fn install_snapshot(
        &self,
        volume: &str,
        from: &Snapshot,
        staged: &[Checksum],
    ) -> Result<Result<Arc<Snapshot>, Vec<u64>>, StoreError> {
        let name = from.name.as_str();
        crate::snapshot::check_snapshot_name(name).map_err(StoreError::Invalid)?;
        lazarus_types::check_volume_size(from.size_bytes).map_err(StoreError::Invalid)?;
        let pages = crate::volume::level_lens(lazarus_types::page_count_for(from.size_bytes))[0];
        if from.l1.len() as u64 != pages {
            return Err(StoreError::Invalid(format!(
                "{} page checksums for a snapshot of {pages} pages",
                from.l1.len()
            )));
        }
        let v = self
            .volume(volume)
            .ok_or_else(|| StoreError::NoSuchVolume(volume.to_string()))?;
        self.checkpointing.store(true, Ordering::Release);
        let r = (|| {
            let _one = self.checkpoint_lock.lock();
            let _cp = self.cp_lock.write();
            self.checkpoint_held()?;
            v.adopt_snapshot(from, staged)
        })();
        self.checkpointing.store(false, Ordering::Release);
        match r? {
            Err(missing) => Ok(Err(missing)),
            Ok((s, release)) => {
                self.unstage_snapshot_pages(&release);
                tracing::info!(
                    volume,
                    snapshot = name,
                    mapped_pages = s.mapped_pages(),
                    staged_pages = staged.len() - release.len(),
                    "snapshot installed from another copy"
                );
                Ok(Ok(s))
            }
        }
    }

    /// The space a volume's snapshots hold on their own: per snapshot, the bytes its
    /// deletion would free (the blocks and page blocks nothing else references); and
    /// the bytes of the blocks the volume maps that no snapshot and nothing else
    /// references (`None` without snapshots: then it is the volume's mapped bytes
    /// less what it shares with other volumes, which this does not count). Reads only
    /// the pages where a snapshot differs from the volume; a block referenced outside
    /// them (elsewhere in the volume, by another volume) is nobody's alone. Not
    /// counted (empty) when more than `SPACE_PAGES_MAX` pages differ.
    pub fn snapshot_space(&self, vol: &Volume) -> SnapshotSpace {
        let snaps = vol.snapshots();
        if snaps.is_empty() {
            return SnapshotSpace::default();
        }
        #[derive(Clone, Copy, PartialEq)]
        enum Holder {
            One(usize),
            Many,
        }
        fn add(h: &mut Option<Holder>, who: Holder) {
            *h = match (*h, who) {
                (None, w) => Some(w),
                (Some(Holder::One(a)), Holder::One(b)) if a == b => Some(Holder::One(a)),
                _ => Some(Holder::Many),
            };
        }
        let Some((l1, vol_pages)) = vol.differing_pages(SPACE_PAGES_MAX) else {
            return SnapshotSpace::default();
        };
        let volume = snaps.len();
        // Who names each page content (anywhere), and which contents a snapshot keeps
        // as page blocks (where it differs from the volume).
        let mut namers: HashMap<Checksum, Option<Holder>> = HashMap::new();
        let mut kept: HashSet<Checksum> = HashSet::new();
        for (i, s) in snaps.iter().enumerate() {
            for (p, c) in s.l1.iter().enumerate() {
                if *c != Checksum::ZERO {
                    add(namers.entry(*c).or_default(), Holder::One(i));
                    if l1.get(p) != Some(c) {
                        kept.insert(*c);
                    }
                }
            }
        }
        // Per block: references found, and who they belong to.
        let mut found: HashMap<BlockId, (u32, Option<Holder>)> = HashMap::new();
        let mut out = SnapshotSpace {
            exclusive: snaps.iter().map(|s| (s.name.clone(), 0)).collect(),
            volume_exclusive: Some(0),
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        for c in &kept {
            let id = BlockId(c.0);
            if !matches!(self.blocks.read(id, &mut b), Ok(true)) {
                continue; // lost
            }
            let who = namers[c].expect("named");
            if let (Holder::One(i), Some(1)) = (who, self.blocks.refs(id)) {
                *out.exclusive.get_mut(&snaps[i].name).expect("listed") += BLOCK_SIZE as u64;
            }
            for child in crate::volume::decode_page(&b)
                .iter()
                .filter(|i| !i.is_zero())
            {
                let e = found.entry(*child).or_default();
                e.0 += 1;
                add(&mut e.1, who);
            }
        }
        for (ids, shared) in vol_pages.values() {
            // A page a snapshot shares with the volume: its blocks are both's.
            let who = if *shared {
                Holder::Many
            } else {
                Holder::One(volume)
            };
            for id in ids.iter().filter(|i| !i.is_zero()) {
                let e = found.entry(*id).or_default();
                e.0 += 1;
                add(&mut e.1, who);
            }
        }
        for (id, (n, who)) in found {
            if self.blocks.refs(id) != Some(n) {
                continue; // referenced elsewhere too
            }
            match who {
                Some(Holder::One(i)) if i == volume => {
                    *out.volume_exclusive.as_mut().expect("set") += BLOCK_SIZE as u64
                }
                Some(Holder::One(i)) => {
                    *out.exclusive.get_mut(&snaps[i].name).expect("listed") += BLOCK_SIZE as u64
                }
                _ => {}
            }
        }
        out
    }

    /// Drops a held page block's reference on itself and on each block it names. Each
    /// freed slot is reused only once every journal record written before its release
    /// is durable: the tag is taken under the journal's lock, so a write that unmapped
    /// one of these blocks (and found it still referenced here) is journaled at or
    /// before the tag, and its unmapping is durable before the slot is overwritten.
    fn release_page_block(&self, c: Checksum) {
        let id = BlockId(c.0);
        let mut b = vec![0u8; BLOCK_SIZE];
        let children = match self.blocks.read(id, &mut b) {
            Ok(true) => Some(crate::volume::decode_page(&b)),
            _ => {
                tracing::warn!(page_block = %id.to_hex(), "a released snapshot page does not verify: the blocks it names are freed at the next start");
                None
            }
        };
        let j = self.journal.lock();
        let lsn = j.next_lsn().saturating_sub(1);
        for child in children
            .iter()
            .flat_map(|p| p.iter())
            .filter(|i| !i.is_zero())
        {
            self.blocks.release(*child, lsn);
        }
        self.blocks.release(id, lsn);
        drop(j);
    }

    /// Snapshot `snap`'s page `p`: the 256 ids it maps, from the volume's page when
    /// that still holds it, else from its page block. `None`: neither verifies (lost).
    pub fn snapshot_page(&self, vol: &Volume, snap: &Snapshot, p: u64) -> Option<Page> {
        snapshot_page_of(&self.blocks, vol, snap, p)
    }

    /// Reads whole blocks of snapshot `snap` of `vol`, every block verified against
    /// its id; a page that cannot be proven is an error, never data.
    /// Bytes `offset..offset + length` of snapshot `snap` (any alignment; the caller
    /// keeps the range within the snapshot), every block verified (`read_snapshot`).
    pub fn read_snapshot_range(
        &self,
        vol: &Volume,
        snap: &Snapshot,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ReadError> {
        let first = offset / BLOCK_SIZE_U64;
        let end = (offset + length).div_ceil(BLOCK_SIZE_U64);
        let mut buf = vec![0u8; ((end - first) * BLOCK_SIZE_U64) as usize];
        if !buf.is_empty() {
            self.read_snapshot(vol, snap, Lba(first), &mut buf)?;
        }
        let skip = (offset - first * BLOCK_SIZE_U64) as usize;
        buf.truncate(skip + length as usize);
        buf.drain(..skip);
        Ok(buf)
    }

    pub fn read_snapshot(
        &self,
        vol: &Volume,
        snap: &Snapshot,
        lba: Lba,
        buf: &mut [u8],
    ) -> Result<(), ReadError> {
        assert_eq!(buf.len() % BLOCK_SIZE, 0);
        let n = buf.len() / BLOCK_SIZE;
        assert!(
            lba.0 + n as u64 <= snap.block_count(),
            "read past the end of a snapshot reached the store"
        );
        let mut ids = Vec::with_capacity(n);
        let mut l = lba.0;
        while ids.len() < n {
            let p = l / FANOUT_U64;
            let page = self.snapshot_page(vol, snap, p).ok_or_else(|| {
                tracing::error!(volume = %vol.meta.name, snapshot = %snap.name, page = p, "snapshot page cannot be read or does not verify");
                ReadError::Unrecoverable(Lba(l))
            })?;
            let s = (l % FANOUT_U64) as usize;
            let take = (FANOUT - s).min(n - ids.len());
            ids.extend_from_slice(&page[s..s + take]);
            l += take as u64;
        }
        let ok = self.blocks.read_many(&ids, buf)?;
        if let Some(i) = ok.iter().position(|ok| !ok) {
            let lba = Lba(lba.0 + i as u64);
            tracing::error!(volume = %vol.meta.name, snapshot = %snap.name, lba = lba.0, id = %ids[i].to_hex(), "snapshot block failed verification");
            return Err(ReadError::CorruptBlock {
                lba,
                id: ids[i].to_hex(),
                block: ids[i],
            });
        }
        Ok(())
    }

    /// `Volume::allocation` for a snapshot: runs of (blocks, what) from `first`.
    pub fn snapshot_allocation(
        &self,
        vol: &Volume,
        snap: &Snapshot,
        first: u64,
        count: u64,
        runs_max: usize,
    ) -> Vec<(u64, Allocation)> {
        let end = first.saturating_add(count).min(snap.block_count());
        let mut runs = crate::volume::Runs::new(runs_max);
        let mut l = first;
        while l < end {
            let p = l / FANOUT_U64;
            let page_end = ((p + 1) * FANOUT_U64).min(end);
            let page = self.snapshot_page(vol, snap, p);
            while l < page_end {
                let what = match &page {
                    None => Allocation::Data,
                    Some(pg) => crate::volume::allocation_of(pg[(l % FANOUT_U64) as usize]),
                };
                if !runs.push(1, what) {
                    return runs.done();
                }
                l += 1;
            }
        }
        runs.done()
    }

    /// The blocks of snapshot `b` that differ from snapshot `a` (both of `vol`), as runs
    /// (first LBA, count, whether `b` leaves them unmapped): only pages whose checksums
    /// differ are read, and only slots whose ids differ count. Without `a`, every
    /// mapped block of `b`. A page of either
    /// that cannot be proven is an error (`ReadError::Unrecoverable`).
    pub fn snapshot_diff(
        &self,
        vol: &Volume,
        a: Option<&Snapshot>,
        b: &Snapshot,
    ) -> Result<Vec<(u64, u64, bool)>, ReadError> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |lba: u64, hole: bool| match runs.last_mut() {
            Some((first, n, h)) if *first + *n == lba && *h == hole => *n += 1,
            _ => runs.push((lba, 1, hole)),
        };
        let blocks = b.block_count();
        for p in 0..b.page_count() {
            let cb = b.l1[p as usize];
            let ca = a.and_then(|a| a.l1.get(p as usize).copied());
            if ca == Some(cb) || (a.is_some() && ca.is_none() && cb == Checksum::ZERO) {
                continue;
            }
            if a.is_none() && cb == Checksum::ZERO {
                continue;
            }
            let lost = || ReadError::Unrecoverable(Lba(p * FANOUT_U64));
            let pb = self.snapshot_page(vol, b, p).ok_or_else(lost)?;
            let pa = match (a, ca) {
                (Some(a), Some(_)) => self.snapshot_page(vol, a, p).ok_or_else(lost)?,
                _ => Box::new([BlockId::ZERO; FANOUT]),
            };
            for s in 0..FANOUT {
                let lba = p * FANOUT_U64 + s as u64;
                if lba < blocks && pa[s] != pb[s] {
                    push(lba, pb[s].is_zero());
                }
            }
        }
        Ok(runs)
    }

    /// The blocks where volume `vol` now differs from its snapshot `snap`, as runs
    /// (first LBA, count): what a revert rewrites. A damaged page of the volume counts
    /// whole (rewriting it heals it); blocks past the snapshot's size count where they
    /// are mapped (they read as zeroes in the snapshot).
    pub fn revert_runs(&self, vol: &Volume, snap: &Snapshot) -> Result<Vec<(u64, u64)>, ReadError> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut push = |lba: u64| match runs.last_mut() {
            Some((first, n)) if *first + *n == lba => *n += 1,
            _ => runs.push((lba, 1)),
        };
        let blocks = vol.block_count();
        let zero: Page = Box::new([BlockId::ZERO; FANOUT]);
        for p in 0..vol.page_count() {
            let now = vol.page_ids(p);
            let then = if p < snap.page_count() {
                self.snapshot_page(vol, snap, p)
                    .ok_or(ReadError::Unrecoverable(Lba(p * FANOUT_U64)))?
            } else {
                zero.clone()
            };
            for s in 0..FANOUT {
                let lba = p * FANOUT_U64 + s as u64;
                let differs = match &now {
                    Some(ids) => ids[s] != then[s],
                    None => true,
                };
                if lba < blocks && differs {
                    push(lba);
                }
            }
        }
        Ok(runs)
    }

    /// (mapped blocks, mapped pages) of a snapshot: reads each of its pages.
    pub fn snapshot_usage(&self, vol: &Volume, snap: &Snapshot) -> (u64, u64) {
        let mut blocks = 0;
        let mut pages = 0;
        for p in 0..snap.page_count() {
            if snap.l1[p as usize] == Checksum::ZERO {
                continue;
            }
            pages += 1;
            if let Some(pg) = self.snapshot_page(vol, snap, p) {
                blocks += pg.iter().filter(|i| !i.is_zero()).count() as u64;
            }
        }
        (blocks, pages)
    }

    /// Whether a journal write or a flush failed: the store refuses writes from then on
    /// (what reached the disk is unknown), until it is opened again and replays.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Invalid(
                "the journal could not be written; this node no longer accepts writes".into(),
            ));
        }
        Ok(())
    }

    /// Journal bytes that the page images of the next checkpoint may take: each dirty
    /// slice page, the checksum pages above them (one per level each at most, and no
    /// more than the volumes have), the `blocks.idx` pages changed or to be changed by
    /// the frees pending and one checksum header per volume.
    fn image_bytes_bound(&self) -> u64 {
        let dirty = self.dirty_pages.load(Ordering::Acquire);
        let checksum_pages = (dirty * self.max_levels.load(Ordering::Acquire))
            .min(self.checksum_pages.load(Ordering::Acquire));
        let pages = dirty
            + checksum_pages
            + self.blocks.idx_pages_bound() as u64
            + self.volume_count.load(Ordering::Acquire);
        pages * IMAGE_RECORD_BYTES
    }

    /// Waits until the journal has room for `record_bytes` plus the images of
    /// `pages` more dirty pages, checkpointing when it has not.
    fn admit(
        &self,
        record_bytes: u64,
        pages: u64,
        new_blocks: u64,
    ) -> Result<Admission<'_>, StoreError> {
        let bytes =
            record_bytes + (pages * 4 + new_blocks.div_ceil(FANOUT_U64) + 2) * IMAGE_RECORD_BYTES;
        loop {
            self.check_failed()?;
            let cp = self.cp_lock.read();
            // Checked under the lock: a checkpoint after `seal` waits for this write.
            if self.sealed.load(Ordering::Acquire) {
                return Err(StoreError::Invalid("this node is shutting down".into()));
            }
            let (used, cap) = {
                let j = self.journal.lock();
                (j.used_bytes(), j.capacity())
            };
            let limit = cap - journal::RECORDS_START - JOURNAL_SLACK_BYTES;
            let reserved = self.reserved_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
            if used + reserved + self.image_bytes_bound() <= limit {
                return Ok(Admission {
                    _cp: cp,
                    store: self,
                    bytes,
                });
            }
            self.reserved_bytes.fetch_sub(bytes, Ordering::AcqRel);
            drop(cp);
            assert!(
                bytes < limit / 2,
                "a single request must fit the journal: {bytes} of {limit}"
            );
            if self.checkpoint_running.load(Ordering::Acquire) {
                // The room is freed when the checkpoint under way commits.
                drop(self.checkpoint_lock.lock());
            } else {
                self.checkpoint()?;
            }
        }
    }

    /// Whether the journal is past a quarter full, counting the images the next
    /// checkpoint may write (the node checkpoints in the background): the rest is room
    /// for the writes that go on while a checkpoint writes its images in place.
    pub fn wants_checkpoint(&self) -> bool {
        let (used, cap) = {
            let j = self.journal.lock();
            (j.used_bytes(), j.capacity())
        };
        used + self.image_bytes_bound() > cap / 4
    }

    /// Writes whole blocks at `lba`. `data.len()` is a multiple of 4 KiB; the caller
    /// has checked the range and serializes writes to the same LBAs.
    pub fn write_blocks(&self, vol: &Volume, lba: Lba, data: &[u8]) -> Result<(), WriteError> {
        self.write_blocks_with_ids(vol, lba, data, &block_ids(data))
    }

    /// `write_blocks` with each block's id already known (`block_ids`, computed by
    /// this node or by the volume's primary): the blocks are not hashed again. A block
    /// stored under an id that is not its content's is never served: every read
    /// verifies a block against its id.
    pub fn write_blocks_with_ids(
        &self,
        vol: &Volume,
        lba: Lba,
        data: &[u8],
        ids: &[BlockId],
    ) -> Result<(), WriteError> {
        assert_eq!(data.len() % BLOCK_SIZE, 0);
        assert_eq!(data.len() / BLOCK_SIZE, ids.len(), "one id per block");
        let n = ids.len() as u64;
        if n == 0 {
            return Ok(());
        }
        assert!(
            lba.0 + n <= vol.block_count(),
            "write past the end reached the store"
        );
        let first_page = lba.page().0;
        let last_page = Lba(lba.0 + n - 1).page().0;
        let record_bytes = (journal::RECORD_HEADER_LEN + 20 + ids.len() * 24) as u64;
        let _adm = self.admit(
            record_bytes,
            last_page - first_page + 1,
            n + vol.snapshot_puts(first_page, last_page),
        )?;
        vol.ensure_allocated(first_page, last_page)?;
        // Before any reference is taken or anything journaled: a snapshot's page this
        // change is the first to touch since the checkpoint is kept (a full disk fails
        // the write here, with nothing changed).
        vol.preserve(first_page, last_page, &self.blocks)?;
        let slots = self.blocks.put_many(ids, data)?;
        self.apply(
            vol,
            lba,
            encode_map(vol.meta.uid, lba, ids, &slots),
            KIND_MAP,
            &mut ids.iter().copied(),
        )
    }

    /// Maps `ids.len()` LBAs from `lba` to the given block ids (resync and repair copy
    /// mappings, not data). Every non-zero id must be stored here already or be
    /// supplied, verified, in `supplied`; otherwise nothing changes and the first
    /// missing id is returned as `Ok(Some(id))`.
    pub fn write_ids(
        &self,
        vol: &Volume,
        lba: Lba,
        ids: &[BlockId],
        supplied: &HashMap<BlockId, Vec<u8>>,
    ) -> Result<Option<BlockId>, WriteError> {
        let n = ids.len() as u64;
        if n == 0 {
            return Ok(None);
        }
        let _no_reset = self.reset_lock.read();
        assert!(
            lba.0 + n <= vol.block_count(),
            "mapping past the end reached the store"
        );
        // The content of every block, so that a block freed meanwhile is stored
        // again rather than mapped to a reused slot: put_many dedups by id.
        let mut data = vec![0u8; ids.len() * BLOCK_SIZE];
        for (i, id) in ids.iter().enumerate() {
            let chunk = &mut data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            if id.is_zero() {
                continue;
            }
            match supplied.get(id) {
                Some(b) if BlockId::hash_of(b) == *id => chunk.copy_from_slice(b),
                _ => {
                    if !self.blocks.read(*id, chunk)? {
                        return Ok(Some(*id));
                    }
                }
            }
        }
        let _adm = self.admit_mapping(vol, lba, ids.len(), n)?;
        let slots = self.blocks.put_many(ids, &data)?;
        // A supplied block this store already had (so not written again) may be one
        // whose stored copy no longer verifies: the caller fetched it for that reason.
        // Its slot gets the verified content.
        for (i, id) in ids.iter().enumerate() {
            if slots[i] == crate::blocks::NO_SLOT
                && !id.is_zero()
                && supplied.contains_key(id)
                && !self.blocks.holds_intact(*id)
            {
                self.blocks
                    .rewrite(*id, &data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE])?;
            }
        }
        self.apply(
            vol,
            lba,
            encode_map(vol.meta.uid, lba, ids, &slots),
            KIND_MAP,
            &mut ids.iter().copied(),
        )?;
        Ok(None)
    }

    /// Before `count` LBAs from `lba` are mapped, `new_blocks` of them perhaps to
    /// blocks stored anew: journal room admitted, the slice pages' room reserved, and
    /// the snapshots' view of the pages kept (`Volume::preserve`; a full disk fails
    /// here, with nothing changed).
    fn admit_mapping(
        &self,
        vol: &Volume,
        lba: Lba,
        count: usize,
        new_blocks: u64,
    ) -> Result<Admission<'_>, StoreError> {
        assert!(
            lba.0 + count as u64 <= vol.block_count(),
            "mapping past the end reached the store"
        );
        let first_page = lba.page().0;
        let last_page = Lba(lba.0 + count as u64 - 1).page().0;
        let record_bytes = (journal::RECORD_HEADER_LEN + 20 + count * 24) as u64;
        let adm = self.admit(
            record_bytes,
            last_page - first_page + 1,
            new_blocks + vol.snapshot_puts(first_page, last_page),
        )?;
        vol.ensure_allocated(first_page, last_page)?;
        vol.preserve(first_page, last_page, &self.blocks)?;
        Ok(adm)
    }

    /// Fills the still-unknown slots of damaged page `p` from `ids` (a copy of the
    /// whole page proven current by the caller), storing or taking references on the
    /// blocks as `write_ids` does. Slots written meanwhile keep their new mapping; the
    /// caller holds the page's write locks. Returns the slots filled, or the first id
    /// neither stored here nor supplied.
    pub fn repair_slots(
        &self,
        vol: &Volume,
        p: u64,
        ids: &[BlockId],
        supplied: &HashMap<BlockId, Vec<u8>>,
    ) -> Result<Result<usize, BlockId>, WriteError> {
        assert_eq!(ids.len(), lazarus_types::FANOUT);
        let Some(unknown) = vol.unknown_slots(p) else {
            return Ok(Ok(0));
        };
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for s in unknown {
            match runs.last_mut() {
                Some((a, n)) if *a + *n == s => *n += 1,
                _ => runs.push((s, 1)),
            }
        }
        let mut filled = 0;
        for (a, n) in runs {
            let lba = Lba(p * FANOUT_U64 + a as u64);
            if let Some(missing) = self.write_ids(vol, lba, &ids[a..a + n], supplied)? {
                return Ok(Err(missing));
            }
            filled += n;
        }
        Ok(Ok(filled))
    }

    /// Puts back the content of a stored block that failed verification (`data` was
    /// fetched from another node and hashes to `id`). False if this node no longer
    /// stores `id`.
    pub fn restore_block(&self, id: BlockId, data: &[u8]) -> Result<bool, StoreError> {
        if BlockId::hash_of(data) != id {
            return Err(StoreError::Invalid(
                "restored block does not hash to its id".into(),
            ));
        }
        self.blocks.rewrite(id, data)
    }

    /// Verifies every stored block (the scrubber); returns the ids that fail.
    pub fn verify_blocks(&self, max: usize) -> Result<Vec<BlockId>, StoreError> {
        self.blocks.verify_all(max)
    }

    /// Where the block mapped at `lba` is stored (offset in blocks.dat).
    pub fn block_offset(&self, vol: &Volume, lba: Lba) -> Option<u64> {
        vol.id_at(lba)
            .filter(|i| !i.is_zero())
            .and_then(|i| self.blocks.locate(i))
    }

    /// Where in blocks.dat snapshot `snap` keeps the page holding `lba` (`None`: the
    /// page is all zeroes or read from the volume's slice file) and the block it maps
    /// at `lba` (`None`: a hole): fault injection.
    pub fn snapshot_locate(
        &self,
        vol: &Volume,
        snap: &Snapshot,
        lba: Lba,
    ) -> (Option<u64>, Option<u64>) {
        let p = lba.0 / FANOUT as u64;
        let page_block = snap
            .l1
            .get(p as usize)
            .filter(|c| **c != Checksum::ZERO)
            .and_then(|c| self.blocks.locate(BlockId(c.0)));
        let block = self
            .snapshot_page(vol, snap, p)
            .map(|pg| pg[(lba.0 % FANOUT as u64) as usize])
            .filter(|id| !id.is_zero())
            .and_then(|id| self.blocks.locate(id));
        (page_block, block)
    }

    /// The block ids (page blocks first) snapshot `snap` reads for blocks
    /// `first..first + count` that this store does not hold intact: what a read of them
    /// fails on, for repair from another node. A page that cannot be read at all
    /// hides its blocks until it is repaired.
    pub fn snapshot_damage(
        &self,
        vol: &Volume,
        snap: &Snapshot,
        first: u64,
        count: u64,
    ) -> Vec<BlockId> {
        let mut out = Vec::new();
        if count == 0 {
            return out;
        }
        let last = first + count - 1;
        let mut b = vec![0u8; BLOCK_SIZE];
        for p in first / FANOUT as u64..=last / FANOUT as u64 {
            let Some(c) = snap.l1.get(p as usize).copied() else {
                break;
            };
            if c == Checksum::ZERO {
                continue;
            }
            let Some(pg) = self.snapshot_page(vol, snap, p) else {
                out.push(BlockId(c.0));
                continue;
            };
            let lo = first.max(p * FANOUT as u64) - p * FANOUT as u64;
            let hi = last.min(p * FANOUT as u64 + FANOUT as u64 - 1) - p * FANOUT as u64;
            for id in pg[lo as usize..=hi as usize]
                .iter()
                .filter(|i| !i.is_zero())
            {
                if !matches!(self.blocks.read(*id, &mut b), Ok(true)) && !out.contains(id) {
                    out.push(*id);
                }
            }
        }
        out
    }

    pub fn blocks_path(&self) -> PathBuf {
        self.dir.join("blocks.dat")
    }

    /// Whether the block `id` is stored here (not verified; reading verifies).
    pub fn has_block(&self, id: BlockId) -> bool {
        id.is_zero() || self.blocks.locate(id).is_some()
    }

    /// Reads and verifies the block `id` wherever it is mapped; `Ok(false)` if this
    /// node does not have it intact.
    pub fn read_block(&self, id: BlockId, buf: &mut [u8]) -> Result<bool, StoreError> {
        if id.is_zero() {
            buf.fill(0);
            return Ok(true);
        }
        self.blocks.read(id, buf)
    }

    /// Journals a mapping change and applies it in memory.
    fn apply(
        &self,
        vol: &Volume,
        lba: Lba,
        payload: Vec<u8>,
        kind: u8,
        ids: &mut dyn Iterator<Item = BlockId>,
    ) -> Result<(), WriteError> {
        let lsn = match self.journal.lock().append(kind, &payload) {
            Ok(l) => l,
            Err(e) => {
                self.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, "journal write failed; refusing further writes");
                return Err(e.into());
            }
        };
        let (old, newly_dirty) = vol.set_ids(lba, ids);
        self.dirty_pages
            .fetch_add(newly_dirty as u64, Ordering::AcqRel);
        for id in old {
            self.blocks.release(id, lsn);
        }
        if self.blocks.pending_free_pressure().1 {
            // Overwrites without FLUSH faster than the background flush releases them:
            // make them durable here, or the store would grow with every overwrite.
            self.flush()?;
        }
        Ok(())
    }

    /// Sets `count` blocks from `lba` to zeroes. With `provision`, they are mapped to
    /// a stored zero block rather than left unmapped (NBD_CMD_FLAG_NO_HOLE).
    pub fn write_zeroes(
        &self,
        vol: &Volume,
        lba: Lba,
        count: u64,
        provision: bool,
    ) -> Result<(), WriteError> {
        assert!(
            lba.0 + count <= vol.block_count(),
            "zeroing past the end reached the store"
        );
        let zero = vec![0u8; BLOCK_SIZE];
        let zid = if provision {
            BlockId::hash_of(&zero)
        } else {
            BlockId::ZERO
        };
        let mut done = 0;
        while done < count {
            let l = Lba(lba.0 + done);
            let n = FILL_CHUNK_BLOCKS.min(count - done);
            let pages = Lba(l.0 + n - 1).page().0 - l.page().0 + 1;
            let last = Lba(l.0 + n - 1).page().0;
            let _adm = self.admit(
                (journal::RECORD_HEADER_LEN + 48) as u64,
                pages,
                1 + vol.snapshot_puts(l.page().0, last),
            )?;
            vol.preserve(l.page().0, last, &self.blocks)?;
            let mut slot = NO_SLOT;
            if provision {
                vol.ensure_allocated(l.page().0, Lba(l.0 + n - 1).page().0)?;
                slot = self.blocks.put(zid, &zero)?.unwrap_or(NO_SLOT);
                self.blocks.retain(zid, n - 1);
            }
            self.apply(
                vol,
                l,
                encode_fill(vol.meta.uid, l, n, zid, slot),
                KIND_FILL,
                &mut std::iter::repeat_n(zid, n as usize),
            )?;
            done += n;
        }
        Ok(())
    }

    /// Reads whole blocks. Every block is verified against its id; a block that does
    /// not verify, or an LBA in a damaged page, is an error, never data.
    pub fn read_blocks(&self, vol: &Volume, lba: Lba, buf: &mut [u8]) -> Result<(), ReadError> {
        assert_eq!(buf.len() % BLOCK_SIZE, 0);
        let n = buf.len() / BLOCK_SIZE;
        let mut ids = Vec::with_capacity(n);
        {
            let _whole = vol.reset_gate.read();
            vol.read_ids(lba, &mut ids, n)
                .map_err(ReadError::Unrecoverable)?;
        }
        let ok = self.blocks.read_many(&ids, buf)?;
        for (i, chunk) in buf.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            if ok[i] {
                continue;
            }
            let l = Lba(lba.0 + i as u64);
            let mut id = ids[i];
            let mut tries = 0;
            loop {
                if id.is_zero() {
                    chunk.fill(0);
                    break;
                }
                if self.blocks.read(id, chunk)? {
                    break;
                }
                // The LBA may have been rewritten (and its old slot reused) since the
                // lookup: look again before calling it corruption.
                let now = vol.id_at(l).ok_or(ReadError::Unrecoverable(l))?;
                tries += 1;
                if now == id && tries >= 2 || tries > READ_RETRY_MAX {
                    tracing::error!(volume = %vol.meta.name, lba = l.0, id = %id.to_hex(), "block failed verification");
                    return Err(ReadError::CorruptBlock {
                        lba: l,
                        id: id.to_hex(),
                        block: id,
                    });
                }
                id = now;
            }
        }
        Ok(())
    }

    /// Makes every write completed before the call durable (group commit: concurrent
    /// callers share one sync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        let target = self.journal.lock().next_lsn();
        let _s = self.sync_lock.lock();
        self.flush_locked(target)
    }

    fn flush_locked(&self, target: u64) -> Result<(), StoreError> {
        if self.journal.lock().durable_lsn() >= target {
            return Ok(());
        }
        self.sync_journal(|| {})
    }

    /// `flush`, calling `between` once the journal bytes to sync are taken, before
    /// they are synced: writes made there are not covered by this flush, as writes
    /// made while a flush syncs are not (for the power-loss tests; it runs under the
    /// sync lock, so what it does must not make a durability point itself).
    #[doc(hidden)]
    pub fn flush_with(&self, between: impl FnOnce()) -> Result<(), StoreError> {
        self.check_failed()?;
        let _s = self.sync_lock.lock();
        self.sync_journal(between)
    }

    /// Takes the journal's unwritten bytes, syncs blocks.dat, writes and syncs them,
    /// and frees the slots whose unmapping that made durable (under the sync lock).
    fn sync_journal(&self, between: impl FnOnce()) -> Result<(), StoreError> {
        let (runs, end) = self.journal.lock().take_for_sync();
        between();
        let r = self
            .blocks
            .sync_data()
            .and_then(|_| journal::write_synced(&self.journal_file, &runs));
        if let Err(e) = r {
            // The journal now may have a hole: acknowledging anything more would be a lie.
            self.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "flush failed; refusing further writes");
            return Err(e);
        }
        self.journal.lock().mark_durable(end);
        self.blocks.release_durable(end);
        Ok(())
    }

    /// Writes every changed page in place through the journal and starts a new
    /// journal generation. Writers are held off only while the page images are taken;
    /// they go on (into the next generation) while the images are written in place.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.checkpoint_with(|| {})
    }

    /// `checkpoint`, calling `between` once the page images are journaled and writers
    /// let go again, before the images are written in place: what writers do in that
    /// window (for the power-loss tests; it runs under the checkpoint lock, so it must
    /// not fill the journal: a write would wait for this checkpoint).
    #[doc(hidden)]
    pub fn checkpoint_with(&self, between: impl FnOnce()) -> Result<(), StoreError> {
        let _one = self.checkpoint_lock.lock();
        // The checksums of the pages changed since the last checkpoint, computed a few
        // at a time while writers go on: taking the images then hashes only the pages
        // changed meanwhile.
        for v in self.volumes() {
            let mut rounds = 0;
            while v.refresh_some(REFRESH_CHUNK_PAGES) > REFRESH_CHUNK_PAGES && rounds < 1024 {
                rounds += 1;
            }
        }
        self.checkpointing.store(true, Ordering::Release);
        let t0 = std::time::Instant::now();
        let begun = {
            let _cp = self.cp_lock.write();
            let sync = self.sync_lock.lock();
            self.checkpoint_begin().map(|b| b.map(|b| (b, sync)))
        };
        let held_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.checkpointing.store(false, Ordering::Release);
        match begun? {
            Some((cp, sync)) => {
                let images = cp.images.len();
                let r = self.checkpoint_finish(cp, sync, between);
                tracing::debug!(
                    images,
                    writers_held_ms = held_ms,
                    total_ms = t0.elapsed().as_secs_f64() * 1e3,
                    "checkpoint"
                );
                r
            }
            None => Ok(()),
        }
    }

    /// Grows a volume to `size_bytes` (shrinking is refused: it would discard data).
    /// Writers are held off meanwhile; everything is checkpointed first, so the grow
    /// rewrites files that hold the whole state (see `Volume::grow`).
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<Arc<Volume>, StoreError> {
        lazarus_types::check_volume_size(size_bytes).map_err(StoreError::Invalid)?;
        let v = self
            .volume(name)
            .ok_or_else(|| StoreError::NoSuchVolume(name.to_string()))?;
        if size_bytes < v.size_bytes() {
            return Err(StoreError::Invalid(format!(
                "volume {name:?} is {} bytes: shrinking it to {size_bytes} would discard data; only growing is supported",
                v.size_bytes()
            )));
        }
        if size_bytes == v.size_bytes() {
            return Ok(v);
        }
        self.checkpointing.store(true, Ordering::Release);
        let r = (|| {
            let _one = self.checkpoint_lock.lock();
            let _cp = self.cp_lock.write();
            self.checkpoint_held()?;
            v.grow(size_bytes)
        })();
        self.checkpointing.store(false, Ordering::Release);
        r?;
        self.update_volume_stats();
        Ok(v)
    }

    /// A whole checkpoint; the caller holds `checkpoint_lock` and `cp_lock` for
    /// writing, so the files hold the whole state when this returns.
    fn checkpoint_held(&self) -> Result<(), StoreError> {
        let sync = self.sync_lock.lock();
        match self.checkpoint_begin()? {
            Some(cp) => self.checkpoint_finish(cp, sync, || {}),
            None => Ok(()),
        }
    }

    /// A checkpoint's first part, with writers held off (`cp_lock` for writing) and
    /// the sync lock held: takes the image of every changed page (checksums
    /// recomputed up to the root) and of every changed `blocks.idx` page, reserves
    /// their records at the journal's head, appends an images-done record after them
    /// and begins the journal's next generation, where writes go from now on.
    fn checkpoint_begin(&self) -> Result<Option<Begun>, StoreError> {
        self.check_failed()?;
        let vols = self.volumes();
        let mut images: Vec<(u64, PageImage)> = Vec::new();
        // The damage lists first (the one step of taking images that may fail): a
        // failure here leaves every volume as it was, and the checkpoint is tried again.
        for v in &vols {
            v.persist_damage_now()?;
        }
        for v in &vols {
            // The volumes before this one gave their changed pages up to this
            // checkpoint: a failure here leaves them written nowhere but the journal,
            // whose next generation would drop them, so the store takes no more writes
            // (the next start replays the journal).
            let taken = v.take_images().inspect_err(|e| {
                self.failed.store(true, Ordering::Release);
                tracing::error!(volume = %v.meta.name, error = %e, "checkpoint could not take its page images; refusing further writes");
            })?;
            for img in taken {
                images.push((v.meta.uid, img));
            }
        }
        for (offset, data) in self.blocks.take_dirty_idx_images() {
            images.push((
                0,
                PageImage {
                    kind: FileKind::BlockIndex,
                    offset,
                    data,
                },
            ));
        }
        assert!(
            images.iter().all(|(_, i)| i.data.len() == BLOCK_SIZE),
            "a page image is one page"
        );
        let mut j = self.journal.lock();
        if images.is_empty() && j.used_bytes() == 0 && !j.wants_new_generation() {
            return Ok(None);
        }
        let reserved = j.reserve_records(images.len(), IMAGE_RECORD_BYTES as usize);
        let durable_at = j.begin_generation();
        drop(j);
        // Pages made dirty outside the write path (repair, scrub: no `cp_lock`) after
        // their volume's images were taken stay counted.
        let taken = images
            .iter()
            .filter(|(_, i)| i.kind != FileKind::BlockIndex)
            .count() as u64;
        let _ = self
            .dirty_pages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(taken))
            });
        self.checkpoint_running.store(true, Ordering::Release);
        Ok(Some(Begun {
            images,
            vols,
            durable_at,
            reserved,
        }))
    }

    /// A checkpoint's second part, writers going on: writes the image records into the
    /// room reserved for them and makes the journal durable up to the images-done
    /// record (and the block data every record before it names), holding the sync lock
    /// until then (no durability point may pass records not yet written); then writes
    /// the images in place, syncs the files, and commits the new generation (its header
    /// in both slots), which frees the room of the records before it. A failure here
    /// stops the store taking writes: the next start finishes the checkpoint from the
    /// journal, or replays it without the checkpoint if its images did not get there.
    fn checkpoint_finish(
        &self,
        cp: Begun,
        sync: parking_lot::MutexGuard<'_, ()>,
        between: impl FnOnce(),
    ) -> Result<(), StoreError> {
        let r = (|| {
            let rec_len = cp.reserved.len;
            let mut buf = Vec::with_capacity(IMAGE_WRITE_RECORDS * rec_len);
            let mut next = cp.images.iter();
            for run in &cp.reserved.runs {
                let mut done = 0;
                while done < run.count {
                    let n = (run.count - done).min(IMAGE_WRITE_RECORDS);
                    buf.clear();
                    for (i, (uid, img)) in next.by_ref().take(n).enumerate() {
                        let kind = [img.kind as u8];
                        let parts: [&[u8]; 4] = [
                            &kind,
                            &uid.to_le_bytes(),
                            &img.offset.to_le_bytes(),
                            &img.data,
                        ];
                        journal::encode_record_into(
                            &mut buf,
                            cp.reserved.generation,
                            run.first_lsn + (done + i) as u64,
                            KIND_PAGE_IMAGE,
                            &parts,
                        );
                    }
                    assert_eq!(
                        buf.len(),
                        n * rec_len,
                        "image records of the reserved length"
                    );
                    let offset = run.offset + (done * rec_len) as u64;
                    self.journal_file
                        .write_at(&buf, offset)
                        .map_err(|e| StoreError::io(self.journal_file.path(), e))?;
                    done += n;
                }
            }
            self.flush_locked(cp.durable_at)?;
            drop(sync);
            between();
            let by_uid: HashMap<u64, &Arc<Volume>> =
                cp.vols.iter().map(|v| (v.meta.uid, v)).collect();
            for (uid, img) in &cp.images {
                match img.kind {
                    FileKind::BlockIndex => write_image(self.blocks.idx_file(), img)?,
                    FileKind::Slice if lazarus_types::is_zero(&img.data) => {
                        by_uid[uid].write_zero_slice_image(img.offset)?
                    }
                    k => write_image(by_uid[uid].file(k), img)?,
                }
            }
            self.blocks
                .idx_file()
                .sync_data()
                .map_err(|e| StoreError::io(self.blocks.idx_file().path(), e))?;
            for v in &cp.vols {
                v.sync()?;
            }
            let header = self.journal.lock().next_header();
            if let Some(h) = header {
                journal::write_header(&self.journal_file, &h)?;
                self.journal.lock().committed();
            }
            // The slice files hold every page imaged: those may leave memory now.
            for v in &cp.vols {
                v.images_written(usize::MAX);
            }
            Ok(())
        })();
        self.checkpoint_running.store(false, Ordering::Release);
        if let Err(e) = &r {
            self.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "checkpoint failed; refusing further writes");
        }
        r
    }

    /// File locations of an LBA's slice page, checksum page and block (for `inspect`
    /// and fault injection).
    pub fn locate(&self, vol: &Volume, lba: Lba) -> Locations {
        let (slice_file, slice_offset) = vol.locate_page(lba);
        let (checksum_file, checksum_offset) = vol.locate_checksum_page(lba);
        let id = vol.id_at(lba);
        let block_offset = id
            .filter(|i| !i.is_zero())
            .and_then(|i| self.blocks.locate(i));
        Locations {
            slice_file,
            slice_offset,
            checksum_file,
            checksum_offset,
            block_id: id.map(|i| i.to_hex()),
            block_file: self.dir.join("blocks.dat"),
            block_offset,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Locations {
    pub slice_file: PathBuf,
    pub slice_offset: u64,
    pub checksum_file: PathBuf,
    pub checksum_offset: u64,
    pub block_id: Option<String>,
    pub block_file: PathBuf,
    pub block_offset: Option<u64>,
}

fn write_image(file: &DiskFile, img: &PageImage) -> Result<(), StoreError> {
    let r = if img.kind == FileKind::Slice && lazarus_types::is_zero(&img.data) {
        file.punch_hole(img.offset, BLOCK_SIZE_U64)
    } else {
        file.write_at(&img.data, img.offset)
    };
    r.map_err(|e| StoreError::io(file.path(), e))
}

fn apply_image_record(
    r: &Record,
    by_uid: &HashMap<u64, Arc<Volume>>,
    idx: &DiskFile,
) -> Result<(), StoreError> {
    let p = &r.payload;
    let bad = || StoreError::Corrupted {
        what: "journal page image",
        path: PathBuf::from("journal.log"),
        detail: format!("record {}", r.lsn),
    };
    if p.len() != 17 + BLOCK_SIZE {
        return Err(bad());
    }
    let kind = FileKind::from_u8(p[0]).ok_or_else(bad)?;
    let uid = u64::from_le_bytes(p[1..9].try_into().expect("8"));
    let offset = u64::from_le_bytes(p[9..17].try_into().expect("8"));
    let img = PageImage {
        kind,
        offset,
        data: p[17..].to_vec(),
    };
    match kind {
        FileKind::BlockIndex => write_image(idx, &img),
        k => match by_uid.get(&uid) {
            Some(v) => write_image(v.file(k), &img),
            None => Ok(()), // the volume was deleted after this checkpoint
        },
    }
}

/// Applies map and fill records. Records after the last commit are applied only while
/// every block they newly store verifies on disk; the first that does not ends the
/// replay. Returns how many records were applied (the journal is cut at the next).
fn replay_records(
    records: &[Record],
    by_uid: &HashMap<u64, Arc<Volume>>,
    loaded: &HashMap<String, Arc<Volume>>,
    blocks: &BlockStore,
) -> usize {
    let last_commit = records.iter().rposition(|r| r.kind == KIND_COMMIT);
    for (i, r) in records.iter().enumerate() {
        let committed = last_commit.is_some_and(|c| i < c);
        let vol = |uid: u64| {
            by_uid
                .get(&uid)
                .filter(|v| loaded.contains_key(&v.meta.name))
        };
        match r.kind {
            KIND_MAP => {
                let Some(m) = decode_map(&r.payload) else {
                    return i;
                };
                if !committed
                    && m.entries
                        .iter()
                        .any(|(id, s)| *s != NO_SLOT && !blocks.slot_holds(*s, *id))
                {
                    return i;
                }
                for (id, s) in &m.entries {
                    if *s != NO_SLOT {
                        blocks.assign(*s, *id);
                    }
                }
                if let Some(v) = vol(m.uid) {
                    if fits(m.lba.0, m.entries.len() as u64, v.block_count()) {
                        v.replay_ids(m.lba, &mut m.entries.iter().map(|e| e.0));
                    }
                }
            }
            KIND_FILL => {
                let Some((uid, lba, count, id, slot)) = decode_fill(&r.payload) else {
                    return i;
                };
                if !committed && slot != NO_SLOT && !blocks.slot_holds(slot, id) {
                    return i;
                }
                if slot != NO_SLOT {
                    blocks.assign(slot, id);
                }
                if let Some(v) = vol(uid) {
                    if fits(lba.0, count, v.block_count()) {
                        v.replay_ids(lba, &mut std::iter::repeat_n(id, count as usize));
                    }
                }
            }
            _ => {}
        }
    }
    records.len()
}

/// Whether `count` blocks from `lba` lie inside a volume of `blocks` blocks (numbers
/// from a damaged record may overflow).
fn fits(lba: u64, count: u64, blocks: u64) -> bool {
    lba.checked_add(count).is_some_and(|end| end <= blocks)
}

/// Most pages `Store::snapshot_space` reads (8 GiB of data where snapshots and their
/// volume differ): beyond, it does not count (an answer of the admin API, not a scan).
pub const SPACE_PAGES_MAX: usize = 8192;

/// `Store::snapshot_space`.
#[derive(Debug, Default, Clone)]
pub struct SnapshotSpace {
    /// Snapshot name -> the bytes its deletion would free.
    pub exclusive: BTreeMap<String, u64>,
    /// The bytes the volume alone references (`None`: it has no snapshot).
    pub volume_exclusive: Option<u64>,
}

/// A fresh snapshot id (never 0).
pub fn new_snapshot_id(name: &str) -> u64 {
    new_uid(name)
}

fn new_uid(name: &str) -> u64 {
    let now = lazarus_io::rt::wall_clock_nanos() as u128;
    let mut h = blake3::Hasher::new();
    h.update(name.as_bytes());
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let out = h.finalize();
    let uid = u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"));
    uid.max(1)
}

const _: () = assert!(ID_LEN == 16);

/// The id of each 4 KiB block of `data` (`BlockId::of`: all-zero blocks are
/// `BlockId::ZERO`).
pub fn block_ids(data: &[u8]) -> Vec<BlockId> {
    BlockId::of_each(data)
}

/// `Store::snapshot_page`, with the store's blocks given (while it opens).
fn snapshot_page_of(blocks: &BlockStore, vol: &Volume, snap: &Snapshot, p: u64) -> Option<Page> {
    let c = *snap.l1.get(p as usize)?;
    if c == Checksum::ZERO {
        return Some(Box::new([BlockId::ZERO; FANOUT]));
    }
    if let Some(pg) = vol.shared_page(p, c) {
        return Some(pg);
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    match blocks.read(BlockId(c.0), &mut b) {
        Ok(true) => Some(crate::volume::decode_page(&b)),
        _ => None,
    }
}
