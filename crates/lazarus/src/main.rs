//! `lazarus`: the one binary. `up` and `node` run servers; every other command is a
//! client of a node's admin API.

mod client;
mod fault;
mod members;
mod rpc_bench;
mod status;
mod transfer;
mod up;

use lazarus_node::config;
use lazarus_server::node;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lazarus",
    version,
    about = "Lazarus: a replicated block-storage cluster serving volumes over NBD"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster under one supervisor and serve the default volume.
    Up {
        /// Data directory (one subdirectory per node).
        #[arg(long, default_value = "./lazarus-data")]
        data: PathBuf,
        /// First NBD port; node i listens on BASE+i, its admin API on BASE+10+i.
        #[arg(long, default_value_t = 10809)]
        port_base: u16,
        /// Size of the default volume vol0 when it is created.
        #[arg(long, default_value = "1GiB", value_parser = parse_size_arg)]
        volume_size: u64,
        /// Memory each node gives clean slice pages (4 KiB for each 1 MiB of a volume
        /// mapped); past it they are read back from disk when needed.
        #[arg(long, default_value = "64MiB", value_parser = parse_bytes_arg)]
        page_cache: u64,
        /// Number of node processes (1 runs a single node without cluster metadata).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
        nodes: u16,
        /// What a primary in jeopardy does while the recovery server does not answer:
        /// suspend (writes wait, then fail: --jeopardy-suspend-secs) or accept (go on
        /// with one copy).
        #[arg(long, default_value = "suspend", value_parser = ["suspend", "accept"])]
        jeopardy_policy: String,
        /// Under `suspend`: how long a write waits for the recovery server before it
        /// fails with EIO.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        jeopardy_suspend_secs: u64,
        /// A node that answers no one for this many seconds is marked out and its
        /// copies are rebuilt on other nodes (when the cluster has nodes to spare).
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604800))]
        out_after: u64,
        /// Most MiB per second one copy's resync fetches, so that a rebuild leaves
        /// clients their latency (0: no limit).
        #[arg(long, default_value_t = 64)]
        resync_rate: u64,
        /// Run without a recovery server: no jeopardy protection; failover is fenced by
        /// Raft alone.
        #[arg(long)]
        no_recovery_server: bool,
        /// Cluster traffic without mutual TLS: unauthenticated and unencrypted. For
        /// measuring what TLS costs (bench/cpu_per_write.sh) and nothing else.
        #[arg(long, hide = true)]
        insecure_cluster: bool,
        /// NBD over TLS on every node: require (the default: clients without TLS are
        /// refused), on (offered: nbds:// clients get TLS, nbd:// clients the clear) or
        /// off. The credentials (X.509 for qemu/libnbd clients, and a PSK) are made in
        /// DATA/nbd-tls at the first start; only the user running `up` can read them.
        #[arg(long, default_value = "require", value_parser = ["off", "on", "require"])]
        nbd_tls: String,
    },
    /// Make cluster credentials for mutual TLS between nodes and the recovery server: a
    /// certificate authority in OUT (ca.crt, ca.key; made once, reused after) and a
    /// directory OUT/NAME per member (ca.crt, node.crt, node.key) to copy to its machine
    /// and name in its configuration (`cluster_tls = "DIR"`, or the recovery server's
    /// `--cluster-tls DIR`). Members that already have one are left alone.
    Certs {
        /// Where the CA and the members' directories go.
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        /// The members: node ids and a name for the recovery server, e.g. n1 n2 n3 rs.
        #[arg(required = true, value_name = "NAME")]
        members: Vec<String>,
    },
    /// Make credentials for NBD over TLS, in the layouts qemu, nbdkit and libnbd use:
    /// OUT/server (ca-cert.pem, server-cert.pem, server-key.pem: a node's
    /// `nbd_tls_certificates`), OUT/client (ca-cert.pem, client-cert.pem,
    /// client-key.pem: clients' `tls-certificates=DIR` / qemu `tls-creds-x509`) and
    /// OUT/keys.psk (USER:hexkey: a node's `nbd_tls_psk`, clients' `tls-psk-file`).
    /// What is already there is kept.
    NbdCerts {
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        /// Names the nodes' certificate is valid for, besides localhost, 127.0.0.1 and
        /// ::1 (the host names or addresses clients dial).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// The PSK's username.
        #[arg(long, default_value = "lazarus")]
        psk_user: String,
    },
    /// Move copies, one at a time, from the nodes holding the most to those holding the
    /// fewest, until the shares differ by at most one (after `node add`, say). Each
    /// move rebuilds the copy on its new node before the old one is dropped; a
    /// primary's copy does not move.
    Rebalance {
        /// Stop after the move under way.
        #[arg(long)]
        cancel: bool,
        /// Wait until the rebalance is done, showing each move.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Scrub every node's disk now: slice pages, checksum pages, blocks; repairs what
    /// it finds.
    Scrub {
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Watch a volume's copies catch up: resync runs by itself once a dead copy can
    /// reach its primary; this shows its progress (pages, rate, ETA) until every copy
    /// is live.
    Resync {
        #[arg(long)]
        volume: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Repair every known-damaged page of a volume now, from live or dead replicas.
    Repair {
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        target: Target,
    },
    /// Measure the node-to-node RPC against HTTP/1.1 carrying 4 KiB blocks.
    #[command(hide = true)]
    BenchRpc {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        inflight: usize,
    },
    /// Inject faults into a running cluster (found through --data).
    Fault {
        #[command(subcommand)]
        op: FaultOp,
        /// Data directory of a cluster started with `lazarus up`.
        #[arg(long, global = true, default_value = "./lazarus-data")]
        data: PathBuf,
    },
    /// Run one node from its configuration file (`--config`), or change a node's
    /// membership (`node remove nX`).
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        op: Option<NodeOp>,
    },
    /// Run the recovery server: configuration copies and changed-block logs of volumes
    /// in jeopardy, and the coordination point when the metadata has no majority.
    RecoveryServer {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The recovery server's cluster credential directory (`lazarus certs`): only
        /// members of the cluster get an answer (mutual TLS).
        #[arg(long, value_name = "DIR")]
        cluster_tls: Option<PathBuf>,
    },
    /// Create, list and delete volumes.
    Volume {
        #[command(subcommand)]
        op: VolumeOp,
        #[command(flatten)]
        target: Target,
    },
    /// Snapshots of a volume: frozen, read-only views of it, served over NBD as
    /// VOLUME@NAME by every node holding a copy.
    Snapshot {
        #[command(subcommand)]
        op: SnapshotOp,
        #[command(flatten)]
        target: Target,
    },
    /// Show the node's volumes, block store and recovery state.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Args)]
struct Target {
    /// Data directory of a cluster started with `lazarus up`.
    #[arg(long, global = true, default_value = "./lazarus-data")]
    data: PathBuf,
    /// Admin API URL (overrides --data), e.g. http://127.0.0.1:10819
    #[arg(long, global = true)]
    api: Option<String>,
}

#[derive(Subcommand)]
enum NodeOp {
    /// Add a node to the cluster: it joins the Raft group as a learner, catches up,
    /// and votes if the cluster wants another voter (three or five); new volumes and
    /// rebuilt copies use it at once. With `lazarus up` the supervisor starts it (the
    /// next free name unless NAME is given); otherwise start it first with
    /// `join = true` in its configuration and give its --rpc address and --api.
    Add {
        name: Option<String>,
        /// The new node's RPC address (its `rpc_listen`), as the members reach it.
        #[arg(long)]
        rpc: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Replace a node: it is removed as by `node remove`, and its copies are rebuilt on
    /// the node given with --with (added first when it is not a member: with
    /// `lazarus up` by the supervisor, otherwise at --rpc).
    Replace {
        node: String,
        #[arg(long)]
        with: String,
        #[arg(long)]
        rpc: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Take a node out for good: each of its copies is rebuilt on another node first,
    /// the primary role of its volumes is handed to a live copy elsewhere, then its
    /// copies are dropped (watch with `lazarus status`). `--cancel` takes it back in.
    Remove {
        node: String,
        #[arg(long)]
        cancel: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum SnapshotOp {
    /// Take snapshot NAME of VOLUME on every live copy: it holds every write
    /// acknowledged before the command. Instantaneous: no data is copied.
    Create { volume: String, name: String },
    /// List a volume's snapshots (every volume's without one).
    List {
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshot NAME of VOLUME on every copy; what only it referenced is freed.
    Delete { volume: String, name: String },
}

#[derive(Subcommand)]
enum VolumeOp {
    Create {
        name: String,
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        /// Copies to keep in a cluster (default 3; 1 keeps a single copy).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=5))]
        replicas: Option<u16>,
        /// The node to make its primary (e.g. n2). Default: the node that is primary
        /// of the fewest volumes.
        #[arg(long)]
        primary: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Delete {
        name: String,
    },
    /// Grow a volume (e.g. --size 20GiB); shrinking is refused. Connected clients keep
    /// the old size until they reconnect.
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    /// Hand the volume's primary role to another node holding a copy (e.g. before
    /// maintenance on the primary's node), once that copy is live and current. Clients
    /// connected to the old primary follow the role; no request fails.
    Primary {
        name: String,
        /// The node to be the primary (nX).
        #[arg(required_unless_present = "cancel")]
        node: Option<String>,
        /// Return at once instead of waiting until the role has moved.
        #[arg(long)]
        no_wait: bool,
        /// Withdraw a request not yet met.
        #[arg(long, conflicts_with = "node")]
        cancel: bool,
    },
    /// Turn jeopardy protection on: every write goes to the recovery server first.
    Protect {
        name: String,
    },
    /// Withdraw the protection request (protection stays while the volume has fewer
    /// than two failure domains).
    Unprotect {
        name: String,
    },
    /// Make a volume read as one of its snapshots again: the blocks that differ are
    /// rewritten (replicated, then flushed). Stop the volume's writers first.
    Revert {
        name: String,
        snapshot: String,
    },
    /// Create volume NEW reading as snapshot VOLUME@NAME: its copies go on the nodes of
    /// VOLUME's live copies, and each maps the snapshot's blocks from its own copy (no
    /// data is copied; blocks are shared by content).
    Clone {
        /// The snapshot, as VOLUME@NAME.
        snapshot: String,
        new: String,
    },
    /// Copy a raw image file into a volume (holes and zeroes stay unmapped), or with
    /// --diff apply an incremental export (`volume export V@B F --since A`) to a volume
    /// that holds snapshot A's content.
    Import {
        file: PathBuf,
        #[arg(long)]
        volume: String,
        /// FILE is an incremental export (docs/format.md, "Incremental export").
        #[arg(long)]
        diff: bool,
        /// Apply the diff even if the volume's checksum root is not A's (it may then
        /// not end up identical to B).
        #[arg(long, requires = "diff")]
        force: bool,
    },
    /// Copy a volume, or a snapshot (VOLUME@NAME), into a raw image file (unmapped
    /// ranges stay holes); with --since A, write only what snapshot VOLUME@NAME changed
    /// since snapshot A, as an incremental export for `volume import --diff`.
    Export {
        name: String,
        file: PathBuf,
        /// An earlier snapshot of the same volume.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum FaultOp {
    /// SIGKILL a node's process; the supervisor leaves it down until `revive`.
    Kill {
        #[arg(long)]
        node: String,
    },
    /// Start a node held down by `kill` again, on its data.
    Revive {
        #[arg(long)]
        node: String,
    },
    /// Make replication traffic (slice and block updates) from one node to another
    /// fail; cluster metadata traffic is untouched.
    Drop {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Hold replication updates from one node to another (never sent while the fault
    /// lasts): a write is applied on the other replicas and then waits, as when a
    /// primary dies in the middle of its fan-out. `heal` releases them.
    Stall {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Damage on disk the page holding an LBA on one node and drop its cached copy
    /// (`--volume V@S`: snapshot S's page block or block, `--target page|block`).
    Corrupt {
        #[arg(long)]
        node: String,
        #[arg(long)]
        volume: String,
        #[arg(long)]
        lba: u64,
        #[arg(long, default_value = "slice", value_parser = ["slice", "checksum", "block", "page"])]
        target: String,
    },
    /// Make reads of the on-disk slice page holding an LBA fail with EIO on one node.
    Eio {
        #[arg(long)]
        node: String,
        #[arg(long)]
        volume: String,
        #[arg(long)]
        lba: u64,
    },
    /// Fail (or heal) a node's device: every I/O of its block store errors.
    Device {
        #[arg(long)]
        node: String,
        #[arg(value_parser = ["fail", "heal"])]
        action: String,
    },
    /// Make every write of a node's cluster-metadata store (its Raft log and state) fail,
    /// as a device refusing writes would: the node must stop being a member (it exits,
    /// and `lazarus up` restarts it) rather than run on without working metadata.
    Metadata {
        #[arg(long)]
        node: String,
        #[arg(value_parser = ["fail", "heal"])]
        action: String,
    },
    /// Cut all traffic between a node and the other nodes, cluster metadata included
    /// (not to the recovery server, nor to its clients); with --recovery-server, cut only
    /// its link to the recovery server. `heal` ends it.
    Isolate {
        #[arg(long)]
        node: String,
        /// Cut the node's link to the recovery server instead (its calls there fail;
        /// the other nodes still reach it)
        #[arg(long)]
        recovery_server: bool,
    },
    /// Undo `drop`, `stall` and `isolate` (all of them without arguments; that also ends `eio`
    /// faults and failed devices).
    Heal {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    let n = lazarus_types::parse_size(s)?;
    lazarus_types::check_volume_size(n)?;
    Ok(n)
}

/// A size in bytes with no other constraint (`64MiB`, `0`).
fn parse_bytes_arg(s: &str) -> Result<u64, String> {
    lazarus_types::parse_size(s)
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        _ => EnvFilter::new(level.unwrap_or("info")),
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| LogWriter)
        .log_internal_errors(false)
        .init();
}

/// Standard error for log lines, where a failed write (the log's disk full, a closed
/// pipe) loses the line and nothing else. tracing-subscriber reports a failed write with
/// `eprintln!`, which panics when standard error fails too: on a full disk every log
/// line panicked the task that logged it, the Raft core among them.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The first 12 hex digits of a checksum root, as listings show it.
pub(crate) fn short_hex(hex: &str) -> &str {
    &hex[..12.min(hex.len())]
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_volumes(vols: &Value) {
    println!(
        "{:<16} {:>10} {:>14} {:>14} {:>14}  {:<12}  SNAPSHOTS",
        "VOLUME", "SIZE", "MAPPED", "ONLY IT HOLDS", "UNRECOVERABLE", "ROOT"
    );
    for v in vols.as_array().into_iter().flatten() {
        let snaps: Vec<&str> = v["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .collect();
        let shares = match v["clone_of"].as_str() {
            _ if v["being_made_from"].is_string() => format!(
                " (clone of {} being made: not served yet)",
                v["being_made_from"].as_str().unwrap_or("?")
            ),
            Some(base) => format!(
                " (clone of {base}, {} still shared)",
                human(v["shared_blocks"].as_u64().unwrap_or(0) * 4096)
            ),
            None => String::new(),
        };
        println!(
            "{:<16} {:>10} {:>14} {:>14} {:>14}  {:<12}  {}{}",
            v["name"].as_str().unwrap_or("?"),
            human(v["size_bytes"].as_u64().unwrap_or(0)),
            human(v["mapped_blocks"].as_u64().unwrap_or(0) * 4096),
            // Without snapshots: not counted ("-").
            v["exclusive_bytes"].as_u64().map_or("-".to_string(), human),
            v["unrecoverable_lbas"].as_u64().unwrap_or(0),
            short_hex(v["root"].as_str().unwrap_or("")),
            snaps.join(" "),
            shares,
        );
        // A row per snapshot where its space is known (`volume list`).
        for sn in v["snapshot_space"].as_array().into_iter().flatten() {
            let root = sn["root"].as_str().unwrap_or("");
            println!(
                "{:<16} {:>10} {:>14} {:>14} {:>14}  {:<12}",
                format!("  @{}", sn["name"].as_str().unwrap_or("?")),
                human(sn["size_bytes"].as_u64().unwrap_or(0)),
                human(sn["mapped_blocks"].as_u64().unwrap_or(0) * 4096),
                sn["exclusive_bytes"]
                    .as_u64()
                    .map_or("-".to_string(), human),
                "-",
                short_hex(root),
            );
        }
    }
}

/// "n1, n2" (and the copies that failed, with why) of a revert's or clone's answer.
fn copies_done(v: &serde_json::Value) -> String {
    let names = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .map(|x| match x {
                        serde_json::Value::Array(p) => format!(
                            "{} ({})",
                            p.first().and_then(|s| s.as_str()).unwrap_or("?"),
                            p.get(1).and_then(|s| s.as_str()).unwrap_or("?")
                        ),
                        other => other.as_str().unwrap_or("?").to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut s = names("done").join(", ");
    let failed = names("failed");
    if !failed.is_empty() {
        s.push_str(&format!(
            "; not on {} (brought up to date by resync)",
            failed.join(", ")
        ));
    }
    s
}

/// `VOLUME@NAME` or `VOLUME NAME`: the volume and the snapshot's name.
fn snapshot_target(volume: &str, name: &str) -> anyhow::Result<()> {
    lazarus_types::check_volume_name(volume).map_err(anyhow::Error::msg)?;
    lazarus_store::snapshot::check_snapshot_name(name).map_err(anyhow::Error::msg)
}

fn snapshot_command(api: client::Api, op: SnapshotOp) -> anyhow::Result<()> {
    match op {
        SnapshotOp::Create { volume, name } => {
            snapshot_target(&volume, &name)?;
            let api = client::primary_api(api, &volume)?;
            let v = client::ok(api.post(
                &format!("/api/v1/volumes/{volume}/snapshots"),
                &json!({ "name": name }),
            )?)?;
            let c = &v["copies"];
            let done: Vec<&str> = c["done"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str())
                .collect();
            println!(
                "snapshot {volume}@{name} taken in {:.1} ms on {} ({} mapped)",
                c["elapsed_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
                done.join(", "),
                human(v["snapshot"]["mapped_blocks"].as_u64().unwrap_or(0) * 4096)
            );
            for f in c["failed"].as_array().into_iter().flatten() {
                eprintln!(
                    "warning: {} did not take it: {}",
                    f[0].as_str().unwrap_or("?"),
                    f[1].as_str().unwrap_or("?")
                );
            }
        }
        SnapshotOp::Delete { volume, name } => {
            snapshot_target(&volume, &name)?;
            let api = client::primary_api(api, &volume)?;
            let v = client::ok(api.delete(&format!("/api/v1/volumes/{volume}/snapshots/{name}"))?)?;
            let done: Vec<&str> = v["copies"]["done"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str())
                .collect();
            println!("deleted snapshot {volume}@{name} on {}", done.join(", "));
            for f in v["copies"]["failed"].as_array().into_iter().flatten() {
                eprintln!(
                    "warning: {} did not delete it: {}",
                    f[0].as_str().unwrap_or("?"),
                    f[1].as_str().unwrap_or("?")
                );
            }
        }
        SnapshotOp::List { volume, json } => {
            let volumes: Vec<String> = match volume {
                Some(v) => vec![v],
                None => client::ok(api.get("/api/v1/volumes")?)?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v["name"].as_str().map(String::from))
                    .collect(),
            };
            let mut all = Vec::new();
            for vol in volumes {
                let a = client::primary_api(api.clone(), &vol)?;
                all.push(client::ok(
                    a.get(&format!("/api/v1/volumes/{vol}/snapshots"))?,
                )?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!(
                "{:<28} {:>10} {:>12} {:>14} {:<20}  ROOT",
                "SNAPSHOT", "SIZE", "MAPPED", "ONLY IT HOLDS", "CREATED (UTC)"
            );
            for v in &all {
                for s in v["snapshots"].as_array().into_iter().flatten() {
                    let root = s["root"].as_str().unwrap_or("");
                    println!(
                        "{:<28} {:>10} {:>12} {:>14} {:<20}  {}",
                        s["export"].as_str().unwrap_or("?"),
                        human(s["size_bytes"].as_u64().unwrap_or(0)),
                        human(s["mapped_blocks"].as_u64().unwrap_or(0) * 4096),
                        s["exclusive_bytes"].as_u64().map_or("-".to_string(), human),
                        utc(s["created_unix"].as_u64().unwrap_or(0)),
                        short_hex(root)
                    );
                }
                for f in v["unreadable"].as_array().into_iter().flatten() {
                    eprintln!(
                        "warning: snapshot {}@{} cannot be read: {}",
                        v["volume"].as_str().unwrap_or("?"),
                        f["name"].as_str().unwrap_or("?"),
                        f["error"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn client_command(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Volume { op, target } => {
            let api = client::Api::discover(target.api.as_deref(), &target.data)?;
            match op {
                VolumeOp::Create {
                    name,
                    size,
                    replicas,
                    primary,
                } => {
                    lazarus_types::check_volume_name(&name).map_err(anyhow::Error::msg)?;
                    let mut body = json!({ "name": name, "size": size });
                    if let Some(r) = replicas {
                        body["replication_factor"] = json!(r);
                    }
                    if let Some(p) = primary {
                        body["primary"] = json!(p);
                    }
                    let v = client::ok(api.post("/api/v1/volumes", &body)?)?;
                    println!(
                        "created volume {} ({})",
                        v["name"].as_str().unwrap_or(&name),
                        human(size)
                    );
                }
                VolumeOp::List { json } => {
                    let mut v = client::ok(api.get("/api/v1/volumes")?)?;
                    // The node asked lists its own copies; a volume it holds none of
                    // is asked of its primary.
                    let (code, c) = api.get("/api/v1/cluster")?;
                    if code == 200 {
                        let have: Vec<String> = v
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|x| x["name"].as_str().map(String::from))
                            .collect();
                        let names: Vec<String> = c["metadata"]["volumes"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(n, _)| n.clone())
                            .filter(|n| !have.contains(n))
                            .collect();
                        for name in names {
                            let Ok(p) = client::primary_api(api.clone(), &name) else {
                                continue;
                            };
                            if let Ok((200, one)) = p.get(&format!("/api/v1/volumes/{name}")) {
                                if let Some(a) = v.as_array_mut() {
                                    a.push(one);
                                }
                            }
                        }
                    }
                    // Each snapshot's space, as its volume's primary counts it.
                    for one in v.as_array_mut().into_iter().flatten() {
                        let has = one["snapshots"].as_array().is_some_and(|a| !a.is_empty());
                        let Some(name) = one["name"].as_str().map(String::from) else {
                            continue;
                        };
                        if !has {
                            continue;
                        }
                        let a = client::primary_api(api.clone(), &name).unwrap_or(api.clone());
                        if let Ok((200, s)) = a.get(&format!("/api/v1/volumes/{name}/snapshots")) {
                            one["snapshot_space"] = s["snapshots"].clone();
                        }
                    }
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        print_volumes(&v);
                    }
                }
                VolumeOp::Import {
                    file,
                    volume,
                    diff: false,
                    ..
                } => transfer::import(&client::primary_api(api, &volume)?, &file, &volume)?,
                VolumeOp::Import {
                    file,
                    volume,
                    diff: true,
                    force,
                } => transfer::import_diff(
                    &client::primary_api(api, &volume)?,
                    &file,
                    &volume,
                    force,
                )?,
                VolumeOp::Revert { name, snapshot } => {
                    snapshot_target(&name, &snapshot)?;
                    let api = client::primary_api(api, &name)?;
                    let v = client::ok(api.post(
                        &format!("/api/v1/volumes/{name}/revert"),
                        &json!({ "name": snapshot }),
                    )?)?;
                    println!(
                        "volume {name} reverted to {name}@{snapshot}: {} remapped, on {}, in {:.2} s",
                        human(v["changed_bytes"].as_u64().unwrap_or(0)),
                        copies_done(&v),
                        v["elapsed_us"].as_u64().unwrap_or(0) as f64 / 1e6
                    );
                }
                VolumeOp::Clone { snapshot, new } => {
                    let Some((volume, snap)) = snapshot.split_once('@') else {
                        anyhow::bail!("name the snapshot as VOLUME@NAME, not {snapshot:?}");
                    };
                    snapshot_target(volume, snap)?;
                    lazarus_types::check_volume_name(&new).map_err(anyhow::Error::msg)?;
                    let src = client::primary_api(api.clone(), volume)?;
                    let v = client::ok(src.post(
                        &format!("/api/v1/volumes/{volume}/snapshots/{snap}/clone"),
                        &json!({ "name": new }),
                    )?)?;
                    println!(
                        "cloned {volume}@{snap} into new volume {new}: {} mapped, on {}, in {:.2} s",
                        human(v["changed_bytes"].as_u64().unwrap_or(0)),
                        copies_done(&v),
                        v["elapsed_us"].as_u64().unwrap_or(0) as f64 / 1e6
                    );
                }
                VolumeOp::Export { name, file, since } => match name.split_once('@') {
                    Some((volume, snap)) => transfer::export_snapshot(
                        &client::primary_api(api, volume)?,
                        volume,
                        snap,
                        since.as_deref(),
                        &file,
                    )?,
                    None if since.is_some() => anyhow::bail!(
                        "--since exports what a snapshot changed since another: name the newer one as {name}@SNAPSHOT"
                    ),
                    None => transfer::export(&client::primary_api(api, &name)?, &name, &file)?,
                },
                VolumeOp::Delete { name } => {
                    client::ok(api.delete(&format!("/api/v1/volumes/{name}"))?)?;
                    println!("deleted volume {name}");
                }
                VolumeOp::Resize { name, size } => {
                    // The primary grows first, so it serves the new size at once.
                    let api = client::primary_api(api, &name)?;
                    let v = client::ok(api.post(
                        &format!("/api/v1/volumes/{name}/resize"),
                        &json!({ "size": size }),
                    )?)?;
                    println!("volume {name} is now {} bytes", v["size_bytes"]);
                }
                VolumeOp::Primary {
                    name,
                    node,
                    no_wait,
                    cancel,
                } => members::want_primary(&api, &name, node.as_deref(), cancel, !no_wait)?,
                VolumeOp::Protect { name } => protect(&api, &name, true)?,
                VolumeOp::Unprotect { name } => protect(&api, &name, false)?,
            }
        }
        Cmd::Snapshot { op, target } => {
            let api = client::Api::discover(target.api.as_deref(), &target.data)?;
            snapshot_command(api, op)?;
        }
        Cmd::Status { json, target } => {
            let api = client::Api::discover(target.api.as_deref(), &target.data)?;
            let mut v = client::ok(api.get("/api/v1/status")?)?;
            // A node that is a Raft member also reports the cluster (404 when alone).
            let (code, cluster) = api.get("/api/v1/cluster")?;
            if code == 200 {
                v["cluster"] = cluster;
                v["cluster"]["nodes"] = status::survey(&v["cluster"]);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if code == 200 {
                    status::print_cluster(&v["cluster"]);
                }
                println!(
                    "node {} (pid {})",
                    v["node"].as_str().unwrap_or("?"),
                    v["pid"]
                );
                print_volumes(&v["volumes"]);
                let b = &v["blocks"];
                println!(
                    "blocks stored: {}  slots: {}  free: {}  missing: {}",
                    b["blocks"], b["slots"], b["free_slots"], b["missing"]
                );
            }
        }
        Cmd::Rebalance {
            cancel,
            wait,
            target,
        } => members::rebalance(cancel, wait, target.api.as_deref(), &target.data)?,
        Cmd::Scrub { volume, target } => {
            let api = client::Api::discover(target.api.as_deref(), &target.data)?;
            let (code, c) = api.get("/api/v1/cluster")?;
            let admins: Vec<String> = if code == 200 {
                c["metadata"]["nodes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(_, n)| n["admin"].as_str().map(|a| format!("http://{a}")))
                    .collect()
            } else {
                vec![String::new()]
            };
            for a in admins {
                let api = if a.is_empty() {
                    client::Api::discover(target.api.as_deref(), &target.data)?
                } else {
                    client::Api::new(&a)
                };
                // The scrub runs in the request; its progress is polled beside it.
                let base = if a.is_empty() {
                    api.base().to_string()
                } else {
                    a.clone()
                };
                let body = json!({ "volume": volume });
                let worker = std::thread::spawn(move || {
                    client::Api::with_timeout(&base, std::time::Duration::from_secs(3600))
                        .post("/api/v1/scrub", &body)
                });
                let t0 = std::time::Instant::now();
                while !worker.is_finished() {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    if let Ok((200, p)) = api.get("/api/v1/scrub") {
                        if p["running"] == true {
                            let done = p["pages_done"].as_u64().unwrap_or(0);
                            let total = p["pages_total"].as_u64().unwrap_or(0);
                            status::progress(
                                done.min(total.saturating_sub(1)),
                                total,
                                "pages",
                                t0.elapsed(),
                            );
                        }
                    }
                }
                let result = worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("scrub request panicked"))?;
                if let Ok((200, r)) = &result {
                    let n = r["volumes"].as_array().map_or(0, |v| {
                        v.iter()
                            .map(|x| {
                                x["slice_pages_checked"].as_u64().unwrap_or(0)
                                    + x["checksum_pages_checked"].as_u64().unwrap_or(0)
                            })
                            .sum::<u64>()
                    });
                    status::progress(n, n, "pages", t0.elapsed());
                }
                match result {
                    Ok(r) => {
                        let r = client::ok(r)?;
                        println!(
                            "node {}: blocks bad {} (restored {}), {} ms",
                            r["node"].as_str().unwrap_or("?"),
                            r["blocks_bad"],
                            r["blocks_restored"],
                            r["elapsed_ms"]
                        );
                        for v in r["volumes"].as_array().into_iter().flatten() {
                            println!(
                                "  {}: slice pages {} checked, {} bad; checksum pages {} checked, {} rebuilt; repairs {}",
                                v["volume"].as_str().unwrap_or("?"),
                                v["slice_pages_checked"],
                                v["slice_pages_bad"],
                                v["checksum_pages_checked"],
                                v["checksum_pages_rebuilt"],
                                v["repairs"]
                            );
                        }
                    }
                    Err(e) => println!("{a}: not reachable ({e})"),
                }
            }
        }
        Cmd::Resync {
            volume,
            timeout,
            target,
        } => {
            let api = client::Api::discover(target.api.as_deref(), &target.data)?;
            watch_resync(&api, &volume, std::time::Duration::from_secs(timeout))?;
        }
        Cmd::Repair { volume, target } => {
            let api = client::Api::discover(target.api.as_deref(), &target.data)?;
            // The primary repairs.
            let api = client::primary_api(api, &volume)?;
            // The damaged pages, then one page at a time, with a progress bar.
            let v = client::ok(api.get(&format!("/api/v1/volumes/{volume}"))?)?;
            let mut pages: Vec<u64> = Vec::new();
            for r in v["unrecoverable"].as_array().into_iter().flatten() {
                let first = r["first_lba"].as_u64().unwrap_or(0);
                let count = r["count"].as_u64().unwrap_or(0);
                for p in first / 256..=(first + count.max(1) - 1) / 256 {
                    if pages.last() != Some(&p) {
                        pages.push(p);
                    }
                }
            }
            if pages.is_empty() {
                println!("{volume}: no damaged page");
            }
            let t0 = std::time::Instant::now();
            let mut server_us = 0u64;
            let mut tally: std::collections::BTreeMap<String, u64> = Default::default();
            for (i, p) in pages.iter().enumerate() {
                let r = client::ok(api.post(
                    &format!("/api/v1/volumes/{volume}/repair?page={p}"),
                    &json!({}),
                )?)?;
                server_us += r["elapsed_us"].as_u64().unwrap_or(0);
                let source = r["pages"][0]["source"].as_str().unwrap_or("?").to_string();
                let kind = source.split(' ').next().unwrap_or("?").to_string();
                *tally.entry(kind).or_default() += 1;
                status::progress_line(i + 1, pages.len(), t0.elapsed());
                println!("page {p} (LBA {}..{}): {source}", p * 256, p * 256 + 255);
            }
            if !pages.is_empty() {
                let summary: Vec<String> = tally.iter().map(|(k, n)| format!("{n} {k}")).collect();
                println!(
                    "{} page(s) in {:.1} ms of repair on the primary ({:.2} s with this command's round trips): {}",
                    pages.len(),
                    server_us as f64 / 1000.0,
                    t0.elapsed().as_secs_f64(),
                    summary.join(", ")
                );
            }
            let v = client::ok(api.get(&format!("/api/v1/volumes/{volume}"))?)?;
            let un = v["unrecoverable"].as_array().cloned().unwrap_or_default();
            if !un.is_empty() {
                let ranges: Vec<String> = un
                    .iter()
                    .map(|x| format!("{}+{}", x["first_lba"], x["count"]))
                    .collect();
                println!(
                    "unrecoverable LBA ranges (answer EIO): {}",
                    ranges.join(", ")
                );
            }
        }
        Cmd::Fault { op, data } => match op {
            FaultOp::Kill { node } => fault::kill(&data, &node)?,
            FaultOp::Revive { node } => fault::revive(&data, &node)?,
            FaultOp::Drop { from, to } => fault::drop(&data, &from, &to)?,
            FaultOp::Stall { from, to } => fault::stall(&data, &from, &to)?,
            FaultOp::Heal { from, to } => fault::heal(&data, from.as_deref(), to.as_deref())?,
            FaultOp::Corrupt {
                node,
                volume,
                lba,
                target,
            } => fault::corrupt(&data, &node, &volume, lba, &target)?,
            FaultOp::Eio { node, volume, lba } => fault::eio(&data, &node, &volume, lba)?,
            FaultOp::Device { node, action } => fault::device(&data, &node, action == "fail")?,
            FaultOp::Metadata { node, action } => fault::metadata(&data, &node, action == "fail")?,
            FaultOp::Isolate {
                node,
                recovery_server,
            } => fault::isolate(&data, &node, recovery_server)?,
        },
        Cmd::Certs { out, members } => {
            let made = lazarus_rpc::tls::generate(&out, &members).map_err(anyhow::Error::msg)?;
            for m in &members {
                let dir = out.join(m);
                let what = if made.contains(&dir) { "made" } else { "kept" };
                println!("{what} {}", dir.display());
            }
            println!(
                "the CA's key is {}: keep it off the members' machines",
                out.join(lazarus_rpc::tls::CA_KEY).display()
            );
        }
        Cmd::NbdCerts {
            out,
            hosts,
            psk_user,
        } => {
            let g = lazarus_server::nbd_tls::generate(&out, &hosts, &psk_user)
                .map_err(anyhow::Error::msg)?;
            println!("node side (nbd_tls_certificates): {}", g.server.display());
            println!("client side (tls-certificates):    {}", g.client.display());
            println!(
                "PSK (nbd_tls_psk; clients: tls-psk-file, username {}): {}",
                g.psk_user,
                g.psk.display()
            );
            println!(
                "the CA's key is {}: keep it away from nodes and clients",
                out.join("ca-key.pem").display()
            );
        }
        Cmd::Node {
            op:
                Some(NodeOp::Remove {
                    node,
                    cancel,
                    target,
                }),
            ..
        } => members::remove(&node, cancel, target.api.as_deref(), &target.data)?,
        Cmd::Node {
            op: Some(NodeOp::Add { name, rpc, target }),
            ..
        } => members::add(name, rpc, target.api.as_deref(), &target.data)?,
        Cmd::Node {
            op:
                Some(NodeOp::Replace {
                    node,
                    with,
                    rpc,
                    target,
                }),
            ..
        } => members::replace(&node, &with, rpc, target.api.as_deref(), &target.data)?,
        Cmd::Up { .. } | Cmd::Node { .. } | Cmd::BenchRpc { .. } | Cmd::RecoveryServer { .. } => {
            unreachable!("server commands are not client commands")
        }
    }
    Ok(())
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // The message up to clap's usage text, on one line (a missing argument's
            // names come on the lines after the first).
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            let message = if message.is_empty() {
                "error: invalid arguments".to_string()
            } else {
                message.join(" ")
            };
            eprintln!("{message} (see `lazarus --help`)");
            std::process::exit(2);
        }
    };
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Cmd::Up {
            data,
            port_base,
            volume_size,
            page_cache,
            nodes,
            jeopardy_policy,
            jeopardy_suspend_secs,
            out_after,
            resync_rate,
            no_recovery_server,
            insecure_cluster,
            nbd_tls,
        } => runtime().block_on(up::run(up::UpArgs {
            jeopardy_suspend_secs,
            out_after_secs: out_after,
            resync_max_mib_s: resync_rate,
            cluster_tls: !insecure_cluster,
            nbd_tls: match nbd_tls.as_str() {
                "off" => config::NbdTlsMode::Off,
                "require" => config::NbdTlsMode::Require,
                _ => config::NbdTlsMode::On,
            },
            recovery_server: !no_recovery_server,
            data,
            port_base,
            volume_size,
            page_cache_bytes: page_cache,
            nodes: nodes as usize,
            log_level: cli.log_level.clone(),
            jeopardy_policy: if jeopardy_policy == "accept" {
                config::JeopardyPolicy::Accept
            } else {
                config::JeopardyPolicy::Suspend
            },
        })),
        Cmd::BenchRpc { seconds, inflight } => {
            runtime().block_on(rpc_bench::run(seconds, inflight))
        }
        Cmd::Node {
            config: Some(config),
            op: None,
        } => config::NodeConfig::load(&config).and_then(|cfg| runtime().block_on(node::run(cfg))),
        Cmd::Node {
            config: None,
            op: None,
        } => Err(anyhow::anyhow!(
            "`lazarus node` needs --config FILE (run a node) or a subcommand (`node add`, `node remove nX`, `node replace nX --with nY`)"
        )),
        Cmd::RecoveryServer {
            data,
            listen,
            cluster_tls,
        } => {
            runtime().block_on(async move {
                tokio::select! {
                    r = lazarus_recovery::server::run(&data, listen, cluster_tls.as_deref()) => r,
                    // Every record is durable before it is acknowledged: stopping is safe.
                    _ = node::supervisor_gone() => Ok(()),
                }
            })
        }
        other => {
            // A client piped into `head` ends quietly when the pipe closes.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            client_command(other)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn protect(api: &client::Api, name: &str, on: bool) -> anyhow::Result<()> {
    let v = client::ok(api.post(
        &format!("/api/v1/volumes/{name}/protect"),
        &json!({ "protected": on }),
    )?)?;
    println!(
        "{name}: protection {} (failure count ID {}; jeopardy is decided by the leader within a second: see `lazarus status`)",
        if on { "requested" } else { "request withdrawn" },
        v["failure_count_id"]
    );
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

/// `lazarus resync`: polls the metadata and each catching-up copy's own progress until
/// every copy of the volume is live.
fn watch_resync(
    api: &client::Api,
    volume: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let mut shown = String::new();
    loop {
        let c = client::ok(api.get("/api/v1/cluster")?)?;
        let v = &c["metadata"]["volumes"][volume];
        if v.is_null() {
            anyhow::bail!("no volume {volume:?} in the cluster metadata");
        }
        let states = v["states"].as_object().cloned().unwrap_or_default();
        let behind: Vec<String> = states
            .iter()
            .filter(|(_, s)| s.as_str() != Some("live"))
            .map(|(n, _)| n.clone())
            .collect();
        if behind.is_empty() {
            if !shown.is_empty() {
                status::progress(1, 1, "pages", t0.elapsed());
            }
            println!(
                "{volume}: every copy live ({} of them) after {:.1} s",
                states.len(),
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let (mut done, mut total, mut line) = (0u64, 0u64, Vec::new());
        for n in &behind {
            let admin = c["metadata"]["nodes"][n]["admin"].as_str().unwrap_or("");
            let state = states[n].as_str().unwrap_or("?");
            let p = client::Api::with_timeout(
                &format!("http://{admin}"),
                std::time::Duration::from_secs(2),
            )
            .get("/api/v1/cluster")
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|(_, b)| b["resync"][volume].clone())
            .unwrap_or(serde_json::Value::Null);
            if p.is_null() {
                line.push(format!(
                    "n{n} {state} (not answering, or its resync has not started)"
                ));
                continue;
            }
            let copied = p["pages_copied"].as_u64().unwrap_or(0);
            let differing = p["pages_differing"].as_u64().unwrap_or(0);
            done += copied.min(differing);
            total += differing;
            line.push(format!(
                "n{n} {state}: {} pass {}, {copied}/{differing} pages{}",
                p["state"].as_str().unwrap_or("?"),
                p["pass"],
                p["error"]
                    .as_str()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            ));
        }
        let now = line.join("; ");
        if now != shown {
            use std::io::IsTerminal;
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
            println!("{now}");
            shown = now;
        }
        if total > 0 {
            status::progress(
                done.min(total.saturating_sub(1)),
                total,
                "pages",
                t0.elapsed(),
            );
        }
        if t0.elapsed() > timeout {
            anyhow::bail!("{volume}: copies still not live after {timeout:?}: {shown}");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
