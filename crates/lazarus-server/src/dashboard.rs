//! The web dashboard: a single page served at `/` (HTML, CSS and script embedded in the
//! binary, no outside assets) that polls `/api/v1/dashboard` once a second.
//!
//! `/api/v1/dashboard` is the cluster as the serving node sees it: its metadata (nodes,
//! volumes, each copy's state, primaries, jeopardy) and every node's own summary
//! (`lazarus_engine::stats`) — request totals, resync and repair progress, faults, recent
//! events — fetched from the peers by RPC (`KIND_STATS`) with a short deadline. A peer
//! that does not answer is shown down; the page works out rates (IOPS, bandwidth, mean
//! latency) from the difference between two polls.

use lazarus_engine::engine::Engine;
use lazarus_engine::stats::{local_stats, now_ms};
use serde_json::{json, Value};
use std::time::Duration;

pub const INDEX_HTML: &str = include_str!("dashboard.html");

/// How long the dashboard waits for a peer's summary before showing it down.
pub const PEER_STATS_TIMEOUT: Duration = Duration::from_millis(700);

/// The whole picture for the page.
pub async fn overview(engine: &Engine, node_name: &str) -> Value {
    let me = local_stats(engine);
    let Some(c) = engine.cluster.get().cloned() else {
        return json!({
            "node": node_name,
            "at_ms": now_ms(),
            "cluster": Value::Null,
            "nodes": [{"id": 0, "name": node_name, "up": true, "stats": me}],
        });
    };
    let meta = c.store.meta();
    let peers = meta.nodes.iter().map(|(&id, info)| {
        let c = c.clone();
        let me = &me;
        let out = meta.out.contains(&id);
        let removed = meta.removed.contains(&id);
        let replacing = meta.replacing.get(&id).copied();
        async move {
            let stats = if id == c.id {
                Ok(me.clone())
            } else {
                c.peer_stats(id, PEER_STATS_TIMEOUT).await
            };
            let (up, stats, error) = match stats {
                Ok(s) => (true, s, Value::Null),
                Err(e) => (false, Value::Null, json!(e)),
            };
            json!({
                "id": id,
                "name": info.name,
                "nbd": info.nbd,
                "admin": info.admin,
                "up": up,
                "out": out,
                "removed": removed,
                "replaced_by": replacing,
                "error": error,
                "stats": stats,
            })
        }
    });
    let nodes = futures::future::join_all(peers).await;
    let volumes: serde_json::Map<String, Value> = meta
        .volumes
        .values()
        .map(|v0| {
            let v = c.effective(&v0.name).unwrap_or_else(|| v0.clone());
            (v.name.clone(), serde_json::to_value(&v).unwrap_or_default())
        })
        .collect();
    let m = c.raft.metrics().borrow().clone();
    let group = m.membership_config.membership();
    json!({
        "node": node_name,
        "node_id": c.id,
        "at_ms": now_ms(),
        "leader": m.current_leader,
        "term": m.current_term,
        // The Raft group, and the copies on their way (DESIGN.md, membership).
        "voters": group.voter_ids().collect::<Vec<_>>(),
        "learners": group.learner_ids().collect::<Vec<_>>(),
        "joint": group.get_joint_config().len() > 1,
        "joining": meta.joining.iter().map(|(id, j)| json!({"id": id, "name": j.name})).collect::<Vec<_>>(),
        "rebalancing": meta.rebalancing,
        "moving": &meta.moving,
        "volumes": volumes,
        "jeopardy": c.jeopardy_status(),
        "nodes": nodes,
    })
}
