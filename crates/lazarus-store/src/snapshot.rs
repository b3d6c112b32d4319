//! Snapshots: a volume's slice tree frozen at a checkpoint, its pages shared with the
//! volume until the volume changes them (copy-on-write), its blocks shared by id.
//!
//! A snapshot is one file, `volumes/NAME/snapshots/SNAP.snap`, holding the volume's
//! level-1 checksums at the checkpoint it was taken at: one per slice page. Because a
//! page's checksum is the `BlockId` of the page's content (the same hash, the same
//! all-zero convention), a snapshot's page `p` is found by content: either the volume's
//! page `p` still holds it (clean since the checkpoint, same recorded checksum), or the
//! block store holds that content as a block (a *page block*), put there by the first
//! change of the volume's page after the snapshot (`Store::preserve`), before the
//! checkpoint that overwrites the page on disk. Taking a snapshot writes only this file:
//! its cost grows with the volume's mapped pages (16 bytes each), not with its data.
//!
//! References: each volume keeps a `SnapLayer` with how many snapshot entries name
//! each page content (`pages`) and which of those contents it holds as page blocks
//! (`held`). A held page block carries one reference of its own and one on each block
//! its entries name; the last snapshot entry naming it releases them. Like every other
//! count these are not stored: they are rebuilt at start-up (`Store::open`).
//!
//! File format (little-endian): magic `LZSNAP01`, u32 version (1), u64 volume uid, u64
//! size in bytes, u64 creation time (Unix seconds), u64 sequence (per volume, in order
//! of creation), u64 id, u16 name length, name, u64 entry count `n`, `n` × (u64 page, 16-byte
//! checksum) for the pages that are not all-zero, the 16-byte root of the tree, CRC32C
//! of everything before it.

use crate::volume::{level_lens, tree_root};
use lazarus_types::{Checksum, ID_LEN};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

pub const SNAP_MAGIC: &[u8; 8] = b"LZSNAP01";
pub const SNAP_VERSION: u32 = 1;
/// The file extension of a snapshot.
pub const SNAP_EXT: &str = "snap";

/// One snapshot of a volume.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub volume_uid: u64,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub seq: u64,
    /// Chosen by whoever took it (a cluster's primary, the same on every copy): tells
    /// this snapshot from another one taken later under the same name.
    pub id: u64,
    /// Level 1 of the snapshot's tree: the checksum (= page block id) of each slice
    /// page, `Checksum::ZERO` for a page that reads as zeroes.
    pub l1: Vec<Checksum>,
    pub root: Checksum,
    pub path: PathBuf,
}

impl Snapshot {
    pub fn page_count(&self) -> u64 {
        self.l1.len() as u64
    }

    pub fn block_count(&self) -> u64 {
        self.size_bytes / lazarus_types::BLOCK_SIZE_U64
    }

    /// Pages that are not all zeroes.
    pub fn mapped_pages(&self) -> u64 {
        self.l1.iter().filter(|c| **c != Checksum::ZERO).count() as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mapped: Vec<(u64, Checksum)> = self
            .l1
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != Checksum::ZERO)
            .map(|(p, c)| (p as u64, *c))
            .collect();
        let mut b = Vec::with_capacity(64 + self.name.len() + mapped.len() * 24);
        b.extend_from_slice(SNAP_MAGIC);
        b.extend_from_slice(&SNAP_VERSION.to_le_bytes());
        b.extend_from_slice(&self.volume_uid.to_le_bytes());
        b.extend_from_slice(&self.size_bytes.to_le_bytes());
        b.extend_from_slice(&self.created_unix.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(mapped.len() as u64).to_le_bytes());
        for (p, c) in mapped {
            b.extend_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&c.0);
        }
        b.extend_from_slice(&self.root.0);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a snapshot file: its CRC, its fields, and that its entries
    /// hash up to its root.
    pub fn decode(b: &[u8], path: PathBuf) -> Result<Snapshot, String> {
        if b.len() < 4 + 8 {
            return Err("file too short".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("CRC mismatch".into());
        }
        let mut r = Reader { b: body, at: 0 };
        if r.take(8)? != SNAP_MAGIC {
            return Err("bad magic".into());
        }
        let version = u32::from_le_bytes(r.take(4)?.try_into().expect("4"));
        if version != SNAP_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let volume_uid = r.u64()?;
        let size_bytes = r.u64()?;
        lazarus_types::check_volume_size(size_bytes)?;
        let created_unix = r.u64()?;
        let seq = r.u64()?;
        let id = r.u64()?;
        let name_len = u16::from_le_bytes(r.take(2)?.try_into().expect("2")) as usize;
        let name = String::from_utf8(r.take(name_len)?.to_vec()).map_err(|_| "bad name")?;
        check_snapshot_name(&name)?;
        let pages = level_lens(lazarus_types::page_count_for(size_bytes))[0];
        let n = r.u64()?;
        if n > pages {
            return Err(format!("{n} entries for {pages} pages"));
        }
        let mut l1 = vec![Checksum::ZERO; pages as usize];
        for _ in 0..n {
            let p = r.u64()?;
            let c = Checksum(r.take(ID_LEN)?.try_into().expect("16"));
            if p >= pages {
                return Err(format!("page {p} past the end ({pages} pages)"));
            }
            l1[p as usize] = c;
        }
        let root = Checksum(r.take(ID_LEN)?.try_into().expect("16"));
        if r.at != body.len() {
            return Err("trailing bytes".into());
        }
        if tree_root(&l1) != root {
            return Err("its pages do not hash up to its root".into());
        }
        Ok(Snapshot {
            name,
            volume_uid,
            size_bytes,
            created_unix,
            seq,
            id,
            l1,
            root,
            path,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).ok_or("length overflow")?;
        let s = self.b.get(self.at..end).ok_or("file too short")?;
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// Snapshot names follow the volume name rules (they appear in export names as
/// `VOLUME@NAME` and as file names).
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    lazarus_types::check_volume_name(name)
        .map_err(|e| e.replacen("invalid volume name", "invalid snapshot name", 1))
}

/// A volume's snapshots and the page references they hold.
#[derive(Debug, Default)]
pub struct SnapLayer {
    pub list: BTreeMap<String, Arc<Snapshot>>,
    /// Page content -> how many snapshot entries name it.
    pub pages: HashMap<Checksum, u32>,
    /// Page contents this volume's snapshots hold as stored page blocks.
    pub held: HashSet<Checksum>,
    /// Snapshot files that could not be read (name, error): reported, not served.
    pub failed: Vec<(String, String)>,
}

impl SnapLayer {
    pub fn next_seq(&self) -> u64 {
        self.list.values().map(|s| s.seq).max().unwrap_or(0) + 1
    }

    pub(crate) fn count(&mut self, s: &Snapshot) {
        for c in s.l1.iter().filter(|c| **c != Checksum::ZERO) {
            *self.pages.entry(*c).or_default() += 1;
        }
    }

    /// Drops the snapshot's entries; returns the page contents no snapshot names any
    /// more that were held (their references are the caller's to release).
    pub(crate) fn uncount(&mut self, s: &Snapshot) -> Vec<Checksum> {
        let mut released = Vec::new();
        for c in s.l1.iter().filter(|c| **c != Checksum::ZERO) {
            if let Some(n) = self.pages.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    self.pages.remove(c);
                    if self.held.remove(c) {
                        released.push(*c);
                    }
                }
            }
        }
        released
    }
}
