//! `lazarus up`: the embedded default. Starts the node processes of a local cluster
//! under one supervisor, creates the default volume, prints where to connect, and
//! stops everything cleanly on Ctrl-C.

use crate::client::{self, Api};
use crate::config::{Endpoints, NodeConfig};
use anyhow::Context;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long a node may take to recover its store and bind its ports.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long stopping waits for a node's final checkpoint before SIGKILL.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_VOLUME: &str = "vol0";

pub struct UpArgs {
    pub data: PathBuf,
    pub port_base: u16,
    pub volume_size: u64,
    pub nodes: usize,
    pub log_level: Option<String>,
}

struct Running {
    id: String,
    child: Child,
    log: PathBuf,
    ep: Endpoints,
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn start_node(args: &UpArgs, i: usize) -> anyhow::Result<Running> {
    let id = format!("n{}", i + 1);
    let dir = args.data.join(&id);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let nbd_port = args.port_base + i as u16;
    let admin_port = args.port_base + 10 + i as u16;
    let cfg = NodeConfig {
        id: id.clone(),
        data_dir: dir.clone(),
        nbd_listen: format!("127.0.0.1:{nbd_port}").parse()?,
        admin_listen: format!("127.0.0.1:{admin_port}").parse()?,
        journal_bytes: 64 << 20,
        checkpoint_interval_secs: 30,
        rpc_listen: None,
        peers: Vec::new(),
    };
    let cfg_path = dir.join("node.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg)?)
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let log = dir.join("node.log");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let exe = std::env::current_exe().context("cannot find the lazarus executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(&cfg_path)
        .stdout(logf.try_clone()?)
        .stderr(logf)
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
                    return Ok(Running { id, child, log, ep });
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

async fn stop_all(nodes: &mut [Running]) {
    for n in nodes.iter() {
        if let Some(pid) = n.child.id() {
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for n in nodes.iter_mut() {
        match tokio::time::timeout(NODE_STOP_TIMEOUT, n.child.wait()).await {
            Ok(Ok(s)) => eprintln!("node {} stopped ({s})", n.id),
            _ => {
                eprintln!("node {} did not stop in time; killing it", n.id);
                let _ = n.child.kill().await;
            }
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.port_base < 1024 || args.port_base > 65000 {
        anyhow::bail!(
            "--port-base must be between 1024 and 65000 (got {})",
            args.port_base
        );
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    let data = std::fs::canonicalize(&args.data)?;
    let args = UpArgs { data, ..args };
    let _lock = crate::node::lock_data_dir(&args.data).map_err(|_| {
        anyhow::anyhow!(
            "a `lazarus up` is already running on {}",
            args.data.display()
        )
    })?;
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        match start_node(&args, i).await {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes).await;
                return Err(e);
            }
        }
    }
    let api = Api::new(&format!("http://{}", nodes[0].ep.admin));
    let volume_ready = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let (code, v) = api.get(&format!("/api/v1/volumes/{DEFAULT_VOLUME}"))?;
        if code == 404 {
            client::ok(api.post(
                "/api/v1/volumes",
                &json!({ "name": DEFAULT_VOLUME, "size": args.volume_size }),
            )?)?;
            return Ok(format!(
                "created volume {DEFAULT_VOLUME} ({} bytes)",
                args.volume_size
            ));
        }
        let v = client::ok((code, v))?;
        Ok(format!(
            "resumed volume {DEFAULT_VOLUME} ({} bytes)",
            v["size_bytes"]
        ))
    })
    .await?;
    let msg = match volume_ready {
        Ok(m) => m,
        Err(e) => {
            stop_all(&mut nodes).await;
            return Err(e);
        }
    };
    let cluster = json!({
        "nodes": nodes.iter().map(|n| json!({"id": n.id, "nbd": n.ep.nbd, "admin": n.ep.admin, "pid": n.ep.pid})).collect::<Vec<_>>(),
        "supervisor_pid": std::process::id(),
    });
    lazarus_store::disk::write_file_atomic(
        &args.data.join("cluster.json"),
        &serde_json::to_vec_pretty(&cluster)?,
    )?;
    println!(
        "Lazarus is up: {} node(s), data in {}",
        nodes.len(),
        args.data.display()
    );
    println!("{msg}");
    for n in &nodes {
        println!("nbd://{}/{DEFAULT_VOLUME}", n.ep.nbd);
    }
    for n in &nodes {
        println!(
            "node {} admin API: http://{}/api/v1/status   log: {}",
            n.id,
            n.ep.admin,
            n.log.display()
        );
    }
    println!("Press Ctrl-C to stop.");

    let mut exited = None;
    tokio::select! {
        _ = crate::node::shutdown_signal() => {}
        r = async {
            loop {
                for n in nodes.iter_mut() {
                    if let Ok(Some(s)) = n.child.try_wait() {
                        return (n.id.clone(), s, n.log.clone());
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => { exited = Some(r); }
    }
    eprintln!("stopping...");
    stop_all(&mut nodes).await;
    let _ = std::fs::remove_file(args.data.join("cluster.json"));
    if let Some((id, status, log)) = exited {
        anyhow::bail!(
            "node {id} exited unexpectedly ({status}); last lines of {}:\n{}",
            log.display(),
            log_tail(&log)
        );
    }
    Ok(())
}
