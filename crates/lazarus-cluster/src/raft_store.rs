//! openraft storage for the cluster metadata, persisted in one redb database per node
//! (`DATA_DIR/raft.redb`): the log, the vote, the committed id, and the applied state
//! machine with its membership. Every method returns only after its redb transaction
//! has committed (redb's default durability fsyncs), which is the contract openraft's
//! storage traits state: the vote and appended entries are on disk before returning.
//!
//! The state machine is small (a few KB per volume), so a snapshot is the whole state
//! as JSON.

// openraft's trait signatures fix the error type (`StorageError`, 224 bytes); boxing it
// in our helpers would only add conversions at every call.
#![allow(clippy::result_large_err)]

use crate::meta::{ClusterMeta, MetaCommand, MetaResponse};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

openraft::declare_raft_types!(
    /// Raft types of the cluster metadata.
    pub TypeConfig:
        D = MetaCommand,
        R = MetaResponse,
        AsyncRuntime = crate::runtime::Runtime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
type SErr = StorageError<NodeId>;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

fn werr(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

fn rerr(e: impl std::fmt::Display) -> SErr {
    StorageIOError::read(AnyError::error(e.to_string())).into()
}

/// The applied state: what the state machine has absorbed, persisted together.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, openraft::BasicNode>,
    pub meta: ClusterMeta,
}

/// redb's storage on a `lazarus_io` file: the simulator's disk on a simulated host
/// (its unsynced writes lost in a crash, like a real disk's). Outside a simulation
/// redb keeps its own file backend.
#[derive(Debug)]
struct SeamBackend(lazarus_io::fs::File);

impl redb::StorageBackend for SeamBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, offset)
    }
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    /// The applied state, readable by the node without going through Raft.
    pub state: Arc<Mutex<Applied>>,
    /// The metadata as last durably applied, shared without copying on every read
    /// (the I/O path looks at it for every request).
    current: Arc<Mutex<Arc<ClusterMeta>>>,
    /// Injected fault (`lazarus fault metadata`): every write fails, as on a device
    /// that refuses writes. Raft then stops and the node exits (`watch_raft`).
    writes_failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, String> {
        let db = if lazarus_io::net::in_simulation() {
            let file = lazarus_io::fs::open_rw(path, true, false)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            Database::builder().create_with_backend(SeamBackend(file))
        } else {
            Database::create(path)
        }
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // A database just created must keep its name through a crash too.
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            lazarus_io::fs::sync_dir(dir)
                .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        }
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            txn.open_table(LOGS).map_err(|e| e.to_string())?;
            txn.open_table(META).map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())?;
        let s = Store {
            db: Arc::new(db),
            state: Arc::new(Mutex::new(Applied::default())),
            current: Arc::default(),
            writes_failed: Arc::default(),
        };
        if let Some(a) = s
            .get_json::<Applied>("applied")
            .map_err(|e| e.to_string())?
        {
            s.publish(&a.meta);
            *s.state.lock().expect("state lock") = a;
        }
        Ok(s)
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, SErr> {
        let txn = self.db.begin_read().map_err(rerr)?;
        let t = txn.open_table(META).map_err(rerr)?;
        match t.get(key).map_err(rerr)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(rerr)?)),
            None => Ok(None),
        }
    }

    /// Fails (or heals) every later write of this store: the fault `lazarus fault
    /// metadata` injects.
    pub fn set_writes_failed(&self, failed: bool) {
        self.writes_failed
            .store(failed, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn writes_failed(&self) -> bool {
        self.writes_failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, SErr> {
        if self.writes_failed() {
            return Err(werr(
                "the metadata store's device refuses writes (injected: lazarus fault metadata)",
            ));
        }
        self.db.begin_write().map_err(werr)
    }

    fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(value).map_err(werr)?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(META).map_err(werr)?;
            t.insert(key, bytes.as_slice()).map_err(werr)?;
        }
        txn.commit().map_err(werr)
    }

    /// The current metadata (as applied on this node).
    pub fn meta(&self) -> Arc<ClusterMeta> {
        self.current.lock().expect("current lock").clone()
    }

    fn publish(&self, meta: &ClusterMeta) {
        *self.current.lock().expect("current lock") = Arc::new(meta.clone());
    }
}

impl RaftLogReader<TypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let txn = self.db.begin_read().map_err(rerr)?;
        let t = txn.open_table(LOGS).map_err(rerr)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(rerr)? {
            let (_, v) = item.map_err(rerr)?;
            out.push(serde_json::from_slice(v.value()).map_err(rerr)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for Store {
    type LogReader = Store;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_json("last_purged")?;
        let txn = self.db.begin_read().map_err(rerr)?;
        let t = txn.open_table(LOGS).map_err(rerr)?;
        let last = match t.last().map_err(rerr)? {
            Some((_, v)) => Some(
                serde_json::from_slice::<Entry<TypeConfig>>(v.value())
                    .map_err(rerr)?
                    .log_id,
            ),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_json("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_json("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put_json("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .get_json::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(LOGS).map_err(werr)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(werr)?;
                t.insert(e.log_id.index, bytes.as_slice()).map_err(werr)?;
            }
        }
        // Committed (and fsynced) before the callback: openraft may count the entries
        // as persisted only then.
        txn.commit().map_err(werr)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(LOGS).map_err(werr)?;
            t.retain(|k, _| k < log_id.index).map_err(werr)?;
        }
        txn.commit().map_err(werr)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.put_json("last_purged", &Some(log_id))?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(LOGS).map_err(werr)?;
            t.retain(|k, _| k > log_id.index).map_err(werr)?;
        }
        txn.commit().map_err(werr)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Store {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let a = self.state.lock().expect("state lock").clone();
        let data = serde_json::to_vec(&a).map_err(werr)?;
        let id = a
            .last_applied
            .map(|l| format!("{}-{}", l.leader_id, l.index))
            .unwrap_or_else(|| "empty".into());
        let meta = SnapshotMeta {
            last_log_id: a.last_applied,
            last_membership: a.membership.clone(),
            snapshot_id: id,
        };
        self.put_json("snapshot", &(meta.clone(), data.clone()))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Store {
    type SnapshotBuilder = Store;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, openraft::BasicNode>,
        ),
        SErr,
    > {
        let a = self.state.lock().expect("state lock");
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let snapshot = {
            let mut a = self.state.lock().expect("state lock");
            for e in entries {
                a.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => responses.push(MetaResponse::Ok),
                    EntryPayload::Normal(cmd) => {
                        let r = a.meta.apply_at(&cmd, e.log_id.index);
                        tracing::info!(command = ?cmd, response = ?r, "metadata change applied");
                        responses.push(r);
                    }
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(e.log_id), m);
                        responses.push(MetaResponse::Ok);
                    }
                }
            }
            a.clone()
        };
        // Persisted before returning: a state change takes effect on this node only
        // once it is both committed and durably applied.
        self.put_json("applied", &snapshot)?;
        self.publish(&snapshot.meta);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let a: Applied = serde_json::from_slice(&data).map_err(rerr)?;
        self.put_json("applied", &a)?;
        self.put_json("snapshot", &(meta.clone(), data))?;
        self.publish(&a.meta);
        *self.state.lock().expect("state lock") = a;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let s: Option<(SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>)> =
            self.get_json("snapshot")?;
        Ok(s.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    //! openraft's own storage conformance suite run against the redb store: the
    //! contract of `RaftLogStorage` and `RaftStateMachine` (STYLE.md, point 9).
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, Store, Store, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, Store, Store), SErr> {
            let dir = tempfile::tempdir().map_err(werr)?;
            let s = Store::open(&dir.path().join("raft.redb")).map_err(werr)?;
            Ok((dir, s.clone(), s))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).expect("storage conformance");
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("raft.redb");
        {
            let s = Store::open(&p).unwrap();
            let mut a = s.state.lock().unwrap();
            a.meta.next_uid = 7;
            let snap = a.clone();
            drop(a);
            s.put_json("applied", &snap).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.meta().next_uid, 7);
    }
}
