//! `lazarus node add | remove | replace`: membership changes through the admin API.
//! Against a cluster of `lazarus up` (found through its data directory) the command
//! also does the supervisor's part: it picks the new node's name and address from
//! `up`'s layout and leaves the marker files the supervisor acts on (`up.rs`: a node
//! with `ADDED` is started to join, one with `REMOVED` is stopped once forgotten).

use crate::client::{self, Api};
use crate::up::{ports, ADDED_MARKER, FORGOTTEN_MARKER, NODES_MAX, REMOVED_MARKER};
use anyhow::Context;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `node add` waits for a node of `up` to register.
const JOIN_WAIT: Duration = Duration::from_secs(90);

/// A running `lazarus up` cluster: its data directory and port layout.
struct UpCluster {
    data: PathBuf,
    port_base: u16,
    nodes: Vec<String>,
}

impl UpCluster {
    /// The `up` cluster under `data`, unless an admin URL was given.
    fn find(api: Option<&str>, data: &Path) -> anyhow::Result<Option<UpCluster>> {
        if api.is_some() {
            return Ok(None);
        }
        let p = data.join("cluster.json");
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", p.display()))?;
        let port_base = v["port_base"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| {
                format!(
                    "{} has no port_base: restart `lazarus up` with this version to add nodes",
                    p.display()
                )
            })?;
        let listed: Vec<&Value> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["role"].is_null())
            .collect();
        if listed.iter().all(|n| n["rpc"].is_null()) {
            anyhow::bail!(
                "this `lazarus up` runs a single node without cluster metadata: start it with --nodes 3 to add nodes"
            );
        }
        let nodes = listed
            .iter()
            .filter_map(|n| n["id"].as_str().map(String::from))
            .collect();
        Ok(Some(UpCluster {
            data: data.to_path_buf(),
            port_base,
            nodes,
        }))
    }

    /// The name and RPC address of node `name`, or of the next free one, for `up` to
    /// run: a name whose directory does not exist yet (ids are never used again), with
    /// no gap after the nodes there are; or one already added whose start is pending.
    fn choose(&self, name: Option<&str>) -> anyhow::Result<(String, String)> {
        let dir = |i: usize| self.data.join(format!("n{i}"));
        let next = (1..=NODES_MAX)
            .find(|&i| !dir(i).exists())
            .with_context(|| {
                format!("`lazarus up` runs at most {NODES_MAX} nodes and every name is taken (ids are never used again)")
            });
        let i = match name {
            None => next?,
            Some(n) => {
                let i: usize = n
                    .strip_prefix('n')
                    .and_then(|d| d.parse().ok())
                    .filter(|i| (1..=NODES_MAX).contains(i) && format!("n{i}") == n)
                    .with_context(|| {
                        format!("a node of `lazarus up` is named n1 to n{NODES_MAX} (got {n:?})")
                    })?;
                let d = dir(i);
                let pending = d.join(ADDED_MARKER).exists()
                    && !d.join(REMOVED_MARKER).exists()
                    && !d.join(FORGOTTEN_MARKER).exists();
                if d.exists() && !pending {
                    anyhow::bail!(
                        "{} already holds node {n}'s data: it is a member, or was removed (ids are never used again)",
                        d.display()
                    );
                }
                if !d.exists() && next.as_ref().is_ok_and(|&f| i > f) {
                    anyhow::bail!(
                        "the next node of this `lazarus up` is n{} (names leave no gap)",
                        next.unwrap_or(0)
                    );
                }
                i
            }
        };
        let rpc = format!("127.0.0.1:{}", ports(self.port_base, i - 1).2);
        Ok((format!("n{i}"), rpc))
    }

    /// Has the supervisor start `name` (once the cluster has it as a node being added).
    fn mark_added(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.data.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join(ADDED_MARKER), b"")
            .with_context(|| format!("cannot write {}", dir.join(ADDED_MARKER).display()))
    }

    fn mark_removed(&self, node: &str, removed: bool) -> anyhow::Result<()> {
        let marker = self.data.join(node).join(REMOVED_MARKER);
        if removed {
            std::fs::write(&marker, b"")
                .with_context(|| format!("cannot write {}", marker.display()))
        } else {
            match std::fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("cannot remove {}", marker.display()))
                }
                _ => Ok(()),
            }
        }
    }
}

/// The `up` cluster under `data` (unless an admin URL was given) and the admin API to
/// ask.
fn connect(api_url: Option<&str>, data: &Path) -> anyhow::Result<(Option<UpCluster>, Api)> {
    Ok((
        UpCluster::find(api_url, data)?,
        Api::discover(api_url, data)?,
    ))
}

/// Waits until `name` is registered in the metadata; what it is in the Raft group.
fn wait_joined(api: &Api, name: &str) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        if let Ok((200, v)) = api.get("/api/v1/cluster") {
            let id = v["metadata"]["nodes"]
                .as_object()
                .into_iter()
                .flatten()
                .find(|(_, n)| n["name"] == name)
                .and_then(|(id, _)| id.parse::<u64>().ok());
            if let Some(id) = id {
                let voter = v["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|x| x.as_u64() == Some(id)));
                return Ok(if voter { "a voter" } else { "a learner" }.to_string());
            }
        }
        if t0.elapsed() > JOIN_WAIT {
            anyhow::bail!(
                "{name} has not registered within {JOIN_WAIT:?}: is it running, with `join = true`, and can the members reach its RPC address? (see its log)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn add(
    name: Option<String>,
    rpc: Option<String>,
    api_url: Option<&str>,
    data: &Path,
) -> anyhow::Result<()> {
    let (up, api) = connect(api_url, data)?;
    let (name, rpc) = match &up {
        Some(up) => {
            if rpc.is_some() {
                anyhow::bail!("--rpc is chosen by `lazarus up` for its nodes; give it with --api only");
            }
            up.choose(name.as_deref())?
        }
        None => match (name, rpc) {
            (Some(n), Some(r)) => (n, r),
            _ => anyhow::bail!(
                "`lazarus node add NAME --rpc HOST:PORT --api URL`: start the node first with `join = true` in its configuration (a `lazarus up` cluster needs neither)"
            ),
        },
    };
    let v = client::ok(api.post("/api/v1/nodes", &json!({ "name": name, "rpc": rpc }))?)?;
    if let Some(up) = &up {
        up.mark_added(&name)?;
        println!("{name} is being added; `lazarus up` starts it at {rpc}");
    } else {
        println!("{}", v["message"].as_str().unwrap_or("added"));
    }
    if up.is_some() {
        let what = wait_joined(&api, &name)?;
        println!("{name} joined the cluster as {what}; new volumes and rebuilt copies use it");
    }
    Ok(())
}

pub fn remove(node: &str, cancel: bool, api_url: Option<&str>, data: &Path) -> anyhow::Result<()> {
    let (up, api) = connect(api_url, data)?;
    let v = client::ok(api.post(
        &format!("/api/v1/nodes/{node}/remove"),
        &json!({ "cancel": cancel }),
    )?)?;
    // A node of `up` (one being added, too: its join is cancelled).
    if let Some(up) = up.filter(|u| {
        u.nodes.iter().any(|n| n == node) || u.data.join(node).join(ADDED_MARKER).exists()
    }) {
        up.mark_removed(node, !cancel)?;
    }
    println!("{}", v["message"].as_str().unwrap_or("done"));
    Ok(())
}

pub fn replace(
    node: &str,
    with: &str,
    rpc: Option<String>,
    api_url: Option<&str>,
    data: &Path,
) -> anyhow::Result<()> {
    let (up, api) = connect(api_url, data)?;
    let rpc = match &up {
        Some(up) if !up.nodes.iter().any(|n| n == with) => Some(up.choose(Some(with))?.1),
        Some(_) => None,
        None => rpc,
    };
    let mut body = json!({ "with": with });
    if let Some(r) = &rpc {
        body["rpc"] = json!(r);
    }
    let v = client::ok(api.post(&format!("/api/v1/nodes/{node}/replace"), &body)?)?;
    if let Some(up) = up.as_ref().filter(|_| rpc.is_some()) {
        up.mark_added(with)?;
    }
    if let Some(up) = up.as_ref().filter(|u| u.nodes.iter().any(|n| n == node)) {
        up.mark_removed(node, true)?;
    }
    println!("{}", v["message"].as_str().unwrap_or("done"));
    if up.is_some() && rpc.is_some() {
        let what = wait_joined(&api, with)?;
        println!("{with} joined the cluster as {what}");
    }
    Ok(())
}

/// How long `volume primary` waits for the role to move.
const PRIMARY_WAIT: Duration = Duration::from_secs(120);

/// `lazarus volume primary VOLUME nX [--cancel]`: asks the leader to hand the primary
/// role over, and (`wait`) waits until the metadata names nX.
pub fn want_primary(
    api: &Api,
    volume: &str,
    node: Option<&str>,
    cancel: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let v = client::ok(api.post(
        &format!("/api/v1/volumes/{volume}/primary"),
        &json!({ "node": node, "cancel": cancel }),
    )?)?;
    println!("{}", v["message"].as_str().unwrap_or("done"));
    let Some(want) = v["wanted"].as_u64() else {
        return Ok(());
    };
    if !wait {
        return Ok(());
    }
    let t0 = Instant::now();
    loop {
        if let Ok((200, c)) = api.get("/api/v1/cluster") {
            let meta = &c["metadata"]["volumes"][volume];
            if meta["primary"].as_u64() == Some(want) {
                println!(
                    "n{want} is the primary of {volume} (epoch {})",
                    meta["epoch"]
                );
                return Ok(());
            }
        }
        if t0.elapsed() > PRIMARY_WAIT {
            anyhow::bail!(
                "n{want} is not the primary of {volume} after {PRIMARY_WAIT:?} (its copy not live yet? see lazarus status); the request stands (--cancel withdraws it)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long `rebalance --wait` waits at most.
const REBALANCE_WAIT: Duration = Duration::from_secs(24 * 3600);

pub fn rebalance(
    cancel: bool,
    wait: bool,
    api_url: Option<&str>,
    data: &Path,
) -> anyhow::Result<()> {
    let api = Api::discover(api_url, data)?;
    let v = client::ok(api.post("/api/v1/rebalance", &json!({ "cancel": cancel }))?)?;
    println!("{}", v["message"].as_str().unwrap_or("done"));
    if !wait || cancel {
        return Ok(());
    }
    let t0 = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    loop {
        if let Ok((200, c)) = api.get("/api/v1/cluster") {
            let m = &c["metadata"];
            for (vol, from) in m["moving"].as_object().into_iter().flatten() {
                if seen.insert((vol.clone(), from.to_string())) {
                    let to = m["volumes"][vol.as_str()]["replicas"]
                        .as_array()
                        .and_then(|r| r.last())
                        .map_or("?".to_string(), |n| n.to_string());
                    println!("moving {vol}'s copy from n{from} to n{to}");
                }
            }
            let moving = m["moving"].as_object().is_some_and(|x| !x.is_empty());
            if m["rebalancing"] != true && !moving {
                let mut held = std::collections::BTreeMap::<u64, usize>::new();
                for (id, _) in m["nodes"].as_object().into_iter().flatten() {
                    held.insert(id.parse().unwrap_or(0), 0);
                }
                for v in m["volumes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(_, v)| v)
                {
                    for n in v["replicas"].as_array().into_iter().flatten() {
                        *held.entry(n.as_u64().unwrap_or(0)).or_default() += 1;
                    }
                }
                let shares: Vec<String> = held.iter().map(|(n, k)| format!("n{n}: {k}")).collect();
                println!(
                    "rebalanced after {} moves: copies per node {}",
                    seen.len(),
                    shares.join(", ")
                );
                return Ok(());
            }
        }
        if t0.elapsed() > REBALANCE_WAIT {
            anyhow::bail!("the rebalance has not finished within {REBALANCE_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
