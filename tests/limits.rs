//! Hostile clients over real sockets: connections that never finish their handshake or their
//! request header, idle keep-alive connections, oversized headers, too many connections in total
//! and per IP, and a device that asks too fast. Each is closed or answered within its limit and
//! counted, and a valid device is served throughout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use mtls_edge::pki::{Ca, LeafSpec};

struct Edge {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
    admin_port: u16,
}

fn edge(limits: &str) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let devices = device_ca(d);
    save(d, "alice", &devices.issue(&LeafSpec::client("alice")).unwrap());
    save(d, "bob", &devices.issue(&LeafSpec::client("bob")).unwrap());
    let strangers = Ca::root("Stranger CA").unwrap();
    save(d, "mallory", &strangers.issue(&LeafSpec::client("mallory")).unwrap());
    let admin_port = free_port();
    let extra = format!("admin: {{ address: 127.0.0.1:{admin_port} }}\nlimits: {{ {limits} }}");
    let (origin, edge) = device_edge(d, 2, "", &extra);
    Edge {
        dir,
        _origin: origin,
        edge,
        admin_port,
    }
}

impl Edge {
    fn client(&self, stem: &str) -> Client<'_> {
        Client::new(self.dir.path(), self.edge.port).cert(stem)
    }

    /// Waits (at most 10 s) until the edge holds `n` viewer sockets.
    fn wait_sockets(&self, n: usize) {
        for _ in 0..200 {
            if metric(self.admin_port, "mtls_edge_open_sockets") as usize == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the edge never held {n} sockets: {}, refusals {} {}",
            metric(self.admin_port, "mtls_edge_open_sockets"),
            self.hits("ConnectionsTotal"),
            self.hits("ConnectionsPerIp")
        );
    }

    /// Waits until the start-up probe's connection has come and gone. It may still be in the
    /// accept queue when the edge holds no socket, so one request is served first: the probe's
    /// connection was queued ahead of it.
    fn settle(&self) {
        assert_eq!(self.client("alice").get("/echo").unwrap().status, 200);
        self.wait_sockets(0);
    }

    fn hits(&self, limit: &str) -> f64 {
        metric(self.admin_port, &format!("mtls_edge_limits_total{{limit=\"{limit}\"}}"))
    }
}

/// How long until the peer closes `s` (reads until EOF or a reset), `None` past `max` (the
/// socket's read timeout, 10 s, also ends the wait).
fn closed_within(s: &mut impl Read, max: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
            Ok(0) | Err(_) => return Some(started.elapsed()).filter(|t| *t <= max),
            Ok(_) if started.elapsed() > max => return None,
            Ok(_) => {}
        }
    }
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn slow_handshakes_headers_and_idle_connections_are_closed_at_their_deadlines() {
    let e = edge("handshake_timeout_ms: 500, request_header_timeout_ms: 500, keepalive_idle_timeout_ms: 700");
    let max = Duration::from_secs(5);

    // A client that connects and says nothing.
    let mut silent = tcp(e.edge.port);
    let t = closed_within(&mut silent, max).expect("a silent connection stays open");
    assert!(t >= Duration::from_millis(400), "closed too early: {t:?}");

    // A verified device whose request header never ends.
    let mut tls = e.client("alice").connect().unwrap();
    tls.write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").unwrap();
    let t = closed_within(&mut tls, max).expect("a half-sent header stays open");
    assert!(t >= Duration::from_millis(300), "closed too early: {t:?}");

    // A keep-alive connection after its request, then idle.
    let mut ka = e.client("alice").keep_alive().unwrap();
    assert_eq!(ka.get("/echo").unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ka.get("/echo").is_err(), "an idle connection outlived keepalive_idle_timeout_ms");

    // A device that keeps asking is never cut between requests that come in time.
    let mut busy = e.client("bob").keep_alive().unwrap();
    for _ in 0..5 {
        assert_eq!(busy.get("/echo").unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(e.hits("HandshakeTimeout") >= 1.0);
    assert!(e.hits("HeaderTimeout") >= 1.0);
    assert!(e.hits("IdleTimeout") >= 1.0);
}

#[test]
fn oversized_headers_are_answered_431() {
    let e = edge("max_request_header_bytes: 2048");
    let big = "x".repeat(4096);
    let r = e.client("alice").header("X-Big", &big).get("/echo").unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(e.hits("HeaderTooLarge"), 1.0);
    let r = e.client("alice").header("X-Small", "y").get("/echo").unwrap();
    assert_eq!(r.status, 200);
}

/// The edge waits for a whole request header before it hands the connection to pingora: a
/// header in pieces, one with bare LF line endings and one with a body behind it are each
/// answered, one after another on one connection.
#[test]
fn request_headers_in_pieces_and_with_bare_lf_are_served() {
    let e = edge("");
    let mut tls = e.client("alice").connect().unwrap();
    for piece in ["GET /echo HTTP/1.1\r\nHo", "st: localhost\r\nX-A: ", "b\r", "\n", "\r", "\n"] {
        tls.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(status_of_next(&mut tls), 200);
    tls.write_all(b"GET /echo HTTP/1.1\nHost: localhost\n\n").unwrap();
    assert_eq!(status_of_next(&mut tls), 200);
    tls.write_all(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello").unwrap();
    assert_eq!(status_of_next(&mut tls), 200);
}

/// Reads one response with a Content-Length from `s`; its status.
fn status_of_next(s: &mut impl Read) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    head[9..12].parse().unwrap()
}

#[test]
fn connections_are_limited_per_ip_and_in_total() {
    let e = edge("max_connections_per_ip: 3, handshake_timeout_ms: 60000");
    e.settle();
    let parked: Vec<TcpStream> = (0..3).map(|_| tcp(e.edge.port)).collect();
    e.wait_sockets(3);
    let mut fourth = tcp(e.edge.port);
    assert!(
        closed_within(&mut fourth, Duration::from_secs(5)).is_some(),
        "a fourth connection from one IP was kept: {} sockets, {} refusals",
        metric(e.admin_port, "mtls_edge_open_sockets"),
        e.hits("ConnectionsPerIp")
    );
    assert!(e.client("alice").get("/echo").is_err(), "over the per-IP limit, even a device waits");
    assert!(e.hits("ConnectionsPerIp") >= 2.0);
    drop(parked);
    e.wait_sockets(0);
    assert_eq!(e.client("alice").get("/echo").unwrap().status, 200, "slots are released on close");

    let e = edge("max_connections: 2, handshake_timeout_ms: 60000");
    e.settle();
    let parked: Vec<TcpStream> = (0..2).map(|_| tcp(e.edge.port)).collect();
    e.wait_sockets(2);
    assert!(e.client("alice").get("/echo").is_err());
    assert!(e.hits("ConnectionsTotal") >= 1.0);
    drop(parked);
    e.wait_sockets(0);
    assert_eq!(e.client("alice").get("/echo").unwrap().status, 200);
}

#[test]
fn a_device_that_asks_too_fast_gets_429_with_retry_after_and_others_do_not() {
    let e = edge("rate_limit: { requests_per_second: 0.1, burst: 2 }");
    let mut alice = e.client("alice").keep_alive().unwrap();
    assert_eq!(alice.get("/echo").unwrap().status, 200);
    assert_eq!(alice.get("/echo").unwrap().status, 200);
    let r = alice.get("/echo").unwrap();
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    // Another device has its own bucket.
    assert_eq!(e.client("bob").get("/echo").unwrap().status, 200);
    assert_eq!(e.hits("RateLimited"), 1.0);
}

#[test]
fn a_cel_key_puts_requests_in_the_bucket_it_names() {
    let key = r#"'tenant:' + request.headers["x-tenant"] + string(10 / int(request.headers["x-d"]))"#;
    let e = edge(&format!("rate_limit: {{ requests_per_second: 0.1, burst: 2, key: '{}' }}", key.replace('\'', "''")));
    let get = |who: &str, tenant: &str, d: &str| {
        let r = e.client(who).header("X-Tenant", tenant).header("X-D", d).get("/echo").unwrap();
        r.status
    };
    // Two devices of one tenant share its bucket; another tenant has its own.
    assert_eq!(get("alice", "a", "1"), 200);
    assert_eq!(get("bob", "a", "1"), 200);
    assert_eq!(get("bob", "a", "1"), 429);
    assert_eq!(get("alice", "b", "1"), 200);
    // A key that fails (a division by zero) falls back to the device's own bucket: alice's.
    assert_eq!(get("alice", "a", "0"), 200);
    assert_eq!(get("alice", "a", "0"), 200);
    assert_eq!(get("alice", "a", "0"), 429);
    assert_eq!(metric(e.admin_port, "mtls_edge_rate_key_errors_total"), 3.0);
    assert_eq!(e.hits("RateLimited"), 2.0);
}

#[test]
fn an_ip_whose_handshakes_keep_failing_is_refused_at_accept_for_a_while() {
    // The start-up probe's connection (no TLS) counts as one failure.
    let e = edge("failed_handshakes_per_ip: { max: 4, window_secs: 2 }");
    e.wait_sockets(0);
    for _ in 0..3 {
        assert!(e.client("mallory").get("/echo").is_err());
    }
    e.wait_sockets(0);
    // Even a valid device from that IP waits for the window to pass.
    assert!(e.client("alice").get("/echo").is_err());
    assert!(e.hits("FailedHandshakesPerIp") >= 1.0);
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(e.client("alice").get("/echo").unwrap().status, 200);
}

/// By default an IP past 100 failed handshakes in 10 s has each connection wait a second.
#[test]
fn by_default_an_ip_whose_handshakes_keep_failing_waits_but_a_valid_device_is_served() {
    let e = edge("");
    e.wait_sockets(0);
    // The start-up probe's connection counts as one failure; four at a time, so that the 99
    // others fit in the window on a slow machine.
    let edge = &e;
    std::thread::scope(|s| {
        for n in [25, 25, 25, 24] {
            s.spawn(move || (0..n).for_each(|_| assert!(edge.client("mallory").get("/echo").is_err())));
        }
    });
    e.wait_sockets(0);
    let started = Instant::now();
    assert!(e.client("mallory").get("/echo").is_err());
    let refused = started.elapsed();
    assert!(refused >= Duration::from_millis(900), "the failing client was answered in {refused:?}");
    let started = Instant::now();
    assert_eq!(e.client("alice").get("/echo").unwrap().status, 200);
    let served = started.elapsed();
    assert!(served >= Duration::from_millis(900), "the delayed IP was served in {served:?}");
    assert!(e.hits("FailedHandshakesPerIp") >= 2.0);
}
