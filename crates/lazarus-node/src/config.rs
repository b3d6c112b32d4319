//! Node configuration (`lazarus node --config FILE`, TOML).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, e.g. "n1".
    pub id: String,
    /// The node's device: its data directory.
    pub data_dir: PathBuf,
    /// NBD listen address; port 0 picks a free port (written to endpoints.json).
    pub nbd_listen: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_listen: SocketAddr,
    /// Journal size in bytes (default 64 MiB, minimum 8 MiB).
    #[serde(default = "default_journal_bytes")]
    pub journal_bytes: u64,
    /// Memory for clean slice pages, in bytes (default 64 MiB: the slice pages of
    /// 16 GiB of mapped blocks); past it they are evicted and read back from disk
    /// when needed. Pages changed since the last checkpoint are held whatever it says.
    #[serde(default = "default_page_cache_bytes")]
    pub page_cache_bytes: u64,
    /// Seconds between background checkpoints when anything changed.
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_interval_secs: u64,
    /// Node-to-node RPC listen address (Raft and, later, replication). Without it the
    /// node runs alone, with no cluster metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_listen: Option<SocketAddr>,
    /// The other members of the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// A node that joins a running cluster (`lazarus node add`): it never starts a
    /// cluster of its own, and waits until the cluster's leader adds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Token required (as `Authorization: Bearer TOKEN`) by the admin API's mutating
    /// endpoints when `admin_listen` is not a loopback address. Without one, such a
    /// node refuses every mutating request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// The admin token in a file instead (its first line; the file must be readable
    /// by its owner only). `lazarus up` makes one in its data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The recovery server's address (`lazarus recovery-server --listen`). Without one,
    /// volumes cannot be protected in jeopardy and failover is fenced by Raft alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_server: Option<String>,
    /// What a primary in jeopardy does while the recovery server does not answer:
    /// `suspend` (writes wait up to `jeopardy_suspend_secs`, then fail with EIO) or
    /// `accept` (writes go on with one copy; loudly logged, shown as recovery lag).
    #[serde(default)]
    pub jeopardy_policy: JeopardyPolicy,
    #[serde(default = "default_suspend_secs")]
    pub jeopardy_suspend_secs: u64,
    /// A replica marked dead more than this many times within
    /// `failure_window_minutes` is not counted on as a failure domain.
    #[serde(default = "default_failures_max")]
    pub failures_max: usize,
    #[serde(default = "default_failure_window")]
    pub failure_window_minutes: u64,
    /// A node that answers no one for this long is marked out and its copies are
    /// rebuilt on other nodes (the leader's setting counts; default 600 s).
    #[serde(default = "default_out_after")]
    pub out_after_secs: u64,
    /// Most MiB per second a resync of one copy fetches (block data and slice pages),
    /// so a rebuilt or returning copy leaves clients their latency; 0: no limit.
    #[serde(default = "default_resync_rate")]
    pub resync_max_mib_s: u64,
    /// Whether the admin API takes fault injection (`lazarus fault ...`: dropped links,
    /// corrupted pages, injected EIO, failed devices, isolation). Off unless asked for:
    /// `lazarus up` turns it on for its local cluster; a node run from a configuration
    /// file refuses fault requests unless the file says `faults = true`.
    #[serde(default)]
    pub faults: bool,
    /// The node's cluster credential directory (`ca.crt`, `node.crt`, `node.key`, as
    /// `lazarus certs` makes them): every RPC connection, to and from other nodes and to
    /// the recovery server, is then mutual TLS, and peers without a certificate of this
    /// cluster get no service. Without it cluster traffic is unauthenticated (a warning
    /// at start; SECURITY.md). A relative path is relative to the configuration file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_tls: Option<PathBuf>,
    /// NBD over TLS (`NBD_OPT_STARTTLS`): `off` (the default), `on` (offered; clients
    /// that do not ask for it are served in the clear) or `require` (a client without
    /// TLS gets no export, no list, no data). `on` and `require` need
    /// `nbd_tls_certificates`, `nbd_tls_psk` or both.
    #[serde(default)]
    pub nbd_tls: NbdTlsMode,
    /// X.509 for NBD: a directory in qemu's layout, `ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem` (`lazarus nbd-certs` makes one, with a client directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tls_certificates: Option<PathBuf>,
    /// Whether an X.509 client must present a certificate signed by `ca-cert.pem`
    /// (default yes, as qemu-nbd's `verify-peer`); without it any client that can
    /// finish a TLS handshake is served.
    #[serde(default = "default_true")]
    pub nbd_tls_verify_peer: bool,
    /// TLS-PSK for NBD: a file of `username:hexkey` lines (the `keys.psk` of qemu's
    /// `tls-creds-psk` and nbdkit's `--tls-psk`). A client must prove it holds one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tls_psk: Option<PathBuf>,
}

/// What a node offers of NBD over TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTlsMode {
    #[default]
    Off,
    On,
    Require,
}

fn default_true() -> bool {
    true
}

pub use lazarus_types::JeopardyPolicy;

fn default_suspend_secs() -> u64 {
    30
}

fn default_failures_max() -> usize {
    3
}

fn default_resync_rate() -> u64 {
    64
}

fn default_out_after() -> u64 {
    600
}

fn default_failure_window() -> u64 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: String,
    /// The peer's RPC address.
    pub rpc: String,
}

fn default_journal_bytes() -> u64 {
    64 << 20
}

fn default_page_cache_bytes() -> u64 {
    lazarus_store::store::DEFAULT_PAGE_CACHE_BYTES
}

fn default_checkpoint_secs() -> u64 {
    30
}

impl NodeConfig {
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let mut cfg: NodeConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config {}: {}", path.display(), e.message()))?;
        if cfg.data_dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.admin_token.is_some() && cfg.admin_token_file.is_some() {
            anyhow::bail!(
                "invalid config {}: give admin_token or admin_token_file, not both",
                path.display()
            );
        }
        for p in [
            &mut cfg.admin_token_file,
            &mut cfg.cluster_tls,
            &mut cfg.nbd_tls_certificates,
            &mut cfg.nbd_tls_psk,
        ] {
            if let Some(p) = p.as_mut().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        }
        if cfg.nbd_tls != NbdTlsMode::Off
            && cfg.nbd_tls_certificates.is_none()
            && cfg.nbd_tls_psk.is_none()
        {
            anyhow::bail!(
                "invalid config {}: nbd_tls = \"{}\" needs nbd_tls_certificates (a directory with ca-cert.pem, server-cert.pem, server-key.pem) or nbd_tls_psk (a file of username:hexkey lines)",
                path.display(),
                format!("{:?}", cfg.nbd_tls).to_lowercase()
            );
        }
        if cfg.id.is_empty()
            || !cfg
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            anyhow::bail!(
                "invalid config {}: id {:?} must be letters, digits, '-' or '_'",
                path.display(),
                cfg.id
            );
        }
        if cfg.journal_bytes < lazarus_store::journal::CAPACITY_MIN_BYTES {
            anyhow::bail!(
                "invalid config {}: journal_bytes must be at least {}",
                path.display(),
                lazarus_store::journal::CAPACITY_MIN_BYTES
            );
        }
        Ok(cfg)
    }
}

/// Where a running node can be reached; written to `DATA_DIR/endpoints.json` once its
/// listeners are bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub id: String,
    pub pid: u32,
    pub nbd: SocketAddr,
    pub admin: SocketAddr,
}
