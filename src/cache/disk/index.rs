//! What the disk tier holds, in memory: each object's primary key and size, ordered by last
//! access. Eviction takes the least recently used first. The order survives restarts because
//! the last access is also the meta file's mtime (refreshed at most once a minute per object),
//! and the loader enters objects with that time: an object loaded at start sorts among the new
//! fills by when it was last used, not by when it was loaded.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora_cache::key::HashBinary;

/// How stale a persisted access time may get before a hit writes a new one.
pub const PERSIST_EVERY: Duration = Duration::from_secs(60);

/// Nanoseconds since the epoch: the index's clock, comparable with file mtimes.
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

pub struct Entry {
    pub primary: Box<str>,
    /// Body and meta file bytes.
    pub bytes: u64,
    access: u64,
    persisted: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<HashBinary, Entry>,
    order: BTreeSet<(u64, HashBinary)>,
    bytes: u64,
}

#[derive(Default)]
pub struct Index(Mutex<Inner>);

impl Index {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned index is still consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters an object last used at `access` (ns), replacing any entry for the key. Returns
    /// the bytes of the entry it replaced.
    pub fn insert(&self, k: HashBinary, primary: Box<str>, bytes: u64, access: u64) -> Option<u64> {
        let mut i = self.lock();
        let old = i.remove(&k).map(|e| e.bytes);
        i.order.insert((access, k));
        i.bytes += bytes;
        i.entries.insert(
            k,
            Entry {
                primary,
                bytes,
                access,
                persisted: access,
            },
        );
        old
    }

    /// Enters an object found by the loader, unless a newer fill entered it already.
    pub fn insert_loaded(&self, k: HashBinary, primary: Box<str>, bytes: u64, access: u64) -> bool {
        if self.lock().entries.contains_key(&k) {
            return false;
        }
        self.insert(k, primary, bytes, access);
        true
    }

    /// Records a hit. True when the persisted access time is old enough to be written again.
    pub fn touch(&self, k: &HashBinary, now: u64) -> bool {
        let mut i = self.lock();
        let Some(e) = i.entries.get_mut(k) else {
            return false;
        };
        let old = e.access;
        e.access = now;
        let persist = now.saturating_sub(e.persisted) >= PERSIST_EVERY.as_nanos() as u64;
        if persist {
            e.persisted = now;
        }
        i.order.remove(&(old, *k));
        i.order.insert((now, *k));
        persist
    }

    pub fn contains(&self, k: &HashBinary) -> bool {
        self.lock().entries.contains_key(k)
    }

    pub fn remove(&self, k: &HashBinary) -> Option<Entry> {
        self.lock().remove(k)
    }

    /// Takes the least recently used objects out until at most `limit` bytes remain, or
    /// `at_least` bytes were taken.
    pub fn evict(&self, limit: u64, at_least: u64) -> Vec<HashBinary> {
        let mut i = self.lock();
        let mut out = Vec::new();
        let mut freed = 0;
        while i.bytes > limit || freed < at_least {
            let Some(&(_, k)) = i.order.first() else { break };
            if let Some(e) = i.remove(&k) {
                freed += e.bytes;
            }
            out.push(k);
        }
        out
    }

    /// Takes out every object whose primary key `matches`.
    pub fn remove_where(&self, matches: impl Fn(&str) -> bool) -> Vec<HashBinary> {
        let mut i = self.lock();
        let doomed: Vec<HashBinary> = i
            .entries
            .iter()
            .filter(|(_, e)| matches(&e.primary))
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            i.remove(k);
        }
        doomed
    }

    /// Bytes and objects held.
    pub fn usage(&self) -> (u64, usize) {
        let i = self.lock();
        (i.bytes, i.entries.len())
    }
}

impl Inner {
    fn remove(&mut self, k: &HashBinary) -> Option<Entry> {
        let e = self.entries.remove(k)?;
        self.order.remove(&(e.access, *k));
        self.bytes -= e.bytes;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> HashBinary {
        [n; 16]
    }

    #[test]
    fn eviction_takes_the_least_recently_used_first() {
        let i = Index::default();
        for n in 1..=3 {
            i.insert(k(n), format!("h/{n}").into(), 10, u64::from(n));
        }
        i.touch(&k(1), 10); // 1 is now the most recent
        assert_eq!(i.evict(15, 0), vec![k(2), k(3)]);
        assert_eq!(i.usage(), (10, 1));
        assert_eq!(i.evict(100, 5), vec![k(1)], "at_least frees below the limit");
        assert_eq!(i.usage(), (0, 0));
    }

    #[test]
    fn loaded_objects_sort_by_their_last_use_and_never_replace_a_new_fill() {
        let i = Index::default();
        i.insert(k(9), "h/new".into(), 10, 1_000);
        assert!(!i.insert_loaded(k(9), "h/old".into(), 99, 5));
        assert!(i.insert_loaded(k(1), "h/old".into(), 10, 5));
        assert_eq!(
            i.evict(10, 0),
            vec![k(1)],
            "the loaded object was used before the new fill"
        );
    }

    #[test]
    fn access_times_are_persisted_at_most_once_a_minute() {
        let i = Index::default();
        i.insert(k(1), "h/1".into(), 1, 0);
        let minute = PERSIST_EVERY.as_nanos() as u64;
        assert!(!i.touch(&k(1), minute / 2));
        assert!(i.touch(&k(1), minute));
        assert!(!i.touch(&k(1), minute + 1));
        assert!(!i.touch(&k(2), minute), "an unknown key");
    }

    #[test]
    fn replacing_and_purging_keep_the_byte_count_exact() {
        let i = Index::default();
        assert_eq!(i.insert(k(1), "h/fw/a".into(), 10, 1), None);
        assert_eq!(i.insert(k(1), "h/fw/a".into(), 30, 2), Some(10));
        i.insert(k(2), "h/fw/b".into(), 5, 3);
        i.insert(k(3), "h/other".into(), 7, 4);
        let mut gone = i.remove_where(|p| p.starts_with("h/fw/"));
        gone.sort();
        assert_eq!(gone, vec![k(1), k(2)]);
        assert_eq!(i.usage(), (7, 1));
    }
}
