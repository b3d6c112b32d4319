//! The recovery server's durable state: one coordination file for all volumes (failure
//! count IDs, holders, configuration copies) and one changed-block log per volume.
//!
//! Coordination file `coord.json`: a 64-hex-digit BLAKE3 of the JSON body, a newline,
//! the body. Replaced atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old or the new version, never a mix; a file whose
//! hash does not match is refused with an error rather than read.
//!
//! Changed-block log `logs/<volume>.<uid>.log`: a sequence of records, each
//!
//! ```text
//! magic u32 "LZRL" | kind u8 | 3 zero bytes | seq u64 | lba u64 | count u32 |
//! data_len u32 | fcid u64 | epoch u64 | data[data_len] | blake3(header+data)[..16]
//! ```
//!
//! (little-endian; a 48-byte header). A record is acknowledged only after `fdatasync`
//! (group commit: one sync covers every record written before it). On open, a record
//! that is short or fails its checksum *at the end* of the file is a torn tail: cut
//! (truncated) and logged, never replayed. A bad record followed by valid ones is
//! damage in the middle, not a torn write: the file is kept, the log is marked
//! `damaged` (its damaged byte ranges are skipped when read and reported), and a
//! restore that needs the lost records refuses rather than serve wrong data.
//!
//! Compaction: a log grows with every write for as long as the volume is in jeopardy,
//! though a restore needs only the latest record of each block. Once a log has doubled
//! since it was last compacted (and is past `COMPACT_MIN_BYTES`), its records that later
//! ones wholly rewrite are left out of a new file: the kept records are copied, in
//! order and byte for byte, to `<log>.compact`, which is fsynced and renamed over the
//! log (then the directory is fsynced). A crash leaves the old log or the new one; a
//! leftover `.compact` file is removed at open. Replaying the compacted log in order
//! gives the same volume as replaying the old one. Offsets change: readers carry the
//! log's `generation` and start again when it changed. A damaged log is never
//! compacted (its damage is evidence a restore must see).

use lazarus_rpc::fs::{self as fsx, File};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub const MAGIC: u32 = u32::from_le_bytes(*b"LZRL");
pub const HEADER_BYTES: usize = 48;
pub const TRAILER_BYTES: usize = 16;
/// Largest payload of one record (a 32 MiB NBD write is split by the primary).
pub const DATA_MAX: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Write = 1,
    Zero = 2,
    /// Zeroes mapped to a stored zero block (`NBD_CMD_FLAG_NO_HOLE`).
    ZeroProvision = 3,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::ZeroProvision),
            _ => None,
        }
    }
}

/// One logged change: `count` blocks at `lba`; `data` holds them for a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub seq: u64,
    pub lba: u64,
    pub count: u32,
    pub fcid: u64,
    pub epoch: u64,
    pub data: Vec<u8>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES + self.data.len() + TRAILER_BYTES);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.push(self.kind as u8);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.lba.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.fcid.to_le_bytes());
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.data);
        let sum = blake3::hash(&b);
        b.extend_from_slice(&sum.as_bytes()[..TRAILER_BYTES]);
        b
    }

    /// Decodes the record at the start of `buf`: `Ok(Some((record, length)))`, `Ok(None)`
    /// when `buf` is shorter than the record claims, `Err` when it is not a valid record.
    pub fn decode(buf: &[u8]) -> Result<Option<(Record, usize)>, String> {
        if buf.len() < HEADER_BYTES {
            return Ok(None);
        }
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(0) != MAGIC {
            return Err("bad magic".into());
        }
        let kind = RecordKind::from_u8(buf[4]).ok_or("bad record kind")?;
        let data_len = u32_at(28) as usize;
        let count = u32_at(24);
        if data_len > DATA_MAX
            || (kind == RecordKind::Write && data_len != count as usize * lazarus_types::BLOCK_SIZE)
            || (kind != RecordKind::Write && data_len != 0)
        {
            return Err("bad record length".into());
        }
        let total = HEADER_BYTES + data_len + TRAILER_BYTES;
        if buf.len() < total {
            return Ok(None);
        }
        let sum = blake3::hash(&buf[..HEADER_BYTES + data_len]);
        if sum.as_bytes()[..TRAILER_BYTES] != buf[HEADER_BYTES + data_len..total] {
            return Err("checksum mismatch".into());
        }
        Ok(Some((
            Record {
                kind,
                seq: u64_at(8),
                lba: u64_at(16),
                count,
                fcid: u64_at(32),
                epoch: u64_at(40),
                data: buf[HEADER_BYTES..HEADER_BYTES + data_len].to_vec(),
            },
            total,
        )))
    }
}

/// What opening a log found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogScan {
    pub records: u64,
    pub bytes: u64,
    pub last_seq: u64,
    /// Bytes cut from the end (a torn tail).
    pub torn_bytes: u64,
    /// Byte ranges in the middle that hold no valid record (damage).
    pub damaged: Vec<(u64, u64)>,
}

/// How far past its end a change log may grow between two checks of the file
/// system's free space.
const ROOM_STEP: u64 = 1 << 20;

/// One volume's changed-block log.
pub struct ChangeLog {
    file: File,
    path: PathBuf,
    pub scan: LogScan,
    /// Bytes written (the next record's offset).
    end: u64,
    /// Appends up to this offset leave the file system's headroom free (checked in
    /// steps of `ROOM_STEP`, not at every record).
    room_to: u64,
    /// Bytes known durable.
    synced: u64,
    next_seq: u64,
    /// Every valid record's place (see `Entry`).
    entries: Vec<Entry>,
    /// Random, new at every open and compaction: offsets are valid within one.
    generation: u64,
    /// The size after the last compaction (at open: the bytes a compaction would
    /// keep; after a failed attempt: the size then).
    compacted_bytes: u64,
    /// Compactions since open (offsets from before the first stay valid without a
    /// generation: readers of an older version send none).
    compactions: u64,
    /// The log was deleted (the volume left jeopardy): a compaction must not put a
    /// file back.
    retired: bool,
    /// A sync failed: what was written since the last good sync may be gone from the
    /// page cache while a later sync succeeds, so nothing more is acknowledged from
    /// this log until the server restarts and rescans the file (as the block store
    /// latches its own fsync errors).
    failed: Option<String>,
}

/// Where a valid record lies in the file and what it covers: the index a read that
/// skips superseded records works from (32 bytes a record; the data stays on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub len: u64,
    pub lba: u64,
    pub count: u64,
}

/// Decodes the record at `off`, reading only it (at most `DATA_MAX` and its framing):
/// `Ok(None)` when the file ends inside it, `Err` when no valid record starts there.
fn record_at(
    file: &File,
    off: u64,
    file_len: u64,
) -> io::Result<Result<Option<(Record, usize)>, String>> {
    if off + HEADER_BYTES as u64 > file_len {
        return Ok(Ok(None));
    }
    let mut head = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut head, off)?;
    // A valid header decodes to "short": that checks magic, kind and length first.
    if let Err(e) = Record::decode(&head) {
        return Ok(Err(e));
    }
    let data_len = u32::from_le_bytes(head[28..32].try_into().expect("4 bytes")) as u64;
    let total = HEADER_BYTES as u64 + data_len + TRAILER_BYTES as u64;
    if off + total > file_len {
        return Ok(Ok(None));
    }
    let mut buf = vec![0u8; total as usize];
    file.read_exact_at(&mut buf, off)?;
    Ok(Record::decode(&buf))
}

/// The next offset at or after `from` where the record magic appears (a candidate
/// record start), reading 1 MiB at a time.
fn next_magic(file: &File, from: u64, file_len: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    let magic = MAGIC.to_le_bytes();
    let mut at = from;
    while at < file_len {
        let n = CHUNK.min(file_len - at) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, at)?;
        if let Some(i) = buf.windows(4).position(|w| w == magic) {
            return Ok(Some(at + i as u64));
        }
        if n < 4 {
            return Ok(None);
        }
        // Overlap by 3 bytes so a magic split across chunks is found.
        at += n as u64 - 3;
    }
    Ok(None)
}

/// Scans the file record by record (never holding more than one record in memory) and
/// classifies it into valid records, damaged middle ranges and a torn tail. Returns the
/// scan, the end of the last valid record, and the index of valid records.
fn scan(file: &File) -> io::Result<(LogScan, u64, Vec<Entry>)> {
    let len = file.len()?;
    let mut s = LogScan::default();
    let mut entries = Vec::new();
    let mut off = 0u64;
    let mut bad_start: Option<u64> = None;
    let mut valid_end = 0u64;
    while off < len {
        match record_at(file, off, len)? {
            Ok(Some((r, n))) => {
                if let Some(b) = bad_start.take() {
                    s.damaged.push((b, off - b));
                }
                s.records += 1;
                s.last_seq = s.last_seq.max(r.seq);
                entries.push(Entry {
                    offset: off,
                    len: n as u64,
                    lba: r.lba,
                    count: r.count as u64,
                });
                off += n as u64;
                valid_end = off;
            }
            Ok(None) | Err(_) => {
                // Look for the next valid record: only a valid one after this point
                // makes this damage rather than a torn tail.
                bad_start.get_or_insert(off);
                off = next_magic(file, off + 1, len)?.unwrap_or(len);
            }
        }
    }
    s.bytes = valid_end;
    s.torn_bytes = len - valid_end;
    Ok((s, valid_end, entries))
}

/// Offsets of the records every block of which a later record rewrites: replaying the
/// others, in order, gives the same volume (a rejoining copy then writes each block
/// once). Newest first, with the set of blocks already covered as merged ranges.
pub fn superseded(entries: &[Entry]) -> std::collections::HashSet<u64> {
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = std::collections::HashSet::new();
    for e in entries.iter().rev() {
        let (a, b) = (e.lba, e.lba + e.count);
        if e.count == 0 {
            continue;
        }
        let inside = covered
            .range(..=a)
            .next_back()
            .is_some_and(|(_, end)| *end >= b);
        if inside {
            out.insert(e.offset);
            continue;
        }
        // Merge [a, b) into the covered ranges.
        let (mut start, mut end) = (a, b);
        if let Some((s0, e0)) = covered.range(..=a).next_back().map(|(s, e)| (*s, *e)) {
            if e0 >= a {
                start = s0;
                end = end.max(e0);
                covered.remove(&s0);
            }
        }
        let overlapping: Vec<(u64, u64)> =
            covered.range(start..=end).map(|(s, e)| (*s, *e)).collect();
        for (s0, e0) in overlapping {
            end = end.max(e0);
            covered.remove(&s0);
        }
        covered.insert(start, end);
    }
    out
}

/// Logs smaller than this are never compacted.
pub const COMPACT_MIN_BYTES: u64 = 64 << 20;

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Compaction {
    pub records_before: u64,
    pub records_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

fn compact_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".compact");
    PathBuf::from(p)
}

/// Copies the records at `entries` (skipping the offsets in `drop`) from `from` to
/// the end of `to` at `*at`; returns the new index entries.
fn copy_records(
    from: &File,
    to: &File,
    entries: &[Entry],
    drop: &std::collections::HashSet<u64>,
    at: &mut u64,
) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for e in entries.iter().filter(|e| !drop.contains(&e.offset)) {
        buf.resize(e.len as usize, 0);
        from.read_exact_at(&mut buf, e.offset)?;
        to.write_all_at(&buf, *at)?;
        out.push(Entry { offset: *at, ..*e });
        *at += e.len;
    }
    Ok(out)
}

/// The first step of a compaction, run without the log's lock: the kept records of
/// the synced part, copied to the new file.
pub struct CompactDraft {
    generation: u64,
    /// How many entries of the log the draft covers.
    covered: usize,
    /// Taken by the log once renamed into place.
    file: Option<File>,
    path: PathBuf,
    entries: Vec<Entry>,
    end: u64,
    /// Renamed into place: nothing to remove on drop.
    installed: bool,
}

impl Drop for CompactDraft {
    fn drop(&mut self) {
        if !self.installed {
            let _ = fsx::remove_file(&self.path);
        }
    }
}

impl ChangeLog {
    pub fn open(path: &Path) -> io::Result<ChangeLog> {
        // A compaction that a crash interrupted before its rename.
        let leftover = compact_path(path);
        if fsx::exists(&leftover) {
            tracing::warn!(file = %leftover.display(), "recovery log: unfinished compaction removed");
            fsx::remove_file(&leftover)?;
        }
        let existed = fsx::exists(path);
        let file = fsx::open_rw(path, true, false)?;
        if !existed {
            // A new log's name must be durable before any record in it is
            // acknowledged: syncing the file's data does not sync its directory entry
            // (found by the simulator: a crash lost a fresh log whole).
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                fsx::sync_dir(dir)?;
            }
        }
        let (scan, valid_end, entries) = scan(&file)?;
        if scan.torn_bytes > 0 {
            tracing::warn!(log = %path.display(), bytes = scan.torn_bytes, "recovery log: torn tail cut");
            file.set_len(valid_end)?;
            file.sync_all()?;
        }
        if !scan.damaged.is_empty() {
            tracing::error!(log = %path.display(), ranges = ?scan.damaged, "recovery log: damaged records in the middle (kept, skipped, reported)");
        }
        // What a compaction would keep: the next one waits until the log is twice
        // that (not twice its size at open, which may be mostly superseded records).
        let dropped = superseded(&entries);
        let live: u64 = entries
            .iter()
            .filter(|e| !dropped.contains(&e.offset))
            .map(|e| e.len)
            .sum();
        Ok(ChangeLog {
            file,
            path: path.to_path_buf(),
            end: valid_end,
            room_to: valid_end,
            synced: valid_end,
            next_seq: scan.last_seq + 1,
            scan,
            entries,
            generation: fastrand::u64(1..),
            compacted_bytes: live,
            compactions: 0,
            retired: false,
            failed: None,
        })
    }

    /// Offsets into this log are valid while this stays the same.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether an offset handed out with `generation` is still one of this log's
    /// record boundaries (0: a reader of an older version, which sends none).
    pub fn offsets_valid(&self, generation: u64) -> bool {
        generation == self.generation || generation == 0 && self.compactions == 0
    }

    /// The log is being deleted: no compaction may put a file back.
    pub fn retire(&mut self) {
        self.retired = true;
    }

    /// A compaction failed: the next waits until the log doubled again.
    pub fn compaction_failed(&mut self) {
        self.compacted_bytes = self.end;
    }

    /// Whether the log has grown enough since its last compaction to compact it.
    pub fn wants_compaction(&self, min_bytes: u64) -> bool {
        self.end >= min_bytes
            && self.end >= 2 * self.compacted_bytes.max(1)
            && self.failed.is_none()
            && self.scan.damaged.is_empty()
    }

    /// Starts a compaction: a snapshot of the synced records to copy without the lock
    /// (`CompactDraft::copy`), then `finish_compaction` under it.
    pub fn start_compaction(&self) -> io::Result<Option<(File, Vec<Entry>, CompactDraft)>> {
        if self.failed.is_some() || !self.scan.damaged.is_empty() || self.retired {
            return Ok(None);
        }
        let entries: Vec<Entry> = self
            .entries
            .iter()
            .copied()
            .take_while(|e| e.offset + e.len <= self.synced)
            .collect();
        let tmp = compact_path(&self.path);
        let file = fsx::open_rw(&tmp, true, true)?;
        let draft = CompactDraft {
            generation: self.generation,
            covered: entries.len(),
            file: Some(file),
            path: tmp,
            entries: Vec::new(),
            end: 0,
            installed: false,
        };
        Ok(Some((self.file.try_clone()?, entries, draft)))
    }

    /// Ends a compaction whose draft copied the kept records of the snapshot: copies
    /// the records appended since, syncs the new file and puts it in place of the log.
    /// The caller holds the log's sync lock too (no sync in flight), so every record
    /// is synced here first. `Ok(None)`: the log changed under the draft (another
    /// compaction, a failure): nothing done.
    pub fn finish_compaction(&mut self, mut d: CompactDraft) -> io::Result<Option<Compaction>> {
        if d.generation != self.generation
            || self.failed.is_some()
            || !self.scan.damaged.is_empty()
            || self.retired
        {
            return Ok(None);
        }
        if self.synced < self.end {
            // Records written and not yet synced (their writers wait for the sync
            // lock, which the caller holds): synced here, and a failure latched as
            // any failed sync of the log is.
            if let Err(e) = self.file.sync_data() {
                self.latch_failure(&e.to_string());
                return Err(e);
            }
            self.synced = self.end;
        }
        let newer = self.entries[d.covered..].to_vec();
        let Some(new) = d.file.take() else {
            return Ok(None);
        };
        let more = copy_records(&self.file, &new, &newer, &Default::default(), &mut d.end)?;
        d.entries.extend(more);
        new.sync_all()?;
        fsx::rename(&d.path, &self.path)?;
        // From here the new file is the log, whatever happens next.
        d.installed = true;
        let report = Compaction {
            records_before: self.entries.len() as u64,
            records_after: d.entries.len() as u64,
            bytes_before: self.end,
            bytes_after: d.end,
        };
        // Reopened by its name: the handle written through named the draft (a file
        // system that resolves handles by path would lose it with the rename).
        drop(new);
        self.file = match fsx::open_rw(&self.path, false, false) {
            Ok(f) => f,
            Err(e) => {
                self.latch_failure(&format!("reopening the compacted log: {e}"));
                return Err(e);
            }
        };
        self.entries = std::mem::take(&mut d.entries);
        self.end = d.end;
        self.room_to = d.end;
        self.synced = d.end;
        self.compacted_bytes = d.end;
        self.compactions += 1;
        self.generation = fastrand::u64(1..);
        self.scan.records = self.entries.len() as u64;
        self.scan.bytes = d.end;
        // The rename is durable only with the directory: until then a crash may bring
        // back the old log, which holds every record too; but a failed directory sync
        // may have lost more, so nothing more is acknowledged from this log.
        let dir_synced = match self.path.parent() {
            Some(dir) => fsx::sync_dir(dir),
            None => Ok(()),
        };
        if let Err(e) = dir_synced {
            self.latch_failure(&format!("directory sync after compaction: {e}"));
            return Err(e);
        }
        Ok(Some(report))
    }

    /// Compacts at once (both steps under the caller's exclusive access).
    pub fn compact(&mut self) -> io::Result<Option<Compaction>> {
        let Some((from, entries, mut d)) = self.start_compaction()? else {
            return Ok(None);
        };
        d.copy(&from, &entries)?;
        self.finish_compaction(d)
    }

    /// Records a failed sync: from now on every append and sync is refused.
    pub fn latch_failure(&mut self, error: &str) {
        if self.failed.is_none() {
            tracing::error!(log = %self.path.display(), error, "recovery log sync failed: refusing every append until restart");
            self.failed = Some(error.to_string());
        }
    }

    /// The latched sync failure, if any.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn bytes(&self) -> u64 {
        self.end
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Writes a record (not yet durable); returns its sequence and the offset it ends
    /// at, to pass to `sync_to`.
    pub fn append(
        &mut self,
        kind: RecordKind,
        lba: u64,
        count: u32,
        fcid: u64,
        epoch: u64,
        data: &[u8],
    ) -> io::Result<(u64, u64)> {
        if let Some(e) = &self.failed {
            return Err(io::Error::other(format!(
                "an earlier sync of this log failed ({e}); appends are refused until the recovery server restarts"
            )));
        }
        let r = Record {
            kind,
            seq: self.next_seq,
            lba,
            count,
            fcid,
            epoch,
            data: data.to_vec(),
        };
        let bytes = r.encode();
        // Client data: it may not take the space the nodes' metadata on the same file
        // system needs to go on working (`check_headroom`); refused with ENOSPC.
        let end = self.end + bytes.len() as u64;
        if end > self.room_to {
            fsx::check_headroom(&self.path, end - self.end + ROOM_STEP)?;
            self.room_to = end + ROOM_STEP;
        }
        if let Err(e) = self.file.write_all_at(&bytes, self.end) {
            // Whatever part landed is a torn tail: cut it so the next record starts
            // on a record boundary.
            let _ = self.file.set_len(self.end);
            return Err(e);
        }
        self.entries.push(Entry {
            offset: self.end,
            len: bytes.len() as u64,
            lba,
            count: count as u64,
        });
        self.end += bytes.len() as u64;
        self.next_seq += 1;
        self.scan.records += 1;
        self.scan.bytes = self.end;
        self.scan.last_seq = r.seq;
        Ok((r.seq, self.end))
    }

    /// A handle to sync with outside the append lock (group commit).
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    pub fn synced(&self) -> u64 {
        self.synced
    }

    pub fn mark_synced(&mut self, upto: u64) {
        self.synced = self.synced.max(upto);
    }

    /// The index of valid records, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Reads valid records starting at byte `offset` (a record boundary from an earlier
    /// read, or 0) up to about `max_bytes`, leaving out those at the offsets in `skip`
    /// (superseded ones); returns them, the offset to continue from, and how many it
    /// left out. Damaged ranges are skipped.
    pub fn read_skipping(
        &self,
        offset: u64,
        max_bytes: usize,
        skip: Option<&std::collections::HashSet<u64>>,
    ) -> io::Result<(Vec<Record>, u64, u64)> {
        if self.scan.damaged.is_empty() {
            if let Ok(i) = self.entries.binary_search_by_key(&offset, |e| e.offset) {
                return self.read_runs(i, max_bytes, skip);
            }
        }
        self.read_each(offset, max_bytes, skip)
    }

    /// `read_skipping` record by record, past damaged ranges.
    fn read_each(
        &self,
        offset: u64,
        max_bytes: usize,
        skip: Option<&std::collections::HashSet<u64>>,
    ) -> io::Result<(Vec<Record>, u64, u64)> {
        let mut out = Vec::new();
        let mut off = offset;
        let mut taken = 0usize;
        let mut skipped = 0u64;
        while off < self.synced && taken < max_bytes {
            if skip.is_some_and(|s| s.contains(&off)) {
                if let Ok(i) = self.entries.binary_search_by_key(&off, |e| e.offset) {
                    off += self.entries[i].len;
                    skipped += 1;
                    continue;
                }
            }
            if let Some((a, n)) = self
                .scan
                .damaged
                .iter()
                .find(|(a, n)| off >= *a && off < a + n)
            {
                off = a + n;
                continue;
            }
            let mut head = [0u8; HEADER_BYTES];
            self.file.read_exact_at(&mut head, off)?;
            let data_len = u32::from_le_bytes(head[28..32].try_into().expect("4 bytes")) as usize;
            let total = HEADER_BYTES + data_len.min(DATA_MAX) + TRAILER_BYTES;
            let mut buf = vec![0u8; total];
            self.file.read_exact_at(&mut buf, off)?;
            match Record::decode(&buf) {
                Ok(Some((r, n))) => {
                    taken += n;
                    off += n as u64;
                    out.push(r);
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: record at byte {off} no longer valid",
                            self.path.display()
                        ),
                    ))
                }
            }
        }
        Ok((out, off, skipped))
    }
}

impl ChangeLog {
    /// `read_skipping` from entry `i` of a log with no damaged range: each run of
    /// consecutive records kept is read with one system call, not two per record.
    fn read_runs(
        &self,
        mut i: usize,
        max_bytes: usize,
        skip: Option<&std::collections::HashSet<u64>>,
    ) -> io::Result<(Vec<Record>, u64, u64)> {
        let skipped_at = |e: &Entry| skip.is_some_and(|s| s.contains(&e.offset));
        let mut out = Vec::new();
        let mut off = self.entries[i].offset;
        let (mut taken, mut skipped) = (0usize, 0u64);
        let mut buf = Vec::new();
        while let Some(e) = self.entries.get(i) {
            if taken >= max_bytes || e.offset != off || e.offset + e.len > self.synced {
                break;
            }
            if skipped_at(e) {
                off += e.len;
                skipped += 1;
                i += 1;
                continue;
            }
            let mut j = i;
            let mut end = off;
            while let Some(f) = self.entries.get(j) {
                if f.offset != end
                    || f.offset + f.len > self.synced
                    || skipped_at(f)
                    || taken + (end - off) as usize >= max_bytes
                {
                    break;
                }
                end += f.len;
                j += 1;
            }
            buf.resize((end - off) as usize, 0);
            self.file.read_exact_at(&mut buf, off)?;
            let mut at = 0usize;
            for f in &self.entries[i..j] {
                let len = f.len as usize;
                match Record::decode(&buf[at..at + len]) {
                    Ok(Some((r, n))) if n == len => out.push(r),
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{}: record at byte {} no longer valid",
                                self.path.display(),
                                f.offset
                            ),
                        ))
                    }
                }
                at += len;
            }
            taken += (end - off) as usize;
            off = end;
            i = j;
        }
        Ok((out, off, skipped))
    }
}

impl CompactDraft {
    /// Copies the snapshot's records but those later ones of the snapshot wholly
    /// rewrite (no lock needed: synced records never change).
    pub fn copy(&mut self, from: &File, entries: &[Entry]) -> io::Result<()> {
        let drop = superseded(entries);
        let file = self
            .file
            .as_ref()
            .expect("a draft has its file until installed");
        self.entries = copy_records(from, file, entries, &drop, &mut self.end)?;
        // The bulk of the sync happens here, without the log's lock.
        file.sync_data()
    }
}

/// Per-volume coordination state (the recovery server's part of DESIGN.md's
/// "coordination point").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeCoord {
    pub uid: u64,
    /// The volume's failure count ID: changed only by compare-and-set.
    pub fcid: u64,
    /// Who may hold (serve) the volume at `fcid`.
    pub holder: Option<u64>,
    /// The primary epoch the holder serves under.
    pub epoch: u64,
    /// Jeopardy protection on: the holder writes every change here first.
    pub jeopardy: bool,
    /// The latest cluster configuration sent by the cluster (its metadata, as JSON).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Copies that were current when the log began: their stale copy plus the log is
    /// the volume.
    #[serde(default)]
    pub base: Vec<u64>,
    /// The holder won by taking over from a silent holder: it restores its copy from
    /// the log before it serves, so the cluster may adopt it as primary even if its
    /// copy was dead (any other new holder is adopted only if it is the metadata's
    /// primary already).
    #[serde(default)]
    pub takeover: bool,
    /// The holder's copy is the volume: a take-over's holder restored it from the log
    /// (its renewals say so), a survivor's was from the grant on. A take-over is
    /// adopted only then: before, the holder's copy may be stale (its restore failed,
    /// or it crashed in the middle of it).
    #[serde(default)]
    pub serving: bool,
    /// Copies the primary acknowledged writes without (recorded before the first such
    /// write): they may never claim the volume as its surviving replica.
    #[serde(default)]
    pub out: std::collections::BTreeSet<u64>,
    /// Per copy, the Raft log index of the last out/in recorded: an "in" older than the
    /// last "out" (a copy that turned live, then failed an update before its "in"
    /// arrived) is ignored.
    #[serde(default)]
    pub member_index: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Coord {
    pub volumes: BTreeMap<String, VolumeCoord>,
}

pub fn load_coord(dir: &Path) -> Result<Coord, String> {
    let path = dir.join("coord.json");
    let text = match fsx::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Coord::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let nl = text
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| format!("{}: no checksum line", path.display()))?;
    let (sum, body) = (&text[..nl], &text[nl + 1..]);
    if blake3::hash(body).to_hex().as_bytes() != sum {
        return Err(format!(
            "{}: checksum mismatch (the file is damaged; refusing to guess the failure count IDs)",
            path.display()
        ));
    }
    serde_json::from_slice(body).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn save_coord(dir: &Path, coord: &Coord) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(coord).map_err(io::Error::other)?;
    let tmp = dir.join("coord.json.tmp");
    {
        let mut all = blake3::hash(&body).to_hex().as_bytes().to_vec();
        all.push(b'\n');
        all.extend_from_slice(&body);
        let f = fsx::open_rw(&tmp, true, true)?;
        f.write_all_at(&all, 0)?;
        f.sync_all()?;
    }
    fsx::rename(&tmp, &dir.join("coord.json"))?;
    fsx::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    fn write_rec(log: &mut ChangeLog, lba: u64, fill: u8) -> u64 {
        let data = vec![fill; 4096];
        let (_, end) = log.append(RecordKind::Write, lba, 1, 1, 1, &data).unwrap();
        log.sync_handle().unwrap().sync_data().unwrap();
        log.mark_synced(end);
        end
    }

    /// A change log on a file system filling up is refused with ENOSPC while the
    /// headroom the nodes' metadata needs is still free (full-disk test in CI: the
    /// recovery server's log took it, and a node whose Raft store then could not grow
    /// exited), and every record it took reads back after a reopen.
    #[test]
    fn a_change_log_leaves_the_headroom_free() {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs needs root");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }
        let _u = Unmount(dir.path().to_path_buf());
        let p = dir.path().join("v.log");
        let mut log = ChangeLog::open(&p).unwrap();
        let data = vec![0x5A; 64 << 10];
        let mut taken = 0;
        let err = loop {
            match log.append(RecordKind::Write, taken * 16, 16, 1, 1, &data) {
                Ok(_) => taken += 1,
                Err(e) => break e,
            }
            assert!(taken < 1000, "24 MiB took more than 1000 records of 64 KiB");
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        let (avail, total) = fsx::space(dir.path()).unwrap();
        assert!(
            avail >= fsx::headroom_bytes(total),
            "{avail} bytes left, headroom {}",
            fsx::headroom_bytes(total)
        );
        assert!(taken > 100, "only {taken} records taken");
        log.sync_handle().unwrap().sync_data().unwrap();
        drop(log);
        let log = ChangeLog::open(&p).unwrap();
        assert_eq!(log.scan.records, taken);
        assert_eq!(log.scan.torn_bytes, 0);
    }

    #[test]
    fn records_round_trip_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.log");
        let mut log = ChangeLog::open(&p).unwrap();
        write_rec(&mut log, 7, 1);
        let end = write_rec(&mut log, 9, 2);
        log.append(RecordKind::Zero, 100, 5, 1, 1, &[]).unwrap();
        drop(log);
        // Tear the last record: any cut inside it is a torn tail.
        let full = std::fs::metadata(&p).unwrap().len();
        for cut in [end + 1, end + 20, full - 1] {
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let log = ChangeLog::open(&p).unwrap();
            assert_eq!(log.scan.records, 2);
            assert_eq!(log.scan.torn_bytes, cut - end);
            assert!(log.scan.damaged.is_empty());
            assert_eq!(std::fs::metadata(&p).unwrap().len(), end);
            let (recs, next) = log
                .read_skipping(0, usize::MAX, None)
                .map(|(r, n, _)| (r, n))
                .unwrap();
            assert_eq!(next, end);
            assert_eq!(recs.len(), 2);
            assert_eq!((recs[0].lba, recs[0].data[0]), (7, 1));
            assert_eq!((recs[1].lba, recs[1].data[0], recs[1].seq), (9, 2, 2));
            // Appending after the cut continues the sequence.
            let mut log = log;
            let e2 = write_rec(&mut log, 11, 3);
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(e2 - 4096 - 10).unwrap();
        }
    }

    /// A restore replays only what no later record rewrites whole, and gets the same
    /// volume: checked against replaying everything, on random overlapping records.
    #[test]
    fn superseded_records_change_nothing_when_left_out() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let n = rng.usize(1..40);
            let entries: Vec<Entry> = (0..n)
                .map(|i| Entry {
                    offset: i as u64 * 100,
                    len: 100,
                    lba: rng.u64(0..64),
                    count: rng.u64(1..12),
                })
                .collect();
            let replay = |skip: &std::collections::HashSet<u64>| {
                let mut vol = [usize::MAX; 80];
                for (i, e) in entries.iter().enumerate() {
                    if skip.contains(&e.offset) {
                        continue;
                    }
                    for b in e.lba..e.lba + e.count {
                        vol[b as usize] = i;
                    }
                }
                vol
            };
            let skip = superseded(&entries);
            assert_eq!(replay(&skip), replay(&Default::default()), "{entries:?}");
            // The newest record is never superseded; one rewritten whole always is.
            assert!(!skip.contains(&entries[n - 1].offset));
            for (i, e) in entries.iter().enumerate() {
                let whole = entries[i + 1..]
                    .iter()
                    .any(|l| l.lba <= e.lba && l.lba + l.count >= e.lba + e.count);
                if whole {
                    assert!(skip.contains(&e.offset), "{e:?} in {entries:?}");
                }
            }
        }
    }

    /// Reading runs of records at once returns exactly what reading them one by one
    /// does: the same records, the same next offset and the same count skipped, for
    /// any chunk size and any set of records left out.
    #[test]
    fn reading_runs_of_records_reads_what_reading_each_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = fastrand::Rng::with_seed(11);
        let mut log = ChangeLog::open(&dir.path().join("v.log")).unwrap();
        for i in 0..300u64 {
            let n = rng.u32(1..4);
            if rng.u32(0..8) == 0 {
                log.append(RecordKind::Zero, rng.u64(0..50), n, 1, 1, &[])
                    .unwrap();
            } else {
                let data = vec![i as u8; n as usize * 4096];
                log.append(RecordKind::Write, rng.u64(0..50), n, 1, 1, &data)
                    .unwrap();
            }
        }
        let (_, end) = log.append(RecordKind::Zero, 0, 1, 1, 1, &[]).unwrap();
        log.sync_handle().unwrap().sync_data().unwrap();
        log.mark_synced(end);
        let latest = superseded(log.entries());
        for round in 0..40 {
            let skip = (round % 2 == 0).then_some(&latest);
            let max = [1usize, 4096, 10_000, 64 << 10, 1 << 20][round % 5];
            let (mut a, mut b) = (0u64, 0u64);
            loop {
                let runs = log.read_skipping(a, max, skip).unwrap();
                let each = log.read_each(b, max, skip).unwrap();
                let key = |r: &(Vec<Record>, u64, u64)| {
                    let recs: Vec<_> =
                        r.0.iter()
                            .map(|x| (x.seq, x.lba, x.count, x.data.clone()))
                            .collect();
                    (recs, r.1, r.2)
                };
                assert_eq!(key(&runs), key(&each), "from {a} by {max}");
                if runs.1 == a {
                    break;
                }
                (a, b) = (runs.1, each.1);
            }
            assert_eq!(a, log.synced());
        }
    }

    /// Replays every record in order: block -> (fill byte, seq of the write).
    fn replay(log: &ChangeLog) -> BTreeMap<u64, u8> {
        let mut vol = BTreeMap::new();
        let (recs, next, _) = log.read_skipping(0, usize::MAX, None).unwrap();
        assert_eq!(next, log.synced());
        for r in recs {
            for b in 0..r.count as u64 {
                match r.kind {
                    RecordKind::Write => vol.insert(r.lba + b, r.data[b as usize * 4096]),
                    _ => vol.insert(r.lba + b, 0),
                };
            }
        }
        vol
    }

    #[test]
    fn compaction_keeps_the_latest_of_every_block_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.log");
        let mut rng = fastrand::Rng::with_seed(11);
        let mut log = ChangeLog::open(&p).unwrap();
        for i in 0..600u32 {
            let lba = rng.u64(0..40);
            if i % 17 == 0 {
                let (_, end) = log
                    .append(RecordKind::Zero, lba, rng.u32(1..6), 1, 1, &[])
                    .unwrap();
                log.sync_handle().unwrap().sync_data().unwrap();
                log.mark_synced(end);
            } else {
                write_rec(&mut log, lba, (i % 251) as u8 + 1);
            }
        }
        let before = replay(&log);
        let (gen, seq, size) = (log.generation(), log.last_seq(), log.bytes());
        assert!(log.wants_compaction(1));
        // Records appended between the draft and its finish are kept too.
        let (from, entries, mut d) = log.start_compaction().unwrap().unwrap();
        d.copy(&from, &entries).unwrap();
        write_rec(&mut log, 3, 0xEE);
        let (_, _) = log
            .append(RecordKind::Write, 4, 1, 1, 1, &[0xEF; 4096])
            .unwrap();
        let c = log.finish_compaction(d).unwrap().unwrap();
        let mut want = before.clone();
        want.insert(3, 0xEE);
        want.insert(4, 0xEF);
        assert_eq!(replay(&log), want);
        assert!(c.bytes_after < size / 4, "{c:?}");
        assert_eq!(c.records_before, 602);
        assert!(c.records_after <= 42, "{c:?}");
        assert_ne!(log.generation(), gen);
        assert!(!log.wants_compaction(1));
        // Appends go on after it, and a reopened log reads the same.
        write_rec(&mut log, 5, 0x55);
        want.insert(5, 0x55);
        assert_eq!(log.last_seq(), seq + 3);
        drop(log);
        std::fs::write(compact_path(&p), b"half a compaction").unwrap();
        let log = ChangeLog::open(&p).unwrap();
        assert!(!compact_path(&p).exists());
        assert_eq!(log.scan.torn_bytes, 0);
        assert!(log.scan.damaged.is_empty());
        assert_eq!(replay(&log), want);
        assert_eq!(log.last_seq(), seq + 3);
    }

    /// A log deleted while a compaction of it runs gets no file back; a draft that is
    /// dropped leaves no file behind.
    #[test]
    fn a_retired_log_is_not_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.log");
        let mut log = ChangeLog::open(&p).unwrap();
        for i in 0..10 {
            write_rec(&mut log, 1, i);
        }
        let (from, entries, mut d) = log.start_compaction().unwrap().unwrap();
        d.copy(&from, &entries).unwrap();
        assert!(compact_path(&p).exists());
        log.retire();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(log.finish_compaction(d).unwrap(), None);
        assert!(!p.exists() && !compact_path(&p).exists());
        assert!(log.start_compaction().unwrap().is_none());
    }

    #[test]
    fn a_damaged_log_is_not_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.log");
        let mut log = ChangeLog::open(&p).unwrap();
        let first = write_rec(&mut log, 1, 1);
        write_rec(&mut log, 1, 2);
        write_rec(&mut log, 1, 3);
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xFF; 8], first + 60).unwrap();
        let mut log = ChangeLog::open(&p).unwrap();
        assert!(!log.scan.damaged.is_empty());
        assert!(!log.wants_compaction(1));
        assert_eq!(log.compact().unwrap(), None);
    }

    #[test]
    fn damage_in_the_middle_is_kept_and_reported_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.log");
        let mut log = ChangeLog::open(&p).unwrap();
        let e1 = write_rec(&mut log, 1, 1);
        write_rec(&mut log, 2, 2);
        write_rec(&mut log, 3, 3);
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], e1 + 100).unwrap();
        drop(f);
        let len = std::fs::metadata(&p).unwrap().len();
        let log = ChangeLog::open(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "nothing cut");
        assert_eq!(log.scan.records, 2);
        assert_eq!(log.scan.damaged.len(), 1);
        let (recs, _) = log
            .read_skipping(0, usize::MAX, None)
            .map(|(r, n, _)| (r, n))
            .unwrap();
        assert_eq!(recs.iter().map(|r| r.lba).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn coord_file_is_checksummed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Coord::default();
        c.volumes.insert(
            "v".into(),
            VolumeCoord {
                uid: 3,
                fcid: 4,
                holder: Some(1),
                ..Default::default()
            },
        );
        save_coord(dir.path(), &c).unwrap();
        assert_eq!(load_coord(dir.path()).unwrap().volumes["v"].fcid, 4);
        let p = dir.path().join("coord.json");
        let mut t = std::fs::read(&p).unwrap();
        let n = t.len();
        t[n - 5] ^= 1;
        std::fs::write(&p, t).unwrap();
        assert!(load_coord(dir.path()).unwrap_err().contains("checksum"));
    }
}
