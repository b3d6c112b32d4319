//! The node journal: a preallocated write-ahead log of mapping changes and of the page
//! images a checkpoint is about to write in place. See docs/format.md, "Journal".
//!
//! Layout: two 4 KiB header slots (A at 0, B at 4096) and records from 8192 to the
//! capacity. A reset (end of a checkpoint) writes a header with generation g+1 into the
//! other slot; records carry their generation, so records of older generations left in
//! the file are never replayed. Each record is CRC32C-protected; replay stops at the
//! first record that is torn, of another generation, or out of sequence.

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

pub const KIND_MAP: u8 = 1;
pub const KIND_COMMIT: u8 = 2;
pub const KIND_PAGE_IMAGE: u8 = 3;
pub const KIND_IMAGES_DONE: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    generation: u64,
    capacity: u64,
}

fn encode_header(h: Header) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_SLOT_BYTES as usize];
    b[0..8].copy_from_slice(HEADER_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..20].copy_from_slice(&h.generation.to_le_bytes());
    b[20..28].copy_from_slice(&h.capacity.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_header_generation(b: &[u8]) -> Option<u64> {
    decode_header(b).map(|h| h.generation)
}

fn decode_header(b: &[u8]) -> Option<Header> {
    if &b[0..8] != HEADER_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[28..32].try_into().ok()?);
    if crc32c::crc32c(&b[0..28]) != crc {
        return None;
    }
    Some(Header {
        generation: u64::from_le_bytes(b[12..20].try_into().ok()?),
        capacity: u64::from_le_bytes(b[20..28].try_into().ok()?),
    })
}

pub fn encode_record(generation: u64, lsn: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = RECORD_HEADER_LEN + payload.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&lsn.to_le_bytes());
    b.push(kind);
    b.extend_from_slice(&[0u8; 3]);
    b.extend_from_slice(payload);
    let crc = crc32c::crc32c(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
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
        },
        len,
    ))
}

/// The in-memory side of the journal. Callers serialize access (the store keeps it
/// behind a mutex); durability points are `take_for_sync` + `write_synced`.
#[derive(Debug)]
pub struct Journal {
    file: Arc<DiskFile>,
    generation: u64,
    capacity: u64,
    /// File offset where `pending` begins.
    pending_offset: u64,
    pending: Vec<u8>,
    next_lsn: u64,
    /// Records from this LSN on are not yet known durable.
    durable_lsn: u64,
}

/// What `Journal::open` found: the records of the current generation, in order.
pub struct Replay {
    pub records: Vec<Record>,
}

impl Journal {
    /// Opens (or creates and preallocates) the journal and reads the current
    /// generation's records.
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
            let h = Header {
                generation: 1,
                capacity,
            };
            f.write_at(&encode_header(h), (h.generation % 2) * HEADER_SLOT_BYTES)
                .map_err(|e| StoreError::io(&tmp, e))?;
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
                return Err(StoreError::Corrupted {
                    what: "journal header",
                    path: path.into(),
                    detail: "neither header slot has a valid magic and checksum".into(),
                })
            }
        };
        let mut h = h;
        if h.capacity < CAPACITY_MIN_BYTES || h.capacity > (1 << 40) {
            return Err(StoreError::Corrupted {
                what: "journal header",
                path: path.into(),
                detail: format!("capacity {} out of range", h.capacity),
            });
        }
        // Re-reserve the whole journal: an extension lost in a crash would otherwise
        // let an append meet ENOSPC. (A no-op when the space is already reserved.)
        file.allocate(0, h.capacity)
            .map_err(|e| StoreError::io(path, e))?;
        let mut data = vec![0u8; (h.capacity - RECORDS_START) as usize];
        file.read_at(&mut data, RECORDS_START)
            .map_err(|e| StoreError::io(path, e))?;
        // The newer header slot may have been damaged after its generation began: its
        // records are still there and say so. (A crash during the reset itself leaves
        // no records of the new generation, so this cannot misfire.)
        if decode_record(&data, h.generation + 1, 1).is_some() {
            tracing::warn!(path = %path.display(), "journal header slot damaged; using generation found in the records");
            h.generation += 1;
        }
        let mut records = Vec::new();
        let mut pos = 0usize;
        let mut lsn = 1u64;
        while let Some((r, len)) = decode_record(&data[pos..], h.generation, lsn) {
            records.push(r);
            pos += len;
            lsn += 1;
        }
        let mut j = Journal::with(file, h);
        j.pending_offset = RECORDS_START + pos as u64;
        j.next_lsn = lsn;
        j.durable_lsn = lsn;
        Ok((j, Replay { records }))
    }

    fn with(file: DiskFile, h: Header) -> Journal {
        Journal {
            file: Arc::new(file),
            generation: h.generation,
            capacity: h.capacity,
            pending_offset: RECORDS_START,
            pending: Vec::new(),
            next_lsn: 1,
            durable_lsn: 1,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of the record area in use (written or buffered).
    pub fn used_bytes(&self) -> u64 {
        self.pending_offset + self.pending.len() as u64 - RECORDS_START
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
        let lsn = self.next_lsn;
        let rec = encode_record(self.generation, lsn, kind, payload);
        assert!(
            self.used_bytes() + rec.len() as u64 + RECORDS_START <= self.capacity,
            "journal overflow: reservation accounting is wrong"
        );
        self.pending.extend_from_slice(&rec);
        self.next_lsn += 1;
        if self.pending.len() >= WRITE_BUFFER_MAX_BYTES {
            self.write_pending()?;
        }
        Ok(lsn)
    }

    fn write_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_at(&self.pending, self.pending_offset)
            .map_err(|e| StoreError::io(self.file.path(), e))?;
        self.pending_offset += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// First half of a durability point, under the journal lock: appends a commit
    /// record and hands back the unwritten bytes, their file offset and the LSN they
    /// make durable. The caller then syncs the block data, and only then calls
    /// `write_synced` (outside the lock): the commit record promises that every block
    /// the records before it name is already on stable storage.
    pub fn take_for_sync(&mut self) -> (Vec<u8>, u64, u64) {
        let lsn = self.next_lsn;
        let rec = encode_record(self.generation, lsn, KIND_COMMIT, &[]);
        assert!(
            self.used_bytes() + rec.len() as u64 + RECORDS_START <= self.capacity,
            "journal overflow on commit"
        );
        self.pending.extend_from_slice(&rec);
        self.next_lsn += 1;
        let bytes = std::mem::take(&mut self.pending);
        let offset = self.pending_offset;
        self.pending_offset += bytes.len() as u64;
        (bytes, offset, self.next_lsn)
    }

    pub fn file(&self) -> &DiskFile {
        &self.file
    }

    pub fn file_arc(&self) -> Arc<DiskFile> {
        self.file.clone()
    }

    /// Forgets the records from `lsn` on (found at file `offset`): replay stopped
    /// there, and new records must follow the last one applied.
    pub fn truncate_to(&mut self, lsn: u64, offset: u64) {
        assert!(self.pending.is_empty(), "truncate with buffered records");
        self.pending_offset = offset;
        self.next_lsn = lsn;
        self.durable_lsn = lsn;
    }

    pub fn mark_durable(&mut self, lsn: u64) {
        self.durable_lsn = self.durable_lsn.max(lsn);
    }

    /// Ends a generation: every record so far has been applied to its home location
    /// and synced. Writes the new header into the slot the current one is not in.
    pub fn reset(&mut self) -> Result<(), StoreError> {
        assert!(
            self.pending.is_empty(),
            "reset with unwritten journal records"
        );
        let generation = self.generation + 1;
        let slot = generation % 2;
        let h = Header {
            generation,
            capacity: self.capacity,
        };
        self.file
            .write_at(&encode_header(h), slot * HEADER_SLOT_BYTES)
            .map_err(|e| StoreError::io(self.file.path(), e))?;
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(self.file.path(), e))?;
        self.generation = generation;
        self.pending_offset = RECORDS_START;
        self.next_lsn = 1;
        self.durable_lsn = 1;
        Ok(())
    }
}

/// Writes bytes taken by `take_for_sync` and makes them durable.
pub fn write_synced(file: &DiskFile, bytes: &[u8], offset: u64) -> Result<(), StoreError> {
    file.write_at(bytes, offset)
        .map_err(|e| StoreError::io(file.path(), e))?;
    file.sync_data().map_err(|e| StoreError::io(file.path(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let (mut j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            assert!(r.records.is_empty());
            assert_eq!(j.append(KIND_MAP, b"one").unwrap(), 1);
            assert_eq!(j.append(KIND_MAP, b"two").unwrap(), 2);
            let (bytes, off, lsn) = j.take_for_sync();
            assert_eq!(lsn, 4);
            write_synced(j.file(), &bytes, off).unwrap();
            j.append(KIND_MAP, b"three").unwrap();
            let (bytes, off, _) = j.take_for_sync();
            // Tear the last record ("three" + its commit): stop 30 bytes short.
            write_synced(j.file(), &bytes[..bytes.len() - 30], off).unwrap();
        }
        let (j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        let kinds: Vec<_> = r
            .records
            .iter()
            .map(|r| (r.kind, r.payload.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (KIND_MAP, b"one".to_vec()),
                (KIND_MAP, b"two".to_vec()),
                (KIND_COMMIT, vec![])
            ]
        );
        assert_eq!(j.next_lsn(), 4);
    }

    #[test]
    fn reset_hides_old_generation_and_survives_torn_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let (mut j, _) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
            j.append(KIND_MAP, b"old").unwrap();
            let (bytes, off, _) = j.take_for_sync();
            write_synced(j.file(), &bytes, off).unwrap();
            j.reset().unwrap();
        }
        let (mut j, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert!(
            r.records.is_empty(),
            "records of a finished generation must not replay"
        );
        j.append(KIND_MAP, b"new").unwrap();
        let (bytes, off, _) = j.take_for_sync();
        write_synced(j.file(), &bytes, off).unwrap();
        // Damage the newest header: the records of its generation are still found.
        let f = DiskFile::open(&p, false).unwrap();
        f.write_at(&[0xff; 16], 0).unwrap(); // generation 2 lives in slot 0
        let (_, r) = Journal::open(&p, CAPACITY_MIN_BYTES).unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.records[0].payload, b"new");
        // Both headers destroyed: a clear error, not a panic.
        f.write_at(&[0xff; 16], HEADER_SLOT_BYTES).unwrap();
        assert!(matches!(
            Journal::open(&p, CAPACITY_MIN_BYTES),
            Err(StoreError::Corrupted { .. })
        ));
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
