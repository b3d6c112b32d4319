//! What serves a Lazarus node: the NBD front end (`nbd_server`), the admin API
//! (`admin`), the web dashboard (`dashboard`), and the node's assembly (`node`: opens
//! the store, starts the cluster, the listeners and the background loops).
//!
//! Below it: the node's distributed logic (`lazarus-node`). Above it: the command line
//! (`lazarus`) and the simulator (`lazarus-sim`), which run the same `node::start`.

pub mod admin;
pub mod dashboard;
pub mod nbd_server;
pub mod nbd_tls;
pub mod node;
