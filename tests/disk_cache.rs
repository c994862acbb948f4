//! The disk tier over real sockets: warm restarts, corruption, a crash mid-fill, objects larger
//! than memory with ranges, the disk budget, a disk that cannot be written, purges.

mod common;

use common::*;
use mtls_edge::demo::file_body;
use mtls_edge::pki::LeafSpec;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

struct Edge {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
    port: u16,
    admin_port: u16,
    yaml: String,
}

/// An origin and an edge whose memory tier takes objects up to 1 MiB (4 MiB in all), with a
/// disk tier `disk` (YAML flow mapping fields after `path`).
fn edge(disk: &str) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let ca = device_ca(d);
    save(d, "device", &ca.issue(&LeafSpec::client("device-1")).unwrap());
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        r#"{server}listeners:
{listener}trust_stores:
  devices: {{ ca_files: [device-ca.pem] }}
origins:
{origin}routes:
  - {{ path_prefix: /__origin/, origin: files }}
  - {{ path_prefix: /, origin: files, cache: {{ default_ttl_secs: 300 }} }}
cache:
  max_bytes: 4194304
  max_object_bytes: 1048576
  disk: {{ path: {disk_dir}, {disk} }}
admin: {{ address: 127.0.0.1:{admin_port} }}
"#,
        server = server_yaml(d, 2),
        listener = listener_yaml(port, "required", "devices"),
        origin = origin_yaml("files", origin.port),
        disk_dir = d.join("disk").display(),
    );
    let edge = spawn_edge(d, &yaml, port);
    Edge {
        dir,
        _origin: origin,
        edge,
        port,
        admin_port,
        yaml,
    }
}

impl Edge {
    fn client(&self) -> Client<'_> {
        Client::new(self.dir.path(), self.port).cert("device")
    }

    fn get(&self, path: &str) -> Response {
        self.client().get(path).unwrap()
    }

    /// How many requests for `path` reached the origin (`/__origin/` is not cached).
    fn origin_count(&self, path: &str) -> u64 {
        let r = self.get(&format!("/__origin/count?path={path}"));
        r.body.trim().parse().unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        metric(self.admin_port, name)
    }

    /// Kills the edge (SIGKILL: no shutdown of any kind) and starts it again on the same
    /// configuration and directory.
    fn crash_and_restart(&mut self) {
        drop(std::mem::replace(&mut self.edge, Proc::sleeper()));
        self.edge = spawn_edge(self.dir.path(), &self.yaml, self.port);
    }

    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk")
    }

    /// Waits until the disk tier's index is rebuilt.
    fn wait_loaded(&self) {
        self.edge.wait_event("cache disk:");
    }
}


fn assert_body(r: &Response, size: usize) {
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert_eq!(r.body.len(), size);
    assert!(r.body.as_bytes() == file_body(size).as_slice(), "the body differs");
}

#[test]
fn a_restart_with_a_warm_disk_does_not_go_back_to_the_origin() {
    let mut e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let (small, large) = ("/files/manifest.json?size=900", "/files/image.bin?size=3000000");
    assert_body(&e.get(small), 900);
    assert_body(&e.get(large), 3_000_000);
    e.crash_and_restart();
    for _ in 0..2 {
        let r = e.get(large);
        assert_body(&r, 3_000_000);
        assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
        let r = e.get(small);
        assert_body(&r, 900);
        assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
    }
    assert_eq!(e.origin_count("/files/image.bin"), 1);
    assert_eq!(e.origin_count("/files/manifest.json"), 1);
    // The small object came from disk once, then from memory (it was promoted).
    assert_eq!(
        e.metric("mtls_edge_cache_tier_lookups_total{result=\"hit\",tier=\"memory\"}"),
        1.0
    );
    assert_eq!(
        e.metric("mtls_edge_cache_tier_lookups_total{result=\"hit\",tier=\"disk\"}"),
        3.0
    );
    e.wait_loaded();
    assert_eq!(e.metric("mtls_edge_cache_objects{tier=\"disk\"}"), 2.0);
    assert!(e.metric("mtls_edge_cache_bytes{tier=\"disk\"}") > 3_000_900.0);
}

#[test]
fn a_corrupted_object_is_not_served_and_is_fetched_again() {
    let mut e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let path = "/files/flip.bin?size=2000000";
    assert_body(&e.get(path), 2_000_000);
    e.crash_and_restart(); // memory is empty: the disk copy is what would be served
    let bodies = files_with(&e.disk().join("objects"), "body");
    assert_eq!(bodies.len(), 1);
    let mut raw = std::fs::read(&bodies[0]).unwrap();
    for i in [100, 101, 102] {
        raw[i] ^= 0xff; // in the first block: found before anything is sent
    }
    std::fs::write(&bodies[0], raw).unwrap();
    let r = e.get(path);
    assert_body(&r, 2_000_000);
    assert_eq!(r.header("cache-status"), Some("mtls-edge; fwd=miss; stored"));
    assert_eq!(e.origin_count("/files/flip.bin"), 2);
    assert_eq!(e.metric("mtls_edge_cache_disk_corrupt_total{reason=\"checksum\"}"), 1.0);
    // The fresh copy is sound.
    e.crash_and_restart();
    let r = e.get(path);
    assert_body(&r, 2_000_000);
    assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
}

#[test]
fn a_crash_in_the_middle_of_a_fill_leaves_nothing_servable() {
    let mut e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let path = "/gated/half.bin?size=3000000";
    // The origin sends half the body, then waits: the edge dies mid-fill.
    let d = e.dir.path().to_path_buf();
    let port = e.port;
    let stuck = std::thread::spawn(move || Client::new(&d, port).cert("device").get(path));
    let tmp = e.disk().join("tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while files_with(&tmp, "body").is_empty()
        || std::fs::metadata(&files_with(&tmp, "body")[0]).unwrap().len() < 1_000_000
    {
        assert!(Instant::now() < deadline, "no fill in progress in {}", tmp.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    e.crash_and_restart();
    let _ = stuck.join();
    e.wait_loaded();
    assert!(
        files_with(&tmp, "body").is_empty(),
        "the dead fill's file was not removed"
    );
    assert!(files_with(&e.disk().join("objects"), "meta").is_empty());
    // Nothing was served from the dead fill: the next request goes to the origin.
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            e.get("/__origin/release?name=half.bin");
        });
        e.get(path)
    });
    assert_body(&r, 3_000_000);
    assert_eq!(e.origin_count("/gated/half.bin"), 2);
}

#[test]
fn an_object_larger_than_the_memory_tier_is_served_with_ranges() {
    let e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let size = 6 * MIB + 12345; // more than the whole memory tier (4 MiB)
    let path = format!("/files/big.bin?size={size}");
    assert_body(&e.get(&path), size);
    let want = file_body(size);
    for (range, start, end) in [
        ("bytes=1000000-1999999", 1_000_000, 2_000_000),
        ("bytes=-100", size - 100, size),
        ("bytes=5000000-", 5_000_000, size),       // a resumed download
        ("bytes=131070-131075", 131_070, 131_076), // across a block boundary
    ] {
        let r = e.client().header("Range", range).get(&path).unwrap();
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{}/{size}", end - 1).as_str())
        );
        assert!(r.body.as_bytes() == &want[start..end], "{range}: wrong bytes");
        assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
    }
    assert_eq!(e.origin_count("/files/big.bin"), 1);
    assert_eq!(e.metric("mtls_edge_cache_objects{tier=\"memory\"}"), 0.0);
}

#[test]
fn a_cold_storm_for_a_disk_object_makes_one_origin_fetch() {
    let e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let size = 3 * MIB;
    let path = format!("/files/storm.bin?size={size}&delay_ms=300");
    let (d, port) = (e.dir.path(), e.port);
    let results: Vec<Result<Response, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|_| s.spawn(|| Client::new(d, port).cert("device").get(&path)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_body(r.as_ref().unwrap(), size);
    }
    assert_eq!(e.origin_count("/files/storm.bin"), 1);
}

#[test]
fn the_disk_budget_is_kept_by_evicting_the_least_recently_used() {
    let e = edge("max_bytes: 5242880, max_object_bytes: 4194304, min_free_bytes: 0");
    let size = 2 * MIB; // too large for memory: disk only
    for name in ["a", "b", "c", "d"] {
        assert_body(&e.get(&format!("/files/{name}.bin?size={size}")), size);
    }
    assert!(e.metric("mtls_edge_cache_bytes{tier=\"disk\"}") <= 5_242_880.0);
    assert_eq!(e.metric("mtls_edge_cache_evictions_total{tier=\"disk\"}"), 2.0);
    assert_eq!(files_with(&e.disk().join("objects"), "body").len(), 2);
    // The oldest went; the newest is a hit.
    assert_eq!(
        e.get(&format!("/files/d.bin?size={size}")).header("cache-status"),
        Some("mtls-edge; hit")
    );
    e.get(&format!("/files/a.bin?size={size}"));
    assert_eq!(e.origin_count("/files/a.bin"), 2);
}

#[test]
fn a_disk_that_cannot_be_written_degrades_to_the_origin() {
    let e = edge("max_bytes: 67108864, min_free_bytes: 0");
    // `tmp` becomes a file where the edge wants a directory: every fill fails to create its
    // file (this works as root too, which a read-only mode does not).
    let tmp = e.disk().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"in the way").unwrap();
    let size = 2 * MIB;
    let path = format!("/files/ro.bin?size={size}");
    for _ in 0..3 {
        assert_body(&e.get(&path), size);
    }
    assert_eq!(e.origin_count("/files/ro.bin"), 3, "nothing could be cached");
    assert_eq!(e.metric("mtls_edge_cache_disk_errors_total{op=\"create\"}"), 1.0);
    assert_eq!(e.metric("mtls_edge_cache_disk_skipped_total{reason=\"degraded\"}"), 2.0);
    // A small object still goes to memory.
    e.get("/files/small.txt?size=100");
    assert_eq!(
        e.get("/files/small.txt?size=100").header("cache-status"),
        Some("mtls-edge; hit")
    );
}

#[test]
fn a_full_filesystem_is_left_its_minimum_free_space() {
    // More free space asked for than any test machine has.
    let e = edge("max_bytes: 67108864, min_free_bytes: 1152921504606846976");
    let size = 2 * MIB;
    let path = format!("/files/full.bin?size={size}");
    assert_body(&e.get(&path), size);
    assert_body(&e.get(&path), size);
    assert_eq!(e.origin_count("/files/full.bin"), 2);
    assert_eq!(e.metric("mtls_edge_cache_disk_skipped_total{reason=\"no_space\"}"), 2.0);
    assert!(files_with(&e.disk(), "body").is_empty());
}

#[test]
fn a_purge_removes_an_object_from_both_tiers() {
    let mut e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let (small, large) = ("/files/p/small.json?size=500", "/files/p/large.bin?size=2000000");
    e.get(small);
    e.get(large);
    e.wait_loaded();
    let (status, body) = admin(e.admin_port, "POST", "/cache/purge?prefix=localhost/files/p/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "{\"purged\":3}", "small in both tiers, large on disk");
    assert!(files_with(&e.disk().join("objects"), "meta").is_empty());
    e.crash_and_restart();
    e.get(small);
    e.get(large);
    assert_eq!(e.origin_count("/files/p/small.json"), 2);
    assert_eq!(e.origin_count("/files/p/large.bin"), 2);
}

#[test]
fn a_304_refreshes_an_object_on_disk_and_the_refresh_survives_a_restart() {
    let mut e = edge("max_bytes: 67108864, min_free_bytes: 0");
    let size = 2 * MIB; // disk only
    let path = format!("/files/reval.bin?size={size}&max_age=4");
    assert_body(&e.get(&path), size);
    std::thread::sleep(Duration::from_millis(4500));
    let r = e.get(&path);
    assert_body(&r, size);
    assert_eq!(r.header("cache-status"), Some("mtls-edge; fwd=stale; fwd-status=304"));
    assert_eq!(e.origin_count("/files/reval.bin"), 2, "the revalidation went to the origin");
    // The new freshness is in the meta on disk: after a restart, a plain hit.
    e.crash_and_restart();
    let r = e.get(&path);
    assert_body(&r, size);
    assert_eq!(r.header("cache-status"), Some("mtls-edge; hit"));
    assert_eq!(e.origin_count("/files/reval.bin"), 2);
}
