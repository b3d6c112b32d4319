//! Guards: the store against a HashMap model, across simulated process crashes.
//! A crash here is dropping the store without a flush: what was pwritten stays (as it
//! does when a process is killed), the journal buffer is lost. Every LBA whose last
//! write happened before the last FLUSH must read back exactly; no LBA may read as
//! corrupt; reference counting must not leak or double-free slots.

use lazarus_store::{Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE};
use std::collections::HashMap;

fn block(seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut b = vec![0u8; BLOCK_SIZE];
    // A few distinct contents repeat, so deduplication is exercised too.
    let fill = (seed % 7) as u8;
    if !seed.is_multiple_of(5) {
        rng.fill(&mut b[..64]);
    }
    b[64..].fill(fill);
    b
}

#[test]
fn random_ops_survive_crashes() {
    let seed = std::env::var("LAZARUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        journal_bytes: 8 << 20,
        ..Default::default()
    };
    let mut blocks = 4096u64; // 16 MiB volume, 16 slice pages; grown by 16 MiB now and then
    let mut durable: HashMap<u64, Option<u64>> = HashMap::new(); // lba -> seed (None = zero)
    let mut latest: HashMap<u64, Option<u64>> = HashMap::new();
    let mut dirty_since_flush: std::collections::HashSet<u64> = Default::default();
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        s.create_volume("v", blocks * 4096).unwrap();
    }
    for round in 0..12 {
        // Every other round with a page cache of three pages: most slice pages are
        // evicted at each checkpoint and read back from disk when next needed.
        let opts = StoreOptions {
            page_cache_bytes: if round % 2 == 0 {
                3 * 4096
            } else {
                opts.page_cache_bytes
            },
            ..opts.clone()
        };
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        assert!(
            s.recovery.damaged_pages.is_empty(),
            "round {round}: crash looked like corruption: {:?}",
            s.recovery
        );
        assert_eq!(s.recovery.missing_blocks, 0, "round {round}");
        let v = s.volume("v").unwrap();
        // Verify.
        let mut buf = vec![0u8; BLOCK_SIZE];
        for lba in 0..blocks {
            s.read_blocks(&v, Lba(lba), &mut buf)
                .unwrap_or_else(|e| panic!("round {round} lba {lba}: {e}"));
            let want_durable = durable.get(&lba).copied().flatten();
            let ok_durable = match want_durable {
                Some(sd) => buf == block(sd),
                None => buf.iter().all(|b| *b == 0),
            };
            if !dirty_since_flush.contains(&lba) {
                assert!(ok_durable, "round {round}: flushed LBA {lba} lost");
            }
            // Whatever is there now is what later rounds build on.
            let now = if buf.iter().all(|b| *b == 0) {
                None
            } else if ok_durable {
                want_durable
            } else {
                latest.get(&lba).copied().flatten()
            };
            if !ok_durable {
                let l = latest.get(&lba).copied().flatten();
                let ok_latest = match l {
                    Some(sd) => buf == block(sd),
                    None => buf.iter().all(|b| *b == 0),
                };
                assert!(
                    ok_latest,
                    "round {round}: LBA {lba} holds neither the flushed nor the last write"
                );
            }
            durable.insert(lba, now);
            latest.insert(lba, now);
        }
        dirty_since_flush.clear();
        for op in 0..400 {
            if op == 200 && round % 4 == 3 {
                // Grow mid-round: it checkpoints first, so everything so far is durable;
                // the new LBAs read as zeroes (the model's default).
                blocks += 4096;
                s.resize_volume("v", blocks * 4096).unwrap();
                assert_eq!(v.block_count(), blocks);
                for l in dirty_since_flush.drain() {
                    durable.insert(l, latest[&l]);
                }
            }
            let lba = rng.u64(0..blocks);
            let n = rng.u64(1..=16).min(blocks - lba);
            match rng.u8(0..10) {
                0..=5 => {
                    let seeds: Vec<u64> = (0..n).map(|_| rng.u64(1..200)).collect();
                    let data: Vec<u8> = seeds.iter().flat_map(|sd| block(*sd)).collect();
                    s.write_blocks(&v, Lba(lba), &data).unwrap();
                    for (i, sd) in seeds.iter().enumerate() {
                        latest.insert(lba + i as u64, Some(*sd));
                        dirty_since_flush.insert(lba + i as u64);
                    }
                }
                6 => {
                    let provision = rng.bool();
                    s.write_zeroes(&v, Lba(lba), n, provision).unwrap();
                    for i in 0..n {
                        latest.insert(lba + i, None);
                        dirty_since_flush.insert(lba + i);
                    }
                }
                7 | 8 => {
                    s.flush().unwrap();
                    for l in dirty_since_flush.drain() {
                        durable.insert(l, latest[&l]);
                    }
                }
                _ => {
                    if op % 3 == 0 {
                        s.checkpoint().unwrap();
                        for l in dirty_since_flush.drain() {
                            durable.insert(l, latest[&l]);
                        }
                    }
                }
            }
        }
        let st = s.block_stats();
        // Distinct contents are at most 200 + the provisioned zero block.
        assert!(
            st.blocks <= 201,
            "round {round}: block count {} suggests a reference leak",
            st.blocks
        );
        // Crash: drop without flushing.
    }
}

#[test]
fn overwrites_do_not_grow_the_store() {
    // Ten overwrites of the same 32 MiB with no client FLUSH: the store holds the live
    // set plus at most PENDING_FREE_MAX slots awaiting a durable unmap, not 10x (the
    // node also flushes in the background at the soft limit; this test has no node).
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(
        dir.path(),
        StoreOptions {
            journal_bytes: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let live: u64 = 32 << 20;
    let v = s.create_volume("v", live).unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    let mut data = vec![0u8; 1 << 20];
    for _ in 0..10 {
        for i in 0..live / (1 << 20) {
            rng.fill(&mut data);
            s.write_blocks(&v, Lba(i * 256), &data).unwrap();
        }
    }
    s.flush().unwrap();
    assert_eq!(s.block_stats().blocks, live / 4096);
    let len = std::fs::metadata(dir.path().join("blocks.dat"))
        .unwrap()
        .len();
    let (_, hard) = s.block_stats_limits();
    let bound = live + (hard as u64 + 256) * 4096;
    assert!(
        len <= bound,
        "blocks.dat is {len} bytes after 10 overwrites of {live}; bound {bound}"
    );
}

#[test]
fn corrupt_block_is_an_error_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let v = s.create_volume("v", 1 << 20).unwrap();
    let data = block(3);
    s.write_blocks(&v, Lba(5), &data).unwrap();
    s.flush().unwrap();
    let loc = s.locate(&v, Lba(5));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&loc.block_file)
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xEE; 3], loc.block_offset.unwrap() + 10)
        .unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    assert!(s.read_blocks(&v, Lba(5), &mut buf).is_err());
    s.read_blocks(&v, Lba(6), &mut buf).unwrap();
}

/// A store with an 8 MiB journal in `dir`, opened (or reopened after a crash).
fn small_store(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        StoreOptions {
            journal_bytes: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A block no copy holds any more (`Volume::mark_lost`): its slots answer an error,
/// are listed unrecoverable, survive a checkpoint and a reopen, and a write maps them
/// again; the page's other slots read as before.
#[test]
fn a_lost_block_is_listed_unrecoverable_until_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = small_store(dir.path());
    let v = s.create_volume("v", 1 << 20).unwrap();
    let lost = block(7);
    // Lba 5 and 9 hold the same content (one stored block); lba 6 another.
    s.write_blocks(&v, Lba(5), &lost).unwrap();
    s.write_blocks(&v, Lba(6), &block(8)).unwrap();
    s.write_blocks(&v, Lba(9), &lost).unwrap();
    s.flush().unwrap();
    let id = v.id_at(Lba(5)).unwrap();
    let root = v.root();
    // Only the slots of the range given that map the id.
    assert_eq!(v.mark_lost(Lba(4), 3, id).unwrap(), vec![5]);
    assert_eq!(v.mark_lost(Lba(4), 3, id).unwrap(), Vec::<u64>::new());
    assert_ne!(
        v.root(),
        root,
        "the page's checksum is bound to its unknown slot"
    );
    let mut buf = vec![0u8; BLOCK_SIZE];
    assert!(s.read_blocks(&v, Lba(5), &mut buf).is_err());
    s.read_blocks(&v, Lba(9), &mut buf).unwrap();
    assert_eq!(buf, lost);
    assert_eq!(v.damaged_ranges(), vec![(5, 1)]);
    s.checkpoint().unwrap();
    let damaged_root = v.root();
    drop(v);
    drop(s);
    let s = small_store(dir.path());
    let v = s.volume("v").unwrap();
    assert_eq!(
        v.damaged_ranges(),
        vec![(5, 1)],
        "the damage survives a reopen"
    );
    assert_eq!(v.root(), damaged_root);
    assert!(s.read_blocks(&v, Lba(5), &mut buf).is_err());
    s.read_blocks(&v, Lba(6), &mut buf).unwrap();
    assert_eq!(buf, block(8));
    // A write maps the slot again: the page is whole.
    s.write_blocks(&v, Lba(5), &block(9)).unwrap();
    assert!(v.damaged_ranges().is_empty());
    s.read_blocks(&v, Lba(5), &mut buf).unwrap();
    assert_eq!(buf, block(9));
}

/// A resync takes a damaged page on from its primary: it names the unknown slots on
/// disk (`persist_damage_ahead`), unmaps them (a journaled mapping to no block), then
/// marks them unknown (`adopt_damage`). A crash before the next checkpoint replays
/// that unmapping: the slots must stay unknown (an error on read), never zeroes.
#[test]
fn a_crash_after_taking_damage_on_never_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let s = small_store(dir.path());
    let v = s.create_volume("v", 1 << 20).unwrap();
    s.write_blocks(&v, Lba(5), &block(1)).unwrap();
    s.write_blocks(&v, Lba(6), &block(2)).unwrap();
    s.flush().unwrap();
    s.checkpoint().unwrap();
    let mut unknown = [0u64; lazarus_types::FANOUT / 64];
    unknown[0] |= 1 << 5;
    v.persist_damage_ahead(0, unknown).unwrap();
    let zero = lazarus_types::BlockId::ZERO;
    assert_eq!(
        s.write_ids(&v, Lba(5), &[zero], &HashMap::new()).unwrap(),
        None
    );
    let checksum = v.page_checksum(0).unwrap();
    v.adopt_damage(0, unknown, checksum, None).unwrap();
    s.flush().unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    assert!(s.read_blocks(&v, Lba(5), &mut buf).is_err());
    // Crash: no checkpoint since the unmapping.
    drop(v);
    drop(s);
    let s = small_store(dir.path());
    let v = s.volume("v").unwrap();
    assert!(
        s.read_blocks(&v, Lba(5), &mut buf).is_err(),
        "an unknown slot read as {:?}",
        &buf[..16]
    );
    assert_eq!(v.damaged_ranges(), vec![(5, 1)]);
    s.read_blocks(&v, Lba(6), &mut buf).unwrap();
    assert_eq!(buf, block(2));
}
