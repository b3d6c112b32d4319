//! How fast block ids are computed one block at a time (`BlockId::hash_of` per 4 KiB)
//! and many at a time (`BlockId::hash_each`), over 1 MiB of distinct blocks.
//! `cargo run --release -p lazarus-types --example hash_rate`

use lazarus_types::{BlockId, BLOCK_SIZE};
use std::time::Instant;

fn main() {
    let data: Vec<u8> = (0..256 * BLOCK_SIZE)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let rounds = 400;
    let gib = (rounds * data.len()) as f64 / f64::from(1u32 << 30);
    for _ in 0..3 {
        let t = Instant::now();
        let mut check = 0usize;
        for _ in 0..rounds {
            check += data
                .chunks_exact(BLOCK_SIZE)
                .map(BlockId::hash_of)
                .filter(|id| id.0[0] == 0)
                .count();
        }
        let one = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..rounds {
            check += BlockId::hash_each(&data)
                .iter()
                .filter(|id| id.0[0] == 0)
                .count();
        }
        let many = t.elapsed().as_secs_f64();
        println!(
            "one block at a time {:.2} GiB/s, many at a time {:.2} GiB/s ({:.1}x) [{check}]",
            gib / one,
            gib / many,
            one / many
        );
    }
}
