//! The admin listener: Prometheus text on `/metrics`, readiness on `/healthz` (200 once every
//! viewer listener is bound; the state is built before any service starts), a reload
//! (`POST /reload`) and cache purges (`POST /cache/purge?url=…` or `?prefix=…`). It binds to
//! loopback unless it asks for operators' client certificates (TLS) or a bearer token, which
//! every request but `GET /healthz` must then carry; refusals are counted.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::listening::Service as Listening;
use pingora::services::Service;

use std::sync::{Arc, OnceLock};

use crate::cache::SharedCache;
use crate::reason::AdminRefusal;
use crate::reload::{self, Reloader};
use crate::state::Live;
use crate::{logs, metrics};

pub struct AdminApp {
    cache: Option<Arc<SharedCache>>,
    reloader: Arc<Reloader>,
    live: Arc<Live>,
    /// The viewer listeners' addresses, as pingora's socket table names them.
    listeners: Vec<String>,
    /// Pingora's table of listening sockets (shared by every service, and handed over in an
    /// upgrade): a listener is bound once its address is in it.
    sockets: Arc<OnceLock<ListenFds>>,
}

/// Equal strings, compared in time that depends only on their lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request lacks the bearer token `token`, if it does.
fn unauthorized(req: &http::request::Parts, token: &str) -> Option<AdminRefusal> {
    let given = req.headers.get(http::header::AUTHORIZATION).and_then(|v| {
        let v = v.to_str().ok()?;
        let (scheme, value) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| value.trim())
    });
    match given {
        None => Some(AdminRefusal::TokenMissing),
        Some(t) if !same(t.as_bytes(), token.as_bytes()) => Some(AdminRefusal::TokenInvalid),
        Some(_) => None,
    }
}

/// A purge target as the cache keys it: `host/path?query`, from that form or a full URL
/// (scheme dropped, host lowercased, port removed).
fn cache_url(raw: &str) -> String {
    let rest = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .unwrap_or(raw);
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let host = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    format!("{}{path}", host.to_ascii_lowercase())
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let raw = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|v| v.into_owned())
}

impl AdminApp {
    /// `/healthz`: ready once every viewer listener's socket is bound (or taken over from the
    /// process being upgraded); until then 503, naming the first that is not.
    fn health(&self) -> Response<Vec<u8>> {
        let table = self.sockets.get().map(|fds| fds.lock());
        let unbound = self
            .listeners
            .iter()
            .find(|a| table.as_ref().is_none_or(|t| t.get(a).is_none()));
        match unbound {
            None => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            Some(a) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("starting: listener {a} is not bound yet\n").into_bytes(),
            ),
        }
    }

    async fn purge(&self, method: &http::Method, query: Option<&str>) -> Response<Vec<u8>> {
        if method != http::Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"use POST\n".to_vec());
        }
        let Some(cache) = &self.cache else {
            return reply(StatusCode::NOT_FOUND, "text/plain", b"no cache configured\n".to_vec());
        };
        let (target, prefix) = match (query_value(query, "url"), query_value(query, "prefix")) {
            (Some(u), None) => (u, false),
            (None, Some(p)) if !p.is_empty() => (p, true),
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    b"give exactly one of url= or prefix=\n".to_vec(),
                );
            }
        };
        let target = cache_url(&target);
        let n = cache.purge(&target, prefix).await;
        log::info!(
            "cache purge {}={target} removed={n}",
            if prefix { "prefix" } else { "url" }
        );
        reply(
            StatusCode::OK,
            "application/json",
            format!("{{\"purged\":{n}}}\n").into_bytes(),
        )
    }
}

impl AdminApp {
    /// Builds and swaps a new state: 200 with its generation, or 422 with every error (the
    /// running state stays).
    async fn reload(&self, method: &http::Method) -> Response<Vec<u8>> {
        if method != http::Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"use POST\n".to_vec());
        }
        match reload::reload_blocking(&self.reloader, "admin").await {
            Ok(generation) => reply(
                StatusCode::OK,
                "application/json",
                format!("{{\"generation\":{generation}}}\n").into_bytes(),
            ),
            Err(errors) => {
                let list: Vec<String> = errors
                    .0
                    .iter()
                    .map(|e| {
                        format!(
                            "{{\"file\":{},\"key\":{},\"reason\":{}}}",
                            logs::json(&e.file.display().to_string()),
                            logs::json(&e.key),
                            logs::json(&e.reason)
                        )
                    })
                    .collect();
                reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "application/json",
                    format!("{{\"errors\":[{}]}}\n", list.join(",")).into_bytes(),
                )
            }
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut().insert(http::header::CONTENT_LENGTH, len.into());
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let health = req.uri.path() == "/healthz" && req.method == http::Method::GET;
        let token = self.live.load().admin.as_ref().and_then(|a| a.token.clone());
        if let (Some(token), false) = (token, health) {
            if let Some(why) = unauthorized(req, &token) {
                metrics::ADMIN_REFUSED.with_label_values(&[why.as_str()]).inc();
                log::warn!("admin request refused reason={} path={}", why.as_str(), req.uri.path());
                let mut r = reply(StatusCode::UNAUTHORIZED, "text/plain", b"a bearer token is required\n".to_vec());
                r.headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        match req.uri.path() {
            "/cache/purge" => self.purge(&req.method, req.uri.query()).await,
            "/reload" => {
                let method = req.method.clone();
                self.reload(&method).await
            }
            "/metrics" => {
                if let Some(c) = &self.cache {
                    c.update_gauges();
                }
                reply(StatusCode::OK, "text/plain; version=0.0.4", metrics::render())
            }
            "/healthz" => self.health(),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}

/// The admin service listening on `address`, over TLS with `tls`, reporting ready once the
/// viewer `listeners` are bound.
pub fn service(
    address: &str,
    tls: Option<pingora::listeners::tls::TlsSettings>,
    cache: Option<Arc<SharedCache>>,
    reloader: Arc<Reloader>,
    live: Arc<Live>,
    listeners: Vec<String>,
) -> AdminService {
    let sockets = Arc::new(OnceLock::new());
    let app = AdminApp {
        cache,
        reloader,
        live,
        listeners,
        sockets: sockets.clone(),
    };
    let mut inner = Listening::new("admin".to_string(), app);
    match tls {
        Some(settings) => inner.add_tls_with_settings(address, None, settings),
        None => inner.add_tcp(address),
    }
    AdminService { inner, sockets }
}

/// The admin's listening service, which also keeps pingora's socket table for `/healthz`.
pub struct AdminService {
    inner: Listening<AdminApp>,
    sockets: Arc<OnceLock<ListenFds>>,
}

#[async_trait]
impl Service for AdminService {
    async fn start_service(&mut self, fds: Option<ListenFds>, shutdown: ShutdownWatch, listeners_per_fd: usize) {
        if let Some(fds) = &fds {
            let _ = self.sockets.set(fds.clone());
        }
        self.inner.start_service(fds, shutdown, listeners_per_fd).await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_targets_are_normalised_to_cache_keys() {
        assert_eq!(cache_url("https://FW.example:8443/a.bin?v=1"), "fw.example/a.bin?v=1");
        assert_eq!(cache_url("fw.example/a.bin"), "fw.example/a.bin");
        assert_eq!(cache_url("http://[::1]:80/x"), "[::1]/x");
        assert_eq!(
            query_value(Some("url=fw%2Fa%3Fv%3D1&x=2"), "url").as_deref(),
            Some("fw/a?v=1")
        );
    }
}
