//! One viewer connection from its handshake to its close. HTTP/1 requests are taken one after
//! another, and each is handed to pingora only once its header has arrived (unless `hit`
//! answers it): a connection that waits for a request (idle, or sending it slowly) holds its
//! socket and the bytes so far, not pingora's request state. HTTP/2 streams are accepted here as
//! pingora accepts them, each offered to `hit` first. Small writes on both are coalesced
//! (`records`). At shutdown, connections waiting for a request get a moment's grace before they
//! are dropped, and HTTP/2 connections a GOAWAY.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use log::{debug, info};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::v2;
use pingora::protocols::http::v2::server::{H2Accept, HttpSession as H2Session};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::admission::Connection;
use crate::hit::{Hits, Served};
use crate::records::Coalesced;
use crate::limits::Guard;

/// pingora's keep-alive timeout, announced in its responses (the limits watchdog enforces the
/// configured one).
const KEEPALIVE_SECS: u64 = 60;

/// The app behind the viewer listeners, around pingora's HTTP app `inner`.
pub struct ViewerApp<A> {
    pub inner: Arc<A>,
    /// How long connections waiting for a request may still send one once the process drains.
    pub linger: Duration,
    /// Where a connection's deadline is handed over once its handshake is done, and the limit
    /// on a request header.
    pub limits: Arc<Guard>,
    /// Fresh memory hits served without pingora's session (with a cache).
    hits: Option<Hits>,
    /// Set once the linger is over: connections waiting for a request stop waiting.
    closing: watch::Sender<bool>,
}

impl<A> ViewerApp<A> {
    pub fn new(inner: Arc<A>, linger: Duration, limits: Arc<Guard>, hits: Option<Hits>) -> ViewerApp<A> {
        ViewerApp {
            inner,
            linger,
            limits,
            hits,
            closing: watch::Sender::new(false),
        }
    }
}

/// What waiting for the next request ended with.
enum Next {
    /// The header (or as much of it as the limit allows, for pingora to refuse) with whatever
    /// followed it.
    Request(BytesMut),
    /// The client closed, the read failed, or the process is closing.
    Gone,
}

/// Whether `buf` holds a header's end: an empty line, with or without its CR (pingora's parser
/// takes both). A false hit only hands the header over early.
fn header_end(buf: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', buf).any(|i| match buf.get(i + 1) {
        Some(b'\n') => true,
        Some(b'\r') => buf.get(i + 2) == Some(&b'\n'),
        _ => false,
    })
}

/// The waker h2 gets for its connection: the task's, but mute while the loop queues a hit's
/// response itself. h2 wakes the connection for every frame a stream queues, and the loop
/// polls it next anyway, so that wake would only poll it once more, for nothing (about 0.6
/// polls per small hit, each with a TLS read that finds nothing). A wake dropped while mute
/// loses nothing: the next poll reads the socket and writes every stream's frames.
#[derive(Default)]
struct Gate {
    task: Mutex<Option<Waker>>,
    mute: AtomicBool,
}

impl Gate {
    /// Polls `fut` with `gated` (this gate's waker) in place of the task's.
    async fn drive<F: Future>(&self, gated: &Waker, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
            drop(task);
            fut.as_mut().poll(&mut Context::from_waker(gated))
        })
        .await
    }

    fn muted<T>(&self, f: impl FnOnce() -> T) -> T {
        self.mute.store(true, Ordering::SeqCst);
        let out = f();
        self.mute.store(false, Ordering::SeqCst);
        out
    }
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.mute.load(Ordering::SeqCst) {
            if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                task.wake_by_ref();
            }
        }
    }
}

/// A connection's budget for streams pingora refuses as malformed before they reach an app
/// (pingora's own accept loop allows as many).
const MALFORMED_STREAMS: usize = 32;

impl<A: HttpServerApp + Send + Sync + 'static> ViewerApp<A> {
    /// An HTTP/2 connection: pingora's handshake and sessions, driven by the loop pingora's own
    /// accept loop is (`v2::server::accept_downstream_sessions`, private to it; without its idle
    /// timeout, which the edge does not set: the limits watchdog closes idle connections), with
    /// the streams `hit` takes answered here. A small hit is queued from this loop and written by
    /// its next poll of the connection: no task, no second wake-up (`Gate`). Every other stream
    /// gets a task, as in pingora. A shutdown sends GOAWAY and serves what the client had
    /// already opened.
    async fn serve_h2(self: &Arc<Self>, stream: Stream, conn: Option<Arc<Connection>>, shutdown: &ShutdownWatch) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        // The connection's own state, looked up once for all its streams.
        let hits = self.hits.as_ref().zip(conn);
        let mut conn = match v2::server::handshake(stream, self.inner.h2_options()).await {
            Ok(conn) => conn,
            Err(e) => return debug!("HTTP/2 handshake: {e}"), // the client's doing
        };
        let mut shutdown = shutdown.clone();
        let mut draining = false;
        let mut malformed = 0;
        let gate = Arc::new(Gate::default());
        let gated = Waker::from(gate.clone());
        loop {
            let next = gate
                .drive(&gated, async {
                    if draining {
                        return Some(H2Session::from_h2_conn(&mut conn, digest.clone()).await);
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => None,
                        next = H2Session::from_h2_conn(&mut conn, digest.clone()) => Some(next),
                    }
                })
                .await;
            let Some(next) = next else {
                conn.graceful_shutdown();
                draining = true;
                continue;
            };
            let mut session = match next {
                Ok(Some(H2Accept::Session(session))) => session,
                Ok(Some(H2Accept::Rejected)) => {
                    malformed += 1;
                    if malformed >= MALFORMED_STREAMS {
                        return;
                    }
                    continue;
                }
                Ok(None) | Err(_) => return,
            };
            let hit = hits.as_ref().filter(|_| !draining).and_then(|(h, c)| h.take_h2(&session, c));
            match hit {
                Some(hit) if hit.small() => gate.muted(|| hit.send_now(&mut session)),
                Some(hit) => {
                    tokio::spawn(async move { hit.send(&mut session).await });
                }
                None => {
                    let app = self.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        app.inner.process_new_http(ServerSession::new_http2(session), &shutdown).await;
                    });
                }
            }
        }
    }
}

impl<A> ViewerApp<A> {
    /// Waits for the next request on `stream` with nothing allocated, then reads until its
    /// header is complete or `max` bytes are in.
    async fn next_request(&self, stream: &mut Stream, max: usize) -> Next {
        let mut closing = self.closing.subscribe();
        let mut first = [0u8; 1];
        let read = tokio::select! {
            biased;
            r = stream.read(&mut first) => r,
            _ = closing.wait_for(|c| *c) => return Next::Gone,
        };
        if !matches!(read, Ok(1)) {
            return Next::Gone;
        }
        let mut buf = BytesMut::with_capacity(1024);
        buf.extend_from_slice(&first);
        let mut scanned = 0;
        loop {
            if header_end(&buf[scanned..]) || buf.len() >= max {
                return Next::Request(buf);
            }
            // An end may straddle two reads.
            scanned = buf.len().saturating_sub(2);
            if buf.len() == buf.capacity() {
                buf.reserve(buf.len());
            }
            match stream.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return Next::Gone,
            }
        }
    }
}

/// Acknowledges what the client sent last, now. In TLS 1.3 the client's Finished ends the
/// handshake and the server answers nothing (no session tickets), so the kernel holds its ACK
/// back for up to 40 ms (delayed ACK). A client that leaves Nagle's algorithm on, as embedded
/// TLS stacks and ApacheBench do, cannot send its request until that ACK comes: every new
/// connection would pay 40 ms. TCP_QUICKACK sends the pending ACK at once.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // the one raw-fd borrow: pingora gives the socket only as a RawFd
fn ack_now(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` is the socket of the stream `process_new` owns, open for this whole call.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = rustix::net::sockopt::set_tcp_quickack(socket, true); // a hint: nothing to do if it fails
}

#[cfg(not(target_os = "linux"))]
fn ack_now(_: i32) {}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ViewerApp<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let conn = stream
            .get_ssl_digest()
            .and_then(|d| d.extension.get::<Arc<Connection>>().cloned());
        if let Some(c) = &conn {
            self.limits.attach(stream.id(), &c.clock);
        }
        ack_now(stream.id());
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            self.serve_h2(Box::new(Coalesced::new(stream)), conn, shutdown).await;
            return None;
        }
        let mut stream: Stream = Box::new(Coalesced::new(stream));
        // pingora's own HTTP/1 loop, with the wait for each request taken out of it.
        let mut first = true;
        let mut settings = None;
        let reuse_limit = self.inner.server_options().and_then(|o| o.keepalive_request_limit);
        // pingora counts a connection's requests against its limit: with one, it serves them all.
        let hits = self.hits.as_ref().zip(conn.as_deref()).filter(|_| reuse_limit.is_none());
        loop {
            let max = self.limits.max_header_bytes();
            let Next::Request(header) = self.next_request(&mut stream, max).await else {
                return None;
            };
            if let Some((hits, c)) = hits.filter(|_| !*shutdown.borrow()) {
                match hits.serve(&mut stream, &header, c).await {
                    Served::Yes => continue,
                    Served::Closed => return None,
                    Served::No => {}
                }
            }
            let mut session = ServerSession::new_http1(stream);
            if first {
                first = false;
                session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECS));
                session.set_keepalive_reuses_remaining(reuse_limit);
            } else if let Some(s) = settings.take() {
                HttpPersistentSettings::apply_to_session(s, &mut session);
            }
            session.set_pipelined_prefix(header);
            let reused = self.inner.process_new_http(session, shutdown).await?;
            (stream, settings) = reused.consume();
        }
    }

    /// Runs once the listeners have stopped: the inner app drops its waiting connections then.
    async fn cleanup(&self) {
        info!(
            "draining: connections waiting for a request may send one in the next {} ms",
            self.linger.as_millis()
        );
        tokio::time::sleep(self.linger).await;
        self.closing.send_replace(true);
        self.inner.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::header_end;

    #[test]
    fn header_ends_with_or_without_cr() {
        assert!(header_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(header_end(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(header_end(b"GET / HTTP/1.1\r\n\r\nbody"));
        assert!(!header_end(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!header_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"));
        assert!(!header_end(b"GET / HTTP/1.1\r\nHost: a\n\r"));
        assert!(header_end(b"\n\n"));
        assert!(!header_end(b""));
    }
}
