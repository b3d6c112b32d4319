//! Client requests that reach a node which is not the volume's primary are forwarded
//! to the primary over the node-to-node RPC and answered from there: every node's NBD
//! endpoint serves every volume.

use crate::engine::{Engine, IoError, Route};
use lazarus_nbd::consts::{EINVAL, EIO};
use lazarus_node::cluster::Cluster;
pub use lazarus_rpc::msg::{Executor, FenceToken, ForwardReply, ForwardReq, Holders, Op};
use lazarus_rpc::{self as rpc, KIND_FORWARD};
use std::time::Duration;
use tokio::time::Instant;

/// How long a forwarded request keeps trying (the primary failing over meanwhile).
const FORWARD_DEADLINE: Duration = Duration::from_secs(10);
const FORWARD_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// A client connection as the forwarding node knows it (`FenceToken`).
#[derive(Debug, Default)]
pub struct Session {
    tokens: parking_lot::Mutex<Tokens>,
    closed: std::sync::atomic::AtomicBool,
    /// Closed because a change's outcome is unknown (`Engine::forward`): the client
    /// connection must end.
    cut: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Tokens {
    /// The token the connection's changes carry.
    current: Option<FenceToken>,
    /// The newest token an attempt carried whose outcome is unknown (its call timed
    /// out, or its connection broke after it may have been sent): that attempt may
    /// still run at the primary until a newer session fences it there. No change is
    /// sent with a token that does not supersede it.
    unsettled: Option<FenceToken>,
    /// Such an attempt carried no token (a primary of an older version): nothing
    /// fences it.
    unsettled_bare: bool,
}

/// Whether token `a` fences `b` wherever `b` could still run. Within one primary
/// process only the fence count orders tokens (it never goes back, and a token above
/// `b`'s means the count passed it: `fence_admits` refuses `b` there); the epoch in a
/// token can go back (a hold's epoch, then the metadata's). A token of another process
/// was issued by a primary that holds the volume's lease now: `b`'s process no longer
/// serves it (its lease lapsed, checked before a write applies anything and again
/// under its block locks), as for every write of a deposed primary. Incarnations of
/// different nodes come from unrelated clocks and order nothing.
fn supersedes(a: &FenceToken, b: &FenceToken) -> bool {
    a.incarnation != b.incarnation || a.fence > b.fence
}

/// Whether token `new` may replace `cur`: not an older answer from the same process
/// (calls that ran side by side return in any order). A token of the same fence
/// count with another epoch replaces it (the primary's epoch went back or on), and so
/// does one of another process: if that is a late answer from a former primary, the
/// writes it carries are refused as fenced and the current primary's token is taken.
fn replaces(new: &FenceToken, cur: &FenceToken) -> bool {
    supersedes(new, cur) || new.fence == cur.fence
}

impl Tokens {
    /// Whether every attempt of unknown outcome is fenced by the current token.
    fn settled(&self) -> bool {
        !self.unsettled_bare
            && self
                .unsettled
                .is_none_or(|u| self.current.is_some_and(|c| supersedes(&c, &u)))
    }
}

impl Session {
    /// The client connection closed: its forwarded writes are not sent again.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A forwarded change failed with its outcome unknown, and no newer session has
    /// fenced it at the primary: it may still land there, after anything this
    /// connection would send next. The session closes (nothing of it is sent again)
    /// and its client connection ends once the failure is answered; the client's next
    /// writes come through a new connection, whose session fences the old one.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        self.close();
    }

    /// Whether the client connection must end (`cut`).
    pub fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A connection whose requests run on this node, the volume's primary: opens its
    /// session here before its first write.
    pub fn open_locally(&self, c: &Cluster, volume: &str) {
        let mut t = self.tokens.lock();
        if t.current.is_none_or(|t| t.incarnation != c.incarnation()) {
            t.current = Some(c.fence_token(volume, true));
        }
    }

    /// Whether its client connection closed (its reader saw the end or an error).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The token a forwarded change may carry now: `None` when a new session must be
    /// opened first (none yet, or the current one does not fence an attempt of
    /// unknown outcome, this connection's or `beyond`, another's of this node).
    fn usable(&self, beyond: Option<FenceToken>) -> Option<FenceToken> {
        let t = self.tokens.lock();
        t.current
            .filter(|c| t.settled() && beyond.is_none_or(|u| supersedes(c, &u)))
    }

    /// Takes a token the primary issued, unless a newer one is held already (calls
    /// that ran side by side return in any order). Returns whether the current token
    /// changed.
    fn take(&self, new: FenceToken) -> bool {
        let mut t = self.tokens.lock();
        let take = t.current != Some(new) && t.current.is_none_or(|c| replaces(&new, &c));
        if take {
            t.current = Some(new);
            // A process that issues tokens is not the one an attempt without a token
            // went to (a primary of an older version): that one no longer serves.
            t.unsettled_bare = false;
        }
        take
    }

    /// An attempt carrying `token` ended with its outcome unknown.
    fn unsettle(&self, token: Option<FenceToken>) {
        let mut t = self.tokens.lock();
        match token {
            None => t.unsettled_bare = true,
            Some(new) => {
                if t.unsettled.is_none_or(|u| supersedes(&new, &u)) {
                    t.unsettled = Some(new);
                }
            }
        }
    }

    /// Whether every attempt of unknown outcome is fenced at the primary.
    fn settled(&self) -> bool {
        self.tokens.lock().settled()
    }
}

/// A forwarded request's success, as the primary answers it.
fn reply_ok(executor: Executor, holders: Holders) -> ForwardReply {
    ForwardReply {
        errno: 0,
        message: String::new(),
        not_primary: false,
        holders,
        executor,
        fenced: false,
    }
}

/// A forwarded request's failure, as the primary answers it.
fn reply_failed(executor: Executor, e: IoError) -> ForwardReply {
    ForwardReply {
        errno: e.errno,
        message: e.message,
        fenced: e.fenced,
        ..reply_ok(executor, Vec::new())
    }
}

/// A request executed: its reply data, who executed it, and who holds what it wrote.
pub struct Done {
    pub data: Vec<u8>,
    pub by: Executor,
    pub holders: Holders,
}

impl Engine {
    /// Executes a request on this node, which must be the volume's primary.
    pub async fn execute_local(&self, req: &ForwardReq, payload: &[u8]) -> Result<Done, IoError> {
        self.execute_admitted(req, payload, None).await
    }

    /// `execute_local`, a write refused if `admit` says no once it holds its block
    /// locks.
    pub async fn execute_admitted(
        &self,
        req: &ForwardReq,
        payload: &[u8],
        admit: crate::engine::Admit<'_>,
    ) -> Result<Done, IoError> {
        let done = |data: Vec<u8>, holders: Holders| Done {
            data,
            by: self.executor(&req.volume),
            holders,
        };
        let vol = self.store.volume(&req.volume).ok_or_else(|| {
            IoError::new(
                EINVAL,
                format!("volume {:?} does not exist here", req.volume),
            )
        })?;
        // Only into the volume the request's connection opened (`req.uid`, 0: any),
        // and only through a copy of the volume the name is now: a copy left from a
        // deleted volume (not removed yet), or made before this node learnt of a newer
        // one, takes nothing. Here too, not only where a request is forwarded to: this
        // node may have become the primary of the name's next volume while a request
        // of an older connection was being routed.
        if let Some(c) = self.cluster.get() {
            let meta = c.store.meta();
            let current = meta.volumes.get(&req.volume).map(|v| v.uid);
            let gone = meta.deleted.contains(&vol.meta.uid)
                || (req.uid != 0 && meta.deleted.contains(&req.uid))
                || current.is_some_and(|u| req.uid != 0 && req.uid < u);
            if gone {
                return Err(IoError::new(
                    EIO,
                    format!(
                        "volume {:?} was deleted since this connection opened; reconnect",
                        req.volume
                    ),
                ));
            }
            if current.is_some_and(|u| u != vol.meta.uid || (req.uid != 0 && req.uid != u)) {
                return Err(IoError::not_serving(format!(
                    "this node's copy of {:?} is not the volume's current one",
                    req.volume
                )));
            }
        }
        let end = req.offset.checked_add(req.length);
        if end.is_none_or(|e| e > vol.size_bytes()) {
            return Err(IoError::new(EINVAL, "request past the end of the volume"));
        }
        // The NBD front end never sends more; a peer asking for more would make this
        // node allocate the whole length at once.
        if matches!(req.op, Op::Read | Op::Write)
            && req.length > lazarus_nbd::PAYLOAD_MAX_BYTES as u64
        {
            return Err(IoError::new(
                EINVAL,
                "request larger than the largest NBD payload",
            ));
        }
        match req.op {
            Op::Read => {
                let mut out = vec![0u8; req.length as usize];
                self.read_repairing(&vol, req.offset, &mut out).await?;
                Ok(done(out, Vec::new()))
            }
            Op::Write => {
                if payload.len() as u64 != req.length {
                    return Err(IoError::new(EINVAL, "write payload length mismatch"));
                }
                let h = self
                    .write_admitted(&vol, req.offset, payload, req.fua, admit)
                    .await?;
                Ok(done(Vec::new(), h))
            }
            Op::Flush => self.flush(&vol).await.map(|_| done(Vec::new(), Vec::new())),
            Op::Trim => self
                .zero_admitted(&vol, req.offset, req.length, true, false, req.fua, admit)
                .await
                .map(|h| done(Vec::new(), h)),
            Op::Zero => self
                .zero_admitted(
                    &vol,
                    req.offset,
                    req.length,
                    false,
                    req.no_hole,
                    req.fua,
                    admit,
                )
                .await
                .map(|h| done(Vec::new(), h)),
            Op::Fence => Err(IoError::new(
                EINVAL,
                "a fence request runs at the primary only",
            )),
        }
    }

    /// This process, as the executor of the requests it runs on `volume`.
    pub fn executor(&self, volume: &str) -> Executor {
        self.cluster
            .get()
            .map(|c| Executor {
                node: c.id,
                incarnation: c.incarnation(),
                copy_gen: c.copy_gen(volume),
            })
            .unwrap_or_default()
    }

    /// Sends a request to the volume's primary, routing again (and retrying) while
    /// the primary changes, up to `FORWARD_DEADLINE`; returns the reply and which
    /// process executed it. With `epoch`, only a primary at that epoch may run it (a
    /// connection that followed a role handed over: after a further change it fails,
    /// and its client reconnects).
    pub async fn forward(
        &self,
        req: &ForwardReq,
        payload: &[u8],
        session: Option<&Session>,
        epoch: Option<u64>,
    ) -> Result<Done, IoError> {
        let c = self
            .cluster
            .get()
            .ok_or_else(|| IoError::new(EIO, "not in a cluster"))?
            .clone();
        let t0 = Instant::now();
        let mut last = String::new();
        // Giving up: if an attempt of this connection whose outcome is unknown is not
        // fenced yet, the connection ends (`Session::cut`).
        let give_up = |e: IoError| {
            if let Some(s) = session.filter(|_| req.op.modifies()) {
                if !s.settled() {
                    tracing::warn!(volume = %req.volume, op = ?req.op, offset = req.offset, "a forwarded change failed with its outcome unknown: its client connection ends");
                    s.cut();
                }
            }
            e
        };
        while t0.elapsed() < FORWARD_DEADLINE {
            let route = match self.route_name(&req.volume).await {
                Ok(r) => r,
                Err(e) => return Err(give_up(e)),
            };
            if let Some(e) = epoch {
                if c.effective_primary(&req.volume).map(|p| p.1) != Some(e) {
                    let e = IoError::new(
                        EIO,
                        format!(
                            "the primary of {:?} changed again since this connection's primary handed it over; reconnect",
                            req.volume
                        ),
                    );
                    return Err(give_up(e));
                }
            }
            let addr = match route {
                Route::Local => {
                    let r = match session.filter(|_| req.op.modifies()) {
                        None => self.execute_local(req, payload).await,
                        Some(s) => {
                            // This node became the primary: the session opens here,
                            // and the change runs only while its client's connection is
                            // open, checked under its block locks, as for a connection
                            // served here from the start. A write that waited here on a
                            // primary that died (its call hung until the connection
                            // broke) must not land after what the client wrote since
                            // through another connection (simulator seed 3602: it did,
                            // 600 ms later, over a flushed newer write).
                            if s.is_closed() {
                                return Err(IoError::new(EIO, "the client's connection closed"));
                            }
                            s.open_locally(&c, &req.volume);
                            let open = || !s.is_closed();
                            self.execute_admitted(req, payload, Some(&open)).await
                        }
                    };
                    match r {
                        // The role moved on while it ran here (a lease lapsed): routed
                        // again, as a primary elsewhere answering "not primary" is.
                        Err(e) if e.not_serving => {
                            last = e.message;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        r => return r,
                    }
                }
                Route::Forward(addr) => addr,
            };
            let mut req = req.clone();
            if let Some(s) = session.filter(|_| req.op.modifies()) {
                if s.is_closed() {
                    return Err(IoError::new(EIO, "the client's connection closed"));
                }
                let beyond = self.unsettled_forwards.lock().get(&req.volume).copied();
                let token = match s.usable(beyond) {
                    Some(t) => Some(t),
                    None => match self.fence_at(&c, &addr, &req.volume, true, req.uid).await {
                        Ok(t) => {
                            s.take(t);
                            Some(t)
                        }
                        // A primary of an older version knows no sessions: the write
                        // goes without a token, as it did before.
                        Err((e, _)) if e.contains("unknown variant") => None,
                        // The connection's volume was deleted: no session to open.
                        Err((e, true)) => return Err(IoError::new(EIO, e)),
                        Err((e, false)) => {
                            last = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                req.fence = token;
            }
            let json = serde_json::to_vec(&req).map_err(|e| IoError::new(EIO, e.to_string()))?;
            let body = rpc::pack(&json, payload);
            match c
                .network
                .client(&addr)
                .call(KIND_FORWARD, &body, FORWARD_RPC_TIMEOUT)
                .await
            {
                Ok(reply) => {
                    let parsed = rpc::unpack(&reply).and_then(|(json, data)| {
                        serde_json::from_slice::<ForwardReply>(json)
                            .map(|r| (r, data))
                            .map_err(|e| format!("bad forward reply: {e}"))
                    });
                    let (r, data) = match parsed {
                        Ok(p) => p,
                        Err(e) => {
                            if let Some(s) = session.filter(|_| req.op.modifies()) {
                                s.unsettle(req.fence);
                                self.note_unsettled(&req.volume, req.fence);
                            }
                            return Err(give_up(IoError::new(EIO, e)));
                        }
                    };
                    if r.errno == 0 {
                        let holders = if r.holders.is_empty() {
                            vec![r.executor]
                        } else {
                            r.holders
                        };
                        return Ok(Done {
                            data: data.to_vec(),
                            by: r.executor,
                            holders,
                        });
                    }
                    if r.fenced {
                        // Another client connection opened since this one's token
                        // was issued (or the primary changed): take the current one,
                        // unless this connection's client is gone.
                        let Some(s) = session.filter(|s| !s.is_closed()) else {
                            return Err(IoError::new(EIO, r.message));
                        };
                        match self.fence_at(&c, &addr, &req.volume, false, req.uid).await {
                            // Nothing new: not at once again.
                            Ok(t) => {
                                if !s.take(t) {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                            Err((e, true)) => return Err(IoError::new(EIO, e)),
                            Err((e, false)) => last = e,
                        }
                        continue;
                    }
                    if !r.not_primary {
                        return Err(IoError::new(r.errno, r.message));
                    }
                    last = r.message;
                }
                Err(e) => {
                    if matches!(
                        e,
                        rpc::RpcError::Timeout { .. } | rpc::RpcError::Lost { .. }
                    ) {
                        // The next attempt opens a new session at the primary, which
                        // fences this one: if it arrives there later, it is refused
                        // under its block locks.
                        if let Some(s) = session.filter(|_| req.op.modifies()) {
                            s.unsettle(req.fence);
                            self.note_unsettled(&req.volume, req.fence);
                        }
                    }
                    last = e.to_string()
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(give_up(IoError::new(
            EIO,
            format!("could not reach the primary of {:?}: {last}", req.volume),
        )))
    }
}

impl Engine {
    /// A change of `volume` forwarded from this node with `token` ended with its
    /// outcome unknown (`unsettled_forwards`).
    fn note_unsettled(&self, volume: &str, token: Option<FenceToken>) {
        let Some(new) = token else {
            return;
        };
        let mut m = self.unsettled_forwards.lock();
        let u = m.entry(volume.to_string()).or_insert(new);
        if supersedes(&new, u) {
            *u = new;
        }
    }

    /// Asks the primary at `addr` for a fence token (`open`: a new session) for a
    /// connection to volume `uid` (0: whichever the name is): the primary refuses one
    /// for a connection to a volume since deleted, so a stale connection never fences
    /// the clients of the name's next volume. `Err((why, true))`: refused for good.
    async fn fence_at(
        &self,
        c: &Cluster,
        addr: &str,
        volume: &str,
        open: bool,
        uid: u64,
    ) -> Result<FenceToken, (String, bool)> {
        let req = ForwardReq {
            volume: volume.to_string(),
            op: Op::Fence,
            offset: 0,
            length: open as u64,
            fua: false,
            no_hole: false,
            fence: None,
            uid,
        };
        let again = |e: String| (e, false);
        let json = serde_json::to_vec(&req).map_err(|e| again(e.to_string()))?;
        let reply = c
            .network
            .client(addr)
            .call(KIND_FORWARD, &rpc::pack(&json, &[]), FORWARD_RPC_TIMEOUT)
            .await
            .map_err(|e| again(String::from(e)))?;
        let (json, data) = rpc::unpack(&reply).map_err(again)?;
        let r: ForwardReply =
            serde_json::from_slice(json).map_err(|e| again(format!("bad forward reply: {e}")))?;
        if r.errno != 0 {
            return Err((r.message, !r.not_primary));
        }
        serde_json::from_slice(data).map_err(|e| again(format!("bad fence token: {e}")))
    }
}

impl Engine {
    /// Answers a request forwarded by another node (`KIND_FORWARD`), when this node is
    /// the volume's primary; otherwise says it is not, and the sender routes again.
    pub async fn serve_forward(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let engine = self;
        let c = self.cluster.get().ok_or("this node is not serving yet")?;
        let (json, raw) = rpc::unpack(body)?;
        let req: ForwardReq =
            serde_json::from_slice(json).map_err(|e| format!("bad request: {e}"))?;
        let executor = engine.executor(&req.volume);
        let reply = |r: ForwardReply, data: &[u8]| -> Result<Vec<u8>, String> {
            let json = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
            Ok(rpc::pack(&json, data))
        };
        // Never forward a forwarded request: the sender routes again instead.
        match engine.route_name(&req.volume).await {
            Ok(Route::Local) => {}
            Ok(Route::Forward(_)) | Err(_) => {
                let r = ForwardReply {
                    not_primary: true,
                    ..reply_failed(
                        executor,
                        IoError::new(
                            EIO,
                            format!("n{} is not the primary of {:?}", c.id, req.volume),
                        ),
                    )
                };
                return reply(r, &[]);
            }
        }
        // Never into a clone still being made, nor into another volume under the name
        // the client's connection opened. Uids only grow: a request naming a newer uid
        // than this node knows, or a volume this node still sees being made, comes from
        // a node whose metadata is ahead of this one's, and is sent again (`not_primary`)
        // once this node catches up; one naming an older uid comes from a connection to
        // a volume since deleted, and is refused for good.
        let meta = c.store.meta();
        let current = meta
            .volumes
            .get(&req.volume)
            .map(|v| (v.uid, v.cloning.is_some()));
        let deleted = req.uid != 0 && meta.deleted.contains(&req.uid);
        drop(meta);
        let (refused, early) = match current {
            // Known deleted here: for good, whatever this node knows of the name now
            // (a sender whose metadata lags the deletion stops at once).
            _ if deleted => (
                Some(format!(
                    "volume {:?} was deleted since this connection opened; reconnect",
                    req.volume
                )),
                false,
            ),
            Some((uid, _)) if req.uid != 0 && uid > req.uid => (
                Some(format!(
                    "volume {:?} was deleted since this connection opened (the name is another volume's now); reconnect",
                    req.volume
                )),
                false,
            ),
            Some((uid, _)) if req.uid != 0 && uid < req.uid => (
                Some(format!(
                    "n{} does not know volume {:?} as the connection's node does yet",
                    c.id, req.volume
                )),
                true,
            ),
            Some((_, true)) => (
                Some(format!(
                    "volume {:?} is a clone still being made",
                    req.volume
                )),
                req.uid != 0,
            ),
            None if req.uid != 0 => (
                Some(format!("n{} knows no volume {:?} yet", c.id, req.volume)),
                true,
            ),
            _ => (None, false),
        };
        if let Some(why) = refused {
            tracing::info!(volume = %req.volume, op = ?req.op, early, "forwarded request refused: {why}");
            let r = ForwardReply {
                not_primary: early,
                ..reply_failed(executor, IoError::new(EIO, why))
            };
            return reply(r, &[]);
        }
        if req.op == Op::Fence {
            let t = c.fence_token(&req.volume, req.length == 1);
            let data = serde_json::to_vec(&t).map_err(|e| e.to_string())?;
            return reply(reply_ok(executor, Vec::new()), &data);
        }
        let token = req.fence.filter(|_| req.op.modifies());
        if let Some(t) = token.filter(|t| !c.fence_admits(&req.volume, t)) {
            tracing::info!(volume = %req.volume, op = ?req.op, offset = req.offset, token = ?t, "forwarded write refused: its client connection's session was fenced by a newer one");
            return reply(reply_failed(executor, IoError::fenced()), &[]);
        }
        let volume = req.volume.clone();
        let check = token.map(|t| move || c.fence_admits(&volume, &t));
        let r = match &check {
            Some(f) => engine.execute_admitted(&req, raw, Some(f)).await,
            None => engine.execute_local(&req, raw).await,
        };
        match r {
            Ok(done) => reply(reply_ok(executor, done.holders), &done.data),
            Err(e) => {
                if e.fenced {
                    tracing::info!(volume = %req.volume, op = ?req.op, offset = req.offset, "forwarded write refused under its block locks: its client connection's session was fenced by a newer one");
                }
                // No longer serving as primary (a hand-over, a failover): the sender
                // routes the request again.
                let r = ForwardReply {
                    not_primary: e.not_serving,
                    ..reply_failed(executor, e)
                };
                reply(r, &[])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(fence: u64) -> FenceToken {
        FenceToken {
            incarnation: 7,
            fence,
            epoch: 3,
        }
    }

    /// An attempt of unknown outcome is fenced only by a token issued after it: calls
    /// that return out of order do not put an older token back, a token fetched
    /// without opening a session that is not newer does not count, and until a newer
    /// one is held no change may go out with the current token (found by review:
    /// two requests of one connection losing their attempts side by side).
    #[test]
    fn an_attempt_of_unknown_outcome_is_settled_only_by_a_newer_session() {
        let s = Session::default();
        s.take(t(2));
        assert_eq!(s.usable(None), Some(t(2)));
        assert!(s.settled());
        // An attempt with t2 is lost: t2 may no longer be sent.
        s.unsettle(Some(t(2)));
        assert_eq!(s.usable(None), None);
        assert!(!s.settled());
        // Two new sessions opened side by side; their answers come in any order.
        s.take(t(4));
        s.take(t(3));
        assert_eq!(s.usable(None), Some(t(4)));
        assert!(s.settled());
        // The attempt with t4 is lost too; the current token (fetched again without
        // opening a session) is still t4: not settled.
        s.unsettle(Some(t(4)));
        s.unsettle(Some(t(3)));
        s.take(t(4));
        assert_eq!(s.usable(None), None);
        assert!(!s.settled());
        // A newer session of the same process fences it; the same count at another
        // epoch does not (the epoch in a token can go back), but is taken, so a
        // connection follows the primary's epoch back and forth.
        s.take(t(5));
        assert!(s.settled());
        s.unsettle(Some(t(5)));
        assert!(s.take(FenceToken { epoch: 4, ..t(5) }));
        assert!(!s.settled());
        assert!(s.take(t(5)));
        assert!(!s.settled());
        // A token of another process (the primary now, holding the lease) fences it,
        // whatever its epoch and incarnation say; and is taken.
        let other = FenceToken {
            incarnation: 6,
            fence: 1,
            epoch: 3,
        };
        assert!(s.take(other));
        assert!(s.settled());
        s.unsettle(Some(other));
        assert!(!s.settled());
        let later = FenceToken {
            incarnation: 8,
            fence: 1,
            epoch: 2,
        };
        assert!(s.take(later));
        assert!(s.settled());
        assert_eq!(s.usable(None), Some(later));
        // Another connection's attempt of unknown outcome (`beyond`): the token must
        // supersede it as well.
        assert_eq!(s.usable(Some(FenceToken { fence: 1, ..later })), None);
        assert_eq!(
            s.usable(Some(FenceToken { fence: 0, ..later })),
            Some(later)
        );
        // An attempt without a token (a primary of an older version) is fenced only by
        // a primary that issues tokens.
        s.unsettle(None);
        assert!(!s.settled());
        assert!(s.take(FenceToken { fence: 2, ..later }));
        assert!(s.settled());
    }
}
