//! Node-to-node RPC (and the recovery server's): length-prefixed frames over TCP, many calls in flight per
//! connection, a deadline on every call, reconnect on the next call after a failure.
//!
//! Frame: u32 length of the rest, u64 call id, u8 kind (requests) or status (replies:
//! 0 ok, else a `Refusal` code with its message as the body), then a JSON body.
//! Callers decide on the typed `RpcError`, never on an error's text. JSON keeps the Raft messages readable in a packet
//! capture; block data travels as a raw payload after the JSON (`pack`, `unpack`).
//! The kinds are declared in `kind`, the node's request and answer bodies in `msg`.

pub mod msg;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

/// The I/O seams, re-exported for the callers that knew them here.
pub use lazarus_io::{fs, net, rt};
pub use tls::Credentials;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Largest frame accepted from a peer (Raft snapshots of the metadata are far smaller).
pub const FRAME_MAX_BYTES: u32 = 64 << 20;
/// Socket buffer sizes of an RPC connection.
const IO_BUFFER_BYTES: usize = 256 << 10;
/// Time allowed to establish a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Calls one connection may have in flight at a server; the next frame is read once one
/// of them has answered.
pub const CALLS_IN_FLIGHT_MAX: usize = 1024;
/// Bytes of requests and replies one connection may hold at a server (a frame larger
/// than this alone still runs, on its own).
pub const CONNECTION_BYTES_MAX: usize = 2 * FRAME_MAX_BYTES as usize;

/// Every request kind of the RPC framing, declared once: the node's (Raft, replication,
/// resync, forwarding, leases, dashboard, reconciliation) and the recovery server's.
pub mod kind {
    /// Raft: append entries, vote, install snapshot; a metadata command sent to the leader.
    pub const KIND_APPEND: u8 = 1;
    pub const KIND_VOTE: u8 = 2;
    pub const KIND_SNAPSHOT: u8 = 3;
    pub const KIND_CLIENT_WRITE: u8 = 4;
    /// Replication from a volume's primary to its replicas.
    pub const KIND_REPLICATE: u8 = 5;
    pub const KIND_FLUSH: u8 = 6;
    pub const KIND_PING: u8 = 7;
    /// Resync (replica asks the primary): start, checksum-tree pages, slice pages, blocks.
    pub const KIND_RESYNC_BEGIN: u8 = 8;
    pub const KIND_TREE: u8 = 9;
    pub const KIND_PAGE: u8 = 10;
    pub const KIND_BLOCKS: u8 = 11;
    /// A client request received by a node that is not the volume's primary.
    pub const KIND_FORWARD: u8 = 12;
    /// A primary asks the Raft leader for its leases.
    pub const KIND_LEASE: u8 = 13;
    /// A node's own summary for the dashboard (`dashboard::local_stats`).
    pub const KIND_STATS: u8 = 14;
    /// A new primary asks a live replica for its checksum root (`reconcile.rs`).
    pub const KIND_ROOT: u8 = 15;
    /// `KIND_REPLICATE` of a write whose payload carries, after the blocks, the id the
    /// primary computed for each (`msg::split_ids`): the replica stores them under
    /// those ids without hashing them again. Sent only to nodes that registered
    /// `NodeInfo::takes_ids`.
    pub const KIND_REPLICATE_IDS: u8 = 16;
    /// A primary has a copy take or delete a snapshot (`lazarus-engine`, snapshots.rs).
    pub const KIND_VOLUME_SNAPSHOT: u8 = 17;
    /// A copy that missed a snapshot fetches it from one that has it (`lazarus-engine`,
    /// snapsync.rs).
    pub const KIND_SNAPSHOT_FETCH: u8 = 18;
    /// A primary has a copy reset a volume to a snapshot: a revert or a clone
    /// (`lazarus-engine`, snapshots.rs).
    pub const KIND_VOLUME_RESET: u8 = 19;

    /// The recovery server: a claim (compare-and-set on the failure count ID and
    /// holder), a log append, a hold renewal, a volume's state, a log read, a clear, a
    /// configuration copy.
    pub const KIND_RS_CLAIM: u8 = 40;
    pub const KIND_RS_APPEND: u8 = 41;
    pub const KIND_RS_RENEW: u8 = 42;
    pub const KIND_RS_STATE: u8 = 43;
    pub const KIND_RS_READ: u8 = 44;
    pub const KIND_RS_CLEAR: u8 = 45;
    pub const KIND_RS_CONFIG: u8 = 46;
    /// A node says it is alive (its id); the recovery server grants a surviving replica's
    /// claim only when none of the volume's other nodes has said so for a while.
    pub const KIND_RS_HEARTBEAT: u8 = 47;
    /// A primary records that a copy is out (about to acknowledge writes without it), or
    /// back in (live again).
    pub const KIND_RS_MEMBER: u8 = 48;
}
pub use kind::*;

/// Why a handler refused a request: the reply's status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Anything not below.
    Failed = 1,
    /// The caller's claim on the volume is gone (an older failure count ID, holder or
    /// epoch than the receiver's): it must stop acting on it.
    Fenced = 2,
    /// A compare-and-set or a permission said no.
    Refused = 3,
    /// The named volume or object is unknown to the receiver.
    NotFound = 4,
    /// The receiver is starting up and serves nothing yet.
    Starting = 5,
    /// What the caller was reading in pieces changed under it (a compacted log):
    /// read it again from the start.
    Restart = 6,
}

impl Refusal {
    fn from_status(b: u8) -> Refusal {
        match b {
            2 => Refusal::Fenced,
            3 => Refusal::Refused,
            4 => Refusal::NotFound,
            5 => Refusal::Starting,
            6 => Refusal::Restart,
            _ => Refusal::Failed,
        }
    }
}

/// A handler's error: its kind travels as the status byte, its text as the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub code: Refusal,
    pub message: String,
}

impl Remote {
    pub fn new(code: Refusal, message: impl Into<String>) -> Remote {
        Remote {
            code,
            message: message.into(),
        }
    }
}

impl From<String> for Remote {
    fn from(message: String) -> Remote {
        Remote::new(Refusal::Failed, message)
    }
}

impl From<&str> for Remote {
    fn from(message: &str) -> Remote {
        Remote::new(Refusal::Failed, message)
    }
}

impl From<Remote> for String {
    fn from(r: Remote) -> String {
        r.message
    }
}

/// Why a call failed, as the caller acts on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("call to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("connection to {addr} lost")]
    Lost { addr: String },
    #[error("call to {addr} cut: this node is isolated (lazarus fault isolate)")]
    Isolated { addr: String },
    /// The peer answered with an error.
    #[error("{message}")]
    Remote { code: Refusal, message: String },
    #[error("bad reply: {0}")]
    BadReply(String),
}

impl RpcError {
    /// The peer was not reached or did not answer: it may be down, or cut off.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RpcError::Connect { .. }
                | RpcError::Timeout { .. }
                | RpcError::Lost { .. }
                | RpcError::Isolated { .. }
        )
    }

    pub fn code(&self) -> Option<Refusal> {
        match self {
            RpcError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.code() == Some(Refusal::Fenced)
    }
}

impl From<RpcError> for String {
    fn from(e: RpcError) -> String {
        e.to_string()
    }
}

pub type Reply = Result<Vec<u8>, RpcError>;
pub type HandlerReply = Result<Vec<u8>, Remote>;
pub type Handler =
    Arc<dyn Fn(u8, Vec<u8>) -> Pin<Box<dyn Future<Output = HandlerReply> + Send>> + Send + Sync>;
/// A request answered at once in the connection's reader, without a task of its own:
/// `None` when it needs to wait for something (then `Handler` runs it in a task). For
/// short requests that arrive many at a time (a replica's updates): the task, its
/// wake-up and its budget are most of what such a request costs.
pub type InlineHandler = Arc<dyn Fn(u8, &[u8]) -> Option<HandlerReply> + Send + Sync>;

/// Reads one frame: (call id, kind or status, body). A length outside 9..=FRAME_MAX_BYTES
/// is an error; the body grows as its bytes arrive, so a peer that announces a large
/// frame and sends little costs little memory.
pub async fn read_frame(
    rd: &mut (impl AsyncReadExt + Unpin),
) -> std::io::Result<(u64, u8, Vec<u8>)> {
    let len = rd.read_u32().await?;
    if !(9..=FRAME_MAX_BYTES).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad RPC frame length {len}"),
        ));
    }
    let id = rd.read_u64().await?;
    let kind = rd.read_u8().await?;
    let want = len as u64 - 9;
    let mut body = Vec::with_capacity(want.min(IO_BUFFER_BYTES as u64) as usize);
    (&mut *rd).take(want).read_to_end(&mut body).await?;
    if body.len() as u64 != want {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((id, kind, body))
}

/// A reply's frame: status 0 and the answer, or the refusal's code and message.
fn reply_frame(id: u64, r: HandlerReply) -> Vec<u8> {
    match r {
        Ok(b) => frame(id, 0, &b),
        Err(r) => frame(id, r.code as u8, r.message.as_bytes()),
    }
}

fn frame(id: u64, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(13 + body.len());
    put_head(&mut f, id, kind, body.len());
    f.extend_from_slice(body);
    f
}

/// A frame's 13 bytes before a body of `len` bytes sent apart from them.
fn frame_head(id: u64, kind: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(13);
    put_head(&mut f, id, kind, len);
    f
}

fn put_head(f: &mut Vec<u8>, id: u64, kind: u8, len: usize) {
    f.extend_from_slice(&((9 + len) as u32).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.push(kind);
}

/// A call's body: copied into its frame, or queued as it is.
enum Body<'a> {
    Copied(&'a [u8]),
    Shared(&'a Arc<Vec<u8>>),
}

/// Serves RPCs: each request runs in its own task; replies go back on the same
/// connection in completion order, coalesced by one writer task. With credentials,
/// every connection must first pass a mutual-TLS handshake (`tls`): a peer without a
/// certificate of this cluster gets no frame read. A connection has at most
/// `CALLS_IN_FLIGHT_MAX` calls and `CONNECTION_BYTES_MAX` bytes of requests and replies
/// in the server at a time; beyond that, its next frame waits.
pub async fn serve(
    listener: impl Into<net::Listener>,
    tls: Option<Arc<Credentials>>,
    handler: Handler,
) {
    serve_inline(listener, tls, handler, None).await
}

/// `serve`, with requests that `inline` answers at once answered in the reader, in the
/// order they arrived, without a task each.
pub async fn serve_inline(
    listener: impl Into<net::Listener>,
    tls: Option<Arc<Credentials>>,
    handler: Handler,
    inline: Option<InlineHandler>,
) {
    let listener = listener.into();
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        let inline = inline.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let (rd, wr) = match tls::accept(sock, tls.as_ref()).await {
                Ok(halves) => halves,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "RPC connection refused: no valid cluster credential");
                    return;
                }
            };
            let mut rd = BufReader::with_capacity(IO_BUFFER_BYTES, rd);
            let (tx, rx) = mpsc::unbounded_channel::<Queued>();
            tokio::spawn(writer(wr, rx));
            let calls = Arc::new(tokio::sync::Semaphore::new(CALLS_IN_FLIGHT_MAX));
            let bytes = Arc::new(tokio::sync::Semaphore::new(CONNECTION_BYTES_MAX));
            loop {
                let Ok(call) = calls.clone().acquire_owned().await else {
                    return;
                };
                let (id, kind, body) = match read_frame(&mut rd).await {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "RPC connection closed");
                        return;
                    }
                };
                let cost = body.len().clamp(1, CONNECTION_BYTES_MAX) as u32;
                let Ok(held) = bytes.clone().acquire_many_owned(cost).await else {
                    return;
                };
                if let Some(r) = inline.as_ref().and_then(|f| f(kind, &body)) {
                    drop(held);
                    let out = reply_frame(id, r);
                    let cost = out.len().clamp(1, CONNECTION_BYTES_MAX) as u32;
                    let Ok(held) = bytes.clone().acquire_many_owned(cost).await else {
                        return;
                    };
                    if tx.send(Queued::reply(out, (held, call))).is_err() {
                        return;
                    }
                    continue;
                }
                let handler = handler.clone();
                let tx = tx.clone();
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    let out = reply_frame(id, handler(kind, body).await);
                    drop(held);
                    let cost = out.len().clamp(1, CONNECTION_BYTES_MAX) as u32;
                    // The reply waits for room too, then holds it until it is written.
                    let Ok(held) = bytes.acquire_many_owned(cost).await else {
                        return;
                    };
                    let _ = tx.send(Queued::reply(out, (held, call)));
                });
            }
        });
    }
}

/// A frame queued for a connection's writer: its bytes, then a body shared with the
/// frames of other connections (a primary's update goes to every replica without a
/// copy per replica), with what it holds of the connection's budget (a server's
/// reply), released once written.
struct Queued {
    head: Vec<u8>,
    shared: Option<Arc<Vec<u8>>>,
    held: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
}

impl Queued {
    fn reply(
        out: Vec<u8>,
        held: (
            tokio::sync::OwnedSemaphorePermit,
            tokio::sync::OwnedSemaphorePermit,
        ),
    ) -> Queued {
        Queued {
            head: out,
            shared: None,
            held: Some(held),
        }
    }

    async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.head).await?;
        match &self.shared {
            Some(b) => w.write_all(b).await,
            None => Ok(()),
        }
    }
}

/// Writes queued frames, many per system call when they pile up.
async fn writer(wr: tls::BoxWrite, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut w = BufWriter::with_capacity(IO_BUFFER_BYTES, wr);
    let mut written = Vec::new();
    while let Some(f) = rx.recv().await {
        if f.write_to(&mut w).await.is_err() {
            return;
        }
        written.push(f.held);
        // Frames already queued go in the same system call, and so do those of the
        // tasks ready to send one: a yield lets them run first (a primary's updates
        // come from a task per client request).
        let mut yielded = false;
        loop {
            while let Ok(more) = rx.try_recv() {
                if more.write_to(&mut w).await.is_err() {
                    return;
                }
                written.push(more.held);
            }
            if yielded {
                break;
            }
            yielded = true;
            tokio::task::yield_now().await;
        }
        if w.flush().await.is_err() {
            return;
        }
        written.clear();
    }
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// Removes a call's entry from its connection's pending calls when dropped before the
/// call ended (its deadline passed); once answered, the reader has removed it already.
struct Forget<'a>(&'a Pending, u64, bool);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if self.2 {
            return;
        }
        if let Ok(mut p) = self.0.lock() {
            p.remove(&self.1);
        }
    }
}

struct Conn {
    tx: mpsc::UnboundedSender<Queued>,
    pending: Pending,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// A client for one peer address.
pub struct RpcClient {
    addr: String,
    /// The live connection, read without waiting on the connect lock.
    current: parking_lot::Mutex<Option<Arc<Conn>>>,
    conn: Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
    /// While set, every call fails at once (`lazarus fault isolate`).
    blocked: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The cluster credentials every connection is made with (mutual TLS), if any.
    tls: Option<Arc<Credentials>>,
}

impl RpcClient {
    pub fn new(addr: &str) -> RpcClient {
        RpcClient {
            addr: addr.to_string(),
            current: parking_lot::Mutex::new(None),
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
            blocked: None,
            tls: None,
        }
    }

    /// The same client, connecting with `tls` (mutual TLS) when given.
    pub fn with_credentials(self, tls: Option<Arc<Credentials>>) -> RpcClient {
        RpcClient { tls, ..self }
    }

    /// A client whose calls fail while `blocked` is set.
    pub fn with_block(addr: &str, blocked: Arc<std::sync::atomic::AtomicBool>) -> RpcClient {
        RpcClient {
            blocked: Some(blocked),
            ..RpcClient::new(addr)
        }
    }

    async fn connection(&self) -> Result<Arc<Conn>, RpcError> {
        if let Some(c) = self.current.lock().as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let sock = tokio::time::timeout(CONNECT_TIMEOUT, net::connect(&self.addr))
            .await
            .map_err(|_| RpcError::Connect {
                addr: self.addr.clone(),
                reason: format!("timed out after {CONNECT_TIMEOUT:?}"),
            })?
            .map_err(|e| RpcError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        let (rd, wr) =
            tls::connect(sock, self.tls.as_ref())
                .await
                .map_err(|e| RpcError::Connect {
                    addr: self.addr.clone(),
                    reason: format!("TLS handshake failed: {e}"),
                })?;
        let mut rd = BufReader::with_capacity(IO_BUFFER_BYTES, rd);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(wr, rx));
        let pending: Pending = Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conn = Arc::new(Conn {
            tx,
            pending: pending.clone(),
            alive: alive.clone(),
        });
        tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok((id, status, body)) => {
                        let tx = pending.lock().expect("pending lock").remove(&id);
                        if let Some(tx) = tx {
                            let r = if status == 0 {
                                Ok(body)
                            } else {
                                Err(RpcError::Remote {
                                    code: Refusal::from_status(status),
                                    message: String::from_utf8_lossy(&body).into_owned(),
                                })
                            };
                            let _ = tx.send(r);
                        }
                    }
                    Err(_) => {
                        alive.store(false, Ordering::Release);
                        // Fail every call still waiting on this connection.
                        pending.lock().expect("pending lock").clear();
                        return;
                    }
                }
            }
        });
        *guard = Some(conn.clone());
        *self.current.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// One call with a deadline. Errors are transport errors or the handler's error.
    pub async fn call(&self, kind: u8, body: &[u8], deadline: Duration) -> Reply {
        self.call_queued(kind, Body::Copied(body), deadline).await
    }

    /// `call` with a body shared with other calls (the same update to every replica):
    /// queued as it is, not copied into the frame.
    pub async fn call_shared(&self, kind: u8, body: &Arc<Vec<u8>>, deadline: Duration) -> Reply {
        self.call_queued(kind, Body::Shared(body), deadline).await
    }

    async fn call_queued(&self, kind: u8, body: Body<'_>, deadline: Duration) -> Reply {
        if self
            .blocked
            .as_ref()
            .is_some_and(|b| b.load(Ordering::Relaxed))
        {
            return Err(RpcError::Isolated {
                addr: self.addr.clone(),
            });
        }
        let fut = async {
            let conn = self.connection().await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            conn.pending.lock().expect("pending lock").insert(id, tx);
            // A call given up (its deadline passed) leaves no entry behind for a
            // reply that may never come.
            let mut forget = Forget(&conn.pending, id, false);
            let queued = match body {
                Body::Copied(b) => Queued {
                    head: frame(id, kind, b),
                    shared: None,
                    held: None,
                },
                Body::Shared(b) => Queued {
                    head: frame_head(id, kind, b.len()),
                    shared: Some(b.clone()),
                    held: None,
                },
            };
            if conn.tx.send(queued).is_err() {
                conn.alive.store(false, Ordering::Release);
                conn.pending.lock().expect("pending lock").remove(&id);
                return Err(RpcError::Lost {
                    addr: self.addr.clone(),
                });
            }
            let reply = rx.await;
            forget.2 = true;
            reply.map_err(|_| RpcError::Lost {
                addr: self.addr.clone(),
            })?
        };
        tokio::time::timeout(deadline, fut)
            .await
            .map_err(|_| RpcError::Timeout {
                addr: self.addr.clone(),
                after: deadline,
            })?
    }
}

/// Packs a JSON header and a raw payload (block data) into one RPC body.
pub fn pack(json: &[u8], raw: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + json.len() + raw.len());
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(json);
    b.extend_from_slice(raw);
    b
}

pub fn unpack(body: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let n = u32::from_be_bytes(
        body.get(0..4)
            .ok_or("short body")?
            .try_into()
            .map_err(|_| "short body")?,
    ) as usize;
    let json = body.get(4..4 + n).ok_or("body shorter than its header")?;
    Ok((json, &body[4 + n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call whose deadline passes leaves nothing in its connection's pending calls,
    /// and the connection goes on serving the calls that are answered.
    /// A body shared by several calls (one update to every replica) arrives whole and
    /// unchanged at each peer, framed like a copied one, between and among other calls
    /// on the same connections.
    #[tokio::test]
    async fn shared_bodies_arrive_as_copied_ones() {
        let handler: Handler = Arc::new(|kind, body| {
            Box::pin(async move {
                let mut out = vec![kind];
                out.extend_from_slice(&body);
                Ok(out)
            })
        });
        let mut clients = Vec::new();
        for _ in 0..2 {
            let listener = net::Listener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(serve(listener, None, handler.clone()));
            clients.push(RpcClient::new(&addr));
        }
        let expect = |kind: u8, b: &[u8]| {
            let mut out = vec![kind];
            out.extend_from_slice(b);
            out
        };
        // Empty, small, and larger than the writer's buffer.
        for len in [0usize, 13, 4096, IO_BUFFER_BYTES + 12345] {
            let body: Arc<Vec<u8>> = Arc::new((0..len).map(|i| (i * 7 + len) as u8).collect());
            let small = vec![9u8; 100];
            let calls = clients.iter().flat_map(|c| {
                [
                    futures::future::Either::Left(c.call_shared(
                        KIND_STATS,
                        &body,
                        Duration::from_secs(10),
                    )),
                    futures::future::Either::Right(c.call(
                        KIND_PING,
                        &small,
                        Duration::from_secs(10),
                    )),
                ]
            });
            let replies = futures::future::join_all(calls).await;
            for (i, r) in replies.into_iter().enumerate() {
                let want = if i % 2 == 0 {
                    expect(KIND_STATS, &body)
                } else {
                    expect(KIND_PING, &small)
                };
                assert_eq!(r.unwrap(), want, "body of {len} bytes, call {i}");
            }
        }
    }

    #[tokio::test]
    async fn calls_given_up_leave_no_pending_entry() {
        let listener = net::Listener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handler: Handler = Arc::new(|kind, body| {
            Box::pin(async move {
                if kind == KIND_PING {
                    return Ok(body);
                }
                // Never answers anything else.
                std::future::pending::<()>().await;
                Ok(Vec::new())
            })
        });
        tokio::spawn(serve(listener, None, handler));
        let client = RpcClient::new(&addr);
        for _ in 0..20 {
            let r = client
                .call(KIND_STATS, b"", Duration::from_millis(20))
                .await;
            assert!(matches!(r, Err(RpcError::Timeout { .. })), "{r:?}");
        }
        let pending = |c: &RpcClient| {
            let conn = c.current.lock().clone().expect("a connection");
            let n = conn.pending.lock().unwrap().len();
            n
        };
        assert_eq!(pending(&client), 0, "calls given up are forgotten");
        let r = client.call(KIND_PING, b"hi", Duration::from_secs(5)).await;
        assert_eq!(r.unwrap(), b"hi".to_vec());
        assert_eq!(pending(&client), 0);
    }
}
