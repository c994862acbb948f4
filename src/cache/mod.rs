//! The shared cache: what is cached (GET/HEAD on routes with `cache:`), under which key (host,
//! path and query: never per device), for how long (origin headers, else the route's default
//! TTL), and the storage, eviction and request coalescing behind it. Authorization has always
//! run before any of this: the proxy enables the cache only after the request is allowed.

pub mod disk;
mod memory;
mod tiered;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora_cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora_cache::eviction::{lru, EvictionManager};
use pingora_cache::filters::resp_cacheable;
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::{CacheEntryKey, CacheEntryKeyRef};
use pingora_cache::VarianceBuilder;
use pingora_cache::{
    CacheKey, CacheMeta, CacheMetaDefaults, CacheOptionOverrides, CachePhase, NoCacheReason, RespCacheable,
};

use crate::metrics;
use crate::reason::{CacheResult, Tier};
use disk::DiskStorage;
pub use memory::Stored;
use memory::MemoryStorage;
use tiered::{DiskPlan, Tiered};

/// The cache's size and coalescing, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Everything the memory tier holds, stored objects and fills in progress, in bytes.
    pub max_bytes: usize,
    /// Larger objects are not kept in memory (only on disk, if there is a disk tier).
    pub max_object_bytes: usize,
    /// The part of `max_bytes` for fills in progress.
    pub filling_bytes: usize,
    /// How long coalesced requests wait for the first fill's headers.
    pub lock_timeout: Duration,
    pub disk: Option<disk::Settings>,
}

/// Shards of the LRU eviction manager.
pub(crate) const LRU_SHARDS: usize = 16;

/// The process-wide cache: pingora keeps `'static` references to all of it.
pub struct SharedCache {
    storage: &'static Tiered,
    eviction: &'static lru::Manager<LRU_SHARDS>,
    lock: &'static CacheKeyLockImpl,
    /// The largest object either tier takes.
    max_file_bytes: usize,
    lock_timeout: Duration,
}

impl SharedCache {
    /// Builds the cache once at start-up; it lives as long as the process. The disk tier's
    /// directory is loaded in the background.
    pub fn new(cfg: &Settings) -> Result<SharedCache, String> {
        let lock_timeout = cfg.lock_timeout;
        metrics::CACHE_BUDGET.set(i64::try_from(cfg.max_bytes).unwrap_or(i64::MAX));
        let filling = cfg.filling_bytes;
        // Stored objects get what fills do not. The capacity hint is a guess at the object
        // count; the byte limit is what binds.
        let eviction: &'static lru::Manager<LRU_SHARDS> =
            Box::leak(Box::new(lru::Manager::with_capacity(cfg.max_bytes - filling, 8192)));
        let disk = match &cfg.disk {
            Some(d) => Some(
                DiskStorage::open(d.clone())
                    .map_err(|e| format!("cache.disk: starting its I/O pool: {e}"))?,
            ),
            None => None,
        };
        let max_file_bytes = disk.map_or(cfg.max_object_bytes, |d| {
            cfg.max_object_bytes
                .max(usize::try_from(d.max_object_bytes()).unwrap_or(usize::MAX))
        });
        Ok(SharedCache {
            storage: Box::leak(Box::new(Tiered {
                memory: Box::leak(Box::new(MemoryStorage::new(cfg.max_object_bytes, filling))),
                disk,
                memory_eviction: eviction,
                memory_max_object: cfg.max_object_bytes,
            })),
            eviction,
            lock: Box::leak(CacheLock::new_boxed(lock_timeout)),
            max_file_bytes,
            lock_timeout,
        })
    }

    /// Removes the objects for one URL (`host/path?query`, every variant and cohort of it) or,
    /// with `prefix`, every object whose URL starts with it, from both tiers. Returns how many
    /// were removed (an object in both tiers counts once per tier).
    pub async fn purge(&self, url: &str, prefix: bool) -> usize {
        let matches = |primary: &str| {
            if prefix {
                primary.starts_with(url)
            } else {
                primary == url || primary.strip_prefix(url).is_some_and(|rest| rest.starts_with('\n'))
            }
        };
        let removed = self.storage.memory.purge_where(matches);
        for key in &removed {
            self.eviction.remove(CacheEntryKeyRef::KeyOnly(key));
        }
        let on_disk = match self.storage.disk {
            Some(d) => d.purge_where(matches).await,
            None => 0,
        };
        removed.len() + on_disk
    }

    /// Records what the cache did for a finished request, and returns it.
    pub fn record(&self, session: &Session) -> CacheResult {
        let result = result(session.cache.phase());
        metrics::count_cache_lookup(result);
        if session.cache.lock_duration().is_some() && !session.cache.is_cache_lock_writer() {
            metrics::CACHE_COALESCED.inc();
        }
        result
    }

    /// A complete, fresh object in the memory tier that pingora's hit path would send as it is
    /// stored: a 200 with a Content-Length and no `Vary`, and no fill under way for its key (a
    /// fill wins over a stored object, see `Tiered::lookup`). Counts the lookup and the LRU
    /// access, as pingora's hit path does, only when it returns one; otherwise the request goes
    /// to pingora, which looks the key up again.
    pub fn fresh_memory_hit(&self, key: &CacheKey, now: SystemTime) -> Option<Stored> {
        let k = key.combined_bin();
        let filling = self.storage.disk.is_some_and(|d| d.lookup_fill(key, None).is_some())
            || self.storage.memory.lookup_fill(&k).is_some();
        if filling {
            return None;
        }
        let stored = self.storage.memory.lookup_stored(&k)?;
        let header = stored.header();
        let plain = header.status == http::StatusCode::OK
            && header.headers.contains_key(http::header::CONTENT_LENGTH)
            && !stored.has_variance()
            && stored.is_fresh(now);
        if !plain {
            return None;
        }
        metrics::count_tier_lookup(Tier::Memory, true);
        metrics::count_cache_lookup(CacheResult::Hit);
        let (compact, weight) = stored.eviction();
        self.eviction.access(&CacheEntryKey::KeyOnly(compact.clone()), weight, stored.fresh_until());
        Some(stored)
    }

    /// Whether neither tier has the key, stored or filling: a request for it would start a fill.
    pub fn lacks(&self, key: &CacheKey) -> bool {
        let k = key.combined_bin();
        !self.storage.memory.holds(&k) && !self.storage.disk.is_some_and(|d| d.holds(&k))
    }

    /// Brings the tiers' gauges up to date (when metrics are scraped).
    pub fn update_gauges(&self) {
        let usage = &self.storage.memory.usage;
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let load = |n: &AtomicUsize| gauge(n.load(Ordering::Relaxed));
        let tier = |t: Tier, bytes: i64, objects: i64| {
            metrics::CACHE_BYTES.with_label_values(&[t.as_str()]).set(bytes);
            metrics::CACHE_OBJECTS.with_label_values(&[t.as_str()]).set(objects);
        };
        tier(Tier::Memory, load(&usage.bytes), load(&usage.objects));
        metrics::CACHE_FILLING_BYTES.set(load(&usage.reserved_bytes));
        if let Some(d) = self.storage.disk {
            let (bytes, objects) = d.usage();
            tier(Tier::Disk, i64::try_from(bytes).unwrap_or(i64::MAX), gauge(objects));
        }
    }

    /// Decides where a response about to be stored goes: memory (reserving fill memory) when
    /// it fits, disk when there is one and it has room. When neither takes it (too many large
    /// fills at once, a full or failing disk), it is streamed through uncached.
    pub fn reserve_fill(&self, decision: RespCacheable, resp: &ResponseHeader) -> RespCacheable {
        let RespCacheable::Cacheable(mut meta) = decision else {
            return decision;
        };
        let length = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let memory = &self.storage.memory;
        let ticket = match length {
            Some(n) if n > memory.max_object_bytes() => None,
            n => memory.reserve_fill(n.unwrap_or(memory.max_object_bytes())),
        };
        let disk = self.storage.disk.and_then(|d| d.accepts(length.map(|n| n as u64)).ok());
        if ticket.is_none() && disk.is_none() {
            metrics::CACHE_FILLS_DEFERRED.inc();
            return RespCacheable::Uncacheable(NoCacheReason::Custom("no tier has room for this fill"));
        }
        if let Some(t) = ticket {
            meta.extensions_mut().insert(t);
        }
        if disk.is_some() {
            meta.extensions_mut().insert(DiskPlan {
                length: length.map(|n| n as u64),
            });
        }
        RespCacheable::Cacheable(meta)
    }

    /// Turns the cache on for this request.
    pub fn enable(&self, session: &mut Session) {
        session.cache.enable(
            self.storage,
            Some(self.eviction),
            None,
            Some(self.lock),
            Some({
                let mut o = CacheOptionOverrides::default();
                o.wait_timeout = Some(self.lock_timeout);
                o
            }),
        );
        session.cache.set_max_file_size_bytes(self.max_file_bytes);
    }

    /// Waits until the disk tier's index is rebuilt (at once without a disk tier).
    pub async fn loaded(&self) {
        if let Some(d) = self.storage.disk {
            d.loaded().await;
        }
    }
}

/// The cache key: host, path and query, and the variants rules chose (a cohort, an origin,
/// headers they set toward the origin). Never anything that identifies the device unless a rule
/// makes it so, so one fill serves the whole fleet.
///
/// Everything goes into the primary key: pingora hashes only the primary (and the variance),
/// not the user tag. A request target cannot contain a newline, and each variant's value is
/// length-prefixed, so no cohort value can forge another variant or another path.
pub fn key(host: &str, path_and_query: &str, variants: &str) -> CacheKey {
    let mut primary = String::with_capacity(host.len() + path_and_query.len() + variants.len());
    primary.push_str(host);
    primary.push_str(path_and_query);
    primary.push_str(variants);
    let mut key = CacheKey::new(primary, "");
    // pingora hashes the primary key each time it asks for it (the lookup, the lock, eviction):
    // the same hash, computed once.
    let hash = key.primary_bin();
    key.set_primary_bin_override(hash);
    key
}

/// Appends one variant for [`key`]: its kind (`cohort`, `origin`, `header:`), a name (a header's;
/// empty for the others) and its length-prefixed value.
pub fn push_variant(variants: &mut String, kind: &str, name: &str, value: &str) {
    use std::fmt::Write;
    let _ = write!(variants, "\n{kind}{name}={}:{value}", value.len()); // a String cannot fail
}

/// What the cache did, from the phase a request ended in.
pub fn result(phase: CachePhase) -> CacheResult {
    match phase {
        CachePhase::Hit => CacheResult::Hit,
        CachePhase::Stale | CachePhase::StaleUpdating => CacheResult::Stale,
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => CacheResult::Revalidated,
        CachePhase::Miss | CachePhase::Expired => CacheResult::Miss,
        CachePhase::Disabled(_) => CacheResult::Uncacheable,
        _ => CacheResult::Bypass,
    }
}

/// Statuses cacheable by default when the origin gives no freshness (RFC 9110 §15.1).
fn heuristically_cacheable(status: u16) -> bool {
    matches!(status, 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

const NO_DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(|_| None, 0, 0);

/// Whether and how long to keep a response. `Set-Cookie`, `private` and `no-store` are never
/// shared; explicit freshness (`s-maxage`, `max-age`, `Expires`) wins over `default_ttl`.
pub fn cacheable(resp: &ResponseHeader, default_ttl: u32) -> RespCacheable {
    let vary_star = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .any(|v| v.to_str().unwrap_or_default().split(',').any(|n| n.trim() == "*"));
    if vary_star || resp.headers.contains_key(http::header::SET_COOKIE) {
        return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    }
    let cc = CacheControl::from_resp_headers(resp);
    if cc.as_ref().is_some_and(|c| c.is_cacheable() == Cacheable::No) {
        return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    }
    let decision = match resp_cacheable(cc.as_ref(), resp.clone(), false, &NO_DEFAULTS) {
        RespCacheable::Cacheable(meta) => RespCacheable::Cacheable(meta),
        RespCacheable::Uncacheable(_) if heuristically_cacheable(resp.status.as_u16()) => {
            let now = SystemTime::now();
            let swr = cc
                .as_ref()
                .and_then(|c| c.stale_while_revalidate().ok().flatten())
                .unwrap_or(0);
            let sie = cc.as_ref().and_then(|c| c.stale_if_error().ok().flatten()).unwrap_or(0);
            let fresh = Duration::from_secs(u64::from(default_ttl));
            RespCacheable::Cacheable(CacheMeta::new(now + fresh, now, swr, sie, resp.clone()))
        }
        uncacheable => uncacheable,
    };
    match (decision, age(resp)) {
        (RespCacheable::Cacheable(meta), Some(age)) => RespCacheable::Cacheable(aged(&meta, age)),
        (decision, _) => decision,
    }
}

/// The response's `Age` (RFC 9111 §5.1): how long a cache upstream, a shield, has held it.
fn age(resp: &ResponseHeader) -> Option<Duration> {
    let secs: u64 = resp.headers.get(http::header::AGE)?.to_str().ok()?.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// `meta` as if stored `age` earlier (RFC 9111 §4.2.3: the current age counts the time spent in
/// caches upstream): it stays fresh only for what is left of the freshness, and the `Age` this
/// cache sends counts the upstream's time too. Without it, every tier would add a full lifetime.
fn aged(meta: &CacheMeta, age: Duration) -> CacheMeta {
    let back = |t: SystemTime| t.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
    CacheMeta::new(
        back(meta.fresh_until()),
        back(meta.created()),
        meta.stale_while_revalidate_sec(),
        meta.stale_if_error_sec(),
        meta.response_header_copy(),
    )
}

/// The variance of a stored response for this request: the values of the request headers that
/// its `Vary` names. `None` when the response does not vary.
pub fn variance(resp_headers: &http::HeaderMap, req: &RequestHeader) -> Option<HashBinary> {
    let mut b = VarianceBuilder::new();
    for value in resp_headers.get_all(http::header::VARY) {
        for name in value.to_str().unwrap_or_default().split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            let v = req
                .headers
                .get(&name)
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            b.add_owned_name_value(name, v);
        }
    }
    b.finalize()
}

/// An RFC 9211 `Cache-Status` value for this response.
pub fn cache_status(phase: CachePhase, stored: bool) -> &'static str {
    macro_rules! status {
        ($s:literal) => {
            concat!("mtls-edge", $s)
        };
    }
    match phase {
        CachePhase::Hit => status!("; hit"),
        CachePhase::Stale | CachePhase::StaleUpdating => status!("; hit; fwd=stale"),
        CachePhase::Revalidated => status!("; fwd=stale; fwd-status=304"),
        CachePhase::Expired | CachePhase::Miss if stored => status!("; fwd=miss; stored"),
        // Disabled after the lookup: the origin's response turned out uncacheable.
        CachePhase::Expired | CachePhase::Miss | CachePhase::Disabled(_) => status!("; fwd=miss"),
        _ => status!("; fwd=bypass"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash is computed once, and it is pingora's: objects on disk from before stay found.
    #[test]
    fn a_key_carries_the_hash_pingora_computes_for_its_primary() {
        let k = key("fw.example", "/img.bin?v=2", "\ncohort=4:beta");
        let fresh = CacheKey::new("fw.example/img.bin?v=2\ncohort=4:beta", "");
        assert_eq!(k.primary_bin(), fresh.primary_bin());
        assert_eq!(k.combined_bin(), fresh.combined_bin());
        assert_ne!(key("fw.example", "/img.bin?v=3", "").primary_bin(), k.primary_bin());
    }

    fn resp(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn ttl(r: RespCacheable) -> Option<u64> {
        match r {
            RespCacheable::Cacheable(m) => Some(
                m.fresh_until()
                    .duration_since(SystemTime::now())
                    .map_or(0, |d| d.as_secs() + 1),
            ),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn freshness_comes_from_the_origin_then_the_route_default() {
        assert_eq!(
            ttl(cacheable(&resp(&[("cache-control", "max-age=100")]), 60)),
            Some(100)
        );
        assert_eq!(
            ttl(cacheable(&resp(&[("cache-control", "max-age=100, s-maxage=30")]), 60)),
            Some(30)
        );
        assert_eq!(ttl(cacheable(&resp(&[]), 60)), Some(60));
    }

    #[test]
    fn time_spent_in_a_cache_upstream_counts_against_freshness() {
        let aged = |age: &str| cacheable(&resp(&[("cache-control", "max-age=100"), ("age", age)]), 60);
        assert_eq!(ttl(aged("30")), Some(70));
        assert_eq!(ttl(aged("0")), Some(100));
        assert_eq!(ttl(aged("junk")), Some(100), "an unreadable Age is ignored");
        assert_eq!(ttl(aged("500")), Some(0), "older than its lifetime: stale at once");
        let RespCacheable::Cacheable(meta) = aged("30") else {
            panic!("cacheable");
        };
        assert!(
            meta.age() >= Duration::from_secs(30),
            "the Age sent on hits counts it too"
        );
        assert_eq!(
            ttl(cacheable(&resp(&[("age", "20")]), 60)),
            Some(40),
            "the route's default too"
        );
    }

    #[test]
    fn private_no_store_and_cookies_are_never_shared() {
        for h in [
            ("cache-control", "private, max-age=100"),
            ("cache-control", "no-store"),
            ("set-cookie", "a=b"),
            ("vary", "*"),
        ] {
            assert_eq!(ttl(cacheable(&resp(&[h]), 60)), None, "{h:?}");
        }
    }

    #[test]
    fn the_key_is_host_path_and_query_never_the_device() {
        let variants = |vs: &[(&str, &str)]| {
            let mut s = String::new();
            for (kind, value) in vs {
                push_variant(&mut s, kind, "", value);
            }
            s
        };
        let a = key("fw.example", "/x.bin?v=1", "");
        assert_eq!(a.combined(), key("fw.example", "/x.bin?v=1", "").combined());
        assert_ne!(a.combined(), key("fw.example", "/x.bin?v=2", "").combined());
        assert_ne!(a.combined(), key("other.example", "/x.bin?v=1", "").combined());
        let cohort = variants(&[("cohort", "model-x1")]);
        assert_ne!(a.combined(), key("fw.example", "/x.bin?v=1", &cohort).combined());
        // A cohort value cannot pass for another variant.
        let forged = key("h", "/m", &variants(&[("cohort", "x\norigin=4:beta")]));
        let real = key("h", "/m", &variants(&[("cohort", "x"), ("origin", "beta")]));
        assert_ne!(forged.combined(), real.combined());
        // The encoding, length prefixes of every width included.
        let mut v = String::new();
        for (kind, name, value) in [
            ("cohort", "", ""),
            ("header:", "x-a", "123456789"),
            ("origin", "", "0123456789"),
        ] {
            push_variant(&mut v, kind, name, value);
        }
        assert_eq!(v, "\ncohort=0:\nheader:x-a=9:123456789\norigin=10:0123456789");
    }
}
