//! Origin mTLS over real sockets: the edge presents its client certificate, verifies the
//! origin's certificate and name, and answers 502 (with a log line naming the origin and the
//! reason) whenever the origin cannot be trusted or refuses the edge. Never a fallback.

mod common;

use common::*;
use mtls_edge::pki::{self, Ca, LeafSpec};

struct Setup {
    dir: tempfile::TempDir,
    _origins: Vec<Proc>,
    edge: Proc,
    admin_port: u16,
}

/// One edge with four origins, each on its own path prefix:
/// `/good` (trusted, right name), `/untrusted` (certificate from an unknown CA),
/// `/wrongname` (trusted CA, other host name), `/refuses` (requires another client CA).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = ServerPki::write(d);
    let device_ca = device_ca(d);
    save(d, "device", &device_ca.issue(&LeafSpec::client("device-1")).unwrap());

    let rogue = Ca::root("Test Origin CA").unwrap(); // same name as the trusted origin CA
    save(
        d,
        "untrusted-server",
        &rogue
            .issue(&LeafSpec::server("origin.internal", &["origin.internal"]))
            .unwrap(),
    );
    save(
        d,
        "wrongname-server",
        &server
            .origin_ca
            .issue(&LeafSpec::server("other", &["other.internal"]))
            .unwrap(),
    );
    let other_client_ca = Ca::root("Other Client CA").unwrap();
    pki::write_file(&d.join("other-client-ca.pem"), &other_client_ca.cert_pem, false).unwrap();

    let good = spawn_origin(d, "origin-server", "edge-ca.pem");
    let untrusted = spawn_origin(d, "untrusted-server", "edge-ca.pem");
    let wrongname = spawn_origin(d, "wrongname-server", "edge-ca.pem");
    let refuses = spawn_origin(d, "origin-server", "other-client-ca.pem");
    let (port, admin_port) = (free_port(), free_port());
    let yaml = format!(
        r#"{server}listeners:
{listener}trust_stores:
  devices: {{ ca_files: [device-ca.pem] }}
origins:
{}{}{}{}routes:
  - {{ path_prefix: /good, origin: good }}
  - {{ path_prefix: /untrusted, origin: untrusted }}
  - {{ path_prefix: /wrongname, origin: wrongname }}
  - {{ path_prefix: /refuses, origin: refuses }}
admin: {{ address: 127.0.0.1:{admin_port} }}
"#,
        origin_yaml("good", good.port),
        origin_yaml("untrusted", untrusted.port),
        origin_yaml("wrongname", wrongname.port),
        origin_yaml("refuses", refuses.port),
        server = server_yaml(d, 1),
        listener = listener_yaml(port, "required", "devices"),
    );
    let edge = spawn_edge(d, &yaml, port);
    Setup {
        dir,
        _origins: vec![good, untrusted, wrongname, refuses],
        edge,
        admin_port,
    }
}

#[test]
fn untrusted_misnamed_or_refusing_origins_give_502_with_the_reason() {
    let s = setup();
    let d = s.dir.path();
    let client = Client::new(d, s.edge.port).cert("device");
    assert_eq!(client.get("/good").unwrap().status, 200);
    for (path, origin, reason) in [
        ("/untrusted", "untrusted", "OriginCertInvalid"),
        ("/wrongname", "wrongname", "OriginCertInvalid"),
        ("/refuses", "refuses", "OriginRefusedClientCert"),
    ] {
        let r = client.get(path).unwrap();
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert_eq!(
            r.header("x-origin-client-cert-sha256"),
            None,
            "{path}: reached the origin"
        );
        let n = metric(
            s.admin_port,
            &format!("mtls_edge_origin_failures_total{{origin=\"{origin}\",reason=\"{reason}\"}}"),
        );
        assert!(n >= 1.0, "{path}: {reason} not counted; log:\n{}", s.edge.log_text());
        s.edge.wait_event(&format!("origin={origin} reason={reason}"));
    }
    // The good origin still works after the failures, and the edge reuses its pooled
    // connection: the origin sees the same edge source port every time.
    let ports: Vec<String> = (0..3)
        .map(|_| {
            let r = client.get("/good").unwrap();
            assert_eq!(r.status, 200);
            r.header("x-origin-peer-port").unwrap().to_string()
        })
        .collect();
    assert!(
        ports.windows(2).all(|w| w[0] == w[1]),
        "origin connections not reused: {ports:?}"
    );
}
