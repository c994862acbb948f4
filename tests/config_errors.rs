//! `mtls-edge -t -c FILE` on good and broken configurations: exit 0 for a good one, exit 1
//! with the file, the key path and the reason for each kind of error.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use mtls_edge::pki::{self, Ca, LeafSpec};

const GOOD: &str = r#"
listeners:
  - address: 127.0.0.1:18443
    server_cert: edge-server.pem
    server_key: edge-server.key
    mtls: { mode: required, trust_store: devices }
trust_stores:
  devices:
    ca_files: [device-ca.pem]
    crl_files: [device-crl.pem]
origins:
  firmware:
    address: 127.0.0.1:19443
    sni: origin.internal
    ca_file: origin-ca.pem
    client_cert: edge-client.pem
    client_key: edge-client.key
routes:
  - { path_prefix: /, origin: firmware }
admin: { address: 127.0.0.1:19100 }
"#;

const CACHE: &str = "cache: { max_bytes: 268435456 }\n";
const SHIELD: &str = "{ nodes: [{ name: a, address: 127.0.0.1:17001 }, { name: b, address: 127.0.0.1:17002 }], sni: edge.test, ca_file: edge-ca.pem, client_cert: edge-client.pem, client_key: edge-client.key, fallback: none }";

fn pki_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);
    let device_ca = Ca::root("Device CA").unwrap();
    pki::write_file(&d.join("device-ca.pem"), &device_ca.cert_pem, false).unwrap();
    pki::write_file(&d.join("device-crl.pem"), &device_ca.crl(&[]).unwrap(), false).unwrap();
    // A client certificate with only the serverAuth EKU, useless toward an origin.
    let edge_ca = Ca::root("Other Edge CA").unwrap();
    save(
        d,
        "server-only",
        &edge_ca.issue(&LeafSpec::server("edge", &["edge"])).unwrap(),
    );
    std::fs::write(d.join("short.txt"), "abc\n").unwrap();
    std::fs::write(
        d.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    dir
}

fn check(dir: &Path, yaml: &str) -> (bool, String) {
    let conf = dir.join("edge.yaml");
    std::fs::write(&conf, yaml).unwrap();
    let out = Command::new(BIN).args(["-t", "-c"]).arg(&conf).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_good_config_passes_the_check() {
    let dir = pki_dir();
    let (ok, text) = check(dir.path(), GOOD);
    assert!(ok, "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    // conf/edge.yaml's commented rate key, as printed there.
    let keyed = format!("{GOOD}limits: {{ rate_limit: {{ requests_per_second: 10, burst: 50, key: client.cert.subject.ou }} }}\n");
    let (ok, text) = check(dir.path(), &keyed);
    assert!(ok, "{text}");
    // An edge with a shield tier, and a shield's listener for edges.
    let shielded = format!("{GOOD}{CACHE}shield: {SHIELD}\n")
        .replace("trust_store: devices }", "trust_store: devices }\n    role: edges");
    let (ok, text) = check(dir.path(), &shielded);
    assert!(ok, "{text}");
}

#[test]
fn each_kind_of_error_is_rejected_with_the_file_and_the_key() {
    let dir = pki_dir();
    let d = dir.path();
    // (what is broken, the edit, text the message must contain)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "missing file",
            GOOD.replace("client_cert: edge-client.pem", "client_cert: nowhere.pem"),
            vec!["origins.firmware.client_cert", "nowhere.pem", "cannot read"],
        ),
        (
            "PEM that does not parse",
            GOOD.replace("ca_files: [device-ca.pem]", "ca_files: [garbage.pem]"),
            vec![
                "trust_stores.devices.ca_files[0]",
                "garbage.pem",
                "not a PEM certificate",
            ],
        ),
        (
            "CRL file without a CRL",
            GOOD.replace("crl_files: [device-crl.pem]", "crl_files: [device-ca.pem]"),
            vec!["trust_stores.devices.crl_files[0]", "no PEM CRL"],
        ),
        (
            "key that does not match its certificate",
            GOOD.replace("server_key: edge-server.key", "server_key: edge-client.key"),
            vec!["listeners[0].server_key", "does not match"],
        ),
        (
            "origin client certificate without clientAuth",
            GOOD.replace("client_cert: edge-client.pem", "client_cert: server-only.pem")
                .replace("client_key: edge-client.key", "client_key: server-only.key"),
            vec!["origins.firmware.client_cert", "clientAuth"],
        ),
        (
            "unknown trust store",
            GOOD.replace("trust_store: devices", "trust_store: fleet"),
            vec!["listeners[0].mtls.trust_store", "unknown trust store 'fleet'"],
        ),
        (
            "unknown origin",
            GOOD.replace("origin: firmware }", "origin: cdn }"),
            vec!["routes[0].origin", "unknown origin 'cdn'"],
        ),
        (
            "unknown key",
            GOOD.replace("sni: origin.internal", "sni: origin.internal\n    verify: false"),
            vec!["origins.firmware", "unknown field `verify`"],
        ),
        (
            "unknown mode",
            GOOD.replace("mode: required", "mode: maybe"),
            vec!["listeners[0].mtls.mode", "unknown variant `maybe`"],
        ),
        (
            "empty origin SNI (would disable verification)",
            GOOD.replace("sni: origin.internal", "sni: \"\""),
            vec!["origins.firmware.sni"],
        ),
        (
            "bad address",
            GOOD.replace("127.0.0.1:18443", "localhost"),
            vec!["listeners[0].address", "not an IP:port"],
        ),
        (
            "chain depth out of range",
            GOOD.replace(
                "crl_files: [device-crl.pem]",
                "crl_files: [device-crl.pem]\n    max_chain_depth: 1",
            ),
            vec!["trust_stores.devices.max_chain_depth", "out of range"],
        ),
        (
            "invalid header name",
            format!("{GOOD}identity_headers: {{ subject: \"Bad Header\" }}\n"),
            vec!["identity_headers.subject", "not a valid header name"],
        ),
        (
            "a viewer header named like an identity header",
            format!("{GOOD}viewer_headers: {{ address: CloudFront-Viewer-Cert-Subject }}\n"),
            vec!["viewer_headers.address", "also used by identity_headers.subject"],
        ),
        (
            "an admin listener on a non-loopback address without mTLS or a token",
            GOOD.replace("admin: { address: 127.0.0.1:19100 }", "admin: { address: 0.0.0.0:19100 }"),
            vec!["admin.address", "not a loopback address"],
        ),
        (
            "an admin token that is too short",
            GOOD.replace("admin: { address: 127.0.0.1:19100 }", "admin: { address: 0.0.0.0:19100, token_file: short.txt }"),
            vec!["admin.token_file", "at least 16"],
        ),
        (
            "admin mTLS with an unknown trust store",
            GOOD.replace(
                "admin: { address: 127.0.0.1:19100 }",
                "admin: { address: 0.0.0.0:19100, mtls: { trust_store: operators, server_cert: edge-server.pem, server_key: edge-server.key } }",
            ),
            vec!["admin.mtls.trust_store", "unknown trust store 'operators'"],
        ),
        (
            "an unknown underscore policy",
            format!("{GOOD}headers_with_underscores: keep\n"),
            vec!["headers_with_underscores", "unknown variant"],
        ),
        (
            "fill budget that leaves nothing for stored objects",
            format!("{GOOD}cache: {{ max_bytes: 1000, max_object_bytes: 500, max_filling_bytes: 1000 }}\n"),
            vec!["cache.max_filling_bytes", "leaves nothing"],
        ),
        (
            "object larger than the fill budget",
            format!("{GOOD}cache: {{ max_bytes: 1000, max_object_bytes: 500, max_filling_bytes: 400 }}\n"),
            vec!["cache.max_object_bytes", "at most cache.max_filling_bytes"],
        ),
        (
            "a disk tier without a budget",
            format!("{GOOD}cache: {{ max_bytes: 1000, disk: {{ path: d, max_bytes: 0 }} }}\n"),
            vec!["cache.disk.max_bytes", "more than 0"],
        ),
        (
            "a disk object limit above the disk budget",
            format!("{GOOD}cache: {{ max_bytes: 1000, disk: {{ path: d, max_bytes: 10, max_object_bytes: 11 }} }}\n"),
            vec!["cache.disk.max_object_bytes", "at most cache.disk.max_bytes"],
        ),
        (
            "no I/O threads for the disk",
            format!("{GOOD}cache: {{ max_bytes: 1000, disk: {{ path: d, max_bytes: 10, io_threads: 0 }} }}\n"),
            vec!["cache.disk.io_threads", "between 1 and 1024"],
        ),
        (
            "an unknown disk key",
            format!("{GOOD}cache: {{ max_bytes: 1000, disk: {{ path: d, max_bytes: 10, sync: true }} }}\n"),
            vec!["cache", "unknown field `sync`"],
        ),
        (
            "a failed-handshake delay out of range",
            format!("{GOOD}limits: {{ failed_handshakes_per_ip: {{ max: 5, window_secs: 10, delay_ms: 0 }} }}\n"),
            vec!["limits.failed_handshakes_per_ip.delay_ms", "out of range"],
        ),
        (
            "a rate key that is not a string",
            format!("{GOOD}limits: {{ rate_limit: {{ requests_per_second: 1, burst: 1, key: 'size(request.path)' }} }}\n"),
            vec!["limits.rate_limit.key"],
        ),
        (
            "a rate key naming an unknown field",
            format!("{GOOD}limits: {{ rate_limit: {{ requests_per_second: 1, burst: 1, key: 'client.cert.colour' }} }}\n"),
            vec!["limits.rate_limit.key", "colour"],
        ),
        (
            "a header timeout out of range",
            format!("{GOOD}limits: {{ request_header_timeout_ms: 5 }}\n"),
            vec!["limits.request_header_timeout_ms", "out of range"],
        ),
        (
            "a shield without a cache",
            format!("{GOOD}shield: {SHIELD}\n"),
            vec!["shield", "needs the top-level cache section"],
        ),
        (
            "a shield node named like an origin",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("name: a", "name: firmware")),
            vec!["shield.nodes[0].name", "not an origin's name"],
        ),
        (
            "two shield nodes at one address",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("127.0.0.1:17002", "127.0.0.1:17001")),
            vec!["shield.nodes[1].address", "already used by shield.nodes[0]"],
        ),
        (
            "a shield node without an address",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("127.0.0.1:17002", "shield-b")),
            vec!["shield.nodes[1].address", "not an IP:port"],
        ),
        (
            "no shield nodes",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("{ name: a, address: 127.0.0.1:17001 }, { name: b, address: 127.0.0.1:17002 }", "")),
            vec!["shield.nodes", "between 1 and 64"],
        ),
        (
            "an empty shield SNI (would disable verification)",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("sni: edge.test", "sni: ''")),
            vec!["shield.sni"],
        ),
        (
            "a shield client certificate without clientAuth",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("edge-client", "server-only")),
            vec!["shield.client_cert", "clientAuth"],
        ),
        (
            "a shield node passed over for no time",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("fallback: none", "fallback: none, down_secs: 0")),
            vec!["shield", "at least 1 second"],
        ),
        (
            "an unknown shield fallback",
            format!("{GOOD}{CACHE}shield: {}\n", SHIELD.replace("fallback: none", "fallback: maybe")),
            vec!["shield.fallback", "unknown variant `maybe`"],
        ),
        (
            "a listener for edges that does not require certificates",
            GOOD.replace("mtls: { mode: required, trust_store: devices }", "mtls: { mode: optional, trust_store: devices }\n    role: edges"),
            vec!["listeners[0].role", "must require certificates"],
        ),
        ("not YAML", "listeners: [".to_string(), vec!["edge.yaml"]),
    ];
    for (what, yaml, needles) in cases {
        let (ok, text) = check(d, &yaml);
        assert!(!ok, "{what}: accepted\n{text}");
        assert!(
            text.contains(&d.join("edge.yaml").display().to_string()),
            "{what}: no file name in\n{text}"
        );
        for n in needles {
            assert!(text.contains(n), "{what}: message lacks '{n}':\n{text}");
        }
        assert!(!text.contains("PRIVATE KEY"), "{what}: a key leaked into the message");
    }
}

#[test]
fn every_error_in_a_file_is_reported_at_once() {
    let dir = pki_dir();
    let yaml = GOOD
        .replace("trust_store: devices", "trust_store: fleet")
        .replace("origin: firmware }", "origin: cdn }");
    let (ok, text) = check(dir.path(), &yaml);
    assert!(!ok);
    assert!(
        text.contains("listeners[0].mtls.trust_store") && text.contains("routes[0].origin"),
        "{text}"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let out = Command::new(BIN)
        .args(["-t", "-c", "/nonexistent/edge.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("/nonexistent/edge.yaml") && text.contains("cannot read"),
        "{text}"
    );
}

/// `text` with the commented block that starts at the line `first` (trimmed) uncommented, up to
/// the next blank line.
fn uncomment(text: &str, first: &str) -> String {
    let mut inside = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            inside = (inside || l.trim() == first) && !l.trim().is_empty();
            match (inside, l.find("# ")) {
                (true, Some(i)) => format!("{}{}", &l[..i], &l[i + 2..]),
                _ => l.to_string(),
            }
        })
        .collect();
    assert!(lines.join("\n") != text, "no block at {first}");
    lines.join("\n")
}

#[test]
fn the_documented_example_config_matches_the_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/edge.yaml");
    if let Err(e) = mtls_edge::config::load(&path) {
        panic!("conf/edge.yaml no longer matches the schema:\n{e}");
    }
    // With its optional blocks uncommented: the disk tier, the shield tier, a listener for edges
    // (with its trust store).
    let text = std::fs::read_to_string(&path).unwrap();
    let full = ["# disk:", "# shield:", "# - address: 0.0.0.0:8444"]
        .iter()
        .fold(text, |t, block| uncomment(&t, block))
        .replace("trust_stores:\n", "trust_stores:\n  edges: { ca_files: [pki/edge-ca.pem] }\n");
    assert!(full.contains("\nshield:\n  nodes:") && full.contains("    role: edges"), "{full}");
    if let Err(e) = mtls_edge::config::parse(&path, &full) {
        panic!("conf/edge.yaml's commented blocks no longer match the schema:\n{e}\n{full}");
    }
}
