//! What a client may hold and how fast: the connection deadlines (TLS handshake, request header,
//! keep-alive idle), the open connections in total and per IP, and a request rate per device.
//! Connections are admitted before TLS and watched from accept to close: a connection past its
//! deadline is shut down, whatever pingora is waiting for. Every hit is counted by its kind.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::GetSocketDigest;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::{Tracer, Tracing};
use std::os::fd::AsRawFd;

use crate::metrics;
use crate::reason::Limit;
use crate::rules::Expression;
use crate::state::Live;

/// The limits in force (part of the live state: a reload changes them for what comes next).
#[derive(Debug, Clone)]
pub struct Settings {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Request line and headers, in bytes.
    pub max_header_bytes: usize,
    /// 0: no limit.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub rate: Option<Rate>,
    /// Names a request's bucket, instead of its certificate's serial (or, without one, its IP).
    pub rate_key: Option<Arc<Expression>>,
    /// An IP whose handshakes failed this many times within `window` is refused (or delayed)
    /// at accept until the window passes.
    pub failed_handshakes: Option<FailedHandshakes>,
}

/// How many failed handshakes an IP may have in a window, and what happens to it beyond.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailedHandshakes {
    pub max: u32,
    pub window: Duration,
    /// Set: its connections wait this long before their handshake (a valid device behind the
    /// same NAT is still served, and a flooder that waits for its answer is slowed to a few
    /// attempts a second). Unset: they are refused.
    pub delay: Option<Duration>,
}

/// A token bucket per device: `per_second` requests on average, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

const DISARMED: u64 = u64::MAX;

/// A connection's deadline, shared by the proxy hooks (which move it) and the watchdog (which
/// enforces it). Disarmed while a request is in progress.
pub struct Clock {
    deadline: AtomicU64,
    limit: AtomicU8,
    in_flight: AtomicU32,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock {
            deadline: AtomicU64::new(DISARMED),
            limit: AtomicU8::new(Limit::HeaderTimeout as u8),
            in_flight: AtomicU32::new(0),
        }
    }
}

impl Clock {
    fn arm(&self, after: Duration, limit: Limit) {
        self.limit.store(limit as u8, Ordering::Relaxed);
        self.deadline
            .store(now_ms().saturating_add(after.as_millis() as u64), Ordering::Relaxed);
    }

    /// A request's header has arrived: no deadline while it is served.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.deadline.store(DISARMED, Ordering::Relaxed);
    }

    /// A request is done: with none left, the connection may idle for `idle` (its next request
    /// header included).
    pub fn request_finished(&self, idle: Duration) {
        let before = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if before == Ok(1) {
            self.arm(idle, Limit::IdleTimeout);
        }
    }
}

/// A watched connection.
struct Entry {
    ip: Option<IpAddr>,
    /// Until the handshake completes; then the connection's clock decides.
    handshake_deadline: u64,
    clock: Option<Arc<Clock>>,
}

#[derive(Default)]
struct Table {
    by_fd: HashMap<RawFd, Entry>,
    per_ip: HashMap<IpAddr, usize>,
    /// Failed handshakes per IP in the current window: (window start, count).
    failures: HashMap<IpAddr, (u64, u32)>,
}

/// Admits and watches connections, and holds the devices' request buckets.
pub struct Guard {
    live: Arc<Live>,
    table: Mutex<Table>,
    buckets: Mutex<HashMap<Vec<u8>, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Guard {
    pub fn new(live: Arc<Live>) -> Arc<Guard> {
        Arc::new(Guard {
            live,
            table: Mutex::default(),
            buckets: Mutex::default(),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection from `ip` with how long it must wait before its handshake, or
    /// says which limit refuses it.
    fn admit(&self, fd: RawFd, ip: Option<IpAddr>) -> Result<Duration, Limit> {
        let s = self.live.load();
        let l = &s.limits;
        let mut t = self.table();
        if l.max_connections > 0 && t.by_fd.len() >= l.max_connections {
            return Err(Limit::ConnectionsTotal);
        }
        let mut wait = Duration::ZERO;
        if let (Some(f), Some(ip)) = (l.failed_handshakes, ip) {
            let now = now_ms();
            if let Some((start, n)) = t.failures.get(&ip).copied() {
                if now.saturating_sub(start) >= f.window.as_millis() as u64 {
                    t.failures.remove(&ip);
                } else if n >= f.max {
                    wait = f.delay.ok_or(Limit::FailedHandshakesPerIp)?;
                }
            }
        }
        if let Some(ip) = ip {
            let n = t.per_ip.entry(ip).or_default();
            if l.max_connections_per_ip > 0 && *n >= l.max_connections_per_ip {
                return Err(Limit::ConnectionsPerIp);
            }
            *n += 1;
        }
        let handshake_deadline = now_ms().saturating_add((wait + l.handshake_timeout).as_millis() as u64);
        t.by_fd.insert(
            fd,
            Entry {
                ip,
                handshake_deadline,
                clock: None,
            },
        );
        metrics::OPEN_SOCKETS.set(t.by_fd.len() as i64);
        Ok(wait)
    }

    /// The connection on `fd` is gone (called before its fd is closed). One whose handshake
    /// never completed counts against its IP.
    fn release(&self, fd: RawFd) {
        let limit = self.live.load().limits.failed_handshakes;
        let mut t = self.table();
        let Some(e) = t.by_fd.remove(&fd) else { return };
        if let (Some(f), Some(ip), None) = (limit, e.ip, &e.clock) {
            let now = now_ms();
            let (start, n) = t.failures.entry(ip).or_insert((now, 0));
            if now.saturating_sub(*start) >= f.window.as_millis() as u64 {
                (*start, *n) = (now, 0);
            }
            *n += 1;
        }
        if let Some(ip) = e.ip {
            if let Some(n) = t.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    t.per_ip.remove(&ip);
                }
            }
        }
        metrics::OPEN_SOCKETS.set(t.by_fd.len() as i64);
    }

    /// The limit on a request's line and headers, from the live state.
    pub fn max_header_bytes(&self) -> usize {
        self.live.load().limits.max_header_bytes
    }

    /// The handshake on `fd` completed: from now on `clock` decides, starting with the request
    /// header timeout. Later calls for the same connection change nothing.
    pub fn attach(&self, fd: RawFd, clock: &Arc<Clock>) {
        let header = self.live.load().limits.header_timeout;
        let mut t = self.table();
        if let Some(e) = t.by_fd.get_mut(&fd) {
            if e.clock.is_none() {
                clock.arm(header, Limit::HeaderTimeout);
                e.clock = Some(clock.clone());
            }
        }
    }

    /// Shuts down every connection past its deadline; the task waiting on it sees the end of
    /// the stream and drops it.
    fn enforce(&self) {
        let now = now_ms();
        let t = self.table();
        for (fd, e) in &t.by_fd {
            let (deadline, limit) = match &e.clock {
                None => (e.handshake_deadline, Limit::HandshakeTimeout),
                Some(c) => (
                    c.deadline.load(Ordering::Relaxed),
                    Limit::from_u8(c.limit.load(Ordering::Relaxed)),
                ),
            };
            if now >= deadline {
                // The table's lock is held: the fd cannot be closed and reused meanwhile.
                if nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both).is_ok() {
                    count(limit);
                }
                if let Some(c) = &e.clock {
                    c.deadline.store(DISARMED, Ordering::Relaxed);
                }
            }
        }
    }

    /// Takes one request from `key`'s bucket, or says in how many seconds one will be there.
    pub fn take(&self, key: &[u8], rate: Rate) -> Result<(), u64> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // A device's key is copied once, into its new bucket; later requests only look it up.
        if !b.contains_key(key) {
            b.insert(
                key.to_vec(),
                Bucket {
                    tokens: rate.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = b.get_mut(key) else { return Ok(()) };
        let refill = now.duration_since(bucket.at).as_secs_f64() * rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(rate.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        count(Limit::RateLimited);
        Err(((1.0 - bucket.tokens) / rate.per_second).ceil().max(1.0) as u64)
    }

    /// Forgets failure windows that have passed.
    fn forget_old_failures(&self) {
        let Some(f) = self.live.load().limits.failed_handshakes else {
            self.table().failures.clear();
            return;
        };
        let now = now_ms();
        let window = f.window.as_millis() as u64;
        self.table().failures.retain(|_, (start, _)| now.saturating_sub(*start) < window);
    }

    /// Forgets the buckets that have refilled: a device that pauses costs nothing.
    fn forget_full_buckets(&self) {
        let Some(rate) = self.live.load().limits.rate else {
            self.buckets.lock().unwrap_or_else(|e| e.into_inner()).clear();
            return;
        };
        let now = Instant::now();
        let full = Duration::from_secs_f64(rate.burst / rate.per_second);
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, b| now.duration_since(b.at) < full);
    }
}

pub fn count(limit: Limit) {
    metrics::LIMITS.with_label_values(&[limit.as_str()]).inc();
}

/// Admits connections before their TLS handshake (pingora's pre-TLS hook).
pub struct Admission(pub Arc<Guard>);

#[async_trait]
impl PreTlsProcess for Admission {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let fd = stream.as_raw_fd();
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let wait = self.0.admit(fd, ip).map_err(|limit| {
            count(limit);
            pingora::Error::explain(pingora::ErrorType::ConnectionClosed, limit.as_str())
        })?;
        stream.tracer = Some(Tracer(Box::new(Release {
            fd,
            guard: Some(self.0.clone()),
        })));
        if !wait.is_zero() {
            count(Limit::FailedHandshakesPerIp);
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

/// Releases a connection's slot when pingora drops its stream.
struct Release {
    fd: RawFd,
    guard: Option<Arc<Guard>>,
}

impl std::fmt::Debug for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Release({})", self.fd)
    }
}

impl Tracing for Release {
    fn on_connected(&self) {}

    fn on_disconnected(&self) {
        if let Some(g) = &self.guard {
            g.release(self.fd);
        }
    }

    /// A clone releases nothing: the slot is released once, by the stream that holds it.
    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(Release { fd: self.fd, guard: None })
    }
}

/// Enforces the deadlines every 100 ms and forgets refilled buckets every minute.
pub struct Watchdog(pub Arc<Guard>);

#[async_trait]
impl BackgroundService for Watchdog {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut n = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.0.enforce();
            n = n.wrapping_add(1);
            if n % 600 == 0 {
                self.0.forget_full_buckets();
                self.0.forget_old_failures();
            }
        }
    }
}
