//! A byte-bounded store under one eviction policy (lru, lfu, fifo) with
//! per-entry expiry: `appliance.cache.store.Store` in Rust, so that the
//! server can answer hits from it without the GIL.
//!
//! The policies order entries exactly as cachetools does (the Python store
//! is built on it), so both stores pass the same unit tests: lru and fifo by
//! the time of the last use (lru: read or write) or write (fifo); lfu by use
//! count, then by when the entry reached that count.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;

pub type Key = Arc<[u8]>;

/// What the bytes of an entry belong to, for a caller that wants it back
/// (Python's bytes object: its readers then share it, nothing is copied).
pub type Handle = Option<Arc<dyn Any + Send + Sync>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Lru,
    Lfu,
    Fifo,
}

impl Policy {
    pub fn parse(name: &str) -> Option<Policy> {
        match name {
            "lru" => Some(Policy::Lru),
            "lfu" => Some(Policy::Lfu),
            "fifo" => Some(Policy::Fifo),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    /// The value, behind `offset` bytes of framing.
    pub data: Bytes,
    /// Monotonic deadline in seconds; 0 = never.
    pub expires: f64,
    /// Key + value bytes: what the budget counts.
    pub size: usize,
    pub offset: usize,
    pub handle: Handle,
}

struct Slot {
    entry: Entry,
    /// Where the entry sits in `order`: (use count, sequence); lru and
    /// fifo keep the count at 0.
    rank: (u64, u64),
}

pub struct Store {
    pub policy: Policy,
    pub max_bytes: usize,
    slots: HashMap<Key, Slot>,
    /// Eviction order: the first entry goes first.
    order: BTreeMap<(u64, u64), Key>,
    /// Entries with a TTL by deadline (f64 bits order like the positive
    /// floats they are), so expired ones are found without a scan.
    expiry: BTreeSet<(u64, Key)>,
    seq: u64,
    bytes: usize,
    pub evictions: u64,
    pub expirations: u64,
    /// remove() and clear() calls so far: a fetch that began before one
    /// may hold a value older than what the caller removed.
    pub removals: u64,
}

impl Store {
    pub fn new(policy: Policy, max_bytes: usize) -> Store {
        Store {
            policy,
            max_bytes,
            slots: HashMap::new(),
            order: BTreeMap::new(),
            expiry: BTreeSet::new(),
            seq: 0,
            bytes: 0,
            evictions: 0,
            expirations: 0,
            removals: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// A use of `key` (a read, or a write of a key already held).
    fn touch(&mut self, key: &[u8], write: bool) {
        let moves = match self.policy {
            Policy::Lru => true,
            Policy::Lfu => true,
            Policy::Fifo => write,
        };
        if !moves {
            return;
        }
        let seq = self.next_seq();
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let old = slot.rank;
        let new = match self.policy {
            Policy::Lfu => (old.0 + 1, seq),
            _ => (0, seq),
        };
        slot.rank = new;
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(new, k);
        }
    }

    /// The live entry of `key`, a use of it; an expired one is dropped (and counted).
    pub fn get(&mut self, key: &[u8], now: f64) -> Option<Entry> {
        let entry = self.find(key, now)?;
        self.touch(key, false);
        Some(entry)
    }

    /// As get(), but not yet a use: the hit path first asks whether it may
    /// answer (the rate limit), then calls used().
    pub fn find(&mut self, key: &[u8], now: f64) -> Option<Entry> {
        let slot = self.slots.get(key)?;
        if slot.entry.expires != 0.0 && slot.entry.expires <= now {
            self.discard(key);
            self.expirations += 1;
            return None;
        }
        Some(slot.entry.clone())
    }

    /// A read of `key` found by find().
    pub fn used(&mut self, key: &[u8]) {
        self.touch(key, false);
    }

    /// Whether an entry of `size` bytes fits without evicting one.
    pub fn fits(&self, size: usize) -> bool {
        self.bytes + size <= self.max_bytes
    }

    /// The entry a new one of `size` bytes would evict first (None: it
    /// fits). Named for lru only, as the Python store does.
    pub fn victim(&self, size: usize) -> Option<Key> {
        if self.fits(size) || self.policy != Policy::Lru {
            return None;
        }
        self.order.values().next().cloned()
    }

    /// Live entries, the one the policy would evict last first.
    pub fn ranked(&self, now: f64) -> Vec<(Key, Entry)> {
        self.order
            .values()
            .rev()
            .filter_map(|k| {
                let e = &self.slots.get(k)?.entry;
                (e.expires == 0.0 || e.expires > now).then(|| (k.clone(), e.clone()))
            })
            .collect()
    }

    /// Stores `data` (the value is data[offset..]); false when the entry
    /// alone exceeds the budget (then any old copy is dropped too).
    pub fn set(&mut self, key: &[u8], data: Bytes, expires: f64, offset: usize, now: f64) -> bool {
        self.set_held(key, data, None, expires, offset, now)
    }

    /// set(), with what the bytes belong to (given back by get()).
    pub fn set_held(
        &mut self,
        key: &[u8],
        data: Bytes,
        handle: Handle,
        expires: f64,
        offset: usize,
        now: f64,
    ) -> bool {
        let size = key.len() + data.len() - offset.min(data.len());
        if size > self.max_bytes {
            self.remove(key);
            return false;
        }
        self.reclaim_expired(64, now);
        // As cachetools: make room for what the entry adds (all of it once
        // the key itself is evicted).
        let maxsize = self.max_bytes.max(1);
        loop {
            let held = self.slots.get(key).map_or(0, |s| s.entry.size);
            if self.bytes - held + size <= maxsize || !self.evict_one() {
                break;
            }
        }
        let entry = Entry {
            data,
            expires,
            size,
            offset,
            handle,
        };
        if let Some(old_expires) = self.slots.get(key).map(|s| s.entry.expires) {
            let slot = self.slots.get_mut(key).unwrap();
            self.bytes = self.bytes - slot.entry.size + size;
            slot.entry = entry;
            if old_expires != 0.0 {
                self.expiry.remove(&(old_expires.to_bits(), Key::from(key)));
            }
            self.touch(key, true);
        } else {
            let key: Key = Key::from(key);
            let seq = self.next_seq();
            let rank = match self.policy {
                Policy::Lfu => (1, seq),
                _ => (0, seq),
            };
            self.order.insert(rank, key.clone());
            self.bytes += size;
            self.slots.insert(key, Slot { entry, rank });
        }
        if expires != 0.0 {
            self.expiry.insert((expires.to_bits(), Key::from(key)));
        }
        true
    }

    fn discard(&mut self, key: &[u8]) -> Option<Entry> {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.rank);
        if slot.entry.expires != 0.0 {
            self.expiry
                .remove(&(slot.entry.expires.to_bits(), Key::from(key)));
        }
        self.bytes -= slot.entry.size;
        Some(slot.entry)
    }

    pub fn remove(&mut self, key: &[u8]) -> bool {
        self.removals += 1;
        self.discard(key).is_some()
    }

    /// Evicts one entry by policy; false when empty.
    pub fn evict_one(&mut self) -> bool {
        let Some(key) = self.order.values().next().cloned() else {
            return false;
        };
        self.discard(&key);
        self.evictions += 1;
        true
    }

    pub fn clear(&mut self) {
        self.removals += 1;
        self.slots.clear();
        self.order.clear();
        self.expiry.clear();
        self.bytes = 0;
    }

    /// Drops up to `limit` expired entries; O(limit log n).
    pub fn reclaim_expired(&mut self, limit: usize, now: f64) -> usize {
        let mut done = 0;
        while done < limit {
            let Some((bits, key)) = self.expiry.first().cloned() else {
                break;
            };
            if f64::from_bits(bits) > now {
                break;
            }
            self.discard(&key);
            self.expirations += 1;
            done += 1;
        }
        done
    }
}

/// Seconds on CLOCK_MONOTONIC: the clock Python's time.monotonic() reads
/// on Linux, so deadlines set in Python mean the same here.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut Store, k: &str, n: usize) -> bool {
        s.set(k.as_bytes(), Bytes::from(vec![b'x'; n]), 0.0, 0, 0.0)
    }

    fn has(s: &mut Store, k: &str) -> bool {
        s.get(k.as_bytes(), 0.0).is_some()
    }

    #[test]
    fn budget_counts_key_and_value() {
        for policy in [Policy::Lru, Policy::Lfu, Policy::Fifo] {
            let mut s = Store::new(policy, 100);
            for i in 0..50 {
                put(&mut s, &format!("k{i:02}"), 17);
            }
            assert_eq!((s.len(), s.bytes(), s.evictions), (5, 100, 45));
        }
    }

    #[test]
    fn policies_pick_their_victims() {
        let mut lru = Store::new(Policy::Lru, 60);
        let mut fifo = Store::new(Policy::Fifo, 60);
        for s in [&mut lru, &mut fifo] {
            for k in ["a", "b", "c"] {
                put(s, k, 19);
            }
            has(s, "a");
            put(s, "d", 19);
        }
        assert!(has(&mut lru, "a") && !has(&mut lru, "b"));
        assert!(!has(&mut fifo, "a") && has(&mut fifo, "b"));
        let mut lfu = Store::new(Policy::Lfu, 60);
        for k in ["a", "b", "c"] {
            put(&mut lfu, k, 19);
        }
        for _ in 0..3 {
            has(&mut lfu, "a");
            has(&mut lfu, "c");
        }
        put(&mut lfu, "d", 19);
        assert!(has(&mut lfu, "a") && has(&mut lfu, "c") && !has(&mut lfu, "b"));
    }

    #[test]
    fn expiry_hides_then_reclaims_on_write() {
        let mut s = Store::new(Policy::Lru, 1000);
        s.set(b"short", Bytes::from_static(b"v"), 10.0, 0, 0.0);
        s.set(b"never", Bytes::from_static(b"v"), 0.0, 0, 0.0);
        assert!(s.get(b"short", 9.0).is_some());
        assert!(s.get(b"short", 11.0).is_none());
        s.set(b"a", Bytes::from_static(b"v"), 12.0, 0, 11.0);
        s.set(b"b", Bytes::from_static(b"v"), 0.0, 0, 13.0);
        assert_eq!((s.len(), s.expirations, s.expiry.len()), (2, 2, 0));
    }

    #[test]
    fn overwrite_keeps_one_expiry_and_exact_bytes() {
        let mut s = Store::new(Policy::Lfu, 1000);
        for i in 0..100 {
            s.set(b"k", Bytes::from(vec![0; i % 7]), 50.0 + i as f64, 0, 0.0);
        }
        assert_eq!((s.expiry.len(), s.bytes(), s.len()), (1, 1 + 99 % 7, 1));
        assert!(!s.set(b"k", Bytes::from(vec![0; 2000]), 0.0, 0, 0.0));
        assert_eq!((s.len(), s.bytes(), s.expiry.len()), (0, 0, 0));
    }

    #[test]
    fn offset_bytes_are_not_counted() {
        let mut s = Store::new(Policy::Lru, 1000);
        s.set(b"k", Bytes::from(vec![0; 303]), 0.0, 3, 0.0);
        assert_eq!(s.bytes(), 301);
    }
}
