//! The admin listener is not a back door: on a non-loopback address it requires a bearer token
//! or operators' client certificates, and every refusal is counted.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use mtls_edge::pki::{Ca, LeafSpec};

/// A request to the plain-HTTP admin listener with an optional `Authorization` value.
fn call(port: u16, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn value(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// An edge whose admin listener binds every address, with `admin` as the rest of its entry.
fn edge(d: &std::path::Path, admin: &str) -> (Proc, Proc, u16) {
    let devices = device_ca(d);
    save(d, "device", &devices.issue(&LeafSpec::client("device")).unwrap());
    let operators = Ca::root("Operators CA").unwrap();
    save(d, "operator", &operators.issue(&LeafSpec::client("alice")).unwrap());
    std::fs::write(d.join("operators-ca.pem"), &operators.cert_pem).unwrap();
    let admin_port = free_port();
    let (origin, edge) = device_edge(
        d,
        1,
        "  operators: { ca_files: [operators-ca.pem] }\n",
        &format!("admin: {{ address: 0.0.0.0:{admin_port}, {admin} }}"),
    );
    wait_for(admin_port);
    (edge, origin, admin_port)
}

fn wait_for(port: u16) {
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("admin listener on {port} did not come up");
}

#[test]
fn a_token_guards_every_admin_request_but_the_health_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let token = "s3cret-token-0123456789";
    std::fs::write(d.join("admin-token"), format!("{token}\n")).unwrap();
    let (_edge, _origin, port) = edge(d, "token_file: admin-token");
    let bearer = format!("Bearer {token}");

    assert_eq!(call(port, "GET", "/healthz", None).0, 200);
    for (method, path) in [("GET", "/metrics"), ("POST", "/reload"), ("POST", "/cache/purge?prefix=/")] {
        assert_eq!(call(port, method, path, None).0, 401, "{method} {path} without a token");
        assert_eq!(call(port, method, path, Some("Bearer wrong-token-0123456789")).0, 401);
        assert_eq!(call(port, method, path, Some(token)).0, 401, "no scheme");
    }
    assert_eq!(call(port, "POST", "/reload", Some(&bearer)).0, 200);
    let (status, metrics) = call(port, "GET", "/metrics", Some(&bearer));
    assert_eq!(status, 200);
    assert_eq!(value(&metrics, "mtls_edge_admin_refused_total{reason=\"TokenMissing\"}"), 6.0);
    assert_eq!(value(&metrics, "mtls_edge_admin_refused_total{reason=\"TokenInvalid\"}"), 3.0);
    // The token rotates with a reload: the old one stops working.
    let new = "rotated-token-9876543210";
    std::fs::write(d.join("admin-token"), new).unwrap();
    assert_eq!(call(port, "POST", "/reload", Some(&bearer)).0, 200);
    assert_eq!(call(port, "GET", "/metrics", Some(&bearer)).0, 401);
    assert_eq!(call(port, "GET", "/metrics", Some(&format!("Bearer {new}"))).0, 200);
}

#[test]
fn operators_certificates_guard_the_admin_listener_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let (_edge, _origin, port) = edge(
        d,
        "mtls: { trust_store: operators, server_cert: edge-server.pem, server_key: edge-server.key }",
    );
    // Plain HTTP gets nowhere; no certificate and a device's certificate are refused.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("mtls_edge_"), "plain HTTP was served");
    assert!(Client::new(d, port).get("/metrics").is_err());
    assert!(Client::new(d, port).cert("device").get("/metrics").is_err());

    let r = Client::new(d, port).cert("operator").get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    let listener = format!("listener=\"admin 0.0.0.0:{port}\"");
    let refused = |reason: &str| {
        value(&r.body, &format!("mtls_edge_handshakes_total{{{listener},outcome=\"refused\",reason=\"{reason}\"}}"))
    };
    assert_eq!(refused("ClientCertMissing"), 1.0, "{}", r.body);
    assert_eq!(refused("ClientCertUntrusted"), 1.0, "{}", r.body);
    let r = Client::new(d, port).cert("operator").method("POST").get("/reload").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn healthz_is_ready_only_once_every_viewer_listener_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    std::fs::write(d.join("admin-token"), "t0ken-0123456789\n").unwrap();
    let (_edge, _origin, port) = edge(d, "token_file: admin-token");
    // An edge that serves: ready, and no token is needed to ask.
    assert_eq!(call(port, "GET", "/healthz", None), (200, "ok\n".to_string()));

    // A second edge whose viewer port another process holds: its admin listener answers, and
    // says it is not ready, naming the listener (a load balancer sends it nothing).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let admin_port = free_port();
    let yaml = format!(
        "{server}listeners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem] }}\norigins:\n{origin}routes:\n  - {{ path_prefix: /, origin: firmware }}\nadmin: {{ address: 127.0.0.1:{admin_port} }}\n",
        server = server_yaml(d, 1),
        listener = listener_yaml(taken, "required", "devices"),
        origin = origin_yaml("firmware", origin.port),
    );
    let _blocked = spawn_edge(d, &yaml, admin_port);
    let (status, body) = call(admin_port, "GET", "/healthz", None);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, format!("starting: listener 127.0.0.1:{taken} is not bound yet\n"));
}
