//! A Lazarus node's distributed logic: the block-store engine that serves a volume's
//! requests (`engine`, `forward`, `acks`), replication and the metadata cluster
//! (`cluster`), primary leases (`lease`), reconciliation of live copies after a
//! promotion (`reconcile`), resync (`resync`) and page repair (`repair`), the last
//! failure domain (`jeopardy`, `survivor`, `claims`), and the node's own summary
//! (`stats`). The decisions they take are pure functions in `decide`.
//!
//! Below it: the block store (`lazarus-store`), the metadata (`lazarus-cluster`), the
//! RPC framing (`lazarus-rpc`), the recovery server's protocol (`lazarus-recovery`).
//! Above it: the NBD front end, the admin API, the dashboard and the node's assembly
//! (`lazarus-server`), then the command line (`lazarus`).

pub mod acks;
pub mod claims;
pub mod cluster;
pub mod config;
pub mod decide;
pub mod engine;
pub mod forward;
pub mod jeopardy;
pub mod lease;
pub mod reconcile;
pub mod repair;
pub mod resync;
pub mod stats;
pub mod survivor;
