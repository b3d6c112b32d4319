//! Byte-granular volume I/O on top of the block-granular store: read-modify-write for
//! writes that do not cover whole 4 KiB blocks, serialized per block so overlapping
//! requests in flight together each land whole (as if applied in some order).

use crate::forward::Holders;
use lazarus_nbd::consts::{EINVAL, EIO, ENOSPC};
use lazarus_node::cluster::Role;
use lazarus_store::{ReadError, Store, StoreError, Volume, WriteError};
use lazarus_types::{Lba, BLOCK_SIZE, BLOCK_SIZE_U64};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Debug)]
pub struct IoError {
    pub errno: u32,
    pub message: String,
    /// The damaged slice page that made this read fail, if that is why: a primary
    /// repairs it and reads again.
    pub damaged_page: Option<u64>,
    /// The stored block that failed verification, if that is why.
    pub damaged_block: Option<lazarus_types::BlockId>,
    /// A forwarded write refused, under its block locks, for its client session's
    /// fence token (forward.rs, `FenceToken`): nothing was written.
    pub fenced: bool,
    /// This node may not serve the request as primary (its lease lapsed, before or
    /// during it; another node is primary): a forwarding node routes it again, to the
    /// primary there is then, rather than failing its client (nothing was
    /// acknowledged, and a write applied here is applied again there).
    pub not_serving: bool,
}

/// Whether a write may still run once it holds its block locks (forward.rs,
/// `FenceToken`).
pub type Admit<'a> = Option<&'a (dyn Fn() -> bool + Send + Sync)>;

impl IoError {
    pub fn new(errno: u32, message: impl Into<String>) -> IoError {
        IoError {
            errno,
            message: message.into(),
            damaged_page: None,
            damaged_block: None,
            fenced: false,
            not_serving: false,
        }
    }

    pub(crate) fn not_serving(message: String) -> IoError {
        IoError {
            not_serving: true,
            ..IoError::new(EIO, message)
        }
    }

    pub(crate) fn fenced() -> IoError {
        IoError {
            fenced: true,
            ..IoError::new(
                EIO,
                "a newer client session fenced this connection's writes",
            )
        }
    }
}

impl From<ReadError> for IoError {
    fn from(e: ReadError) -> IoError {
        let page = match &e {
            ReadError::Unrecoverable(lba) => Some(lba.page().0),
            _ => None,
        };
        let block = match &e {
            ReadError::CorruptBlock { block, .. } => Some(*block),
            _ => None,
        };
        IoError {
            damaged_page: page,
            damaged_block: block,
            ..IoError::new(EIO, e.to_string())
        }
    }
}

impl From<WriteError> for IoError {
    fn from(e: WriteError) -> IoError {
        match e {
            WriteError::NoSpace => IoError::new(ENOSPC, "no space left on device"),
            other => IoError::new(EIO, other.to_string()),
        }
    }
}

impl From<StoreError> for IoError {
    fn from(e: StoreError) -> IoError {
        match e {
            StoreError::NoSpace => IoError::new(ENOSPC, "no space left on device"),
            StoreError::Invalid(m) => IoError::new(EINVAL, m),
            other => IoError::new(EIO, other.to_string()),
        }
    }
}

/// Where a request for a volume is executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Local,
    /// At the primary, whose RPC address this is.
    Forward(String),
}

use lazarus_node::cluster::LEASE_WAIT;

pub struct Engine {
    pub store: Arc<Store>,
    /// Set once the node has joined its cluster; absent for a node running alone.
    pub cluster: std::sync::OnceLock<Arc<lazarus_node::cluster::Cluster>>,
    stripes: Arc<lazarus_node::stripes::Stripes>,
    pub repair: crate::repair::RepairState,
    /// Per export: the processes whose acknowledged writes no FLUSH covered yet.
    acks: parking_lot::Mutex<std::collections::HashMap<String, Arc<crate::acks::Acks>>>,
    /// Per volume, the node that last served one of its snapshots to this node (which
    /// holds no copy): asked first next time.
    pub(crate) snapshot_holders: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
    /// `VOLUME@NAME` -> why this copy cannot install that snapshot yet (`snapsync`).
    pub(crate) snapshot_sync_errors: parking_lot::Mutex<std::collections::BTreeMap<String, String>>,
    /// Volumes a revert or clone is resetting (`snapshots::ResetRunning`): their
    /// writes wait, under their own block locks, until it ends.
    pub(crate) resetting: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// `resetting` is not empty (so that writes skip its lock otherwise).
    pub(crate) resets_running: std::sync::atomic::AtomicUsize,
    /// Per volume, the newest token a change forwarded from this node carried whose
    /// outcome is unknown (`forward::Session`): no connection of this node forwards a
    /// change of the volume again with a token that does not supersede it, so a
    /// client's other connections (NBD multi-conn) fence it before their next writes.
    pub(crate) unsettled_forwards:
        parking_lot::Mutex<std::collections::HashMap<String, lazarus_rpc::msg::FenceToken>>,
}

/// A replicated write between its lease check and its answer.
struct UpdateGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for UpdateGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    pub fn new(store: Arc<Store>) -> Engine {
        Engine {
            store,
            cluster: std::sync::OnceLock::new(),
            stripes: Default::default(),
            repair: Default::default(),
            acks: Default::default(),
            snapshot_holders: Default::default(),
            snapshot_sync_errors: Default::default(),
            resetting: Default::default(),
            resets_running: Default::default(),
            unsettled_forwards: Default::default(),
        }
    }

    /// The export's record of unflushed acknowledgements (`acks::Acks`).
    pub fn acks_for(&self, volume: &str) -> Arc<crate::acks::Acks> {
        self.acks
            .lock()
            .entry(volume.to_string())
            .or_default()
            .clone()
    }

    /// Runs a store call that may block (a checkpoint holding writes off, or the
    /// store's own backpressure flush) without stalling a runtime worker.
    fn blocking<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.store.write_may_block() {
            lazarus_rpc::rt::block_in_place(f)
        } else {
            f()
        }
    }

    /// Overwrites leave replaced blocks pending until a durability point; start one in
    /// the background (at most one at a time) when enough have piled up.
    fn after_write(&self) {
        self.store.flush_in_background();
    }

    pub(crate) async fn lock_blocks(
        &self,
        first: u64,
        last: u64,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        self.stripes.lock(first, last).await
    }

    /// A write's block locks, taken while no revert or clone is resetting its volume
    /// (the write then lands after it, on every copy). A write never waits for a
    /// reset while holding block locks: the reset takes every block lock once, to let
    /// the writes already in flight end (`snapshots::ResetRunning`).
    pub(crate) async fn lock_write_blocks(
        &self,
        vol: &Volume,
        first: u64,
        last: u64,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let resetting = || {
            self.resets_running.load(Ordering::Acquire) > 0
                && self.resetting.lock().contains(&vol.meta.name)
        };
        loop {
            while resetting() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let g = self.lock_blocks(first, last).await;
            if !resetting() {
                return g;
            }
            drop(g);
        }
    }

    /// The node's block locks, which its cluster member takes too.
    pub fn stripes(&self) -> Arc<lazarus_node::stripes::Stripes> {
        self.stripes.clone()
    }

    /// Whether updates to `vol` must be replicated; an error when this node may not
    /// execute requests for it (another node is primary, or this primary holds no
    /// lease: it may have been replaced).
    fn replicated(&self, vol: &Volume) -> Result<bool, IoError> {
        let Some(c) = self.cluster.get() else {
            return Ok(false);
        };
        match c.role(&vol.meta.name) {
            Role::Local => Ok(false),
            Role::Primary { epoch } if c.lease_valid(&vol.meta.name, epoch) => Ok(true),
            Role::Primary { .. } => Err(IoError::not_serving(format!(
                "this node's lease on {:?} has lapsed (it may have been replaced as primary)",
                vol.meta.name
            ))),
            Role::Replica { primary, .. } => Err(IoError::not_serving(format!(
                "node n{primary} is the primary of {:?}",
                vol.meta.name
            ))),
        }
    }

    /// `replicated`, but a primary whose lease lapsed for a moment (a late renewal)
    /// waits up to `LEASE_WAIT` for it rather than failing the request.
    pub(crate) async fn serving(&self, vol: &Volume) -> Result<bool, IoError> {
        match self.replicated(vol) {
            Err(e) => match (self.cluster.get(), self.primary_epoch(&vol.meta.name)) {
                (Some(c), Some(epoch))
                    if c.await_lease(&vol.meta.name, epoch, LEASE_WAIT).await =>
                {
                    self.replicated(vol)
                }
                _ => Err(e),
            },
            r => r,
        }
    }

    /// The epoch a replicated change was admitted at (`serving`): it runs only at that
    /// one (`still_primary`).
    fn admitted_epoch(&self, vol: &Volume, replicated: bool) -> Option<u64> {
        replicated
            .then(|| self.primary_epoch(&vol.meta.name))
            .flatten()
    }

    /// Under a change's block locks, before this copy is touched: this node still holds
    /// the role at the epoch the change was admitted at. A change that waited for its
    /// blocks behind another while the role was handed over must not land on this copy
    /// (a replica now, which the new primary may already have compared with its own):
    /// it goes to the new primary instead (`IoError::not_serving`).
    pub(crate) async fn still_primary(
        &self,
        vol: &Volume,
        admitted: Option<u64>,
    ) -> Result<(), IoError> {
        let (Some(c), Some(e)) = (self.cluster.get(), admitted) else {
            return Ok(());
        };
        if self.primary_epoch(&vol.meta.name) == Some(e)
            && c.await_role(&vol.meta.name, e, LEASE_WAIT).await
        {
            return Ok(());
        }
        Err(IoError::not_serving(format!(
            "the primary role of {:?} moved on from epoch {e} while this change waited for its blocks",
            vol.meta.name
        )))
    }

    /// Counts a replicated write to `vol` in flight until dropped
    /// (`Cluster::updates_in_flight`).
    fn update_guard(&self, vol: &Volume) -> Option<UpdateGuard> {
        let n = self.cluster.get()?.updates_in_flight(&vol.meta.name);
        n.fetch_add(1, Ordering::AcqRel);
        Some(UpdateGuard(n))
    }

    /// The epoch under which this node is the volume's primary, if it is.
    pub fn primary_epoch(&self, volume: &str) -> Option<u64> {
        match self.cluster.get()?.role(volume) {
            Role::Primary { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// True when writes to the volume go to other copies too (this node is its primary
    /// and some replica takes updates).
    pub fn replicates(&self, volume: &str) -> bool {
        self.cluster
            .get()
            .is_some_and(|c| c.has_update_targets(volume))
    }

    /// True when requests for `vol` run here now, without waiting or forwarding.
    pub fn serves_locally(&self, vol: &Volume) -> bool {
        self.replicated(vol).is_ok()
    }

    /// Where requests for the volume go: here (a primary waits up to `LEASE_WAIT` for
    /// its lease) or to the primary.
    pub async fn route_name(&self, volume: &str) -> Result<Route, IoError> {
        let Some(c) = self.cluster.get() else {
            return Ok(Route::Local);
        };
        let deadline = tokio::time::Instant::now() + c.lease_wait(volume, LEASE_WAIT);
        loop {
            match c.role(volume) {
                Role::Local => return Ok(Route::Local),
                Role::Primary { epoch } if c.lease_valid(volume, epoch) => return Ok(Route::Local),
                Role::Primary { .. } => {}
                Role::Replica { addr, .. } => return Ok(Route::Forward(addr)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IoError::new(
                    EIO,
                    if c.hold_only(volume) {
                        format!("this node is the primary of {volume:?} in jeopardy but holds it at no recovery server (unreachable?)")
                    } else {
                        format!("this node is the primary of {volume:?} but holds no lease from the cluster leader (no quorum?)")
                    },
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn replicate(
        &self,
        vol: &Volume,
        u: lazarus_node::cluster::Update,
        raw: &[u8],
        ids: Option<&[lazarus_types::BlockId]>,
        on_rs: bool,
    ) -> Result<Holders, IoError> {
        let c = self
            .cluster
            .get()
            .expect("replicated volumes exist only in a cluster");
        let epoch = match c.role(&vol.meta.name) {
            Role::Primary { epoch } => Some(epoch),
            _ => None,
        };
        let data = !matches!(u, lazarus_node::cluster::Update::Flush);
        let holders = match c.replicate(&vol.meta.name, u, raw, ids, on_rs).await {
            Ok(h) => h,
            Err(m) => {
                // Applied here, perhaps not on every replica: compare them again.
                if data {
                    c.reconcile_again(&vol.meta.name);
                }
                // Refused because the role moved on (the replicas learnt of a hand-over
                // first): not this node's to answer, the request goes to the new
                // primary (`IoError::not_serving`).
                // The role, not the whole lease: the failure may have started a
                // comparison of the copies, which waits for this update to end.
                if let Some(e) = epoch {
                    if !c.await_role(&vol.meta.name, e, LEASE_WAIT).await {
                        return Err(IoError::not_serving(format!(
                            "replication failed ({m}) and this node's lease on {:?} lapsed (it may have been replaced as primary)",
                            vol.meta.name
                        )));
                    }
                }
                return Err(IoError::new(EIO, format!("replication failed: {m}")));
            }
        };
        // As for reads: the lease must still hold once every copy has the update. A
        // primary paused in the middle of it may have been replaced meanwhile, and its
        // successor need not have this write: the client gets an error, not an ack.
        // The role is what counts (a comparison of the copies that another write's
        // failure started waits for this one to end).
        if let Some(e) = epoch {
            if !c.await_role(&vol.meta.name, e, LEASE_WAIT).await {
                return Err(IoError::not_serving(format!(
                    "this node's lease on {:?} lapsed during the write (it may have been replaced as primary)",
                    vol.meta.name
                )));
            }
        }
        Ok(holders)
    }

    /// In jeopardy: makes the update durable on the recovery server before it is
    /// written locally. Returns whether it is there.
    async fn log_first(
        &self,
        vol: &Volume,
        u: &lazarus_node::cluster::Update,
        raw: &[u8],
    ) -> Result<bool, IoError> {
        let c = self
            .cluster
            .get()
            .expect("replicated volumes exist only in a cluster");
        let Some(v) = c.effective(&vol.meta.name) else {
            return Ok(false);
        };
        if !lazarus_node::decide::writes_through(&v) || c.recovery.is_none() {
            return Ok(false);
        }
        let err = |m: String| IoError::new(EIO, format!("jeopardy: {m}"));
        let jerr = |e: lazarus_node::jeopardy::JeopardyError| err(e.to_string());
        let v = if v.recovery_flag {
            Box::pin(c.ensure_drained(&v)).await.map_err(jerr)?;
            v
        } else {
            // Under the policy: `accept` goes on without an unreachable recovery
            // server (the write is counted as lag), `suspend` waits for it.
            match Box::pin(c.enter_jeopardy_patiently(&vol.meta.name, v.live(), u, raw))
                .await
                .map_err(err)?
            {
                Some(v) => v,
                None => return Ok(false),
            }
        };
        let stored = Box::pin(c.log_update(&v, u, raw)).await.map_err(jerr)?;
        if stored {
            lazarus_observe::metrics::METRICS
                .recovery_appends
                .get_or_create(&lazarus_observe::metrics::vol(&vol.meta.name))
                .inc();
        }
        Ok(stored)
    }

    /// Reads `len` bytes at `offset` into `out` (whose length is `len`).
    pub fn read_into(&self, vol: &Volume, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        let len = out.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let replicated = self.replicated(vol)?;
        let first = offset / BLOCK_SIZE_U64;
        let last = (offset + len - 1) / BLOCK_SIZE_U64;
        let head = (offset % BLOCK_SIZE_U64) as usize;
        if head == 0 && len.is_multiple_of(BLOCK_SIZE_U64) {
            self.store.read_blocks(vol, Lba(first), out)?;
        } else {
            let mut tmp = vec![0u8; ((last - first + 1) as usize) * BLOCK_SIZE];
            self.store.read_blocks(vol, Lba(first), &mut tmp)?;
            out.copy_from_slice(&tmp[head..head + len as usize]);
        }
        if replicated {
            // The lease must still hold once the data is read: if this process was
            // paused in between, another primary may have taken writes meanwhile.
            self.replicated(vol)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; returns the processes that hold the write (this one
    /// and the replicas that applied it: nbd_server.rs, `Acks`).
    pub async fn write(
        &self,
        vol: &Volume,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<Holders, IoError> {
        self.write_admitted(vol, offset, data, fua, None).await
    }

    /// `write`, refused (`IoError::fenced`) if `admit` says no once the block locks
    /// are held.
    pub async fn write_admitted(
        &self,
        vol: &Volume,
        offset: u64,
        data: &[u8],
        fua: bool,
        admit: Admit<'_>,
    ) -> Result<Holders, IoError> {
        let len = data.len() as u64;
        let replicated = self.serving(vol).await?;
        let admitted = self.admitted_epoch(vol, replicated);
        let _in_flight = replicated.then(|| self.update_guard(vol));
        let mut holders = vec![self.executor(&vol.meta.name)];
        if len > 0 {
            let first = offset / BLOCK_SIZE_U64;
            let last = (offset + len - 1) / BLOCK_SIZE_U64;
            let _g = self.lock_write_blocks(vol, first, last).await;
            if admit.is_some_and(|a| !a()) {
                return Err(IoError::fenced());
            }
            self.still_primary(vol, admitted).await?;
            let head = (offset % BLOCK_SIZE_U64) as usize;
            let write = |u| lazarus_node::cluster::Update::Write {
                volume: vol.meta.name.clone(),
                epoch: 0,
                lba: u,
            };
            if head == 0 && len.is_multiple_of(BLOCK_SIZE_U64) {
                let on_rs = replicated && self.log_first(vol, &write(first), data).await?;
                // Hashed once: the replicas that take them store under these ids.
                let ids = lazarus_store::store::block_ids(data);
                self.blocking(|| {
                    self.store
                        .write_blocks_with_ids(vol, Lba(first), data, &ids)
                })?;
                if replicated {
                    // Still under the stripe locks: replicas see updates to a block
                    // in the order the primary applied them.
                    holders.extend(
                        self.replicate(vol, write(first), data, Some(&ids), on_rs)
                            .await?,
                    );
                }
            } else {
                // Read-modify-write of the partial blocks at either end only.
                let nblocks = (last - first + 1) as usize;
                let mut buf = vec![0u8; nblocks * BLOCK_SIZE];
                let tail_partial = !(offset + len).is_multiple_of(BLOCK_SIZE_U64);
                if head != 0 || (nblocks == 1 && tail_partial) {
                    self.store
                        .read_blocks(vol, Lba(first), &mut buf[..BLOCK_SIZE])?;
                }
                if tail_partial && (nblocks > 1) {
                    let s = (nblocks - 1) * BLOCK_SIZE;
                    self.store.read_blocks(vol, Lba(last), &mut buf[s..])?;
                }
                buf[head..head + len as usize].copy_from_slice(data);
                let on_rs = replicated && self.log_first(vol, &write(first), &buf).await?;
                let ids = lazarus_store::store::block_ids(&buf);
                self.blocking(|| {
                    self.store
                        .write_blocks_with_ids(vol, Lba(first), &buf, &ids)
                })?;
                if replicated {
                    holders.extend(
                        self.replicate(vol, write(first), &buf, Some(&ids), on_rs)
                            .await?,
                    );
                }
            }
            self.after_write();
        }
        if fua {
            Box::pin(self.flush(vol)).await?;
        }
        Ok(holders)
    }

    /// WRITE_ZEROES (`trim == false`) and TRIM. Whole blocks are unmapped (or, with
    /// `provision`, mapped to a stored zero block); partial blocks at the ends are
    /// zeroed by read-modify-write for WRITE_ZEROES and left alone for TRIM (which
    /// promises nothing about contents).
    pub async fn zero(
        &self,
        vol: &Volume,
        offset: u64,
        len: u64,
        trim: bool,
        provision: bool,
        fua: bool,
    ) -> Result<Holders, IoError> {
        self.zero_admitted(vol, offset, len, trim, provision, fua, None)
            .await
    }

    /// `zero`, refused (`IoError::fenced`) if `admit` says no once the block locks
    /// are held.
    #[allow(clippy::too_many_arguments)]
    pub async fn zero_admitted(
        &self,
        vol: &Volume,
        offset: u64,
        len: u64,
        trim: bool,
        provision: bool,
        fua: bool,
        admit: Admit<'_>,
    ) -> Result<Holders, IoError> {
        let replicated = self.serving(vol).await?;
        let admitted = self.admitted_epoch(vol, replicated);
        let _in_flight = replicated.then(|| self.update_guard(vol));
        // Held by every process that holds each of its parts.
        let mut holders = vec![self.executor(&vol.meta.name)];
        let keep = |h: Holders, holders: &mut Holders| holders.retain(|x| h.contains(x));
        if len > 0 {
            let end = offset + len;
            let first_full = offset.div_ceil(BLOCK_SIZE_U64);
            let end_full = end / BLOCK_SIZE_U64;
            if !trim {
                let head_end = (first_full * BLOCK_SIZE_U64).min(end);
                if head_end > offset {
                    let h = self
                        .write_admitted(
                            vol,
                            offset,
                            &vec![0u8; (head_end - offset) as usize],
                            false,
                            admit,
                        )
                        .await?;
                    keep(h, &mut holders);
                }
                let tail_start = (end_full * BLOCK_SIZE_U64).max(head_end);
                if end > tail_start {
                    let h = self
                        .write_admitted(
                            vol,
                            tail_start,
                            &vec![0u8; (end - tail_start) as usize],
                            false,
                            admit,
                        )
                        .await?;
                    keep(h, &mut holders);
                }
            }
            if end_full > first_full {
                let _g = self.lock_write_blocks(vol, first_full, end_full - 1).await;
                if admit.is_some_and(|a| !a()) {
                    return Err(IoError::fenced());
                }
                self.still_primary(vol, admitted).await?;
                let u = lazarus_node::cluster::Update::Zero {
                    volume: vol.meta.name.clone(),
                    epoch: 0,
                    lba: first_full,
                    count: end_full - first_full,
                    provision: provision && !trim,
                };
                let on_rs = replicated && self.log_first(vol, &u, &[]).await?;
                self.blocking(|| {
                    self.store.write_zeroes(
                        vol,
                        Lba(first_full),
                        end_full - first_full,
                        provision && !trim,
                    )
                })?;
                if replicated {
                    let mut h = self.replicate(vol, u, &[], None, on_rs).await?;
                    h.push(self.executor(&vol.meta.name));
                    keep(h, &mut holders);
                }
                self.after_write();
            }
        }
        if fua {
            Box::pin(self.flush(vol)).await?;
        }
        Ok(holders)
    }

    /// FLUSH: durable on this node and, for a cluster volume, on every copy that takes
    /// updates.
    pub async fn flush(&self, vol: &Volume) -> Result<(), IoError> {
        if self.serving(vol).await? {
            let (local, remote) = tokio::join!(
                self.flush_local(),
                self.replicate(vol, lazarus_node::cluster::Update::Flush, &[], None, false)
            );
            local?;
            return remote.map(|_| ());
        }
        self.flush_local().await
    }

    async fn flush_local(&self) -> Result<(), IoError> {
        let store = self.store.clone();
        lazarus_rpc::rt::blocking(move || store.flush())
            .await
            .map_err(|e| IoError::new(EIO, format!("flush task failed: {e}")))??;
        Ok(())
    }
}
