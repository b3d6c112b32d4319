//! The node's block locks: a write, a repair of a page and the jeopardy catch-up lock
//! the blocks they touch, so that what reaches the local store, the replicas and the
//! recovery server is in the same order for every block. One table per node, shared by
//! the engine (which creates it) and the cluster (which is handed it at start-up).

use tokio::sync::{Mutex, MutexGuard};

/// Lock stripes: a caller locks the stripes of the blocks it touches, in ascending
/// order (no deadlock). 4096 stripes keep false sharing rare at any queue depth.
const LOCK_STRIPES: usize = 4096;

pub struct Stripes(Vec<Mutex<()>>);

impl Default for Stripes {
    fn default() -> Stripes {
        Stripes((0..LOCK_STRIPES).map(|_| Mutex::new(())).collect())
    }
}

impl Stripes {
    /// Locks blocks `first..=last` (every stripe when the range covers them all).
    pub async fn lock(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = if last - first + 1 >= LOCK_STRIPES as u64 {
            (0..LOCK_STRIPES).collect()
        } else {
            (first..=last)
                .map(|b| (b % LOCK_STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.0[i].lock().await);
        }
        guards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_ranges_exclude_each_other_and_disjoint_ones_do_not() {
        let s = Stripes::default();
        let g = s.lock(10, 12).await;
        // A disjoint range locks at once.
        let other =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.lock(13, 20)).await;
        assert!(other.is_ok());
        drop(other);
        // An overlapping one waits until the first is released.
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.lock(12, 12)).await;
        assert!(blocked.is_err());
        drop(g);
        let now = tokio::time::timeout(std::time::Duration::from_millis(50), s.lock(12, 12)).await;
        assert!(now.is_ok());
        drop(now);
        // A range as wide as the table takes every stripe once (no self-deadlock).
        let all = s.lock(0, 1 << 20).await;
        assert_eq!(all.len(), LOCK_STRIPES);
    }
}
