//! The node's membership in the cluster: an openraft instance over `rpc`, its network
//! adapter, and the helpers the rest of the node uses (propose a metadata change from
//! any node, read the applied metadata, report Raft status).

use crate::config::NodeConfig;
use crate::decide::unmarked_dead;
use lazarus_cluster::raft_store::{NodeId, Raft, Store, TypeConfig};
use lazarus_cluster::ReplicaState;
use lazarus_cluster::{MetaCommand, MetaResponse, NodeInfo};
pub use lazarus_rpc::msg::Update;
use lazarus_rpc::{
    self as rpc, RpcClient, KIND_APPEND, KIND_BLOCKS, KIND_CLIENT_WRITE, KIND_FLUSH, KIND_FORWARD,
    KIND_LEASE, KIND_PAGE, KIND_PING, KIND_REPLICATE, KIND_REPLICATE_IDS, KIND_RESYNC_BEGIN,
    KIND_ROOT, KIND_SNAPSHOT, KIND_STATS, KIND_TREE, KIND_VOTE,
};
use lazarus_store::Store as BlockStore;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Raft timing: heartbeats every 150 ms, elections after 0.5-1 s of silence, so a dead
/// leader is replaced well within the 5 s failover budget.
const HEARTBEAT_MS: u64 = 150;
const ELECTION_TIMEOUT_MIN_MS: u64 = 500;
const ELECTION_TIMEOUT_MAX_MS: u64 = 1000;
/// How long a metadata proposal keeps retrying (no leader yet, leader changing).
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
const PROPOSE_RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// Numeric Raft id of a node name: the digits it ends with ("n3" -> 3).
pub fn raft_id(name: &str) -> Result<NodeId, String> {
    let digits: String = name
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    match digits.parse::<NodeId>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "node id {name:?} must end in a positive number (n1, n2, ...) to be a Raft member"
        )),
    }
}

#[derive(Clone, Default)]
pub struct Network {
    clients: Arc<Mutex<HashMap<String, Arc<RpcClient>>>>,
    /// Peer RPC addresses from this node's configuration: they win over the addresses
    /// recorded in the Raft membership, so a cluster restarted on other ports (or
    /// hosts) still finds itself.
    configured: Arc<HashMap<NodeId, String>>,
    /// `lazarus fault isolate`: every call to another node fails, and every call
    /// from one is refused (the recovery server is not cut).
    pub(crate) isolated: Arc<AtomicBool>,
    /// The cluster credentials every connection to a member is made with.
    pub(crate) tls: Option<Arc<rpc::Credentials>>,
}

impl Network {
    /// The connection to `addr` that carries data: replication, resyncs, repairs,
    /// forwarded requests.
    pub fn client(&self, addr: &str) -> Arc<RpcClient> {
        self.client_on(addr, addr)
    }

    /// A connection of its own to `addr` for what decides who serves (Raft, pings,
    /// leases, proposals): it never waits behind a flood of updates on the data
    /// connection, nor behind a replica still applying them, so a busy member still
    /// answers in time and is not taken for a dead one.
    pub fn control(&self, addr: &str) -> Arc<RpcClient> {
        self.client_on(&format!("{addr} control"), addr)
    }

    fn client_on(&self, key: &str, addr: &str) -> Arc<RpcClient> {
        let mut clients = self.clients.lock().expect("clients lock");
        // Looked up before the entry API, which would allocate the key on every call
        // (the write path asks once per replica per write).
        if let Some(c) = clients.get(key) {
            return c.clone();
        }
        clients
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(
                    RpcClient::with_block(addr, self.isolated.clone())
                        .with_credentials(self.tls.clone()),
                )
            })
            .clone()
    }
}

pub struct Peer {
    target: NodeId,
    client: Arc<RpcClient>,
}

impl Peer {
    async fn send<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &self,
        kind: u8,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>> {
        let unreachable =
            |m: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(m)));
        let body = serde_json::to_vec(req).map_err(|e| unreachable(e.to_string()))?;
        let bytes = self
            .client
            .call(kind, &body, ttl)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let r: Result<Resp, E> =
            serde_json::from_slice(&bytes).map_err(|e| unreachable(format!("bad reply: {e}")))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let addr = self
            .configured
            .get(&target)
            .cloned()
            .unwrap_or_else(|| node.addr.clone());
        Peer {
            target,
            client: self.control(&addr),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(KIND_APPEND, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(KIND_SNAPSHOT, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(KIND_VOTE, &rpc, option.hard_ttl()).await
    }
}

pub struct Cluster {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Store,
    pub network: Network,
    /// The node's block store, which replicated updates are applied to.
    pub(crate) blocks: Arc<BlockStore>,
    /// Nodes this one sends no replication traffic to (`lazarus fault drop`); resync
    /// reads they ask of this node fail too.
    pub drops: parking_lot::Mutex<BTreeSet<NodeId>>,
    /// Nodes this one holds replication updates to (`lazarus fault stall`): never sent
    /// while the fault lasts.
    pub stalls: parking_lot::Mutex<BTreeSet<NodeId>>,
    /// The leases this node holds as a primary, and (on the leader) those it grants.
    pub(crate) leases: crate::lease::Leases,
    /// Set once the start-up self-check is done: updates are refused before, so a
    /// node that crashed is never counted as having copies it may have lost.
    ready: AtomicBool,
    incarnation: u64,
    /// Per volume, bumped before this process replaces any part of its copy from
    /// elsewhere (a resync, a restore from the recovery server): writes it applied
    /// before may be gone from it, so it no longer vouches for them (nbd_server.rs,
    /// `Acks`). Per volume: a resync of one copy says nothing about the others.
    copies_replaced: parking_lot::Mutex<HashMap<String, u64>>,
    pub resync: crate::resync::ResyncState,
    /// The node's block locks, shared with its engine (`stripes.rs`).
    pub(crate) stripes: Arc<crate::stripes::Stripes>,
    /// What the node's front end answers (the engine, which sits above the cluster):
    /// requests forwarded by other nodes and the node's own summary. Installed once at
    /// start-up (`serve_front`); until then such requests are told the node is starting.
    front: OnceLock<rpc::Handler>,
    /// The recovery server (jeopardy protection, coordination point), if configured.
    pub recovery: Option<Arc<crate::jeopardy::Recovery>>,
    /// Where the comparison of the live copies with this primary's stands, per volume
    /// (`reconcile.rs`).
    pub(crate) reconciliation: crate::reconcile::Reconciliation,
    /// Per volume, replicated writes between their lease check and their answer
    /// (`updates_in_flight`): a comparison of the copies' roots waits for those of its
    /// volume to finish (another volume's busy writers never hold it up).
    in_flight: parking_lot::Mutex<HashMap<String, Arc<std::sync::atomic::AtomicUsize>>>,
    /// Per volume this node is primary of: client sessions opened (`forward::FenceToken`).
    pub(crate) fences: parking_lot::Mutex<HashMap<String, u64>>,
    /// Per volume whose copy the metadata loop could not create here: whether for
    /// lack of space, and the error (cleared once created).
    pub(crate) copy_errors: parking_lot::Mutex<HashMap<String, (bool, String)>>,
    /// The survivor protocol's record of whom this node heard from (`survivor.rs`).
    pub(crate) contacts: crate::survivor::Contacts,
    /// When this process started.
    pub(crate) started: Instant,
    /// Per volume: replicated updates hold it shared from their epoch check to their
    /// apply; a root check holds it exclusively, so it never reads a root that an
    /// update admitted under the previous epoch has yet to change.
    pub(crate) apply_guards: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// When each peer last answered this node's pings (`watch_peers`).
    pub(crate) seen: crate::membership::PeerSeen,
    /// How long a node may answer no one before the leader marks it out.
    pub(crate) out_after: Duration,
    /// Bytes per second a resync may fetch (none: no limit).
    pub(crate) resync_rate: Option<u64>,
    /// Per volume, since when (on this leader) a copy waits for the node replacing its
    /// node (`lazarus node replace`) to answer.
    pub(crate) replacement_waits: parking_lot::Mutex<HashMap<String, Instant>>,
    /// The clones this process is filling (`clones.rs`).
    pub(crate) filling: crate::clones::Filling,
}

impl Cluster {
    pub(crate) fn apply_guard(&self, volume: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.apply_guards
            .lock()
            .entry(volume.to_string())
            .or_default()
            .clone()
    }
}

/// Milliseconds since the Unix epoch (for failure histories).
pub(crate) fn unix_ms() -> u64 {
    lazarus_io::rt::unix_ms().max(1)
}

/// What this node is for a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not a cluster volume (a node-local one).
    Local,
    Primary {
        epoch: u64,
    },
    /// Another node is primary; requests go there.
    Replica {
        primary: NodeId,
        addr: String,
    },
}

/// How long a lease lasts, counted from when the primary asked for it. Shorter than
/// `PRIMARY_SILENCE_MAX`, which the leader counts from when it received the request,
/// so a primary that stopped asking has stopped serving before it is replaced.
pub(crate) const LEASE: Duration = Duration::from_millis(400);
/// How long a primary waits for its lease (at start-up, while the leader changes, or
/// when a renewal came late) before answering a request with an error.
pub const LEASE_WAIT: Duration = Duration::from_secs(3);

/// Deadline for one replicated update to a replica.
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the leader checks that every volume's primary answers.
const FAILOVER_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long an update to a copy that still sees itself dead waits for this node's
/// metadata to catch up with the primary's (see `apply_update`).
const DEAD_CATCH_UP: Duration = Duration::from_millis(1000);
pub(crate) const PING_TIMEOUT: Duration = Duration::from_millis(300);
/// A primary that has not asked for its lease this long is replaced (with Raft election, within the 5 s budget).
pub(crate) const PRIMARY_SILENCE_MAX: Duration = Duration::from_millis(600);
/// How often a node checks the metadata for copies it must create or delete.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);

impl Cluster {
    /// Starts Raft on this node. The member with the smallest id initializes the
    /// cluster the first time (membership = every configured node); the others wait
    /// to be contacted.
    pub async fn start(
        cfg: &NodeConfig,
        blocks: Arc<BlockStore>,
        stripes: Arc<crate::stripes::Stripes>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let id = raft_id(&cfg.id).map_err(anyhow::Error::msg)?;
        let rpc_listen = cfg
            .rpc_listen
            .ok_or_else(|| anyhow::anyhow!("rpc_listen is required in a cluster"))?;
        let mut members: BTreeMap<NodeId, BasicNode> = BTreeMap::new();
        members.insert(
            id,
            BasicNode {
                addr: rpc_listen.to_string(),
            },
        );
        for p in &cfg.peers {
            let pid = raft_id(&p.id).map_err(anyhow::Error::msg)?;
            if members
                .insert(
                    pid,
                    BasicNode {
                        addr: p.rpc.clone(),
                    },
                )
                .is_some()
            {
                anyhow::bail!("node id {} appears twice in the configuration", p.id);
            }
        }
        let tls = match &cfg.cluster_tls {
            Some(dir) => Some(rpc::Credentials::load(dir).map_err(|e| {
                anyhow::anyhow!("cluster credentials (cluster_tls = {}): {e}", dir.display())
            })?),
            None => {
                tracing::warn!(
                    node = cfg.id,
                    "no cluster_tls in the configuration: cluster traffic is neither authenticated nor encrypted (SECURITY.md)"
                );
                None
            }
        };
        let store = Store::open(&cfg.data_dir.join("raft.redb")).map_err(anyhow::Error::msg)?;
        let config = openraft::Config {
            cluster_name: "lazarus".into(),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            ..Default::default()
        }
        .validate()?;
        let network = Network {
            configured: Arc::new(
                members
                    .iter()
                    .map(|(id, n)| (*id, n.addr.clone()))
                    .collect(),
            ),
            tls: tls.clone(),
            ..Default::default()
        };
        let raft = Raft::new(
            id,
            Arc::new(config),
            network.clone(),
            store.clone(),
            store.clone(),
        )
        .await?;
        let cluster = Arc::new(Cluster {
            id,
            raft,
            store,
            network,
            blocks,
            drops: Default::default(),
            stalls: Default::default(),
            leases: Default::default(),
            ready: AtomicBool::new(false),
            // Unique per start of this node: the clock, and the process id apart from
            // the simulator's hosts (which share one process and must replay).
            incarnation: lazarus_io::rt::wall_clock_nanos()
                ^ if lazarus_io::net::in_simulation() {
                    0
                } else {
                    (std::process::id() as u64) << 32
                },
            copies_replaced: Default::default(),
            resync: Default::default(),
            stripes,
            front: OnceLock::new(),
            recovery: crate::jeopardy::Recovery::new(cfg, tls.clone()),
            reconciliation: Default::default(),
            in_flight: Default::default(),
            fences: Default::default(),
            contacts: Default::default(),
            copy_errors: Default::default(),
            started: Instant::now(),
            apply_guards: Default::default(),
            seen: Default::default(),
            out_after: Duration::from_secs(cfg.out_after_secs.max(1)),
            resync_rate: (cfg.resync_max_mib_s > 0).then_some(cfg.resync_max_mib_s << 20),
            replacement_waits: Default::default(),
            filling: Default::default(),
        });
        let listener = lazarus_rpc::net::Listener::bind(&rpc_listen.to_string())
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for RPC on {rpc_listen}: {e}"))?;
        let c = cluster.clone();
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(rpc::serve_inline(
            listener,
            tls,
            Arc::new(move |kind, body| {
                let c = c.clone();
                Box::pin(async move { c.handle(kind, body).await.map_err(rpc::Remote::from) })
            }),
            Some(Arc::new(move |kind, body: &[u8]| {
                weak.upgrade().and_then(|c| c.apply_inline(kind, body))
            })),
        ));
        if cfg.join {
            if !cluster.raft.is_initialized().await? {
                tracing::info!(
                    node = id,
                    "waiting to be added to the cluster (`lazarus node add {}` on a member)",
                    cfg.id
                );
            }
        } else if !cluster.raft.is_initialized().await? && members.keys().next() == Some(&id) {
            match cluster.raft.initialize(members.clone()).await {
                Ok(()) => {
                    tracing::info!(node = id, members = ?members.keys().collect::<Vec<_>>(), "cluster initialized")
                }
                Err(e) => tracing::info!(node = id, error = %e, "cluster already initialized"),
            }
        }
        Ok(cluster)
    }

    async fn handle(&self, kind: u8, body: Vec<u8>) -> Result<Vec<u8>, String> {
        fn de<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
            serde_json::from_slice(b).map_err(|e| format!("bad request: {e}"))
        }
        fn ser<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
            serde_json::to_vec(v).map_err(|e| e.to_string())
        }
        if self.network.isolated.load(Ordering::Relaxed) {
            return Err("this node is isolated (lazarus fault isolate)".into());
        }
        match kind {
            KIND_APPEND => ser(&self.raft.append_entries(de(&body)?).await),
            KIND_VOTE => ser(&self.raft.vote(de(&body)?).await),
            KIND_SNAPSHOT => ser(&self.raft.install_snapshot(de(&body)?).await),
            // A node that has not finished its start-up check (its metadata may be
            // behind the leader's) does not answer as a member: it is no promotion
            // candidate and no failure domain until then.
            KIND_PING => {
                self.heard_from(&body);
                if !self.is_ready() {
                    Err("this node is starting up".into())
                } else if !self.device_usable() {
                    Ok(lazarus_rpc::msg::PING_DEVICE_FAILED.to_vec())
                } else if self.claimed_beyond_metadata_any() {
                    // It answers, but a primary must not count it as a live replica
                    // it is in contact with: it serves a volume on its own.
                    Ok(lazarus_rpc::msg::PING_HELD.to_vec())
                } else {
                    Ok(lazarus_rpc::msg::PING_OK.to_vec())
                }
            }
            KIND_ROOT => self.serve_root(de(&body)?).await,
            KIND_LEASE => ser(&self.serve_lease(de(&body)?).await),
            KIND_STATS
            | KIND_FORWARD
            | lazarus_rpc::KIND_VOLUME_SNAPSHOT
            | lazarus_rpc::KIND_SNAPSHOT_FETCH
            | lazarus_rpc::KIND_VOLUME_RESET => self.ask_front(kind, body).await,
            KIND_RESYNC_BEGIN | KIND_TREE | KIND_PAGE | KIND_BLOCKS => {
                self.serve_resync(kind, &body).await
            }
            KIND_REPLICATE | KIND_REPLICATE_IDS | KIND_FLUSH => {
                let (json, raw) = rpc::unpack(&body)?;
                let u: Update = de(json)?;
                let (raw, ids) = match kind {
                    KIND_REPLICATE_IDS => {
                        let (data, ids) = split_ids(raw)?;
                        (data, Some(ids))
                    }
                    _ => (raw, None),
                };
                // A flush is node-wide; its holder is not compared with writes'.
                let volume = match &u {
                    Update::Write { volume, .. } | Update::Zero { volume, .. } => volume.clone(),
                    Update::Flush => String::new(),
                };
                self.apply_update(u, raw, ids.as_deref()).await?;
                Ok(self.holder(&volume))
            }
            KIND_CLIENT_WRITE => {
                let cmd: MetaCommand = de(&body)?;
                // A node registers itself only once the group has it: a removed node
                // started again does not come back as a member on its own word.
                if let MetaCommand::SetNode { id, .. } = &cmd {
                    let known = self
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(id)
                        .is_some();
                    if !known {
                        return ser(&Err::<MetaResponse, String>(format!(
                            "node {id} is not in the cluster's Raft group (removed, or not added yet: `lazarus node add`)"
                        )));
                    }
                }
                let r = self
                    .raft
                    .client_write(cmd)
                    .await
                    .map(|w| w.data)
                    .map_err(|e| e.to_string());
                ser(&r)
            }
            other => Err(format!("unknown RPC kind {other}")),
        }
    }

    /// Commits a metadata change from any node: locally when this node leads, else
    /// through the leader; retries while there is no leader. Returns once the change
    /// is committed (and applied on the leader).
    pub async fn propose(&self, cmd: MetaCommand) -> anyhow::Result<MetaResponse> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            let attempt: Result<MetaResponse, String> = match leader {
                Some(l) if l == self.id => {
                    // Without a majority a proposal never commits: bound the wait.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match tokio::time::timeout(left, self.raft.client_write(cmd.clone())).await {
                        Ok(r) => r.map(|w| w.data).map_err(|e| e.to_string()),
                        Err(_) => Err("not committed in time (no majority reachable?)".to_string()),
                    }
                }
                Some(l) => {
                    let addr = self.rpc_addr(l);
                    match addr {
                        Some(addr) => {
                            let body = serde_json::to_vec(&cmd)?;
                            match self
                                .network
                                .control(&addr)
                                .call(KIND_CLIENT_WRITE, &body, PROPOSE_RPC_TIMEOUT)
                                .await
                            {
                                Ok(bytes) => {
                                    serde_json::from_slice::<Result<MetaResponse, String>>(&bytes)?
                                }
                                Err(e) => Err(e.to_string()),
                            }
                        }
                        None => Err(format!("leader {l} has no address")),
                    }
                }
                None => Err("no leader".into()),
            };
            match attempt {
                Ok(r) => return Ok(r),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "metadata proposal not committed yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => anyhow::bail!("metadata change not committed: {e}"),
            }
        }
    }

    /// Random per process start.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Registers this node's addresses in the metadata (retried in the background
    /// until a leader commits it), then, once this node has applied everything
    /// committed before it started, runs the start-up self-check: after a crash (not
    /// `clean`), copies it held as a replica may have lost unflushed updates, so it
    /// reports them dead (they resync); a volume it was primary of is handed to a live
    /// replica that answers, which has every acknowledged write. Updates are refused
    /// until this is done.
    pub fn start_up(
        self: &Arc<Self>,
        mut info: NodeInfo,
        clean: bool,
        local: std::collections::HashSet<String>,
    ) {
        info.incarnation = self.incarnation;
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                match c
                    .propose(MetaCommand::SetNode {
                        id: c.id,
                        info: info.clone(),
                    })
                    .await
                {
                    Ok(_) => break,
                    Err(e) => tracing::warn!(error = %e, "registration not committed yet"),
                }
            }
            while c.store.meta().nodes.get(&c.id).map(|n| n.incarnation) != Some(c.incarnation) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!(node = c.id, clean, "registered in the cluster metadata");
            if let Some(r) = &c.recovery {
                let meta = c.store.meta();
                let in_force = meta.jeopardy_policy();
                if in_force != r.configured_policy {
                    let others: Vec<String> = meta
                        .nodes
                        .values()
                        .map(|n| format!("{} {:?}", n.name, n.jeopardy_policy.unwrap_or_default()))
                        .collect();
                    tracing::warn!(configured = ?r.configured_policy, in_force = ?in_force, nodes = ?others, "this node's jeopardy policy is not the cluster's: every node follows {in_force:?} (accept holds only while every node was started with it)");
                }
            }
            c.self_check(clean, &local).await;
            c.ready.store(true, Ordering::Release);
        });
    }

    async fn self_check(&self, clean: bool, local: &std::collections::HashSet<String>) {
        let meta = self.store.meta();
        for v in meta.volumes.values() {
            if !v.replicas.contains(&self.id) || clean && local.contains(&v.name) {
                continue;
            }
            // Its copy holds writes acknowledged under a claim the metadata does not
            // know of yet (claims.rs): neither handed on nor marked dead, so it never
            // resyncs from an older copy; the leader adopts the claim.
            if self.claimed_beyond_metadata(&v.name) {
                tracing::warn!(volume = %v.name, "this node held the volume at the recovery server beyond the metadata before it restarted: its copy waits for the cluster to adopt that claim");
                continue;
            }
            if v.primary == self.id {
                for n in v.replicas.iter().copied().filter(|n| *n != self.id) {
                    if v.state_of(n) != Some(ReplicaState::Live) || !self.answers(&meta, n).await {
                        continue;
                    }
                    let Ok(fcid) = self.fence_promotion(v, n).await else {
                        continue;
                    };
                    let cmd = MetaCommand::Promote {
                        volume: v.name.clone(),
                        node: n,
                        epoch: v.epoch,
                        fcid,
                    };
                    if let Ok(MetaResponse::Volume(nv)) = self.propose(cmd).await {
                        tracing::warn!(volume = %v.name, new = n, epoch = nv.epoch, "copy may have lost updates (crash, or missing at start): handed the primary role to a live replica");
                        break;
                    }
                }
            } else if v.state_of(self.id) != Some(ReplicaState::Dead) {
                // A crash keeps every flushed write (at_ms 0: not stale, promotable if
                // nothing live is left); a copy missing here has nothing (stale).
                let at_ms = if local.contains(&v.name) {
                    0
                } else {
                    lazarus_io::rt::unix_ms().max(1)
                };
                let cmd = MetaCommand::SetReplicaState {
                    volume: v.name.clone(),
                    node: self.id,
                    state: ReplicaState::Dead,
                    epoch: v.epoch,
                    at_ms,
                    since: None,
                    source: None,
                };
                match self.propose(cmd).await {
                    Ok(MetaResponse::Volume(_)) => {
                        tracing::warn!(volume = %v.name, "copy may have lost updates (crash, or missing at start): marked dead until it resyncs")
                    }
                    other => {
                        tracing::warn!(volume = %v.name, result = ?other, "could not mark this copy dead")
                    }
                }
            }
        }
    }

    /// Records leases on `(volume, epoch)` pairs, valid until `asked + LEASE` where
    /// `asked` is when this node sent the request that the grant answers.
    pub(crate) fn grant(&self, volumes: &[(String, u64)], asked: Instant) {
        self.leases.grant(volumes, asked + LEASE);
    }

    /// Whether this node may serve `volume` as its primary at `epoch` right now: a
    /// lease from the Raft leader, or a hold from the recovery server. In jeopardy
    /// under policy `suspend` only the hold counts (`hold_only`).
    /// At an epoch the metadata gave it, only once its live copies are reconciled
    /// with it (`reconcile.rs`).
    pub fn lease_valid(&self, volume: &str, epoch: u64) -> bool {
        self.role_valid(volume, epoch)
            && (self.reconciled(volume, epoch) || self.held_beyond_metadata(volume))
    }

    /// `lease_valid` without the reconciliation: this node still holds the role at
    /// `epoch` (no successor can serve meanwhile). What an update admitted under the
    /// whole lease needs to go on: a comparison of the copies started after it was
    /// admitted (`reconcile_again`, another write's failure) waits for it to finish
    /// (`updates_in_flight`), so it must not wait for that comparison in turn.
    pub fn role_valid(&self, volume: &str, epoch: u64) -> bool {
        let raft = !self.hold_only(volume)
            && self.raft_lease_valid(volume, epoch)
            && self.contact_valid(volume);
        (raft || self.hold_valid(volume, epoch)) && !self.restoring(volume)
    }

    /// Whether this node holds `volume` at the recovery server and is still restoring
    /// its copy from the log: it serves nothing of it then, whatever lease the
    /// metadata's view gives it (it may be the metadata's primary, taking its volume
    /// back over from a holder that died).
    pub fn restoring(&self, volume: &str) -> bool {
        self.recovery
            .as_ref()
            .and_then(|r| r.hold(volume))
            .is_some_and(|h| h.restoring)
    }

    /// Waits up to `wait` for `lease_valid(volume, epoch)`, while the metadata still
    /// names this node the volume's primary at `epoch`. A lease renewal delayed by a
    /// busy machine (a stalled runtime, a slow fsync) lapses for a moment: a request
    /// then waits for the next renewal instead of failing. Validity at the same epoch
    /// is enough: the leader grants it only while the metadata names this node primary
    /// at that epoch, epochs only grow, and no successor serves before this node's
    /// last grant has run out (lease.rs).
    pub async fn await_lease(&self, volume: &str, epoch: u64, wait: Duration) -> bool {
        // The common case answered without the waiting loop's state in the caller's
        // future (the write path awaits this on every write).
        self.lease_valid(volume, epoch)
            || Box::pin(self.await_lease_slow(volume, epoch, wait, Self::lease_valid)).await
    }

    /// `await_lease` for `role_valid`: what an update already admitted waits for.
    pub async fn await_role(&self, volume: &str, epoch: u64, wait: Duration) -> bool {
        self.role_valid(volume, epoch)
            || Box::pin(self.await_lease_slow(volume, epoch, wait, Self::role_valid)).await
    }

    async fn await_lease_slow(
        &self,
        volume: &str,
        epoch: u64,
        wait: Duration,
        valid: fn(&Self, &str, u64) -> bool,
    ) -> bool {
        let deadline = Instant::now() + self.lease_wait(volume, wait);
        loop {
            if valid(self, volume, epoch) {
                return true;
            }
            let still_mine = self
                .effective(volume)
                .is_some_and(|v| v.primary == self.id && v.epoch == epoch);
            if !still_mine || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How long a request waits for the lease on `volume`: `wait`, or in jeopardy under
    /// `suspend` (`hold_only`) as long as a write waits for the recovery server
    /// (`jeopardy_suspend_secs`): the hold lapses with it.
    pub fn lease_wait(&self, volume: &str, wait: Duration) -> Duration {
        match self.recovery.as_ref() {
            Some(r) if self.hold_only(volume) => wait.max(r.suspend),
            _ => wait,
        }
    }

    pub(crate) fn raft_lease_valid(&self, volume: &str, epoch: u64) -> bool {
        self.leases.valid(volume, epoch, Instant::now())
    }

    /// Where node `id` takes RPCs: this node's configuration first, then the address
    /// it registered in the metadata, then the Raft membership's.
    pub fn rpc_addr(&self, id: NodeId) -> Option<String> {
        if let Some(a) = self.network.configured.get(&id) {
            return Some(a.clone());
        }
        if let Some(n) = self.store.meta().nodes.get(&id) {
            return Some(n.rpc.clone());
        }
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Volumes this node may serve as primary right now.
    pub fn held_leases(&self) -> Vec<String> {
        self.leases.held(Instant::now())
    }

    /// Why this node's copy of `volume` could not be created from the metadata, if it
    /// could not: (for lack of space, the error).
    pub fn local_copy_error(&self, volume: &str) -> Option<(bool, String)> {
        self.copy_errors.lock().get(volume).cloned()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Applies an update from a primary. Refused when this node's committed view says
    /// the sender is not entitled to it: an older epoch (a deposed primary), or this
    /// copy is dead (it gets nothing until it resyncs).
    async fn apply_update(
        &self,
        u: Update,
        raw: &[u8],
        ids: Option<&[lazarus_types::BlockId]>,
    ) -> Result<(), String> {
        // Before its start-up check a node may hold copies that lost unflushed writes
        // in a crash: it takes no update, and acknowledges no flush.
        if !self.is_ready() {
            return Err("this node is starting up and takes no updates yet".into());
        }
        if let Update::Write { volume, .. } | Update::Zero { volume, .. } = &u {
            if self.claimed_beyond_metadata(volume) {
                return Err(format!(
                    "fenced: this node holds {volume:?} at the recovery server; it takes no updates from another primary"
                ));
            }
        }
        let (volume, epoch) = match &u {
            Update::Write { volume, epoch, .. } | Update::Zero { volume, epoch, .. } => {
                (volume.clone(), *epoch)
            }
            Update::Flush => {
                let b = self.blocks.clone();
                return lazarus_rpc::rt::blocking(move || b.flush())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string());
            }
        };
        if !self.is_ready() {
            return Err("this node is starting up and takes no updates yet".into());
        }
        let guard = self.apply_guard(&volume);
        let _admitted = guard.read().await;
        let mut meta = self.store.meta();
        // A primary sends updates to this copy only once its own metadata has it
        // resyncing or live; this node applies that commit a moment after the leader
        // does. So a copy that still sees itself dead gives its state machine a moment
        // to catch up before it refuses (and is marked dead again).
        let t0 = Instant::now();
        while meta
            .volumes
            .get(&volume)
            .is_some_and(|v| epoch >= v.epoch && v.state_of(self.id) == Some(ReplicaState::Dead))
            && t0.elapsed() < DEAD_CATCH_UP
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            meta = self.store.meta();
        }
        let v = meta
            .volumes
            .get(&volume)
            .ok_or_else(|| format!("volume {volume:?} unknown here"))?;
        if epoch < v.epoch {
            return Err(format!(
                "update for {volume:?} from epoch {epoch} refused: this node is at epoch {}",
                v.epoch
            ));
        }
        if v.state_of(self.id) == Some(ReplicaState::Dead) {
            return Err(format!(
                "this copy of {volume:?} is dead; it takes updates only after a resync"
            ));
        }
        let local = match self.blocks.volume(&volume).filter(|l| l.meta.uid == v.uid) {
            Some(l) => l,
            // A new volume whose first update beats `reconcile` here: create the (empty,
            // hence current) copy now rather than fail the update and become dead. A
            // copy missing for any other reason was reported dead at start-up and never
            // gets this far.
            None if v.replicas.contains(&self.id) && self.blocks.volume(&volume).is_none() => {
                let (b, name, size, uid) =
                    (self.blocks.clone(), volume.clone(), v.size_bytes, v.uid);
                match lazarus_rpc::rt::block_in_place(|| b.create_volume_with_uid(&name, size, uid))
                {
                    Ok(l) => l,
                    Err(_) => self
                        .blocks
                        .volume(&volume)
                        .filter(|l| l.meta.uid == v.uid)
                        .ok_or_else(|| format!("cannot create the local copy of {volume:?}"))?,
                }
            }
            None => return Err(format!("no local copy of {volume:?} (uid {}) yet", v.uid)),
        };
        // The volume was grown and this update (to the new space, perhaps) beat
        // `reconcile` here: grow the copy now rather than fail and become dead.
        if local.size_bytes() < v.size_bytes {
            let (b, name, size) = (self.blocks.clone(), volume.clone(), v.size_bytes);
            lazarus_rpc::rt::block_in_place(|| b.resize_volume(&name, size))
                .map_err(|e| format!("cannot grow the local copy of {volume:?}: {e}"))?;
        }
        let apply = || self.apply_to(&local, &u, raw, ids);
        // Like the primary's engine: inline, unless the store may block (a checkpoint
        // holding writes off, or its backpressure flush).
        if self.blocks.write_may_block() {
            lazarus_rpc::rt::block_in_place(apply)
        } else {
            apply()
        }
    }

    /// Applies a write or zero update to this node's copy `local` (checked against its
    /// size), noting the blocks for a resync under way.
    fn apply_to(
        &self,
        local: &Arc<lazarus_store::Volume>,
        u: &Update,
        raw: &[u8],
        ids: Option<&[lazarus_types::BlockId]>,
    ) -> Result<(), String> {
        match *u {
            Update::Write { lba, .. } => {
                if raw.is_empty() || !raw.len().is_multiple_of(lazarus_types::BLOCK_SIZE) {
                    return Err("write payload is not whole blocks".to_string());
                }
                let n = (raw.len() / lazarus_types::BLOCK_SIZE) as u64;
                if lba
                    .checked_add(n)
                    .is_none_or(|end| end > local.block_count())
                {
                    return Err("write past the end of the volume".to_string());
                }
                self.resync.touch(&local.meta.name, lba, n);
                match ids {
                    // The ids the primary computed: stored under them without hashing
                    // (every read verifies a block against its id).
                    Some(ids) if ids.len() as u64 == n => {
                        self.blocks
                            .write_blocks_with_ids(local, lazarus_types::Lba(lba), raw, ids)
                    }
                    Some(_) => return Err("a write's ids do not match its blocks".to_string()),
                    None => self
                        .blocks
                        .write_blocks(local, lazarus_types::Lba(lba), raw),
                }
                .map_err(|e| e.to_string())?;
                self.blocks.flush_in_background();
                Ok(())
            }
            Update::Zero {
                lba,
                count,
                provision,
                ..
            } => {
                if lba
                    .checked_add(count)
                    .is_none_or(|end| end > local.block_count())
                {
                    return Err("zero past the end of the volume".to_string());
                }
                self.resync.touch(&local.meta.name, lba, count);
                self.blocks
                    .write_zeroes(local, lazarus_types::Lba(lba), count, provision)
                    .map_err(|e| e.to_string())?;
                self.blocks.flush_in_background();
                Ok(())
            }
            Update::Flush => Err("a flush is not applied to a copy".to_string()),
        }
    }

    /// A replicated write applied at once, in the RPC reader (`rpc::InlineHandler`),
    /// when nothing about it needs a wait: this node ready, its view current for the
    /// sender's epoch, its copy live or resyncing and present at the volume's size, no
    /// comparison of the copies' roots holding updates off (the apply guard), the store
    /// not near a durability point of its own. Anything
    /// else (`None`) goes the way of every request, `apply_update` in a task, which
    /// waits where it must and refuses with its reasons.
    fn apply_inline(&self, kind: u8, body: &[u8]) -> Option<rpc::HandlerReply> {
        if !matches!(kind, KIND_REPLICATE | KIND_REPLICATE_IDS)
            || self.network.isolated.load(Ordering::Relaxed)
            || !self.is_ready()
        {
            return None;
        }
        let (json, raw) = rpc::unpack(body).ok()?;
        let u: Update = serde_json::from_slice(json).ok()?;
        let Update::Write { volume, epoch, .. } = &u else {
            return None;
        };
        let (raw, ids) = if kind == KIND_REPLICATE_IDS {
            let (data, ids) = split_ids(raw).ok()?;
            (data, Some(ids))
        } else {
            (raw, None)
        };
        if self.claimed_beyond_metadata(volume) || self.blocks.write_may_block() {
            return None;
        }
        let guard = self.apply_guards.lock().get(volume.as_str()).cloned()?;
        let _admitted = guard.try_read().ok()?;
        let meta = self.store.meta();
        let v = meta.volumes.get(volume.as_str())?;
        if *epoch < v.epoch
            || !matches!(
                v.state_of(self.id),
                Some(ReplicaState::Live | ReplicaState::Resyncing)
            )
        {
            return None;
        }
        let local = self
            .blocks
            .volume(volume)
            .filter(|l| l.meta.uid == v.uid && l.size_bytes() >= v.size_bytes)?;
        Some(match self.apply_to(&local, &u, raw, ids.as_deref()) {
            Ok(()) => Ok(self.holder(volume)),
            Err(e) => Err(e.into()),
        })
    }

    /// Which process holds an update it applied (nbd_server.rs, `Acks`): its
    /// incarnation and how many times it has replaced part of its copy of `volume`.
    fn holder(&self, volume: &str) -> Vec<u8> {
        let mut who = self.incarnation.to_be_bytes().to_vec();
        who.extend_from_slice(&self.copy_gen(volume).to_be_bytes());
        who
    }

    /// How many times this process has replaced part of its copy of `volume`.
    pub fn copy_gen(&self, volume: &str) -> u64 {
        self.copies_replaced
            .lock()
            .get(volume)
            .copied()
            .unwrap_or(0)
    }

    /// Called before this process replaces part of its copy of `volume` from
    /// elsewhere: it no longer vouches for the writes it applied to it before.
    pub(crate) fn replacing_copy(&self, volume: &str) {
        *self
            .copies_replaced
            .lock()
            .entry(volume.to_string())
            .or_default() += 1;
    }

    /// Sends an update to every replica that takes updates and waits for all. A
    /// replica that fails is marked dead in committed metadata before this returns,
    /// so an acknowledged write is on every copy the metadata calls live. `on_rs`: the
    /// update is already durable on the recovery server. A write that reaches no live
    /// replica (the volume just fell to its last failure domain) enters jeopardy and
    /// goes to the recovery server before this returns: an acknowledged write is always
    /// on two failure domains.
    /// Sends an update to every copy that takes updates; returns the replica
    /// processes that applied it (node and incarnation, as they answered).
    /// `ids`: a write's block ids as this node computed them, for the replicas that
    /// take them (`KIND_REPLICATE_IDS`).
    pub async fn replicate(
        &self,
        volume: &str,
        u: Update,
        raw: &[u8],
        ids: Option<&[lazarus_types::BlockId]>,
        on_rs: bool,
    ) -> Result<Vec<lazarus_rpc::msg::Executor>, String> {
        let mut holders = Vec::new();
        self.replicate_into(volume, u, raw, ids, on_rs, &mut holders)
            .await?;
        Ok(holders)
    }

    /// The count of `volume`'s replicated writes in flight on this node (the engine
    /// holds it up from a write's lease check to its answer).
    pub fn updates_in_flight(&self, volume: &str) -> Arc<std::sync::atomic::AtomicUsize> {
        let mut m = self.in_flight.lock();
        match m.get(volume) {
            Some(c) => c.clone(),
            None => m.entry(volume.to_string()).or_default().clone(),
        }
    }

    /// Whether the committed metadata, at `epoch` still, has `node`'s copy of `volume`
    /// dead and stale or no longer places it there (dropped only once dead): writes
    /// acknowledged without it from now on need no further record.
    /// A refusal comes from the leader's state: this node's is given a moment to
    /// catch up with it.
    async fn copy_left_behind(&self, volume: &str, node: NodeId, epoch: u64) -> bool {
        let t0 = Instant::now();
        loop {
            let (done, same_epoch) =
                self.store
                    .meta()
                    .volumes
                    .get(volume)
                    .map_or((false, false), |v| {
                        let gone = !v.replicas.contains(&node)
                            || (v.state_of(node) == Some(ReplicaState::Dead)
                                && v.stale.contains(&node));
                        (v.epoch == epoch && gone, v.epoch == epoch)
                    });
            if done || !same_epoch || t0.elapsed() >= DEAD_CATCH_UP {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn replicate_into(
        &self,
        volume: &str,
        u: Update,
        raw: &[u8],
        ids: Option<&[lazarus_types::BlockId]>,
        on_rs: bool,
        holders: &mut Vec<lazarus_rpc::msg::Executor>,
    ) -> Result<(), String> {
        let Some(v) = self.effective(volume) else {
            return Ok(());
        };
        if v.primary != self.id {
            return Err(format!(
                "this node is not the primary of {volume:?} (node {} is)",
                v.primary
            ));
        }
        // Only under a lease: a primary paused past its lease may have been replaced,
        // and its updates must not reach a replica that has not yet learned that.
        // The role, not the whole lease: this update was admitted under the lease
        // (`Engine::serving`), and a comparison of the copies begun since waits for it.
        let v = if self.role_valid(volume, v.epoch) {
            v
        } else {
            // A late renewal: the copies' states may have changed while it waited.
            let epoch = v.epoch;
            match Box::pin(self.await_role(volume, epoch, LEASE_WAIT)).await {
                true => match self.effective(volume) {
                    Some(v) if v.primary == self.id && v.epoch == epoch => v,
                    _ => return Err(format!("the primary of {volume:?} changed")),
                },
                false => {
                    return Err(format!(
                        "this node's lease on {volume:?} has lapsed (it may have been replaced as primary)"
                    ))
                }
            }
        };
        // A copy that went dead by reporting its crash has every flushed write until
        // one is acknowledged without it: record that first (it is then never promoted
        // in place of a current copy).
        // Without a majority to record it, a volume with a recovery server goes on
        // through it (in jeopardy no dead copy is promoted, and the cluster marks them
        // stale when it adopts the recovery server's state).
        let mut stale_unrecorded = false;
        for node in unmarked_dead(&v) {
            let cmd = MetaCommand::MarkStale {
                volume: volume.to_string(),
                node,
                epoch: v.epoch,
            };
            match tokio::time::timeout(self.write_path_propose_wait(), Box::pin(self.propose(cmd)))
                .await
            {
                Ok(Ok(MetaResponse::Volume(_))) => {
                    tracing::info!(
                        volume,
                        replica = node,
                        "copy marked stale: writes go on without it"
                    );
                }
                Ok(Err(_)) | Err(_) if self.recovery.is_some() => stale_unrecorded = true,
                Ok(Ok(other)) => {
                    if !self.copy_left_behind(volume, node, v.epoch).await {
                        return Err(format!(
                            "could not record that n{node}'s copy misses writes from now on: {other:?}"
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "could not record that n{node}'s copy misses writes from now on: {other:?}"
                    ))
                }
            }
        }
        // Stamp the epoch this primary holds the volume under.
        let u = match u {
            Update::Write { volume, lba, .. } => Update::Write {
                volume,
                epoch: v.epoch,
                lba,
            },
            Update::Zero {
                volume,
                lba,
                count,
                provision,
                ..
            } => Update::Zero {
                volume,
                epoch: v.epoch,
                lba,
                count,
                provision,
            },
            Update::Flush => Update::Flush,
        };
        let json = serde_json::to_vec(&u).map_err(|e| e.to_string())?;
        let kind = if matches!(u, Update::Flush) {
            KIND_FLUSH
        } else {
            KIND_REPLICATE
        };
        // The write's ids go to the replicas that take them (registered so); the others
        // hash the blocks themselves.
        let meta = self.store.meta();
        let takes_ids = |n: NodeId| meta.nodes.get(&n).is_some_and(|i| i.takes_ids);
        let targets = v.update_targets();
        let ids = ids.filter(|i| {
            matches!(u, Update::Write { .. })
                && i.len() * lazarus_types::BLOCK_SIZE == raw.len()
                && targets.iter().any(|n| takes_ids(*n))
        });
        // Each body is built once and shared by the replicas' frames.
        let body_ids = ids.map(|i| Arc::new(pack_with_ids(&json, raw, i)));
        let body = Arc::new(
            if body_ids.is_some() && targets.iter().all(|n| takes_ids(*n)) {
                Vec::new()
            } else {
                rpc::pack(&json, raw)
            },
        );
        // The write's data as the replicas' body holds it, kept (not copied) until a
        // flush covers it (`Recovery::note_replicated`).
        let kept = match &u {
            Update::Write { .. } => {
                data_in(body_ids.as_ref().unwrap_or(&body), json.len(), raw.len())
            }
            _ => None,
        };
        debug_assert!(kept.as_deref().is_none_or(|k| k == raw));
        let flush_mark = match (&u, &self.recovery) {
            (Update::Flush, Some(r)) => Some(r.flush_mark(volume)),
            _ => None,
        };
        let drops = self.drops.lock().clone();
        // Sent to every target at once, awaited together (no task per call).
        let calls = targets.into_iter().map(|n| {
            let dropped = drops.contains(&n);
            let client = self.network.client(&self.rpc_addr(n).unwrap_or_default());
            let (kind, body) = match &body_ids {
                Some(b) if takes_ids(n) => (KIND_REPLICATE_IDS, b),
                _ => (kind, &body),
            };
            let stalls = &self.stalls;
            async move {
                while stalls.lock().contains(&n) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if dropped {
                    return (
                        n,
                        Err(format!(
                            "replication to n{n} dropped by fault injection (lazarus fault drop)"
                        )),
                    );
                }
                (
                    n,
                    client
                        .call_shared(kind, body, REPLICATE_TIMEOUT)
                        .await
                        .map_err(String::from),
                )
            }
        });
        let t0 = Instant::now();
        let results = futures::future::join_all(calls).await;
        lazarus_observe::metrics::METRICS
            .replication_rtt
            .observe(t0.elapsed().as_secs_f64());
        // The replicas that applied the update.
        let mut acked = Vec::new();
        let mut no_majority = stale_unrecorded;
        let failures = results.iter().filter(|r| r.1.is_err()).count();
        for (node, r) in results {
            match r {
                Ok(body) => {
                    acked.push(node);
                    if body.len() >= 8 {
                        let at = |i: usize| {
                            body.get(i..i + 8)
                                .and_then(|b| b.try_into().ok())
                                .map_or(0, u64::from_be_bytes)
                        };
                        holders.push(lazarus_rpc::msg::Executor {
                            node,
                            incarnation: at(0),
                            copy_gen: at(8),
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(volume, replica = node, error = %e, "replica failed an update; marking it dead");
                    // Out at the recovery server first: it must never claim the volume
                    // as its survivor once a write is acknowledged without it.
                    Box::pin(self.record_out(&v, node)).await?;
                    let cmd = MetaCommand::SetReplicaState {
                        volume: volume.to_string(),
                        node,
                        state: ReplicaState::Dead,
                        epoch: v.epoch,
                        at_ms: lazarus_io::rt::unix_ms().max(1),
                        since: None,
                        source: None,
                    };
                    // Without a majority the mark never commits: a volume with a
                    // recovery server goes on through it as its last failure domain.
                    match tokio::time::timeout(
                        self.write_path_propose_wait(),
                        Box::pin(self.propose(cmd)),
                    )
                    .await
                    {
                        Ok(Ok(MetaResponse::Volume(nv))) => {
                            // Out again at the dead mark's own index, before the write
                            // is acknowledged: no earlier "in" of this copy undoes it.
                            Box::pin(self.record_out_at(&v, node, nv.changed_at)).await?;
                            tracing::info!(volume, replica = node, "replica marked dead");
                            lazarus_observe::events::record(
                                "state",
                                volume,
                                format!("n{node} marked dead (failed an update: {e})"),
                            );
                        }
                        Ok(Ok(other))
                            if v.failure_count_id
                                > self
                                    .store
                                    .meta()
                                    .volumes
                                    .get(volume)
                                    .map_or(0, |m| m.failure_count_id) =>
                        {
                            // Held at the recovery server: the metadata is behind and
                            // refuses; no other copy takes updates anyway.
                            tracing::debug!(volume, replica = node, response = ?other, "dead mark refused while held at the recovery server");
                        }
                        // Refused because the copy is dead and stale already, or
                        // gone from the placement (a move retired and dropped it
                        // while this update was on its way): nothing to record.
                        Ok(Ok(other)) => {
                            if !self.copy_left_behind(volume, node, v.epoch).await {
                                return Err(format!(
                                    "could not mark replica {node} dead: {other:?}"
                                ));
                            }
                            // Out again at the index this node has now applied (past
                            // the mark or the drop), as after a mark of its own.
                            Box::pin(self.record_out(&v, node)).await?;
                            tracing::info!(
                                volume,
                                replica = node,
                                "replica that failed an update was already dead or dropped"
                            );
                        }
                        Ok(Err(e)) if self.recovery.is_some() => {
                            tracing::warn!(volume, replica = node, error = %e, "dead mark not committed");
                            no_majority = true;
                        }
                        Err(_) if self.recovery.is_some() => no_majority = true,
                        Ok(Err(e)) => {
                            return Err(format!("could not mark replica {node} dead: {e}"))
                        }
                        Err(_) => {
                            return Err(format!("could not mark replica {node} dead: no majority"))
                        }
                    }
                }
            }
        }
        let Some(rec) = self.recovery.clone() else {
            return Ok(());
        };
        if v.replicas.len() < 2 {
            return Ok(());
        }
        // In jeopardy, a live replica missed this update and the metadata could not
        // record it (no majority): before it is acknowledged, this primary claims the
        // volume at the recovery server (failure count ID k -> k+1). The majority's
        // promotions are fenced at the old ID from then on, so no replica lacking it is
        // promoted without the log, and the cluster marks them dead when it adopts.
        if no_majority && v.recovery_flag && !self.held_beyond_metadata(volume) {
            Box::pin(self.claim_last_domain(&v)).await?;
        }
        if let Some(mark) = flush_mark {
            if failures == 0 {
                rec.flushed(volume, mark);
            }
            // A flush that cost the volume its last live replica: the writes that
            // replica had not made durable are on this copy alone, so they go to the
            // recovery server before the flush is acknowledged.
            let last_copy = failures > 0
                && self
                    .effective(volume)
                    .is_some_and(|e| crate::decide::writes_through(&e));
            if no_majority || last_copy {
                Box::pin(self.enter_jeopardy_patiently(volume, v.live(), &Update::Flush, &[]))
                    .await?;
            }
            return Ok(());
        }
        if on_rs {
            return Ok(());
        }
        let now = self.effective(volume);
        let in_jeopardy = now.as_ref().is_some_and(|e| e.recovery_flag);
        // The volume went into jeopardy while this update was under way (a claim moved
        // the failure count ID on; `record_out_at` lets a record fenced by it through):
        // a copy recorded out may be a base of the new log, so the update goes to the
        // log before it is acknowledged, not only to the copies that applied it.
        let entered_meanwhile = in_jeopardy
            && now
                .as_ref()
                .is_some_and(|e| e.failure_count_id > v.failure_count_id);
        // A copy live when the update started, or live now (a copy that took updates
        // while it resynced may have turned live as the one it replaces was dropped).
        let acked_live = acked
            .iter()
            .filter(|n| {
                v.state_of(**n) == Some(ReplicaState::Live)
                    || now
                        .as_ref()
                        .is_some_and(|e| e.state_of(**n) == Some(ReplicaState::Live))
            })
            .count();
        let noted = if acked_live == 0 || no_majority || entered_meanwhile {
            crate::jeopardy::Noted::LogIt
        } else {
            let kept = kept.unwrap_or_else(|| crate::jeopardy::Kept::copy(raw));
            rec.note_replicated(volume, self.tenure(volume), in_jeopardy, &u, kept)
        };
        match noted {
            crate::jeopardy::Noted::Kept => {}
            crate::jeopardy::Noted::FlushDue => {
                Box::pin(self.replicate(volume, Update::Flush, &[], None, false)).await?;
            }
            crate::jeopardy::Noted::LogIt => {
                let jv = Box::pin(self.enter_jeopardy_patiently(volume, v.live(), &u, raw)).await?;
                if let Some(jv) = jv {
                    Box::pin(self.log_update(&jv, &u, raw)).await?;
                }
            }
        }
        Ok(())
    }

    /// How long a write waits for a metadata change it needs before it is
    /// acknowledged: briefly with a recovery server (without a majority the volume goes
    /// on through it), else as long as any proposal.
    fn write_path_propose_wait(&self) -> Duration {
        if self.recovery.is_some() {
            Duration::from_secs(2)
        } else {
            PROPOSE_TIMEOUT
        }
    }

    /// Whether this node is the volume's primary and some replica takes its updates.
    pub fn has_update_targets(&self, volume: &str) -> bool {
        self.effective(volume).is_some_and(|v| {
            v.primary == self.id
                && (!v.update_targets().is_empty()
                    || crate::decide::writes_through(&v)
                    || !unmarked_dead(&v).is_empty())
        })
    }

    /// What this node is for `volume` in its applied metadata.
    pub fn role(&self, volume: &str) -> Role {
        match self.effective_primary(volume) {
            None => Role::Local,
            Some((primary, epoch)) if primary == self.id => Role::Primary { epoch },
            Some((primary, _)) => Role::Replica {
                primary,
                addr: self.rpc_addr(primary).unwrap_or_default(),
            },
        }
    }

    /// Whether the primary role of `volume`, held at `epoch`, was handed on purpose
    /// (`MetaCommand::HandOver`) to the node that holds it now, at the next epoch: a
    /// connection bound to `epoch` may then follow it there (the NBD front end).
    pub fn handed_over_from(&self, volume: &str, epoch: u64) -> bool {
        let handed = self
            .store
            .meta()
            .volumes
            .get(volume)
            .and_then(|v| v.handed_over.map(|h| (h, v.primary, v.epoch)));
        match (handed, self.effective_primary(volume)) {
            (Some((h, primary, now)), Some(effective)) => {
                h == epoch && now == epoch + 1 && effective == (primary, now)
            }
            _ => false,
        }
    }

    /// Whether `lazarus fault isolate` cut this node off.
    pub fn is_isolated(&self) -> bool {
        self.network.isolated.load(Ordering::Relaxed)
    }

    /// The isolation fault's switch (`lazarus fault isolate`): while set, this node
    /// neither sends nor answers node-to-node RPC.
    pub fn isolation_switch(&self) -> &AtomicBool {
        &self.network.isolated
    }

    /// Installs what answers the node's front-end requests (`KIND_FORWARD`,
    /// `KIND_STATS`): once, at start-up, by the node's assembly.
    pub fn serve_front(&self, handler: rpc::Handler) {
        let _ = self.front.set(handler);
    }

    /// A front-end request, from another node or from this one's own cluster work
    /// (a resync asking the primary to read a page through, which may be this node).
    pub(crate) async fn ask_front(&self, kind: u8, body: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.front.get() {
            Some(h) => h(kind, body).await.map_err(|r| r.message),
            None => Err("this node is not serving yet".into()),
        }
    }

    /// Another node's own summary for the dashboard.
    pub async fn peer_stats(
        &self,
        node: NodeId,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let addr = self.rpc_addr(node).ok_or("no address known")?;
        let body = self
            .network
            .control(&addr)
            .call(KIND_STATS, &[], timeout)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| format!("bad summary: {e}"))
    }

    pub(crate) async fn answers(&self, meta: &lazarus_cluster::ClusterMeta, node: NodeId) -> bool {
        if node == self.id {
            return true;
        }
        if !meta.nodes.contains_key(&node) {
            return false;
        }
        let Some(addr) = self.rpc_addr(node) else {
            return false;
        };
        self.network
            .control(&addr)
            .call(KIND_PING, &self.ping_body(), PING_TIMEOUT)
            .await
            .is_ok()
    }

    /// Every node: pings its peers once a second and puts each change of whether a peer
    /// answers on the event timeline ("n3 stopped answering", "n3 answers again").
    pub fn watch_peers(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut answering: HashMap<NodeId, bool> = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if c.is_isolated() {
                    continue;
                }
                let meta = c.store.meta();
                for &n in meta.nodes.keys().filter(|&&n| n != c.id) {
                    let ok = c.answers(&meta, n).await;
                    c.seen.record(n, ok);
                    match answering.insert(n, ok) {
                        Some(was) if was != ok => lazarus_observe::events::record(
                            "node",
                            "",
                            if ok {
                                format!("n{n} answers again (seen from n{})", c.id)
                            } else {
                                format!("n{n} stopped answering (seen from n{})", c.id)
                            },
                        ),
                        _ => {}
                    }
                }
            }
        });
    }

    /// On the Raft leader: replaces the primary of any volume whose primary has not
    /// asked for its lease for `PRIMARY_SILENCE_MAX` (see `lease.rs`), promoting a
    /// live replica that answers. Only live replicas are candidates, so a dead one is
    /// never promoted while a live one exists (the state machine refuses it too).
    pub fn watch_primaries(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FAILOVER_CHECK_INTERVAL).await;
                if c.raft.metrics().borrow().current_leader != Some(c.id) {
                    c.leases.requests.lock().clear();
                    continue;
                }
                let meta = c.store.meta();
                let mut leadership_confirmed = false;
                for v in meta.volumes.values() {
                    // The leader's own volumes: replaced only when its own device
                    // failed or its store latched a failed write (it would refuse
                    // every write for as long as it stayed primary).
                    let own_failed = v.primary == c.id && !c.device_usable();
                    if v.primary == c.id && !own_failed {
                        continue;
                    }
                    // Its role is being handed over: the hand-over decides.
                    if c.leases.handing_over.lock().contains(&v.name) {
                        continue;
                    }
                    let silent = {
                        let mut seen = c.leases.requests.lock();
                        let e = seen
                            .entry(v.name.clone())
                            .or_insert((v.epoch, Instant::now()));
                        if e.0 != v.epoch {
                            *e = (v.epoch, Instant::now());
                        }
                        e.1.elapsed()
                    };
                    // A primary whose device failed is replaced too (it answers, and
                    // may even hold its lease, but can serve nothing).
                    let device_failed = own_failed
                        || silent < PRIMARY_SILENCE_MAX
                            && c.recovery.is_some()
                            && c.answers(&meta, v.primary).await
                            && !c.device_ok(&meta, v.primary).await;
                    if silent < PRIMARY_SILENCE_MAX && !device_failed {
                        continue;
                    }
                    let mut candidate = None;
                    // Copies on nodes marked out, or moving off theirs, last: they are
                    // on their way off.
                    let gone = crate::decide::leaving(&meta, v);
                    let mut order: Vec<NodeId> = v
                        .replicas
                        .iter()
                        .copied()
                        .filter(|n| *n != v.primary)
                        .collect();
                    order.sort_by_key(|n| gone.contains(n));
                    for n in order {
                        if v.state_of(n) == Some(ReplicaState::Live)
                            && c.answers(&meta, n).await
                            && c.device_ok(&meta, n).await
                        {
                            candidate = Some(n);
                            break;
                        }
                    }
                    // No live replica: a copy that went dead only by reporting its own
                    // crash has every flushed write (the state machine checks it too).
                    if candidate.is_none() {
                        for n in v.replicas.iter().copied().filter(|n| *n != v.primary) {
                            if v.promotable_dead(n)
                                && c.answers(&meta, n).await
                                && c.device_ok(&meta, n).await
                            {
                                tracing::warn!(volume = %v.name, primary = v.primary, candidate = n, "no live replica; promoting a crash-reported copy, which has every flushed write");
                                candidate = Some(n);
                                break;
                            }
                        }
                    }
                    let Some(n) = candidate else {
                        tracing::error!(volume = %v.name, primary = v.primary, "primary silent and no live replica to promote");
                        continue;
                    };
                    // Only a leader that a quorum still follows decides a promotion: a
                    // leader cut off from the others (it believes it leads until an
                    // election tells it otherwise) sees every primary silent and only
                    // itself answering, on metadata that may be long stale.
                    if !leadership_confirmed {
                        if c.is_isolated() || !c.confirm_leadership().await {
                            tracing::info!(volume = %v.name, "primary silent, but this node's leadership is not confirmed by a quorum: no promotion");
                            break;
                        }
                        leadership_confirmed = true;
                    }
                    // No lease for the old primary from here to the commit: had it
                    // asked again just after its silence was seen, a lease granted now
                    // would outlast the promotion.
                    c.leases.begin_promotion(&v.name);
                    if own_failed {
                        // This node is the old primary: it stops serving the volume
                        // now, before the new primary can take a write it would miss.
                        c.leases.revoke(&v.name);
                    } else if device_failed {
                        // The old primary answers (its device failed, its store may
                        // still read): the last lease granted to it, before `promoting`
                        // was set, runs out before a new primary can exist.
                        tokio::time::sleep(LEASE).await;
                    }
                    // Fenced at the recovery server: exactly one of this majority and
                    // a primary that claims the volume there without one wins.
                    let fcid = match c.fence_promotion(v, n).await {
                        Ok(f) => f,
                        Err(e) => {
                            c.leases.end_promotion(&v.name);
                            tracing::warn!(volume = %v.name, candidate = n, error = %e, "promotion not fenced; waiting rather than risk two primaries");
                            continue;
                        }
                    };
                    let cmd = MetaCommand::Promote {
                        volume: v.name.clone(),
                        node: n,
                        epoch: v.epoch,
                        fcid,
                    };
                    let result = c.propose(cmd).await;
                    c.leases.end_promotion(&v.name);
                    match result {
                        Ok(MetaResponse::Volume(nv)) => {
                            tracing::warn!(volume = %v.name, old = v.primary, new = n, epoch = nv.epoch, silent_ms = silent.as_millis() as u64, "primary failed over");
                            lazarus_observe::events::record(
                                "failover",
                                &v.name,
                                format!("n{} -> n{n} (epoch {})", v.primary, nv.epoch),
                            );
                        }
                        Ok(other) => {
                            tracing::warn!(volume = %v.name, response = ?other, "promotion refused")
                        }
                        Err(e) => {
                            tracing::warn!(volume = %v.name, error = %e, "promotion not committed")
                        }
                    }
                }
            }
        });
    }

    /// Makes the local copies match the metadata: deletes copies of deleted volumes
    /// (their uids are tombstoned; a copy the metadata merely does not know yet is
    /// left alone) and creates the copy of every volume placed on this node, with the
    /// volume's cluster uid.
    /// Grows this node's copy of a volume to the size the metadata gives it.
    pub async fn grow_local(&self, volume: &str, size: u64) {
        let (b, name) = (self.blocks.clone(), volume.to_string());
        match lazarus_rpc::rt::blocking(move || b.resize_volume(&name, size)).await {
            Ok(Ok(_)) => {
                lazarus_observe::events::record(
                    "resize",
                    volume,
                    format!("n{}: copy grown to {size} bytes", self.id),
                );
            }
            Ok(Err(e)) => {
                tracing::error!(volume, size, error = %e, "cannot grow the local copy")
            }
            Err(e) => tracing::error!(error = %e, "grow task failed"),
        }
    }

    pub fn reconcile(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            loop {
                let meta = c.store.meta();
                for local in c.blocks.volumes() {
                    // A copy the placement dropped (rebuilt elsewhere while this node
                    // was out): stale, never served; judged only on caught-up metadata.
                    // Nor while this node holds it at the recovery server beyond the
                    // metadata: that copy is the base of the recovery log.
                    let dropped = c.is_ready()
                        && !c.claimed_beyond_metadata(&local.meta.name)
                        && meta.volumes.get(&local.meta.name).is_some_and(|v| {
                            v.uid == local.meta.uid
                                && !v.replicas.contains(&c.id)
                                && !c.rs_overrides(v)
                        });
                    if !meta.deleted.contains(&local.meta.uid) && !dropped {
                        continue;
                    }
                    let b = c.blocks.clone();
                    let name = local.meta.name.clone();
                    match lazarus_rpc::rt::blocking(move || b.delete_volume(&name)).await {
                        Ok(Ok(())) if dropped => {
                            tracing::info!(volume = %local.meta.name, uid = local.meta.uid, "local copy removed: the placement dropped it (rebuilt on another node)");
                            lazarus_observe::events::record(
                                "membership",
                                &local.meta.name,
                                format!("n{}: its dropped copy removed", c.id),
                            );
                        }
                        Ok(Ok(())) => {
                            tracing::info!(volume = %local.meta.name, uid = local.meta.uid, "local copy of a deleted volume removed")
                        }
                        Ok(Err(e)) => {
                            tracing::error!(volume = %local.meta.name, error = %e, "cannot remove the copy of a deleted volume")
                        }
                        Err(e) => tracing::error!(error = %e, "reconcile task failed"),
                    }
                }
                for v in meta.volumes.values() {
                    if let Some(local) = c
                        .blocks
                        .volume(&v.name)
                        .filter(|l| l.meta.uid == v.uid && l.size_bytes() < v.size_bytes)
                    {
                        c.grow_local(&local.meta.name, v.size_bytes).await;
                    }
                    if v.replicas.contains(&c.id) && c.blocks.volume(&v.name).is_none() {
                        let b = c.blocks.clone();
                        let (name, size, uid) = (v.name.clone(), v.size_bytes, v.uid);
                        match lazarus_rpc::rt::blocking(move || {
                            b.create_volume_with_uid(&name, size, uid)
                        })
                        .await
                        {
                            Ok(Ok(_)) => {
                                c.copy_errors.lock().remove(&v.name);
                                tracing::info!(volume = %v.name, uid, "local copy created from cluster metadata")
                            }
                            Ok(Err(e)) => {
                                tracing::error!(volume = %v.name, error = %e, "cannot create local copy");
                                let no_space = matches!(e, lazarus_store::StoreError::NoSpace);
                                c.copy_errors
                                    .lock()
                                    .insert(v.name.clone(), (no_space, e.to_string()));
                            }
                            Err(e) => tracing::error!(error = %e, "reconcile task failed"),
                        }
                    }
                }
                tokio::time::sleep(RECONCILE_INTERVAL).await;
            }
        });
    }

    /// Exits the process when the Raft core has stopped (a storage error in its log or
    /// state machine, say a full disk): a node without working metadata must not go on
    /// looking like a healthy member, holding roles it can no longer keep. `lazarus up`
    /// (or the service manager) restarts it, and it rejoins from its durable state.
    pub fn watch_raft(self: &Arc<Self>) {
        let mut rx = self.raft.metrics();
        let me = format!("n{}", self.id);
        tokio::spawn(async move {
            loop {
                let stopped = rx.borrow().running_state.clone().err();
                if let Some(fatal) = stopped {
                    tracing::error!(error = %fatal, "the cluster metadata (Raft) stopped: this node exits to be restarted");
                    exit_now(70, &me).await;
                }
                if rx.changed().await.is_err() {
                    tracing::error!(
                        "the cluster metadata (Raft) is gone: this node exits to be restarted"
                    );
                    exit_now(70, &me).await;
                }
            }
        });
    }

    /// Whether a quorum still follows this node as leader (and its metadata is
    /// current with everything committed before).
    pub(crate) async fn confirm_leadership(&self) -> bool {
        matches!(
            tokio::time::timeout(PING_TIMEOUT * 3, self.raft.ensure_linearizable()).await,
            Ok(Ok(_))
        )
    }

    pub fn status(&self) -> serde_json::Value {
        let m = self.raft.metrics().borrow().clone();
        serde_json::json!({
            "id": self.id,
            "state": format!("{:?}", m.state),
            "leader": m.current_leader,
            "term": m.current_term,
            "last_applied": m.last_applied.map(|l| l.index),
            "members": m.membership_config.membership().voter_ids().collect::<Vec<_>>(),
            "learners": m.membership_config.membership().learner_ids().collect::<Vec<_>>(),
            // A membership change under way (joint consensus: old and new voters).
            "joint": m.membership_config.membership().get_joint_config().len() > 1,
            "metadata": &*self.store.meta(),
            "ready": self.is_ready(),
            // Until its start-up check is done this node's view of the metadata may be
            // behind the leader's: shown, not passed off as current.
            "view": if self.is_ready() { "current" } else { "catching up" },
            "leases": self.held_leases(),
            "drops": self.drops.lock().iter().map(|n| format!("n{n}")).collect::<Vec<_>>(),
            "resync": self.resync.progress(),
            "isolated": self.network.isolated.load(Ordering::Relaxed),
            "device_failed": self.blocks.device_failed(),
            "jeopardy": self.jeopardy_status(),
        })
    }
}

/// Ends the process at once (`_exit`): nothing is left to flush (log lines are written
/// unbuffered, the store syncs what it acknowledges), and no exit handler, buffered
/// stream or other thread can hold the exit up. A node seen in a chaos run logged that
/// it exits and then ran on for minutes without working metadata. Under the simulator,
/// the host `who` is crashed and restarted instead.
pub async fn exit_now(code: i32, who: &str) -> ! {
    lazarus_io::rt::exit(code, who).await
}

/// Splits a `KIND_REPLICATE_IDS` payload: `n` whole blocks, then their `n` ids.
fn split_ids(raw: &[u8]) -> Result<(&[u8], Vec<lazarus_types::BlockId>), String> {
    let per = lazarus_types::BLOCK_SIZE + lazarus_types::ID_LEN;
    if raw.is_empty() || !raw.len().is_multiple_of(per) {
        return Err(format!(
            "a write with ids of {} bytes is not whole blocks, each with its id",
            raw.len()
        ));
    }
    let n = raw.len() / per;
    let (data, ids) = raw.split_at(n * lazarus_types::BLOCK_SIZE);
    let ids = ids
        .chunks_exact(lazarus_types::ID_LEN)
        .map(|c| lazarus_types::BlockId(c.try_into().expect("ID_LEN bytes")))
        .collect();
    Ok((data, ids))
}

/// A `KIND_REPLICATE_IDS` body (`rpc::pack` of the header and a payload of the
/// blocks, then their ids), built in one allocation: the blocks are copied once.
fn pack_with_ids(json: &[u8], data: &[u8], ids: &[lazarus_types::BlockId]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + json.len() + data.len() + ids.len() * lazarus_types::ID_LEN);
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(json);
    b.extend_from_slice(data);
    for id in ids {
        b.extend_from_slice(&id.0);
    }
    b
}

/// The data of a body packed by `rpc::pack` or `pack_with_ids` from a header of
/// `json_len` bytes and `len` bytes of data, shared with it (`None` for a body without
/// them, such as the empty one no replica is sent).
fn data_in(body: &Arc<Vec<u8>>, json_len: usize, len: usize) -> Option<crate::jeopardy::Kept> {
    crate::jeopardy::Kept::within(body.clone(), 4 + json_len..4 + json_len + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write's blocks and ids travel together and come apart as they went; a payload
    /// that is not whole blocks each with its id is refused.
    #[test]
    fn ids_travel_with_their_blocks() {
        let mut data = vec![0u8; 3 * lazarus_types::BLOCK_SIZE];
        data[5000] = 7;
        data[9000] = 9;
        let ids = lazarus_store::store::block_ids(&data);
        assert!(ids[0].is_zero() && !ids[1].is_zero() && !ids[2].is_zero());
        let body = pack_with_ids(b"{}", &data, &ids);
        // What the primary keeps of it until a flush is the data, not a copy of it.
        let shared = Arc::new(body.clone());
        assert_eq!(data_in(&shared, 2, data.len()).as_deref(), Some(&data[..]));
        let plain = Arc::new(rpc::pack(b"{\"a\":1}", &data));
        assert_eq!(data_in(&plain, 7, data.len()).as_deref(), Some(&data[..]));
        assert!(data_in(&Arc::new(Vec::new()), 2, data.len()).is_none());
        let (json, raw) = rpc::unpack(&body).unwrap();
        assert_eq!(json, b"{}");
        let (d, i) = split_ids(raw).unwrap();
        assert_eq!((d, i.as_slice()), (data.as_slice(), ids.as_slice()));
        assert!(split_ids(&raw[1..]).is_err());
        assert!(split_ids(&data).is_err(), "blocks without ids");
        assert!(split_ids(&[]).is_err());
    }
}
