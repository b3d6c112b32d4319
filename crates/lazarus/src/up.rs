//! `lazarus up`: the embedded default. Starts the node processes of a local cluster
//! (three by default, each a Raft voter holding a copy of every volume) under one
//! supervisor, creates the default volume with n1 as its primary, prints where to
//! connect, restarts a node that crashed, leaves alone a node stopped with
//! `lazarus fault kill` until `lazarus fault revive`, and stops everything cleanly on
//! Ctrl-C.
//!
//! The supervisor and the fault commands talk through files in the data directory:
//! `cluster.json` (written by the supervisor: nodes, addresses, pids, up/down) and
//! `nX/KILLED` (present while node X is held down by `fault kill`).

use crate::client::{self, Api};
use anyhow::Context;
use lazarus_node::config::{Endpoints, NbdTlsMode, NodeConfig, PeerConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The supervisor's messages to its standard error. Unlike `eprintln!`, a failed write
/// (standard error redirected to a full disk, a closed pipe) loses the message and
/// does not panic: the supervisor keeps every node running whatever happens to its log.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// How long a node may take to recover its store and bind its ports.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long stopping waits for a node's final checkpoint before SIGKILL.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the cluster may take to elect a leader and register every node.
const CLUSTER_FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `up` waits for every copy to be live before it reports ready anyway.
const COPIES_LIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// A node that crashes (or fails to start) more often than this within `crash_window()`
/// is left down until the window has passed over its crashes, then started again: at
/// most this many restarts a window, however long the cause lasts (a full disk, say),
/// and no operator needed once it is gone.
const CRASH_RESTARTS_MAX: usize = 5;
const CRASH_WINDOW_DEFAULT: Duration = Duration::from_secs(60);

/// `CRASH_WINDOW_DEFAULT`, or `LAZARUS_CRASH_WINDOW_SECS` (tests shorten it).
fn crash_window() -> Duration {
    std::env::var("LAZARUS_CRASH_WINDOW_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(CRASH_WINDOW_DEFAULT, Duration::from_secs)
}
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_VOLUME: &str = "vol0";
/// The username of the PSK `up` makes for NBD over TLS.
pub const NBD_PSK_USER: &str = "lazarus";
/// Marker file: the node is held down by `lazarus fault kill`.
pub const KILLED_MARKER: &str = "KILLED";
/// Marker file: the node was added to the running cluster (`lazarus node add`); `up`
/// starts it (it joins, rather than starting a cluster of its own), now and at every
/// later start.
pub const ADDED_MARKER: &str = "ADDED";
/// Marker file: the node was removed (`lazarus node remove`); the supervisor stops it
/// for good once the cluster has forgotten it.
pub const REMOVED_MARKER: &str = "REMOVED";
/// Marker file: the cluster has forgotten the removed node; it is never started again.
pub const FORGOTTEN_MARKER: &str = "FORGOTTEN";
/// The most nodes `up` runs (its port layout has room for nine).
pub const NODES_MAX: usize = 9;

/// Node index (0-based) of an `up` node id ("n3" -> 2).
fn node_index(id: &str) -> Option<usize> {
    let i: usize = id.strip_prefix('n')?.parse().ok()?;
    (1..=NODES_MAX).contains(&i).then(|| i - 1)
}

/// How many nodes `up` runs: those it was asked for, and any added since.
fn node_count(args: &UpArgs) -> usize {
    (1..=NODES_MAX)
        .filter(|i| args.data.join(format!("n{i}")).join(ADDED_MARKER).exists())
        .max()
        .unwrap_or(0)
        .max(args.nodes)
}

pub struct UpArgs {
    pub data: PathBuf,
    pub port_base: u16,
    pub volume_size: u64,
    /// Each node's `page_cache_bytes`.
    pub page_cache_bytes: u64,
    pub nodes: usize,
    pub log_level: Option<String>,
    pub jeopardy_policy: lazarus_node::config::JeopardyPolicy,
    pub jeopardy_suspend_secs: u64,
    /// A node silent this long is marked out; its copies are rebuilt elsewhere.
    pub out_after_secs: u64,
    /// Most MiB/s a resync fetches (0: no limit).
    pub resync_max_mib_s: u64,
    /// Start a recovery server beside the nodes (clusters only).
    pub recovery_server: bool,
    /// Mutual TLS between the members (off only to measure its cost).
    pub cluster_tls: bool,
    /// NBD over TLS on every node (credentials in `nbd_tls_dir`).
    pub nbd_tls: lazarus_node::config::NbdTlsMode,
}

/// Where `up` keeps its NBD TLS credentials (made at the first start).
pub fn nbd_tls_dir(data: &Path) -> PathBuf {
    data.join("nbd-tls")
}

/// Port layout of node `i` (0-based).
pub fn ports(base: u16, i: usize) -> (u16, u16, u16) {
    let i = i as u16;
    (base + i, base + 10 + i, base + 20 + i)
}

/// The recovery server's id (its slot and data subdirectory) and port.
pub const RECOVERY_ID: &str = "rs";

pub fn recovery_port(base: u16) -> u16 {
    base + 30
}

struct Slot {
    id: String,
    child: Option<Child>,
    log: PathBuf,
    ep: Option<Endpoints>,
    crashes: Vec<Instant>,
    /// Held down for crashing too often (said once per hold).
    gave_up: bool,
}

impl Slot {
    fn new(args: &UpArgs, id: String) -> Slot {
        Slot {
            log: args.data.join(&id).join(if id == RECOVERY_ID {
                "recovery.log"
            } else {
                "node.log"
            }),
            id,
            child: None,
            ep: None,
            crashes: Vec::new(),
            gave_up: false,
        }
    }

    /// Records a crash or a failed start; says so when it puts the node on hold.
    fn crashed(&mut self) {
        let window = crash_window();
        self.crashes.retain(|t| t.elapsed() < window);
        self.crashes.push(Instant::now());
        if self.crashes.len() > CRASH_RESTARTS_MAX && !self.gave_up {
            say!(
                "node {} crashed or failed to start {} times within {window:?}; it is started again once that long has passed without a failure (`lazarus fault revive --node {}` starts it at once)",
                self.id,
                self.crashes.len(),
                self.id
            );
            self.gave_up = true;
        }
    }

    /// Whether the node waits out its crashes before the next start.
    fn crash_hold(&mut self) -> bool {
        let window = crash_window();
        self.crashes.retain(|t| t.elapsed() < window);
        self.crashes.len() > CRASH_RESTARTS_MAX
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Node `i`'s configuration in a cluster of `nodes`.
fn node_config(args: &UpArgs, i: usize, nodes: usize) -> anyhow::Result<NodeConfig> {
    let id = format!("n{}", i + 1);
    let (nbd, admin, rpc) = ports(args.port_base, i);
    let clustered = nodes > 1;
    Ok(NodeConfig {
        id: id.clone(),
        data_dir: args.data.join(&id),
        nbd_listen: format!("127.0.0.1:{nbd}").parse()?,
        admin_listen: format!("127.0.0.1:{admin}").parse()?,
        journal_bytes: 64 << 20,
        page_cache_bytes: args.page_cache_bytes,
        checkpoint_interval_secs: 30,
        rpc_listen: if clustered {
            Some(format!("127.0.0.1:{rpc}").parse()?)
        } else {
            None
        },
        peers: if clustered {
            (0..nodes)
                .filter(|j| *j != i)
                .map(|j| PeerConfig {
                    id: format!("n{}", j + 1),
                    rpc: format!("127.0.0.1:{}", ports(args.port_base, j).2),
                })
                .collect()
        } else {
            Vec::new()
        },
        join: args.data.join(&id).join(ADDED_MARKER).exists(),
        admin_token: None,
        admin_token_file: Some(args.data.join(lazarus_server::admin::TOKEN_FILE)),
        // A local cluster to try things on: `lazarus fault` works against it.
        faults: true,
        recovery_server: (clustered && args.recovery_server)
            .then(|| format!("127.0.0.1:{}", recovery_port(args.port_base))),
        jeopardy_policy: args.jeopardy_policy,
        jeopardy_suspend_secs: args.jeopardy_suspend_secs,
        failures_max: 3,
        failure_window_minutes: 10,
        out_after_secs: args.out_after_secs,
        resync_max_mib_s: args.resync_max_mib_s,
        cluster_tls: (clustered && args.cluster_tls).then(|| certs_dir(args).join(&id)),
        nbd_tls: args.nbd_tls,
        nbd_tls_certificates: (args.nbd_tls != NbdTlsMode::Off)
            .then(|| nbd_tls_dir(&args.data).join("server")),
        nbd_tls_verify_peer: true,
        nbd_tls_psk: (args.nbd_tls != NbdTlsMode::Off)
            .then(|| nbd_tls_dir(&args.data).join(lazarus_server::nbd_tls::PSK_FILE)),
    })
}

/// Where `up` keeps its cluster's credentials (made at the first start).
fn certs_dir(args: &UpArgs) -> PathBuf {
    args.data.join("certs")
}

/// Starts the recovery server (slot `args.nodes`) and waits until it listens.
async fn start_recovery_server(args: &UpArgs) -> anyhow::Result<(Child, Endpoints)> {
    let dir = args.data.join(RECOVERY_ID);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let log = dir.join("recovery.log");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let exe = node_exe()?;
    let addr = format!("127.0.0.1:{}", recovery_port(args.port_base));
    let mut cmd = Command::new(exe);
    cmd.arg("recovery-server")
        .arg("--data")
        .arg(&dir)
        .arg("--listen")
        .arg(&addr)
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .env(
            lazarus_server::node::SUPERVISOR_PID_ENV,
            std::process::id().to_string(),
        )
        .kill_on_drop(true);
    if let Some(l) = &args.log_level {
        cmd.arg("--log-level").arg(l);
    }
    if args.cluster_tls {
        cmd.arg("--cluster-tls")
            .arg(certs_dir(args).join(RECOVERY_ID));
    }
    let mut child = cmd.spawn().context("cannot start the recovery server")?;
    let pid = child.id().unwrap_or(0);
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the recovery server exited during start-up ({status}); last lines of {}:\n{}",
                log.display(),
                log_tail(&log)
            );
        }
        if std::net::TcpStream::connect(&addr).is_ok() {
            let ep = Endpoints {
                id: RECOVERY_ID.into(),
                pid,
                nbd: addr.parse()?,
                admin: addr.parse()?,
            };
            lazarus_store::disk::write_file_atomic(
                &dir.join("endpoints.json"),
                &serde_json::to_vec(&ep)?,
            )?;
            return Ok((child, ep));
        }
        if t0.elapsed() > NODE_START_TIMEOUT {
            anyhow::bail!("the recovery server did not start; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts node `id` of a cluster of `nodes` (or the recovery server) and waits until it
/// has bound its listeners.
async fn start_node(args: &UpArgs, id: &str, nodes: usize) -> anyhow::Result<(Child, Endpoints)> {
    let Some(i) = node_index(id) else {
        return start_recovery_server(args).await;
    };
    let cfg = node_config(args, i, nodes)?;
    let dir = cfg.data_dir.clone();
    let id = cfg.id.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg_path = dir.join("node.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg)?)
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let log = dir.join("node.log");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let exe = node_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(&cfg_path)
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .env(
            lazarus_server::node::SUPERVISOR_PID_ENV,
            std::process::id().to_string(),
        )
        .kill_on_drop(true);
    if let Some(l) = &args.log_level {
        cmd.arg("--log-level").arg(l);
    }
    let mut child = cmd.spawn().context("cannot start a node process")?;
    let pid = child.id().unwrap_or(0);
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "node {id} exited during start-up ({status}); last lines of {}:\n{}",
                log.display(),
                log_tail(&log)
            );
        }
        if let Ok(text) = std::fs::read(dir.join("endpoints.json")) {
            if let Ok(ep) = serde_json::from_slice::<Endpoints>(&text) {
                if ep.pid == pid {
                    return Ok((child, ep));
                }
            }
        }
        if t0.elapsed() > NODE_START_TIMEOUT {
            anyhow::bail!(
                "node {id} did not start within {NODE_START_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_all(slots: &mut [Slot]) {
    for s in slots.iter() {
        if let Some(pid) = s.child.as_ref().and_then(|c| c.id()) {
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for s in slots.iter_mut() {
        let Some(child) = s.child.as_mut() else {
            continue;
        };
        match tokio::time::timeout(NODE_STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(st)) => say!("node {} stopped ({st})", s.id),
            _ => {
                say!("node {} did not stop in time; killing it", s.id);
                let _ = child.kill().await;
            }
        }
        s.child = None;
    }
}

fn write_cluster_json(args: &UpArgs, slots: &[Slot]) -> anyhow::Result<()> {
    let cluster = json!({
        "nodes": slots.iter().map(|s| {
            let Some(i) = node_index(&s.id) else {
                return json!({
                    "id": s.id,
                    "role": "recovery-server",
                    "rpc": format!("127.0.0.1:{}", recovery_port(args.port_base)),
                    "pid": s.ep.as_ref().filter(|_| s.child.is_some()).map(|e| e.pid),
                    "up": s.child.is_some(),
                    "held_down": args.data.join(&s.id).join(KILLED_MARKER).exists(),
                });
            };
            let (nbd, admin, rpc) = ports(args.port_base, i);
            json!({
                "id": s.id,
                "nbd": format!("127.0.0.1:{nbd}"),
                "admin": format!("127.0.0.1:{admin}"),
                "rpc": if args.nodes > 1 { json!(format!("127.0.0.1:{rpc}")) } else { json!(null) },
                "pid": s.ep.as_ref().filter(|_| s.child.is_some()).map(|e| e.pid),
                "up": s.child.is_some(),
                "held_down": args.data.join(&s.id).join(KILLED_MARKER).exists(),
                "removed": is_removed(args, &s.id),
            })
        }).collect::<Vec<_>>(),
        "port_base": args.port_base,
        "supervisor_pid": std::process::id(),
    });
    lazarus_store::disk::write_file_atomic(
        &args.data.join("cluster.json"),
        &serde_json::to_vec_pretty(&cluster)?,
    )?;
    Ok(())
}

/// Waits until the Raft cluster has a leader and every node is registered.
fn wait_cluster_formed(api: &Api, nodes: usize) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok((200, v)) = api.get("/api/v1/cluster") {
            let registered = v["metadata"]["nodes"].as_object().map_or(0, |m| m.len());
            if v["leader"].is_u64() && registered >= nodes {
                return Ok(());
            }
        }
        if t0.elapsed() > CLUSTER_FORM_TIMEOUT {
            anyhow::bail!("the cluster did not elect a leader and register {nodes} nodes within {CLUSTER_FORM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the cluster serves: every node has finished its start-up check, every
/// node the default volume is placed on holds its copy, every copy of every volume is live (copies
/// that missed updates while stopped resync first), and each volume's primary holds
/// its lease.
fn wait_copies_live(apis: &[(usize, Api)]) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let mut pending = Vec::new();
        let mut views = Vec::new();
        for (n, api) in apis {
            match api.get("/api/v1/cluster") {
                Ok((200, v)) if v["ready"] == true => views.push(v),
                _ => pending.push(format!("n{n} not ready")),
            }
        }
        if let Some(v) = views.first() {
            for (name, vol) in v["metadata"]["volumes"].as_object().into_iter().flatten() {
                for (n, st) in vol["states"].as_object().into_iter().flatten() {
                    if st != "live" {
                        pending.push(format!("{name} on n{n} is {}", st.as_str().unwrap_or("?")));
                    }
                }
                // Each node the default volume is placed on holds its copy.
                let placed = vol["replicas"].as_array().into_iter().flatten();
                for n in placed.filter_map(|n| n.as_u64()) {
                    if name != DEFAULT_VOLUME {
                        break;
                    }
                    let api = apis.iter().find(|(i, _)| *i as u64 == n).map(|(_, a)| a);
                    let here = api.is_some_and(|a| {
                        matches!(a.get(&format!("/api/v1/volumes/{name}")), Ok((200, _)))
                    });
                    if !here {
                        pending.push(format!("{DEFAULT_VOLUME} not yet on n{n}"));
                    }
                }
                let primary = vol["primary"].as_u64().unwrap_or(0);
                let leased = views.iter().any(|w| {
                    w["id"].as_u64() == Some(primary)
                        && w["leases"]
                            .as_array()
                            .is_some_and(|l| l.iter().any(|x| x == name.as_str()))
                });
                if !leased {
                    pending.push(format!("{name}: primary n{primary} holds no lease yet"));
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > COPIES_LIVE_TIMEOUT {
            anyhow::bail!("the cluster is not fully ready: {}", pending.join(", "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn ensure_default_volume(args: &UpArgs, api: Api) -> anyhow::Result<String> {
    let size = args.volume_size;
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let (code, v) = api.get(&format!("/api/v1/volumes/{DEFAULT_VOLUME}"))?;
        if code == 404 {
            client::ok(api.post(
                "/api/v1/volumes",
                &json!({ "name": DEFAULT_VOLUME, "size": size }),
            )?)?;
            return Ok(format!("created volume {DEFAULT_VOLUME} ({size} bytes)"));
        }
        let v = client::ok((code, v))?;
        Ok(format!(
            "resumed volume {DEFAULT_VOLUME} ({} bytes)",
            v["size_bytes"]
        ))
    })
    .await?
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.port_base < 1024 || args.port_base > 65000 {
        anyhow::bail!(
            "--port-base must be between 1024 and 65000 (got {})",
            args.port_base
        );
    }
    if args.nodes == 0 || args.nodes > 9 {
        anyhow::bail!("--nodes must be between 1 and 9 (got {})", args.nodes);
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    // The cluster's files (volumes' bytes, keys, the admin token) are its user's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&args.data, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", args.data.display()))?;
    }
    let data = std::fs::canonicalize(&args.data)?;
    let args = UpArgs { data, ..args };
    let args = UpArgs {
        nodes: node_count(&args),
        ..args
    };
    let _lock = lazarus_server::node::lock_data_dir(&args.data).map_err(|_| {
        anyhow::anyhow!(
            "a `lazarus up` is already running on {}",
            args.data.display()
        )
    })?;
    let with_rs = args.nodes > 1 && args.recovery_server;
    if args.nodes > 1 && args.cluster_tls {
        // Mutual TLS between the members: a CA and a credential per member, once.
        let members: Vec<String> = (1..=args.nodes)
            .map(|i| format!("n{i}"))
            .chain(with_rs.then(|| RECOVERY_ID.to_string()))
            .collect();
        lazarus_rpc::tls::generate(&certs_dir(&args), &members)
            .map_err(|e| anyhow::anyhow!("cluster credentials: {e}"))?;
    }
    // The admin token: every request to the nodes' admin APIs carries it (the CLI
    // reads it from here); other local users cannot read the file.
    let token_file = args.data.join(lazarus_server::admin::TOKEN_FILE);
    lazarus_server::admin::ensure_token_file(&token_file)
        .map_err(|e| anyhow::anyhow!("admin token: {e}"))?;
    crate::client::use_token_of(&args.data);
    if args.nbd_tls != NbdTlsMode::Off {
        lazarus_server::nbd_tls::generate(&nbd_tls_dir(&args.data), &[], NBD_PSK_USER)
            .map_err(|e| anyhow::anyhow!("NBD TLS credentials: {e}"))?;
    }
    let mut slots: Vec<Slot> = (0..args.nodes + with_rs as usize)
        .map(|i| {
            let id = if i == args.nodes {
                RECOVERY_ID.to_string()
            } else {
                format!("n{}", i + 1)
            };
            // A fresh `up` starts every node: a hold from an earlier run is over.
            let _ = std::fs::remove_file(args.data.join(&id).join(KILLED_MARKER));
            Slot::new(&args, id)
        })
        .collect();
    // The recovery server first (the nodes ask it at once), then every node before
    // waiting on any: a Raft member alone cannot elect. A removed node is not started.
    for i in (0..slots.len())
        .rev()
        .take(with_rs as usize)
        .chain(0..args.nodes)
    {
        if is_gone(&args, &slots[i].id) {
            continue;
        }
        match start_node(&args, &slots[i].id, args.nodes).await {
            Ok((child, ep)) => {
                slots[i].child = Some(child);
                slots[i].ep = Some(ep);
            }
            Err(e) => {
                stop_all(&mut slots).await;
                return Err(e);
            }
        }
    }
    // The nodes clients and the CLI use: not removed. A removed node the cluster has
    // not forgotten yet runs on (it may still hold copies being moved).
    let serving: Vec<usize> = (0..args.nodes)
        .filter(|i| !is_removed(&args, &format!("n{}", i + 1)))
        .collect();
    let members = (0..args.nodes)
        .filter(|i| !is_gone(&args, &format!("n{}", i + 1)))
        .count();
    let Some(&first) = serving.first() else {
        stop_all(&mut slots).await;
        anyhow::bail!(
            "every node under {} was removed (lazarus node remove)",
            args.data.display()
        );
    };
    let admin0 = format!("http://127.0.0.1:{}", ports(args.port_base, first).1);
    let ready = async {
        if args.nodes > 1 {
            let (api, n) = (Api::new(&admin0), members);
            tokio::task::spawn_blocking(move || wait_cluster_formed(&api, n)).await??;
        }
        ensure_default_volume(&args, Api::new(&admin0)).await
    };
    let msg = match ready.await {
        Ok(m) => m,
        Err(e) => {
            stop_all(&mut slots).await;
            return Err(e);
        }
    };
    write_cluster_json(&args, &slots)?;
    if args.nodes > 1 {
        let apis: Vec<(usize, Api)> = serving
            .iter()
            .map(|&i| {
                let admin = format!("http://127.0.0.1:{}", ports(args.port_base, i).1);
                (i + 1, Api::new(&admin))
            })
            .collect();
        let healthy = tokio::task::spawn_blocking(move || wait_copies_live(&apis)).await?;
        if let Err(e) = healthy {
            say!("warning: {e:#}");
        }
    }
    println!(
        "Lazarus is up: {} node(s), data in {}",
        serving.len(),
        args.data.display()
    );
    println!("{msg}");
    let tls_dir = nbd_tls_dir(&args.data);
    let x509 = format!("?tls-certificates={}", tls_dir.join("client").display());
    for &i in &serving {
        let port = ports(args.port_base, i).0;
        if args.nbd_tls == NbdTlsMode::Require {
            println!("nbds://127.0.0.1:{port}/{DEFAULT_VOLUME}{x509}");
        } else {
            println!("nbd://127.0.0.1:{port}/{DEFAULT_VOLUME}");
        }
    }
    if args.nbd_tls != NbdTlsMode::Off {
        let port = ports(args.port_base, 0).0;
        println!(
            "NBD over TLS {}: X.509 nbds://127.0.0.1:{port}/{DEFAULT_VOLUME}{x509}   PSK nbds://{NBD_PSK_USER}@127.0.0.1:{port}/{DEFAULT_VOLUME}?tls-psk-file={}",
            if args.nbd_tls == NbdTlsMode::Require {
                "required"
            } else {
                "offered"
            },
            tls_dir.join(lazarus_server::nbd_tls::PSK_FILE).display(),
        );
    }
    for s in slots.iter().filter(|s| !is_removed(&args, &s.id)) {
        let Some(i) = node_index(&s.id) else {
            println!(
                "recovery server: 127.0.0.1:{}   log: {}",
                recovery_port(args.port_base),
                s.log.display()
            );
            continue;
        };
        println!(
            "node {} admin: http://127.0.0.1:{}/api/v1/status   log: {}",
            s.id,
            ports(args.port_base, i).1,
            s.log.display()
        );
    }
    println!(
        "Dashboard: http://127.0.0.1:{}/#token={}   (any node's admin address serves it; the token is in {})",
        ports(args.port_base, first).1,
        lazarus_server::admin::read_token_file(&token_file).unwrap_or_default(),
        token_file.display()
    );
    println!("Status: lazarus status --data {}", args.data.display());
    println!("Press Ctrl-C to stop.");

    let result = tokio::select! {
        _ = lazarus_server::node::shutdown_signal() => Ok(()),
        r = supervise(&args, &mut slots) => r,
    };
    say!("stopping...");
    stop_all(&mut slots).await;
    let _ = std::fs::remove_file(args.data.join("cluster.json"));
    result
}

/// Keeps the nodes running: restarts a node that exited on its own, leaves a node
/// held down by `fault kill` alone and starts it again once the hold is lifted, starts
/// nodes added since (`lazarus node add`), and stops a removed node for good once the
/// cluster has forgotten it.
#[allow(clippy::needless_range_loop)] // slots[i] is borrowed again after start_node
async fn supervise(args: &UpArgs, slots: &mut Vec<Slot>) -> anyhow::Result<()> {
    let mut pending_json = false;
    let mut last_removal_check = Instant::now();
    loop {
        tokio::time::sleep(SUPERVISE_INTERVAL).await;
        let mut changed = false;
        // Nodes added since: a slot each, with the cluster's credentials.
        let nodes = node_count(args);
        for i in args.nodes..nodes {
            let id = format!("n{}", i + 1);
            if slots.iter().any(|s| s.id == id) || !args.data.join(&id).join(ADDED_MARKER).exists()
            {
                continue;
            }
            if args.cluster_tls {
                if let Err(e) =
                    lazarus_rpc::tls::generate(&certs_dir(args), std::slice::from_ref(&id))
                {
                    say!("node {id}: cluster credentials: {e}");
                    continue;
                }
            }
            say!("node {id} was added");
            slots.push(Slot::new(args, id));
            changed = true;
        }
        if last_removal_check.elapsed() >= REMOVAL_CHECK_INTERVAL {
            last_removal_check = Instant::now();
            changed |= stop_forgotten(args, slots).await;
        }
        for i in 0..slots.len() {
            let held = args.data.join(&slots[i].id).join(KILLED_MARKER).exists()
                || is_gone(args, &slots[i].id);
            let s = &mut slots[i];
            if let Some(child) = s.child.as_mut() {
                let Ok(Some(status)) = child.try_wait() else {
                    continue;
                };
                s.child = None;
                changed = true;
                if held {
                    say!(
                        "node {} is down (fault kill, or removed and forgotten)",
                        s.id
                    );
                    continue;
                }
                say!(
                    "node {} exited unexpectedly ({status}); last lines of {}:\n{}",
                    s.id,
                    s.log.display(),
                    log_tail(&s.log)
                );
                s.crashed();
                continue;
            }
            if held {
                continue;
            }
            if revive_requested(args, &s.id) {
                s.crashes.clear();
            } else if s.crash_hold() {
                continue;
            }
            let _ = std::fs::remove_file(args.data.join(&s.id).join("REVIVE"));
            say!("starting node {}", s.id);
            let id = s.id.clone();
            match start_node(args, &id, nodes).await {
                Ok((child, ep)) => {
                    say!("node {} is up (pid {})", slots[i].id, ep.pid);
                    slots[i].gave_up = false;
                    slots[i].child = Some(child);
                    slots[i].ep = Some(ep);
                }
                Err(e) => {
                    say!("node {} did not start: {e:#}", slots[i].id);
                    slots[i].crashed();
                }
            }
            changed = true;
        }
        // A full disk must not stop the supervisor (and with it every node): the file
        // is written again at the next change, or retried here until it is.
        if changed || pending_json {
            pending_json = match write_cluster_json(args, slots) {
                Ok(()) => false,
                Err(e) => {
                    if !pending_json {
                        say!("warning: cannot update cluster.json (retrying): {e:#}");
                    }
                    true
                }
            };
        }
    }
}

/// How often the supervisor asks whether a removed node is forgotten.
const REMOVAL_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Stops each running removed node that the cluster (asked through a node that is not
/// removed) no longer lists: it has left the Raft group and holds nothing. Whether any
/// was stopped.
async fn stop_forgotten(args: &UpArgs, slots: &mut [Slot]) -> bool {
    let removed: Vec<usize> = (0..slots.len())
        .filter(|&i| slots[i].child.is_some() && is_removed(args, &slots[i].id))
        .collect();
    if removed.is_empty() {
        return false;
    }
    let asked: Vec<String> = slots
        .iter()
        .filter(|s| s.child.is_some() && !is_removed(args, &s.id))
        .filter_map(|s| node_index(&s.id))
        .map(|i| format!("http://127.0.0.1:{}", ports(args.port_base, i).1))
        .collect();
    // The leader's own view, once it is current: a node still catching up (a new
    // learner) may not list members that exist.
    let members = tokio::task::spawn_blocking(move || {
        asked.iter().find_map(|a| {
            match Api::with_timeout(a, Duration::from_secs(2)).get("/api/v1/cluster") {
                Ok((200, v))
                    if v["leader"].is_u64() && v["leader"] == v["id"] && v["ready"] == true =>
                {
                    Some(
                        v["metadata"]["nodes"]
                            .as_object()
                            .map(|m| {
                                m.values()
                                    .filter_map(|n| n["name"].as_str().map(String::from))
                                    .collect::<Vec<_>>()
                            })
                            .unwrap_or_default(),
                    )
                }
                _ => None,
            }
        })
    })
    .await
    .ok()
    .flatten();
    let Some(members) = members else {
        return false;
    };
    let mut stopped = false;
    for i in removed {
        if members.contains(&slots[i].id) {
            continue;
        }
        let marker = args.data.join(&slots[i].id).join(FORGOTTEN_MARKER);
        if let Err(e) = std::fs::write(&marker, b"") {
            say!("cannot write {}: {e}", marker.display());
            continue;
        }
        if let Some(pid) = slots[i].child.as_ref().and_then(|c| c.id()) {
            say!(
                "node {} was removed and the cluster has forgotten it: stopping it",
                slots[i].id
            );
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            stopped = true;
        }
    }
    stopped
}

/// Whether node `id` was removed (`lazarus node remove`, not cancelled).
fn is_removed(args: &UpArgs, id: &str) -> bool {
    args.data.join(id).join(REMOVED_MARKER).exists() || is_gone(args, id)
}

/// Whether node `id` was removed and the cluster has forgotten it: never started again.
fn is_gone(args: &UpArgs, id: &str) -> bool {
    args.data.join(id).join(FORGOTTEN_MARKER).exists()
}

fn revive_requested(args: &UpArgs, id: &str) -> bool {
    args.data.join(id).join("REVIVE").exists()
}

/// The executable a node or the recovery server is started from: the path `lazarus up`
/// was started from, or, when that file has been replaced or removed since (a rebuild or
/// an upgrade under a running cluster: `current_exe` then names a deleted file), the
/// running binary itself through `/proc/self/exe`, so a restart never fails for it.
fn node_exe() -> anyhow::Result<std::path::PathBuf> {
    static STARTED_FROM: std::sync::OnceLock<Option<std::path::PathBuf>> =
        std::sync::OnceLock::new();
    let first = STARTED_FROM.get_or_init(|| std::env::current_exe().ok());
    if let Some(p) = first {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    let own = std::path::PathBuf::from("/proc/self/exe");
    if own.exists() {
        return Ok(own);
    }
    anyhow::bail!("cannot find the lazarus executable")
}
