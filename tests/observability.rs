//! What operators see: the Prometheus metrics (request, origin and handshake histograms,
//! connection and request gauges, build info, process metrics, certificate expiry, CRL
//! updates, lists, reloads), checked by promtool; the access and connection log lines; the
//! log options; and what a CRL past its nextUpdate does.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use mtls_edge::pki::{self, Issued, LeafSpec};
use time::Duration;

struct Edge {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
    optional_port: u16,
    admin_port: u16,
    revoked: Issued,
}

/// An edge with a cached route, request rules, a list, an optional listener, and SNI names whose
/// trust stores have a CRL past its nextUpdate: `stale.test` refuses (the default),
/// `kept.test` keeps enforcing it.
fn edge(logging: &str) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let ca = device_ca(d);
    save(d, "device", &ca.issue(&LeafSpec::client("device-0001")).unwrap());
    let revoked = ca.issue(&LeafSpec::client("device-0002")).unwrap();
    save(d, "revoked", &revoked);
    pki::write_file(&d.join("device-crl.pem"), &ca.crl(&[&revoked.serial]).unwrap(), false).unwrap();
    let expired = ca
        .crl_valid(&[&revoked.serial], Duration::days(-10), Duration::days(-1))
        .unwrap();
    pki::write_file(&d.join("expired-crl.pem"), &expired, false).unwrap();
    let rules = d.join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("r.yaml"),
        r#"rules:
  - { name: no-secrets, phase: request, when: 'request.path == "/secret"', deny: { status: 403, body: "no\n" } }
  - { name: tag, phase: request, set_headers: { X-Tag: '"t"' } }
"#,
    )
    .unwrap();
    std::fs::write(d.join("models.txt"), "x1\nx2\n").unwrap();
    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, optional_port, admin_port) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"{server}listeners:
{required}    sni:
      - {{ names: [stale.test], mtls: {{ mode: required, trust_store: stale }} }}
      - {{ names: [kept.test], mtls: {{ mode: required, trust_store: kept }} }}
{optional}trust_stores:
  devices: {{ ca_files: [device-ca.pem], crl_files: [device-crl.pem] }}
  stale: {{ ca_files: [device-ca.pem], crl_files: [expired-crl.pem] }}
  kept: {{ ca_files: [device-ca.pem], crl_files: [expired-crl.pem], expired_crl: enforce }}
origins:
{origin}routes:
  - {{ path_prefix: /files/, origin: main, access: any, cache: {{ default_ttl_secs: 60 }} }}
  - {{ path_prefix: /, origin: main, access: any }}
cache: {{ max_bytes: 16777216, max_object_bytes: 1048576 }}
admin: {{ address: 127.0.0.1:{admin_port} }}
rules: {{ dir: rules, lists: {{ models: {{ file: models.txt, kind: text }} }} }}
{logging}
"#,
        server = server_yaml(d, 2),
        required = listener_yaml(port, "required", "devices"),
        optional = listener_yaml(optional_port, "optional", "devices"),
        origin = origin_yaml("main", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    Edge {
        dir,
        _origin: origin,
        edge,
        optional_port,
        admin_port,
        revoked,
    }
}

impl Edge {
    fn client(&self) -> Client<'_> {
        Client::new(self.dir.path(), self.edge.port).cert("device")
    }

    /// A few requests of each kind: a cached miss and hit, one a rule denies, one over HTTP/2,
    /// one without a certificate on the optional listener, and a refused handshake.
    fn traffic(&self) {
        assert_eq!(self.client().get("/files/a.bin?size=100").unwrap().status, 200);
        let hit = self.client().get("/files/a.bin?size=100").unwrap();
        assert_eq!(hit.header("cache-status"), Some("mtls-edge; hit"));
        assert_eq!(self.client().get("/secret").unwrap().status, 403);
        assert_eq!(self.client().h2().unwrap().get("/echo").unwrap().status, 200);
        let anonymous = Client::new(self.dir.path(), self.optional_port).get("/echo");
        assert_eq!(anonymous.unwrap().status, 200);
        assert!(Client::new(self.dir.path(), self.edge.port).get("/echo").is_err());
    }

    fn metrics(&self) -> String {
        admin(self.admin_port, "GET", "/metrics").1
    }
}

/// promtool from Debian's prometheus package, which `scripts/setup.sh` unpacks into
/// target/tools (it does not install the Prometheus service).
fn promtool() -> PathBuf {
    tool("promtool", "target/tools/prometheus/usr/bin/promtool")
}

fn value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name_and_labels} in the metrics:\n{text}"))
}

#[test]
fn metrics_cover_requests_origins_handshakes_certificates_crls_lists_and_the_process() {
    let e = edge("");
    e.traffic();
    let (status, _) = admin(e.admin_port, "POST", "/reload");
    assert_eq!(status, 200);
    let m = e.metrics();
    let l = format!("listener=\"127.0.0.1:{}\"", e.edge.port);
    let count = |name: &str| value(&m, name);
    // Requests, by route, status class and cache result.
    assert_eq!(
        count("mtls_edge_request_duration_seconds_count{cache=\"miss\",route=\"/files/\",status_class=\"2xx\"}"),
        1.0
    );
    assert_eq!(
        count("mtls_edge_request_duration_seconds_count{cache=\"hit\",route=\"/files/\",status_class=\"2xx\"}"),
        1.0
    );
    assert_eq!(
        count("mtls_edge_request_duration_seconds_count{cache=\"none\",route=\"/\",status_class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        count("mtls_edge_request_duration_seconds_count{cache=\"none\",route=\"/\",status_class=\"2xx\"}"),
        2.0
    );
    assert!(m.contains(
        "mtls_edge_request_duration_seconds_bucket{cache=\"hit\",route=\"/files/\",status_class=\"2xx\",le=\"0.001\"}"
    ));
    // Origins: one connection (pooled after), three requests.
    assert!(count("mtls_edge_origin_connect_duration_seconds_count{origin=\"main\"}") >= 1.0);
    assert_eq!(
        count("mtls_edge_origin_response_duration_seconds_count{origin=\"main\"}"),
        3.0
    );
    // Handshakes, both outcomes.
    assert!(
        count(&format!(
            "mtls_edge_handshake_duration_seconds_count{{{l},outcome=\"accepted\"}}"
        )) >= 4.0
    );
    assert_eq!(
        count(&format!(
            "mtls_edge_handshake_duration_seconds_count{{{l},outcome=\"refused\"}}"
        )),
        1.0
    );
    // Gauges: nothing in flight but this scrape's own admin request (not a proxy request).
    assert_eq!(count("mtls_edge_requests_in_flight"), 0.0);
    assert!(m.contains(&format!("mtls_edge_open_connections{{{l}}}")));
    // Build and process.
    assert!(m.contains("mtls_edge_build_info{revision=\""), "{m}");
    assert!(count("process_resident_memory_bytes") > 1e6);
    assert!(count("process_open_fds") > 5.0);
    assert!(m.contains("process_cpu_seconds_total"));
    // Lifecycle: every certificate, every CRL, the list, the reloads.
    for kind in ["server", "origin_client", "trust_store_ca", "origin_ca"] {
        assert!(
            m.contains(&format!(
                "mtls_edge_certificate_expiry_timestamp_seconds{{kind=\"{kind}\""
            )),
            "no {kind} expiry"
        );
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    let next = count("mtls_edge_crl_next_update_timestamp_seconds{issuer=\"CN=Device CA,O=mtls-edge test PKI\",trust_store=\"devices\"}");
    assert!(next > now + 86_400.0 * 29.0, "{next}");
    let stale = count("mtls_edge_crl_next_update_timestamp_seconds{issuer=\"CN=Device CA,O=mtls-edge test PKI\",trust_store=\"stale\"}");
    assert!(stale < now, "an expired CRL shows its nextUpdate in the past: {stale}");
    assert!(count("mtls_edge_crl_this_update_timestamp_seconds{issuer=\"CN=Device CA,O=mtls-edge test PKI\",trust_store=\"kept\"}") < stale);
    assert_eq!(count("mtls_edge_list_entries{list=\"models\"}"), 2.0);
    assert!(count("mtls_edge_list_loaded_timestamp_seconds{list=\"models\"}") > now - 60.0);
    assert_eq!(count("mtls_edge_reloads_total{result=\"ok\",trigger=\"admin\"}"), 1.0);
    assert_eq!(count("mtls_edge_config_generation"), 2.0);
    assert!(count("mtls_edge_last_reload_success_timestamp_seconds") > now - 60.0);
    // Bounded labels: no request path, no certificate serial.
    let serial: String = e.revoked.serial.iter().map(|b| format!("{b:02x}")).collect();
    for line in m.lines().filter(|l| l.starts_with("mtls_edge_")) {
        assert!(
            !line.contains("a.bin") && !line.contains("/secret") && !line.contains(&serial),
            "{line}"
        );
    }
    // Prometheus's own linter: names, units, suffixes, help.
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool: {problems}"
    );
}

#[test]
fn every_request_has_an_access_line_and_every_refused_handshake_a_connection_line() {
    let e = edge("");
    e.traffic();
    let access = |path: &str, n: usize| {
        let of_path = || {
            e.edge
                .log_lines()
                .into_iter()
                .filter(|l| l["log"] == "access" && l["path"] == path)
                .collect::<Vec<_>>()
        };
        e.edge
            .wait_log(&format!("for request {n} of {path}"), |_| of_path().len() > n);
        of_path().swap_remove(n)
    };
    let miss = access("/files/a.bin", 0);
    for (k, v) in [
        ("client_ip", "127.0.0.1"),
        ("sni", "localhost"),
        ("cert_subject", "CN=device-0001"),
        ("method", "GET"),
        ("host", "localhost"),
        ("protocol", "HTTP/1.1"),
        ("cache", "miss"),
        ("origin", "main"),
    ] {
        assert_eq!(miss[k], v, "{k} in {miss}");
    }
    assert_eq!(miss["status"], 200);
    assert_eq!(miss["bytes_sent"], 100);
    assert!(miss["cert_serial"].as_str().is_some_and(|s| s.contains(':')), "{miss}");
    assert!(
        miss["origin_ms"].as_f64().is_some() && miss["duration_ms"].as_f64().is_some(),
        "{miss}"
    );
    assert_eq!(miss["rules"], serde_json::json!(["tag"]));
    let hit = access("/files/a.bin", 1);
    assert_eq!(
        (hit["cache"].as_str(), hit["origin"].is_null()),
        (Some("hit"), true),
        "{hit}"
    );
    let denied = access("/secret", 0);
    assert_eq!(
        (denied["status"].as_u64(), denied["answered"].as_str()),
        (Some(403), Some("RuleDenied")),
        "{denied}"
    );
    assert_eq!(denied["rules"], serde_json::json!(["no-secrets"]));
    let h2 = access("/echo", 0);
    assert_eq!(h2["protocol"], "HTTP/2", "{h2}");
    let anonymous = access("/echo", 1);
    assert!(
        anonymous["cert_subject"].is_null() && anonymous["cert_serial"].is_null(),
        "{anonymous}"
    );
    assert_eq!(anonymous["listener"], format!("127.0.0.1:{}", e.optional_port));

    let refused = e.edge.wait_connection_log("ClientCertMissing", "no client certificate");
    assert_eq!(refused["event"], "refused");
    assert_eq!(refused["listener"], format!("127.0.0.1:{}", e.edge.port));
    assert_eq!(refused["sni"], "localhost");
    // A certificate the chain check refuses names the device.
    assert!(Client::new(e.dir.path(), e.edge.port)
        .cert("revoked")
        .get("/echo")
        .is_err());
    let line = e.edge.wait_connection_log("ClientCertRevoked", "CN=device-0002");
    assert_eq!(line["cert_subject"], "CN=device-0002", "{line}");

    // Neither a key nor a certificate's PEM, plain or URL-encoded, is ever written.
    let log = e.edge.log_text();
    for secret in [
        "PRIVATE KEY",
        "BEGIN CERTIFICATE",
        "-----BEGIN",
        "%2D%2D%2D%2D%2DBEGIN",
        "%2d%2d%2d%2d%2dBEGIN",
    ] {
        assert!(!log.contains(secret), "the log holds {secret}:\n{log}");
    }
}

#[test]
fn logs_can_be_text_and_go_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.log");
    let e = edge(&format!("logging: {{ format: text, file: {} }}", file.display()));
    assert_eq!(e.client().get("/echo").unwrap().status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains(" access ") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let line = text
        .lines()
        .find(|l| l.contains(" info access "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("path=/echo") && line.contains("status=200") && line.contains("cert_subject=\"CN=device-0001\""),
        "{line}"
    );
    assert!(
        !e.edge.log_text().contains(" access "),
        "access lines went to stdout too"
    );
}

#[test]
fn a_crl_past_its_next_update_refuses_by_default_and_is_kept_enforced_by_choice() {
    let e = edge("");
    let c = |sni: &str, stem: &str| {
        Client::new(e.dir.path(), e.edge.port)
            .cert(stem)
            .sni(Some(sni))
            .host(sni)
            .get("/echo")
    };
    // Refused: a valid device whose CRL has expired.
    assert!(c("stale.test", "device").is_err());
    e.edge.wait_connection_log("ClientCertRevocationUnknown", "expired at");
    // Kept: the expired CRL still revokes, and lets the others in.
    assert_eq!(c("kept.test", "device").unwrap().status, 200);
    assert!(c("kept.test", "revoked").is_err());
    e.edge.wait_connection_log("ClientCertRevoked", "CN=device-0002");
    e.edge
        .wait_event("the CRL of CN=Device CA,O=mtls-edge test PKI expired at");
}
