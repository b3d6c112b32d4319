//! A volume's slice pages in memory: a cache, not the whole volume.
//!
//! Every page that is not on disk as it is in memory stays resident: changed since the
//! last checkpoint (`dirty`, `stale`), imaged by the checkpoint under way and not yet
//! written in place (`imaged`), damaged, or a clone's page still its base snapshot's
//! (a hole on this volume's disk). The others are *clean*: the slice file holds them
//! as memory does, and their level-1 checksum is recorded. A clean page may be
//! *evicted* when the store's pages in memory pass its budget (`CacheBudget`): it
//! leaves memory and is read back from the slice file, and verified against its
//! recorded checksum, when next needed (`Volume::ensure`). A page that no longer
//! verifies then is damaged, as one found so at start-up is (every slot unknown,
//! repaired from the other copies).
//!
//! Eviction is second-chance FIFO: each resident page has a used bit set by every
//! access; the clock passes over used and pinned pages (clearing the bit) and evicts
//! the first clean, unused one.
//!
//! What `get` answers for a page is only ever its content: an evicted page is not
//! "absent" (which means all zeroes), so `get` of one is a bug and panics rather than
//! read as zeroes; callers `ensure` the page first.

use crate::volume::Page;
use lazarus_types::FANOUT;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Pages in memory across a store's volumes, and how many may be clean ones.
#[derive(Debug)]
pub struct CacheBudget {
    /// Resident pages past which clean ones are evicted.
    pub limit: u64,
    resident: AtomicU64,
    /// Pages read back from disk, and pages evicted, since the store opened.
    loads: AtomicU64,
    evictions: AtomicU64,
}

/// What `Store::page_cache_stats` reports.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    pub resident_pages: u64,
    pub limit_pages: u64,
    pub loads: u64,
    pub evictions: u64,
}

impl CacheBudget {
    pub fn new(limit: u64) -> CacheBudget {
        CacheBudget {
            limit,
            resident: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            resident_pages: self.resident(),
            limit_pages: self.limit,
            loads: self.loads.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_load(&self) {
        self.loads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    pub fn over(&self) -> bool {
        self.resident() > self.limit
    }

    fn add(&self, n: u64) {
        self.resident.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: u64) {
        let _ = self
            .resident
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(n))
            });
    }
}

#[derive(Debug)]
struct Resident {
    page: Page,
    used: Cell<bool>,
}

#[derive(Debug, Default)]
pub(crate) struct PageCache {
    map: HashMap<u64, Resident>,
    /// Evicted pages, each with how many of its slots map a block (for usage figures
    /// without reading it back).
    evicted: HashMap<u64, u16>,
    /// Resident pages in the order they came in (entries of pages no longer resident
    /// are skipped when they come up).
    clock: VecDeque<u64>,
    budget: Option<Arc<CacheBudget>>,
    /// Pages read back since the last `trim`.
    pub(crate) loaded: usize,
}

impl Drop for PageCache {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.sub(self.map.len() as u64);
        }
    }
}

impl PageCache {
    /// Resident `pages`, and `evicted` ones (each with how many slots it maps).
    pub(crate) fn from_map(pages: HashMap<u64, Page>, evicted: HashMap<u64, u16>) -> PageCache {
        let clock = pages.keys().copied().collect();
        PageCache {
            map: pages
                .into_iter()
                .map(|(p, page)| {
                    (
                        p,
                        Resident {
                            page,
                            used: Cell::new(false),
                        },
                    )
                })
                .collect(),
            evicted,
            clock,
            budget: None,
            loaded: 0,
        }
    }

    /// Counts this volume's resident pages against `budget` from now on.
    pub(crate) fn attach(&mut self, budget: Arc<CacheBudget>) {
        if let Some(old) = self.budget.take() {
            old.sub(self.map.len() as u64);
        }
        budget.add(self.map.len() as u64);
        self.budget = Some(budget);
    }

    pub(crate) fn budget(&self) -> Option<&Arc<CacheBudget>> {
        self.budget.as_ref()
    }

    /// Page `p`'s content if it maps anything (`None`: all zeroes). Panics if the
    /// page is evicted: the caller must `ensure` it first.
    pub(crate) fn get(&self, p: &u64) -> Option<&Page> {
        match self.map.get(p) {
            Some(r) => {
                r.used.set(true);
                Some(&r.page)
            }
            None => {
                assert!(
                    !self.is_evicted(*p),
                    "slice page {p} read while evicted (not ensured)"
                );
                None
            }
        }
    }

    pub(crate) fn get_mut(&mut self, p: &u64) -> Option<&mut Page> {
        match self.map.get_mut(p) {
            Some(r) => {
                r.used.set(true);
                Some(&mut r.page)
            }
            None => {
                assert!(
                    self.evicted.is_empty() || !self.evicted.contains_key(p),
                    "slice page {p} changed while evicted (not ensured)"
                );
                None
            }
        }
    }

    /// Page `p` is resident with `page` (whatever it was: evicted or absent).
    pub(crate) fn insert(&mut self, p: u64, page: Page) {
        self.evicted.remove(&p);
        let fresh = Resident {
            page,
            used: Cell::new(true),
        };
        if self.map.insert(p, fresh).is_none() {
            self.clock.push_back(p);
            if let Some(b) = &self.budget {
                b.add(1);
            }
            self.compact_clock();
        }
    }

    /// Page `p` holds nothing (all zeroes), whatever it was.
    pub(crate) fn remove(&mut self, p: &u64) -> Option<Page> {
        self.evicted.remove(p);
        let r = self.map.remove(p)?;
        if let Some(b) = &self.budget {
            b.sub(1);
        }
        Some(r.page)
    }

    pub(crate) fn is_resident(&self, p: u64) -> bool {
        self.map.contains_key(&p)
    }

    pub(crate) fn is_evicted(&self, p: u64) -> bool {
        !self.evicted.is_empty() && self.evicted.contains_key(&p)
    }

    pub(crate) fn any_evicted(&self) -> bool {
        !self.evicted.is_empty()
    }

    /// Evicted pages, unordered.
    pub(crate) fn evicted_pages(&self) -> Vec<u64> {
        self.evicted.keys().copied().collect()
    }

    /// Pages that map something: resident ones (a resident page may hold only zeroes
    /// until the next checkpoint drops it) and evicted ones.
    pub(crate) fn mapped_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.keys().chain(self.evicted.keys()).copied()
    }

    /// Resident pages only.
    pub(crate) fn resident_keys(&self) -> impl Iterator<Item = &u64> {
        self.map.keys()
    }

    /// (mapped blocks, pages mapping any), resident and evicted.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let resident: u64 = self
            .map
            .values()
            .map(|r| r.page.iter().filter(|id| !id.is_zero()).count() as u64)
            .sum();
        let evicted: u64 = self.evicted.values().map(|n| u64::from(*n)).sum();
        (
            resident + evicted,
            (self.map.len() + self.evicted.len()) as u64,
        )
    }

    /// Resident pages with their content (for scans that need no evicted page).
    pub(crate) fn resident(&self) -> impl Iterator<Item = (&u64, &Page)> {
        self.map.iter().map(|(p, r)| (p, &r.page))
    }

    /// Evicts clean pages (`pinned` says which may not go) until the budget is met,
    /// looking at no more than `max_work` entries of the clock. Returns how many went.
    pub(crate) fn trim(&mut self, pinned: impl Fn(u64) -> bool, max_work: usize) -> usize {
        let Some(budget) = self.budget.clone() else {
            return 0;
        };
        self.loaded = 0;
        // Two rounds of the clock at most: the first may only clear used bits.
        let max_work = max_work.min(2 * self.clock.len());
        let mut gone = 0;
        let mut work = 0;
        while budget.over() && work < max_work {
            let Some(p) = self.clock.pop_front() else {
                break;
            };
            work += 1;
            let Some(r) = self.map.get(&p) else {
                continue; // no longer resident
            };
            if pinned(p) || r.used.replace(false) {
                self.clock.push_back(p);
                continue;
            }
            let r = self.map.remove(&p).expect("resident");
            let mapped = r.page.iter().filter(|id| !id.is_zero()).count();
            if mapped == 0 {
                // All zeroes: nothing to read back.
                budget.sub(1);
                continue;
            }
            debug_assert!(mapped <= FANOUT);
            self.evicted.insert(p, mapped as u16);
            budget.sub(1);
            budget.evictions.fetch_add(1, Ordering::Relaxed);
            gone += 1;
        }
        gone
    }

    /// Keeps the clock from growing past the resident pages by much (entries of pages
    /// removed and inserted again).
    fn compact_clock(&mut self) {
        if self.clock.len() > 2 * self.map.len() + 64 {
            let mut seen = std::collections::HashSet::new();
            let map = &self.map;
            self.clock
                .retain(|p| map.contains_key(p) && seen.insert(*p));
        }
    }
}
