//! Guards the slice page cache (`page_cache.rs`): with a budget smaller than a volume's
//! pages, clean pages leave memory at checkpoints and are read back, verified, when
//! needed; reads and writes see exactly what they would with every page resident; a
//! page damaged on disk while out of memory reads as an error, never as zeroes or
//! other data; a restart and a deletion count every page's blocks.

use lazarus_store::{Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE, FANOUT_U64};
use std::os::unix::fs::FileExt;

const PAGES: u64 = 64;

fn block(page: u64, slot: u64, gen: u8) -> Vec<u8> {
    let mut b = vec![gen; BLOCK_SIZE];
    b[..8].copy_from_slice(&page.to_le_bytes());
    b[8..16].copy_from_slice(&slot.to_le_bytes());
    b
}

fn opts(cache_pages: u64) -> StoreOptions {
    StoreOptions {
        journal_bytes: 8 << 20,
        page_cache_bytes: cache_pages * BLOCK_SIZE as u64,
    }
}

fn read(s: &Store, v: &lazarus_store::Volume, lba: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    s.read_blocks(v, Lba(lba), &mut buf)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// A store with a cache of `cache_pages` and a volume of `PAGES` pages whose slots
/// `slots` of every page hold `block(page, slot, 1)`.
fn filled(
    dir: &std::path::Path,
    cache_pages: u64,
    slots: &[u64],
) -> (Store, std::sync::Arc<lazarus_store::Volume>) {
    let s = Store::open(dir, opts(cache_pages)).unwrap();
    let v = s
        .create_volume("v", PAGES * FANOUT_U64 * BLOCK_SIZE as u64)
        .unwrap();
    for p in 0..PAGES {
        for &slot in slots {
            s.write_blocks(&v, Lba(p * FANOUT_U64 + slot), &block(p, slot, 1))
                .unwrap();
        }
    }
    (s, v)
}

#[test]
fn evicted_pages_read_back_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    // Slots 0 and 7 of every page.
    let (s, v) = filled(dir.path(), 4, &[0, 7]);
    let usage_before = v.usage();
    s.flush().unwrap();
    s.checkpoint().unwrap();
    let st = s.page_cache_stats();
    assert!(st.resident_pages <= 4, "{st:?}");
    assert!(st.evictions >= PAGES - 4, "{st:?}");
    assert_eq!(v.usage(), usage_before, "usage counts evicted pages");
    let evicted = (0..PAGES).filter(|p| !v.page_resident(*p)).count() as u64;
    assert!(evicted >= PAGES - 4, "{evicted} pages out of memory");

    // Every block reads back; unmapped ones read as zeroes.
    for p in 0..PAGES {
        for slot in [0, 7] {
            assert!(read(&s, &v, p * FANOUT_U64 + slot).unwrap() == block(p, slot, 1));
        }
        assert!(read(&s, &v, p * FANOUT_U64 + 3)
            .unwrap()
            .iter()
            .all(|b| *b == 0));
    }
    let st = s.page_cache_stats();
    assert!(st.loads >= PAGES - 4, "{st:?}");
    assert!(
        st.resident_pages <= 4 + 1,
        "reads keep the cache near its budget: {st:?}"
    );

    // A write to an evicted page keeps the page's other slots.
    s.checkpoint().unwrap();
    let p = 20;
    assert!(!v.page_resident(p));
    s.write_blocks(&v, Lba(p * FANOUT_U64 + 7), &block(p, 7, 2))
        .unwrap();
    assert!(read(&s, &v, p * FANOUT_U64).unwrap() == block(p, 0, 1));
    assert!(read(&s, &v, p * FANOUT_U64 + 7).unwrap() == block(p, 7, 2));
    s.flush().unwrap();
    s.checkpoint().unwrap();
    drop(v);
    drop(s);

    // A restart counts the blocks of every page (none missing, none freed early).
    let s = Store::open(dir.path(), opts(4)).unwrap();
    assert!(s.recovery.damaged_pages.is_empty(), "{:?}", s.recovery);
    assert_eq!(s.recovery.missing_blocks, 0);
    let v = s.volume("v").unwrap();
    assert_eq!(s.block_stats().blocks, 2 * PAGES);
    // Pages past the cache's room stayed on disk as the store opened.
    let st = s.page_cache_stats();
    assert!(st.resident_pages <= 4, "{st:?}");
    assert_eq!(v.usage(), (2 * PAGES, PAGES));
    for q in 0..PAGES {
        let want7 = block(q, 7, if q == p { 2 } else { 1 });
        assert!(read(&s, &v, q * FANOUT_U64).unwrap() == block(q, 0, 1));
        assert!(read(&s, &v, q * FANOUT_U64 + 7).unwrap() == want7);
    }
    // Deleting the volume releases the blocks of evicted pages too.
    s.checkpoint().unwrap();
    drop(v);
    s.delete_volume("v").unwrap();
    s.flush().unwrap();
    s.checkpoint().unwrap();
    s.flush().unwrap();
    assert_eq!(s.block_stats().blocks, 0, "{:?}", s.block_stats());
}

#[test]
fn an_evicted_page_damaged_on_disk_reads_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (s, v) = filled(dir.path(), 2, &[1]);
    s.flush().unwrap();
    s.checkpoint().unwrap();
    let p = 9;
    assert!(!v.page_resident(p));
    // (`locate_page` reads no page: `Store::locate` would bring it back to memory.)
    let (file, offset) = v.locate_page(Lba(p * FANOUT_U64));
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    // The page's first slot (unmapped: zeroes) now names a block, as a device error
    // or a stray write might leave it.
    f.write_all_at(&[0x5a; 16], offset).unwrap();
    assert!(
        read(&s, &v, p * FANOUT_U64 + 1).is_err(),
        "a page damaged on disk read as data"
    );
    assert!(read(&s, &v, p * FANOUT_U64).is_err(), "never zeroes");
    assert_eq!(v.damaged_pages().len(), 1);
    assert_eq!(v.damaged_pages()[0].0, p);
    // The other pages are untouched.
    for q in (0..PAGES).filter(|q| *q != p) {
        assert!(read(&s, &v, q * FANOUT_U64 + 1).unwrap() == block(q, 1, 1));
    }
    // A scrub of another evicted page damaged on disk finds it, with no copy in memory
    // to rewrite it from.
    let q = 30;
    s.checkpoint().unwrap();
    assert!(!v.page_resident(q));
    let (_, offset) = v.locate_page(Lba(q * FANOUT_U64));
    f.write_all_at(&[0x77; 16], offset + 1).unwrap();
    assert!(v.scrub_slice_page(q).unwrap());
    assert!(v.damaged_pages().iter().any(|(d, _)| *d == q));
    assert!(read(&s, &v, q * FANOUT_U64 + 1).is_err());
}
