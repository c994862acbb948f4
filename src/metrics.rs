//! Every Prometheus metric the edge exports, registered in the one default registry that
//! `pingora-prometheus` re-exports, and rendered for the admin listener's `/metrics`.

use std::sync::LazyLock;

use pingora_prometheus::prometheus::{
    self, register_int_counter, register_int_counter_vec, register_int_gauge, Encoder, IntCounter, IntCounterVec,
    IntGauge, TextEncoder,
};

/// TLS handshakes that reached the certificate stage, by listener, outcome and reason.
/// `outcome` is `accepted` or `refused`; `reason` is `Ok` or a refusal reason
/// (`ClientCertMissing`, `ClientCertExpired`, `ClientCertUntrusted`, ..., `HandshakeFailed`).
pub static HANDSHAKES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_handshakes_total",
        "Viewer TLS handshakes by listener, outcome and refusal reason",
        &["listener", "outcome", "reason"]
    )
    .expect("metric registration happens once, with a static valid definition")
});

/// Responses sent to viewers, by status code.
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_requests_total",
        "Viewer requests by response status",
        &["status"]
    )
    .expect("metric registration happens once, with a static valid definition")
});

/// Failures to reach an origin, by origin and reason.
pub static ORIGIN_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_origin_failures_total",
        "Origin connection failures by origin and reason",
        &["origin", "reason"]
    )
    .expect("metric registration happens once, with a static valid definition")
});

/// Client-sent identity headers that were removed.
pub static SPOOFED_HEADERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_spoofed_identity_headers_total",
        "Identity headers sent by clients and removed by the edge",
        &["listener"]
    )
    .expect("metric registration happens once, with a static valid definition")
});

const REGISTERED: &str = "metric registration happens once, with a static valid definition";

/// Cache lookups on cached routes by result: hit, miss, stale, revalidated, uncacheable.
pub static CACHE_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("mtls_edge_cache_lookups_total", "Cache lookups by result", &["result"])
        .expect(REGISTERED)
});

/// Requests that waited on another request's fill instead of going to the origin.
pub static CACHE_COALESCED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_cache_coalesced_waiters_total",
        "Requests that waited for another request's cache fill"
    )
    .expect(REGISTERED)
});

/// Response body bytes sent to viewers, by source: cache or origin.
pub static BODY_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_response_body_bytes_total",
        "Response body bytes sent to viewers by source",
        &["source"]
    )
    .expect(REGISTERED)
});

/// Objects evicted to stay within the budget.
pub static CACHE_EVICTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_cache_evictions_total",
        "Cache objects evicted for the byte budget"
    )
    .expect(REGISTERED)
});

/// Bytes held by complete cached objects.
pub static CACHE_BYTES: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("mtls_edge_cache_bytes", "Bytes held by cached objects").expect(REGISTERED));

/// Bytes reserved by fills in progress.
pub static CACHE_FILLING_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "mtls_edge_cache_filling_bytes",
        "Bytes reserved by cache fills in progress"
    )
    .expect(REGISTERED)
});

/// Cacheable responses streamed through uncached because the fill budget was in use.
pub static CACHE_FILLS_DEFERRED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_cache_fills_deferred_total",
        "Cacheable responses not stored because fills in progress held the fill budget"
    )
    .expect(REGISTERED)
});

/// Rule evaluations that did something, by phase, rule and outcome (`matched`, `would_match`
/// for shadow rules, `error`). The matches of requests that share a connection's outcome are
/// added every 64 requests and when the connection closes (see `rules::ConnectionMemo`).
pub static RULE_EVALUATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_rule_evaluations_total",
        "Rules whose condition held (or failed to evaluate), by phase, rule and outcome; the matches of a connection's shared outcomes are added every 64 requests and at close",
        &["phase", "rule", "outcome"]
    )
    .expect(REGISTERED)
});

/// The configured budget.
pub static CACHE_BUDGET: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("mtls_edge_cache_budget_bytes", "Configured cache memory budget").expect(REGISTERED)
});

/// `vec`'s counters for label values known in advance. A label lookup hashes and takes a lock,
/// which the per-request path should not pay each time.
struct Resolved<T: 'static>(Vec<(T, IntCounter)>);

impl<T: PartialEq + Copy + ToString> Resolved<T> {
    fn new(vec: &IntCounterVec, values: &[T]) -> Self {
        Resolved(
            values
                .iter()
                .map(|v| (*v, vec.with_label_values(&[&v.to_string()])))
                .collect(),
        )
    }

    /// Adds `n` to the counter for `value`; a value not resolved in advance is looked up.
    fn add(&self, vec: &IntCounterVec, value: T, n: u64) {
        match self.0.iter().find(|(v, _)| *v == value) {
            Some((_, c)) => c.inc_by(n),
            None => vec.with_label_values(&[&value.to_string()]).inc_by(n),
        }
    }
}

/// Counts a response to a viewer.
pub fn count_request(status: u16) {
    static COMMON: LazyLock<Resolved<u16>> =
        LazyLock::new(|| Resolved::new(&REQUESTS, &[200, 206, 304, 403, 404, 416, 502]));
    COMMON.add(&REQUESTS, status, 1);
}

/// Counts body bytes sent to a viewer from `source` (`cache` or `origin`).
pub fn count_body_bytes(source: &'static str, n: u64) {
    static SOURCES: LazyLock<Resolved<&'static str>> =
        LazyLock::new(|| Resolved::new(&BODY_BYTES, &["cache", "origin"]));
    SOURCES.add(&BODY_BYTES, source, n);
}

/// Counts a cache lookup by its result.
pub fn count_cache_lookup(result: &'static str) {
    static RESULTS: LazyLock<Resolved<&'static str>> = LazyLock::new(|| {
        Resolved::new(
            &CACHE_LOOKUPS,
            &["hit", "stale", "revalidated", "miss", "uncacheable", "bypass"],
        )
    });
    RESULTS.add(&CACHE_LOOKUPS, result, 1);
}

/// Forces registration so that every metric shows on `/metrics` from the start.
pub fn init() {
    LazyLock::force(&HANDSHAKES);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&ORIGIN_FAILURES);
    LazyLock::force(&SPOOFED_HEADERS);
    LazyLock::force(&CACHE_LOOKUPS);
    LazyLock::force(&CACHE_COALESCED);
    LazyLock::force(&BODY_BYTES);
    LazyLock::force(&CACHE_EVICTIONS);
    LazyLock::force(&CACHE_BYTES);
    LazyLock::force(&CACHE_FILLING_BYTES);
    LazyLock::force(&CACHE_FILLS_DEFERRED);
    LazyLock::force(&CACHE_BUDGET);
    LazyLock::force(&RULE_EVALUATIONS);
}

/// The registry in Prometheus text format.
pub fn render() -> Vec<u8> {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail on I/O; an encoding error leaves a partial page.
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut buf);
    buf
}
