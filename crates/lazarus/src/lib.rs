//! The Lazarus storage node as a library: the binary (`main.rs`) is its command line,
//! and the simulator (`crates/lazarus-sim`) runs the same node on simulated hosts.

pub mod admin;
pub mod claims;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod fault;
pub mod forward;
pub mod jeopardy;
pub mod lease;
pub mod nbd_server;
pub mod node;
pub mod reconcile;
pub mod repair;
pub mod resync;
pub mod rpc_bench;
pub mod status;
pub mod survivor;
pub mod transfer;
pub mod up;
