//! Guards clones that share their snapshot's pages against power loss (the simulator
//! of `disk::powerloss`; see powerloss.rs): the power goes off at a random I/O, perhaps
//! inside a clone's laying of its snapshot's pages, inside a deletion of the snapshot
//! (which first makes the clones' shared pages their own) or of the clone. After
//! every crash no page looks corrupt and no block is missing; a clone whose creation
//! returned with the power on reads its snapshot where it has not written since, and
//! its flushed writes elsewhere; one whose creation the power cut reads wholly as the
//! snapshot or wholly empty; the snapshots of the origin read what they held.

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

const BLOCKS: u64 = 1280; // 5 slice pages

#[derive(Clone, Debug)]
enum Known {
    /// Exists, with these values (durable for a volume).
    Sure(HashMap<u64, u64>),
    /// The power cut its creation or deletion: exists with these values, or not.
    Maybe(HashMap<u64, u64>),
}

/// A clone whose creation the power cut: wholly these values, or wholly empty; or,
/// made as a node alone makes one (`marked`: `create_clone_volume`), wholly these
/// values or gone.
struct CutClone {
    name: String,
    at: HashMap<u64, u64>,
    marked: bool,
    /// Made alone and cut before its reset began: gone.
    gone: bool,
}

#[test]
fn clones_survive_power_loss_at_random_instants() {
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
    powerloss::enable();
    {
        let s = Store::open(dir.path(), opts.clone()).unwrap();
        s.create_volume("v", BLOCKS * 4096).unwrap();
        s.checkpoint().unwrap();
    }
    // Volumes (v and its clones): durable values, and values written since.
    let mut vols: BTreeMap<String, Known> = BTreeMap::new();
    vols.insert("v".into(), Known::Sure(HashMap::new()));
    let mut since: HashMap<(String, u64), Vec<u64>> = HashMap::new();
    let mut snaps: BTreeMap<String, Known> = BTreeMap::new();
    let mut cut: Option<CutClone> = None;
    let mut next = 0;
    let (mut clones, mut cut_ops, mut flattens, mut cut_alone) = (0, 0, 0, 0);
    for round in 0..40 {
        let ctx = format!("round {round} (seed {seed})");
        let s = Store::open(dir.path(), opts.clone())
            .unwrap_or_else(|e| panic!("{ctx}: store does not open after power loss: {e}"));
        assert!(
            s.recovery.damaged_pages.is_empty() && s.recovery.missing_blocks == 0,
            "{ctx}: power loss looked like corruption: {:?}",
            s.recovery
        );
        // (A volume whose creation the power cut is there whole, or not at all.)
        assert!(
            s.recovery.failed_volumes.is_empty(),
            "{ctx}: {:?}",
            s.recovery
        );
        let v = s.volume("v").unwrap();
        let present: Vec<String> = v.snapshots().iter().map(|x| x.name.clone()).collect();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for name in &present {
            assert!(
                snaps.contains_key(name),
                "{ctx}: unexpected snapshot {name}"
            );
        }
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
        for v in s.volumes() {
            assert!(
                !v.is_unfilled(),
                "{ctx}: {} is still marked unfilled after the open",
                v.meta.name
            );
        }
        if let Some(c) = cut.take() {
            cut_alone += u64::from(c.marked);
            assert!(
                !c.gone || s.volume(&c.name).is_none(),
                "{ctx}: clone {} made alone, cut before it was filled, is still there",
                c.name
            );
            if let Some(cv) = s.volume(&c.name) {
                let mut whole = true;
                let mut empty = true;
                for lba in 0..BLOCKS {
                    s.read_blocks(&cv, Lba(lba), &mut buf)
                        .unwrap_or_else(|e| panic!("{ctx}: {} lba {lba}: {e}", c.name));
                    whole &= buf == block(c.at.get(&lba).copied().unwrap_or(0));
                    empty &= buf == block(0);
                }
                assert!(
                    whole || empty,
                    "{ctx}: clone {} is partly its snapshot",
                    c.name
                );
                assert!(
                    whole || !c.marked,
                    "{ctx}: clone {} made alone was cut and is there empty",
                    c.name
                );
                vols.insert(
                    c.name,
                    Known::Sure(if whole { c.at } else { HashMap::new() }),
                );
            }
        }
        for (name, k) in std::mem::take(&mut vols) {
            let durable = match (k, s.volume(&name)) {
                (Known::Sure(d), Some(_)) => d,
                (Known::Sure(_), None) => panic!("{ctx}: volume {name} lost"),
                (Known::Maybe(d), Some(_)) => d,
                (Known::Maybe(_), None) => continue,
            };
            let cv = s.volume(&name).unwrap();
            let mut now_vals = HashMap::new();
            for lba in 0..BLOCKS {
                s.read_blocks(&cv, Lba(lba), &mut buf)
                    .unwrap_or_else(|e| panic!("{ctx}: {name} lba {lba}: {e}"));
                let d = durable.get(&lba).copied().unwrap_or(0);
                let now = if buf == block(d) {
                    d
                } else {
                    let cands = since.get(&(name.clone(), lba)).cloned().unwrap_or_default();
                    *cands.iter().find(|c| buf == block(**c)).unwrap_or_else(|| {
                        panic!("{ctx}: {name} LBA {lba} lost {d} and holds none of {cands:?}")
                    })
                };
                now_vals.insert(lba, now);
            }
            vols.insert(name, Known::Sure(now_vals));
        }
        since.clear();
        let durable_of = |vols: &BTreeMap<String, Known>,
                          since: &HashMap<(String, u64), Vec<u64>>,
                          name: &str| {
            let (Known::Sure(d) | Known::Maybe(d)) = &vols[name];
            let mut at = d.clone();
            for ((n, l), vals) in since {
                if n == name {
                    at.insert(*l, *vals.last().unwrap());
                }
            }
            at
        };
        powerloss::power_off_after(rng.u64(1..600));
        for _ in 0..rng.usize(1..80) {
            let names: Vec<String> = vols.keys().cloned().collect();
            let name = names[rng.usize(0..names.len())].clone();
            let lba = rng.u64(0..BLOCKS);
            let n = rng.u64(1..=32).min(BLOCKS - lba);
            let op = rng.u8(0..14);
            let Some(vol) = s.volume(&name) else {
                continue; // its deletion was cut: gone from the running store
            };
            match op {
                0..=6 => {
                    let vals: Vec<u64> = (0..n).map(|_| rng.u64(1..400)).collect();
                    let data: Vec<u8> = vals.iter().flat_map(|x| block(*x)).collect();
                    for (i, x) in vals.iter().enumerate() {
                        since
                            .entry((name.clone(), lba + i as u64))
                            .or_default()
                            .push(*x);
                    }
                    s.write_blocks(&vol, Lba(lba), &data).unwrap();
                }
                7 => {
                    for i in 0..n {
                        since.entry((name.clone(), lba + i)).or_default().push(0);
                    }
                    s.write_zeroes(&vol, Lba(lba), n, rng.bool()).unwrap();
                }
                8 | 9 => s.flush().unwrap(),
                10 if powerloss::is_on() && snaps.len() < 3 => {
                    next += 1;
                    let sn = format!("s{next}");
                    let at = durable_of(&vols, &since, "v");
                    s.create_snapshot("v", &sn, next).unwrap();
                    if powerloss::is_on() {
                        snaps.insert(sn, Known::Sure(at));
                    } else {
                        cut_ops += 1;
                        snaps.insert(sn, Known::Maybe(at));
                    }
                }
                11 if powerloss::is_on() && !snaps.is_empty() => {
                    // Deleting a snapshot: its clones make its pages their own first.
                    let sn = snaps.keys().nth(rng.usize(0..snaps.len())).unwrap().clone();
                    let shared: u64 = s.volumes().iter().map(|v| v.based_pages()).sum();
                    if shared > 0 && rng.bool() {
                        powerloss::power_off_after(rng.u64(0..20));
                    }
                    s.delete_snapshot("v", &sn).unwrap();
                    flattens += u64::from(shared > 0);
                    let k = snaps.remove(&sn).unwrap();
                    if !powerloss::is_on() {
                        cut_ops += 1;
                        let (Known::Sure(w) | Known::Maybe(w)) = k;
                        snaps.insert(sn, Known::Maybe(w));
                    }
                }
                12 if powerloss::is_on() && vols.len() < 5 && cut.is_none() => {
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
                    let (sn, at) = sure[rng.usize(0..sure.len())].clone();
                    next += 1;
                    let c = format!("c{next}");
                    let marked = rng.bool();
                    if marked {
                        s.create_clone_volume(&c, BLOCKS * 4096, &format!("v@{sn}"))
                            .unwrap();
                    } else {
                        s.create_volume(&c, BLOCKS * 4096).unwrap();
                    }
                    if !powerloss::is_on() {
                        // There empty, or not there (marked: not there).
                        cut = Some(CutClone {
                            name: c,
                            at: HashMap::new(),
                            marked,
                            gone: marked,
                        });
                        continue;
                    }
                    if rng.u8(0..3) == 0 {
                        // The power cut inside the clone, at one of its few I/Os.
                        powerloss::power_off_after(rng.u64(0..12));
                    }
                    s.reset_to_snapshot(&c, "v", &sn, 0).unwrap();
                    clones += 1;
                    if powerloss::is_on() {
                        vols.insert(c, Known::Sure(at));
                    } else {
                        cut_ops += 1;
                        cut = Some(CutClone {
                            name: c,
                            at,
                            marked,
                            gone: false,
                        });
                    }
                }
                13 if powerloss::is_on() && name != "v" => {
                    s.delete_volume(&name).unwrap();
                    if powerloss::is_on() {
                        vols.remove(&name);
                        since.retain(|(n, _), _| *n != name);
                    } else {
                        // Gone, or there with its values as after any crash.
                        cut_ops += 1;
                        let (Known::Sure(d) | Known::Maybe(d)) = vols[&name].clone();
                        vols.insert(name, Known::Maybe(d));
                    }
                }
                _ => s.checkpoint().unwrap(),
            }
            // A flush, checkpoint, snapshot or clone that completed with the power on:
            // everything written before it survives.
            if op >= 8 && op != 13 && powerloss::is_on() {
                for ((n, l), vals) in since.drain() {
                    if let Some(Known::Sure(d) | Known::Maybe(d)) = vols.get_mut(&n) {
                        d.insert(l, *vals.last().unwrap());
                    }
                }
            }
        }
        drop(s);
        powerloss::crash(&mut |n| rng.u64(0..n.max(1)));
    }
    powerloss::disable();
    println!("clones: {clones}; operations the power cut: {cut_ops} (clones made alone: {cut_alone}); snapshot deletions with clones sharing pages: {flattens}");
}
