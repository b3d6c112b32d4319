//! The bodies of the node-to-node requests and their answers, declared once next to
//! their kinds (`kind`): what a node sends and what it decodes from a peer. JSON (the
//! `pack`ed part of a frame); bulk data travels as the frame's raw part.
//!
//! `KIND_PING`'s body is the sender's node id (8 bytes, big-endian); its answer is one
//! of `PING_*`. `KIND_REPLICATE` and `KIND_FLUSH` carry an `Update`. The Raft kinds
//! carry openraft's own messages; the recovery server's are in `lazarus-recovery`.

use serde::{Deserialize, Serialize};

/// `KIND_PING`'s answer from a node that serves.
pub const PING_OK: &[u8] = b"";
/// `KIND_PING`'s answer from a node whose device failed: not a copy to count on.
pub const PING_DEVICE_FAILED: &[u8] = b"device-failed";
/// `KIND_PING`'s answer from a node that holds a claim newer than its metadata (it
/// serves a volume on its own): a primary must not count it as a live replica.
pub const PING_HELD: &[u8] = b"held";

/// `KIND_FORWARD`'s operation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    /// A client connection's fence token from the primary (`Session`): `length` 1
    /// opens a session (every token handed out before stops admitting writes), 0
    /// reads the current one.
    Fence,
}

impl Op {
    /// Whether it changes the volume's data (and so needs a fence token).
    pub fn modifies(self) -> bool {
        matches!(self, Op::Write | Op::Trim | Op::Zero)
    }
}

/// Where a client connection stands at the volume's primary: the primary process
/// that issued it and the volume's fence count then.
///
/// A write forwarded by a node that then lost its client (the node crashed, or the
/// client's connection closed) may reach the primary late: held up in a partitioned
/// network, or re-sent by the forwarder. Meanwhile the client may have reconnected,
/// written the same block again and flushed; applying the old write then would make
/// an acknowledged, flushed write older than what a read returns. So every client
/// connection opens a session at the primary before its first request is executed
/// there, which raises the volume's fence count, and a forwarded write carries the
/// token its connection got: the primary refuses a write whose token is older than
/// the count (or was issued by another process, before a failover or a restart). A
/// refused forwarder whose client connection is still open takes the current token
/// and sends again (its client is still waiting: any order is allowed); one whose
/// client is gone gives up. (Found by the simulator, seed 222 with disk faults.)
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FenceToken {
    pub incarnation: u64,
    pub fence: u64,
    /// The volume's epoch at the primary when it was issued: a primary that lost the
    /// role and got it back did not see the sessions opened meanwhile.
    #[serde(default)]
    pub epoch: u64,
}

/// `KIND_FORWARD`: a client request received by a node that is not the volume's
/// primary (a write's data travels as the raw payload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardReq {
    pub volume: String,
    pub op: Op,
    pub offset: u64,
    pub length: u64,
    #[serde(default)]
    pub fua: bool,
    #[serde(default)]
    pub no_hole: bool,
    /// For writes: the client connection's token (`FenceToken`); none from a node of
    /// an older version, or for the admin API's writes.
    #[serde(default)]
    pub fence: Option<FenceToken>,
    /// The uid of the volume the client's connection opened (0: any, as from the
    /// admin API or an older node): refused once the name is another volume's.
    #[serde(default)]
    pub uid: u64,
}

/// The process that executed a request: a node and its incarnation (random per
/// process start). A FLUSH makes durable what the process executing it holds, so it
/// vouches only for writes acknowledged by that same process: a primary that crashed
/// and came back (at the same epoch) has lost the writes it had acknowledged but not
/// yet made durable, and a forwarding node must not let a later FLUSH hide that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Executor {
    pub node: u64,
    pub incarnation: u64,
    /// How many times the process had replaced part of a copy from elsewhere (a
    /// resync, a restore): after one, it may no longer hold what it applied before.
    #[serde(default)]
    pub copy_gen: u64,
}

/// The processes that hold an acknowledged write in memory or on disk: its primary
/// and every replica that applied it. A FLUSH executed by any of them (still the same
/// process) makes it durable.
pub type Holders = Vec<Executor>;

/// A forwarded request's answer (the data travels as the raw payload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardReply {
    pub errno: u32,
    pub message: String,
    /// The receiver is not the primary either (its metadata says so): route again.
    #[serde(default)]
    pub not_primary: bool,
    /// The processes that hold a write it acknowledged (its executor and the replicas
    /// that applied it); empty from a node of an older version: then the executor.
    #[serde(default)]
    pub holders: Holders,
    /// Who executed it. A node of an older version sends none: every such reply
    /// names the same unknown process, so during a rolling upgrade a primary of the
    /// old version that restarts is not told apart (no worse than that version).
    #[serde(default)]
    pub executor: Executor,
    /// A write refused for its fence token (`FenceToken`): not executed.
    #[serde(default)]
    pub fenced: bool,
}

/// `KIND_LEASE`: a primary asks the Raft leader for its leases.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub node: u64,
    /// (volume, epoch) pairs the asker is primary of in its metadata.
    pub volumes: Vec<(String, u64)>,
    /// Those of them the asker's metadata shows in jeopardy (it serves them on its
    /// recovery-server hold alone, under policy `suspend`): the leader grants no lease
    /// on a volume it sees in jeopardy to an asker whose view lags behind that.
    #[serde(default)]
    pub jeopardy: Vec<String>,
}

/// `KIND_LEASE`'s answer: the (volume, epoch) pairs granted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseReply {
    pub granted: Vec<(String, u64)>,
}

/// `KIND_ROOT`: a new primary asks a live replica for its checksum root (the answer:
/// 16 raw bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootReq {
    pub volume: String,
    pub uid: u64,
    /// The asking primary's epoch: answered only once this node applied it.
    pub epoch: u64,
}

/// `KIND_RESYNC_BEGIN`, `KIND_TREE`, `KIND_PAGE`, `KIND_BLOCKS`: one resync or repair
/// request, to the copy that is read from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncReq {
    pub from: u64,
    pub volume: String,
    pub epoch: u64,
    /// Tree level (0 = level 1, the page checksums) for TREE; page index for PAGE.
    #[serde(default)]
    pub level: usize,
    #[serde(default)]
    pub index: u64,
    /// A primary repairing a damaged page reads from any copy, dead ones included
    /// (`fault drop` cuts updates, not these reads).
    #[serde(default)]
    pub repair: bool,
    /// PAGE: a page damaged at the source is answered too, with its damage
    /// (`Source::page_state`), instead of an error.
    #[serde(default)]
    pub damaged_ok: bool,
}

/// A replicated update, as sent from a primary to a replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Update {
    /// Whole blocks at `lba`; the data travels as the raw payload.
    Write {
        volume: String,
        epoch: u64,
        lba: u64,
    },
    Zero {
        volume: String,
        epoch: u64,
        lba: u64,
        count: u64,
        provision: bool,
    },
    Flush,
}
