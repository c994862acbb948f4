//! `mtls-edge demo`: a newcomer's working system in one command. Generates a demo PKI, writes
//! an edge config for it, runs a demo origin that itself requires origin mTLS, and runs the
//! edge in front of it with viewer mTLS `required`. Also the origin that the tests start.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use boring::ssl::{SslVerifyMode, SslVersion};
use http::{Response, StatusCode};
use std::sync::Arc;

use pingora::apps::http_app::ServeHttp;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;

use crate::pki::{self, Ca, LeafSpec};

/// A small origin:
/// - `/firmware/manifest.json` returns a manifest naming the device;
/// - `/files/NAME?size=N[&delay_ms=D][&private=1]` returns N deterministic bytes, cacheable for
///   300 s (or `private`), after an optional delay; more cache headers on request (see below);
/// - `/__origin/count?path=P` says how many requests for path P it has served;
/// - `/__origin/fail?path=P&status=S` makes later requests for P answer S (`status=0`: heal);
/// - every other path echoes the request headers, one `name: value` line each.
#[derive(Default)]
pub struct OriginApp {
    served: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    failing: std::sync::Mutex<std::collections::HashMap<String, u16>>,
}

impl OriginApp {
    fn count(&self, path: &str) {
        if let Ok(mut served) = self.served.lock() {
            *served.entry(path.to_string()).or_default() += 1;
        }
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// `size` bytes cycling through the alphabet, so that truncation and offsets are visible.
pub fn file_body(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

#[async_trait]
impl ServeHttp for OriginApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        self.count(&path);
        let mut extra: Vec<(&str, String)> = Vec::new();
        let mut status = StatusCode::OK;
        let failing = self.failing.lock().ok().and_then(|f| f.get(&path).copied());
        let body = if let Some(code) = failing {
            status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            b"failing on purpose\n".to_vec()
        } else if path == "/__origin/fail" {
            let q = query.as_deref();
            let code = query_param(q, "status")
                .and_then(|v| v.parse::<u16>().ok())
                .unwrap_or(0);
            if let (Some(p), Ok(mut f)) = (query_param(q, "path"), self.failing.lock()) {
                if code == 0 {
                    f.remove(p);
                } else {
                    f.insert(p.to_string(), code);
                }
            }
            b"ok\n".to_vec()
        } else if path.starts_with("/files/") {
            let q = query.as_deref();
            if let Some(ms) = query_param(q, "delay_ms").and_then(|v| v.parse().ok()) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let size: usize = query_param(q, "size").and_then(|v| v.parse().ok()).unwrap_or(1024);
            // Cache headers on request: `cc=` replaces Cache-Control (`cc=none` drops it),
            // `expires=SECS` (negative: in the past), `lm=1` adds Last-Modified, `etag=0` drops
            // the ETag, `cookie=1` adds Set-Cookie.
            let mut cc = vec![format!("max-age={}", query_param(q, "max_age").unwrap_or("300"))];
            if query_param(q, "private").is_some() {
                cc.insert(0, "private".into());
            }
            for (param, directive) in [("swr", "stale-while-revalidate"), ("sie", "stale-if-error")] {
                if let Some(v) = query_param(q, param) {
                    cc.push(format!("{directive}={v}"));
                }
            }
            match query_param(q, "cc") {
                Some("none") => {}
                Some(raw) => extra.push(("cache-control", raw.replace("%20", " "))),
                None => extra.push(("cache-control", cc.join(", "))),
            }
            if let Some(secs) = query_param(q, "expires").and_then(|v| v.parse::<i64>().ok()) {
                let now = std::time::SystemTime::now();
                let delta = std::time::Duration::from_secs(secs.unsigned_abs());
                let at = if secs >= 0 { now + delta } else { now - delta };
                extra.push(("expires", httpdate::fmt_http_date(at)));
            }
            let etag = format!("\"{size}\"");
            if query_param(q, "etag") != Some("0") {
                extra.push(("etag", etag.clone()));
            }
            let last_modified = query_param(q, "lm").map(|_| httpdate::fmt_http_date(std::time::UNIX_EPOCH));
            if let Some(lm) = &last_modified {
                extra.push(("last-modified", lm.clone()));
            }
            if query_param(q, "cookie").is_some() {
                extra.push(("set-cookie", "session=1".into()));
            }
            let mut body = Vec::new();
            if let Some(name) = query_param(q, "vary") {
                extra.push(("vary", name.to_string()));
                let value = req.headers.get(name).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
                body.extend_from_slice(&value);
                body.push(b':');
            }
            // The only Last-Modified is the epoch, so any If-Modified-Since is at or after it.
            let not_modified = req
                .headers
                .get(http::header::IF_NONE_MATCH)
                .is_some_and(|v| v.as_bytes() == etag.as_bytes())
                || (last_modified.is_some() && req.headers.contains_key(http::header::IF_MODIFIED_SINCE));
            if not_modified {
                status = StatusCode::NOT_MODIFIED;
                Vec::new()
            } else {
                body.extend_from_slice(&file_body(size));
                body
            }
        } else if path == "/__origin/count" {
            let counted = query_param(query.as_deref(), "path")
                .and_then(|p| self.served.lock().ok().and_then(|m| m.get(p).copied()))
                .unwrap_or(0);
            format!("{counted}\n").into_bytes()
        } else if path == "/firmware/manifest.json" {
            let subject = req
                .headers
                .get("cloudfront-viewer-cert-subject")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(none)");
            format!(
                "{{\"version\":\"1.4.2\",\"image\":\"/firmware/fw-1.4.2.bin\",\"served_to\":\"{}\"}}\n",
                subject.replace('"', "'")
            )
            .into_bytes()
        } else {
            let mut s = String::new();
            for (k, v) in req.headers.iter() {
                let _ = writeln!(s, "{}: {}", k.as_str(), String::from_utf8_lossy(v.as_bytes()));
            }
            s.into_bytes()
        };
        // The SHA-256 of the client certificate the origin saw: proof of origin mTLS for tests.
        let client_sha256 = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .map(|s| s.cert_digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .unwrap_or_default();
        // The peer's port tells a test whether the edge reused a pooled connection.
        let peer_port = session
            .digest()
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| s.peer_addr())
            .and_then(|a| a.as_inet().map(|i| i.port()))
            .unwrap_or(0);
        // Our own port tells a test which origin answered.
        let local_port = session
            .digest()
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| s.local_addr())
            .and_then(|a| a.as_inet().map(|i| i.port()))
            .unwrap_or(0);
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let len = resp.body().len();
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_LENGTH, len.into());
        h.insert("x-origin-peer-port", peer_port.into());
        h.insert("x-origin-port", local_port.into());
        for (k, v) in extra {
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
        if let Ok(v) = http::HeaderValue::from_str(&client_sha256) {
            h.insert("x-origin-client-cert-sha256", v);
        }
        resp
    }
}

/// The origin's HTTP server: [`OriginApp`]'s answers, plus two misbehaving paths:
/// - `/abort/NAME?size=N` sends `Content-Length: N` and a cacheable header, then half the body,
///   then drops the connection: an origin that fails mid-body on purpose;
/// - `/gated/NAME?size=N` sends the header and half the body, then waits until
///   `/__origin/release?name=NAME` before it sends the rest: a slow fill a test controls.
pub struct OriginServer {
    app: OriginApp,
    /// Gates of `/gated/` responses, released by `/__origin/release?name=NAME`.
    gates: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl OriginServer {
    fn gate(&self, name: &str) -> Option<Arc<tokio::sync::Semaphore>> {
        let mut gates = self.gates.lock().ok()?;
        Some(
            gates
                .entry(name.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(0)))
                .clone(),
        )
    }
}

#[async_trait]
impl HttpServerApp for OriginServer {
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(http.read_request().await, Ok(true)) {
            return None;
        }
        http.set_keepalive(Some(60));
        let path = http.req_header().uri.path().to_string();
        let query = http.req_header().uri.query().map(str::to_string);
        if path == "/__origin/release" {
            if let Some(gate) = query_param(query.as_deref(), "name").and_then(|n| self.gate(n)) {
                gate.add_permits(1);
            }
        }
        if let Some(name) = path.strip_prefix("/abort/").or_else(|| path.strip_prefix("/gated/")) {
            let size = query_param(query.as_deref(), "size")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1024);
            self.app.count(&path);
            let body = file_body(size);
            let mut header = ResponseHeader::build(200, None).ok()?;
            header.insert_header("content-length", size.to_string()).ok()?;
            header.insert_header("cache-control", "max-age=300").ok()?;
            http.write_response_header(Box::new(header)).await.ok()?;
            http.write_response_body(body[..size / 2].to_vec().into(), false)
                .await
                .ok()?;
            if path.starts_with("/abort/") {
                return None; // dropped mid-body
            }
            let gate = self.gate(name)?;
            let _permit = gate.acquire().await.ok()?;
            http.write_response_body(body[size / 2..].to_vec().into(), true)
                .await
                .ok()?;
            http.finish().await.ok()?;
            return None;
        }
        let (parts, body) = self.app.response(&mut http).await.into_parts();
        http.write_response_header(Box::new(parts.into())).await.ok()?;
        if !body.is_empty() {
            http.write_response_body(body.into(), true).await.ok()?;
        }
        let settings = HttpPersistentSettings::for_session(&http);
        http.finish()
            .await
            .ok()?
            .map(|s| ReusedHttpStream::from_reusable_stream(s, settings))
    }
}

/// An origin service on `listen` presenting `cert`/`key` and requiring a client certificate
/// issued under `client_ca`.
pub fn origin_service(
    listen: &str,
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Service<OriginServer>, String> {
    let s = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{}: not UTF-8", p.display()))
    };
    let mut tls = TlsSettings::intermediate(&s(cert)?, &s(key)?).map_err(|e| format!("origin TLS: {e}"))?;
    tls.set_ca_file(client_ca)
        .map_err(|e| format!("{}: {e}", client_ca.display()))?;
    tls.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    tls.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| e.to_string())?;
    let mut svc = Service::new(
        "origin".to_string(),
        OriginServer {
            app: OriginApp::default(),
            gates: Default::default(),
        },
    );
    svc.add_tls_with_settings(listen, None, tls);
    Ok(svc)
}

pub const EDGE_ADDR: &str = "127.0.0.1:8443";
pub const ORIGIN_ADDR: &str = "127.0.0.1:9443";
pub const ADMIN_ADDR: &str = "127.0.0.1:9100";

/// Writes the demo PKI and `edge.yaml` into `dir`; returns the config path.
pub fn write_demo(dir: &Path) -> Result<PathBuf, String> {
    let device_root = Ca::root("Demo Device Root CA")?;
    let device_int = device_root.intermediate("Demo Device Issuing CA", Some(0))?;
    let mut device = LeafSpec::client("device-0001");
    device.org = Some("Demo Fleet".into());
    device.org_unit = Some("model-x1".into());
    device.uris = vec!["urn:device:0001".into()];
    device_int.issue(&device)?.write(dir, "device")?;

    // A second fleet, for the per-SNI trust store in conf/edge.yaml.
    let fleet_b = Ca::root("Demo Fleet B Root CA")?;
    fleet_b
        .issue(&LeafSpec::client("device-b-0001"))?
        .write(dir, "fleet-b-device")?;
    pki::write_file(&dir.join("fleet-b-ca.pem"), &fleet_b.cert_pem, false)?;

    let edge_ca = Ca::root("Demo Edge CA")?;
    edge_ca
        .issue(&LeafSpec::server("edge.demo", &["localhost", "edge.demo"]))?
        .write(dir, "edge-server")?;
    edge_ca
        .issue(&LeafSpec::client("mtls-edge"))?
        .write(dir, "edge-client")?;
    let origin_ca = Ca::root("Demo Origin CA")?;
    origin_ca
        .issue(&LeafSpec::server("origin.internal", &["origin.internal"]))?
        .write(dir, "origin-server")?;

    pki::write_file(
        &dir.join("device-ca.pem"),
        &format!("{}{}", device_root.cert_pem, device_int.cert_pem),
        false,
    )?;
    pki::write_file(
        &dir.join("device-crl.pem"),
        &format!("{}{}", device_root.crl(&[])?, device_int.crl(&[])?),
        false,
    )?;
    pki::write_file(&dir.join("edge-ca.pem"), &edge_ca.cert_pem, false)?;
    pki::write_file(&dir.join("origin-ca.pem"), &origin_ca.cert_pem, false)?;

    let config = format!(
        "# Generated by `mtls-edge demo`. See conf/edge.yaml for every option.
server: {{ grace_period_seconds: 1, graceful_shutdown_timeout_seconds: 1, pid_file: {pid}, upgrade_sock: {sock} }}
listeners:
  - address: {EDGE_ADDR}
    server_cert: edge-server.pem
    server_key: edge-server.key
    mtls: {{ mode: required, trust_store: devices }}
trust_stores:
  devices:
    ca_files: [device-ca.pem]
    crl_files: [device-crl.pem]
    max_chain_depth: 4
origins:
  firmware:
    address: {ORIGIN_ADDR}
    sni: origin.internal
    ca_file: origin-ca.pem
    client_cert: edge-client.pem
    client_key: edge-client.key
routes:
  - {{ path_prefix: /, origin: firmware }}
admin: {{ address: {ADMIN_ADDR} }}
",
        pid = dir.join("edge.pid").display(),
        sock = dir.join("upgrade.sock").display(),
    );
    let path = dir.join("edge.yaml");
    pki::write_file(&path, &config, false)?;
    Ok(path)
}

/// The demo PKI's CAs and CRLs, which a config folder keeps in `pki/`.
const LAYOUT_PKI: &[&str] = &["device-ca.pem", "device-crl.pem", "fleet-b-ca.pem", "origin-ca.pem", "edge-ca.pem"];
/// The edge's own certificates and keys, which live beside the config folder in `secrets/`, so
/// that a certificate and its key are one secret that rotates at once.
const LAYOUT_SECRETS: &[&str] = &["edge-server.pem", "edge-server.key", "edge-client.pem", "edge-client.key"];

/// Copies the demo PKI in `dir` to where the config folder `conf` (as `conf/edge.yaml` lays it
/// out) looks for it: `conf/pki/` and `conf/../secrets/` (keys readable by their owner only).
pub fn install_layout(dir: &Path, conf: &Path) -> Result<(), String> {
    let secrets = conf.join("../secrets");
    let files = LAYOUT_PKI
        .iter()
        .map(|f| (f, conf.join("pki").join(f)))
        .chain(LAYOUT_SECRETS.iter().map(|f| (f, secrets.join(f))));
    for (name, to) in files {
        let from = dir.join(name);
        let text = std::fs::read_to_string(&from).map_err(|e| format!("{}: {e}", from.display()))?;
        pki::write_file(&to, &text, name.ends_with(".key"))?;
    }
    Ok(())
}

/// The commands printed for the newcomer.
pub fn curl_commands(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "mtls-edge demo is running. Edge https://localhost:8443, origin {ORIGIN_ADDR}, metrics http://{ADMIN_ADDR}/metrics

With the device certificate (200, the origin names the device):
  curl --cacert {d}/edge-ca.pem --cert {d}/device.pem --key {d}/device.key https://localhost:8443/firmware/manifest.json

Without a certificate (refused during the TLS handshake):
  curl --cacert {d}/edge-ca.pem https://localhost:8443/firmware/manifest.json

See what the origin receives (identity headers set by the edge):
  curl --cacert {d}/edge-ca.pem --cert {d}/device.pem --key {d}/device.key https://localhost:8443/echo

Ctrl-C stops the edge and the origin.
"
    )
}
