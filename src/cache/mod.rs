//! The shared cache: what is cached (GET/HEAD on routes with `cache:`), under which key (host,
//! path and query: never per device), for how long (origin headers, else the route's default
//! TTL), and the storage, eviction and request coalescing behind it. Authorization has always
//! run before any of this: the proxy enables the cache only after the request is allowed.

pub mod storage;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora_cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora_cache::eviction::{lru, EvictionManager};
use pingora_cache::filters::resp_cacheable;
use pingora_cache::key::HashBinary;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::CacheEntryKeyRef;
use pingora_cache::VarianceBuilder;
use pingora_cache::{
    CacheKey, CacheMeta, CacheMetaDefaults, CacheOptionOverrides, CachePhase, NoCacheReason, RespCacheable,
};

use crate::metrics;
use crate::reason::CacheResult;
use storage::MemoryStorage;

/// The cache's size and coalescing, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Everything the cache holds, stored objects and fills in progress, in bytes.
    pub max_bytes: usize,
    pub max_object_bytes: usize,
    /// The part of `max_bytes` for fills in progress.
    pub filling_bytes: usize,
    /// How long coalesced requests wait for the first fill's headers.
    pub lock_timeout: Duration,
}

/// Shards of the LRU eviction manager.
const LRU_SHARDS: usize = 16;

/// The process-wide cache: pingora keeps `'static` references to all of it.
pub struct SharedCache {
    pub storage: &'static MemoryStorage,
    eviction: &'static lru::Manager<LRU_SHARDS>,
    lock: &'static CacheKeyLockImpl,
    max_object_bytes: usize,
    lock_timeout: Duration,
}

impl SharedCache {
    /// Builds the cache once at start-up; it lives as long as the process.
    pub fn new(cfg: &Settings) -> SharedCache {
        let lock_timeout = cfg.lock_timeout;
        metrics::CACHE_BUDGET.set(i64::try_from(cfg.max_bytes).unwrap_or(i64::MAX));
        let filling = cfg.filling_bytes;
        SharedCache {
            storage: Box::leak(Box::new(MemoryStorage::new(cfg.max_object_bytes, filling))),
            // Stored objects get what fills do not. The capacity hint is a guess at the object
            // count; the byte limit is what binds.
            eviction: Box::leak(Box::new(lru::Manager::with_capacity(cfg.max_bytes - filling, 8192))),
            lock: Box::leak(CacheLock::new_boxed(lock_timeout)),
            max_object_bytes: cfg.max_object_bytes,
            lock_timeout,
        }
    }

    /// Removes the objects for one URL (`host/path?query`, every variant and cohort of it) or,
    /// with `prefix`, every object whose URL starts with it. Returns how many were removed.
    pub fn purge(&self, url: &str, prefix: bool) -> usize {
        let removed = self.storage.purge_where(|primary| {
            if prefix {
                primary.starts_with(url)
            } else {
                primary == url || primary.strip_prefix(url).is_some_and(|rest| rest.starts_with('\n'))
            }
        });
        for key in &removed {
            self.eviction.remove(CacheEntryKeyRef::KeyOnly(key));
        }
        removed.len()
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

    /// Brings the memory gauges up to date (when metrics are scraped).
    pub fn update_gauges(&self) {
        let usage = &self.storage.usage;
        let gauge = |n: &AtomicUsize| i64::try_from(n.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        metrics::CACHE_BYTES.set(gauge(&usage.bytes));
        metrics::CACHE_FILLING_BYTES.set(gauge(&usage.reserved_bytes));
    }

    /// Reserves fill memory for a response about to be stored. Without room (too many large
    /// fills at once) it is streamed through uncached, so memory stays within the budget.
    pub fn reserve_fill(&self, decision: RespCacheable, resp: &ResponseHeader) -> RespCacheable {
        let RespCacheable::Cacheable(mut meta) = decision else {
            return decision;
        };
        let length = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(self.max_object_bytes);
        match self.storage.reserve_fill(length) {
            Some(ticket) => {
                meta.extensions_mut().insert(ticket);
                RespCacheable::Cacheable(meta)
            }
            None => {
                metrics::CACHE_FILLS_DEFERRED.inc();
                RespCacheable::Uncacheable(NoCacheReason::Custom("fill budget in use"))
            }
        }
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
        session.cache.set_max_file_size_bytes(self.max_object_bytes);
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
    CacheKey::new(primary, "")
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
    match resp_cacheable(cc.as_ref(), resp.clone(), false, &NO_DEFAULTS) {
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
    }
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
        use pingora_cache::key::CacheHashKey;
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
