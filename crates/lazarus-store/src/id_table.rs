//! The block store's `BlockId -> slot` lookup in 5 bytes an entry: an open-addressing
//! hash table (linear probing) of slot numbers, keyed by the id *stored in the slot*.
//!
//! Ids are BLAKE3 outputs, uniformly random, so their first 8 bytes address the table
//! directly (no hashing). The table holds no ids of its own: an entry is a slot number
//! (4 bytes) and one more byte of the id (its ninth, a tag), and a probe whose tag
//! matches compares the id the caller's slot array (`slots`, the in-memory image of
//! `blocks.idx`) names for it; the tag spares that random read for 255 in 256 of the
//! other entries a probe passes. With the load between 3/8 and 3/4 that is 7 to 13
//! bytes per stored block, where a `HashMap<BlockId, (slot, count)>` took 40 to 80.
//!
//! Invariant the callers keep: an entry `s` is in the table only while `slots[s]` holds
//! the id it was inserted for. So `remove` must come before the slot's id changes, and
//! `insert` after.

use lazarus_types::BlockId;

/// Slots the table can name: entries are `slot + 1` in a `u32`, 0 meaning empty.
pub const MAX_SLOTS: u64 = u32::MAX as u64 - 1;

#[derive(Debug, Default)]
pub struct IdTable {
    /// `slot + 1`, or 0 for an empty entry; the length is 0 or a power of two.
    entries: Vec<u32>,
    /// Each entry's tag (`tag`), for the same index.
    tags: Vec<u8>,
    len: usize,
}

fn tag(id: &BlockId) -> u8 {
    id.0[8]
}

fn home(id: &BlockId, mask: usize) -> usize {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    (u64::from_le_bytes(b) as usize) & mask
}

impl IdTable {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes the table takes (for the store's memory figures).
    pub fn bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<u32>() + self.tags.capacity()
    }

    /// The slot holding `id`, if the table has it.
    pub fn get(&self, id: &BlockId, slots: &[BlockId]) -> Option<u64> {
        self.position(id, slots)
            .map(|i| u64::from(self.entries[i] - 1))
    }

    pub fn contains(&self, id: &BlockId, slots: &[BlockId]) -> bool {
        self.position(id, slots).is_some()
    }

    fn position(&self, id: &BlockId, slots: &[BlockId]) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.entries.len() - 1;
        let mut i = home(id, mask);
        let t = tag(id);
        loop {
            let e = self.entries[i];
            if e == 0 {
                return None;
            }
            if self.tags[i] == t && slots[(e - 1) as usize] == *id {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Maps `slots[slot]` (which must already hold the id) to `slot`; an entry of the
    /// same id for another slot is replaced, and that slot returned.
    pub fn insert(&mut self, slot: u64, slots: &[BlockId]) -> Option<u64> {
        assert!(slot < MAX_SLOTS, "slot {slot} beyond the index's range");
        let id = slots[slot as usize];
        debug_assert!(!id.is_zero());
        if let Some(i) = self.position(&id, slots) {
            let old = u64::from(self.entries[i] - 1);
            self.entries[i] = slot as u32 + 1;
            return Some(old);
        }
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.grow(slots);
        }
        self.place(slot as u32 + 1, &id);
        self.len += 1;
        None
    }

    fn place(&mut self, entry: u32, id: &BlockId) {
        let mask = self.entries.len() - 1;
        let mut i = home(id, mask);
        while self.entries[i] != 0 {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
        self.tags[i] = tag(id);
    }

    fn grow(&mut self, slots: &[BlockId]) {
        let cap = (self.entries.len() * 2).max(64);
        let old = std::mem::replace(&mut self.entries, vec![0; cap]);
        self.tags = vec![0; cap];
        for e in old.into_iter().filter(|e| *e != 0) {
            let id = slots[(e - 1) as usize];
            self.place(e, &id);
        }
    }

    /// Removes `id` (its slot must still hold it); returns the slot it had.
    pub fn remove(&mut self, id: &BlockId, slots: &[BlockId]) -> Option<u64> {
        let mut hole = self.position(id, slots)?;
        let slot = u64::from(self.entries[hole] - 1);
        // Backward-shift deletion: move up every later entry of the run that may sit
        // in the hole (its home is not cyclically within (hole, j]).
        let mask = self.entries.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e == 0 {
                break;
            }
            let k = home(&slots[(e - 1) as usize], mask);
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if !stays {
                self.entries[hole] = e;
                self.tags[hole] = self.tags[j];
                hole = j;
            }
        }
        self.entries[hole] = 0;
        self.len -= 1;
        Some(slot)
    }

    /// Every slot in the table, in table order.
    #[cfg(test)]
    pub fn slots(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .filter(|e| **e != 0)
            .map(|e| u64::from(*e - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn id(rng: &mut fastrand::Rng, clustered: bool) -> BlockId {
        let mut b = [0u8; 16];
        for x in b.iter_mut() {
            *x = rng.u8(..);
        }
        if clustered {
            // Few distinct homes: long runs that wrap, the hard case for deletion; and
            // one tag, so that only the ids tell entries apart.
            b[..8].copy_from_slice(&(u64::MAX - 20).wrapping_add(rng.u64(..6) * 7).to_le_bytes());
            b[8] = 7;
        }
        if b == [0; 16] {
            b[0] = 1;
        }
        BlockId(b)
    }

    /// Random inserts, replacements and removals against a HashMap: every lookup
    /// agrees, for uniform ids and for ids crowded onto a few homes near the end of
    /// the table (runs that wrap around).
    #[test]
    fn agrees_with_a_hash_map() {
        for (seed, clustered) in [(1u64, false), (2, true), (3, false), (4, true)] {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut slots: Vec<BlockId> = vec![BlockId::ZERO; 3000];
            let mut table = IdTable::default();
            let mut model: HashMap<BlockId, u64> = HashMap::new();
            let mut known: Vec<BlockId> = Vec::new();
            for step in 0..20_000 {
                match rng.u32(..10) {
                    0..=4 => {
                        let s = rng.usize(..slots.len());
                        if !slots[s].is_zero() {
                            continue;
                        }
                        // Sometimes a second slot for an id already held.
                        let i = if !known.is_empty() && rng.u32(..8) == 0 {
                            known[rng.usize(..known.len())]
                        } else {
                            id(&mut rng, clustered)
                        };
                        slots[s] = i;
                        let old = table.insert(s as u64, &slots);
                        assert_eq!(old, model.insert(i, s as u64), "step {step}");
                        if let Some(o) = old {
                            slots[o as usize] = BlockId::ZERO;
                        }
                        known.push(i);
                    }
                    5..=7 => {
                        if known.is_empty() {
                            continue;
                        }
                        let i = known.swap_remove(rng.usize(..known.len()));
                        let got = table.remove(&i, &slots);
                        assert_eq!(got, model.remove(&i), "step {step}");
                        if let Some(s) = got {
                            slots[s as usize] = BlockId::ZERO;
                        }
                    }
                    _ => {
                        let i = if !known.is_empty() && rng.bool() {
                            known[rng.usize(..known.len())]
                        } else {
                            id(&mut rng, clustered)
                        };
                        assert_eq!(table.get(&i, &slots), model.get(&i).copied(), "step {step}");
                    }
                }
                assert_eq!(table.len(), model.len());
            }
            for (i, s) in &model {
                assert_eq!(table.get(i, &slots), Some(*s));
            }
            let mut listed: Vec<u64> = table.slots().collect();
            listed.sort_unstable();
            let mut want: Vec<u64> = model.values().copied().collect();
            want.sort_unstable();
            assert_eq!(listed, want);
        }
    }
}
