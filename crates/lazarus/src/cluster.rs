//! The node's membership in the cluster: an openraft instance over `rpc`, its network
//! adapter, and the helpers the rest of the node uses (propose a metadata change from
//! any node, read the applied metadata, report Raft status).

use crate::config::NodeConfig;
use crate::rpc::{self, RpcClient, KIND_APPEND, KIND_CLIENT_WRITE, KIND_SNAPSHOT, KIND_VOTE};
use lazarus_cluster::raft_store::{NodeId, Raft, Store, TypeConfig};
use lazarus_cluster::{MetaCommand, MetaResponse, NodeInfo};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Raft timing: heartbeats every 200 ms, elections after 0.7-1.4 s of silence, so a dead
/// leader is replaced well within the 5 s failover budget.
const HEARTBEAT_MS: u64 = 200;
const ELECTION_TIMEOUT_MIN_MS: u64 = 700;
const ELECTION_TIMEOUT_MAX_MS: u64 = 1400;
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
}

impl Network {
    fn client(&self, addr: &str) -> Arc<RpcClient> {
        self.clients
            .lock()
            .expect("clients lock")
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(RpcClient::new(addr)))
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
            .map_err(unreachable)?;
        let r: Result<Resp, E> =
            serde_json::from_slice(&bytes).map_err(|e| unreachable(format!("bad reply: {e}")))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: self.client(&node.addr),
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
    network: Network,
}

impl Cluster {
    /// Starts Raft on this node. The member with the smallest id initializes the
    /// cluster the first time (membership = every configured node); the others wait
    /// to be contacted.
    pub async fn start(cfg: &NodeConfig) -> anyhow::Result<Arc<Cluster>> {
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
        let store = Store::open(&cfg.data_dir.join("raft.redb")).map_err(anyhow::Error::msg)?;
        let config = openraft::Config {
            cluster_name: "lazarus".into(),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            ..Default::default()
        }
        .validate()?;
        let network = Network::default();
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
        });
        let listener = tokio::net::TcpListener::bind(rpc_listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for RPC on {rpc_listen}: {e}"))?;
        let c = cluster.clone();
        tokio::spawn(rpc::serve(
            listener,
            Arc::new(move |kind, body| {
                let c = c.clone();
                Box::pin(async move { c.handle(kind, body).await })
            }),
        ));
        if !cluster.raft.is_initialized().await? && members.keys().next() == Some(&id) {
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
        match kind {
            KIND_APPEND => ser(&self.raft.append_entries(de(&body)?).await),
            KIND_VOTE => ser(&self.raft.vote(de(&body)?).await),
            KIND_SNAPSHOT => ser(&self.raft.install_snapshot(de(&body)?).await),
            KIND_CLIENT_WRITE => {
                let cmd: MetaCommand = de(&body)?;
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
                Some(l) if l == self.id => self
                    .raft
                    .client_write(cmd.clone())
                    .await
                    .map(|w| w.data)
                    .map_err(|e| e.to_string()),
                Some(l) => {
                    let addr = self
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone());
                    match addr {
                        Some(addr) => {
                            let body = serde_json::to_vec(&cmd)?;
                            match self
                                .network
                                .client(&addr)
                                .call(KIND_CLIENT_WRITE, &body, PROPOSE_RPC_TIMEOUT)
                                .await
                            {
                                Ok(bytes) => {
                                    serde_json::from_slice::<Result<MetaResponse, String>>(&bytes)?
                                }
                                Err(e) => Err(e),
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

    /// Registers this node's addresses in the metadata (retried in the background
    /// until a leader commits it).
    pub fn register(self: &Arc<Self>, info: NodeInfo) {
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
                    Ok(_) => {
                        tracing::info!(node = c.id, "registered in the cluster metadata");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "registration not committed yet"),
                }
            }
        });
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
            "metadata": self.store.meta(),
        })
    }
}
