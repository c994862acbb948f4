//! The proxy hooks, in the order pingora calls them: identity (from the TLS session) →
//! spoofed-header stripping → fleet separation (Host against the SNI policy) → route and
//! access → request-phase rules → cache → origin peer → identity and rule headers toward the
//! origin → failure accounting → metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{debug, warn};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use pingora_cache::key::HashBinary;
use pingora_cache::{CacheKey, CacheMeta, RespCacheable};

use crate::cache::{self, SharedCache};
use crate::config::Access;
use crate::identity::{ConnectionIdentity, HeaderPlan};
use crate::metrics;
use crate::origin::{self, Origin};
use crate::rules::{self, Decision, HeaderOp, Outcome, Phase, RuleSet};
use crate::viewer_tls::ListenerPolicy;

/// A compiled route.
pub struct Route {
    /// Lowercased host without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub origin: Arc<Origin>,
    pub access: Access,
    /// Default freshness when the route is cached.
    pub cache_ttl: Option<u32>,
}

/// What the hooks read for every request; replaced whole on reload.
pub struct ProxyState {
    /// Routes in match order: host-specific before any-host, then longest prefix first.
    pub routes: Vec<Route>,
    pub headers: Arc<HeaderPlan>,
    /// Listener name (its address) → its TLS policy, for the Host/SNI check.
    pub listeners: Vec<(Arc<str>, Arc<ArcSwap<ListenerPolicy>>)>,
    pub cache: Option<Arc<SharedCache>>,
    pub rules: Arc<RuleSet>,
    /// Origins by name, for rules that choose one.
    pub origins: BTreeMap<String, Arc<Origin>>,
}

impl ProxyState {
    pub fn new(
        mut routes: Vec<Route>,
        headers: Arc<HeaderPlan>,
        listeners: Vec<(Arc<str>, Arc<ArcSwap<ListenerPolicy>>)>,
        cache: Option<Arc<SharedCache>>,
        rules: Arc<RuleSet>,
        origins: BTreeMap<String, Arc<Origin>>,
    ) -> Self {
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        ProxyState {
            routes,
            headers,
            listeners,
            cache,
            rules,
            origins,
        }
    }

    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.host.as_deref().is_none_or(|h| Some(h) == host) && path.starts_with(&r.path_prefix))
    }

    fn listener(&self, name: &str) -> Option<&Arc<ArcSwap<ListenerPolicy>>> {
        self.listeners.iter().find(|(n, _)| &**n == name).map(|(_, p)| p)
    }
}

pub struct EdgeProxy {
    pub state: Arc<ArcSwap<ProxyState>>,
}

/// Per-request state handed from hook to hook.
#[derive(Default)]
pub struct RequestCtx {
    identity: Option<Arc<ConnectionIdentity>>,
    origin: Option<Arc<Origin>>,
    /// Host the request addressed (lowercased, no port), for the cache key.
    host: String,
    /// The route's default TTL when the route is cached.
    cache_ttl: Option<u32>,
    /// The cache (from the state the request started with).
    cache: Option<Arc<SharedCache>>,
    /// Whether the origin's response was admitted to the cache.
    stored: bool,
    /// The origin answered a revalidation with 304: the stored body stays, nothing is filled.
    not_modified: bool,
    /// What the request-phase rules decided: header changes toward the origin, in rule order,
    /// and what goes into the cache key (shared by a connection's requests that decide alike).
    rules: Option<Outcome>,
}

/// The identity the handshake recorded for this connection (HTTP/1.1 and HTTP/2 alike).
fn connection_identity(session: &Session) -> Option<Arc<ConnectionIdentity>> {
    let digest = session.digest()?.ssl_digest.as_ref()?;
    // The handshake stores an `Arc<ConnectionIdentity>` so that requests can share it cheaply.
    digest.extension.get::<Arc<ConnectionIdentity>>().cloned()
}

/// The request's host, lowercased, without a port: from the URI authority (HTTP/2) or Host.
fn request_host(req: &RequestHeader) -> Option<String> {
    let raw = req.uri.authority().map(|a| a.host().to_string()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| {
                // Strip a port, keeping bracketed IPv6 literals whole.
                match h.rfind(':') {
                    Some(i) if !h[i..].contains(']') => h[..i].to_string(),
                    _ => h.to_string(),
                }
            })
    })?;
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether a request path is in normal form: no empty, `.` or `..` segments, and no encoded dot,
/// slash or backslash. Routes and rules match on the path as sent, and origins often resolve
/// these forms: `/images/x1/../x2/fw.bin` would pass a rule that allows `/images/x1/` and reach
/// x2's image. Such paths are refused rather than rewritten.
fn path_is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let encoded = path
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && matches!((w[1], w[2].to_ascii_lowercase()), (b'2', b'e' | b'f') | (b'5', b'c')));
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        // Only the last segment may be empty (a trailing slash, or the root).
        let empty_inside = seg.is_empty() && segments.peek().is_some();
        if seg == "." || seg == ".." || empty_inside {
            return false;
        }
    }
    !encoded && !path.contains('\\')
}

/// Answers with `status` and a plain-text `body`, and closes nothing: the connection stays usable.
async fn respond(session: &mut Session, status: u16, body: &str) -> Result<bool> {
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

async fn refuse(session: &mut Session, status: u16, why: &str, conn: Option<&ConnectionIdentity>) -> Result<bool> {
    debug!(
        "request refused status={status} reason={why} listener={} sni={}",
        conn.map(|c| &*c.listener).unwrap_or("-"),
        conn.and_then(|c| c.sni.as_deref()).unwrap_or("-")
    );
    session.respond_error(status).await?;
    Ok(true)
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

/// The client's IP address as rules read it (`""` when the socket has none).
fn client_ip(session: &Session) -> String {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// Runs the request-phase rules for this request.
fn request_rules(rules: &RuleSet, session: &Session, conn: &ConnectionIdentity, host: &str) -> Outcome {
    let client_ip = match rules.uses_client_ip() {
        true => conn.rule_client_ip.get_or_init(|| client_ip(session)),
        false => "",
    };
    let req = session.req_header();
    let info = rules::RequestInfo {
        method: req.method.as_str(),
        host,
        path: req.uri.path(),
        query: req.uri.query().unwrap_or(""),
        headers: &req.headers,
    };
    let facts = rules::Facts {
        cert: conn.cert.as_ref(),
        verified: true,
        connection: &conn.info,
        client_ip,
        request: Some(&info),
        lists: rules.lists(),
        now: rules::facts::unix_now(),
    };
    rules.evaluate(&[Phase::Request], &facts, None)
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    /// Identity, header stripping, fleet separation and routing, before anything else runs.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let state = self.state.load();
        // Strip first, whatever happens next: nothing downstream may see a client-sent copy.
        let removed = state.headers.strip(session.req_header_mut());
        let Some(conn) = connection_identity(session) else {
            // Every listener is TLS with our callbacks; no identity means something is wrong.
            return refuse(session, 403, "NoConnectionIdentity", None).await;
        };
        let refused = conn.denied.is_some()
            || conn.refused_after_handshake(|| conn.rule_client_ip.get_or_init(|| client_ip(session)).clone());
        if refused {
            // A connection rule refused this client after its handshake: close, answer nothing.
            session.set_keepalive(None);
            session.shutdown().await;
            return Ok(true);
        }
        if removed > 0 {
            metrics::SPOOFED_HEADERS.with_label_values(&[&conn.listener]).inc();
            debug!(
                "removed {removed} client-sent identity headers listener={}",
                conn.listener
            );
        }
        let host = request_host(session.req_header());

        // A connection verified under one SNI policy may only address that policy's hosts, and a
        // connection under the default policy may not address a host that has its own policy.
        let Some(listener) = state.listener(&conn.listener) else {
            return refuse(session, 403, "UnknownListener", Some(&conn)).await;
        };
        if listener.load().select(host.as_deref()).sni_name != conn.sni_policy {
            return refuse(session, 421, "HostNotCoveredBySni", Some(&conn)).await;
        }

        let path = session.req_header().uri.path().to_string();
        if !path_is_normal(&path) {
            return respond(session, 400, "the request path is not in normal form\n").await;
        }
        let Some(route) = state.route(host.as_deref(), &path) else {
            return refuse(session, 404, "NoRoute", Some(&conn)).await;
        };
        // Authorization, before any cache lookup: a client that may not read the route never
        // reaches the cache.
        if route.access == Access::Authenticated && conn.cert.is_none() {
            return refuse(session, 403, "CertificateRequiredForRoute", Some(&conn)).await;
        }
        ctx.origin = Some(route.origin.clone());
        ctx.cache_ttl = route.cache_ttl;
        ctx.cache = state.cache.clone();
        ctx.host = host.unwrap_or_default();
        // Request-phase rules, still before any cache lookup.
        if state.rules.has_phase(Phase::Request) {
            let outcome = request_rules(&state.rules, session, &conn, &ctx.host);
            match outcome.decision() {
                Decision::Deny { rule, status, body } => {
                    debug!("request denied rule={rule} status={status} listener={}", conn.listener);
                    return respond(session, *status, body).await;
                }
                Decision::Error { rule, .. } => {
                    debug!(
                        "request denied rule={rule} reason=RuleEvaluationError listener={}",
                        conn.listener
                    );
                    return respond(session, 500, "rule evaluation error\n").await;
                }
                Decision::Allow { .. } | Decision::Continue => {}
            }
            if let Some(name) = &outcome.origin {
                ctx.origin = state.origins.get(name).cloned();
            }
            ctx.rules = Some(outcome);
        }
        ctx.identity = Some(conn);
        Ok(false)
    }

    /// Turns the cache on for GET and HEAD on cached routes (after `request_filter` allowed it).
    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        if let (Some(_), Some(cache)) = (ctx.cache_ttl, &ctx.cache) {
            if pingora_cache::filters::request_cacheable(session.req_header()) {
                cache.enable(session);
            }
        }
        Ok(())
    }

    /// Host, path and query: see `cache::key`.
    fn cache_key_callback(&self, session: &Session, ctx: &mut RequestCtx) -> Result<CacheKey> {
        let uri = &session.req_header().uri;
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let variants = ctx.rules.as_ref().map(key_variants).unwrap_or_default();
        Ok(cache::key(&ctx.host, path_and_query, &variants))
    }

    /// The request that fills the cache writes to its client through pingora's cancel-safe task
    /// queue, so the proxy loop keeps reading the origin into the cache while that client is slow:
    /// the fill runs at the origin's pace and the client becomes one reader of it, like the waiters.
    fn cache_miss(&self, session: &mut Session, _ctx: &mut RequestCtx) {
        session.cache.cache_miss();
        session.set_proxy_tasks_enabled(true); // a no-op on HTTP/2, which pingora 0.9 does not queue
    }

    fn response_cache_filter(
        &self,
        _session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        let mut decision = cache::cacheable(resp, ctx.cache_ttl.unwrap_or(0));
        if let (Some(c), false) = (&ctx.cache, ctx.not_modified) {
            decision = c.reserve_fill(decision, resp);
        }
        ctx.stored = matches!(decision, RespCacheable::Cacheable(_));
        Ok(decision)
    }

    /// Notes a 304 from the origin (pingora runs this before `response_cache_filter` on 304s).
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.not_modified = resp.status == http::StatusCode::NOT_MODIFIED;
        Ok(())
    }

    /// Serves stale content within the windows the origin granted: `stale-while-revalidate`
    /// (`error` is `None`; pingora has checked the window and refreshes in the background) and
    /// `stale-if-error` when the origin fails.
    fn should_serve_stale(&self, _session: &mut Session, _ctx: &mut RequestCtx, error: Option<&Error>) -> bool {
        error.is_none_or(|e| e.esource() == &ErrorSource::Upstream)
    }

    /// Separates the stored variants of a response that has `Vary`.
    fn cache_vary_filter(&self, meta: &CacheMeta, _ctx: &mut RequestCtx, req: &RequestHeader) -> Option<HashBinary> {
        cache::variance(meta.headers(), req)
    }

    /// Adds an RFC 9211 `Cache-Status` on cached routes.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.cache_ttl.is_some() && ctx.cache.is_some() {
            resp.insert_header("cache-status", cache::cache_status(session.cache.phase(), ctx.stored))?;
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        match &ctx.origin {
            Some(o) => Ok(o.peer()),
            None => Error::e_explain(ErrorType::InternalError, "no route chosen before upstream_peer"),
        }
    }

    /// Sets the identity headers rendered at handshake time, then applies the rules' headers.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(conn) = &ctx.identity {
            for (name, value) in &conn.headers {
                upstream.insert_header(name.clone(), value.clone())?;
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
        Ok(())
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
        if let (ErrorSource::Upstream, Some(o)) = (e.esource(), &ctx.origin) {
            let reason = origin::failure_reason(e);
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

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        metrics::count_request(status);
        if ctx.origin.is_some() {
            let source = if session.cache.upstream_used() {
                "origin"
            } else {
                "cache"
            };
            let sent = u64::try_from(session.body_bytes_sent()).unwrap_or(u64::MAX);
            metrics::count_body_bytes(source, sent);
        }
        if let (Some(_), Some(cache)) = (ctx.cache_ttl, &ctx.cache) {
            cache.record(session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_dot_or_empty_segments_or_encoded_separators_are_not_normal() {
        for ok in ["/", "/firmware/images/x1/fw.bin", "/dir/", "/a.b/c..d/.e"] {
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
            "/a\\b",
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
