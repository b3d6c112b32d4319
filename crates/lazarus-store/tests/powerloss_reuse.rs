//! A slot freed too early, on the power-loss simulator (`disk::powerloss`): a block
//! whose last reference went, came back (a write of the same content) and went again
//! while a flush synced must keep its slot until the later release is durable. Freed
//! at the earlier one, the slot takes a new block, and after a power loss the flushed
//! mapping that took the block back names a slot holding something else.

use lazarus_store::disk::powerloss;
use lazarus_store::{Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE};

fn block(seed: u8) -> Vec<u8> {
    let mut b = vec![seed; BLOCK_SIZE];
    b[0] = seed.wrapping_add(1);
    b
}

#[test]
fn a_block_taken_back_keeps_its_slot_until_its_last_release_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        journal_bytes: 8 << 20,
        // A cache of two pages: most pages are read back from disk.
        page_cache_bytes: 2 * 4096,
    };
    powerloss::enable();
    let (x, y, z, w) = (block(1), block(2), block(3), block(4));
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        s.create_volume("v", 64 * 4096).unwrap();
        s.checkpoint().unwrap();
        let v = s.volume("v").unwrap();
        s.write_blocks(&v, Lba(0), &x).unwrap();
        s.flush().unwrap();
        // X's last reference goes (its slot waits for this unmapping to be durable)...
        s.write_blocks(&v, Lba(0), &y).unwrap();
        // ... comes back: LBA 1 takes the same content, deduplicated ...
        s.write_blocks(&v, Lba(1), &x).unwrap();
        // ... and goes again while the next flush syncs (after what it covers).
        s.flush_with(|| s.write_blocks(&v, Lba(1), &z).unwrap())
            .unwrap();
        // A new block: it must not land in X's slot, which LBA 1's flushed mapping
        // still names until the overwrite by Z is durable.
        s.write_blocks(&v, Lba(2), &w).unwrap();
    }
    // The power goes off: every write reached the disk, but the journal bytes after
    // the flush were never written (only a flush writes them).
    powerloss::crash(&mut |_| 3);
    powerloss::disable();
    let s = Store::open(dir.path(), opts).unwrap();
    assert_eq!(s.recovery.missing_blocks, 0, "{:?}", s.recovery);
    let v = s.volume("v").unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    s.read_blocks(&v, Lba(1), &mut buf)
        .expect("LBA 1 reads back what was flushed");
    assert_eq!(buf, x, "LBA 1 lost its flushed content");
    s.read_blocks(&v, Lba(0), &mut buf).unwrap();
    assert_eq!(buf, y);
}
