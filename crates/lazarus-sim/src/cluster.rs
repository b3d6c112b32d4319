//! A whole Lazarus cluster under the simulator: three storage nodes (the real node
//! code: `lazarus_server::node::{open, start}` and the NBD server) and the recovery server on
//! simulated hosts, each node with its own simulated disk, and an NBD client host that
//! writes, flushes and reads with the checker of `scripts/chaos.py`. One seed drives
//! everything: the network's latencies and the hosts' order (turmoil), the workload,
//! and the faults (node crashes at any instant, two at once, with the primary among
//! them; partitions between nodes; the recovery server crashed). A crash loses every
//! write, creation, rename and deletion its disk had not synced.
//!
//! The rule checked on every read, as in the chaos campaign: a block reads as the
//! last version acknowledged before a successful FLUSH, or a version written after
//! it; never older, never zeroes that were not written, never another block's or a
//! damaged version. After the faults, a heal phase: every host up, every link open;
//! then every copy must turn live with equal Merkle roots, and every node must serve
//! every block, checked by the same rule.

use crate::nbd::{Client, Reply};
use lazarus_cluster::meta::ReplicaState;
use lazarus_node::config::{Endpoints, NodeConfig};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// The storage nodes a run may have (`Options::nodes` of them, from the first).
const ALL_NODES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];
/// The copies of the volume (placed on the first nodes).
const COPIES: usize = 3;

thread_local! {
    /// The running simulation's node count and out-time (one run per thread).
    static SHAPE: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((3, 600)) };
}

/// The storage nodes of the running simulation.
pub fn nodes() -> &'static [&'static str] {
    &ALL_NODES[..SHAPE.with(|s| s.get().0)]
}
const RPC_PORT: u16 = 7000;
const NBD_PORT: u16 = 10809;
/// Where `crate::serve_rs` listens.
const RS_PORT: u16 = 7000;
const VOLUME: &str = "vol0";
const BLOCK: usize = 4096;

/// What one seed's run does.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Options {
    pub seed: u64,
    /// Volume size in blocks; the client writes `blocks_written` of them, spread over
    /// the volume (`written_lbas`).
    pub volume_blocks: u64,
    pub blocks_written: u64,
    /// Simulated time of client load with faults, after the volume is ready.
    pub load: Duration,
    /// Fault events during the load.
    pub faults: usize,
    /// How long the heal phase may take before the run counts as failed.
    pub heal_limit: Duration,
    /// Disk faults among the faults: bit rot (slice, checksum, block) and EIO.
    #[serde(default)]
    pub disk_faults: bool,
    /// Failed devices among the faults: every I/O of one node's block store fails
    /// with EIO until the fault ends (`lazarus fault device fail`).
    #[serde(default)]
    pub device_faults: bool,
    /// Full disks among the faults: one node's disk filled to its capacity (a
    /// ballast file, synced) until the fault ends.
    #[serde(default)]
    pub full_disk: bool,
    /// Connections cut without a crash among the faults: every open connection of one
    /// host (a node, the recovery server or the client) fails at once, both ends see
    /// it, and the processes run on (`lazarus_io::net::cuts`).
    #[serde(default)]
    pub conn_cuts: bool,
    /// Primary hand-overs among the faults: an administrator asks for another copy's
    /// node to be the primary (`lazarus volume primary`, `MetaCommand::WantPrimary`),
    /// and the leader hands the role over while the client writes through the old one.
    #[serde(default)]
    pub handovers: bool,
    /// Snapshots taken and deleted among the faults (on the primary, as `lazarus
    /// snapshot create|delete` does); healed means every copy holds every snapshot
    /// the metadata names, with the same root (copies that missed one install it).
    #[serde(default)]
    pub snapshots: bool,
    /// Reverts among the faults (with `snapshots`): the primary makes the volume read
    /// as one of its snapshots again (`lazarus volume revert`), and the client's books
    /// follow: after a revert, a block may read only as the snapshot held it or as a
    /// write sent since.
    #[serde(default)]
    pub reverts: bool,
    /// Clones among the faults (with `snapshots`): the primary clones an acknowledged
    /// snapshot into a new volume (`lazarus volume clone`, at most `MAX_CLONES` a
    /// run); healed means each clone's copies live with one root too, and every block
    /// of a clone whose creation was acknowledged reads as the snapshot held it,
    /// through every node.
    #[serde(default)]
    pub clones: bool,
    /// Storage nodes (3 to 5); the volume's three copies start on the first three.
    #[serde(default = "three")]
    pub nodes: usize,
    /// The cluster's out-time: a node down longer is marked out and its copies are
    /// rebuilt on the other nodes (with more than three nodes).
    #[serde(default = "out_after_default")]
    pub out_after_secs: u64,
}

fn three() -> usize {
    3
}

fn out_after_default() -> u64 {
    600
}

impl Options {
    pub fn new(seed: u64) -> Options {
        Options {
            seed,
            volume_blocks: 1024,
            blocks_written: 48,
            load: Duration::from_secs(20),
            faults: 3,
            heal_limit: Duration::from_secs(90),
            disk_faults: false,
            device_faults: false,
            full_disk: false,
            conn_cuts: false,
            handovers: false,
            snapshots: false,
            reverts: false,
            clones: false,
            nodes: 3,
            out_after_secs: 600,
        }
    }
}

/// What a run did and saw.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub writes_acked: u64,
    pub flushes_acked: u64,
    pub reads_checked: u64,
    /// Requests refused (EIO and the like) or lost with their connection during faults.
    pub errors_during_faults: u64,
    /// Reads after the heal that answered EIO for a block in a slice page the primary
    /// lists as unrecoverable (DESIGN.md: reported, never wrong data).
    pub unrecoverable_reads: u64,
    /// Fault events, in order, with their simulated times: the run's replayable trace.
    pub events: Vec<String>,
    /// Simulated time the heal phase took.
    pub heal_ms: u64,
    /// The nodes holding the volume's copies at the end (rebuilt elsewhere when a node
    /// stayed down past the out-time).
    #[serde(default)]
    pub replicas: Vec<u64>,
    /// Reverts done (acknowledged by the primary).
    #[serde(default)]
    pub reverts_done: u64,
    /// Clones made (acknowledged by the primary).
    #[serde(default)]
    pub clones_done: u64,
}

/// The state the client host and the fault scheduler share (one simulation runs on
/// one thread).
#[derive(Default)]
struct Shared {
    ready: bool,
    healing: bool,
    done: bool,
    violation: Option<String>,
    report: Report,
    /// Per node, its last published view.
    views: BTreeMap<String, View>,
    /// Disk faults waiting for their node's host to apply them.
    disk_faults: Vec<(String, DiskFault)>,
    /// Nodes an administrator asked to be the volume's primary, waiting for any node's
    /// host to propose it.
    primary_requests: Vec<u64>,
    /// Snapshot operations (create, else delete) waiting for the primary's host.
    snapshot_requests: Vec<bool>,
    /// Snapshots created so far (names are never reused).
    snapshots_made: u64,
    /// Snapshots whose creation started and that no view names yet.
    snapshots_unseen: BTreeSet<String>,
    /// Reverts waiting for the primary's host (and for a snapshot to revert to).
    revert_requests: u32,
    /// Reverts asked for so far (which snapshot the next one takes).
    reverts_made: u64,
    /// The client's books (the node hosts record snapshots and reverts in them).
    books: Books,
    /// Per snapshot whose creation was acknowledged, what each written block may read
    /// as in it (`Books::snapshot_of`).
    snapshot_books: BTreeMap<String, Held>,
    /// Clones waiting for the primary's host (and for a snapshot to clone).
    clone_requests: u32,
    /// Clones asked for: name -> what each block may read as in it, and whether its
    /// creation was acknowledged (None: not answered yet, or cut off by a crash).
    clones: BTreeMap<String, (Held, Option<bool>)>,
}

/// Per written block, the versions it may read as (0: zeroes).
type Held = BTreeMap<u64, BTreeSet<u64>>;

/// Clones a run makes at most (each is a volume of three more copies to heal).
const MAX_CLONES: usize = 2;

/// A fault of a node's disk, applied on its host (where its simulated disk is).
#[derive(Debug, Clone)]
enum DiskFault {
    /// Bytes of the slice page, checksum page or stored block holding `lba` flipped
    /// on disk (bit rot), and the node's cached copy dropped.
    Corrupt { lba: u64, target: &'static str },
    /// Reads of the slice page holding `lba` fail with EIO (a failing sector).
    Eio { lba: u64 },
    /// Injected read errors end (the heal phase).
    ClearEio,
    /// The disk filled up: a ballast file takes every byte left.
    Fill,
    /// The ballast file removed.
    Unfill,
}

/// Each host's disk capacity when full disks are drawn: ample for a run (a node
/// uses some 20 MiB), so that only a ballast fills it.
const DISK_CAPACITY: u64 = 256 << 20;

/// Fills the host's disk (`DiskFault::Fill`): a ballast file in `dir`, written in
/// 1 MiB pieces until the disk refuses, and synced, so a crash keeps it.
fn fill_disk(dir: &std::path::Path) -> Result<u64, String> {
    let path = dir.join("ballast");
    let f = lazarus_io::fs::open_rw(&path, true, false).map_err(|e| e.to_string())?;
    let mut at = f.len().map_err(|e| e.to_string())?;
    let piece = vec![0xBBu8; 1 << 20];
    let small = vec![0xBBu8; 4096];
    while at < DISK_CAPACITY && f.write_all_at(&piece, at).is_ok() {
        at += piece.len() as u64;
    }
    // The last few KiB, 4 KiB at a time.
    while at < DISK_CAPACITY && f.write_all_at(&small, at).is_ok() {
        at += small.len() as u64;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(at)
}

/// What a node shows of itself, published by a task on its host.
#[derive(Debug, Clone, Default)]
struct View {
    serving_ready: bool,
    /// The node's block store latched an I/O error (a failed device): it restarts
    /// once the device is usable, so it is not whole yet.
    store_failed: bool,
    volume: Option<lazarus_cluster::meta::VolumeInfo>,
    root: Option<String>,
    /// In the heal phase: the version of each written block in this node's own copy
    /// (0: zeroes; u64::MAX: unreadable or not ours), to show where copies differ.
    versions: BTreeMap<u64, u64>,
    /// The LBA ranges (first, count) this copy lists as unrecoverable.
    unrecoverable: Vec<(u64, u64)>,
    /// This node's copy's snapshots: name -> (id, root).
    snapshots: BTreeMap<String, (u64, String)>,
    /// Snapshots it misses and cannot install yet: `VOLUME@NAME` -> why.
    snapshot_errors: BTreeMap<String, String>,
    /// Per clone asked for: the metadata's record of it, and this node's copy's root.
    clones: BTreeMap<String, (Option<lazarus_cluster::meta::VolumeInfo>, Option<String>)>,
}

thread_local! {
    static SHARED: RefCell<Option<Rc<RefCell<Shared>>>> = const { RefCell::new(None) };
}

fn shared() -> Rc<RefCell<Shared>> {
    SHARED.with(|s| s.borrow().clone().expect("a cluster simulation is running"))
}

fn addr(host: &str, port: u16) -> String {
    format!("{}:{port}", turmoil::lookup(host))
}

/// A node's data directory on its simulated disk.
fn node_dir(id: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/{id}"))
}

fn node_config(id: &str) -> NodeConfig {
    let peers: Vec<serde_json::Value> = nodes()
        .iter()
        .filter(|p| **p != id)
        .map(|p| serde_json::json!({"id": p, "rpc": addr(p, RPC_PORT)}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "id": id,
        "data_dir": node_dir(id),
        "nbd_listen": addr(id, NBD_PORT),
        "admin_listen": "127.0.0.1:9",
        "rpc_listen": addr(id, RPC_PORT),
        "peers": peers,
        "recovery_server": addr("rs", RS_PORT),
        "journal_bytes": 8u64 << 20,
        // LAZARUS_SIM_PAGE_CACHE=N: a page cache of N slice pages, so that pages are
        // evicted and read back from the simulated disk.
        "page_cache_bytes": std::env::var("LAZARUS_SIM_PAGE_CACHE")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(lazarus_store::store::DEFAULT_PAGE_CACHE_BYTES, |n| n * 4096),
        "checkpoint_interval_secs": 3,
        "out_after_secs": SHAPE.with(|s| s.get().1),
    }))
    .expect("a valid node configuration")
}

/// One storage node's host: the store opened from its simulated disk, the member
/// started, the NBD server serving. n1 creates the volume once every node has
/// registered.
async fn run_node(id: &'static str, volume_bytes: u64, written: Arc<Vec<u64>>) -> turmoil::Result {
    let cfg = node_config(id);
    // A failed device fails the store's opening too: the node's supervisor starts it
    // again until it opens.
    let (store, engine) = loop {
        match lazarus_server::node::open(&cfg).await {
            Ok(o) => break o,
            Err(e) if lazarus_store::disk::device_failed(&cfg.data_dir) => {
                tracing::warn!(node = id, error = %e, "store not opened (device failed); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(err(e)),
        }
    };
    let nbd = lazarus_io::net::Listener::bind(&format!("0.0.0.0:{NBD_PORT}")).await?;
    let ep = Endpoints {
        id: id.to_string(),
        pid: 0,
        nbd: cfg.nbd_listen,
        admin: cfg.admin_listen,
    };
    let node = lazarus_server::node::start(&cfg, store.clone(), engine.clone(), &ep, false)
        .await
        .map_err(err)?;
    let cluster = node.cluster.clone().expect("a cluster member");
    if id == "n1" {
        let c = cluster.clone();
        tokio::spawn(async move {
            loop {
                let meta = c.store.meta();
                if meta.volumes.contains_key(VOLUME) {
                    return;
                }
                if meta.nodes.len() == nodes().len() {
                    let cmd = lazarus_cluster::MetaCommand::CreateVolume {
                        name: VOLUME.into(),
                        size_bytes: volume_bytes,
                        replicas: meta.nodes.keys().copied().take(COPIES).collect(),
                        primary: Some(c.id),
                        clone_of: None,
                    };
                    let _ = c.propose(cmd).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    // The view the fault scheduler reads between steps: plain data only.
    let engine2 = engine.clone();
    tokio::spawn(async move {
        let engine = engine2;
        loop {
            let mine: Vec<DiskFault> = {
                let sh = shared();
                let mut sh = sh.borrow_mut();
                let (mine, rest) = std::mem::take(&mut sh.disk_faults)
                    .into_iter()
                    .partition(|(h, _)| h == id);
                sh.disk_faults = rest;
                mine.into_iter().map(|(_, f)| f).collect()
            };
            for f in mine {
                apply_disk_fault(id, &store, f);
            }
            let wanted = shared().borrow_mut().primary_requests.pop();
            if let Some(n) = wanted {
                let c = cluster.clone();
                tokio::spawn(async move {
                    let cmd = lazarus_cluster::MetaCommand::WantPrimary {
                        volume: VOLUME.into(),
                        node: Some(n),
                    };
                    let r = c.propose(cmd).await;
                    tracing::info!(node = n, result = ?r, "primary asked for");
                });
            }
            let is_primary = cluster
                .store
                .meta()
                .volumes
                .get(VOLUME)
                .is_some_and(|v| v.primary == cluster.id);
            let op = if is_primary {
                shared().borrow_mut().snapshot_requests.pop()
            } else {
                None
            };
            if let Some(create) = op {
                let (e, c) = (engine.clone(), cluster.clone());
                let name = if create {
                    let sh = shared();
                    let mut sh = sh.borrow_mut();
                    sh.snapshots_made += 1;
                    let name = format!("s{}", sh.snapshots_made);
                    sh.snapshots_unseen.insert(name.clone());
                    Some(name)
                } else {
                    c.store
                        .meta()
                        .volumes
                        .get(VOLUME)
                        .and_then(|v| v.snapshots.keys().next().cloned())
                };
                if let Some(name) = name {
                    // The books when the snapshot starts, and when it is done: what
                    // each block may read as in it (a revert checks against that).
                    let start = {
                        let sh = shared();
                        let b = &sh.borrow().books;
                        (b.possible.clone(), b.version)
                    };
                    tokio::spawn(async move {
                        let r = if create {
                            e.create_snapshot(VOLUME, &name).await.map(|(_, o)| o)
                        } else {
                            e.delete_snapshot(VOLUME, &name).await
                        };
                        let what = if create { "created" } else { "deleted" };
                        let line = match r {
                            Ok(o) => {
                                if create {
                                    let sh = shared();
                                    let mut sh = sh.borrow_mut();
                                    let held = sh.books.snapshot_of(&start);
                                    sh.snapshot_books.insert(name.clone(), held);
                                }
                                format!("snapshot {name} {what} on {:?}", o.done)
                            }
                            Err(err) => {
                                shared().borrow_mut().snapshots_unseen.remove(&name);
                                format!("snapshot {name} not {what}: {}", err.message)
                            }
                        };
                        tracing::info!("{line}");
                    });
                }
            }
            // A revert or clone asked for during the faults waits for a snapshot; one
            // not started when the heal begins is dropped: it would run while the heal
            // reads the volume and its clones (seed 53076: a clone asked for at 2 s
            // started at 21 s, after the cluster was seen whole, and was read while
            // still being made).
            let healing = shared().borrow().healing;
            if is_primary && !healing && shared().borrow().revert_requests > 0 {
                // A snapshot the metadata names whose books are known (its creation
                // was acknowledged), a different one each time; the request waits
                // for one.
                let known = known_snapshots(&cluster);
                let sh = shared();
                let mut shm = sh.borrow_mut();
                if !known.is_empty() {
                    let name = known[shm.reverts_made as usize % known.len()].clone();
                    shm.reverts_made += 1;
                    shm.revert_requests -= 1;
                    let snap = shm.snapshot_books[&name].clone();
                    let start = shm.books.revert_starts(&snap);
                    drop(shm);
                    let e = engine.clone();
                    tokio::spawn(async move {
                        // Ends the revert in the books however the task ends: a crash
                        // of this host drops it unfinished (done or not, unknown).
                        let mut end = RevertEnd {
                            snap,
                            start,
                            done: false,
                        };
                        let r = e.reset_to_snapshot(VOLUME, VOLUME, &name, None).await;
                        end.done = r.is_ok();
                        let line = match r {
                            Ok(o) => format!("reverted to {name}: {o:?}"),
                            Err(err) => format!("not reverted to {name}: {}", err.message),
                        };
                        tracing::info!("{line}");
                    });
                }
            }
            let clone_asked = is_primary && !healing && {
                let sh = shared();
                let sh = sh.borrow();
                sh.clone_requests > 0 && sh.clones.len() < MAX_CLONES
            };
            if clone_asked {
                let known = known_snapshots(&cluster);
                let sh = shared();
                let mut shm = sh.borrow_mut();
                if let Some(snap) = known.last().cloned() {
                    shm.clone_requests -= 1;
                    let new = format!("c{}", shm.clones.len() + 1);
                    let held = shm.snapshot_books[&snap].clone();
                    shm.clones.insert(new.clone(), (held, None));
                    drop(shm);
                    let (e, c) = (engine.clone(), cluster.clone());
                    tokio::spawn(async move {
                        let r =
                            lazarus_server::admin::clone_volume(&e, Some(&c), VOLUME, &snap, &new)
                                .await;
                        let line = match &r {
                            Ok(o) => format!("{new} cloned from {VOLUME}@{snap}: {o:?}"),
                            Err(err) => format!("{new} not cloned from {VOLUME}@{snap}: {}", err.1),
                        };
                        tracing::info!("{line}");
                        let sh = shared();
                        let mut sh = sh.borrow_mut();
                        sh.report.clones_done += u64::from(r.is_ok());
                        if let Some(c) = sh.clones.get_mut(&new) {
                            c.1 = Some(r.is_ok());
                        }
                    });
                }
            }
            let clone_names: Vec<String> = shared().borrow().clones.keys().cloned().collect();
            let meta = cluster.store.meta();
            let clones = clone_names
                .into_iter()
                .map(|n| {
                    let m = meta.volumes.get(&n).cloned();
                    let root = store
                        .volume(&n)
                        .filter(|v| m.as_ref().map(|m| m.uid) == Some(v.meta.uid))
                        .map(|v| v.root().to_hex());
                    (n, (m, root))
                })
                .collect();
            drop(meta);
            let view = View {
                clones,
                snapshot_errors: engine.snapshot_sync_errors(),
                snapshots: store
                    .volume(VOLUME)
                    .filter(|v| {
                        cluster.store.meta().volumes.get(VOLUME).map(|m| m.uid) == Some(v.meta.uid)
                    })
                    .map(|v| {
                        v.snapshots()
                            .iter()
                            .map(|s| (s.name.clone(), (s.id, s.root.to_hex())))
                            .collect()
                    })
                    .unwrap_or_default(),
                serving_ready: cluster.is_ready(),
                store_failed: store.has_failed(),
                volume: cluster.store.meta().volumes.get(VOLUME).cloned(),
                root: store.volume(VOLUME).map(|v| v.root().to_hex()),
                unrecoverable: store
                    .volume(VOLUME)
                    .map(|v| v.damaged_ranges())
                    .unwrap_or_default(),
                versions: if shared().borrow().healing {
                    local_versions(&store, &written)
                } else {
                    BTreeMap::new()
                },
            };
            shared().borrow_mut().views.insert(id.to_string(), view);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    lazarus_server::nbd_server::serve(nbd, engine, None).await;
    Ok(())
}

/// The snapshots the metadata names whose books are known (their creation was
/// acknowledged).
fn known_snapshots(cluster: &lazarus_node::cluster::Cluster) -> Vec<String> {
    let names: Vec<String> = cluster
        .store
        .meta()
        .volumes
        .get(VOLUME)
        .map(|v| v.snapshots.keys().cloned().collect())
        .unwrap_or_default();
    let sh = shared();
    let sh = sh.borrow();
    names
        .into_iter()
        .filter(|n| sh.snapshot_books.contains_key(n))
        .collect()
}

/// Ends a revert in the client's books when its task ends (`Books::revert_ends`).
struct RevertEnd {
    snap: Held,
    start: u64,
    done: bool,
}

impl Drop for RevertEnd {
    fn drop(&mut self) {
        let sh = SHARED.with(|s| s.borrow().clone());
        if let Some(sh) = sh {
            let mut sh = sh.borrow_mut();
            sh.books.revert_ends(&self.snap, self.start, self.done);
            sh.report.reverts_done += u64::from(self.done);
        }
    }
}

fn local_versions(store: &lazarus_store::Store, written: &[u64]) -> BTreeMap<u64, u64> {
    let Some(v) = store.volume(VOLUME) else {
        return BTreeMap::new();
    };
    let mut buf = vec![0u8; BLOCK];
    written
        .iter()
        .map(|&lba| {
            let ver = match store.read_blocks(&v, lazarus_types::Lba(lba), &mut buf) {
                Ok(()) if buf.iter().all(|b| *b == 0) => 0,
                Ok(()) => u64::from_le_bytes(buf[8..16].try_into().unwrap()),
                Err(_) => u64::MAX,
            };
            (lba, ver)
        })
        .collect()
}

fn apply_disk_fault(id: &str, store: &Arc<lazarus_store::Store>, f: DiskFault) {
    match f {
        DiskFault::Fill => {
            match fill_disk(store.dir()) {
                Ok(bytes) => tracing::info!(node = id, bytes, "disk filled"),
                Err(e) => tracing::info!(node = id, error = %e, "disk not filled"),
            }
            return;
        }
        DiskFault::Unfill => {
            let _ = lazarus_io::fs::remove_file(&store.dir().join("ballast"));
            return;
        }
        _ => {}
    }
    let Some(v) = store.volume(VOLUME) else {
        return;
    };
    let r = match &f {
        DiskFault::Corrupt { lba, target } => {
            lazarus_server::admin::corrupt_on_disk(store, &v, VOLUME, *lba, target)
                .map(|_| ())
                .map_err(|e| e.1)
        }
        DiskFault::Eio { lba } => store
            .checkpoint()
            .and_then(|_| v.inject_page_read_error(lba / lazarus_types::FANOUT_U64))
            .map(|_| ())
            .map_err(|e| e.to_string()),
        DiskFault::ClearEio => {
            v.clear_read_errors();
            Ok(())
        }
        DiskFault::Fill | DiskFault::Unfill => Ok(()),
    };
    // A block not stored on this copy (never written here) cannot rot: nothing to do.
    if let Err(e) = r {
        tracing::info!(node = id, fault = ?f, error = %e, "disk fault not applied");
    }
}

fn err(e: anyhow::Error) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

/// The addresses of the blocks the client writes: spread over the volume, so that
/// they fall in several slice pages.
fn written_lbas(opts: &Options) -> Vec<u64> {
    (0..opts.blocks_written)
        .map(|i| (i * 21) % opts.volume_blocks)
        .collect()
}

/// A block's content at `version`: its address and version in the first 16 bytes, a
/// pattern of both after, so a misplaced or damaged block never passes for ours.
pub fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (lba as usize * 7 + version as usize * 13 + i) as u8;
    }
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    b
}

/// The client's books: what it sent, and what FLUSH made durable.
#[derive(Default)]
struct Books {
    /// The last version handed out (versions start at 1; 0 stands for zeroes).
    version: u64,
    /// Versions sent per block (a write whose reply was lost may or may not be there).
    sent: Held,
    /// Per block, the versions it may read as now (0: zeroes; a block not here may
    /// read only as zeroes): each version sent, less those older than one
    /// acknowledged before a successful FLUSH, and after a revert only what the
    /// snapshot held and what was sent since.
    possible: Held,
    /// Acknowledged since the last successful FLUSH.
    unflushed: Vec<(u64, u64)>,
    /// Reverts running: what is acknowledged meanwhile may be undone, so no FLUSH
    /// vouches for it.
    reverting: u32,
    /// Versions up to this one were sent before a revert ended: no FLUSH vouches for
    /// them (the revert may have undone them).
    vouched_after: u64,
    /// Bumped when a revert starts and when it ends: a read across either is not
    /// checked (it may see the volume before or after).
    revert_gen: u64,
}

impl Books {
    /// A write of `version` to `lba` sent.
    fn sent(&mut self, lba: u64, version: u64) {
        self.sent.entry(lba).or_default().insert(version);
        self.possible
            .entry(lba)
            .or_insert_with(|| BTreeSet::from([0]))
            .insert(version);
    }

    /// A write acknowledged.
    fn acked(&mut self, lba: u64, version: u64) {
        if self.reverting == 0 && version > self.vouched_after {
            self.unflushed.push((lba, version));
        }
    }

    /// A FLUSH acknowledged: the writes acknowledged before it supersede older ones.
    fn flushed(&mut self) {
        for (l, v) in std::mem::take(&mut self.unflushed) {
            if let Some(p) = self.possible.get_mut(&l) {
                p.retain(|x| *x >= v);
            }
        }
    }

    fn possible(&self, lba: u64) -> BTreeSet<u64> {
        self.possible
            .get(&lba)
            .cloned()
            .unwrap_or_else(|| BTreeSet::from([0]))
    }

    /// What each block may read as in a snapshot taken between `start` (`possible`
    /// and `version` then) and now: what it could read as at the start, or any
    /// version sent since.
    fn snapshot_of(&self, start: &(Held, u64)) -> Held {
        self.sent
            .iter()
            .map(|(l, sent)| {
                let mut p = start
                    .0
                    .get(l)
                    .cloned()
                    .unwrap_or_else(|| BTreeSet::from([0]));
                p.extend(
                    sent.range(start.1 + 1..)
                        .take_while(|x| **x <= self.version),
                );
                (*l, p)
            })
            .collect()
    }

    /// A revert to a snapshot whose books are `snap` starts: until it ends, a block
    /// may read as before or as in the snapshot.
    fn revert_starts(&mut self, snap: &Held) -> u64 {
        self.reverting += 1;
        self.revert_gen += 1;
        self.unflushed.clear();
        for (l, p) in snap {
            self.possible
                .entry(*l)
                .or_insert_with(|| BTreeSet::from([0]))
                .extend(p.iter().copied());
        }
        // A block the snapshot does not name was never written before it: zeroes.
        for (l, p) in self.possible.iter_mut() {
            if !snap.contains_key(l) {
                p.insert(0);
            }
        }
        self.version
    }

    /// The revert that started when `start` was the last version sent ended: if it
    /// was done, a block reads as the snapshot held it or as a write sent since it
    /// started; if not (refused, or cut off), either way, as while it ran.
    fn revert_ends(&mut self, snap: &Held, start: u64, done: bool) {
        self.reverting -= 1;
        self.revert_gen += 1;
        self.vouched_after = self.version;
        if !done {
            return;
        }
        for (l, p) in self.possible.iter_mut() {
            let mut now = snap.get(l).cloned().unwrap_or_else(|| BTreeSet::from([0]));
            if let Some(sent) = self.sent.get(l) {
                now.extend(sent.range(start..));
            }
            *p = now;
        }
    }

    /// Checks a read of `lba` against `possible`, what it could read as when the read
    /// was sent.
    fn check(&self, lba: u64, possible: &BTreeSet<u64>, data: &[u8]) -> Result<(), String> {
        let floor = possible.first().copied().unwrap_or(0);
        if data.iter().all(|b| *b == 0) {
            if possible.contains(&0) {
                return Ok(());
            }
            return Err(format!(
                "block {lba}: zeroes, but it may read only as {possible:?} (version {floor} was flushed)"
            ));
        }
        let l = u64::from_le_bytes(data[..8].try_into().unwrap());
        let v = u64::from_le_bytes(data[8..16].try_into().unwrap());
        if l != lba || data != block(lba, v).as_slice() {
            return Err(format!(
                "block {lba}: damaged or misplaced data (claims block {l} version {v})"
            ));
        }
        if !self.sent.get(&lba).is_some_and(|s| s.contains(&v)) {
            return Err(format!("block {lba}: version {v} was never written"));
        }
        if v < floor {
            return Err(format!(
                "block {lba}: version {v}, older than version {floor} acknowledged before a successful flush"
            ));
        }
        if !possible.contains(&v) {
            return Err(format!(
                "block {lba}: version {v}, but it may read only as {possible:?} (a revert undid version {v})"
            ));
        }
        Ok(())
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than a jeopardy suspension (30 s) and a failover.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);

async fn connect_any(rng: &mut fastrand::Rng) -> Option<(Client, &'static str)> {
    let node = nodes()[rng.usize(..nodes().len())];
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Client::connect(&addr(node, NBD_PORT), VOLUME),
    )
    .await
    {
        Ok(Ok(c)) => {
            tracing::debug!(target: "client", node, "connected");
            Some((c, node))
        }
        _ => None,
    }
}

/// The NBD client host: waits for the volume, then writes, flushes and reads until
/// the heal phase starts; then reads every block through every node.
async fn run_client(opts: Options) -> turmoil::Result {
    let sh = shared();
    let written = written_lbas(&opts);
    let mut rng = fastrand::Rng::with_seed(opts.seed ^ 0x5eed_c11e);
    // The volume is ready once a node serves it.
    let first = loop {
        if let Some(c) = connect_any(&mut rng).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sh.borrow_mut().ready = true;
    let mut version = 0u64;
    let mut conn = Some(first);
    let mut errors = 0u64;
    while !sh.borrow().healing {
        let (c, node) = match conn.as_mut() {
            Some((c, n)) => (c, *n),
            None => {
                conn = connect_any(&mut rng).await;
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                continue;
            }
        };
        let lba = written[rng.u64(..written.len() as u64) as usize];
        let roll = rng.u32(..10);
        let outcome = if roll < 6 {
            version = {
                let mut sh = sh.borrow_mut();
                sh.books.version += 1;
                let v = sh.books.version;
                sh.books.sent(lba, v);
                v
            };
            let data = block(lba, version);
            let r = tokio::time::timeout(REQUEST_TIMEOUT, c.write(lba * BLOCK as u64, &data)).await;
            if let Ok(Ok(Reply::Ok(_))) = r {
                let mut sh = sh.borrow_mut();
                sh.books.acked(lba, version);
                sh.report.writes_acked += 1;
            }
            r
        } else if roll < 8 {
            let r = tokio::time::timeout(REQUEST_TIMEOUT, c.flush()).await;
            if let Ok(Ok(Reply::Ok(_))) = r {
                let mut sh = sh.borrow_mut();
                sh.books.flushed();
                sh.report.flushes_acked += 1;
            }
            r
        } else {
            let (possible, gen) = {
                let sh = sh.borrow();
                (sh.books.possible(lba), sh.books.revert_gen)
            };
            let r = tokio::time::timeout(REQUEST_TIMEOUT, c.read(lba * BLOCK as u64, BLOCK as u32))
                .await;
            if let Ok(Ok(Reply::Ok(data))) = &r {
                // A read across a revert's start or end may see either side.
                if sh.borrow().books.revert_gen == gen {
                    let checked = sh.borrow().books.check(lba, &possible, data);
                    if let Err(e) = checked {
                        sh.borrow_mut().violation = Some(format!("during load: {e}"));
                        return Ok(());
                    }
                    sh.borrow_mut().report.reads_checked += 1;
                }
            }
            r
        };
        tracing::debug!(target: "client", node, lba, version, roll, outcome = ?outcome.as_ref().map(|r| r.as_ref().map(|r| match r { Reply::Ok(d) if d.len() >= 16 => format!("ok v{}", u64::from_le_bytes(d[8..16].try_into().unwrap())), Reply::Ok(_) => "ok".to_string(), Reply::Err(e) => format!("err {e}") })), "op");
        match outcome {
            Ok(Ok(Reply::Ok(_))) => {}
            Ok(Ok(Reply::Err(_))) if !(6..8).contains(&roll) => errors += 1,
            _ => {
                // A connection lost, or a FLUSH refused: a FLUSH vouches only for the
                // writes acknowledged on its own connection (the writes acknowledged
                // on this one may have died with a server that held them unflushed,
                // and no later FLUSH elsewhere can vouch for them), as in chaos.py.
                errors += 1;
                conn = None;
                sh.borrow_mut().books.unflushed.clear();
            }
        }
    }
    drop(conn);
    sh.borrow_mut().report.errors_during_faults = errors;
    // Heal: wait for the scheduler to see the cluster whole, then read everything
    // through every node; every read must succeed now.
    while !sh.borrow().done {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for &node in nodes() {
        let mut c = match tokio::time::timeout(
            CONNECT_TIMEOUT * 4,
            Client::connect(&addr(node, NBD_PORT), VOLUME),
        )
        .await
        {
            Ok(Ok(c)) => c,
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                sh.borrow_mut().violation =
                    Some(format!("after heal: {node} does not serve {VOLUME}: {why}"));
                return Ok(());
            }
        };
        // A clone whose making was acknowledged is named by every node (never given up).
        let lost = {
            let sh = sh.borrow();
            sh.clones
                .iter()
                .filter(|(_, (_, done))| *done == Some(true))
                .find(|(n, _)| {
                    sh.views
                        .values()
                        .any(|v| v.clones.get(*n).is_none_or(|c| c.0.is_none()))
                })
                .map(|(n, _)| n.clone())
        };
        if let Some(name) = lost {
            sh.borrow_mut().violation = Some(format!(
                "after heal: clone {name}, acknowledged made, is not named by every node"
            ));
            return Ok(());
        }
        // Each clone that the metadata names: a block reads as the snapshot held it,
        // whether its creation was acknowledged or not (one cut off before it was
        // filled is removed, never left empty).
        let clones: Vec<(String, Held)> = {
            let sh = sh.borrow();
            sh.clones
                .iter()
                .filter(|(n, _)| {
                    sh.views
                        .values()
                        .any(|v| v.clones.get(*n).is_some_and(|c| c.0.is_some()))
                })
                .map(|(n, (held, _))| (n.clone(), held.clone()))
                .collect()
        };
        for (name, held) in clones {
            let mut cc = match tokio::time::timeout(
                CONNECT_TIMEOUT * 4,
                Client::connect(&addr(node, NBD_PORT), &name),
            )
            .await
            {
                Ok(Ok(c)) => c,
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    sh.borrow_mut().violation = Some(format!(
                        "after heal: {node} does not serve clone {name}: {why}"
                    ));
                    return Ok(());
                }
            };
            for &lba in &written {
                let possible = held
                    .get(&lba)
                    .cloned()
                    .unwrap_or_else(|| BTreeSet::from([0]));
                let r = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    cc.read(lba * BLOCK as u64, BLOCK as u32),
                )
                .await;
                let e = match r {
                    Ok(Ok(Reply::Ok(data))) => sh.borrow().books.check(lba, &possible, &data).err(),
                    other => Some(format!("block {lba}: read failed: {other:?}")),
                };
                if let Some(e) = e {
                    sh.borrow_mut().violation =
                        Some(format!("after heal, clone {name} through {node}: {e}"));
                    return Ok(());
                }
                sh.borrow_mut().report.reads_checked += 1;
            }
        }
        let unwritten = [1, opts.volume_blocks - 1];
        for &lba in written.iter().chain(&unwritten) {
            let possible = sh.borrow().books.possible(lba);
            let r = tokio::time::timeout(REQUEST_TIMEOUT, c.read(lba * BLOCK as u64, BLOCK as u32))
                .await;
            let e = match r {
                Ok(Ok(Reply::Ok(data))) => sh.borrow().books.check(lba, &possible, &data).err(),
                Ok(Ok(Reply::Err(5))) if listed_unrecoverable(lba) => {
                    sh.borrow_mut().report.unrecoverable_reads += 1;
                    continue;
                }
                other => Some(format!("block {lba}: read failed: {other:?}")),
            };
            if let Some(e) = e {
                sh.borrow_mut().violation = Some(format!("after heal, through {node}: {e}"));
                return Ok(());
            }
            sh.borrow_mut().report.reads_checked += 1;
        }
    }
    Ok(())
}

/// Whether the volume's primary lists `lba` as unrecoverable (a damaged slice page no
/// copy could prove current): its reads answer EIO, which is what the design promises.
fn listed_unrecoverable(lba: u64) -> bool {
    let sh = shared();
    let sh = sh.borrow();
    let primary = sh
        .views
        .values()
        .find_map(|v| v.volume.as_ref().map(|m| format!("n{}", m.primary)));
    primary.and_then(|p| sh.views.get(&p)).is_some_and(|v| {
        v.unrecoverable
            .iter()
            .any(|(a, n)| (*a..a + n).contains(&lba))
    })
}

/// Whether the views show the cluster whole: every node up and ready, each seeing
/// every copy live under one primary and epoch (and the volume's copies, no more), the
/// roots of the nodes holding a copy equal, and no other node holding one (a copy
/// rebuilt elsewhere is deleted from the node it left).
fn whole(views: &BTreeMap<String, View>) -> bool {
    if views.len() != nodes().len() {
        return false;
    }
    let mut seen = None;
    let mut snap_roots: BTreeMap<String, String> = BTreeMap::new();
    for (id, v) in views {
        let Some(vol) = &v.volume else { return false };
        if !v.serving_ready || v.store_failed {
            return false;
        }
        let Some(key) = copy_key(id, vol, &v.root) else {
            return false;
        };
        let Some(key) = key else { continue };
        if !agrees(&mut seen, key) {
            return false;
        }
        // Every snapshot the metadata names, on every copy, with one root.
        for (name, id) in &vol.snapshots {
            match v.snapshots.get(name) {
                Some((i, root)) if i == id => match snap_roots.get(name) {
                    None => {
                        snap_roots.insert(name.clone(), root.clone());
                    }
                    Some(r) if r != root => return false,
                    _ => {}
                },
                // A snapshot whose copies lost a block of it (bit rot on the only
                // copies that held that block) cannot be installed whole: this copy
                // lacks it, and says why; the copies that have it read that block as
                // an error, never as other data.
                None if v
                    .snapshot_errors
                    .get(&format!("{VOLUME}@{name}"))
                    .is_some_and(|e| e.contains("lacks block")) => {}
                _ => return false,
            }
        }
    }
    seen.is_some_and(|k| k.2.is_some()) && clones_whole(views)
}

/// What every node holding a copy of a volume must agree on: its primary, its epoch
/// and the copy's checksum root.
type CopyKey = (lazarus_cluster::NodeId, u64, Option<String>);

/// Node `id`'s part in a volume being whole, as its metadata `m` and its copy's root
/// say: `None` when the volume is not whole (a copy not live, one missing, a copy here
/// where the metadata puts none); `Some(None)` when the node rightly holds no copy;
/// else what it holds, for the holders to agree on (`agrees`).
fn copy_key(
    id: &str,
    m: &lazarus_cluster::VolumeInfo,
    root: &Option<String>,
) -> Option<Option<CopyKey>> {
    if m.states.values().any(|s| *s != ReplicaState::Live)
        || m.replicas.len() != m.replication_factor()
    {
        return None;
    }
    let holds = m
        .replicas
        .iter()
        .any(|n| ALL_NODES.get(*n as usize - 1) == Some(&id));
    match (holds, root) {
        (false, Some(_)) => None,
        (false, None) => Some(None),
        (true, _) => Some(Some((m.primary, m.epoch, root.clone()))),
    }
}

/// Whether `key` is what the holders seen so far hold (the first sets it).
fn agrees(seen: &mut Option<CopyKey>, key: CopyKey) -> bool {
    seen.get_or_insert_with(|| key.clone()) == &key
}

/// Whether every clone the metadata names has its copies live under one primary and
/// epoch, with equal roots, and no copy on another node.
fn clones_whole(views: &BTreeMap<String, View>) -> bool {
    let names: BTreeSet<&String> = views.values().flat_map(|v| v.clones.keys()).collect();
    for name in names {
        let mut seen = None;
        for (id, v) in views {
            let Some((m, root)) = v.clones.get(name) else {
                return false;
            };
            let Some(m) = m else {
                // Not named here: named nowhere (a clone refused before its volume
                // was created), with no copy left.
                if root.is_some()
                    || views
                        .values()
                        .any(|v| v.clones.get(name).is_some_and(|c| c.0.is_some()))
                {
                    return false;
                }
                continue;
            };
            // Filled, or given up (removed) once its filler is gone.
            if m.cloning.is_some() {
                return false;
            }
            let Some(key) = copy_key(id, m, root) else {
                return false;
            };
            let Some(key) = key else { continue };
            if !agrees(&mut seen, key) {
                return false;
            }
        }
        if seen.as_ref().is_some_and(|k| k.2.is_none()) {
            return false;
        }
    }
    true
}

enum Fault {
    /// Hosts crashed (their unsynced disk writes lost), restarted at the time given.
    Down(Vec<String>, Duration),
    /// Messages between two hosts held, released at the time given.
    Hold(String, String, Duration),
    /// A node's device failed (every I/O of its block store fails with EIO), healed
    /// at the time given.
    Device(String, Duration),
    /// A node's disk full (a ballast file), emptied at the time given.
    Full(String, Duration),
}

/// What the scheduler starts: a fault that lasts until its time, or a node's disk
/// damaged at once (EIO lasts until the heal phase, rot for ever).
enum Pick {
    Lasting(Fault),
    Disk(String, DiskFault),
    /// Every open connection of a host cut at once.
    Cut(String),
    /// The volume's primary role asked for this node (`lazarus volume primary`).
    Primary(u64),
    /// A snapshot taken (else one deleted) by the primary.
    Snapshot(bool),
    /// The volume reverted by the primary to one of its snapshots.
    Revert,
    /// A snapshot cloned by the primary into a new volume.
    Clone,
}

/// Runs one seed. Err: the rule was broken, or the cluster did not heal (with the
/// trace of events so far).
pub fn run(opts: Options) -> Result<Report, String> {
    let sh = Rc::new(RefCell::new(Shared::default()));
    SHARED.with(|s| *s.borrow_mut() = Some(sh.clone()));
    SHAPE.with(|s| {
        s.set((
            opts.nodes.clamp(COPIES, ALL_NODES.len()),
            opts.out_after_secs,
        ))
    });
    let _ = lazarus_io::rt::take_exit_requests();
    lazarus_io::net::cuts::reset();
    // The thread's generator, which the node's own random choices use (openraft's
    // election timeouts, the recovery log's generations).
    fastrand::seed(opts.seed);
    let total = opts.load + opts.heal_limit + Duration::from_secs(120);
    let mut b = crate::builder(opts.seed, total);
    // A crash keeps any part of each unsynced write, sector by sector from its start:
    // torn writes, and a crash in the middle of a checkpoint's in-place writes.
    b.fs().block_size(512);
    if opts.full_disk {
        b.fs().capacity(DISK_CAPACITY);
    }
    let mut sim = b.build();
    sim.host("rs", || crate::serve_rs(None));
    let volume_bytes = opts.volume_blocks * BLOCK as u64;
    let written: Arc<Vec<u64>> = Arc::new(written_lbas(&opts));
    for &id in nodes() {
        let w = written.clone();
        sim.host(id, move || run_node(id, volume_bytes, w.clone()));
    }
    let o = opts.clone();
    sim.client("client", run_client(o));
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let mut active: Vec<Fault> = Vec::new();
    let mut load_start = None;
    let mut heal_start = None;
    let mut fault_times: Vec<Duration> = Vec::new();
    // Slice pages whose blocks a disk fault touched already: one copy's disk per page
    // and run, so that two copies of every page stay whole.
    let mut disk_pages: BTreeSet<u64> = BTreeSet::new();
    // The volume's primary and epoch as the freshest view names them, logged at each
    // change.
    let mut primary_seen: Option<(u64, u64)> = None;
    let log = |sh: &Rc<RefCell<Shared>>, at: Duration, what: String| {
        sh.borrow_mut()
            .report
            .events
            .push(format!("{:>6} ms {what}", at.as_millis()));
    };
    let result = loop {
        let finished = match sim.step() {
            Ok(f) => f,
            Err(e) => break Err(format!("simulation failed: {e}")),
        };
        if let Some(v) = sh.borrow().violation.clone() {
            break Err(v);
        }
        if finished {
            break Ok(());
        }
        let now = sim.elapsed();
        let freshest = sh
            .borrow()
            .views
            .values()
            .filter_map(|v| v.volume.as_ref().map(|v| (v.epoch, v.primary)))
            .max();
        if freshest.is_some_and(|f| primary_seen.is_none_or(|p| f.0 > p.0)) {
            primary_seen = freshest;
            let (epoch, p) = freshest.expect("checked");
            log(&sh, now, format!("primary n{p} at epoch {epoch}"));
        }
        // A node that asked to exit (its metadata stopped) is restarted, as its
        // supervisor would.
        for (host, code) in lazarus_io::rt::take_exit_requests() {
            log(&sh, now, format!("{host} exits ({code}) and is restarted"));
            sim.crash(host.as_str());
            sh.borrow_mut().views.remove(&host);
            sim.bounce(host.as_str());
        }
        if load_start.is_none() {
            if sh.borrow().ready {
                load_start = Some(now);
                log(&sh, now, "volume ready, load starts".into());
                let mut t: Vec<Duration> = (0..opts.faults)
                    .map(|_| now + opts.load.mul_f64(rng.f64() * 0.8))
                    .collect();
                t.sort();
                fault_times = t;
            } else if now > Duration::from_secs(60) {
                break Err("the volume never became ready".into());
            }
            continue;
        }
        // Faults end at their time.
        let mut i = 0;
        while i < active.len() {
            let end = match &active[i] {
                Fault::Down(_, t)
                | Fault::Hold(_, _, t)
                | Fault::Device(_, t)
                | Fault::Full(_, t) => *t,
            };
            if now >= end || heal_start.is_some() {
                match active.remove(i) {
                    Fault::Down(hosts, _) => {
                        for h in hosts {
                            log(&sh, now, format!("{h} restarts"));
                            sim.bounce(h.as_str());
                        }
                    }
                    Fault::Hold(a, b, _) => {
                        log(&sh, now, format!("{a} <-> {b} released"));
                        sim.release(a.as_str(), b.as_str());
                    }
                    Fault::Device(h, _) => {
                        log(&sh, now, format!("device of {h} healed"));
                        lazarus_store::disk::set_device_failed(&node_dir(&h), false);
                    }
                    Fault::Full(h, _) => {
                        log(&sh, now, format!("disk of {h} emptied"));
                        sh.borrow_mut().disk_faults.push((h, DiskFault::Unfill));
                    }
                }
            } else {
                i += 1;
            }
        }
        if heal_start.is_none() {
            if now >= load_start.unwrap() + opts.load {
                heal_start = Some(now);
                sh.borrow_mut().healing = true;
                for &n in nodes() {
                    sh.borrow_mut()
                        .disk_faults
                        .push((n.to_string(), DiskFault::ClearEio));
                }
                log(&sh, now, "heal: every fault ends, writes stop".into());
                continue;
            }
            if fault_times.first().is_some_and(|t| now >= *t) {
                fault_times.remove(0);
                let f = pick_fault(&mut rng, &sh, now, &active, &mut disk_pages, &opts);
                match f {
                    Some(Pick::Lasting(f)) => {
                        match &f {
                            Fault::Down(hosts, until) => {
                                for h in hosts {
                                    sim.crash(h.as_str());
                                    sh.borrow_mut().views.remove(h);
                                }
                                log(
                                    &sh,
                                    now,
                                    format!(
                                        "crash {} until {} ms",
                                        hosts.join("+"),
                                        until.as_millis()
                                    ),
                                );
                            }
                            Fault::Hold(a, b, until) => {
                                sim.hold(a.as_str(), b.as_str());
                                log(
                                    &sh,
                                    now,
                                    format!("hold {a} <-> {b} until {} ms", until.as_millis()),
                                );
                            }
                            Fault::Device(h, until) => {
                                lazarus_store::disk::set_device_failed(&node_dir(h), true);
                                log(
                                    &sh,
                                    now,
                                    format!("device of {h} fails until {} ms", until.as_millis()),
                                );
                            }
                            Fault::Full(h, until) => {
                                sh.borrow_mut()
                                    .disk_faults
                                    .push((h.clone(), DiskFault::Fill));
                                log(
                                    &sh,
                                    now,
                                    format!("disk of {h} full until {} ms", until.as_millis()),
                                );
                            }
                        }
                        active.push(f);
                    }
                    Some(Pick::Disk(h, d)) => {
                        log(&sh, now, format!("disk of {h}: {d:?}"));
                        sh.borrow_mut().disk_faults.push((h, d));
                    }
                    Some(Pick::Cut(h)) => {
                        log(&sh, now, format!("every connection of {h} cut"));
                        lazarus_io::net::cuts::cut(sim.lookup(h.as_str()));
                    }
                    Some(Pick::Primary(n)) => {
                        log(&sh, now, format!("n{n} asked to be the primary"));
                        sh.borrow_mut().primary_requests.push(n);
                    }
                    Some(Pick::Snapshot(create)) => {
                        let what = if create { "taken" } else { "deleted" };
                        log(&sh, now, format!("a snapshot {what} by the primary"));
                        sh.borrow_mut().snapshot_requests.push(create);
                    }
                    Some(Pick::Revert) => {
                        log(&sh, now, "a revert by the primary".into());
                        sh.borrow_mut().revert_requests += 1;
                    }
                    Some(Pick::Clone) => {
                        log(&sh, now, "a clone by the primary".into());
                        sh.borrow_mut().clone_requests += 1;
                    }
                    None => {}
                }
            }
            continue;
        }
        let hs = heal_start.unwrap();
        if !sh.borrow().done && active.is_empty() && whole(&sh.borrow().views) {
            sh.borrow_mut().done = true;
            sh.borrow_mut().report.heal_ms = (now - hs).as_millis() as u64;
            let mut replicas: Vec<u64> = sh
                .borrow()
                .views
                .values()
                .find_map(|v| v.volume.as_ref().map(|m| m.replicas.clone()))
                .unwrap_or_default();
            replicas.sort_unstable();
            sh.borrow_mut().report.replicas = replicas;
            log(
                &sh,
                now,
                "cluster whole: every copy live, roots equal".into(),
            );
        }
        if !sh.borrow().done && now > hs + opts.heal_limit {
            let views: Vec<String> = sh
                .borrow()
                .views
                .iter()
                .map(|(n, v)| {
                    format!(
                        "{n}: ready={} vol={:?} root={:?} snapshots named {:?}, held {:?}, missing {:?}, clones {:?}",
                        v.serving_ready,
                        v.volume.as_ref().map(|v| (v.primary, v.epoch, &v.states)),
                        v.root.as_ref().map(|r| &r[..12]),
                        v.volume.as_ref().map(|v| &v.snapshots),
                        v.snapshots.iter().map(|(n, (id, r))| (n, *id, &r[..12])).collect::<Vec<_>>(),
                        v.snapshot_errors,
                        v.clones
                            .iter()
                            .map(|(c, (m, r))| (
                                c,
                                m.as_ref().map(|m| (m.primary, m.epoch, m.states.clone())),
                                r.as_ref().map(|r| r[..12].to_string())
                            ))
                            .collect::<Vec<_>>()
                    )
                })
                .collect();
            let b = sh.borrow();
            let mut differ = Vec::new();
            if let Some(first) = b.views.values().next() {
                for (lba, ver) in &first.versions {
                    let all: Vec<u64> = b
                        .views
                        .values()
                        .map(|v| v.versions.get(lba).copied().unwrap_or(u64::MAX - 1))
                        .collect();
                    if all.iter().any(|x| x != ver) {
                        differ.push(format!("block {lba}: {all:?}"));
                    }
                }
            }
            break Err(format!(
                "the cluster did not heal within {:?}: {views:?}; copies differ at: {differ:?}",
                opts.heal_limit
            ));
        }
    };
    // Stopped on their hosts, so that what they drop (open files, connections) goes
    // back to the simulation that owns it.
    for h in nodes().iter().chain(["rs"].iter()) {
        if sim.is_host_running(*h) {
            sim.crash(*h);
        }
    }
    drop(sim);
    for &n in nodes() {
        lazarus_store::disk::set_device_failed(&node_dir(n), false);
    }
    SHARED.with(|s| *s.borrow_mut() = None);
    let report = sh.borrow().report.clone();
    match result {
        Ok(()) => Ok(report),
        Err(e) => Err(format!(
            "seed {}: {e}\nevents:\n{}",
            opts.seed,
            report.events.join("\n")
        )),
    }
}

/// A fault to start now: one or two nodes crashed (the primary among them half the
/// time), a link between two nodes held, or the recovery server crashed. Never more
/// than two nodes down at once; nothing already faulty is picked again.
/// Whether a disk fault on `node` leaves a whole copy of everything it holds: no
/// snapshot has `node` as its only holder (one taken while a single copy was live,
/// before the others install it), and none is being taken or too new for the views
/// to show who holds it. A snapshot's pages held by one node are its last copy, and
/// no store can repair a last copy's lost page (DESIGN: reported unrecoverable).
fn last_copies_safe(sh: &Rc<RefCell<Shared>>, node: &str) -> bool {
    let mut sh = sh.borrow_mut();
    let sh = &mut *sh;
    let mut holders: BTreeMap<&String, BTreeSet<&String>> = BTreeMap::new();
    for v in sh.views.values() {
        for name in v.volume.iter().flat_map(|m| m.snapshots.keys()) {
            holders.entry(name).or_default();
        }
    }
    for (n, v) in &sh.views {
        for name in v.snapshots.keys() {
            holders.entry(name).or_default().insert(n);
        }
    }
    sh.snapshots_unseen
        .retain(|name| !holders.contains_key(name));
    sh.snapshots_unseen.is_empty()
        && holders
            .values()
            .all(|h| h.len() > 1 || (h.len() == 1 && !h.contains(&node.to_string())))
}

fn pick_fault(
    rng: &mut fastrand::Rng,
    sh: &Rc<RefCell<Shared>>,
    now: Duration,
    active: &[Fault],
    disk_pages: &mut BTreeSet<u64>,
    opts: &Options,
) -> Option<Pick> {
    let down: BTreeSet<String> = active
        .iter()
        .flat_map(|f| match f {
            Fault::Down(h, _) => h.clone(),
            Fault::Hold(..) | Fault::Device(..) | Fault::Full(..) => vec![],
        })
        .collect();
    // Nodes whose device is failed: they count as failed too (at most two at once).
    let failed: BTreeSet<String> = active
        .iter()
        .filter_map(|f| match f {
            Fault::Device(h, _) | Fault::Full(h, _) => Some(h.clone()),
            _ => None,
        })
        .collect();
    let up: Vec<&str> = nodes()
        .iter()
        .copied()
        .filter(|n| !down.contains(*n))
        .collect();
    let until = now + Duration::from_millis(500 + rng.u64(..8000));
    let primary = sh
        .borrow()
        .views
        .values()
        .filter_map(|v| v.volume.as_ref().map(|v| (v.epoch, v.primary)))
        .max()
        .map(|(_, p)| format!("n{p}"));
    // Device failures are drawn only when asked for, after the other kinds, so a
    // seed's draws without them stay what they were.
    let base = if opts.disk_faults { 13 } else { 10 };
    let devices = base + if opts.device_faults { 2 } else { 0 };
    let full = devices + if opts.full_disk { 2 } else { 0 };
    let cuts = full + if opts.conn_cuts { 3 } else { 0 };
    let handovers = cuts + if opts.handovers { 3 } else { 0 };
    let snapshots = handovers + if opts.snapshots { 4 } else { 0 };
    let reverts = snapshots + if opts.snapshots && opts.reverts { 3 } else { 0 };
    let draw = rng.u32(..reverts + if opts.snapshots && opts.clones { 3 } else { 0 });
    if draw >= reverts {
        return Some(Pick::Clone);
    }
    if draw >= snapshots {
        return Some(Pick::Revert);
    }
    if draw >= handovers {
        // Creations three times as often as deletions.
        return Some(Pick::Snapshot(draw < handovers + 3));
    }
    if draw >= cuts {
        // Another copy's node, as the freshest view names them.
        let v = sh
            .borrow()
            .views
            .values()
            .filter_map(|v| v.volume.clone())
            .max_by_key(|v| v.epoch)?;
        let others: Vec<u64> = v
            .replicas
            .iter()
            .copied()
            .filter(|n| *n != v.primary)
            .collect();
        if others.is_empty() {
            return None;
        }
        return Some(Pick::Primary(others[rng.usize(..others.len())]));
    }
    if draw >= full {
        let hosts: Vec<&str> = nodes().iter().copied().chain(["rs", "client"]).collect();
        let host = match primary.filter(|_| rng.bool()) {
            Some(p) => p,
            None => hosts[rng.usize(..hosts.len())].to_string(),
        };
        return Some(Pick::Cut(host));
    }
    if draw >= base {
        let room = 2usize.saturating_sub(nodes().len() - up.len() + failed.len());
        let healthy: Vec<&str> = up
            .iter()
            .copied()
            .filter(|n| !failed.contains(*n))
            .collect();
        if room == 0 || healthy.is_empty() {
            return None;
        }
        let node = match primary.filter(|p| healthy.contains(&p.as_str()) && rng.bool()) {
            Some(p) => p,
            None => healthy[rng.usize(..healthy.len())].to_string(),
        };
        return Some(Pick::Lasting(if draw >= devices {
            Fault::Full(node, until)
        } else {
            Fault::Device(node, until)
        }));
    }
    match draw {
        10..=12 => {
            // One copy's disk at a time per block, so that two copies stay whole.
            let node = nodes()[rng.usize(..nodes().len())];
            let written = written_lbas(opts);
            let lba = written[rng.u64(..written.len() as u64) as usize];
            if !last_copies_safe(sh, node) || !disk_pages.insert(lba / lazarus_types::FANOUT_U64) {
                return None;
            }
            let fault = match rng.u32(..4) {
                0 => DiskFault::Corrupt {
                    lba,
                    target: "slice",
                },
                1 => DiskFault::Corrupt {
                    lba,
                    target: "checksum",
                },
                2 => DiskFault::Corrupt {
                    lba,
                    target: "block",
                },
                _ => DiskFault::Eio { lba },
            };
            Some(Pick::Disk(node.to_string(), fault))
        }
        0..=4 => {
            let room = 2usize.saturating_sub(nodes().len() - up.len() + failed.len());
            if room == 0 || up.is_empty() {
                return None;
            }
            let mut pick: Vec<String> = Vec::new();
            if let Some(p) = primary.filter(|p| up.contains(&p.as_str()) && rng.bool()) {
                pick.push(p);
            }
            let want = if room >= 2 && rng.u32(..3) == 0 { 2 } else { 1 };
            while pick.len() < want.min(up.len()) {
                let n = up[rng.usize(..up.len())].to_string();
                if !pick.contains(&n) {
                    pick.push(n);
                }
            }
            Some(Pick::Lasting(Fault::Down(pick, until)))
        }
        5..=7 => {
            let a = nodes()[rng.usize(..nodes().len())];
            let b = nodes()[rng.usize(..nodes().len())];
            if a == b || active.iter().any(|f| matches!(f, Fault::Hold(..))) {
                return None;
            }
            Some(Pick::Lasting(Fault::Hold(a.into(), b.into(), until)))
        }
        _ => {
            if down.contains("rs") {
                return None;
            }
            Some(Pick::Lasting(Fault::Down(vec!["rs".into()], until)))
        }
    }
}

/// Runs one seed in a process of its own (the `lazarus-sim` binary at `exe`), as
/// every seed must be run to replay exactly: tokio numbers its tasks from a counter
/// shared by the whole process, and the order in which a crashed host's tasks are
/// dropped (and so its connections closed) follows those numbers, so a seed run after
/// other simulations in one process is not the same run as that seed alone.
pub fn run_in_process(exe: &Path, opts: &Options) -> Result<Report, String> {
    let out = std::process::Command::new(exe)
        .arg("run")
        .arg(serde_json::to_string(opts).expect("options serialize"))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    match serde_json::from_str::<Result<Report, String>>(line) {
        Ok(r) => r,
        Err(_) => Err(format!(
            "seed {}: the simulation process failed ({}): {}{}",
            opts.seed,
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Runs seeds `first..first + count` on `jobs` processes at a time; returns each
/// seed's result in seed order.
pub fn sweep(
    exe: &Path,
    base: &Options,
    first: u64,
    count: u64,
    jobs: usize,
) -> Vec<(u64, Result<Report, String>)> {
    let next = std::sync::atomic::AtomicU64::new(first);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                let mut o = base.clone();
                o.seed = seed;
                let r = run_in_process(exe, &o);
                results.lock().unwrap().push((seed, r));
            });
        }
    });
    let mut r = results.into_inner().unwrap();
    r.sort_by_key(|(s, _)| *s);
    r
}

/// What the scripted scenario's client asks the scheduler to do, and when it may go on.
#[derive(Default)]
struct Script {
    /// Set by the client: hold the link between these two nodes, then crash the first.
    hold_and_crash: Option<(&'static str, &'static str)>,
    /// Set by the scheduler once the forwarder crashed.
    crashed: bool,
    /// Set by the client: release the held link.
    release: bool,
    released: bool,
    outcome: Option<Result<String, String>>,
}

thread_local! {
    static SCRIPT: RefCell<Option<Rc<RefCell<Script>>>> = const { RefCell::new(None) };
}

fn script() -> Rc<RefCell<Script>> {
    SCRIPT.with(|s| s.borrow().clone().expect("a scripted scenario is running"))
}

/// A scripted run, not a random one: a write forwarded by a replica is held up in the
/// network while the replica crashes; the client reconnects to the primary, writes the
/// same block again and flushes; then the old write reaches the primary. It must not
/// be applied over the flushed one (forward.rs, `FenceToken`). Returns what the last
/// read found.
pub fn stale_forwarded_write(seed: u64) -> Result<String, String> {
    let sh = Rc::new(RefCell::new(Shared::default()));
    SHARED.with(|s| *s.borrow_mut() = Some(sh.clone()));
    let sc = Rc::new(RefCell::new(Script::default()));
    SCRIPT.with(|s| *s.borrow_mut() = Some(sc.clone()));
    let _ = lazarus_io::rt::take_exit_requests();
    fastrand::seed(seed);
    let mut sim = crate::builder(seed, Duration::from_secs(120)).build();
    sim.host("rs", || crate::serve_rs(None));
    let written = Arc::new(vec![5u64]);
    for &id in nodes() {
        let w = written.clone();
        sim.host(id, move || run_node(id, 1024 * BLOCK as u64, w.clone()));
    }
    sim.client("client", async {
        let r = stale_forwarded_write_client().await;
        script().borrow_mut().outcome = Some(r);
        Ok(())
    });
    loop {
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("simulation failed: {e}")),
        }
        if let Some(o) = sc.borrow().outcome.clone() {
            return o;
        }
        let hc = sc.borrow_mut().hold_and_crash.take();
        if let Some((fwd, primary)) = hc {
            sim.hold(fwd, primary);
            // The forwarded write is on its way (held) when the forwarder dies.
            for _ in 0..50 {
                let _ = sim.step();
            }
            sim.crash(fwd);
            sc.borrow_mut().crashed = true;
        }
        if sc.borrow().release && !sc.borrow().released {
            for &n in nodes() {
                for &m in nodes() {
                    if n != m {
                        sim.release(n, m);
                    }
                }
            }
            sc.borrow_mut().released = true;
        }
    }
    let o = sc.borrow().outcome.clone();
    o.unwrap_or_else(|| Err("the scenario did not finish".into()))
}

async fn stale_forwarded_write_client() -> Result<String, String> {
    let lba = 5u64;
    let off = lba * BLOCK as u64;
    // Wait for the volume and its primary.
    let (primary, fwd) = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let p = shared().borrow().views.values().find_map(|v| {
            v.volume
                .as_ref()
                .filter(|m| m.live().len() == 3)
                .map(|m| m.primary)
        });
        if let Some(p) = p {
            let primary = ALL_NODES[(p - 1) as usize];
            let fwd = ALL_NODES[(p % 3) as usize];
            break (primary, fwd);
        }
    };
    let connect = |n: &'static str| async move {
        tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&addr(n, NBD_PORT), VOLUME))
            .await
            .map_err(|_| format!("connect to {n} timed out"))?
            .map_err(|e| format!("connect to {n}: {e}"))
    };
    let ok = |r: std::io::Result<Reply>, what: &str| match r {
        Ok(Reply::Ok(d)) => Ok(d),
        other => Err(format!("{what}: {other:?}")),
    };
    let mut f = connect(fwd).await?;
    ok(
        f.write(off, &block(lba, 1)).await,
        "write v1 via the forwarder",
    )?;
    ok(f.flush().await, "flush v1")?;
    // v2 goes out through the forwarder, which is cut off from the primary and dies.
    script().borrow_mut().hold_and_crash = Some((fwd, primary));
    let pending = tokio::spawn(async move { f.write(off, &block(lba, 2)).await });
    while !script().borrow().crashed {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lost = pending.await.map_err(|e| e.to_string())?;
    tracing::info!(target: "client", ?lost, "the write through the crashed forwarder");
    // The client reconnects to the primary, writes v3 and flushes.
    let mut p = connect(primary).await?;
    ok(
        p.write(off, &block(lba, 3)).await,
        "write v3 via the primary",
    )?;
    ok(p.flush().await, "flush v3")?;
    // Now the held write reaches the primary.
    script().borrow_mut().release = true;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = ok(p.read(off, BLOCK as u32).await, "read")?;
    let v = u64::from_le_bytes(d[8..16].try_into().unwrap());
    if v != 3 {
        return Err(format!(
            "block {lba} reads version {v} after version 3 was written and flushed (v2 was sent, through {fwd}, before it)"
        ));
    }
    Ok(format!(
        "block {lba} reads version 3 (primary {primary}, forwarder {fwd})"
    ))
}
