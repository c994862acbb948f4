//! Every Prometheus metric the edge exports, registered in the one default registry that
//! `pingora-prometheus` re-exports, and rendered for the admin listener's `/metrics`.

use std::sync::LazyLock;

use crate::reason::CacheResult;
use pingora_prometheus::prometheus::{
    self, register_gauge, register_gauge_vec, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, Encoder, Gauge, GaugeVec, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, TextEncoder,
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

/// Limits clients ran into, by kind.
pub static LIMITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_limits_total",
        "Connections closed or refused and requests answered 431 or 429 for a limit",
        &["limit"]
    )
    .expect("metric registration happens once, with a static valid definition")
});

/// Viewer sockets open, from accept (before TLS) to close.
pub static OPEN_SOCKETS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "mtls_edge_open_sockets",
        "Viewer TCP connections open, their TLS handshakes included"
    )
    .expect("metric registration happens once, with a static valid definition")
});

/// Admin requests refused for their bearer token.
pub static ADMIN_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_admin_refused_total",
        "Admin listener requests refused (a missing or wrong bearer token)",
        &["reason"]
    )
    .expect("metric registration happens once, with a static valid definition")
});

/// Other client headers with an underscore in their names, by what became of them.
pub static UNDERSCORE_HEADERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_underscore_headers_total",
        "Client request headers with an underscore in their names, dropped or refused",
        &["listener", "action"]
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
pub static RATE_KEY_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_rate_key_errors_total",
        "Requests whose limits.rate_limit.key failed to evaluate (their device's own bucket was used)"
    )
    .expect(REGISTERED)
});

pub static CACHE_COALESCED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_cache_coalesced_waiters_total",
        "Requests that waited for another request's cache fill"
    )
    .expect(REGISTERED)
});

pub static DIRECT_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_cache_direct_hits_total",
        "Fresh memory hits served without pingora's request session (module hit)"
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

/// Objects evicted to stay within a tier's budget (for the disk tier, also its free space).
pub static CACHE_EVICTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_cache_evictions_total",
        "Cache objects evicted for a tier's byte budget",
        &["tier"]
    )
    .expect(REGISTERED)
});

/// Bytes held by complete cached objects, per tier.
pub static CACHE_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("mtls_edge_cache_bytes", "Bytes held by cached objects per tier", &["tier"]).expect(REGISTERED)
});

/// Complete cached objects, per tier.
pub static CACHE_OBJECTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("mtls_edge_cache_objects", "Cached objects per tier", &["tier"]).expect(REGISTERED)
});

/// Lookups each tier answered (`hit`) or passed on (`miss`). The disk tier is asked only on a
/// memory miss.
pub static CACHE_TIER_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_cache_tier_lookups_total",
        "Cache lookups per tier by result (hit or miss)",
        &["tier", "result"]
    )
    .expect(REGISTERED)
});

/// Filesystem failures of the disk tier, by what it was doing.
pub static CACHE_DISK_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_cache_disk_errors_total",
        "Disk tier I/O errors by operation",
        &["op"]
    )
    .expect(REGISTERED)
});

/// Object files found torn or corrupt, by reason; each was removed and counted as a miss.
pub static CACHE_DISK_CORRUPT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_cache_disk_corrupt_total",
        "Disk tier objects not served because they were torn or corrupt, by reason",
        &["reason"]
    )
    .expect(REGISTERED)
});

/// Cacheable responses not written to disk, by reason.
pub static CACHE_DISK_SKIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_cache_disk_skipped_total",
        "Cacheable responses not written to the disk tier, by reason",
        &["reason"]
    )
    .expect(REGISTERED)
});

/// 1 while the disk tier's index is being rebuilt from the directory at start.
pub static CACHE_DISK_LOADING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "mtls_edge_cache_disk_loading",
        "1 while the disk tier's index is rebuilt at start (objects are served meanwhile)"
    )
    .expect(REGISTERED)
});

/// The disk tier's configured budget.
pub static CACHE_DISK_BUDGET: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("mtls_edge_cache_disk_budget_bytes", "Configured disk tier budget").expect(REGISTERED)
});

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
/// for shadow rules, `error`).
pub static RULE_EVALUATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_rule_evaluations_total",
        "Rules whose condition held (or failed to evaluate), by phase, rule and outcome",
        &["phase", "rule", "outcome"]
    )
    .expect(REGISTERED)
});

/// Buckets for durations on the request path: 100 µs to a minute (firmware downloads are long).
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Viewer handshakes, from the ClientHello to the end, by listener and outcome.
pub static HANDSHAKE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "mtls_edge_handshake_duration_seconds",
        "Viewer TLS handshakes from the ClientHello to their end, by listener and outcome",
        &["listener", "outcome"],
        SECONDS.to_vec()
    )
    .expect(REGISTERED)
});

/// Requests, from their header to their last byte, by route, status class and cache result.
pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "mtls_edge_request_duration_seconds",
        "Viewer requests from their header to their last byte, by route, status class and cache result",
        &["route", "status_class", "cache"],
        SECONDS.to_vec()
    )
    .expect(REGISTERED)
});

/// New connections to origins (TCP and TLS), by origin.
pub static ORIGIN_CONNECT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "mtls_edge_origin_connect_duration_seconds",
        "New origin connections, TCP and TLS with the edge's client certificate, by origin",
        &["origin"],
        SECONDS.to_vec()
    )
    .expect(REGISTERED)
});

/// Origin requests, from the request sent to the response header, by origin.
pub static ORIGIN_RESPONSE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "mtls_edge_origin_response_duration_seconds",
        "Origin requests from the request header sent to the response header received, by origin",
        &["origin"],
        SECONDS.to_vec()
    )
    .expect(REGISTERED)
});

/// Viewer connections whose handshake completed and that are still open, by listener.
pub static OPEN_CONNECTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "mtls_edge_open_connections",
        "Viewer TLS connections open, by listener",
        &["listener"]
    )
    .expect(REGISTERED)
});

/// Viewer requests being served.
pub static REQUESTS_IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("mtls_edge_requests_in_flight", "Viewer requests being served").expect(REGISTERED)
});

/// Open connections refused at a request because a reload changed what they were admitted by.
pub static CONNECTIONS_CLOSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_connections_closed_total",
        "Open viewer connections refused at a request after a reload (certificate revoked or untrusted, connection rule), by listener and reason",
        &["listener", "reason"]
    )
    .expect(REGISTERED)
});

/// The build: version and git revision (always 1).
pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "mtls_edge_build_info",
        "The running build: version and git revision",
        &["version", "revision"]
    )
    .expect(REGISTERED)
});

/// Connections to a shield node that failed, so that the miss moved on to the next node (or the
/// origin), by node and reason; the node is passed over for `shield.down_secs`.
pub static SHIELD_PASSED_OVER: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_shield_passed_over_total",
        "Shield node connections that failed, so that the miss went to the next node or the origin, by node and reason",
        &["shield", "reason"]
    )
    .expect(REGISTERED)
});

/// Misses sent to the origin directly because no shield node could take them.
pub static SHIELD_FALLBACKS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "mtls_edge_shield_fallbacks_total",
        "Cache misses sent to the origin directly because no shield node could take them"
    )
    .expect(REGISTERED)
});

/// When each loaded certificate expires, by kind (server, origin_client, origin_ca,
/// shield_client, shield_ca, trust_store_ca) and name (its listener, origin or store, and its CN).
pub static CERT_EXPIRY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "mtls_edge_certificate_expiry_timestamp_seconds",
        "notAfter of every certificate the edge loaded, by kind and name",
        &["kind", "name"]
    )
    .expect(REGISTERED)
});

/// Each CRL's thisUpdate, by trust store and issuer.
pub static CRL_THIS_UPDATE: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "mtls_edge_crl_this_update_timestamp_seconds",
        "thisUpdate of each CRL loaded, by trust store and issuer",
        &["trust_store", "issuer"]
    )
    .expect(REGISTERED)
});

/// Each CRL's nextUpdate, by trust store and issuer: alert when it is in the past.
pub static CRL_NEXT_UPDATE: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "mtls_edge_crl_next_update_timestamp_seconds",
        "nextUpdate of each CRL loaded, by trust store and issuer",
        &["trust_store", "issuer"]
    )
    .expect(REGISTERED)
});

/// Entries of each rules list.
pub static LIST_ENTRIES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("mtls_edge_list_entries", "Entries of each rules list", &["list"]).expect(REGISTERED)
});

/// When each rules list was loaded.
pub static LIST_LOADED: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "mtls_edge_list_loaded_timestamp_seconds",
        "When each rules list was loaded",
        &["list"]
    )
    .expect(REGISTERED)
});

/// Reloads by trigger (signal, admin, watch) and result (ok, error).
pub static RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_reloads_total",
        "Reloads of the config and its files, by trigger and result",
        &["trigger", "result"]
    )
    .expect(REGISTERED)
});

/// When the state in force was built.
pub static LAST_RELOAD: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "mtls_edge_last_reload_success_timestamp_seconds",
        "When the state in force was built (start-up or the last successful reload)"
    )
    .expect(REGISTERED)
});

/// The generation of the state in force: 1 at start, one more at each successful reload.
pub static GENERATION: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "mtls_edge_config_generation",
        "Generation of the state in force: 1 at start, +1 per successful reload"
    )
    .expect(REGISTERED)
});

/// SIGQUITs by result: `handed_over` (a new process was waiting) or `no_new_process` (ignored).
pub static UPGRADES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "mtls_edge_upgrade_signals_total",
        "SIGQUITs: handed_over when a new process was waiting on the upgrade socket, no_new_process when ignored",
        &["result"]
    )
    .expect(REGISTERED)
});

/// What the lifecycle gauges show of one state.
pub struct Lifecycle<'a> {
    /// (kind, name, notAfter)
    pub certificates: Vec<(&'static str, String, i64)>,
    /// (trust store, issuer, thisUpdate, nextUpdate)
    pub crls: Vec<(&'a str, &'a str, i64, Option<i64>)>,
    /// (list, entries, loaded at)
    pub lists: Vec<(&'a str, usize, i64)>,
}

/// Sets the lifecycle gauges to a state's (and drops what an earlier state had).
pub fn set_lifecycle(l: &Lifecycle, generation: u64, built_at: i64) {
    CERT_EXPIRY.reset();
    for (kind, name, t) in &l.certificates {
        CERT_EXPIRY.with_label_values(&[kind, name.as_str()]).set(*t as f64);
    }
    CRL_THIS_UPDATE.reset();
    CRL_NEXT_UPDATE.reset();
    for (store, issuer, this, next) in &l.crls {
        CRL_THIS_UPDATE.with_label_values(&[store, issuer]).set(*this as f64);
        if let Some(next) = next {
            CRL_NEXT_UPDATE.with_label_values(&[store, issuer]).set(*next as f64);
        }
    }
    LIST_ENTRIES.reset();
    LIST_LOADED.reset();
    for (name, n, at) in &l.lists {
        LIST_ENTRIES
            .with_label_values(&[name])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
        LIST_LOADED.with_label_values(&[name]).set(*at as f64);
    }
    GENERATION.set(i64::try_from(generation).unwrap_or(i64::MAX));
    LAST_RELOAD.set(built_at as f64);
}

/// The status class of a response (`2xx`...), `none` when nothing was sent.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

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

/// Counts one tier's answer to a lookup.
pub fn count_tier_lookup(tier: crate::reason::Tier, hit: bool) {
    static COUNTERS: LazyLock<[[IntCounter; 2]; 2]> = LazyLock::new(|| {
        crate::reason::Tier::ALL.map(|t| ["miss", "hit"].map(|r| CACHE_TIER_LOOKUPS.with_label_values(&[t.as_str(), r])))
    });
    COUNTERS[tier as usize][usize::from(hit)].inc();
}

/// Counts an object evicted from a tier.
pub fn count_eviction(tier: crate::reason::Tier) {
    CACHE_EVICTIONS.with_label_values(&[tier.as_str()]).inc();
}

/// Counts a cache lookup by its result.
pub fn count_cache_lookup(result: CacheResult) {
    static RESULTS: LazyLock<Resolved<&'static str>> =
        LazyLock::new(|| Resolved::new(&CACHE_LOOKUPS, &CacheResult::ALL.map(CacheResult::as_str)));
    RESULTS.add(&CACHE_LOOKUPS, result.as_str(), 1);
}

/// Forces registration so that every metric shows on `/metrics` from the start, and adds the
/// process collector (CPU, RSS, open file descriptors).
pub fn init() {
    use pingora_prometheus::prometheus::process_collector::ProcessCollector;
    static PROCESS: std::sync::Once = std::sync::Once::new();
    PROCESS.call_once(|| {
        // Registration fails only when it already happened.
        let _ = prometheus::register(Box::new(ProcessCollector::for_self()));
    });
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("MTLS_EDGE_REVISION")])
        .set(1);
    for m in [
        &HANDSHAKE_SECONDS,
        &REQUEST_SECONDS,
        &ORIGIN_CONNECT_SECONDS,
        &ORIGIN_RESPONSE_SECONDS,
    ] {
        LazyLock::force(m);
    }
    LazyLock::force(&OPEN_CONNECTIONS);
    LazyLock::force(&REQUESTS_IN_FLIGHT);
    LazyLock::force(&CONNECTIONS_CLOSED);
    LazyLock::force(&RELOADS);
    LazyLock::force(&UPGRADES);
    LazyLock::force(&HANDSHAKES);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&ORIGIN_FAILURES);
    LazyLock::force(&SPOOFED_HEADERS);
    LazyLock::force(&UNDERSCORE_HEADERS);
    LazyLock::force(&ADMIN_REFUSED);
    LazyLock::force(&OPEN_SOCKETS);
    LazyLock::force(&RATE_KEY_ERRORS);
    for l in crate::reason::Limit::ALL {
        LIMITS.with_label_values(&[l.as_str()]);
    }
    LazyLock::force(&CACHE_LOOKUPS);
    LazyLock::force(&CACHE_COALESCED);
    LazyLock::force(&DIRECT_HITS);
    LazyLock::force(&BODY_BYTES);
    for t in crate::reason::Tier::ALL {
        CACHE_EVICTIONS.with_label_values(&[t.as_str()]);
        CACHE_BYTES.with_label_values(&[t.as_str()]);
        CACHE_OBJECTS.with_label_values(&[t.as_str()]);
        for r in ["hit", "miss"] {
            CACHE_TIER_LOOKUPS.with_label_values(&[t.as_str(), r]);
        }
    }
    for op in crate::reason::DiskOp::ALL {
        CACHE_DISK_ERRORS.with_label_values(&[op.as_str()]);
    }
    for c in crate::reason::Corrupt::ALL {
        CACHE_DISK_CORRUPT.with_label_values(&[c.as_str()]);
    }
    for r in crate::reason::DiskSkip::ALL {
        CACHE_DISK_SKIPPED.with_label_values(&[r.as_str()]);
    }
    LazyLock::force(&CACHE_DISK_LOADING);
    LazyLock::force(&CACHE_DISK_BUDGET);
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
