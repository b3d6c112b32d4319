//! Making a volume read as a snapshot, all at once: a revert (a volume to one of its
//! own snapshots) and a clone (a new volume to another volume's snapshot) are both
//! "reset volume D to snapshot S of volume V" (docs/format.md, "Revert and clone").
//!
//! No data is copied or read: D's slots that differ from S are mapped to S's block ids
//! (a reference taken on each), through ordinary journal map records. What makes it
//! atomic across a crash is an intent file, `reset.pending` in D's directory, written
//! (temp file, fsync, rename, fsync directory) after everything that could fail for
//! want of space was done and before the first mapping changes:
//!
//! 1. check: every page of S reads and verifies, every block it names is stored here;
//!    the pages of D that will change get their slice-file room and have their current
//!    content kept as page blocks where one of D's snapshots names it (`preserve`) —
//!    a full disk fails here, with nothing changed;
//! 2. commit: the intent names V (name and uid), S (name, id, root);
//! 3. apply: D's differing slots are mapped to S's ids, a checkpoint makes that
//!    durable (with the damage list, for a damaged page mapped whole), the intent is
//!    removed.
//!
//! A crash before the rename leaves D as it was; after it, `Store::open` finishes the
//! apply (after the journal's replay: what the apply made durable replays, the rest is
//! mapped again; it is idempotent, S never changes). The caller holds D's writers off
//! from before the check until this returns, so no write is acknowledged between the
//! commit and the end, which a finish at the next open would overwrite. A failure
//! after the commit stops the store's writes (`failed`) for the same reason: the next
//! open finishes it.

use super::*;

const RESET_PENDING: &str = "reset.pending";
/// Its temporary name while being written (`disk::write_file_atomic`).
const RESET_TMP: &str = "reset.tmp";
const RESET_MAGIC: &[u8; 8] = b"LZRESET1";
/// Blocks mapped per journal record (4 MiB of the volume).
const RESET_CHUNK_BLOCKS: usize = 1024;

/// What `reset.pending` names: the snapshot the volume is being made to read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ResetIntent {
    pub(super) source: String,
    pub(super) source_uid: u64,
    pub(super) snapshot: String,
    pub(super) id: u64,
    pub(super) root: Checksum,
}

impl ResetIntent {
    /// magic, u16 + source volume name, u64 its uid, u16 + snapshot name, u64 id,
    /// 16-byte root, CRC32C of everything before it.
    fn encode(&self) -> Vec<u8> {
        self.encode_as(RESET_MAGIC)
    }

    fn decode(b: &[u8]) -> Result<ResetIntent, String> {
        Self::decode_as(b, RESET_MAGIC)
    }

    /// The same fields under another magic (a clone's `base` file).
    pub(super) fn encode_as(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.source.len() + self.snapshot.len());
        b.extend_from_slice(magic);
        b.extend_from_slice(&(self.source.len() as u16).to_le_bytes());
        b.extend_from_slice(self.source.as_bytes());
        b.extend_from_slice(&self.source_uid.to_le_bytes());
        b.extend_from_slice(&(self.snapshot.len() as u16).to_le_bytes());
        b.extend_from_slice(self.snapshot.as_bytes());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.root.0);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub(super) fn decode_as(b: &[u8], magic: &[u8; 8]) -> Result<ResetIntent, String> {
        if b.len() < 8 + 4 || &b[..8] != magic {
            return Err("wrong magic".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("reset intent checksum mismatch".into());
        }
        let mut at = 8;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let s = body.get(at..at + n).ok_or("reset intent cut short")?;
            at += n;
            Ok(s)
        };
        let n = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
        let source = String::from_utf8(take(n)?.to_vec()).map_err(|_| "bad source name")?;
        let source_uid = u64::from_le_bytes(take(8)?.try_into().expect("8"));
        let n = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
        let snapshot = String::from_utf8(take(n)?.to_vec()).map_err(|_| "bad snapshot name")?;
        let id = u64::from_le_bytes(take(8)?.try_into().expect("8"));
        let root = Checksum(take(16)?.try_into().expect("16"));
        if at != body.len() {
            return Err("reset intent has trailing bytes".into());
        }
        Ok(ResetIntent {
            source,
            source_uid,
            snapshot,
            id,
            root,
        })
    }
}

/// What resetting a volume to a snapshot changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ResetOutcome {
    /// Blocks of the volume that now map something else.
    pub changed_blocks: u64,
    /// Slice pages with at least one such block.
    pub changed_pages: u64,
    /// The volume's checksum root afterwards (the snapshot's, when the volume is the
    /// snapshot's size): every copy reset to the same snapshot has the same.
    pub root: String,
}

/// Where page `p` of the destination differs from its target: runs of (first slot,
/// target ids), within the destination's `blocks`.
fn differing_runs(
    now: Option<&[BlockId]>,
    target: &[BlockId],
    p: u64,
    blocks: u64,
) -> Vec<(u64, Vec<BlockId>)> {
    let mut runs: Vec<(u64, Vec<BlockId>)> = Vec::new();
    for s in 0..FANOUT {
        let lba = p * FANOUT_U64 + s as u64;
        if lba >= blocks {
            break;
        }
        // A damaged page (None) differs everywhere: mapping it whole heals it.
        if now.is_some_and(|n| n[s] == target[s]) {
            continue;
        }
        match runs.last_mut() {
            Some((first, ids)) if *first + ids.len() as u64 == lba => ids.push(target[s]),
            _ => runs.push((lba, vec![target[s]])),
        }
    }
    runs
}

/// The last step of a reset: its intent removed, durably. A clone's unfilled mark
/// goes first: a mark without the intent means a reset never committed.
pub(super) fn remove_intent(d: &Volume) -> Result<(), StoreError> {
    if d.is_unfilled() {
        let m = d.dir.join(crate::volume::CLONE_PENDING);
        disk::remove_file(&m).map_err(|e| StoreError::io(&m, e))?;
        disk::sync_dir(&d.dir).map_err(|e| StoreError::io(&d.dir, e))?;
        d.unfilled.store(false, Ordering::Release);
    }
    let path = d.dir.join(RESET_PENDING);
    disk::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
    disk::sync_dir(&d.dir).map_err(|e| StoreError::io(&d.dir, e))
}

/// Whether page `p` of `d` is known, without reading it, to hold snapshot `snap`'s
/// page: clean and recorded with the snapshot's checksum (or zeroes on both sides).
fn same_page(d: &Volume, snap: &Snapshot, p: u64) -> bool {
    let c = snap.l1.get(p as usize).copied().unwrap_or(Checksum::ZERO);
    d.page_is(p, c)
}

impl Store {
    /// Makes volume `dst` read as snapshot `name` (with id `id`; 0: whichever) of
    /// volume `src` (the same volume for a revert), atomically across a crash; see the
    /// module's comment. The caller holds `dst`'s writers off until this returns.
    /// `dst` must be at least the snapshot's size; past it, it reads as zeroes.
    pub fn reset_to_snapshot(
        &self,
        dst: &str,
        src: &str,
        name: &str,
        id: u64,
    ) -> Result<ResetOutcome, StoreError> {
        let _one = self.reset_lock.write();
        self.check_failed()?;
        let d = self
            .volume(dst)
            .ok_or_else(|| StoreError::NoSuchVolume(dst.to_string()))?;
        let s = self
            .volume(src)
            .ok_or_else(|| StoreError::NoSuchVolume(src.to_string()))?;
        let snap = s
            .snapshot(name)
            .filter(|x| id == 0 || x.id == id)
            .ok_or_else(|| StoreError::NoSuchSnapshot(format!("{src}@{name}")))?;
        if snap.size_bytes > d.size_bytes() {
            return Err(StoreError::Invalid(format!(
                "volume {dst:?} ({} bytes) is smaller than snapshot {src}@{name} ({} bytes)",
                d.size_bytes(),
                snap.size_bytes
            )));
        }
        let t0 = std::time::Instant::now();
        let share = self.can_share(&d, &s, &snap);
        if share {
            self.share_prepare(&d, &s, &snap)?;
        } else {
            self.reset_prepare(&d, &s, &snap)?;
        }
        let intent = ResetIntent {
            source: src.to_string(),
            source_uid: s.meta.uid,
            snapshot: snap.name.clone(),
            id: snap.id,
            root: snap.root,
        };
        let path = d.dir.join(RESET_PENDING);
        disk::write_file_atomic(&path, &intent.encode()).map_err(|e| StoreError::io(&path, e))?;
        let applied = if share {
            self.share_apply(&d, &s, &snap, &intent)
        } else {
            self.reset_apply(&d, &s, &snap)
        };
        let out = applied.inspect_err(|e| {
            // Committed but not applied: nothing more may be acknowledged (the next
            // open finishes the apply over it).
            self.failed.store(true, Ordering::Release);
            tracing::error!(volume = dst, error = %e, "resetting a volume to a snapshot failed after its commit; refusing further writes until the node restarts and finishes it");
        })?;
        tracing::info!(
            volume = dst,
            source = src,
            snapshot = name,
            changed_blocks = out.changed_blocks,
            changed_pages = out.changed_pages,
            shared = share,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "volume now reads as the snapshot"
        );
        Ok(out)
    }

    /// Page `p` of `snap` (zeroes past its end), or why it cannot be had.
    pub(super) fn reset_target(
        &self,
        s: &Volume,
        snap: &Snapshot,
        p: u64,
    ) -> Result<Page, StoreError> {
        if p >= snap.page_count() {
            return Ok(Box::new([BlockId::ZERO; FANOUT]));
        }
        self.snapshot_page(s, snap, p).ok_or_else(|| {
            StoreError::Invalid(format!(
                "page {p} of snapshot {}@{} cannot be read here (damaged): repair it first (lazarus scrub)",
                s.meta.name, snap.name
            ))
        })
    }

    /// Where page `p` of `d` differs from the snapshot's: runs of (first LBA, ids).
    #[allow(clippy::type_complexity)]
    fn reset_runs(
        &self,
        d: &Volume,
        s: &Volume,
        snap: &Snapshot,
        p: u64,
    ) -> Result<Vec<(u64, Vec<BlockId>)>, StoreError> {
        if same_page(d, snap, p) {
            return Ok(Vec::new());
        }
        let target = self.reset_target(s, snap, p)?;
        let now = d.page_ids(p);
        Ok(differing_runs(
            now.as_deref(),
            &target[..],
            p,
            d.block_count(),
        ))
    }

    /// Step 1: everything that can fail, done before the commit.
    fn reset_prepare(&self, d: &Volume, s: &Volume, snap: &Snapshot) -> Result<(), StoreError> {
        for p in 0..d.page_count() {
            let runs = self.reset_runs(d, s, snap, p)?;
            if runs.is_empty() {
                continue;
            }
            for (_, ids) in &runs {
                if let Some(id) = self.blocks.first_missing(ids) {
                    return Err(StoreError::Invalid(format!(
                        "block {} of snapshot {}@{} is not stored here: repair it first (lazarus scrub)",
                        id.to_hex(),
                        s.meta.name,
                        snap.name
                    )));
                }
            }
            let _adm = self.admit(0, 1, d.snapshot_puts(p, p))?;
            d.ensure_allocated(p, p)?;
            d.preserve(p, p, &self.blocks)?;
        }
        Ok(())
    }

    /// Step 3: maps `d`'s differing slots to the snapshot's ids, makes that durable
    /// and removes the intent. Idempotent.
    fn reset_apply(
        &self,
        d: &Volume,
        s: &Volume,
        snap: &Snapshot,
    ) -> Result<ResetOutcome, StoreError> {
        let mut out = ResetOutcome::default();
        let mut pending: Option<(u64, Vec<BlockId>)> = None;
        let map = |lba: u64, ids: &[BlockId]| -> Result<(), StoreError> {
            match self.map_stored(d, Lba(lba), ids) {
                Ok(None) => Ok(()),
                Ok(Some(id)) => Err(StoreError::Invalid(format!(
                    "block {} of snapshot {}@{} is no longer stored here",
                    id.to_hex(),
                    s.meta.name,
                    snap.name
                ))),
                Err(WriteError::NoSpace) => Err(StoreError::NoSpace),
                Err(WriteError::Store(e)) => Err(e),
            }
        };
        // Readers wait while the mappings change (`Volume::reset_gate`).
        let whole = d.reset_gate.write();
        for p in 0..d.page_count() {
            let runs = self.reset_runs(d, s, snap, p)?;
            if !runs.is_empty() {
                out.changed_pages += 1;
            }
            for (lba, ids) in runs {
                out.changed_blocks += ids.len() as u64;
                match &mut pending {
                    Some((first, acc))
                        if *first + acc.len() as u64 == lba
                            && acc.len() + ids.len() <= RESET_CHUNK_BLOCKS =>
                    {
                        acc.extend(ids)
                    }
                    _ => {
                        if let Some((first, acc)) = pending.take() {
                            map(first, &acc)?;
                        }
                        pending = Some((lba, ids));
                    }
                }
            }
        }
        if let Some((first, acc)) = pending.take() {
            map(first, &acc)?;
        }
        drop(whole);
        // A checkpoint, not just a flush: a damaged page mapped whole is whole again
        // only once the damage list without it is on disk (it is written by
        // checkpoints), or a crash would bring its unknown slots back.
        self.checkpoint()?;
        remove_intent(d)?;
        out.root = d.root().to_hex();
        Ok(out)
    }

    /// Maps `ids.len()` LBAs from `lba` to blocks stored here, taking a reference on
    /// each without reading it (`BlockStore::try_retain_all`); if one is not stored,
    /// nothing changes and it is returned.
    pub(crate) fn map_stored(
        &self,
        vol: &Volume,
        lba: Lba,
        ids: &[BlockId],
    ) -> Result<Option<BlockId>, WriteError> {
        if ids.is_empty() {
            return Ok(None);
        }
        let _adm = self.admit_mapping(vol, lba, ids.len(), 0)?;
        if let Some(missing) = self.blocks.try_retain_all(ids) {
            return Ok(Some(missing));
        }
        self.apply(
            vol,
            lba,
            encode_map(vol.meta.uid, lba, ids, &vec![NO_SLOT; ids.len()]),
            KIND_MAP,
            &mut ids.iter().copied(),
        )?;
        Ok(None)
    }

    /// At open, once the journal has replayed: finishes the resets a crash
    /// interrupted after their commit. Returns the volumes where that failed (a
    /// damaged intent, its snapshot gone or damaged, a full disk...): they are not
    /// served, and the next open tries again.
    pub(super) fn finish_resets(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for d in self.volumes() {
            if let Err(e) = self.finish_reset(&d) {
                tracing::error!(volume = %d.meta.name, error = %e, "an interrupted revert or clone cannot be finished: the volume is not served until it is (the next start tries again)");
                failed.push(d.meta.name.clone());
            }
        }
        failed
    }

    fn finish_reset(&self, d: &Volume) -> Result<(), StoreError> {
        let _ = disk::remove_file(&d.dir.join(RESET_TMP));
        let path = d.dir.join(RESET_PENDING);
        let b = match lazarus_io::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let corrupted = |detail: String| StoreError::Corrupted {
            what: "reset intent (an interrupted revert or clone)",
            path: path.clone(),
            detail,
        };
        let i = ResetIntent::decode(&b).map_err(corrupted)?;
        let s = self
            .volume(&i.source)
            .filter(|s| s.meta.uid == i.source_uid)
            .ok_or_else(|| corrupted(format!("its source volume {:?} is not here", i.source)))?;
        let snap = s
            .snapshot(&i.snapshot)
            .filter(|x| x.id == i.id && x.root == i.root)
            .ok_or_else(|| {
                corrupted(format!(
                    "its snapshot {}@{} is not here or does not verify",
                    i.source, i.snapshot
                ))
            })?;
        tracing::warn!(volume = %d.meta.name, source = %i.source, snapshot = %i.snapshot, "finishing a revert or clone interrupted by a crash");
        let _one = self.reset_lock.write();
        if self.can_share(d, &s, &snap) {
            self.share_apply(d, &s, &snap, &i)?;
        } else {
            self.reset_apply(d, &s, &snap)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_round_trip_and_damage_is_caught() {
        let i = ResetIntent {
            source: "vol0".into(),
            source_uid: 7,
            snapshot: "monday".into(),
            id: 42,
            root: Checksum([9; 16]),
        };
        let b = i.encode();
        assert_eq!(ResetIntent::decode(&b).unwrap(), i);
        for at in 0..b.len() {
            let mut bad = b.clone();
            bad[at] ^= 1;
            assert!(
                ResetIntent::decode(&bad).is_err(),
                "a flip at byte {at} passed"
            );
        }
        assert!(ResetIntent::decode(&b[..b.len() - 1]).is_err());
    }
}
