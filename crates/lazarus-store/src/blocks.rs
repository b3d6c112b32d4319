//! Content-addressed block store: `BlockId -> 4 KiB`, every read verified by hashing.
//!
//! `blocks.dat` holds 4 KiB slots; `blocks.idx` holds the 16-byte id of each slot
//! (all-zero = free), written only by checkpoints (page images through the journal).
//! Between checkpoints the journal's map records carry the slot of each newly stored
//! block. Reference counts are not stored: they are recounted from the slice files at
//! start-up, which makes them impossible to get out of step with the mappings after a
//! crash (see docs/format.md, "Space reclamation"). In memory: the slot array (the
//! image of blocks.idx), a count per slot (20 bytes a slot together), and the id
//! lookup of `id_table` (7 to 13 bytes per stored block).
//!
//! Crash rule: a block is only ever written into a slot that no durable state
//! references. A slot freed by an unmapping is reused only after the journal record of
//! that unmapping is durable (`release_durable`).

use crate::disk::DiskFile;
use crate::error::StoreError;
use crate::id_table::{IdTable, MAX_SLOTS};
use lazarus_types::{BlockId, BLOCK_SIZE, BLOCK_SIZE_U64, FANOUT, ID_LEN};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashSet};
use std::path::Path;

/// Slots added to blocks.dat at a time (1 MiB), so growth costs one fallocate per
/// 256 new blocks.
pub const GROW_SLOTS: u64 = 256;
/// The largest piece blocks.dat is written in (`DiskFile::write_at_in_pieces`): slots
/// are written in runs but reused one at a time, and a 4 KiB write into a page-cache
/// folio, and its writeback at a durability point, cost with the folio's size. The
/// price is on reads: a 4 KiB read from a small folio looks up more of the page cache
/// (BENCHMARKS.md, "Small folios and sooner durability points").
const WRITE_PIECE: u64 = 16 * 1024;
/// Marks "no new slot" in `put_many` results and journal records.
pub const NO_SLOT: u64 = u64::MAX;
/// Pending frees past which the node makes a durability point in the background, so
/// that overwriting without FLUSH cannot grow the store without bound: 32 MiB, or a
/// thirty-second of the stored blocks when that is more (each durability point waits
/// for the disk, so a larger store syncs less often per byte written). Every pending
/// free is a slot the next new block cannot take, so the block file grows by about
/// what is pending when the background flush ends: at an eighth, a 1 GiB volume
/// overwritten sequentially grew its file by 230 MiB per copy, and the page cache with
/// it (BENCHMARKS.md, "Small folios and sooner durability points").
pub const PENDING_FREE_SOFT_MIN: usize = 8 * 1024;
pub const PENDING_FREE_SOFT_FRACTION: usize = 32;
/// Pending frees past which a writer makes the durability point itself before going
/// on (backpressure when the background flush cannot keep up): 4x an eighth of the
/// stored blocks (at least 4x the soft minimum). Kept apart from the soft limit: a
/// lower soft limit starts background flushes sooner, and must not put writers into
/// the backpressure path sooner too.
pub const PENDING_FREE_HARD_FRACTION: usize = 8;
pub const PENDING_FREE_HARD_FACTOR: usize = 4;

/// Hashes a BlockId by its first 8 bytes: ids are already uniformly random (BLAKE3),
/// so SipHash on them only costs time.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

/// The (soft, hard) pending-free limits for `stored_blocks` blocks that stay: not
/// counting the blocks awaiting a free, which the index holds until they are freed.
/// Counted, the limits grew with the pending frees themselves: overwrites faster than
/// durability points could hold as many pending as live blocks (a 1 GiB volume's
/// block file reached 2.16 GB in BENCHMARKS.md's run); not counted, the hard limit
/// caps the file at about 1.5x the live blocks.
fn limits(stored_blocks: usize) -> (usize, usize) {
    let soft = PENDING_FREE_SOFT_MIN.max(stored_blocks / PENDING_FREE_SOFT_FRACTION);
    let hard = PENDING_FREE_SOFT_MIN.max(stored_blocks / PENDING_FREE_HARD_FRACTION)
        * PENDING_FREE_HARD_FACTOR;
    (soft, hard)
}

#[derive(Debug, Default)]
struct Index {
    /// slot -> id; `BlockId::ZERO` marks a free slot (the in-memory image of
    /// blocks.idx).
    slots: Vec<BlockId>,
    /// slot -> references to the block in it (meaningful for the slot `table` names
    /// for its id; 0 for any other).
    refs: Vec<u32>,
    /// id -> slot, 4 bytes an entry (`IdTable`).
    table: IdTable,
    free: Vec<u64>,
    pending_free: Vec<(BlockId, u64)>,
    dirty_idx_pages: BTreeSet<u64>,
    /// Ids referenced by a slice page but absent from the store (found at start-up).
    missing: HashSet<BlockId, IdBuildHasher>,
}

impl Index {
    fn slot_of(&self, id: &BlockId) -> Option<u64> {
        self.table.get(id, &self.slots)
    }

    fn holds(&self, id: &BlockId) -> bool {
        self.table.contains(id, &self.slots)
    }

    /// `limits` for the blocks that stay (`table` still names those awaiting a free).
    fn limits(&self) -> (usize, usize) {
        limits(self.table.len().saturating_sub(self.pending_free.len()))
    }

    /// The references of `id`, if stored.
    fn refs_mut(&mut self, id: &BlockId) -> Option<&mut u32> {
        let slot = self.slot_of(id)?;
        Some(&mut self.refs[slot as usize])
    }

    /// Drops `id` from the table and frees nothing: its slot keeps the id until the
    /// caller clears it (`clear_slot`). Returns the slot.
    fn unlink(&mut self, id: &BlockId) -> Option<u64> {
        self.table.remove(id, &self.slots)
    }

    fn clear_slot(&mut self, slot: u64) {
        self.slots[slot as usize] = BlockId::ZERO;
        self.refs[slot as usize] = 0;
        self.dirty_idx_pages.insert(slot / FANOUT as u64);
    }

    /// Memory the index takes, in bytes (allocated capacity).
    fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<BlockId>()
            + self.refs.capacity() * 4
            + self.table.bytes()
            + self.free.capacity() * 8
            + self.pending_free.capacity() * std::mem::size_of::<(BlockId, u64)>()
    }
}

#[derive(Debug)]
pub struct BlockStore {
    data: DiskFile,
    idx: DiskFile,
    inner: Mutex<Index>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct BlockStats {
    pub blocks: u64,
    pub slots: u64,
    pub free_slots: u64,
    pub pending_free: u64,
    pub missing: u64,
    /// Memory the block index takes (ids, counts, the lookup table, free lists).
    pub index_bytes: u64,
}

impl BlockStore {
    /// Opens the store and reads blocks.idx; reference counts start at zero and are
    /// established with `add_ref` followed by `finish_recovery`.
    pub fn open(dir: &Path) -> Result<BlockStore, StoreError> {
        let dp = dir.join("blocks.dat");
        let ip = dir.join("blocks.idx");
        let data = DiskFile::open(&dp, true).map_err(|e| StoreError::io(&dp, e))?;
        let idx = DiskFile::open(&ip, true).map_err(|e| StoreError::io(&ip, e))?;
        let slot_count = data.size_bytes().map_err(|e| StoreError::io(&dp, e))? / BLOCK_SIZE_U64;
        if slot_count > MAX_SLOTS {
            return Err(StoreError::Corrupted {
                what: "block file",
                path: dp,
                detail: format!("{slot_count} slots, more than a store can index ({MAX_SLOTS})"),
            });
        }
        let mut ix = Index {
            slots: vec![BlockId::ZERO; slot_count as usize],
            refs: vec![0; slot_count as usize],
            ..Default::default()
        };
        // Read in 1 MiB pieces: the whole index at once would double the memory peak.
        let mut raw = vec![0u8; 65536 * ID_LEN];
        let mut slot = 0usize;
        while slot < slot_count as usize {
            let n = (slot_count as usize - slot).min(65536);
            idx.read_at(&mut raw[..n * ID_LEN], (slot * ID_LEN) as u64)
                .map_err(|e| StoreError::io(&ip, e))?;
            for chunk in raw[..n * ID_LEN].chunks_exact(ID_LEN) {
                let id = BlockId(chunk.try_into().expect("16 bytes"));
                if !id.is_zero() {
                    ix.slots[slot] = id;
                    // A duplicate id (same content in two slots) keeps the first slot;
                    // the other is freed by finish_recovery.
                    if !ix.holds(&id) {
                        ix.table.insert(slot as u64, &ix.slots);
                    }
                }
                slot += 1;
            }
        }
        Ok(BlockStore {
            data,
            idx,
            inner: Mutex::new(ix),
        })
    }

    /// Replays a journal slot assignment: `id` was stored in `slot`.
    pub fn assign(&self, slot: u64, id: BlockId) {
        let mut guard = self.inner.lock();
        let ix = &mut *guard;
        if slot as usize >= ix.slots.len() {
            // The journal names a slot past the end of blocks.dat: the grow did not
            // survive the crash, so neither did the block. Verification in replay
            // catches this before we get here for records after the last commit.
            tracing::warn!(slot, "journal names a slot beyond blocks.dat; ignoring");
            return;
        }
        let old = ix.slots[slot as usize];
        if !old.is_zero() && old != id && ix.slot_of(&old) == Some(slot) {
            ix.unlink(&old);
        }
        if id.is_zero() {
            // Never written by a store (zeroes are not stored); a damaged record's:
            // the slot holds nothing known.
            ix.clear_slot(slot);
            return;
        }
        ix.slots[slot as usize] = id;
        ix.refs[slot as usize] = 0;
        // Another slot holding the same id loses its entry (finish_recovery frees it).
        if let Some(other) = ix.table.insert(slot, &ix.slots) {
            ix.refs[other as usize] = 0;
        }
        ix.dirty_idx_pages.insert(slot / FANOUT as u64);
    }

    /// Counts one reference found in a slice page during recovery.
    pub fn add_ref(&self, id: BlockId) {
        let mut ix = self.inner.lock();
        match ix.refs_mut(&id) {
            Some(r) => *r += 1,
            None => {
                ix.missing.insert(id);
            }
        }
    }

    /// After recovery: frees every slot that no slice page references. Returns the
    /// number of referenced ids that have no stored block.
    pub fn finish_recovery(&self) -> usize {
        self.finish_recovery_with(false)
    }

    /// `finish_recovery`; with `keep_unreferenced`, a stored block nothing counted is
    /// kept, with a reference pinned until the next start: some volume could not be
    /// loaded, and its references went uncounted (its blocks must outlive this run).
    /// Only a block whose slot still holds it (read and verified) is kept: an index
    /// entry may be stale (a slot freed and reused before a crash), and one kept would
    /// let a later write of that content map a slot holding something else.
    pub fn finish_recovery_with(&self, keep_unreferenced: bool) -> usize {
        let mut ix = self.inner.lock();
        let ix = &mut *ix;
        ix.free.clear();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for slot in (0..ix.slots.len()).rev() {
            let id = ix.slots[slot];
            if id.is_zero() {
                ix.free.push(slot as u64);
                continue;
            }
            let entry = ix.slot_of(&id) == Some(slot as u64);
            if keep_unreferenced && entry && ix.refs[slot] == 0 {
                let intact = self
                    .data
                    .read_at(&mut buf, slot as u64 * BLOCK_SIZE_U64)
                    .is_ok()
                    && BlockId::hash_of(&buf) == id;
                if intact {
                    ix.refs[slot] = 1;
                }
            }
            if !(entry && ix.refs[slot] > 0) {
                if entry {
                    ix.unlink(&id);
                }
                ix.clear_slot(slot as u64);
                ix.free.push(slot as u64);
            }
        }
        ix.missing.len()
    }

    /// Reads the content stored in `slot` and checks it hashes to `id` (replay of
    /// records that were not covered by a commit).
    pub fn slot_holds(&self, slot: u64, id: BlockId) -> bool {
        // A slot number from a damaged record may lie past any file.
        let Some(at) = slot.checked_mul(BLOCK_SIZE_U64) else {
            return false;
        };
        if at >= self.data.size_bytes().unwrap_or(0) {
            return false;
        }
        let mut buf = vec![0u8; BLOCK_SIZE];
        self.data.read_at(&mut buf, at).is_ok() && BlockId::hash_of(&buf) == id
    }

    /// Takes a reference on `id`, storing `data` if the store does not have it.
    /// Returns the slot when the block was newly written.
    pub fn put(&self, id: BlockId, data: &[u8]) -> Result<Option<u64>, StoreError> {
        debug_assert!(!id.is_zero());
        let slot = self.put_many(&[id], data)?[0];
        Ok((slot != NO_SLOT).then_some(slot))
    }

    /// `put` at recovery, before references are counted: stores the block if absent
    /// and takes no reference (the recount does).
    pub fn put_unreferenced(&self, id: BlockId, data: &[u8]) -> Result<(), StoreError> {
        if !self.holds_intact(id) {
            self.forget_stale(id);
        }
        self.put(id, data)?;
        if let Some(r) = self.inner.lock().refs_mut(&id) {
            *r = r.saturating_sub(1);
        }
        Ok(())
    }

    /// Whether `id` is stored and its slot's content verifies.
    pub fn holds_intact(&self, id: BlockId) -> bool {
        let mut b = vec![0u8; BLOCK_SIZE];
        matches!(self.read(id, &mut b), Ok(true))
    }

    /// At recovery, before references are counted: drops the index entry of `id`, whose
    /// slot does not hold it (its slot is freed by `finish_recovery` unless another
    /// entry claims it), so that a later `put` stores the content again.
    pub fn forget_stale(&self, id: BlockId) {
        let mut ix = self.inner.lock();
        if let Some(slot) = ix.unlink(&id) {
            ix.clear_slot(slot);
        }
    }

    /// `put` for the blocks of one request: one index lock, and new blocks that land in
    /// consecutive slots go to disk in one write. Returns, per block, the slot it was
    /// newly written to or `NO_SLOT` (already stored, or the zero id, which is skipped).
    pub fn put_many(&self, ids: &[BlockId], data: &[u8]) -> Result<Vec<u64>, StoreError> {
        debug_assert_eq!(data.len(), ids.len() * BLOCK_SIZE);
        let mut out = vec![NO_SLOT; ids.len()];
        let mut guard = self.inner.lock();
        let ix = &mut *guard;
        let mut fresh: Vec<(u64, usize)> = Vec::new();
        let mut deduped: Vec<BlockId> = Vec::new();
        let mut failed = None;
        for (i, id) in ids.iter().enumerate() {
            if id.is_zero() {
                continue;
            }
            if let Some(r) = ix.refs_mut(id) {
                *r += 1;
                deduped.push(*id);
                continue;
            }
            let slot = match ix.free.pop() {
                Some(s) => s,
                None => match self.grow(ix) {
                    Ok(s) => s,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                },
            };
            ix.slots[slot as usize] = *id;
            ix.refs[slot as usize] = 1;
            ix.table.insert(slot, &ix.slots);
            fresh.push((slot, i));
            out[i] = slot;
        }
        if failed.is_none() {
            // Written under the index lock: a concurrent put of the same id must not
            // map to a slot whose content is not there yet.
            let mut runs = fresh.clone();
            runs.sort_unstable();
            let mut k = 0;
            while k < runs.len() {
                let mut end = k + 1;
                while end < runs.len()
                    && runs[end].0 == runs[end - 1].0 + 1
                    && runs[end].1 == runs[end - 1].1 + 1
                {
                    end += 1;
                }
                let (slot0, i0) = runs[k];
                let bytes = &data[i0 * BLOCK_SIZE..(i0 + end - k) * BLOCK_SIZE];
                if let Err(e) =
                    self.data
                        .write_at_in_pieces(bytes, slot0 * BLOCK_SIZE_U64, WRITE_PIECE)
                {
                    failed = Some(StoreError::io(self.data.path(), e));
                    break;
                }
                k = end;
            }
        }
        if let Some(e) = failed {
            // Nothing of this request was journaled: undo it all.
            for (slot, i) in fresh {
                ix.unlink(&ids[i]);
                ix.slots[slot as usize] = BlockId::ZERO;
                ix.refs[slot as usize] = 0;
                ix.free.push(slot);
            }
            for id in deduped {
                if let Some(r) = ix.refs_mut(&id) {
                    *r -= 1;
                }
            }
            return Err(e);
        }
        for (slot, i) in fresh {
            ix.missing.remove(&ids[i]);
            ix.dirty_idx_pages.insert(slot / FANOUT as u64);
        }
        Ok(out)
    }

    /// Reads the blocks `ids` into consecutive 4 KiB chunks of `buf`, one read per run
    /// of consecutive slots, and verifies each. Returns per block whether it verified
    /// (the zero id reads as zeroes and always verifies).
    pub fn read_many(&self, ids: &[BlockId], buf: &mut [u8]) -> Result<Vec<bool>, StoreError> {
        debug_assert_eq!(buf.len(), ids.len() * BLOCK_SIZE);
        let slots: Vec<Option<u64>> = {
            let ix = self.inner.lock();
            ids.iter()
                .map(|id| if id.is_zero() { None } else { ix.slot_of(id) })
                .collect()
        };
        let mut ok = vec![false; ids.len()];
        // Read: one `pread` per run of consecutive slots.
        let mut i = 0;
        while i < ids.len() {
            let Some(s0) = slots[i] else {
                if ids[i].is_zero() {
                    buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0);
                    ok[i] = true;
                }
                i += 1;
                continue;
            };
            let mut end = i + 1;
            while end < ids.len() && slots[end] == Some(s0 + (end - i) as u64) {
                end += 1;
            }
            self.data
                .read_at(
                    &mut buf[i * BLOCK_SIZE..end * BLOCK_SIZE],
                    s0 * BLOCK_SIZE_U64,
                )
                .map_err(|e| StoreError::io(self.data.path(), e))?;
            i = end;
        }
        // Verified per run of read blocks in the buffer, whatever their slots: blocks
        // scattered on disk (slots reused after random overwrites) are still hashed
        // many at once, not one at a time.
        let mut i = 0;
        while i < ids.len() {
            if slots[i].is_none() {
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < ids.len() && slots[end].is_some() {
                end += 1;
            }
            let got = BlockId::hash_each(&buf[i * BLOCK_SIZE..end * BLOCK_SIZE]);
            for (j, id) in (i..end).zip(got) {
                ok[j] = id == ids[j];
            }
            i = end;
        }
        Ok(ok)
    }

    /// How many references `id` has (`None`: not stored).
    pub fn refs(&self, id: BlockId) -> Option<u32> {
        self.inner.lock().refs_mut(&id).map(|r| *r)
    }

    /// Takes a reference on `id` if the store holds it (a block whose last reference
    /// went is kept until its slot is freed, and comes back); `false` if it does not.
    pub fn try_retain(&self, id: BlockId) -> bool {
        let mut ix = self.inner.lock();
        match ix.refs_mut(&id) {
            Some(r) => {
                *r = r.checked_add(1).expect("reference count overflow");
                true
            }
            None => false,
        }
    }

    /// Takes a reference on every non-zero id of `ids` if the store holds them all
    /// (atomically: under one lock, so none is freed in between); otherwise takes
    /// none and returns the first it lacks. A block is mapped this way without being
    /// read: whoever reads it later verifies it against its id.
    pub fn try_retain_all(&self, ids: &[BlockId]) -> Option<BlockId> {
        let mut ix = self.inner.lock();
        if let Some(missing) = ids.iter().find(|id| !id.is_zero() && !ix.holds(id)) {
            return Some(*missing);
        }
        for id in ids.iter().filter(|id| !id.is_zero()) {
            let r = ix.refs_mut(id).expect("checked above");
            *r = r.checked_add(1).expect("reference count overflow");
        }
        None
    }

    /// Takes a reference on each non-zero id of `ids` the store holds, under one lock;
    /// an id it does not hold (lost) is skipped, as a slice page naming it is counted
    /// at recovery.
    pub fn retain_stored(&self, ids: &[BlockId]) {
        let mut ix = self.inner.lock();
        for id in ids.iter().filter(|id| !id.is_zero()) {
            if let Some(r) = ix.refs_mut(id) {
                *r = r.checked_add(1).expect("reference count overflow");
            }
        }
    }

    /// The first non-zero id of `ids` the store does not hold.
    pub fn first_missing(&self, ids: &[BlockId]) -> Option<BlockId> {
        let ix = self.inner.lock();
        ids.iter()
            .find(|id| !id.is_zero() && !ix.holds(id))
            .copied()
    }

    /// Takes `n` more references on a block already held by the caller.
    pub fn retain(&self, id: BlockId, n: u64) {
        if n == 0 {
            return;
        }
        let mut ix = self.inner.lock();
        let r = ix
            .refs_mut(&id)
            .expect("retain of a block the caller holds");
        *r = r.checked_add(n as u32).expect("reference count overflow");
    }

    fn grow(&self, ix: &mut Index) -> Result<u64, StoreError> {
        let start = ix.slots.len() as u64;
        let mut added = GROW_SLOTS;
        if start + added > MAX_SLOTS {
            // As many blocks as the index can name (16 TiB): the store is full.
            return Err(StoreError::NoSpace);
        }
        // Near a full disk, a whole 1 MiB may not fit when one slot still does.
        if self.reserve(start, added).is_err() {
            added = 1;
            self.reserve(start, added)?;
        }
        // Grow by an eighth at a time beyond the step: `Vec`'s doubling would leave up
        // to half of these two arrays unused.
        let want = (start + added) as usize;
        reserve_step(&mut ix.slots, want);
        reserve_step(&mut ix.refs, want);
        ix.slots.resize(want, BlockId::ZERO);
        ix.refs.resize(want, 0);
        ix.free.extend((start + 1..start + added).rev());
        Ok(start)
    }

    fn reserve(&self, start: u64, count: u64) -> Result<(), StoreError> {
        crate::disk::check_headroom(self.data.path(), count * BLOCK_SIZE_U64)
            .map_err(|e| StoreError::io(self.data.path(), e))?;
        self.data
            .allocate(start * BLOCK_SIZE_U64, count * BLOCK_SIZE_U64)
            .map_err(|e| StoreError::io(self.data.path(), e))?;
        // blocks.idx must be able to take the ids of the new slots at the next
        // checkpoint without running out of space.
        let idx_end = (start + count).div_ceil(FANOUT as u64) * BLOCK_SIZE_U64;
        self.idx
            .allocate(0, idx_end)
            .map_err(|e| StoreError::io(self.idx.path(), e))
    }

    /// Drops a reference taken by `put` or counted at recovery. The slot is not
    /// reused before the journal record at `lsn` (which unmapped it) is durable.
    pub fn release(&self, id: BlockId, lsn: u64) {
        if id.is_zero() {
            return;
        }
        let mut ix = self.inner.lock();
        if let Some(r) = ix.refs_mut(&id) {
            assert!(*r > 0, "reference count underflow for {id:?}");
            *r -= 1;
            if *r == 0 {
                ix.pending_free.push((id, lsn));
            }
        }
    }

    /// Frees the slots whose unmapping is durable (journal LSN below `durable_lsn`,
    /// or all of them when `durable_lsn` is `u64::MAX`).
    pub fn release_durable(&self, durable_lsn: u64) {
        let mut ix = self.inner.lock();
        let ix = &mut *ix;
        let pending = std::mem::take(&mut ix.pending_free);
        // A block whose last reference went, then came back (a write of the same
        // content) and went again has two entries: only once the later unmapping is
        // durable may its slot be reused. Freed at the earlier one, a crash before the
        // later one is durable would bring back a mapping to a reused slot.
        let later: HashSet<BlockId, IdBuildHasher> = pending
            .iter()
            .filter(|(_, lsn)| *lsn >= durable_lsn)
            .map(|(id, _)| *id)
            .collect();
        let mut freed = Vec::new();
        for (id, lsn) in pending {
            if lsn >= durable_lsn {
                ix.pending_free.push((id, lsn));
                continue;
            }
            if later.contains(&id) {
                continue;
            }
            if let Some(slot) = ix.slot_of(&id) {
                if ix.refs[slot as usize] == 0 {
                    ix.unlink(&id);
                    ix.clear_slot(slot);
                    freed.push(slot);
                }
            }
        }
        // The free list pops from its end: push in descending order so that new
        // blocks get ascending, mostly consecutive slots (one write, one read per run).
        freed.sort_unstable_by(|a, b| b.cmp(a));
        ix.free.extend(freed);
    }

    /// (soft, hard) pending-free limits for the current store size.
    pub fn pending_free_limits(&self) -> (usize, usize) {
        self.inner.lock().limits()
    }

    /// Whether the pending frees are over the (soft, hard) limits.
    pub fn pending_free_pressure(&self) -> (bool, bool) {
        let ix = self.inner.lock();
        let (soft, hard) = ix.limits();
        (ix.pending_free.len() > soft, ix.pending_free.len() > hard)
    }

    /// Whether the pending frees are within an eighth of the hard limit of it: writes
    /// under way (each frees at most a block per block it writes) may take them past
    /// it, and the write that does makes the durability point itself.
    pub fn pending_free_near_hard(&self) -> bool {
        let ix = self.inner.lock();
        let (_, hard) = ix.limits();
        ix.pending_free.len() + hard / 8 > hard
    }

    /// Reads and verifies the block `id`. `Ok(false)`: the store has no such block or
    /// its content does not hash to `id` (corruption); `buf` then holds nothing useful.
    pub fn read(&self, id: BlockId, buf: &mut [u8]) -> Result<bool, StoreError> {
        let slot = match self.inner.lock().slot_of(&id) {
            Some(s) => s,
            None => return Ok(false),
        };
        self.data
            .read_at(buf, slot * BLOCK_SIZE_U64)
            .map_err(|e| StoreError::io(self.data.path(), e))?;
        Ok(BlockId::hash_of(buf) == id)
    }

    /// Writes `data` (already verified against `id`) into the slot of `id`, under the
    /// index lock so the slot cannot change hands meanwhile.
    pub fn rewrite(&self, id: BlockId, data: &[u8]) -> Result<bool, StoreError> {
        let ix = self.inner.lock();
        let Some(slot) = ix.slot_of(&id) else {
            return Ok(false);
        };
        self.data
            .write_at(data, slot * BLOCK_SIZE_U64)
            .map_err(|e| StoreError::io(self.data.path(), e))?;
        tracing::info!(id = %id.to_hex(), slot, "corrupt block restored from another copy");
        Ok(true)
    }

    /// Reads every stored block and returns up to `max` ids whose content no longer
    /// hashes to them (or cannot be read).
    pub fn verify_all(&self, max: usize) -> Result<Vec<BlockId>, StoreError> {
        let mut bad = Vec::new();
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut slot = 0u64;
        loop {
            // A slot at a time, the lock taken for each: writes go on meanwhile.
            let id = {
                let ix = self.inner.lock();
                if slot as usize >= ix.slots.len() {
                    break;
                }
                let id = ix.slots[slot as usize];
                if id.is_zero() || ix.slot_of(&id) != Some(slot) {
                    slot += 1;
                    continue;
                }
                id
            };
            let ok = self.data.read_at(&mut buf, slot * BLOCK_SIZE_U64).is_ok()
                && BlockId::hash_of(&buf) == id;
            // The slot may have been freed and reused meanwhile: check it still holds id.
            if !ok && self.inner.lock().slot_of(&id) == Some(slot) {
                bad.push(id);
                if bad.len() >= max {
                    break;
                }
            }
            slot += 1;
        }
        Ok(bad)
    }

    /// Where `id` is stored (file offset in blocks.dat), for tools and fault injection.
    pub fn locate(&self, id: BlockId) -> Option<u64> {
        self.inner.lock().slot_of(&id).map(|s| s * BLOCK_SIZE_U64)
    }

    pub fn sync_data(&self) -> Result<(), StoreError> {
        self.data
            .sync_data()
            .map_err(|e| StoreError::io(self.data.path(), e))
    }

    /// Images of the blocks.idx pages changed since the last checkpoint.
    pub fn take_dirty_idx_images(&self) -> Vec<(u64, Vec<u8>)> {
        let mut ix = self.inner.lock();
        let pages = std::mem::take(&mut ix.dirty_idx_pages);
        pages
            .into_iter()
            .map(|p| {
                let mut b = vec![0u8; BLOCK_SIZE];
                let start = (p as usize) * FANOUT;
                let end = (start + FANOUT).min(ix.slots.len());
                for (i, id) in ix.slots[start..end].iter().enumerate() {
                    b[i * ID_LEN..(i + 1) * ID_LEN].copy_from_slice(&id.0);
                }
                (p * BLOCK_SIZE_U64, b)
            })
            .collect()
    }

    /// `blocks.idx` pages the next checkpoint may have to write: those changed, and
    /// one per pending free (its release changes the page of its slot), at most as
    /// many as the index has.
    pub fn idx_pages_bound(&self) -> usize {
        let ix = self.inner.lock();
        let pages = ix.slots.len().div_ceil(FANOUT);
        (ix.dirty_idx_pages.len() + ix.pending_free.len()).min(pages)
    }

    pub fn idx_file(&self) -> &DiskFile {
        &self.idx
    }

    pub fn stats(&self) -> BlockStats {
        let ix = self.inner.lock();
        BlockStats {
            blocks: ix.table.len() as u64,
            slots: ix.slots.len() as u64,
            free_slots: ix.free.len() as u64,
            pending_free: ix.pending_free.len() as u64,
            missing: ix.missing.len() as u64,
            index_bytes: ix.bytes() as u64,
        }
    }
}

/// Makes room in `v` for `want` elements, growing by at least an eighth: less slack
/// than `Vec`'s doubling for the arrays that take a few bytes per stored block.
fn reserve_step<T>(v: &mut Vec<T>, want: usize) {
    if v.capacity() < want {
        let more = (want - v.len()).max(v.len() / 8);
        v.reserve_exact(more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u8) -> Vec<u8> {
        let mut b = vec![seed; BLOCK_SIZE];
        b[0] = seed.wrapping_add(1);
        b
    }

    #[test]
    fn put_dedupes_and_reads_verify() {
        let dir = tempfile::tempdir().unwrap();
        let bs = BlockStore::open(dir.path()).unwrap();
        let a = block(1);
        let id = BlockId::of(&a);
        let slot = bs.put(id, &a).unwrap();
        assert!(slot.is_some());
        assert_eq!(
            bs.put(id, &a).unwrap(),
            None,
            "second put of the same content dedupes"
        );
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert!(bs.read(id, &mut buf).unwrap());
        assert_eq!(buf, a);
        // Flip a byte on disk: the read reports corruption instead of data.
        let off = bs.locate(id).unwrap();
        bs.data.write_at(&[0xAA], off + 100).unwrap();
        assert!(!bs.read(id, &mut buf).unwrap());
        assert!(!bs.read(BlockId::of(&block(9)), &mut buf).unwrap());
    }

    /// Blocks read together whose slots are scattered (and some zero, some missing)
    /// are verified each against its own id: a corrupt one among them is reported,
    /// and only it.
    #[test]
    fn read_many_verifies_each_block_of_scattered_slots() {
        let dir = tempfile::tempdir().unwrap();
        let bs = BlockStore::open(dir.path()).unwrap();
        let blocks: Vec<Vec<u8>> = (0..40u8).map(block).collect();
        for b in &blocks {
            bs.put(BlockId::of(b), b).unwrap();
        }
        // Every third block, backwards: no two consecutive slots in a row.
        let mut ids: Vec<BlockId> = (0..40)
            .rev()
            .step_by(3)
            .map(|i| BlockId::of(&blocks[i]))
            .collect();
        ids.insert(4, BlockId::ZERO);
        ids.insert(9, BlockId::of(&block(200)));
        let corrupt = ids[6];
        let off = bs.locate(corrupt).unwrap();
        bs.data.write_at(&[0x55], off + 4000).unwrap();
        let mut buf = vec![0xEEu8; ids.len() * BLOCK_SIZE];
        let ok = bs.read_many(&ids, &mut buf).unwrap();
        for (i, id) in ids.iter().enumerate() {
            let got = &buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            match i {
                4 => assert!(ok[i] && got.iter().all(|b| *b == 0), "the zero block"),
                9 => assert!(!ok[i], "a block the store lacks is not reported read"),
                6 => assert!(!ok[i], "the corrupt block is reported"),
                _ => assert!(
                    ok[i] && BlockId::of(got) == *id,
                    "block {i} read and verified"
                ),
            }
        }
    }

    #[test]
    fn slots_are_reused_only_after_durable_release() {
        let dir = tempfile::tempdir().unwrap();
        let bs = BlockStore::open(dir.path()).unwrap();
        let a = block(1);
        let ida = BlockId::of(&a);
        let sa = bs.put(ida, &a).unwrap().unwrap();
        bs.release(ida, 5);
        let b = block(2);
        let sb = bs.put(BlockId::of(&b), &b).unwrap().unwrap();
        assert_ne!(
            sa, sb,
            "a slot whose unmapping is not durable must not be reused"
        );
        bs.release_durable(5);
        assert_eq!(bs.stats().pending_free, 1);
        bs.release_durable(6);
        assert_eq!(bs.stats().pending_free, 0);
        let c = block(3);
        // Free list pops the most recently freed slot first.
        assert_eq!(bs.put(BlockId::of(&c), &c).unwrap(), Some(sa));
    }

    /// A block released, taken again (a write of the same content) and released again
    /// is freed only once the second release is durable: the first one's durability
    /// says nothing about the mapping that took it back.
    #[test]
    fn a_block_taken_back_is_freed_only_when_its_last_release_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let bs = BlockStore::open(dir.path()).unwrap();
        let a = block(1);
        let ida = BlockId::of(&a);
        let sa = bs.put(ida, &a).unwrap().unwrap();
        bs.release(ida, 5);
        assert_eq!(bs.put(ida, &a).unwrap(), None, "taken back, deduplicated");
        bs.release(ida, 10);
        bs.release_durable(8);
        assert_eq!(
            bs.locate(ida),
            Some(sa * BLOCK_SIZE_U64),
            "freed at the earlier release"
        );
        let b = block(2);
        assert_ne!(bs.put(BlockId::of(&b), &b).unwrap(), Some(sa));
        bs.release_durable(11);
        assert_eq!(bs.locate(ida), None);
        assert_eq!(bs.stats().pending_free, 0);
    }

    #[test]
    fn recovery_frees_unreferenced_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (ida, idb);
        {
            let bs = BlockStore::open(dir.path()).unwrap();
            let a = block(1);
            let b = block(2);
            ida = BlockId::of(&a);
            idb = BlockId::of(&b);
            bs.put(ida, &a).unwrap();
            bs.put(idb, &b).unwrap();
            for (off, img) in bs.take_dirty_idx_images() {
                bs.idx.write_at(&img, off).unwrap();
            }
        }
        let bs = BlockStore::open(dir.path()).unwrap();
        bs.add_ref(ida);
        bs.add_ref(BlockId::of(&block(7)));
        assert_eq!(bs.finish_recovery(), 1);
        let s = bs.stats();
        assert_eq!(s.blocks, 1);
        assert_eq!(s.free_slots, s.slots - 1);
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert!(bs.read(ida, &mut buf).unwrap());
        assert!(!bs.read(idb, &mut buf).unwrap());
    }
}
