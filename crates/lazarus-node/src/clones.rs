//! Clones being filled (`lazarus volume clone`). A clone is created in the metadata
//! as *cloning* (`VolumeInfo::cloning`): no node serves it, and `volume list` shows it
//! as such. The node that asked for it resets each copy to the snapshot and then
//! commits `CloneDone { filled: true }`; from then on it is a volume like any other.
//! If that node's process goes (a crash, a kill -9, a restart), the node is marked
//! out, or it answers the leader's pings no more for `MAKER_SILENT` before that, the
//! fill is given up: the clone is removed (`filled: false`), so a cut-off clone is
//! never served half made, and the same clone can be asked for again. (A maker only
//! cut off, still filling, then fails to commit its end, reports the clone failed and
//! removes its copies: a give-up costs a clone asked for again, never data.) `CloneDone` acts only on that clone (its uid) while it is still being filled,
//! so a give-up that comes late never removes a finished clone.

use crate::cluster::Cluster;
use lazarus_cluster::MetaCommand;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// How often each node looks for clones left without their filler.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long the leader waits for a clone's maker that stopped answering before it
/// gives the clone up: far past a failover, so the maker is down or cut off.
pub const MAKER_SILENT: Duration = Duration::from_secs(15);

/// The clones this process is filling, by name.
#[derive(Default)]
pub struct Filling(parking_lot::Mutex<HashSet<String>>);

/// Held while this process fills a clone: dropped (the fill done, failed or its
/// future dropped), the clone is this process's no more.
pub struct FillGuard {
    cluster: Arc<Cluster>,
    name: String,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.cluster.filling.0.lock().remove(&self.name);
    }
}

impl Cluster {
    /// Marks clone `name` as being filled by this process, before its creation is
    /// proposed (so it is never taken for an abandoned one); `None` if it already is.
    pub fn filling_clone(self: &Arc<Self>, name: &str) -> Option<FillGuard> {
        self.filling
            .0
            .lock()
            .insert(name.to_string())
            .then(|| FillGuard {
                cluster: self.clone(),
                name: name.to_string(),
            })
    }

    /// Every node, once a second: gives up the clones it was filling in an earlier
    /// process (it restarted since) and, on the leader, those of nodes that are out,
    /// removed or forgotten, or silent for `MAKER_SILENT`.
    pub fn watch_clones(self: &Arc<Self>) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut leading_since: Option<tokio::time::Instant> = None;
            loop {
                tokio::time::sleep(CHECK_INTERVAL).await;
                if c.is_isolated() || !c.is_ready() {
                    leading_since = None;
                    continue;
                }
                let leader = c.raft.metrics().borrow().current_leader == Some(c.id);
                // Silence counts from when this node began to watch as leader.
                let since = if leader {
                    *leading_since.get_or_insert_with(tokio::time::Instant::now)
                } else {
                    leading_since = None;
                    tokio::time::Instant::now()
                };
                let meta = c.store.meta();
                let abandoned: Vec<(String, u64)> = meta
                    .volumes
                    .values()
                    .filter(|v| {
                        let Some(f) = &v.cloning else { return false };
                        if f.by == c.id {
                            !c.filling.0.lock().contains(&v.name)
                        } else {
                            leader
                                && (meta.out.contains(&f.by)
                                    || meta.removed.contains(&f.by)
                                    || !meta.nodes.contains_key(&f.by)
                                    || c.seen.silent_for(f.by, since) >= MAKER_SILENT)
                        }
                    })
                    .map(|v| (v.name.clone(), v.uid))
                    .collect();
                for (name, uid) in abandoned {
                    let r = c
                        .propose(MetaCommand::CloneDone {
                            name: name.clone(),
                            uid,
                            filled: false,
                        })
                        .await;
                    match r {
                        Ok(lazarus_cluster::MetaResponse::Ok) => {
                            tracing::warn!(volume = %name, uid, "clone left unfilled (its maker restarted, is out or stopped answering): removed");
                            lazarus_observe::events::record(
                                "clone",
                                &name,
                                format!("clone {name} was cut off before it was filled: removed (ask for it again)"),
                            );
                        }
                        Ok(other) => {
                            tracing::debug!(volume = %name, ?other, "clone give-up not applied")
                        }
                        Err(e) => {
                            tracing::info!(volume = %name, error = %e, "clone give-up not committed yet")
                        }
                    }
                }
            }
        });
    }
}
