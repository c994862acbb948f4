//! The storage pingora sees: the memory tier in front of the disk tier. A lookup asks memory,
//! then disk; a fill writes to both (memory only when the object fits its budget); a small
//! object read whole from disk is promoted into memory. Eviction from memory (pingora's LRU)
//! leaves the disk copy; a purge removes both.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::Result;
use pingora_cache::eviction::{lru, CacheEntryKey, EvictionManager};
use pingora_cache::key::CacheHashKey;
use pingora_cache::storage::{
    streaming_write::U64WriteId, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType, Storage,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};

use super::disk::{DiskFill, DiskStorage};
use super::memory::{FillTicket, MemoryStorage};
use super::LRU_SHARDS;
use crate::metrics;
use crate::reason::Tier;

/// Set by the response filter when the disk tier will take this fill, with its length if known.
#[derive(Clone, Copy, Debug)]
pub struct DiskPlan {
    pub length: Option<u64>,
}

pub struct Tiered {
    pub memory: &'static MemoryStorage,
    pub disk: Option<&'static DiskStorage>,
    /// The memory tier's LRU, which promotions enter.
    pub memory_eviction: &'static lru::Manager<LRU_SHARDS>,
    /// Objects larger than this stay on disk only.
    pub memory_max_object: usize,
}

/// Fill ids, unique across both tiers: a request reads back the fill it writes by this id.
static FILL_IDS: AtomicU64 = AtomicU64::new(1);

pub fn next_fill_id() -> u64 {
    FILL_IDS.fetch_add(1, Ordering::Relaxed)
}

impl Tiered {
    /// Puts an object read whole from disk into memory, within the memory tier's LRU.
    fn promote(&'static self, key: &CacheKey, meta: &CacheMeta, body: super::memory::Chunks) {
        let Ok(weight) = self.memory.insert(key, meta, body) else {
            return;
        };
        let entry = CacheEntryKey::key_only(key.to_compact());
        for evicted in self.memory_eviction.admit(entry, weight, meta.fresh_until()) {
            if self.memory.remove(&evicted.into_key().combined_bin()) {
                metrics::count_eviction(Tier::Memory);
            }
        }
    }
}

#[async_trait]
impl Storage for Tiered {
    async fn lookup(&'static self, key: &CacheKey, _trace: &SpanHandle) -> Result<Option<(CacheMeta, HitHandler)>> {
        let k = key.combined_bin();
        // A fill in progress wins over a stored (possibly stale) object, so that a refresh is
        // visible as soon as it starts. A fill with a disk part is read there.
        if let Some(fill) = self.disk.and_then(|d| d.lookup_fill(key, None)) {
            return Ok(Some(fill));
        }
        if let Some(fill) = self.memory.lookup_fill(&k) {
            return Ok(Some(fill));
        }
        let hit = self.memory.lookup_object(&k);
        metrics::count_tier_lookup(Tier::Memory, hit.is_some());
        if hit.is_some() {
            return Ok(hit);
        }
        let Some(disk) = self.disk else { return Ok(None) };
        let promote = |len: u64, meta: &CacheMeta| -> Option<super::disk::Promote> {
            if len as usize > self.memory_max_object {
                return None;
            }
            let (internal, header) = meta.serialize().ok()?;
            let key = key.clone();
            Some(Box::new(move |body| {
                if let Ok(meta) = CacheMeta::deserialize(&internal, &header) {
                    self.promote(&key, &meta, body);
                }
            }))
        };
        let hit = disk.lookup_object(key, promote).await;
        metrics::count_tier_lookup(Tier::Disk, hit.is_some());
        Ok(hit)
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(id) = tag.and_then(|t| U64WriteId::try_from(t).ok()).map(u64::from) else {
            return self.lookup(key, trace).await;
        };
        let fill = self
            .disk
            .and_then(|d| d.lookup_fill(key, Some(id)))
            .or_else(|| self.memory.lookup_fill_by_id(&key.combined_bin(), id));
        Ok(fill)
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let id = next_fill_id();
        let plan = meta.extensions().get::<DiskPlan>().copied();
        let disk = match (self.disk, plan) {
            (Some(d), Some(plan)) => Some(d.start_fill(key, meta, plan.length, id).await?),
            _ => None,
        };
        // Without a disk part the memory part is what readers read, so it is always made then
        // (the response filter reserved its memory, or decided not to cache).
        let memory = if disk.is_none() || meta.extensions().get::<FillTicket>().is_some() {
            Some(self.memory.start_fill(key, meta, id)?)
        } else {
            None
        };
        Ok(Box::new(TieredMiss {
            storage: self,
            key: key.combined_bin(),
            tag: id.into(),
            memory,
            disk,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        kind: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let compact = target.key();
        let k = compact.combined_bin();
        let mut found = self.memory.remove(&k);
        match kind {
            // pingora's LRU evicts from memory; the disk keeps its copy.
            PurgeType::Eviction => {
                if found {
                    metrics::count_eviction(Tier::Memory);
                }
            }
            PurgeType::Invalidation => {
                if let Some(d) = self.disk {
                    found |= d.remove_hash(k).await;
                }
            }
        }
        Ok(if found {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(&'static self, key: &CacheKey, meta: &CacheMeta, _trace: &SpanHandle) -> Result<bool> {
        let in_memory = self.memory.update_meta(&key.combined_bin(), meta)?;
        let on_disk = match self.disk {
            Some(d) => d.update_meta(key, meta).await,
            None => false,
        };
        Ok(in_memory || on_disk)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// One fill, written to each tier that takes it. With a disk part, its readers read the disk
/// part, and the memory part is only a copy being made: if it fails (the object outgrew the
/// memory tier), it is dropped and nothing else changes.
struct TieredMiss {
    storage: &'static Tiered,
    key: pingora_cache::key::HashBinary,
    tag: U64WriteId,
    memory: Option<MissHandler>,
    disk: Option<DiskFill>,
}

#[async_trait]
impl HandleMiss for TieredMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if let Some(m) = &mut self.memory {
            let written = m.write_body(data.clone(), eof).await;
            if written.is_err() && self.disk.is_some() {
                self.memory = None;
            } else {
                written?;
            }
        }
        if let Some(d) = &mut self.disk {
            d.write_body(data, eof).await;
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        let TieredMiss {
            storage,
            key,
            memory,
            disk,
            ..
        } = *self;
        let weight = match memory {
            Some(m) => match m.finish().await {
                Ok(MissFinishType::Created(w)) => w,
                Ok(other) => return Ok(other),
                Err(e) if disk.is_none() => return Err(e),
                Err(_) => 0,
            },
            None => 0,
        };
        if let Some(d) = disk {
            if d.finish().await > 0 && weight == 0 {
                // A new version on disk only: an older one in memory must not shadow it.
                storage.memory.remove(&key);
            }
        }
        // The memory tier's LRU counts only what memory holds.
        Ok(MissFinishType::Created(weight))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(self.tag.as_bytes())
    }
}
