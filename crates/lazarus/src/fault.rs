//! `lazarus fault ...`: fault injection into a running cluster, for tests and for people
//! trying Lazarus out. `--data DIR` finds the cluster through the `cluster.json` its
//! supervisor (`lazarus up`) keeps there.

use crate::client::{self, Api};
use crate::up::KILLED_MARKER;
use anyhow::Context;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const REVIVE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct ClusterFiles {
    pub data: PathBuf,
    pub json: Value,
}

impl ClusterFiles {
    pub fn load(data: &Path) -> anyhow::Result<ClusterFiles> {
        crate::client::use_token_of(data);
        let p = data.join("cluster.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "no running cluster found under {} (start one with `lazarus up --data {}`)",
                data.display(),
                data.display()
            )
        })?;
        Ok(ClusterFiles {
            data: data.to_path_buf(),
            json: serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", p.display()))?,
        })
    }

    fn node(&self, id: &str) -> anyhow::Result<&Value> {
        self.json["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == id)
            .ok_or_else(|| {
                let ids: Vec<&str> = self.json["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n["id"].as_str())
                    .collect();
                anyhow::anyhow!("no node {id:?} in this cluster (nodes: {})", ids.join(", "))
            })
    }

    pub fn api(&self, id: &str) -> anyhow::Result<Api> {
        let admin = self.node(id)?["admin"]
            .as_str()
            .context("cluster.json has no admin address")?;
        Ok(Api::new(&format!("http://{admin}")))
    }

    pub fn node_ids(&self) -> Vec<String> {
        self.json["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["admin"].is_string())
            .filter_map(|n| n["id"].as_str().map(str::to_string))
            .collect()
    }
}

fn pid_of(files: &ClusterFiles, id: &str) -> Option<i32> {
    let text = std::fs::read(files.data.join(id).join("endpoints.json")).ok()?;
    let v: Value = serde_json::from_slice(&text).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

/// Whether `pid` is a running (not zombie) process.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

pub fn kill(data: &Path, node: &str) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    files.node(node)?;
    let dir = files.data.join(node);
    let marker = dir.join(KILLED_MARKER);
    if let Err(e) = std::fs::write(&marker, b"held down by `lazarus fault kill`\n") {
        // On a full disk the file is created and its content refused: an empty marker
        // left behind would hold the node down the next time it exits by itself.
        let _ = std::fs::remove_file(&marker);
        return Err(anyhow::Error::new(e).context(format!(
            "cannot write {}; node {node} not killed",
            marker.display()
        )));
    }
    let Some(pid) = pid_of(&files, node).filter(|p| running(*p)) else {
        println!(
            "node {node} is not running; it stays down until `lazarus fault revive --node {node}`"
        );
        return Ok(());
    };
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while running(pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("node {node} killed (SIGKILL to pid {pid}); it stays down until `lazarus fault revive --node {node}`");
    Ok(())
}

pub fn revive(data: &Path, node: &str) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    files.node(node)?;
    let sup = files.json["supervisor_pid"].as_i64().unwrap_or(0) as i32;
    if sup <= 0 || !running(sup) {
        anyhow::bail!(
            "no `lazarus up` supervisor is running for {}; start it again with `lazarus up --data {}`",
            data.display(),
            data.display()
        );
    }
    let dir = files.data.join(node);
    let old = pid_of(&files, node).filter(|p| running(*p));
    if let Some(p) = old {
        if !dir.join(KILLED_MARKER).exists() {
            println!("node {node} is already running (pid {p})");
            return Ok(());
        }
    }
    let _ = std::fs::remove_file(dir.join(KILLED_MARKER));
    std::fs::write(dir.join("REVIVE"), b"")?;
    let t0 = Instant::now();
    loop {
        if let Some(p) = pid_of(&files, node).filter(|p| running(*p) && Some(*p) != old) {
            println!("node {node} revived (pid {p})");
            return Ok(());
        }
        if t0.elapsed() > REVIVE_TIMEOUT {
            anyhow::bail!(
                "node {node} did not come back within {REVIVE_TIMEOUT:?}; see {}",
                dir.join("node.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Injects a fault on the replication link `from` -> `to` (`endpoint` under
/// `/api/v1/faults/`).
fn link_fault(data: &Path, from: &str, to: &str, endpoint: &str) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    files.node(to)?;
    if from == to {
        anyhow::bail!("--from and --to name the same node");
    }
    client::ok(
        files
            .api(from)?
            .post(&format!("/api/v1/faults/{endpoint}"), &json!({ "to": to }))?,
    )?;
    Ok(())
}

pub fn drop(data: &Path, from: &str, to: &str) -> anyhow::Result<()> {
    link_fault(data, from, to, "drop")?;
    println!(
        "replication traffic from {from} to {to} now fails (cluster metadata traffic is untouched)"
    );
    Ok(())
}

pub fn stall(data: &Path, from: &str, to: &str) -> anyhow::Result<()> {
    link_fault(data, from, to, "stall")?;
    println!(
        "replication updates from {from} to {to} are now held (`lazarus fault heal` releases them)"
    );
    Ok(())
}

pub fn heal(data: &Path, from: Option<&str>, to: Option<&str>) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    if let Some(t) = to {
        files.node(t)?;
    }
    let froms: Vec<String> = match from {
        Some(f) => vec![f.to_string()],
        None => files.node_ids(),
    };
    let body = json!({ "to": to });
    let mut unreachable = Vec::new();
    for f in froms.iter().filter(|f| Some(f.as_str()) != to) {
        let api = files.api(f)?;
        match api.post("/api/v1/faults/heal", &body) {
            Ok(r) => {
                client::ok(r)?;
            }
            // A node that is down has no faults to heal (they live in its memory).
            Err(_) if from.is_none() => unreachable.push(f.clone()),
            Err(e) => return Err(e),
        }
    }
    match (from, to) {
        (Some(f), Some(t)) => println!("healed: replication from {f} to {t}"),
        (Some(f), None) => println!("healed: every replication fault on {f}"),
        (None, Some(t)) => println!("healed: replication to {t} from every node"),
        (None, None) => println!("healed: every replication fault"),
    }
    if !unreachable.is_empty() {
        println!("(not running, nothing to heal: {})", unreachable.join(", "));
    }
    Ok(())
}

pub fn corrupt(
    data: &Path,
    node: &str,
    volume: &str,
    lba: u64,
    target: &str,
) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    let r = client::ok(files.api(node)?.post(
        "/api/v1/faults/corrupt",
        &json!({ "volume": volume, "lba": lba, "target": target }),
    )?)?;
    println!(
        "{node}: {target} page {} of {volume} corrupted on disk ({} at offset {}); the node now sees it {}",
        r["page"],
        r["file"].as_str().unwrap_or("?"),
        r["offset"],
        if r["damaged"] == true { "damaged" } else { "intact (unchanged bytes?)" }
    );
    Ok(())
}

pub fn eio(data: &Path, node: &str, volume: &str, lba: u64) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    let r = client::ok(files.api(node)?.post(
        "/api/v1/faults/eio",
        &json!({ "volume": volume, "lba": lba }),
    )?)?;
    println!(
        "{node}: reads of slice page {} of {volume} now fail with EIO (until `lazarus fault heal`); the node sees it {}",
        r["page"],
        if r["damaged"] == true { "damaged" } else { "intact" }
    );
    Ok(())
}

pub fn device(data: &Path, node: &str, fail: bool) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    client::ok(
        files
            .api(node)?
            .post("/api/v1/faults/device", &json!({ "failed": fail }))?,
    )?;
    if fail {
        println!("{node}: device failed: every I/O of its block store now fails with EIO (until `lazarus fault device --node {node} heal`)");
    } else {
        println!("{node}: device healed");
    }
    Ok(())
}

pub fn metadata(data: &Path, node: &str, fail: bool) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    client::ok(
        files
            .api(node)?
            .post("/api/v1/faults/metadata", &json!({ "failed": fail }))?,
    )?;
    if fail {
        println!("{node}: every write of its cluster-metadata store now fails: at its next metadata write Raft stops and the node exits to be restarted");
    } else {
        println!("{node}: metadata store healed");
    }
    Ok(())
}

pub fn isolate(data: &Path, node: &str, recovery_server: bool) -> anyhow::Result<()> {
    let files = ClusterFiles::load(data)?;
    client::ok(files.api(node)?.post(
        "/api/v1/faults/isolate",
        &json!({ "isolated": true, "recovery_server": recovery_server }),
    )?)?;
    if recovery_server {
        println!("{node}: cut from the recovery server (its calls there fail; the other nodes still reach it) until `lazarus fault heal`");
        return Ok(());
    }
    println!("{node}: isolated from every other node (Raft and replication cut both ways; the recovery server and clients still reach it) until `lazarus fault heal`");
    Ok(())
}
