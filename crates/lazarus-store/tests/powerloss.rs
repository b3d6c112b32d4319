//! Guards the crash argument of docs/format.md against *power loss*, which a process
//! kill does not exercise (the page cache survives a kill). The store runs on the
//! power-loss simulator in `disk::powerloss`: at a random I/O operation the power goes
//! off (possibly in the middle of a flush or a checkpoint), and each file becomes its
//! synced image plus a random subset of its unsynced writes, some torn at 512 bytes.
//! After every such crash: the store opens, no page looks corrupt, no block is missing,
//! every LBA last written before a completed FLUSH reads back exactly, and every other
//! LBA reads as one of the values written to it since (or the flushed one).

use lazarus_store::disk::powerloss;
use lazarus_store::{Store, StoreOptions};
use lazarus_types::{Lba, BLOCK_SIZE};
use std::collections::HashMap;

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

#[test]
fn power_loss_at_random_instants() {
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
    // LBA -> value certainly durable; LBA -> values written since the last flush.
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut since: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut total_lost = 0;
    for round in 0..40 {
        let s = Store::open(dir.path(), opts.clone()).unwrap_or_else(|e| {
            panic!("round {round}: store does not open after power loss: {e} (seed {seed})")
        });
        assert!(
            s.recovery.damaged_pages.is_empty(),
            "round {round}: power loss looked like corruption: {:?} (seed {seed})",
            s.recovery
        );
        assert_eq!(
            s.recovery.missing_blocks, 0,
            "round {round}: {:?} (seed {seed})",
            s.recovery
        );
        let v = s.volume("v").unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for lba in 0..BLOCKS {
            s.read_blocks(&v, Lba(lba), &mut buf)
                .unwrap_or_else(|e| panic!("round {round} lba {lba}: {e} (seed {seed})"));
            let d = durable.get(&lba).copied().unwrap_or(0);
            let now = if buf == block(d) {
                d
            } else {
                let cands = since.get(&lba).cloned().unwrap_or_default();
                *cands.iter().find(|c| buf == block(**c)).unwrap_or_else(|| {
                    panic!("round {round}: LBA {lba} lost its flushed value {d} and holds none of {cands:?} (seed {seed})")
                })
            };
            if now == 0 {
                durable.remove(&lba);
            } else {
                durable.insert(lba, now);
            }
        }
        since.clear();
        // Run operations; the power goes off after a random number of I/Os.
        powerloss::power_off_after(rng.u64(1..400));
        for _ in 0..rng.usize(1..120) {
            let op = rng.u8(0..14);
            if op == 13 {
                // A flush with writes while it syncs (they come after what it takes):
                // its completion makes durable what was written before it began. A
                // write of content the store holds takes a block back whose slot a
                // release before the flush left waiting; an overwrite here releases
                // it again, after the flush's end.
                let marks: HashMap<u64, usize> =
                    since.iter().map(|(l, vals)| (*l, vals.len())).collect();
                let mut failed = None;
                let r = s.flush_with(|| {
                    for _ in 0..rng.usize(1..6) {
                        if s.write_may_block() {
                            break;
                        }
                        // Writes and write-zeroes only: a flush here would wait for
                        // the sync lock this flush holds. Mostly over a block written
                        // since the last flush: one that may have taken a block back.
                        let op = rng.u8(0..9);
                        let recent: Vec<u64> = since.keys().copied().collect();
                        let r = if !recent.is_empty() && rng.u8(0..4) > 0 {
                            let lba = recent[rng.usize(..recent.len())];
                            let n = rng.u64(1..=4).min(BLOCKS - lba);
                            step_at(&s, &v, &mut rng, op, lba, n, &mut since, &mut durable)
                        } else {
                            step(&s, &v, &mut rng, op, &mut since, &mut durable)
                        };
                        if let Err(e) = r {
                            failed = Some(e);
                            return;
                        }
                    }
                });
                r.unwrap_or_else(|e| panic!("round {round}: flush failed: {e}"));
                if let Some(e) = failed {
                    panic!("round {round}: operation failed: {e}");
                }
                if powerloss::is_on() {
                    settle_marks(marks, &mut since, &mut durable);
                }
                continue;
            }
            if op == 12 {
                // A checkpoint with writes and flushes while it writes its images in
                // place (they go to the journal's next generation). Its completion
                // makes durable what was written before it began, not those.
                let marks: HashMap<u64, usize> =
                    since.iter().map(|(l, vals)| (*l, vals.len())).collect();
                let mut failed = None;
                let mut inner_settled = false;
                let r = s.checkpoint_with(|| {
                    for _ in 0..rng.usize(1..12) {
                        let op = rng.u8(0..11);
                        match step(&s, &v, &mut rng, op, &mut since, &mut durable) {
                            Ok(settled) => inner_settled |= settled,
                            Err(e) => {
                                failed = Some(e);
                                return;
                            }
                        }
                    }
                });
                r.unwrap_or_else(|e| panic!("round {round}: checkpoint failed: {e}"));
                if let Some(e) = failed {
                    panic!("round {round}: operation failed: {e}");
                }
                if powerloss::is_on() && !inner_settled {
                    settle_marks(marks, &mut since, &mut durable);
                }
                continue;
            }
            step(&s, &v, &mut rng, op, &mut since, &mut durable)
                .unwrap_or_else(|e| panic!("round {round}: operation failed: {e}"));
        }
        drop(s);
        total_lost += powerloss::crash(&mut |n| rng.u64(0..n.max(1)));
    }
    powerloss::disable();
    println!("unsynced writes dropped or torn across all crashes: {total_lost}");
    assert!(
        total_lost > 0,
        "the simulator never lost a write: the test proves nothing"
    );
}

const BLOCKS: u64 = 2048; // 8 MiB, 8 slice pages

/// One random operation: a write (op 0-7), write-zeroes (8), a flush (9, 10) or a
/// checkpoint (11); what it leaves durable is recorded (`settle`, whose answer it
/// returns).
fn step(
    s: &Store,
    v: &lazarus_store::volume::Volume,
    rng: &mut fastrand::Rng,
    op: u8,
    since: &mut HashMap<u64, Vec<u64>>,
    durable: &mut HashMap<u64, u64>,
) -> Result<bool, String> {
    let lba = rng.u64(0..BLOCKS);
    let n = rng.u64(1..=32).min(BLOCKS - lba);
    step_at(s, v, rng, op, lba, n, since, durable)
}

/// `step` on `n` blocks from `lba`.
#[allow(clippy::too_many_arguments)]
fn step_at(
    s: &Store,
    v: &lazarus_store::volume::Volume,
    rng: &mut fastrand::Rng,
    op: u8,
    lba: u64,
    n: u64,
    since: &mut HashMap<u64, Vec<u64>>,
    durable: &mut HashMap<u64, u64>,
) -> Result<bool, String> {
    match op {
        0..=7 => {
            let vals: Vec<u64> = (0..n).map(|_| rng.u64(1..400)).collect();
            let data: Vec<u8> = vals.iter().flat_map(|x| block(*x)).collect();
            for (i, x) in vals.iter().enumerate() {
                since.entry(lba + i as u64).or_default().push(*x);
            }
            s.write_blocks(v, Lba(lba), &data)
                .map_err(|e| e.to_string())?
        }
        8 => {
            for i in 0..n {
                since.entry(lba + i).or_default().push(0);
            }
            s.write_zeroes(v, Lba(lba), n, rng.bool())
                .map_err(|e| e.to_string())?
        }
        9 | 10 => s.flush().map_err(|e| e.to_string())?,
        _ => s.checkpoint().map_err(|e| e.to_string())?,
    }
    Ok(settle(op, since, durable))
}

/// A durability point that covered what was written before it began (`marks`: how
/// many values each LBA had then), not what came while it ran.
fn settle_marks(
    marks: HashMap<u64, usize>,
    since: &mut HashMap<u64, Vec<u64>>,
    durable: &mut HashMap<u64, u64>,
) {
    for (l, n) in marks {
        let vals = since.get_mut(&l).expect("only flushes drain it");
        match vals[n - 1] {
            0 => durable.remove(&l),
            x => durable.insert(l, x),
        };
        vals.drain(..n);
        if vals.is_empty() {
            since.remove(&l);
        }
    }
}

/// After a flush or checkpoint (op 9 or more) completed with the power on, everything
/// written before it must survive the crash.
fn settle(op: u8, since: &mut HashMap<u64, Vec<u64>>, durable: &mut HashMap<u64, u64>) -> bool {
    let settled = op >= 9 && powerloss::is_on();
    if settled {
        for (l, vals) in since.drain() {
            let last = *vals.last().expect("non-empty");
            if last == 0 {
                durable.remove(&l);
            } else {
                durable.insert(l, last);
            }
        }
    }
    settled
}
