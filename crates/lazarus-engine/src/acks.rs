//! Per export: the writes acknowledged and not yet covered by a FLUSH, and whether a
//! FLUSH may vouch for them (the NBD front end keeps one per export; the engine owns them).

use crate::engine::IoError;
use crate::forward::{Executor, Holders};
use std::collections::HashMap;

/// Per export on this node: which processes acknowledged writes that no FLUSH has
/// covered yet, shared by every connection to the export (a FLUSH covers the writes
/// completed on every connection: the export is advertised multi-conn).
///
/// A FLUSH vouches for those writes only when the process that executes it
/// acknowledged every one of them. Through a forwarding node the primary can crash
/// and come back (or be replaced) between a write and the FLUSH, and the unflushed
/// writes it held are gone. That FLUSH answers EIO, as a disk that lost its write
/// cache, and so does every later FLUSH on every connection that was open then (the
/// client reconnects, as it would to a server that crashed); never a success that
/// covers a lost write. A FLUSH that fails for any other reason changes nothing here.
#[derive(Default)]
pub struct Acks(parking_lot::Mutex<AckState>);

#[derive(Default)]
struct AckState {
    /// Logical time: a tick at every acknowledged write and every FLUSH start.
    clock: u64,
    /// Per set of processes holding them (sorted), the times of the earliest and the
    /// latest writes not yet covered.
    pending: HashMap<Holders, (u64, u64)>,
    /// Connections opened at a generation before this one may have lost writes.
    lost_gen: u64,
    gen: u64,
}

impl Acks {
    /// A connection opens: its generation.
    pub fn open(&self) -> u64 {
        self.0.lock().gen
    }

    /// A write was acknowledged; `holders` have it (its primary and the replicas that
    /// applied it).
    pub fn acked(&self, mut holders: Holders) {
        holders.sort_by_key(|e| (e.node, e.incarnation));
        holders.dedup();
        let mut s = self.0.lock();
        s.clock += 1;
        let now = s.clock;
        s.pending
            .entry(holders)
            .and_modify(|p| p.1 = now)
            .or_insert((now, now));
    }

    /// A FLUSH was received: the time that says which writes it covers.
    pub fn flush_start(&self) -> u64 {
        let mut s = self.0.lock();
        s.clock += 1;
        s.clock
    }

    /// A FLUSH that started at `t` on a connection opened at generation `opened`
    /// succeeded on `by` (which made what it holds durable, on itself and on every
    /// copy that takes its updates): whether it vouches for every write it covers,
    /// which it does when `by` holds each of them.
    pub fn flush_done(&self, opened: u64, t: u64, by: Executor) -> Result<(), IoError> {
        let mut s = self.0.lock();
        if opened < s.lost_gen {
            return Err(IoError::new(
                lazarus_nbd::consts::EIO,
                "writes acknowledged before an earlier flush on this export were lost \
                 (the primary restarted or changed); reconnect",
            ));
        }
        let lost: Vec<Holders> = s
            .pending
            .iter()
            .filter(|(h, (first, _))| !h.contains(&by) && *first <= t)
            .map(|(h, _)| h.clone())
            .collect();
        if let Some(h) = lost.first().cloned() {
            for h in &lost {
                s.pending.remove(h);
            }
            s.gen += 1;
            s.lost_gen = s.gen;
            let who: Vec<String> = h
                .iter()
                .map(|e| format!("n{} (process {:x})", e.node, e.incarnation))
                .collect();
            return Err(IoError::new(
                lazarus_nbd::consts::EIO,
                format!(
                    "writes acknowledged before this flush, held by {}, may be lost: \
                     the flush ran on n{} (process {:x}), which never had them \
                     (the primary restarted, or changed to a copy that missed them)",
                    who.join(", "),
                    by.node,
                    by.incarnation
                ),
            ));
        }
        let mut done = Vec::new();
        for (h, p) in s.pending.iter_mut() {
            if h.contains(&by) {
                if p.1 <= t {
                    done.push(h.clone());
                } else {
                    // Some came after the FLUSH started (which, not known exactly:
                    // conservatively, all from then on).
                    p.0 = t + 1;
                }
            }
        }
        for h in done {
            s.pending.remove(&h);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(node: u64, incarnation: u64) -> Executor {
        Executor {
            node,
            incarnation,
            copy_gen: 0,
        }
    }

    /// A FLUSH covers the writes of every connection to the export (multi-conn), vouches
    /// for those its executor holds (the primary, or a replica that applied them and
    /// was promoted), fails on every connection that was open when writes were found
    /// lost, and a FLUSH that failed for another reason forgets nothing.
    #[test]
    fn a_flush_vouches_only_for_its_own_executor() {
        let (p1, p2) = (ex(1, 10), ex(1, 11));
        // A failover to a replica that applied the writes: it vouches for them; one
        // that restarted since (another process) or never had them does not.
        let (r2, r2_restarted, r3) = (ex(2, 20), ex(2, 21), ex(3, 30));
        let a = Acks::default();
        let c = a.open();
        a.acked(vec![p1, r2, r3]);
        a.acked(vec![r2, p1]);
        let t = a.flush_start();
        assert!(a.flush_done(c, t, r2).is_ok());
        assert!(a.0.lock().pending.is_empty());
        a.acked(vec![p1, r2]);
        let t = a.flush_start();
        assert!(a.flush_done(c, t, r2_restarted).is_err());
        let a = Acks::default();
        let c = a.open();
        a.acked(vec![p1, r2]);
        let t = a.flush_start();
        assert!(a.flush_done(c, t, r3).is_err());
        // A holder whose copy was resynced since (from a primary that may have lost
        // the writes) holds them no more.
        let a = Acks::default();
        let c = a.open();
        a.acked(vec![p1, r2]);
        let t = a.flush_start();
        let r2_resynced = Executor { copy_gen: 1, ..r2 };
        assert!(a.flush_done(c, t, r2_resynced).is_err());
        // The same process: fine, and nothing pending after.
        let a = Acks::default();
        let c = a.open();
        a.acked(vec![p1]);
        let t = a.flush_start();
        assert!(a.flush_done(c, t, p1).is_ok());
        assert!(a.0.lock().pending.is_empty());
        // A write on connection A, the FLUSH on connection B, run by the restarted
        // process; a FLUSH that failed in between (the primary down) changes nothing.
        let a = Acks::default();
        let (ca, cb) = (a.open(), a.open());
        a.acked(vec![p1]);
        let _failed = a.flush_start();
        let t1 = a.flush_start();
        let t2 = a.flush_start();
        assert!(a.flush_done(cb, t1, p2).is_err());
        // A FLUSH in flight at the same time, on any old connection, fails too.
        assert!(a.flush_done(ca, t2, p2).is_err());
        let t3 = a.flush_start();
        assert!(
            a.flush_done(cb, t3, p2).is_err(),
            "poisoned until reconnect"
        );
        // A new connection starts clean.
        let cn = a.open();
        a.acked(vec![p2]);
        let t4 = a.flush_start();
        assert!(a.flush_done(cn, t4, p2).is_ok());
        // A write acknowledged after the FLUSH started is not covered by it.
        let a = Acks::default();
        let c = a.open();
        let t = a.flush_start();
        a.acked(vec![p1]);
        assert!(a.flush_done(c, t, p1).is_ok());
        let t = a.flush_start();
        assert!(a.flush_done(c, t, p2).is_err());
        // Writes after a FLUSH started only by the same process: covered later.
        let a = Acks::default();
        let c = a.open();
        a.acked(vec![p1]);
        let t = a.flush_start();
        a.acked(vec![p1]);
        assert!(a.flush_done(c, t, p1).is_ok());
        let t = a.flush_start();
        assert!(a.flush_done(c, t, p1).is_ok());
        assert!(a.0.lock().pending.is_empty());
    }
}
