//! The proxy hooks, in the order pingora calls them, each a short call into its stage: the
//! connection's admission (identity from the TLS session, re-checked after a reload) → spoofed
//! identity headers stripped → fleet separation (Host against the SNI policy) → route and access →
//! request-phase rules → cache → peer (the object's shield node, or the origin) → identity and
//! rule headers toward it → failure accounting → metrics and the access log. A request reads the
//! state in force once, at its header, and finishes under it. On a shield, a request from an edge
//! keeps the device's identity headers and takes the edge's cache-key variants and origin in
//! place of the rules, which the edge ran.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use log::{debug, warn};
use pingora::prelude::*;
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::{CacheKey, CacheMeta, RespCacheable};

use crate::admission::{self, Connection};
use crate::cache::{self, SharedCache};
use crate::fill;
use crate::identity::Viewer;
use crate::limits::{self, Guard};
use crate::origin::{self, Origin};
use crate::reason::{Answered, CacheResult, Limit};
use crate::routes::Access;
use crate::rules::{self, Decision, HeaderOp, Outcome, Phase};
use crate::shield::{self, Fallback, Pick, Tried};
use crate::state::{Live, State};
use crate::{logs, metrics};

pub struct EdgeProxy {
    pub live: Arc<Live>,
    /// The devices' request buckets (and the connection deadlines).
    pub limits: Arc<Guard>,
    /// The cache outlives reloads: its memory is fixed for the process.
    pub cache: Option<Arc<SharedCache>>,
}

/// Per-request state handed from hook to hook.
pub struct RequestCtx {
    started: Instant,
    _in_flight: InFlight,
    /// The state the request started under.
    state: Option<Arc<State>>,
    conn: Option<Arc<Connection>>,
    /// The request came from an edge: this node is its shield.
    from_edge: bool,
    /// The origin the route (or a rule, or the edge) chose.
    origin: Option<Arc<Origin>>,
    /// The peer the request went to: that origin, or a shield node.
    peer: Option<Arc<Origin>>,
    /// The cache-key variants (see `key_variants`), on cached routes.
    variants: String,
    /// What places the object on the shield ring (its cache key's hash), when there is a shield.
    shield_key: Option<HashBinary>,
    /// The shield node of the current attempt, and the nodes tried before it.
    shield_node: Option<usize>,
    shield_tried: Tried,
    route: Option<Arc<str>>,
    /// Host the request addressed (lowercased, no port), for the cache key.
    host: String,
    /// The route's default TTL when the route is cached.
    cache_ttl: Option<u32>,
    /// Whether the origin's response was admitted to the cache.
    stored: bool,
    /// The origin answered a revalidation with 304: the stored body stays, nothing is filled.
    not_modified: bool,
    /// What the request-phase rules decided.
    rules: Option<Outcome>,
    /// Why the edge answered the request itself.
    answered: Option<Answered>,
    /// When the origin peer was chosen, and when the request went to it.
    origin_connect: Option<Instant>,
    origin_request: Option<Instant>,
    origin_seconds: Option<f64>,
    /// This request is the fill of an HTTP/2 request (`fill`), with that request's decisions.
    fill: bool,
    /// This HTTP/2 request was answered by its fill, which writes the access line.
    piped: bool,
}

/// A request's decisions, which its fill (`fill`) takes in place of running the stages again.
struct Decided {
    state: Arc<State>,
    conn: Arc<Connection>,
    origin: Option<Arc<Origin>>,
    variants: String,
    route: Option<Arc<str>>,
    host: String,
    cache_ttl: Option<u32>,
    rules: Option<Outcome>,
}

impl RequestCtx {
    fn decided(&self, state: &Arc<State>, conn: &Arc<Connection>) -> Decided {
        Decided {
            state: state.clone(),
            conn: conn.clone(),
            origin: self.origin.clone(),
            variants: self.variants.clone(),
            route: self.route.clone(),
            host: self.host.clone(),
            cache_ttl: self.cache_ttl,
            rules: self.rules.clone(),
        }
    }

    fn take_decisions(&mut self, d: Decided) {
        self.state = Some(d.state);
        self.conn = Some(d.conn);
        self.origin = d.origin;
        self.variants = d.variants;
        self.route = d.route;
        self.host = d.host;
        self.cache_ttl = d.cache_ttl;
        self.rules = d.rules;
        self.fill = true;
    }
}

pub(crate) const CACHE_STATUS: &str = "cache-status";

/// Counts a request in flight for as long as its context lives.
pub(crate) struct InFlight;

impl InFlight {
    pub(crate) fn new() -> InFlight {
        metrics::REQUESTS_IN_FLIGHT.inc();
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::REQUESTS_IN_FLIGHT.dec();
    }
}

/// The connection the handshake recorded (HTTP/1.1 and HTTP/2 alike).
fn connection(session: &Session) -> Option<Arc<Connection>> {
    let digest = session.digest()?.ssl_digest.as_ref()?;
    digest.extension.get::<Arc<Connection>>().cloned()
}

/// The request's host, lowercased, without a port: from the URI authority (HTTP/2) or Host.
fn request_host(req: &RequestHeader) -> Option<String> {
    match req.uri.authority() {
        Some(a) => Some(normal_host(a.host())),
        None => Some(normal_host(req.headers.get(http::header::HOST)?.to_str().ok()?)),
    }
}

/// A Host value as routes and keys read it: lowercased, without a port (bracketed IPv6 literals
/// kept whole) or a trailing dot.
pub(crate) fn normal_host(h: &str) -> String {
    let h = match h.rfind(':') {
        Some(i) if !h[i..].contains(']') => &h[..i],
        _ => h,
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a request path is in normal form: no empty, `.` or `..` segments, and no encoded dot,
/// slash or backslash. Routes and rules match on the path as sent, and origins often resolve
/// these forms: `/images/x1/../x2/fw.bin` would pass a rule that allows `/images/x1/` and reach
/// x2's image. Such paths are refused rather than rewritten.
pub(crate) fn path_is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    // One pass: every request makes this check.
    let mut segment = 1; // where the current segment starts
    for i in 1..=b.len() {
        match b.get(i) {
            None | Some(b'/') => {
                // Only the last segment may be empty (a trailing slash, or the root).
                let seg = &b[segment..i];
                if seg == b"." || seg == b".." || (seg.is_empty() && i < b.len()) {
                    return false;
                }
                segment = i + 1;
            }
            Some(b'\\') => return false,
            Some(b'%') => {
                let code = (b.get(i + 1).copied(), b.get(i + 2).map(u8::to_ascii_lowercase));
                if matches!(code, (Some(b'2'), Some(b'e' | b'f')) | (Some(b'5'), Some(b'c'))) {
                    return false;
                }
            }
            Some(_) => {}
        }
    }
    true
}

/// The request line and headers, in bytes as sent (near enough: `: ` and CRLF included).
fn header_bytes(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let authority = req.uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method.as_str().len() + target + authority + 12;
    req.headers.iter().fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// The client's IP address as rules and logs read it (`""` when the socket has none).
fn client_ip<'c>(session: &Session, conn: &'c Connection) -> &'c str {
    conn.identity.client_ip.get_or_init(|| {
        session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default()
    })
}

impl RequestCtx {
    /// Answers with `status` and a plain-text `body`, keeping the connection usable.
    async fn respond(&mut self, session: &mut Session, why: Answered, status: u16, body: &str) -> Result<bool> {
        self.answered = Some(why);
        debug!("request answered by the edge status={status} reason={}", why.as_str());
        let mut resp = ResponseHeader::build(status, Some(2))?;
        resp.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        session.write_response_header(Box::new(resp), body.is_empty()).await?;
        if !body.is_empty() {
            session
                .write_response_body(Some(bytes::Bytes::copy_from_slice(body.as_bytes())), true)
                .await?;
        }
        Ok(true)
    }

    /// Answers 429 with the seconds until the device may ask again.
    async fn rate_limited(&mut self, session: &mut Session, retry_after: u64) -> Result<bool> {
        self.answered = Some(Answered::RateLimited);
        let mut resp = ResponseHeader::build(429, Some(2))?;
        resp.insert_header(http::header::RETRY_AFTER, retry_after)?;
        resp.insert_header(http::header::CONTENT_LENGTH, 0)?;
        session.write_response_header(Box::new(resp), true).await?;
        Ok(true)
    }

    /// Answers with pingora's error page for `status`.
    async fn refuse(&mut self, session: &mut Session, why: Answered, status: u16) -> Result<bool> {
        self.answered = Some(why);
        debug!("request refused status={status} reason={}", why.as_str());
        session.respond_error(status).await?;
        Ok(true)
    }
}

/// Stage: the connection may still be served under `state` (its handshake's rules, and after a
/// reload its certificate and connection rules again). A refused connection gets no answer.
async fn admit(session: &mut Session, ctx: &mut RequestCtx, state: &State, conn: &Connection) -> Result<bool> {
    if admitted(state, conn, || client_ip(session, conn)) {
        return Ok(false);
    }
    // Close, answer nothing; over HTTP/2 the stream is reset (pingora 0.9 cannot close the
    // connection from a stream: each of its streams is reset in turn).
    ctx.answered = Some(Answered::ConnectionRefused);
    session.set_keepalive(None);
    session.shutdown().await;
    Ok(true)
}

/// Whether the connection may still be served under `state` (`Connection::check`); `ip` is
/// asked for only when it has not yet been admitted under it.
pub(crate) fn admitted<'c>(state: &State, conn: &'c Connection, ip: impl FnOnce() -> &'c str) -> bool {
    if conn.admitted_under(state.generation) {
        return true;
    }
    let policy = state
        .listener(&conn.identity.listener)
        .map(|l| l.select(conn.identity.sni.as_deref()).clone());
    let current = admission::Current {
        generation: state.generation,
        trust_store: policy.as_ref().and_then(|p| p.trust_store.as_deref()),
        cert_required: policy
            .as_ref()
            .is_some_and(|p| p.mode == crate::viewer_tls::Mode::Required),
        rules: state.rules_for(&conn.identity.listener),
    };
    conn.check(&current, ip()).is_ok()
}

/// Stage: the route for the request, and who may read it. Authorization runs before any cache
/// lookup: a client that may not read the route never reaches the cache.
async fn route(session: &mut Session, ctx: &mut RequestCtx, state: &State, conn: &Connection) -> Result<bool> {
    let host = request_host(session.req_header());
    // A connection verified under one SNI policy may only address that policy's hosts, and a
    // connection under the default policy may not address a host that has its own policy.
    let covered = state
        .listener(&conn.identity.listener)
        .is_some_and(|l| l.select(host.as_deref()).sni_name == conn.identity.sni_policy);
    if !covered {
        return ctx.refuse(session, Answered::HostNotCoveredBySni, 421).await;
    }
    let path = session.req_header().uri.path();
    if !path_is_normal(path) {
        return ctx
            .respond(
                session,
                Answered::PathNotNormal,
                400,
                "the request path is not in normal form\n",
            )
            .await;
    }
    let Some(route) = state.routes.find(host.as_deref(), path) else {
        return ctx.refuse(session, Answered::NoRoute, 404).await;
    };
    if route.access == Access::Authenticated && conn.identity.cert.is_none() {
        return ctx.refuse(session, Answered::CertificateRequiredForRoute, 403).await;
    }
    ctx.origin = Some(route.origin.clone());
    ctx.route = Some(route.label.clone());
    ctx.cache_ttl = route.cache_ttl;
    ctx.host = host.unwrap_or_default();
    Ok(false)
}

/// Calls `f` with what the request phase's expressions read of this request.
fn with_request_facts<T>(
    session: &Session,
    host: &str,
    client_ip: &str,
    state: &State,
    conn: &Connection,
    f: impl FnOnce(&rules::Facts) -> T,
) -> T {
    let req = session.req_header();
    let info = rules::RequestInfo {
        method: req.method.as_str(),
        host,
        path: req.uri.path(),
        query: req.uri.query().unwrap_or(""),
        headers: &req.headers,
    };
    f(&rules::Facts {
        cert: conn.identity.cert.as_ref(),
        verified: true,
        connection: &conn.identity.info,
        client_ip,
        request: Some(&info),
        lists: state.rules.lists(),
        now: rules::facts::unix_now(),
    })
}

/// The bucket a request takes its token from: the configured key expression's value, else its
/// certificate's serial, else its IP. A key that fails to evaluate falls back to the latter,
/// so that no request escapes the limit.
fn rate_key<'c>(session: &Session, state: &State, conn: &'c Connection) -> Cow<'c, [u8]> {
    if let Some(key) = &state.limits.rate_key {
        let host = request_host(session.req_header()).unwrap_or_default();
        let ip = client_ip(session, conn);
        match with_request_facts(session, &host, ip, state, conn, |facts| key.eval(facts)) {
            Ok(k) => return Cow::Owned(k.into_bytes()),
            Err(e) => {
                metrics::RATE_KEY_ERRORS.inc();
                debug!("limits.rate_limit.key failed ({e}); the device's own bucket is used");
            }
        }
    }
    Cow::Borrowed(match &conn.identity.cert {
        Some(c) => c.serial_hex.as_bytes(),
        None => client_ip(session, conn).as_bytes(),
    })
}

/// Stage: the request-phase rules, still before any cache lookup.
async fn request_rules(session: &mut Session, ctx: &mut RequestCtx, state: &State, conn: &Connection) -> Result<bool> {
    if !state.rules.has_phase(Phase::Request) {
        return Ok(false);
    }
    let ip = match state.rules.uses_client_ip() {
        true => client_ip(session, conn),
        false => "",
    };
    let outcome = with_request_facts(session, &ctx.host, ip, state, conn, |facts| {
        state.rules.evaluate(&[Phase::Request], facts, None)
    });
    let denied = match &outcome.decision {
        Decision::Deny { status, body, .. } => Some((Answered::RuleDenied, *status, body.to_string())),
        Decision::Error { .. } => Some((Answered::RuleError, 500, "rule evaluation error\n".to_string())),
        Decision::Allow { .. } | Decision::Continue => None,
    };
    if let Some(name) = &outcome.origin {
        ctx.origin = state.origins.get(name).cloned();
    }
    if ctx.cache_ttl.is_some() {
        ctx.variants = key_variants(&outcome);
    }
    ctx.rules = Some(outcome);
    match denied {
        Some((why, status, body)) => ctx.respond(session, why, status, &body).await,
        None => Ok(false),
    }
}

/// Stage, on a shield, for a request from an edge: the edge's cache-key variants and origin, in
/// place of the request rules, which the edge ran for its device. Keys are thus the same on both
/// tiers, and so is the origin.
async fn edge_decisions(session: &mut Session, ctx: &mut RequestCtx, state: &State) -> Result<bool> {
    let headers = &session.req_header().headers;
    let variants = headers.get(shield::VARIANTS_HEADER).map(shield::decode_variants);
    let origin = headers
        .get(shield::ORIGIN_HEADER)
        .map(|v| v.to_str().ok().and_then(|n| state.origins.get(n)).cloned());
    match variants {
        Some(None) => {
            let body = "the cache-key variants header is not percent-encoded UTF-8\n";
            return ctx.respond(session, Answered::EdgeVariantsInvalid, 400, body).await;
        }
        Some(Some(v)) => ctx.variants = v,
        None => {}
    }
    match origin {
        Some(None) => {
            let body = "the origin the edge chose is not configured on this shield\n";
            ctx.respond(session, Answered::EdgeOriginUnknown, 502, body).await
        }
        Some(Some(o)) => {
            ctx.origin = Some(o);
            Ok(false)
        }
        None => Ok(false),
    }
}

/// What may change the origin's answer is part of the cache key: the cohort, an origin chosen
/// by a rule, and the headers rules set toward it.
fn key_variants(outcome: &Outcome) -> String {
    let mut variants = String::new();
    if let Some(c) = &outcome.cohort {
        cache::push_variant(&mut variants, "cohort", "", c);
    }
    if let Some(o) = &outcome.origin {
        cache::push_variant(&mut variants, "origin", "", o);
    }
    for (n, v) in outcome.headers_set() {
        cache::push_variant(
            &mut variants,
            "header:",
            n.as_str(),
            &String::from_utf8_lossy(v.as_bytes()),
        );
    }
    variants
}

impl EdgeProxy {
    /// An HTTP/2 GET that would start a fill (nothing stored or filling for its key) is served by
    /// a fill of its own (`fill`), so that the fill runs at the origin's pace whatever this client
    /// reads. Everything else, and every request coalesced on a fill, takes pingora's path.
    fn starts_a_fill_over_http2(&self, session: &Session, ctx: &RequestCtx) -> bool {
        let (Some(cache), Some(_)) = (&self.cache, ctx.cache_ttl) else {
            return false;
        };
        let req = session.req_header();
        if !session.is_http2() || req.method != http::Method::GET || !pingora_cache::filters::request_cacheable(req) {
            return false;
        }
        cache.lacks(&request_key(req, ctx))
    }
}

/// The request's cache key: its host, path and query, and the variants its rules chose.
fn request_key(req: &RequestHeader, ctx: &RequestCtx) -> CacheKey {
    let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
    cache::key(&ctx.host, path_and_query, &ctx.variants)
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    /// No downstream modules: pingora's default is a response compression module, disabled,
    /// that every request would still build and run through. The edge compresses nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            _in_flight: InFlight::new(),
            state: None,
            conn: None,
            from_edge: false,
            origin: None,
            peer: None,
            variants: String::new(),
            shield_key: None,
            shield_node: None,
            shield_tried: Tried::default(),
            route: None,
            host: String::new(),
            cache_ttl: None,
            stored: false,
            not_modified: false,
            rules: None,
            answered: None,
            origin_connect: None,
            origin_request: None,
            origin_seconds: None,
            fill: false,
            piped: false,
        }
    }

    /// HTTP/2 requests may start their fill as a subrequest (`fill`).
    fn allow_spawning_subrequest(&self, session: &Session, _ctx: &RequestCtx) -> bool {
        self.cache.is_some() && session.is_http2()
    }

    /// The request's header has arrived: the connection's deadline waits until it is served.
    async fn early_request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        if fill::is_fill::<Decided>(session) {
            return Ok(()); // its request holds the connection's clock
        }
        ctx.conn = connection(session);
        if let Some(c) = &ctx.conn {
            c.clock.request_started();
        }
        Ok(())
    }

    /// Admission, header stripping, limits, fleet separation, routing and request rules, before
    /// anything else runs.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(decided) = fill::take_order::<Decided>(session) {
            ctx.take_decisions(decided);
            return Ok(false);
        }
        let state = self.live.load_full();
        ctx.from_edge = ctx.conn.as_ref().is_some_and(|c| state.for_edges(&c.identity.listener));
        // Strip first, whatever happens next: nothing downstream may see a client-sent copy. An
        // edge's copies are the device's, which that edge set: they are kept.
        let stripped = match ctx.from_edge {
            false => state.headers.strip(session.req_header_mut()),
            true => Default::default(),
        };
        let Some(conn) = ctx.conn.clone() else {
            // Every listener is TLS with our callbacks; no identity means something is wrong.
            return ctx.refuse(session, Answered::NoConnectionIdentity, 403).await;
        };
        ctx.state = Some(state.clone());
        if admit(session, ctx, &state, &conn).await? {
            return Ok(true);
        }
        if ctx.from_edge {
            // The edge applied the limits to its device.
            if route(session, ctx, &state, &conn).await? {
                return Ok(true);
            }
            return edge_decisions(session, ctx, &state).await;
        }
        if header_bytes(session.req_header()) > state.limits.max_header_bytes {
            limits::count(Limit::HeaderTooLarge);
            session.set_keepalive(None);
            return ctx.refuse(session, Answered::HeaderTooLarge, 431).await;
        }
        if let Some(rate) = state.limits.rate {
            if let Err(retry_after) = self.limits.take(&rate_key(session, &state, &conn), rate) {
                return ctx.rate_limited(session, retry_after).await;
            }
        }
        if stripped.spoofed > 0 {
            metrics::SPOOFED_HEADERS
                .with_label_values(&[&conn.identity.listener])
                .inc_by(stripped.spoofed as u64);
            debug!(
                "removed {} client-sent edge headers listener={}",
                stripped.spoofed, conn.identity.listener
            );
        }
        if stripped.underscored > 0 {
            let action = if stripped.refuse { "refused" } else { "dropped" };
            metrics::UNDERSCORE_HEADERS
                .with_label_values(&[&conn.identity.listener, action])
                .inc_by(stripped.underscored as u64);
            if stripped.refuse {
                return ctx.refuse(session, Answered::UnderscoreInHeaderName, 400).await;
            }
        }
        if route(session, ctx, &state, &conn).await? || request_rules(session, ctx, &state, &conn).await? {
            return Ok(true);
        }
        if self.starts_a_fill_over_http2(session, ctx) && fill::serve(session, ctx.decided(&state, &conn)).await {
            ctx.piped = true;
            return Ok(true);
        }
        Ok(false)
    }

    /// Turns the cache on for GET and HEAD on cached routes (after `request_filter` allowed it).
    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        if let (Some(_), Some(cache)) = (ctx.cache_ttl, &self.cache) {
            if pingora_cache::filters::request_cacheable(session.req_header()) {
                cache.enable(session);
            }
        }
        Ok(())
    }

    /// Host, path and query, and what rules chose: see `cache::key`.
    fn cache_key_callback(&self, session: &Session, ctx: &mut RequestCtx) -> Result<CacheKey> {
        let key = request_key(session.req_header(), ctx);
        // A shield's misses for edges go to the origin: tiers are two deep, so that nodes that
        // shield one another (each listing all of them) never pass a miss around.
        if !ctx.from_edge && ctx.state.as_ref().is_some_and(|s| s.shield.is_some()) {
            ctx.shield_key = Some(key.primary_bin());
        }
        Ok(key)
    }

    /// The request that fills the cache writes to its client through pingora's cancel-safe task
    /// queue, so the proxy loop keeps reading the origin into the cache while that client is slow:
    /// the fill runs at the origin's pace and the client becomes one reader of it, like the waiters.
    fn cache_miss(&self, session: &mut Session, _ctx: &mut RequestCtx) {
        session.cache.cache_miss();
        session.set_proxy_tasks_enabled(true); // a no-op on HTTP/2, which pingora 0.9 does not queue
    }

    /// A cache miss goes to its object's shield node while one can take it; anything else, and a
    /// miss that no shield node took, to the origin (unless `shield.fallback` is `none`).
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        ctx.origin_connect = Some(Instant::now());
        ctx.shield_node = None;
        let shield = ctx.state.as_ref().and_then(|s| s.shield.as_ref());
        if let (Some(shield), Some(key)) = (shield, &ctx.shield_key) {
            match shield.next(key, ctx.shield_tried) {
                Pick::Node(i, node) => {
                    let peer = node.peer();
                    ctx.shield_node = Some(i);
                    ctx.peer = Some(node.clone());
                    return Ok(peer);
                }
                Pick::Itself => {}
                Pick::Nowhere if shield.fallback == Fallback::None => {
                    return Err(Error::create(
                        ErrorType::ConnectNoRoute,
                        ErrorSource::Upstream,
                        Some("no shield node could take the miss, and shield.fallback is none".into()),
                        None,
                    ));
                }
                Pick::Nowhere => metrics::SHIELD_FALLBACKS.inc(),
            }
        }
        ctx.peer = ctx.origin.clone();
        match &ctx.origin {
            Some(o) => Ok(o.peer()),
            None => Error::e_explain(ErrorType::InternalError, "no route chosen before upstream_peer"),
        }
    }

    /// A shield node that failed the connection is passed over for a while, and the miss is tried
    /// again on the next node of its ring (or the origin).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let shield = ctx.state.as_ref().and_then(|s| s.shield.as_ref());
        if let (Some(i), Some(shield)) = (ctx.shield_node, shield) {
            shield.mark_down(i);
            ctx.shield_tried.add(i);
            let reason = origin::failure_reason(&e).as_str();
            metrics::SHIELD_PASSED_OVER
                .with_label_values(&[shield.name(i), reason])
                .inc();
            warn!(
                "shield node passed over; the miss moves on shield={} reason={reason} error=\"{e}\"",
                shield.name(i)
            );
            e.set_retry(true);
        }
        e
    }

    /// Times new origin connections (TCP and TLS).
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (false, Some(started), Some(o)) = (reused, ctx.origin_connect, &ctx.peer) {
            metrics::ORIGIN_CONNECT_SECONDS
                .with_label_values(&[&o.name])
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Sets the identity and viewer headers from the connection, then applies the rules'.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.origin_request = Some(Instant::now());
        if ctx.from_edge {
            // The device's identity headers came from its edge; the control headers were read.
            upstream.remove_header(shield::VARIANTS_HEADER);
            upstream.remove_header(shield::ORIGIN_HEADER);
        } else if let (Some(state), Some(conn)) = (&ctx.state, &ctx.conn) {
            let viewer = Viewer {
                addr: session.client_addr().and_then(|a| a.as_inet()).copied(),
                info: &conn.identity.info,
                version: session.req_header().version,
            };
            for (name, value) in state.headers.render(conn.identity.cert.as_ref(), &conn.identity.chain, &viewer) {
                upstream.insert_header(name, value)?;
            }
        }
        for op in ctx.rules.iter().flat_map(|o| &o.headers) {
            match op {
                HeaderOp::Set(name, value) => {
                    upstream.insert_header(name.clone(), value.clone())?;
                }
                HeaderOp::Remove(name) => {
                    upstream.remove_header(name);
                }
            }
        }
        if ctx.shield_node.is_some() {
            if let Some(v) = shield::encode_variants(&ctx.variants) {
                upstream.insert_header(shield::VARIANTS_HEADER, v)?;
            }
            if let Some(o) = &ctx.origin {
                upstream.insert_header(shield::ORIGIN_HEADER, &*o.name)?;
            }
        }
        Ok(())
    }

    /// Times the origin's answer, and notes a 304 (pingora runs this before
    /// `response_cache_filter` on 304s).
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(started), Some(o)) = (ctx.origin_request, &ctx.peer) {
            let seconds = started.elapsed().as_secs_f64();
            ctx.origin_seconds = Some(seconds);
            metrics::ORIGIN_RESPONSE_SECONDS
                .with_label_values(&[&o.name])
                .observe(seconds);
        }
        ctx.not_modified = resp.status == http::StatusCode::NOT_MODIFIED;
        Ok(())
    }

    fn response_cache_filter(
        &self,
        _session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        let mut decision = cache::cacheable(resp, ctx.cache_ttl.unwrap_or(0));
        if let (Some(c), false) = (&self.cache, ctx.not_modified) {
            decision = c.reserve_fill(decision, resp);
        }
        ctx.stored = matches!(decision, RespCacheable::Cacheable(_));
        Ok(decision)
    }

    /// Separates the stored variants of a response that has `Vary`.
    fn cache_vary_filter(&self, meta: &CacheMeta, _ctx: &mut RequestCtx, req: &RequestHeader) -> Option<HashBinary> {
        cache::variance(meta.headers(), req)
    }

    /// Adds an RFC 9211 `Cache-Status` on cached routes: after the entries of the caches the
    /// response came through (a shield's) when it came from upstream; alone on a hit.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.cache_ttl.is_some() && self.cache.is_some() {
            let ours = cache::cache_status(session.cache.phase(), ctx.stored);
            let upstream = match session.cache.upstream_used() {
                true => resp.headers.get(CACHE_STATUS).and_then(|v| v.to_str().ok()),
                false => None,
            };
            match upstream {
                Some(theirs) => {
                    let value = format!("{theirs}, {ours}");
                    resp.insert_header(CACHE_STATUS, value)?;
                }
                None => resp.insert_header(CACHE_STATUS, ours)?,
            }
        }
        Ok(())
    }

    /// Serves stale content within the windows the origin granted: `stale-while-revalidate`
    /// (`error` is `None`; pingora has checked the window and refreshes in the background) and
    /// `stale-if-error` when the origin fails.
    fn should_serve_stale(&self, _session: &mut Session, _ctx: &mut RequestCtx, error: Option<&Error>) -> bool {
        error.is_none_or(|e| e.esource() == &ErrorSource::Upstream)
    }

    /// Logs and counts origin failures with the origin's name and the reason, then answers 502.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if let (ErrorSource::Upstream, Some(o)) = (e.esource(), &ctx.peer) {
            let reason = origin::failure_reason(e).as_str();
            metrics::ORIGIN_FAILURES.with_label_values(&[&o.name, reason]).inc();
            warn!(
                "origin request failed origin={} reason={reason} sni={} error=\"{e}\"",
                o.name,
                o.sni()
            );
        }
        if code > 0 {
            if let Err(err) = session.respond_error(code).await {
                debug!("cannot send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Metrics and the access log line.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if let (Some(c), false) = (&ctx.conn, ctx.fill) {
            // The state the request ran under; a request refused before it was read, the live one.
            let idle = match &ctx.state {
                Some(s) => s.limits.idle_timeout,
                None => self.live.load().limits.idle_timeout,
            };
            c.clock.request_finished(idle);
        }
        if ctx.piped {
            return; // its fill counts and logs the request
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        metrics::count_request(status);
        let sent = u64::try_from(session.body_bytes_sent()).unwrap_or(u64::MAX);
        if ctx.origin.is_some() {
            let source = if session.cache.upstream_used() {
                "origin"
            } else {
                "cache"
            };
            metrics::count_body_bytes(source, sent);
        }
        let cache: Option<CacheResult> = match (ctx.cache_ttl, &self.cache) {
            (Some(_), Some(c)) => Some(c.record(session)),
            _ => None,
        };
        let seconds = ctx.started.elapsed().as_secs_f64();
        metrics::REQUEST_SECONDS
            .with_label_values(&[
                ctx.route.as_deref().unwrap_or("none"),
                metrics::status_class(status),
                cache.map_or("none", CacheResult::as_str),
            ])
            .observe(seconds);
        if !logs::access_enabled() {
            return;
        }
        let conn = ctx.conn.as_deref();
        let req = session.req_header();
        let unknown;
        let connection = match conn {
            Some(c) => c.access_fields(|| client_ip(session, c).to_string()),
            None => {
                unknown = logs::ConnectionFields::new("", "", None, None);
                &unknown
            }
        };
        logs::access(&logs::AccessEvent {
            connection,
            protocol: if session.is_http2() || ctx.fill { "HTTP/2" } else { "HTTP/1.1" },
            method: req.method.as_str(),
            host: &ctx.host,
            path: req.uri.path(),
            status,
            bytes_sent: sent,
            cache: cache.map(CacheResult::as_str),
            origin: ctx
                .peer
                .as_ref()
                .filter(|_| session.cache.upstream_used())
                .map(|o| &*o.name),
            origin_seconds: ctx.origin_seconds,
            seconds,
            rules: match (&ctx.rules, &ctx.state) {
                (Some(o), Some(state)) => o.matched.iter().filter_map(|i| state.rules.name(*i)).collect(),
                _ => Vec::new(),
            },
            answered: ctx.answered.map(Answered::as_str),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_dot_or_empty_segments_or_encoded_separators_are_not_normal() {
        for ok in ["/", "/firmware/images/x1/fw.bin", "/dir/", "/a.b/c..d/.e", "/a%20b", "/a%2", "/%"] {
            assert!(path_is_normal(ok), "{ok}");
        }
        for bad in [
            "/firmware/images/x1/../x2/fw.bin",
            "/firmware/images/x1/./fw.bin",
            "//firmware/images/x2/fw.bin",
            "/firmware//images",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/%2E%2e/b",
            "/a%2fb",
            "/a%5cb",
            "/a%5C",
            "/a\\b",
            "/a/.",
            "relative",
        ] {
            assert!(!path_is_normal(bad), "{bad}");
        }
    }

    #[test]
    fn host_comes_from_authority_or_host_header_without_port() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("Host", "Fleet-B.Example.com:8443").unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("fleet-b.example.com"));
        // HTTP/2 requests carry :authority in the URI.
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.set_uri(http::Uri::from_static("https://a.example:1/x"));
        assert_eq!(request_host(&req).as_deref(), Some("a.example"));
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("Host", "[::1]").unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("[::1]"));
    }
}
