//! HTTP/2 abuse over real sockets, with frames written by hand: rapid reset (CVE-2023-44487), a
//! CONTINUATION flood, a SETTINGS flood, more streams than the edge allows, and a stream of
//! malformed requests. The edge stays up, its memory stays bounded, and a valid device is served
//! after each. And what a shutdown does to an open HTTP/2 connection.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use mtls_edge::pki::LeafSpec;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
/// Not a frame type: `drain` notes that the edge went quiet rather than close the connection.
const QUIET: u8 = 0xff;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET /echo` for `localhost`, HPACK-encoded from the static table and one literal.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04, 5];
    b.extend_from_slice(b"/echo");
    b.extend_from_slice(&[0x41, 9]);
    b.extend_from_slice(b"localhost");
    b
}

/// The frame types the edge sent until it closed the connection or went quiet, and the error
/// code of each RST_STREAM.
fn drain(tls: &mut impl Read) -> (Vec<u8>, Vec<u32>) {
    let (mut kinds, mut resets) = (Vec::new(), Vec::new());
    let mut head = [0u8; 9];
    loop {
        match tls.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                kinds.push(QUIET);
                break;
            }
            Err(_) => break,
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if tls.read_exact(&mut payload).is_err() {
            break;
        }
        kinds.push(head[3]);
        if head[3] == RST_STREAM && len == 4 {
            resets.push(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
        }
        if head[3] == GOAWAY {
            break;
        }
    }
    (kinds, resets)
}

/// `GET /echo` with no `:authority` and no Host: a request pingora refuses as malformed.
fn no_authority_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04, 5];
    b.extend_from_slice(b"/echo");
    b
}

/// Reads frames until a response header; false if the connection closed or went quiet first.
fn answer(tls: &mut impl Read) -> bool {
    let mut head = [0u8; 9];
    loop {
        if tls.read_exact(&mut head).is_err() {
            return false;
        }
        let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
        if tls.read_exact(&mut payload).is_err() {
            return false;
        }
        if head[3] == HEADERS {
            return true;
        }
    }
}

struct Edge {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
}

impl Edge {
    fn start() -> Edge {
        Edge::with_server(|yaml| yaml)
    }

    /// An edge whose config `edit` may change.
    fn with_server(edit: impl FnOnce(String) -> String) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ServerPki::write(d);
        let devices = device_ca(d);
        save(d, "alice", &devices.issue(&LeafSpec::client("alice")).unwrap());
            let limits = "limits: { h2_max_concurrent_streams: 10, keepalive_idle_timeout_ms: 2000 }";
        let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
        let port = free_port();
        let yaml = format!(
            "{server}listeners:\n{listener}trust_stores:\n  devices: {{ ca_files: [device-ca.pem] }}\norigins:\n{origin}routes:\n  - {{ path_prefix: /, origin: firmware }}\n{limits}\n",
            server = server_yaml(d, 2),
            listener = listener_yaml(port, "required", "devices"),
            origin = origin_yaml("firmware", origin.port),
        );
        let edge = spawn_edge(d, &edit(yaml), port);
        Edge { dir, _origin: origin, edge }
    }

    fn client(&self) -> Client<'_> {
        Client::new(self.dir.path(), self.edge.port).cert("alice")
    }

    /// A raw HTTP/2 connection past its preface and SETTINGS.
    fn raw(&self) -> boring::ssl::SslStream<std::net::TcpStream> {
        let mut tls = self.client().connect_h2_raw().unwrap();
        tls.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tls.write_all(PREFACE).unwrap();
        tls.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
        tls
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.edge.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn still_serves(&self, after: &str) {
        let mut h2 = self.client().h2().unwrap();
        assert_eq!(h2.get("/echo").unwrap().status, 200, "a valid device is not served after {after}");
        assert_eq!(self.client().get("/echo").unwrap().status, 200);
    }
}

#[test]
fn rapid_reset_continuation_and_settings_floods_leave_the_edge_serving_with_bounded_memory() {
    let e = Edge::start();
    e.still_serves("start");
    let before = e.rss_kib();

    // Rapid reset: streams opened and cancelled at once, as fast as the client can.
    let mut tls = e.raw();
    let block = get_block();
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = tls.write_all(&burst);
    let (kinds, _) = drain(&mut tls);
    assert!(kinds.contains(&GOAWAY), "rapid reset was not answered with GOAWAY: {kinds:?}");
    e.still_serves("rapid reset");

    // CONTINUATION flood: one header block that never ends.
    let mut tls = e.raw();
    let mut flood = frame(HEADERS, 0, 1, &block);
    for _ in 0..20_000 {
        flood.extend(frame(CONTINUATION, 0, 1, &[0x40, 1, b'x', 1, b'y']));
    }
    let _ = tls.write_all(&flood);
    let (kinds, _) = drain(&mut tls);
    assert!(
        !kinds.contains(&QUIET) && !kinds.contains(&HEADERS),
        "the edge kept a CONTINUATION flood open: {kinds:?}"
    );
    e.still_serves("a CONTINUATION flood");

    // SETTINGS flood: each is acknowledged, nothing accumulates.
    let mut tls = e.raw();
    let mut flood = Vec::new();
    for _ in 0..20_000 {
        flood.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
    }
    let _ = tls.write_all(&flood);
    drop(tls);
    e.still_serves("a SETTINGS flood");

    let after = e.rss_kib();
    assert!(after < before + 64 * 1024, "RSS grew from {before} KiB to {after} KiB");
}

#[test]
fn streams_beyond_the_limit_are_refused() {
    let e = Edge::start();
    let mut tls = e.raw();
    // 30 requests whose bodies never come: only 10 may be open at once.
    let block = get_block();
    let mut open = Vec::new();
    for i in 0..30u32 {
        open.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
    }
    tls.write_all(&open).unwrap();
    let (_, resets) = drain(&mut tls);
    const REFUSED_STREAM: u32 = 7;
    assert!(
        resets.iter().filter(|c| **c == REFUSED_STREAM).count() >= 20,
        "streams over h2_max_concurrent_streams were not refused: {resets:?}"
    );
    e.still_serves("too many streams");
}

#[test]
fn a_connection_that_keeps_sending_malformed_requests_is_closed() {
    let e = Edge::start();
    let mut tls = e.raw();
    // Each is answered 400 on its own; past pingora's budget of 32 the connection is dropped.
    // One at a time: a burst would be refused mostly for the stream limit, as 400s queue up.
    let block = no_authority_block();
    let mut answered = 0;
    for i in 0..40u32 {
        if tls.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block)).is_err() {
            break;
        }
        if !answer(&mut tls) {
            break;
        }
        answered += 1;
    }
    assert_eq!(answered, 31, "not dropped at the 32nd malformed request");
    e.still_serves("malformed requests");
}

#[test]
fn a_shutdown_sends_goaway_and_serves_what_the_client_opens_before_the_last_one() {
    // Two seconds for the open connections once the listeners have stopped.
    let e = Edge::with_server(|yaml| {
        yaml.replace("grace_period_seconds: 0", "grace_period_seconds: 2")
    });
    let mut tls = e.raw();
    let ok = std::process::Command::new("kill")
        .args(["-s", "TERM", &e.edge.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -s TERM");
    let (kinds, _) = drain(&mut tls);
    assert_eq!(kinds.last(), Some(&GOAWAY), "no GOAWAY on shutdown: {kinds:?}");
    // The first GOAWAY announces the shutdown; a stream opened now is still served.
    tls.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_block())).unwrap();
    let (kinds, _) = drain(&mut tls);
    assert!(kinds.contains(&HEADERS), "a stream opened after the first GOAWAY got no response: {kinds:?}");
}
