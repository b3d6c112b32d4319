//! A Lazarus node's I/O engine: it serves a volume's requests where this node is the
//! primary (`engine`: the local write, its replication and the recovery server's
//! record under the block locks), forwards the others' to their primary (`forward`),
//! tracks which acknowledged writes a FLUSH must vouch for (`acks`), repairs damaged
//! pages from any copy whose checksums prove them and scrubs the store (`repair`), and
//! sums up this node for the dashboard (`stats`).
//!
//! Below it: the node's cluster member (`lazarus-node`: metadata, replication state,
//! leases, resync, the last failure domain), which never calls up into the engine; what
//! the engine answers of the node-to-node RPC (forwarded requests, the summary) it hands
//! to the cluster as an RPC handler at start-up. Above it: the NBD front end, the admin
//! API, the dashboard and the node's assembly (`lazarus-server`).

pub mod acks;
pub mod engine;
pub mod forward;
pub mod repair;
pub mod snapshots;
pub mod snapsync;
pub mod stats;
