//! Guards snapshot creation and deletion against power loss (the simulator of
//! `disk::powerloss`; see powerloss.rs): the power goes off at a random I/O operation,
//! perhaps inside a snapshot's checkpoint or its file's commit. After every crash a
//! snapshot whose creation returned with the power on exists and reads exactly what
//! the volume held when it was taken; one whose creation or deletion the power cut
//! either exists, and then reads exactly that, or does not; no other snapshot appears;
//! no page looks corrupt and no block is missing. A revert (`reset_to_snapshot`) that
//! returned with the power on left the volume reading as the snapshot; one the power
//! cut left it reading either wholly as before or wholly as the snapshot.

use lazarus_store::disk::powerloss;
use lazarus_store::{Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE};
use std::collections::{BTreeMap, HashMap};

fn block(seed: u64) -> Vec<u8> {
    if seed == 0 {
        return vec![0u8; BLOCK_SIZE];
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut b = vec![0u8; BLOCK_SIZE];
    rng.fill(&mut b[..256]);
    b[256..].fill((seed % 251) as u8);
    b
}

/// Installs snapshot `name` holding `values` as a copy that missed it does
/// (`Store::install_snapshot`): every page it cannot read from its own volume is staged
/// with its blocks.
fn install(s: &Store, name: &str, values: &HashMap<u64, u64>, blocks: u64) {
    use lazarus_types::{BlockId, Checksum, FANOUT};
    let pages = blocks / FANOUT as u64;
    let mut l1 = Vec::new();
    type Content = (Vec<u8>, HashMap<BlockId, Vec<u8>>);
    let mut content: HashMap<Checksum, Content> = HashMap::new();
    for p in 0..pages {
        let data: Vec<u8> = (0..FANOUT as u64)
            .flat_map(|i| block(values.get(&(p * FANOUT as u64 + i)).copied().unwrap_or(0)))
            .collect();
        let ids = lazarus_store::store::block_ids(&data);
        let page = lazarus_store::volume::encode_page(&ids);
        let c = Checksum::of_page(&page);
        let by_id = ids
            .iter()
            .zip(data.chunks_exact(BLOCK_SIZE))
            .map(|(id, b)| (*id, b.to_vec()))
            .collect();
        content.insert(c, (page, by_id));
        l1.push(c);
    }
    let root = lazarus_store::volume::tree_root(&l1);
    let mut staged = Vec::new();
    let none = std::collections::HashSet::new();
    for p in s.snapshot_pages_unavailable("v", &l1, &none).unwrap() {
        let c = l1[p as usize];
        if !staged.contains(&c) {
            let (page, data) = &content[&c];
            s.stage_snapshot_page(c, page, data).unwrap();
            staged.push(c);
        }
    }
    let from = lazarus_store::Snapshot {
        name: name.to_string(),
        volume_uid: 0,
        size_bytes: blocks * 4096,
        created_unix: 1,
        seq: 0,
        id: 9,
        l1,
        root,
        path: Default::default(),
    };
    let r = s.install_snapshot("v", &from, &staged).unwrap();
    assert!(r.is_ok(), "nothing changed the volume meanwhile");
}

#[derive(Clone, Debug)]
enum Known {
    /// Exists, with these values.
    Sure(HashMap<u64, u64>),
    /// The power cut its creation or its deletion: exists with these values, or not.
    Maybe(HashMap<u64, u64>),
}

#[test]
fn snapshots_survive_power_loss_at_random_instants() {
    let seed = std::env::var("LAZARUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("LAZARUS_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        journal_bytes: 8 << 20,
        // A cache of two pages: most pages are read back from disk.
        page_cache_bytes: 2 * 4096,
    };
    const BLOCKS: u64 = 1536; // 6 MiB, 6 slice pages
    powerloss::enable();
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        s.create_volume("v", BLOCKS * 4096).unwrap();
        s.checkpoint().unwrap();
    }
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut since: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut snaps: BTreeMap<String, Known> = BTreeMap::new();
    let mut next = 0;
    let mut cut_snapshot_ops = 0;
    let mut installs = 0;
    let mut resets = 0;
    // A revert the power cut: the snapshot's values, which the volume holds whole
    // if the revert committed.
    let mut reset_cut: Option<HashMap<u64, u64>> = None;
    for round in 0..40 {
        let ctx = format!("round {round} (seed {seed})");
        let s = Store::open(dir.path(), opts.clone())
            .unwrap_or_else(|e| panic!("{ctx}: store does not open after power loss: {e}"));
        assert!(
            s.recovery.damaged_pages.is_empty(),
            "{ctx}: power loss looked like corruption: {:?}",
            s.recovery
        );
        assert_eq!(s.recovery.missing_blocks, 0, "{ctx}: {:?}", s.recovery);
        let v = s.volume("v").unwrap();
        assert!(v.failed_snapshots().is_empty(), "{ctx}");
        let present: Vec<String> = v.snapshots().iter().map(|x| x.name.clone()).collect();
        for name in &present {
            assert!(
                snaps.contains_key(name),
                "{ctx}: unexpected snapshot {name}"
            );
        }
        let mut buf = vec![0u8; BLOCK_SIZE];
        for (name, k) in std::mem::take(&mut snaps) {
            let want = match k {
                Known::Sure(w) => {
                    assert!(present.contains(&name), "{ctx}: snapshot {name} lost");
                    w
                }
                Known::Maybe(w) if present.contains(&name) => w,
                Known::Maybe(_) => continue,
            };
            let sn = v.snapshot(&name).unwrap();
            for lba in 0..BLOCKS {
                s.read_snapshot(&v, &sn, Lba(lba), &mut buf)
                    .unwrap_or_else(|e| panic!("{ctx}: {name} lba {lba}: {e}"));
                let w = want.get(&lba).copied().unwrap_or(0);
                assert!(
                    buf == block(w),
                    "{ctx}: snapshot {name} LBA {lba} is not {w}"
                );
            }
            snaps.insert(name, Known::Sure(want));
        }
        if let Some(w) = reset_cut.take() {
            let whole = (0..BLOCKS).all(|lba| {
                s.read_blocks(&v, Lba(lba), &mut buf).is_ok()
                    && buf == block(w.get(&lba).copied().unwrap_or(0))
            });
            if whole {
                // It committed: the volume is the snapshot, and nothing else.
                durable = w;
                since.clear();
            }
            // Else it did not: the volume is as before it, checked below.
        }
        for lba in 0..BLOCKS {
            s.read_blocks(&v, Lba(lba), &mut buf)
                .unwrap_or_else(|e| panic!("{ctx} lba {lba}: {e}"));
            let d = durable.get(&lba).copied().unwrap_or(0);
            let now = if buf == block(d) {
                d
            } else {
                let cands = since.get(&lba).cloned().unwrap_or_default();
                *cands.iter().find(|c| buf == block(**c)).unwrap_or_else(|| {
                    panic!(
                        "{ctx}: LBA {lba} lost its flushed value {d} and holds none of {cands:?}"
                    )
                })
            };
            durable.insert(lba, now);
        }
        since.clear();
        powerloss::power_off_after(rng.u64(1..500));
        for _ in 0..rng.usize(1..100) {
            let lba = rng.u64(0..BLOCKS);
            let n = rng.u64(1..=32).min(BLOCKS - lba);
            let op = rng.u8(0..15);
            match op {
                0..=7 => {
                    let vals: Vec<u64> = (0..n).map(|_| rng.u64(1..400)).collect();
                    let data: Vec<u8> = vals.iter().flat_map(|x| block(*x)).collect();
                    for (i, x) in vals.iter().enumerate() {
                        since.entry(lba + i as u64).or_default().push(*x);
                    }
                    s.write_blocks(&v, Lba(lba), &data).unwrap();
                }
                8 => {
                    for i in 0..n {
                        since.entry(lba + i).or_default().push(0);
                    }
                    s.write_zeroes(&v, Lba(lba), n, rng.bool()).unwrap();
                }
                9 | 10 => s.flush().unwrap(),
                11 if powerloss::is_on() && snaps.len() < 4 => {
                    next += 1;
                    let name = format!("s{next}");
                    let mut at: HashMap<u64, u64> = durable.clone();
                    for (l, vals) in &since {
                        at.insert(*l, *vals.last().unwrap());
                    }
                    s.create_snapshot("v", &name, 7).unwrap();
                    if powerloss::is_on() {
                        snaps.insert(name, Known::Sure(at));
                    } else {
                        cut_snapshot_ops += 1;
                        snaps.insert(name, Known::Maybe(at));
                    }
                }
                12 if powerloss::is_on() && !snaps.is_empty() => {
                    let name = snaps.keys().nth(rng.usize(0..snaps.len())).unwrap().clone();
                    s.delete_snapshot("v", &name).unwrap();
                    let k = snaps.remove(&name).unwrap();
                    if !powerloss::is_on() {
                        cut_snapshot_ops += 1;
                        let (Known::Sure(w) | Known::Maybe(w)) = k;
                        snaps.insert(name, Known::Maybe(w));
                    }
                }
                13 if powerloss::is_on() && snaps.len() < 4 && rng.bool() => {
                    // A snapshot another copy took, installed here (this copy
                    // missed it): the volume as it is now, with a few blocks changed.
                    next += 1;
                    let name = format!("s{next}");
                    let mut at: HashMap<u64, u64> = durable.clone();
                    for (l, vals) in &since {
                        at.insert(*l, *vals.last().unwrap());
                    }
                    for _ in 0..rng.usize(1..40) {
                        at.insert(rng.u64(0..BLOCKS), rng.u64(400..500));
                    }
                    install(&s, &name, &at, BLOCKS);
                    installs += 1;
                    if powerloss::is_on() {
                        snaps.insert(name, Known::Sure(at));
                    } else {
                        cut_snapshot_ops += 1;
                        snaps.insert(name, Known::Maybe(at));
                    }
                }
                14 if powerloss::is_on() => {
                    let sure: Vec<(String, HashMap<u64, u64>)> = snaps
                        .iter()
                        .filter_map(|(n, k)| match k {
                            Known::Sure(w) => Some((n.clone(), w.clone())),
                            Known::Maybe(_) => None,
                        })
                        .collect();
                    if sure.is_empty() {
                        continue;
                    }
                    let (name, w) = sure[rng.usize(0..sure.len())].clone();
                    if rng.u8(0..3) == 0 {
                        // The power cut inside the revert, at one of its few I/Os.
                        powerloss::power_off_after(rng.u64(0..10));
                    }
                    s.reset_to_snapshot("v", "v", &name, 0).unwrap();
                    resets += 1;
                    if powerloss::is_on() {
                        durable = w;
                        since.clear();
                    } else {
                        cut_snapshot_ops += 1;
                        reset_cut = Some(w);
                    }
                }
                _ => s.checkpoint().unwrap(),
            }
            // A flush, a checkpoint or a snapshot's creation that completed with the
            // power on: everything written before it survives.
            if op >= 9 && op != 12 && op != 14 && powerloss::is_on() {
                // (An installation checkpoints too.)
                for (l, vals) in since.drain() {
                    durable.insert(l, *vals.last().unwrap());
                }
            }
        }
        drop(s);
        powerloss::crash(&mut |n| rng.u64(0..n.max(1)));
    }
    powerloss::disable();
    println!("snapshot operations the power cut: {cut_snapshot_ops}; installations: {installs}; reverts: {resets}");
}
