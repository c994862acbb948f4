//! Fresh memory hits over HTTP/1.1, served without pingora's request session. A request is taken
//! only where pingora's path would do nothing but check it, look it up and send the stored
//! response: the checks are the same functions, the response the same bytes, the log line and
//! metrics the same. Everything else (every miss, Range, conditionals, request rules, limits,
//! shields) goes to pingora untouched. On a 1 KiB hit this halves the CPU (load/README.md).

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::header::{HeaderName, ACCEPT_RANGES, AGE, CONNECTION, DATE};
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::Stream;
use pingora_cache::{CacheMeta, CachePhase};
use tokio::io::AsyncWriteExt;

use crate::admission::Connection;
use crate::cache::{self, SharedCache};
use crate::identity::HeaderPlan;
use crate::logs;
use crate::metrics;
use crate::proxy::{admitted, normal_host, path_is_normal, InFlight, CACHE_STATUS};
use crate::reason::CacheResult;
use crate::routes::Access;
use crate::rules::Phase;
use crate::state::Live;

/// Request headers past which pingora's path is taken (httparse needs a fixed array).
const MAX_HEADERS: usize = 32;

/// What serving a request here came to.
pub enum Served {
    /// Not taken: pingora serves it, from the same header bytes.
    No,
    /// Answered; the connection may carry the next request.
    Yes,
    /// The connection is done: the client asked to close it, or went away mid-response.
    Closed,
}

/// The hit path, with what it reads: the state in force and the cache.
pub struct Hits {
    pub live: Arc<Live>,
    pub cache: Arc<SharedCache>,
}

/// A request this path may take: a plain GET with nothing pingora would act on.
struct Plain<'b> {
    host: String,
    /// The request target as sent (path and query): the cache key's.
    target: &'b str,
    path: &'b str,
    /// Whether the connection stays open after the response (pingora's `will_keepalive`).
    keep_alive: bool,
}

/// Headers that make pingora do more than send the stored response: a body, ranges,
/// conditionals, an upgrade.
fn hands_over(name: &str) -> bool {
    const NAMES: [&str; 10] = [
        "content-length",
        "transfer-encoding",
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "expect",
        "upgrade",
    ];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Parses `buf` (exactly one request header, nothing after it) as pingora would, and returns it
/// if this path may take it. `None` hands it to pingora.
fn plain<'b>(
    buf: &'b [u8],
    max_header_bytes: usize,
    identity: &HeaderPlan,
    headers: &mut [httparse::Header<'b>; MAX_HEADERS],
) -> Option<Plain<'b>> {
    if buf.len() > max_header_bytes {
        return None;
    }
    let mut req = httparse::Request::new(headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => {}
        _ => return None,
    }
    if req.method != Some("GET") {
        return None;
    }
    let target = req.path.filter(|t| t.starts_with('/'))?;
    let mut host = None;
    let mut connection = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return None;
            }
            host = Some(std::str::from_utf8(h.value).ok()?);
        } else if h.name.eq_ignore_ascii_case("connection") {
            let ask = match h.value {
                v if v.eq_ignore_ascii_case(b"keep-alive") => true,
                v if v.eq_ignore_ascii_case(b"close") => false,
                _ => return None, // a list, an upgrade: pingora reads those
            };
            if connection.replace(ask).is_some() {
                return None;
            }
        } else if hands_over(h.name) || h.name.contains('_') {
            return None;
        } else if identity.is_edge(&HeaderName::from_bytes(h.name.as_bytes()).ok()?) {
            return None; // pingora's path strips and counts it
        }
    }
    // HTTP/1.1 keeps the connection unless told otherwise; 1.0 only when asked (ab, old stacks).
    let keep_alive = match req.version {
        Some(1) => connection != Some(false),
        Some(0) => connection == Some(true),
        _ => return None,
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some(Plain {
        host: normal_host(host?),
        target,
        path,
        keep_alive,
    })
}

impl Hits {
    /// Serves the request in `buf` from the memory tier if it is a fresh hit this path may take.
    pub async fn serve(&self, stream: &mut Stream, buf: &[u8], conn: &Connection) -> Served {
        let started = Instant::now();
        let state = self.live.load_full();
        let listener = &conn.identity.listener;
        // A connection refused under this state is refused by pingora's path, which closes it.
        let ip = || conn.identity.client_ip.get_or_init(|| peer_ip(stream)).as_str();
        if state.for_edges(listener) || !admitted(&state, conn, ip) {
            return Served::No;
        }
        if state.limits.rate.is_some() || state.rules.has_phase(Phase::Request) {
            return Served::No;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Some(req) = plain(buf, state.limits.max_header_bytes, &state.headers, &mut headers) else {
            return Served::No;
        };
        // The checks of `proxy::route`, which refuse what fails them: pingora's path does that.
        let covered = state
            .listener(listener)
            .is_some_and(|l| l.select(Some(&req.host)).sni_name == conn.identity.sni_policy);
        if !covered || !path_is_normal(req.path) {
            return Served::No;
        }
        let Some(route) = state.routes.find(Some(&req.host), req.path) else {
            return Served::No;
        };
        if route.cache_ttl.is_none() || (route.access == Access::Authenticated && conn.identity.cert.is_none()) {
            return Served::No;
        }
        let key = cache::key(&req.host, req.target, "");
        let Some((meta, mut body)) = self.cache.fresh_memory_hit(&key) else {
            return Served::No;
        };
        let Some(head) = response_head(&meta, req.keep_alive) else {
            return Served::No;
        };
        let _in_flight = InFlight::new();
        conn.clock.request_started();
        metrics::DIRECT_HITS.inc();
        let mut sent = 0u64;
        let wrote = async {
            stream.write_all(&head).await?;
            while let Ok(Some(chunk)) = pingora_cache::storage::HandleHit::read_body(&mut *body).await {
                sent += chunk.len() as u64;
                stream.write_all(&chunk).await?;
            }
            stream.flush().await?;
            if !req.keep_alive {
                stream.shutdown().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        conn.clock.request_finished(state.limits.idle_timeout);
        let served = match wrote {
            Ok(()) => 200,
            Err(_) => 0, // as pingora logs a response cut by the client
        };
        metrics::count_request(served);
        metrics::count_body_bytes("cache", sent);
        let seconds = started.elapsed().as_secs_f64();
        metrics::REQUEST_SECONDS
            .with_label_values(&[&route.label, metrics::status_class(served), CacheResult::Hit.as_str()])
            .observe(seconds);
        if logs::access_enabled() {
            let connection = conn.access_fields.get_or_init(|| {
                let ip = conn.identity.client_ip.get_or_init(|| peer_ip(stream));
                let id = &conn.identity;
                logs::ConnectionFields::new(&id.listener, ip, id.sni.as_deref(), id.cert.as_ref())
            });
            logs::access(&logs::AccessEvent {
                connection,
                protocol: "HTTP/1.1",
                method: "GET",
                host: &req.host,
                path: req.path,
                status: served,
                bytes_sent: sent,
                cache: Some(CacheResult::Hit.as_str()),
                origin: None,
                origin_seconds: None,
                seconds,
                rules: Vec::new(),
                answered: None,
            });
        }
        match served {
            200 if req.keep_alive => Served::Yes,
            _ => Served::Closed,
        }
    }
}

/// The status line and header pingora's hit path sends for `meta`: the stored header with, in
/// its order, Age, Accept-Ranges and Cache-Status (`proxy_cache`), then Date and Connection as its
/// HTTP/1 writer sets them. `None` if the stored header cannot take them.
fn response_head(meta: &CacheMeta, keep_alive: bool) -> Option<BytesMut> {
    let mut resp = meta.response_header_copy();
    resp.insert_header(AGE, meta.age().as_secs()).ok()?;
    resp.insert_header(ACCEPT_RANGES, "bytes").ok()?;
    resp.insert_header(CACHE_STATUS, cache::cache_status(CachePhase::Hit, false))
        .ok()?;
    resp.insert_header(DATE, get_cached_date()).ok()?;
    resp.insert_header(CONNECTION, if keep_alive { "keep-alive" } else { "close" })
        .ok()?;
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(resp.get_reason_phrase().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    resp.header_to_h1_wire(&mut out);
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// The client's IP address from the socket, as `proxy::client_ip` reads it from pingora's session.
fn peer_ip(stream: &Stream) -> String {
    stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::HeaderNames;

    /// `plain`'s verdict on `req`: the host and whether the connection stays open.
    fn verdict(req: &str) -> Option<(String, bool)> {
        let plan = HeaderPlan::new(HeaderNames::default());
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        plain(req.as_bytes(), 1024, &plan, &mut headers).map(|p| (p.host, p.keep_alive))
    }

    #[test]
    fn a_plain_get_is_taken_with_its_host_as_routes_read_it() {
        let plan = HeaderPlan::new(HeaderNames::default());
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = b"GET /fw/a.bin?v=2 HTTP/1.1\r\nHost: Edge.Example:8443\r\nUser-Agent: d\r\n\r\n";
        let p = plain(req, 1024, &plan, &mut headers).unwrap();
        assert_eq!(
            (p.host.as_str(), p.target, p.path, p.keep_alive),
            ("edge.example", "/fw/a.bin?v=2", "/fw/a.bin", true)
        );
    }

    #[test]
    fn the_connection_stays_open_as_pingora_keeps_it() {
        let host = || "localhost".to_string();
        assert_eq!(
            verdict("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            Some((host(), true))
        );
        assert_eq!(
            verdict("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Close\r\n\r\n"),
            Some((host(), false))
        );
        assert_eq!(
            verdict("GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"),
            Some((host(), false))
        );
        assert_eq!(
            verdict("GET / HTTP/1.0\r\nHost: localhost\r\nConnection: Keep-Alive\r\n\r\n"),
            Some((host(), true))
        );
    }

    #[test]
    fn anything_pingora_would_act_on_goes_to_pingora() {
        let refused = [
            "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nif-none-match: \"x\"\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nCloudFront-Viewer-Cert-Subject: CN=admin\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
            "GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
            "garbage\r\n\r\n",
        ];
        for req in refused {
            assert_eq!(verdict(req), None, "{req:?} was taken");
        }
        let long = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\n\r\n", "p".repeat(1024));
        assert_eq!(verdict(&long), None, "a header over the limit was taken");
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(verdict(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")), None);
    }
}
