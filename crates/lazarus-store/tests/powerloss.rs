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
    };
    const BLOCKS: u64 = 2048; // 8 MiB, 8 slice pages
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
            let lba = rng.u64(0..BLOCKS);
            let n = rng.u64(1..=32).min(BLOCKS - lba);
            let op = rng.u8(0..12);
            let r = match op {
                0..=7 => {
                    let vals: Vec<u64> = (0..n).map(|_| rng.u64(1..400)).collect();
                    let data: Vec<u8> = vals.iter().flat_map(|x| block(*x)).collect();
                    for (i, x) in vals.iter().enumerate() {
                        since.entry(lba + i as u64).or_default().push(*x);
                    }
                    s.write_blocks(&v, Lba(lba), &data)
                        .map_err(|e| e.to_string())
                }
                8 => {
                    for i in 0..n {
                        since.entry(lba + i).or_default().push(0);
                    }
                    s.write_zeroes(&v, Lba(lba), n, rng.bool())
                        .map_err(|e| e.to_string())
                }
                9 | 10 => s.flush().map_err(|e| e.to_string()),
                _ => s.checkpoint().map_err(|e| e.to_string()),
            };
            r.unwrap_or_else(|e| panic!("round {round}: operation failed: {e}"));
            if op >= 9 && powerloss::is_on() {
                // The flush (or checkpoint) completed with the power on: everything
                // written before it must survive the crash.
                for (l, vals) in since.drain() {
                    let last = *vals.last().expect("non-empty");
                    if last == 0 {
                        durable.remove(&l);
                    } else {
                        durable.insert(l, last);
                    }
                }
            }
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
