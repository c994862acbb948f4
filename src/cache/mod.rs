//! The shared cache. `storage` holds objects in memory under a byte budget and lets readers
//! stream a fill while it is written. Wiring into the proxy (keys, freshness, coalescing,
//! ranges, purge, metrics) is issue 3's work in progress.

pub mod storage;
