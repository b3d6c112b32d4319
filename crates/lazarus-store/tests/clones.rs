//! Guards clones that share their snapshot's pages (docs/format.md, "Clones share
//! their snapshot's pages"): a clone reads its snapshot until it writes, then its own
//! writes; the snapshot's volume changes independently; deleting the snapshot or its
//! volume leaves the clone whole (it makes the pages its own first); clones of clones
//! work the same; all of it survives crashes (drop without a flush) at any point, and
//! the reference counts a running store keeps agree with a restart's.

use lazarus_store::{Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE};
use std::collections::{BTreeMap, HashMap, HashSet};

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

const BLOCKS: u64 = 1024 + 40; // 5 slice pages, the last partial

/// What the test knows of one volume.
#[derive(Clone, Default)]
struct Model {
    /// Values as of the last durability point.
    durable: HashMap<u64, u64>,
    /// Values written since, in order: after a crash an LBA holds its durable value
    /// or one of these.
    since: HashMap<u64, Vec<u64>>,
    snaps: BTreeMap<String, HashMap<u64, u64>>,
}

impl Model {
    fn latest(&self) -> HashMap<u64, u64> {
        let mut m = self.durable.clone();
        for (l, v) in &self.since {
            m.insert(*l, *v.last().unwrap());
        }
        m
    }

    fn settle(&mut self) {
        self.durable = self.latest();
        self.since.clear();
    }
}

/// One of `snaps`' names, at random.
fn pick(rng: &mut fastrand::Rng, snaps: &BTreeMap<String, HashMap<u64, u64>>) -> String {
    snaps.keys().nth(rng.usize(0..snaps.len())).unwrap().clone()
}

fn read(s: &Store, name: &str, snap: Option<&str>, lba: u64) -> Vec<u8> {
    let v = s.volume(name).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    match snap {
        Some(n) => s.read_snapshot(&v, &v.snapshot(n).unwrap(), Lba(lba), &mut buf),
        None => s.read_blocks(&v, Lba(lba), &mut buf),
    }
    .unwrap_or_else(|e| panic!("{name}@{snap:?} lba {lba}: {e}"));
    buf
}

#[test]
fn clones_survive_random_operations_and_crashes() {
    let seed = std::env::var("LAZARUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc10e_u64);
    println!("LAZARUS_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        s.create_volume("v", BLOCKS * 4096).unwrap();
    }
    let mut vols: BTreeMap<String, Model> = BTreeMap::new();
    vols.insert("v".into(), Model::default());
    let mut next = 0;
    let (mut clones, mut flattened, mut shared_seen) = (0, 0, 0u64);
    for round in 0..12 {
        let s = Store::open(dir.path(), opts()).unwrap();
        let ctx = format!("round {round} (seed {seed})");
        assert_eq!(s.recovery.missing_blocks, 0, "{ctx}");
        assert!(
            s.recovery.damaged_pages.is_empty(),
            "{ctx}: {:?}",
            s.recovery
        );
        assert!(
            s.recovery.failed_volumes.is_empty(),
            "{ctx}: {:?}",
            s.recovery
        );
        let mut names: Vec<String> = s.volumes().iter().map(|v| v.meta.name.clone()).collect();
        names.sort();
        assert_eq!(names, vols.keys().cloned().collect::<Vec<_>>(), "{ctx}");
        for (name, m) in vols.iter_mut() {
            for (sn, want) in &m.snaps {
                for lba in 0..BLOCKS {
                    let w = want.get(&lba).copied().unwrap_or(0);
                    assert!(
                        read(&s, name, Some(sn), lba) == block(w),
                        "{ctx}: {name}@{sn} LBA {lba} is not {w}"
                    );
                }
            }
            for lba in 0..BLOCKS {
                let got = read(&s, name, None, lba);
                let d = m.durable.get(&lba).copied().unwrap_or(0);
                let now = if got == block(d) {
                    d
                } else {
                    let cands = m.since.get(&lba).cloned().unwrap_or_default();
                    *cands.iter().find(|c| got == block(**c)).unwrap_or_else(|| {
                        panic!("{ctx}: {name} LBA {lba} lost {d} and holds none of {cands:?}")
                    })
                };
                m.durable.insert(lba, now);
            }
            m.since.clear();
        }
        for _ in 0..150 {
            let names: Vec<String> = vols.keys().cloned().collect();
            let name = names[rng.usize(0..names.len())].clone();
            let lba = rng.u64(0..BLOCKS);
            let n = rng.u64(1..=40).min(BLOCKS - lba);
            match rng.u8(0..24) {
                0..=9 => {
                    let vals: Vec<u64> = (0..n).map(|_| rng.u64(1..300)).collect();
                    let data: Vec<u8> = vals.iter().flat_map(|x| block(*x)).collect();
                    s.write_blocks(&s.volume(&name).unwrap(), Lba(lba), &data)
                        .unwrap();
                    let m = vols.get_mut(&name).unwrap();
                    for (i, x) in vals.iter().enumerate() {
                        m.since.entry(lba + i as u64).or_default().push(*x);
                    }
                }
                10 => {
                    s.write_zeroes(&s.volume(&name).unwrap(), Lba(lba), n, rng.bool())
                        .unwrap();
                    let m = vols.get_mut(&name).unwrap();
                    for i in 0..n {
                        m.since.entry(lba + i).or_default().push(0);
                    }
                }
                11 | 12 => {
                    if rng.bool() {
                        s.flush().unwrap();
                    } else {
                        s.checkpoint().unwrap();
                    }
                    vols.values_mut().for_each(Model::settle);
                }
                13 | 14 if vols[&name].snaps.len() < 3 => {
                    next += 1;
                    let sn = format!("s{next}");
                    s.create_snapshot(&name, &sn, next).unwrap();
                    vols.values_mut().for_each(Model::settle);
                    let m = vols.get_mut(&name).unwrap();
                    let at = m.durable.clone();
                    m.snaps.insert(sn, at);
                }
                15 if !vols[&name].snaps.is_empty() => {
                    // Deleting a snapshot makes its clones' shared pages their own.
                    let m = vols.get_mut(&name).unwrap();
                    let sn = pick(&mut rng, &m.snaps);
                    m.snaps.remove(&sn);
                    let before: u64 = s.volumes().iter().map(|v| v.based_pages()).sum();
                    s.delete_snapshot(&name, &sn).unwrap();
                    let after: u64 = s.volumes().iter().map(|v| v.based_pages()).sum();
                    if after < before {
                        flattened += 1;
                    }
                    vols.values_mut().for_each(Model::settle);
                }
                16..=18 if !vols[&name].snaps.is_empty() && vols.len() < 6 => {
                    let m = &vols[&name];
                    let sn = pick(&mut rng, &m.snaps);
                    let at = m.snaps[&sn].clone();
                    next += 1;
                    let c = format!("c{next}");
                    s.create_volume(&c, BLOCKS * 4096).unwrap();
                    let r = s.reset_to_snapshot(&c, &name, &sn, 0).unwrap();
                    let cv = s.volume(&c).unwrap();
                    let src = s.volume(&name).unwrap();
                    assert_eq!(r.root, src.snapshot(&sn).unwrap().root.to_hex(), "{ctx}");
                    let written = at.iter().filter(|(_, v)| **v != 0).map(|(l, _)| l / 256);
                    let written: HashSet<u64> = written.collect();
                    let mapped = src.snapshot(&sn).unwrap().mapped_pages();
                    // (A page of provisioned zeroes is mapped, to the zero block.)
                    assert!(mapped >= written.len() as u64, "{ctx}");
                    assert_eq!(
                        cv.based_pages(),
                        mapped,
                        "{ctx}: a clone shares every page of its snapshot"
                    );
                    shared_seen += cv.based_pages();
                    clones += 1;
                    vols.values_mut().for_each(Model::settle);
                    vols.insert(
                        c,
                        Model {
                            durable: at,
                            ..Default::default()
                        },
                    );
                }
                19 if !vols[&name].snaps.is_empty() && rng.bool() => {
                    let m = vols.get_mut(&name).unwrap();
                    let sn = pick(&mut rng, &m.snaps);
                    s.reset_to_snapshot(&name, &name, &sn, 0).unwrap();
                    let at = m.snaps[&sn].clone();
                    vols.values_mut().for_each(Model::settle);
                    vols.get_mut(&name).unwrap().durable = at;
                }
                20 if vols.len() > 2 && rng.bool() => {
                    // Deleting a volume: clones of its snapshots keep their pages.
                    s.delete_volume(&name).unwrap();
                    vols.remove(&name);
                    vols.values_mut().for_each(Model::settle);
                    if vols.is_empty() {
                        s.create_volume("v", BLOCKS * 4096).unwrap();
                        vols.insert("v".into(), Model::default());
                    }
                }
                21 => {
                    // A scrub of the slice file: shared pages are not on this disk.
                    let v = s.volume(&name).unwrap();
                    for p in 0..v.page_count() {
                        assert!(!v.scrub_slice_page(p).unwrap(), "{ctx}: {name} page {p}");
                    }
                }
                _ => {
                    let m = &vols[&name];
                    let latest = m.latest();
                    for lba in 0..BLOCKS {
                        let w = latest.get(&lba).copied().unwrap_or(0);
                        assert!(
                            read(&s, &name, None, lba) == block(w),
                            "{ctx}: {name} LBA {lba} is not {w} while running"
                        );
                    }
                }
            }
        }
        if round % 3 == 2 {
            s.checkpoint().unwrap();
            vols.values_mut().for_each(Model::settle);
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
    println!("clones: {clones}, pages shared at cloning: {shared_seen}, deletions that flattened: {flattened}");
    assert!(clones > 3 && flattened > 0, "the run exercised clones");
    // Deleting every snapshot leaves exactly what the volumes map.
    let s = Store::open(dir.path(), opts()).unwrap();
    for (name, m) in &vols {
        for sn in m.snaps.keys() {
            s.delete_snapshot(name, sn).unwrap();
        }
    }
    s.checkpoint().unwrap();
    let mut mapped = HashSet::new();
    for v in s.volumes() {
        assert_eq!(v.based_pages(), 0, "no snapshot left to share pages with");
        mapped.extend(v.all_ids().unwrap());
    }
    assert_eq!(s.block_stats().blocks, mapped.len() as u64);
}

/// A slot of a shared page marked lost (no copy anywhere has its block), then a crash
/// before the checkpoint that writes the page to the clone: after the restart only
/// that slot is unknown, the page's others read right.
#[test]
fn a_slot_lost_in_a_shared_page_is_the_only_one_unknown_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let want: HashMap<u64, u64> = (0..BLOCKS).map(|l| (l, l + 1)).collect();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", BLOCKS * 4096).unwrap();
        let data: Vec<u8> = (0..BLOCKS).flat_map(|l| block(l + 1)).collect();
        s.write_blocks(&v, Lba(0), &data).unwrap();
        s.create_snapshot("v", "s", 1).unwrap();
        s.create_volume("c", BLOCKS * 4096).unwrap();
        s.reset_to_snapshot("c", "v", "s", 0).unwrap();
        let c = s.volume("c").unwrap();
        let id = c.id_at(Lba(300)).unwrap();
        assert_eq!(c.mark_lost(Lba(300), 1, id).unwrap(), vec![300]);
        // Crash: no checkpoint wrote page 1 to the clone.
    }
    for round in 0..2 {
        let s = Store::open(dir.path(), opts()).unwrap();
        assert!(s.recovery.damaged_pages.is_empty(), "{:?}", s.recovery);
        let c = s.volume("c").unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for lba in 0..BLOCKS {
            let r = s.read_blocks(&c, Lba(lba), &mut buf);
            if lba == 300 {
                assert!(r.is_err(), "round {round}: the lost slot reads as an error");
            } else {
                r.unwrap_or_else(|e| panic!("round {round}: lba {lba}: {e}"));
                assert!(buf == block(want[&lba]), "round {round}: lba {lba}");
            }
        }
        assert_eq!(
            c.based_pages(),
            4,
            "round {round}: the other pages still shared"
        );
        s.checkpoint().unwrap();
    }
}

/// A clone made as a node alone makes one (`create_clone_volume`) is marked unfilled
/// until its reset ends: a crash before the reset leaves it marked, and the next open
/// removes it (gone, never there empty), its name free again; one whose reset ended
/// is an ordinary volume at every later open.
#[test]
fn a_clone_made_alone_and_cut_before_its_fill_is_removed_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", BLOCKS * 4096).unwrap();
        let data: Vec<u8> = (0..BLOCKS).flat_map(|l| block(l + 1)).collect();
        s.write_blocks(&v, Lba(0), &data).unwrap();
        s.create_snapshot("v", "s", 1).unwrap();
        let c = s.create_clone_volume("c", BLOCKS * 4096, "v@s").unwrap();
        assert!(c.is_unfilled());
        assert_eq!(c.unfilled_from().as_deref(), Some("v@s"));
        // Crash: the reset never started.
    }
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        assert!(s.volume("c").is_none(), "the unfilled clone is still there");
        assert!(s.recovery.failed_volumes.is_empty(), "{:?}", s.recovery);
        let c = s.create_clone_volume("c", BLOCKS * 4096, "v@s").unwrap();
        s.reset_to_snapshot("c", "v", "s", 0).unwrap();
        assert!(!c.is_unfilled() && c.unfilled_from().is_none());
        // Crash right after the reset returned.
    }
    for round in 0..2 {
        let s = Store::open(dir.path(), opts()).unwrap();
        let c = s.volume("c").expect("the clone filled is kept");
        assert!(!c.is_unfilled(), "round {round}");
        for lba in [0, 300, BLOCKS - 1] {
            assert!(
                read(&s, "c", None, lba) == block(lba + 1),
                "round {round}: lba {lba}"
            );
        }
    }
}

/// A clone whose origin cannot be loaded at a start (both of the origin's checksum
/// headers unreadable): the clone's shared pages are unknown, their reads errors,
/// never data, and no block is freed meanwhile (the origin's references went
/// uncounted). Once the origin loads again, the next start reads them from the
/// snapshot again.
#[test]
fn a_clone_whose_origin_does_not_load_reads_again_once_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", BLOCKS * 4096).unwrap();
        let data: Vec<u8> = (0..BLOCKS).flat_map(|l| block(l + 1)).collect();
        s.write_blocks(&v, Lba(0), &data).unwrap();
        s.create_snapshot("v", "s", 1).unwrap();
        s.write_blocks(&v, Lba(600), &block(9999)).unwrap();
        s.create_volume("c", BLOCKS * 4096).unwrap();
        s.reset_to_snapshot("c", "v", "s", 0).unwrap();
        s.write_blocks(&s.volume("c").unwrap(), Lba(5), &block(7777))
            .unwrap();
        s.checkpoint().unwrap();
        s.block_stats().blocks
    };
    let path = dir.path().join("volumes/v/checksum.dat");
    let whole = std::fs::read(&path).unwrap();
    let mut bad = whole.clone();
    bad[..8192].fill(0xee);
    std::fs::write(&path, &bad).unwrap();
    for round in 0..2 {
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(s.recovery.failed_volumes, vec!["v".to_string()]);
        assert_eq!(
            s.block_stats().blocks,
            blocks,
            "round {round}: nothing freed"
        );
        let c = s.volume("c").unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert!(s.read_blocks(&c, Lba(600), &mut buf).is_err());
        assert!(s.read_blocks(&c, Lba(300), &mut buf).is_err());
        // Its own page (written since the clone) reads.
        s.read_blocks(&c, Lba(5), &mut buf).unwrap();
        assert!(buf == block(7777));
        s.checkpoint().unwrap();
    }
    std::fs::write(&path, &whole).unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    assert!(s.recovery.damaged_pages.is_empty(), "{:?}", s.recovery);
    assert!(s.recovery.failed_volumes.is_empty(), "{:?}", s.recovery);
    assert_eq!(s.block_stats().blocks, blocks);
    let c = s.volume("c").unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for lba in 0..BLOCKS {
        s.read_blocks(&c, Lba(lba), &mut buf)
            .unwrap_or_else(|e| panic!("lba {lba}: {e}"));
        let w = if lba == 5 { 7777 } else { lba + 1 };
        assert!(buf == block(w), "lba {lba}");
    }
    assert!(c.damaged_pages().is_empty());
    assert_eq!(c.based_pages(), 4, "pages 1-4 shared again; page 0 written");
}

/// A volume that cannot be loaded at a start after a crash while the journal holds
/// changes of it (flushed, not checkpointed): the store does not open, rather than
/// drop them at the checkpoint that ends the open; once the volume's files read again,
/// it opens with every change. With the volume's directory moved away, it opens
/// without it.
#[test]
fn a_volume_that_does_not_load_with_changes_in_the_journal_stops_the_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.create_volume("v", BLOCKS * 4096).unwrap();
        let w = s.create_volume("w", BLOCKS * 4096).unwrap();
        s.write_blocks(&v, Lba(0), &block(1)).unwrap();
        s.write_blocks(&w, Lba(0), &block(2)).unwrap();
        s.checkpoint().unwrap();
        // Flushed, not checkpointed: in the journal only. Then a crash (no clean stop).
        s.write_blocks(&v, Lba(7), &block(3)).unwrap();
        s.flush().unwrap();
        std::mem::forget(s);
    }
    let path = dir.path().join("volumes/v/checksum.dat");
    let whole = std::fs::read(&path).unwrap();
    let mut bad = whole.clone();
    bad[..8192].fill(0xee);
    std::fs::write(&path, &bad).unwrap();
    let Err(e) = Store::open(dir.path(), opts()) else {
        panic!("opened without v's changes")
    };
    assert!(e.to_string().contains("journal"), "{e}");
    // Its files read again: everything is there.
    std::fs::write(&path, &whole).unwrap();
    {
        let s = Store::open(dir.path(), opts()).unwrap();
        let v = s.volume("v").unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE];
        s.read_blocks(&v, Lba(7), &mut buf).unwrap();
        assert!(buf == block(3), "the journaled change is lost");
        s.write_blocks(&v, Lba(8), &block(4)).unwrap();
        s.flush().unwrap();
        std::mem::forget(s);
    }
    // Moved away (the operator gives it up): the store opens, the other volume whole.
    std::fs::write(&path, &bad).unwrap();
    std::fs::rename(dir.path().join("volumes/v"), dir.path().join("v.moved")).unwrap();
    let s = Store::open(dir.path(), opts()).unwrap();
    let w = s.volume("w").unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    s.read_blocks(&w, Lba(0), &mut buf).unwrap();
    assert!(buf == block(2));
}
