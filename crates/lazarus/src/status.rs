//! `lazarus status`: the cluster as a person wants to see it. The answering node gives
//! the metadata; every node is then asked for its own view (up or down, ready, the
//! resyncs it runs), so the table shows what each node is doing, not one node's guess.

use crate::client::Api;
use serde_json::{json, Value};
use std::time::Duration;

const NODE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Each member's own view, by node id: `up`, `ready`, `leader` (whom it follows),
/// `resync` (its resyncs in progress or done).
pub fn survey(cluster: &Value) -> Value {
    let mut out = serde_json::Map::new();
    let nodes = cluster["metadata"]["nodes"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let probes: Vec<(String, std::thread::JoinHandle<Option<Value>>)> = nodes
        .iter()
        .map(|(id, n)| {
            let admin = n["admin"].as_str().unwrap_or_default().to_string();
            let h = std::thread::spawn(move || {
                let api = Api::with_timeout(&format!("http://{admin}"), NODE_PROBE_TIMEOUT);
                match api.get("/api/v1/cluster") {
                    Ok((200, v)) => Some(v),
                    _ => None,
                }
            });
            (id.clone(), h)
        })
        .collect();
    for (id, h) in probes {
        let view = h.join().ok().flatten();
        let info = &nodes[&id];
        out.insert(
            id.clone(),
            match view {
                Some(v) => json!({
                    "name": info["name"],
                    "up": true,
                    "ready": v["ready"],
                    "view": v["view"],
                    "state": v["state"],
                    "leader": v["leader"],
                    "leases": v["leases"],
                    "drops": v["drops"],
                    "isolated": v["isolated"],
                    "device_failed": v["device_failed"],
                    "resync": v["resync"],
                    "nbd": info["nbd"],
                    "admin": info["admin"],
                }),
                None => json!({
                    "name": info["name"],
                    "up": false,
                    "nbd": info["nbd"],
                    "admin": info["admin"],
                }),
            },
        );
    }
    Value::Object(out)
}

/// Colours a word for a terminal: green for healthy, yellow for in-progress, red for
/// down or dead. Plain text when stdout is not a terminal (scripts, tests).
fn paint(word: &str) -> String {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return word.to_string();
    }
    let code = match word {
        "live" | "up" | "leader" => "32",
        "resyncing" | "catching-up" => "33",
        "dead" | "DOWN" | "JEOPARDY" | "OUT" => "31;1",
        _ => return word.to_string(),
    };
    format!("\x1b[{code}m{word}\x1b[0m")
}

fn copy_state(c: &Value, vol: &str, node: &str, state: &str) -> String {
    let mut s = format!("n{node}:{}", paint(state));
    if state == "resyncing" {
        let p = &c["nodes"][node]["resync"][vol];
        if p.is_object() {
            s.push_str(&format!(
                "(pass {}, {}/{} pages)",
                p["pass"], p["pages_copied"], p["pages_differing"]
            ));
        }
    }
    s
}

pub fn print_cluster(c: &Value) {
    let leader = c["leader"]
        .as_u64()
        .map_or("none".to_string(), |l| format!("n{l}"));
    println!(
        "cluster: leader {leader}, term {} (as seen by n{})",
        c["term"], c["id"]
    );
    if c["view"] == "catching up" {
        println!(
            "  n{} is catching up: this view may be behind the leader's (it takes no lease and serves nothing until it is current)",
            c["id"]
        );
    }
    println!(
        "  {:<5} {:<6} {:<10} {:<22} {:<22} FAULTS",
        "NODE", "STATE", "ROLE", "NBD", "ADMIN"
    );
    for (id, n) in c["nodes"].as_object().into_iter().flatten() {
        let up = n["up"] == true;
        let role = if !up {
            "-".to_string()
        } else if c["leader"].as_u64().map(|l| l.to_string()).as_deref() == Some(id.as_str()) {
            "leader".to_string()
        } else if n["ready"] == false {
            "catching-up".to_string()
        } else if c["learners"].as_array().is_some_and(|l| {
            l.iter()
                .any(|x| x.as_u64().map(|x| x.to_string()).as_deref() == Some(id.as_str()))
        }) {
            "learner".to_string()
        } else {
            "follower".to_string()
        };
        let faults: Vec<String> = n["drops"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(|d| format!("drop->{d}")))
            .chain((n["isolated"] == true).then(|| "isolated".to_string()))
            .chain((n["device_failed"] == true).then(|| "device-failed".to_string()))
            .chain(
                c["metadata"]["out"]
                    .as_array()
                    .is_some_and(|o| {
                        o.iter()
                            .any(|x| x.as_u64().is_some_and(|x| id.parse() == Ok(x)))
                    })
                    .then(|| "OUT (its copies are rebuilt elsewhere)".to_string()),
            )
            .collect();
        let pad =
            |w: &str, n: usize| format!("{}{}", paint(w), " ".repeat(n.saturating_sub(w.len())));
        println!(
            "  n{:<4} {} {} {:<22} {:<22} {}",
            id,
            pad(if up { "up" } else { "DOWN" }, 6),
            pad(&role, 10),
            n["nbd"].as_str().unwrap_or("?"),
            n["admin"].as_str().unwrap_or("?"),
            faults.join(" ")
        );
    }
    if c["metadata"]["rebalancing"] == true {
        println!("  rebalancing: copies, then primary roles, move one at a time (`lazarus rebalance --cancel` stops after the move under way)");
    }
    for (name, vol) in c["metadata"]["volumes"].as_object().into_iter().flatten() {
        let states: Vec<String> = vol["states"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(n, st)| copy_state(c, name, n, st.as_str().unwrap_or("?")))
            .collect();
        println!(
            "  volume {name:<12} primary n{} epoch {}  copies {}",
            vol["primary"],
            vol["epoch"],
            states.join(" ")
        );
        let placed = vol["replicas"].as_array().map_or(0, |r| r.len());
        let rf = vol["replication"].as_u64().unwrap_or(0) as usize;
        if let Some(n) = c["metadata"]["primary_wanted"][name.as_str()].as_u64() {
            println!("    primary role asked for n{n} (`lazarus volume primary`): handed over once its copy is live");
        }
        let moving = &c["metadata"]["moving"][name.as_str()];
        if let Some(from) = moving.as_u64() {
            println!("    moving (rebalance): the copy on n{from} is dropped once its replacement is live");
        } else if rf > 0 && placed > rf {
            println!("    re-replicating: {placed} copies placed for {rf}; the copy on an out node is dropped once its replacement is live");
        }
        let j = &c["jeopardy"]["volumes"][name.as_str()];
        // The recovery server may know a newer holder than this metadata (claimed
        // without a majority: a surviving replica, a take-over): say who serves.
        let rs_holder = &j["recovery_server"]["holder"];
        let rs_fcid = j["recovery_server"]["failure_count_id"]
            .as_u64()
            .unwrap_or(0);
        let meta_fcid = vol["failure_count_id"].as_u64().unwrap_or(0);
        if rs_holder.is_u64() && rs_fcid > meta_fcid && *rs_holder != vol["primary"] {
            println!(
                "    served by n{rs_holder} under a hold from the recovery server (failure count ID {rs_fcid}); the metadata above is from before, and adopts it once a majority is back"
            );
        }
        if j["jeopardy"] == true {
            println!(
                "    {} failure count ID {}, recovery log {} bytes, recovery lag {}{}",
                paint("JEOPARDY"),
                j["failure_count_id"],
                j["recovery_log_bytes"],
                j["recovery_lag"],
                if vol["protected"] == true {
                    ", protected by an administrator"
                } else {
                    ""
                }
            );
        } else {
            println!(
                "    protected by {} failure domains; failure count ID {}",
                vol["states"]
                    .as_object()
                    .map_or(0, |m| m.values().filter(|s| *s == "live").count()),
                j["failure_count_id"]
            );
        }
    }
    let rs = &c["jeopardy"]["recovery_server"];
    if rs.is_object() {
        println!(
            "  recovery server {} {} (policy {})",
            rs["address"].as_str().unwrap_or("?"),
            paint(if rs["reachable"] == true {
                "up"
            } else {
                "DOWN"
            }),
            rs["policy"].as_str().unwrap_or("?")
        );
        if rs["configured_policy"].is_string() && rs["configured_policy"] != rs["policy"] {
            println!(
                "  {}: this node was started with policy {}; the cluster follows {} (accept holds only while every node says accept)",
                paint("POLICY MISMATCH"),
                rs["configured_policy"].as_str().unwrap_or("?"),
                rs["policy"].as_str().unwrap_or("?")
            );
        }
    }
}

/// A progress bar with rate and ETA on stderr, when stderr is a terminal.
pub fn progress_line(done: usize, total: usize, elapsed: Duration) {
    progress(done as u64, total as u64, "pages", elapsed)
}

/// `progress_line` for any unit (bytes are shown in MiB).
pub fn progress(done: u64, total: u64, unit: &str, elapsed: Duration) {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if !err.is_terminal() || total == 0 {
        return;
    }
    let width = 30u64;
    let filled = (width * done / total) as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = total.saturating_sub(done) as f64 / rate.max(1e-9);
    let (d, t, r, u) = if unit == "bytes" {
        let m = (1u64 << 20) as f64;
        (done as f64 / m, total as f64 / m, rate / m, "MiB")
    } else {
        (done as f64, total as f64, rate, unit)
    };
    let _ = write!(
        err,
        "\r[{}{}] {d:.0}/{t:.0} {u}  {r:.1} {u}/s  ETA {eta:.0}s ",
        "=".repeat(filled),
        " ".repeat(width as usize - filled)
    );
    if done == total {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}
