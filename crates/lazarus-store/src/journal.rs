//! The node journal: a preallocated write-ahead log of mapping changes and of the page
//! images a checkpoint is about to write in place. See docs/format.md, "Journal".
//!
//! Layout: two 4 KiB header slots (at 0 and 4096) and a ring of records from 8192 to
//! the capacity. A record never straddles the end of the ring: one that does not fit
//! goes to the ring's start (replay, finding no record where the next should be, looks
//! there). Records carry their generation and an LSN (1, 2, 3 … within it) and are
//! CRC32C-protected; replay stops at the first record that is torn, of another
//! generation, or out of sequence.
//!
//! A checkpoint appends its page images and an images-done record naming the next
//! generation, and from then on records belong to that generation (they follow the
//! images in the ring), while the checkpoint writes the images in place without
//! holding writers off. Once the images are in place and synced, the header (in both
//! slots, one after the other) names the new generation and where it starts; the
//! older records' room is free. Replay starts at the header's generation and, after an
//! images-done record, goes on with the generation it names: a checkpoint cut short by
//! a crash is finished by applying its images, and the records after it still apply.

use crate::disk::DiskFile;
use crate::error::StoreError;
use std::path::Path;
use std::sync::Arc;

pub const HEADER_MAGIC: &[u8; 8] = b"LZJRNL01";
pub const HEADER_SLOT_BYTES: u64 = 4096;
pub const RECORDS_START: u64 = 2 * HEADER_SLOT_BYTES;
/// Record header: len u32, crc u32, gen u64, lsn u64, kind u8, 3 bytes pad.
pub const RECORD_HEADER_LEN: usize = 28;
/// Journal writes are issued at most this large while buffering between flushes.
pub const WRITE_BUFFER_MAX_BYTES: usize = 1 << 20;
/// Smallest journal we accept: must hold the records and checkpoint images of several
/// maximum-size (32 MiB) writes in flight.
pub const CAPACITY_MIN_BYTES: u64 = 8 << 20;
/// Header version 1 had no start offset (every generation began at `RECORDS_START`);
/// version 2 adds it. Both are read; version 2 is written.
const HEADER_VERSION: u32 = 2;

pub const KIND_MAP: u8 = 1;
pub const KIND_COMMIT: u8 = 2;
pub const KIND_PAGE_IMAGE: u8 = 3;
/// Ends a checkpoint's images; its payload (u64, little-endian) names the generation
/// of the records that follow it (empty in version 1: none followed).
pub const KIND_IMAGES_DONE: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's LSN within its generation.
    pub lsn: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
    /// Where the record starts in the file.
    pub offset: u64,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    generation: u64,
    capacity: u64,
    /// File offset of the generation's first record (or of where a record would have
    /// been that went to the ring's start).
    start: u64,
}

fn encode_header(h: Header) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_SLOT_BYTES as usize];
    b[0..8].copy_from_slice(HEADER_MAGIC);
    b[8..12].copy_from_slice(&HEADER_VERSION.to_le_bytes());
    b[12..20].copy_from_slice(&h.generation.to_le_bytes());
    b[20..28].copy_from_slice(&h.capacity.to_le_bytes());
    b[28..36].copy_from_slice(&h.start.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_header_generation(b: &[u8]) -> Option<u64> {
    decode_header(b).map(|h| h.generation)
}

fn decode_header(b: &[u8]) -> Option<Header> {
    if b.len() < 40 || &b[0..8] != HEADER_MAGIC {
        return None;
    }
    let version = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let u64_at = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
    let crc_at = |i: usize| b[i..i + 4].try_into().ok().map(u32::from_le_bytes);
    let start = match version {
        1 => {
            if crc32c::crc32c(&b[0..28]) != crc_at(28)? {
                return None;
            }
            RECORDS_START
        }
        2 => {
            if crc32c::crc32c(&b[0..36]) != crc_at(36)? {
                return None;
            }
            u64_at(28)?
        }
        _ => return None,
    };
    Some(Header {
        generation: u64_at(12)?,
        capacity: u64_at(20)?,
        start,
    })
}

pub fn encode_record(generation: u64, lsn: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    encode_record_into(&mut b, generation, lsn, kind, &[payload]);
    b
}

/// Decodes the record at the start of `b`; `None` means "end of the log here".
pub fn decode_record(b: &[u8], generation: u64, expected_lsn: u64) -> Option<(Record, usize)> {
    if b.len() < RECORD_HEADER_LEN {
        return None;
    }
    let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    if len < RECORD_HEADER_LEN || len > b.len() {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    if crc32c::crc32c(&b[8..len]) != crc {
        return None;
    }
    let gen = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let lsn = u64::from_le_bytes(b[16..24].try_into().ok()?);
    if gen != generation || lsn != expected_lsn {
        return None;
    }
    Some((
        Record {
            lsn,
            kind: b[24],
            payload: b[RECORD_HEADER_LEN..len].to_vec(),
            offset: 0,
        },
        len,
    ))
}

/// The records of `generation` from index `start` of the record area `data` (file
/// offset `RECORDS_START + index`), following them once round the ring's end; and
/// the index just past the last. A record is taken at the ring's start only where the
/// writer put it: when it did not fit between the last one and the end. And none is
/// taken past the generation's start: a generation never laps the ring.
fn read_generation(data: &[u8], generation: u64, start: usize) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut pos = start.min(data.len());
    let mut wrapped = false;
    loop {
        let lsn = out.len() as u64 + 1;
        let room = if wrapped {
            start - pos
        } else {
            data.len() - pos
        };
        match decode_record(&data[pos..pos + room], generation, lsn) {
            Some((mut r, len)) => {
                r.offset = RECORDS_START + pos as u64;
                out.push(r);
                pos += len;
            }
            None if !wrapped && pos != 0 => match decode_record(&data[..start], generation, lsn) {
                Some((_, len)) if pos + len > data.len() => {
                    wrapped = true;
                    pos = 0;
                }
                _ => break,
            },
            None => break,
        }
    }
    (out, pos)
}

/// The in-memory side of the journal. Callers serialize access (the store keeps it
/// behind a mutex); durability points are `take_for_sync` + `write_synced`.
///
/// LSNs handed out (`append`, `next_lsn`, `durable_lsn`) run on across generations
/// (a record's LSN within its generation is that less the generation's base).
#[derive(Debug)]
pub struct Journal {
    file: Arc<DiskFile>,
    /// Generation of the records appended now.
    generation: u64,
    capacity: u64,
    /// Where the oldest generation still needed begins: the header's.
    live_start: u64,
    /// The generation begun by `begin_generation` and where it starts, until its
    /// header is written (`committed`).
    next: Option<(u64, u64)>,
    /// `used` when the generation in `next` began.
    used_before_next: u64,
    /// Unwritten records: runs of (file offset, bytes), in ring order.
    pending: Vec<(u64, Vec<u8>)>,
    /// File offset where the next record goes.
    head: u64,
    /// Ring bytes from `live_start` to `head` (room skipped at the ring's end counts).
    used: u64,
    /// LSN of the current generation's record 1, less one.
    lsn_base: u64,
    next_lsn: u64,
    /// Records from this LSN on are not yet known durable.
    durable_lsn: u64,
    /// The next generation skips a number: set at open, where a checkpoint cut short
    /// may have left records of the generation after the current one in the ring.
    skip_generation: bool,
}

/// What `Journal::open` found.
pub struct Replay {
    /// Page images of the checkpoints whose images-done record was found, in order:
    /// applying them finishes those checkpoints (then `Journal::adopt`).
    pub images: Vec<Record>,
    /// The records of the last generation found, in order (to replay).
    pub records: Vec<Record>,
}

impl Journal {
    /// Opens (or creates and preallocates) the journal and reads what replay needs.
    pub fn open(path: &Path, capacity: u64) -> Result<(Journal, Replay), StoreError> {
        if !lazarus_io::fs::exists(path) {
            // Created complete under a temporary name and renamed into place, so a
            // crash during creation never leaves a journal without a valid header.
            let capacity = capacity.max(CAPACITY_MIN_BYTES);
            let tmp = path.with_extension("new");
            let _ = lazarus_io::fs::remove_file(&tmp);
            let f = DiskFile::open(&tmp, true).map_err(|e| StoreError::io(&tmp, e))?;
            f.allocate(0, capacity)
                .map_err(|e| StoreError::io(&tmp, e))?;
            let h = encode_header(Header {
                generation: 1,
                capacity,
                start: RECORDS_START,
            });
            for slot in 0..2 {
                f.write_at(&h, slot * HEADER_SLOT_BYTES)
                    .map_err(|e| StoreError::io(&tmp, e))?;
            }
            f.sync_data().map_err(|e| StoreError::io(&tmp, e))?;
            drop(f);
            lazarus_io::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))?;
            crate::disk::sync_dir(path.parent().unwrap_or(Path::new(".")))
                .map_err(|e| StoreError::io(path, e))?;
        }
        let file = DiskFile::open(path, false).map_err(|e| StoreError::io(path, e))?;
        let mut a = vec![0u8; HEADER_SLOT_BYTES as usize];
        let mut b = vec![0u8; HEADER_SLOT_BYTES as usize];
        file.read_at(&mut a, 0)
            .map_err(|e| StoreError::io(path, e))?;
        file.read_at(&mut b, HEADER_SLOT_BYTES)
            .map_err(|e| StoreError::io(path, e))?;
        let corrupted = |detail: String| StoreError::Corrupted {
            what: "journal header",
            path: path.into(),
            detail,
        };
        // Both slots hold the current header (written one after the other): the
        // newer wins, so a write torn in either, or one slot damaged later, loses
        // nothing.
        let h = match (decode_header(&a), decode_header(&b)) {
            (Some(x), Some(y)) => {
                if x.generation >= y.generation {
                    x
                } else {
                    y
                }
            }
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => {
                return Err(corrupted(
                    "neither header slot has a valid magic and checksum".into(),
                ))
            }
        };
        if h.capacity < CAPACITY_MIN_BYTES || h.capacity > (1 << 40) {
            return Err(corrupted(format!("capacity {} out of range", h.capacity)));
        }
        if h.start < RECORDS_START || h.start > h.capacity {
            return Err(corrupted(format!("start {} out of range", h.start)));
        }
        if decode_header(&a).map(|x| (x.generation, x.start))
            != decode_header(&b).map(|x| (x.generation, x.start))
        {
            // One slot is torn, damaged or behind (a crash between the two writes):
            // both get the winner again, so that either can be lost later.
            write_header(&file, &encode_header(h))?;
        }
        // Re-reserve the whole journal: an extension lost in a crash would otherwise
        // let an append meet ENOSPC. (A no-op when the space is already reserved.)
        file.allocate(0, h.capacity)
            .map_err(|e| StoreError::io(path, e))?;
        let mut data = vec![0u8; (h.capacity - RECORDS_START) as usize];
        file.read_at(&mut data, RECORDS_START)
            .map_err(|e| StoreError::io(path, e))?;
        let mut images = Vec::new();
        let mut generation = h.generation;
        let mut start = (h.start - RECORDS_START) as usize;
        let (records, end) = loop {
            let (records, end) = read_generation(&data, generation, start);
            let Some(done) = records.iter().position(|r| r.kind == KIND_IMAGES_DONE) else {
                break (records, end);
            };
            // That checkpoint journaled all its images: they are applied, and the
            // records after them (of the generation it names) replay on top.
            let next = records[done]
                .payload
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(generation + 1, u64::from_le_bytes);
            start = (records[done].offset - RECORDS_START) as usize
                + RECORD_HEADER_LEN
                + records[done].payload.len();
            generation = next;
            images.extend(
                records
                    .into_iter()
                    .take(done)
                    .filter(|r| r.kind == KIND_PAGE_IMAGE),
            );
        };
        let start = RECORDS_START + start as u64;
        let head = RECORDS_START + end as u64;
        let next_lsn = records.len() as u64 + 1;
        let mut j = Journal {
            file: Arc::new(file),
            generation,
            capacity: h.capacity,
            live_start: h.start,
            next: None,
            used_before_next: 0,
            pending: Vec::new(),
            head,
            used: 0,
            lsn_base: 0,
            next_lsn,
            durable_lsn: next_lsn,
            skip_generation: true,
        };
        if generation == h.generation {
            j.used = j.distance(h.start, head);
        } else {
            // The header names an older generation until `adopt`, once the images
            // are applied: its room stays in use until then.
            j.next = Some((generation, start));
            j.used_before_next = j.distance(h.start, start);
            j.used = j.used_before_next + j.distance(start, head);
        }
        Ok((j, Replay { images, records }))
    }

    /// Writes zeroes over the ring outside the records in use, and syncs: at open,
    /// after a crash, so that records of the current generation written beyond where
    /// replay stopped are gone before new ones take their LSNs.
    pub fn zero_free(&mut self) -> Result<(), StoreError> {
        assert!(self.pending.is_empty(), "zeroing with buffered records");
        let from = self.live_start;
        let free: Vec<(u64, u64)> = if self.used == 0 || self.head > from {
            vec![(self.head, self.capacity), (RECORDS_START, from)]
        } else {
            vec![(self.head, from)]
        };
        let zeroes = vec![0u8; WRITE_BUFFER_MAX_BYTES];
        for (mut at, end) in free {
            while at < end {
                let n = (end - at).min(zeroes.len() as u64) as usize;
                self.file
                    .write_at(&zeroes[..n], at)
                    .map_err(|e| StoreError::io(self.file.path(), e))?;
                at += n as u64;
            }
        }
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(self.file.path(), e))
    }

    /// Ring bytes from `from` to `to` (file offsets), going round once at most.
    fn distance(&self, from: u64, to: u64) -> u64 {
        if to >= from {
            to - from
        } else {
            (self.capacity - from) + (to - RECORDS_START)
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of the record area in use (written or buffered) by the generations still
    /// needed: while a checkpoint writes its images in place, its own records too.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    /// Appends a record to the buffer. The caller has reserved room (see the store's
    /// reservation); running out here is a broken invariant.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<u64, StoreError> {
        let lsn = self.append_buffered(kind, &[payload]);
        if self.pending_len() >= WRITE_BUFFER_MAX_BYTES {
            self.write_pending()?;
        }
        Ok(lsn)
    }

    /// Reserves the head of the ring for `count` records of `len` bytes each (a
    /// checkpoint's images), which the caller encodes (`encode_record_into`) and writes
    /// to the file itself; buffered records go after them. Until those are written,
    /// nothing after them may be made durable (the caller holds the store's sync lock).
    pub fn reserve_records(&mut self, count: usize, len: usize) -> Reserved {
        let mut runs: Vec<ReservedRun> = Vec::new();
        let len64 = len as u64;
        for _ in 0..count {
            let at = self.advance(len64);
            match runs.last_mut() {
                Some(r) if r.offset + (r.count * len) as u64 == at => r.count += 1,
                _ => runs.push(ReservedRun {
                    offset: at,
                    first_lsn: self.next_lsn - self.lsn_base,
                    count: 1,
                }),
            }
            self.next_lsn += 1;
        }
        Reserved {
            generation: self.generation,
            len,
            runs,
        }
    }

    /// `append` of a payload given in parts, encoded straight into the buffer and left
    /// there whatever its size.
    pub fn append_buffered(&mut self, kind: u8, parts: &[&[u8]]) -> u64 {
        let lsn = self.next_lsn;
        let len = RECORD_HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let (generation, record_lsn) = (self.generation, lsn - self.lsn_base);
        encode_record_into(self.place(len), generation, record_lsn, kind, parts);
        self.next_lsn += 1;
        lsn
    }

    /// Takes `len` bytes of the ring at the head for a record (going to the ring's
    /// start when they do not fit before the end); returns their file offset.
    fn advance(&mut self, len: u64) -> u64 {
        let mut grow = len;
        if self.head + len > self.capacity {
            grow += self.capacity - self.head;
            self.head = RECORDS_START;
        }
        assert!(
            self.used + grow < self.capacity - RECORDS_START,
            "journal overflow: reservation accounting is wrong"
        );
        self.used += grow;
        let at = self.head;
        self.head += len;
        at
    }

    /// The buffer run a record of `len` bytes is appended to, at the head (going to
    /// the ring's start when it does not fit before the end).
    fn place(&mut self, len: usize) -> &mut Vec<u8> {
        let head = self.advance(len as u64);
        let continues =
            matches!(self.pending.last(), Some((off, b)) if *off + b.len() as u64 == head);
        if !continues {
            self.pending.push((head, Vec::new()));
        }
        &mut self.pending.last_mut().expect("a run").1
    }

    fn pending_len(&self) -> usize {
        self.pending.iter().map(|(_, b)| b.len()).sum()
    }

    fn write_pending(&mut self) -> Result<(), StoreError> {
        for (offset, bytes) in std::mem::take(&mut self.pending) {
            self.file
                .write_at(&bytes, offset)
                .map_err(|e| StoreError::io(self.file.path(), e))?;
        }
        Ok(())
    }

    /// First half of a durability point, under the journal lock: appends a commit
    /// record and hands back the unwritten bytes (runs of file offset and bytes) and
    /// the LSN they make durable. The caller then syncs the block data, and only then
    /// calls `write_synced` (outside the lock): the commit record promises that every
    /// block the records before it name is already on stable storage.
    pub fn take_for_sync(&mut self) -> (Vec<(u64, Vec<u8>)>, u64) {
        self.append_buffered(KIND_COMMIT, &[]);
        (std::mem::take(&mut self.pending), self.next_lsn)
    }

    pub fn file(&self) -> &DiskFile {
        &self.file
    }

    pub fn file_arc(&self) -> Arc<DiskFile> {
        self.file.clone()
    }

    /// Forgets the records from `record` on (of the last generation: replay stopped
    /// there), so that new records follow the last one applied.
    pub fn truncate_to(&mut self, record: &Record) {
        assert!(self.pending.is_empty(), "truncate with buffered records");
        self.head = record.offset;
        self.next_lsn = self.lsn_base + record.lsn;
        self.durable_lsn = self.next_lsn;
        let from = self.next.map_or(self.live_start, |(_, s)| s);
        self.used = self.distance(from, record.offset)
            + if self.next.is_some() {
                self.used_before_next
            } else {
                0
            };
    }

    pub fn mark_durable(&mut self, lsn: u64) {
        self.durable_lsn = self.durable_lsn.max(lsn);
    }

    /// Whether a generation begun by a checkpoint awaits its header (`committed`).
    pub fn has_uncommitted_generation(&self) -> bool {
        self.next.is_some()
    }

    /// Whether the next checkpoint must begin a generation even with nothing to write
    /// (the first after open: see `skip_generation`).
    pub fn wants_new_generation(&self) -> bool {
        self.skip_generation
    }

    /// Ends the current generation after the checkpoint's images (appended by the
    /// caller): appends the images-done record naming the next generation, whose
    /// records follow from now on. Returns the LSN just past it (what must be durable
    /// before the images are written in place).
    pub fn begin_generation(&mut self) -> u64 {
        assert!(
            self.next.is_none(),
            "a checkpoint began before the last one ended"
        );
        let next = self.generation + if self.skip_generation { 2 } else { 1 };
        self.append_buffered(KIND_IMAGES_DONE, &[&next.to_le_bytes()]);
        self.skip_generation = false;
        self.next = Some((next, self.head));
        self.used_before_next = self.used;
        self.generation = next;
        self.lsn_base = self.next_lsn - 1;
        self.next_lsn
    }

    /// The header that commits the generation begun last (`begin_generation`), for
    /// `write_header`; then `committed`.
    pub fn next_header(&self) -> Option<Vec<u8>> {
        self.next.map(|(generation, start)| {
            encode_header(Header {
                generation,
                capacity: self.capacity,
                start,
            })
        })
    }

    /// The header from `next_header` is durable: the room of the generations before
    /// is free.
    pub fn committed(&mut self) {
        if let Some((_, start)) = self.next.take() {
            self.live_start = start;
            self.used -= self.used_before_next;
            self.used_before_next = 0;
        }
    }

    /// At open, once the images `Replay` found are applied and synced: the header
    /// names the generation replay ended in.
    pub fn adopt(&mut self) -> Result<(), StoreError> {
        if let Some(h) = self.next_header() {
            write_header(&self.file, &h)?;
            self.committed();
        }
        Ok(())
    }
}

/// Room `Journal::reserve_records` set aside: runs of consecutive records.
#[derive(Debug)]
pub struct Reserved {
    pub generation: u64,
    /// Each record's length.
    pub len: usize,
    pub runs: Vec<ReservedRun>,
}

#[derive(Debug)]
pub struct ReservedRun {
    /// File offset of the run's first record.
    pub offset: u64,
    /// Its LSN within the generation.
    pub first_lsn: u64,
    pub count: usize,
}

/// Appends to `b` the record `encode_record` makes of a payload given in parts.
pub fn encode_record_into(b: &mut Vec<u8>, generation: u64, lsn: u64, kind: u8, parts: &[&[u8]]) {
    let len = RECORD_HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
    let at = b.len();
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&lsn.to_le_bytes());
    b.push(kind);
    b.extend_from_slice(&[0u8; 3]);
    for p in parts {
        b.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&b[at + 8..]);
    b[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Writes a header from `Journal::next_header` into both slots, one after the other,
/// each made durable before the next is touched.
pub fn write_header(file: &DiskFile, header: &[u8]) -> Result<(), StoreError> {
    for slot in 0..2 {
        file.write_at(header, slot * HEADER_SLOT_BYTES)
            .map_err(|e| StoreError::io(file.path(), e))?;
        file.sync_data()
            .map_err(|e| StoreError::io(file.path(), e))?;
    }
    Ok(())
}

/// Writes runs taken by `take_for_sync` and makes them durable.
pub fn write_synced(file: &DiskFile, runs: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
    for (offset, bytes) in runs {
        file.write_at(bytes, *offset)
            .map_err(|e| StoreError::io(file.path(), e))?;
    }
    file.sync_data().map_err(|e| StoreError::io(file.path(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(j: &mut Journal) -> u64 {
        let (runs, end) = j.take_for_sync();
        write_synced(j.file(), &runs).unwrap();
        j.mark_durable(end);
        end
    }

    fn commit_generation(j: &mut Journal) {
        let h = j.next_header().unwrap();
        write_header(j.file(), &h).unwrap();
        j.committed();
    }

    fn payloads(r: &[Record]) -> Vec<(u8, Vec<u8>)> {
        r.iter().map(|r| (r.kind, r.payload.clone())).collect()
    }

    #[test]
    fn records_roundtrip_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let (mut j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            assert!(r.records.is_empty());
            assert_eq!(j.append(KIND_MAP, b"one").unwrap(), 1);
            assert_eq!(j.append(KIND_MAP, b"two").unwrap(), 2);
            assert_eq!(sync(&mut j), 4);
            j.append(KIND_MAP, b"three").unwrap();
            let (runs, _) = j.take_for_sync();
            // Tear the last record ("three" + its commit): stop 30 bytes short.
            let (off, bytes) = &runs[0];
            write_synced(j.file(), &[(*off, bytes[..bytes.len() - 30].to_vec())]).unwrap();
        }
        let (j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(
            payloads(&r.records),
            vec![
                (KIND_MAP, b"one".to_vec()),
                (KIND_MAP, b"two".to_vec()),
                (KIND_COMMIT, vec![])
            ]
        );
        assert!(r.images.is_empty());
        assert_eq!(j.next_lsn(), 4);
    }

    #[test]
    fn a_committed_generation_hides_the_old_and_a_damaged_header_slot_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let (mut j, _) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            j.append(KIND_MAP, b"old").unwrap();
            j.append(KIND_PAGE_IMAGE, b"img").unwrap();
            j.begin_generation();
            sync(&mut j);
            commit_generation(&mut j);
            j.append(KIND_MAP, b"new").unwrap();
            sync(&mut j);
        }
        let (_, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert!(
            r.images.is_empty(),
            "a committed checkpoint's images are not replayed"
        );
        assert_eq!(
            payloads(&r.records),
            vec![
                (KIND_COMMIT, vec![]),
                (KIND_MAP, b"new".to_vec()),
                (KIND_COMMIT, vec![])
            ]
        );
        // Either header slot damaged: the other holds the same header, and the open
        // writes it back into both.
        let f = DiskFile::open(&p, false).unwrap();
        f.write_at(&[0xff; 16], 0).unwrap();
        let (_, r2) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(r2.records, r.records);
        f.write_at(&[0xff; 16], HEADER_SLOT_BYTES).unwrap();
        let (_, r3) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(
            r3.records, r.records,
            "slot 0 was written back at the last open"
        );
        // Both destroyed: a clear error, not a panic.
        f.write_at(&[0xff; 16], 0).unwrap();
        f.write_at(&[0xff; 16], HEADER_SLOT_BYTES).unwrap();
        assert!(matches!(
            Journal::open(&p, CAPACITY_MIN_BYTES),
            Err(StoreError::Corrupted { .. })
        ));
    }

    #[test]
    fn a_checkpoint_cut_short_is_finished_and_the_records_after_it_replay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let (mut j, _) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            j.append(KIND_MAP, b"before").unwrap();
            j.append(KIND_PAGE_IMAGE, b"img1").unwrap();
            j.append(KIND_PAGE_IMAGE, b"img2").unwrap();
            j.begin_generation();
            // Written while the images go in place; the header is never written.
            j.append(KIND_MAP, b"after").unwrap();
            sync(&mut j);
            // A record torn at the tail is cut.
            j.append(KIND_MAP, b"unsynced").unwrap();
            let (runs, _) = j.take_for_sync();
            let (off, bytes) = &runs[0];
            write_synced(j.file(), &[(*off, bytes[..bytes.len() - 40].to_vec())]).unwrap();
        }
        let (mut j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(
            payloads(&r.images),
            vec![
                (KIND_PAGE_IMAGE, b"img1".to_vec()),
                (KIND_PAGE_IMAGE, b"img2".to_vec())
            ]
        );
        assert_eq!(
            payloads(&r.records),
            vec![(KIND_MAP, b"after".to_vec()), (KIND_COMMIT, vec![])]
        );
        assert!(j.has_uncommitted_generation());
        j.adopt().unwrap();
        assert!(!j.has_uncommitted_generation());
        // The same again after adopting: the images are done, the records stay.
        drop(j);
        let (_, r2) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert!(r2.images.is_empty());
        assert_eq!(payloads(&r2.records), payloads(&r.records));
    }

    #[test]
    fn records_go_round_the_ring_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let big = vec![7u8; 200 << 10];
        let mut expect = Vec::new();
        {
            let (mut j, _) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            // Several checkpoints' worth: each generation is committed, so the ring's
            // start is reused; the last generation crosses the end of the ring.
            let mut n = 0u32;
            loop {
                let mut rec = big.clone();
                rec[..4].copy_from_slice(&n.to_le_bytes());
                j.append(KIND_MAP, &rec).unwrap();
                expect.push((KIND_MAP, rec));
                n += 1;
                if j.used_bytes() > CAPACITY_MIN_BYTES / 2 {
                    j.begin_generation();
                    sync(&mut j);
                    commit_generation(&mut j);
                    expect = vec![(KIND_COMMIT, vec![])];
                } else if n >= 60 && j.head < j.live_start {
                    break;
                }
                assert!(n < 1000, "the ring never wrapped");
            }
            sync(&mut j);
            expect.push((KIND_COMMIT, vec![]));
            assert!(
                j.pending.is_empty() && j.head < j.live_start,
                "the test must end with a generation that went round the ring"
            );
        }
        let (j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(payloads(&r.records), expect);
        assert!(j.used_bytes() < CAPACITY_MIN_BYTES - RECORDS_START);
    }

    #[test]
    fn replay_goes_to_the_ring_start_only_where_the_writer_did() {
        // A record of the generation's next LSN at the ring's start is not taken when
        // the record would have fitted where the last one ended (a stale or forged
        // one), nor one that would run into the generation's own start.
        let gen = 5;
        let mut data = vec![0u8; 64 << 10];
        let start = 20 << 10;
        let a = encode_record(gen, 1, KIND_MAP, &[1; 100]);
        data[start..start + a.len()].copy_from_slice(&a);
        let b = encode_record(gen, 2, KIND_MAP, &[2; 100]);
        data[..b.len()].copy_from_slice(&b);
        let (records, end) = read_generation(&data, gen, start);
        assert_eq!(records.len(), 1);
        assert_eq!(end, start + a.len());
        // Where the next record could not fit before the end, it is taken.
        let start = data.len() - a.len() - 50;
        data[start..start + a.len()].copy_from_slice(&a);
        let (records, end) = read_generation(&data, gen, start);
        assert_eq!(records.len(), 2);
        assert_eq!(end, b.len());
        // Never past the generation's own start: here its first record went to the
        // ring's start, and forged ones go on over where it began.
        let start = data.len() - 100;
        data.fill(0);
        let first = encode_record(gen, 1, KIND_MAP, &[3; 1000]);
        data[..first.len()].copy_from_slice(&first);
        let (mut pos, mut lsn, mut before_start) = (first.len(), 2, 1);
        loop {
            let r = encode_record(gen, lsn, KIND_MAP, &[4; 36]);
            if pos + r.len() > data.len() {
                break;
            }
            data[pos..pos + r.len()].copy_from_slice(&r);
            pos += r.len();
            lsn += 1;
            if pos <= start {
                before_start += 1;
            }
        }
        assert!(pos > start, "forged records must cross the start");
        let (records, end) = read_generation(&data, gen, start);
        assert_eq!(
            records.len(),
            before_start,
            "no record over the start is taken"
        );
        assert!(end <= start);
    }

    #[test]
    fn version_1_headers_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let (mut j, _) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            j.append(KIND_MAP, b"v1").unwrap();
            sync(&mut j);
        }
        let mut h = vec![0u8; HEADER_SLOT_BYTES as usize];
        h[0..8].copy_from_slice(HEADER_MAGIC);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..20].copy_from_slice(&1u64.to_le_bytes());
        h[20..28].copy_from_slice(&CAPACITY_MIN_BYTES.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        let f = DiskFile::open(&p, false).unwrap();
        f.write_at(&h, 0).unwrap();
        f.write_at(&h, HEADER_SLOT_BYTES).unwrap();
        let (_, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(
            payloads(&r.records),
            vec![(KIND_MAP, b"v1".to_vec()), (KIND_COMMIT, vec![])]
        );
    }

    #[test]
    fn decode_rejects_garbage() {
        let rec = encode_record(7, 1, KIND_MAP, b"abc");
        assert!(decode_record(&rec, 7, 1).is_some());
        assert!(decode_record(&rec, 8, 1).is_none());
        assert!(decode_record(&rec, 7, 2).is_none());
        let mut bad = rec.clone();
        bad[30] ^= 1;
        assert!(decode_record(&bad, 7, 1).is_none());
        assert!(decode_record(&rec[..10], 7, 1).is_none());
        let mut huge = rec.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_record(&huge, 7, 1).is_none());
    }
}
