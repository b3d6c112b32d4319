//! This node's own summary: request totals per volume, a per-second history of the
//! last two minutes, resync and repair progress, faults and recent events. It is what
//! `KIND_STATS` answers; the dashboard (`lazarus-server`) gathers it from every node.

use crate::engine::Engine;
use lazarus_observe::metrics::Op;
use serde_json::{json, Value};
use std::time::Duration;

/// Events per node carried in a summary.
const EVENTS_PER_NODE: usize = 60;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds of per-second I/O history each node keeps for the charts.
const HISTORY_SECS: usize = 120;

/// Per second (unix second, reads, writes, read ns, write ns): what this node served in
/// that second, so a page opened now shows the last two minutes at once.
static HISTORY: std::sync::LazyLock<parking_lot::Mutex<std::collections::VecDeque<[u64; 5]>>> =
    std::sync::LazyLock::new(Default::default);

/// This node's totals over all volumes: reads, writes (zeroes and trims count as
/// writes), and their summed nanoseconds.
fn io_totals(engine: &Engine) -> [u64; 4] {
    let mut t = [0u64; 4];
    for v in engine.store.volumes() {
        for op in Op::ALL {
            let (count, _, _, ns) = lazarus_observe::metrics::totals(&v.meta.name, op);
            add_to_totals(&mut t, op, count, ns);
        }
    }
    t
}

/// Adds one op's count and nanoseconds to `io_totals`-shaped totals.
fn add_to_totals(t: &mut [u64; 4], op: Op, count: u64, ns: u64) {
    match op {
        Op::Read => {
            t[0] += count;
            t[2] += ns;
        }
        Op::Flush => {}
        _ => {
            t[1] += count;
            t[3] += ns;
        }
    }
}

/// Samples this node's I/O totals once a second into `HISTORY`.
pub fn start_sampler(engine: std::sync::Arc<Engine>) {
    tokio::spawn(async move {
        let mut last = io_totals(&engine);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = io_totals(&engine);
            let d: Vec<u64> = (0..4).map(|i| now[i].saturating_sub(last[i])).collect();
            last = now;
            let mut h = HISTORY.lock();
            h.push_back([now_ms() / 1000, d[0], d[1], d[2], d[3]]);
            while h.len() > HISTORY_SECS {
                h.pop_front();
            }
        }
    });
}

/// This node's own summary (what `KIND_STATS` answers).
pub fn local_stats(engine: &Engine) -> Value {
    let mut volumes = serde_json::Map::new();
    let mut totals = [0u64; 4];
    for v in engine.store.volumes() {
        let name = v.meta.name.clone();
        let mut ops = serde_json::Map::new();
        for op in Op::ALL {
            let (count, errors, bytes, ns) = lazarus_observe::metrics::totals(&name, op);
            add_to_totals(&mut totals, op, count, ns);
            ops.insert(
                op.label().to_string(),
                json!({"count": count, "errors": errors, "bytes": bytes, "ns": ns}),
            );
        }
        let (mapped_blocks, mapped_pages) = v.usage();
        volumes.insert(
            name,
            json!({
                "size_bytes": v.size_bytes(),
                "mapped_blocks": mapped_blocks,
                "mapped_pages": mapped_pages,
                "damaged_pages": v.damaged_pages().len(),
                "unrecoverable_lbas": v.damaged_ranges().iter().map(|r| r.1).sum::<u64>(),
                "root": v.root().to_hex(),
                "snapshots": v.snapshots().iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                "ops": ops,
            }),
        );
    }
    let mut events = lazarus_observe::events::since(0);
    let skip = events.len().saturating_sub(EVENTS_PER_NODE);
    events.drain(..skip);
    let repairs = engine.repair.report();
    let mut out = json!({
        "at_ms": now_ms(),
        "volumes": volumes,
        "events": events,
        "repairs": repairs["counters"],
        "repair_bytes": repairs["bytes"],
        "scrub": engine.repair.scrub_progress(),
        "io_totals": totals,
        "history": HISTORY.lock().iter().collect::<Vec<_>>(),
        "device_failed": engine.store.device_failed(),
    });
    if let Some(c) = engine.cluster.get() {
        let m = c.raft.metrics().borrow().clone();
        out["id"] = json!(c.id);
        out["raft_state"] = json!(format!("{:?}", m.state));
        out["leader"] = json!(m.current_leader);
        out["term"] = json!(m.current_term);
        out["leases"] = json!(c.held_leases());
        // Per volume this node is primary of, the epoch at which it compared its live
        // copies with its own: the leader enters jeopardy only after that.
        out["reconciled"] = json!(c.reconciled_epochs());
        out["resync"] = json!(c.resync.progress());
        out["isolated"] = json!(c.is_isolated());
        // The volumes this node's metadata names and it serves (all but clones still
        // being made): a clone's maker waits for every node to serve it.
        out["serves"] = json!(c
            .store
            .meta()
            .volumes
            .values()
            .filter(|v| v.cloning.is_none())
            .map(|v| v.name.clone())
            .collect::<Vec<_>>());
        out["drops"] = json!(c
            .drops
            .lock()
            .iter()
            .map(|n| format!("n{n}"))
            .collect::<Vec<_>>());
    }
    out
}
