//! Cluster metadata: the state Raft replicates (nodes, volumes, placement, primaries,
//! epochs, replica states). This step has the pure state machine; the openraft log
//! store, state machine adapter and network come next.

pub mod meta;

pub use meta::{
    CloneFill, ClusterMeta, MetaCommand, MetaResponse, NodeId, NodeInfo, ReplicaState, VolumeInfo,
};
pub mod raft_store;
pub mod runtime;
