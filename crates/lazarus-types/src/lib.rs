//! Identifiers, unit newtypes and limits shared by every Lazarus crate.
//!
//! Nothing here does I/O. Sizes are in bytes unless the name says otherwise;
//! counts and indexes are distinct types so that an LBA is never mistaken for a
//! page index.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Size of one logical block, of one slice page and of one checksum page.
pub const BLOCK_SIZE: usize = 4096;
/// `BLOCK_SIZE` as u64, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Bytes in a `BlockId` and in a page checksum.
pub const ID_LEN: usize = 16;
/// `BlockId`s per slice page, and checksums per checksum page.
pub const FANOUT: usize = BLOCK_SIZE / ID_LEN;
/// `FANOUT` as u64.
pub const FANOUT_U64: u64 = FANOUT as u64;
/// Largest volume we accept: 1 PiB keeps every offset well inside u64 and the
/// in-memory checksum tree bounded (level 1 is 4 GiB of slice / 1 MiB of tree per
/// 64 GiB of volume).
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;

const _: () = assert!(FANOUT == 256);
const _: () = assert!(FANOUT * ID_LEN == BLOCK_SIZE);

/// Content address of a 4 KiB block: BLAKE3 of the content, truncated to 16 bytes.
/// The all-zero id means "unmapped / zeroes" and is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlockId(pub [u8; ID_LEN]);

impl BlockId {
    pub const ZERO: BlockId = BlockId([0; ID_LEN]);

    /// The id of a block's content. All-zero content maps to `BlockId::ZERO`, which is
    /// what keeps zeroes thin: they are never stored.
    pub fn of(data: &[u8]) -> BlockId {
        debug_assert_eq!(data.len(), BLOCK_SIZE);
        if is_zero(data) {
            return BlockId::ZERO;
        }
        BlockId::hash_of(data)
    }

    /// The BLAKE3-derived id of content, even when that content is all zeroes (used
    /// to provision a real zero block for WRITE_ZEROES with NO_HOLE).
    pub fn hash_of(data: &[u8]) -> BlockId {
        let h = blake3::hash(data);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&h.as_bytes()[..ID_LEN]);
        // A real hash that happens to be all zero would be mistaken for "unmapped";
        // the chance is 2^-128, but make it impossible rather than improbable.
        if id == [0; ID_LEN] {
            id[0] = 1;
        }
        BlockId(id)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; ID_LEN]
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", self.to_hex())
    }
}

/// Checksum of one page (slice page or checksum page): BLAKE3 of its 4 KiB,
/// truncated to 16 bytes; an all-zero page has the all-zero checksum, so the
/// untouched parts of a thin volume cost nothing at any level of the tree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Checksum(pub [u8; ID_LEN]);

impl Checksum {
    pub const ZERO: Checksum = Checksum([0; ID_LEN]);

    pub fn of_page(page: &[u8]) -> Checksum {
        debug_assert_eq!(page.len(), BLOCK_SIZE);
        if is_zero(page) {
            return Checksum::ZERO;
        }
        Checksum(BlockId::hash_of(page).0)
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({})", self.to_hex())
    }
}

/// Logical block address: index of a 4 KiB block inside a volume.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct Lba(pub u64);

impl Lba {
    pub fn page(self) -> PageIndex {
        PageIndex(self.0 / FANOUT_U64)
    }
    pub fn slot(self) -> usize {
        (self.0 % FANOUT_U64) as usize
    }
}

/// Index of a slice page inside a volume's slice file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct PageIndex(pub u64);

impl PageIndex {
    pub fn first_lba(self) -> Lba {
        Lba(self.0 * FANOUT_U64)
    }
}

/// Number of slice pages needed for a volume of `size_bytes`.
pub fn page_count_for(size_bytes: u64) -> u64 {
    let blocks = size_bytes.div_ceil(BLOCK_SIZE_U64);
    blocks.div_ceil(FANOUT_U64)
}

pub fn is_zero(data: &[u8]) -> bool {
    // Word-at-a-time: this runs on every written block.
    let chunks = data.chunks_exact(8);
    let tail = chunks.remainder();
    chunks
        .into_iter()
        .all(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")) == 0)
        && tail.iter().all(|b| *b == 0)
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses sizes such as `1GiB`, `512MiB`, `4096`, `10G` (binary units throughout).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected a number such as 1GiB"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Checks a volume size: a positive multiple of 4 KiB, at most `VOLUME_SIZE_MAX_BYTES`.
pub fn check_volume_size(size_bytes: u64) -> Result<(), String> {
    if size_bytes == 0 {
        return Err("volume size must be greater than zero".into());
    }
    if !size_bytes.is_multiple_of(BLOCK_SIZE_U64) {
        return Err(format!(
            "volume size {size_bytes} is not a multiple of 4096 bytes"
        ));
    }
    if size_bytes > VOLUME_SIZE_MAX_BYTES {
        return Err(format!(
            "volume size {size_bytes} exceeds the maximum of {VOLUME_SIZE_MAX_BYTES} bytes"
        ));
    }
    Ok(())
}

/// Checks a volume name: 1-64 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(format!(
            "invalid volume name {name:?}: use 1-64 characters of letters, digits, '.', '_' or '-', not starting with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_content_is_unmapped() {
        assert_eq!(BlockId::of(&[0u8; BLOCK_SIZE]), BlockId::ZERO);
        assert_ne!(BlockId::hash_of(&[0u8; BLOCK_SIZE]), BlockId::ZERO);
        let mut d = [0u8; BLOCK_SIZE];
        d[4095] = 1;
        assert!(!BlockId::of(&d).is_zero());
        assert_eq!(Checksum::of_page(&[0u8; BLOCK_SIZE]), Checksum::ZERO);
    }

    #[test]
    fn lba_page_slot() {
        assert_eq!(Lba(0).page(), PageIndex(0));
        assert_eq!(Lba(255).slot(), 255);
        assert_eq!(Lba(256).page(), PageIndex(1));
        assert_eq!(Lba(257).slot(), 1);
        assert_eq!(page_count_for(1 << 30), 1024);
        assert_eq!(page_count_for(64 << 30), 65536);
        assert_eq!(page_count_for(4096), 1);
        assert_eq!(page_count_for(4096 * 257), 2);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("99999999999999999999TiB").is_err());
        assert!(check_volume_size(4095).is_err());
        assert!(check_volume_size(0).is_err());
        assert!(check_volume_size(1 << 30).is_ok());
        assert!(check_volume_name("vol0").is_ok());
        assert!(check_volume_name("../x").is_err());
        assert!(check_volume_name("").is_err());
    }
}

/// What a volume's primary does in jeopardy when the recovery server does not answer
/// (DESIGN.md, "Last failure domain"). One policy holds for the whole cluster: each node
/// registers its own, and `accept` is in force only while every registered node says
/// `accept` (`ClusterMeta::jeopardy_policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JeopardyPolicy {
    /// Writes wait (then fail) until the recovery server answers; in jeopardy the
    /// primary serves on its recovery-server hold alone.
    #[default]
    Suspend,
    /// Writes are acknowledged on the last copy alone, counted as lag.
    Accept,
}
