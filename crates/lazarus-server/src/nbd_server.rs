//! The NBD server: moves bytes between sockets and the sans-I/O codec in
//! `lazarus-nbd`, and requests to the engine. One task reads requests, one writes
//! replies; each request runs in its own task, so replies may leave out of order.

use crate::nbd_tls::NbdTls;
use lazarus_engine::acks::Acks;
use lazarus_engine::engine::{Engine, IoError, Route};
use lazarus_engine::forward::{ForwardReq, Op};
use lazarus_nbd::consts::*;
use lazarus_nbd::TlsPolicy;
use lazarus_nbd::{
    parse_client_flags, server_greeting, simple_reply, structured_error, structured_read_header,
    Command, ExportCatalog, ExportInfo, Handshake, OptionHeader, OptionOutcome, Request,
    OPTION_DATA_MAX_BYTES, OPTION_HEADER_LEN, PAYLOAD_MAX_BYTES, REQUEST_HEADER_LEN,
};
use lazarus_rpc::net::{Listener, Stream};
use lazarus_store::{Snapshot, Store, Volume};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Bytes of requests read from the socket at a time.
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Replies batched by the reader before they go to the writer regardless.
const REPLY_BATCH_MAX_BYTES: usize = 1 << 20;
/// Reads and writes up to this size run in the reader task; larger ones get their own
/// task so that several can use the cores at once.
const INLINE_LENGTH_MAX_BYTES: u32 = 64 << 10;
/// Requests one connection may have in flight; the reader stops reading beyond this.
const INFLIGHT_PER_CONNECTION_MAX: usize = 128;
/// Bytes of request payloads and replies one connection may hold in memory at once: a
/// client that pipelines large requests and reads no reply waits for its own replies
/// to drain (as TCP makes it), and the node's memory stays bounded. Twice the largest
/// request, so that one large request never waits for itself.
const CONNECTION_BYTES_MAX: u32 = 2 * PAYLOAD_MAX_BYTES;
/// Payload buffers a connection keeps for its next writes (`Buffers`), and the
/// largest one it keeps: 8 MiB per connection at most.
const POOLED_BUFFERS_MAX: usize = 4;
const POOLED_BUFFER_MAX_BYTES: usize = 2 << 20;
/// Smaller buffers are not kept (`Buffers::give`).
const POOLED_BUFFER_MIN_BYTES: usize = 4 << 10;
/// Connections served at once; further ones wait in the accept queue.
const CONNECTIONS_MAX: usize = 1024;
/// Option data up to this size is read and discarded when over the option limit, so
/// the client gets NBD_REP_ERR_TOO_BIG instead of a dropped connection.
const OPTION_DISCARD_MAX_BYTES: u32 = 1 << 20;
/// Options one handshake may send before the server gives up on it.
const OPTIONS_PER_HANDSHAKE_MAX: usize = 1024;
/// A handshake that does not finish in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

struct Catalog {
    store: Arc<Store>,
    cluster: Option<Arc<lazarus_node::cluster::Cluster>>,
}

/// The volume a connection serves: its copy on this node if there is one; a node
/// without a copy forwards every request to the primary.
pub struct Export {
    name: String,
    size: u64,
    local: Option<Arc<Volume>>,
    /// Whether the client selected `base:allocation` (NBD_CMD_BLOCK_STATUS).
    allocation: bool,
    /// A snapshot export (`VOLUME@NAME`): read-only, served from this node's copy.
    snap: Option<Arc<Snapshot>>,
    /// A snapshot export this node's copy does not hold (no copy here, or one that has
    /// not installed it yet): (snapshot name, id), served by asking a copy that holds it.
    remote: Option<(String, u64)>,
    /// The volume's uid in the metadata when the connection opened (0: alone, or a
    /// snapshot): a request forwarded for it is refused once the name is another
    /// volume's (deleted and made again, a clone among them).
    uid: u64,
}

impl Export {
    /// This node's copy of the volume now: the one the connection opened, or the copy
    /// that replaced it under the same uid (placement dropped it and later put a new
    /// one here, simulator seed 5172). Never the deleted copy's leftover handle, whose
    /// blocks are gone, nor a volume re-created under the name (another uid).
    fn copy(&self, engine: &Engine) -> Option<Arc<Volume>> {
        let opened = self.local.as_ref()?;
        engine
            .store
            .volume(&self.name)
            .filter(|v| Arc::ptr_eq(v, opened) || v.meta.uid == opened.meta.uid)
    }
}

/// `VOLUME@NAME` split in two (volume and snapshot names never hold '@').
fn snapshot_name(export: &str) -> Option<(&str, &str)> {
    export.split_once('@')
}

fn snapshot_export(v: &Volume, s: &Snapshot) -> ExportInfo {
    ExportInfo {
        name: format!("{}@{}", v.meta.name, s.name),
        size_bytes: s.size_bytes,
        description: format!("Lazarus snapshot {} of volume {}", s.name, v.meta.name),
        read_only: true,
        multi_conn: true,
    }
}

fn remote_snapshot_export(volume: &str, snap: &str, size_bytes: u64) -> ExportInfo {
    ExportInfo {
        name: format!("{volume}@{snap}"),
        size_bytes,
        description: format!("Lazarus snapshot {snap} of volume {volume} (served through a copy)"),
        read_only: true,
        multi_conn: true,
    }
}

fn export_of(v: &Volume) -> ExportInfo {
    ExportInfo {
        name: v.meta.name.clone(),
        size_bytes: v.size_bytes(),
        description: format!("Lazarus volume {}", v.meta.name),
        read_only: false,
        // A FLUSH syncs the node's whole journal, so it covers writes completed on
        // every connection.
        multi_conn: true,
    }
}

impl Catalog {
    /// Every volume this node serves: with a cluster, every volume in the metadata
    /// (hosted here or not); alone, its own.
    fn all(&self) -> Vec<ExportInfo> {
        let Some(c) = &self.cluster else {
            // A clone still being filled is not served.
            return self
                .store
                .volumes()
                .iter()
                .filter(|v| !v.is_unfilled())
                .map(|v| export_of(v))
                .collect();
        };
        c.store
            .meta()
            .volumes
            .values()
            // A clone still being made is not served (`lazarus_node::clones`).
            .filter(|v| v.cloning.is_none())
            .map(|v| ExportInfo {
                name: v.name.clone(),
                // A volume just grown: its new size once this node's copy has grown
                // too (a moment after the metadata change), so no request is accepted
                // that the copy cannot take yet.
                size_bytes: match self.store.volume(&v.name).filter(|l| l.meta.uid == v.uid) {
                    Some(l) => v.size_bytes.min(l.size_bytes()),
                    None => v.size_bytes,
                },
                description: format!("Lazarus volume {}", v.name),
                read_only: false,
                multi_conn: true,
            })
            .collect()
    }
}

impl Catalog {
    /// This node's copy of `volume` (in a cluster, the one the metadata names) and its
    /// snapshot `snap`.
    fn snapshot(&self, volume: &str, snap: &str) -> Option<(Arc<Volume>, Arc<Snapshot>)> {
        let v = self.local_copy(volume)?;
        let s = v.snapshot(snap)?;
        self.current(volume, &s).then_some((v, s))
    }

    /// The snapshot the cluster metadata knows by this name (`Engine::snapshot_current`).
    fn current(&self, volume: &str, s: &Snapshot) -> bool {
        lazarus_engine::snapshots::snapshot_current(self.cluster.as_ref(), volume, s)
    }

    /// A snapshot this node's copy does not hold (it holds no copy of the volume, or
    /// its copy missed the snapshot and has not installed it yet, a moment after it
    /// came back), as the metadata records it: (id, size). Served through a copy that
    /// holds it.
    fn remote_snapshot(&self, volume: &str, snap: &str) -> Option<(u64, u64)> {
        let c = self.cluster.as_ref()?;
        if !c.is_ready() || self.snapshot(volume, snap).is_some() {
            return None;
        }
        let meta = c.store.meta();
        let v = meta.volumes.get(volume)?;
        Some((*v.snapshots.get(snap)?, *v.snapshot_sizes.get(snap)?))
    }

    fn local_copy(&self, volume: &str) -> Option<Arc<Volume>> {
        let uid = self
            .cluster
            .as_ref()
            .map(|c| c.store.meta().volumes.get(volume).map(|v| v.uid));
        self.store
            .volume(volume)
            .filter(|v| uid.is_none_or(|u| u == Some(v.meta.uid)))
    }

    /// The snapshots of this node's copies, and those of the volumes it holds no copy
    /// of that it can serve through a copy, as exports.
    fn snapshots(&self) -> Vec<ExportInfo> {
        let mut out: Vec<ExportInfo> = self
            .store
            .volumes()
            .iter()
            .filter_map(|v| self.local_copy(&v.meta.name))
            .flat_map(|v| {
                v.snapshots()
                    .iter()
                    .filter(|s| self.current(&v.meta.name, s))
                    .map(|s| snapshot_export(&v, s))
                    .collect::<Vec<_>>()
            })
            .collect();
        if let Some(c) = &self.cluster {
            for v in c.store.meta().volumes.values() {
                for name in v.snapshots.keys() {
                    if let Some((_, size)) = self.remote_snapshot(&v.name, name) {
                        out.push(remote_snapshot_export(&v.name, name, size));
                    }
                }
            }
        }
        out
    }
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if let Some((volume, snap)) = snapshot_name(name) {
            return match self.snapshot(volume, snap) {
                Some((v, s)) => Some(snapshot_export(&v, &s)),
                None => self
                    .remote_snapshot(volume, snap)
                    .map(|(_, size)| remote_snapshot_export(volume, snap, size)),
            };
        }
        match &self.cluster {
            None => self.store.volume(name).map(|v| export_of(&v)),
            Some(_) => self.all().into_iter().find(|e| e.name == name),
        }
    }
    fn list(&self) -> Vec<ExportInfo> {
        let mut all = self.all();
        all.extend(self.snapshots());
        all
    }
    fn default_export(&self) -> Option<String> {
        self.all().first().map(|e| e.name.clone())
    }
}

/// Serves NBD on `listener`; `tls` is what the node offers of NBD over TLS (none: off).
pub async fn serve(listener: impl Into<Listener>, engine: Arc<Engine>, tls: Option<Arc<NbdTls>>) {
    let listener = listener.into();
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let engine = engine.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match handle(sock, engine, tls).await {
                Ok(()) => tracing::debug!(%peer, "connection closed"),
                Err(e) => tracing::info!(%peer, error = %e, "connection ended"),
            }
        });
    }
}

/// How long a connection waits, before its handshake, for a node that is still
/// starting up (its metadata may be behind the cluster's) before it is closed.
const STARTUP_WAIT: Duration = Duration::from_secs(30);

async fn handle(
    mut sock: Stream,
    engine: Arc<Engine>,
    tls: Option<Arc<NbdTls>>,
) -> anyhow::Result<()> {
    // A node that has not finished its start-up check would act on an old view (itself
    // primary at an old epoch, say): the client waits for the greeting instead, and
    // never sees an I/O error for it — unless the node holds a volume at the recovery
    // server (it took over as the last failure domain, with no majority to catch up
    // with).
    if let Some(c) = engine.cluster.get() {
        let t0 = tokio::time::Instant::now();
        while !c.is_ready() && !c.serves_on_hold() {
            if t0.elapsed() >= STARTUP_WAIT {
                anyhow::bail!("this node is still starting up (its metadata is catching up with the cluster); connection closed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let catalog = Catalog {
        store: engine.store.clone(),
        cluster: engine.cluster.get().cloned(),
    };
    let policy = tls.as_ref().map_or(TlsPolicy::Off, |t| t.policy);
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut hs = greet(&mut sock, policy).await?;
        match options(&mut sock, &mut hs, &catalog).await? {
            Negotiated::Close => Ok(None),
            Negotiated::Export(e, structured) => {
                let allocation = hs.allocation_selected(&e.name);
                Ok(Some((Conn::Plain(sock), e, structured, allocation)))
            }
            Negotiated::StartTls => {
                let tls = tls.as_ref().expect("STARTTLS is accepted only with TLS on");
                let mut sock = tls.accept(sock).await?;
                hs.tls_started();
                match options(&mut sock, &mut hs, &catalog).await? {
                    Negotiated::Export(e, structured) => {
                        let allocation = hs.allocation_selected(&e.name);
                        Ok(Some((Conn::Tls(Box::new(sock)), e, structured, allocation)))
                    }
                    Negotiated::Close => Ok(None),
                    Negotiated::StartTls => anyhow::bail!("a second STARTTLS was accepted"),
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("handshake timed out"))??;
    let Some((conn, export, structured, allocation)) = negotiated else {
        return Ok(());
    };
    let ex = match snapshot_name(&export.name) {
        Some((volume, snap)) => match catalog.snapshot(volume, snap) {
            Some((v, s)) => Arc::new(Export {
                name: volume.to_string(),
                size: export.size_bytes,
                local: Some(v),
                allocation,
                snap: Some(s),
                remote: None,
                uid: 0,
            }),
            None => {
                let Some((id, _)) = catalog.remote_snapshot(volume, snap) else {
                    anyhow::bail!("snapshot {} vanished", export.name);
                };
                Arc::new(Export {
                    name: volume.to_string(),
                    size: export.size_bytes,
                    local: None,
                    allocation,
                    snap: None,
                    remote: Some((snap.to_string(), id)),
                    uid: 0,
                })
            }
        },
        None => {
            let local = catalog.local_copy(&export.name);
            if engine.cluster.get().is_none() && local.as_ref().is_none_or(|v| v.is_unfilled()) {
                anyhow::bail!("export {} vanished", export.name);
            }
            // In a cluster the connection is bound to the volume the name is now; one
            // deleted (or being made again) since the handshake is not served.
            let uid = match catalog.cluster.as_ref() {
                None => 0,
                Some(c) => match c.store.meta().volumes.get(&export.name) {
                    Some(v) if v.cloning.is_none() => v.uid,
                    _ => anyhow::bail!("export {} vanished", export.name),
                },
            };
            Arc::new(Export {
                name: export.name.clone(),
                size: export.size_bytes,
                local,
                allocation,
                snap: None,
                remote: None,
                uid,
            })
        }
    };
    match conn {
        Conn::Plain(sock) => {
            let (rd, wr) = sock.into_split();
            transmission(rd, wr, engine, ex, structured).await
        }
        Conn::Tls(sock) => {
            let (rd, wr) = crate::nbd_tls::split(*sock);
            transmission(rd, wr, engine, ex, structured).await
        }
    }
}

/// A connection entering transmission: in the clear, or inside TLS.
enum Conn {
    Plain(Stream),
    Tls(Box<tokio_openssl::SslStream<Stream>>),
}

/// How option haggling ended.
enum Negotiated {
    /// The client aborted, or the server closed (after a bad NBD_OPT_EXPORT_NAME).
    Close,
    /// Transmission on this export, with or without structured replies.
    Export(ExportInfo, bool),
    /// The client asked for TLS and was told yes: the TLS handshake comes next.
    StartTls,
}

/// The greeting and the client's flags.
async fn greet(sock: &mut Stream, tls: TlsPolicy) -> anyhow::Result<Handshake> {
    sock.write_all(&server_greeting()).await?;
    let mut cf = [0u8; 4];
    sock.read_exact(&mut cf).await?;
    let no_zeroes = parse_client_flags(cf)?;
    Ok(Handshake::with_tls(no_zeroes, tls))
}

/// Option haggling, until an export is chosen, the client leaves, or TLS starts.
async fn options<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    hs: &mut Handshake,
    catalog: &Catalog,
) -> anyhow::Result<Negotiated> {
    for _ in 0..OPTIONS_PER_HANDSHAKE_MAX {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        sock.read_exact(&mut hb).await?;
        let h = OptionHeader::parse(&hb)?;
        if h.length > OPTION_DATA_MAX_BYTES {
            if h.length > OPTION_DISCARD_MAX_BYTES {
                anyhow::bail!(
                    "option {} with {} bytes of data: closing",
                    h.option,
                    h.length
                );
            }
            let mut sink = vec![0u8; h.length as usize];
            sock.read_exact(&mut sink).await?;
            sock.write_all(&lazarus_nbd::option_reply(
                h.option,
                REP_ERR_TOO_BIG,
                b"option data too large",
            ))
            .await?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        sock.read_exact(&mut data).await?;
        match hs.handle(h.option, &data, catalog) {
            OptionOutcome::Continue { reply } => sock.write_all(&reply).await?,
            OptionOutcome::Abort { reply } => {
                let _ = sock.write_all(&reply).await;
                let _ = sock.flush().await;
                return Ok(Negotiated::Close);
            }
            OptionOutcome::Close { reason } => {
                tracing::info!(%reason, "closing during handshake");
                return Ok(Negotiated::Close);
            }
            OptionOutcome::StartTls { reply } => {
                sock.write_all(&reply).await?;
                sock.flush().await?;
                return Ok(Negotiated::StartTls);
            }
            OptionOutcome::Transmission {
                reply,
                export,
                structured,
            } => {
                sock.write_all(&reply).await?;
                sock.flush().await?;
                return Ok(Negotiated::Export(export, structured));
            }
        }
    }
    anyhow::bail!("too many options in one handshake")
}

/// Replies on their way to the writer, with the connection's memory budget they hold
/// (`CONNECTION_BYTES_MAX`), given back once they are written.
/// Reply bytes, the budget they hold, and whether the connection ends after them
/// (`execute`).
type Replies = (Vec<u8>, Option<OwnedSemaphorePermit>, bool);

/// `in_tasks`: the connection's requests running in tasks of their own (their permits
/// taken), whose replies are worth waiting one yield for.
///
/// The connection ends (its write side shut, the reader stopped) once a reply that
/// ends it is sent: a change that failed after a forwarded change's outcome turned
/// unknown (`Session::is_cut`).
async fn writer_task<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Replies>,
    in_tasks: Arc<Semaphore>,
    buffers: Arc<Buffers>,
) {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    while let Some((buf, _budget, mut ends)) = rx.recv().await {
        if w.write_all(&buf).await.is_err() {
            return;
        }
        buffers.give(buf);
        // Batch replies that are already queued, and those of the requests that are
        // ready to finish: one yield lets them run before the system call (replicated
        // writes complete in their own tasks, a burst of them at a time). Replies of
        // requests run in the reader come batched already.
        let mut yielded = in_tasks.available_permits() == INFLIGHT_PER_CONNECTION_MAX;
        while !ends {
            while let Ok((more, _budget, last)) = rx.try_recv() {
                if w.write_all(&more).await.is_err() {
                    return;
                }
                buffers.give(more);
                if last {
                    ends = true;
                    break;
                }
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
        if ends {
            let _ = w.shutdown().await;
            return;
        }
    }
}

fn error_reply(structured: bool, cookie: u64, e: &IoError) -> Vec<u8> {
    if structured {
        structured_error(cookie, e.errno, &e.message)
    } else {
        simple_reply(cookie, e.errno).to_vec()
    }
}

/// One connection's view of its export's `Acks`.
struct ConnAcks {
    acks: Arc<Acks>,
    opened: u64,
    /// A write, write-zeroes or trim came on this connection: from then on it stays
    /// bound to the primary epoch it was opened at (`bound`).
    wrote: std::sync::atomic::AtomicBool,
    /// This connection's session at the primary (`forward::FenceToken`).
    session: lazarus_engine::forward::Session,
    /// The connection's pooled buffers (`Buffers`): a large read's reply is one.
    buffers: Arc<Buffers>,
}

/// Buffers kept for a connection's next requests: write payloads, and replies once
/// written. A fresh buffer for a large request is memory the kernel maps and zeroes a
/// page at a time, and then the allocator zeroes it again: on 1 MiB writes the page
/// faults and the zeroing were about a tenth of a node's CPU. A buffer taken from here
/// is zeroed only past what it held before (for writes of one size, never), then
/// filled from the socket or the store.
#[derive(Default)]
struct Buffers(parking_lot::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// A buffer of `len` bytes (their content is overwritten by the caller).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut pool = self.0.lock();
        // The smallest that is large enough: the large ones stay for large requests.
        let fits = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        match fits {
            Some(i) => {
                let mut v = pool.swap_remove(i);
                drop(pool);
                v.resize(len, 0);
                v
            }
            None => vec![0u8; len],
        }
    }

    /// Keeps `v` for a later `take`: if there is room, or in place of a smaller one.
    /// Small replies (a write's 16 bytes) are not kept: cheap to allocate, they would
    /// take the places of the buffers worth keeping.
    fn give(&self, v: Vec<u8>) {
        if v.capacity() < POOLED_BUFFER_MIN_BYTES || v.capacity() > POOLED_BUFFER_MAX_BYTES {
            return;
        }
        let mut pool = self.0.lock();
        if pool.len() < POOLED_BUFFERS_MAX {
            pool.push(v);
        } else if let Some(small) = pool.iter_mut().min_by_key(|p| p.capacity()) {
            if small.capacity() < v.capacity() {
                *small = v;
            }
        }
    }
}

/// The replies batched so far, with the budget they hold and whether one ends the
/// connection, for the writer; the batch goes on in a pooled buffer.
fn hand_off(
    batch: &mut Vec<u8>,
    budget: &mut Option<OwnedSemaphorePermit>,
    ends: &mut bool,
    buffers: &Buffers,
) -> Replies {
    (
        std::mem::replace(batch, buffers.take(0)),
        budget.take(),
        std::mem::take(ends),
    )
}

async fn transmission<R, W>(
    rd: R,
    wr: W,
    engine: Arc<Engine>,
    ex: Arc<Export>,
    structured: bool,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let (tx, rx) = mpsc::channel::<Replies>(INFLIGHT_PER_CONNECTION_MAX * 2);
    let budget = Arc::new(Semaphore::new(CONNECTION_BYTES_MAX as usize));
    let inflight = Arc::new(Semaphore::new(INFLIGHT_PER_CONNECTION_MAX));
    let acks = engine.acks_for(&ex.name);
    let buffers = Arc::new(Buffers::default());
    let unflushed = Arc::new(ConnAcks {
        opened: acks.open(),
        wrote: Default::default(),
        acks,
        session: Default::default(),
        buffers: buffers.clone(),
    });
    let writer = tokio::spawn(writer_task(wr, rx, inflight.clone(), buffers.clone()));
    let size = ex.size;
    // A connection opened to the primary is bound to its epoch: if the node stops
    // being the primary (failover, a pause), requests on it fail and the client
    // reconnects, so nothing a deposed primary held is acknowledged or served.
    let bound = engine
        .primary_epoch(&ex.name)
        .filter(|_| ex.local.is_some());
    let mut batch: Vec<u8> = Vec::new();
    // A reply in the batch ends the connection (`execute`).
    let mut batch_ends = false;
    // The budget the batched replies hold.
    let mut batch_budget: Option<OwnedSemaphorePermit> = None;
    let result: anyhow::Result<()> = async {
        loop {
            // Hand the batched replies to the writer once no further request is
            // already buffered: one wake-up per burst, not per request.
            if rd.buffer().is_empty() && !batch.is_empty() {
                tx.send(hand_off(&mut batch, &mut batch_budget, &mut batch_ends, &buffers))
                    .await?;
            }
            // The writer stopped (the client is gone): the requests still buffered are
            // not executed.
            if tx.is_closed() {
                anyhow::bail!("the client stopped taking replies");
            }
            let mut hb = [0u8; REQUEST_HEADER_LEN];
            // The writer stops also to end the connection (`Session::is_cut`): the
            // reader stops then rather than when the client goes.
            let read = tokio::select! {
                biased;
                r = rd.read_exact(&mut hb) => Some(r),
                _ = tx.closed() => None,
            };
            let Some(read) = read else {
                unflushed.session.close();
                // The writer shut its side after the last reply. Closing with requests
                // still unread would reset the connection, and the reset may discard
                // that reply: what the client sends is read and dropped until it
                // closes its side (for up to 2 s).
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(b) = rd.fill_buf().await {
                        if b.is_empty() {
                            break;
                        }
                        let n = b.len();
                        rd.consume(n);
                    }
                })
                .await;
                anyhow::bail!("the connection ended: a forwarded change's outcome is unknown, or the client stopped taking replies");
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    anyhow::bail!("client closed the connection without NBD_CMD_DISC")
                }
                Err(e) => return Err(e.into()),
            }
            let req = Request::parse(&hb)?;
            if req.payload_len() > PAYLOAD_MAX_BYTES {
                // The payload cannot be skipped safely at this size: hard disconnect,
                // as the protocol allows.
                anyhow::bail!(
                    "write of {} bytes exceeds the {} byte limit",
                    req.length,
                    PAYLOAD_MAX_BYTES
                );
            }
            // Its share of the connection's memory, before its payload is read: the
            // replies batched so far go out first if the budget is spent (they hold
            // part of it).
            let cost = request_bytes(&req);
            let held = match budget.clone().try_acquire_many_owned(cost) {
                Ok(p) => p,
                Err(_) => {
                    if !batch.is_empty() {
                        tx.send(hand_off(&mut batch, &mut batch_budget, &mut batch_ends, &buffers))
                            .await?;
                    }
                    wait_watching(&mut rd, budget.clone().acquire_many_owned(cost)).await?
                }
            };
            let mut payload = Vec::new();
            if req.payload_len() > 0 {
                payload = buffers.take(req.payload_len() as usize);
                rd.read_exact(&mut payload).await?;
            }
            if req.command == Command::Disconnect {
                if !batch.is_empty() {
                    tx.send(hand_off(&mut batch, &mut batch_budget, &mut batch_ends, &buffers))
                        .await?;
                }
                // Let in-flight requests finish and their replies go out.
                let _all = inflight
                    .acquire_many(INFLIGHT_PER_CONNECTION_MAX as u32)
                    .await?;
                return Ok(());
            }
            // Inline only what completes locally: a write that waits for replicas
            // would hold up every request behind it on this connection.
            if runs_inline(&req)
                && ex.copy(&engine).is_some_and(|v| engine.serves_locally(&v))
                && (matches!(req.command, Command::Read | Command::BlockStatus)
                    || !engine.replicates(&ex.name))
            {
                batch_ends |= execute(
                    &engine, &ex, bound, &unflushed, req, &payload, size, structured, &mut batch,
                )
                .await;
                buffers.give(payload);
                match &mut batch_budget {
                    Some(b) => b.merge(held),
                    None => batch_budget = Some(held),
                }
                if batch.len() >= REPLY_BATCH_MAX_BYTES {
                    tx.send(hand_off(&mut batch, &mut batch_budget, &mut batch_ends, &buffers))
                        .await?;
                }
                continue;
            }
            let permit = match inflight.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => wait_watching(&mut rd, inflight.clone().acquire_owned()).await?,
            };
            let engine = engine.clone();
            let ex = ex.clone();
            let tx = tx.clone();
            let unflushed = unflushed.clone();
            let buffers = buffers.clone();
            let fut = async move {
                // Empty: a read's reply is then a pooled buffer of its size (`execute`).
                let mut reply = Vec::new();
                let ends = execute(
                    &engine, &ex, bound, &unflushed, req, &payload, size, structured, &mut reply,
                )
                .await;
                buffers.give(payload);
                let _ = tx.send((reply, Some(held), ends)).await;
                drop(permit);
            };
            tokio::spawn(fut);
        }
    }
    .await;
    // Requests of this connection still being forwarded are not sent again.
    unflushed.session.close();
    drop(tx);
    let _ = writer.await;
    result
}

/// Waits for `acquire` (room for one more request) while watching the connection:
/// if it ends meanwhile (end of stream or an error, with nothing buffered), returns
/// an error at once, so that the connection's session closes now rather than when
/// room comes. The requests held up in flight (a write forwarded to a primary that
/// died, say) then no longer run after what the client does next through another
/// connection. Data that arrives meanwhile is left buffered for the next request.
async fn wait_watching<R, T>(
    rd: &mut BufReader<R>,
    acquire: impl std::future::Future<Output = Result<T, tokio::sync::AcquireError>>,
) -> anyhow::Result<T>
where
    R: AsyncRead + Unpin,
{
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            got = &mut acquire => return Ok(got?),
            more = rd.fill_buf(), if rd.buffer().is_empty() => match more {
                Ok([]) => anyhow::bail!("client closed the connection with requests in flight"),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
}

/// The bytes a request holds while it is served: its payload (a write's data) or its
/// reply's (a read's data), at least 1, at most `CONNECTION_BYTES_MAX`.
fn request_bytes(req: &Request) -> u32 {
    let data = match req.command {
        // Longer than any read is allowed to be: refused (EINVAL) with no data.
        Command::Read if req.length > PAYLOAD_MAX_BYTES => 1,
        Command::Read => req.length,
        _ => req.payload_len(),
    };
    data.clamp(1, CONNECTION_BYTES_MAX)
}

/// Reads and plain writes run in the connection's reader task: they are short and
/// CPU-bound, and running them there saves a task and a cross-thread wake-up each.
/// Anything that syncs (FLUSH, FUA) or may touch many pages (TRIM, WRITE_ZEROES) runs
/// in its own task so later requests overlap with it.
fn runs_inline(req: &Request) -> bool {
    let short = req.length <= INLINE_LENGTH_MAX_BYTES;
    matches!(
        req.command,
        Command::Read | Command::Write | Command::BlockStatus | Command::Unknown(_)
    ) && short
        && !req.fua()
}

/// Executes one request, appends its reply to `out`, and records its metrics.
/// Returns whether the connection ends once the reply is sent: a change that failed
/// after the session was cut (`Session::is_cut`), the cut's own failure among them.
#[allow(clippy::too_many_arguments)]
async fn execute(
    engine: &Engine,
    ex: &Export,
    bound: Option<u64>,
    unflushed: &ConnAcks,
    req: Request,
    payload: &[u8],
    size: u64,
    structured: bool,
    out: &mut Vec<u8>,
) -> bool {
    let t0 = tokio::time::Instant::now();
    let start = out.len();
    let (command, length) = (req.command, req.length as u64);
    execute_inner(
        engine, ex, bound, unflushed, req, payload, size, structured, out,
    )
    .await;
    use lazarus_observe::metrics::Op;
    let op = match command {
        Command::Read => Op::Read,
        Command::Write => Op::Write,
        Command::Flush => Op::Flush,
        Command::Trim => Op::Trim,
        Command::WriteZeroes => Op::WriteZeroes,
        Command::BlockStatus | Command::Disconnect | Command::Unknown(_) => return false,
    };
    let ok = reply_ok(&out[start..]);
    let bytes = match op {
        Op::Read | Op::Write if ok => length,
        _ => 0,
    };
    lazarus_observe::metrics::record_request(&ex.name, op, bytes, t0.elapsed(), ok);
    !ok && matches!(op, Op::Write | Op::Trim | Op::WriteZeroes) && unflushed.session.is_cut()
}

/// Whether the reply starting at `r` reports success (simple or structured).
fn reply_ok(r: &[u8]) -> bool {
    if r.len() < 8 {
        return false;
    }
    match u32::from_be_bytes(r[0..4].try_into().expect("4 bytes")) {
        0x6744_6698 => r[4..8] == [0, 0, 0, 0],
        0x668e_33ef => u16::from_be_bytes([r[6], r[7]]) & 0x8000 == 0,
        _ => false,
    }
}

#[allow(clippy::too_many_arguments)]
async fn execute_inner(
    engine: &Engine,
    ex: &Export,
    bound: Option<u64>,
    unflushed: &ConnAcks,
    req: Request,
    payload: &[u8],
    size: u64,
    structured: bool,
    out: &mut Vec<u8>,
) {
    if let Err(errno) = req.validate(size, ex.snap.is_some() || ex.remote.is_some()) {
        let e = IoError::new(
            errno,
            format!(
                "invalid request {:?} at {} length {}",
                req.command, req.offset, req.length
            ),
        );
        tracing::debug!(cookie = req.cookie, error = %e.message, "rejecting request");
        out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        return;
    }
    if let Some(snap) = &ex.snap {
        snapshot_request(engine, ex, snap, req, structured, out).await;
        return;
    }
    if let Some((snap, id)) = &ex.remote {
        remote_snapshot_request(engine, ex, snap, *id, req, structured, out).await;
        return;
    }
    if req.command == Command::BlockStatus {
        block_status(engine, ex, req, structured, out);
        return;
    }
    // A connection bound to the primary's epoch that has written nothing holds
    // nothing a deposed primary could lose: its reads and flushes go where a new
    // connection's would (served here under a valid lease, or forwarded to the
    // primary) instead of failing when the primary changes. Its first write binds it.
    let bound = match req.command {
        Command::Write | Command::WriteZeroes | Command::Trim => {
            unflushed
                .wrote
                .store(true, std::sync::atomic::Ordering::Release);
            bound
        }
        _ => bound.filter(|_| unflushed.wrote.load(std::sync::atomic::Ordering::Acquire)),
    };
    let copy = ex.copy(engine);
    let local = copy.as_deref().filter(|v| engine.serves_locally(v));
    let vol = match local {
        Some(v) => v,
        None => match engine.route_name(&ex.name).await {
            Ok(Route::Forward(_)) if follows(engine, &ex.name, bound) => {
                // Boxed, as are the other rare branches: a task's future is as large
                // as its largest branch, and every replicated write spawns one.
                Box::pin(forwarded(
                    engine,
                    &ex.name,
                    ex.uid,
                    unflushed,
                    req,
                    payload,
                    structured,
                    out,
                    bound.map(|e| e + 1),
                ))
                .await;
                return;
            }
            Ok(Route::Local) if copy.is_some() => copy.as_deref().expect("checked"),
            Ok(_) => {
                let e = IoError::new(
                    lazarus_nbd::consts::EIO,
                    format!(
                        "the primary of {:?} changed since this connection was opened; reconnect",
                        ex.name
                    ),
                );
                tracing::info!(volume = %ex.name, command = ?req.command, "request on a connection to a deposed primary refused");
                out.extend_from_slice(&error_reply(structured, req.cookie, &e));
                return;
            }
            Err(e) => {
                out.extend_from_slice(&error_reply(structured, req.cookie, &e));
                return;
            }
        },
    };
    if bound.is_some() && engine.primary_epoch(&ex.name) != bound {
        let e = IoError::new(
            lazarus_nbd::consts::EIO,
            format!(
                "the primary of {:?} changed since this connection was opened; reconnect",
                vol.meta.name
            ),
        );
        tracing::info!(volume = %vol.meta.name, command = ?req.command, "request on a connection to a deposed primary refused");
        out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        return;
    }
    if modifies_data(&req) {
        if let Some(c) = engine.cluster.get() {
            unflushed.session.open_locally(c, &vol.meta.name);
        }
    }
    // A change runs only while its connection is open, checked under its block locks:
    // one read before the client's connection was cut and held up here (waiting for the
    // lease, say) must not land after what the client wrote since through another
    // connection (simulator seed 536). One that got its locks first lands first.
    let open = || !unflushed.session.is_closed();
    let r = match req.command {
        Command::Read => {
            let hdr = if structured { 28 } else { 16 };
            let start = out.len();
            if out.capacity() == 0 {
                // A reply of its own (a large read, in its task): a pooled buffer, which
                // the store then overwrites whole, is not zeroed first.
                *out = unflushed.buffers.take(hdr + req.length as usize);
            } else {
                out.resize(start + hdr + req.length as usize, 0);
            }
            let r = engine
                .read_repairing(vol, req.offset, &mut out[start + hdr..])
                .await;
            match r {
                Ok(()) => {
                    if structured {
                        out[start..start + 28].copy_from_slice(&structured_read_header(
                            req.cookie, req.offset, req.length,
                        ));
                    } else {
                        out[start..start + 16].copy_from_slice(&simple_reply(req.cookie, 0));
                    }
                    return;
                }
                Err(e) => {
                    out.truncate(start);
                    Err(e)
                }
            }
        }
        Command::Write => {
            engine
                .write_admitted(vol, req.offset, payload, req.fua(), Some(&open))
                .await
        }
        Command::Flush => {
            let t = unflushed.acks.flush_start();
            match Box::pin(engine.flush(vol)).await {
                Ok(()) => unflushed
                    .acks
                    .flush_done(unflushed.opened, t, engine.executor(&vol.meta.name))
                    .map(|()| Vec::new()),
                Err(e) => Err(e),
            }
        }
        Command::Trim => {
            Box::pin(engine.zero_admitted(
                vol,
                req.offset,
                req.length as u64,
                true,
                false,
                req.fua(),
                Some(&open),
            ))
            .await
        }
        Command::WriteZeroes => {
            Box::pin(engine.zero_admitted(
                vol,
                req.offset,
                req.length as u64,
                false,
                req.no_hole(),
                req.fua(),
                Some(&open),
            ))
            .await
        }
        Command::BlockStatus | Command::Disconnect | Command::Unknown(_) => {
            unreachable!("handled before execute")
        }
    };
    match r {
        Ok(holders) => {
            if modifies(&req) {
                unflushed.acks.acked(holders);
            }
            out.extend_from_slice(&simple_reply(req.cookie, 0))
        }
        Err(e) if e.not_serving && Box::pin(moved_on(engine, &ex.name, bound)).await => {
            // The primary role moved on while the request ran here: it runs again where
            // the role is now (requests are idempotent; the client had no answer yet).
            tracing::info!(volume = %vol.meta.name, command = ?req.command, offset = req.offset, "request sent on to the new primary: {}", e.message);
            Box::pin(forwarded(
                engine,
                &ex.name,
                ex.uid,
                unflushed,
                req,
                payload,
                structured,
                out,
                bound.map(|e| e + 1),
            ))
            .await;
        }
        Err(e) => {
            tracing::warn!(volume = %vol.meta.name, command = ?req.command, offset = req.offset, length = req.length, error = %e.message, "request failed");
            out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        }
    }
}

/// Whether a request on a connection bound to primary epoch `bound` (None: not bound)
/// may go to the volume's primary elsewhere: always when not bound; when bound, only if
/// the role was handed over on purpose at that epoch (`Cluster::handed_over_from`),
/// whose successor applied every write this node acknowledged (a FLUSH there vouches
/// for them, `Acks`). After a failover it may not: a deposed primary's connection
/// fails, and its client reconnects.
fn follows(engine: &Engine, volume: &str, bound: Option<u64>) -> bool {
    match (bound, engine.cluster.get()) {
        (None, _) => true,
        (Some(epoch), Some(c)) => c.handed_over_from(volume, epoch),
        (Some(_), None) => false,
    }
}

/// A request that ran here failed because this node stopped serving the volume as
/// its primary (its lease lapsed: a hand-over or a failover under way). Waits for the
/// metadata to name the new primary; whether the request may go there (`follows`).
async fn moved_on(engine: &Engine, volume: &str, bound: Option<u64>) -> bool {
    matches!(engine.route_name(volume).await, Ok(Route::Forward(_)))
        && follows(engine, volume, bound)
}

/// A request on a snapshot export: reads and block status from this node's copy of
/// the snapshot (it never changes, so any copy that holds it serves it); a flush has
/// nothing to do; writes were refused by `validate` (EPERM).
async fn snapshot_request(
    engine: &Engine,
    ex: &Export,
    snap: &Arc<Snapshot>,
    req: Request,
    structured: bool,
    out: &mut Vec<u8>,
) {
    // The copy and the snapshot are still the ones the connection opened.
    let vol = ex.copy(engine).filter(|v| {
        v.snapshot(&snap.name)
            .is_some_and(|s| Arc::ptr_eq(&s, snap) && engine.snapshot_current(&ex.name, &s))
    });
    let Some(vol) = vol else {
        let e = IoError::new(
            EIO,
            format!(
                "snapshot {}@{} is no longer held by this node (deleted, or its copy moved)",
                ex.name, snap.name
            ),
        );
        out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        return;
    };
    let bs = lazarus_types::BLOCK_SIZE_U64;
    match req.command {
        Command::Read => {
            let first = req.offset / bs;
            let end = (req.offset + req.length as u64).div_ceil(bs);
            let read = || {
                engine
                    .store
                    .read_snapshot_range(&vol, snap, req.offset, req.length as u64)
            };
            let mut r = read();
            // A page or block that fails verification here is repaired from another
            // node (by id), then read again: also when this repair found nothing left
            // to do, since a concurrent read of the same page may have repaired it.
            if r.is_err() {
                engine
                    .repair_snapshot_range(&vol, snap, first, end - first)
                    .await;
                r = read();
            }
            match r {
                Ok(data) => {
                    if structured {
                        out.extend_from_slice(&structured_read_header(
                            req.cookie, req.offset, req.length,
                        ));
                    } else {
                        out.extend_from_slice(&simple_reply(req.cookie, 0));
                    }
                    out.extend_from_slice(&data);
                }
                Err(e) => {
                    tracing::warn!(volume = %ex.name, snapshot = %snap.name, offset = req.offset, error = %e, "snapshot read failed");
                    out.extend_from_slice(&error_reply(structured, req.cookie, &IoError::from(e)));
                }
            }
        }
        Command::Flush => out.extend_from_slice(&simple_reply(req.cookie, 0)),
        Command::BlockStatus if ex.allocation => {
            let first = req.offset / bs;
            let end = req.offset + req.length as u64;
            let runs = engine.store.snapshot_allocation(
                &vol,
                snap,
                first,
                (end - 1) / bs - first + 1,
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    EXTENTS_MAX
                },
            );
            out.extend(lazarus_nbd::block_status_reply(
                req.cookie,
                BASE_ALLOCATION_ID,
                &extents_of(runs, req.offset, end),
            ));
        }
        _ => {
            let e = IoError::new(
                EINVAL,
                format!("{:?} is not served on a snapshot", req.command),
            );
            out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        }
    }
}

/// A request on a snapshot export this node's copy does not hold: reads and block
/// status asked of a copy that holds the snapshot (`Engine::remote_snapshot_read`).
async fn remote_snapshot_request(
    engine: &Engine,
    ex: &Export,
    snap: &str,
    id: u64,
    req: Request,
    structured: bool,
    out: &mut Vec<u8>,
) {
    let bs = lazarus_types::BLOCK_SIZE_U64;
    let r = match req.command {
        Command::Read => engine
            .remote_snapshot_read(&ex.name, snap, id, req.offset, req.length)
            .await
            .map(|data| {
                if structured {
                    out.extend_from_slice(&structured_read_header(
                        req.cookie, req.offset, req.length,
                    ));
                } else {
                    out.extend_from_slice(&simple_reply(req.cookie, 0));
                }
                out.extend_from_slice(&data);
            }),
        Command::Flush => {
            out.extend_from_slice(&simple_reply(req.cookie, 0));
            Ok(())
        }
        Command::BlockStatus if ex.allocation => {
            let first = req.offset / bs;
            let end = req.offset + req.length as u64;
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                EXTENTS_MAX
            };
            engine
                .remote_snapshot_allocation(
                    &ex.name,
                    snap,
                    id,
                    first,
                    (end - 1) / bs - first + 1,
                    max,
                )
                .await
                .map(|runs| {
                    out.extend(lazarus_nbd::block_status_reply(
                        req.cookie,
                        BASE_ALLOCATION_ID,
                        &extents_of(runs, req.offset, end),
                    ))
                })
        }
        _ => Err(IoError::new(
            EINVAL,
            format!("{:?} is not served on a snapshot", req.command),
        )),
    };
    if let Err(e) = r {
        tracing::warn!(volume = %ex.name, snapshot = snap, offset = req.offset, error = %e.message, "snapshot request through a copy failed");
        out.extend_from_slice(&error_reply(structured, req.cookie, &e));
    }
}

/// Most extents in one NBD_CMD_BLOCK_STATUS reply (the client asks again for the rest).
const EXTENTS_MAX: usize = 4096;

/// NBD_CMD_BLOCK_STATUS for `base:allocation`: holes (nothing stored, reads as zeroes)
/// and data, from the primary's copy. A node that is not serving the volume itself
/// reports the whole range as data: always true enough (a client then reads it), where
/// a copy that may lag the primary could report a hole over an acknowledged write.
fn block_status(engine: &Engine, ex: &Export, req: Request, structured: bool, out: &mut Vec<u8>) {
    if !ex.allocation {
        let e = IoError::new(
            EINVAL,
            "NBD_CMD_BLOCK_STATUS needs the base:allocation meta context (NBD_OPT_SET_META_CONTEXT)",
        );
        out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        return;
    }
    let everything = vec![(req.length, 0)];
    let copy = ex.copy(engine);
    let extents = match copy.as_deref().filter(|v| engine.serves_locally(v)) {
        Some(v) => {
            let e =
                allocation_extents(v, req.offset, req.length, req.flags & CMD_FLAG_REQ_ONE != 0);
            // As for reads: still the primary once the map is read.
            if e.is_empty() || !engine.serves_locally(v) {
                everything
            } else {
                e
            }
        }
        None => everything,
    };
    out.extend(lazarus_nbd::block_status_reply(
        req.cookie,
        BASE_ALLOCATION_ID,
        &extents,
    ));
}

/// The byte extents (length, flags) of `length` bytes from `offset`, from the volume's
/// map of stored blocks: at most `EXTENTS_MAX` (one with `one`), from `offset` on.
fn allocation_extents(v: &Volume, offset: u64, length: u32, one: bool) -> Vec<(u32, u32)> {
    let bs = lazarus_types::BLOCK_SIZE_U64;
    let end = offset + length as u64;
    let first = offset / bs;
    let runs = v.allocation(
        first,
        (end - 1) / bs - first + 1,
        if one { 1 } else { EXTENTS_MAX },
    );
    extents_of(runs, offset, end)
}

/// Byte extents (length, flags) from `offset` to at most `end` of allocation runs
/// that start at the block holding `offset`.
fn extents_of(
    runs: Vec<(u64, lazarus_store::Allocation)>,
    offset: u64,
    end: u64,
) -> Vec<(u32, u32)> {
    let bs = lazarus_types::BLOCK_SIZE_U64;
    let first = offset / bs;
    let mut out = Vec::with_capacity(runs.len());
    let (mut pos, mut block) = (offset, first);
    for (n, what) in runs {
        block += n;
        let stop = (block * bs).min(end);
        let flags = match what {
            lazarus_store::Allocation::Data => 0,
            lazarus_store::Allocation::Hole => STATE_HOLE | STATE_ZERO,
            lazarus_store::Allocation::Zero => STATE_ZERO,
        };
        out.push(((stop - pos) as u32, flags));
        pos = stop;
    }
    out
}

/// A request that changes the volume's data.
fn modifies_data(req: &Request) -> bool {
    matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    )
}

/// A write the client may later FLUSH: FUA ones are durable when acknowledged.
fn modifies(req: &Request) -> bool {
    matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    ) && !req.fua()
}

/// Executes a request at the volume's primary (this node is not it); with `epoch`,
/// only at a primary of that epoch (`Engine::forward`).
#[allow(clippy::too_many_arguments)]
async fn forwarded(
    engine: &Engine,
    volume: &str,
    uid: u64,
    unflushed: &ConnAcks,
    req: Request,
    payload: &[u8],
    structured: bool,
    out: &mut Vec<u8>,
    epoch: Option<u64>,
) {
    let op = match req.command {
        Command::Read => Op::Read,
        Command::Write => Op::Write,
        Command::Flush => Op::Flush,
        Command::Trim => Op::Trim,
        Command::WriteZeroes => Op::Zero,
        Command::BlockStatus | Command::Disconnect | Command::Unknown(_) => {
            unreachable!("handled before execute")
        }
    };
    let f = ForwardReq {
        volume: volume.to_string(),
        op,
        offset: req.offset,
        length: req.length as u64,
        fua: req.fua(),
        no_hole: req.no_hole(),
        fence: None,
        uid,
    };
    let t = (op == Op::Flush).then(|| unflushed.acks.flush_start());
    let r = engine
        .forward(&f, payload, Some(&unflushed.session), epoch)
        .await
        .and_then(|done| {
            if let Some(t) = t {
                unflushed.acks.flush_done(unflushed.opened, t, done.by)?;
            } else if modifies(&req) {
                unflushed.acks.acked(done.holders);
            }
            Ok(done.data)
        });
    match r {
        Ok(data) if op == Op::Read => {
            if data.len() as u64 != f.length {
                let e = IoError::new(lazarus_nbd::consts::EIO, "short forwarded read");
                out.extend_from_slice(&error_reply(structured, req.cookie, &e));
                return;
            }
            if structured {
                out.extend_from_slice(&structured_read_header(req.cookie, req.offset, req.length));
            } else {
                out.extend_from_slice(&simple_reply(req.cookie, 0));
            }
            out.extend_from_slice(&data);
        }
        Ok(_) => out.extend_from_slice(&simple_reply(req.cookie, 0)),
        Err(e) => {
            tracing::warn!(volume, command = ?req.command, offset = req.offset, length = req.length, error = %e.message, "forwarded request failed");
            out.extend_from_slice(&error_reply(structured, req.cookie, &e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool keeps the buffers worth keeping: not small replies, and a large buffer
    /// in place of a smaller one once full; a request takes the smallest that fits.
    #[test]
    fn pooled_buffers_keep_the_large_ones() {
        let b = Buffers::default();
        for _ in 0..2 * POOLED_BUFFERS_MAX {
            b.give(Vec::with_capacity(16));
        }
        assert!(b.0.lock().is_empty(), "small replies are not kept");
        for _ in 0..POOLED_BUFFERS_MAX {
            b.give(vec![1u8; 4096]);
        }
        b.give(vec![2u8; 1 << 20]);
        assert_eq!(b.0.lock().len(), POOLED_BUFFERS_MAX);
        assert!(
            b.0.lock().iter().any(|v| v.capacity() >= 1 << 20),
            "the large one replaced a small one"
        );
        let small = b.take(4096);
        assert!(
            small.capacity() < 1 << 20,
            "a small request takes a small buffer"
        );
        let large = b.take(1 << 20);
        assert_eq!(large.len(), 1 << 20);
        assert!(large.capacity() >= 1 << 20);
        assert!(
            b.0.lock().iter().all(|v| v.capacity() < 1 << 20),
            "taken from the pool"
        );
        b.give(vec![3u8; POOLED_BUFFER_MAX_BYTES + 1]);
        assert!(b
            .0
            .lock()
            .iter()
            .all(|v| v.capacity() <= POOLED_BUFFER_MAX_BYTES));
    }

    /// A connection that ends while its reader waits for room for one more request is
    /// noticed at once (its session then closes), not when room comes.
    #[tokio::test]
    async fn an_end_of_connection_is_seen_while_requests_wait_for_room() {
        let (client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let room = Arc::new(Semaphore::new(0));
        drop(client);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            wait_watching(&mut rd, room.clone().acquire_owned()),
        )
        .await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the end was not seen while waiting"
        );

        // Data that arrives meanwhile stays buffered, and the wait goes on until room
        // comes.
        let (mut client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let room = Arc::new(Semaphore::new(0));
        client.write_all(b"next").await.unwrap();
        let later = room.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            later.add_permits(1);
        });
        let _room = wait_watching(&mut rd, room.clone().acquire_owned())
            .await
            .expect("room came");
        assert_eq!(rd.buffer(), b"next");
    }
}
