//! Lazarus's deterministic simulator (docs/simulator.md): the real code runs on
//! simulated hosts in one thread, under a network and a clock that one seed drives
//! (turmoil). Every run of a seed is the same run, so a failing seed is a regression
//! test.
//!
//! Built: the RPC layer between simulated hosts (`tests/rpc.rs`), the recovery server
//! on a simulated disk (`tests/recovery.rs`), and the whole cluster, three real storage
//! nodes, the recovery server and an NBD client, under seeded faults (`cluster`,
//! `tests/cluster.rs`, the `lazarus-sim` binary). docs/simulator.md.

pub mod cluster;
pub mod nbd;

use std::time::Duration;

/// A simulation of `seed`: message latency between 1 and 20 ms, hosts stepped in a
/// seeded random order, at most `limit` of simulated time.
pub fn simulation<'a>(seed: u64, limit: Duration) -> turmoil::Sim<'a> {
    builder(seed, limit).build()
}

/// The builder behind `simulation`, for scenarios that set more (the disk's torn
/// writes, say).
pub fn builder(seed: u64, limit: Duration) -> turmoil::Builder {
    let mut b = turmoil::Builder::new();
    b.rng_seed(seed)
        // A fixed wall clock too (turmoil starts it at the real time otherwise).
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(limit)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .enable_random_order()
        // Room for every connection attempt a held link releases at once (turmoil
        // panics at a full accept queue where a real stack would drop the SYN).
        .tcp_capacity(1 << 16);
    b
}

/// Simulated time since the simulation started (for traces that must replay exactly).
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The real recovery server on the simulated host it is called on (its data in `/rs`),
/// serving RPCs on port 7000; `compact_at` lowers its compaction threshold.
pub async fn serve_rs(compact_at: Option<u64>) -> turmoil::Result {
    let rs = lazarus_recovery::server::RecoveryServer::open(std::path::Path::new("/rs"))?;
    if let Some(b) = compact_at {
        rs.compact_min_bytes
            .store(b, std::sync::atomic::Ordering::Relaxed);
    }
    let l = lazarus_io::net::Listener::bind("0.0.0.0:7000").await?;
    lazarus_rpc::serve(
        l,
        None,
        std::sync::Arc::new(move |kind, body| {
            let h = rs.clone();
            Box::pin(async move { h.handle(kind, body).await })
        }),
    )
    .await;
    Ok(())
}
