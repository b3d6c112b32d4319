//! Guards snapshots in the store: a snapshot reads what the volume held when it was
//! taken, whatever the volume does after; it survives crashes (drop without a flush)
//! at any point; deleting it frees what only it referenced; the reference counts a
//! running store keeps agree with the ones a restart recounts.

use lazarus_store::{Allocation, Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE};
use std::collections::{BTreeMap, HashMap};

fn block(seed: u64) -> Vec<u8> {
    if seed == 0 {
        return vec![0u8; BLOCK_SIZE];
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut b = vec![0u8; BLOCK_SIZE];
    rng.fill(&mut b[..128]);
    b[128..].fill((seed % 251) as u8);
    b
}

fn opts() -> StoreOptions {
    StoreOptions {
        journal_bytes: 8 << 20,
        ..Default::default()
    }
}

/// Reads every block of snapshot `name` (or the volume) and compares with `want`.
fn check(s: &Store, name: Option<&str>, blocks: u64, want: &HashMap<u64, u64>, ctx: &str) {
    let v = s.volume("v").unwrap();
    let snap = name.map(|n| {
        v.snapshot(n)
            .unwrap_or_else(|| panic!("{ctx}: snapshot {n} missing"))
    });
    let mut buf = vec![0u8; 16 * BLOCK_SIZE];
    let mut lba = 0;
    while lba < blocks {
        let n = 16.min(blocks - lba);
        let b = &mut buf[..(n as usize) * BLOCK_SIZE];
        match &snap {
            Some(sn) => s.read_snapshot(&v, sn, Lba(lba), b),
            None => s.read_blocks(&v, Lba(lba), b),
        }
        .unwrap_or_else(|e| panic!("{ctx}: {name:?} lba {lba}: {e}"));
        for i in 0..n {
            let l = lba + i;
            let got = &b[(i as usize) * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE];
            let w = want.get(&l).copied().unwrap_or(0);
            assert!(
                got == block(w).as_slice(),
                "{ctx}: {name:?} LBA {l} does not hold value {w}"
            );
        }
        lba += n;
    }
}

#[test]
fn a_snapshot_keeps_what_the_volume_held_and_frees_it_when_deleted() {
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 4096; // 16 pages
    let mut now: HashMap<u64, u64> = HashMap::new();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", BLOCKS * 4096).unwrap();
        // Pages 0..3 written, page 5 partly, the rest holes.
        for lba in 0..1024 {
            s.write_blocks(&v, Lba(lba), &block(lba + 1)).unwrap();
            now.insert(lba, lba + 1);
        }
        s.write_blocks(&v, Lba(5 * 256 + 7), &block(9999)).unwrap();
        now.insert(5 * 256 + 7, 9999);
        let before = s.block_stats().blocks;
        let snap = s.create_snapshot("v", "monday", 7).unwrap();
        assert_eq!(snap.mapped_pages(), 5);
        assert!(
            s.create_snapshot("v", "monday", 7).is_err(),
            "names are unique"
        );
        assert!(
            s.create_snapshot("v", "a/b", 7).is_err(),
            "names are checked"
        );
        assert!(s.create_snapshot("nope", "x", 7).is_err());
        // Taking it stored nothing.
        assert_eq!(s.block_stats().blocks, before);
        let at_snap = now.clone();
        // Overwrite half of page 0, trim page 1, write into a hole page.
        for lba in 0..128 {
            s.write_blocks(&v, Lba(lba), &block(50_000 + lba)).unwrap();
            now.insert(lba, 50_000 + lba);
        }
        s.write_zeroes(&v, Lba(256), 256, false).unwrap();
        for lba in 256..512 {
            now.remove(&lba);
        }
        s.write_blocks(&v, Lba(10 * 256), &block(77)).unwrap();
        now.insert(10 * 256, 77);
        check(&s, Some("monday"), BLOCKS, &at_snap, "live");
        check(&s, None, BLOCKS, &now, "live");
        // The snapshot's map: page 1 still data there, a hole in the volume.
        let sn = v.snapshot("monday").unwrap();
        let m = s.snapshot_allocation(&v, &sn, 256, 256, 16);
        assert_eq!(m, vec![(256, Allocation::Data)]);
        let m = s.snapshot_allocation(&v, &sn, 10 * 256, 256, 16);
        assert_eq!(m, vec![(256, Allocation::Hole)]);
        assert_eq!(v.allocation(256, 256, 16), vec![(256, Allocation::Hole)]);
        // Crash: no flush, no checkpoint.
    }
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(s.recovery.missing_blocks, 0);
        assert!(s.recovery.damaged_pages.is_empty());
        let v = s.volume("v").unwrap();
        assert_eq!(v.snapshots().len(), 1);
        // Unflushed writes may be gone from the volume, never from the snapshot.
        let mut at_snap: HashMap<u64, u64> = (0..1024).map(|l| (l, l + 1)).collect();
        at_snap.insert(5 * 256 + 7, 9999);
        check(&s, Some("monday"), BLOCKS, &at_snap, "after crash");
        s.write_blocks(&v, Lba(3), &block(123)).unwrap();
        s.flush().unwrap();
        let with_snap = s.block_stats().blocks;
        s.delete_snapshot("v", "monday").unwrap();
        assert!(s.delete_snapshot("v", "monday").is_err());
        assert!(v.snapshots().is_empty());
        s.flush().unwrap();
        let without = s.block_stats().blocks;
        assert!(
            without < with_snap,
            "deleting the snapshot freed nothing ({with_snap} -> {without})"
        );
        // What is left is exactly what the volume maps.
        let mapped: std::collections::HashSet<_> = v.all_ids().unwrap().into_iter().collect();
        assert_eq!(without, mapped.len() as u64);
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.volume("v").unwrap().snapshots().is_empty());
}

/// Random writes, trims, snapshots, deletions, flushes and checkpoints, with a crash
/// (drop without flush) after each round: every snapshot reads exactly what the
/// volume held when it was taken, and the block count a running store keeps equals
/// the one a restart recounts.
#[test]
fn snapshots_survive_random_operations_and_crashes() {
    let seed = std::env::var("LAZARUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5a95_u64);
    println!("LAZARUS_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 2048; // 8 pages
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        s.create_volume("v", BLOCKS * 4096).unwrap();
    }
    // The volume's values as last flushed / as last written; each snapshot's.
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut latest: HashMap<u64, u64> = HashMap::new();
    let mut snaps: BTreeMap<String, HashMap<u64, u64>> = BTreeMap::new();
    let mut next = 0;
    for round in 0..10 {
        let s = Store::open(dir.path(), opts()).unwrap();
        let ctx = format!("round {round} (seed {seed})");
        assert_eq!(s.recovery.missing_blocks, 0, "{ctx}");
        assert!(s.recovery.damaged_pages.is_empty(), "{ctx}");
        let v = s.volume("v").unwrap();
        let mut names: Vec<String> = v.snapshots().iter().map(|x| x.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            snaps.keys().cloned().collect::<Vec<_>>(),
            "{ctx}: snapshots"
        );
        for (n, want) in &snaps {
            check(&s, Some(n), BLOCKS, want, &ctx);
        }
        // The volume: flushed values hold unless rewritten since (then either).
        let mut buf = vec![0u8; BLOCK_SIZE];
        for lba in 0..BLOCKS {
            s.read_blocks(&v, Lba(lba), &mut buf).unwrap();
            let d = durable.get(&lba).copied().unwrap_or(0);
            let l = latest.get(&lba).copied().unwrap_or(0);
            let now = if buf == block(d) {
                d
            } else {
                assert!(buf == block(l), "{ctx}: LBA {lba} lost");
                l
            };
            durable.insert(lba, now);
            latest.insert(lba, now);
        }
        for op in 0..300 {
            let lba = rng.u64(0..BLOCKS);
            let n = rng.u64(1..=24).min(BLOCKS - lba);
            match rng.u8(0..20) {
                0..=10 => {
                    let vals: Vec<u64> = (0..n).map(|_| rng.u64(1..300)).collect();
                    let data: Vec<u8> = vals.iter().flat_map(|x| block(*x)).collect();
                    s.write_blocks(&v, Lba(lba), &data).unwrap();
                    for (i, x) in vals.iter().enumerate() {
                        latest.insert(lba + i as u64, *x);
                    }
                }
                11 => {
                    s.write_zeroes(&v, Lba(lba), n, false).unwrap();
                    for i in 0..n {
                        latest.insert(lba + i, 0);
                    }
                }
                12 | 13 => {
                    s.flush().unwrap();
                    durable = latest.clone();
                }
                14 => {
                    s.checkpoint().unwrap();
                    durable = latest.clone();
                }
                15 | 16 if snaps.len() < 4 => {
                    next += 1;
                    let name = format!("s{next}");
                    s.create_snapshot("v", &name, 7).unwrap();
                    // Taking a snapshot checkpoints: everything before is durable.
                    durable = latest.clone();
                    snaps.insert(name, latest.clone());
                }
                17 if !snaps.is_empty() => {
                    let k = rng.usize(0..snaps.len());
                    let name = snaps.keys().nth(k).unwrap().clone();
                    s.delete_snapshot("v", &name).unwrap();
                    snaps.remove(&name);
                }
                18 if !snaps.is_empty() && rng.u8(0..3) == 0 => {
                    // A revert: durable when it returns.
                    let k = rng.usize(0..snaps.len());
                    let name = snaps.keys().nth(k).unwrap().clone();
                    s.reset_to_snapshot("v", "v", &name, 0).unwrap();
                    latest = snaps[&name].clone();
                    durable = latest.clone();
                }
                _ => {
                    if op % 50 == 0 {
                        for (n, want) in &snaps {
                            check(&s, Some(n), BLOCKS, want, &format!("{ctx} op {op}"));
                        }
                        check(&s, None, BLOCKS, &latest, &format!("{ctx} op {op}"));
                    }
                }
            }
        }
        // The counts kept while running agree with a recount.
        if round % 3 == 2 {
            s.checkpoint().unwrap();
            durable = latest.clone();
            let running = s.block_stats().blocks;
            drop(s);
            let s = Store::open(dir.path(), opts()).unwrap();
            assert_eq!(
                s.block_stats().blocks,
                running,
                "{ctx}: a restart counts another number of blocks than the running store"
            );
        }
        // Crash: drop without flushing.
    }
    // Deleting every snapshot leaves exactly what the volume maps.
    let s = Store::open(dir.path(), opts()).unwrap();
    for n in snaps.keys() {
        s.delete_snapshot("v", n).unwrap();
    }
    s.checkpoint().unwrap();
    let v = s.volume("v").unwrap();
    let mapped: std::collections::HashSet<_> = v.all_ids().unwrap().into_iter().collect();
    assert_eq!(s.block_stats().blocks, mapped.len() as u64);
}

/// Reads every block of volume `name` and compares with `want`.
fn check_volume(s: &Store, name: &str, blocks: u64, want: &HashMap<u64, u64>, ctx: &str) {
    let v = s.volume(name).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for lba in 0..blocks {
        s.read_blocks(&v, Lba(lba), &mut buf)
            .unwrap_or_else(|e| panic!("{ctx}: {name} lba {lba}: {e}"));
        let w = want.get(&lba).copied().unwrap_or(0);
        assert!(
            buf == block(w),
            "{ctx}: {name} LBA {lba} does not hold value {w}"
        );
    }
}

/// A clone (a new volume reset to another's snapshot) and a revert (a volume reset to
/// its own snapshot) map the snapshot's blocks without storing any again; the clone
/// and the volume then change independently; the clone keeps its blocks when the
/// snapshot and its volume are deleted; a restart counts what the running store did.
#[test]
fn clones_and_reverts_share_the_snapshot_blocks() {
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 2048 + 100; // 9 pages, the last partial
    let s = Store::open(dir.path(), opts()).unwrap();
    let v = s.create_volume("v", BLOCKS * 4096).unwrap();
    let mut at_s1: HashMap<u64, u64> = HashMap::new();
    for lba in (0..BLOCKS).step_by(3) {
        s.write_blocks(&v, Lba(lba), &block(lba + 1)).unwrap();
        at_s1.insert(lba, lba + 1);
    }
    s.create_snapshot("v", "s1", 7).unwrap();
    let mut now = at_s1.clone();
    for lba in (0..BLOCKS).step_by(5) {
        s.write_blocks(&v, Lba(lba), &block(10_000 + lba)).unwrap();
        now.insert(lba, 10_000 + lba);
    }
    s.write_zeroes(&v, Lba(300), 700, false).unwrap();
    for lba in 300..1000 {
        now.remove(&lba);
    }
    s.flush().unwrap();
    let stored = s.block_stats().blocks;
    // The clone.
    s.create_volume("c", BLOCKS * 4096).unwrap();
    let r = s.reset_to_snapshot("c", "v", "s1", 0).unwrap();
    assert_eq!(r.changed_blocks, at_s1.len() as u64);
    assert_eq!(r.root, v.snapshot("s1").unwrap().root.to_hex());
    assert_eq!(
        s.block_stats().blocks,
        stored,
        "a clone stores no block again"
    );
    check_volume(&s, "c", BLOCKS, &at_s1, "clone");
    check_volume(&s, "v", BLOCKS, &now, "volume after the clone");
    // Independent from here.
    let c = s.volume("c").unwrap();
    let mut clone_now = at_s1.clone();
    for lba in (1..BLOCKS).step_by(7) {
        s.write_blocks(&c, Lba(lba), &block(20_000 + lba)).unwrap();
        clone_now.insert(lba, 20_000 + lba);
    }
    check_volume(&s, "v", BLOCKS, &now, "volume after writes to the clone");
    // A reset of a volume already equal changes nothing.
    let r = s.reset_to_snapshot("v", "v", "s1", 0).unwrap();
    assert!(r.changed_blocks > 0);
    check_volume(&s, "v", BLOCKS, &at_s1, "reverted");
    let again = s.reset_to_snapshot("v", "v", "s1", 0).unwrap();
    assert_eq!(again.changed_blocks, 0);
    // A volume smaller than the snapshot is refused.
    s.create_volume("small", 4096 * 10).unwrap();
    assert!(s.reset_to_snapshot("small", "v", "s1", 0).is_err());
    s.delete_volume("small").unwrap();
    s.checkpoint().unwrap();
    let running = s.block_stats().blocks;
    drop((s, v, c));
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(
        s.block_stats().blocks,
        running,
        "a restart counts the same blocks"
    );
    check_volume(&s, "v", BLOCKS, &at_s1, "reverted, after a restart");
    check_volume(&s, "c", BLOCKS, &clone_now, "clone, after a restart");
    // The clone outlives the snapshot and its volume.
    s.delete_snapshot("v", "s1").unwrap();
    s.delete_volume("v").unwrap();
    check_volume(&s, "c", BLOCKS, &clone_now, "clone, its origin deleted");
    s.checkpoint().unwrap();
    let c = s.volume("c").unwrap();
    let mapped: std::collections::HashSet<_> = c.all_ids().unwrap().into_iter().collect();
    assert_eq!(s.block_stats().blocks, mapped.len() as u64);
}

/// Reads going on during reverts see the volume wholly as one snapshot or the other,
/// never partly reverted.
#[test]
fn a_read_during_a_revert_sees_it_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 64 * 256; // 64 pages
    let s = std::sync::Arc::new(Store::open(dir.path(), opts()).unwrap());
    let v = s.create_volume("v", BLOCKS * 4096).unwrap();
    let image = |base: u64| -> Vec<u8> { (0..BLOCKS).flat_map(|l| block(base + l)).collect() };
    let (one, two) = (image(1), image(100_000));
    s.write_blocks(&v, Lba(0), &one).unwrap();
    s.create_snapshot("v", "one", 1).unwrap();
    s.write_blocks(&v, Lba(0), &two).unwrap();
    s.create_snapshot("v", "two", 2).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (s, v, done) = (s.clone(), v.clone(), done.clone());
        let (one, two) = (
            lazarus_store::store::block_ids(&one),
            lazarus_store::store::block_ids(&two),
        );
        std::thread::spawn(move || {
            // Windows of 8 pages at random places: each read spans several of the
            // revert's journal records.
            const WINDOW: usize = 8 * 256;
            let mut rng = fastrand::Rng::with_seed(7);
            let mut buf = vec![0u8; WINDOW * BLOCK_SIZE];
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let at = rng.usize(0..(BLOCKS as usize - WINDOW));
                s.read_blocks(&v, Lba(at as u64), &mut buf).unwrap();
                let got = lazarus_store::store::block_ids(&buf);
                assert!(
                    got[..] == one[at..at + WINDOW] || got[..] == two[at..at + WINDOW],
                    "a read at {at} saw the volume partly reverted"
                );
                reads += 1;
            }
            reads
        })
    };
    for i in 0..40 {
        let name = if i % 2 == 0 { "one" } else { "two" };
        let r = s.reset_to_snapshot("v", "v", name, 0).unwrap();
        assert_eq!(r.changed_blocks, BLOCKS);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let reads = reader.join().unwrap();
    assert!(reads > 20, "the reader ran {reads} times only");
}

/// A reset's intent that cannot be finished at open (here: damaged on disk) leaves
/// that volume unserved, with a clear report, and opens the rest of the store.
#[test]
fn a_reset_that_cannot_be_finished_stops_only_its_volume() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        for name in ["v", "w"] {
            let v = s.create_volume(name, 256 * 4096).unwrap();
            s.write_blocks(&v, Lba(3), &block(5)).unwrap();
        }
        s.create_snapshot("v", "s1", 7).unwrap();
    }
    std::fs::write(
        dir.path().join("volumes/v/reset.pending"),
        b"LZRESET1 garbage",
    )
    .unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.recovery.failed_volumes, vec!["v".to_string()]);
    assert!(s.volume("v").is_none());
    let mut want = HashMap::new();
    want.insert(3, 5);
    check_volume(&s, "w", 256, &want, "the other volume");
    drop(s);
    // Once the intent is gone (here: removed by hand), the volume is back.
    std::fs::remove_file(dir.path().join("volumes/v/reset.pending")).unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery.failed_volumes.is_empty());
    check_volume(&s, "v", 256, &want, "the volume");
}

/// A snapshot file damaged on disk is reported and not served; the volume and other
/// snapshots are unaffected. A snapshot page block damaged on disk reads as an error,
/// never as other data.
#[test]
fn damaged_snapshot_files_and_pages_are_errors_not_data() {
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 1024;
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", BLOCKS * 4096).unwrap();
        for lba in 0..BLOCKS {
            s.write_blocks(&v, Lba(lba), &block(lba + 1)).unwrap();
        }
        s.create_snapshot("v", "a", 7).unwrap();
        s.create_snapshot("v", "b", 7).unwrap();
        // Page 0 changes: its old content becomes a page block.
        s.write_blocks(&v, Lba(0), &block(5000)).unwrap();
        s.checkpoint().unwrap();
    }
    let snapdir = dir.path().join("volumes/v/snapshots");
    // Flip a byte of snapshot b's file.
    let bp = snapdir.join("b.snap");
    let mut bytes = std::fs::read(&bp).unwrap();
    let k = bytes.len() / 2;
    bytes[k] ^= 0xff;
    std::fs::write(&bp, &bytes).unwrap();
    // A leftover of a creation that never committed.
    std::fs::write(snapdir.join("c.tmp"), b"partial").unwrap();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.volume("v").unwrap();
        let names: Vec<String> = v.snapshots().iter().map(|x| x.name.clone()).collect();
        assert_eq!(names, vec!["a".to_string()]);
        assert_eq!(v.failed_snapshots().len(), 1);
        assert!(!snapdir.join("c.tmp").exists());
        let want: HashMap<u64, u64> = (0..BLOCKS).map(|l| (l, l + 1)).collect();
        check(&s, Some("a"), BLOCKS, &want, "after damage");
        // Corrupt the page block holding snapshot a's page 0.
        let sn = v.snapshot("a").unwrap();
        let id = lazarus_types::BlockId(sn.l1[0].0);
        let loc = s.blocks_path();
        let off = {
            // The page block is stored: find it through a read of a fresh store.
            let mut found = None;
            let data = std::fs::read(&loc).unwrap();
            for (i, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
                if lazarus_types::BlockId::hash_of(chunk) == id {
                    found = Some(i * BLOCK_SIZE);
                }
            }
            found.expect("page block stored")
        };
        drop(s);
        let f = std::fs::OpenOptions::new().write(true).open(&loc).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0xAB; 16], off as u64 + 100).unwrap();
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    let v = s.volume("v").unwrap();
    let sn = v.snapshot("a").unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    assert!(
        s.read_snapshot(&v, &sn, Lba(3), &mut buf).is_err(),
        "a damaged snapshot page must fail its reads"
    );
    // Its other pages (shared with the volume) still read.
    s.read_snapshot(&v, &sn, Lba(300), &mut buf).unwrap();
    assert!(buf == block(301));
}

/// A page block's slot is not journaled: a slot freed (a snapshot deleted) and reused
/// by another page block before a crash is still indexed under its old content at the
/// restart. A snapshot of another volume naming that content must still read.
#[test]
fn a_reused_page_block_slot_is_not_trusted_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    const BLOCKS: u64 = 512;
    let page0: Vec<u8> = (0..256).flat_map(|l| block(l + 1)).collect();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v1 = s.create_volume("v1", BLOCKS * 4096).unwrap();
        let v2 = s.create_volume("v2", BLOCKS * 4096).unwrap();
        let v3 = s.create_volume("v3", BLOCKS * 4096).unwrap();
        // v1 and v2: the same page 0 content; v3 another.
        s.write_blocks(&v1, Lba(0), &page0).unwrap();
        s.write_blocks(&v2, Lba(0), &page0).unwrap();
        s.write_blocks(&v3, Lba(0), &block(999)).unwrap();
        s.create_snapshot("v1", "s1", 1).unwrap();
        s.create_snapshot("v2", "s2", 2).unwrap();
        s.create_snapshot("v3", "s3", 3).unwrap();
        // v2's first change keeps the page as a page block, indexed by the checkpoint.
        s.write_blocks(&v2, Lba(1), &block(5000)).unwrap();
        s.checkpoint().unwrap();
        // Deleting s2 frees that slot; v3's first change puts its page block there
        // (unjournaled), then v1's first change keeps page 0 again in another slot.
        s.delete_snapshot("v2", "s2").unwrap();
        s.write_blocks(&v3, Lba(1), &block(6000)).unwrap();
        s.write_blocks(&v1, Lba(2), &block(7000)).unwrap();
        s.flush().unwrap();
        // Crash before any checkpoint.
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(s.recovery.missing_blocks, 0);
    for (vol, snap, want) in [("v1", "s1", page0.clone()), ("v3", "s3", block(999))] {
        let v = s.volume(vol).unwrap();
        let sn = v.snapshot(snap).unwrap();
        let mut buf = vec![0u8; want.len()];
        s.read_snapshot(&v, &sn, Lba(0), &mut buf)
            .unwrap_or_else(|e| panic!("{vol}@{snap}: {e}"));
        assert!(buf == want, "{vol}@{snap} reads other data");
    }
    // And once more after the restart's checkpoint overwrote the pages.
    drop(s);
    let s = Store::open(dir.path(), opts()).unwrap();
    let v = s.volume("v1").unwrap();
    let sn = v.snapshot("s1").unwrap();
    let mut buf = vec![0u8; page0.len()];
    s.read_snapshot(&v, &sn, Lba(0), &mut buf).unwrap();
    assert!(buf == page0);
}

/// A page a scrub queued for rewriting (dirty, content unchanged) is still kept for a
/// snapshot when a write changes it before the next checkpoint.
#[test]
fn a_page_dirty_from_a_scrub_is_still_kept_for_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let page0: Vec<u8> = (0..256).flat_map(|l| block(l + 1)).collect();
    let s = Store::open(dir.path(), opts()).unwrap();
    let v = s.create_volume("v", 1024 * 4096).unwrap();
    s.write_blocks(&v, Lba(0), &page0).unwrap();
    s.create_snapshot("v", "a", 1).unwrap();
    // Damage page 0's disk copy; the scrub queues it for a rewrite from memory.
    let (path, off) = v.locate_page(Lba(0));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x5a; 64], off + 100).unwrap();
    }
    assert!(v.scrub_slice_page(0).unwrap());
    s.write_blocks(&v, Lba(3), &block(4242)).unwrap();
    s.checkpoint().unwrap();
    let sn = v.snapshot("a").unwrap();
    let mut buf = vec![0u8; page0.len()];
    s.read_snapshot(&v, &sn, Lba(0), &mut buf).unwrap();
    assert!(buf == page0);
}

/// What the cluster does for a copy that missed a snapshot: the pages it cannot read
/// are staged from the copy that has it (with the blocks they name that it lacks),
/// then the snapshot is installed. Returns the pages staged.
fn transfer(src: &Store, dst: &Store, name: &str) -> usize {
    use lazarus_types::{BlockId, Checksum};
    let sv = src.volume("v").unwrap();
    let snap = sv.snapshot(name).unwrap();
    let mut staged: Vec<Checksum> = Vec::new();
    for _ in 0..3 {
        let set: std::collections::HashSet<Checksum> = staged.iter().copied().collect();
        for p in dst.snapshot_pages_unavailable("v", &snap.l1, &set).unwrap() {
            let c = snap.l1[p as usize];
            if staged.contains(&c) {
                continue;
            }
            let page = dst.page_block(c).unwrap_or_else(|| {
                lazarus_store::volume::encode_page(&src.snapshot_page(&sv, &snap, p).unwrap()[..])
            });
            let mut data: HashMap<BlockId, Vec<u8>> = HashMap::new();
            for id in lazarus_store::volume::decode_page(&page).iter() {
                if !dst.has_block(*id) {
                    let mut b = vec![0u8; BLOCK_SIZE];
                    assert!(src.read_block(*id, &mut b).unwrap());
                    data.insert(*id, b);
                }
            }
            dst.stage_snapshot_page(c, &page, &data).unwrap();
            staged.push(c);
        }
        match dst.install_snapshot("v", &snap, &staged).unwrap() {
            Ok(s) => {
                assert_eq!(s.root, snap.root);
                return staged.len();
            }
            Err(missing) => println!("{} pages changed meanwhile", missing.len()),
        }
    }
    panic!("the snapshot was not installed in three attempts");
}

#[test]
fn a_copy_that_missed_a_snapshot_installs_it_from_another() {
    const BLOCKS: u64 = 2048; // 8 pages
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Store::open(da.path(), opts()).unwrap();
    let mut old: HashMap<u64, u64> = HashMap::new();
    let mut now: HashMap<u64, u64> = HashMap::new();
    let va = a.create_volume("v", BLOCKS * 4096).unwrap();
    for lba in 0..1024 {
        a.write_blocks(&va, Lba(lba), &block(lba + 1)).unwrap();
        old.insert(lba, lba + 1);
    }
    a.create_snapshot("v", "mon", 42).unwrap();
    now.clone_from(&old);
    // After the snapshot: page 1 partly rewritten, page 2 trimmed, page 6 written.
    for lba in 300..340 {
        a.write_blocks(&va, Lba(lba), &block(5000 + lba)).unwrap();
        now.insert(lba, 5000 + lba);
    }
    a.write_zeroes(&va, Lba(512), 256, true).unwrap();
    for lba in 512..768 {
        now.remove(&lba);
    }
    a.write_blocks(&va, Lba(6 * 256 + 3), &block(777)).unwrap();
    now.insert(6 * 256 + 3, 777);
    check(&a, Some("mon"), BLOCKS, &old, "source");

    // The copy that missed it holds the volume as it is now (resynced).
    let b = Store::open(db.path(), opts()).unwrap();
    let vb = b.create_volume("v", BLOCKS * 4096).unwrap();
    for lba in 0..BLOCKS {
        let x = now.get(&lba).copied().unwrap_or(0);
        if x != 0 {
            b.write_blocks(&vb, Lba(lba), &block(x)).unwrap();
        }
    }
    b.flush().unwrap();
    let staged = transfer(&a, &b, "mon");
    // Pages 0 and 3 are the volume's own; 1 and 2 had to come over.
    assert_eq!(staged, 2, "only the pages the copy cannot read are moved");
    check(&b, Some("mon"), BLOCKS, &old, "installed");
    check(&b, None, BLOCKS, &now, "volume after install");
    // The volume changes a page the snapshot shares with it: kept.
    b.write_blocks(&vb, Lba(5), &block(31337)).unwrap();
    now.insert(5, 31337);
    check(
        &b,
        Some("mon"),
        BLOCKS,
        &old,
        "after a write to a shared page",
    );
    b.flush().unwrap();
    let blocks = b.block_stats().blocks;
    drop((vb, b));
    let b = Store::open(db.path(), opts()).unwrap();
    assert_eq!(b.recovery.missing_blocks, 0);
    assert_eq!(
        b.block_stats().blocks,
        blocks,
        "a restart recounts the same"
    );
    check(&b, Some("mon"), BLOCKS, &old, "installed, after a restart");
    check(&b, None, BLOCKS, &now, "volume after a restart");

    // Staged and never installed (a crash in between): nothing is left behind.
    // Page 4 of "tue" names blocks the copy has never seen.
    for lba in 1024..1280 {
        a.write_blocks(&va, Lba(lba), &block(20000 + lba)).unwrap();
    }
    a.create_snapshot("v", "tue", 43).unwrap();
    let vb = b.volume("v").unwrap();
    for lba in 0..256 {
        b.write_blocks(&vb, Lba(lba), &block(9000 + lba)).unwrap();
    }
    b.flush().unwrap();
    b.checkpoint().unwrap();
    let before = b.block_stats().blocks;
    let snap = a.volume("v").unwrap().snapshot("tue").unwrap();
    let c = snap.l1[4];
    let page = lazarus_store::volume::encode_page(&a.snapshot_page(&va, &snap, 4).unwrap()[..]);
    let mut data = HashMap::new();
    for id in lazarus_store::volume::decode_page(&page).iter() {
        let mut buf = vec![0u8; BLOCK_SIZE];
        if !b.has_block(*id) && a.read_block(*id, &mut buf).unwrap() {
            data.insert(*id, buf);
        }
    }
    assert_eq!(data.len(), 256);
    // A page that does not hash to its checksum, or a block not given, is refused.
    assert!(b.stage_snapshot_page(snap.l1[1], &page, &data).is_err());
    assert!(b.stage_snapshot_page(c, &page, &HashMap::new()).is_err());
    assert_eq!(
        b.block_stats().blocks,
        before,
        "a refused page leaves nothing"
    );
    b.stage_snapshot_page(c, &page, &data).unwrap();
    assert!(b.block_stats().blocks > before);
    b.checkpoint().unwrap(); // the staged blocks even reach the index
    drop((vb, b));
    let b = Store::open(db.path(), opts()).unwrap();
    assert_eq!(
        b.block_stats().blocks,
        before,
        "staged blocks are freed at start"
    );
    assert!(b.volume("v").unwrap().snapshot("tue").is_none());
    let vb = b.volume("v").unwrap();
    // Given up (unstaged) at run time: the same.
    b.stage_snapshot_page(c, &page, &data).unwrap();
    b.unstage_snapshot_pages(&[c]);
    b.flush().unwrap();
    b.checkpoint().unwrap();
    assert_eq!(b.block_stats().blocks, before, "unstaged blocks are freed");
    // Deleting the installed snapshot frees what only it held.
    b.delete_snapshot("v", "mon").unwrap();
    b.checkpoint().unwrap();
    let mut ids: Vec<_> = vb.all_ids().unwrap();
    ids.sort();
    ids.dedup();
    assert_eq!(b.block_stats().blocks, ids.len() as u64);
}

/// The bytes only a snapshot holds are what its deletion frees; the volume's own are
/// those no snapshot names; blocks two snapshots share are neither's alone.
#[test]
fn the_space_only_a_snapshot_holds_is_what_its_deletion_frees() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    let v = s.create_volume("v", 2048 * 4096).unwrap();
    let write = |first: u64, n: u64, base: u64| {
        let data: Vec<u8> = (0..n).flat_map(|i| block(base + first + i)).collect();
        s.write_blocks(&v, Lba(first), &data).unwrap();
    };
    write(0, 1024, 1); // pages 0-3
                       // Pages 4 and 5 provisioned with zeroes: two pages of one content.
    s.write_zeroes(&v, Lba(1024), 512, true).unwrap();
    s.create_snapshot("v", "a", 1).unwrap();
    write(256, 256, 10_000); // page 1 rewritten
    s.create_snapshot("v", "b", 2).unwrap();
    write(256, 256, 20_000); // page 1 again
    write(512, 128, 30_000); // half of page 2
                             // Page 4 rewritten: both snapshots keep its content, which page 5 still has.
    write(1024, 256, 40_000);
    s.flush().unwrap();
    let space = s.snapshot_space(&v);
    let page = 4096u64;
    // a: page 1 as first written (256 blocks) and the page block keeping it.
    assert_eq!(space.exclusive["a"], 257 * page, "{space:?}");
    // b: page 1's first rewrite and its page block; page 2 it shares with a.
    assert_eq!(space.exclusive["b"], 257 * page, "{space:?}");
    // The volume: page 1's second rewrite, the new half of page 2, page 4's data.
    assert_eq!(space.volume_exclusive, Some(640 * page), "{space:?}");
    s.checkpoint().unwrap();
    let before = s.block_stats().blocks;
    s.delete_snapshot("v", "a").unwrap();
    s.checkpoint().unwrap();
    assert_eq!(
        before - s.block_stats().blocks,
        space.exclusive["a"] / page,
        "deleting a frees what only it held"
    );
    // b now holds page 2's old half alone too (a no longer shares it), with its page
    // block, and the zero pages' page block (their blocks page 5 still maps).
    let space = s.snapshot_space(&v);
    assert_eq!(
        space.exclusive["b"],
        (257 + 128 + 1 + 1) * page,
        "{space:?}"
    );
    let before = s.block_stats().blocks;
    s.delete_snapshot("v", "b").unwrap();
    s.checkpoint().unwrap();
    assert_eq!(
        before - s.block_stats().blocks,
        space.exclusive["b"] / page,
        "deleting b frees what only it held"
    );
    assert!(s.snapshot_space(&v).volume_exclusive.is_none());
}

/// A volume grown after a snapshot: the snapshot keeps its size and data, the new
/// space is the volume's alone, and both survive a restart.
#[test]
fn a_volume_grown_after_a_snapshot_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut old: HashMap<u64, u64> = HashMap::new();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", 512 * 4096).unwrap();
        for lba in 0..512 {
            s.write_blocks(&v, Lba(lba), &block(lba + 1)).unwrap();
            old.insert(lba, lba + 1);
        }
        s.create_snapshot("v", "small", 3).unwrap();
        let v = s.resize_volume("v", 2048 * 4096).unwrap();
        for lba in 256..1024 {
            s.write_blocks(&v, Lba(lba), &block(7000 + lba)).unwrap();
        }
        let snap = v.snapshot("small").unwrap();
        assert_eq!(snap.size_bytes, 512 * 4096);
        check(&s, Some("small"), 512, &old, "after the grow");
        let space = s.snapshot_space(&v);
        // The snapshot alone: page 1 as it was (256 blocks, and its page block).
        assert_eq!(space.exclusive["small"], 257 * 4096, "{space:?}");
        // The volume alone: page 1 rewritten and pages 2-3 in the new space.
        assert_eq!(space.volume_exclusive, Some(768 * 4096), "{space:?}");
        s.flush().unwrap();
    }
    let s = Store::open(dir.path(), opts()).unwrap();
    check(&s, Some("small"), 512, &old, "after a restart");
    let v = s.volume("v").unwrap();
    let snap = v.snapshot("small").unwrap();
    // What a revert would rewrite: page 1, and the grown space where it is mapped.
    let runs = s.revert_runs(&v, &snap).unwrap();
    let total: u64 = runs.iter().map(|r| r.1).sum();
    assert_eq!(total, 768, "{runs:?}");
}
