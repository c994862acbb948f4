//! The memory tier: complete objects kept as their received chunks (never copied into one
//! buffer), fills in progress readable while they are written, and an exact count of the bytes
//! held. The byte budget itself is enforced by pingora's eviction manager, which
//! purges through this storage; an evicted object's memory is freed when its last reader ends.
//!
//! Memory: fills in progress draw on a reservation (`reserve_fill`) taken before the fill
//! starts, so complete objects plus fills never exceed the configured total.
//!
//! Integrity: a fill that is dropped without `finish` (origin aborted, short body, client-side
//! error) is marked failed. Readers streaming it get an error, never a clean end of body, and
//! nothing is stored (the trap of pingora issue #932, where a cancelled writer reads as EOF).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};
use pingora_cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora_cache::storage::{
    streaming_write::U64WriteId, HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler,
    Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use tokio::sync::watch;

/// A response's cache metadata, kept parsed: a hit rebuilds its `CacheMeta` from these fields
/// with one header clone, instead of decompressing and parsing the serialized form (a third of
/// the CPU of a small hit).
struct StoredMeta {
    fresh_until: SystemTime,
    created: SystemTime,
    epoch: SystemTime,
    stale_while_revalidate_sec: u32,
    stale_if_error_sec: u32,
    variance: Option<HashBinary>,
    header: ResponseHeader,
    /// The size of its serialized form: what it counts against the budget.
    bytes: usize,
}

impl StoredMeta {
    fn new(meta: &CacheMeta) -> Result<Self> {
        let (internal, header) = meta.serialize()?;
        Ok(StoredMeta {
            fresh_until: meta.fresh_until(),
            created: meta.created(),
            epoch: meta.epoch(),
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
            header: meta.response_header_copy(),
            bytes: internal.len() + header.len(),
        })
    }

    fn to_meta(&self) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until,
            self.created,
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            self.header.clone(),
        );
        // Age and freshness count from the epoch (the last revalidation), not from `created`.
        meta.set_epoch_override(self.epoch);
        if let Some(v) = self.variance {
            meta.set_variance_key(v);
        }
        meta
    }
}

/// Memory set aside for one fill in progress, sized by the response's Content-Length (or the
/// max object size when unknown). It travels in the `CacheMeta` extensions from the response
/// filter to the miss handler, and is given back when the last holder drops it.
#[derive(Clone)]
pub struct FillTicket {
    _reservation: Arc<Reservation>,
}

struct Reservation {
    bytes: usize,
    usage: Arc<Usage>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.usage.reserved_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

pub(super) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // No code panics while holding these locks; a poisoned one still holds consistent data.
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// A body as the chunks it arrived in, with the offset at which each starts.
#[derive(Default, Clone)]
pub(super) struct Chunks {
    chunks: Vec<Bytes>,
    starts: Vec<usize>,
    pub(super) len: usize,
}

impl Chunks {
    pub(super) fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.starts.push(self.len);
        self.len += b.len();
        self.chunks.push(b);
    }

    pub(super) fn pieces(&self) -> &[Bytes] {
        &self.chunks
    }

    /// The bytes from `pos` to the end of the chunk that holds `pos`, capped at `end`.
    pub(super) fn slice_from(&self, pos: usize, end: usize) -> Option<Bytes> {
        if pos >= end.min(self.len) {
            return None;
        }
        let i = match self.starts.binary_search(&pos) {
            Ok(i) => i,
            Err(i) => i - 1, // pos > starts[0] == 0, so i >= 1
        };
        let chunk = &self.chunks[i];
        let from = pos - self.starts[i];
        let to = (end - self.starts[i]).min(chunk.len());
        Some(chunk.slice(from..to))
    }
}

/// A complete cached object.
struct Object {
    /// The primary key as text (host, path and query), for purges by URL and prefix.
    primary: String,
    /// The key the eviction manager tracks it under.
    compact: CompactCacheKey,
    meta: Arc<StoredMeta>,
    body: Chunks,
    /// What the object counts against the budget: body plus serialized meta.
    weight: usize,
}

/// A complete object as a hit served without pingora reads it (`hit`): its stored header in
/// place, not cloned into a `CacheMeta` as pingora's hit path needs.
pub struct Stored(Arc<Object>);

impl Stored {
    pub fn header(&self) -> &ResponseHeader {
        &self.0.meta.header
    }

    /// As `CacheMeta::is_fresh`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.0.meta.fresh_until >= now
    }

    /// As `CacheMeta::age`: since the last revalidation.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.0.meta.epoch).unwrap_or_default()
    }

    pub fn fresh_until(&self) -> SystemTime {
        self.0.meta.fresh_until
    }

    pub fn has_variance(&self) -> bool {
        self.0.meta.variance.is_some()
    }

    /// The key the eviction manager tracks it under, and its weight there.
    pub fn eviction(&self) -> (&CompactCacheKey, usize) {
        (&self.0.compact, self.0.weight)
    }

    /// The body, as the chunks it was received in (shared, not copied).
    pub fn body(&self) -> impl Iterator<Item = &Bytes> {
        self.0.body.chunks.iter()
    }
}

/// How far a fill has come: what its readers wait on (both tiers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FillState {
    Writing(usize),
    Complete(usize),
    Failed,
}

/// A fill in progress, shared by its writer and its streaming readers.
struct Fill {
    primary: String,
    compact: CompactCacheKey,
    meta: Arc<StoredMeta>,
    body: RwLock<Chunks>,
    state: watch::Sender<FillState>,
}

/// Counts of what the storage holds, for metrics.
#[derive(Default)]
pub struct Usage {
    /// Bytes of complete objects (bodies and metadata).
    pub bytes: AtomicUsize,
    /// Bytes written so far by fills in progress.
    pub filling_bytes: AtomicUsize,
    /// Bytes reserved for fills in progress (at least `filling_bytes`).
    pub reserved_bytes: AtomicUsize,
    pub objects: AtomicUsize,
}

/// The production in-memory storage.
pub struct MemoryStorage {
    objects: RwLock<HashMap<HashBinary, Arc<Object>>>,
    fills: RwLock<HashMap<HashBinary, HashMap<u64, Arc<Fill>>>>,
    /// Objects larger than this are refused by the miss handler (pingora also checks it first).
    max_object_bytes: usize,
    /// What all fills in progress may reserve together.
    max_filling_bytes: usize,
    pub usage: Arc<Usage>,
}

impl MemoryStorage {
    pub fn new(max_object_bytes: usize, max_filling_bytes: usize) -> Self {
        MemoryStorage {
            objects: RwLock::new(HashMap::new()),
            fills: RwLock::new(HashMap::new()),
            max_object_bytes,
            max_filling_bytes,
            usage: Arc::new(Usage::default()),
        }
    }

    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    /// Reserves memory for a fill of up to `bytes`; `None` when the fills in progress already
    /// hold the whole fill budget (the response is then streamed through, not stored).
    pub fn reserve_fill(&self, bytes: usize) -> Option<FillTicket> {
        let bytes = bytes.min(self.max_object_bytes);
        self.usage
            .reserved_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= self.max_filling_bytes).then_some(held + bytes)
            })
            .ok()?;
        Some(FillTicket {
            _reservation: Arc::new(Reservation {
                bytes,
                usage: self.usage.clone(),
            }),
        })
    }

    /// Removes every object whose primary key `matches`; returns their eviction keys.
    pub fn purge_where(&self, matches: impl Fn(&str) -> bool) -> Vec<CompactCacheKey> {
        let mut objects = write(&self.objects);
        let doomed: Vec<HashBinary> = objects
            .iter()
            .filter(|(_, o)| matches(&o.primary))
            .map(|(k, _)| *k)
            .collect();
        let mut removed = Vec::with_capacity(doomed.len());
        for k in doomed {
            if let Some(o) = objects.remove(&k) {
                self.usage.bytes.fetch_sub(o.weight, Ordering::Relaxed);
                self.usage.objects.fetch_sub(1, Ordering::Relaxed);
                removed.push(o.compact.clone());
            }
        }
        removed
    }

    /// Removes a complete object; false when there was none.
    pub(super) fn remove(&self, key: &HashBinary) -> bool {
        match write(&self.objects).remove(key) {
            Some(old) => {
                self.usage.bytes.fetch_sub(old.weight, Ordering::Relaxed);
                self.usage.objects.fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Reads a complete object, from `pos` up to `end`.
struct CompleteHit {
    object: Arc<Object>,
    pos: usize,
    end: usize,
}

/// Streams a fill in progress; fails if the fill fails.
struct PartialHit {
    fill: Arc<Fill>,
    state: watch::Receiver<FillState>,
    pos: usize,
}

enum Hit {
    Complete(CompleteHit),
    Partial(PartialHit),
}

fn fill_failed() -> Box<Error> {
    Error::explain(
        ErrorType::InternalError,
        "the cache fill this response was streaming from failed; the body is incomplete",
    )
}

impl PartialHit {
    async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            let state = *self.state.borrow_and_update();
            let available = match state {
                FillState::Failed => return Err(fill_failed()),
                FillState::Writing(n) => n,
                FillState::Complete(n) if n == self.pos => return Ok(None),
                FillState::Complete(n) => n,
            };
            if available > self.pos {
                let chunk = read(&self.fill.body).slice_from(self.pos, available);
                if let Some(b) = chunk {
                    self.pos += b.len();
                    return Ok(Some(b));
                }
            }
            if self.state.changed().await.is_err() {
                // The writer is gone without marking the fill complete: never a clean end.
                return Err(fill_failed());
            }
        }
    }
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        match self {
            Hit::Complete(c) => {
                let b = c.object.body.slice_from(c.pos, c.end);
                if let Some(b) = &b {
                    c.pos += b.len();
                }
                Ok(b)
            }
            Hit::Partial(p) => p.next().await,
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        matches!(self, Hit::Complete(_))
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        match self {
            Hit::Complete(c) => {
                let len = c.object.body.len;
                if start >= len {
                    return Error::e_explain(ErrorType::InternalError, format!("seek start {start} >= length {len}"));
                }
                c.pos = start;
                c.end = end.map_or(len, |e| e.min(len));
                Ok(())
            }
            Hit::Partial(_) => Error::e_explain(ErrorType::InternalError, "seek while the object is still filling"),
        }
    }

    fn should_count_access(&self) -> bool {
        matches!(self, Hit::Complete(_))
    }

    fn get_eviction_weight(&self) -> usize {
        match self {
            Hit::Complete(c) => c.object.weight,
            Hit::Partial(_) => 0,
        }
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Writes one fill; dropping it without `finish` fails the fill.
struct Miss {
    storage: &'static MemoryStorage,
    key: HashBinary,
    id: U64WriteId,
    fill: Arc<Fill>,
    written: usize,
    done: bool,
    /// Held until the fill ends; `None` only for fills started outside the proxy (tests).
    _ticket: Option<FillTicket>,
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if self.written + data.len() > self.storage.max_object_bytes {
            return Error::e_explain(
                ErrorType::InternalError,
                format!(
                    "object exceeds the cache's max object size of {} bytes",
                    self.storage.max_object_bytes
                ),
            );
        }
        let n = data.len();
        write(&self.fill.body).push(data);
        self.written += n;
        self.storage.usage.filling_bytes.fetch_add(n, Ordering::Relaxed);
        self.fill.state.send_replace(if eof {
            FillState::Complete(self.written)
        } else {
            FillState::Writing(self.written)
        });
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        // Cloning the chunk list shares the chunks (reference counts), it copies no body bytes.
        let body = read(&self.fill.body).clone();
        let weight = body.len + self.fill.meta.bytes;
        let object = Arc::new(Object {
            primary: self.fill.primary.clone(),
            compact: self.fill.compact.clone(),
            meta: self.fill.meta.clone(),
            body,
            weight,
        });
        self.fill.state.send_replace(FillState::Complete(self.written));
        self.storage.remove(&self.key);
        write(&self.storage.objects).insert(self.key, object);
        self.storage.usage.bytes.fetch_add(weight, Ordering::Relaxed);
        self.storage.usage.objects.fetch_add(1, Ordering::Relaxed);
        self.done = true;
        Ok(MissFinishType::Created(weight))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(self.id.as_bytes())
    }
}

impl Drop for Miss {
    fn drop(&mut self) {
        if !self.done {
            self.fill.state.send_replace(FillState::Failed);
        }
        self.storage
            .usage
            .filling_bytes
            .fetch_sub(self.written, Ordering::Relaxed);
        let mut fills = write(&self.storage.fills);
        if let Some(m) = fills.get_mut(&self.key) {
            m.remove(&u64::from(self.id));
            if m.is_empty() {
                fills.remove(&self.key);
            }
        }
    }
}

fn partial(fill: &Arc<Fill>) -> (CacheMeta, HitHandler) {
    let meta = fill.meta.to_meta();
    let hit = Hit::Partial(PartialHit {
        fill: fill.clone(),
        state: fill.state.subscribe(),
        pos: 0,
    });
    (meta, Box::new(hit))
}

/// What the tiered storage asks of the memory tier. Nothing here blocks or does I/O.
impl MemoryStorage {
    /// A fill in progress for this key (any of them, if the lock let several start).
    pub(super) fn lookup_fill(&self, k: &HashBinary) -> Option<(CacheMeta, HitHandler)> {
        let fill = read(&self.fills).get(k).and_then(|m| m.values().next().cloned())?;
        Some(partial(&fill))
    }

    /// Whether the key has a complete object or a fill in progress.
    pub(super) fn holds(&self, k: &HashBinary) -> bool {
        read(&self.objects).contains_key(k) || read(&self.fills).contains_key(k)
    }

    /// The fill this request itself is writing.
    pub(super) fn lookup_fill_by_id(&self, k: &HashBinary, id: u64) -> Option<(CacheMeta, HitHandler)> {
        let fill = read(&self.fills).get(k).and_then(|m| m.get(&id).cloned())?;
        Some(partial(&fill))
    }

    /// A complete object, read in place (see `Stored`).
    pub(super) fn lookup_stored(&self, k: &HashBinary) -> Option<Stored> {
        read(&self.objects).get(k).cloned().map(Stored)
    }

    /// A complete object.
    pub(super) fn lookup_object(&self, k: &HashBinary) -> Option<(CacheMeta, HitHandler)> {
        let object = read(&self.objects).get(k).cloned()?;
        let meta = object.meta.to_meta();
        let end = object.body.len;
        Some((meta, Box::new(Hit::Complete(CompleteHit { object, pos: 0, end }))))
    }

    /// Starts a fill under `id` (unique across tiers); it draws on the `FillTicket` in the meta's
    /// extensions.
    pub(super) fn start_fill(&'static self, key: &CacheKey, meta: &CacheMeta, id: u64) -> Result<MissHandler> {
        let k = key.combined_bin();
        let (state, _) = watch::channel(FillState::Writing(0));
        let fill = Arc::new(Fill {
            primary: key.primary_key_str().unwrap_or_default().to_string(),
            compact: key.to_compact(),
            meta: Arc::new(StoredMeta::new(meta)?),
            body: RwLock::new(Chunks::default()),
            state,
        });
        write(&self.fills).entry(k).or_default().insert(id, fill.clone());
        Ok(Box::new(Miss {
            storage: self,
            key: k,
            id: id.into(),
            fill,
            written: 0,
            done: false,
            _ticket: meta.extensions().get::<FillTicket>().cloned(),
        }))
    }

    /// Stores a complete object read from another tier (a promotion). Returns its weight.
    pub(super) fn insert(&self, key: &CacheKey, meta: &CacheMeta, body: Chunks) -> Result<usize> {
        let meta = Arc::new(StoredMeta::new(meta)?);
        let weight = body.len + meta.bytes;
        let object = Arc::new(Object {
            primary: key.primary_key_str().unwrap_or_default().to_string(),
            compact: key.to_compact(),
            meta,
            body,
            weight,
        });
        let k = key.combined_bin();
        self.remove(&k);
        write(&self.objects).insert(k, object);
        self.usage.bytes.fetch_add(weight, Ordering::Relaxed);
        self.usage.objects.fetch_add(1, Ordering::Relaxed);
        Ok(weight)
    }

    /// Replaces a stored object's meta (after a revalidation); false when there is no object.
    pub(super) fn update_meta(&self, k: &HashBinary, meta: &CacheMeta) -> Result<bool> {
        let meta = Arc::new(StoredMeta::new(meta)?);
        let mut objects = write(&self.objects);
        let Some(old) = objects.get(k) else {
            return Ok(false);
        };
        let weight = old.body.len + meta.bytes;
        let replacement = Object {
            primary: old.primary.clone(),
            compact: old.compact.clone(),
            meta,
            body: old.body.clone(),
            weight,
        };
        let old_weight = old.weight;
        objects.insert(*k, Arc::new(replacement));
        self.usage.bytes.fetch_add(weight, Ordering::Relaxed);
        self.usage.bytes.fetch_sub(old_weight, Ordering::Relaxed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lookup(s: &MemoryStorage, key: &CacheKey) -> Option<(CacheMeta, HitHandler)> {
        let k = key.combined_bin();
        s.lookup_fill(&k).or_else(|| s.lookup_object(&k))
    }

    fn fill(s: &'static MemoryStorage, key: &CacheKey, meta: &CacheMeta) -> MissHandler {
        s.start_fill(key, meta, super::super::tiered::next_fill_id()).unwrap()
    }

    fn storage() -> &'static MemoryStorage {
        Box::leak(Box::new(MemoryStorage::new(1 << 20, 1 << 20)))
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).unwrap();
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    async fn read_all(hit: &mut HitHandler) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = hit.read_body().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_finished_fill_becomes_an_object_and_is_counted() {
        let s = storage();
        let key = CacheKey::new("host/a", "");
        assert!(lookup(s, &key).is_none());
        let mut miss = fill(s, &key, &meta());
        miss.write_body(Bytes::from_static(b"hello "), false).await.unwrap();
        miss.write_body(Bytes::from_static(b"world"), true).await.unwrap();
        let MissFinishType::Created(weight) = miss.finish().await.unwrap() else {
            panic!("expected Created")
        };
        assert!(weight > 11);
        assert_eq!(s.usage.bytes.load(Ordering::Relaxed), weight);
        assert_eq!(s.usage.filling_bytes.load(Ordering::Relaxed), 0);
        let (_, mut hit) = lookup(s, &key).unwrap();
        assert!(hit.can_seek());
        assert_eq!(read_all(&mut hit).await.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn seek_serves_any_range_across_chunks() {
        let s = storage();
        let key = CacheKey::new("host/r", "");
        let mut miss = fill(s, &key, &meta());
        for part in ["0123", "4567", "89"] {
            miss.write_body(Bytes::from(part), false).await.unwrap();
        }
        miss.finish().await.unwrap();
        for (start, end, want) in [
            (0, Some(10), "0123456789"),
            (3, Some(6), "345"),
            (7, None, "789"),
            (9, Some(99), "9"),
        ] {
            let (_, mut hit) = lookup(s, &key).unwrap();
            hit.seek(start, end).unwrap();
            assert_eq!(read_all(&mut hit).await.unwrap(), want.as_bytes(), "{start}..{end:?}");
        }
        let (_, mut hit) = lookup(s, &key).unwrap();
        assert!(hit.seek(10, None).is_err());
    }

    #[tokio::test]
    async fn readers_stream_a_fill_while_it_is_written() {
        let s = storage();
        let key = CacheKey::new("host/big", "");
        let mut miss = fill(s, &key, &meta());
        miss.write_body(Bytes::from_static(b"first"), false).await.unwrap();
        let (_, mut hit) = lookup(s, &key).unwrap();
        assert!(!hit.can_seek());
        // The first bytes arrive before the fill ends.
        assert_eq!(hit.read_body().await.unwrap().unwrap(), Bytes::from_static(b"first"));
        let reader = tokio::spawn(async move { read_all(&mut hit).await });
        miss.write_body(Bytes::from_static(b"second"), true).await.unwrap();
        miss.finish().await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b"second");
    }

    #[tokio::test]
    async fn an_abandoned_fill_fails_its_readers_and_stores_nothing() {
        let s = storage();
        let key = CacheKey::new("host/aborted", "");
        let mut miss = fill(s, &key, &meta());
        miss.write_body(Bytes::from_static(b"partial"), false).await.unwrap();
        let (_, mut hit) = lookup(s, &key).unwrap();
        drop(miss); // the origin went away mid-body
        assert!(
            read_all(&mut hit).await.is_err(),
            "a failed fill must not read as a clean end"
        );
        assert!(lookup(s, &key).is_none());
        assert_eq!(s.usage.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(s.usage.filling_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn objects_over_the_max_size_are_refused() {
        let s: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(8, 8)));
        let key = CacheKey::new("host/huge", "");
        let mut miss = fill(s, &key, &meta());
        miss.write_body(Bytes::from_static(b"12345678"), false).await.unwrap();
        assert!(miss.write_body(Bytes::from_static(b"9"), true).await.is_err());
        drop(miss);
        assert!(lookup(s, &key).is_none());
    }

    #[tokio::test]
    async fn purge_where_matches_primary_keys() {
        let s = storage();
        for k in ["h/fw/a.bin", "h/fw/b.bin", "h/other"] {
            let mut miss = fill(s, &CacheKey::new(k, ""), &meta());
            miss.write_body(Bytes::from_static(b"x"), true).await.unwrap();
            miss.finish().await.unwrap();
        }
        assert_eq!(s.purge_where(|p| p.starts_with("h/fw/")).len(), 2);
        assert!(lookup(s, &CacheKey::new("h/fw/a.bin", ""))
            .is_none());
        assert!(lookup(s, &CacheKey::new("h/other", "")).is_some());
        assert_eq!(s.usage.objects.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn purge_removes_the_object_and_its_bytes() {
        let s = storage();
        let key = CacheKey::new("host/p", "");
        let mut miss = fill(s, &key, &meta());
        miss.write_body(Bytes::from_static(b"x"), true).await.unwrap();
        miss.finish().await.unwrap();
        // A reader that started before the purge keeps its copy alive and complete.
        let (_, mut hit) = lookup(s, &key).unwrap();
        assert!(s.remove(&key.combined_bin()));
        assert_eq!(s.usage.bytes.load(Ordering::Relaxed), 0);
        assert!(lookup(s, &key).is_none());
        assert_eq!(read_all(&mut hit).await.unwrap(), b"x");
        assert!(!s.remove(&key.combined_bin()));
    }

    #[tokio::test]
    async fn fills_draw_on_a_bounded_reservation_given_back_when_they_end() {
        let s: &'static MemoryStorage = Box::leak(Box::new(MemoryStorage::new(100, 150)));
        let a = s.reserve_fill(100).unwrap();
        assert!(s.reserve_fill(60).is_none(), "100 + 60 is over the fill budget of 150");
        let b = s.reserve_fill(1000).map(|_| ()); // capped at the max object size: 100 + 100 > 150
        assert!(b.is_none());
        let mut m = meta();
        m.extensions_mut().insert(a);
        let mut miss = fill(s, &CacheKey::new("h/r", ""), &m);
        drop(m); // the response is done; the fill still holds the reservation
        assert!(s.reserve_fill(60).is_none());
        miss.write_body(Bytes::from_static(b"x"), true).await.unwrap();
        miss.finish().await.unwrap();
        assert_eq!(s.usage.reserved_bytes.load(Ordering::Relaxed), 0);
        assert!(s.reserve_fill(60).is_some());
    }

    #[tokio::test]
    async fn hits_rebuild_the_stored_meta_exactly() {
        let s = storage();
        let key = CacheKey::new("h/meta", "");
        let now = SystemTime::now();
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.append_header("etag", "\"v1\"").unwrap();
        let mut m = CacheMeta::new(
            now + Duration::from_secs(60),
            now - Duration::from_secs(30),
            7,
            9,
            header,
        );
        m.set_variance_key(*b"0123456789abcdef");
        m.update_freshness(now + Duration::from_secs(90), 7, 9); // a revalidation: the epoch moves
        let mut miss = fill(s, &key, &m);
        miss.write_body(Bytes::from_static(b"x"), true).await.unwrap();
        miss.finish().await.unwrap();
        let (hit, _) = lookup(s, &key).unwrap();
        assert_eq!(hit.fresh_until(), m.fresh_until());
        assert_eq!(hit.created(), m.created());
        assert_eq!(hit.epoch(), m.epoch());
        assert!(hit.age() < Duration::from_secs(5), "age counts from the revalidation");
        assert_eq!((hit.stale_while_revalidate_sec(), hit.stale_if_error_sec()), (7, 9));
        assert_eq!(hit.variance(), m.variance());
        assert_eq!(hit.headers().get("etag").unwrap(), "\"v1\"");
    }
}
