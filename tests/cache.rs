//! The shared cache over real sockets: hits after one fill, one origin fetch for many
//! concurrent requests, authorization before any lookup, and what is never shared.

mod common;

use common::*;
use mtls_edge::pki::LeafSpec;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

struct Setup {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
    optional_port: u16,
    admin_port: u16,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let ca = device_ca(d);
    save(d, "device", &ca.issue(&LeafSpec::client("device-1")).unwrap());
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, optional_port, admin_port) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"{server}listeners:
{required}{optional}trust_stores:
  devices: {{ ca_files: [device-ca.pem] }}
origins:
{origin}routes:
  - {{ path_prefix: /files/, origin: files, cache: {{ default_ttl_secs: 60 }} }}
  - {{ path_prefix: /abort/, origin: files, cache: {{ default_ttl_secs: 60 }} }}
  - {{ path_prefix: /gated/, origin: files, cache: {{ default_ttl_secs: 60 }} }}
  - {{ path_prefix: /public/, origin: files, access: any, cache: {{ default_ttl_secs: 60 }} }}
  - {{ path_prefix: /seen/, origin: files, cache: {{ default_ttl_secs: 60 }} }}
  - {{ path_prefix: /, origin: files }}
cache: {{ max_bytes: 67108864, max_object_bytes: 16777216 }}
admin: {{ address: 127.0.0.1:{admin_port} }}
"#,
        server = server_yaml(d, 2),
        required = listener_yaml(port, "required", "devices"),
        optional = listener_yaml(optional_port, "optional", "devices"),
        origin = origin_yaml("files", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    Setup {
        dir,
        _origin: origin,
        edge,
        optional_port,
        admin_port,
    }
}

/// Something that is not an origin, to stand in for one that was stopped.
fn spawn_placeholder() -> Proc {
    Proc::sleeper()
}

impl Setup {
    /// Requests answered by `hit`, without pingora's session.
    fn direct_hits(&self) -> f64 {
        metric(self.admin_port, "mtls_edge_cache_direct_hits_total")
    }

    /// How many requests for `path` reached the origin.
    fn origin_count(&self, path: &str) -> u64 {
        let r = Client::new(self.dir.path(), self.edge.port)
            .cert("device")
            .get(&format!("/__origin/count?path={path}"))
            .unwrap();
        r.body.trim().parse().unwrap()
    }
}

#[test]
fn a_second_request_is_a_hit_and_the_origin_sees_one() {
    let s = setup();
    let client = Client::new(s.dir.path(), s.edge.port).cert("device");
    let first = client.get("/files/a.bin?size=5000").unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body.as_bytes(), mtls_edge::demo::file_body(5000).as_slice());
    assert_eq!(first.header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
    let second = client.get("/files/a.bin?size=5000").unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("cache-status"), Some("mtls-edge; hit"));
    assert!(
        second.header("age").is_some_and(|a| a.parse::<u64>().is_ok()),
        "no Age on a hit"
    );
    assert_eq!(s.origin_count("/files/a.bin"), 1);
    // Another query is another object.
    client.get("/files/a.bin?size=10").unwrap();
    assert_eq!(s.origin_count("/files/a.bin"), 2);
}

/// HTTP/2 writes go through the same coalescing as HTTP/1 (`records::Coalesced`, small writes
/// held until the codec flushes): every byte must still arrive in order, on a miss (streamed
/// from the fill) and on a hit, for sizes on and off a frame, with small responses in between.
#[test]
fn large_objects_over_http2_arrive_whole_on_a_miss_and_on_a_hit() {
    let s = setup();
    let mut h2 = Client::new(s.dir.path(), s.edge.port).cert("device").h2().unwrap();
    for size in [3_000_001usize, 16_384, 16_393, 700] {
        for want in ["mtls-edge; fwd=miss; stored", "mtls-edge; hit"] {
            let r = h2.get(&format!("/files/h2-{size}.bin?size={size}")).unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("cache-status"), Some(want), "{size}");
            assert!(
                r.body.as_bytes() == mtls_edge::demo::file_body(size).as_slice(),
                "{size} bytes ({want}): got {}",
                r.body.len()
            );
            assert_eq!(h2.get("/echo").unwrap().status, 200, "a small response after {size}");
        }
    }
}

#[test]
fn concurrent_requests_for_a_cold_object_cause_one_origin_fetch() {
    let s = setup();
    let d = s.dir.path();
    let port = s.edge.port;
    let size = 300_000;
    let bodies: Vec<(u16, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                scope.spawn(move || {
                    let r = Client::new(d, port)
                        .cert("device")
                        .get(&format!("/files/storm.bin?size={size}&delay_ms=400"))
                        .unwrap();
                    (r.status, r.body.len())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(bodies.iter().all(|&(st, len)| st == 200 && len == size), "{bodies:?}");
    assert_eq!(s.origin_count("/files/storm.bin"), 1, "the storm was not coalesced");
    let m = |name: &str| metric(s.admin_port, name);
    assert!(m("mtls_edge_cache_coalesced_waiters_total") >= 1.0);
    assert!(m("mtls_edge_cache_bytes{tier=\"memory\"}") >= size as f64);
    assert_eq!(m("mtls_edge_cache_budget_bytes"), 67108864.0);
    assert!(m("mtls_edge_response_body_bytes_total{source=\"origin\"}") >= size as f64);
    assert_eq!(m("mtls_edge_cache_lookups_total{result=\"miss\"}"), 1.0);
}

#[test]
fn a_client_without_a_certificate_never_gets_a_cached_body_it_may_not_read() {
    let s = setup();
    let d = s.dir.path();
    // Warm the cache through the optional listener with a device certificate.
    let warm = Client::new(d, s.optional_port)
        .cert("device")
        .get("/files/secret.bin?size=100")
        .unwrap();
    assert_eq!(warm.status, 200);
    let denied = Client::new(d, s.optional_port)
        .get("/files/secret.bin?size=100")
        .unwrap();
    assert_eq!(denied.status, 403);
    assert!(
        !denied.body.contains("abcdefghij"),
        "cached body leaked: {}",
        denied.body
    );
    assert_eq!(denied.header("cache-status"), None);
    // A route open to anyone serves clients without a certificate, from the cache too.
    let open = Client::new(d, s.optional_port)
        .get("/public/open.bin?size=100")
        .unwrap();
    assert_eq!(open.status, 200);
    let again = Client::new(d, s.optional_port)
        .get("/public/open.bin?size=100")
        .unwrap();
    assert_eq!(again.header("cache-status"), Some("mtls-edge; hit"));
}

#[test]
fn private_responses_are_never_shared() {
    let s = setup();
    let client = Client::new(s.dir.path(), s.edge.port).cert("device");
    for _ in 0..2 {
        let r = client.get("/files/mine.bin?size=10&private=1").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("cache-status"), Some("mtls-edge; fwd=miss"));
    }
    assert_eq!(s.origin_count("/files/mine.bin"), 2);
}

#[test]
fn ranges_conditionals_and_head_are_answered_from_the_cache() {
    let s = setup();
    let d = s.dir.path();
    let c = || Client::new(d, s.edge.port).cert("device");
    let path = "/files/fw.bin?size=1000";
    let full = mtls_edge::demo::file_body(1000);
    // A range on a miss, while the object fills.
    let r = c().header("Range", "bytes=0-9").get(path).unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body.as_bytes(), &full[0..10]);
    // Ranges on the hit.
    let r = c().header("Range", "bytes=100-199").get(path).unwrap();
    assert_eq!((r.status, r.header("content-range")), (206, Some("bytes 100-199/1000")));
    assert_eq!(r.body.as_bytes(), &full[100..200]);
    assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
    let r = c().header("Range", "bytes=-5").get(path).unwrap();
    assert_eq!(r.body.as_bytes(), &full[995..]);
    let r = c().header("Range", "bytes=5000-").get(path).unwrap();
    assert_eq!(r.status, 416);
    // Several ranges: one multipart/byteranges response whose parts hold the right bytes.
    let r = c().header("Range", "bytes=0-1,10-12").get(path).unwrap();
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap_or_default();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").expect(ct);
    let parts: Vec<&str> = r.body.split(&format!("--{boundary}")).collect();
    assert_eq!(parts.len(), 4, "preamble, two parts, closing: {:?}", r.body); // last is "--\r\n"
    for (part, (range, bytes)) in parts[1..3].iter().zip([("0-1", &full[0..2]), ("10-12", &full[10..13])]) {
        assert!(part.contains(&format!("Content-Range: bytes {range}/1000")), "{part:?}");
        let body = part.split("\r\n\r\n").nth(1).unwrap().trim_end_matches("\r\n");
        assert_eq!(body.as_bytes(), bytes, "{part:?}");
    }
    // If-Range with the current validator gives the range, with another the whole object.
    let r = c()
        .header("Range", "bytes=0-0")
        .header("If-Range", "\"1000\"")
        .get(path)
        .unwrap();
    assert_eq!(r.status, 206);
    let r = c()
        .header("Range", "bytes=0-0")
        .header("If-Range", "\"old\"")
        .get(path)
        .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 1000));
    // Conditional requests answered 304 from the cache.
    let r = c().header("If-None-Match", "\"1000\"").get(path).unwrap();
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = c().header("If-None-Match", "\"other\"").get(path).unwrap();
    assert_eq!(r.status, 200);
    // HEAD: headers of the object, no body.
    let r = c().method("HEAD").get(path).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("1000")));
    assert!(r.body.is_empty());
    assert_eq!(
        s.origin_count("/files/fw.bin"),
        1,
        "every one of these came from the one fill"
    );
}

#[test]
fn an_origin_that_fails_mid_body_leaves_nothing_in_the_cache() {
    let s = setup();
    let d = s.dir.path();
    let port = s.edge.port;
    let size = 200_000;
    let mut fetched = 0;
    for round in 1..=2 {
        let results: Vec<Result<Response, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    scope.spawn(move || {
                        Client::new(d, port)
                            .cert("device")
                            .get(&format!("/abort/x.bin?size={size}"))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Either the transfer errors or it ends short of its Content-Length: never a response
        // that looks complete.
        for r in results.iter().flatten() {
            let declared: usize = r.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            assert!(
                r.body.len() < size && (declared == 0 || r.body.len() < declared),
                "round {round}: looked complete"
            );
        }
        // Waiters of a failed fill may retry the origin themselves; what matters is that every
        // round goes back to the origin: the failed object was never stored.
        let now = s.origin_count("/abort/x.bin");
        assert!(now > fetched, "round {round}: served without an origin fetch");
        fetched = now;
    }
}

#[test]
fn vary_keeps_variants_apart() {
    let s = setup();
    let c = |lang: &str| {
        Client::new(s.dir.path(), s.edge.port)
            .cert("device")
            .header("Accept-Language", lang)
            .get("/files/v.bin?size=4&vary=accept-language")
            .unwrap()
    };
    assert!(c("de").body.starts_with("de:"));
    assert!(c("fr").body.starts_with("fr:"));
    let again = c("de");
    assert!(again.body.starts_with("de:"), "{}", again.body);
    assert_eq!(again.header("cache-status"), Some("mtls-edge; hit"));
    assert_eq!(s.origin_count("/files/v.bin"), 2);
}

#[test]
fn an_expired_object_is_revalidated_and_a_304_refreshes_it() {
    let s = setup();
    let c = || Client::new(s.dir.path(), s.edge.port).cert("device");
    let path = "/files/reval.bin?size=50&max_age=1";
    let first = c().get(path).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let second = c().get(path).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.header("cache-status"),
        Some("mtls-edge; fwd=stale; fwd-status=304")
    );
    assert_eq!(
        s.origin_count("/files/reval.bin"),
        2,
        "the revalidation went to the origin"
    );
    // The 304 refreshed the entry: fresh again, a plain hit.
    assert_eq!(c().get(path).unwrap().header("cache-status"), Some("mtls-edge; hit"));
}

#[test]
fn stale_content_is_served_while_revalidating_and_when_the_origin_fails() {
    let mut s = setup();
    let c = |port| Client::new(s.dir.path(), port).cert("device");
    // stale-while-revalidate: the stale copy is served at once, the refresh runs behind it.
    let swr = "/files/swr.bin?size=50&max_age=1&swr=60";
    let first = c(s.edge.port).get(swr).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let stale = c(s.edge.port).get(swr).unwrap();
    assert_eq!(stale.body, first.body);
    assert_eq!(stale.header("cache-status"), Some("mtls-edge; hit; fwd=stale"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.origin_count("/files/swr.bin"), 2, "no background refresh");

    // stale-if-error: when the origin answers 5xx, the expired copy is served; without
    // stale-if-error the 5xx goes through.
    for (name, sie, status) in [("sie5xx", "&sie=60", 200), ("plain5xx", "", 503)] {
        let path = format!("/files/{name}.bin?size=50&max_age=1{sie}");
        let first = c(s.edge.port).get(&path).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        c(s.edge.port)
            .get(&format!("/__origin/fail?path=/files/{name}.bin&status=503"))
            .unwrap();
        let r = c(s.edge.port).get(&path).unwrap();
        assert_eq!(r.status, status, "{name}");
        if status == 200 {
            assert_eq!(r.body, first.body);
            assert_eq!(r.header("cache-status"), Some("mtls-edge; hit; fwd=stale"));
        }
    }

    // stale-if-error: with the origin gone, the expired copy is served.
    let sie = "/files/sie.bin?size=50&max_age=1&sie=60";
    let first = c(s.edge.port).get(sie).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(std::mem::replace(&mut s._origin, spawn_placeholder()));
    let stale = c(s.edge.port).get(sie).unwrap();
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, first.body);
    // Without stale-if-error, an expired object and a dead origin give 502.
    let plain = c(s.edge.port).get("/files/never-cached.bin?size=5").unwrap();
    assert_eq!(plain.status, 502);
}

#[test]
fn the_admin_listener_purges_by_url_and_by_prefix() {
    let s = setup();
    let c = || Client::new(s.dir.path(), s.edge.port).cert("device");
    for p in ["/files/p/a.bin?size=5", "/files/p/b.bin?size=5", "/files/q.bin?size=5"] {
        c().get(p).unwrap();
        assert_eq!(c().get(p).unwrap().header("cache-status"), Some("mtls-edge; hit"));
    }
    let purge = |q: &str| admin(s.admin_port, "POST", &format!("/cache/purge?{q}"));
    assert_eq!(
        purge("url=https%3A%2F%2Flocalhost%2Ffiles%2Fq.bin%3Fsize%3D5"),
        (200, "{\"purged\":1}\n".into())
    );
    assert_eq!(
        c().get("/files/q.bin?size=5").unwrap().header("cache-status"),
        Some("mtls-edge; fwd=miss; stored")
    );
    assert_eq!(
        purge("prefix=localhost%2Ffiles%2Fp%2F"),
        (200, "{\"purged\":2}\n".into())
    );
    for p in ["/files/p/a.bin?size=5", "/files/p/b.bin?size=5"] {
        assert_eq!(
            c().get(p).unwrap().header("cache-status"),
            Some("mtls-edge; fwd=miss; stored"),
            "{p}"
        );
    }
    // Bad requests are refused and purge nothing.
    assert_eq!(purge("").0, 400);
    assert_eq!(purge("url=a&prefix=b").0, 400);
    assert_eq!(
        admin(s.admin_port, "GET", "/cache/purge?url=localhost/files/q.bin%3Fsize%3D5").0,
        405
    );
    assert_eq!(
        c().get("/files/q.bin?size=5").unwrap().header("cache-status"),
        Some("mtls-edge; hit")
    );
}

#[test]
fn waiting_clients_stream_a_fill_before_the_origin_has_finished() {
    let s = setup();
    let d = s.dir.path();
    let size = 1_000_000;
    let path = format!("/gated/slow.bin?size={size}");
    // The origin sends half, then holds the rest until released. Both devices get their first
    // half-megabyte while the fill is still in progress.
    let (mut first, got_first) = Client::new(d, s.edge.port)
        .cert("device")
        .first_bytes(&path, 1)
        .unwrap();
    let (mut second, got) = Client::new(d, s.edge.port)
        .cert("device")
        .first_bytes(&path, size / 2)
        .unwrap();
    assert!(got >= size / 2);
    assert_eq!(s.origin_count("/gated/slow.bin"), 1);
    Client::new(d, s.edge.port)
        .cert("device")
        .get("/__origin/release?name=slow.bin")
        .unwrap();
    for (i, (stream, mut total)) in [(&mut first, got_first), (&mut second, got)].into_iter().enumerate() {
        let mut buf = [0u8; 65536];
        // Content-Length framing: read until the whole body is in (keep-alive, no close).
        while total < size {
            let n = std::io::Read::read(stream, &mut buf).unwrap();
            assert!(n > 0, "stream {i} ended early at {total}");
            total += n;
        }
        assert_eq!(total, size, "stream {i}");
    }
    assert_eq!(s.origin_count("/gated/slow.bin"), 1);
}

#[test]
fn a_client_that_stops_reading_does_not_hold_up_the_fill() {
    let s = setup();
    let d = s.dir.path();
    let size = 15_000_000; // far more than loopback socket buffers hold
    let path = format!("/files/stalled.bin?size={size}");
    // The device that starts the fill reads one byte and then nothing. The origin's whole body
    // still reaches the cache, at the origin's pace.
    let (mut stalled, got) = Client::new(d, s.edge.port)
        .cert("device")
        .first_bytes(&path, 1)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(s.admin_port, "mtls_edge_cache_bytes{tier=\"memory\"}") < size as f64 {
        assert!(Instant::now() < deadline, "the fill stalled with its first client");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = Client::new(d, s.edge.port).cert("device").get(&path).unwrap();
    assert_eq!((r.status, r.body.len()), (200, size));
    assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
    // The stalled device then gets the rest of its body.
    let (mut total, mut buf) = (got, vec![0u8; 65536]);
    while total < size {
        let n = std::io::Read::read(&mut stalled, &mut buf).unwrap();
        assert!(n > 0, "ended early at {total}");
        total += n;
    }
    assert_eq!(s.origin_count("/files/stalled.bin"), 1);
}

#[test]
fn an_http2_client_that_stops_reading_does_not_hold_up_the_fill() {
    let s = setup();
    let size = 15_000_000;
    let path = format!("/files/stalled-h2.bin?size={size}");
    // As over HTTP/1.1: the device that starts the fill stops reading after its first bytes, and
    // gives no flow-control window back. The whole body must still reach the cache.
    let mut h2 = Client::new(s.dir.path(), s.edge.port).cert("device").h2().unwrap();
    let (_stalled, _) = h2.first_bytes(&path, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(s.admin_port, "mtls_edge_cache_bytes{tier=\"memory\"}") < size as f64 {
        assert!(Instant::now() < deadline, "the fill stalled with its first HTTP/2 client");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = Client::new(s.dir.path(), s.edge.port).cert("device").get(&path).unwrap();
    assert_eq!((r.status, r.body.len()), (200, size));
    assert_eq!(s.origin_count("/files/stalled-h2.bin"), 1);
}

/// An HTTP/2 miss is served by a fill of its own (a subrequest, `fill`), which must send the
/// origin what the request would have: the device's identity (never a copy the client sent), the
/// host, a range's whole object. Its response reaches the client as it would have, with one
/// access line; what is not stored is fetched once per request, and an origin's error passes.
#[test]
fn an_http2_miss_is_filled_with_the_request_s_identity_and_answered_once() {
    let s = setup();
    let mut h2 = Client::new(s.dir.path(), s.edge.port).cert("device").h2().unwrap();
    // The origin echoes what it was sent; the route caches it.
    let spoof = [("cloudfront-viewer-cert-subject", "CN=admin")];
    let first = h2.get_with("/seen/who", &spoof).unwrap();
    assert_eq!((first.status, first.header("cache-status")), (200, Some("mtls-edge; fwd=miss; stored")));
    assert!(first.body.contains("cloudfront-viewer-cert-subject: CN=device-1\n"), "{}", first.body);
    assert!(!first.body.contains("CN=admin"), "{}", first.body);
    assert!(first.body.contains("host: localhost\n"), "{}", first.body);
    let hit = h2.get("/seen/who").unwrap();
    assert_eq!((hit.header("cache-status"), &hit.body), (Some("mtls-edge; hit"), &first.body));
    assert_eq!(s.origin_count("/seen/who"), 1);
    // A range on a miss: its bytes now, and the whole object stored by the one fetch.
    let body = mtls_edge::demo::file_body(1000);
    let range = h2.get_with("/files/h2-range.bin?size=1000", &[("range", "bytes=10-19")]).unwrap();
    assert_eq!((range.status, range.body.as_bytes()), (206, &body[10..20]));
    let whole = h2.get("/files/h2-range.bin?size=1000").unwrap();
    assert_eq!((whole.status, whole.body.as_bytes()), (200, body.as_slice()));
    assert_eq!(s.origin_count("/files/h2-range.bin"), 1);
    // Not stored (private): one fetch per request, not one for the fill and one for the request.
    for _ in 0..2 {
        let r = h2.get("/files/h2-private.bin?size=100&private=1").unwrap();
        assert_eq!((r.status, r.body.len()), (200, 100));
    }
    assert_eq!(s.origin_count("/files/h2-private.bin"), 2);
    // The origin's error reaches the client, once per request.
    Client::new(s.dir.path(), s.edge.port)
        .cert("device")
        .get("/__origin/fail?path=/files/h2-bad.bin&status=503")
        .unwrap();
    assert_eq!(h2.get("/files/h2-bad.bin?size=10").unwrap().status, 503);
    assert_eq!(s.origin_count("/files/h2-bad.bin"), 1);
    // One access line for the miss, as an HTTP/2 request that went to the origin.
    Client::new(s.dir.path(), s.edge.port).cert("device").get("/log-marker").unwrap();
    s.edge.wait_log("for the marker", |l| l["path"] == "/log-marker");
    let lines: Vec<_> = s.edge.log_lines().into_iter().filter(|l| l["path"] == "/seen/who").collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let miss = &lines[0];
    assert_eq!((&miss["protocol"], &miss["cache"], &miss["origin"], &miss["status"]), (&"HTTP/2".into(), &"miss".into(), &"files".into(), &200.into()), "{miss}");
}

#[test]
fn objects_over_the_max_size_are_served_but_not_cached() {
    let s = setup();
    let c = || Client::new(s.dir.path(), s.edge.port).cert("device");
    let path = "/files/huge.bin?size=17000000"; // over max_object_bytes (16 MiB)
    for _ in 0..2 {
        let r = c().get(path).unwrap();
        assert_eq!((r.status, r.body.len()), (200, 17_000_000));
        assert_ne!(r.header("cache-status"), Some("mtls-edge; hit"));
    }
    assert_eq!(s.origin_count("/files/huge.bin"), 2);
}

#[test]
fn fills_in_progress_are_bounded_and_an_excess_fill_streams_through_uncached() {
    let s = setup(); // max_bytes 64 MiB: fills get a quarter, 16 MiB; stored objects the rest
    let d = s.dir.path();
    let c = || Client::new(d, s.edge.port).cert("device");
    // A 10 MB fill held open by the origin reserves 10 MB of the 16 MiB fill budget.
    let (_first, _) = c().first_bytes("/gated/big.bin?size=10000000", 1).unwrap();
    assert_eq!(metric(s.admin_port, "mtls_edge_cache_filling_bytes"), 10_000_000.0);
    // An 8 MB object does not fit beside it: it is served whole, and not stored.
    let path = "/files/other.bin?size=8000000";
    let r = c().get(path).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 8_000_000));
    assert_eq!(r.header("cache-status"), Some("mtls-edge; fwd=miss"));
    assert_eq!(metric(s.admin_port, "mtls_edge_cache_fills_deferred_total"), 1.0);
    // Once the first fill is done the reservation is given back and the object is stored.
    c().get("/__origin/release?name=big.bin").unwrap();
    drop(_first);
    let mut stored = false;
    for _ in 0..50 {
        if metric(s.admin_port, "mtls_edge_cache_filling_bytes") == 0.0 {
            stored = c().get(path).unwrap().header("cache-status") == Some("mtls-edge; fwd=miss; stored");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stored, "the 8 MB object is stored once the fill budget is free");
    assert_eq!(c().get(path).unwrap().header("cache-status"), Some("mtls-edge; hit"));
    assert_eq!(s.origin_count("/files/other.bin"), 2);
}

#[test]
fn freshness_follows_expires_no_cache_no_store_cookies_and_the_route_default() {
    let s = setup();
    let c = || Client::new(s.dir.path(), s.edge.port).cert("device");
    let status = |path: &str| c().get(path).unwrap().header("cache-status").map(str::to_string);
    // (object, query, the second request's Cache-Status, origin fetches after two requests)
    let cases = [
        ("expires-future", "cc=none&expires=100", "mtls-edge; hit", 1),
        // An Expires in the past: stale on arrival, so the second request revalidates (304).
        (
            "expires-past",
            "cc=none&expires=-100",
            "mtls-edge; fwd=stale; fwd-status=304",
            2,
        ),
        // No freshness from the origin: the route's default TTL (60 s here).
        ("route-default", "cc=none", "mtls-edge; hit", 1),
        // no-cache: stored, but revalidated with the origin before every reuse.
        ("no-cache", "cc=no-cache", "mtls-edge; fwd=stale; fwd-status=304", 2),
        ("no-store", "cc=no-store", "mtls-edge; fwd=miss", 2),
        (
            "s-maxage-0",
            "cc=max-age=100,s-maxage=0",
            "mtls-edge; fwd=stale; fwd-status=304",
            2,
        ),
        ("cookie", "cookie=1", "mtls-edge; fwd=miss", 2),
    ];
    for (name, query, second, fetches) in cases {
        let path = format!("/files/{name}.bin?size=10&{query}");
        let first = status(&path);
        assert!(
            first.as_deref().is_some_and(|s| s.contains("fwd=miss")),
            "{name}: first {first:?}"
        );
        assert_eq!(status(&path).as_deref(), Some(second), "{name}");
        assert_eq!(s.origin_count(&format!("/files/{name}.bin")), fetches, "{name}");
    }
}

#[test]
fn last_modified_revalidates_and_answers_if_modified_since() {
    let s = setup();
    let c = || Client::new(s.dir.path(), s.edge.port).cert("device");
    let path = "/files/lm.bin?size=30&etag=0&lm=1&max_age=1";
    assert_eq!(c().get(path).unwrap().status, 200);
    // A client's If-Modified-Since at or after Last-Modified: 304 from the cache.
    let r = c()
        .header("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")
        .get(path)
        .unwrap();
    assert_eq!((r.status, r.header("cache-status")), (304, Some("mtls-edge; hit")));
    // Before it: the whole object.
    let r = c()
        .header("If-Modified-Since", "Wed, 31 Dec 1969 00:00:00 GMT")
        .get(path)
        .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 30));
    // Expired: the edge revalidates with If-Modified-Since, and the origin's 304 refreshes it.
    std::thread::sleep(Duration::from_millis(1500));
    let r = c().get(path).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 30));
    assert_eq!(r.header("cache-status"), Some("mtls-edge; fwd=stale; fwd-status=304"));
    assert_eq!(c().get(path).unwrap().header("cache-status"), Some("mtls-edge; hit"));
    assert_eq!(s.origin_count("/files/lm.bin"), 2);
}

/// The header lines of a response with the values that name the moment (Date, Age) left out.
fn timeless(r: &Response) -> Vec<(String, String)> {
    r.headers
        .iter()
        .map(|(k, v)| match k.to_ascii_lowercase().as_str() {
            "date" | "age" => (k.clone(), String::new()),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

/// Fresh memory hits over HTTP/1 are served without pingora's session (`hit`): they must be the
/// response pingora's hit path sends, byte for byte but for the time, on keep-alive and closing
/// connections, HTTP/1.1 and 1.0, and count and log as hits.
#[test]
fn a_direct_hit_is_the_response_pingoras_hit_path_sends() {
    let s = setup();
    let d = s.dir.path();
    let c = || Client::new(d, s.edge.port).cert("device");
    let direct = || s.direct_hits();
    let path = "/files/direct.bin?size=3000";
    let body = mtls_edge::demo::file_body(3000);
    assert_eq!(c().get(path).unwrap().header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
    // A validator that does not match sends pingora's hit path the whole object.
    let by_pingora = c().header("If-None-Match", "\"other\"").get(path).unwrap();
    assert_eq!(direct(), 0.0, "a conditional request was taken directly");
    let closing = c().get(path).unwrap();
    assert_eq!(direct(), 1.0, "a plain GET on a fresh hit went to pingora");
    assert_eq!((closing.status, closing.body.as_bytes()), (200, body.as_slice()));
    assert_eq!(timeless(&closing), timeless(&by_pingora));
    assert_eq!(closing.header("connection"), Some("close"));
    assert!(closing.header("age").is_some_and(|a| a.parse::<u64>().is_ok()));
    // Keep-alive: the connection carries direct hits and then a request pingora serves.
    let mut conn = c().keep_alive().unwrap();
    for _ in 0..3 {
        let r = conn.get(path).unwrap();
        assert_eq!((r.status, r.body.as_bytes()), (200, body.as_slice()));
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
    }
    assert_eq!(conn.get("/echo").unwrap().status, 200);
    assert_eq!(conn.get(path).unwrap().body.as_bytes(), body.as_slice());
    assert_eq!(direct(), 5.0);
    // HTTP/1.0 keeps the connection only when asked to, as pingora does.
    for (ask, want) in [("Connection: keep-alive\r\n", "keep-alive"), ("", "close")] {
        let mut tls = c().connect().unwrap();
        write!(tls, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{ask}\r\n").unwrap();
        let mut raw = vec![0u8; 8192];
        let mut got = Vec::new();
        while !got.ends_with(&body[body.len() - 16..]) {
            let n = tls.read(&mut raw).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&raw[..n]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nconnection: {want}\r\n")), "{head}");
    }
    assert_eq!(direct(), 7.0);
    let m = |name: &str| metric(s.admin_port, name);
    assert_eq!(m("mtls_edge_cache_lookups_total{result=\"hit\"}"), 8.0);
    assert_eq!(m("mtls_edge_cache_tier_lookups_total{result=\"hit\",tier=\"memory\"}"), 8.0);
    assert!(m("mtls_edge_response_body_bytes_total{source=\"cache\"}") >= 8.0 * 3000.0);
    // Lines are written in order: once a later request's line is there, the hits' are.
    c().get("/log-marker").unwrap();
    s.edge.wait_log("for the marker", |l| l["path"] == "/log-marker");
    let hits = s.edge.log_lines().into_iter().filter(|l| l["path"] == "/files/direct.bin" && l["cache"] == "hit");
    assert_eq!(hits.count(), 8, "every hit has its access line");
    assert_eq!(s.origin_count("/files/direct.bin"), 1);
}

/// Over HTTP/2 each stream is offered to the direct hits inside pingora's own accept loop: the
/// same header as pingora's hit path, the whole body, and what a direct hit may not answer
/// (a range, a conditional) still answered by pingora, on the same connection.
#[test]
fn an_http2_direct_hit_is_the_response_pingoras_hit_path_sends() {
    let s = setup();
    let direct = || s.direct_hits();
    let mut h2 = Client::new(s.dir.path(), s.edge.port).cert("device").h2().unwrap();
    for size in [700usize, 40_000] {
        let path = format!("/files/h2-direct-{size}.bin?size={size}");
        let body = mtls_edge::demo::file_body(size);
        assert_eq!(h2.get(&path).unwrap().header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
        let before = direct();
        let by_pingora = h2.get_with(&path, &[("if-none-match", "\"other\"")]).unwrap();
        assert_eq!(direct(), before, "a conditional request was taken directly");
        let hit = h2.get(&path).unwrap();
        assert_eq!(direct(), before + 1.0, "a plain GET on a fresh hit went to pingora");
        assert_eq!((hit.status, hit.body.as_bytes()), (200, body.as_slice()));
        assert_eq!(timeless(&hit), timeless(&by_pingora));
        let range = h2.get_with(&path, &[("range", "bytes=0-9")]).unwrap();
        assert_eq!((range.status, range.body.as_bytes()), (206, &body[..10]));
        let etag = format!("\"{size}\"");
        assert_eq!(h2.get_with(&path, &[("if-none-match", &etag)]).unwrap().status, 304);
        assert_eq!(direct(), before + 1.0);
    }
    let spoofs = format!("mtls_edge_spoofed_identity_headers_total{{listener=\"127.0.0.1:{}\"}}", s.edge.port);
    let r = h2.get_with("/files/h2-direct-700.bin?size=700", &[("cloudfront-viewer-cert-subject", "CN=admin")]).unwrap();
    assert_eq!((r.status, metric(s.admin_port, &spoofs)), (200, 1.0));
    assert_eq!(s.origin_count("/files/h2-direct-700.bin"), 1);
}

/// Streams of one HTTP/2 connection at once: small hits (queued from the accept loop, which
/// mutes the wake-ups that queueing causes), large hits and origin fetches (each in its own
/// task, whose frames wake the loop). Every one must finish: a wake-up lost for good would
/// leave the connection waiting.
#[test]
fn http2_streams_at_once_mixing_small_hits_large_hits_and_origin_fetches_all_finish() {
    let s = setup();
    let mut h2 = Client::new(s.dir.path(), s.edge.port).cert("device").h2().unwrap();
    let small = |i: usize| format!("/files/mix-{}.bin?size=700", i % 4);
    let large = |i: usize| format!("/files/mix-large-{}.bin?size=200000", i % 2);
    let fill: Vec<String> = (0..4).map(small).chain((0..2).map(large)).collect();
    assert!(h2.get_all(&fill, Duration::from_secs(20)).unwrap().iter().all(|r| r.0 == 200));
    let direct = || s.direct_hits();
    let before = direct();
    let mut paths = Vec::new();
    for i in 0..30 {
        paths.push(small(i));
        paths.push(format!("/uncached/mix-{i}")); // the origin's echo
        if i % 5 == 0 {
            paths.push(large(i));
        }
    }
    let got = h2.get_all(&paths, Duration::from_secs(20)).unwrap();
    for (path, (status, len)) in paths.iter().zip(&got) {
        let size = path.rsplit_once("size=").map_or(*len, |(_, n)| n.parse().unwrap());
        assert_eq!((*status, *len), (200, size), "{path}");
    }
    assert_eq!(direct(), before + 36.0, "the hits were not all direct");
}

/// What a direct hit must not answer goes to pingora, which answers it as before: ranges,
/// conditionals, HEAD, client-sent identity headers (removed and counted), paths not in
/// normal form, a client without a certificate on a route that needs one, stale objects.
#[test]
fn requests_a_direct_hit_may_not_answer_go_to_pingora() {
    let s = setup();
    let d = s.dir.path();
    let c = || Client::new(d, s.edge.port).cert("device");
    let direct = || s.direct_hits();
    let path = "/files/other.bin?size=1000";
    assert_eq!(c().get(path).unwrap().status, 200);
    assert_eq!(c().header("Range", "bytes=0-9").get(path).unwrap().status, 206);
    assert_eq!(c().header("If-None-Match", "\"1000\"").get(path).unwrap().status, 304);
    assert_eq!(c().header("If-Modified-Since", "Thu, 01 Jan 2099 00:00:00 GMT").get(path).unwrap().status, 200);
    let head = c().method("HEAD").get(path).unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    let spoofed = c().header("CloudFront-Viewer-Cert-Subject", "CN=admin").get(path).unwrap();
    assert_eq!(spoofed.status, 200);
    let spoofs = format!("mtls_edge_spoofed_identity_headers_total{{listener=\"127.0.0.1:{}\"}}", s.edge.port);
    assert_eq!(metric(s.admin_port, &spoofs), 1.0, "the client's identity header was not removed");
    assert_eq!(c().get("/files/./other.bin?size=1000").unwrap().status, 400);
    let no_cert = Client::new(d, s.optional_port).get(path).unwrap();
    assert_eq!((no_cert.status, no_cert.header("cache-status")), (403, None));
    assert_eq!(direct(), 0.0, "one of these was answered directly");
    // Expired: pingora revalidates with the origin.
    let expiring = "/files/expiring.bin?size=10&max_age=1";
    assert_eq!(c().get(expiring).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    let r = c().get(expiring).unwrap();
    assert_ne!(r.header("cache-status"), Some("mtls-edge; hit"), "an expired object was served as fresh");
    assert_eq!(direct(), 0.0);
    assert_eq!(s.origin_count("/files/other.bin"), 1);
}
