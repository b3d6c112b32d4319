//! A clone shares its snapshot's slice pages until it writes them (docs/format.md,
//! "Clones share their snapshot's pages"): cloning costs the snapshot's checksums,
//! whatever its size, not a mapping per block.
//!
//! When a reset (`reset.rs`) makes a volume D that holds nothing of its own read as
//! snapshot S of another volume V, D *shares* S's pages rather than mapping S's block
//! ids slot by slot: its `base` file names S (written before anything depends on it),
//! and D's tree records S's checksums while its slice file keeps holes there. A page
//! of D that is a hole on disk and recorded with S's checksum is S's page: read from V
//! (or a page block of V's snapshots) when D is loaded, holding no reference of D's
//! (S holds the blocks). The first change to such a page takes D's references on
//! what it names (`Volume::unbase`), and a checkpoint writes it to D's slice file.
//!
//! S must outlive every page D shares with it: deleting S, or V, first makes its
//! clones' shared pages their own (`flatten`: references taken, pages written,
//! checkpointed, then the `base` file removed), and only then deletes.

use super::reset::{remove_intent, ResetIntent};
use super::*;
use crate::volume::BaseLink;

/// A clone's base, in its directory.
pub(super) const BASE_FILE: &str = "base";
const BASE_MAGIC: &[u8; 8] = b"LZBASE01";
/// Pages a share lays per checkpoint: 32 level-1 checksum pages' worth, so that the
/// checkpoint's images (about 35 pages) fit the journal room a writer leaves.
const LAY_PAGES: u64 = 32 * FANOUT_U64;
/// Pages a flatten makes a clone's own per admission.
const FLATTEN_PAGES: usize = 256;

type BaseOf = Option<(Arc<Volume>, Arc<Snapshot>)>;

/// The volumes in the order to load them: each clone after the volume whose snapshot
/// it shares pages with, with that volume and snapshot (`None`: not a clone, or its
/// base is not here, which leaves its shared pages unprovable: damaged). Sets each
/// clone's `Volume::base`. A base file that cannot be read (an I/O error, not a
/// damaged file) stops the open, as a snapshot file's does.
pub(super) fn load_order(
    volumes: &HashMap<String, Arc<Volume>>,
) -> Result<Vec<(Arc<Volume>, BaseOf)>, StoreError> {
    let by_uid: HashMap<u64, &Arc<Volume>> = volumes.values().map(|v| (v.meta.uid, v)).collect();
    let mut todo: Vec<(Arc<Volume>, BaseOf)> = Vec::new();
    let mut names: Vec<&String> = volumes.keys().collect();
    names.sort();
    for name in names {
        let v = &volumes[name];
        let base = read_base(v)?.and_then(|i| {
            let src = by_uid.get(&i.source_uid).filter(|s| s.meta.uid != v.meta.uid);
            let snap = src.and_then(|s| {
                s.snapshots()
                    .into_iter()
                    .find(|x| x.id == i.id && x.root == i.root)
            });
            match (src, snap) {
                (Some(src), Some(snap)) => Some(((*src).clone(), snap)),
                _ => {
                    tracing::error!(volume = %v.meta.name, source = %i.source, snapshot = %i.snapshot, "the snapshot this clone shares pages with is not here: those pages cannot be proven");
                    None
                }
            }
        });
        if let Some((_, snap)) = &base {
            *v.base.lock() = Some(BaseLink {
                source_uid: snap.volume_uid,
                snapshot_id: snap.id,
            });
        }
        todo.push((v.clone(), base));
    }
    let mut order = Vec::with_capacity(todo.len());
    let mut loaded: HashSet<u64> = HashSet::new();
    while !todo.is_empty() {
        let before = todo.len();
        let mut rest = Vec::new();
        for (v, base) in todo {
            if base
                .as_ref()
                .is_some_and(|(src, _)| !loaded.contains(&src.meta.uid))
            {
                rest.push((v, base));
                continue;
            }
            loaded.insert(v.meta.uid);
            order.push((v, base));
        }
        if rest.len() == before {
            // A cycle cannot be made (a base is another volume's snapshot, taken
            // before the clone existed); if one is found, load without the bases.
            for (v, _) in rest.drain(..) {
                tracing::error!(volume = %v.meta.name, "clones naming each other as bases: loaded without");
                *v.base.lock() = None;
                order.push((v, None));
            }
        }
        todo = rest;
    }
    Ok(order)
}

/// A volume's `base` file, if it has one that verifies (one that does not is
/// reported: the pages it would explain are unprovable).
fn read_base(v: &Volume) -> Result<Option<ResetIntent>, StoreError> {
    let path = v.dir.join(BASE_FILE);
    let b = match lazarus_io::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::error!(volume = %v.meta.name, file = %path.display(), error = %e, "a clone's base file cannot be read; the store does not open");
            return Err(StoreError::io(&path, e));
        }
    };
    Ok(ResetIntent::decode_as(&b, BASE_MAGIC)
        .inspect_err(|e| {
            tracing::error!(volume = %v.meta.name, file = %path.display(), error = %e, "a clone's base file does not verify: the pages it shares are unprovable");
        })
        .ok())
}

impl Store {
    /// `VOLUME@SNAPSHOT` a clone still shares pages with, if any.
    pub fn clone_base_of(&self, v: &Volume) -> Option<String> {
        let b = v.base_link()?;
        let src = self
            .volumes()
            .into_iter()
            .find(|s| s.meta.uid == b.source_uid)?;
        let snap = src
            .snapshots()
            .into_iter()
            .find(|s| s.id == b.snapshot_id)?;
        Some(format!("{}@{}", src.meta.name, snap.name))
    }

    /// Whether resetting `d` to `snap` of `s` can share the snapshot's pages: `d` is
    /// another volume holding nothing of its own (a new clone, or one whose share a
    /// crash interrupted), with no other base.
    pub(super) fn can_share(&self, d: &Volume, s: &Volume, snap: &Snapshot) -> bool {
        d.meta.uid != s.meta.uid
            && d.holds_only_base()
            && d.base_link().is_none_or(|b| {
                b == BaseLink {
                    source_uid: s.meta.uid,
                    snapshot_id: snap.id,
                }
            })
    }

    /// A share's step 1: every page of the snapshot can be had here. A page the
    /// source volume still holds (clean, recorded with the snapshot's checksum) is
    /// in its memory, verified when laid; a page block is read and verified now.
    pub(super) fn share_prepare(
        &self,
        d: &Volume,
        s: &Volume,
        snap: &Snapshot,
    ) -> Result<(), StoreError> {
        for p in 0..snap.page_count().min(d.page_count()) {
            let c = snap.l1[p as usize];
            if c != Checksum::ZERO && !d.page_is(p, c) && !s.page_is(p, c) {
                self.reset_target(s, snap, p)?;
            }
        }
        Ok(())
    }

    /// A share's step 3 (the intent is committed): the `base` file, then the
    /// snapshot's pages laid as `d`'s, a checkpoint after each run of them, and the
    /// intent removed. Idempotent: a page laid already is skipped.
    pub(super) fn share_apply(
        &self,
        d: &Volume,
        s: &Volume,
        snap: &Snapshot,
        intent: &ResetIntent,
    ) -> Result<reset::ResetOutcome, StoreError> {
        // Durable before any checkpoint records a page of `d` that only it explains.
        let path = d.dir.join(BASE_FILE);
        disk::write_file_atomic(&path, &intent.encode_as(BASE_MAGIC))
            .map_err(|e| StoreError::io(&path, e))?;
        *d.base.lock() = Some(BaseLink {
            source_uid: s.meta.uid,
            snapshot_id: snap.id,
        });
        let mut out = reset::ResetOutcome::default();
        let whole = d.reset_gate.write();
        let n = snap.page_count().min(d.page_count());
        let mut p0 = 0;
        while p0 < n {
            let end = (p0 + LAY_PAGES).min(n);
            let wanted: Vec<(u64, Checksum)> = (p0..end)
                .map(|p| (p, snap.l1[p as usize]))
                .filter(|(p, c)| *c != Checksum::ZERO && !d.page_is(*p, *c))
                .collect();
            // From the source volume's memory where it still holds them (one lock),
            // else from page blocks.
            let held = s.shared_pages(&wanted);
            let mut lay = Vec::with_capacity(wanted.len());
            for ((p, c), pg) in wanted.into_iter().zip(held) {
                let pg = match pg {
                    Some(pg) => pg,
                    None => self.reset_target(s, snap, p)?,
                };
                out.changed_pages += 1;
                out.changed_blocks += pg.iter().filter(|id| !id.is_zero()).count() as u64;
                lay.push((p, pg, c));
            }
            if !lay.is_empty() {
                // Room for the checksum pages the laying dirties (about 35).
                let adm = self.admit(0, 9, 0)?;
                d.lay_base(lay);
                drop(adm);
                self.checkpoint()?;
            }
            p0 = end;
        }
        drop(whole);
        // Ends in a checkpoint whatever was laid, as a revert does (an empty
        // snapshot lays nothing).
        self.checkpoint()?;
        remove_intent(d)?;
        out.root = d.root().to_hex();
        Ok(out)
    }

    /// Before snapshot `snapshot_id` (any, if `None`) of the volume with uid
    /// `source_uid` is deleted: every clone sharing pages with it makes them its own.
    pub(super) fn flatten_clones_of(
        &self,
        source_uid: u64,
        snapshot_id: Option<u64>,
    ) -> Result<(), StoreError> {
        for d in self.volumes() {
            let Some(b) = d.base_link() else {
                continue;
            };
            if b.source_uid == source_uid && snapshot_id.is_none_or(|id| id == b.snapshot_id) {
                self.flatten(&d)?;
            }
        }
        Ok(())
    }

    /// Makes every page `d` shares with its base its own (references taken, written
    /// at the checkpoint that ends this), then removes the `base` file. A crash
    /// midway leaves the base in place: pages written reload as `d`'s, the rest as
    /// shared.
    fn flatten(&self, d: &Volume) -> Result<(), StoreError> {
        let t0 = std::time::Instant::now();
        let shared = d.based_pages();
        loop {
            let pages = d.some_based_pages(FLATTEN_PAGES);
            if pages.is_empty() {
                break;
            }
            let _adm = self.admit(0, pages.len() as u64, 0)?;
            let mut i = 0;
            while i < pages.len() {
                let mut j = i;
                while j + 1 < pages.len() && pages[j + 1] == pages[j] + 1 {
                    j += 1;
                }
                d.ensure_allocated(pages[i], pages[j])?;
                i = j + 1;
            }
            d.materialize(&pages);
        }
        self.checkpoint()?;
        let path = d.dir.join(BASE_FILE);
        match disk::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&path, e)),
        }
        disk::sync_dir(&d.dir).map_err(|e| StoreError::io(&d.dir, e))?;
        *d.base.lock() = None;
        tracing::info!(volume = %d.meta.name, pages = shared, elapsed_ms = t0.elapsed().as_millis() as u64, "clone no longer shares pages with its snapshot (the snapshot is being deleted)");
        Ok(())
    }
}
