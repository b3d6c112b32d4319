//! A Lazarus node's cluster member: the metadata cluster and the node-to-node RPC it
//! answers (`cluster`), replication state and primary leases (`lease`), client sessions'
//! fence tokens (`fence`), reconciliation of live copies after a promotion
//! (`reconcile`), resync of a stale copy (`resync`), the last failure domain
//! (`jeopardy`, `survivor`, `claims`), nodes marked out and their copies rebuilt
//! elsewhere (`membership`), and the node's block locks (`stripes`). The
//! decisions they take are pure functions in `decide`.
//!
//! Below it: the block store (`lazarus-store`), the metadata (`lazarus-cluster`), the
//! RPC framing (`lazarus-rpc`), the recovery server's protocol (`lazarus-recovery`).
//! Above it: the I/O engine (`lazarus-engine`), then the NBD front end, the admin API,
//! the dashboard and the node's assembly (`lazarus-server`), then the command line
//! (`lazarus`).

pub mod claims;
pub mod clones;
pub mod cluster;
pub mod config;
pub mod decide;
pub mod fence;
pub mod jeopardy;
pub mod lease;
pub mod membership;
pub mod reconcile;
pub mod resync;
pub mod stripes;
pub mod survivor;
