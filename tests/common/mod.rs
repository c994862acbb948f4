//! Test harness: a PKI generated per test, the real `mtls-edge` binary and a real mTLS origin as
//! child processes on free loopback ports, and a BoringSSL client that speaks HTTP/1.1.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use boring::ssl::{SslConnector, SslFiletype, SslMethod, SslSession, SslVersion};
use mtls_edge::pki::{self, Ca, Issued, LeafSpec};

pub const BIN: &str = env!("CARGO_BIN_EXE_mtls-edge");

/// A port nothing listens on, never the same twice in one test binary: the kernel may hand
/// a just-released ephemeral port out again, and two listeners of one config must differ.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "process exited with {status} before listening on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port} after 20 s");
}

/// A child process killed when dropped; its stderr goes to `log`.
pub struct Proc {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Proc {
    /// A process that does nothing, to take the place of one that was stopped.
    pub fn sleeper() -> Proc {
        let child = Command::new("sleep").arg("600").spawn().expect("spawn sleep");
        Proc {
            child,
            port: 0,
            log: PathBuf::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON lines of the log (the edge writes JSON lines by default).
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to 10 s: the edge writes its log every 100 ms) for a log line that `want`
    /// accepts, and returns it; panics with the whole log when none comes.
    pub fn wait_log(&self, what: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| want(l)) {
                return line;
            }
            if Instant::now() > deadline {
                panic!("no log line {what}; the log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a `connection` line with `reason` whose detail contains `detail`.
    pub fn wait_connection_log(&self, reason: &str, detail: &str) -> serde_json::Value {
        self.wait_log(&format!("refusing {reason} ({detail})"), |l| {
            l["log"] == "connection"
                && l["reason"] == reason
                && l["detail"].as_str().is_some_and(|d| d.contains(detail))
        })
    }

    /// Waits for an `event` line whose message contains `text`.
    pub fn wait_event(&self, text: &str) -> serde_json::Value {
        self.wait_log(&format!("saying {text:?}"), |l| {
            l["log"] == "event" && l["msg"].as_str().is_some_and(|m| m.contains(text))
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mtls-edge ARGS`, once something listens on `port`; its output goes to `log`.
pub fn spawn(args: &[&str], port: u16, log: PathBuf) -> Proc {
    let file = std::fs::File::create(&log).expect("create log file");
    // Logs go to stdout; stderr has what comes before the config is read (and panics).
    let err = file.try_clone().expect("clone the log file");
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("spawn mtls-edge");
    wait_for_port(port, &mut child, &log);
    Proc { child, port, log }
}

/// The demo origin, requiring a client certificate issued by `client_ca`.
pub fn spawn_origin(dir: &Path, cert_stem: &str, client_ca: &str) -> Proc {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cert = dir.join(format!("{cert_stem}.pem"));
    let key = dir.join(format!("{cert_stem}.key"));
    let ca = dir.join(client_ca);
    spawn(
        &[
            "origin",
            "--listen",
            &listen,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--client-ca",
            ca.to_str().unwrap(),
        ],
        port,
        dir.join(format!("origin-{port}.log")),
    )
}

/// Writes `yaml` as a config in `dir` and runs the edge on it; waits for `wait_port`.
pub fn spawn_edge(dir: &Path, yaml: &str, wait_port: u16) -> Proc {
    let conf = dir.join(format!("edge-{wait_port}.yaml"));
    std::fs::write(&conf, yaml).unwrap();
    spawn(
        &["-c", conf.to_str().unwrap()],
        wait_port,
        dir.join(format!("edge-{wait_port}.log")),
    )
}

/// The test fleet's CA, written to `device-ca.pem` in `dir` (the name `device_edge` and most
/// test configs trust).
pub fn device_ca(dir: &Path) -> Ca {
    let ca = Ca::root("Device CA").expect("a device CA");
    pki::write_file(&dir.join("device-ca.pem"), &ca.cert_pem, false).expect("device-ca.pem written");
    ca
}

/// The origin and an edge with one listener requiring certificates of `device-ca.pem` (trust
/// store `devices`, and `stores` YAML lines for others), every path routed to that origin, and
/// `extra` YAML after it. `threads` workers.
pub fn device_edge(dir: &Path, threads: usize, stores: &str, extra: &str) -> (Proc, Proc) {
    let origin = spawn_origin(dir, "origin-server", "edge-ca.pem");
    let port = free_port();
    let yaml = format!(
        "{server}listeners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem] }}\n{stores}origins:\n{origin}routes:\n  - {{ path_prefix: /, origin: firmware }}\n{extra}\n",
        server = server_yaml(dir, threads),
        listener = listener_yaml(port, "required", "devices"),
        origin = origin_yaml("firmware", origin.port),
    );
    let edge = spawn_edge(dir, &yaml, port);
    (origin, edge)
}

/// The `server:` line of every test edge: fast shutdown, pid file and socket in `dir`.
pub fn server_yaml(dir: &Path, threads: usize) -> String {
    let d = dir.display();
    format!(
        "server: {{ threads: {threads}, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 0, pid_file: {d}/edge.pid, upgrade_sock: {d}/edge.sock }}\n"
    )
}

/// A `listeners:` entry with the shared edge server certificate.
pub fn listener_yaml(port: u16, mode: &str, trust_store: &str) -> String {
    format!(
        "  - address: 127.0.0.1:{port}\n    server_cert: edge-server.pem\n    server_key: edge-server.key\n    mtls: {{ mode: {mode}, trust_store: {trust_store} }}\n"
    )
}

/// An `origins:` entry for the test origin on `port`, reached with the edge's client certificate.
pub fn origin_yaml(name: &str, port: u16) -> String {
    format!(
        "  {name}:\n    address: 127.0.0.1:{port}\n    sni: origin.internal\n    ca_file: origin-ca.pem\n    client_cert: edge-client.pem\n    client_key: edge-client.key\n"
    )
}

/// The server-side part of the shared PKI: the edge's server and client certificates, the
/// origin's server certificate and its CA. Viewer-side CAs are made by each test.
pub struct ServerPki {
    pub edge_ca: Ca,
    pub origin_ca: Ca,
}

impl ServerPki {
    /// Writes edge-ca.pem, edge-server.{pem,key}, edge-client.{pem,key}, origin-ca.pem,
    /// origin-server.{pem,key}.
    pub fn write(dir: &Path) -> ServerPki {
        let edge_ca = Ca::root("Test Edge CA").unwrap();
        edge_ca
            .issue(&LeafSpec::server("edge", &["localhost", "edge.test", "fleet-b.test"]))
            .unwrap()
            .write(dir, "edge-server")
            .unwrap();
        edge_ca
            .issue(&LeafSpec::client("mtls-edge"))
            .unwrap()
            .write(dir, "edge-client")
            .unwrap();
        let origin_ca = Ca::root("Test Origin CA").unwrap();
        origin_ca
            .issue(&LeafSpec::server("origin.internal", &["origin.internal"]))
            .unwrap()
            .write(dir, "origin-server")
            .unwrap();
        pki::write_file(&dir.join("edge-ca.pem"), &edge_ca.cert_pem, false).unwrap();
        pki::write_file(&dir.join("origin-ca.pem"), &origin_ca.cert_pem, false).unwrap();
        ServerPki { edge_ca, origin_ca }
    }
}

/// Writes an issued certificate and returns its stem for `Client::cert`.
pub fn save(dir: &Path, stem: &str, issued: &Issued) -> String {
    issued.write(dir, stem).unwrap();
    stem.to_string()
}

/// An HTTP response as the test client read it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Header lines the echo origin received, as `name: value`.
    pub fn echoed(&self, name: &str) -> Option<String> {
        let prefix = format!("{}: ", name.to_ascii_lowercase());
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }
}

/// A TLS 1.2/1.3 client with an optional client certificate.
pub struct Client<'a> {
    pub dir: &'a Path,
    pub port: u16,
    pub cert: Option<String>,
    pub sni: Option<String>,
    pub host: String,
    pub version: Option<SslVersion>,
    pub extra_headers: Vec<(String, String)>,
    pub session: Option<SslSession>,
    pub method: String,
}

pub struct Outcome {
    pub result: Result<Response, String>,
    pub session: Option<SslSession>,
    pub resumed: bool,
}

impl<'a> Client<'a> {
    pub fn new(dir: &'a Path, port: u16) -> Self {
        Client {
            dir,
            port,
            cert: None,
            sni: Some("localhost".into()),
            host: "localhost".into(),
            version: None,
            extra_headers: Vec::new(),
            session: None,
            method: "GET".into(),
        }
    }

    pub fn cert(mut self, stem: &str) -> Self {
        self.cert = Some(stem.to_string());
        self
    }

    pub fn sni(mut self, sni: Option<&str>) -> Self {
        self.sni = sni.map(str::to_string);
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_string();
        self
    }

    pub fn version(mut self, v: SslVersion) -> Self {
        self.version = Some(v);
        self
    }

    pub fn method(mut self, m: &str) -> Self {
        self.method = m.to_string();
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.extra_headers.push((k.into(), v.into()));
        self
    }

    /// The TLS client configuration: the edge CA, this client's certificate and version, and
    /// `alpn` when given.
    fn configuration(&self, alpn: Option<&[u8]>) -> Result<boring::ssl::ConnectConfiguration, String> {
        let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
        b.set_ca_file(self.dir.join("edge-ca.pem")).map_err(|e| e.to_string())?;
        if let Some(stem) = &self.cert {
            b.set_certificate_chain_file(self.dir.join(format!("{stem}.pem")))
                .map_err(|e| e.to_string())?;
            b.set_private_key_file(self.dir.join(format!("{stem}.key")), SslFiletype::PEM)
                .map_err(|e| e.to_string())?;
        }
        if let Some(v) = self.version {
            b.set_min_proto_version(Some(v)).map_err(|e| e.to_string())?;
            b.set_max_proto_version(Some(v)).map_err(|e| e.to_string())?;
        }
        if let Some(protos) = alpn {
            b.set_alpn_protos(protos).map_err(|e| e.to_string())?;
        }
        let mut cfg = b.build().configure().map_err(|e| e.to_string())?;
        cfg.set_verify_hostname(false);
        Ok(cfg)
    }

    /// Connects and completes the handshake, with the certificate, version, SNI and session
    /// set on this client.
    pub fn connect(&self) -> Result<boring::ssl::SslStream<TcpStream>, String> {
        let mut cfg = self.configuration(None)?;
        if self.sni.is_none() {
            cfg.set_use_server_name_indication(false);
        }
        if let Some(s) = &self.session {
            // SAFETY-free API: boring marks set_session unsafe only for cross-context use.
            unsafe { cfg.set_session(s) }.map_err(|e| e.to_string())?;
        }
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        cfg.connect(self.sni.as_deref().unwrap_or("ignored.invalid"), tcp)
            .map_err(|e| format!("handshake: {e}"))
    }

    /// An HTTP/1.1 connection kept open between requests.
    pub fn keep_alive(&self) -> Result<KeepAlive, String> {
        Ok(KeepAlive {
            tls: self.connect()?,
            host: self.host.clone(),
        })
    }

    /// An HTTP/2 connection kept open between requests.
    /// A TLS connection that negotiated `h2` by ALPN, for writing HTTP/2 frames by hand.
    pub fn connect_h2_raw(&self) -> Result<boring::ssl::SslStream<TcpStream>, String> {
        let cfg = self.configuration(Some(b"\x02h2"))?;
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let tls = cfg.connect("localhost", tcp).map_err(|e| format!("handshake: {e}"))?;
        match tls.ssl().selected_alpn_protocol() {
            Some(b"h2") => Ok(tls),
            other => Err(format!("ALPN chose {other:?}")),
        }
    }

    pub fn h2(&self) -> Result<H2, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let cfg = self.configuration(Some(b"\x02h2"))?;
        let port = self.port;
        let send = rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            let tls = tokio_boring::connect(cfg, "localhost", tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let (send, conn) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, String>(send)
        })?;
        Ok(H2 {
            rt,
            send,
            host: self.host.clone(),
        })
    }

    /// Sends `GET path` and returns as soon as `min_body` body bytes have arrived, with the
    /// connection still open: what a device sees while a download is in flight.
    pub fn first_bytes(
        &self,
        path: &str,
        min_body: usize,
    ) -> Result<(boring::ssl::SslStream<TcpStream>, usize), String> {
        let mut tls = self.connect()?;
        write!(tls, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            let n = tls.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before enough body arrived".into());
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let body = raw.len() - i - 4;
                if body >= min_body {
                    return Ok((tls, body));
                }
            }
        }
    }

    pub fn get(&self, path: &str) -> Result<Response, String> {
        self.request(path).result
    }

    /// Connects, sends `GET path`, and reads the whole response (Connection: close).
    pub fn request(&self, path: &str) -> Outcome {
        let mut session = None;
        let mut resumed = false;
        let result = (|| {
            let mut tls = self.connect()?;
            let mut req = format!(
                "{} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
                self.method, self.host
            );
            for (k, v) in &self.extra_headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            tls.write_all(req.as_bytes()).map_err(|e| format!("write: {e}"))?;
            let mut raw = Vec::new();
            let read = tls.read_to_end(&mut raw);
            resumed = tls.ssl().session_reused();
            session = tls.ssl().session().map(|s| s.to_owned());
            if raw.is_empty() {
                return Err(format!(
                    "read: {}",
                    read.err()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "connection closed".into())
                ));
            }
            parse_response(&raw)
        })();
        Outcome {
            result,
            session,
            resumed,
        }
    }
}

/// An HTTP/1.1 connection that stays open between requests.
pub struct KeepAlive {
    tls: boring::ssl::SslStream<TcpStream>,
    host: String,
}

impl KeepAlive {
    /// `GET path` on this connection; an error when the edge closed it without an answer.
    pub fn get(&mut self, path: &str) -> Result<Response, String> {
        write!(self.tls, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host).map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                match len {
                    Some(n) if raw.len() >= end + 4 + n => return parse_response(&raw[..end + 4 + n]),
                    None if raw.ends_with(b"0\r\n\r\n") => return parse_response(&raw),
                    _ => {}
                }
            }
            let n = self.tls.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {} bytes", raw.len()));
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }
}

/// An HTTP/2 connection that stays open between requests.
pub struct H2 {
    rt: tokio::runtime::Runtime,
    send: h2::client::SendRequest<bytes::Bytes>,
    host: String,
}

impl H2 {
    /// `GET path` as a new stream of this connection; an error when the stream is reset.
    pub fn get(&mut self, path: &str) -> Result<Response, String> {
        self.get_with(path, &[])
    }

    /// `GET path` with extra request headers.
    pub fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
        let mut req = http::Request::get(format!("https://{}{path}", self.host));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).map_err(|e| e.to_string())?;
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut send = send.ready().await.map_err(|e| e.to_string())?;
            let (resp, _) = send.send_request(req, true).map_err(|e| e.to_string())?;
            let resp = resp.await.map_err(|e| format!("stream: {e}"))?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let text = read_h2_body(resp.into_body()).await?;
            Ok(Response {
                status,
                headers,
                body: String::from_utf8_lossy(&text).into_owned(),
            })
        })
    }

    /// Sends `GET path` and returns once `min_body` body bytes have arrived, giving no window
    /// back and then reading nothing more: a device that stalls in the middle of a download. The
    /// stream stays open for as long as the returned body lives.
    pub fn first_bytes(&mut self, path: &str, min_body: usize) -> Result<(h2::RecvStream, usize), String> {
        let req = http::Request::get(format!("https://{}{path}", self.host))
            .body(())
            .map_err(|e| e.to_string())?;
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut send = send.ready().await.map_err(|e| e.to_string())?;
            let (resp, _) = send.send_request(req, true).map_err(|e| e.to_string())?;
            let mut body = resp.await.map_err(|e| format!("stream: {e}"))?.into_body();
            let mut got = 0;
            while got < min_body {
                match body.data().await {
                    Some(chunk) => got += chunk.map_err(|e| format!("body: {e}"))?.len(),
                    None => return Err(format!("the body ended at {got}")),
                }
            }
            Ok((body, got))
        })
    }

    /// `GET` of every path as concurrent streams of this connection: the status and body length
    /// of each, in order, or an error if one fails or they are not all done within `within`.
    pub fn get_all(&mut self, paths: &[String], within: Duration) -> Result<Vec<(u16, usize)>, String> {
        let reqs = paths
            .iter()
            .map(|p| http::Request::get(format!("https://{}{p}", self.host)).body(()).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let send = self.send.clone();
        self.rt.block_on(async move {
            let mut streams = Vec::new();
            for req in reqs {
                let mut send = send.clone().ready().await.map_err(|e| e.to_string())?;
                let (resp, _) = send.send_request(req, true).map_err(|e| e.to_string())?;
                streams.push(tokio::spawn(async move {
                    let resp = resp.await.map_err(|e| format!("stream: {e}"))?;
                    let status = resp.status().as_u16();
                    Ok::<_, String>((status, read_h2_body(resp.into_body()).await?.len()))
                }));
            }
            let all = async {
                let mut out = Vec::new();
                for s in streams {
                    out.push(s.await.map_err(|e| e.to_string())??);
                }
                Ok(out)
            };
            tokio::time::timeout(within, all).await.map_err(|_| format!("not all done within {within:?}"))?
        })
    }
}

/// An HTTP/2 response body, whole, its window given back as it comes.
async fn read_h2_body(mut body: h2::RecvStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok(Response { status, headers, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs curl (OpenSSL) against `https://localhost:PORT/PATH` with the device certificate `stem`
/// and the edge CA, plus `args`: for what the BoringSSL test client cannot do (HTTP/2, a
/// certificate BoringSSL will not sign with).
pub fn curl(dir: &Path, port: u16, stem: &str, path: &str, args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg("--cacert")
        .arg(dir.join("edge-ca.pem"))
        .arg("--cert")
        .arg(dir.join(format!("{stem}.pem")))
        .arg("--key")
        .arg(dir.join(format!("{stem}.key")))
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl is installed")
}

/// A plain-HTTP request to the admin listener; returns the status line's code and the body.
pub fn admin(admin_port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", admin_port)).expect("admin listener");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let r = parse_response(&raw).expect("an HTTP response");
    (r.status, r.body)
}

/// A Prometheus counter's value from the admin listener, 0 when absent.
pub fn metric(admin_port: u16, name_and_labels: &str) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", admin_port)).expect("admin listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A counter's value once it has reached `want`, or after 5 s, whichever comes first. A refused
/// handshake is counted when the edge frees its TLS session, just after the client has seen the
/// refusal: a count read at once can miss the last one.
pub fn wait_metric(admin_port: u16, name_and_labels: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(admin_port, name_and_labels);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The files under `dir` whose names end in `.ext`.
pub fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out
}

/// A copy of the repository's config folder (`conf/edge.yaml` and `conf/rules/`) in `dir/conf`,
/// without a PKI (`mtls-edge demo --conf` installs one); returns the folder.
pub fn copy_conf(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let conf = dir.join("conf");
    std::fs::create_dir_all(conf.join("rules")).unwrap();
    std::fs::copy(repo.join("edge.yaml"), conf.join("edge.yaml")).unwrap();
    for f in std::fs::read_dir(repo.join("rules")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, conf.join("rules").join(f.file_name().unwrap())).unwrap();
    }
    conf
}

/// A tool the tests need: where `scripts/setup.sh` puts it under the repository (`local`), or on
/// the PATH; a missing one fails the test, telling how to install it.
pub fn tool(name: &str, local: &str) -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(local);
    if local.exists() {
        return local;
    }
    let on_path = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().unwrap();
    assert!(on_path.status.success(), "{name} is missing: run scripts/setup.sh, which installs it");
    PathBuf::from(String::from_utf8_lossy(&on_path.stdout).trim())
}
