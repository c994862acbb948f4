//! Fresh memory hits served without pingora's request session: HTTP/1 requests from the edge's
//! own loop (`serve`), HTTP/2 streams from its HTTP/2 accept loop (small ones without a task).
//! A request is taken only where pingora's path would do nothing but check it, look it up and
//! send the stored response: the checks are the same functions, the response the same bytes,
//! the log line and metrics the same. Everything else (every miss, Range, conditionals, request
//! rules, limits, shields) goes to pingora untouched. On a 1 KiB hit this halves the
//! instructions (load/README.md).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue};
use pingora::http::{HeaderNameVariant, ResponseHeader};
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::http::v2::server::HttpSession as H2Session;
use pingora::protocols::Stream;
use pingora_cache::CachePhase;
use tokio::io::AsyncWriteExt;

use crate::admission::Connection;
use crate::cache::Stored;
use crate::cache::{self, SharedCache};
use crate::identity::HeaderPlan;
use crate::logs;
use crate::metrics;
use crate::proxy::{admitted, normal_host, path_is_normal, InFlight, CACHE_STATUS};
use crate::reason::CacheResult;
use crate::routes::Access;
use crate::rules::Phase;
use crate::state::{Live, State};

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

/// A request taken: what its response and its log line need.
struct Taken {
    state: Arc<State>,
    route: Arc<str>,
    stored: Stored,
    /// Its `Age`, as of the lookup.
    age: u64,
    started: Instant,
    _in_flight: InFlight,
}

/// Whether any request on `conn` may be taken under `state`: not with request rules or a rate
/// limit to run, nor on a listener for edges. Checked before the request is parsed, so that
/// such edges pay nothing for this path.
fn applies(state: &State, conn: &Connection) -> bool {
    !state.for_edges(&conn.identity.listener) && state.limits.rate.is_none() && !state.rules.has_phase(Phase::Request)
}

impl Hits {
    /// The checks before the lookup, as pingora's path makes them (its admission, `proxy::route`),
    /// then the lookup. `None` leaves the request to pingora, which refuses what fails them.
    fn take(
        &self,
        state: Arc<State>,
        conn: &Connection,
        ip: impl FnOnce() -> String,
        (host, target, path): (&str, &str, &str),
    ) -> Option<Taken> {
        let started = Instant::now();
        let listener = &conn.identity.listener;
        let ip = || conn.identity.client_ip.get_or_init(ip).as_str();
        if !admitted(&state, conn, ip) {
            return None;
        }
        let policy = state.listener(listener)?.select(Some(host));
        if policy.sni_name != conn.identity.sni_policy || !path_is_normal(path) {
            return None;
        }
        let route = state.routes.find(Some(host), path)?;
        if route.cache_ttl.is_none() || (route.access == Access::Authenticated && conn.identity.cert.is_none()) {
            return None;
        }
        let now = SystemTime::now();
        let stored = self.cache.fresh_memory_hit(&cache::key(host, target, ""), now)?;
        let age = stored.age(now).as_secs();
        let route = route.label.clone();
        conn.clock.request_started();
        metrics::DIRECT_HITS.inc();
        Some(Taken {
            state,
            route,
            stored,
            age,
            started,
            _in_flight: InFlight::new(),
        })
    }

    /// Serves the HTTP/1 request in `buf` from the memory tier if it is a fresh hit this path
    /// may take.
    pub async fn serve(&self, stream: &mut Stream, buf: &[u8], conn: &Connection) -> Served {
        let state = self.live.load_full();
        if !applies(&state, conn) {
            return Served::No;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Some(req) = plain(buf, state.limits.max_header_bytes, &state.headers, &mut headers) else {
            return Served::No;
        };
        let Some(taken) = self.take(state, conn, || peer_ip(stream), (&req.host, req.target, req.path)) else {
            return Served::No;
        };
        let head = response_head(taken.stored.header(), taken.age, &get_cached_date(), req.keep_alive);
        let mut sent = 0u64;
        let wrote = async {
            stream.write_all(&head).await?;
            for chunk in taken.stored.body() {
                stream.write_all(chunk).await?;
                sent += chunk.len() as u64;
            }
            stream.flush().await?;
            if !req.keep_alive {
                stream.shutdown().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        let served = account(taken, conn, "HTTP/1.1", &req.host, req.path, wrote.is_ok(), sent);
        match served {
            true if req.keep_alive => Served::Yes,
            _ => Served::Closed,
        }
    }

    /// Takes the HTTP/2 stream `session` of `conn` if it is a fresh hit this path may take;
    /// `None` leaves it to pingora.
    pub fn take_h2(&self, session: &H2Session, conn: &Arc<Connection>) -> Option<H2Hit> {
        let state = self.live.load_full();
        if !applies(&state, conn) || !session.is_body_empty() {
            return None;
        }
        let req = session.req_header();
        // As `plain` for HTTP/1; the host comes from `:authority`.
        let plain_headers = req.headers.iter().all(|(name, _)| {
            let n = name.as_str();
            !(n == "connection" || n == "host" || hands_over(n) || n.contains('_') || state.headers.is_edge(name))
        });
        if req.method != http::Method::GET || !plain_headers {
            return None;
        }
        let host = normal_host(req.uri.authority()?.host());
        let target = req.uri.path_and_query()?.as_str();
        let path = req.uri.path().to_string();
        let ip = || {
            session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip().to_string())
                .unwrap_or_default()
        };
        let taken = self.take(state, conn, ip, (&host, target, &path))?;
        Some(H2Hit {
            taken,
            conn: conn.clone(),
            host,
            path,
        })
    }
}

/// Bodies up to this are queued whole from the connection's accept loop (`H2Hit::send_now`): one
/// frame, well inside the 64 KiB window every HTTP/2 client starts with, so queued is sent.
const QUEUED_BODY: usize = 16 << 10;

/// An HTTP/2 stream taken, with what its log line needs.
pub struct H2Hit {
    taken: Taken,
    conn: Arc<Connection>,
    host: String,
    path: String,
}

impl H2Hit {
    fn body_len(&self) -> usize {
        self.taken.stored.body().map(|c| c.len()).sum()
    }

    /// Whether the body is small enough for `send_now`.
    pub fn small(&self) -> bool {
        self.body_len() <= QUEUED_BODY
    }

    /// pingora's hit header (`proxy_cache::cache_hit_header`, its range and our Cache-Status
    /// filter), from the stored one without its case map (HTTP/2 sends names in lower case);
    /// pingora's HTTP/2 writer adds the date and drops hop headers, as on its own path.
    fn head(&self) -> Box<ResponseHeader> {
        let mut parts = self.taken.stored.header().as_owned_parts();
        parts.version = http::Version::HTTP_11;
        let headers = &mut parts.headers;
        headers.insert(http::header::AGE, HeaderValue::from(self.taken.age));
        headers.insert(http::header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let status = HeaderValue::from_static(cache::cache_status(CachePhase::Hit, false));
        headers.insert(HeaderName::from_static(CACHE_STATUS), status);
        Box::new(ResponseHeader::from(parts))
    }

    /// Queues the whole response without waiting, for the connection's next poll to write: the
    /// caller is the loop that drives the connection, so it must not wait on the client's window.
    pub fn send_now(self, session: &mut H2Session) {
        let empty = self.body_len() == 0;
        let mut sent = 0u64;
        let mut queue = || {
            session.write_response_header(self.head(), empty).ok()?;
            if empty {
                return Some(());
            }
            let mut writer = session.take_response_body_writer()?;
            let mut chunks = self.taken.stored.body().peekable();
            while let Some(chunk) = chunks.next() {
                writer.send_data(chunk.clone(), chunks.peek().is_none()).ok()?;
                sent += chunk.len() as u64;
            }
            Some(())
        };
        let whole = queue().is_some();
        account(self.taken, &self.conn, "HTTP/2", &self.host, &self.path, whole, sent);
    }

    /// Sends the response as the client's windows allow.
    pub async fn send(self, session: &mut H2Session) {
        let mut sent = 0u64;
        let wrote = async {
            session.write_response_header(self.head(), false)?;
            let mut chunks = self.taken.stored.body().peekable();
            while let Some(chunk) = chunks.next() {
                session.write_body(chunk.clone(), chunks.peek().is_none()).await?;
                sent += chunk.len() as u64;
            }
            session.finish()
        }
        .await;
        account(self.taken, &self.conn, "HTTP/2", &self.host, &self.path, wrote.is_ok(), sent);
    }
}

/// Ends a request taken: the connection's clock, the metrics and the access line, as
/// `EdgeProxy::logging` writes them. Returns whether the response went out whole.
fn account(taken: Taken, conn: &Connection, protocol: &str, host: &str, path: &str, whole: bool, sent: u64) -> bool {
    conn.clock.request_finished(taken.state.limits.idle_timeout);
    let status = if whole { 200 } else { 0 }; // as pingora logs a response cut by the client
    metrics::count_request(status);
    metrics::count_body_bytes("cache", sent);
    let seconds = taken.started.elapsed().as_secs_f64();
    metrics::REQUEST_SECONDS
        .with_label_values(&[&taken.route, metrics::status_class(status), CacheResult::Hit.as_str()])
        .observe(seconds);
    if logs::access_enabled() {
        // Its first admission (the check `take` makes, or pingora's) has set its address.
        let connection = conn.access_fields(|| conn.identity.client_ip.get().cloned().unwrap_or_default());
        logs::access(&logs::AccessEvent {
            connection,
            protocol,
            method: "GET",
            host,
            path,
            status,
            bytes_sent: sent,
            cache: Some(CacheResult::Hit.as_str()),
            origin: None,
            origin_seconds: None,
            seconds,
            rules: Vec::new(),
            answered: None,
        });
    }
    whole
}

/// The status line and header pingora's hit path sends for a stored response, written from the
/// stored header in place. pingora sets five headers on it, in this order, each named as here:
/// Age, Accept-Ranges and Cache-Status (`proxy_cache`), then Date and Connection (its HTTP/1
/// writer). A header it sets takes the place of the stored one of that name (and its repeats);
/// the others follow the stored ones. The test below holds this to pingora's own inserts.
fn response_head(stored: &ResponseHeader, age: u64, date: &HeaderValue, keep_alive: bool) -> BytesMut {
    let age = age.to_string();
    let set: [(&str, &[u8]); 5] = [
        ("Age", age.as_bytes()),
        ("Accept-Ranges", b"bytes"),
        (CACHE_STATUS, cache::cache_status(CachePhase::Hit, false).as_bytes()),
        ("Date", date.as_bytes()),
        ("Connection", if keep_alive { b"keep-alive" } else { b"close" }),
    ];
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(stored.status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(stored.get_reason_phrase().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut put = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    let mut written = [false; 5];
    // `map` walks the header as pingora's writer does (original case, repeats together).
    let _ = stored.map(|name, value| {
        let name = match name {
            HeaderNameVariant::Case(c) => c.as_slice(),
            HeaderNameVariant::Titled(t) => t.as_bytes(),
        };
        match set.iter().position(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name)) {
            Some(i) if !written[i] => {
                written[i] = true;
                put(set[i].0.as_bytes(), set[i].1);
            }
            Some(_) => {}
            None => put(name, value.as_bytes()),
        }
        Ok(())
    });
    for ((name, value), done) in set.iter().zip(written) {
        if !done {
            put(name.as_bytes(), value);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
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
    use http::header::{ACCEPT_RANGES, AGE, CONNECTION, DATE};

    /// What pingora sends for a hit on `stored`: its own inserts, then its own writer.
    fn pingoras(stored: &ResponseHeader, age: u64, date: &HeaderValue, keep_alive: bool) -> String {
        let mut resp = stored.clone();
        resp.insert_header(AGE, age).unwrap();
        resp.insert_header(ACCEPT_RANGES, "bytes").unwrap();
        resp.insert_header(CACHE_STATUS, "mtls-edge; hit").unwrap();
        resp.insert_header(DATE, date).unwrap();
        resp.insert_header(CONNECTION, if keep_alive { "keep-alive" } else { "close" })
            .unwrap();
        let mut wire = BytesMut::new();
        resp.header_to_h1_wire(&mut wire);
        let reason = resp.get_reason_phrase().unwrap_or("");
        format!(
            "HTTP/1.1 {} {reason}\r\n{}\r\n",
            resp.status.as_str(),
            String::from_utf8_lossy(&wire)
        )
    }

    #[test]
    fn the_head_is_the_one_pingoras_inserts_give() {
        let date = HeaderValue::from_static("Thu, 03 Dec 2026 15:00:00 GMT");
        let with = |build: fn() -> ResponseHeader, headers: &[(&'static str, &'static str)]| {
            let mut h = build();
            for (k, v) in headers {
                h.append_header(*k, *v).unwrap();
            }
            h
        };
        let case = || ResponseHeader::build(200, None).unwrap();
        let no_case = || ResponseHeader::build_no_case(200, None).unwrap();
        let stored = [
            // As the demo origin answers: Date and Connection in the middle.
            with(
                case,
                &[
                    ("Content-Length", "10"),
                    ("x-origin", "a"),
                    ("date", "old"),
                    ("Connection", "keep-alive"),
                    ("ETag", "\"1\""),
                ],
            ),
            // An Age and an Accept-Ranges of its own, repeated headers, none of Date or Connection.
            with(
                case,
                &[
                    ("AGE", "100"),
                    ("Link", "<a>"),
                    ("Content-Length", "1"),
                    ("Link", "<b>"),
                    ("accept-ranges", "none"),
                    ("Age", "7"),
                ],
            ),
            // A stored Cache-Status (a shield's), in another case.
            with(case, &[("Cache-Status", "shield; hit"), ("Content-Length", "1")]),
            with(
                no_case,
                &[("content-length", "5"), ("date", "old"), ("x-a", "1"), ("x-a", "2")],
            ),
        ];
        for h in &stored {
            for keep_alive in [true, false] {
                let ours = response_head(h, 42, &date, keep_alive);
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    pingoras(h, 42, &date, keep_alive),
                    "{h:?}"
                );
            }
        }
    }

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
        for (req, open) in [
            ("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Close\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", false),
            (
                "GET / HTTP/1.0\r\nHost: localhost\r\nConnection: Keep-Alive\r\n\r\n",
                true,
            ),
        ] {
            assert_eq!(verdict(req), Some(("localhost".to_string(), open)), "{req:?}");
        }
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
