//! `lazarus node`: one process serving its store over NBD and the admin API.

use crate::{admin, nbd_server};
use lazarus_engine::engine::Engine;
use lazarus_node::config::{Endpoints, NodeConfig};
use lazarus_store::{Store, StoreOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Written after the final checkpoint of a clean shutdown, removed at start.
const CLEAN_MARKER: &str = "CLEAN";

/// How often the background worker looks at the journal fill level.
const CHECKPOINT_POLL: Duration = Duration::from_millis(50);

/// Holds an exclusive lock on the data directory for the life of the process, so two
/// nodes can never write the same device.
pub struct DirLock {
    _file: std::fs::File,
}

pub fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        anyhow::bail!(
            "data dir {} is in use by another lazarus process",
            dir.display()
        );
    }
    Ok(DirLock { _file: file })
}

/// A running node's parts: its block store, the engine serving I/O, and (with
/// `rpc_listen` configured) its cluster member.
pub struct Node {
    pub store: Arc<Store>,
    pub engine: Arc<Engine>,
    pub cluster: Option<Arc<lazarus_node::cluster::Cluster>>,
}

/// Opens the node's block store (replaying its journal) and the engine over it.
pub async fn open(cfg: &NodeConfig) -> anyhow::Result<(Arc<Store>, Arc<Engine>)> {
    let t0 = Instant::now();
    let dir = cfg.data_dir.clone();
    let opts = StoreOptions {
        journal_bytes: cfg.journal_bytes,
        page_cache_bytes: cfg.page_cache_bytes,
    };
    let store = lazarus_rpc::rt::blocking(move || Store::open(&dir, opts)).await??;
    let store = Arc::new(store);
    tracing::info!(node = %cfg.id, elapsed_ms = t0.elapsed().as_millis() as u64, recovery = ?store.recovery, "store opened");
    let engine = Arc::new(Engine::new(store.clone()));
    Ok((store, engine))
}

/// What the engine answers of the node-to-node RPC: requests forwarded by other nodes
/// and this node's summary. The cluster holds it, the engine weakly: the engine holds
/// the cluster.
fn front(engine: &Arc<Engine>) -> lazarus_rpc::Handler {
    let engine = Arc::downgrade(engine);
    Arc::new(move |kind, body| {
        let engine = engine.upgrade();
        Box::pin(async move {
            let engine = engine.ok_or("this node is stopping")?;
            match kind {
                lazarus_rpc::KIND_FORWARD => engine.serve_forward(&body).await.map_err(Into::into),
                lazarus_rpc::KIND_VOLUME_SNAPSHOT => {
                    engine.serve_snapshot_op(&body).await.map_err(Into::into)
                }
                lazarus_rpc::KIND_VOLUME_RESET => {
                    engine.serve_reset_op(&body).await.map_err(Into::into)
                }
                lazarus_rpc::KIND_SNAPSHOT_FETCH => {
                    engine.serve_snapshot_fetch(&body).await.map_err(Into::into)
                }
                lazarus_rpc::KIND_STATS => {
                    serde_json::to_vec(&lazarus_engine::stats::local_stats(&engine))
                        .map_err(|e| e.to_string().into())
                }
                _ => Err("not a front-end request".into()),
            }
        })
    })
}

/// Starts the node's cluster member (when configured) and its background work: the
/// whole node but for its listeners and the process's own concerns (data-directory
/// lock, endpoints file, signals), which `run` adds and the simulator does not need.
/// `clean`: the last stop was a clean shutdown (nothing unsynced was lost).
pub async fn start(
    cfg: &NodeConfig,
    store: Arc<Store>,
    engine: Arc<Engine>,
    ep: &Endpoints,
    clean: bool,
) -> anyhow::Result<Node> {
    let cluster = match cfg.rpc_listen {
        Some(_) => {
            // Copies present before reconcile creates missing ones: a copy the
            // metadata places here but that is not on disk is empty, not live.
            let local: std::collections::HashSet<String> = store
                .volumes()
                .iter()
                .map(|v| v.meta.name.clone())
                .collect();
            // A store with no volume has nothing to lose: as good as a clean stop.
            let clean = clean || local.is_empty();
            let c =
                lazarus_node::cluster::Cluster::start(cfg, store.clone(), engine.stripes()).await?;
            let _ = engine.cluster.set(c.clone());
            c.serve_front(front(&engine));
            c.reconcile();
            c.watch_raft();
            c.contact_loop();
            c.watch_primaries();
            c.watch_peers();
            c.watch_membership();
            c.watch_clones();
            c.lease_loop();
            c.hold_loop();
            c.jeopardy_loop();
            engine.background_repair();
            engine.snapshot_sync_loop();
            c.resync_loop();
            c.start_up(
                lazarus_cluster::NodeInfo {
                    name: cfg.id.clone(),
                    rpc: cfg.rpc_listen.map(|a| a.to_string()).unwrap_or_default(),
                    nbd: ep.nbd.to_string(),
                    admin: ep.admin.to_string(),
                    incarnation: 0,
                    jeopardy_policy: Some(cfg.jeopardy_policy),
                    // LAZARUS_TAKES_IDS_OFF=n2,n3: these nodes register as an older
                    // version would, taking the blocks alone (tests, benchmarks).
                    takes_ids: !std::env::var("LAZARUS_TAKES_IDS_OFF")
                        .is_ok_and(|v| v.split(',').any(|n| n.trim() == cfg.id)),
                },
                clean,
                local,
            );
            Some(c)
        }
        None => None,
    };
    tokio::spawn(checkpointer(
        store.clone(),
        Duration::from_secs(cfg.checkpoint_interval_secs.max(1)),
        cfg.data_dir.clone(),
        cfg.id.clone(),
    ));
    Ok(Node {
        store,
        engine,
        cluster,
    })
}

pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let nbd_tls = crate::nbd_tls::NbdTls::from_config(&cfg)
        .map_err(|e| anyhow::anyhow!("NBD over TLS: {e}"))?;
    let admin_token = match &cfg.admin_token_file {
        Some(p) => Some(admin::read_token_file(p).map_err(anyhow::Error::msg)?),
        None => cfg.admin_token.clone(),
    };
    match &nbd_tls {
        Some(t) => tracing::info!(policy = ?t.policy, "NBD over TLS is on"),
        None => tracing::info!("NBD over TLS is off: NBD clients are served in the clear"),
    }
    // Present only after a clean shutdown (final checkpoint done): nothing was lost.
    let clean_marker = cfg.data_dir.join(CLEAN_MARKER);
    let clean = clean_marker.exists();
    if clean {
        std::fs::remove_file(&clean_marker)?;
        lazarus_store::disk::sync_dir(&cfg.data_dir)?;
    }
    let (store, engine) = open(&cfg).await?;
    lazarus_engine::stats::start_sampler(engine.clone());

    let nbd = lazarus_rpc::net::Listener::bind(&cfg.nbd_listen.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for NBD on {}: {e}", cfg.nbd_listen))?;
    let adm = TcpListener::bind(cfg.admin_listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for the admin API on {}: {e}",
            cfg.admin_listen
        )
    })?;
    let ep = Endpoints {
        id: cfg.id.clone(),
        pid: std::process::id(),
        nbd: nbd.local_addr()?,
        admin: adm.local_addr()?,
    };
    // Written before the cluster starts: on a full disk the start may take the last
    // free bytes (the Raft store), and a node that cannot say where it listens is
    // restarted over and over. A start that fails after it (a taken RPC port) exits,
    // and `lazarus up` restarts the node.
    lazarus_store::disk::write_file_atomic(
        &cfg.data_dir.join("endpoints.json"),
        &serde_json::to_vec_pretty(&ep)?,
    )?;
    let node = start(&cfg, store.clone(), engine.clone(), &ep, clean).await?;
    let guard = admin::MutationGuard::new(cfg.admin_listen, admin_token);
    let app = admin::router(admin::AppState {
        guard,
        faults: cfg.faults,
        node_id: cfg.id.clone(),
        engine: engine.clone(),
        cluster: node.cluster,
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(adm, app).await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    tokio::spawn(nbd_server::serve(nbd, engine.clone(), nbd_tls));
    tracing::info!(node = %cfg.id, nbd = %ep.nbd, admin = %ep.admin, "node serving");

    shutdown_signal().await;
    tracing::info!(node = %cfg.id, "shutting down: flushing and checkpointing");
    store.seal();
    let s = store.clone();
    match lazarus_rpc::rt::blocking(move || s.checkpoint()).await? {
        Ok(()) => {
            // Without the marker (a full disk) the next start treats this stop as a
            // crash: its copies resync, which is safe, only slower.
            match lazarus_store::disk::write_file_atomic(&clean_marker, b"clean shutdown\n") {
                Ok(()) => tracing::info!(node = %cfg.id, "clean shutdown"),
                Err(e) => {
                    tracing::warn!(node = %cfg.id, error = %e, "clean shutdown, but cannot record it; the next start will resync this node's copies")
                }
            }
        }
        Err(e) => {
            tracing::error!(node = %cfg.id, error = %e, "final checkpoint failed; the journal will be replayed at start")
        }
    }
    let _ = std::fs::remove_file(cfg.data_dir.join("endpoints.json"));
    Ok(())
}

async fn checkpointer(store: Arc<Store>, interval: Duration, data_dir: PathBuf, node: String) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(CHECKPOINT_POLL).await;
        if store.has_failed() {
            restart_when_usable(&data_dir, &node).await;
            continue;
        }
        let due = store.wants_checkpoint()
            || (last.elapsed() >= interval && store.journal_used_bytes() > 0);
        if !due {
            continue;
        }
        let s = store.clone();
        match lazarus_rpc::rt::blocking(move || s.checkpoint()).await {
            Ok(Ok(())) => last = Instant::now(),
            Ok(Err(e)) => tracing::error!(error = %e, "checkpoint failed"),
            Err(e) => tracing::error!(error = %e, "checkpoint task panicked"),
        }
    }
}

/// A store that failed a journal write or a flush (a full disk, a failed device) takes
/// no writes until it is opened again: its copies go dead and could never resync. Once
/// the device takes writes again (no injected device failure, room above the headroom),
/// the node exits for its supervisor to restart it; the restart replays the journal to
/// a consistent state and the copies resync. While the disk stays full, the node stays
/// up and serves reads.
async fn restart_when_usable(data_dir: &Path, node: &str) {
    if lazarus_store::disk::device_failed(data_dir) {
        return;
    }
    if lazarus_store::disk::check_headroom(&data_dir.join("journal.log"), 1 << 20).is_err() {
        return;
    }
    tracing::error!(
        "the block store stopped taking writes after an I/O error and the device is usable again: this node exits to be restarted and recover from its journal"
    );
    lazarus_node::cluster::exit_now(75, node).await;
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = supervisor_gone() => {}
    }
}

/// The environment variable through which `lazarus up` tells its children its pid.
pub const SUPERVISOR_PID_ENV: &str = "LAZARUS_SUPERVISOR_PID";

/// Resolves once the `lazarus up` supervisor that started this process is gone (killed
/// with -9, say: it had no chance to stop its children), so an orphaned node stops
/// cleanly instead of holding the ports and data a new `lazarus up` needs. Never
/// resolves for a process not started by `up`.
pub async fn supervisor_gone() {
    let Some(pid) = std::env::var(SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if unsafe { libc::getppid() } != pid {
            tracing::warn!(
                supervisor = pid,
                "the lazarus up supervisor is gone; stopping cleanly"
            );
            return;
        }
    }
}
