//! Viewer mTLS over real sockets: the verification matrix in both modes and both TLS versions,
//! identity headers and their spoofing, fleet separation by SNI, resumption, HTTP/2.

mod common;

use boring::hash::MessageDigest;
use boring::ssl::SslVersion;
use boring::x509::X509;
use common::*;
use mtls_edge::pki::{self, Ca, LeafSpec};
use rcgen::ExtendedKeyUsagePurpose;
use time::Duration;

/// Device PKI for fleet A (trust store `devices`) and fleet B (trust store `fleetb`), plus every
/// kind of bad certificate. Returns the edge's config.
struct Fleet {
    dir: tempfile::TempDir,
    _origin: Proc,
    edge: Proc,
    optional_port: u16,
    admin_port: u16,
}

fn device(cn: &str) -> LeafSpec {
    let mut s = LeafSpec::client(cn);
    s.org = Some("Fleet A".into());
    s.org_unit = Some("model-x1".into());
    s
}

fn fleet() -> Fleet {
    fleet_with("")
}

/// The fleet edge with `extra` YAML appended to its config.
fn fleet_with(extra: &str) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ServerPki::write(d);

    let root = Ca::root("Device Root CA").unwrap();
    let int = root.intermediate("Device Issuing CA", Some(0)).unwrap();
    let mut good = device("device-0001");
    good.uris = vec!["urn:device:0001".into()];
    good.dns = vec!["device-0001.fleet.test".into()];
    save(d, "good", &int.issue(&good).unwrap());

    let mut expired = device("device-expired");
    expired.not_before = Duration::days(-10);
    expired.not_after = Duration::days(-1);
    save(d, "expired", &int.issue(&expired).unwrap());

    let mut future = device("device-future");
    future.not_before = Duration::days(1);
    future.not_after = Duration::days(10);
    save(d, "future", &int.issue(&future).unwrap());

    // Same names as the trusted CAs, different keys.
    let fake_root = Ca::root("Device Root CA").unwrap();
    let fake_int = fake_root.intermediate("Device Issuing CA", Some(0)).unwrap();
    save(d, "untrusted", &fake_int.issue(&device("device-0001")).unwrap());

    save(
        d,
        "selfsigned",
        &pki::self_signed_client(&device("device-0001")).unwrap(),
    );

    let mut server_only = device("device-serverauth");
    server_only.eku = Some(vec![ExtendedKeyUsagePurpose::ServerAuth]);
    save(d, "serverauth", &int.issue(&server_only).unwrap());

    let mut bad_ku = device("device-keyusage");
    bad_ku.key_usage = Some(vec![rcgen::KeyUsagePurpose::KeyEncipherment]);
    save(d, "keyusage", &int.issue(&bad_ku).unwrap());

    // No EKU at all: the clientAuth check applies only when an EKU is present.
    let mut no_eku = device("device-noeku");
    no_eku.eku = Some(Vec::new());
    save(d, "noeku", &int.issue(&no_eku).unwrap());

    let revoked = int.issue(&device("device-revoked")).unwrap();
    save(d, "revoked", &revoked);

    // The issuing CA has pathLen 0, so a CA below it breaks the constraint.
    let sub = int.intermediate("Rogue Sub CA", None).unwrap();
    save(d, "pathlen", &sub.issue(&device("device-pathlen")).unwrap());

    // root → A → B → C → leaf: five certificates, over the limit of 4.
    let deep_a = root.intermediate("Deep CA A", None).unwrap();
    let deep_b = deep_a.intermediate("Deep CA B", None).unwrap();
    let deep_c = deep_b.intermediate("Deep CA C", None).unwrap();
    save(d, "deep", &deep_c.issue(&device("device-deep")).unwrap());

    let crls = [
        root.crl(&[]).unwrap(),
        int.crl(&[&revoked.serial]).unwrap(),
        sub.crl(&[]).unwrap(),
        deep_a.crl(&[]).unwrap(),
        deep_b.crl(&[]).unwrap(),
        deep_c.crl(&[]).unwrap(),
    ]
    .concat();
    pki::write_file(
        &d.join("device-ca.pem"),
        &format!("{}{}", root.cert_pem, int.cert_pem),
        false,
    )
    .unwrap();
    pki::write_file(&d.join("device-crl.pem"), &crls, false).unwrap();
    // Only the root's CRL: with crl_check chain, the issuing CA's revocation status is unknown.
    pki::write_file(&d.join("root-crl.pem"), &root.crl(&[]).unwrap(), false).unwrap();
    // Only the issuing CA's CRL: enough with crl_check leaf, which checks the leaf alone.
    pki::write_file(&d.join("issuing-crl.pem"), &int.crl(&[&revoked.serial]).unwrap(), false).unwrap();

    // Fleet B: another root; its devices may use only fleet-b.test.
    let root_b = Ca::root("Fleet B Root CA").unwrap();
    let mut b = LeafSpec::client("device-b-0001");
    b.org = Some("Fleet B".into());
    save(d, "fleetb", &root_b.issue(&b).unwrap());
    pki::write_file(&d.join("fleetb-ca.pem"), &root_b.cert_pem, false).unwrap();

    let origin = spawn_origin(d, "origin-server", "edge-ca.pem");
    let (port, optional_port, admin_port) = (free_port(), free_port(), free_port());
    let yaml = format!(
        r#"{server}listeners:
{required}    sni:
      - names: [fleet-b.test]
        mtls: {{ mode: required, trust_store: fleetb }}
      - names: [partial-crl.test]
        mtls: {{ mode: required, trust_store: partialcrl }}
      - names: [leaf-crl.test]
        mtls: {{ mode: required, trust_store: leafcrl }}
{optional}trust_stores:
  devices:
    ca_files: [device-ca.pem]
    crl_files: [device-crl.pem]
    max_chain_depth: 4
  fleetb:
    ca_files: [fleetb-ca.pem]
  partialcrl:
    ca_files: [device-ca.pem]
    crl_files: [root-crl.pem]
  leafcrl:
    ca_files: [device-ca.pem]
    crl_files: [issuing-crl.pem]
    crl_check: leaf
origins:
{origin}routes:
  - {{ host: fleet-b.test, path_prefix: /, origin: firmware }}
  - {{ path_prefix: /, origin: firmware, access: any }}
admin: {{ address: 127.0.0.1:{admin_port} }}
{extra}
"#,
        server = server_yaml(d, 2),
        required = listener_yaml(port, "required", "devices"),
        optional = listener_yaml(optional_port, "optional", "devices"),
        origin = origin_yaml("firmware", origin.port),
    );
    let edge = spawn_edge(d, &yaml, port);
    Fleet {
        dir,
        _origin: origin,
        edge,
        optional_port,
        admin_port,
    }
}

const VERSIONS: [SslVersion; 2] = [SslVersion::TLS1_2, SslVersion::TLS1_3];

#[test]
fn every_invalid_certificate_is_refused_in_the_handshake_in_both_modes() {
    let f = fleet();
    let d = f.dir.path();
    // (certificate, refusal reason counted by the edge, TLS alert the client sees)
    let cases = [
        ("expired", "ClientCertExpired", "CERTIFICATE_EXPIRED"),
        ("future", "ClientCertNotYetValid", "CERTIFICATE_EXPIRED"),
        ("untrusted", "ClientCertUntrusted", "UNKNOWN_CA"),
        ("selfsigned", "ClientCertUntrusted", "UNKNOWN_CA"),
        ("serverauth", "ClientCertIntentInvalid", "UNSUPPORTED_CERTIFICATE"),
        ("revoked", "ClientCertRevoked", "CERTIFICATE_REVOKED"),
        ("pathlen", "ClientCertPathLenExceeded", "UNKNOWN_CA"),
        ("deep", "ClientCertMaxChainDepthExceeded", "UNKNOWN_CA"),
    ];
    for port in [f.edge.port, f.optional_port] {
        for v in VERSIONS {
            for (stem, _, alert) in cases {
                let err = Client::new(d, port)
                    .cert(stem)
                    .version(v)
                    .get("/echo")
                    .expect_err(&format!("{stem} must be refused on port {port} {v:?}"));
                assert!(
                    err.to_ascii_uppercase().contains(alert),
                    "{stem} on {port} {v:?}: expected alert {alert}, got {err}"
                );
            }
        }
    }
    for (stem, reason, _) in cases {
        let n = wait_metric(
            f.admin_port,
            &format!(
                "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{}\",outcome=\"refused\",reason=\"{reason}\"}}",
                f.edge.port
            ),
            2.0,
        );
        assert!(
            n >= 2.0,
            "{stem}: reason {reason} counted {n} times on the required listener; log:\n{}",
            f.edge.log_text()
        );
    }
    // A key usage without digitalSignature: BoringSSL's own client refuses to sign with such a
    // certificate, so curl (OpenSSL) presents it. BoringSSL rejects it while parsing the
    // Certificate message, before chain verification, so it counts as HandshakeFailed.
    for port in [f.edge.port, f.optional_port] {
        let out = curl(d, port, "keyusage", "/echo", &["-o", "/dev/null"]);
        assert!(
            !out.status.success(),
            "a certificate without digitalSignature was accepted on {port}"
        );
    }
    let n = wait_metric(
        f.admin_port,
        &format!(
            "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{}\",outcome=\"refused\",reason=\"HandshakeFailed\"}}",
            f.edge.port
        ),
        1.0,
    );
    assert_eq!(
        n,
        1.0,
        "key usage refusal not counted as HandshakeFailed:\n{}",
        f.edge.log_text()
    );

    // The valid devices pass on both listeners and both versions.
    for (port, v, stem) in [f.edge.port, f.optional_port].into_iter().flat_map(|p| {
        VERSIONS
            .into_iter()
            .flat_map(move |v| ["good", "noeku"].map(|s| (p, v, s)))
    }) {
        {
            let r = Client::new(d, port).cert(stem).version(v).get("/echo").unwrap();
            assert_eq!(r.status, 200, "{stem} {port} {v:?}");
            assert_eq!(r.echoed("cloudfront-viewer-cert-present").as_deref(), Some("1"));
        }
    }
}

#[test]
fn no_certificate_is_refused_when_required_and_admitted_when_optional() {
    let f = fleet();
    let d = f.dir.path();
    for v in VERSIONS {
        let err = Client::new(d, f.edge.port).version(v).get("/echo").unwrap_err();
        let want = if v == SslVersion::TLS1_3 {
            "CERTIFICATE_REQUIRED"
        } else {
            "HANDSHAKE_FAILURE"
        };
        assert!(err.to_ascii_uppercase().contains(want), "{v:?}: {err}");

        let r = Client::new(d, f.optional_port).version(v).get("/echo").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.echoed("cloudfront-viewer-cert-present").as_deref(), Some("0"));
        assert_eq!(r.echoed("cloudfront-viewer-cert-subject"), None);
    }
    let missing = wait_metric(
        f.admin_port,
        &format!(
            "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{}\",outcome=\"refused\",reason=\"ClientCertMissing\"}}",
            f.edge.port
        ),
        2.0,
    );
    assert_eq!(missing, 2.0);
}

#[test]
fn origin_receives_identity_headers_with_the_right_values() {
    let f = fleet();
    let d = f.dir.path();
    let r = Client::new(d, f.edge.port).cert("good").get("/echo").unwrap();
    assert_eq!(r.status, 200);
    let pem = std::fs::read(d.join("good.pem")).unwrap();
    let leaf = X509::stack_from_pem(&pem).unwrap().remove(0);
    let sha = leaf.digest(MessageDigest::sha256()).unwrap();
    let sha_hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let serial: Vec<String> = leaf
        .serial_number()
        .to_bn()
        .unwrap()
        .to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    assert_eq!(r.echoed("cloudfront-viewer-cert-present").as_deref(), Some("1"));
    assert_eq!(
        r.echoed("cloudfront-viewer-cert-subject").as_deref(),
        Some("CN=device-0001,OU=model-x1,O=Fleet A")
    );
    assert_eq!(
        r.echoed("cloudfront-viewer-cert-issuer").as_deref(),
        Some("CN=Device Issuing CA,O=mtls-edge test PKI")
    );
    assert_eq!(r.echoed("cloudfront-viewer-cert-serial-number"), Some(serial.join(":")));
    assert_eq!(r.echoed("cloudfront-viewer-cert-sha256"), Some(sha_hex));
    let validity = r.echoed("cloudfront-viewer-cert-validity").unwrap();
    let (nb, na) = validity
        .strip_prefix("NotBefore=")
        .and_then(|v| v.split_once(";NotAfter="))
        .unwrap_or_else(|| panic!("validity format: {validity}"));
    for t in [nb, na] {
        assert!(
            t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "ISO 8601 UTC: {t}"
        );
    }
    let pem_header = r.echoed("cloudfront-viewer-cert-pem").unwrap();
    let decoded = percent_encoding::percent_decode_str(&pem_header).decode_utf8().unwrap();
    assert_eq!(decoded.as_bytes(), leaf.to_pem().unwrap().as_slice());
    assert_eq!(
        r.echoed("cloudfront-viewer-cert-san-uri").as_deref(),
        Some("urn:device:0001")
    );
    assert_eq!(
        r.echoed("cloudfront-viewer-cert-san-dns").as_deref(),
        Some("device-0001.fleet.test")
    );

    // The origin saw the edge's own client certificate: origin mTLS.
    let edge_client = X509::stack_from_pem(&std::fs::read(d.join("edge-client.pem")).unwrap())
        .unwrap()
        .remove(0);
    let edge_sha: String = edge_client
        .digest(MessageDigest::sha256())
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(r.header("x-origin-client-cert-sha256"), Some(edge_sha.as_str()));
}

#[test]
fn spoofed_identity_headers_are_removed_in_every_mode() {
    let f = fleet();
    let d = f.dir.path();
    fn spoof(c: Client<'_>) -> Client<'_> {
        c.header("CloudFront-Viewer-Cert-Subject", "CN=admin")
            .header("cloudfront-viewer-cert-present", "1")
            .header("CloudFront-Viewer-Cert-Made-Up", "x")
            .header("Client-Cert", ":AAAA:")
            .header("Client-Cert-Chain", ":AAAA:")
    }
    // Optional mode without a certificate: nothing of the spoof may survive.
    let r = spoof(Client::new(d, f.optional_port)).get("/echo").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed("cloudfront-viewer-cert-present").as_deref(), Some("0"));
    for h in [
        "cloudfront-viewer-cert-subject",
        "cloudfront-viewer-cert-made-up",
        "client-cert",
        "client-cert-chain",
    ] {
        assert_eq!(r.echoed(h), None, "{h} leaked to the origin");
    }
    // Required mode with a certificate: the edge's values replace the spoof.
    let r = spoof(Client::new(d, f.edge.port).cert("good")).get("/echo").unwrap();
    assert_eq!(
        r.echoed("cloudfront-viewer-cert-subject").as_deref(),
        Some("CN=device-0001,OU=model-x1,O=Fleet A")
    );
    assert_eq!(r.body.matches("cloudfront-viewer-cert-subject:").count(), 1);
    assert_eq!(r.echoed("cloudfront-viewer-cert-made-up"), None);
    assert_eq!(r.echoed("client-cert"), None);
}

/// Every header the edge sets or owns toward the origin.
const EDGE_HEADERS: &[&str] = &[
    "CloudFront-Viewer-Cert-Present",
    "CloudFront-Viewer-Cert-Subject",
    "CloudFront-Viewer-Cert-Issuer",
    "CloudFront-Viewer-Cert-Serial-Number",
    "CloudFront-Viewer-Cert-Sha256",
    "CloudFront-Viewer-Cert-Validity",
    "CloudFront-Viewer-Cert-Pem",
    "CloudFront-Viewer-Cert-San-Uri",
    "CloudFront-Viewer-Cert-San-Dns",
    "CloudFront-Viewer-Address",
    "CloudFront-Viewer-TLS",
    "CloudFront-Viewer-Http-Version",
    "CloudFront-Viewer-JA4-Fingerprint",
    "Client-Cert",
    "Client-Cert-Chain",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "Forwarded",
    "Via",
];

/// A request carrying every edge header twice, spelled with dashes and with underscores.
fn spoof_all(mut c: Client<'_>) -> Client<'_> {
    for h in EDGE_HEADERS {
        c = c.header(h, "spoofed").header(&h.replace('-', "_"), "spoofed");
    }
    c
}

/// The same, and one unrelated header with an underscore.
fn smuggle(c: Client<'_>) -> Client<'_> {
    spoof_all(c).header("X_Custom", "spoofed")
}

#[test]
fn underscore_spellings_never_reach_the_origin_and_the_viewer_headers_are_the_edges() {
    let f = fleet();
    let d = f.dir.path();
    for client in [Client::new(d, f.edge.port).cert("good"), Client::new(d, f.optional_port)] {
        let r = smuggle(client).get("/echo").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(!r.body.contains("spoofed"), "a client's copy reached the origin:\n{}", r.body);
        for h in [
            "cloudfront-viewer-address",
            "x-forwarded-for",
            "via",
            "cloudfront-viewer-tls",
            "cloudfront-viewer-ja4-fingerprint",
        ] {
            assert_eq!(r.body.matches(&format!("{h}:")).count(), 1, "{h}:\n{}", r.body);
        }
        let addr = r.echoed("cloudfront-viewer-address").unwrap();
        let (ip, port) = addr.rsplit_once(':').unwrap();
        assert_eq!(ip, "127.0.0.1");
        assert!(port.parse::<u16>().unwrap() > 0);
        assert_eq!(r.echoed("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        assert_eq!(r.echoed("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(r.echoed("cloudfront-viewer-http-version").as_deref(), Some("1.1"));
        assert_eq!(r.echoed("via").as_deref(), Some("1.1 mtls-edge"));
        let tls = r.echoed("cloudfront-viewer-tls").unwrap();
        assert!(tls.starts_with("TLSv1.3:TLS_") && tls.ends_with(":fullHandshake"), "{tls}");
    }
    // 19 edge names, 17 of them in two spellings (Via and Forwarded have no dash), per request
    // on each listener; one other header each.
    for port in [f.edge.port, f.optional_port] {
        let listener = format!("listener=\"127.0.0.1:{port}\"");
        let spoofed = format!("mtls_edge_spoofed_identity_headers_total{{{listener}}}");
        assert_eq!(metric(f.admin_port, &spoofed), 36.0);
        let dropped = format!("mtls_edge_underscore_headers_total{{action=\"dropped\",{listener}}}");
        assert_eq!(metric(f.admin_port, &dropped), 1.0);
    }
    // TLS 1.2 names its cipher OpenSSL's way; HTTP/2 is 2.0.
    let r = Client::new(d, f.edge.port)
        .cert("good")
        .version(SslVersion::TLS1_2)
        .get("/echo")
        .unwrap();
    let tls = r.echoed("cloudfront-viewer-tls").unwrap();
    assert!(tls.starts_with("TLSv1.2:ECDHE-"), "{tls}");
    let r = Client::new(d, f.edge.port).cert("good").h2().unwrap().get("/echo").unwrap();
    assert_eq!(r.echoed("cloudfront-viewer-http-version").as_deref(), Some("2.0"));
    assert_eq!(r.echoed("via").as_deref(), Some("2.0 mtls-edge"));
}

#[test]
fn headers_with_underscores_can_refuse_the_request_or_pass() {
    let f = fleet_with("headers_with_underscores: refuse\n");
    let d = f.dir.path();
    let r = Client::new(d, f.edge.port).cert("good").header("X_Custom", "v").get("/echo").unwrap();
    assert_eq!(r.status, 400);
    let refused = format!(
        "mtls_edge_underscore_headers_total{{action=\"refused\",listener=\"127.0.0.1:{}\"}}",
        f.edge.port
    );
    assert_eq!(metric(f.admin_port, &refused), 1.0);
    // An underscore spelling of an edge header is removed, not refused: it is never passed on.
    let r = spoof_all(Client::new(d, f.edge.port).cert("good")).get("/echo").unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("spoofed"), "{}", r.body);

    let f = fleet_with("headers_with_underscores: allow\n");
    let d = f.dir.path();
    let r = smuggle(Client::new(d, f.edge.port).cert("good")).get("/echo").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed("x_custom").as_deref(), Some("spoofed"));
    assert_eq!(r.body.matches("spoofed").count(), 1, "{}", r.body);
}

#[test]
fn viewer_headers_can_be_renamed_or_turned_off_and_are_still_stripped() {
    let f = fleet_with("viewer_headers: { address: X-Device-Address, via: null }\n");
    let d = f.dir.path();
    let r = smuggle(Client::new(d, f.edge.port).cert("good"))
        .header("X-Device-Address", "spoofed")
        .get("/echo")
        .unwrap();
    assert!(!r.body.contains("spoofed"), "{}", r.body);
    assert!(r.echoed("x-device-address").unwrap().starts_with("127.0.0.1:"));
    assert_eq!(r.echoed("cloudfront-viewer-address"), None);
    assert_eq!(r.echoed("via"), None);
}

#[test]
fn a_fleet_cannot_reach_the_other_fleets_hosts() {
    let f = fleet();
    let d = f.dir.path();
    let port = f.edge.port;
    // Fleet B on its own name.
    let r = Client::new(d, port)
        .cert("fleetb")
        .sni(Some("fleet-b.test"))
        .host("fleet-b.test")
        .get("/echo")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed("cloudfront-viewer-cert-subject").as_deref(),
        Some("CN=device-b-0001,O=Fleet B")
    );
    // Each fleet's certificate fails against the other fleet's trust store.
    assert!(Client::new(d, port)
        .cert("fleetb")
        .sni(Some("localhost"))
        .get("/echo")
        .is_err());
    assert!(Client::new(d, port)
        .cert("good")
        .sni(Some("fleet-b.test"))
        .host("fleet-b.test")
        .get("/echo")
        .is_err());
    // Verified by fleet A's store, addressing fleet B's host: misdirected.
    let r = Client::new(d, port)
        .cert("good")
        .sni(Some("localhost"))
        .host("fleet-b.test")
        .get("/echo")
        .unwrap();
    assert_eq!(r.status, 421);
    let r = Client::new(d, port)
        .cert("good")
        .sni(None)
        .host("fleet-b.test")
        .get("/echo")
        .unwrap();
    assert_eq!(r.status, 421);
    let r = Client::new(d, port)
        .cert("good")
        .sni(Some("localhost"))
        .host("FLEET-B.test:443")
        .get("/echo")
        .unwrap();
    assert_eq!(r.status, 421);
    // Verified by fleet B's store, addressing fleet A's host.
    let r = Client::new(d, port)
        .cert("fleetb")
        .sni(Some("fleet-b.test"))
        .host("localhost")
        .get("/echo")
        .unwrap();
    assert_eq!(r.status, 421);
}

#[test]
fn sessions_are_never_resumed_so_every_connection_is_verified() {
    let f = fleet();
    let d = f.dir.path();
    for v in VERSIONS {
        let first = Client::new(d, f.edge.port).cert("good").version(v).request("/echo");
        assert_eq!(first.result.unwrap().status, 200);
        let mut again = Client::new(d, f.edge.port).cert("good").version(v);
        again.session = first.session;
        let second = again.request("/echo");
        assert_eq!(second.result.unwrap().status, 200);
        assert!(!second.resumed, "{v:?}: a session was resumed");
    }
}

#[test]
fn http2_is_negotiated_by_alpn_with_the_client_certificate() {
    let f = fleet();
    let d = f.dir.path();
    let out = curl(
        d,
        f.edge.port,
        "good",
        "/echo",
        &["--http2", "-w", "\n%{http_version} %{http_code}"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim_end().ends_with("2 200"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("cloudfront-viewer-cert-subject: CN=device-0001"),
        "{text}"
    );
}

#[test]
fn identity_headers_can_be_renamed_dropped_and_sent_as_rfc9440() {
    let f = fleet_with("identity_headers: { subject: X-Device-Subject, pem: null, rfc9440: true }");
    let d = f.dir.path();
    let r = Client::new(d, f.edge.port)
        .cert("good")
        .header("X-Device-Subject", "CN=spoofed")
        .get("/echo")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echoed("x-device-subject").as_deref(),
        Some("CN=device-0001,OU=model-x1,O=Fleet A")
    );
    assert_eq!(
        r.body.matches("x-device-subject:").count(),
        1,
        "the spoofed copy survived"
    );
    assert_eq!(r.echoed("cloudfront-viewer-cert-subject"), None);
    assert_eq!(r.echoed("cloudfront-viewer-cert-pem"), None);
    assert!(r.echoed("cloudfront-viewer-cert-sha256").is_some());

    use base64::Engine;
    let certs = X509::stack_from_pem(&std::fs::read(d.join("good.pem")).unwrap()).unwrap();
    let b64 = |c: &X509| {
        format!(
            ":{}:",
            base64::engine::general_purpose::STANDARD.encode(c.to_der().unwrap())
        )
    };
    assert_eq!(r.echoed("client-cert"), Some(b64(&certs[0])));
    assert_eq!(r.echoed("client-cert-chain"), Some(b64(&certs[1])));
}

#[test]
fn a_missing_crl_refuses_the_handshake_as_revocation_unknown() {
    let f = fleet();
    let d = f.dir.path();
    for v in VERSIONS {
        let r = Client::new(d, f.edge.port)
            .cert("good")
            .sni(Some("partial-crl.test"))
            .version(v)
            .get("/echo");
        assert!(r.is_err(), "{v:?}: accepted without its issuer's CRL");
    }
    let n = wait_metric(
        f.admin_port,
        &format!(
            "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{}\",outcome=\"refused\",reason=\"ClientCertRevocationUnknown\"}}",
            f.edge.port
        ),
        2.0,
    );
    assert_eq!(n, 2.0, "{}", f.edge.log_text());
}

#[test]
fn crl_check_leaf_needs_only_the_issuers_crl_and_still_refuses_a_revoked_leaf() {
    let f = fleet();
    let d = f.dir.path();
    for v in VERSIONS {
        let c = || {
            Client::new(d, f.edge.port)
                .sni(Some("leaf-crl.test"))
                .host("leaf-crl.test")
                .version(v)
        };
        let r = c().cert("good").get("/echo").unwrap();
        assert_eq!(r.status, 200, "{v:?}: the root's CRL is not needed for the leaf");
        assert!(
            c().cert("revoked").get("/echo").is_err(),
            "{v:?}: revoked leaf accepted"
        );
    }
    let n = wait_metric(
        f.admin_port,
        &format!(
            "mtls_edge_handshakes_total{{listener=\"127.0.0.1:{}\",outcome=\"refused\",reason=\"ClientCertRevoked\"}}",
            f.edge.port
        ),
        2.0,
    );
    assert_eq!(n, 2.0, "{}", f.edge.log_text());
}

/// Relays one connection from a free port to `to`, and hands back the first TLS record the
/// client sent (its ClientHello) once it has passed.
fn relay_capturing_hello(to: u16) -> (u16, std::sync::mpsc::Receiver<Vec<u8>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut server = std::net::TcpStream::connect(("127.0.0.1", to)).unwrap();
        let mut record = vec![0u8; 5];
        client.read_exact(&mut record).unwrap();
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        record.resize(5 + len, 0);
        client.read_exact(&mut record[5..]).unwrap();
        server.write_all(&record).unwrap();
        tx.send(record).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut s2, &mut c2));
        let _ = std::io::copy(&mut client, &mut server);
    });
    (port, rx)
}

#[test]
fn the_origin_gets_the_clients_ja4_fingerprint() {
    let f = fleet();
    let d = f.dir.path();
    let (port, hello) = relay_capturing_hello(f.edge.port);
    let r = Client::new(d, port).cert("good").get("/echo").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let record = hello.recv().unwrap();
    // A record header (5 bytes), then the ClientHello's handshake header (4).
    assert_eq!((record[0], record[5]), (22, 1), "not a ClientHello");
    let want = mtls_edge::fingerprint::ja4(&record[9..]).unwrap();
    assert_eq!(r.echoed("cloudfront-viewer-ja4-fingerprint").as_deref(), Some(want.as_str()));
    assert!(want.starts_with("t13d"), "{want}");
}
