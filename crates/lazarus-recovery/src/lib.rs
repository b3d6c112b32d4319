//! The recovery server of US 9483367: while a volume is down to its last failure
//! domain, every new write is made durable here first (`log`: one changed-block log per
//! volume, with its configuration copy), and the coordination point decides who may
//! serve the volume when the cluster metadata has lost its majority (`server`: the
//! compare-and-set on the failure count ID and holder, heartbeats, out/in membership).
//! Depends only on the RPC framing; the node's side of the protocol is in the node.

pub mod log;
pub mod server;
