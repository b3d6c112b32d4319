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
        BlockId::from_hash(blake3::hash(data).as_bytes())
    }

    /// `hash_of` of each 4 KiB block of `data`, in order. Same ids as one call per
    /// block, computed several blocks at a time: BLAKE3 hashes the four 1 KiB chunks
    /// of one block in parallel SIMD lanes, which leaves most lanes of a wide vector
    /// unit idle; here chunk `c` of up to 16 blocks goes through one `hash_many` call
    /// (the library's own SIMD kernel), then the blocks' two parent levels the same
    /// way. The tree is the one `blake3::hash` builds for 4 KiB: four chunks, two
    /// parents, a root parent.
    pub fn hash_each(data: &[u8]) -> Vec<BlockId> {
        assert_eq!(data.len() % BLOCK_SIZE, 0, "whole blocks only");
        let mut out = Vec::with_capacity(data.len() / BLOCK_SIZE);
        for group in data.chunks(many::GROUP * BLOCK_SIZE) {
            many::hash_group(group, &mut out);
        }
        out
    }

    /// `of` of each 4 KiB block of `data` (zero blocks are `BlockId::ZERO`), hashed
    /// several at a time as `hash_each`.
    pub fn of_each(data: &[u8]) -> Vec<BlockId> {
        assert_eq!(data.len() % BLOCK_SIZE, 0, "whole blocks only");
        if !data.chunks_exact(BLOCK_SIZE).any(is_zero) {
            return BlockId::hash_each(data);
        }
        data.chunks_exact(BLOCK_SIZE).map(BlockId::of).collect()
    }

    /// The id of a BLAKE3 hash (its first 16 bytes; never the zero id).
    fn from_hash(h: &[u8]) -> BlockId {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&h[..ID_LEN]);
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

/// Many blocks hashed at once (`BlockId::hash_each`), through the `blake3` crate's
/// multi-input kernel (`blake3::platform`, pinned with the crate's exact version in
/// the workspace: it is not part of the crate's stable API).
mod many {
    use super::{BlockId, BLOCK_SIZE};
    use blake3::platform::Platform;
    use blake3::{IncrementCounter, CHUNK_LEN, OUT_LEN};

    /// Blocks per group: the widest SIMD degree the crate uses (AVX-512).
    pub(super) const GROUP: usize = 16;
    const CHUNKS: usize = BLOCK_SIZE / CHUNK_LEN;
    const _: () = assert!(CHUNKS == 4, "the tree below is the one of four chunks");
    /// BLAKE3's IV (the SHA-256 one), the key of the unkeyed hash.
    const IV: [u32; 8] = [
        0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB,
        0x5BE0CD19,
    ];
    const CHUNK_START: u8 = 1;
    const CHUNK_END: u8 = 2;
    const PARENT: u8 = 4;
    const ROOT: u8 = 8;

    static PLATFORM: std::sync::LazyLock<Platform> = std::sync::LazyLock::new(Platform::detect);

    /// Appends the id of each block of `group` (at most `GROUP` whole blocks).
    pub(super) fn hash_group(group: &[u8], out: &mut Vec<BlockId>) {
        let n = group.len() / BLOCK_SIZE;
        if n < 2 {
            out.extend(group.chunks_exact(BLOCK_SIZE).map(BlockId::hash_of));
            return;
        }
        let p = *PLATFORM;
        // Chaining values of chunk c of every block: cvs[c][k].
        let mut cvs = [[[0u8; OUT_LEN]; GROUP]; CHUNKS];
        for (c, cv) in cvs.iter_mut().enumerate() {
            let inputs: Vec<&[u8; CHUNK_LEN]> = (0..n)
                .map(|k| {
                    let at = k * BLOCK_SIZE + c * CHUNK_LEN;
                    group[at..at + CHUNK_LEN].try_into().expect("one chunk")
                })
                .collect();
            p.hash_many(
                &inputs,
                &IV,
                c as u64,
                IncrementCounter::No,
                0,
                CHUNK_START,
                CHUNK_END,
                cv[..n].as_flattened_mut(),
            );
        }
        // The two parents of each block: (chunk 0, chunk 1) and (chunk 2, chunk 3).
        let mut pairs = [[0u8; 2 * OUT_LEN]; 2 * GROUP];
        for k in 0..n {
            for half in 0..2 {
                let pair = &mut pairs[2 * k + half];
                pair[..OUT_LEN].copy_from_slice(&cvs[2 * half][k]);
                pair[OUT_LEN..].copy_from_slice(&cvs[2 * half + 1][k]);
            }
        }
        let mut parents = [[0u8; OUT_LEN]; 2 * GROUP];
        let inputs: Vec<&[u8; 2 * OUT_LEN]> = pairs[..2 * n].iter().collect();
        p.hash_many(
            &inputs,
            &IV,
            0,
            IncrementCounter::No,
            PARENT,
            0,
            0,
            parents[..2 * n].as_flattened_mut(),
        );
        // The root of each block: its two parents, as the root node.
        let mut tops = [[0u8; 2 * OUT_LEN]; GROUP];
        for k in 0..n {
            tops[k][..OUT_LEN].copy_from_slice(&parents[2 * k]);
            tops[k][OUT_LEN..].copy_from_slice(&parents[2 * k + 1]);
        }
        let mut roots = [[0u8; OUT_LEN]; GROUP];
        let inputs: Vec<&[u8; 2 * OUT_LEN]> = tops[..n].iter().collect();
        p.hash_many(
            &inputs,
            &IV,
            0,
            IncrementCounter::No,
            PARENT | ROOT,
            0,
            0,
            roots[..n].as_flattened_mut(),
        );
        out.extend(roots[..n].iter().map(|r| BlockId::from_hash(r)));
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

    /// `of_page` of each 4 KiB page of `data`, hashed several at a time
    /// (`BlockId::of_each`).
    pub fn of_pages(data: &[u8]) -> Vec<Checksum> {
        BlockId::of_each(data)
            .into_iter()
            .map(|id| Checksum(id.0))
            .collect()
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
    }

    #[test]
    fn blocks_hashed_together_get_the_ids_each_gets_alone() {
        // Every group size up to past two groups, distinct and repeated contents,
        // zero blocks among them.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut data = vec![0u8; 40 * BLOCK_SIZE];
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        data[5 * BLOCK_SIZE..6 * BLOCK_SIZE].fill(0);
        let copy = data[..BLOCK_SIZE].to_vec();
        data[9 * BLOCK_SIZE..10 * BLOCK_SIZE].copy_from_slice(&copy);
        for n in 0..=40 {
            let d = &data[..n * BLOCK_SIZE];
            let alone: Vec<BlockId> = d.chunks_exact(BLOCK_SIZE).map(BlockId::hash_of).collect();
            assert_eq!(BlockId::hash_each(d), alone, "{n} blocks");
            let of: Vec<BlockId> = d.chunks_exact(BLOCK_SIZE).map(BlockId::of).collect();
            assert_eq!(BlockId::of_each(d), of, "{n} blocks");
            let pages: Vec<Checksum> = d.chunks_exact(BLOCK_SIZE).map(Checksum::of_page).collect();
            assert_eq!(Checksum::of_pages(d), pages, "{n} pages");
            for (id, b) in alone.iter().zip(d.chunks_exact(BLOCK_SIZE)) {
                assert_eq!(id.0[..], blake3::hash(b).as_bytes()[..ID_LEN]);
            }
        }
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
