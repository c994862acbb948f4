//! The disk tier: objects larger than memory and objects that must survive a restart. It owns
//! the cache directory: fills streamed to a locked temporary file and renamed into place when
//! complete, hits read in checksummed blocks with seeks, the index rebuilt in the background at
//! start, eviction for the byte budget and the filesystem's free space, and the I/O pool all of
//! this runs on (never on the proxy's async workers).
//!
//! Failure is never the request's: a filesystem error is logged and counted, the response is
//! served from the origin (or memory), and the disk is left alone for a while.
//!
//! Layout: `objects/<2 hex>/<32 hex>.{body,meta}` (see `format`), `tmp/` for fills in progress.

mod format;
mod index;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::{Error, ErrorType, Result};
use pingora_cache::key::{str2hex, CacheHashKey, HashBinary};
use pingora_cache::storage::{HandleHit, HitHandler, Storage};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta};
use tokio::runtime::Handle;
use tokio::sync::watch;

use super::memory::{read, write, Chunks, FillState};
use crate::metrics;
use crate::reason::{Corrupt, DiskOp, DiskSkip, Tier};
use format::{FillId, BLOCK, BODY_HEADER};
use index::{nanos, Index};

/// The disk tier's configuration, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub path: PathBuf,
    /// Body and meta bytes of every object on disk.
    pub max_bytes: u64,
    pub max_object_bytes: u64,
    /// Fills evict older objects, or are not written, to leave this much free on the filesystem.
    pub min_free_bytes: u64,
    /// Threads of the I/O pool: how many disk operations run at once.
    pub io_threads: usize,
}

/// How long the disk is left alone after a write fails.
const DEGRADED_FOR: Duration = Duration::from_secs(30);
/// A fill whose disk write failed goes on streaming to its readers from memory; a reader more
/// than this far behind the origin is cut off, so that memory stays bounded.
const RELAY_WINDOW: usize = 64 << 20;
/// Files without their partner younger than this may be a commit in progress (another process
/// sharing the directory), and are left to it.
const ORPHAN_AGE: Duration = Duration::from_secs(60);

pub struct DiskStorage {
    objects: PathBuf,
    tmp: PathBuf,
    settings: Settings,
    pool: Handle,
    index: Index,
    fills: RwLock<HashMap<HashBinary, HashMap<u64, Arc<Fill>>>>,
    loaded: watch::Sender<bool>,
    /// Until when (ns since the epoch) new fills skip the disk after an error.
    degraded_until: AtomicU64,
    fill_counter: AtomicU64,
    /// Whether `RWF_NOWAIT` reads work on this filesystem.
    nowait: AtomicBool,
    /// The filesystem's free bytes when last measured (on the pool).
    free: AtomicU64,
}

fn hex(k: &HashBinary) -> String {
    use std::fmt::Write;
    k.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}"); // a String cannot fail
        s
    })
}

fn now() -> u64 {
    nanos(SystemTime::now())
}

impl DiskStorage {
    /// Opens (creating it if needed) the cache directory and starts the loader. A directory that
    /// cannot be written is not fatal: the edge serves from the origin and counts the errors.
    pub fn open(settings: Settings) -> io::Result<&'static DiskStorage> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(settings.io_threads.max(1))
            .thread_name("cache-disk")
            .build()?;
        let pool = runtime.handle().clone();
        Box::leak(Box::new(runtime)); // the pool lives as long as the process
        let (loaded, _) = watch::channel(false);
        let disk: &'static DiskStorage = Box::leak(Box::new(DiskStorage {
            objects: settings.path.join("objects"),
            tmp: settings.path.join("tmp"),
            settings,
            pool,
            index: Index::default(),
            fills: RwLock::new(HashMap::new()),
            loaded,
            degraded_until: AtomicU64::new(0),
            fill_counter: AtomicU64::new(0),
            nowait: AtomicBool::new(true),
            free: AtomicU64::new(u64::MAX),
        }));
        metrics::CACHE_DISK_BUDGET.set(i64::try_from(disk.settings.max_bytes).unwrap_or(i64::MAX));
        for dir in [&disk.objects, &disk.tmp] {
            if let Err(e) = fs::create_dir_all(dir) {
                disk.fault(DiskOp::Create, dir, &e);
            }
        }
        metrics::CACHE_DISK_LOADING.set(1);
        disk.pool.spawn_blocking(move || disk.load());
        Ok(disk)
    }

    pub fn max_object_bytes(&self) -> u64 {
        self.settings.max_object_bytes
    }

    /// Runs blocking filesystem work on the I/O pool.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
        self.pool
            .spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    fn paths(&self, k: &HashBinary) -> (PathBuf, PathBuf) {
        let h = hex(k);
        let dir = self.objects.join(&h[..2]);
        (dir.join(format!("{h}.meta")), dir.join(format!("{h}.body")))
    }

    /// Logs and counts a filesystem failure. A failed write or create leaves the disk alone for
    /// a while, so that a full or failing disk is not retried by every request.
    fn fault(&self, op: DiskOp, path: &Path, e: &io::Error) {
        log::warn!(
            "cache disk: {} {} failed: {e}; serving without the disk tier",
            op.as_str(),
            path.display()
        );
        metrics::CACHE_DISK_ERRORS.with_label_values(&[op.as_str()]).inc();
        if matches!(op, DiskOp::Create | DiskOp::Write | DiskOp::Commit) {
            self.degraded_until
                .store(now() + DEGRADED_FOR.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Removes a corrupt object, and counts it.
    fn corrupt(&'static self, k: HashBinary, why: Corrupt) {
        let (meta, _) = self.paths(&k);
        log::warn!(
            "cache disk: {} is corrupt ({}); removed, served as a miss",
            meta.display(),
            why.as_str()
        );
        metrics::CACHE_DISK_CORRUPT.with_label_values(&[why.as_str()]).inc();
        self.index.remove(&k);
        self.pool.spawn_blocking(move || self.remove_files(&[k]));
    }

    /// Deletes objects' files (meta first: from then on a lookup misses).
    fn remove_files(&self, keys: &[HashBinary]) {
        for k in keys {
            let (meta, body) = self.paths(k);
            for p in [meta, body] {
                match fs::remove_file(&p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => self.fault(DiskOp::Remove, &p, &e),
                    _ => {}
                }
            }
        }
    }

    /// Evicts the least recently used objects down to the budget, plus `at_least` bytes.
    fn evict(&'static self, limit: u64, at_least: u64) -> Vec<HashBinary> {
        let evicted = self.index.evict(limit, at_least);
        for _ in &evicted {
            metrics::count_eviction(Tier::Disk);
        }
        evicted
    }

    /// Whether a fill of about `length` bytes can be written: makes room by eviction, for the
    /// budget and for the filesystem's minimum free space.
    /// The whole of it runs on the pool: statvfs and unlink can block.
    async fn make_room(&'static self, length: u64) -> std::result::Result<(), DiskSkip> {
        let room = self.blocking(move || {
            let evicted = self.evict(self.settings.max_bytes.saturating_sub(length), 0);
            self.remove_files(&evicted);
            let need = self.settings.min_free_bytes + length;
            let short = need.saturating_sub(self.measure_free());
            if short > 0 {
                // The files go before the fill writes, so that their space is free.
                let evicted = self.evict(u64::MAX, short);
                self.remove_files(&evicted);
                return Ok(self.measure_free() >= need);
            }
            Ok(true)
        });
        match room.await {
            Ok(true) => Ok(()),
            _ => Err(DiskSkip::NoSpace),
        }
    }

    /// Measures the filesystem's free bytes (blocking), and keeps the figure for `accepts`.
    fn measure_free(&self) -> u64 {
        let free = free_bytes(&self.tmp).unwrap_or(u64::MAX);
        self.free.store(free, Ordering::Relaxed);
        free
    }

    fn new_fill_id(&self) -> FillId {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&std::process::id().to_le_bytes());
        id[4..12].copy_from_slice(&now().to_le_bytes());
        let n = self.fill_counter.fetch_add(1, Ordering::Relaxed) as u32;
        id[12..].copy_from_slice(&n.to_le_bytes());
        id
    }

    /// A complete object, or `None` (a miss) when there is none, it is torn or corrupt (then it
    /// is removed), or the filesystem fails. `promote` may ask for the body once it has been
    /// read whole (given its length and meta).
    pub(in crate::cache) async fn lookup_object(
        &'static self,
        key: &CacheKey,
        promote: impl FnOnce(u64, &CacheMeta) -> Option<Promote>,
    ) -> Option<(CacheMeta, HitHandler)> {
        let k = key.combined_bin();
        let persist = self.index.touch(&k, now());
        let (meta_path, body_path) = self.paths(&k);
        let opened = self
            .blocking(move || open_object(&meta_path, &body_path, persist, true))
            .await;
        let (rec, body, first) = match opened {
            Ok(Opened::Found(rec, body, first)) => (rec, body, first),
            Ok(Opened::Missing) => {
                self.index.remove(&k);
                return None;
            }
            Ok(Opened::Mismatched) => return None, // a commit in progress
            Ok(Opened::Corrupt(why)) => {
                self.corrupt(k, why);
                return None;
            }
            Err(e) => {
                self.fault(DiskOp::Read, &self.paths(&k).0, &e);
                return None;
            }
        };
        let Ok(meta) = CacheMeta::deserialize(&rec.internal, &rec.header) else {
            self.corrupt(k, Corrupt::Fields);
            return None;
        };
        let len = rec.body_len as usize;
        let promote = promote(rec.body_len, &meta).map(|p| (Chunks::default(), p));
        let hit = DiskHit {
            storage: self,
            key: k,
            body: Arc::new(body),
            crcs: rec.crcs.into(),
            len,
            pos: 0,
            end: len,
            ahead: first.map(|b| (0, Ahead::Ready(b))),
            spare: None,
            cold: false,
            advised: 0,
            promote,
        };
        Some((meta, Box::new(hit)))
    }

    /// Whether the key has an object on disk or a fill in progress.
    pub fn holds(&self, k: &HashBinary) -> bool {
        self.index.contains(k) || read(&self.fills).contains_key(k)
    }

    /// A fill in progress for this key, or the one with this id.
    pub fn lookup_fill(&'static self, key: &CacheKey, id: Option<u64>) -> Option<(CacheMeta, HitHandler)> {
        let k = key.combined_bin();
        let fill = {
            let fills = read(&self.fills);
            let m = fills.get(&k)?;
            match id {
                Some(id) => m.get(&id).cloned(),
                None => m.values().next().cloned(),
            }
        }?;
        let meta = CacheMeta::deserialize(&fill.meta.0, &fill.meta.1).ok()?;
        let state = fill.state.subscribe();
        Some((
            meta,
            Box::new(FillReader {
                storage: self,
                fill,
                state,
                pos: 0,
            }),
        ))
    }

    /// Whether a fill of `length` bytes (unknown: one block) could be written, after eviction.
    /// Cheap, synchronous and without I/O, for the response filter: a response the disk would not take is
    /// streamed to its client directly rather than through a fill.
    pub fn accepts(&self, length: Option<u64>) -> std::result::Result<(), DiskSkip> {
        let length = length.unwrap_or(BLOCK as u64);
        let skip = if now() < self.degraded_until.load(Ordering::Relaxed) {
            Some(DiskSkip::Degraded)
        } else if length > self.settings.max_object_bytes {
            Some(DiskSkip::TooLarge)
        } else {
            // The free space as the last fill (or the loader) measured it: no syscall here.
            let (held, _) = self.index.usage();
            let free = self.free.load(Ordering::Relaxed);
            (free.saturating_add(held) < self.settings.min_free_bytes + length).then_some(DiskSkip::NoSpace)
        };
        match skip {
            Some(s) => {
                metrics::CACHE_DISK_SKIPPED.with_label_values(&[s.as_str()]).inc();
                Err(s)
            }
            None => Ok(()),
        }
    }

    /// Starts a fill under `id`; its readers read it here. The body goes to a temporary file
    /// when the disk has room; otherwise, or when the disk fails later, it is only relayed to
    /// the readers from memory.
    pub async fn start_fill(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        length: Option<u64>,
        id: u64,
    ) -> Result<DiskFill> {
        let serialized = meta.serialize()?;
        let k = key.combined_bin();
        let fill_id = self.new_fill_id();
        // `accepts` said yes moments ago; room is made now (eviction waits for its files).
        let writer = match self.make_room(length.unwrap_or(BLOCK as u64)).await {
            Ok(()) => {
                let temp = self.tmp.join(format!("{}.{}.body", hex(&k), hex(&fill_id)));
                let path = temp.clone();
                match self.blocking(move || create_temp(&path, &fill_id)).await {
                    Ok(file) => Some(Writer {
                        file: Arc::new(file),
                        temp,
                        sums: format::BlockSums::default(),
                        written: 0,
                    }),
                    Err(e) => {
                        self.fault(DiskOp::Create, &temp, &e);
                        None
                    }
                }
            }
            Err(skip) => {
                metrics::CACHE_DISK_SKIPPED.with_label_values(&[skip.as_str()]).inc();
                None
            }
        };
        let (state, _) = watch::channel(FillState::Writing(0));
        let fill = Arc::new(Fill {
            meta: serialized,
            file: writer.as_ref().map(|w| w.file.clone()),
            state,
            tail: RwLock::new(Tail::default()),
        });
        write(&self.fills).entry(k).or_default().insert(id, fill.clone());
        Ok(DiskFill {
            storage: self,
            key: k,
            primary: key.primary_key_str().unwrap_or_default().into(),
            id,
            fill_id,
            fill,
            writer,
            received: 0,
            unflushed: 0,
            done: false,
        })
    }

    /// Replaces a stored object's meta (after a revalidation) with one rename; false when there
    /// is no object or the disk fails (then the next request revalidates again).
    pub async fn update_meta(&'static self, key: &CacheKey, meta: &CacheMeta) -> bool {
        let Ok((internal, header)) = meta.serialize() else {
            return false;
        };
        let k = key.combined_bin();
        let (path, _) = self.paths(&k);
        let t = self.tmp.join(format!("{}.{}.meta", hex(&k), hex(&self.new_fill_id())));
        let p = path.clone();
        let result = self
            .blocking(move || {
                let old = match fs::read(&p) {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                };
                let Ok(mut rec) = format::Meta::decode(&old) else {
                    return Ok(false);
                };
                rec.internal = internal;
                rec.header = header;
                let written = fs::write(&t, rec.encode()).and_then(|()| fs::rename(&t, &p));
                if written.is_err() {
                    let _ = fs::remove_file(&t);
                }
                written.map(|()| true)
            })
            .await;
        result.unwrap_or_else(|e| {
            self.fault(DiskOp::Commit, &path, &e);
            false
        })
    }

    /// Removes one object; true when it was there.
    pub async fn remove_hash(&'static self, k: HashBinary) -> bool {
        let known = self.index.remove(&k).is_some();
        let (meta, _) = self.paths(&k);
        let existed = self
            .blocking(move || {
                let existed = meta.exists();
                self.remove_files(&[k]);
                Ok(existed)
            })
            .await
            .unwrap_or(false);
        known || existed
    }

    /// Removes every object whose primary key `matches`, once the index is loaded (so that the
    /// loader cannot bring a purged object back). Returns how many.
    pub async fn purge_where(&'static self, matches: impl Fn(&str) -> bool) -> usize {
        let mut loaded = self.loaded.subscribe();
        let _ = loaded.wait_for(|done| *done).await;
        let doomed = self.index.remove_where(matches);
        let n = doomed.len();
        let _ = self
            .blocking(move || {
                self.remove_files(&doomed);
                Ok(())
            })
            .await;
        n
    }

    /// Bytes and objects on disk, as the index knows them.
    pub fn usage(&self) -> (u64, usize) {
        self.index.usage()
    }

    /// Waits until the loader has rebuilt the index.
    pub async fn loaded(&self) {
        let mut loaded = self.loaded.subscribe();
        let _ = loaded.wait_for(|done| *done).await;
    }

    /// Rebuilds the index from the directory (on the I/O pool, while the edge serves: a lookup
    /// opens an object's files by name and does not need the index). Removes the temporary files
    /// of fills that died with their process, and torn or corrupt objects.
    fn load(&'static self) {
        let started = Instant::now();
        self.measure_free();
        let mut stale_temps = 0;
        if let Ok(entries) = fs::read_dir(&self.tmp) {
            for e in entries.flatten() {
                let p = e.path();
                // A live fill holds a lock on its body file; a dead one's lock died with it. A
                // meta is written just before its commit: only an old one is left over.
                let dead = match p.extension().and_then(|x| x.to_str()) {
                    Some("body") => File::open(&p).is_ok_and(|f| f.try_lock().is_ok()),
                    _ => age(&p) > ORPHAN_AGE,
                };
                if dead && fs::remove_file(&p).is_ok() {
                    stale_temps += 1;
                }
            }
        }
        let mut found = Vec::new();
        match fs::read_dir(&self.objects) {
            Ok(dirs) => {
                for dir in dirs.flatten() {
                    let Ok(files) = fs::read_dir(dir.path()) else { continue };
                    for f in files.flatten() {
                        self.load_file(&f.path(), &mut found);
                    }
                }
            }
            Err(e) => self.fault(DiskOp::Load, &self.objects, &e),
        }
        // Older first, so that the index's order is the order of last use.
        found.sort_by_key(|(_, _, _, access)| *access);
        let mut loaded = 0;
        for (k, primary, bytes, access) in found {
            loaded += usize::from(self.index.insert_loaded(k, primary, bytes, access));
        }
        let evicted = self.evict(self.settings.max_bytes, 0);
        self.remove_files(&evicted);
        let (bytes, _) = self.index.usage();
        log::info!(
            "cache disk: {loaded} objects ({bytes} bytes) loaded from {} in {} ms; {stale_temps} unfinished fills removed",
            self.settings.path.display(),
            started.elapsed().as_millis()
        );
        metrics::CACHE_DISK_LOADING.set(0);
        self.loaded.send_replace(true);
    }

    fn load_file(&'static self, path: &Path, found: &mut Vec<(HashBinary, Box<str>, u64, u64)>) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some((stem, ext)) = name.split_once('.') else {
            return;
        };
        let Some(k) = str2hex(stem) else { return };
        let meta_path = path.with_extension("meta");
        let body_path = path.with_extension("body");
        match ext {
            "meta" => match open_object(&meta_path, &body_path, false, false) {
                Ok(Opened::Found(rec, body, _)) => {
                    let meta_len = fs::metadata(&meta_path).map_or(0, |m| m.len());
                    let body_len = body.metadata().map_or(0, |m| m.len());
                    let access = fs::metadata(&meta_path).and_then(|m| m.modified()).map_or(0, nanos);
                    found.push((k, rec.primary.into(), meta_len + body_len, access));
                }
                Ok(Opened::Corrupt(why)) => {
                    metrics::CACHE_DISK_CORRUPT.with_label_values(&[why.as_str()]).inc();
                    log::warn!(
                        "cache disk: {} is corrupt ({}); removed",
                        meta_path.display(),
                        why.as_str()
                    );
                    self.remove_files(&[k]);
                }
                Ok(Opened::Missing | Opened::Mismatched) if age(&meta_path) > ORPHAN_AGE => self.remove_files(&[k]),
                Ok(_) => {}
                Err(e) => self.fault(DiskOp::Load, path, &e),
            },
            // A body with no meta: a commit that never finished.
            "body" if !meta_path.exists() && age(&body_path) > ORPHAN_AGE => {
                let _ = fs::remove_file(&body_path);
            }
            _ => {}
        }
    }
}

/// How long ago a file was last modified (zero when unknown).
fn age(p: &Path) -> Duration {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default()
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let s = nix::sys::statvfs::statvfs(path).ok()?;
        Some(s.blocks_available() as u64 * s.fragment_size() as u64)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Creates a fill's temporary file, locked for as long as this process holds it, with its body
/// header.
fn create_temp(path: &Path, id: &FillId) -> io::Result<File> {
    let file = File::options().read(true).write(true).create_new(true).open(path)?;
    file.try_lock().map_err(io::Error::other)?;
    file.write_all_at(&format::body_header(id), 0)?;
    Ok(file)
}

enum Opened {
    /// With the first block, checked, when asked for.
    Found(format::Meta, File, Option<Bytes>),
    Missing,
    /// The body belongs to another fill than the meta: a commit in progress, or one that died
    /// between its two renames.
    Mismatched,
    Corrupt(Corrupt),
}

/// Opens an object's two files and checks that they belong together and are whole. With
/// `touch`, records the access in the meta file's mtime (the persisted LRU order). With
/// `first_block`, also reads and checks the body's first block, so that a corrupt small object
/// is a miss before anything is sent (and a hit's first read costs no second trip to the pool).
fn open_object(meta_path: &Path, body_path: &Path, touch: bool, first_block: bool) -> io::Result<Opened> {
    let not_found = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            Ok(Opened::Missing)
        } else {
            Err(e)
        }
    };
    let meta_file = match File::open(meta_path) {
        Ok(f) => f,
        Err(e) => return not_found(e),
    };
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut &meta_file, &mut buf)?;
    let rec = match format::Meta::decode(&buf) {
        Ok(r) => r,
        Err(why) => return Ok(Opened::Corrupt(why)),
    };
    if touch {
        let _ = meta_file.set_modified(SystemTime::now());
    }
    let body = match File::open(body_path) {
        Ok(f) => f,
        Err(e) => return not_found(e).map(|_| Opened::Mismatched),
    };
    let mut header = [0u8; BODY_HEADER];
    let len = body.metadata()?.len();
    if len < BODY_HEADER as u64 {
        return Ok(Opened::Corrupt(Corrupt::Truncated));
    }
    body.read_exact_at(&mut header, 0)?;
    match format::body_id(&header) {
        Ok(id) if id != rec.id => return Ok(Opened::Mismatched),
        Ok(_) => {}
        Err(why) => return Ok(Opened::Corrupt(why)),
    }
    if len != BODY_HEADER as u64 + rec.body_len {
        return Ok(Opened::Corrupt(Corrupt::Truncated));
    }
    let first = if first_block && rec.body_len > 0 {
        match read_block(&body, &rec.crcs, rec.body_len as usize, 0, None) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(Opened::Corrupt(Corrupt::Checksum)),
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    Ok(Opened::Found(rec, body, first))
}

/// A buffer for one block: `spare` (a block buffer nothing else holds any more) when there is
/// one, so that a download reuses one allocation and never zeroes it again.
fn block_buffer(len: usize, block: usize, spare: Option<Bytes>) -> BytesMut {
    let n = BLOCK.min(len - block * BLOCK);
    match spare.map(Bytes::try_into_mut) {
        Some(Ok(mut b)) if b.len() >= n => {
            b.truncate(n);
            b
        }
        _ => BytesMut::zeroed(n),
    }
}

/// Reads one body block and checks it against its CRC.
fn read_block(body: &File, crcs: &[u32], len: usize, block: usize, spare: Option<Bytes>) -> io::Result<Bytes> {
    let mut buf = block_buffer(len, block, spare);
    body.read_exact_at(&mut buf, (BODY_HEADER + block * BLOCK) as u64)?;
    checked(buf, crcs, block)
}

fn checked(buf: BytesMut, crcs: &[u32], block: usize) -> io::Result<Bytes> {
    if crcs.get(block) != Some(&crc32fast::hash(&buf)) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "block checksum mismatch"));
    }
    Ok(buf.freeze())
}

/// Reads one block only if all of it is in the page cache (`RWF_NOWAIT`: the read neither waits
/// for the disk nor starts readahead), so that it can run on the proxy's own thread: a hot
/// object is served with no trip to the I/O pool. `None` when it would block, or when the
/// filesystem cannot say (then `nowait` is turned off for good).
#[cfg(target_os = "linux")]
fn read_cached(
    body: &File,
    crcs: &[u32],
    len: usize,
    block: usize,
    nowait: &AtomicBool,
    spare: &mut Option<Bytes>,
) -> Option<io::Result<Bytes>> {
    use rustix::io::{preadv2, Errno, ReadWriteFlags};
    if !nowait.load(Ordering::Relaxed) {
        return None;
    }
    let mut buf = block_buffer(len, block, spare.take());
    let offset = (BODY_HEADER + block * BLOCK) as u64;
    match preadv2(
        body,
        &mut [io::IoSliceMut::new(&mut buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) if n == buf.len() => Some(checked(buf, crcs, block)),
        Ok(_) | Err(Errno::AGAIN) => {
            *spare = Some(buf.freeze()); // for the read on the pool
            None
        }
        Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
            nowait.store(false, Ordering::Relaxed);
            None
        }
        Err(e) => Some(Err(e.into())),
    }
}

#[cfg(not(target_os = "linux"))]
fn read_cached(
    _: &File,
    _: &[u32],
    _: usize,
    _: usize,
    _: &AtomicBool,
    _: &mut Option<Bytes>,
) -> Option<io::Result<Bytes>> {
    None
}

/// Reads a complete object in checksummed blocks, one block ahead of what it returns. A block
/// that fails its checksum is never returned: the response ends there with an error (never a
/// clean end), and the object is removed.
struct DiskHit {
    storage: &'static DiskStorage,
    key: HashBinary,
    body: Arc<File>,
    crcs: Arc<[u32]>,
    len: usize,
    pos: usize,
    end: usize,
    /// The last block returned, whose buffer the next read takes once the client has it.
    spare: Option<Bytes>,
    /// The next block, read ahead of what was returned.
    ahead: Option<(usize, Ahead)>,
    /// A block was not in the page cache: this read meets the disk.
    cold: bool,
    /// The blocks before this one have been asked of the kernel's readahead.
    advised: usize,
    /// The body so far, for a promotion into memory once it is read whole.
    promote: Option<(Chunks, Promote)>,
}

/// Takes an object's whole body, read from disk, into another tier.
pub(in crate::cache) type Promote = Box<dyn FnOnce(Chunks) + Send + Sync>;

enum Ahead {
    Ready(Bytes),
    Cached(io::Result<Bytes>),
    Reading(tokio::task::JoinHandle<io::Result<Bytes>>),
}

/// How far ahead of a cold read the kernel is asked to read (`WILLNEED`), in blocks: 2 MiB, so
/// that the disk has reads queued while the client takes what is read.
const ADVISE_BLOCKS: usize = 16;

impl DiskHit {
    /// Keeps the kernel reading the next [`ADVISE_BLOCKS`] ahead of `block` (asked on the pool
    /// every half window), so that the blocks after a cold one are in the page cache when they
    /// are wanted and read on the proxy's thread, with no trip to the pool.
    fn advise(&mut self, block: usize) {
        let blocks = self.len.div_ceil(BLOCK);
        if block + ADVISE_BLOCKS / 2 < self.advised || self.advised >= blocks {
            return;
        }
        let from = self.advised.max(block + 1);
        self.advised = (from + ADVISE_BLOCKS).min(blocks);
        let (body, offset) = (self.body.clone(), (BODY_HEADER + from * BLOCK) as u64);
        let len = std::num::NonZeroU64::new(((self.advised - from) * BLOCK) as u64);
        // Only a hint: a failure costs the next reads a trip to the pool, nothing more.
        drop(self.storage.pool.spawn_blocking(move || {
            let _ = rustix::fs::fadvise(&*body, offset, len, rustix::fs::Advice::WillNeed);
        }));
    }

    fn spawn_read(&mut self, block: usize) -> Ahead {
        let (body, crcs, len, spare) = (self.body.clone(), self.crcs.clone(), self.len, self.spare.take());
        Ahead::Reading(
            self.storage
                .pool
                .spawn_blocking(move || read_block(&body, &crcs, len, block, spare)),
        )
    }
}

#[async_trait]
impl HandleHit for DiskHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let block = self.pos / BLOCK;
        let pending = match self.ahead.take() {
            Some((b, h)) if b == block => h,
            _ => match read_cached(&self.body, &self.crcs, self.len, block, &self.storage.nowait, &mut self.spare) {
                Some(r) => Ahead::Cached(r),
                None => {
                    self.cold = true;
                    self.spawn_read(block)
                }
            },
        };
        if self.cold {
            self.advise(block);
        }
        let read = match pending {
            Ahead::Ready(b) => Ok(b),
            Ahead::Cached(r) => r,
            Ahead::Reading(h) => h.await.unwrap_or_else(|e| Err(io::Error::other(e))),
        };
        let data = match read {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.storage.corrupt(self.key, Corrupt::Checksum);
                return Error::e_explain(ErrorType::InternalError, "cached object failed its checksum");
            }
            Err(e) => {
                self.storage.fault(DiskOp::Read, &self.storage.paths(&self.key).1, &e);
                return Error::e_explain(ErrorType::InternalError, format!("reading a cached object: {e}"));
            }
        };
        let from = self.pos - block * BLOCK;
        let to = (self.end - block * BLOCK).min(data.len());
        self.pos += to - from;
        // Without RWF_NOWAIT every block is read on the pool: the next one ahead.
        if !self.storage.nowait.load(Ordering::Relaxed) && self.pos < self.end {
            self.ahead = Some((block + 1, self.spawn_read(block + 1)));
        }
        let out = data.slice(from..to);
        if let Some((body, _)) = &mut self.promote {
            body.push(out.clone());
        }
        self.spare = Some(data);
        Ok(Some(out))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        if let Some((body, promote)) = self.promote {
            if body.len == self.len {
                promote(body);
            }
        }
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        if start >= self.len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start {start} >= length {}", self.len),
            );
        }
        self.pos = start;
        self.end = end.map_or(self.len, |e| e.min(self.len));
        self.promote = None; // only a whole read is promoted
        self.advised = 0; // readahead starts again from where the read now is
        if self.ahead.as_ref().is_some_and(|(b, _)| *b != start / BLOCK) {
            self.ahead = None;
        }
        Ok(())
    }

    // The memory tier's LRU does not track disk objects; the disk tier keeps its own.
    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn std::any::Any + Send + Sync) {
        self
    }
}

/// What a fill's readers read that is not in the file: the bytes since the last flush, or,
/// after a disk failure, a bounded window of what came since.
#[derive(Default)]
struct Tail {
    /// Bytes in the file, readable there.
    flushed: usize,
    /// Where `chunks` starts in the body.
    start: usize,
    chunks: Chunks,
    /// Without a file: the half window before `chunks`.
    previous_start: usize,
    previous: Chunks,
}

/// A fill in progress, shared by its writer and its readers.
struct Fill {
    meta: (Vec<u8>, Vec<u8>),
    file: Option<Arc<File>>,
    state: watch::Sender<FillState>,
    tail: RwLock<Tail>,
}

struct Writer {
    file: Arc<File>,
    temp: PathBuf,
    sums: format::BlockSums,
    written: u64,
}

/// Writes one fill; dropping it without `finish` fails its readers and removes its file.
pub struct DiskFill {
    storage: &'static DiskStorage,
    key: HashBinary,
    primary: Box<str>,
    id: u64,
    fill_id: FillId,
    fill: Arc<Fill>,
    /// `None`: nothing (more) goes to disk.
    writer: Option<Writer>,
    received: usize,
    unflushed: usize,
    done: bool,
}

impl DiskFill {
    pub async fn write_body(&mut self, data: Bytes, eof: bool) {
        let n = data.len();
        self.received += n;
        self.unflushed += n;
        if self.received as u64 > self.storage.settings.max_object_bytes {
            self.abandon();
        }
        {
            let mut tail = write(&self.fill.tail);
            tail.chunks.push(data);
            if self.writer.is_none() && tail.chunks.len > RELAY_WINDOW / 2 {
                // Without a file only the last window is kept: readers further behind are cut
                // off (see `FillReader`).
                let current = std::mem::take(&mut tail.chunks);
                tail.previous_start = tail.start;
                tail.start += current.len;
                tail.previous = current;
            }
        }
        self.fill.state.send_replace(FillState::Writing(self.received));
        if self.writer.is_some() && (self.unflushed >= BLOCK || eof) {
            self.flush().await;
        }
    }

    /// Writes the tail to the file, then lets readers read it there.
    async fn flush(&mut self) {
        let Some(mut w) = self.writer.take() else { return };
        let pieces = read(&self.fill.tail).chunks.pieces().to_vec();
        let result = self
            .storage
            .blocking(move || {
                for p in &pieces {
                    w.file.write_all_at(p, BODY_HEADER as u64 + w.written)?;
                    w.sums.update(p);
                    w.written += p.len() as u64;
                }
                Ok(w)
            })
            .await;
        match result {
            Ok(w) => {
                let mut tail = write(&self.fill.tail);
                tail.start += tail.chunks.len;
                tail.flushed = tail.start;
                tail.chunks = Chunks::default();
                self.unflushed = 0;
                self.writer = Some(w);
            }
            Err(e) => {
                // The tail stays: readers go on from memory.
                let temp = self
                    .storage
                    .tmp
                    .join(format!("{}.{}.body", hex(&self.key), hex(&self.fill_id)));
                self.storage.fault(DiskOp::Write, &temp, &e);
                self.storage.pool.spawn_blocking(move || fs::remove_file(&temp));
            }
        }
    }

    /// Stops writing to disk: the file goes, readers go on from memory.
    fn abandon(&mut self) {
        if let Some(w) = self.writer.take() {
            self.storage.pool.spawn_blocking(move || fs::remove_file(&w.temp));
        }
    }

    /// Commits the fill: renames the body into place, then writes its meta. Returns the bytes
    /// now on disk (0 when nothing was stored).
    pub async fn finish(mut self) -> u64 {
        if self.unflushed > 0 {
            self.flush().await;
        }
        self.done = true;
        self.fill.state.send_replace(FillState::Complete(self.received));
        let Some(w) = self.writer.take() else { return 0 };
        let (meta_path, body_path) = self.storage.paths(&self.key);
        let rec = format::Meta {
            id: self.fill_id,
            body_len: w.written,
            primary: self.primary.to_string(),
            internal: self.fill.meta.0.clone(),
            header: self.fill.meta.1.clone(),
            crcs: w.sums.finish(),
        };
        let (temp, mt) = (w.temp.clone(), w.temp.with_extension("meta"));
        let result = self
            .storage
            .blocking(move || {
                let encoded = rec.encode();
                let committed = body_path
                    .parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| fs::write(&mt, &encoded))
                    .and_then(|()| fs::rename(&temp, &body_path))
                    .and_then(|()| fs::rename(&mt, &meta_path));
                if committed.is_err() {
                    let _ = fs::remove_file(&temp);
                    let _ = fs::remove_file(&mt);
                }
                committed.map(|()| BODY_HEADER as u64 + rec.body_len + encoded.len() as u64)
            })
            .await;
        drop(w.file); // releases the lock
        match result {
            Ok(bytes) => {
                let storage = self.storage;
                storage.index.insert(self.key, self.primary.clone(), bytes, now());
                let evicted = storage.evict(storage.settings.max_bytes, 0);
                if !evicted.is_empty() {
                    storage.pool.spawn_blocking(move || storage.remove_files(&evicted));
                }
                bytes
            }
            Err(e) => {
                self.storage.fault(DiskOp::Commit, &w.temp, &e);
                0
            }
        }
    }
}

impl Drop for DiskFill {
    fn drop(&mut self) {
        if !self.done {
            self.fill.state.send_replace(FillState::Failed);
            self.abandon();
        }
        let mut fills = write(&self.storage.fills);
        if let Some(m) = fills.get_mut(&self.key) {
            m.remove(&self.id);
            if m.is_empty() {
                fills.remove(&self.key);
            }
        }
    }
}

fn fill_failed(what: &str) -> Box<Error> {
    Error::explain(
        ErrorType::InternalError,
        format!("the cache fill this response was streaming from {what}; the body is incomplete"),
    )
}

/// Streams a fill in progress: from its file up to what was flushed, then from its tail.
struct FillReader {
    storage: &'static DiskStorage,
    fill: Arc<Fill>,
    state: watch::Receiver<FillState>,
    pos: usize,
}

enum Source {
    Memory(Bytes),
    File(usize),
    Lost,
    Wait,
}

#[async_trait]
impl HandleHit for FillReader {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let available = match *self.state.borrow_and_update() {
                FillState::Failed => return Err(fill_failed("failed")),
                FillState::Writing(n) => n,
                FillState::Complete(n) if n == self.pos => return Ok(None),
                FillState::Complete(n) => n,
            };
            let source = if available > self.pos {
                let tail = read(&self.fill.tail);
                if self.pos >= tail.start {
                    tail.chunks
                        .slice_from(self.pos - tail.start, available - tail.start)
                        .map_or(Source::Wait, Source::Memory)
                } else if self.pos >= tail.previous_start && !tail.previous.pieces().is_empty() {
                    let end = tail.start - tail.previous_start;
                    tail.previous
                        .slice_from(self.pos - tail.previous_start, end)
                        .map_or(Source::Lost, Source::Memory)
                } else if self.pos < tail.flushed {
                    Source::File(tail.flushed)
                } else {
                    Source::Lost
                }
            } else {
                Source::Wait
            };
            match source {
                Source::Memory(b) => {
                    self.pos += b.len();
                    return Ok(Some(b));
                }
                Source::File(flushed) => {
                    let Some(file) = self.fill.file.clone() else {
                        return Err(fill_failed("lost its file"));
                    };
                    let (pos, n) = (self.pos, (flushed - self.pos).min(BLOCK));
                    let data = self
                        .storage
                        .blocking(move || {
                            let mut buf = vec![0u8; n];
                            file.read_exact_at(&mut buf, (BODY_HEADER + pos) as u64)?;
                            Ok(Bytes::from(buf))
                        })
                        .await
                        .map_err(|e| fill_failed(&format!("could not be read ({e})")))?;
                    self.pos += data.len();
                    return Ok(Some(data));
                }
                Source::Lost => return Err(fill_failed("moved on past this reader after a disk error")),
                Source::Wait => {
                    if self.state.changed().await.is_err() {
                        return Err(fill_failed("ended without completing"));
                    }
                }
            }
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

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tiered::next_fill_id;
    use pingora::http::ResponseHeader;

    fn settings(dir: &Path) -> Settings {
        Settings {
            path: dir.to_path_buf(),
            max_bytes: 1 << 30,
            max_object_bytes: 1 << 28,
            min_free_bytes: 0,
            io_threads: 2,
        }
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).unwrap();
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn store(d: &'static DiskStorage, key: &CacheKey, data: &[u8], piece: usize) -> u64 {
        let mut f = d
            .start_fill(key, &meta(), Some(data.len() as u64), next_fill_id())
            .await
            .unwrap();
        for chunk in data.chunks(piece) {
            f.write_body(Bytes::copy_from_slice(chunk), false).await;
        }
        f.write_body(Bytes::new(), true).await;
        f.finish().await
    }

    async fn lookup(d: &'static DiskStorage, key: &CacheKey) -> Option<HitHandler> {
        d.lookup_object(key, |_, _| None).await.map(|(_, hit)| hit)
    }

    async fn read_all(hit: &mut HitHandler) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = hit.read_body().await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn a_finished_fill_is_served_whole_and_in_any_range_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/fw.bin", "");
        let data = body(3 * BLOCK + 5);
        assert!(store(d, &key, &data, 1000).await > data.len() as u64);
        let mut hit = lookup(d, &key).await.unwrap();
        assert_eq!(read_all(&mut hit).await.unwrap(), data);
        for (start, end) in [
            (0, 10),
            (BLOCK - 3, BLOCK + 3),
            (2 * BLOCK, 3 * BLOCK + 5),
            (3 * BLOCK + 4, 3 * BLOCK + 5),
        ] {
            let mut hit = lookup(d, &key).await.unwrap();
            hit.seek(start, Some(end)).unwrap();
            assert_eq!(read_all(&mut hit).await.unwrap(), &data[start..end], "{start}..{end}");
        }
        // A body out of the page cache (where the filesystem can drop it): the first block is
        // read on the pool, the kernel is asked to read ahead, and the rest is read as it comes.
        let body_file = File::open(d.paths(&key.combined_bin()).1).unwrap();
        let _ = rustix::fs::fadvise(&body_file, 0, None, rustix::fs::Advice::DontNeed);
        let mut hit = lookup(d, &key).await.unwrap();
        assert_eq!(read_all(&mut hit).await.unwrap(), data);
        // Without RWF_NOWAIT every block is read on the pool, one ahead.
        d.nowait.store(false, Ordering::Relaxed);
        let mut hit = lookup(d, &key).await.unwrap();
        assert_eq!(read_all(&mut hit).await.unwrap(), data);
        let mut hit = lookup(d, &key).await.unwrap();
        hit.seek(BLOCK + 1, Some(3 * BLOCK)).unwrap();
        assert_eq!(read_all(&mut hit).await.unwrap(), &data[BLOCK + 1..3 * BLOCK]);
        let mut hit = lookup(d, &key).await.unwrap();
        assert!(hit.seek(data.len(), None).is_err());
        assert!(
            files(&dir.path().join("tmp")).is_empty(),
            "the temporary file was renamed"
        );
    }

    #[tokio::test]
    async fn a_reopened_directory_serves_its_objects_and_keeps_their_order_of_use() {
        let dir = tempfile::tempdir().unwrap();
        let first = DiskStorage::open(settings(dir.path())).unwrap();
        let (a, b) = (CacheKey::new("h/a", ""), CacheKey::new("h/b", ""));
        let size = store(first, &a, &body(1000), 100).await;
        store(first, &b, &body(2000), 100).await;
        // `a` was last used an hour ago: a restart with room for one object keeps `b`.
        let (meta_a, _) = first.paths(&a.combined_bin());
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        File::open(&meta_a).unwrap().set_modified(hour_ago).unwrap();
        let mut s = settings(dir.path());
        s.max_bytes = size + 1500;
        let second = DiskStorage::open(s).unwrap();
        second.loaded().await;
        assert_eq!(second.usage().1, 1);
        assert!(lookup(second, &a).await.is_none(), "the least recently used went");
        let mut hit = lookup(second, &b).await.unwrap();
        assert_eq!(read_all(&mut hit).await.unwrap(), body(2000));
    }

    #[tokio::test]
    async fn a_flipped_byte_is_never_served_and_the_object_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/flip", "");
        let data = body(2 * BLOCK + 100);
        store(d, &key, &data, 4096).await;
        let (meta_path, body_path) = d.paths(&key.combined_bin());
        let mut raw = fs::read(&body_path).unwrap();
        raw[BODY_HEADER + BLOCK + 7] ^= 1;
        fs::write(&body_path, raw).unwrap();
        let mut hit = lookup(d, &key).await.unwrap();
        let first = hit.read_body().await.unwrap().unwrap();
        assert_eq!(&first[..], &data[..BLOCK], "the sound block before it is served");
        assert!(hit.read_body().await.is_err(), "the corrupt block is not");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!meta_path.exists() && !body_path.exists());
        assert!(lookup(d, &key).await.is_none());

        // In the first block, or in the meta: a miss before anything is sent.
        store(d, &key, &data, 4096).await;
        let mut raw = fs::read(&body_path).unwrap();
        raw[BODY_HEADER + 3] ^= 1;
        fs::write(&body_path, raw).unwrap();
        assert!(lookup(d, &key).await.is_none());

        store(d, &key, &data, 4096).await;
        let mut raw = fs::read(&meta_path).unwrap();
        raw[20] ^= 0x10;
        fs::write(&meta_path, raw).unwrap();
        assert!(lookup(d, &key).await.is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!body_path.exists());
    }

    #[tokio::test]
    async fn a_torn_body_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/torn", "");
        store(d, &key, &body(5000), 1000).await;
        let (_, body_path) = d.paths(&key.combined_bin());
        File::options()
            .write(true)
            .open(&body_path)
            .unwrap()
            .set_len(3000)
            .unwrap();
        assert!(lookup(d, &key).await.is_none());
    }

    #[tokio::test]
    async fn readers_stream_a_fill_from_memory_then_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/stream", "");
        let data = body(2 * BLOCK + 10);
        let mut fill = d.start_fill(&key, &meta(), None, next_fill_id()).await.unwrap();
        fill.write_body(Bytes::copy_from_slice(&data[..100]), false).await;
        let (_, mut early) = d.lookup_fill(&key, None).unwrap();
        assert_eq!(
            &early.read_body().await.unwrap().unwrap()[..],
            &data[..100],
            "before any flush"
        );
        fill.write_body(Bytes::copy_from_slice(&data[100..BLOCK + 5]), false)
            .await; // flushed
        let (_, mut late) = d.lookup_fill(&key, None).unwrap();
        let reader = tokio::spawn(async move {
            let mut out = data[..100].to_vec();
            out.extend(read_all(&mut early).await.unwrap());
            (out, read_all(&mut late).await.unwrap())
        });
        fill.write_body(Bytes::copy_from_slice(&body(2 * BLOCK + 10)[BLOCK + 5..]), true)
            .await;
        fill.finish().await;
        let (early, late) = reader.await.unwrap();
        assert_eq!(early, body(2 * BLOCK + 10));
        assert_eq!(late, body(2 * BLOCK + 10));
    }

    #[tokio::test]
    async fn an_abandoned_fill_fails_its_readers_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/aborted", "");
        let mut fill = d.start_fill(&key, &meta(), Some(10_000), next_fill_id()).await.unwrap();
        fill.write_body(Bytes::from(body(BLOCK + 1)), false).await;
        let (_, mut hit) = d.lookup_fill(&key, None).unwrap();
        assert_eq!(files(&dir.path().join("tmp")).len(), 1);
        drop(fill); // the origin went away mid-body
        assert!(
            read_all(&mut hit).await.is_err(),
            "a failed fill must not read as a clean end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        assert!(lookup(d, &key).await.is_none());
    }

    #[tokio::test]
    async fn at_start_unfinished_fills_of_dead_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        fs::write(tmp.join("dead.body"), b"half a body").unwrap();
        let live = File::create(tmp.join("live.body")).unwrap();
        live.lock().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        d.loaded().await;
        assert!(!tmp.join("dead.body").exists());
        assert!(tmp.join("live.body").exists(), "another process's fill in progress");
    }

    #[tokio::test]
    async fn the_budget_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let probe = DiskStorage::open(settings(&dir.path().join("probe"))).unwrap();
        let one = store(probe, &CacheKey::new("h/x", ""), &body(10_000), 1000).await;
        let mut s = settings(&dir.path().join("cache"));
        s.max_bytes = one * 5 / 2;
        let d = DiskStorage::open(s).unwrap();
        let [a, b, c] = ["h/a", "h/b", "h/c"].map(|k| CacheKey::new(k, ""));
        store(d, &a, &body(10_000), 1000).await;
        store(d, &b, &body(10_000), 1000).await;
        assert!(lookup(d, &a).await.is_some()); // a is now more recent than b
        store(d, &c, &body(10_000), 1000).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(lookup(d, &b).await.is_none(), "b was the least recently used");
        assert!(lookup(d, &a).await.is_some() && lookup(d, &c).await.is_some());
        assert!(d.usage().0 <= one * 5 / 2);
    }

    #[tokio::test]
    async fn an_unwritable_directory_relays_the_fill_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // `tmp` is a file: every fill's temporary file fails to be created, even as root.
        fs::write(dir.path().join("tmp"), b"").unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/ro", "");
        let data = body(BLOCK * 2);
        let mut fill = d
            .start_fill(&key, &meta(), Some(data.len() as u64), next_fill_id())
            .await
            .unwrap();
        let (_, mut hit) = d.lookup_fill(&key, None).unwrap();
        let reader = tokio::spawn(async move { read_all(&mut hit).await.unwrap() });
        fill.write_body(Bytes::from(data.clone()), true).await;
        assert_eq!(fill.finish().await, 0);
        assert_eq!(
            reader.await.unwrap(),
            data,
            "the readers got the whole body from memory"
        );
        assert!(lookup(d, &key).await.is_none());
        assert_eq!(
            d.accepts(Some(10)),
            Err(DiskSkip::Degraded),
            "the disk is left alone for a while"
        );
    }

    #[tokio::test]
    async fn a_revalidation_replaces_only_the_meta() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskStorage::open(settings(dir.path())).unwrap();
        let key = CacheKey::new("h/reval", "");
        store(d, &key, &body(3000), 1000).await;
        let now = SystemTime::now();
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.append_header("etag", "\"v2\"").unwrap();
        let fresher = CacheMeta::new(now + Duration::from_secs(600), now, 0, 0, header);
        assert!(d.update_meta(&key, &fresher).await);
        let (m, mut hit) = d.lookup_object(&key, |_, _| None).await.unwrap();
        assert_eq!(m.headers().get("etag").unwrap(), "\"v2\"");
        assert_eq!(read_all(&mut hit).await.unwrap(), body(3000));
        assert!(!d.update_meta(&CacheKey::new("h/none", ""), &fresher).await);
    }
}
