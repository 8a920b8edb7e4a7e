//! The proxy's mapping cache: bounded, two generations.
//!
//! A mapping never changes while its row exists, so entries need no invalidation, only a
//! bound. Eviction is generational (as in a two-segment LRU): new entries go to the young
//! generation; when it is full, the old generation is dropped whole and the young one becomes
//! old; a hit in the old generation moves the entry back to the young one. Entries used within
//! the last generation therefore survive, which suits the skewed traffic of links and caches,
//! while a hit costs one shard read lock and no write (no recency list to update, unlike a
//! strict LRU), and eviction is O(1) per insert, amortised. At most `capacity` entries are
//! held (each generation holds half).

use std::hash::Hash;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// Which side an id is, and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Id {
    Legacy(i64),
    Uuid(u128),
}

/// (table index in the catalog, the id looked up) → the other side.
pub type Key = (u32, Id);

pub struct GenCache<K, V> {
    gens: RwLock<Gens<K, V>>,
    young_len: AtomicUsize,
    per_gen: usize,
}

struct Gens<K, V> {
    young: DashMap<K, V>,
    old: DashMap<K, V>,
}

impl<K: Eq + Hash + Clone, V: Clone> GenCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        GenCache {
            gens: RwLock::new(Gens {
                young: DashMap::new(),
                old: DashMap::new(),
            }),
            young_len: AtomicUsize::new(0),
            per_gen: (capacity / 2).max(1),
        }
    }

    pub fn get(&self, k: &K) -> Option<V> {
        let v = {
            let g = self.gens.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = g.young.get(k) {
                return Some(v.clone());
            }
            g.old.get(k).map(|v| v.clone())?
        };
        self.insert(k.clone(), v.clone());
        Some(v)
    }

    pub fn insert(&self, k: K, v: V) {
        {
            let g = self.gens.read().unwrap_or_else(|p| p.into_inner());
            if self.young_len.load(Ordering::Relaxed) < self.per_gen {
                if g.young.insert(k, v).is_none() {
                    self.young_len.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
        let dropped = {
            let mut g = self.gens.write().unwrap_or_else(|p| p.into_inner());
            // Another inserter may have rotated while we waited for the lock.
            let dropped = if self.young_len.load(Ordering::Relaxed) >= self.per_gen {
                let young = std::mem::take(&mut g.young);
                self.young_len.store(0, Ordering::Relaxed);
                Some(std::mem::replace(&mut g.old, young))
            } else {
                None
            };
            if g.young.insert(k, v).is_none() {
                self.young_len.fetch_add(1, Ordering::Relaxed);
            }
            dropped
        };
        // Freed outside the lock: readers need not wait for half a cache to be deallocated.
        drop(dropped);
    }

    pub fn len(&self) -> usize {
        let g = self.gens.read().unwrap_or_else(|p| p.into_inner());
        g.young.len() + g.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keeps_what_is_used() {
        let c: GenCache<u32, u32> = GenCache::new(100);
        for i in 0..50 {
            c.insert(i, i * 10);
        }
        // Key 0 is used while the next generation fills: it is promoted and survives.
        for i in 50..200 {
            assert_eq!(c.get(&0), Some(0));
            c.insert(i, i * 10);
            assert!(c.len() <= 100, "len {}", c.len());
        }
        assert_eq!(c.get(&0), Some(0));
        assert_eq!(c.get(&1), None, "an unused early entry is evicted");
        assert_eq!(c.get(&199), Some(1990));
    }

    #[test]
    fn concurrent_use_stays_bounded() {
        let c = std::sync::Arc::new(GenCache::<u64, u64>::new(1000));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let k = (i * 7 + t) % 5000;
                        if c.get(&k).is_none() {
                            c.insert(k, k + 1);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(c.len() <= 1000 + 4, "len {}", c.len());
        for k in 0..5000 {
            if let Some(v) = c.get(&k) {
                assert_eq!(v, k + 1);
            }
        }
    }
}
